//! The bootable SuperOS kernel binary. All of the code lives in the
//! `guest_kernel` library; this crate only links it with `kernel.ld`.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

#[cfg(target_os = "none")]
pub use guest_kernel::kernel::kernel_main;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("superos-kernel runs only inside superos-vmm; build it for x86_64-unknown-none");
    std::process::exit(2);
}
