//! Shared helpers for the integration tests in `tests/tests/`: each test boots
//! the real kernel under the real VMM on `/dev/kvm`.
//!
//! Without a usable `/dev/kvm` the tests skip with a message, except when the
//! `CI` environment variable is set: there a missing KVM is a failure, so a
//! green CI always means the kernel really ran.
#![deny(missing_docs)]

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;
use superos_protocol::event::{Event, FaultKind};
use superos_protocol::introspect::ProcessRecord;
use superos_protocol::layout::USER_STACK_TOP;
use superos_protocol::ownership::FrameOwner;
use superos_vmm::check::{CheckMode, Invariant};
use superos_vmm::introspect::KernelView;
use superos_vmm::memory::GuestRam;
use superos_vmm::monitor::Tamper;
use superos_vmm::run::{run, GuestExit, ProcessStatus, RunConfig, RunReport};
use superos_vmm::scenario::Scenario;
use superos_vmm::walk;

/// True if the tests can use KVM; panics under CI if they cannot.
pub fn kvm_available() -> bool {
    let usable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if !usable {
        assert!(
            std::env::var_os("CI").is_none(),
            "/dev/kvm is not usable, and CI is set: the integration tests must boot the real kernel"
        );
        eprintln!("skipping: /dev/kvm is not usable on this machine");
    }
    usable
}

/// Parses scenario text (programs by embedded name).
pub fn scenario(text: &str) -> Scenario {
    Scenario::parse(text, "test-scenario.toml", Path::new("."))
        .unwrap_or_else(|e| panic!("bad test scenario: {e}"))
}

/// A quiet config for `scenario` with a watchdog that fails slow tests
/// instead of hanging them, checking the isolation invariants at every
/// kernel event (a violation fails the run with exit status 5).
pub fn config(scenario: Scenario) -> RunConfig {
    let mut config = RunConfig::new(scenario);
    config.timeout = Duration::from_secs(60);
    config.check = CheckMode::EveryEvent;
    config
}

/// Runs `config`, panicking if the VMM could not even start the guest.
pub fn run_config(config: RunConfig) -> RunReport {
    run(config).unwrap_or_else(|e| panic!("the VMM failed to start the guest: {e}"))
}

/// Runs an embedded scenario by name.
pub fn run_embedded(name: &str) -> RunReport {
    run_config(config(Scenario::load(name).unwrap_or_else(|e| panic!("{e}"))))
}

/// Runs scenario text.
pub fn run_text(text: &str) -> RunReport {
    run_config(config(scenario(text)))
}

/// Panics with the whole report if `report` is not a clean success.
pub fn assert_success(report: &RunReport) {
    assert!(report.success(), "run did not succeed: {report:#?}");
}

/// One `[[process]]` table of scenario text. `extra` is appended verbatim as
/// further lines (`expect = ...`, `quota = ...`, `runs = ...`), or empty.
pub fn process_toml(name: &str, program: &str, args: &str, extra: &str) -> String {
    format!("[[process]]\nname = \"{name}\"\nprogram = \"{program}\"\nargs = \"{args}\"\n{extra}\n")
}

/// The kernel's decoded events, in order.
pub fn events(report: &RunReport) -> impl Iterator<Item = &Event> {
    report.events.iter().map(|entry| &entry.event)
}

/// What became of the scenario process `name`; panics with the report if the
/// scenario has no such process.
pub fn status_of(report: &RunReport, name: &str) -> ProcessStatus {
    match report.process(name) {
        Some(process) => process.status,
        None => panic!("no process {name:?} in the report: {report:#?}"),
    }
}

/// The pid of the scenario process `name` (its last run's); panics if it
/// never started.
pub fn pid_of(report: &RunReport, name: &str) -> u32 {
    report
        .process(name)
        .and_then(|p| p.pid)
        .unwrap_or_else(|| panic!("process {name:?} has no pid: {report:#?}"))
}

/// The fault the process `name` was terminated for, or `None` if it was not
/// terminated.
pub fn fault_of(report: &RunReport, name: &str) -> Option<FaultKind> {
    match status_of(report, name) {
        ProcessStatus::Killed { fault, .. } => fault,
        _ => None,
    }
}

/// Panics with the report unless the guest ended with a normal kernel
/// shutdown (no panic, triple fault or timeout).
pub fn assert_clean_shutdown(report: &RunReport) {
    assert!(
        matches!(report.exit, GuestExit::Shutdown { .. }),
        "the guest did not shut down normally: {}\n{report:#?}",
        report.exit
    );
}

/// Free frames after boot, from `KernelReady`.
pub fn ready_free_frames(report: &RunReport) -> Option<u64> {
    events(report).find_map(|event| match *event {
        Event::KernelReady { free_frames, .. } => Some(free_frames),
        _ => None,
    })
}

/// `(free_frames, total_frames, spawned)` from `KernelShutdown`.
pub fn shutdown_frames(report: &RunReport) -> Option<(u64, u64, u64)> {
    events(report).find_map(|event| match *event {
        Event::KernelShutdown { free_frames, total_frames, spawned } => {
            Some((free_frames, total_frames, spawned))
        }
        _ => None,
    })
}

/// Panics unless the kernel shut down with exactly as many free frames as it
/// had after booting: every frame a process used came back.
pub fn assert_no_frame_lost(report: &RunReport) {
    let ready = ready_free_frames(report).expect("a KernelReady event");
    let (free, total, spawned) =
        shutdown_frames(report).unwrap_or_else(|| panic!("no KernelShutdown event: {:?}", report.events));
    assert_eq!(
        free,
        ready,
        "{} frames lost ({free} of {total} free at shutdown, {ready} after boot, {spawned} processes)",
        ready as i64 - free as i64
    );
}

/// Panics unless the self-checking program `name` (one that prints a line per
/// check ending in `(as expected)` or `WRONG`, and exits 0 iff all passed) ran
/// at least `min_checks` checks and all passed.
pub fn assert_checks_pass(report: &RunReport, name: &str, min_checks: usize) {
    let output = report.output_of(name);
    let wrong: Vec<&&str> = output.iter().filter(|line| line.ends_with("WRONG")).collect();
    assert!(wrong.is_empty(), "{name}: failed checks {wrong:#?}\nall output: {output:#?}");
    let passed = output.iter().filter(|line| line.ends_with("(as expected)")).count();
    assert!(
        passed >= min_checks,
        "{name}: only {passed} checks passed, expected at least {min_checks}: {output:#?}"
    );
    let tally = output
        .iter()
        .find_map(|line| line.strip_suffix(" checks as expected"))
        .and_then(|line| line.rsplit_once(": "))
        .and_then(|(_, tally)| tally.split_once(" of "));
    match tally {
        Some((passed, total)) => assert_eq!(passed, total, "{output:#?}"),
        None => panic!("{name}: no tally line: {output:#?}"),
    }
    assert_eq!(status_of(report, name), ProcessStatus::Exited(0), "{output:#?}");
}

/// The position in `report.events` of the first event `pick` picks, with
/// what it picked.
pub fn find_event<T>(report: &RunReport, mut pick: impl FnMut(&Event) -> Option<T>) -> Option<(usize, T)> {
    report.events.iter().enumerate().find_map(|(i, entry)| pick(&entry.event).map(|value| (i, value)))
}

/// Everything `pick` picks from the events, with their positions, in order.
pub fn pick_events<T>(report: &RunReport, mut pick: impl FnMut(&Event) -> Option<T>) -> Vec<(usize, T)> {
    report
        .events
        .iter()
        .enumerate()
        .filter_map(|(i, entry)| pick(&entry.event).map(|value| (i, value)))
        .collect()
}

/// The position of the `ProcessKilled` event of `pid`, with its fault and
/// address.
pub fn kill_event(report: &RunReport, pid: u32) -> Option<(usize, Option<FaultKind>, u64)> {
    find_event(report, |event| match *event {
        Event::ProcessKilled { pid: p, fault, addr, .. } if p == pid => Some((fault, addr)),
        _ => None,
    })
    .map(|(i, (fault, addr))| (i, fault, addr))
}

/// Where `pid` mapped shared region `region`, from its `ShmMapped` events, in
/// order.
pub fn shm_mappings(report: &RunReport, pid: u32, region: u64) -> Vec<u64> {
    events(report)
        .filter_map(|event| match *event {
            Event::ShmMapped { pid: p, region: r, addr, .. } if p == pid && r == region => Some(addr),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The invariant checker: corrupting a running guest on purpose, and what the
// checker says about it.

/// A config for `scenario` whose tamper hook runs `action` once, at the first
/// kernel event `when` picks (before that event's invariant check).
pub fn tamper_config(
    scenario: Scenario,
    mut when: impl FnMut(&Event) -> bool + Send + 'static,
    mut action: impl FnMut(&GuestRam, &KernelView) + Send + 'static,
) -> RunConfig {
    let mut config = config(scenario);
    config.tamper = Some(Tamper::new(move |ram, view, entry| {
        if !when(&entry.event) {
            return false;
        }
        action(ram, view);
        true
    }));
    config
}

/// The distinct invariants the report says were violated.
pub fn violated(report: &RunReport) -> BTreeSet<Invariant> {
    report.violations.iter().map(|found| found.violation.invariant).collect()
}

/// Panics with the violations unless the checker stopped the run for
/// `invariant` and reported nothing else.
pub fn assert_stopped_for(report: &RunReport, invariant: Invariant) {
    let listing: Vec<String> = report.violations.iter().map(ToString::to_string).collect();
    match &report.exit {
        GuestExit::InvariantViolated { invariants, .. } => {
            assert_eq!(invariants, &[invariant], "{listing:#?}")
        }
        other => panic!("the run was not stopped for {invariant}: {other}\n{listing:#?}\n{:#?}", report.log),
    }
    assert_eq!(violated(report), BTreeSet::from([invariant]), "{listing:#?}");
    assert_eq!(report.exit_status(), superos_vmm::run::EXIT_INVARIANT_VIOLATED);
}

/// Panics with the violations unless the run found none.
pub fn assert_no_violation(report: &RunReport) {
    let listing: Vec<String> = report.violations.iter().map(ToString::to_string).collect();
    assert!(listing.is_empty(), "invariants violated: {listing:#?}");
    assert!(!matches!(report.exit, GuestExit::InvariantViolated { .. }), "{}", report.exit);
}

/// The PML4 of live process `pid`, from the kernel's view.
pub fn pml4_of(view: &KernelView, pid: u32) -> u64 {
    view.process(pid).unwrap_or_else(|| panic!("pid {pid} is not in the view: {view:#?}")).pml4
}

/// The GPA and value of the leaf entry mapping `va` in `pid`'s tables.
pub fn leaf_of(ram: &GuestRam, view: &KernelView, pid: u32, va: u64) -> (u64, u64) {
    let (gpa, entry, _) = walk::leaf_entry(ram, pml4_of(view, pid), va)
        .unwrap_or_else(|| panic!("pid {pid} does not map {va:#x}"));
    (gpa, entry)
}

/// Where a test may plant a 4 KiB mapping in `pid`'s tables: an unused
/// entry of the page table that holds its top stack page (1 MiB below the
/// stack top). Returns the entry's GPA and the address it maps.
pub fn spare_slot(ram: &GuestRam, view: &KernelView, pid: u32) -> (u64, u64) {
    let va = USER_STACK_TOP - 0x10_0000;
    let gpa = walk::entry_slot(ram, pml4_of(view, pid), va, 1).expect("the stack's page table exists");
    assert_eq!(ram.read_u64(gpa).unwrap(), 0, "the spare slot is in use");
    (gpa, va)
}

/// ORs `bits` into the u64 at `gpa`.
pub fn set_bits(ram: &GuestRam, gpa: u64, bits: u64) {
    let value = ram.read_u64(gpa).unwrap();
    ram.write(gpa, &(value | bits)).unwrap();
}

/// A free frame of the kernel's allocator, the last one of its ranges (the
/// least likely to be handed out soon).
pub fn last_free_frame(view: &KernelView) -> u64 {
    view.managed_frames()
        .filter(|&(_, raw)| raw == FrameOwner::Free.encode())
        .last()
        .map(|(frame, _)| frame)
        .expect("a free frame")
}

/// The GPA of `frame`'s entry in the kernel's owner table.
pub fn owner_entry_gpa(view: &KernelView, frame: u64) -> u64 {
    let root = view.root.expect("a published root");
    let index = view.owner_index(frame).expect("a managed frame");
    root.owner_table_gpa + index as u64 * 4
}

/// The GPA of `pid`'s record in the kernel's process table.
pub fn process_record_gpa(ram: &GuestRam, view: &KernelView, pid: u32) -> u64 {
    let root = view.root.expect("a published root");
    let size = std::mem::size_of::<ProcessRecord>() as u64;
    (0..u64::from(root.process_capacity))
        .map(|slot| root.process_table_gpa + slot * size)
        .find(|&gpa| ram.read::<ProcessRecord>(gpa).is_ok_and(|r| r.pid == pid))
        .unwrap_or_else(|| panic!("pid {pid} has no record"))
}
