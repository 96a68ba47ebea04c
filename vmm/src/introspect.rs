//! The kernel's published account of itself, read from guest memory: the
//! introspection root (`superos_protocol::introspect`), its process table,
//! frame-owner table and shared-region registry.
//!
//! Nothing here is trusted: every address is checked against guest RAM,
//! every capacity and size is capped, every record is validated. A root that
//! cannot be used at all is an [`IntrospectError`]; a bad record is left out
//! and described in [`KernelView::problems`] (the checker reports both as
//! `introspection-valid`). Reading never panics on guest data.
//!
//! Until the kernel publishes a root (`BootHelloParams::introspection_root_gpa`
//! is 0), [`KernelView::from_events`] builds the part of the view the VMM can
//! know without it: the live processes and their PML4s, from the spawn and
//! exit events.

use crate::memory::GuestRam;
use std::collections::{BTreeMap, BTreeSet};
use superos_protocol::introspect::{
    FrameRange, IntrospectionRoot, ParticipantRecord, ProcessRecord, RegionRecord, INTROSPECTION_MAGIC,
    MAX_FRAME_RANGES, PROCESS_FREE, PROCESS_RECEIVING, PROCESS_RUNNABLE, REGION_FREE, REGION_LIVE,
};
use superos_protocol::layout::PAGE_SIZE;
use superos_protocol::ownership::FrameOwner;
use superos_protocol::syscall::SHM_MAX;
use superos_protocol::{name_from_array, PROTOCOL_VERSION};
use thiserror::Error;
use zerocopy::{FromBytes, IntoBytes};

/// Most process-table slots the VMM reads.
pub const MAX_PROCESS_CAPACITY: u32 = 4096;
/// Most region-table slots the VMM reads.
pub const MAX_REGION_CAPACITY: u32 = 4096;
/// Most frames one region may have (the largest region the ABI allows).
pub const MAX_REGION_FRAMES: u32 = (SHM_MAX / PAGE_SIZE) as u32;
/// Most problems recorded per view; the rest are counted.
pub const MAX_PROBLEMS: usize = 32;

/// Why the introspection root cannot be used at all.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum IntrospectError {
    /// A table or the root itself lies (partly) outside guest RAM.
    #[error("the {what} at {gpa:#x} ({len} bytes) is not inside guest memory")]
    OutOfRam {
        /// Which structure.
        what: &'static str,
        /// Where the kernel says it is.
        gpa: u64,
        /// Its size.
        len: u64,
    },
    /// The root's magic is wrong.
    #[error("the introspection root at {gpa:#x} has magic {magic:#x}, not {INTROSPECTION_MAGIC:#x}")]
    BadMagic {
        /// Root address.
        gpa: u64,
        /// Magic found.
        magic: u32,
    },
    /// The root speaks another protocol version.
    #[error("the introspection root has protocol version {0}, the VMM speaks {PROTOCOL_VERSION}")]
    BadVersion(u32),
    /// A record size differs from the protocol's.
    #[error("{what} records are {found} bytes, the protocol says {expected}")]
    BadRecordSize {
        /// Which table.
        what: &'static str,
        /// Size the kernel announced.
        found: u32,
        /// `size_of` the record.
        expected: u32,
    },
    /// A count exceeds what the VMM accepts.
    #[error("{what} is {value}, more than the {limit} the VMM accepts")]
    TooLarge {
        /// Which count.
        what: &'static str,
        /// Value found.
        value: u64,
        /// The cap.
        limit: u64,
    },
    /// The managed frame ranges are malformed.
    #[error(
        "managed frame range #{index} ({start:#x}..{end:#x}, owner index {first_index}) is invalid: {why}"
    )]
    BadRange {
        /// Position in `frame_ranges`.
        index: usize,
        /// Its start.
        start: u64,
        /// Its end.
        end: u64,
        /// Its first owner-table index.
        first_index: u64,
        /// What is wrong.
        why: &'static str,
    },
}

/// What the owner table says about a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerLookup {
    /// The frame is not in any managed range (kernel image, boot data,
    /// program images, the kernel's own tables, or beyond RAM): kernel-owned.
    Unmanaged,
    /// The recorded owner.
    Owner(FrameOwner),
    /// The entry does not decode.
    Corrupt(u32),
    /// The view has no owner table (no root published).
    Unknown,
}

/// One live process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Its pid.
    pub pid: u32,
    /// GPA of its PML4 (a claim: the walker checks it).
    pub pml4: u64,
    /// Its name ("?" if unknown).
    pub name: String,
    /// The kernel's record (`None` in a view built from events).
    pub record: Option<ProcessRecord>,
}

/// One live shared region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// Region id (`MEM_SHARE:<id>`).
    pub id: u32,
    /// The owner's pid.
    pub owner: u32,
    /// Length in bytes.
    pub len: u64,
    /// Its frames, in order (`frames[i]` backs byte `i * 4096`).
    pub frames: Vec<u64>,
    /// Participants (empty slots left out).
    pub participants: Vec<ParticipantRecord>,
}

impl RegionInfo {
    /// The participant record of `pid`, if it has one.
    pub fn participant(&self, pid: u32) -> Option<&ParticipantRecord> {
        self.participants.iter().find(|p| p.pid == pid)
    }
}

/// Where a [`KernelView`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViewSource {
    /// The kernel's introspection root.
    Published {
        /// Its GPA.
        root_gpa: u64,
        /// Its generation counter.
        generation: u64,
    },
    /// No usable root: live processes from the spawn/exit events only.
    Events,
}

/// A snapshot of what the kernel claims: processes, frame owners, shared
/// regions. Built while the vCPU is stopped, so it is consistent with the
/// page tables the walker reads next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelView {
    /// Where it came from.
    pub source: ViewSource,
    /// The root as read (validated), if published.
    pub root: Option<IntrospectionRoot>,
    /// Live processes, by pid.
    pub processes: Vec<ProcessInfo>,
    /// Live shared regions, by id.
    pub regions: Vec<RegionInfo>,
    /// Managed frame ranges, sorted by start.
    pub ranges: Vec<FrameRange>,
    /// The raw owner table (`FrameOwner::encode` values).
    pub owners: Vec<u32>,
    /// Records that were left out or look wrong, for `introspection-valid`.
    pub problems: Vec<String>,
    /// Problems beyond [`MAX_PROBLEMS`], counted only.
    pub problems_dropped: usize,
}

impl KernelView {
    /// A view without a root: `live` maps pid -> PML4, from the events.
    pub fn from_events(live: &BTreeMap<u32, u64>) -> KernelView {
        KernelView {
            source: ViewSource::Events,
            root: None,
            processes: live
                .iter()
                .map(|(&pid, &pml4)| ProcessInfo { pid, pml4, name: "?".into(), record: None })
                .collect(),
            regions: Vec::new(),
            ranges: Vec::new(),
            owners: Vec::new(),
            problems: Vec::new(),
            problems_dropped: 0,
        }
    }

    /// Reads and validates the root at `root_gpa` and every table it points
    /// to. Bad records are left out and described in `problems`.
    pub fn read(ram: &GuestRam, root_gpa: u64) -> Result<KernelView, IntrospectError> {
        let root: IntrospectionRoot = read_checked(ram, "introspection root", root_gpa)?;
        if root.magic != INTROSPECTION_MAGIC {
            return Err(IntrospectError::BadMagic { gpa: root_gpa, magic: root.magic });
        }
        if root.version != PROTOCOL_VERSION {
            return Err(IntrospectError::BadVersion(root.version));
        }
        let mut view = KernelView {
            source: ViewSource::Published { root_gpa, generation: root.generation },
            root: Some(root),
            processes: Vec::new(),
            regions: Vec::new(),
            ranges: Vec::new(),
            owners: Vec::new(),
            problems: Vec::new(),
            problems_dropped: 0,
        };
        view.ranges = validate_ranges(ram, &root)?;
        view.owners = read_owner_table(ram, &root)?;
        view.read_processes(ram, &root)?;
        view.read_regions(ram, &root)?;
        Ok(view)
    }

    fn problem(&mut self, text: String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(text);
        } else {
            self.problems_dropped += 1;
        }
    }

    fn read_processes(&mut self, ram: &GuestRam, root: &IntrospectionRoot) -> Result<(), IntrospectError> {
        let bytes = read_table::<ProcessRecord>(
            ram,
            "process table",
            root.process_table_gpa,
            root.process_capacity,
            root.process_record_size,
            MAX_PROCESS_CAPACITY,
        )?;
        let mut seen = BTreeSet::new();
        for (slot, chunk) in bytes.chunks_exact(std::mem::size_of::<ProcessRecord>()).enumerate() {
            let Ok(record) = ProcessRecord::read_from_bytes(chunk) else { continue };
            if record.state == PROCESS_FREE {
                continue;
            }
            let name = name_from_array(&record.name).to_string();
            if record.state != PROCESS_RUNNABLE && record.state != PROCESS_RECEIVING {
                self.problem(format!(
                    "process slot {slot} (pid {}) has unknown state {}; treated as live",
                    record.pid, record.state
                ));
            }
            if record.pid == 0 {
                self.problem(format!("process slot {slot} is live but has pid 0; left out"));
                continue;
            }
            if !seen.insert(record.pid) {
                self.problem(format!(
                    "pid {} appears twice in the process table; slot {slot} left out",
                    record.pid
                ));
                continue;
            }
            self.processes.push(ProcessInfo {
                pid: record.pid,
                pml4: record.pml4,
                name,
                record: Some(record),
            });
        }
        self.processes.sort_by_key(|p| p.pid);
        Ok(())
    }

    fn read_regions(&mut self, ram: &GuestRam, root: &IntrospectionRoot) -> Result<(), IntrospectError> {
        let bytes = read_table::<RegionRecord>(
            ram,
            "region table",
            root.region_table_gpa,
            root.region_capacity,
            root.region_record_size,
            MAX_REGION_CAPACITY,
        )?;
        let mut seen = BTreeSet::new();
        for (slot, chunk) in bytes.chunks_exact(std::mem::size_of::<RegionRecord>()).enumerate() {
            let Ok(record) = RegionRecord::read_from_bytes(chunk) else { continue };
            if record.state == REGION_FREE {
                continue;
            }
            if record.state != REGION_LIVE {
                self.problem(format!(
                    "region slot {slot} (id {}) has unknown state {}; left out",
                    record.id, record.state
                ));
                continue;
            }
            if record.id == 0 || !seen.insert(record.id) {
                self.problem(format!("region slot {slot} has id {} (zero or repeated); left out", record.id));
                continue;
            }
            match read_region(ram, &record) {
                Ok(region) => self.regions.push(region),
                Err(why) => self.problem(format!("region {} (slot {slot}): {why}; left out", record.id)),
            }
        }
        self.regions.sort_by_key(|r| r.id);
        Ok(())
    }

    /// The live process `pid`.
    pub fn process(&self, pid: u32) -> Option<&ProcessInfo> {
        self.processes.binary_search_by_key(&pid, |p| p.pid).ok().map(|i| &self.processes[i])
    }

    /// True if `pid` is a live process.
    pub fn is_live(&self, pid: u32) -> bool {
        self.process(pid).is_some()
    }

    /// The live region `id`.
    pub fn region(&self, id: u32) -> Option<&RegionInfo> {
        self.regions.binary_search_by_key(&id, |r| r.id).ok().map(|i| &self.regions[i])
    }

    /// True if the view has the kernel's tables (a root was published and
    /// read).
    pub fn published(&self) -> bool {
        self.root.is_some()
    }

    /// The gate frame the kernel announced.
    pub fn gate_frame(&self) -> Option<u64> {
        self.root.map(|r| r.gate_frame)
    }

    /// The kernel's own PML4, as announced.
    pub fn kernel_pml4(&self) -> Option<u64> {
        self.root.map(|r| r.kernel_pml4)
    }

    /// Owner-table index of `frame`, if it is managed.
    pub fn owner_index(&self, frame: u64) -> Option<usize> {
        let i = self.ranges.partition_point(|r| r.start <= frame).checked_sub(1)?;
        let range = &self.ranges[i];
        (frame < range.end).then(|| (range.first_index + (frame - range.start) / PAGE_SIZE) as usize)
    }

    /// What the owner table says about the 4 KiB frame at `frame`.
    pub fn owner(&self, frame: u64) -> OwnerLookup {
        if self.root.is_none() {
            return OwnerLookup::Unknown;
        }
        match self.owner_index(frame).and_then(|i| self.owners.get(i)) {
            None => OwnerLookup::Unmanaged,
            Some(&raw) => match FrameOwner::decode(raw) {
                Some(owner) => OwnerLookup::Owner(owner),
                None => OwnerLookup::Corrupt(raw),
            },
        }
    }

    /// Every managed frame with its raw owner entry, in address order.
    pub fn managed_frames(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.ranges.iter().flat_map(move |range| {
            let count = (range.end - range.start) / PAGE_SIZE;
            (0..count).filter_map(move |i| {
                let raw = *self.owners.get((range.first_index + i) as usize)?;
                Some((range.start + i * PAGE_SIZE, raw))
            })
        })
    }
}

/// Reads a plain value, mapping an out-of-RAM address to an error.
fn read_checked<T: FromBytes>(ram: &GuestRam, what: &'static str, gpa: u64) -> Result<T, IntrospectError> {
    ram.read::<T>(gpa).map_err(|_| IntrospectError::OutOfRam {
        what,
        gpa,
        len: std::mem::size_of::<T>() as u64,
    })
}

/// Reads `capacity` records of `record_size` bytes at `gpa`, after checking
/// the size is `T`'s and the capacity is within `limit`.
fn read_table<T>(
    ram: &GuestRam,
    what: &'static str,
    gpa: u64,
    capacity: u32,
    record_size: u32,
    limit: u32,
) -> Result<Vec<u8>, IntrospectError> {
    let expected = std::mem::size_of::<T>() as u32;
    if record_size != expected {
        return Err(IntrospectError::BadRecordSize { what, found: record_size, expected });
    }
    if capacity > limit {
        return Err(IntrospectError::TooLarge {
            what: if what == "process table" { "process_capacity" } else { "region_capacity" },
            value: u64::from(capacity),
            limit: u64::from(limit),
        });
    }
    let len = u64::from(capacity) * u64::from(expected);
    let mut bytes = vec![0u8; len as usize];
    ram.read_bytes(gpa, &mut bytes).map_err(|_| IntrospectError::OutOfRam { what, gpa, len })?;
    Ok(bytes)
}

/// Checks the managed frame ranges: aligned, non-empty, inside RAM, disjoint
/// in address and in owner-table index, within the owner table. Returns them
/// sorted by start.
fn validate_ranges(ram: &GuestRam, root: &IntrospectionRoot) -> Result<Vec<FrameRange>, IntrospectError> {
    let count = root.frame_range_count as usize;
    if count > MAX_FRAME_RANGES {
        return Err(IntrospectError::TooLarge {
            what: "frame_range_count",
            value: count as u64,
            limit: MAX_FRAME_RANGES as u64,
        });
    }
    let ram_frames = ram.size() / PAGE_SIZE;
    if root.owner_table_entries > ram_frames {
        return Err(IntrospectError::TooLarge {
            what: "owner_table_entries",
            value: root.owner_table_entries,
            limit: ram_frames,
        });
    }
    let mut ranges: Vec<(usize, FrameRange)> =
        root.frame_ranges[..count].iter().copied().enumerate().collect();
    for &(index, r) in &ranges {
        let bad = |why| IntrospectError::BadRange {
            index,
            start: r.start,
            end: r.end,
            first_index: r.first_index,
            why,
        };
        if r.start % PAGE_SIZE != 0 || r.end % PAGE_SIZE != 0 {
            return Err(bad("not page-aligned"));
        }
        if r.start >= r.end {
            return Err(bad("empty or reversed"));
        }
        if r.end > ram.size() {
            return Err(bad("extends beyond guest memory"));
        }
        let frames = (r.end - r.start) / PAGE_SIZE;
        if r.first_index.checked_add(frames).is_none_or(|end| end > root.owner_table_entries) {
            return Err(bad("its owner entries run past the owner table"));
        }
    }
    ranges.sort_by_key(|(_, r)| r.start);
    for pair in ranges.windows(2) {
        let ((_, a), (index, b)) = (pair[0], pair[1]);
        if b.start < a.end {
            return Err(IntrospectError::BadRange {
                index,
                start: b.start,
                end: b.end,
                first_index: b.first_index,
                why: "overlaps another range",
            });
        }
    }
    let mut by_index: Vec<(usize, FrameRange)> = ranges.clone();
    by_index.sort_by_key(|(_, r)| r.first_index);
    for pair in by_index.windows(2) {
        let ((_, a), (index, b)) = (pair[0], pair[1]);
        if b.first_index < a.first_index + (a.end - a.start) / PAGE_SIZE {
            return Err(IntrospectError::BadRange {
                index,
                start: b.start,
                end: b.end,
                first_index: b.first_index,
                why: "shares owner-table entries with another range",
            });
        }
    }
    Ok(ranges.into_iter().map(|(_, r)| r).collect())
}

fn read_owner_table(ram: &GuestRam, root: &IntrospectionRoot) -> Result<Vec<u32>, IntrospectError> {
    // Bounded by validate_ranges: at most one entry per frame of RAM.
    let mut owners = vec![0u32; root.owner_table_entries as usize];
    let len = root.owner_table_entries * 4;
    ram.read_bytes(root.owner_table_gpa, owners.as_mut_bytes()).map_err(|_| IntrospectError::OutOfRam {
        what: "owner table",
        gpa: root.owner_table_gpa,
        len,
    })?;
    // The table is little-endian u32s; so is the host.
    Ok(owners)
}

fn read_region(ram: &GuestRam, record: &RegionRecord) -> Result<RegionInfo, String> {
    if record.frame_count > MAX_REGION_FRAMES {
        return Err(format!(
            "{} frames, more than the {MAX_REGION_FRAMES} a region may have",
            record.frame_count
        ));
    }
    if record.len.div_ceil(PAGE_SIZE) != u64::from(record.frame_count) || record.len == 0 {
        return Err(format!("length {:#x} does not match its {} frames", record.len, record.frame_count));
    }
    let mut frames = vec![0u64; record.frame_count as usize];
    ram.read_bytes(record.frames_gpa, frames.as_mut_bytes())
        .map_err(|_| format!("frame list at {:#x} is not inside guest memory", record.frames_gpa))?;
    if let Some(bad) = frames.iter().find(|&&f| f % PAGE_SIZE != 0 || !ram.contains(f, PAGE_SIZE)) {
        return Err(format!("lists {bad:#x}, which is not a frame of guest memory"));
    }
    let mut participants: Vec<ParticipantRecord> =
        record.participants.iter().copied().filter(|p| p.pid != 0).collect();
    participants.sort_by_key(|p| p.pid);
    if participants.windows(2).any(|w| w[0].pid == w[1].pid) {
        return Err("lists a participant twice".to_string());
    }
    Ok(RegionInfo { id: record.id, owner: record.owner, len: record.len, frames, participants })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use superos_protocol::introspect::{PROCESS_RUNNABLE, REGION_PARTICIPANTS};
    use zerocopy::FromZeros;

    /// A root at 0x2000 with tables behind it, in a fresh 16 MiB RAM.
    pub(crate) const ROOT: u64 = 0x2000;
    pub(crate) const PROCS: u64 = 0x3000;
    const REGIONS: u64 = 0x5000;
    const OWNERS: u64 = 0x8000;
    const FRAMES: u64 = 0x7000;

    pub(crate) fn sample_root(ram: &GuestRam) -> IntrospectionRoot {
        let mut root = IntrospectionRoot::new_zeroed();
        root.magic = INTROSPECTION_MAGIC;
        root.version = PROTOCOL_VERSION;
        root.process_table_gpa = PROCS;
        root.process_capacity = 8;
        root.process_record_size = std::mem::size_of::<ProcessRecord>() as u32;
        root.region_table_gpa = REGIONS;
        root.region_capacity = 4;
        root.region_record_size = std::mem::size_of::<RegionRecord>() as u32;
        root.owner_table_gpa = OWNERS;
        root.owner_table_entries = 1024;
        root.frame_range_count = 1;
        root.frame_ranges[0] = FrameRange { start: 0x40_0000, end: 0x80_0000, first_index: 0 };
        let _ = ram;
        root
    }

    fn write_root(ram: &GuestRam, root: &IntrospectionRoot) {
        ram.write(ROOT, root).unwrap();
    }

    #[test]
    fn a_well_formed_root_is_read() {
        let ram = GuestRam::new(16).unwrap();
        let root = sample_root(&ram);
        write_root(&ram, &root);
        let mut p = ProcessRecord { pid: 3, state: PROCESS_RUNNABLE, pml4: 0x40_0000, ..Default::default() };
        p.name[..2].copy_from_slice(b"p3");
        ram.write(PROCS + 2 * std::mem::size_of::<ProcessRecord>() as u64, &p).unwrap();
        ram.write(OWNERS + 4 * 5, &FrameOwner::Private(3).encode()).unwrap();
        ram.write(OWNERS + 4 * 6, &0xf000_0000u32).unwrap();
        let mut region = RegionRecord {
            id: 9,
            state: REGION_LIVE,
            owner: 3,
            frame_count: 2,
            frames_gpa: FRAMES,
            len: 0x2000,
            participants: [ParticipantRecord::default(); REGION_PARTICIPANTS],
        };
        region.participants[3] = ParticipantRecord {
            pid: 3,
            rights: 3,
            state: 0,
            mapped_at: 0x1_0000_0000,
            prot: 3,
            granted_by: 1,
        };
        ram.write(REGIONS + 224, &region).unwrap();
        ram.write(FRAMES, &[0x40_1000u64, 0x40_2000u64]).unwrap();

        let view = KernelView::read(&ram, ROOT).unwrap();
        assert!(view.problems.is_empty(), "{:?}", view.problems);
        assert_eq!(view.processes.len(), 1);
        assert_eq!(view.process(3).unwrap().name, "p3");
        assert_eq!(view.owner(0x40_5000), OwnerLookup::Owner(FrameOwner::Private(3)));
        assert_eq!(view.owner(0x40_6000), OwnerLookup::Corrupt(0xf000_0000));
        assert_eq!(view.owner(0x40_7000), OwnerLookup::Owner(FrameOwner::Free));
        assert_eq!(view.owner(0x3f_f000), OwnerLookup::Unmanaged);
        assert_eq!(view.owner(0x80_0000), OwnerLookup::Unmanaged);
        let region = view.region(9).unwrap();
        assert_eq!(region.frames, vec![0x40_1000, 0x40_2000]);
        assert_eq!(region.participant(3).unwrap().mapped_at, 0x1_0000_0000);
        assert_eq!(view.managed_frames().count(), 1024);
    }

    #[test]
    fn hostile_roots_are_errors_not_panics() {
        let ram = GuestRam::new(16).unwrap();
        let good = sample_root(&ram);
        type Corruption = Box<dyn Fn(&mut IntrospectionRoot)>;
        let cases: Vec<(Corruption, &str)> = vec![
            (Box::new(|r| r.magic = 0), "magic"),
            (Box::new(|r| r.version = 77), "version 77"),
            (Box::new(|r| r.process_capacity = u32::MAX), "process_capacity"),
            (Box::new(|r| r.region_record_size = 1), "region table records are 1 bytes"),
            (Box::new(|r| r.process_table_gpa = u64::MAX - 10), "not inside guest memory"),
            (Box::new(|r| r.owner_table_entries = u64::MAX), "owner_table_entries"),
            (Box::new(|r| r.frame_range_count = 1000), "frame_range_count"),
            (Box::new(|r| r.frame_ranges[0].end = !0xfff), "beyond guest memory"),
            (Box::new(|r| r.frame_ranges[0].start = 0x40_0800), "not page-aligned"),
            (Box::new(|r| r.frame_ranges[0].first_index = u64::MAX - 2), "past the owner table"),
            (Box::new(|r| r.owner_table_gpa = (16 << 20) - 8), "owner table"),
            (
                Box::new(|r| {
                    r.frame_range_count = 2;
                    r.frame_ranges[1] = FrameRange { start: 0x50_0000, end: 0x90_0000, first_index: 2000 };
                    r.owner_table_entries = 4000;
                }),
                "overlaps",
            ),
            (
                Box::new(|r| {
                    r.frame_range_count = 2;
                    r.frame_ranges[1] = FrameRange { start: 0x90_0000, end: 0xa0_0000, first_index: 10 };
                }),
                "shares owner-table entries",
            ),
        ];
        for (corrupt, expected) in cases {
            let mut root = good;
            corrupt(&mut root);
            write_root(&ram, &root);
            let error = KernelView::read(&ram, ROOT).unwrap_err().to_string();
            assert!(error.contains(expected), "{error:?} should mention {expected:?}");
        }
        assert!(KernelView::read(&ram, u64::MAX).is_err());
        assert!(KernelView::read(&ram, ram.size() - 8).is_err());
    }

    #[test]
    fn bad_records_are_left_out_and_described() {
        let ram = GuestRam::new(16).unwrap();
        write_root(&ram, &sample_root(&ram));
        let live = |pid, state| ProcessRecord { pid, state, pml4: 0x40_0000, ..Default::default() };
        ram.write(PROCS, &live(0, PROCESS_RUNNABLE)).unwrap();
        let record = std::mem::size_of::<ProcessRecord>() as u64;
        ram.write(PROCS + record, &live(4, PROCESS_RUNNABLE)).unwrap();
        ram.write(PROCS + 2 * record, &live(4, PROCESS_RECEIVING)).unwrap();
        ram.write(PROCS + 3 * record, &live(5, 99)).unwrap();
        let region = |id, frame_count, frames_gpa, len| RegionRecord {
            id,
            state: REGION_LIVE,
            owner: 4,
            frame_count,
            frames_gpa,
            len,
            participants: [ParticipantRecord::default(); REGION_PARTICIPANTS],
        };
        ram.write(REGIONS, &region(1, u32::MAX, FRAMES, 0x1000)).unwrap();
        ram.write(REGIONS + 224, &region(2, 1, u64::MAX, 0x1000)).unwrap();
        ram.write(REGIONS + 448, &region(3, 2, FRAMES, 0x1000)).unwrap();
        ram.write(FRAMES + 0x800, &0x1234u64).unwrap();
        ram.write(REGIONS + 672, &region(4, 1, FRAMES + 0x800, 0x1000)).unwrap();
        let view = KernelView::read(&ram, ROOT).unwrap();
        assert_eq!(view.processes.iter().map(|p| p.pid).collect::<Vec<_>>(), [4, 5]);
        assert!(view.regions.is_empty());
        let all = view.problems.join("\n");
        for expected in
            ["pid 0", "pid 4 appears twice", "unknown state 99", "region 1", "region 2", "region 3", "0x1234"]
        {
            assert!(all.contains(expected), "{all}\nshould mention {expected:?}");
        }
    }

    #[test]
    fn a_view_from_events_has_processes_only() {
        let live = BTreeMap::from([(2, 0x10_000), (1, 0x20_000)]);
        let view = KernelView::from_events(&live);
        assert_eq!(view.processes.iter().map(|p| p.pid).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(view.owner(0x1000), OwnerLookup::Unknown);
        assert!(!view.published());
    }
}
