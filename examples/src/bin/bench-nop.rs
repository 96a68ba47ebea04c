//! `bench-nop`: the smallest process, for `superos-vmm bench`. With no
//! arguments it exits 0 at once (boot and spawn+exit figures); with `wait`
//! it blocks in `ipc_recv` until any message arrives, then exits 0 (so
//! several can be alive at once for the memory-overhead figure).
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use superos_rt::ipc_recv;

fn main(args: &[u8]) -> i32 {
    if args == b"wait" {
        let mut buffer = [0u8; 16];
        if ipc_recv(&mut buffer).is_err() {
            return 1;
        }
    }
    0
}

superos_rt::entry!(main, "[<wait>]");
