//! `starter`: the program `superos-vmm new` writes into a new project (its
//! `src/main.rs`, word for word), embedded here so that every build compiles
//! it and the scenarios can run it. It uses each kind of call once: its
//! arguments, the console, private memory, a message to itself and a shared
//! region, and exits 0 (1 if the kernel answers unexpectedly).
//! Arguments: `name=<who>` (default "world").
#![no_std]
#![no_main]

use superos_rt::{
    arg, getpid, ipc_recv, ipc_send, mem_map, mem_stat, mem_unmap, println, read_u64, shm_create,
    shm_destroy, shm_map, write_u64, Error, MESSAGE_MAX, PAGE_SIZE, PROT_READ, PROT_WRITE, RIGHTS_ALL,
};

fn main(args: &[u8]) -> i32 {
    let name = arg(args, "name").and_then(|n| core::str::from_utf8(n).ok()).unwrap_or("world");
    let pid = getpid();
    println!("hello, {name}, from pid {pid}");
    match demo(pid) {
        Ok(()) => 0,
        Err(e) => {
            println!("the kernel said no: {e:?}");
            1
        }
    }
}

fn demo(pid: u32) -> Result<(), Error> {
    // Private memory: reserved at once, a frame per page on first touch.
    let len = 4 * PAGE_SIZE;
    let addr = mem_map(len, PROT_READ | PROT_WRITE)?;
    // SAFETY: `addr` starts a fresh writable mapping no Rust reference covers
    // (mapped memory is only ever reached through raw addresses).
    let value = unsafe {
        write_u64(addr, 42);
        read_u64(addr)
    };
    let resident = mem_stat()?.resident_bytes;
    println!("mapped {len} bytes at {addr:#x}; read back {value}; resident {resident} bytes");
    mem_unmap(addr, len)?;

    // A message (at most MESSAGE_MAX bytes), here to this process itself.
    ipc_send(pid, b"ping")?;
    let mut buffer = [0u8; MESSAGE_MAX as usize];
    let (from, n) = ipc_recv(&mut buffer)?;
    println!("message from pid {from}: {:?}", core::str::from_utf8(&buffer[..n]).unwrap_or("?"));

    // A shared region: created, mapped, used, destroyed (see docs/PROGRAMMING.md
    // for granting it to another process).
    let handle = shm_create(PAGE_SIZE, RIGHTS_ALL)?;
    let shared = shm_map(handle, PROT_READ | PROT_WRITE)?;
    // SAFETY: as above: a fresh writable mapping, reached by address only.
    let value = unsafe {
        write_u64(shared, 7);
        read_u64(shared)
    };
    println!("shared region mapped at {shared:#x}; read back {value}");
    shm_destroy(handle)?;
    Ok(())
}

superos_rt::entry!(main, "[name=<who>]");
