//! The CPU is an authority surface: ring 3 against descriptor tables, entry
//! MSRs, privileged and I/O instructions, FPU/SIMD and segment state, and odd
//! stack pointers (`cpu-attack`), each run with the invariants checked at
//! every kernel event next to a bystander that must be unaffected.
//!
//! Some faults depend on the host, and the tests assert each host's truth:
//! on the PVM host ring 3 runs natively under the host's own descriptor
//! tables and `int n`/far transfers are refused by the hypervisor as #UD, and
//! `syscall` jumps to LSTAR still in ring 3; on ordinary KVM the guest's GDT
//! and IDT decide (#GP for the null slot 0x20 and for DPL-0 gates), and
//! `syscall` enters the kernel, which sees it came from outside the gate.

use superos_protocol::boot::HostFlavor;
use superos_protocol::event::{Event, FaultKind};
use superos_protocol::layout::{GATE_RESTORE_STUB_OFFSET, GATE_VA};
use superos_tests::*;
use superos_vmm::run::{ProcessStatus, RunReport};

/// True if the CPU under the KVM these tests run on is QEMU's TCG emulator
/// (the nested ordinary-KVM host: `tests/nested/run`). TCG lacks a few
/// architectural exceptions, and the tests say which where they accept it.
fn cpu_is_qemu_tcg() -> bool {
    let leaf = std::arch::x86_64::__cpuid(0x4000_0000);
    let signature: Vec<u8> = [leaf.ebx, leaf.ecx, leaf.edx].iter().flat_map(|r| r.to_le_bytes()).collect();
    signature == *b"TCGTCGTCGTCG"
}

/// Runs each `(mode, args)` of `cpu-attack` in its own process next to a
/// bystander, checks at every event, and returns the report.
fn run_attacks(attacks: &[(&str, &str)]) -> RunReport {
    // Long enough that an attack that waits to be switched out is.
    let mut text = process_toml("bystander", "hello", "spin=200", "");
    for (name, args) in attacks {
        // A name may add a variant after the mode: `syscall-raw-zero`.
        let mode = ["syscall-raw"].into_iter().find(|m| name.starts_with(m)).unwrap_or(name);
        text += &process_toml(name, "cpu-attack", &format!("mode={mode} {args}"), "");
    }
    let report = run_text(&text);
    assert_clean_shutdown(&report);
    assert_no_violation(&report);
    assert_no_frame_lost(&report);
    assert_eq!(status_of(&report, "bystander"), ProcessStatus::Exited(0), "{report:#?}");
    report
}

/// The fault `mode` was killed with, after checking it never got past its
/// attack.
fn killed_with(report: &RunReport, mode: &str) -> Option<FaultKind> {
    assert!(
        report.output_of(mode).iter().all(|line| !line.contains("SURVIVED")),
        "{mode} survived: {:?}",
        report.output_of(mode)
    );
    fault_of(report, mode)
}

#[test]
fn every_way_into_ring_0_but_the_gate_is_killed_with_a_named_fault() {
    if !kvm_available() {
        return;
    }
    let report = run_embedded("cpu-attacks");
    assert_success(&report);
    assert_no_frame_lost(&report);
    assert!(report.stats.checks.checks >= 30, "checked at every event: {:?}", report.stats.checks);
    for process in report.processes.iter().filter(|p| p.name != "bystander") {
        assert!(
            report.output_of(&process.name).iter().all(|line| !line.contains("SURVIVED")),
            "{}: {:?}",
            process.name,
            report.output_of(&process.name)
        );
        // Every kill names the exception, never the catch-all.
        assert_ne!(fault_of(&report, &process.name), Some(FaultKind::OtherException), "{}", process.name);
    }
}

#[test]
fn compatibility_mode_far_transfers_and_foreign_entries_never_reach_ring_0() {
    if !kvm_available() {
        return;
    }
    let attacks = [
        ("far-jump-compat", ""),
        ("far-call-compat", ""),
        ("far-ret-compat", ""),
        ("iret-compat", ""),
        ("compat-syscall", ""),
        ("compat-sysenter", ""),
        ("compat-int80", ""),
        ("compat-spin", ""),
        ("sysenter", ""),
        ("syscall-raw", ""),
        ("syscall-raw-non-canonical", "stack=non-canonical"),
        ("syscall-raw-zero", "stack=zero"),
        ("syscall-single-step", ""),
        ("int", "vector=128"),
        ("call-switch-stub", ""),
    ];
    let report = run_attacks(&attacks);
    let tcg = cpu_is_qemu_tcg();
    use FaultKind::*;
    for (mode, _) in attacks {
        let fault = killed_with(&report, mode);
        // What each host raises, and why.
        let expected: &[FaultKind] = match (report.host, mode) {
            // The PVM host refuses far transfers to a 32-bit segment (and
            // `int n` other than 3) from ring 3 with #UD; a far return and an
            // iret to 0x23 are #GP/#NP there. Compatibility mode is never
            // entered, so the 32-bit `syscall`/`sysenter`/`int` never run.
            (
                HostFlavor::Pvm,
                "far-jump-compat" | "far-call-compat" | "compat-syscall" | "compat-sysenter",
            )
            | (HostFlavor::Pvm, "compat-int80" | "compat-spin" | "int") => &[InvalidOpcode],
            (HostFlavor::Pvm, "far-ret-compat") => &[GeneralProtection],
            (HostFlavor::Pvm, "iret-compat") => &[SegmentNotPresent, GeneralProtection],
            // Ordinary KVM: slot 0x20 is a null descriptor, so every
            // transfer to 0x23 is #GP; `int 0x80` names a DPL-0 gate: #GP.
            (HostFlavor::Kvm, "int") => &[GeneralProtection],
            (HostFlavor::Kvm, m) if m.contains("compat") => &[GeneralProtection],
            // `syscall` outside the gate: on the PVM host it jumps to LSTAR
            // still in ring 3 (a supervisor page); on ordinary KVM it enters
            // the kernel, which sees it did not come from the gate stub.
            (HostFlavor::Pvm, m) if m.starts_with("syscall-raw") => &[KernelAccess],
            (HostFlavor::Kvm, m) if m.starts_with("syscall-raw") => &[IllegalGateEntry],
            // With the trap flag set across it: on ordinary KVM SFMASK clears
            // the flag and no trap is taken in ring 0 (the kernel would stop
            // on one), then as above; on the PVM host at LSTAR, in ring 3
            // (the step or the fetch).
            (HostFlavor::Pvm, "syscall-single-step") => &[DebugException, KernelAccess],
            (HostFlavor::Kvm, "syscall-single-step") => &[IllegalGateEntry],
            // `sysenter` in long mode is #UD on AMD; on Intel SYSENTER_CS = 0
            // makes it #GP. Either way it never enters ring 0.
            (_, "sysenter") => &[InvalidOpcode, GeneralProtection],
            // The gate page's switch stubs are ring-3 code anyone can call,
            // but their way back into the kernel is accepted only while the
            // kernel is switching processes.
            (_, "call-switch-stub") => &[IllegalGateEntry],
            (host, mode) => panic!("no expectation for {mode} on {host:?}"),
        };
        // QEMU's TCG reads the stack of a far return or `iretq` that changes
        // CS with supervisor accesses, which SMAP refuses: a page fault on
        // the user's own stack before the #GP.
        let tcg_stack_fault =
            tcg && matches!(mode, "far-ret-compat" | "iret-compat") && fault == Some(KernelAccess);
        assert!(
            fault.is_some_and(|f| expected.contains(&f)) || tcg_stack_fault,
            "{mode} on {:?}: killed with {fault:?}, expected one of {expected:?}",
            report.host
        );
    }
}

/// Checks that `mode` was killed with `expected`, or, where the CPU is QEMU's
/// TCG, that it met one of TCG's known deviations (listed, with reasons).
fn assert_fault_or_tcg_deviation(report: &RunReport, mode: &str, expected: FaultKind, tcg: bool) {
    use FaultKind::*;
    let status = status_of(report, mode);
    match (tcg, mode, status) {
        // QEMU's TCG raises #UD for `int1`, and faults an `iretq` to a more
        // privileged CS while reading the stack (#PF: it reads it with
        // supervisor accesses, which SMAP refuses) instead of #GP.
        (true, "int1", ProcessStatus::Killed { fault: Some(InvalidOpcode), .. })
        | (true, "iret-kernel", ProcessStatus::Killed { fault: Some(KernelAccess), .. }) => {}
        // TCG raises no #XM for unmasked SIMD exceptions, no #AC, and no #GP
        // for reserved MXCSR bits in `fxrstor` or reserved header bits in
        // `xrstor`: those attacks run on, each harming only itself.
        (true, "simd-exception" | "alignment-check" | "fxrstor-bad" | "corrupt-user-state", _)
            if status == ProcessStatus::Exited(1) => {}
        _ => assert_eq!(killed_with(report, mode), Some(expected), "{mode}: {status:?}"),
    }
}

#[test]
fn debug_traps_fpu_exceptions_and_a_corrupted_save_page_kill_only_their_process() {
    if !kvm_available() {
        return;
    }
    use FaultKind::*;
    let tcg = cpu_is_qemu_tcg();
    let attacks = [
        ("int1", "", DebugException),
        ("iret-kernel", "", GeneralProtection),
        ("simd-exception", "", SimdFloatingPoint),
        ("alignment-check", "", AlignmentCheck),
        ("fxrstor-bad", "", GeneralProtection),
    ];
    let modes: Vec<(&str, &str)> = attacks.iter().map(|&(mode, args, _)| (mode, args)).collect();
    let report = run_attacks(&modes);
    for (mode, _, expected) in attacks {
        assert_fault_or_tcg_deviation(&report, mode, expected, tcg);
    }

    // A process that corrupts its own save page must be switched out and back
    // in to meet its fate: it runs beside a partner that outlasts it (and
    // whose own FPU state must come through intact).
    let text = process_toml("partner", "cpu-attack", "mode=fpu-witness seed=9 turns=60", "")
        + &process_toml("corrupt-user-state", "cpu-attack", "mode=corrupt-user-state", "");
    let report = run_text(&text);
    assert_clean_shutdown(&report);
    assert_no_violation(&report);
    assert_no_frame_lost(&report);
    assert_eq!(status_of(&report, "partner"), ProcessStatus::Exited(0), "{:?}", report.output_of("partner"));
    assert_fault_or_tcg_deviation(&report, "corrupt-user-state", GeneralProtection, tcg);
    // It dies in its restore stub.
    if let ProcessStatus::Killed { rip, .. } = status_of(&report, "corrupt-user-state") {
        assert_eq!(rip, GATE_VA + GATE_RESTORE_STUB_OFFSET);
    }
}

#[test]
fn descriptor_table_registers_are_hidden_from_ring_3_where_the_cpu_has_umip() {
    if !kvm_available() {
        return;
    }
    let modes = ["sgdt", "sidt", "sldt", "str", "smsw"];
    let attacks: Vec<(&str, &str)> = modes.iter().map(|m| (*m, "")).collect();
    let report = run_attacks(&attacks);
    // Both hosts here have UMIP (the PVM host's ring 3 runs with the host's
    // CR4, which has it; the kernel sets it where CPUID has it).
    for mode in modes {
        assert_eq!(killed_with(&report, mode), Some(FaultKind::GeneralProtection), "{mode}");
    }
}

#[test]
fn fpu_simd_segment_and_stack_state_is_private_and_resumed_exactly() {
    if !kvm_available() {
        return;
    }
    let report = run_embedded("cpu-state");
    for process in &report.processes {
        let output = report.output_of(&process.name);
        assert!(output.iter().all(|l| !l.contains("LEAK")), "{}: {output:?}", process.name);
    }
    assert_success(&report);
    assert_no_frame_lost(&report);
    assert!(report.stats.checks.checks >= 20, "checked at every event: {:?}", report.stats.checks);
    // The pending x87 exception was delivered to its owner, at the x87
    // instruction that left it pending (as the program printed it).
    let printed = report
        .output_of("x87-pending")
        .iter()
        .find_map(|l| l.split("pending at ").nth(1)?.split(';').next().map(str::to_owned))
        .expect("x87-pending says where");
    let ProcessStatus::Killed { addr, rip, .. } = status_of(&report, "x87-pending") else {
        panic!("x87-pending was not killed");
    };
    // QEMU's TCG keeps no x87 instruction pointer: there the kernel names
    // the instruction that found the exception (the `fwait`).
    if !(cpu_is_qemu_tcg() && addr == rip) {
        assert_eq!(format!("{addr:#x}"), printed);
    }
    // The stack-pointer tricks were preempted while they lasted.
    for name in ["rsp-non-canonical", "rsp-kernel", "rsp-misaligned"] {
        let pid = pid_of(&report, name);
        let preempted = events(&report).any(
            |e| matches!(e, Event::ProcessExited { pid: p, preemptions, .. } if *p == pid && *preemptions > 0),
        );
        assert!(preempted, "{name} was never preempted");
    }
}
