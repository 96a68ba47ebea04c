//! Holding the vCPU at a consistent point so the guest can be examined from
//! outside: the handshake between the control socket ([`crate::api`]) and
//! the vCPU thread ([`crate::run`]), and what a run does with the socket and
//! the snapshot file at its end ([`Attached`]).
//!
//! The vCPU thread owns the `VcpuFd`. A query raises [`Control`]'s
//! attention flag and kicks the vCPU thread out of `KVM_RUN` with the same
//! signal the watchdog uses (again every few milliseconds, since a signal
//! that lands between two `KVM_RUN`s is lost). After every VM exit the vCPU
//! thread calls [`Control::after_exit`]; with the flag up it stops there
//! only if the point is consistent:
//!
//! - it was kicked out of user code (`cs.selector & 3 == 3`): the kernel is
//!   not half-way through anything, or
//! - it is in an `EventNotify` hypercall: the kernel publishes its tables
//!   before logging an event, so they agree with the page tables.
//!
//! Anywhere else (a console write, a scrub request, a kick that found the
//! kernel running) it resumes the guest and tries again at the next exit.
//! Once stopped, it publishes where it is and waits on a condition variable;
//! the query reads guest memory (nothing changes it meanwhile), answers, and
//! lets it go, unless someone asked for an explicit `pause` (or the run
//! started with `--paused`), which holds it until `resume`. A query that
//! finds no consistent point within [`PAUSE_TIMEOUT`] (a kernel spinning in
//! ring 0) fails with an error instead of hanging. Time spent held does not
//! count against the watchdog.
//!
//! Queries do not otherwise disturb the guest: they never write guest
//! memory, and the vCPU's registers are only read. When it holds the vCPU
//! at a consistent point, the vCPU thread also reads its CPU state through
//! KVM ([`crate::cpu::capture`]), so `inspect check` compares it with the
//! CPU design (`cpu-state-intact`) too; before the first instruction there
//! is no kernel CPU state to check, and after the guest stopped the state
//! the run ended with is used.

use crate::api::{ApiOptions, Server};
use crate::aps::Paused;
use crate::check::{KernelImage, TextBaseline};
use crate::cpu::{self, CpuCapture};
use crate::debug_trap::{Debugger, RFLAGS_TF};
use crate::inspect::{events_from, live_processes, EventsResult, Machine, MachineState, Point, TrapStop};
use crate::memory::GuestRam;
use crate::run::{GuestExit, RunReport};
use crate::session::{EventEntry, Session};
use crate::snapshot;
use kvm_ioctls::VcpuFd;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use superos_protocol::hypercall::{self as hc, BootHelloParams};
use superos_protocol::introspect::UserContext;

/// [`live_processes`] without the spec indices.
fn live_pml4s(machine: &Machine<'_>) -> std::collections::BTreeMap<u32, u64> {
    live_processes(machine).into_iter().map(|(pid, (pml4, _))| (pid, pml4)).collect()
}

/// Arms (or, with `on` false, disarms) KVM's single-step of `vcpu`, with
/// interrupts held off for the step where KVM can.
pub fn arm_single_step(vcpu: &VcpuFd, on: bool, hardware: &[u64]) -> Result<(), kvm_ioctls::Error> {
    use kvm_bindings::{
        kvm_guest_debug, KVM_GUESTDBG_BLOCKIRQ, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
        KVM_GUESTDBG_USE_HW_BP,
    };
    let with = |control: u32| {
        let mut debug = kvm_guest_debug { control, ..Default::default() };
        if !hardware.is_empty() {
            debug.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
            // DR0-3 the addresses, DR7 a local enable of each as an
            // instruction breakpoint (R/W and LEN 0).
            for (i, &addr) in hardware.iter().take(crate::debug_trap::HARDWARE_SLOTS).enumerate() {
                debug.arch.debugreg[i] = addr;
                debug.arch.debugreg[7] |= 1 << (2 * i);
            }
        }
        debug
    };
    if !on {
        return vcpu.set_guest_debug(&with(0));
    }
    vcpu.set_guest_debug(&with(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_BLOCKIRQ))
        .or_else(|_| vcpu.set_guest_debug(&with(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP)))
}

/// A vCPU stopped on a kernel `int3` (PVM's emulation failure) as the trap
/// frame the kernel would have reported (#BP, at the `int3`).
fn trap_context(regs: &kvm_bindings::kvm_regs, sregs: &kvm_bindings::kvm_sregs) -> UserContext {
    UserContext {
        r15: regs.r15,
        r14: regs.r14,
        r13: regs.r13,
        r12: regs.r12,
        r11: regs.r11,
        r10: regs.r10,
        r9: regs.r9,
        r8: regs.r8,
        rbp: regs.rbp,
        rdi: regs.rdi,
        rsi: regs.rsi,
        rdx: regs.rdx,
        rcx: regs.rcx,
        rbx: regs.rbx,
        rax: regs.rax,
        vector: 3,
        error_code: 0,
        rip: regs.rip,
        cs: u64::from(sregs.cs.selector),
        rflags: regs.rflags,
        rsp: regs.rsp,
        ss: u64::from(sregs.ss.selector),
    }
}

/// The vCPU registers of trap registers (the debugger's rewrite of them).
fn vcpu_registers(r: &UserContext) -> kvm_bindings::kvm_regs {
    kvm_bindings::kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

/// How long a query waits for the vCPU to reach a consistent point.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `quit` waits for a consistent point before it stops the guest
/// wherever it is.
const QUIT_GRACE: Duration = Duration::from_secs(1);
/// How often a waiting query kicks the vCPU again.
const KICK_INTERVAL: Duration = Duration::from_millis(5);

/// The vCPU thread, as far as kicking it is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vcpu {
    NotStarted,
    /// Running (its pthread id is valid while this is the state: the thread
    /// takes the lock to leave it).
    Running(libc::pthread_t),
    Finished,
}

#[derive(Debug)]
struct State {
    vcpu: Vcpu,
    /// Queries waiting for, or using, a held vCPU.
    queries: usize,
    /// `pause` (or `--paused`) is in force.
    explicit: bool,
    /// The connection whose `pause` is in force (`None`: `--paused`, or a
    /// caller without a connection).
    paused_by: Option<u64>,
    /// That connection has gone: the pause is held for at most
    /// [`Control::pause_lease`] after this (renewed by any request).
    orphaned_since: Option<Instant>,
    /// `quit` was asked for.
    quit: bool,
    /// When.
    quit_since: Option<Instant>,
    /// Some while the vCPU is held at a consistent point.
    held: Option<Point>,
    /// The vCPU thread is past its first hold point: the guest may have
    /// executed instructions. Until then a `--paused` guest is paused at
    /// [`Point::Boot`] whether or not the thread has reached it yet.
    guest_entered: bool,
    /// Where the vCPU was held when `quit` stopped it.
    quit_at: Option<Point>,
    held_since: Option<Instant>,
    held_total: Duration,
    /// Set when the guest has stopped for good: why.
    finished: Option<String>,
    /// The kernel's shutdown status, if it shut down (for gdb's `exited`).
    exit_code: Option<u8>,
    /// The CR3 of the user code `quit` stopped it in, if any.
    finished_cr3: Option<u64>,
    /// The VMM stays up after the guest has finished.
    lingering: bool,
    hello: Option<BootHelloParams>,
    baseline: Option<TextBaseline>,
    events: Vec<EventEntry>,
    /// Every vCPU's state, read where the vCPUs are held.
    held_cpus: Vec<CpuCapture>,
    /// Every vCPU's state the run ended with (empty if none).
    final_cpus: Vec<CpuCapture>,
    /// What a debugger (the gdb stub) asked for.
    debug: Debugger,
    /// The program each boot process runs, by spec index.
    programs: Vec<String>,
    /// Why this host takes no kernel breakpoint, if it does not.
    kernel_breakpoints_refused: Option<String>,
    /// Why this run takes no hardware breakpoint, if it does not.
    hardware_breakpoints_refused: Option<String>,
}

/// The shared state of the pause handshake (one per run with `--api`).
#[derive(Debug)]
pub struct Control {
    state: Mutex<State>,
    changed: Condvar,
    /// A pause or quit is wanted: the vCPU thread looks at the state.
    attention: AtomicBool,
    /// Events already copied from the session (vCPU thread only).
    published: AtomicUsize,
    /// Connections the control socket is serving.
    clients: AtomicUsize,
    /// How long a pause outlives the connection that asked for it (with no
    /// request from anyone in between).
    pause_lease: Mutex<Duration>,
    ram: GuestRam,
    usable: Vec<(u64, u64)>,
    image: KernelImage,
}

/// What a control request did, in words.
pub type Outcome = Result<String, String>;

/// How long a `pause` outlives the connection that asked for it, with no
/// request on the socket from anyone in between: `inspect pause` then
/// `inspect ps` (each its own connection) keep working, and a client that
/// paused the guest and vanished holds it for this long at most.
pub const PAUSE_LEASE: Duration = Duration::from_secs(60);

impl Control {
    /// A control for a run over `ram` (another handle to the guest's memory)
    /// whose usable RAM is `usable`. With `paused` the vCPU is held before
    /// its first instruction until `resume`.
    pub fn new(ram: GuestRam, usable: Vec<(u64, u64)>, paused: bool) -> Control {
        Control {
            state: Mutex::new(State {
                vcpu: Vcpu::NotStarted,
                queries: 0,
                explicit: paused,
                paused_by: None,
                orphaned_since: None,
                quit: false,
                quit_since: None,
                held: None,
                guest_entered: false,
                quit_at: None,
                held_since: None,
                held_total: Duration::ZERO,
                finished: None,
                exit_code: None,
                finished_cr3: None,
                lingering: false,
                hello: None,
                baseline: None,
                events: Vec::new(),
                held_cpus: Vec::new(),
                final_cpus: Vec::new(),
                debug: Debugger::default(),
                programs: Vec::new(),
                kernel_breakpoints_refused: None,
                hardware_breakpoints_refused: None,
            }),
            changed: Condvar::new(),
            attention: AtomicBool::new(paused),
            published: AtomicUsize::new(0),
            clients: AtomicUsize::new(0),
            pause_lease: Mutex::new(PAUSE_LEASE),
            ram,
            usable,
            image: KernelImage::default(),
        }
    }

    /// What the VMM knows of the kernel image it loaded, for the queries.
    pub fn with_image(mut self, image: KernelImage) -> Control {
        self.image = image;
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated
        // in a way that matters more than stopping would.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>, timeout: Duration) -> MutexGuard<'a, State> {
        match self.changed.wait_timeout(guard, timeout) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }

    fn settle(&self, state: &State) {
        self.attention.store(state.queries > 0 || state.explicit || state.quit, Ordering::SeqCst);
    }

    /// Kicks the vCPU thread out of `KVM_RUN` if it is running.
    fn kick(state: &State) {
        if let Vcpu::Running(thread) = state.vcpu {
            // The vCPU thread leaves the Running state under this same lock (held
            // by our caller) before it exits; the kick handler was installed
            // before it started (`run::install_kick_handler`).
            // SAFETY: so `thread` is a live thread and the signal is handled.
            unsafe { libc::pthread_kill(thread, crate::run::kick_signal()) };
        }
    }

    // --- The vCPU thread's side. ---

    /// The vCPU thread has started; `thread` is its pthread id.
    pub fn vcpu_started(&self, thread: libc::pthread_t) {
        self.lock().vcpu = Vcpu::Running(thread);
    }

    /// The vCPU thread is about to end (no kicks after this).
    pub fn vcpu_exited(&self) {
        let mut state = self.lock();
        state.vcpu = Vcpu::Finished;
        self.changed.notify_all();
    }

    /// Copies what is new in the session (events, the boot hello, the text
    /// baseline) into the shared state.
    fn publish(&self, state: &mut State, session: &Session<'_>) {
        let published = self.published.load(Ordering::SeqCst);
        if session.events.len() > published {
            let new = &session.events[published..];
            if state.debug.attached {
                // Before the new process's first instruction (the kernel
                // logs its spawn before it runs it): the debugger's
                // breakpoints go in.
                for entry in new {
                    if let superos_protocol::event::Event::ProcessSpawned { pid, pml4_gpa, spec_index } =
                        entry.event
                    {
                        if let Some(program) = state.programs.get(spec_index as usize).cloned() {
                            state.debug.plant_in(&self.ram, pid, pml4_gpa, &program);
                        }
                    }
                }
            }
            state.events.extend_from_slice(new);
            self.published.store(session.events.len(), Ordering::SeqCst);
        }
        if state.hello.is_none() && session.hello.is_some() {
            state.hello = session.hello;
            state.baseline = session.monitor.as_ref().and_then(|m| m.checker.text_baseline().cloned());
            // The kernel can report a breakpoint from now on.
            if let Err(error) = state.debug.plant_kernel(&self.ram) {
                tracing::warn!(%error, "a kernel breakpoint could not be planted");
            }
        }
    }

    /// Before the first instruction: holds the vCPU there if a pause is
    /// wanted (`--paused`, `--gdb-wait`); `cpus` is its state there (the
    /// bootstrap vCPU's: the others have not started). True if the guest
    /// must not run (`quit`).
    pub fn before_start(&self, session: &Session<'_>, cpus: impl FnOnce() -> Vec<CpuCapture>) -> bool {
        let quit = self.attention.load(Ordering::SeqCst) && self.hold(Point::Boot, session, cpus());
        self.lock().guest_entered = true;
        quit
    }

    /// After a VM exit the run loop is about to resume from. Publishes new
    /// events; if a pause is wanted and this is a consistent point (`event`:
    /// the exit was an `EventNotify` hypercall; or the vCPU is in ring 3 and
    /// `others_quiet`: every other vCPU in ring 3 or idle), holds the vCPU
    /// until the queries are done. True if the guest must stop (`quit`).
    pub fn after_exit(
        &self,
        vcpu: &VcpuFd,
        aps: Option<&Paused<'_>>,
        session: &Session<'_>,
        event: bool,
        others_quiet: bool,
    ) -> bool {
        if session.events.len() > self.published.load(Ordering::SeqCst) {
            let mut state = self.lock();
            self.publish(&mut state, session);
            self.changed.notify_all();
        }
        if !self.attention.load(Ordering::SeqCst) {
            return false;
        }
        let point = if event {
            session.events.last().map(|entry| Point::Event { seq: entry.seq })
        } else {
            match (vcpu.get_sregs(), vcpu.get_regs()) {
                (Ok(sregs), Ok(regs)) if sregs.cs.selector & 3 == 3 && others_quiet => {
                    Some(Point::Ring3 { rip: regs.rip, cr3: sregs.cr3 })
                }
                _ => None,
            }
        };
        {
            // `quit` stops the guest at a consistent point too (so a
            // snapshot of it is consistent), or after QUIT_GRACE anyway.
            let mut state = self.lock();
            if let Some(since) = state.quit_since {
                if point.is_some() || since.elapsed() >= QUIT_GRACE {
                    state.quit_at = point;
                    return true;
                }
                return false;
            }
        }
        match point {
            Some(point) => self.hold_vcpus(point, vcpu, aps, session),
            None => false,
        }
    }

    /// Holds the vCPU at `point` (its CPU state `cpu`) while queries or an
    /// explicit pause want it.
    fn hold(&self, point: Point, session: &Session<'_>, cpus: Vec<CpuCapture>) -> bool {
        let mut state = self.lock();
        self.publish(&mut state, session);
        if state.quit {
            return true;
        }
        if state.queries == 0 && !state.explicit {
            self.settle(&state);
            return false;
        }
        state.held = Some(point);
        state.held_cpus = cpus;
        state.held_since = Some(Instant::now());
        self.changed.notify_all();
        while (state.queries > 0 || state.explicit) && !state.quit {
            state = self.wait(state, Duration::from_secs(1));
        }
        let point = state.held.take();
        state.held_cpus = Vec::new();
        if state.quit {
            state.quit_at = point;
        }
        if let Some(since) = state.held_since.take() {
            state.held_total += since.elapsed();
        }
        self.settle(&state);
        self.changed.notify_all();
        state.quit
    }

    /// A debug trap the kernel reported: if an attached debugger asked for
    /// it (an `int3` it inserted, a step it asked for), holds the guest
    /// there (`vcpu` the bootstrap vCPU, the others through `aps`) until the
    /// debugger resumes it, and returns how the process resumes
    /// (`DEBUG_ACTION_*`, at `rip`); `None` for a trap no debugger asked for
    /// (the kernel kills the process) or when the guest is to stop (`quit`
    /// while held: [`Control::quitting`]).
    pub fn debug_trap(
        &self,
        trap: &crate::hypercall::DebugTrap,
        vcpu: &VcpuFd,
        aps: Option<&Paused<'_>>,
        session: &Session<'_>,
    ) -> Option<(u32, u64, Option<UserContext>)> {
        let params = trap.params;
        let stop = {
            let mut state = self.lock();
            let Some(stop) = state.debug.claim(params.pid, params.cpu, &params.registers) else {
                // A step a debugger set up and left before it was taken:
                // the process goes on as if it had not been asked.
                return state
                    .debug
                    .take_abandoned_step(params.pid, params.cpu, &params.registers)
                    .then_some((hc::DEBUG_ACTION_CONTINUE, params.registers.rip, None));
            };
            state.debug.trap = Some(stop);
            state.debug.reported = false;
            state.debug.action = None;
            self.pause_for_debugger(&mut state);
            stop
        };
        let rip = stop.registers.rip;
        let quit = self.hold_vcpus(Point::Trap { pid: params.pid, cpu: params.cpu, rip }, vcpu, aps, session);
        let mut state = self.lock();
        // Where and with what it resumes: the registers as the debugger
        // left them (it may have rewritten them, `rip` included).
        let held = state.debug.trap.take().map_or(stop.registers, |trap| trap.registers);
        let written = std::mem::take(&mut state.debug.registers_written).then_some(held);
        let action = state.debug.action.take().unwrap_or(hc::DEBUG_ACTION_CONTINUE);
        (!quit).then_some((action, held.rip, written))
    }

    /// gdb rewrote the registers of `thread` (a process by pid, or the
    /// kernel on a CPU: [`crate::debug_trap::KERNEL_PID`] and the CPU) held
    /// at a debug trap: the general registers, the RIP and the status
    /// flags of RFLAGS ([`hc::DEBUG_WRITABLE_RFLAGS`]) are taken, the rest
    /// is the trap's. An error for anything not held at a trap.
    pub fn write_trap_registers(&self, pid: u32, cpu: Option<u32>, new: &UserContext) -> Result<(), String> {
        let mut state = self.lock();
        let held = state.held.is_some();
        let Some(trap) =
            state.debug.trap.as_mut().filter(|t| held && t.pid == pid && cpu.is_none_or(|c| c == t.cpu))
        else {
            return Err(match cpu {
                Some(cpu) => {
                    format!("vCPU {cpu} is not held at a kernel breakpoint or step: its registers are KVM's")
                }
                None => format!(
                    "pid {pid} is not held at a breakpoint or a step: only there are its registers written"
                ),
            });
        };
        let old = trap.registers;
        let flags = (old.rflags & !hc::DEBUG_WRITABLE_RFLAGS) | (new.rflags & hc::DEBUG_WRITABLE_RFLAGS);
        let in_half = if pid == crate::debug_trap::KERNEL_PID {
            new.rip >= superos_protocol::layout::KERNEL_HALF_START
        } else {
            new.rip < superos_protocol::layout::USER_HALF_END
        };
        if !in_half {
            return Err(format!("rip {:#x} is not in the half the trapped code runs in", new.rip));
        }
        trap.registers = UserContext {
            vector: old.vector,
            error_code: old.error_code,
            cs: old.cs,
            ss: old.ss,
            rflags: flags,
            ..*new
        };
        state.debug.registers_written = true;
        Ok(())
    }

    /// Pauses the guest for the debugger (as its `pause` would), at the hold
    /// the caller is about to enter.
    fn pause_for_debugger(&self, state: &mut State) {
        state.explicit = true;
        state.paused_by = None;
        state.orphaned_since = None;
        self.attention.store(true, Ordering::SeqCst);
    }

    /// Holds the vCPUs at `point` (reading each one's state there: `vcpu`
    /// the bootstrap one, the others through `aps`), then arms the steps the
    /// debugger asked for meanwhile. True if the guest must stop (`quit`).
    fn hold_vcpus(
        &self,
        point: Point,
        vcpu: &VcpuFd,
        aps: Option<&Paused<'_>>,
        session: &Session<'_>,
    ) -> bool {
        let at = point.to_string();
        let mut cpus = vec![CpuCapture { cpu: 0, at: at.clone(), state: cpu::capture(vcpu) }];
        cpus.extend(aps.map(|aps| aps.capture(&at)).unwrap_or_default());
        let quit = self.hold(point, session, cpus);
        self.apply_vcpu_steps(vcpu, aps);
        quit
    }

    /// A debugger attached: traps it asks for will be held for it.
    pub fn attach_debugger(&self) {
        let mut state = self.lock();
        state.debug = std::mem::take(&mut state.debug).succeeded(true);
    }

    /// The debugger left: its breakpoints come out of the guest (with the
    /// guest held, or at once if it has stopped) and no trap is held for it
    /// any more.
    pub fn detach_debugger(&self) {
        let live = self.query(live_pml4s).unwrap_or_default();
        let mut state = self.lock();
        state.debug.remove_all(&self.ram, &live);
        state.debug = std::mem::take(&mut state.debug).succeeded(false);
    }

    /// Names the program each boot process runs (by spec index), for
    /// breakpoints ([`Control::insert_breakpoint`]).
    pub fn set_programs(&self, programs: Vec<String>) {
        self.lock().programs = programs;
    }

    /// The program process `pid` runs, if it is live and known.
    pub fn program_of(&self, pid: u32) -> Option<String> {
        let spec = self.query(|machine| live_processes(machine).get(&pid).map(|&(_, spec)| spec)).ok()??;
        self.lock().programs.get(spec).cloned()
    }

    /// The programs boot processes run, each once.
    pub fn program_names(&self) -> Vec<String> {
        let mut names = self.lock().programs.clone();
        names.sort();
        names.dedup();
        names
    }

    /// A breakpoint at `addr` in `program`: in every live process of it
    /// that has user code there, and in every one spawned while it stays;
    /// how many live processes took it now.
    pub fn insert_breakpoint(&self, addr: u64, program: &str) -> Result<usize, String> {
        if !self.lock().programs.iter().any(|p| p == program) {
            return Err(format!("no process of this run runs a program named {program}"));
        }
        self.query(|machine| {
            let live = live_processes(machine);
            let mut state = self.lock();
            let ours: Vec<(u32, u64)> = live
                .iter()
                .filter(|(_, &(_, spec))| state.programs.get(spec).is_some_and(|p| p == program))
                .map(|(&pid, &(pml4, _))| (pid, pml4))
                .collect();
            state.debug.insert(machine.ram, addr, program, &ours)
        })?
    }

    /// A breakpoint at kernel address `addr` (in its text, past its debug
    /// path: [`superos_protocol::cpu::symbols::DEBUG_PATH_END`]).
    pub fn insert_kernel_breakpoint(&self, addr: u64) -> Result<(), String> {
        use superos_protocol::cpu::symbols;
        let symbol = |name: &str| {
            self.image
                .symbols
                .get(name)
                .copied()
                .ok_or_else(|| format!("the kernel ELF has no symbol {name}"))
        };
        if let Some(why) = self.lock().kernel_breakpoints_refused.clone() {
            return Err(why);
        }
        let breakable = symbol(symbols::DEBUG_PATH_END)?..symbol(symbols::TEXT_END)?;
        self.query(|machine| {
            let mut state = self.lock();
            let ready = state.hello.is_some();
            state.debug.insert_kernel(machine.ram, addr, breakable, ready)
        })?
    }

    /// This host takes no kernel breakpoint, for `why`.
    pub fn refuse_kernel_breakpoints(&self, why: String) {
        self.lock().kernel_breakpoints_refused = Some(why);
    }

    /// The bytes of kernel text the debugger replaced (the checker's view
    /// of them: [`crate::debug_trap::TextPatches`]).
    pub fn text_patches(&self) -> crate::debug_trap::TextPatches {
        self.lock().debug.patches.clone()
    }

    /// The debugger wants the kernel held at a kernel trap on `cpu` to take
    /// one step: the trap flag in the kernel's answer, or, where the vCPU
    /// itself stopped at the breakpoint (the PVM host), KVM's single-step.
    pub fn step_kernel_at_trap(&self, cpu: u32) {
        let mut state = self.lock();
        if state.debug.vcpu_trap {
            state.debug.kernel_step = true;
        } else {
            state.debug.expect_kernel_step(cpu);
        }
    }

    /// Whether the bootstrap vCPU, stopped at `rip`, stopped at a kernel
    /// breakpoint (on the PVM host: an emulation failure at its `int3`).
    pub fn kernel_breakpoint_at(&self, rip: u64) -> bool {
        self.lock().debug.kernel_breakpoint_at(&self.ram, rip)
    }

    /// The bootstrap vCPU (`vcpu`) stopped at a kernel breakpoint itself
    /// (the PVM host's ring-0 emulator cannot execute the `int3`): holds the
    /// guest there until the debugger resumes it, with the vCPU's registers
    /// as the trap's. The vCPU resumes at the breakpoint's address: the
    /// debugger takes the `int3` out first (as gdb does), or it stops there
    /// again. True if the guest must stop (`quit`).
    pub fn vcpu_kernel_breakpoint(
        &self,
        vcpu: &VcpuFd,
        aps: Option<&Paused<'_>>,
        session: &Session<'_>,
    ) -> bool {
        let (Ok(regs), Ok(sregs)) = (vcpu.get_regs(), vcpu.get_sregs()) else { return false };
        let registers = trap_context(&regs, &sregs);
        {
            let mut state = self.lock();
            let kind = crate::inspect::TrapKind::Breakpoint;
            state.debug.trap = Some(TrapStop { pid: crate::debug_trap::KERNEL_PID, cpu: 0, kind, registers });
            state.debug.reported = false;
            state.debug.action = None;
            state.debug.vcpu_trap = true;
            self.pause_for_debugger(&mut state);
        }
        let point = Point::Trap { pid: crate::debug_trap::KERNEL_PID, cpu: 0, rip: regs.rip };
        let quit = self.hold_vcpus(point, vcpu, aps, session);
        let mut state = self.lock();
        let held = state.debug.trap.take();
        state.debug.vcpu_trap = false;
        state.debug.action = None;
        if let (true, Some(trap)) = (std::mem::take(&mut state.debug.registers_written), held) {
            let rewritten = vcpu_registers(&trap.registers);
            if let Err(error) = vcpu.set_regs(&rewritten) {
                tracing::warn!(%error, "the registers gdb wrote could not be given to vCPU 0");
            }
        }
        quit
    }

    /// No breakpoint at `addr` any more; false if there was none.
    pub fn remove_breakpoint(&self, addr: u64) -> Result<bool, String> {
        self.query(|machine| {
            let live = live_pml4s(machine);
            self.lock().debug.remove(machine.ram, addr, &live)
        })
    }

    /// The debugger wants `pid`'s next debug exception (a step it set up).
    pub fn expect_step(&self, pid: u32) {
        self.lock().debug.expect_step(pid);
    }

    /// Sets the trap flag wherever process `pid`'s registers are (the
    /// context the kernel keeps for it, the frame at the top of a kernel
    /// stack, or a vCPU that runs it in ring 3, which its thread sets when
    /// the guest resumes), so that it takes one step and traps.
    pub fn arm_step(&self, pid: u32) -> Result<(), String> {
        use crate::inspect::{Analysis, RegisterHome};
        let home =
            self.query(|machine| crate::inspect::register_home(&Analysis::new(machine), machine, pid))??;
        let gpa = match home {
            RegisterHome::Trap(_) => {
                return Err(format!("pid {pid} is held at its trap: its answer steps it"))
            }
            RegisterHome::Vcpu { cpu } => {
                self.lock().debug.vcpu_steps.push(cpu);
                return Ok(());
            }
            RegisterHome::Kept { gpa } | RegisterHome::KernelStack { gpa, .. } => gpa,
        };
        let at = gpa + std::mem::offset_of!(UserContext, rflags) as u64;
        let rflags = self.ram.read::<u64>(at).map_err(|e| e.to_string())?;
        self.ram.write_bytes(at, &(rflags | RFLAGS_TF).to_le_bytes()).map_err(|e| e.to_string())
    }

    /// The debugger wants the bootstrap vCPU to take one step of whatever
    /// it runs (the kernel too) when the guest resumes.
    pub fn request_kernel_step(&self) {
        self.lock().debug.kernel_step = true;
    }

    /// The bootstrap vCPU's debug exit is the step a debugger armed (or
    /// armed and left behind).
    pub fn kernel_step_armed(&self) -> bool {
        let state = self.lock();
        state.debug.kernel_step_armed || state.debug.abandoned_kernel_step
    }

    /// The armed step completed (`vcpu` is the bootstrap vCPU, already
    /// out of single-stepping): holds the guest there until the debugger
    /// resumes it. True if the guest must stop (`quit`).
    pub fn kernel_step_done(&self, vcpu: &VcpuFd, aps: Option<&Paused<'_>>, session: &Session<'_>) -> bool {
        {
            let mut state = self.lock();
            if std::mem::take(&mut state.debug.abandoned_kernel_step) && !state.debug.kernel_step_armed {
                // Its debugger left: nobody to hold the guest for.
                return false;
            }
            state.debug.kernel_step_armed = false;
            state.debug.kernel_step_done = true;
            self.pause_for_debugger(&mut state);
        }
        let rip = vcpu.get_regs().map_or(0, |regs| regs.rip);
        let quit = self.hold_vcpus(Point::Step { cpu: 0, rip }, vcpu, aps, session);
        self.lock().debug.kernel_step_done = false;
        quit
    }

    /// The hardware breakpoints armed in the bootstrap vCPU (its guest
    /// debugging keeps them when a step is switched off).
    pub fn hardware_breakpoints(&self) -> Vec<u64> {
        self.lock().debug.hardware.clone()
    }

    /// A hardware breakpoint at kernel address `addr`, in the bootstrap
    /// vCPU (armed when the guest resumes).
    pub fn insert_hardware_breakpoint(&self, addr: u64) -> Result<(), String> {
        let mut state = self.lock();
        if let Some(why) = state.hardware_breakpoints_refused.clone() {
            return Err(why);
        }
        state.debug.insert_hardware(addr)
    }

    /// No hardware breakpoint at `addr` any more; false if there was none.
    pub fn remove_hardware_breakpoint(&self, addr: u64) -> bool {
        self.lock().debug.remove_hardware(addr)
    }

    /// This run takes no hardware breakpoint, for `why`.
    pub fn refuse_hardware_breakpoints(&self, why: String) {
        self.lock().hardware_breakpoints_refused = Some(why);
    }

    /// The bootstrap vCPU met a hardware breakpoint (`vcpu`, its debug exit
    /// handled): holds the guest there until the debugger resumes it. True
    /// if the guest must stop (`quit`).
    pub fn hardware_breakpoint_hit(
        &self,
        vcpu: &VcpuFd,
        aps: Option<&Paused<'_>>,
        session: &Session<'_>,
    ) -> bool {
        {
            let mut state = self.lock();
            if !state.debug.attached || state.debug.hardware.is_empty() {
                // Its debugger left while the guest ran: switched off.
                state.debug.hardware_changed = false;
                if let Err(error) = arm_single_step(vcpu, false, &state.debug.hardware) {
                    tracing::warn!(%error, "could not switch vCPU 0's hardware breakpoints off");
                }
                return false;
            }
            state.debug.hardware_hit = true;
            self.pause_for_debugger(&mut state);
        }
        let rip = vcpu.get_regs().map_or(0, |regs| regs.rip);
        let quit = self.hold_vcpus(Point::HardwareBreakpoint { cpu: 0, rip }, vcpu, aps, session);
        self.lock().debug.hardware_hit = false;
        quit
    }

    /// The hardware breakpoint the debugger has not been told of, once.
    pub fn take_hardware_breakpoint_report(&self) -> bool {
        let mut state = self.lock();
        state.held.is_some() && std::mem::take(&mut state.debug.hardware_hit)
    }

    /// The completed kernel step the debugger has not been told of, once.
    pub fn take_kernel_step_report(&self) -> bool {
        let mut state = self.lock();
        if state.held.is_some() && state.debug.kernel_step_done {
            state.debug.kernel_step_done = false;
            return true;
        }
        false
    }

    /// Sets the trap flag in the vCPUs [`Control::arm_step`] named (the
    /// bootstrap vCPU `vcpu`, the others through `aps`), and arms KVM's
    /// single-step on the bootstrap vCPU if the debugger asked for a kernel
    /// step; called by the bootstrap thread when a hold ends.
    pub fn apply_vcpu_steps(&self, vcpu: &VcpuFd, aps: Option<&Paused<'_>>) {
        let (step, hardware) = {
            let mut state = self.lock();
            let changed = std::mem::take(&mut state.debug.hardware_changed);
            let step = std::mem::take(&mut state.debug.kernel_step);
            (step, (step || changed).then(|| state.debug.hardware.clone()))
        };
        if let Some(hardware) = hardware {
            match arm_single_step(vcpu, step, &hardware) {
                Ok(()) => self.lock().debug.kernel_step_armed |= step,
                Err(error) => tracing::warn!(%error, step, "could not set vCPU 0's guest debugging"),
            }
        }
        let cpus = std::mem::take(&mut self.lock().debug.vcpu_steps);
        let arm = |cpu: u32, vcpu: &VcpuFd| {
            let armed = vcpu.get_regs().and_then(|mut regs| {
                regs.rflags |= RFLAGS_TF;
                vcpu.set_regs(&regs)
            });
            if let Err(error) = armed {
                tracing::warn!(cpu, %error, "could not set the trap flag for a step");
            }
        };
        for cpu in cpus {
            if cpu == 0 {
                arm(0, vcpu);
            } else if let Some((_, ap)) = aps.and_then(|aps| aps.vcpus().find(|(n, _)| *n == cpu)) {
                arm(cpu, &ap);
            }
        }
    }

    /// How the process held at a trap resumes when the guest is next
    /// resumed (`DEBUG_ACTION_*`).
    pub fn set_trap_action(&self, action: u32) {
        self.lock().debug.action = Some(action);
    }

    /// The trap the guest is held at, once (`None` after the first call for
    /// the same trap, or when not held at one).
    pub fn take_trap_report(&self) -> Option<TrapStop> {
        let mut state = self.lock();
        if state.held.is_none() || state.debug.reported {
            return None;
        }
        let trap = state.debug.trap?;
        state.debug.reported = true;
        Some(trap)
    }

    /// The trap the guest is held at, if it is.
    pub fn held_trap(&self) -> Option<TrapStop> {
        let state = self.lock();
        state.debug.trap.filter(|_| state.held.is_some())
    }

    /// Time the vCPU has been held so far (the watchdog does not count it).
    pub fn held_time(&self) -> Duration {
        let state = self.lock();
        state.held_total + state.held_since.map_or(Duration::ZERO, |since| since.elapsed())
    }

    // --- The run's side, at the end. ---

    /// The guest has stopped for good (`exit` says why): queries now read
    /// the final state without holding anything.
    pub fn finish(
        &self,
        events: &[EventEntry],
        hello: Option<BootHelloParams>,
        baseline: Option<TextBaseline>,
        cpus: Vec<CpuCapture>,
        exit: String,
        lingering: bool,
    ) {
        let mut state = self.lock();
        state.events = events.to_vec();
        state.hello = hello;
        state.baseline = baseline;
        state.final_cpus = cpus;
        state.finished = Some(exit);
        state.finished_cr3 = match state.quit_at {
            Some(Point::Ring3 { cr3, .. }) => Some(cr3),
            _ => None,
        };
        state.lingering = lingering;
        state.vcpu = Vcpu::Finished;
        self.changed.notify_all();
    }

    /// The kernel's shutdown status, before [`Control::finish`]: what
    /// [`Control::ended`] reports (`None`: it did not shut down).
    pub fn set_exit_code(&self, code: Option<u8>) {
        self.lock().exit_code = code;
    }

    /// `None` while the guest runs; once it has stopped, its shutdown
    /// status (`None` inside: it did not shut down, it was stopped).
    pub fn ended(&self) -> Option<Option<u8>> {
        let state = self.lock();
        state.finished.as_ref().map(|_| state.exit_code)
    }

    /// Waits until someone asks to quit.
    pub fn wait_for_quit(&self) {
        let mut state = self.lock();
        // SIGINT/SIGTERM end a linger too.
        while !state.quit && crate::interrupt::received().is_none() {
            state = self.wait(state, Duration::from_millis(100));
        }
    }

    /// True once `quit` was asked for.
    pub fn quitting(&self) -> bool {
        self.lock().quit
    }

    /// Where the vCPU was held when `quit` stopped the guest, if it was.
    pub fn quit_at(&self) -> Option<Point> {
        self.lock().quit_at.clone()
    }

    // --- The control socket's side. ---

    fn machine_state(&self, state: &State) -> MachineState {
        let (point, cpus) = match (&state.finished, &state.held) {
            (Some(exit), _) => {
                (Point::Finished { exit: exit.clone(), cr3: state.finished_cr3 }, state.final_cpus.clone())
            }
            (None, Some(point)) => (point.clone(), state.held_cpus.clone()),
            (None, None) => (Point::Boot, Vec::new()),
        };
        MachineState {
            hello: state.hello,
            usable: self.usable.clone(),
            baseline: state.baseline.clone(),
            events: state.events.clone(),
            point,
            image: self.image.clone(),
            cpus,
            trap: state.debug.trap.filter(|_| state.held.is_some() && state.finished.is_none()),
            text_patches: state.debug.patches.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }

    /// Waits (kicking) until the vCPU is held or finished. Counts as a query
    /// until [`Control::release`].
    fn acquire(&self) -> Result<MutexGuard<'_, State>, String> {
        let mut state = self.lock();
        if state.quit && state.finished.is_none() {
            return Err("the VMM is stopping the guest (quit)".into());
        }
        state.queries += 1;
        self.settle(&state);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while state.held.is_none() && state.finished.is_none() {
            if Instant::now() >= deadline {
                state.queries -= 1;
                self.settle(&state);
                self.changed.notify_all();
                return Err(format!(
                    "the vCPU did not reach a consistent point (user code or a kernel event) within {} s; the kernel may be busy in ring 0",
                    PAUSE_TIMEOUT.as_secs()
                ));
            }
            Self::kick(&state);
            state = self.wait(state, KICK_INTERVAL);
        }
        Ok(state)
    }

    fn release(&self) {
        let mut state = self.lock();
        state.queries = state.queries.saturating_sub(1);
        self.settle(&state);
        self.changed.notify_all();
    }

    /// Runs `query` on a consistent view: with the vCPU held at a consistent
    /// point, or on the finished machine.
    pub fn query<R>(&self, query: impl FnOnce(&Machine<'_>) -> R) -> Result<R, String> {
        let state = self.acquire()?;
        let machine_state = self.machine_state(&state);
        drop(state);
        let result = query(&Machine { ram: &self.ram, state: &machine_state });
        self.release();
        Ok(result)
    }

    /// `pause`: holds the vCPU at the next consistent point until `resume`.
    pub fn pause(&self) -> Outcome {
        self.pause_by(None)
    }

    /// `pause` from connection `client` (see [`Control::client_gone`]).
    pub fn pause_by(&self, client: Option<u64>) -> Outcome {
        let mut state = self.acquire()?;
        let message = if state.finished.is_some() {
            format!("the guest has already stopped: {}", self.machine_state(&state).point)
        } else {
            state.explicit = true;
            state.paused_by = client;
            state.orphaned_since = None;
            format!("paused {}", self.machine_state(&state).point)
        };
        drop(state);
        self.release();
        Ok(message)
    }

    /// `resume`: lets an explicitly paused vCPU go.
    pub fn resume(&self) -> Outcome {
        let mut state = self.lock();
        if let Some(exit) = &state.finished {
            return Err(format!("the guest has stopped ({exit}); nothing to resume"));
        }
        if !state.explicit {
            return Err("the guest is not paused".into());
        }
        state.explicit = false;
        state.paused_by = None;
        state.orphaned_since = None;
        let at = self.machine_state(&state).point;
        self.settle(&state);
        self.changed.notify_all();
        Ok(format!("resumed (was paused {at})"))
    }

    /// `quit`: stops the guest if it is still running (at the next
    /// consistent point, or at any VM exit after a second) and ends
    /// the VMM.
    pub fn quit(&self) -> Outcome {
        let mut state = self.lock();
        let was_running = state.finished.is_none();
        state.quit = true;
        state.quit_since.get_or_insert_with(Instant::now);
        self.settle(&state);
        self.changed.notify_all();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while matches!(state.vcpu, Vcpu::Running(_)) && Instant::now() < deadline {
            Self::kick(&state);
            state = self.wait(state, KICK_INTERVAL);
        }
        Ok(match (&state.finished, state.vcpu) {
            // This quit stopped it (the run may have finished meanwhile).
            (Some(_), _) if was_running => "quitting; the guest was stopped".into(),
            (Some(exit), _) => format!("quitting; the guest had stopped ({exit})"),
            (None, Vcpu::Running(_)) => {
                "quitting; the guest has not stopped yet (it will at its next VM exit)".into()
            }
            (None, _) => "quitting; the guest was stopped".into(),
        })
    }

    /// Sets how long a pause outlives its connection ([`PAUSE_LEASE`]).
    pub fn set_pause_lease(&self, lease: Duration) {
        *self.pause_lease.lock().unwrap_or_else(|p| p.into_inner()) = lease;
    }

    fn pause_lease(&self) -> Duration {
        *self.pause_lease.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request arrived on the socket: an orphaned pause's lease starts
    /// again.
    pub fn touch(&self) {
        let mut state = self.lock();
        if state.orphaned_since.is_some() {
            state.orphaned_since = Some(Instant::now());
        }
    }

    /// Connection `client` has gone: if its `pause` is in force, the pause
    /// now lasts at most [`PAUSE_LEASE`] without any request.
    pub fn client_gone(&self, client: u64) {
        let mut state = self.lock();
        if state.explicit && state.paused_by == Some(client) {
            state.orphaned_since = Some(Instant::now());
        }
    }

    /// Releases a pause whose connection has gone and whose lease ran out;
    /// true if it did (the server calls this as it polls).
    pub fn expire_pause(&self) -> bool {
        let lease = self.pause_lease();
        let mut state = self.lock();
        let expired = state.explicit
            && state.finished.is_none()
            && state.orphaned_since.is_some_and(|since| since.elapsed() >= lease);
        if expired {
            state.explicit = false;
            state.paused_by = None;
            state.orphaned_since = None;
            self.settle(&state);
            self.changed.notify_all();
            drop(state);
            eprintln!(
                "superos-vmm: the client that paused the guest left {:.0} s ago and nobody asked anything since: resumed",
                lease.as_secs_f64()
            );
        }
        expired
    }

    /// A client connected to the control socket.
    pub fn client_connected(&self) {
        self.clients.fetch_add(1, Ordering::SeqCst);
    }

    /// A client left.
    pub fn client_left(&self) {
        self.clients.fetch_sub(1, Ordering::SeqCst);
    }

    /// Clients connected now (the one asking included).
    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::SeqCst)
    }

    /// `status`: where the guest is.
    pub fn status(&self) -> (String, String) {
        let state = self.lock();
        let events = state.events.len();
        match (&state.finished, &state.held, state.explicit) {
            (Some(exit), _, _) => (
                "finished".into(),
                format!(
                    "the guest has stopped ({exit}); {events} events{}",
                    if state.lingering { "; the VMM lingers until `inspect quit`" } else { "" }
                ),
            ),
            (None, Some(point), true) => ("paused".into(), format!("paused {point}; {events} events so far")),
            // `--paused`, and the vCPU thread has not reached its first hold
            // yet: nothing has run, nothing will until `resume`.
            (None, None, true) if !state.guest_entered => {
                ("paused".into(), format!("paused {}; {events} events so far", Point::Boot))
            }
            (None, None, true) => {
                ("pausing".into(), format!("pausing at the next consistent point; {events} events so far"))
            }
            (None, _, false) => ("running".into(), format!("running; {events} events so far")),
        }
    }

    /// The events from position `since` on, waiting up to `wait` for at
    /// least one if there are none yet (and the guest still runs).
    pub fn events(&self, since: u64, wait: Duration) -> EventsResult {
        let deadline = Instant::now() + wait;
        let mut state = self.lock();
        while state.events.len() as u64 <= since && state.finished.is_none() && !state.quit {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = self.wait(state, deadline - now);
        }
        events_from(&state.events, since, state.finished.clone())
    }
}

/// What a run does besides the plain [`crate::run::run`]: serve the control
/// socket and write a snapshot when the guest stops.
#[derive(Debug, Default)]
pub struct RunExtras {
    /// `--api`: the control socket.
    pub api: Option<ApiOptions>,
    /// `--gdb`: where gdb connects, and whether the vCPU waits for it
    /// before its first instruction (`--gdb-wait`).
    pub gdb: Option<(crate::gdb::GdbAddress, bool)>,
    /// `--snapshot-on-exit`: where to write the snapshot.
    pub snapshot_on_exit: Option<PathBuf>,
    /// Called with the report once the guest has stopped, before the VMM
    /// lingers (`--linger`), so the summary is printed at once.
    pub on_finish: Option<fn(&RunReport)>,
}

impl RunExtras {
    /// True if nothing beyond a plain run was asked for.
    pub fn is_empty(&self) -> bool {
        self.api.is_none() && self.gdb.is_none() && self.snapshot_on_exit.is_none()
    }

    /// True if the VMM keeps serving after the guest has finished.
    pub fn lingers(&self) -> bool {
        self.api.as_ref().is_some_and(|api| api.linger)
    }
}

/// The extras of one run, set up: the socket is bound and served, the
/// snapshot file is created (so a bad path fails before the guest runs).
#[derive(Debug)]
pub struct Attached {
    control: Option<Arc<Control>>,
    server: Option<Server>,
    gdb: Option<crate::gdb::GdbServer>,
    linger: bool,
    /// The snapshot's path, the file it is written to, and whether that is
    /// a temporary file renamed over the path when whole.
    snapshot: Option<(PathBuf, File, bool)>,
    on_finish: Option<fn(&RunReport)>,
    image: KernelImage,
}

impl Attached {
    /// Binds the socket and creates the snapshot file. `ram` is guest RAM,
    /// `usable` the RAM the VMM gives the kernel, `image` what it knows of
    /// the kernel image it loaded.
    pub fn start(
        extras: RunExtras,
        ram: &GuestRam,
        usable: &[(u64, u64)],
        image: KernelImage,
    ) -> Result<Attached, String> {
        // Written to a temporary file beside it and renamed over it when
        // whole, so an interrupted or failed write never leaves a partial
        // snapshot at `path` (the file is created now, so a bad path fails
        // before the guest runs). A path that is not a regular file (a
        // device, a pipe) is written directly.
        let snapshot = match extras.snapshot_on_exit {
            Some(path) => {
                let atomic = std::fs::metadata(&path).map_or(true, |m| m.is_file());
                let target = if atomic { snapshot_temporary(&path) } else { path.clone() };
                let file = File::create(&target)
                    .map_err(|e| format!("cannot create the snapshot file {}: {e}", path.display()))?;
                Some((path, file, atomic))
            }
            None => None,
        };
        // The control socket and the gdb stub share one pause handshake.
        let paused = extras.api.as_ref().is_some_and(|api| api.paused)
            || extras.gdb.as_ref().is_some_and(|(_, wait)| *wait);
        let control = (extras.api.is_some() || extras.gdb.is_some())
            .then(|| Arc::new(Control::new(ram.clone(), usable.to_vec(), paused).with_image(image.clone())));
        // gdb's listener first: once the control socket answers, both do.
        let gdb = match (&extras.gdb, &control) {
            (Some((address, _)), Some(control)) => {
                Some(crate::gdb::GdbServer::start(address, control.clone())?)
            }
            _ => None,
        };
        let (server, linger) = match (&extras.api, &control) {
            (Some(api), Some(control)) => (Some(Server::start(&api.socket, control.clone())?), api.linger),
            _ => (None, false),
        };
        Ok(Attached { control, server, gdb, linger, snapshot, on_finish: extras.on_finish, image })
    }

    /// The pause handshake, if the socket is served.
    pub fn control(&self) -> Option<&Control> {
        self.control.as_deref()
    }

    /// The guest has stopped and `report` is built: publishes the final
    /// state, writes the snapshot, calls `on_finish`, lingers if asked to,
    /// then stops serving. Problems writing the snapshot go to the report's
    /// log (and stderr).
    #[allow(clippy::too_many_arguments)]
    pub fn finish(
        mut self,
        ram: &GuestRam,
        hello: Option<BootHelloParams>,
        baseline: Option<TextBaseline>,
        cpus: Vec<CpuCapture>,
        usable: &[(u64, u64)],
        scenario: &str,
        report: &mut RunReport,
    ) {
        let exit = match (&report.exit, self.control.as_ref().and_then(|c| c.quit_at())) {
            (GuestExit::Stopped, Some(point)) => format!("{} {point}", report.exit),
            (exit, _) => exit.to_string(),
        };
        if let Some(control) = &self.control {
            let code = match report.exit {
                GuestExit::Shutdown { code } => Some(u8::try_from(code).unwrap_or(u8::MAX)),
                _ => None,
            };
            control.set_exit_code(code);
            control.finish(&report.events, hello, baseline.clone(), cpus.clone(), exit.clone(), self.linger);
        }
        if let Some((path, file, atomic)) = self.snapshot.take() {
            let cr3 = match self.control.as_ref().and_then(|c| c.quit_at()) {
                Some(Point::Ring3 { cr3, .. }) => Some(cr3),
                _ => None,
            };
            let state = MachineState {
                hello,
                usable: usable.to_vec(),
                baseline,
                events: report.events.clone(),
                point: Point::Finished { exit, cr3 },
                image: self.image.clone(),
                cpus,
                trap: None,
                // Written back to what they replaced in the snapshot.
                text_patches: self
                    .control
                    .as_ref()
                    .map(|control| control.text_patches().lock().unwrap_or_else(|e| e.into_inner()).clone())
                    .unwrap_or_default(),
            };
            let meta = snapshot::Meta::new(scenario, report.lost_events);
            let temporary = snapshot_temporary(&path);
            let written = snapshot::write(file, ram, &state, &meta).and_then(|()| {
                if atomic {
                    std::fs::rename(&temporary, &path)
                } else {
                    Ok(())
                }
            });
            if let Err(error) = written {
                if atomic {
                    let _ = std::fs::remove_file(&temporary);
                }
                let message = format!("could not write the snapshot {}: {error}", path.display());
                eprintln!("superos-vmm: {message}");
                report.log.push(message.clone());
                report.output_errors.push(message);
            }
        }
        if let Some(on_finish) = self.on_finish {
            on_finish(report);
        }
        if let (Some(control), Some(server)) = (&self.control, &self.server) {
            if self.linger && !control.quitting() {
                eprintln!(
                    "superos-vmm: the guest has stopped; still serving {} until `superos-vmm inspect --api {} quit`",
                    server.path().display(),
                    server.path().display()
                );
                control.wait_for_quit();
            }
        }
        if let Some(server) = self.server.take() {
            server.shutdown();
        }
        // gdb hears that the guest has stopped when it next waits for it;
        // the stub stops once that session has ended.
        if let Some(gdb) = self.gdb.take() {
            if gdb.in_session() {
                eprintln!(
                    "superos-vmm: the guest has stopped; serving gdb on {} until it detaches",
                    gdb.address()
                );
            }
            gdb.shutdown();
        }
    }
}

/// Where the snapshot for `path` is written before it is renamed over it:
/// beside it (the same file system), named after it and this process.
fn snapshot_temporary(path: &std::path::Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".partial-{}", std::process::id()));
    path.with_file_name(name)
}

/// The `superos-vmm run` options for examining the guest from outside.
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct ObserveArgs {
    /// Serve a control socket at SOCKET for `superos-vmm inspect --api SOCKET`
    /// (ps, maps, frames, shares, events, check, translate, dump, map, regs,
    /// core, pause, resume, quit). Queries hold the vCPU at a consistent point
    /// while they read.
    #[arg(long, value_name = "SOCKET")]
    pub api: Option<PathBuf>,
    /// With --api: hold the vCPU before its first instruction until `inspect resume`.
    #[arg(long, requires = "api")]
    pub paused: bool,
    /// With --api: keep serving after the guest has stopped, until `inspect quit`.
    #[arg(long, requires = "api")]
    pub linger: bool,
    /// When the guest stops, write guest memory and what is needed to interpret
    /// it to FILE, for `superos-vmm inspect --snapshot FILE`.
    #[arg(long, value_name = "FILE")]
    pub snapshot_on_exit: Option<PathBuf>,
    /// Serve gdb's remote protocol at ADDRESS (`host:port`, or a Unix socket
    /// path): processes and vCPUs are threads; `monitor ps|maps|check|...`.
    /// The guest is paused while gdb is attached and stopped, and runs on
    /// when it detaches. See docs/DEBUGGING.md.
    #[arg(long, value_name = "ADDRESS")]
    pub gdb: Option<String>,
    /// With --gdb: hold the vCPU before its first instruction until gdb continues.
    #[arg(long, requires = "gdb")]
    pub gdb_wait: bool,
}

impl ObserveArgs {
    /// The run extras these options ask for.
    pub fn extras(&self) -> RunExtras {
        RunExtras {
            api: self.api.clone().map(|socket| ApiOptions {
                socket,
                paused: self.paused,
                linger: self.linger,
            }),
            gdb: self.gdb.as_deref().map(|address| (crate::gdb::GdbAddress::parse(address), self.gdb_wait)),
            snapshot_on_exit: self.snapshot_on_exit.clone(),
            on_finish: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    fn control(paused: bool) -> Control {
        Control::new(GuestRam::new(16).unwrap(), vec![(0x10_0000, 16 << 20)], paused)
    }

    #[test]
    fn a_paused_run_reports_paused_before_its_vcpu_thread_reaches_the_first_hold() {
        let control = control(true);
        let (state, message) = control.status();
        assert_eq!(state, "paused", "{message}");
        assert!(message.contains("before the first guest instruction"), "{message}");
        // Resumed before the thread got there: it will run.
        assert!(control.resume().unwrap().contains("before the first guest instruction"));
        assert_eq!(control.status().0, "running");
    }

    #[test]
    fn once_the_guest_has_entered_a_pause_is_pausing_until_the_vcpu_is_held() {
        let control = control(false);
        control.lock().guest_entered = true;
        control.lock().explicit = true;
        assert_eq!(control.status().0, "pausing");
        let fresh = self::control(false);
        assert_eq!(fresh.status().0, "running");
    }
}
