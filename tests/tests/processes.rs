//! User processes on the real kernel: output, exit codes, fault reports,
//! preemption and private address spaces.

use superos_protocol::event::{Event, FaultKind};
use superos_tests::*;
use superos_vmm::run::{ProcessStatus, EXIT_OK, EXIT_UNEXPECTED_OUTCOME};

#[test]
fn hello_prints_from_ring_3_and_exits_0() {
    if !kvm_available() {
        return;
    }
    let report = run_embedded("hello");
    assert_success(&report);
    let output = report.output_of("hello");
    assert_eq!(output.len(), 2, "{output:?}");
    assert!(output[0].starts_with("hello from ring 3: pid 1 begins"), "{output:?}");
    assert_eq!(output[1], "hello from ring 3: pid 1 ends");
    assert_eq!(report.process("hello").unwrap().status, ProcessStatus::Exited(0));
}

#[test]
fn exit_codes_are_reported_and_checked_against_the_scenario() {
    if !kvm_available() {
        return;
    }
    let report = run_embedded("exit-code");
    assert_success(&report);
    assert_eq!(report.process("exit-code").unwrap().status, ProcessStatus::Exited(7));
    assert_eq!(report.output_of("exit-code"), vec!["exit-code: exiting with 7"]);

    // A negative code survives the round trip, and a mismatch is an
    // unexpected outcome, not a success.
    let report = run_text("[[process]]\nprogram = \"exit-code\"\nargs = \"-12\"\n");
    assert_eq!(report.process("exit-code").unwrap().status, ProcessStatus::Exited(-12));
    assert_eq!(report.exit_status(), EXIT_UNEXPECTED_OUTCOME);
}

#[test]
fn writing_to_own_code_terminates_only_the_offender() {
    if !kvm_available() {
        return;
    }
    let report = run_embedded("write-code");
    assert_success(&report);
    let offender = report.process("write-code").unwrap();
    match offender.status {
        ProcessStatus::Killed { fault, addr, rip } => {
            assert_eq!(fault, Some(FaultKind::WriteToCode));
            assert!(
                (0x40_0000..0x40_1000).contains(&addr),
                "fault address {addr:#x} is not in the code page"
            );
            assert!(rip >= 0x40_0000, "rip {rip:#x}");
        }
        other => panic!("write-code was not killed: {other:?}"),
    }
    let output = report.output_of("write-code");
    assert!(output.iter().all(|line| !line.contains("BROKEN")), "{output:?}");
    // The kernel event carries the page-fault details.
    let killed = report.events.iter().find_map(|e| match e.event {
        Event::ProcessKilled { vector, error_code, .. } => Some((vector, error_code)),
        _ => None,
    });
    assert_eq!(killed, Some((14, 0x7)), "user write to a present page: error code P|W|U");
    assert_eq!(report.process("bystander").unwrap().status, ProcessStatus::Exited(0));
}

#[test]
fn two_processes_share_the_cpu_by_preemption_in_separate_address_spaces() {
    if !kvm_available() {
        return;
    }
    let report = run_embedded("two-hellos");
    assert_success(&report);
    for name in ["hello-a", "hello-b"] {
        let process = report.process(name).unwrap();
        assert!(process.preemptions >= 1, "{name} was never preempted: {process:?}");
    }
    // Both started computing before either finished: the timer, not a
    // system call, moved the CPU between them.
    let position = |text: &str| report.lines.iter().position(|l| l.text.starts_with(text)).unwrap();
    let b_begins = position("hello from ring 3: pid 2 begins");
    let a_ends = position("hello from ring 3: pid 1 ends");
    assert!(b_begins < a_ends, "no interleaving: {:?}", report.lines);
    // Each process has its own PML4.
    let pml4s: Vec<u64> = report
        .events
        .iter()
        .filter_map(|e| match e.event {
            Event::ProcessSpawned { pml4_gpa, .. } => Some(pml4_gpa),
            _ => None,
        })
        .collect();
    assert_eq!(pml4s.len(), 2);
    assert_ne!(pml4s[0], pml4s[1]);
}

#[test]
fn the_default_scenario_runs_every_process_as_expected() {
    if !kvm_available() {
        return;
    }
    let report = run_embedded("default");
    assert_eq!(report.exit_status(), EXIT_OK, "{report:#?}");
    assert!(report.processes.len() >= 2);
    assert!(report.processes.iter().all(|p| p.pid.is_some()));
    assert!(report.log.is_empty(), "the VMM complained: {:?}", report.log);
}

#[test]
fn bad_pointers_in_write_are_error_returns_not_faults() {
    if !kvm_available() {
        return;
    }
    let report = run_embedded("bad-write");
    assert_success(&report);
    let output = report.output_of("bad-write");
    assert_eq!(output.iter().filter(|l| l.ends_with("(as expected)")).count(), 6, "{output:?}");
}

#[test]
fn a_writable_and_executable_segment_is_refused_by_the_kernel() {
    if !kvm_available() {
        return;
    }
    // Bypass the VMM's own pre-check: patch hello's code segment to RWX after
    // the scenario was resolved, so only the kernel can refuse it.
    let mut scenario = scenario("[[process]]\nprogram = \"hello\"\n[[process]]\nname = \"ok\"\nprogram = \"exit-code\"\nargs = \"0\"\n");
    let image = scenario.processes[0].image.to_mut();
    let phoff = u64::from_le_bytes(image[32..40].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(image[56..58].try_into().unwrap()) as usize;
    let code = (0..phnum)
        .map(|i| phoff + 56 * i)
        .find(|&at| u32::from_le_bytes(image[at..at + 4].try_into().unwrap()) == 1 && image[at + 4] & 1 != 0)
        .expect("hello has an executable PT_LOAD");
    image[code + 4] = 7; // PF_R | PF_W | PF_X
    let report = run_config(config(scenario));
    assert_eq!(
        report.process("hello").unwrap().status,
        ProcessStatus::NotStarted(Some(superos_protocol::event::SpawnError::WritableAndExecutable))
    );
    assert_eq!(report.process("ok").unwrap().status, ProcessStatus::Exited(0));
}

#[test]
fn boot_phases_and_exit_counts_are_recorded() {
    if !kvm_available() {
        return;
    }
    let report = run_embedded("hello");
    let phases = report.stats.phases;
    let ordered = [phases.vcpu_start, phases.kernel_entry, phases.first_user_instruction, phases.guest_exit];
    assert!(ordered.iter().all(Option::is_some), "{phases:?}");
    assert!(ordered.windows(2).all(|w| w[0] <= w[1]), "{phases:?}");
    assert_eq!(report.stats.exits.get("hypercall boot-hello"), Some(&1));
    assert_eq!(report.stats.exits.get("hypercall shutdown"), Some(&1));
    assert!(report.stats.exits["hypercall console-write"] >= 2);
}

#[test]
fn the_gate_self_test_confirms_or_replaces_the_requested_gate() {
    if !kvm_available() {
        return;
    }
    use superos_protocol::boot::{GatePreference, HostFlavor};
    use superos_protocol::syscall::{GATE_KIND_INT3, GATE_KIND_SYSCALL};
    let mut config = config(superos_vmm::scenario::Scenario::load("hello").unwrap());
    config.gate = GatePreference::Syscall;
    let report = run_config(config);
    assert_success(&report);
    let failed = report
        .events
        .iter()
        .any(|e| matches!(e.event, Event::GateSelfTestFailed { gate_kind: GATE_KIND_SYSCALL, .. }));
    let ready = report.events.iter().find_map(|e| match e.event {
        Event::KernelReady { gate_kind, .. } => Some(gate_kind),
        _ => None,
    });
    match report.host {
        // On the PVM fork `syscall` from ring 3 does not reach ring 0: the
        // self-test must notice and fall back to int3.
        HostFlavor::Pvm => {
            assert!(failed, "the syscall gate should fail its self-test here");
            assert_eq!(ready, Some(GATE_KIND_INT3));
        }
        HostFlavor::Kvm => {
            assert!(!failed);
            assert_eq!(ready, Some(GATE_KIND_SYSCALL));
        }
    }
}

/// The gate a run ended up with (`KernelReady`), and whether any gate
/// failed its self-test on the way.
fn gate_of(report: &superos_vmm::run::RunReport) -> (Option<u32>, bool) {
    let failed = report.events.iter().any(|e| matches!(e.event, Event::GateSelfTestFailed { .. }));
    let ready = report.events.iter().find_map(|e| match e.event {
        Event::KernelReady { gate_kind, .. } => Some(gate_kind),
        _ => None,
    });
    (ready, failed)
}

#[test]
fn the_default_gate_is_syscall_on_ordinary_kvm_and_int3_on_pvm() {
    if !kvm_available() {
        return;
    }
    // Host-dependent on purpose: with no preference the kernel starts from
    // the gate the VMM's host flavor suggests, and each host has one truth.
    use superos_protocol::boot::HostFlavor;
    use superos_protocol::syscall::{GATE_KIND_INT3, GATE_KIND_SYSCALL};
    let report = run_embedded("hello");
    assert_success(&report);
    match report.host {
        // PVM: `syscall` from ring 3 never reaches ring 0, so the kernel
        // goes straight to int3 (no failed self-test on the way).
        HostFlavor::Pvm => assert_eq!(gate_of(&report), (Some(GATE_KIND_INT3), false)),
        // Ordinary KVM (VT-x/AMD-V): syscall/sysret passes its self-test.
        HostFlavor::Kvm => assert_eq!(gate_of(&report), (Some(GATE_KIND_SYSCALL), false)),
    }
}

#[test]
fn the_int3_gate_works_on_every_host() {
    if !kvm_available() {
        return;
    }
    // The fallback gate is not PVM-only: asked for, it passes its
    // self-test and carries the system calls on ordinary KVM too.
    use superos_protocol::boot::GatePreference;
    use superos_protocol::syscall::GATE_KIND_INT3;
    let mut config = config(superos_vmm::scenario::Scenario::load("hello").unwrap());
    config.gate = GatePreference::Int3;
    let report = run_config(config);
    assert_success(&report);
    assert_eq!(gate_of(&report), (Some(GATE_KIND_INT3), false), "host {:?}", report.host);
    assert_eq!(report.output_of("hello").len(), 2);
}

#[test]
fn yield_hands_the_cpu_to_the_other_process() {
    if !kvm_available() {
        return;
    }
    let report = run_text(
        "[[process]]\nname = \"a\"\nprogram = \"yield-turns\"\nargs = \"n=5\"\n\
         [[process]]\nname = \"b\"\nprogram = \"yield-turns\"\nargs = \"n=5\"\n",
    );
    assert_success(&report);
    let turns: Vec<String> = (0..5).map(|i| format!("turn {i}")).collect();
    assert_eq!(report.output_of("a"), turns);
    assert_eq!(report.output_of("b"), turns);
    // Each run is far shorter than a time slice, so only yield can explain
    // b starting before a is done.
    let pid_a = report.process("a").unwrap().pid.unwrap();
    let first_b = report.lines.iter().position(|l| l.pid != pid_a).unwrap();
    let last_a = report.lines.iter().rposition(|l| l.pid == pid_a).unwrap();
    assert!(first_b < last_a, "no turn taking: {:?}", report.lines);
}

/// An argument a program does not take is an error it reports (issue 15):
/// `code=5` to `exit-code`, which takes a bare number, used to be ignored.
#[test]
fn an_unknown_program_argument_is_an_error_the_program_reports() {
    if !kvm_available() {
        return;
    }
    let report = run_text(
        &(process_toml("typo", "exit-code", "code=5", "expect = { exit = 2 }")
            + &process_toml("hello", "hello", "spin=5 colour=red", "expect = { exit = 2 }")
            + &process_toml("fine", "exit-code", "5", "expect = { exit = 5 }")),
    );
    assert_success(&report);
    assert_eq!(report.output_of("typo"), vec!["unknown argument \"code=5\"; this program takes: [<code>]"]);
    assert_eq!(
        report.output_of("hello"),
        vec!["unknown argument \"colour=red\"; this program takes: [spin=<ms>] [work=<millions>]"]
    );
}
