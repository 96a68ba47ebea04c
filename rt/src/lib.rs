//! `superos_rt`: the runtime every SuperOS user program links against.
//!
//! It provides the entry point (`_start`, which calls the function named with
//! [`entry!`] and exits with its result), system-call wrappers that go through
//! the kernel's gate page (so the same binary runs whichever entry instruction
//! the kernel chose), memory, IPC and shared-memory calls, console printing,
//! and a panic handler that prints the panic and exits with code 101.
//!
//! # Errors and faults
//!
//! Each system-call wrapper lists under `# Errors` the [`Error`] values the
//! kernel returns for it, and when. Three rules hold for all of them:
//!
//! - Quota refusals: a call that a quota refuses logs a `QuotaDenied` kernel
//!   event, then returns [`Error::QuotaExceeded`]; under the process's quota
//!   policy `kill` it terminates the process instead with that quota's fault
//!   (`virtual-quota-exceeded`, `resident-quota-exceeded`,
//!   `shared-quota-exceeded`, `mapping-quota-exceeded` or
//!   `capability-quota-exceeded`), and the call does not return.
//! - Buffers: the kernel checks a buffer a wrapper passes against the
//!   caller's mappings (writable where the kernel writes) before it uses it,
//!   and returns [`Error::BadAddress`] if it is not all mapped so. It faults
//!   in untouched demand-zero pages of the buffer, which the resident quota
//!   may refuse (as above) or which may find no free frame
//!   ([`Error::OutOfMemory`]). A slice that follows this crate's rules (no
//!   reference over `mem_map` or shared memory) is always mapped and
//!   touched, so these errors come only from slices made with `unsafe` code.
//! - Faults: an access the process may not make terminates it, with a fault
//!   the kernel logs by name: `unmapped-access` (nothing is mapped there,
//!   e.g. after [`mem_unmap`] or [`shm_unmap`]), `write-to-read-only`,
//!   `execute-non-executable`, or `use-after-revoke` (where a shared mapping
//!   was before [`shm_revoke`], [`shm_destroy`] or [`cap_drop`] took it; a
//!   process keeps at most `REVOKED_MAX` (16) such ranges, and beyond that
//!   the kernel releases the one at the lowest address other than the
//!   newest, where an access is then `unmapped-access`). The first
//!   touch of a demand-zero page that would exceed the resident quota logs
//!   `QuotaDenied` and terminates the process with `resident-quota-exceeded`
//!   whatever its policy; one that finds no free frame terminates it with
//!   `out-of-memory`.
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]

use core::fmt::Write;
use superos_protocol::layout::{GATE_INFO_OFFSET, GATE_VA};
use superos_protocol::syscall::{decode_recv, decode_result, GateInfo, SysError, Syscall};

pub use superos_protocol::layout::PAGE_SIZE;
pub use superos_protocol::syscall::SysError as Error;
pub use superos_protocol::syscall::{
    CapInfo, MemStat, CAPS_MAX, MAILBOX_DEPTH, MAILBOX_PER_SENDER, MESSAGE_MAX, OFFERS_PER_GRANTER,
    PROT_EXEC, PROT_READ, PROT_WRITE, RECV_NONBLOCK, RIGHTS_ALL, RIGHT_GRANT, RIGHT_READ, RIGHT_WRITE,
    SHM_MAX, SHM_PARTICIPANTS_MAX,
};

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
    call3(number, a0, a1, 0)
}

fn call3(number: Syscall, a0: u64, a1: u64, a2: u64) -> Result<u64, SysError> {
    // SAFETY: every wrapper below passes pointers derived from live slices
    // (of the length and mutability the call needs) or plain numbers.
    decode_result(unsafe { raw::syscall(number as u64, a0, a1, a2, 0, 0) })
}

/// Writes `bytes` to the console; returns the number of bytes written (all
/// of them).
///
/// # Errors
/// - [`Error::TooLarge`]: `bytes` is longer than `WRITE_MAX` (4096) bytes.
/// - [`Error::BadAddress`]: `bytes` is not all mapped in the caller (see
///   [buffers](crate#errors-and-faults)).
/// - [`Error::InvalidArgument`]: the VMM refused the console output (not
///   expected once the kernel has checked the buffer).
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

/// Reserves `len` bytes (rounded up to whole pages) of demand-zero memory with
/// rights `prot` ([`PROT_READ`] or `PROT_READ | PROT_WRITE`) at an address the
/// kernel chooses, and returns that address.
///
/// The memory is reached only through raw addresses (see [`read_u64`] and
/// [`write_u64`]), never through Rust references, so mapping, unmapping and
/// protecting it are safe operations.
///
/// Each page is allocated on first touch; a write to a read-only mapping
/// terminates the process with `write-to-read-only` (see
/// [faults](crate#errors-and-faults)).
///
/// # Errors
/// - [`Error::NotPermitted`]: `prot` has [`PROT_EXEC`].
/// - [`Error::InvalidArgument`]: `prot` is neither [`PROT_READ`] nor
///   `PROT_READ | PROT_WRITE`, or `len` is 0.
/// - [`Error::TooLarge`]: `len` is over `USER_MMAP_MAX` (1 GiB).
/// - [`Error::QuotaExceeded`]: the mapping would exceed the virtual quota, or
///   the process's map would need more than `MAPPINGS_MAX` (256) entries (a
///   [quota refusal](crate#errors-and-faults)).
/// - [`Error::OutOfMemory`]: no free range of that length is left where the
///   kernel places mappings.
pub fn mem_map(len: u64, prot: u64) -> Result<u64, Error> {
    call(Syscall::MemMap, len, prot)
}

/// Removes the whole pages `[addr, addr + len)` (`len` rounded up to whole
/// pages) of `mem_map` memory; resident pages are scrubbed and freed. A later
/// access to the range terminates the process with `unmapped-access`, until
/// the kernel places another mapping there.
///
/// # Errors
/// - [`Error::Unaligned`]: `addr` is not page-aligned.
/// - [`Error::InvalidArgument`]: `len` is 0.
/// - [`Error::Overflow`]: `addr + len`, rounded up to a page, overflows.
/// - [`Error::BadAddress`]: some page of the range is not `mem_map` memory
///   (never mapped, already unmapped, a guard page, or other memory).
/// - [`Error::QuotaExceeded`]: the hole would split a mapping in two and the
///   process's map has no room for one more entry (`MAPPINGS_MAX`; a
///   [quota refusal](crate#errors-and-faults)).
pub fn mem_unmap(addr: u64, len: u64) -> Result<(), Error> {
    call(Syscall::MemUnmap, addr, len).map(drop)
}

/// Changes the rights of the `mem_map` pages `[addr, addr + len)` to `prot`;
/// rights can only be removed. A whole [`shm_map`] mapping (`addr` its
/// start, `len` its length rounded up to whole pages) may lose write access
/// the same way. A later write to a page made read-only terminates the
/// process with `write-to-read-only`.
///
/// # Errors
/// - [`Error::NotPermitted`]: `prot` has [`PROT_EXEC`], or would add write
///   access to a page that lacks it.
/// - [`Error::InvalidArgument`]: `prot` is neither [`PROT_READ`] nor
///   `PROT_READ | PROT_WRITE`, or `len` is 0.
/// - [`Error::Unaligned`]: `addr` is not page-aligned.
/// - [`Error::Overflow`]: `addr + len`, rounded up to a page, overflows.
/// - [`Error::BadAddress`]: some page of the range is not `mem_map` memory,
///   and the range is not a whole shared mapping.
/// - [`Error::QuotaExceeded`]: splitting a mapping at `addr` or
///   `addr + len` would need more than `MAPPINGS_MAX` map entries (a
///   [quota refusal](crate#errors-and-faults)).
pub fn mem_protect(addr: u64, len: u64, prot: u64) -> Result<(), Error> {
    call3(Syscall::MemProtect, addr, len, prot).map(drop)
}

/// The caller's memory usage and quotas.
///
/// # Errors
/// None in practice: the kernel refuses only a buffer it cannot write (see
/// [buffers](crate#errors-and-faults)), and this wrapper passes one on the
/// caller's stack.
pub fn mem_stat() -> Result<MemStat, Error> {
    let mut stat = MemStat::default();
    call(Syscall::MemStat, &raw mut stat as u64, 0)?;
    Ok(stat)
}

/// Copies `message` (at most [`MESSAGE_MAX`] bytes) into the mailbox of
/// process `pid`. A message to the caller itself is allowed.
///
/// # Errors
/// - [`Error::TooLarge`]: `message` is longer than [`MESSAGE_MAX`] bytes.
/// - [`Error::BadAddress`]: `message` is not all mapped in the caller (see
///   [buffers](crate#errors-and-faults)).
/// - [`Error::NoSuchProcess`]: no live process has pid `pid`.
/// - [`Error::MailboxFull`]: `pid`'s mailbox holds [`MAILBOX_DEPTH`]
///   messages, or [`MAILBOX_PER_SENDER`] from the caller (not counted for a
///   message to oneself). A plain error: no `QuotaDenied` event, whatever
///   the quota policy.
/// - [`Error::OutOfMemory`]: no free frame for the kernel's copy of the
///   message.
pub fn ipc_send(pid: u32, message: &[u8]) -> Result<(), Error> {
    call3(Syscall::IpcSend, u64::from(pid), message.as_ptr() as u64, message.len() as u64).map(drop)
}

fn recv(buffer: &mut [u8], flags: u64) -> Result<(u32, usize), Error> {
    let packed = call3(Syscall::IpcRecv, buffer.as_mut_ptr() as u64, buffer.len() as u64, flags)?;
    let (sender, len) = decode_recv(packed);
    Ok((sender, len as usize))
}

/// Takes the oldest message from the caller's mailbox into `buffer`, waiting
/// for one if the mailbox is empty. Returns (sender pid, message length).
/// A message longer than `buffer` stays queued ([`Error::BufferTooSmall`]).
/// At most the first [`MESSAGE_MAX`] bytes of `buffer` are used. When no
/// process can run and some wait for a message, the kernel terminates every
/// waiting process with the `deadlock` fault.
///
/// # Errors
/// - [`Error::BufferTooSmall`]: the oldest message (waiting, or the one that
///   woke the caller) is longer than `buffer`; it stays queued.
/// - [`Error::BadAddress`]: `buffer` is not all mapped writable in the
///   caller, checked before any message is taken and again when one wakes
///   the caller (see [buffers](crate#errors-and-faults)).
pub fn ipc_recv(buffer: &mut [u8]) -> Result<(u32, usize), Error> {
    recv(buffer, 0)
}

/// Like [`ipc_recv`], but returns [`Error::WouldBlock`] instead of waiting
/// when the mailbox is empty.
///
/// # Errors
/// - [`Error::WouldBlock`]: the mailbox is empty.
/// - [`Error::BufferTooSmall`]: the oldest message is longer than `buffer`;
///   it stays queued.
/// - [`Error::BadAddress`]: `buffer` is not all mapped writable in the
///   caller (see [buffers](crate#errors-and-faults)).
pub fn ipc_try_recv(buffer: &mut [u8]) -> Result<(u32, usize), Error> {
    recv(buffer, RECV_NONBLOCK)
}

/// Creates a shared region of `len` bytes (rounded up to whole pages, frames
/// allocated and zeroed at once) owned by the caller, and returns the
/// caller's capability for it with `rights` (`RIGHT_*` bits; the kernel adds
/// [`RIGHT_READ`] to [`RIGHT_WRITE`]). Nothing is mapped yet.
///
/// The handle is opaque and means something only to the caller: another
/// process that learns the number cannot use it.
///
/// # Errors
/// - [`Error::InvalidArgument`]: `len` is 0, or `rights` is 0 or has bits
///   other than `RIGHT_*`.
/// - [`Error::TooLarge`]: `len` is over [`SHM_MAX`].
/// - [`Error::QuotaExceeded`]: the caller holds [`CAPS_MAX`] capabilities,
///   or the region would exceed its shared quota (a
///   [quota refusal](crate#errors-and-faults)).
/// - [`Error::OutOfMemory`]: the kernel's region table is full
///   (`SHM_REGIONS_MAX`), all regions together would exceed `SHM_PAGES_MAX`
///   pages, the kernel heap has no room for the frame list, or the guest
///   runs out of free frames.
pub fn shm_create(len: u64, rights: u64) -> Result<u64, Error> {
    call(Syscall::ShmCreate, len, rights)
}

/// Offers process `pid` its own capability for the region behind `handle`,
/// with `rights` (a subset of the caller's, which must include
/// [`RIGHT_GRANT`]). Sharing is opt-in: nothing reaches `pid`'s capability
/// table until it calls [`shm_accept`] with the region id, typically after
/// being told it in a message ([`mem_share_message`]). The offer is charged
/// to the caller (at most [`OFFERS_PER_GRANTER`] outstanding; beyond, the
/// caller's `capabilities` quota refuses it under its policy); the caller
/// withdraws it with [`shm_revoke`]. Nothing is mapped.
///
/// # Errors
/// - [`Error::BadHandle`]: `handle` names no capability of the caller.
/// - [`Error::InvalidArgument`]: `rights` is 0 or has bits other than
///   `RIGHT_*`; or `pid` is the caller, or already holds or was offered a
///   capability for the region.
/// - [`Error::NotPermitted`]: the caller's capability lacks
///   [`RIGHT_GRANT`], or `rights` is not a subset of its rights.
/// - [`Error::NoSuchProcess`]: no live process has pid `pid`.
/// - [`Error::QuotaExceeded`]: the region has [`SHM_PARTICIPANTS_MAX`]
///   participants (offers included), or the caller has
///   [`OFFERS_PER_GRANTER`] offers outstanding (a
///   [quota refusal](crate#errors-and-faults) of the `capabilities` quota).
pub fn shm_grant(handle: u64, pid: u32, rights: u64) -> Result<(), Error> {
    call3(Syscall::ShmGrant, handle, u64::from(pid), rights).map(drop)
}

/// Accepts the capability for region `region` (`MEM_SHARE:<region>`) that
/// another process offered the caller with [`shm_grant`], and returns the
/// caller's own handle for it (counted against its [`CAPS_MAX`]).
///
/// # Errors
/// - [`Error::BadHandle`]: nothing is offered to the caller for `region`
///   (never offered, already accepted, withdrawn or revoked, or the region
///   is gone).
/// - [`Error::QuotaExceeded`]: the caller already holds [`CAPS_MAX`]
///   capabilities (a [quota refusal](crate#errors-and-faults)); the offer
///   stays open.
pub fn shm_accept(region: u32) -> Result<u64, Error> {
    call(Syscall::ShmAccept, u64::from(region), 0)
}

/// Maps the region behind `handle` into the caller with `prot`
/// ([`PROT_READ`] or `PROT_READ | PROT_WRITE`, within the capability's
/// rights; never executable) at an address the kernel chooses, and returns
/// that address.
///
/// Like [`mem_map`] memory, shared memory is reached only through raw
/// addresses ([`read_u64`], [`write_u64`]): another process may change it at
/// any time, and the owner may revoke it, so no Rust reference may cover it.
/// A write through a read-only mapping terminates the process with
/// `write-to-read-only`; an access after revocation, with `use-after-revoke`.
///
/// # Errors
/// - [`Error::BadHandle`]: `handle` names no capability of the caller, or
///   the capability was revoked (or the region destroyed) before the mapping
///   was complete.
/// - [`Error::NotPermitted`]: `prot` has [`PROT_EXEC`] or asks for write
///   without [`RIGHT_WRITE`], or the capability lacks [`RIGHT_READ`].
/// - [`Error::InvalidArgument`]: `prot` is neither [`PROT_READ`] nor
///   `PROT_READ | PROT_WRITE`.
/// - [`Error::AlreadyMapped`]: the caller has the region mapped already.
/// - [`Error::QuotaExceeded`]: the mapping would exceed the caller's shared
///   quota (a non-owner is charged the region's length), virtual quota, or
///   resident quota (for page tables), or need more than `MAPPINGS_MAX` map
///   entries (a [quota refusal](crate#errors-and-faults)).
/// - [`Error::OutOfMemory`]: no free range of that length is left where the
///   kernel places mappings, or no free frame for a page table.
pub fn shm_map(handle: u64, prot: u64) -> Result<u64, Error> {
    call(Syscall::ShmMap, handle, prot)
}

/// Removes the caller's shared mapping that starts at `addr`, or releases the
/// revoked range that starts there (what a revocation left of one). The
/// region and its data live on until the owner destroys it. A later access to
/// the range terminates the process with `unmapped-access`, until the kernel
/// places another mapping there.
///
/// # Errors
/// - [`Error::BadAddress`]: no shared mapping or revoked range of the caller
///   starts at `addr`.
pub fn shm_unmap(addr: u64) -> Result<(), Error> {
    call(Syscall::ShmUnmap, addr, 0).map(drop)
}

/// The owner (or whoever granted `pid` its capability) takes the capability
/// for the region behind `handle` away from `pid` and removes `pid`'s
/// mapping at once; `pid`'s later uses of its handle are
/// [`Error::BadHandle`] and its accesses to the old range are terminated as
/// `use-after-revoke`. Revocation is transitive: whatever `pid` granted
/// from it is revoked in the same call. Withdraws an offer not yet accepted.
///
/// # Errors
/// - [`Error::BadHandle`]: `handle` names no capability of the caller.
/// - [`Error::NotPermitted`]: the caller does not own the region and did not
///   grant `pid` its capability or offer (`pid` the caller included).
/// - [`Error::InvalidArgument`]: the caller owns the region, and `pid` is
///   the caller or holds no capability or offer for it.
pub fn shm_revoke(handle: u64, pid: u32) -> Result<(), Error> {
    call(Syscall::ShmRevoke, handle, u64::from(pid)).map(drop)
}

/// The owner revokes the region behind `handle` from every participant
/// (itself included), then the kernel scrubs and frees its frames. Every
/// mapping of it, the owner's included, becomes a revoked range (an access
/// is `use-after-revoke`), and every handle for it goes stale.
///
/// # Errors
/// - [`Error::BadHandle`]: `handle` names no capability of the caller.
/// - [`Error::NotPermitted`]: the caller does not own the region.
pub fn shm_destroy(handle: u64) -> Result<(), Error> {
    call(Syscall::ShmDestroy, handle, 0).map(drop)
}

/// Gives up the capability `handle` names (not a region the caller owns: it
/// has `shm_destroy`). Its mapping, if any, becomes a revoked range (an
/// access is `use-after-revoke`; [`shm_unmap`] releases it), and whatever
/// the caller granted from it is revoked.
///
/// # Errors
/// - [`Error::BadHandle`]: `handle` names no capability of the caller.
/// - [`Error::NotPermitted`]: the caller owns the region.
pub fn cap_drop(handle: u64) -> Result<(), Error> {
    call(Syscall::CapDrop, handle, 0).map(drop)
}

/// The caller's capabilities, as [`cap_list`] reports them.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    records: [CapInfo; CAPS_MAX],
    held: usize,
}

impl Caps {
    /// How many capabilities the caller holds (the kernel's count).
    pub fn held(&self) -> usize {
        self.held
    }

    /// The records the kernel wrote (at most [`CAPS_MAX`]).
    pub fn as_slice(&self) -> &[CapInfo] {
        &self.records[..self.held.min(CAPS_MAX)]
    }

    /// The capability for region `region`, if the caller holds one.
    pub fn region(&self, region: u32) -> Option<CapInfo> {
        self.as_slice().iter().copied().find(|cap| cap.region == region)
    }

    /// The capability with handle `handle`, if the caller holds one.
    pub fn handle(&self, handle: u64) -> Option<CapInfo> {
        self.as_slice().iter().copied().find(|cap| cap.handle == handle)
    }
}

/// Lists the caller's capabilities (handle, region id, owner, rights,
/// length, where it is mapped).
///
/// # Errors
/// None in practice: the kernel refuses only a buffer it cannot write (see
/// [buffers](crate#errors-and-faults)), and this wrapper passes one on the
/// caller's stack.
pub fn cap_list() -> Result<Caps, Error> {
    let mut caps = Caps { records: [CapInfo::default(); CAPS_MAX], held: 0 };
    let held = call(Syscall::CapList, caps.records.as_mut_ptr() as u64, CAPS_MAX as u64)?;
    caps.held = held as usize;
    Ok(caps)
}

/// The caller's capability for region `region` (`MEM_SHARE:<region>`), if
/// it holds one (a grantee holds one once it accepted the offer).
pub fn find_cap(region: u32) -> Option<CapInfo> {
    cap_list().ok()?.region(region)
}

/// Accepts the offer of a capability for region `region` ([`shm_accept`])
/// and returns the caller's record of it (its handle, owner, rights,
/// length): what a grantee does when told `MEM_SHARE:<region>`.
///
/// # Errors
/// Those of [`shm_accept`].
pub fn accept_cap(region: u32) -> Result<CapInfo, Error> {
    let handle = shm_accept(region)?;
    cap_list()?.handle(handle).ok_or(Error::BadHandle)
}

/// Longest message [`tag_message`] writes.
pub const TAG_MESSAGE_MAX: usize = 48;

/// Writes `<tag>:<value>` (decimal) into `buffer` and returns the message,
/// e.g. `MEM_SHARE:3`. A tag longer than fits is cut short.
pub fn tag_message<'a>(tag: &str, value: u64, buffer: &'a mut [u8; TAG_MESSAGE_MAX]) -> &'a [u8] {
    let mut digits = [0u8; 20];
    let mut count = 0;
    let mut rest = value;
    loop {
        digits[count] = b'0' + (rest % 10) as u8;
        count += 1;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let tag = &tag.as_bytes()[..tag.len().min(TAG_MESSAGE_MAX - 1 - count)];
    buffer[..tag.len()].copy_from_slice(tag);
    buffer[tag.len()] = b':';
    let start = tag.len() + 1;
    for (i, digit) in digits[..count].iter().rev().enumerate() {
        buffer[start + i] = *digit;
    }
    &buffer[..start + count]
}

/// The value of a `<tag>:<value>` message, or `None` if `message` is not one.
pub fn tag_value(message: &[u8], tag: &str) -> Option<u64> {
    let digits = message.strip_prefix(tag.as_bytes())?.strip_prefix(b":")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    core::str::from_utf8(digits).ok()?.parse().ok()
}

/// The tag naming a shared region in a message: `MEM_SHARE:<region id>`,
/// as capabilities print.
pub const MEM_SHARE: &str = "MEM_SHARE";

/// Writes the message naming region `region`: `MEM_SHARE:<region>`.
pub fn mem_share_message(region: u32, buffer: &mut [u8; TAG_MESSAGE_MAX]) -> &[u8] {
    tag_message(MEM_SHARE, u64::from(region), buffer)
}

/// The region id a `MEM_SHARE:<id>` message names.
pub fn mem_share_region(message: &[u8]) -> Option<u32> {
    tag_value(message, MEM_SHARE).and_then(|id| u32::try_from(id).ok())
}

/// Reads the `u64` at `addr` with a volatile load.
///
/// # Safety
/// `addr` must be 8-byte aligned, and no Rust reference may cover it. The load
/// itself may fault (that is how the fault tests provoke the kernel): an
/// address the process may not read terminates it.
pub unsafe fn read_u64(addr: u64) -> u64 {
    // SAFETY: the caller guarantees alignment and that no reference aliases
    // the address; whether it is readable is the kernel's to enforce.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

/// Writes `value` to the `u64` at `addr` with a volatile store.
///
/// # Safety
/// As for [`read_u64`]; in addition the address must not hold anything the
/// program relies on (its own stack, statics or code), unless overwriting it
/// is the point.
pub unsafe fn write_u64(addr: u64, value: u64) {
    // SAFETY: see the function's contract.
    unsafe { core::ptr::write_volatile(addr as *mut u64, value) }
}

/// Reads the byte at `addr` with a volatile load.
///
/// # Safety
/// As for [`read_u64`] (without the alignment requirement).
pub unsafe fn read_u8(addr: u64) -> u8 {
    // SAFETY: see the function's contract.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// Writes `value` to the byte at `addr` with a volatile store.
///
/// # Safety
/// As for [`write_u64`] (without the alignment requirement).
pub unsafe fn write_u8(addr: u64, value: u8) {
    // SAFETY: see the function's contract.
    unsafe { core::ptr::write_volatile(addr as *mut u8, value) }
}

/// Converts TSC cycles to nanoseconds with the kernel-published TSC
/// frequency (0 if it is unknown).
pub fn cycles_to_ns(cycles: u64) -> u64 {
    let khz = gate_info().tsc_khz;
    if khz == 0 {
        return 0;
    }
    (u128::from(cycles) * 1_000_000 / u128::from(khz)) as u64
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

/// What precedes a program's usage string in its ELF image (see
/// [`entry!`]): `superos-vmm list --long` shows what follows it, up to a
/// NUL byte.
pub const USAGE_MARKER: &str = "\0superos-usage:";

/// Checks `args` against a usage string such as `mode=a|b peer=<pid>
/// [n=<count>]`: every `key=value` word must name a key the usage names
/// (`key=` anywhere in it), and a word without `=` is allowed only if the
/// usage has a positional (a word starting with `<`). Returns the first
/// word that is not allowed. An empty usage takes no arguments.
pub fn check_args<'a>(args: &'a [u8], usage: &str) -> Result<(), &'a [u8]> {
    let positional = usage.split(' ').any(|word| word.trim_start_matches('[').starts_with('<'));
    for word in args.split(|&b| b == b' ').filter(|w| !w.is_empty()) {
        let known = match word.iter().position(|&b| b == b'=') {
            Some(at) => {
                let key = &word[..at];
                usage.split(' ').any(|u| {
                    let u = u.trim_start_matches('[').as_bytes();
                    u.len() > key.len() && u.starts_with(key) && u[key.len()] == b'='
                })
            }
            None => positional,
        };
        if !known {
            return Err(word);
        }
    }
    Ok(())
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
        Console { buffer: [0; 256], len: 0 }
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

/// The checks of a self-testing program: each prints one line,
/// `<program>: <what>: <got> (as expected)` or `<program>: <what>: <got> WRONG`,
/// and [`Checks::finish`] prints the tally and gives the exit code.
pub struct Checks {
    program: &'static str,
    total: u32,
    failures: u32,
}

impl Checks {
    /// No checks yet, for the program named `program`.
    pub const fn new(program: &'static str) -> Self {
        Checks { program, total: 0, failures: 0 }
    }

    /// Records a check that `got` equals `want`; returns whether it did.
    pub fn expect<T: PartialEq + core::fmt::Debug>(
        &mut self,
        what: impl core::fmt::Display,
        got: T,
        want: T,
    ) -> bool {
        let ok = got == want;
        self.record(what, ok, &got)
    }

    /// Records a check whose outcome `ok` the caller decided, showing `got`;
    /// returns `ok`.
    pub fn record<T: core::fmt::Debug>(&mut self, what: impl core::fmt::Display, ok: bool, got: &T) -> bool {
        self.total += 1;
        let verdict = if ok { "(as expected)" } else { "WRONG" };
        self.failures += u32::from(!ok);
        println!("{}: {what}: {got:?} {verdict}", self.program);
        ok
    }

    /// True if no check failed so far.
    pub fn all_passed(&self) -> bool {
        self.failures == 0
    }

    /// Prints `<program>: <passed> of <total> checks as expected` and returns
    /// the exit code: 0 if every check passed, else 1.
    pub fn finish(&self) -> i32 {
        println!("{}: {} of {} checks as expected", self.program, self.total - self.failures, self.total);
        i32::from(self.failures > 0)
    }
}

/// Declares the program's main function: `fn(args: &[u8]) -> i32`. The
/// runtime's `_start` calls it and exits with the value it returns.
#[macro_export]
macro_rules! entry {
    ($main:path, $usage:literal) => {
        /// This program's arguments, found in its ELF by `superos-vmm list
        /// --long` after the [`USAGE_MARKER`]; also what
        /// [`check_args`] accepts.
        #[used]
        static __SUPEROS_USAGE: [u8; $crate::USAGE_MARKER.len() + $usage.len() + 1] = {
            let mut bytes = [0u8; $crate::USAGE_MARKER.len() + $usage.len() + 1];
            let (marker, usage) = ($crate::USAGE_MARKER.as_bytes(), $usage.as_bytes());
            let mut i = 0;
            while i < marker.len() {
                bytes[i] = marker[i];
                i += 1;
            }
            while i - marker.len() < usage.len() {
                bytes[i] = usage[i - marker.len()];
                i += 1;
            }
            bytes
        };
        #[no_mangle]
        extern "C" fn __superos_main(args: *const u8, len: usize) -> ! {
            // SAFETY: the kernel passes a pointer to `len` argument bytes it
            // copied to the top of this process's stack.
            let args = unsafe { core::slice::from_raw_parts(args, len) };
            if let Err(word) = $crate::check_args(args, $usage) {
                $crate::println!(
                    "unknown argument {:?}; this program takes: {}",
                    core::str::from_utf8(word).unwrap_or("<binary>"),
                    if $usage.is_empty() { "no arguments" } else { $usage }
                );
                $crate::exit(2)
            }
            let main: fn(&[u8]) -> i32 = $main;
            $crate::exit(main(args))
        }
    };
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

/// The worked example of docs/PROGRAMMING.md, compiled (never run on the
/// host) so that the page cannot drift from the runtime's API.
#[cfg(test)]
#[allow(dead_code)]
mod programming_example {
    use crate::*;

    fn producer(consumer: u32) -> Result<(), Error> {
        let handle = shm_create(PAGE_SIZE, RIGHTS_ALL)?;
        let addr = shm_map(handle, PROT_READ | PROT_WRITE)?;
        // SAFETY: the caller's own shared mapping, which no Rust reference covers.
        unsafe { write_u64(addr, 42) };
        let region = cap_list()?.handle(handle).ok_or(Error::BadHandle)?.region;
        shm_grant(handle, consumer, RIGHT_READ)?;
        let mut buffer = [0u8; TAG_MESSAGE_MAX];
        ipc_send(consumer, mem_share_message(region, &mut buffer))?;
        let mut reply = [0u8; 8];
        ipc_recv(&mut reply)?; // the consumer has read it
        shm_destroy(handle)
    }

    fn consumer() -> Result<u64, Error> {
        let mut message = [0u8; TAG_MESSAGE_MAX];
        let (producer, len) = ipc_recv(&mut message)?;
        let region = mem_share_region(&message[..len]).ok_or(Error::InvalidArgument)?;
        let cap = accept_cap(region)?;
        let addr = shm_map(cap.handle, PROT_READ)?;
        // SAFETY: a shared mapping of this process's, read through a raw address.
        let value = unsafe { read_u64(addr) };
        ipc_send(producer, b"done")?;
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_arguments_are_found() {
        let usage = "mode=a|b peer=<pid> [rounds=<n>]";
        assert_eq!(check_args(b"mode=a peer=2 rounds=5", usage), Ok(()));
        assert_eq!(check_args(b"", usage), Ok(()));
        assert_eq!(check_args(b"mode=a code=5", usage), Err(&b"code=5"[..]));
        assert_eq!(check_args(b"mod=a", usage), Err(&b"mod=a"[..]));
        assert_eq!(check_args(b"5", usage), Err(&b"5"[..]), "no positional");
        assert_eq!(check_args(b"5", "<code>"), Ok(()));
        assert_eq!(check_args(b"code=5", "<code>"), Err(&b"code=5"[..]));
        assert_eq!(check_args(b"anything", ""), Err(&b"anything"[..]));
    }

    #[test]
    fn arguments_parse() {
        assert_eq!(arg(b"spin=30 name=x", "spin"), Some(&b"30"[..]));
        assert_eq!(arg(b"spin=30 name=x", "name"), Some(&b"x"[..]));
        assert_eq!(arg(b"spinning=3", "spin"), None);
        assert_eq!(parse_i64(b" -42 "), Some(-42));
        assert_eq!(parse_i64(b"4x"), None);
    }

    #[test]
    fn tagged_messages_round_trip() {
        let mut buffer = [0u8; TAG_MESSAGE_MAX];
        assert_eq!(mem_share_message(3, &mut buffer), b"MEM_SHARE:3");
        assert_eq!(mem_share_region(b"MEM_SHARE:3"), Some(3));
        for value in [0, 7, 10, 4096, u64::MAX] {
            let message = tag_message("HANDLE", value, &mut buffer).to_vec();
            assert_eq!(tag_value(&message, "HANDLE"), Some(value));
            assert_eq!(tag_value(&message, "ADDR"), None);
        }
        for bad in [&b"MEM_SHARE:"[..], b"MEM_SHARE:x", b"MEM_SHARE 3", b"MEM_SHARE:3 ", b"MEM_SHARE:-1"] {
            assert_eq!(mem_share_region(bad), None, "{bad:?}");
        }
        assert_eq!(mem_share_region(b"MEM_SHARE:4294967296"), None);
        let long = "T".repeat(100);
        let message = tag_message(&long, u64::MAX, &mut buffer);
        assert_eq!(message.len(), TAG_MESSAGE_MAX);
        assert!(message.ends_with(b":18446744073709551615"));
    }
}
