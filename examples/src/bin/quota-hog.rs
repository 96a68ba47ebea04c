//! `quota-hog`: asks for more and more memory, to run into quotas and into the
//! end of guest memory.
//!
//! Arguments: `mode=map|touch|fragment` (default `map`), and the size as `mib=<N>` or
//! `kib=<N>` (default 16 MiB).
//! - `map`: maps 64 KiB read-write chunks (without touching them) until a
//!   call fails or the size is reached; prints how much it got and the error,
//!   and exits 0 iff the error was `quota-exceeded`.
//! - `touch`: maps one read-write region of the size and writes to every page
//!   in turn (each write makes one more page resident), printing progress
//!   every MiB; exits 0 if it touched everything (a quota or the end of guest
//!   memory should have stopped it first, which the scenario says), 1 if the
//!   mapping failed.
//! - `fragment`: maps one read-write region of the size and unmaps every
//!   other page of it, each hole splitting the mapping, until a call fails;
//!   prints how many holes it made and the error, and exits 0 iff the error
//!   was `quota-exceeded` (the map-entry limit, `MAPPINGS_MAX`).
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use superos_rt::{
    arg, mem_map, mem_stat, mem_unmap, parse_i64, println, write_u64, Error, PAGE_SIZE, PROT_READ, PROT_WRITE,
};

const CHUNK: u64 = 64 << 10;

fn report_usage() {
    if let Ok(stat) = mem_stat() {
        println!(
            "quota-hog: virtual {} of {} bytes, resident {} of {} bytes (0 = no quota)",
            stat.virtual_bytes, stat.max_virtual_bytes, stat.resident_bytes, stat.max_resident_bytes
        );
    }
}

fn map_chunks(size: u64) -> i32 {
    let mut got = 0;
    let error = loop {
        if got >= size {
            break None;
        }
        match mem_map(CHUNK, PROT_READ | PROT_WRITE) {
            Ok(_) => got += CHUNK,
            Err(error) => break Some(error),
        }
    };
    report_usage();
    match error {
        Some(error) => {
            println!("quota-hog: mapped {} KiB, then: {error}", got >> 10);
            i32::from(error != Error::QuotaExceeded)
        }
        None => {
            println!("quota-hog: mapped all {} KiB without an error", got >> 10);
            1
        }
    }
}

fn touch_pages(size: u64) -> i32 {
    let base = match mem_map(size, PROT_READ | PROT_WRITE) {
        Ok(addr) => addr,
        Err(error) => {
            println!("quota-hog: mem_map of {} KiB failed: {error}", size >> 10);
            return 1;
        }
    };
    println!("quota-hog: mapped {} KiB at {base:#x}, touching every page", size >> 10);
    let pages = size.div_ceil(PAGE_SIZE);
    for page in 0..pages {
        // SAFETY: the page lies inside the writable mapping made above, which
        // no Rust reference covers.
        unsafe { write_u64(base + page * PAGE_SIZE, page + 1) };
        if (page + 1) % 256 == 0 {
            println!("quota-hog: {} MiB touched", (page + 1) / 256);
        }
    }
    report_usage();
    println!("quota-hog: touched all {} KiB", size >> 10);
    0
}

fn punch_holes(size: u64) -> i32 {
    let base = match mem_map(size, PROT_READ | PROT_WRITE) {
        Ok(addr) => addr,
        Err(error) => {
            println!("quota-hog: mem_map of {} KiB failed: {error}", size >> 10);
            return 1;
        }
    };
    let mut holes = 0;
    let error = loop {
        let hole = base + (2 * holes + 1) * PAGE_SIZE;
        if hole + PAGE_SIZE >= base + size {
            break None;
        }
        match mem_unmap(hole, PAGE_SIZE) {
            Ok(()) => holes += 1,
            Err(error) => break Some(error),
        }
    };
    report_usage();
    match error {
        Some(error) => {
            println!("quota-hog: fragment: punched {holes} holes, then {error}");
            i32::from(error != Error::QuotaExceeded)
        }
        None => {
            println!("quota-hog: fragment: punched {holes} holes without an error");
            1
        }
    }
}

fn main(args: &[u8]) -> i32 {
    let number = |key| arg(args, key).and_then(parse_i64).map(|n| n.max(0) as u64);
    let size = match (number("kib"), number("mib")) {
        (Some(kib), _) => kib << 10,
        (None, Some(mib)) => mib << 20,
        (None, None) => 16 << 20,
    };
    match arg(args, "mode").unwrap_or(b"map") {
        b"map" => map_chunks(size),
        b"touch" => touch_pages(size),
        b"fragment" => punch_holes(size),
        _ => {
            println!("quota-hog: usage: mode=map|touch|fragment mib=<N>|kib=<N>");
            2
        }
    }
}

superos_rt::entry!(main);
