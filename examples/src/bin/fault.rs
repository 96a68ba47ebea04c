//! `fault`: commits one memory violation, chosen with `kind=<name>`, so the
//! tests can check that the kernel terminates the offender with the right
//! fault (and nothing else). It says what it is about to do first; if it is
//! still alive afterwards it prints `SURVIVED` and exits 1.
//!
//! Kinds (and the fault the kernel must report):
//! `unmapped` (unmapped-access), `stack-guard` (stack-guard),
//! `write-code` (write-to-code), `write-rodata` (write-to-read-only),
//! `exec-heap` and `exec-stack` (execute-non-executable), `kernel-read` and
//! `kernel-write` (kernel-access), `write-protected` (write-to-read-only:
//! mem_map read-write, write, mem_protect to read-only, write; with
//! `yields=<n>` it yields n times after the first write and n times again
//! after the mem_protect, so on several CPUs the process may migrate between
//! the write, the protect and the faulting write; before that write it
//! reads the page back, and prints `WRONG` and exits 1 unless it reads 1),
//! `write-read-only-map` (write-to-read-only: write to a PROT_READ mapping),
//! `use-after-unmap` (unmapped-access), `guard-overflow` (unmapped-access:
//! one byte past a one-page mapping, in its guard page), `exec-kernel`
//! (kernel-access: call into kernel text), `gate-offset` (illegal-gate-entry:
//! call the gate page at an offset other than its stub), `raw-int3`
//! (illegal-gate-entry: an `int3` outside the gate), `raw-syscall`
//! (a `syscall` instruction outside the gate: illegal-gate-entry where
//! `syscall` reaches ring 0, kernel-access on the PVM host where it jumps to
//! the kernel entry still in ring 3), `privileged` (general-protection: `cli`
//! in ring 3), `peek` (unmapped-access: read where another process has its
//! first mapping, `addr=` to override).
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use core::hint::black_box;
use superos_rt::{
    arg, mem_map, mem_protect, mem_unmap, parse_i64, println, read_u64, write_u64, write_u8, yield_now,
    Error, PAGE_SIZE, PROT_READ, PROT_WRITE,
};

/// An address in the user image window that no program occupies.
const UNMAPPED: u64 = 0x2000_0000;
/// An address in the kernel image.
const KERNEL: u64 = 0xffff_ffff_8010_0000;

/// Lives in the program's read-only data.
static READ_ONLY: u64 = 0x5eed;

/// Calls the machine code at `addr` (a lone `ret`).
///
/// # Safety
/// Deliberately unsound: `addr` is never executable, the call must fault.
unsafe fn call_at(addr: u64) {
    // SAFETY: a data pointer to a function pointer of the same size; calling
    // it is the violation this program exists to commit.
    let function: extern "C" fn() = unsafe { core::mem::transmute(addr as *const ()) };
    function();
}

/// Recurses with a 512-byte frame until the stack guard page stops it.
fn recurse(depth: u64) -> u64 {
    let frame = black_box([depth as u8; 512]);
    if black_box(depth) == u64::MAX {
        return u64::from(frame[0]);
    }
    recurse(depth + 1).wrapping_add(u64::from(frame[depth as usize % 512]))
}

/// Maps one page with `prot`, or reports why it could not.
fn map_page(prot: u64) -> Result<u64, Error> {
    let addr = mem_map(PAGE_SIZE, prot)?;
    println!("fault: mapped a page at {addr:#x}");
    Ok(addr)
}

/// Gives up the CPU `times` times (the kernel may run this process on
/// another CPU after each).
fn yield_times(times: i64) {
    for _ in 0..times {
        yield_now();
    }
}

/// The `addr=` argument, if given (hexadecimal with 0x, or decimal).
fn arg_addr(args: &[u8]) -> Option<u64> {
    let text = core::str::from_utf8(arg(args, "addr")?).ok()?;
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

fn commit(kind: &str, args: &[u8]) -> Result<(), Error> {
    match kind {
        "unmapped" => {
            println!("fault: reading unmapped address {UNMAPPED:#x}");
            // SAFETY: deliberately not: the read must fault.
            black_box(unsafe { read_u64(UNMAPPED) });
        }
        "stack-guard" => {
            println!("fault: recursing until the stack runs into its guard page");
            black_box(recurse(0));
        }
        "write-code" => {
            let target = main as *const () as u64;
            println!("fault: writing to my own code at {target:#x}");
            // SAFETY: deliberately not: the write must fault.
            unsafe { write_u8(target, 0xc3) };
        }
        "write-rodata" => {
            let target = &raw const READ_ONLY as u64;
            println!("fault: writing to my read-only data at {target:#x}");
            // SAFETY: deliberately not: the write must fault.
            unsafe { write_u64(target, 1) };
        }
        "exec-heap" => {
            let addr = map_page(PROT_READ | PROT_WRITE)?;
            // SAFETY: the page was just mapped writable and nothing else uses it.
            unsafe { write_u8(addr, 0xc3) };
            println!("fault: executing a `ret` written to mapped memory at {addr:#x}");
            // SAFETY: deliberately not: the fetch must fault.
            unsafe { call_at(addr) };
        }
        "exec-stack" => {
            let code = black_box([0xc3u8; 16]);
            let addr = code.as_ptr() as u64;
            println!("fault: executing a `ret` on my stack at {addr:#x}");
            // SAFETY: deliberately not: the fetch must fault.
            unsafe { call_at(addr) };
            black_box(code);
        }
        "kernel-read" => {
            println!("fault: reading kernel address {KERNEL:#x}");
            // SAFETY: deliberately not: the read must fault.
            black_box(unsafe { read_u64(KERNEL) });
        }
        "kernel-write" => {
            println!("fault: writing kernel address {KERNEL:#x}");
            // SAFETY: deliberately not: the write must fault.
            unsafe { write_u64(KERNEL, 0) };
        }
        "write-protected" => {
            let yields = arg(args, "yields").and_then(parse_i64).unwrap_or(0).max(0);
            let addr = map_page(PROT_READ | PROT_WRITE)?;
            // SAFETY: the page was just mapped writable and nothing else uses it.
            unsafe { write_u64(addr, 1) };
            yield_times(yields);
            mem_protect(addr, PAGE_SIZE, PROT_READ)?;
            yield_times(yields);
            // SAFETY: the page is mapped (read-only now) and nothing else uses it.
            let value = unsafe { read_u64(addr) };
            if value != 1 {
                println!("fault: read {value} from {addr:#x} after protecting it, expected 1: WRONG");
                superos_rt::exit(1);
            }
            println!("fault: writing to {addr:#x} after protecting it read-only");
            // SAFETY: deliberately not: the write must fault.
            unsafe { write_u64(addr, 2) };
        }
        "write-read-only-map" => {
            let addr = map_page(PROT_READ)?;
            println!("fault: writing to read-only mapping at {addr:#x}");
            // SAFETY: deliberately not: the write must fault.
            unsafe { write_u64(addr, 1) };
        }
        "use-after-unmap" => {
            let addr = map_page(PROT_READ | PROT_WRITE)?;
            // SAFETY: the page was just mapped writable and nothing else uses it.
            unsafe { write_u64(addr, 1) };
            mem_unmap(addr, PAGE_SIZE)?;
            println!("fault: reading {addr:#x} after unmapping it");
            // SAFETY: deliberately not: the read must fault.
            black_box(unsafe { read_u64(addr) });
        }
        "guard-overflow" => {
            let addr = map_page(PROT_READ | PROT_WRITE)?;
            let past = addr + PAGE_SIZE;
            println!("fault: writing one byte past the mapping, at {past:#x}");
            // SAFETY: deliberately not: the guard page is unmapped.
            unsafe { write_u8(past, 1) };
        }
        "exec-kernel" => {
            println!("fault: calling kernel text at {KERNEL:#x}");
            // SAFETY: deliberately not: kernel pages are supervisor-only.
            unsafe { call_at(KERNEL) };
        }
        "gate-offset" => {
            let target = superos_protocol::layout::GATE_VA + 0x10;
            println!("fault: calling the gate page at {target:#x}, past its stub");
            // SAFETY: deliberately not: only the stub is a valid entry.
            unsafe { call_at(target) };
        }
        "raw-int3" => {
            println!("fault: executing int3 outside the gate");
            // SAFETY: deliberately not: system calls only enter through the gate.
            unsafe { core::arch::asm!("int3") };
        }
        "raw-syscall" => {
            println!("fault: executing syscall outside the gate");
            // SAFETY: deliberately not: system calls only enter through the gate.
            unsafe { core::arch::asm!("syscall", out("rcx") _, out("r11") _, inout("rax") 4u64 => _) };
        }
        "privileged" => {
            println!("fault: executing cli in ring 3");
            // SAFETY: deliberately not: cli is privileged.
            unsafe { core::arch::asm!("cli") };
        }
        "peek" => {
            let addr = arg_addr(args).unwrap_or(superos_protocol::layout::USER_MMAP_BASE);
            println!("fault: reading {addr:#x}, where another process has memory");
            // SAFETY: deliberately not: this process maps nothing there.
            black_box(unsafe { read_u64(addr) });
        }
        other => {
            println!("fault: unknown kind {other:?}");
            return Err(Error::InvalidArgument);
        }
    }
    Ok(())
}

fn main(args: &[u8]) -> i32 {
    let Some(kind) = arg(args, "kind").and_then(|k| core::str::from_utf8(k).ok()) else {
        println!("fault: usage: kind=<name>");
        return 2;
    };
    match commit(kind, args) {
        Ok(()) => println!("fault: {kind}: SURVIVED"),
        Err(error) => println!("fault: {kind}: could not set up: {error}"),
    }
    1
}

superos_rt::entry!(main, "kind=<fault, see fault.rs> [addr=<hex>] [yields=<n>]");
