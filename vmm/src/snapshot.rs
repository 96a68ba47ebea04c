//! Snapshot files: guest memory plus what is needed to interpret it, written
//! by `superos-vmm run --snapshot-on-exit <file>` when the guest stops and
//! read by `superos-vmm inspect --snapshot <file> <command>`, which answers
//! the same queries as the live control socket.
//!
//! # Format, version 4
//!
//! All integers are little-endian. A fixed 64-byte header:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `SOSSNAP\0` |
//! | 8 | 4 | format version, 4 (1 to 3 are read too) |
//! | 12 | 4 | header size, 64 |
//! | 16 | 8 | guest RAM size in bytes (a multiple of 2 MiB, 16 MiB to 3 GiB) |
//! | 24 | 8 | metadata length `M` (at most 1 MiB) |
//! | 32 | 8 | kernel text baseline length `T` (at most 64 MiB) |
//! | 40 | 4 | event count `E` (at most 2^22) |
//! | 44 | 4 | event record size, 64 (`superos_protocol::event::EventRecord`) |
//! | 48 | 8 | stored page count `P` |
//! | 56 | 8 | FNV-1a (64-bit) of every byte after the header |
//!
//! followed by, in order and with nothing in between or after:
//!
//! 1. metadata, `M` bytes of UTF-8 JSON: `vmm_version`, `created_unix`,
//!    `scenario`, `lost_events`, `point` (where the guest stopped, as in
//!    [`Point`]), `hello` (the kernel's boot hello: `version`,
//!    `event_ring_gpa`, `event_ring_bytes`, `kernel_text_gpa`,
//!    `kernel_text_len`, `introspection_root_gpa`; `null` if none arrived),
//!    `usable` (the `[start, end)` RAM ranges the VMM gave the kernel),
//!    `baseline_gpa` (where the baseline below was copied from), and since
//!    version 2 `kernel_read_only` (the `[start, end)` physical range of
//!    the kernel's text and read-only data, from the kernel ELF the VMM
//!    loaded, or `null`; absent in version 1, read as `null`), and since
//!    version 3 what `cpu-state-intact` needs: `kernel_symbols` (the kernel
//!    symbols the CPU design names, name to address, from the ELF),
//!    `cpu_features` (what the vCPU's CPUID says: `smep`, `smap`, `umip`,
//!    `fsgsbase`, `xsave`, `xcr0_supported`) and, in version 3 only, `cpu`
//!    (the bootstrap vCPU's state the run ended with, `at` where it was read
//!    and `state` the registers, as [`crate::cpu::CpuState`]; `null` if the
//!    guest did not stop at a consistent point and no check read one
//!    before); since version 4 `cpus`, every vCPU's such state (each with
//!    its number `cpu`, in order from 0; empty for none). A snapshot without
//!    them (older versions included) says the CPU state was not checked;
//! 2. the kernel text as it was at the boot hello, `T` bytes (what
//!    `kernel-text-unchanged` compares with);
//! 3. the kernel events received, `E` raw event records (`seq`, `tick` and
//!    `cpu` filled in; `cpu` is read only where the kernel said it brought
//!    several CPUs online);
//! 4. a page bitmap, one bit per 4 KiB page of RAM (bit `i % 8` of byte
//!    `i / 8` set: page `i` is stored); pages not stored are all zero;
//! 5. the stored pages, 4096 bytes each, in address order (`P` of them,
//!    the number of bits set).
//!
//! The boot info block and everything the kernel publishes (introspection
//! root, process, owner and region tables, the event ring) are in guest
//! memory. A snapshot of a guest that crashed or was stopped by the
//! watchdog may catch the kernel half-way through an update; one taken
//! after a clean shutdown, or when `inspect quit` stopped a paused guest,
//! is consistent.
//!
//! Reading treats the file as untrusted: sizes are checked against the
//! header and the file length (with overflow checks) before anything is
//! allocated, the checksum before anything is decoded, and every field
//! after that; every problem is a [`SnapshotError`], never a panic.

use crate::check::{TextBaseline, MAX_KERNEL_TEXT};
use crate::inspect::{MachineState, Point};
use crate::memory::GuestRam;
use crate::session::EventEntry;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;
use superos_protocol::event::EventRecord;
use superos_protocol::hypercall::BootHelloParams;
use superos_protocol::layout::{MAX_GUEST_MEMORY, MIN_GUEST_MEMORY, PAGE_SIZE};
use thiserror::Error;
use zerocopy::{FromBytes, IntoBytes};

/// The first 8 bytes of every snapshot.
pub const MAGIC: [u8; 8] = *b"SOSSNAP\0";
/// The format version this VMM writes.
pub const VERSION: u32 = 4;
/// The oldest format version this VMM reads (each later version only adds
/// metadata fields, which older files lack).
pub const OLDEST_VERSION: u32 = 1;
/// Header size in bytes.
pub const HEADER_SIZE: usize = 64;
/// Longest metadata.
pub const MAX_META: u64 = 1 << 20;
/// Most events.
pub const MAX_EVENTS: u64 = 1 << 22;
const RECORD_SIZE: usize = std::mem::size_of::<EventRecord>();

/// Why a snapshot cannot be read.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// The file could not be read.
    #[error("cannot read the snapshot {path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// Not a snapshot at all.
    #[error("not a SuperOS snapshot: {0}")]
    NotASnapshot(String),
    /// A snapshot of another format version.
    #[error("snapshot format version {0} is not supported (this VMM reads versions {OLDEST_VERSION} to {VERSION})")]
    Version(u32),
    /// A snapshot, but damaged or inconsistent.
    #[error("corrupt snapshot: {0}")]
    Corrupt(String),
}

fn corrupt(why: impl Into<String>) -> SnapshotError {
    SnapshotError::Corrupt(why.into())
}

/// What the snapshot says about where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The VMM version that wrote it.
    pub vmm_version: String,
    /// When (seconds since the Unix epoch).
    pub created_unix: u64,
    /// The scenario that ran.
    pub scenario: String,
    /// Events the kernel reported lost.
    pub lost_events: u64,
}

impl Meta {
    /// Metadata for a snapshot of `scenario` written now.
    pub fn new(scenario: &str, lost_events: u64) -> Meta {
        Meta {
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            scenario: scenario.to_string(),
            lost_events,
        }
    }
}

/// The boot hello as the metadata stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Hello {
    version: u32,
    event_ring_gpa: u64,
    event_ring_bytes: u64,
    kernel_text_gpa: u64,
    kernel_text_len: u64,
    introspection_root_gpa: u64,
}

/// The metadata section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMeta {
    vmm_version: String,
    created_unix: u64,
    scenario: String,
    lost_events: u64,
    point: Point,
    hello: Option<Hello>,
    usable: Vec<[u64; 2]>,
    baseline_gpa: Option<u64>,
    /// Version 2.
    #[serde(default)]
    kernel_read_only: Option<[u64; 2]>,
    /// Version 3.
    #[serde(default)]
    kernel_symbols: std::collections::BTreeMap<String, u64>,
    /// Version 3.
    #[serde(default)]
    cpu_features: Option<crate::cpu::CpuFeatures>,
    /// Version 3 only (vCPU 0's state; version 4 has `cpus`).
    #[serde(default, skip_serializing)]
    cpu: Option<crate::cpu::CpuCapture>,
    /// Version 4: every vCPU's state, in vCPU order.
    #[serde(default)]
    cpus: Vec<crate::cpu::CpuCapture>,
}

/// Most kernel symbols, MSRs or error lines a snapshot may carry.
const MAX_CPU_ITEMS: usize = 64;

/// FNV-1a, 64-bit, fed piece by piece.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// Writes a snapshot of `ram` and `state` into `file` (which should be
/// empty: it is written from the start and truncated to the snapshot).
pub fn write(mut file: File, ram: &GuestRam, state: &MachineState, meta: &Meta) -> std::io::Result<()> {
    let io = |e: crate::memory::MemoryError| std::io::Error::other(e.to_string());
    let pages = ram.size() / PAGE_SIZE;
    let mut bitmap = vec![0u8; (pages / 8) as usize];
    let mut stored = 0u64;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    // A page as the guest had it without the debugger: its `int3`s in the
    // kernel text (`MachineState::text_patches`) are not the guest's.
    let read = |i: u64, page: &mut [u8]| -> std::io::Result<()> {
        ram.read_bytes(i * PAGE_SIZE, page).map_err(io)?;
        for (&gpa, &original) in state.text_patches.range(i * PAGE_SIZE..(i + 1) * PAGE_SIZE) {
            let byte = &mut page[(gpa - i * PAGE_SIZE) as usize];
            if *byte == crate::debug_trap::INT3 {
                *byte = original;
            }
        }
        Ok(())
    };
    for i in 0..pages {
        read(i, &mut page)?;
        if page != ZERO_PAGE {
            bitmap[(i / 8) as usize] |= 1 << (i % 8);
            stored += 1;
        }
    }
    let file_meta = FileMeta {
        vmm_version: meta.vmm_version.clone(),
        created_unix: meta.created_unix,
        scenario: meta.scenario.clone(),
        lost_events: meta.lost_events,
        point: state.point.clone(),
        hello: state.hello.map(|h| Hello {
            version: h.version,
            event_ring_gpa: h.event_ring_gpa,
            event_ring_bytes: h.event_ring_bytes,
            kernel_text_gpa: h.kernel_text_gpa,
            kernel_text_len: h.kernel_text_len,
            introspection_root_gpa: h.introspection_root_gpa,
        }),
        usable: state.usable.iter().map(|&(start, end)| [start, end]).collect(),
        baseline_gpa: state.baseline.as_ref().map(|b| b.gpa),
        kernel_read_only: state.image.read_only.map(|(start, end)| [start, end]),
        kernel_symbols: state.image.symbols.clone(),
        cpu_features: state.image.features,
        cpu: None,
        cpus: state.cpus.clone(),
    };
    let meta_bytes = serde_json::to_vec(&file_meta).map_err(std::io::Error::other)?;
    let baseline: &[u8] = state.baseline.as_ref().map_or(&[], |b| &b.bytes);
    let events: Vec<u8> = state
        .events
        .iter()
        .flat_map(|entry| {
            let mut record = entry.event.encode();
            record.seq = entry.seq;
            record.tick = entry.tick;
            record.cpu = entry.cpu.map_or(0, |cpu| cpu as u16);
            record.as_bytes().to_vec()
        })
        .collect();
    if meta_bytes.len() as u64 > MAX_META
        || baseline.len() as u64 > MAX_KERNEL_TEXT
        || state.events.len() as u64 > MAX_EVENTS
    {
        return Err(std::io::Error::other("the snapshot's metadata, kernel text or events are too large"));
    }

    let mut hash = Fnv::new();
    let mut out = BufWriter::new(&mut file);
    out.write_all(&[0u8; HEADER_SIZE])?;
    for section in [&meta_bytes[..], baseline, &events, &bitmap] {
        hash.update(section);
        out.write_all(section)?;
    }
    for i in 0..pages {
        if bitmap[(i / 8) as usize] & (1 << (i % 8)) != 0 {
            read(i, &mut page)?;
            hash.update(&page);
            out.write_all(&page)?;
        }
    }
    out.flush()?;
    drop(out);
    let mut header = Vec::with_capacity(HEADER_SIZE);
    header.extend_from_slice(&MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
    header.extend_from_slice(&ram.size().to_le_bytes());
    header.extend_from_slice(&(meta_bytes.len() as u64).to_le_bytes());
    header.extend_from_slice(&(baseline.len() as u64).to_le_bytes());
    header.extend_from_slice(&(state.events.len() as u32).to_le_bytes());
    header.extend_from_slice(&(RECORD_SIZE as u32).to_le_bytes());
    header.extend_from_slice(&stored.to_le_bytes());
    header.extend_from_slice(&hash.0.to_le_bytes());
    let end = file.stream_position()?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&header)?;
    file.set_len(end)?;
    file.flush()
}

/// A snapshot, read back.
#[derive(Debug)]
pub struct Loaded {
    /// Guest RAM as it was.
    pub ram: GuestRam,
    /// What is needed to interpret it.
    pub state: MachineState,
    /// Where it came from.
    pub meta: Meta,
}

/// Reads and validates the snapshot at `path`.
pub fn read(path: &Path) -> Result<Loaded, SnapshotError> {
    let io = |error| SnapshotError::Io { path: path.display().to_string(), error };
    // A regular file only (`/dev/zero` would be read for gigabytes, a FIFO
    // would block), and never more than its real size.
    let file = crate::input::open_regular(path).map_err(io)?;
    let length = file.metadata().map_err(io)?.len();
    let limit = HEADER_SIZE as u64
        + MAX_META
        + MAX_KERNEL_TEXT
        + MAX_EVENTS * RECORD_SIZE as u64
        + MAX_GUEST_MEMORY / PAGE_SIZE / 8
        + MAX_GUEST_MEMORY;
    if length > limit {
        return Err(corrupt(format!("the file is {length} bytes, more than any snapshot can be")));
    }
    // The header first: the magic and declared sizes are checked against
    // the file's real length before the rest is read.
    let mut file = file.take(length);
    let mut bytes = vec![0u8; HEADER_SIZE.min(length as usize)];
    file.read_exact(&mut bytes).map_err(io)?;
    check_header(&bytes, length)?;
    bytes.reserve_exact((length as usize).saturating_sub(bytes.len()));
    file.read_to_end(&mut bytes).map_err(io)?;
    parse(&bytes)
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(word)
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(word)
}

/// Splits `len` bytes off the front of `rest`.
fn take<'a>(rest: &mut &'a [u8], len: u64) -> Result<&'a [u8], SnapshotError> {
    let len = usize::try_from(len).map_err(|_| corrupt("a section is too large"))?;
    if rest.len() < len {
        return Err(corrupt("the file ends inside a section"));
    }
    let (head, tail) = rest.split_at(len);
    *rest = tail;
    Ok(head)
}

/// Checks the header (the first [`HEADER_SIZE`] bytes of `header`) of a
/// snapshot of `total` bytes: magic, version, every declared size within
/// its cap, and the sections adding up to exactly `total`.
fn check_header(header: &[u8], total: u64) -> Result<(), SnapshotError> {
    if header.len() < HEADER_SIZE {
        return Err(SnapshotError::NotASnapshot(format!("{total} bytes, shorter than the header")));
    }
    if header[..8] != MAGIC {
        return Err(SnapshotError::NotASnapshot("wrong magic".into()));
    }
    let version = u32_at(header, 8);
    if !(OLDEST_VERSION..=VERSION).contains(&version) {
        return Err(SnapshotError::Version(version));
    }
    let header_size = u32_at(header, 12);
    if header_size as usize != HEADER_SIZE {
        return Err(corrupt(format!("header size {header_size}, not {HEADER_SIZE}")));
    }
    let ram_size = u64_at(header, 16);
    let meta_len = u64_at(header, 24);
    let text_len = u64_at(header, 32);
    let event_count = u64::from(u32_at(header, 40));
    let record_size = u32_at(header, 44);
    let stored = u64_at(header, 48);
    if !(MIN_GUEST_MEMORY..=MAX_GUEST_MEMORY).contains(&ram_size) || ram_size % (2 << 20) != 0 {
        return Err(corrupt(format!("guest RAM of {ram_size} bytes is not a valid size")));
    }
    let pages = ram_size / PAGE_SIZE;
    if meta_len > MAX_META {
        return Err(corrupt(format!("metadata of {meta_len} bytes (at most {MAX_META})")));
    }
    if text_len > MAX_KERNEL_TEXT {
        return Err(corrupt(format!("kernel text of {text_len} bytes (at most {MAX_KERNEL_TEXT})")));
    }
    if event_count > MAX_EVENTS {
        return Err(corrupt(format!("{event_count} events (at most {MAX_EVENTS})")));
    }
    if record_size as usize != RECORD_SIZE {
        return Err(corrupt(format!("event records of {record_size} bytes, not {RECORD_SIZE}")));
    }
    if stored > pages {
        return Err(corrupt(format!("{stored} stored pages in {pages} pages of RAM")));
    }
    let expected = [meta_len, text_len, event_count * RECORD_SIZE as u64, pages / 8, stored * PAGE_SIZE]
        .into_iter()
        .try_fold(HEADER_SIZE as u64, u64::checked_add);
    if expected != Some(total) {
        return Err(corrupt(format!(
            "the file is {total} bytes, its header describes {}",
            expected.map_or("more than 2^64".to_string(), |e| e.to_string())
        )));
    }
    Ok(())
}

/// Parses and validates a snapshot held in memory.
pub fn parse(bytes: &[u8]) -> Result<Loaded, SnapshotError> {
    check_header(bytes, bytes.len() as u64)?;
    let ram_size = u64_at(bytes, 16);
    let meta_len = u64_at(bytes, 24);
    let text_len = u64_at(bytes, 32);
    let event_count = u64::from(u32_at(bytes, 40));
    let stored = u64_at(bytes, 48);
    let checksum = u64_at(bytes, 56);
    let pages = ram_size / PAGE_SIZE;
    let mut hash = Fnv::new();
    hash.update(&bytes[HEADER_SIZE..]);
    if hash.0 != checksum {
        return Err(corrupt(format!("checksum {:#018x}, the header says {checksum:#018x}", hash.0)));
    }

    let mut rest = &bytes[HEADER_SIZE..];
    let meta_bytes = take(&mut rest, meta_len)?;
    let text = take(&mut rest, text_len)?;
    let event_bytes = take(&mut rest, event_count * RECORD_SIZE as u64)?;
    let bitmap = take(&mut rest, pages / 8)?;
    let page_bytes = take(&mut rest, stored * PAGE_SIZE)?;

    let meta: FileMeta = serde_json::from_slice(meta_bytes).map_err(|e| corrupt(format!("metadata: {e}")))?;
    let in_ram = |gpa: u64, len: u64| gpa.checked_add(len).is_some_and(|end| end <= ram_size);
    let mut usable = Vec::with_capacity(meta.usable.len());
    for [start, end] in meta.usable {
        if start >= end || end > ram_size || start % PAGE_SIZE != 0 || end % PAGE_SIZE != 0 {
            return Err(corrupt(format!("usable range {start:#x}..{end:#x} is not page-aligned RAM")));
        }
        usable.push((start, end));
    }
    let baseline = match (meta.baseline_gpa, text_len) {
        (_, 0) => None,
        (Some(gpa), len) if in_ram(gpa, len) => {
            Some(TextBaseline { gpa, bytes: text.to_vec(), hash: crate::check::fnv1a(text) })
        }
        (Some(gpa), len) => {
            return Err(corrupt(format!("kernel text {gpa:#x}+{len:#x} is outside guest RAM")))
        }
        (None, _) => return Err(corrupt("kernel text without its address")),
    };
    let read_only = match meta.kernel_read_only {
        None => None,
        Some([start, end])
            if start < end && end <= ram_size && start % PAGE_SIZE == 0 && end % PAGE_SIZE == 0 =>
        {
            Some((start, end))
        }
        Some([start, end]) => {
            return Err(corrupt(format!(
                "kernel read-only range {start:#x}..{end:#x} is not page-aligned RAM"
            )))
        }
    };
    if meta.kernel_symbols.len() > MAX_CPU_ITEMS {
        return Err(corrupt(format!(
            "{} kernel symbols (at most {MAX_CPU_ITEMS})",
            meta.kernel_symbols.len()
        )));
    }
    let mut cpus = match (meta.cpu, meta.cpus) {
        (Some(_), cpus) if !cpus.is_empty() => return Err(corrupt("both `cpu` and `cpus`")),
        (Some(cpu), _) => vec![crate::cpu::CpuCapture { cpu: 0, ..cpu }],
        (None, cpus) => cpus,
    };
    if cpus.len() > superos_protocol::cpu::MAX_CPUS as usize {
        return Err(corrupt(format!(
            "{} vCPU states (at most {})",
            cpus.len(),
            superos_protocol::cpu::MAX_CPUS
        )));
    }
    if cpus.iter().enumerate().any(|(i, capture)| capture.cpu as usize != i) {
        return Err(corrupt("the vCPU states are not numbered 0, 1, ... in order"));
    }
    for capture in &mut cpus {
        if capture.state.msrs.len() > MAX_CPU_ITEMS || capture.state.errors.len() > MAX_CPU_ITEMS {
            return Err(corrupt("the CPU state has too many MSRs or errors"));
        }
        // Printed later: no control characters from a file.
        capture.at = crate::inspect::sanitize(&capture.at);
        for error in &mut capture.state.errors {
            *error = crate::inspect::sanitize(error);
        }
    }
    let hello = meta.hello.map(|h| BootHelloParams {
        version: h.version,
        status: 0,
        event_ring_gpa: h.event_ring_gpa,
        event_ring_bytes: h.event_ring_bytes,
        kernel_text_gpa: h.kernel_text_gpa,
        kernel_text_len: h.kernel_text_len,
        introspection_root_gpa: h.introspection_root_gpa,
    });
    let mut events = Vec::with_capacity(event_count as usize);
    for (i, chunk) in event_bytes.chunks_exact(RECORD_SIZE).enumerate() {
        let record = EventRecord::read_from_bytes(chunk).map_err(|_| corrupt("event record size"))?;
        let event = record
            .decode()
            .map_err(|unknown| corrupt(format!("event #{i} has unknown kind {}", unknown.0)))?;
        events.push(EventEntry {
            seq: record.seq,
            tick: record.tick,
            cpu: Some(u32::from(record.cpu)),
            event,
        });
    }
    // Events name their CPU where the kernel ran on several (as in a live run).
    let several = events
        .iter()
        .any(|e| matches!(e.event, superos_protocol::event::Event::KernelReady { cpus, .. } if cpus > 1));
    if !several {
        for entry in &mut events {
            entry.cpu = None;
        }
    }
    let set: u64 = bitmap.iter().map(|b| u64::from(b.count_ones())).sum();
    if set != stored {
        return Err(corrupt(format!("the page bitmap marks {set} pages, the header says {stored}")));
    }
    let ram = GuestRam::new(ram_size >> 20).map_err(|e| corrupt(e.to_string()))?;
    let mut next = page_bytes.chunks_exact(PAGE_SIZE as usize);
    for i in 0..pages {
        if bitmap[(i / 8) as usize] & (1 << (i % 8)) != 0 {
            let page = next.next().ok_or_else(|| corrupt("fewer pages than the bitmap marks"))?;
            ram.write_bytes(i * PAGE_SIZE, page).map_err(|e| corrupt(e.to_string()))?;
        }
    }
    Ok(Loaded {
        ram,
        state: MachineState {
            hello,
            usable,
            baseline,
            events,
            point: meta.point,
            image: crate::check::KernelImage {
                read_only,
                symbols: meta.kernel_symbols,
                features: meta.cpu_features,
            },
            cpus,
            trap: None,
            text_patches: Default::default(),
        },
        meta: Meta {
            vmm_version: meta.vmm_version,
            created_unix: meta.created_unix,
            scenario: meta.scenario,
            lost_events: meta.lost_events,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use superos_protocol::event::Event;

    fn sample() -> (GuestRam, MachineState) {
        let ram = GuestRam::new(16).unwrap();
        ram.write_bytes(0x1000, b"boot info").unwrap();
        ram.write_bytes(0x20_0000, &[0xab; 5000]).unwrap();
        ram.write_bytes((16 << 20) - 1, &[1]).unwrap();
        let text = vec![0x90u8; 300];
        ram.write_bytes(0x10_0000, &text).unwrap();
        let state = MachineState {
            hello: Some(BootHelloParams {
                version: 1,
                status: 0,
                event_ring_gpa: 0x30_0000,
                event_ring_bytes: 4096,
                kernel_text_gpa: 0x10_0000,
                kernel_text_len: 300,
                introspection_root_gpa: 0x31_0000,
            }),
            usable: vec![(0x40_0000, 16 << 20)],
            baseline: Some(TextBaseline { gpa: 0x10_0000, hash: crate::check::fnv1a(&text), bytes: text }),
            events: vec![
                EventEntry {
                    seq: 0,
                    tick: 0,
                    cpu: None,
                    event: Event::ProcessSpawned { pid: 1, spec_index: 0, pml4_gpa: 0x5000 },
                },
                EventEntry {
                    seq: 1,
                    tick: 3,
                    cpu: None,
                    event: Event::ProcessExited { pid: 1, code: 7, preemptions: 2 },
                },
            ],
            point: Point::Finished { exit: "the kernel shut down with status 0".into(), cr3: None },
            image: crate::check::KernelImage {
                read_only: Some((0x10_0000, 0x10_1000)),
                symbols: [("syscall_entry".to_string(), 0xffff_ffff_8010_0000)].into_iter().collect(),
                features: Some(crate::cpu::CpuFeatures {
                    smep: true,
                    xcr0_supported: 7,
                    ..Default::default()
                }),
            },
            cpus: (0..2)
                .map(|cpu| crate::cpu::CpuCapture {
                    cpu,
                    at: "at shutdown".into(),
                    state: crate::cpu::CpuState {
                        cr0: 0x8005_0033,
                        msrs: vec![(0xc000_0082, 0xffff_ffff_8010_0000 + u64::from(cpu) * 0x40)],
                        xcr0: Some(7),
                        ..Default::default()
                    },
                })
                .collect(),
            trap: None,
            text_patches: Default::default(),
        };
        (ram, state)
    }

    fn bytes_of(ram: &GuestRam, state: &MachineState) -> Vec<u8> {
        let path = std::env::temp_dir().join(format!(
            "superos-snapshot-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        write(file, ram, state, &Meta::new("test", 0)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        bytes
    }

    #[test]
    fn a_snapshot_round_trips() {
        let (ram, state) = sample();
        let bytes = bytes_of(&ram, &state);
        assert_eq!(&bytes[..8], b"SOSSNAP\0");
        assert!(bytes.len() < 64 * 1024, "zero pages are not stored: {} bytes", bytes.len());
        let loaded = parse(&bytes).unwrap();
        assert_eq!(loaded.state, state);
        assert_eq!(loaded.meta.scenario, "test");
        for gpa in (0..16u64 << 20).step_by(4096) {
            let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
            ram.read_bytes(gpa, &mut a).unwrap();
            loaded.ram.read_bytes(gpa, &mut b).unwrap();
            assert!(a == b, "page {gpa:#x} differs");
        }
    }

    fn sample_bytes() -> &'static [u8] {
        static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        BYTES.get_or_init(|| {
            let (ram, state) = sample();
            bytes_of(&ram, &state)
        })
    }

    /// Recomputes the checksum after a corruption, so the parser's later
    /// checks are reached.
    fn reseal(bytes: &mut [u8]) {
        if bytes.len() >= HEADER_SIZE {
            let mut hash = Fnv::new();
            hash.update(&bytes[HEADER_SIZE..]);
            bytes[56..64].copy_from_slice(&hash.0.to_le_bytes());
        }
    }

    #[test]
    fn a_debuggers_int3s_in_the_kernel_text_are_not_in_the_snapshot() {
        let (ram, mut state) = sample();
        ram.write_bytes(0x10_0004, &[crate::debug_trap::INT3]).unwrap();
        state.text_patches.insert(0x10_0004, 0x90);
        // An int3 the debugger did not write (or one overwritten since) stays.
        ram.write_bytes(0x10_0008, &[crate::debug_trap::INT3]).unwrap();
        let loaded = parse(&bytes_of(&ram, &state)).unwrap();
        let mut text = [0u8; 16];
        loaded.ram.read_bytes(0x10_0000, &mut text).unwrap();
        assert_eq!((text[4], text[8]), (0x90, crate::debug_trap::INT3));
        assert!(loaded.state.text_patches.is_empty(), "the snapshot has no debugger");
    }

    #[test]
    fn damaged_snapshots_are_clear_errors() {
        let (ram, state) = sample();
        let good = bytes_of(&ram, &state);
        type Damage = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(Damage, &str)> = vec![
            (Box::new(|b| b.truncate(10)), "shorter than the header"),
            (Box::new(|b| b[0] = b'X'), "wrong magic"),
            (Box::new(|b| b[8] = 9), "version 9 is not supported (this VMM reads versions 1 to 4)"),
            (Box::new(|b| b[8] = 0), "version 0 is not supported"),
            (Box::new(|b| b.push(0)), "header describes"),
            (Box::new(|b| b.truncate(b.len() - 1)), "header describes"),
            (Box::new(|b| *b.last_mut().unwrap() ^= 1), "checksum"),
            (Box::new(|b| b[16..24].copy_from_slice(&(17u64 << 20).to_le_bytes())), "not a valid size"),
            (Box::new(|b| b[24..32].copy_from_slice(&u64::MAX.to_le_bytes())), "metadata of"),
            (Box::new(|b| b[48..56].copy_from_slice(&(1u64 << 40).to_le_bytes())), "stored pages"),
            (Box::new(|b| b[44] = 65), "event records of 65 bytes"),
            (
                Box::new(|b| {
                    b[HEADER_SIZE] = b'[';
                    reseal(b)
                }),
                "metadata",
            ),
        ];
        for (damage, needle) in cases {
            let mut bytes = good.clone();
            damage(&mut bytes);
            let error = parse(&bytes).unwrap_err().to_string();
            assert!(error.contains(needle), "{error:?} should mention {needle:?}");
        }
        let error = read(Path::new("/nonexistent/snapshot")).unwrap_err().to_string();
        assert!(error.contains("cannot read the snapshot /nonexistent/snapshot"), "{error}");
    }

    /// `good` with its metadata JSON replaced by `edit(json)` and the
    /// version set to `version` (lengths and checksum fixed up).
    fn with_meta(good: &[u8], version: u32, edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let meta_len = u64_at(good, 24) as usize;
        let mut meta: serde_json::Value =
            serde_json::from_slice(&good[HEADER_SIZE..HEADER_SIZE + meta_len]).unwrap();
        edit(&mut meta);
        let meta = serde_json::to_vec(&meta).unwrap();
        let mut bytes = good[..HEADER_SIZE].to_vec();
        bytes[8..12].copy_from_slice(&version.to_le_bytes());
        bytes[24..32].copy_from_slice(&(meta.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&meta);
        bytes.extend_from_slice(&good[HEADER_SIZE + meta_len..]);
        reseal(&mut bytes);
        bytes
    }

    #[test]
    fn older_snapshots_are_read_without_what_they_lack() {
        let (ram, state) = sample();
        let good = bytes_of(&ram, &state);
        let v1 = with_meta(&good, 1, |meta| {
            for field in ["kernel_read_only", "kernel_symbols", "cpu_features", "cpus"] {
                meta.as_object_mut().unwrap().remove(field);
            }
        });
        let loaded = parse(&v1).unwrap();
        assert_eq!(loaded.state.image, crate::check::KernelImage::default());
        assert_eq!(loaded.state.cpus, []);
        assert_eq!(loaded.state.events, state.events);
        let v2 = with_meta(&good, 2, |meta| {
            for field in ["kernel_symbols", "cpu_features", "cpus"] {
                meta.as_object_mut().unwrap().remove(field);
            }
        });
        let loaded = parse(&v2).unwrap();
        assert_eq!(loaded.state.image.read_only, state.image.read_only);
        assert_eq!((loaded.state.image.features, loaded.state.cpus.len()), (None, 0));
        // Version 3 carried the bootstrap vCPU's state alone, as `cpu`.
        let v3 = with_meta(&good, 3, |meta| {
            let mut first = meta["cpus"][0].clone();
            first.as_object_mut().unwrap().remove("cpu");
            meta["cpu"] = first;
            meta.as_object_mut().unwrap().remove("cpus");
        });
        assert_eq!(parse(&v3).unwrap().state.cpus, state.cpus[..1]);
        // vCPU states out of order, too many, or in both forms are refused.
        let swapped = with_meta(&good, 4, |meta| meta["cpus"][0]["cpu"] = serde_json::json!(1));
        assert!(parse(&swapped).unwrap_err().to_string().contains("not numbered"));
        let nine = with_meta(&good, 4, |meta| {
            meta["cpus"] = (0..9)
                .map(|cpu| {
                    let mut one = meta["cpus"][0].clone();
                    one["cpu"] = serde_json::json!(cpu);
                    one
                })
                .collect();
        });
        assert!(parse(&nine).unwrap_err().to_string().contains("9 vCPU states"));
        let both = with_meta(&good, 4, |meta| meta["cpu"] = meta["cpus"][0].clone());
        assert!(parse(&both).unwrap_err().to_string().contains("both"));
        // What a file carries is bounded and made printable.
        let many: serde_json::Map<String, serde_json::Value> =
            (0..100).map(|i| (format!("s{i}"), serde_json::json!(i))).collect();
        let damaged = with_meta(&good, 3, |meta| meta["kernel_symbols"] = serde_json::Value::Object(many));
        assert!(parse(&damaged).unwrap_err().to_string().contains("kernel symbols"));
        let escape = with_meta(&good, 4, |meta| meta["cpus"][1]["at"] = serde_json::json!("x\u{1b}[31m"));
        assert_eq!(parse(&escape).unwrap().state.cpus[1].at, "x?[31m");
        // A bad range is refused, not trusted.
        for bad in [[0x10_0000u64, 0x10_0000], [0x10_0800, 0x10_1000], [0, 32 << 20]] {
            let damaged = with_meta(&good, 3, |meta| meta["kernel_read_only"] = serde_json::json!(bad));
            let error = parse(&damaged).unwrap_err().to_string();
            assert!(error.contains("kernel read-only range"), "{error}");
        }
        // Unknown fields are still refused.
        let unknown = with_meta(&good, 3, |meta| meta["surprise"] = serde_json::json!(1));
        assert!(parse(&unknown).unwrap_err().to_string().contains("metadata"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random bytes are never a snapshot, and never a panic.
        #[test]
        fn random_bytes_are_rejected(bytes in proptest::collection::vec(any::<u8>(), 0..512), magic in any::<bool>()) {
            let mut bytes = bytes;
            if magic && bytes.len() >= 12 {
                bytes[..8].copy_from_slice(&MAGIC);
                bytes[8..12].copy_from_slice(&VERSION.to_le_bytes());
            }
            prop_assert!(parse(&bytes).is_err());
        }

        /// A real snapshot with bytes changed (and the checksum fixed up, half
        /// of the time, so the deeper checks run) parses or fails cleanly.
        #[test]
        fn corrupted_snapshots_never_panic(
            changes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            header_only in any::<bool>(),
            fix_checksum in any::<bool>(),
            cut in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let mut bytes = sample_bytes().to_vec();
            let span = if header_only { HEADER_SIZE + 2048 } else { bytes.len() };
            for (index, value) in changes {
                let i = index.index(span.min(bytes.len()));
                bytes[i] = value;
            }
            if let Some(cut) = cut {
                let keep = cut.index(bytes.len());
                bytes.truncate(keep);
            }
            if fix_checksum {
                reseal(&mut bytes);
            }
            let _ = parse(&bytes);
        }
    }
}
