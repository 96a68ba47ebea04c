//! Everything that touches the CPU: entry code, trap stubs, descriptor tables,
//! the local APIC, control registers and port I/O. All of the kernel's
//! `unsafe` code lives in this module and in the direct-map accessors of
//! [`crate::kernel`]; each block says which contract it relies on.

pub mod cpu;
pub mod entry;
pub mod lapic;
pub mod tables;
pub mod user_state;

use core::cell::UnsafeCell;

/// Global kernel state that needs interior mutability.
///
/// The kernel runs on one CPU, and ring 0 always runs with interrupts disabled
/// (every IDT gate is an interrupt gate and `syscall` masks IF), so kernel code
/// is never re-entered while it holds a reference obtained here: the only
/// entries into the kernel are traps from ring 3, which start on an empty
/// kernel stack. A ring-0 exception does not return; it reports a panic.
pub struct KernelCell<T>(UnsafeCell<T>);

// SAFETY: see the type documentation: a single CPU, no preemption in ring 0,
// so no two contexts ever access the cell concurrently.
unsafe impl<T> Sync for KernelCell<T> {}

impl<T> KernelCell<T> {
    /// Wraps a value.
    pub const fn new(value: T) -> Self {
        Self(UnsafeCell::new(value))
    }

    /// Returns the value.
    ///
    /// # Safety
    /// The caller must not hold another reference obtained from this cell
    /// while using the returned one (see the type documentation for why this
    /// holds across traps).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get(&self) -> &mut T {
        // SAFETY: exclusivity is the caller's obligation, documented above.
        unsafe { &mut *self.0.get() }
    }

    /// Raw pointer to the value (for taking addresses without a reference).
    pub const fn as_ptr(&self) -> *mut T {
        self.0.get()
    }
}

/// The register state saved on every entry from ring 3, in the order the trap
/// stubs push it. The same layout is used to resume a process: `iretq` reads
/// `rip`..`ss`.
#[derive(Clone, Copy, Debug, Default, zerocopy::IntoBytes, zerocopy::FromBytes, zerocopy::Immutable)]
#[repr(C)]
#[allow(missing_docs)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    /// Vector number, or [`SYSCALL_VECTOR`] for the `syscall` instruction.
    pub vector: u64,
    /// Exception error code (0 where the CPU pushes none).
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

// The frame is published as `superos_protocol::introspect::UserContext` (the
// VMM reads a process's registers from it): the same layout, field by field.
const _: () = {
    use core::mem::{offset_of, size_of};
    use superos_protocol::introspect::UserContext;
    assert!(size_of::<TrapFrame>() == size_of::<UserContext>());
    assert!(offset_of!(TrapFrame, r15) == offset_of!(UserContext, r15));
    assert!(offset_of!(TrapFrame, r8) == offset_of!(UserContext, r8));
    assert!(offset_of!(TrapFrame, rax) == offset_of!(UserContext, rax));
    assert!(offset_of!(TrapFrame, vector) == offset_of!(UserContext, vector));
    assert!(offset_of!(TrapFrame, error_code) == offset_of!(UserContext, error_code));
    assert!(offset_of!(TrapFrame, rip) == offset_of!(UserContext, rip));
    assert!(offset_of!(TrapFrame, cs) == offset_of!(UserContext, cs));
    assert!(offset_of!(TrapFrame, rflags) == offset_of!(UserContext, rflags));
    assert!(offset_of!(TrapFrame, rsp) == offset_of!(UserContext, rsp));
    assert!(offset_of!(TrapFrame, ss) == offset_of!(UserContext, ss));
};

/// Pseudo-vector the `syscall` entry stub records in [`TrapFrame::vector`].
pub const SYSCALL_VECTOR: u64 = superos_protocol::cpu::entry_vector::SYSCALL;
/// Pseudo-vector of the `CSTAR`/`SYSENTER` stub: never a legitimate entry.
pub const FOREIGN_ENTRY_VECTOR: u64 = superos_protocol::cpu::entry_vector::FOREIGN;
/// Vector of the LAPIC timer interrupt.
pub const TIMER_VECTOR: u8 = 0x20;
/// Vector of the LAPIC spurious interrupt.
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// Vector of the TLB-flush IPI (TLB shootdown, `kernel::smp`).
pub const FLUSH_VECTOR: u8 = 0x30;
/// Vector of the wake-up IPI (an idle CPU looks for work).
pub const WAKE_VECTOR: u8 = 0x31;

impl TrapFrame {
    /// Every register zero (statics start from it).
    pub const ZERO: TrapFrame = TrapFrame {
        r15: 0,
        r14: 0,
        r13: 0,
        r12: 0,
        r11: 0,
        r10: 0,
        r9: 0,
        r8: 0,
        rbp: 0,
        rdi: 0,
        rsi: 0,
        rdx: 0,
        rcx: 0,
        rbx: 0,
        rax: 0,
        vector: 0,
        error_code: 0,
        rip: 0,
        cs: 0,
        rflags: 0,
        rsp: 0,
        ss: 0,
    };

    /// True if the trap came from ring 3.
    #[inline(always)]
    pub fn from_user(&self) -> bool {
        self.cs & 3 == 3
    }

    /// Takes the registers a debugger rewrote (`registers`): every general
    /// register, and of RFLAGS only the bits it may change
    /// ([`superos_protocol::hypercall::DEBUG_WRITABLE_RFLAGS`]); the
    /// segments, the vector and the RIP (the answer's) stay this frame's.
    #[inline(always)]
    pub fn apply_debugger_registers(&mut self, registers: &superos_protocol::introspect::UserContext) {
        use superos_protocol::hypercall::DEBUG_WRITABLE_RFLAGS;
        let (vector, error_code, rip, cs, ss, rflags) =
            (self.vector, self.error_code, self.rip, self.cs, self.ss, self.rflags);
        *self = zerocopy::transmute!(*registers);
        self.vector = vector;
        self.error_code = error_code;
        self.rip = rip;
        self.cs = cs;
        self.ss = ss;
        self.rflags = (rflags & !DEBUG_WRITABLE_RFLAGS) | (registers.rflags & DEBUG_WRITABLE_RFLAGS);
    }

    /// The frame as the protocol publishes it (the same layout, asserted above).
    #[inline(always)]
    pub fn user_context(&self) -> superos_protocol::introspect::UserContext {
        zerocopy::transmute!(*self)
    }

    /// A fresh ring-3 context starting at `rip` with stack `rsp`.
    pub fn new_user(rip: u64, rsp: u64, interrupts: bool) -> Self {
        TrapFrame {
            rip,
            rsp,
            cs: u64::from(tables::USER_CODE_SELECTOR),
            ss: u64::from(tables::USER_DATA_SELECTOR),
            // Bit 1 is reserved-one; IF lets the timer preempt the process.
            rflags: if interrupts { 0x202 } else { 0x2 },
            ..Default::default()
        }
    }
}
