//! `shm-pipeline`: streams data from a producer to a consumer through a
//! shared region, with a message handshake per chunk, then shows revocation.
//!
//! - `mode=producer peer=<consumer pid> [kib=N] [chunk=K]`: creates a region
//!   of a 64-byte header plus K KiB (default 32), grants it read-only to the
//!   consumer, tells it `MEM_SHARE:<region id>` in a message and maps it
//!   read-write. For each chunk of the N KiB (default 256) of patterned data
//!   it writes the chunk, then the header (sequence number, length, FNV-1a
//!   checksum of the chunk), sends `ready` and waits for `ack`. After the
//!   last `ack` it revokes the consumer's capability (`shm_revoke`), sends
//!   `revoked`, checks its own side is intact and destroys the region.
//! - `mode=consumer peer=<producer pid>`: receives `MEM_SHARE:<id>`, finds its
//!   own handle with `cap_list`, maps the region read-only and answers
//!   `mapped`. On each `ready` it checks the header (sequence, checksum) and
//!   every byte against the pattern, then answers `ack`. On `revoked` it
//!   prints what it received and touches its old mapping: the kernel must
//!   terminate it with `use-after-revoke` (if it survives it prints
//!   `SURVIVED` and exits 1; if the data was bad it exits 1 without touching).
//!
//! Both print bytes, cycles, ns and KiB/s (from the kernel-published TSC
//! frequency), to compare with `ipc mode=stream-send`/`stream-recv`, which
//! copy the same pattern through 4096-byte messages.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use core::hint::black_box;
use superos_rt::{
    accept_cap, arg, cap_list, cycles_to_ns, find_cap, gate_info, ipc_recv, ipc_send, mem_share_message,
    mem_share_region, parse_i64, println, rdtsc, read_u64, shm_create, shm_destroy, shm_grant, shm_map,
    shm_revoke, shm_unmap, write_u64, yield_now, Error, PROT_READ, PROT_WRITE, RIGHT_GRANT, RIGHT_READ,
    RIGHT_WRITE, TAG_MESSAGE_MAX,
};

/// Bytes before the data: sequence number, chunk length, chunk checksum.
const HEADER: u64 = 64;
const SEQ: u64 = 0;
const LEN: u64 = 8;
const SUM: u64 = 16;

const READY: &[u8] = b"ready";
const ACK: &[u8] = b"ack";
const MAPPED: &[u8] = b"mapped";
const REVOKED: &[u8] = b"revoked";
const ABORT: &[u8] = b"abort";

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// Byte `offset` of the stream (the same pattern `ipc` streams).
fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 ^ (offset >> 12) as u8
}

/// The 8 pattern bytes at `offset`, as a little-endian word.
fn pattern_word(offset: u64) -> u64 {
    let mut bytes = [0u8; 8];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = pattern(offset + i as u64);
    }
    u64::from_le_bytes(bytes)
}

/// FNV-1a over the bytes of `word`, continuing from `hash` (sizes are whole
/// KiB, so chunks are whole words and the checksum equals the byte-wise one
/// `ipc` prints for the same stream).
fn fnv1a_word(mut hash: u64, word: u64) -> u64 {
    for byte in word.to_le_bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3);
    }
    hash
}

/// Reads the word at `addr` of the shared mapping.
fn peek(addr: u64) -> u64 {
    // SAFETY: `addr` is 8-byte aligned inside this process's shared mapping, which no Rust reference covers;
    // if the mapping was revoked, the fault is the kernel's to report.
    unsafe { read_u64(addr) }
}

/// Writes the word at `addr` of the shared mapping.
fn poke(addr: u64, value: u64) {
    // SAFETY: `addr` is 8-byte aligned inside this process's writable shared
    // mapping, which no Rust reference covers.
    unsafe { write_u64(addr, value) }
}

/// Sends `message` to `pid`, yielding while its mailbox is full.
fn send(pid: u32, message: &[u8]) -> Result<(), Error> {
    loop {
        match ipc_send(pid, message) {
            Err(Error::MailboxFull) => yield_now(),
            other => return other,
        }
    }
}

/// Receives the next message, which must come from `peer`; returns its
/// length in `buffer`, or `None` (after saying why) if it came from someone
/// else or could not be received.
fn recv_from(peer: u32, buffer: &mut [u8; 64], who: &str) -> Option<usize> {
    match ipc_recv(buffer) {
        Ok((sender, len)) if sender == peer => Some(len),
        Ok((sender, len)) => {
            println!("shm-pipeline: {who}: unexpected message {:?} from pid {sender}", &buffer[..len]);
            None
        }
        Err(error) => {
            println!("shm-pipeline: {who}: ipc_recv failed: {error}");
            None
        }
    }
}

/// Throughput in KiB/s for `bytes` in `cycles`.
fn kib_per_s(bytes: u64, cycles: u64) -> u128 {
    u128::from(bytes) * u128::from(gate_info().tsc_khz) * 1000 / (1024 * u128::from(cycles.max(1)))
}

/// The producer's shared region, once set up.
struct Region {
    handle: u64,
    id: u32,
    addr: u64,
}

/// Creates, grants, announces and maps the region.
fn producer_setup(peer: u32, chunk: u64) -> Result<Region, (&'static str, Error)> {
    let handle =
        shm_create(HEADER + chunk, RIGHT_READ | RIGHT_WRITE | RIGHT_GRANT).map_err(|e| ("shm_create", e))?;
    let caps = cap_list().map_err(|e| ("cap_list", e))?;
    let id = caps.handle(handle).ok_or(("cap_list (own handle missing)", Error::BadHandle))?.region;
    shm_grant(handle, peer, RIGHT_READ).map_err(|e| ("shm_grant", e))?;
    let addr = shm_map(handle, PROT_READ | PROT_WRITE).map_err(|e| ("shm_map", e))?;
    let mut message = [0u8; TAG_MESSAGE_MAX];
    send(peer, mem_share_message(id, &mut message)).map_err(|e| ("ipc_send", e))?;
    Ok(Region { handle, id, addr })
}

fn producer(peer: u32, total: u64, chunk: u64) -> i32 {
    let region = match producer_setup(peer, chunk) {
        Ok(region) => region,
        Err((what, error)) => {
            println!("shm-pipeline: producer: {what} failed: {error}");
            let _ = send(peer, ABORT);
            return 1;
        }
    };
    let Region { handle, id, addr } = region;
    println!("shm-pipeline: producer: MEM_SHARE:{id} mapped read-write at {addr:#x}, granted read-only to pid {peer}");
    let mut buffer = [0u8; 64];
    match recv_from(peer, &mut buffer, "producer") {
        Some(len) if &buffer[..len] == MAPPED => {}
        Some(len) => {
            println!("shm-pipeline: producer: the consumer answered {:?}", &buffer[..len]);
            return 1;
        }
        None => return 1,
    }

    let start = rdtsc();
    let mut offset = 0u64;
    let mut chunks = 0u64;
    let mut checksum = FNV_START;
    while offset < total {
        let len = (total - offset).min(chunk);
        let mut sum = FNV_START;
        for word in 0..len.div_ceil(8) {
            let value = pattern_word(offset + 8 * word);
            poke(addr + HEADER + 8 * word, value);
            sum = fnv1a_word(sum, value);
            checksum = fnv1a_word(checksum, value);
        }
        poke(addr + SEQ, chunks);
        poke(addr + LEN, len);
        poke(addr + SUM, sum);
        if let Err(error) = send(peer, READY) {
            println!("shm-pipeline: producer: ipc_send failed: {error}");
            return 1;
        }
        match recv_from(peer, &mut buffer, "producer") {
            Some(len) if &buffer[..len] == ACK => {}
            Some(len) => {
                println!(
                    "shm-pipeline: producer: chunk {chunks}: the consumer answered {:?}",
                    &buffer[..len]
                );
                return 1;
            }
            None => return 1,
        }
        offset += len;
        chunks += 1;
    }
    let cycles = rdtsc().wrapping_sub(start).max(1);

    let revoked = shm_revoke(handle, peer);
    let told = send(peer, REVOKED);
    println!(
        "shm-pipeline: producer: sent {offset} bytes in {chunks} chunks of up to {chunk} bytes to pid {peer} \
         through MEM_SHARE:{id}, checksum {checksum:#018x}, {cycles} cycles = {} ns, {} KiB/s",
        cycles_to_ns(cycles),
        kib_per_s(offset, cycles)
    );
    println!("shm-pipeline: producer: revoked pid {peer}: {revoked:?}");
    // The owner's own capability and mapping are untouched by the revocation.
    let own = find_cap(id);
    let own_ok = own.is_some_and(|cap| cap.handle == handle && cap.mapped_at == addr);
    let last_seq = peek(addr + SEQ);
    let unmapped = shm_unmap(addr);
    let destroyed = shm_destroy(handle);
    println!(
        "shm-pipeline: producer: own capability intact: {own_ok}, last sequence {last_seq}, \
         unmap {unmapped:?}, destroy {destroyed:?}"
    );
    let ok = revoked.is_ok()
        && told.is_ok()
        && own_ok
        && last_seq + 1 == chunks
        && unmapped.is_ok()
        && destroyed.is_ok();
    i32::from(!ok)
}

/// Finds the region the producer names and maps it read-only.
fn consumer_setup(peer: u32) -> Result<(u32, u64, u64), &'static str> {
    let mut buffer = [0u8; 64];
    let len = recv_from(peer, &mut buffer, "consumer").ok_or("no region message")?;
    let id = mem_share_region(&buffer[..len]).ok_or("the producer did not name a region")?;
    let cap = accept_cap(id).map_err(|_| "could not accept the capability for the region named")?;
    println!(
        "shm-pipeline: consumer: MEM_SHARE:{id} from pid {}: handle {:#x}, rights {:#x}, {} bytes",
        cap.owner, cap.handle, cap.rights, cap.len
    );
    if cap.owner != peer || cap.rights != RIGHT_READ || cap.mapped_at != 0 {
        return Err("the capability is not what the producer granted");
    }
    let addr = shm_map(cap.handle, PROT_READ).map_err(|_| "shm_map read-only failed")?;
    Ok((id, addr, cap.len))
}

fn consumer(peer: u32) -> i32 {
    let (id, addr, region_len) = match consumer_setup(peer) {
        Ok(setup) => setup,
        Err(why) => {
            println!("shm-pipeline: consumer: {why}");
            let _ = send(peer, ABORT);
            return 1;
        }
    };
    if send(peer, MAPPED).is_err() {
        return 1;
    }
    let mut buffer = [0u8; 64];
    let mut received = 0u64;
    let mut chunks = 0u64;
    let mut bad_bytes = 0u64;
    let mut bad_chunks = 0u64;
    let mut checksum = FNV_START;
    let mut first = None;
    loop {
        let Some(len) = recv_from(peer, &mut buffer, "consumer") else {
            return 1;
        };
        let message = &buffer[..len];
        if message == REVOKED {
            break;
        }
        if message != READY {
            println!("shm-pipeline: consumer: unexpected message {message:?}");
            return 1;
        }
        first.get_or_insert_with(rdtsc);
        let (seq, chunk_len, sum) = (peek(addr + SEQ), peek(addr + LEN), peek(addr + SUM));
        if seq != chunks || chunk_len == 0 || chunk_len > region_len - HEADER {
            println!(
                "shm-pipeline: consumer: bad header: sequence {seq} (expected {chunks}), length {chunk_len}"
            );
            return 1;
        }
        let mut chunk_sum = FNV_START;
        for word in 0..chunk_len.div_ceil(8) {
            let value = peek(addr + HEADER + 8 * word);
            chunk_sum = fnv1a_word(chunk_sum, value);
            let want = pattern_word(received + 8 * word);
            if value != want {
                let diff = (value ^ want).to_le_bytes();
                bad_bytes += diff.iter().filter(|&&byte| byte != 0).count() as u64;
            }
            checksum = fnv1a_word(checksum, value);
        }
        bad_chunks += u64::from(chunk_sum != sum);
        received += chunk_len;
        chunks += 1;
        if send(peer, ACK).is_err() {
            return 1;
        }
    }
    let cycles = first.map_or(0, |start| rdtsc().wrapping_sub(start)).max(1);
    println!(
        "shm-pipeline: consumer: received {received} bytes in {chunks} chunks from pid {peer} through \
         MEM_SHARE:{id}, checksum {checksum:#018x}, {bad_bytes} bad bytes, {bad_chunks} bad chunk checksums, \
         {cycles} cycles = {} ns, {} KiB/s",
        cycles_to_ns(cycles),
        kib_per_s(received, cycles)
    );
    if bad_bytes != 0 || bad_chunks != 0 || chunks == 0 {
        return 1;
    }
    let still_listed = find_cap(id).is_some();
    println!(
        "shm-pipeline: consumer: revoked (capability still listed: {still_listed}); \
         touching my old mapping at {addr:#x}"
    );
    black_box(peek(addr + HEADER));
    println!("shm-pipeline: consumer: SURVIVED");
    1
}

fn main(args: &[u8]) -> i32 {
    let number = |key, default: u64| arg(args, key).and_then(parse_i64).map_or(default, |n| n.max(0) as u64);
    let Some(peer) = arg(args, "peer").and_then(parse_i64).and_then(|pid| u32::try_from(pid).ok()) else {
        println!("shm-pipeline: usage: mode=producer|consumer peer=<pid> [kib=N] [chunk=KiB]");
        return 2;
    };
    match arg(args, "mode") {
        Some(b"producer") => producer(peer, number("kib", 256) << 10, number("chunk", 32).max(1) << 10),
        Some(b"consumer") => consumer(peer),
        _ => {
            println!("shm-pipeline: usage: mode=producer|consumer peer=<pid> [kib=N] [chunk=KiB]");
            2
        }
    }
}

superos_rt::entry!(main, "mode=producer|consumer peer=<pid> [kib=<n>] [chunk=<kib>]");
