//! The `superos-vmm` command line: exit statuses and messages users see.

mod common;
use common::{kvm_available, vmm};

#[test]
fn run_with_no_arguments_runs_the_default_scenario_and_exits_0() {
    if !kvm_available() {
        return;
    }
    let (code, stdout, stderr) = vmm(&["run", "--stats"]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("running embedded:default"), "{stdout}");
    assert!(stdout.contains("[hello-a#1] hello from ring 3"), "{stdout}");
    assert!(stdout.contains("processes as expected"), "{stdout}");
    for needle in ["boot phases", "kernel entry", "first user instruction", "VM exits:", "hypercall shutdown"]
    {
        assert!(stdout.contains(needle), "--stats output lacks {needle:?}:\n{stdout}");
    }
}

/// What this machine is, read the plain way: the line `run --stats` must print.
fn this_hosts_line() -> String {
    let module = |name: &str| std::path::Path::new("/sys/module").join(name).exists();
    let parameter =
        |path: &str| std::fs::read_to_string(path).map(|v| v.trim().to_string()).unwrap_or_default();
    if module("kvm_pvm") {
        "host: PVM (kvm_pvm: ring-0 guest code emulated)".into()
    } else if module("kvm_amd") {
        let npt = parameter("/sys/module/kvm_amd/parameters/npt");
        format!("host: KVM (AMD SVM, {})", if npt == "Y" || npt == "1" { "NPT" } else { "no NPT" })
    } else if module("kvm_intel") {
        let ept = parameter("/sys/module/kvm_intel/parameters/ept");
        format!("host: KVM (Intel VMX, {})", if ept == "Y" || ept == "1" { "EPT" } else { "no EPT" })
    } else {
        "host: KVM (".into()
    }
}

#[test]
fn run_stats_names_the_host_as_this_machine_is() {
    if !kvm_available() {
        return;
    }
    let (code, stdout, stderr) = vmm(&["run", "hello", "--stats"]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let expected = this_hosts_line();
    let line =
        stdout.lines().find(|l| l.starts_with("host: ")).unwrap_or_else(|| panic!("no host line:\n{stdout}"));
    assert!(line.starts_with(&expected), "--stats names the host {line:?}, this machine is {expected:?}");
    // The PVM development machines and the nested kvm_amd of tests/nested/run
    // are the hosts this suite runs on: each named exactly.
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(line, "host: PVM (kvm_pvm: ring-0 guest code emulated)");
    } else if std::path::Path::new("/sys/module/kvm_amd").exists() {
        assert!(line.starts_with("host: KVM (AMD SVM, "), "{line}");
    }
}

#[test]
fn events_json_makes_stdout_json_lines_only_events_and_console() {
    if !kvm_available() {
        return;
    }
    let (code, stdout, stderr) = vmm(&["run", "--events", "json", "--scrub", "kernel"]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    // Every line on stdout is one JSON object; the summary is on stderr.
    let objects: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}")))
        .collect();
    assert!(stderr.contains("processes as expected"), "{stderr}");
    assert!(stderr.contains("running embedded:default"), "{stderr}");
    let console: Vec<&serde_json::Value> = objects.iter().filter(|o| o["kind"] == "console").collect();
    assert!(
        console.iter().any(|line| line["source"].as_str().is_some_and(|s| s.starts_with("exit-code#"))
            && line["text"] == "exit-code: exiting with 3"
            && line["pid"].is_u64()),
        "{stdout}"
    );
    let events: Vec<&serde_json::Value> = objects.iter().filter(|o| o["kind"] != "console").collect();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>(), "{stdout}");
    assert_eq!(events[0]["kind"], "kernel-ready", "{stdout}");
    let exited = events
        .iter()
        .find(|e| e["kind"] == "process-exited" && e["code"] == 3)
        .unwrap_or_else(|| panic!("no exit with code 3:\n{stdout}"));
    assert_eq!(exited["code"], 3);
    let killed =
        events.iter().find(|e| e["kind"] == "process-killed").unwrap_or_else(|| panic!("no kill:\n{stdout}"));
    assert_eq!(killed["fault"], "write-to-code");
    assert!(killed["rip"].is_u64());
}

#[test]
fn json_prints_the_run_as_one_document_and_nothing_else_on_stdout() {
    if !kvm_available() {
        return;
    }
    let (code, stdout, stderr) = vmm(&["run", "--json", "--stats", "--scrub", "kernel"]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let document: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document: {e}\n{stdout}"));
    assert_eq!(document["exit_status"], 0, "{stdout}");
    let processes = document["processes"].as_array().expect("processes");
    assert_eq!(processes.len(), 9, "{stdout}");
    assert!(processes.iter().all(|p| p["as_expected"] == true), "{stdout}");
    // The summary and --stats are for people: on stderr.
    assert!(stderr.contains("processes as expected"), "{stderr}");
    assert!(stderr.contains("boot phases"), "{stderr}");
    let (code, _, stderr) = vmm(&["run", "--json", "--events", "json"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

/// On several vCPUs, `--stats` and the JSON report give each vCPU's VM
/// exits (adding up to the totals), the events each CPU logged, and the
/// time the other vCPUs were held while the VMM looked.
#[test]
fn stats_on_two_cpus_are_given_vcpu_by_vcpu() {
    if !kvm_available() {
        return;
    }
    let (code, stdout, stderr) =
        vmm(&["run", "two-hellos", "--cpus", "2", "--check", "every-event", "--json", "--stats"]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let document: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let by_cpu = document["vm_exits_by_cpu"].as_array().expect("vm_exits_by_cpu");
    assert_eq!(by_cpu.len(), 2, "{stdout}");
    for (kind, total) in document["vm_exits"].as_object().unwrap() {
        let sum: u64 = by_cpu.iter().map(|exits| exits[kind].as_u64().unwrap_or(0)).sum();
        assert_eq!(Some(sum), total.as_u64(), "{kind}: {stdout}");
    }
    // Every vCPU left the guest (an AP at least when it was held for a check).
    assert!(by_cpu.iter().all(|exits| exits.as_object().is_some_and(|e| !e.is_empty())), "{stdout}");
    assert!(document["ap_pauses"]["count"].as_u64() > Some(0), "{stdout}");
    let header = stderr.lines().find(|l| l.starts_with("VM exits:")).unwrap_or_default();
    assert!(header.contains("vCPU 0") && header.contains("vCPU 1") && header.contains("total"), "{stderr}");
    assert!(stderr.contains("kernel events logged") && stderr.contains("held out of the guest"), "{stderr}");
    // On one vCPU, no columns.
    let (_, _, stderr) = vmm(&["run", "hello", "--json", "--stats"]);
    assert!(stderr.lines().any(|l| l == "VM exits:"), "{stderr}");
}

#[test]
fn bad_arguments_exit_2_with_a_clear_message() {
    let cases: [(&[&str], &str); 12] = [
        (&["inspect", "ps"], "name a VMM with --api <SOCKET> or a snapshot with --snapshot <FILE>"),
        (
            &["inspect", "--api", "a.sock", "ps", "--snapshot", "b.snap"],
            "give one of --api <SOCKET> and --snapshot",
        ),
        (&["run", "no-such-scenario"], "no scenario file or embedded scenario named \"no-such-scenario\""),
        (&["run", "--mem", "15"], "guest memory of 15 MiB is not allowed"),
        (&["run", "--mem", "100000"], "guest memory of 100000 MiB is not allowed"),
        (&["run", "--kernel", "/nonexistent/kernel.elf"], "cannot read kernel /nonexistent/kernel.elf"),
        (&["run", "--timeout", "0"], "--timeout must be a positive number"),
        (&["run", "--timeout", "1e20"], "--timeout must be a positive number"),
        (&["run", "--timeout", "inf"], "--timeout must be a positive number"),
        (&["run", "--timeout", "NaN"], "--timeout must be a positive number"),
        (&["run", "--scrub", "fast"], "invalid value 'fast' for '--scrub <SCRUB>'"),
        (&["run", "--events", "xml"], "invalid value 'xml' for '--events <FORMAT>'"),
    ];
    for (args, needle) in cases {
        let (code, _, stderr) = vmm(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn a_kernel_that_is_not_elf_is_rejected() {
    if !kvm_available() {
        return;
    }
    let path = std::env::temp_dir().join(format!("superos-cli-kernel-{}", std::process::id()));
    std::fs::write(&path, b"\x7fELF but not really").unwrap();
    let (code, _, stderr) = vmm(&["run", "--kernel", path.to_str().unwrap()]);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("the kernel image is not a valid ELF file"), "{stderr}");
}

#[test]
fn a_kernel_panic_exits_3_with_a_diagnosis() {
    if !kvm_available() {
        return;
    }
    let (code, stdout, stderr) = vmm(&["run", "hello", "--debug-inject", "panic"]);
    assert_eq!(code, 3, "{stdout}{stderr}");
    assert!(stderr.contains("guest crashed: kernel panic"), "{stderr}");
    assert!(stderr.contains("instruction bytes:"), "{stderr}");
}

#[test]
fn help_shows_examples_and_list_shows_what_is_embedded() {
    let (code, stdout, _) = vmm(&["run", "--help"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("Examples:") && stdout.contains("Exit status:"), "{stdout}");
    for needle in ["--scrub <SCRUB>", "kernel:", "vmm:", "auto:", "--events <FORMAT>", "json:"] {
        assert!(stdout.contains(needle), "--help lacks {needle:?}:\n{stdout}");
    }
    let (code, stdout, _) = vmm(&["list"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("default") && stdout.contains("write-code"), "{stdout}");
    // Every embedded program declares its arguments, read from its image.
    let (code, stdout, _) = vmm(&["list", "--long"]);
    assert_eq!(code, 0);
    assert!(!stdout.contains("(arguments not declared)"), "{stdout}");
    for needle in
        ["  exit-code      [<code>]", "  hello          [spin=<ms>]", "  spin           (no arguments)"]
    {
        assert!(
            stdout.contains(needle),
            "list --long lacks {needle:?}:
{stdout}"
        );
    }
}

#[test]
fn list_export_writes_the_kernel_and_every_program_as_elf_files() {
    let dir = std::env::temp_dir().join(format!("superos-cli-export-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.join("elf");
    let (code, stdout, stderr) = vmm(&["list", "--export", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let mut names = vec![superos_vmm::images::KERNEL_FILE_NAME];
    names.extend(superos_vmm::images::program_names());
    assert!(stdout.contains(&format!("wrote {} ELF files into", names.len())), "{stdout}");
    for name in &names {
        let written = std::fs::read(out.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let embedded = match *name {
            superos_vmm::images::KERNEL_FILE_NAME => superos_vmm::images::KERNEL_ELF,
            program => superos_vmm::images::program(program).unwrap(),
        };
        assert!(written == embedded, "{name} differs from the embedded image");
        assert_eq!(&written[..4], b"\x7fELF", "{name}");
    }
    // Again over the same files: replaced.
    assert_eq!(vmm(&["list", "--export", out.to_str().unwrap()]).0, 0);
    // Where a program's file would go there is a directory: an error, exit 1.
    std::fs::remove_file(out.join("hello")).unwrap();
    std::fs::create_dir(out.join("hello")).unwrap();
    let (code, _, stderr) = vmm(&["list", "--export", out.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("hello exists and is not a regular file"), "{stderr}");
    // A plain file where the directory should be: an error, exit 1.
    let file = dir.join("file");
    std::fs::write(&file, b"x").unwrap();
    let (code, _, stderr) = vmm(&["list", "--export", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot create"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn outputs_that_cannot_be_written_make_the_exit_status_non_zero() {
    if !kvm_available() || !std::path::Path::new("/dev/full").exists() {
        return;
    }
    // The snapshot: the run itself was fine.
    let (code, stdout, stderr) = vmm(&["run", "hello", "-q", "--snapshot-on-exit", "/dev/full"]);
    assert_eq!(code, 6, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("could not write the snapshot /dev/full"), "{stderr}");
    // Stdout on a full disk.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_superos-vmm"))
        .args(["run", "hello"])
        .stdout(std::fs::File::create("/dev/full").expect("/dev/full"))
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("superos-vmm runs");
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("could not write the output to stdout"), "{stderr}");
}

#[test]
fn inputs_that_are_not_regular_files_or_too_large_are_refused_up_front() {
    let dir = std::env::temp_dir().join(format!("superos-cli-inputs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success());
    let scenario = dir.join("zero.toml");
    std::fs::write(&scenario, "[[process]]\nname = \"z\"\npath = \"/dev/zero\"\n").unwrap();
    let big = dir.join("big.toml");
    std::fs::write(&big, vec![b'#'; 2 << 20]).unwrap();
    let fifo_name = fifo.to_str().unwrap();
    let mut cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["run", "/dev/zero"],
            "cannot read scenario /dev/zero: a character device, not a regular file".into(),
        ),
        (
            vec!["run", "--kernel", "/dev/zero"],
            "cannot read kernel /dev/zero: a character device, not a regular file".into(),
        ),
        (vec!["run", scenario.to_str().unwrap()], "cannot read /dev/zero: a character device".into()),
        (vec!["run", big.to_str().unwrap()], format!("{} bytes, more than the {} allowed", 2 << 20, 1 << 20)),
        (vec!["inspect", "--snapshot", "/dev/zero", "ps"], "a character device, not a regular file".into()),
    ];
    if made {
        cases.push((vec!["run", fifo_name], "a FIFO, not a regular file".into()));
        cases.push((vec!["run", "--kernel", fifo_name], "a FIFO, not a regular file".into()));
        cases.push((vec!["inspect", "--snapshot", fifo_name, "ps"], "a FIFO, not a regular file".into()));
    }
    for (args, needle) in &cases {
        // Each is refused at once: no read of /dev/zero until memory runs
        // out, no wait for a FIFO's writer (the test would hang).
        let (code, _, stderr) = vmm(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(needle.as_str()), "{args:?}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `superos-vmm` with `args` (output discarded); returns its exit
/// status and peak resident memory in KiB (from `wait4`, for this child
/// alone).
#[allow(clippy::zombie_processes)] // waited for with wait4, for its rusage
fn peak_rss_kib(args: &[&str]) -> (i32, i64) {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_superos-vmm"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("superos-vmm starts");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not yet waited for (`child` is never
    // waited on: dropping a Child does not wait); the pointers are valid
    // for the call.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid);
    (libc::WEXITSTATUS(status), usage.ru_maxrss)
}

#[test]
fn the_worst_hostile_kernels_leave_the_vmm_within_its_memory_bound() {
    if !kvm_available() {
        return;
    }
    // Guest RAM (64 MiB, touched or not) plus the VMM's fixed budget
    // (docs/ARCHITECTURE.md: 16 MiB of console, 100,000 events, ...) plus
    // the program itself: 160 MiB is generous. Before the bound, a console
    // flood grew the VMM by ~100 MB a second.
    const BOUND_KIB: i64 = 160 << 10;
    for inject in ["console-flood", "event-flood", "all-flood"] {
        let (code, peak) = peak_rss_kib(&["run", "hello", "-q", "--timeout", "4", "--debug-inject", inject]);
        assert_eq!(code, 4, "{inject}: the watchdog ends it");
        assert!(peak < BOUND_KIB, "{inject}: peak RSS {peak} KiB, bound {BOUND_KIB} KiB");
        eprintln!("{inject}: peak RSS {} MiB", peak >> 10);
    }
}

/// Ctrl-C (SIGINT) and SIGTERM stop a run as the watchdog would (issue 15):
/// the summary so far is printed, the control socket removed, the snapshot
/// written whole (renamed into place: never a 0-byte or partial file), and
/// the exit status is 128 + the signal.
#[test]
fn ctrl_c_and_sigterm_stop_the_guest_cleanly() {
    if !kvm_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("superos-signals-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let scenario = dir.join("spin.toml");
    std::fs::write(&scenario, "[[process]]\nprogram = \"spin\"\n").unwrap();
    for (signal, name, status) in [(libc::SIGINT, "SIGINT", 130), (libc::SIGTERM, "SIGTERM", 143)] {
        let socket = dir.join(format!("vm-{name}.sock"));
        let snapshot = dir.join(format!("vm-{name}.snap"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_superos-vmm"))
            .args(["run", scenario.to_str().unwrap(), "--timeout", "300", "--api"])
            .arg(&socket)
            .arg("--snapshot-on-exit")
            .arg(&snapshot)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("superos-vmm starts");
        // `--wait` rides out the VMM's start (the socket is not there yet).
        let (code, _, err) = vmm(&["inspect", "--api", socket.to_str().unwrap(), "--wait", "60", "status"]);
        assert_eq!(code, 0, "{name}: inspect --wait: {err}");
        // Until the kernel runs the spinner (the socket is served from
        // before the guest boots).
        let started = std::time::Instant::now();
        loop {
            assert!(started.elapsed() < std::time::Duration::from_secs(60), "spin never ran");
            if socket.exists()
                && vmm(&["inspect", "--api", socket.to_str().unwrap(), "ps"]).1.contains("spin")
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // SAFETY: kill(2) of our own child, still running (not waited for).
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
        let output = child.wait_with_output().expect("superos-vmm exits");
        let (stdout, stderr) =
            (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert_eq!(output.status.code(), Some(status), "{name}: stdout:\n{stdout}\nstderr:\n{stderr}");
        assert!(stdout.contains(&format!("interrupted by {name}")), "{name}: {stdout}");
        assert!(stdout.contains("spin"), "the summary names the process: {stdout}");
        assert!(!socket.exists(), "{name}: the socket was left behind");
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".partial-"))
            .collect();
        assert!(leftovers.is_empty(), "{name}: {leftovers:?}");
        let (code, ps, err) = vmm(&["inspect", "--snapshot", snapshot.to_str().unwrap(), "ps"]);
        assert_eq!(code, 0, "{name}: the snapshot reads back: {err}");
        assert!(ps.contains("spin"), "{name}: {ps}");
        // The source may follow the request too.
        let (code, after, err) = vmm(&["inspect", "ps", "--snapshot", snapshot.to_str().unwrap()]);
        assert_eq!((code, after.as_str()), (0, ps.as_str()), "{name}: {err}");
    }
    // A lingering VMM (the guest done, the socket still served) stops
    // lingering: the run's own status, the socket removed.
    let socket = dir.join("linger.sock");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_superos-vmm"))
        .args(["run", "hello", "--linger", "--api"])
        .arg(&socket)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("superos-vmm starts");
    let started = std::time::Instant::now();
    loop {
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "the guest never finished");
        if socket.exists()
            && vmm(&["inspect", "--api", socket.to_str().unwrap(), "ps"])
                .1
                .contains("after the guest stopped")
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: kill(2) of our own child, still running (not waited for).
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) }, 0);
    let output = child.wait_with_output().expect("superos-vmm exits");
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(!socket.exists(), "the lingering VMM's socket was left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--version` names the git commit and the embedded kernel's build id
/// (FNV-1a of the kernel ELF the binary carries) (issue 15).
#[test]
fn version_names_the_commit_and_the_kernel_build() {
    let (code, stdout, _) = vmm(&["--version"]);
    assert_eq!(code, 0);
    let kernel = format!("{:016x}", superos_vmm::check::fnv1a(superos_vmm::images::KERNEL_ELF));
    assert!(stdout.starts_with("superos-vmm 0."), "{stdout}");
    assert!(stdout.contains(&format!(", kernel {kernel})")), "{stdout}");
    assert!(stdout.contains("(git "), "{stdout}");
}

/// `run --report FILE`: the run as one JSON document (issue 15); a path
/// that cannot be created is a usage error before anything runs.
#[test]
fn run_report_writes_the_run_as_json() {
    if !kvm_available() {
        return;
    }
    let path = std::env::temp_dir().join(format!("superos-report-{}.json", std::process::id()));
    let (code, stdout, stderr) =
        vmm(&["run", "two-hellos", "-q", "--check", "every-event", "--report", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let text = std::fs::read_to_string(&path).expect("the report");
    let _ = std::fs::remove_file(&path);
    let report: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(report["exit_status"], 0, "{report}");
    assert_eq!(report["success"], true);
    assert_eq!(report["scenario"], "embedded:two-hellos");
    let processes = report["processes"].as_array().unwrap();
    assert_eq!(processes.len(), 2, "{report}");
    assert!(processes.iter().all(|p| p["as_expected"] == true && p["outcome"] == "exit 0"), "{report}");
    let events = report["events"].as_array().unwrap();
    assert!(events.iter().any(|e| e["kind"] == "process-exited"), "{report}");
    assert!(report["checks"]["count"].as_u64().unwrap() > events.len() as u64 / 2, "{report}");
    assert_eq!(report["violations"].as_array().unwrap().len(), 0);
    assert!(report["console"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["text"].as_str().unwrap().contains("hello from ring 3")));
    assert!(report["phases_ms"]["first_user_instruction"].as_f64().unwrap() > 0.0);

    let (code, _, stderr) = vmm(&["run", "hello", "--report", "/nonexistent/dir/r.json"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("cannot create the report /nonexistent/dir/r.json"), "{stderr}");
}

#[test]
fn verbose_logs_the_vmms_steps_on_stderr_and_rust_log_overrides_it() {
    if !kvm_available() {
        return;
    }
    let (code, stdout, stderr) = vmm(&["run", "hello", "-q"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("creating the VM"), "no log lines by default:\n{stderr}");
    let (code, stdout_v, stderr) = vmm(&["run", "hello", "-q", "-v"]);
    assert_eq!(code, 0, "{stderr}");
    for step in ["creating the VM", "kernel loaded", "vCPU 0 started", "guest stopped"] {
        assert!(stderr.contains(step), "-v lacks {step:?}:\n{stderr}");
    }
    assert!(!stderr.contains("invariant check"), "-v is not -vv:\n{stderr}");
    assert_eq!(stdout.lines().count(), stdout_v.lines().count(), "logging stays off stdout");
    let (_, _, stderr) = vmm(&["-vv", "run", "hello", "-q", "--check", "every-event"]);
    assert!(stderr.contains("invariant check"), "-vv (before the subcommand too) logs checks:\n{stderr}");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_superos-vmm"))
        .args(["run", "hello", "-q"])
        .env("RUST_LOG", "superos_vmm=trace")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("VM exit"), "RUST_LOG=superos_vmm=trace logs every exit:\n{stderr}");
}

#[test]
fn completions_and_the_manual_page_come_from_the_command_line_definition() {
    let (code, script, _) = vmm(&["completions", "bash"]);
    assert_eq!(code, 0);
    for word in ["superos-vmm", "inspect", "--check", "--snapshot-on-exit", "new"] {
        assert!(script.contains(word), "the bash completions lack {word:?}");
    }
    let (code, script, _) = vmm(&["completions", "zsh"]);
    assert_eq!(code, 0);
    assert!(script.contains("#compdef superos-vmm"), "{script}");
    let (code, _, stderr) = vmm(&["completions", "tcsh"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("invalid value 'tcsh'"), "{stderr}");
    let (code, page, _) = vmm(&["man"]);
    assert_eq!(code, 0);
    assert!(page.starts_with(".ie") || page.contains(".TH superos-vmm"), "{page}");
    assert!(page.contains("Boot the SuperOS kernel on KVM"), "{page}");
}

#[test]
fn inspect_json_reports_errors_as_json_on_stdout() {
    let (code, stdout, stderr) = vmm(&["inspect", "--json", "--snapshot", "/nonexistent/vm.snap", "ps"]);
    assert_eq!(code, 2, "{stderr}");
    let error: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    assert_eq!(error["exit_status"], 2);
    assert!(error["error"].as_str().is_some_and(|e| e.contains("/nonexistent/vm.snap")), "{error}");
    assert!(stderr.contains("/nonexistent/vm.snap"), "people still read it on stderr: {stderr}");
    let (code, stdout, _) = vmm(&["inspect", "--snapshot", "/nonexistent/vm.snap", "ps"]);
    assert_eq!(code, 2);
    assert!(stdout.is_empty(), "without --json, stdout stays empty: {stdout}");
}

#[test]
fn generated_text_to_a_full_or_closed_stdout_is_an_exit_status_not_a_panic() {
    for args in [&["completions", "bash"][..], &["man"][..]] {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_superos-vmm"))
            .args(args)
            .stdout(full)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(6), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
