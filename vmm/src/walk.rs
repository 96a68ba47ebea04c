//! Ground truth from the page tables: the VMM walks every live process's
//! 4-level tables itself and builds the real map frame -> (pid, virtual
//! address, U, W, NX, raw PTE).
//!
//! The kernel's claims are used only as starting points (a PML4 address per
//! process, the kernel's own PML4), and those are trusted no further than
//! being a frame of guest RAM. Tables are read 4 KiB at a time; 4 KiB, 2 MiB
//! and 1 GiB leaves are understood; non-present entries are skipped.
//!
//! The walk follows every path without deduplication, so a table reached
//! twice (shared between processes, aliased within one, or part of a cycle)
//! is seen as such. The work is capped: at most `2 × RAM frames + 1024`
//! table reads and `8 × RAM frames + 65536` recorded mappings per walk, far
//! above what a kernel that builds private trees can need; a hostile table
//! structure stops the walk with an issue instead of looping.
//!
//! Rights are the effective ones: U and W only if set at every level, NX if
//! set at any level.
//!
//! The kernel half (shared by every PML4, walked once per distinct top-level
//! entry) is not recorded frame by frame: only its user-accessible leaves
//! (there should be none) and its writable leaves, one record per leaf
//! whatever its size (for `kernel-w-xor-x`: a writable leaf must be
//! non-executable and must not map the kernel's text or read-only data).
//! That is a few thousand records at most (the direct map in 2 MiB leaves,
//! the kernel image and the 2 MiB around it in 4 KiB ones), under the same
//! budget as the user mappings.

use crate::arch::paging::{PTE_ADDRESS_MASK, PTE_HUGE, PTE_NO_EXECUTE, PTE_PRESENT, PTE_USER, PTE_WRITABLE};
use crate::memory::GuestRam;
use std::collections::{BTreeSet, HashMap, HashSet};
use superos_protocol::layout::PAGE_SIZE;
use zerocopy::IntoBytes;

/// The pid recorded for tables and leaves reached through the kernel half.
pub const KERNEL_HALF: u32 = u32::MAX;
/// Entry bits the CPU may change on its own (accessed, dirty), ignored when
/// comparing kernel-half entries.
const PTE_CPU_BITS: u64 = (1 << 5) | (1 << 6);
/// Reachers remembered per table (the count goes on).
const MAX_REFS: usize = 8;
/// Issues kept per walk (the count goes on).
const MAX_ISSUES: usize = 64;

/// One 4 KiB frame mapped at one virtual address (a 2 MiB or 1 GiB leaf
/// gives one mapping per 4 KiB frame it covers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// The 4 KiB frame.
    pub frame: u64,
    /// The virtual address of that frame.
    pub va: u64,
    /// The raw leaf entry.
    pub pte: u64,
    /// GPA of the leaf entry.
    pub entry_gpa: u64,
    /// The process (or [`KERNEL_HALF`]).
    pub pid: u32,
    /// Leaf size in bytes (4 KiB, 2 MiB or 1 GiB).
    pub page_size: u64,
    /// Effective user access.
    pub user: bool,
    /// Effective write access.
    pub writable: bool,
    /// Effective no-execute.
    pub nx: bool,
    /// Reached through a table that some other path also reaches: already
    /// reported under `private-address-spaces`, left out of the frame checks.
    pub tainted: bool,
}

impl Mapping {
    /// Executable (no NX anywhere on the path).
    pub fn executable(&self) -> bool {
        !self.nx
    }

    /// `rwx`-style rights, for reports.
    pub fn rights(&self) -> String {
        format!(
            "{}r{}{}",
            if self.user { "u" } else { "s" },
            if self.writable { "w" } else { "-" },
            if self.nx { "-" } else { "x" }
        )
    }
}

/// One path into a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableRef {
    /// Who reached it (a pid or [`KERNEL_HALF`]).
    pub pid: u32,
    /// First virtual address the table covers on this path.
    pub va: u64,
    /// 4 = PML4, 3 = PDPT, 2 = PD, 1 = PT.
    pub level: u8,
    /// GPA of the entry pointing at it (`None` for a process's PML4).
    pub entry_gpa: Option<u64>,
    /// That entry.
    pub entry: u64,
}

/// Every way one table frame was reached.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableReach {
    /// Times reached from a process's user half (or as its PML4).
    pub user: u32,
    /// Times reached from a kernel half.
    pub kernel: u32,
    /// The first few paths.
    pub refs: Vec<TableRef>,
}

impl TableReach {
    /// Reached more than once from user halves, or from both halves: the
    /// table is not part of exactly one private tree.
    pub fn shared(&self) -> bool {
        self.user > 1 || (self.user > 0 && self.kernel > 0)
    }

    /// Shared, and through at least two different entries (or named as the
    /// PML4 of two processes): the origin of the sharing rather than a table
    /// below a shared one.
    pub fn shared_at_origin(&self) -> bool {
        if !self.shared() {
            return false;
        }
        let first = self.refs[0];
        self.refs
            .iter()
            .any(|r| r.entry_gpa != first.entry_gpa || (r.entry_gpa.is_none() && r.pid != first.pid))
    }
}

/// Something structurally wrong with the tables (`private-address-spaces`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalkIssue {
    /// The process whose tables it is in ([`KERNEL_HALF`] for the kernel's).
    pub pid: u32,
    /// Virtual address concerned.
    pub va: u64,
    /// The frame concerned.
    pub frame: u64,
    /// The entry concerned (0 if none).
    pub entry: u64,
    /// What is wrong.
    pub what: String,
}

/// Counters of one walk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkStats {
    /// Page-table entries examined.
    pub entries: u64,
    /// Tables read (4 KiB each).
    pub tables: u64,
    /// Leaf mappings recorded (per 4 KiB frame).
    pub mappings: u64,
}

/// The result of a walk.
#[derive(Clone, Debug, Default)]
pub struct Walk {
    /// User-half leaves of every process, sorted by (frame, pid, va).
    pub mappings: Vec<Mapping>,
    /// Kernel-half leaves that are user-accessible (there should be none).
    pub kernel_user_leaves: Vec<Mapping>,
    /// Kernel-half leaves that are writable (effective W), one per leaf:
    /// `frame` is the leaf's first frame and `page_size` its size.
    pub kernel_writable: Vec<Mapping>,
    /// Every table frame reached (PML4s included), kernel half included.
    pub tables: HashMap<u64, TableReach>,
    /// Structural problems.
    pub issues: Vec<WalkIssue>,
    /// Issues beyond the ones kept.
    pub issues_dropped: usize,
    /// Processes whose tables are malformed (their accounting is not
    /// checked: the walk cannot say what they map).
    pub broken: BTreeSet<u32>,
    /// False if a budget cut any part of the walk short.
    pub complete: bool,
    /// The processes (and [`KERNEL_HALF`]) whose walk a budget cut short:
    /// what they map is known only in part. Each process has a budget of
    /// its own, so one process's tables cannot blank the others'.
    pub partial: BTreeSet<u32>,
    /// Counters.
    pub stats: WalkStats,
}

impl Walk {
    /// True if `frame` was used as a page table (any level, either half).
    pub fn is_table(&self, frame: u64) -> bool {
        self.tables.contains_key(&frame)
    }

    /// The table frames of `pid`'s user half (its PML4 included), sorted.
    pub fn user_tables(&self, pid: u32) -> Vec<u64> {
        let mut frames: Vec<u64> = self
            .tables
            .iter()
            .filter(|(_, reach)| reach.user > 0 && reach.refs.iter().any(|r| r.pid == pid))
            .map(|(&frame, _)| frame)
            .collect();
        frames.sort_unstable();
        frames
    }

    /// The user-half mappings grouped by frame.
    pub fn by_frame(&self) -> impl Iterator<Item = &[Mapping]> {
        self.mappings.chunk_by(|a, b| a.frame == b.frame)
    }

    /// The leaf mapping `va` in `pid`'s user half, if any.
    pub fn lookup(&self, pid: u32, va: u64) -> Option<&Mapping> {
        self.mappings.iter().find(|m| m.pid == pid && m.va == va & !(PAGE_SIZE - 1))
    }
}

/// Effective rights accumulated down a path.
#[derive(Clone, Copy)]
struct Rights {
    user: bool,
    writable: bool,
    nx: bool,
}

impl Rights {
    const TOP: Rights = Rights { user: true, writable: true, nx: false };

    fn through(self, entry: u64) -> Rights {
        Rights {
            user: self.user && entry & PTE_USER != 0,
            writable: self.writable && entry & PTE_WRITABLE != 0,
            nx: self.nx || entry & PTE_NO_EXECUTE != 0,
        }
    }
}

/// Walks the user half of every `(pid, pml4)` and the kernel half of the
/// kernel's PML4 (if known) and of every process.
pub fn walk(ram: &GuestRam, kernel_pml4: Option<u64>, processes: &[(u32, u64)]) -> Walk {
    let ram_frames = ram.size() / PAGE_SIZE;
    let mut walker = Walker {
        ram,
        walk: Walk { complete: true, ..Default::default() },
        table_budget: ram_frames + 1024,
        mapping_budget: 2 * ram_frames + 65536,
        total_tables: 2 * ram_frames + 1024,
        total_mappings: 8 * ram_frames + 65536,
        kernel_entries_seen: HashSet::new(),
        tables_before: 0,
        mappings_before: 0,
        cut: false,
    };
    if let Some(kernel_pml4) = kernel_pml4 {
        walker.kernel_half(KERNEL_HALF, kernel_pml4);
    }
    for &(pid, pml4) in processes {
        walker.process(pid, pml4);
    }
    let mut walk = walker.walk;
    walk.stats.mappings = walk.mappings.len() as u64;
    taint(&mut walk);
    walk.mappings.sort_unstable_by_key(|m| (m.frame, m.pid, m.va));
    walk
}

/// Marks mappings under shared tables, marks their processes broken, and
/// records one issue per table where sharing originates.
fn taint(walk: &mut Walk) {
    let shared: HashSet<u64> = walk.tables.iter().filter(|(_, r)| r.shared()).map(|(&f, _)| f).collect();
    if shared.is_empty() {
        return;
    }
    let mut origins: Vec<(u64, TableReach)> = walk
        .tables
        .iter()
        .filter(|(_, r)| r.shared_at_origin())
        .map(|(&frame, reach)| (frame, reach.clone()))
        .collect();
    origins.sort_by_key(|(frame, _)| *frame);
    for (frame, reach) in origins {
        let paths: Vec<String> = reach
            .refs
            .iter()
            .map(|r| {
                let who = if r.pid == KERNEL_HALF {
                    "the kernel half".to_string()
                } else {
                    format!("pid {}", r.pid)
                };
                match r.entry_gpa {
                    Some(gpa) => format!("{who} at va {:#x} (entry {:#x} at {gpa:#x})", r.va, r.entry),
                    None => format!("{who} as its PML4"),
                }
            })
            .collect();
        let level = reach.refs.first().map_or(0, |r| r.level);
        for r in &reach.refs {
            if r.pid != KERNEL_HALF {
                walk.broken.insert(r.pid);
            }
        }
        let first = reach.refs[0];
        push_issue(
            walk,
            WalkIssue {
                pid: first.pid,
                va: first.va,
                frame,
                entry: first.entry,
                what: format!(
                    "level-{level} table {frame:#x} is reached {} times: {}",
                    reach.user + reach.kernel,
                    paths.join(", ")
                ),
            },
        );
    }
    for mapping in &mut walk.mappings {
        if shared.contains(&(mapping.entry_gpa & !(PAGE_SIZE - 1))) {
            mapping.tainted = true;
            walk.broken.insert(mapping.pid);
        }
    }
}

fn push_issue(walk: &mut Walk, issue: WalkIssue) {
    if walk.issues.len() < MAX_ISSUES {
        walk.issues.push(issue);
    } else {
        walk.issues_dropped += 1;
    }
}

struct Walker<'r> {
    ram: &'r GuestRam,
    walk: Walk,
    /// One process's budgets (a private tree has at most one table and one
    /// mapping per frame of RAM; twice that, with room for the gate and
    /// shared regions).
    table_budget: u64,
    mapping_budget: u64,
    /// All processes' together: what bounds the walk's memory however
    /// many processes there are (past it, each further process is cut at
    /// once and marked partial). At least two processes' worth, so one
    /// hostile tree cannot blank the others.
    total_tables: u64,
    total_mappings: u64,
    /// Kernel-half PML4 entries already walked (CPU bits masked).
    kernel_entries_seen: HashSet<u64>,
    /// Tables read and mappings recorded before the current process (its
    /// budget counts from there).
    tables_before: u64,
    mappings_before: u64,
    /// The current process's walk was cut short.
    cut: bool,
}

impl Walker<'_> {
    fn issue(&mut self, pid: u32, va: u64, frame: u64, entry: u64, what: String) {
        if pid != KERNEL_HALF {
            self.walk.broken.insert(pid);
        }
        push_issue(&mut self.walk, WalkIssue { pid, va, frame, entry, what });
    }

    /// Reads the table at `frame`, or records why not. Counts the read
    /// against the budget.
    fn read_table(&mut self, pid: u32, va: u64, frame: u64, entry: u64) -> Option<Box<[u64; 512]>> {
        if self.cut {
            return None;
        }
        let mine = self.walk.stats.tables - self.tables_before;
        if mine >= self.table_budget || self.walk.stats.tables >= self.total_tables {
            self.cut(pid);
            let what = if mine >= self.table_budget {
                format!("the walk of this tree read {mine} tables")
            } else {
                format!("the walk read {} tables in all", self.walk.stats.tables)
            };
            self.issue(
                pid,
                va,
                frame,
                entry,
                format!("{what}, more than a kernel building private trees can have; this tree's walk stopped (partial)"),
            );
            return None;
        }
        let mut table = Box::new([0u64; 512]);
        if self.ram.read_bytes(frame, table.as_mut_bytes()).is_err() {
            self.issue(pid, va, frame, entry, format!("table {frame:#x} is unreadable"));
            return None;
        }
        self.walk.stats.tables += 1;
        self.walk.stats.entries += 512;
        Some(table)
    }

    /// Records a path into the table at `frame`; false (and an issue) if
    /// `frame` is not a frame of guest RAM.
    fn reach(&mut self, frame: u64, kernel: bool, table_ref: TableRef) -> bool {
        if frame % PAGE_SIZE != 0 || !self.ram.contains(frame, PAGE_SIZE) {
            let TableRef { pid, va, entry, .. } = table_ref;
            self.issue(pid, va, frame, entry, format!("table {frame:#x} is not a frame of guest memory"));
            return false;
        }
        let reach = self.walk.tables.entry(frame).or_default();
        if kernel {
            reach.kernel += 1;
        } else {
            reach.user += 1;
        }
        if reach.refs.len() < MAX_REFS {
            reach.refs.push(table_ref);
        }
        true
    }

    /// Starts the budget of the next process (or of the kernel half).
    fn start_budget(&mut self) {
        self.tables_before = self.walk.stats.tables;
        self.mappings_before = self.walk.mappings.len() as u64;
        self.cut = false;
    }

    fn process(&mut self, pid: u32, pml4: u64) {
        self.start_budget();
        if !self.reach(pml4, false, TableRef { pid, va: 0, level: 4, entry_gpa: None, entry: 0 }) {
            return;
        }
        let Some(table) = self.read_table(pid, 0, pml4, 0) else {
            self.walk.broken.insert(pid);
            return;
        };
        for (slot, &entry) in table.iter().enumerate().take(256) {
            if entry & PTE_PRESENT == 0 {
                continue;
            }
            self.pml4_entry(pid, pid, false, pml4, slot, entry);
        }
        self.kernel_half_entries(pid, pml4, &table);
    }

    fn kernel_half(&mut self, pid: u32, pml4: u64) {
        self.start_budget();
        if !self.reach(pml4, true, TableRef { pid, va: 0, level: 4, entry_gpa: None, entry: 0 }) {
            return;
        }
        if let Some(table) = self.read_table(pid, 0, pml4, 0) {
            self.kernel_half_entries(pid, pml4, &table);
        }
    }

    /// Descends through present PML4 entry `slot` of `pml4` (read while
    /// walking `pid`), recording what it reaches as `owner`'s; a PS bit at
    /// this level is reserved and reported instead.
    fn pml4_entry(&mut self, pid: u32, owner: u32, kernel: bool, pml4: u64, slot: usize, entry: u64) {
        let high = if slot >= 256 { 0xffff_0000_0000_0000 } else { 0 };
        let va = high | ((slot as u64) << 39);
        let entry_gpa = pml4 + slot as u64 * 8;
        if entry & PTE_HUGE != 0 {
            let reason = format!("PML4 entry {entry:#x} at {entry_gpa:#x} has the reserved PS bit");
            self.issue(pid, va, pml4, entry, reason);
            return;
        }
        self.descend(owner, kernel, 3, va, entry, entry_gpa, Rights::TOP.through(entry));
    }

    /// Walks the kernel-half entries of a PML4 that no earlier PML4 had
    /// (the kernel half is shared: normally this walks it once).
    fn kernel_half_entries(&mut self, pid: u32, pml4: u64, table: &[u64; 512]) {
        for (slot, &entry) in table.iter().enumerate().skip(256) {
            if entry & PTE_PRESENT == 0 || !self.kernel_entries_seen.insert(entry & !PTE_CPU_BITS) {
                continue;
            }
            self.pml4_entry(pid, KERNEL_HALF, true, pml4, slot, entry);
        }
    }

    /// Follows `entry` (at `entry_gpa`, in a table of level `level + 1`)
    /// to a table of level `level` covering `va`.
    #[allow(clippy::too_many_arguments)]
    fn descend(
        &mut self,
        pid: u32,
        kernel: bool,
        level: u8,
        va: u64,
        entry: u64,
        entry_gpa: u64,
        rights: Rights,
    ) {
        let frame = entry & PTE_ADDRESS_MASK;
        if !self.reach(frame, kernel, TableRef { pid, va, level, entry_gpa: Some(entry_gpa), entry }) {
            return;
        }
        let Some(table) = self.read_table(pid, va, frame, entry) else { return };
        let span = 1u64 << (12 + 9 * (u32::from(level) - 1));
        for (index, &child) in table.iter().enumerate() {
            if child & PTE_PRESENT == 0 {
                continue;
            }
            let child_va = va + index as u64 * span;
            let child_gpa = frame + index as u64 * 8;
            let child_rights = rights.through(child);
            if level == 1 || (level <= 3 && child & PTE_HUGE != 0) {
                self.leaf(pid, kernel, child_va, child, child_gpa, span, child_rights);
            } else {
                self.descend(pid, kernel, level - 1, child_va, child, child_gpa, child_rights);
            }
            if self.cut {
                return;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn leaf(&mut self, pid: u32, kernel: bool, va: u64, pte: u64, entry_gpa: u64, size: u64, rights: Rights) {
        let base = pte & PTE_ADDRESS_MASK & !(size - 1);
        let mapping = |i: u64| Mapping {
            frame: base + i * PAGE_SIZE,
            va: va + i * PAGE_SIZE,
            pte,
            entry_gpa,
            pid,
            page_size: size,
            user: rights.user,
            writable: rights.writable,
            nx: rights.nx,
            tainted: false,
        };
        if kernel {
            // One record per leaf is enough for the kernel half.
            let m = mapping(0);
            let budget = self.mapping_budget as usize;
            if rights.user {
                if self.walk.kernel_user_leaves.len() >= budget {
                    return self.stop(pid, va, base, pte, "user-accessible kernel-half leaves");
                }
                self.walk.kernel_user_leaves.push(m);
            }
            if rights.writable {
                if self.walk.kernel_writable.len() >= budget {
                    return self.stop(pid, va, base, pte, "writable kernel-half leaves");
                }
                self.walk.kernel_writable.push(m);
            }
            return;
        }
        for i in 0..size / PAGE_SIZE {
            let m = mapping(i);
            let total = self.walk.mappings.len() as u64;
            if total - self.mappings_before >= self.mapping_budget || total >= self.total_mappings {
                self.stop(pid, va, base, pte, "mappings");
                return;
            }
            self.walk.mappings.push(m);
            if !self.ram.contains(m.frame, PAGE_SIZE) {
                // The rest of a large leaf beyond RAM adds nothing.
                return;
            }
        }
    }

    /// The current process's walk is cut short (a budget).
    fn cut(&mut self, pid: u32) {
        self.walk.complete = false;
        self.cut = true;
        self.walk.partial.insert(pid);
    }

    fn stop(&mut self, pid: u32, va: u64, frame: u64, entry: u64, what: &str) {
        self.cut(pid);
        let count = self.mapping_budget;
        self.issue(
            pid,
            va,
            frame,
            entry,
            format!(
                "more than {count} {what} (in this tree, or {} in all), more than a kernel building private trees can have; this tree's walk stopped (partial)",
                self.total_mappings
            ),
        );
    }
}

/// Where a virtual address leads through the tables rooted at CR3, with the
/// effective rights of the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The guest-physical address.
    pub phys: u64,
    /// The leaf's page size.
    pub page_size: u64,
    /// The raw leaf entry.
    pub entry: u64,
    /// Effective user access (U at every level).
    pub user: bool,
    /// Effective write access (W at every level).
    pub writable: bool,
    /// Effective no-execute (NX at some level).
    pub nx: bool,
}

/// Translates `va` through the 4-level tables at `cr3`, every table read
/// from guest RAM and checked (four reads at most). The error says which
/// level was missing or unreadable.
pub fn translate(ram: &GuestRam, cr3: u64, va: u64) -> Result<Translation, String> {
    let mut table = cr3 & PTE_ADDRESS_MASK;
    let mut rights = Rights::TOP;
    const NAMES: [&str; 4] = ["PT", "PD", "PDPT", "PML4"];
    for level in (1..=4u8).rev() {
        let name = NAMES[usize::from(level) - 1];
        let index = (va >> (12 + 9 * (u32::from(level) - 1))) & 0x1ff;
        let gpa = table + index * 8;
        let entry =
            ram.read_u64(gpa).map_err(|_| format!("its {name} entry at {gpa:#x} is outside guest memory"))?;
        if entry & PTE_PRESENT == 0 {
            return Err(format!("its {name} entry at {gpa:#x} is not present ({entry:#x})"));
        }
        rights = rights.through(entry);
        if level == 1 || (level <= 3 && entry & PTE_HUGE != 0) {
            let size = 1u64 << (12 + 9 * (u32::from(level) - 1));
            let phys = (entry & PTE_ADDRESS_MASK & !(size - 1)) | (va & (size - 1));
            return Ok(Translation {
                phys,
                page_size: size,
                entry,
                user: rights.user,
                writable: rights.writable,
                nx: rights.nx,
            });
        }
        table = entry & PTE_ADDRESS_MASK;
    }
    unreachable!("level 1 always ends the loop")
}

/// Reads `len` bytes (at most 64 KiB + 4 KiB) at virtual `va` through the
/// tables at `cr3`, page by page. The error names the first page that is not
/// mapped or whose frame is not guest RAM.
pub fn read_virtual(ram: &GuestRam, cr3: u64, va: u64, len: usize) -> Result<Vec<u8>, String> {
    if len > 68 * 1024 {
        return Err(format!("{len} bytes is more than the VMM reads at once"));
    }
    let mut bytes = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let at = va.checked_add(done as u64).ok_or_else(|| format!("{va:#x} + {len:#x} overflows"))?;
        let page_left = (PAGE_SIZE - (at & (PAGE_SIZE - 1))) as usize;
        let chunk = page_left.min(len - done);
        let leaf = translate(ram, cr3, at).map_err(|why| format!("{at:#x} is not mapped: {why}"))?;
        ram.read_bytes(leaf.phys, &mut bytes[done..done + chunk])
            .map_err(|_| format!("{at:#x} maps {:#x}, outside guest memory", leaf.phys))?;
        done += chunk;
    }
    Ok(bytes)
}

/// Where the leaf entry for `va` lives in the tables rooted at `pml4`:
/// `(entry GPA, entry, level)` (level 1 for a 4 KiB page). `None` if some
/// level is not present or unreadable. A test and diagnostic helper.
pub fn leaf_entry(ram: &GuestRam, pml4: u64, va: u64) -> Option<(u64, u64, u8)> {
    let mut table = pml4 & PTE_ADDRESS_MASK;
    for level in (1..=4u8).rev() {
        let index = (va >> (12 + 9 * (u32::from(level) - 1))) & 0x1ff;
        let gpa = table + index * 8;
        let entry = ram.read_u64(gpa).ok()?;
        if entry & PTE_PRESENT == 0 {
            return None;
        }
        if level == 1 || (level <= 3 && entry & PTE_HUGE != 0) {
            return Some((gpa, entry, level));
        }
        table = entry & PTE_ADDRESS_MASK;
    }
    None
}

/// The GPA of the level-`level` table entry for `va` under `pml4`, whether
/// present or not, if the tables above it are present. A test and
/// diagnostic helper (to plant an entry in an unused slot).
pub fn entry_slot(ram: &GuestRam, pml4: u64, va: u64, level: u8) -> Option<u64> {
    let mut table = pml4 & PTE_ADDRESS_MASK;
    for l in (level..=4u8).rev() {
        let index = (va >> (12 + 9 * (u32::from(l) - 1))) & 0x1ff;
        let gpa = table + index * 8;
        if l == level {
            return Some(gpa);
        }
        let entry = ram.read_u64(gpa).ok()?;
        if entry & PTE_PRESENT == 0 || entry & PTE_HUGE != 0 {
            return None;
        }
        table = entry & PTE_ADDRESS_MASK;
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds page tables in a scratch RAM: frames are handed out from
    /// `next`.
    pub(crate) struct Tables<'r> {
        pub ram: &'r GuestRam,
        pub next: u64,
    }

    pub(crate) const TABLE: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER;

    impl Tables<'_> {
        pub fn frame(&mut self) -> u64 {
            let frame = self.next;
            self.next += PAGE_SIZE;
            self.ram.write_bytes(frame, &[0u8; 4096]).unwrap();
            frame
        }

        /// Maps `va` -> `frame` with leaf `flags` (4 KiB), creating tables.
        pub fn map(&mut self, pml4: u64, va: u64, frame: u64, flags: u64) -> u64 {
            let mut table = pml4;
            for level in (2..=4u32).rev() {
                let gpa = table + ((va >> (12 + 9 * (level - 1))) & 0x1ff) * 8;
                let entry = self.ram.read_u64(gpa).unwrap();
                table = if entry & PTE_PRESENT != 0 {
                    entry & PTE_ADDRESS_MASK
                } else {
                    let next = self.frame();
                    self.ram.write(gpa, &(next | TABLE)).unwrap();
                    next
                };
            }
            let gpa = table + ((va >> 12) & 0x1ff) * 8;
            self.ram.write(gpa, &(frame | flags)).unwrap();
            gpa
        }
    }

    #[test]
    fn leaves_of_every_size_are_found_with_effective_rights() {
        let ram = GuestRam::new(16).unwrap();
        let mut t = Tables { ram: &ram, next: 0x10_0000 };
        let pml4 = t.frame();
        let code = t.frame();
        let data = t.frame();
        t.map(pml4, 0x40_0000, code, PTE_PRESENT | PTE_USER);
        let data_gpa =
            t.map(pml4, 0x1_0000_0000, data, PTE_PRESENT | PTE_USER | PTE_WRITABLE | PTE_NO_EXECUTE);
        // A 2 MiB leaf at 0x4000_0000 (PD entry) and a 1 GiB leaf beyond RAM.
        let pd_slot = entry_slot(&ram, pml4, 0x40_0000, 2).unwrap();
        let pd = pd_slot & !0xfff;
        ram.write(pd + 8, &(0x20_0000 | PTE_PRESENT | PTE_USER | PTE_HUGE | PTE_NO_EXECUTE)).unwrap();
        let pdpt = entry_slot(&ram, pml4, 0, 3).unwrap() & !0xfff;
        ram.write(pdpt + 16, &((4u64 << 30) | PTE_PRESENT | PTE_USER | PTE_HUGE)).unwrap();
        // A supervisor-only table above a user leaf: not user-accessible.
        let hidden = t.frame();
        let pt_gpa = t.map(pml4, 0x7000_0000_0000, hidden, PTE_PRESENT | PTE_USER);
        let pd_of_hidden = entry_slot(&ram, pml4, 0x7000_0000_0000, 2).unwrap();
        let pd_entry = ram.read_u64(pd_of_hidden).unwrap();
        ram.write(pd_of_hidden, &(pd_entry & !PTE_USER)).unwrap();

        let w = walk(&ram, None, &[(7, pml4)]);
        assert!(w.issues.is_empty(), "{:?}", w.issues);
        assert!(w.complete);
        let code_map = w.lookup(7, 0x40_0000).unwrap();
        assert_eq!(
            (code_map.frame, code_map.user, code_map.writable, code_map.nx),
            (code, true, false, false)
        );
        let data_map = w.lookup(7, 0x1_0000_0000).unwrap();
        assert_eq!((data_map.writable, data_map.nx, data_map.entry_gpa), (true, true, data_gpa));
        let large: Vec<_> = w.mappings.iter().filter(|m| m.page_size == 2 << 20).collect();
        assert_eq!(large.len(), 512);
        assert_eq!(w.lookup(7, 0x20_0000 + 0x5000).unwrap().frame, 0x20_5000);
        let huge: Vec<_> = w.mappings.iter().filter(|m| m.page_size == 1 << 30).collect();
        assert_eq!(huge.len(), 1, "a leaf beyond RAM is recorded once");
        assert_eq!(huge[0].frame, 4 << 30);
        let hidden_map = w.lookup(7, 0x7000_0000_0000).unwrap();
        assert!(!hidden_map.user);
        assert_eq!(hidden_map.entry_gpa, pt_gpa);
        assert!(w.is_table(pml4));
        // The PML4; a PDPT with a PD and PT for the image and another PD and
        // PT for the heap; PDPT, PD and PT for the hidden page.
        let tables = w.user_tables(7);
        assert_eq!(tables.len(), 9, "{tables:x?}");
        assert!(tables.contains(&pml4) && tables.contains(&(pd_slot & !0xfff)));
        assert!(w.user_tables(8).is_empty());
        assert_eq!(w.stats.entries, w.stats.tables * 512);
        assert!(w.broken.is_empty());
    }

    #[test]
    fn shared_and_cyclic_tables_are_issues_and_taint_what_is_below() {
        let ram = GuestRam::new(16).unwrap();
        let mut t = Tables { ram: &ram, next: 0x10_0000 };
        let (a, b) = (t.frame(), t.frame());
        let fa = t.frame();
        t.map(a, 0x40_0000, fa, PTE_PRESENT | PTE_USER);
        let fb = t.frame();
        t.map(b, 0x40_0000, fb, PTE_PRESENT | PTE_USER);
        // b's slot 1 points at a's PDPT.
        let a_pdpt = ram.read_u64(a).unwrap();
        ram.write(b + 8, &a_pdpt).unwrap();
        let w = walk(&ram, None, &[(1, a), (2, b)]);
        assert_eq!(w.issues.len(), 1, "{:#?}", w.issues);
        assert!(w.issues[0].what.contains("reached 2 times"), "{:?}", w.issues[0]);
        assert_eq!(w.broken, BTreeSet::from([1, 2]));
        assert!(w.mappings.iter().filter(|m| m.frame == fa).all(|m| m.tainted));
        assert!(!w.lookup(2, 0x40_0000).unwrap().tainted);

        // A PML4 that points at itself from every slot: bounded work.
        let ram = GuestRam::new(16).unwrap();
        let mut t = Tables { ram: &ram, next: 0x10_0000 };
        let pml4 = t.frame();
        let all: Vec<u64> = vec![pml4 | TABLE; 512];
        ram.write_bytes(pml4, all.as_bytes()).unwrap();
        let started = std::time::Instant::now();
        let w = walk(&ram, None, &[(1, pml4)]);
        assert!(!w.complete);
        assert!(w.issues.iter().any(|i| i.what.contains("stopped")), "{:#?}", w.issues);
        assert!(w.stats.tables <= 2 * 4096 + 1024 + 1);
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }

    #[test]
    fn one_hostile_tree_uses_its_own_budget_and_only_it_is_partial() {
        let ram = GuestRam::new(16).unwrap();
        let mut t = Tables { ram: &ram, next: 0x10_0000 };
        // pid 1: a PML4 pointing at itself from every user slot.
        let hostile = t.frame();
        let all: Vec<u64> = vec![hostile | TABLE; 256];
        ram.write_bytes(hostile, all.as_bytes()).unwrap();
        // pids 2 and 3, walked after it: one page each.
        let (a, b) = (t.frame(), t.frame());
        let (fa, fb) = (t.frame(), t.frame());
        t.map(a, 0x40_0000, fa, PTE_PRESENT | PTE_USER);
        t.map(b, 0x40_0000, fb, PTE_PRESENT | PTE_USER);
        let w = walk(&ram, None, &[(1, hostile), (2, a), (3, b)]);
        assert!(!w.complete);
        assert_eq!(w.partial, BTreeSet::from([1]), "{:#?}", w.issues);
        assert_eq!(w.lookup(2, 0x40_0000).map(|m| m.frame), Some(fa));
        assert_eq!(w.lookup(3, 0x40_0000).map(|m| m.frame), Some(fb));
        // Two hostile trees use up the total: later ones are cut at once,
        // and say so.
        let w = walk(&ram, None, &[(1, hostile), (4, hostile), (2, a)]);
        assert!(w.partial.contains(&1) && w.partial.contains(&2), "{:?}", w.partial);
        assert!(w.stats.tables <= 2 * 4096 + 1024 + 1);
    }

    #[test]
    fn same_pml4_twice_and_bad_pointers_are_issues() {
        let ram = GuestRam::new(16).unwrap();
        let mut t = Tables { ram: &ram, next: 0x10_0000 };
        let pml4 = t.frame();
        t.map(pml4, 0x40_0000, 0x30_0000, PTE_PRESENT | PTE_USER);
        let w = walk(&ram, None, &[(1, pml4), (2, pml4), (3, !0xfff), (4, 0x1234)]);
        let text: Vec<&str> = w.issues.iter().map(|i| i.what.as_str()).collect();
        assert!(text.iter().any(|t| t.contains("as its PML4")), "{text:#?}");
        assert_eq!(text.iter().filter(|t| t.contains("not a frame of guest memory")).count(), 2, "{text:#?}");
        assert_eq!(w.broken, BTreeSet::from([1, 2, 3, 4]));
        // An entry pointing beyond RAM.
        let ram = GuestRam::new(16).unwrap();
        let mut t = Tables { ram: &ram, next: 0x10_0000 };
        let pml4 = t.frame();
        ram.write(pml4, &(0x7fff_f000u64 | TABLE)).unwrap();
        let w = walk(&ram, None, &[(5, pml4)]);
        assert!(w.issues[0].what.contains("0x7ffff000 is not a frame"), "{:?}", w.issues);
    }

    #[test]
    fn the_kernel_half_is_walked_once_and_only_user_leaves_are_kept() {
        let ram = GuestRam::new(16).unwrap();
        let mut t = Tables { ram: &ram, next: 0x10_0000 };
        let kernel = t.frame();
        let va = 0xffff_8000_0000_0000u64;
        t.map(kernel, va, 0x1000, PTE_PRESENT | PTE_WRITABLE);
        let procs: Vec<(u32, u64)> = (1..=3)
            .map(|pid| {
                let pml4 = t.frame();
                let half: Vec<u64> = (256..512).map(|i| ram.read_u64(kernel + i * 8).unwrap()).collect();
                ram.write_bytes(pml4 + 256 * 8, half.as_bytes()).unwrap();
                (pid, pml4)
            })
            .collect();
        let w = walk(&ram, Some(kernel), &procs);
        assert!(w.kernel_user_leaves.is_empty());
        assert_eq!(w.stats.tables, 1 + 3 + 3, "kernel PML4 + its 3 tables + 3 process PML4s");
        assert!(w.issues.is_empty(), "{:?}", w.issues);
        // The one writable leaf, recorded once (not per process) and not
        // as a user mapping.
        assert_eq!(w.kernel_writable.len(), 1);
        let leaf = w.kernel_writable[0];
        assert_eq!((leaf.frame, leaf.va, leaf.page_size, leaf.pid), (0x1000, va, PAGE_SIZE, KERNEL_HALF));
        assert!(leaf.writable && !leaf.user && leaf.executable());
        assert!(w.mappings.is_empty());
        // A user-accessible kernel leaf (U at every level).
        let slot = entry_slot(&ram, kernel, va, 1).unwrap();
        ram.write(slot, &(0x1000 | PTE_PRESENT | PTE_USER)).unwrap();
        for level in 2..=4 {
            let gpa = entry_slot(&ram, kernel, va, level).unwrap();
            let entry = ram.read_u64(gpa).unwrap();
            ram.write(gpa, &(entry | PTE_USER)).unwrap();
        }
        // Process PML4s still hold the old slot-256 entry (without U): that
        // subtree is walked once more, finding nothing user-accessible.
        let w = walk(&ram, Some(kernel), &procs);
        assert_eq!(w.kernel_user_leaves.len(), 1);
        assert_eq!((w.kernel_user_leaves[0].frame, w.kernel_user_leaves[0].va), (0x1000, va));
        assert!(w.kernel_writable.is_empty(), "the leaf is no longer writable");
    }

    #[test]
    fn translations_carry_effective_rights_and_say_what_is_missing() {
        let ram = GuestRam::new(16).unwrap();
        let mut t = Tables { ram: &ram, next: 0x10_0000 };
        let pml4 = t.frame();
        let va = 0xffff_8000_0000_3000u64;
        t.map(pml4, va, 0x5000, PTE_PRESENT | PTE_WRITABLE | PTE_NO_EXECUTE);
        t.map(pml4, va + PAGE_SIZE, 0x9000, PTE_PRESENT);
        // Tables above are U|W; the leaf is supervisor, writable, NX.
        let leaf = translate(&ram, pml4, va + 0x12).unwrap();
        assert_eq!((leaf.phys, leaf.page_size), (0x5012, PAGE_SIZE));
        assert!(!leaf.user && leaf.writable && leaf.nx);
        let ro = translate(&ram, pml4 | 0x18, va + PAGE_SIZE).unwrap();
        assert!(!ro.writable && !ro.nx && ro.phys == 0x9000, "CR3 flag bits are ignored");
        let missing = translate(&ram, pml4, va + 2 * PAGE_SIZE).unwrap_err();
        assert!(missing.contains("PT entry") && missing.contains("not present"), "{missing}");
        let missing = translate(&ram, pml4, 0x1000).unwrap_err();
        assert!(missing.contains("PML4 entry"), "{missing}");
        assert!(translate(&ram, 1 << 40, va).unwrap_err().contains("outside guest memory"));
        // Reads across pages follow each page's frame.
        ram.write_bytes(0x5ffe, &[1, 2]).unwrap();
        ram.write_bytes(0x9000, &[3, 4]).unwrap();
        assert_eq!(read_virtual(&ram, pml4, va + 0xffe, 4).unwrap(), [1, 2, 3, 4]);
        let error = read_virtual(&ram, pml4, va + PAGE_SIZE + 0xfff, 2).unwrap_err();
        assert!(error.starts_with("0xffff800000005000 is not mapped"), "{error}");
        assert!(read_virtual(&ram, pml4, u64::MAX, 2).is_err());
        assert!(read_virtual(&ram, pml4, va, 1 << 20).is_err());
    }

    #[test]
    fn writable_kernel_leaves_are_recorded_once_per_leaf_under_a_budget() {
        let ram = GuestRam::new(16).unwrap();
        let mut t = Tables { ram: &ram, next: 0x10_0000 };
        let kernel = t.frame();
        let va = 0xffff_8000_0000_0000u64;
        t.map(kernel, va, 0, PTE_PRESENT | PTE_WRITABLE | PTE_NO_EXECUTE);
        // The PD above it: 511 more 2 MiB writable leaves, one of them
        // executable, and a read-only one.
        let pd = entry_slot(&ram, kernel, va, 2).unwrap() & !0xfff;
        for i in 1..512u64 {
            let nx = if i == 7 { 0 } else { PTE_NO_EXECUTE };
            let w = if i == 9 { 0 } else { PTE_WRITABLE };
            ram.write(pd + i * 8, &((i << 21) | PTE_PRESENT | PTE_HUGE | w | nx)).unwrap();
        }
        let w = walk(&ram, Some(kernel), &[]);
        assert!(w.complete);
        assert_eq!(w.kernel_writable.len(), 1 + 510);
        let large: Vec<_> = w.kernel_writable.iter().filter(|m| m.page_size == 2 << 20).collect();
        assert_eq!(large.len(), 510);
        let executable: Vec<_> = w.kernel_writable.iter().filter(|m| m.executable()).collect();
        assert_eq!(executable.len(), 1);
        assert_eq!((executable[0].frame, executable[0].va), (7 << 21, va + (7 << 21)));
        // A hostile table: every PML4 slot of the kernel half points at the
        // same PDPT full of 1 GiB writable leaves. Bounded.
        let ram = GuestRam::new(16).unwrap();
        let mut t = Tables { ram: &ram, next: 0x10_0000 };
        let (kernel, pdpt) = (t.frame(), t.frame());
        let leaves: Vec<u64> =
            (0..512u64).map(|i| (i << 30) | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE).collect();
        ram.write_bytes(pdpt, leaves.as_bytes()).unwrap();
        let pointers: Vec<u64> = (0..256).map(|i| pdpt | TABLE | (i << 52)).collect();
        ram.write_bytes(kernel + 256 * 8, pointers.as_bytes()).unwrap();
        let w = walk(&ram, Some(kernel), &[]);
        assert!(w.kernel_writable.len() as u64 <= 8 * 4096 + 65536);
        assert!(w.kernel_writable.len() >= 512);
    }
}
