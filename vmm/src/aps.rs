//! The application processors (vCPUs 1 and up): the kernel's requests to
//! start them ([`CpuStarts`], validated like every hypercall), one thread
//! each ([`Aps::run_ap`]), and the pause that gives the VMM a consistent
//! point: while the bootstrap vCPU's thread handles an exit (a check, a
//! control-socket query, the end of the run), every AP is out of `KVM_RUN`
//! and parked ([`Aps::pause`]), so the VMM reads all of guest memory and
//! every vCPU's registers with no guest instruction running.
//!
//! An AP's hypercalls and writes into the read-only kernel image are
//! forwarded ([`Forward`]): its thread hands them to the bootstrap thread,
//! which owns the session, and waits until they are handled (the
//! bootstrap thread handles them with every AP paused, as its own exits);
//! any other exit of an AP stops the guest and names the vCPU.

use crate::arch::regs;
use crate::hypercall::{self, Request};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use superos_protocol::hypercall::CpuStartParams;
use superos_protocol::layout::{KERNEL_HALF_START, PAGE_SIZE};

/// A start the VMM accepted: where AP `cpu` begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApStart {
    /// The CPU (vCPU index).
    pub cpu: u32,
    /// Its first instruction.
    pub rip: u64,
    /// Its stack pointer.
    pub rsp: u64,
    /// Its CR3.
    pub pml4: u64,
}

/// The kernel's AP start requests: what the VMM accepts (each AP once, at
/// an address in the kernel text, on a kernel-half stack, with a page
/// table inside guest RAM) and the starts not yet handed to their threads.
#[derive(Clone, Debug, Default)]
pub struct CpuStarts {
    cpus: u32,
    started: u32,
    text: Option<(u64, u64)>,
    ram_size: u64,
    pending: Vec<ApStart>,
}

impl CpuStarts {
    /// For a VM of `cpus` vCPUs whose kernel text is `text` (virtual
    /// `[start, end)`, from the kernel ELF) in `ram_size` bytes of RAM.
    pub fn new(cpus: u32, text: Option<(u64, u64)>, ram_size: u64) -> CpuStarts {
        CpuStarts { cpus, started: 1, text, ram_size, pending: Vec::new() }
    }

    /// vCPUs the VM has.
    pub fn cpus(&self) -> u32 {
        self.cpus.max(1)
    }

    /// Accepts `params` (queued for [`CpuStarts::take_pending`]) or says
    /// why not.
    pub fn accept(&mut self, params: &CpuStartParams) -> Result<ApStart, String> {
        let cpu = params.cpu;
        if cpu == 0 {
            return Err("CPU 0 is the bootstrap CPU, already running".into());
        }
        if cpu >= self.cpus() {
            return Err(format!("CPU {cpu}: the VM has {} vCPUs", self.cpus()));
        }
        if self.started & (1 << cpu) != 0 {
            return Err(format!("CPU {cpu} was already started"));
        }
        match self.text {
            Some((start, end)) if (start..end).contains(&params.rip) => {}
            Some((start, end)) => {
                return Err(format!(
                    "CPU {cpu}: rip {:#x} is outside the kernel text [{start:#x}, {end:#x})",
                    params.rip
                ))
            }
            None => return Err("the kernel ELF has no text symbols: no AP entry can be checked".into()),
        }
        if params.rsp < KERNEL_HALF_START {
            return Err(format!("CPU {cpu}: rsp {:#x} is not in the kernel half", params.rsp));
        }
        if params.pml4 % PAGE_SIZE != 0 || params.pml4 >= self.ram_size {
            return Err(format!("CPU {cpu}: pml4 {:#x} is not a page of guest RAM", params.pml4));
        }
        self.started |= 1 << cpu;
        let start = ApStart { cpu, rip: params.rip, rsp: params.rsp, pml4: params.pml4 };
        self.pending.push(start);
        Ok(start)
    }

    /// The accepted starts not yet handed over.
    pub fn take_pending(&mut self) -> Vec<ApStart> {
        std::mem::take(&mut self.pending)
    }
}

/// An AP exit the bootstrap thread handles for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Forward {
    /// A hypercall.
    Hypercall(Request),
    /// A write into the read-only kernel image (KVM dropped it).
    ReadOnlyWrite {
        /// Where.
        gpa: u64,
        /// What.
        bytes: Vec<u8>,
        /// The AP's RIP after the exit.
        rip: Option<u64>,
    },
}

/// Why an AP stopped the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApStop {
    /// The CPU.
    pub cpu: u32,
    /// What happened.
    pub what: String,
}

#[derive(Default)]
struct Gate {
    /// The bootstrap thread wants every AP out of `KVM_RUN`.
    paused: bool,
    /// The run is over: AP threads return.
    stop: bool,
    /// APs inside (or about to enter) `KVM_RUN`.
    running: u32,
    /// Starts handed over, by AP index (CPU - 1).
    start: Vec<Option<ApStart>>,
    /// Each AP thread, once it runs.
    threads: Vec<Option<libc::pthread_t>>,
    /// The first AP that stopped the guest.
    stopped: Option<ApStop>,
    /// Exits handed to the bootstrap thread, not yet handled.
    forwarded: Vec<(u32, Forward)>,
    /// By AP index: its forwarded exit is not handled yet.
    waiting: Vec<bool>,
    /// By AP index: `KVM_RUN` calls a kick interrupted.
    interrupted: Vec<u64>,
    /// Pauses so far, their total time, and when the current one began.
    pauses: u64,
    paused_time: Duration,
    paused_since: Option<std::time::Instant>,
}

/// How often and how long the bootstrap thread held the APs out of
/// `KVM_RUN` (to handle an exit with the guest still, for a check, the
/// control socket or a tamper hook).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PauseStats {
    /// Pauses.
    pub pauses: u64,
    /// Their total time.
    pub time: Duration,
}

/// The APs' vCPUs and the threads that run them.
pub struct Aps {
    vcpus: Vec<Mutex<VcpuFd>>,
    gate: Mutex<Gate>,
    changed: Condvar,
    /// The bootstrap vCPU's thread, kicked when an AP stops the guest.
    bootstrap: Mutex<Option<libc::pthread_t>>,
}

/// How long the pause waits for an AP to leave `KVM_RUN` (and an AP for the
/// bootstrap thread to take its forwarded exit) before kicking again: a kick
/// that lands just before `KVM_RUN` is lost.
const KICK_AGAIN: Duration = Duration::from_millis(1);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking AP thread is reported when it is joined; its state here
    // stays usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn kick(thread: libc::pthread_t) {
    // SAFETY: `thread` is an AP thread (or the bootstrap one) that
    // registered itself and is joined only after `Aps::stop` returns, so
    // its pthread_t is valid.
    unsafe { libc::pthread_kill(thread, crate::run::kick_signal()) };
}

impl Aps {
    /// The APs of a VM (`vcpus[0]` is CPU 1).
    pub fn new(vcpus: Vec<VcpuFd>) -> Aps {
        let count = vcpus.len();
        Aps {
            vcpus: vcpus.into_iter().map(Mutex::new).collect(),
            gate: Mutex::new(Gate {
                start: vec![None; count],
                threads: vec![None; count],
                waiting: vec![false; count],
                interrupted: vec![0; count],
                ..Gate::default()
            }),
            changed: Condvar::new(),
            bootstrap: Mutex::new(None),
        }
    }

    /// Number of APs.
    pub fn len(&self) -> usize {
        self.vcpus.len()
    }

    /// True if the VM has only the bootstrap vCPU.
    pub fn is_empty(&self) -> bool {
        self.vcpus.is_empty()
    }

    /// Records the bootstrap vCPU's thread (kicked when an AP stops the guest).
    pub fn set_bootstrap_thread(&self, thread: libc::pthread_t) {
        *lock(&self.bootstrap) = Some(thread);
    }

    /// Hands accepted starts to their AP threads.
    pub fn start(&self, starts: Vec<ApStart>) {
        if starts.is_empty() {
            return;
        }
        let mut gate = lock(&self.gate);
        for start in starts {
            if let Some(slot) = gate.start.get_mut(start.cpu as usize - 1) {
                *slot = Some(start);
            }
        }
        self.changed.notify_all();
    }

    /// The first AP that stopped the guest, if one did.
    pub fn stopped(&self) -> Option<ApStop> {
        lock(&self.gate).stopped.clone()
    }

    /// The body of AP `cpu`'s thread: waits for its start, then runs it
    /// until the run ends, parking whenever the VMM pauses the APs.
    pub fn run_ap(&self, cpu: u32) {
        let index = cpu as usize - 1;
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        let start = {
            let mut gate = lock(&self.gate);
            gate.threads[index] = Some(thread);
            loop {
                if gate.stop {
                    return;
                }
                if let Some(start) = gate.start[index] {
                    break start;
                }
                gate = self.changed.wait(gate).unwrap_or_else(PoisonError::into_inner);
            }
        };
        if let Err(what) = self.enter_long_mode(index, start) {
            self.stop_guest(ApStop { cpu, what });
            return;
        }
        loop {
            {
                let mut gate = lock(&self.gate);
                while gate.paused && !gate.stop {
                    gate = self.changed.wait(gate).unwrap_or_else(PoisonError::into_inner);
                }
                if gate.stop {
                    return;
                }
                gate.running += 1;
            }
            let outcome = {
                let mut vcpu = lock(&self.vcpus[index]);
                match vcpu.run() {
                    Ok(exit) => Some(classify_exit(exit)),
                    Err(error) if error.errno() == libc::EINTR || error.errno() == libc::EAGAIN => None,
                    Err(error) => Some(Err(format!("KVM_RUN failed: {error}"))),
                }
            };
            {
                let mut gate = lock(&self.gate);
                gate.running -= 1;
                if outcome.is_none() {
                    gate.interrupted[index] += 1;
                }
                self.changed.notify_all();
            }
            match outcome {
                None => {}
                Some(Ok(forward)) => {
                    let forward = match forward {
                        Forward::ReadOnlyWrite { gpa, bytes, .. } => {
                            let rip = lock(&self.vcpus[index]).get_regs().ok().map(|regs| regs.rip);
                            Forward::ReadOnlyWrite { gpa, bytes, rip }
                        }
                        other => other,
                    };
                    if !self.forward(index, cpu, forward) {
                        return;
                    }
                }
                Some(Err(what)) => {
                    self.stop_guest(ApStop { cpu, what });
                    return;
                }
            }
        }
    }

    /// Hands `forward` to the bootstrap thread and waits until it is
    /// handled; false if the run ended first.
    fn forward(&self, index: usize, cpu: u32, forward: Forward) -> bool {
        let bootstrap = *lock(&self.bootstrap);
        let mut gate = lock(&self.gate);
        gate.forwarded.push((cpu, forward));
        gate.waiting[index] = true;
        while gate.waiting[index] && !gate.stop {
            if let Some(thread) = bootstrap {
                kick(thread);
            }
            gate = self.changed.wait_timeout(gate, KICK_AGAIN).unwrap_or_else(PoisonError::into_inner).0;
        }
        !gate.stop
    }

    /// The exits APs forwarded since the last call (the bootstrap thread
    /// handles each, then calls [`Aps::answer`]).
    pub fn take_forwarded(&self) -> Vec<(u32, Forward)> {
        std::mem::take(&mut lock(&self.gate).forwarded)
    }

    /// CPU `cpu`'s forwarded exit is handled: it may run on.
    pub fn answer(&self, cpu: u32) {
        let mut gate = lock(&self.gate);
        if let Some(waiting) = gate.waiting.get_mut(cpu as usize - 1) {
            *waiting = false;
        }
        self.changed.notify_all();
    }

    fn enter_long_mode(&self, index: usize, start: ApStart) -> Result<(), String> {
        let vcpu = lock(&self.vcpus[index]);
        let mut sregs = vcpu.get_sregs().map_err(|e| format!("reading its registers: {e}"))?;
        regs::setup_long_mode(&mut sregs, start.pml4);
        vcpu.set_sregs(&sregs).map_err(|e| format!("setting its segment registers: {e}"))?;
        let mut registers = regs::entry_registers(start.rip, u64::from(start.cpu));
        registers.rsp = start.rsp;
        vcpu.set_regs(&registers).map_err(|e| format!("setting its registers: {e}"))?;
        let runnable = kvm_bindings::kvm_mp_state { mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE };
        vcpu.set_mp_state(runnable).map_err(|e| format!("making it runnable: {e}"))
    }

    fn stop_guest(&self, stop: ApStop) {
        lock(&self.gate).stopped.get_or_insert(stop);
        if let Some(thread) = *lock(&self.bootstrap) {
            kick(thread);
        }
    }

    /// Takes every AP out of `KVM_RUN` and keeps it out until the returned
    /// guard is dropped. Only the bootstrap vCPU's thread calls this.
    pub fn pause(&self) -> Paused<'_> {
        let mut gate = lock(&self.gate);
        gate.paused = true;
        gate.pauses += 1;
        gate.paused_since = Some(std::time::Instant::now());
        self.kick_out(gate);
        Paused { aps: self }
    }

    /// Kicks the AP threads until none is in `KVM_RUN` (the flag that keeps
    /// them out is already set in `gate`).
    fn kick_out(&self, mut gate: MutexGuard<'_, Gate>) {
        while gate.running > 0 {
            for thread in gate.threads.iter().flatten() {
                kick(*thread);
            }
            gate = self.changed.wait_timeout(gate, KICK_AGAIN).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// AP `cpu`'s `KVM_RUN` calls that a kick interrupted (each a VM exit
    /// the bootstrap thread never sees).
    pub fn interrupted(&self, cpu: u32) -> u64 {
        lock(&self.gate).interrupted.get(cpu as usize - 1).copied().unwrap_or(0)
    }

    /// The pauses so far.
    pub fn pause_stats(&self) -> PauseStats {
        let gate = lock(&self.gate);
        PauseStats { pauses: gate.pauses, time: gate.paused_time }
    }

    /// Ends every AP thread (the run is over).
    pub fn stop(&self) {
        let mut gate = lock(&self.gate);
        gate.stop = true;
        self.changed.notify_all();
        self.kick_out(gate);
    }
}

/// The APs, paused: none is in `KVM_RUN` until this is dropped.
pub struct Paused<'a> {
    aps: &'a Aps,
}

impl Paused<'_> {
    /// Each AP's vCPU with its CPU number (free to read: it is not running).
    pub fn vcpus(&self) -> impl Iterator<Item = (u32, MutexGuard<'_, VcpuFd>)> + '_ {
        self.aps.vcpus.iter().enumerate().map(|(i, vcpu)| (i as u32 + 1, lock(vcpu)))
    }
}

impl Paused<'_> {
    /// Each AP's state, read now, as captured `at`.
    pub fn capture(&self, at: &str) -> Vec<crate::cpu::CpuCapture> {
        self.vcpus()
            .map(|(cpu, vcpu)| crate::cpu::CpuCapture {
                cpu,
                at: at.to_string(),
                state: crate::cpu::capture(&vcpu),
            })
            .collect()
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        let mut gate = lock(&self.aps.gate);
        gate.paused = false;
        if let Some(since) = gate.paused_since.take() {
            gate.paused_time += since.elapsed();
        }
        drop(gate);
        self.aps.changed.notify_all();
    }
}

/// What the bootstrap thread must handle for an AP's exit, or why the
/// exit stops the guest.
fn classify_exit(exit: VcpuExit<'_>) -> Result<Forward, String> {
    match exit {
        VcpuExit::IoOut(port, data) => match hypercall::decode(port, data) {
            Ok(request) => Ok(Forward::Hypercall(request)),
            Err(error) => Err(error.to_string()),
        },
        VcpuExit::MmioWrite(gpa, data) => Ok(Forward::ReadOnlyWrite { gpa, bytes: data.to_vec(), rip: None }),
        VcpuExit::Shutdown => Err("triple fault (shutdown)".into()),
        VcpuExit::Hlt => Err("hlt".into()),
        other => Err(format!("unexpected exit {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(cpu: u32) -> CpuStartParams {
        CpuStartParams {
            cpu,
            status: 0,
            rip: 0xffff_ffff_8010_0040,
            rsp: 0xffff_ffff_c008_0000,
            pml4: 0x20_0000,
        }
    }

    fn starts() -> CpuStarts {
        CpuStarts::new(3, Some((0xffff_ffff_8010_0000, 0xffff_ffff_8020_0000)), 64 << 20)
    }

    #[test]
    fn each_ap_starts_once_inside_the_kernel_text() {
        let mut starts = starts();
        assert_eq!(starts.accept(&params(1)).map(|s| s.cpu), Ok(1));
        assert!(starts.accept(&params(1)).unwrap_err().contains("already started"));
        assert!(starts.accept(&params(0)).unwrap_err().contains("bootstrap"));
        assert!(starts.accept(&params(3)).unwrap_err().contains("has 3 vCPUs"));
        assert!(starts.accept(&params(u32::MAX)).unwrap_err().contains("has 3 vCPUs"));
        assert_eq!(starts.take_pending().len(), 1);
        assert!(starts.take_pending().is_empty());
    }

    #[test]
    fn hostile_start_parameters_are_refused() {
        let mut starts = starts();
        let cases = [
            (CpuStartParams { rip: 0x40_0000, ..params(2) }, "outside the kernel text"),
            (CpuStartParams { rip: 0xffff_ffff_8020_0000, ..params(2) }, "outside the kernel text"),
            (CpuStartParams { rsp: 0x7fff_0000, ..params(2) }, "not in the kernel half"),
            (CpuStartParams { pml4: 0x20_0001, ..params(2) }, "not a page of guest RAM"),
            (CpuStartParams { pml4: 64 << 20, ..params(2) }, "not a page of guest RAM"),
        ];
        for (bad, reason) in cases {
            let error = starts.accept(&bad).unwrap_err();
            assert!(error.contains(reason), "{error}");
        }
        // None of them used up CPU 2's start.
        assert!(starts.accept(&params(2)).is_ok());
        let mut no_text = CpuStarts::new(2, None, 64 << 20);
        assert!(no_text.accept(&params(1)).unwrap_err().contains("no text symbols"));
    }
}
