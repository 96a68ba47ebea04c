//! `exit-code`: exits with the code given as its argument (default 3).
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use superos_rt::{parse_i64, println};

fn main(args: &[u8]) -> i32 {
    let code = parse_i64(args).unwrap_or(3) as i32;
    println!("exit-code: exiting with {code}");
    code
}

superos_rt::entry!(main, "[<code>]");
