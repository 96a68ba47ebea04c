//! `hello`: prints a greeting from ring 3, computes for a while without any
//! system call (so only the timer can take the CPU away), and exits 0.
//! Arguments: `spin=<ms>` (default 40): compute until that much time has
//! passed; or `work=<n>`: compute a fixed `n` million steps, however long
//! that takes (what a throughput measurement needs: on a shared CPU it
//! takes longer).
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use superos_rt::{arg, getpid, parse_i64, println, spin_ms};

/// `millions` million steps of a 64-bit linear congruential generator.
fn work(millions: u64) -> u64 {
    let mut x = 1u64;
    for _ in 0..millions * 1_000_000 {
        x = core::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
    }
    x
}

fn main(args: &[u8]) -> i32 {
    let pid = getpid();
    if let Some(millions) = arg(args, "work").and_then(parse_i64) {
        let millions = millions.max(0) as u64;
        println!("hello from ring 3: pid {pid} begins ({millions} million steps of computing)");
        let x = work(millions);
        println!("hello from ring 3: pid {pid} ends ({x:#x})");
        return 0;
    }
    let spin = arg(args, "spin").and_then(parse_i64).unwrap_or(40).max(0) as u64;
    println!("hello from ring 3: pid {pid} begins ({spin} ms of computing)");
    spin_ms(spin);
    println!("hello from ring 3: pid {pid} ends");
    0
}

superos_rt::entry!(main, "[spin=<ms>] [work=<millions>]");
