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
//! - from the kernel's trace ring (`superos_protocol::trace`, kept only in
//!   a traced run): one track per CPU with a slice for each stretch it ran
//!   one process, and on each process's track its system calls as slices
//!   from entry to return, with their number, first argument and result.
//!   Those records carry the guest's TSC, placed on the VMM's clock by
//!   [`TscClock`];
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
use superos_protocol::syscall::{decode_result, Syscall};
use superos_protocol::trace::{TraceKind, TraceRecord};

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
/// Track id of a CPU's run slices: this plus its number.
const CPU_TRACK: u64 = 2_000_000;
/// Most clock anchors one trace keeps (one per drain of the trace ring).
const MAX_ANCHORS: usize = 1 << 16;

/// Places the guest's TSC values on the VMM's clock, from pairs (TSC, VMM
/// time) taken when the kernel had the trace ring drained: its clock record
/// is the last thing it does before that VM exit, so each pair's VMM time
/// is late by the time the exit took to reach the VMM (microseconds; more
/// when the host descheduled the VMM's thread meanwhile), never early.
///
/// With the guest's TSC frequency known (KVM says it), a TSC value is
/// placed at that rate from the offset of the least-late pair, the best
/// estimate of the two clocks' offset (a late pair would put every record
/// of the run late, even after the kernel events that followed it). If KVM
/// did not say the frequency, the pairs are interpolated between and
/// extrapolated beyond at their own rate. Pairs that do not advance both
/// clocks (a kernel that lies about its TSC) are ignored.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TscClock {
    anchors: Vec<(u64, Duration)>,
    khz: u64,
    /// With `khz` known: the smallest VMM time minus TSC time of a pair, in
    /// nanoseconds.
    offset: Option<i128>,
}

fn nanos(at: Duration) -> i128 {
    at.as_nanos() as i128
}

impl TscClock {
    /// A clock for a guest whose TSC runs at `khz` (0: unknown).
    pub fn new(khz: u64) -> Self {
        TscClock { khz, ..Default::default() }
    }

    /// TSC ticks as nanoseconds at `khz` ticks per millisecond.
    fn ticks_to_nanos(ticks: i128, khz: i128) -> i128 {
        ticks * 1_000_000 / khz
    }

    /// The guest's TSC read `tsc` at VMM time `at`.
    pub fn anchor(&mut self, tsc: u64, at: Duration) {
        let advances = self.anchors.last().is_none_or(|&(t, d)| tsc > t && at >= d);
        if !advances || self.anchors.len() >= MAX_ANCHORS {
            return;
        }
        self.anchors.push((tsc, at));
        if self.khz != 0 {
            let offset = nanos(at) - Self::ticks_to_nanos(i128::from(tsc), i128::from(self.khz));
            self.offset = Some(self.offset.map_or(offset, |least| least.min(offset)));
        }
    }

    /// The VMM time of guest TSC `tsc`, if the clock knows enough.
    pub fn at(&self, tsc: u64) -> Option<Duration> {
        let placed = match self.offset {
            Some(offset) => Self::ticks_to_nanos(i128::from(tsc), i128::from(self.khz)) + offset,
            None => self.interpolated(tsc)?,
        };
        Some(Duration::from_nanos(u64::try_from(placed.max(0)).unwrap_or(u64::MAX)))
    }

    /// Without the TSC frequency: between the pairs around `tsc`, or at the
    /// rate of the first and last pair beyond them.
    fn interpolated(&self, tsc: u64) -> Option<i128> {
        let (&(first_t, first_d), &(last_t, last_d)) = (self.anchors.first()?, self.anchors.last()?);
        let after = self.anchors.partition_point(|&(t, _)| t <= tsc);
        if let (Some(&(t0, d0)), Some(&(t1, d1))) =
            (after.checked_sub(1).and_then(|i| self.anchors.get(i)), self.anchors.get(after))
        {
            return Some(nanos(d0) + i128::from(tsc - t0) * (nanos(d1) - nanos(d0)) / i128::from(t1 - t0));
        }
        if last_t == first_t || last_d == first_d {
            return None;
        }
        let (t0, d0) = if after == 0 { (first_t, first_d) } else { (last_t, last_d) };
        let ticks = i128::from(tsc) - i128::from(t0);
        Some(nanos(d0) + ticks * (nanos(last_d) - nanos(first_d)) / i128::from(last_t - first_t))
    }
}

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
    /// A record from the kernel's trace ring, timed by its TSC.
    Kernel(TraceRecord),
}

impl Record {
    fn at(&self, clock: &TscClock) -> Option<Duration> {
        match self {
            Record::Event { at, .. }
            | Record::Exit { at, .. }
            | Record::Check { at, .. }
            | Record::Held { at, .. } => Some(*at),
            Record::Kernel(record) => clock.at(record.tsc),
        }
    }
}

/// The records of one run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trace {
    records: Vec<Record>,
    /// Records not kept (beyond [`MAX_RECORDS`]).
    pub dropped: u64,
    /// Places the kernel's records on the VMM's clock.
    pub clock: TscClock,
    /// Records the kernel's trace ring lost (it was full).
    pub kernel_lost: u64,
}

/// A system call entered and not yet returned from.
struct OpenCall {
    number: u64,
    arg: u64,
    cpu: u16,
    at: Duration,
}

/// A system call as a slice on its process's track, ending at `end` with
/// `result` (JSON).
fn syscall_slice(pid: u32, call: &OpenCall, end: Duration, result: Value) -> Value {
    let name = Syscall::from_raw(call.number)
        .map_or_else(|| format!("syscall {}", call.number), |s| s.name().into());
    json!({"ph": "X", "name": name, "pid": GUEST, "tid": u64::from(pid), "ts": micros(call.at),
        "dur": micros(end.saturating_sub(call.at)),
        "args": {"number": call.number, "arg0": format!("{:#x}", call.arg), "cpu": call.cpu, "result": result}})
}

/// A system call's result in words: its value, or its error's name.
fn result_json(rax: u64) -> Value {
    match decode_result(rax) {
        Ok(value) => json!(value),
        Err(error) => json!(format!("error {}", error.name())),
    }
}

fn micros(at: Duration) -> f64 {
    at.as_nanos() as f64 / 1000.0
}

impl Trace {
    /// An empty trace of a guest whose TSC runs at `tsc_khz` (0: unknown).
    pub fn new(tsc_khz: u64) -> Self {
        Trace { clock: TscClock::new(tsc_khz), ..Default::default() }
    }

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
        let mut calls: BTreeMap<u32, OpenCall> = BTreeMap::new();
        let mut running: BTreeMap<u16, (u32, Duration)> = BTreeMap::new();
        let mut unplaced = 0u64;
        // A traced kernel stamps each event it logs: placed on the same clock
        // as the calls around it (else at the drain that brought it).
        let logged: BTreeMap<u64, u64> = self
            .records
            .iter()
            .filter_map(|r| match r {
                Record::Kernel(k) if k.kind == TraceKind::Event as u16 => Some((k.a, k.tsc)),
                _ => None,
            })
            .collect();
        let mut records: Vec<(Duration, &Record)> = Vec::with_capacity(self.records.len());
        for record in &self.records {
            let at = match record {
                Record::Event { entry, .. } => logged
                    .get(&entry.seq)
                    .and_then(|&tsc| self.clock.at(tsc))
                    .or_else(|| record.at(&self.clock)),
                _ => record.at(&self.clock),
            };
            match at {
                Some(at) => records.push((at.min(end), record)),
                None => unplaced += 1,
            }
        }
        // Stable: records of one time keep the order they came in.
        records.sort_by_key(|&(at, _)| at);
        let run_slice = |cpu: u16, pid: u32, from: Duration, to: Duration| -> Value {
            let name = names.get(&pid).map_or("?", String::as_str);
            json!({"ph": "X", "name": format!("pid {pid} {name}"), "pid": GUEST, "tid": CPU_TRACK + u64::from(cpu),
                "ts": micros(from), "dur": micros(to.saturating_sub(from)), "args": {"pid": pid}})
        };
        for (at, record) in records {
            match record {
                Record::Kernel(kernel) => {
                    let (cpu, pid) = (kernel.cpu, kernel.pid);
                    match TraceKind::from_raw(kernel.kind) {
                        Some(kind @ (TraceKind::Run | TraceKind::Idle)) => {
                            if tracks.insert(CPU_TRACK + u64::from(cpu)) {
                                events.push(meta(
                                    GUEST,
                                    Some(CPU_TRACK + u64::from(cpu)),
                                    &format!("CPU {cpu}"),
                                ));
                            }
                            if let Some((was, from)) = running.remove(&cpu) {
                                events.push(run_slice(cpu, was, from, at));
                            }
                            if kind == TraceKind::Run {
                                running.insert(cpu, (pid, at));
                            }
                        }
                        // Only within the process's life: its track's slice.
                        Some(TraceKind::SyscallEnter) if live.get(&pid).is_some_and(|&born| born <= at) => {
                            calls.insert(pid, OpenCall { number: kernel.a, arg: kernel.b, cpu, at });
                        }
                        Some(TraceKind::SyscallReturn) => {
                            if let Some(call) = calls.remove(&pid).filter(|call| call.number == kernel.a) {
                                events.push(syscall_slice(pid, &call, at, result_json(kernel.b)));
                            }
                        }
                        _ => {}
                    }
                }
                Record::Event { at: _, entry } => {
                    let pid = entry.event.encode().pid;
                    let track = if pid == 0 { KERNEL_TRACK } else { u64::from(pid) };
                    if pid != 0 && tracks.insert(track) {
                        let name = names.get(&pid).map_or("?", String::as_str);
                        events.push(meta(GUEST, Some(track), &format!("pid {pid} {name}")));
                    }
                    let kind = event_json::kind_name(&entry.event);
                    if let Event::ProcessSpawned { .. } = entry.event {
                        live.insert(pid, at);
                        events.push(json!({"ph": "B", "name": "process", "pid": GUEST, "tid": track,
                            "ts": micros(at), "args": {"pid": pid}}));
                    }
                    events.push(json!({"ph": "i", "s": "t", "name": kind, "pid": GUEST, "tid": track,
                        "ts": micros(at), "args": event_json::to_json(entry)}));
                    if let Event::ProcessExited { .. } | Event::ProcessKilled { .. } = entry.event {
                        // A call it never returned from (`exit`, a kill in
                        // a call) ends with it.
                        if let Some(call) = calls.remove(&pid) {
                            events.push(syscall_slice(pid, &call, at, json!(format!("none: {kind}"))));
                        }
                        // And so does its run on a CPU (the last process of
                        // a run leaves no idle record: the kernel stops).
                        running.retain(|&cpu, &mut (was, from)| {
                            let ends = was == pid;
                            if ends {
                                events.push(run_slice(cpu, was, from, at));
                            }
                            !ends
                        });
                        if live.remove(&pid).is_some() {
                            events.push(json!({"ph": "E", "pid": GUEST, "tid": track, "ts": micros(at),
                                "args": {"outcome": kind}}));
                        }
                    }
                }
                Record::Exit { at: _, cpu, kind } => {
                    let track = VCPU_TRACK + u64::from(*cpu);
                    if tracks.insert(track) {
                        events.push(meta(GUEST, Some(track), &format!("vCPU {cpu}: VM exits")));
                    }
                    events.push(json!({"ph": "i", "s": "t", "name": kind, "pid": GUEST, "tid": track,
                        "ts": micros(at)}));
                }
                Record::Check { at: _, took, trigger, violations } => {
                    events.push(json!({"ph": "X", "name": "invariant check", "pid": VMM, "tid": CHECK_TRACK,
                        "ts": micros(at), "dur": micros(*took),
                        "args": {"trigger": trigger, "violations": violations}}));
                }
                Record::Held { at: _, took, point } => {
                    events.push(json!({"ph": "X", "name": "guest held", "pid": VMM, "tid": CHECK_TRACK,
                        "ts": micros(at), "dur": micros(*took), "args": {"at": point}}));
                }
            }
        }
        // Every begin has its end: what still ran, or was in a system call,
        // when the run ended.
        for (cpu, (pid, from)) in running {
            events.push(run_slice(cpu, pid, from, end));
        }
        for (pid, call) in calls {
            events.push(syscall_slice(pid, &call, end, json!("none: unfinished")));
        }
        for pid in live.into_keys() {
            events.push(json!({"ph": "E", "pid": GUEST, "tid": u64::from(pid), "ts": micros(end),
                "args": {"outcome": "unfinished"}}));
        }
        json!({
            "traceEvents": events,
            "displayTimeUnit": "ms",
            "otherData": {"producer": "superos-vmm run --trace", "dropped": self.dropped,
                "kernel_lost": self.kernel_lost, "unplaced": unplaced},
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

    #[test]
    fn the_tsc_clock_takes_the_offset_of_the_least_late_anchor() {
        // 1 GHz: a tick is a nanosecond.
        let mut clock = TscClock::new(1_000_000);
        assert_eq!(clock.at(5), None, "no anchor yet");
        clock.anchor(3_000_000, ms(14)); // offset 11 ms
        assert_eq!(clock.at(3_000_000), Some(ms(14)));
        clock.anchor(5_000_000, ms(14) + ms(1)); // offset 10 ms: the earlier pair was late
        assert_eq!(clock.at(2_000_000), Some(ms(12)));
        assert_eq!(clock.at(6_000_000), Some(ms(16)));
        clock.anchor(9_000_000, ms(30)); // a late one changes nothing
        assert_eq!(clock.at(6_000_000), Some(ms(16)));
        // Anchors that do not advance both clocks are a lying kernel's: ignored.
        clock.anchor(1_000, ms(40));
        clock.anchor(10_000_000, ms(1));
        assert_eq!(clock.at(6_000_000), Some(ms(16)));
        // Before time began: clamped to the VMM's start.
        let mut early = TscClock::new(1);
        early.anchor(u64::MAX, ms(1));
        assert_eq!(early.at(0), Some(Duration::ZERO));
    }

    #[test]
    fn without_the_tsc_rate_the_clock_interpolates_its_anchors() {
        let mut clock = TscClock::new(0);
        clock.anchor(1_000, ms(1));
        assert_eq!(clock.at(2_000), None, "one anchor gives no rate");
        clock.anchor(3_000, ms(3));
        clock.anchor(4_000, ms(7));
        assert_eq!(clock.at(2_000), Some(ms(2)));
        assert_eq!(clock.at(3_500), Some(ms(5)));
        // Beyond the anchors, their overall rate: 2 ms per 1000 ticks.
        assert_eq!(clock.at(5_000), Some(ms(9)));
        assert_eq!(clock.at(500), Some(Duration::ZERO));
    }

    fn kernel(tsc: u64, kind: TraceKind, cpu: u16, pid: u32, a: u64, b: u64) -> Record {
        Record::Kernel(TraceRecord { tsc, kind: kind as u16, cpu, pid, a, b })
    }

    #[test]
    fn kernel_records_become_run_slices_per_cpu_and_system_calls_per_process() {
        use superos_protocol::syscall::{encode_result, SysError};
        let mut trace = Trace::new(1_000); // 1 MHz: a tick is a microsecond
        trace.clock.anchor(0, Duration::ZERO);
        trace.push(Record::Event {
            at: ms(1),
            entry: entry(0, Event::ProcessSpawned { pid: 1, spec_index: 0, pml4_gpa: 0x5000 }),
        });
        trace.push(kernel(2_000, TraceKind::Run, 0, 1, 0, 0));
        trace.push(kernel(3_000, TraceKind::SyscallEnter, 0, 1, Syscall::MemMap as u64, 4096));
        trace.push(kernel(4_000, TraceKind::SyscallReturn, 0, 1, Syscall::MemMap as u64, 0x1_0000_0000));
        trace.push(kernel(5_000, TraceKind::SyscallEnter, 0, 1, Syscall::IpcSend as u64, 7));
        let refused = encode_result(Err(SysError::NoSuchProcess));
        trace.push(kernel(6_000, TraceKind::SyscallReturn, 0, 1, Syscall::IpcSend as u64, refused));
        trace.push(kernel(7_000, TraceKind::SyscallEnter, 0, 1, Syscall::Exit as u64, 0));
        trace.push(Record::Event {
            at: ms(8),
            entry: entry(1, Event::ProcessExited { pid: 1, code: 0, preemptions: 0 }),
        });
        trace.push(kernel(8_500, TraceKind::Idle, 0, 0, 0, 0));
        // A return for a process that is gone, and a call of one never
        // spawned: not on any track.
        trace.push(kernel(8_600, TraceKind::SyscallReturn, 0, 1, Syscall::Exit as u64, 0));
        trace.push(kernel(8_700, TraceKind::SyscallEnter, 1, 5, Syscall::Yield as u64, 0));
        // CPU 1 still runs pid 2 when the run ends at 10 ms.
        trace.push(kernel(9_000, TraceKind::Run, 1, 2, 0, 0));
        let names = BTreeMap::from([(1, "a".to_string()), (2, "b".to_string())]);
        let json = trace.to_json(ms(10), &names);
        let events = json["traceEvents"].as_array().unwrap();
        let slices: Vec<(u64, &str, f64, f64)> = events
            .iter()
            .filter(|e| e["ph"] == "X")
            .map(|e| {
                (
                    e["tid"].as_u64().unwrap(),
                    e["name"].as_str().unwrap(),
                    e["ts"].as_f64().unwrap(),
                    e["dur"].as_f64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            slices,
            [
                (1, "mem_map", 3000.0, 1000.0),
                (1, "ipc_send", 5000.0, 1000.0),
                (1, "exit", 7000.0, 1000.0),
                (CPU_TRACK, "pid 1 a", 2000.0, 6000.0),
                (CPU_TRACK + 1, "pid 2 b", 9000.0, 1000.0),
            ]
        );
        let result =
            |name: &str| events.iter().find(|e| e["name"] == name).unwrap()["args"]["result"].clone();
        assert_eq!(result("mem_map"), json!(0x1_0000_0000u64));
        let mem_map = events.iter().find(|e| e["name"] == "mem_map").unwrap();
        assert_eq!((&mem_map["args"]["arg0"], &mem_map["args"]["cpu"]), (&json!("0x1000"), &json!(0)));
        assert_eq!(result("ipc_send"), json!("error no-such-process"));
        assert_eq!(result("exit"), json!("none: process-exited"));
        assert!(events
            .iter()
            .any(|e| e["ph"] == "M" && e["tid"] == CPU_TRACK + 1 && e["args"]["name"] == "CPU 1"));
        assert_eq!(json["otherData"]["unplaced"], 0);
    }

    #[test]
    fn an_event_the_kernel_stamped_is_placed_at_its_stamp_not_its_drain() {
        let mut trace = Trace::new(1_000); // a tick is a microsecond
        trace.clock.anchor(0, Duration::ZERO);
        trace.push(Record::Event {
            at: ms(1),
            entry: entry(0, Event::ProcessSpawned { pid: 1, spec_index: 0, pml4_gpa: 0x5000 }),
        });
        trace.push(kernel(2_000, TraceKind::SyscallEnter, 0, 1, Syscall::Exit as u64, 0));
        // Drained (timed) at 1.5 ms by a late clock pair, logged at 3 ms.
        trace.push(Record::Event {
            at: us(1_500),
            entry: entry(1, Event::ProcessExited { pid: 1, code: 0, preemptions: 0 }),
        });
        trace.push(kernel(3_000, TraceKind::Event, 0, 0, 1, 0));
        let json = trace.to_json(ms(9), &BTreeMap::from([(1, "a".to_string())]));
        let events = json["traceEvents"].as_array().unwrap();
        let exited = events.iter().find(|e| e["name"] == "process-exited").unwrap();
        assert_eq!(exited["ts"].as_f64(), Some(3000.0));
        let exit = events.iter().find(|e| e["name"] == "exit").expect("the exit call, inside the life");
        assert_eq!((exit["ts"].as_f64(), exit["dur"].as_f64()), (Some(2000.0), Some(1000.0)));
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn kernel_records_without_a_clock_are_counted_not_placed() {
        let mut trace = Trace::new(0);
        trace.push(kernel(1, TraceKind::Run, 0, 1, 0, 0));
        trace.kernel_lost = 3;
        let json = trace.to_json(ms(1), &BTreeMap::new());
        assert_eq!(
            (json["otherData"]["unplaced"].as_u64(), json["otherData"]["kernel_lost"].as_u64()),
            (Some(1), Some(3))
        );
        assert!(!json["traceEvents"].as_array().unwrap().iter().any(|e| e["ph"] == "X"));
    }
}
