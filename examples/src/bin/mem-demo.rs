//! `mem-demo`: exercises `mem_map`, `mem_stat`, `mem_protect` and `mem_unmap`,
//! including every argument error they document, and checks that mapped
//! memory is demand-zero (resident only once touched). Prints one line per
//! check, ending in `(as expected)` or `WRONG`; exits 0 iff every check is as
//! expected. Run it without quotas.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use superos_protocol::syscall::{decode_result, Syscall};
use superos_rt::{
    mem_map, mem_protect, mem_stat, mem_unmap, println, raw, read_u64, write_u64, Checks, Error, MemStat,
    PAGE_SIZE, PROT_EXEC, PROT_READ, PROT_WRITE,
};

/// Where the kernel places the first mapping.
const MAP_BASE: u64 = 0x1_0000_0000;
/// The largest single mapping.
const MAP_MAX: u64 = 1 << 30;
/// An address in the kernel half.
const KERNEL: u64 = 0xffff_ffff_8010_0000;
/// An address in the image window that nothing occupies.
const UNMAPPED: u64 = 0x2000_0000;
/// Read-write.
const RW: u64 = PROT_READ | PROT_WRITE;

/// Read-only data the kernel must refuse to write a MemStat into.
static RODATA: [u64; 7] = [0x5eed; 7];

/// `mem_stat` into an arbitrary address.
fn stat_into(addr: u64) -> Result<u64, Error> {
    // SAFETY: the kernel may write 56 bytes at `addr`: an address it must refuse (nothing is
    // written) or a mapping that no Rust reference covers.
    decode_result(unsafe { raw::syscall(Syscall::MemStat as u64, addr, 0, 0, 0, 0) })
}

fn stat() -> MemStat {
    mem_stat().unwrap_or_default()
}

/// Reads the `u64` at `addr` of a live mapping.
fn peek(addr: u64) -> u64 {
    // SAFETY: callers pass aligned addresses inside readable mappings they made (which no Rust reference
    // covers) or inside this program's own read-only data (which nothing mutates, so a read cannot race).
    unsafe { read_u64(addr) }
}

/// Writes the `u64` at `addr` of a live writable mapping.
fn poke(addr: u64, value: u64) {
    // SAFETY: callers pass aligned addresses inside writable mappings they
    // made, which no Rust reference covers.
    unsafe { write_u64(addr, value) }
}

fn map_arguments(checks: &mut Checks) {
    let cases: [(&str, u64, u64, Error); 7] = [
        ("mem_map of length 0", 0, RW, Error::InvalidArgument),
        ("mem_map of 1 GiB + 1", MAP_MAX + 1, RW, Error::TooLarge),
        ("mem_map executable", PAGE_SIZE, PROT_READ | PROT_EXEC, Error::NotPermitted),
        ("mem_map writable and executable", PAGE_SIZE, RW | PROT_EXEC, Error::NotPermitted),
        ("mem_map write without read", PAGE_SIZE, PROT_WRITE, Error::InvalidArgument),
        ("mem_map with an unknown prot bit", PAGE_SIZE, PROT_READ | 8, Error::InvalidArgument),
        ("mem_map with no rights", PAGE_SIZE, 0, Error::InvalidArgument),
    ];
    for (what, len, prot, want) in cases {
        checks.expect(what, mem_map(len, prot), Err(want));
    }
    // Exactly 1 GiB is allowed (nothing becomes resident).
    let big = mem_map(MAP_MAX, RW);
    if checks.record("mem_map of exactly 1 GiB", big.is_ok(), &big) {
        if let Ok(addr) = big {
            checks.expect("mem_unmap of the 1 GiB mapping", mem_unmap(addr, MAP_MAX), Ok(()));
        }
    }
}

fn range_arguments(checks: &mut Checks, base: u64, len: u64) {
    let guard = base + len;
    let bad: [(&str, u64, u64, Error); 8] = [
        ("unaligned address", base + 1, PAGE_SIZE, Error::Unaligned),
        ("length 0", base, 0, Error::InvalidArgument),
        ("overflowing range", u64::MAX - PAGE_SIZE + 1, 2 * PAGE_SIZE, Error::Overflow),
        ("kernel-half range", KERNEL, PAGE_SIZE, Error::BadAddress),
        ("unmapped range", UNMAPPED, PAGE_SIZE, Error::BadAddress),
        ("the guard page", guard, PAGE_SIZE, Error::BadAddress),
        ("a mapping plus its guard page", base, len + PAGE_SIZE, Error::BadAddress),
        ("own code", main as *const () as u64 & !(PAGE_SIZE - 1), PAGE_SIZE, Error::BadAddress),
    ];
    for (what, addr, len, want) in bad {
        checks.expect(format_args!("mem_unmap of {what}"), mem_unmap(addr, len), Err(want));
        checks.expect(format_args!("mem_protect of {what}"), mem_protect(addr, len, PROT_READ), Err(want));
    }
    // Nothing changed: the data is still there and still writable.
    poke(base, 0x1111);
    checks.expect("mapping intact after refused calls", peek(base), 0x1111);
}

fn stat_targets(checks: &mut Checks) {
    let rodata = &raw const RODATA as u64;
    checks.expect("mem_stat into own rodata", stat_into(rodata), Err(Error::BadAddress));
    let unchanged = (0..7).all(|i| peek(rodata + 8 * i) == 0x5eed);
    checks.record("rodata unchanged", unchanged, &unchanged);
    let code = main as *const () as u64;
    checks.expect("mem_stat into own code", stat_into(code), Err(Error::BadAddress));
    checks.expect("mem_stat into the kernel half", stat_into(KERNEL), Err(Error::BadAddress));
    checks.expect("mem_stat into unmapped memory", stat_into(UNMAPPED), Err(Error::BadAddress));
    match mem_map(PAGE_SIZE, PROT_READ) {
        Ok(addr) => {
            checks.expect("mem_stat into a read-only mapping", stat_into(addr), Err(Error::BadAddress));
            checks.expect("read-only mapping still zero", peek(addr), 0);
            checks.expect("mem_unmap of the read-only mapping", mem_unmap(addr, PAGE_SIZE), Ok(()));
        }
        Err(error) => {
            checks.record("mem_map read-only page", false, &error);
        }
    }
    match mem_map(PAGE_SIZE, RW) {
        Ok(addr) => {
            checks.expect("mem_stat into an untouched writable mapping", stat_into(addr), Ok(0));
            let virtual_bytes = peek(addr);
            let current = stat().virtual_bytes;
            checks.expect("its virtual_bytes", virtual_bytes, current);
            checks.expect("mem_unmap of the stat page", mem_unmap(addr, PAGE_SIZE), Ok(()));
        }
        Err(error) => {
            checks.record("mem_map writable page", false, &error);
        }
    }
}

fn demand_zero(checks: &mut Checks, base: u64, pages: u64) {
    let before = stat();
    for page in [0, 2] {
        poke(base + page * PAGE_SIZE, 0xa5a5_0000 + page);
    }
    let after = stat();
    checks.expect(
        "resident growth after writing 2 pages",
        after.resident_bytes.wrapping_sub(before.resident_bytes),
        2 * PAGE_SIZE,
    );
    checks.expect("virtual size unchanged by touching", after.virtual_bytes, before.virtual_bytes);
    let zero = (0..pages)
        .filter(|page| *page != 0 && *page != 2)
        .all(|page| peek(base + page * PAGE_SIZE) == 0 && peek(base + page * PAGE_SIZE + PAGE_SIZE - 8) == 0);
    checks.record("untouched pages read as zero", zero, &zero);
    checks.expect(
        "written values read back",
        (peek(base), peek(base + 2 * PAGE_SIZE)),
        (0xa5a5_0000, 0xa5a5_0002),
    );
}

fn protect(checks: &mut Checks, base: u64) {
    checks.expect("mem_protect read-write to read-only", mem_protect(base, PAGE_SIZE, PROT_READ), Ok(()));
    checks.expect("protected page still readable", peek(base), 0x1111);
    checks.expect(
        "mem_protect back to read-write",
        mem_protect(base, PAGE_SIZE, RW),
        Err(Error::NotPermitted),
    );
    checks.expect(
        "mem_protect to executable",
        mem_protect(base + PAGE_SIZE, PAGE_SIZE, PROT_READ | PROT_EXEC),
        Err(Error::NotPermitted),
    );
    // The neighbouring page keeps its rights.
    poke(base + PAGE_SIZE, 7);
    checks.expect("neighbour page still writable", peek(base + PAGE_SIZE), 7);
}

fn unmap(checks: &mut Checks, base: u64, pages: u64) {
    let before = stat();
    checks.expect("partial mem_unmap of page 2", mem_unmap(base + 2 * PAGE_SIZE, PAGE_SIZE), Ok(()));
    let after = stat();
    checks.expect("virtual shrink", before.virtual_bytes.wrapping_sub(after.virtual_bytes), PAGE_SIZE);
    checks.expect(
        "resident shrink (page 2 was touched)",
        before.resident_bytes.wrapping_sub(after.resident_bytes),
        PAGE_SIZE,
    );
    checks.expect(
        "mem_unmap of page 2 again",
        mem_unmap(base + 2 * PAGE_SIZE, PAGE_SIZE),
        Err(Error::BadAddress),
    );
    checks.expect("mem_unmap across the hole", mem_unmap(base, 4 * PAGE_SIZE), Err(Error::BadAddress));
    checks.expect("page 0 intact", peek(base), 0x1111);
    checks.expect("mem_unmap of pages 0-1", mem_unmap(base, 2 * PAGE_SIZE), Ok(()));
    checks.expect("mem_unmap of the rest", mem_unmap(base + 3 * PAGE_SIZE, (pages - 3) * PAGE_SIZE), Ok(()));
    checks.expect("double mem_unmap", mem_unmap(base, PAGE_SIZE), Err(Error::BadAddress));
    let end = stat();
    checks.expect(
        "virtual size back to the start",
        before.virtual_bytes.wrapping_sub(end.virtual_bytes),
        pages * PAGE_SIZE,
    );
}

fn main(_args: &[u8]) -> i32 {
    let mut checks = Checks::new("mem-demo");
    let start = match mem_stat() {
        Ok(stat) => stat,
        Err(error) => {
            println!("mem-demo: mem_stat failed: {error} WRONG");
            return 1;
        }
    };
    println!(
        "mem-demo: at start: virtual {} bytes, resident {} bytes",
        start.virtual_bytes, start.resident_bytes
    );
    let ok = start.virtual_bytes >= start.resident_bytes && start.resident_bytes > 0;
    checks.record("start-up usage plausible", ok, &(start.virtual_bytes, start.resident_bytes));

    // 5 pages (the length is rounded up), read-write, demand-zero.
    let pages = 5;
    let base = match mem_map(4 * PAGE_SIZE + 1, RW) {
        Ok(addr) => addr,
        Err(error) => {
            println!("mem-demo: mem_map failed: {error} WRONG");
            return 1;
        }
    };
    checks.expect("first mapping address", base, MAP_BASE);
    let mapped = stat();
    checks.expect(
        "virtual growth (rounded to 5 pages)",
        mapped.virtual_bytes.wrapping_sub(start.virtual_bytes),
        pages * PAGE_SIZE,
    );
    checks.expect("no resident growth before touch", mapped.resident_bytes, start.resident_bytes);
    // First fit after one guard page.
    match mem_map(PAGE_SIZE, PROT_READ) {
        Ok(next) => {
            checks.expect("second mapping after the guard page", next, base + (pages + 1) * PAGE_SIZE);
            checks.expect("unmap second mapping", mem_unmap(next, PAGE_SIZE), Ok(()));
        }
        Err(error) => {
            checks.record("second mem_map", false, &error);
        }
    }

    demand_zero(&mut checks, base, pages);
    map_arguments(&mut checks);
    range_arguments(&mut checks, base, pages * PAGE_SIZE);
    stat_targets(&mut checks);
    protect(&mut checks, base);
    unmap(&mut checks, base, pages);

    checks.finish()
}

superos_rt::entry!(main, "");
