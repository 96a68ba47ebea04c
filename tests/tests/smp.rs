//! Several vCPUs (issue 14, first step): the kernel brings every
//! application processor online with its own GDT, TSS and stacks, the VMM
//! checks every vCPU's state at every check with the others paused, and
//! tampering with an application processor's state is caught and named.
//! Processes still run on CPU 0 only (the scheduler is the next step).

use superos_protocol::cpu::{ap_stack, CpuStack, MAX_CPUS};
use superos_protocol::event::Event;
use superos_tests::*;
use superos_vmm::check::Invariant;
use superos_vmm::cpu::{self, tamper as vcpu_set, VcpuFd};
use superos_vmm::memory::GuestRam;
use superos_vmm::monitor::VcpuTamper;
use superos_vmm::run::RunReport;
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
    assert_ap_finding(&report, &["MSR LSTAR (0xc0000082) is 0x400000", "`syscall_entry`"]);
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
