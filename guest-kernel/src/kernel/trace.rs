//! `superos-vmm run --trace`: which process runs on which CPU, and every
//! system call from entry to return, as TSC-stamped records in the trace
//! ring ([`superos_protocol::trace`]) that the VMM drains when it is half
//! full: no VM exit per record.
//!
//! Off unless the boot info asks ([`BootInfo::trace`]); an untraced kernel
//! pays one test of [`on`] at each end of a locked kernel entry. A traced
//! one answers `getpid` under the lock too ([`super::fast`] stays off), so
//! that every system call is in the trace. All records are written by the
//! CPU holding the big kernel lock, so the ring has one writer at a time.
//!
//! [`BootInfo::trace`]: superos_protocol::boot::BootInfo::trace

use super::host::{hypercall, ring_tail};
use super::memory::image_gpa;
use super::process::Process;
use super::{Kernel, Phase, TrapFrame};
use crate::arch::KernelCell;
use crate::ring::Ring;
use core::sync::atomic::{AtomicBool, Ordering};
use superos_protocol::cpu::MAX_CPUS;
use superos_protocol::hypercall::Hypercall;
use superos_protocol::trace::{TraceKind, TraceRecord, TRACE_RING_MAGIC};
use superos_protocol::PROTOCOL_VERSION;

/// Record slots: the ring is 32 pages (128 KiB), in the kernel's bss.
const TRACE_RING_CAPACITY: usize = 4094;
/// Undrained records at which the kernel has the VMM drain the ring.
const DRAIN_AT: u64 = TRACE_RING_CAPACITY as u64 / 2;

type TraceRing = Ring<TraceRecord, TRACE_RING_CAPACITY>;

static TRACE_RING: KernelCell<TraceRing> = KernelCell::new(Ring::new(
    TRACE_RING_MAGIC,
    PROTOCOL_VERSION,
    TraceRecord { tsc: 0, kind: 0, cpu: 0, pid: 0, a: 0, b: 0 },
));

/// Whether this run is traced (set once, at boot, before processes run).
static ON: AtomicBool = AtomicBool::new(false);

/// Per CPU: the pid whose process it last ran (0: idle, `u32::MAX`: none
/// recorded yet). Written under the big kernel lock only.
static RUNNING: KernelCell<[u32; MAX_CPUS as usize]> = KernelCell::new([u32::MAX; MAX_CPUS as usize]);

/// Whether this run is traced.
#[inline(always)]
pub fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Starts tracing (at boot, on the bootstrap CPU): announces the ring to
/// the VMM with its first clock record.
pub fn start() {
    ON.store(true, Ordering::Relaxed);
    drain();
}

fn record(kind: TraceKind, cpu: u32, pid: u32, a: u64, b: u64) {
    // SAFETY: rdtsc has no side effects.
    let tsc = unsafe { core::arch::x86_64::_rdtsc() };
    // SAFETY: KernelCell invariant: the caller holds the big kernel lock
    // (or is the bootstrap CPU at boot), the ring's only writer.
    let ring = unsafe { TRACE_RING.get() };
    let tail = ring_tail(&ring.header);
    ring.push(tail, |_| TraceRecord { tsc, kind: kind as u16, cpu: cpu as u16, pid, a, b });
}

/// Event `seq` was appended to the event ring by `cpu`: its time, so that
/// the VMM places the event on the same clock as the calls around it.
pub fn event(seq: u64, cpu: u32) {
    record(TraceKind::Event, cpu, 0, seq, 0);
}

/// Has the VMM drain the ring: a clock record, then the hypercall.
pub fn drain() {
    record(TraceKind::Clock, 0, 0, 0, 0);
    core::sync::atomic::compiler_fence(Ordering::SeqCst);
    hypercall(Hypercall::TraceNotify, image_gpa(TRACE_RING.as_ptr()) as u32);
}

fn undrained() -> u64 {
    // SAFETY: KernelCell invariant (the caller holds the big kernel lock).
    let ring = unsafe { TRACE_RING.get() };
    ring.undrained(ring_tail(&ring.header))
}

impl Kernel {
    /// At the start of a locked entry on this CPU: a system call through
    /// the gate from a process.
    pub(super) fn trace_entry(&mut self, frame: &TrapFrame) {
        if !matches!(self.phase, Phase::Running) || !self.is_gate_entry(frame) {
            return;
        }
        let cpu = self.cpu;
        if let Some(process) = self.current().and_then(|index| self.processes.get_mut(index)) {
            process.traced_syscall = Some(frame.rax);
            record(TraceKind::SyscallEnter, cpu, process.pid, frame.rax, frame.rdi);
        }
    }

    /// At the end of a locked entry, with `frame` what this CPU resumes:
    /// what it runs from now on if that changed, and the return of the
    /// system call of the process it resumes, if it was in one; then the
    /// drain, if the ring is half full.
    pub(super) fn trace_resume(&mut self, frame: &TrapFrame) {
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        let cpu = self.cpu;
        let process = if frame.from_user() { self.current() } else { None };
        let pid = process.and_then(|index| self.processes.get(index)).map_or(0, |p| p.pid);
        // SAFETY: KernelCell invariant (the caller holds the big kernel lock).
        let running = unsafe { &mut RUNNING.get()[cpu as usize] };
        if *running != pid {
            *running = pid;
            let kind = if pid == 0 { TraceKind::Idle } else { TraceKind::Run };
            record(kind, cpu, pid, 0, 0);
        }
        if self.resumed_pid(frame).is_some() {
            if let Some(Process { pid, traced_syscall, .. }) = process.and_then(|i| self.processes.get_mut(i))
            {
                if let Some(number) = traced_syscall.take() {
                    record(TraceKind::SyscallReturn, cpu, *pid, number, frame.rax);
                }
            }
        }
        if undrained() >= DRAIN_AT {
            drain();
        }
    }
}
