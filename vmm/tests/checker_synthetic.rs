//! The invariant checker on synthetic guests (no KVM): a small system is
//! built in guest RAM exactly as the protocol describes it (introspection
//! root, process and region tables, owner table, page tables); the clean
//! system passes every invariant, and each corruption is reported under
//! exactly the invariant it breaks. Every corruption is also checked
//! incrementally (the free-frame scan skipping the frames an earlier check
//! found zero and nothing has written since, as `run --check` does), and
//! must be reported word for word as the full check reports it.

use std::collections::BTreeSet;
use superos_protocol::introspect::{
    FrameRange, IntrospectionRoot, ParticipantRecord, ProcessRecord, RegionRecord, INTROSPECTION_MAGIC,
    PARTICIPANT_HOLDS, PARTICIPANT_OFFERED, PROCESS_RUNNABLE, REGION_FREE, REGION_LIVE, REGION_PARTICIPANTS,
};
use superos_protocol::layout::{GATE_VA, PAGE_SIZE, USER_STACK_TOP};
use superos_protocol::ownership::FrameOwner;
use superos_protocol::syscall::{PROT_READ, PROT_WRITE, RIGHT_GRANT, RIGHT_READ, RIGHT_WRITE};
use superos_protocol::PROTOCOL_VERSION;
use superos_vmm::arch::paging::{
    PTE_ADDRESS_MASK, PTE_HUGE, PTE_NO_EXECUTE, PTE_PRESENT, PTE_USER, PTE_WRITABLE,
};
use superos_vmm::check::{
    evaluate, evaluate_with, fnv1a, CheckCounters, Facts, Invariant, TextBaseline, Violation,
};
use superos_vmm::introspect::KernelView;
use superos_vmm::memory::GuestRam;
use superos_vmm::walk::{entry_slot, leaf_entry, walk};
use superos_vmm::write_log::{KnownZero, PageBitmap, WriteSource};
use zerocopy::{FromZeros, IntoBytes};

const ROOT: u64 = 0x10_0000;
const PROCS: u64 = 0x11_0000;
const REGIONS: u64 = 0x12_0000;
const REGION_FRAMES: u64 = 0x13_0000;
const TEXT: u64 = 0x14_0000;
const TEXT_LEN: u64 = 0x3000;
const OWNERS: u64 = 0x18_0000;
const MANAGED: (u64, u64) = (0x20_0000, 0x100_0000);
const USABLE: (u64, u64) = (0x18_0000, 0x100_0000);

const CODE: u64 = 0x40_0000;
const DATA: u64 = 0x1_0000_0000;
const SHARED: u64 = 0x1_0001_0000;
const STACK: u64 = USER_STACK_TOP - PAGE_SIZE;
/// An unused slot in the stack's page table.
const SPARE: u64 = USER_STACK_TOP - 0x10_0000;

const TABLE: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
const RX: u64 = PTE_PRESENT | PTE_USER;
const RW: u64 = PTE_PRESENT | PTE_USER | PTE_WRITABLE | PTE_NO_EXECUTE;
const RO: u64 = PTE_PRESENT | PTE_USER | PTE_NO_EXECUTE;

struct Guest {
    ram: GuestRam,
    next: u64,
    kernel_pml4: u64,
    gate: u64,
    procs: Vec<ProcessRecord>,
    regions: Vec<(RegionRecord, Vec<u64>)>,
    text: TextBaseline,
}

impl Guest {
    /// Two processes (pids 1 and 2), each with code, data, stack and the
    /// gate, and region 1 owned by pid 1 (read-write) and granted to pid 2
    /// (read-only), both mapped.
    fn new() -> Guest {
        let ram = GuestRam::new(16).unwrap();
        let text: Vec<u8> = (0..TEXT_LEN).map(|i| (i * 7) as u8).collect();
        ram.write_bytes(TEXT, &text).unwrap();
        let mut guest = Guest {
            ram,
            next: MANAGED.0,
            kernel_pml4: 0,
            gate: 0,
            procs: Vec::new(),
            regions: Vec::new(),
            text: TextBaseline { gpa: TEXT, hash: fnv1a(&text), bytes: text },
        };
        guest.kernel_pml4 = guest.alloc(FrameOwner::Kernel);
        let pdpt = guest.alloc(FrameOwner::Kernel);
        let pd = guest.alloc(FrameOwner::Kernel);
        guest.ram.write(guest.kernel_pml4 + 256 * 8, &(pdpt | PTE_PRESENT | PTE_WRITABLE)).unwrap();
        guest.ram.write(pdpt, &(pd | PTE_PRESENT | PTE_WRITABLE)).unwrap();
        // The direct map: 2 MiB leaves, writable and non-executable except
        // the first, which holds the kernel text (read-only).
        for i in 0..8u64 {
            let writable = if i == 0 { 0 } else { PTE_WRITABLE };
            let leaf = (i << 21) | PTE_PRESENT | writable | PTE_HUGE | PTE_NO_EXECUTE;
            guest.ram.write(pd + i * 8, &leaf).unwrap();
        }
        guest.gate = guest.alloc(FrameOwner::Kernel);
        guest.spawn(1);
        guest.spawn(2);
        let frames = vec![guest.alloc(FrameOwner::Shared(1)), guest.alloc(FrameOwner::Shared(1))];
        for (i, &frame) in frames.iter().enumerate() {
            let at = SHARED + i as u64 * PAGE_SIZE;
            guest.map(1, at, frame | RW);
            guest.map(2, at, frame | RO);
        }
        let mut participants = [ParticipantRecord::default(); REGION_PARTICIPANTS];
        participants[0] = ParticipantRecord {
            pid: 1,
            rights: (RIGHT_READ | RIGHT_WRITE | RIGHT_GRANT) as u16,
            state: PARTICIPANT_HOLDS,
            mapped_at: SHARED,
            prot: (PROT_READ | PROT_WRITE) as u32,
            granted_by: 1,
        };
        participants[1] = ParticipantRecord {
            pid: 2,
            rights: RIGHT_READ as u16,
            state: PARTICIPANT_HOLDS,
            mapped_at: SHARED,
            prot: PROT_READ as u32,
            granted_by: 1,
        };
        let record = RegionRecord {
            id: 1,
            state: REGION_LIVE,
            owner: 1,
            frame_count: 2,
            frames_gpa: REGION_FRAMES,
            len: 2 * PAGE_SIZE,
            participants,
        };
        guest.regions.push((record, frames));
        for p in &mut guest.procs {
            p.shared_bytes = 2 * PAGE_SIZE;
        }
        guest.publish();
        guest
    }

    fn alloc(&mut self, owner: FrameOwner) -> u64 {
        let frame = self.next;
        self.next += PAGE_SIZE;
        self.set_owner(frame, owner);
        frame
    }

    fn owner_gpa(frame: u64) -> u64 {
        OWNERS + (frame - MANAGED.0) / PAGE_SIZE * 4
    }

    fn set_owner(&self, frame: u64, owner: FrameOwner) {
        self.ram.write(Self::owner_gpa(frame), &owner.encode()).unwrap();
    }

    fn pml4(&self, pid: u32) -> u64 {
        self.procs.iter().find(|p| p.pid == pid).unwrap().pml4
    }

    /// Maps `va` with the leaf entry `entry` in `pid`'s tables.
    fn map(&mut self, pid: u32, va: u64, entry: u64) {
        let mut table = self.pml4(pid);
        for level in (2..=4u32).rev() {
            let gpa = table + ((va >> (12 + 9 * (level - 1))) & 0x1ff) * 8;
            let existing = self.ram.read_u64(gpa).unwrap();
            table = if existing & PTE_PRESENT != 0 {
                existing & PTE_ADDRESS_MASK
            } else {
                let next = self.alloc(FrameOwner::PageTable(pid));
                if let Some(p) = self.procs.iter_mut().find(|p| p.pid == pid) {
                    p.table_bytes += PAGE_SIZE;
                }
                self.ram.write(gpa, &(next | TABLE)).unwrap();
                next
            };
        }
        self.ram.write(table + ((va >> 12) & 0x1ff) * 8, &entry).unwrap();
    }

    fn spawn(&mut self, pid: u32) {
        let pml4 = self.alloc(FrameOwner::PageTable(pid));
        for slot in 256..512 {
            let entry = self.ram.read_u64(self.kernel_pml4 + slot * 8).unwrap();
            self.ram.write(pml4 + slot * 8, &entry).unwrap();
        }
        self.procs.push(ProcessRecord {
            pid,
            state: PROCESS_RUNNABLE,
            pml4,
            virtual_bytes: 0x10_0000,
            resident_bytes: 3 * PAGE_SIZE,
            max_resident_bytes: 16 * PAGE_SIZE,
            table_bytes: PAGE_SIZE,
            ..Default::default()
        });
        let gate = self.gate;
        self.map(pid, GATE_VA, gate | RX);
        for (va, flags) in [(CODE, RX), (DATA, RW), (STACK, RW)] {
            let frame = self.alloc(FrameOwner::Private(pid));
            self.map(pid, va, frame | flags);
        }
    }

    /// Writes the root and the tables.
    fn publish(&self) {
        let mut root = IntrospectionRoot::new_zeroed();
        root.magic = INTROSPECTION_MAGIC;
        root.version = PROTOCOL_VERSION;
        root.kernel_pml4 = self.kernel_pml4;
        root.gate_frame = self.gate;
        root.kernel_text_gpa = TEXT;
        root.kernel_text_len = TEXT_LEN;
        root.process_table_gpa = PROCS;
        root.process_capacity = 8;
        root.process_record_size = std::mem::size_of::<ProcessRecord>() as u32;
        root.region_table_gpa = REGIONS;
        root.region_capacity = 4;
        root.region_record_size = std::mem::size_of::<RegionRecord>() as u32;
        root.owner_table_gpa = OWNERS;
        root.owner_table_entries = (MANAGED.1 - MANAGED.0) / PAGE_SIZE;
        root.frame_range_count = 1;
        root.frame_ranges[0] = FrameRange { start: MANAGED.0, end: MANAGED.1, first_index: 0 };
        self.ram.write(ROOT, &root).unwrap();
        let mut table = [ProcessRecord::default(); 8];
        table[..self.procs.len()].copy_from_slice(&self.procs);
        self.ram.write_bytes(PROCS, table.as_bytes()).unwrap();
        let mut regions = [RegionRecord::new_zeroed(); 4];
        for (i, (record, frames)) in self.regions.iter().enumerate() {
            regions[i] = *record;
            self.ram.write_bytes(record.frames_gpa, frames.as_bytes()).unwrap();
        }
        self.ram.write_bytes(REGIONS, regions.as_bytes()).unwrap();
    }

    fn facts(&self) -> Facts {
        Facts {
            usable: vec![USABLE],
            text: Some(self.text.clone()),
            text_missing: None,
            text_range: Some((TEXT, TEXT_LEN)),
            live_from_events: self.procs.iter().map(|p| (p.pid, p.pml4)).collect(),
            kernel_read_only: Some((TEXT, TEXT + TEXT_LEN)),
            text_patches: Default::default(),
        }
    }

    fn violations(&self) -> Vec<Violation> {
        let view = KernelView::read(&self.ram, ROOT).expect("a readable root");
        let processes: Vec<(u32, u64)> = view.processes.iter().map(|p| (p.pid, p.pml4)).collect();
        let walked = walk(&self.ram, view.kernel_pml4(), &processes);
        evaluate(&view, &walked, &self.ram, &self.facts(), None).0
    }

    /// What [`Guest::violations`] reports, from a check that trusts `known`
    /// (harvested first, as `Checker::check` does).
    fn violations_with(&self, known: &mut KnownZero) -> (Vec<Violation>, CheckCounters) {
        known.refresh(&self.ram);
        let view = KernelView::read(&self.ram, ROOT).expect("a readable root");
        let processes: Vec<(u32, u64)> = view.processes.iter().map(|p| (p.pid, p.pml4)).collect();
        let walked = walk(&self.ram, view.kernel_pml4(), &processes);
        evaluate_with(&view, &walked, &self.ram, &self.facts(), None, Some(known))
    }

    /// A write log that has seen one (clean) check: every free frame is
    /// known zero from here on until something writes it.
    fn known_zero(&self) -> KnownZero {
        let mut known = KnownZero::new(Box::new(RamWrites), self.ram.size() / PAGE_SIZE);
        let (violations, counters) = self.violations_with(&mut known);
        assert_eq!(violations, [], "the first check is on a clean guest");
        assert!(counters.frames_scanned > 0 && known.count() == counters.frames_scanned);
        known
    }

    /// The leaf entry GPA for `va` in `pid`'s tables.
    fn leaf(&self, pid: u32, va: u64) -> (u64, u64) {
        let (gpa, entry, _) = leaf_entry(&self.ram, self.pml4(pid), va).unwrap();
        (gpa, entry)
    }

    fn frame_at(&self, pid: u32, va: u64) -> u64 {
        self.leaf(pid, va).1 & PTE_ADDRESS_MASK
    }

    fn spare_slot(&self, pid: u32) -> u64 {
        entry_slot(&self.ram, self.pml4(pid), SPARE, 1).unwrap()
    }

    fn set(&self, gpa: u64, value: u64) {
        self.ram.write(gpa, &value).unwrap();
    }

    fn or(&self, gpa: u64, bits: u64) {
        self.set(gpa, self.ram.read_u64(gpa).unwrap() | bits);
    }

    /// The GPA of the direct map's 2 MiB leaf `index` (kernel half).
    fn direct_map_leaf(&self, index: u64) -> u64 {
        let pdpt = self.ram.read_u64(self.kernel_pml4 + 256 * 8).unwrap() & PTE_ADDRESS_MASK;
        let pd = self.ram.read_u64(pdpt).unwrap() & PTE_ADDRESS_MASK;
        pd + index * 8
    }
}

/// The guest's writes as the checker's log sees them. Here every write
/// goes through `GuestRam::write_bytes`, which marks its pages; in a VM,
/// KVM's dirty log adds the guest's own ([`superos_vmm::write_log`]).
#[derive(Debug)]
struct RamWrites;

impl WriteSource for RamWrites {
    fn harvest(&self, ram: &GuestRam, written: &mut PageBitmap) -> Result<(), String> {
        written.set_shifted(0, &ram.take_written());
        Ok(())
    }
}

/// Applies `corrupt` to a fresh clean guest and returns what is reported.
/// The incremental check (whose log saw the clean guest checked) must
/// report exactly the same, having read only the frames written since.
fn after(corrupt: impl FnOnce(&mut Guest)) -> (BTreeSet<Invariant>, Vec<Violation>) {
    let mut guest = Guest::new();
    let mut known = guest.known_zero();
    corrupt(&mut guest);
    guest.publish();
    let full = guest.violations();
    let (incremental, counters) = guest.violations_with(&mut known);
    assert_eq!(incremental, full, "the incremental check differs from the full one");
    assert!(counters.frames_known_zero > 0, "the incremental check read every free frame again");
    (full.iter().map(|v| v.invariant).collect(), full)
}

#[track_caller]
fn assert_only(what: &str, expected: Invariant, corrupt: impl FnOnce(&mut Guest)) -> Vec<Violation> {
    let (invariants, violations) = after(corrupt);
    assert_eq!(invariants, BTreeSet::from([expected]), "{what}: {violations:#?}");
    violations
}

#[test]
fn the_clean_system_keeps_every_invariant() {
    let guest = Guest::new();
    assert_eq!(guest.violations(), Vec::<Violation>::new());
    // And the walk saw what was built: the shared frames twice.
    let view = KernelView::read(&guest.ram, ROOT).unwrap();
    let walked = walk(&guest.ram, view.kernel_pml4(), &[(1, guest.pml4(1)), (2, guest.pml4(2))]);
    let shared: Vec<_> =
        walked.by_frame().filter(|group| group.len() == 2 && group[0].va == SHARED).collect();
    assert_eq!(shared.len(), 1);
    let gate: Vec<_> = walked.mappings.iter().filter(|m| m.frame == guest.gate).collect();
    assert_eq!(gate.len(), 2);
}

#[test]
fn private_address_spaces() {
    let v =
        assert_only("a page-table frame shared between processes", Invariant::PrivateAddressSpaces, |g| {
            let a_pdpt = g.ram.read_u64(g.pml4(1)).unwrap();
            g.set(g.pml4(2) + 8, a_pdpt);
        });
    assert!(v[0].details.contains("reached 2 times"), "{v:#?}");
    assert_only("two processes with one PML4", Invariant::PrivateAddressSpaces, |g| {
        g.procs[1].pml4 = g.procs[0].pml4;
        g.procs[1].resident_bytes = 0;
    });
    assert_only("a PML4 outside RAM", Invariant::PrivateAddressSpaces, |g| g.procs[1].pml4 = 1 << 40);
    assert_only("a table entry pointing outside RAM", Invariant::PrivateAddressSpaces, |g| {
        g.set(g.pml4(2) + 8 * 7, (1 << 40) | TABLE)
    });
    assert_only("a cycle", Invariant::PrivateAddressSpaces, |g| {
        g.set(g.pml4(2) + 8 * 9, g.pml4(2) | PTE_PRESENT)
    });
}

#[test]
fn no_implicit_sharing() {
    let v = assert_only("another process's private frame mapped in", Invariant::NoImplicitSharing, |g| {
        let frame = g.frame_at(1, DATA);
        g.set(g.spare_slot(2), frame | RO);
    });
    assert_eq!(v[0].pids, [1, 2]);
    assert!(v[0].vas.contains(&SPARE) && v[0].vas.contains(&DATA), "{v:#?}");
    assert_only(
        "a shared frame mapped writable without the write right",
        Invariant::NoImplicitSharing,
        |g| {
            let (gpa, _) = g.leaf(2, SHARED);
            g.or(gpa, PTE_WRITABLE);
        },
    );
    assert_only("a shared frame mapped at the wrong offset", Invariant::NoImplicitSharing, |g| {
        let (first, _) = g.leaf(2, SHARED);
        let (second, _) = g.leaf(2, SHARED + PAGE_SIZE);
        let (a, b) = (g.ram.read_u64(first).unwrap(), g.ram.read_u64(second).unwrap());
        g.set(first, b);
        g.set(second, a);
    });
    let v = assert_only("a process only offered a region mapping it", Invariant::NoImplicitSharing, |g| {
        g.regions[0].0.participants[1].state = PARTICIPANT_OFFERED;
    });
    assert!(v[0].details.contains("never accepted"), "{v:#?}");
}

#[test]
fn no_user_kernel_mapping() {
    assert_only("the kernel text mapped for a user", Invariant::NoUserKernelMapping, |g| {
        g.set(g.spare_slot(1), TEXT | RO)
    });
    assert_only("a kernel-owned frame mapped for a user", Invariant::NoUserKernelMapping, |g| {
        let frame = g.alloc(FrameOwner::Kernel);
        g.set(g.spare_slot(1), frame | RO);
    });
    assert_only("a message frame mapped for a user", Invariant::NoUserKernelMapping, |g| {
        let frame = g.alloc(FrameOwner::Message(2));
        g.set(g.spare_slot(2), frame | RO);
    });
    let v = assert_only("the gate mapped writable", Invariant::NoUserKernelMapping, |g| {
        let (gpa, _) = g.leaf(1, GATE_VA);
        g.or(gpa, PTE_WRITABLE | PTE_NO_EXECUTE);
    });
    assert!(v[0].details.contains("gate"), "{v:#?}");
    assert_only("U set on the kernel's direct map", Invariant::NoUserKernelMapping, |g| {
        let pdpt = g.ram.read_u64(g.kernel_pml4 + 256 * 8).unwrap() & PTE_ADDRESS_MASK;
        let pd = g.ram.read_u64(pdpt).unwrap() & PTE_ADDRESS_MASK;
        g.or(pd + 8, PTE_USER);
        g.or(pdpt, PTE_USER);
        for pml4 in [g.kernel_pml4, g.pml4(1), g.pml4(2)] {
            g.or(pml4 + 256 * 8, PTE_USER);
        }
    });
}

#[test]
fn no_user_page_table_mapping() {
    assert_only("a process's own page table mapped", Invariant::NoUserPageTableMapping, |g| {
        let (gpa, _) = g.leaf(1, STACK);
        g.set(g.spare_slot(1), (gpa & !0xfff) | RO);
    });
    assert_only("the kernel's PML4 mapped", Invariant::NoUserPageTableMapping, |g| {
        g.set(g.spare_slot(2), g.kernel_pml4 | RO)
    });
}

#[test]
fn w_xor_x() {
    assert_only("a code page made writable", Invariant::WXorX, |g| {
        let (gpa, _) = g.leaf(1, CODE);
        g.or(gpa, PTE_WRITABLE);
    });
    assert_only("a stack page made executable", Invariant::WXorX, |g| {
        let (gpa, entry) = g.leaf(2, STACK);
        g.set(gpa, entry & !PTE_NO_EXECUTE);
    });
    let v = assert_only("a read-only shared page made executable", Invariant::WXorX, |g| {
        let (gpa, entry) = g.leaf(2, SHARED);
        g.set(gpa, entry & !PTE_NO_EXECUTE);
    });
    assert!(v[0].details.contains("shared"), "{v:#?}");
}

#[test]
fn ownership_agrees() {
    assert_only("a private frame recorded as another live process's", Invariant::OwnershipAgrees, |g| {
        g.set_owner(g.frame_at(1, DATA), FrameOwner::Private(2))
    });
    assert_only("an undecodable owner entry", Invariant::OwnershipAgrees, |g| {
        g.ram.write(Guest::owner_gpa(g.frame_at(1, DATA)), &0xf000_0000u32).unwrap()
    });
    assert_only("a page table recorded as private", Invariant::OwnershipAgrees, |g| {
        let (gpa, _) = g.leaf(2, CODE);
        g.set_owner(gpa & !0xfff, FrameOwner::Private(2));
    });
    assert_only("a shared frame the region does not list", Invariant::OwnershipAgrees, |g| {
        g.set_owner(g.frame_at(1, DATA), FrameOwner::Shared(1))
    });
}

#[test]
fn quota_accounting() {
    let v = assert_only("a resident counter off by a page", Invariant::QuotaAccounting, |g| {
        g.procs[0].resident_bytes += PAGE_SIZE
    });
    assert_eq!(v[0].pids, [1]);
    assert!(v[0].details.contains("12288 bytes of private frames"), "{v:#?}");
    assert_only("a shared counter off", Invariant::QuotaAccounting, |g| g.procs[1].shared_bytes = 0);
    assert_only("over the resident quota", Invariant::QuotaAccounting, |g| {
        g.procs[0].max_resident_bytes = PAGE_SIZE
    });
    assert_only("over the virtual quota", Invariant::QuotaAccounting, |g| {
        g.procs[1].max_virtual_bytes = PAGE_SIZE
    });
    // Nine offers by pid 1: six in region 1, three in a second region it owns.
    let v = assert_only("more offers than a granter is charged for", Invariant::QuotaAccounting, |g| {
        let offer = |pid| ParticipantRecord {
            pid,
            rights: RIGHT_READ as u16,
            state: PARTICIPANT_OFFERED,
            mapped_at: 0,
            prot: 0,
            granted_by: 1,
        };
        for (slot, pid) in (2..8).zip(10..) {
            g.regions[0].0.participants[slot] = offer(pid);
        }
        let frame = g.alloc(FrameOwner::Shared(2));
        let mut second = g.regions[0].0;
        second.id = 2;
        second.frame_count = 1;
        second.frames_gpa = REGION_FRAMES + 0x800;
        second.len = PAGE_SIZE;
        second.participants = [ParticipantRecord::default(); REGION_PARTICIPANTS];
        second.participants[0] =
            ParticipantRecord { mapped_at: 0, prot: 0, ..g.regions[0].0.participants[0] };
        for (slot, pid) in (1..4).zip(20..) {
            second.participants[slot] = offer(pid);
        }
        g.regions.push((second, vec![frame]));
        g.procs[0].shared_bytes += PAGE_SIZE;
    });
    assert!(v.iter().any(|v| v.details.contains("9 offers outstanding")), "{v:#?}");
}

#[test]
fn revocation_complete() {
    assert_only("a free frame mapped", Invariant::RevocationComplete, |g| {
        let free = g.next + 10 * PAGE_SIZE;
        g.set(g.spare_slot(1), free | RW);
    });
    assert_only("a frame of a process that is gone", Invariant::RevocationComplete, |g| {
        let frame = g.alloc(FrameOwner::Private(9));
        g.set(g.spare_slot(1), frame | RW);
    });
    assert_only("a mapping left after revoke", Invariant::RevocationComplete, |g| {
        g.regions[0].0.participants[1] = ParticipantRecord::default();
        g.procs[1].shared_bytes = 0;
    });
    assert_only("a region destroyed under its mappings", Invariant::RevocationComplete, |g| {
        g.regions[0].0.state = REGION_FREE;
        g.procs[0].shared_bytes = 0;
        g.procs[1].shared_bytes = 0;
    });
    assert_only("a region still listing a dead participant", Invariant::RevocationComplete, |g| {
        g.regions[0].0.participants[2] = ParticipantRecord {
            pid: 7,
            rights: RIGHT_READ as u16,
            state: PARTICIPANT_HOLDS,
            mapped_at: DATA,
            prot: PROT_READ as u32,
            granted_by: 1,
        };
    });
    let v = assert_only(
        "a capability left when the one it derives from was revoked",
        Invariant::RevocationComplete,
        |g| g.regions[0].0.participants[1].granted_by = 5,
    );
    assert!(v[0].details.contains("derives from pid 5's"), "{v:#?}");
    assert_eq!(v[0].pids, [2]);
    assert_only("a derivation cycle that never reaches the owner", Invariant::RevocationComplete, |g| {
        g.regions[0].0.participants[1].granted_by = 2;
    });
    assert_only("a page table freed but still linked", Invariant::RevocationComplete, |g| {
        let (gpa, _) = g.leaf(2, CODE);
        g.set_owner(gpa & !0xfff, FrameOwner::Free);
    });
}

#[test]
fn free_frames_scrubbed() {
    let v = assert_only("a dirty free frame", Invariant::FreeFramesScrubbed, |g| {
        g.ram.write_bytes(MANAGED.1 - PAGE_SIZE + 0x123, &[1]).unwrap()
    });
    assert_eq!(v[0].frames, [MANAGED.1 - PAGE_SIZE]);
    assert!(v[0].details.contains("offset 0x123"), "{v:#?}");
}

#[test]
fn kernel_w_xor_x() {
    const DIRECT_MAP: u64 = 0xffff_8000_0000_0000;
    let v = assert_only("the kernel text writable in the direct map", Invariant::KernelWXorX, |g| {
        g.or(g.direct_map_leaf(0), PTE_WRITABLE)
    });
    assert_eq!(v.len(), 1, "one leaf, one finding: {v:#?}");
    assert_eq!((v[0].frames.as_slice(), v[0].vas.as_slice()), (&[TEXT][..], &[DIRECT_MAP][..]));
    assert!(
        v[0].details.starts_with(&format!(
            "kernel-half address {DIRECT_MAP:#x} (2 MiB leaf of frame 0x0, entry at {:#x}) maps 3 frames of the kernel's text and read-only data writable (first {TEXT:#x})",
            Guest::new().direct_map_leaf(0)
        )),
        "{v:#?}"
    );
    let v = assert_only("a kernel leaf writable and executable", Invariant::KernelWXorX, |g| {
        let leaf = g.direct_map_leaf(3);
        g.set(leaf, g.ram.read_u64(leaf).unwrap() & !PTE_NO_EXECUTE);
    });
    assert!(v[0].details.ends_with(") is writable and executable"), "{v:#?}");
    assert_eq!(v[0].vas, [DIRECT_MAP + (3 << 21)]);
    let v = assert_only("both at once", Invariant::KernelWXorX, |g| {
        g.set(g.direct_map_leaf(0), PTE_PRESENT | PTE_WRITABLE | PTE_HUGE)
    });
    assert!(v[0].details.ends_with("(first 0x140000) and is writable and executable"), "{v:#?}");
    // A supervisor-only writable alias of the text in a process's user half.
    let v = assert_only("the kernel text writable in a user half", Invariant::KernelWXorX, |g| {
        g.set(g.spare_slot(2), (TEXT + PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE | PTE_NO_EXECUTE)
    });
    assert_eq!((v[0].pids.as_slice(), v[0].vas.as_slice()), (&[2][..], &[SPARE][..]));
    assert!(v[0].details.contains("(supervisor-only)"), "{v:#?}");
    // A user-accessible writable alias belongs to no-user-kernel-mapping.
    assert_only("the kernel text writable for a user", Invariant::NoUserKernelMapping, |g| {
        g.set(g.spare_slot(1), TEXT | RW)
    });
    // Without the range from the ELF, only W+X is checked.
    let guest = Guest::new();
    guest.or(guest.direct_map_leaf(0), PTE_WRITABLE);
    let view = KernelView::read(&guest.ram, ROOT).unwrap();
    let walked = walk(&guest.ram, view.kernel_pml4(), &[(1, guest.pml4(1)), (2, guest.pml4(2))]);
    let facts = Facts { kernel_read_only: None, ..guest.facts() };
    assert_eq!(evaluate(&view, &walked, &guest.ram, &facts, None).0, Vec::<Violation>::new());
}

#[test]
fn kernel_text_unchanged() {
    let v = assert_only("patched kernel text", Invariant::KernelTextUnchanged, |g| {
        g.ram.write_bytes(TEXT + 0x1005, &[0xcc]).unwrap()
    });
    assert_eq!(v[0].frames, [TEXT + 0x1000]);
}

#[test]
fn introspection_valid() {
    assert_only("a process record with pid 0", Invariant::IntrospectionValid, |g| {
        g.procs.push(ProcessRecord { pid: 0, state: PROCESS_RUNNABLE, ..Default::default() });
    });
    assert_only("a gate frame that is a user's", Invariant::IntrospectionValid, |g| {
        g.set_owner(g.gate, FrameOwner::Private(1));
        // Both still map it read-only: with no gate exception that is also
        // sharing, so let only pid 1 keep it.
        let (gpa, _) = g.leaf(2, GATE_VA);
        g.set(gpa, 0);
        g.procs[0].resident_bytes += PAGE_SIZE;
    });
    // A process the events know but the table hides.
    let guest = Guest::new();
    let mut facts = guest.facts();
    facts.live_from_events.insert(5, guest.pml4(1));
    let view = KernelView::read(&guest.ram, ROOT).unwrap();
    let walked = walk(&guest.ram, view.kernel_pml4(), &[(1, guest.pml4(1)), (2, guest.pml4(2))]);
    let (found, _) = evaluate(&view, &walked, &guest.ram, &facts, None);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].invariant, Invariant::IntrospectionValid);
}

#[test]
fn many_violations_are_listed_up_to_a_limit_and_counted() {
    let (invariants, violations) = after(|g| {
        for i in 0..40 {
            g.ram.write_bytes(MANAGED.1 - (i + 1) * PAGE_SIZE, &[1]).unwrap();
            let (gpa, entry) = g.leaf(1, STACK);
            let _ = entry;
            g.set((gpa & !0xfff) + i * 8, (g.next + (100 + i) * PAGE_SIZE) | RW);
        }
    });
    assert!(invariants.contains(&Invariant::RevocationComplete));
    let listed = violations.iter().filter(|v| v.invariant == Invariant::RevocationComplete).count();
    assert_eq!(listed, superos_vmm::check::MAX_LISTED + 1, "{violations:#?}");
    assert!(violations.iter().any(|v| v.details.contains("more violations of revocation-complete")));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// Rounds of writes anywhere in the managed frames (tables, mapped
    /// frames, free frames; zero bytes too, so a dirty free frame can be
    /// cleaned again), each followed by a check: the incremental check and
    /// the full one report the same at every round.
    #[test]
    fn the_incremental_check_reports_what_the_full_check_reports(
        rounds in proptest::collection::vec(
            proptest::collection::vec((0..(MANAGED.1 - MANAGED.0) / PAGE_SIZE, 0..PAGE_SIZE, proptest::prelude::any::<bool>()), 0..6),
            1..6,
        ),
    ) {
        let guest = Guest::new();
        let mut known = guest.known_zero();
        for writes in rounds {
            for (frame, offset, nonzero) in writes {
                guest.ram.write_bytes(MANAGED.0 + frame * PAGE_SIZE + offset, &[u8::from(nonzero)]).unwrap();
            }
            let full = guest.violations();
            let (incremental, _) = guest.violations_with(&mut known);
            proptest::prop_assert_eq!(incremental, full);
        }
    }
}
