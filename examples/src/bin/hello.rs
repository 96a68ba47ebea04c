//! `hello`: prints a greeting from ring 3, computes for a while without any
//! system call (so only the timer can take the CPU away), and exits 0.
//! Arguments: `spin=<ms>` (default 40).
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use superos_rt::{arg, getpid, parse_i64, println, spin_ms};

fn main(args: &[u8]) -> i32 {
    let pid = getpid();
    let spin = arg(args, "spin").and_then(parse_i64).unwrap_or(40).max(0) as u64;
    println!("hello from ring 3: pid {pid} begins ({spin} ms of computing)");
    spin_ms(spin);
    println!("hello from ring 3: pid {pid} ends");
    0
}

superos_rt::entry!(main, "[spin=<ms>]");
