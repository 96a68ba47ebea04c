//! The VMM against a hostile or broken guest kernel: every misbehaviour is
//! reported clearly, bounded, and never panics or hangs the VMM.

use std::time::Duration;
use superos_protocol::boot;
use superos_tests::*;
use superos_vmm::run::{GuestExit, RunConfig, EXIT_TIMEOUT};
use superos_vmm::scenario::Scenario;

fn hello_with(flags: u32) -> RunConfig {
    let mut config = config(Scenario::load("hello").unwrap());
    config.debug_flags = flags;
    config
}

#[test]
fn a_flood_of_malformed_hypercalls_is_refused_and_the_log_stays_bounded() {
    if !kvm_available() {
        return;
    }
    let report = run_config(hello_with(boot::DEBUG_HYPERCALL_FLOOD));
    assert_success(&report);
    assert_eq!(report.log.len() as u64, superos_vmm::session::MAX_WARNINGS, "{:?}", &report.log[..3]);
    assert!(report.log[0].contains("console write refused"), "{}", report.log[0]);
    assert!(report.log.iter().any(|l| l.contains("unknown I/O port")), "unknown ports are reported too");
    assert!(report.stats.exits["hypercall console-write"] >= 5000);
}

#[test]
fn a_boot_hello_with_the_wrong_protocol_version_is_refused() {
    if !kvm_available() {
        return;
    }
    let report = run_config(hello_with(boot::DEBUG_BAD_HELLO));
    assert_success(&report);
    assert!(report.log.iter().any(|l| l.contains("protocol version 1001")), "{:?}", report.log);
}

#[test]
fn a_corrupt_event_ring_is_reported_not_trusted() {
    if !kvm_available() {
        return;
    }
    let report = run_config(hello_with(boot::DEBUG_CORRUPT_EVENT_RING));
    // The kernel shut down, but its event log is unusable: the VMM says so
    // and cannot vouch for the processes.
    assert_eq!(report.exit, GuestExit::Shutdown { code: 0 });
    assert!(report.log.iter().any(|l| l.contains("event ring")), "{:?}", report.log);
    assert!(!report.success());
}

#[test]
fn a_kernel_spinning_in_ring_0_is_stopped_by_the_watchdog() {
    if !kvm_available() {
        return;
    }
    let mut config = hello_with(boot::DEBUG_SPIN_IN_KERNEL);
    config.timeout = Duration::from_millis(1500);
    let report = run_config(config);
    assert!(matches!(report.exit, GuestExit::Timeout(_)), "{:?}", report.exit);
    assert_eq!(report.exit_status(), EXIT_TIMEOUT);
}

#[test]
fn a_corrupt_introspection_root_does_not_crash_the_vmm() {
    if !kvm_available() {
        return;
    }
    // Whatever the checker concludes about the garbage, the VMM reports and
    // finishes the run.
    let report = run_config(hello_with(boot::DEBUG_CORRUPT_INTROSPECTION));
    assert!(!matches!(report.exit, GuestExit::VcpuError(_) | GuestExit::Timeout(_)), "{:?}", report.exit);
}
