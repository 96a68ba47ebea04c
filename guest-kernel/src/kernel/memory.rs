//! Physical memory as the kernel reaches it: the direct map, the frame
//! allocator with its ownership table, and frame scrubbing.
//!
//! Scrubbing strategy: a freed frame is zeroed before it returns to the free
//! pool. On ordinary KVM the kernel zeroes it itself (`rep stosq`, ~100 ns a
//! page). On the PVM fork every ring-0 store is emulated (~270 us a page), so
//! freed frames are batched and handed to the VMM in one `ScrubFrames`
//! hypercall (one VM exit per batch, a host `memset` per frame); they stay
//! owned by their old owner until the VMM has zeroed them, so a frame marked
//! free is always zero.
//!
//! Teardown (issue 11, bounded kernel time): a dead process's address space
//! is buried here and torn down a slice at a time, one slice at every kernel
//! entry ([`KernelMemory::reap`]), so no exit or kill holds the CPU for
//! time proportional to the process's size. Its frames stay owned by the
//! dead pid, unmapped by anything live, until their slice frees them (a
//! destroyed region's frames likewise, still owned `Shared(id)`); an
//! allocation that finds no free frame reaps everything first, and so does
//! the shutdown, so nothing is lost or refused for it.

use super::host::scrub_frames;
use super::introspect::PROCESS_CAPACITY;
use crate::address_space::{AddressSpace, Memory};
use crate::arch::{cpu, KernelCell};
use crate::frame::FrameAllocator;
use crate::paging::PageTableMemory;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};
use superos_protocol::hypercall::{SCRUB_BATCH_MAX, STATUS_OK};
use superos_protocol::layout::{DIRECT_MAP_BASE, KERNEL_VMA_BASE, PAGE_SIZE};
use superos_protocol::ownership::FrameOwner;
use superos_protocol::syscall::{SHM_MAX, SHM_REGIONS_MAX};
use x86_64::structures::paging::PageTable;

/// Kernel virtual address of guest-physical `phys` in the direct map.
pub fn direct<T>(phys: u64) -> *mut T {
    (DIRECT_MAP_BASE + phys) as *mut T
}

/// Guest-physical address of a kernel-image virtual address (statics).
#[inline(always)]
pub fn image_gpa<T>(pointer: *const T) -> u64 {
    pointer as u64 - KERNEL_VMA_BASE
}

/// Zeroes one frame through the direct map.
pub fn zero_frame(frame: u64) {
    // SAFETY: `frame` is a whole guest-RAM frame owned by the caller, reached
    // through the direct map, which covers all of guest RAM.
    unsafe { core::ptr::write_bytes(direct::<u8>(frame), 0, PAGE_SIZE as usize) };
}

/// How many of the `count` words at `words` are zero before the first
/// nonzero one (`count` if all are): one `repe scasq`, one emulated
/// instruction on the PVM host, where a loop costs ~6 per word.
///
/// # Safety
///
/// `words..words + count` must be readable: words of one guest-RAM frame,
/// reached through the direct map.
unsafe fn zero_words(words: *const u64, count: usize) -> usize {
    if count == 0 {
        // With rcx = 0 `repe scasq` compares nothing and leaves ZF as it was.
        return 0;
    }
    let left: usize;
    let zero: u8;
    // SAFETY: the caller's (the words are readable); DF is clear in the
    // kernel (trap_common resets RFLAGS). `repe scasq` stops after the first
    // nonzero word (ZF clear) with rcx counting the words not yet compared.
    unsafe {
        core::arch::asm!(
            "repe scasq",
            "sete {zero}",
            zero = out(reg_byte) zero,
            inout("rdi") words => _,
            inout("rcx") count => left,
            in("rax") 0u64,
            options(nostack, readonly),
        )
    };
    if zero != 0 {
        count
    } else {
        // The nonzero word was the last one compared.
        count - left - 1
    }
}

/// Whether every byte of `frame` is zero ([`zero_words`]).
fn frame_is_zero(frame: u64) -> bool {
    const WORDS: usize = (PAGE_SIZE / 8) as usize;
    // SAFETY: a whole guest-RAM frame, through the direct map, which covers
    // all of guest RAM.
    unsafe { zero_words(direct::<u64>(frame), WORDS) == WORDS }
}

/// Whether page-table scans use `repe scasq` ([`next_nonzero_word`]): on
/// the PVM host, where every ring-0 instruction is emulated and a `rep`
/// string instruction costs one. Elsewhere a plain loop is as fast, and
/// the nested host (QEMU TCG's SVM) is spared a `rep` instruction per scan
/// (its known L1 stall came more often once scans used one: an unproven
/// suspicion, see the stop-23 note).
static REP_SCANS: AtomicBool = AtomicBool::new(false);

/// Chooses how page-table scans run (once, at boot).
pub fn use_rep_scans(on: bool) {
    REP_SCANS.store(on, Ordering::Relaxed);
}

/// The index of the first nonzero word of `frame` in `from..to` (`from <=
/// to <= 512`), or `to`: one `repe scasq` ([`zero_words`]), or a plain
/// loop (see [`REP_SCANS`]).
#[inline(always)]
fn next_nonzero_word(frame: u64, from: usize, to: usize) -> usize {
    debug_assert!(from <= to && to <= (PAGE_SIZE / 8) as usize);
    if from >= to {
        return to;
    }
    if !REP_SCANS.load(Ordering::Relaxed) {
        // SAFETY: `frame` is a whole guest-RAM frame reached through the
        // direct map; words `from..to` lie inside it.
        let words = unsafe { core::slice::from_raw_parts(direct::<u64>(frame), (PAGE_SIZE / 8) as usize) };
        return words[from..to].iter().position(|&word| word != 0).map_or(to, |i| from + i);
    }
    // SAFETY: words `from..to` of a whole guest-RAM frame, through the
    // direct map.
    from + unsafe { zero_words(direct::<u64>(frame).add(from), to - from) }
}

/// Copies `bytes` into guest-physical memory at `phys`.
///
/// The range must lie in one frame the kernel owns or is filling on a
/// process's behalf (checked by the callers' page-table walks).
pub fn write_phys(phys: u64, bytes: &[u8]) {
    // SAFETY: the direct map covers all guest RAM; callers pass ranges inside
    // frames they hold (see above), which no Rust reference aliases.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), direct::<u8>(phys), bytes.len()) };
}

/// Copies guest-physical memory at `phys` into `out`.
pub fn read_phys(phys: u64, out: &mut [u8]) {
    // SAFETY: as for `write_phys`.
    unsafe { core::ptr::copy_nonoverlapping(direct::<u8>(phys), out.as_mut_ptr(), out.len()) };
}

/// Copies `len` bytes between guest-physical ranges.
pub fn copy_phys(from: u64, to: u64, len: u64) {
    // SAFETY: as for `write_phys`; the ranges belong to different frames.
    unsafe { core::ptr::copy_nonoverlapping(direct::<u8>(from), direct::<u8>(to), len as usize) };
}

/// How freed frames are zeroed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scrub {
    /// By the kernel, immediately.
    InKernel,
    /// By the VMM, in batches.
    ByHypercall,
}

static SCRUB_LIST: KernelCell<[u64; SCRUB_BATCH_MAX as usize]> =
    KernelCell::new([0; SCRUB_BATCH_MAX as usize]);

/// Guest physical memory: frames, their owners, and scrubbing.
pub struct KernelMemory {
    /// The frame allocator and ownership table.
    pub frames: FrameAllocator<'static>,
    scrub: Scrub,
    pending: usize,
    /// Frames scrubbed so far (statistics).
    pub scrubbed: u64,
    /// `DEBUG_SKIP_ONE_SCRUB`: the next non-zero frame released is freed
    /// as it is.
    pub skip_one_scrub: bool,
    /// What is being torn down (at most [`DYING_MAX`]).
    dying: Vec<Dying>,
    /// Frames in `dying`'s frame lists (at most [`DYING_FRAMES_MAX`]).
    dying_frames: usize,
}

/// Frames waiting in destroyed regions' lists at most, one largest region's
/// (beyond, what waits is released at once first): with [`DYING_MAX`], what
/// the teardown may hold of the kernel heap (counted in the heap bound,
/// `kernel/mod.rs`).
pub const DYING_FRAMES_MAX: usize = (SHM_MAX / PAGE_SIZE) as usize;

/// Teardown work pending at most at once: every process's address space
/// and every region's frames (beyond, the oldest is finished at once).
pub const DYING_MAX: usize = PROCESS_CAPACITY + SHM_REGIONS_MAX;

/// Something being torn down a slice at a time.
pub enum Dying {
    /// The address space of a process that is gone, and where the next
    /// slice starts.
    Space(AddressSpace, u64),
    /// Frames mapped nowhere any more (a destroyed region's), the first
    /// `.1` released already.
    Frames(Vec<u64>, usize),
}

impl KernelMemory {
    /// Wraps the allocator.
    pub fn new(frames: FrameAllocator<'static>, scrub: Scrub) -> Self {
        KernelMemory {
            frames,
            scrub,
            pending: 0,
            scrubbed: 0,
            skip_one_scrub: false,
            dying: Vec::new(),
            dying_frames: 0,
        }
    }

    /// Takes the address space of a process that is gone (its CR3 no longer
    /// live anywhere) for teardown in slices.
    pub fn bury(&mut self, mut space: AddressSpace) {
        space.release_map();
        self.push_dying(Dying::Space(space, 0));
    }

    fn push_dying(&mut self, dying: Dying) {
        if self.dying.len() >= DYING_MAX {
            self.reap_all();
        }
        self.dying.push(dying);
    }

    /// One slice of teardown, at most `budget` units (as `mem_unmap`: 17 a
    /// frame released). Called at the end of every kernel entry: the common
    /// case, nothing to do, costs a test.
    #[inline(always)]
    pub fn reap(&mut self, budget: u64) {
        if !self.dying.is_empty() {
            self.reap_slice(budget);
        }
    }

    #[inline(never)]
    fn reap_slice(&mut self, budget: u64) {
        match self.dying.pop() {
            None => {}
            Some(Dying::Space(mut space, from)) => {
                if let Some(resume) = space.destroy_slice(self, from, budget) {
                    self.dying.push(Dying::Space(space, resume));
                }
            }
            Some(Dying::Frames(frames, done)) => {
                let per_frame = crate::paging::ENTRY_UNITS + crate::paging::PRESENT_UNITS;
                let count = usize::try_from(budget / per_frame).unwrap_or(usize::MAX).max(1);
                let end = frames.len().min(done.saturating_add(count));
                for &frame in &frames[done..end] {
                    self.release_frame(frame);
                }
                self.dying_frames -= end - done;
                if end < frames.len() {
                    self.dying.push(Dying::Frames(frames, end));
                }
            }
        }
    }

    /// Finishes every teardown.
    pub fn reap_all(&mut self) {
        while !self.dying.is_empty() {
            self.reap(u64::MAX);
        }
    }

    /// Whether teardown work is pending.
    pub fn reaping(&self) -> bool {
        !self.dying.is_empty()
    }

    /// Which strategy is in use.
    pub fn strategy(&self) -> Scrub {
        self.scrub
    }

    /// Zeroes and frees every frame waiting for the VMM. Called at the end
    /// of every kernel entry: the common case, none, costs a test.
    #[inline(always)]
    pub fn flush_scrub(&mut self) {
        if self.pending != 0 {
            self.flush_scrub_pending();
        }
    }

    #[inline(never)]
    fn flush_scrub_pending(&mut self) {
        // SAFETY: KernelCell invariant; the list is only used here and in
        // release_frame, never at the same time.
        let list = unsafe { SCRUB_LIST.get() };
        let batch = &list[..self.pending];
        if scrub_frames(batch) != STATUS_OK {
            // The VMM refused: never hand out a dirty frame, zero them here.
            batch.iter().for_each(|&frame| zero_frame(frame));
        }
        for &frame in batch {
            self.free_zeroed(frame);
        }
        self.pending = 0;
    }

    /// Releases a frame of which only the first `dirty` bytes were ever
    /// written (message frames). Small prefixes are cheaper to zero here than
    /// to send to the VMM, whatever the strategy.
    pub fn release_dirty_prefix(&mut self, frame: u64, dirty: u64) {
        const ZERO_IN_KERNEL_UP_TO: u64 = 512;
        if dirty <= ZERO_IN_KERNEL_UP_TO {
            // SAFETY: the frame is owned by the caller and lies in guest RAM,
            // which the direct map covers.
            unsafe { core::ptr::write_bytes(direct::<u8>(frame), 0, dirty as usize) };
            self.free_zeroed(frame);
        } else {
            self.release_frame(frame);
        }
    }

    fn free_zeroed(&mut self, frame: u64) {
        if let Err(error) = self.frames.free(frame) {
            panic!("freeing frame {frame:#x}: {error:?}");
        }
        self.scrubbed += 1;
    }
}

impl Memory for KernelMemory {
    fn table(&mut self, frame: u64) -> &mut PageTable {
        // SAFETY: `frame` holds a kernel-built page table (reached from a PML4 it owns), direct-mapped;
        // the paging code holds one table reference at a time.
        unsafe { &mut *direct::<PageTable>(frame) }
    }

    fn alloc_frame(&mut self, owner: FrameOwner) -> Option<u64> {
        self.frames.alloc(owner).or_else(|| {
            // Frames waiting to be scrubbed, and those of dead processes not
            // yet torn down, are memory too.
            self.flush_scrub();
            self.frames.alloc(owner).or_else(|| {
                if !self.reaping() {
                    return None;
                }
                self.reap_all();
                self.flush_scrub();
                self.frames.alloc(owner)
            })
        })
    }

    fn table_is_empty(&mut self, frame: u64) -> bool {
        frame_is_zero(frame)
    }

    #[inline(always)]
    fn next_used(&mut self, frame: u64, from: usize, to: usize) -> usize {
        next_nonzero_word(frame, from, to)
    }

    fn release_frame(&mut self, frame: u64) {
        if self.skip_one_scrub && !frame_is_zero(frame) {
            // DEBUG_SKIP_ONE_SCRUB: the fault the checker must catch.
            self.skip_one_scrub = false;
            self.free_zeroed(frame);
            return;
        }
        match self.scrub {
            Scrub::InKernel => {
                zero_frame(frame);
                self.free_zeroed(frame);
            }
            Scrub::ByHypercall => {
                if self.pending == SCRUB_BATCH_MAX as usize {
                    self.flush_scrub();
                }
                // SAFETY: KernelCell invariant (see flush_scrub).
                let list = unsafe { SCRUB_LIST.get() };
                list[self.pending] = frame;
                self.pending += 1;
            }
        }
    }

    fn owner(&self, frame: u64) -> Option<FrameOwner> {
        self.frames.owner(frame)
    }

    fn heap_room(&self, bytes: usize) -> bool {
        super::heap_free().saturating_sub(bytes) >= super::HEAP_RESERVE
    }

    fn release_frames_later(&mut self, frames: Vec<u64>) {
        if self.dying_frames + frames.len() > DYING_FRAMES_MAX {
            self.reap_all();
        }
        if frames.len() > DYING_FRAMES_MAX {
            frames.into_iter().for_each(|frame| self.release_frame(frame));
        } else if !frames.is_empty() {
            self.dying_frames += frames.len();
            self.push_dying(Dying::Frames(frames, 0));
        }
    }

    fn flush(&mut self, pml4: u64, va: u64) {
        if cpu::read_cr3() & !0xfff == pml4 {
            cpu::invlpg(va);
        }
        super::smp::shootdown(super::smp::BIG_LOCK.owner(), pml4);
    }

    fn loaded_anywhere(&mut self, pml4: u64) -> bool {
        cpu::read_cr3() & !0xfff == pml4 || super::smp::loaded_elsewhere(super::smp::BIG_LOCK.owner(), pml4)
    }

    fn flush_all(&mut self, pml4: u64) {
        let cr3 = cpu::read_cr3();
        if cr3 & !0xfff == pml4 {
            // SAFETY: reloads the live tables unchanged: only the TLB's
            // non-global entries go (the kernel's are global or re-read).
            unsafe { cpu::write_cr3(cr3 & !0xfff) };
        }
        super::smp::shootdown(super::smp::BIG_LOCK.owner(), pml4);
    }
}

/// The kernel's own page tables: table frames are owned by the kernel.
pub struct KernelTables<'a>(pub &'a mut KernelMemory);

impl PageTableMemory for KernelTables<'_> {
    fn table(&mut self, frame: u64) -> &mut PageTable {
        self.0.table(frame)
    }
    fn alloc_table(&mut self) -> Option<u64> {
        self.0.alloc_frame(FrameOwner::Kernel)
    }
    fn free_table(&mut self, frame: u64) {
        self.0.release_frame(frame);
    }
    fn table_is_empty(&mut self, frame: u64) -> bool {
        frame_is_zero(frame)
    }

    #[inline(always)]
    fn next_used(&mut self, frame: u64, from: usize, to: usize) -> usize {
        next_nonzero_word(frame, from, to)
    }
}
