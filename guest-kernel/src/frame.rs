//! Physical frame allocator.
//!
//! Frames come from two places: a bump cursor over the usable RAM ranges of the
//! boot memory map, which hands out frames nobody has touched since the VMM
//! created guest memory (so they are known to be zero), and a stack of frames
//! that were freed. Both operations are O(1) and the allocator needs no
//! initialisation pass over memory, which matters when every ring-0 instruction
//! is emulated (see `shared/kvm-host-notes.md`).
//!
//! Invariant: a frame is handed out at most once until it is freed; freeing a
//! frame that is not allocated (double free, or a frame outside the managed
//! ranges) is refused with an error instead of corrupting the free stack.
//!
//! Scrubbing is the caller's job and happens *before* [`FrameAllocator::free`]:
//! every frame on the free stack is zero, so every frame handed out is zero.

use superos_protocol::layout::PAGE_SIZE;

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
    /// Index of this range's first frame in the `allocated` bitmap.
    first_index: u64,
}

/// The frame allocator. Storage for the free stack and the allocation bitmap is
/// borrowed so that the kernel can carve it out of guest memory at boot and the
/// host tests can use plain vectors.
pub struct FrameAllocator<'a> {
    ranges: [Range; MAX_RANGES],
    range_count: usize,
    /// Index of the first range whose bump cursor is not exhausted.
    bump_range: usize,
    free_stack: &'a mut [u32],
    free_top: usize,
    allocated: &'a mut [u64],
    total: u64,
    in_use: u64,
}

impl<'a> FrameAllocator<'a> {
    /// Number of `u32` stack slots and `u64` bitmap words needed to manage
    /// `frames` frames.
    pub const fn storage_words(frames: u64) -> (usize, usize) {
        (frames as usize, frames.div_ceil(64) as usize)
    }

    /// Creates an allocator over the page-aligned `ranges` (start, end), which
    /// must be sorted and disjoint. The bitmap storage must be zeroed. Ranges
    /// beyond [`MAX_RANGES`], or beyond what the storage can manage, are ignored.
    pub fn new(ranges: &[(u64, u64)], free_stack: &'a mut [u32], allocated: &'a mut [u64]) -> Self {
        let mut allocator = FrameAllocator {
            ranges: [Range::default(); MAX_RANGES],
            range_count: 0,
            bump_range: 0,
            free_stack,
            free_top: 0,
            allocated,
            total: 0,
            in_use: 0,
        };
        let capacity = (allocator.free_stack.len() as u64).min(allocator.allocated.len() as u64 * 64);
        for &(start, end) in ranges.iter().take(MAX_RANGES) {
            let start = start.next_multiple_of(PAGE_SIZE);
            let end = end & !(PAGE_SIZE - 1);
            if end <= start || allocator.total >= capacity {
                continue;
            }
            let frames = ((end - start) / PAGE_SIZE).min(capacity - allocator.total);
            allocator.ranges[allocator.range_count] = Range {
                start,
                end: start + frames * PAGE_SIZE,
                cursor: start,
                first_index: allocator.total,
            };
            allocator.range_count += 1;
            allocator.total += frames;
        }
        allocator
    }

    /// Allocates one zeroed frame, or `None` when memory is exhausted.
    pub fn alloc(&mut self) -> Option<u64> {
        let frame = if self.free_top > 0 {
            self.free_top -= 1;
            u64::from(self.free_stack[self.free_top]) * PAGE_SIZE
        } else {
            self.bump()?
        };
        let (word, bit) = self.bit_of(frame).expect("allocated frames are managed");
        self.allocated[word] |= bit;
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
        let (word, bit) = self.bit_of(frame).ok_or(FreeError::NotManaged(frame))?;
        if self.allocated[word] & bit == 0 {
            return Err(FreeError::DoubleFree(frame));
        }
        self.allocated[word] &= !bit;
        // Cannot overflow: at most `total` frames are allocated at once and the
        // stack has room for `total` entries.
        self.free_stack[self.free_top] = (frame / PAGE_SIZE) as u32;
        self.free_top += 1;
        self.in_use -= 1;
        Ok(())
    }

    /// Returns true if `frame` is managed by this allocator and currently allocated.
    pub fn is_allocated(&self, frame: u64) -> bool {
        self.bit_of(frame)
            .is_some_and(|(word, bit)| self.allocated[word] & bit != 0)
    }

    fn bit_of(&self, frame: u64) -> Option<(usize, u64)> {
        let range = self.ranges[..self.range_count]
            .iter()
            .find(|r| r.start <= frame && frame < r.end)?;
        let index = range.first_index + (frame - range.start) / PAGE_SIZE;
        Some(((index / 64) as usize, 1u64 << (index % 64)))
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

    fn storage(frames: u64) -> (Vec<u32>, Vec<u64>) {
        let (stack, words) = FrameAllocator::storage_words(frames);
        (vec![0; stack], vec![0; words])
    }

    #[test]
    fn hands_out_every_frame_once_then_runs_dry() {
        let (mut stack, mut bits) = storage(8);
        let mut alloc = FrameAllocator::new(&[(0x1000, 0x4000), (0x10000, 0x16000)], &mut stack, &mut bits);
        // Storage for 8 frames caps the 3 + 6 frames of the ranges.
        assert_eq!(alloc.total_frames(), 8);
        let frames: Vec<u64> = std::iter::from_fn(|| alloc.alloc()).collect();
        // Storage for 8 frames caps the second range.
        assert_eq!(
            frames,
            vec![0x1000, 0x2000, 0x3000, 0x10000, 0x11000, 0x12000, 0x13000, 0x14000]
        );
        assert_eq!(alloc.free_frames(), 0);
    }

    #[test]
    fn refuses_double_free_unaligned_and_foreign_frames() {
        let (mut stack, mut bits) = storage(4);
        let mut alloc = FrameAllocator::new(&[(0x1000, 0x5000)], &mut stack, &mut bits);
        let frame = alloc.alloc().unwrap();
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
        let (mut stack, mut bits) = storage(16);
        let alloc = FrameAllocator::new(&[(0x1001, 0x4fff), (0x8000, 0x8000)], &mut stack, &mut bits);
        assert_eq!(alloc.total_frames(), 2);
    }

    proptest! {
        /// Random alloc/free sequences never hand out a frame twice, never lose
        /// one, and keep the counters equal to the model.
        #[test]
        fn alloc_free_sequences_match_a_model(ops in prop::collection::vec(any::<(bool, u8)>(), 1..400)) {
            let (mut stack, mut bits) = storage(40);
            let mut alloc = FrameAllocator::new(&[(0x2000, 0x12000), (0x40000, 0x58000)], &mut stack, &mut bits);
            let mut held: Vec<u64> = Vec::new();
            for (is_alloc, pick) in ops {
                if is_alloc {
                    match alloc.alloc() {
                        Some(frame) => {
                            prop_assert!(!held.contains(&frame), "frame {frame:#x} handed out twice");
                            held.push(frame);
                        }
                        None => prop_assert_eq!(held.len() as u64, alloc.total_frames()),
                    }
                } else if !held.is_empty() {
                    let frame = held.swap_remove(pick as usize % held.len());
                    prop_assert_eq!(alloc.free(frame), Ok(()));
                }
                prop_assert_eq!(alloc.free_frames(), alloc.total_frames() - held.len() as u64);
            }
            for frame in held.drain(..) {
                prop_assert_eq!(alloc.free(frame), Ok(()));
            }
            let everything: BTreeSet<u64> = std::iter::from_fn(|| alloc.alloc()).collect();
            prop_assert_eq!(everything.len() as u64, alloc.total_frames());
        }
    }
}
