//! An instrumented run of a guest, for the figures a plain [`crate::run::run`]
//! cannot give: ring-0 instructions per operation (by single-stepping the
//! vCPU) and a look at the kernel's frame-owner table and the VMM's own
//! resident memory while processes are alive.
//!
//! It builds the guest like `run::run` does (guest RAM, VM, boot
//! preparation, a quiet [`Session`]) and hands every ordinary VM exit to
//! [`crate::run::handle_exit`], but drives `KVM_RUN` itself:
//!
//! - **Stepping.** With `KVM_SET_GUEST_DEBUG` (`ENABLE | SINGLESTEP`) a
//!   guest instruction ends in a `KVM_EXIT_DEBUG`; what is counted is the
//!   steps whose RIP lies in the kernel half. How ring 0 is stepped depends
//!   on the host ([`Method`]). On the PVM host setting it once is enough:
//!   the instruction emulator steps every ring-0 instruction, ring 3 runs
//!   natively and is not stepped. On ordinary KVM the step is the trap flag
//!   in the guest's RFLAGS, which `syscall` (`SFMASK`), interrupt and
//!   exception delivery and `trap_common`'s `popfq` clear, and which would
//!   step ring 3 too: the VMM writes `out 0x7e, al` ([`PATCH`]) over the
//!   first bytes of `syscall_entry` and `trap_common`, so every kernel
//!   entry stops in the VMM, puts the original bytes back while the vCPU
//!   steps over them, re-arms the trap flag after every ring-0 step and
//!   switches stepping off at the first step back in ring 3. The 2 or 3
//!   instructions of the vector stub that ran before `trap_common` are
//!   counted from its text ([`decode_stub`]), the vector read at `[rsp]`.
//!   A step whose RIP lies in one of the kernel's entry stubs
//!   (`trap_stub_<vector>`, `syscall_entry`, found in the kernel ELF's
//!   symbols), or a patched entry, starts a new *excursion* into the
//!   kernel; a system-call excursion is classified by `rax` read there.
//!   Timer (and spurious) interrupt excursions are counted apart: stepping
//!   makes ring-0 code slow, so ticks land far more often than in a plain
//!   run (on ordinary KVM they are not stepped past their stub; on both
//!   hosts the guest's timer is slowed 16-fold, see `slow_timer`). A `rep`-prefixed
//!   string instruction (the kernel's `memcpy`/`memset`) counts once,
//!   however many bytes it moves: PVM's emulator completes it in one step,
//!   and on ordinary KVM (where the trap flag stops after every iteration)
//!   it runs unstepped to a patch after it. Copy sizes show in time, not in
//!   the count.
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
use kvm_bindings::{kvm_guest_debug, KVM_GUESTDBG_BLOCKIRQ, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP};
use kvm_ioctls::VcpuExit;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use superos_protocol::boot::{EventNotifyPolicy, GatePreference, HostFlavor, ScrubStrategy};
use superos_protocol::event::Event;
use superos_protocol::hypercall::BootHelloParams;
use superos_protocol::introspect::{IntrospectionRoot, INTROSPECTION_MAGIC};
use superos_protocol::layout::{BOOT_INFO_GPA, KERNEL_VMA_BASE, PAGE_SIZE};
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
/// A yield to another process (one process switch).
pub const OP_YIELD: u64 = 8;
/// `cap_list`.
pub const OP_CAP_LIST: u64 = 9;

/// Where the kernel half of the address space begins.
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;
/// The kernel's timer and spurious interrupt vectors.
const TIMER_VECTOR: u64 = 0x20;
const SPURIOUS_VECTOR: u64 = 0xff;
/// The breakpoint vector: the system-call gate on the PVM host.
const INT3_VECTOR: u64 = 3;
/// What `syscall_entry` pushes as the vector.
const SYSCALL_VECTOR: u64 = superos_protocol::cpu::entry_vector::SYSCALL;

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
    /// Non-empty: after the full checks the snapshot hands the checker the
    /// write log (its first harvest turns KVM's dirty log on) and measures
    /// the incremental check ([`Incremental`]): `checks` idle, then `checks`
    /// after zeros are written into each of these numbers of free frames.
    pub dirtied: &'static [u64],
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Give up after this long.
    pub timeout: Duration,
}

/// Ring-0 work inside one operation's marked regions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Window {
    /// Ring-0 instructions (timer excursions and the markers excluded).
    pub instructions: u64,
    /// The stepped ones by address (what `bench --profile` attributes to
    /// kernel functions; a vector stub's instructions counted from its text
    /// are not among them).
    pub pcs: BTreeMap<u64, u64>,
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
    /// Kernel entries caught by a patch (ordinary KVM).
    pub patched_entries: u64,
    /// Patched entries whose unstepped stub instructions could not be
    /// counted (the vector on the stack unreadable or without a decoded
    /// stub): their counts are short by those few instructions.
    pub unaccounted_entries: u64,
    /// `KVM_SET_GUEST_DEBUG` calls while running (ordinary KVM re-arms the
    /// trap flag after every kernel step and switches stepping off in ring 3).
    pub debug_calls: u64,
    /// The time those calls took.
    pub debug_time: Duration,
    /// `rep` string instructions run unstepped to a patch after them
    /// (ordinary KVM), each counted once.
    pub rep_skips: u64,
    /// The whole stepped run (from the first `KVM_SET_GUEST_DEBUG`).
    pub stepped_time: Duration,
    /// Stepped ring-0 instructions by address: before the first user
    /// instruction, and after it outside timer and marker excursions (for
    /// `bench --profile`).
    pub boot_pcs: BTreeMap<u64, u64>,
    /// See `boot_pcs`.
    pub counted_pcs: BTreeMap<u64, u64>,
    /// `counted_pcs` by excursion kind, the keys of `excursions` (for a
    /// profile of one kind of kernel entry: `bench`'s exit row).
    pub excursion_pcs: BTreeMap<String, BTreeMap<u64, u64>>,
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
    /// The incremental checks after them (`ProbeOptions::dirtied`), or why
    /// there are none.
    pub incremental: Option<Result<Incremental, String>>,
}

/// Incremental checks at the snapshot: the checker keeps the free frames
/// it found zero and, at each check, re-reads only those written since
/// (KVM's dirty log and the VMM's own writes, [`crate::write_log`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Incremental {
    /// With nothing written since the previous check (the first check with
    /// the log, which reads every free frame, is left out).
    pub idle: Vec<CheckSample>,
    /// `(n, checks)`: each check after the VMM wrote a page of zeros into
    /// `n` free frames (their contents unchanged, their log bits set: what
    /// a guest that dirtied `n` pages since the last check costs it).
    pub dirtied: Vec<(u64, Vec<CheckSample>)>,
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
    /// Instructions a vector stub runs before `trap_common` (its pushes and
    /// its `jmp`), decoded from the kernel's text; `None` for
    /// `syscall_entry`, or if the bytes are not the expected stub.
    pub instructions: Option<u64>,
}

/// The kernel's entry points, from its ELF symbols.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelEntries {
    /// Every entry stub, sorted by address.
    pub stubs: Vec<EntryStub>,
    /// `trap_common`: where every vector stub and `syscall_entry` jump to.
    pub trap_common: u64,
    /// `syscall_entry` (`LSTAR`).
    pub syscall_entry: u64,
}

/// The kernel's entry stubs, sorted by address, from its ELF symbols.
pub fn entry_stubs(kernel: &[u8]) -> Result<Vec<EntryStub>, String> {
    kernel_entries(kernel).map(|entries| entries.stubs)
}

/// The kernel's entry stubs, `trap_common` and `syscall_entry`, from its ELF
/// symbols; each vector stub's instructions decoded from its text.
pub fn kernel_entries(kernel: &[u8]) -> Result<KernelEntries, String> {
    let file = ElfBytes::<AnyEndian>::minimal_parse(kernel).map_err(|e| format!("kernel ELF: {e}"))?;
    let (symbols, strings) = file
        .symbol_table()
        .map_err(|e| format!("kernel symbols: {e}"))?
        .ok_or("the kernel ELF has no symbol table")?;
    let mut stubs = Vec::new();
    let mut common = None;
    let mut syscall_entry = None;
    for symbol in symbols.iter() {
        let Ok(name) = strings.get(symbol.st_name as usize) else { continue };
        if let Some(vector) = name.strip_prefix("trap_stub_").and_then(|v| v.parse::<u64>().ok()) {
            stubs.push(EntryStub {
                start: symbol.st_value,
                end: 0,
                vector: Some(vector),
                instructions: None,
            });
        } else if name == "trap_common" {
            common = Some(symbol.st_value);
        } else if name == "syscall_entry" && symbol.st_size > 0 {
            syscall_entry = Some(symbol.st_value);
            stubs.push(EntryStub {
                start: symbol.st_value,
                end: symbol.st_value + symbol.st_size,
                vector: None,
                instructions: None,
            });
        }
    }
    stubs.sort_by_key(|s| s.start);
    let common = common.ok_or("the kernel has no trap_common symbol")?;
    let syscall_entry = syscall_entry.ok_or("the kernel has no syscall_entry symbol")?;
    // A vector stub ends where the next one (or trap_common) begins.
    let mut bounds: Vec<u64> = stubs.iter().filter(|s| s.vector.is_some()).map(|s| s.start).collect();
    bounds.push(common);
    bounds.sort_unstable();
    for stub in stubs.iter_mut().filter(|s| s.vector.is_some()) {
        let next = bounds.iter().copied().find(|&b| b > stub.start);
        stub.end = next.filter(|&n| n - stub.start <= 16).unwrap_or(stub.start + 16);
        stub.instructions = text_bytes(&file, stub.start, stub.end - stub.start)
            .and_then(|bytes| decode_stub(&bytes))
            .filter(|&(_, length)| length == stub.end - stub.start)
            .map(|(instructions, _)| instructions);
    }
    if !stubs.iter().any(|s| s.vector == Some(INT3_VECTOR)) {
        return Err("the kernel has no trap_stub_3".into());
    }
    Ok(KernelEntries { stubs, trap_common: common, syscall_entry })
}

/// The kernel's executable segments (virtual address and bytes), from its
/// ELF: what the vCPU is about to run, without reading guest memory.
#[derive(Clone, Debug, Default)]
pub struct KernelText {
    segments: Vec<(u64, Vec<u8>)>,
}

impl KernelText {
    /// The executable `PT_LOAD` segments of `kernel`.
    pub fn parse(kernel: &[u8]) -> Result<KernelText, String> {
        let file = ElfBytes::<AnyEndian>::minimal_parse(kernel).map_err(|e| format!("kernel ELF: {e}"))?;
        let segments = file.segments().ok_or("the kernel ELF has no program headers")?;
        let mut text = KernelText::default();
        for segment in segments.iter() {
            if segment.p_type == elf::abi::PT_LOAD && segment.p_flags & elf::abi::PF_X != 0 {
                let data = file.segment_data(&segment).map_err(|e| format!("kernel segment: {e}"))?;
                text.segments.push((segment.p_vaddr, data.to_vec()));
            }
        }
        Ok(text)
    }

    /// Up to 16 bytes of text at `address`.
    fn at(&self, address: u64) -> &[u8] {
        self.segments
            .iter()
            .find_map(|(start, bytes)| {
                let offset = usize::try_from(address.checked_sub(*start)?).ok()?;
                bytes.get(offset..).map(|rest| &rest[..rest.len().min(16)])
            })
            .unwrap_or(&[])
    }

    /// The length of the instruction at `address` if it is a `rep`-prefixed
    /// string instruction (`rep movs`/`stos`/`lods`/`ins`/`outs`,
    /// `repe`/`repne cmps`/`scas`).
    pub fn rep_string_length(&self, address: u64) -> Option<u64> {
        rep_string_length(self.at(address))
    }
}

/// The length of a `rep`-prefixed string instruction at the start of
/// `bytes`, or `None` if they start with anything else.
pub fn rep_string_length(bytes: &[u8]) -> Option<u64> {
    let mut at = 0;
    let mut rep = false;
    // Legacy prefixes (operand and address size, segment, rep), then REX.
    while let Some(&byte) = bytes.get(at) {
        match byte {
            0xf2 | 0xf3 => rep = true,
            0x66 | 0x67 | 0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 => {}
            _ => break,
        }
        at += 1;
        if at > 4 {
            return None;
        }
    }
    if matches!(bytes.get(at), Some(0x40..=0x4f)) {
        at += 1;
    }
    match bytes.get(at) {
        Some(0x6c..=0x6f | 0xa4..=0xa7 | 0xaa..=0xaf) if rep => Some(at as u64 + 1),
        _ => None,
    }
}

/// `len` bytes of the kernel's loaded image at virtual `address`.
fn text_bytes(file: &ElfBytes<'_, AnyEndian>, address: u64, len: u64) -> Option<Vec<u8>> {
    let headers = file.section_headers()?;
    let header = headers.iter().find(|h| {
        h.sh_type == elf::abi::SHT_PROGBITS
            && h.sh_addr <= address
            && address.checked_add(len).is_some_and(|end| end <= h.sh_addr + h.sh_size)
    })?;
    let (data, compression) = file.section_data(&header).ok()?;
    if compression.is_some() {
        return None;
    }
    let offset = usize::try_from(address - header.sh_addr).ok()?;
    data.get(offset..offset.checked_add(usize::try_from(len).ok()?)?).map(<[u8]>::to_vec)
}

/// Decodes an entry stub: `push imm` instructions and one `jmp`. Returns
/// (instructions, bytes), or `None` if the bytes are anything else.
pub fn decode_stub(bytes: &[u8]) -> Option<(u64, u64)> {
    let mut at = 0usize;
    let mut instructions = 0;
    while instructions < 4 {
        instructions += 1;
        match bytes.get(at)? {
            0x6a => at += 2,                                    // push imm8
            0x68 => at += 5,                                    // push imm32
            0xeb => return Some((instructions, at as u64 + 2)), // jmp rel8
            0xe9 => return Some((instructions, at as u64 + 5)), // jmp rel32
            _ => return None,
        }
    }
    None
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

/// A kernel entry caught by a patch (ordinary KVM, [`Method::Patches`]):
/// the vCPU stopped *before* the instruction the patch stands for, which
/// has not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// `syscall_entry`: a `syscall` from ring 3 (whose `SFMASK` cleared the
    /// trap flag); stepping goes on from here, so nothing ran unstepped.
    Syscall,
    /// `trap_common`, reached through an interrupt or exception (whose
    /// delivery cleared the trap flag) and a vector stub that ran
    /// unstepped; `vector` is what the stub pushed (`[rsp]`), `None` if it
    /// could not be read.
    Common {
        /// The vector on the stack.
        vector: Option<u64>,
    },
}

/// The kind of the excursion a run ends in (see `Stepper::finish`).
pub const SHUTDOWN_EXCURSION: &str = "kernel shutdown";

/// The stepping state machine: excursions, windows, counters. Fed with
/// every step, every patched entry and every other exit, it needs no KVM and
/// is unit-tested.
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
    /// The current excursion's stepped instructions by address.
    excursion_pcs: BTreeMap<u64, u64>,
    last_stub: Option<usize>,
    /// Where the latest step or patched entry left the vCPU (`None` after
    /// any other exit): an entry there is one the vCPU was stepped onto.
    position: Option<u64>,
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
        self.position = Some(pc);
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
        self.add(1);
        match self.current() {
            Kind::Boot => *self.counts.boot_pcs.entry(pc).or_default() += 1,
            Kind::Counted(_) => {
                *self.counts.counted_pcs.entry(pc).or_default() += 1;
                *self.excursion_pcs.entry(pc).or_default() += 1;
                for op in self.counting() {
                    *self.windows.entry(op).or_default().pcs.entry(pc).or_default() += 1;
                }
            }
            Kind::Timer | Kind::Marker => {}
        }
    }

    /// Whether an entry at `pc` is one the vCPU was single-stepped onto (its instructions so far were counted step by step: nothing
    /// to do but step on).
    pub fn stepped_onto(&self, pc: u64) -> bool {
        self.position == Some(pc)
    }

    /// One patched kernel entry `entry`, with the vCPU at `pc`
    /// (before the instruction there) and the registers it was entered
    /// with. A new excursion starts; for [`Entry::Common`] the vector stub's
    /// instructions, which ran unstepped, are counted to it.
    pub fn patched_entry(&mut self, stubs: &[EntryStub], pc: u64, entry: Entry, regs: GateRegs) {
        if self.stepped_onto(pc) {
            return;
        }
        self.counts.patched_entries += 1;
        self.position = Some(pc);
        self.finish_excursion();
        self.cr3 = regs.cr3;
        match entry {
            Entry::Syscall => {
                self.last_stub = stub_at(stubs, pc);
                self.kind = Some(self.classify(None, regs));
            }
            Entry::Common { vector } => {
                self.last_stub = None;
                let stub = vector.and_then(|v| stubs.iter().find(|s| s.vector == Some(v)));
                self.kind = Some(match vector {
                    Some(SYSCALL_VECTOR) => self.classify(None, regs),
                    Some(vector) => self.classify(Some(vector), regs),
                    None => Kind::Counted("vector unknown".into()),
                });
                match stub.and_then(|s| s.instructions) {
                    Some(instructions) => self.add(instructions),
                    None => self.counts.unaccounted_entries += 1,
                }
            }
        }
    }

    /// `instructions` more in the current excursion.
    fn add(&mut self, instructions: u64) {
        self.length += instructions;
        match self.current() {
            Kind::Boot => self.counts.boot_instructions += instructions,
            Kind::Timer => self.counts.timer_instructions += instructions,
            Kind::Marker => {}
            Kind::Counted(_) => {
                self.counts.counted_instructions += instructions;
                for op in self.counting() {
                    self.windows.entry(op).or_default().instructions += instructions;
                }
            }
        }
    }

    /// One VM exit to the VMM (not a step).
    pub fn exit(&mut self) {
        self.position = None;
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
                self.record_excursion_pcs(key.clone());
            }
        }
        self.length = 0;
        self.excursion_pcs.clear();
    }

    /// Adds the current excursion's addresses to those of its `kind`.
    fn record_excursion_pcs(&mut self, kind: String) {
        let pcs = self.counts.excursion_pcs.entry(kind).or_default();
        for (pc, count) in std::mem::take(&mut self.excursion_pcs) {
            *pcs.entry(pc).or_default() += count;
        }
    }

    /// The counters and windows. The excursion still open when the run
    /// ends is the one the kernel shut down in (the last process's exit,
    /// the final teardown and the shutdown itself): it is counted apart,
    /// as [`SHUTDOWN_EXCURSION`], not as the call that entered it.
    pub fn finish(mut self) -> (Counts, BTreeMap<u64, Window>) {
        if let (Some(Kind::Counted(_)), true) = (&self.kind, self.booted) {
            self.counts.excursions.entry(SHUTDOWN_EXCURSION.to_string()).or_default().push(self.length);
            self.record_excursion_pcs(SHUTDOWN_EXCURSION.to_string());
            self.length = 0;
        }
        (self.counts, self.windows)
    }
}

/// Runs `scenario` with the embedded kernel, instrumented as `options` say.
pub fn probe(scenario: &Scenario, options: &ProbeOptions) -> Result<Probe, String> {
    let kernel = crate::images::KERNEL_ELF;
    let entries = kernel_entries(kernel)?;
    let ram = GuestRam::new(options.memory_mib).map_err(|e| e.to_string())?;
    let mut vm = Vm::new(&ram, None, 1).map_err(|e| e.to_string())?;
    let host = detect_host_flavor();
    let boot_options = BootOptions {
        host,
        gate: GatePreference::Auto,
        scrub: ScrubStrategy::Auto,
        debug_flags: 0,
        tsc_khz: vm.tsc_khz(),
        // Single-stepping counts one CPU's instructions.
        cpus: 1,
        // What a plain run does; the snapshot is taken at an event, where
        // the tables are consistent, so it needs every event notified.
        event_notify: if options.snapshot {
            EventNotifyPolicy::EveryEvent
        } else {
            EventNotifyPolicy::Batched
        },
        trace: false,
    };
    let prepared = boot::prepare(&ram, kernel, scenario, boot_options).map_err(|e| e.to_string())?;
    vm.setup_registers(prepared.entry, prepared.boot_pml4, BOOT_INFO_GPA).map_err(|e| e.to_string())?;
    let names = scenario.processes.iter().map(|p| p.name.clone()).collect();
    let mut session = Session::new(&ram, Instant::now(), Echo::Quiet, names);
    let usable = prepared.usable_ranges();
    let mut checker = Checker::new(usable);
    // The checker gets the write log only after the full checks at the
    // snapshot (its first harvest turns KVM's log on).
    let mut write_log = (!options.dirtied.is_empty()).then(|| vm.write_log());

    let mut counter = Counter::default();
    let mut counts_stepping = None;
    let mut stepper = Stepper::new(Method::for_host(host), &ram, &entries, KernelText::parse(kernel)?)?;
    let mut stepping = false;
    if options.stepping == Stepping::FromBoot {
        let result = stepper.start(&vm, &ram);
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
                let result = stepper.start(&vm, &ram);
                stepping = result.is_ok();
                counts_stepping = Some(result);
            }
            // On both hosts: a stepped process switch takes some thousand
            // VM exits, and at the kernel's 10 ms a tick would land in
            // nearly every stepped switch on PVM too, its preemption adding
            // switches the window counts.
            if stepping {
                if let Err(error) = slow_timer(&vm) {
                    counts_stepping = Some(Err(error));
                    break GuestExit::VcpuError("the guest's timer could not be slowed for stepping".into());
                }
            }
        }
        let step = match vm.vcpu.run() {
            Ok(VcpuExit::Debug(arch)) => match stepper.step(&vm, &ram, &entries, &mut counter, arch.pc) {
                Ok(()) => Step::Continue,
                Err(error) => Step::Stop(GuestExit::VcpuError(error)),
            },
            Ok(VcpuExit::IoOut(port, _))
                if port == PATCH_PORT && stepping && stepper.method == Method::Patches =>
            {
                match stepper.patch_exit(&vm, &ram, &entries, &mut counter, port) {
                    Ok(true) => Step::Continue,
                    Ok(false) => {
                        Step::Stop(GuestExit::VcpuError(format!("an out to port {port:#x} that is no patch")))
                    }
                    Err(error) => Step::Stop(GuestExit::VcpuError(error)),
                }
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
                    taken.incremental = write_log
                        .take()
                        .map(|log| incremental_checks(&mut checker, &ram, log, root_gpa, options));
                    snapshot = Some(taken);
                }
                step
            }
            Err(error) if error.errno() == libc::EINTR || error.errno() == libc::EAGAIN => Step::Continue,
            Err(error) => Step::Stop(GuestExit::VcpuError(error.to_string())),
        };
        if let Step::Stop(exit) = step {
            break exit;
        }
        // After every exit, not only at EINTR: when stepping, the vCPU
        // thread is nearly always in the VMM when the kick lands, and the
        // signal then interrupts nothing.
        if watchdog.fired() {
            break GuestExit::Timeout(options.timeout);
        }
    };
    watchdog.stop();
    session.finish_console();
    let (mut counts, windows) = counter.finish();
    counts.stepping = counts_stepping;
    counts.debug_calls = stepper.calls;
    counts.rep_skips = stepper.rep_skips;
    counts.debug_time = stepper.time;
    counts.stepped_time = stepper.started.map_or(Duration::ZERO, |t| t.elapsed());
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

/// How the vCPU is stepped through ring 0 on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// PVM: `ENABLE | SINGLESTEP` once. The host's instruction emulator
    /// steps every ring-0 instruction and the trap flag survives every
    /// kernel entry; ring 3 is not stepped.
    SingleStep,
    /// Ordinary KVM: single-stepping is the hardware trap flag in the
    /// guest's RFLAGS, which `syscall` clears (`SFMASK`), interrupt and
    /// exception delivery clear, and `trap_common`'s `popfq` clears. The
    /// VMM writes `out 0x7e, al` ([`PATCH`]) over the first bytes of
    /// `syscall_entry` and of `trap_common`, so every kernel entry stops in
    /// the VMM ([`patch_at`]); the original bytes are back while the vCPU
    /// steps over them ([`arm_after`]). Every step in ring 0 re-arms the
    /// trap flag (`KVM_SET_GUEST_DEBUG` again sets it at the current RIP),
    /// and the first step back in ring 3 switches stepping off, so ring 3
    /// runs unstepped as on PVM.
    ///
    /// Why not breakpoints: an SVM guest's DR7 breakpoints
    /// (`KVM_GUESTDBG_USE_HW_BP`) never fire under QEMU's TCG before 9.1,
    /// which loads DR7 at `VMRUN` without arming them, and QEMU's TCG
    /// checks a guest's `int3` against the SVM intercept for `int n`, not
    /// the `#BP` intercept `KVM_GUESTDBG_USE_SW_BP` sets, so the guest
    /// takes its own `#BP`: on the nested host of `tests/nested/run` both
    /// caught nothing. A port write exits to the VMM on every x86 KVM.
    Patches,
}

impl Method {
    /// The method `host` needs.
    pub fn for_host(host: HostFlavor) -> Method {
        match host {
            HostFlavor::Pvm => Method::SingleStep,
            HostFlavor::Kvm => Method::Patches,
        }
    }
}

/// The port of the VMM's patches. KVM leaves RIP past an `out` to port
/// 0x7e when it exits (`KVM_X86_QUIRK_OUT_7E_INC_RIP`, on unless the VMM
/// turns it off; this one does not), so the VMM can put RIP back onto the
/// patched instruction without KVM skipping anything on the next run.
pub const PATCH_PORT: u16 = 0x7e;
/// `out 0x7e, al`.
pub const PATCH: [u8; 2] = [0xe6, PATCH_PORT as u8];

/// A patched kernel entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    /// `syscall_entry`.
    SyscallEntry,
    /// `trap_common`.
    TrapCommon,
}

impl KernelEntries {
    /// The patched entries.
    pub fn patch_sites(&self) -> [(At, u64); 2] {
        [(At::SyscallEntry, self.syscall_entry), (At::TrapCommon, self.trap_common)]
    }
}

/// Which patch an `out` to `port` that left RIP at `rip` is, if it is one
/// of the VMM's: [`PATCH_PORT`], and RIP just past a patch site.
pub fn patch_at(entries: &KernelEntries, port: u16, rip: u64) -> Option<(At, u64)> {
    let site = rip.wrapping_sub(PATCH.len() as u64);
    (port == PATCH_PORT).then_some(())?;
    entries.patch_sites().into_iter().find(|&(_, address)| address == site)
}

/// Under [`Method::Patches`], how to resume with the vCPU at `pc`:
/// (single-step, patches written). Step in ring 0 (re-arming the trap flag
/// whatever the last instruction did to it), not in ring 3. While the
/// vCPU stands inside a patched range the original bytes are back, so
/// the instructions there run; everywhere else the patches stay written.
pub fn arm_after(entries: &KernelEntries, pc: u64) -> (bool, bool) {
    let inside =
        entries.patch_sites().iter().any(|&(_, address)| pc.wrapping_sub(address) < PATCH.len() as u64);
    (pc >= KERNEL_HALF, !inside)
}

/// The `KVM_SET_GUEST_DEBUG` argument: `ENABLE`, with `SINGLESTEP` if
/// `step`; under [`Method::Patches`] stepping also sets `BLOCKIRQ`. The
/// kernel runs with interrupts off, so this changes nothing the guest can
/// see, but it keeps KVM from arming an interrupt window under the trap
/// flag: with one armed, the nested host of `tests/nested/run` now and
/// then delivered a timer interrupt twice, the second one on top of the
/// first one's entry stub.
pub fn guest_debug(method: Method, step: bool) -> kvm_guest_debug {
    let control = match (method, step) {
        (_, false) => KVM_GUESTDBG_ENABLE,
        (Method::SingleStep, true) => KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP,
        (Method::Patches, true) => KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_BLOCKIRQ,
    };
    kvm_guest_debug { control, pad: 0, arch: Default::default() }
}

/// The VMM's patches in the kernel's text (guest-physical address and
/// the bytes they replace), and whether they are written.
struct Patches {
    sites: Vec<(u64, [u8; PATCH.len()])>,
    written: bool,
}

impl Patches {
    /// The patch sites of `entries`, their bytes read from `ram` (the
    /// kernel is loaded at virtual = physical + `KERNEL_VMA_BASE`).
    fn new(ram: &GuestRam, entries: &KernelEntries) -> Result<Patches, String> {
        let mut sites = Vec::new();
        for (_, address) in entries.patch_sites() {
            let gpa = address.wrapping_sub(KERNEL_VMA_BASE);
            let mut bytes = [0u8; PATCH.len()];
            ram.read_bytes(gpa, &mut bytes).map_err(|e| format!("patch site {address:#x}: {e}"))?;
            sites.push((gpa, bytes));
        }
        Ok(Patches { sites, written: false })
    }

    /// Writes the patches, or puts the original bytes back.
    fn set(&mut self, ram: &GuestRam, written: bool) -> Result<(), String> {
        if written != self.written {
            for (gpa, original) in &self.sites {
                let bytes = if written { &PATCH } else { original };
                ram.write_bytes(*gpa, bytes).map_err(|e| format!("patch at {gpa:#x}: {e}"))?;
            }
            self.written = written;
        }
        Ok(())
    }
}

/// Drives stepping on this host: starts it, and handles each debug exit
/// and each patch exit.
struct Stepper {
    method: Method,
    patches: Patches,
    text: KernelText,
    /// A `rep` string instruction being stepped over: the address after
    /// it, where a patch stands, its guest-physical address and the bytes
    /// the patch replaced.
    over: Option<(u64, u64, [u8; PATCH.len()])>,
    /// `rep` string instructions stepped over.
    rep_skips: u64,
    /// The current excursion is a timer interrupt's: once past the patched
    /// instructions it runs unstepped.
    unstepped: bool,
    /// `KVM_SET_GUEST_DEBUG` calls after the first, and their time.
    calls: u64,
    time: Duration,
    /// When stepping began.
    started: Option<Instant>,
}

impl Stepper {
    fn new(
        method: Method,
        ram: &GuestRam,
        entries: &KernelEntries,
        text: KernelText,
    ) -> Result<Stepper, String> {
        let patches = Patches::new(ram, entries)?;
        Ok(Stepper {
            method,
            patches,
            text,
            over: None,
            rep_skips: 0,
            unstepped: false,
            calls: 0,
            time: Duration::ZERO,
            started: None,
        })
    }

    /// Starts stepping where the vCPU is (in the kernel, outside the
    /// patched ranges).
    fn start(&mut self, vm: &Vm, ram: &GuestRam) -> Result<(), String> {
        vm.vcpu.set_guest_debug(&guest_debug(self.method, true)).map_err(|e| e.to_string())?;
        if self.method == Method::Patches {
            self.patches.set(ram, true)?;
        }
        self.started = Some(Instant::now());
        Ok(())
    }

    /// One single step (`KVM_EXIT_DEBUG`) with the vCPU at `pc`: counts
    /// it, and under [`Method::Patches`] sets up how the vCPU goes on.
    fn step(
        &mut self,
        vm: &Vm,
        ram: &GuestRam,
        entries: &KernelEntries,
        counter: &mut Counter,
        pc: u64,
    ) -> Result<(), String> {
        let stubs = &entries.stubs;
        let regs = if counter.needs_regs(stubs, pc) {
            let cr3 = vm.vcpu.get_sregs().map_or(0, |s| s.cr3);
            vm.vcpu.get_regs().ok().map(|r| GateRegs { rax: r.rax, rdi: r.rdi, rsi: r.rsi, cr3 })
        } else {
            None
        };
        counter.step(stubs, pc, regs);
        match self.method {
            Method::SingleStep => Ok(()),
            Method::Patches => {
                if self.step_over_rep(vm, ram, entries, pc)? {
                    return Ok(());
                }
                self.resume_at(vm, ram, entries, pc)
            }
        }
    }

    /// If the vCPU is at a `rep` string instruction in ring 0, runs it
    /// unstepped to a patch written just after it (the trap flag would stop
    /// after every iteration: thousands of exits to zero one page, where
    /// PVM's emulator completes it in one step). `Ok(true)` if it does.
    fn step_over_rep(
        &mut self,
        vm: &Vm,
        ram: &GuestRam,
        entries: &KernelEntries,
        pc: u64,
    ) -> Result<bool, String> {
        if pc < KERNEL_HALF || self.over.is_some() {
            return Ok(false);
        }
        let Some(length) = self.text.rep_string_length(pc) else { return Ok(false) };
        let next = pc.wrapping_add(length);
        // Not where an entry patch stands, or the vCPU does.
        if !arm_after(entries, pc).1
            || (0..PATCH.len() as u64).any(|i| !arm_after(entries, next.wrapping_add(i)).1)
        {
            return Ok(false);
        }
        let gpa = next.wrapping_sub(KERNEL_VMA_BASE);
        let mut original = [0u8; PATCH.len()];
        if ram.read_bytes(gpa, &mut original).is_err() || ram.write_bytes(gpa, &PATCH).is_err() {
            return Ok(false);
        }
        self.over = Some((next, gpa, original));
        self.patches.set(ram, true)?;
        self.set_debug(vm, false)?;
        Ok(true)
    }

    /// An `out` to `port` under [`Method::Patches`]: if it is one of the
    /// VMM's patches (a kernel entry, or the end of a `rep` instruction
    /// run unstepped), counts it, puts RIP back onto the patched
    /// instruction, sets up stepping from there and returns `Ok(true)`;
    /// `Ok(false)` if it is not one (the kernel never writes that port).
    fn patch_exit(
        &mut self,
        vm: &Vm,
        ram: &GuestRam,
        entries: &KernelEntries,
        counter: &mut Counter,
        port: u16,
    ) -> Result<bool, String> {
        if self.method != Method::Patches || port != PATCH_PORT || !self.patches.written {
            return Ok(false);
        }
        let mut regs = vm.vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
        if let Some((next, gpa, original)) = self.over {
            if regs.rip.wrapping_sub(PATCH.len() as u64) == next {
                // The rep instruction is done: one instruction, as on PVM.
                ram.write_bytes(gpa, &original).map_err(|e| format!("patch at {gpa:#x}: {e}"))?;
                self.over = None;
                self.rep_skips += 1;
                regs.rip = next;
                vm.vcpu.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))?;
                counter.step(&entries.stubs, next, None);
                self.resume_at(vm, ram, entries, next)?;
                return Ok(true);
            }
        }
        let Some((at, address)) = patch_at(entries, port, regs.rip) else { return Ok(false) };
        let cr3 = vm.vcpu.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?.cr3;
        let entry = match at {
            At::SyscallEntry => Entry::Syscall,
            At::TrapCommon => Entry::Common { vector: stack_word(ram, cr3, regs.rsp) },
        };
        self.unstepped = matches!(entry, Entry::Common { vector: Some(TIMER_VECTOR | SPURIOUS_VECTOR) });
        counter.patched_entry(
            &entries.stubs,
            address,
            entry,
            GateRegs { rax: regs.rax, rdi: regs.rdi, rsi: regs.rsi, cr3 },
        );
        regs.rip = address;
        vm.vcpu.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        self.resume_at(vm, ram, entries, address)?;
        Ok(true)
    }

    /// Patches and stepping for the vCPU at `pc` ([`arm_after`]).
    fn resume_at(&mut self, vm: &Vm, ram: &GuestRam, entries: &KernelEntries, pc: u64) -> Result<(), String> {
        let (mut step, written) = arm_after(entries, pc);
        if self.unstepped && written {
            // A timer excursion, past the patch: unstepped from here.
            step = false;
            self.unstepped = false;
        }
        self.patches.set(ram, written)?;
        self.set_debug(vm, step)
    }

    /// `KVM_SET_GUEST_DEBUG`, counted and timed.
    fn set_debug(&mut self, vm: &Vm, step: bool) -> Result<(), String> {
        let start = Instant::now();
        let result = vm.vcpu.set_guest_debug(&guest_debug(self.method, step));
        self.calls += 1;
        self.time += start.elapsed();
        result.map_err(|e| format!("KVM_SET_GUEST_DEBUG: {e}"))
    }
}

/// The local APIC's timer divide configuration register.
const APIC_TIMER_DIVIDE: usize = 0x3e0;
/// Its value for "divide by 16".
const DIVIDE_BY_16: u8 = 0x3;

/// Slows the guest's periodic timer 16-fold (the kernel's 10 ms slice
/// becomes 160 ms; it programs the divider once, at boot, to 1): stepped,
/// a process switch takes longer than 10 ms on a nested ordinary KVM
/// (0.1-0.2 ms a step, some 300 steps), so every slice would end in a tick
/// before the process it switched to ran an instruction, and the guest
/// would do nothing but switch; on PVM (some 5 µs a step) a tick landed in
/// about every other stepped switch, and the switches its preemptions
/// added made a yield count 970 to 1,740 from run to run. Timer interrupts
/// are left out of the counts either way.
fn slow_timer(vm: &Vm) -> Result<(), String> {
    let mut lapic = vm.vcpu.get_lapic().map_err(|e| format!("KVM_GET_LAPIC: {e}"))?;
    lapic.regs[APIC_TIMER_DIVIDE] = DIVIDE_BY_16 as _;
    vm.vcpu.set_lapic(&lapic).map_err(|e| format!("KVM_SET_LAPIC: {e}"))
}

/// The 8 bytes at `rsp` (the vector a stub pushed), read through `cr3`.
fn stack_word(ram: &GuestRam, cr3: u64, rsp: u64) -> Option<u64> {
    if rsp % 4096 > 4096 - 8 {
        return None;
    }
    let leaf = crate::arch::paging::translate(cr3, rsp, |gpa| ram.read_u64(gpa).ok())?;
    ram.read_u64(leaf.phys).ok()
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

/// The incremental checks of [`Incremental`], with `log` handed to the
/// checker now (its first check reads every free frame).
fn incremental_checks(
    checker: &mut Checker,
    ram: &GuestRam,
    log: crate::write_log::KvmWriteLog,
    root_gpa: Option<u64>,
    options: &ProbeOptions,
) -> Result<Incremental, String> {
    checker.log_writes(Box::new(log), ram.size() / PAGE_SIZE);
    let first = timed_check(checker, ram);
    if let Some(failure) = checker.write_log_failure() {
        return Err(format!("the write log failed: {failure}"));
    }
    if first.frames_scanned == 0 {
        return Err("the first check with the log read no free frame".into());
    }
    let view = crate::introspect::KernelView::read(ram, root_gpa.unwrap_or(0)).map_err(|e| e.to_string())?;
    let free: Vec<u64> = view
        .managed_frames()
        .filter(|&(_, owner)| owner == FrameOwner::Free.encode())
        .map(|(gpa, _)| gpa)
        .collect();
    let zeros = vec![0u8; PAGE_SIZE as usize];
    let mut found = Incremental {
        idle: (0..options.checks).map(|_| timed_check(checker, ram)).collect(),
        dirtied: Vec::new(),
    };
    for &count in options.dirtied {
        let Some(frames) = free.get(..count as usize) else {
            break;
        };
        let samples = (0..options.checks)
            .map(|_| {
                for &gpa in frames {
                    // Zeros into a free frame: nothing changes but its log bit.
                    let _ = ram.write_bytes(gpa, &zeros);
                }
                timed_check(checker, ram)
            })
            .collect();
        found.dirtied.push((count, samples));
    }
    Ok(found)
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
            EntryStub { start: K, end: K + 9, vector: Some(3), instructions: Some(3) },
            EntryStub { start: K + 9, end: K + 18, vector: Some(14), instructions: Some(2) },
            EntryStub { start: K + 18, end: K + 27, vector: Some(32), instructions: Some(3) },
            EntryStub { start: K + 200, end: K + 240, vector: None, instructions: None },
        ]
    }

    /// The fixture's entries: `trap_common` at K + 100, `syscall_entry` at K + 200.
    fn entries() -> KernelEntries {
        KernelEntries { stubs: stubs(), trap_common: K + 100, syscall_entry: K + 200 }
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
    fn every_vector_stub_of_the_embedded_kernel_decodes_to_its_pushes_and_a_jmp() {
        let entries = kernel_entries(crate::images::KERNEL_ELF).unwrap();
        // entry.rs: TRAP_WITH_ERROR_CODE stubs push the vector and jump (the
        // CPU pushed an error code); the others push 0 first.
        let with_error_code = [8, 10, 11, 12, 13, 14, 17, 21, 29, 30];
        let vectors: Vec<u64> = entries.stubs.iter().filter_map(|s| s.vector).collect();
        // 32 exception vectors but 15 and 31 (reserved), the timer, the
        // flush and wake-up IPIs, spurious.
        assert_eq!(vectors.len(), 36, "{vectors:?}");
        for stub in entries.stubs.iter().filter(|s| s.vector.is_some()) {
            let vector = stub.vector.unwrap();
            let expected = if with_error_code.contains(&vector) { 2 } else { 3 };
            assert_eq!(stub.instructions, Some(expected), "trap_stub_{vector}: {stub:x?}");
        }
        let syscall = entries.stubs.iter().find(|s| s.vector.is_none()).unwrap();
        assert_eq!((syscall.start, syscall.instructions), (entries.syscall_entry, None));
        assert!(entries.trap_common > KERNEL_HALF && entries.trap_common != entries.syscall_entry);
        // trap_common follows the last stub.
        assert!(entries.stubs.iter().any(|s| s.end == entries.trap_common), "{entries:x?}");
    }

    #[test]
    fn stubs_decode_as_pushes_and_one_jmp_and_nothing_else() {
        // push 0; push 3; jmp rel32
        assert_eq!(decode_stub(&[0x6a, 0, 0x6a, 3, 0xe9, 1, 2, 3, 4]), Some((3, 9)));
        // push 14; jmp rel8
        assert_eq!(decode_stub(&[0x6a, 14, 0xeb, 0x10]), Some((2, 4)));
        // push 0; push 255 (imm32); jmp rel32
        assert_eq!(decode_stub(&[0x6a, 0, 0x68, 0xff, 0, 0, 0, 0xe9, 0, 0, 0, 0]), Some((3, 12)));
        // Anything else, a truncated stub, or pushes without end.
        assert_eq!(decode_stub(&[0x50, 0xe9, 0, 0, 0, 0]), None);
        assert_eq!(decode_stub(&[0x6a, 0]), None);
        assert_eq!(decode_stub(&[0x6a, 0, 0x6a, 0, 0x6a, 0, 0x6a, 0, 0xeb, 0]), None);
        assert_eq!(decode_stub(&[]), None);
    }

    #[test]
    fn rep_string_instructions_are_recognised_with_their_length() {
        assert_eq!(rep_string_length(&[0xf3, 0x48, 0xab]), Some(3), "rep stosq");
        assert_eq!(rep_string_length(&[0xf3, 0xa4, 0xc3]), Some(2), "rep movsb");
        assert_eq!(rep_string_length(&[0xf3, 0x48, 0xa5]), Some(3), "rep movsq");
        assert_eq!(rep_string_length(&[0xf3, 0xaa]), Some(2), "rep stosb");
        assert_eq!(rep_string_length(&[0xf2, 0xae]), Some(2), "repne scasb");
        assert_eq!(rep_string_length(&[0x66, 0xf3, 0xab]), Some(3), "rep stosw");
        assert_eq!(rep_string_length(&[0xf3, 0x6e]), Some(2), "rep outsb");
        // Not rep string instructions: a plain movsb, pause (f3 90), a
        // rep-prefixed ret, a rep-less stos, truncated bytes.
        assert_eq!(rep_string_length(&[0xa4]), None);
        assert_eq!(rep_string_length(&[0xf3, 0x90]), None);
        assert_eq!(rep_string_length(&[0xf3, 0xc3]), None);
        assert_eq!(rep_string_length(&[0x48, 0xab]), None);
        assert_eq!(rep_string_length(&[0xf3]), None);
        assert_eq!(rep_string_length(&[0xf3, 0x48]), None);
        assert_eq!(rep_string_length(&[0xf3, 0xf3, 0xf3, 0xf3, 0xf3, 0xf3, 0xab]), None);
        assert_eq!(rep_string_length(&[]), None);
    }

    #[test]
    fn the_embedded_kernel_text_has_its_rep_string_copies_and_stubs() {
        let text = KernelText::parse(crate::images::KERNEL_ELF).unwrap();
        let entries = kernel_entries(crate::images::KERNEL_ELF).unwrap();
        // The text the VMM patches is the kernel's: push rax at trap_common.
        assert_eq!(text.at(entries.trap_common).first(), Some(&0x50));
        assert_eq!(text.at(0x1000), &[] as &[u8], "outside the kernel");
        // memcpy/memset use rep movs/stos: some exist, none at a stub.
        let (start, bytes) = &text.segments[0];
        let reps = (0..bytes.len() as u64).filter(|i| text.rep_string_length(start + i).is_some()).count();
        assert!(reps > 0, "no rep string instruction in the kernel text");
        assert!(entries.stubs.iter().all(|s| text.rep_string_length(s.start).is_none()));
    }

    #[test]
    fn only_an_out_to_the_patch_port_just_past_a_patch_site_is_a_kernel_entry() {
        let entries = entries();
        let (common, syscall) = (entries.trap_common, entries.syscall_entry);
        assert_eq!(patch_at(&entries, PATCH_PORT, syscall + 2), Some((At::SyscallEntry, syscall)));
        assert_eq!(patch_at(&entries, PATCH_PORT, common + 2), Some((At::TrapCommon, common)));
        // RIP on the site (KVM did not move past the out), elsewhere, or
        // another port: not a patch.
        assert_eq!(patch_at(&entries, PATCH_PORT, common), None);
        assert_eq!(patch_at(&entries, PATCH_PORT, common + 3), None);
        assert_eq!(patch_at(&entries, PATCH_PORT, 1), None);
        assert_eq!(patch_at(&entries, 0x500, common + 2), None);
        assert_eq!(PATCH, [0xe6, 0x7e], "out 0x7e, al");
    }

    #[test]
    fn stepping_is_armed_in_ring_0_only_and_the_patches_are_off_where_the_vcpu_stands() {
        let entries = entries();
        let (common, syscall) = (entries.trap_common, entries.syscall_entry);
        assert_eq!(arm_after(&entries, K + 5), (true, true));
        assert_eq!(arm_after(&entries, common), (true, false));
        assert_eq!(arm_after(&entries, common + 1), (true, false), "the second byte of the patch");
        assert_eq!(arm_after(&entries, common + 2), (true, true));
        assert_eq!(arm_after(&entries, syscall), (true, false));
        assert_eq!(arm_after(&entries, syscall + 1), (true, false));
        assert_eq!(arm_after(&entries, common - 1), (true, true));
        assert_eq!(arm_after(&entries, 0x40_1000), (false, true));
        assert_eq!(
            guest_debug(Method::Patches, true).control,
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_BLOCKIRQ
        );
        assert_eq!(guest_debug(Method::Patches, false).control, KVM_GUESTDBG_ENABLE);
        // PVM: exactly what it always was.
        assert_eq!(
            guest_debug(Method::SingleStep, true).control,
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP
        );
        assert_eq!(Method::for_host(HostFlavor::Pvm), Method::SingleStep);
        assert_eq!(Method::for_host(HostFlavor::Kvm), Method::Patches);
    }

    #[test]
    fn the_patches_replace_two_bytes_each_and_are_put_back() {
        let ram = GuestRam::new(16).unwrap();
        let entries = KernelEntries {
            stubs: stubs(),
            trap_common: KERNEL_VMA_BASE + 0x10_0100,
            syscall_entry: KERNEL_VMA_BASE + 0x10_0200,
        };
        ram.write_bytes(0x10_00ff, &[0x11, 0x50, 0x53, 0x51]).unwrap();
        ram.write_bytes(0x10_0200, &[0x48, 0x89, 0x25]).unwrap();
        let mut patches = Patches::new(&ram, &entries).unwrap();
        let bytes = |gpa, len| {
            let mut buffer = vec![0; len];
            ram.read_bytes(gpa, &mut buffer).unwrap();
            buffer
        };
        patches.set(&ram, true).unwrap();
        assert_eq!(bytes(0x10_00ff, 4), [0x11, 0xe6, 0x7e, 0x51]);
        assert_eq!(bytes(0x10_0200, 3), [0xe6, 0x7e, 0x25]);
        patches.set(&ram, true).unwrap();
        assert_eq!(bytes(0x10_0100, 2), [0xe6, 0x7e], "written once, the original kept");
        patches.set(&ram, false).unwrap();
        assert_eq!(
            (bytes(0x10_00ff, 4), bytes(0x10_0200, 3)),
            (vec![0x11, 0x50, 0x53, 0x51], vec![0x48, 0x89, 0x25])
        );
        // A site outside guest RAM is an error, not a panic.
        let outside = KernelEntries { trap_common: KERNEL_VMA_BASE + (16 << 20) - 1, ..entries };
        assert!(Patches::new(&ram, &outside).is_err());
    }

    /// A kernel path shared by both hosts' traces: `n` steps from
    /// trap_common on, the last one onto `trap_iretq`.
    fn common_path(counter: &mut Counter, stubs: &[EntryStub], n: u64) {
        for i in 1..=n {
            counter.step(stubs, K + 100 + i, None);
        }
    }

    #[test]
    fn patched_entries_on_ordinary_kvm_count_what_single_steps_count_on_pvm() {
        let stubs = stubs();
        let user = 0x40_1000;
        let gate = |rax, rdi, rsi| GateRegs { rax, rdi, rsi, cr3: 0x1000 };
        // PVM: an int3 getpid is stepped from the stub's first instruction.
        let mut pvm = Counter::default();
        pvm.first_user_instruction();
        pvm.step(&stubs, K + 2, Some(gate(4, 0, 0)));
        pvm.step(&stubs, K + 4, None);
        pvm.step(&stubs, K + 100, None);
        common_path(&mut pvm, &stubs, 10);
        // The next entry (the last process's exit, say) ends it; the run
        // ends inside that one.
        pvm.step(&stubs, K + 2, Some(gate(2, 0, 0)));
        let (pvm, _) = pvm.finish();
        assert_eq!(pvm.excursions["syscall 4"], vec![13]);
        assert_eq!(pvm.excursions[SHUTDOWN_EXCURSION], vec![1]);

        // Ordinary KVM, the same int3 getpid: the stub ran unstepped, the
        // patch at trap_common finds vector 3 on the stack and counts
        // its 3 instructions; the iretq's step lands in ring 3.
        let mut kvm = Counter::default();
        kvm.first_user_instruction();
        kvm.patched_entry(&stubs, K + 100, Entry::Common { vector: Some(3) }, gate(4, 0, 0));
        common_path(&mut kvm, &stubs, 10);
        kvm.step(&stubs, user, None);
        // A syscall getpid: stepped from syscall_entry (the patch itself
        // counts nothing), 4 instructions there, then onto trap_common: an
        // entry there is the one stepped onto (no patch stands there then).
        kvm.patched_entry(&stubs, K + 200, Entry::Syscall, gate(4, 0, 0));
        for pc in [K + 207, K + 214, K + 220] {
            kvm.step(&stubs, pc, None);
        }
        kvm.step(&stubs, K + 100, None);
        assert!(kvm.stepped_onto(K + 100));
        kvm.patched_entry(&stubs, K + 100, Entry::Common { vector: Some(SYSCALL_VECTOR) }, gate(4, 0, 0));
        common_path(&mut kvm, &stubs, 10);
        kvm.step(&stubs, user, None);
        // A page fault (error-code stub: 2 instructions) and a timer tick.
        kvm.patched_entry(&stubs, K + 100, Entry::Common { vector: Some(14) }, gate(0, 0, 0));
        common_path(&mut kvm, &stubs, 5);
        kvm.step(&stubs, user, None);
        kvm.patched_entry(&stubs, K + 100, Entry::Common { vector: Some(32) }, gate(0, 0, 0));
        common_path(&mut kvm, &stubs, 7);
        kvm.step(&stubs, user, None);
        // An entry whose vector could not be read, and one without a stub.
        kvm.patched_entry(&stubs, K + 100, Entry::Common { vector: None }, gate(0, 0, 0));
        common_path(&mut kvm, &stubs, 1);
        kvm.patched_entry(&stubs, K + 100, Entry::Common { vector: Some(0x101) }, gate(0, 0, 0));
        common_path(&mut kvm, &stubs, 1);
        let (kvm, _) = kvm.finish();
        assert_eq!(kvm.excursions["syscall 4"], vec![13, 4 + 10]);
        assert_eq!(kvm.excursions["vector 14"], vec![2 + 5]);
        assert_eq!(kvm.excursions["vector unknown"], vec![1]);
        // The run ended inside the last one: the kernel's shutdown.
        assert!(!kvm.excursions.contains_key("vector 257"));
        assert_eq!(kvm.excursions[SHUTDOWN_EXCURSION], vec![1]);
        assert_eq!((kvm.timer_excursions, kvm.timer_instructions), (1, 3 + 7));
        assert_eq!(kvm.patched_entries, 6, "the stepped-onto entry is not one");
        assert_eq!(kvm.unaccounted_entries, 2);
        assert_eq!(kvm.user_steps, 4);
        assert_eq!(kvm.counted_instructions, 13 + 14 + 7 + 1 + 1);
    }

    #[test]
    fn patched_entries_open_and_close_windows_and_keep_boot_apart() {
        let stubs = stubs();
        let user = 0x40_1000;
        let gate = |rax, rdi, rsi, cr3| GateRegs { rax, rdi, rsi, cr3 };
        let mut counter = Counter::default();
        // Boot: stepped from the first instruction, one exception on the way.
        counter.step(&stubs, K + 50, None);
        counter.patched_entry(&stubs, K + 100, Entry::Common { vector: Some(14) }, gate(0, 0, 0, 0));
        common_path(&mut counter, &stubs, 3);
        counter.exit();
        counter.step(&stubs, user, None);
        counter.first_user_instruction();
        // Op 1 limited to CR3 0x1000, through syscall entries.
        let syscall = |counter: &mut Counter, regs: GateRegs, path: u64| {
            counter.patched_entry(&stubs, K + 200, Entry::Syscall, regs);
            counter.step(&stubs, K + 207, None);
            counter.step(&stubs, K + 100, None);
            common_path(counter, &stubs, path);
            counter.step(&stubs, user, None);
        };
        syscall(&mut counter, gate(MARK_BEGIN, 1, 1, 0x1000), 4);
        syscall(&mut counter, gate(4, 0, 0, 0x1000), 6);
        counter.exit();
        // Another address space's fault and a tick: not in op 1's window.
        counter.patched_entry(&stubs, K + 100, Entry::Common { vector: Some(14) }, gate(0, 0, 0, 0x2000));
        common_path(&mut counter, &stubs, 5);
        counter.step(&stubs, user, None);
        counter.patched_entry(&stubs, K + 100, Entry::Common { vector: Some(32) }, gate(0, 0, 0, 0x1000));
        common_path(&mut counter, &stubs, 5);
        counter.step(&stubs, user, None);
        syscall(&mut counter, gate(MARK_END, 1, 1, 0x1000), 4);
        let (counts, windows) = counter.finish();
        assert_eq!(counts.boot_instructions, 1 + 2 + 3);
        assert_eq!(counts.boot_exits, 1);
        let window = &windows[&1];
        assert_eq!((window.instructions, window.exits, window.ops, window.regions), (2 + 6, 1, 1, 1));
        assert_eq!(
            window.pcs.values().sum::<u64>(),
            8,
            "each stepped instruction at its address: {:?}",
            window.pcs
        );
        assert_eq!(counts.excursions["syscall 4"], vec![8]);
        assert_eq!(counts.excursions["vector 14"], vec![7]);
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
        let by_kind =
            |kind: &str| counts.excursion_pcs[kind].iter().map(|(&pc, &n)| (pc, n)).collect::<Vec<_>>();
        assert_eq!(by_kind("syscall 4"), [(K + 2, 3), (K + 4, 1), (common, 3), (common + 3, 2)]);
        assert_eq!(by_kind("vector 14"), [(K + 11, 1), (common, 1)]);
        assert_eq!(
            counts.excursion_pcs.len(),
            2,
            "markers and timer ticks have none: {:?}",
            counts.excursion_pcs
        );
        let window = &windows[&1];
        assert_eq!((window.instructions, window.exits, window.ops, window.regions), (8, 2, 2, 1));
        let pcs: Vec<(u64, u64)> = window.pcs.iter().map(|(&pc, &n)| (pc, n)).collect();
        assert_eq!(pcs, [(K + 2, 2), (K + 11, 1), (common, 3), (common + 3, 2)]);
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
