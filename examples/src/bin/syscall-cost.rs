//! `syscall-cost`: measures the null system-call round trip (`getpid`) from
//! ring 3 with the TSC and prints the mean in cycles and nanoseconds.
//! Arguments: `n=<calls>` (default 20000).
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use superos_rt::{arg, gate_info, getpid, parse_i64, println, rdtsc};

fn main(args: &[u8]) -> i32 {
    let calls = arg(args, "n").and_then(parse_i64).unwrap_or(20_000).max(1) as u64;
    let start = rdtsc();
    for _ in 0..calls {
        core::hint::black_box(getpid());
    }
    let cycles = rdtsc().wrapping_sub(start) / calls;
    let khz = gate_info().tsc_khz;
    let nanos = (cycles * 1_000_000).checked_div(khz).unwrap_or(0);
    let gate = superos_protocol::syscall::gate_kind_name(gate_info().gate_kind);
    println!("syscall-cost: {calls} getpid calls via {gate}: {cycles} cycles = {nanos} ns per round trip");
    0
}

superos_rt::entry!(main, "[n=<calls>]");
