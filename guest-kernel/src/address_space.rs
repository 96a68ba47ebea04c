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
    GATE_VA, PAGE_SIZE, USER_MMAP_BASE, USER_MMAP_LIMIT, USER_MMAP_MAX, USER_STACK_GUARD_PAGES,
    USER_STACK_PAGES, USER_STACK_TOP, USER_STATE_VA,
};
use superos_protocol::ownership::FrameOwner;
use superos_protocol::syscall::{MemStat, SysError, MAPPINGS_MAX, PROT_EXEC, PROT_READ, PROT_WRITE};
use x86_64::structures::paging::{PageTable, PageTableFlags as Flags};

/// What the address space needs from physical memory.
pub trait Memory {
    /// The page table stored in `frame`.
    fn table(&mut self, frame: u64) -> &mut PageTable;
    /// A zeroed frame owned by `owner`, or `None` when memory is exhausted.
    fn alloc_frame(&mut self, owner: FrameOwner) -> Option<u64>;
    /// Scrubs and frees a frame.
    fn release_frame(&mut self, frame: u64);
    /// The recorded owner of a frame (`None` if not managed).
    fn owner(&self, frame: u64) -> Option<FrameOwner>;
    /// Invalidates any cached translation of `va` in the address space whose
    /// PML4 is `pml4` (a no-op unless it is the live one).
    fn flush(&mut self, pml4: u64, va: u64);
    /// Whether the kernel heap can spare `bytes` for bookkeeping a process
    /// asked for (a shared region's frame list) and still keep the reserve
    /// the kernel needs for its own work.
    fn heap_room(&self, bytes: usize) -> bool;
}

/// Page tables of one process: table frames are owned `PageTable(pid)`.
struct Tables<'m, M: Memory> {
    memory: &'m mut M,
    pid: u32,
}

impl<M: Memory> PageTableMemory for Tables<'_, M> {
    fn table(&mut self, frame: u64) -> &mut PageTable {
        self.memory.table(frame)
    }
    fn alloc_table(&mut self) -> Option<u64> {
        self.memory.alloc_frame(FrameOwner::PageTable(self.pid))
    }
    fn free_table(&mut self, frame: u64) {
        self.memory.release_frame(frame);
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
        let slot = self.items.iter_mut().find(|s| s.is_none()).expect("at most two pieces");
        *slot = Some(chunk);
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
}

/// Largest user buffer a system call may name (so that it spans at most two
/// pages).
pub const MAX_USER_BUFFER: u64 = PAGE_SIZE;

/// One process's address space.
pub struct AddressSpace {
    pid: u32,
    pml4: u64,
    /// Sorted, disjoint.
    regions: Vec<Region>,
    virtual_bytes: u64,
    resident_pages: u64,
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
            virtual_bytes: 0,
            resident_pages: 0,
            shared_bytes: 0,
            quotas,
            pressure_reported: [false; 2],
        };
        space.regions.push(Region { start: guard_bottom, end: stack_bottom, kind: RegionKind::StackGuard });
        space.insert_region(Region { start: stack_bottom, end: USER_STACK_TOP, kind: RegionKind::Stack });
        space.regions.push(Region { start: GATE_VA, end: GATE_VA + PAGE_SIZE, kind: RegionKind::Gate });
        let gate = paging::map(
            &mut Tables { memory, pid },
            pml4,
            GATE_VA,
            gate_frame,
            PageSize::Size4K,
            Flags::USER_ACCESSIBLE,
            USER_TABLE_FLAGS,
        );
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

    /// The process's quotas.
    pub fn quotas(&self) -> Quotas {
        self.quotas
    }

    fn insert_region(&mut self, region: Region) {
        let at = self.regions.partition_point(|r| r.start < region.start);
        self.regions.insert(at, region);
        if counts_as_virtual(region.kind) {
            self.virtual_bytes += region.end - region.start;
        }
    }

    fn region_at(&self, va: u64) -> Option<&Region> {
        let index = self.regions.partition_point(|r| r.end <= va);
        self.regions.get(index).filter(|r| r.start <= va)
    }

    /// Checks that the map has room for `more` entries ([`MAPPINGS_MAX`]).
    fn check_mappings(&self, more: usize) -> Result<(), Refusal> {
        let requested = self.regions.len() + more;
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
        self.check_resident(1)?;
        let frame = memory.alloc_frame(FrameOwner::Private(self.pid)).ok_or(SysError::OutOfMemory)?;
        let mapped = paging::map(
            &mut Tables { memory, pid: self.pid },
            self.pml4,
            va,
            frame,
            PageSize::Size4K,
            flags | Flags::USER_ACCESSIBLE,
            USER_TABLE_FLAGS,
        );
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

    fn check_resident(&self, pages: u64) -> Result<(), Refusal> {
        let requested = (self.resident_pages + pages) * PAGE_SIZE;
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
        if self.check_resident(1).is_err() {
            return Err(FaultKind::ResidentQuotaExceeded);
        }
        let mut flags = Flags::NO_EXECUTE;
        if kind.is_writable() {
            flags |= Flags::WRITABLE;
        }
        self.map_private_page(memory, page, flags).map_err(|_| FaultKind::OutOfMemory)
    }

    /// The physical pieces of the user buffer `[addr, addr + len)`, checked
    /// against the caller's own mappings: every page must be user-accessible,
    /// and writable if `write`. Untouched demand-zero pages are faulted in.
    pub fn user_buffer<M: Memory>(
        &mut self,
        memory: &mut M,
        addr: u64,
        len: u64,
        write: bool,
    ) -> Result<Chunks, SysError> {
        let mut chunks = Chunks::default();
        if len == 0 {
            return Ok(chunks);
        }
        if len > MAX_USER_BUFFER {
            return Err(SysError::TooLarge);
        }
        let end = addr.checked_add(len).ok_or(SysError::Overflow)?;
        if !superos_protocol::layout::is_user_range(addr, len) {
            return Err(SysError::BadAddress);
        }
        // Check every page before faulting any in, so a bad buffer changes
        // nothing. A buffer spans at most two pages; remember each page's
        // translation so it is walked only once.
        let first = addr & !(PAGE_SIZE - 1);
        let mut frames: [Option<u64>; 2] = [None; 2];
        for (slot, page) in (first..end).step_by(PAGE_SIZE as usize).enumerate() {
            let present =
                paging::translate(&mut Tables { memory: &mut *memory, pid: self.pid }, self.pml4, page);
            let allowed = match present {
                Some(t) => {
                    frames[slot] = Some(t.phys);
                    t.flags.contains(Flags::USER_ACCESSIBLE) && (!write || t.flags.contains(Flags::WRITABLE))
                }
                None => self
                    .region_at(page)
                    .is_some_and(|r| r.kind.is_demand_zero() && (!write || r.kind.is_writable())),
            };
            if !allowed {
                return Err(SysError::BadAddress);
            }
        }
        let mut va = addr;
        for (slot, page) in (first..end).step_by(PAGE_SIZE as usize).enumerate() {
            let phys = match frames[slot] {
                Some(phys) => phys,
                None => {
                    let kind = self.region_at(page).map(|r| r.kind).ok_or(SysError::BadAddress)?;
                    self.fault_in(memory, page, kind).map_err(|fault| match fault {
                        FaultKind::ResidentQuotaExceeded => SysError::QuotaExceeded,
                        _ => SysError::OutOfMemory,
                    })?
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
                self.regions.insert(index + 1, Region { start: at, ..region });
            }
        }
    }

    /// `mem_unmap(addr, len)`: removes whole pages of `mem_map` memory,
    /// scrubbing and freeing those that were resident. Returns the number of
    /// resident pages freed.
    /// Refused if a hole in the middle of a mapping would need a map entry
    /// more than [`MAPPINGS_MAX`].
    pub fn unmap<M: Memory>(&mut self, memory: &mut M, addr: u64, len: u64) -> Result<u64, Refusal> {
        let end = self.check_anonymous_range(addr, len)?;
        // Regions are sorted and disjoint: those overlapping [addr, end) form
        // one run, found by two binary searches.
        let removed =
            self.regions.partition_point(|r| r.start < end) - self.regions.partition_point(|r| r.end <= addr);
        self.check_mappings(self.splits_needed(addr, end).saturating_sub(removed))?;
        let mut freed = 0;
        for page in (addr..end).step_by(PAGE_SIZE as usize) {
            if let Some(frame) =
                paging::unmap(&mut Tables { memory: &mut *memory, pid: self.pid }, self.pml4, page)
            {
                memory.flush(self.pml4, page);
                memory.release_frame(frame);
                self.resident_pages -= 1;
                freed += 1;
            }
        }
        self.split_at(addr);
        self.split_at(end);
        self.regions.retain(|r| r.end <= addr || r.start >= end);
        self.virtual_bytes -= end - addr;
        Ok(freed)
    }

    /// `mem_protect(addr, len, prot)`: rights can only be removed.
    pub fn protect<M: Memory>(
        &mut self,
        memory: &mut M,
        addr: u64,
        len: u64,
        prot: u64,
    ) -> Result<(), Refusal> {
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
                for page in (region.start..region.end).step_by(PAGE_SIZE as usize) {
                    if self.clear_writable(memory, page) {
                        memory.flush(self.pml4, page);
                    }
                }
            }
            self.regions[index].kind = RegionKind::Shared { region: id, writable };
            return Ok(());
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
            for page in (addr..end).step_by(PAGE_SIZE as usize) {
                if self.clear_writable(memory, page) {
                    memory.flush(self.pml4, page);
                }
            }
        }
        self.split_at(addr);
        self.split_at(end);
        for region in self.regions.iter_mut().filter(|r| r.start >= addr && r.end <= end) {
            region.kind = RegionKind::Anonymous { writable };
        }
        Ok(())
    }

    /// Clears the writable bit of the leaf mapping `page`, if present.
    fn clear_writable<M: Memory>(&mut self, memory: &mut M, page: u64) -> bool {
        let mut tables = Tables { memory, pid: self.pid };
        let mut table = self.pml4;
        for level in (2..=4u32).rev() {
            let entry = &tables.table(table)[((page >> (12 + 9 * (level - 1))) & 0x1ff) as usize];
            if !entry.flags().contains(Flags::PRESENT) {
                return false;
            }
            table = entry.addr().as_u64();
        }
        let entry = &mut tables.table(table)[((page >> 12) & 0x1ff) as usize];
        if !entry.flags().contains(Flags::PRESENT) {
            return false;
        }
        let flags = entry.flags() - Flags::WRITABLE;
        let frame = entry.addr();
        entry.set_addr(frame, flags);
        true
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
        let mut candidate = USER_MMAP_BASE;
        for region in self.regions.iter().filter(|r| r.end > USER_MMAP_BASE && r.start < USER_MMAP_LIMIT) {
            if candidate + len + PAGE_SIZE <= region.start {
                break;
            }
            candidate = candidate.max(region.end + PAGE_SIZE);
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
        let len = frames.len() as u64 * PAGE_SIZE;
        self.check_virtual(len)?;
        self.check_mappings(1)?;
        let start = self.place(len)?;
        let mut flags = Flags::USER_ACCESSIBLE | Flags::NO_EXECUTE;
        if writable {
            flags |= Flags::WRITABLE;
        }
        for (i, &frame) in frames.iter().enumerate() {
            let va = start + i as u64 * PAGE_SIZE;
            let mapped = paging::map(
                &mut Tables { memory: &mut *memory, pid: self.pid },
                self.pml4,
                va,
                frame,
                PageSize::Size4K,
                flags,
                USER_TABLE_FLAGS,
            );
            if mapped.is_err() {
                for undo in (start..va).step_by(PAGE_SIZE as usize) {
                    paging::unmap(&mut Tables { memory: &mut *memory, pid: self.pid }, self.pml4, undo);
                }
                return Err(SysError::OutOfMemory.into());
            }
        }
        self.insert_region(Region { start, end: start + len, kind: RegionKind::Shared { region, writable } });
        Ok(start)
    }

    fn remove_shared_mapping<M: Memory>(&mut self, memory: &mut M, index: usize) -> Region {
        let region = self.regions[index];
        for page in (region.start..region.end).step_by(PAGE_SIZE as usize) {
            if paging::unmap(&mut Tables { memory: &mut *memory, pid: self.pid }, self.pml4, page).is_some() {
                memory.flush(self.pml4, page);
            }
        }
        self.virtual_bytes -= region.end - region.start;
        region
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
        Some(removed.start)
    }

    /// Reports each quota whose usage has crossed 90% since the last call
    /// (once per crossing; re-armed when usage drops below).
    pub fn pressure_crossings(&mut self) -> impl Iterator<Item = (QuotaKind, u64, u64)> {
        let usage = [
            (QuotaKind::Virtual, self.virtual_bytes, self.quotas.max_virtual),
            (QuotaKind::Resident, self.resident_pages * PAGE_SIZE, self.quotas.max_resident),
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
    pub fn destroy<M: Memory>(self, memory: &mut M) {
        let pid = self.pid;
        // Frames are released as the walk unlinks them: collecting them first
        // would need a heap allocation proportional to the process's size.
        paging::free_user_half(
            &mut Tables { memory: &mut *memory, pid },
            self.pml4,
            |tables, _, frame, _| {
                if tables.memory.owner(frame) == Some(FrameOwner::Private(pid)) {
                    tables.memory.release_frame(frame);
                }
            },
        );
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
        fn flush(&mut self, _pml4: u64, _va: u64) {
            self.flushes += 1;
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
        let mapped =
            paging::translate(&mut Tables { memory: &mut memory, pid: 1 }, space.pml4(), USER_STATE_VA)
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
        // A full resident quota refuses it (spawn then fails).
        let quotas = Quotas { max_resident: 4096, ..Quotas::default() };
        let mut tight = self::space(&mut memory, quotas);
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
        let frame =
            paging::translate(&mut Tables { memory: &mut memory, pid: 1 }, space.pml4(), a + 0x1000).unwrap();
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
        let t = paging::translate(&mut Tables { memory: &mut memory, pid: 1 }, space.pml4(), rw).unwrap();
        assert!(!t.flags.contains(Flags::WRITABLE));
        let guard = USER_STACK_TOP - (USER_STACK_PAGES + 1) * PAGE_SIZE;
        assert_eq!(space.handle_page_fault(&mut memory, guard + 8, USER_WRITE), Err(FaultKind::StackGuard));
        space.handle_page_fault(&mut memory, USER_STACK_TOP - 8, USER_WRITE).unwrap();
    }

    #[test]
    fn quotas_refuse_mappings_and_resident_growth() {
        let mut memory = FakeMemory::new();
        let quotas = Quotas { max_virtual: 16 * 4096, max_resident: 3 * 4096, max_shared: 0, kill: false };
        let mut space = space(&mut memory, quotas);
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
        let crossings: Vec<_> = space.pressure_crossings().collect();
        assert_eq!(
            crossings,
            vec![(QuotaKind::Virtual, 16 * 4096, 16 * 4096), (QuotaKind::Resident, 3 * 4096, 3 * 4096)]
        );
        assert_eq!(space.pressure_crossings().count(), 0, "reported once per crossing");
    }

    #[test]
    fn user_buffers_are_checked_against_the_callers_mappings() {
        let mut memory = FakeMemory::new();
        let mut space = space(&mut memory, Quotas::default());
        let ro = space.map_anonymous(4096, PROT_READ).unwrap();
        let rw = space.map_anonymous(0x2000, RW).unwrap();
        assert_eq!(space.user_buffer(&mut memory, ro, 16, true), Err(SysError::BadAddress), "read-only");
        assert_eq!(
            space.user_buffer(&mut memory, ro + 4090, 16, false),
            Err(SysError::BadAddress),
            "into the guard"
        );
        assert_eq!(
            space.user_buffer(&mut memory, 0xffff_8000_0000_0000, 8, false),
            Err(SysError::BadAddress)
        );
        assert_eq!(space.user_buffer(&mut memory, u64::MAX - 2, 8, false), Err(SysError::Overflow));
        assert_eq!(space.user_buffer(&mut memory, rw, 4097, false), Err(SysError::TooLarge));
        assert_eq!(
            space.user_buffer(&mut memory, GATE_VA, 8, true),
            Err(SysError::BadAddress),
            "the gate is read-only"
        );
        assert_eq!(space.resident_pages(), 0, "refused buffers fault nothing in");
        let chunks = space.user_buffer(&mut memory, rw + 4000, 200, true).unwrap();
        let pieces: Vec<Chunk> = chunks.iter().collect();
        assert_eq!(pieces.len(), 2);
        assert_eq!((pieces[0].len, pieces[1].len), (96, 104));
        assert_eq!(space.resident_pages(), 2, "demand-zero pages were faulted in");
    }

    #[test]
    fn shared_mappings_are_revoked_in_place_and_never_free_region_frames() {
        let mut memory = FakeMemory::new();
        let mut space = space(&mut memory, Quotas { max_shared: 3 * 4096, ..Quotas::default() });
        let frames: Vec<u64> = (0..2).map(|_| memory.alloc_frame(FrameOwner::Shared(9)).unwrap()).collect();
        assert!(space.charge_shared(2 * 4096).is_ok());
        assert!(matches!(space.charge_shared(2 * 4096), Err(Refusal::Quota { kind: QuotaKind::Shared, .. })));
        let at = space.map_shared(&mut memory, 9, &frames, false).unwrap();
        let t =
            paging::translate(&mut Tables { memory: &mut memory, pid: 1 }, space.pml4(), at + 4096).unwrap();
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
        assert_eq!(paging::translate(&mut Tables { memory: &mut memory, pid: 1 }, space.pml4(), at), None);
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
                if let Some(t) =
                    paging::translate(&mut Tables { memory: &mut *memory, pid: 0 }, space.pml4(), page)
                {
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
                        if space.unmap(&mut memory, addr + first * 4096, count * 4096).is_ok() {
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
