//! `yield-turns`: prints `turn <i>` and yields, `n` times (default 5), so two
//! instances take turns on the CPU. Arguments: `n=<turns>`.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use superos_protocol::syscall::{decode_result, Syscall};
use superos_rt::{arg, parse_i64, println, raw};

fn main(args: &[u8]) -> i32 {
    let turns = arg(args, "n").and_then(parse_i64).unwrap_or(5).max(0);
    for turn in 0..turns {
        println!("turn {turn}");
        // SAFETY: yield takes no arguments.
        let result = decode_result(unsafe { raw::syscall(Syscall::Yield as u64, 0, 0, 0, 0, 0) });
        if result != Ok(0) {
            println!("yield returned {result:?}");
            return 1;
        }
    }
    0
}

superos_rt::entry!(main, "[n=<turns>]");
