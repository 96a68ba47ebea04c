//! Publishing the kernel's own view for the VMM to check from outside
//! (`superos_protocol::introspect`): the root, the process table and the
//! shared-region table live in kernel statics; the frame-owner table is the
//! allocator's own. They are rewritten before every event the kernel logs, so
//! whenever the VMM looks (at an event, or with the vCPU in ring 3) they
//! agree with the page tables.

use super::memory::image_gpa;
use super::process::ProcessState;
use super::Kernel;
use crate::arch::KernelCell;
use superos_protocol::introspect::{
    FaultRegisters, FrameRange, IntrospectionRoot, ParticipantRecord, ProcessRecord, RegionRecord,
    INTROSPECTION_MAGIC, MAX_FRAME_RANGES, NO_CPU, PARTICIPANT_HOLDS, PARTICIPANT_OFFERED, PROCESS_RECEIVING,
    PROCESS_RUNNABLE, REGION_LIVE, REGION_PARTICIPANTS,
};
use superos_protocol::layout::PAGE_SIZE;
use superos_protocol::PROTOCOL_VERSION;

/// Slots in the published process table (and the most live processes).
pub const PROCESS_CAPACITY: usize = 64;
/// Slots in the published region table (and the most live regions).
pub const REGION_CAPACITY: usize = superos_protocol::syscall::SHM_REGIONS_MAX;

static ROOT: KernelCell<IntrospectionRoot> = KernelCell::new(IntrospectionRoot {
    magic: INTROSPECTION_MAGIC,
    version: PROTOCOL_VERSION,
    generation: 0,
    kernel_pml4: 0,
    gate_frame: 0,
    kernel_text_gpa: 0,
    kernel_text_len: 0,
    process_table_gpa: 0,
    process_capacity: PROCESS_CAPACITY as u32,
    process_record_size: core::mem::size_of::<ProcessRecord>() as u32,
    region_table_gpa: 0,
    region_capacity: REGION_CAPACITY as u32,
    region_record_size: core::mem::size_of::<RegionRecord>() as u32,
    owner_table_gpa: 0,
    owner_table_entries: 0,
    frame_range_count: 0,
    reserved: 0,
    frame_ranges: [FrameRange { start: 0, end: 0, first_index: 0 }; MAX_FRAME_RANGES],
    free_frames: 0,
    total_frames: 0,
    last_fault: FaultRegisters {
        pid: 0,
        vector: 0,
        pml4: 0,
        error_code: 0,
        addr: 0,
        rax: 0,
        rbx: 0,
        rcx: 0,
        rdx: 0,
        rsi: 0,
        rdi: 0,
        rbp: 0,
        rsp: 0,
        r8: 0,
        r9: 0,
        r10: 0,
        r11: 0,
        r12: 0,
        r13: 0,
        r14: 0,
        r15: 0,
        rip: 0,
        rflags: 0,
        cs: 0,
        ss: 0,
    },
    kernel_stack_tops: [0; superos_protocol::cpu::MAX_CPUS as usize],
});

const EMPTY_PROCESS: ProcessRecord = ProcessRecord {
    pid: 0,
    state: 0,
    name: [0; 32],
    pml4: 0,
    virtual_bytes: 0,
    resident_bytes: 0,
    shared_bytes: 0,
    max_virtual_bytes: 0,
    max_resident_bytes: 0,
    max_shared_bytes: 0,
    spec_index: 0,
    policy: 0,
    table_bytes: 0,
    cpu: NO_CPU,
    reserved: 0,
    context_gpa: 0,
};
const EMPTY_PARTICIPANT: ParticipantRecord =
    ParticipantRecord { pid: 0, rights: 0, state: 0, mapped_at: 0, prot: 0, granted_by: 0 };
const EMPTY_REGION: RegionRecord = RegionRecord {
    id: 0,
    state: 0,
    owner: 0,
    frame_count: 0,
    frames_gpa: 0,
    len: 0,
    participants: [EMPTY_PARTICIPANT; REGION_PARTICIPANTS],
};

static PROCESSES: KernelCell<[ProcessRecord; PROCESS_CAPACITY]> =
    KernelCell::new([EMPTY_PROCESS; PROCESS_CAPACITY]);
static REGIONS: KernelCell<[RegionRecord; REGION_CAPACITY]> =
    KernelCell::new([EMPTY_REGION; REGION_CAPACITY]);

/// Fills in the parts of the root that never change (for a VM of
/// `cpu_count` CPUs); returns its GPA.
pub fn init(kernel_text_gpa: u64, kernel_text_len: u64, cpu_count: u32) -> u64 {
    // SAFETY: KernelCell invariant (boot, single CPU, interrupts off).
    let root = unsafe { ROOT.get() };
    root.kernel_text_gpa = kernel_text_gpa;
    root.kernel_text_len = kernel_text_len;
    for (cpu, top) in root.kernel_stack_tops.iter_mut().enumerate().take(cpu_count as usize) {
        *top = crate::arch::tables::kernel_stack_top(cpu as u32);
    }
    root.process_table_gpa = image_gpa(PROCESSES.as_ptr());
    root.region_table_gpa = image_gpa(REGIONS.as_ptr());
    image_gpa(ROOT.as_ptr())
}

/// Publishes the registers of process `pid` (page tables at `pml4`), which
/// is being terminated for `addr`, as `frame` holds them
/// ([`FaultRegisters`]); called before its `process-killed` event.
pub fn publish_fault(pid: u32, pml4: u64, addr: u64, frame: &crate::arch::TrapFrame) {
    // SAFETY: KernelCell invariant (the kernel lock is held).
    let root = unsafe { ROOT.get() };
    root.last_fault = FaultRegisters {
        pid,
        vector: u32::try_from(frame.vector).unwrap_or(u32::MAX),
        pml4,
        error_code: frame.error_code,
        addr,
        rax: frame.rax,
        rbx: frame.rbx,
        rcx: frame.rcx,
        rdx: frame.rdx,
        rsi: frame.rsi,
        rdi: frame.rdi,
        rbp: frame.rbp,
        rsp: frame.rsp,
        r8: frame.r8,
        r9: frame.r9,
        r10: frame.r10,
        r11: frame.r11,
        r12: frame.r12,
        r13: frame.r13,
        r14: frame.r14,
        r15: frame.r15,
        rip: frame.rip,
        rflags: frame.rflags,
        cs: frame.cs,
        ss: frame.ss,
    };
}

/// DEBUG_CORRUPT_INTROSPECTION: points every table of the root at
/// nonsense, as a hostile or broken kernel might. (Publication rewrites only
/// the counters and ranges, so the bad table addresses stay.)
pub fn corrupt() {
    // SAFETY: KernelCell invariant; deliberately breaks the root for a test.
    let root = unsafe { ROOT.get() };
    root.process_table_gpa = u64::MAX - 8;
    root.process_capacity = u32::MAX;
    root.region_table_gpa = 0xdead_beef_0000;
    root.kernel_text_len = u64::MAX;
}

fn published_state(state: ProcessState) -> u32 {
    match state {
        ProcessState::Runnable => PROCESS_RUNNABLE,
        ProcessState::Receiving { .. } => PROCESS_RECEIVING,
    }
}

/// The published record of one process; remembers the counters it shows.
fn process_record(
    boot: &superos_protocol::boot::BootInfo,
    process: &mut super::process::Process,
) -> ProcessRecord {
    let cpu = process.cpu;
    let stat = process.space.stat();
    let state = published_state(process.state);
    process.published = (
        stat.virtual_bytes,
        stat.resident_bytes + process.space.table_pages() * PAGE_SIZE,
        stat.shared_bytes,
        state,
        cpu,
    );
    ProcessRecord {
        pid: process.pid,
        state,
        name: boot.processes()[process.spec_index].name,
        pml4: process.space.pml4(),
        virtual_bytes: stat.virtual_bytes,
        resident_bytes: stat.resident_bytes,
        shared_bytes: stat.shared_bytes,
        max_virtual_bytes: stat.max_virtual_bytes,
        max_resident_bytes: stat.max_resident_bytes,
        max_shared_bytes: stat.max_shared_bytes,
        spec_index: process.spec_index as u32,
        policy: stat.policy,
        table_bytes: process.space.table_pages() * PAGE_SIZE,
        cpu,
        reserved: 0,
        // Processes live in the kernel heap, a static of the image.
        context_gpa: image_gpa(&process.context),
    }
}

impl Kernel {
    /// At the end of a trap: republishes the records of processes whose
    /// counters or state changed without an event (demand-zero faults, pages faulted
    /// in by system calls), so the tables are also consistent whenever the
    /// vCPU is in ring 3.
    pub(super) fn republish_changed(&mut self) {
        // SAFETY: KernelCell invariant; these statics are only used here.
        let (root, processes) = unsafe { (ROOT.get(), PROCESSES.get()) };
        let mut changed = false;
        for (slot, process) in self.processes.iter_mut().enumerate().take(PROCESS_CAPACITY) {
            let stat = process.space.stat();
            let charged = stat.resident_bytes + process.space.table_pages() * PAGE_SIZE;
            let now =
                (stat.virtual_bytes, charged, stat.shared_bytes, published_state(process.state), process.cpu);
            if process.published != now {
                processes[slot] = process_record(self.boot, process);
                changed = true;
                // The next full publication clears this slot if it is
                // empty by then.
                self.published_slots.0 = self.published_slots.0.max(slot + 1);
            }
        }
        if changed {
            root.generation += 1;
            root.free_frames = self.memory.frames.free_frames();
        }
    }

    /// Rewrites the published tables from the kernel's state.
    pub(super) fn publish(&mut self) {
        // SAFETY: KernelCell invariant; these statics are only used here.
        let (root, processes, regions) = unsafe { (ROOT.get(), PROCESSES.get(), REGIONS.get()) };
        root.generation += 1;
        root.kernel_pml4 = self.kernel_pml4;
        root.gate_frame = self.gate_frame;
        let (owners_gpa, entries) = self.owner_table;
        root.owner_table_gpa = owners_gpa;
        root.owner_table_entries = entries;
        let mut count = 0;
        for (start, end, first_index) in self.memory.frames.indexed_ranges().take(MAX_FRAME_RANGES) {
            root.frame_ranges[count] = FrameRange { start, end, first_index };
            count += 1;
        }
        root.frame_range_count = count as u32;
        root.free_frames = self.memory.frames.free_frames();
        root.total_frames = self.memory.frames.total_frames();

        // Only slots in use now or last time need writing (every ring-0 store
        // is emulated on some hosts).
        let process_slots = self.processes.len().max(self.published_slots.0).min(PROCESS_CAPACITY);
        let live_regions = self.shm.regions();
        let region_slots = live_regions.len().max(self.published_slots.1).min(REGION_CAPACITY);
        self.published_slots = (self.processes.len(), live_regions.len());
        for (slot, record) in processes[..process_slots].iter_mut().enumerate() {
            *record = match self.processes.get_mut(slot) {
                None => EMPTY_PROCESS,
                Some(process) => process_record(self.boot, process),
            };
        }
        for (slot, record) in regions[..region_slots].iter_mut().enumerate() {
            *record = match live_regions.get(slot) {
                None => EMPTY_REGION,
                Some(region) => {
                    let mut participants = [EMPTY_PARTICIPANT; REGION_PARTICIPANTS];
                    for (out, p) in participants.iter_mut().zip(&region.participants) {
                        let (mapped_at, prot) = p.mapping.unwrap_or((0, 0));
                        *out = ParticipantRecord {
                            pid: p.pid,
                            rights: p.rights.bits() as u16,
                            state: if p.accepted { PARTICIPANT_HOLDS } else { PARTICIPANT_OFFERED },
                            mapped_at,
                            prot: prot as u32,
                            granted_by: p.granted_by,
                        };
                    }
                    RegionRecord {
                        id: region.id,
                        state: REGION_LIVE,
                        owner: region.owner,
                        frame_count: region.frames.len() as u32,
                        frames_gpa: image_gpa(region.frames.as_ptr()),
                        len: region.byte_len(),
                        participants,
                    }
                }
            };
        }
    }
}
