//! One guest run, end to end: guest RAM, the VM, boot preparation, the vCPU
//! thread and its exit loop, the watchdog, and the [`RunReport`].
//!
//! The vCPU runs on its own thread; the calling thread is the watchdog. On
//! timeout it sets a stop flag and kicks the vCPU thread out of `KVM_RUN`
//! with a signal (repeated until the thread acknowledges by exiting, since a
//! signal that lands between two `KVM_RUN`s is otherwise lost). The vCPU
//! thread also looks at the stop flag after every exit, not only when
//! `KVM_RUN` was interrupted: a guest that keeps the VMM busy with
//! hypercalls (the kick then lands in the VMM's own code, not in `KVM_RUN`)
//! is stopped within one exit's work of the deadline.
//!
//! [`run_with`] adds a control socket for `superos-vmm inspect` and a
//! snapshot when the guest stops ([`crate::control`]): after every VM exit
//! the vCPU thread asks [`Control::after_exit`] whether a query wants it
//! held at this point.

use crate::aps::{ApStop, Aps, CpuStarts, Forward, Paused};
use crate::boot::{self, BootError, BootOptions};
use crate::check::{CheckMode, CheckStats, Invariant, KernelImage};
use crate::console::ConsoleLine;
use crate::control::{Attached, Control, RunExtras};
use crate::cpu::{self, CpuCapture};
use crate::diagnose::{Diagnosis, KernelSymbols};
use crate::hypercall::{self, Flow, PanicReport};
use crate::images;
use crate::memory::{GuestRam, MemoryError};
use crate::monitor::{Monitor, ReportedViolation, Stop, Tamper, Trigger, VcpuTamper};
use crate::scenario::{Expectation, Scenario, DEFAULT_MEMORY_MIB};
use crate::session::{Echo, EventEntry, EventFormat, Phases, Session};
use crate::vm::{detect_host_flavor, Vm, VmError};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Once;
use std::time::{Duration, Instant};
use superos_protocol::boot::{EventNotifyPolicy, GatePreference, HostFlavor, ScrubStrategy};
use superos_protocol::cpu as cpu_design;
use superos_protocol::event::{Event, FaultKind, SpawnError};
use superos_protocol::hypercall::Hypercall;
use superos_protocol::layout::BOOT_INFO_GPA;
use thiserror::Error;

/// Default watchdog.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything a run needs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// What to run.
    pub scenario: Scenario,
    /// The kernel ELF (normally the embedded one).
    pub kernel: Cow<'static, [u8]>,
    /// Guest memory in MiB; overrides the scenario's.
    pub memory_mib: Option<u64>,
    /// vCPUs; overrides the scenario's (default 1).
    pub cpus: Option<u32>,
    /// Watchdog: the guest is stopped after this long.
    pub timeout: Duration,
    /// Which system-call gate the kernel should try first.
    pub gate: GatePreference,
    /// How the kernel zeroes freed frames (itself, or by asking the VMM).
    pub scrub: ScrubStrategy,
    /// `superos_protocol::boot::DEBUG_*` flags.
    pub debug_flags: u32,
    /// Print console and events live?
    pub echo: Echo,
    /// How live events are printed (text or JSON lines).
    pub events: EventFormat,
    /// When the VMM started (boot phases are measured from here).
    pub started: Instant,
    /// When the isolation invariants are checked (library default:
    /// every event; the command line's default is `exit`).
    pub check: CheckMode,
    /// Keep the guest running after a violation (they are still reported,
    /// and the exit status is still [`EXIT_INVARIANT_VIOLATED`]).
    pub keep_going: bool,
    /// Test/diagnostic hook: corrupts the guest on purpose at an event,
    /// before that event's check. `None` in normal runs.
    pub tamper: Option<Tamper>,
    /// Test/diagnostic hook: changes the vCPU's registers on purpose at an
    /// event, before that event's CPU-state check. `None` in normal runs.
    pub vcpu_tamper: Option<VcpuTamper>,
    /// What the VMM stores at most (events, console bytes); beyond that it
    /// counts ([`RunReport::dropped`]).
    pub limits: crate::session::Limits,
    /// Write an ELF core file here for every process the kernel kills
    /// ([`crate::core_dump`]; the directory must exist).
    pub core_dir: Option<std::path::PathBuf>,
    /// Write the run's timeline here ([`crate::trace`]).
    pub trace: Option<std::path::PathBuf>,
}

impl RunConfig {
    /// A quiet run of `scenario` with the embedded kernel and defaults.
    pub fn new(scenario: Scenario) -> Self {
        RunConfig {
            scenario,
            kernel: Cow::Borrowed(images::KERNEL_ELF),
            memory_mib: None,
            cpus: None,
            timeout: DEFAULT_TIMEOUT,
            gate: GatePreference::Auto,
            scrub: ScrubStrategy::Auto,
            debug_flags: 0,
            echo: Echo::Quiet,
            events: EventFormat::Text,
            started: Instant::now(),
            check: CheckMode::EveryEvent,
            keep_going: false,
            tamper: None,
            vcpu_tamper: None,
            limits: Default::default(),
            core_dir: None,
            trace: None,
        }
    }
}

/// Why the guest stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The kernel shut down normally with this status.
    Shutdown {
        /// Kernel status (0 = all processes finished).
        code: u32,
    },
    /// The kernel reported a panic.
    KernelPanic(PanicReport),
    /// The vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// KVM could not run or emulate an instruction (KVM_EXIT_INTERNAL_ERROR).
    InternalError {
        /// KVM's suberror (1 = emulation failure).
        suberror: u32,
        /// KVM's extra data words.
        data: Vec<u64>,
    },
    /// KVM_EXIT_FAIL_ENTRY.
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// Some other exit the VMM does not expect from this kernel.
    UnexpectedExit(String),
    /// The watchdog fired.
    Timeout(Duration),
    /// SIGINT or SIGTERM stopped the run ([`crate::interrupt`]).
    Interrupted {
        /// The signal.
        signal: i32,
        /// When, since the VMM started.
        after: Duration,
    },
    /// KVM_RUN itself failed.
    VcpuError(String),
    /// Stopped on request through the control socket (`inspect quit`).
    Stopped,
    /// The invariant checker found a violation and the VMM stopped the
    /// guest (see [`RunReport::violations`]).
    InvariantViolated {
        /// The check that found it (`event #12`, `shutdown`, ...).
        at: String,
        /// The invariants violated.
        invariants: Vec<Invariant>,
    },
}

impl std::fmt::Display for GuestExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestExit::Shutdown { code } => write!(f, "the kernel shut down with status {code}"),
            GuestExit::KernelPanic(report) => write!(f, "kernel panic: {}", report.message),
            GuestExit::TripleFault => write!(f, "triple fault (the vCPU shut down)"),
            GuestExit::InternalError { suberror, data } => {
                let kind = if *suberror == 1 { " (instruction emulation failed)" } else { "" };
                write!(f, "KVM internal error, suberror {suberror}{kind}, data {data:x?}")
            }
            GuestExit::FailEntry { reason } => write!(f, "VM entry failed, hardware reason {reason:#x}"),
            GuestExit::UnexpectedExit(what) => write!(f, "unexpected VM exit: {what}"),
            GuestExit::Timeout(after) => {
                write!(f, "timed out after {:.1} s (--timeout)", after.as_secs_f64())
            }
            GuestExit::Interrupted { signal, after } => {
                write!(
                    f,
                    "interrupted by {} after {:.1} s",
                    crate::interrupt::name(*signal),
                    after.as_secs_f64()
                )
            }
            GuestExit::VcpuError(error) => write!(f, "KVM_RUN failed: {error}"),
            GuestExit::Stopped => f.write_str("stopped on request (inspect quit)"),
            GuestExit::InvariantViolated { at, invariants } => {
                let names: Vec<&str> = invariants.iter().map(|i| i.name()).collect();
                write!(f, "stopped at {at}: invariant violated ({})", names.join(", "))
            }
        }
    }
}

/// What became of one scenario process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessStatus {
    /// It exited with a code.
    Exited(i64),
    /// The kernel terminated it.
    Killed {
        /// Why (None if the kernel sent an unknown code).
        fault: Option<FaultKind>,
        /// Faulting address.
        addr: u64,
        /// Faulting instruction.
        rip: u64,
    },
    /// The kernel could not start it.
    NotStarted(Option<SpawnError>),
    /// It was still running (or never reported) when the guest stopped.
    Unfinished,
}

impl std::fmt::Display for ProcessStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProcessStatus::Exited(code) => write!(f, "exit {code}"),
            ProcessStatus::Killed { fault: Some(fault), addr, .. } => {
                write!(f, "killed: {fault} at {addr:#x}")
            }
            ProcessStatus::Killed { fault: None, .. } => write!(f, "killed: unknown fault"),
            ProcessStatus::NotStarted(Some(error)) => write!(f, "not started: {error}"),
            ProcessStatus::NotStarted(None) => write!(f, "not started"),
            ProcessStatus::Unfinished => write!(f, "unfinished"),
        }
    }
}

/// One scenario process, after the run. A process with `runs` > 1 is
/// started that many times in a row; `pid`, `status` and `preemptions`
/// describe the latest run, the `runs_*` counters all of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessOutcome {
    /// Its name in the scenario.
    pub name: String,
    /// The pid of its latest run, once spawned (`None` if the latest run
    /// could not be started).
    pub pid: Option<u32>,
    /// What happened in the latest run.
    pub status: ProcessStatus,
    /// What the scenario expected of every run.
    pub expected: Expectation,
    /// Times the timer preempted the latest run (known once it exited).
    pub preemptions: u64,
    /// How many runs the scenario asked for (`runs`, at least 1).
    pub runs_expected: u32,
    /// Runs that ended: exited, killed, or could not be started.
    pub runs_finished: u32,
    /// Finished runs that ended as expected.
    pub runs_as_expected: u32,
}

impl ProcessOutcome {
    /// True if every run finished and did what the scenario expected.
    pub fn as_expected(&self) -> bool {
        self.runs_finished == self.runs_expected && self.runs_as_expected == self.runs_expected
    }

    /// The outcome as the summary shows it: the latest run's status, and for
    /// a repeated process how many runs went as expected, e.g.
    /// `exit 0 (1000 of 1000 runs as expected)`.
    pub fn describe(&self) -> String {
        if self.runs_expected <= 1 && self.runs_finished <= 1 {
            return self.status.to_string();
        }
        let mut text =
            format!("{} ({} of {} runs as expected", self.status, self.runs_as_expected, self.runs_expected);
        if self.runs_finished != self.runs_expected {
            text.push_str(&format!(", {} finished", self.runs_finished));
        }
        text.push(')');
        text
    }
}

/// True if a run that ended with `status` did what `expected` says.
fn status_matches(expected: Expectation, status: ProcessStatus) -> bool {
    match (expected, status) {
        (Expectation::Exit(want), ProcessStatus::Exited(got)) => want == got,
        (Expectation::Fault(want), ProcessStatus::Killed { fault: Some(got), .. }) => want == got,
        _ => false,
    }
}

/// Counters and timings of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    /// VM exits by kind, every vCPU's.
    pub exits: BTreeMap<String, u64>,
    /// On several vCPUs, each one's VM exits by kind (vCPU order; an AP's
    /// hypercalls are counted where they happened, though the bootstrap
    /// thread handles them). Empty on one.
    pub exits_by_cpu: Vec<BTreeMap<String, u64>>,
    /// On several vCPUs: how often and how long the application processors
    /// were held out of `KVM_RUN` while the VMM looked at the guest.
    pub ap_pauses: crate::aps::PauseStats,
    /// Boot milestones.
    pub phases: Phases,
    /// Total wall time from VMM start to the end of the run.
    pub wall: Duration,
    /// Invariant checks: how many, how much work, how long.
    pub checks: CheckStats,
}

/// Everything a run produced.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// Why the guest stopped.
    pub exit: GuestExit,
    /// One entry per scenario process, in scenario order.
    pub processes: Vec<ProcessOutcome>,
    /// Console lines, in order.
    pub lines: Vec<ConsoleLine>,
    /// Kernel events, in order.
    pub events: Vec<EventEntry>,
    /// What the VMM noticed about the guest (bad hypercalls, ...).
    pub log: Vec<String>,
    /// Events the kernel dropped.
    pub lost_events: u64,
    /// What the VMM dropped to keep its memory bounded (events, console
    /// bytes, warnings beyond their caps).
    pub dropped: crate::session::Dropped,
    /// Core files written (`RunConfig::core_dir`), one per killed process.
    pub cores: Vec<std::path::PathBuf>,
    /// Requested outputs that could not be written (the snapshot): the
    /// exit status is then [`EXIT_OUTPUT_FAILED`] unless already non-zero.
    pub output_errors: Vec<String>,
    /// Counters and timings.
    pub stats: RunStats,
    /// Where the guest died, if it crashed.
    pub diagnosis: Option<Diagnosis>,
    /// The host flavor the run detected.
    pub host: HostFlavor,
    /// Isolation invariant violations, each distinct finding once, in the
    /// order found.
    pub violations: Vec<ReportedViolation>,
    /// Violations found beyond those kept.
    pub violations_dropped: u64,
    /// Remarks about the checks (what could not be checked, and why).
    pub check_notes: Vec<String>,
}

/// `superos-vmm run` exit status: all processes behaved as expected.
pub const EXIT_OK: i32 = 0;
/// A process did not do what the scenario expected.
pub const EXIT_UNEXPECTED_OUTCOME: i32 = 1;
/// Bad command line, scenario or image (the guest never ran).
pub const EXIT_USAGE: i32 = 2;
/// The guest crashed (kernel panic, triple fault, KVM error).
pub const EXIT_GUEST_CRASH: i32 = 3;
/// The watchdog stopped the guest.
pub const EXIT_TIMEOUT: i32 = 4;
/// An isolation invariant was violated (whatever else happened; findings
/// of the check at a kernel panic alone leave the status at
/// [`EXIT_GUEST_CRASH`]).
pub const EXIT_INVARIANT_VIOLATED: i32 = 5;
/// The guest run was fine but a requested output (the snapshot, stdout)
/// could not be written.
pub const EXIT_OUTPUT_FAILED: i32 = 6;
/// SIGINT (Ctrl-C) stopped the run: 128 + 2, as shells report it (SIGTERM:
/// 128 + 15).
pub const EXIT_INTERRUPTED: i32 = 128 + libc::SIGINT;

impl RunReport {
    /// True if the kernel shut down cleanly and every process behaved.
    pub fn success(&self) -> bool {
        self.exit_status() == EXIT_OK
    }

    /// The process exit status `superos-vmm run` uses for this report.
    pub fn exit_status(&self) -> i32 {
        match self.run_status() {
            EXIT_OK if !self.output_errors.is_empty() => EXIT_OUTPUT_FAILED,
            status => status,
        }
    }

    /// The status of the guest run alone (outputs aside).
    fn run_status(&self) -> i32 {
        if self.violations.iter().any(|v| !v.at_panic)
            || matches!(self.exit, GuestExit::InvariantViolated { .. })
        {
            return EXIT_INVARIANT_VIOLATED;
        }
        match self.exit {
            // Events were dropped (a kernel flooding the VMM): what the
            // processes did cannot be vouched for.
            GuestExit::Shutdown { code: 0 } if self.dropped.events > 0 => EXIT_UNEXPECTED_OUTCOME,
            GuestExit::Shutdown { code: 0 } if self.processes.iter().all(ProcessOutcome::as_expected) => {
                EXIT_OK
            }
            GuestExit::Shutdown { .. } | GuestExit::Stopped => EXIT_UNEXPECTED_OUTCOME,
            GuestExit::Timeout(_) => EXIT_TIMEOUT,
            GuestExit::Interrupted { signal, .. } => 128 + signal,
            _ => EXIT_GUEST_CRASH,
        }
    }

    /// Console lines written by the scenario process named `name`, in all
    /// of its runs.
    pub fn output_of(&self, name: &str) -> Vec<&str> {
        let specs: Vec<u64> =
            (0..self.processes.len() as u64).filter(|&i| self.processes[i as usize].name == name).collect();
        let pids: Vec<u32> = self
            .events
            .iter()
            .filter_map(|entry| match entry.event {
                Event::ProcessSpawned { pid, spec_index, .. } if specs.contains(&spec_index) => Some(pid),
                _ => None,
            })
            .collect();
        self.lines.iter().filter(|l| pids.contains(&l.pid)).map(|l| l.text.as_str()).collect()
    }

    /// The outcome of the scenario process named `name`.
    pub fn process(&self, name: &str) -> Option<&ProcessOutcome> {
        self.processes.iter().find(|p| p.name == name)
    }
}

/// Errors before the guest could run.
#[derive(Debug, Error)]
pub enum RunError {
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel or program images.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// KVM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The vCPU thread could not be started or died.
    #[error("vCPU thread: {0}")]
    Thread(String),
    /// The control socket or the snapshot file could not be set up.
    #[error("{0}")]
    Extras(String),
}

/// Every event is a VM exit only where the VMM looks at the guest while it
/// runs: checks at every event or periodic ones (which wait for the next
/// event when the kernel is busy), a tamper hook, core files (written at a
/// kill's event, before the teardown), the control socket (whose
/// queries stop at events), or a snapshot wherever the guest stops (a
/// batching kernel's tables are consistent only where it notifies and at
/// its shutdown). Otherwise the kernel batches them.
fn event_notify_policy(config: &RunConfig, extras: &RunExtras) -> EventNotifyPolicy {
    let checks_at_events = matches!(config.check, CheckMode::EveryEvent | CheckMode::Periodic(_));
    let looks = config.tamper.is_some()
        || config.vcpu_tamper.is_some()
        || config.core_dir.is_some()
        || config.trace.is_some()
        || !extras.is_empty();
    if checks_at_events || looks {
        EventNotifyPolicy::EveryEvent
    } else {
        EventNotifyPolicy::Batched
    }
}

/// Runs the scenario in `config` to completion (or crash, or timeout).
pub fn run(config: RunConfig) -> Result<RunReport, RunError> {
    run_with(config, RunExtras::default())
}

/// [`run`], also serving a control socket and/or writing a snapshot when
/// the guest stops (see [`RunExtras`] and [`crate::control`]).
pub fn run_with(config: RunConfig, extras: RunExtras) -> Result<RunReport, RunError> {
    let memory_mib = config.memory_mib.or(config.scenario.memory_mib).unwrap_or(DEFAULT_MEMORY_MIB);
    let ram = GuestRam::new(memory_mib)?;
    let host = detect_host_flavor();
    tracing::info!(memory_mib, ?host, scenario = %config.scenario.origin, check = ?config.check, "creating the VM");
    let symbols = KernelSymbols::parse(&config.kernel);
    // The kernel's text and read-only data go into a read-only memory slot:
    // the range comes from the ELF the VMM loads, not from the kernel.
    let layout = boot::check_kernel_elf(&config.kernel, ram.size())?;
    let cpus = config.cpus.or(config.scenario.cpus).unwrap_or(1);
    let mut vm = Vm::new(&ram, layout.read_only, cpus)?;
    let options = BootOptions {
        host,
        gate: config.gate,
        scrub: config.scrub,
        debug_flags: config.debug_flags,
        tsc_khz: vm.tsc_khz(),
        cpus,
        event_notify: event_notify_policy(&config, &extras),
        trace: config.trace.is_some(),
    };
    let prepared = boot::prepare(&ram, &config.kernel, &config.scenario, options)?;
    vm.setup_registers(prepared.entry, prepared.boot_pml4, BOOT_INFO_GPA)?;
    tracing::info!(
        entry = format_args!("{:#x}", prepared.entry),
        read_only = ?layout.read_only,
        processes = config.scenario.processes.len(),
        "kernel loaded"
    );

    let names: Vec<String> = config.scenario.processes.iter().map(|p| p.name.clone()).collect();
    let usable = prepared.usable_ranges();
    let image = KernelImage {
        read_only: layout.read_only,
        symbols: cpu::design_symbols(&symbols),
        features: Some(cpu::CpuFeatures::presented(host, vm.features())),
    };
    // Always a monitor, even when the run checks nothing: inspection needs
    // its record of the boot (the kernel text baseline), and a write into
    // the read-only kernel image is reported whatever the check mode.
    let mut monitor = Monitor::new(config.check, config.keep_going, config.tamper.clone(), usable.clone())
        .with_image(&image);
    // The text baseline is what the VMM itself just loaded, before the
    // kernel ran a single instruction.
    monitor.checker.baseline_image(&ram);
    // A run that checks logs the guest's writes, so that a check reads only
    // the free frames that can have changed since an earlier one.
    if config.check != CheckMode::Off {
        monitor
            .checker
            .log_writes(Box::new(vm.write_log()), ram.size() / superos_protocol::layout::PAGE_SIZE);
    }
    let text_symbol = |name: &str| image.symbols.get(name).copied();
    let text = text_symbol(cpu_design::symbols::TEXT_START).zip(text_symbol(cpu_design::symbols::TEXT_END));
    let mut session = Session::new(&ram, config.started, config.echo, names)
        .with_event_format(config.events)
        .with_limits(config.limits)
        .with_read_only(vm.read_only())
        .with_monitor(monitor)
        .with_core_dir(config.core_dir.clone())
        .with_trace(config.trace.is_some().then_some(vm.tsc_khz()));
    session.cpu_starts = CpuStarts::new(cpus, text, ram.size());
    let aps = Aps::new(std::mem::take(&mut vm.aps));
    let attached = Attached::start(extras, &ram, &usable, image).map_err(RunError::Extras)?;
    let control = attached.control();
    if let Some(control) = control {
        control.set_programs(config.scenario.processes.iter().map(|p| p.program.clone()).collect());
        if let Some(monitor) = session.monitor.as_mut() {
            monitor.checker.share_text_patches(control.text_patches());
        }
        if cpus > 1 {
            control.refuse_hardware_breakpoints(
                "hardware breakpoints are armed in vCPU 0 only (the others' debug exits are forwarded, not held): a run on one vCPU takes them".into(),
            );
        }
        if host == HostFlavor::Pvm && cpus > 1 {
            // Its ring 0 is KVM's instruction emulator, which has no `int3`
            // outside real mode: the vCPU stops with an emulation failure,
            // which the VMM takes as the breakpoint on the bootstrap vCPU
            // only (the others' exits are forwarded, not held there).
            control.refuse_kernel_breakpoints(
                "on this host (PVM) a kernel breakpoint stops the vCPU itself (its ring-0 emulator cannot execute an int3), which only a run on one vCPU can hold".into(),
            );
        }
    }
    install_kick_handler();
    let period = match config.check {
        CheckMode::Periodic(period) => Some(period),
        _ => None,
    };
    let kicks = Kicks {
        stop: AtomicBool::new(false),
        stop_signal: std::sync::atomic::AtomicI32::new(0),
        check_due: AtomicBool::new(false),
        period,
    };
    let vcpu_tamper = config.vcpu_tamper.clone();
    let (exit, exits, diagnosis, final_cpus) = std::thread::scope(|scope| -> Result<_, RunError> {
        let (sender, receiver) = mpsc::channel();
        let vcpu = &mut vm.vcpu;
        let session = &mut session;
        let kicks = &kicks;
        let symbols = &symbols;
        let aps = &aps;
        for cpu in 1..=aps.len() as u32 {
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{cpu}"))
                .spawn_scoped(scope, move || aps.run_ap(cpu));
            if let Err(error) = spawned {
                aps.stop();
                return Err(RunError::Thread(error.to_string()));
            }
        }
        let spawned = std::thread::Builder::new().name("vcpu0".into()).spawn_scoped(scope, move || {
            // SAFETY: pthread_self has no preconditions.
            let thread = unsafe { libc::pthread_self() };
            aps.set_bootstrap_thread(thread);
            if let Some(control) = control {
                control.vcpu_started(thread);
            }
            let _ = sender.send(VcpuMessage::Started(thread));
            let result = vcpu_loop(vcpu, aps, session, kicks, symbols, control, vcpu_tamper);
            // The run is over: the application processors' threads end.
            aps.stop();
            if let Some(control) = control {
                control.vcpu_exited();
            }
            let _ = sender.send(VcpuMessage::Done);
            result
        });
        let handle = match spawned {
            Ok(handle) => handle,
            Err(error) => {
                aps.stop();
                return Err(RunError::Thread(error.to_string()));
            }
        };
        let thread = match receiver.recv() {
            Ok(VcpuMessage::Started(thread)) => thread,
            _ => return Err(RunError::Thread("the vCPU thread exited before starting".into())),
        };
        tracing::info!("vCPU 0 started");
        watchdog(&receiver, thread, kicks, config.timeout, period, control);
        handle.join().map_err(|_| RunError::Thread("the vCPU thread panicked".into()))
    })?;
    let mut exits_by_cpu = exits;
    let mut exits = BTreeMap::new();
    for (kind, count) in exits_by_cpu.iter().flatten() {
        *exits.entry(kind.clone()).or_default() += count;
    }
    if exits_by_cpu.len() < 2 {
        exits_by_cpu.clear();
    }
    let ap_pauses = aps.pause_stats();
    tracing::info!(%exit, vm_exits = exits.values().sum::<u64>(), "guest stopped");
    session.finish_console();
    session.phases.guest_exit.get_or_insert(session.now());
    let processes = outcomes(&config.scenario, &session.events);
    let baseline = session.monitor.as_ref().and_then(|m| m.checker.text_baseline().cloned());
    let monitor = session.monitor.take();
    let checks = monitor.as_ref().map(|m| m.checker.stats).unwrap_or_default();
    let stats = RunStats {
        exits,
        exits_by_cpu,
        ap_pauses,
        phases: session.phases,
        wall: config.started.elapsed(),
        checks,
    };
    let (violations, violations_dropped, check_notes) =
        monitor.map(|m| (m.violations, m.violations_dropped, m.notes)).unwrap_or_default();
    let mut report = RunReport {
        exit,
        processes,
        lines: std::mem::take(&mut session.lines),
        events: std::mem::take(&mut session.events),
        log: std::mem::take(&mut session.log),
        lost_events: session.lost_events,
        dropped: session.dropped,
        cores: std::mem::take(&mut session.cores),
        output_errors: Vec::new(),
        stats,
        diagnosis,
        host,
        violations,
        violations_dropped,
        check_notes,
    };
    if let (Some(path), Some(trace)) = (&config.trace, &session.trace) {
        if let Err(error) = trace.write(path, session.now(), session.pid_names()) {
            let message = format!("could not write the trace {}: {error}", path.display());
            eprintln!("superos-vmm: {message}");
            report.output_errors.push(message);
        }
    }
    drop(vm);
    attached.finish(&ram, session.hello, baseline, final_cpus, &usable, &config.scenario.origin, &mut report);
    Ok(report)
}

/// What the watchdog thread tells the vCPU thread when it kicks it.
struct Kicks {
    /// The watchdog fired: stop.
    stop: AtomicBool,
    /// Why: 0 the timeout, else the signal (SIGINT, SIGTERM) received.
    stop_signal: std::sync::atomic::AtomicI32,
    /// A periodic check is due.
    check_due: AtomicBool,
    /// The periodic checks' period: the guest runs at least this long
    /// between the end of one check and the next periodic one, however long
    /// a check takes (under QEMU's TCG a check can take longer than a
    /// period; kicked on a fixed grid, the guest would barely run).
    period: Option<Duration>,
}

impl Kicks {
    /// What the watchdog stopped the guest for, at `now`.
    fn stopped(&self, now: Duration) -> GuestExit {
        match self.stop_signal.load(Ordering::SeqCst) {
            0 => GuestExit::Timeout(now),
            signal => GuestExit::Interrupted { signal, after: now },
        }
    }
}

/// How often the watchdog looks for SIGINT/SIGTERM.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

enum VcpuMessage {
    Started(libc::pthread_t),
    Done,
}

/// The signal used to kick the vCPU thread out of KVM_RUN.
pub(crate) fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the (empty) handler of [`kick_signal`], once per process:
/// without one the signal would kill the whole process.
pub(crate) fn install_kick_handler() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        if let Err(error) = vmm_sys_util::signal::register_signal_handler(kick_signal(), ignore_signal) {
            eprintln!("superos-vmm: cannot install the vCPU kick signal handler: {error}");
        }
    });
}

extern "C" fn ignore_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Waits for the vCPU thread to finish; kicks it every `period` (periodic
/// checks) and stops it after `timeout`, not counting the time the control
/// socket held the vCPU.
fn watchdog(
    receiver: &mpsc::Receiver<VcpuMessage>,
    thread: libc::pthread_t,
    kicks: &Kicks,
    timeout: Duration,
    period: Option<Duration>,
    control: Option<&Control>,
) {
    install_kick_handler();
    let started = Instant::now();
    let deadline = || started + timeout + control.map_or(Duration::ZERO, Control::held_time);
    let mut next_kick = period.map(|period| started + period);
    loop {
        let now = Instant::now();
        let until = next_kick.map_or(deadline(), |kick| kick.min(deadline()));
        // SIGINT/SIGTERM are looked at every SIGNAL_POLL.
        let wait = until.saturating_duration_since(now).min(SIGNAL_POLL);
        if !matches!(receiver.recv_timeout(wait), Err(mpsc::RecvTimeoutError::Timeout)) {
            return;
        }
        if let Some(signal) = crate::interrupt::received() {
            kicks.stop_signal.store(signal, Ordering::SeqCst);
            break;
        }
        if Instant::now() >= deadline() {
            break;
        }
        let (Some(kick), Some(period)) = (next_kick, period) else { continue };
        if Instant::now() < kick {
            continue;
        }
        next_kick = Some(Instant::now() + period);
        kicks.check_due.store(true, Ordering::SeqCst);
        // SAFETY: as below: the vCPU thread has not sent Done, so it is
        // still running and its pthread_t is valid.
        unsafe { libc::pthread_kill(thread, kick_signal()) };
    }
    kicks.stop.store(true, Ordering::SeqCst);
    loop {
        // SAFETY: `thread` is the vCPU thread: still running (no Done yet) and
        // joined only after this returns, so its pthread_t is valid.
        unsafe { libc::pthread_kill(thread, kick_signal()) };
        if !matches!(receiver.recv_timeout(Duration::from_millis(20)), Err(mpsc::RecvTimeoutError::Timeout)) {
            return;
        }
    }
}

/// What to do after one VM exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Run the vCPU again.
    Continue,
    /// The guest is done.
    Stop(GuestExit),
}

impl Step {
    /// How the run goes on after a hypercall's `flow`.
    fn after(flow: Flow) -> Step {
        match flow {
            Flow::Continue => Step::Continue,
            Flow::Shutdown(code) => Step::Stop(GuestExit::Shutdown { code }),
            Flow::Panic(report) => Step::Stop(GuestExit::KernelPanic(report)),
            Flow::InvariantViolated(stop) => Step::violated(stop),
        }
    }

    /// How the run goes on after a check or a refused write: on if
    /// nothing stopped it.
    fn stopped_by(stop: Option<Stop>) -> Step {
        stop.map_or(Step::Continue, Step::violated)
    }

    fn violated(Stop { at, invariants }: Stop) -> Step {
        Step::Stop(GuestExit::InvariantViolated { at, invariants })
    }
}

/// Adds to `into` the invariants of `from` it does not list yet.
fn merge_invariants(into: &mut Vec<Invariant>, from: Vec<Invariant>) {
    for invariant in from {
        if !into.contains(&invariant) {
            into.push(invariant);
        }
    }
}

/// Handles one VM exit. A free function of the exit and the session, so it
/// can be tested with made-up exits.
pub fn handle_exit(session: &mut Session<'_>, exit: VcpuExit<'_>, exits: &mut BTreeMap<String, u64>) -> Step {
    // Counted, and in the timeline if one is kept (the bootstrap vCPU's).
    fn tally(exits: &mut BTreeMap<String, u64>, session: &mut Session<'_>, kind: &str) {
        tracing::trace!(kind, "VM exit");
        *exits.entry(kind.to_string()).or_default() += 1;
        session.trace_exit(0, kind);
    }
    match exit {
        VcpuExit::IoOut(port, data) => match hypercall::decode(port, data) {
            Ok(request) => {
                tally(exits, session, &format!("hypercall {}", request.call().name()));
                Step::after(hypercall::handle(session, request))
            }
            Err(error) => {
                tally(exits, session, "io-out (other)");
                session.warn(format!("ignored: {error}"));
                Step::Continue
            }
        },
        VcpuExit::IoIn(port, data) => {
            tally(exits, session, "io-in");
            data.fill(0xff);
            session.warn(format!("ignored: read from I/O port {port:#x}"));
            Step::Continue
        }
        VcpuExit::MmioRead(address, data) => {
            tally(exits, session, "mmio-read");
            data.fill(0xff);
            session.warn(format!("ignored: MMIO read at {address:#x}"));
            Step::Continue
        }
        VcpuExit::MmioWrite(address, _) => {
            tally(exits, session, "mmio-write");
            session.warn(format!("ignored: MMIO write at {address:#x}"));
            Step::Continue
        }
        VcpuExit::Shutdown => {
            tally(exits, session, "shutdown");
            Step::Stop(GuestExit::TripleFault)
        }
        VcpuExit::InternalError => {
            tally(exits, session, "internal-error");
            Step::Stop(GuestExit::InternalError { suberror: 0, data: Vec::new() })
        }
        VcpuExit::FailEntry(reason, _) => {
            tally(exits, session, "fail-entry");
            Step::Stop(GuestExit::FailEntry { reason })
        }
        VcpuExit::Hlt => {
            tally(exits, session, "hlt");
            Step::Stop(GuestExit::UnexpectedExit("hlt".into()))
        }
        other => {
            tally(exits, session, "other");
            Step::Stop(GuestExit::UnexpectedExit(format!("{other:?}")))
        }
    }
}

/// Why the guest stopped, each vCPU's exits by kind, the diagnosis and
/// every vCPU's final state.
type LoopResult = (GuestExit, Vec<BTreeMap<String, u64>>, Option<Diagnosis>, Vec<CpuCapture>);

/// After an exit whose handling ran a check (`session.cpu_check_due`): the
/// vCPU tamper hook for the new events (`session.events[events_before..]`),
/// then the vCPU's state read through KVM and compared with the design
/// (`cpu-state-intact`), with the check's trigger. A violation turns `step`
/// into a stop (joining the memory check's if it stopped too), unless the
/// guest was already ending for another reason (a panic: then it is only
/// recorded).
fn cpu_check_after_exit(
    vcpu: &VcpuFd,
    aps: Option<&Paused<'_>>,
    session: &mut Session<'_>,
    tamper: &mut Option<VcpuTamper>,
    events_before: usize,
    step: Step,
) -> Step {
    if let Some(hook) = tamper.as_ref() {
        let fresh = session.events.get(events_before..).unwrap_or_default();
        let tampered = match hook.cpu() {
            0 => fresh.iter().any(|entry| hook.call(vcpu, session.ram, entry)),
            cpu => aps
                .into_iter()
                .flat_map(Paused::vcpus)
                .filter(|(ap, _)| *ap == cpu)
                .any(|(_, ap)| fresh.iter().any(|entry| hook.call(&ap, session.ram, entry))),
        };
        if tampered {
            *tamper = None;
        }
    }
    let Some(trigger) = session.cpu_check_due() else { return step };
    let started = Instant::now();
    let state = cpu::capture(vcpu);
    let mut stop = session.check_cpu(trigger, 0, state, started.elapsed());
    // Every application processor too: paused, so read at the same point.
    for (cpu, ap) in aps.into_iter().flat_map(Paused::vcpus) {
        let started = Instant::now();
        let state = cpu::capture(&ap);
        if let Some(found) = session.check_cpu(trigger, cpu, state, started.elapsed()) {
            stop = Some(match stop {
                Some(mut stop) => {
                    merge_invariants(&mut stop.invariants, found.invariants);
                    stop
                }
                None => found,
            });
        }
    }
    let Some(stop) = stop else { return step };
    match step {
        Step::Continue | Step::Stop(GuestExit::Shutdown { .. }) => Step::violated(stop),
        Step::Stop(GuestExit::InvariantViolated { at, mut invariants }) => {
            merge_invariants(&mut invariants, stop.invariants);
            Step::Stop(GuestExit::InvariantViolated { at, invariants })
        }
        other => other,
    }
}

/// Where `vcpu` is, in words: ring 3 and its RIP, or the kernel function;
/// then its interrupt flag and local APIC (vectors in service and pending).
fn vcpu_place(vcpu: &VcpuFd, symbols: &KernelSymbols) -> String {
    let place = match (vcpu.get_sregs(), vcpu.get_regs()) {
        (Ok(sregs), Ok(regs)) if sregs.cs.selector & 3 == 3 => format!("in user code at rip {:#x}", regs.rip),
        (Ok(_), Ok(regs)) => match symbols.lookup(regs.rip) {
            Some(symbol) => format!("in the kernel at rip {:#x} ({symbol})", regs.rip),
            None => format!("in the kernel at rip {:#x}", regs.rip),
        },
        (Err(e), _) | (_, Err(e)) => return format!("unreadable ({e})"),
    };
    let interrupts = vcpu.get_regs().map_or(String::new(), |regs| {
        format!(", interrupts {}", if regs.rflags & cpu_design::RFLAGS_IF != 0 { "on" } else { "off" })
    });
    let apic = vcpu.get_lapic().map_or(String::new(), |lapic| {
        let word = |offset: usize| {
            let bytes: Vec<u8> = lapic.regs[offset..offset + 4].iter().map(|&b| b as u8).collect();
            u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
        };
        let vectors = |base: usize| -> Vec<String> {
            (0..256u32)
                .filter(|&v| word(base + 0x10 * (v as usize / 32)) & (1 << (v % 32)) != 0)
                .map(|v| format!("{v:#x}"))
                .collect()
        };
        format!(
            ", APIC: in service [{}], pending [{}], TPR {:#x}, timer LVT {:#x} count {}",
            vectors(0x100).join(" "),
            vectors(0x200).join(" "),
            word(0x80),
            word(0x320),
            word(0x390)
        )
    });
    format!("{place}{interrupts}{apic}")
}

/// Handles the exits application processors forwarded (with every AP
/// paused, as if they were the bootstrap vCPU's own) and lets each AP run
/// on, counting each in `exits` of its AP (`exits[0]` is CPU 1's). Returns
/// how the run goes on and whether an event hypercall was among them.
fn forwarded_exits(
    aps: &Aps,
    session: &mut Session<'_>,
    symbols: &KernelSymbols,
    exits: &mut [BTreeMap<String, u64>],
    step: Step,
) -> (Step, bool) {
    let mut step = step;
    let mut event = false;
    let mut unknown = BTreeMap::new();
    for (cpu, forward) in aps.take_forwarded() {
        // `exits` is by AP: CPU 1 first (the AP threads name only those).
        let exits = match (cpu as usize).checked_sub(1).and_then(|index| exits.get_mut(index)) {
            Some(exits) => exits,
            None => &mut unknown,
        };
        let outcome = match forward {
            Forward::Hypercall(request) => {
                let kind = format!("hypercall {}", request.call().name());
                session.trace_exit(cpu, &kind);
                *exits.entry(kind).or_default() += 1;
                event |= request == hypercall::Request::EventNotify;
                Step::after(hypercall::handle(session, request))
            }
            Forward::ReadOnlyWrite { gpa, bytes, rip } if session.in_read_only(gpa) => {
                *exits.entry("mmio-write (read-only kernel image)".to_string()).or_default() += 1;
                let symbol = rip.and_then(|rip| symbols.lookup(rip));
                Step::stopped_by(session.read_only_write(gpa, &bytes, rip, symbol))
            }
            Forward::ReadOnlyWrite { gpa, .. } => {
                *exits.entry("mmio-write".to_string()).or_default() += 1;
                session.warn(format!("ignored: MMIO write at {gpa:#x} by vCPU {cpu}"));
                Step::Continue
            }
        };
        aps.answer(cpu);
        // The first stop wins (a shutdown after a violation stays a violation).
        if step == Step::Continue {
            step = outcome;
        }
    }
    (step, event)
}

/// Whether every application processor is in ring 3, in the kernel's idle
/// loop or halted waiting for the big kernel lock (none can be half-way
/// through kernel work), read while they are paused. `quiet` are the
/// kernel's `[start, end)` ranges of the latter two, from its ELF.
fn aps_quiet(aps: Option<&Paused<'_>>, quiet: &[(u64, u64)]) -> bool {
    aps.into_iter().flat_map(Paused::vcpus).all(|(_, vcpu)| vcpu_quiet(&vcpu, quiet))
}

/// Whether `vcpu` is in ring 3 or at a RIP in one of the `quiet` ranges.
fn vcpu_quiet(vcpu: &VcpuFd, quiet: &[(u64, u64)]) -> bool {
    match (vcpu.get_sregs(), vcpu.get_regs()) {
        (Ok(sregs), Ok(regs)) => {
            sregs.cs.selector & 3 == 3 || quiet.iter().any(|&(start, end)| (start..end).contains(&regs.rip))
        }
        _ => false,
    }
}

/// Every vCPU's state the run ends with, for `inspect` and the snapshot:
/// read now if the bootstrap vCPU stopped at a consistent point (the
/// shutdown hypercall, a check that stopped the guest, a `quit` at a
/// consistent point; the APs are paused while they are read), else the last
/// ones a check read.
fn final_cpu_states(
    vcpu: &VcpuFd,
    aps: &Aps,
    session: &Session<'_>,
    exit: &GuestExit,
    control: Option<&Control>,
) -> Vec<CpuCapture> {
    let at = match exit {
        GuestExit::Shutdown { .. } => Some(format!("at {}", Trigger::Shutdown)),
        GuestExit::InvariantViolated { at, .. } => Some(format!("at {at}")),
        GuestExit::Stopped => control.and_then(Control::quit_at).map(|point| point.to_string()),
        _ => None,
    };
    match at {
        Some(at) => {
            let mut cpus = vec![CpuCapture { cpu: 0, at: at.clone(), state: cpu::capture(vcpu) }];
            if !aps.is_empty() {
                cpus.extend(aps.pause().capture(&at));
            }
            cpus
        }
        None => session.monitor.as_ref().map(|m| m.last_cpus.clone()).unwrap_or_default(),
    }
}

fn vcpu_loop(
    vcpu: &mut VcpuFd,
    aps: &Aps,
    session: &mut Session<'_>,
    kicks: &Kicks,
    symbols: &KernelSymbols,
    control: Option<&Control>,
    mut vcpu_tamper: Option<VcpuTamper>,
) -> LoopResult {
    // By vCPU; the bootstrap vCPU's own are `exits[0]`.
    let mut all_exits = vec![BTreeMap::new(); 1 + aps.len()];
    let (own, forwarded) = all_exits.split_at_mut(1);
    let exits = &mut own[0];
    let looks_at_the_guest = session.monitor.as_ref().is_some_and(|m| m.checks_anything())
        || control.is_some()
        || vcpu_tamper.is_some();
    session.phases.vcpu_start = Some(session.now());
    // `run --paused`: held before the first instruction (`quit` there stops it).
    let mut quit_at_start = control.is_some_and(|control| {
        control.before_start(session, || {
            let at = crate::inspect::Point::Boot.to_string();
            vec![CpuCapture { cpu: 0, at, state: cpu::capture(vcpu) }]
        })
    });
    // A step gdb asked for at the first instruction is armed as it resumes.
    if let Some(control) = control {
        control.apply_vcpu_steps(vcpu, None);
    }
    let checks_run = |session: &Session<'_>| session.monitor.as_ref().map_or(0, |m| m.checker.stats.checks);
    let range = |start: &str, end: &str| symbols.address(start).zip(symbols.address(end));
    let idle: Vec<(u64, u64)> = [
        range(cpu_design::symbols::IDLE_LOOP, cpu_design::symbols::IDLE_LOOP_END),
        range(cpu_design::symbols::LOCK_WAIT, cpu_design::symbols::LOCK_WAIT_END),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut last_check_end: Option<Instant> = None;
    let exit = loop {
        let checks_before = checks_run(session);
        if std::mem::take(&mut quit_at_start) {
            break GuestExit::Stopped;
        }
        let mut event_exit = false;
        let mut refused_write = None;
        let events_before = session.events.len();
        let result = vcpu.run();
        // The VMM handles this exit with every other vCPU out of KVM_RUN
        // when it may look at the guest (a check, the control socket, the
        // tamper hook); a run that does none of that never stops the other
        // vCPUs (a pause is not free, and it must not hide what the kernel
        // itself has to do: on QEMU's SVM a vCPU's exit drops its TLB).
        let paused = (!aps.is_empty() && looks_at_the_guest).then(|| aps.pause());
        let mut kernel_stepped = false;
        let mut hardware_hit = false;
        let mut emulation_failed = false;
        let step = match result {
            Ok(VcpuExit::MmioWrite(gpa, data)) if session.in_read_only(gpa) => {
                refused_write = Some((gpa, data.to_vec()));
                Step::Continue
            }
            // The single step a debugger asked of this vCPU.
            Ok(VcpuExit::Debug(_)) if control.is_some_and(Control::kernel_step_armed) => {
                *exits.entry("debug (a debugger's step)".to_string()).or_default() += 1;
                kernel_stepped = true;
                Step::Continue
            }
            // DR6's B0-B3: one of the debugger's hardware breakpoints.
            Ok(VcpuExit::Debug(arch)) if arch.dr6 & 0xf != 0 && control.is_some() => {
                *exits.entry("debug (a hardware breakpoint)".to_string()).or_default() += 1;
                hardware_hit = true;
                Step::Continue
            }
            Ok(exit) => {
                event_exit =
                    matches!(exit, VcpuExit::IoOut(port, _) if port == Hypercall::EventNotify.port());
                emulation_failed = matches!(exit, VcpuExit::InternalError);
                handle_exit(session, exit, exits)
            }
            Err(error) if error.errno() == libc::EINTR || error.errno() == libc::EAGAIN => {
                *exits.entry("interrupted".to_string()).or_default() += 1;
                if kicks.stop.load(Ordering::SeqCst) {
                    Step::Stop(kicks.stopped(session.now()))
                } else {
                    Step::Continue
                }
            }
            Err(error) => Step::Stop(GuestExit::VcpuError(error.to_string())),
        };
        let step = match (hardware_hit, control, step) {
            (true, Some(control), Step::Continue)
                if control.hardware_breakpoint_hit(vcpu, paused.as_ref(), session) =>
            {
                Step::Stop(GuestExit::Stopped)
            }
            (_, _, step) => step,
        };
        // On the PVM host, a kernel breakpoint: its ring-0 emulator cannot
        // execute the debugger's int3 and stops the vCPU on it.
        let step = match (emulation_failed, control) {
            (true, Some(control))
                if vcpu.get_regs().is_ok_and(|regs| control.kernel_breakpoint_at(regs.rip)) =>
            {
                *exits.entry("internal error (a kernel breakpoint)".to_string()).or_default() += 1;
                if control.vcpu_kernel_breakpoint(vcpu, paused.as_ref(), session) {
                    Step::Stop(GuestExit::Stopped)
                } else {
                    Step::Continue
                }
            }
            _ => step,
        };
        // A write into the read-only kernel image: KVM dropped it; report it
        // with the RIP of the writer.
        let step = match refused_write {
            Some((gpa, bytes)) => {
                *exits.entry("mmio-write (read-only kernel image)".to_string()).or_default() += 1;
                let rip = vcpu.get_regs().ok().map(|regs| regs.rip);
                let symbol = rip.and_then(|rip| symbols.lookup(rip));
                Step::stopped_by(session.read_only_write(gpa, &bytes, rip, symbol))
            }
            None => step,
        };
        // A periodic check is due: run it if the vCPU stopped in ring 3
        // (user code; the kernel is not half-way through anything).
        let step = match step {
            Step::Continue
                if kicks.check_due.swap(false, Ordering::SeqCst)
                    && kicks
                        .period
                        .is_none_or(|period| last_check_end.is_none_or(|end| end.elapsed() >= period)) =>
            {
                if let (Some(end), Some(monitor)) = (last_check_end, session.monitor.as_mut()) {
                    let gap = end.elapsed();
                    let shortest = &mut monitor.checker.stats.shortest_gap;
                    *shortest = Some(shortest.map_or(gap, |s| s.min(gap)));
                }
                // A consistent point: this vCPU in user code and every other
                // one in user code or idle (none half-way through the kernel).
                let ring3_rip = match (vcpu.get_sregs(), vcpu.get_regs()) {
                    (Ok(sregs), Ok(regs)) if sregs.cs.selector & 3 == 3 => Some(regs.rip),
                    _ => None,
                }
                .filter(|_| aps_quiet(paused.as_ref(), &idle));
                Step::stopped_by(session.kicked(ring3_rip))
            }
            step => step,
        };
        // What the APs forwarded, the starts the kernel asked for, and an AP
        // that stopped the guest.
        let (step, forwarded_event) = forwarded_exits(aps, session, symbols, forwarded, step);
        event_exit |= forwarded_event;
        aps.start(session.cpu_starts.take_pending());
        let step = match (step, aps.stopped()) {
            (Step::Continue, Some(ApStop { cpu, what })) => {
                Step::Stop(GuestExit::UnexpectedExit(format!("vCPU {cpu}: {what}")))
            }
            (step, _) => step,
        };
        // The CPU state, if this exit ran a check.
        let step =
            cpu_check_after_exit(vcpu, paused.as_ref(), session, &mut vcpu_tamper, events_before, step);
        if checks_run(session) != checks_before {
            last_check_end = Some(Instant::now());
        }
        // For the timeline: whether this exit held the guest, and how long.
        let (hold_at, held_before) = match (&session.trace, control) {
            (Some(_), Some(control)) => (session.now(), Some(control.held_time())),
            _ => (Duration::ZERO, None),
        };
        // The debugger's step of this vCPU completed: held here until it
        // resumes the guest.
        let step = match (kernel_stepped, control, step) {
            (true, Some(control), Step::Continue) => {
                if let Err(error) =
                    crate::control::arm_single_step(vcpu, false, &control.hardware_breakpoints())
                {
                    Step::Stop(GuestExit::VcpuError(format!(
                        "single-stepping could not be switched off: {error}"
                    )))
                } else if control.kernel_step_done(vcpu, paused.as_ref(), session) {
                    Step::Stop(GuestExit::Stopped)
                } else {
                    Step::Continue
                }
            }
            (_, _, step) => step,
        };
        // A debug trap (the kernel answered "kill" unless a debugger asked
        // for it): held here until the debugger resumes the guest.
        let step = match (session.debug_trap.take(), control, step) {
            (Some(trap), Some(control), Step::Continue) => {
                match control.debug_trap(&trap, vcpu, paused.as_ref(), session) {
                    Some((action, rip, registers)) => {
                        hypercall::answer_debug_trap(session.ram, trap.gpa, action, rip, registers.as_ref());
                        Step::Continue
                    }
                    None if control.quitting() => Step::Stop(GuestExit::Stopped),
                    None => Step::Continue,
                }
            }
            (_, _, step) => step,
        };
        // The control socket: hold the vCPU here for a query if this is a
        // consistent point, or stop it (`quit`).
        let step = match (step, control) {
            (Step::Continue, Some(control))
                if control.after_exit(
                    vcpu,
                    paused.as_ref(),
                    session,
                    event_exit,
                    aps_quiet(paused.as_ref(), &idle),
                ) =>
            {
                Step::Stop(GuestExit::Stopped)
            }
            (step, _) => step,
        };
        if let (Some(control), Some(before)) = (control, held_before) {
            let held = control.held_time().saturating_sub(before);
            if !held.is_zero() {
                session.trace_held(hold_at, held, "for the control socket or a debugger".into());
            }
        }
        if let Step::Stop(exit) = step {
            break exit;
        }
        // The watchdog fired while the vCPU thread was in the VMM's own code
        // (a hypercall, a check, a control query): its kick did not
        // interrupt `KVM_RUN`, so look at the flag here, after every exit.
        if kicks.stop.load(Ordering::SeqCst) {
            *exits.entry("stopped between exits".to_string()).or_default() += 1;
            break kicks.stopped(session.now());
        }
    };
    session.phases.guest_exit = Some(session.now());
    // Events a batching kernel had not announced when the guest stopped
    // other than by its own shutdown or panic (a timeout, a violation):
    // into the log, which they belong to; nothing checks them any more.
    hypercall::drain_events(session, false);
    let exit = match exit {
        GuestExit::InternalError { .. } => internal_error_details(vcpu),
        other => other,
    };
    if matches!(
        exit,
        GuestExit::Timeout(_)
            | GuestExit::Interrupted { .. }
            | GuestExit::TripleFault
            | GuestExit::UnexpectedExit(_)
    ) && !aps.is_empty()
    {
        // Where a guest that did not finish was, CPU by CPU.
        let paused = aps.pause();
        let mut places = vec![(0, vcpu_place(vcpu, symbols))];
        places.extend(paused.vcpus().map(|(cpu, ap)| (cpu, vcpu_place(&ap, symbols))));
        for (cpu, place) in places {
            session.warn(format!("when the guest stopped, vCPU {cpu} was {place}"));
        }
        // The kernel's big lock (`#[repr(C)]` next, serving, owner, waiters).
        let lock = symbols.address("BIG_LOCK").and_then(|va| {
            let gpa = va.checked_sub(superos_protocol::layout::KERNEL_VMA_BASE)?;
            session.ram.read::<[u32; 4]>(gpa).ok()
        });
        if let Some([next, serving, owner, waiters]) = lock {
            session.warn(format!(
                "the big kernel lock: next ticket {next}, serving {serving}, owner {}, waiters {waiters:#b}",
                if owner == u32::MAX { "none".to_string() } else { format!("CPU {owner}") }
            ));
        }
    }
    let diagnosis = diagnose(vcpu, session, &exit, symbols);
    let final_cpus = final_cpu_states(vcpu, aps, session, &exit, control);
    for (index, exits) in forwarded.iter_mut().enumerate() {
        let interrupted = aps.interrupted(index as u32 + 1);
        if interrupted > 0 {
            *exits.entry("interrupted".to_string()).or_default() += interrupted;
        }
    }
    (exit, all_exits, diagnosis, final_cpus)
}

fn internal_error_details(vcpu: &mut VcpuFd) -> GuestExit {
    let run = vcpu.get_kvm_run();
    // SAFETY: the last exit reason was KVM_EXIT_INTERNAL_ERROR, for which
    // KVM fills the `internal` member of the exit union.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let count = (internal.ndata as usize).min(internal.data.len());
    GuestExit::InternalError { suberror: internal.suberror, data: internal.data[..count].to_vec() }
}

fn diagnose(
    vcpu: &VcpuFd,
    session: &Session<'_>,
    exit: &GuestExit,
    symbols: &KernelSymbols,
) -> Option<Diagnosis> {
    let rip_override = match exit {
        GuestExit::Shutdown { .. }
        | GuestExit::Timeout(_)
        | GuestExit::Interrupted { .. }
        | GuestExit::InvariantViolated { .. }
        | GuestExit::Stopped => return None,
        GuestExit::KernelPanic(report) if report.fault_rip != 0 => Some(report.fault_rip),
        _ => None,
    };
    let regs = vcpu.get_regs().ok()?;
    let sregs = vcpu.get_sregs().ok()?;
    let rip = rip_override.unwrap_or(regs.rip);
    Some(Diagnosis::new(exit.to_string(), rip, &regs, &sregs, session.ram, symbols))
}

/// Matches kernel events to scenario processes. Each spawn of a boot
/// process starts a new run (with a new pid); its exit or kill ends that run.
/// Events for unknown pids, and a second end of the same pid, are ignored.
fn outcomes(scenario: &Scenario, events: &[EventEntry]) -> Vec<ProcessOutcome> {
    let mut outcomes: Vec<ProcessOutcome> = scenario
        .processes
        .iter()
        .map(|p| ProcessOutcome {
            name: p.name.clone(),
            pid: None,
            status: ProcessStatus::Unfinished,
            expected: p.expect,
            preemptions: 0,
            runs_expected: p.runs.max(1),
            runs_finished: 0,
            runs_as_expected: 0,
        })
        .collect();
    // Runs in progress: pid -> scenario index.
    let mut running: BTreeMap<u32, usize> = BTreeMap::new();
    let finish = |outcome: &mut ProcessOutcome, status: ProcessStatus| {
        outcome.status = status;
        outcome.runs_finished = outcome.runs_finished.saturating_add(1);
        if status_matches(outcome.expected, status) {
            outcome.runs_as_expected = outcome.runs_as_expected.saturating_add(1);
        }
    };
    for entry in events {
        match entry.event {
            Event::ProcessSpawned { pid, spec_index, .. } => {
                if let Some(outcome) = outcomes.get_mut(spec_index as usize) {
                    outcome.pid = Some(pid);
                    outcome.status = ProcessStatus::Unfinished;
                    outcome.preemptions = 0;
                    running.insert(pid, spec_index as usize);
                }
            }
            Event::SpawnFailed { spec_index, error } => {
                if let Some(outcome) = outcomes.get_mut(spec_index as usize) {
                    outcome.pid = None;
                    finish(outcome, ProcessStatus::NotStarted(error));
                }
            }
            Event::ProcessExited { pid, code, preemptions } => {
                if let Some(i) = running.remove(&pid) {
                    outcomes[i].preemptions = preemptions;
                    finish(&mut outcomes[i], ProcessStatus::Exited(code));
                }
            }
            Event::ProcessKilled { pid, fault, addr, rip, .. } => {
                if let Some(i) = running.remove(&pid) {
                    finish(&mut outcomes[i], ProcessStatus::Killed { fault, addr, rip });
                }
            }
            Event::KernelReady { .. }
            | Event::GateSelfTestFailed { .. }
            | Event::HypercallRefused { .. }
            | Event::MemMapped { .. }
            | Event::MemUnmapped { .. }
            | Event::MemProtected { .. }
            | Event::QuotaDenied { .. }
            | Event::QuotaPressure { .. }
            | Event::FramePoolLow { .. }
            | Event::KernelShutdown { .. }
            | Event::ShmCreated { .. }
            | Event::ShmGranted { .. }
            | Event::ShmMapped { .. }
            | Event::ShmUnmapped { .. }
            | Event::ShmRevoked { .. }
            | Event::ShmDestroyed { .. }
            | Event::ShmAccepted { .. } => {}
        }
    }
    outcomes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_batches_its_events_only_where_nothing_looks_at_them_during_the_run() {
        let base = RunConfig::new(Scenario::load("hello").unwrap());
        let policy = |check: CheckMode, tamper: bool, api: bool| {
            let mut config = base.clone();
            config.check = check;
            config.tamper = tamper.then(|| crate::monitor::Tamper::new(|_, _, _| false));
            let extras = RunExtras {
                api: api.then(|| crate::api::ApiOptions {
                    socket: "/nonexistent/s".into(),
                    paused: false,
                    linger: false,
                }),
                ..RunExtras::default()
            };
            event_notify_policy(&config, &extras)
        };
        assert_eq!(policy(CheckMode::Exit, false, false), EventNotifyPolicy::Batched);
        assert_eq!(policy(CheckMode::Off, false, false), EventNotifyPolicy::Batched);
        assert_eq!(policy(CheckMode::EveryEvent, false, false), EventNotifyPolicy::EveryEvent);
        assert_eq!(
            policy(CheckMode::Periodic(Duration::from_millis(5)), false, false),
            EventNotifyPolicy::EveryEvent
        );
        assert_eq!(policy(CheckMode::Exit, true, false), EventNotifyPolicy::EveryEvent);
        assert_eq!(policy(CheckMode::Off, false, true), EventNotifyPolicy::EveryEvent);
        let exit_only = RunConfig { check: CheckMode::Exit, ..base.clone() };
        let snapshot =
            RunExtras { snapshot_on_exit: Some("/nonexistent/snapshot".into()), ..RunExtras::default() };
        assert_eq!(event_notify_policy(&exit_only, &snapshot), EventNotifyPolicy::EveryEvent);
    }

    #[test]
    fn exits_are_handled_without_kvm() {
        let ram = GuestRam::new(16).unwrap();
        let mut session = Session::new(&ram, Instant::now(), Echo::Quiet, vec![]);
        let mut exits = BTreeMap::new();
        let shutdown = 0u32.to_le_bytes();
        assert_eq!(
            handle_exit(&mut session, VcpuExit::IoOut(0x505, &shutdown), &mut exits),
            Step::Stop(GuestExit::Shutdown { code: 0 })
        );
        assert_eq!(handle_exit(&mut session, VcpuExit::IoOut(0x80, &[1]), &mut exits), Step::Continue);
        let mut data = [0u8; 2];
        assert_eq!(handle_exit(&mut session, VcpuExit::IoIn(0x60, &mut data), &mut exits), Step::Continue);
        assert_eq!(data, [0xff, 0xff]);
        assert_eq!(
            handle_exit(&mut session, VcpuExit::Shutdown, &mut exits),
            Step::Stop(GuestExit::TripleFault)
        );
        assert_eq!(exits["hypercall shutdown"], 1);
        assert_eq!(exits["io-out (other)"], 1);
        assert_eq!(session.log.len(), 2);
    }

    #[test]
    fn warnings_from_a_flooding_guest_are_bounded() {
        let ram = GuestRam::new(16).unwrap();
        let mut session = Session::new(&ram, Instant::now(), Echo::Quiet, vec![]);
        let mut exits = BTreeMap::new();
        for _ in 0..10_000 {
            handle_exit(&mut session, VcpuExit::IoOut(0x99, &[0]), &mut exits);
        }
        assert_eq!(session.log.len() as u64, crate::session::MAX_WARNINGS);
        assert_eq!(session.warning_count(), 10_000);
    }

    #[test]
    fn outcomes_follow_the_events() {
        let scenario = Scenario::parse(
            "[[process]]\nprogram = \"hello\"\n[[process]]\nprogram = \"hello\"\n\
             [[process]]\nprogram = \"exit-code\"\n\
             [[process]]\nprogram = \"write-code\"\nexpect = { fault = \"write-to-code\" }\n",
            "test.toml",
            std::path::Path::new("."),
        )
        .unwrap();
        let entry = |event| EventEntry { seq: 0, tick: 0, cpu: None, event };
        let events = [
            entry(Event::ProcessSpawned { pid: 1, spec_index: 0, pml4_gpa: 0 }),
            entry(Event::ProcessSpawned { pid: 2, spec_index: 3, pml4_gpa: 0 }),
            entry(Event::SpawnFailed { spec_index: 2, error: Some(SpawnError::OutOfMemory) }),
            entry(Event::ProcessExited { pid: 1, code: 0, preemptions: 2 }),
            entry(Event::ProcessKilled {
                pid: 2,
                fault: Some(FaultKind::WriteToCode),
                addr: 1,
                rip: 2,
                error_code: 7,
                vector: 14,
            }),
        ];
        let result = outcomes(&scenario, &events);
        assert!(result[0].as_expected());
        assert_eq!(result[0].preemptions, 2);
        assert_eq!(result[1].status, ProcessStatus::Unfinished);
        assert_eq!(result[2].status, ProcessStatus::NotStarted(Some(SpawnError::OutOfMemory)));
        assert!(result[3].as_expected());
    }

    #[test]
    fn repeated_runs_are_as_expected_only_if_every_run_is() {
        let scenario = Scenario::parse(
            "[[process]]\nname = \"all-good\"\nprogram = \"hello\"\nruns = 3\n\
             [[process]]\nname = \"one-bad\"\nprogram = \"write-code\"\nruns = 2\n\
             expect = { fault = \"write-to-code\" }\n\
             [[process]]\nname = \"cut-short\"\nprogram = \"hello\"\nruns = 2\n\
             [[process]]\nname = \"no-memory\"\nprogram = \"hello\"\nruns = 2\n\
             [[process]]\nname = \"once\"\nprogram = \"exit-code\"\nexpect = { exit = 3 }\n",
            "test.toml",
            std::path::Path::new("."),
        )
        .unwrap();
        let entry = |seq, event| EventEntry { seq, tick: 0, cpu: None, event };
        let spawned = |pid, spec_index| Event::ProcessSpawned { pid, spec_index, pml4_gpa: 0 };
        let exited = |pid, code| Event::ProcessExited { pid, code, preemptions: u64::from(pid) };
        let killed = |pid| Event::ProcessKilled {
            pid,
            fault: Some(FaultKind::WriteToCode),
            addr: 0x40_0010,
            rip: 0x40_00a2,
            error_code: 7,
            vector: 14,
        };
        let events: Vec<EventEntry> = [
            // all-good: three runs, each exits 0.
            spawned(1, 0),
            exited(1, 0),
            spawned(2, 0),
            exited(2, 0),
            spawned(3, 0),
            exited(3, 0),
            // A second end of a finished pid and an unknown pid change nothing.
            exited(1, 5),
            exited(99, 0),
            // one-bad: the first run exits instead of faulting, the last one
            // faults as expected.
            spawned(4, 1),
            exited(4, 1),
            spawned(5, 1),
            killed(5),
            // cut-short: the guest stops during the second run.
            spawned(6, 2),
            exited(6, 0),
            spawned(7, 2),
            // no-memory: the second run cannot be started.
            spawned(8, 3),
            exited(8, 0),
            Event::SpawnFailed { spec_index: 3, error: Some(SpawnError::OutOfMemory) },
            // once: an ordinary single run.
            spawned(9, 4),
            exited(9, 3),
        ]
        .into_iter()
        .enumerate()
        .map(|(seq, event)| entry(seq as u64, event))
        .collect();
        let result = outcomes(&scenario, &events);
        let counts = |o: &ProcessOutcome| (o.runs_expected, o.runs_finished, o.runs_as_expected);

        let all_good = &result[0];
        assert_eq!(counts(all_good), (3, 3, 3));
        assert_eq!((all_good.pid, all_good.status), (Some(3), ProcessStatus::Exited(0)));
        assert_eq!(all_good.preemptions, 3, "the latest run's");
        assert!(all_good.as_expected());
        assert_eq!(all_good.describe(), "exit 0 (3 of 3 runs as expected)");

        let one_bad = &result[1];
        assert_eq!(counts(one_bad), (2, 2, 1));
        assert_eq!(one_bad.pid, Some(5));
        assert!(matches!(one_bad.status, ProcessStatus::Killed { fault: Some(FaultKind::WriteToCode), .. }));
        assert!(!one_bad.as_expected(), "the latest run matches, the first did not");
        assert_eq!(one_bad.describe(), "killed: write-to-code at 0x400010 (1 of 2 runs as expected)");

        let cut_short = &result[2];
        assert_eq!(counts(cut_short), (2, 1, 1));
        assert_eq!((cut_short.pid, cut_short.status), (Some(7), ProcessStatus::Unfinished));
        assert!(!cut_short.as_expected());
        assert_eq!(cut_short.describe(), "unfinished (1 of 2 runs as expected, 1 finished)");

        let no_memory = &result[3];
        assert_eq!(counts(no_memory), (2, 2, 1));
        assert_eq!(
            (no_memory.pid, no_memory.status),
            (None, ProcessStatus::NotStarted(Some(SpawnError::OutOfMemory)))
        );
        assert!(!no_memory.as_expected());

        let once = &result[4];
        assert_eq!(counts(once), (1, 1, 1));
        assert!(once.as_expected());
        assert_eq!(once.describe(), "exit 3", "a single run shows no run count");
    }

    #[test]
    fn more_runs_than_asked_for_are_not_as_expected() {
        let scenario = Scenario::parse(
            "[[process]]\nprogram = \"hello\"\nruns = 2\n",
            "test.toml",
            std::path::Path::new("."),
        )
        .unwrap();
        let events: Vec<EventEntry> = (1..=3)
            .flat_map(|pid| {
                [
                    Event::ProcessSpawned { pid, spec_index: 0, pml4_gpa: 0 },
                    Event::ProcessExited { pid, code: 0, preemptions: 0 },
                ]
            })
            .map(|event| EventEntry { seq: 0, tick: 0, cpu: None, event })
            .collect();
        let result = outcomes(&scenario, &events[..4]);
        assert!(result[0].as_expected(), "{:?}", result[0]);
        let result = outcomes(&scenario, &events);
        assert_eq!(result[0].runs_finished, 3);
        assert!(!result[0].as_expected(), "a third run is a kernel bug");
        assert_eq!(result[0].describe(), "exit 0 (3 of 2 runs as expected, 3 finished)");
    }

    #[test]
    fn violations_decide_the_exit_status_unless_only_found_at_a_panic() {
        use crate::check::Violation;
        let report = |exit, at_panic: Option<bool>| RunReport {
            exit,
            processes: Vec::new(),
            lines: Vec::new(),
            events: Vec::new(),
            log: Vec::new(),
            lost_events: 0,
            dropped: Default::default(),
            cores: Vec::new(),
            output_errors: Vec::new(),
            stats: RunStats::default(),
            diagnosis: None,
            host: HostFlavor::Kvm,
            violations: at_panic
                .map(|at_panic| ReportedViolation {
                    at: "x".into(),
                    at_panic,
                    violation: Violation::new(Invariant::WXorX, "w+x".into()),
                })
                .into_iter()
                .collect(),
            violations_dropped: 0,
            check_notes: Vec::new(),
        };
        let panic = || {
            GuestExit::KernelPanic(PanicReport {
                message: "boom".into(),
                vector: None,
                error_code: 0,
                fault_rip: 0,
                fault_addr: 0,
            })
        };
        let shutdown = || GuestExit::Shutdown { code: 0 };
        assert_eq!(report(shutdown(), None).exit_status(), EXIT_OK);
        assert_eq!(report(shutdown(), Some(false)).exit_status(), EXIT_INVARIANT_VIOLATED);
        assert_eq!(report(GuestExit::TripleFault, Some(false)).exit_status(), EXIT_INVARIANT_VIOLATED);
        assert_eq!(report(panic(), Some(true)).exit_status(), EXIT_GUEST_CRASH);
        let stopped =
            GuestExit::InvariantViolated { at: "event #3".into(), invariants: vec![Invariant::WXorX] };
        assert_eq!(stopped.to_string(), "stopped at event #3: invariant violated (w-xor-x)");
        assert_eq!(report(stopped, Some(false)).exit_status(), EXIT_INVARIANT_VIOLATED);
    }

    #[test]
    fn output_of_collects_every_run() {
        let scenario = Scenario::parse(
            "[[process]]\nname = \"rep\"\nprogram = \"hello\"\nruns = 2\n\
             [[process]]\nname = \"other\"\nprogram = \"hello\"\n",
            "test.toml",
            std::path::Path::new("."),
        )
        .unwrap();
        let events: Vec<EventEntry> = [(1, 0), (2, 1), (3, 0)]
            .into_iter()
            .map(|(pid, spec_index)| EventEntry {
                seq: 0,
                tick: 0,
                cpu: None,
                event: Event::ProcessSpawned { pid, spec_index, pml4_gpa: 0 },
            })
            .collect();
        let line = |pid: u32, text: &str| ConsoleLine { pid, text: text.to_string() };
        let report = RunReport {
            exit: GuestExit::Shutdown { code: 0 },
            processes: outcomes(&scenario, &events),
            lines: vec![line(1, "first run"), line(2, "other"), line(0, "kernel"), line(3, "second run")],
            events,
            log: Vec::new(),
            lost_events: 0,
            dropped: Default::default(),
            cores: Vec::new(),
            output_errors: Vec::new(),
            stats: RunStats::default(),
            diagnosis: None,
            host: HostFlavor::Kvm,
            violations: Vec::new(),
            violations_dropped: 0,
            check_notes: Vec::new(),
        };
        assert_eq!(report.output_of("rep"), vec!["first run", "second run"]);
        assert_eq!(report.output_of("other"), vec!["other"]);
        assert!(report.output_of("nobody").is_empty());
        assert_eq!(report.process("rep").unwrap().pid, Some(3));
    }
}
