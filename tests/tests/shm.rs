//! Shared memory on the real kernel: capabilities that cannot be forged,
//! borrowed, kept or widened; grants that give no access until mapped;
//! revocation that takes effect at once (mid-loop, and when the owner exits);
//! shared quotas; frames that live until the region is destroyed; and a
//! producer/consumer pipeline streaming through a shared region.

use superos_protocol::event::{Event, FaultKind, QuotaKind};
use superos_protocol::layout::PAGE_SIZE;
use superos_protocol::syscall::{
    CAPS_MAX, OFFERS_PER_GRANTER, PROT_READ, RIGHT_GRANT, RIGHT_READ, RIGHT_WRITE, SHM_REGIONS_MAX,
};
use superos_tests::*;
use superos_vmm::run::{ProcessStatus, RunReport};

/// Pages of the regions `shm-attack` creates unless told otherwise.
const PAGES: u64 = 4;

/// One `shm-attack` process.
fn attack(name: &str, args: &str, extra: &str) -> String {
    process_toml(name, "shm-attack", args, extra)
}

/// `expect = { fault = "<fault>" }`.
fn expect_fault(fault: FaultKind) -> String {
    format!("expect = {{ fault = \"{}\" }}", fault.name())
}

/// `(granter, region, grantee, rights)` of every `ShmGranted` event.
fn grants(report: &RunReport) -> Vec<(u32, u64, u64, u64)> {
    events(report)
        .filter_map(|event| match *event {
            Event::ShmGranted { pid, region, grantee, rights } => Some((pid, region, grantee, rights)),
            _ => None,
        })
        .collect()
}

/// `(position, owner, region, frames freed)` of every `ShmDestroyed` event.
fn destroyed(report: &RunReport) -> Vec<(usize, u32, u64, u64)> {
    pick_events(report, |event| match *event {
        Event::ShmDestroyed { pid, region, frames_freed } => Some((pid, region, frames_freed)),
        _ => None,
    })
    .into_iter()
    .map(|(i, (pid, region, frames))| (i, pid, region, frames))
    .collect()
}

/// The position of the `ShmRevoked` event that took `region` from `target`,
/// and the address it was mapped at there.
fn revoked(report: &RunReport, region: u64, target: u32) -> Option<(usize, u64)> {
    find_event(report, |event| match *event {
        Event::ShmRevoked { region: r, target: t, addr, .. } if r == region && t == u64::from(target) => {
            Some(addr)
        }
        _ => None,
    })
}

/// The `QuotaDenied` events of `pid`: (quota, requested, limit).
fn denials(report: &RunReport, pid: u32) -> Vec<(Option<QuotaKind>, u64, u64)> {
    events(report)
        .filter_map(|event| match *event {
            Event::QuotaDenied { pid: p, quota, requested, limit } if p == pid => {
                Some((quota, requested, limit))
            }
            _ => None,
        })
        .collect()
}

/// Panics unless `name` was terminated with `fault` at an address inside its
/// mapping of `region` at `addr` (of `len` bytes).
fn assert_killed_inside(report: &RunReport, name: &str, fault: FaultKind, addr: u64, len: u64) {
    match status_of(report, name) {
        ProcessStatus::Killed { fault: got, addr: at, .. } => {
            assert_eq!(got, Some(fault), "{name}: {report:#?}");
            assert!(
                (addr..addr + len).contains(&at),
                "{name}: fault at {at:#x}, mapping at {addr:#x}+{len:#x}"
            );
        }
        other => panic!("{name} was not terminated: {other}\n{report:#?}"),
    }
}

/// Panics unless nothing `name` printed says it survived what should have
/// killed it.
fn assert_did_not_survive(report: &RunReport, name: &str) {
    let output = report.output_of(name);
    assert!(output.iter().all(|line| !line.contains("SURVIVED")), "{name}: {output:#?}");
}

#[test]
fn a_grant_without_a_mapping_gives_no_access() {
    if !kvm_available() {
        return;
    }
    let report = run_text(
        &(attack("owner", "mode=no-map role=owner peer=2", "")
            + &attack(
                "grantee",
                "mode=no-map role=grantee peer=1",
                &expect_fault(FaultKind::UnmappedAccess),
            )),
    );
    assert_success(&report);
    assert_checks_pass(&report, "owner", 3);
    assert_eq!(grants(&report), vec![(1, 1, 2, RIGHT_READ)]);
    assert!(shm_mappings(&report, 2, 1).is_empty(), "the grantee never mapped: {:#?}", report.events);
    // It read exactly where the owner has the region mapped, and that address
    // means nothing in its own address space.
    let owner_addr = shm_mappings(&report, 1, 1)[0];
    match status_of(&report, "grantee") {
        ProcessStatus::Killed { fault, addr, .. } => {
            assert_eq!(fault, Some(FaultKind::UnmappedAccess));
            assert_eq!(addr, owner_addr);
        }
        other => panic!("the grantee was not terminated: {other}"),
    }
    let output = report.output_of("grantee");
    assert!(
        output.iter().any(|line| line.ends_with("mapped at 0x0")),
        "cap_list shows no mapping: {output:#?}"
    );
    assert_did_not_survive(&report, "grantee");
    assert_no_frame_lost(&report);
}

#[test]
fn forged_and_guessed_handles_are_bad_handles() {
    if !kvm_available() {
        return;
    }
    let report = run_text(
        &(attack("forger", "mode=forged peer=2", "") + &process_toml("bystander", "hello", "spin=300", "")),
    );
    assert_success(&report);
    assert_checks_pass(&report, "forger", 30);
    let output = report.output_of("forger");
    assert!(
        output
            .iter()
            .any(|line| line.contains("random handles refused by every call")
                && line.ends_with("(as expected)")),
        "{output:#?}"
    );
    // Not one guess did anything: the only region is the forger's own, never
    // granted, revoked or mapped twice, destroyed once by its owner.
    let created = events(&report).filter(|event| matches!(event, Event::ShmCreated { .. })).count();
    assert_eq!(created, 1, "{:#?}", report.events);
    assert!(grants(&report).is_empty(), "{:#?}", report.events);
    assert!(!events(&report).any(|event| matches!(event, Event::ShmRevoked { .. })), "{:#?}", report.events);
    assert_eq!(shm_mappings(&report, 1, 1).len(), 1, "{:#?}", report.events);
    assert_eq!(destroyed(&report).iter().map(|d| (d.1, d.2, d.3)).collect::<Vec<_>>(), vec![(1, 1, PAGES)]);
    assert_no_frame_lost(&report);
}

#[test]
fn a_handle_learned_from_another_process_is_useless() {
    if !kvm_available() {
        return;
    }
    let report = run_text(
        &(attack("owner", "mode=foreign role=owner peer=2", "")
            + &attack("thief", "mode=foreign role=grantee peer=1", "")),
    );
    assert_success(&report);
    assert_checks_pass(&report, "owner", 8);
    assert_checks_pass(&report, "thief", 8);
    // The one grant is the owner's; the thief's attempts (grant, revoke,
    // destroy with the owner's handle) left no trace.
    assert_eq!(grants(&report), vec![(1, 1, 2, RIGHT_READ)]);
    assert_eq!(destroyed(&report).iter().map(|d| (d.1, d.2, d.3)).collect::<Vec<_>>(), vec![(1, 1, PAGES)]);
    assert_eq!(shm_mappings(&report, 2, 1).len(), 1);
    assert_no_frame_lost(&report);
}

#[test]
fn stale_handles_are_bad_handles_after_revoke_and_destroy() {
    if !kvm_available() {
        return;
    }
    let report = run_text(
        &(attack("owner", "mode=stale role=owner peer=2", "")
            + &attack("grantee", "mode=stale role=grantee peer=1", "")),
    );
    assert_success(&report);
    assert_checks_pass(&report, "owner", 8);
    assert_checks_pass(&report, "grantee", 7);
    let output = report.output_of("grantee");
    assert!(
        output.contains(
            &"shm-attack: stale (grantee): revoked handle while holding a new one: Err(BadHandle) (as expected)"
        ),
        "{output:#?}"
    );
    // Region 1 was revoked from the grantee (never mapped), then region 2
    // granted and destroyed, then region 1 destroyed.
    let (revoke, addr) = revoked(&report, 1, 2).expect("a ShmRevoked event for region 1");
    assert_eq!(addr, 0, "the grantee never mapped region 1");
    let gone = destroyed(&report);
    assert_eq!(gone.iter().map(|d| (d.1, d.2)).collect::<Vec<_>>(), vec![(1, 2), (1, 1)], "{gone:?}");
    assert!(revoke < gone[0].0);
    assert_no_frame_lost(&report);
}

#[test]
fn rights_cannot_be_escalated() {
    if !kvm_available() {
        return;
    }
    let report = run_text(
        &(attack("owner", "mode=escalate role=owner peer=2", "")
            + &attack("grantee", "mode=escalate role=grantee peer=1 third=3", "")
            + &attack("witness", "mode=witness peer=2 caps=1", "")),
    );
    assert_success(&report);
    assert_checks_pass(&report, "owner", 2);
    assert_checks_pass(&report, "grantee", 14);
    assert_checks_pass(&report, "witness", 2);
    // The only grants: read+grant to the grantee, and read (a subset) from it
    // to the witness.
    assert_eq!(grants(&report), vec![(1, 1, 2, RIGHT_READ | RIGHT_GRANT), (2, 1, 3, RIGHT_READ)]);
    // The grantee mapped read-only, once, and never changed its protection.
    let maps: Vec<u64> = events(&report)
        .filter_map(|event| match *event {
            Event::ShmMapped { pid: 2, prot, .. } => Some(prot),
            _ => None,
        })
        .collect();
    assert_eq!(maps, vec![PROT_READ]);
    assert!(!events(&report).any(|event| matches!(event, Event::MemProtected { pid: 2, .. })));
    assert_no_frame_lost(&report);
}

#[test]
fn a_capability_without_the_grant_right_cannot_be_regranted() {
    if !kvm_available() {
        return;
    }
    let report = run_text(
        &(attack("owner", "mode=regrant role=owner peer=2", "")
            + &attack("grantee", "mode=regrant role=grantee peer=1 third=3", "")
            + &attack("witness", "mode=witness peer=2 caps=0", "")),
    );
    assert_success(&report);
    assert_checks_pass(&report, "owner", 3);
    assert_checks_pass(&report, "grantee", 6);
    assert_checks_pass(&report, "witness", 1);
    assert_eq!(grants(&report), vec![(1, 1, 2, RIGHT_READ | RIGHT_WRITE)]);
    assert_no_frame_lost(&report);
}

#[test]
fn revoking_a_grantee_mid_loop_terminates_it_with_use_after_revoke() {
    if !kvm_available() {
        return;
    }
    let report = run_text(
        &(attack("owner", "mode=mid-loop role=owner peer=2", "")
            + &attack(
                "looper",
                "mode=mid-loop role=grantee peer=1",
                &expect_fault(FaultKind::UseAfterRevoke),
            )),
    );
    assert_success(&report);
    assert_checks_pass(&report, "owner", 4);
    let output = report.output_of("looper");
    assert!(output.iter().any(|line| line.contains("in a loop until it is taken away")), "{output:#?}");
    assert_did_not_survive(&report, "looper");
    let addr = shm_mappings(&report, 2, 1)[0];
    assert_killed_inside(&report, "looper", FaultKind::UseAfterRevoke, addr, PAGES * PAGE_SIZE);
    // The revocation (which unmapped it) came first, then the kill.
    let (revoke, unmapped_at) = revoked(&report, 1, 2).expect("a ShmRevoked event");
    assert_eq!(unmapped_at, addr);
    let (kill, _, _) = kill_event(&report, 2).expect("a ProcessKilled event");
    assert!(revoke < kill, "revoked at event {revoke}, killed at {kill}");
    assert_eq!(destroyed(&report).iter().map(|d| (d.1, d.2, d.3)).collect::<Vec<_>>(), vec![(1, 1, PAGES)]);
    assert_no_frame_lost(&report);
}

#[test]
fn an_owner_exit_revokes_its_region_from_every_grantee() {
    if !kvm_available() {
        return;
    }
    let fault = expect_fault(FaultKind::UseAfterRevoke);
    let report = run_text(
        &(attack("owner", "mode=owner-exit role=owner peer=2,3", "")
            + &attack("grantee-a", "mode=owner-exit role=grantee peer=1", &fault)
            + &attack("grantee-b", "mode=owner-exit role=grantee peer=1", &fault)),
    );
    assert_success(&report);
    assert_eq!(status_of(&report, "owner"), ProcessStatus::Exited(0));
    let output = report.output_of("owner");
    assert!(output.iter().any(|line| line.contains("exiting without destroying MEM_SHARE:1")), "{output:#?}");
    // Its exit destroyed the region, after revoking it from both grantees.
    let gone = destroyed(&report);
    assert_eq!(gone.iter().map(|d| (d.1, d.2, d.3)).collect::<Vec<_>>(), vec![(1, 1, PAGES)]);
    for (name, pid) in [("grantee-a", 2), ("grantee-b", 3)] {
        assert_did_not_survive(&report, name);
        let addr = shm_mappings(&report, pid, 1)[0];
        assert_killed_inside(&report, name, FaultKind::UseAfterRevoke, addr, PAGES * PAGE_SIZE);
        let (revoke, unmapped_at) = revoked(&report, 1, pid).expect("a ShmRevoked event");
        assert_eq!(unmapped_at, addr, "{name}");
        let (kill, _, _) = kill_event(&report, pid).expect("a ProcessKilled event");
        assert!(revoke < gone[0].0 && revoke < kill, "{name}: revoked at {revoke}, killed at {kill}");
    }
    assert_no_frame_lost(&report);
}

#[test]
fn the_owners_own_access_after_destroy_is_use_after_revoke() {
    if !kvm_available() {
        return;
    }
    let report = run_text(&attack("owner", "mode=own-stale", &expect_fault(FaultKind::UseAfterRevoke)));
    assert_success(&report);
    assert_did_not_survive(&report, "owner");
    let addr = shm_mappings(&report, 1, 1)[0];
    assert_killed_inside(&report, "owner", FaultKind::UseAfterRevoke, addr, PAGE_SIZE);
    assert_eq!(destroyed(&report).iter().map(|d| (d.1, d.2, d.3)).collect::<Vec<_>>(), vec![(1, 1, 1)]);
    assert_no_frame_lost(&report);
}

#[test]
fn creating_beyond_the_shared_quota_fails_or_kills() {
    if !kvm_available() {
        return;
    }
    for policy in ["fail", "kill"] {
        let mut extra = format!("quota = {{ shared_kib = 64, on_violation = \"{policy}\" }}");
        if policy == "kill" {
            extra += &format!("\n{}", expect_fault(FaultKind::SharedQuotaExceeded));
        }
        let report = run_text(
            &(attack("creator", "mode=quota", &extra) + &process_toml("bystander", "hello", "spin=20", "")),
        );
        assert_success(&report);
        let output = report.output_of("creator");
        assert!(
            output.iter().any(|line| line.ends_with("creating one page over the shared quota")),
            "{output:#?}"
        );
        let denied = denials(&report, 1);
        assert_eq!(denied, vec![(Some(QuotaKind::Shared), (64 << 10) + PAGE_SIZE, 64 << 10)], "{policy}");
        if policy == "fail" {
            assert_checks_pass(&report, "creator", 6);
        } else {
            assert_eq!(fault_of(&report, "creator"), Some(FaultKind::SharedQuotaExceeded));
            assert!(output.iter().all(|line| !line.ends_with("checks as expected")), "{output:#?}");
            // Its two regions went with it.
            assert_eq!(destroyed(&report).len(), 2, "{:#?}", report.events);
        }
        assert_eq!(status_of(&report, "bystander"), ProcessStatus::Exited(0));
        assert_no_frame_lost(&report);
    }
}

#[test]
fn mapping_a_granted_region_counts_against_the_shared_quota() {
    if !kvm_available() {
        return;
    }
    for policy in ["fail", "kill"] {
        let mut extra = format!("quota = {{ shared_kib = 32, on_violation = \"{policy}\" }}");
        if policy == "kill" {
            extra += &format!("\n{}", expect_fault(FaultKind::SharedQuotaExceeded));
        }
        // 16 KiB and 32 KiB regions, for a grantee with 32 KiB of shared quota.
        let report = run_text(
            &(attack("owner", "mode=quota role=owner peer=2 pages=4", "")
                + &attack("mapper", "mode=quota role=grantee peer=1", &extra)),
        );
        assert_success(&report);
        assert_checks_pass(&report, "owner", 4);
        // Receiving the capabilities cost nothing; mapping the small one
        // fitted; the big one on top would have been 48 KiB.
        assert_eq!(shm_mappings(&report, 2, 1).len(), 1, "{policy}");
        let denied = denials(&report, 2);
        assert_eq!(denied, vec![(Some(QuotaKind::Shared), 48 << 10, 32 << 10)], "{policy}");
        if policy == "fail" {
            assert_checks_pass(&report, "mapper", 4);
            // Alone, the big region fits.
            assert_eq!(shm_mappings(&report, 2, 2).len(), 1);
        } else {
            assert_eq!(fault_of(&report, "mapper"), Some(FaultKind::SharedQuotaExceeded));
            assert!(shm_mappings(&report, 2, 2).is_empty());
        }
        // The owner created 48 KiB without a quota; nothing was denied to it.
        assert!(denials(&report, 1).is_empty());
        assert_no_frame_lost(&report);
    }
}

#[test]
fn frames_are_freed_only_when_the_region_is_destroyed() {
    if !kvm_available() {
        return;
    }
    let report = run_text(
        &(attack("owner", "mode=lifecycle role=owner peer=2 pages=16", "")
            + &attack("grantee", "mode=lifecycle role=grantee peer=1", "")),
    );
    assert_success(&report);
    assert_checks_pass(&report, "owner", 6);
    assert_checks_pass(&report, "grantee", 3);
    let owner = report.output_of("owner");
    assert!(
        owner.iter().any(|line| line
            .starts_with("shm-attack: lifecycle (owner): the grantee's write, after everyone unmapped:")
            && line.ends_with("(as expected)")),
        "{owner:#?}"
    );
    let unmaps = pick_events(&report, |event| match *event {
        Event::ShmUnmapped { pid, region: 1, .. } => Some(pid),
        _ => None,
    });
    // The owner unmapped first (the grantee still mapped it and read it
    // intact), then the grantee, then the owner unmapped its second mapping.
    assert_eq!(unmaps.iter().map(|u| u.1).collect::<Vec<_>>(), vec![1, 2, 1], "{:#?}", report.events);
    let gone = destroyed(&report);
    assert_eq!(gone.iter().map(|d| (d.1, d.2, d.3)).collect::<Vec<_>>(), vec![(1, 1, 16)]);
    assert!(unmaps.iter().all(|(i, _)| *i < gone[0].0), "every frame stayed until the destroy");
    assert_eq!(shm_mappings(&report, 1, 1).len(), 2);
    assert_no_frame_lost(&report);
}

#[test]
fn mapping_a_region_twice_is_already_mapped() {
    if !kvm_available() {
        return;
    }
    let report = run_text(&attack("double", "mode=double-map", ""));
    assert_success(&report);
    assert_checks_pass(&report, "double", 12);
    let output = report.output_of("double");
    assert!(
        output.contains(&"shm-attack: double-map: map read-write again: Err(AlreadyMapped) (as expected)")
    );
    // Two successful mappings, one after the other.
    assert_eq!(shm_mappings(&report, 1, 1).len(), 2);
    assert_eq!(destroyed(&report).len(), 1);
    assert_no_frame_lost(&report);
}

#[test]
fn a_revoked_capability_cannot_be_mapped_again() {
    if !kvm_available() {
        return;
    }
    let report = run_text(
        &(attack("owner", "mode=map-after-revoke role=owner peer=2", "")
            + &attack("grantee", "mode=map-after-revoke role=grantee peer=1", "")),
    );
    assert_success(&report);
    assert_checks_pass(&report, "owner", 5);
    assert_checks_pass(&report, "grantee", 11);
    let output = report.output_of("grantee");
    assert!(output.contains(
        &"shm-attack: map-after-revoke (grantee): map the revoked handle read-only: Err(BadHandle) (as expected)"
    ));
    // It was mapped when revoked; the new grant's mapping is elsewhere.
    let mappings = shm_mappings(&report, 2, 1);
    assert_eq!(mappings.len(), 2, "{:#?}", report.events);
    assert_eq!(revoked(&report, 1, 2).map(|r| r.1), Some(mappings[0]));
    assert_ne!(mappings[0], mappings[1]);
    assert_eq!(grants(&report).len(), 2);
    assert_no_frame_lost(&report);
}

/// Issue 11, finding 2: revocation costs the former grantee nothing. The
/// owner grants, lets the grantee map and revokes 300 times (more than
/// `MAPPINGS_MAX` entries, which revoked ranges once filled until the
/// grantee could map nothing, or was killed under policy `kill`); the
/// grantee, with policy `kill`, still maps, holds no capability, and
/// releases its last revoked range with `shm_unmap`. Its map keeps at most
/// `REVOKED_MAX` revoked ranges (published per region as nothing: the
/// checker sees no mapping left, at every event).
#[test]
fn revoked_ranges_are_never_charged_to_the_grantee_and_can_be_released() {
    if !kvm_available() {
        return;
    }
    let report = run_text(
        &(attack("owner", "mode=revoke-churn role=owner peer=2 cycles=300", "")
            + &attack(
                "grantee",
                "mode=revoke-churn role=grantee peer=1 cycles=300",
                "quota = { on_violation = \"kill\" }",
            )),
    );
    assert_success(&report);
    assert_checks_pass(&report, "owner", 2);
    assert_checks_pass(&report, "grantee", 5);
    assert_eq!(grants(&report).len(), 300);
    assert!(events(&report).all(|e| !matches!(e, Event::QuotaDenied { .. })), "nobody was refused anything");
    assert_no_frame_lost(&report);
}

/// Issue 11, finding 3: a capability table is not anyone's to fill. A grant
/// is an offer charged to the granter (at most `OFFERS_PER_GRANTER`
/// outstanding; beyond that its grant is refused as its own `capabilities`
/// quota, with a `QuotaDenied` event) that takes nothing of the receiver's
/// until it accepts; the victim accepts its real partner's offer alone and
/// can drop a capability with `cap_drop`.
#[test]
fn sharing_is_opt_in_offers_are_charged_to_the_granter_and_a_holder_can_drop_a_capability() {
    if !kvm_available() {
        return;
    }
    let report = run_text(
        &(attack("flooder", "mode=cap-flood role=flooder peer=2 third=3", "")
            + &attack("victim", "mode=cap-flood role=victim peer=3 third=1", "")
            + &attack("partner", "mode=cap-flood role=partner peer=2 third=1", "")),
    );
    assert_success(&report);
    assert_checks_pass(&report, "flooder", 5 + OFFERS_PER_GRANTER);
    assert_checks_pass(&report, "victim", 8);
    assert_checks_pass(&report, "partner", 2);
    // The flooder's refusal is its own quota's, with an event.
    let denied: Vec<_> = events(&report)
        .filter_map(|e| match *e {
            Event::QuotaDenied { pid, quota, requested, limit } => Some((pid, quota, requested, limit)),
            _ => None,
        })
        .collect();
    let offers = OFFERS_PER_GRANTER as u64;
    assert_eq!(denied, [(1, Some(QuotaKind::Capabilities), offers + 1, offers)]);
    // The victim accepted the partner's offer alone, and dropped it.
    let accepted: Vec<_> = events(&report)
        .filter_map(|e| match *e {
            Event::ShmAccepted { pid, granter, .. } => Some((pid, granter)),
            _ => None,
        })
        .collect();
    assert_eq!(accepted, [(2, 3)]);
    let dropped =
        events(&report).filter(|e| matches!(e, Event::ShmRevoked { pid: 2, target: 2, .. })).count();
    assert_eq!(dropped, 1);
    assert_no_frame_lost(&report);
}

/// The owner, the middle (re-grants read-write to the leaf) and the leaf,
/// which writes in a loop until the revocation that reaches it kills it.
fn transitive(mode: &str) -> String {
    attack("owner", &format!("mode={mode} role=owner peer=2 third=3"), "")
        + &attack("middle", &format!("mode={mode} role=middle peer=1 third=3"), "")
        + &attack(
            "leaf",
            &format!("mode={mode} role=leaf peer=2 third=1"),
            &expect_fault(FaultKind::UseAfterRevoke),
        )
}

/// Asserts the leaf (pid 3) lost its derived capability to a `ShmRevoked`
/// event by `revoker` before it was killed at its next write into the
/// region, and that no frame was lost.
fn assert_leaf_revoked_by(report: &RunReport, revoker: u32) {
    assert_did_not_survive(report, "leaf");
    let addr = shm_mappings(report, 3, 1)[0];
    assert_killed_inside(report, "leaf", FaultKind::UseAfterRevoke, addr, PAGE_SIZE);
    let (revoke, unmapped_at) = revoked(report, 1, 3).expect("a ShmRevoked event for the leaf");
    assert_eq!(unmapped_at, addr);
    assert!(
        events(report)
            .any(|e| matches!(*e, Event::ShmRevoked { pid, region: 1, target: 3, .. } if pid == revoker)),
        "{:#?}",
        report.events
    );
    let (kill, _, _) = kill_event(report, 3).expect("a ProcessKilled event");
    assert!(revoke < kill, "revoked at event {revoke}, killed at {kill}");
    assert_no_frame_lost(report);
}

#[test]
fn revoking_a_capability_revokes_what_was_derived_from_it_in_the_same_call() {
    if !kvm_available() {
        return;
    }
    let report = run_text(&transitive("transitive"));
    assert_success(&report);
    assert_checks_pass(&report, "owner", 5);
    assert_checks_pass(&report, "middle", 3);
    // The middle's revocation and the leaf's are one call's events, in a row.
    let (middle, _) = revoked(&report, 1, 2).expect("a ShmRevoked event for the middle");
    let (leaf, _) = revoked(&report, 1, 3).expect("a ShmRevoked event for the leaf");
    assert_eq!(leaf, middle + 1);
    assert_leaf_revoked_by(&report, 1);
}

#[test]
fn a_granters_exit_revokes_what_it_granted() {
    if !kvm_available() {
        return;
    }
    let report = run_text(&transitive("transitive-exit"));
    assert_success(&report);
    assert_checks_pass(&report, "owner", 4);
    assert_eq!(status_of(&report, "middle"), ProcessStatus::Exited(0));
    assert_leaf_revoked_by(&report, 2);
}

#[test]
fn shm_argument_errors_are_error_returns_not_faults() {
    if !kvm_available() {
        return;
    }
    let report = run_text(
        &(attack("owner", "mode=bad-args role=owner peer=2 dead=3", "")
            + &attack("grantee", "mode=bad-args role=grantee peer=1", "")
            + &process_toml("dead", "exit-code", "0", "expect = { exit = 0 }")),
    );
    assert_success(&report);
    assert_checks_pass(&report, "owner", 60);
    assert_checks_pass(&report, "grantee", 6);
    let owner = report.output_of("owner");
    for needle in [
        "shm-attack: bad-args (owner): shm_create with length 0: Err(InvalidArgument) (as expected)",
        "shm-attack: bad-args (owner): shm_create with SHM_MAX + 1 bytes: Err(TooLarge) (as expected)",
        "shm-attack: bad-args (owner): shm_map read+exec: Err(NotPermitted) (as expected)",
        "shm-attack: bad-args (owner): shm_unmap of the second page of the mapping: Err(BadAddress) (as expected)",
        "shm-attack: bad-args (owner): grant to myself: Err(InvalidArgument) (as expected)",
        "shm-attack: bad-args (owner): grant to pid 3 (exited): Err(NoSuchProcess) (as expected)",
        "shm-attack: bad-args (owner): one capability more: Err(QuotaExceeded) (as expected)",
    ] {
        assert!(owner.contains(&needle), "missing {needle:?}: {owner:#?}");
    }
    let grantee = report.output_of("grantee");
    for needle in [
        "shm-attack: bad-args (grantee): revoke by a non-owner: Err(NotPermitted) (as expected)",
        "shm-attack: bad-args (grantee): destroy by a non-owner: Err(NotPermitted) (as expected)",
    ] {
        assert!(grantee.contains(&needle), "missing {needle:?}: {grantee:#?}");
    }
    // Refused calls create nothing: a write-only region, a read-only one, the
    // granted one, and 31 more to fill the table.
    let created = events(&report).filter(|event| matches!(event, Event::ShmCreated { .. })).count();
    assert_eq!(created, 34, "{:#?}", report.events);
    assert_eq!(destroyed(&report).len(), 34);
    assert_no_frame_lost(&report);
}

/// The value after `checksum ` in a line.
fn checksum(line: &str) -> &str {
    let start = line.find("checksum ").expect("a checksum") + "checksum ".len();
    line[start..].split([',', ' ']).next().unwrap()
}

#[test]
fn the_pipeline_streams_intact_data_and_the_consumer_dies_after_revocation() {
    if !kvm_available() {
        return;
    }
    let report = run_embedded("shm-pipeline");
    assert_success(&report);
    assert_eq!(status_of(&report, "producer"), ProcessStatus::Exited(0));
    let producer = report.output_of("producer");
    let consumer = report.output_of("consumer");
    let sent =
        producer.iter().find(|line| line.contains(": sent ")).unwrap_or_else(|| panic!("{producer:#?}"));
    let received =
        consumer.iter().find(|line| line.contains(": received ")).unwrap_or_else(|| panic!("{consumer:#?}"));
    assert!(sent.starts_with("shm-pipeline: producer: sent 262144 bytes in 8 chunks"), "{sent}");
    assert!(
        received.starts_with("shm-pipeline: consumer: received 262144 bytes in 8 chunks from pid 1"),
        "{received}"
    );
    assert!(received.contains(", 0 bad bytes, 0 bad chunk checksums, "), "{received}");
    for line in [sent, received] {
        assert!(line.ends_with(" KiB/s") && line.contains(" ns, "), "{line}");
    }
    assert_eq!(checksum(sent), checksum(received));
    assert!(
        consumer.iter().any(|line| line.contains("capability still listed: false")),
        "the revoked capability is gone from cap_list: {consumer:#?}"
    );
    assert_did_not_survive(&report, "consumer");
    // The consumer had the 36 KiB region (64-byte header + 32 KiB, in pages)
    // mapped; it was revoked, then it was killed touching it.
    let len = 9 * PAGE_SIZE;
    let addr = shm_mappings(&report, 2, 1)[0];
    assert_killed_inside(&report, "consumer", FaultKind::UseAfterRevoke, addr, len);
    let (revoke, _) = revoked(&report, 1, 2).expect("a ShmRevoked event");
    let (kill, _, _) = kill_event(&report, 2).expect("a ProcessKilled event");
    assert!(revoke < kill);
    assert_eq!(destroyed(&report).iter().map(|d| (d.1, d.2, d.3)).collect::<Vec<_>>(), vec![(1, 1, 9)]);
    assert_no_frame_lost(&report);

    // The same bytes as the message stream of `ipc-stream`.
    let stream = run_embedded("ipc-stream");
    let line = stream.output_of("receiver")[0].to_string();
    assert_eq!(checksum(&line), checksum(received), "{line}");
}

#[test]
fn a_read_only_grantee_that_writes_is_terminated_and_the_owner_data_survives() {
    if !kvm_available() {
        return;
    }
    let report = run_embedded("shm-readonly");
    assert_success(&report);
    assert_checks_pass(&report, "owner", 4);
    let reader = report.output_of("reader");
    assert!(
        reader.iter().any(|line| line.ends_with(", 0 bad words")),
        "it read intact data first: {reader:#?}"
    );
    assert_did_not_survive(&report, "reader");
    let addr = shm_mappings(&report, 2, 1)[0];
    match status_of(&report, "reader") {
        ProcessStatus::Killed { fault, addr: at, .. } => {
            assert_eq!(fault, Some(FaultKind::WriteToReadOnly));
            assert_eq!(at, addr, "it wrote the first word of its mapping");
        }
        other => panic!("the reader was not terminated: {other}"),
    }
    assert_eq!(grants(&report), vec![(1, 1, 2, RIGHT_READ)]);
    assert_no_frame_lost(&report);
}

#[test]
fn the_shm_scenarios_run_as_expected() {
    if !kvm_available() {
        return;
    }
    for name in ["shm-attacks", "shm-revoke", "shm-quota"] {
        let report = run_embedded(name);
        assert_success(&report);
        for process in &report.processes {
            if process.status == ProcessStatus::Exited(0)
                && process.name != "bystander"
                && process.name != "dead"
            {
                assert_checks_pass(&report, &process.name, 1);
            }
        }
        assert_no_frame_lost(&report);
    }
}

#[test]
fn a_full_region_table_is_out_of_memory_for_the_next_creator() {
    if !kvm_available() {
        return;
    }
    // Three fillers in a chain (each keeps its regions until the last has
    // tried): two fill their capability tables, which fills the kernel's
    // region table (SHM_REGIONS_MAX); the third gets out-of-memory at once.
    assert_eq!(SHM_REGIONS_MAX, 2 * CAPS_MAX, "the scenario below relies on it");
    let report = run_text(
        &(attack("filler-a", "mode=fill-table peer=2", "")
            + &attack("filler-b", "mode=fill-table third=1 peer=3", "")
            + &attack("filler-c", "mode=fill-table third=2", "")),
    );
    assert_success(&report);
    assert_no_violation(&report);
    for (name, line) in [
        ("filler-a", "shm-attack: fill-table: created 32 regions, then quota-exceeded"),
        ("filler-b", "shm-attack: fill-table: created 32 regions, then quota-exceeded"),
        ("filler-c", "shm-attack: fill-table: created 0 regions, then out-of-memory"),
    ] {
        let output = report.output_of(name);
        assert!(output.contains(&line), "{name}: {output:#?}");
    }
    let created = events(&report).filter(|e| matches!(e, Event::ShmCreated { .. })).count();
    assert_eq!(created, SHM_REGIONS_MAX);
    assert_no_frame_lost(&report);
}
