//! The introspection root: the kernel's own account of the system, published
//! in guest memory for the VMM to compare against the page tables it walks
//! itself. Nothing here is trusted by the VMM; it is the claim under test.
//!
//! The kernel announces the root's guest-physical address in
//! [`crate::hypercall::BootHelloParams::introspection_root_gpa`]. The tables
//! are updated before every event the kernel logs, so at every
//! `EventNotify`/`Shutdown` hypercall (and whenever the vCPU is stopped in
//! ring 3) they are consistent with the page tables. `generation` changes
//! whenever the tables do.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `IntrospectionRoot::magic`: "INSP".
pub const INTROSPECTION_MAGIC: u32 = u32::from_le_bytes(*b"INSP");
/// Capacity of [`IntrospectionRoot::frame_ranges`].
pub const MAX_FRAME_RANGES: usize = 16;

/// A range of frames managed by the allocator: frame `start + i * 4096` has
/// its owner at index `first_index + i` of the owner table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct FrameRange {
    /// First frame (guest-physical).
    pub start: u64,
    /// One past the last frame.
    pub end: u64,
    /// Owner-table index of `start`.
    pub first_index: u64,
}

/// Where everything is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct IntrospectionRoot {
    /// [`INTROSPECTION_MAGIC`].
    pub magic: u32,
    /// [`crate::PROTOCOL_VERSION`].
    pub version: u32,
    /// Changes whenever any table below changes.
    pub generation: u64,
    /// The kernel's own PML4 (its kernel half is shared by every process).
    pub kernel_pml4: u64,
    /// The gate page frame: kernel-owned, the only kernel frame users may map
    /// (read-only, executable).
    pub gate_frame: u64,
    /// Guest-physical start of the kernel's text section.
    pub kernel_text_gpa: u64,
    /// Its length.
    pub kernel_text_len: u64,
    /// GPA of `process_capacity` [`ProcessRecord`]s.
    pub process_table_gpa: u64,
    /// Slots in the process table.
    pub process_capacity: u32,
    /// `size_of::<ProcessRecord>()`.
    pub process_record_size: u32,
    /// GPA of `region_capacity` [`RegionRecord`]s.
    pub region_table_gpa: u64,
    /// Slots in the region table.
    pub region_capacity: u32,
    /// `size_of::<RegionRecord>()`.
    pub region_record_size: u32,
    /// GPA of the owner table: one `u32` per managed frame, encoded with
    /// [`crate::ownership::FrameOwner::encode`].
    pub owner_table_gpa: u64,
    /// Entries in the owner table.
    pub owner_table_entries: u64,
    /// Valid entries in `frame_ranges`.
    pub frame_range_count: u32,
    /// Always zero.
    pub reserved: u32,
    /// The managed frame ranges.
    pub frame_ranges: [FrameRange; MAX_FRAME_RANGES],
    /// Free frames according to the allocator.
    pub free_frames: u64,
    /// Managed frames.
    pub total_frames: u64,
    /// The registers of the last process a fault or kill terminated.
    pub last_fault: FaultRegisters,
    /// Each CPU's kernel stack top (kernel virtual address; 0 for a CPU
    /// that does not exist). An entry from ring 3 saves the user registers
    /// as a [`UserContext`] right below it, so while a CPU is in the kernel
    /// on behalf of its current process that process's registers are there.
    pub kernel_stack_tops: [u64; crate::cpu::MAX_CPUS as usize],
}

/// The user registers as the kernel's trap entry saves them, lowest address
/// first: what it pushes on the top of the CPU's kernel stack on an entry
/// from ring 3 ([`IntrospectionRoot::kernel_stack_tops`]), and what it keeps
/// for a process that is not running ([`ProcessRecord::context_gpa`]).
/// `vector` is the entry's (an exception vector or the system-call gate's);
/// `error_code` 0 where the CPU pushes none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
#[allow(missing_docs)]
pub struct UserContext {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// The user registers of the last process the kernel terminated for a fault
/// (or killed: quota, deadlock), as it had them at that point (a fault's
/// registers are those the CPU trapped with; a system call's, those the call
/// was made with). Written just before the process's `process-killed` event,
/// while its page tables are still whole, so that the VMM can write a core
/// file at that event (`superos-vmm run --core-dir`). Nothing here is
/// trusted: the VMM takes it only for the pid the event names, and reads
/// memory only through the page tables it walks itself. `pid` 0: no process
/// has been killed yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct FaultRegisters {
    /// The process.
    pub pid: u32,
    /// The trap's vector (0 for a kill that was no trap).
    pub vector: u32,
    /// Its PML4, not yet torn down when the event is logged.
    pub pml4: u64,
    /// The exception's error code (0 where there is none).
    pub error_code: u64,
    /// The faulting address, as in the event.
    pub addr: u64,
    #[allow(missing_docs)]
    pub rax: u64,
    #[allow(missing_docs)]
    pub rbx: u64,
    #[allow(missing_docs)]
    pub rcx: u64,
    #[allow(missing_docs)]
    pub rdx: u64,
    #[allow(missing_docs)]
    pub rsi: u64,
    #[allow(missing_docs)]
    pub rdi: u64,
    #[allow(missing_docs)]
    pub rbp: u64,
    #[allow(missing_docs)]
    pub rsp: u64,
    #[allow(missing_docs)]
    pub r8: u64,
    #[allow(missing_docs)]
    pub r9: u64,
    #[allow(missing_docs)]
    pub r10: u64,
    #[allow(missing_docs)]
    pub r11: u64,
    #[allow(missing_docs)]
    pub r12: u64,
    #[allow(missing_docs)]
    pub r13: u64,
    #[allow(missing_docs)]
    pub r14: u64,
    #[allow(missing_docs)]
    pub r15: u64,
    #[allow(missing_docs)]
    pub rip: u64,
    #[allow(missing_docs)]
    pub rflags: u64,
    #[allow(missing_docs)]
    pub cs: u64,
    #[allow(missing_docs)]
    pub ss: u64,
}

/// `ProcessRecord::state`: the slot is empty.
pub const PROCESS_FREE: u32 = 0;
/// `ProcessRecord::state`: runnable (or running).
pub const PROCESS_RUNNABLE: u32 = 1;
/// `ProcessRecord::state`: blocked in `ipc_recv`.
pub const PROCESS_RECEIVING: u32 = 2;

/// One live process, as the kernel sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ProcessRecord {
    /// Its pid (0 in an empty slot).
    pub pid: u32,
    /// `PROCESS_*`.
    pub state: u32,
    /// Name, NUL-padded.
    pub name: [u8; 32],
    /// GPA of its PML4.
    pub pml4: u64,
    /// Virtual size the kernel counts.
    pub virtual_bytes: u64,
    /// Private resident bytes the kernel counts.
    pub resident_bytes: u64,
    /// Shared bytes mapped, as the kernel counts them.
    pub shared_bytes: u64,
    /// Quotas (0 = none).
    pub max_virtual_bytes: u64,
    /// Resident quota.
    pub max_resident_bytes: u64,
    /// Shared quota.
    pub max_shared_bytes: u64,
    /// Index of its boot spec.
    pub spec_index: u32,
    /// `QUOTA_POLICY_*`.
    pub policy: u32,
    /// Bytes of its page tables (user half and PML4, frames owned
    /// `PageTable(pid)`), charged to the resident quota with
    /// `resident_bytes`.
    pub table_bytes: u64,
    /// The CPU running it (or switching to or from it), [`NO_CPU`] if none.
    pub cpu: u32,
    /// Zero.
    pub reserved: u32,
    /// GPA of the [`UserContext`] the kernel keeps for it: its registers
    /// whenever no CPU runs it (`cpu` is [`NO_CPU`]); stale while one does.
    pub context_gpa: u64,
}

/// [`ProcessRecord::cpu`] of a process no CPU runs.
pub const NO_CPU: u32 = u32::MAX;

/// Most participants a region records (owner included).
pub const REGION_PARTICIPANTS: usize = crate::syscall::SHM_PARTICIPANTS_MAX;

/// One participant of a shared region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ParticipantRecord {
    /// Its pid (0 in an empty slot).
    pub pid: u32,
    /// `RIGHT_*` bits of its capability (or of the offer).
    pub rights: u16,
    /// `PARTICIPANT_*`: whether it holds a capability or has only been
    /// offered one.
    pub state: u16,
    /// Where it has the region mapped (0 if not mapped).
    pub mapped_at: u64,
    /// `PROT_*` of that mapping.
    pub prot: u32,
    /// The pid whose capability this one was derived from (the owner's own
    /// entry: the owner). Revoking that capability revokes this one
    /// (`revocation-complete` checks the chain reaches the owner).
    pub granted_by: u32,
}

/// `ParticipantRecord::state`: it holds a capability (it accepted an offer,
/// or it is the owner).
pub const PARTICIPANT_HOLDS: u16 = 0;
/// `ParticipantRecord::state`: it has been offered a capability
/// (`shm_grant`) and has not accepted it (`shm_accept`): it holds nothing
/// and cannot map the region.
pub const PARTICIPANT_OFFERED: u16 = 1;

/// `RegionRecord::state`: the slot is empty.
pub const REGION_FREE: u32 = 0;
/// `RegionRecord::state`: the region is live.
pub const REGION_LIVE: u32 = 1;

/// One shared region, as the kernel sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RegionRecord {
    /// Region id (`MEM_SHARE:<id>`; 0 in an empty slot).
    pub id: u32,
    /// `REGION_*`.
    pub state: u32,
    /// The owner's pid.
    pub owner: u32,
    /// Number of frames.
    pub frame_count: u32,
    /// GPA of an array of `frame_count` u64 frame addresses.
    pub frames_gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Processes holding or offered a capability for it.
    pub participants: [ParticipantRecord; REGION_PARTICIPANTS],
}

const _: () = {
    assert!(core::mem::size_of::<FrameRange>() == 24);
    assert!(core::mem::size_of::<FaultRegisters>() == 32 + 20 * 8);
    assert!(
        core::mem::size_of::<IntrospectionRoot>()
            == 104
                + 24 * MAX_FRAME_RANGES
                + 16
                + core::mem::size_of::<FaultRegisters>()
                + 8 * crate::cpu::MAX_CPUS as usize
    );
    assert!(core::mem::size_of::<UserContext>() == 22 * 8);
    assert!(core::mem::size_of::<ProcessRecord>() == 128);
    assert!(core::mem::size_of::<ParticipantRecord>() == 24);
    assert!(core::mem::size_of::<RegionRecord>() == 32 + 24 * REGION_PARTICIPANTS);
};

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn layouts_are_stable() {
        assert_eq!(offset_of!(IntrospectionRoot, process_table_gpa), 48);
        assert_eq!(offset_of!(IntrospectionRoot, owner_table_gpa), 80);
        assert_eq!(offset_of!(IntrospectionRoot, frame_ranges), 104);
        assert_eq!(offset_of!(IntrospectionRoot, last_fault), 104 + 24 * MAX_FRAME_RANGES + 16);
        assert_eq!(offset_of!(FaultRegisters, rip), 32 + 16 * 8);
        assert_eq!(offset_of!(ProcessRecord, pml4), 40);
        assert_eq!(offset_of!(ProcessRecord, context_gpa), 120);
        assert_eq!(offset_of!(UserContext, rip), 17 * 8);
        assert_eq!(offset_of!(UserContext, ss), 21 * 8);
        assert_eq!(offset_of!(RegionRecord, participants), 32);
    }
}
