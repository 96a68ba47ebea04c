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
            0x5e1f => Self::GateSelfTest,
            _ => return None,
        })
    }
}

/// Most bytes one `write` call accepts.
pub const WRITE_MAX: u64 = 4096;

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
    /// The guest is out of physical memory.
    OutOfMemory = 9,
    /// No such process, or it has exited.
    NoSuchProcess = 10,
    /// The call would block and the caller asked not to.
    WouldBlock = 11,
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
        for raw in 1..=11 {
            let error = SysError::from_raw(raw).unwrap();
            assert_eq!(decode_result(encode_result(Err(error))), Err(error));
        }
        // An unknown error number is still an error, never a success.
        assert_eq!(
            decode_result(500u64.wrapping_neg()),
            Err(SysError::InvalidArgument)
        );
    }

    #[test]
    fn syscall_numbers_round_trip() {
        for call in [
            Syscall::Write,
            Syscall::Exit,
            Syscall::Yield,
            Syscall::GetPid,
            Syscall::GateSelfTest,
        ] {
            assert_eq!(Syscall::from_raw(call as u64), Some(call));
        }
        assert_eq!(Syscall::from_raw(0), None);
        assert_eq!(Syscall::from_raw(u64::MAX), None);
    }

    #[test]
    fn gate_info_layout() {
        assert_eq!(core::mem::size_of::<GateInfo>(), 16);
    }
}
