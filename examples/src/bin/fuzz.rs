//! `fuzz`: a system-call fuzzer in the style of syzkaller. A deterministic
//! PRNG (splitmix64) seeded with `seed=` drives `calls=` random system calls.
//! The fuzzer keeps a model of everything it holds, so that most calls are
//! valid and their results can be predicted:
//!
//! - its mapping window: `mem_map` memory (split by partial `mem_unmap` and
//!   `mem_protect` exactly as the kernel splits it, with the rights of each
//!   part), its mappings of shared regions, and the revoked ranges the kernel
//!   keeps reserved; from this it predicts where the next mapping goes (first
//!   fit after a guard page) and whether any page may be read or written;
//! - the content of the pages it wrote (a pattern per page from a seed, with
//!   the holes where the kernel wrote on its behalf), checked again later:
//!   data survives unrelated calls, fresh memory reads as zero, and a call
//!   that failed or wrote `n` bytes changed nothing else;
//! - its shared regions (handle, region id, rights, mapping, grant to the
//!   peer), the capabilities the peer granted it (learned from `cap_list`),
//!   and the handles that went stale;
//! - the messages it sent to itself (length and checksum, checked on
//!   receipt in FIFO order) and stamped messages exchanged with the peer
//!   (a sequence number and checksum: none may be lost or corrupted).
//!
//! Valid calls are mixed with invalid ones: random, huge, overflowing,
//! unaligned, non-canonical and kernel-half pointers and lengths, guard
//! pages, revoked ranges, pointers into its own code, read-only data and
//! gate page for calls that write (`mem_stat`, `ipc_recv`, `cap_list`),
//! forged and stale handles, bad `prot`, rights and flags, pids that do not
//! exist (or only exist in the low 32 bits), unknown system-call numbers,
//! and junk in unused argument registers. It never touches memory it did
//! not map on purpose, never blocks without a message waiting, and never
//! touches a peer's region (the peer may revoke it at any moment).
//!
//! Every result is checked against what the ABI allows: an error must be
//! one of the `SysError` values and one that some argument justifies, a
//! valid call must succeed, and a success must return what the model
//! predicts. The first violation prints
//! `fuzz: seed S: call #i <name>(args) -> unexpected <result> ...` and the
//! fuzzer exits with status 1. At the end it prints one summary line,
//! `fuzz: seed S: N calls, E distinct errors, ...`, with the counts of its
//! successful calls that the kernel logs as events (so a harness can compare
//! them with the event log), and exits 0.
//!
//! Arguments: `seed=<u64> calls=<n> peer=<pid or 0> [active=1]`. `peer` is
//! a process to send messages and grant regions to; with `active=1` it is
//! another fuzzer that also sends and grants (so the mailbox and the
//! capability table change under this one's feet), otherwise it never
//! does. The PRNG stream also depends on the caller's pid, so two fuzzers
//! with the same seed make different calls.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use core::cell::UnsafeCell;
use core::fmt;
use superos_protocol::layout::{
    GATE_VA, KERNEL_HALF_START, USER_HALF_END, USER_IMAGE_BASE, USER_IMAGE_LIMIT, USER_MMAP_BASE,
    USER_MMAP_LIMIT, USER_MMAP_MAX, USER_STACK_GUARD_PAGES, USER_STACK_PAGES, USER_STACK_TOP,
};
use superos_protocol::syscall::{decode_recv, Syscall, MAX_ERRNO, WRITE_MAX};
use superos_rt::{
    arg, exit, println, raw, read_u64, read_u8, write, write_u64, write_u8, CapInfo, Error, MemStat,
    CAPS_MAX, MAILBOX_DEPTH, MAILBOX_PER_SENDER, MESSAGE_MAX, PAGE_SIZE, PROT_EXEC, PROT_READ, PROT_WRITE,
    RECV_NONBLOCK, RIGHTS_ALL, RIGHT_GRANT, RIGHT_READ, RIGHT_WRITE, SHM_MAX,
};

const PAGE: u64 = PAGE_SIZE;
const RW: u64 = PROT_READ | PROT_WRITE;
/// Areas of the mapping window the model can hold.
const AREAS_MAX: usize = 128;
/// Pages whose content the model records.
const TRACKED_MAX: usize = 512;
/// Own live regions at most (the peer holds as many: both tables stay far
/// below [`CAPS_MAX`]).
const OWN_MAX: usize = 10;
/// Capabilities from the peer the model can hold.
const FOREIGN_MAX: usize = 16;
/// Stale handles remembered.
const STALE_MAX: usize = 16;
/// Pages of an own region at most.
const REGION_PAGES: u64 = 16;
/// Most pages one valid `mem_unmap`/`mem_protect` may cover (the kernel
/// walks every page; a 1 GiB range takes seconds where ring 0 is emulated).
const RANGE_PAGES: u64 = 256;
/// The program image is far smaller than this: image-window pages beyond
/// `USER_IMAGE_BASE + IMAGE_USED` are unmapped.
const IMAGE_USED: u64 = 16 << 20;
/// Lowest stack page.
const STACK_BOTTOM: u64 = USER_STACK_TOP - USER_STACK_PAGES * PAGE;
/// The stack guard.
const STACK_GUARD: u64 = STACK_BOTTOM - USER_STACK_GUARD_PAGES * PAGE;
/// Tracked-page keys of shared-region pages have this bit (other keys are
/// page addresses).
const SHM_KEY: u64 = 1 << 63;
/// Stamped message header: tag, sequence number, payload checksum.
const HEADER: u64 = 24;
/// Mixed into every stamp tag.
const STAMP: u64 = 0x5f75_7a7a_2d73_7461;
/// Alignment of shared mappings (the kernel's `SHARED_ALIGN`).
const SHARED_ALIGN: u64 = 2 << 20;

/// Size of a `cap_list` record.
const CAP_RECORD: u64 = core::mem::size_of::<CapInfo>() as u64;
/// Size of a `MemStat`.
const STAT_SIZE: u64 = core::mem::size_of::<MemStat>() as u64;

// ---------------------------------------------------------------------------
// Memory the fuzzer owns outright.

/// Two pages the kernel may write into on the fuzzer's behalf.
#[repr(C, align(4096))]
struct Scratch(UnsafeCell<[u8; 2 * PAGE_SIZE as usize]>);

// SAFETY: the program is single-threaded; the scratch bytes are only reached
// through raw addresses (volatile accesses and system-call arguments).
unsafe impl Sync for Scratch {}

impl Scratch {
    const fn new() -> Self {
        Scratch(UnsafeCell::new([0; 2 * PAGE_SIZE as usize]))
    }
    fn addr(&self) -> u64 {
        self.0.get() as u64
    }
}

/// Scratch pages in the data segment.
static STATIC_SCRATCH: Scratch = Scratch::new();
/// Where stamped messages are built (never a random buffer).
static MESSAGE: Scratch = Scratch::new();

/// Two pages of read-only data (a target the kernel must never write).
#[repr(C, align(4096))]
struct ReadOnly([u8; 2 * PAGE_SIZE as usize]);
static RODATA: ReadOnly = ReadOnly([0x5a; 2 * PAGE_SIZE as usize]);

/// The fuzzer's state (too big for the 32 KiB stack).
struct Global(UnsafeCell<Fuzz>);
// SAFETY: single-threaded; `main` takes the one reference.
unsafe impl Sync for Global {}
static STATE: Global = Global(UnsafeCell::new(Fuzz::new()));

// ---------------------------------------------------------------------------
// Small helpers.

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
    /// Uniform in `0..n` (0 if `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// The splitmix64 finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Word `index` of a page filled with `seed` (0: a zero page).
fn pattern(seed: u64, index: u64) -> u64 {
    if seed == 0 {
        0
    } else {
        mix(seed ^ index.wrapping_mul(0xd6e8_feb8_6659_fd93))
    }
}

/// FNV-1a over `len` bytes at `addr` (which the fuzzer may read).
fn checksum(addr: u64, len: u64) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for i in 0..len {
        // SAFETY: callers pass buffers every page of which the model says is
        // readable, and no Rust reference covers them.
        hash = (hash ^ u64::from(unsafe { read_u8(addr + i) })).wrapping_mul(0x100_0000_01b3);
    }
    hash
}

/// Reads a little-endian `u64` at any alignment from readable memory.
fn peek_unaligned(addr: u64) -> u64 {
    // SAFETY: as for `checksum`.
    (0..8).fold(0, |value, i| value | u64::from(unsafe { read_u8(addr + i) }) << (8 * i))
}

/// Writes a little-endian `u64` at any alignment into writable memory.
fn poke_unaligned(addr: u64, value: u64) {
    for i in 0..8 {
        // SAFETY: callers pass the message scratch, which only raw accesses reach.
        unsafe { write_u8(addr + i, (value >> (8 * i)) as u8) };
    }
}

/// The tag of a stamped message.
fn stamp_tag(sender: u32, dest: u32, seq: u64, len: u64, sum: u64) -> u64 {
    STAMP ^ mix(u64::from(sender) | u64::from(dest) << 32) ^ mix(seq ^ len << 40) ^ sum
}

/// Normalised rights (write implies read), or `None` if the kernel must
/// refuse them.
fn rights_of(bits: u64) -> Option<u64> {
    if bits == 0 || bits & !RIGHTS_ALL != 0 {
        return None;
    }
    Some(if bits & RIGHT_WRITE != 0 { bits | RIGHT_READ } else { bits })
}

/// The pages `[addr, addr + len)` touches (`len` > 0, no overflow).
fn pages(addr: u64, len: u64) -> impl Iterator<Item = u64> {
    ((addr & !(PAGE - 1))..addr + len).step_by(PAGE as usize)
}

fn parse_u64(text: &[u8]) -> Option<u64> {
    core::str::from_utf8(text).ok()?.trim().parse().ok()
}

// ---------------------------------------------------------------------------
// Expected results.

/// What the kernel may answer to one call.
#[derive(Clone, Copy)]
struct Expect {
    /// Some argument is certainly wrong: success is a violation.
    refused: bool,
    /// Allowed errors (bit `n` = error number `n`).
    errors: u32,
}

impl Expect {
    const OK: Expect = Expect { refused: false, errors: 0 };

    /// The call must fail, `error` being one allowed answer.
    fn must(&mut self, error: Error) {
        self.refused = true;
        self.errors |= 1 << error as u32;
    }

    /// `error` is allowed (the call may still succeed).
    fn may(&mut self, error: Error) {
        self.errors |= 1 << error as u32;
    }

    fn allows(self, error: Error) -> bool {
        self.errors & (1 << error as u32) != 0
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        if !self.refused {
            f.write_str("Ok")?;
            first = false;
        }
        for raw in 1..32u64 {
            if self.errors & (1 << raw) != 0 {
                if !first {
                    f.write_str(" or ")?;
                }
                first = false;
                match Error::from_raw(raw) {
                    Some(error) => write!(f, "{error}")?,
                    None => write!(f, "error {raw}")?,
                }
            }
        }
        Ok(())
    }
}

/// What a call returned.
#[derive(Clone, Copy)]
enum Outcome {
    Ok(u64),
    Err(Error),
    /// In the error range but no `SysError`.
    Bogus(u64),
}

impl Outcome {
    fn decode(rax: u64) -> Outcome {
        let negated = rax.wrapping_neg();
        if rax != 0 && negated <= MAX_ERRNO {
            match Error::from_raw(negated) {
                Some(error) => Outcome::Err(error),
                None => Outcome::Bogus(rax),
            }
        } else {
            Outcome::Ok(rax)
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok(value) => write!(f, "Ok({value:#x})"),
            Outcome::Err(error) => write!(f, "Err({error})"),
            Outcome::Bogus(rax) => write!(f, "an undefined error number (rax {rax:#x})"),
        }
    }
}

/// The call being made, for reports.
#[derive(Clone, Copy)]
struct Call {
    name: &'static str,
    args: [u64; 3],
    count: usize,
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(", self.name)?;
        for (i, value) in self.args[..self.count].iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{value:#x}")?;
        }
        f.write_str(")")
    }
}

// ---------------------------------------------------------------------------
// The model.

/// What occupies an area of the mapping window.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `mem_map` memory; `dirty`: the kernel wrote into pages the model does
    /// not track, so untracked pages are not known to be zero.
    Anon { writable: bool, dirty: bool },
    /// Own region `own[i]`.
    Own(usize),
    /// Peer capability `foreign[i]` (the peer may revoke it at any time).
    Foreign(usize),
    /// A revoked mapping: reserved forever, never accessible.
    Revoked,
}

#[derive(Clone, Copy)]
struct Area {
    start: u64,
    end: u64,
    kind: Kind,
}

impl Area {
    const EMPTY: Area = Area { start: 0, end: 0, kind: Kind::Revoked };
}

#[derive(Clone, Copy)]
struct Mapping {
    addr: u64,
    writable: bool,
}

/// A region the fuzzer created.
#[derive(Clone, Copy)]
struct OwnRegion {
    live: bool,
    /// Distinguishes regions in tracked-page keys.
    serial: u64,
    handle: u64,
    /// Region id, once `cap_list` showed it.
    id: Option<u32>,
    len: u64,
    rights: u64,
    map: Option<Mapping>,
    /// Rights granted to the peer (if it holds a capability).
    granted: Option<u64>,
    /// The peer could write to it: its content is not checked.
    tainted: bool,
    /// Untracked pages are not known to be zero.
    dirty: bool,
}

impl OwnRegion {
    const EMPTY: OwnRegion = OwnRegion {
        live: false,
        serial: 0,
        handle: 0,
        id: None,
        len: 0,
        rights: 0,
        map: None,
        granted: None,
        tainted: false,
        dirty: false,
    };
}

/// A capability the peer granted.
#[derive(Clone, Copy)]
struct ForeignCap {
    live: bool,
    handle: u64,
    id: u32,
    len: u64,
    rights: u64,
    map: Option<Mapping>,
}

impl ForeignCap {
    const EMPTY: ForeignCap = ForeignCap { live: false, handle: 0, id: 0, len: 0, rights: 0, map: None };
}

/// Recorded content of one page: the pattern of `seed`, except bytes
/// `lo..hi` that the kernel wrote.
#[derive(Clone, Copy)]
struct Tracked {
    /// 0: free slot.
    key: u64,
    seed: u64,
    lo: u16,
    hi: u16,
}

impl Tracked {
    const EMPTY: Tracked = Tracked { key: 0, seed: 0, lo: 0, hi: 0 };
}

/// A message the fuzzer sent itself.
#[derive(Clone, Copy)]
struct SelfMessage {
    len: u64,
    sum: Option<u64>,
}

/// Whether a page may be accessed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    No,
    Yes,
    /// A peer's region: accessible until the peer revokes it.
    Maybe,
    /// The model does not know (never used as an argument).
    Unknown,
}

/// A buffer argument.
#[derive(Clone, Copy)]
struct Buffer {
    addr: u64,
    len: u64,
    expect: Expect,
    /// Every page may be read by the fuzzer itself (so the result can be
    /// checked).
    readable: bool,
}

/// Which handle an argument is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Handle {
    Own(usize),
    Foreign(usize),
    /// Forged, stale or random: names nothing.
    Bad,
}

/// Which pid an argument is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Me,
    Peer,
    /// A pid that never exists (or does only in its low 32 bits).
    Nobody,
}

/// Counters for the summary.
struct Stats {
    ok: u64,
    errors: [u64; 16],
    checks: u64,
    fills: u64,
    mapped: u64,
    unmapped: u64,
    protected: u64,
    created: u64,
    shm_mapped: u64,
    shm_unmapped: u64,
    granted: u64,
    accepted: u64,
    destroyed: u64,
    denied: u64,
}

struct Fuzz {
    seed: u64,
    rng: Rng,
    /// System calls made (fuzz calls; not the runtime's own prints).
    index: u64,
    target: u64,
    last: Call,
    me: u32,
    peer: u32,
    active: bool,
    /// Print every call and its result.
    trace: bool,
    peer_dead: bool,
    /// Messages sent to a passive peer (which never receives).
    sent_to_passive: u64,
    start: MemStat,
    areas: [Area; AREAS_MAX],
    area_count: usize,
    own: [OwnRegion; OWN_MAX],
    serial: u64,
    foreign: [ForeignCap; FOREIGN_MAX],
    stale: [u64; STALE_MAX],
    stale_count: usize,
    stale_next: usize,
    tracked: [Tracked; TRACKED_MAX],
    selfq: [SelfMessage; MAILBOX_DEPTH],
    selfq_head: usize,
    selfq_len: usize,
    seq_out: u64,
    seq_in: u64,
    seq_unknown: bool,
    static_scratch: u64,
    stack_scratch: u64,
    code_page: u64,
    rodata: u64,
    message: u64,
    stats: Stats,
}

impl Fuzz {
    const fn new() -> Fuzz {
        Fuzz {
            seed: 0,
            rng: Rng(0),
            index: 0,
            target: 0,
            last: Call { name: "start", args: [0; 3], count: 0 },
            me: 0,
            peer: 0,
            active: false,
            trace: false,
            peer_dead: false,
            sent_to_passive: 0,
            start: MemStat {
                virtual_bytes: 0,
                resident_bytes: 0,
                shared_bytes: 0,
                max_virtual_bytes: 0,
                max_resident_bytes: 0,
                max_shared_bytes: 0,
                policy: 0,
                reserved: 0,
            },
            areas: [Area::EMPTY; AREAS_MAX],
            area_count: 0,
            own: [OwnRegion::EMPTY; OWN_MAX],
            serial: 0,
            foreign: [ForeignCap::EMPTY; FOREIGN_MAX],
            stale: [0; STALE_MAX],
            stale_count: 0,
            stale_next: 0,
            tracked: [Tracked::EMPTY; TRACKED_MAX],
            selfq: [SelfMessage { len: 0, sum: None }; MAILBOX_DEPTH],
            selfq_head: 0,
            selfq_len: 0,
            seq_out: 0,
            seq_in: 0,
            seq_unknown: false,
            static_scratch: 0,
            stack_scratch: 0,
            code_page: 0,
            rodata: 0,
            message: 0,
            stats: Stats {
                ok: 0,
                errors: [0; 16],
                checks: 0,
                fills: 0,
                mapped: 0,
                unmapped: 0,
                protected: 0,
                created: 0,
                shm_mapped: 0,
                shm_unmapped: 0,
                granted: 0,
                accepted: 0,
                destroyed: 0,
                denied: 0,
            },
        }
    }

    // -----------------------------------------------------------------------
    // Calls and verdicts.

    /// Makes system call `number` with `args` (junk in the unused argument
    /// registers) and checks the result against `expect`.
    fn call(&mut self, name: &'static str, number: u64, args: &[u64], expect: Expect) -> Outcome {
        let mut regs = [0u64; 5];
        for slot in regs.iter_mut() {
            *slot = self.rng.next();
        }
        regs[..args.len()].copy_from_slice(args);
        let mut shown = [0u64; 3];
        let count = args.len().min(3);
        shown[..count].copy_from_slice(&args[..count]);
        self.index += 1;
        self.last = Call { name, args: shown, count };
        // The model classified every pointer argument; `exit` is never made here.
        // SAFETY: the kernel may write only into scratch pages or mappings the fuzzer owns and reaches
        // only through raw addresses, never into its stack, state or code.
        let rax = unsafe { raw::syscall(number, regs[0], regs[1], regs[2], regs[3], regs[4]) };
        let outcome = Outcome::decode(rax);
        let fine = match outcome {
            Outcome::Ok(_) => !expect.refused,
            Outcome::Err(error) => expect.allows(error),
            Outcome::Bogus(_) => false,
        };
        if !fine {
            println!(
                "fuzz: seed {}: call #{} {} -> unexpected {outcome} (allowed: {expect})",
                self.seed, self.index, self.last
            );
            exit(1);
        }
        if self.trace {
            println!("fuzz: #{} {} -> {outcome}", self.index, self.last);
        }
        match outcome {
            Outcome::Ok(_) => self.stats.ok += 1,
            Outcome::Err(error) => self.stats.errors[error as usize] += 1,
            Outcome::Bogus(_) => {}
        }
        outcome
    }

    /// Reports a result the model did not predict and exits 1.
    fn wrong(&self, what: fmt::Arguments<'_>) -> ! {
        println!("fuzz: seed {}: call #{} {} -> unexpected {what}", self.seed, self.index, self.last);
        exit(1)
    }

    // -----------------------------------------------------------------------
    // The mapping window.

    fn area_at(&self, addr: u64) -> Option<usize> {
        self.areas[..self.area_count].iter().position(|a| a.start <= addr && addr < a.end)
    }

    fn area_starting_at(&self, addr: u64) -> Option<usize> {
        self.areas[..self.area_count].iter().position(|a| a.start == addr)
    }

    fn room(&self, more: usize) -> bool {
        self.area_count + more <= AREAS_MAX
    }

    fn insert_area(&mut self, area: Area) {
        let at = self.areas[..self.area_count].partition_point(|a| a.start < area.start);
        self.areas.copy_within(at..self.area_count, at + 1);
        self.areas[at] = area;
        self.area_count += 1;
    }

    fn remove_area(&mut self, index: usize) {
        self.areas.copy_within(index + 1..self.area_count, index);
        self.area_count -= 1;
    }

    /// Splits the area containing `at` so that `at` is a boundary.
    fn split_at(&mut self, at: u64) {
        if let Some(i) = self.area_at(at) {
            let area = self.areas[i];
            if area.start < at {
                self.areas[i].end = at;
                self.insert_area(Area { start: at, ..area });
            }
        }
    }

    /// Where the kernel puts the next mapping of `len` bytes: first fit from
    /// the window's base, with a guard page after every mapping.
    fn place(&self, len: u64) -> Option<u64> {
        self.place_aligned(len, PAGE)
    }

    /// Where the kernel puts a shared mapping of `len` bytes: 2 MiB-aligned,
    /// holding the rest of its last 2 MiB.
    fn place_shared(&self, len: u64) -> Option<u64> {
        self.place_aligned(len.next_multiple_of(SHARED_ALIGN), SHARED_ALIGN)
    }

    fn place_aligned(&self, len: u64, align: u64) -> Option<u64> {
        let mut candidate = USER_MMAP_BASE.next_multiple_of(align);
        for area in &self.areas[..self.area_count] {
            if candidate + len + PAGE <= area.start {
                break;
            }
            // Shared mappings and revoked ranges hold the rest of their last
            // 2 MiB (their page tables are their own).
            let end = match area.kind {
                Kind::Anon { .. } => area.end,
                Kind::Own(_) | Kind::Foreign(_) | Kind::Revoked => area.end.next_multiple_of(SHARED_ALIGN),
            };
            candidate = candidate.max((end + PAGE).next_multiple_of(align));
        }
        (candidate + len + PAGE <= USER_MMAP_LIMIT).then_some(candidate)
    }

    /// The kernel's check of a `mem_unmap`/`mem_protect` range: whole pages
    /// of `mem_map` memory with no hole. Returns the page-rounded end.
    fn anon_range(&self, addr: u64, len: u64) -> Result<u64, Error> {
        if addr % PAGE != 0 {
            return Err(Error::Unaligned);
        }
        if len == 0 {
            return Err(Error::InvalidArgument);
        }
        let end =
            addr.checked_add(len).and_then(|e| e.checked_next_multiple_of(PAGE)).ok_or(Error::Overflow)?;
        let mut cursor = addr;
        while cursor < end {
            match self.area_at(cursor).map(|i| self.areas[i]) {
                Some(area) if matches!(area.kind, Kind::Anon { .. }) => cursor = area.end,
                _ => return Err(Error::BadAddress),
            }
        }
        Ok(end)
    }

    /// Bytes of address space the model knows are in use (image and stack
    /// included), and bytes of peer mappings that may have been revoked.
    fn virtual_usage(&self) -> (u64, u64) {
        let mut known = self.start.virtual_bytes;
        let mut foreign = 0;
        for area in &self.areas[..self.area_count] {
            match area.kind {
                Kind::Anon { .. } | Kind::Own(_) => known += area.end - area.start,
                Kind::Foreign(_) => foreign += area.end - area.start,
                Kind::Revoked => {}
            }
        }
        (known, foreign)
    }

    /// Shared bytes charged: own regions, and peer mappings (maybe revoked).
    fn shared_usage(&self) -> (u64, u64) {
        let own = self.own.iter().filter(|r| r.live).map(|r| r.len).sum();
        (own, self.virtual_usage().1)
    }

    /// Adds the quota error a charge of `bytes` may or must meet.
    fn quota(&self, used: (u64, u64), limit: u64, bytes: u64, expect: &mut Expect) {
        if limit == 0 {
            return;
        }
        if used.0 + bytes > limit {
            expect.must(Error::QuotaExceeded);
        } else if used.0 + used.1 + bytes > limit {
            expect.may(Error::QuotaExceeded);
        }
    }

    /// Whether the fuzzer (and, for `write`, the kernel on its behalf) may
    /// access `page`.
    fn access(&self, page: u64, write: bool) -> Access {
        let ro = if write { Access::No } else { Access::Yes };
        let inside = |base: u64, pages: u64| base <= page && page < base + pages * PAGE;
        if page < USER_IMAGE_BASE {
            Access::No
        } else if inside(self.code_page, 1) || inside(self.rodata, 2) {
            ro
        } else if inside(self.static_scratch, 2) {
            Access::Yes
        } else if page < USER_IMAGE_BASE + IMAGE_USED {
            Access::Unknown
        } else if page < USER_MMAP_BASE {
            Access::No
        } else if page < USER_MMAP_LIMIT {
            let Some(i) = self.area_at(page) else { return Access::No };
            let yes = |writable: bool| if writable || !write { Access::Yes } else { Access::No };
            match self.areas[i].kind {
                Kind::Anon { writable, .. } => yes(writable),
                Kind::Own(r) => yes(self.own[r].map.is_some_and(|m| m.writable)),
                Kind::Foreign(f) => match yes(self.foreign[f].map.is_some_and(|m| m.writable)) {
                    Access::Yes => Access::Maybe,
                    other => other,
                },
                Kind::Revoked => Access::No,
            }
        } else if page < STACK_BOTTOM {
            Access::No
        } else if page < USER_STACK_TOP {
            if !write || inside(self.stack_scratch, 2) {
                Access::Yes
            } else {
                Access::Unknown
            }
        } else if page == GATE_VA {
            ro
        } else {
            Access::No
        }
    }

    /// Whether nothing but the fuzzer's own calls changes `[addr, addr +
    /// len)`: not the live stack (outside the scratch pages), not a region
    /// the peer may write to.
    fn stable(&self, addr: u64, len: u64) -> bool {
        len == 0
            || pages(addr, len).all(|page| {
                let stack = (STACK_BOTTOM..USER_STACK_TOP).contains(&page)
                    && !(self.stack_scratch..self.stack_scratch + 2 * PAGE).contains(&page);
                let tainted = self.area_at(page).is_some_and(|i| match self.areas[i].kind {
                    Kind::Own(r) => self.own[r].tainted,
                    _ => false,
                });
                !stack && !tainted
            })
    }

    /// What the kernel may answer about buffer `[addr, addr + len)` (`max`:
    /// the call's length limit). `None` if the model cannot tell.
    fn classify(&self, addr: u64, len: u64, write: bool, max: u64) -> Option<Buffer> {
        let mut buffer = Buffer { addr, len, expect: Expect::OK, readable: false };
        if len == 0 {
            return Some(buffer);
        }
        if len > max.min(PAGE) {
            buffer.expect.must(Error::TooLarge);
            return Some(buffer);
        }
        let Some(end) = addr.checked_add(len) else {
            buffer.expect.must(Error::Overflow);
            return Some(buffer);
        };
        if end > USER_HALF_END {
            buffer.expect.must(Error::BadAddress);
            return Some(buffer);
        }
        let mut unknown = false;
        buffer.readable = true;
        for page in pages(addr, len) {
            match self.access(page, write) {
                Access::No => {
                    buffer.expect = Expect::OK;
                    buffer.expect.must(Error::BadAddress);
                    buffer.readable = false;
                    return Some(buffer);
                }
                Access::Maybe => {
                    buffer.expect.may(Error::BadAddress);
                    buffer.readable = false;
                }
                Access::Unknown => unknown = true,
                Access::Yes => {}
            }
        }
        (!unknown).then_some(buffer)
    }

    // -----------------------------------------------------------------------
    // Argument generators.

    fn random_len(&mut self) -> u64 {
        match self.rng.below(100) {
            0..=4 => 0,
            5..=34 => self.rng.range(1, 64),
            35..=59 => self.rng.range(65, 512),
            60..=79 => self.rng.range(513, PAGE),
            80..=89 => PAGE,
            _ => {
                let huge = [PAGE + 1, 2 * PAGE, 1 << 20, u64::MAX, self.rng.next()];
                self.rng.pick(&huge)
            }
        }
    }

    /// An offset into a page for a buffer of `len` bytes: at the start,
    /// anywhere, ending at the page end, or crossing into the next page.
    fn offset(&mut self, len: u64) -> u64 {
        match self.rng.below(10) {
            0..=2 => 0,
            3..=5 => self.rng.below(PAGE),
            6..=7 if len <= PAGE => PAGE - len,
            _ => PAGE - 1 - self.rng.below(len.clamp(1, PAGE)),
        }
    }

    fn random_area(&mut self, want: impl Fn(&Kind) -> bool) -> Option<Area> {
        let count = self.areas[..self.area_count].iter().filter(|a| want(&a.kind)).count() as u64;
        if count == 0 {
            return None;
        }
        let n = self.rng.below(count) as usize;
        self.areas[..self.area_count].iter().filter(|a| want(&a.kind)).nth(n).copied()
    }

    fn random_page_of(&mut self, area: Area) -> u64 {
        area.start + self.rng.below((area.end - area.start) / PAGE) * PAGE
    }

    /// An address that is not a valid buffer (mostly).
    fn bad_address(&mut self) -> u64 {
        let rng = &mut self.rng;
        match rng.below(16) {
            0 => 0,
            1 => rng.below(USER_IMAGE_BASE),
            2 => USER_IMAGE_BASE + IMAGE_USED + rng.below(USER_IMAGE_LIMIT - USER_IMAGE_BASE - IMAGE_USED),
            3 => USER_IMAGE_LIMIT + rng.below(USER_MMAP_BASE - USER_IMAGE_LIMIT),
            4 => USER_MMAP_BASE + rng.below(1 << 28),
            5 => match self.random_area(|_| true) {
                Some(area) => area.end + self.rng.below(PAGE),
                None => USER_MMAP_BASE,
            },
            6 => match self.random_area(|k| *k == Kind::Revoked) {
                Some(area) => area.start + self.rng.below(area.end - area.start),
                None => USER_MMAP_LIMIT + self.rng.below(PAGE),
            },
            7 => STACK_GUARD + rng.below(PAGE),
            8 => USER_STACK_TOP + rng.below(GATE_VA - USER_STACK_TOP),
            9 => GATE_VA + PAGE + rng.below(USER_HALF_END - GATE_VA - PAGE),
            10 => USER_HALF_END - 1 - rng.below(64),
            11 => USER_HALF_END + rng.below(1 << 46),
            12 => KERNEL_HALF_START + rng.below(1 << 30),
            13 => 0xffff_ffff_8000_0000 + rng.below(1 << 24),
            14 => u64::MAX - rng.below(64),
            _ => rng.next(),
        }
    }

    /// A buffer address for `len` bytes.
    fn buffer_address(&mut self, len: u64) -> u64 {
        let page = match self.rng.below(100) {
            0..=13 => self.static_scratch + PAGE * self.rng.below(2),
            14..=27 => self.stack_scratch + PAGE * self.rng.below(2),
            28..=49 => match self.random_area(|k| matches!(k, Kind::Anon { .. })) {
                Some(area) => self.random_page_of(area),
                None => self.static_scratch,
            },
            50..=59 => match self.random_area(|k| matches!(k, Kind::Own(_))) {
                Some(area) => self.random_page_of(area),
                None => self.stack_scratch,
            },
            60..=65 => match self.random_area(|k| matches!(k, Kind::Foreign(_))) {
                Some(area) => self.random_page_of(area),
                None => self.static_scratch,
            },
            66..=70 => self.code_page,
            71..=75 => self.rodata + PAGE * self.rng.below(2),
            76..=79 => GATE_VA,
            80..=82 => STACK_BOTTOM + PAGE * self.rng.below(USER_STACK_PAGES),
            _ => return self.bad_address(),
        };
        page + self.offset(len)
    }

    /// A buffer the kernel reads (`write` false) or writes, of `len` bytes
    /// (random if `None`); `max` is the call's length limit.
    fn buffer(&mut self, write: bool, len: Option<u64>, max: u64) -> Buffer {
        for _ in 0..32 {
            let len = len.unwrap_or_else(|| self.random_len());
            let addr = self.buffer_address(len);
            if let Some(buffer) = self.classify(addr, len, write, max) {
                return buffer;
            }
        }
        let len = len.unwrap_or(8).min(PAGE);
        self.classify(self.stack_scratch, len, write, max).expect("the stack scratch is known")
    }

    /// A `prot` argument, and the errors it brings.
    fn prot(&mut self, expect: &mut Expect) -> u64 {
        let prot = match self.rng.below(100) {
            0..=39 => PROT_READ,
            40..=84 => RW,
            _ => {
                let bad = [0, PROT_WRITE, PROT_EXEC, PROT_READ | PROT_EXEC, RW | PROT_EXEC, 8, PROT_READ | 8];
                let mut prot = self.rng.pick(&bad);
                if self.rng.chance(20) {
                    prot = self.rng.next();
                }
                prot
            }
        };
        if prot & PROT_EXEC != 0 {
            expect.must(Error::NotPermitted);
        } else if prot != PROT_READ && prot != RW {
            expect.must(Error::InvalidArgument);
        }
        prot
    }

    /// A rights argument; `within`: biased towards subsets of these rights.
    fn rights(&mut self, within: u64) -> u64 {
        match self.rng.below(100) {
            0..=59 if within != 0 => loop {
                let bits = self.rng.range(1, RIGHTS_ALL) & within;
                if bits != 0 {
                    break bits;
                }
            },
            0..=84 => self.rng.range(1, RIGHTS_ALL),
            _ => {
                let bad = [0, 8, RIGHTS_ALL | 8, 1 << 63, self.rng.next()];
                self.rng.pick(&bad)
            }
        }
    }

    /// A handle argument.
    fn handle(&mut self) -> (u64, Handle) {
        let roll = self.rng.below(100);
        if roll < 55 {
            if let Some(i) = self.random_own() {
                return (self.own[i].handle, Handle::Own(i));
            }
        } else if roll < 75 {
            if let Some(i) = self.random_foreign() {
                return (self.foreign[i].handle, Handle::Foreign(i));
            }
        }
        (self.bad_handle(), Handle::Bad)
    }

    /// A handle that names nothing: stale, a live handle with another
    /// generation, a slot beyond the table, or random.
    fn bad_handle(&mut self) -> u64 {
        loop {
            let handle = match self.rng.below(6) {
                0 if self.stale_count > 0 => self.stale[self.rng.below(self.stale_count as u64) as usize],
                1 => match self.random_own() {
                    Some(i) => self.own[i].handle ^ (self.rng.range(1, u64::from(u32::MAX)) << 32),
                    None => continue,
                },
                2 => (self.rng.next() << 32) | self.rng.range(CAPS_MAX as u64 + 1, u64::from(u32::MAX)),
                3 => self.rng.pick(&[0, u64::MAX, 1, 1 << 32]),
                _ => self.rng.next(),
            };
            if !self.is_known_handle(handle) {
                return handle;
            }
        }
    }

    fn is_known_handle(&self, handle: u64) -> bool {
        self.own.iter().any(|r| r.live && r.handle == handle)
            || self.foreign.iter().any(|c| c.live && c.handle == handle)
    }

    fn random_own(&mut self) -> Option<usize> {
        let live = self.own.iter().filter(|r| r.live).count() as u64;
        let n = self.rng.below(live) as usize;
        (live > 0).then(|| self.own.iter().enumerate().filter(|(_, r)| r.live).nth(n).map(|(i, _)| i))?
    }

    fn random_foreign(&mut self) -> Option<usize> {
        let live = self.foreign.iter().filter(|c| c.live).count() as u64;
        let n = self.rng.below(live) as usize;
        (live > 0).then(|| self.foreign.iter().enumerate().filter(|(_, c)| c.live).nth(n).map(|(i, _)| i))?
    }

    /// A pid argument: the peer, the caller, or nobody.
    fn pid(&mut self) -> (u64, Target) {
        let roll = self.rng.below(100);
        if roll < 45 && self.peer != 0 {
            (u64::from(self.peer), Target::Peer)
        } else if roll < 75 {
            (u64::from(self.me), Target::Me)
        } else {
            let known = if self.peer != 0 { self.peer } else { self.me };
            let nobody = [
                0,
                1000 + self.rng.below(100_000),
                u64::from(u32::MAX),
                1 << 32 | u64::from(known),
                u64::MAX,
                1 << 40 | u64::from(self.me),
            ];
            (self.rng.pick(&nobody), Target::Nobody)
        }
    }

    // -----------------------------------------------------------------------
    // Page content.

    fn stale_handle(&mut self, handle: u64) {
        self.stale[self.stale_next] = handle;
        self.stale_next = (self.stale_next + 1) % STALE_MAX;
        self.stale_count = (self.stale_count + 1).min(STALE_MAX);
    }

    fn shm_key(&self, region: usize, index: u64) -> u64 {
        SHM_KEY | self.own[region].serial << 20 | index
    }

    /// The tracked-page key of `page`, and whether untracked content is
    /// known to be zero. `None` for pages whose content is not modelled.
    fn key_of(&self, page: u64) -> Option<(u64, bool)> {
        let inside = |base: u64| base <= page && page < base + 2 * PAGE;
        if inside(self.static_scratch) || inside(self.stack_scratch) {
            return Some((page, true));
        }
        let area = self.areas[self.area_at(page)?];
        match area.kind {
            Kind::Anon { dirty, .. } => Some((page, !dirty)),
            Kind::Own(r) if !self.own[r].tainted => {
                Some((self.shm_key(r, (page - area.start) / PAGE), !self.own[r].dirty))
            }
            _ => None,
        }
    }

    fn find_tracked(&self, key: u64) -> Option<usize> {
        self.tracked.iter().position(|t| t.key == key)
    }

    fn forget_tracked(&mut self, keep: impl Fn(u64) -> bool) {
        for slot in self.tracked.iter_mut() {
            if slot.key != 0 && !keep(slot.key) {
                *slot = Tracked::EMPTY;
            }
        }
    }

    /// Marks the untracked pages of the area or region holding `page` as
    /// not known to be zero.
    fn mark_dirty(&mut self, page: u64) {
        if let Some(i) = self.area_at(page) {
            match self.areas[i].kind {
                Kind::Anon { writable, .. } => self.areas[i].kind = Kind::Anon { writable, dirty: true },
                Kind::Own(r) => self.own[r].dirty = true,
                _ => {}
            }
        }
    }

    /// Records that the kernel wrote `[addr, addr + len)`.
    fn kernel_wrote(&mut self, addr: u64, len: u64) {
        if len == 0 {
            return;
        }
        for page in pages(addr, len) {
            let lo = (addr.max(page) - page) as u16;
            let hi = ((addr + len).min(page + PAGE) - page) as u16;
            let Some((key, clean)) = self.key_of(page) else { continue };
            if let Some(t) = self.find_tracked(key) {
                let slot = &mut self.tracked[t];
                if slot.lo >= slot.hi {
                    (slot.lo, slot.hi) = (lo, hi);
                } else {
                    (slot.lo, slot.hi) = (slot.lo.min(lo), slot.hi.max(hi));
                }
            } else if clean {
                match self.find_tracked(0) {
                    Some(t) => self.tracked[t] = Tracked { key, seed: 0, lo, hi },
                    None => self.mark_dirty(page),
                }
            }
        }
    }

    /// Fills a writable page with a fresh pattern.
    fn fill(&mut self) {
        let page = match self.rng.below(4) {
            0 => self.static_scratch + PAGE * self.rng.below(2),
            1 => self.stack_scratch + PAGE * self.rng.below(2),
            2 => match self.random_area(|k| matches!(k, Kind::Anon { writable: true, .. })) {
                Some(area) => self.random_page_of(area),
                None => return,
            },
            _ => {
                let Some(r) = self.random_own() else { return };
                match self.own[r].map {
                    Some(map) if map.writable && !self.own[r].tainted => {
                        map.addr + self.rng.below(self.own[r].len / PAGE) * PAGE
                    }
                    _ => return,
                }
            }
        };
        let Some((key, _)) = self.key_of(page) else { return };
        let Some(slot) = self.find_tracked(key).or_else(|| self.find_tracked(0)) else { return };
        let seed = self.rng.next() | 1;
        for i in 0..PAGE / 8 {
            // SAFETY: per the model `page` is the fuzzer's writable memory (scratch, `mem_map` memory or
            // its own region), reached only through raw addresses.
            unsafe { write_u64(page + 8 * i, pattern(seed, i)) };
        }
        self.tracked[slot] = Tracked { key, seed, lo: 0, hi: 0 };
        self.stats.fills += 1;
    }

    /// Checks the content of readable page `page` against `record`.
    fn verify_page(&mut self, page: u64, record: Tracked) {
        self.stats.checks += 1;
        for i in 0..PAGE / 8 {
            let (from, to) = (8 * i, 8 * i + 8);
            if record.lo < record.hi && from < u64::from(record.hi) && to > u64::from(record.lo) {
                continue;
            }
            // SAFETY: the model says `page` is readable memory of the fuzzer.
            let got = unsafe { read_u64(page + from) };
            let want = pattern(record.seed, i);
            if got != want {
                println!(
                    "fuzz: seed {}: call #{} verify({page:#x}) -> unexpected word {i} = {got:#x}, want {want:#x} \
                     (kernel-written bytes {}..{}; last call {})",
                    self.seed, self.index, record.lo, record.hi, self.last
                );
                exit(1);
            }
        }
    }

    /// Where the page a tracked key names is mapped now, if readable.
    fn page_of_key(&self, key: u64) -> Option<u64> {
        if key & SHM_KEY == 0 {
            return Some(key);
        }
        let serial = (key & !SHM_KEY) >> 20;
        let region = self.own.iter().find(|r| r.live && r.serial == serial)?;
        if region.tainted {
            return None;
        }
        Some(region.map?.addr + (key & 0xfffff) * PAGE)
    }

    /// Checks one tracked page, or an untracked page that must be zero.
    fn verify_some(&mut self) {
        if self.rng.chance(70) {
            let used = self.tracked.iter().filter(|t| t.key != 0).count() as u64;
            if used == 0 {
                return;
            }
            let n = self.rng.below(used) as usize;
            let Some(record) = self.tracked.iter().filter(|t| t.key != 0).nth(n).copied() else { return };
            if let Some(page) = self.page_of_key(record.key) {
                self.verify_page(page, record);
            }
            return;
        }
        let Some(area) = self.random_area(|k| matches!(k, Kind::Anon { .. } | Kind::Own(_))) else { return };
        let page = self.random_page_of(area);
        if let Some((key, clean)) = self.key_of(page) {
            match self.find_tracked(key) {
                Some(t) => self.verify_page(page, self.tracked[t]),
                None if clean => self.verify_page(page, Tracked { key, seed: 0, lo: 0, hi: 0 }),
                None => {}
            }
        }
    }

    fn verify_all(&mut self) {
        for t in 0..TRACKED_MAX {
            let record = self.tracked[t];
            if record.key != 0 {
                if let Some(page) = self.page_of_key(record.key) {
                    self.verify_page(page, record);
                }
            }
        }
    }

    // -----------------------------------------------------------------------
    // The operations.

    fn op_write(&mut self) {
        let b = self.buffer(false, None, WRITE_MAX);
        if let Outcome::Ok(written) = self.call("write", Syscall::Write as u64, &[b.addr, b.len], b.expect) {
            if written != b.len {
                self.wrong(format_args!("Ok({written}): wrote a different length"));
            }
            if b.len > 0 {
                // Keep arbitrary bytes off the fuzzer's own report lines.
                let _ = write(b"\n");
            }
        }
    }

    fn op_getpid(&mut self) {
        if let Outcome::Ok(pid) = self.call("getpid", Syscall::GetPid as u64, &[], Expect::OK) {
            if pid != u64::from(self.me) {
                self.wrong(format_args!("Ok({pid}): not pid {}", self.me));
            }
        }
    }

    fn op_yield(&mut self) {
        if let Outcome::Ok(value) = self.call("yield", Syscall::Yield as u64, &[], Expect::OK) {
            if value != 0 {
                self.wrong(format_args!("Ok({value:#x})"));
            }
        }
    }

    fn op_bad_number(&mut self) {
        let numbers = [
            0,
            5,
            6,
            9,
            14,
            19,
            22,
            29,
            37,
            99,
            Syscall::GateSelfTest as u64,
            Syscall::GateSelfTest as u64 + 1,
            1 << 32 | Syscall::Write as u64,
            1 << 32 | Syscall::Exit as u64,
            1 << 32 | Syscall::IpcRecv as u64,
            1 << 63 | Syscall::MemMap as u64,
            u64::MAX,
            self.rng.next(),
        ];
        let number = self.rng.pick(&numbers);
        if Syscall::from_raw(number).is_some_and(|call| call != Syscall::GateSelfTest) {
            return;
        }
        let args = [self.rng.next(), self.rng.next(), self.rng.next()];
        let mut expect = Expect::OK;
        expect.must(Error::NoSys);
        self.call("syscall", number, &args, expect);
    }

    fn op_mem_map(&mut self) {
        let len = match self.rng.below(100) {
            0..=59 => {
                self.rng.range(1, 8) * PAGE - if self.rng.chance(30) { self.rng.below(PAGE) } else { 0 }
            }
            60..=74 => self.rng.range(9, 64) * PAGE,
            75..=78 => self.rng.range(65, 1024) * PAGE,
            79 => USER_MMAP_MAX,
            80..=85 => 0,
            86..=90 => USER_MMAP_MAX + self.rng.range(1, 2 * PAGE),
            91..=94 => u64::MAX - self.rng.below(PAGE),
            _ => self.rng.next(),
        };
        let mut expect = Expect::OK;
        let prot = self.prot(&mut expect);
        if len == 0 {
            expect.must(Error::InvalidArgument);
        } else if len > USER_MMAP_MAX {
            expect.must(Error::TooLarge);
        }
        let mut predicted = None;
        let rounded = len.next_multiple_of(PAGE);
        if !expect.refused {
            if !self.room(1) {
                return;
            }
            self.quota(self.virtual_usage(), self.start.max_virtual_bytes, rounded, &mut expect);
            predicted = self.place(rounded);
        }
        match self.call("mem_map", Syscall::MemMap as u64, &[len, prot], expect) {
            Outcome::Ok(addr) => {
                if Some(addr) != predicted {
                    self.wrong(format_args!("Ok({addr:#x}): the model places it at {predicted:#x?}"));
                }
                let kind = Kind::Anon { writable: prot == RW, dirty: false };
                self.insert_area(Area { start: addr, end: addr + rounded, kind });
                self.stats.mapped += 1;
            }
            Outcome::Err(Error::QuotaExceeded) => self.stats.denied += 1,
            _ => {}
        }
    }

    /// An (address, length) range for `mem_unmap`/`mem_protect`.
    fn range(&mut self) -> (u64, u64) {
        let roll = self.rng.below(100);
        let anon = |k: &Kind| matches!(k, Kind::Anon { .. });
        let mapped = |k: &Kind| matches!(k, Kind::Own(_) | Kind::Foreign(_) | Kind::Revoked);
        match roll {
            0..=54 => {
                let Some(area) = self.random_area(anon) else { return (USER_MMAP_BASE, PAGE) };
                let pages = (area.end - area.start) / PAGE;
                let first = self.rng.below(pages);
                let mut count = self.rng.range(1, (pages - first).min(RANGE_PAGES));
                // Sometimes run on into the next area, or the guard page.
                if self.rng.chance(15) {
                    count += self.rng.range(1, 4);
                }
                let len = count * PAGE - if self.rng.chance(30) { self.rng.below(PAGE) } else { 0 };
                (area.start + first * PAGE, len)
            }
            55..=59 => match self.random_area(anon) {
                Some(area) => (area.start + self.rng.range(1, PAGE - 1), PAGE),
                None => (USER_MMAP_BASE + 1, PAGE),
            },
            60..=62 => match self.random_area(anon) {
                Some(area) => (area.start, 0),
                None => (USER_MMAP_BASE, 0),
            },
            63..=65 => {
                let addr = !(PAGE - 1) - PAGE * self.rng.below(4);
                (addr, self.rng.pick(&[u64::MAX, 5 * PAGE, (1 << 20) + 1]))
            }
            66..=72 => match self.random_area(mapped) {
                Some(area) => (area.start, area.end - area.start),
                None => (self.static_scratch, PAGE),
            },
            73..=77 => {
                let pages = [self.static_scratch, self.stack_scratch, self.code_page, self.rodata, GATE_VA];
                (self.rng.pick(&pages), PAGE)
            }
            78..=81 => (KERNEL_HALF_START + PAGE * self.rng.below(1 << 20), PAGE * self.rng.range(1, 4)),
            82..=86 => match self.random_area(anon) {
                Some(area) if area.end - area.start <= RANGE_PAGES * PAGE => {
                    (area.start, area.end - area.start + PAGE)
                }
                _ => (USER_MMAP_BASE, 2 * PAGE),
            },
            87..=92 => (USER_MMAP_BASE + PAGE * self.rng.below(1 << 16), PAGE * self.rng.range(1, 8)),
            _ => {
                let addr = self.rng.next();
                let addr = if self.rng.chance(50) { addr & !(PAGE - 1) } else { addr };
                (addr, self.random_len())
            }
        }
    }

    fn op_mem_unmap(&mut self) {
        let (addr, len) = self.range();
        let mut expect = Expect::OK;
        let end = match self.anon_range(addr, len) {
            Ok(end) => {
                if (end - addr) / PAGE > RANGE_PAGES || !self.room(1) {
                    return;
                }
                Some(end)
            }
            Err(error) => {
                expect.must(error);
                None
            }
        };
        if let Outcome::Ok(value) = self.call("mem_unmap", Syscall::MemUnmap as u64, &[addr, len], expect) {
            if value != 0 {
                self.wrong(format_args!("Ok({value:#x})"));
            }
            let end = end.expect("only a valid range succeeds");
            self.split_at(addr);
            self.split_at(end);
            while let Some(i) =
                self.areas[..self.area_count].iter().position(|a| a.start >= addr && a.end <= end)
            {
                self.remove_area(i);
            }
            self.forget_tracked(|key| key & SHM_KEY != 0 || key < addr || key >= end);
            self.stats.unmapped += 1;
        }
    }

    fn op_mem_protect(&mut self) {
        let (addr, len) = if self.rng.chance(25) {
            match self.random_area(|k| matches!(k, Kind::Own(_) | Kind::Foreign(_))) {
                Some(area) => {
                    let size = area.end - area.start;
                    (area.start, size - if self.rng.chance(50) { self.rng.below(PAGE) } else { 0 })
                }
                None => self.range(),
            }
        } else {
            self.range()
        };
        let mut expect = Expect::OK;
        let prot = self.prot(&mut expect);
        let writable = prot == RW;
        let shared = self.area_starting_at(addr).filter(|&i| {
            let area = self.areas[i];
            matches!(area.kind, Kind::Own(_) | Kind::Foreign(_))
                && len.checked_next_multiple_of(PAGE) == Some(area.end - area.start)
        });
        let mut end = None;
        if let Some(i) = shared {
            let map = match self.areas[i].kind {
                Kind::Own(r) => self.own[r].map,
                Kind::Foreign(f) => {
                    expect.may(Error::BadAddress);
                    self.foreign[f].map
                }
                _ => None,
            };
            if writable && !map.is_some_and(|m| m.writable) {
                expect.must(Error::NotPermitted);
            }
        } else {
            match self.anon_range(addr, len) {
                Ok(range_end) => {
                    if (range_end - addr) / PAGE > RANGE_PAGES || !self.room(2) {
                        return;
                    }
                    let escalates = self.areas[..self.area_count].iter().any(|a| {
                        a.start < range_end
                            && a.end > addr
                            && matches!(a.kind, Kind::Anon { writable: false, .. })
                    });
                    if writable && escalates {
                        expect.must(Error::NotPermitted);
                    }
                    end = Some(range_end);
                }
                Err(error) => expect.must(error),
            }
        }
        let outcome = self.call("mem_protect", Syscall::MemProtect as u64, &[addr, len, prot], expect);
        match (outcome, shared) {
            (Outcome::Ok(_), Some(i)) => {
                match self.areas[i].kind {
                    Kind::Own(r) => self.own[r].map = Some(Mapping { addr, writable }),
                    Kind::Foreign(f) => self.foreign[f].map = Some(Mapping { addr, writable }),
                    _ => {}
                }
                self.stats.protected += 1;
            }
            (Outcome::Ok(_), None) => {
                let end = end.expect("only a valid range succeeds");
                self.split_at(addr);
                self.split_at(end);
                for area in self.areas[..self.area_count].iter_mut() {
                    if let Kind::Anon { dirty, .. } = area.kind {
                        if area.start >= addr && area.end <= end {
                            area.kind = Kind::Anon { writable, dirty };
                        }
                    }
                }
                self.stats.protected += 1;
            }
            (Outcome::Err(Error::BadAddress), Some(i)) => {
                // Only a revoked peer mapping refuses a valid protect.
                if let Kind::Foreign(f) = self.areas[i].kind {
                    self.foreign_gone(f);
                }
            }
            _ => {}
        }
    }

    fn op_mem_stat(&mut self) {
        let b = self.buffer(true, Some(STAT_SIZE), PAGE);
        if let Outcome::Ok(value) = self.call("mem_stat", Syscall::MemStat as u64, &[b.addr], b.expect) {
            if value != 0 {
                self.wrong(format_args!("Ok({value:#x})"));
            }
            self.kernel_wrote(b.addr, STAT_SIZE);
            if b.readable {
                let field = |i: u64| peek_unaligned(b.addr + 8 * i);
                let stat = MemStat {
                    virtual_bytes: field(0),
                    resident_bytes: field(1),
                    shared_bytes: field(2),
                    max_virtual_bytes: field(3),
                    max_resident_bytes: field(4),
                    max_shared_bytes: field(5),
                    policy: field(6) as u32,
                    reserved: (field(6) >> 32) as u32,
                };
                self.check_stat(&stat);
            }
        }
    }

    fn check_stat(&self, stat: &MemStat) {
        let (known, foreign) = self.virtual_usage();
        let (own, _) = self.shared_usage();
        let quotas = (stat.max_virtual_bytes, stat.max_resident_bytes, stat.max_shared_bytes, stat.policy);
        let start = &self.start;
        let want = (start.max_virtual_bytes, start.max_resident_bytes, start.max_shared_bytes, start.policy);
        if quotas != want || stat.reserved != 0 {
            self.wrong(format_args!("mem_stat {stat:?}: quotas changed (at start {start:?})"));
        }
        if stat.virtual_bytes < known || stat.virtual_bytes > known + foreign {
            self.wrong(format_args!(
                "mem_stat virtual_bytes {}: the model says {known} (+ up to {foreign} of peer mappings)",
                stat.virtual_bytes
            ));
        }
        if stat.shared_bytes < own || stat.shared_bytes > own + foreign {
            self.wrong(format_args!(
                "mem_stat shared_bytes {}: the model says {own} (+ up to {foreign} of peer mappings)",
                stat.shared_bytes
            ));
        }
        if stat.resident_bytes % PAGE != 0 || stat.resident_bytes > stat.virtual_bytes {
            self.wrong(format_args!(
                "mem_stat resident_bytes {} (virtual {})",
                stat.resident_bytes, stat.virtual_bytes
            ));
        }
    }

    fn op_ipc_send(&mut self) {
        let (pid, target) = self.pid();
        let stamped = target == Target::Peer && self.rng.chance(50);
        let (b, sum) = if stamped {
            let len = self.rng.range(HEADER, MESSAGE_MAX);
            let payload = self.message + HEADER;
            for i in 0..len - HEADER {
                // SAFETY: the message scratch is the fuzzer's own, reached
                // only through raw addresses.
                unsafe { write_u8(payload + i, self.rng.next() as u8) };
            }
            let sum = checksum(payload, len - HEADER);
            let seq = self.seq_out + 1;
            poke_unaligned(self.message, stamp_tag(self.me, self.peer, seq, len, sum));
            poke_unaligned(self.message + 8, seq);
            poke_unaligned(self.message + 16, sum);
            let b = Buffer { addr: self.message, len, expect: Expect::OK, readable: true };
            (b, None)
        } else {
            let b = self.buffer(false, None, MESSAGE_MAX);
            let stable = b.readable && !b.expect.refused && self.stable(b.addr, b.len);
            let sum = stable.then(|| checksum(b.addr, b.len));
            (b, sum)
        };
        let mut expect = b.expect;
        match target {
            Target::Nobody => expect.must(Error::NoSuchProcess),
            Target::Me => {
                if self.selfq_len >= MAILBOX_DEPTH {
                    expect.must(Error::MailboxFull);
                } else if self.active {
                    expect.may(Error::MailboxFull);
                }
            }
            Target::Peer => {
                if self.peer_dead {
                    expect.must(Error::NoSuchProcess);
                } else {
                    expect.may(Error::NoSuchProcess);
                    if self.active {
                        expect.may(Error::MailboxFull);
                    } else if self.sent_to_passive >= MAILBOX_PER_SENDER as u64 {
                        expect.must(Error::MailboxFull);
                    }
                }
            }
        }
        match self.call("ipc_send", Syscall::IpcSend as u64, &[pid, b.addr, b.len], expect) {
            Outcome::Ok(value) => {
                if value != 0 {
                    self.wrong(format_args!("Ok({value:#x})"));
                }
                match target {
                    Target::Me => {
                        let tail = (self.selfq_head + self.selfq_len) % MAILBOX_DEPTH;
                        self.selfq[tail] = SelfMessage { len: b.len, sum };
                        self.selfq_len += 1;
                    }
                    Target::Peer if stamped => self.seq_out += 1,
                    _ => {}
                }
                if target == Target::Peer && !self.active {
                    self.sent_to_passive += 1;
                }
            }
            Outcome::Err(Error::NoSuchProcess) if target == Target::Peer && !b.expect.refused => {
                self.peer_dead = true;
            }
            _ => {}
        }
    }

    fn op_ipc_recv(&mut self) {
        let flags = match self.rng.below(100) {
            0..=89 => RECV_NONBLOCK,
            90..=94 if self.selfq_len > 0 => 0,
            _ => self.rng.pick(&[2, 3, 1 << 63 | RECV_NONBLOCK, u64::MAX, 0x100 | RECV_NONBLOCK]),
        };
        let cap = self.random_len();
        let room = cap.min(MESSAGE_MAX);
        let b = self.buffer(true, Some(room), MESSAGE_MAX);
        let mut expect = b.expect;
        if flags & !RECV_NONBLOCK != 0 {
            expect.must(Error::InvalidArgument);
        }
        if self.active {
            if self.selfq_len == 0 {
                expect.may(Error::WouldBlock);
            }
            if room < MESSAGE_MAX {
                expect.may(Error::BufferTooSmall);
            }
        } else if self.selfq_len == 0 {
            expect.must(Error::WouldBlock);
        } else if self.selfq[self.selfq_head].len > room {
            expect.must(Error::BufferTooSmall);
        }
        let Outcome::Ok(packed) =
            self.call("ipc_recv", Syscall::IpcRecv as u64, &[b.addr, cap, flags], expect)
        else {
            return;
        };
        let (sender, len) = decode_recv(packed);
        let len = u64::from(len);
        if len > room {
            self.wrong(format_args!("Ok({packed:#x}): a {len}-byte message in a {room}-byte buffer"));
        }
        if sender == self.me {
            if self.selfq_len == 0 {
                self.wrong(format_args!("Ok({packed:#x}): a message from myself that I never sent"));
            }
            let sent = self.selfq[self.selfq_head];
            self.selfq_head = (self.selfq_head + 1) % MAILBOX_DEPTH;
            self.selfq_len -= 1;
            if sent.len != len {
                self.wrong(format_args!(
                    "Ok({packed:#x}): my oldest message to myself had {} bytes",
                    sent.len
                ));
            }
            if let (Some(want), true) = (sent.sum, b.readable) {
                let got = checksum(b.addr, len);
                if got != want {
                    self.wrong(format_args!("Ok({packed:#x}): content checksum {got:#x}, sent {want:#x}"));
                }
            }
        } else if sender == self.peer && self.active {
            if b.readable {
                self.check_stamp(b.addr, len, packed);
            } else {
                self.seq_unknown = true;
            }
        } else {
            self.wrong(format_args!("Ok({packed:#x}): a message from pid {sender}, who never sends to me"));
        }
        self.kernel_wrote(b.addr, len);
    }

    /// Checks a message from the peer: if it carries a stamp, its content
    /// must match and no earlier stamped message may have been lost.
    fn check_stamp(&mut self, addr: u64, len: u64, packed: u64) {
        if len < HEADER {
            return;
        }
        let (tag, seq, sum) = (peek_unaligned(addr), peek_unaligned(addr + 8), peek_unaligned(addr + 16));
        if tag != stamp_tag(self.peer, self.me, seq, len, sum) {
            return;
        }
        let got = checksum(addr + HEADER, len - HEADER);
        if got != sum {
            self.wrong(format_args!("Ok({packed:#x}): stamped message {seq} from the peer has checksum {got:#x}, stamped {sum:#x}"));
        }
        if self.seq_unknown {
            if seq > self.seq_in {
                self.seq_in = seq;
                self.seq_unknown = false;
            }
        } else if seq == self.seq_in + 1 {
            self.seq_in = seq;
        } else if seq > self.seq_in + 1 {
            self.wrong(format_args!(
                "Ok({packed:#x}): stamped message {seq} from the peer after {} (one was lost)",
                self.seq_in
            ));
        }
    }

    fn op_shm_create(&mut self) {
        let len = match self.rng.below(100) {
            0..=81 => {
                self.rng.range(1, REGION_PAGES) * PAGE
                    - if self.rng.chance(30) { self.rng.below(PAGE) } else { 0 }
            }
            82..=86 => 0,
            87..=92 => SHM_MAX + self.rng.range(1, PAGE),
            93..=96 => u64::MAX - self.rng.below(PAGE),
            _ => self.rng.next() | 1 << 40,
        };
        let bits = if self.rng.chance(40) { RIGHTS_ALL } else { self.rights(0) };
        let rights = rights_of(bits);
        let mut expect = Expect::OK;
        if rights.is_none() || len == 0 {
            expect.must(Error::InvalidArgument);
        }
        if len > SHM_MAX {
            expect.must(Error::TooLarge);
        }
        let Some(slot) = self.own.iter().position(|r| !r.live) else {
            if !expect.refused {
                return;
            }
            self.call("shm_create", Syscall::ShmCreate as u64, &[len, bits], expect);
            return;
        };
        let rounded = len.next_multiple_of(PAGE);
        if !expect.refused {
            self.quota(self.shared_usage(), self.start.max_shared_bytes, rounded, &mut expect);
        }
        match self.call("shm_create", Syscall::ShmCreate as u64, &[len, bits], expect) {
            Outcome::Ok(handle) => {
                if self.is_known_handle(handle) || self.stale[..self.stale_count].contains(&handle) {
                    self.wrong(format_args!("Ok({handle:#x}): a handle I already hold or held before"));
                }
                self.serial += 1;
                self.own[slot] = OwnRegion {
                    live: true,
                    serial: self.serial,
                    handle,
                    id: None,
                    len: rounded,
                    rights: rights.expect("only valid rights succeed"),
                    ..OwnRegion::EMPTY
                };
                self.stats.created += 1;
            }
            Outcome::Err(Error::QuotaExceeded) => self.stats.denied += 1,
            _ => {}
        }
    }

    fn op_shm_grant(&mut self) {
        let (handle, which) = self.handle();
        let held = match which {
            Handle::Own(r) => self.own[r].rights,
            Handle::Foreign(f) => self.foreign[f].rights,
            Handle::Bad => 0,
        };
        let (pid, target) = self.pid();
        let bits = self.rights(held);
        let mut expect = Expect::OK;
        match which {
            Handle::Bad => expect.must(Error::BadHandle),
            Handle::Foreign(_) => expect.may(Error::BadHandle),
            Handle::Own(_) => {}
        }
        match rights_of(bits) {
            None => expect.must(Error::InvalidArgument),
            Some(rights) if which != Handle::Bad => {
                if held & RIGHT_GRANT == 0 || rights & !held != 0 {
                    expect.must(Error::NotPermitted);
                }
            }
            Some(_) => {}
        }
        let arguments_fine = !expect.refused;
        match target {
            Target::Nobody => expect.must(Error::NoSuchProcess),
            Target::Me => expect.must(Error::InvalidArgument),
            Target::Peer => {
                if self.peer_dead {
                    expect.must(Error::NoSuchProcess);
                } else {
                    expect.may(Error::NoSuchProcess);
                }
                // A granter has at most OFFERS_PER_GRANTER offers outstanding
                // (a quota refusal, logged).
                expect.may(Error::QuotaExceeded);
                match which {
                    Handle::Own(r) if self.own[r].granted.is_some() => expect.must(Error::InvalidArgument),
                    // The peer owns every region it granted me.
                    Handle::Foreign(_) => expect.must(Error::InvalidArgument),
                    _ => {}
                }
            }
        }
        let outcome = self.call("shm_grant", Syscall::ShmGrant as u64, &[handle, pid, bits], expect);
        match outcome {
            Outcome::Ok(_) => {
                if let Handle::Own(r) = which {
                    let rights = rights_of(bits).expect("only valid rights succeed");
                    self.own[r].granted = Some(rights);
                    self.own[r].tainted |= rights & RIGHT_WRITE != 0;
                }
                self.stats.granted += 1;
            }
            Outcome::Err(Error::NoSuchProcess) if target == Target::Peer && arguments_fine => {
                self.peer_dead = true;
            }
            Outcome::Err(Error::BadHandle) => {
                if let Handle::Foreign(f) = which {
                    self.foreign_gone(f);
                }
            }
            _ => {}
        }
    }

    fn op_shm_map(&mut self) {
        let (mut handle, mut which) = self.handle();
        if matches!(which, Handle::Foreign(_)) && self.area_count > AREAS_MAX - 16 {
            // Peer mappings may turn into revoked ranges that stay forever.
            (handle, which) = (self.bad_handle(), Handle::Bad);
        }
        let mut expect = Expect::OK;
        let prot = self.prot(&mut expect);
        let (rights, len, mapped) = match which {
            Handle::Own(r) => (self.own[r].rights, self.own[r].len, self.own[r].map.is_some()),
            Handle::Foreign(f) => {
                expect.may(Error::BadHandle);
                (self.foreign[f].rights, self.foreign[f].len, self.foreign[f].map.is_some())
            }
            Handle::Bad => {
                expect.must(Error::BadHandle);
                (0, 0, false)
            }
        };
        if which != Handle::Bad {
            if rights & RIGHT_READ == 0 || prot == RW && rights & RIGHT_WRITE == 0 {
                expect.must(Error::NotPermitted);
            }
            if mapped {
                expect.must(Error::AlreadyMapped);
            }
            if matches!(which, Handle::Foreign(_)) {
                self.quota(self.shared_usage(), self.start.max_shared_bytes, len, &mut expect);
            }
            // A mapping adds to the virtual size (`mem_stat` counts it), so
            // the virtual quota must hold for it as for `mem_map`.
            self.quota(self.virtual_usage(), self.start.max_virtual_bytes, len, &mut expect);
        }
        let mut predicted = None;
        if !expect.refused {
            if !self.room(1) {
                return;
            }
            predicted = self.place_shared(len);
        }
        match self.call("shm_map", Syscall::ShmMap as u64, &[handle, prot], expect) {
            Outcome::Ok(addr) => {
                if Some(addr) != predicted {
                    self.wrong(format_args!("Ok({addr:#x}): the model places it at {predicted:#x?}"));
                }
                let map = Some(Mapping { addr, writable: prot == RW });
                let kind = match which {
                    Handle::Own(r) => {
                        self.own[r].map = map;
                        Kind::Own(r)
                    }
                    Handle::Foreign(f) => {
                        self.foreign[f].map = map;
                        Kind::Foreign(f)
                    }
                    Handle::Bad => unreachable!("a bad handle never maps"),
                };
                self.insert_area(Area { start: addr, end: addr + len, kind });
                self.stats.shm_mapped += 1;
            }
            Outcome::Err(Error::QuotaExceeded) => self.stats.denied += 1,
            Outcome::Err(Error::BadHandle) => {
                if let Handle::Foreign(f) = which {
                    self.foreign_gone(f);
                }
            }
            _ => {}
        }
    }

    fn op_shm_unmap(&mut self) {
        let mapped = |k: &Kind| matches!(k, Kind::Own(_) | Kind::Foreign(_));
        let addr = match self.rng.below(100) {
            0..=54 => self.random_area(mapped).map_or(USER_MMAP_BASE, |a| a.start),
            55..=64 => self.random_area(|k| *k == Kind::Revoked).map_or(USER_MMAP_BASE, |a| a.start),
            65..=69 => self.random_area(mapped).map_or(USER_MMAP_BASE, |a| a.start + PAGE),
            70..=79 => {
                self.random_area(|k| matches!(k, Kind::Anon { .. })).map_or(USER_MMAP_BASE, |a| a.start)
            }
            _ => self.bad_address(),
        };
        let mut expect = Expect::OK;
        let index = self.area_starting_at(addr);
        match index.map(|i| self.areas[i].kind) {
            Some(Kind::Own(_)) => {}
            Some(Kind::Foreign(_)) => expect.may(Error::BadAddress),
            // A revoked range is released (unless the kernel released it
            // already, keeping at most REVOKED_MAX).
            Some(Kind::Revoked) => expect.may(Error::BadAddress),
            _ => expect.must(Error::BadAddress),
        }
        let outcome = self.call("shm_unmap", Syscall::ShmUnmap as u64, &[addr], expect);
        let Some(i) = index else { return };
        match (outcome, self.areas[i].kind) {
            (Outcome::Ok(_), kind) => {
                match kind {
                    Kind::Own(r) => self.own[r].map = None,
                    Kind::Foreign(f) => self.foreign[f].map = None,
                    _ => {}
                }
                self.remove_area(i);
                self.stats.shm_unmapped += 1;
            }
            (Outcome::Err(Error::BadAddress), Kind::Foreign(f)) => self.foreign_gone(f),
            (Outcome::Err(Error::BadAddress), Kind::Revoked) => self.remove_area(i),
            _ => {}
        }
    }

    fn op_shm_revoke(&mut self) {
        let (handle, which) = self.handle();
        let (pid, target) = match self.rng.below(100) {
            0..=9 => (1 << 32 | u64::from(self.peer), Target::Nobody),
            _ => self.pid(),
        };
        let mut expect = Expect::OK;
        match which {
            Handle::Bad => expect.must(Error::BadHandle),
            Handle::Foreign(_) => {
                expect.may(Error::BadHandle);
                expect.must(Error::NotPermitted);
            }
            Handle::Own(r) => match target {
                Target::Peer if self.own[r].granted.is_some() => {
                    if self.peer_dead {
                        expect.must(Error::InvalidArgument);
                    } else {
                        expect.may(Error::InvalidArgument);
                    }
                }
                _ => expect.must(Error::InvalidArgument),
            },
        }
        match self.call("shm_revoke", Syscall::ShmRevoke as u64, &[handle, pid], expect) {
            Outcome::Ok(_) => {
                if let Handle::Own(r) = which {
                    self.revoked_from_peer(r);
                }
            }
            Outcome::Err(Error::InvalidArgument) => {
                if let Handle::Own(r) = which {
                    if target == Target::Peer && self.own[r].granted.is_some() {
                        // Only the peer's exit takes a grant away behind my back.
                        self.peer_dead = true;
                        self.revoked_from_peer(r);
                    }
                }
            }
            Outcome::Err(Error::BadHandle) => {
                if let Handle::Foreign(f) = which {
                    self.foreign_gone(f);
                }
            }
            _ => {}
        }
    }

    /// The peer no longer holds a capability for own region `r`.
    fn revoked_from_peer(&mut self, r: usize) {
        self.own[r].granted = None;
        if self.own[r].tainted {
            // It can no longer write; what it may have written is unknown.
            self.own[r].tainted = false;
            self.own[r].dirty = true;
            let prefix = self.shm_key(r, 0);
            self.forget_tracked(|key| key & !0xfffff != prefix);
        }
    }

    fn op_shm_destroy(&mut self) {
        let (handle, which) = self.handle();
        let mut expect = Expect::OK;
        match which {
            Handle::Bad => expect.must(Error::BadHandle),
            Handle::Foreign(_) => {
                expect.may(Error::BadHandle);
                expect.must(Error::NotPermitted);
            }
            Handle::Own(_) => {}
        }
        match self.call("shm_destroy", Syscall::ShmDestroy as u64, &[handle], expect) {
            Outcome::Ok(_) => {
                if let Handle::Own(r) = which {
                    self.destroyed(r);
                }
            }
            Outcome::Err(Error::BadHandle) => {
                if let Handle::Foreign(f) = which {
                    self.foreign_gone(f);
                }
            }
            _ => {}
        }
    }

    /// Own region `r` was destroyed: its mapping is a revoked range now.
    fn destroyed(&mut self, r: usize) {
        if let Some(map) = self.own[r].map {
            if let Some(i) = self.area_starting_at(map.addr) {
                self.areas[i].kind = Kind::Revoked;
            }
        }
        let prefix = self.shm_key(r, 0);
        self.forget_tracked(|key| key & !0xfffff != prefix);
        self.stale_handle(self.own[r].handle);
        self.own[r] = OwnRegion::EMPTY;
        self.stats.destroyed += 1;
    }

    /// Peer capability `f` was revoked (or its region destroyed): its
    /// mapping is a revoked range now and its handle is stale.
    fn foreign_gone(&mut self, f: usize) {
        if let Some(map) = self.foreign[f].map {
            if let Some(i) = self.area_starting_at(map.addr) {
                self.areas[i].kind = Kind::Revoked;
            }
        }
        self.stale_handle(self.foreign[f].handle);
        self.foreign[f] = ForeignCap::EMPTY;
    }

    /// `shm_accept` of a region id: one of my own (never offered to me), a
    /// small id the active peer may have offered, or a made-up one. What it
    /// accepts, `cap_list` shows next (and the model learns there).
    fn op_shm_accept(&mut self) {
        let own: Option<u64> = {
            let ids = self.own.iter().filter(|r| r.live).filter_map(|r| r.id).count();
            (ids > 0 && self.rng.below(4) == 0).then(|| {
                let pick = self.rng.below(ids as u64) as usize;
                let id = self.own.iter().filter(|r| r.live).filter_map(|r| r.id).nth(pick);
                u64::from(id.expect("counted above"))
            })
        };
        let (region, mine) = match own {
            Some(id) => (id, true),
            None => match self.rng.below(8) {
                0 => (self.rng.pick(&[0, u64::from(u32::MAX), 1 << 32 | 1, u64::MAX]), false),
                _ => (1 + self.rng.below(64), false),
            },
        };
        let mine = mine || self.own.iter().any(|r| r.live && r.id.map(u64::from) == Some(region));
        let mut expect = Expect::OK;
        if self.active && !mine && region <= u64::from(u32::MAX) {
            // The peer may have offered it; my table may be full then.
            expect.may(Error::BadHandle);
            expect.may(Error::QuotaExceeded);
        } else {
            expect.must(Error::BadHandle);
        }
        if let Outcome::Ok(handle) = self.call("shm_accept", Syscall::ShmAccept as u64, &[region], expect) {
            let known = self.own.iter().any(|r| r.live && r.handle == handle)
                || self.foreign.iter().any(|c| c.live && c.handle == handle);
            if known || self.stale[..self.stale_count].contains(&handle) {
                self.wrong(format_args!("Ok({handle:#x}): a handle I already hold or held"));
            }
            self.stats.accepted += 1;
        }
    }

    fn op_cap_list(&mut self) {
        let max = match self.rng.below(10) {
            0..=4 => CAPS_MAX as u64,
            5..=6 => self.rng.below(CAPS_MAX as u64),
            7 => 0,
            8 => u64::MAX,
            _ => self.rng.range(CAPS_MAX as u64 + 1, 1 << 20),
        };
        let room = max.min(CAPS_MAX as u64);
        let b = self.buffer(true, Some(room * CAP_RECORD), PAGE);
        let Outcome::Ok(held) = self.call("cap_list", Syscall::CapList as u64, &[b.addr, max], b.expect)
        else {
            return;
        };
        let own_live = self.own.iter().filter(|r| r.live).count() as u64;
        if held < own_live || held > CAPS_MAX as u64 || !self.active && held != own_live {
            self.wrong(format_args!("Ok({held}): I hold {own_live} capabilities of my own"));
        }
        let written = held.min(room);
        self.kernel_wrote(b.addr, written * CAP_RECORD);
        if !b.readable {
            return;
        }
        let mut seen_own = [false; OWN_MAX];
        let mut seen_foreign = [false; FOREIGN_MAX];
        for n in 0..written {
            let at = b.addr + n * CAP_RECORD;
            let word = |i: u64| peek_unaligned(at + 8 * i);
            let record = CapInfo {
                handle: word(0),
                region: word(1) as u32,
                owner: (word(1) >> 32) as u32,
                rights: word(2),
                len: word(3),
                mapped_at: word(4),
            };
            self.check_record(&record, &mut seen_own, &mut seen_foreign);
        }
        if written == held {
            for (r, &seen) in seen_own.iter().enumerate() {
                if self.own[r].live && !seen {
                    self.wrong(format_args!(
                        "Ok({held}): my capability {:#x} is missing",
                        self.own[r].handle
                    ));
                }
            }
            for (f, &seen) in seen_foreign.iter().enumerate() {
                if self.foreign[f].live && !seen {
                    self.foreign_gone(f);
                }
            }
        }
    }

    fn check_record(&mut self, record: &CapInfo, seen_own: &mut [bool], seen_foreign: &mut [bool]) {
        let mapped = |map: Option<Mapping>| map.map_or(0, |m| m.addr);
        if record.owner == self.me {
            let Some(r) = self.own.iter().position(|r| r.live && r.handle == record.handle) else {
                self.wrong(format_args!("record {record:?}: a capability of mine I never created"));
            };
            let region = self.own[r];
            let id_clash =
                self.own.iter().enumerate().any(|(i, o)| i != r && o.live && o.id == Some(record.region));
            if seen_own[r]
                || id_clash
                || region.id.is_some_and(|id| id != record.region)
                || (record.rights, record.len, record.mapped_at)
                    != (region.rights, region.len, mapped(region.map))
            {
                self.wrong(format_args!(
                    "record {record:?}: I hold it with rights {:#x}, {} bytes, mapped at {:#x}",
                    region.rights,
                    region.len,
                    mapped(region.map)
                ));
            }
            seen_own[r] = true;
            self.own[r].id = Some(record.region);
            return;
        }
        if !self.active || record.owner != self.peer {
            self.wrong(format_args!("record {record:?}: a capability nobody should have granted me"));
        }
        if let Some(f) = self.foreign.iter().position(|c| c.live && c.handle == record.handle) {
            let cap = self.foreign[f];
            if seen_foreign[f]
                || (record.region, record.rights, record.len, record.mapped_at)
                    != (cap.id, cap.rights, cap.len, mapped(cap.map))
            {
                self.wrong(format_args!(
                    "record {record:?}: I hold it as region {} with rights {:#x}, {} bytes, mapped at {:#x}",
                    cap.id,
                    cap.rights,
                    cap.len,
                    mapped(cap.map)
                ));
            }
            seen_foreign[f] = true;
            return;
        }
        let valid_rights = rights_of(record.rights) == Some(record.rights);
        if record.mapped_at != 0
            || !valid_rights
            || record.len == 0
            || record.len % PAGE != 0
            || record.len > SHM_MAX
            || self.stale[..self.stale_count].contains(&record.handle)
        {
            self.wrong(format_args!("record {record:?}: not a fresh grant"));
        }
        if let Some(f) = self.foreign.iter().position(|c| !c.live) {
            self.foreign[f] = ForeignCap {
                live: true,
                handle: record.handle,
                id: record.region,
                len: record.len,
                rights: record.rights,
                map: None,
            };
            seen_foreign[f] = true;
        }
    }

    // -----------------------------------------------------------------------
    // The run.

    fn step(&mut self) {
        match self.rng.below(1000) {
            0..=49 => self.op_write(),
            50..=59 => self.op_getpid(),
            60..=64 => self.op_yield(),
            65..=84 => self.op_bad_number(),
            85..=164 => self.op_mem_map(),
            165..=224 => self.op_mem_unmap(),
            225..=279 => self.op_mem_protect(),
            280..=324 => self.op_mem_stat(),
            325..=404 => self.op_ipc_send(),
            405..=474 => self.op_ipc_recv(),
            475..=529 => self.op_shm_create(),
            530..=569 => self.op_shm_grant(),
            570..=624 => self.op_shm_map(),
            625..=659 => self.op_shm_unmap(),
            660..=689 => self.op_shm_revoke(),
            690..=719 => self.op_shm_destroy(),
            720..=749 => self.op_cap_list(),
            750..=769 => self.op_shm_accept(),
            770..=879 => self.fill(),
            _ => self.verify_some(),
        }
    }

    fn init(&mut self, seed: u64, calls: u64, peer: u32, active: bool, stack_scratch: u64) {
        self.seed = seed;
        self.target = calls;
        self.peer = peer;
        self.active = active && peer != 0;
        self.static_scratch = STATIC_SCRATCH.addr();
        self.message = MESSAGE.addr();
        self.stack_scratch = stack_scratch;
        self.code_page = main as *const () as u64 & !(PAGE - 1);
        self.rodata = &raw const RODATA as u64;
        for page in [stack_scratch, stack_scratch + PAGE, self.static_scratch, self.static_scratch + PAGE] {
            if let Some(slot) = self.find_tracked(0) {
                self.tracked[slot] = Tracked { key: page, seed: 0, lo: 0, hi: 0 };
            }
        }
        // SAFETY: getpid takes no arguments.
        let pid = Outcome::decode(unsafe { raw::syscall(Syscall::GetPid as u64, 0, 0, 0, 0, 0) });
        let Outcome::Ok(pid) = pid else { self.wrong(format_args!("getpid at start: {pid}")) };
        self.me = pid as u32;
        self.rng = Rng(seed ^ mix(pid));
        match superos_rt::mem_stat() {
            Ok(stat) => self.start = stat,
            Err(error) => self.wrong(format_args!("mem_stat at start: {error}")),
        }
        let role = match (peer, self.active) {
            (0, _) => "none",
            (_, true) => "active",
            _ => "passive",
        };
        println!(
            "fuzz: seed {seed}: pid {pid}, peer {peer} ({role}), calls {calls}, quotas virtual {} shared {}",
            self.start.max_virtual_bytes, self.start.max_shared_bytes
        );
    }

    /// Gives everything back explicitly (otherwise exit does).
    fn clean_up(&mut self) {
        for r in 0..OWN_MAX {
            if self.own[r].live {
                let handle = self.own[r].handle;
                if let Outcome::Ok(_) =
                    self.call("shm_destroy", Syscall::ShmDestroy as u64, &[handle], Expect::OK)
                {
                    self.destroyed(r);
                }
            }
        }
        while let Some(i) = self.areas[..self.area_count]
            .iter()
            .position(|a| matches!(a.kind, Kind::Anon { .. }) && a.end - a.start <= RANGE_PAGES * PAGE)
        {
            let area = self.areas[i];
            let args = [area.start, area.end - area.start];
            if let Outcome::Ok(_) = self.call("mem_unmap", Syscall::MemUnmap as u64, &args, Expect::OK) {
                self.remove_area(i);
                self.forget_tracked(|key| key & SHM_KEY != 0 || key < area.start || key >= area.end);
                self.stats.unmapped += 1;
            }
        }
        if !self.active {
            while self.selfq_len > 0 {
                self.op_ipc_recv();
            }
        }
    }

    fn run(&mut self) -> i32 {
        let mut steps = 0u64;
        while self.index < self.target {
            self.step();
            steps += 1;
            if steps % 128 == 0 {
                self.verify_all();
            }
        }
        self.verify_all();
        if self.rng.chance(50) {
            self.clean_up();
            self.verify_all();
        }
        self.summary();
        0
    }

    fn summary(&self) {
        let errors = &self.stats.errors;
        let distinct = errors.iter().filter(|&&n| n > 0).count();
        let failed: u64 = errors.iter().sum();
        let live = self.own.iter().filter(|r| r.live).count() as u64;
        let s = &self.stats;
        println!(
            "fuzz: seed {}: {} calls, {distinct} distinct errors, {} ok, {failed} errors, {} checks, {} fills \
             (errors: {}) (events: mapped={} unmapped={} protected={} shm-created={} shm-mapped={} \
             shm-unmapped={} shm-granted={} shm-accepted={} shm-destroyed={} quota-denied={})",
            self.seed,
            self.index,
            s.ok,
            s.checks,
            s.fills,
            ErrorList(errors),
            s.mapped,
            s.unmapped,
            s.protected,
            s.created,
            s.shm_mapped,
            s.shm_unmapped,
            s.granted,
            s.accepted,
            s.destroyed + live,
            s.denied
        );
    }
}

/// `name=count` of every error seen.
struct ErrorList<'a>(&'a [u64; 16]);

impl fmt::Display for ErrorList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (raw, &count) in self.0.iter().enumerate() {
            if count == 0 {
                continue;
            }
            if let Some(error) = Error::from_raw(raw as u64) {
                if !first {
                    f.write_str(" ")?;
                }
                first = false;
                write!(f, "{error}={count}")?;
            }
        }
        Ok(())
    }
}

fn main(args: &[u8]) -> i32 {
    let seed = arg(args, "seed").and_then(parse_u64).unwrap_or(1);
    let calls = arg(args, "calls").and_then(parse_u64).unwrap_or(300).min(1 << 24);
    let peer = arg(args, "peer").and_then(parse_u64).and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
    let active = arg(args, "active").and_then(parse_u64) == Some(1);
    let trace = arg(args, "trace").and_then(parse_u64) == Some(1);
    let stack_scratch = Scratch::new();
    // SAFETY: `main` runs once on the only thread; this is the only reference
    // to the state.
    let fuzz = unsafe { &mut *STATE.0.get() };
    fuzz.trace = trace;
    fuzz.init(seed, calls, peer, active, stack_scratch.addr());
    let code = fuzz.run();
    // The stack scratch must live until the last call that may use it.
    core::hint::black_box(&stack_scratch);
    code
}

superos_rt::entry!(main, "seed=<n> calls=<n> peer=<pid|0> [active=1] [trace=1]");
