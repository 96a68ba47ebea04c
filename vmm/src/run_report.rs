//! `superos-vmm run --report FILE` and `run --json`: the run as one JSON
//! document for scripts (issue 15): each process's outcome against its
//! expectation, the exit and its status, the events (as `--events json`
//! prints them), the console lines, the checks, the violations and the boot
//! phases. Text and JSON never share a stream: the report goes to its own
//! file, or to stdout with the summary moved to stderr.

use crate::run::RunReport;
use serde_json::{json, Value};
use std::time::Duration;

fn ms(duration: Option<Duration>) -> Value {
    json!(duration.map(|d| d.as_secs_f64() * 1e3))
}

/// The report as JSON.
pub fn to_json(report: &RunReport, scenario: &str) -> Value {
    let checks = &report.stats.checks;
    let phases = &report.stats.phases;
    json!({
        "scenario": scenario,
        "exit": report.exit.to_string(),
        "exit_status": report.exit_status(),
        "success": report.success(),
        "processes": report.processes.iter().map(|p| json!({
            "name": p.name,
            "pid": p.pid,
            "outcome": p.describe(),
            "expected": p.expected.to_string(),
            "as_expected": p.as_expected(),
            "preemptions": p.preemptions,
            "runs_expected": p.runs_expected,
            "runs_finished": p.runs_finished,
            "runs_as_expected": p.runs_as_expected,
        })).collect::<Vec<_>>(),
        "events": report.events.iter().map(crate::event_json::to_json).collect::<Vec<_>>(),
        "lost_events": report.lost_events,
        "dropped": report.dropped.to_string(),
        "cores": report.cores.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "console": report.lines.iter().map(|l| json!({ "pid": l.pid, "text": l.text })).collect::<Vec<_>>(),
        "checks": {
            "count": checks.checks,
            "ptes_walked": checks.ptes_walked,
            "notes": report.check_notes,
        },
        "violations": report.violations.iter().map(|v| json!({
            "at": v.at,
            "at_panic": v.at_panic,
            "invariant": v.violation.invariant.name(),
            "details": v.violation.details,
            "pids": v.violation.pids,
            "frames": v.violation.frames,
            "vas": v.violation.vas,
        })).collect::<Vec<_>>(),
        "violations_dropped": report.violations_dropped,
        "phases_ms": {
            "vcpu_start": ms(phases.vcpu_start),
            "kernel_entry": ms(phases.kernel_entry),
            "first_user_instruction": ms(phases.first_user_instruction),
            "guest_exit": ms(phases.guest_exit),
            "wall": report.stats.wall.as_secs_f64() * 1e3,
        },
        "vm_exits": report.stats.exits,
        "vm_exits_by_cpu": report.stats.exits_by_cpu,
        "ap_pauses": { "count": report.stats.ap_pauses.pauses, "ms": report.stats.ap_pauses.time.as_secs_f64() * 1e3 },
        "log": report.log,
        "output_errors": report.output_errors,
    })
}
