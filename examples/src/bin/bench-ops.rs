//! `bench-ops`: the guest side of `superos-vmm bench`. Each `mode=` measures
//! one operation with the TSC and prints one line per sample,
//!
//! ```text
//! bench: sample op=<operation> ops=<operations in the sample> cycles=<TSC cycles for all of them>
//! ```
//!
//! after a `bench: tsc_khz=<kHz>` line, so the VMM can convert cycles to
//! time. Nothing is printed inside a timed region. With `mark=1` the timed
//! regions are also bracketed by two system calls with numbers the kernel
//! does not know (it answers `no-such-syscall`): the VMM's instruction
//! counter sees them at the gate and attributes the ring-0 instructions in
//! between to the operation (all of them, or with `begin_own` only the
//! marking process's).
//!
//! Modes (`samples=<k>` samples each; pids are given by the VMM):
//! - `syscall n=N`: N `getpid` round trips.
//! - `yield peer=Q n=N` / `yielder`: N yields to Q, which yields straight
//!   back until told to stop: 2N process switches.
//! - `cap-list n=N`: N `cap_list` calls, one capability held.
//! - `mem pages=P rounds=R`: R times `mem_map` of P pages, one write to each
//!   page, `mem_unmap`.
//! - `fault pages=P`: writes to P fresh demand-zero pages, minus the same
//!   writes to the then-resident pages: the demand-zero fault alone.
//! - `ping peer=Q rounds=R` / `pong`: R round trips of a 64-byte message.
//! - `stream-send peer=Q kib=N` / `stream-recv peer=Q kib=N`: N KiB in
//!   4096-byte messages; the receiver times from the sender's first `rdtsc`
//!   (carried in every message) to the last byte received.
//! - `shm-send peer=Q kib=N chunk=C` / `shm-recv peer=Q`: N KiB through a
//!   shared region of C KiB: the producer copies a chunk in and sends
//!   `ready`, the consumer copies it out and answers `ack`.
//! - `revoke` / `grantee owner=Q`: per round (one grantee run each), the
//!   owner times `shm_create` + `shm_grant` + `shm_map` + `shm_revoke`, and
//!   the revocation latency: the grantee spins (yielding each turn) writing
//!   `rdtsc` into a second region and reading the revoked one; the last
//!   timestamp it wrote before the read that faulted, minus the owner's
//!   `rdtsc` right after `shm_revoke` returned (one vCPU: this includes the
//!   owner's `yield` and the switch to the grantee).
//! - `hold pages=R peer=Q`: maps R pages, writes to each, tells Q `ready`
//!   and waits for any message, then exits.
//! - `release waiters=K pages=R sync=0|1`: holds R pages itself, waits until
//!   pids 1..=K are parked (their K `ready` messages with `sync=1`; a few
//!   yields for `bench-nop wait` with `sync=0`), then maps one page and calls
//!   `mem_protect` on it: the `MemProtected` event at which the VMM reads the
//!   kernel's tables (and runs its invariant checks). Then it sends each
//!   waiter a message so they exit.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use core::hint::black_box;
use superos_rt::{
    accept_cap, arg, cap_list, cycles_to_ns, gate_info, getpid, ipc_recv, ipc_send, ipc_try_recv, mem_map,
    mem_protect, mem_share_message, mem_share_region, mem_unmap, parse_i64, println, raw, rdtsc, read_u64,
    shm_create, shm_destroy, shm_grant, shm_map, shm_revoke, shm_unmap, write_u64, yield_now, Error,
    MESSAGE_MAX, PAGE_SIZE, PROT_READ, PROT_WRITE, RIGHT_GRANT, RIGHT_READ, RIGHT_WRITE, TAG_MESSAGE_MAX,
};

const RW: u64 = PROT_READ | PROT_WRITE;
const MAX: usize = MESSAGE_MAX as usize;

/// Marker system-call numbers (unknown to the kernel; `superos-vmm bench`
/// knows them): begin(op id), end(op id, operations).
const MARK_BEGIN: u64 = 0xbe_0001;
const MARK_END: u64 = 0xbe_0002;

/// Operation ids for the markers (the VMM's `probe::OP_*`).
const OP_SYSCALL: u64 = 1;
const OP_MEM: u64 = 2;
const OP_FAULT: u64 = 3;
const OP_IPC_RTT: u64 = 4;
const OP_STREAM_IPC: u64 = 5;
const OP_STREAM_SHM: u64 = 6;
const OP_SHM_CYCLE: u64 = 7;
const OP_YIELD: u64 = 8;
const OP_CAP_LIST: u64 = 9;

const STOP: &[u8] = b"stop";
const GO: &[u8] = b"go";
const READY: &[u8] = b"ready";
const ACK: &[u8] = b"ack";
const DONE: &[u8] = b"done";
const MAPPED: &[u8] = b"mapped";
const HELLO: &[u8] = b"hello";

/// The marker calls, on or off.
#[derive(Clone, Copy)]
struct Marks(bool);

impl Marks {
    fn call(self, number: u64, a0: u64, a1: u64) {
        if self.0 {
            // SAFETY: no pointer arguments; the kernel answers no-such-syscall.
            black_box(unsafe { raw::syscall(number, a0, a1, 0, 0, 0) });
        }
    }
    fn begin(self, op: u64) {
        self.call(MARK_BEGIN, op, 0);
    }
    /// Like `begin`, but only this process's own kernel work counts.
    fn begin_own(self, op: u64) {
        self.call(MARK_BEGIN, op, 1);
    }
    fn end(self, op: u64, ops: u64) {
        self.call(MARK_END, op, ops);
    }
}

fn sample(op: impl core::fmt::Display, ops: u64, cycles: u64) {
    println!("bench: sample op={op} ops={ops} cycles={cycles}");
}

/// Why a mode gave up: what failed, and the error.
type Failure = (&'static str, Error);

fn fail(what: &'static str) -> impl Fn(Error) -> Failure {
    move |error| (what, error)
}

/// Sends `message` to `pid`, yielding while its mailbox is full.
fn send(pid: u32, message: &[u8]) -> Result<(), Failure> {
    loop {
        match ipc_send(pid, message) {
            Err(Error::MailboxFull) => yield_now(),
            other => return other.map_err(fail("ipc_send")),
        }
    }
}

/// Receives the next message into `buffer`; it must come from `peer`.
fn recv_from(peer: u32, buffer: &mut [u8]) -> Result<usize, Failure> {
    let (sender, len) = ipc_recv(buffer).map_err(fail("ipc_recv"))?;
    if sender != peer {
        return Err(("a message from an unexpected pid", Error::InvalidArgument));
    }
    Ok(len)
}

/// Receives a message from `peer` that must be `want`.
fn expect_from(peer: u32, want: &[u8]) -> Result<(), Failure> {
    let mut buffer = [0u8; 64];
    let len = recv_from(peer, &mut buffer)?;
    if &buffer[..len] != want {
        return Err(("an unexpected message", Error::InvalidArgument));
    }
    Ok(())
}

/// Writes one word to each of `pages` pages at `base`.
fn touch(base: u64, pages: u64, value: u64) {
    for page in 0..pages {
        // SAFETY: inside a writable mapping of at least `pages` pages made by
        // this program, which no Rust reference covers.
        unsafe { write_u64(base + page * PAGE_SIZE, value) };
    }
}

fn syscall(calls: u64, samples: u64, marks: Marks) -> Result<(), Failure> {
    for _ in 0..samples {
        marks.begin(OP_SYSCALL);
        let start = rdtsc();
        for _ in 0..calls {
            black_box(getpid());
        }
        let cycles = rdtsc().wrapping_sub(start);
        marks.end(OP_SYSCALL, calls);
        sample("syscall", calls, cycles);
    }
    Ok(())
}

/// `yield n=N peer=Q`: N yields, each to `Q` (a `yielder`, which yields
/// straight back): 2N process switches, each one operation (all the kernel
/// work counts: the yield, the save stub of the process left, the restore
/// stub of the one resumed). Then tells Q to stop.
fn yield_op(peer: u32, yields: u64, samples: u64, marks: Marks) -> Result<(), Failure> {
    for _ in 0..samples {
        marks.begin(OP_YIELD);
        let start = rdtsc();
        for _ in 0..yields {
            yield_now();
        }
        let cycles = rdtsc().wrapping_sub(start);
        marks.end(OP_YIELD, 2 * yields);
        sample("yield", 2 * yields, cycles);
    }
    send(peer, STOP)
}

/// `yielder`: yields until a `stop` message arrives (looked for every 64
/// turns, so that nearly every turn is a plain yield).
fn yielder() -> Result<(), Failure> {
    let mut buffer = [0u8; 64];
    loop {
        for _ in 0..64 {
            yield_now();
        }
        match ipc_try_recv(&mut buffer) {
            Ok((_, len)) if &buffer[..len] == STOP => return Ok(()),
            Ok(_) | Err(Error::WouldBlock) => {}
            Err(error) => return Err(("ipc_try_recv", error)),
        }
    }
}

/// `cap-list n=N`: N `cap_list` calls with one capability held (a region of
/// its own).
fn cap_list_op(calls: u64, samples: u64, marks: Marks) -> Result<(), Failure> {
    shm_create(PAGE_SIZE, RIGHT_READ | RIGHT_WRITE).map_err(fail("shm_create"))?;
    for _ in 0..samples {
        marks.begin(OP_CAP_LIST);
        let start = rdtsc();
        for _ in 0..calls {
            black_box(cap_list().map_err(fail("cap_list"))?);
        }
        let cycles = rdtsc().wrapping_sub(start);
        marks.end(OP_CAP_LIST, calls);
        sample("cap-list", calls, cycles);
    }
    Ok(())
}

fn mem(pages: u64, rounds: u64, samples: u64, marks: Marks) -> Result<(), Failure> {
    for _ in 0..samples {
        marks.begin(OP_MEM);
        let start = rdtsc();
        for round in 0..rounds {
            let addr = mem_map(pages * PAGE_SIZE, RW).map_err(fail("mem_map"))?;
            touch(addr, pages, round);
            mem_unmap(addr, pages * PAGE_SIZE).map_err(fail("mem_unmap"))?;
        }
        let cycles = rdtsc().wrapping_sub(start);
        marks.end(OP_MEM, rounds);
        sample(format_args!("mem-{pages}"), rounds, cycles);
    }
    Ok(())
}

fn fault(pages: u64, samples: u64, marks: Marks) -> Result<(), Failure> {
    for _ in 0..samples {
        let base = mem_map(pages * PAGE_SIZE, RW).map_err(fail("mem_map"))?;
        marks.begin(OP_FAULT);
        let start = rdtsc();
        touch(base, pages, 1);
        let fresh = rdtsc().wrapping_sub(start);
        marks.end(OP_FAULT, pages);
        let start = rdtsc();
        touch(base, pages, 2);
        let resident = rdtsc().wrapping_sub(start);
        mem_unmap(base, pages * PAGE_SIZE).map_err(fail("mem_unmap"))?;
        sample("fault", pages, fresh.saturating_sub(resident));
    }
    Ok(())
}

fn ping(peer: u32, rounds: u64, samples: u64, marks: Marks) -> Result<(), Failure> {
    let mut message = [0u8; 64];
    let mut reply = [0u8; 64];
    for _ in 0..samples {
        marks.begin(OP_IPC_RTT);
        let start = rdtsc();
        for round in 0..rounds {
            message[..8].copy_from_slice(&round.to_le_bytes());
            send(peer, &message)?;
            let len = recv_from(peer, &mut reply)?;
            if len != 64 || reply != message {
                return Err(("a wrong reply", Error::InvalidArgument));
            }
        }
        let cycles = rdtsc().wrapping_sub(start);
        marks.end(OP_IPC_RTT, rounds);
        sample("ipc-rtt", rounds, cycles);
    }
    send(peer, STOP)
}

fn pong() -> Result<(), Failure> {
    let mut buffer = [0u8; 64];
    loop {
        let (sender, len) = ipc_recv(&mut buffer).map_err(fail("ipc_recv"))?;
        if &buffer[..len] == STOP {
            return Ok(());
        }
        send(sender, &buffer[..len])?;
    }
}

fn stream_send(peer: u32, bytes: u64, samples: u64, marks: Marks) -> Result<(), Failure> {
    let mut chunk = [0u8; MAX];
    for (i, byte) in chunk.iter_mut().enumerate() {
        *byte = i as u8;
    }
    for _ in 0..samples {
        expect_from(peer, GO)?;
        marks.begin(OP_STREAM_IPC);
        let start = rdtsc();
        chunk[..8].copy_from_slice(&start.to_le_bytes());
        let mut offset = 0;
        let mut seq = 0u64;
        while offset < bytes {
            let len = (bytes - offset).min(MESSAGE_MAX) as usize;
            chunk[8..16].copy_from_slice(&seq.to_le_bytes());
            send(peer, &chunk[..len])?;
            offset += len as u64;
            seq += 1;
        }
    }
    // Exit only after the receiver is done, so the exit is not measured.
    expect_from(peer, GO)
}

fn stream_recv(peer: u32, bytes: u64, samples: u64, marks: Marks) -> Result<(), Failure> {
    let mut chunk = [0u8; MAX];
    let word = |chunk: &[u8], at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&chunk[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    for _ in 0..samples {
        send(peer, GO)?;
        let mut received = 0;
        let mut seq = 0u64;
        let mut start = 0;
        while received < bytes {
            let len = recv_from(peer, &mut chunk)?;
            if len < 16 || word(&chunk, 8) != seq {
                return Err(("a stream message out of order", Error::InvalidArgument));
            }
            start = word(&chunk, 0);
            received += len as u64;
            seq += 1;
        }
        let cycles = rdtsc().wrapping_sub(start);
        marks.end(OP_STREAM_IPC, 1);
        sample("stream-ipc", 1, cycles);
    }
    send(peer, GO)
}

/// Copies `len` bytes between two raw addresses of this process.
fn copy(from: u64, to: u64, len: u64) {
    // SAFETY: both ranges lie inside mappings of at least `len` bytes made by this program (private or
    // shared), which no Rust reference covers; they do not overlap.
    unsafe { core::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, len as usize) };
}

fn shm_send(peer: u32, bytes: u64, chunk: u64, samples: u64, marks: Marks) -> Result<(), Failure> {
    let pages = chunk.div_ceil(PAGE_SIZE);
    let handle = shm_create(chunk, RIGHT_READ | RIGHT_WRITE | RIGHT_GRANT).map_err(fail("shm_create"))?;
    let id = cap_list()
        .map_err(fail("cap_list"))?
        .handle(handle)
        .ok_or(("cap_list (own handle)", Error::BadHandle))?
        .region;
    shm_grant(handle, peer, RIGHT_READ).map_err(fail("shm_grant"))?;
    let region = shm_map(handle, RW).map_err(fail("shm_map"))?;
    let source = mem_map(chunk, RW).map_err(fail("mem_map"))?;
    touch(region, pages, 0);
    for page in 0..pages {
        for word in 0..PAGE_SIZE / 8 {
            // SAFETY: inside the source mapping; no reference covers it.
            unsafe { write_u64(source + page * PAGE_SIZE + word * 8, page ^ word) };
        }
    }
    let mut message = [0u8; TAG_MESSAGE_MAX];
    send(peer, mem_share_message(id, &mut message))?;
    expect_from(peer, MAPPED)?;
    // "ready", chunk length, chunk sequence number.
    let mut ready = [0u8; 24];
    ready[..READY.len()].copy_from_slice(READY);
    for _ in 0..samples {
        marks.begin(OP_STREAM_SHM);
        let start = rdtsc();
        let mut offset = 0;
        let mut seq = 0u64;
        while offset < bytes {
            let len = (bytes - offset).min(chunk);
            copy(source, region, len);
            // SAFETY: the first word of the writable shared mapping.
            unsafe { write_u64(region, seq) };
            ready[8..16].copy_from_slice(&len.to_le_bytes());
            ready[16..24].copy_from_slice(&seq.to_le_bytes());
            send(peer, &ready)?;
            expect_from(peer, ACK)?;
            offset += len;
            seq += 1;
        }
        let cycles = rdtsc().wrapping_sub(start);
        marks.end(OP_STREAM_SHM, 1);
        sample("stream-shm", 1, cycles);
    }
    send(peer, DONE)?;
    // Destroying revokes the consumer too (which may have exited by now).
    shm_unmap(region).map_err(fail("shm_unmap"))?;
    shm_destroy(handle).map_err(fail("shm_destroy"))?;
    mem_unmap(source, chunk).map_err(fail("mem_unmap"))
}

fn shm_recv(peer: u32) -> Result<(), Failure> {
    let mut buffer = [0u8; 64];
    let len = recv_from(peer, &mut buffer)?;
    let id = mem_share_region(&buffer[..len]).ok_or(("no region named", Error::InvalidArgument))?;
    let cap = accept_cap(id).map_err(fail("shm_accept"))?;
    let region = shm_map(cap.handle, PROT_READ).map_err(fail("shm_map"))?;
    let pages = cap.len.div_ceil(PAGE_SIZE);
    let target = mem_map(cap.len, RW).map_err(fail("mem_map"))?;
    touch(target, pages, 0);
    for page in 0..pages {
        // SAFETY: inside the read-only shared mapping; no reference covers it.
        black_box(unsafe { read_u64(region + page * PAGE_SIZE) });
    }
    send(peer, MAPPED)?;
    loop {
        let len = recv_from(peer, &mut buffer)?;
        if &buffer[..len] == DONE {
            break;
        }
        if len != 24 || &buffer[..READY.len()] != READY {
            return Err(("an unexpected message", Error::InvalidArgument));
        }
        let word = |at: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&buffer[at..at + 8]);
            u64::from_le_bytes(bytes)
        };
        let (bytes, seq) = (word(8).min(cap.len), word(16));
        copy(region, target, bytes);
        // SAFETY: the first word of this program's private target mapping.
        let got = unsafe { read_u64(target) };
        if got != seq {
            return Err(("a chunk out of order", Error::InvalidArgument));
        }
        send(peer, ACK)?;
    }
    mem_unmap(target, cap.len).map_err(fail("mem_unmap"))
}

/// A region this owner created: handle, id and its own mapping.
fn region(pages: u64, grantee: u32, rights: u64) -> Result<(u64, u32, u64), Failure> {
    let handle =
        shm_create(pages * PAGE_SIZE, RIGHT_READ | RIGHT_WRITE | RIGHT_GRANT).map_err(fail("shm_create"))?;
    shm_grant(handle, grantee, rights).map_err(fail("shm_grant"))?;
    let addr = shm_map(handle, RW).map_err(fail("shm_map"))?;
    let id = cap_list()
        .map_err(fail("cap_list"))?
        .handle(handle)
        .ok_or(("cap_list (own handle)", Error::BadHandle))?
        .region;
    Ok((handle, id, addr))
}

/// Whether 5 s have passed since TSC value `since` (true at once if the
/// TSC's rate is unknown).
fn waited_5_s(since: u64) -> bool {
    let ns = cycles_to_ns(rdtsc().wrapping_sub(since));
    ns == 0 || ns > 5_000_000_000
}

fn revoke(rounds: u64, marks: Marks) -> Result<(), Failure> {
    let mut buffer = [0u8; 64];
    let mut message = [0u8; TAG_MESSAGE_MAX];
    for _ in 0..rounds {
        let (grantee, len) = ipc_recv(&mut buffer).map_err(fail("ipc_recv"))?;
        if &buffer[..len] != HELLO {
            return Err(("an unexpected message", Error::InvalidArgument));
        }
        // The operation: create + grant + map (timed), ... + revoke (timed).
        marks.begin_own(OP_SHM_CYCLE);
        let start = rdtsc();
        let handle =
            shm_create(PAGE_SIZE, RIGHT_READ | RIGHT_WRITE | RIGHT_GRANT).map_err(fail("shm_create"))?;
        shm_grant(handle, grantee, RIGHT_READ).map_err(fail("shm_grant"))?;
        let own = shm_map(handle, RW).map_err(fail("shm_map"))?;
        let setup = rdtsc().wrapping_sub(start);
        marks.end(OP_SHM_CYCLE, 0);
        let id = cap_list()
            .map_err(fail("cap_list"))?
            .handle(handle)
            .ok_or(("cap_list (own handle)", Error::BadHandle))?
            .region;
        // The grantee's clock: word 0 its latest rdtsc, word 1 1 while it is
        // parked at its yield (see `grantee`).
        let (clock_handle, clock_id, clock) = region(1, grantee, RIGHT_READ | RIGHT_WRITE)?;
        send(grantee, mem_share_message(id, &mut message))?;
        send(grantee, mem_share_message(clock_id, &mut message))?;
        // SAFETY (both reads): word 1 and word 0 of the owner's own shared
        // clock mapping, which no Rust reference covers.
        // Yield at least once: the revoke then starts right after a switch
        // back to this process, on a fresh time slice, so that a timer
        // tick does not switch to the grantee before `shm_revoke` returns
        // (it would fault first, and the sample would be stale).
        loop {
            yield_now();
            // SAFETY: word 1 of the owner's own shared clock mapping, which
            // no Rust reference covers.
            if unsafe { read_u64(clock + 8) } == 1 {
                break;
            }
        }
        marks.begin_own(OP_SHM_CYCLE);
        let before = rdtsc();
        shm_revoke(handle, grantee).map_err(fail("shm_revoke"))?;
        let revoked = rdtsc();
        marks.end(OP_SHM_CYCLE, 1);
        // Until the grantee is gone: 1,000 tries and 5 s at least. On
        // several CPUs the grantee runs on another, and a host that time-
        // slices the vCPUs on fewer CPUs (the nested host's L1 has one) may
        // not run that vCPU for a while; meanwhile each try here is a yield
        // that finds nothing else to run.
        let mut tries = 0;
        loop {
            yield_now();
            tries += 1;
            match ipc_send(grantee, b"?") {
                Err(Error::NoSuchProcess) => break,
                _ if tries > 1000 && waited_5_s(revoked) => {
                    return Err(("the grantee survived the revocation", Error::NotPermitted))
                }
                _ => {}
            }
        }
        // SAFETY: as above.
        let faulted = unsafe { read_u64(clock) };
        sample("shm-cycle", 1, setup + revoked.wrapping_sub(before));
        // From the call to the grantee's last access before its fault: on
        // several CPUs the grantee runs meanwhile and faults while (or
        // right after) the shootdown reaches its CPU.
        if faulted > before {
            sample("revoke-to-fault", 1, faulted - before);
        }
        if faulted > revoked {
            sample("revoke-latency", 1, faulted - revoked);
        } else {
            println!(
                "bench: stale grantee timestamp (a timer tick switched to the grantee before shm_revoke returned, and it faulted first); sample dropped"
            );
        }
        shm_unmap(own).map_err(fail("shm_unmap"))?;
        shm_destroy(handle).map_err(fail("shm_destroy"))?;
        shm_unmap(clock).map_err(fail("shm_unmap"))?;
        shm_destroy(clock_handle).map_err(fail("shm_destroy"))?;
    }
    Ok(())
}

fn grantee(owner: u32) -> Result<(), Failure> {
    send(owner, HELLO)?;
    let mut buffer = [0u8; 64];
    let mut map = |prot| -> Result<u64, Failure> {
        let len = recv_from(owner, &mut buffer)?;
        let id = mem_share_region(&buffer[..len]).ok_or(("no region named", Error::InvalidArgument))?;
        let cap = accept_cap(id).map_err(fail("shm_accept"))?;
        shm_map(cap.handle, prot).map_err(fail("shm_map"))
    };
    let revoked = map(PROT_READ)?;
    let clock = map(RW)?;
    loop {
        // Word 1 says where this process is: 1 from just before its yield
        // to just after it, 2 while it runs its timestamp and read. The
        // owner revokes only while it reads 1 (one vCPU: this process is
        // then parked in or right before its yield), so that when it
        // resumes, the `rdtsc` below is fresh and the read right after it
        // is the one that faults. A timer preemption between the two finds
        // word 1 at 2, and the owner waits for the next yield.
        // SAFETY: the clock stays mapped; the read of the revoked region is
        // meant to fault once the owner revokes it.
        unsafe { write_u64(clock + 8, 1) };
        yield_now();
        // SAFETY: as above: the clock stays mapped, and the read of the
        // revoked region is the one meant to fault.
        unsafe {
            write_u64(clock + 8, 2);
            write_u64(clock, rdtsc());
            black_box(read_u64(revoked));
        }
    }
}

/// Maps `pages` pages and writes to each (none if `pages` is 0).
fn hold_pages(pages: u64) -> Result<(), Failure> {
    if pages > 0 {
        let addr = mem_map(pages * PAGE_SIZE, RW).map_err(fail("mem_map"))?;
        touch(addr, pages, 1);
    }
    Ok(())
}

fn hold(pages: u64, peer: u32) -> Result<(), Failure> {
    hold_pages(pages)?;
    send(peer, READY)?;
    let mut buffer = [0u8; 64];
    ipc_recv(&mut buffer).map_err(fail("ipc_recv"))?;
    Ok(())
}

fn release(waiters: u32, pages: u64, sync: bool) -> Result<(), Failure> {
    hold_pages(pages)?;
    if sync {
        // Every holder says `ready` once its pages are resident.
        let mut buffer = [0u8; 64];
        for _ in 0..waiters {
            ipc_recv(&mut buffer).map_err(fail("ipc_recv"))?;
        }
    } else {
        // `bench-nop wait` processes block at once: one turn each is enough.
        for _ in 0..4 {
            yield_now();
        }
    }
    // The snapshot moment: the only `mem_protect` of a benchmark run.
    let addr = mem_map(PAGE_SIZE, RW).map_err(fail("mem_map"))?;
    mem_protect(addr, PAGE_SIZE, PROT_READ).map_err(fail("mem_protect"))?;
    mem_unmap(addr, PAGE_SIZE).map_err(fail("mem_unmap"))?;
    for pid in 1..=waiters {
        send(pid, STOP)?;
    }
    Ok(())
}

fn main(args: &[u8]) -> i32 {
    let number = |key, default: u64| arg(args, key).and_then(parse_i64).map_or(default, |n| n.max(0) as u64);
    let samples = number("samples", 5).max(1);
    let marks = Marks(number("mark", 0) != 0);
    let peer = number("peer", 0) as u32;
    println!("bench: tsc_khz={}", gate_info().tsc_khz);
    let result = match arg(args, "mode").unwrap_or(b"") {
        b"syscall" => syscall(number("n", 1000).max(1), samples, marks),
        b"yield" => yield_op(peer, number("n", 100).max(1), samples, marks),
        b"yielder" => yielder(),
        b"cap-list" => cap_list_op(number("n", 100).max(1), samples, marks),
        b"mem" => mem(number("pages", 1).max(1), number("rounds", 10).max(1), samples, marks),
        b"fault" => fault(number("pages", 64).max(1), samples, marks),
        b"ping" => ping(peer, number("rounds", 50).max(1), samples, marks),
        b"pong" => pong(),
        b"stream-send" => stream_send(peer, number("kib", 1024).max(1) << 10, samples, marks),
        b"stream-recv" => stream_recv(peer, number("kib", 1024).max(1) << 10, samples, marks),
        b"shm-send" => shm_send(
            peer,
            number("kib", 1024).max(1) << 10,
            number("chunk", 256).max(4) << 10,
            samples,
            marks,
        ),
        b"shm-recv" => shm_recv(peer),
        b"revoke" => revoke(samples, marks),
        b"grantee" => grantee(number("owner", 1) as u32),
        b"hold" => hold(number("pages", 0), peer),
        b"release" => release(number("waiters", 0) as u32, number("pages", 0), number("sync", 1) != 0),
        _ => {
            println!("bench: usage: mode=syscall|yield|yielder|cap-list|mem|fault|ping|pong|stream-send|stream-recv|shm-send|shm-recv|revoke|grantee|hold|release");
            return 2;
        }
    };
    match result {
        Ok(()) => 0,
        Err((what, error)) => {
            println!("bench: error: {what}: {error}");
            1
        }
    }
}

superos_rt::entry!(main, "mode=syscall|yield|yielder|cap-list|mem|fault|ping|pong|stream-send|stream-recv|shm-send|shm-recv|revoke|grantee|hold|release [peer=<pid>] [n=<calls>] [pages=<n>] [rounds=<n>] [kib=<n>] [chunk=<kib>] [samples=<n>] [mark=<0|1>] [owner=<pid>] [waiters=<n>] [sync=<0|1>]");
