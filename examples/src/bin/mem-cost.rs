//! `mem-cost`: measures memory-call costs with the TSC and prints them in
//! cycles and ns: `mem_map` + first touch + `mem_unmap` of one page, and the
//! demand-zero fault alone (writing a fresh page minus writing a resident
//! one). Arguments: `n=<pages>` (default 256).
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use superos_rt::{
    arg, cycles_to_ns, mem_map, mem_unmap, parse_i64, println, rdtsc, write_u64, Error, PAGE_SIZE, PROT_READ,
    PROT_WRITE,
};

const RW: u64 = PROT_READ | PROT_WRITE;

/// Writes one word of each of `pages` pages at `base`; returns the mean
/// cycles per write.
fn touch_each(base: u64, pages: u64) -> u64 {
    let mut cycles = 0;
    for page in 0..pages {
        let start = rdtsc();
        // SAFETY: inside a writable mapping of `pages` pages made by the
        // caller, which no Rust reference covers.
        unsafe { write_u64(base + page * PAGE_SIZE, page) };
        cycles += rdtsc().wrapping_sub(start);
    }
    cycles / pages
}

fn measure(n: u64) -> Result<(), Error> {
    let start = rdtsc();
    for i in 0..n {
        let addr = mem_map(PAGE_SIZE, RW)?;
        // SAFETY: the page was just mapped writable; no reference covers it.
        unsafe { write_u64(addr, i) };
        mem_unmap(addr, PAGE_SIZE)?;
    }
    let cycle = rdtsc().wrapping_sub(start) / n;
    println!(
        "mem-cost: mem_map + first touch + mem_unmap of 1 page: {cycle} cycles = {} ns ({n} rounds)",
        cycles_to_ns(cycle)
    );

    let base = mem_map(n * PAGE_SIZE, RW)?;
    let fresh = touch_each(base, n);
    let resident = touch_each(base, n);
    mem_unmap(base, n * PAGE_SIZE)?;
    let fault = fresh.saturating_sub(resident);
    println!(
        "mem-cost: demand-zero fault: {fault} cycles = {} ns (fresh write {fresh}, resident write {resident} cycles; {n} pages)",
        cycles_to_ns(fault)
    );
    Ok(())
}

fn main(args: &[u8]) -> i32 {
    let n = arg(args, "n").and_then(parse_i64).unwrap_or(256).max(1) as u64;
    match measure(n) {
        Ok(()) => 0,
        Err(error) => {
            println!("mem-cost: {error}");
            1
        }
    }
}

superos_rt::entry!(main, "[n=<pages>]");
