//! `superos-vmm new`: a program project outside the repository, built with a
//! plain `cargo build --release` and run with `superos-vmm run
//! DIR/scenario.toml`, as README's "Write your own program" says (issue 15).

mod common;
use common::{kvm_available, vmm};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A fresh folder under the system's temporary directory: outside this
/// repository and its workspace.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("superos-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `cargo build --release` in `project`, as a user would type it: without
/// the variables the outer `cargo test` sets for its own build. rustup's
/// (`RUSTUP_*`) and `CARGO_HOME` stay: the user's toolchain and cargo home
/// are the ones this test runs with. (Without `RUSTUP_TOOLCHAIN`, the rustc
/// proxies cargo starts resolved the toolchain afresh, and on one machine
/// two of them at once set about updating it and failed.)
fn cargo_build(project: &Path) -> (bool, String) {
    let mut command = Command::new(env!("CARGO"));
    command.current_dir(project).args(["build", "--release"]);
    for (var, _) in std::env::vars_os() {
        let name = var.to_string_lossy();
        let user_setting = name.starts_with("RUSTUP_") || name == "CARGO_HOME";
        if !user_setting && (name.starts_with("CARGO_") || name.starts_with("RUST") || name == "CLIPPY_ARGS")
        {
            command.env_remove(&var);
        }
    }
    let output = command.output().expect("run cargo");
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn a_new_project_builds_out_of_tree_and_runs_with_checks() {
    if std::env::var_os("SUPEROS_NESTED_L1").is_some() {
        // Under tests/nested/run there is no Rust toolchain inside L1; that
        // script builds this same template on the host and runs its
        // scenario on L1's KVM (its step `scenario:template`).
        eprintln!("skipped: no cargo in the nested L1 (see the scenario:template step)");
        return;
    }
    let dir = scratch("new-project");
    let project = dir.join("my-program");
    let (code, stdout, stderr) = vmm(&["new", project.to_str().unwrap()]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("created the SuperOS program project my-program"), "{stdout}");
    for file in ["Cargo.toml", ".cargo/config.toml", "src/main.rs", "scenario.toml", ".gitignore"] {
        assert!(project.join(file).is_file(), "{file} missing");
    }

    // Before the build: the scenario names the program it cannot find yet.
    let scenario = project.join("scenario.toml");
    let (code, _, stderr) = vmm(&["run", scenario.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("target/x86_64-unknown-none/release/my-program"), "{stderr}");
    assert!(stderr.contains("cargo build --release"), "{stderr}");

    let (built, log) = cargo_build(&project);
    assert!(built, "cargo build --release failed in {}:\n{log}", project.display());
    assert!(project.join("target/x86_64-unknown-none/release/my-program").is_file());

    if !kvm_available() {
        return;
    }
    let (code, stdout, stderr) = vmm(&["run", scenario.to_str().unwrap()]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    for needle in [
        "[my-program#1] hello, SuperOS, from pid 1",
        "read back 42",
        "message from pid 1: \"ping\"",
        "shared region mapped at",
        "pid 1 exited with code 0",
        "1 of 1 processes as expected",
        "invariants held",
    ] {
        assert!(stdout.contains(needle), "the run's output lacks {needle:?}:\n{stdout}");
    }
    // `[vm] check = "every-event"`: a check per kernel event, not one at exit.
    let checks: u32 = stdout
        .split("invariants held (")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(checks > 5, "expected a check at every event:\n{stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn new_refuses_a_folder_that_holds_something_and_a_bad_name() {
    let dir = scratch("new-refusals");
    std::fs::write(dir.join("mine.txt"), "keep me").unwrap();
    let (code, _, stderr) = vmm(&["new", dir.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("exists and is not empty"), "{stderr}");
    assert_eq!(std::fs::read_to_string(dir.join("mine.txt")).unwrap(), "keep me");

    let (code, _, stderr) = vmm(&["new", dir.join("2fast").to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("\"2fast\" cannot name a program"), "{stderr}");
    assert!(!dir.join("2fast").exists());
    let (code, _, _) = vmm(&["new", dir.join("2fast").to_str().unwrap(), "--name", "fast"]);
    assert_eq!(code, 0);
    let manifest = std::fs::read_to_string(dir.join("2fast/Cargo.toml")).unwrap();
    assert!(manifest.contains("name = \"fast\""), "{manifest}");
    std::fs::remove_dir_all(&dir).unwrap();
}
