//! `superos-vmm run --api` and `superos-vmm inspect`: a live VM examined
//! through its control socket (processes, mappings, frames, shared regions,
//! events, checks, translations, dumps, pause/resume/quit), a lingering VM
//! examined after it finished, events followed as they happen, snapshots
//! that answer exactly like the live VM they were taken from, the SVG map,
//! and the errors users see.
//!
//! Synchronisation is on observable facts only: a line on the VMM's output,
//! the socket accepting connections, a long-polled event, the number of
//! connected clients; never a sleep.

mod common;
use common::{gdb, inspect, kvm_available, wait_connectable, Vmm, LIVE_SCENARIO, PATIENCE};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_superos-vmm");

/// A scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    common::scratch("inspect", name)
}

/// Removes the `at` field of a query result (where the guest was: "in user
/// code ..." live, "after the guest stopped ..." in a snapshot).
fn without_at(mut value: Value) -> Value {
    value.as_object_mut().unwrap().remove("at");
    value
}

/// Two spinners on two CPUs.
const TWO_CPUS_SCENARIO: &str = r#"
description = "two spinners on two CPUs"
[vm]
cpus = 2

[[process]]
name = "spinner-a"
program = "spin"

[[process]]
name = "spinner-b"
program = "spin"
"#;

/// On two CPUs: `ps` names each process's CPU, `check` reads and checks
/// every vCPU (live, with the other vCPU paused, and in the snapshot, which
/// carries each vCPU's state), and a snapshot whose second vCPU's state was
/// altered is caught naming that vCPU.
#[test]
fn two_cpus_are_examined_live_and_in_a_snapshot_vcpu_by_vcpu() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("two-cpus");
    let scenario = dir.join("two-cpus.toml");
    std::fs::write(&scenario, TWO_CPUS_SCENARIO).unwrap();
    let socket = dir.join("vm.sock");
    let snapshot = dir.join("vm.snap");
    let mut vmm = Vmm::start(
        &[scenario.to_str().unwrap(), "--timeout", "120", "--snapshot-on-exit", snapshot.to_str().unwrap()],
        &socket,
    );
    vmm.wait_for_line("[spinner-a#1] spin: spinning forever");
    vmm.wait_for_line("[spinner-b#2] spin: spinning forever");
    let paused = vmm.text(&["pause"]);
    assert!(paused.starts_with("paused "), "{paused}");
    // Each spinner has a CPU of its own (neither ever blocks, and a CPU
    // never takes a process another one runs).
    let ps = vmm.json(&["ps"]);
    let processes = ps["processes"].as_array().unwrap();
    let mut cpus: Vec<u64> =
        processes.iter().map(|p| p["cpu"].as_u64().unwrap_or_else(|| panic!("{p}"))).collect();
    cpus.sort_unstable();
    assert_eq!(cpus, [0, 1], "{ps}");
    assert!(processes.iter().all(|p| p["state"] == "running"), "{ps}");
    let table = vmm.text(&["ps"]);
    assert!(table.lines().nth(1).is_some_and(|header| header.contains(" cpu ")), "{table}");
    // Each one's registers are its vCPU's: it is in ring 3 there, in `spin`'s code.
    for p in processes {
        let pid = p["pid"].to_string();
        let regs = vmm.json(&["regs", &pid]);
        assert_eq!(regs["source"], format!("vCPU {} (in ring 3)", p["cpu"]), "{regs}");
        let rip = regs["registers"]["rip"].as_u64().unwrap();
        assert!((0x40_0000..0x41_0000).contains(&rip), "{regs}");
    }
    let check = vmm.text(&["check"]);
    // The map says what each CPU runs, and so does its SVG legend.
    let map = vmm.text(&["map"]);
    let line = map.lines().nth(1).unwrap_or_default().to_string();
    assert!(line.starts_with("2 CPUs: CPU 0 runs pid ") && line.contains(", CPU 1 runs pid "), "{map}");
    let svg = dir.join("map.svg");
    vmm.text(&["map", "--svg", svg.to_str().unwrap()]);
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.contains("spinner-a (on CPU ") && svg.contains(&line), "{svg}");
    assert!(
        check.contains("every invariant held") && check.contains("the CPU state of 2 vCPUs read"),
        "{check}"
    );
    vmm.text(&["quit"]);
    let (code, output) = vmm.finish();
    assert_eq!(code, 1, "stopped with processes unfinished:\n{output}");

    // The snapshot: both vCPUs' states, checked; events name their CPU.
    let snap = snapshot.to_str().unwrap();
    let (code, stdout, _) = inspect(&["--snapshot", snap, "check"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("the CPU state of 2 vCPUs read in user code"), "{stdout}");
    let (_, events, _) = inspect(&["--snapshot", snap, "events"]);
    assert!(events.lines().next().is_some_and(|l| l.contains("cpu 0 kernel ready")), "{events}");
    // vCPU 1's LSTAR moved in the file: the offline check names vCPU 1.
    let mut loaded = superos_vmm::snapshot::read(&snapshot).unwrap();
    assert_eq!(loaded.state.cpus.iter().map(|c| c.cpu).collect::<Vec<_>>(), [0, 1]);
    let lstar =
        &mut loaded.state.cpus[1].state.msrs.iter_mut().find(|(index, _)| *index == 0xc000_0082).unwrap().1;
    *lstar += 1;
    let altered = dir.join("altered.snap");
    let file = std::fs::File::create(&altered).unwrap();
    superos_vmm::snapshot::write(file, &loaded.ram, &loaded.state, &loaded.meta).unwrap();
    let (code, stdout, _) = inspect(&["--snapshot", altered.to_str().unwrap(), "check"]);
    assert_eq!(code, 5, "violations found: {stdout}");
    assert!(
        stdout.contains("cpu-state-intact") && stdout.contains("vCPU 1: ") && stdout.contains("LSTAR"),
        "{stdout}"
    );
}

#[test]
fn a_live_vm_is_examined_through_its_control_socket_and_its_snapshot_answers_the_same() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("live");
    let scenario = dir.join("live.toml");
    std::fs::write(&scenario, LIVE_SCENARIO).unwrap();
    let socket = dir.join("vm.sock");
    let snapshot = dir.join("vm.snap");
    let mut vmm = Vmm::start(
        &[scenario.to_str().unwrap(), "--timeout", "120", "--snapshot-on-exit", snapshot.to_str().unwrap()],
        &socket,
    );
    vmm.wait_for_line("[spinner#2] spin: spinning forever");
    vmm.wait_for_line("[producer#1] shm-pipeline: producer: MEM_SHARE:1 mapped read-write at 0x100000000");

    // ps: both processes, the kernel's counters agreeing with the walk.
    let ps = vmm.json(&["ps"]);
    let processes = ps["processes"].as_array().unwrap();
    let names: Vec<&str> = processes.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["producer", "spinner"], "{ps}");
    for p in processes {
        assert_eq!(p["resident_bytes"], p["walked"]["resident_bytes"], "{p}");
        assert!(p["walked"]["pages"].as_u64().unwrap() >= 4, "{p}");
        assert!(p["walked"]["tables"].as_u64().unwrap() >= 4, "{p}");
    }
    assert_eq!(processes[0]["walked"]["shared_frames"], 5, "the producer maps its 5-page region: {ps}");
    assert_ne!(processes[0]["pml4"], processes[1]["pml4"]);
    let table = vmm.text(&["ps"]);
    assert!(table.contains("producer") && table.contains("spinner") && table.contains("pml4"), "{table}");

    // maps: the code page is r-x and user-accessible, data rw-, the region
    // rw- at the address the kernel chose, the gate r-x.
    let maps = vmm.json(&["maps", "1"]);
    let ranges = maps["ranges"].as_array().unwrap();
    let code = ranges.iter().find(|r| r["start"] == 0x40_0000).unwrap_or_else(|| panic!("{maps}"));
    assert_eq!((code["rights"].as_str(), code["user"].as_bool()), (Some("r-x"), Some(true)), "{code}");
    assert_eq!(code["owner_key"], "private:1");
    let region = ranges.iter().find(|r| r["start"] == 0x1_0000_0000u64).unwrap_or_else(|| panic!("{maps}"));
    assert_eq!((region["rights"].as_str(), region["pages"].as_u64()), (Some("rw-"), Some(5)));
    assert_eq!(region["owner_key"], "shared:1");
    let gate = ranges.iter().find(|r| r["start"] == 0x7fff_ffff_0000u64).unwrap_or_else(|| panic!("{maps}"));
    assert_eq!((gate["rights"].as_str(), gate["owner_key"].as_str()), (Some("r-x"), Some("gate")));
    assert!(ranges.iter().all(|r| !(r["writable"] == true && r["nx"] == false)), "W^X: {maps}");
    let table = vmm.text(&["maps", "1"]);
    let code_line = table.lines().find(|l| l.starts_with("0x400000 ")).unwrap_or_else(|| panic!("{table}"));
    assert!(code_line.contains("r-x") && code_line.contains("private to pid 1 (producer)"), "{code_line}");
    let (code, _, stderr) = vmm.inspect(&["maps", "9"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no live process with pid 9 (live: 1, 2)"), "{stderr}");

    // frames: owners as the kernel records them, and who maps them.
    let frames = vmm.json(&["frames"]);
    let owner = |key: &str| {
        frames["owners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["key"] == key)
            .cloned()
            .unwrap_or_else(|| panic!("no {key}: {frames}"))
    };
    assert_eq!(owner("shared:1")["frames"], 5);
    assert_eq!(owner("shared:1")["mapped"], 5);
    assert_eq!(owner("message:2")["frames"], 1, "the MEM_SHARE message waits in pid 2's mailbox");
    assert_eq!(owner("table:1")["mapped"], 0, "no process maps a page table");
    assert_eq!(owner("gate")["mapped"], 1);
    assert_eq!(frames["multiply_mapped_frames"], 1, "only the gate is mapped by both: {frames}");
    assert_eq!(frames["ram_frames"], 16384);

    // shares: the region, its owner mapped read-write, pid 2 granted
    // read-only and not mapped.
    let shares = vmm.json(&["shares"]);
    let region = &shares["regions"][0];
    assert_eq!((region["id"].as_u64(), region["owner"].as_u64()), (Some(1), Some(1)), "{shares}");
    let participants = region["participants"].as_array().unwrap();
    assert_eq!(participants[0]["rights"], "rwg");
    assert_eq!(participants[0]["mapped_at"], 0x1_0000_0000u64);
    assert_eq!(
        (participants[0]["walked_pages"].as_u64(), participants[0]["walked_writable"].as_u64()),
        (Some(5), Some(5))
    );
    assert_eq!((participants[1]["pid"].as_u64(), participants[1]["rights"].as_str()), (Some(2), Some("r--")));
    assert_eq!(
        (participants[1]["mapped_at"].clone(), participants[1]["walked_pages"].as_u64()),
        (Value::Null, Some(0))
    );

    // check: nothing violated, the CPU state included (read where the
    // vCPU is held).
    let (code, stdout, stderr) = vmm.inspect(&["check"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("every invariant held"), "{stdout}");
    assert!(stdout.contains("the CPU state read in user code at rip"), "{stdout}");
    let check = vmm.json(&["check"]);
    assert_eq!(check["violations"], Value::Array(vec![]));
    assert_eq!(check["cpu_checked"], Value::Bool(true), "{check}");

    // translate: level by level down to the code frame.
    let translation = vmm.text(&["translate", "1", "0x400010"]);
    for needle in ["PML4", "PDPT", "PD ", "PT ", "-> physical", "r-x user", "private to pid 1 (producer)"] {
        assert!(translation.contains(needle), "{needle:?} in\n{translation}");
    }
    let translation = vmm.json(&["translate", "1", "0x400010"]);
    let leaf = &translation["leaf"];
    assert_eq!(leaf["phys"].as_u64().unwrap() & 0xfff, 0x10);
    assert!(vmm.text(&["translate", "1", "0x200000"]).contains("not mapped"));

    // dump: the bytes of the code page; refused where nothing is mapped,
    // across the end of the gate page, in the kernel half, and too long.
    let dump = vmm.text(&["dump", "1", "0x400000", "64"]);
    let rows: Vec<&str> = dump.lines().filter(|l| l.starts_with("00000000004000")).collect();
    assert_eq!(rows.len(), 4, "{dump}");
    let hex = vmm.json(&["dump", "1", "0x400000", "64"])["hex"].as_str().unwrap().to_string();
    assert_eq!(hex.len(), 128);
    assert_ne!(hex, "0".repeat(128), "code is not all zero");
    let phys = leaf["frame"].as_u64().unwrap();
    assert!(phys != 0);
    for (args, needle) in [
        (["dump", "1", "0x200000", "16"], "does not map 0x200000"),
        (["dump", "1", "0x7fffffff0ff0", "32"], "does not map 0x7fffffff1000"),
        (["dump", "1", "0xffff800000000000", "16"], "does not map 0xffff800000000000"),
        (["dump", "1", "0x400000", "65537"], "dump length must be 1 to 65536"),
        (["dump", "1", "0x400000", "0"], "dump length must be 1 to 65536"),
    ] {
        let (code, stdout, stderr) = vmm.inspect(&args);
        assert_eq!(code, 1, "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }

    // events: what the kernel logged so far, as JSON lines.
    let (code, stdout, _) = vmm.inspect(&["--json", "events"]);
    assert_eq!(code, 0);
    let kinds: Vec<String> = stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["kind"].as_str().unwrap().to_string())
        .collect();
    for kind in ["kernel-ready", "process-spawned", "shm-created", "shm-granted", "shm-mapped"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
    }
    assert!(vmm.text(&["events"]).contains("pid 1 created MEM_SHARE:1"));

    // Garbage on the socket gets error answers; the VMM carries on.
    let mut raw = UnixStream::connect(&socket).unwrap();
    raw.set_read_timeout(Some(PATIENCE)).unwrap();
    raw.write_all(b"hello\n{\"cmd\":\"maps\",\"pid\":99}\n\xff\n{\"cmd\":\"ps\"}\n").unwrap();
    let mut reader = BufReader::new(raw.try_clone().unwrap());
    let answers: Vec<Value> = (0..4)
        .map(|_| {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            serde_json::from_str(&line).unwrap()
        })
        .collect();
    assert_eq!(answers[0]["ok"], false);
    assert!(answers[1]["error"].as_str().unwrap().contains("no live process with pid 99"), "{}", answers[1]);
    assert_eq!(answers[2]["error"], "request is not UTF-8");
    assert_eq!(answers[3]["ok"], true);
    drop(reader);
    drop(raw);

    // pause holds the guest: two looks see exactly the same thing.
    let paused = vmm.text(&["pause"]);
    assert!(paused.starts_with("paused "), "{paused}");
    assert_eq!(vmm.json(&["status"])["state"], "paused");
    let first = vmm.json(&["ps"]);
    let second = vmm.json(&["ps"]);
    assert_eq!(first, second, "a paused guest does not change");
    assert_eq!(vmm.json(&["ps"])["at"], first["at"]);
    let resumed = vmm.text(&["resume"]);
    assert!(resumed.starts_with("resumed"), "{resumed}");
    assert_eq!(vmm.json(&["status"])["state"], "running");
    let (code, _, stderr) = vmm.inspect(&["resume"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("not paused"), "{stderr}");

    // The SVG map, well-formed.
    let svg_path = dir.join("map.svg");
    let wrote = vmm.text(&["map", "--svg", svg_path.to_str().unwrap()]);
    assert!(wrote.contains("every isolation invariant held"), "{wrote}");
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert_eq!(superos_vmm::svg::well_formed(&svg), Ok(()));
    for needle in [
        "pid 1 producer: private",
        "pid 2 spinner: page tables",
        "shared region 1 (owner pid 1, granted to 2)",
        "free (",
    ] {
        assert!(svg.contains(needle), "{needle:?} not in the SVG");
    }

    // Pause again, look, and quit there: the snapshot is that moment.
    vmm.text(&["pause"]);
    let live: Vec<Value> = [&["ps"][..], &["maps", "1"], &["maps", "2"], &["frames"], &["shares"]]
        .iter()
        .map(|a| vmm.json(a))
        .collect();
    let quit = vmm.text(&["quit"]);
    assert!(quit.contains("quitting"), "{quit}");
    let (code, output) = vmm.finish();
    assert_eq!(code, 1, "stopped with processes unfinished:\n{output}");
    assert!(output.contains("stopped on request (inspect quit)"), "{output}");
    assert!(!socket.exists(), "the socket is removed");

    let snap = snapshot.to_str().unwrap();
    for (args, live) in
        [&["ps"][..], &["maps", "1"], &["maps", "2"], &["frames"], &["shares"]].iter().zip(live)
    {
        let mut all = vec!["--snapshot", snap, "--json"];
        all.extend_from_slice(args);
        let (code, stdout, stderr) = inspect(&all);
        assert_eq!(code, 0, "{args:?}: {stderr}");
        let offline: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert!(offline["at"].as_str().unwrap().contains("stopped on request"), "{offline}");
        assert_eq!(
            without_at(offline),
            without_at(live),
            "{args:?} differs between the live VM and its snapshot"
        );
    }
    let (code, stdout, _) = inspect(&["--snapshot", snap, "check"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("every invariant held"), "{stdout}");
    // The snapshot carries the CPU state of the point `quit` stopped it at.
    assert!(stdout.contains("the CPU state read in user code at rip"), "{stdout}");
    let (code, stdout, _) = inspect(&["--snapshot", snap, "dump", "1", "0x400000", "64"]);
    assert_eq!(
        (code, stdout.lines().skip(1).collect::<Vec<_>>()),
        (0, dump.lines().skip(1).collect::<Vec<_>>())
    );
    let (_, stdout, _) = inspect(&["--snapshot", snap, "status"]);
    assert!(stdout.contains("snapshot of") && stdout.contains("live.toml"), "{stdout}");
    for command in ["pause", "resume", "quit"] {
        let (code, _, stderr) = inspect(&["--snapshot", snap, command]);
        assert_eq!(code, 2);
        assert!(stderr.contains("needs a running VMM"), "{stderr}");
    }
    let (code, _, stderr) = inspect(&["--snapshot", snap, "events", "--follow"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--follow needs a running VMM"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_lingering_vm_is_examined_after_it_finished_until_quit() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("linger");
    let socket = dir.join("vm.sock");
    let mut vmm = Vmm::start(&["hello", "--linger"], &socket);
    // The summary is printed when the guest stops, before lingering.
    vmm.wait_for_line("1 of 1 processes as expected");
    let status = vmm.json(&["status"]);
    assert_eq!(status["state"], "finished", "{status}");
    assert!(status["message"].as_str().unwrap().contains("the kernel shut down with status 0"), "{status}");
    assert_eq!(vmm.json(&["ps"])["processes"], Value::Array(vec![]));
    let events = vmm.text(&["events"]);
    assert!(events.contains("pid 1 exited with code 0"), "{events}");
    assert!(events.lines().last().unwrap().contains("kernel shutting down"), "{events}");
    let (code, stdout, _) = vmm.inspect(&["check"]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("after the guest stopped") && stdout.contains("every invariant held"),
        "{stdout}"
    );
    assert!(stdout.contains("the CPU state read at shutdown"), "{stdout}");
    let frames = vmm.json(&["frames"]);
    assert!(frames["owners"]
        .as_array()
        .unwrap()
        .iter()
        .all(|o| !o["key"].as_str().unwrap().starts_with("private")));
    // Following a finished guest prints its events and ends.
    let (code, stdout, _) = vmm.inspect(&["events", "--follow"]);
    assert_eq!((code, stdout), (0, events));
    let (code, _, stderr) = vmm.inspect(&["pause"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(vmm.text(&["quit"]).contains("quitting; the guest had stopped"));
    let (code, output) = vmm.finish();
    assert_eq!(code, 0, "the hello scenario succeeded:\n{output}");
    assert!(!socket.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn events_follow_streams_until_the_guest_ends() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("follow");
    let socket = dir.join("vm.sock");
    let vmm = Vmm::start(&["two-hellos", "--paused", "-q"], &socket);
    let status = vmm.json(&["status"]);
    assert_eq!(status["state"], "paused", "{status}");
    assert!(status["message"].as_str().unwrap().contains("before the first guest instruction"));
    let follower = Command::new(VMM)
        .args(["inspect", "--api", socket.to_str().unwrap(), "events", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Resume once the follower is connected (it and the asking client).
    let deadline = Instant::now() + PATIENCE;
    while vmm.json(&["status"])["clients"].as_u64().unwrap() < 2 {
        assert!(Instant::now() < deadline, "the follower never connected");
    }
    assert!(vmm.text(&["resume"]).contains("resumed (was paused before the first guest instruction)"));
    let output = follower.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    let seqs: Vec<u64> = stdout
        .lines()
        .map(|l| l.strip_prefix("event #").unwrap().split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>(), "every event once, in order:\n{stdout}");
    assert!(stdout.contains("pid 2 exited with code 0"), "{stdout}");
    assert!(stdout.lines().last().unwrap().contains("kernel shutting down"), "{stdout}");
    let (code, _) = vmm.finish();
    assert_eq!(code, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_inspect_and_run_arguments_are_clear_errors() {
    let dir = scratch("errors");
    let junk = dir.join("junk.snap");
    std::fs::write(&junk, b"this is not a snapshot at all, just text that is long enough for a header")
        .unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["--api", "/nonexistent/vm.sock", "ps"], "cannot connect to /nonexistent/vm.sock"),
        (&["--snapshot", junk.to_str().unwrap(), "ps"], "not a SuperOS snapshot"),
        (&["--snapshot", "/nonexistent/vm.snap", "ps"], "cannot read the snapshot"),
        (&["ps"], "--api <SOCKET>"),
    ];
    for (args, needle) in cases {
        let (code, _, stderr) = inspect(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let output = Command::new(VMM).args(["run", "hello", "--paused"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--api"));
    if kvm_available() {
        let output = Command::new(VMM)
            .args(["run", "hello", "--snapshot-on-exit", "/nonexistent/dir/vm.snap"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("cannot create the snapshot file /nonexistent/dir/vm.snap"), "{stderr}");
        // A file where the socket should go is not replaced.
        let file = dir.join("not-a-socket");
        std::fs::write(&file, b"keep me").unwrap();
        let output =
            Command::new(VMM).args(["run", "hello", "--api", file.to_str().unwrap()]).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("exists and is not a socket"), "{stderr}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_violation_planted_in_a_live_guest_is_found_by_check_and_drawn_on_the_map() {
    use superos_protocol::event::Event;
    use superos_vmm::api::{ApiOptions, Client, Request};
    use superos_vmm::arch::paging::{PTE_ADDRESS_MASK, PTE_WRITABLE};
    use superos_vmm::check::CheckMode;
    use superos_vmm::control::RunExtras;
    use superos_vmm::inspect::{CheckResult, EventsResult, MapResult};
    use superos_vmm::monitor::{Tamper, VcpuTamper};
    use superos_vmm::run::{run_with, GuestExit, RunConfig};
    use superos_vmm::scenario::Scenario;

    if !kvm_available() {
        return;
    }
    let dir = scratch("violation");
    let socket = dir.join("vm.sock");
    let scenario = Scenario::parse(
        "[[process]]\nname = \"spinner\"\nprogram = \"spin\"\n",
        "violation.toml",
        Path::new("."),
    )
    .unwrap();
    let mut config = RunConfig::new(scenario);
    config.timeout = Duration::from_secs(120);
    // The run itself does not check: the violation is for `inspect` to find.
    config.check = CheckMode::Off;
    // At its spawn, make the spinner's code page writable (W^X broken).
    config.tamper = Some(Tamper::new(|ram, _, entry| match entry.event {
        Event::ProcessSpawned { pml4_gpa, .. } => {
            let (gpa, pte, _) =
                superos_vmm::walk::leaf_entry(ram, pml4_gpa, 0x40_0000).expect("code is mapped");
            ram.write(gpa, &(pte | PTE_WRITABLE)).unwrap();
            true
        }
        _ => false,
    }));
    // And a hardware breakpoint enabled (DR7.G1): `cpu-state-intact`.
    config.vcpu_tamper = Some(VcpuTamper::new(|vcpu, _, entry| match entry.event {
        Event::ProcessSpawned { .. } => {
            superos_vmm::cpu::tamper::set_dr7(vcpu, 0x400 | (1 << 3)).unwrap();
            true
        }
        _ => false,
    }));
    let extras = RunExtras {
        api: Some(ApiOptions { socket: socket.clone(), paused: false, linger: false }),
        ..Default::default()
    };
    let runner = std::thread::spawn(move || run_with(config, extras));
    wait_connectable(&socket);
    let mut client = Client::connect(&socket).unwrap();
    // Long-poll the events until the spawn: the tamper has run by then.
    let deadline = Instant::now() + PATIENCE;
    let mut since = 0;
    loop {
        let answer: EventsResult =
            serde_json::from_value(client.request(&Request::Events { since, wait_ms: 1000 }).unwrap())
                .unwrap();
        if answer.events.iter().any(|e| e.event["kind"] == "process-spawned") {
            break;
        }
        assert!(answer.finished.is_none() && Instant::now() < deadline, "no spawn event");
        since = answer.next;
    }
    let check: CheckResult = serde_json::from_value(client.request(&Request::Check).unwrap()).unwrap();
    let found =
        check.violations.iter().find(|v| v.invariant == "w-xor-x").unwrap_or_else(|| panic!("{check:?}"));
    assert_eq!((found.pids.as_slice(), found.vas.as_slice()), (&[1][..], &[0x40_0000][..]), "{found:?}");
    let code_frame = found.ptes[0] & PTE_ADDRESS_MASK;
    assert!(check.cpu_checked, "{check:?}");
    let cpu = check
        .violations
        .iter()
        .find(|v| v.invariant == "cpu-state-intact")
        .unwrap_or_else(|| panic!("{check:?}"));
    assert!(cpu.details.contains("DR7 is 0x408: breakpoints enabled (G1)"), "{cpu:?}");

    let map: MapResult = serde_json::from_value(client.request(&Request::Map).unwrap()).unwrap();
    assert_eq!(map.violated, ["w-xor-x", "cpu-state-intact"]);
    let marked: Vec<u64> = map.runs.iter().filter(|r| r.violation).map(|r| r.start).collect();
    assert_eq!(marked, [code_frame], "{:?}", map.runs);
    let svg = superos_vmm::svg::render(&map);
    assert_eq!(superos_vmm::svg::well_formed(&svg), Ok(()));
    assert!(svg.contains("ISOLATION VIOLATED: w-xor-x"));
    assert!(svg.contains("named by an invariant violation (1 frame)"));
    if let Some(out) = std::env::var_os("SUPEROS_TEST_SVG") {
        std::fs::write(out, &svg).unwrap();
    }

    let quit = client.request(&Request::Quit).unwrap();
    assert!(quit["message"].as_str().unwrap().contains("quitting"), "{quit}");
    let report = runner.join().unwrap().unwrap();
    assert_eq!(report.exit, GuestExit::Stopped);
    assert!(report.violations.is_empty(), "the run checked nothing itself");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_kernel_busy_in_ring_0_makes_queries_fail_instead_of_hanging() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("busy");
    let socket = dir.join("vm.sock");
    let vmm = Vmm::start(&["hello", "--debug-inject", "spin-in-kernel", "--timeout", "120", "-q"], &socket);
    // A query that comes before the vCPU's first instruction is answered
    // there (a consistent point); once the kernel spins, queries fail.
    let mut attempts = 0;
    loop {
        let started = Instant::now();
        let (code, stdout, stderr) = vmm.inspect(&["--json", "ps"]);
        assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
        if code == 0 {
            let ps: Value = serde_json::from_str(stdout.trim()).unwrap();
            assert_eq!(ps["at"], "before the first guest instruction", "{ps}");
            attempts += 1;
            assert!(attempts < 5, "the kernel never got to spinning");
            continue;
        }
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains("did not reach a consistent point"), "{stderr}");
        break;
    }
    // The VMM still answers what needs no pause, and quit still stops it.
    assert_eq!(vmm.json(&["status"])["state"], "running");
    assert!(vmm.text(&["quit"]).contains("the guest was stopped"));
    let (code, output) = vmm.finish();
    assert_eq!(code, 1, "{output}");
    assert!(output.contains("stopped on request"), "{output}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `inspect regs` and `inspect core` of live processes: the producer blocked
/// in `ipc_recv` (its registers the context the kernel keeps for it) and the
/// spinner (the vCPU's, or its kept context if it was preempted): gdb opens
/// each core and walks the stack back to `_start` through the program's
/// own functions. The guest runs on afterwards.
#[test]
fn a_live_process_core_opens_in_gdb_where_the_process_is() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("live-core");
    let scenario = dir.join("live.toml");
    std::fs::write(&scenario, LIVE_SCENARIO).unwrap();
    let socket = dir.join("vm.sock");
    let mut vmm = Vmm::start(&[scenario.to_str().unwrap(), "--timeout", "120"], &socket);
    vmm.wait_for_line("[spinner#2] spin: spinning forever");
    vmm.wait_for_line("[producer#1] shm-pipeline: producer: MEM_SHARE:1 mapped read-write at 0x100000000");

    let regs = vmm.json(&["regs", "1"]);
    assert_eq!(regs["source"], "the context the kernel keeps for it", "{regs}");
    assert_eq!(regs["registers"]["cs"], 0x33, "a ring-3 context: {regs}");
    let text = vmm.text(&["regs", "1"]);
    assert!(
        text.contains("registers from the context the kernel keeps for it") && text.contains("rip "),
        "{text}"
    );
    let (producer_core, spinner_core) = (dir.join("producer.core"), dir.join("spinner.core"));
    let wrote = vmm.text(&["core", "1", producer_core.to_str().unwrap()]);
    assert!(wrote.starts_with(&format!("wrote {}: pid 1 (producer)", producer_core.display())), "{wrote}");
    let wrote = vmm.json(&["core", "2", spinner_core.to_str().unwrap()]);
    assert_eq!((wrote["pid"].as_u64(), wrote["name"].as_str()), (Some(2), Some("spinner")), "{wrote}");
    assert!(wrote["pages"].as_u64().unwrap() >= 4, "{wrote}");
    // `core` paused a running guest and let it go again.
    assert!(vmm.text(&["status"]).starts_with("running"));
    // A pid that is not there, a file that cannot be written: errors.
    let (code, _, stderr) = vmm.inspect(&["core", "9", dir.join("x.core").to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("no live process with pid 9"), "{stderr}");
    let (code, _, stderr) = vmm.inspect(&["core", "1", dir.join("no/such/dir/x.core").to_str().unwrap()]);
    assert_eq!(code, 6, "{stderr}");
    assert!(stderr.contains("cannot write"), "{stderr}");
    assert!(vmm.text(&["status"]).starts_with("running"));
    vmm.text(&["quit"]);
    vmm.finish();

    let Some(gdb) = gdb() else {
        eprintln!("gdb is not installed here: the cores were written, not read by gdb");
        return;
    };
    let programs = dir.join("programs");
    let (code, _, stderr) = common::vmm(&["list", "--export", programs.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    for (program, core, function) in
        [("shm-pipeline", &producer_core, "shm_pipeline::producer"), ("spin", &spinner_core, "spin::main")]
    {
        let output = Command::new(gdb)
            .args(["-nx", "-batch", "-ex", "bt", "-ex", "info registers rip"])
            .arg(programs.join(program))
            .arg(core)
            .output()
            .unwrap();
        let text =
            String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        assert!(text.contains("(live)'"), "the core says it is of a live process:\n{text}");
        assert!(!text.contains("Program terminated"), "no signal killed it:\n{text}");
        assert!(text.contains(function) && text.contains("in _start ()"), "{function} on the stack:\n{text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
