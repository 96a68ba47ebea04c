//! `churn`: maps `pages=N` pages (default 16), writes to each, unmaps half of
//! them and exits 0 with the rest still mapped, so both `mem_unmap` and exit
//! release memory. Meant to run many times in a row (`runs = 1000`) to show
//! that no frame is lost. Prints only on failure.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use superos_rt::{
    arg, mem_map, mem_unmap, parse_i64, println, write_u64, Error, PAGE_SIZE, PROT_READ, PROT_WRITE,
};

fn churn(pages: u64) -> Result<(), Error> {
    let base = mem_map(pages * PAGE_SIZE, PROT_READ | PROT_WRITE)?;
    for page in 0..pages {
        // SAFETY: inside the writable mapping made above, which no Rust
        // reference covers.
        unsafe { write_u64(base + page * PAGE_SIZE, page) };
    }
    let half = pages / 2;
    if half > 0 {
        mem_unmap(base, half * PAGE_SIZE)?;
    }
    Ok(())
}

fn main(args: &[u8]) -> i32 {
    let pages = arg(args, "pages").and_then(parse_i64).unwrap_or(16).max(1) as u64;
    match churn(pages) {
        Ok(()) => 0,
        Err(error) => {
            println!("churn: {error}");
            1
        }
    }
}

superos_rt::entry!(main, "[pages=<n>]");
