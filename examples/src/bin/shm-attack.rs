//! `shm-attack`: tries to get at shared memory it has no right to, one attack
//! per `mode=`, and checks the kernel refuses each with the documented error
//! or terminates the attacker with the documented fault.
//!
//! Multi-process modes take `role=owner|grantee|witness` and name the other
//! side with `peer=<pid>` (an owner may name several: `peer=2,3`). They talk
//! through a tiny message protocol: the owner creates a region of `pages=N`
//! pages (default 4) with every right, maps it read-write, fills it with a
//! pattern, offers the grantee a capability and sends it `MEM_SHARE:<id>`;
//! the grantee accepts it with `shm_accept`, which returns its own handle. Further steps are single
//! words (`mapped`, `revoked`, `done`, ...) or `<TAG>:<number>` messages
//! (`HANDLE:<value>`, `ADDR:<address>`). A side whose setup fails sends
//! `abort` to the others, so nobody waits forever.
//!
//! Modes (self-checking ones print a line per check and a tally, and exit 0
//! iff every check passed):
//! - `forged [peer=P]`: made-up, near-miss and random handles given to every
//!   call are `bad-handle` (P, any live process, is the grant/revoke target).
//! - `foreign`: the owner sends its handle value; the grantee's uses of it are
//!   `bad-handle`, before and after it holds its own capability for the same
//!   region; the owner's uses of the grantee's handle are `bad-handle` too.
//! - `stale`: a revoked handle, a handle of a destroyed region, and the
//!   owner's own handle after destroy are `bad-handle`; a stale handle does
//!   not come back to life when a new capability is granted; `shm_unmap`
//!   releases the owner's revoked old mapping once.
//! - `escalate third=W`: a grantee with read+grant cannot map read-write or
//!   executable, cannot grant more than it has, and cannot `mem_protect` its
//!   read-only mapping to read-write; it may grant read to W.
//! - `regrant third=W`: a grantee with read+write but no grant right cannot
//!   grant at all; its writes are visible to the owner.
//! - `witness caps=N peer=G`: waits for `done` from G, accepts every offer
//!   made to it (region ids 1 to 64), checks it then holds exactly N
//!   capabilities, each read-only and unmapped, and answers `checked`.
//! - `map-after-revoke`: after revocation the grantee's handle cannot be
//!   mapped and its old mapping is gone; a new grant gives a new handle and a
//!   new address range.
//! - `revoke-churn [cycles=N]` (default 300): the owner grants, waits for the
//!   grantee to map, and revokes, N times; the grantee then checks that
//!   its map still has room (revoked ranges are not charged to it), that it
//!   holds no capability, and that `shm_unmap` releases its last revoked
//!   range (once).
//! - `cap-flood role=flooder|partner|victim`: the flooder offers the victim
//!   one-page regions until refused (exactly `OFFERS_PER_GRANTER` go
//!   through, then the flooder's own `quota-exceeded`); the partner then
//!   shares a region with the victim as usual; the victim, whose table the
//!   offers did not touch, accepts and maps it, creates a region of its own,
//!   then drops the partner's capability with `cap_drop` (its mapping
//!   becomes a revoked range it releases; a second drop is `bad-handle`).
//! - `transitive role=owner|middle|leaf` (and `transitive-exit`): the owner
//!   offers the middle every right, the middle re-grants read-write to the
//!   leaf, which writes a sequence number in a loop; the owner revokes the
//!   middle (or tells it to exit): the leaf's derived capability must go in
//!   the same call, so it is terminated with `use-after-revoke` and the
//!   sequence never moves after the revocation returned.
//! - `double-map`: mapping a region twice is `already-mapped`.
//! - `own-stale`: the owner destroys its region and touches its own old
//!   mapping: it must be terminated with `use-after-revoke`.
//! - `bad-args [dead=D]`: the argument errors of every call, revoke and
//!   destroy by a non-owner (the grantee side), `cap_list` buffers, and the
//!   capability table limit. D is a process that exits early (a dead pid).
//! - `lifecycle`: the owner unmaps while the grantee still maps: the data
//!   stays; the grantee writes and unmaps; with nobody mapping the owner
//!   maps again and sees the write; only then does it destroy the region.
//! - `ro-write`: the grantee writes to its read-only mapping and must be
//!   terminated with `write-to-read-only`; the owner checks its data.
//! - `mid-loop`: the grantee reads in a loop until the owner revokes it and
//!   must be terminated with `use-after-revoke`.
//! - `owner-exit`: the owner exits while its grantees read in a loop; they
//!   must be terminated with `use-after-revoke`.
//! - `quota` (`role=self`, the default): creates regions up to the shared
//!   quota of the scenario, then one page more (`quota-exceeded`, or
//!   terminated with `shared-quota-exceeded` under policy `kill`);
//!   `role=owner`/`grantee`: mapping someone else's regions counts against
//!   the grantee's shared quota.
//! - `fill-table [third=W] [peer=N]`: creates one-page regions until a call
//!   fails, prints `fill-table: created <n> regions, then <error>`, and exits
//!   0 iff the error was `quota-exceeded` (its capability table is full) or
//!   `out-of-memory` (the kernel's region table is full). Fillers form a
//!   chain so that every region stays alive until the last has tried: it
//!   waits for `go` from W first, sends `go` to N when done, waits for `end`
//!   from N, and sends `end` to W before exiting.
//! - `no-map`: the grantee never maps; reading the address the owner has the
//!   region mapped at must terminate it with `unmapped-access`.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use core::hint::black_box;
use superos_protocol::syscall::{decode_result, Syscall};
use superos_rt::{
    accept_cap, arg, cap_drop, cap_list, find_cap, gate_info, getpid, ipc_recv, ipc_send, mem_map,
    mem_protect, mem_share_message, mem_share_region, mem_stat, mem_unmap, parse_i64, println, raw, rdtsc,
    read_u64, shm_accept, shm_create, shm_destroy, shm_grant, shm_map, shm_revoke, shm_unmap, tag_message,
    tag_value, write_u64, yield_now, CapInfo, Checks, Error, CAPS_MAX, MEM_SHARE, OFFERS_PER_GRANTER,
    PAGE_SIZE, PROT_EXEC, PROT_READ, PROT_WRITE, RIGHTS_ALL, RIGHT_GRANT, RIGHT_READ, RIGHT_WRITE, SHM_MAX,
    TAG_MESSAGE_MAX,
};

/// Read-write.
const RW: u64 = PROT_READ | PROT_WRITE;
/// An address in the kernel half.
const KERNEL: u64 = 0xffff_ffff_8010_0000;
/// A pid that never exists in these scenarios.
const NO_PID: u32 = 4000;
/// How long a looping grantee reads before it concludes the kernel never
/// stopped it.
const GIVE_UP_MS: u64 = 10_000;
/// A value a grantee with write access leaves for the owner.
const MARKER: u64 = 0x6772_616e_7465_6521;

/// Region ids a witness tries to accept.
const WITNESS_REGIONS: u32 = 64;

/// Read-only data: never a valid `cap_list` buffer.
static RODATA: [u8; 80] = [0x77; 80];

/// Why a mode stopped early.
enum Fail {
    /// A call that must succeed failed.
    Call(&'static str, Error),
    /// The other side broke the protocol (already reported).
    Protocol,
}

type Outcome = Result<i32, Fail>;

trait Context<T> {
    fn ctx(self, what: &'static str) -> Result<T, Fail>;
}

impl<T> Context<T> for Result<T, Error> {
    fn ctx(self, what: &'static str) -> Result<T, Fail> {
        self.map_err(|error| Fail::Call(what, error))
    }
}

/// The arguments.
struct Args<'a> {
    mode: &'a [u8],
    role: &'a [u8],
    peers: [u32; 8],
    peer_count: usize,
    third: Option<u32>,
    dead: Option<u32>,
    pages: u64,
    caps: u64,
    cycles: u64,
}

impl Args<'_> {
    fn peers(&self) -> &[u32] {
        &self.peers[..self.peer_count]
    }

    /// The first `peer=`, which the mode needs.
    fn peer(&self) -> Result<u32, Fail> {
        self.peers().first().copied().ok_or_else(|| {
            println!("shm-attack: this mode and role need peer=<pid>");
            Fail::Protocol
        })
    }

    /// `third=`, which the mode needs.
    fn third(&self) -> Result<u32, Fail> {
        self.third.ok_or_else(|| {
            println!("shm-attack: this mode and role need third=<pid>");
            Fail::Protocol
        })
    }
}

fn pid_of(text: &[u8]) -> Option<u32> {
    parse_i64(text).and_then(|pid| u32::try_from(pid).ok())
}

fn parse(args: &[u8]) -> Args<'_> {
    let mut parsed = Args {
        mode: arg(args, "mode").unwrap_or(b""),
        role: arg(args, "role").unwrap_or(b""),
        peers: [0; 8],
        peer_count: 0,
        third: arg(args, "third").and_then(pid_of),
        dead: arg(args, "dead").and_then(pid_of),
        pages: arg(args, "pages").and_then(parse_i64).map_or(4, |n| n.clamp(1, 1024) as u64),
        caps: arg(args, "caps").and_then(parse_i64).map_or(0, |n| n.max(0) as u64),
        cycles: arg(args, "cycles").and_then(parse_i64).map_or(300, |n| n.clamp(1, 10_000) as u64),
    };
    for pid in arg(args, "peer").unwrap_or(b"").split(|&b| b == b',').filter_map(pid_of) {
        if parsed.peer_count < parsed.peers.len() {
            parsed.peers[parsed.peer_count] = pid;
            parsed.peer_count += 1;
        }
    }
    parsed
}

// ---------------------------------------------------------------------------
// Messages.

/// Sends `message` to `pid`, yielding while its mailbox is full.
fn send(pid: u32, message: &[u8]) -> Result<(), Fail> {
    loop {
        match ipc_send(pid, message) {
            Err(Error::MailboxFull) => yield_now(),
            other => return other.ctx("ipc_send"),
        }
    }
}

/// Sends `<tag>:<value>` to `pid`.
fn send_tag(pid: u32, tag: &str, value: u64) -> Result<(), Fail> {
    let mut buffer = [0u8; TAG_MESSAGE_MAX];
    send(pid, tag_message(tag, value, &mut buffer))
}

/// A received message.
struct Message {
    buffer: [u8; 64],
    len: usize,
}

impl Message {
    fn bytes(&self) -> &[u8] {
        &self.buffer[..self.len]
    }
}

/// Receives the next message, which must come from one of `senders` and
/// must not be `abort`; returns the sender too.
fn recv_any(senders: &[u32]) -> Result<(u32, Message), Fail> {
    let mut message = Message { buffer: [0; 64], len: 0 };
    let (sender, len) = ipc_recv(&mut message.buffer).ctx("ipc_recv")?;
    message.len = len;
    let text = core::str::from_utf8(message.bytes()).unwrap_or("<binary>");
    if !senders.contains(&sender) {
        println!("shm-attack: unexpected message {text:?} from pid {sender} (expected one of {senders:?})");
        return Err(Fail::Protocol);
    }
    if message.bytes() == b"abort" {
        println!("shm-attack: pid {sender} aborted");
        return Err(Fail::Protocol);
    }
    Ok((sender, message))
}

/// Receives the next message, which must come from `from` and must not be
/// `abort`.
fn recv(from: u32) -> Result<Message, Fail> {
    recv_any(&[from]).map(|(_, message)| message)
}

/// Waits for the message `want` from `from`.
fn await_word(from: u32, want: &str) -> Result<(), Fail> {
    let message = recv(from)?;
    if message.bytes() != want.as_bytes() {
        let text = core::str::from_utf8(message.bytes()).unwrap_or("<binary>");
        println!("shm-attack: expected {want:?} from pid {from}, got {text:?}");
        return Err(Fail::Protocol);
    }
    Ok(())
}

/// Waits for a `<tag>:<value>` message from `from`.
fn await_tag(from: u32, tag: &str) -> Result<u64, Fail> {
    let message = recv(from)?;
    tag_value(message.bytes(), tag).ok_or_else(|| {
        let text = core::str::from_utf8(message.bytes()).unwrap_or("<binary>");
        println!("shm-attack: expected {tag}:<n> from pid {from}, got {text:?}");
        Fail::Protocol
    })
}

/// Waits for `MEM_SHARE:<id>` from `owner` and accepts the capability it
/// offered.
fn accept(owner: u32) -> Result<CapInfo, Fail> {
    let message = recv(owner)?;
    let Some(region) = mem_share_region(message.bytes()) else {
        println!("shm-attack: expected {MEM_SHARE}:<id> from pid {owner}");
        return Err(Fail::Protocol);
    };
    let cap = match accept_cap(region) {
        Ok(cap) => cap,
        Err(error) => {
            println!("shm-attack: told about {MEM_SHARE}:{region}, but shm_accept said {error:?}");
            return Err(Fail::Protocol);
        }
    };
    println!(
        "shm-attack: {MEM_SHARE}:{region} from pid {owner}: handle {:#x}, owner {}, rights {:#x}, {} bytes, mapped at {:#x}",
        cap.handle, cap.owner, cap.rights, cap.len, cap.mapped_at
    );
    Ok(cap)
}

/// Waits until `pid` no longer exists (sending it messages it never reads
/// until the kernel answers `no-such-process`).
fn wait_gone(pid: u32) -> Result<(), Fail> {
    for _ in 0..1_000_000 {
        match ipc_send(pid, b"?") {
            Err(Error::NoSuchProcess) => return Ok(()),
            Ok(()) | Err(Error::MailboxFull) => yield_now(),
            Err(error) => return Err(Fail::Call("ipc_send", error)),
        }
    }
    println!("shm-attack: pid {pid} never went away");
    Err(Fail::Protocol)
}

// ---------------------------------------------------------------------------
// Shared memory.

/// Word `index` of region `region`'s pattern (never zero for small indices,
/// so a scrubbed or foreign page shows).
fn word(region: u32, index: u64) -> u64 {
    (u64::from(region) << 48) ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed
}

/// Reads the word at `addr` of a shared mapping.
fn peek(addr: u64) -> u64 {
    // SAFETY: callers pass aligned addresses in shared mappings (which no Rust reference covers) or,
    // deliberately, addresses the kernel must refuse, in which case the fault is the kernel's to report.
    unsafe { read_u64(addr) }
}

/// Writes the word at `addr` of a shared mapping.
fn poke(addr: u64, value: u64) {
    // SAFETY: callers pass aligned addresses in shared mappings, which no Rust reference covers (or,
    // deliberately, read-only ones the kernel must refuse).
    unsafe { write_u64(addr, value) }
}

/// Fills `len` bytes at `addr` with region `region`'s pattern.
fn fill(addr: u64, len: u64, region: u32) {
    for index in 0..len / 8 {
        poke(addr + 8 * index, word(region, index));
    }
}

/// Words of `len` bytes at `addr` that differ from region `region`'s pattern,
/// skipping the words listed in `except`.
fn bad_words(addr: u64, len: u64, region: u32, except: &[u64]) -> u64 {
    (0..len / 8)
        .filter(|index| !except.contains(index) && peek(addr + 8 * index) != word(region, *index))
        .count() as u64
}

/// The owner's side of a region.
struct Shared {
    handle: u64,
    region: u32,
    addr: u64,
    len: u64,
}

/// Creates a region of `pages` pages with every right, maps it read-write
/// and fills it.
fn create_shared(pages: u64) -> Result<Shared, Fail> {
    let handle = shm_create(pages * PAGE_SIZE, RIGHTS_ALL).ctx("shm_create")?;
    let caps = cap_list().ctx("cap_list")?;
    let Some(cap) = caps.handle(handle) else {
        println!("shm-attack: cap_list does not list the handle shm_create returned ({handle:#x})");
        return Err(Fail::Protocol);
    };
    let addr = shm_map(handle, RW).ctx("shm_map")?;
    fill(addr, cap.len, cap.region);
    println!(
        "shm-attack: created {MEM_SHARE}:{} ({} bytes), handle {handle:#x}, mapped read-write at {addr:#x}",
        cap.region, cap.len
    );
    Ok(Shared { handle, region: cap.region, addr, len: cap.len })
}

/// Grants `rights` to `pid` and tells it the region id.
fn offer(shared: &Shared, pid: u32, rights: u64) -> Result<(), Fail> {
    shm_grant(shared.handle, pid, rights).ctx("shm_grant")?;
    let mut buffer = [0u8; TAG_MESSAGE_MAX];
    send(pid, mem_share_message(shared.region, &mut buffer))
}

/// Checks the owner's region is as it made it: data, capability, mapping.
fn check_intact(checks: &mut Checks, shared: &Shared, except: &[u64]) {
    checks.expect(
        format_args!("{MEM_SHARE}:{} data intact", shared.region),
        bad_words(shared.addr, shared.len, shared.region, except),
        0,
    );
    let cap = find_cap(shared.region);
    checks.expect(
        "own capability unchanged (handle, rights, mapping)",
        cap.map(|cap| (cap.handle, cap.rights, cap.mapped_at)),
        Some((shared.handle, RIGHTS_ALL, shared.addr)),
    );
}

/// `cap_list` with a raw buffer.
fn cap_list_raw(buffer: u64, max: u64) -> Result<u64, Error> {
    // SAFETY: the kernel writes at most `max` records, and never more than 4096 bytes, at `buffer`; every
    // buffer used here is one it must refuse (read-only, kernel, code) or a live stack buffer of 4160 bytes.
    decode_result(unsafe { raw::syscall(Syscall::CapList as u64, buffer, max, 0, 0, 0) })
}

/// The results of every handle-taking call with `handle` (grant and revoke
/// aimed at `target`).
type Attempts =
    (Result<u64, Error>, Result<u64, Error>, Result<(), Error>, Result<(), Error>, Result<(), Error>);

fn try_every_call(handle: u64, target: u32) -> Attempts {
    (
        shm_map(handle, PROT_READ),
        shm_map(handle, RW),
        shm_grant(handle, target, RIGHT_READ),
        shm_revoke(handle, target),
        shm_destroy(handle),
    )
}

const ALL_BAD: Attempts = (
    Err(Error::BadHandle),
    Err(Error::BadHandle),
    Err(Error::BadHandle),
    Err(Error::BadHandle),
    Err(Error::BadHandle),
);

// ---------------------------------------------------------------------------
// Modes.

fn forged(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: forged");
    let target = args.peers().first().copied().unwrap_or_else(getpid);
    checks.expect("capabilities held at start", cap_list().map(|caps| caps.held()), Ok(0));
    for handle in [0, 1, 2, 3, 7, 31, 32, 0x1000, 0xdead_beef, 1 << 63, i64::MAX as u64, u64::MAX] {
        checks.expect(
            format_args!(
                "made-up handle {handle:#x} with no capability: map r, map rw, grant, revoke, destroy"
            ),
            try_every_call(handle, target),
            ALL_BAD,
        );
    }
    let shared = create_shared(args.pages)?;
    let real = shared.handle;
    let near = [
        real ^ 1,
        real.wrapping_add(1),
        real.wrapping_sub(1),
        real.wrapping_add(2),
        real << 1,
        real >> 1,
        !real,
        real ^ (1 << 63),
        real ^ (1 << 32),
        real ^ (1 << 16),
        real.swap_bytes(),
        real.rotate_left(8),
        u64::from(shared.region),
        u64::from(shared.region) + 1,
        0,
    ];
    for handle in near.into_iter().filter(|&handle| handle != real) {
        checks.expect(
            format_args!("guess {handle:#x} near my handle {real:#x}: map r, map rw, grant, revoke, destroy"),
            try_every_call(handle, target),
            ALL_BAD,
        );
    }
    let mut state = rdtsc() | 1;
    let (mut tried, mut refused) = (0u64, 0u64);
    for _ in 0..100 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        if state == real {
            continue;
        }
        tried += 1;
        let got = try_every_call(state, target);
        if got == ALL_BAD {
            refused += 1;
        } else {
            println!("shm-attack: forged: random handle {state:#x}: {got:?}");
        }
    }
    checks.expect(format_args!("{tried} random handles refused by every call"), refused, tried);
    checks.expect("capabilities held after the guessing", cap_list().map(|caps| caps.held()), Ok(1));
    check_intact(&mut checks, &shared, &[]);
    checks.expect("destroy with the real handle", shm_destroy(real), Ok(()));
    Ok(checks.finish())
}

fn foreign_owner(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: foreign (owner)");
    let peer = args.peer()?;
    let shared = create_shared(args.pages)?;
    send_tag(peer, "HANDLE", shared.handle)?;
    await_word(peer, "tried")?;
    check_intact(&mut checks, &shared, &[]);
    offer(&shared, peer, RIGHT_READ)?;
    let theirs = await_tag(peer, "HANDLE")?;
    checks.record("the grantee's handle differs from mine", theirs != shared.handle, &theirs);
    checks.expect("map with the grantee's handle", shm_map(theirs, PROT_READ), Err(Error::BadHandle));
    checks.expect("revoke with the grantee's handle", shm_revoke(theirs, peer), Err(Error::BadHandle));
    checks.expect("destroy with the grantee's handle", shm_destroy(theirs), Err(Error::BadHandle));
    send(peer, b"checked")?;
    await_word(peer, "done")?;
    check_intact(&mut checks, &shared, &[]);
    checks.expect("destroy", shm_destroy(shared.handle), Ok(()));
    Ok(checks.finish())
}

fn foreign_grantee(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: foreign (grantee)");
    let owner = args.peer()?;
    let stolen = await_tag(owner, "HANDLE")?;
    println!("shm-attack: learned pid {owner}'s handle {stolen:#x}");
    checks.expect(
        "the owner's handle, holding no capability: map r, map rw, grant, revoke, destroy",
        try_every_call(stolen, owner),
        ALL_BAD,
    );
    checks.expect("capabilities held", cap_list().map(|caps| caps.held()), Ok(0));
    send(owner, b"tried")?;
    let cap = accept(owner)?;
    checks.record("my handle differs from the owner's", cap.handle != stolen, &cap.handle);
    checks.expect("my rights", cap.rights, RIGHT_READ);
    checks.expect(
        "owner's handle while holding my own capability for the region: map r, map rw, grant, revoke, destroy",
        try_every_call(stolen, owner),
        ALL_BAD,
    );
    let addr = shm_map(cap.handle, PROT_READ).ctx("shm_map")?;
    checks.expect("data through my own mapping", bad_words(addr, cap.len, cap.region, &[]), 0);
    send_tag(owner, "HANDLE", cap.handle)?;
    await_word(owner, "checked")?;
    checks.expect(
        "my capability after the owner tried my handle",
        find_cap(cap.region).map(|c| (c.handle, c.rights, c.mapped_at)),
        Some((cap.handle, RIGHT_READ, addr)),
    );
    checks.expect("data still intact", bad_words(addr, cap.len, cap.region, &[]), 0);
    send(owner, b"done")?;
    Ok(checks.finish())
}

fn stale_owner(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: stale (owner)");
    let peer = args.peer()?;
    let first = create_shared(args.pages)?;
    offer(&first, peer, RIGHT_READ)?;
    await_word(peer, "found")?;
    checks.expect("revoke the grantee", shm_revoke(first.handle, peer), Ok(()));
    checks.expect("revoke it again", shm_revoke(first.handle, peer), Err(Error::InvalidArgument));
    send(peer, b"revoked")?;
    await_word(peer, "checked")?;
    let second = create_shared(1)?;
    offer(&second, peer, RIGHT_READ)?;
    await_word(peer, "found")?;
    checks.expect("destroy the second region", shm_destroy(second.handle), Ok(()));
    send(peer, b"destroyed")?;
    await_word(peer, "checked")?;
    // The owner's own handles after destroy.
    check_intact(&mut checks, &first, &[]);
    checks.expect("destroy the first region", shm_destroy(first.handle), Ok(()));
    for (what, handle) in [("first", first.handle), ("second", second.handle)] {
        checks.expect(
            format_args!("my {what} handle after destroy: map r, map rw, grant, revoke, destroy"),
            try_every_call(handle, peer),
            ALL_BAD,
        );
    }
    // Issue 11: what the revocation left of my mapping is released, once.
    checks.expect("release my old mapping of the first region", shm_unmap(first.addr), Ok(()));
    checks.expect("release it again", shm_unmap(first.addr), Err(Error::BadAddress));
    checks.expect("capabilities held", cap_list().map(|caps| caps.held()), Ok(0));
    Ok(checks.finish())
}

fn stale_grantee(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: stale (grantee)");
    let owner = args.peer()?;
    let first = accept(owner)?;
    send(owner, b"found")?;
    await_word(owner, "revoked")?;
    checks.expect(
        "revoked handle: map r, map rw, grant, revoke, destroy",
        try_every_call(first.handle, owner),
        ALL_BAD,
    );
    checks.expect("revoked capability listed", find_cap(first.region), None);
    send(owner, b"checked")?;
    let second = accept(owner)?;
    checks.record(
        "the new handle differs from the revoked one",
        second.handle != first.handle,
        &second.handle,
    );
    checks.expect(
        "revoked handle while holding a new one",
        shm_map(first.handle, PROT_READ),
        Err(Error::BadHandle),
    );
    send(owner, b"found")?;
    await_word(owner, "destroyed")?;
    checks.expect(
        "handle of a destroyed region: map r, map rw, grant, revoke, destroy",
        try_every_call(second.handle, owner),
        ALL_BAD,
    );
    checks.expect("destroyed region listed", find_cap(second.region), None);
    checks.expect("capabilities held", cap_list().map(|caps| caps.held()), Ok(0));
    send(owner, b"checked")?;
    Ok(checks.finish())
}

/// The owner of `escalate` and `regrant`: offers a region with `rights` and
/// waits for `done`; returns the region for checks.
fn offer_and_wait(args: &Args, rights: u64) -> Result<Shared, Fail> {
    let peer = args.peer()?;
    let shared = create_shared(args.pages)?;
    offer(&shared, peer, rights)?;
    await_word(peer, "done")?;
    Ok(shared)
}

fn escalate_owner(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: escalate (owner)");
    let shared = offer_and_wait(args, RIGHT_READ | RIGHT_GRANT)?;
    check_intact(&mut checks, &shared, &[]);
    checks.expect("destroy", shm_destroy(shared.handle), Ok(()));
    Ok(checks.finish())
}

fn escalate_grantee(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: escalate (grantee)");
    let owner = args.peer()?;
    let witness = args.third()?;
    let cap = accept(owner)?;
    checks.expect("my rights", cap.rights, RIGHT_READ | RIGHT_GRANT);
    checks.expect("map read-write", shm_map(cap.handle, RW), Err(Error::NotPermitted));
    checks.expect("map read+exec", shm_map(cap.handle, PROT_READ | PROT_EXEC), Err(Error::NotPermitted));
    checks.expect("map read-write+exec", shm_map(cap.handle, RW | PROT_EXEC), Err(Error::NotPermitted));
    for (what, rights) in [
        ("read+write", RIGHT_READ | RIGHT_WRITE),
        ("write", RIGHT_WRITE),
        ("every right", RIGHTS_ALL),
        ("write+grant", RIGHT_WRITE | RIGHT_GRANT),
    ] {
        checks.expect(
            format_args!("grant {what} to pid {witness}"),
            shm_grant(cap.handle, witness, rights),
            Err(Error::NotPermitted),
        );
    }
    checks.expect(
        "my capability unchanged",
        find_cap(cap.region).map(|c| (c.handle, c.rights, c.mapped_at)),
        Some((cap.handle, RIGHT_READ | RIGHT_GRANT, 0)),
    );
    let addr = shm_map(cap.handle, PROT_READ).ctx("shm_map")?;
    checks.expect("data through the read-only mapping", bad_words(addr, cap.len, cap.region, &[]), 0);
    checks.expect("mem_protect to read-write", mem_protect(addr, cap.len, RW), Err(Error::NotPermitted));
    // Whether a partial range of a shared mapping is a bad address or not
    // permitted, it must be refused.
    let partial = mem_protect(addr, PAGE_SIZE, RW);
    checks.record(
        "mem_protect one page to read-write",
        matches!(partial, Err(Error::NotPermitted | Error::BadAddress)),
        &partial,
    );
    checks.expect(
        "mem_protect to read+exec",
        mem_protect(addr, cap.len, PROT_READ | PROT_EXEC),
        Err(Error::NotPermitted),
    );
    checks.expect("map again read-write", shm_map(cap.handle, RW).is_err(), true);
    checks.expect(
        format_args!("grant read (a subset) to pid {witness}"),
        shm_grant(cap.handle, witness, RIGHT_READ),
        Ok(()),
    );
    checks.expect("data still intact", bad_words(addr, cap.len, cap.region, &[]), 0);
    // The owner destroys the region once told: let the witness look first.
    send(witness, b"done")?;
    await_word(witness, "checked")?;
    send(owner, b"done")?;
    Ok(checks.finish())
}

fn regrant_owner(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: regrant (owner)");
    let shared = offer_and_wait(args, RIGHT_READ | RIGHT_WRITE)?;
    checks.expect("the grantee's write is visible to me", peek(shared.addr), MARKER);
    check_intact(&mut checks, &shared, &[0]);
    checks.expect("destroy", shm_destroy(shared.handle), Ok(()));
    Ok(checks.finish())
}

fn regrant_grantee(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: regrant (grantee)");
    let owner = args.peer()?;
    let witness = args.third()?;
    let cap = accept(owner)?;
    checks.expect("my rights", cap.rights, RIGHT_READ | RIGHT_WRITE);
    for (what, rights) in [
        ("read", RIGHT_READ),
        ("read+write", RIGHT_READ | RIGHT_WRITE),
        ("read+grant", RIGHT_READ | RIGHT_GRANT),
        ("every right", RIGHTS_ALL),
    ] {
        checks.expect(
            format_args!("re-grant {what} to pid {witness} without the grant right"),
            shm_grant(cap.handle, witness, rights),
            Err(Error::NotPermitted),
        );
    }
    let addr = shm_map(cap.handle, RW).ctx("shm_map")?;
    checks.expect("data through my read-write mapping", bad_words(addr, cap.len, cap.region, &[]), 0);
    poke(addr, MARKER);
    checks.expect("my write reads back", peek(addr), MARKER);
    send(witness, b"done")?;
    await_word(witness, "checked")?;
    send(owner, b"done")?;
    Ok(checks.finish())
}

fn witness(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: witness");
    let from = args.peer()?;
    await_word(from, "done")?;
    // Accept whatever was offered (region ids are small and sequential).
    for region in 1..=WITNESS_REGIONS {
        match shm_accept(region) {
            Ok(_) | Err(Error::BadHandle) => {}
            Err(error) => return Err(Fail::Call("shm_accept", error)),
        }
    }
    let caps = cap_list().ctx("cap_list")?;
    checks.expect("capabilities held", caps.held() as u64, args.caps);
    for cap in caps.as_slice() {
        checks.expect(
            format_args!("{MEM_SHARE}:{} (owner {}): rights, mapped at", cap.region, cap.owner),
            (cap.rights, cap.mapped_at),
            (RIGHT_READ, 0),
        );
    }
    send(from, b"checked")?;
    Ok(checks.finish())
}

fn map_after_revoke_owner(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: map-after-revoke (owner)");
    let peer = args.peer()?;
    let shared = create_shared(args.pages)?;
    offer(&shared, peer, RIGHT_READ)?;
    await_word(peer, "mapped")?;
    checks.expect("revoke the mapped grantee", shm_revoke(shared.handle, peer), Ok(()));
    send(peer, b"revoked")?;
    await_word(peer, "checked")?;
    checks.expect("grant again after the revocation", shm_grant(shared.handle, peer, RIGHT_READ), Ok(()));
    let mut buffer = [0u8; TAG_MESSAGE_MAX];
    send(peer, mem_share_message(shared.region, &mut buffer))?;
    await_word(peer, "done")?;
    check_intact(&mut checks, &shared, &[]);
    checks.expect("destroy", shm_destroy(shared.handle), Ok(()));
    Ok(checks.finish())
}

fn map_after_revoke_grantee(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: map-after-revoke (grantee)");
    let owner = args.peer()?;
    let first = accept(owner)?;
    let old = shm_map(first.handle, PROT_READ).ctx("shm_map")?;
    checks.expect("data through my mapping", bad_words(old, first.len, first.region, &[]), 0);
    send(owner, b"mapped")?;
    await_word(owner, "revoked")?;
    checks.expect(
        "map the revoked handle read-only",
        shm_map(first.handle, PROT_READ),
        Err(Error::BadHandle),
    );
    checks.expect("map the revoked handle read-write", shm_map(first.handle, RW), Err(Error::BadHandle));
    checks.expect("mem_unmap my old mapping", mem_unmap(old, first.len), Err(Error::BadAddress));
    checks.expect("revoked capability listed", find_cap(first.region), None);
    send(owner, b"checked")?;
    let second = accept(owner)?;
    checks.record(
        "the new handle differs from the revoked one",
        second.handle != first.handle,
        &second.handle,
    );
    checks.expect("the revoked handle still", shm_map(first.handle, PROT_READ), Err(Error::BadHandle));
    let new = shm_map(second.handle, PROT_READ).ctx("shm_map")?;
    let reused = new < old + first.len && old < new + second.len;
    checks.record(
        format_args!("new mapping at {new:#x} does not reuse the revoked range at {old:#x}"),
        !reused,
        &new,
    );
    checks.expect("data through the new mapping", bad_words(new, second.len, second.region, &[]), 0);
    checks.expect("unmap the new mapping", shm_unmap(new), Ok(()));
    // Issue 11: what the revocation left is released by shm_unmap, once.
    checks.expect("release the revoked range", shm_unmap(old), Ok(()));
    checks.expect("release it again", shm_unmap(old), Err(Error::BadAddress));
    send(owner, b"done")?;
    Ok(checks.finish())
}

fn revoke_churn_owner(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: revoke-churn (owner)");
    let peer = args.peer()?;
    let shared = create_shared(1)?;
    for _ in 0..args.cycles {
        offer(&shared, peer, RIGHT_READ)?;
        await_word(peer, "mapped")?;
        shm_revoke(shared.handle, peer).ctx("shm_revoke")?;
        send(peer, b"revoked")?;
    }
    await_word(peer, "checked")?;
    check_intact(&mut checks, &shared, &[]);
    checks.expect("destroy", shm_destroy(shared.handle), Ok(()));
    Ok(checks.finish())
}

fn revoke_churn_grantee(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: revoke-churn (grantee)");
    let owner = args.peer()?;
    let mut last = 0;
    for _ in 0..args.cycles {
        let cap = accept(owner)?;
        last = shm_map(cap.handle, PROT_READ).ctx("shm_map")?;
        send(owner, b"mapped")?;
        await_word(owner, "revoked")?;
    }
    println!("shm-attack: revoke-churn: mapped and was revoked {} times", args.cycles);
    // What the owner did costs this process nothing: its map has room.
    let mapped = mem_map(PAGE_SIZE, RW);
    checks.record("mem_map after the revocations", mapped.is_ok(), &mapped);
    if let Ok(addr) = mapped {
        checks.expect("mem_unmap it", mem_unmap(addr, PAGE_SIZE), Ok(()));
    }
    checks.expect("no capability left", cap_list().map(|caps| caps.held()), Ok(0));
    checks.expect("release the last revoked range", shm_unmap(last), Ok(()));
    checks.expect("release it again", shm_unmap(last), Err(Error::BadAddress));
    send(owner, b"checked")?;
    Ok(checks.finish())
}

/// `cap-flood role=flooder peer=V third=P`: offers the victim V one-page
/// regions until refused; exactly `OFFERS_PER_GRANTER` must go through, the
/// next is the flooder's own `quota-exceeded`. Withdrawing one makes room
/// for another. Tells the partner P, then keeps its regions (and offers)
/// alive until V is done.
fn cap_flood_flooder(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: cap-flood (flooder)");
    let (victim, partner) = (args.peer()?, args.third()?);
    let mut handles = [0u64; CAPS_MAX];
    let mut offered = 0;
    let refused = loop {
        if offered == CAPS_MAX {
            break None;
        }
        let handle = shm_create(PAGE_SIZE, RIGHTS_ALL).ctx("shm_create")?;
        handles[offered] = handle;
        match shm_grant(handle, victim, RIGHT_READ) {
            Ok(()) => offered += 1,
            Err(error) => {
                shm_destroy(handle).ctx("shm_destroy")?;
                break Some(error);
            }
        }
    };
    println!("shm-attack: cap-flood: offered pid {victim} {offered} capabilities, then {refused:?}");
    checks.expect("offers to anyone before the refusal", offered, OFFERS_PER_GRANTER);
    checks.expect("the refusal", refused, Some(Error::QuotaExceeded));
    if let Some(&first) = handles[..offered].first() {
        checks.expect("withdraw an offer", shm_revoke(first, victim), Ok(()));
        checks.expect("withdraw it again", shm_revoke(first, victim), Err(Error::InvalidArgument));
        checks.expect("offer it again in its place", shm_grant(first, victim, RIGHT_READ), Ok(()));
    }
    send(partner, b"flooded")?;
    await_word(victim, "done")?;
    for &handle in &handles[..offered] {
        checks.expect("destroy a flood region", shm_destroy(handle), Ok(()));
    }
    Ok(checks.finish())
}

/// `cap-flood role=partner peer=V third=F`: after the flood, shares a region
/// with V as usual.
fn cap_flood_partner(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: cap-flood (partner)");
    let (victim, flooder) = (args.peer()?, args.third()?);
    await_word(flooder, "flooded")?;
    let shared = create_shared(1)?;
    offer(&shared, victim, RIGHT_READ)?;
    await_word(victim, "done")?;
    check_intact(&mut checks, &shared, &[]);
    checks.expect("destroy", shm_destroy(shared.handle), Ok(()));
    Ok(checks.finish())
}

/// `cap-flood role=victim peer=P third=F`: the flood took nothing of its
/// capability table: it accepts P's offer, maps it, creates a region of its
/// own, and drops P's capability with `cap_drop`.
fn cap_flood_victim(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: cap-flood (victim)");
    let (partner, flooder) = (args.peer()?, args.third()?);
    let cap = accept(partner)?;
    let addr = shm_map(cap.handle, PROT_READ).ctx("shm_map")?;
    checks.expect("the partner's data", bad_words(addr, cap.len, cap.region, &[]), 0);
    checks.expect("capabilities held: the accepted one only", cap_list().map(|caps| caps.held()), Ok(1));
    let own = shm_create(PAGE_SIZE, RIGHT_READ);
    checks.expect("a region of its own", own.map(drop), Ok(()));
    if let Ok(own) = own {
        checks.expect("destroy it", shm_destroy(own), Ok(()));
    }
    checks.expect("drop the partner's, mapped", cap_drop(cap.handle), Ok(()));
    checks.expect("drop it again", cap_drop(cap.handle), Err(Error::BadHandle));
    checks.expect("its mapping is a revoked range, released once", shm_unmap(addr), Ok(()));
    checks.expect("nothing held", cap_list().map(|caps| caps.held()), Ok(0));
    send(flooder, b"done")?;
    send(partner, b"done")?;
    Ok(checks.finish())
}

/// `transitive role=owner peer=B third=C` and `transitive-exit`: offers B
/// every right; once C (to whom B re-granted read-write) writes in its
/// loop, revokes B (`transitive`) or tells B to exit (`transitive-exit`).
/// Either way C's derived capability must go with B's at once: C is
/// terminated with `use-after-revoke` at its next write, so the sequence
/// word C writes never moves again after the revocation returned.
fn transitive_owner(args: &Args, revoke: bool) -> Outcome {
    let mut checks = Checks::new(if revoke {
        "shm-attack: transitive (owner)"
    } else {
        "shm-attack: transitive-exit (owner)"
    });
    let (middle, leaf) = (args.peer()?, args.third()?);
    let shared = create_shared(1)?;
    offer(&shared, middle, RIGHTS_ALL)?;
    await_word(leaf, "looping")?;
    yield_now();
    let before = peek(shared.addr);
    if revoke {
        checks.expect("revoke the middle, which re-granted", shm_revoke(shared.handle, middle), Ok(()));
    } else {
        send(middle, b"exit")?;
        wait_gone(middle)?;
    }
    let at_revocation = peek(shared.addr);
    wait_gone(leaf)?;
    println!("shm-attack: transitive: the leaf wrote {before} before and {at_revocation} at the revocation");
    checks.expect("the leaf wrote before the revocation", before > 0, true);
    checks.expect("no write after the revocation returned", peek(shared.addr), at_revocation);
    if revoke {
        send(middle, b"revoked")?;
        wait_gone(middle)?;
    }
    checks.expect("participants left: the owner", cap_list().map(|caps| caps.held()), Ok(1));
    checks.expect("destroy", shm_destroy(shared.handle), Ok(()));
    Ok(checks.finish())
}

/// `transitive role=middle peer=A third=C`: accepts A's offer and re-grants
/// read-write to C; then waits for `revoked` (and checks its own capability
/// is gone) or `exit` from A.
fn transitive_middle(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: transitive (middle)");
    let (owner, leaf) = (args.peer()?, args.third()?);
    let cap = accept(owner)?;
    checks.expect("re-grant read-write", shm_grant(cap.handle, leaf, RIGHT_READ | RIGHT_WRITE), Ok(()));
    let mut buffer = [0u8; TAG_MESSAGE_MAX];
    send(leaf, mem_share_message(cap.region, &mut buffer))?;
    let message = recv(owner)?;
    match message.bytes() {
        b"revoked" => {
            checks.expect("my capability is gone", find_cap(cap.region).map(|c| c.handle), None);
            checks.expect(
                "grant from it again",
                shm_grant(cap.handle, leaf, RIGHT_READ),
                Err(Error::BadHandle),
            );
        }
        b"exit" => println!("shm-attack: transitive: exiting, holding what I re-granted"),
        _ => return Err(Fail::Protocol),
    }
    Ok(checks.finish())
}

/// `transitive role=leaf peer=B third=A`: accepts B's re-grant, maps it
/// read-write and writes an increasing sequence number into word 0 until
/// the kernel stops it (or gives up after `GIVE_UP_MS`).
fn transitive_leaf(args: &Args) -> Outcome {
    let (middle, owner) = (args.peer()?, args.third()?);
    let cap = accept(middle)?;
    let addr = shm_map(cap.handle, RW).ctx("shm_map")?;
    let mut seq = 1u64;
    poke(addr, seq);
    send(owner, b"looping")?;
    let khz = gate_info().tsc_khz.max(1);
    let start = rdtsc();
    loop {
        seq += 1;
        poke(addr, seq);
        if rdtsc().wrapping_sub(start) > GIVE_UP_MS * khz {
            println!("shm-attack: SURVIVED: still writing after {seq} writes");
            return Ok(1);
        }
    }
}

fn double_map(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: double-map");
    let shared = create_shared(args.pages)?;
    let handle = shared.handle;
    checks.expect("map read-write again", shm_map(handle, RW), Err(Error::AlreadyMapped));
    checks.expect("map read-only again", shm_map(handle, PROT_READ), Err(Error::AlreadyMapped));
    checks.expect(
        "cap_list shows the one mapping",
        find_cap(shared.region).map(|c| c.mapped_at),
        Some(shared.addr),
    );
    check_intact(&mut checks, &shared, &[]);
    checks.expect("unmap", shm_unmap(shared.addr), Ok(()));
    checks.expect("unmap again", shm_unmap(shared.addr), Err(Error::BadAddress));
    checks.expect("cap_list shows no mapping", find_cap(shared.region).map(|c| c.mapped_at), Some(0));
    let again = shm_map(handle, PROT_READ).ctx("shm_map")?;
    checks.expect("data kept while unmapped", bad_words(again, shared.len, shared.region, &[]), 0);
    checks.expect("map read-only twice", shm_map(handle, PROT_READ), Err(Error::AlreadyMapped));
    checks.expect("map read-write over the read-only one", shm_map(handle, RW), Err(Error::AlreadyMapped));
    checks.expect("unmap", shm_unmap(again), Ok(()));
    checks.expect("destroy", shm_destroy(handle), Ok(()));
    checks.expect("map after destroy", shm_map(handle, PROT_READ), Err(Error::BadHandle));
    Ok(checks.finish())
}

fn create_arguments(checks: &mut Checks) {
    let cases: [(&str, u64, u64, Error); 9] = [
        ("length 0", 0, RW, Error::InvalidArgument),
        ("SHM_MAX + 1 bytes", SHM_MAX + 1, RIGHTS_ALL, Error::TooLarge),
        ("SHM_MAX + 1 page", SHM_MAX + PAGE_SIZE, RIGHTS_ALL, Error::TooLarge),
        ("u64::MAX bytes", u64::MAX, RIGHTS_ALL, Error::TooLarge),
        ("no rights", PAGE_SIZE, 0, Error::InvalidArgument),
        ("an unknown right bit (8)", PAGE_SIZE, 8, Error::InvalidArgument),
        ("read plus an unknown bit", PAGE_SIZE, RIGHT_READ | 16, Error::InvalidArgument),
        ("every bit", PAGE_SIZE, u64::MAX, Error::InvalidArgument),
        ("the top bit", PAGE_SIZE, RIGHTS_ALL | 1 << 63, Error::InvalidArgument),
    ];
    for (what, len, rights, want) in cases {
        checks.expect(format_args!("shm_create with {what}"), shm_create(len, rights), Err(want));
    }
    checks.expect("nothing was created", cap_list().map(|caps| caps.held()), Ok(0));
}

fn map_arguments(checks: &mut Checks, peer: u32) -> Result<(), Fail> {
    // Write-only rights: the kernel adds read; the length rounds up.
    let handle = shm_create(PAGE_SIZE + 1, RIGHT_WRITE).ctx("shm_create")?;
    let cap = cap_list().ctx("cap_list")?.handle(handle);
    checks.expect(
        "capability of a write-only 1-page-plus-1-byte region: owner, rights, length, mapped at",
        cap.map(|cap| (cap.owner, cap.rights, cap.len, cap.mapped_at)),
        Some((getpid(), RIGHT_READ | RIGHT_WRITE, 2 * PAGE_SIZE, 0)),
    );
    checks.expect(
        "grant without the grant right",
        shm_grant(handle, peer, RIGHT_READ),
        Err(Error::NotPermitted),
    );
    let prots: [(&str, u64, Error); 6] = [
        ("read+exec", PROT_READ | PROT_EXEC, Error::NotPermitted),
        ("exec", PROT_EXEC, Error::NotPermitted),
        ("read-write+exec", RW | PROT_EXEC, Error::NotPermitted),
        ("no prot", 0, Error::InvalidArgument),
        ("write without read", PROT_WRITE, Error::InvalidArgument),
        ("an unknown prot bit", PROT_READ | 8, Error::InvalidArgument),
    ];
    for (what, prot, want) in prots {
        checks.expect(format_args!("shm_map {what}"), shm_map(handle, prot), Err(want));
    }
    let addr = shm_map(handle, RW).ctx("shm_map")?;
    poke(addr, 0x1234);
    let unmaps: [(&str, u64); 6] = [
        ("the second page of the mapping", addr + PAGE_SIZE),
        ("one byte into the mapping", addr + 1),
        ("the guard page after it", addr + 2 * PAGE_SIZE),
        ("address 0", 0),
        ("a kernel address", KERNEL),
        ("my code", main as *const () as u64 & !(PAGE_SIZE - 1)),
    ];
    for (what, target) in unmaps {
        checks.expect(format_args!("shm_unmap of {what}"), shm_unmap(target), Err(Error::BadAddress));
    }
    let private = mem_map(PAGE_SIZE, RW).ctx("mem_map")?;
    checks.expect("shm_unmap of a mem_map mapping", shm_unmap(private), Err(Error::BadAddress));
    checks.expect("mem_unmap of that mapping", mem_unmap(private, PAGE_SIZE), Ok(()));
    checks.expect("mem_unmap of the shared mapping", mem_unmap(addr, 2 * PAGE_SIZE), Err(Error::BadAddress));
    checks.expect("mem_unmap of its first page", mem_unmap(addr, PAGE_SIZE), Err(Error::BadAddress));
    checks.expect(
        "mem_protect of the shared mapping to read-only",
        mem_protect(addr, 2 * PAGE_SIZE, PROT_READ),
        Ok(()),
    );
    checks.expect(
        "mem_protect back to read-write",
        mem_protect(addr, 2 * PAGE_SIZE, RW),
        Err(Error::NotPermitted),
    );
    checks.expect(
        "mem_protect to read+exec",
        mem_protect(addr, 2 * PAGE_SIZE, PROT_READ | PROT_EXEC),
        Err(Error::NotPermitted),
    );
    checks.expect("still readable", peek(addr), 0x1234);
    checks.expect("shm_unmap", shm_unmap(addr), Ok(()));
    checks.expect("shm_destroy", shm_destroy(handle), Ok(()));

    // A read-only capability of one's own.
    let handle = shm_create(PAGE_SIZE, RIGHT_READ).ctx("shm_create")?;
    checks.expect(
        "map read-write with a read-only capability",
        shm_map(handle, RW),
        Err(Error::NotPermitted),
    );
    let addr = shm_map(handle, PROT_READ);
    checks.record("map it read-only", addr.is_ok(), &addr);
    if let Ok(addr) = addr {
        checks.expect("a fresh region reads zero", peek(addr), 0);
        checks.expect("shm_unmap", shm_unmap(addr), Ok(()));
    }
    checks.expect("shm_destroy", shm_destroy(handle), Ok(()));
    Ok(())
}

fn cap_list_arguments(checks: &mut Checks) {
    let rodata = &raw const RODATA as u64;
    checks.expect("cap_list into my rodata", cap_list_raw(rodata, 2), Err(Error::BadAddress));
    let unchanged = (0..RODATA.len() as u64).all(|i| {
        // SAFETY: reads of this program's own read-only data, which nothing
        // mutates.
        unsafe { superos_rt::read_u8(rodata + i) == 0x77 }
    });
    checks.record("rodata unchanged", unchanged, &unchanged);
    checks.expect("cap_list into the kernel half", cap_list_raw(KERNEL, 1), Err(Error::BadAddress));
    checks.expect("cap_list into my code", cap_list_raw(main as *const () as u64, 1), Err(Error::BadAddress));
    // More records than a page holds: refused, or limited to what the caller
    // holds (never more than 4096 bytes written).
    let held = cap_list().map(|caps| caps.held() as u64);
    let mut buffer = [0xaau8; 4160];
    let stack = buffer.as_mut_ptr() as u64;
    for max in [4096 / 40 + 1, u64::MAX] {
        buffer.fill(0xaa);
        let got = cap_list_raw(stack, max);
        let written = held.map_or(0, |held| (held as usize * 40).min(buffer.len()));
        let ok = got.is_err() || (got == held && buffer[written..].iter().all(|&b| b == 0xaa));
        checks.record(format_args!("cap_list of {max} records into a large enough buffer"), ok, &got);
    }
    buffer.fill(0xaa);
    checks.expect("cap_list with max 0 counts", cap_list_raw(stack, 0), held);
    checks.record("and writes nothing", buffer.iter().all(|&b| b == 0xaa), &"");
}

fn bad_args_owner(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: bad-args (owner)");
    let peer = args.peer()?;
    let me = getpid();
    create_arguments(&mut checks);
    map_arguments(&mut checks, peer)?;

    let shared = create_shared(1)?;
    let handle = shared.handle;
    checks.expect("grant to myself", shm_grant(handle, me, RIGHT_READ), Err(Error::InvalidArgument));
    checks.expect("grant to pid 0", shm_grant(handle, 0, RIGHT_READ), Err(Error::NoSuchProcess));
    checks.expect(
        format_args!("grant to pid {NO_PID} (never existed)"),
        shm_grant(handle, NO_PID, RIGHT_READ),
        Err(Error::NoSuchProcess),
    );
    if let Some(dead) = args.dead {
        wait_gone(dead)?;
        checks.expect(
            format_args!("grant to pid {dead} (exited)"),
            shm_grant(handle, dead, RIGHT_READ),
            Err(Error::NoSuchProcess),
        );
    }
    checks.expect("grant no rights", shm_grant(handle, peer, 0), Err(Error::InvalidArgument));
    // Unknown bits are both invalid and not a subset of the granter's rights.
    for (what, rights) in [("an unknown bit", 8), ("read plus an unknown bit", RIGHT_READ | 16)] {
        let got = shm_grant(handle, peer, rights);
        checks.record(
            format_args!("grant {what}"),
            matches!(got, Err(Error::InvalidArgument | Error::NotPermitted)),
            &got,
        );
    }
    checks.expect("revoke from a pid holding nothing", shm_revoke(handle, peer), Err(Error::InvalidArgument));
    checks.expect("revoke from myself (the owner)", shm_revoke(handle, me), Err(Error::InvalidArgument));
    let never = shm_revoke(handle, NO_PID);
    checks.record(
        format_args!("revoke from pid {NO_PID}"),
        matches!(never, Err(Error::InvalidArgument | Error::NoSuchProcess)),
        &never,
    );
    checks.expect("grant read to the grantee", shm_grant(handle, peer, RIGHT_READ), Ok(()));
    checks.expect("grant read again", shm_grant(handle, peer, RIGHT_READ), Err(Error::InvalidArgument));
    checks.expect(
        "grant read-write on top",
        shm_grant(handle, peer, RIGHT_READ | RIGHT_WRITE),
        Err(Error::InvalidArgument),
    );
    let mut buffer = [0u8; TAG_MESSAGE_MAX];
    send(peer, mem_share_message(shared.region, &mut buffer))?;
    await_word(peer, "done")?;
    check_intact(&mut checks, &shared, &[]);

    cap_list_arguments(&mut checks);

    // The capability table holds CAPS_MAX capabilities.
    let mut extra = [0u64; CAPS_MAX];
    let mut created = 0;
    while created + 1 < CAPS_MAX {
        match shm_create(PAGE_SIZE, RIGHT_READ) {
            Ok(handle) => {
                extra[created] = handle;
                created += 1;
            }
            Err(error) => {
                println!("shm-attack: bad-args: capability {} refused: {error}", created + 2);
                break;
            }
        }
    }
    checks.expect("capabilities held with a full table", cap_list().map(|caps| caps.held()), Ok(CAPS_MAX));
    checks.expect("one capability more", shm_create(PAGE_SIZE, RIGHT_READ), Err(Error::QuotaExceeded));
    let destroyed = extra[..created].iter().filter(|&&handle| shm_destroy(handle).is_ok()).count();
    checks.expect("destroy the extra regions", destroyed, CAPS_MAX - 1);
    checks.expect("destroy the granted region", shm_destroy(handle), Ok(()));
    checks.expect("capabilities held at the end", cap_list().map(|caps| caps.held()), Ok(0));
    Ok(checks.finish())
}

fn bad_args_grantee(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: bad-args (grantee)");
    let owner = args.peer()?;
    let cap = accept(owner)?;
    let me = getpid();
    checks.expect("revoke by a non-owner", shm_revoke(cap.handle, me), Err(Error::NotPermitted));
    checks.expect("destroy by a non-owner", shm_destroy(cap.handle), Err(Error::NotPermitted));
    checks.expect("map read-write with read", shm_map(cap.handle, RW), Err(Error::NotPermitted));
    let addr = shm_map(cap.handle, PROT_READ).ctx("shm_map")?;
    checks.expect("data", bad_words(addr, cap.len, cap.region, &[]), 0);
    checks.expect("unmap", shm_unmap(addr), Ok(()));
    checks.expect("my capability survives", find_cap(cap.region).map(|c| c.handle), Some(cap.handle));
    send(owner, b"done")?;
    Ok(checks.finish())
}

fn lifecycle_owner(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: lifecycle (owner)");
    let peer = args.peer()?;
    let shared = create_shared(args.pages)?;
    offer(&shared, peer, RIGHT_READ | RIGHT_WRITE)?;
    await_word(peer, "mapped")?;
    checks.expect("unmap while the grantee still maps", shm_unmap(shared.addr), Ok(()));
    checks.expect("my capability is unmapped", find_cap(shared.region).map(|c| c.mapped_at), Some(0));
    send(peer, b"unmapped")?;
    await_word(peer, "written")?;
    let addr = shm_map(shared.handle, PROT_READ).ctx("shm_map")?;
    checks.expect("the grantee's write, after everyone unmapped", peek(addr + 8), MARKER);
    checks.expect("the rest of the data", bad_words(addr, shared.len, shared.region, &[1]), 0);
    checks.expect("unmap", shm_unmap(addr), Ok(()));
    checks.expect("destroy", shm_destroy(shared.handle), Ok(()));
    checks.expect("map after destroy", shm_map(shared.handle, PROT_READ), Err(Error::BadHandle));
    Ok(checks.finish())
}

fn lifecycle_grantee(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: lifecycle (grantee)");
    let owner = args.peer()?;
    let cap = accept(owner)?;
    let addr = shm_map(cap.handle, RW).ctx("shm_map")?;
    checks.expect("data", bad_words(addr, cap.len, cap.region, &[]), 0);
    send(owner, b"mapped")?;
    await_word(owner, "unmapped")?;
    checks.expect("data after the owner unmapped", bad_words(addr, cap.len, cap.region, &[]), 0);
    poke(addr + 8, MARKER);
    checks.expect("unmap", shm_unmap(addr), Ok(()));
    send(owner, b"written")?;
    Ok(checks.finish())
}

/// The owner of a mode whose grantee ends up terminated: offers the region
/// (then, if `tell_addr`, sends `ADDR:<where it maps it>`), waits until the
/// grantee is gone and checks its data and its own mapping.
fn owner_outlives_grantee(args: &Args, name: &'static str, tell_addr: bool) -> Outcome {
    let mut checks = Checks::new(name);
    let peer = args.peer()?;
    let shared = create_shared(args.pages)?;
    offer(&shared, peer, RIGHT_READ)?;
    if tell_addr {
        send_tag(peer, "ADDR", shared.addr)?;
    }
    wait_gone(peer)?;
    check_intact(&mut checks, &shared, &[]);
    poke(shared.addr, 0x0123_4567);
    checks.expect("my mapping is still writable", peek(shared.addr), 0x0123_4567);
    checks.expect("destroy", shm_destroy(shared.handle), Ok(()));
    Ok(checks.finish())
}

fn own_stale() -> Outcome {
    let shared = create_shared(1)?;
    shm_destroy(shared.handle).ctx("shm_destroy")?;
    println!(
        "shm-attack: own-stale: touching {:#x}, my mapping of {MEM_SHARE}:{}, after destroying it",
        shared.addr, shared.region
    );
    black_box(peek(shared.addr));
    println!("shm-attack: own-stale: SURVIVED");
    Ok(1)
}

fn ro_write_grantee(args: &Args) -> Outcome {
    let owner = args.peer()?;
    let cap = accept(owner)?;
    let addr = shm_map(cap.handle, PROT_READ).ctx("shm_map")?;
    let bad = bad_words(addr, cap.len, cap.region, &[]);
    println!("shm-attack: ro-write: read {} bytes at {addr:#x}, {bad} bad words", cap.len);
    println!(
        "shm-attack: ro-write: writing to my read-only mapping of {MEM_SHARE}:{} at {addr:#x}",
        cap.region
    );
    poke(addr, 0xbad);
    println!("shm-attack: ro-write: SURVIVED");
    Ok(1)
}

fn no_map_grantee(args: &Args) -> Outcome {
    let owner = args.peer()?;
    let cap = accept(owner)?;
    let addr = await_tag(owner, "ADDR")?;
    println!(
        "shm-attack: no-map: reading {addr:#x}, where pid {owner} maps {MEM_SHARE}:{}, without mapping it (mapped at {:#x})",
        cap.region, cap.mapped_at
    );
    black_box(peek(addr));
    println!("shm-attack: no-map: SURVIVED");
    Ok(1)
}

/// The owner of `mid-loop` (`revoke` true) and `owner-exit`: offers the
/// region to every peer, waits until each reads in its loop, gives them time
/// to loop, then revokes them all or simply exits.
fn looping_owner(args: &Args, revoke: bool) -> Outcome {
    let mut checks =
        Checks::new(if revoke { "shm-attack: mid-loop (owner)" } else { "shm-attack: owner-exit (owner)" });
    let shared = create_shared(args.pages)?;
    for &peer in args.peers() {
        offer(&shared, peer, RIGHT_READ)?;
    }
    let mut waiting = args.peer_count;
    while waiting > 0 {
        let (sender, message) = recv_any(args.peers())?;
        if message.bytes() != b"looping" {
            println!("shm-attack: expected \"looping\" from pid {sender}");
            return Err(Fail::Protocol);
        }
        waiting -= 1;
    }
    for _ in 0..3 {
        yield_now();
    }
    if !revoke {
        checks.expect("capabilities held", cap_list().map(|caps| caps.held()), Ok(1));
        println!("shm-attack: owner-exit: exiting without destroying {MEM_SHARE}:{}", shared.region);
        return Ok(checks.finish());
    }
    for &peer in args.peers() {
        checks.expect(
            format_args!("revoke pid {peer} in the middle of its loop"),
            shm_revoke(shared.handle, peer),
            Ok(()),
        );
    }
    for &peer in args.peers() {
        wait_gone(peer)?;
    }
    check_intact(&mut checks, &shared, &[]);
    checks.expect("destroy", shm_destroy(shared.handle), Ok(()));
    Ok(checks.finish())
}

/// A grantee that maps read-only and reads in a loop until the kernel stops
/// it (or it gives up after `GIVE_UP_MS`).
fn looping_grantee(args: &Args) -> Outcome {
    let owner = args.peer()?;
    let cap = accept(owner)?;
    let addr = shm_map(cap.handle, PROT_READ).ctx("shm_map")?;
    println!(
        "shm-attack: reading {MEM_SHARE}:{} at {addr:#x} ({} bytes) in a loop until it is taken away",
        cap.region, cap.len
    );
    send(owner, b"looping")?;
    let khz = gate_info().tsc_khz.max(1);
    let start = rdtsc();
    let mut rounds = 0u64;
    loop {
        for index in 0..cap.len / 8 {
            if peek(addr + 8 * index) != word(cap.region, index) {
                println!("shm-attack: word {index} changed in round {rounds}");
                return Ok(1);
            }
        }
        rounds += 1;
        if rdtsc().wrapping_sub(start) > GIVE_UP_MS * khz {
            println!("shm-attack: SURVIVED: still reading after {rounds} rounds");
            return Ok(1);
        }
    }
}

fn quota_self() -> Outcome {
    let mut checks = Checks::new("shm-attack: quota");
    let stat = mem_stat().ctx("mem_stat")?;
    let limit = stat.max_shared_bytes;
    if limit < 2 * PAGE_SIZE {
        println!("shm-attack: quota: needs a shared quota of at least 8 KiB (shared_kib), got {limit} bytes");
        return Ok(2);
    }
    let half = limit / 2 / PAGE_SIZE * PAGE_SIZE;
    println!("shm-attack: quota: shared quota {limit} bytes, policy {}", stat.policy);
    let first = shm_create(half, RIGHTS_ALL);
    let second = shm_create(limit - half, RIGHTS_ALL);
    checks.record(
        "create two regions filling the quota exactly",
        first.is_ok() && second.is_ok(),
        &(first, second),
    );
    let (Ok(first), Ok(second)) = (first, second) else {
        return Ok(checks.finish());
    };
    let addr = shm_map(first, RW);
    checks.record("mapping my own region is not counted again", addr.is_ok(), &addr);
    println!("shm-attack: quota: creating one page over the shared quota");
    checks.expect("one page over the quota", shm_create(PAGE_SIZE, RIGHTS_ALL), Err(Error::QuotaExceeded));
    checks.expect("destroy the second region", shm_destroy(second), Ok(()));
    let third = shm_create(PAGE_SIZE, RIGHTS_ALL);
    checks.record("room again after destroy", third.is_ok(), &third);
    if let Ok(third) = third {
        checks.expect("destroy the new region", shm_destroy(third), Ok(()));
    }
    checks.expect("destroy the first region", shm_destroy(first), Ok(()));
    Ok(checks.finish())
}

fn fill_table(args: &Args) -> Outcome {
    if let Some(previous) = args.third {
        await_word(previous, "go")?;
    }
    let mut created = 0;
    let error = loop {
        match shm_create(PAGE_SIZE, RIGHTS_ALL) {
            Ok(_) => created += 1,
            Err(error) => break error,
        }
    };
    println!("shm-attack: fill-table: created {created} regions, then {error}");
    if let Some(&next) = args.peers().first() {
        send(next, b"go")?;
        await_word(next, "end")?;
    }
    if let Some(previous) = args.third {
        send(previous, b"end")?;
    }
    Ok(i32::from(!matches!(error, Error::QuotaExceeded | Error::OutOfMemory)))
}

fn quota_owner(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: quota (owner)");
    let peer = args.peer()?;
    let small = create_shared(args.pages)?;
    let big = create_shared(2 * args.pages)?;
    offer(&small, peer, RIGHT_READ)?;
    offer(&big, peer, RIGHT_READ)?;
    wait_gone(peer)?;
    for shared in [&small, &big] {
        check_intact(&mut checks, shared, &[]);
        checks.expect("destroy", shm_destroy(shared.handle), Ok(()));
    }
    Ok(checks.finish())
}

fn quota_grantee(args: &Args) -> Outcome {
    let mut checks = Checks::new("shm-attack: quota (grantee)");
    let owner = args.peer()?;
    let small = accept(owner)?;
    let big = accept(owner)?;
    let limit = mem_stat().ctx("mem_stat")?.max_shared_bytes;
    println!(
        "shm-attack: quota: shared quota {limit} bytes; regions of {} and {} bytes granted",
        small.len, big.len
    );
    let small_addr = shm_map(small.handle, PROT_READ);
    checks.record("map the small region", small_addr.is_ok(), &small_addr);
    println!("shm-attack: quota: mapping the big region too ({} bytes in all)", small.len + big.len);
    checks.expect("map the big region on top", shm_map(big.handle, PROT_READ), Err(Error::QuotaExceeded));
    if let Ok(addr) = small_addr {
        checks.expect("unmap the small region", shm_unmap(addr), Ok(()));
    }
    let big_addr = shm_map(big.handle, PROT_READ);
    checks.record("map the big region alone", big_addr.is_ok(), &big_addr);
    if let Ok(addr) = big_addr {
        checks.expect("its data", bad_words(addr, big.len, big.region, &[]), 0);
    }
    Ok(checks.finish())
}

fn run(args: &Args) -> Outcome {
    match (args.mode, args.role) {
        (b"forged", _) => forged(args),
        (b"foreign", b"owner") => foreign_owner(args),
        (b"foreign", b"grantee") => foreign_grantee(args),
        (b"stale", b"owner") => stale_owner(args),
        (b"stale", b"grantee") => stale_grantee(args),
        (b"escalate", b"owner") => escalate_owner(args),
        (b"escalate", b"grantee") => escalate_grantee(args),
        (b"regrant", b"owner") => regrant_owner(args),
        (b"regrant", b"grantee") => regrant_grantee(args),
        (b"witness", _) | (_, b"witness") => witness(args),
        (b"map-after-revoke", b"owner") => map_after_revoke_owner(args),
        (b"map-after-revoke", b"grantee") => map_after_revoke_grantee(args),
        (b"double-map", _) => double_map(args),
        (b"cap-flood", b"flooder") => cap_flood_flooder(args),
        (b"cap-flood", b"partner") => cap_flood_partner(args),
        (b"cap-flood", b"victim") => cap_flood_victim(args),
        (b"transitive", b"owner") => transitive_owner(args, true),
        (b"transitive-exit", b"owner") => transitive_owner(args, false),
        (b"transitive" | b"transitive-exit", b"middle") => transitive_middle(args),
        (b"transitive" | b"transitive-exit", b"leaf") => transitive_leaf(args),
        (b"revoke-churn", b"owner") => revoke_churn_owner(args),
        (b"revoke-churn", b"grantee") => revoke_churn_grantee(args),
        (b"own-stale", _) => own_stale(),
        (b"bad-args", b"owner" | b"") => bad_args_owner(args),
        (b"bad-args", b"grantee") => bad_args_grantee(args),
        (b"lifecycle", b"owner") => lifecycle_owner(args),
        (b"lifecycle", b"grantee") => lifecycle_grantee(args),
        (b"ro-write", b"owner") => owner_outlives_grantee(args, "shm-attack: ro-write (owner)", false),
        (b"ro-write", b"grantee") => ro_write_grantee(args),
        (b"no-map", b"owner") => owner_outlives_grantee(args, "shm-attack: no-map (owner)", true),
        (b"no-map", b"grantee") => no_map_grantee(args),
        (b"mid-loop", b"owner") => looping_owner(args, true),
        (b"owner-exit", b"owner") => looping_owner(args, false),
        (b"mid-loop" | b"owner-exit", b"grantee") => looping_grantee(args),
        (b"quota", b"self" | b"") => quota_self(),
        (b"fill-table", _) => fill_table(args),
        (b"quota", b"owner") => quota_owner(args),
        (b"quota", b"grantee") => quota_grantee(args),
        _ => {
            println!(
                "shm-attack: usage: mode=forged|foreign|stale|escalate|regrant|witness|map-after-revoke|revoke-churn|cap-flood|transitive|transitive-exit|double-map|\
                 bad-args|lifecycle|ro-write|no-map|mid-loop|owner-exit|own-stale|quota|fill-table [role=owner|grantee|witness|self|middle|leaf|flooder|victim|partner] \
                 [peer=<pid>[,<pid>...]] [third=<pid>] [dead=<pid>] [pages=N] [caps=N]"
            );
            Ok(2)
        }
    }
}

fn main(raw_args: &[u8]) -> i32 {
    let args = parse(raw_args);
    match run(&args) {
        Ok(code) => code,
        Err(fail) => {
            if let Fail::Call(what, error) = fail {
                println!("shm-attack: {what} failed: {error}");
            }
            for &pid in args.peers().iter().chain(args.third.as_ref()) {
                let _ = ipc_send(pid, b"abort");
            }
            1
        }
    }
}

superos_rt::entry!(main, "mode=<attack, see shm-attack.rs> [role=owner|grantee|witness|self|middle|leaf|flooder|victim|partner] [peer=<pid>[,<pid>...]] [third=<pid>] [dead=<pid>] [pages=<n>] [caps=<n>] [cycles=<n>]");
