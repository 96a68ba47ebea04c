//! The user -> kernel system-call ABI.
//!
//! User code never executes `syscall` or `int3` itself: it calls the kernel-owned
//! gate stub at [`crate::layout::GATE_VA`] (`call GATE_VA`), which holds whichever
//! entry instruction the kernel selected at boot (`syscall; ret` on ordinary KVM,
//! `int3; ret` on the PVM fork). The kernel only accepts entries that come from
//! that stub, so the same user binary runs unchanged on both hosts.
//!
//! Registers: `rax` = [`Syscall`] number, arguments in `rdi`, `rsi`, `rdx`, `r10`,
//! `r8`; the result comes back in `rax` (see [`encode_result`]). `rcx` and `r11`
//! are clobbered; every other register is preserved.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// System-call numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Syscall {
    /// `write(buf, len) -> len`: write bytes to the console.
    Write = 1,
    /// `exit(code) -> !`: terminate the caller with an exit code.
    Exit = 2,
    /// `yield() -> 0`: give up the rest of the time slice.
    Yield = 3,
    /// `getpid() -> pid`.
    GetPid = 4,
    /// `mem_map(len, prot) -> addr`: reserve `len` bytes (rounded up to pages)
    /// of demand-zero memory at an address the kernel chooses. `prot` is
    /// [`PROT_READ`] or `PROT_READ | PROT_WRITE`; executable mappings are
    /// refused.
    MemMap = 10,
    /// `mem_unmap(addr, len) -> 0`: remove whole pages of `mem_map` memory.
    MemUnmap = 11,
    /// `mem_protect(addr, len, prot) -> 0`: change the rights of `mem_map`
    /// pages, or of a whole `shm_map` mapping; rights can only be removed.
    MemProtect = 12,
    /// `mem_stat(buf) -> 0`: write a [`MemStat`] to `buf`.
    MemStat = 13,
    /// `ipc_send(pid, buf, len) -> 0`: copy a message of at most
    /// [`MESSAGE_MAX`] bytes into `pid`'s mailbox.
    IpcSend = 20,
    /// `ipc_recv(buf, cap, flags) -> packed (sender, len)`: take the oldest
    /// message from the caller's mailbox, blocking unless `flags` has
    /// [`RECV_NONBLOCK`]; see [`decode_recv`].
    IpcRecv = 21,
    /// `shm_create(len, rights) -> handle`: create a shared region of `len`
    /// bytes (whole pages) owned by the caller, counted against its shared
    /// quota; returns the caller's capability with `rights` ([`RIGHT_READ`],
    /// [`RIGHT_WRITE`], [`RIGHT_GRANT`]). Nothing is mapped.
    ShmCreate = 30,
    /// `shm_grant(handle, pid, rights) -> 0`: offer `pid` a capability for
    /// the same region, with `rights` a subset of the caller's; the caller
    /// needs [`RIGHT_GRANT`]. The offer takes nothing of `pid`'s (its table
    /// is untouched until it calls `shm_accept`) and is charged to the
    /// caller: at most [`OFFERS_PER_GRANTER`] outstanding. Nothing is mapped.
    ShmGrant = 31,
    /// `shm_map(handle, prot) -> addr`: map the region into the caller at an
    /// address the kernel chooses, with `prot` within the capability's rights
    /// (never executable), counted against the caller's shared quota (the
    /// owner's region was counted when it created it).
    ShmMap = 32,
    /// `shm_unmap(addr) -> 0`: remove the caller's mapping that starts at `addr`.
    ShmUnmap = 33,
    /// `shm_revoke(handle, pid) -> 0`: the owner, or the process that
    /// granted `pid` its capability (or offer), takes it away and removes its
    /// mapping at once; `pid`'s later accesses fault as `use-after-revoke`.
    /// Transitive: every capability and offer `pid` derived from it goes
    /// too, in the same call.
    ShmRevoke = 34,
    /// `shm_destroy(handle) -> 0`: the owner revokes the region from everyone
    /// (itself included) and frees its frames.
    ShmDestroy = 35,
    /// `cap_list(buf, max) -> count`: write up to `max` [`CapInfo`] records
    /// describing the caller's capabilities to `buf`; returns how many the
    /// caller holds.
    CapList = 36,
    /// `cap_drop(handle) -> 0`: the caller gives up its capability (issue
    /// 11): its mapping of the region, if any, is revoked as by `shm_revoke`
    /// (a later access is `use-after-revoke`; `shm_unmap` releases the
    /// range) and the handle goes stale. Errors: `bad-handle`; an owner
    /// cannot drop its own region's capability (`not-permitted`: it has
    /// `shm_destroy`). Logged as `ShmRevoked` with the caller as both the
    /// revoker and the target. What the caller derived from it (grants it
    /// made) is revoked too.
    CapDrop = 37,
    /// `shm_accept(region) -> handle`: accept the offer of a capability for
    /// region `region` (`MEM_SHARE:<region>`) that `shm_grant` made to the
    /// caller; the capability goes into the caller's table (its
    /// `capabilities` quota, [`CAPS_MAX`]) and the handle is returned.
    /// Errors: `bad-handle` (no such offer to the caller).
    ShmAccept = 38,
    /// Used once by the kernel's own boot self-test of the gate; refused with
    /// [`SysError::NoSys`] from any user process.
    GateSelfTest = 0x5e1f,
}

impl Syscall {
    /// Decodes a system-call number.
    pub fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw {
            1 => Self::Write,
            2 => Self::Exit,
            3 => Self::Yield,
            4 => Self::GetPid,
            10 => Self::MemMap,
            11 => Self::MemUnmap,
            12 => Self::MemProtect,
            13 => Self::MemStat,
            20 => Self::IpcSend,
            21 => Self::IpcRecv,
            30 => Self::ShmCreate,
            31 => Self::ShmGrant,
            32 => Self::ShmMap,
            33 => Self::ShmUnmap,
            34 => Self::ShmRevoke,
            35 => Self::ShmDestroy,
            36 => Self::CapList,
            37 => Self::CapDrop,
            38 => Self::ShmAccept,
            0x5e1f => Self::GateSelfTest,
            _ => return None,
        })
    }

    /// The name programs know it by (`mem_map`), used in traces and
    /// benchmark reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Exit => "exit",
            Self::Yield => "yield",
            Self::GetPid => "getpid",
            Self::MemMap => "mem_map",
            Self::MemUnmap => "mem_unmap",
            Self::MemProtect => "mem_protect",
            Self::MemStat => "mem_stat",
            Self::IpcSend => "ipc_send",
            Self::IpcRecv => "ipc_recv",
            Self::ShmCreate => "shm_create",
            Self::ShmGrant => "shm_grant",
            Self::ShmMap => "shm_map",
            Self::ShmUnmap => "shm_unmap",
            Self::ShmRevoke => "shm_revoke",
            Self::ShmDestroy => "shm_destroy",
            Self::CapList => "cap_list",
            Self::CapDrop => "cap_drop",
            Self::ShmAccept => "shm_accept",
            Self::GateSelfTest => "gate_self_test",
        }
    }
}

/// Most bytes one `write` call accepts.
pub const WRITE_MAX: u64 = 4096;

/// `prot` bit: readable.
pub const PROT_READ: u64 = 1;
/// `prot` bit: writable (requires [`PROT_READ`]).
pub const PROT_WRITE: u64 = 2;
/// `prot` bit: executable. Always refused for data mappings.
pub const PROT_EXEC: u64 = 4;

/// Most bytes in one message.
pub const MESSAGE_MAX: u64 = 4096;
/// Most messages waiting in one mailbox.
pub const MAILBOX_DEPTH: usize = 8;
/// Most messages one sender may have waiting in another process's mailbox
/// (issue 11, the mailbox rule): a send beyond it is `mailbox-full` for that
/// sender only, so no one sender takes more than half of a receiver's
/// [`MAILBOX_DEPTH`] slots and another partner still gets through (only
/// several senders together can fill a mailbox). Messages to oneself are
/// limited by [`MAILBOX_DEPTH`] alone.
pub const MAILBOX_PER_SENDER: usize = MAILBOX_DEPTH / 2;
/// `ipc_recv` flag: return [`SysError::WouldBlock`] instead of blocking.
pub const RECV_NONBLOCK: u64 = 1;

/// Capability right: map the region readable.
pub const RIGHT_READ: u64 = 1;
/// Capability right: map the region writable (implies [`RIGHT_READ`]).
pub const RIGHT_WRITE: u64 = 2;
/// Capability right: grant the region to another process.
pub const RIGHT_GRANT: u64 = 4;
/// Every right there is. Shared memory is never executable: there is no
/// execute right.
pub const RIGHTS_ALL: u64 = RIGHT_READ | RIGHT_WRITE | RIGHT_GRANT;
/// Largest shared region.
pub const SHM_MAX: u64 = 64 << 20;
/// Most capabilities one process may hold.
pub const CAPS_MAX: usize = 32;
/// Most processes one region may be granted to (owner included).
pub const SHM_PARTICIPANTS_MAX: usize = 8;
/// Most shared regions alive in the guest at once (the kernel's region
/// table, which the VMM reads whole); `shm_create` beyond it is
/// [`SysError::OutOfMemory`].
pub const SHM_REGIONS_MAX: usize = 64;
/// Most pages in all live shared regions together (128 MiB): the kernel
/// keeps a frame list per region in its heap, and this bounds them;
/// `shm_create` beyond it is [`SysError::OutOfMemory`].
pub const SHM_PAGES_MAX: u64 = 32 * 1024;
/// Most entries in one process's map: code and data segments, stack, stack
/// guard, gate page, each `mem_map` and `shm_map` mapping (or piece of one
/// left by a partial `mem_unmap`/`mem_protect`), and each revoked range. The
/// kernel keeps this bookkeeping in its own memory, so it is bounded like a
/// quota: a call that would need more entries is refused with
/// [`SysError::QuotaExceeded`] (or, under policy `kill`, terminates the caller).
pub const MAPPINGS_MAX: usize = 256;

/// Most revoked ranges one process's map keeps (issue 11). A revoked range
/// (what is left of a shared mapping after `shm_revoke`, `shm_destroy` or
/// its owner's exit; an access there is `use-after-revoke`) is the kernel's
/// doing, so it does not count toward [`MAPPINGS_MAX`]: the former grantee
/// can release it with `shm_unmap(addr)`, after which the range is unmapped
/// memory the kernel may place new mappings in, and beyond this many the
/// kernel releases the one at the lowest address (other than the newest)
/// itself.
pub const REVOKED_MAX: usize = 16;

/// Most offers (`shm_grant`s not yet accepted) one process may have
/// outstanding, to anyone (issue 11): an offer is charged to the granter,
/// and one beyond this is refused as the granter's `capabilities` quota
/// (`QuotaDenied`, then `quota-exceeded` or, with policy `kill`,
/// termination). The receiver pays nothing until it accepts; the granter
/// withdraws an offer with `shm_revoke`.
pub const OFFERS_PER_GRANTER: usize = CAPS_MAX / 4;

/// One capability, as `cap_list` reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CapInfo {
    /// The opaque handle (meaningful only to its holder).
    pub handle: u64,
    /// The kernel's region id: the capability prints as `MEM_SHARE:<id>`.
    pub region: u32,
    /// The region's owner.
    pub owner: u32,
    /// `RIGHT_*` bits of this capability.
    pub rights: u64,
    /// Region length in bytes.
    pub len: u64,
    /// Where the holder has it mapped (0 if not mapped).
    pub mapped_at: u64,
}

/// Packs an `ipc_recv` result: sender pid in the high 32 bits, length low.
pub const fn encode_recv(sender: u32, len: u32) -> u64 {
    ((sender as u64) << 32) | len as u64
}

/// Unpacks an `ipc_recv` result into (sender pid, length).
pub const fn decode_recv(value: u64) -> (u32, u32) {
    ((value >> 32) as u32, value as u32)
}

/// What `mem_stat` reports about the caller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct MemStat {
    /// Bytes of virtual address space in use (image, stack, mappings).
    pub virtual_bytes: u64,
    /// Bytes backed by frames.
    pub resident_bytes: u64,
    /// Bytes of shared regions mapped.
    pub shared_bytes: u64,
    /// Virtual quota (0 = none).
    pub max_virtual_bytes: u64,
    /// Resident quota (0 = none).
    pub max_resident_bytes: u64,
    /// Shared quota (0 = none).
    pub max_shared_bytes: u64,
    /// `QUOTA_POLICY_*` of `superos_protocol::boot`.
    pub policy: u32,
    /// Always zero.
    pub reserved: u32,
}

/// Typed system-call errors. Returned to user space as `-(error as i64)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum SysError {
    /// Unknown system-call number.
    NoSys = 1,
    /// A pointer argument does not name memory the caller may access that way
    /// (unmapped, kernel half, foreign, or read-only where the kernel must write).
    BadAddress = 2,
    /// A length is larger than the call allows.
    TooLarge = 3,
    /// An address plus length overflows.
    Overflow = 4,
    /// An address or length is not aligned as the call requires.
    Unaligned = 5,
    /// Some other argument is invalid.
    InvalidArgument = 6,
    /// The operation is not permitted to this caller.
    NotPermitted = 7,
    /// The caller's memory quota does not allow it.
    QuotaExceeded = 8,
    /// The guest is out of memory: no free physical frame, no room left in
    /// the kernel's region table ([`SHM_REGIONS_MAX`]), or in the part of its
    /// heap processes may use.
    OutOfMemory = 9,
    /// No such process, or it has exited.
    NoSuchProcess = 10,
    /// The call would block and the caller asked not to.
    WouldBlock = 11,
    /// The receiver's mailbox is full.
    MailboxFull = 12,
    /// The receive buffer is smaller than the waiting message (which stays
    /// queued).
    BufferTooSmall = 13,
    /// The handle names no capability of the caller (forged, guessed,
    /// foreign, stale or revoked).
    BadHandle = 14,
    /// The caller already has this region mapped.
    AlreadyMapped = 15,
}

impl SysError {
    /// Decodes an error number (the negated `rax`).
    pub fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw {
            1 => Self::NoSys,
            2 => Self::BadAddress,
            3 => Self::TooLarge,
            4 => Self::Overflow,
            5 => Self::Unaligned,
            6 => Self::InvalidArgument,
            7 => Self::NotPermitted,
            8 => Self::QuotaExceeded,
            9 => Self::OutOfMemory,
            10 => Self::NoSuchProcess,
            11 => Self::WouldBlock,
            12 => Self::MailboxFull,
            13 => Self::BufferTooSmall,
            14 => Self::BadHandle,
            15 => Self::AlreadyMapped,
            _ => return None,
        })
    }

    /// A stable kebab-case name, used in logs and tests.
    pub const fn name(self) -> &'static str {
        match self {
            Self::NoSys => "no-such-syscall",
            Self::BadAddress => "bad-address",
            Self::TooLarge => "too-large",
            Self::Overflow => "overflow",
            Self::Unaligned => "unaligned",
            Self::InvalidArgument => "invalid-argument",
            Self::NotPermitted => "not-permitted",
            Self::QuotaExceeded => "quota-exceeded",
            Self::OutOfMemory => "out-of-memory",
            Self::NoSuchProcess => "no-such-process",
            Self::WouldBlock => "would-block",
            Self::MailboxFull => "mailbox-full",
            Self::BufferTooSmall => "buffer-too-small",
            Self::BadHandle => "bad-handle",
            Self::AlreadyMapped => "already-mapped",
        }
    }
}

impl core::fmt::Display for SysError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Largest error number; results in `[-MAX_ERRNO, -1]` are errors.
pub const MAX_ERRNO: u64 = 4095;

/// Encodes a system-call result into `rax`.
pub fn encode_result(result: Result<u64, SysError>) -> u64 {
    match result {
        Ok(value) => value,
        Err(error) => (error as u64).wrapping_neg(),
    }
}

/// Decodes `rax` after a system call. Values in the error range that name no
/// known error decode as [`SysError::InvalidArgument`] rather than as success.
pub fn decode_result(rax: u64) -> Result<u64, SysError> {
    let negated = rax.wrapping_neg();
    if rax != 0 && negated <= MAX_ERRNO {
        Err(SysError::from_raw(negated).unwrap_or(SysError::InvalidArgument))
    } else {
        Ok(rax)
    }
}

/// `GateInfo::gate_kind`: entry by `syscall`.
pub const GATE_KIND_SYSCALL: u32 = 1;
/// `GateInfo::gate_kind`: entry by `int3`.
pub const GATE_KIND_INT3: u32 = 2;
/// `GateInfo::magic`: "GATE".
pub const GATE_INFO_MAGIC: u32 = u32::from_le_bytes(*b"GATE");

/// Read-only information the kernel publishes to every process at
/// `GATE_VA + GATE_INFO_OFFSET` (like a vDSO data page).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct GateInfo {
    /// [`GATE_INFO_MAGIC`].
    pub magic: u32,
    /// `GATE_KIND_*` in use.
    pub gate_kind: u32,
    /// TSC frequency in kHz (0 if unknown), for user-side timing.
    pub tsc_khz: u64,
}

/// Returns the name of a `GATE_KIND_*` value.
pub const fn gate_kind_name(kind: u32) -> &'static str {
    match kind {
        GATE_KIND_SYSCALL => "syscall",
        GATE_KIND_INT3 => "int3",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_round_trip() {
        for value in [0u64, 1, 4096, u64::MAX - MAX_ERRNO] {
            assert_eq!(decode_result(encode_result(Ok(value))), Ok(value));
        }
        for raw in 1..=15 {
            let error = SysError::from_raw(raw).unwrap();
            assert_eq!(decode_result(encode_result(Err(error))), Err(error));
        }
        // An unknown error number is still an error, never a success.
        assert_eq!(decode_result(500u64.wrapping_neg()), Err(SysError::InvalidArgument));
    }

    #[test]
    fn syscall_numbers_round_trip() {
        for call in [Syscall::Write, Syscall::Exit, Syscall::Yield, Syscall::GetPid, Syscall::GateSelfTest] {
            assert_eq!(Syscall::from_raw(call as u64), Some(call));
        }
        assert_eq!(Syscall::from_raw(0), None);
        assert_eq!(Syscall::from_raw(u64::MAX), None);
    }

    #[test]
    fn gate_info_and_mem_stat_layouts() {
        assert_eq!(core::mem::size_of::<GateInfo>(), 16);
        assert_eq!(core::mem::size_of::<MemStat>(), 56);
        assert_eq!(core::mem::size_of::<CapInfo>(), 40);
    }

    #[test]
    fn recv_results_pack_sender_and_length() {
        assert_eq!(decode_recv(encode_recv(7, 4096)), (7, 4096));
        assert_eq!(decode_recv(encode_recv(u32::MAX, 0)), (u32::MAX, 0));
        // A packed result is never mistaken for an error (pids stay below 2^31).
        assert!(decode_result(encode_recv(i32::MAX as u32, MESSAGE_MAX as u32)).is_ok());
    }
}
