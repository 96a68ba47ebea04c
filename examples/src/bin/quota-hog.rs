//! `quota-hog`: asks for more and more memory, to run into quotas and into the
//! end of guest memory.
//!
//! Arguments: `mode=map|touch|fragment` (default `map`), and the size as `mib=<N>` or
//! `kib=<N>` (default 16 MiB).
//! - `map`: maps 64 KiB read-write chunks (without touching them) until a
//!   call fails or the size is reached; prints how much it got and the error,
//!   and exits 0 iff the error was `quota-exceeded`.
//! - `touch`: maps one read-write region of the size and writes to every page
//!   in turn (each write makes one more page resident), printing progress
//!   every MiB; exits 0 if it touched everything (a quota or the end of guest
//!   memory should have stopped it first, which the scenario says), 1 if the
//!   mapping failed.
//! - `fragment`: maps one read-write region of the size and unmaps every
//!   other page of it, each hole splitting the mapping, until a call fails;
//!   prints how many holes it made and the error, and exits 0 iff the error
//!   was `quota-exceeded` (the map-entry limit, `MAPPINGS_MAX`).
//! - `tables`: makes the kernel build page tables for it (issue 11). First
//!   it maps a region of the size and, 2 MiB at a time, touches one page
//!   (which needs a page table of its own) and unmaps those 2 MiB (which
//!   must free that table again); then it maps a region of the size again and
//!   touches one page per 2 MiB, keeping them, so that every page costs a
//!   page table as well, charged to the resident quota. It should be
//!   terminated (`resident-quota-exceeded`) in the second phase; exits 1 if
//!   it survives, 2 if a call fails.
//! - `syscalls`: makes system calls fault pages in for it (issue 11): maps a
//!   region of the size and hands successive untouched pages of it to
//!   `mem_stat` as its buffer until a call is refused, then hands the next
//!   untouched pages to `write` and to `ipc_recv` (non-blocking). Every one of
//!   these refusals must be `quota-exceeded` with a `QuotaDenied` event
//!   (policy `fail`), or its termination (policy `kill`); exits 0 iff all
//!   three were `quota-exceeded`.
//! - `ranges`: the longest `mem_protect` and `mem_unmap` it can make (issue
//!   11): both on a region of the size left untouched (work that was
//!   proportional to the argument), then on a region of the size with one
//!   page touched per 2 MiB (each with a page table of its own) and
//!   `dense_kib` more touched in a row, write access removed, then
//!   unmapped. Exits 0 if every call succeeded and the pages read back as
//!   written.
//! - `watch`: a bystander that spins for `ms` milliseconds (default 1000)
//!   reading the TSC and prints the longest it waited between two reads (the
//!   time others, and the kernel for them, held the CPU), in microseconds.
//! - `outlive pid=P [and=Q]`: yields until process P (and Q) is gone (it
//!   looks every ~50 ms, with one `ipc_send` each; it never receives), then
//!   exits 0: a process that keeps the kernel running past P's exit, so that
//!   P's exit is an entry of its own and not the kernel's shutdown. It
//!   yields rather than spins so that P, whose long calls go in slices with
//!   the others run in between, gets the CPU back at once and not after a
//!   whole time slice (in a stepped run the timer is slowed 16-fold).
//! - `shm`: the largest shared-region calls it can make (the worst-entry
//!   bench row): creates a region of the size, maps it writable, writes one
//!   word per page, unmaps and destroys it; then, with `exit=1` (the
//!   default), creates and maps one more of the size and exits holding it,
//!   so that the exit tears it down. Exits 0 if every call succeeded.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use superos_rt::{
    arg, mem_map, mem_protect, mem_stat, mem_unmap, parse_i64, println, read_u64, shm_create, shm_destroy,
    shm_map, shm_unmap, write_u64, Error, PAGE_SIZE, PROT_READ, PROT_WRITE, RECV_NONBLOCK, RIGHTS_ALL,
};

const CHUNK: u64 = 64 << 10;

fn report_usage() {
    if let Ok(stat) = mem_stat() {
        println!(
            "quota-hog: virtual {} of {} bytes, resident {} of {} bytes (0 = no quota)",
            stat.virtual_bytes, stat.max_virtual_bytes, stat.resident_bytes, stat.max_resident_bytes
        );
    }
}

fn map_chunks(size: u64) -> i32 {
    let mut got = 0;
    let error = loop {
        if got >= size {
            break None;
        }
        match mem_map(CHUNK, PROT_READ | PROT_WRITE) {
            Ok(_) => got += CHUNK,
            Err(error) => break Some(error),
        }
    };
    report_usage();
    match error {
        Some(error) => {
            println!("quota-hog: mapped {} KiB, then: {error}", got >> 10);
            i32::from(error != Error::QuotaExceeded)
        }
        None => {
            println!("quota-hog: mapped all {} KiB without an error", got >> 10);
            1
        }
    }
}

fn touch_pages(size: u64) -> i32 {
    let base = match mem_map(size, PROT_READ | PROT_WRITE) {
        Ok(addr) => addr,
        Err(error) => {
            println!("quota-hog: mem_map of {} KiB failed: {error}", size >> 10);
            return 1;
        }
    };
    println!("quota-hog: mapped {} KiB at {base:#x}, touching every page", size >> 10);
    let pages = size.div_ceil(PAGE_SIZE);
    for page in 0..pages {
        // SAFETY: the page lies inside the writable mapping made above, which
        // no Rust reference covers.
        unsafe { write_u64(base + page * PAGE_SIZE, page + 1) };
        if (page + 1) % 256 == 0 {
            println!("quota-hog: {} MiB touched", (page + 1) / 256);
        }
    }
    report_usage();
    println!("quota-hog: touched all {} KiB", size >> 10);
    0
}

fn punch_holes(size: u64) -> i32 {
    let base = match mem_map(size, PROT_READ | PROT_WRITE) {
        Ok(addr) => addr,
        Err(error) => {
            println!("quota-hog: mem_map of {} KiB failed: {error}", size >> 10);
            return 1;
        }
    };
    let mut holes = 0;
    let error = loop {
        let hole = base + (2 * holes + 1) * PAGE_SIZE;
        if hole + PAGE_SIZE >= base + size {
            break None;
        }
        match mem_unmap(hole, PAGE_SIZE) {
            Ok(()) => holes += 1,
            Err(error) => break Some(error),
        }
    };
    report_usage();
    match error {
        Some(error) => {
            println!("quota-hog: fragment: punched {holes} holes, then {error}");
            i32::from(error != Error::QuotaExceeded)
        }
        None => {
            println!("quota-hog: fragment: punched {holes} holes without an error");
            1
        }
    }
}

fn table_hog(size: u64) -> i32 {
    const STRIDE: u64 = 2 << 20;
    let slots = size / STRIDE;
    let base = match mem_map(slots * STRIDE, PROT_READ | PROT_WRITE) {
        Ok(addr) => addr,
        Err(error) => {
            println!("quota-hog: tables: mem_map of {} KiB failed: {error}", size >> 10);
            return 2;
        }
    };
    for slot in 0..slots {
        let at = base + slot * STRIDE;
        // SAFETY: the page lies inside the writable mapping made above (its
        // earlier slots are unmapped, this one is not), which no Rust
        // reference covers.
        unsafe { write_u64(at, slot + 1) };
        if let Err(error) = mem_unmap(at, STRIDE) {
            println!("quota-hog: tables: mem_unmap of slot {slot} failed: {error}");
            return 2;
        }
    }
    println!("quota-hog: tables: touched and unmapped {slots} pages, one per 2 MiB");
    report_usage();
    let base = match mem_map(slots * STRIDE, PROT_READ | PROT_WRITE) {
        Ok(addr) => addr,
        Err(error) => {
            println!("quota-hog: tables: second mem_map failed: {error}");
            return 2;
        }
    };
    for slot in 0..slots {
        // SAFETY: as above; this mapping is whole.
        unsafe { write_u64(base + slot * STRIDE, slot + 1) };
        if (slot + 1) % 64 == 0 {
            println!("quota-hog: tables: kept {} pages, one per 2 MiB", slot + 1);
        }
    }
    report_usage();
    println!("quota-hog: tables: kept all {slots} pages");
    1
}

fn syscall_hog(size: u64) -> i32 {
    use superos_protocol::syscall::{decode_result, Syscall};
    let call = |number: Syscall, a0: u64, a1: u64, a2: u64| {
        // SAFETY: every buffer handed over lies in the mapping made below,
        // which no Rust reference covers; the kernel checks it anyway.
        decode_result(unsafe { superos_rt::raw::syscall(number as u64, a0, a1, a2, 0, 0) })
    };
    let base = match mem_map(size, PROT_READ | PROT_WRITE) {
        Ok(addr) => addr,
        Err(error) => {
            println!("quota-hog: syscalls: mem_map of {} KiB failed: {error}", size >> 10);
            return 2;
        }
    };
    let pages = size / PAGE_SIZE;
    let mut page = 0;
    let refused = loop {
        if page + 3 >= pages {
            break None;
        }
        match call(Syscall::MemStat, base + page * PAGE_SIZE, 0, 0) {
            Ok(_) => page += 1,
            Err(error) => break Some(error),
        }
    };
    println!("quota-hog: syscalls: mem_stat faulted in {page} pages, then {refused:?}");
    let write = call(Syscall::Write, base + (page + 1) * PAGE_SIZE, 8, 0);
    let recv = call(Syscall::IpcRecv, base + (page + 2) * PAGE_SIZE, 64, RECV_NONBLOCK);
    println!("quota-hog: syscalls: write {write:?}, ipc_recv {recv:?}");
    let quota = Err(Error::QuotaExceeded);
    i32::from(refused != Some(Error::QuotaExceeded) || write != quota || recv != quota)
}

fn range_hog(size: u64, dense: u64) -> i32 {
    const STRIDE: u64 = 2 << 20;
    let attempt = |what: &str, result: Result<(), Error>| {
        if let Err(error) = result {
            println!("quota-hog: ranges: {what} failed: {error}");
            return false;
        }
        true
    };
    let Ok(empty) = mem_map(size, PROT_READ | PROT_WRITE) else {
        println!("quota-hog: ranges: mem_map failed");
        return 2;
    };
    if !attempt("mem_protect of the untouched region", mem_protect(empty, size, PROT_READ))
        || !attempt("mem_unmap of the untouched region", mem_unmap(empty, size))
    {
        return 2;
    }
    let Ok(base) = mem_map(size, PROT_READ | PROT_WRITE) else {
        println!("quota-hog: ranges: second mem_map failed");
        return 2;
    };
    let spread = size / STRIDE;
    for slot in 0..spread {
        // SAFETY: inside the writable mapping made above, which no Rust
        // reference covers.
        unsafe { write_u64(base + slot * STRIDE + PAGE_SIZE, slot + 1) };
    }
    let dense_pages = (dense / PAGE_SIZE).min(STRIDE / PAGE_SIZE - 2);
    for page in 0..dense_pages {
        // SAFETY: as above (the first 2 MiB, beyond its spread page).
        unsafe { write_u64(base + (page + 2) * PAGE_SIZE, page + 1) };
    }
    println!("quota-hog: ranges: {} pages touched in {} page tables", spread + dense_pages, spread);
    if !attempt("mem_protect of the touched region", mem_protect(base, size, PROT_READ)) {
        return 2;
    }
    // SAFETY: as above; reading is still allowed.
    let intact = (0..spread).all(|slot| unsafe { read_u64(base + slot * STRIDE + PAGE_SIZE) } == slot + 1);
    if !attempt("mem_unmap of the touched region", mem_unmap(base, size)) {
        return 2;
    }
    report_usage();
    println!("quota-hog: ranges: done, pages intact: {intact}");
    i32::from(!intact)
}

fn watch(ms: u64) -> i32 {
    let khz = superos_rt::gate_info().tsc_khz.max(1);
    let start = superos_rt::rdtsc();
    let (mut last, mut longest) = (start, 0);
    while last.wrapping_sub(start) < ms * khz {
        let now = superos_rt::rdtsc();
        longest = longest.max(now.wrapping_sub(last));
        last = now;
    }
    println!("quota-hog: watch: longest wait {} us in {ms} ms", superos_rt::cycles_to_ns(longest) / 1000);
    0
}

fn outlive(pids: &[u32]) -> i32 {
    let khz = superos_rt::gate_info().tsc_khz.max(1);
    loop {
        let start = superos_rt::rdtsc();
        while superos_rt::rdtsc().wrapping_sub(start) < 50 * khz {
            superos_rt::yield_now();
        }
        if pids.iter().all(|&pid| superos_rt::ipc_send(pid, b"") == Err(Error::NoSuchProcess)) {
            return 0;
        }
    }
}

fn shm_hog(size: u64, exit_holding: bool) -> i32 {
    let region = || -> Result<(u64, u64), (&'static str, Error)> {
        let handle = shm_create(size, RIGHTS_ALL).map_err(|e| ("shm_create", e))?;
        let addr = shm_map(handle, PROT_READ | PROT_WRITE).map_err(|e| ("shm_map", e))?;
        Ok((handle, addr))
    };
    let (handle, addr) = match region() {
        Ok(region) => region,
        Err((call, error)) => {
            println!("quota-hog: shm: {call} of {} KiB failed: {error}", size >> 10);
            return 2;
        }
    };
    for page in 0..size / PAGE_SIZE {
        // SAFETY: inside the writable shared mapping made above, which no
        // Rust reference covers.
        unsafe { write_u64(addr + page * PAGE_SIZE, page + 1) };
    }
    if let Err(error) = shm_unmap(addr).and_then(|()| shm_destroy(handle)) {
        println!("quota-hog: shm: shm_unmap or shm_destroy failed: {error}");
        return 2;
    }
    println!("quota-hog: shm: created, mapped, touched, unmapped and destroyed {} KiB", size >> 10);
    if exit_holding {
        if let Err((call, error)) = region() {
            println!("quota-hog: shm: second {call} failed: {error}");
            return 2;
        }
        println!("quota-hog: shm: exiting with {} KiB mapped", size >> 10);
    }
    0
}

fn main(args: &[u8]) -> i32 {
    let number = |key| arg(args, key).and_then(parse_i64).map(|n| n.max(0) as u64);
    let size = match (number("kib"), number("mib")) {
        (Some(kib), _) => kib << 10,
        (None, Some(mib)) => mib << 20,
        (None, None) => 16 << 20,
    };
    match arg(args, "mode").unwrap_or(b"map") {
        b"map" => map_chunks(size),
        b"touch" => touch_pages(size),
        b"fragment" => punch_holes(size),
        b"tables" => table_hog(size),
        b"syscalls" => syscall_hog(size),
        b"ranges" => range_hog(size, number("dense_kib").unwrap_or(0) << 10),
        b"watch" => watch(number("ms").unwrap_or(1000)),
        b"outlive" => {
            let first = number("pid").unwrap_or(1) as u32;
            outlive(&[first, number("and").map_or(first, |pid| pid as u32)])
        }
        b"shm" => shm_hog(size, number("exit").unwrap_or(1) != 0),
        _ => {
            println!("quota-hog: usage: mode=map|touch|fragment|tables|syscalls|ranges|watch|outlive|shm mib=<N>|kib=<N>|ms=<N>|pid=<N>");
            2
        }
    }
}

superos_rt::entry!(main, "mode=map|touch|fragment|tables|syscalls|ranges|watch|outlive|shm [mib=<n>] [kib=<n>] [dense_kib=<n>] [ms=<n>] [pid=<pid>] [and=<pid>] [exit=0|1]");
