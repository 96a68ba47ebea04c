//! A process's address space: the kernel's record of its regions, the page
//! tables that implement them, and its memory accounting against its quotas.
//!
//! This module decides everything about user memory that does not need the
//! CPU: where `mem_map` puts a mapping, whether an access is a demand-zero
//! fault to serve or a violation to punish, what `mem_unmap` and
//! `mem_protect` may do, and which frames a process owns. It reaches memory
//! only through the [`Memory`] trait, so it runs unchanged on the host in unit
//! and property tests.
//!
//! Invariants (checked by the property test at the bottom):
//! * regions are sorted and disjoint; every present user leaf lies inside a
//!   region of a kind that allows its rights (no W on code or read-only
//!   regions, NX everywhere but code and the gate);
//! * `resident_pages` equals the number of present leaves whose frame is
//!   owned `Private(pid)`; `virtual_bytes` equals the sum of the region sizes
//!   (guards and the gate excluded);
//! * the kernel alone picks virtual addresses: nothing here takes an address
//!   from user space except to find one of the caller's own mappings.

use crate::fault::{classify_page_fault, Region, RegionKind, PF_FETCH, PF_PRESENT, PF_WRITE};
use crate::paging::{self, PageSize, PageTableMemory, USER_TABLE_FLAGS};
use alloc::vec::Vec;
use superos_protocol::boot::{QuotaSpec, QUOTA_POLICY_KILL};
use superos_protocol::event::{FaultKind, QuotaKind};
use superos_protocol::layout::{
    GATE_VA, PAGE_SIZE, USER_HALF_END, USER_MMAP_BASE, USER_MMAP_LIMIT, USER_MMAP_MAX,
    USER_STACK_GUARD_PAGES, USER_STACK_PAGES, USER_STACK_TOP, USER_STATE_VA,
};
use superos_protocol::ownership::FrameOwner;
use superos_protocol::syscall::{
    MemStat, SysError, MAPPINGS_MAX, PROT_EXEC, PROT_READ, PROT_WRITE, REVOKED_MAX,
};
use x86_64::structures::paging::{PageTable, PageTableFlags as Flags};

/// What the address space needs from physical memory.
pub trait Memory {
    /// The page table stored in `frame`.
    fn table(&mut self, frame: u64) -> &mut PageTable;
    /// A zeroed frame owned by `owner`, or `None` when memory is exhausted.
    fn alloc_frame(&mut self, owner: FrameOwner) -> Option<u64>;
    /// Scrubs and frees a frame.
    fn release_frame(&mut self, frame: u64);
    /// Whether every entry of the table at `frame` is unused (see
    /// [`PageTableMemory::table_is_empty`]).
    fn table_is_empty(&mut self, frame: u64) -> bool {
        self.table(frame).iter().all(|entry| entry.is_unused())
    }
    /// See [`PageTableMemory::next_used`].
    fn next_used(&mut self, frame: u64, from: usize, to: usize) -> usize {
        paging::first_used(self.table(frame), from, to)
    }
    /// The recorded owner of a frame (`None` if not managed).
    fn owner(&self, frame: u64) -> Option<FrameOwner>;
    /// Invalidates any cached translation of `va` in the address space whose
    /// PML4 is `pml4`, on every CPU, before it returns: this CPU's if the
    /// space is live here, and every other CPU's where it is live (TLB
    /// shootdown, `kernel::smp`). Callers free a frame or table only after
    /// flushing every translation that reached it.
    fn flush(&mut self, pml4: u64, va: u64);
    /// Whether the kernel heap can spare `bytes` for bookkeeping a process
    /// asked for (a shared region's frame list) and still keep the reserve
    /// the kernel needs for its own work.
    fn heap_room(&self, bytes: usize) -> bool;
    /// Releases `frames` (mapped nowhere any more), now or a bounded number
    /// per kernel entry from now on (the kernel's teardown, issue 11); until
    /// then they keep their owner.
    fn release_frames_later(&mut self, frames: Vec<u64>) {
        for frame in frames {
            self.release_frame(frame);
        }
    }
    /// Invalidates every cached translation of the address space whose
    /// PML4 is `pml4`, on every CPU where it is live, before it returns.
    fn flush_all(&mut self, pml4: u64) {
        let _ = pml4;
    }
    /// Whether a CPU may hold translations of the address space whose PML4
    /// is `pml4`: it is loaded on one now. An address space no CPU has
    /// loaded has none cached anywhere (no PCIDs: a CR3 switch drops every
    /// translation of the space switched away from), so unlinking its pages
    /// needs no [`Memory::flush`]. `true` (flush) unless the memory knows.
    fn loaded_anywhere(&mut self, pml4: u64) -> bool {
        let _ = pml4;
        true
    }
}

/// Alignment of shared mappings: the span of one last-level page table.
pub const SHARED_ALIGN: u64 = 2 << 20;

/// Page tables of one process: table frames are owned `PageTable(pid)`.
/// `net` counts the table frames allocated minus those freed through it, so
/// the address space keeps its table count (charged to the resident quota)
/// exact.
struct Tables<'m, M: Memory> {
    memory: &'m mut M,
    pid: u32,
    net: i64,
    /// Last-level tables unlinked whole ([`paging::unmap_tables`]), to be
    /// released after the walk (later, by the kernel's teardown).
    detached: Vec<u64>,
}

impl<'m, M: Memory> Tables<'m, M> {
    fn new(memory: &'m mut M, pid: u32) -> Self {
        Tables { memory, pid, net: 0, detached: Vec::new() }
    }
}

impl<M: Memory> PageTableMemory for Tables<'_, M> {
    fn table(&mut self, frame: u64) -> &mut PageTable {
        self.memory.table(frame)
    }
    fn alloc_table(&mut self) -> Option<u64> {
        let frame = self.memory.alloc_frame(FrameOwner::PageTable(self.pid))?;
        self.net += 1;
        Some(frame)
    }
    fn free_table(&mut self, frame: u64) {
        self.memory.release_frame(frame);
        self.net -= 1;
    }
    fn table_is_empty(&mut self, frame: u64) -> bool {
        self.memory.table_is_empty(frame)
    }
    fn next_used(&mut self, frame: u64, from: usize, to: usize) -> usize {
        self.memory.next_used(frame, from, to)
    }
    fn detach_table(&mut self, frame: u64) {
        self.detached.push(frame);
        self.net -= 1;
    }
}

/// A process's quotas (0 = unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Quotas {
    /// Maximum virtual size in bytes.
    pub max_virtual: u64,
    /// Maximum resident size in bytes.
    pub max_resident: u64,
    /// Maximum shared memory in bytes.
    pub max_shared: u64,
    /// Terminate instead of failing the call on a violation.
    pub kill: bool,
}

impl From<QuotaSpec> for Quotas {
    fn from(spec: QuotaSpec) -> Self {
        Quotas {
            max_virtual: spec.max_virtual_bytes,
            max_resident: spec.max_resident_bytes,
            max_shared: spec.max_shared_bytes,
            kill: spec.policy == QUOTA_POLICY_KILL,
        }
    }
}

/// A refused request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A typed error for the caller.
    Error(SysError),
    /// A quota would be exceeded; what happens depends on the policy.
    Quota {
        /// Which quota.
        kind: QuotaKind,
        /// Bytes the request would bring the total to.
        requested: u64,
        /// The quota.
        limit: u64,
    },
}

impl From<SysError> for Refusal {
    fn from(error: SysError) -> Self {
        Refusal::Error(error)
    }
}

/// A physically contiguous piece of a user buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Guest-physical address.
    pub phys: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The pieces of a user buffer: at most two, because system calls limit
/// buffers to [`MAX_USER_BUFFER`] bytes. Fixed-size, so system-call paths
/// allocate nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Chunks {
    items: [Option<Chunk>; 2],
}

impl Chunks {
    fn push(&mut self, chunk: Chunk) {
        match &mut self.items {
            [first @ None, _] => *first = Some(chunk),
            [_, second @ None] => *second = Some(chunk),
            _ => panic!("at most two pieces"),
        }
    }

    /// The first `len` bytes of the buffer.
    pub fn truncated(&self, len: u64) -> Chunks {
        let mut out = Chunks::default();
        let mut left = len;
        for chunk in self.iter() {
            if left == 0 {
                break;
            }
            let take = chunk.len.min(left);
            out.push(Chunk { phys: chunk.phys, len: take });
            left -= take;
        }
        out
    }

    /// The pieces, in address order.
    pub fn iter(&self) -> impl Iterator<Item = Chunk> + '_ {
        self.items.iter().flatten().copied()
    }

    /// The physical pieces of the buffer's bytes `[offset, offset + len)`,
    /// in order (fewer bytes in all if the buffer ends first).
    pub fn range(&self, offset: u64, len: u64) -> impl Iterator<Item = Chunk> + '_ {
        let mut start = 0u64;
        self.iter().filter_map(move |chunk| {
            let (from, to) = (start.max(offset), (start + chunk.len).min(offset.saturating_add(len)));
            let piece = (from < to).then(|| Chunk { phys: chunk.phys + (from - start), len: to - from });
            start += chunk.len;
            piece
        })
    }
}

/// Largest user buffer a system call may name (so that it spans at most two
/// pages).
pub const MAX_USER_BUFFER: u64 = PAGE_SIZE;

/// Most entries a process map holds: [`MAPPINGS_MAX`] charged ones and
/// [`REVOKED_MAX`] revoked ranges (its vector's capacity never exceeds it).
pub const REGIONS_CAP: usize = MAPPINGS_MAX + REVOKED_MAX;

/// One process's address space.
pub struct AddressSpace {
    pid: u32,
    pml4: u64,
    /// Sorted, disjoint.
    regions: Vec<Region>,
    /// How many of them are revoked ranges (not charged to the process: at
    /// most [`REVOKED_MAX`], outside [`MAPPINGS_MAX`]).
    revoked: usize,
    virtual_bytes: u64,
    resident_pages: u64,
    /// Page-table frames of the user half, the PML4 included (owned
    /// `PageTable(pid)`): charged to the resident quota with the data pages.
    table_pages: u64,
    /// Shared bytes charged to this process: regions it created, plus regions
    /// of others it maps.
    shared_bytes: u64,
    quotas: Quotas,
    /// Whether 90% of the (virtual, resident) quota has been reported.
    pressure_reported: [bool; 2],
}

impl AddressSpace {
    /// A new address space for `pid`: a PML4 sharing the kernel half of
    /// `kernel_pml4`, the gate page mapped read-only and executable, and the
    /// stack region (demand-zero, with its guard) recorded. `None` if memory
    /// is exhausted.
    pub fn new<M: Memory>(
        memory: &mut M,
        pid: u32,
        kernel_pml4: u64,
        gate_frame: u64,
        quotas: Quotas,
    ) -> Option<AddressSpace> {
        let pml4 = memory.alloc_frame(FrameOwner::PageTable(pid))?;
        for slot in 256..512 {
            let entry = memory.table(kernel_pml4)[slot].clone();
            memory.table(pml4)[slot] = entry;
        }
        let stack_bottom = USER_STACK_TOP - USER_STACK_PAGES * PAGE_SIZE;
        let guard_bottom = stack_bottom - USER_STACK_GUARD_PAGES * PAGE_SIZE;
        let mut space = AddressSpace {
            pid,
            pml4,
            regions: Vec::new(),
            revoked: 0,
            virtual_bytes: 0,
            resident_pages: 0,
            table_pages: 1,
            shared_bytes: 0,
            quotas,
            pressure_reported: [false; 2],
        };
        space.regions.push(Region { start: guard_bottom, end: stack_bottom, kind: RegionKind::StackGuard });
        space.insert_region(Region { start: stack_bottom, end: USER_STACK_TOP, kind: RegionKind::Stack });
        space.regions.push(Region { start: GATE_VA, end: GATE_VA + PAGE_SIZE, kind: RegionKind::Gate });
        let gate = space.with_tables(memory, |tables, pml4| {
            paging::map(
                tables,
                pml4,
                GATE_VA,
                gate_frame,
                PageSize::Size4K,
                Flags::USER_ACCESSIBLE,
                USER_TABLE_FLAGS,
            )
        });
        if gate.is_err() {
            space.destroy(memory);
            return None;
        }
        Some(space)
    }

    /// The PML4's guest-physical address.
    pub fn pml4(&self) -> u64 {
        self.pml4
    }

    /// The regions, sorted by address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Virtual size in bytes (image, stack, mappings).
    pub fn virtual_bytes(&self) -> u64 {
        self.virtual_bytes
    }

    /// Resident pages owned by the process.
    pub fn resident_pages(&self) -> u64 {
        self.resident_pages
    }

    /// Page-table frames of the process (its PML4 included).
    pub fn table_pages(&self) -> u64 {
        self.table_pages
    }

    /// Pages charged to the resident quota: data pages and page tables.
    pub fn charged_pages(&self) -> u64 {
        self.resident_pages + self.table_pages
    }

    /// The resident size, in bytes, that faulting in the page at `addr`
    /// asks for: data pages and tables so far, the page, and the tables it
    /// needs (for the `QuotaDenied` event of a page fault).
    pub fn resident_request<M: Memory>(&mut self, memory: &mut M, addr: u64) -> u64 {
        let page = addr & !(PAGE_SIZE - 1);
        let tables = if superos_protocol::layout::is_user_range(page, PAGE_SIZE) {
            self.missing_tables(memory, page, page + PAGE_SIZE)
        } else {
            0
        };
        (self.charged_pages() + 1 + tables) * PAGE_SIZE
    }

    /// The process's quotas.
    pub fn quotas(&self) -> Quotas {
        self.quotas
    }

    /// Runs `f` on this process's page tables (and its PML4), keeping the
    /// table count exact.
    fn with_tables<M: Memory, R>(
        &mut self,
        memory: &mut M,
        f: impl FnOnce(&mut Tables<'_, M>, u64) -> R,
    ) -> R {
        let mut tables = Tables::new(memory, self.pid);
        let result = f(&mut tables, self.pml4);
        self.table_pages = self.table_pages.wrapping_add_signed(tables.net);
        let Tables { memory, detached, .. } = tables;
        if !detached.is_empty() {
            // Whole tables went: their translations are flushed at once.
            memory.flush_all(self.pml4);
            memory.release_frames_later(detached);
        }
        result
    }

    /// Table frames that mapping every page of `[start, end)` would add.
    fn missing_tables<M: Memory>(&mut self, memory: &mut M, start: u64, end: u64) -> u64 {
        self.with_tables(memory, |tables, pml4| paging::missing_tables(tables, pml4, start, end))
    }

    /// Unlinks every leaf of `[start, end)`, freeing the tables it leaves
    /// empty (with their TLB entries flushed); each leaf's frame goes to
    /// `on_leaf(memory, frame)` after its TLB entry is flushed.
    fn unmap_range<M: Memory>(
        &mut self,
        memory: &mut M,
        start: u64,
        end: u64,
        budget: u64,
        on_leaf: impl FnMut(&mut M, u64),
    ) -> Option<u64> {
        self.unmap_walk(memory, start, end, budget, false, on_leaf)
    }

    /// Unlinks a shared mapping's pages in `[start, end)` (the mapping
    /// starts 2 MiB-aligned and its last-level tables are its own, see
    /// [`Self::place_shared`]): whole tables at once, so the work is
    /// proportional to the tables, not the pages. Within `budget`;
    /// `Some(va)`: resume there.
    fn unmap_shared_range<M: Memory>(
        &mut self,
        memory: &mut M,
        start: u64,
        end: u64,
        budget: u64,
    ) -> Option<u64> {
        self.unmap_walk(memory, start, end.next_multiple_of(SHARED_ALIGN), budget, true, |_, _| {})
    }

    /// [`paging::unmap_range`] (or, `detach`, [`paging::unmap_tables`]) on
    /// this address space, flushing each unlinked translation if a CPU has
    /// the space loaded ([`Memory::loaded_anywhere`]; a dead process's,
    /// being torn down, is loaded nowhere).
    fn unmap_walk<M: Memory>(
        &mut self,
        memory: &mut M,
        start: u64,
        end: u64,
        budget: u64,
        detach: bool,
        mut on_leaf: impl FnMut(&mut M, u64),
    ) -> Option<u64> {
        let mut budget = budget;
        let flush = memory.loaded_anywhere(self.pml4);
        self.with_tables(memory, |tables, pml4| {
            let on_leaf = &mut |tables: &mut Tables<'_, M>, va, frame| {
                if flush {
                    tables.memory.flush(pml4, va);
                }
                on_leaf(tables.memory, frame);
            };
            let on_table = &mut |tables: &mut Tables<'_, M>, va| {
                if flush {
                    tables.memory.flush(pml4, va);
                }
            };
            if detach {
                paging::unmap_tables(tables, pml4, start, end, &mut budget, on_leaf, on_table)
            } else {
                paging::unmap_range(tables, pml4, start, end, &mut budget, on_leaf, on_table)
            }
        })
    }

    fn insert_region(&mut self, region: Region) {
        let at = self.regions.partition_point(|r| r.start < region.start);
        self.reserve_entry();
        self.regions.insert(at, region);
        if counts_as_virtual(region.kind) {
            self.virtual_bytes += region.end - region.start;
        }
    }

    /// Makes room for one more map entry without letting the vector's
    /// capacity grow past [`REGIONS_CAP`] (a doubling could), so the kernel
    /// heap bound holds.
    fn reserve_entry(&mut self) {
        if self.regions.len() == self.regions.capacity() {
            let target = (self.regions.capacity() * 2).clamp(8, REGIONS_CAP.max(self.regions.len() + 1));
            self.regions.reserve_exact(target - self.regions.len());
        }
    }

    fn region_at(&self, va: u64) -> Option<&Region> {
        let index = self.regions.partition_point(|r| r.end <= va);
        self.regions.get(index).filter(|r| r.start <= va)
    }

    /// Checks that the map has room for `more` entries ([`MAPPINGS_MAX`];
    /// revoked ranges are the kernel's doing and not counted).
    fn check_mappings(&self, more: usize) -> Result<(), Refusal> {
        let requested = self.regions.len() - self.revoked + more;
        if requested > MAPPINGS_MAX {
            return Err(Refusal::Quota {
                kind: QuotaKind::Mappings,
                requested: requested as u64,
                limit: MAPPINGS_MAX as u64,
            });
        }
        Ok(())
    }

    /// Map entries that splitting at `addr` and `end` would add.
    fn splits_needed(&self, addr: u64, end: u64) -> usize {
        [addr, end].into_iter().filter(|&at| self.region_at(at).is_some_and(|r| r.start < at)).count()
    }

    /// Checks `bytes` more of virtual size against the quota.
    fn check_virtual(&self, bytes: u64) -> Result<(), Refusal> {
        let requested = self.virtual_bytes.saturating_add(bytes);
        if self.quotas.max_virtual != 0 && requested > self.quotas.max_virtual {
            return Err(Refusal::Quota {
                kind: QuotaKind::Virtual,
                requested,
                limit: self.quotas.max_virtual,
            });
        }
        Ok(())
    }

    /// Allocates and maps one private page at `va` (image loading and the
    /// first stack page). The caller fills it.
    pub fn map_private_page<M: Memory>(
        &mut self,
        memory: &mut M,
        va: u64,
        flags: Flags,
    ) -> Result<u64, Refusal> {
        // The tables it needs count too (without a resident quota there is
        // nothing to check them against, and the walk is skipped).
        let tables =
            if self.quotas.max_resident != 0 { self.missing_tables(memory, va, va + PAGE_SIZE) } else { 0 };
        self.check_resident(1 + tables)?;
        let frame = memory.alloc_frame(FrameOwner::Private(self.pid)).ok_or(SysError::OutOfMemory)?;
        let mapped = self.with_tables(memory, |tables, pml4| {
            paging::map(
                tables,
                pml4,
                va,
                frame,
                PageSize::Size4K,
                flags | Flags::USER_ACCESSIBLE,
                USER_TABLE_FLAGS,
            )
        });
        if mapped.is_err() {
            memory.release_frame(frame);
            return Err(Refusal::Error(SysError::OutOfMemory));
        }
        self.resident_pages += 1;
        Ok(frame)
    }

    /// Maps the process's user-state save page at [`USER_STATE_VA`] (private,
    /// writable, no-execute; counted like any other page) and returns its
    /// frame, which the caller fills with the initial state.
    pub fn map_user_state_page<M: Memory>(&mut self, memory: &mut M) -> Result<u64, Refusal> {
        let page =
            Region { start: USER_STATE_VA, end: USER_STATE_VA + PAGE_SIZE, kind: RegionKind::UserState };
        self.add_image_region(page)?;
        self.map_private_page(memory, USER_STATE_VA, Flags::WRITABLE | Flags::NO_EXECUTE)
    }

    /// Records an image region (its pages are mapped with
    /// [`Self::map_private_page`]); refused if it breaks the virtual quota.
    pub fn add_image_region(&mut self, region: Region) -> Result<(), Refusal> {
        self.check_virtual(region.end - region.start)?;
        self.check_mappings(1)?;
        self.insert_region(region);
        Ok(())
    }

    /// Checks `pages` more (data pages and page tables) against the
    /// resident quota, which counts both.
    fn check_resident(&self, pages: u64) -> Result<(), Refusal> {
        let requested = (self.charged_pages() + pages) * PAGE_SIZE;
        if self.quotas.max_resident != 0 && requested > self.quotas.max_resident {
            return Err(Refusal::Quota {
                kind: QuotaKind::Resident,
                requested,
                limit: self.quotas.max_resident,
            });
        }
        Ok(())
    }

    /// `mem_map(len, prot)`: reserves demand-zero memory at an address the
    /// kernel chooses (first fit, one unmapped guard page after it).
    pub fn map_anonymous(&mut self, len: u64, prot: u64) -> Result<u64, Refusal> {
        let writable = check_prot(prot)?;
        if len == 0 {
            return Err(SysError::InvalidArgument.into());
        }
        if len > USER_MMAP_MAX {
            return Err(SysError::TooLarge.into());
        }
        let len = len.next_multiple_of(PAGE_SIZE);
        self.check_virtual(len)?;
        self.check_mappings(1)?;
        let candidate = self.place(len)?;
        self.insert_region(Region {
            start: candidate,
            end: candidate + len,
            kind: RegionKind::Anonymous { writable },
        });
        Ok(candidate)
    }

    /// Serves a ring-3 page fault: a demand-zero page is allocated and mapped
    /// (`Ok`); anything else is the violation that terminates the process.
    pub fn handle_page_fault<M: Memory>(
        &mut self,
        memory: &mut M,
        addr: u64,
        error_code: u64,
    ) -> Result<(), FaultKind> {
        let demand_zero = error_code & (PF_PRESENT | PF_FETCH) == 0;
        if demand_zero {
            if let Some(region) = self.region_at(addr).copied() {
                if region.kind.is_demand_zero() {
                    if error_code & PF_WRITE != 0 && !region.kind.is_writable() {
                        return Err(FaultKind::WriteToReadOnly);
                    }
                    return self.fault_in(memory, addr & !(PAGE_SIZE - 1), region.kind).map(|_| ());
                }
            }
        }
        Err(classify_page_fault(&self.regions, addr, error_code))
    }

    fn fault_in<M: Memory>(&mut self, memory: &mut M, page: u64, kind: RegionKind) -> Result<u64, FaultKind> {
        self.fault_in_page(memory, page, kind).map_err(|refusal| match refusal {
            Refusal::Quota { .. } => FaultKind::ResidentQuotaExceeded,
            Refusal::Error(_) => FaultKind::OutOfMemory,
        })
    }

    /// Allocates and maps a demand-zero page of a region of `kind`; a quota
    /// refusal names the resident quota.
    fn fault_in_page<M: Memory>(
        &mut self,
        memory: &mut M,
        page: u64,
        kind: RegionKind,
    ) -> Result<u64, Refusal> {
        let mut flags = Flags::NO_EXECUTE;
        if kind.is_writable() {
            flags |= Flags::WRITABLE;
        }
        self.map_private_page(memory, page, flags)
    }

    /// The physical pieces of the user buffer `[addr, addr + len)`, checked
    /// against the caller's own mappings: every page must be user-accessible,
    /// and writable if `write`. Untouched demand-zero pages are faulted in;
    /// one that would break the resident quota is a [`Refusal::Quota`], for
    /// the system call to refuse like any other quota (event and policy).
    pub fn user_buffer<M: Memory>(
        &mut self,
        memory: &mut M,
        addr: u64,
        len: u64,
        write: bool,
    ) -> Result<Chunks, Refusal> {
        let mut chunks = Chunks::default();
        if len == 0 {
            return Ok(chunks);
        }
        if len > MAX_USER_BUFFER {
            return Err(SysError::TooLarge.into());
        }
        let end = addr.checked_add(len).ok_or(SysError::Overflow)?;
        if !superos_protocol::layout::is_user_range(addr, len) {
            return Err(SysError::BadAddress.into());
        }
        // Check every page before faulting any in, so a bad buffer changes
        // nothing. A buffer spans at most two pages; remember each page's
        // translation so it is walked only once.
        let first = addr & !(PAGE_SIZE - 1);
        let pages = if (end - 1) & !(PAGE_SIZE - 1) == first { 1 } else { 2 };
        let mut frames: [Option<u64>; 2] = [None; 2];
        for (slot, frame) in frames.iter_mut().enumerate().take(pages) {
            let page = first + slot as u64 * PAGE_SIZE;
            let present = paging::translate(&mut Tables::new(&mut *memory, self.pid), self.pml4, page);
            let allowed = match present {
                Some(t) => {
                    *frame = Some(t.phys);
                    t.flags.contains(Flags::USER_ACCESSIBLE) && (!write || t.flags.contains(Flags::WRITABLE))
                }
                None => self
                    .region_at(page)
                    .is_some_and(|r| r.kind.is_demand_zero() && (!write || r.kind.is_writable())),
            };
            if !allowed {
                return Err(SysError::BadAddress.into());
            }
        }
        let mut va = addr;
        for (slot, frame) in frames.iter().enumerate().take(pages) {
            let page = first + slot as u64 * PAGE_SIZE;
            let phys = match *frame {
                Some(phys) => phys,
                None => {
                    let kind = self.region_at(page).map(|r| r.kind).ok_or(SysError::BadAddress)?;
                    self.fault_in_page(memory, page, kind)?
                }
            };
            let piece_end = end.min(page + PAGE_SIZE);
            chunks.push(Chunk { phys: phys + (va - page), len: piece_end - va });
            va = piece_end;
        }
        Ok(chunks)
    }

    /// Finds the regions covering `[addr, addr + len)` and checks they are
    /// all `mem_map` memory with no hole. Returns the page-rounded end.
    fn check_anonymous_range(&self, addr: u64, len: u64) -> Result<u64, SysError> {
        if addr % PAGE_SIZE != 0 {
            return Err(SysError::Unaligned);
        }
        if len == 0 {
            return Err(SysError::InvalidArgument);
        }
        let end = addr
            .checked_add(len)
            .and_then(|e| e.checked_next_multiple_of(PAGE_SIZE))
            .ok_or(SysError::Overflow)?;
        let mut cursor = addr;
        while cursor < end {
            match self.region_at(cursor) {
                Some(r) if matches!(r.kind, RegionKind::Anonymous { .. }) => cursor = r.end,
                _ => return Err(SysError::BadAddress),
            }
        }
        Ok(end)
    }

    /// Splits regions so that `at` is a region boundary.
    fn split_at(&mut self, at: u64) {
        let index = self.regions.partition_point(|r| r.end <= at);
        if let Some(region) = self.regions.get(index).copied() {
            if region.start < at && at < region.end {
                self.regions[index].end = at;
                self.reserve_entry();
                self.regions.insert(index + 1, Region { start: at, ..region });
            }
        }
    }

    /// `mem_unmap(addr, len)`: removes whole pages of `mem_map` memory,
    /// scrubbing and freeing those that were resident. Returns the number of
    /// resident pages freed.
    /// Refused if a hole in the middle of a mapping would need a map entry
    /// more than [`MAPPINGS_MAX`]. Runs to the end (host tests); the kernel
    /// uses [`Self::unmap_slice`].
    pub fn unmap<M: Memory>(&mut self, memory: &mut M, addr: u64, len: u64) -> Result<u64, Refusal> {
        match self.unmap_slice(memory, addr, len, addr, u64::MAX)? {
            (freed, None) => Ok(freed),
            (_, Some(_)) => unreachable!("an unlimited budget finishes"),
        }
    }

    /// One slice of `mem_unmap(addr, len)`: checks the whole call (so a slice
    /// is refused exactly when the call would be), then removes the pages
    /// from `from` on, spending at most `budget` units (a present page or
    /// table each, see [`paging::unmap_range`]). Returns the resident pages
    /// freed and, if the budget ran out, where the next slice resumes; the
    /// map entries change only in the last slice, so between slices the range
    /// is still the caller's (its pages below the resume point are unmapped,
    /// as demand-zero pages never touched are).
    pub fn unmap_slice<M: Memory>(
        &mut self,
        memory: &mut M,
        addr: u64,
        len: u64,
        from: u64,
        budget: u64,
    ) -> Result<(u64, Option<u64>), Refusal> {
        let end = self.check_anonymous_range(addr, len)?;
        // Regions are sorted and disjoint: those overlapping [addr, end) form
        // one run, found by two binary searches.
        let removed =
            self.regions.partition_point(|r| r.start < end) - self.regions.partition_point(|r| r.end <= addr);
        self.check_mappings(self.splits_needed(addr, end).saturating_sub(removed))?;
        let mut freed = 0;
        let resume = self.unmap_range(memory, from.clamp(addr, end), end, budget, |memory, frame| {
            memory.release_frame(frame);
            freed += 1;
        });
        self.resident_pages -= freed;
        if resume.is_some() {
            return Ok((freed, resume));
        }
        self.split_at(addr);
        self.split_at(end);
        self.regions.retain(|r| r.end <= addr || r.start >= end);
        self.virtual_bytes -= end - addr;
        Ok((freed, None))
    }

    /// `mem_protect(addr, len, prot)`: rights can only be removed. Runs to
    /// the end (host tests); the kernel uses [`Self::protect_slice`].
    pub fn protect<M: Memory>(
        &mut self,
        memory: &mut M,
        addr: u64,
        len: u64,
        prot: u64,
    ) -> Result<(), Refusal> {
        match self.protect_slice(memory, addr, len, prot, addr, u64::MAX)? {
            None => Ok(()),
            Some(_) => unreachable!("an unlimited budget finishes"),
        }
    }

    /// One slice of `mem_protect(addr, len, prot)`, as
    /// [`Self::unmap_slice`]: the whole call is checked, write access is
    /// removed from the present pages from `from` on within `budget`, and
    /// the map entries change in the last slice. `Some(va)`: resume there.
    pub fn protect_slice<M: Memory>(
        &mut self,
        memory: &mut M,
        addr: u64,
        len: u64,
        prot: u64,
        from: u64,
        budget: u64,
    ) -> Result<Option<u64>, Refusal> {
        let writable = check_prot(prot)?;
        // A whole shared mapping may lose write access too (never gain it).
        let shared = self.regions.iter().position(|r| {
            r.start == addr
                && len.checked_next_multiple_of(PAGE_SIZE) == Some(r.end - r.start)
                && matches!(r.kind, RegionKind::Shared { .. })
        });
        if let Some(index) = shared {
            let region = self.regions[index];
            let RegionKind::Shared { region: id, writable: was_writable } = region.kind else {
                unreachable!("checked above")
            };
            if writable && !was_writable {
                return Err(SysError::NotPermitted.into());
            }
            if !writable {
                let from = from.clamp(region.start, region.end);
                if let Some(resume) = self.clear_writable(memory, from, region.end, budget) {
                    return Ok(Some(resume));
                }
            }
            self.regions[index].kind = RegionKind::Shared { region: id, writable };
            return Ok(None);
        }
        let end = self.check_anonymous_range(addr, len)?;
        let escalates = self
            .regions
            .iter()
            .filter(|r| r.start < end && r.end > addr)
            .any(|r| writable && !r.kind.is_writable());
        if escalates {
            return Err(SysError::NotPermitted.into());
        }
        self.check_mappings(self.splits_needed(addr, end))?;
        if !writable {
            if let Some(resume) = self.clear_writable(memory, from.clamp(addr, end), end, budget) {
                return Ok(Some(resume));
            }
        }
        self.split_at(addr);
        self.split_at(end);
        for region in self.regions.iter_mut().filter(|r| r.start >= addr && r.end <= end) {
            region.kind = RegionKind::Anonymous { writable };
        }
        Ok(None)
    }

    /// Clears the writable bit of every leaf in `[start, end)` and flushes
    /// its TLB entry: a walk of the tables present, not of every page,
    /// within `budget` (`Some(va)`: resume there).
    fn clear_writable<M: Memory>(
        &mut self,
        memory: &mut M,
        start: u64,
        end: u64,
        budget: u64,
    ) -> Option<u64> {
        let pml4 = self.pml4;
        let mut budget = budget;
        self.with_tables(memory, |tables, pml4_frame| {
            paging::for_each_leaf(
                tables,
                pml4_frame,
                start,
                end,
                &mut budget,
                &mut |tables: &mut Tables<'_, M>, table, i, va| {
                    let entry = &mut tables.table(table)[i];
                    if entry.flags().contains(Flags::WRITABLE) {
                        let (frame, flags) = (entry.addr(), entry.flags() - Flags::WRITABLE);
                        entry.set_addr(frame, flags);
                        tables.memory.flush(pml4, va);
                    }
                },
            )
        })
    }

    /// Shared bytes charged to the process.
    pub fn shared_bytes(&self) -> u64 {
        self.shared_bytes
    }

    /// Charges `bytes` of shared memory against the shared quota.
    pub fn charge_shared(&mut self, bytes: u64) -> Result<(), Refusal> {
        let requested = self.shared_bytes.saturating_add(bytes);
        if self.quotas.max_shared != 0 && requested > self.quotas.max_shared {
            return Err(Refusal::Quota { kind: QuotaKind::Shared, requested, limit: self.quotas.max_shared });
        }
        self.shared_bytes = requested;
        Ok(())
    }

    /// Returns `bytes` of shared memory to the quota.
    pub fn uncharge_shared(&mut self, bytes: u64) {
        self.shared_bytes = self.shared_bytes.saturating_sub(bytes);
    }

    /// First-fit placement of `len` bytes in the mapping area, with one
    /// unmapped guard page after it.
    fn place(&self, len: u64) -> Result<u64, SysError> {
        self.place_aligned(len, PAGE_SIZE)
    }

    /// Placement of a shared mapping: 2 MiB-aligned, and nothing else is
    /// placed in the rest of its last 2 MiB, so that every last-level table
    /// under it is its own and revocation unlinks whole tables.
    fn place_shared(&self, len: u64) -> Result<u64, SysError> {
        self.place_aligned(len.next_multiple_of(SHARED_ALIGN), SHARED_ALIGN)
    }

    fn place_aligned(&self, len: u64, align: u64) -> Result<u64, SysError> {
        let mut candidate = USER_MMAP_BASE.next_multiple_of(align);
        for region in self.regions.iter().filter(|r| r.end > USER_MMAP_BASE && r.start < USER_MMAP_LIMIT) {
            if candidate + len + PAGE_SIZE <= region.start {
                break;
            }
            // A shared mapping holds the rest of its last 2 MiB too (and
            // so does the revoked range it may become: the same whichever
            // it is, so a process can predict placement without knowing).
            let end = match region.kind {
                RegionKind::Shared { .. } | RegionKind::Revoked { .. } => {
                    region.end.next_multiple_of(SHARED_ALIGN)
                }
                _ => region.end,
            };
            candidate = candidate.max((end + PAGE_SIZE).next_multiple_of(align));
        }
        if candidate + len + PAGE_SIZE > USER_MMAP_LIMIT {
            return Err(SysError::OutOfMemory);
        }
        Ok(candidate)
    }

    /// Maps the frames of shared region `region` at an address the kernel
    /// chooses: user-accessible, never executable, writable if asked. The
    /// mapping counts in the virtual size, so the virtual quota applies.
    pub fn map_shared<M: Memory>(
        &mut self,
        memory: &mut M,
        region: u32,
        frames: &[u64],
        writable: bool,
    ) -> Result<u64, Refusal> {
        let start = self.reserve_shared(memory, region, frames.len() as u64, writable)?;
        if let Err(refusal) = self.map_shared_pages(memory, start, 0, frames, u64::MAX) {
            self.unmap_shared(memory, start).expect("just reserved");
            return Err(refusal);
        }
        Ok(start)
    }

    /// The first step of a shared mapping: checks the quotas (map entries,
    /// virtual size, the tables the whole mapping would need) and reserves
    /// `pages` pages for region `region` at an address the kernel picks,
    /// mapping none of them yet ([`Self::map_shared_pages`] does, in
    /// slices). Returns the address.
    pub fn reserve_shared<M: Memory>(
        &mut self,
        memory: &mut M,
        region: u32,
        pages: u64,
        writable: bool,
    ) -> Result<u64, Refusal> {
        let len = pages * PAGE_SIZE;
        self.check_virtual(len)?;
        self.check_mappings(1)?;
        let start = self.place_shared(len)?;
        let tables = self.missing_tables(memory, start, start + len);
        self.check_resident(tables)?;
        self.insert_region(Region { start, end: start + len, kind: RegionKind::Shared { region, writable } });
        Ok(start)
    }

    /// Maps `frames[first..]` into the shared mapping reserved at `start`,
    /// page `first` on, spending at most `budget` units (a page mapped is
    /// 17, like one `mem_unmap` unlinks). Returns the next page to map, or `None` when
    /// every frame is mapped. On an error the caller removes the mapping
    /// (`unmap_shared`).
    pub fn map_shared_pages<M: Memory>(
        &mut self,
        memory: &mut M,
        start: u64,
        first: usize,
        frames: &[u64],
        budget: u64,
    ) -> Result<Option<usize>, Refusal> {
        let writable = match self.region_at(start).map(|r| r.kind) {
            Some(RegionKind::Shared { writable, .. }) => writable,
            _ => return Err(SysError::BadAddress.into()),
        };
        let mut flags = Flags::USER_ACCESSIBLE | Flags::NO_EXECUTE;
        if writable {
            flags |= Flags::WRITABLE;
        }
        // A page mapped costs like one unlinked (a walk down, entries made).
        let pages = (budget / (paging::ENTRY_UNITS + paging::PRESENT_UNITS)).max(1);
        let end = frames.len().min(first.saturating_add(usize::try_from(pages).unwrap_or(usize::MAX)));
        for (i, &frame) in frames.iter().enumerate().take(end).skip(first) {
            let va = start + i as u64 * PAGE_SIZE;
            let mapped = self.with_tables(memory, |tables, pml4| {
                paging::map(tables, pml4, va, frame, PageSize::Size4K, flags, USER_TABLE_FLAGS)
            });
            if mapped.is_err() {
                return Err(SysError::OutOfMemory.into());
            }
        }
        Ok((end < frames.len()).then_some(end))
    }

    fn remove_shared_mapping<M: Memory>(&mut self, memory: &mut M, index: usize) -> Region {
        let region = self.regions[index];
        // Shared frames belong to the region: only unlinked here, a whole
        // table at a time.
        self.unmap_shared_range(memory, region.start, region.end, u64::MAX);
        self.virtual_bytes -= region.end - region.start;
        region
    }

    /// One slice of `shm_unmap(addr)`: unlinks the pages of the shared
    /// mapping that starts at `addr` from `from` on within `budget` units;
    /// `Ok(None)` when none is left (the mapping is then removed), with the
    /// region id and the mapping's length.
    pub fn unmap_shared_slice<M: Memory>(
        &mut self,
        memory: &mut M,
        addr: u64,
        from: u64,
        budget: u64,
    ) -> Result<(u32, u64, Option<u64>), SysError> {
        let region = *self
            .regions
            .iter()
            .find(|r| r.start == addr && matches!(r.kind, RegionKind::Shared { .. }))
            .ok_or(SysError::BadAddress)?;
        let RegionKind::Shared { region: id, .. } = region.kind else { unreachable!("found above") };
        let from = from.clamp(region.start, region.end);
        if let Some(resume) = self.unmap_shared_range(memory, from, region.end, budget) {
            return Ok((id, region.end - region.start, Some(resume)));
        }
        self.unmap_shared(memory, addr)?;
        Ok((id, region.end - region.start, None))
    }

    /// `shm_unmap(addr)`: removes the shared mapping that starts at `addr`.
    /// Returns the region id and the mapping's length.
    pub fn unmap_shared<M: Memory>(&mut self, memory: &mut M, addr: u64) -> Result<(u32, u64), SysError> {
        let index = self
            .regions
            .iter()
            .position(|r| r.start == addr && matches!(r.kind, RegionKind::Shared { .. }))
            .ok_or(SysError::BadAddress)?;
        let region = self.remove_shared_mapping(memory, index);
        self.regions.remove(index);
        let RegionKind::Shared { region: id, .. } = region.kind else { unreachable!("checked above") };
        Ok((id, region.end - region.start))
    }

    /// Revocation: removes the mapping of shared region `region` (if any)
    /// and keeps its range reserved as revoked, so that a later access is a
    /// use-after-revoke. Returns where it was mapped.
    pub fn revoke_shared<M: Memory>(&mut self, memory: &mut M, region: u32) -> Option<u64> {
        let index = self
            .regions
            .iter()
            .position(|r| matches!(r.kind, RegionKind::Shared { region: id, .. } if id == region))?;
        let removed = self.remove_shared_mapping(memory, index);
        self.regions[index].kind = RegionKind::Revoked { region };
        self.revoked += 1;
        if self.revoked > REVOKED_MAX {
            // The kernel releases one itself: the lowest but the newest.
            let oldest = self
                .regions
                .iter()
                .position(|r| matches!(r.kind, RegionKind::Revoked { .. }) && r.start != removed.start);
            if let Some(oldest) = oldest {
                self.regions.remove(oldest);
                self.revoked -= 1;
            }
        }
        Some(removed.start)
    }

    /// `shm_unmap(addr)` on a revoked range: releases it (an access there is
    /// then an unmapped access, and the kernel may place mappings there).
    /// Returns the region it was, or `None` if no revoked range starts at
    /// `addr`.
    pub fn release_revoked(&mut self, addr: u64) -> Option<u32> {
        let index = self
            .regions
            .iter()
            .position(|r| r.start == addr && matches!(r.kind, RegionKind::Revoked { .. }))?;
        let RegionKind::Revoked { region } = self.regions.remove(index).kind else {
            unreachable!("checked above")
        };
        self.revoked -= 1;
        Some(region)
    }

    /// Revoked ranges kept in the map.
    pub fn revoked_ranges(&self) -> usize {
        self.revoked
    }

    /// Reports each quota whose usage has crossed 90% since the last call
    /// (once per crossing; re-armed when usage drops below).
    pub fn pressure_crossings(&mut self) -> impl Iterator<Item = (QuotaKind, u64, u64)> + use<> {
        let usage = [
            (QuotaKind::Virtual, self.virtual_bytes, self.quotas.max_virtual),
            (QuotaKind::Resident, self.charged_pages() * PAGE_SIZE, self.quotas.max_resident),
        ];
        let mut crossed = [None, None];
        for (i, (kind, used, limit)) in usage.into_iter().enumerate() {
            let high = limit != 0 && used * 10 >= limit * 9;
            if high && !self.pressure_reported[i] {
                crossed[i] = Some((kind, used, limit));
            }
            self.pressure_reported[i] = high;
        }
        crossed.into_iter().flatten()
    }

    /// What `mem_stat` reports.
    pub fn stat(&self) -> MemStat {
        MemStat {
            virtual_bytes: self.virtual_bytes,
            resident_bytes: self.resident_pages * PAGE_SIZE,
            shared_bytes: self.shared_bytes,
            max_virtual_bytes: self.quotas.max_virtual,
            max_resident_bytes: self.quotas.max_resident,
            max_shared_bytes: self.quotas.max_shared,
            policy: u32::from(self.quotas.kill),
            reserved: 0,
        }
    }

    /// Tears the address space down: every private frame and every table
    /// frame is scrubbed and freed; kernel-owned frames (the gate page) are
    /// only unmapped. The caller must not be running on these tables.
    pub fn destroy<M: Memory>(mut self, memory: &mut M) {
        while self.destroy_slice(memory, 0, u64::MAX).is_some() {}
    }

    /// Forgets the map entries (a dying address space needs only its
    /// tables), returning their heap to the kernel at once.
    pub fn release_map(&mut self) {
        self.regions = Vec::new();
    }

    /// One slice of tearing down a dead process's address space: unlinks
    /// the user half from `from` on within `budget` units (as
    /// `mem_unmap`), releasing the process's private frames and every
    /// table it empties; `Some(va)`: resume there. When it returns `None`
    /// the PML4 is released too and nothing of the process remains.
    pub fn destroy_slice<M: Memory>(&mut self, memory: &mut M, from: u64, budget: u64) -> Option<u64> {
        let pid = self.pid;
        let resume = self.unmap_range(memory, from, USER_HALF_END, budget, |memory, frame| {
            if memory.owner(frame) == Some(FrameOwner::Private(pid)) {
                memory.release_frame(frame);
            }
        });
        if resume.is_none() {
            memory.release_frame(self.pml4);
        }
        resume
    }

    /// The whole teardown in one go (tests: the reference `destroy_slice`
    /// is compared with).
    #[cfg(test)]
    fn destroy_in_one_walk<M: Memory>(self, memory: &mut M) {
        let pid = self.pid;
        // Frames are released as the walk unlinks them: collecting them first
        // would need a heap allocation proportional to the process's size.
        paging::free_user_half(&mut Tables::new(&mut *memory, pid), self.pml4, |tables, _, frame, _| {
            if tables.memory.owner(frame) == Some(FrameOwner::Private(pid)) {
                tables.memory.release_frame(frame);
            }
        });
        memory.release_frame(self.pml4);
    }
}

fn counts_as_virtual(kind: RegionKind) -> bool {
    !matches!(kind, RegionKind::StackGuard | RegionKind::Gate | RegionKind::Revoked { .. })
}

/// Validates a `prot` argument; returns whether it grants write.
fn check_prot(prot: u64) -> Result<bool, SysError> {
    if prot & PROT_EXEC != 0 {
        return Err(SysError::NotPermitted);
    }
    match prot {
        PROT_READ => Ok(false),
        p if p == PROT_READ | PROT_WRITE => Ok(true),
        _ => Err(SysError::InvalidArgument),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::frame::FrameAllocator;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// A refusal with a plain error, as any call returns it.
    fn err<T>(error: SysError) -> Result<T, Refusal> {
        Err(Refusal::Error(error))
    }

    #[test]
    fn a_range_of_a_two_piece_buffer_is_cut_at_the_piece_boundary_and_the_end() {
        let mut chunks = Chunks::default();
        chunks.push(Chunk { phys: 0x1000, len: 0x300 });
        chunks.push(Chunk { phys: 0x5000, len: 0xd00 });
        let range = |offset, len| chunks.range(offset, len).map(|c| (c.phys, c.len)).collect::<Vec<_>>();
        assert_eq!(range(0x100, 0x10), [(0x1100, 0x10)]);
        assert_eq!(range(0x2f0, 0x20), [(0x12f0, 0x10), (0x5000, 0x10)]);
        assert_eq!(range(0x300, 0x8), [(0x5000, 0x8)]);
        assert_eq!(range(0xff8, 0x20), [(0x5cf8, 0x8)], "cut at the buffer's end");
        assert_eq!(range(0x1000, 0x8), []);
        assert_eq!(range(u64::MAX - 4, 0x20), [], "no overflow");
    }

    /// The refusal for a map that would need `requested` entries.
    fn too_many_mappings<T>(requested: usize) -> Result<T, Refusal> {
        Err(Refusal::Quota {
            kind: QuotaKind::Mappings,
            requested: requested as u64,
            limit: MAPPINGS_MAX as u64,
        })
    }

    #[test]
    fn a_process_map_holds_at_most_mappings_max_entries() {
        let mut memory = FakeMemory::new();
        let mut space = space(&mut memory, Quotas::default());
        let mut mapped = Vec::new();
        let refusal = loop {
            match space.map_anonymous(0x3000, RW) {
                Ok(addr) => mapped.push(addr),
                Err(refusal) => break refusal,
            }
        };
        assert_eq!(Err::<(), _>(refusal), too_many_mappings(MAPPINGS_MAX + 1));
        assert_eq!(space.regions.len(), MAPPINGS_MAX);
        let (a, b) = (mapped[0], mapped[1]);
        let virtual_bytes = space.virtual_bytes;
        // A hole in the middle of a mapping needs an entry more (two for
        // mem_protect): refused, and nothing changed.
        assert_eq!(space.unmap(&mut memory, a + 0x1000, 0x1000), too_many_mappings(MAPPINGS_MAX + 1));
        assert_eq!(
            space.protect(&mut memory, a + 0x1000, 0x1000, PROT_READ),
            too_many_mappings(MAPPINGS_MAX + 2)
        );
        assert_eq!(space.regions.len(), MAPPINGS_MAX);
        assert_eq!(space.virtual_bytes, virtual_bytes);
        // Trimming an end needs no entry more; neither does protecting what
        // is left whole.
        space.unmap(&mut memory, a, 0x1000).unwrap();
        space.protect(&mut memory, a + 0x1000, 0x2000, PROT_READ).unwrap();
        // Shared mappings count too.
        let frame = memory.alloc_frame(FrameOwner::Shared(9)).unwrap();
        assert_eq!(space.map_shared(&mut memory, 9, &[frame], true), too_many_mappings(MAPPINGS_MAX + 1));
        // Unmapping a whole mapping frees its entry for the next one.
        space.unmap(&mut memory, b, 0x3000).unwrap();
        space.map_shared(&mut memory, 9, &[frame], true).unwrap();
        assert_eq!(space.map_anonymous(0x1000, RW), too_many_mappings(MAPPINGS_MAX + 1));
    }

    #[repr(C, align(4096))]
    pub(crate) struct FrameBytes(pub [u8; 4096]);

    /// Host guest memory: a real frame allocator (with its ownership table)
    /// over a fake physical range, and frame contents in boxes.
    pub(crate) struct FakeMemory {
        pub allocator: FrameAllocator<'static>,
        pub frames: BTreeMap<u64, Box<FrameBytes>>,
        pub flushes: u64,
        /// PML4s [`Memory::loaded_anywhere`] says no CPU has loaded (every
        /// other is loaded somewhere).
        pub unloaded: Vec<u64>,
        /// Bytes [`Memory::heap_room`] grants at most.
        pub heap_room: usize,
    }

    pub(crate) const FAKE_RAM: (u64, u64) = (0x10_0000, 0x10_0000 + 512 * 4096);

    impl FakeMemory {
        pub fn new() -> Self {
            let frames = (FAKE_RAM.1 - FAKE_RAM.0) / 4096;
            let stack: &'static mut [u32] = Box::leak(vec![0u32; frames as usize].into_boxed_slice());
            let owners: &'static mut [u32] = Box::leak(vec![0u32; frames as usize].into_boxed_slice());
            FakeMemory {
                allocator: FrameAllocator::new(&[FAKE_RAM], stack, owners),
                frames: BTreeMap::new(),
                flushes: 0,
                unloaded: Vec::new(),
                heap_room: usize::MAX,
            }
        }
        pub fn bytes(&mut self, frame: u64) -> &mut [u8; 4096] {
            &mut self.frames.entry(frame).or_insert_with(|| Box::new(FrameBytes([0; 4096]))).0
        }
    }

    impl Memory for FakeMemory {
        fn table(&mut self, frame: u64) -> &mut PageTable {
            let bytes = self.bytes(frame);
            // SAFETY: FrameBytes has a PageTable's size and alignment (4096, 512 u64s, any bits valid),
            // and the borrow of the box is exclusive.
            unsafe { &mut *(bytes.as_mut_ptr() as *mut PageTable) }
        }
        fn alloc_frame(&mut self, owner: FrameOwner) -> Option<u64> {
            let frame = self.allocator.alloc(owner)?;
            assert!(self.bytes(frame).iter().all(|&b| b == 0), "allocated frame {frame:#x} is not zero");
            Some(frame)
        }
        fn release_frame(&mut self, frame: u64) {
            self.bytes(frame).fill(0);
            self.allocator.free(frame).unwrap_or_else(|e| panic!("release of {frame:#x}: {e:?}"));
        }
        fn owner(&self, frame: u64) -> Option<FrameOwner> {
            self.allocator.owner(frame)
        }
        fn flush(&mut self, pml4: u64, _va: u64) {
            assert!(!self.unloaded.contains(&pml4), "a flush of an address space no CPU has loaded");
            self.flushes += 1;
        }
        fn loaded_anywhere(&mut self, pml4: u64) -> bool {
            !self.unloaded.contains(&pml4)
        }
        fn heap_room(&self, bytes: usize) -> bool {
            bytes <= self.heap_room
        }
    }

    /// A kernel PML4 and a gate frame, as the kernel has them.
    pub(crate) fn kernel_setup(memory: &mut FakeMemory) -> (u64, u64) {
        let kernel_pml4 = memory.alloc_frame(FrameOwner::Kernel).unwrap();
        let gate = memory.alloc_frame(FrameOwner::Kernel).unwrap();
        (kernel_pml4, gate)
    }

    const RW: u64 = PROT_READ | PROT_WRITE;
    const USER_WRITE: u64 = PF_WRITE | 4;

    fn space(memory: &mut FakeMemory, quotas: Quotas) -> AddressSpace {
        let (kernel_pml4, gate) = kernel_setup(memory);
        AddressSpace::new(memory, 1, kernel_pml4, gate, quotas).unwrap()
    }

    #[test]
    fn mappings_are_placed_by_the_kernel_with_guard_pages() {
        let mut memory = FakeMemory::new();
        let mut space = space(&mut memory, Quotas::default());
        let a = space.map_anonymous(1, RW).unwrap();
        let b = space.map_anonymous(0x2000, PROT_READ).unwrap();
        assert_eq!(a, USER_MMAP_BASE);
        assert_eq!(b, a + 0x2000, "one guard page between mappings");
        assert_eq!(space.virtual_bytes(), 8 * 4096 + 0x3000);
        // The guard page is unmapped memory.
        assert_eq!(
            space.handle_page_fault(&mut memory, a + 0x1000, USER_WRITE),
            Err(FaultKind::UnmappedAccess)
        );
        // Freed space is reused.
        space.unmap(&mut memory, a, 0x1000).unwrap();
        assert_eq!(space.map_anonymous(0x1000, RW), Ok(a));
    }

    #[test]
    fn the_user_state_page_is_private_writable_and_out_of_reach_of_mem_calls() {
        let mut memory = FakeMemory::new();
        let mut space = space(&mut memory, Quotas::default());
        let before = (space.virtual_bytes(), space.resident_pages());
        let frame = space.map_user_state_page(&mut memory).unwrap();
        assert_eq!(memory.owner(frame), Some(FrameOwner::Private(1)));
        assert_eq!((space.virtual_bytes(), space.resident_pages()), (before.0 + 4096, before.1 + 1));
        let mapped = paging::translate(&mut Tables::new(&mut memory, 1), space.pml4(), USER_STATE_VA)
            .expect("mapped at once");
        assert_eq!(mapped.phys, frame);
        assert!(mapped.flags.contains(Flags::USER_ACCESSIBLE | Flags::WRITABLE | Flags::NO_EXECUTE));
        // mem_unmap and mem_protect only touch mem_map memory.
        assert_eq!(space.unmap(&mut memory, USER_STATE_VA, 4096), err(SysError::BadAddress));
        assert!(space.protect(&mut memory, USER_STATE_VA, 4096, PROT_READ).is_err());
        // Executing from it is a no-execute violation.
        assert_eq!(
            space.handle_page_fault(&mut memory, USER_STATE_VA, PF_PRESENT | PF_FETCH | 4),
            Err(FaultKind::ExecuteNonExecutable)
        );
        // A full resident quota refuses it (spawn then fails). Page tables
        // count: the PML4 and the gate's three tables, then the stack page
        // and the page table it needs fill a quota of six pages.
        let quotas = Quotas { max_resident: 6 * 4096, ..Quotas::default() };
        let mut tight = self::space(&mut memory, quotas);
        assert_eq!(tight.table_pages(), 4);
        tight
            .map_private_page(&mut memory, USER_STACK_TOP - 4096, Flags::WRITABLE | Flags::NO_EXECUTE)
            .unwrap();
        assert!(matches!(
            tight.map_user_state_page(&mut memory),
            Err(Refusal::Quota { kind: QuotaKind::Resident, .. })
        ));
    }

    #[test]
    fn bad_arguments_are_typed_errors() {
        let mut memory = FakeMemory::new();
        let mut space = space(&mut memory, Quotas::default());
        assert_eq!(space.map_anonymous(0, RW), err(SysError::InvalidArgument));
        assert_eq!(space.map_anonymous(USER_MMAP_MAX + 1, RW), err(SysError::TooLarge));
        assert_eq!(space.map_anonymous(4096, PROT_READ | PROT_EXEC), err(SysError::NotPermitted));
        assert_eq!(space.map_anonymous(4096, PROT_WRITE), err(SysError::InvalidArgument));
        assert_eq!(space.map_anonymous(4096, 0), err(SysError::InvalidArgument));
        let a = space.map_anonymous(0x3000, RW).unwrap();
        assert_eq!(space.unmap(&mut memory, a + 1, 4096), err(SysError::Unaligned));
        assert_eq!(space.unmap(&mut memory, a, 0), err(SysError::InvalidArgument));
        assert_eq!(space.unmap(&mut memory, a, u64::MAX), err(SysError::Overflow));
        assert_eq!(space.unmap(&mut memory, a, 0x4000), err(SysError::BadAddress), "runs into the guard");
        assert_eq!(
            space.unmap(&mut memory, USER_STACK_TOP - 4096, 4096),
            err(SysError::BadAddress),
            "not mem_map memory"
        );
        assert_eq!(space.protect(&mut memory, a, 4096, RW | PROT_EXEC), err(SysError::NotPermitted));
        space.protect(&mut memory, a, 4096, PROT_READ).unwrap();
        assert_eq!(space.protect(&mut memory, a, 4096, RW), err(SysError::NotPermitted));
        space.unmap(&mut memory, a, 0x3000).unwrap();
        assert_eq!(space.unmap(&mut memory, a, 0x3000), err(SysError::BadAddress), "double unmap");
    }

    #[test]
    fn pages_are_allocated_on_first_touch_and_freed_on_unmap() {
        let mut memory = FakeMemory::new();
        let mut space = space(&mut memory, Quotas::default());
        let free_before = memory.allocator.free_frames();
        let a = space.map_anonymous(0x4000, RW).unwrap();
        assert_eq!(space.resident_pages(), 0);
        assert_eq!(memory.allocator.free_frames(), free_before);
        space.handle_page_fault(&mut memory, a + 0x1008, USER_WRITE).unwrap();
        space.handle_page_fault(&mut memory, a + 0x3000, 4).unwrap();
        assert_eq!(space.resident_pages(), 2);
        let frame = paging::translate(&mut Tables::new(&mut memory, 1), space.pml4(), a + 0x1000).unwrap();
        assert_eq!(memory.owner(frame.phys), Some(FrameOwner::Private(1)));
        assert!(frame.flags.contains(Flags::WRITABLE | Flags::NO_EXECUTE | Flags::USER_ACCESSIBLE));
        memory.bytes(frame.phys)[0] = 0xaa;
        assert_eq!(space.unmap(&mut memory, a, 0x4000), Ok(2));
        assert_eq!(space.resident_pages(), 0);
        assert_eq!(memory.owner(frame.phys), Some(FrameOwner::Free));
        assert_eq!(memory.bytes(frame.phys)[0], 0, "freed frames are scrubbed");
        assert_eq!(space.handle_page_fault(&mut memory, a + 0x1000, 4), Err(FaultKind::UnmappedAccess));
    }

    #[test]
    fn violations_are_classified() {
        let mut memory = FakeMemory::new();
        let mut space = space(&mut memory, Quotas::default());
        let ro = space.map_anonymous(4096, PROT_READ).unwrap();
        assert_eq!(space.handle_page_fault(&mut memory, ro, USER_WRITE), Err(FaultKind::WriteToReadOnly));
        space.handle_page_fault(&mut memory, ro, 4).unwrap();
        assert_eq!(
            space.handle_page_fault(&mut memory, ro, USER_WRITE | PF_PRESENT),
            Err(FaultKind::WriteToReadOnly)
        );
        assert_eq!(
            space.handle_page_fault(&mut memory, ro, PF_FETCH | 4),
            Err(FaultKind::ExecuteNonExecutable)
        );
        let rw = space.map_anonymous(4096, RW).unwrap();
        space.handle_page_fault(&mut memory, rw, USER_WRITE).unwrap();
        space.protect(&mut memory, rw, 4096, PROT_READ).unwrap();
        assert!(memory.flushes >= 1, "the TLB entry of a write-protected page is flushed");
        let t = paging::translate(&mut Tables::new(&mut memory, 1), space.pml4(), rw).unwrap();
        assert!(!t.flags.contains(Flags::WRITABLE));
        let guard = USER_STACK_TOP - (USER_STACK_PAGES + 1) * PAGE_SIZE;
        assert_eq!(space.handle_page_fault(&mut memory, guard + 8, USER_WRITE), Err(FaultKind::StackGuard));
        space.handle_page_fault(&mut memory, USER_STACK_TOP - 8, USER_WRITE).unwrap();
    }

    #[test]
    fn quotas_refuse_mappings_and_resident_growth() {
        let mut memory = FakeMemory::new();
        // Page tables count against the resident quota: the PML4 and the
        // gate's three tables, then three more for the first mem_map page;
        // 10 pages leave room for three data pages.
        let quotas = Quotas { max_virtual: 16 * 4096, max_resident: 10 * 4096, max_shared: 0, kill: false };
        let mut space = space(&mut memory, quotas);
        assert_eq!(space.table_pages(), 4);
        // The stack's 8 pages count against the virtual quota.
        let a = space.map_anonymous(8 * 4096, RW).unwrap();
        assert_eq!(
            space.map_anonymous(4096, RW),
            Err(Refusal::Quota { kind: QuotaKind::Virtual, requested: 17 * 4096, limit: 16 * 4096 })
        );
        for page in 0..3 {
            space.handle_page_fault(&mut memory, a + page * 4096, USER_WRITE).unwrap();
        }
        assert_eq!(
            space.handle_page_fault(&mut memory, a + 3 * 4096, USER_WRITE),
            Err(FaultKind::ResidentQuotaExceeded)
        );
        assert_eq!((space.resident_pages(), space.table_pages()), (3, 7));
        let crossings: Vec<_> = space.pressure_crossings().collect();
        assert_eq!(
            crossings,
            vec![(QuotaKind::Virtual, 16 * 4096, 16 * 4096), (QuotaKind::Resident, 10 * 4096, 10 * 4096)]
        );
        assert_eq!(space.pressure_crossings().count(), 0, "reported once per crossing");
    }

    #[test]
    fn page_tables_are_charged_to_the_resident_quota_and_freed_when_empty() {
        let mut memory = FakeMemory::new();
        let baseline = memory.allocator.free_frames();
        let quotas = Quotas { max_resident: 64 * 4096, ..Quotas::default() };
        let mut space = space(&mut memory, quotas);
        let start_tables = space.table_pages();
        // The attack of issue 11: one page per 2 MiB, each needing its own
        // page table, then unmapping the page. The tables count, so the quota
        // stops the touching; unmapping frees each emptied table.
        let len = 1 << 30;
        let a = space.map_anonymous(len, RW).unwrap();
        let mut touched = 0;
        loop {
            let va = a + touched * (2 << 20);
            match space.handle_page_fault(&mut memory, va, USER_WRITE) {
                Ok(()) => touched += 1,
                Err(fault) => {
                    assert_eq!(fault, FaultKind::ResidentQuotaExceeded);
                    break;
                }
            }
        }
        assert!(space.charged_pages() <= 64);
        assert_eq!(space.table_pages(), start_tables + 2 + touched, "a PDPT, a PD, a table per page");
        for page in 0..touched {
            space.unmap(&mut memory, a + page * (2 << 20), 4096).unwrap();
        }
        assert_eq!(space.resident_pages(), 0);
        assert_eq!(space.table_pages(), start_tables, "every emptied table freed, up to the PDPT");
        // Partial unmaps keep the tables still in use.
        let b = space.map_anonymous(0x3000, RW).unwrap();
        for page in 0..3 {
            space.handle_page_fault(&mut memory, b + page * 4096, USER_WRITE).unwrap();
        }
        let with_b = space.table_pages();
        space.unmap(&mut memory, b + 4096, 4096).unwrap();
        assert_eq!(space.table_pages(), with_b);
        assert_eq!(space.user_buffer(&mut memory, b, 8, false).map(|c| c.iter().count()), Ok(1));
        space.unmap(&mut memory, b, 4096).unwrap();
        space.unmap(&mut memory, b + 0x2000, 4096).unwrap();
        assert_eq!(space.table_pages(), start_tables);
        // The rest of the 1 GiB mapping goes in one call that walks no table.
        space.destroy(&mut memory);
        assert_eq!(memory.allocator.free_frames(), baseline - 2, "only the kernel PML4 and gate remain");
    }

    #[test]
    fn unmap_and_protect_work_in_bounded_slices_proportional_to_what_is_mapped() {
        let mut memory = FakeMemory::new();
        let baseline = memory.allocator.free_frames();
        let mut space = space(&mut memory, Quotas::default());
        let start_tables = space.table_pages();
        let len = 1 << 30;
        let a = space.map_anonymous(len, RW).unwrap();
        // 1 GiB untouched: nothing to walk (two entries looked at), so one
        // slice of a small budget does it.
        assert_eq!(space.protect_slice(&mut memory, a, len, PROT_READ, a, 64), Ok(None));
        assert_eq!(space.unmap_slice(&mut memory, a, len, a, 64), Ok((0, None)));
        let b = space.map_anonymous(len, RW).unwrap();
        let touched: Vec<u64> = (0..40).map(|i| b + i * (3 << 20) + (i % 7) * 4096).collect();
        for &va in &touched {
            space.handle_page_fault(&mut memory, va, USER_WRITE).unwrap();
        }
        // Protect in slices of 200 units (about 8 pages): each slice resumes
        // where the last stopped.
        let (mut from, mut slices) = (b, 0);
        while let Some(resume) = space.protect_slice(&mut memory, b, len, PROT_READ, from, 200).unwrap() {
            assert!(resume > from, "every slice makes progress");
            from = resume;
            slices += 1;
            // Between slices the map is unchanged.
            assert!(space.regions().iter().any(|r| r.start == b && r.kind.is_writable()));
        }
        assert!(slices >= 40 / 8, "{slices} slices");
        for &va in &touched {
            let t = paging::translate(&mut Tables::new(&mut memory, 1), space.pml4(), va).unwrap();
            assert!(!t.flags.contains(Flags::WRITABLE));
        }
        assert!(space.regions().iter().any(|r| r.start == b && !r.kind.is_writable()));
        // Unmap in slices: resident pages and tables go as the slices run.
        let (mut from, mut freed) = (b, 0);
        loop {
            let (now, resume) = space.unmap_slice(&mut memory, b, len, from, 200).unwrap();
            assert!(now <= 200 / 17);
            freed += now;
            assert_eq!(space.resident_pages(), 40 - freed);
            match resume {
                Some(resume) => from = resume,
                None => break,
            }
        }
        assert_eq!(freed, 40);
        assert!(space.regions().iter().all(|r| r.start != b));
        assert_eq!(space.table_pages(), start_tables, "every emptied table freed");
        // A refused call is refused in its first slice, and changes nothing.
        assert_eq!(space.unmap_slice(&mut memory, b, len, b, 200), err(SysError::BadAddress));
        space.destroy(&mut memory);
        assert_eq!(memory.allocator.free_frames(), baseline - 2);
    }

    /// Revoking a shared mapping unlinks whole last-level tables: the work
    /// follows the tables (2 MiB each), not the pages, and the frames stay
    /// the region's.
    #[test]
    fn a_shared_mapping_goes_a_whole_table_at_a_time() {
        let mut memory = FakeMemory::new();
        let mut space = space(&mut memory, Quotas::default());
        let before = space.table_pages();
        // 4 MiB of the one frame (the fake RAM is smaller): only the tables count.
        let frames = vec![memory.allocator.alloc(FrameOwner::Shared(7)).unwrap(); 1024];
        let at = space.map_shared(&mut memory, 7, &frames, true).unwrap();
        assert_eq!(at % SHARED_ALIGN, 0, "2 MiB-aligned");
        // Nothing else lands in its tables.
        let next = space.map_anonymous(PAGE_SIZE, RW).unwrap();
        assert!(next >= at + 4 * (1 << 20) + PAGE_SIZE, "{next:#x}");
        space.handle_page_fault(&mut memory, next, PF_WRITE).unwrap();
        let flushes = memory.flushes;
        // Unmapped in slices of 3 tables' worth: two tables, few slices.
        let mut from = at;
        let mut slices = 0;
        loop {
            let (id, len, resume) = space.unmap_shared_slice(&mut memory, at, from, 3 * 17).unwrap();
            assert_eq!((id, len), (7, 4 << 20));
            slices += 1;
            match resume {
                Some(resume) => from = resume,
                None => break,
            }
        }
        assert!(slices <= 3, "{slices} slices for 1024 pages");
        assert!(memory.flushes - flushes <= 4, "{} flushes", memory.flushes - flushes);
        assert!(frames.iter().all(|&f| memory.owner(f) == Some(FrameOwner::Shared(7))));
        // The anonymous page's table and the rest of the tree are untouched.
        assert!(paging::translate(&mut Tables::new(&mut memory, 1), space.pml4(), next).is_some());
        assert!(paging::translate(&mut Tables::new(&mut memory, 1), space.pml4(), at).is_none());
        space.unmap_slice(&mut memory, next, PAGE_SIZE, next, u64::MAX).unwrap();
        assert_eq!(space.table_pages(), before, "every table the mapping used went");
    }

    /// A dead process's address space torn down in small slices frees
    /// exactly what the one-walk teardown frees, each slice making progress.
    #[test]
    fn a_dead_address_space_is_torn_down_in_bounded_slices() {
        let build = |memory: &mut FakeMemory| {
            let mut space = space(memory, Quotas::default());
            let at = space.map_anonymous(64 << 21, RW).unwrap();
            for i in 0..64 {
                space.handle_page_fault(memory, at + (i << 21) + 0x3000, PF_WRITE).unwrap();
            }
            space
        };
        let mut memory = FakeMemory::new();
        let baseline = memory.allocator.free_frames();
        let reference = build(&mut memory);
        let held = baseline - memory.allocator.free_frames();
        reference.destroy_in_one_walk(&mut memory);
        let freed_by_one_walk = memory.allocator.free_frames();

        let mut memory = FakeMemory::new();
        let mut space = build(&mut memory);
        assert_eq!(baseline - memory.allocator.free_frames(), held);
        space.release_map();
        let (mut from, mut slices) = (0, 0);
        while let Some(resume) = space.destroy_slice(&mut memory, from, 100) {
            assert!(resume > from, "every slice makes progress");
            from = resume;
            slices += 1;
        }
        assert!(slices >= 64 * 17 / 100, "{slices} slices");
        assert_eq!(memory.allocator.free_frames(), freed_by_one_walk);
        assert_eq!(memory.allocator.free_frames(), baseline - 2, "only the kernel PML4 and the gate remain");
    }

    /// Unlinking pages of an address space no CPU has loaded (a dead
    /// process's, or another process's revoked mapping) flushes nothing and
    /// frees the same; one loaded somewhere is flushed page by page.
    #[test]
    fn an_address_space_loaded_nowhere_is_unmapped_without_flushes() {
        let teardown = |unloaded: bool| {
            let mut memory = FakeMemory::new();
            let mut space = space(&mut memory, Quotas::default());
            let at = space.map_anonymous(8 * PAGE_SIZE, RW).unwrap();
            for page in 0..8 {
                space.handle_page_fault(&mut memory, at + page * PAGE_SIZE, PF_WRITE).unwrap();
            }
            if unloaded {
                memory.unloaded.push(space.pml4());
            }
            let flushes = memory.flushes;
            space.unmap_slice(&mut memory, at, 4 * PAGE_SIZE, at, u64::MAX).unwrap();
            space.release_map();
            while space.destroy_slice(&mut memory, 0, u64::MAX).is_some() {}
            (memory.flushes - flushes, memory.allocator.free_frames())
        };
        let (loaded_flushes, loaded_free) = teardown(false);
        let (unloaded_flushes, unloaded_free) = teardown(true);
        assert!(loaded_flushes >= 8, "each page of a loaded space is flushed: {loaded_flushes}");
        assert_eq!(unloaded_flushes, 0);
        assert_eq!(unloaded_free, loaded_free);
    }

    #[test]
    fn user_buffers_are_checked_against_the_callers_mappings() {
        let mut memory = FakeMemory::new();
        let mut space = space(&mut memory, Quotas::default());
        let ro = space.map_anonymous(4096, PROT_READ).unwrap();
        let rw = space.map_anonymous(0x2000, RW).unwrap();
        assert_eq!(space.user_buffer(&mut memory, ro, 16, true), err(SysError::BadAddress), "read-only");
        assert_eq!(
            space.user_buffer(&mut memory, ro + 4090, 16, false),
            err(SysError::BadAddress),
            "into the guard"
        );
        assert_eq!(
            space.user_buffer(&mut memory, 0xffff_8000_0000_0000, 8, false),
            err(SysError::BadAddress)
        );
        assert_eq!(space.user_buffer(&mut memory, u64::MAX - 2, 8, false), err(SysError::Overflow));
        assert_eq!(space.user_buffer(&mut memory, rw, 4097, false), err(SysError::TooLarge));
        assert_eq!(
            space.user_buffer(&mut memory, GATE_VA, 8, true),
            err(SysError::BadAddress),
            "the gate is read-only"
        );
        assert_eq!(space.resident_pages(), 0, "refused buffers fault nothing in");
        let chunks = space.user_buffer(&mut memory, rw + 4000, 200, true).unwrap();
        let pieces: Vec<Chunk> = chunks.iter().collect();
        assert_eq!(pieces.len(), 2);
        assert_eq!((pieces[0].len, pieces[1].len), (96, 104));
        assert_eq!(space.resident_pages(), 2, "demand-zero pages were faulted in");
        // A buffer page over the resident quota is a quota refusal (the
        // system call logs it and applies the policy), not a bare error.
        let tight = Quotas { max_resident: space.charged_pages() * 4096, ..Quotas::default() };
        space.quotas = tight;
        let more = space.map_anonymous(4096, RW).unwrap();
        assert!(matches!(
            space.user_buffer(&mut memory, more, 8, true),
            Err(Refusal::Quota { kind: QuotaKind::Resident, .. })
        ));
    }

    #[test]
    fn revoked_ranges_are_not_charged_bounded_and_releasable() {
        let mut memory = FakeMemory::new();
        let mut space = space(&mut memory, Quotas::default());
        let frame = memory.alloc_frame(FrameOwner::Shared(9)).unwrap();
        let entries = space.regions.len();
        let mut last = 0;
        for _ in 0..3 * REVOKED_MAX {
            space.map_shared(&mut memory, 9, &[frame], false).unwrap();
            last = space.revoke_shared(&mut memory, 9).unwrap();
            assert!(space.revoked_ranges() <= REVOKED_MAX);
            assert!(space.check_mappings(MAPPINGS_MAX - entries).is_ok(), "revoked ranges are not charged");
        }
        assert_eq!(space.revoked_ranges(), REVOKED_MAX);
        assert_eq!(space.regions.len(), entries + REVOKED_MAX);
        // The newest survives the kernel's own releases; it faults as revoked.
        assert_eq!(space.handle_page_fault(&mut memory, last, 4), Err(FaultKind::UseAfterRevoke));
        assert_eq!(space.release_revoked(last), Some(9));
        assert_eq!(space.release_revoked(last), None);
        assert_eq!(space.handle_page_fault(&mut memory, last, 4), Err(FaultKind::UnmappedAccess));
        assert_eq!(space.revoked_ranges(), REVOKED_MAX - 1);
        assert_eq!(space.table_pages(), 4, "the shared mappings' tables were freed");
    }

    #[test]
    fn shared_mappings_are_revoked_in_place_and_never_free_region_frames() {
        let mut memory = FakeMemory::new();
        let mut space = space(&mut memory, Quotas { max_shared: 3 * 4096, ..Quotas::default() });
        let frames: Vec<u64> = (0..2).map(|_| memory.alloc_frame(FrameOwner::Shared(9)).unwrap()).collect();
        assert!(space.charge_shared(2 * 4096).is_ok());
        assert!(matches!(space.charge_shared(2 * 4096), Err(Refusal::Quota { kind: QuotaKind::Shared, .. })));
        let at = space.map_shared(&mut memory, 9, &frames, false).unwrap();
        let t = paging::translate(&mut Tables::new(&mut memory, 1), space.pml4(), at + 4096).unwrap();
        assert_eq!(t.phys, frames[1]);
        assert!(t.flags.contains(Flags::NO_EXECUTE) && !t.flags.contains(Flags::WRITABLE));
        assert_eq!(
            space.handle_page_fault(&mut memory, at, USER_WRITE | PF_PRESENT),
            Err(FaultKind::WriteToReadOnly)
        );
        assert_eq!(space.protect(&mut memory, at, 0x2000, RW), err(SysError::NotPermitted));
        assert_eq!(
            space.unmap(&mut memory, at, 0x2000),
            err(SysError::BadAddress),
            "mem_unmap is not for shm"
        );
        assert_eq!(space.revoke_shared(&mut memory, 9), Some(at));
        assert_eq!(paging::translate(&mut Tables::new(&mut memory, 1), space.pml4(), at), None);
        assert_eq!(space.handle_page_fault(&mut memory, at + 8, 4), Err(FaultKind::UseAfterRevoke));
        // The revoked range is never handed out again.
        assert!(space.map_anonymous(0x1000, RW).unwrap() > at + 0x2000);
        assert_eq!(space.unmap_shared(&mut memory, at), Err(SysError::BadAddress));
        // The virtual quota covers shared mappings too.
        let mut tight = AddressSpace::new(
            &mut memory,
            2,
            space.pml4(),
            frames[0],
            Quotas { max_virtual: 9 * 4096, ..Quotas::default() },
        );
        if let Some(tight) = tight.as_mut() {
            assert!(matches!(
                tight.map_shared(&mut memory, 9, &frames, false),
                Err(Refusal::Quota { kind: QuotaKind::Virtual, .. })
            ));
        }
        if let Some(tight) = tight {
            tight.destroy(&mut memory);
        }
        space.destroy(&mut memory);
        assert!(
            frames.iter().all(|&f| memory.owner(f) == Some(FrameOwner::Shared(9))),
            "region frames survive"
        );
    }

    #[derive(Clone, Debug)]
    enum Op {
        Map(u8, bool),
        Touch(u8, u8, bool),
        Unmap(u8, u8, u8),
        Protect(u8),
        Exit,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u8..6, any::<bool>()).prop_map(|(p, w)| Op::Map(p, w)),
            (any::<u8>(), any::<u8>(), any::<bool>()).prop_map(|(m, p, w)| Op::Touch(m, p, w)),
            (any::<u8>(), any::<u8>(), 1u8..4).prop_map(|(m, p, n)| Op::Unmap(m, p, n)),
            any::<u8>().prop_map(Op::Protect),
            Just(Op::Exit),
        ]
    }

    /// Every present user leaf of `space`, with its frame's owner.
    fn leaves(memory: &mut FakeMemory, space: &AddressSpace) -> Vec<(u64, u64, Flags)> {
        let mut found = Vec::new();
        for region in space.regions() {
            for page in (region.start..region.end).step_by(4096) {
                if let Some(t) = paging::translate(&mut Tables::new(&mut *memory, 0), space.pml4(), page) {
                    found.push((page, t.phys, t.flags));
                }
            }
        }
        found
    }

    proptest! {
        /// Random map/touch/unmap/protect/exit sequences over three processes
        /// keep the ownership table and the page tables in agreement, never
        /// map a frame twice, keep the counters exact, and leak nothing.
        #[test]
        fn random_sequences_keep_ownership_consistent(ops in prop::collection::vec((0usize..3, op()), 1..120)) {
            let mut memory = FakeMemory::new();
            let (kernel_pml4, gate) = kernel_setup(&mut memory);
            let baseline = memory.allocator.free_frames();
            let quotas = Quotas { max_virtual: 0, max_resident: 24 * 4096, max_shared: 0, kill: false };
            let mut spaces: Vec<Option<AddressSpace>> = (1..=3)
                .map(|pid| AddressSpace::new(&mut memory, pid, kernel_pml4, gate, quotas))
                .collect();
            let mut maps: Vec<Vec<(u64, u64)>> = vec![Vec::new(); 3];
            for (who, op) in ops {
                let Some(space) = spaces[who].as_mut() else { continue };
                match op {
                    Op::Map(pages, writable) => {
                        let prot = if writable { RW } else { PROT_READ };
                        if let Ok(addr) = space.map_anonymous(u64::from(pages) * 4096, prot) {
                            maps[who].push((addr, u64::from(pages)));
                        }
                    }
                    Op::Touch(m, p, write) if !maps[who].is_empty() => {
                        let (addr, pages) = maps[who][m as usize % maps[who].len()];
                        let va = addr + (u64::from(p) % pages) * 4096;
                        let code = if write { USER_WRITE } else { 4 };
                        let _ = space.handle_page_fault(&mut memory, va, code);
                    }
                    Op::Unmap(m, p, n) if !maps[who].is_empty() => {
                        let index = m as usize % maps[who].len();
                        let (addr, pages) = maps[who][index];
                        let first = u64::from(p) % pages;
                        let count = u64::from(n).min(pages - first);
                        // In slices of a small budget, as the kernel runs it.
                        let (start, len) = (addr + first * 4096, count * 4096);
                        let mut from = start;
                        let unmapped = loop {
                            match space.unmap_slice(&mut memory, start, len, from, 40) {
                                Ok((_, Some(resume))) => {
                                    prop_assert!(resume > from);
                                    from = resume;
                                }
                                Ok((_, None)) => break true,
                                Err(_) => break false,
                            }
                        };
                        if unmapped {
                            maps[who].remove(index);
                            if first > 0 {
                                maps[who].push((addr, first));
                            }
                            if first + count < pages {
                                maps[who].push((addr + (first + count) * 4096, pages - first - count));
                            }
                        }
                    }
                    Op::Protect(m) if !maps[who].is_empty() => {
                        let (addr, pages) = maps[who][m as usize % maps[who].len()];
                        prop_assert!(space.protect(&mut memory, addr, pages * 4096, PROT_READ).is_ok());
                    }
                    Op::Exit => {
                        spaces[who].take().unwrap().destroy(&mut memory);
                        maps[who].clear();
                    }
                    _ => {}
                }
                // Invariants after every step.
                let mut seen = std::collections::BTreeSet::new();
                for (pid, space) in spaces.iter().enumerate().filter_map(|(i, s)| s.as_ref().map(|s| (i as u32 + 1, s))) {
                    let leaves = leaves(&mut memory, space);
                    let mut private = 0;
                    for (va, frame, flags) in leaves {
                        let region = space.regions().iter().find(|r| r.start <= va && va < r.end).unwrap();
                        if frame == gate {
                            prop_assert_eq!(region.kind, RegionKind::Gate);
                            continue;
                        }
                        prop_assert!(seen.insert(frame), "frame {:#x} mapped twice", frame);
                        prop_assert_eq!(memory.owner(frame), Some(FrameOwner::Private(pid)));
                        prop_assert!(flags.contains(Flags::NO_EXECUTE));
                        prop_assert!(!flags.contains(Flags::WRITABLE) || region.kind.is_writable());
                        private += 1;
                    }
                    prop_assert_eq!(private, space.resident_pages());
                    // Page tables: counted exactly, charged, and none left empty.
                    let tables: Vec<u64> = (FAKE_RAM.0..FAKE_RAM.1)
                        .step_by(4096)
                        .filter(|&f| memory.owner(f) == Some(FrameOwner::PageTable(pid)))
                        .collect();
                    prop_assert_eq!(tables.len() as u64, space.table_pages());
                    prop_assert!(space.charged_pages() * 4096 <= quotas.max_resident);
                    for &table in tables.iter().filter(|&&t| t != space.pml4()) {
                        prop_assert!(
                            memory.table(table).iter().any(|e| !e.is_unused()),
                            "empty table {:#x} kept", table
                        );
                    }
                    let regions_bytes: u64 = space.regions().iter().filter(|r| counts_as_virtual(r.kind)).map(|r| r.end - r.start).sum();
                    prop_assert_eq!(regions_bytes, space.virtual_bytes());
                    prop_assert!(space.regions().windows(2).all(|w| w[0].end <= w[1].start));
                }
            }
            for space in spaces.into_iter().flatten() {
                space.destroy(&mut memory);
            }
            prop_assert_eq!(memory.allocator.free_frames(), baseline, "frames leaked");
        }
    }
}
