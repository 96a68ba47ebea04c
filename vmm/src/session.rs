//! The VMM-side state of one guest run: console, events, VMM log, boot
//! phases. Hypercall handlers update it; the run loop turns it into a
//! [`crate::run::RunReport`].

use crate::console::{Console, ConsoleLine};
use crate::events::EventRing;
use crate::memory::GuestRam;
use crate::monitor::{KernelWrite, Monitor, Stop, Trigger};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use superos_protocol::event::{Event, EventRecord};
use superos_protocol::hypercall::BootHelloParams;

/// Prints one line on stdout. A write error (a full disk, a closed pipe)
/// does not stop the VM, but it is remembered ([`output_failed`]): the
/// command then exits non-zero.
pub fn emit(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if writeln!(std::io::stdout().lock(), "{line}").is_err() {
        note_output_failure();
    }
}

static OUTPUT_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Remembers that some requested output (stdout, a file) could not be
/// written.
pub fn note_output_failure() {
    OUTPUT_FAILED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// True if [`emit`] (or anyone calling [`note_output_failure`]) failed to
/// write output in this process.
pub fn output_failed() -> bool {
    OUTPUT_FAILED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Warnings stored per run; later ones are only counted.
pub const MAX_WARNINGS: u64 = 100;

/// Events stored per run; later ones are counted ([`Dropped::events`]),
/// not stored, not checked, not matched to processes (at roughly 64 bytes
/// each, 6.4 MB at most).
pub const MAX_EVENTS: usize = 100_000;

/// Console bytes stored per run (line text plus the per-line overhead);
/// later lines are counted ([`Dropped::console_bytes`]), not stored.
pub const MAX_CONSOLE_BYTES: u64 = 16 << 20;

/// The caps a run stores up to ([`MAX_EVENTS`], [`MAX_CONSOLE_BYTES`] by
/// default; tests lower them to reach them quickly).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Events stored.
    pub events: usize,
    /// Console bytes stored (text plus per-line overhead).
    pub console_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { events: MAX_EVENTS, console_bytes: MAX_CONSOLE_BYTES }
    }
}

/// What the VMM refused to store to keep its memory bounded (see
/// `docs/ARCHITECTURE.md`, "The VMM's memory bound"): counted, reported,
/// never silent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Events beyond [`MAX_EVENTS`].
    pub events: u64,
    /// Console bytes beyond [`MAX_CONSOLE_BYTES`].
    pub console_bytes: u64,
    /// Warnings beyond [`MAX_WARNINGS`].
    pub warnings: u64,
}

impl Dropped {
    /// True if nothing was dropped.
    pub fn is_empty(&self) -> bool {
        *self == Dropped::default()
    }
}

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} events / {} console bytes / {} warnings dropped (the VMM keeps a bounded number of each)",
            self.events, self.console_bytes, self.warnings
        )
    }
}

/// An event as received, with its ring metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventEntry {
    /// Sequence number assigned by the kernel.
    pub seq: u64,
    /// Timer tick at which it happened.
    pub tick: u64,
    /// The CPU that logged it, on a VM with several (`None` on one).
    pub cpu: Option<u32>,
    /// The decoded event.
    pub event: Event,
}

/// Milestones of a run, measured from VMM start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Phases {
    /// The vCPU was about to run its first instruction.
    pub vcpu_start: Option<Duration>,
    /// The kernel's first hypercall (boot hello).
    pub kernel_entry: Option<Duration>,
    /// The kernel was about to run the first scenario process.
    pub first_user_instruction: Option<Duration>,
    /// The guest stopped.
    pub guest_exit: Option<Duration>,
}

/// Live-output settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Echo {
    /// Print console lines and events as they arrive.
    Live,
    /// Print nothing (tests, scripts using the report).
    Quiet,
}

/// How live events and console lines are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EventFormat {
    /// `  event #N   tick T     <description>`, for people.
    #[default]
    Text,
    /// One JSON object per event and console line (see
    /// [`crate::event_json`]), for programs.
    Json,
}

impl EventFormat {
    /// The line printed for `entry` in this format (without a newline).
    pub fn line(self, entry: &EventEntry) -> String {
        match self {
            EventFormat::Text => match entry.cpu {
                Some(cpu) => {
                    format!("  event #{:<3} tick {:<5} cpu {cpu} {}", entry.seq, entry.tick, entry.event)
                }
                None => format!("  event #{:<3} tick {:<5} {}", entry.seq, entry.tick, entry.event),
            },
            EventFormat::Json => crate::event_json::to_line(entry),
        }
    }
}

/// State of one run.
pub struct Session<'a> {
    /// Guest RAM.
    pub ram: &'a GuestRam,
    /// When the VMM started (phases are relative to it).
    pub started: Instant,
    /// Where the phases are.
    pub phases: Phases,
    /// Complete console lines, in order.
    pub lines: Vec<ConsoleLine>,
    /// Events, in order.
    pub events: Vec<EventEntry>,
    /// Problems the VMM noticed about the guest (bad hypercalls etc.).
    pub log: Vec<String>,
    /// Records the kernel reported lost.
    pub lost_events: u64,
    /// Kernel text range announced at boot (gpa, len).
    pub kernel_text: Option<(u64, u64)>,
    /// The boot hello the VMM accepted (event ring, kernel text,
    /// introspection root), for introspection and snapshots.
    pub hello: Option<BootHelloParams>,
    /// The invariant checker's state (`None`: no checks and no tamper hook).
    pub monitor: Option<Monitor>,
    /// The kernel's text and read-only data (`[start, end)`, physical),
    /// registered as a read-only memory slot: guest writes there arrive as
    /// MMIO writes and are reported, not ignored.
    pub read_only: Option<(u64, u64)>,
    warnings: u64,
    /// The kernel's requests to start application processors.
    pub cpu_starts: crate::aps::CpuStarts,
    /// A debug trap the kernel reported in the exit being handled (answered
    /// "kill" until a debugger says otherwise).
    pub debug_trap: Option<crate::hypercall::DebugTrap>,
    /// Boot hellos accepted or refused as a second one (not counting
    /// those refused for a bad version or ring before the first).
    pub hellos: u64,
    /// What was dropped to keep the VMM's memory bounded.
    pub dropped: Dropped,
    limits: Limits,
    console_bytes: u64,
    pub(crate) console: Console,
    pub(crate) ring: Option<EventRing>,
    /// The kernel's trace ring, once it announced it (`run --trace`).
    pub(crate) trace_ring: Option<crate::events::TraceRing>,
    echo: Echo,
    event_format: EventFormat,
    process_names: Vec<String>,
    pid_names: BTreeMap<u32, String>,
    /// Where core files of killed processes go (`run --core-dir`).
    core_dir: Option<std::path::PathBuf>,
    /// The run's timeline (`run --trace`), if one is kept.
    pub trace: Option<crate::trace::Trace>,
    /// The core files written.
    pub cores: Vec<std::path::PathBuf>,
    /// Their bytes, against [`crate::core_dump::max_core_bytes`].
    core_bytes: u64,
    /// Whether the warning that the run's cores reached their limit was given.
    cores_capped: bool,
}

impl<'a> Session<'a> {
    /// A new session; `process_names` are the scenario's names by boot index.
    pub fn new(ram: &'a GuestRam, started: Instant, echo: Echo, process_names: Vec<String>) -> Self {
        Session {
            ram,
            started,
            phases: Phases::default(),
            lines: Vec::new(),
            events: Vec::new(),
            log: Vec::new(),
            lost_events: 0,
            kernel_text: None,
            hello: None,
            monitor: None,
            read_only: None,
            warnings: 0,
            cpu_starts: Default::default(),
            debug_trap: None,
            hellos: 0,
            dropped: Dropped::default(),
            limits: Limits::default(),
            console_bytes: 0,
            console: Console::default(),
            ring: None,
            trace_ring: None,
            echo,
            event_format: EventFormat::Text,
            process_names,
            pid_names: BTreeMap::new(),
            core_dir: None,
            trace: None,
            cores: Vec::new(),
            core_bytes: 0,
            cores_capped: false,
        }
    }

    /// The name of each process spawned so far, by pid.
    pub fn pid_names(&self) -> &BTreeMap<u32, String> {
        &self.pid_names
    }

    /// Keeps the run's timeline (`run --trace`) when given the guest's TSC
    /// frequency (kHz, 0 if unknown: [`crate::trace::TscClock`]).
    pub fn with_trace(mut self, tsc_khz: Option<u64>) -> Self {
        self.trace = tsc_khz.map(crate::trace::Trace::new);
        self
    }

    /// Notes a VM exit of vCPU `cpu` in the timeline (if one is kept).
    pub fn trace_exit(&mut self, cpu: u32, kind: &str) {
        let started = self.started;
        if let Some(trace) = &mut self.trace {
            trace.push(crate::trace::Record::Exit { at: started.elapsed(), cpu, kind: kind.to_string() });
        }
    }

    /// Notes that the guest was held from `at` for `took` (if a timeline is
    /// kept).
    pub fn trace_held(&mut self, at: Duration, took: Duration, point: String) {
        if let Some(trace) = &mut self.trace {
            trace.push(crate::trace::Record::Held { at, took, point });
        }
    }

    /// Checks run and violations found so far (for the timeline).
    fn check_counts(&self) -> (u64, usize) {
        self.monitor.as_ref().map_or((0, 0), |m| (m.checker.stats.checks, m.violations.len()))
    }

    /// Notes the check that ran since `at`, when the counts were `before`,
    /// if one did (and a timeline is kept).
    fn trace_check(&mut self, at: Duration, before: (u64, usize), trigger: &str) {
        let after = self.check_counts();
        let took = self.now().saturating_sub(at);
        if let (Some(trace), true) = (&mut self.trace, after.0 > before.0) {
            trace.push(crate::trace::Record::Check {
                at,
                took,
                trigger: trigger.to_string(),
                violations: after.1.saturating_sub(before.1),
            });
        }
    }

    /// Writes a core file into `dir` for every process the kernel kills
    /// ([`crate::core_dump`]); the kernel must notify every event.
    pub fn with_core_dir(mut self, dir: Option<std::path::PathBuf>) -> Self {
        self.core_dir = dir;
        self
    }

    /// Prints live events (with [`Echo::Live`]) in `format` instead of text.
    pub fn with_event_format(mut self, format: EventFormat) -> Self {
        self.event_format = format;
        self
    }

    /// Stores at most `limits` (see [`Limits`]).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Checks invariants during the run with `monitor`.
    pub fn with_monitor(mut self, monitor: Monitor) -> Self {
        self.monitor = Some(monitor);
        self
    }

    /// Guest RAM `[start, end)` is a read-only memory slot (the kernel's
    /// text and read-only data).
    pub fn with_read_only(mut self, range: Option<(u64, u64)>) -> Self {
        self.read_only = range;
        self
    }

    /// True if `gpa` lies in the read-only memory slot.
    pub fn in_read_only(&self, gpa: u64) -> bool {
        self.read_only.is_some_and(|(start, end)| gpa >= start && gpa < end)
    }

    /// The guest wrote into the read-only slot (KVM refused the write):
    /// reported as a `kernel-text-unchanged` violation. `Some` if the guest
    /// must stop.
    pub fn read_only_write(
        &mut self,
        gpa: u64,
        bytes: &[u8],
        rip: Option<u64>,
        symbol: Option<String>,
    ) -> Option<Stop> {
        let range = self.read_only?;
        let write = KernelWrite { gpa, bytes: bytes.to_vec(), range, rip, symbol };
        let Some(monitor) = self.monitor.as_mut() else {
            self.warn(format!("ignored: {write}"));
            return None;
        };
        let reported = monitor.violations.len();
        let stop = monitor.read_only_write(&write);
        self.echo_violations(reported);
        stop
    }

    /// The kernel's boot hello number [`Session::hellos`] (see
    /// [`Monitor::boot_hello`]). `Some` if the guest must stop.
    pub fn boot_hello_checked(&mut self, text: Option<(u64, u64)>, root_gpa: u64) -> Option<Stop> {
        let (ram, count) = (self.ram, self.hellos);
        let reported = self.monitor.as_ref()?.violations.len();
        let stop = self.monitor.as_mut()?.boot_hello(ram, count, text, root_gpa);
        self.echo_violations(reported);
        stop
    }

    /// Runs the tamper hook and the checks due after `new` events were
    /// drained. `Some` if the guest must stop.
    pub fn after_events(&mut self, new: usize) -> Option<Stop> {
        let (at, before) = (self.now(), self.check_counts());
        let ram = self.ram;
        let reported = self.monitor.as_ref()?.violations.len();
        let stop = self.monitor.as_mut()?.after_events(ram, &self.events, new);
        self.echo_violations(reported);
        self.trace_check(at, before, "at a kernel event");
        stop
    }

    /// The last check, at shutdown (`shutdown`) or at a kernel panic.
    pub fn check_at_end(&mut self, shutdown: bool) -> Option<Stop> {
        let (at, before) = (self.now(), self.check_counts());
        let ram = self.ram;
        let reported = self.monitor.as_ref()?.violations.len();
        let stop = self.monitor.as_mut()?.at_end(ram, &self.events, shutdown);
        self.echo_violations(reported);
        self.trace_check(at, before, "at the end");
        stop
    }

    /// A periodic kick found the vCPU stopped; `ring3_rip` is its RIP if it
    /// was running user code.
    pub fn kicked(&mut self, ring3_rip: Option<u64>) -> Option<Stop> {
        let (at, before) = (self.now(), self.check_counts());
        let ram = self.ram;
        let reported = self.monitor.as_ref()?.violations.len();
        let stop = self.monitor.as_mut()?.kicked(ram, &self.events, ring3_rip);
        self.echo_violations(reported);
        self.trace_check(at, before, "periodic");
        stop
    }

    /// The trigger of the check that ran at this exit, if the vCPU's state
    /// is still to be checked for it.
    pub fn cpu_check_due(&mut self) -> Option<Trigger> {
        self.monitor.as_mut()?.take_cpu_due()
    }

    /// Checks vCPU `cpu`'s `state`, read in `read_time` right after the exit
    /// whose check was `trigger` (`cpu-state-intact`). `Some` if the guest
    /// must stop.
    pub fn check_cpu(
        &mut self,
        trigger: Trigger,
        cpu: u32,
        state: crate::cpu::CpuState,
        read_time: Duration,
    ) -> Option<Stop> {
        let ram = self.ram;
        let reported = self.monitor.as_ref()?.violations.len();
        let stop = self.monitor.as_mut()?.check_cpu(ram, trigger, cpu, state, read_time);
        self.echo_violations(reported);
        stop
    }

    /// Runs one check now, whatever the mode.
    pub fn check_now(&mut self, trigger: Trigger) -> Option<Stop> {
        let (at, before) = (self.now(), self.check_counts());
        let ram = self.ram;
        let reported = self.monitor.as_ref()?.violations.len();
        let stop = self.monitor.as_mut()?.check(ram, trigger);
        self.echo_violations(reported);
        self.trace_check(at, before, "on request");
        stop
    }

    /// Prints the violations found since there were `reported` (live runs).
    fn echo_violations(&self, reported: usize) {
        let Some(monitor) = &self.monitor else { return };
        if self.echo == Echo::Live {
            use std::io::Write;
            let mut stderr = std::io::stderr().lock();
            for found in monitor.violations.iter().skip(reported) {
                let _ = writeln!(stderr, "superos-vmm: INVARIANT VIOLATED {found}");
            }
        }
    }

    /// Time since VMM start.
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Notes a problem with the guest's behaviour. After
    /// [`MAX_WARNINGS`] the rest are counted, not stored, so a guest that
    /// floods bad hypercalls cannot exhaust host memory.
    pub fn warn(&mut self, message: String) {
        self.warnings += 1;
        if self.warnings > MAX_WARNINGS {
            self.dropped.warnings += 1;
            return;
        }
        let message = if self.warnings == MAX_WARNINGS {
            format!("{message} (further warnings are counted but not shown)")
        } else {
            message
        };
        if self.echo == Echo::Live {
            use std::io::Write;
            let _ = writeln!(std::io::stderr().lock(), "superos-vmm: {message}");
        }
        self.log.push(message);
    }

    /// Warnings raised, including suppressed ones.
    pub fn warning_count(&self) -> u64 {
        self.warnings
    }

    /// The label of a console source.
    pub fn label(&self, pid: u32) -> String {
        match (pid, self.pid_names.get(&pid)) {
            (0, _) => "kernel".to_string(),
            (_, Some(name)) => format!("{name}#{pid}"),
            (_, None) => format!("pid {pid}"),
        }
    }

    /// Records console lines.
    pub fn add_lines(&mut self, lines: Vec<ConsoleLine>) {
        for line in lines {
            if self.echo == Echo::Live {
                match self.event_format {
                    EventFormat::Text => emit(format_args!("[{}] {}", self.label(line.pid), line.text)),
                    EventFormat::Json => emit(format_args!(
                        "{}",
                        crate::event_json::console_line(line.pid, &self.label(line.pid), &line.text)
                    )),
                }
            }
            let cost = (line.text.len() + std::mem::size_of::<ConsoleLine>()) as u64;
            if self.console_bytes + cost > self.limits.console_bytes {
                // +1: the line's newline (or cut) counts as a byte written.
                self.dropped.console_bytes += line.text.len() as u64 + 1;
                continue;
            }
            self.console_bytes += cost;
            self.lines.push(line);
        }
    }

    /// Records a drained event record.
    pub fn add_record(&mut self, record: EventRecord) {
        if self.events.len() >= self.limits.events {
            self.dropped.events += 1;
            return;
        }
        match record.decode() {
            Ok(event) => {
                if let Event::ProcessSpawned { pid, spec_index, .. } = event {
                    let name =
                        self.process_names.get(spec_index as usize).cloned().unwrap_or_else(|| "?".into());
                    self.pid_names.insert(pid, name);
                }
                let cpu = (self.cpu_starts.cpus() > 1).then_some(u32::from(record.cpu));
                let entry = EventEntry { seq: record.seq, tick: record.tick, cpu, event };
                if self.echo == Echo::Live {
                    emit(format_args!("{}", self.event_format.line(&entry)));
                }
                if let (Event::ProcessKilled { pid, fault, .. }, Some(_)) = (&entry.event, &self.core_dir) {
                    let line = EventFormat::Text.line(&entry);
                    self.dump_core(*pid, *fault, line);
                }
                if let Some(trace) = &mut self.trace {
                    trace.push(crate::trace::Record::Event { at: self.started.elapsed(), entry });
                }
                self.events.push(entry);
            }
            Err(unknown) => self.warn(format!("event #{} has unknown kind {}", record.seq, unknown.0)),
        }
    }

    /// The core file of process `pid`, killed for `fault` (its event `line`),
    /// from the registers the kernel published for it and its page tables,
    /// still whole at its event. What goes wrong is a warning: the run goes
    /// on without that core.
    fn dump_core(&mut self, pid: u32, fault: Option<superos_protocol::event::FaultKind>, line: String) {
        let Some(dir) = self.core_dir.clone() else { return };
        let byte_limit = crate::core_dump::max_core_bytes(self.ram.size());
        if self.cores.len() >= crate::core_dump::MAX_CORES || self.core_bytes >= byte_limit {
            if !std::mem::replace(&mut self.cores_capped, true) {
                self.warn(format!(
                    "no more core files (pid {pid} and after): {} files, {} bytes written; one run writes at most {} files or {byte_limit} bytes",
                    self.cores.len(),
                    self.core_bytes,
                    crate::core_dump::MAX_CORES
                ));
            }
            return;
        }
        let name = self.pid_names.get(&pid).cloned().unwrap_or_else(|| "process".to_string());
        let result = (|| {
            let root_gpa = self.hello.as_ref().ok_or("no boot hello yet")?.introspection_root_gpa;
            let root: superos_protocol::introspect::IntrospectionRoot =
                self.ram.read(root_gpa).map_err(|e| format!("the introspection root: {e}"))?;
            let regs = root.last_fault;
            if regs.pid != pid {
                return Err(format!("the kernel published the registers of pid {}, not {pid}", regs.pid));
            }
            let process =
                crate::core_dump::CoreProcess { name: &name, regs, fault, event: line, live: false };
            let bytes = crate::core_dump::core_file(self.ram, &process)?;
            if self.core_bytes + bytes.len() as u64 > byte_limit {
                return Err(format!(
                    "its {} bytes would take the run's core files past {byte_limit} bytes",
                    bytes.len()
                ));
            }
            self.core_bytes += bytes.len() as u64;
            let path = dir.join(format!("{}.{pid}.core", crate::core_dump::file_stem(&name)));
            std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok::<_, String>(path)
        })();
        match result {
            Ok(path) => {
                tracing::info!(pid, path = %path.display(), "core file written");
                self.cores.push(path);
            }
            Err(error) => self.warn(format!("no core file for pid {pid} ({name}): {error}")),
        }
    }

    /// Flushes unterminated console lines at the end of a run.
    pub fn finish_console(&mut self) {
        let lines = self.console.flush();
        self.add_lines(lines);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use superos_protocol::event::FaultKind;

    #[test]
    fn events_are_formatted_as_text_or_json() {
        let entry = EventEntry {
            seq: 7,
            tick: 4,
            cpu: None,
            event: Event::ProcessKilled {
                pid: 4,
                fault: Some(FaultKind::WriteToCode),
                addr: 0x40_0010,
                rip: 0x40_00a2,
                error_code: 7,
                vector: 14,
            },
        };
        assert_eq!(
            EventFormat::Text.line(&entry),
            "  event #7   tick 4     pid 4 killed: write-to-code at 0x400010 (rip 0x4000a2, vector 14, error 0x7)"
        );
        let json: serde_json::Value = serde_json::from_str(&EventFormat::Json.line(&entry)).unwrap();
        assert_eq!(json["kind"], "process-killed");
        assert_eq!(json["fault"], "write-to-code");
        assert_eq!(json["seq"], 7);
        assert_eq!(EventFormat::default(), EventFormat::Text);
    }

    #[test]
    fn writes_into_the_read_only_slot_are_reported_through_the_monitor() {
        use crate::check::{CheckMode, Invariant};
        let ram = GuestRam::new(16).unwrap();
        let mut session = Session::new(&ram, Instant::now(), Echo::Quiet, vec![])
            .with_read_only(Some((0x10_0000, 0x11_4000)))
            .with_monitor(Monitor::new(CheckMode::Off, false, None, vec![]));
        assert!(session.in_read_only(0x10_0000) && session.in_read_only(0x11_3fff));
        assert!(!session.in_read_only(0xf_ffff) && !session.in_read_only(0x11_4000));
        let stop = session.read_only_write(0x10_0000, &[0xcc], Some(0x1234), None).expect("a stop");
        assert_eq!(stop.invariants, [Invariant::KernelTextUnchanged]);
        // Without a monitor it is at least logged; without a slot, nothing.
        let mut bare =
            Session::new(&ram, Instant::now(), Echo::Quiet, vec![]).with_read_only(Some((0, 0x1000)));
        assert_eq!(bare.read_only_write(0, &[1], None, None), None);
        assert!(bare.log[0].contains("the write was refused"), "{:?}", bare.log);
        let mut none = Session::new(&ram, Instant::now(), Echo::Quiet, vec![]);
        assert!(!none.in_read_only(0));
        assert_eq!(none.read_only_write(0, &[1], None, None), None);
        assert!(none.log.is_empty());
    }

    #[test]
    fn events_console_and_warnings_are_bounded_and_drops_counted() {
        let ram = GuestRam::new(16).unwrap();
        let mut session = Session::new(&ram, Instant::now(), Echo::Quiet, vec![]);
        let record = Event::HypercallRefused { port: 1, status: 2 }.encode();
        for _ in 0..MAX_EVENTS + 10 {
            session.add_record(record);
        }
        assert_eq!(session.events.len(), MAX_EVENTS);
        assert_eq!(session.dropped.events, 10);
        let line = "x".repeat(4096);
        let lines = (MAX_CONSOLE_BYTES / 4096 + 100) as usize;
        for _ in 0..lines {
            session.add_lines(vec![ConsoleLine { pid: 7, text: line.clone() }]);
        }
        let kept: u64 = session.lines.iter().map(|l| l.text.len() as u64).sum();
        assert!(kept <= MAX_CONSOLE_BYTES, "{kept}");
        assert!(session.dropped.console_bytes >= 100 * 4097, "{:?}", session.dropped);
        assert_eq!(
            kept + session.dropped.console_bytes - (lines - session.lines.len()) as u64,
            lines as u64 * 4096
        );
        for i in 0..MAX_WARNINGS + 5 {
            session.warn(format!("w{i}"));
        }
        assert_eq!(session.log.len() as u64, MAX_WARNINGS);
        assert_eq!(session.dropped.warnings, 5);
        let text = session.dropped.to_string();
        assert!(text.starts_with("10 events / "), "{text}");
        assert!(text.contains(" console bytes / 5 warnings dropped"), "{text}");
    }

    #[test]
    fn records_are_kept_whatever_the_format() {
        let ram = GuestRam::new(16).unwrap();
        let mut session = Session::new(&ram, Instant::now(), Echo::Quiet, vec!["a".into()])
            .with_event_format(EventFormat::Json);
        let mut record = Event::ProcessSpawned { pid: 9, spec_index: 0, pml4_gpa: 0x1000 }.encode();
        record.seq = 3;
        session.add_record(record);
        session.add_record(EventRecord { kind: 999, ..Default::default() });
        assert_eq!(session.events.len(), 1);
        assert_eq!(session.events[0].seq, 3);
        assert_eq!(session.label(9), "a#9");
        assert!(session.log[0].contains("unknown kind 999"), "{:?}", session.log);
    }
}
