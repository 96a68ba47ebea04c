//! `superos-vmm bench`: the table's shape and the JSON, not the timings.

mod common;
use common::{kvm_available, vmm};

#[test]
fn bench_quick_only_syscall_prints_one_row_and_the_same_json_and_markdown() {
    if !kvm_available() {
        return;
    }
    let json = std::env::temp_dir().join(format!("superos-bench-cli-{}.json", std::process::id()));
    let markdown = json.with_extension("md");
    let (code, stdout, stderr) = vmm(&[
        "bench",
        "--quick",
        "--only",
        "syscall",
        "--json",
        json.to_str().unwrap(),
        "--markdown",
        markdown.to_str().unwrap(),
    ]);
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

    // The Markdown: the same label line, then the table with the budget
    // column and the one row.
    let text = std::fs::read_to_string(&markdown).expect("the Markdown file");
    std::fs::remove_file(&markdown).ok();
    let md: Vec<&str> = text.lines().collect();
    assert_eq!(md[0], lines[0], "{text}");
    assert!(md[2].starts_with("| operation |") && md[2].contains("| budget |"), "{text}");
    assert!(
        md[4].starts_with("| null system call round trip (getpid) |") && md[4].contains("≤ 60"),
        "{text}"
    );
    assert!(md.iter().skip(5).all(|l| !l.starts_with('|')), "one row only:\n{text}");
}

#[test]
fn bench_rejects_an_unknown_group_and_lists_the_groups() {
    let (code, stdout, stderr) = vmm(&["bench", "--only", "nonsense"]);
    assert_eq!(code, 2, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("no benchmark group \"nonsense\""), "{stderr}");
    assert!(stderr.contains("boot, overhead, syscall, mem"), "{stderr}");
    // Output paths are checked before anything is measured (no wait).
    for option in ["--json", "--svg", "--markdown"] {
        let started = std::time::Instant::now();
        let (code, _, stderr) = vmm(&["bench", option, "/nonexistent/dir/out"]);
        assert_eq!(code, 2, "{option}: {stderr}");
        assert!(stderr.contains("cannot write /nonexistent/dir/out"), "{option}: {stderr}");
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "{option}: it measured first");
    }
    let (code, stdout, _) = vmm(&["bench", "--help"]);
    assert_eq!(code, 0);
    for needle in [
        "--quick",
        "--json <FILE>",
        "--markdown <FILE>",
        "--only <NAME>",
        "--svg <FILE>",
        "stream-shm",
        "revocation latency",
    ] {
        assert!(stdout.contains(needle), "--help lacks {needle:?}:\n{stdout}");
    }
}

/// Runs `bench --quick --only <group> --json`; the exit status, stdout and
/// the JSON document.
fn quick_group(group: &str) -> (i32, String, serde_json::Value) {
    let json = std::env::temp_dir().join(format!("superos-bench-cli-{group}-{}.json", std::process::id()));
    let (code, stdout, stderr) =
        vmm(&["bench", "--quick", "--only", group, "--json", json.to_str().unwrap()]);
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| panic!("{group}: no JSON ({e}):\n{stderr}"));
    std::fs::remove_file(&json).ok();
    (code, stdout, serde_json::from_str(&text).expect("valid JSON"))
}

#[test]
fn bench_quick_worst_entry_counts_the_longest_kernel_entry_and_a_bystanders_wait() {
    if !kvm_available() {
        return;
    }
    let (code, stdout, document) = quick_group("worst-entry");
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("worst kernel entry ("), "{stdout}");
    let rows = document["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!((&row["name"], &row["unit"]), (&"worst-entry".into(), &"ns".into()));
    // The bystander's longest wait: at least a moment, at most the run.
    let wait = row["superos"]["median"].as_f64().expect("a wait");
    assert!(wait > 0.0 && wait < 60e9, "{row}");
    let details = &row["details"];
    assert!(details["reference_wait_us"].as_u64().is_some_and(|us| us > 0), "{details}");
    let cases = details["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 3, "{details}");
    for case in cases {
        assert_eq!(case["errors"], serde_json::json!([]), "{case}");
        assert!(case["bystander_outlasted_hog"].as_bool().unwrap(), "{case}");
    }
    // Where single-stepping works (PVM, and ordinary KVM with the patched
    // entries), the longest entry is counted and named; the sliced calls
    // stay within their bound whatever the region.
    let Some(worst) = row["ring0_instructions_per_op"].as_f64() else {
        eprintln!("no ring-0 counts on this host");
        return;
    };
    assert!(worst > 0.0 && worst < 1e6, "{row}");
    assert_eq!(details["worst_entry"]["instructions"].as_f64(), Some(worst));
    assert!(details["worst_entry"]["entry"].is_string(), "{details}");
    let by_entry = |case: &serde_json::Value, entry: &str| {
        case["worst_by_entry"].as_array().unwrap().iter().find(|e| e["entry"] == entry).map(|e| {
            let n = e["instructions"].as_u64().unwrap();
            assert!(n > 0 && n <= worst as u64, "{e}");
            n
        })
    };
    for entry in ["mem_protect", "mem_unmap"] {
        let n = by_entry(&cases[1], entry).unwrap_or_else(|| panic!("no {entry}: {}", cases[1]));
        assert!(n < 50_000, "{entry}: {n} ring-0 instructions in one entry");
    }
    for entry in ["shm_create", "shm_map", "shm_destroy", "exit"] {
        assert!(by_entry(&cases[2], entry).is_some(), "no {entry}: {}", cases[2]);
    }
}

#[test]
fn bench_quick_vmm_peak_stays_within_the_bound_under_every_flood() {
    if !kvm_available() {
        return;
    }
    let (code, stdout, document) = quick_group("vmm-peak");
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains("VMM peak RSS, worst hostile kernel (all-flood; 64 MiB guest, bound 160 MiB held)"),
        "{stdout}"
    );
    let row = &document["rows"][0];
    assert_eq!((&row["name"], &row["unit"]), (&"vmm-peak-rss".into(), &"bytes".into()));
    let details = &row["details"];
    let (peak, bound) =
        (row["superos"]["median"].as_f64().unwrap(), details["bound_bytes"].as_f64().unwrap());
    assert_eq!(details["guest_ram_bytes"], 64 << 20);
    assert_eq!(bound, (160u64 << 20) as f64);
    // More than nothing, less than the bound.
    assert!(peak > (4u64 << 20) as f64 && peak < bound, "{row}");
    assert_eq!(details["bound_held"], true);
    let floods = details["floods"].as_array().unwrap();
    let injects: Vec<&str> = floods.iter().map(|f| f["inject"].as_str().unwrap()).collect();
    assert_eq!(injects, ["console-flood", "event-flood", "all-flood"]);
    for flood in floods {
        assert_eq!(flood["exit_status"], 4, "the watchdog ends every flood: {flood}");
        assert!(flood["peak_rss_bytes"].as_f64().unwrap() <= peak, "{flood}");
    }
    // The kernel that makes guest RAM resident is the worst. (How much of
    // the 64 MiB it touches in 2 s depends on the host: all of it on PVM,
    // about 40 MiB under the nested host's TCG; so no more is asserted.)
    let all = floods[2]["peak_rss_bytes"].as_f64().unwrap();
    assert!(all > floods[0]["peak_rss_bytes"].as_f64().unwrap() && all == peak, "{row}");
}
