//! The trace ring: what the kernel records for `superos-vmm run --trace`
//! without a VM exit each, stamped with the TSC.
//!
//! Only when [`crate::boot::BootInfo::trace`] asks for it, the kernel
//! appends a [`TraceRecord`] when a CPU starts running another process (or
//! goes idle) and when a process enters a system call and returns from it.
//! The ring has the event ring's header ([`crate::event::EventRingHeader`],
//! magic [`TRACE_RING_MAGIC`], its own record size) and the same rules:
//! `head` kernel-written, `tail` VMM-written, a full ring drops the new
//! record and counts it in `lost`. The kernel drains it with
//! [`crate::hypercall::Hypercall::TraceNotify`] when it is half full and
//! before it stops; the last record before each such call is a
//! [`TraceKind::Clock`], which the VMM pairs with its own clock to place
//! every TSC on its timeline.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `EventRingHeader::magic` of the trace ring: "TRCE".
pub const TRACE_RING_MAGIC: u32 = u32::from_le_bytes(*b"TRCE");

/// Most records a trace ring may have (the VMM refuses a larger one).
pub const TRACE_RING_MAX_CAPACITY: u32 = 1 << 16;

/// One trace record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct TraceRecord {
    /// The CPU's time stamp counter when it happened.
    pub tsc: u64,
    /// [`TraceKind`] as a raw value.
    pub kind: u16,
    /// The CPU.
    pub cpu: u16,
    /// The process (0: none).
    pub pid: u32,
    /// First argument (see [`TraceKind`]).
    pub a: u64,
    /// Second argument.
    pub b: u64,
}

const _: () = assert!(core::mem::size_of::<TraceRecord>() == 32);

/// What a [`TraceRecord`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum TraceKind {
    /// The TSC just before a [`crate::hypercall::Hypercall::TraceNotify`].
    Clock = 1,
    /// The CPU runs process `pid` in ring 3 from now on (its context, or
    /// the switch stub that restores it).
    Run = 2,
    /// The CPU runs no process from now on (it idles).
    Idle = 3,
    /// Process `pid` entered system call `a` with first argument `b`.
    SyscallEnter = 4,
    /// Process `pid` returns from system call `a` with result `b` (the raw
    /// `rax`: see [`crate::syscall::decode_result`]).
    SyscallReturn = 5,
    /// The kernel logged event number `a` (its `seq` in the event ring).
    Event = 6,
}

impl TraceKind {
    /// Decodes a raw kind.
    pub fn from_raw(raw: u16) -> Option<Self> {
        Some(match raw {
            1 => Self::Clock,
            2 => Self::Run,
            3 => Self::Idle,
            4 => Self::SyscallEnter,
            5 => Self::SyscallReturn,
            6 => Self::Event,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip() {
        for kind in [
            TraceKind::Clock,
            TraceKind::Run,
            TraceKind::Idle,
            TraceKind::SyscallEnter,
            TraceKind::SyscallReturn,
            TraceKind::Event,
        ] {
            assert_eq!(TraceKind::from_raw(kind as u16), Some(kind));
        }
        assert_eq!(TraceKind::from_raw(0), None);
        assert_eq!(TraceKind::from_raw(7), None);
    }
}
