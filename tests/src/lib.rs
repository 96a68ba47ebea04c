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

// ---------------------------------------------------------------------------
// The system-call fuzzer (`examples/src/bin/fuzz.rs`): one scenario per seed,
// and the oracles a run must satisfy.

/// Calls each fuzzer process makes unless told otherwise.
pub const FUZZ_CALLS: u64 = 400;

/// The scenario of one fuzz seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FuzzCase {
    /// The seed (every fuzzer process of the scenario gets it).
    pub seed: u64,
    /// Calls per fuzzer process.
    pub calls: u64,
    /// Which mix of processes (one of [`FUZZ_SHAPES`]).
    pub shape: &'static str,
    /// The scenario text (programs by embedded name).
    pub toml: String,
    /// Names of the fuzzer processes.
    pub fuzzers: Vec<&'static str>,
}

/// The scenario shapes, picked by `seed % 6`: who runs next to the fuzzer.
pub const FUZZ_SHAPES: [&str; 6] = ["solo", "pair", "quota", "passive", "crowd", "tight"];

/// The scenario for `seed`: one or two fuzzers and bystanders doing
/// known-good, self-checking work (a message stream checked byte by byte, a
/// shared-memory pipeline ending in revocation, scrubbed-memory checks, a
/// plain computation). Pids follow scenario order from 1.
///
/// - `solo`: a fuzzer without a peer; an `ipc` stream (receiver, sender).
/// - `pair`: two fuzzers, each the other's active peer; `hello`.
/// - `quota`: two active fuzzers under small shared quotas (and a roomy
///   virtual one); a `shm-pipeline` (producer, consumer terminated as
///   `use-after-revoke`).
/// - `passive`: a fuzzer whose peer is `hello` (it never receives, so its
///   mailbox fills up; it may exit before the fuzzer); a `scrub` fill/read pair.
/// - `crowd`: two active fuzzers; an `ipc` stream; `hello`.
/// - `tight`: a fuzzer without a peer (so the seed alone decides its calls)
///   under a 2 MiB virtual quota, which it reaches, and a small shared one;
///   a `shm-pipeline`. This is where [`FUZZ_KNOWN_BUGS`] lives.
pub fn fuzz_case(seed: u64, calls: u64) -> FuzzCase {
    let fuzz = |name: &str, peer: u32, active: bool, extra: &str| {
        let active = if active { " active=1" } else { "" };
        process_toml(name, "fuzz", &format!("seed={seed} calls={calls} peer={peer}{active}"), extra)
    };
    let stream = |receiver: u32, sender: u32| {
        process_toml("receiver", "ipc", &format!("mode=stream-recv kib=64 peer={sender}"), "")
            + &process_toml("sender", "ipc", &format!("mode=stream-send kib=64 peer={receiver}"), "")
    };
    let pipeline = |producer: u32, consumer: u32| {
        process_toml(
            "producer",
            "shm-pipeline",
            &format!("mode=producer peer={consumer} kib=64 chunk=16"),
            "",
        ) + &process_toml(
            "consumer",
            "shm-pipeline",
            &format!("mode=consumer peer={producer}"),
            "expect = { fault = \"use-after-revoke\" }",
        )
    };
    let shape = FUZZ_SHAPES[(seed % FUZZ_SHAPES.len() as u64) as usize];
    let (toml, fuzzers) = match shape {
        "solo" => (fuzz("fuzz", 0, false, "") + &stream(2, 3), vec!["fuzz"]),
        "pair" => (
            fuzz("fuzz-a", 2, true, "")
                + &fuzz("fuzz-b", 1, true, "")
                + &process_toml("hello", "hello", "spin=50", ""),
            vec!["fuzz-a", "fuzz-b"],
        ),
        "quota" => (
            fuzz("fuzz-a", 2, true, "quota = { virtual_kib = 65536, shared_kib = 96 }")
                + &fuzz("fuzz-b", 1, true, "quota = { shared_kib = 64 }")
                + &pipeline(3, 4),
            vec!["fuzz-a", "fuzz-b"],
        ),
        "tight" => (
            fuzz("fuzz", 0, false, "quota = { virtual_kib = 2048, shared_kib = 96 }") + &pipeline(2, 3),
            vec!["fuzz"],
        ),
        "passive" => (
            fuzz("fuzz", 2, false, "")
                + &process_toml("hello", "hello", "spin=3000", "")
                + &process_toml("filler", "scrub", "mode=fill pages=16 reader=4", "")
                + &process_toml("reader", "scrub", "mode=read pages=16 filler=3", ""),
            vec!["fuzz"],
        ),
        _ => (
            fuzz("fuzz-a", 2, true, "")
                + &fuzz("fuzz-b", 1, true, "")
                + &stream(3, 4)
                + &process_toml("hello", "hello", "spin=50", ""),
            vec!["fuzz-a", "fuzz-b"],
        ),
    };
    let description = format!("description = \"fuzz seed {seed} ({shape}, {calls} calls per fuzzer)\"\n\n");
    FuzzCase { seed, calls, shape, toml: description + &toml, fuzzers }
}

/// Kernel bugs the fuzzer found that are not fixed yet: (name, what a
/// failure it causes says, what it is). The kernel is not the fuzzer's to
/// change; these are reported, and a failure that matches one is labelled.
// Fixed: "shm-map-virtual-quota" (shm_map did not check the caller's virtual
// quota, although the mapping counts in its virtual size; found by seeds 83,
// 125, 221, kept in REGRESSION_SEEDS).
pub const FUZZ_KNOWN_BUGS: &[(&str, &[&str], &str)] = &[];

/// The known bug (from [`FUZZ_KNOWN_BUGS`]) a failure's problems show, if
/// any.
pub fn fuzz_known_bug(problems: &[String]) -> Option<&'static str> {
    FUZZ_KNOWN_BUGS
        .iter()
        .find(|(_, signature, _)| problems.iter().any(|p| signature.iter().all(|part| p.contains(part))))
        .map(|(name, _, _)| *name)
}

/// The command that reruns one seed and prints everything it did.
pub fn fuzz_reproduce_command(seed: u64, calls: u64) -> String {
    format!("cargo run --release -p superos-tests --bin fuzz-campaign -- --start {seed} --seeds 1 --calls {calls} --verbose")
}

/// What a fuzz run that passed every oracle did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FuzzStats {
    /// System calls the fuzzers made.
    pub calls: u64,
    /// Errors the fuzzers saw, by name (`bad-address`, ...), with counts.
    pub errors: std::collections::BTreeMap<String, u64>,
    /// Kernel events of the run.
    pub events: u64,
    /// Invariant checks the VMM ran.
    pub checks: u64,
}

impl FuzzStats {
    /// Adds another run's numbers.
    pub fn add(&mut self, other: &FuzzStats) {
        self.calls += other.calls;
        self.events += other.events;
        self.checks += other.checks;
        for (name, count) in &other.errors {
            *self.errors.entry(name.clone()).or_default() += count;
        }
    }
}

/// The values of `key=value` words between `(<section>: ` and `)` in `line`.
fn summary_section(line: &str, section: &str) -> Vec<(String, u64)> {
    let Some(start) = line.find(&format!("({section}: ")) else { return Vec::new() };
    let rest = &line[start + section.len() + 3..];
    let body = &rest[..rest.find(')').unwrap_or(rest.len())];
    body.split_whitespace()
        .filter_map(|word| word.split_once('='))
        .filter_map(|(key, value)| Some((key.to_string(), value.parse().ok()?)))
        .collect()
}

/// How many events of the kind a fuzzer summary key names `pid` caused.
fn fuzz_event_count(report: &RunReport, pid: u32, key: &str) -> Option<u64> {
    let count =
        |pick: fn(&Event, u32) -> bool| events(report).filter(|event| pick(event, pid)).count() as u64;
    Some(match key {
        "mapped" => count(|e, p| matches!(*e, Event::MemMapped { pid, .. } if pid == p)),
        "unmapped" => count(|e, p| matches!(*e, Event::MemUnmapped { pid, .. } if pid == p)),
        "protected" => count(|e, p| matches!(*e, Event::MemProtected { pid, .. } if pid == p)),
        "shm-created" => count(|e, p| matches!(*e, Event::ShmCreated { pid, .. } if pid == p)),
        "shm-mapped" => count(|e, p| matches!(*e, Event::ShmMapped { pid, .. } if pid == p)),
        "shm-unmapped" => count(|e, p| matches!(*e, Event::ShmUnmapped { pid, .. } if pid == p)),
        "shm-granted" => count(|e, p| matches!(*e, Event::ShmGranted { pid, .. } if pid == p)),
        "shm-accepted" => count(|e, p| matches!(*e, Event::ShmAccepted { pid, .. } if pid == p)),
        "shm-destroyed" => count(|e, p| matches!(*e, Event::ShmDestroyed { pid, .. } if pid == p)),
        "quota-denied" => count(|e, p| matches!(*e, Event::QuotaDenied { pid, .. } if pid == p)),
        _ => return None,
    })
}

/// Checks a fuzz run against every oracle: a clean kernel shutdown, no VMM
/// warning, no isolation invariant violated (the VMM's checker, at every
/// event with [`config`]), no lost event, every process as the scenario expects (the
/// fuzzers exit 0, i.e. no call broke the ABI as far as they could tell),
/// the bystanders' own data checks, the fuzzers' successful calls matching
/// the kernel's event log, and not one frame lost. Returns the run's
/// numbers, or every problem found.
pub fn check_fuzz_run(case: &FuzzCase, report: &RunReport) -> Result<FuzzStats, Vec<String>> {
    let mut problems = Vec::new();
    if report.exit != (GuestExit::Shutdown { code: 0 }) {
        problems.push(format!("the guest did not shut down cleanly: {}", report.exit));
        if let Some(diagnosis) = &report.diagnosis {
            problems.push(format!("diagnosis: {diagnosis:?}"));
        }
    }
    for warning in &report.log {
        problems.push(format!("the VMM warned: {warning}"));
    }
    for found in &report.violations {
        problems.push(format!("isolation invariant violated {found}"));
    }
    if report.violations_dropped > 0 {
        problems.push(format!("{} more invariant violations", report.violations_dropped));
    }
    if report.stats.checks.checks == 0 {
        problems.push("the invariant checker never ran".to_string());
    }
    if report.lost_events > 0 {
        problems.push(format!("{} events were lost", report.lost_events));
    }
    for process in report.processes.iter().filter(|p| !p.as_expected()) {
        problems.push(format!("{}: {} (expected {:?})", process.name, process.describe(), process.expected));
    }
    let shut_down = matches!(report.exit, GuestExit::Shutdown { .. });
    let mut stats = FuzzStats {
        events: report.events.len() as u64,
        checks: report.stats.checks.checks,
        ..FuzzStats::default()
    };
    let prefix = format!("fuzz: seed {}: ", case.seed);
    for &name in &case.fuzzers {
        let output = report.output_of(name);
        for line in output.iter().filter(|line| line.starts_with(&prefix) && line.contains(" -> unexpected "))
        {
            problems.push(format!("{name}: {line}"));
        }
        let Some(summary) =
            output.iter().find(|line| line.starts_with(&prefix) && line.contains(" distinct errors, "))
        else {
            if shut_down {
                problems.push(format!("{name}: no summary line"));
            }
            continue;
        };
        let calls = summary[prefix.len()..].split(' ').next().and_then(|n| n.parse::<u64>().ok());
        stats.calls += calls.unwrap_or(0);
        for (error, count) in summary_section(summary, "errors") {
            *stats.errors.entry(error).or_default() += count;
        }
        let (Some(pid), 0) = (report.process(name).and_then(|p| p.pid), report.lost_events) else { continue };
        for (key, claimed) in summary_section(summary, "events") {
            match fuzz_event_count(report, pid, &key) {
                Some(logged) if logged != claimed => problems.push(format!(
                    "{name} (pid {pid}): {claimed} successful calls of kind {key}, but {logged} such events"
                )),
                Some(_) => {}
                None => problems.push(format!("{name}: unknown event key {key:?} in its summary")),
            }
        }
    }
    for process in report.processes.iter().filter(|p| !case.fuzzers.contains(&p.name.as_str())) {
        let output = report.output_of(&process.name);
        let bad = ["WRONG", "SURVIVED", "panic:"];
        for line in output.iter().filter(|line| bad.iter().any(|b| line.contains(b))) {
            problems.push(format!("{}: {line}", process.name));
        }
        if process.name == "receiver" && !output.iter().any(|line| line.contains(", 0 bad bytes")) {
            problems.push(format!("receiver: no clean stream report: {output:?}"));
        }
    }
    match (ready_free_frames(report), shutdown_frames(report)) {
        _ if !shut_down => {}
        (Some(ready), Some((free, _, _))) if ready != free => problems.push(format!(
            "{} frames lost ({free} free at shutdown, {ready} after boot)",
            ready as i64 - free as i64
        )),
        (Some(_), Some(_)) => {}
        _ => problems.push("no KernelReady or KernelShutdown event".to_string()),
    }
    if problems.is_empty() {
        Ok(stats)
    } else {
        Err(problems)
    }
}

/// A failed seed, with everything needed to understand and rerun it.
pub fn describe_fuzz_failure(case: &FuzzCase, report: &RunReport, problems: &[String]) -> String {
    let mut text =
        format!("fuzz seed {} ({}, {} calls per fuzzer) failed:\n", case.seed, case.shape, case.calls);
    for problem in problems {
        text += &format!("  - {problem}\n");
    }
    text += &format!("exit: {}\n", report.exit);
    for note in &report.check_notes {
        text += &format!("checker note: {note}\n");
    }
    for process in &report.processes {
        text += &format!("{} (pid {:?}): {}\n", process.name, process.pid, process.describe());
        let output = report.output_of(&process.name);
        let own: Vec<&&str> = output.iter().filter(|line| line.starts_with("fuzz: ")).collect();
        let shown: Vec<&&str> =
            if case.fuzzers.contains(&process.name.as_str()) { own } else { output.iter().collect() };
        for line in shown.iter().rev().take(12).rev() {
            text += &format!("    | {line}\n");
        }
    }
    text += "last events:\n";
    for entry in report.events.iter().rev().take(25).rev() {
        text += &format!("    #{} tick {}: {:?}\n", entry.seq, entry.tick, entry.event);
    }
    text +=
        &format!("scenario:\n{}\nreproduce: {}\n", case.toml, fuzz_reproduce_command(case.seed, case.calls));
    text
}

/// Runs seed `seed`: the report, and the oracles' verdict.
pub fn run_fuzz_case(case: &FuzzCase) -> (RunReport, Result<FuzzStats, Vec<String>>) {
    let report = run_config(config(scenario(&case.toml)));
    let verdict = check_fuzz_run(case, &report);
    (report, verdict)
}

/// Runs seed `seed` with `calls` calls per fuzzer and panics with a full
/// description (and the command that reruns it) if any oracle fails.
pub fn assert_fuzz_seed(seed: u64, calls: u64) -> FuzzStats {
    let case = fuzz_case(seed, calls);
    let (report, verdict) = run_fuzz_case(&case);
    verdict.unwrap_or_else(|problems| panic!("{}", describe_fuzz_failure(&case, &report, &problems)))
}
