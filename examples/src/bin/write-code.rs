//! `write-code`: tries to overwrite its own code. Code pages are mapped
//! read-only, so the kernel must terminate it with a `write-to-code` fault;
//! reaching the end means W^X is broken.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use superos_rt::println;

fn main(_args: &[u8]) -> i32 {
    let target = main as *const () as *mut u8;
    println!("write-code: writing to my own code at {target:p}");
    // SAFETY: deliberately not: this write must fault.
    unsafe { core::ptr::write_volatile(target, 0xc3) };
    println!("write-code: the write succeeded: W^X IS BROKEN");
    1
}

superos_rt::entry!(main, "");
