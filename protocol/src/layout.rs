//! The SuperOS memory map: guest-physical layout (what the VMM places where) and
//! virtual layout (how the kernel arranges its own half and every process's half).
//!
//! ```text
//! guest-physical                                 kernel virtual
//! 0x0000_0000 +--------------------+
//!             | unused (null page) |             0xffff_8000_0000_0000 DIRECT_MAP_BASE
//! 0x0000_1000 +--------------------+               all guest RAM, RW, NX, supervisor
//!             | BootInfo (32 KiB)  |
//! 0x0000_9000 +--------------------+             0xffff_ffff_8000_0000 KERNEL_VMA_BASE
//!             | VMM boot page      |               + 0x10_0000: kernel image, per section:
//!             | tables (7 frames)  |               text RX, rodata R NX, data/bss RW NX
//! 0x0001_0000 +--------------------+
//!             | unused             |             0xffff_ffff_fee0_0000 LAPIC_VA (UC)
//! 0x0010_0000 +--------------------+ KERNEL_PHYS_BASE
//!             | kernel image       |
//!             +--------------------+             user virtual (per process, private)
//!             | user program ELF   |             0x0040_0000 USER_IMAGE_BASE: ELF segments
//!             | images (VMM-placed)|             0x1_0000_0000 USER_MMAP_BASE: mem_map area
//!             |                    |             0x7fff_fefe_f000 stack guard (unmapped)
//!             +--------------------+             0x7fff_ff00_0000 USER_STACK_TOP
//!             | free frames        |             0x7fff_fffe_0000 USER_STATE_VA: user-state page
//! mem_size    +--------------------+             0x7fff_ffff_0000 GATE_VA: system-call gate
//! ```
//!
//! The VMM's boot page tables map the kernel image window and the direct map with
//! 2 MiB pages; the kernel replaces them with its own tables (4 KiB granularity,
//! W^X per section) before it runs any process.

/// Size of a page and of a physical frame.
pub const PAGE_SIZE: u64 = 4096;
/// Size of a large (2 MiB) page.
pub const LARGE_PAGE_SIZE: u64 = 2 << 20;

/// Guest-physical address of the [`crate::boot::BootInfo`] block.
pub const BOOT_INFO_GPA: u64 = 0x1000;
/// Bytes reserved for the boot-info block.
pub const BOOT_INFO_MAX_SIZE: u64 = 0x8000;
/// First frame of the VMM-built boot page tables.
pub const BOOT_PAGE_TABLES_GPA: u64 = BOOT_INFO_GPA + BOOT_INFO_MAX_SIZE;
/// Number of frames the boot page tables may use: PML4, direct-map PDPT, kernel
/// PDPT, kernel PD, and one PD per GiB of direct map.
pub const BOOT_PAGE_TABLES_FRAMES: u64 = 4 + MAX_GUEST_MEMORY_GIB;
/// Where the kernel image is loaded (its ELF `p_paddr` must lie at or above this).
pub const KERNEL_PHYS_BASE: u64 = 0x10_0000;

/// Smallest guest memory the VMM accepts.
pub const MIN_GUEST_MEMORY: u64 = 16 << 20;
/// Largest guest memory, in GiB: RAM stays below the 32-bit MMIO hole where the
/// local APIC lives (0xfee0_0000) and within the boot direct map.
pub const MAX_GUEST_MEMORY_GIB: u64 = 3;
/// Largest guest memory the VMM accepts.
pub const MAX_GUEST_MEMORY: u64 = MAX_GUEST_MEMORY_GIB << 30;

/// Start of the kernel's direct map of all guest-physical memory (PML4 slot 256).
pub const DIRECT_MAP_BASE: u64 = 0xffff_8000_0000_0000;
/// Virtual address at which guest-physical address 0 appears in the kernel image
/// window (PML4 slot 511, the `-2 GiB` "kernel code model" region).
pub const KERNEL_VMA_BASE: u64 = 0xffff_ffff_8000_0000;
/// Virtual address of the local APIC registers (mapped uncached, supervisor only).
pub const LAPIC_VA: u64 = 0xffff_ffff_fee0_0000;
/// Guest-physical address of the local APIC.
pub const LAPIC_GPA: u64 = 0xfee0_0000;

/// First address of the kernel half; the user half is everything below
/// [`USER_HALF_END`]. Addresses in between are non-canonical.
pub const KERNEL_HALF_START: u64 = 0xffff_8000_0000_0000;
/// One past the last user-half address.
pub const USER_HALF_END: u64 = 0x0000_8000_0000_0000;

/// Lowest address a user ELF segment may occupy (user programs link here).
pub const USER_IMAGE_BASE: u64 = 0x40_0000;
/// One past the highest address a user ELF segment may occupy.
pub const USER_IMAGE_LIMIT: u64 = 0x4000_0000;
/// Lowest address `mem_map` hands out.
pub const USER_MMAP_BASE: u64 = 0x1_0000_0000;
/// One past the highest address `mem_map` hands out.
pub const USER_MMAP_LIMIT: u64 = 0x7000_0000_0000;
/// Largest single `mem_map` request.
pub const USER_MMAP_MAX: u64 = 1 << 30;
/// One past the top of every process's stack.
pub const USER_STACK_TOP: u64 = 0x7fff_ff00_0000;
/// Pages of stack every process starts with.
pub const USER_STACK_PAGES: u64 = 8;
/// Unmapped pages below the stack; touching them is a `stack-guard` fault.
pub const USER_STACK_GUARD_PAGES: u64 = 1;
/// Bytes reserved at the top of the stack for the program's argument string.
pub const USER_ARGS_MAX: u64 = 128;
/// The system-call gate page: kernel-owned, read-only and executable in every
/// process, holding the entry stub the kernel chose at boot and a read-only
/// [`crate::syscall::GateInfo`].
pub const GATE_VA: u64 = 0x7fff_ffff_0000;
/// Offset of [`crate::syscall::GateInfo`] inside the gate page.
pub const GATE_INFO_OFFSET: u64 = 0x800;
/// Offset of the gate page's save stub: `xsave64 [rdi]` and `fxsave64
/// [rdi]` (only the latter where the CPU has no XSAVE), stores of DS, ES,
/// FS and GS at [`USER_STATE_SELECTORS_OFFSET`], then the gate's entry
/// instruction. The kernel runs it in ring 3, in the address space of a
/// process it is switching away from, with interrupts off (see
/// [`USER_STATE_VA`]).
pub const GATE_SAVE_STUB_OFFSET: u64 = 0x100;
/// Offset of the gate page's restore stub: `xrstor64 [rdi]` and
/// `fxrstor64 [rdi]`, loads of DS, ES, FS and GS, then the gate's entry
/// instruction.
pub const GATE_RESTORE_STUB_OFFSET: u64 = 0x140;
/// Each process's user-state save page: private to the process, writable,
/// never executable. While the process is not running it holds the CPU
/// state ring 3 can change and ring 0 cannot move on every host: its
/// x87/SSE/AVX registers (an `xsave` image at offset 0) and its DS, ES, FS
/// and GS selectors (at [`USER_STATE_SELECTORS_OFFSET`]). The gate page's
/// stubs save and restore them in ring 3: on the PVM host ring 3 runs
/// natively with the host's XCR0 and keeps its own segment registers, and
/// ring 0 can neither execute `xsave` nor reach those registers. A process
/// that corrupts its own save page is killed when the kernel next restores
/// it; no other process ever sees it.
pub const USER_STATE_VA: u64 = GATE_VA - 16 * PAGE_SIZE;
/// Where in the save page the stubs keep DS, ES, FS and GS (four 16-bit
/// selectors), past the end of every `xsave` component the stubs request.
pub const USER_STATE_SELECTORS_OFFSET: u64 = 0xfc0;

/// Returns true if `[addr, addr + len)` lies entirely in the user half.
pub const fn is_user_range(addr: u64, len: u64) -> bool {
    match addr.checked_add(len) {
        Some(end) => end <= USER_HALF_END,
        None => false,
    }
}

const _: () = {
    assert!(BOOT_INFO_GPA % PAGE_SIZE == 0);
    assert!(BOOT_PAGE_TABLES_GPA % PAGE_SIZE == 0);
    assert!(BOOT_PAGE_TABLES_GPA + BOOT_PAGE_TABLES_FRAMES * PAGE_SIZE <= KERNEL_PHYS_BASE);
    assert!(MAX_GUEST_MEMORY <= LAPIC_GPA);
    assert!(USER_IMAGE_LIMIT <= USER_MMAP_BASE);
    assert!(USER_MMAP_LIMIT < USER_STACK_TOP - (USER_STACK_PAGES + USER_STACK_GUARD_PAGES) * PAGE_SIZE);
    assert!(USER_IMAGE_LIMIT < USER_STACK_TOP);
    assert!(USER_STACK_TOP < GATE_VA);
    assert!(GATE_VA + PAGE_SIZE <= USER_HALF_END);
    assert!(GATE_INFO_OFFSET < PAGE_SIZE);
    assert!(USER_STACK_TOP < USER_STATE_VA && USER_STATE_VA + PAGE_SIZE < GATE_VA);
    assert!(GATE_SAVE_STUB_OFFSET + 64 <= GATE_RESTORE_STUB_OFFSET);
    assert!(GATE_RESTORE_STUB_OFFSET + 64 <= GATE_INFO_OFFSET);
    assert!(USER_STATE_SELECTORS_OFFSET >= 2696 && USER_STATE_SELECTORS_OFFSET + 8 <= PAGE_SIZE);
    assert!(LAPIC_VA > KERNEL_VMA_BASE);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_range_rejects_overflow_and_kernel_half() {
        assert!(is_user_range(0x40_0000, 0x1000));
        assert!(is_user_range(USER_HALF_END - 1, 1));
        assert!(!is_user_range(USER_HALF_END - 1, 2));
        assert!(!is_user_range(u64::MAX, 1));
        assert!(!is_user_range(KERNEL_HALF_START, 0));
    }
}
