//! The kernel's side of the VMM interface: hypercalls, console output, the
//! panic report, and the event ring.

use super::memory::image_gpa;
use crate::arch::{cpu, KernelCell};
use crate::ring::Ring;
use core::fmt::Write;
use superos_protocol::cpu::MAX_CPUS;
use superos_protocol::event::{Event, EventRecord, EventRingHeader, EVENT_RING_MAGIC};
use superos_protocol::hypercall::{self as hc, Hypercall};
use superos_protocol::PROTOCOL_VERSION;
use zerocopy::{Immutable, IntoBytes};

/// A hypercall with a plain value.
pub fn hypercall(call: Hypercall, value: u32) {
    cpu::out32(call.port(), value);
}

/// A hypercall with a parameter block. Blocks live in kernel statics, whose
/// guest-physical addresses are below 4 GiB by construction of the linker
/// script.
pub fn hypercall_with<T: IntoBytes + Immutable>(call: Hypercall, params: &T) {
    hypercall(call, image_gpa(params as *const T) as u32);
}

static CONSOLE_PARAMS: KernelCell<hc::ConsoleWriteParams> =
    KernelCell::new(hc::ConsoleWriteParams { source_pid: 0, status: 0, gpa: 0, len: 0 });

/// Asks the VMM to print `len` bytes at guest-physical `gpa` on behalf of
/// `pid` (0 = the kernel). Returns the VMM's status.
pub fn console_write(pid: u32, gpa: u64, len: u64) -> u32 {
    // SAFETY: single-CPU kernel with interrupts off (KernelCell invariant).
    let params = unsafe { CONSOLE_PARAMS.get() };
    *params = hc::ConsoleWriteParams { source_pid: pid, status: hc::STATUS_PENDING, gpa, len };
    hypercall_with(Hypercall::ConsoleWrite, params);
    // SAFETY: the VMM wrote `status` during the hypercall; read it afresh.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!(params.status)) }
}

/// An empty debug-trap block.
const NO_DEBUG_TRAP: hc::DebugTrapParams = hc::DebugTrapParams {
    pid: 0,
    status: 0,
    cpu: 0,
    action: 0,
    resume_rip: 0,
    registers: zerocopy::transmute!(crate::arch::TrapFrame::ZERO),
};

/// The block of the debug traps of processes (under the big kernel lock).
static DEBUG_TRAP_PARAMS: KernelCell<hc::DebugTrapParams> = KernelCell::new(NO_DEBUG_TRAP);

/// Per CPU: the block of the kernel's own debug traps (taken without the
/// lock, anywhere in ring 0).
static KERNEL_DEBUG_TRAP_PARAMS: KernelCell<[hc::DebugTrapParams; MAX_CPUS as usize]> =
    KernelCell::new([NO_DEBUG_TRAP; MAX_CPUS as usize]);

/// Tells the VMM that process `pid` trapped on CPU `cpu` with `registers`
/// (a breakpoint or a single step) and returns its answer: the action
/// (`DEBUG_ACTION_*`, [`hc::DEBUG_ACTION_KILL`] unless the VMM answered
/// well) and where to resume. With a debugger attached the call returns
/// only when the debugger resumes the guest.
pub fn debug_trap(pid: u32, cpu: u32, registers: superos_protocol::introspect::UserContext) -> DebugAnswer {
    // SAFETY: KernelCell invariant (the caller holds the big kernel lock).
    ask_debugger(unsafe { DEBUG_TRAP_PARAMS.get() }, pid, cpu, registers)
}

/// [`debug_trap`] for the kernel itself (pid 0): a breakpoint a debugger
/// planted in its text, or the step over one, on `cpu`.
#[link_section = ".text.debug_path"]
pub fn kernel_debug_trap(cpu: u32, registers: superos_protocol::introspect::UserContext) -> DebugAnswer {
    // SAFETY: KernelCell invariant: each CPU uses only its own block, and
    // the caller keeps a trap in this path from re-entering it.
    let blocks = unsafe { KERNEL_DEBUG_TRAP_PARAMS.get() };
    match blocks.get_mut(cpu as usize) {
        Some(params) => ask_debugger(params, 0, cpu, registers),
        None => DebugAnswer { action: hc::DEBUG_ACTION_KILL, rip: registers.rip, registers: None },
    }
}

impl DebugAnswer {
    /// Resumes the trapped code in `frame` as answered, if the answer is
    /// a continue or a step at a RIP `allowed` accepts (the trapped code's
    /// half): the registers the debugger rewrote, the RIP, and the trap
    /// flag for a step. False for anything else (the caller's fault path).
    #[inline(always)]
    pub fn resume(&self, frame: &mut crate::arch::TrapFrame, allowed: impl Fn(u64) -> bool) -> bool {
        let resumes = matches!(self.action, hc::DEBUG_ACTION_CONTINUE | hc::DEBUG_ACTION_STEP);
        if !resumes || !allowed(self.rip) {
            return false;
        }
        if let Some(registers) = &self.registers {
            frame.apply_debugger_registers(registers);
        }
        frame.rip = self.rip;
        if self.action == hc::DEBUG_ACTION_STEP {
            frame.rflags |= RFLAGS_TF;
        } else {
            frame.rflags &= !RFLAGS_TF;
        }
        true
    }
}

/// RFLAGS.TF, the trap flag: a debug exception after the next instruction.
const RFLAGS_TF: u64 = 1 << 8;

/// What the VMM answered a debug trap.
pub struct DebugAnswer {
    /// `DEBUG_ACTION_*` (without [`hc::DEBUG_ACTION_REGISTERS`]).
    pub action: u32,
    /// Where to resume.
    pub rip: u64,
    /// The registers the debugger rewrote, if it did (to be applied with
    /// [`crate::arch::TrapFrame::apply_debugger_registers`]).
    pub registers: Option<superos_protocol::introspect::UserContext>,
}

#[link_section = ".text.debug_path"]
fn ask_debugger(
    params: &mut hc::DebugTrapParams,
    pid: u32,
    cpu: u32,
    registers: superos_protocol::introspect::UserContext,
) -> DebugAnswer {
    *params = hc::DebugTrapParams {
        pid,
        status: hc::STATUS_PENDING,
        cpu,
        action: hc::DEBUG_ACTION_KILL,
        resume_rip: registers.rip,
        registers,
    };
    // Not `hypercall_with`: nothing outside the debug path on the way.
    cpu::out32(Hypercall::DebugTrap.port(), image_gpa(params as *const hc::DebugTrapParams) as u32);
    // SAFETY: the VMM wrote these fields during the hypercall; read them afresh.
    let (status, action, rip) = unsafe {
        (
            core::ptr::read_volatile(core::ptr::addr_of!(params.status)),
            core::ptr::read_volatile(core::ptr::addr_of!(params.action)),
            core::ptr::read_volatile(core::ptr::addr_of!(params.resume_rip)),
        )
    };
    if status != hc::STATUS_OK {
        return DebugAnswer { action: hc::DEBUG_ACTION_KILL, rip, registers: None };
    }
    // SAFETY: as above: the VMM rewrote the block's registers.
    let rewritten = (action & hc::DEBUG_ACTION_REGISTERS != 0)
        .then(|| unsafe { core::ptr::read_volatile(core::ptr::addr_of!(params.registers)) });
    DebugAnswer { action: action & !hc::DEBUG_ACTION_REGISTERS, rip, registers: rewritten }
}

static SCRUB_PARAMS: KernelCell<hc::ScrubFramesParams> =
    KernelCell::new(hc::ScrubFramesParams { list_gpa: 0, count: 0, status: 0 });

/// Asks the VMM to zero the frames in `list` (a kernel static). Returns the
/// VMM's status.
pub fn scrub_frames(list: &[u64]) -> u32 {
    // SAFETY: KernelCell invariant.
    let params = unsafe { SCRUB_PARAMS.get() };
    *params = hc::ScrubFramesParams {
        list_gpa: image_gpa(list.as_ptr()),
        count: list.len() as u32,
        status: hc::STATUS_PENDING,
    };
    hypercall_with(Hypercall::ScrubFrames, params);
    // SAFETY: as for console_write.
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
pub struct ExceptionInfo {
    /// Exception vector.
    pub vector: u64,
    /// Error code.
    pub error_code: u64,
    /// Faulting instruction.
    pub rip: u64,
    /// CR2 for page faults.
    pub addr: u64,
}

/// Reports a kernel panic to the VMM and stops.
pub fn report_panic(message: core::fmt::Arguments<'_>, exception: Option<ExceptionInfo>) -> ! {
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
    let mut out = FixedBuffer { bytes: buffer, len: 0 };
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

/// Record slots in the event ring (header + records fit in 16 KiB).
const EVENT_RING_CAPACITY: usize = 255;

/// The event ring: a header and its records, in one static the VMM reads.
pub type EventRing = Ring<EventRecord, EVENT_RING_CAPACITY>;

static EVENT_RING: KernelCell<EventRing> = KernelCell::new(Ring::new(
    EVENT_RING_MAGIC,
    PROTOCOL_VERSION,
    EventRecord { seq: 0, tick: 0, kind: 0, cpu: 0, pid: 0, args: [0; 5] },
));

/// Guest-physical address and size of the event ring.
pub fn event_ring_location() -> (u64, u64) {
    (image_gpa(EVENT_RING.as_ptr()), core::mem::size_of::<EventRing>() as u64)
}

/// DEBUG_CORRUPT_EVENT_RING: makes the ring header claim an absurd capacity
/// and head, as a hostile or broken kernel might.
pub fn corrupt_event_ring() {
    // SAFETY: KernelCell invariant; deliberately breaks the ring for a test.
    let ring = unsafe { EVENT_RING.get() };
    ring.header.capacity = u32::MAX;
    ring.header.head = u64::MAX / 2;
    hypercall(Hypercall::EventNotify, 0);
}

/// DEBUG_EVENT_FLOOD: fills the whole ring with records and notifies, again
/// and again, forever: a full ring of new records per exit.
pub fn flood_event_ring() -> ! {
    let mut tick = 0u64;
    loop {
        fill_event_ring(&mut tick);
    }
}

/// One round of DEBUG_EVENT_FLOOD (and DEBUG_ALL_FLOOD): fills the ring
/// with records up to its capacity and notifies.
pub fn fill_event_ring(tick: &mut u64) {
    // SAFETY: KernelCell invariant; the VMM writes only `tail`.
    let ring = unsafe { EVENT_RING.get() };
    let tail = ring_tail(&ring.header);
    while ring.push(tail, |seq| {
        *tick = tick.wrapping_add(1);
        let mut record = Event::HypercallRefused { port: 0xf100, status: 1 }.encode();
        record.seq = seq;
        record.tick = *tick;
        record
    }) {}
    // The last push found the ring full: not a loss, the flood's own limit.
    ring.header.lost -= 1;
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    hypercall(Hypercall::EventNotify, 0);
}

/// Appends an event to the ring and tells the VMM at once.
pub fn log_event(event: Event, tick: u64) {
    append_event(event, tick);
    notify_events();
}

/// Appends an event to the ring (or counts it lost if the ring is full);
/// the VMM sees it at its next drain ([`notify_events`] or any hypercall).
pub fn append_event(event: Event, tick: u64) {
    // SAFETY: KernelCell invariant. The VMM writes only `tail`, read volatile.
    let ring = unsafe { EVENT_RING.get() };
    let tail = ring_tail(&ring.header);
    let (seq, cpu) = (ring.header.head, super::smp::BIG_LOCK.owner());
    let appended = ring.push(tail, |seq| {
        let mut record = event.encode();
        record.seq = seq;
        record.tick = tick;
        record.cpu = cpu as u16;
        record
    });
    if appended && super::trace::on() {
        super::trace::event(seq, cpu);
    }
}

/// Tells the VMM about the events appended since its last drain (a VM exit).
pub fn notify_events() {
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    hypercall(Hypercall::EventNotify, 0);
}

/// Records in the ring the VMM has not drained yet (it drains the whole
/// ring at every hypercall it handles).
pub fn events_undrained() -> u64 {
    // SAFETY: KernelCell invariant; the caller holds the big kernel lock.
    let ring = unsafe { EVENT_RING.get() };
    ring.undrained(ring_tail(&ring.header))
}

/// A ring's `tail`, read afresh: the VMM writes it while this vCPU is
/// stopped in a hypercall.
pub fn ring_tail(header: &EventRingHeader) -> u64 {
    // SAFETY: a reference to an aligned, initialised u64 is valid for a
    // volatile read.
    unsafe { core::ptr::read_volatile(&header.tail) }
}

/// Undrained records at which a batching kernel notifies: half the ring,
/// long before one could be lost.
pub const EVENTS_NOTIFY_AT: u64 = EVENT_RING_CAPACITY as u64 / 2;
