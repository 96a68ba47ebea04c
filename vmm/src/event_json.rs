//! Kernel events as JSON, for `superos-vmm run --events json`: one object per
//! event, built from the decoded [`Event`] so every field keeps its meaning.
//!
//! ```json
//! {"seq":5,"tick":2,"kind":"process-exited","pid":3,"code":3,"preemptions":0}
//! ```
//!
//! Every object starts with `seq`, `tick` and `kind` (the event kind in
//! kebab-case, see [`kind_name`]), followed by the variant's fields under
//! their Rust names. Fault, quota and spawn-error kinds are their stable
//! names (`"write-to-code"`), or `null` when the kernel sent a code this VMM
//! does not know. Numbers are plain JSON integers (addresses included).

use crate::session::EventEntry;
use serde_json::{json, Map, Value};
use superos_protocol::event::{Event, FaultKind, QuotaKind, SpawnError};
use superos_protocol::syscall::gate_kind_name;

/// The kebab-case name of an event's kind, as used in the `kind` field.
pub fn kind_name(event: &Event) -> &'static str {
    match event {
        Event::KernelReady { .. } => "kernel-ready",
        Event::GateSelfTestFailed { .. } => "gate-self-test-failed",
        Event::ProcessSpawned { .. } => "process-spawned",
        Event::SpawnFailed { .. } => "spawn-failed",
        Event::ProcessExited { .. } => "process-exited",
        Event::ProcessKilled { .. } => "process-killed",
        Event::HypercallRefused { .. } => "hypercall-refused",
        Event::MemMapped { .. } => "mem-mapped",
        Event::MemUnmapped { .. } => "mem-unmapped",
        Event::MemProtected { .. } => "mem-protected",
        Event::QuotaDenied { .. } => "quota-denied",
        Event::QuotaPressure { .. } => "quota-pressure",
        Event::FramePoolLow { .. } => "frame-pool-low",
        Event::KernelShutdown { .. } => "kernel-shutdown",
        Event::ShmCreated { .. } => "shm-created",
        Event::ShmGranted { .. } => "shm-granted",
        Event::ShmMapped { .. } => "shm-mapped",
        Event::ShmUnmapped { .. } => "shm-unmapped",
        Event::ShmRevoked { .. } => "shm-revoked",
        Event::ShmDestroyed { .. } => "shm-destroyed",
        Event::ShmAccepted { .. } => "shm-accepted",
    }
}

/// The fields of `event` (without `seq`, `tick` and `kind`), in declaration order.
fn fields(event: &Event) -> Value {
    let fault = |fault: Option<FaultKind>| json!(fault.map(FaultKind::name));
    let quota = |quota: Option<QuotaKind>| json!(quota.map(QuotaKind::name));
    let spawn_error = |error: Option<SpawnError>| json!(error.map(SpawnError::name));
    match *event {
        Event::KernelReady { gate_kind, free_frames, total_frames, cpus } => json!({
            "gate_kind": gate_kind,
            "gate": gate_kind_name(gate_kind),
            "free_frames": free_frames,
            "total_frames": total_frames,
            "cpus": cpus,
        }),
        Event::GateSelfTestFailed { gate_kind, vector, rip, error_code } => json!({
            "gate_kind": gate_kind,
            "gate": gate_kind_name(gate_kind),
            "vector": vector,
            "rip": rip,
            "error_code": error_code,
        }),
        Event::ProcessSpawned { pid, spec_index, pml4_gpa } => {
            json!({ "pid": pid, "spec_index": spec_index, "pml4_gpa": pml4_gpa })
        }
        Event::SpawnFailed { spec_index, error } => {
            json!({ "spec_index": spec_index, "error": spawn_error(error) })
        }
        Event::ProcessExited { pid, code, preemptions } => {
            json!({ "pid": pid, "code": code, "preemptions": preemptions })
        }
        Event::ProcessKilled { pid, fault: kind, addr, rip, error_code, vector } => json!({
            "pid": pid,
            "fault": fault(kind),
            "addr": addr,
            "rip": rip,
            "error_code": error_code,
            "vector": vector,
        }),
        Event::HypercallRefused { port, status } => json!({ "port": port, "status": status }),
        Event::MemMapped { pid, addr, len, prot } => {
            json!({ "pid": pid, "addr": addr, "len": len, "prot": prot })
        }
        Event::MemUnmapped { pid, addr, len, freed_pages } => {
            json!({ "pid": pid, "addr": addr, "len": len, "freed_pages": freed_pages })
        }
        Event::MemProtected { pid, addr, len, prot } => {
            json!({ "pid": pid, "addr": addr, "len": len, "prot": prot })
        }
        Event::QuotaDenied { pid, quota: kind, requested, limit } => {
            json!({ "pid": pid, "quota": quota(kind), "requested": requested, "limit": limit })
        }
        Event::QuotaPressure { pid, quota: kind, used, limit } => {
            json!({ "pid": pid, "quota": quota(kind), "used": used, "limit": limit })
        }
        Event::FramePoolLow { free_frames, total_frames } => {
            json!({ "free_frames": free_frames, "total_frames": total_frames })
        }
        Event::KernelShutdown { free_frames, total_frames, spawned } => {
            json!({ "free_frames": free_frames, "total_frames": total_frames, "spawned": spawned })
        }
        Event::ShmCreated { pid, region, len, rights } => {
            json!({ "pid": pid, "region": region, "len": len, "rights": rights })
        }
        Event::ShmGranted { pid, region, grantee, rights } => {
            json!({ "pid": pid, "region": region, "grantee": grantee, "rights": rights })
        }
        Event::ShmMapped { pid, region, addr, prot } => {
            json!({ "pid": pid, "region": region, "addr": addr, "prot": prot })
        }
        Event::ShmUnmapped { pid, region, addr } => json!({ "pid": pid, "region": region, "addr": addr }),
        Event::ShmRevoked { pid, region, target, addr } => {
            json!({ "pid": pid, "region": region, "target": target, "addr": addr })
        }
        Event::ShmDestroyed { pid, region, frames_freed } => {
            json!({ "pid": pid, "region": region, "frames_freed": frames_freed })
        }
        Event::ShmAccepted { pid, region, granter, rights } => {
            json!({ "pid": pid, "region": region, "granter": granter, "rights": rights })
        }
    }
}

/// One event as a JSON object: `seq`, `tick`, `kind`, then the event's
/// fields, and `cpu` (the CPU that logged it) on a VM with several.
pub fn to_json(entry: &EventEntry) -> Value {
    let mut object = Map::new();
    object.insert("seq".into(), json!(entry.seq));
    object.insert("tick".into(), json!(entry.tick));
    object.insert("kind".into(), json!(kind_name(&entry.event)));
    if let Value::Object(fields) = fields(&entry.event) {
        object.extend(fields);
    }
    if let Some(cpu) = entry.cpu {
        object.insert("cpu".into(), json!(cpu));
    }
    Value::Object(object)
}

/// One event as a single line of JSON (no trailing newline).
pub fn to_line(entry: &EventEntry) -> String {
    to_json(entry).to_string()
}

/// A console line in the same stream as the events (`--events json` keeps
/// stdout all JSON): `{"kind":"console","pid":1,"source":"hello-a#1","text":"..."}`
/// (pid 0 and source `kernel` for the kernel's own lines).
pub fn console_line(pid: u32, source: &str, text: &str) -> String {
    json!({ "kind": "console", "pid": pid, "source": source, "text": text }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use superos_protocol::event::EventKind;
    use superos_protocol::syscall::{GATE_KIND_INT3, GATE_KIND_SYSCALL, PROT_READ, PROT_WRITE};

    /// One of every event variant (some with unknown codes), and the object
    /// each must become, without `seq` and `tick`.
    fn cases() -> Vec<(Event, Value)> {
        vec![
            (
                Event::KernelReady {
                    gate_kind: GATE_KIND_INT3,
                    free_frames: 15688,
                    total_frames: 15697,
                    cpus: 1,
                },
                json!({"kind": "kernel-ready", "gate_kind": GATE_KIND_INT3, "gate": "int3",
                       "free_frames": 15688, "total_frames": 15697, "cpus": 1}),
            ),
            (
                Event::GateSelfTestFailed {
                    gate_kind: GATE_KIND_SYSCALL,
                    vector: 14,
                    rip: 0x7fff_ffff_0000,
                    error_code: 0x15,
                },
                json!({"kind": "gate-self-test-failed", "gate_kind": GATE_KIND_SYSCALL, "gate": "syscall",
                       "vector": 14, "rip": 0x7fff_ffff_0000u64, "error_code": 0x15}),
            ),
            (
                Event::ProcessSpawned { pid: 1, spec_index: 0, pml4_gpa: 0x17000 },
                json!({"kind": "process-spawned", "pid": 1, "spec_index": 0, "pml4_gpa": 0x17000}),
            ),
            (
                Event::SpawnFailed { spec_index: 2, error: Some(SpawnError::WritableAndExecutable) },
                json!({"kind": "spawn-failed", "spec_index": 2, "error": "writable-and-executable"}),
            ),
            (
                Event::SpawnFailed { spec_index: 3, error: None },
                json!({"kind": "spawn-failed", "spec_index": 3, "error": null}),
            ),
            (
                Event::ProcessExited { pid: 3, code: -7, preemptions: 0 },
                json!({"kind": "process-exited", "pid": 3, "code": -7, "preemptions": 0}),
            ),
            (
                Event::ProcessKilled {
                    pid: 4,
                    fault: Some(FaultKind::WriteToCode),
                    addr: 0x40_0010,
                    rip: 0x40_00a2,
                    error_code: 7,
                    vector: 14,
                },
                json!({"kind": "process-killed", "pid": 4, "fault": "write-to-code", "addr": 0x40_0010,
                       "rip": 0x40_00a2, "error_code": 7, "vector": 14}),
            ),
            (
                Event::ProcessKilled {
                    pid: 5,
                    fault: None,
                    addr: 0,
                    rip: u64::MAX,
                    error_code: 0,
                    vector: 13,
                },
                json!({"kind": "process-killed", "pid": 5, "fault": null, "addr": 0,
                       "rip": u64::MAX, "error_code": 0, "vector": 13}),
            ),
            (
                Event::HypercallRefused { port: 0x501, status: 1 },
                json!({"kind": "hypercall-refused", "port": 0x501, "status": 1}),
            ),
            (
                Event::MemMapped { pid: 6, addr: 0x1000_0000, len: 0x3000, prot: PROT_READ | PROT_WRITE },
                json!({"kind": "mem-mapped", "pid": 6, "addr": 0x1000_0000, "len": 0x3000, "prot": 3}),
            ),
            (
                Event::MemUnmapped { pid: 6, addr: 0x1000_1000, len: 0x1000, freed_pages: 1 },
                json!({"kind": "mem-unmapped", "pid": 6, "addr": 0x1000_1000, "len": 0x1000,
                       "freed_pages": 1}),
            ),
            (
                Event::MemProtected { pid: 6, addr: 0x1000_0000, len: 0x1000, prot: PROT_READ },
                json!({"kind": "mem-protected", "pid": 6, "addr": 0x1000_0000, "len": 0x1000, "prot": 1}),
            ),
            (
                Event::QuotaDenied {
                    pid: 7,
                    quota: Some(QuotaKind::Virtual),
                    requested: 2 << 20,
                    limit: 1 << 20,
                },
                json!({"kind": "quota-denied", "pid": 7, "quota": "virtual", "requested": 2 << 20,
                       "limit": 1 << 20}),
            ),
            (
                Event::QuotaDenied { pid: 7, quota: None, requested: 1, limit: 0 },
                json!({"kind": "quota-denied", "pid": 7, "quota": null, "requested": 1, "limit": 0}),
            ),
            (
                Event::QuotaPressure {
                    pid: 8,
                    quota: Some(QuotaKind::Resident),
                    used: 240 << 10,
                    limit: 256 << 10,
                },
                json!({"kind": "quota-pressure", "pid": 8, "quota": "resident", "used": 240 << 10,
                       "limit": 256 << 10}),
            ),
            (
                Event::FramePoolLow { free_frames: 100, total_frames: 4000 },
                json!({"kind": "frame-pool-low", "free_frames": 100, "total_frames": 4000}),
            ),
            (
                Event::KernelShutdown { free_frames: 15688, total_frames: 15697, spawned: 4 },
                json!({"kind": "kernel-shutdown", "free_frames": 15688, "total_frames": 15697,
                       "spawned": 4}),
            ),
            (
                Event::ShmCreated { pid: 1, region: 3, len: 0x4000, rights: 7 },
                json!({"kind": "shm-created", "pid": 1, "region": 3, "len": 0x4000, "rights": 7}),
            ),
            (
                Event::ShmGranted { pid: 1, region: 3, grantee: 2, rights: 1 },
                json!({"kind": "shm-granted", "pid": 1, "region": 3, "grantee": 2, "rights": 1}),
            ),
            (
                Event::ShmMapped { pid: 2, region: 3, addr: 0x1_0000_0000u64, prot: 1 },
                json!({"kind": "shm-mapped", "pid": 2, "region": 3, "addr": 0x1_0000_0000u64, "prot": 1}),
            ),
            (
                Event::ShmUnmapped { pid: 2, region: 3, addr: 0x1_0000_0000u64 },
                json!({"kind": "shm-unmapped", "pid": 2, "region": 3, "addr": 0x1_0000_0000u64}),
            ),
            (
                Event::ShmRevoked { pid: 1, region: 3, target: 2, addr: 0 },
                json!({"kind": "shm-revoked", "pid": 1, "region": 3, "target": 2, "addr": 0}),
            ),
            (
                Event::ShmDestroyed { pid: 1, region: 3, frames_freed: 4 },
                json!({"kind": "shm-destroyed", "pid": 1, "region": 3, "frames_freed": 4}),
            ),
            (
                Event::ShmAccepted { pid: 2, region: 3, granter: 1, rights: 1 },
                json!({"kind": "shm-accepted", "pid": 2, "region": 3, "granter": 1, "rights": 1}),
            ),
        ]
    }

    #[test]
    fn every_event_variant_becomes_a_json_object_with_all_its_fields() {
        let mut kinds_seen = Vec::new();
        for (i, (event, want)) in cases().into_iter().enumerate() {
            let entry = EventEntry { seq: 100 + i as u64, tick: 7 * i as u64, cpu: None, event };
            let line = to_line(&entry);
            assert!(!line.contains('\n'), "one line per event: {line}");
            let parsed: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
            let object = parsed.as_object().expect("an object");
            // seq, tick and kind come first, in that order.
            let keys: Vec<&str> = object.keys().map(String::as_str).collect();
            assert_eq!(keys[..3], ["seq", "tick", "kind"], "{line}");
            assert_eq!(object["seq"], json!(100 + i as u64), "{line}");
            assert_eq!(object["tick"], json!(7 * i as u64), "{line}");
            // Everything else is exactly the expected fields.
            let mut rest = object.clone();
            rest.remove("seq");
            rest.remove("tick");
            assert_eq!(Value::Object(rest), want, "{line}");
            kinds_seen.push(u32::from(entry.event.encode().kind));
        }
        // The cases cover every event kind the protocol defines.
        for raw in 0..256 {
            if EventKind::from_raw(raw).is_some() {
                assert!(kinds_seen.contains(&raw), "no test case for event kind {raw}");
            }
        }
    }

    #[test]
    fn the_documented_example_is_what_comes_out() {
        let entry = EventEntry {
            seq: 5,
            tick: 2,
            cpu: None,
            event: Event::ProcessExited { pid: 3, code: 3, preemptions: 0 },
        };
        assert_eq!(
            to_line(&entry),
            r#"{"seq":5,"tick":2,"kind":"process-exited","pid":3,"code":3,"preemptions":0}"#
        );
    }

    #[test]
    fn kind_names_are_kebab_case_and_distinct() {
        let names: Vec<&str> = cases().iter().map(|(event, _)| kind_name(event)).collect();
        for name in &names {
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c == '-'), "{name} is not kebab-case");
            let kinds = cases()
                .iter()
                .filter(|(event, _)| kind_name(event) == *name)
                .map(|(event, _)| event.encode().kind)
                .collect::<std::collections::BTreeSet<_>>();
            assert_eq!(kinds.len(), 1, "{name} names several event kinds");
        }
    }
}
