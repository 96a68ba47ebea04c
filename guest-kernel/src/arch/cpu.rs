//! Thin safe wrappers around privileged instructions.

use core::arch::asm;

/// Writes `value` to I/O `port` (a VM exit to the VMM for hypercall ports).
#[inline(always)]
pub fn out32(port: u16, value: u32) {
    // SAFETY: the hypercall ports have no effect on guest memory or CPU state
    // beyond what the VMM documents for them.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags)) };
}

/// Reads CR2 (the faulting address of the last page fault).
pub fn read_cr2() -> u64 {
    let value;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Reads CR3 (the current PML4's physical address and flags).
pub fn read_cr3() -> u64 {
    let value;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Switches to the address space rooted at `pml4`.
///
/// # Safety
/// `pml4` must be a valid PML4 whose kernel half maps the running kernel
/// (text, data, stacks) exactly as the current one does.
pub unsafe fn write_cr3(pml4: u64) {
    // SAFETY: the caller guarantees the kernel stays mapped.
    unsafe { asm!("mov cr3, {}", in(reg) pml4, options(nostack, preserves_flags)) };
}

/// Invalidates the TLB entry for `va` in the current address space.
pub fn invlpg(va: u64) {
    // SAFETY: invalidating a TLB entry cannot break memory safety.
    unsafe { asm!("invlpg [{}]", in(reg) va, options(nostack, preserves_flags)) };
}

/// Reads a model-specific register.
pub fn rdmsr(msr: u32) -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: only called with architectural MSRs the CPU model supports.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") low, out("edx") high, options(nomem, nostack)) };
    (u64::from(high) << 32) | u64::from(low)
}

/// Writes a model-specific register.
///
/// # Safety
/// The MSR and value must not break the kernel's execution environment.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller vouches for the MSR and value.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack))
    };
}

/// Reads CR0.
pub fn read_cr0() -> u64 {
    let value;
    // SAFETY: reading CR0 has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Reads CR4.
pub fn read_cr4() -> u64 {
    let value;
    // SAFETY: reading CR4 has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Writes CR0.
///
/// # Safety
/// The new value must keep paging and protected mode enabled.
pub unsafe fn write_cr0(value: u64) {
    // SAFETY: the caller vouches for the value.
    unsafe { asm!("mov cr0, {}", in(reg) value, options(nostack, preserves_flags)) };
}

/// Writes CR4.
///
/// # Safety
/// The new value must keep PAE enabled and only set supported bits.
pub unsafe fn write_cr4(value: u64) {
    // SAFETY: the caller vouches for the value.
    unsafe { asm!("mov cr4, {}", in(reg) value, options(nostack, preserves_flags)) };
}

/// Stops the CPU for good (interrupts disabled).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: halting with interrupts disabled only stops this CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Model-specific register numbers (the design's list, shared with the VMM).
pub use superos_protocol::cpu::msr;

/// Sets extended control register 0 (the state components `xsave` and the
/// instructions that use them may touch).
///
/// # Safety
/// CR4.OSXSAVE must be set, and `value` must include x87 and be a
/// combination CPUID leaf 0xd reports as supported.
pub unsafe fn write_xcr0(value: u64) {
    // SAFETY: the caller vouches for the value. Encoded as bytes: the
    // assembler would otherwise want the xsave target feature, which the
    // soft-float kernel target does not have.
    unsafe {
        asm!(".byte 0x0f, 0x01, 0xd1", in("ecx") 0u32, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nomem, nostack))
    };
}

/// Returns (eax, ebx, ecx, edx) of CPUID `leaf`/`subleaf`, or `None` if the
/// CPU does not have that leaf.
pub fn cpuid(leaf: u32, subleaf: u32) -> Option<(u32, u32, u32, u32)> {
    let max = core::arch::x86_64::__cpuid(leaf & 0x8000_0000).eax;
    if leaf > max {
        return None;
    }
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    Some((r.eax, r.ebx, r.ecx, r.edx))
}
