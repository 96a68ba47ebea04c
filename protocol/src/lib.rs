//! The SuperOS ABI, shared by the VMM (`superos-vmm`), the guest kernel and the
//! user runtime.
//!
//! Everything that crosses a boundary lives here and nowhere else:
//!
//! * [`layout`]: the guest-physical and virtual memory map (addresses both sides
//!   must agree on).
//! * [`boot`]: the boot-info block the VMM writes before the first instruction.
//! * [`cpu`]: the CPU state the kernel sets up and the VMM checks (descriptor
//!   tables, entry MSRs, control registers, FPU/SIMD policy).
//! * [`hypercall`]: the kernel -> VMM calls (port I/O) and their parameter blocks.
//! * [`syscall`]: the user -> kernel system-call numbers, argument and error encoding.
//! * [`event`]: the kernel event records and the ring the VMM drains.
//! * [`trace`]: the TSC-stamped run and system-call records of a traced run.
//! * [`ownership`]: the frame-ownership encoding shared by kernel and VMM.
//! * [`introspect`]: the kernel's published tables (processes, frame owners,
//!   shared regions) that the VMM checks against the page tables.
//!
//! All shared structures are `#[repr(C)]`, contain no padding and no pointers
//! (guest addresses are plain `u64`), derive zerocopy's byte-level traits so the
//! VMM can read them from untrusted guest memory without `unsafe`, and have
//! compile-time size checks. The crate itself contains no `unsafe` code.
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod boot;
pub mod cpu;
pub mod event;
pub mod hypercall;
pub mod introspect;
pub mod layout;
pub mod ownership;
pub mod syscall;
pub mod trace;

/// Version of the whole ABI in this crate. The VMM writes it into
/// [`boot::BootInfo::version`] and the kernel refuses to boot on a mismatch, so a
/// stale kernel image is reported instead of misinterpreted.
pub const PROTOCOL_VERSION: u32 = 2;

/// Copies `src` into a fixed-size, NUL-padded name field, truncating at a
/// character boundary if needed. Used for process and program names.
pub fn name_to_array<const N: usize>(src: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let mut end = src.len().min(N);
    while !src.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&src.as_bytes()[..end]);
    out
}

/// Reads a NUL-padded name field written by [`name_to_array`]; invalid UTF-8 is
/// replaced by `"?"` rather than trusted.
pub fn name_from_array(bytes: &[u8]) -> &str {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    core::str::from_utf8(&bytes[..len]).unwrap_or("?")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_truncate_on_char_boundary() {
        let a: [u8; 8] = name_to_array("hello");
        assert_eq!(name_from_array(&a), "hello");
        let b: [u8; 4] = name_to_array("abcdef");
        assert_eq!(name_from_array(&b), "abcd");
        // 'é' is two bytes: truncating inside it must back off to a boundary.
        let c: [u8; 4] = name_to_array("abcé");
        assert_eq!(name_from_array(&c), "abc");
        assert_eq!(name_from_array(&[0xff, 0xfe, 0]), "?");
    }
}
