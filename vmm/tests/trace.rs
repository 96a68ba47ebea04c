//! `superos-vmm run --trace FILE`: the timeline parses as trace-event JSON,
//! every begin has its end, and its kernel events are the run's event log.

mod common;
use common::{kvm_available, scratch, vmm};
use serde_json::Value;
use std::collections::BTreeMap;

/// The default scenario (nine processes, one killed for a fault, with checks
/// at every event) traced: the file is what `--report` says happened.
#[test]
fn a_trace_parses_balances_and_matches_the_event_log() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("trace", "default");
    let (trace, report) = (dir.join("run.trace.json"), dir.join("report.json"));
    let (code, _, stderr) = vmm(&[
        "run",
        "--quiet",
        "--check",
        "every-event",
        "--trace",
        trace.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let trace: Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).expect("the trace is JSON");
    let report: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().expect("traceEvents");
    assert_eq!(trace["otherData"]["dropped"], 0);

    // Every begin has its end, on its own track, not before it.
    let mut open: BTreeMap<(u64, u64), Vec<f64>> = BTreeMap::new();
    for event in events {
        let track = (event["pid"].as_u64().unwrap(), event["tid"].as_u64().unwrap());
        let ts = event["ts"].as_f64();
        match event["ph"].as_str().unwrap() {
            "B" => open.entry(track).or_default().push(ts.unwrap()),
            "E" => {
                let began = open.get_mut(&track).and_then(Vec::pop).expect("an end without a begin");
                assert!(ts.unwrap() >= began, "{event}");
            }
            "X" => assert!(event["dur"].as_f64().unwrap() >= 0.0, "{event}"),
            "i" | "M" => {}
            other => panic!("unexpected phase {other}: {event}"),
        }
    }
    assert!(open.values().all(Vec::is_empty), "begins without an end: {open:?}");
    let slices = events.iter().filter(|e| e["ph"] == "B").count();
    assert_eq!(slices, 9, "one life per process");

    // The kernel events of the trace are the run's event log, in order.
    let logged: Vec<(u64, String)> = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["seq"].as_u64().unwrap(), e["kind"].as_str().unwrap().to_string()))
        .collect();
    let mut traced: Vec<(f64, u64, String)> = events
        .iter()
        .filter(|e| e["ph"] == "i" && e["args"]["seq"].is_u64())
        .map(|e| {
            (
                e["ts"].as_f64().unwrap(),
                e["args"]["seq"].as_u64().unwrap(),
                e["name"].as_str().unwrap().into(),
            )
        })
        .collect();
    traced.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let traced: Vec<(u64, String)> = traced.into_iter().map(|(_, seq, kind)| (seq, kind)).collect();
    assert!(!logged.is_empty());
    assert_eq!(traced, logged);
    // Each process event sits on its process's track, named for it.
    let killed = events.iter().find(|e| e["name"] == "process-killed").expect("write-code's kill");
    let pid = killed["args"]["pid"].as_u64().unwrap();
    assert_eq!(killed["tid"].as_u64(), Some(pid));
    let track_name = format!("pid {pid} write-code");
    assert!(events
        .iter()
        .any(|e| e["ph"] == "M" && e["tid"] == pid && e["args"]["name"] == track_name.as_str()));
    let end = events.iter().find(|e| e["ph"] == "E" && e["tid"] == pid).unwrap();
    assert_eq!(end["args"]["outcome"], "process-killed");

    // The checks ran at every event, each a slice with its trigger, as many
    // as the report counts; the vCPU's exits are on its track.
    let checks: Vec<&Value> = events.iter().filter(|e| e["name"] == "invariant check").collect();
    assert_eq!(checks.len() as u64, report["checks"]["count"].as_u64().unwrap(), "{}", report["checks"]);
    assert!(checks.iter().all(|c| c["args"]["violations"] == 0));
    assert!(events.iter().any(|e| e["tid"] == 1_000_000 && e["name"] == "hypercall event-notify"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A trace that cannot be written is an error the run reports (status 4),
/// after the run itself: the guest's outcome is not lost.
#[test]
fn an_unwritable_trace_is_reported_not_a_panic() {
    if !kvm_available() {
        return;
    }
    let (code, stdout, stderr) = vmm(&["run", "hello", "--trace", "/nonexistent-dir/run.trace.json"]);
    assert_ne!(code, 0, "{stdout}");
    assert!(stderr.contains("could not write the trace /nonexistent-dir/run.trace.json"), "{stderr}");
    assert!(stdout.contains("as expected"), "the run's own summary is still there: {stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
