//! Preparing guest memory for the first instruction: checking and loading the
//! kernel ELF (linux-loader), placing the user program images, writing the
//! boot page tables and the [`BootInfo`] block.
//!
//! Guest-physical layout: see `superos_protocol::layout`.

use crate::arch::paging::boot_page_tables;
use crate::memory::{GuestRam, MemoryError};
use crate::scenario::Scenario;
use elf::abi::{EM_X86_64, ET_EXEC, PF_W, PF_X, PT_LOAD};
use elf::endian::AnyEndian;
use elf::file::Class;
use elf::ElfBytes;
use linux_loader::loader::{elf::Elf, KernelLoader};
use std::io::Cursor;
use superos_protocol::boot::{
    BootInfo, EventNotifyPolicy, GatePreference, HostFlavor, MemoryRegion, ProcessSpec, ProgramImage,
    ScrubStrategy, BOOT_INFO_MAGIC, MAX_MEMORY_REGIONS, MAX_PROGRAMS, MEMORY_BOOT_DATA, MEMORY_KERNEL_IMAGE,
    MEMORY_PROGRAM_IMAGES, MEMORY_USABLE,
};
use superos_protocol::layout::{
    BOOT_INFO_GPA, BOOT_PAGE_TABLES_GPA, KERNEL_PHYS_BASE, KERNEL_VMA_BASE, PAGE_SIZE,
};
use superos_protocol::{name_to_array, PROTOCOL_VERSION};
use thiserror::Error;
use zerocopy::FromZeros;

/// Guest RAM that must remain free after the images are placed.
pub const MIN_FREE_MEMORY: u64 = 4 << 20;

/// Why the guest could not be prepared.
#[derive(Debug, Error)]
pub enum BootError {
    /// Not an ELF file at all, or its headers are malformed or truncated.
    #[error("the kernel image is not a valid ELF file (malformed or truncated): {0}")]
    KernelNotElf(String),
    /// An ELF file for another machine or class.
    #[error("the kernel image is a {class} ELF for machine {machine:#x}; SuperOS needs a 64-bit x86-64 (machine 0x3e) kernel")]
    KernelWrongArchitecture {
        /// ELF class ("32-bit"/"64-bit").
        class: &'static str,
        /// `e_machine`.
        machine: u16,
    },
    /// Not an executable.
    #[error("the kernel image is an ELF of type {0:#x}, not an executable (ET_EXEC)")]
    KernelNotExecutable(u16),
    /// Nothing to load.
    #[error("the kernel image has no loadable segments")]
    KernelNoSegments,
    /// A segment's file bytes run past the end of the file.
    #[error("the kernel image is truncated: a segment needs bytes {offset:#x}..{end:#x} but the file has {len:#x}")]
    KernelTruncated {
        /// Segment file offset.
        offset: u64,
        /// End of its bytes.
        end: u64,
        /// File length.
        len: u64,
    },
    /// A segment does not fit the physical window the boot page tables map.
    #[error("kernel segment at physical {paddr:#x}..{end:#x} (virtual {vaddr:#x}) must lie between {KERNEL_PHYS_BASE:#x} and the end of guest memory ({mem:#x}) and be linked at physical + {KERNEL_VMA_BASE:#x}")]
    KernelSegmentPlacement {
        /// Physical start.
        paddr: u64,
        /// Physical end.
        end: u64,
        /// Virtual start.
        vaddr: u64,
        /// Guest memory size.
        mem: u64,
    },
    /// The entry point is not in an executable segment.
    #[error("the kernel entry point {0:#x} is not inside an executable segment")]
    KernelBadEntry(u64),
    /// linux-loader refused it.
    #[error("loading the kernel: {0}")]
    KernelLoad(#[from] linux_loader::loader::Error),
    /// The images do not fit in guest memory.
    #[error("the kernel and program images need {needed} KiB but guest memory is {mem} KiB (and {} KiB must stay free)", MIN_FREE_MEMORY >> 10)]
    DoesNotFit {
        /// Bytes needed.
        needed: u64,
        /// Guest memory.
        mem: u64,
    },
    /// Too many distinct programs.
    #[error("the scenario uses {0} different programs; at most {MAX_PROGRAMS} are supported")]
    TooManyPrograms(usize),
    /// Writing guest memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// What the kernel ELF check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLayout {
    /// Entry point (virtual).
    pub entry: u64,
    /// Lowest physical address loaded.
    pub phys_start: u64,
    /// One past the highest physical address used (bss included).
    pub phys_end: u64,
    /// The page-aligned physical range `[start, end)` of the non-writable
    /// segments (text and read-only data), which the VMM registers as a
    /// read-only memory slot: see [`read_only_range`]. `None` if the image
    /// has no non-writable segment.
    pub read_only: Option<(u64, u64)>,
}

/// The physical range to protect from the guest's own writes, computed from
/// the PT_LOAD segments as `(physical start, memory size, writable)`: every
/// page of a non-writable segment, except pages a writable segment also
/// covers (those must stay writable), as one contiguous run. If the
/// non-writable pages are not contiguous (a writable segment between two
/// read-only ones), the run that starts lowest, which holds the text of a
/// kernel linked text first, is protected and the rest is not.
pub fn read_only_range(segments: &[(u64, u64, bool)]) -> Option<(u64, u64)> {
    let pages = |&(start, size, _): &(u64, u64, bool)| {
        let end = start.checked_add(size)?.checked_next_multiple_of(PAGE_SIZE)?;
        (size > 0).then_some((start & !(PAGE_SIZE - 1), end))
    };
    let mut read_only: Vec<(u64, u64)> = segments.iter().filter(|s| !s.2).filter_map(pages).collect();
    let writable: Vec<(u64, u64)> = segments.iter().filter(|s| s.2).filter_map(pages).collect();
    read_only.sort_unstable();
    let shared = |page: u64| writable.iter().any(|&(start, end)| page >= start && page < end);
    // From the lowest read-only page, page by page, merging the next
    // read-only range while it touches the run, up to the first gap or
    // page a writable segment shares.
    let (mut start, mut end) = *read_only.first()?;
    while shared(start) {
        start += PAGE_SIZE;
        if start >= end {
            return None;
        }
    }
    let mut page = start;
    let mut next = 1;
    loop {
        while page < end && !shared(page) {
            page += PAGE_SIZE;
        }
        if page < end {
            break;
        }
        match read_only.get(next) {
            Some(&(next_start, next_end)) if next_start <= page => end = end.max(next_end),
            _ => break,
        }
        next += 1;
    }
    (page > start).then_some((start, page))
}

/// Checks that `image` is a kernel this VMM can boot in `mem` bytes of RAM.
/// Every header field linux-loader will act on is checked here first.
pub fn check_kernel_elf(image: &[u8], mem: u64) -> Result<KernelLayout, BootError> {
    let file =
        ElfBytes::<AnyEndian>::minimal_parse(image).map_err(|e| BootError::KernelNotElf(e.to_string()))?;
    let header = &file.ehdr;
    if header.class != Class::ELF64 || header.e_machine != EM_X86_64 {
        let class = if header.class == Class::ELF64 { "64-bit" } else { "32-bit" };
        return Err(BootError::KernelWrongArchitecture { class, machine: header.e_machine });
    }
    if header.e_type != ET_EXEC {
        return Err(BootError::KernelNotExecutable(header.e_type));
    }
    let segments = file.segments().ok_or(BootError::KernelNoSegments)?;
    let mut layout =
        KernelLayout { entry: header.e_entry, phys_start: u64::MAX, phys_end: 0, read_only: None };
    let mut entry_ok = false;
    let mut loaded = Vec::new();
    for segment in segments.iter().filter(|s| s.p_type == PT_LOAD) {
        let file_end = segment.p_offset.checked_add(segment.p_filesz);
        if file_end.is_none_or(|end| end > image.len() as u64) || segment.p_filesz > segment.p_memsz {
            return Err(BootError::KernelTruncated {
                offset: segment.p_offset,
                end: file_end.unwrap_or(u64::MAX),
                len: image.len() as u64,
            });
        }
        let phys_end = segment.p_paddr.checked_add(segment.p_memsz);
        let placement_ok = segment.p_paddr >= KERNEL_PHYS_BASE
            && phys_end.is_some_and(|end| end <= mem)
            && segment.p_vaddr.wrapping_sub(segment.p_paddr) == KERNEL_VMA_BASE;
        if !placement_ok {
            return Err(BootError::KernelSegmentPlacement {
                paddr: segment.p_paddr,
                end: phys_end.unwrap_or(u64::MAX),
                vaddr: segment.p_vaddr,
                mem,
            });
        }
        layout.phys_start = layout.phys_start.min(segment.p_paddr);
        layout.phys_end = layout.phys_end.max(phys_end.unwrap_or(0));
        loaded.push((segment.p_paddr, segment.p_memsz, segment.p_flags & PF_W != 0));
        let in_segment =
            segment.p_vaddr <= header.e_entry && header.e_entry - segment.p_vaddr < segment.p_memsz;
        entry_ok |= segment.p_flags & PF_X != 0 && in_segment;
    }
    if layout.phys_end == 0 {
        return Err(BootError::KernelNoSegments);
    }
    if !entry_ok {
        return Err(BootError::KernelBadEntry(header.e_entry));
    }
    layout.read_only = read_only_range(&loaded);
    Ok(layout)
}

/// Everything [`prepare`] needs to know besides the images.
#[derive(Clone, Copy, Debug)]
pub struct BootOptions {
    /// Detected host.
    pub host: HostFlavor,
    /// Requested gate.
    pub gate: GatePreference,
    /// How the kernel should zero freed frames.
    pub scrub: ScrubStrategy,
    /// `DEBUG_*` flags.
    pub debug_flags: u32,
    /// Guest TSC frequency (0 if unknown).
    pub tsc_khz: u64,
    /// vCPUs the VM has.
    pub cpus: u32,
    /// When the kernel tells the VMM about its events.
    pub event_notify: EventNotifyPolicy,
    /// Have the kernel keep its trace ring (`run --trace`).
    pub trace: bool,
}

/// The result of [`prepare`].
#[derive(Clone, Debug)]
pub struct PreparedGuest {
    /// Kernel entry point.
    pub entry: u64,
    /// GPA of the boot PML4.
    pub boot_pml4: u64,
    /// The boot info as written.
    pub boot_info: Box<BootInfo>,
    /// The kernel's text and read-only data, physical (see
    /// [`KernelLayout::read_only`]).
    pub kernel_read_only: Option<(u64, u64)>,
}

impl PreparedGuest {
    /// The usable RAM ranges (start, end) of the boot memory map.
    pub fn usable_ranges(&self) -> Vec<(u64, u64)> {
        self.boot_info
            .memory_map()
            .iter()
            .filter(|r| r.kind == MEMORY_USABLE)
            .map(|r| (r.start, r.start.saturating_add(r.len)))
            .collect()
    }
}

/// Loads the kernel and the scenario's programs into `ram` and writes the
/// boot tables and boot info.
pub fn prepare(
    ram: &GuestRam,
    kernel: &[u8],
    scenario: &Scenario,
    options: BootOptions,
) -> Result<PreparedGuest, BootError> {
    let mem = ram.size();
    let layout = check_kernel_elf(kernel, mem)?;
    Elf::load(ram.memory(), None, &mut Cursor::new(kernel), None)?;

    // Distinct programs, each placed once, page-aligned, after the kernel.
    let mut programs: Vec<(&str, &[u8])> = Vec::new();
    for process in &scenario.processes {
        if !programs.iter().any(|(name, image)| *name == process.program && *image == &process.image[..]) {
            programs.push((&process.program, &process.image[..]));
        }
    }
    if programs.len() > MAX_PROGRAMS {
        return Err(BootError::TooManyPrograms(programs.len()));
    }
    let images_start = layout.phys_end.next_multiple_of(PAGE_SIZE);
    let mut cursor = images_start;
    let mut boot_info = Box::new(BootInfo::new_zeroed());
    for (i, (name, image)) in programs.iter().enumerate() {
        let needed = cursor + image.len() as u64 + MIN_FREE_MEMORY;
        if needed > mem {
            return Err(BootError::DoesNotFit { needed: needed >> 10, mem: mem >> 10 });
        }
        ram.write_bytes(cursor, image)?;
        boot_info.programs[i] =
            ProgramImage { gpa: cursor, len: image.len() as u64, name: name_to_array(name) };
        cursor = (cursor + image.len() as u64).next_multiple_of(PAGE_SIZE);
    }
    if cursor + MIN_FREE_MEMORY > mem {
        return Err(BootError::DoesNotFit { needed: (cursor + MIN_FREE_MEMORY) >> 10, mem: mem >> 10 });
    }
    let images_end = cursor;

    for (i, process) in scenario.processes.iter().enumerate() {
        let program = programs
            .iter()
            .position(|(name, image)| *name == process.program && *image == &process.image[..])
            .expect("every process's program was placed");
        let mut args = [0u8; superos_protocol::boot::ARGS_LEN];
        args[..process.args.len()].copy_from_slice(process.args.as_bytes());
        boot_info.processes[i] = ProcessSpec {
            program: program as u32,
            args_len: process.args.len() as u32,
            name: name_to_array(&process.name),
            args,
            quota: process.quota,
            runs: process.runs,
            reserved: 0,
        };
    }

    let tables = boot_page_tables(mem);
    ram.write_bytes(BOOT_PAGE_TABLES_GPA, &tables)?;
    let boot_data_end = (BOOT_PAGE_TABLES_GPA + tables.len() as u64).next_multiple_of(PAGE_SIZE);
    let regions = [
        (BOOT_INFO_GPA, boot_data_end, MEMORY_BOOT_DATA),
        (boot_data_end, layout.phys_start, MEMORY_USABLE),
        (layout.phys_start, layout.phys_end.next_multiple_of(PAGE_SIZE), MEMORY_KERNEL_IMAGE),
        (images_start, images_end, MEMORY_PROGRAM_IMAGES),
        (images_end, mem, MEMORY_USABLE),
    ];
    let mut count = 0;
    for (start, end, kind) in regions {
        if start < end && count < MAX_MEMORY_REGIONS {
            boot_info.memory_map[count] = MemoryRegion { start, len: end - start, kind, reserved: 0 };
            count += 1;
        }
    }
    boot_info.magic = BOOT_INFO_MAGIC;
    boot_info.version = PROTOCOL_VERSION;
    boot_info.host_flavor = options.host as u32;
    boot_info.gate_preference = options.gate as u32;
    boot_info.scrub_strategy = options.scrub as u32;
    boot_info.cpu_count = options.cpus;
    boot_info.event_notify = options.event_notify as u32;
    boot_info.trace = u32::from(options.trace);
    boot_info.debug_flags = options.debug_flags;
    boot_info.mem_size = mem;
    boot_info.tsc_khz = options.tsc_khz;
    boot_info.kernel_phys_start = layout.phys_start;
    boot_info.kernel_phys_end = layout.phys_end;
    boot_info.memory_map_len = count as u32;
    boot_info.program_count = programs.len() as u32;
    boot_info.process_count = scenario.processes.len() as u32;
    ram.write(BOOT_INFO_GPA, &*boot_info)?;
    Ok(PreparedGuest {
        entry: layout.entry,
        boot_pml4: BOOT_PAGE_TABLES_GPA,
        boot_info,
        kernel_read_only: layout.read_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::KERNEL_ELF;
    use superos_protocol::boot::QuotaSpec;

    #[test]
    fn the_embedded_kernel_passes_the_checks() {
        let layout = check_kernel_elf(KERNEL_ELF, 64 << 20).unwrap();
        assert!(layout.entry >= KERNEL_VMA_BASE + KERNEL_PHYS_BASE);
        assert_eq!(layout.phys_start, KERNEL_PHYS_BASE);
        // Text and rodata, from 1 MiB up to the first writable page.
        let (start, end) = layout.read_only.expect("the kernel has read-only segments");
        assert_eq!(start, KERNEL_PHYS_BASE);
        assert!(end > start && end % PAGE_SIZE == 0 && end < layout.phys_end, "{end:#x}");
        assert!((start..end).contains(&(layout.entry - KERNEL_VMA_BASE)));
    }

    #[test]
    fn the_read_only_range_is_the_lowest_run_of_non_writable_pages() {
        let (rx, r, rw) = (false, false, true);
        // text, rodata, data: text and rodata.
        let kernel = [(0x10_0000, 0x1_2000, rx), (0x11_2000, 0x2000, r), (0x11_4000, 0x5_0000, rw)];
        assert_eq!(read_only_range(&kernel), Some((0x10_0000, 0x11_4000)));
        // Unaligned ends are rounded out to pages; a page shared with a
        // writable segment stays writable.
        let shared = [(0x10_0000, 0x1800, rx), (0x10_1800, 0x100, rw)];
        assert_eq!(read_only_range(&shared), Some((0x10_0000, 0x10_1000)));
        let shared_first = [(0x10_0800, 0x1000, rw), (0x10_1000, 0x2000, r)];
        assert_eq!(read_only_range(&shared_first), Some((0x10_2000, 0x10_3000)));
        // A writable segment between two read-only ones: the lower run.
        let split = [(0x10_0000, 0x1000, rx), (0x10_1000, 0x1000, rw), (0x10_2000, 0x1000, r)];
        assert_eq!(read_only_range(&split), Some((0x10_0000, 0x10_1000)));
        // A gap between read-only segments ends the run too.
        let gap = [(0x10_0000, 0x1000, rx), (0x10_3000, 0x1000, r)];
        assert_eq!(read_only_range(&gap), Some((0x10_0000, 0x10_1000)));
        // Overlapping and unsorted read-only segments merge.
        let unsorted = [(0x10_2000, 0x2000, r), (0x10_0000, 0x3000, rx)];
        assert_eq!(read_only_range(&unsorted), Some((0x10_0000, 0x10_4000)));
        // Nothing to protect.
        assert_eq!(read_only_range(&[(0x10_0000, 0x1000, rw)]), None);
        assert_eq!(read_only_range(&[(0x10_0000, 0, r)]), None);
        assert_eq!(read_only_range(&[(0x10_0800, 0x100, r), (0x10_0000, 0x1000, rw)]), None);
        assert_eq!(read_only_range(&[(u64::MAX - 10, 0x1000, r)]), None);
        assert_eq!(read_only_range(&[]), None);
    }

    #[test]
    fn malformed_kernels_are_rejected_with_clear_errors() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "not a valid ELF file"),
            (b"MZ\x90\x00 definitely not an ELF".to_vec(), "not a valid ELF file"),
            (KERNEL_ELF[..40].to_vec(), "not a valid ELF file"),
            (KERNEL_ELF[..KERNEL_ELF.len() / 3].to_vec(), "truncated"),
            (patch(KERNEL_ELF, 18, &[0xb7, 0x00]), "machine 0xb7"),
            // ELFCLASS32: the 64-bit headers no longer parse.
            (patch(KERNEL_ELF, 4, &[1]), "not a valid ELF file"),
            (patch(KERNEL_ELF, 16, &[3, 0]), "not an executable"),
            (patch(KERNEL_ELF, 24, &0x1234u64.to_le_bytes()), "entry point 0x1234"),
        ];
        for (image, needle) in cases {
            let error = check_kernel_elf(&image, 64 << 20).unwrap_err().to_string();
            assert!(error.contains(needle), "expected {needle:?} in {error:?}");
        }
        let error = check_kernel_elf(KERNEL_ELF, 1 << 20).unwrap_err().to_string();
        assert!(error.contains("must lie between"), "{error}");
    }

    fn patch(image: &[u8], at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut out = image.to_vec();
        out[at..at + bytes.len()].copy_from_slice(bytes);
        out
    }

    proptest::proptest! {
        /// Corrupted kernel images never panic the checker.
        #[test]
        fn corrupted_kernels_never_panic(flips in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 1..16)) {
            let mut image = KERNEL_ELF.to_vec();
            for (at, value) in flips {
                image[at] = value;
            }
            let _ = check_kernel_elf(&image, 64 << 20);
        }
    }

    #[test]
    fn boot_info_describes_memory_and_processes() {
        let ram = GuestRam::new(64).unwrap();
        let scenario = Scenario::load("default").unwrap();
        let options = BootOptions {
            host: HostFlavor::Kvm,
            gate: GatePreference::Auto,
            scrub: ScrubStrategy::Auto,
            debug_flags: 0,
            tsc_khz: 1,
            cpus: 1,
            event_notify: EventNotifyPolicy::EveryEvent,
            trace: true,
        };
        let prepared = prepare(&ram, KERNEL_ELF, &scenario, options).unwrap();
        let info: BootInfo = ram.read(BOOT_INFO_GPA).unwrap();
        assert_eq!(info, *prepared.boot_info);
        assert_eq!(info.process_count as usize, scenario.processes.len());
        assert_eq!(info.scrub_strategy, 0, "auto");
        assert_eq!(EventNotifyPolicy::from_raw(info.event_notify), Some(EventNotifyPolicy::EveryEvent));
        assert_eq!(info.trace, 1);
        // Processes running the same program share one placed image.
        let mut distinct: Vec<&str> = scenario.processes.iter().map(|p| p.program.as_str()).collect();
        distinct.sort();
        distinct.dedup();
        assert!(distinct.len() < scenario.processes.len());
        assert_eq!(info.program_count as usize, distinct.len());
        let map = info.memory_map();
        assert!(map.windows(2).all(|w| w[0].start + w[0].len <= w[1].start), "sorted and disjoint");
        assert_eq!(map.last().unwrap().start + map.last().unwrap().len, 64 << 20);
        let first = info.programs()[0];
        let mut magic = [0u8; 4];
        ram.read_bytes(first.gpa, &mut magic).unwrap();
        assert_eq!(&magic, b"\x7fELF");
    }

    #[test]
    fn quotas_and_runs_reach_the_boot_info() {
        let ram = GuestRam::new(64).unwrap();
        let scenario = Scenario::parse(
            "[[process]]\nprogram = \"hello\"\nruns = 7\n\
             quota = { virtual_kib = 512, resident_kib = 128, shared_kib = 16, on_violation = \"kill\" }\n\
             [[process]]\nprogram = \"exit-code\"\n",
            "test.toml",
            std::path::Path::new("."),
        )
        .unwrap();
        let options = BootOptions {
            host: HostFlavor::Pvm,
            gate: GatePreference::Int3,
            scrub: ScrubStrategy::Hypercall,
            debug_flags: 0,
            tsc_khz: 0,
            cpus: 1,
            event_notify: EventNotifyPolicy::Batched,
            trace: false,
        };
        prepare(&ram, KERNEL_ELF, &scenario, options).unwrap();
        let info: BootInfo = ram.read(BOOT_INFO_GPA).unwrap();
        let [limited, plain] = info.processes() else {
            panic!("two processes expected, got {}", info.processes().len())
        };
        assert_eq!(limited.runs, 7);
        assert_eq!(
            limited.quota,
            QuotaSpec {
                max_virtual_bytes: 512 << 10,
                max_resident_bytes: 128 << 10,
                max_shared_bytes: 16 << 10,
                policy: superos_protocol::boot::QUOTA_POLICY_KILL,
                reserved: 0,
            }
        );
        assert_eq!(plain.runs, 1);
        assert_eq!(plain.quota, QuotaSpec::default());
        assert_eq!(ScrubStrategy::from_raw(info.scrub_strategy), Some(ScrubStrategy::Hypercall));
        assert_eq!(EventNotifyPolicy::from_raw(info.event_notify), Some(EventNotifyPolicy::Batched));
        assert_eq!(info.trace, 0);
        assert_eq!(info.gate_preference, GatePreference::Int3 as u32);
        assert_eq!(superos_protocol::name_from_array(&plain.name), "exit-code");
    }
}
