//! `scrub`: shows that memory a process gives back reaches the next process
//! zeroed.
//!
//! - `mode=fill pages=N reader=R [unmap=0|1]`: maps N pages, fills every byte
//!   with a non-zero pattern, unmaps them (unless `unmap=0`: then they are
//!   freed when it exits), and sends a message to the reader pid R.
//! - `mode=read pages=N filler=F`: waits for that message, then until F has
//!   exited, then maps N pages and reads every byte (first touch makes each page
//!   resident from a free frame); prints how many were non-zero and exits 0 iff
//!   none was.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use superos_rt::{
    arg, ipc_recv, ipc_send, mem_map, mem_unmap, parse_i64, println, read_u64, write_u64, yield_now, Error,
    PAGE_SIZE, PROT_READ, PROT_WRITE,
};

const PATTERN: u64 = 0xdead_beef_a5a5_5a5a;

fn fill(pages: u64, reader: u32, unmap: bool) -> Result<i32, Error> {
    let len = pages * PAGE_SIZE;
    let base = mem_map(len, PROT_READ | PROT_WRITE)?;
    for offset in (0..len).step_by(8) {
        // SAFETY: inside the writable mapping made above, which no Rust
        // reference covers.
        unsafe { write_u64(base + offset, PATTERN ^ offset) };
    }
    if unmap {
        mem_unmap(base, len)?;
    }
    let how = if unmap { "unmapped them" } else { "exiting with them mapped" };
    println!("scrub: filled {pages} pages at {base:#x} with a pattern, {how}");
    ipc_send(reader, b"filled")?;
    Ok(0)
}

fn read(pages: u64, filler: u32) -> Result<i32, Error> {
    let mut buffer = [0u8; 16];
    let (sender, _) = ipc_recv(&mut buffer)?;
    // Wait for the filler to be gone, so everything it held has been freed.
    let mut tries = 0u32;
    loop {
        match ipc_send(filler, b"gone?") {
            Err(Error::NoSuchProcess) => break,
            Ok(()) | Err(Error::MailboxFull) if tries < 100_000 => {
                tries += 1;
                yield_now();
            }
            Ok(()) | Err(Error::MailboxFull) => {
                println!("scrub: pid {filler} never exited");
                return Ok(1);
            }
            Err(error) => return Err(error),
        }
    }
    let len = pages * PAGE_SIZE;
    let base = mem_map(len, PROT_READ | PROT_WRITE)?;
    let mut non_zero = 0u64;
    for offset in (0..len).step_by(8) {
        // SAFETY: inside the mapping made above, which no Rust reference covers.
        let word = unsafe { read_u64(base + offset) };
        non_zero += u64::from(word.to_le_bytes().iter().filter(|&&b| b != 0).count() as u8);
    }
    println!("scrub: pid {sender} filled memory; read {pages} fresh pages: {non_zero} non-zero bytes");
    Ok(i32::from(non_zero != 0))
}

fn main(args: &[u8]) -> i32 {
    let number = |key| arg(args, key).and_then(parse_i64).map(|n| n.max(0) as u64);
    let pages = number("pages").unwrap_or(256);
    let result = match (arg(args, "mode"), number("reader"), number("filler")) {
        (Some(b"fill"), Some(reader), _) => fill(pages, reader as u32, number("unmap") != Some(0)),
        (Some(b"read"), _, Some(filler)) => read(pages, filler as u32),
        _ => {
            println!("scrub: usage: mode=fill pages=N reader=PID [unmap=0] | mode=read pages=N filler=PID");
            return 2;
        }
    };
    result.unwrap_or_else(|error| {
        println!("scrub: unexpected error: {error}");
        1
    })
}

superos_rt::entry!(main, "mode=fill|read [pages=<n>] [reader=<pid>] [filler=<pid>] [unmap=0|1]");
