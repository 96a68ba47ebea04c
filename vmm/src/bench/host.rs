//! Host baselines, measured by the same binary in the same run with libc
//! directly: each returns one figure per sample (nanoseconds per operation,
//! the mean over the operations in that sample, from `Instant`).
//!
//! Processes, not threads, are the peers of the pipe baselines: the
//! benchmark forks a child that only calls `read`, `write` and `_exit`
//! (async-signal-safe, so forking a process that once had other threads is
//! fine). Spawns run a minimal static ELF written to a temporary file
//! (`exit(0)` in three instructions, no libc, no dynamic loader), so the
//! figure is the host kernel's own spawn + exit + wait, like the guest's.

use std::ffi::CString;
use std::hint::black_box;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PAGE: usize = 4096;

fn ns_per(elapsed: Duration, ops: u64) -> f64 {
    elapsed.as_nanos() as f64 / ops.max(1) as f64
}

fn last_error(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

/// `getppid()` round trips.
pub fn getppid(calls: u64, samples: usize) -> Vec<f64> {
    (0..samples)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..calls {
                // SAFETY: getppid has no preconditions.
                black_box(unsafe { libc::getppid() });
            }
            ns_per(start.elapsed(), calls)
        })
        .collect()
}

/// An anonymous private read-write mapping of `len` bytes.
struct Anonymous {
    addr: *mut u8,
    len: usize,
}

impl Anonymous {
    fn map(len: usize) -> Result<Anonymous, String> {
        // SAFETY: a fresh anonymous mapping at an address the kernel picks;
        // it aliases nothing.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(last_error("mmap"));
        }
        Ok(Anonymous { addr: addr.cast(), len })
    }

    /// Writes one byte to each page.
    fn touch(&self, value: u8) {
        for offset in (0..self.len).step_by(PAGE) {
            // SAFETY: inside the mapping, which only this value owns.
            unsafe { self.addr.add(offset).write_volatile(value) };
        }
    }
}

impl Drop for Anonymous {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value made.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// `mmap` + one write per page + `munmap` of `pages` pages.
pub fn mmap_touch_unmap(pages: usize, rounds: u64, samples: usize) -> Result<Vec<f64>, String> {
    (0..samples)
        .map(|_| {
            let start = Instant::now();
            for round in 0..rounds {
                Anonymous::map(pages * PAGE)?.touch(round as u8);
            }
            Ok(ns_per(start.elapsed(), rounds))
        })
        .collect()
}

/// A minor (demand-zero) fault: writing `pages` fresh pages minus writing
/// them again once resident, per page.
pub fn minor_fault(pages: usize, samples: usize) -> Result<Vec<f64>, String> {
    (0..samples)
        .map(|_| {
            let mapping = Anonymous::map(pages * PAGE)?;
            let start = Instant::now();
            mapping.touch(1);
            let fresh = start.elapsed();
            let start = Instant::now();
            mapping.touch(2);
            let resident = start.elapsed();
            Ok(ns_per(fresh.saturating_sub(resident), pages as u64))
        })
        .collect()
}

/// Copies of `bytes` bytes between two resident buffers.
pub fn memcpy(bytes: usize, samples: usize) -> Vec<f64> {
    let source = vec![0x5au8; bytes];
    let mut target = vec![0u8; bytes];
    target.fill(1);
    (0..samples)
        .map(|_| {
            let start = Instant::now();
            target.copy_from_slice(black_box(&source));
            black_box(&mut target);
            ns_per(start.elapsed(), 1)
        })
        .collect()
}

/// Both ends of a pipe.
struct Pipe {
    read: libc::c_int,
    write: libc::c_int,
}

impl Pipe {
    fn new() -> Result<Pipe, String> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe writes.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return Err(last_error("pipe"));
        }
        Ok(Pipe { read: fds[0], write: fds[1] })
    }
}

fn close(fd: libc::c_int) {
    // SAFETY: closes a descriptor this module opened and closes only once.
    unsafe { libc::close(fd) };
}

/// Reads exactly `buffer.len()` bytes; false on end of file or error.
fn read_exact(fd: libc::c_int, buffer: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buffer.len() {
        // SAFETY: reads into the unfilled tail of `buffer`.
        let n = unsafe { libc::read(fd, buffer[done..].as_mut_ptr().cast(), buffer.len() - done) };
        if n <= 0 {
            return false;
        }
        done += n as usize;
    }
    true
}

/// Writes all of `bytes`; false on error.
fn write_all(fd: libc::c_int, bytes: &[u8]) -> bool {
    let mut done = 0;
    while done < bytes.len() {
        // SAFETY: writes from the unwritten tail of `bytes`.
        let n = unsafe { libc::write(fd, bytes[done..].as_ptr().cast(), bytes.len() - done) };
        if n <= 0 {
            return false;
        }
        done += n as usize;
    }
    true
}

/// Forks a child that runs `child` on (its end of `to_child`, its end of
/// `to_parent`) and exits; returns its pid and the parent's ends.
fn fork_peer(child: fn(libc::c_int, libc::c_int)) -> Result<(libc::pid_t, libc::c_int, libc::c_int), String> {
    let to_child = Pipe::new()?;
    let to_parent = Pipe::new()?;
    // SAFETY: the child only calls async-signal-safe functions (read, write,
    // close, _exit) on descriptors it inherited, and never returns.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(last_error("fork")),
        0 => {
            close(to_child.write);
            close(to_parent.read);
            child(to_child.read, to_parent.write);
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(0) }
        }
        _ => {
            close(to_child.read);
            close(to_parent.write);
            Ok((pid, to_child.write, to_parent.read))
        }
    }
}

fn reap(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: waits for this module's own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
}

fn echo_child(input: libc::c_int, output: libc::c_int) {
    let mut message = [0u8; 64];
    while read_exact(input, &mut message) && write_all(output, &message) {}
}

/// 64-byte round trips through two pipes to a forked child that echoes.
pub fn pipe_ping_pong(rounds: u64, samples: usize) -> Result<Vec<f64>, String> {
    let (pid, to_child, from_child) = fork_peer(echo_child)?;
    let mut message = [7u8; 64];
    let mut result = Ok(Vec::new());
    'samples: for _ in 0..samples {
        let start = Instant::now();
        for round in 0..rounds {
            message[0] = round as u8;
            if !write_all(to_child, &message) || !read_exact(from_child, &mut message) {
                result = Err(last_error("pipe ping-pong"));
                break 'samples;
            }
        }
        if let Ok(samples) = &mut result {
            samples.push(ns_per(start.elapsed(), rounds));
        }
    }
    close(to_child);
    close(from_child);
    reap(pid);
    result
}

/// Bytes per sample of [`pipe_stream`], known to the child before fork.
static STREAM_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn sink_child(input: libc::c_int, output: libc::c_int) {
    let total = STREAM_BYTES.load(std::sync::atomic::Ordering::SeqCst);
    let mut buffer = [0u8; 65536];
    loop {
        let mut received = 0;
        while received < total {
            // SAFETY: reads into `buffer`.
            let n = unsafe { libc::read(input, buffer.as_mut_ptr().cast(), buffer.len()) };
            if n <= 0 {
                return;
            }
            received += n as usize;
        }
        if !write_all(output, b"k") {
            return;
        }
    }
}

/// `bytes` through a pipe to a forked child (64 KiB writes and reads), from
/// the first write to the child's one-byte acknowledgement.
pub fn pipe_stream(bytes: usize, samples: usize) -> Result<Vec<f64>, String> {
    STREAM_BYTES.store(bytes, std::sync::atomic::Ordering::SeqCst);
    let (pid, to_child, from_child) = fork_peer(sink_child)?;
    let chunk = vec![0xa5u8; 65536];
    let mut ack = [0u8; 1];
    let mut result = Ok(Vec::new());
    for _ in 0..samples {
        let start = Instant::now();
        let mut sent = 0;
        let mut ok = true;
        while ok && sent < bytes {
            let len = (bytes - sent).min(chunk.len());
            ok = write_all(to_child, &chunk[..len]);
            sent += len;
        }
        if !ok || !read_exact(from_child, &mut ack) {
            result = Err(last_error("pipe stream"));
            break;
        }
        if let Ok(samples) = &mut result {
            samples.push(ns_per(start.elapsed(), 1));
        }
    }
    close(to_child);
    close(from_child);
    reap(pid);
    result
}

/// A minimal static x86-64 Linux ELF that runs `code` (loaded at 0x400000).
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    const HEADERS: u64 = 64 + 56;
    let total = HEADERS + code.len() as u64;
    let mut elf = Vec::with_capacity(total as usize);
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&(BASE + HEADERS).to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // program headers
    elf.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    elf.extend_from_slice(&0u32.to_le_bytes());
    for half in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R + X
    for word in [0, BASE, BASE, total, total, 0x1000] {
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.extend_from_slice(code);
    elf
}

/// `mov eax, 60; xor edi, edi; syscall`: exit(0).
pub const EXIT_CODE: &[u8] = &[0xb8, 60, 0, 0, 0, 0x31, 0xff, 0x0f, 0x05];
/// `mov eax, 34; syscall` (pause), then exit(0).
pub const PAUSE_CODE: &[u8] = &[0xb8, 34, 0, 0, 0, 0x0f, 0x05, 0xb8, 60, 0, 0, 0, 0x31, 0xff, 0x0f, 0x05];

/// A tiny static program written to a temporary file, removed on drop.
pub struct TinyProgram {
    path: PathBuf,
    c_path: CString,
}

impl TinyProgram {
    /// Writes a program running `code`.
    pub fn write(name: &str, code: &[u8]) -> Result<TinyProgram, String> {
        let path = std::env::temp_dir().join(format!("superos-bench-{}-{name}", std::process::id()));
        std::fs::write(&path, tiny_elf(code)).map_err(|e| format!("writing {}: {e}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod {}: {e}", path.display()))?;
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
        Ok(TinyProgram { path, c_path })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts it with `posix_spawn`; returns the pid.
    pub fn spawn(&self) -> Result<libc::pid_t, String> {
        let argv = [self.c_path.as_ptr() as *mut libc::c_char, std::ptr::null_mut()];
        let envp = [std::ptr::null_mut::<libc::c_char>()];
        let mut pid = 0;
        // SAFETY: the path and both NULL-terminated vectors outlive the call;
        // no file actions or attributes are passed.
        let error = unsafe {
            libc::posix_spawn(
                &mut pid,
                self.c_path.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                argv.as_ptr(),
                envp.as_ptr(),
            )
        };
        if error != 0 {
            return Err(format!(
                "posix_spawn {}: {}",
                self.path.display(),
                io::Error::from_raw_os_error(error)
            ));
        }
        Ok(pid)
    }
}

impl Drop for TinyProgram {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `posix_spawn` + `waitpid` of a tiny static program, `runs` per sample.
pub fn spawn_wait(runs: u64, samples: usize) -> Result<Vec<f64>, String> {
    let program = TinyProgram::write("exit", EXIT_CODE)?;
    (0..samples)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..runs {
                let pid = program.spawn()?;
                let mut status = 0;
                // SAFETY: waits for the child just spawned.
                if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
                    return Err(last_error("waitpid"));
                }
                if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
                    return Err(format!("the tiny program ended with status {status:#x}"));
                }
            }
            Ok(ns_per(start.elapsed(), runs))
        })
        .collect()
}

/// Page-table memory (`VmPTE`) of a tiny static process that is paused.
pub fn tiny_process_page_tables() -> Result<u64, String> {
    let program = TinyProgram::write("pause", PAUSE_CODE)?;
    let pid = program.spawn()?;
    std::thread::sleep(Duration::from_millis(50));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"));
    // SAFETY: ends and reaps the child just spawned.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    let status = status.map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    super::probe::parse_status_kib(&status, "VmPTE").map(|kib| kib * 1024).ok_or("no VmPTE line".into())
}

/// Linux's nearest counterpart of a shared region's life: `memfd_create` +
/// `ftruncate` to one page + shared `mmap` + one write + `munmap` + `close`.
pub fn memfd_cycle(rounds: u64, samples: usize) -> Result<Vec<f64>, String> {
    let name = CString::new("superos-bench").map_err(|e| e.to_string())?;
    (0..samples)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..rounds {
                // SAFETY: a fresh descriptor from a valid C string.
                let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
                if fd < 0 {
                    return Err(last_error("memfd_create"));
                }
                // SAFETY: sizes and maps the descriptor just created; the
                // mapping is written once and unmapped before the close.
                let ok = unsafe {
                    let mut ok = libc::ftruncate(fd, PAGE as libc::off_t) == 0;
                    let addr = libc::mmap(
                        std::ptr::null_mut(),
                        PAGE,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                        fd,
                        0,
                    );
                    ok &= addr != libc::MAP_FAILED;
                    if addr != libc::MAP_FAILED {
                        addr.cast::<u8>().write_volatile(1);
                        libc::munmap(addr, PAGE);
                    }
                    ok
                };
                close(fd);
                if !ok {
                    return Err(last_error("memfd ftruncate/mmap"));
                }
            }
            Ok(ns_per(start.elapsed(), rounds))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tiny_elf_is_well_formed() {
        let elf = tiny_elf(EXIT_CODE);
        assert_eq!(elf.len(), 64 + 56 + EXIT_CODE.len());
        assert_eq!(&elf[..4], b"\x7fELF");
        let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap());
        assert_eq!(entry, 0x40_0000 + 120);
        let filesz = u64::from_le_bytes(elf[64 + 32..64 + 40].try_into().unwrap());
        assert_eq!(filesz, elf.len() as u64);
    }

    #[test]
    fn host_baselines_run() {
        assert_eq!(getppid(10, 2).len(), 2);
        assert_eq!(mmap_touch_unmap(2, 2, 2).unwrap().len(), 2);
        assert_eq!(minor_fault(4, 1).unwrap().len(), 1);
        assert_eq!(memcpy(1 << 16, 1).len(), 1);
        assert_eq!(pipe_ping_pong(5, 2).unwrap().len(), 2);
        assert_eq!(pipe_stream(1 << 18, 2).unwrap().len(), 2);
        assert_eq!(spawn_wait(2, 1).unwrap().len(), 1);
        assert_eq!(memfd_cycle(2, 1).unwrap().len(), 1);
        assert!(tiny_process_page_tables().unwrap() > 0);
    }
}
