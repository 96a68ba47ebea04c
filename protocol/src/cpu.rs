//! The CPU state the kernel sets at boot and keeps for as long as it runs:
//! descriptor tables, entry MSRs, control-register bits, interrupt stacks and
//! the user-visible FPU/SIMD state. The kernel builds it from these constants
//! and the VMM's checker (`cpu-state-intact`) compares the live vCPU with
//! them, so the two sides cannot drift apart.
//!
//! The design in one paragraph: ring 3 enters ring 0 only through the
//! system-call gate (`syscall` to `LSTAR`, or the DPL-3 `int3` gate) and
//! through exceptions and interrupts, each of which lands on a kernel stack
//! (`TSS.RSP0`, or an IST stack for NMI, #DB, #MC and #DF). There is no
//! 32-bit user code segment, so compatibility mode cannot be reached;
//! `CSTAR` and the `SYSENTER` MSRs point at a stub that kills the caller all
//! the same.
//!
//! User programs may use x87, MMX, SSE and AVX (and AVX-512 where the CPU
//! has it), and `rdfsbase`/`wrfsbase` where the CPU has FSGSBASE: on the PVM
//! host ring 3 runs natively with the host's CR4 and XCR0, whatever the
//! guest sets, so that is what ring 3 can do there, and the kernel enables
//! the same on ordinary KVM so that a program behaves the same on both. All
//! of that state is private to each process: the FPU/SIMD registers and the
//! data-segment selectors are saved and restored in ring 3 by the gate
//! page's switch stubs ([`crate::layout::USER_STATE_VA`]), the FS and GS
//! bases by the kernel, at every switch.

/// Null descriptor slots: 0x00, 0x08, 0x20 and 0x38.
pub const NULL_SELECTORS: [u16; 4] = [0x00, 0x08, SYSRET32_SELECTOR, 0x38];
/// Kernel 64-bit code segment (DPL 0).
pub const KERNEL_CODE_SELECTOR: u16 = 0x10;
/// Kernel data segment (DPL 0).
pub const KERNEL_DATA_SELECTOR: u16 = 0x18;
/// The slot `STAR[63:48]` names for a 32-bit `sysret`. The kernel never
/// returns with `sysret` (it uses `iretq`), so the slot is a null descriptor:
/// a far transfer to selector 0x23 is a #GP, not compatibility mode.
pub const SYSRET32_SELECTOR: u16 = 0x20;
/// User data segment, with RPL 3 (DPL 3; also the stack segment).
pub const USER_DATA_SELECTOR: u16 = 0x2b;
/// User 64-bit code segment, with RPL 3 (DPL 3, L=1): the only code segment
/// ring 3 can use.
pub const USER_CODE_SELECTOR: u16 = 0x33;
/// Task-state segment (a 16-byte system descriptor in slots 8 and 9).
pub const TSS_SELECTOR: u16 = 0x40;
/// Descriptors in the GDT (8-byte slots, the TSS takes two).
pub const GDT_SLOTS: usize = 10;

/// `STAR`: `syscall` loads CS 0x10 / SS 0x18; a 64-bit `sysret` would load
/// CS 0x33 / SS 0x2b (0x23 + 16 and + 8).
pub const STAR_VALUE: u64 = ((SYSRET32_SELECTOR as u64 | 3) << 48) | ((KERNEL_CODE_SELECTOR as u64) << 32);
/// RFLAGS bits `syscall` clears (`SFMASK`): IF, TF, DF, IOPL, AC and NT, so
/// the entry stub runs with interrupts off, no single-step, string
/// operations forward and SMAP enforced.
pub const SFMASK_VALUE: u64 = RFLAGS_IF | RFLAGS_TF | RFLAGS_DF | RFLAGS_IOPL | RFLAGS_AC | RFLAGS_NT;
/// `SYSENTER_CS`: zero, so `sysenter` is #GP (Intel) or #UD (AMD, long mode)
/// in ring 3 and never enters ring 0.
pub const SYSENTER_CS_VALUE: u64 = 0;

/// RFLAGS: trap flag (single-step).
pub const RFLAGS_TF: u64 = 1 << 8;
/// RFLAGS: interrupt enable.
pub const RFLAGS_IF: u64 = 1 << 9;
/// RFLAGS: direction flag.
pub const RFLAGS_DF: u64 = 1 << 10;
/// RFLAGS: I/O privilege level (two bits).
pub const RFLAGS_IOPL: u64 = 3 << 12;
/// RFLAGS: nested task.
pub const RFLAGS_NT: u64 = 1 << 14;
/// RFLAGS: alignment check / SMAP override.
pub const RFLAGS_AC: u64 = 1 << 18;

/// CR0: protected mode.
pub const CR0_PE: u64 = 1 << 0;
/// CR0: monitor coprocessor (`wait` honours TS).
pub const CR0_MP: u64 = 1 << 1;
/// CR0: x87 emulation (set: every x87/MMX/SSE instruction faults).
pub const CR0_EM: u64 = 1 << 2;
/// CR0: task switched (set: the next FPU/SIMD instruction is #NM).
pub const CR0_TS: u64 = 1 << 3;
/// CR0: native x87 error reporting (#MF instead of the legacy IRQ 13).
pub const CR0_NE: u64 = 1 << 5;
/// CR0: supervisor writes honour read-only pages.
pub const CR0_WP: u64 = 1 << 16;
/// CR0: alignment checking for ring 3 when RFLAGS.AC is set.
pub const CR0_AM: u64 = 1 << 18;
/// CR0: paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR0 bits that must be set while the kernel runs (CR0.AM because the PVM
/// host runs ring 3 with it set: on every host, a misaligned access with
/// RFLAGS.AC set is then #AC).
pub const CR0_REQUIRED: u64 = CR0_PE | CR0_MP | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
/// CR0 bits that must be clear (user FPU/SIMD is enabled, not trapped).
pub const CR0_FORBIDDEN: u64 = CR0_EM | CR0_TS;

/// CR4: time-stamp counter readable only in ring 0 (left clear: programs read the TSC).
pub const CR4_TSD: u64 = 1 << 2;
/// CR4: physical address extension (long mode).
pub const CR4_PAE: u64 = 1 << 5;
/// CR4: `rdpmc` allowed in ring 3.
pub const CR4_PCE: u64 = 1 << 8;
/// CR4: `fxsave`/`fxrstor` and SSE enabled.
pub const CR4_OSFXSR: u64 = 1 << 9;
/// CR4: unmasked SIMD floating-point exceptions are #XM (not #UD).
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// CR4: `sgdt`, `sidt`, `sldt`, `smsw` and `str` are #GP in ring 3.
pub const CR4_UMIP: u64 = 1 << 11;
/// CR4: `rdfsbase`/`wrfsbase` and friends usable in ring 3.
pub const CR4_FSGSBASE: u64 = 1 << 16;
/// CR4: `xsave` family and `XCR0` enabled.
pub const CR4_OSXSAVE: u64 = 1 << 18;
/// CR4: supervisor-mode execution prevention.
pub const CR4_SMEP: u64 = 1 << 20;
/// CR4: supervisor-mode access prevention.
pub const CR4_SMAP: u64 = 1 << 21;
/// CR4: protection keys for user pages.
pub const CR4_PKE: u64 = 1 << 22;
/// CR4 bits that must be set on every host.
pub const CR4_REQUIRED: u64 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
/// CR4 bits that must be set where the CPU (as CPUID describes it to the
/// guest) has the feature: SMEP, SMAP, UMIP, OSXSAVE, FSGSBASE.
pub const CR4_IF_SUPPORTED: u64 = CR4_SMEP | CR4_SMAP | CR4_UMIP | CR4_OSXSAVE | CR4_FSGSBASE;
/// CR4 bits that must be clear: each would give ring 3 something the design
/// does not (`rdpmc`, protection keys).
pub const CR4_FORBIDDEN: u64 = CR4_PCE | CR4_PKE;

/// EFER: `syscall`/`sysret` enabled (only while the `syscall` gate is in use).
pub const EFER_SCE: u64 = 1 << 0;
/// EFER: long mode enabled.
pub const EFER_LME: u64 = 1 << 8;
/// EFER: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// EFER: no-execute page bit enabled.
pub const EFER_NXE: u64 = 1 << 11;

/// XCR0: x87 state.
pub const XCR0_X87: u64 = 1 << 0;
/// XCR0: SSE state (XMM registers, MXCSR).
pub const XCR0_SSE: u64 = 1 << 1;
/// XCR0: AVX state (upper halves of the YMM registers).
pub const XCR0_AVX: u64 = 1 << 2;
/// XCR0: AVX-512 opmask registers.
pub const XCR0_OPMASK: u64 = 1 << 5;
/// XCR0: upper halves of ZMM0-15.
pub const XCR0_ZMM_HI256: u64 = 1 << 6;
/// XCR0: ZMM16-31.
pub const XCR0_HI16_ZMM: u64 = 1 << 7;
/// The state components the kernel enables in XCR0, of those CPUID leaf 0xd
/// reports: x87, SSE, AVX and AVX-512 (user state that fits the save page
/// in the standard `xsave` layout; AMX and the supervisor components are
/// never enabled). XCR0 is exactly `CPUID(0xd).eax & XCR0_USER_MAX`.
pub const XCR0_USER_MAX: u64 = XCR0_X87 | XCR0_SSE | XCR0_AVX | XCR0_OPMASK | XCR0_ZMM_HI256 | XCR0_HI16_ZMM;
/// The requested-feature bitmap the FPU stubs pass to `xsave`/`xrstor`:
/// everything that fits the save page in the standard layout (x87, SSE,
/// AVX, MPX, AVX-512 and PKRU: the last byte ends at 2696), so that on the
/// PVM host, where ring 3 runs with the host's XCR0, every user component
/// the host enables is moved too.
pub const XSAVE_REQUEST: u64 = 0x2ff;

/// Model-specific registers the design sets (or keeps at zero).
pub mod msr {
    /// Extended feature enable register.
    pub const EFER: u32 = 0xc000_0080;
    /// `syscall`/`sysret` segment selectors.
    pub const STAR: u32 = 0xc000_0081;
    /// 64-bit `syscall` entry point.
    pub const LSTAR: u32 = 0xc000_0082;
    /// Compatibility-mode `syscall` entry point.
    pub const CSTAR: u32 = 0xc000_0083;
    /// RFLAGS bits cleared on `syscall`.
    pub const SFMASK: u32 = 0xc000_0084;
    /// FS base (user state: private to each process).
    pub const FS_BASE: u32 = 0xc000_0100;
    /// GS base (user state: private to each process).
    pub const GS_BASE: u32 = 0xc000_0101;
    /// The GS base `swapgs` exchanges (never used: zero).
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// `sysenter` code segment.
    pub const SYSENTER_CS: u32 = 0x174;
    /// `sysenter` stack pointer.
    pub const SYSENTER_ESP: u32 = 0x175;
    /// `sysenter` entry point.
    pub const SYSENTER_EIP: u32 = 0x176;
}

/// Kernel symbols the entry MSRs must name (the VMM resolves them in the
/// kernel ELF it loaded).
pub mod symbols {
    /// `LSTAR`: the 64-bit `syscall` entry.
    pub const SYSCALL_ENTRY: &str = "syscall_entry";
    /// `CSTAR` and `SYSENTER_EIP`: kills the caller.
    pub const FOREIGN_ENTRY: &str = "foreign_entry";
    /// Top of the kernel stack (`TSS.RSP0`, `SYSENTER_ESP`).
    pub const KERNEL_STACK_TOP: &str = "__kernel_stack_top";
    /// Start of kernel text.
    pub const TEXT_START: &str = "__text_start";
    /// End of kernel text.
    pub const TEXT_END: &str = "__text_end";
    /// One past the kernel's debug path (from [`TEXT_START`]: the entry
    /// stubs, `trap_dispatch`, the kernel's debug trap), where a debugger's
    /// breakpoint would trap again before it could be answered.
    pub const DEBUG_PATH_END: &str = "__debug_path_end";
    /// The idle context's code (a CPU with nothing to run halts there with
    /// interrupts on): a vCPU there is not half-way through kernel work.
    pub const IDLE_LOOP: &str = "idle_loop";
    /// One past the idle loop.
    pub const IDLE_LOOP_END: &str = "idle_loop_end";
    /// Where a CPU halts waiting for the big kernel lock (it holds nothing
    /// and has changed nothing yet).
    pub const LOCK_WAIT: &str = "lock_wait";
    /// One past `lock_wait`.
    pub const LOCK_WAIT_END: &str = "lock_wait_end";
    /// Each CPU's `syscall` entry (its LSTAR), by CPU; CPU 0's is also
    /// [`SYSCALL_ENTRY`].
    pub const SYSCALL_ENTRIES: [&str; super::MAX_CPUS as usize] = [
        SYSCALL_ENTRY,
        "syscall_entry_cpu1",
        "syscall_entry_cpu2",
        "syscall_entry_cpu3",
        "syscall_entry_cpu4",
        "syscall_entry_cpu5",
        "syscall_entry_cpu6",
        "syscall_entry_cpu7",
    ];
    /// Each CPU's CSTAR and SYSENTER_EIP entry (kills the caller), by CPU;
    /// CPU 0's is also [`FOREIGN_ENTRY`].
    pub const FOREIGN_ENTRIES: [&str; super::MAX_CPUS as usize] = [
        FOREIGN_ENTRY,
        "foreign_entry_cpu1",
        "foreign_entry_cpu2",
        "foreign_entry_cpu3",
        "foreign_entry_cpu4",
        "foreign_entry_cpu5",
        "foreign_entry_cpu6",
        "foreign_entry_cpu7",
    ];
}

/// Most vCPUs a VM may have (`run --cpus`).
pub const MAX_CPUS: u32 = 8;

/// Bytes of each CPU's kernel stack (`TSS.RSP0`, `SYSENTER_ESP`).
pub const KERNEL_STACK_BYTES: u64 = 64 * 1024;

/// Where the stacks of the application processors (CPUs 1 and up) are
/// mapped: CPU `n` has the window `CPU_STACKS_VA + n * CPU_STACKS_STRIDE`
/// (the window of CPU 0 stays unused: its stacks are the kernel image's
/// `__kernel_stack_top` and the IST symbols). In each window, from the
/// bottom: an unmapped guard page, the kernel stack, then per
/// [`IST_SLOTS`] entry an unmapped guard page and that stack. The VMM
/// computes the tops it expects in each AP's TSS from these constants,
/// never from the kernel.
pub const CPU_STACKS_VA: u64 = 0xffff_ffff_c000_0000;
/// Size of one CPU's stack window.
pub const CPU_STACKS_STRIDE: u64 = 512 * 1024;
/// Bytes of an unmapped guard page.
pub const STACK_GUARD_BYTES: u64 = 4096;

/// A CPU's stacks: the kernel stack or the stack of an IST slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuStack {
    /// The kernel stack.
    Kernel,
    /// The stack of [`IST_SLOTS`]`[index]`.
    Ist(usize),
}

/// For an application processor (`cpu` 1 ..= [`MAX_CPUS`] - 1), the
/// `[bottom, top)` of `stack` in its window; `None` for CPU 0 (whose
/// stacks are in the kernel image) and out-of-range CPUs or slots.
pub const fn ap_stack(cpu: u32, stack: CpuStack) -> Option<(u64, u64)> {
    if cpu == 0 || cpu >= MAX_CPUS {
        return None;
    }
    let mut bottom = CPU_STACKS_VA + cpu as u64 * CPU_STACKS_STRIDE + STACK_GUARD_BYTES;
    let index = match stack {
        CpuStack::Kernel => return Some((bottom, bottom + KERNEL_STACK_BYTES)),
        CpuStack::Ist(index) => index,
    };
    if index >= IST_SLOTS.len() {
        return None;
    }
    bottom += KERNEL_STACK_BYTES;
    let mut i = 0;
    while i < index {
        bottom += STACK_GUARD_BYTES + IST_SLOTS[i].bytes;
        i += 1;
    }
    bottom += STACK_GUARD_BYTES;
    Some((bottom, bottom + IST_SLOTS[index].bytes))
}

const _: () = {
    // Every AP window holds its stacks and guard pages.
    let mut bytes = STACK_GUARD_BYTES + KERNEL_STACK_BYTES;
    let mut i = 0;
    while i < IST_SLOTS.len() {
        bytes += STACK_GUARD_BYTES + IST_SLOTS[i].bytes;
        i += 1;
    }
    assert!(bytes <= CPU_STACKS_STRIDE);
    // The windows end below the local APIC's page.
    assert!(CPU_STACKS_VA + MAX_CPUS as u64 * CPU_STACKS_STRIDE <= crate::layout::LAPIC_VA);
};

/// An interrupt-stack-table slot (1-based, as in an IDT gate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IstSlot {
    /// The vector that runs on it.
    pub vector: u8,
    /// Its slot in the TSS (1..=7).
    pub slot: u8,
    /// The kernel symbol at the top of CPU 0's stack.
    pub top_symbol: &'static str,
    /// Its size (the same on every CPU; CPU 0's in the linker script).
    pub bytes: u64,
}

/// Vectors that always run on a stack of their own, whatever RSP was when
/// they arrived: a #DB or NMI on the first instruction of the `syscall`
/// entry (still on the user's RSP) must not push onto user memory, and #DF
/// and #MC must work whatever state the kernel stack is in.
pub const IST_SLOTS: [IstSlot; 4] = [
    IstSlot { vector: 8, slot: 1, top_symbol: "__ist_double_fault_top", bytes: 16 * 1024 },
    IstSlot { vector: 2, slot: 2, top_symbol: "__ist_nmi_top", bytes: 8 * 1024 },
    IstSlot { vector: 1, slot: 3, top_symbol: "__ist_debug_top", bytes: 64 * 1024 },
    IstSlot { vector: 18, slot: 4, top_symbol: "__ist_machine_check_top", bytes: 64 * 1024 },
];

/// The only IDT gate ring 3 may invoke with `int n`: `int3`, the system-call
/// gate on hosts where `syscall` cannot enter ring 0.
pub const USER_GATE_VECTOR: u8 = 3;

/// Pseudo-vectors the entry stubs record for entries that are not IDT
/// vectors.
pub mod entry_vector {
    /// The 64-bit `syscall` instruction.
    pub const SYSCALL: u64 = 0x100;
    /// `syscall` from compatibility mode (`CSTAR`) or `sysenter`: never
    /// legitimate.
    pub const FOREIGN: u64 = 0x101;
}

/// The x87/SSE state a process starts with, as the 512-byte `fxsave` image
/// holds it: x87 control word 0x037f (all exceptions masked, 64-bit
/// precision, round to nearest), everything else empty, MXCSR 0x1f80 (all
/// exceptions masked, round to nearest).
pub const FPU_INITIAL_FCW: u16 = 0x037f;
/// The MXCSR a process starts with.
pub const FPU_INITIAL_MXCSR: u32 = 0x1f80;
/// Size of an `fxsave` image.
pub const FXSAVE_SIZE: usize = 512;
/// Offset of the x87 control word in an `fxsave` image.
pub const FXSAVE_FCW: usize = 0;
/// Offset of the 64-bit x87 instruction pointer in an `fxsave64` image.
pub const FXSAVE_FIP: usize = 8;
/// Offset of MXCSR in an `fxsave` image.
pub const FXSAVE_MXCSR: usize = 24;

/// The `fxsave64` image of the state a process starts with (what `fninit`
/// and a default MXCSR give): every exception masked, nothing pending,
/// every register empty or zero.
pub const fn initial_fxsave_image() -> [u8; FXSAVE_SIZE] {
    let mut bytes = [0u8; FXSAVE_SIZE];
    let fcw = FPU_INITIAL_FCW.to_le_bytes();
    bytes[FXSAVE_FCW] = fcw[0];
    bytes[FXSAVE_FCW + 1] = fcw[1];
    let mxcsr = FPU_INITIAL_MXCSR.to_le_bytes();
    let mut i = 0;
    while i < 4 {
        bytes[FXSAVE_MXCSR + i] = mxcsr[i];
        i += 1;
    }
    bytes
}

/// The x87 instruction pointer an `fxsave64` image holds: for a pending
/// #MF, the x87 instruction that raised the exception.
pub fn fxsave_x87_instruction_pointer(image: &[u8; FXSAVE_SIZE]) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&image[FXSAVE_FIP..FXSAVE_FIP + 8]);
    u64::from_le_bytes(bytes)
}

/// Decoded 8-byte GDT entry (a code, data or the first half of a system
/// descriptor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentDescriptor {
    /// The raw 8 bytes.
    pub raw: u64,
}

impl SegmentDescriptor {
    /// Present bit.
    pub const fn present(self) -> bool {
        self.raw & (1 << 47) != 0
    }
    /// Descriptor privilege level.
    pub const fn dpl(self) -> u8 {
        ((self.raw >> 45) & 3) as u8
    }
    /// S bit: a code or data segment (else a system descriptor).
    pub const fn is_code_or_data(self) -> bool {
        self.raw & (1 << 44) != 0
    }
    /// A code segment (S=1 and the executable type bit).
    pub const fn is_code(self) -> bool {
        self.is_code_or_data() && self.raw & (1 << 43) != 0
    }
    /// A 64-bit code segment (L=1, D=0).
    pub const fn is_long_mode_code(self) -> bool {
        self.is_code() && self.raw & (1 << 53) != 0 && self.raw & (1 << 54) == 0
    }
    /// The system-descriptor type (meaningful when S=0).
    pub const fn system_type(self) -> u8 {
        ((self.raw >> 40) & 0xf) as u8
    }
    /// True for a 64-bit TSS (available 0x9 or busy 0xb).
    pub const fn is_tss(self) -> bool {
        !self.is_code_or_data() && (self.system_type() == 0x9 || self.system_type() == 0xb)
    }
}

/// A decoded 16-byte long-mode IDT gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdtGate {
    /// Handler address.
    pub offset: u64,
    /// Code selector the handler runs with.
    pub selector: u16,
    /// IST slot (0 = the ordinary stack switch).
    pub ist: u8,
    /// Gate type (0xe interrupt gate, 0xf trap gate).
    pub gate_type: u8,
    /// Lowest privilege level allowed to invoke it with `int n`.
    pub dpl: u8,
    /// Present bit.
    pub present: bool,
}

impl IdtGate {
    /// Decodes the 16 bytes of a gate.
    pub fn decode(bytes: &[u8; 16]) -> IdtGate {
        let low = u64::from_le_bytes([
            bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
        ]);
        let high = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        IdtGate {
            offset: (low & 0xffff) | ((low >> 32) & 0xffff_0000) | (u64::from(high) << 32),
            selector: ((low >> 16) & 0xffff) as u16,
            ist: ((low >> 32) & 7) as u8,
            gate_type: ((low >> 40) & 0xf) as u8,
            dpl: ((low >> 45) & 3) as u8,
            present: low & (1 << 47) != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_names_the_gdt_selectors() {
        assert_eq!(STAR_VALUE >> 48, 0x23);
        assert_eq!((STAR_VALUE >> 48) + 16, u64::from(USER_CODE_SELECTOR));
        assert_eq!((STAR_VALUE >> 48) + 8, u64::from(USER_DATA_SELECTOR));
        assert_eq!((STAR_VALUE >> 32) & 0xffff, u64::from(KERNEL_CODE_SELECTOR));
        assert_eq!(SFMASK_VALUE, 0x4_7700);
    }

    #[test]
    fn ap_stacks_are_disjoint_page_aligned_and_guarded() {
        assert_eq!(ap_stack(0, CpuStack::Kernel), None);
        assert_eq!(ap_stack(MAX_CPUS, CpuStack::Kernel), None);
        assert_eq!(ap_stack(1, CpuStack::Ist(IST_SLOTS.len())), None);
        let mut all = [(0u64, 0u64); (MAX_CPUS as usize - 1) * (IST_SLOTS.len() + 1)];
        let mut count = 0;
        for cpu in 1..MAX_CPUS {
            let window = CPU_STACKS_VA + u64::from(cpu) * CPU_STACKS_STRIDE;
            let stacks = core::iter::once(CpuStack::Kernel).chain((0..IST_SLOTS.len()).map(CpuStack::Ist));
            for stack in stacks {
                let (bottom, top) = ap_stack(cpu, stack).unwrap();
                assert_eq!(bottom % 4096, 0);
                assert_eq!(top % 4096, 0);
                assert!(bottom >= window + STACK_GUARD_BYTES && top <= window + CPU_STACKS_STRIDE);
                all[count] = (bottom, top);
                count += 1;
            }
        }
        assert_eq!(count, all.len());
        all.sort();
        for pair in all.windows(2) {
            // A guard page between any two stacks.
            assert!(pair[0].1 + STACK_GUARD_BYTES <= pair[1].0, "{pair:x?}");
        }
    }

    #[test]
    fn the_initial_fpu_image_masks_every_exception() {
        let image = initial_fxsave_image();
        assert_eq!(&image[FXSAVE_FCW..FXSAVE_FCW + 2], &[0x7f, 0x03]);
        assert_eq!(&image[FXSAVE_MXCSR..FXSAVE_MXCSR + 4], &[0x80, 0x1f, 0, 0]);
        assert!(image[2..24].iter().all(|&b| b == 0), "status and tag words empty, nothing pending");
        assert!(image[32..].iter().all(|&b| b == 0), "every register zero");
        assert_eq!(fxsave_x87_instruction_pointer(&image), 0);
        let mut pending = image;
        pending[FXSAVE_FIP..FXSAVE_FIP + 8].copy_from_slice(&0x40_1234u64.to_le_bytes());
        assert_eq!(fxsave_x87_instruction_pointer(&pending), 0x40_1234);
    }

    #[test]
    fn descriptors_decode() {
        // The x86_64 crate's (and Linux's) 64-bit user code descriptor.
        let user_code = SegmentDescriptor { raw: 0x00af_fb00_0000_ffff };
        assert!(user_code.present() && user_code.is_long_mode_code());
        assert_eq!(user_code.dpl(), 3);
        // A 32-bit user code segment (what 0x20 held): code, but not long mode.
        let user32 = SegmentDescriptor { raw: 0x00cf_fa00_0000_ffff };
        assert!(user32.is_code() && !user32.is_long_mode_code());
        let data = SegmentDescriptor { raw: 0x00cf_f300_0000_ffff };
        assert!(!data.is_code() && data.is_code_or_data());
        let tss = SegmentDescriptor { raw: 0x0000_8900_0000_0067 };
        assert!(tss.is_tss() && tss.dpl() == 0);
        assert!(!SegmentDescriptor { raw: 0 }.present());
    }

    #[test]
    fn idt_gates_decode() {
        // offset 0xffff_ffff_8010_1234, selector 0x10, IST 2, interrupt gate, DPL 3, present.
        let mut bytes = [0u8; 16];
        let low: u64 = 0x1234 | (0x10 << 16) | (2 << 32) | (0xee << 40) | (0x8010 << 48);
        bytes[..8].copy_from_slice(&low.to_le_bytes());
        bytes[8..12].copy_from_slice(&0xffff_ffffu32.to_le_bytes());
        let gate = IdtGate::decode(&bytes);
        assert_eq!(gate.offset, 0xffff_ffff_8010_1234);
        assert_eq!(
            (gate.selector, gate.ist, gate.gate_type, gate.dpl, gate.present),
            (0x10, 2, 0xe, 3, true)
        );
    }
}
