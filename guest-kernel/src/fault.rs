//! Classifying a user-mode CPU exception into a [`FaultKind`].
//!
//! The kernel keeps, for every process, the list of its virtual regions and what
//! each is for; the classification combines that with the page-fault error
//! code. It runs on the host in unit tests.

use superos_protocol::event::FaultKind;
use superos_protocol::layout::USER_HALF_END;

/// What a region of a process's address space holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// Program code: read-only, executable.
    Code,
    /// Read-only program data.
    ReadOnlyData,
    /// Writable program data (data, bss).
    Data,
    /// The stack.
    Stack,
    /// The unmapped guard below the stack.
    StackGuard,
    /// The kernel's system-call gate page.
    Gate,
    /// The process's user-state save page (`layout::USER_STATE_VA`):
    /// private and writable, filled and read by the gate page's switch stubs.
    UserState,
    /// Demand-zero memory from `mem_map`.
    Anonymous {
        /// Whether the mapping may be written.
        writable: bool,
    },
    /// A mapping of shared region `region` (never executable).
    Shared {
        /// The region id.
        region: u32,
        /// Whether this mapping may be written.
        writable: bool,
    },
    /// Where shared region `region` was mapped before its capability was
    /// revoked: the range stays reserved, and any access is a
    /// use-after-revoke.
    Revoked {
        /// The region id.
        region: u32,
    },
}

impl RegionKind {
    /// True for regions whose pages are allocated on first touch.
    pub fn is_demand_zero(self) -> bool {
        matches!(self, RegionKind::Stack | RegionKind::Anonymous { .. })
    }

    /// True for regions user code may write.
    pub fn is_writable(self) -> bool {
        matches!(
            self,
            RegionKind::Data
                | RegionKind::Stack
                | RegionKind::UserState
                | RegionKind::Anonymous { writable: true }
                | RegionKind::Shared { writable: true, .. }
        )
    }
}

/// A page-aligned virtual range `[start, end)` of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// What it holds.
    pub kind: RegionKind,
}

/// Page-fault error code: the page was present (a protection violation).
pub const PF_PRESENT: u64 = 1 << 0;
/// Page-fault error code: the access was a write.
pub const PF_WRITE: u64 = 1 << 1;
/// Page-fault error code: the access was an instruction fetch.
pub const PF_FETCH: u64 = 1 << 4;

/// Classifies a page fault at `addr` with `error_code` raised by a process
/// whose regions are `regions`.
pub fn classify_page_fault(regions: &[Region], addr: u64, error_code: u64) -> FaultKind {
    if addr >= USER_HALF_END {
        return FaultKind::KernelAccess;
    }
    let Some(region) = regions.iter().find(|r| r.start <= addr && addr < r.end) else {
        return FaultKind::UnmappedAccess;
    };
    match region.kind {
        RegionKind::StackGuard => return FaultKind::StackGuard,
        RegionKind::Revoked { .. } => return FaultKind::UseAfterRevoke,
        _ => {}
    }
    // Jumping into data is a no-execute violation whether or not the page
    // was resident yet.
    if error_code & PF_FETCH != 0 && !matches!(region.kind, RegionKind::Code | RegionKind::Gate) {
        return FaultKind::ExecuteNonExecutable;
    }
    if error_code & PF_PRESENT == 0 {
        return FaultKind::UnmappedAccess;
    }
    if error_code & PF_FETCH != 0 {
        return FaultKind::ExecuteNonExecutable;
    }
    if error_code & PF_WRITE != 0 {
        return match region.kind {
            RegionKind::Code | RegionKind::Gate => FaultKind::WriteToCode,
            _ => FaultKind::WriteToReadOnly,
        };
    }
    // A present page that faults on a plain read is supervisor-only.
    FaultKind::KernelAccess
}

/// Classifies any other exception vector raised in ring 3: each
/// architectural exception has a fault of its own; a vector with no name
/// (reserved, or a feature this kernel never enables) is `other-exception`.
pub fn classify_exception(vector: u64) -> FaultKind {
    match vector {
        0 => FaultKind::DivideError,
        1 => FaultKind::DebugException,
        3 => FaultKind::IllegalGateEntry,
        4 => FaultKind::Overflow,
        5 => FaultKind::BoundRangeExceeded,
        6 => FaultKind::InvalidOpcode,
        7 => FaultKind::DeviceNotAvailable,
        10 => FaultKind::InvalidTss,
        11 => FaultKind::SegmentNotPresent,
        12 => FaultKind::StackSegmentFault,
        13 => FaultKind::GeneralProtection,
        16 => FaultKind::X87FloatingPoint,
        17 => FaultKind::AlignmentCheck,
        18 => FaultKind::MachineCheck,
        19 => FaultKind::SimdFloatingPoint,
        21 => FaultKind::ControlProtection,
        _ => FaultKind::OtherException,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGIONS: &[Region] = &[
        Region { start: 0x40_0000, end: 0x40_1000, kind: RegionKind::Code },
        Region { start: 0x40_1000, end: 0x40_2000, kind: RegionKind::ReadOnlyData },
        Region { start: 0x40_2000, end: 0x40_3000, kind: RegionKind::Data },
        Region { start: 0x7000, end: 0x8000, kind: RegionKind::StackGuard },
        Region { start: 0x8000, end: 0x10000, kind: RegionKind::Stack },
        Region { start: 0x1_0000_0000, end: 0x1_0000_1000, kind: RegionKind::Revoked { region: 1 } },
        Region {
            start: 0x1_0000_2000,
            end: 0x1_0000_3000,
            kind: RegionKind::Shared { region: 2, writable: false },
        },
    ];

    #[test]
    fn page_faults_are_classified_by_region_and_error_code() {
        let user = 1 << 2;
        let cases = [
            (0x40_0010, PF_PRESENT | PF_WRITE | user, FaultKind::WriteToCode),
            (0x40_1010, PF_PRESENT | PF_WRITE | user, FaultKind::WriteToReadOnly),
            (0x40_2010, PF_PRESENT | PF_FETCH | user, FaultKind::ExecuteNonExecutable),
            (0x8010, PF_PRESENT | PF_FETCH | user, FaultKind::ExecuteNonExecutable),
            (0x7ff8, PF_WRITE | user, FaultKind::StackGuard),
            (0x50_0000, user, FaultKind::UnmappedAccess),
            (0, user, FaultKind::UnmappedAccess),
            (0xffff_ffff_8010_0000, PF_PRESENT | user, FaultKind::KernelAccess),
            (0x1_0000_0010, user, FaultKind::UseAfterRevoke),
            (0x1_0000_0010, PF_WRITE | user, FaultKind::UseAfterRevoke),
            (0x1_0000_2010, PF_PRESENT | PF_WRITE | user, FaultKind::WriteToReadOnly),
            (0x1_0000_2010, PF_PRESENT | PF_FETCH | user, FaultKind::ExecuteNonExecutable),
        ];
        for (addr, code, expected) in cases {
            assert_eq!(classify_page_fault(REGIONS, addr, code), expected, "addr {addr:#x} code {code:#x}");
        }
    }

    #[test]
    fn other_vectors_have_names() {
        assert_eq!(classify_exception(6), FaultKind::InvalidOpcode);
        assert_eq!(classify_exception(13), FaultKind::GeneralProtection);
        assert_eq!(classify_exception(3), FaultKind::IllegalGateEntry);
        assert_eq!(classify_exception(1), FaultKind::DebugException);
        assert_eq!(classify_exception(16), FaultKind::X87FloatingPoint);
        assert_eq!(classify_exception(17), FaultKind::AlignmentCheck);
        assert_eq!(classify_exception(19), FaultKind::SimdFloatingPoint);
        assert_eq!(classify_exception(7), FaultKind::DeviceNotAvailable);
        assert_eq!(classify_exception(20), FaultKind::OtherException);
        assert_eq!(classify_exception(30), FaultKind::OtherException);
        // Every named vector below 32 maps to a fault other than other-exception.
        let named = (0..32).filter(|&v| classify_exception(v) != FaultKind::OtherException).count();
        assert_eq!(named, 16);
    }
}
