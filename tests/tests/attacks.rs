//! Attacks on the system-call gate and the kernel's privilege boundary, each
//! run next to a bystander that must be unaffected. (The memory, IPC and
//! shared-memory attacks live in memory.rs, ipc.rs and shm.rs; docs/CONTRACT.md
//! lists them all.)

use superos_protocol::boot::HostFlavor;
use superos_protocol::event::FaultKind;
use superos_tests::*;
use superos_vmm::run::ProcessStatus;

fn attack(kind: &str, expected: FaultKind, address: Option<u64>) {
    let text = process_toml(
        "attacker",
        "fault",
        &format!("kind={kind}"),
        &format!("expect = {{ fault = \"{expected}\" }}"),
    ) + &process_toml("bystander", "hello", "spin=1", "");
    let report = run_text(&text);
    assert_success(&report);
    assert_eq!(fault_of(&report, "attacker"), Some(expected), "{kind}: {report:#?}");
    if let (Some(want), ProcessStatus::Killed { addr, .. }) = (address, status_of(&report, "attacker")) {
        assert_eq!(addr, want, "{kind}");
    }
    assert!(report.output_of("attacker").iter().all(|l| !l.contains("SURVIVED")));
    assert_eq!(status_of(&report, "bystander"), ProcessStatus::Exited(0), "{kind}");
    assert_no_frame_lost(&report);
}

#[test]
fn executing_kernel_text_is_a_kernel_access() {
    if !kvm_available() {
        return;
    }
    attack("exec-kernel", FaultKind::KernelAccess, Some(0xffff_ffff_8010_0000));
}

#[test]
fn the_gate_page_can_only_be_entered_at_its_stub() {
    if !kvm_available() {
        return;
    }
    attack("gate-offset", FaultKind::IllegalGateEntry, None);
}

#[test]
fn int3_outside_the_gate_is_an_illegal_gate_entry() {
    if !kvm_available() {
        return;
    }
    attack("raw-int3", FaultKind::IllegalGateEntry, None);
}

#[test]
fn syscall_outside_the_gate_never_reaches_a_system_call() {
    if !kvm_available() {
        return;
    }
    // Where `syscall` enters ring 0 the kernel sees it came from outside the
    // stub; on the PVM host it jumps to the kernel's entry still in ring 3,
    // which is a supervisor page.
    let report = run_text(&process_toml("probe", "hello", "spin=0", ""));
    let expected = match report.host {
        HostFlavor::Pvm => FaultKind::KernelAccess,
        HostFlavor::Kvm => FaultKind::IllegalGateEntry,
    };
    attack("raw-syscall", expected, None);
}

#[test]
fn privileged_instructions_in_ring_3_are_general_protection_faults() {
    if !kvm_available() {
        return;
    }
    attack("privileged", FaultKind::GeneralProtection, None);
}

#[test]
fn reading_where_another_process_has_memory_finds_nothing() {
    if !kvm_available() {
        return;
    }
    // The owner maps and fills memory at the first mem_map address and keeps
    // it while the attacker reads the same virtual address in its own space.
    let text = process_toml("owner", "quota-hog", "mode=touch mib=1", "")
        + &process_toml("attacker", "fault", "kind=peek", "expect = { fault = \"unmapped-access\" }");
    let report = run_text(&text);
    assert_success(&report);
    assert_eq!(fault_of(&report, "attacker"), Some(FaultKind::UnmappedAccess));
    match status_of(&report, "attacker") {
        ProcessStatus::Killed { addr, .. } => assert_eq!(addr, superos_protocol::layout::USER_MMAP_BASE),
        other => panic!("{other:?}"),
    }
    assert_no_frame_lost(&report);
}
