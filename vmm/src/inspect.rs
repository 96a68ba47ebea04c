//! What `superos-vmm inspect` shows, computed from one consistent view of
//! the guest: the kernel's published tables ([`KernelView`]) and the VMM's
//! own page-table walk ([`crate::walk`]), taken while the vCPU is held at a
//! consistent point (see [`crate::control`]), after the guest has finished,
//! or from a snapshot file ([`crate::snapshot`]).
//!
//! [`answer`] turns a [`Request`] into a typed result (serialized as JSON on
//! the control socket); [`render`] turns a result into the human tables the
//! command line prints. The same two functions serve the live socket and
//! offline snapshots, so both show exactly the same thing.
//!
//! Everything read from the guest is untrusted: names are sanitized before
//! they are printed, every address is checked, and nothing here panics on
//! guest data.

use crate::api::Request;
use crate::arch::paging::{PTE_ADDRESS_MASK, PTE_HUGE, PTE_NO_EXECUTE, PTE_PRESENT, PTE_USER, PTE_WRITABLE};
use crate::check::{evaluate, listed, Facts, KernelImage, TextBaseline};
use crate::cpu::{self, CpuCapture};
use crate::event_json;
use crate::introspect::{IntrospectError, KernelView, OwnerLookup, ViewSource};
use crate::memory::GuestRam;
use crate::session::{EventEntry, EventFormat};
use crate::walk::{self, Mapping, Walk};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::time::Instant;
use superos_protocol::event::Event;
use superos_protocol::hypercall::BootHelloParams;
use superos_protocol::introspect::{
    UserContext, NO_CPU, PARTICIPANT_OFFERED, PROCESS_RECEIVING, PROCESS_RUNNABLE,
};
use superos_protocol::layout::PAGE_SIZE;
use superos_protocol::ownership::FrameOwner;
use superos_protocol::syscall::{PROT_EXEC, PROT_READ, PROT_WRITE, RIGHT_GRANT, RIGHT_READ, RIGHT_WRITE};

/// Most bytes `dump` shows at once.
pub const MAX_DUMP: u64 = 64 * 1024;
/// Most events one `events` answer carries (the client asks again for more).
pub const MAX_EVENTS_PER_ANSWER: usize = 4096;

/// Where the guest was when a view was taken.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Point {
    /// Before the first guest instruction (`run --paused`).
    Boot,
    /// Stopped in the `EventNotify` hypercall after the kernel logged the
    /// event with this sequence number (the kernel publishes its tables
    /// before every event).
    Event {
        /// The last event drained.
        seq: u64,
    },
    /// Kicked out of user code (ring 3): the kernel is not half-way through
    /// anything.
    Ring3 {
        /// The user instruction pointer.
        rip: u64,
        /// CR3 (the running process's PML4).
        cr3: u64,
    },
    /// Held at a process's debug trap that the debugger asked for (a
    /// breakpoint or a single step): the kernel took the trap from ring 3
    /// and asked the VMM before changing anything (its tables are as it
    /// published them when it last returned to ring 3).
    Trap {
        /// The process.
        pid: u32,
        /// The CPU it trapped on.
        cpu: u32,
        /// Where it resumes.
        rip: u64,
    },
    /// Held after one instruction of the bootstrap vCPU the debugger asked
    /// to step (KVM's single-step): anywhere, in the kernel too, so the
    /// kernel's tables may be half-way through a change.
    Step {
        /// The vCPU.
        cpu: u32,
        /// Its instruction pointer.
        rip: u64,
    },
    /// Held where the bootstrap vCPU met a hardware breakpoint (KVM's
    /// guest debugging: DR0-3), anywhere in the kernel.
    HardwareBreakpoint {
        /// The vCPU.
        cpu: u32,
        /// Its instruction pointer (the breakpoint's address).
        rip: u64,
    },
    /// The guest has stopped for good.
    Finished {
        /// Why (the run's [`crate::run::GuestExit`], in words).
        exit: String,
        /// CR3 of the user code it was stopped in, if `inspect quit`
        /// stopped it in ring 3 (the process that was running).
        #[serde(default)]
        cr3: Option<u64>,
    },
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Point::Boot => f.write_str("before the first guest instruction"),
            Point::Event { seq } => write!(f, "at kernel event #{seq}"),
            Point::Ring3 { rip, cr3 } => write!(f, "in user code at rip {rip:#x} (cr3 {cr3:#x})"),
            Point::Step { cpu, rip } => write!(f, "after a single step of vCPU {cpu} (rip {rip:#x})"),
            Point::HardwareBreakpoint { cpu, rip } => {
                write!(f, "at a hardware breakpoint of vCPU {cpu} (rip {rip:#x})")
            }
            Point::Trap { pid: crate::debug_trap::KERNEL_PID, cpu, rip } => {
                write!(f, "at a debug trap of the kernel on CPU {cpu} (resuming at rip {rip:#x})")
            }
            Point::Trap { pid, cpu, rip } => {
                write!(f, "at a debug trap of pid {pid} on CPU {cpu} (resuming at rip {rip:#x})")
            }
            Point::Finished { exit, .. } => write!(f, "after the guest stopped ({exit})"),
        }
    }
}

/// Everything besides guest RAM that is needed to interpret it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineState {
    /// The kernel's boot hello (event ring, kernel text, introspection root),
    /// once it arrived and was accepted.
    pub hello: Option<BootHelloParams>,
    /// The RAM ranges the VMM gave the kernel as usable (`[start, end)`).
    pub usable: Vec<(u64, u64)>,
    /// The kernel text as it was at the boot hello (for
    /// `kernel-text-unchanged`).
    pub baseline: Option<TextBaseline>,
    /// The kernel events so far, in order.
    pub events: Vec<EventEntry>,
    /// Where the guest is.
    pub point: Point,
    /// What the VMM knows of the kernel image it loaded.
    pub image: KernelImage,
    /// Every vCPU's state at this point (read when the vCPUs were held, or
    /// the one the run ended with), in vCPU order; empty if there is none.
    pub cpus: Vec<CpuCapture>,
    /// The debug trap the guest is held at ([`Point::Trap`]).
    pub trap: Option<TrapStop>,
    /// The `int3`s a debugger planted in the kernel's text (not a change of
    /// it for `kernel-text-unchanged`).
    pub text_patches: BTreeMap<u64, u8>,
}

/// Why a process stopped at a debug trap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrapKind {
    /// It ran into an `int3` the debugger inserted.
    Breakpoint,
    /// It completed the single step the debugger asked for.
    Step,
}

/// A process held at a debug trap the debugger asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrapStop {
    /// The process.
    pub pid: u32,
    /// The CPU it trapped on.
    pub cpu: u32,
    /// Why.
    pub kind: TrapKind,
    /// Its registers as it will resume with them (at a breakpoint, `rip`
    /// is the breakpoint's address, the `int3` it ran having been undone).
    pub registers: UserContext,
}

impl Default for MachineState {
    fn default() -> Self {
        MachineState {
            hello: None,
            usable: Vec::new(),
            baseline: None,
            events: Vec::new(),
            point: Point::Boot,
            image: KernelImage::default(),
            cpus: Vec::new(),
            trap: None,
            text_patches: Default::default(),
        }
    }
}

/// Guest RAM and what is needed to interpret it, at one consistent point.
#[derive(Clone, Copy, Debug)]
pub struct Machine<'a> {
    /// Guest RAM (not changing while the machine is examined).
    pub ram: &'a GuestRam,
    /// The rest.
    pub state: &'a MachineState,
}

/// The kernel's claims and the walked truth, at one point.
#[derive(Debug)]
pub struct Analysis {
    /// What the kernel publishes (or, without a root, what the events say).
    pub view: KernelView,
    /// Why the published root could not be used, if it could not.
    pub error: Option<IntrospectError>,
    /// The page-table walk of every live process.
    pub walk: Walk,
    /// What the VMM knows on its own (for the checker).
    pub facts: Facts,
    /// Live processes known from the events that the process table hides.
    pub hidden: Vec<(u32, u64)>,
    /// The process whose address space was loaded (a ring-3 point only).
    pub running: Option<u32>,
    /// The vCPU states to check (empty: none), in vCPU order.
    pub cpus: Vec<CpuCapture>,
    /// Why there is no CPU state to check, if there is none.
    pub cpu_missing: &'static str,
    /// What the VMM knows of the kernel image.
    pub image: KernelImage,
    /// The gate the kernel announced (`GATE_KIND_*`).
    pub gate_kind: Option<u32>,
    /// The CPUs the kernel said it brought online (0: it has not said).
    pub cpus_online: u32,
}

impl Analysis {
    /// Reads the kernel's tables and walks every live process.
    pub fn new(machine: &Machine<'_>) -> Analysis {
        let state = machine.state;
        let ram = machine.ram;
        let mut live = BTreeMap::new();
        for entry in &state.events {
            match entry.event {
                Event::ProcessSpawned { pid, pml4_gpa, .. } => {
                    live.insert(pid, pml4_gpa);
                }
                Event::ProcessExited { pid, .. } | Event::ProcessKilled { pid, .. } => {
                    live.remove(&pid);
                }
                _ => {}
            }
        }
        let text_range = state
            .hello
            .filter(|h| ram.contains(h.kernel_text_gpa, h.kernel_text_len))
            .map(|h| (h.kernel_text_gpa, h.kernel_text_len));
        let facts = Facts {
            usable: state.usable.clone(),
            text: state.baseline.clone(),
            text_missing: None,
            text_range,
            live_from_events: live,
            kernel_read_only: state.image.read_only,
            text_patches: std::sync::Arc::new(std::sync::Mutex::new(state.text_patches.clone())),
        };
        let root = state.hello.map(|h| h.introspection_root_gpa).filter(|&gpa| gpa != 0);
        let (view, error) = match root.map(|gpa| KernelView::read(ram, gpa)) {
            Some(Ok(view)) => (view, None),
            Some(Err(error)) => (KernelView::from_events(&facts.live_from_events), Some(error)),
            None => (KernelView::from_events(&facts.live_from_events), None),
        };
        let mut processes: Vec<(u32, u64)> = view.processes.iter().map(|p| (p.pid, p.pml4)).collect();
        let hidden: Vec<(u32, u64)> = facts
            .live_from_events
            .iter()
            .filter(|(pid, _)| !view.is_live(**pid))
            .map(|(&p, &m)| (p, m))
            .collect();
        processes.extend(&hidden);
        let walk = walk::walk(ram, view.kernel_pml4(), &processes);
        let running = match state.point {
            Point::Ring3 { cr3, .. } | Point::Finished { cr3: Some(cr3), .. } => {
                processes.iter().find(|(_, pml4)| *pml4 == cr3 & PTE_ADDRESS_MASK).map(|(pid, _)| *pid)
            }
            _ => None,
        };
        let in_force = cpu::design_in_force(&state.events) || matches!(state.point, Point::Ring3 { .. });
        let cpu_missing = match state.point {
            Point::Boot => "no kernel CPU state before the first guest instruction",
            _ if !in_force => cpu::NOT_YET,
            Point::Finished { .. } => {
                "the guest stopped where its CPU state is not consistent, or the snapshot carries none"
            }
            _ => "the vCPU's state could not be read",
        };
        Analysis {
            view,
            error,
            walk,
            facts,
            hidden,
            running,
            cpus: if in_force { state.cpus.clone() } else { Vec::new() },
            cpu_missing,
            image: state.image.clone(),
            gate_kind: cpu::gate_kind(&state.events),
            cpus_online: state
                .events
                .iter()
                .rev()
                .find_map(|entry| match entry.event {
                    Event::KernelReady { cpus, .. } => Some(cpus),
                    _ => None,
                })
                .unwrap_or(0),
        }
    }

    /// The PML4 and name of a live process (from the table, or from the
    /// events if the table hides it).
    pub fn process(&self, pid: u32) -> Result<(u64, String), String> {
        if let Some(p) = self.view.process(pid) {
            return Ok((p.pml4, sanitize(&p.name)));
        }
        if let Some(&(_, pml4)) = self.hidden.iter().find(|(p, _)| *p == pid) {
            return Ok((pml4, "?".into()));
        }
        let live: Vec<String> = self
            .view
            .processes
            .iter()
            .map(|p| p.pid)
            .chain(self.hidden.iter().map(|(p, _)| *p))
            .map(|p| p.to_string())
            .collect();
        Err(if live.is_empty() {
            format!("no live process with pid {pid} (no process is alive)")
        } else {
            format!("no live process with pid {pid} (live: {})", live.join(", "))
        })
    }

    /// The name of `pid`, or "?".
    fn name(&self, pid: u32) -> String {
        self.view.process(pid).map_or_else(|| "?".to_string(), |p| sanitize(&p.name))
    }

    fn source(&self) -> String {
        match (self.view.source, &self.error) {
            (ViewSource::Published { root_gpa, generation }, _) => {
                format!("the kernel's tables (root {root_gpa:#x}, generation {generation})")
            }
            (ViewSource::Events, Some(error)) => {
                format!("the kernel's events only (its introspection root is unusable: {error})")
            }
            (ViewSource::Events, None) => {
                "the kernel's events only (no introspection root published yet)".into()
            }
        }
    }

    /// What the owner table says about `frame`, as a key and in words.
    fn owner(&self, frame: u64) -> (String, String) {
        let gate = self.view.gate_frame() == Some(frame);
        match self.view.owner(frame) {
            OwnerLookup::Owner(FrameOwner::Kernel) if gate => {
                ("gate".into(), "kernel (the gate page)".into())
            }
            OwnerLookup::Owner(owner) => (owner_key(owner), self.owner_words(owner)),
            OwnerLookup::Unmanaged => {
                ("unmanaged".into(), "unmanaged (kernel image, boot data, program images)".into())
            }
            OwnerLookup::Corrupt(raw) => ("corrupt".into(), format!("corrupt owner entry {raw:#x}")),
            OwnerLookup::Unknown => ("unknown".into(), "unknown (no tables published)".into()),
        }
    }

    fn owner_words(&self, owner: FrameOwner) -> String {
        match owner {
            FrameOwner::PageTable(pid) | FrameOwner::Private(pid) | FrameOwner::Message(pid) => {
                format!("{owner} ({})", self.name(pid))
            }
            other => other.to_string(),
        }
    }
}

fn owner_key(owner: FrameOwner) -> String {
    match owner {
        FrameOwner::Free => "free".into(),
        FrameOwner::Kernel => "kernel".into(),
        FrameOwner::PageTable(pid) => format!("table:{pid}"),
        FrameOwner::Private(pid) => format!("private:{pid}"),
        FrameOwner::Shared(id) => format!("shared:{id}"),
        FrameOwner::Message(pid) => format!("message:{pid}"),
    }
}

/// Replaces control characters (from guest-supplied names) so they cannot
/// reach a terminal or break a table.
pub fn sanitize(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// `ps`: one live process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PsEntry {
    /// Its pid.
    pub pid: u32,
    /// Its name ("?" if unknown).
    pub name: String,
    /// `runnable`, `receiving` (blocked in `ipc_recv`), `running` (its
    /// user code was interrupted, or a CPU runs it), or `hidden` (alive
    /// according to the events, missing from the process table).
    pub state: String,
    /// Its PML4.
    pub pml4: u64,
    /// The CPU running it, as the kernel's table says (`None`: none, or
    /// no table).
    #[serde(default)]
    pub cpu: Option<u32>,
    /// Virtual bytes the kernel counts (`None` without the kernel's table).
    pub virtual_bytes: Option<u64>,
    /// Resident (private) bytes the kernel counts.
    pub resident_bytes: Option<u64>,
    /// Shared bytes the kernel counts.
    pub shared_bytes: Option<u64>,
    /// Quotas (0: none).
    pub max_virtual_bytes: Option<u64>,
    /// Resident quota.
    pub max_resident_bytes: Option<u64>,
    /// Shared quota.
    pub max_shared_bytes: Option<u64>,
    /// What the walk of its page tables found.
    pub walked: Walked,
}

/// What the walk found for one process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Walked {
    /// User-accessible 4 KiB pages mapped.
    pub pages: u64,
    /// Distinct frames owned `Private(pid)` it maps.
    pub private_frames: u64,
    /// Distinct frames of shared regions it maps.
    pub shared_frames: u64,
    /// Distinct other frames it maps (the gate page; anything else is a
    /// violation).
    pub other_frames: u64,
    /// `private_frames` in bytes: what `resident_bytes` should be.
    pub resident_bytes: u64,
    /// Page-table frames of its tree (PML4 included).
    pub tables: u64,
    /// True if a budget cut the walk of its tables short: the counts above
    /// are what was found before it stopped (lower bounds), not the whole.
    #[serde(default)]
    pub partial: bool,
}

/// `ps`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PsResult {
    /// Where the guest was.
    pub at: String,
    /// Where the process list came from.
    pub source: String,
    /// Live processes, by pid.
    pub processes: Vec<PsEntry>,
    /// True if any process's walk (or the kernel half's) was cut short by
    /// a budget: see [`Walked::partial`].
    #[serde(default)]
    pub partial: bool,
}

/// `maps`: one range of pages with the same rights and owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapRange {
    /// First virtual address.
    pub start: u64,
    /// One past the last.
    pub end: u64,
    /// 4 KiB pages.
    pub pages: u64,
    /// `r-x`, `rw-`, `r--`, ...
    pub rights: String,
    /// Effective U (user-accessible).
    pub user: bool,
    /// Effective W.
    pub writable: bool,
    /// Effective NX.
    pub nx: bool,
    /// Leaf size (4096, 2 MiB or 1 GiB).
    pub page_size: u64,
    /// The frames, in virtual-address order.
    pub frames: Vec<u64>,
    /// Owner key (`private:3`, `shared:1`, `gate`, ...).
    pub owner_key: String,
    /// Owner in words.
    pub owner: String,
}

/// `maps <pid>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapsResult {
    /// Where the guest was.
    pub at: String,
    /// The process.
    pub pid: u32,
    /// Its name.
    pub name: String,
    /// Its PML4.
    pub pml4: u64,
    /// Its user-half mappings, by address.
    pub ranges: Vec<MapRange>,
    /// True if a budget cut the walk of its tables short: `ranges` is only
    /// what was found before it stopped.
    #[serde(default)]
    pub partial: bool,
}

/// `frames`: frames of one owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerCount {
    /// Owner key (`free`, `kernel`, `gate`, `table:3`, `private:3`,
    /// `shared:1`, `message:2`, `corrupt`, `unmanaged`).
    pub key: String,
    /// In words.
    pub owner: String,
    /// Frames.
    pub frames: u64,
    /// Of those, frames some process maps user-accessibly.
    pub mapped: u64,
}

/// `frames`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FramesResult {
    /// Where the guest was.
    pub at: String,
    /// Guest RAM in 4 KiB frames.
    pub ram_frames: u64,
    /// Frames in the kernel's managed ranges.
    pub managed_frames: u64,
    /// Free frames according to the kernel's allocator (root), if published.
    pub allocator_free: Option<u64>,
    /// Frames mapped user-accessibly by at least one process.
    pub mapped_frames: u64,
    /// Frames mapped by two or more processes.
    pub multiply_mapped_frames: u64,
    /// Counts per owner (unmanaged RAM included), in key order.
    pub owners: Vec<OwnerCount>,
    /// True if a budget cut some walk short: the mapped counts are lower
    /// bounds.
    #[serde(default)]
    pub partial: bool,
}

/// `shares`: one participant of a region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareParticipant {
    /// Its pid.
    pub pid: u32,
    /// Its name.
    pub name: String,
    /// Capability rights, `rwg` style.
    pub rights: String,
    /// Whose capability this one derives from (the owner: itself).
    pub granted_by: u32,
    /// Only offered (`shm_grant`), not yet accepted: it holds nothing.
    pub offered: bool,
    /// Where it has the region mapped, if it has.
    pub mapped_at: Option<u64>,
    /// Protection of that mapping, `rw-` style.
    pub prot: String,
    /// Region frames its page tables map (user-accessible).
    pub walked_pages: u64,
    /// Of those, writable.
    pub walked_writable: u64,
}

/// `shares`: one live region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// Region id (`MEM_SHARE:<id>`).
    pub id: u32,
    /// Owner pid.
    pub owner: u32,
    /// Owner name.
    pub owner_name: String,
    /// Length in bytes.
    pub len: u64,
    /// Its frames, in order.
    pub frames: Vec<u64>,
    /// Its participants.
    pub participants: Vec<ShareParticipant>,
}

/// `shares`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharesResult {
    /// Where the guest was.
    pub at: String,
    /// Live regions, by id.
    pub regions: Vec<Share>,
}

/// `events`: one event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventItem {
    /// Position in the run's event list (what `since` counts).
    pub index: u64,
    /// The event as the run prints it.
    pub text: String,
    /// The event as `run --events json` prints it.
    pub event: Value,
}

/// `events`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventsResult {
    /// Events from `since` on (at most [`MAX_EVENTS_PER_ANSWER`]).
    pub events: Vec<EventItem>,
    /// What to ask for next (`since`).
    pub next: u64,
    /// Set once the guest has stopped (no more events will come): why.
    pub finished: Option<String>,
}

/// `check`: one violation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViolationItem {
    /// The invariant's name.
    pub invariant: String,
    /// What was found.
    pub details: String,
    /// Frames involved.
    pub frames: Vec<u64>,
    /// Processes involved.
    pub pids: Vec<u32>,
    /// Virtual addresses involved.
    pub vas: Vec<u64>,
    /// Raw page-table entries involved.
    pub ptes: Vec<u64>,
    /// The whole finding in one line, as `run` reports it.
    pub text: String,
}

/// `check`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// Where the guest was.
    pub at: String,
    /// True if the kernel's tables were read (otherwise only what needs no
    /// tables was checked).
    pub published: bool,
    /// What is broken (empty: every invariant held).
    pub violations: Vec<ViolationItem>,
    /// Page-table entries examined.
    pub ptes_walked: u64,
    /// Tables read.
    pub tables_read: u64,
    /// User mappings recorded.
    pub mappings: u64,
    /// Free frames read to see they are zero.
    pub frames_scanned: u64,
    /// Time the check took, in microseconds.
    pub micros: u64,
    /// True if the vCPU's CPU state was compared with the design
    /// (`cpu-state-intact`).
    #[serde(default)]
    pub cpu_checked: bool,
    /// Where that CPU state was read, or why it was not checked.
    #[serde(default)]
    pub cpu: String,
}

/// `translate`: one level of the walk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TranslateLevel {
    /// `PML4`, `PDPT`, `PD` or `PT`.
    pub table: String,
    /// Index of the entry in its table.
    pub index: u64,
    /// GPA of the entry.
    pub entry_gpa: u64,
    /// The entry.
    pub entry: u64,
    /// Its flags in words (`P W U NX PS ...`).
    pub flags: String,
}

/// `translate`: where the address leads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TranslateLeaf {
    /// The guest-physical address.
    pub phys: u64,
    /// The frame (4 KiB) it lies in.
    pub frame: u64,
    /// The leaf's page size.
    pub page_size: u64,
    /// Effective rights, `r-x` style.
    pub rights: String,
    /// Effective U.
    pub user: bool,
    /// Owner of the frame, in words.
    pub owner: String,
}

/// `translate <pid> <vaddr>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TranslateResult {
    /// Where the guest was.
    pub at: String,
    /// The process.
    pub pid: u32,
    /// Its name.
    pub name: String,
    /// The address.
    pub vaddr: u64,
    /// The entries followed, from the PML4 down.
    pub levels: Vec<TranslateLevel>,
    /// Where it leads, if mapped.
    pub leaf: Option<TranslateLeaf>,
    /// Why not, if not.
    pub problem: Option<String>,
}

/// `dump <pid> <vaddr> <len>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpResult {
    /// Where the guest was.
    pub at: String,
    /// The process.
    pub pid: u32,
    /// First address.
    pub vaddr: u64,
    /// The bytes, in hex (two digits per byte).
    pub hex: String,
}

/// `regs <pid>`: a process's user registers, the ones it resumes with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistersResult {
    /// Where the guest was.
    pub at: String,
    /// The process.
    pub pid: u32,
    /// Its name.
    pub name: String,
    /// GPA of its PML4.
    pub pml4: u64,
    /// Where the registers were read: `the context the kernel keeps for
    /// it`, `vCPU N (in ring 3)` or `the top of CPU N's kernel stack`.
    pub source: String,
    /// The general registers, RIP, RFLAGS, CS and SS, by name, in
    /// [`REGISTER_ORDER`].
    pub registers: BTreeMap<String, u64>,
    /// The kernel entry that saved them (exception vector or the system-call
    /// gate's) and its error code; absent when read from the vCPU itself.
    pub entry: Option<(u64, u64)>,
}

/// How `regs` lists the registers (gdb's `info registers` order).
pub const REGISTER_ORDER: [&str; 20] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
    "r15", "rip", "rflags", "cs", "ss",
];

impl RegistersResult {
    /// Register `name` (0 if absent).
    pub fn get(&self, name: &str) -> u64 {
        self.registers.get(name).copied().unwrap_or(0)
    }
}

/// The registers of a [`UserContext`], by name.
fn context_registers(context: &UserContext) -> BTreeMap<String, u64> {
    let c = context;
    let values = [
        c.rax, c.rbx, c.rcx, c.rdx, c.rsi, c.rdi, c.rbp, c.rsp, c.r8, c.r9, c.r10, c.r11, c.r12, c.r13,
        c.r14, c.r15, c.rip, c.rflags, c.cs, c.ss,
    ];
    REGISTER_ORDER.iter().map(|n| n.to_string()).zip(values).collect()
}

/// The live processes' PML4s and spec indices, by pid, as the kernel
/// publishes them (as the events tell, before it does).
pub fn live_processes(machine: &Machine<'_>) -> std::collections::BTreeMap<u32, (u64, usize)> {
    use superos_protocol::event::Event;
    let root = machine.state.hello.map(|h| h.introspection_root_gpa).filter(|&gpa| gpa != 0);
    if let Some(view) = root.and_then(|gpa| crate::introspect::KernelView::read(machine.ram, gpa).ok()) {
        return view
            .processes
            .iter()
            .filter_map(|p| Some((p.pid, (p.pml4, p.record?.spec_index as usize))))
            .collect();
    }
    let mut live = std::collections::BTreeMap::new();
    for entry in &machine.state.events {
        match entry.event {
            Event::ProcessSpawned { pid, spec_index, pml4_gpa } => {
                live.insert(pid, (pml4_gpa, spec_index as usize));
            }
            Event::ProcessExited { pid, .. } | Event::ProcessKilled { pid, .. } => {
                live.remove(&pid);
            }
            _ => {}
        }
    }
    live
}

/// Where the registers a process resumes with are at one point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegisterHome {
    /// In the debug trap the guest is held at ([`MachineState::trap`]).
    Trap(TrapStop),
    /// In the context the kernel keeps for it (not running), a
    /// [`UserContext`] at this guest-physical address.
    Kept {
        /// Where.
        gpa: u64,
    },
    /// In vCPU `cpu`, which runs it in ring 3.
    Vcpu {
        /// The vCPU.
        cpu: u32,
    },
    /// In the frame its entry into the kernel saved at the top of CPU
    /// `cpu`'s kernel stack, a [`UserContext`] at this guest-physical
    /// address.
    KernelStack {
        /// The CPU.
        cpu: u32,
        /// Where the frame is.
        gpa: u64,
    },
}

/// Where process `pid`'s registers are (see [`registers`]).
pub fn register_home(analysis: &Analysis, machine: &Machine<'_>, pid: u32) -> Result<RegisterHome, String> {
    let (pml4, _) = analysis.process(pid)?;
    let record = analysis.view.process(pid).and_then(|p| p.record).ok_or_else(|| {
        format!("pid {pid} is known only from the events (the kernel publishes no record of it): its registers are not known")
    })?;
    if let Some(trap) = machine.state.trap.filter(|trap| trap.pid == pid) {
        return Ok(RegisterHome::Trap(trap));
    }
    let sharing =
        analysis.view.processes.iter().filter(|p| p.record.is_some_and(|r| r.cpu == record.cpu)).count();
    if record.cpu == NO_CPU || sharing > 1 {
        // Not running, or its CPU is switching between it and another
        // process: the kernel saved the outgoing one's context before the
        // switch began and the incoming one's is still where it was kept.
        return Ok(RegisterHome::Kept { gpa: record.context_gpa });
    }
    let cpu = record.cpu;
    let capture = machine
        .state
        .cpus
        .iter()
        .find(|c| c.cpu == cpu)
        .ok_or_else(|| format!("pid {pid} runs on CPU {cpu}, whose state was not read at this point"))?;
    let state = &capture.state;
    if state.in_ring3() {
        if state.cr3 & PTE_ADDRESS_MASK != pml4 {
            return Err(format!(
                "pid {pid} runs on vCPU {cpu}, which is in ring 3 with CR3 {:#x}, not pid {pid}'s PML4 {pml4:#x}",
                state.cr3
            ));
        }
        return Ok(RegisterHome::Vcpu { cpu });
    }
    let root = analysis.view.root.as_ref().ok_or("the kernel published no introspection root")?;
    let top = root.kernel_stack_tops.get(cpu as usize).copied().unwrap_or(0);
    if top == 0 {
        return Err(format!("the kernel published no kernel stack for CPU {cpu}"));
    }
    let size = std::mem::size_of::<UserContext>() as u64;
    let va = top.checked_sub(size).ok_or("the published kernel stack top is below its frame")?;
    let first = walk::translate(machine.ram, root.kernel_pml4, va)
        .map_err(|e| format!("CPU {cpu}'s kernel stack at {va:#x}: {e}"))?;
    let last = walk::translate(machine.ram, root.kernel_pml4, va + size - 1)
        .map_err(|e| format!("CPU {cpu}'s kernel stack at {:#x}: {e}", va + size - 1))?;
    if last.phys != first.phys + size - 1 {
        return Err(format!("the frame at the top of CPU {cpu}'s kernel stack crosses into another frame"));
    }
    Ok(RegisterHome::KernelStack { cpu, gpa: first.phys })
}

/// `regs <pid>`: the registers process `pid` resumes with. A process no CPU
/// runs has them in the context the kernel keeps for it
/// ([`ProcessRecord::context_gpa`](superos_protocol::introspect::ProcessRecord));
/// one a vCPU runs in ring 3 has them in that vCPU; one a CPU is in the
/// kernel for has them in the frame its entry saved at the top of that
/// CPU's kernel stack; one held at a debug trap, in that trap. Everything
/// read is the kernel's claim, read only within guest RAM; what does not
/// hold together is refused.
pub fn registers(
    analysis: &Analysis,
    machine: &Machine<'_>,
    at: String,
    pid: u32,
) -> Result<RegistersResult, String> {
    let (pml4, name) = analysis.process(pid)?;
    let ram = machine.ram;
    let (source, registers, entry) = match register_home(analysis, machine, pid)? {
        RegisterHome::Trap(trap) => (
            format!("its debug trap on CPU {}", trap.cpu),
            context_registers(&trap.registers),
            Some((trap.registers.vector, trap.registers.error_code)),
        ),
        RegisterHome::Kept { gpa } => {
            let context = ram
                .read::<UserContext>(gpa)
                .map_err(|e| format!("the context the kernel keeps for pid {pid} (GPA at {gpa:#x}): {e}"))?;
            (
                "the context the kernel keeps for it".to_string(),
                context_registers(&context),
                Some((context.vector, context.error_code)),
            )
        }
        RegisterHome::Vcpu { cpu } => {
            let state = &machine.state.cpus.iter().find(|c| c.cpu == cpu).ok_or("no vCPU state")?.state;
            let mut registers: BTreeMap<String, u64> =
                cpu::GENERAL_REGISTERS.iter().map(|n| n.to_string()).zip(state.general).collect();
            registers.insert("rip".into(), state.rip);
            registers.insert("rflags".into(), state.rflags);
            registers.insert("cs".into(), u64::from(state.cs.selector));
            registers.insert("ss".into(), u64::from(state.ss.selector));
            (format!("vCPU {cpu} (in ring 3)"), registers, None)
        }
        RegisterHome::KernelStack { cpu, gpa } => {
            let context = ram
                .read::<UserContext>(gpa)
                .map_err(|e| format!("CPU {cpu}'s kernel stack at GPA {gpa:#x}: {e}"))?;
            if context.cs & 3 != 3 {
                return Err(format!(
                    "the frame at the top of CPU {cpu}'s kernel stack is not one from ring 3 (cs {:#x}): pid {pid}'s registers are not there now",
                    context.cs
                ));
            }
            (
                format!("the top of CPU {cpu}'s kernel stack"),
                context_registers(&context),
                Some((context.vector, context.error_code)),
            )
        }
    };
    Ok(RegistersResult { at, pid, name, pml4, source, registers, entry })
}

/// `map`: a run of frames with the same owner and marks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameRun {
    /// First frame (guest-physical).
    pub start: u64,
    /// Frames in the run.
    pub frames: u64,
    /// Owner key (see [`OwnerCount::key`]).
    pub owner: String,
    /// Mapped user-accessibly by two or more processes.
    pub shared: bool,
    /// Named by a violation of an isolation invariant.
    pub violation: bool,
}

/// `map`: a live process, for the legend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapProcess {
    /// Pid.
    pub pid: u32,
    /// Name.
    pub name: String,
    /// The CPU running it, if one is.
    #[serde(default)]
    pub cpu: Option<u32>,
}

/// `map`: a live region, for the legend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapRegion {
    /// Region id.
    pub id: u32,
    /// Owner pid.
    pub owner: u32,
    /// Participants' pids.
    pub participants: Vec<u32>,
}

/// `map`: physical memory frame by frame (run-length encoded), for
/// [`crate::svg`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapResult {
    /// Where the guest was.
    pub at: String,
    /// Guest RAM in bytes.
    pub ram_bytes: u64,
    /// Every frame of RAM, in order.
    pub runs: Vec<FrameRun>,
    /// Live processes.
    pub processes: Vec<MapProcess>,
    /// Live regions.
    pub regions: Vec<MapRegion>,
    /// The invariants a check at this point found violated (empty: none).
    pub violated: Vec<String>,
    /// True if that check read the kernel's published tables (before the
    /// kernel publishes them, only what needs no tables was checked).
    #[serde(default)]
    pub published: bool,
    /// The CPUs the kernel brought online (0: not known yet).
    #[serde(default)]
    pub cpus: u32,
}

impl MapResult {
    /// On several CPUs, what each runs (`2 CPUs: CPU 0 runs pid 1 a, CPU 1
    /// idle`); `None` on one.
    pub fn cpu_line(&self) -> Option<String> {
        if self.cpus < 2 {
            return None;
        }
        let each: Vec<String> = (0..self.cpus)
            .map(|cpu| match self.processes.iter().find(|p| p.cpu == Some(cpu)) {
                Some(p) => format!("CPU {cpu} runs pid {} {}", p.pid, p.name),
                None => format!("CPU {cpu} idle"),
            })
            .collect();
        Some(format!("{} CPUs: {}", self.cpus, each.join(", ")))
    }

    /// What the check at this point says, in the words every rendering of
    /// the map uses.
    pub fn verdict(&self) -> String {
        if !self.violated.is_empty() {
            format!("ISOLATION VIOLATED: {}", self.violated.join(", "))
        } else if !self.published {
            "not fully checked: the kernel has not published its tables yet (nothing checked without them was violated)".into()
        } else {
            "every isolation invariant held".into()
        }
    }
}

/// Answers one query on one consistent view. Control requests (`pause`,
/// `resume`, `quit`, `status`) are not queries and are refused here.
pub fn answer(machine: &Machine<'_>, request: &Request) -> Result<Value, String> {
    // The answers about processes say which one the vCPU is in.
    let analysed = || {
        let analysis = Analysis::new(machine);
        let at = where_the_vcpu_is(&machine.state.point, analysis.running);
        (analysis, at)
    };
    let value = match *request {
        Request::Events { since, .. } => to_value(events(machine.state, since)),
        Request::Ps => {
            let (analysis, at) = analysed();
            to_value(ps(&analysis, at))
        }
        Request::Maps { pid } => {
            let (analysis, at) = analysed();
            to_value(maps(&analysis, at, pid)?)
        }
        Request::Frames => {
            let (analysis, at) = analysed();
            to_value(frames(&analysis, machine.ram, at))
        }
        Request::Shares => {
            let (analysis, at) = analysed();
            to_value(shares(&analysis, at))
        }
        Request::Check => {
            let (analysis, at) = analysed();
            to_value(check(&analysis, machine.ram, at))
        }
        Request::Translate { pid, vaddr } => {
            let (analysis, at) = analysed();
            to_value(translate(&analysis, machine.ram, at, pid, vaddr)?)
        }
        Request::Dump { pid, vaddr, len } => {
            let (analysis, at) = analysed();
            to_value(dump(&analysis, machine.ram, at, pid, vaddr, len)?)
        }
        Request::Registers { pid } => {
            let (analysis, at) = analysed();
            to_value(registers(&analysis, machine, at, pid)?)
        }
        Request::Map => {
            let (analysis, at) = analysed();
            to_value(map(&analysis, machine.ram, at))
        }
        Request::Status | Request::Pause | Request::Resume | Request::Quit => {
            return Err(format!("`{}` is not a query", request.name()))
        }
    };
    value.map_err(|e| format!("internal error: cannot encode the answer: {e}"))
}

/// Where the guest is, naming the process whose user code the vCPU is in
/// (found by its CR3), so that an answer about another process does not
/// seem to carry that one's rip and cr3.
fn where_the_vcpu_is(point: &Point, running: Option<u32>) -> String {
    match (point, running) {
        (Point::Ring3 { rip, cr3 }, Some(pid)) => {
            format!("with the vCPU in user code of pid {pid} at rip {rip:#x} (cr3 {cr3:#x})")
        }
        (Point::Ring3 { rip, cr3 }, None) => {
            format!("with the vCPU in user code of no known process at rip {rip:#x} (cr3 {cr3:#x})")
        }
        (point, _) => point.to_string(),
    }
}

fn to_value<T: Serialize>(value: T) -> Result<Value, serde_json::Error> {
    serde_json::to_value(value)
}

/// The events from position `since` on.
pub fn events(state: &MachineState, since: u64) -> EventsResult {
    let finished = match &state.point {
        Point::Finished { exit, .. } => Some(exit.clone()),
        _ => None,
    };
    events_from(&state.events, since, finished)
}

/// The events of `all` from position `since` on; `finished` says why the
/// guest stopped, once it has.
pub fn events_from(all: &[EventEntry], since: u64, finished: Option<String>) -> EventsResult {
    let start = usize::try_from(since).unwrap_or(usize::MAX).min(all.len());
    let slice = &all[start..];
    let slice = &slice[..slice.len().min(MAX_EVENTS_PER_ANSWER)];
    let events = slice
        .iter()
        .enumerate()
        .map(|(i, entry)| EventItem {
            index: (start + i) as u64,
            text: EventFormat::Text.line(entry).trim_start().to_string(),
            event: event_json::to_json(entry),
        })
        .collect();
    // Only "finished" once every event has been handed out.
    let next = start + slice.len();
    let finished = finished.filter(|_| next == all.len());
    EventsResult { events, next: next as u64, finished }
}

/// Walked counts per pid.
fn walked_counts(analysis: &Analysis) -> BTreeMap<u32, Walked> {
    let mut counts: BTreeMap<u32, Walked> = BTreeMap::new();
    for group in analysis.walk.by_frame() {
        let frame = group[0].frame;
        let owner = analysis.view.owner(frame);
        let mut pids = BTreeSet::new();
        for m in group.iter().filter(|m| m.user) {
            counts.entry(m.pid).or_default().pages += 1;
            pids.insert(m.pid);
        }
        for pid in pids {
            let count = counts.entry(pid).or_default();
            match owner {
                OwnerLookup::Owner(FrameOwner::Private(owner)) if owner == pid => {
                    count.private_frames += 1;
                    count.resident_bytes += PAGE_SIZE;
                }
                OwnerLookup::Owner(FrameOwner::Shared(_)) => count.shared_frames += 1,
                _ => count.other_frames += 1,
            }
        }
    }
    for reach in analysis.walk.tables.values() {
        let pids: BTreeSet<u32> = reach.refs.iter().map(|r| r.pid).collect();
        for pid in pids.into_iter().filter(|&p| p != walk::KERNEL_HALF) {
            counts.entry(pid).or_default().tables += 1;
        }
    }
    for &pid in &analysis.walk.partial {
        counts.entry(pid).or_default().partial = true;
    }
    counts
}

/// `ps`.
pub fn ps(analysis: &Analysis, at: String) -> PsResult {
    let counts = walked_counts(analysis);
    let mut processes: Vec<PsEntry> = analysis
        .view
        .processes
        .iter()
        .map(|p| {
            let record = p.record;
            let on_a_cpu = record.is_some_and(|r| r.cpu != superos_protocol::introspect::NO_CPU);
            let state = if analysis.running == Some(p.pid) || on_a_cpu {
                "running".to_string()
            } else {
                match record.map(|r| r.state) {
                    Some(PROCESS_RUNNABLE) => "runnable".into(),
                    Some(PROCESS_RECEIVING) => "receiving".into(),
                    Some(other) => format!("state {other}"),
                    None => "alive".into(),
                }
            };
            PsEntry {
                pid: p.pid,
                name: sanitize(&p.name),
                state,
                pml4: p.pml4,
                cpu: record.map(|r| r.cpu).filter(|&cpu| cpu != superos_protocol::introspect::NO_CPU),
                virtual_bytes: record.map(|r| r.virtual_bytes),
                resident_bytes: record.map(|r| r.resident_bytes),
                shared_bytes: record.map(|r| r.shared_bytes),
                max_virtual_bytes: record.map(|r| r.max_virtual_bytes),
                max_resident_bytes: record.map(|r| r.max_resident_bytes),
                max_shared_bytes: record.map(|r| r.max_shared_bytes),
                walked: counts.get(&p.pid).copied().unwrap_or_default(),
            }
        })
        .collect();
    for &(pid, pml4) in &analysis.hidden {
        processes.push(PsEntry {
            pid,
            name: "?".into(),
            state: "hidden".into(),
            pml4,
            cpu: None,
            virtual_bytes: None,
            resident_bytes: None,
            shared_bytes: None,
            max_virtual_bytes: None,
            max_resident_bytes: None,
            max_shared_bytes: None,
            walked: counts.get(&pid).copied().unwrap_or_default(),
        });
    }
    processes.sort_by_key(|p| p.pid);
    PsResult { at, source: analysis.source(), processes, partial: !analysis.walk.partial.is_empty() }
}

fn rights(writable: bool, executable: bool) -> String {
    format!("r{}{}", if writable { 'w' } else { '-' }, if executable { 'x' } else { '-' })
}

/// `maps <pid>`.
pub fn maps(analysis: &Analysis, at: String, pid: u32) -> Result<MapsResult, String> {
    let (pml4, name) = analysis.process(pid)?;
    let mut mine: Vec<&Mapping> = analysis.walk.mappings.iter().filter(|m| m.pid == pid).collect();
    mine.sort_by_key(|m| m.va);
    let mut ranges: Vec<MapRange> = Vec::new();
    for m in mine {
        let (owner_key, owner) = analysis.owner(m.frame);
        if let Some(last) = ranges.last_mut() {
            if last.end == m.va
                && last.user == m.user
                && last.writable == m.writable
                && last.nx == m.nx
                && last.page_size == m.page_size
                && last.owner_key == owner_key
            {
                last.end += PAGE_SIZE;
                last.pages += 1;
                last.frames.push(m.frame);
                continue;
            }
        }
        ranges.push(MapRange {
            start: m.va,
            end: m.va + PAGE_SIZE,
            pages: 1,
            rights: rights(m.writable, m.executable()),
            user: m.user,
            writable: m.writable,
            nx: m.nx,
            page_size: m.page_size,
            frames: vec![m.frame],
            owner_key,
            owner,
        });
    }
    let partial = analysis.walk.partial.contains(&pid);
    Ok(MapsResult { at, pid, name, pml4, ranges, partial })
}

/// `frames`.
pub fn frames(analysis: &Analysis, ram: &GuestRam, at: String) -> FramesResult {
    let view = &analysis.view;
    // Frames mapped user-accessibly, and by how many processes.
    let mut mappers: HashMap<u64, usize> = HashMap::new();
    for group in analysis.walk.by_frame() {
        let pids: BTreeSet<u32> = group.iter().filter(|m| m.user).map(|m| m.pid).collect();
        // Frames of guest RAM only: a large leaf reaching past RAM maps
        // nothing there, and "mapped" never exceeds the frames that exist.
        if !pids.is_empty() && ram.contains(group[0].frame, PAGE_SIZE) {
            mappers.insert(group[0].frame, pids.len());
        }
    }
    let mut owners: BTreeMap<String, OwnerCount> = BTreeMap::new();
    let mut managed = 0u64;
    let mut add = |key: String, words: String, frame: u64| {
        let entry =
            owners.entry(key.clone()).or_insert(OwnerCount { key, owner: words, frames: 0, mapped: 0 });
        entry.frames += 1;
        if mappers.contains_key(&frame) {
            entry.mapped += 1;
        }
    };
    for (frame, _) in view.managed_frames() {
        managed += 1;
        let (key, words) = analysis.owner(frame);
        add(key, words, frame);
    }
    let ram_frames = ram.size() / PAGE_SIZE;
    if view.published() {
        // Unmanaged RAM: everything outside the managed ranges.
        let mut ranges: Vec<(u64, u64)> = view.ranges.iter().map(|r| (r.start, r.end)).collect();
        ranges.sort_unstable();
        let mut cursor = 0u64;
        for (start, end) in ranges.into_iter().chain([(ram.size(), ram.size())]) {
            let mut frame = cursor;
            while frame < start.min(ram.size()) {
                add("unmanaged".into(), "unmanaged (kernel image, boot data, program images)".into(), frame);
                frame += PAGE_SIZE;
            }
            cursor = cursor.max(end);
        }
    }
    FramesResult {
        at,
        ram_frames,
        managed_frames: managed,
        allocator_free: view.root.map(|r| r.free_frames),
        mapped_frames: mappers.len() as u64,
        multiply_mapped_frames: mappers.values().filter(|&&n| n > 1).count() as u64,
        owners: owners.into_values().collect(),
        partial: !analysis.walk.partial.is_empty(),
    }
}

fn rights_text(rights: u32) -> String {
    let bit = |mask: u64, c: char| if u64::from(rights) & mask != 0 { c } else { '-' };
    [bit(RIGHT_READ, 'r'), bit(RIGHT_WRITE, 'w'), bit(RIGHT_GRANT, 'g')].iter().collect()
}

fn prot_text(prot: u64) -> String {
    let bit = |mask: u64, c: char| if prot & mask != 0 { c } else { '-' };
    [bit(PROT_READ, 'r'), bit(PROT_WRITE, 'w'), bit(PROT_EXEC, 'x')].iter().collect()
}

/// `shares`.
pub fn shares(analysis: &Analysis, at: String) -> SharesResult {
    let mut by_frame: HashMap<u64, Vec<&Mapping>> = HashMap::new();
    for m in analysis.walk.mappings.iter().filter(|m| m.user) {
        by_frame.entry(m.frame).or_default().push(m);
    }
    let regions = analysis
        .view
        .regions
        .iter()
        .map(|region| {
            let participants = region
                .participants
                .iter()
                .map(|p| {
                    let mut walked_pages = 0;
                    let mut walked_writable = 0;
                    for frame in &region.frames {
                        for m in by_frame.get(frame).into_iter().flatten().filter(|m| m.pid == p.pid) {
                            walked_pages += 1;
                            if m.writable {
                                walked_writable += 1;
                            }
                        }
                    }
                    ShareParticipant {
                        pid: p.pid,
                        name: analysis.name(p.pid),
                        rights: rights_text(p.rights.into()),
                        granted_by: p.granted_by,
                        offered: p.state == PARTICIPANT_OFFERED,
                        mapped_at: (p.mapped_at != 0).then_some(p.mapped_at),
                        prot: if p.mapped_at != 0 { prot_text(p.prot.into()) } else { "---".into() },
                        walked_pages,
                        walked_writable,
                    }
                })
                .collect();
            Share {
                id: region.id,
                owner: region.owner,
                owner_name: analysis.name(region.owner),
                len: region.len,
                frames: region.frames.clone(),
                participants,
            }
        })
        .collect();
    SharesResult { at, regions }
}

/// `check`: the isolation invariants, evaluated on this view.
pub fn check(analysis: &Analysis, ram: &GuestRam, at: String) -> CheckResult {
    let started = Instant::now();
    let (mut violations, counters) =
        evaluate(&analysis.view, &analysis.walk, ram, &analysis.facts, analysis.error.as_ref());
    for capture in &analysis.cpus {
        let expected =
            cpu::Expected { image: &analysis.image, gate_kind: analysis.gate_kind, cpu: capture.cpu };
        violations.extend(listed(cpu::check(&capture.state, expected, ram)));
    }
    let cpu = match analysis.cpus.as_slice() {
        [] => analysis.cpu_missing.to_string(),
        [only] => format!("read {}", only.at),
        [first, ..] => format!("of {} vCPUs read {}", analysis.cpus.len(), first.at),
    };
    let micros = started.elapsed().as_micros() as u64;
    CheckResult {
        at,
        published: analysis.view.published(),
        violations: violations
            .into_iter()
            .map(|v| ViolationItem {
                invariant: v.invariant.name().to_string(),
                text: v.to_string(),
                details: v.details,
                frames: v.frames,
                pids: v.pids,
                vas: v.vas,
                ptes: v.ptes,
            })
            .collect(),
        ptes_walked: counters.walk.entries,
        tables_read: counters.walk.tables,
        mappings: counters.walk.mappings,
        frames_scanned: counters.frames_scanned,
        micros,
        cpu_checked: !analysis.cpus.is_empty(),
        cpu,
    }
}

fn entry_flags(entry: u64) -> String {
    let mut flags = Vec::new();
    for (bit, name) in [
        (PTE_PRESENT, "P"),
        (PTE_WRITABLE, "W"),
        (PTE_USER, "U"),
        (1 << 5, "A"),
        (1 << 6, "D"),
        (PTE_HUGE, "PS"),
        (PTE_NO_EXECUTE, "NX"),
    ] {
        if entry & bit != 0 {
            flags.push(name);
        }
    }
    if flags.is_empty() {
        "not present".into()
    } else {
        flags.join(" ")
    }
}

/// True if `va` is canonical (bits 48..64 copy bit 47).
fn canonical(va: u64) -> bool {
    let top = va >> 47;
    top == 0 || top == 0x1_ffff
}

/// Follows the tables rooted at `pml4` for `vaddr`, level by level.
fn translate_at(
    analysis: &Analysis,
    ram: &GuestRam,
    pml4: u64,
    vaddr: u64,
) -> (Vec<TranslateLevel>, Result<TranslateLeaf, String>) {
    const NAMES: [&str; 4] = ["PT", "PD", "PDPT", "PML4"];
    let mut levels = Vec::new();
    if !canonical(vaddr) {
        return (levels, Err(format!("{vaddr:#x} is not a canonical address")));
    }
    let mut table = pml4 & PTE_ADDRESS_MASK;
    let (mut user, mut writable, mut nx) = (true, true, false);
    for level in (1..=4u32).rev() {
        let shift = 12 + 9 * (level - 1);
        let index = (vaddr >> shift) & 0x1ff;
        let entry_gpa = table + index * 8;
        let entry = match ram.read_u64(entry_gpa) {
            Ok(entry) => entry,
            Err(_) => {
                return (
                    levels,
                    Err(format!("the {} at {table:#x} is not in guest memory", NAMES[level as usize - 1])),
                )
            }
        };
        levels.push(TranslateLevel {
            table: NAMES[level as usize - 1].to_string(),
            index,
            entry_gpa,
            entry,
            flags: entry_flags(entry),
        });
        if entry & PTE_PRESENT == 0 {
            return (
                levels,
                Err(format!("not mapped: the {} entry is not present", NAMES[level as usize - 1])),
            );
        }
        user &= entry & PTE_USER != 0;
        writable &= entry & PTE_WRITABLE != 0;
        nx |= entry & PTE_NO_EXECUTE != 0;
        let leaf = level == 1 || (level <= 3 && entry & PTE_HUGE != 0);
        if leaf {
            let page_size = 1u64 << shift;
            let base = entry & PTE_ADDRESS_MASK & !(page_size - 1);
            let phys = base + (vaddr & (page_size - 1));
            let frame = phys & !(PAGE_SIZE - 1);
            let owner = if ram.contains(frame, PAGE_SIZE) {
                analysis.owner(frame).1
            } else {
                "beyond guest memory".to_string()
            };
            return (
                levels,
                Ok(TranslateLeaf { phys, frame, page_size, rights: rights(writable, !nx), user, owner }),
            );
        }
        if level == 4 && entry & PTE_HUGE != 0 {
            return (levels, Err("the PML4 entry has the reserved PS bit".into()));
        }
        table = entry & PTE_ADDRESS_MASK;
    }
    (levels, Err("no leaf".into()))
}

/// `translate <pid> <vaddr>`.
pub fn translate(
    analysis: &Analysis,
    ram: &GuestRam,
    at: String,
    pid: u32,
    vaddr: u64,
) -> Result<TranslateResult, String> {
    let (pml4, name) = analysis.process(pid)?;
    let (levels, leaf) = translate_at(analysis, ram, pml4, vaddr);
    let (leaf, problem) = match leaf {
        Ok(leaf) => (Some(leaf), None),
        Err(problem) => (None, Some(problem)),
    };
    Ok(TranslateResult { at, pid, name, vaddr, levels, leaf, problem })
}

/// `dump <pid> <vaddr> <len>`: refuses anything the process does not map
/// user-accessibly.
pub fn dump(
    analysis: &Analysis,
    ram: &GuestRam,
    at: String,
    pid: u32,
    vaddr: u64,
    len: u64,
) -> Result<DumpResult, String> {
    if len == 0 || len > MAX_DUMP {
        return Err(format!("dump length must be 1 to {MAX_DUMP} bytes, not {len}"));
    }
    let (pml4, _) = analysis.process(pid)?;
    let end = vaddr.checked_add(len).ok_or_else(|| format!("{vaddr:#x} + {len} overflows"))?;
    let mut bytes = Vec::with_capacity(len as usize);
    let mut va = vaddr;
    while va < end {
        let page_end = (va | (PAGE_SIZE - 1)).saturating_add(1).min(end);
        let leaf = match translate_at(analysis, ram, pml4, va).1 {
            Ok(leaf) if leaf.user => leaf,
            Ok(_) => {
                return Err(format!(
                    "pid {pid} does not map {va:#x} user-accessibly (supervisor-only page): refused"
                ))
            }
            Err(why) => return Err(format!("pid {pid} does not map {va:#x} ({why}): refused")),
        };
        let mut chunk = vec![0u8; (page_end - va) as usize];
        ram.read_bytes(leaf.phys, &mut chunk).map_err(|_| {
            format!("{va:#x} of pid {pid} maps {:#x}, outside guest memory: refused", leaf.phys)
        })?;
        bytes.extend_from_slice(&chunk);
        va = page_end;
    }
    let mut hex = String::with_capacity(bytes.len() * 2);
    for b in &bytes {
        let _ = write!(hex, "{b:02x}");
    }
    Ok(DumpResult { at, pid, vaddr, hex })
}

/// `map`: every frame of RAM with its owner and marks.
pub fn map(analysis: &Analysis, ram: &GuestRam, at: String) -> MapResult {
    let check = check(analysis, ram, at.clone());
    let violation_frames: BTreeSet<u64> =
        check.violations.iter().flat_map(|v| v.frames.iter().copied()).collect();
    let mut violated: Vec<String> = check.violations.iter().map(|v| v.invariant.clone()).collect();
    violated.dedup();
    let mut multiply: BTreeSet<u64> = BTreeSet::new();
    for group in analysis.walk.by_frame() {
        let pids: BTreeSet<u32> = group.iter().filter(|m| m.user).map(|m| m.pid).collect();
        if pids.len() > 1 {
            multiply.insert(group[0].frame);
        }
    }
    let tables: BTreeMap<u64, u32> = analysis
        .walk
        .tables
        .iter()
        .map(|(&frame, reach)| (frame, reach.refs.first().map_or(walk::KERNEL_HALF, |r| r.pid)))
        .collect();
    let mut runs: Vec<FrameRun> = Vec::new();
    let ram_frames = ram.size() / PAGE_SIZE;
    for i in 0..ram_frames {
        let frame = i * PAGE_SIZE;
        let mut owner = analysis.owner(frame).0;
        if owner == "unknown" {
            // Without the kernel's tables: what the walk saw.
            if let Some(&pid) = tables.get(&frame) {
                owner = if pid == walk::KERNEL_HALF { "kernel".into() } else { format!("table:{pid}") };
            }
        }
        let shared = multiply.contains(&frame);
        let violation = violation_frames.contains(&frame);
        if let Some(last) = runs.last_mut() {
            if last.owner == owner && last.shared == shared && last.violation == violation {
                last.frames += 1;
                continue;
            }
        }
        runs.push(FrameRun { start: frame, frames: 1, owner, shared, violation });
    }
    let mut processes: Vec<MapProcess> = analysis
        .view
        .processes
        .iter()
        .map(|p| MapProcess {
            pid: p.pid,
            name: sanitize(&p.name),
            cpu: p.record.map(|r| r.cpu).filter(|&cpu| cpu != superos_protocol::introspect::NO_CPU),
        })
        .collect();
    processes.extend(analysis.hidden.iter().map(|&(pid, _)| MapProcess { pid, name: "?".into(), cpu: None }));
    let regions = analysis
        .view
        .regions
        .iter()
        .map(|r| MapRegion {
            id: r.id,
            owner: r.owner,
            participants: r.participants.iter().map(|p| p.pid).collect(),
        })
        .collect();
    MapResult {
        at,
        ram_bytes: ram.size(),
        runs,
        processes,
        regions,
        violated,
        published: check.published,
        cpus: analysis.cpus_online,
    }
}

// ---------------------------------------------------------------------------
// Rendering for people.

fn bytes_text(bytes: u64) -> String {
    if bytes == 0 {
        "0".into()
    } else if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{}M", bytes >> 20)
    } else if bytes % 1024 == 0 {
        format!("{}K", bytes >> 10)
    } else {
        format!("{bytes}B")
    }
}

fn usage(used: Option<u64>, quota: Option<u64>) -> String {
    match (used, quota) {
        (Some(used), Some(0) | None) => format!("{}/-", bytes_text(used)),
        (Some(used), Some(quota)) => format!("{}/{}", bytes_text(used), bytes_text(quota)),
        (None, _) => "?".into(),
    }
}

/// Frames as runs of consecutive frames: `0x2a5000-0x2a7000` (first and
/// last frame), at most `max` runs.
pub fn frame_runs(frames: &[u64], max: usize) -> String {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &frame in frames {
        match runs.last_mut() {
            Some((_, last)) if *last + PAGE_SIZE == frame => *last = frame,
            _ => runs.push((frame, frame)),
        }
    }
    let mut text: Vec<String> = runs
        .iter()
        .take(max)
        .map(
            |&(first, last)| {
                if first == last {
                    format!("{first:#x}")
                } else {
                    format!("{first:#x}-{last:#x}")
                }
            },
        )
        .collect();
    if runs.len() > max {
        text.push(format!("+{} more", runs.len() - max));
    }
    text.join(", ")
}

fn decode<T: for<'de> Deserialize<'de>>(value: &Value) -> Result<T, String> {
    T::deserialize(value).map_err(|e| format!("unexpected answer from the VMM: {e}"))
}

/// Renders the result of `request` as the command line prints it.
pub fn render(request: &Request, value: &Value) -> Result<String, String> {
    let mut out = String::new();
    match request {
        Request::Ps => {
            let r: PsResult = decode(value)?;
            let _ = writeln!(out, "{} processes {}; from {}", r.processes.len(), r.at, r.source);
            let _ = writeln!(
                out,
                "{:>4}  {:<16} {:<10} {:>3} {:<10} {:>13} {:>13} {:>13}  {:>6} {:>7} {:>6} {:>5} {:>6}",
                "pid",
                "name",
                "state",
                "cpu",
                "pml4",
                "virtual",
                "resident",
                "shared",
                "pages",
                "private",
                "shared",
                "other",
                "tables"
            );
            for p in &r.processes {
                let _ = writeln!(
                    out,
                    "{:>4}  {:<16} {:<10} {:>3} {:<10} {:>13} {:>13} {:>13}  {:>6} {:>7} {:>6} {:>5} {:>6}",
                    p.pid,
                    p.name,
                    p.state,
                    p.cpu.map_or("-".to_string(), |cpu| cpu.to_string()),
                    format!("{:#x}", p.pml4),
                    usage(p.virtual_bytes, p.max_virtual_bytes),
                    usage(p.resident_bytes, p.max_resident_bytes),
                    usage(p.shared_bytes, p.max_shared_bytes),
                    p.walked.pages,
                    p.walked.private_frames,
                    p.walked.shared_frames,
                    p.walked.other_frames,
                    p.walked.tables
                );
            }
            let _ = writeln!(
                out,
                "(virtual, resident, shared: the kernel's counters / quotas; pages .. tables: counted by walking the page tables)"
            );
            let partial: Vec<String> =
                r.processes.iter().filter(|p| p.walked.partial).map(|p| p.pid.to_string()).collect();
            if r.partial {
                let _ = writeln!(
                    out,
                    "PARTIAL: a budget cut the page-table walk short{}: those counts are lower bounds",
                    if partial.is_empty() {
                        " (the kernel half)".to_string()
                    } else {
                        format!(" for pid {}", partial.join(", "))
                    }
                );
            }
        }
        Request::Maps { .. } => {
            let r: MapsResult = decode(value)?;
            let pages: u64 = r.ranges.iter().map(|m| m.pages).sum();
            let _ = writeln!(
                out,
                "pid {} ({}) {}: pml4 {:#x}, {} pages in {} ranges{}",
                r.pid,
                r.name,
                r.at,
                r.pml4,
                pages,
                r.ranges.len(),
                if r.partial {
                    " (PARTIAL: a budget cut the walk of its tables short; more may be mapped)"
                } else {
                    ""
                }
            );
            let _ = writeln!(
                out,
                "{:<16} {:<16} {:>6}  {:<6} {:<5} {:<34} owner",
                "start", "end", "pages", "rights", "user", "frames"
            );
            for m in &r.ranges {
                let _ = writeln!(
                    out,
                    "{:<16} {:<16} {:>6}  {:<6} {:<5} {:<34} {}",
                    format!("{:#x}", m.start),
                    format!("{:#x}", m.end),
                    m.pages,
                    m.rights,
                    if m.user { "yes" } else { "no" },
                    frame_runs(&m.frames, 2),
                    m.owner
                );
            }
        }
        Request::Frames => {
            let r: FramesResult = decode(value)?;
            let _ = writeln!(
                out,
                "physical memory {}: {} frames ({} MiB), {} managed by the kernel's allocator{}; {} mapped by processes, {} by two or more",
                r.at,
                r.ram_frames,
                (r.ram_frames * PAGE_SIZE) >> 20,
                r.managed_frames,
                r.allocator_free.map_or(String::new(), |f| format!(" ({f} free by its count)")),
                r.mapped_frames,
                r.multiply_mapped_frames
            );
            if r.partial {
                let _ = writeln!(
                    out,
                    "PARTIAL: a budget cut a page-table walk short: the mapped counts are lower bounds"
                );
            }
            let _ = writeln!(out, "{:<56} {:>8} {:>8}", "owner", "frames", "mapped");
            for o in &r.owners {
                let _ = writeln!(out, "{:<56} {:>8} {:>8}", o.owner, o.frames, o.mapped);
            }
        }
        Request::Shares => {
            let r: SharesResult = decode(value)?;
            let _ = writeln!(out, "{} shared regions {}", r.regions.len(), r.at);
            for s in &r.regions {
                let _ = writeln!(
                    out,
                    "region {} (MEM_SHARE:{}): owner pid {} ({}), {} bytes, {} frames: {}",
                    s.id,
                    s.id,
                    s.owner,
                    s.owner_name,
                    s.len,
                    s.frames.len(),
                    frame_runs(&s.frames, 4)
                );
                let _ = writeln!(
                    out,
                    "  {:>4}  {:<16} {:<6} {:<8} {:<16} {:<5} walked",
                    "pid", "name", "rights", "from", "mapped at", "prot"
                );
                for p in &s.participants {
                    let walked = if p.walked_pages == 0 {
                        "no frame mapped".to_string()
                    } else {
                        format!("{} frames mapped, {} writable", p.walked_pages, p.walked_writable)
                    };
                    let from = if p.pid == s.owner {
                        "owner".to_string()
                    } else if p.offered {
                        format!("{}?", p.granted_by)
                    } else {
                        p.granted_by.to_string()
                    };
                    let _ = writeln!(
                        out,
                        "  {:>4}  {:<16} {:<6} {:<8} {:<16} {:<5} {}",
                        p.pid,
                        p.name,
                        p.rights,
                        from,
                        p.mapped_at.map_or("-".to_string(), |a| format!("{a:#x}")),
                        p.prot,
                        walked
                    );
                }
            }
        }
        Request::Events { .. } => {
            let r: EventsResult = decode(value)?;
            for e in &r.events {
                let _ = writeln!(out, "{}", e.text);
            }
        }
        Request::Check => {
            let r: CheckResult = decode(value)?;
            let cpu = if r.cpu_checked { format!(", the CPU state {}", r.cpu) } else { String::new() };
            let work = format!(
                "{} page-table entries in {} tables, {} user mappings, {} free frames scanned{cpu}, {:.3} ms",
                r.ptes_walked,
                r.tables_read,
                r.mappings,
                r.frames_scanned,
                r.micros as f64 / 1e3
            );
            if r.violations.is_empty() {
                let _ = writeln!(out, "check {}: every invariant held ({work})", r.at);
            } else {
                let _ = writeln!(out, "check {}: {} violations ({work})", r.at, r.violations.len());
                for v in &r.violations {
                    let _ = writeln!(out, "  {}", v.text);
                }
            }
            if !r.cpu_checked {
                let _ = writeln!(out, "note: the CPU state was not checked: {}", r.cpu);
            }
            if !r.published {
                let _ = writeln!(
                    out,
                    "note: the kernel's tables are not published or not usable: only what needs no tables was checked"
                );
            }
        }
        Request::Translate { .. } => {
            let r: TranslateResult = decode(value)?;
            let _ = writeln!(out, "pid {} ({}) virtual address {:#x} {}:", r.pid, r.name, r.vaddr, r.at);
            for l in &r.levels {
                let _ = writeln!(
                    out,
                    "  {:<4} [{:>3}] at {:<12} {:<20} {}",
                    l.table,
                    l.index,
                    format!("{:#x}", l.entry_gpa),
                    format!("{:#x}", l.entry),
                    l.flags
                );
            }
            match (&r.leaf, &r.problem) {
                (Some(leaf), _) => {
                    let _ = writeln!(
                        out,
                        "  -> physical {:#x} (frame {:#x}, {} KiB page), {} {}, owner: {}",
                        leaf.phys,
                        leaf.frame,
                        leaf.page_size >> 10,
                        leaf.rights,
                        if leaf.user { "user" } else { "supervisor-only" },
                        leaf.owner
                    );
                }
                (None, Some(problem)) => {
                    let _ = writeln!(out, "  -> {problem}");
                }
                (None, None) => {}
            }
        }
        Request::Dump { .. } => {
            let r: DumpResult = decode(value)?;
            let bytes = hex_decode(&r.hex).ok_or("unexpected answer from the VMM: bad hex")?;
            let _ = writeln!(out, "pid {} {:#x}+{} {}:", r.pid, r.vaddr, bytes.len(), r.at);
            out.push_str(&hexdump(r.vaddr, &bytes));
        }
        Request::Registers { .. } => {
            let r: RegistersResult = decode(value)?;
            let _ = writeln!(out, "pid {} ({}) {}, registers from {}:", r.pid, r.name, r.at, r.source);
            for name in REGISTER_ORDER {
                let value = r.get(name);
                let _ = writeln!(out, "{name:<8} {value:#018x}  {value}");
            }
            if let Some((vector, error_code)) = r.entry {
                let _ = writeln!(out, "saved by kernel entry vector {vector:#x}, error code {error_code:#x}");
            }
        }
        Request::Map => {
            let r: MapResult = decode(value)?;
            let _ = writeln!(out, "{} runs of frames {}; use --svg <file> to draw them", r.runs.len(), r.at);
        }
        Request::Status | Request::Pause | Request::Resume | Request::Quit => {
            let r: crate::api::ControlResult = decode(value)?;
            if *request == Request::Status && r.clients > 0 {
                let _ = writeln!(out, "{} ({} connected to the control socket)", r.message, r.clients);
            } else {
                let _ = writeln!(out, "{}", r.message);
            }
        }
    }
    Ok(out)
}

/// Decodes two hex digits per byte.
pub fn hex_decode(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 || !hex.is_ascii() {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok()).collect()
}

/// `hexdump -C` style lines: address, 16 bytes, ASCII.
pub fn hexdump(start: u64, bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, line) in bytes.chunks(16).enumerate() {
        let _ = write!(out, "{:016x}  ", start.wrapping_add(i as u64 * 16));
        for k in 0..16 {
            match line.get(k) {
                Some(b) => {
                    let _ = write!(out, "{b:02x} ");
                }
                None => out.push_str("   "),
            }
            if k == 7 {
                out.push(' ');
            }
        }
        out.push_str(" |");
        out.extend(line.iter().map(|&b| if b.is_ascii_graphic() || b == b' ' { b as char } else { '.' }));
        out.push_str("|\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_hexdump_looks_like_hexdump() {
        assert_eq!(hex_decode("00ff7f"), Some(vec![0, 0xff, 0x7f]));
        assert_eq!(hex_decode("0"), None);
        assert_eq!(hex_decode("zz"), None);
        assert_eq!(hex_decode("é1"), None);
        let text = hexdump(0x40_0000, b"\x7fELF hello, world!");
        assert!(text.starts_with("0000000000400000  7f 45 4c 46 20 68 65 6c  6c 6f 2c 20"), "{text}");
        assert!(text.contains("|.ELF hello, worl|"), "{text}");
        assert_eq!(text.lines().count(), 2);
    }

    #[test]
    fn frames_are_shown_as_runs() {
        let frames = [0x1000, 0x2000, 0x3000, 0x8000, 0xa000, 0xb000];
        assert_eq!(frame_runs(&frames, 8), "0x1000-0x3000, 0x8000, 0xa000-0xb000");
        assert_eq!(frame_runs(&frames, 1), "0x1000-0x3000, +2 more");
        assert_eq!(frame_runs(&[], 1), "");
    }

    #[test]
    fn names_from_the_guest_are_sanitized() {
        assert_eq!(sanitize("a\x1b[31mb\n"), "a?[31mb?");
    }

    #[test]
    fn one_hostile_tree_makes_only_its_own_answers_partial_and_counts_stay_within_ram() {
        use crate::session::EventEntry;
        let ram = GuestRam::new(16).unwrap();
        // pid 1: a PML4 pointing at itself from every user slot; pid 2: a
        // 1 GiB user leaf at 0, which reaches far past the 16 MiB of RAM.
        let (hostile, other) = (0x10_0000u64, 0x10_1000u64);
        let table = 0x7u64; // present, writable, user
        ram.write_bytes(hostile, zerocopy::IntoBytes::as_bytes(&vec![hostile | table; 256][..])).unwrap();
        let pdpt = 0x10_2000u64;
        ram.write(other, &(pdpt | table)).unwrap();
        ram.write(pdpt, &(0x85u64)).unwrap(); // present, user, huge: 1 GiB at 0
        let spawned = |seq, pid, pml4_gpa| EventEntry {
            seq,
            tick: 0,
            cpu: None,
            event: Event::ProcessSpawned { pid, spec_index: 0, pml4_gpa },
        };
        let state =
            MachineState { events: vec![spawned(0, 1, hostile), spawned(1, 2, other)], ..Default::default() };
        let machine = Machine { ram: &ram, state: &state };
        let ps: PsResult = serde_json::from_value(answer(&machine, &Request::Ps).unwrap()).unwrap();
        assert!(ps.partial);
        let walked: Vec<(u32, bool, u64)> =
            ps.processes.iter().map(|p| (p.pid, p.walked.partial, p.walked.pages)).collect();
        assert_eq!(walked.iter().map(|w| (w.0, w.1)).collect::<Vec<_>>(), [(1, true), (2, false)]);
        // pid 2's leaf was walked despite pid 1 (its budget is its own):
        // every frame of RAM it maps (the walk stops at the first beyond).
        assert_eq!(walked[1].2, 4096 + 1);
        let text = render(&Request::Ps, &serde_json::to_value(&ps).unwrap()).unwrap();
        assert!(text.contains("PARTIAL: a budget cut the page-table walk short for pid 1"), "{text}");
        let maps: MapsResult =
            serde_json::from_value(answer(&machine, &Request::Maps { pid: 1 }).unwrap()).unwrap();
        assert!(maps.partial);
        let text = render(&Request::Maps { pid: 1 }, &serde_json::to_value(&maps).unwrap()).unwrap();
        assert!(text.contains("(PARTIAL: a budget cut the walk of its tables short"), "{text}");
        let maps: MapsResult =
            serde_json::from_value(answer(&machine, &Request::Maps { pid: 2 }).unwrap()).unwrap();
        assert!(!maps.partial);
        let frames: FramesResult =
            serde_json::from_value(answer(&machine, &Request::Frames).unwrap()).unwrap();
        assert!(frames.partial);
        assert!(
            frames.mapped_frames <= frames.ram_frames,
            "{} of {}",
            frames.mapped_frames,
            frames.ram_frames
        );
    }

    /// A machine whose kernel publishes pid 3 (`cpu`, its context at
    /// `CONTEXT`) and, with `two_on_cpu`, pid 4 on the same CPU; CPU 0's
    /// kernel stack top at `STACK_TOP`, mapped by the kernel's tables.
    fn machine_with_one_process(cpu: u32, two_on_cpu: bool) -> (GuestRam, MachineState, u64) {
        use crate::introspect::tests::{sample_root, PROCS, ROOT};
        use superos_protocol::introspect::ProcessRecord;
        const CONTEXT: u64 = 0x9000;
        let ram = GuestRam::new(16).unwrap();
        let mut tables = walk::tests::Tables { ram: &ram, next: 0x40_0000 };
        let (pml4, kernel_pml4, stack) = (tables.frame(), tables.frame(), tables.frame());
        tables.map(kernel_pml4, STACK_TOP - 4096, stack, PTE_PRESENT | PTE_WRITABLE);
        let mut root = sample_root(&ram);
        root.kernel_pml4 = kernel_pml4;
        root.kernel_stack_tops[0] = STACK_TOP;
        ram.write(ROOT, &root).unwrap();
        let record = |pid| ProcessRecord {
            pid,
            state: PROCESS_RUNNABLE,
            pml4,
            cpu,
            context_gpa: CONTEXT,
            ..Default::default()
        };
        ram.write(PROCS, &record(3)).unwrap();
        if two_on_cpu {
            ram.write(PROCS + std::mem::size_of::<ProcessRecord>() as u64, &record(4)).unwrap();
        }
        let kept = UserContext {
            rip: 0x40_1000,
            rsp: 0x7fff_f000,
            rax: 7,
            cs: 0x33,
            ss: 0x2b,
            vector: 3,
            ..Default::default()
        };
        ram.write(CONTEXT, &kept).unwrap();
        let on_stack = UserContext {
            rip: 0x40_2000,
            rbx: 9,
            cs: 0x33,
            ss: 0x2b,
            vector: 14,
            error_code: 6,
            ..Default::default()
        };
        ram.write(stack + 4096 - std::mem::size_of::<UserContext>() as u64, &on_stack).unwrap();
        let hello = BootHelloParams { introspection_root_gpa: ROOT, ..Default::default() };
        let state = MachineState { hello: Some(hello), ..Default::default() };
        (ram, state, stack)
    }

    const STACK_TOP: u64 = 0xffff_8000_0010_0000;

    fn regs_of(ram: &GuestRam, state: &MachineState, pid: u32) -> Result<RegistersResult, String> {
        let machine = Machine { ram, state };
        answer(&machine, &Request::Registers { pid }).map(|value| serde_json::from_value(value).unwrap())
    }

    fn captured(cpu: u32, cs: u16, cr3: u64) -> CpuCapture {
        let mut state = cpu::CpuState::default();
        state.cs.selector = cs;
        state.cr3 = cr3;
        state.rip = 0x40_3000;
        state.general[1] = 0xb; // rbx
        CpuCapture { cpu, at: String::new(), state }
    }

    #[test]
    fn registers_come_from_where_the_process_is_and_nowhere_else() {
        // No CPU runs it: the context the kernel keeps.
        let (ram, state, _) = machine_with_one_process(NO_CPU, false);
        let regs = regs_of(&ram, &state, 3).unwrap();
        assert_eq!(
            (regs.source.as_str(), regs.get("rip"), regs.get("rax")),
            ("the context the kernel keeps for it", 0x40_1000, 7)
        );
        assert_eq!(regs.entry, Some((3, 0)));
        let text = render(&Request::Registers { pid: 3 }, &serde_json::to_value(&regs).unwrap()).unwrap();
        assert!(text.contains("rip      0x0000000000401000"), "{text}");

        // CPU 0 runs it in ring 3 in its address space: the vCPU's registers.
        let (ram, mut state, _) = machine_with_one_process(0, false);
        let pml4 = 0x40_0000;
        state.cpus = vec![captured(0, 0x33, pml4)];
        let regs = regs_of(&ram, &state, 3).unwrap();
        assert_eq!(
            (regs.source.as_str(), regs.get("rip"), regs.get("rbx")),
            ("vCPU 0 (in ring 3)", 0x40_3000, 0xb)
        );
        // ... but not if the vCPU is in another address space.
        state.cpus = vec![captured(0, 0x33, 0x77_7000)];
        let error = regs_of(&ram, &state, 3).unwrap_err();
        assert!(error.contains("CR3 0x777000, not pid 3's PML4"), "{error}");
        // CPU 0 is in the kernel for it: the frame at the top of its kernel stack.
        state.cpus = vec![captured(0, 0x8, pml4)];
        let regs = regs_of(&ram, &state, 3).unwrap();
        assert_eq!(
            (regs.source.as_str(), regs.get("rip"), regs.get("rbx")),
            ("the top of CPU 0's kernel stack", 0x40_2000, 9)
        );
        assert_eq!(regs.entry, Some((14, 6)));
        // No capture of its CPU: refused.
        state.cpus.clear();
        assert!(regs_of(&ram, &state, 3).unwrap_err().contains("whose state was not read"));

        // Two processes claim CPU 0 (a switch between them): each one's kept context.
        let (ram, mut state, _) = machine_with_one_process(0, true);
        state.cpus = vec![captured(0, 0x8, pml4)];
        assert_eq!(regs_of(&ram, &state, 4).unwrap().source, "the context the kernel keeps for it");
    }

    #[test]
    fn registers_the_kernel_misplaces_are_refused_not_invented() {
        use crate::introspect::tests::{PROCS, ROOT};
        use superos_protocol::introspect::{IntrospectionRoot, ProcessRecord};
        let pml4 = 0x40_0000;
        // The frame at the top of the stack is a kernel one.
        let (ram, mut state, stack) = machine_with_one_process(0, false);
        state.cpus = vec![captured(0, 0x8, pml4)];
        let frame = stack + 4096 - std::mem::size_of::<UserContext>() as u64;
        ram.write(frame, &UserContext { cs: 0x8, ..Default::default() }).unwrap();
        let error = regs_of(&ram, &state, 3).unwrap_err();
        assert!(error.contains("not one from ring 3 (cs 0x8)"), "{error}");
        // No stack published for the CPU; a stack the kernel's tables do not map.
        let mut root: IntrospectionRoot = ram.read(ROOT).unwrap();
        root.kernel_stack_tops[0] = 0;
        ram.write(ROOT, &root).unwrap();
        assert!(regs_of(&ram, &state, 3).unwrap_err().contains("no kernel stack for CPU 0"));
        root.kernel_stack_tops[0] = 0xffff_9000_0000_0000;
        ram.write(ROOT, &root).unwrap();
        assert!(regs_of(&ram, &state, 3).unwrap_err().contains("CPU 0's kernel stack at"));
        // A kept context outside guest RAM.
        let (ram, state, _) = machine_with_one_process(NO_CPU, false);
        let mut record: ProcessRecord = ram.read(PROCS).unwrap();
        record.context_gpa = u64::MAX - 8;
        ram.write(PROCS, &record).unwrap();
        let error = regs_of(&ram, &state, 3).unwrap_err();
        assert!(error.contains("the context the kernel keeps for pid 3"), "{error}");
        // No such process.
        assert!(regs_of(&ram, &state, 5).unwrap_err().contains("no live process with pid 5"));
    }

    #[test]
    fn a_machine_without_a_kernel_answers_every_query_without_panicking() {
        let ram = GuestRam::new(16).unwrap();
        let state = MachineState::default();
        let machine = Machine { ram: &ram, state: &state };
        for request in [
            Request::Ps,
            Request::Frames,
            Request::Shares,
            Request::Check,
            Request::Map,
            Request::Events { since: 0, wait_ms: 0 },
        ] {
            let value = answer(&machine, &request).unwrap();
            render(&request, &value).unwrap();
        }
        let error = answer(&machine, &Request::Maps { pid: 1 }).unwrap_err();
        assert!(error.contains("no live process with pid 1"), "{error}");
        assert!(answer(&machine, &Request::Pause).is_err());
        let map: MapResult = serde_json::from_value(answer(&machine, &Request::Map).unwrap()).unwrap();
        assert_eq!(map.runs.iter().map(|r| r.frames).sum::<u64>(), 4096);
    }
}
