//! The boot-info block: everything the kernel learns from the VMM at boot.
//!
//! The VMM writes one [`BootInfo`] at [`crate::layout::BOOT_INFO_GPA`] and passes
//! that guest-physical address in `rdi` at the kernel entry point. The kernel
//! validates `magic` and `version` before trusting anything else in it, and
//! bounds-checks every count against the fixed array it indexes.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `BootInfo::magic`: "SUPEROS\0" little-endian.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"SUPEROS\0");
/// Capacity of [`BootInfo::memory_map`].
pub const MAX_MEMORY_REGIONS: usize = 16;
/// Capacity of [`BootInfo::programs`].
pub const MAX_PROGRAMS: usize = 32;
/// Capacity of [`BootInfo::processes`]: the most processes a scenario may start.
pub const MAX_BOOT_PROCESSES: usize = 32;
/// Length of a program or process name field.
pub const NAME_LEN: usize = 32;
/// Length of a process argument field (also [`crate::layout::USER_ARGS_MAX`]).
pub const ARGS_LEN: usize = 128;

/// Which kind of KVM host the VMM runs on, as detected by the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum HostFlavor {
    /// Ordinary KVM on Intel VT-x or AMD-V: `syscall` works from ring 3.
    Kvm = 1,
    /// The PVM-based KVM fork (`/sys/module/kvm_pvm` exists): ring 0 is emulated
    /// and `syscall` from ring 3 does not enter ring 0, so the `int3` gate is used.
    Pvm = 2,
}

impl HostFlavor {
    /// Decodes the raw field; unknown values yield `None`.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::Kvm),
            2 => Some(Self::Pvm),
            _ => None,
        }
    }
}

/// Which system-call gate the kernel should try first. The kernel confirms its
/// choice with a boot-time self-test and falls back to the other gate if it fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum GatePreference {
    /// Pick from the host flavor: `syscall` on ordinary KVM, `int3` on PVM.
    Auto = 0,
    /// Try `syscall`/`sysret`-style entry first.
    Syscall = 1,
    /// Try the `int3` trap gate first.
    Int3 = 2,
}

impl GatePreference {
    /// Decodes the raw field; unknown values yield `None`.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Auto),
            1 => Some(Self::Syscall),
            2 => Some(Self::Int3),
            _ => None,
        }
    }
}

/// How the kernel zeroes freed frames before they can be handed out again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ScrubStrategy {
    /// Pick from the host flavor: [`Self::Hypercall`] on PVM (where ring-0
    /// stores are emulated one by one), [`Self::Kernel`] on ordinary KVM.
    Auto = 0,
    /// The kernel zeroes each frame itself (`rep stosq`).
    Kernel = 1,
    /// The kernel hands batches of freed frames to the VMM
    /// ([`crate::hypercall::Hypercall::ScrubFrames`]), which zeroes them.
    Hypercall = 2,
}

impl ScrubStrategy {
    /// Decodes the raw field; unknown values yield `None`.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Auto),
            1 => Some(Self::Kernel),
            2 => Some(Self::Hypercall),
            _ => None,
        }
    }
}

/// When the kernel makes the [`crate::hypercall::Hypercall::EventNotify`]
/// hypercall (a VM exit) for the events it appends to its ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum EventNotifyPolicy {
    /// After every event, with its published tables consistent: the VMM
    /// checks, tampers or answers the control socket at events.
    EveryEvent = 0,
    /// Only when the ring is half full, at the first timer tick with events
    /// unannounced, and before it stops: the VMM drains the ring at every
    /// hypercall it handles anyway, so a run that only checks at its end
    /// pays no VM exit per event.
    Batched = 1,
}

impl EventNotifyPolicy {
    /// Decodes the raw field; unknown values yield `None` (the kernel then
    /// notifies at every event, the safe choice).
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::EveryEvent),
            1 => Some(Self::Batched),
            _ => None,
        }
    }
}

/// `MemoryRegion::kind`: RAM the kernel may allocate from.
pub const MEMORY_USABLE: u32 = 1;
/// `MemoryRegion::kind`: boot info and boot page tables.
pub const MEMORY_BOOT_DATA: u32 = 2;
/// `MemoryRegion::kind`: the loaded kernel image.
pub const MEMORY_KERNEL_IMAGE: u32 = 3;
/// `MemoryRegion::kind`: user program ELF images placed by the VMM.
pub const MEMORY_PROGRAM_IMAGES: u32 = 4;

/// One entry of the physical memory map. Regions are page-aligned, sorted and
/// disjoint; memory not covered by any region must not be used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct MemoryRegion {
    /// Guest-physical start address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// One of the `MEMORY_*` kinds.
    pub kind: u32,
    /// Always zero.
    pub reserved: u32,
}

/// A user program image (an ELF file) placed in guest memory by the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ProgramImage {
    /// Guest-physical address of the first byte of the ELF file.
    pub gpa: u64,
    /// Length of the ELF file in bytes.
    pub len: u64,
    /// Program name, NUL-padded UTF-8 (see [`crate::name_from_array`]).
    pub name: [u8; NAME_LEN],
}

/// `QuotaSpec::policy`: a violation fails the allocation (an error to the caller).
pub const QUOTA_POLICY_FAIL: u32 = 0;
/// `QuotaSpec::policy`: a violation terminates the process.
pub const QUOTA_POLICY_KILL: u32 = 1;

/// Memory quotas of one process. Zero means "no limit beyond guest memory".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct QuotaSpec {
    /// Maximum virtual size in bytes (image + stack + mappings).
    pub max_virtual_bytes: u64,
    /// Maximum resident set size in bytes.
    pub max_resident_bytes: u64,
    /// Maximum shared memory in bytes (created or mapped).
    pub max_shared_bytes: u64,
    /// `QUOTA_POLICY_FAIL` or `QUOTA_POLICY_KILL`.
    pub policy: u32,
    /// Always zero.
    pub reserved: u32,
}

/// One process the kernel starts at boot, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ProcessSpec {
    /// Index into [`BootInfo::programs`].
    pub program: u32,
    /// Number of valid bytes in `args`.
    pub args_len: u32,
    /// Process name shown in logs, NUL-padded UTF-8.
    pub name: [u8; NAME_LEN],
    /// Argument bytes handed to the program's entry point.
    pub args: [u8; ARGS_LEN],
    /// The process's memory quotas.
    pub quota: QuotaSpec,
    /// How many times to start the program in a row (0 and 1 mean once):
    /// each run begins when the previous one has ended.
    pub runs: u32,
    /// Always zero.
    pub reserved: u32,
}

/// `BootInfo::debug_flags`: panic right after the kernel has initialised (to test
/// the VMM's panic report).
pub const DEBUG_PANIC_AFTER_BOOT: u32 = 1 << 0;
/// `BootInfo::debug_flags`: load an empty IDT and fault, forcing a triple fault
/// (to test the VMM's shutdown diagnosis).
pub const DEBUG_TRIPLE_FAULT: u32 = 1 << 1;
/// `BootInfo::debug_flags`: send deliberately malformed hypercalls at boot and
/// check that each is refused with an error status.
pub const DEBUG_BAD_HYPERCALLS: u32 = 1 << 2;
/// `BootInfo::debug_flags`: flood the VMM with thousands of malformed
/// hypercalls and writes to unknown ports (the VMM must stay bounded).
pub const DEBUG_HYPERCALL_FLOOD: u32 = 1 << 3;
/// `BootInfo::debug_flags`: corrupt the event ring header after boot.
pub const DEBUG_CORRUPT_EVENT_RING: u32 = 1 << 4;
/// `BootInfo::debug_flags`: corrupt the introspection root after boot.
pub const DEBUG_CORRUPT_INTROSPECTION: u32 = 1 << 5;
/// `BootInfo::debug_flags`: spin forever in ring 0 after boot (only the
/// VMM's watchdog ends the run).
pub const DEBUG_SPIN_IN_KERNEL: u32 = 1 << 6;
/// `BootInfo::debug_flags`: announce a wrong protocol version in a first
/// boot hello (the VMM must refuse it) before the real one.
pub const DEBUG_BAD_HELLO: u32 = 1 << 7;
/// `BootInfo::debug_flags`: act as a compromised ring 0 after boot: clear
/// CR0.WP and overwrite the first byte of the kernel's own text through its
/// (read-only) kernel-window mapping. The VMM registers kernel text and
/// read-only data as a read-only memory slot, so the write must be stopped
/// by the hypervisor and reported as `kernel-text-unchanged`.
pub const DEBUG_WRITE_KERNEL_TEXT: u32 = 1 << 8;

/// Free the first non-zero frame released after boot without zeroing it
/// (whatever the scrub strategy), as a kernel that forgets to scrub would:
/// `free-frames-scrubbed` must report it, although an earlier check found
/// that frame zero (the VMM's write log must show the guest's writes).
pub const DEBUG_SKIP_ONE_SCRUB: u32 = 1 << 9;

/// `BootInfo::debug_flags`: act as a hostile kernel that floods the VMM's
/// console forever: 4095-byte writes without a newline, each from a new
/// `source_pid`, alternating with 4096-byte lines. Only the VMM's watchdog
/// ends the run; the VMM must keep a bounded console and count the rest.
pub const DEBUG_CONSOLE_FLOOD: u32 = 1 << 10;
/// `BootInfo::debug_flags`: act as a hostile kernel that floods the VMM
/// with events forever (one record and notify after another). Only the
/// watchdog ends the run; the VMM must keep a bounded number of events and
/// count the rest.
pub const DEBUG_EVENT_FLOOD: u32 = 1 << 11;
/// `BootInfo::debug_flags`: send the boot hello a second time once booted,
/// as a kernel that wanted a new text baseline (after patching its text)
/// would: the VMM must report it as a violation, never re-baseline.
pub const DEBUG_SECOND_HELLO: u32 = 1 << 12;
/// Checker self-test: revocation is not transitive (a capability derived
/// from a revoked one survives), which `revocation-complete` must report.
pub const DEBUG_SHALLOW_REVOCATION: u32 = 1 << 13;
/// `BootInfo::debug_flags`: the worst hostile kernel for the VMM's memory:
/// writes every usable page of guest RAM outside the kernel image (each
/// word rewritten with its own value: all of guest RAM resident in the VMM),
/// then floods forever with everything [`DEBUG_CONSOLE_FLOOD`] and
/// [`DEBUG_EVENT_FLOOD`] send, interleaved: partial lines from ever-new
/// pids, whole lines, the largest scrub request and a full event ring per
/// round. Only the watchdog ends the run.
pub const DEBUG_ALL_FLOOD: u32 = 1 << 14;
/// `BootInfo::debug_flags`: the kernel never asks another CPU to flush its
/// TLB (no shootdown IPI): the bug the SMP revocation tests must catch on
/// a host whose TLB keeps stale translations (ordinary KVM).
pub const DEBUG_SKIP_SHOOTDOWN: u32 = 1 << 15;

/// The boot-info block (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`crate::PROTOCOL_VERSION`] of the VMM that wrote this block.
    pub version: u32,
    /// [`HostFlavor`] as a raw value.
    pub host_flavor: u32,
    /// [`GatePreference`] as a raw value.
    pub gate_preference: u32,
    /// `DEBUG_*` flags; zero in normal runs.
    pub debug_flags: u32,
    /// Guest RAM size in bytes.
    pub mem_size: u64,
    /// Guest TSC frequency in kHz (0 if unknown).
    pub tsc_khz: u64,
    /// Guest-physical range of the loaded kernel image.
    pub kernel_phys_start: u64,
    /// One past the end of the kernel image (including bss).
    pub kernel_phys_end: u64,
    /// Valid entries in `memory_map`.
    pub memory_map_len: u32,
    /// Valid entries in `programs`.
    pub program_count: u32,
    /// Valid entries in `processes`.
    pub process_count: u32,
    /// [`ScrubStrategy`] as a raw value.
    pub scrub_strategy: u32,
    /// vCPUs the VM has (1 ..= [`crate::cpu::MAX_CPUS`]): the kernel starts
    /// the others with [`crate::hypercall::Hypercall::CpuStart`].
    pub cpu_count: u32,
    /// [`EventNotifyPolicy`] as a raw value: when the kernel tells the VMM about
    /// the events it appended to its ring.
    pub event_notify: u32,
    /// Nonzero: keep the trace ring ([`crate::trace`]) for `run --trace`
    /// (and answer every `getpid` under the lock, so that it is traced).
    pub trace: u32,
    /// Always zero.
    pub reserved: u32,
    /// Physical memory map.
    pub memory_map: [MemoryRegion; MAX_MEMORY_REGIONS],
    /// Program images placed by the VMM.
    pub programs: [ProgramImage; MAX_PROGRAMS],
    /// Processes to start, in order.
    pub processes: [ProcessSpec; MAX_BOOT_PROCESSES],
}

impl BootInfo {
    /// The valid part of the memory map, clamped to its capacity.
    pub fn memory_map(&self) -> &[MemoryRegion] {
        &self.memory_map[..(self.memory_map_len as usize).min(MAX_MEMORY_REGIONS)]
    }
    /// The valid program images, clamped to capacity.
    pub fn programs(&self) -> &[ProgramImage] {
        &self.programs[..(self.program_count as usize).min(MAX_PROGRAMS)]
    }
    /// The processes to start, clamped to capacity.
    pub fn processes(&self) -> &[ProcessSpec] {
        &self.processes[..(self.process_count as usize).min(MAX_BOOT_PROCESSES)]
    }
}

const _: () = {
    assert!(core::mem::size_of::<MemoryRegion>() == 24);
    assert!(core::mem::size_of::<ProgramImage>() == 48);
    assert!(core::mem::size_of::<QuotaSpec>() == 32);
    assert!(core::mem::size_of::<ProcessSpec>() == 208);
    assert!(core::mem::size_of::<BootInfo>() as u64 <= crate::layout::BOOT_INFO_MAX_SIZE);
    assert!(ARGS_LEN as u64 == crate::layout::USER_ARGS_MAX);
};

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;
    use zerocopy::FromZeros;

    #[test]
    fn boot_info_layout_is_stable() {
        assert_eq!(offset_of!(BootInfo, magic), 0);
        assert_eq!(offset_of!(BootInfo, version), 8);
        assert_eq!(offset_of!(BootInfo, mem_size), 24);
        assert_eq!(offset_of!(BootInfo, memory_map_len), 56);
        assert_eq!(offset_of!(BootInfo, cpu_count), 72);
        assert_eq!(offset_of!(BootInfo, trace), 80);
        assert_eq!(offset_of!(BootInfo, memory_map), 88);
        assert_eq!(offset_of!(BootInfo, programs), 88 + 16 * 24);
        assert_eq!(offset_of!(BootInfo, processes), 88 + 16 * 24 + 32 * 48);
        assert_eq!(core::mem::size_of::<BootInfo>(), 88 + 16 * 24 + 32 * 48 + 32 * 208);
        assert_eq!(offset_of!(ProcessSpec, quota), 168);
    }

    #[test]
    fn counts_are_clamped_to_capacity() {
        let mut info = BootInfo::new_zeroed();
        info.memory_map_len = u32::MAX;
        info.program_count = 1000;
        info.process_count = 33;
        assert_eq!(info.memory_map().len(), MAX_MEMORY_REGIONS);
        assert_eq!(info.programs().len(), MAX_PROGRAMS);
        assert_eq!(info.processes().len(), MAX_BOOT_PROCESSES);
    }

    #[test]
    fn enums_decode_only_known_values() {
        assert_eq!(HostFlavor::from_raw(2), Some(HostFlavor::Pvm));
        assert_eq!(HostFlavor::from_raw(0), None);
        assert_eq!(GatePreference::from_raw(1), Some(GatePreference::Syscall));
        assert_eq!(GatePreference::from_raw(3), None);
    }
}
