//! The VMM's boot page tables, and a software walk of guest page tables.
//!
//! Boot tables (at `BOOT_PAGE_TABLES_GPA`, supervisor-only, 2 MiB pages):
//!
//! ```text
//! PML4[256] -> PDPT_direct -> one PD per GiB -> guest RAM   (DIRECT_MAP_BASE)
//! PML4[511] -> PDPT_kernel[510] -> PD_kernel  -> 0..1 GiB   (KERNEL_VMA_BASE)
//! ```
//!
//! They exist only until the kernel installs its own.

use superos_protocol::layout::{BOOT_PAGE_TABLES_GPA, LARGE_PAGE_SIZE, MAX_GUEST_MEMORY_GIB, PAGE_SIZE};

/// Page-table entry: present.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Page-table entry: writable.
pub const PTE_WRITABLE: u64 = 1 << 1;
/// Page-table entry: user-accessible.
pub const PTE_USER: u64 = 1 << 2;
/// Page-table entry: large page (in a PDPT or PD).
pub const PTE_HUGE: u64 = 1 << 7;
/// Page-table entry: no-execute.
pub const PTE_NO_EXECUTE: u64 = 1 << 63;
/// Physical-address bits of an entry.
pub const PTE_ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Builds the boot page tables for `mem_size` bytes of RAM. Returns the bytes
/// to write at `BOOT_PAGE_TABLES_GPA`; the PML4 is their first frame.
pub fn boot_page_tables(mem_size: u64) -> Vec<u8> {
    let gib = mem_size.div_ceil(1 << 30).min(MAX_GUEST_MEMORY_GIB);
    let frames = 4 + gib as usize;
    let mut tables = vec![[0u64; 512]; frames];
    let frame_gpa = |i: usize| BOOT_PAGE_TABLES_GPA + i as u64 * PAGE_SIZE;
    let table_flags = PTE_PRESENT | PTE_WRITABLE;
    let (pml4, pdpt_direct, pdpt_kernel, pd_kernel) = (0, 1, 2, 3);
    tables[pml4][256] = frame_gpa(pdpt_direct) | table_flags;
    tables[pml4][511] = frame_gpa(pdpt_kernel) | table_flags;
    tables[pdpt_kernel][510] = frame_gpa(pd_kernel) | table_flags;
    for (i, entry) in tables[pd_kernel].iter_mut().enumerate() {
        *entry = (i as u64 * LARGE_PAGE_SIZE) | table_flags | PTE_HUGE;
    }
    let large_pages = mem_size.div_ceil(LARGE_PAGE_SIZE);
    for g in 0..gib as usize {
        tables[pdpt_direct][g] = frame_gpa(4 + g) | table_flags;
        for i in 0..512u64 {
            let page = g as u64 * 512 + i;
            if page < large_pages {
                tables[4 + g][i as usize] = (page * LARGE_PAGE_SIZE) | table_flags | PTE_HUGE;
            }
        }
    }
    tables.iter().flat_map(|t| t.iter().flat_map(|e| e.to_le_bytes())).collect()
}

/// A leaf found by [`translate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// Guest-physical address the virtual address maps to.
    pub phys: u64,
    /// The raw leaf entry.
    pub entry: u64,
}

/// Walks the 4-level tables rooted at `cr3` for `va`, reading entries with
/// `read_entry(gpa)`. Handles 1 GiB and 2 MiB leaves. `None` if unmapped or
/// if an entry cannot be read.
pub fn translate(cr3: u64, va: u64, mut read_entry: impl FnMut(u64) -> Option<u64>) -> Option<Leaf> {
    let mut table = cr3 & PTE_ADDRESS_MASK;
    for level in (1..=4u32).rev() {
        let index = (va >> (12 + 9 * (level - 1))) & 0x1ff;
        let entry = read_entry(table + index * 8)?;
        if entry & PTE_PRESENT == 0 {
            return None;
        }
        if level == 1 || (level <= 3 && entry & PTE_HUGE != 0) {
            let mask = (1u64 << (12 + 9 * (level - 1))) - 1;
            return Some(Leaf { phys: (entry & PTE_ADDRESS_MASK & !mask) | (va & mask), entry });
        }
        table = entry & PTE_ADDRESS_MASK;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use superos_protocol::layout::{DIRECT_MAP_BASE, KERNEL_VMA_BASE};

    fn walk(tables: &[u8], va: u64) -> Option<Leaf> {
        translate(BOOT_PAGE_TABLES_GPA, va, |gpa| {
            let offset = gpa.checked_sub(BOOT_PAGE_TABLES_GPA)? as usize;
            let bytes = tables.get(offset..offset + 8)?;
            Some(u64::from_le_bytes(bytes.try_into().ok()?))
        })
    }

    #[test]
    fn boot_tables_map_the_kernel_window_and_the_direct_map() {
        let mem = 64 << 20;
        let tables = boot_page_tables(mem);
        assert_eq!(tables.len(), 5 * 4096);
        assert_eq!(walk(&tables, KERNEL_VMA_BASE + 0x10_0123).unwrap().phys, 0x10_0123);
        assert_eq!(walk(&tables, DIRECT_MAP_BASE + 0x3f_ffff).unwrap().phys, 0x3f_ffff);
        assert_eq!(walk(&tables, DIRECT_MAP_BASE + mem - 1).unwrap().phys, mem - 1);
        // Nothing beyond RAM, nothing in the user half, nothing user-accessible.
        assert_eq!(walk(&tables, DIRECT_MAP_BASE + mem), None);
        assert_eq!(walk(&tables, 0x40_0000), None);
        assert_eq!(walk(&tables, KERNEL_VMA_BASE).unwrap().entry & PTE_USER, 0);
    }

    #[test]
    fn boot_tables_cover_the_largest_memory() {
        let mem = MAX_GUEST_MEMORY_GIB << 30;
        let tables = boot_page_tables(mem);
        assert_eq!(walk(&tables, DIRECT_MAP_BASE + mem - 1).unwrap().phys, mem - 1);
    }
}
