//! The FS and GS bases of a process, which ring 3 can change with
//! `wrfsbase`/`wrgsbase` wherever the CPU has FSGSBASE (the PVM host runs
//! ring 3 with the host's CR4, and the kernel enables it elsewhere so that
//! both agree). They are per-vCPU registers, so the kernel saves them when a
//! process stops running and loads them before it runs again (after its
//! restore stub has loaded FS and GS, which reload the bases from their
//! descriptors). The rest of the user CPU state is moved in ring 3 by the
//! gate page's switch stubs (`kernel::user_cpu`).
//!
//! Ring 0 otherwise never touches user FPU state: it only executes
//! `fxsave64` here, to read the address of the x87 instruction behind a #MF.

use super::cpu::{self, msr};
use core::arch::asm;
use superos_protocol::cpu::{fxsave_x87_instruction_pointer, FXSAVE_SIZE};

/// The FS and GS bases of a process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentBases {
    fs: u64,
    gs: u64,
}

impl SegmentBases {
    /// Reads the live bases.
    pub fn save() -> SegmentBases {
        SegmentBases { fs: cpu::rdmsr(msr::FS_BASE), gs: cpu::rdmsr(msr::GS_BASE) }
    }

    /// Loads the bases.
    pub fn restore(self) {
        // SAFETY: the values were read from these MSRs while the process ran
        // (so they are canonical) or are zero; the kernel itself does not
        // use FS or GS (no TLS, no `swapgs`).
        unsafe {
            cpu::wrmsr(msr::FS_BASE, self.fs);
            cpu::wrmsr(msr::GS_BASE, self.gs);
        }
    }
}

/// A scratch `fxsave64` image (16-byte aligned, as the instruction requires).
#[repr(C, align(16))]
struct FxImage([u8; FXSAVE_SIZE]);

/// The address of the x87 instruction that left the live x87 exception
/// pending (for a #MF: the trap frame's RIP is the later instruction that
/// found it).
pub fn pending_x87_instruction() -> u64 {
    let mut image = FxImage([0; FXSAVE_SIZE]);
    // SAFETY: a writable, 16-byte aligned 512-byte buffer; fxsave64 writes
    // exactly that, changes no register and raises no x87 exception.
    unsafe { asm!("fxsave64 [{}]", in(reg) image.0.as_mut_ptr(), options(nostack, preserves_flags)) };
    fxsave_x87_instruction_pointer(&image.0)
}
