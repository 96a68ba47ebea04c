//! Helpers shared by the command-line tests in vmm/tests/.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_superos-vmm");

/// Runs `superos-vmm` with `args`; returns (exit code, stdout, stderr).
pub fn vmm(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(VMM).args(args).output().expect("run superos-vmm");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// True if the tests can use KVM; under CI a missing /dev/kvm is a failure.
pub fn kvm_available() -> bool {
    let usable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    assert!(usable || std::env::var_os("CI").is_none(), "/dev/kvm is not usable, and CI is set");
    usable
}

/// gdb, if this machine has it (`.ci/run` installs Debian's; the nested
/// host's L1 has none, and there what gdb would read is checked without it).
pub fn gdb() -> Option<&'static str> {
    let found = Command::new("gdb").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(
        found || std::env::var_os("CI").is_none() || std::env::var_os("SUPEROS_NESTED_L1").is_some(),
        "gdb is not installed, and CI is set (.ci/run installs it)"
    );
    found.then_some("gdb")
}

/// How long any one thing may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A fresh scratch directory for one test of `suite`.
pub fn scratch(suite: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("superos-{suite}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `superos-vmm inspect <args>`: (exit status, stdout, stderr).
pub fn inspect(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(VMM).arg("inspect").args(args).output().expect("run superos-vmm inspect");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Waits until something accepts connections on `socket` (bounded).
pub fn wait_connectable(socket: &Path) {
    let deadline = Instant::now() + PATIENCE;
    while UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "nothing serves {} after {PATIENCE:?}", socket.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A `superos-vmm run` child whose output is read line by line.
pub struct Vmm {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    socket: PathBuf,
}

impl Vmm {
    pub fn start(args: &[&str], socket: &Path) -> Vmm {
        let mut child = Command::new(VMM)
            .arg("run")
            .args(args)
            .args(["--api", socket.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start superos-vmm run");
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let vmm = Vmm { child, lines, seen: Vec::new(), socket: socket.to_path_buf() };
        wait_connectable(socket);
        vmm
    }

    /// Waits for a line of the VMM's output containing `needle`.
    pub fn wait_for_line(&mut self, needle: &str) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {needle:?} from the VMM; it said:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// `inspect --api <socket> <args>`.
    pub fn inspect(&self, args: &[&str]) -> (i32, String, String) {
        let mut all = vec!["--api", self.socket.to_str().unwrap()];
        all.extend_from_slice(args);
        inspect(&all)
    }

    /// `inspect --api <socket> --json <args>`, which must succeed.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let (code, stdout, stderr) = self.inspect(&all);
        assert_eq!(code, 0, "inspect {args:?}: {stdout}{stderr}");
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("inspect {args:?}: {e}: {stdout}"))
    }

    /// `inspect --api <socket> <args>` (tables), which must succeed.
    pub fn text(&self, args: &[&str]) -> String {
        let (code, stdout, stderr) = self.inspect(args);
        assert_eq!(code, 0, "inspect {args:?}: {stdout}{stderr}");
        stdout
    }

    /// Waits for the VMM to exit; its status and everything it printed.
    pub fn finish(mut self) -> (i32, String) {
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // Output closed: the process is exiting.
                    break self.child.wait().unwrap();
                }
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the VMM did not exit; it said:\n{}", self.seen.join("\n"));
            }
        };
        self.seen.extend(self.lines.iter());
        (status.code().unwrap_or(-1), self.seen.join("\n"))
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A producer blocked forever in `ipc_recv` (its consumer never comes)
/// beside a process that spins: a guest that stays alive to be examined.
pub const LIVE_SCENARIO: &str = r#"
description = "a producer waiting forever beside a spinner"

[[process]]
name = "producer"
program = "shm-pipeline"
args = "mode=producer peer=2 kib=64 chunk=16"

[[process]]
name = "spinner"
program = "spin"
"#;
