//! Helpers shared by the command-line tests in vmm/tests/.
#![allow(dead_code)]

use std::process::Command;

/// Runs `superos-vmm` with `args`; returns (exit code, stdout, stderr).
pub fn vmm(args: &[&str]) -> (i32, String, String) {
    let output =
        Command::new(env!("CARGO_BIN_EXE_superos-vmm")).args(args).output().expect("run superos-vmm");
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
