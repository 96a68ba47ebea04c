//! `spin`: computes forever without a system call. Only preemption keeps the
//! rest of the system running, and only the VMM's watchdog (`--timeout`)
//! stops it: a run with `spin` in it ends as a timeout, whatever the other
//! processes did (there is no "expected unfinished" outcome).
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use superos_rt::println;

fn main(_args: &[u8]) -> i32 {
    println!("spin: spinning forever");
    let mut counter = 0u64;
    loop {
        counter = core::hint::black_box(counter.wrapping_add(1));
    }
}

superos_rt::entry!(main, "");
