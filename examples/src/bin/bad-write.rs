//! `bad-write`: calls `write` with invalid buffers and checks that each comes
//! back as the right typed error instead of a fault. Exits 0 when every case
//! behaves, 1 otherwise.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use superos_protocol::layout::{GATE_VA, USER_HALF_END};
use superos_protocol::syscall::{decode_result, SysError, Syscall};
use superos_rt::{println, raw};

fn main(_args: &[u8]) -> i32 {
    let cases: [(&str, u64, u64, SysError); 6] = [
        ("kernel-half pointer", 0xffff_ffff_8010_0000, 16, SysError::BadAddress),
        ("unmapped pointer", 0x1000, 16, SysError::BadAddress),
        ("non-canonical pointer", USER_HALF_END, 1, SysError::BadAddress),
        ("overflowing range", u64::MAX - 3, 16, SysError::Overflow),
        ("huge length", GATE_VA, 1 << 40, SysError::TooLarge),
        ("range running off the gate page", GATE_VA + 4000, 200, SysError::BadAddress),
    ];
    let mut failures = 0;
    for (name, pointer, len, expected) in cases {
        // SAFETY: the kernel only reads from the buffer; these are bad on purpose.
        let result = decode_result(unsafe { raw::syscall(Syscall::Write as u64, pointer, len, 0, 0, 0) });
        let ok = result == Err(expected);
        failures += u32::from(!ok);
        println!("bad-write: {name}: {result:?} ({})", if ok { "as expected" } else { "WRONG" });
    }
    // SAFETY: an unknown system call number has no arguments to check.
    let unknown = decode_result(unsafe { raw::syscall(0xdead, 0, 0, 0, 0, 0) });
    failures += u32::from(unknown != Err(SysError::NoSys));
    println!("bad-write: unknown system call: {unknown:?}");
    i32::from(failures > 0)
}

superos_rt::entry!(main, "");
