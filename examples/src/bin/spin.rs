//! `spin`: computes forever without a system call. Only preemption keeps the
//! rest of the system running, and only the VMM's watchdog (or the end of the
//! scenario's other work, if it is marked as expected to be unfinished) stops it.
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

superos_rt::entry!(main);
