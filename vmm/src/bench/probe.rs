//! An instrumented run of a guest, for the figures a plain [`crate::run::run`]
//! cannot give: ring-0 instructions per operation (by single-stepping the
//! vCPU) and a look at the kernel's frame-owner table and the VMM's own
//! resident memory while processes are alive.
//!
//! It builds the guest like `run::run` does (guest RAM, VM, boot
//! preparation, a quiet [`Session`]) and hands every ordinary VM exit to
//! [`crate::run::handle_exit`], but drives `KVM_RUN` itself:
//!
//! - **Stepping.** With `KVM_SET_GUEST_DEBUG` (`ENABLE | SINGLESTEP`) every
//!   guest instruction ends in a `KVM_EXIT_DEBUG`. On the PVM host only ring-0
//!   instructions do (ring 3 runs natively and is not stepped), which is what
//!   is counted anyway: steps whose RIP lies in the kernel half. A step whose
//!   RIP lies in one of the kernel's entry stubs (`trap_stub_<vector>`,
//!   `syscall_entry`, found in the kernel ELF's symbols) starts a new
//!   *excursion* into the kernel; a system-call excursion is classified by
//!   `rax` read at that step. Timer (and spurious) interrupt excursions are
//!   counted apart: stepping makes ring-0 code slow, so ticks land far more
//!   often than in a plain run. A `rep`-prefixed string instruction (the
//!   kernel's `memcpy`/`memset`) counts once, however many bytes it moves:
//!   the emulator completes it in one step, so copy sizes show in time, not
//!   in the count.
//! - **Windows.** Guest programs bracket what they measure with two system
//!   calls the kernel does not know ([`MARK_BEGIN`], [`MARK_END`]); counted
//!   ring-0 instructions and VM exits between them are added to that
//!   operation's [`Window`]: all of them (an IPC round trip includes the
//!   peer's kernel work), or, when the begin marker's second argument is 1,
//!   only those of excursions entered from the marking process's address
//!   space (CR3). Stepping slows ring 0 but not ring 3, so a timer tick is
//!   nearly always pending when a long system call returns, and the process
//!   it switches to would otherwise land in the window.
//! - **Snapshot.** At the first `MemProtected` event (which only the
//!   `bench-ops release` program causes, once every process it waits for is
//!   alive) the kernel's introspection root and frame-owner table are read
//!   (frames by owner and pid), with the VMM's `VmRSS` and the guest RAM
//!   actually resident (`mincore`); then, if asked, the invariant checker
//!   ([`crate::check::Checker`]) runs a number of full checks while the vCPU
//!   waits, and each is timed.

use crate::boot::{self, BootOptions};
use crate::check::Checker;
use crate::console::ConsoleLine;
use crate::hypercall::{self, Request};
use crate::memory::GuestRam;
use crate::run::{handle_exit, GuestExit, Step};
use crate::scenario::Scenario;
use crate::session::{Echo, EventEntry, Phases, Session};
use crate::vm::{detect_host_flavor, Vm};
use elf::endian::AnyEndian;
use elf::ElfBytes;
use kvm_bindings::{kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP};
use kvm_ioctls::VcpuExit;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use superos_protocol::boot::{GatePreference, ScrubStrategy};
use superos_protocol::event::Event;
use superos_protocol::hypercall::BootHelloParams;
use superos_protocol::introspect::{IntrospectionRoot, INTROSPECTION_MAGIC};
use superos_protocol::layout::BOOT_INFO_GPA;
use superos_protocol::ownership::FrameOwner;

/// Marker system call: a measured region of operation `rdi` begins.
/// (The kernel answers `no-such-syscall`; `bench-ops` uses the same numbers.)
pub const MARK_BEGIN: u64 = 0xbe_0001;
/// Marker system call: the region of operation `rdi` ends, `rsi` operations.
pub const MARK_END: u64 = 0xbe_0002;

/// Marker operation ids (the same as `bench-ops`).
pub const OP_SYSCALL: u64 = 1;
/// `mem_map` + touch + `mem_unmap`.
pub const OP_MEM: u64 = 2;
/// Demand-zero faults.
pub const OP_FAULT: u64 = 3;
/// 64-byte message round trips.
pub const OP_IPC_RTT: u64 = 4;
/// A stream by messages.
pub const OP_STREAM_IPC: u64 = 5;
/// A stream through a shared region.
pub const OP_STREAM_SHM: u64 = 6;
/// Shared region create + grant + map + revoke.
pub const OP_SHM_CYCLE: u64 = 7;

/// Where the kernel half of the address space begins.
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;
/// The kernel's timer and spurious interrupt vectors.
const TIMER_VECTOR: u64 = 0x20;
const SPURIOUS_VECTOR: u64 = 0xff;
/// The breakpoint vector: the system-call gate on the PVM host.
const INT3_VECTOR: u64 = 3;

/// When to single-step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stepping {
    /// Never: a plain run (for the snapshot).
    Off,
    /// From the first kernel instruction.
    FromBoot,
    /// From the first user instruction (boot is not counted, and is fast).
    FromFirstUser,
}

/// What to do in an instrumented run.
#[derive(Clone, Copy, Debug)]
pub struct ProbeOptions {
    /// Stepping.
    pub stepping: Stepping,
    /// Read the kernel's tables and the VMM's RSS at the first `MemProtected`.
    pub snapshot: bool,
    /// Full invariant checks to run at the snapshot.
    pub checks: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Give up after this long.
    pub timeout: Duration,
}

/// Ring-0 work inside one operation's marked regions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    /// Ring-0 instructions (timer excursions and the markers excluded).
    pub instructions: u64,
    /// VM exits to the VMM (hypercalls).
    pub exits: u64,
    /// Operations, as the program's end markers said.
    pub ops: u64,
    /// Regions closed.
    pub regions: u64,
}

impl Window {
    /// Instructions per operation.
    pub fn instructions_per_op(&self) -> Option<f64> {
        (self.ops > 0).then(|| self.instructions as f64 / self.ops as f64)
    }

    /// VM exits per operation.
    pub fn exits_per_op(&self) -> Option<f64> {
        (self.ops > 0).then(|| self.exits as f64 / self.ops as f64)
    }
}

/// What stepping counted.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    /// Whether `KVM_SET_GUEST_DEBUG` was accepted (`None`: never asked).
    pub stepping: Option<Result<(), String>>,
    /// Every `KVM_EXIT_DEBUG`.
    pub steps: u64,
    /// Steps in user space (ordinary KVM steps ring 3 too; PVM does not).
    pub user_steps: u64,
    /// Ring-0 instructions before the first user instruction.
    pub boot_instructions: u64,
    /// VM exits before the first user instruction.
    pub boot_exits: u64,
    /// Ring-0 instructions after it, timer and marker excursions excluded.
    pub counted_instructions: u64,
    /// VM exits after the first user instruction outside timer excursions.
    pub counted_exits: u64,
    /// Timer and spurious interrupt excursions and their instructions.
    pub timer_excursions: u64,
    /// Their instructions.
    pub timer_instructions: u64,
    /// Lengths (instructions) of finished excursions by kind (`syscall <n>`,
    /// `vector <n>`).
    pub excursions: BTreeMap<String, Vec<u64>>,
}

/// Frames one process holds, from the kernel's owner table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessFrames {
    /// Its page-table frames (PML4 included).
    pub page_tables: u64,
    /// Its private frames (image, stack, data).
    pub private: u64,
    /// Messages waiting for it.
    pub messages: u64,
}

/// The kernel's tables and the VMM's memory at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Free frames (the kernel's count).
    pub free_frames: u64,
    /// Managed frames.
    pub total_frames: u64,
    /// Free frames when the kernel was ready (before any process existed).
    pub ready_free_frames: Option<u64>,
    /// Kernel-owned frames.
    pub kernel_frames: u64,
    /// Frames by pid.
    pub processes: BTreeMap<u32, ProcessFrames>,
    /// `size_of` a kernel process-table record, as the root says.
    pub process_record_size: u32,
    /// The VMM's `VmRSS` in bytes.
    pub vm_rss: u64,
    /// Of which anonymous (`RssAnon`: heap, stacks, guest RAM).
    pub rss_anon: u64,
    /// Of which file-backed (`RssFile`: the binary with its embedded guest
    /// images, shared libraries).
    pub rss_file: u64,
    /// Bytes of guest RAM resident in the VMM (`mincore`).
    pub guest_resident: u64,
    /// Size of guest RAM.
    pub guest_size: u64,
    /// The invariant checks run at the snapshot.
    pub checks: Vec<CheckSample>,
}

/// One full invariant check at the snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CheckSample {
    /// The whole check.
    pub time: Duration,
    /// Of which walking page tables.
    pub walk_time: Duration,
    /// Page-table entries examined.
    pub ptes: u64,
    /// Tables read.
    pub tables: u64,
    /// User leaf mappings.
    pub mappings: u64,
    /// Free frames verified zero.
    pub frames_scanned: u64,
    /// Violations found (there should be none).
    pub violations: usize,
}

/// Everything an instrumented run produced.
#[derive(Debug)]
pub struct Probe {
    /// Why the guest stopped.
    pub exit: GuestExit,
    /// Console lines.
    pub lines: Vec<ConsoleLine>,
    /// Kernel events.
    pub events: Vec<EventEntry>,
    /// Boot phases.
    pub phases: Phases,
    /// Marked regions by operation id.
    pub windows: BTreeMap<u64, Window>,
    /// Stepping counters.
    pub counts: Counts,
    /// The snapshot, if one was asked for and taken.
    pub snapshot: Option<Snapshot>,
}

/// Where one kernel entry stub lies and what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryStub {
    /// First byte.
    pub start: u64,
    /// One past the last.
    pub end: u64,
    /// Interrupt vector, or `None` for `syscall_entry`.
    pub vector: Option<u64>,
}

/// The kernel's entry stubs, sorted by address, from its ELF symbols.
pub fn entry_stubs(kernel: &[u8]) -> Result<Vec<EntryStub>, String> {
    let file = ElfBytes::<AnyEndian>::minimal_parse(kernel).map_err(|e| format!("kernel ELF: {e}"))?;
    let (symbols, strings) = file
        .symbol_table()
        .map_err(|e| format!("kernel symbols: {e}"))?
        .ok_or("the kernel ELF has no symbol table")?;
    let mut stubs = Vec::new();
    let mut common = None;
    for symbol in symbols.iter() {
        let Ok(name) = strings.get(symbol.st_name as usize) else { continue };
        if let Some(vector) = name.strip_prefix("trap_stub_").and_then(|v| v.parse::<u64>().ok()) {
            stubs.push(EntryStub { start: symbol.st_value, end: 0, vector: Some(vector) });
        } else if name == "trap_common" {
            common = Some(symbol.st_value);
        } else if name == "syscall_entry" && symbol.st_size > 0 {
            stubs.push(EntryStub {
                start: symbol.st_value,
                end: symbol.st_value + symbol.st_size,
                vector: None,
            });
        }
    }
    stubs.sort_by_key(|s| s.start);
    let common = common.ok_or("the kernel has no trap_common symbol")?;
    // A vector stub ends where the next one (or trap_common) begins.
    let mut bounds: Vec<u64> = stubs.iter().filter(|s| s.vector.is_some()).map(|s| s.start).collect();
    bounds.push(common);
    bounds.sort_unstable();
    for stub in stubs.iter_mut().filter(|s| s.vector.is_some()) {
        let next = bounds.iter().copied().find(|&b| b > stub.start);
        stub.end = next.filter(|&n| n - stub.start <= 16).unwrap_or(stub.start + 16);
    }
    if !stubs.iter().any(|s| s.vector == Some(INT3_VECTOR)) {
        return Err("the kernel has no trap_stub_3".into());
    }
    Ok(stubs)
}

/// The stub that `pc` lies in, as an index into `stubs`.
fn stub_at(stubs: &[EntryStub], pc: u64) -> Option<usize> {
    let index = stubs.partition_point(|s| s.start <= pc).checked_sub(1)?;
    (pc < stubs[index].end).then_some(index)
}

/// What the current kernel excursion is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    /// Before the first user instruction.
    Boot,
    /// Work that counts (a system call, a fault, ...), under this key.
    Counted(String),
    /// A timer or spurious interrupt.
    Timer,
    /// A marker call.
    Marker,
}

/// The stepping state machine: excursions, windows, counters. Fed with
/// every step and every other exit, it needs no KVM and is unit-tested.
#[derive(Debug, Default)]
pub struct Counter {
    counts: Counts,
    windows: BTreeMap<u64, Window>,
    /// Open windows: operation, and the CR3 they are limited to.
    open: Vec<(u64, Option<u64>)>,
    /// CR3 the current excursion was entered from.
    cr3: u64,
    kind: Option<Kind>,
    length: u64,
    last_stub: Option<usize>,
    booted: bool,
}

/// Registers at the first step of an excursion.
#[derive(Clone, Copy, Debug, Default)]
pub struct GateRegs {
    /// System-call number.
    pub rax: u64,
    /// First argument.
    pub rdi: u64,
    /// Second argument.
    pub rsi: u64,
    /// The address space it was entered from.
    pub cr3: u64,
}

impl Counter {
    /// Marks the first user instruction: later work is counted.
    pub fn first_user_instruction(&mut self) {
        self.booted = true;
    }

    /// Whether the step at `pc` starts an excursion (the caller then reads
    /// the registers for [`Counter::step`]).
    pub fn needs_regs(&self, stubs: &[EntryStub], pc: u64) -> bool {
        matches!(stub_at(stubs, pc), Some(index) if self.last_stub != Some(index))
    }

    /// One single-step exit with the vCPU at `pc` (after the instruction
    /// counted); `regs` for a gate excursion's first step.
    pub fn step(&mut self, stubs: &[EntryStub], pc: u64, regs: Option<GateRegs>) {
        self.counts.steps += 1;
        if pc < KERNEL_HALF {
            self.counts.user_steps += 1;
            self.last_stub = None;
            return;
        }
        let stub = stub_at(stubs, pc);
        if let Some(index) = stub.filter(|&i| self.last_stub != Some(i)) {
            self.finish_excursion();
            let regs = regs.unwrap_or_default();
            self.cr3 = regs.cr3;
            self.kind = Some(self.classify(stubs[index].vector, regs));
        }
        self.last_stub = stub;
        self.length += 1;
        match self.current() {
            Kind::Boot => self.counts.boot_instructions += 1,
            Kind::Timer => self.counts.timer_instructions += 1,
            Kind::Marker => {}
            Kind::Counted(_) => {
                self.counts.counted_instructions += 1;
                for op in self.counting() {
                    self.windows.entry(op).or_default().instructions += 1;
                }
            }
        }
    }

    /// One VM exit to the VMM (not a step).
    pub fn exit(&mut self) {
        if self.current() == Kind::Boot {
            self.counts.boot_exits += 1;
        }
        if let Kind::Counted(_) = self.current() {
            self.counts.counted_exits += 1;
            for op in self.counting() {
                self.windows.entry(op).or_default().exits += 1;
            }
        }
    }

    /// The open windows the current excursion counts in.
    fn counting(&self) -> Vec<u64> {
        self.open.iter().filter(|(_, cr3)| cr3.is_none_or(|c| c == self.cr3)).map(|(op, _)| *op).collect()
    }

    fn current(&self) -> Kind {
        match &self.kind {
            _ if !self.booted => Kind::Boot,
            Some(kind) => kind.clone(),
            None => Kind::Boot,
        }
    }

    fn classify(&mut self, vector: Option<u64>, regs: GateRegs) -> Kind {
        if !self.booted {
            return Kind::Boot;
        }
        match vector {
            Some(TIMER_VECTOR) | Some(SPURIOUS_VECTOR) => {
                self.counts.timer_excursions += 1;
                Kind::Timer
            }
            None | Some(INT3_VECTOR) => match regs.rax {
                MARK_BEGIN => {
                    if !self.open.iter().any(|(op, _)| *op == regs.rdi) {
                        self.open.push((regs.rdi, (regs.rsi == 1).then_some(regs.cr3)));
                    }
                    Kind::Marker
                }
                MARK_END => {
                    self.open.retain(|(op, _)| *op != regs.rdi);
                    let window = self.windows.entry(regs.rdi).or_default();
                    window.ops += regs.rsi;
                    window.regions += 1;
                    Kind::Marker
                }
                number => Kind::Counted(format!("syscall {number}")),
            },
            Some(vector) => Kind::Counted(format!("vector {vector}")),
        }
    }

    fn finish_excursion(&mut self) {
        if let Some(Kind::Counted(key)) = &self.kind {
            if self.booted {
                self.counts.excursions.entry(key.clone()).or_default().push(self.length);
            }
        }
        self.length = 0;
    }

    /// The counters and windows.
    pub fn finish(mut self) -> (Counts, BTreeMap<u64, Window>) {
        self.finish_excursion();
        (self.counts, self.windows)
    }
}

/// Runs `scenario` with the embedded kernel, instrumented as `options` say.
pub fn probe(scenario: &Scenario, options: &ProbeOptions) -> Result<Probe, String> {
    let kernel = crate::images::KERNEL_ELF;
    let stubs = entry_stubs(kernel)?;
    let ram = GuestRam::new(options.memory_mib).map_err(|e| e.to_string())?;
    let mut vm = Vm::new(&ram, None).map_err(|e| e.to_string())?;
    let boot_options = BootOptions {
        host: detect_host_flavor(),
        gate: GatePreference::Auto,
        scrub: ScrubStrategy::Auto,
        debug_flags: 0,
        tsc_khz: vm.tsc_khz(),
    };
    let prepared = boot::prepare(&ram, kernel, scenario, boot_options).map_err(|e| e.to_string())?;
    vm.setup_registers(prepared.entry, prepared.boot_pml4, BOOT_INFO_GPA).map_err(|e| e.to_string())?;
    let names = scenario.processes.iter().map(|p| p.name.clone()).collect();
    let mut session = Session::new(&ram, Instant::now(), Echo::Quiet, names);
    let usable = prepared.usable_ranges();
    let mut checker = Checker::new(usable);

    let mut counter = Counter::default();
    let mut counts_stepping = None;
    let debug = kvm_guest_debug {
        control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP,
        pad: 0,
        arch: Default::default(),
    };
    let mut stepping = false;
    if options.stepping == Stepping::FromBoot {
        let result = vm.vcpu.set_guest_debug(&debug).map_err(|e| e.to_string());
        stepping = result.is_ok();
        counts_stepping = Some(result);
    }
    let mut exits = BTreeMap::new();
    let mut root_gpa = None;
    let mut snapshot = None;
    let watchdog = Watchdog::start(options.timeout);
    let exit = loop {
        if !counter.booted && session.phases.first_user_instruction.is_some() {
            counter.first_user_instruction();
            if options.stepping == Stepping::FromFirstUser && !stepping {
                let result = vm.vcpu.set_guest_debug(&debug).map_err(|e| e.to_string());
                stepping = result.is_ok();
                counts_stepping = Some(result);
            }
        }
        let step = match vm.vcpu.run() {
            Ok(VcpuExit::Debug(arch)) => {
                let pc = arch.pc;
                let regs = if counter.needs_regs(&stubs, pc) {
                    let cr3 = vm.vcpu.get_sregs().map_or(0, |s| s.cr3);
                    vm.vcpu.get_regs().ok().map(|r| GateRegs { rax: r.rax, rdi: r.rdi, rsi: r.rsi, cr3 })
                } else {
                    None
                };
                counter.step(&stubs, pc, regs);
                Step::Continue
            }
            Ok(exit) => {
                if let VcpuExit::IoOut(port, data) = &exit {
                    if let Ok(Request::BootHello(gpa)) = hypercall::decode(*port, data) {
                        root_gpa = ram.read::<BootHelloParams>(gpa).ok().map(|p| p.introspection_root_gpa);
                    }
                }
                counter.exit();
                let hello = root_gpa.is_some() && !checker.root_announced();
                let step = handle_exit(&mut session, exit, &mut exits);
                if hello {
                    checker.boot_hello(&ram, session.kernel_text, root_gpa.unwrap_or(0));
                }
                if options.snapshot
                    && snapshot.is_none()
                    && session.events.iter().any(|e| matches!(e.event, Event::MemProtected { .. }))
                {
                    let mut taken = take_snapshot(&ram, root_gpa, &session.events)?;
                    checker.observe(&session.events);
                    taken.checks = (0..options.checks).map(|_| timed_check(&mut checker, &ram)).collect();
                    snapshot = Some(taken);
                }
                step
            }
            Err(error) if error.errno() == libc::EINTR || error.errno() == libc::EAGAIN => {
                if watchdog.fired() {
                    Step::Stop(GuestExit::Timeout(options.timeout))
                } else {
                    Step::Continue
                }
            }
            Err(error) => Step::Stop(GuestExit::VcpuError(error.to_string())),
        };
        if let Step::Stop(exit) = step {
            break exit;
        }
    };
    watchdog.stop();
    session.finish_console();
    let (mut counts, windows) = counter.finish();
    counts.stepping = counts_stepping;
    drop(vm);
    Ok(Probe {
        exit,
        lines: std::mem::take(&mut session.lines),
        events: std::mem::take(&mut session.events),
        phases: session.phases,
        windows,
        counts,
        snapshot,
    })
}

/// One full check, with the work it did.
fn timed_check(checker: &mut Checker, ram: &GuestRam) -> CheckSample {
    let walk_before = checker.stats.walk_time;
    let outcome = checker.check(ram);
    CheckSample {
        time: outcome.elapsed,
        walk_time: checker.stats.walk_time.saturating_sub(walk_before),
        ptes: outcome.counters.walk.entries,
        tables: outcome.counters.walk.tables,
        mappings: outcome.counters.walk.mappings,
        frames_scanned: outcome.counters.frames_scanned,
        violations: outcome.violations.len(),
    }
}

/// Stops a probe run that takes too long: a helper thread kicks the
/// calling thread out of `KVM_RUN` with a signal until it notices.
struct Watchdog {
    fired: std::sync::Arc<AtomicBool>,
    done: mpsc::Sender<()>,
    helper: std::thread::JoinHandle<()>,
}

extern "C" fn ignore_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl Watchdog {
    fn start(timeout: Duration) -> Watchdog {
        let signal = vmm_sys_util::signal::SIGRTMIN();
        // The same no-op handler `run::run` installs: without one the signal
        // would kill the process. Registering it again is harmless.
        let _ = vmm_sys_util::signal::register_signal_handler(signal, ignore_signal);
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        let fired = std::sync::Arc::new(AtomicBool::new(false));
        let (done, receiver) = mpsc::channel::<()>();
        let flag = fired.clone();
        let helper = std::thread::spawn(move || {
            if !matches!(receiver.recv_timeout(timeout), Err(mpsc::RecvTimeoutError::Timeout)) {
                return;
            }
            flag.store(true, Ordering::SeqCst);
            loop {
                // SAFETY: `thread` is the probing thread; it joins this helper
                // (in `stop`) before it can exit, so its pthread_t is valid.
                unsafe { libc::pthread_kill(thread, signal) };
                if !matches!(
                    receiver.recv_timeout(Duration::from_millis(20)),
                    Err(mpsc::RecvTimeoutError::Timeout)
                ) {
                    return;
                }
            }
        });
        Watchdog { fired, done, helper }
    }

    fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    fn stop(self) {
        let _ = self.done.send(());
        let _ = self.helper.join();
    }
}

fn take_snapshot(ram: &GuestRam, root_gpa: Option<u64>, events: &[EventEntry]) -> Result<Snapshot, String> {
    let root_gpa = root_gpa.ok_or("the kernel announced no introspection root")?;
    let root: IntrospectionRoot = ram.read(root_gpa).map_err(|e| format!("introspection root: {e}"))?;
    if root.magic != INTROSPECTION_MAGIC {
        return Err("the introspection root has a bad magic number".into());
    }
    let entries = usize::try_from(root.owner_table_entries).map_err(|_| "owner table too large")?;
    if entries > (ram.size() / 4096) as usize {
        return Err(format!("the owner table claims {entries} entries"));
    }
    let mut bytes = vec![0u8; entries * 4];
    ram.read_bytes(root.owner_table_gpa, &mut bytes).map_err(|e| format!("owner table: {e}"))?;
    let mut snapshot = Snapshot {
        free_frames: root.free_frames,
        total_frames: root.total_frames,
        process_record_size: root.process_record_size,
        guest_size: ram.size(),
        ..Snapshot::default()
    };
    for raw in bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])) {
        match FrameOwner::decode(raw) {
            Some(FrameOwner::Kernel) => snapshot.kernel_frames += 1,
            Some(FrameOwner::PageTable(pid)) => snapshot.processes.entry(pid).or_default().page_tables += 1,
            Some(FrameOwner::Private(pid)) => snapshot.processes.entry(pid).or_default().private += 1,
            Some(FrameOwner::Message(pid)) => snapshot.processes.entry(pid).or_default().messages += 1,
            _ => {}
        }
    }
    snapshot.ready_free_frames = events.iter().find_map(|e| match e.event {
        Event::KernelReady { free_frames, .. } => Some(free_frames),
        _ => None,
    });
    snapshot.vm_rss = proc_status_kib("VmRSS").unwrap_or(0) * 1024;
    snapshot.rss_anon = proc_status_kib("RssAnon").unwrap_or(0) * 1024;
    snapshot.rss_file = proc_status_kib("RssFile").unwrap_or(0) * 1024;
    snapshot.guest_resident = resident_bytes(ram.host_address(), ram.size());
    Ok(snapshot)
}

/// A `kB` field of `/proc/self/status`.
pub fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status_kib(&status, field)
}

/// A `kB` field of a `/proc/<pid>/status` text.
pub fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// Bytes of `[addr, addr + len)` resident in this process (`mincore`).
fn resident_bytes(addr: *mut u8, len: u64) -> u64 {
    let page = 4096u64;
    let mut vector = vec![0u8; len.div_ceil(page) as usize];
    // SAFETY: `addr..addr + len` is the guest RAM mapping, which stays mapped
    // for the call; `vector` has one byte per page of it.
    let result = unsafe { libc::mincore(addr.cast(), len as usize, vector.as_mut_ptr()) };
    if result != 0 {
        return 0;
    }
    vector.iter().filter(|&&b| b & 1 != 0).count() as u64 * page
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 0xffff_ffff_8010_0000;

    fn stubs() -> Vec<EntryStub> {
        vec![
            EntryStub { start: K, end: K + 9, vector: Some(3) },
            EntryStub { start: K + 9, end: K + 18, vector: Some(14) },
            EntryStub { start: K + 18, end: K + 27, vector: Some(32) },
        ]
    }

    fn regs(rax: u64, rdi: u64, rsi: u64) -> Option<GateRegs> {
        Some(GateRegs { rax, rdi, rsi, cr3: 0x1000 })
    }

    #[test]
    fn the_embedded_kernel_has_entry_stubs() {
        let stubs = entry_stubs(crate::images::KERNEL_ELF).unwrap();
        for vector in [3, 14, 32] {
            let stub = stubs.iter().find(|s| s.vector == Some(vector)).unwrap();
            assert!(stub.start >= KERNEL_HALF && stub.end > stub.start && stub.end - stub.start <= 16);
        }
        assert!(stubs.windows(2).all(|w| w[0].end <= w[1].start), "{stubs:x?}");
    }

    #[test]
    fn excursions_windows_and_timer_are_told_apart() {
        let stubs = stubs();
        let mut counter = Counter::default();
        let common = K + 100;
        // Boot: counted apart.
        counter.step(&stubs, common, None);
        counter.step(&stubs, common + 1, None);
        counter.first_user_instruction();
        // A getpid outside any window.
        assert!(counter.needs_regs(&stubs, K + 2));
        counter.step(&stubs, K + 2, regs(4, 0, 0));
        assert!(!counter.needs_regs(&stubs, K + 4), "same excursion");
        counter.step(&stubs, K + 4, None);
        counter.step(&stubs, common, None);
        counter.exit();
        // Begin marker for op 1, then two getpids, a timer tick, end marker.
        counter.step(&stubs, K + 2, regs(MARK_BEGIN, 1, 0));
        counter.step(&stubs, common, None);
        for _ in 0..2 {
            counter.step(&stubs, K + 2, regs(4, 0, 0));
            counter.step(&stubs, common, None);
            counter.step(&stubs, common + 3, None);
            counter.exit();
        }
        counter.step(&stubs, K + 20, None);
        counter.step(&stubs, common, None);
        counter.exit();
        // A page fault inside the window too.
        counter.step(&stubs, K + 11, None);
        counter.step(&stubs, common, None);
        counter.step(&stubs, K + 2, regs(MARK_END, 1, 2));
        counter.step(&stubs, common, None);
        // User steps (ordinary KVM) are not ring 0.
        counter.step(&stubs, 0x40_0000, None);
        let (counts, windows) = counter.finish();
        assert_eq!(counts.boot_instructions, 2);
        assert_eq!(counts.user_steps, 1);
        assert_eq!(counts.timer_excursions, 1);
        assert_eq!(counts.timer_instructions, 2);
        assert_eq!(counts.counted_instructions, 3 + 6 + 2);
        assert_eq!(counts.counted_exits, 3);
        assert_eq!(counts.excursions["syscall 4"], vec![3, 3, 3]);
        assert_eq!(counts.excursions["vector 14"], vec![2]);
        let window = windows[&1];
        assert_eq!(window, Window { instructions: 8, exits: 2, ops: 2, regions: 1 });
        assert_eq!(window.instructions_per_op(), Some(4.0));
        assert_eq!(window.exits_per_op(), Some(1.0));
    }

    #[test]
    fn a_window_can_be_limited_to_the_marking_address_space() {
        let stubs = stubs();
        let common = K + 100;
        let from = |cr3, rax, rdi, rsi| Some(GateRegs { rax, rdi, rsi, cr3 });
        let mut counter = Counter::default();
        counter.first_user_instruction();
        // Op 7 limited to CR3 0x1000 (rsi = 1), op 4 open to all.
        counter.step(&stubs, K + 2, from(0x1000, MARK_BEGIN, 7, 1));
        counter.step(&stubs, common, None);
        counter.step(&stubs, K + 2, from(0x1000, MARK_BEGIN, 4, 0));
        counter.step(&stubs, common, None);
        // A call of the marking process, then a fault of another one.
        counter.step(&stubs, K + 2, from(0x1000, 34, 0, 0));
        counter.step(&stubs, common, None);
        counter.step(&stubs, K + 11, from(0x2000, 0, 0, 0));
        counter.step(&stubs, common, None);
        counter.step(&stubs, common + 1, None);
        counter.exit();
        counter.step(&stubs, K + 2, from(0x1000, MARK_END, 7, 1));
        counter.step(&stubs, common, None);
        counter.step(&stubs, K + 2, from(0x1000, MARK_END, 4, 1));
        let (_, windows) = counter.finish();
        assert_eq!((windows[&7].instructions, windows[&7].exits), (2, 0));
        assert_eq!((windows[&4].instructions, windows[&4].exits), (5, 1));
    }

    #[test]
    fn status_fields_parse() {
        let status = "Name:\tx\nVmRSS:\t   12345 kB\nRssAnon:\t  100 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(12345));
        assert_eq!(parse_status_kib(status, "RssAnon"), Some(100));
        assert_eq!(parse_status_kib(status, "VmHWM"), None);
    }
}
