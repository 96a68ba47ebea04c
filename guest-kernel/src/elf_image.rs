//! Checking a user program's ELF image and turning it into a load plan.
//!
//! The kernel never trusts an image: every header field that later drives a
//! copy or a mapping is bounds-checked here, on the host in unit tests and in
//! the guest before a process is created. The VMM runs the same check on
//! scenario programs before boot so a bad file is reported with its path.
//!
//! Invariant (W^X): no segment is both writable and executable; code segments
//! are mapped read-only, everything else no-execute.

use elf::abi::{EM_X86_64, ET_EXEC, PF_R, PF_W, PF_X, PT_LOAD};
use elf::endian::LittleEndian;
use elf::file::Class;
use elf::ElfBytes;
use superos_protocol::event::SpawnError;
use superos_protocol::layout::{PAGE_SIZE, USER_IMAGE_BASE, USER_IMAGE_LIMIT};

/// Most loadable segments a user image may have.
pub const MAX_SEGMENTS: usize = 8;

/// Access rights of a loadable segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentRights {
    /// Writable (never together with `execute`).
    pub write: bool,
    /// Executable (mapped read-only).
    pub execute: bool,
}

/// One loadable segment, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Virtual start address (not necessarily page-aligned).
    pub vaddr: u64,
    /// Bytes in memory (`>= file_len`; the rest is zero).
    pub mem_len: u64,
    /// Offset of the segment's bytes in the image.
    pub file_offset: u64,
    /// Bytes taken from the image.
    pub file_len: u64,
    /// Access rights.
    pub rights: SegmentRights,
}

impl Segment {
    /// First page of the segment.
    pub fn first_page(&self) -> u64 {
        self.vaddr & !(PAGE_SIZE - 1)
    }
    /// One past the last page of the segment.
    pub fn end_page(&self) -> u64 {
        (self.vaddr + self.mem_len).next_multiple_of(PAGE_SIZE)
    }
}

/// A validated image: where to put what, and where to start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadPlan {
    /// Entry point (inside an executable segment).
    pub entry: u64,
    segments: [Option<Segment>; MAX_SEGMENTS],
}

impl LoadPlan {
    /// The segments, in file order.
    pub fn segments(&self) -> impl Iterator<Item = &Segment> {
        self.segments.iter().flatten()
    }

    /// Total bytes of virtual memory the segments occupy (whole pages).
    pub fn virtual_bytes(&self) -> u64 {
        self.segments().map(|s| s.end_page() - s.first_page()).sum()
    }
}

/// Checks `image` and returns its load plan.
pub fn check_user_image(image: &[u8]) -> Result<LoadPlan, SpawnError> {
    let file = ElfBytes::<LittleEndian>::minimal_parse(image).map_err(|_| SpawnError::BadElf)?;
    let header = &file.ehdr;
    if header.class != Class::ELF64 || header.e_machine != EM_X86_64 || header.e_type != ET_EXEC {
        return Err(SpawnError::BadElf);
    }
    let table = file.segments().ok_or(SpawnError::BadElf)?;
    let mut segments = [None; MAX_SEGMENTS];
    let mut count = 0;
    for header in table.iter().filter(|h| h.p_type == PT_LOAD && h.p_memsz > 0) {
        if count == MAX_SEGMENTS {
            return Err(SpawnError::BadElf);
        }
        let rights = SegmentRights { write: header.p_flags & PF_W != 0, execute: header.p_flags & PF_X != 0 };
        if rights.write && rights.execute {
            return Err(SpawnError::WritableAndExecutable);
        }
        if header.p_flags & PF_R == 0 && !rights.execute {
            // A segment nobody may read is meaningless here; refuse it rather
            // than guess.
            return Err(SpawnError::BadElf);
        }
        let file_end = header.p_offset.checked_add(header.p_filesz).ok_or(SpawnError::BadElf)?;
        if header.p_filesz > header.p_memsz || file_end > image.len() as u64 {
            return Err(SpawnError::BadElf);
        }
        let mem_end = header.p_vaddr.checked_add(header.p_memsz).ok_or(SpawnError::BadSegmentAddress)?;
        if header.p_vaddr < USER_IMAGE_BASE || mem_end > USER_IMAGE_LIMIT {
            return Err(SpawnError::BadSegmentAddress);
        }
        let segment = Segment {
            vaddr: header.p_vaddr,
            mem_len: header.p_memsz,
            file_offset: header.p_offset,
            file_len: header.p_filesz,
            rights,
        };
        // Segments with different rights must not share a page.
        let overlaps = segments[..count].iter().flatten().any(|other: &Segment| {
            segment.first_page() < other.end_page() && other.first_page() < segment.end_page()
        });
        if overlaps {
            return Err(SpawnError::BadSegmentAddress);
        }
        segments[count] = Some(segment);
        count += 1;
    }
    if count == 0 {
        return Err(SpawnError::BadElf);
    }
    let entry = header.e_entry;
    let entry_ok = segments
        .iter()
        .flatten()
        .any(|s| s.rights.execute && s.vaddr <= entry && entry < s.vaddr + s.mem_len);
    if !entry_ok {
        return Err(SpawnError::BadEntryPoint);
    }
    Ok(LoadPlan { entry, segments })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Builds a minimal ELF64 executable with the given (vaddr, memsz, filesz,
    /// flags) load segments; segment data is filled with 0xAB.
    pub(crate) fn build_elf(entry: u64, segments: &[(u64, u64, u64, u32)]) -> Vec<u8> {
        let phoff = 64u64;
        let data_start = phoff + 56 * segments.len() as u64;
        let mut out = vec![0u8; data_start as usize];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2; // ELFCLASS64
        out[5] = 1; // little endian
        out[6] = 1; // EV_CURRENT
        out[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        out[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        out[20..24].copy_from_slice(&1u32.to_le_bytes());
        out[24..32].copy_from_slice(&entry.to_le_bytes());
        out[32..40].copy_from_slice(&phoff.to_le_bytes());
        out[52..54].copy_from_slice(&64u16.to_le_bytes());
        out[54..56].copy_from_slice(&56u16.to_le_bytes());
        out[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        let mut offset = data_start;
        for (i, &(vaddr, memsz, filesz, flags)) in segments.iter().enumerate() {
            let ph = &mut out[(phoff as usize + 56 * i)..(phoff as usize + 56 * (i + 1))];
            ph[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
            ph[4..8].copy_from_slice(&flags.to_le_bytes());
            ph[8..16].copy_from_slice(&offset.to_le_bytes());
            ph[16..24].copy_from_slice(&vaddr.to_le_bytes());
            ph[24..32].copy_from_slice(&vaddr.to_le_bytes());
            ph[32..40].copy_from_slice(&filesz.to_le_bytes());
            ph[40..48].copy_from_slice(&memsz.to_le_bytes());
            ph[48..56].copy_from_slice(&PAGE_SIZE.to_le_bytes());
            offset += filesz;
        }
        out.resize(offset as usize, 0xAB);
        out
    }

    const RX: u32 = PF_R | PF_X;
    const RW: u32 = PF_R | PF_W;

    #[test]
    fn accepts_a_well_formed_image() {
        let image = build_elf(0x40_0010, &[(0x40_0000, 0x100, 0x100, RX), (0x40_1000, 0x2000, 0x10, RW)]);
        let plan = check_user_image(&image).unwrap();
        assert_eq!(plan.entry, 0x40_0010);
        assert_eq!(plan.segments().count(), 2);
        assert_eq!(plan.virtual_bytes(), 3 * PAGE_SIZE);
    }

    #[test]
    fn refuses_writable_and_executable_segments() {
        let image = build_elf(0x40_0000, &[(0x40_0000, 0x100, 0x100, PF_R | PF_W | PF_X)]);
        assert_eq!(check_user_image(&image), Err(SpawnError::WritableAndExecutable));
    }

    #[test]
    fn refuses_segments_outside_the_image_window_or_overlapping() {
        let kernel_half = build_elf(0xffff_8000_0000_0000, &[(0xffff_8000_0000_0000, 0x100, 0x100, RX)]);
        assert_eq!(check_user_image(&kernel_half), Err(SpawnError::BadSegmentAddress));
        let low = build_elf(0x1000, &[(0x1000, 0x100, 0x100, RX)]);
        assert_eq!(check_user_image(&low), Err(SpawnError::BadSegmentAddress));
        let wrapping = build_elf(0x40_0000, &[(0x40_0000, u64::MAX, 0x10, RX)]);
        assert_eq!(check_user_image(&wrapping), Err(SpawnError::BadSegmentAddress));
        let shared_page =
            build_elf(0x40_0000, &[(0x40_0000, 0x100, 0x100, RX), (0x40_0800, 0x100, 0x100, RW)]);
        assert_eq!(check_user_image(&shared_page), Err(SpawnError::BadSegmentAddress));
    }

    #[test]
    fn refuses_entry_outside_code_and_bad_headers() {
        let entry_in_data =
            build_elf(0x40_1000, &[(0x40_0000, 0x100, 0x100, RX), (0x40_1000, 0x100, 0x100, RW)]);
        assert_eq!(check_user_image(&entry_in_data), Err(SpawnError::BadEntryPoint));
        let mut wrong_machine = build_elf(0x40_0000, &[(0x40_0000, 0x100, 0x100, RX)]);
        wrong_machine[18] = 0xb7; // EM_AARCH64
        assert_eq!(check_user_image(&wrong_machine), Err(SpawnError::BadElf));
        let mut file_past_end = build_elf(0x40_0000, &[(0x40_0000, 0x100, 0x100, RX)]);
        file_past_end.truncate(file_past_end.len() - 1);
        assert_eq!(check_user_image(&file_past_end), Err(SpawnError::BadElf));
        assert_eq!(check_user_image(b"\x7fELF"), Err(SpawnError::BadElf));
        assert_eq!(check_user_image(&[]), Err(SpawnError::BadElf));
    }

    proptest! {
        /// Arbitrary bytes, and valid images with arbitrary corruption, never
        /// panic the checker; whatever it accepts obeys the plan's invariants.
        #[test]
        fn never_panics_and_accepted_plans_are_sound(
            flips in prop::collection::vec((0usize..400, any::<u8>()), 0..12),
            raw in prop::collection::vec(any::<u8>(), 0..300),
        ) {
            let _ = check_user_image(&raw);
            let mut image = build_elf(0x40_0010, &[(0x40_0000, 0x100, 0x100, RX), (0x40_1000, 0x2000, 0x10, RW)]);
            for (at, value) in flips {
                let len = image.len();
                image[at % len] = value;
            }
            if let Ok(plan) = check_user_image(&image) {
                for s in plan.segments() {
                    prop_assert!(!(s.rights.write && s.rights.execute));
                    prop_assert!(s.vaddr >= USER_IMAGE_BASE && s.vaddr + s.mem_len <= USER_IMAGE_LIMIT);
                    prop_assert!(s.file_offset + s.file_len <= image.len() as u64);
                    prop_assert!(s.file_len <= s.mem_len);
                }
            }
        }
    }
}
