//! `smp-share`: a grantee uses a shared region on one CPU while its owner
//! takes it away on another, to show that the kernel's TLB shootdown leaves
//! no stale translation behind.
//!
//! - `mode=owner peer=<grantee pid> op=revoke|destroy|exit|unmap [rounds=N]`:
//!   creates a one-page region, grants it read-write to the grantee, names
//!   it in a message, maps it and waits for `mapped`. Then, for each round
//!   `1..=N` (default 50), it publishes the round as the sequence number and
//!   waits until the grantee has copied it to the acknowledgement word
//!   (both run at once, on different CPUs when there are several). Then the
//!   operation: `revoke` (`shm_revoke` of the grantee) and, once it has
//!   returned, sequence numbers beyond N written through its own mapping
//!   for 100 ms; `destroy` (`shm_destroy`: the frame is scrubbed and
//!   freed); `exit` (the owner exits, which destroys the region); `unmap`
//!   (`shm_unmap` of the owner's own mapping while the grantee goes on
//!   using its own, 20 ms, then a read through the unmapped address: the
//!   kernel must kill the owner `unmapped-access`, and its death destroys
//!   the region). It exits 0 if every step worked (never, for `unmap`).
//! - `mode=grantee peer=<owner pid>`: accepts and maps the region, answers
//!   `mapped`, then loops: reads the sequence number and copies it to the
//!   acknowledgement word. The owner wrote N into the region's limit word
//!   before the first round: a sequence number beyond N, or lower than one
//!   seen before (a scrubbed frame reads 0), was written after the region
//!   was taken away, so it was read through a stale translation: it prints
//!   `STALE` and exits 2. The kernel must kill it (`use-after-revoke`) at its first
//!   access after the operation; if it is still alive 5 s later it prints
//!   `SURVIVED` and exits 3.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use superos_rt::{
    accept_cap, arg, cap_list, gate_info, ipc_recv, ipc_send, mem_share_message, mem_share_region, parse_i64,
    println, rdtsc, read_u64, shm_create, shm_destroy, shm_grant, shm_map, shm_revoke, shm_unmap, write_u64,
    yield_now, Error, PROT_READ, PROT_WRITE, RIGHT_GRANT, RIGHT_READ, RIGHT_WRITE, TAG_MESSAGE_MAX,
};

/// The words of the region.
const SEQ: u64 = 0;
const ACK: u64 = 8;
const LIMIT: u64 = 16;

const MAPPED: &[u8] = b"mapped";

fn peek(addr: u64) -> u64 {
    // SAFETY: `addr` is an aligned word of this process's shared mapping, which no Rust reference covers; if
    // the mapping was taken away, the fault is the kernel's to report.
    unsafe { read_u64(addr) }
}

fn poke(addr: u64, value: u64) {
    // SAFETY: as in `peek`.
    unsafe { write_u64(addr, value) }
}

fn send(pid: u32, message: &[u8]) -> Result<(), Error> {
    loop {
        match ipc_send(pid, message) {
            Err(Error::MailboxFull) => yield_now(),
            other => return other,
        }
    }
}

/// TSC ticks in `ms` milliseconds.
fn ticks(ms: u64) -> u64 {
    gate_info().tsc_khz.max(1) * ms
}

fn owner(peer: u32, op: &[u8], rounds: u64) -> Result<(), &'static str> {
    let handle = shm_create(4096, RIGHT_READ | RIGHT_WRITE | RIGHT_GRANT).map_err(|_| "shm_create failed")?;
    let id = cap_list().ok().and_then(|caps| caps.handle(handle)).ok_or("own capability missing")?.region;
    shm_grant(handle, peer, RIGHT_READ | RIGHT_WRITE).map_err(|_| "shm_grant failed")?;
    let addr = shm_map(handle, PROT_READ | PROT_WRITE).map_err(|_| "shm_map failed")?;
    poke(addr + LIMIT, rounds);
    let mut message = [0u8; TAG_MESSAGE_MAX];
    send(peer, mem_share_message(id, &mut message)).map_err(|_| "ipc_send failed")?;
    let mut buffer = [0u8; 64];
    match ipc_recv(&mut buffer) {
        Ok((sender, len)) if sender == peer && &buffer[..len] == MAPPED => {}
        _ => return Err("the grantee did not map the region"),
    }
    // Rounds: each one acknowledged by the grantee while it runs.
    let mut waited = 0;
    for round in 1..=rounds {
        poke(addr + SEQ, round);
        let start = rdtsc();
        while peek(addr + ACK) != round {
            if rdtsc().wrapping_sub(start) > ticks(5000) {
                return Err("the grantee stopped acknowledging");
            }
            core::hint::spin_loop();
        }
        waited += rdtsc().wrapping_sub(start);
    }
    println!(
        "smp-share: owner: {rounds} rounds acknowledged by pid {peer} through MEM_SHARE:{id}, {} ticks each on average",
        waited / rounds.max(1)
    );
    match op {
        b"revoke" => {
            shm_revoke(handle, peer).map_err(|_| "shm_revoke failed")?;
            // Beyond the limit: no grantee access may see these.
            let start = rdtsc();
            let mut value = rounds;
            while rdtsc().wrapping_sub(start) < ticks(100) {
                value += 1;
                poke(addr + SEQ, value);
            }
            println!("smp-share: owner: revoked pid {peer}, then wrote sequence numbers up to {value}");
            shm_destroy(handle).map_err(|_| "shm_destroy failed")?;
            Ok(())
        }
        b"destroy" => {
            shm_destroy(handle).map_err(|_| "shm_destroy failed")?;
            println!("smp-share: owner: destroyed MEM_SHARE:{id}");
            Ok(())
        }
        b"exit" => {
            println!("smp-share: owner: exiting with MEM_SHARE:{id} still granted");
            Ok(())
        }
        b"unmap" => {
            shm_unmap(addr).map_err(|_| "shm_unmap failed")?;
            // The grantee goes on using its own mapping meanwhile (it dies
            // only when this process's death destroys the region).
            let start = rdtsc();
            while rdtsc().wrapping_sub(start) < ticks(20) {
                core::hint::spin_loop();
            }
            println!("smp-share: owner: unmapped {addr:#x}; reading it");
            let value = peek(addr + SEQ);
            println!("smp-share: owner: SURVIVED: read {value} through the unmapped {addr:#x}");
            Err("still alive after reading an unmapped address")
        }
        _ => Err("unknown op"),
    }
}

fn grantee(peer: u32) -> i32 {
    let mut buffer = [0u8; 64];
    let id = match ipc_recv(&mut buffer) {
        Ok((sender, len)) if sender == peer => mem_share_region(&buffer[..len]),
        _ => None,
    };
    let Some(cap) = id.and_then(|id| accept_cap(id).ok()) else {
        println!("smp-share: grantee: no region from pid {peer}");
        return 1;
    };
    let Ok(addr) = shm_map(cap.handle, PROT_READ | PROT_WRITE) else {
        println!("smp-share: grantee: shm_map failed");
        return 1;
    };
    let limit = peek(addr + LIMIT);
    if send(peer, MAPPED).is_err() {
        return 1;
    }
    let (mut highest, mut reads) = (0u64, 0u64);
    let mut last_change = rdtsc();
    loop {
        let seq = peek(addr + SEQ);
        reads += 1;
        if seq > limit || seq < highest {
            println!("smp-share: grantee: STALE: read sequence {seq} after {highest} (limit {limit}, read {reads})");
            return 2;
        }
        if seq != highest {
            highest = seq;
            last_change = rdtsc();
        }
        poke(addr + ACK, seq);
        if rdtsc().wrapping_sub(last_change) > ticks(5000) {
            println!(
                "smp-share: grantee: SURVIVED: still mapped 5 s after sequence {highest} ({reads} reads)"
            );
            return 3;
        }
    }
}

fn run(args: &[u8]) -> i32 {
    let peer = arg(args, "peer").and_then(parse_i64).and_then(|p| u32::try_from(p).ok());
    let rounds = arg(args, "rounds").map_or(Some(50), |r| parse_i64(r).and_then(|r| u64::try_from(r).ok()));
    match (arg(args, "mode"), peer, rounds) {
        (Some(b"owner"), Some(peer), Some(rounds)) if rounds > 0 => {
            match owner(peer, arg(args, "op").unwrap_or(b""), rounds) {
                Ok(()) => 0,
                Err(why) => {
                    println!("smp-share: owner: {why}");
                    1
                }
            }
        }
        (Some(b"grantee"), Some(peer), _) => grantee(peer),
        _ => {
            println!("smp-share: needs mode=owner peer=<pid> op=... or mode=grantee peer=<pid>");
            1
        }
    }
}

superos_rt::entry!(run, "mode=owner|grantee peer=<pid> [op=revoke|destroy|exit|unmap] [rounds=<n>]");
