//! System calls answered without the big kernel lock: `getpid`.
//!
//! Every other entry takes the lock, does its work and, at its end, leaves
//! here what a lock-free answer needs, in per-CPU atomics only the CPU
//! itself writes (under the lock, just before it releases it and resumes
//! ring 3): the pid of the process it is about to resume, or 0 when it
//! resumes anything else (the idle context, a switch stub, the gate
//! self-test). A gate entry with `rax` = `getpid` from ring 3 on a CPU
//! whose slot holds a pid is then answered from the slot and returned from
//! at once: it reads no kernel data, so it needs no lock, and nothing it
//! skips (reaping, scrubbing, republishing the tables, waking idle CPUs)
//! is due because of it: each of those is work a *locked* entry left, and
//! that entry did it before it released the lock. The slot is only
//! nonzero while the CPU runs that process: a switch, a kill or an exit of
//! it happens in a locked entry, whose end rewrites the slot before ring 3
//! runs again (another CPU never changes this CPU's current process).

use crate::arch::TrapFrame;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use superos_protocol::cpu::MAX_CPUS;
use superos_protocol::syscall::Syscall;

/// The gate's vector once processes run (an impossible one until then).
static GATE_VECTOR: AtomicU64 = AtomicU64::new(u64::MAX);
/// The gate's return RIP once processes run.
static GATE_RETURN: AtomicU64 = AtomicU64::new(0);
/// Per CPU: the pid of the process it resumes in ring 3, or 0.
static RESUMED_PID: [AtomicU32; MAX_CPUS as usize] = [const { AtomicU32::new(0) }; MAX_CPUS as usize];

/// The gate the kernel runs processes with (once, when the self-test chose
/// it, before any application processor starts).
pub fn set_gate(vector: u64, return_rip: u64) {
    GATE_RETURN.store(return_rip, Ordering::Release);
    GATE_VECTOR.store(vector, Ordering::Release);
}

/// At the end of a locked entry on `cpu`: the pid of the process it now
/// resumes in ring 3, or `None` (the idle context, a switch stub).
pub fn set_resumed(cpu: u32, pid: Option<u32>) {
    if let Some(slot) = RESUMED_PID.get(cpu as usize) {
        slot.store(pid.unwrap_or(0), Ordering::Relaxed);
    }
}

/// Answers `frame` without the lock if it is a `getpid` through the gate
/// on a CPU that resumes a known process; true if it did (the frame then
/// holds the result). The gate's return RIP is in the user-only gate page
/// (SMEP: ring 0 never runs there), so the entry came from ring 3.
#[inline(always)]
pub fn answer(frame: &mut TrapFrame) -> bool {
    if frame.vector != GATE_VECTOR.load(Ordering::Acquire)
        || frame.rax != Syscall::GetPid as u64
        || frame.rip != GATE_RETURN.load(Ordering::Acquire)
    {
        return false;
    }
    let cpu = super::smp::cpu_of_stack(frame as *const TrapFrame as u64);
    let pid = RESUMED_PID.get(cpu as usize).map_or(0, |slot| slot.load(Ordering::Relaxed));
    if pid == 0 {
        return false;
    }
    frame.rax = u64::from(pid);
    true
}
