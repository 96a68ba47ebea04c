//! Several vCPUs (issue 14): the kernel brings every application processor
//! online with its own GDT, TSS and stacks, the VMM checks every vCPU's
//! state at every check with the others paused, and tampering with an
//! application processor's state is caught and named. Processes run on
//! every CPU and migrate between them: what one CPU takes away (a shared
//! region, a write permission) is gone on the others when the call returns.

use superos_protocol::cpu::{ap_stack, CpuStack, MAX_CPUS};
use superos_protocol::event::{Event, FaultKind};
use superos_tests::*;
use superos_vmm::check::{CheckMode, Invariant};
use superos_vmm::cpu::{self, tamper as vcpu_set, VcpuFd};
use superos_vmm::memory::GuestRam;
use superos_vmm::monitor::VcpuTamper;
use superos_vmm::run::{ProcessStatus, RunReport};
use superos_vmm::scenario::Scenario;
use superos_vmm::walk;

/// Two processes computing side by side.
fn two_processes() -> Scenario {
    scenario(&(process_toml("a", "hello", "spin=30", "") + &process_toml("b", "hello", "spin=30", "")))
}

fn cpus_online(report: &RunReport) -> Option<u32> {
    events(report).find_map(|event| match event {
        Event::KernelReady { cpus, .. } => Some(*cpus),
        _ => None,
    })
}

#[test]
fn every_application_processor_comes_online_and_every_vcpu_is_checked_at_every_event() {
    if !kvm_available() {
        return;
    }
    for cpus in [2, 4, MAX_CPUS] {
        let mut config = config(two_processes());
        config.cpus = Some(cpus);
        let report = run_config(config);
        assert_success(&report);
        assert_no_violation(&report);
        assert_eq!(cpus_online(&report), Some(cpus), "{cpus} CPUs");
        let checks = report.stats.checks;
        // Every CPU-state check read all the vCPUs.
        assert!(checks.cpu_checks > 0);
        assert_eq!(checks.cpu_checks % u64::from(cpus), 0, "{cpus} CPUs: {} CPU checks", checks.cpu_checks);
        assert!(
            checks.cpu_checks / u64::from(cpus) + 2 >= checks.checks,
            "{cpus} CPUs: {} CPU checks for {} checks",
            checks.cpu_checks,
            checks.checks
        );
    }
}

#[test]
fn a_scenario_asks_for_its_cpus_and_the_default_is_one() {
    if !kvm_available() {
        return;
    }
    let text = "[vm]\ncpus = 3\n".to_string() + &process_toml("a", "hello", "", "");
    let report = run_config(config(scenario(&text)));
    assert_success(&report);
    assert_eq!(cpus_online(&report), Some(3));
    let report = run_config(config(two_processes()));
    assert_eq!(cpus_online(&report), Some(1));
}

/// Runs `two_processes` on 2 vCPUs with `action` applied to vCPU 1 (paused)
/// at the second spawn, before that event's CPU-state check.
fn ap_tampered(mut action: impl FnMut(&VcpuFd, &GuestRam) + Send + 'static) -> RunReport {
    let mut config = config(two_processes());
    config.cpus = Some(2);
    config.vcpu_tamper = Some(VcpuTamper::on_cpu(1, move |vcpu, ram, entry| {
        if !matches!(entry.event, Event::ProcessSpawned { spec_index: 1, .. }) {
            return false;
        }
        action(vcpu, ram);
        true
    }));
    run_config(config)
}

#[track_caller]
fn assert_ap_finding(report: &RunReport, needles: &[&str]) {
    assert_stopped_for(report, Invariant::CpuStateIntact);
    let listing: Vec<String> = report.violations.iter().map(ToString::to_string).collect();
    assert_eq!(report.violations.len(), 1, "{listing:#?}");
    let found = &report.violations[0];
    assert_eq!(found.at, "event #2", "at the second spawn: {listing:#?}");
    assert!(found.violation.details.starts_with("vCPU 1: "), "{found}");
    for needle in needles {
        assert!(found.violation.details.contains(needle), "{needle:?} not in {found}");
    }
}

fn kernel_gpa(vcpu: &VcpuFd, ram: &GuestRam, va: u64) -> u64 {
    let cr3 = cpu::capture(vcpu).cr3;
    walk::translate(ram, cr3, va).unwrap_or_else(|e| panic!("{va:#x}: {e}")).phys
}

#[test]
fn cpu_state_intact_catches_an_application_processors_tss_rsp0_moved() {
    if !kvm_available() {
        return;
    }
    let (_, top) = ap_stack(1, CpuStack::Kernel).unwrap();
    let report = ap_tampered(move |vcpu, ram| {
        let tss = cpu::capture(vcpu).tr.base;
        ram.write(kernel_gpa(vcpu, ram, tss + 4), &(top - 0x1000)).unwrap();
    });
    assert_ap_finding(
        &report,
        &[&format!("TSS.RSP0 is {:#x}, expected {top:#x} (CPU 1's kernel stack)", top - 0x1000)],
    );
}

#[test]
fn cpu_state_intact_catches_an_application_processor_given_cpu_0s_stacks() {
    if !kvm_available() {
        return;
    }
    // Two CPUs on one double-fault stack: each must have its own.
    let report = ap_tampered(|vcpu, ram| {
        let tss = cpu::capture(vcpu).tr.base;
        let symbols = superos_vmm::diagnose::KernelSymbols::parse(superos_vmm::images::KERNEL_ELF);
        let shared = symbols.address("__ist_double_fault_top").unwrap();
        ram.write(kernel_gpa(vcpu, ram, tss + 0x24), &shared).unwrap();
    });
    assert_ap_finding(&report, &["TSS.IST1 (vector 8)", "CPU 1's IST stack for vector 8"]);
}

#[test]
fn cpu_state_intact_catches_an_application_processors_lstar_moved() {
    if !kvm_available() {
        return;
    }
    let report = ap_tampered(|vcpu, _| vcpu_set::set_msr(vcpu, 0xc000_0082, 0x40_0000).unwrap());
    assert_ap_finding(&report, &["MSR LSTAR (0xc0000082) is 0x400000", "`syscall_entry_cpu1`"]);
}

#[test]
fn cpu_state_intact_catches_an_application_processor_without_write_protection() {
    if !kvm_available() {
        return;
    }
    // CR0.WP clear: ring 0 on CPU 1 could write through read-only mappings.
    let report = ap_tampered(|vcpu, _| {
        vcpu_set::update_control(vcpu, |cr0, _, _| *cr0 &= !superos_protocol::cpu::CR0_WP).unwrap()
    });
    assert_ap_finding(&report, &["CR0", "WP"]);
}

/// The owner (pid 1) shares a page with the grantee (pid 2), both spinning
/// on it, then takes it away with `op` (`smp-share`; `unmap` takes away the
/// owner's own mapping, then the owner reads through it and is killed).
fn shared_then_taken_away(op: &str, rounds: u64) -> Scenario {
    let owner_args = format!("mode=owner peer=2 op={op} rounds={rounds}");
    let owner_expect = if op == "unmap" { "expect = { fault = \"unmapped-access\" }" } else { "" };
    scenario(
        &(process_toml("owner", "smp-share", &owner_args, owner_expect)
            + &process_toml(
                "grantee",
                "smp-share",
                "mode=grantee peer=1",
                "expect = { fault = \"use-after-revoke\" }",
            )),
    )
}

/// Runs `op` on `cpus` CPUs with `check` (and `debug_flags`).
fn take_away(op: &str, cpus: u32, check: CheckMode, debug_flags: u32) -> RunReport {
    let mut config = config(shared_then_taken_away(op, 50));
    config.cpus = Some(cpus);
    config.check = check;
    config.debug_flags = debug_flags;
    run_config(config)
}

/// The CPU that logged the first event `pick` accepts.
fn cpu_of(report: &RunReport, mut pick: impl FnMut(&Event) -> bool) -> Option<u32> {
    report.events.iter().find(|entry| pick(&entry.event)).and_then(|entry| entry.cpu)
}

/// Whatever the operation, the grantee, spinning on the region on another
/// CPU, is killed at its first access after the operation returned: it never
/// reads a sequence number written after it (`STALE`), never writes into the
/// freed frame (`free-frames-scrubbed` at the next check), never survives.
/// With checks at every event, and with none (then the VMM never stops the
/// other vCPUs, whose exits would flush their TLBs on some hosts: only the
/// kernel's shootdown does). `shm_unmap` by the owner takes away only the
/// owner's mapping: its read through the unmapped address is killed
/// (`unmapped-access`) while the grantee on the other CPU goes on, until the
/// owner's death destroys the region and kills it at its next access.
#[test]
fn a_grantee_on_another_cpu_loses_the_region_when_the_call_returns() {
    if !kvm_available() {
        return;
    }
    for (cpus, check) in [(2, CheckMode::EveryEvent), (4, CheckMode::EveryEvent), (2, CheckMode::Off)] {
        for op in ["revoke", "destroy", "exit", "unmap"] {
            let report = take_away(op, cpus, check, 0);
            let what = format!("{op} on {cpus} CPUs, checks {check:?}");
            let grantee = report.output_of("grantee");
            assert!(
                !grantee.iter().any(|l| l.contains("STALE") || l.contains("SURVIVED")),
                "{what}: {grantee:?}"
            );
            assert_success(&report);
            assert_no_violation(&report);
            let owner = report.output_of("owner");
            assert!(owner.iter().any(|l| l.contains("50 rounds acknowledged by pid 2")), "{what}: {owner:?}");
            assert!(!owner.iter().any(|l| l.contains("SURVIVED")), "{what}: {owner:?}");
            if op == "unmap" {
                // The owner's shm_unmap left the grantee's mapping alone: the
                // grantee died of the owner's death, after it.
                let killed = |pid: u32| {
                    report.events.iter().find_map(|entry| match entry.event {
                        Event::ProcessKilled { pid: p, .. } if p == pid => Some(entry.seq),
                        _ => None,
                    })
                };
                assert!(
                    owner.iter().any(|l| l.contains("unmapped") && l.contains("reading it")),
                    "{what}: {owner:?}"
                );
                assert!(
                    killed(1).is_some() && killed(1) < killed(2),
                    "{what}: {:?} {:?}",
                    killed(1),
                    killed(2)
                );
            }
            // The two ran side by side: the region was taken away on one CPU
            // and the grantee killed on another.
            let taken = cpu_of(&report, |e| match op {
                "revoke" => matches!(e, Event::ShmRevoked { .. }),
                "destroy" => matches!(e, Event::ShmDestroyed { .. }),
                "unmap" => matches!(e, Event::ShmUnmapped { pid: 1, .. }),
                _ => matches!(e, Event::ProcessExited { pid: 1, .. }),
            });
            let killed = cpu_of(&report, |e| matches!(e, Event::ProcessKilled { pid: 2, .. }));
            assert!(taken.is_some() && killed.is_some() && taken != killed, "{what}: {taken:?} {killed:?}");
        }
    }
}

/// The control: without the shootdown IPI, a host whose TLB keeps stale
/// translations (ordinary KVM) lets the grantee go on through the old
/// mapping, and the test above would fail. It needs the two vCPUs to run at
/// the same time on two host CPUs: with one, the grantee's vCPU is not
/// running while the owner revokes (and under QEMU's TCG, as in
/// `tests/nested/run`, a world switch drops the nested guest's TLB). On the
/// PVM host an emulated page-table write reaches every vCPU at once
/// (`docs/SMP.md`, measured), so there the control cannot fail and is not
/// run.
#[test]
fn without_the_shootdown_a_grantee_on_another_cpu_keeps_a_stale_translation() {
    if !kvm_available() || superos_vmm::vm::detect_host_flavor() == superos_protocol::boot::HostFlavor::Pvm {
        return;
    }
    let host_cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if host_cpus < 2 {
        eprintln!(
            "skipped: {host_cpus} host CPU, so the two vCPUs never run at once and no TLB can go stale"
        );
        return;
    }
    // No checks: nothing but the kernel may flush the grantee's TLB.
    let report = take_away("revoke", 2, CheckMode::Off, superos_protocol::boot::DEBUG_SKIP_SHOOTDOWN);
    let grantee = report.output_of("grantee");
    let stale = grantee.iter().any(|l| l.contains("STALE") || l.contains("SURVIVED"));
    assert!(stale, "the missing shootdown went unnoticed: {grantee:?}");
}

/// Every embedded scenario (IPC, shared memory, faults, the CPU attacks,
/// quotas) with processes spread over 2 CPUs keeps every invariant at every
/// event and ends as it does on one.
#[test]
fn every_embedded_scenario_on_two_cpus_keeps_every_invariant_at_every_event() {
    if !kvm_available() {
        return;
    }
    let mut on_cpu_1 = Vec::new();
    for name in superos_vmm::images::scenario_names() {
        let mut config = config(Scenario::load(name).unwrap());
        config.cpus = Some(2);
        let report = run_config(config);
        assert_no_violation(&report);
        assert!(report.success(), "{name} on 2 CPUs: {}\n{:#?}", report.exit, report.processes);
        if report.events.iter().any(|entry| entry.cpu == Some(1)) {
            on_cpu_1.push(name);
        }
    }
    // The second CPU ran processes too (in the default scenario's nine,
    // certainly: CPU 0 is busy with one while another is runnable).
    assert!(on_cpu_1.contains(&"default"), "CPU 1 logged events only in {on_cpu_1:?}");
}

/// The fuzzer's seeds, one of each shape, with processes spread over 2 CPUs:
/// every oracle of the single-CPU campaign holds.
#[test]
fn a_fuzz_campaign_on_two_cpus() {
    if !kvm_available() {
        return;
    }
    for seed in 1..=FUZZ_SHAPES.len() as u64 {
        let case = fuzz_case(seed, FUZZ_CALLS);
        let mut config = config(scenario(&case.toml));
        config.cpus = Some(2);
        let report = run_config(config);
        if let Err(problems) = check_fuzz_run(&case, &report) {
            panic!("on 2 CPUs: {}", describe_fuzz_failure(&case, &report, &problems));
        }
    }
}

/// Two processes each living 500 lifetimes side by side on 2 CPUs: every
/// frame comes back (the frames free at shutdown are those free at boot).
#[test]
fn a_thousand_process_lifetimes_on_two_cpus_lose_no_frame() {
    if !kvm_available() {
        return;
    }
    let text = process_toml("churn-a", "churn", "pages=16", "runs = 500")
        + &process_toml("churn-b", "churn", "pages=16", "runs = 500");
    let mut config = config(scenario(&text));
    config.cpus = Some(2);
    config.timeout = std::time::Duration::from_secs(300);
    let report = run_config(config);
    assert_success(&report);
    assert_no_violation(&report);
    let (free, _, spawned) = shutdown_frames(&report).expect("a KernelShutdown event");
    assert_eq!(spawned, 1000);
    assert_eq!(Some(free), ready_free_frames(&report), "frames lost");
    assert!(report.lines.iter().all(|line| !line.text.starts_with("churn")), "a run failed");
}

/// Each run of scenario process `spec_index`, in spawn order: its pid and
/// the CPUs that logged its `MemMapped`, `MemProtected` and `ProcessKilled`.
fn cpus_of_runs(report: &RunReport, spec_index: u64) -> Vec<(u32, [Option<u32>; 3])> {
    let pids = pick_events(report, |event| match *event {
        Event::ProcessSpawned { pid, spec_index: index, .. } if index == spec_index => Some(pid),
        _ => None,
    });
    pids.into_iter()
        .map(|(_, pid)| {
            let mapped = cpu_of(report, |e| matches!(*e, Event::MemMapped { pid: p, .. } if p == pid));
            let protected = cpu_of(report, |e| matches!(*e, Event::MemProtected { pid: p, .. } if p == pid));
            let killed = cpu_of(report, |e| matches!(*e, Event::ProcessKilled { pid: p, .. } if p == pid));
            (pid, [mapped, protected, killed])
        })
        .collect()
}

/// `mem_protect` to read-only holds while the (single-threaded) process
/// itself migrates between CPUs. `fault kind=write-protected yields=4` maps
/// a page, writes it, yields 4 times, protects it read-only, yields 4 times,
/// reads it back and writes it: started `runs` times in a row, next to one
/// `yield-turns` per CPU (more runnable processes than CPUs, all yielding, so
/// a yield hands the CPU to another process and the next CPU free picks the
/// faulter up again). Whichever CPU the write comes from, and whatever an
/// earlier CPU's TLB held, every run is killed for `write-to-read-only`
/// (none prints `SURVIVED`, none reads back anything but what it wrote), with
/// checks at every event; and the process did move: some runs protected the
/// page on another CPU than the one that mapped it, some were killed on
/// another CPU than the one that protected it. 30 runs on 2 CPUs; 10 on 4
/// (each CPU more costs time on a 2-core host, and migrations are more
/// frequent there). As with the shootdown tests above, only ordinary KVM can
/// show a stale translation; on the PVM host a page-table write reaches every
/// vCPU at once (`docs/SMP.md`).
#[test]
fn mem_protect_to_read_only_holds_while_the_process_migrates_between_cpus() {
    if !kvm_available() {
        return;
    }
    // (CPUs, runs of the faulter, turns of each competitor: about three
    // times as long as the runs take on an idle PVM host, so that on a
    // loaded one the competitors still outlast the faulter, which alone
    // never moves: 300 turns once ran out a third of the way into the runs
    // under a full parallel `cargo test`.)
    for (cpus, runs, turns) in [(2u32, 30u32, 900), (4, 10, 240)] {
        let mut text = process_toml(
            "protect",
            "fault",
            "kind=write-protected yields=4",
            &format!("runs = {runs}\nexpect = {{ fault = \"write-to-read-only\" }}"),
        );
        for i in 0..cpus {
            text += &process_toml(&format!("turns-{i}"), "yield-turns", &format!("n={turns}"), "");
        }
        let mut config = config(scenario(&text));
        config.cpus = Some(cpus);
        assert_eq!(config.check, CheckMode::EveryEvent);
        let report = run_config(config);
        let what = format!("{runs} runs on {cpus} CPUs");
        assert_success(&report);
        assert_no_violation(&report);
        assert!(report.stats.checks.checks > report.events.len() as u64, "{what}: {:?}", report.stats.checks);
        let protect = report.process("protect").expect("the faulter's outcome");
        assert_eq!(
            (protect.runs_finished, protect.runs_as_expected),
            (runs, runs),
            "{what}: {}",
            protect.describe()
        );
        let output = report.output_of("protect");
        assert!(!output.iter().any(|l| l.contains("SURVIVED") || l.contains("WRONG")), "{what}: {output:#?}");
        let writes = output.iter().filter(|l| l.ends_with("after protecting it read-only")).count();
        assert_eq!(writes, runs as usize, "{what}: every run got as far as the write: {output:#?}");
        let cpus_of_runs = cpus_of_runs(&report, 0);
        assert_eq!(cpus_of_runs.len(), runs as usize, "{what}: {cpus_of_runs:?}");
        for &(pid, logged) in &cpus_of_runs {
            let (_, fault, _) =
                kill_event(&report, pid).unwrap_or_else(|| panic!("{what}: pid {pid} not killed"));
            assert_eq!(fault, Some(FaultKind::WriteToReadOnly), "{what}: pid {pid}");
            assert!(logged.iter().all(Option::is_some), "{what}: pid {pid}: {logged:?}");
        }
        let moved = |from: usize| cpus_of_runs.iter().filter(|(_, cpu)| cpu[from] != cpu[from + 1]).count();
        let (protected_elsewhere, killed_elsewhere) = (moved(0), moved(1));
        assert!(
            protected_elsewhere > 0 && killed_elsewhere > 0,
            "{what}: the faulter never moved between {}: {cpus_of_runs:?}",
            if protected_elsewhere == 0 { "mem_map and mem_protect" } else { "mem_protect and the write" }
        );
        for i in 0..cpus {
            assert_eq!(status_of(&report, &format!("turns-{i}")), ProcessStatus::Exited(0), "{what}");
        }
    }
}
