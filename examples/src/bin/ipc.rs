//! `ipc`: message passing between processes, one role per `mode=`. Peers are
//! named by pid with `peer=<pid>` (pids are given in scenario order from 1).
//!
//! - `pingpong peer=P rounds=N`: sends N 64-byte messages to P, each after
//!   the previous reply; prints the mean round trip in cycles and ns.
//! - `pong`: echoes every message back to its sender until it receives
//!   `stop`.
//! - `stream-send peer=P kib=N`: sends N KiB of patterned data to P in
//!   4096-byte messages (waiting while P's mailbox is full).
//! - `stream-recv kib=N [peer=P]`: receives N KiB, checks every byte against
//!   the pattern (so order and content), prints the byte count, a checksum and
//!   the throughput; exits 0 iff everything matched.
//! - `flood peer=P`: sends to P, which never receives, until `mailbox-full`;
//!   exits 0 iff exactly `MAILBOX_PER_SENDER` messages were accepted (the
//!   mailbox rule: one sender gets at most that share of another's
//!   `MAILBOX_DEPTH` slots).
//! - `dead-peer peer=P`: sends to P until P has exited; then (and for pids
//!   that never existed) the answer must be `no-such-process`.
//! - `order peer=P n=N`: sends N numbered messages of varying length to P.
//! - `order-recv n=N senders=S`: receives N messages from each of S senders and
//!   checks each sender's arrive in order, with the right length and content.
//! - `bad-args`: the argument errors of `ipc_send` and `ipc_recv`, using its own
//!   mailbox.
//! - `wait`: blocks in `ipc_recv` and prints what arrives (if nothing ever can,
//!   the kernel ends it with a `deadlock` fault).
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use superos_protocol::syscall::{decode_result, Syscall};
use superos_rt::{
    arg, cycles_to_ns, gate_info, getpid, ipc_recv, ipc_send, ipc_try_recv, parse_i64, println, raw, rdtsc,
    read_u8, yield_now, Checks, Error, MAILBOX_DEPTH, MAILBOX_PER_SENDER, MESSAGE_MAX, RECV_NONBLOCK,
};

const MAX: usize = MESSAGE_MAX as usize;
const STOP: &[u8] = b"stop";
/// An address in the kernel half.
const KERNEL: u64 = 0xffff_ffff_8010_0000;
/// An address in the image window that nothing occupies.
const UNMAPPED: u64 = 0x2000_0000;

/// Read-only data: never a valid receive buffer.
static RODATA: [u8; 64] = [0x77; 64];

/// Sends `message` to `pid`, yielding while its mailbox is full.
fn send(pid: u32, message: &[u8]) -> Result<(), Error> {
    loop {
        match ipc_send(pid, message) {
            Err(Error::MailboxFull) => yield_now(),
            other => return other,
        }
    }
}

/// Byte `offset` of the stream pattern.
fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 ^ (offset >> 12) as u8
}

/// FNV-1a over `bytes`, continuing from `hash`.
fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &byte in bytes {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3);
    }
    hash
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn pingpong(peer: u32, rounds: u64) -> Result<i32, Error> {
    let mut message = [0u8; 64];
    let mut reply = [0u8; 64];
    let mut cycles = 0u64;
    for round in 0..rounds {
        message[..8].copy_from_slice(&round.to_le_bytes());
        message[8..].fill(round as u8);
        let start = rdtsc();
        send(peer, &message)?;
        let (sender, len) = ipc_recv(&mut reply)?;
        cycles += rdtsc().wrapping_sub(start);
        if sender != peer || len != 64 || reply != message {
            println!("ipc: pingpong: round {round}: bad reply of {len} bytes from pid {sender}");
            return Ok(1);
        }
    }
    send(peer, STOP)?;
    let mean = cycles / rounds.max(1);
    println!(
        "ipc: pingpong: {rounds} round trips of 64 bytes with pid {peer}: {mean} cycles = {} ns each",
        cycles_to_ns(mean)
    );
    Ok(0)
}

fn pong() -> Result<i32, Error> {
    let mut buffer = [0u8; MAX];
    let mut echoed = 0u64;
    loop {
        let (sender, len) = ipc_recv(&mut buffer)?;
        if &buffer[..len] == STOP {
            println!("ipc: pong: echoed {echoed} messages");
            return Ok(0);
        }
        send(sender, &buffer[..len])?;
        echoed += 1;
    }
}

fn stream_send(peer: u32, total: u64) -> Result<i32, Error> {
    let mut chunk = [0u8; MAX];
    let mut offset = 0u64;
    let mut messages = 0u64;
    let mut checksum = FNV_START;
    while offset < total {
        let len = (total - offset).min(MESSAGE_MAX) as usize;
        for (i, byte) in chunk[..len].iter_mut().enumerate() {
            *byte = pattern(offset + i as u64);
        }
        checksum = fnv1a(checksum, &chunk[..len]);
        send(peer, &chunk[..len])?;
        offset += len as u64;
        messages += 1;
    }
    println!("ipc: stream-send: sent {offset} bytes in {messages} messages to pid {peer}, checksum {checksum:#018x}");
    Ok(0)
}

fn stream_recv(peer: Option<u32>, total: u64) -> Result<i32, Error> {
    let mut chunk = [0u8; MAX];
    let mut received = 0u64;
    let mut messages = 0u64;
    let mut bad_bytes = 0u64;
    let mut checksum = FNV_START;
    let mut first = None;
    let mut sender = 0;
    while received < total {
        let (from, len) = ipc_recv(&mut chunk)?;
        first.get_or_insert_with(rdtsc);
        if peer.is_some_and(|peer| peer != from) || (sender != 0 && sender != from) {
            println!("ipc: stream-recv: unexpected message from pid {from}");
            return Ok(1);
        }
        sender = from;
        for (i, byte) in chunk[..len].iter().enumerate() {
            bad_bytes += u64::from(*byte != pattern(received + i as u64));
        }
        checksum = fnv1a(checksum, &chunk[..len]);
        received += len as u64;
        messages += 1;
    }
    let cycles = first.map_or(0, |start| rdtsc().wrapping_sub(start)).max(1);
    let khz = u128::from(gate_info().tsc_khz);
    let kib_per_s = u128::from(received) * khz * 1000 / (1024 * u128::from(cycles));
    println!(
        "ipc: stream-recv: received {received} bytes in {messages} messages from pid {sender}, \
         checksum {checksum:#018x}, {bad_bytes} bad bytes, {kib_per_s} KiB/s"
    );
    Ok(i32::from(received != total || bad_bytes != 0))
}

fn flood(peer: u32) -> Result<i32, Error> {
    let message = [0x42u8; 64];
    let mut accepted = 0;
    let error = loop {
        match ipc_send(peer, &message) {
            Ok(()) if accepted < 4 * MAILBOX_DEPTH => accepted += 1,
            Ok(()) => break None,
            Err(error) => break Some(error),
        }
    };
    match error {
        Some(error) => println!("ipc: flood: pid {peer} accepted {accepted} messages, then: {error}"),
        None => println!("ipc: flood: pid {peer} accepted {accepted} messages and was never full"),
    }
    Ok(i32::from(error != Some(Error::MailboxFull) || accepted != MAILBOX_PER_SENDER))
}

fn dead_peer(peer: u32) -> Result<i32, Error> {
    let mut checks = Checks::new("ipc: dead-peer");
    checks.expect("send to pid 0", ipc_send(0, b"hello"), Err(Error::NoSuchProcess));
    checks.expect("send to pid 4000", ipc_send(4000, b"hello"), Err(Error::NoSuchProcess));
    let mut attempts = 0u32;
    let result = loop {
        attempts += 1;
        match ipc_send(peer, b"are you there?") {
            Ok(()) | Err(Error::MailboxFull) if attempts < 100_000 => yield_now(),
            other => break other,
        }
    };
    checks.expect(format_args!("send to pid {peer} once it exited"), result, Err(Error::NoSuchProcess));
    Ok(checks.finish())
}

/// Length of numbered message `seq`.
fn order_len(seq: u32) -> usize {
    4 + (seq % 61) as usize
}

fn order(peer: u32, count: u32) -> Result<i32, Error> {
    let mut message = [0u8; 64];
    for seq in 0..count {
        message[..4].copy_from_slice(&seq.to_le_bytes());
        message[4..].fill(seq as u8);
        send(peer, &message[..order_len(seq)])?;
    }
    println!("ipc: order: sent {count} messages to pid {peer}");
    Ok(0)
}

fn order_recv(count: u32, senders: usize) -> Result<i32, Error> {
    // (sender pid, next sequence number expected from it)
    let mut next = [(0u32, 0u32); 8];
    let senders = senders.min(next.len());
    let mut buffer = [0u8; 64];
    for _ in 0..count as usize * senders {
        let (from, len) = ipc_recv(&mut buffer)?;
        let slot = match next.iter().position(|(pid, _)| *pid == from || *pid == 0) {
            Some(slot) if slot < senders => slot,
            _ => {
                println!("ipc: order-recv: a message from unexpected pid {from}");
                return Ok(1);
            }
        };
        let want = next[slot].1;
        let seq = u32::from_le_bytes([buffer[0], buffer[1], buffer[2], buffer[3]]);
        let content_ok = buffer[4..len].iter().all(|&b| b == want as u8);
        if seq != want || len != order_len(want) || !content_ok {
            println!("ipc: order-recv: from pid {from}: got #{seq} ({len} bytes), expected #{want}");
            return Ok(1);
        }
        next[slot] = (from, want + 1);
    }
    println!("ipc: order-recv: {count} messages from each of {senders} senders, all in order");
    Ok(0)
}

/// `ipc_recv` with a raw buffer address.
fn recv_raw(buffer: u64, cap: u64, flags: u64) -> Result<u64, Error> {
    // SAFETY: the kernel writes at most `cap` bytes at `buffer`; every buffer
    // used here is one it must refuse, or a live stack buffer of `cap` bytes.
    decode_result(unsafe { raw::syscall(Syscall::IpcRecv as u64, buffer, cap, flags, 0, 0) })
}

/// `ipc_send` with a raw buffer address.
fn send_raw(pid: u32, buffer: u64, len: u64) -> Result<u64, Error> {
    // SAFETY: the kernel only reads the buffer.
    decode_result(unsafe { raw::syscall(Syscall::IpcSend as u64, u64::from(pid), buffer, len, 0, 0) })
}

fn bad_args() -> Result<i32, Error> {
    let me = getpid();
    let mut checks = Checks::new("ipc: bad-args");
    let mut buffer = [0u8; MAX + 1];
    let stack = buffer.as_mut_ptr() as u64;

    // An empty mailbox.
    checks.expect("try_recv on an empty mailbox", ipc_try_recv(&mut buffer), Err(Error::WouldBlock));
    checks.expect("recv with unknown flag bits", recv_raw(stack, 64, 2), Err(Error::InvalidArgument));
    checks.expect(
        "recv with unknown and nonblock flag bits",
        recv_raw(stack, 64, 2 | RECV_NONBLOCK),
        Err(Error::InvalidArgument),
    );

    // Sending.
    checks.expect("send of MESSAGE_MAX + 1 bytes", ipc_send(me, &buffer), Err(Error::TooLarge));
    checks.expect("send from a kernel address", send_raw(me, KERNEL, 16), Err(Error::BadAddress));
    checks.expect("send from an unmapped address", send_raw(me, UNMAPPED, 16), Err(Error::BadAddress));
    checks.expect("send to pid 0", ipc_send(0, b"x"), Err(Error::NoSuchProcess));
    checks.expect("send to pid 4000", ipc_send(4000, b"x"), Err(Error::NoSuchProcess));
    checks.expect("nothing was queued", ipc_try_recv(&mut buffer), Err(Error::WouldBlock));

    // A message too long for the buffer stays queued.
    let message = [0x5au8; 100];
    checks.expect("send 100 bytes to myself", ipc_send(me, &message), Ok(()));
    checks.expect("recv into 10 bytes", ipc_try_recv(&mut buffer[..10]), Err(Error::BufferTooSmall));
    checks.expect("recv into 99 bytes", ipc_try_recv(&mut buffer[..99]), Err(Error::BufferTooSmall));
    checks.expect("recv into 100 bytes", ipc_try_recv(&mut buffer[..100]), Ok((me, 100)));
    checks.record("content", buffer[..100] == message, &"100 bytes");

    // Buffers the kernel may not write.
    checks.expect("send 16 bytes to myself", ipc_send(me, &message[..16]), Ok(()));
    let rodata = &raw const RODATA as u64;
    let code = main as *const () as u64;
    for (what, addr) in [("kernel", KERNEL), ("unmapped", UNMAPPED), ("rodata", rodata), ("code", code)] {
        checks.expect(
            format_args!("recv into {what} memory"),
            recv_raw(addr, 64, RECV_NONBLOCK),
            Err(Error::BadAddress),
        );
    }
    // SAFETY: reads of this program's own read-only data, which nothing mutates.
    let unchanged = (0..64).all(|i| unsafe { read_u8(rodata + i) } == 0x77);
    checks.record("rodata unchanged", unchanged, &unchanged);
    // Drain whatever is left (whether a refused receive keeps the message is
    // not part of the contract).
    while ipc_try_recv(&mut buffer).is_ok() {}

    // The mailbox holds MAILBOX_DEPTH messages, in order.
    for seq in 0..MAILBOX_DEPTH as u8 {
        checks.expect(format_args!("queue message {seq}"), ipc_send(me, &[seq; 3]), Ok(()));
    }
    checks.expect("one more", ipc_send(me, b"overflow"), Err(Error::MailboxFull));
    let mut in_order = true;
    for seq in 0..MAILBOX_DEPTH as u8 {
        let got = ipc_try_recv(&mut buffer);
        in_order &= got == Ok((me, 3)) && buffer[..3] == [seq; 3];
    }
    checks.record("drained in FIFO order", in_order, &in_order);
    checks.expect("then empty", ipc_try_recv(&mut buffer), Err(Error::WouldBlock));

    // The largest message.
    checks.expect("send MESSAGE_MAX bytes", ipc_send(me, &buffer[..MAX]), Ok(()));
    checks.expect("recv MESSAGE_MAX bytes", ipc_try_recv(&mut buffer[..MAX]), Ok((me, MAX)));
    Ok(checks.finish())
}

fn wait() -> Result<i32, Error> {
    let mut buffer = [0u8; MAX];
    println!("ipc: wait: waiting for a message");
    let (sender, len) = ipc_recv(&mut buffer)?;
    println!("ipc: wait: got {len} bytes from pid {sender}");
    Ok(0)
}

fn main(args: &[u8]) -> i32 {
    let number = |key, default: u64| arg(args, key).and_then(parse_i64).map_or(default, |n| n.max(0) as u64);
    let peer = arg(args, "peer").and_then(parse_i64).map(|pid| pid as u32);
    let mode = arg(args, "mode").unwrap_or(b"");
    let needs_peer = matches!(mode, b"pingpong" | b"stream-send" | b"flood" | b"dead-peer" | b"order");
    let result = match (mode, peer) {
        (_, None) if needs_peer => {
            println!("ipc: mode needs peer=<pid>");
            return 2;
        }
        (b"pingpong", Some(peer)) => pingpong(peer, number("rounds", 200)),
        (b"pong", _) => pong(),
        (b"stream-send", Some(peer)) => stream_send(peer, number("kib", 256) << 10),
        (b"stream-recv", _) => stream_recv(peer, number("kib", 256) << 10),
        (b"flood", Some(peer)) => flood(peer),
        (b"dead-peer", Some(peer)) => dead_peer(peer),
        (b"order", Some(peer)) => order(peer, number("n", 50) as u32),
        (b"order-recv", _) => order_recv(number("n", 50) as u32, number("senders", 1) as usize),
        (b"bad-args", _) => bad_args(),
        (b"wait", _) => wait(),
        _ => {
            println!(
                "ipc: usage: mode=pingpong|pong|stream-send|stream-recv|flood|dead-peer|order|order-recv|bad-args|wait"
            );
            return 2;
        }
    };
    result.unwrap_or_else(|error| {
        println!("ipc: unexpected error: {error}");
        1
    })
}

superos_rt::entry!(main, "mode=pingpong|pong|stream-send|stream-recv|flood|dead-peer|order|order-recv|bad-args|wait [peer=<pid>] [rounds=<n>] [kib=<n>] [n=<n>] [senders=<n>]");
