//! Shared helpers for the integration tests in `tests/tests/`: each test boots
//! the real kernel under the real VMM on `/dev/kvm`.
//!
//! Without a usable `/dev/kvm` the tests skip with a message, except when the
//! `CI` environment variable is set: there a missing KVM is a failure, so a
//! green CI always means the kernel really ran.
#![deny(missing_docs)]

use std::path::Path;
use std::time::Duration;
use superos_vmm::run::{run, RunConfig, RunReport};
use superos_vmm::scenario::Scenario;

/// True if the tests can use KVM; panics under CI if they cannot.
pub fn kvm_available() -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        assert!(
            std::env::var_os("CI").is_none(),
            "/dev/kvm is not usable, and CI is set: the integration tests must boot the real kernel"
        );
        eprintln!("skipping: /dev/kvm is not usable on this machine");
    }
    usable
}

/// Parses scenario text (programs by embedded name).
pub fn scenario(text: &str) -> Scenario {
    Scenario::parse(text, "test-scenario.toml", Path::new("."))
        .unwrap_or_else(|e| panic!("bad test scenario: {e}"))
}

/// A quiet config for `scenario` with a watchdog that fails slow tests
/// instead of hanging them.
pub fn config(scenario: Scenario) -> RunConfig {
    let mut config = RunConfig::new(scenario);
    config.timeout = Duration::from_secs(60);
    config
}

/// Runs `config`, panicking if the VMM could not even start the guest.
pub fn run_config(config: RunConfig) -> RunReport {
    run(config).unwrap_or_else(|e| panic!("the VMM failed to start the guest: {e}"))
}

/// Runs an embedded scenario by name.
pub fn run_embedded(name: &str) -> RunReport {
    run_config(config(Scenario::load(name).unwrap_or_else(|e| panic!("{e}"))))
}

/// Runs scenario text.
pub fn run_text(text: &str) -> RunReport {
    run_config(config(scenario(text)))
}

/// Panics with the whole report if `report` is not a clean success.
pub fn assert_success(report: &RunReport) {
    assert!(report.success(), "run did not succeed: {report:#?}");
}
