//! The kernel proper: boot, processes, scheduling, system calls, fault
//! handling, and the link to the VMM.
//!
//! Control flow: the VMM enters [`kernel_main`] in long mode. It sets up the
//! CPU, the frame allocator and the kernel's own page tables, then runs the
//! system-call gate self-test as a tiny ring-3 context. From then on the kernel
//! only runs in [`trap_dispatch`], called by the assembly stubs on every entry
//! from ring 3 with the interrupted context in a [`TrapFrame`]; switching
//! processes means replacing that frame before it is resumed.
//!
//! Modules: [`host`] (hypercalls, console, panic, event ring), [`memory`]
//! (direct map, frames and scrubbing), [`process`] (creation, scheduling,
//! termination), [`syscalls`] (the system calls, IPC included), [`shm`]
//! (shared regions and capabilities), [`introspect`] (the tables the VMM
//! checks).

pub mod fast;
pub mod host;
pub mod introspect;
pub mod memory;
pub mod process;
pub mod shm;
pub mod smp;
pub mod syscalls;
pub mod trace;
pub mod user_cpu;

use crate::address_space::{AddressSpace, Memory};
use crate::arch::entry::{enter_user, foreign_entry_table, syscall_entry_table};
use crate::arch::user_state::pending_x87_instruction;
use crate::arch::{
    cpu, lapic, tables, KernelCell, TrapFrame, FLUSH_VECTOR, FOREIGN_ENTRY_VECTOR, SPURIOUS_VECTOR,
    SYSCALL_VECTOR, TIMER_VECTOR, WAKE_VECTOR,
};
use crate::fault::classify_exception;
use crate::frame::FrameAllocator;
use crate::paging::{self, PageSize, KERNEL_TABLE_FLAGS};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};
use host::{append_event, hypercall, hypercall_with, log_event, report_panic, ExceptionInfo};
use memory::{direct, KernelMemory, KernelTables, Scrub};
use process::Process;
use superos_protocol::boot::{
    self, BootInfo, EventNotifyPolicy, GatePreference, HostFlavor, ScrubStrategy, MEMORY_USABLE,
};
use superos_protocol::cpu::MAX_CPUS;
use superos_protocol::event::{Event, FaultKind, QuotaKind};
use superos_protocol::hypercall::{self as hc, Hypercall};
use superos_protocol::layout::*;
use superos_protocol::ownership::FrameOwner;
use superos_protocol::syscall::{self as sc, GateInfo, Syscall, SHM_PAGES_MAX};
use superos_protocol::PROTOCOL_VERSION;
use x86_64::structures::paging::PageTableFlags as Flags;

// ---------------------------------------------------------------------------
// Kernel heap

/// The kernel heap. What processes can make the kernel keep in it is
/// bounded: at most [`sc::MAPPINGS_MAX`] map entries per process (and
/// [`sc::REVOKED_MAX`] revoked ranges, in a vector whose capacity never
/// exceeds both), frame lists of
/// at most [`SHM_PAGES_MAX`] shared pages in all, [`sc::SHM_REGIONS_MAX`] regions,
/// and fixed-size capability tables and mailboxes. Those bounds plus
/// [`HEAP_RESERVE`] fit (checked below), and shared regions' frame lists are
/// also only allocated while the reserve stays free (`Memory::heap_room`,
/// which covers fragmentation), so no process can exhaust the heap and panic
/// the kernel.
const HEAP_SIZE: usize = 1024 * 1024;

/// Heap the kernel keeps for its own work (process tables, capability
/// tables, regions, events, temporary lists).
pub const HEAP_RESERVE: usize = 192 * 1024;

const _: () = assert!(
    introspect::PROCESS_CAPACITY
        * crate::address_space::REGIONS_CAP
        * core::mem::size_of::<crate::fault::Region>()
        + SHM_PAGES_MAX as usize * core::mem::size_of::<u64>()
        + memory::DYING_FRAMES_MAX * core::mem::size_of::<u64>()
        + memory::DYING_MAX * core::mem::size_of::<memory::Dying>() * 2
        + HEAP_RESERVE
        <= HEAP_SIZE
);

/// Free bytes in the kernel heap.
pub fn heap_free() -> usize {
    ALLOCATOR.lock().free()
}

#[global_allocator]
static ALLOCATOR: linked_list_allocator::LockedHeap = linked_list_allocator::LockedHeap::empty();

#[repr(C, align(4096))]
struct HeapSpace {
    bytes: [u8; HEAP_SIZE],
}
static HEAP_SPACE: KernelCell<HeapSpace> = KernelCell::new(HeapSpace { bytes: [0; HEAP_SIZE] });

// ---------------------------------------------------------------------------
// The system-call gate

/// Which instruction enters the kernel from the gate page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    Syscall,
    Int3,
}

impl Gate {
    fn kind(self) -> u32 {
        match self {
            Gate::Syscall => sc::GATE_KIND_SYSCALL,
            Gate::Int3 => sc::GATE_KIND_INT3,
        }
    }
    fn other(self) -> Gate {
        match self {
            Gate::Syscall => Gate::Int3,
            Gate::Int3 => Gate::Syscall,
        }
    }
    /// The instruction that enters the kernel.
    fn instruction(self) -> &'static [u8] {
        &self.stub()[..self.stub().len() - 1]
    }
    /// The stub at the start of the gate page: the entry instruction, then `ret`.
    fn stub(self) -> &'static [u8] {
        match self {
            Gate::Syscall => &[0x0f, 0x05, 0xc3],
            Gate::Int3 => &[0xcc, 0xc3],
        }
    }
    /// Where the trap frame's RIP points after a legitimate entry.
    fn return_rip(self) -> u64 {
        GATE_VA + self.stub().len() as u64 - 1
    }
    fn vector(self) -> u64 {
        match self {
            Gate::Syscall => SYSCALL_VECTOR,
            Gate::Int3 => 3,
        }
    }
}

enum Phase {
    /// The gate self-test context is running; `tried_other` once the
    /// preferred gate has failed.
    GateSelfTest { tried_other: bool },
    /// Scenario processes are running.
    Running,
}

/// All kernel state after boot.
pub struct Kernel {
    boot: &'static BootInfo,
    memory: KernelMemory,
    kernel_pml4: u64,
    gate: Gate,
    gate_frame: u64,
    phase: Phase,
    /// The address space the gate self-test runs in (only the gate page).
    self_test: Option<AddressSpace>,
    processes: Vec<Process>,
    /// The CPU holding the big kernel lock (the one running kernel code).
    cpu: u32,
    /// Per CPU: index into `processes` of the process whose context is live
    /// in that CPU's trap frame (or whose switch stub runs there).
    current: [Option<usize>; MAX_CPUS as usize],
    /// CPUs in the idle context (a mask).
    idle: u32,
    /// Where the round-robin scan resumes when the current process is gone.
    resume_at: usize,
    next_pid: u32,
    /// Runs started so far, per boot process.
    runs_started: Vec<u32>,
    spawned: u64,
    ticks: u64,
    /// Per CPU: a process was just switched in: the next timer tick
    /// (possibly one left pending while the kernel ran a long slice for
    /// another) does not preempt it, so it gets at least one whole timer
    /// period.
    fresh_slice: [bool; MAX_CPUS as usize],
    pool_low_reported: bool,
    /// The VMM asked for events in batches ([`EventNotifyPolicy::Batched`]):
    /// [`Kernel::emit`] appends, and notifies only when the ring is half
    /// full; the timer tick and [`Kernel::finish`] announce the rest.
    events_batched: bool,
    /// The tick of the last announcement ([`Kernel::announce_events`]).
    events_announced_at: u64,
    /// Live shared regions.
    shm: crate::shared::SharedMemory,
    /// GPA and entry count of the frame-ownership table (published).
    owner_table: (u64, u64),
    /// Mixed into every capability table's handle key.
    boot_entropy: u64,
    /// Process and region slots written at the last publication.
    published_slots: (usize, usize),
    /// The CPU has XSAVE (the switch stubs use `xsave`/`xrstor`, else
    /// `fxsave`/`fxrstor`).
    xsave: bool,
    /// Per CPU: the switch stub running there now, during a process switch.
    switch_step: [Option<user_cpu::Step>; MAX_CPUS as usize],
    /// Where the save and the restore stub trap back into the kernel.
    switch_returns: [u64; 2],
}

static KERNEL: KernelCell<Option<Kernel>> = KernelCell::new(None);

/// Timer ticks (10 ms each) a batching kernel lets its events wait in the
/// ring at most, when nothing else drains them: the event log's latency
/// for someone watching a run, and a bound of 10 VM exits a second.
pub const EVENT_ANNOUNCE_TICKS: u64 = 10;

/// The context the gate self-test is entered from.
static BOOT_FRAME: KernelCell<TrapFrame> = KernelCell::new(TrapFrame::ZERO);

// ---------------------------------------------------------------------------
// Boot

extern "C" {
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_start: u8;
    static __rodata_end: u8;
    static __data_start: u8;
    static __data_end: u8;
    static __kernel_stack_guard: u8;
    static __ist_double_fault_guard: u8;
    static __ist_nmi_guard: u8;
    static __ist_debug_guard: u8;
    static __ist_machine_check_guard: u8;
}

fn symbol_address(symbol: &u8) -> u64 {
    symbol as *const u8 as u64
}

/// Entry point, called by `_start` with the boot-info GPA.
#[no_mangle]
pub extern "C" fn kernel_main(boot_info_gpa: u64) -> ! {
    tables::init();
    let boot = read_boot_info(boot_info_gpa);

    // SAFETY: linker-script symbols; only addresses are used.
    let (text_start, text_end) = unsafe { (symbol_address(&__text_start), symbol_address(&__text_end)) };
    let (ring_gpa, ring_bytes) = host::event_ring_location();
    let introspection_root_gpa =
        introspect::init(text_start - KERNEL_VMA_BASE, text_end - text_start, boot.cpu_count);
    let hello = hc::BootHelloParams {
        version: PROTOCOL_VERSION,
        status: hc::STATUS_PENDING,
        event_ring_gpa: ring_gpa,
        event_ring_bytes: ring_bytes,
        kernel_text_gpa: text_start - KERNEL_VMA_BASE,
        kernel_text_len: text_end - text_start,
        introspection_root_gpa,
    };
    if boot.debug_flags & boot::DEBUG_BAD_HELLO != 0 {
        let bad = hc::BootHelloParams { version: PROTOCOL_VERSION + 1000, ..hello };
        hypercall_with(Hypercall::BootHello, &bad);
        // SAFETY: the VMM wrote `status` during the hypercall; read it afresh.
        let status = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(bad.status)) };
        if status == hc::STATUS_OK {
            panic!("the VMM accepted a boot hello with protocol version {}", bad.version);
        }
    }
    hypercall_with(Hypercall::BootHello, &hello);

    if boot.debug_flags & boot::DEBUG_TRIPLE_FAULT != 0 {
        tables::load_empty_idt();
        // SAFETY: deliberately raises #UD with no IDT: the CPU shuts down.
        unsafe { core::arch::asm!("ud2", options(noreturn)) };
    }

    let scrub = match ScrubStrategy::from_raw(boot.scrub_strategy) {
        Some(ScrubStrategy::Kernel) => Scrub::InKernel,
        Some(ScrubStrategy::Hypercall) => Scrub::ByHypercall,
        _ => match HostFlavor::from_raw(boot.host_flavor) {
            Some(HostFlavor::Pvm) => Scrub::ByHypercall,
            _ => Scrub::InKernel,
        },
    };
    memory::use_rep_scans(HostFlavor::from_raw(boot.host_flavor) == Some(HostFlavor::Pvm));
    let (frames, owner_table) = frame_allocator(boot);
    let mut memory = KernelMemory::new(frames, scrub);
    let kernel_pml4 = build_kernel_page_tables(boot, &mut memory);
    // SAFETY: the new tables map the kernel image, stacks and direct map
    // exactly as the VMM's boot tables did (same virtual addresses).
    unsafe { smp::switch_address_space(0, kernel_pml4) };
    let xsave = enable_protection_features();
    // SAFETY: HEAP_SPACE is a static used only as the heap, handed over once.
    unsafe {
        ALLOCATOR.lock().init(core::ptr::addr_of_mut!((*HEAP_SPACE.as_ptr()).bytes) as *mut u8, HEAP_SIZE)
    };

    if boot.debug_flags & boot::DEBUG_WRITE_KERNEL_TEXT != 0 {
        write_own_text(text_start);
    }
    if boot.debug_flags & boot::DEBUG_BAD_HYPERCALLS != 0 {
        send_bad_hypercalls();
    }
    if boot.debug_flags & boot::DEBUG_PANIC_AFTER_BOOT != 0 {
        panic!("injected kernel panic (DEBUG_PANIC_AFTER_BOOT)");
    }
    if boot.debug_flags & boot::DEBUG_HYPERCALL_FLOOD != 0 {
        for i in 0..5000u32 {
            host::console_write(0, u64::MAX - u64::from(i), 64);
            cpu::out32(0x600 + (i % 64) as u16, i);
        }
    }
    if boot.debug_flags & boot::DEBUG_CORRUPT_EVENT_RING != 0 {
        host::corrupt_event_ring();
    }
    if boot.debug_flags & boot::DEBUG_CORRUPT_INTROSPECTION != 0 {
        introspect::corrupt();
    }
    if boot.debug_flags & boot::DEBUG_SPIN_IN_KERNEL != 0 {
        loop {
            core::hint::spin_loop();
        }
    }
    if boot.debug_flags & boot::DEBUG_SECOND_HELLO != 0 {
        hypercall_with(Hypercall::BootHello, &hello);
    }
    if boot.debug_flags & boot::DEBUG_CONSOLE_FLOOD != 0 {
        flood_console();
    }
    if boot.debug_flags & boot::DEBUG_EVENT_FLOOD != 0 {
        host::flood_event_ring();
    }
    if boot.debug_flags & boot::DEBUG_ALL_FLOOD != 0 {
        flood_all(boot);
    }
    if boot.trace != 0 {
        trace::start();
    }

    let gate = match GatePreference::from_raw(boot.gate_preference) {
        Some(GatePreference::Syscall) => Gate::Syscall,
        Some(GatePreference::Int3) => Gate::Int3,
        _ => match HostFlavor::from_raw(boot.host_flavor) {
            Some(HostFlavor::Pvm) => Gate::Int3,
            _ => Gate::Syscall,
        },
    };
    let gate_frame =
        memory.alloc_frame(FrameOwner::Kernel).unwrap_or_else(|| panic!("out of memory for the gate page"));
    let mut kernel = Kernel {
        boot,
        memory,
        kernel_pml4,
        gate,
        gate_frame,
        phase: Phase::Running,
        self_test: None,
        processes: Vec::new(),
        cpu: 0,
        current: [None; MAX_CPUS as usize],
        idle: 0,
        resume_at: 0,
        next_pid: 1,
        runs_started: alloc::vec![0; boot.processes().len()],
        spawned: 0,
        ticks: 0,
        fresh_slice: [false; MAX_CPUS as usize],
        pool_low_reported: false,
        events_batched: EventNotifyPolicy::from_raw(boot.event_notify) == Some(EventNotifyPolicy::Batched),
        events_announced_at: 0,
        shm: Default::default(),
        owner_table,
        // SAFETY: rdtsc has no side effects; it only seeds handle scrambling.
        boot_entropy: unsafe { core::arch::x86_64::_rdtsc() },
        published_slots: (0, 0),
        xsave,
        switch_step: [None; MAX_CPUS as usize],
        switch_returns: [0; 2],
    };
    set_entry_msrs(gate, 0);
    kernel.write_gate_page();
    let space = AddressSpace::new(&mut kernel.memory, 0, kernel_pml4, gate_frame, Default::default())
        .unwrap_or_else(|| panic!("out of memory for the gate self-test"));
    let pml4 = space.pml4();
    kernel.self_test = Some(space);
    kernel.phase = Phase::GateSelfTest { tried_other: false };

    // SAFETY: KernelCell invariant; boot is the only user so far.
    let (slot, frame) = unsafe { (KERNEL.get(), BOOT_FRAME.get()) };
    *slot = Some(kernel);
    // SAFETY: `pml4` maps the kernel half like the kernel's own tables.
    unsafe { smp::switch_address_space(0, pml4) };
    *frame = self_test_frame();
    // SAFETY: the frame describes a ring-3 context at the gate stub, in an
    // address space that maps the gate page.
    unsafe { enter_user(frame) }
}

fn self_test_frame() -> TrapFrame {
    let mut frame = TrapFrame::new_user(GATE_VA, 0, false);
    frame.rax = Syscall::GateSelfTest as u64;
    frame
}

fn read_boot_info(gpa: u64) -> &'static BootInfo {
    if gpa != BOOT_INFO_GPA {
        panic!("boot info at unexpected address {gpa:#x}");
    }
    // The VMM wrote a BootInfo at BOOT_INFO_GPA (checked above), in a region
    // the memory map reserves, mapped by the boot tables' direct map.
    // SAFETY: BootInfo is plain data (any bytes are valid; fields are
    // validated below), and nothing writes that region while the kernel runs.
    let boot = unsafe { &*direct::<BootInfo>(gpa) };
    if boot.magic != boot::BOOT_INFO_MAGIC {
        panic!("boot info has a bad magic number {:#x}", boot.magic);
    }
    if boot.version != PROTOCOL_VERSION {
        panic!("boot info protocol version {} but kernel speaks {}", boot.version, PROTOCOL_VERSION);
    }
    if boot.mem_size > MAX_GUEST_MEMORY || boot.mem_size < MIN_GUEST_MEMORY {
        panic!("boot info memory size {:#x} out of range", boot.mem_size);
    }
    boot
}

/// Carves the allocator's own bookkeeping (free stack and ownership table)
/// out of the largest usable region and hands the rest of usable RAM to it.
/// Also returns the ownership table's GPA and length, for the VMM.
fn frame_allocator(boot: &BootInfo) -> (FrameAllocator<'static>, (u64, u64)) {
    let mut ranges = [(0u64, 0u64); crate::frame::MAX_RANGES];
    let mut count = 0;
    for region in boot.memory_map().iter().filter(|r| r.kind == MEMORY_USABLE) {
        let end = region.start.saturating_add(region.len).min(boot.mem_size);
        if count < ranges.len() && region.start < end {
            ranges[count] = (region.start, end);
            count += 1;
        }
    }
    let ranges = &mut ranges[..count];
    let total: u64 = ranges.iter().map(|(s, e)| (e - s) / PAGE_SIZE).sum();
    let entries = FrameAllocator::storage_entries(total);
    let storage_pages = (2 * entries as u64 * 4).div_ceil(PAGE_SIZE);
    let largest = ranges
        .iter_mut()
        .max_by_key(|(s, e)| e - s)
        .unwrap_or_else(|| panic!("the memory map has no usable RAM"));
    let storage_start = largest.0.next_multiple_of(PAGE_SIZE);
    if storage_start + storage_pages * PAGE_SIZE > largest.1 {
        panic!("not enough RAM for the frame allocator");
    }
    largest.0 = storage_start + storage_pages * PAGE_SIZE;
    // [storage_start, +storage_pages) is usable guest RAM removed from the
    // allocator's ranges above; the VMM hands over guest RAM zeroed.
    // SAFETY: so nothing else uses it, the ownership table starts all-free,
    // and both slices are 4-aligned and disjoint.
    let (stack, owners) = unsafe {
        (
            core::slice::from_raw_parts_mut(direct::<u32>(storage_start), entries),
            core::slice::from_raw_parts_mut(direct::<u32>(storage_start + entries as u64 * 4), entries),
        )
    };
    (FrameAllocator::new(ranges, stack, owners), (storage_start + entries as u64 * 4, entries as u64))
}

fn build_kernel_page_tables(boot: &BootInfo, memory: &mut KernelMemory) -> u64 {
    let pml4 =
        memory.alloc_frame(FrameOwner::Kernel).unwrap_or_else(|| panic!("out of memory for the kernel PML4"));
    let mut tables = KernelTables(memory);
    let map_4k = |tables: &mut KernelTables<'_>, va: u64, pa: u64, flags: Flags| {
        paging::map(tables, pml4, va, pa, PageSize::Size4K, flags, KERNEL_TABLE_FLAGS)
            .unwrap_or_else(|e| panic!("mapping kernel page {va:#x}: {e:?}"));
    };
    // SAFETY: linker-script symbols; only their addresses are used.
    let (text, rodata, data, guards) = unsafe {
        (
            (symbol_address(&__text_start), symbol_address(&__text_end)),
            (symbol_address(&__rodata_start), symbol_address(&__rodata_end)),
            (symbol_address(&__data_start), symbol_address(&__data_end)),
            [
                symbol_address(&__kernel_stack_guard),
                symbol_address(&__ist_double_fault_guard),
                symbol_address(&__ist_nmi_guard),
                symbol_address(&__ist_debug_guard),
                symbol_address(&__ist_machine_check_guard),
            ],
        )
    };
    let sections =
        [(text, Flags::empty()), (rodata, Flags::NO_EXECUTE), (data, Flags::WRITABLE | Flags::NO_EXECUTE)];
    for ((start, end), flags) in sections {
        let pages = (end - start).div_ceil(PAGE_SIZE);
        paging::map_4k_run(
            &mut tables,
            pml4,
            start,
            start - KERNEL_VMA_BASE,
            pages,
            flags,
            KERNEL_TABLE_FLAGS,
        )
        .unwrap_or_else(|e| panic!("mapping the kernel image at {start:#x}: {e:?}"));
    }
    // The guard pages below the stacks stay unmapped (cheaper than a test per
    // page above: ring 0 is emulated on some hosts).
    for guard in guards {
        paging::unmap(&mut tables, pml4, guard);
    }
    let lapic_flags = Flags::WRITABLE | Flags::NO_EXECUTE | Flags::NO_CACHE | Flags::WRITE_THROUGH;
    map_4k(&mut tables, LAPIC_VA, LAPIC_GPA, lapic_flags);
    // The direct map: all RAM read-write, no-execute, in 2 MiB pages, except
    // that the kernel's text and read-only data are read-only here too (the
    // 2 MiB around them are mapped page by page), so no mapping anywhere lets
    // the kernel write its own code.
    let read_only = (text.0 - KERNEL_VMA_BASE)..(rodata.1 - KERNEL_VMA_BASE);
    let read_write = Flags::WRITABLE | Flags::NO_EXECUTE;
    let direct_end = boot.mem_size.next_multiple_of(LARGE_PAGE_SIZE);
    for pa in (0..direct_end).step_by(LARGE_PAGE_SIZE as usize) {
        let va = DIRECT_MAP_BASE + pa;
        let mapped = if pa < read_only.end && read_only.start < pa + LARGE_PAGE_SIZE {
            let except = (read_only.clone(), Flags::NO_EXECUTE);
            paging::map_2m_as_4k(&mut tables, pml4, va, pa, KERNEL_TABLE_FLAGS, read_write, except)
        } else {
            paging::map(&mut tables, pml4, va, pa, PageSize::Size2M, read_write, KERNEL_TABLE_FLAGS)
        };
        mapped.unwrap_or_else(|e| panic!("mapping the direct map at {pa:#x}: {e:?}"));
    }
    pml4
}

/// The control registers and XCR0 of `superos_protocol::cpu`: CR0.WP (the
/// kernel cannot write read-only pages either), EFER.NXE, SMEP/SMAP/UMIP
/// where the CPU has them (the kernel never executes or touches user pages
/// through user addresses: it reads user memory via the direct map; ring 3
/// cannot read the descriptor-table registers), CR0.AM (so a misaligned
/// access with RFLAGS.AC is #AC on every host), and for ring 3 what the PVM
/// host gives it anyway (it runs ring 3 with the host's CR4 and XCR0):
/// FSGSBASE, x87/SSE with native exception reporting, and XCR0 with every
/// user component of [`superos_protocol::cpu::XCR0_USER_MAX`] the CPU has.
/// Returns whether the CPU has XSAVE.
fn enable_protection_features() -> bool {
    use superos_protocol::cpu::*;
    // SAFETY: adds protection (WP, AM) and enables the FPU for ring 3;
    // paging and protected mode stay on.
    unsafe { cpu::write_cr0((cpu::read_cr0() | CR0_REQUIRED) & !CR0_FORBIDDEN) };
    // SAFETY: NXE is required by the NX bits in our page tables.
    unsafe { cpu::wrmsr(msr::EFER, cpu::rdmsr(msr::EFER) | EFER_NXE) };
    let mut cr4 = (cpu::read_cr4() | CR4_REQUIRED) & !CR4_FORBIDDEN;
    if let Some((_, ebx, ecx, _)) = cpu::cpuid(7, 0) {
        let features = [
            (ebx & (1 << 7), CR4_SMEP),
            (ebx & (1 << 20), CR4_SMAP),
            (ecx & (1 << 2), CR4_UMIP),
            (ebx & (1 << 0), CR4_FSGSBASE),
        ];
        for (has, bit) in features {
            if has != 0 {
                cr4 |= bit;
            }
        }
    }
    let xsave = cpu::cpuid(1, 0).is_some_and(|(_, _, ecx, _)| ecx & (1 << 26) != 0);
    if xsave {
        cr4 |= CR4_OSXSAVE;
    }
    // SAFETY: only bits CPUID reports as supported (or architectural in long
    // mode) are set.
    unsafe { cpu::write_cr4(cr4) };
    if xsave {
        let supported = cpu::cpuid(0xd, 0).map_or(XCR0_X87 | XCR0_SSE, |(eax, ..)| u64::from(eax));
        // SAFETY: OSXSAVE is set, and the value is a subset of what CPUID
        // leaf 0xd reports, with x87 always included.
        unsafe { cpu::write_xcr0((supported & XCR0_USER_MAX) | XCR0_X87) };
    }
    xsave
}

/// The entry MSRs of `superos_protocol::cpu`: `STAR`/`LSTAR`/`SFMASK` for
/// the `syscall` gate, `CSTAR` and `SYSENTER_EIP` at the stub that kills
/// the caller, `SYSENTER_CS` zero (so `sysenter` never enters ring 0), and
/// EFER.SCE only while `gate` is `syscall` (with the `int3` gate, a
/// `syscall` in ring 3 is #UD).
fn set_entry_msrs(gate: Gate, cpu: u32) {
    use superos_protocol::cpu::*;
    let kernel_stack_top = tables::kernel_stack_top(cpu);
    let efer = cpu::rdmsr(msr::EFER);
    let efer = if gate == Gate::Syscall { efer | EFER_SCE } else { efer & !EFER_SCE };
    // SAFETY: architectural MSRs: the entry points are the stubs of
    // arch/entry.rs, STAR names the selectors of our GDT, the stack is the
    // kernel stack, and EFER only gains or loses SCE.
    unsafe {
        cpu::wrmsr(msr::STAR, STAR_VALUE);
        cpu::wrmsr(msr::LSTAR, syscall_entry_table[cpu as usize]);
        cpu::wrmsr(msr::CSTAR, foreign_entry_table[cpu as usize]);
        cpu::wrmsr(msr::SFMASK, SFMASK_VALUE);
        cpu::wrmsr(msr::SYSENTER_CS, SYSENTER_CS_VALUE);
        cpu::wrmsr(msr::SYSENTER_ESP, kernel_stack_top);
        cpu::wrmsr(msr::SYSENTER_EIP, foreign_entry_table[cpu as usize]);
        cpu::wrmsr(msr::EFER, efer);
    }
}

/// Bytes without a newline for DEBUG_CONSOLE_FLOOD.
static FLOOD_BYTES: [u8; hc::CONSOLE_WRITE_MAX as usize] = [b'x'; hc::CONSOLE_WRITE_MAX as usize];

/// Frames for DEBUG_CONSOLE_FLOOD's scrub requests: 2 MiB from 48 MiB up
/// (inside the smallest RAM the scenarios use), whatever they hold.
static FLOOD_FRAMES: [u64; hc::SCRUB_BATCH_MAX as usize] = {
    let mut frames = [0u64; hc::SCRUB_BATCH_MAX as usize];
    let mut i = 0;
    while i < frames.len() {
        frames[i] = (48 << 20) + i as u64 * PAGE_SIZE;
        i += 1;
    }
    frames
};

/// DEBUG_CONSOLE_FLOOD: console writes forever, half of them 4095 bytes
/// without a newline from a pid never seen before (a partial line each),
/// half whole 4096-byte lines, each pair followed by the largest scrub
/// request (the VMM zeroes 2 MiB): the vCPU thread spends nearly all its
/// time in the VMM's own code, where a watchdog kick does not interrupt
/// `KVM_RUN`. Only the VMM's watchdog stops it.
fn flood_console() -> ! {
    let gpa = memory::image_gpa(FLOOD_BYTES.as_ptr());
    let mut pid: u32 = 1000;
    loop {
        pid = pid.wrapping_add(1);
        host::console_write(pid, gpa, hc::CONSOLE_WRITE_MAX - 1);
        host::console_write(0, gpa, hc::CONSOLE_WRITE_MAX);
        host::scrub_frames(&FLOOD_FRAMES);
    }
}

/// DEBUG_ALL_FLOOD: every usable page of guest RAM outside the kernel image
/// made resident in the VMM (each word rewritten with itself, through the
/// direct map: nothing changes), then DEBUG_CONSOLE_FLOOD's writes and scrub
/// and DEBUG_EVENT_FLOOD's full ring, in turn, forever.
fn flood_all(boot: &BootInfo) -> ! {
    let image = boot.kernel_phys_start..boot.kernel_phys_end;
    let regions = &boot.memory_map[..(boot.memory_map_len as usize).min(boot.memory_map.len())];
    for region in regions.iter().filter(|r| r.kind == MEMORY_USABLE) {
        let end = region.start.saturating_add(region.len).min(boot.mem_size);
        for pa in (region.start.next_multiple_of(PAGE_SIZE)..end).step_by(PAGE_SIZE as usize) {
            if image.contains(&pa) || pa + PAGE_SIZE > end {
                continue;
            }
            let word = direct::<u64>(pa);
            // SAFETY: a usable guest RAM page outside the kernel image, mapped
            // writable by the direct map; the word is rewritten with its own
            // value (a debug flag: nothing else runs).
            unsafe { core::ptr::write_volatile(word, core::ptr::read_volatile(word)) };
        }
    }
    let gpa = memory::image_gpa(FLOOD_BYTES.as_ptr());
    let (mut pid, mut tick): (u32, u64) = (1000, 0);
    loop {
        pid = pid.wrapping_add(1);
        host::console_write(pid, gpa, hc::CONSOLE_WRITE_MAX - 1);
        host::console_write(0, gpa, hc::CONSOLE_WRITE_MAX);
        host::scrub_frames(&FLOOD_FRAMES);
        host::fill_event_ring(&mut tick);
    }
}

/// DEBUG_WRITE_KERNEL_TEXT: what a compromised ring 0 would do to patch the
/// kernel: lift CR0.WP and write through the read-only text mapping. Only
/// the VMM's read-only memory slot stands in the way.
#[inline(never)]
fn write_own_text(text_start: u64) {
    use superos_protocol::cpu::CR0_WP;
    let cr0 = cpu::read_cr0();
    // SAFETY: deliberately unsound (a debug flag): the byte overwritten is
    // the first of `_start`, which never runs again; WP is restored.
    unsafe {
        cpu::write_cr0(cr0 & !CR0_WP);
        core::ptr::write_volatile(text_start as *mut u8, 0xcc);
        cpu::write_cr0(cr0);
    }
}

/// DEBUG_BAD_HYPERCALLS: each malformed call must come back refused.
fn send_bad_hypercalls() {
    let cases: [(u64, u64); 3] = [
        (MAX_GUEST_MEMORY + PAGE_SIZE, 16),     // outside guest RAM
        (PAGE_SIZE, hc::CONSOLE_WRITE_MAX + 1), // too long
        (u64::MAX - 4, 16),                     // wraps around
    ];
    for (gpa, len) in cases {
        let status = host::console_write(0, gpa, len);
        if status == hc::STATUS_OK {
            panic!("the VMM accepted a console write of {len} bytes at {gpa:#x}");
        }
        log_event(
            Event::HypercallRefused { port: Hypercall::ConsoleWrite.port().into(), status: status.into() },
            0,
        );
    }
}

// ---------------------------------------------------------------------------
// Traps

fn kernel() -> &'static mut Kernel {
    // SAFETY: KernelCell invariant: called once per trap, at its start.
    match unsafe { KERNEL.get() } {
        Some(kernel) => kernel,
        None => panic!("trap before the kernel was initialised"),
    }
}

/// Called by the assembly stubs for every trap. On return, the context in
/// `frame` is resumed.
#[no_mangle]
#[link_section = ".text.debug_path"]
pub extern "C" fn trap_dispatch(frame: &mut TrapFrame) {
    // `getpid` first: the most frequent call, answered without the lock.
    if fast::answer(frame) {
        return;
    }
    // An NMI may arrive anywhere, ring 0 included (on its own stack); the VMM
    // sends none and there is nothing to do: resume what it interrupted,
    // before touching any kernel state.
    if frame.vector == NMI_VECTOR {
        return;
    }
    let cpu = smp::cpu_of_stack(frame as *const TrapFrame as u64);
    if !frame.from_user() && (frame.vector == BREAKPOINT_VECTOR || frame.vector == DEBUG_VECTOR) {
        kernel_debug_trap(frame, cpu);
        return;
    }
    trap_dispatch_locked(frame, cpu);
}

/// Per CPU: a kernel debug trap is being answered there.
static IN_KERNEL_DEBUG_TRAP: [AtomicBool; MAX_CPUS as usize] =
    [const { AtomicBool::new(false) }; MAX_CPUS as usize];

/// A breakpoint (`int3`) or a single step in ring 0: only a debugger's
/// (`run --gdb`: an `int3` it planted in the kernel's text, or the step
/// over one), so the VMM decides, without the big lock (the trap may come
/// with it held, or not). It answers where the kernel resumes (in the
/// kernel half) and whether with the trap flag; anything else, and a trap
/// while one is being answered on this CPU (a breakpoint in this very
/// path), is a kernel exception as before.
#[inline(never)]
#[link_section = ".text.debug_path"]
fn kernel_debug_trap(frame: &mut TrapFrame, cpu: u32) {
    let Some(busy) = IN_KERNEL_DEBUG_TRAP.get(cpu as usize) else { kernel_exception(frame) };
    if busy.swap(true, Ordering::Acquire) {
        kernel_exception(frame);
    }
    let answer = host::kernel_debug_trap(cpu, frame.user_context());
    if !answer.resume(frame, |rip| rip >= KERNEL_HALF_START) {
        kernel_exception(frame);
    }
    busy.store(false, Ordering::Release);
}

/// Every entry but the NMI and a lock-free `getpid` ([`fast`]): on `cpu`.
#[inline(never)]
fn trap_dispatch_locked(frame: &mut TrapFrame, cpu: u32) {
    // Interrupts are acknowledged at once, before the lock: an interrupt
    // left in service would mask every vector of its priority class and
    // below (the flush and wake-up IPIs among them) while this CPU waits
    // for the lock, and nothing could wake it.
    let vector = frame.vector;
    if vector == u64::from(TIMER_VECTOR)
        || vector == u64::from(WAKE_VECTOR)
        || vector == u64::from(FLUSH_VECTOR)
    {
        lapic::end_of_interrupt();
    }
    // The flush IPI is served without the lock: its sender holds it and
    // waits for this CPU.
    if vector == u64::from(FLUSH_VECTOR) {
        smp::serve_flush(cpu);
        return;
    }
    if !frame.from_user() && is_lock_wait_interrupt(frame) {
        // A CPU halted for the lock: the holder's wake-up, or its timer.
        smp::serve_flush(cpu);
        return;
    }
    if !frame.from_user() && !is_idle_interrupt(frame) {
        if is_external_interrupt(vector) {
            // Ring 0 runs with interrupts off everywhere else, so a CPU
            // never delivers one here; QEMU's TCG, running this kernel under
            // KVM with `-icount`, was seen to. Acknowledged on entry, it is
            // resumed from: what it interrupted holds state this handler
            // never touches (the big lock among it), and a lost tick or
            // wake-up only delays the next schedule.
            return;
        }
        kernel_exception(frame);
    }
    smp::BIG_LOCK.lock(cpu);
    let kernel = kernel();
    kernel.cpu = cpu;
    if trace::on() {
        kernel.trace_entry(frame);
    }
    if let Some(step) = kernel.switch_step[cpu as usize].take() {
        if kernel.is_switch_stub_return(frame, step) {
            // The fast path of a process switch: nothing else changed, so
            // there is nothing to scrub or publish.
            kernel.continue_switch(frame, step);
            kernel.wake_idle_cpus();
            if trace::on() {
                kernel.trace_resume(frame);
            }
            fast::set_resumed(cpu, kernel.resumed_pid(frame));
            smp::BIG_LOCK.unlock();
            return;
        }
        // Anything else from inside a stub (a save page the process corrupted
        // itself) is that process's own fault, handled like any trap.
    }
    match kernel.phase {
        Phase::GateSelfTest { tried_other } => kernel.gate_self_test(frame, tried_other),
        Phase::Running => kernel.handle_trap(frame),
    }
    kernel.memory.reap(syscalls::SLICE_BUDGET);
    kernel.memory.flush_scrub();
    kernel.republish_changed();
    kernel.wake_idle_cpus();
    if trace::on() {
        kernel.trace_resume(frame);
    }
    fast::set_resumed(cpu, kernel.resumed_pid(frame));
    smp::BIG_LOCK.unlock();
}

/// An interrupt that arrived in the idle context (ring-0 code that runs
/// with interrupts on).
fn is_idle_interrupt(frame: &TrapFrame) -> bool {
    use crate::arch::entry::{idle_loop, idle_loop_end};
    is_interrupt_in(frame, idle_loop as *const () as u64, idle_loop_end as *const () as u64)
}

/// An interrupt that arrived while this CPU halted for the big kernel lock
/// (the other ring-0 code that runs with interrupts on).
fn is_lock_wait_interrupt(frame: &TrapFrame) -> bool {
    use crate::arch::entry::{lock_wait, lock_wait_end};
    is_interrupt_in(frame, lock_wait as *const () as u64, lock_wait_end as *const () as u64)
}

/// A vector the LAPIC delivers (timer, wake-up, spurious; the flush IPI is
/// served before this is asked).
fn is_external_interrupt(vector: u64) -> bool {
    vector == u64::from(TIMER_VECTOR)
        || vector == u64::from(WAKE_VECTOR)
        || vector == u64::from(SPURIOUS_VECTOR)
}

/// A timer, wake-up or spurious interrupt at a RIP in `[start, end)`.
fn is_interrupt_in(frame: &TrapFrame, start: u64, end: u64) -> bool {
    (start..end).contains(&frame.rip) && is_external_interrupt(frame.vector)
}

/// Vector of the non-maskable interrupt.
const NMI_VECTOR: u64 = 2;
/// Vector of the debug exception (#DB): a single step from ring 3.
const DEBUG_VECTOR: u64 = 1;
/// Vector of the breakpoint exception (#BP): an `int3` in ring 3 outside
/// the gate.
const BREAKPOINT_VECTOR: u64 = 3;
/// Vector of the x87 floating-point error (#MF).
const X87_FLOATING_POINT_VECTOR: u64 = 16;

fn kernel_exception(frame: &TrapFrame) -> ! {
    let addr = if frame.vector == 14 { cpu::read_cr2() } else { 0 };
    report_panic(
        format_args!(
            "exception {} in ring 0 at rip {:#x} (error code {:#x}, address {addr:#x})",
            frame.vector, frame.rip, frame.error_code
        ),
        Some(ExceptionInfo { vector: frame.vector, error_code: frame.error_code, rip: frame.rip, addr }),
    )
}

impl Kernel {
    fn write_gate_page(&mut self) {
        let page = direct::<u8>(self.gate_frame);
        let stub = self.gate.stub();
        let info =
            GateInfo { magic: sc::GATE_INFO_MAGIC, gate_kind: self.gate.kind(), tsc_khz: self.boot.tsc_khz };
        // Every byte outside the stub is int3: any other offset traps as an
        // illegal gate entry.
        // SAFETY: the gate frame is a whole frame owned by the kernel.
        unsafe {
            core::ptr::write_bytes(page, 0xcc, PAGE_SIZE as usize);
            core::ptr::copy_nonoverlapping(stub.as_ptr(), page, stub.len());
            for (i, stub) in user_cpu::stubs(self.gate.instruction(), self.xsave).iter().enumerate() {
                let bytes = stub.bytes();
                core::ptr::copy_nonoverlapping(bytes.as_ptr(), page.add(stub.offset as usize), bytes.len());
                self.switch_returns[i] = GATE_VA + stub.offset + bytes.len() as u64;
            }
            core::ptr::write_unaligned(page.add(GATE_INFO_OFFSET as usize) as *mut GateInfo, info);
        }
    }

    fn is_gate_entry(&self, frame: &TrapFrame) -> bool {
        frame.vector == self.gate.vector() && frame.rip == self.gate.return_rip()
    }

    fn gate_self_test(&mut self, frame: &mut TrapFrame, tried_other: bool) {
        if self.is_gate_entry(frame) && frame.rax == Syscall::GateSelfTest as u64 {
            // SAFETY: switching to the kernel's own tables before freeing these.
            unsafe { smp::switch_address_space(self.cpu, self.kernel_pml4) };
            if let Some(space) = self.self_test.take() {
                space.destroy(&mut self.memory);
            }
            self.memory.flush_scrub();
            self.phase = Phase::Running;
            if !trace::on() {
                // Traced, `getpid` takes the lock as every call does.
                fast::set_gate(self.gate.vector(), self.gate.return_rip());
            }
            let cpus = self.start_application_processors();
            self.emit(Event::KernelReady {
                gate_kind: self.gate.kind(),
                free_frames: self.memory.frames.free_frames(),
                total_frames: self.memory.frames.total_frames(),
                cpus,
            });
            self.start_processes(frame);
            return;
        }
        self.emit(Event::GateSelfTestFailed {
            gate_kind: self.gate.kind(),
            vector: frame.vector,
            rip: frame.rip,
            error_code: frame.error_code,
        });
        if tried_other {
            panic!("no working system-call gate: both syscall and int3 failed the self-test");
        }
        self.gate = self.gate.other();
        set_entry_msrs(self.gate, 0);
        self.write_gate_page();
        self.phase = Phase::GateSelfTest { tried_other: true };
        *frame = self_test_frame();
    }

    fn start_processes(&mut self, frame: &mut TrapFrame) {
        // After `KernelReady`, which a checking VMM checks: every free frame
        // has been found zero by then.
        self.memory.skip_one_scrub = self.boot.debug_flags & boot::DEBUG_SKIP_ONE_SCRUB != 0;
        self.shm.shallow_revocation = self.boot.debug_flags & boot::DEBUG_SHALLOW_REVOCATION != 0;
        smp::skip_shootdowns(self.boot.debug_flags & boot::DEBUG_SKIP_SHOOTDOWN != 0);
        for index in 0..self.boot.processes().len() {
            self.start_run(index);
        }
        lapic::start_timer(TIMER_VECTOR, SPURIOUS_VECTOR);
        hypercall(Hypercall::Phase, hc::BootPhase::FirstUserInstruction as u32);
        self.reschedule(frame, false);
    }

    fn handle_trap(&mut self, frame: &mut TrapFrame) {
        let cpu = self.cpu as usize;
        if !frame.from_user() {
            // The idle context, woken by its timer or a wake-up IPI
            // (acknowledged on entry).
            if self.cpu == 0 && frame.vector == u64::from(TIMER_VECTOR) {
                self.tick();
            }
            self.reschedule(frame, false);
            return;
        }
        match frame.vector {
            _ if self.is_gate_entry(frame) => self.syscall(frame),
            v if v == u64::from(TIMER_VECTOR) => {
                if self.cpu == 0 {
                    self.tick();
                }
                if !core::mem::take(&mut self.fresh_slice[cpu]) {
                    self.reschedule(frame, true);
                }
            }
            // Acknowledged on entry; nothing else to do in ring 3.
            v if v == u64::from(WAKE_VECTOR) || v == u64::from(SPURIOUS_VECTOR) => {}
            14 => self.page_fault(frame),
            SYSCALL_VECTOR | FOREIGN_ENTRY_VECTOR => {
                self.kill_current(frame, FaultKind::IllegalGateEntry, frame.rip)
            }
            DEBUG_VECTOR | BREAKPOINT_VECTOR => self.debug_trap(frame),
            X87_FLOATING_POINT_VECTOR => {
                // The address is the x87 instruction that left the exception
                // pending (the trap frame's RIP is the later one that found
                // it), where the CPU keeps it (QEMU's TCG does not: then the
                // RIP).
                let addr = Some(pending_x87_instruction()).filter(|&ip| ip != 0).unwrap_or(frame.rip);
                self.kill_current(frame, FaultKind::X87FloatingPoint, addr)
            }
            vector => self.kill_current(frame, classify_exception(vector), frame.rip),
        }
    }

    /// A breakpoint (`int3`) or a single step (#DB) in ring 3: the VMM
    /// decides. Without a debugger that asked for it, the process is
    /// terminated for the fault, as any other exception; with one, it
    /// resumes where and how the debugger says (the trap flag set for one
    /// more step, or clear), once the debugger lets the guest go.
    fn debug_trap(&mut self, frame: &mut TrapFrame) {
        let Some(index) = self.current() else {
            panic!("debug trap from ring 3 with no current process");
        };
        let pid = self.processes[index].pid;
        let answer = host::debug_trap(pid, self.cpu, frame.user_context());
        if !answer.resume(frame, |rip| rip < USER_HALF_END) {
            self.kill_current(frame, classify_exception(frame.vector), frame.rip);
        }
    }

    /// The pid of the process this CPU resumes with `frame`: its current
    /// process's, unless the frame is the idle context or a switch stub, or
    /// processes do not run yet.
    fn resumed_pid(&self, frame: &TrapFrame) -> Option<u32> {
        let resumes_current = matches!(self.phase, Phase::Running)
            && frame.from_user()
            && self.switch_step[self.cpu as usize].is_none();
        self.current().filter(|_| resumes_current).map(|index| self.processes[index].pid)
    }

    /// The process this CPU runs.
    pub(super) fn current(&self) -> Option<usize> {
        self.current[self.cpu as usize]
    }

    /// Sets the process this CPU runs (and which CPU each runs on).
    pub(super) fn set_current(&mut self, index: Option<usize>) {
        let cpu = self.cpu;
        if let Some(old) = self.current[cpu as usize] {
            if let Some(process) = self.processes.get_mut(old).filter(|p| p.cpu == cpu) {
                process.cpu = superos_protocol::introspect::NO_CPU;
            }
        }
        self.current[cpu as usize] = index;
        if let Some(process) = index.and_then(|new| self.processes.get_mut(new)) {
            process.cpu = cpu;
        }
    }

    /// Sends the wake-up IPI to the idle CPUs if some process is ready and
    /// no CPU runs it.
    fn wake_idle_cpus(&self) {
        let idle = self.idle & !(1 << self.cpu);
        if idle != 0 && (0..self.processes.len()).any(|i| self.available(i)) {
            smp::wake(self.cpu, idle);
        }
    }

    fn page_fault(&mut self, frame: &mut TrapFrame) {
        let addr = cpu::read_cr2();
        let Some(index) = self.current() else {
            panic!("page fault from ring 3 with no current process");
        };
        let process = &mut self.processes[index];
        match process.space.handle_page_fault(&mut self.memory, addr, frame.error_code) {
            Ok(()) => self.after_allocation(index),
            Err(fault) => {
                if fault == FaultKind::ResidentQuotaExceeded {
                    let quotas = process.space.quotas();
                    let event = Event::QuotaDenied {
                        pid: process.pid,
                        quota: Some(QuotaKind::Resident),
                        requested: process.space.resident_request(&mut self.memory, addr),
                        limit: quotas.max_resident,
                    };
                    self.emit(event);
                }
                self.kill_current(frame, fault, addr);
            }
        }
    }

    /// Pressure events after a process grew: its quotas and the free pool.
    fn after_allocation(&mut self, index: usize) {
        let process = &mut self.processes[index];
        let pid = process.pid;
        for (quota, used, limit) in process.space.pressure_crossings() {
            self.emit(Event::QuotaPressure { pid, quota: Some(quota), used, limit });
        }
        let (free, total) = (self.memory.frames.free_frames(), self.memory.frames.total_frames());
        if free * 10 < total && !self.pool_low_reported {
            self.pool_low_reported = true;
            self.emit(Event::FramePoolLow { free_frames: free, total_frames: total });
        } else if free * 5 > total {
            self.pool_low_reported = false;
        }
    }

    /// Logs an event. With every event notified, the published tables (and
    /// the scrub batch) are made consistent with the kernel's state first, so
    /// the VMM can check them at every event; batched, the event waits in
    /// the ring for the next notification or hypercall.
    fn emit(&mut self, event: Event) {
        if !self.events_batched {
            self.memory.flush_scrub();
            self.publish();
            log_event(event, self.ticks);
        } else {
            append_event(event, self.ticks);
            if host::events_undrained() >= host::EVENTS_NOTIFY_AT {
                self.announce_events();
            }
        }
    }

    /// Tells the VMM about the events in the ring, with the published
    /// tables consistent (an `EventNotify` is a point where the VMM may
    /// look at them).
    fn announce_events(&mut self) {
        self.memory.flush_scrub();
        self.publish();
        host::notify_events();
        self.events_announced_at = self.ticks;
    }

    /// One timer tick on the bootstrap CPU: counts it and, batching,
    /// announces the events left waiting if the last announcement is
    /// [`EVENT_ANNOUNCE_TICKS`] old (at most one VM exit per that many
    /// ticks, and only when there are events).
    fn tick(&mut self) {
        self.ticks += 1;
        if self.events_batched
            && self.ticks - self.events_announced_at >= EVENT_ANNOUNCE_TICKS
            && host::events_undrained() > 0
        {
            self.announce_events();
        }
    }

    /// Shuts the VM down after logging the final frame accounting.
    fn finish(&mut self) -> ! {
        self.memory.reap_all();
        self.memory.flush_scrub();
        self.emit(Event::KernelShutdown {
            free_frames: self.memory.frames.free_frames(),
            total_frames: self.memory.frames.total_frames(),
            spawned: self.spawned,
        });
        if self.events_batched {
            // The VMM drains the ring and checks at the shutdown hypercall.
            self.publish();
        }
        if trace::on() {
            trace::drain();
        }
        hypercall(Hypercall::Shutdown, 0);
        cpu::halt_forever();
    }
}
