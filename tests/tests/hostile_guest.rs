//! The VMM against a hostile or broken guest kernel: every misbehaviour is
//! reported clearly, bounded, and never panics or hangs the VMM.

use std::time::Duration;
use superos_protocol::boot;
use superos_tests::*;
use superos_vmm::check::Invariant;
use superos_vmm::diagnose::KernelSymbols;
use superos_vmm::images;
use superos_vmm::run::{GuestExit, RunConfig, EXIT_INVARIANT_VIOLATED, EXIT_TIMEOUT};
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
    let wrong = superos_protocol::PROTOCOL_VERSION + 1000;
    assert!(report.log.iter().any(|l| l.contains(&format!("protocol version {wrong}"))), "{:?}", report.log);
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

/// The kernel's text, virtual `[start, end)`, from its symbols.
fn kernel_text() -> (u64, u64) {
    let symbols = KernelSymbols::parse(images::KERNEL_ELF);
    let at = |name| symbols.address(name).unwrap_or_else(|| panic!("the kernel has no {name}"));
    (at("__text_start"), at("__text_end"))
}

#[test]
fn a_kernel_writing_its_own_text_is_stopped_by_the_read_only_slot_and_reported() {
    if !kvm_available() {
        return;
    }
    // The kernel lifts CR0.WP and writes 0xcc over the first byte of its
    // text (physical 0x100000): KVM refuses the write (text and rodata are
    // a read-only memory slot) and the VMM stops the guest at once.
    let report = run_config(hello_with(boot::DEBUG_WRITE_KERNEL_TEXT));
    let listing: Vec<String> = report.violations.iter().map(ToString::to_string).collect();
    match &report.exit {
        GuestExit::InvariantViolated { at, invariants } => {
            assert_eq!(invariants, &[Invariant::KernelTextUnchanged], "{listing:#?}");
            assert_eq!(at, "a write to the read-only kernel image at 0x100000");
        }
        other => panic!("not stopped for the write: {other}\n{listing:#?}"),
    }
    assert_eq!(report.exit_status(), EXIT_INVARIANT_VIOLATED);
    assert_eq!(report.violations.len(), 1, "{listing:#?}");
    let found = &report.violations[0].violation;
    assert_eq!(found.invariant, Invariant::KernelTextUnchanged);
    assert_eq!(found.frames, [0x10_0000], "{found}");
    assert!(found.details.contains("wrote 1 byte (cc) at 0x100000"), "{found}");
    assert!(found.details.contains("the write was refused"), "{found}");
    // The RIP (just after the writing instruction: KVM retires an MMIO
    // write before it exits) is kernel text, in `write_own_text` (kept out of
    // line so that the report can name it).
    let (text_start, text_end) = kernel_text();
    let rip = found.vas[0];
    assert!((text_start..text_end).contains(&rip), "{rip:#x} {found}");
    let symbol = KernelSymbols::parse(images::KERNEL_ELF).lookup(rip).expect("a kernel symbol");
    assert!(symbol.contains("write_own_text+"), "{symbol}");
    assert!(found.details.contains(&format!("by the instruction before rip {rip:#x} ({symbol})")), "{found}");
    assert_eq!(report.stats.exits["mmio-write (read-only kernel image)"], 1);
    // Stopped at the write itself: no later check saw a changed byte.
    assert!(!found.details.contains("differ"), "{found}");
}

#[test]
fn with_keep_going_the_refused_write_is_reported_once_and_the_text_stays_unchanged() {
    if !kvm_available() {
        return;
    }
    let mut config = hello_with(boot::DEBUG_WRITE_KERNEL_TEXT);
    config.keep_going = true;
    let report = run_config(config);
    // The write was dropped: every later check (each event, the shutdown)
    // finds the text byte for byte as loaded, and the process runs.
    assert_eq!(report.exit, GuestExit::Shutdown { code: 0 });
    assert!(report.processes.iter().all(|p| p.as_expected()), "{:#?}", report.processes);
    assert!(report.stats.checks.checks >= 3, "{:?}", report.stats.checks);
    assert_eq!(report.violations.len(), 1, "{:#?}", report.violations);
    assert!(report.violations[0].violation.details.contains("the write was refused"));
    assert_eq!(report.exit_status(), EXIT_INVARIANT_VIOLATED);
}

/// The watchdog's allowance beyond `--timeout` in these tests: generous
/// (the machine is loaded); the bug it guards against took 4-5 times the
/// timeout.
const WATCHDOG_SLACK: Duration = Duration::from_secs(8);

#[test]
fn a_kernel_flooding_the_console_is_stopped_on_time_and_its_output_stays_bounded() {
    if !kvm_available() {
        return;
    }
    // Forever: 4095 bytes without a newline from a new pid each time, then
    // a 4096-byte line. The VMM is busy in its own hypercall code nearly
    // all the time, so the watchdog's kick seldom lands in KVM_RUN.
    let mut config = hello_with(boot::DEBUG_CONSOLE_FLOOD);
    config.timeout = Duration::from_secs(3);
    let started = std::time::Instant::now();
    let report = run_config(config);
    let took = started.elapsed();
    assert!(matches!(report.exit, GuestExit::Timeout(_)), "{:?}", report.exit);
    assert!(took < Duration::from_secs(3) + WATCHDOG_SLACK, "stopped after {took:?} (--timeout 3 s)");
    let kept: u64 = report.lines.iter().map(|l| l.text.len() as u64).sum();
    assert!(kept <= superos_vmm::session::MAX_CONSOLE_BYTES, "{kept} console bytes kept");
    let writes = report.stats.exits.get("hypercall console-write").copied().unwrap_or(0);
    // A few even under QEMU's TCG (the nested ordinary-KVM host).
    assert!(writes > 4, "{writes} console writes");
    if writes * 4095 > 2 * superos_vmm::session::MAX_CONSOLE_BYTES {
        assert!(report.dropped.console_bytes > 0, "{:?}", report.dropped);
    }
    // Every byte written is kept or counted (partial lines from the many
    // pids are emitted cut short, not buffered per pid).
    assert!(
        kept + report.dropped.console_bytes + 64 * 4096 >= writes / 2 * (4095 + 4096),
        "{kept} {:?}",
        report.dropped
    );
}

#[test]
fn a_kernel_flooding_events_is_stopped_on_time_and_its_events_stay_bounded() {
    if !kvm_available() {
        return;
    }
    let mut config = hello_with(boot::DEBUG_EVENT_FLOOD);
    // Checks at every event would make each notify slow; the bound is the
    // point here, and the watchdog while the VMM is busy.
    config.check = superos_vmm::check::CheckMode::Off;
    config.timeout = Duration::from_secs(3);
    // Lowered below one ring (255 records) so that the first flooding
    // notify reaches it even on a slow host (PVM emulates the kernel's ring
    // writes: some 5,000 records a second there; TCG is slower still).
    config.limits.events = 200;
    let started = std::time::Instant::now();
    let report = run_config(config);
    let took = started.elapsed();
    assert!(matches!(report.exit, GuestExit::Timeout(_)), "{:?}", report.exit);
    assert!(took < Duration::from_secs(3) + WATCHDOG_SLACK, "stopped after {took:?} (--timeout 3 s)");
    assert!(report.events.len() <= 200);
    let notifies = report.stats.exits.get("hypercall event-notify").copied().unwrap_or(0);
    assert!(notifies >= 2, "{notifies} notifies");
    // A full ring (255 records) per notify: each is kept or counted.
    let records = report.events.len() as u64 + report.dropped.events;
    assert!(
        records + 4 * 255 >= notifies * 255,
        "{notifies} notifies, {records} records {:?}",
        report.dropped
    );
    assert!(report.dropped.events > 0, "{:?}", report.dropped);
    assert_ne!(report.exit_status(), 0);
}

#[test]
fn a_second_boot_hello_is_a_violation_not_a_new_baseline() {
    if !kvm_available() {
        return;
    }
    let report = run_config(hello_with(boot::DEBUG_SECOND_HELLO));
    let listing: Vec<String> = report.violations.iter().map(ToString::to_string).collect();
    match &report.exit {
        GuestExit::InvariantViolated { at, invariants } => {
            assert_eq!(invariants, &[Invariant::SingleBootHello], "{listing:#?}");
            assert_eq!(at, "boot hello #2");
        }
        other => panic!("not stopped at the second hello: {other}\n{listing:#?}"),
    }
    assert_eq!(report.exit_status(), EXIT_INVARIANT_VIOLATED);
    assert!(listing[0].contains("the kernel said hello again"), "{listing:#?}");
}
