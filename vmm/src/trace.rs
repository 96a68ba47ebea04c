//! `superos-vmm run --trace FILE`: the run as a timeline in the Chrome /
//! Perfetto trace-event JSON format (loadable in ui.perfetto.dev and
//! chrome://tracing).
//!
//! Everything in it is what the VMM sees from outside, timed by the VMM's
//! clock (microseconds since it started):
//!
//! - one track per process (guest pid): its life as a slice from its
//!   `process-spawned` event to its `process-exited` or `process-killed`
//!   event (the outcome in the slice's end), and every kernel event that
//!   concerns it as an instant (kind, sequence number, tick, fields);
//! - a kernel track for the events of no process (ready, shutdown, frame
//!   pool);
//! - one track per vCPU: every VM exit the VMM handled for it (hypercalls by
//!   name, the others by kind) as an instant;
//! - a VMM track: every invariant check as a slice with its duration, what
//!   triggered it and how many violations it found, and each time the guest
//!   was held for the control socket or gdb.
//!
//! A run with `--trace` has the kernel notify the VMM at every event (as
//! `--check every-event` does), so that each event is timed when it
//! happens, not when a batch is drained. A process still live when the run
//! ends has its slice closed at the end ("unfinished"): every begin has its
//! end. At most [`MAX_RECORDS`] records are kept (a hostile guest cannot
//! make the trace exhaust host memory); the rest are counted in the file's
//! `otherData.dropped`.

use crate::event_json;
use crate::session::EventEntry;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;
use superos_protocol::event::Event;

/// Most records one trace keeps.
pub const MAX_RECORDS: usize = 1 << 20;

/// The trace's Chrome "process" for the guest's tracks.
const GUEST: u32 = 1;
/// The trace's Chrome "process" for the VMM's own track.
const VMM: u32 = 2;
/// Track id of a vCPU: this plus its index (as the gdb stub numbers them).
const VCPU_TRACK: u64 = 1_000_000;
/// Track id of the kernel's own events.
const KERNEL_TRACK: u64 = 0;
/// Track id of the VMM's checks and holds.
const CHECK_TRACK: u64 = 1;

/// One thing that happened, timed since the VMM started.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// A kernel event, when the VMM drained it.
    Event {
        /// When.
        at: Duration,
        /// The event.
        entry: EventEntry,
    },
    /// A VM exit the VMM handled.
    Exit {
        /// When.
        at: Duration,
        /// The vCPU.
        cpu: u32,
        /// What it was (`hypercall console-write`, `io-in`, ...).
        kind: String,
    },
    /// An invariant check.
    Check {
        /// When it began.
        at: Duration,
        /// How long it took.
        took: Duration,
        /// What triggered it.
        trigger: String,
        /// Violations it found.
        violations: usize,
    },
    /// The guest held for the control socket or a debugger.
    Held {
        /// When the hold began.
        at: Duration,
        /// How long it lasted.
        took: Duration,
        /// Where (a [`crate::inspect::Point`] in words).
        point: String,
    },
}

impl Record {
    fn at(&self) -> Duration {
        match self {
            Record::Event { at, .. }
            | Record::Exit { at, .. }
            | Record::Check { at, .. }
            | Record::Held { at, .. } => *at,
        }
    }
}

/// The records of one run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trace {
    records: Vec<Record>,
    /// Records not kept (beyond [`MAX_RECORDS`]).
    pub dropped: u64,
}

fn micros(at: Duration) -> f64 {
    at.as_nanos() as f64 / 1000.0
}

impl Trace {
    /// Keeps `record` (or counts it, past [`MAX_RECORDS`]).
    pub fn push(&mut self, record: Record) {
        if self.records.len() >= MAX_RECORDS {
            self.dropped += 1;
        } else {
            self.records.push(record);
        }
    }

    /// The records kept, in the order they happened.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// The trace-event JSON of the run, which ended at `end`; `names` gives
    /// each pid's process name.
    pub fn to_json(&self, end: Duration, names: &BTreeMap<u32, String>) -> Value {
        let mut events = Vec::new();
        let meta = |pid: u32, tid: Option<u64>, name: &str| -> Value {
            match tid {
                Some(tid) => {
                    json!({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
                }
                None => {
                    json!({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}})
                }
            }
        };
        events.push(meta(GUEST, None, "SuperOS guest"));
        events.push(meta(VMM, None, "superos-vmm"));
        events.push(meta(GUEST, Some(KERNEL_TRACK), "kernel"));
        events.push(meta(VMM, Some(CHECK_TRACK), "invariant checks and holds"));
        let mut tracks = std::collections::BTreeSet::new();
        let mut live: BTreeMap<u32, Duration> = BTreeMap::new();
        let mut records: Vec<&Record> = self.records.iter().collect();
        records.sort_by_key(|r| r.at());
        for record in records {
            match record {
                Record::Event { at, entry } => {
                    let pid = entry.event.encode().pid;
                    let track = if pid == 0 { KERNEL_TRACK } else { u64::from(pid) };
                    if pid != 0 && tracks.insert(track) {
                        let name = names.get(&pid).map_or("?", String::as_str);
                        events.push(meta(GUEST, Some(track), &format!("pid {pid} {name}")));
                    }
                    let kind = event_json::kind_name(&entry.event);
                    if let Event::ProcessSpawned { .. } = entry.event {
                        live.insert(pid, *at);
                        events.push(json!({"ph": "B", "name": "process", "pid": GUEST, "tid": track,
                            "ts": micros(*at), "args": {"pid": pid}}));
                    }
                    events.push(json!({"ph": "i", "s": "t", "name": kind, "pid": GUEST, "tid": track,
                        "ts": micros(*at), "args": event_json::to_json(entry)}));
                    if let Event::ProcessExited { .. } | Event::ProcessKilled { .. } = entry.event {
                        if live.remove(&pid).is_some() {
                            events.push(json!({"ph": "E", "pid": GUEST, "tid": track, "ts": micros(*at),
                                "args": {"outcome": kind}}));
                        }
                    }
                }
                Record::Exit { at, cpu, kind } => {
                    let track = VCPU_TRACK + u64::from(*cpu);
                    if tracks.insert(track) {
                        events.push(meta(GUEST, Some(track), &format!("vCPU {cpu}: VM exits")));
                    }
                    events.push(json!({"ph": "i", "s": "t", "name": kind, "pid": GUEST, "tid": track,
                        "ts": micros(*at)}));
                }
                Record::Check { at, took, trigger, violations } => {
                    events.push(json!({"ph": "X", "name": "invariant check", "pid": VMM, "tid": CHECK_TRACK,
                        "ts": micros(*at), "dur": micros(*took),
                        "args": {"trigger": trigger, "violations": violations}}));
                }
                Record::Held { at, took, point } => {
                    events.push(json!({"ph": "X", "name": "guest held", "pid": VMM, "tid": CHECK_TRACK,
                        "ts": micros(*at), "dur": micros(*took), "args": {"at": point}}));
                }
            }
        }
        // Every begin has its end: a process still live when the run ended.
        for pid in live.into_keys() {
            events.push(json!({"ph": "E", "pid": GUEST, "tid": u64::from(pid), "ts": micros(end),
                "args": {"outcome": "unfinished"}}));
        }
        json!({
            "traceEvents": events,
            "displayTimeUnit": "ms",
            "otherData": {"producer": "superos-vmm run --trace", "dropped": self.dropped},
        })
    }

    /// Writes the trace to `path`.
    pub fn write(
        &self,
        path: &std::path::Path,
        end: Duration,
        names: &BTreeMap<u32, String>,
    ) -> std::io::Result<()> {
        let file = std::io::BufWriter::new(std::fs::File::create(path)?);
        serde_json::to_writer(file, &self.to_json(end, names)).map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, event: Event) -> EventEntry {
        EventEntry { seq, tick: seq, cpu: None, event }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn every_begin_has_its_end_and_events_sit_on_their_process_track() {
        let mut trace = Trace::default();
        trace.push(Record::Event {
            at: ms(1),
            entry: entry(0, Event::ProcessSpawned { pid: 1, spec_index: 0, pml4_gpa: 0x5000 }),
        });
        trace.push(Record::Event {
            at: ms(2),
            entry: entry(1, Event::ProcessSpawned { pid: 2, spec_index: 1, pml4_gpa: 0x6000 }),
        });
        trace.push(Record::Exit { at: ms(3), cpu: 0, kind: "hypercall console-write".into() });
        trace.push(Record::Check { at: ms(4), took: ms(1), trigger: "event #1".into(), violations: 0 });
        trace.push(Record::Event {
            at: ms(5),
            entry: entry(2, Event::ProcessExited { pid: 1, code: 0, preemptions: 0 }),
        });
        let names = BTreeMap::from([(1, "a".to_string()), (2, "b".to_string())]);
        let json = trace.to_json(ms(9), &names);
        let events = json["traceEvents"].as_array().unwrap();
        let phase = |ph: &str| events.iter().filter(|e| e["ph"] == ph).count();
        assert_eq!((phase("B"), phase("E")), (2, 2), "pid 2 closed at the end");
        let unfinished = events.iter().find(|e| e["ph"] == "E" && e["tid"] == 2).unwrap();
        assert_eq!(
            (unfinished["ts"].as_f64(), &unfinished["args"]["outcome"]),
            (Some(9000.0), &json!("unfinished"))
        );
        assert!(events.iter().any(|e| e["ph"] == "M" && e["args"]["name"] == "pid 1 a"));
        let exited = events.iter().find(|e| e["name"] == "process-exited").unwrap();
        assert_eq!((exited["tid"].as_u64(), exited["args"]["seq"].as_u64()), (Some(1), Some(2)));
        let check = events.iter().find(|e| e["ph"] == "X").unwrap();
        assert_eq!((check["ts"].as_f64(), check["dur"].as_f64()), (Some(4000.0), Some(1000.0)));
        assert!(events.iter().any(|e| e["tid"] == VCPU_TRACK && e["name"] == "hypercall console-write"));
    }

    #[test]
    fn records_past_the_bound_are_counted_not_kept() {
        let mut trace = Trace::default();
        for i in 0..MAX_RECORDS as u64 + 3 {
            trace.push(Record::Exit { at: Duration::from_nanos(i), cpu: 0, kind: "io-in".into() });
        }
        assert_eq!((trace.records().len(), trace.dropped), (MAX_RECORDS, 3));
    }
}
