//! `superos-vmm bench`: the table's shape and the JSON, not the timings.

mod common;
use common::{kvm_available, vmm};

#[test]
fn bench_quick_only_syscall_prints_one_row_and_the_same_json() {
    if !kvm_available() {
        return;
    }
    let json = std::env::temp_dir().join(format!("superos-bench-cli-{}.json", std::process::id()));
    let (code, stdout, stderr) =
        vmm(&["bench", "--quick", "--only", "syscall", "--json", json.to_str().unwrap()]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("bench: [1/1] syscall"), "no progress on stderr:\n{stderr}");

    // A label, a blank line, the header, a rule and exactly one row.
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("superos-vmm bench --quick: ") && lines[0].ends_with(" UTC"), "{stdout}");
    let header = lines.iter().position(|l| l.starts_with("operation")).expect("a header line");
    for column in ["SuperOS median (min–max)", "host median", "ratio", "ring-0 instr/op", "VM exits/op"] {
        assert!(lines[header].contains(column), "header lacks {column:?}: {}", lines[header]);
    }
    assert!(lines[header + 1].chars().all(|c| c == '-' || c == ' '), "{}", lines[header + 1]);
    let row = lines[header + 2];
    assert!(row.starts_with("null system call round trip (getpid)"), "{row}");
    // The unit follows the magnitude: µs on the PVM host (ring 0 emulated),
    // ns on ordinary KVM.
    assert!(row.contains('×') && [" ns (", " µs (", " ms ("].iter().any(|unit| row.contains(unit)), "{row}");
    assert_eq!(lines[header + 3], "", "one row only:\n{stdout}");
    assert!(stdout.contains("host baselines:") && stdout.contains("getppid()"), "{stdout}");

    let text = std::fs::read_to_string(&json).expect("the JSON file");
    std::fs::remove_file(&json).ok();
    let document: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(document["quick"], true);
    assert_eq!(document["groups"], serde_json::json!(["syscall"]));
    assert!(document["machine"]["cpu"].is_string() && document["date"].is_string());
    let rows = document["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 1);
    let syscall = &rows[0];
    assert_eq!(syscall["name"], "syscall");
    assert_eq!(syscall["unit"], "ns");
    assert_eq!(syscall["superos"]["samples"], 3);
    for figure in [&syscall["superos"]["median"], &syscall["host"]["median"], &syscall["ratio"]] {
        assert!(figure.as_f64().is_some_and(|v| v > 0.0), "{syscall}");
    }
    assert!(syscall["superos"]["min"].as_f64() <= syscall["superos"]["max"].as_f64());
    assert_eq!(syscall["host_baseline"], "getppid()");
    // Where single-stepping works the instruction count is there; the
    // column exists either way.
    assert!(syscall.get("ring0_instructions_per_op").is_some() && syscall.get("vm_exits_per_op").is_some());
}

#[test]
fn bench_rejects_an_unknown_group_and_lists_the_groups() {
    let (code, stdout, stderr) = vmm(&["bench", "--only", "nonsense"]);
    assert_eq!(code, 2, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("no benchmark group \"nonsense\""), "{stderr}");
    assert!(stderr.contains("boot, overhead, syscall, mem"), "{stderr}");
    let (code, stdout, _) = vmm(&["bench", "--help"]);
    assert_eq!(code, 0);
    for needle in
        ["--quick", "--json <FILE>", "--only <NAME>", "--svg <FILE>", "stream-shm", "revocation latency"]
    {
        assert!(stdout.contains(needle), "--help lacks {needle:?}:\n{stdout}");
    }
}
