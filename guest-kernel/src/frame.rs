//! Physical frame allocator and the frame-ownership table.
//!
//! Frames come from two places: a bump cursor over the usable RAM ranges of the
//! boot memory map, which hands out frames nobody has touched since the VMM
//! created guest memory (so they are known to be zero), and a stack of frames
//! that were freed. Both operations are O(1) and the allocator needs no
//! initialisation pass over memory, which matters when every ring-0 instruction
//! is emulated (see `shared/kvm-host-notes.md`).
//!
//! Every managed frame has a [`FrameOwner`] in the ownership table (one `u32`
//! per frame, encoded with [`FrameOwner::encode`]), which is also what the VMM
//! reads to check the kernel from outside.
//!
//! Invariants: a frame is handed out at most once until it is freed, and gets
//! its owner at that moment; the owner never changes while it is allocated;
//! freeing a frame that is not allocated (double free, or a frame outside the
//! managed ranges) is refused instead of corrupting the free stack.
//! Scrubbing is the caller's job and happens *before* [`FrameAllocator::free`]:
//! every frame on the free stack is zero, so every frame handed out is zero.

use superos_protocol::layout::PAGE_SIZE;
use superos_protocol::ownership::FrameOwner;

/// Most disjoint usable ranges the allocator tracks.
pub const MAX_RANGES: usize = 16;

/// Why a free was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreeError {
    /// The address is not page-aligned.
    Unaligned(u64),
    /// The frame is not in any managed range.
    NotManaged(u64),
    /// The frame is already free.
    DoubleFree(u64),
}

#[derive(Clone, Copy, Debug, Default)]
struct Range {
    start: u64,
    end: u64,
    /// First frame of this range the bump cursor has not handed out yet.
    cursor: u64,
    /// Index of this range's first frame in the ownership table.
    first_index: u64,
}

/// The frame allocator. Storage for the free stack and the ownership table is
/// borrowed so that the kernel can carve it out of guest memory at boot and the
/// host tests can use plain vectors.
pub struct FrameAllocator<'a> {
    ranges: [Range; MAX_RANGES],
    range_count: usize,
    /// Index of the first range whose bump cursor is not exhausted.
    bump_range: usize,
    free_stack: &'a mut [u32],
    free_top: usize,
    owners: &'a mut [u32],
    total: u64,
    in_use: u64,
}

impl<'a> FrameAllocator<'a> {
    /// Number of `u32` entries the free stack and the ownership table each need
    /// to manage `frames` frames.
    pub const fn storage_entries(frames: u64) -> usize {
        frames as usize
    }

    /// Creates an allocator over the page-aligned `ranges` (start, end), which
    /// must be sorted and disjoint. The ownership storage must be zeroed (all
    /// frames free). Ranges beyond [`MAX_RANGES`], or beyond what the storage
    /// can manage, are ignored.
    pub fn new(ranges: &[(u64, u64)], free_stack: &'a mut [u32], owners: &'a mut [u32]) -> Self {
        let mut allocator = FrameAllocator {
            ranges: [Range::default(); MAX_RANGES],
            range_count: 0,
            bump_range: 0,
            free_stack,
            free_top: 0,
            owners,
            total: 0,
            in_use: 0,
        };
        let capacity = allocator.free_stack.len().min(allocator.owners.len()) as u64;
        for &(start, end) in ranges.iter().take(MAX_RANGES) {
            let start = start.next_multiple_of(PAGE_SIZE);
            let end = end & !(PAGE_SIZE - 1);
            if end <= start || allocator.total >= capacity {
                continue;
            }
            let frames = ((end - start) / PAGE_SIZE).min(capacity - allocator.total);
            allocator.ranges[allocator.range_count] =
                Range { start, end: start + frames * PAGE_SIZE, cursor: start, first_index: allocator.total };
            allocator.range_count += 1;
            allocator.total += frames;
        }
        allocator
    }

    /// Allocates one zeroed frame for `owner`, or `None` when memory is
    /// exhausted. `owner` must not be [`FrameOwner::Free`].
    pub fn alloc(&mut self, owner: FrameOwner) -> Option<u64> {
        debug_assert!(!owner.is_free());
        let frame = if self.free_top > 0 {
            self.free_top -= 1;
            u64::from(self.free_stack[self.free_top]) * PAGE_SIZE
        } else {
            self.bump()?
        };
        let index = self.index_of(frame).expect("allocated frames are managed");
        self.owners[index] = owner.encode();
        self.in_use += 1;
        Some(frame)
    }

    fn bump(&mut self) -> Option<u64> {
        while self.bump_range < self.range_count {
            let range = &mut self.ranges[self.bump_range];
            if range.cursor < range.end {
                let frame = range.cursor;
                range.cursor += PAGE_SIZE;
                return Some(frame);
            }
            self.bump_range += 1;
        }
        None
    }

    /// Returns a frame to the pool. The caller must have scrubbed it.
    pub fn free(&mut self, frame: u64) -> Result<(), FreeError> {
        if frame % PAGE_SIZE != 0 {
            return Err(FreeError::Unaligned(frame));
        }
        let index = self.index_of(frame).ok_or(FreeError::NotManaged(frame))?;
        if self.owners[index] == FrameOwner::Free.encode() {
            return Err(FreeError::DoubleFree(frame));
        }
        self.owners[index] = FrameOwner::Free.encode();
        // Cannot overflow: at most `total` frames are allocated at once and the
        // stack has room for `total` entries.
        self.free_stack[self.free_top] = (frame / PAGE_SIZE) as u32;
        self.free_top += 1;
        self.in_use -= 1;
        Ok(())
    }

    /// The owner of a managed frame (`None` if the frame is not managed, or
    /// if its table entry is corrupt).
    pub fn owner(&self, frame: u64) -> Option<FrameOwner> {
        FrameOwner::decode(self.owners[self.index_of(frame)?])
    }

    fn index_of(&self, frame: u64) -> Option<usize> {
        let range = self.ranges[..self.range_count].iter().find(|r| r.start <= frame && frame < r.end)?;
        Some((range.first_index + (frame - range.start) / PAGE_SIZE) as usize)
    }

    /// The managed ranges as (start, end, index in the ownership table of
    /// `start`), in table order.
    pub fn indexed_ranges(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.ranges[..self.range_count].iter().map(|r| (r.start, r.end, r.first_index))
    }

    /// Frames managed in total.
    pub fn total_frames(&self) -> u64 {
        self.total
    }

    /// Frames currently free.
    pub fn free_frames(&self) -> u64 {
        self.total - self.in_use
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn storage(frames: u64) -> (Vec<u32>, Vec<u32>) {
        let entries = FrameAllocator::storage_entries(frames);
        (vec![0; entries], vec![0; entries])
    }

    const OWNER: FrameOwner = FrameOwner::Private(1);

    #[test]
    fn hands_out_every_frame_once_then_runs_dry() {
        let (mut stack, mut owners) = storage(8);
        let mut alloc = FrameAllocator::new(&[(0x1000, 0x4000), (0x10000, 0x16000)], &mut stack, &mut owners);
        // Storage for 8 frames caps the 3 + 6 frames of the ranges.
        assert_eq!(alloc.total_frames(), 8);
        let frames: Vec<u64> = std::iter::from_fn(|| alloc.alloc(OWNER)).collect();
        assert_eq!(frames, vec![0x1000, 0x2000, 0x3000, 0x10000, 0x11000, 0x12000, 0x13000, 0x14000]);
        assert_eq!(alloc.free_frames(), 0);
    }

    #[test]
    fn owners_are_recorded_and_released() {
        let (mut stack, mut owners) = storage(4);
        let mut alloc = FrameAllocator::new(&[(0x1000, 0x5000)], &mut stack, &mut owners);
        let table = alloc.alloc(FrameOwner::PageTable(3)).unwrap();
        let page = alloc.alloc(FrameOwner::Private(3)).unwrap();
        assert_eq!(alloc.owner(table), Some(FrameOwner::PageTable(3)));
        assert_eq!(alloc.owner(page), Some(FrameOwner::Private(3)));
        assert_eq!(alloc.owner(0x4000), Some(FrameOwner::Free));
        assert_eq!(alloc.owner(0x9000), None);
        alloc.free(page).unwrap();
        assert_eq!(alloc.owner(page), Some(FrameOwner::Free));
        // The freed frame is reused first and takes its new owner.
        assert_eq!(alloc.alloc(FrameOwner::Kernel), Some(page));
        assert_eq!(alloc.owner(page), Some(FrameOwner::Kernel));
    }

    #[test]
    fn refuses_double_free_unaligned_and_foreign_frames() {
        let (mut stack, mut owners) = storage(4);
        let mut alloc = FrameAllocator::new(&[(0x1000, 0x5000)], &mut stack, &mut owners);
        let frame = alloc.alloc(OWNER).unwrap();
        assert_eq!(alloc.free(frame), Ok(()));
        assert_eq!(alloc.free(frame), Err(FreeError::DoubleFree(frame)));
        assert_eq!(alloc.free(0x1234), Err(FreeError::Unaligned(0x1234)));
        assert_eq!(alloc.free(0x9000), Err(FreeError::NotManaged(0x9000)));
        // A never-allocated but managed frame is also a double free.
        assert_eq!(alloc.free(0x4000), Err(FreeError::DoubleFree(0x4000)));
        assert_eq!(alloc.free_frames(), 4);
    }

    #[test]
    fn unaligned_ranges_are_trimmed_to_whole_frames() {
        let (mut stack, mut owners) = storage(16);
        let alloc = FrameAllocator::new(&[(0x1001, 0x4fff), (0x8000, 0x8000)], &mut stack, &mut owners);
        assert_eq!(alloc.total_frames(), 2);
    }

    proptest! {
        /// Random alloc/free sequences never hand out a frame twice, never lose
        /// one, keep the counters equal to the model, and the ownership table
        /// names exactly the frames held.
        #[test]
        fn alloc_free_sequences_match_a_model(ops in prop::collection::vec(any::<(bool, u8)>(), 1..400)) {
            let (mut stack, mut owners) = storage(40);
            let mut alloc = FrameAllocator::new(&[(0x2000, 0x12000), (0x40000, 0x58000)], &mut stack, &mut owners);
            let mut held: Vec<(u64, FrameOwner)> = Vec::new();
            for (is_alloc, pick) in ops {
                if is_alloc {
                    let owner = FrameOwner::Private(u32::from(pick % 5) + 1);
                    match alloc.alloc(owner) {
                        Some(frame) => {
                            prop_assert!(!held.iter().any(|h| h.0 == frame), "frame {frame:#x} handed out twice");
                            held.push((frame, owner));
                        }
                        None => prop_assert_eq!(held.len() as u64, alloc.total_frames()),
                    }
                } else if !held.is_empty() {
                    let (frame, _) = held.swap_remove(pick as usize % held.len());
                    prop_assert_eq!(alloc.free(frame), Ok(()));
                }
                prop_assert_eq!(alloc.free_frames(), alloc.total_frames() - held.len() as u64);
            }
            for &(frame, owner) in &held {
                prop_assert_eq!(alloc.owner(frame), Some(owner));
            }
            for (frame, _) in held.drain(..) {
                prop_assert_eq!(alloc.free(frame), Ok(()));
            }
            let everything: BTreeSet<u64> = std::iter::from_fn(|| alloc.alloc(OWNER)).collect();
            prop_assert_eq!(everything.len() as u64, alloc.total_frames());
        }
    }
}
