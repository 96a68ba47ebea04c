//! The part of a process's CPU state that the trap frame does not hold: the
//! x87/MMX/SSE registers (with MXCSR and the x87 control and status words)
//! and the data-segment selectors DS, ES, FS and GS.
//!
//! Ring 3 can change all of it without a system call, so it is saved when a
//! process stops running and restored before another one runs: nothing one
//! process writes there is ever visible to another, and an x87 exception
//! left pending by one process is delivered to that process only (the
//! status word travels with its state). `XCR0` enables only x87 and SSE
//! ([`superos_protocol::cpu::XCR0_USER`]), so the 512-byte `fxsave` image is
//! all of it; the kernel itself never uses these registers (it is built
//! soft-float), it only moves them with `fxsave64`/`fxrstor64`, which the
//! PVM host's instruction emulator supports in ring 0.

use core::arch::asm;
use superos_protocol::cpu::{fxsave_x87_instruction_pointer, initial_fxsave_image, FXSAVE_SIZE};

/// An `fxsave64` image (16-byte aligned, as the instruction requires).
#[derive(Clone, Copy)]
#[repr(C, align(16))]
pub struct FpuState([u8; FXSAVE_SIZE]);

impl FpuState {
    /// The state every process starts with
    /// ([`superos_protocol::cpu::initial_fxsave_image`]).
    pub const fn initial() -> FpuState {
        FpuState(initial_fxsave_image())
    }

    /// Saves the live x87/SSE state into `self`.
    pub fn save(&mut self) {
        // SAFETY: `self` is a writable, 16-byte aligned 512-byte buffer;
        // fxsave64 writes exactly that and changes no register.
        unsafe { asm!("fxsave64 [{}]", in(reg) self.0.as_mut_ptr(), options(nostack, preserves_flags)) };
    }

    /// Makes `self` the live x87/SSE state.
    pub fn restore(&self) {
        // SAFETY: the image is 16-byte aligned and came from `initial` or
        // `save` (kernel memory no process can write), so its MXCSR has no
        // reserved bit set and fxrstor64 cannot fault. It only loads FPU/SSE
        // registers, which the kernel does not use.
        unsafe { asm!("fxrstor64 [{}]", in(reg) self.0.as_ptr(), options(nostack, preserves_flags)) };
    }

    /// The x87 instruction pointer in the image: for a pending #MF, the
    /// x87 instruction that raised the exception.
    pub fn x87_instruction_pointer(&self) -> u64 {
        fxsave_x87_instruction_pointer(&self.0)
    }
}

impl Default for FpuState {
    fn default() -> Self {
        FpuState::initial()
    }
}

/// The data-segment selectors ring 3 can load (with `mov`/`pop` to DS, ES,
/// FS and GS), as they were when the process last stopped running.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataSegments {
    ds: u16,
    es: u16,
    fs: u16,
    gs: u16,
}

impl DataSegments {
    /// Reads the live selectors.
    pub fn save() -> DataSegments {
        let (ds, es, fs, gs): (u16, u16, u16, u16);
        // SAFETY: reading segment registers has no side effects.
        unsafe {
            asm!(
                "mov {0:x}, ds", "mov {1:x}, es", "mov {2:x}, fs", "mov {3:x}, gs",
                out(reg) ds, out(reg) es, out(reg) fs, out(reg) gs,
                options(nomem, nostack, preserves_flags)
            )
        };
        DataSegments { ds, es, fs, gs }
    }

    /// Loads the selectors. Ring 0 may load every selector ring 3 could:
    /// null, or the DPL-3 user data and (readable) code segments.
    pub fn restore(self) {
        // SAFETY: the values were read from the CPU while the process ran (or
        // are the null selectors of a fresh process); every selector ring 3
        // can hold is loadable in ring 0, and the kernel does not use DS, ES,
        // FS or GS (no TLS; the bases of the GDT's descriptors are zero).
        unsafe {
            asm!(
                "mov ds, {0:x}", "mov es, {1:x}", "mov fs, {2:x}", "mov gs, {3:x}",
                in(reg) self.ds, in(reg) self.es, in(reg) self.fs, in(reg) self.gs,
                options(nostack, preserves_flags)
            )
        };
    }
}

/// Everything in this module for one process.
#[derive(Clone, Copy, Default)]
pub struct UserCpuState {
    /// x87/MMX/SSE registers.
    pub fpu: FpuState,
    /// DS, ES, FS, GS.
    pub segments: DataSegments,
}

impl UserCpuState {
    /// Saves the live state (the process is stopping).
    pub fn save(&mut self) {
        self.fpu.save();
        self.segments = DataSegments::save();
    }

    /// Makes this state live (the process is about to run).
    pub fn restore(&self) {
        self.fpu.restore();
        self.segments.restore();
    }
}
