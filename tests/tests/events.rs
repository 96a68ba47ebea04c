//! How the kernel's events reach the VMM. A run that checks only at its end
//! (`--check exit`, the default, or `off`) asks the kernel to batch them
//! (`EventNotifyPolicy::Batched`): no VM exit per event, the VMM drains the
//! ring at every hypercall, and the kernel notifies when the ring is half
//! full, at a timer tick with events waiting, and before it stops. These
//! tests hold it to losing nothing and to exiting less.

use std::time::Duration;
use superos_protocol::boot::ScrubStrategy;
use superos_protocol::event::Event;
use superos_tests::*;
use superos_vmm::check::CheckMode;
use superos_vmm::run::{GuestExit, RunReport, EXIT_OK};

fn notifies(report: &RunReport) -> u64 {
    report.stats.exits.get("hypercall event-notify").copied().unwrap_or(0)
}

/// Every record the kernel wrote is in the log, in the kernel's order.
fn assert_log_whole(report: &RunReport) {
    assert_eq!(report.lost_events, 0, "{:?}", report.log);
    assert_eq!(report.dropped.events, 0);
    for (index, entry) in report.events.iter().enumerate() {
        assert_eq!(entry.seq, index as u64, "the log skips or repeats a record at {index}");
    }
}

#[test]
fn batched_events_lose_nothing_and_cost_far_fewer_exits_than_events() {
    if !kvm_available() {
        return;
    }
    // 80 runs of churn: a spawn, a map, an unmap and an exit each, some
    // 320 events (more than the ring's 255), with no console output between
    // them; the kernel zeroes
    // its own frames, so no scrub hypercall drains the ring for it.
    let text = process_toml("churn", "churn", "pages=4", "runs = 80");
    let mut batched = config(scenario(&text));
    batched.check = CheckMode::Exit;
    batched.scrub = ScrubStrategy::Kernel;
    let mut every = batched.clone();
    every.check = CheckMode::EveryEvent;
    let (batched, every) = (run_config(batched), run_config(every));
    for report in [&batched, &every] {
        assert_eq!(report.exit_status(), EXIT_OK, "{report:#?}");
        assert_log_whole(report);
        assert_no_violation(report);
    }
    // The same events: the program's path does not depend on timing.
    let kinds = |report: &RunReport| -> Vec<&'static str> {
        report.events.iter().map(|entry| superos_vmm::event_json::kind_name(&entry.event)).collect()
    };
    assert_eq!(kinds(&batched), kinds(&every));
    let events = batched.events.len() as u64;
    assert!(events > 255, "{events} events: more than the ring holds, so it had to be announced half full");
    assert!(
        notifies(&every) >= events - 1,
        "every event is an exit when checked at each: {}",
        notifies(&every)
    );
    // A notify per half ring (127 records) and at most one per ten timer
    // ticks (the kernel's EVENT_ANNOUNCE_TICKS) for events left waiting.
    let ticks = batched.events.last().map_or(0, |entry| entry.tick);
    let bound = events / 127 + ticks / 10 + 2;
    assert!(
        notifies(&batched) <= bound,
        "batched: {} notifies for {events} events over {ticks} ticks (bound {bound})",
        notifies(&batched)
    );
    assert!(notifies(&batched) >= 2, "a ring of 255 cannot hold {events} events unannounced");
}

#[test]
fn a_timer_tick_announces_events_left_waiting_while_a_process_computes() {
    if !kvm_available() {
        return;
    }
    // spin prints first (its console write drains the spawn events), then
    // computes; churn exits in the meantime, and nothing but the timer
    // tick tells the VMM before the watchdog stops the run.
    let text = format!("{}{}", process_toml("spin", "spin", "", ""), process_toml("churn", "churn", "", ""));
    let mut config = config(scenario(&text));
    config.check = CheckMode::Exit;
    config.scrub = ScrubStrategy::Kernel;
    config.timeout = Duration::from_secs(2);
    let report = run_config(config);
    assert!(matches!(report.exit, GuestExit::Timeout(_)), "{:?}", report.exit);
    assert_log_whole(&report);
    let churn = pid_of(&report, "churn");
    assert!(
        events(&report).any(|event| matches!(event, Event::ProcessExited { pid, .. } if *pid == churn)),
        "churn's exit is in the log"
    );
    assert!(notifies(&report) >= 1, "no tick announced churn's exit: {:?}", report.stats.exits);
}
