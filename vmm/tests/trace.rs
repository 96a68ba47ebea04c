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

/// One slice of a track: (start, end) in microseconds, its name and args.
struct Slice {
    from: f64,
    to: f64,
    name: String,
    args: Value,
}

/// The `X` slices of the guest's track `tid`, in time order.
fn slices(events: &[Value], tid: u64) -> Vec<Slice> {
    let mut found: Vec<Slice> = events
        .iter()
        .filter(|e| e["ph"] == "X" && e["pid"] == 1 && e["tid"] == tid)
        .map(|e| {
            let from = e["ts"].as_f64().unwrap();
            Slice {
                from,
                to: from + e["dur"].as_f64().unwrap(),
                name: e["name"].as_str().unwrap().to_string(),
                args: e["args"].clone(),
            }
        })
        .collect();
    found.sort_by(|a, b| a.from.total_cmp(&b.from));
    found
}

/// The default scenario on two vCPUs, traced: the kernel's trace ring gives
/// each CPU a track of run slices that never overlap, and each process its
/// system calls, inside its life, each kernel event of a call inside that
/// call's slice (which a wrong TSC-to-clock mapping would break), and the
/// `exit` call of every process that exited ending with it.
#[test]
fn the_kernel_s_run_slices_and_system_calls_are_on_the_timeline() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("trace", "kernel");
    let trace = dir.join("run.trace.json");
    let (code, _, stderr) = vmm(&["run", "--quiet", "--cpus", "2", "--trace", trace.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let trace: Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).expect("the trace is JSON");
    let events = trace["traceEvents"].as_array().expect("traceEvents");
    let other = &trace["otherData"];
    assert_eq!(
        (&other["kernel_lost"], &other["unplaced"], &other["dropped"]),
        (&0.into(), &0.into(), &0.into())
    );

    // Each process's life, from its begin and end.
    let mut lives: BTreeMap<u64, (f64, f64, String)> = BTreeMap::new();
    for event in events.iter().filter(|e| e["pid"] == 1 && e["tid"].as_u64().unwrap() < 1_000_000) {
        let tid = event["tid"].as_u64().unwrap();
        match event["ph"].as_str().unwrap() {
            "B" => drop(lives.insert(tid, (event["ts"].as_f64().unwrap(), f64::MAX, String::new()))),
            "E" => {
                let life = lives.get_mut(&tid).unwrap();
                life.1 = event["ts"].as_f64().unwrap();
                life.2 = event["args"]["outcome"].as_str().unwrap().to_string();
            }
            _ => {}
        }
    }
    assert_eq!(lives.len(), 9);

    // Run slices: on "CPU n" tracks, never overlapping on one CPU, and every
    // process ran somewhere.
    let mut ran = std::collections::BTreeSet::new();
    for cpu in 0..2u64 {
        let tid = 2_000_000 + cpu;
        assert!(
            events
                .iter()
                .any(|e| e["ph"] == "M" && e["tid"] == tid && e["args"]["name"] == format!("CPU {cpu}")),
            "a track for CPU {cpu}"
        );
        let runs = slices(events, tid);
        for pair in runs.windows(2) {
            // (1 ns: the rounding of ts + dur in microseconds.)
            assert!(
                pair[0].to <= pair[1].from + 1e-3,
                "CPU {cpu}: {} overlaps {}",
                pair[0].name,
                pair[1].name
            );
        }
        for run in &runs {
            let pid = run.args["pid"].as_u64().unwrap();
            let (born, ended, _) = &lives[&pid];
            // (1 ns: the rounding of ts + dur in microseconds.)
            assert!(
                *born <= run.from + 1e-3 && run.to <= ended + 1e-3,
                "CPU {cpu}: {} outside its life",
                run.name
            );
            ran.insert(pid);
        }
    }
    assert_eq!(ran, lives.keys().copied().collect(), "every process ran on a CPU");

    // System calls: inside their process's life; `exit` ends an exited one.
    let mut exits = 0;
    for (&pid, (born, ended, outcome)) in &lives {
        let calls = slices(events, pid);
        assert!(!calls.is_empty(), "pid {pid} made system calls");
        for call in &calls {
            // (1 ns: the rounding of ts + dur in microseconds.)
            let inside = *born <= call.from + 1e-3 && call.to <= *ended + 1e-3;
            assert!(inside, "pid {pid}: {} outside its life", call.name);
            assert!(call.args["number"].is_u64() && !call.args["result"].is_null(), "{}", call.args);
        }
        if outcome == "process-exited" {
            let last = calls.last().unwrap();
            assert_eq!(last.name, "exit", "pid {pid}");
            assert!(
                (last.to - ended).abs() < 1e-3,
                "pid {pid}: exit ends at {}, the process at {ended}",
                last.to
            );
            assert_eq!(last.args["result"], "none: process-exited");
            exits += 1;
        }
    }
    assert_eq!(exits, 7);

    // A kernel event of a call happens inside that call (within 0.1 ms: the
    // clock is right to about the time of a VM exit).
    let call_of = [
        ("mem-mapped", "mem_map"),
        ("shm-created", "shm_create"),
        ("shm-mapped", "shm_map"),
        ("shm-revoked", "shm_revoke"),
    ];
    let mut inside = 0;
    for event in events.iter().filter(|e| e["ph"] == "i") {
        let Some(&(_, call)) = call_of.iter().find(|(kind, _)| event["name"] == *kind) else { continue };
        let (tid, at) = (event["tid"].as_u64().unwrap(), event["ts"].as_f64().unwrap());
        assert!(
            slices(events, tid).iter().any(|s| s.name == call && s.from - 100.0 <= at && at <= s.to + 100.0),
            "{event} is not inside a {call} of its process"
        );
        inside += 1;
    }
    assert!(inside >= 10, "{inside} events checked");
    // The quota-denied process's refused mem_map returned its error.
    assert!(slices(events, 7)
        .iter()
        .any(|s| s.name == "mem_map" && s.args["result"] == "error quota-exceeded"));
    let _ = std::fs::remove_dir_all(&dir);
}
