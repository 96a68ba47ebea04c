//! Kernel -> VMM calls ("hypercalls").
//!
//! A hypercall is a 32-bit `out` to one of the ports in [`Hypercall`] (the
//! discriminants *are* the port numbers). For calls with parameters, the value
//! written is the guest-physical address of a `#[repr(C)]` parameter block below
//! 4 GiB; for the others it is the argument itself. The VMM copies the block out of
//! guest memory, validates every field, and writes back only the documented
//! host-written fields (`status`). The guest sets `status` to [`STATUS_PENDING`]
//! before the call: if the block address itself is invalid the VMM cannot answer,
//! the field stays pending, and the guest treats that as an error.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The hypercall ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Hypercall {
    /// The kernel has started: value = GPA of [`BootHelloParams`].
    BootHello = 0x500,
    /// Write bytes to the console: value = GPA of [`ConsoleWriteParams`].
    ConsoleWrite = 0x501,
    /// A boot phase was reached: value = a [`BootPhase`].
    Phase = 0x502,
    /// New records are in the event ring: value ignored.
    EventNotify = 0x503,
    /// The kernel panicked: value = GPA of [`PanicParams`]. Does not return.
    Panic = 0x504,
    /// The kernel is done: value = the guest's exit status. Does not return.
    Shutdown = 0x505,
    /// Zero a batch of freed frames: value = GPA of [`ScrubFramesParams`].
    ScrubFrames = 0x506,
    /// Start an application processor in long mode: value = GPA of
    /// [`CpuStartParams`]. Each AP may be started once.
    CpuStart = 0x507,
    /// A process trapped on a breakpoint or a completed single step (an
    /// `int3` in ring 3 outside the gate, or a debug exception from ring 3):
    /// value = GPA of [`DebugTrapParams`]. The VMM answers in the block:
    /// with a debugger attached that asked for the trap, once the debugger
    /// resumes the guest; otherwise at once, with [`DEBUG_ACTION_KILL`].
    DebugTrap = 0x508,
    /// New records are in the trace ring (`run --trace`, see
    /// [`crate::trace`]): value = GPA of the ring's header. The first call
    /// announces the ring; later ones must name the same one. The last
    /// record before each call is a [`crate::trace::TraceKind::Clock`]: the
    /// VMM pairs its TSC with its own clock.
    TraceNotify = 0x509,
}

impl Hypercall {
    /// Maps an I/O port to a hypercall; `None` for ports that are not hypercalls.
    pub fn from_port(port: u16) -> Option<Self> {
        Some(match port {
            0x500 => Self::BootHello,
            0x501 => Self::ConsoleWrite,
            0x502 => Self::Phase,
            0x503 => Self::EventNotify,
            0x504 => Self::Panic,
            0x505 => Self::Shutdown,
            0x506 => Self::ScrubFrames,
            0x507 => Self::CpuStart,
            0x508 => Self::DebugTrap,
            0x509 => Self::TraceNotify,
            _ => return None,
        })
    }

    /// The I/O port of this hypercall.
    pub const fn port(self) -> u16 {
        self as u16
    }

    /// A short name for logs and statistics.
    pub const fn name(self) -> &'static str {
        match self {
            Self::BootHello => "boot-hello",
            Self::ConsoleWrite => "console-write",
            Self::Phase => "phase",
            Self::EventNotify => "event-notify",
            Self::Panic => "panic",
            Self::Shutdown => "shutdown",
            Self::ScrubFrames => "scrub-frames",
            Self::CpuStart => "cpu-start",
            Self::DebugTrap => "debug-trap",
            Self::TraceNotify => "trace-notify",
        }
    }
}

/// `status` value the guest writes before a call; still there afterwards means
/// the VMM could not even read the parameter block.
pub const STATUS_PENDING: u32 = u32::MAX;
/// The call succeeded.
pub const STATUS_OK: u32 = 0;
/// A guest address in the parameter block lies outside guest RAM.
pub const STATUS_BAD_ADDRESS: u32 = 1;
/// A length exceeds the documented maximum.
pub const STATUS_TOO_LARGE: u32 = 2;
/// The protocol version in the block is not the VMM's.
pub const STATUS_BAD_VERSION: u32 = 3;
/// Some other field is invalid.
pub const STATUS_BAD_ARGUMENT: u32 = 4;

/// Boot milestones reported with [`Hypercall::Phase`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum BootPhase {
    /// The kernel is about to execute the first user instruction of a scenario
    /// process (after the gate self-test).
    FirstUserInstruction = 1,
}

impl BootPhase {
    /// Decodes a raw phase number.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::FirstUserInstruction),
            _ => None,
        }
    }
}

/// Parameters of [`Hypercall::BootHello`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct BootHelloParams {
    /// The kernel's [`crate::PROTOCOL_VERSION`].
    pub version: u32,
    /// Host-written status (`STATUS_*`).
    pub status: u32,
    /// GPA of the kernel's event ring ([`crate::event::EventRingHeader`]).
    pub event_ring_gpa: u64,
    /// Size of the event ring in bytes, header included.
    pub event_ring_bytes: u64,
    /// GPA of the kernel's text section.
    pub kernel_text_gpa: u64,
    /// Length of the kernel's text section in bytes.
    pub kernel_text_len: u64,
    /// GPA of the kernel's [`crate::introspect::IntrospectionRoot`].
    pub introspection_root_gpa: u64,
}

/// Most bytes one [`Hypercall::ConsoleWrite`] may carry.
pub const CONSOLE_WRITE_MAX: u64 = 4096;

/// Parameters of [`Hypercall::ConsoleWrite`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ConsoleWriteParams {
    /// Who wrote it: 0 for the kernel, otherwise the writing process's pid.
    pub source_pid: u32,
    /// Host-written status (`STATUS_*`).
    pub status: u32,
    /// GPA of the bytes (contiguous in guest-physical memory).
    pub gpa: u64,
    /// Number of bytes, at most [`CONSOLE_WRITE_MAX`].
    pub len: u64,
}

/// Most message bytes one [`Hypercall::Panic`] may carry.
pub const PANIC_MESSAGE_MAX: u64 = 1024;
/// `PanicParams::vector` when the panic did not come from a CPU exception.
pub const PANIC_NO_VECTOR: u32 = u32::MAX;

/// Parameters of [`Hypercall::Panic`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct PanicParams {
    /// GPA of the UTF-8 panic message.
    pub msg_gpa: u64,
    /// Length of the message, at most [`PANIC_MESSAGE_MAX`].
    pub msg_len: u64,
    /// Exception vector if a ring-0 exception caused the panic, else
    /// [`PANIC_NO_VECTOR`].
    pub vector: u32,
    /// Host-written status (`STATUS_*`).
    pub status: u32,
    /// Error code pushed by the exception (0 if none).
    pub error_code: u64,
    /// RIP of the faulting instruction (0 if not from an exception).
    pub fault_rip: u64,
    /// CR2 at the time of the exception (page faults).
    pub fault_addr: u64,
}

/// Most frames one [`Hypercall::ScrubFrames`] may name.
pub const SCRUB_BATCH_MAX: u64 = 512;

/// Parameters of [`Hypercall::ScrubFrames`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ScrubFramesParams {
    /// GPA of an array of `count` frame addresses (u64, page-aligned).
    pub list_gpa: u64,
    /// Number of frames, at most [`SCRUB_BATCH_MAX`].
    pub count: u32,
    /// Host-written status (`STATUS_*`); on error no frame was touched.
    pub status: u32,
}

/// Parameters of [`Hypercall::CpuStart`]: the VMM puts the AP in long mode
/// (the boot GDT's flat segments, paging on with `pml4`, interrupts off) at
/// `rip` with `rsp` and `rdi = cpu`. It refuses (`STATUS_BAD_ARGUMENT`) a
/// CPU that is the bootstrap one, beyond the VM's count or already started,
/// a `rip` outside the kernel text, an `rsp` outside the kernel half, and a
/// `pml4` that is not a page of guest RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CpuStartParams {
    /// The CPU (vCPU index, 1 ..= `BootInfo::cpu_count - 1`).
    pub cpu: u32,
    /// Host-written status (`STATUS_*`).
    pub status: u32,
    /// Where it starts.
    pub rip: u64,
    /// Its stack pointer.
    pub rsp: u64,
    /// Its CR3.
    pub pml4: u64,
}

const _: () = {
    assert!(core::mem::size_of::<CpuStartParams>() == 32);
    assert!(core::mem::size_of::<ScrubFramesParams>() == 16);
    assert!(core::mem::size_of::<BootHelloParams>() == 48);
    assert!(core::mem::size_of::<ConsoleWriteParams>() == 24);
    assert!(core::mem::size_of::<PanicParams>() == 48);
};

/// [`DebugTrapParams::action`]: the trap is the process's own fault (no
/// debugger asked for it): the kernel terminates the process as it would
/// without the call.
pub const DEBUG_ACTION_KILL: u32 = 0;
/// [`DebugTrapParams::action`]: resume the process at
/// [`DebugTrapParams::resume_rip`] with the trap flag clear.
pub const DEBUG_ACTION_CONTINUE: u32 = 1;
/// [`DebugTrapParams::action`]: resume the process at
/// [`DebugTrapParams::resume_rip`] with the trap flag set, so that it traps
/// again after one instruction (or when its next system call returns).
pub const DEBUG_ACTION_STEP: u32 = 2;
/// Or'ed into [`DebugTrapParams::action`] (with a continue or a step): the
/// debugger changed registers; the kernel resumes with the general
/// registers of [`DebugTrapParams::registers`] as the VMM rewrote them,
/// and of its RFLAGS only the bits a `popf` of the trapped code could
/// change ([`DEBUG_WRITABLE_RFLAGS`]); the segments stay the kernel's.
pub const DEBUG_ACTION_REGISTERS: u32 = 1 << 8;
/// The RFLAGS bits a debugger may change: the status flags CF, PF, AF,
/// ZF, SF, OF and DF. Never TF (the action's), IF, IOPL, NT, RF, AC, VM or
/// the virtual-interrupt bits.
pub const DEBUG_WRITABLE_RFLAGS: u64 = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x400 | 0x800;

/// Parameters of [`Hypercall::DebugTrap`]. The kernel fills every field but
/// `status`, `action` and `resume_rip`, which the VMM writes (it sets
/// `action` to [`DEBUG_ACTION_KILL`] and `status` to [`STATUS_OK`] for a
/// trap no debugger asked for). The kernel honours a continue or a step
/// only with `status` OK and a `resume_rip` in the user half; anything
/// else terminates the process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DebugTrapParams {
    /// The trapping process.
    pub pid: u32,
    /// Host-written status (`STATUS_*`).
    pub status: u32,
    /// The CPU it trapped on.
    pub cpu: u32,
    /// Host-written: what the kernel does next (`DEBUG_ACTION_*`, with
    /// [`DEBUG_ACTION_REGISTERS`] if `registers` were rewritten).
    pub action: u32,
    /// Host-written: where the process resumes (the kernel writes the
    /// trapping RIP here first).
    pub resume_rip: u64,
    /// The registers it trapped with: `vector` 3 (`int3`, `rip` after it)
    /// or 1 (a debug exception, `rip` at the next instruction); rewritten
    /// by the VMM with [`DEBUG_ACTION_REGISTERS`].
    pub registers: crate::introspect::UserContext,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_round_trip() {
        for call in [
            Hypercall::BootHello,
            Hypercall::ConsoleWrite,
            Hypercall::Phase,
            Hypercall::EventNotify,
            Hypercall::Panic,
            Hypercall::Shutdown,
            Hypercall::ScrubFrames,
            Hypercall::CpuStart,
            Hypercall::DebugTrap,
            Hypercall::TraceNotify,
        ] {
            assert_eq!(Hypercall::from_port(call.port()), Some(call));
        }
        assert_eq!(Hypercall::from_port(0x3f8), None);
        assert_eq!(Hypercall::from_port(0x50a), None);
    }

    #[test]
    fn parameter_layouts_are_stable() {
        use core::mem::offset_of;
        assert_eq!(offset_of!(ConsoleWriteParams, status), 4);
        assert_eq!(offset_of!(ConsoleWriteParams, gpa), 8);
        assert_eq!(offset_of!(PanicParams, status), 20);
        assert_eq!(offset_of!(BootHelloParams, event_ring_gpa), 8);
        assert_eq!(offset_of!(DebugTrapParams, status), 4);
        assert_eq!(offset_of!(DebugTrapParams, action), 12);
        assert_eq!(offset_of!(DebugTrapParams, resume_rip), 16);
        assert_eq!(offset_of!(DebugTrapParams, registers), 24);
    }
}
