//! When the invariant checker ([`crate::check`]) runs during a guest run,
//! and what becomes of what it finds.
//!
//! [`CheckMode::EveryEvent`] checks inside every `EventNotify`, `Shutdown`
//! and `Panic` hypercall: the vCPU is stopped there and the kernel has made
//! its tables consistent before logging the event. [`CheckMode::Periodic`]
//! checks when the watchdog's kick finds the vCPU in ring 3 (the kernel is
//! not in the middle of anything), or at the next event if it was in ring 0.
//! [`CheckMode::Exit`] checks once, at shutdown.
//!
//! A violation stops the guest ([`crate::hypercall::Flow::InvariantViolated`])
//! unless `keep_going` is set; either way it goes into the report, once per
//! distinct finding.
//!
//! Every check also asks for the vCPU's state to be compared with the CPU
//! design (`cpu-state-intact`, [`crate::cpu`]): the memory checks run inside
//! the hypercall handler, which has no vCPU, so the run loop reads the vCPU
//! right after the exit ([`Monitor::take_cpu_due`]) and hands it to
//! [`Monitor::check_cpu`] with the same trigger.
//!
//! [`Tamper`] is a test and diagnostic hook: a callback that may corrupt the
//! guest from outside at an event, right before the check, to show that the
//! checker catches what it claims to; [`VcpuTamper`] does the same to the
//! vCPU's registers, before the CPU-state check.

use crate::check::{CheckMode, CheckOutcome, Checker, Invariant, KernelImage, Violation};
use crate::cpu::{CpuCapture, CpuState};
use crate::introspect::KernelView;
use crate::memory::GuestRam;
use crate::session::EventEntry;
use kvm_ioctls::VcpuFd;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use superos_protocol::layout::PAGE_SIZE;

/// The callback behind [`Tamper`]: called with guest RAM, the kernel's view
/// and the event just drained; returns true once it has tampered (it is not
/// called again after that).
pub type TamperFn = dyn FnMut(&GuestRam, &KernelView, &EventEntry) -> bool + Send;

/// A test/diagnostic hook that corrupts the running guest on purpose, at an
/// event, before that event's check. Not for production use.
#[derive(Clone)]
pub struct Tamper(Arc<Mutex<Box<TamperFn>>>);

impl Tamper {
    /// Wraps a callback.
    pub fn new(callback: impl FnMut(&GuestRam, &KernelView, &EventEntry) -> bool + Send + 'static) -> Tamper {
        Tamper(Arc::new(Mutex::new(Box::new(callback))))
    }

    fn call(&self, ram: &GuestRam, view: &KernelView, entry: &EventEntry) -> bool {
        match self.0.lock() {
            Ok(mut callback) => callback(ram, view, entry),
            Err(_) => true,
        }
    }
}

impl std::fmt::Debug for Tamper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tamper(..)")
    }
}

/// The callback behind [`VcpuTamper`]: called with the vCPU, guest RAM and
/// each event just drained; returns true once it has tampered (it is not
/// called again after that).
pub type VcpuTamperFn = dyn FnMut(&VcpuFd, &GuestRam, &EventEntry) -> bool + Send;

/// A test/diagnostic hook that changes the vCPU's state on purpose (MSRs,
/// control registers, XCR0, debug registers: see [`crate::cpu::tamper`])
/// at an event, before that event's CPU-state check. Not for production
/// use.
#[derive(Clone)]
pub struct VcpuTamper {
    cpu: u32,
    callback: Arc<Mutex<Box<VcpuTamperFn>>>,
}

impl VcpuTamper {
    /// Wraps a callback that changes CPU 0.
    pub fn new(callback: impl FnMut(&VcpuFd, &GuestRam, &EventEntry) -> bool + Send + 'static) -> VcpuTamper {
        VcpuTamper::on_cpu(0, callback)
    }

    /// Wraps a callback that changes vCPU `cpu` (an application processor
    /// is paused while it runs).
    pub fn on_cpu(
        cpu: u32,
        callback: impl FnMut(&VcpuFd, &GuestRam, &EventEntry) -> bool + Send + 'static,
    ) -> VcpuTamper {
        VcpuTamper { cpu, callback: Arc::new(Mutex::new(Box::new(callback))) }
    }

    /// The vCPU it changes.
    pub fn cpu(&self) -> u32 {
        self.cpu
    }

    /// Calls the hook; true once it has tampered.
    pub fn call(&self, vcpu: &VcpuFd, ram: &GuestRam, entry: &EventEntry) -> bool {
        match self.callback.lock() {
            Ok(mut callback) => callback(vcpu, ram, entry),
            Err(_) => true,
        }
    }
}

impl std::fmt::Debug for VcpuTamper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VcpuTamper(..)")
    }
}

/// Why a check ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// At the kernel event with this sequence number.
    Event(u64),
    /// At the shutdown hypercall.
    Shutdown,
    /// At the panic hypercall.
    Panic,
    /// A periodic kick found the vCPU in ring 3 at this RIP.
    Ring3(u64),
    /// The guest wrote into the read-only kernel image at this address
    /// (not a check: KVM refused the write and the VMM reports it).
    ReadOnlyWrite(u64),
    /// The kernel's boot hello (the first, or a refused later one: its
    /// number, from 1).
    BootHello(u64),
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trigger::Event(seq) => write!(f, "event #{seq}"),
            Trigger::Shutdown => f.write_str("shutdown"),
            Trigger::Panic => f.write_str("the kernel panic"),
            Trigger::Ring3(rip) => write!(f, "a periodic check (ring 3, rip {rip:#x})"),
            Trigger::ReadOnlyWrite(gpa) => write!(f, "a write to the read-only kernel image at {gpa:#x}"),
            Trigger::BootHello(n) => write!(f, "boot hello #{n}"),
        }
    }
}

/// A guest write that KVM refused because it fell into the read-only
/// memory slot holding the kernel's text and read-only data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelWrite {
    /// Guest-physical address written.
    pub gpa: u64,
    /// The bytes the guest tried to write.
    pub bytes: Vec<u8>,
    /// The read-only range (`[start, end)`).
    pub range: (u64, u64),
    /// The vCPU's RIP after the exit, if the registers could be read. KVM
    /// completes an emulated MMIO write before it exits (the instruction
    /// has retired), so this is the instruction after the writing one, on
    /// ordinary KVM and on the PVM host alike.
    pub rip: Option<u64>,
    /// The kernel function `rip` falls in, `symbol+0xoffset`.
    pub symbol: Option<String>,
}

impl std::fmt::Display for KernelWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes: Vec<String> = self.bytes.iter().take(16).map(|b| format!("{b:02x}")).collect();
        write!(
            f,
            "the guest wrote {} byte{} ({}) at {:#x}, inside the read-only kernel text and rodata {:#x}..{:#x}; the write was refused (read-only memory slot)",
            self.bytes.len(),
            if self.bytes.len() == 1 { "" } else { "s" },
            bytes.join(" "),
            self.gpa,
            self.range.0,
            self.range.1
        )?;
        match (self.rip, &self.symbol) {
            (Some(rip), Some(symbol)) => write!(f, ", by the instruction before rip {rip:#x} ({symbol})"),
            (Some(rip), None) => write!(f, ", by the instruction before rip {rip:#x}"),
            (None, _) => f.write_str(", from an unknown rip"),
        }
    }
}

/// A violation as the report keeps it: what, and when first seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportedViolation {
    /// The check that found it first.
    pub at: String,
    /// Found only by the check at a kernel panic, when the kernel may have
    /// been half-way through changing its tables: listed, but the panic is
    /// what the run's exit status reports.
    pub at_panic: bool,
    /// The violation.
    pub violation: Violation,
}

impl std::fmt::Display for ReportedViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at {}: {}", self.at, self.violation)?;
        if self.at_panic {
            f.write_str(" (found at the panic: the kernel may have been mid-update)")?;
        }
        Ok(())
    }
}

/// Distinct violations kept per run; later ones are counted.
pub const MAX_REPORTED: usize = 1000;

/// Notes kept per run (later ones are dropped: they only repeat a kind of
/// note with other details).
pub const MAX_NOTES: usize = 64;

/// What a check decided for the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stop {
    /// The check that found the violations.
    pub at: String,
    /// The invariants violated, in order, without repeats.
    pub invariants: Vec<Invariant>,
}

/// The checking state of a run.
#[derive(Debug)]
pub struct Monitor {
    /// When to check.
    pub mode: CheckMode,
    /// Keep running after a violation.
    pub keep_going: bool,
    /// The checker (baselines, totals).
    pub checker: Checker,
    /// Distinct violations found, in order.
    pub violations: Vec<ReportedViolation>,
    /// Violations found beyond [`MAX_REPORTED`] (or repeats are not counted).
    pub violations_dropped: u64,
    /// Things worth saying about the checks (once each).
    pub notes: Vec<String>,
    tamper: Option<Tamper>,
    seen: HashSet<(Invariant, String)>,
    /// A periodic check is due (the last kick found the vCPU in ring 0).
    periodic_pending: bool,
    /// A check ran: the CPU state is to be checked with this trigger.
    cpu_due: Option<Trigger>,
    /// The last state checked of each vCPU, and where, in vCPU order.
    pub last_cpus: Vec<CpuCapture>,
}

impl Monitor {
    /// Whether it ever looks at the guest while it runs: checks in any mode
    /// but `off`, or a tamper hook.
    pub fn checks_anything(&self) -> bool {
        self.mode != CheckMode::Off || self.tamper.is_some()
    }

    /// A monitor for a run whose usable RAM is `usable`.
    pub fn new(
        mode: CheckMode,
        keep_going: bool,
        tamper: Option<Tamper>,
        usable: Vec<(u64, u64)>,
    ) -> Monitor {
        Monitor {
            mode,
            keep_going,
            checker: Checker::new(usable),
            violations: Vec::new(),
            violations_dropped: 0,
            notes: Vec::new(),
            tamper,
            seen: HashSet::new(),
            periodic_pending: false,
            cpu_due: None,
            last_cpus: Vec::new(),
        }
    }

    /// Checks against what the VMM knows of the kernel image it loaded.
    pub fn with_image(mut self, image: &KernelImage) -> Monitor {
        self.checker.set_image(image);
        self
    }

    fn note(&mut self, text: String) {
        if self.notes.len() < MAX_NOTES && !self.notes.contains(&text) {
            self.notes.push(text);
        }
    }

    /// New events were drained (`new` are they). Runs the tamper hook, then
    /// the check if this mode checks now. `Some` if the guest must stop.
    pub fn after_events(&mut self, ram: &GuestRam, events: &[EventEntry], new: usize) -> Option<Stop> {
        self.checker.observe(events);
        let fresh = &events[events.len().saturating_sub(new)..];
        let last = fresh.last()?;
        if let Some(tamper) = self.tamper.clone() {
            let (view, _) = self.checker.view(ram);
            if fresh.iter().any(|entry| tamper.call(ram, &view, entry)) {
                self.tamper = None;
            }
        }
        let due = match self.mode {
            CheckMode::EveryEvent => true,
            CheckMode::Periodic(_) => std::mem::take(&mut self.periodic_pending),
            CheckMode::Exit | CheckMode::Off => false,
        };
        if due {
            self.check(ram, Trigger::Event(last.seq))
        } else {
            None
        }
    }

    /// The kernel shut down (`shutdown`) or panicked: the last check.
    pub fn at_end(&mut self, ram: &GuestRam, events: &[EventEntry], shutdown: bool) -> Option<Stop> {
        self.checker.observe(events);
        let due = match self.mode {
            CheckMode::EveryEvent => true,
            CheckMode::Periodic(_) | CheckMode::Exit => shutdown,
            CheckMode::Off => false,
        };
        if !due {
            return None;
        }
        self.check(ram, if shutdown { Trigger::Shutdown } else { Trigger::Panic })
    }

    /// A periodic kick stopped the vCPU; `ring3_rip` is its RIP if it was in
    /// ring 3. Checks now, or marks the check due at the next event.
    pub fn kicked(&mut self, ram: &GuestRam, events: &[EventEntry], ring3_rip: Option<u64>) -> Option<Stop> {
        if !matches!(self.mode, CheckMode::Periodic(_)) {
            return None;
        }
        match ring3_rip {
            Some(rip) => {
                self.periodic_pending = false;
                self.checker.stats.in_ring3 += 1;
                self.checker.observe(events);
                self.check(ram, Trigger::Ring3(rip))
            }
            None => {
                self.periodic_pending = true;
                self.checker.stats.deferred += 1;
                None
            }
        }
    }

    /// Runs one check now and records what it finds. The CPU-state check is
    /// then due with the same trigger ([`Monitor::take_cpu_due`]).
    pub fn check(&mut self, ram: &GuestRam, trigger: Trigger) -> Option<Stop> {
        self.cpu_due = Some(trigger);
        let started = std::time::Instant::now();
        let outcome: CheckOutcome = self.checker.check(ram);
        tracing::debug!(
            %trigger,
            violations = outcome.violations.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "invariant check"
        );
        if let Some(failure) = self.checker.write_log_failure() {
            self.note(format!("the write log failed ({failure}): that check read every free frame"));
        }
        if !outcome.published {
            self.note(if self.checker.root_announced() {
                "the kernel's introspection root is unusable: checked the page tables of the processes known from its events only".to_string()
            } else {
                format!(
                    "kernel published no introspection root: checked the page tables of the processes known from its events; {} need the kernel's tables and were not checked",
                    Invariant::ALL.iter().filter(|i| i.needs_root()).map(|i| i.name()).collect::<Vec<_>>().join(", ")
                )
            });
        }
        self.record(outcome.violations, trigger)
    }

    /// The trigger of the last check if the vCPU's state is still to be
    /// checked for it (cleared); `None` as well before the kernel's CPU
    /// design is in force (before its gate self-test, unless the vCPU is
    /// found in ring 3, which it enters only once the design holds: noted).
    pub fn take_cpu_due(&mut self) -> Option<Trigger> {
        let trigger = self.cpu_due.take()?;
        if !self.checker.cpu_design_in_force() && !matches!(trigger, Trigger::Ring3(_)) {
            self.note(format!("the CPU state was not checked at {trigger}: {}", crate::cpu::NOT_YET));
            return None;
        }
        Some(trigger)
    }

    /// Compares `state` (read in `read_time` right after the exit whose
    /// check was `trigger`) with the CPU design and records what it finds,
    /// like [`Monitor::check`].
    pub fn check_cpu(
        &mut self,
        ram: &GuestRam,
        trigger: Trigger,
        cpu: u32,
        state: CpuState,
        read_time: Duration,
    ) -> Option<Stop> {
        let violations = self.checker.check_cpu(ram, cpu, &state, read_time);
        let capture = CpuCapture { cpu, at: format!("at {trigger}"), state };
        match self.last_cpus.binary_search_by_key(&cpu, |c| c.cpu) {
            Ok(i) => self.last_cpus[i] = capture,
            Err(i) => self.last_cpus.insert(i, capture),
        }
        self.record(violations, trigger)
    }

    /// The guest wrote `write` into the read-only kernel image (text and
    /// read-only data, a read-only KVM memory slot): KVM dropped the write
    /// and exited to the VMM. Reported as `kernel-text-unchanged`, whatever
    /// the check mode: the guest stops unless `keep_going`.
    pub fn read_only_write(&mut self, write: &KernelWrite) -> Option<Stop> {
        let mut violation = Violation::new(Invariant::KernelTextUnchanged, write.to_string());
        violation.frames.push(write.gpa & !(PAGE_SIZE - 1));
        if let Some(rip) = write.rip {
            violation.vas.push(rip);
        }
        self.record(vec![violation], Trigger::ReadOnlyWrite(write.gpa))
    }

    /// The kernel's boot hello number `count` (from 1) announcing `text`
    /// and the introspection root at `root_gpa`. The first is accepted (a
    /// text range that is empty, outside RAM or outside the loaded image is
    /// reported); any later one is a `single-boot-hello` violation and
    /// changes nothing (baselines, ring and root stay the first's). `Some`
    /// if the guest must stop.
    pub fn boot_hello(
        &mut self,
        ram: &GuestRam,
        count: u64,
        text: Option<(u64, u64)>,
        root_gpa: u64,
    ) -> Option<Stop> {
        if count <= 1 {
            let problem = self.checker.boot_hello(ram, text, root_gpa);
            return self.record(problem.into_iter().collect(), Trigger::BootHello(count));
        }
        let (gpa, len) = text.unwrap_or_default();
        let mut details = format!(
            "the kernel said hello again (text {gpa:#x}+{len:#x}, root {root_gpa:#x}): refused; the text baseline, event ring and introspection root stay those of the first"
        );
        match self.checker.root_gpa() {
            Some(first) if first != root_gpa => {
                let _ = write!(details, "; the root would have moved from {first:#x} to {root_gpa:#x}");
            }
            None if root_gpa != 0 => {
                let _ = write!(details, "; it names a root ({root_gpa:#x}) the first did not");
            }
            _ => {}
        }
        self.record(vec![Violation::new(Invariant::SingleBootHello, details)], Trigger::BootHello(count))
    }

    /// Records what a check (or the read-only slot) found at `trigger`.
    fn record(&mut self, violations: Vec<Violation>, trigger: Trigger) -> Option<Stop> {
        if violations.is_empty() {
            return None;
        }
        let at = trigger.to_string();
        let mut invariants = Vec::new();
        for violation in violations {
            if !invariants.contains(&violation.invariant) {
                invariants.push(violation.invariant);
            }
            let key = (violation.invariant, violation.details.clone());
            if self.seen.contains(&key) {
                continue;
            }
            // Bounded: past the cap nothing more is remembered (so repeats
            // of dropped violations are counted again).
            if self.violations.len() < MAX_REPORTED {
                self.seen.insert(key);
                let at_panic = trigger == Trigger::Panic;
                self.violations.push(ReportedViolation { at: at.clone(), at_panic, violation });
            } else {
                self.violations_dropped += 1;
            }
        }
        (!self.keep_going).then_some(Stop { at, invariants })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use superos_protocol::event::Event;

    fn spawned(seq: u64, pid: u32, pml4: u64) -> EventEntry {
        EventEntry {
            seq,
            tick: 0,
            cpu: None,
            event: Event::ProcessSpawned { pid, spec_index: 0, pml4_gpa: pml4 },
        }
    }

    #[test]
    fn one_boot_hello_only_and_the_text_baseline_is_the_vmms() {
        let ram = GuestRam::new(16).unwrap();
        ram.write_bytes(0x10_0000, &[0x90; 0x2000]).unwrap();
        let image = KernelImage { read_only: Some((0x10_0000, 0x10_2000)), ..Default::default() };
        let mut monitor = Monitor::new(CheckMode::Exit, false, None, vec![]).with_image(&image);
        monitor.checker.baseline_image(&ram);
        assert_eq!(
            monitor.checker.text_baseline().map(|t| (t.gpa, t.bytes.len())),
            Some((0x10_0000, 0x2000))
        );
        // The first hello is accepted; its text range is only compared.
        assert_eq!(monitor.boot_hello(&ram, 1, Some((0x10_0000, 0x1800)), 0x5000), None);
        // A second one is a violation and changes nothing.
        let stop = monitor.boot_hello(&ram, 2, Some((0x10_0000, 0x10)), 0x6000).expect("a stop");
        assert_eq!(stop.invariants, [Invariant::SingleBootHello]);
        assert_eq!(stop.at, "boot hello #2");
        let details = &monitor.violations[0].violation.details;
        assert!(details.contains("the root would have moved from 0x5000 to 0x6000"), "{details}");
        assert_eq!(monitor.checker.root_gpa(), Some(0x5000));
        assert_eq!(monitor.checker.text_baseline().map(|t| t.bytes.len()), Some(0x2000));

        // A hello whose text range is empty, outside RAM, or outside the
        // loaded image is a finding.
        for (text, expect) in [
            ((0x10_0000, 0), "is empty"),
            ((u64::MAX - 4, 8), "not inside guest RAM"),
            ((0x20_0000, 0x10), "not inside the text and read-only data the VMM loaded"),
        ] {
            let mut monitor = Monitor::new(CheckMode::Exit, false, None, vec![]).with_image(&image);
            let stop = monitor.boot_hello(&ram, 1, Some(text), 0);
            assert_eq!(stop.map(|s| s.invariants), Some(vec![Invariant::IntrospectionValid]));
            let details = &monitor.violations[0].violation.details;
            assert!(details.contains(expect), "{details}");
        }

        // No text the VMM could protect: every check says so.
        let mut monitor =
            Monitor::new(CheckMode::Exit, true, None, vec![]).with_image(&KernelImage::default());
        monitor.checker.baseline_image(&ram);
        assert!(monitor.checker.text_baseline().is_none());
        monitor.at_end(&ram, &[], true);
        let found: Vec<_> = monitor.violations.iter().map(|v| v.violation.to_string()).collect();
        assert!(
            found.iter().any(|v| v.starts_with("kernel-text-unchanged: the kernel text cannot be compared")),
            "{found:?}"
        );
    }

    #[test]
    fn a_bad_pml4_from_the_events_stops_the_run_unless_keep_going() {
        let ram = GuestRam::new(16).unwrap();
        let events = vec![spawned(0, 1, 0x123)];
        let mut monitor = Monitor::new(CheckMode::EveryEvent, false, None, vec![(0x10_0000, 16 << 20)]);
        let stop = monitor.after_events(&ram, &events, 1).expect("a violation stops the run");
        assert_eq!(stop.invariants, [Invariant::PrivateAddressSpaces]);
        assert_eq!(stop.at, "event #0");
        assert!(
            monitor.notes[0].starts_with("kernel published no introspection root"),
            "{:?}",
            monitor.notes
        );

        let mut monitor = Monitor::new(CheckMode::EveryEvent, true, None, vec![]);
        assert_eq!(monitor.after_events(&ram, &events, 1), None);
        assert_eq!(monitor.at_end(&ram, &events, true), None);
        assert_eq!(monitor.violations.len(), 1, "the same finding is kept once: {:?}", monitor.violations);
        assert_eq!(monitor.checker.stats.checks, 2);
    }

    #[test]
    fn a_refused_write_to_the_kernel_image_is_reported_once_and_stops_unless_keep_going() {
        let write = KernelWrite {
            gpa: 0x10_0010,
            bytes: vec![0xcc],
            range: (0x10_0000, 0x11_4000),
            rip: Some(0xffff_ffff_8010_36f7),
            symbol: Some("kernel_main+0xbe7".into()),
        };
        // Reported whatever the check mode, `off` included.
        let mut monitor = Monitor::new(CheckMode::Off, false, None, vec![]);
        let stop = monitor.read_only_write(&write).expect("the guest stops");
        assert_eq!(stop.invariants, [Invariant::KernelTextUnchanged]);
        assert_eq!(stop.at, "a write to the read-only kernel image at 0x100010");
        let found = &monitor.violations[0].violation;
        assert_eq!(found.frames, [0x10_0000]);
        assert_eq!(found.vas, [0xffff_ffff_8010_36f7]);
        assert!(
            found.details.starts_with(
                "the guest wrote 1 byte (cc) at 0x100010, inside the read-only kernel text and rodata 0x100000..0x114000"
            ),
            "{found}"
        );
        assert!(found
            .details
            .ends_with("by the instruction before rip 0xffffffff801036f7 (kernel_main+0xbe7)"));
        assert_eq!(monitor.checker.stats.checks, 0, "not a check");

        let mut monitor = Monitor::new(CheckMode::EveryEvent, true, None, vec![]);
        assert_eq!(monitor.read_only_write(&write), None);
        assert_eq!(monitor.read_only_write(&write), None);
        assert_eq!(monitor.violations.len(), 1, "the same write is reported once");
        let unknown = KernelWrite { rip: None, symbol: None, bytes: vec![1, 2], ..write };
        monitor.read_only_write(&unknown);
        assert!(
            monitor.violations[1].violation.details.contains("2 bytes (01 02)"),
            "{:?}",
            monitor.violations
        );
        assert!(monitor.violations[1].violation.vas.is_empty());
    }

    #[test]
    fn every_check_asks_for_the_cpu_state_which_is_recorded_like_the_rest() {
        let ram = GuestRam::new(16).unwrap();
        let events = vec![spawned(0, 1, 0x1000)];
        let mut monitor = Monitor::new(CheckMode::EveryEvent, true, None, vec![]);
        assert_eq!(monitor.take_cpu_due(), None);
        monitor.after_events(&ram, &events, 1);
        assert_eq!(monitor.take_cpu_due(), None, "not before the gate self-test");
        assert!(monitor.notes.iter().any(|n| n.contains("not checked at event #0")), "{:?}", monitor.notes);
        // Found in ring 3, the design holds whatever the events say.
        monitor.check(&ram, Trigger::Ring3(0x7fff_ffff_0000));
        assert_eq!(monitor.take_cpu_due(), Some(Trigger::Ring3(0x7fff_ffff_0000)));
        let ready = EventEntry {
            seq: 1,
            tick: 0,
            cpu: None,
            event: superos_protocol::event::Event::KernelReady {
                gate_kind: 2,
                free_frames: 1,
                total_frames: 1,
                cpus: 1,
            },
        };
        let events = vec![events[0], ready];
        monitor.after_events(&ram, &events, 1);
        assert_eq!(monitor.take_cpu_due(), Some(Trigger::Event(1)));
        assert_eq!(monitor.take_cpu_due(), None, "once per check");
        // A made-up state against an image without symbols or CPUID: findings,
        // recorded once each however often they are seen.
        let state = CpuState { cr0: 0x8005_0033, ..Default::default() };
        let stop = monitor.check_cpu(&ram, Trigger::Event(0), 0, state.clone(), Duration::from_micros(5));
        assert_eq!(stop, None, "keep going");
        let first = monitor.violations.len();
        assert!(first > 0);
        assert!(monitor.violations.iter().all(|v| v.violation.invariant == Invariant::CpuStateIntact));
        assert!(monitor.violations.iter().any(|v| v.violation.details.contains("no symbol `syscall_entry`")));
        monitor.check_cpu(&ram, Trigger::Shutdown, 0, state, Duration::ZERO);
        assert_eq!(monitor.violations.len(), first, "the same findings are kept once");
        assert_eq!(monitor.checker.stats.cpu_checks, 2);
        assert_eq!(monitor.last_cpus.first().map(|c| c.at.as_str()), Some("at shutdown"));
        // Without keep_going, a finding stops the guest with the trigger.
        let mut strict = Monitor::new(CheckMode::Exit, false, None, vec![]);
        let stop = strict.check_cpu(&ram, Trigger::Ring3(0x40_0000), 0, CpuState::default(), Duration::ZERO);
        let stop = stop.expect("a stop");
        assert_eq!(
            (stop.at.as_str(), stop.invariants.as_slice()),
            ("a periodic check (ring 3, rip 0x400000)", &[Invariant::CpuStateIntact][..])
        );
        // At a panic: listed, marked.
        strict.check_cpu(
            &ram,
            Trigger::Panic,
            0,
            CpuState { rflags: 3 << 12, ..Default::default() },
            Duration::ZERO,
        );
        assert!(strict.violations.iter().any(|v| v.at_panic && v.violation.details.contains("IOPL 3")));
    }

    #[test]
    fn modes_decide_when_to_check_and_the_tamper_hook_runs_once() {
        let ram = GuestRam::new(16).unwrap();
        let events = vec![spawned(0, 1, 0x1000), spawned(1, 2, 0x2000)];
        let calls = Arc::new(Mutex::new(0));
        let counter = calls.clone();
        let tamper = Tamper::new(move |_, view, entry| {
            *counter.lock().unwrap() += 1;
            assert_eq!(view.processes.len() as u64, entry.seq + 1);
            entry.seq == 1
        });
        let mut monitor = Monitor::new(CheckMode::Exit, true, Some(tamper), vec![]);
        monitor.after_events(&ram, &events[..1], 1);
        monitor.after_events(&ram, &events, 1);
        monitor.after_events(&ram, &events, 1);
        assert_eq!(*calls.lock().unwrap(), 2, "not called after it returned true");
        assert_eq!(monitor.checker.stats.checks, 0, "exit mode checks at the end only");
        monitor.at_end(&ram, &events, false);
        assert_eq!(monitor.checker.stats.checks, 0, "not at a panic");
        monitor.at_end(&ram, &events, true);
        assert_eq!(monitor.checker.stats.checks, 1);

        let mut monitor =
            Monitor::new(CheckMode::Periodic(std::time::Duration::from_millis(5)), true, None, vec![]);
        assert_eq!(monitor.after_events(&ram, &events, 2), None);
        assert_eq!(monitor.checker.stats.checks, 0);
        monitor.kicked(&ram, &events, None);
        assert_eq!((monitor.checker.stats.checks, monitor.checker.stats.deferred), (0, 1));
        monitor.after_events(&ram, &events, 1);
        assert_eq!(monitor.checker.stats.checks, 1, "the deferred check runs at the next event");
        monitor.kicked(&ram, &events, Some(0x40_0000));
        assert_eq!(monitor.checker.stats.checks, 2);
        let mut off = Monitor::new(CheckMode::Off, false, None, vec![]);
        off.after_events(&ram, &events, 2);
        off.kicked(&ram, &events, Some(1));
        off.at_end(&ram, &events, true);
        assert_eq!(off.checker.stats.checks, 0);
    }
}
