//! `superos_rt`: the runtime every SuperOS user program links against.
//!
//! It provides the entry point (`_start`, which calls the function named with
//! [`entry!`] and exits with its result), system-call wrappers that go through
//! the kernel's gate page (so the same binary runs whichever entry instruction
//! the kernel chose), console printing, and a panic handler that prints the
//! panic and exits with code 101.
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]

use core::fmt::Write;
use superos_protocol::layout::{GATE_INFO_OFFSET, GATE_VA};
use superos_protocol::syscall::{decode_result, GateInfo, SysError, Syscall};

pub use superos_protocol::syscall::SysError as Error;

/// Raw system calls through the gate page.
pub mod raw {
    use super::GATE_VA;

    /// Performs system call `number` with up to five arguments and returns the
    /// raw `rax`.
    ///
    /// # Safety
    /// Pointer arguments must describe memory the kernel may read or write as
    /// the call documents; the kernel checks them, but a program that hands it
    /// a pointer into its own live data gets that data overwritten.
    #[inline(always)]
    pub unsafe fn syscall(number: u64, a0: u64, a1: u64, a2: u64, a3: u64, a4: u64) -> u64 {
        let rax;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the gate stub enters the kernel, which preserves every
        // register but rax (result), rcx and r11 (clobbered by `syscall`).
        unsafe {
            core::arch::asm!(
                "call {gate}",
                gate = in(reg) GATE_VA,
                inlateout("rax") number => rax,
                in("rdi") a0,
                in("rsi") a1,
                in("rdx") a2,
                in("r10") a3,
                in("r8") a4,
                lateout("rcx") _,
                lateout("r11") _,
            );
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (number, a0, a1, a2, a3, a4);
            rax = u64::MAX;
        }
        rax
    }
}

fn call(number: Syscall, a0: u64, a1: u64) -> Result<u64, SysError> {
    // SAFETY: every wrapper below passes pointers derived from live slices.
    decode_result(unsafe { raw::syscall(number as u64, a0, a1, 0, 0, 0) })
}

/// Writes `bytes` to the console; returns the number of bytes written.
pub fn write(bytes: &[u8]) -> Result<u64, SysError> {
    call(Syscall::Write, bytes.as_ptr() as u64, bytes.len() as u64)
}

/// Terminates the calling process with `code`.
pub fn exit(code: i32) -> ! {
    let _ = call(Syscall::Exit, code as i64 as u64, 0);
    // The kernel never returns from exit; if it did, fault rather than run on.
    loop {
        core::hint::spin_loop();
    }
}

/// Gives up the rest of the time slice.
pub fn yield_now() {
    let _ = call(Syscall::Yield, 0, 0);
}

/// The caller's process id.
pub fn getpid() -> u32 {
    call(Syscall::GetPid, 0, 0).unwrap_or(0) as u32
}

/// The read-only information the kernel publishes in the gate page.
pub fn gate_info() -> GateInfo {
    // SAFETY: the kernel maps the gate page read-only in every process, with a
    // GateInfo at this offset.
    unsafe { core::ptr::read_volatile((GATE_VA + GATE_INFO_OFFSET) as *const GateInfo) }
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc is allowed in ring 3 (CR4.TSD is clear).
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    0
}

/// Spins for about `ms` milliseconds of TSC time without any system call.
pub fn spin_ms(ms: u64) {
    let khz = gate_info().tsc_khz.max(1);
    let start = rdtsc();
    while rdtsc().wrapping_sub(start) < ms * khz {
        core::hint::spin_loop();
    }
}

/// Parses a decimal integer (with optional leading `-`) from argument bytes.
pub fn parse_i64(text: &[u8]) -> Option<i64> {
    let text = core::str::from_utf8(text).ok()?.trim();
    text.parse().ok()
}

/// Looks up `key=value` in a space-separated argument string.
pub fn arg<'a>(args: &'a [u8], key: &str) -> Option<&'a [u8]> {
    args.split(|&b| b == b' ').find_map(|word| {
        let rest = word.strip_prefix(key.as_bytes())?;
        rest.strip_prefix(b"=")
    })
}

/// Console output with `core::fmt`, through a fixed stack buffer (one
/// `write` system call per [`print!`]/[`println!`]).
pub struct Console {
    buffer: [u8; 256],
    len: usize,
}

impl Console {
    /// An empty line buffer.
    pub const fn new() -> Self {
        Console {
            buffer: [0; 256],
            len: 0,
        }
    }
    /// Sends the buffered bytes.
    pub fn flush(&mut self) {
        if self.len > 0 {
            let _ = write(&self.buffer[..self.len]);
            self.len = 0;
        }
    }
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for Console {
    fn write_str(&mut self, text: &str) -> core::fmt::Result {
        for chunk in text.as_bytes().chunks(self.buffer.len()) {
            if self.len + chunk.len() > self.buffer.len() {
                self.flush();
            }
            self.buffer[self.len..self.len + chunk.len()].copy_from_slice(chunk);
            self.len += chunk.len();
        }
        Ok(())
    }
}

/// Prints formatted text to the console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let mut console = $crate::Console::new();
        let _ = core::fmt::Write::write_fmt(&mut console, format_args!($($arg)*));
        console.flush();
    }};
}

/// Prints formatted text and a newline to the console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        let mut console = $crate::Console::new();
        let _ = core::fmt::Write::write_fmt(&mut console, format_args!($($arg)*));
        let _ = core::fmt::Write::write_str(&mut console, "\n");
        console.flush();
    }};
}

/// Declares the program's main function: `fn(args: &[u8]) -> i32`. The
/// runtime's `_start` calls it and exits with the value it returns.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[no_mangle]
        extern "C" fn __superos_main(args: *const u8, len: usize) -> ! {
            // SAFETY: the kernel passes a pointer to `len` argument bytes it
            // copied to the top of this process's stack.
            let args = unsafe { core::slice::from_raw_parts(args, len) };
            let main: fn(&[u8]) -> i32 = $main;
            $crate::exit(main(args))
        }
    };
}

#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
    .section .text.entry, "ax"
    .global _start
_start:
    // rdi = argument bytes, rsi = their length (from the kernel).
    and rsp, -16
    xor ebp, ebp
    call __superos_main
    ud2
"#
);

#[cfg(target_os = "none")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("panic: {}", info);
    exit(101)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse() {
        assert_eq!(arg(b"spin=30 name=x", "spin"), Some(&b"30"[..]));
        assert_eq!(arg(b"spin=30 name=x", "name"), Some(&b"x"[..]));
        assert_eq!(arg(b"spinning=3", "spin"), None);
        assert_eq!(parse_i64(b" -42 "), Some(-42));
        assert_eq!(parse_i64(b"4x"), None);
    }
}
