//! Building, querying and tearing down 4-level x86-64 page tables.
//!
//! The code is generic over [`PageTableMemory`]: how page-table frames are
//! reached and where new ones come from (the kernel's direct map and frame
//! allocator in the guest, a map of boxed tables in host tests). It uses
//! the `x86_64` crate's `PageTable` and `PageTableFlags` types.
//!
//! Invariant: intermediate entries of user mappings carry
//! `PRESENT | WRITABLE | USER_ACCESSIBLE` and never restrict anything; all
//! permissions (`WRITABLE`, `USER_ACCESSIBLE`, `NO_EXECUTE`) are decided by the
//! leaf entry alone, so the VMM's walk and the kernel's agree on what a leaf means.

use superos_protocol::layout::PAGE_SIZE;
use x86_64::structures::paging::{PageTable, PageTableFlags as Flags};
use x86_64::PhysAddr;

/// Access to page-table frames by physical address, and a source of new ones.
pub trait PageTableMemory {
    /// Returns the page table stored in the frame at `frame`.
    fn table(&mut self, frame: u64) -> &mut PageTable;
    /// Allocates a zeroed frame for a new table, or `None` when out of memory.
    fn alloc_table(&mut self) -> Option<u64>;
    /// Releases a table frame; the implementation scrubs it.
    fn free_table(&mut self, frame: u64);
    /// Whether every entry of the table at `frame` is unused (all zero).
    /// The kernel's implementation is one `repe scasq`, which the PVM
    /// host's emulator runs as one instruction instead of 512 loop turns.
    fn table_is_empty(&mut self, frame: u64) -> bool {
        self.table(frame).iter().all(|entry| entry.is_unused())
    }
    /// The index of the first used (nonzero) entry of the table at `frame`
    /// in `from..to` (`from <= to <= 512`), or `to`. The kernel's
    /// implementation is one `repe scasq` on the PVM host, as for
    /// `table_is_empty`, and a plain loop elsewhere.
    fn next_used(&mut self, frame: u64, from: usize, to: usize) -> usize {
        first_used(self.table(frame), from, to)
    }
    /// Releases a last-level table [`unmap_tables`] unlinked whole, with its
    /// entries still in it (the implementation may release it later; it is
    /// reachable from no table any more).
    fn detach_table(&mut self, frame: u64) {
        self.free_table(frame);
    }
}

/// Why a mapping could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// The virtual address is already mapped.
    AlreadyMapped,
    /// No frame for an intermediate table.
    OutOfMemory,
    /// A large page already covers the address.
    LargePageInTheWay,
    /// The address is not canonical or not aligned to the page size.
    BadAddress,
}

/// Size of a mapping made by [`map`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    /// A 4 KiB page (level-1 leaf).
    Size4K,
    /// A 2 MiB page (level-2 leaf).
    Size2M,
}

/// The result of [`translate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The physical address the virtual address maps to.
    pub phys: u64,
    /// The leaf entry's flags.
    pub flags: Flags,
}

/// Flags of intermediate entries for user mappings (see the module invariant).
pub const USER_TABLE_FLAGS: Flags = Flags::PRESENT.union(Flags::WRITABLE).union(Flags::USER_ACCESSIBLE);
/// Flags of intermediate entries for kernel mappings.
pub const KERNEL_TABLE_FLAGS: Flags = Flags::PRESENT.union(Flags::WRITABLE);

/// The index of the first used entry of `table` in `from..to`, or `to`
/// (the plain scan behind both `next_used` defaults).
pub fn first_used(table: &PageTable, from: usize, to: usize) -> usize {
    table.iter().take(to).skip(from).position(|entry| !entry.is_unused()).map_or(to, |i| from + i)
}

fn index(va: u64, level: u32) -> usize {
    ((va >> (12 + 9 * (level - 1))) & 0x1ff) as usize
}

fn is_canonical(va: u64) -> bool {
    let top = va >> 47;
    top == 0 || top == 0x1ffff
}

/// Maps `va` to `phys` in the tables rooted at `pml4` with the leaf `flags`
/// (`PRESENT` is added). Intermediate tables are created as needed with
/// `table_flags`.
#[allow(clippy::too_many_arguments)]
pub fn map<M: PageTableMemory>(
    mem: &mut M,
    pml4: u64,
    va: u64,
    phys: u64,
    size: PageSize,
    flags: Flags,
    table_flags: Flags,
) -> Result<(), MapError> {
    let (leaf_level, align) = match size {
        PageSize::Size4K => (1, PAGE_SIZE),
        PageSize::Size2M => (2, 2 << 20),
    };
    if !is_canonical(va) || va % align != 0 || phys % align != 0 {
        return Err(MapError::BadAddress);
    }
    let table = leaf_table(mem, pml4, va, leaf_level, table_flags)?;
    let entry = &mut mem.table(table)[index(va, leaf_level)];
    if !entry.is_unused() {
        return Err(MapError::AlreadyMapped);
    }
    let mut leaf = flags | Flags::PRESENT;
    if size == PageSize::Size2M {
        leaf |= Flags::HUGE_PAGE;
    }
    entry.set_addr(PhysAddr::new(phys), leaf);
    Ok(())
}

/// The table of `leaf_level` whose entry maps `va`, created (with
/// `table_flags` in the entries above it) where missing.
fn leaf_table<M: PageTableMemory>(
    mem: &mut M,
    pml4: u64,
    va: u64,
    leaf_level: u32,
    table_flags: Flags,
) -> Result<u64, MapError> {
    let mut table = pml4;
    for level in (leaf_level + 1..=4).rev() {
        let entry = &mut mem.table(table)[index(va, level)];
        if entry.is_unused() {
            let new = mem.alloc_table().ok_or(MapError::OutOfMemory)?;
            mem.table(table)[index(va, level)].set_addr(PhysAddr::new(new), table_flags);
            table = new;
        } else if entry.flags().contains(Flags::HUGE_PAGE) {
            return Err(MapError::LargePageInTheWay);
        } else {
            table = entry.addr().as_u64();
        }
    }
    Ok(table)
}

/// The entries of `table` as raw words, to fill runs of leaves with one
/// store each (the `x86_64` crate's `set_addr` asserts and masks per entry).
fn words(table: &mut PageTable) -> &mut [u64; 512] {
    // SAFETY: `PageTable` is `repr(C)` over `[PageTableEntry; 512]` and
    // `PageTableEntry` is `repr(transparent)` over `u64` (x86_64 0.15), so
    // the two types have the same layout; the borrow stays exclusive.
    unsafe { &mut *(table as *mut PageTable).cast::<[u64; 512]>() }
}

/// Maps the `pages` 4 KiB pages from `va` to the frames from `phys`, all
/// with the leaf `flags` (`PRESENT` is added), as [`map`] would one by one
/// but descending the tables once per last-level table (the kernel's boot
/// maps its image this way: every ring-0 instruction counts on some hosts).
/// On an error the pages before the failing one stay mapped.
#[allow(clippy::too_many_arguments)]
pub fn map_4k_run<M: PageTableMemory>(
    mem: &mut M,
    pml4: u64,
    va: u64,
    phys: u64,
    pages: u64,
    flags: Flags,
    table_flags: Flags,
) -> Result<(), MapError> {
    let end =
        pages.checked_mul(PAGE_SIZE).and_then(|bytes| va.checked_add(bytes)).ok_or(MapError::BadAddress)?;
    if !is_canonical(va)
        || va % PAGE_SIZE != 0
        || phys % PAGE_SIZE != 0
        || (pages > 0 && !is_canonical(end - 1))
    {
        return Err(MapError::BadAddress);
    }
    let leaf = flags | Flags::PRESENT;
    let mut done = 0;
    while done < pages {
        let at = va + done * PAGE_SIZE;
        let table = leaf_table(mem, pml4, at, 1, table_flags)?;
        let first = index(at, 1);
        let count = (512 - first as u64).min(pages - done) as usize;
        if mem.next_used(table, first, first + count) < first + count {
            return Err(MapError::AlreadyMapped);
        }
        let mut entry = (phys + done * PAGE_SIZE) | leaf.bits();
        for word in &mut words(mem.table(table))[first..first + count] {
            *word = entry;
            entry += PAGE_SIZE;
        }
        done += count as u64;
    }
    Ok(())
}

/// Maps the 2 MiB range at `va` to the 2 MiB at `phys` with one last-level
/// table of 4 KiB leaves (where a single large page would give every page the
/// same rights): every page gets `flags`, except those whose frame lies in
/// `except.0`, which get `except.1` (`PRESENT` is added). Used for the direct
/// map around the kernel image, so that the kernel's own text and read-only
/// data have no writable alias. The leaves are written in up to three runs
/// of equal rights, a few instructions each (boot maps this table in ring
/// 0, which the PVM host emulates instruction by instruction).
pub fn map_2m_as_4k<M: PageTableMemory>(
    mem: &mut M,
    pml4: u64,
    va: u64,
    phys: u64,
    table_flags: Flags,
    flags: Flags,
    except: (core::ops::Range<u64>, Flags),
) -> Result<(), MapError> {
    const LARGE: u64 = 2 << 20;
    if va % LARGE != 0 || phys % LARGE != 0 {
        return Err(MapError::BadAddress);
    }
    let (range, except_flags) = except;
    let first_flags = if range.contains(&phys) { except_flags } else { flags };
    map(mem, pml4, va, phys, PageSize::Size4K, first_flags, table_flags)?;
    let mut table = pml4;
    for level in (2..=4).rev() {
        table = mem.table(table)[index(va, level)].addr().as_u64();
    }
    if mem.next_used(table, 1, 512) < 512 {
        return Err(MapError::AlreadyMapped);
    }
    // The page indices whose frames lie in `range`: `from..to`, within 1..512.
    let page_index = |pa: u64| (pa.saturating_sub(phys).div_ceil(PAGE_SIZE)).clamp(1, 512) as usize;
    let (from, to) = (page_index(range.start), page_index(range.end).max(page_index(range.start)));
    let words = words(mem.table(table));
    for (run, bits) in [(1..from, flags), (from..to, except_flags), (to..512, flags)] {
        let mut leaf = (phys + run.start as u64 * PAGE_SIZE) | (bits | Flags::PRESENT).bits();
        for word in &mut words[run] {
            *word = leaf;
            leaf += PAGE_SIZE;
        }
    }
    Ok(())
}

/// Translates `va` through the tables rooted at `pml4`, honouring 2 MiB and
/// 1 GiB leaves. Returns `None` if any level is not present.
pub fn translate<M: PageTableMemory>(mem: &mut M, pml4: u64, va: u64) -> Option<Translation> {
    if !is_canonical(va) {
        return None;
    }
    let mut table = pml4;
    for level in (1..=4).rev() {
        let entry = &mem.table(table)[index(va, level)];
        let flags = entry.flags();
        if !flags.contains(Flags::PRESENT) {
            return None;
        }
        let is_leaf = level == 1 || (level <= 3 && flags.contains(Flags::HUGE_PAGE));
        if is_leaf {
            let page_mask = (1u64 << (12 + 9 * (level - 1))) - 1;
            let base = entry.addr().as_u64() & !page_mask;
            return Some(Translation { phys: base | (va & page_mask), flags });
        }
        table = entry.addr().as_u64();
    }
    None
}

/// Removes the 4 KiB mapping of `va` and returns the frame it mapped. Empty
/// intermediate tables are kept (they are freed with the address space).
pub fn unmap<M: PageTableMemory>(mem: &mut M, pml4: u64, va: u64) -> Option<u64> {
    let mut table = pml4;
    for level in (2..=4).rev() {
        let entry = &mem.table(table)[index(va, level)];
        if !entry.flags().contains(Flags::PRESENT) || entry.flags().contains(Flags::HUGE_PAGE) {
            return None;
        }
        table = entry.addr().as_u64();
    }
    let entry = &mut mem.table(table)[index(va, 1)];
    if !entry.flags().contains(Flags::PRESENT) {
        return None;
    }
    let frame = entry.addr().as_u64();
    entry.set_unused();
    Some(frame)
}

/// Bytes one table of `level` (1 = page table ... 4 = PML4) spans.
const fn span(level: u32) -> u64 {
    PAGE_SIZE << (9 * level)
}

/// How many table frames mapping every 4 KiB page of `[start, end)` (in the
/// user half) would allocate: the tables missing under `pml4`, each counted
/// once. The work is one walk per 2 MiB of the range, so callers bound the
/// range first.
pub fn missing_tables<M: PageTableMemory>(mem: &mut M, pml4: u64, start: u64, end: u64) -> u64 {
    let mut count = 0;
    // The base of the last span counted as missing, per table level.
    let mut counted = [u64::MAX; 4];
    let mut va = start & !(span(1) - 1);
    while va < end {
        let mut table = pml4;
        for level in (2..=4).rev() {
            let entry = &mem.table(table)[index(va, level)];
            if !entry.flags().contains(Flags::PRESENT) {
                for missing in 1..level {
                    let base = va & !(span(missing) - 1);
                    if counted[missing as usize] != base {
                        counted[missing as usize] = base;
                        count += 1;
                    }
                }
                break;
            }
            table = entry.addr().as_u64();
        }
        va += span(1);
    }
    count
}

/// Removes every 4 KiB leaf of `[start, end)` (page-aligned, user half)
/// under `pml4`: `on_leaf(mem, va, frame)` is called for each as soon as it
/// is unlinked, and every table the range leaves empty is unlinked and freed
/// (`on_table(mem, va)` is called with an address it covered, for the
/// caller's TLB flush, before the frame is freed). The PML4 stays. The work
/// is proportional to the tables present under the range, not to its
/// length: an absent entry skips everything it would span. A table the range
/// covers only in part is scanned once (512 entries) to see whether it is
/// empty.
///
/// `budget` bounds the work, in units: [`ENTRY_UNITS`] for every entry
/// looked at, [`PRESENT_UNITS`] more for a present one, [`SCAN_UNITS`] for
/// an emptiness scan. At an entry the units left do not cover, the walk
/// stops and returns `Some(va)`, the address to resume from (everything
/// below it is done; a table the walk stopped in stays, and is freed by the
/// slice that resumes in it if it is empty). `None`: the whole range is
/// done.
pub fn unmap_range<M: PageTableMemory>(
    mem: &mut M,
    pml4: u64,
    start: u64,
    end: u64,
    budget: &mut u64,
    on_leaf: &mut impl FnMut(&mut M, u64, u64),
    on_table: &mut impl FnMut(&mut M, u64),
) -> Option<u64> {
    unmap_walk(mem, pml4, start, end, budget, false, on_leaf, on_table)
}

/// [`unmap_range`] for ranges whose leaves need nothing done one by one
/// (frames that belong to someone else, a shared region's): a last-level
/// table the range covers whole is unlinked from its parent in one step
/// and handed to [`PageTableMemory::detach_table`] with its entries, its
/// leaves not visited (`on_leaf` is not called for them; `on_table` is, once
/// for the 2 MiB it spanned, which the caller must flush whole). The work
/// is then proportional to the number of such tables, not of pages.
pub fn unmap_tables<M: PageTableMemory>(
    mem: &mut M,
    pml4: u64,
    start: u64,
    end: u64,
    budget: &mut u64,
    on_leaf: &mut impl FnMut(&mut M, u64, u64),
    on_table: &mut impl FnMut(&mut M, u64),
) -> Option<u64> {
    unmap_walk(mem, pml4, start, end, budget, true, on_leaf, on_table)
}

/// The walk of [`unmap_range`] and [`unmap_tables`].
#[allow(clippy::too_many_arguments)]
fn unmap_walk<M: PageTableMemory>(
    mem: &mut M,
    pml4: u64,
    start: u64,
    end: u64,
    budget: &mut u64,
    detach: bool,
    on_leaf: &mut impl FnMut(&mut M, u64, u64),
    on_table: &mut impl FnMut(&mut M, u64),
) -> Option<u64> {
    if start >= end || end > (256 * span(3)) {
        return None;
    }
    let mut walk = Budget { left: (*budget).max(MIN_BUDGET), stopped: None, detach };
    clear_range(mem, pml4, 4, 0, start, end, &mut walk, on_leaf, on_table);
    *budget = walk.left;
    walk.stopped
}

/// Absent entries a walk skips per budget unit (in a tight loop over the
/// table, about ten ring-0 instructions each).
pub const ENTRIES_PER_UNIT: u64 = 1;
/// Budget units a walk spends on a present entry it looks at.
pub const ENTRY_UNITS: u64 = 1;
/// Budget units a walk spends on a present entry it acts on (a leaf
/// unlinked, its frame released and its TLB entry flushed, or a table
/// entered), on top of [`ENTRY_UNITS`].
pub const PRESENT_UNITS: u64 = 16;
/// Budget units of the scan that decides whether a table is empty.
pub const SCAN_UNITS: u64 = 64;
/// The smallest budget a walk gets: enough to go down the four levels and
/// act on one leaf, so every slice makes progress.
pub const MIN_BUDGET: u64 = 4 * (ENTRY_UNITS + PRESENT_UNITS);

/// Work left to a walk, and where it stopped.
struct Budget {
    left: u64,
    stopped: Option<u64>,
    /// Unlink whole last-level tables without visiting their leaves
    /// ([`unmap_tables`]).
    detach: bool,
}

impl Budget {
    /// Spends `units` on the entry at `va`; false (and the walk stops
    /// there, to resume at `va`) if they are not left.
    fn spend(&mut self, units: u64, va: u64) -> bool {
        if self.stopped.is_some() {
            return false;
        }
        if self.left < units {
            self.stopped = Some(va);
            return false;
        }
        self.left -= units;
        true
    }
}

/// For the table of `level` covering `base..`: the span of one entry and the
/// entry indices `first..last` that overlap `start..end`.
fn entry_range(level: u32, base: u64, start: u64, end: u64) -> (u64, usize, usize) {
    let child_span = span(level - 1);
    let first = ((start.max(base) - base) / child_span) as usize;
    let last = ((end.min(base + span(level)) - base).div_ceil(child_span)) as usize;
    (child_span, first, last)
}

/// The index of the first present entry of `table` in `from..last` (or
/// `last`), found in a tight loop; the absent entries skipped cost the walk
/// one unit per [`ENTRIES_PER_UNIT`]. If the units run out first, the walk
/// stops at the first entry they do not cover (its address: `va_of(index)`)
/// and `last` is returned.
fn next_present<M: PageTableMemory>(
    mem: &mut M,
    table: u64,
    from: usize,
    last: usize,
    walk: &mut Budget,
    va_of: impl Fn(usize) -> u64,
) -> usize {
    if from >= last || walk.stopped.is_some() {
        return last;
    }
    let affordable = usize::try_from(walk.left.saturating_mul(ENTRIES_PER_UNIT)).unwrap_or(usize::MAX);
    let bound = last.min(from.saturating_add(affordable));
    // Used entries that are not present (none are made, but the walk never
    // trusts that) are skipped like unused ones.
    let mut index = from;
    loop {
        index = mem.next_used(table, index, bound);
        if index >= bound || mem.table(table)[index].flags().contains(Flags::PRESENT) {
            break;
        }
        index += 1;
    }
    let skipped = index - from;
    walk.left = walk.left.saturating_sub((skipped as u64).div_ceil(ENTRIES_PER_UNIT));
    let index = from + skipped;
    if index == bound && bound < last {
        walk.stopped = Some(va_of(index));
        return last;
    }
    index
}

/// Clears `[start, end)` in `table` (of `level`, spanning from `base`);
/// returns whether the table is empty afterwards.
#[allow(clippy::too_many_arguments)]
fn clear_range<M: PageTableMemory>(
    mem: &mut M,
    table: u64,
    level: u32,
    base: u64,
    start: u64,
    end: u64,
    walk: &mut Budget,
    on_leaf: &mut impl FnMut(&mut M, u64, u64),
    on_table: &mut impl FnMut(&mut M, u64),
) -> bool {
    let (child_span, first, last) = entry_range(level, base, start, end);
    let mut cleared = false;
    let mut i = first;
    loop {
        i = next_present(mem, table, i, last, walk, |i| start.max(base + i as u64 * child_span));
        if i >= last {
            break;
        }
        let child_base = base + i as u64 * child_span;
        if !walk.spend(ENTRY_UNITS + PRESENT_UNITS, start.max(child_base)) {
            // Stopped at this present entry: the table holds it, so it is
            // not empty.
            return false;
        }
        let entry = &mut mem.table(table)[i];
        let flags = entry.flags();
        let child = entry.addr().as_u64();
        i += 1;
        if level == 1 || flags.contains(Flags::HUGE_PAGE) {
            entry.set_unused();
            cleared = true;
            on_leaf(mem, child_base, child);
            continue;
        }
        if level == 2 && walk.detach && start <= child_base && child_base + child_span <= end {
            entry.set_unused();
            cleared = true;
            on_table(mem, child_base);
            mem.detach_table(child);
            continue;
        }
        if clear_range(mem, child, level - 1, child_base, start, end, walk, on_leaf, on_table) {
            mem.table(table)[i - 1].set_unused();
            cleared = true;
            on_table(mem, start.max(child_base));
            mem.free_table(child);
        }
    }
    if level == 4 || walk.stopped.is_some() {
        return false; // the PML4 stays; a table the walk stopped in is not empty
    }
    if start <= base && base + span(level) <= end {
        // Every entry was in the range: each leaf was cleared and each
        // table below, wholly in the range too, was freed.
        return true;
    }
    // A table this call did not change keeps whatever it held (tables are
    // freed as soon as they empty, so it is not empty) unless an earlier
    // slice stopped in it (this walk starts inside it); one it changed is
    // scanned.
    if !cleared && start <= base {
        return false;
    }
    walk.left = walk.left.saturating_sub(SCAN_UNITS);
    mem.table_is_empty(table)
}

/// Calls `on_leaf(mem, table, index, va)` for every present 4 KiB leaf of
/// `[start, end)` (page-aligned, user half) under `pml4`: the leaf is entry
/// `index` of the table at `table`. Absent tables are skipped whole, so the
/// work is proportional to the tables present, not to the range. `budget`
/// bounds it as for [`unmap_range`]: `Some(va)` is where to resume.
pub fn for_each_leaf<M: PageTableMemory>(
    mem: &mut M,
    pml4: u64,
    start: u64,
    end: u64,
    budget: &mut u64,
    on_leaf: &mut impl FnMut(&mut M, u64, usize, u64),
) -> Option<u64> {
    if start >= end || end > (256 * span(3)) {
        return None;
    }
    let mut walk = Budget { left: (*budget).max(MIN_BUDGET), stopped: None, detach: false };
    visit_range(mem, pml4, 4, 0, start, end, &mut walk, on_leaf);
    *budget = walk.left;
    walk.stopped
}

#[allow(clippy::too_many_arguments)]
fn visit_range<M: PageTableMemory>(
    mem: &mut M,
    table: u64,
    level: u32,
    base: u64,
    start: u64,
    end: u64,
    walk: &mut Budget,
    on_leaf: &mut impl FnMut(&mut M, u64, usize, u64),
) {
    let (child_span, first, last) = entry_range(level, base, start, end);
    let mut i = first;
    loop {
        i = next_present(mem, table, i, last, walk, |i| start.max(base + i as u64 * child_span));
        if i >= last {
            break;
        }
        let child_base = base + i as u64 * child_span;
        if !walk.spend(ENTRY_UNITS + PRESENT_UNITS, start.max(child_base)) {
            return;
        }
        let entry = &mem.table(table)[i];
        let flags = entry.flags();
        let child = entry.addr().as_u64();
        let index = i;
        i += 1;
        if level == 1 || flags.contains(Flags::HUGE_PAGE) {
            on_leaf(mem, table, index, child_base);
            continue;
        }
        visit_range(mem, child, level - 1, child_base, start, end, walk, on_leaf);
    }
}

/// Tears down the user half (PML4 slots 0..256) of an address space: calls
/// `on_leaf(mem, va, frame, flags)` for every 4 KiB leaf, as soon as it is
/// unlinked (so the caller can release frames without collecting them), then frees every user-half
/// table frame. The PML4 itself and the
/// kernel half are left alone. Large user pages are never created, so a large
/// leaf here is reported to `on_leaf` with its base frame and dropped.
pub fn free_user_half<M: PageTableMemory>(
    mem: &mut M,
    pml4: u64,
    mut on_leaf: impl FnMut(&mut M, u64, u64, Flags),
) {
    for i4 in 0..256 {
        let Some(pdpt) = take_table(mem, pml4, i4) else {
            continue;
        };
        for i3 in 0..512 {
            let Some(pd) = take_table_or_leaf(mem, pdpt, i3, &mut on_leaf, va_of(i4, i3, 0, 0)) else {
                continue;
            };
            for i2 in 0..512 {
                let Some(pt) = take_table_or_leaf(mem, pd, i2, &mut on_leaf, va_of(i4, i3, i2, 0)) else {
                    continue;
                };
                for i1 in 0..512 {
                    let entry = &mut mem.table(pt)[i1];
                    if entry.flags().contains(Flags::PRESENT) {
                        let (frame, flags) = (entry.addr().as_u64(), entry.flags());
                        entry.set_unused();
                        on_leaf(mem, va_of(i4, i3, i2, i1), frame, flags);
                    }
                }
                mem.free_table(pt);
            }
            mem.free_table(pd);
        }
        mem.free_table(pdpt);
    }
}

fn va_of(i4: usize, i3: usize, i2: usize, i1: usize) -> u64 {
    ((i4 as u64) << 39) | ((i3 as u64) << 30) | ((i2 as u64) << 21) | ((i1 as u64) << 12)
}

/// Clears entry `i` of `table` and returns the table it pointed to.
fn take_table<M: PageTableMemory>(mem: &mut M, table: u64, i: usize) -> Option<u64> {
    let entry = &mut mem.table(table)[i];
    if !entry.flags().contains(Flags::PRESENT) {
        return None;
    }
    let next = entry.addr().as_u64();
    entry.set_unused();
    Some(next)
}

fn take_table_or_leaf<M: PageTableMemory>(
    mem: &mut M,
    table: u64,
    i: usize,
    on_leaf: &mut impl FnMut(&mut M, u64, u64, Flags),
    va: u64,
) -> Option<u64> {
    let entry = &mut mem.table(table)[i];
    let flags = entry.flags();
    if !flags.contains(Flags::PRESENT) {
        return None;
    }
    let next = entry.addr().as_u64();
    entry.set_unused();
    if flags.contains(Flags::HUGE_PAGE) {
        on_leaf(mem, va, next, flags);
        return None;
    }
    Some(next)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// Host stand-in for guest-physical memory: a map of boxed tables.
    #[derive(Default)]
    pub(crate) struct FakeMemory {
        pub tables: BTreeMap<u64, Box<PageTable>>,
        next: u64,
    }

    impl PageTableMemory for FakeMemory {
        fn table(&mut self, frame: u64) -> &mut PageTable {
            self.tables.get_mut(&frame).unwrap_or_else(|| panic!("no table at {frame:#x}"))
        }
        fn alloc_table(&mut self) -> Option<u64> {
            self.next += PAGE_SIZE;
            let frame = 0x100_0000 + self.next;
            self.tables.insert(frame, Box::new(PageTable::new()));
            Some(frame)
        }
        fn free_table(&mut self, frame: u64) {
            assert!(self.tables.remove(&frame).is_some(), "freed unknown table {frame:#x}");
        }
    }

    fn map_4k(mem: &mut FakeMemory, pml4: u64, va: u64, pa: u64, flags: Flags) -> Result<(), MapError> {
        map(mem, pml4, va, pa, PageSize::Size4K, flags, USER_TABLE_FLAGS)
    }

    #[test]
    fn map_then_translate_and_unmap() {
        let mut mem = FakeMemory::default();
        let pml4 = mem.alloc_table().unwrap();
        let flags = Flags::USER_ACCESSIBLE | Flags::NO_EXECUTE;
        map_4k(&mut mem, pml4, 0x40_0000, 0x20_0000, flags).unwrap();
        let t = translate(&mut mem, pml4, 0x40_0123).unwrap();
        assert_eq!(t.phys, 0x20_0123);
        assert!(t.flags.contains(Flags::PRESENT | Flags::USER_ACCESSIBLE | Flags::NO_EXECUTE));
        assert!(!t.flags.contains(Flags::WRITABLE));
        assert_eq!(map_4k(&mut mem, pml4, 0x40_0000, 0x30_0000, flags), Err(MapError::AlreadyMapped));
        assert_eq!(unmap(&mut mem, pml4, 0x40_0000), Some(0x20_0000));
        assert_eq!(translate(&mut mem, pml4, 0x40_0000), None);
        assert_eq!(unmap(&mut mem, pml4, 0x40_0000), None);
    }

    #[test]
    fn a_large_range_mapped_page_by_page_gives_each_page_its_own_rights() {
        let mut mem = FakeMemory::default();
        let pml4 = mem.alloc_table().unwrap();
        let va = 0xffff_8000_0000_0000;
        let read_only = (0x10_0000..0x14_0000, Flags::NO_EXECUTE);
        let rw = Flags::WRITABLE | Flags::NO_EXECUTE;
        map_2m_as_4k(&mut mem, pml4, va, 0, KERNEL_TABLE_FLAGS, rw, read_only.clone()).unwrap();
        for (offset, writable) in [
            (0, true),
            (0xf_f000, true),
            (0x10_0000, false),
            (0x13_f123, false),
            (0x14_0000, true),
            (0x1f_ffff, true),
        ] {
            let t = translate(&mut mem, pml4, va + offset).unwrap();
            assert_eq!(t.phys, offset);
            assert_eq!(t.flags.contains(Flags::WRITABLE), writable, "offset {offset:#x}");
            assert!(t.flags.contains(Flags::PRESENT | Flags::NO_EXECUTE));
            assert!(!t.flags.contains(Flags::HUGE_PAGE));
        }
        assert_eq!(
            map_2m_as_4k(&mut mem, pml4, va, 0, KERNEL_TABLE_FLAGS, rw, read_only.clone()),
            Err(MapError::AlreadyMapped)
        );
        assert_eq!(
            map_2m_as_4k(&mut mem, pml4, va + 0x1000, 0, KERNEL_TABLE_FLAGS, rw, read_only),
            Err(MapError::BadAddress)
        );
    }

    proptest! {
        /// Every page of the 2 MiB gets what a test of its frame against the
        /// exception gives it, wherever the exception lies (before, across,
        /// inside, after; empty or inverted too).
        #[test]
        fn each_page_of_a_2m_range_gets_the_rights_of_its_frame(
            start in 0u64..0x50_0000,
            len in 0u64..0x30_0000,
            inverted in any::<bool>(),
        ) {
            let mut mem = FakeMemory::default();
            let pml4 = mem.alloc_table().unwrap();
            let (va, phys) = (0xffff_8000_0020_0000, 0x20_0000);
            let range = if inverted { start + len..start } else { start..start + len };
            let rw = Flags::WRITABLE | Flags::NO_EXECUTE;
            map_2m_as_4k(&mut mem, pml4, va, phys, KERNEL_TABLE_FLAGS, rw, (range.clone(), Flags::NO_EXECUTE)).unwrap();
            for page in 0..512u64 {
                let t = translate(&mut mem, pml4, va + page * PAGE_SIZE).unwrap();
                prop_assert_eq!(t.phys, phys + page * PAGE_SIZE);
                let writable = !range.contains(&t.phys);
                prop_assert_eq!(t.flags.contains(Flags::WRITABLE), writable, "page {}", page);
                prop_assert!(t.flags.contains(Flags::PRESENT | Flags::NO_EXECUTE));
            }
        }
    }

    proptest! {
        /// A run maps exactly what as many single mappings would.
        #[test]
        fn a_run_maps_what_single_pages_would(first in 0u64..1500, pages in 0u64..1100, writable in any::<bool>()) {
            let (va, pa) = (0xffff_ffff_8000_0000 + first * PAGE_SIZE, 0x40_0000 + first * PAGE_SIZE);
            let flags = if writable { Flags::WRITABLE | Flags::NO_EXECUTE } else { Flags::empty() };
            let (mut run, mut single) = (FakeMemory::default(), FakeMemory::default());
            let (run_pml4, single_pml4) = (run.alloc_table().unwrap(), single.alloc_table().unwrap());
            map_4k_run(&mut run, run_pml4, va, pa, pages, flags, KERNEL_TABLE_FLAGS).unwrap();
            for page in 0..pages {
                let at = page * PAGE_SIZE;
                map(&mut single, single_pml4, va + at, pa + at, PageSize::Size4K, flags, KERNEL_TABLE_FLAGS).unwrap();
            }
            for page in 0..pages + 2 {
                let at = va + page * PAGE_SIZE;
                prop_assert_eq!(translate(&mut run, run_pml4, at), translate(&mut single, single_pml4, at));
            }
            prop_assert_eq!(run.tables.len(), single.tables.len());
            if pages > 0 {
                // Mapping any of it again is refused.
                prop_assert_eq!(
                    map_4k_run(&mut run, run_pml4, va + (pages - 1) * PAGE_SIZE, pa, 1, flags, KERNEL_TABLE_FLAGS),
                    Err(MapError::AlreadyMapped)
                );
            }
        }
    }

    #[test]
    fn a_run_refuses_bad_addresses() {
        let mut mem = FakeMemory::default();
        let pml4 = mem.alloc_table().unwrap();
        let flags = Flags::empty();
        assert_eq!(
            map_4k_run(&mut mem, pml4, 0x1001, 0, 1, flags, KERNEL_TABLE_FLAGS),
            Err(MapError::BadAddress)
        );
        assert_eq!(
            map_4k_run(&mut mem, pml4, 0x7fff_ffff_f000, 0, 2, flags, KERNEL_TABLE_FLAGS),
            Err(MapError::BadAddress),
            "the run would leave the lower half"
        );
        assert_eq!(
            map_4k_run(&mut mem, pml4, 0x1000, 0, u64::MAX, flags, KERNEL_TABLE_FLAGS),
            Err(MapError::BadAddress)
        );
    }

    #[test]
    fn rejects_misaligned_and_non_canonical_addresses() {
        let mut mem = FakeMemory::default();
        let pml4 = mem.alloc_table().unwrap();
        assert_eq!(map_4k(&mut mem, pml4, 0x40_0001, 0, Flags::empty()), Err(MapError::BadAddress));
        assert_eq!(
            map_4k(&mut mem, pml4, 0x0000_8000_0000_0000, 0, Flags::empty()),
            Err(MapError::BadAddress)
        );
        assert_eq!(translate(&mut mem, pml4, 0x1234_0000_0000_0000), None);
    }

    #[test]
    fn large_pages_translate_and_block_small_mappings() {
        let mut mem = FakeMemory::default();
        let pml4 = mem.alloc_table().unwrap();
        let base = 0xffff_8000_0000_0000;
        map(&mut mem, pml4, base, 0x40_0000, PageSize::Size2M, Flags::WRITABLE, KERNEL_TABLE_FLAGS).unwrap();
        assert_eq!(translate(&mut mem, pml4, base + 0x1_2345).unwrap().phys, 0x41_2345);
        assert_eq!(
            map_4k(&mut mem, pml4, base + 0x1000, 0, Flags::empty()),
            Err(MapError::LargePageInTheWay)
        );
    }

    proptest! {
        /// Random sets of user pages anywhere in the user half: each translates
        /// to its frame, and tearing the user half down reports exactly those
        /// pages and frees every table but the PML4.
        #[test]
        fn teardown_reports_every_leaf_and_frees_every_table(
            pages in prop::collection::btree_map(0u64..(1 << 35), 0u64..(1 << 20), 1..60)
        ) {
            let mut mem = FakeMemory::default();
            let pml4 = mem.alloc_table().unwrap();
            for (&page, &frame) in &pages {
                map_4k(&mut mem, pml4, page << 12, frame << 12, Flags::USER_ACCESSIBLE).unwrap();
            }
            for (&page, &frame) in &pages {
                prop_assert_eq!(translate(&mut mem, pml4, page << 12).map(|t| t.phys), Some(frame << 12));
            }
            let mut seen = BTreeMap::new();
            free_user_half(&mut mem, pml4, |_, va, frame, _| {
                seen.insert(va >> 12, frame >> 12);
            });
            prop_assert_eq!(&seen, &pages);
            let remaining: BTreeSet<u64> = mem.tables.keys().copied().collect();
            prop_assert_eq!(remaining, BTreeSet::from([pml4]));
        }
    }
}
