//! The kernel proper: boot, address spaces, processes, scheduling, system
//! calls, fault handling, the event ring and the hypercalls to the VMM.
//!
//! Control flow: the VMM enters [`kernel_main`] in long mode. It sets up the
//! CPU, the frame allocator and the kernel's own page tables, then runs the
//! system-call gate self-test as a tiny ring-3 context. From then on the kernel
//! only runs in [`trap_dispatch`], called by the assembly stubs on every entry
//! from ring 3 with the interrupted context in a [`TrapFrame`]; switching
//! processes means replacing that frame before it is resumed.

use crate::arch::entry::{enter_user, syscall_entry};
use crate::arch::{cpu, lapic, tables, KernelCell, TrapFrame, SPURIOUS_VECTOR, SYSCALL_VECTOR, TIMER_VECTOR};
use crate::elf_image::{check_user_image, LoadPlan};
use crate::fault::{classify_exception, classify_page_fault, Region, RegionKind};
use crate::frame::FrameAllocator;
use crate::paging::{self, PageSize, PageTableMemory, KERNEL_TABLE_FLAGS, USER_TABLE_FLAGS};
use alloc::vec::Vec;
use core::fmt::Write;
use superos_protocol::boot::{self, BootInfo, GatePreference, HostFlavor, MEMORY_USABLE};
use superos_protocol::event::{Event, EventRecord, EventRingHeader, FaultKind, SpawnError, EVENT_RING_MAGIC};
use superos_protocol::hypercall::{self as hc, Hypercall};
use superos_protocol::layout::*;
use superos_protocol::syscall::{self as sc, encode_result, GateInfo, SysError, Syscall};
use superos_protocol::PROTOCOL_VERSION;
use x86_64::structures::paging::{PageTable, PageTableFlags as Flags};
use zerocopy::IntoBytes;

// ---------------------------------------------------------------------------
// Physical memory access

/// Kernel virtual address of guest-physical `phys` in the direct map.
fn direct<T>(phys: u64) -> *mut T {
    (DIRECT_MAP_BASE + phys) as *mut T
}

/// Guest-physical address of a kernel-image virtual address (statics).
fn image_gpa<T>(pointer: *const T) -> u64 {
    pointer as u64 - KERNEL_VMA_BASE
}

/// Zeroes one frame through the direct map.
fn scrub(frame: u64) {
    // SAFETY: `frame` is a whole guest-RAM frame owned by the caller, reached
    // through the direct map, which covers all of guest RAM.
    unsafe { core::ptr::write_bytes(direct::<u8>(frame), 0, PAGE_SIZE as usize) };
}

/// Page tables reached through the direct map, new frames from the allocator.
struct DirectMap<'a, 'f>(&'a mut FrameAllocator<'f>);

impl PageTableMemory for DirectMap<'_, '_> {
    fn table(&mut self, frame: u64) -> &mut PageTable {
        // SAFETY: callers only pass frames that hold page tables the kernel
        // built (reached from a PML4 it owns); the direct map covers them, and
        // the paging code holds one table reference at a time.
        unsafe { &mut *direct::<PageTable>(frame) }
    }
    fn alloc_table(&mut self) -> Option<u64> {
        self.0.alloc()
    }
    fn free_table(&mut self, frame: u64) {
        scrub(frame);
        let freed = self.0.free(frame);
        debug_assert!(freed.is_ok(), "page-table frame {frame:#x} was not allocated");
    }
}

// ---------------------------------------------------------------------------
// Hypercalls

fn hypercall(call: Hypercall, value: u32) {
    cpu::out32(call.port(), value);
}

/// Hypercall parameter blocks live in kernel statics, whose guest-physical
/// addresses are below 4 GiB by construction of the linker script.
fn hypercall_with<T: IntoBytes + zerocopy::Immutable>(call: Hypercall, params: &T) {
    hypercall(call, image_gpa(params as *const T) as u32);
}

static CONSOLE_PARAMS: KernelCell<hc::ConsoleWriteParams> = KernelCell::new(hc::ConsoleWriteParams {
    source_pid: 0,
    status: 0,
    gpa: 0,
    len: 0,
});

/// Asks the VMM to print `len` bytes at guest-physical `gpa` on behalf of
/// `pid` (0 = the kernel). Returns the VMM's status.
fn console_write(pid: u32, gpa: u64, len: u64) -> u32 {
    // SAFETY: single-CPU kernel with interrupts off (KernelCell invariant).
    let params = unsafe { CONSOLE_PARAMS.get() };
    *params = hc::ConsoleWriteParams {
        source_pid: pid,
        status: hc::STATUS_PENDING,
        gpa,
        len,
    };
    hypercall_with(Hypercall::ConsoleWrite, params);
    // SAFETY: the VMM wrote `status` during the hypercall; read it afresh.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!(params.status)) }
}

/// A `fmt::Write` sink into a fixed buffer that silently truncates.
struct FixedBuffer<'a> {
    bytes: &'a mut [u8],
    len: usize,
}

impl Write for FixedBuffer<'_> {
    fn write_str(&mut self, text: &str) -> core::fmt::Result {
        let room = self.bytes.len() - self.len;
        let take = text.len().min(room);
        self.bytes[self.len..self.len + take].copy_from_slice(&text.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Panics

static PANIC_BUFFER: KernelCell<[u8; hc::PANIC_MESSAGE_MAX as usize]> =
    KernelCell::new([0; hc::PANIC_MESSAGE_MAX as usize]);
static PANIC_PARAMS: KernelCell<hc::PanicParams> = KernelCell::new(hc::PanicParams {
    msg_gpa: 0,
    msg_len: 0,
    vector: 0,
    status: 0,
    error_code: 0,
    fault_rip: 0,
    fault_addr: 0,
});
static PANICKING: KernelCell<bool> = KernelCell::new(false);

/// Details of the CPU exception behind a panic, if any.
struct ExceptionInfo {
    vector: u64,
    error_code: u64,
    rip: u64,
    addr: u64,
}

fn report_panic(message: core::fmt::Arguments<'_>, exception: Option<ExceptionInfo>) -> ! {
    // SAFETY: KernelCell invariant; the flag stops a panic inside the panic
    // path from recursing.
    let panicking = unsafe { PANICKING.get() };
    if *panicking {
        hypercall(Hypercall::Shutdown, 0xdead);
        cpu::halt_forever();
    }
    *panicking = true;
    // SAFETY: as above; nothing else uses these cells.
    let (buffer, params) = unsafe { (PANIC_BUFFER.get(), PANIC_PARAMS.get()) };
    let mut out = FixedBuffer {
        bytes: buffer,
        len: 0,
    };
    let _ = out.write_fmt(message);
    let len = out.len as u64;
    let (vector, error_code, rip, addr) = match exception {
        Some(e) => (e.vector as u32, e.error_code, e.rip, e.addr),
        None => (hc::PANIC_NO_VECTOR, 0, 0, 0),
    };
    *params = hc::PanicParams {
        msg_gpa: image_gpa(buffer.as_ptr()),
        msg_len: len,
        vector,
        status: hc::STATUS_PENDING,
        error_code,
        fault_rip: rip,
        fault_addr: addr,
    };
    hypercall_with(Hypercall::Panic, params);
    cpu::halt_forever();
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    report_panic(format_args!("{info}"), None)
}

// ---------------------------------------------------------------------------
// Kernel heap

const HEAP_SIZE: usize = 256 * 1024;

#[global_allocator]
static ALLOCATOR: linked_list_allocator::LockedHeap = linked_list_allocator::LockedHeap::empty();

#[repr(C, align(4096))]
struct HeapSpace {
    bytes: [u8; HEAP_SIZE],
}
static HEAP_SPACE: KernelCell<HeapSpace> = KernelCell::new(HeapSpace {
    bytes: [0; HEAP_SIZE],
});

// ---------------------------------------------------------------------------
// Event ring

/// Record slots in the event ring (header + records fit in 16 KiB).
const EVENT_RING_CAPACITY: usize = 255;

#[repr(C, align(4096))]
struct EventRing {
    header: EventRingHeader,
    records: [EventRecord; EVENT_RING_CAPACITY],
}

static EVENT_RING: KernelCell<EventRing> = KernelCell::new(EventRing {
    header: EventRingHeader {
        magic: EVENT_RING_MAGIC,
        version: PROTOCOL_VERSION,
        capacity: EVENT_RING_CAPACITY as u32,
        record_size: core::mem::size_of::<EventRecord>() as u32,
        head: 0,
        tail: 0,
        lost: 0,
        reserved: 0,
    },
    records: [EventRecord {
        seq: 0,
        tick: 0,
        kind: 0,
        pid: 0,
        args: [0; 5],
    }; EVENT_RING_CAPACITY],
});

/// Appends an event to the ring and tells the VMM.
fn log_event(event: Event, tick: u64) {
    // SAFETY: KernelCell invariant. The VMM writes only `tail`, read volatile.
    let ring = unsafe { EVENT_RING.get() };
    let head = ring.header.head;
    // SAFETY: `tail` is a plain u64 inside the ring; the VMM updates it while
    // the vCPU is stopped in a hypercall, so read it fresh.
    let tail = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(ring.header.tail)) };
    if head.wrapping_sub(tail) >= EVENT_RING_CAPACITY as u64 {
        ring.header.lost += 1;
    } else {
        let mut record = event.encode();
        record.seq = head;
        record.tick = tick;
        ring.records[(head % EVENT_RING_CAPACITY as u64) as usize] = record;
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::Release);
        ring.header.head = head + 1;
    }
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    hypercall(Hypercall::EventNotify, 0);
}

// ---------------------------------------------------------------------------
// Processes

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProcessState {
    Runnable,
    Dead,
}

struct Process {
    pid: u32,
    pml4: u64,
    state: ProcessState,
    /// Saved user context while the process is not running.
    context: TrapFrame,
    regions: Vec<Region>,
    preemptions: u64,
}

enum Phase {
    /// The gate self-test context is running; `tried_other` once the
    /// preferred gate has failed.
    GateSelfTest { pml4: u64, tried_other: bool },
    /// Scenario processes are running.
    Running,
}

struct Kernel {
    boot: &'static BootInfo,
    frames: FrameAllocator<'static>,
    kernel_pml4: u64,
    gate: Gate,
    gate_frame: u64,
    phase: Phase,
    processes: Vec<Process>,
    /// Index into `processes` of the process whose context is live in the
    /// trap frame.
    current: Option<usize>,
    next_pid: u32,
    ticks: u64,
}

static KERNEL: KernelCell<Option<Kernel>> = KernelCell::new(None);
/// The context the self-test (and the first process) is entered from.
static BOOT_FRAME: KernelCell<TrapFrame> = KernelCell::new(TrapFrame {
    r15: 0,
    r14: 0,
    r13: 0,
    r12: 0,
    r11: 0,
    r10: 0,
    r9: 0,
    r8: 0,
    rbp: 0,
    rdi: 0,
    rsi: 0,
    rdx: 0,
    rcx: 0,
    rbx: 0,
    rax: 0,
    vector: 0,
    error_code: 0,
    rip: 0,
    cs: 0,
    rflags: 0,
    rsp: 0,
    ss: 0,
});

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
}

fn symbol_address(symbol: &u8) -> u64 {
    symbol as *const u8 as u64
}

/// Entry point, called by `_start` with the boot-info GPA.
#[no_mangle]
pub extern "C" fn kernel_main(boot_info_gpa: u64) -> ! {
    tables::init();
    let boot = read_boot_info(boot_info_gpa);

    // SAFETY: KernelCell invariant (boot runs before any trap).
    let ring = unsafe { EVENT_RING.get() };
    // SAFETY: linker-script symbols; only addresses are used.
    let (text_start, text_end) = unsafe { (symbol_address(&__text_start), symbol_address(&__text_end)) };
    let hello = hc::BootHelloParams {
        version: PROTOCOL_VERSION,
        status: hc::STATUS_PENDING,
        event_ring_gpa: image_gpa(ring as *const EventRing),
        event_ring_bytes: core::mem::size_of::<EventRing>() as u64,
        kernel_text_gpa: text_start - KERNEL_VMA_BASE,
        kernel_text_len: text_end - text_start,
    };
    hypercall_with(Hypercall::BootHello, &hello);

    if boot.debug_flags & boot::DEBUG_TRIPLE_FAULT != 0 {
        tables::load_empty_idt();
        // SAFETY: deliberately raises #UD with no IDT: the CPU shuts down.
        unsafe { core::arch::asm!("ud2", options(noreturn)) };
    }

    let mut frames = frame_allocator(boot);
    let kernel_pml4 = build_kernel_page_tables(boot, &mut frames);
    // SAFETY: the new tables map the kernel image, stacks and direct map
    // exactly as the VMM's boot tables did (same virtual addresses).
    unsafe { cpu::write_cr3(kernel_pml4) };
    enable_protection_features();
    // SAFETY: HEAP_SPACE is a static used only as the heap, handed over once.
    unsafe {
        ALLOCATOR.lock().init(
            core::ptr::addr_of_mut!((*HEAP_SPACE.as_ptr()).bytes) as *mut u8,
            HEAP_SIZE,
        )
    };
    setup_syscall_msrs();

    if boot.debug_flags & boot::DEBUG_BAD_HYPERCALLS != 0 {
        send_bad_hypercalls();
    }
    if boot.debug_flags & boot::DEBUG_PANIC_AFTER_BOOT != 0 {
        panic!("injected kernel panic (DEBUG_PANIC_AFTER_BOOT)");
    }

    let gate = match GatePreference::from_raw(boot.gate_preference) {
        Some(GatePreference::Syscall) => Gate::Syscall,
        Some(GatePreference::Int3) => Gate::Int3,
        _ => match HostFlavor::from_raw(boot.host_flavor) {
            Some(HostFlavor::Pvm) => Gate::Int3,
            _ => Gate::Syscall,
        },
    };
    let gate_frame = frames
        .alloc()
        .unwrap_or_else(|| panic!("out of memory for the gate page"));
    let mut kernel = Kernel {
        boot,
        frames,
        kernel_pml4,
        gate,
        gate_frame,
        phase: Phase::Running,
        processes: Vec::new(),
        current: None,
        next_pid: 1,
        ticks: 0,
    };
    kernel.write_gate_page();
    let pml4 = kernel
        .new_address_space()
        .unwrap_or_else(|| panic!("out of memory for the gate self-test"));
    kernel.phase = Phase::GateSelfTest {
        pml4,
        tried_other: false,
    };

    // SAFETY: KernelCell invariant; boot is the only user so far.
    let (slot, frame) = unsafe { (KERNEL.get(), BOOT_FRAME.get()) };
    *slot = Some(kernel);
    // SAFETY: `pml4` maps the kernel half like the kernel's own tables.
    unsafe { cpu::write_cr3(pml4) };
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
    // SAFETY: the VMM wrote a BootInfo at BOOT_INFO_GPA (checked above), in a
    // region the memory map reserves for it, and the boot page tables map it
    // through the direct map. BootInfo is plain data: any bytes are a valid
    // value, and the fields are validated below before use.
    let boot = unsafe { &*direct::<BootInfo>(gpa) };
    if boot.magic != boot::BOOT_INFO_MAGIC {
        panic!("boot info has a bad magic number {:#x}", boot.magic);
    }
    if boot.version != PROTOCOL_VERSION {
        panic!(
            "boot info protocol version {} but kernel speaks {}",
            boot.version, PROTOCOL_VERSION
        );
    }
    if boot.mem_size > MAX_GUEST_MEMORY || boot.mem_size < MIN_GUEST_MEMORY {
        panic!("boot info memory size {:#x} out of range", boot.mem_size);
    }
    boot
}

/// Carves the allocator's own bookkeeping out of the largest usable region and
/// hands the rest of usable RAM to it.
fn frame_allocator(boot: &BootInfo) -> FrameAllocator<'static> {
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
    let (stack_words, bitmap_words) = FrameAllocator::storage_words(total);
    let storage_bytes = (stack_words * 4).next_multiple_of(8) + bitmap_words * 8;
    let storage_pages = (storage_bytes as u64).div_ceil(PAGE_SIZE);
    let largest = ranges
        .iter_mut()
        .max_by_key(|(s, e)| e - s)
        .unwrap_or_else(|| panic!("the memory map has no usable RAM"));
    let storage_start = largest.0.next_multiple_of(PAGE_SIZE);
    if storage_start + storage_pages * PAGE_SIZE > largest.1 {
        panic!("not enough RAM for the frame allocator");
    }
    largest.0 = storage_start + storage_pages * PAGE_SIZE;
    let stack_bytes = (stack_words * 4).next_multiple_of(8) as u64;
    // SAFETY: [storage_start, +storage_pages) is usable guest RAM removed from
    // the allocator's ranges above, so nothing else will ever use it; the VMM
    // hands over guest RAM zeroed, as the bitmap requires; both slices are
    // suitably aligned (page-aligned start, 8-aligned bitmap offset).
    let (stack, bitmap) = unsafe {
        (
            core::slice::from_raw_parts_mut(direct::<u32>(storage_start), stack_words),
            core::slice::from_raw_parts_mut(direct::<u64>(storage_start + stack_bytes), bitmap_words),
        )
    };
    FrameAllocator::new(ranges, stack, bitmap)
}

fn build_kernel_page_tables(boot: &BootInfo, frames: &mut FrameAllocator<'static>) -> u64 {
    let pml4 = frames
        .alloc()
        .unwrap_or_else(|| panic!("out of memory for the kernel PML4"));
    let mut memory = DirectMap(frames);
    let mut map_4k = |va: u64, pa: u64, flags: Flags| {
        paging::map(
            &mut memory,
            pml4,
            va,
            pa,
            PageSize::Size4K,
            flags,
            KERNEL_TABLE_FLAGS,
        )
        .unwrap_or_else(|e| panic!("mapping kernel page {va:#x}: {e:?}"));
    };
    // SAFETY: linker-script symbols; only their addresses are used.
    let (text, rodata, data, guard) = unsafe {
        (
            (symbol_address(&__text_start), symbol_address(&__text_end)),
            (symbol_address(&__rodata_start), symbol_address(&__rodata_end)),
            (symbol_address(&__data_start), symbol_address(&__data_end)),
            symbol_address(&__kernel_stack_guard),
        )
    };
    let sections = [
        (text, Flags::empty()),
        (rodata, Flags::NO_EXECUTE),
        (data, Flags::WRITABLE | Flags::NO_EXECUTE),
    ];
    for ((start, end), flags) in sections {
        for va in (start..end).step_by(PAGE_SIZE as usize) {
            if va != guard {
                map_4k(va, va - KERNEL_VMA_BASE, flags);
            }
        }
    }
    map_4k(
        LAPIC_VA,
        LAPIC_GPA,
        Flags::WRITABLE | Flags::NO_EXECUTE | Flags::NO_CACHE | Flags::WRITE_THROUGH,
    );
    let direct_end = boot.mem_size.next_multiple_of(LARGE_PAGE_SIZE);
    for pa in (0..direct_end).step_by(LARGE_PAGE_SIZE as usize) {
        paging::map(
            &mut memory,
            pml4,
            DIRECT_MAP_BASE + pa,
            pa,
            PageSize::Size2M,
            Flags::WRITABLE | Flags::NO_EXECUTE,
            KERNEL_TABLE_FLAGS,
        )
        .unwrap_or_else(|e| panic!("mapping the direct map at {pa:#x}: {e:?}"));
    }
    pml4
}

/// CR0.WP (the kernel cannot write read-only pages either), EFER.NXE, and
/// SMEP/SMAP where the CPU has them: the kernel never executes or touches user
/// pages through user addresses (it reads user memory via the direct map).
fn enable_protection_features() {
    const CR0_WP: u64 = 1 << 16;
    const CR4_SMEP: u64 = 1 << 20;
    const CR4_SMAP: u64 = 1 << 21;
    // SAFETY: setting WP keeps paging on and only adds protection.
    unsafe { cpu::write_cr0(cpu::read_cr0() | CR0_WP) };
    // SAFETY: NXE is required by the NX bits in our page tables.
    unsafe { cpu::wrmsr(cpu::msr::EFER, cpu::rdmsr(cpu::msr::EFER) | cpu::msr::EFER_NXE) };
    if let Some((ebx, _, _)) = cpu::cpuid_leaf7() {
        let mut cr4 = cpu::read_cr4();
        if ebx & (1 << 7) != 0 {
            cr4 |= CR4_SMEP;
        }
        if ebx & (1 << 20) != 0 {
            cr4 |= CR4_SMAP;
        }
        // SAFETY: only bits CPUID reports as supported are set.
        unsafe { cpu::write_cr4(cr4) };
    }
}

fn setup_syscall_msrs() {
    use cpu::msr;
    const FMASK_VALUE: u64 = 0x4_7700; // IF, DF, TF, AC, NT
                                       // SAFETY: architectural MSRs; LSTAR points at the syscall entry stub and
                                       // STAR holds the selectors of our GDT.
    unsafe {
        cpu::wrmsr(msr::EFER, cpu::rdmsr(msr::EFER) | msr::EFER_SCE);
        cpu::wrmsr(msr::STAR, tables::STAR_VALUE);
        cpu::wrmsr(msr::LSTAR, syscall_entry as *const () as u64);
        cpu::wrmsr(msr::FMASK, FMASK_VALUE);
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
        let status = console_write(0, gpa, len);
        if status == hc::STATUS_OK {
            panic!("the VMM accepted a console write of {len} bytes at {gpa:#x}");
        }
        log_event(
            Event::HypercallRefused {
                port: Hypercall::ConsoleWrite.port().into(),
                status: status.into(),
            },
            0,
        );
    }
}

// ---------------------------------------------------------------------------
// The kernel after boot

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
pub extern "C" fn trap_dispatch(frame: &mut TrapFrame) {
    if !frame.from_user() {
        kernel_exception(frame);
    }
    let kernel = kernel();
    match kernel.phase {
        Phase::GateSelfTest { pml4, tried_other } => kernel.gate_self_test(frame, pml4, tried_other),
        Phase::Running => kernel.handle_user_trap(frame),
    }
}

fn kernel_exception(frame: &TrapFrame) -> ! {
    let addr = if frame.vector == 14 { cpu::read_cr2() } else { 0 };
    report_panic(
        format_args!(
            "exception {} in ring 0 at rip {:#x} (error code {:#x}, address {addr:#x})",
            frame.vector, frame.rip, frame.error_code
        ),
        Some(ExceptionInfo {
            vector: frame.vector,
            error_code: frame.error_code,
            rip: frame.rip,
            addr,
        }),
    )
}

impl Kernel {
    fn memory(&mut self) -> DirectMap<'_, 'static> {
        DirectMap(&mut self.frames)
    }

    fn write_gate_page(&mut self) {
        let page = direct::<u8>(self.gate_frame);
        let stub = self.gate.stub();
        let info = GateInfo {
            magic: sc::GATE_INFO_MAGIC,
            gate_kind: self.gate.kind(),
            tsc_khz: self.boot.tsc_khz,
        };
        // SAFETY: the gate frame is a whole frame owned by the kernel. Every
        // byte outside the stub is int3, so a jump to any other offset traps
        // as an illegal gate entry.
        unsafe {
            core::ptr::write_bytes(page, 0xcc, PAGE_SIZE as usize);
            core::ptr::copy_nonoverlapping(stub.as_ptr(), page, stub.len());
            core::ptr::write_unaligned(page.add(GATE_INFO_OFFSET as usize) as *mut GateInfo, info);
        }
    }

    /// A fresh PML4 sharing the kernel half and mapping the gate page.
    fn new_address_space(&mut self) -> Option<u64> {
        let pml4 = self.frames.alloc()?;
        let kernel_pml4 = self.kernel_pml4;
        let gate_frame = self.gate_frame;
        let mut memory = self.memory();
        for slot in 256..512 {
            let entry = memory.table(kernel_pml4)[slot].clone();
            memory.table(pml4)[slot] = entry;
        }
        if paging::map(
            &mut memory,
            pml4,
            GATE_VA,
            gate_frame,
            PageSize::Size4K,
            Flags::USER_ACCESSIBLE,
            USER_TABLE_FLAGS,
        )
        .is_err()
        {
            self.destroy_address_space(pml4);
            return None;
        }
        Some(pml4)
    }

    /// Frees every user frame and table of an address space and the PML4
    /// itself. The caller must not be running on it.
    fn destroy_address_space(&mut self, pml4: u64) {
        let gate_frame = self.gate_frame;
        let mut released: Vec<u64> = Vec::new();
        paging::free_user_half(&mut self.memory(), pml4, |_, frame, _| {
            if frame != gate_frame {
                released.push(frame);
            }
        });
        for frame in released.into_iter().chain(core::iter::once(pml4)) {
            scrub(frame);
            if let Err(error) = self.frames.free(frame) {
                panic!("freeing frame {frame:#x} of address space {pml4:#x}: {error:?}");
            }
        }
    }

    fn is_gate_entry(&self, frame: &TrapFrame) -> bool {
        frame.vector == self.gate.vector() && frame.rip == self.gate.return_rip()
    }

    fn gate_self_test(&mut self, frame: &mut TrapFrame, pml4: u64, tried_other: bool) {
        if self.is_gate_entry(frame) && frame.rax == Syscall::GateSelfTest as u64 {
            // SAFETY: switching to the kernel's own tables before freeing these.
            unsafe { cpu::write_cr3(self.kernel_pml4) };
            self.destroy_address_space(pml4);
            self.phase = Phase::Running;
            log_event(
                Event::KernelReady {
                    gate_kind: self.gate.kind(),
                    free_frames: self.frames.free_frames(),
                    total_frames: self.frames.total_frames(),
                },
                0,
            );
            self.start_processes(frame);
            return;
        }
        log_event(
            Event::GateSelfTestFailed {
                gate_kind: self.gate.kind(),
                vector: frame.vector,
                rip: frame.rip,
                error_code: frame.error_code,
            },
            0,
        );
        if tried_other {
            panic!("no working system-call gate: both syscall and int3 failed the self-test");
        }
        self.gate = self.gate.other();
        self.write_gate_page();
        self.phase = Phase::GateSelfTest {
            pml4,
            tried_other: true,
        };
        *frame = self_test_frame();
    }

    fn start_processes(&mut self, frame: &mut TrapFrame) {
        for index in 0..self.boot.processes().len() {
            if let Err(error) = self.spawn(index) {
                log_event(
                    Event::SpawnFailed {
                        spec_index: index as u64,
                        error: Some(error),
                    },
                    self.ticks,
                );
            }
        }
        lapic::start_timer(TIMER_VECTOR, SPURIOUS_VECTOR);
        hypercall(Hypercall::Phase, hc::BootPhase::FirstUserInstruction as u32);
        self.reschedule(frame, false);
    }

    fn spawn(&mut self, index: usize) -> Result<(), SpawnError> {
        let spec = &self.boot.processes()[index];
        let program = self
            .boot
            .programs()
            .get(spec.program as usize)
            .ok_or(SpawnError::NoSuchProgram)?;
        let image_end = program.gpa.checked_add(program.len).ok_or(SpawnError::BadElf)?;
        if image_end > self.boot.mem_size {
            return Err(SpawnError::BadElf);
        }
        // SAFETY: the range was checked to lie inside guest RAM, which the
        // direct map covers; program images are in a region the memory map
        // reserves, so nothing writes them while this shared slice lives.
        let image = unsafe { core::slice::from_raw_parts(direct::<u8>(program.gpa), program.len as usize) };
        let plan = check_user_image(image)?;
        let pml4 = self.new_address_space().ok_or(SpawnError::OutOfMemory)?;
        let mut regions = Vec::new();
        if let Err(error) = self.populate(pml4, &plan, image, spec, &mut regions) {
            self.destroy_address_space(pml4);
            return Err(error);
        }
        let args_len = (spec.args_len as usize).min(boot::ARGS_LEN) as u64;
        let args_va = USER_STACK_TOP - USER_ARGS_MAX;
        let mut context = TrapFrame::new_user(plan.entry, args_va & !0xf, true);
        context.rdi = args_va;
        context.rsi = args_len;
        let pid = self.next_pid;
        self.next_pid += 1;
        self.processes.push(Process {
            pid,
            pml4,
            state: ProcessState::Runnable,
            context,
            regions,
            preemptions: 0,
        });
        log_event(
            Event::ProcessSpawned {
                pid,
                spec_index: index as u64,
                pml4_gpa: pml4,
            },
            self.ticks,
        );
        Ok(())
    }

    /// Maps the image segments, the stack (with the argument bytes at its top)
    /// and records the regions.
    fn populate(
        &mut self,
        pml4: u64,
        plan: &LoadPlan,
        image: &[u8],
        spec: &boot::ProcessSpec,
        regions: &mut Vec<Region>,
    ) -> Result<(), SpawnError> {
        for segment in plan.segments() {
            let (kind, flags) = match (segment.rights.execute, segment.rights.write) {
                (true, _) => (RegionKind::Code, Flags::USER_ACCESSIBLE),
                (false, true) => (
                    RegionKind::Data,
                    Flags::USER_ACCESSIBLE | Flags::WRITABLE | Flags::NO_EXECUTE,
                ),
                (false, false) => (
                    RegionKind::ReadOnlyData,
                    Flags::USER_ACCESSIBLE | Flags::NO_EXECUTE,
                ),
            };
            let file_start = segment.vaddr;
            let file_end = segment.vaddr + segment.file_len;
            for page in (segment.first_page()..segment.end_page()).step_by(PAGE_SIZE as usize) {
                let frame = self.map_fresh_page(pml4, page, flags)?;
                let copy_start = file_start.max(page);
                let copy_end = file_end.min(page + PAGE_SIZE);
                if copy_start < copy_end {
                    let source = (segment.file_offset + (copy_start - segment.vaddr)) as usize;
                    let bytes = &image[source..source + (copy_end - copy_start) as usize];
                    // SAFETY: the destination is inside the fresh frame just
                    // mapped (the range is clipped to this page).
                    unsafe {
                        core::ptr::copy_nonoverlapping(
                            bytes.as_ptr(),
                            direct::<u8>(frame + (copy_start - page)),
                            bytes.len(),
                        )
                    };
                }
            }
            regions.push(Region {
                start: segment.first_page(),
                end: segment.end_page(),
                kind,
            });
        }
        let stack_bottom = USER_STACK_TOP - USER_STACK_PAGES * PAGE_SIZE;
        let stack_flags = Flags::USER_ACCESSIBLE | Flags::WRITABLE | Flags::NO_EXECUTE;
        let mut top_frame = 0;
        for page in (stack_bottom..USER_STACK_TOP).step_by(PAGE_SIZE as usize) {
            top_frame = self.map_fresh_page(pml4, page, stack_flags)?;
        }
        let args_len = (spec.args_len as usize).min(boot::ARGS_LEN);
        // SAFETY: the argument area is the last USER_ARGS_MAX bytes of the top
        // stack frame, which was just allocated for this process.
        unsafe {
            core::ptr::copy_nonoverlapping(
                spec.args.as_ptr(),
                direct::<u8>(top_frame + PAGE_SIZE - USER_ARGS_MAX),
                args_len,
            )
        };
        let guard_bottom = stack_bottom - USER_STACK_GUARD_PAGES * PAGE_SIZE;
        regions.push(Region {
            start: guard_bottom,
            end: stack_bottom,
            kind: RegionKind::StackGuard,
        });
        regions.push(Region {
            start: stack_bottom,
            end: USER_STACK_TOP,
            kind: RegionKind::Stack,
        });
        regions.push(Region {
            start: GATE_VA,
            end: GATE_VA + PAGE_SIZE,
            kind: RegionKind::Gate,
        });
        Ok(())
    }

    fn map_fresh_page(&mut self, pml4: u64, va: u64, flags: Flags) -> Result<u64, SpawnError> {
        let frame = self.frames.alloc().ok_or(SpawnError::OutOfMemory)?;
        match paging::map(
            &mut self.memory(),
            pml4,
            va,
            frame,
            PageSize::Size4K,
            flags,
            USER_TABLE_FLAGS,
        ) {
            Ok(()) => Ok(frame),
            Err(_) => {
                // Frames from the allocator are zero, so it can go straight back.
                let _ = self.frames.free(frame);
                Err(SpawnError::OutOfMemory)
            }
        }
    }

    fn handle_user_trap(&mut self, frame: &mut TrapFrame) {
        match frame.vector {
            _ if self.is_gate_entry(frame) => self.syscall(frame),
            v if v == u64::from(TIMER_VECTOR) => {
                lapic::end_of_interrupt();
                self.ticks += 1;
                self.reschedule(frame, true);
            }
            v if v == u64::from(SPURIOUS_VECTOR) => {}
            14 => {
                let addr = cpu::read_cr2();
                let regions = self
                    .current_process()
                    .map(|p| p.regions.as_slice())
                    .unwrap_or(&[]);
                let fault = classify_page_fault(regions, addr, frame.error_code);
                self.kill_current(frame, fault, addr);
            }
            SYSCALL_VECTOR => self.kill_current(frame, FaultKind::IllegalGateEntry, frame.rip),
            vector => self.kill_current(frame, classify_exception(vector), 0),
        }
    }

    fn current_process(&mut self) -> Option<&mut Process> {
        let index = self.current?;
        self.processes.get_mut(index)
    }

    fn syscall(&mut self, frame: &mut TrapFrame) {
        let result = match Syscall::from_raw(frame.rax) {
            Some(Syscall::Write) => self.sys_write(frame.rdi, frame.rsi),
            Some(Syscall::Exit) => {
                let code = frame.rdi as i64;
                return self.terminate_current(frame, Termination::Exit(code));
            }
            Some(Syscall::Yield) => {
                frame.rax = 0;
                return self.reschedule(frame, true);
            }
            Some(Syscall::GetPid) => Ok(self.current_process().map_or(0, |p| u64::from(p.pid))),
            Some(
                Syscall::MemMap
                | Syscall::MemUnmap
                | Syscall::MemProtect
                | Syscall::MemStat
                | Syscall::IpcSend
                | Syscall::IpcRecv
                | Syscall::GateSelfTest,
            )
            | None => Err(SysError::NoSys),
        };
        frame.rax = encode_result(result);
    }

    /// `write(buf, len)`: the whole range is validated against the caller's
    /// page tables before a single byte is printed.
    fn sys_write(&mut self, buf: u64, len: u64) -> Result<u64, SysError> {
        if len > sc::WRITE_MAX {
            return Err(SysError::TooLarge);
        }
        let end = buf.checked_add(len).ok_or(SysError::Overflow)?;
        if !is_user_range(buf, len) {
            return Err(SysError::BadAddress);
        }
        let (pid, pml4) = match self.current_process() {
            Some(process) => (process.pid, process.pml4),
            None => return Err(SysError::NoSuchProcess),
        };
        let mut chunks: [(u64, u64); 2] = [(0, 0); 2];
        let mut count = 0;
        let mut va = buf;
        while va < end {
            let translation = paging::translate(&mut self.memory(), pml4, va).ok_or(SysError::BadAddress)?;
            if !translation.flags.contains(Flags::USER_ACCESSIBLE) {
                return Err(SysError::BadAddress);
            }
            let chunk_end = end.min((va & !(PAGE_SIZE - 1)) + PAGE_SIZE);
            // WRITE_MAX is one page, so a buffer spans at most two pages.
            chunks[count] = (translation.phys, chunk_end - va);
            count += 1;
            va = chunk_end;
        }
        for &(gpa, chunk_len) in &chunks[..count] {
            if console_write(pid, gpa, chunk_len) != hc::STATUS_OK {
                return Err(SysError::InvalidArgument);
            }
        }
        Ok(len)
    }

    fn kill_current(&mut self, frame: &mut TrapFrame, fault: FaultKind, addr: u64) {
        self.terminate_current(frame, Termination::Killed { fault, addr });
    }

    fn terminate_current(&mut self, frame: &mut TrapFrame, how: Termination) {
        let Some(index) = self.current else {
            panic!("trap from ring 3 with no current process");
        };
        let process = &mut self.processes[index];
        let (pid, pml4, preemptions) = (process.pid, process.pml4, process.preemptions);
        process.state = ProcessState::Dead;
        process.regions = Vec::new();
        let event = match how {
            Termination::Exit(code) => Event::ProcessExited {
                pid,
                code,
                preemptions,
            },
            Termination::Killed { fault, addr } => Event::ProcessKilled {
                pid,
                fault: Some(fault),
                addr,
                rip: frame.rip,
                error_code: frame.error_code,
                vector: frame.vector,
            },
        };
        // SAFETY: the kernel's tables map the kernel like every process's.
        unsafe { cpu::write_cr3(self.kernel_pml4) };
        self.destroy_address_space(pml4);
        log_event(event, self.ticks);
        self.reschedule(frame, false);
    }

    /// Round-robin: resumes the next runnable process after the current one
    /// (possibly the current one again). `current_alive` says whether the
    /// context in `frame` must be saved first.
    fn reschedule(&mut self, frame: &mut TrapFrame, current_alive: bool) {
        let count = self.processes.len();
        let start = self.current.map_or(0, |c| c + 1);
        let next = (0..count)
            .map(|offset| (start + offset) % count)
            .find(|&i| self.processes[i].state == ProcessState::Runnable);
        let Some(next) = next else {
            self.shutdown(0);
        };
        if Some(next) == self.current {
            return;
        }
        if let (Some(current), true) = (self.current, current_alive) {
            let process = &mut self.processes[current];
            process.context = *frame;
            if frame.vector == u64::from(TIMER_VECTOR) {
                process.preemptions += 1;
            }
        }
        let process = &self.processes[next];
        *frame = process.context;
        // SAFETY: every process PML4 shares the kernel half.
        unsafe { cpu::write_cr3(process.pml4) };
        self.current = Some(next);
    }

    fn shutdown(&mut self, code: u32) -> ! {
        hypercall(Hypercall::Shutdown, code);
        cpu::halt_forever();
    }
}

enum Termination {
    Exit(i64),
    Killed { fault: FaultKind, addr: u64 },
}
