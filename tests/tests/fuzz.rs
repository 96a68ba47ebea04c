//! The system-call fuzzer (`examples/src/bin/fuzz.rs`) on the real kernel:
//! a bounded campaign for CI (a fixed list of seeds, split by scenario shape
//! so that the tests run side by side), the seeds that once failed, and
//! checks that the harness itself catches what it must (a fuzzer that sees
//! an impossible result, an invariant violated mid-run) and that a seed
//! replays the same calls.
//!
//! Every seed runs with the VMM's invariant checker at every event and must
//! pass every oracle of `check_fuzz_run`. A failure prints the scenario,
//! what went wrong, the last events and the command that reruns the seed.
//! The long campaign is `fuzz-campaign` (see the README, "Fuzzing").

use superos_protocol::event::Event;
use superos_protocol::introspect::ProcessRecord;
use superos_protocol::layout::PAGE_SIZE;
use superos_tests::*;
use superos_vmm::run::{GuestExit, ProcessStatus};

/// Calls per fuzzer process in CI (as in the long campaign).
const CALLS: u64 = FUZZ_CALLS;

/// Runs `seeds` (all of one shape) and returns the totals; panics at the
/// first failing seed.
fn campaign(shape: &str, seeds: &[u64]) -> FuzzStats {
    let mut totals = FuzzStats::default();
    for &seed in seeds {
        assert_eq!(fuzz_case(seed, CALLS).shape, shape, "seed {seed}");
        totals.add(&assert_fuzz_seed(seed, CALLS));
    }
    let fuzzers = fuzz_case(seeds[0], CALLS).fuzzers.len() as u64;
    assert!(totals.calls >= seeds.len() as u64 * fuzzers * CALLS, "{shape}: {totals:?}");
    assert!(totals.checks > totals.events, "{shape}: the checker ran at every event: {totals:?}");
    totals
}

/// Panics unless the campaign saw each of `errors`.
fn assert_saw(totals: &FuzzStats, errors: &[&str]) {
    for error in errors {
        assert!(totals.errors.contains_key(*error), "never saw {error}: {:?}", totals.errors);
    }
}

/// Errors every shape provokes (argument errors of every kind).
const COMMON: [&str; 9] = [
    "bad-address",
    "too-large",
    "overflow",
    "unaligned",
    "invalid-argument",
    "not-permitted",
    "bad-handle",
    "no-such-syscall",
    "no-such-process",
];

#[test]
fn fuzz_campaign_solo() {
    if !kvm_available() {
        return;
    }
    let totals = campaign("solo", &[6, 12, 18, 24, 30]);
    assert_saw(&totals, &COMMON);
    assert_saw(&totals, &["buffer-too-small", "would-block", "already-mapped"]);
}

#[test]
fn fuzz_campaign_pair() {
    if !kvm_available() {
        return;
    }
    let totals = campaign("pair", &[1, 7, 13, 19, 25]);
    assert_saw(&totals, &COMMON);
    assert_saw(&totals, &["mailbox-full"]);
}

#[test]
fn fuzz_campaign_quota() {
    if !kvm_available() {
        return;
    }
    let totals = campaign("quota", &[2, 8, 14, 20, 26]);
    assert_saw(&totals, &COMMON);
    assert_saw(&totals, &["quota-exceeded"]);
}

#[test]
fn fuzz_campaign_passive() {
    if !kvm_available() {
        return;
    }
    let totals = campaign("passive", &[3, 9, 15, 21, 27]);
    assert_saw(&totals, &COMMON);
    assert_saw(&totals, &["mailbox-full"]);
}

#[test]
fn fuzz_campaign_crowd() {
    if !kvm_available() {
        return;
    }
    let totals = campaign("crowd", &[4, 10, 16, 22, 28]);
    assert_saw(&totals, &COMMON);
}

#[test]
fn fuzz_campaign_tight() {
    if !kvm_available() {
        return;
    }
    // A fuzzer without a peer makes the same calls for the same seed, and
    // under these quotas it runs into them.
    let totals = campaign("tight", &[5, 11, 17, 23, 29]);
    assert_saw(&totals, &COMMON);
    assert_saw(&totals, &["quota-exceeded"]);
}

/// Seeds that once failed: (seed, calls per fuzzer, the known kernel bug
/// it still shows, what it found). A seed names a call sequence of the
/// fuzzer as it is now; an entry whose bug is `None` must pass.
const REGRESSION_SEEDS: &[(u64, u64, Option<&str>, &str)] = &[
    (
        83,
        400,
        None,
        "kernel: under a 2048 KiB virtual quota, a mem_map is denied (event #26), two smaller ones \
         fit, then shm_map of the fuzzer's own 48 KiB region succeeds (event #32) and takes its \
         virtual size to 2142208 bytes: the checker stops the run (quota-accounting); without the \
         checker the fuzzer reports `call #63 shm_map(..) -> unexpected Ok(..) (allowed: \
         quota-exceeded)`; fixed: shm_map now checks the virtual quota",
    ),
    (125, 400, None, "kernel: the same bug, later in the run (event #85)"),
    (221, 400, None, "kernel: the same bug (event #89)"),
];

#[test]
fn regression_seeds() {
    if !kvm_available() {
        return;
    }
    for &(seed, calls, known_bug, found) in REGRESSION_SEEDS {
        let case = fuzz_case(seed, calls);
        let (report, verdict) = run_fuzz_case(&case);
        match (known_bug, verdict) {
            (None, Ok(_)) => {}
            (None, Err(problems)) => {
                panic!(
                    "regression seed {seed} ({found}):\n{}",
                    describe_fuzz_failure(&case, &report, &problems)
                )
            }
            // Still failing, for the documented reason only.
            (Some(bug), Err(problems)) if fuzz_known_bug(&problems) == Some(bug) => {}
            (Some(bug), Err(problems)) => panic!(
                "seed {seed} should show known bug {bug} ({found}) but failed otherwise:\n{}",
                describe_fuzz_failure(&case, &report, &problems)
            ),
            (Some(bug), Ok(_)) => panic!(
                "seed {seed} no longer shows known bug {bug} ({found}): if the kernel was fixed, drop \
                 the bug from FUZZ_KNOWN_BUGS and mark this seed's entry `None` (it must pass from now on)"
            ),
        }
    }
}

#[test]
fn a_seed_replays_the_same_calls() {
    if !kvm_available() {
        return;
    }
    // A fuzzer without an active peer depends on nothing but its seed: the
    // same seed makes the same calls with the same results, whatever the
    // bystanders and the timer do.
    let case = fuzz_case(36, 150);
    assert_eq!(case, fuzz_case(36, 150), "the scenario is a function of the seed");
    assert_eq!(case.shape, "solo");
    let summaries: Vec<String> = (0..2)
        .map(|_| {
            let (report, verdict) = run_fuzz_case(&case);
            if let Err(problems) = verdict {
                panic!("{}", describe_fuzz_failure(&case, &report, &problems));
            }
            let output = report.output_of("fuzz");
            output.iter().find(|line| line.contains(" distinct errors, ")).expect("a summary").to_string()
        })
        .collect();
    assert_eq!(summaries[0], summaries[1]);
    let calls = summaries[0]
        .trim_start_matches("fuzz: seed 36: ")
        .split(' ')
        .next()
        .and_then(|n| n.parse::<u64>().ok());
    assert!(calls >= Some(150), "{}", summaries[0]);
}

#[test]
fn the_fuzzer_reports_a_result_its_model_forbids() {
    if !kvm_available() {
        return;
    }
    // The fuzzer is told it has no peer, yet pid 2 floods its mailbox: the
    // first message it receives from pid 2 is a result the ABI does not
    // allow it, so it must say so and exit 1, and the harness must catch it.
    let mut case = fuzz_case(30, 200);
    case.toml = process_toml("fuzz", "fuzz", "seed=30 calls=200 peer=0", "")
        + &process_toml("flood", "ipc", "mode=flood peer=1", "");
    let (report, verdict) = run_fuzz_case(&case);
    let problems = verdict.expect_err("a fuzzer that exits 1 fails the seed");
    let output = report.output_of("fuzz");
    let line = output.iter().find(|line| line.contains(" -> unexpected ")).expect("a violation line");
    assert!(line.starts_with("fuzz: seed 30: call #"), "{line}");
    assert!(line.contains(" ipc_"), "{line}");
    assert_eq!(status_of(&report, "fuzz"), ProcessStatus::Exited(1));
    assert!(problems.iter().any(|p| p.contains(" -> unexpected ")), "{problems:#?}");
    assert!(problems.iter().any(|p| p.starts_with("fuzz: exit 1")), "{problems:#?}");
    let description = describe_fuzz_failure(&case, &report, &problems);
    assert!(description.contains(&fuzz_reproduce_command(30, 200)), "{description}");
}

#[test]
fn the_harness_reports_an_invariant_violated_mid_fuzz() {
    if !kvm_available() {
        return;
    }
    // At the fuzzer's fifth successful mem_map, its resident counter is
    // corrupted from the VMM side: the checker must stop the run and the
    // harness must report the violation.
    let case = fuzz_case(40, 200);
    let mut maps = 0;
    let tampered = tamper_config(
        scenario(&case.toml),
        move |event| {
            maps += u32::from(matches!(event, Event::MemMapped { pid: 1, .. }));
            maps == 5
        },
        |ram, view| {
            let gpa = process_record_gpa(ram, view, 1);
            let mut record: ProcessRecord = ram.read(gpa).unwrap();
            record.resident_bytes += PAGE_SIZE;
            ram.write(gpa, &record).unwrap();
        },
    );
    let report = run_config(tampered);
    let problems = check_fuzz_run(&case, &report).expect_err("a violated invariant fails the seed");
    assert!(matches!(report.exit, GuestExit::InvariantViolated { .. }), "{}", report.exit);
    assert!(problems.iter().any(|p| p.starts_with("isolation invariant violated")), "{problems:#?}");
}
