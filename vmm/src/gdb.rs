//! `superos-vmm run --gdb ADDRESS`: a gdb remote stub that knows the guest's
//! processes, on the `gdbstub` crate.
//!
//! Threads are what gdb debugs: each live process is a thread whose id is its
//! pid (its registers are those it resumes with, from wherever they are:
//! [`inspect::registers`]; its memory is read through its own page tables,
//! user pages only), and each vCPU is a thread too, id
//! [`VCPU_THREAD_BASE`]` + n` (its registers as KVM has them; memory through
//! the page tables its CR3 names, the kernel half included). `monitor ps`,
//! `monitor maps <pid>`, `monitor check`, `monitor translate <pid> <vaddr>`,
//! `monitor regs <pid>`, `monitor frames` and `monitor shares` answer as
//! `superos-vmm inspect` does, from the same code.
//!
//! The stub is a client of the run's pause handshake ([`Control`]), as the
//! control socket is: when gdb attaches the guest is paused at the next
//! consistent point (user code or a kernel event), `continue` resumes it,
//! Ctrl-C pauses it again, and a guest that stops is reported as exited
//! (with the kernel's status) or terminated. `--gdb-wait` holds the vCPU
//! before its first instruction until gdb continues.
//!
//! A packet gdbstub cannot parse (a bad checksum, a register packet of the
//! wrong size) ends the session as a detach would: the guest runs on and gdb
//! may attach again. Every other bad request (unmapped or kernel-half
//! memory of a process, a thread that does not exist, a write the stub
//! refuses) is an error reply.
//!
//! Breakpoints and single steps in user programs are the kernel's and the
//! VMM's together ([`crate::debug_trap`]): a breakpoint is an `int3` the
//! stub writes into the code of every process of one program (`monitor
//! program NAME`; by default the program of the process held at a trap, or
//! the run's only program), including processes spawned later, before
//! their first instruction. The kernel reports a ring-3 `int3` or debug
//! exception to the VMM before it would kill the process for it; one the
//! debugger asked for holds the whole guest (`SwBreak` or `SIGTRAP` for
//! that process's thread) until gdb resumes it, the process then resuming
//! at the breakpoint's address, with the trap flag set for a step. Any
//! other one is the program's own fault, as without a debugger. A step of a
//! process not held at a trap sets the trap flag where its registers are
//! (the context the kernel keeps, the frame on a kernel stack, or the vCPU
//! running it). A step of vCPU 0's thread is KVM's single-step: one
//! instruction of whatever it runs, the kernel included (from
//! `--gdb-wait`, the kernel's first instructions); on the PVM host, whose
//! KVM steps only its ring-0 emulation, a step taken in ring 3 ends at the
//! next kernel instruction. The guest is then held wherever that is, so
//! `monitor check` may find the kernel half-way through a change.
//!
//! A breakpoint at a kernel address is an `int3` in the kernel's text
//! ([`crate::debug_trap`]: past its debug path, planted once the kernel
//! said its boot hello); a hit stops the thread of the vCPU that hit it,
//! with the kernel's registers there, and a step of that thread steps the
//! kernel from there (the trap flag in the kernel's answer; on the PVM host,
//! whose ring-0 emulator stops the vCPU on the `int3` itself, KVM's
//! single-step, which is why that host takes them in runs on one vCPU only).
//! Steps of the other vCPUs' threads are not offered elsewhere (their exits
//! go through the bootstrap thread).
//!
//! Registers are written only where the stopped code resumes from the
//! trap's registers (a process at its breakpoint or step, the kernel at one
//! of its breakpoints): [`Control::write_trap_registers`].
//!
//! The x87 and SSE registers are read where the general ones live: the
//! vCPU a process runs on or trapped from (the kernel never touches them),
//! else its save page.
//!
//! A hardware breakpoint (`Z1`) at a kernel address is one of vCPU 0's
//! debug address registers, armed through KVM's guest debugging; its hit is
//! held at [`inspect::Point::HardwareBreakpoint`] (runs on one vCPU only).
//!
//! Not yet: watchpoints, memory writes outside a process's
//! writable user pages, and writes of the x87/SSE registers. A step
//! resumes the
//! whole guest (gdb's scheduler locking is accepted, not enforced): other
//! processes may run on other CPUs meanwhile.

use crate::control::Control;
use crate::cpu::CpuCapture;
use crate::debug_trap::KERNEL_PID;
use crate::inspect::{self, Analysis, Machine, RegistersResult, TrapKind};
use crate::memory::GuestRam;
use crate::walk;
use gdbstub::common::{Signal, Tid};
use gdbstub::conn::ConnectionExt;
use gdbstub::stub::{run_blocking, DisconnectReason, GdbStub, MultiThreadStopReason};
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, SwBreakpoint, SwBreakpointOps,
};
use gdbstub::target::ext::monitor_cmd::{ConsoleOutput, MonitorCmd, MonitorCmdOps};
use gdbstub::target::ext::thread_extra_info::{ThreadExtraInfo, ThreadExtraInfoOps};
use gdbstub::target::{Target, TargetError, TargetResult};
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use gdbstub_arch::x86::X86_64_SSE;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use superos_protocol::layout::{PAGE_SIZE, USER_HALF_END};

/// Thread id of vCPU 0; vCPU `n` is this plus `n`. Pids at or above it are
/// not shown as threads.
pub const VCPU_THREAD_BASE: usize = 1_000_000;

/// How often a waiting stub looks for the guest's end between bytes from gdb.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Where gdb connects: `host:port` (TCP) or a path (a Unix socket).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GdbAddress {
    /// A TCP address.
    Tcp(String),
    /// A Unix socket path.
    Unix(std::path::PathBuf),
}

impl GdbAddress {
    /// `host:port` or a path (anything with a `/`, or no `:`).
    pub fn parse(text: &str) -> GdbAddress {
        if text.contains('/') || !text.contains(':') {
            GdbAddress::Unix(text.into())
        } else {
            GdbAddress::Tcp(text.to_string())
        }
    }
}

impl std::fmt::Display for GdbAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GdbAddress::Tcp(address) => write!(f, "{address}"),
            GdbAddress::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The bound listener.
enum Listener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, std::path::PathBuf),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

/// The gdb server of one run: a thread that accepts gdb connections, one
/// session at a time, until the run ends.
#[derive(Debug)]
pub struct GdbServer {
    address: GdbAddress,
    stop: Arc<AtomicBool>,
    /// A session is being served.
    in_session: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl GdbServer {
    /// Binds `address` (an error now if it cannot be) and serves it on a
    /// thread of its own.
    pub fn start(address: &GdbAddress, control: Arc<Control>) -> Result<GdbServer, String> {
        let listener = match address {
            GdbAddress::Tcp(text) => Listener::Tcp(
                std::net::TcpListener::bind(text)
                    .map_err(|e| format!("cannot listen for gdb on {text}: {e}"))?,
            ),
            GdbAddress::Unix(path) => {
                if std::fs::symlink_metadata(path).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) {
                    let _ = std::fs::remove_file(path);
                }
                let listener = std::os::unix::net::UnixListener::bind(path)
                    .map_err(|e| format!("cannot listen for gdb on {}: {e}", path.display()))?;
                Listener::Unix(listener, path.clone())
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let in_session = Arc::new(AtomicBool::new(false));
        let (flag, session) = (stop.clone(), in_session.clone());
        let thread = std::thread::Builder::new()
            .name("gdb".into())
            .spawn(move || serve(listener, &control, &flag, &session))
            .map_err(|e| format!("cannot start the gdb thread: {e}"))?;
        Ok(GdbServer { address: address.clone(), stop, in_session, thread: Some(thread) })
    }

    /// Where gdb connects.
    pub fn address(&self) -> &GdbAddress {
        &self.address
    }

    /// True while gdb is attached.
    pub fn in_session(&self) -> bool {
        self.in_session.load(Ordering::SeqCst)
    }

    /// Stops serving once the session in progress (if any) has ended: the
    /// guest has stopped, and gdb hears so and detaches.
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let GdbAddress::Unix(path) = &self.address {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn readable(fd: RawFd, timeout: Duration) -> bool {
    let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: `pollfd` is a valid, initialized pollfd that lives for the
    // whole call, and we pass a count of exactly one.
    let ready = unsafe { libc::poll(&mut pollfd, 1, timeout.as_millis() as libc::c_int) };
    ready > 0
}

/// Accepts and serves gdb sessions, one at a time, until `stop` (a session
/// in progress is served to its end first).
fn serve(listener: Listener, control: &Arc<Control>, stop: &AtomicBool, in_session: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        if !readable(listener.fd(), POLL_INTERVAL) {
            continue;
        }
        in_session.store(true, Ordering::SeqCst);
        let reason = match &listener {
            // A second handle keeps the connection open until the guest's
            // state after the session is settled.
            Listener::Tcp(l) => match l.accept() {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let keep = stream.try_clone();
                    session(stream, control, keep)
                }
                Err(e) => Err(e.to_string()),
            },
            Listener::Unix(l, _) => match l.accept() {
                Ok((stream, _)) => {
                    let keep = stream.try_clone();
                    session(stream, control, keep)
                }
                Err(e) => Err(e.to_string()),
            },
        };
        in_session.store(false, Ordering::SeqCst);
        match reason {
            Ok(reason) => tracing::info!(?reason, "gdb session ended"),
            Err(error) => tracing::warn!(%error, "gdb session ended"),
        }
    }
    if let Listener::Unix(_, path) = listener {
        let _ = std::fs::remove_file(path);
    }
}

/// One gdb session on `stream`: the guest is paused for gdb, served until
/// gdb detaches (the guest then runs on), kills (the guest is stopped) or
/// the connection fails. `keep`, another handle to the connection, is
/// dropped (closing it) only once the guest runs on or has been stopped.
fn session<C, K>(stream: C, control: &Arc<Control>, keep: K) -> Result<DisconnectReason, String>
where
    C: ConnectionExt<Error = std::io::Error> + AsRawFd,
{
    tracing::info!("gdb attached");
    let _ = control.pause();
    control.attach_debugger();
    let mut target = GdbTarget { control: control.clone(), stepping: Vec::new(), program: None };
    let result = GdbStub::new(stream).run_blocking::<EventLoop<C>>(&mut target);
    // Whatever ended the session, no `int3` of gdb's stays in the guest and
    // no trap is held for it any more.
    control.detach_debugger();
    let reason = match result {
        Ok(reason) => reason,
        Err(error) => {
            // A protocol error or a lost connection: as a detach, the guest runs on.
            let _ = control.resume();
            drop(keep);
            return Err(format!("gdb session: {error}"));
        }
    };
    match reason {
        DisconnectReason::Kill => {
            let _ = control.quit();
        }
        DisconnectReason::Disconnect => {
            // Detached: the guest runs on (if it was paused for gdb).
            let _ = control.resume();
        }
        DisconnectReason::TargetExited(_) | DisconnectReason::TargetTerminated(_) => {}
    }
    drop(keep);
    Ok(reason)
}

/// The target gdb debugs: the guest, through the pause handshake.
pub struct GdbTarget {
    control: Arc<Control>,
    /// The threads gdb asked to step at the next resume.
    stepping: Vec<Tid>,
    /// The program breakpoints go into (`monitor program NAME`).
    program: Option<String>,
}

/// What a thread id names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Thread {
    /// A process, by pid.
    Process(u32),
    /// A vCPU, by index.
    Vcpu(u32),
}

impl Thread {
    /// The thread `tid` names.
    pub fn of(tid: Tid) -> Thread {
        let tid = tid.get();
        match tid.checked_sub(VCPU_THREAD_BASE) {
            Some(cpu) => Thread::Vcpu(u32::try_from(cpu).unwrap_or(u32::MAX)),
            None => Thread::Process(tid as u32),
        }
    }

    /// Its thread id (`None` for a pid too large to be one).
    pub fn tid(self) -> Option<Tid> {
        match self {
            Thread::Process(pid) if (pid as usize) < VCPU_THREAD_BASE => NonZeroUsize::new(pid as usize),
            Thread::Process(_) => None,
            Thread::Vcpu(cpu) => NonZeroUsize::new(VCPU_THREAD_BASE + cpu as usize),
        }
    }
}

fn non_fatal<T>(why: impl std::fmt::Display) -> TargetResult<T, GdbTarget> {
    tracing::debug!(%why, "gdb request refused");
    Err(TargetError::NonFatal)
}

impl GdbTarget {
    /// The program breakpoints go into: the one `monitor program` named,
    /// else that of the process held at a debug trap, else the only
    /// program of the run.
    fn breakpoint_program(&self) -> Option<String> {
        if let Some(program) = &self.program {
            return Some(program.clone());
        }
        if let Some(program) = self.control.held_trap().and_then(|trap| self.control.program_of(trap.pid)) {
            return Some(program);
        }
        let names = self.control.program_names();
        (names.len() == 1).then(|| names[0].clone())
    }

    /// `monitor program [NAME]`: names the program breakpoints go into, or
    /// says which it is.
    fn program_command(&mut self, name: Option<&str>) -> String {
        let names = self.control.program_names();
        match name {
            Some(name) if names.iter().any(|n| n == name) => {
                self.program = Some(name.to_string());
                format!("breakpoints go into the processes of {name}\n")
            }
            Some(name) => format!("no process of this run runs {name}; the programs: {}\n", names.join(", ")),
            None => match self.breakpoint_program() {
                Some(program) => format!("breakpoints go into the processes of {program}\n"),
                None => format!(
                    "no program chosen for breakpoints: `monitor program NAME` (the programs: {})\n",
                    names.join(", ")
                ),
            },
        }
    }

    /// Runs `f` on a consistent view of the machine.
    fn query<R>(&self, f: impl FnOnce(&Machine<'_>) -> R) -> Result<R, String> {
        self.control.query(f)
    }

    /// The thread gdb should look at when the guest stops: the process in
    /// ring 3 on vCPU 0, else vCPU 0.
    fn current_thread(&self) -> Tid {
        let running = self.query(|machine| Analysis::new(machine).running).ok().flatten();
        running
            .and_then(|pid| Thread::Process(pid).tid())
            .or_else(|| Thread::Vcpu(0).tid())
            .expect("vCPU 0's thread id is not zero")
    }
}

/// The capture of vCPU `cpu`.
fn vcpu_capture<'m>(machine: &'m Machine<'_>, cpu: u32) -> Result<&'m CpuCapture, String> {
    machine
        .state
        .cpus
        .iter()
        .find(|c| c.cpu == cpu)
        .ok_or_else(|| format!("no state of vCPU {cpu} at this point"))
}

/// The PML4 of process `pid`, from the kernel's published table alone
/// ([`inspect::live_processes`]): gdb asks for memory many times per
/// command, and [`Analysis::new`] would walk every process's page tables for
/// each request.
fn process_pml4(machine: &Machine<'_>, pid: u32) -> Result<u64, String> {
    inspect::live_processes(machine)
        .get(&pid)
        .map(|&(pml4, _)| pml4)
        .ok_or_else(|| format!("no live process with pid {pid}"))
}

/// Reads what `tid` sees at `start` into `data`, page by page; the number of
/// bytes read (fewer at the first page it cannot read), an error if none.
fn read_memory(machine: &Machine<'_>, thread: Thread, start: u64, data: &mut [u8]) -> Result<usize, String> {
    let ram: &GuestRam = machine.ram;
    let (cr3, user_only) = match thread {
        Thread::Process(pid) => (process_pml4(machine, pid)?, true),
        Thread::Vcpu(cpu) => (vcpu_capture(machine, cpu)?.state.cr3, false),
    };
    let mut done = 0usize;
    while done < data.len() {
        let Some(at) = start.checked_add(done as u64) else { break };
        if user_only && at >= USER_HALF_END {
            if done == 0 {
                return Err(format!(
                    "{at:#x} is in the kernel half; a process thread reads its own user pages"
                ));
            }
            break;
        }
        let chunk = ((PAGE_SIZE - (at & (PAGE_SIZE - 1))) as usize).min(data.len() - done);
        let readable = walk::translate(ram, cr3, at)
            .ok()
            .filter(|leaf| leaf.user || !user_only)
            .and_then(|leaf| ram.read_bytes(leaf.phys, &mut data[done..done + chunk]).ok());
        if readable.is_none() {
            if done == 0 {
                return Err(format!("{at:#x} is not mapped"));
            }
            break;
        }
        done += chunk;
    }
    Ok(done)
}

/// gdb's registers from a process's.
fn process_registers(regs: &RegistersResult, out: &mut X86_64CoreRegs) {
    const ORDER: [&str; 16] = [
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
        "r14", "r15",
    ];
    for (slot, name) in out.regs.iter_mut().zip(ORDER) {
        *slot = regs.get(name);
    }
    out.rip = regs.get("rip");
    out.eflags = regs.get("rflags") as u32;
    out.segments.cs = regs.get("cs") as u32;
    out.segments.ss = regs.get("ss") as u32;
}

/// gdb's x87 and SSE registers from an `fxsave` image (a vCPU's, or the
/// legacy region of a process's save page); a short image is left out.
fn fpu_registers(image: &[u8], out: &mut X86_64CoreRegs) {
    if image.len() < crate::cpu::FXSAVE_BYTES {
        return;
    }
    let u16_at = |at: usize| u16::from_le_bytes([image[at], image[at + 1]]);
    let u32_at = |at: usize| u32::from_le_bytes(image[at..at + 4].try_into().unwrap_or_default());
    out.fpu.fctrl = u32::from(u16_at(0));
    out.fpu.fstat = u32::from(u16_at(2));
    // gdb's tag word has two bits a register (11: empty); `fxsave` keeps
    // one (1: in use). A register in use is shown as valid (00).
    out.fpu.ftag = (0..8).filter(|i| image[4] & (1 << i) == 0).fold(0, |tag, i| tag | (0b11 << (2 * i)));
    out.fpu.fop = u32::from(u16_at(6) & 0x7ff);
    out.fpu.fioff = u32_at(8);
    out.fpu.fooff = u32_at(16);
    out.mxcsr = u32_at(24);
    for (i, st) in out.st.iter_mut().enumerate() {
        st.copy_from_slice(&image[32 + 16 * i..42 + 16 * i]);
    }
    for (i, xmm) in out.xmm.iter_mut().enumerate() {
        *xmm = u128::from_le_bytes(image[160 + 16 * i..176 + 16 * i].try_into().unwrap_or_default());
    }
}

/// The `fxsave` image of process `pid`'s x87/SSE registers: where its
/// general registers are live (a vCPU it runs on or trapped from: the
/// kernel never touches them), that vCPU's; else its save page.
fn process_fpu(analysis: &Analysis, machine: &Machine<'_>, pid: u32) -> Option<Vec<u8>> {
    use inspect::RegisterHome;
    let cpu = match inspect::register_home(analysis, machine, pid).ok()? {
        RegisterHome::Trap(trap) => trap.cpu,
        RegisterHome::Vcpu { cpu } | RegisterHome::KernelStack { cpu, .. } => cpu,
        RegisterHome::Kept { .. } => {
            let (pml4, _) = analysis.process(pid).ok()?;
            let leaf = walk::translate(machine.ram, pml4, superos_protocol::layout::USER_STATE_VA).ok()?;
            let mut image = vec![0u8; crate::cpu::FXSAVE_BYTES];
            machine.ram.read_bytes(leaf.phys, &mut image).ok()?;
            return Some(image);
        }
    };
    vcpu_capture(machine, cpu).ok()?.state.fpu.clone()
}

/// gdb's registers from a trap frame's.
fn trap_registers(frame: &superos_protocol::introspect::UserContext, out: &mut X86_64CoreRegs) {
    out.regs = [
        frame.rax, frame.rbx, frame.rcx, frame.rdx, frame.rsi, frame.rdi, frame.rbp, frame.rsp, frame.r8,
        frame.r9, frame.r10, frame.r11, frame.r12, frame.r13, frame.r14, frame.r15,
    ];
    out.rip = frame.rip;
    out.eflags = frame.rflags as u32;
    out.segments.cs = frame.cs as u32;
    out.segments.ss = frame.ss as u32;
}

/// gdb's registers from a vCPU's.
fn vcpu_registers(capture: &CpuCapture, out: &mut X86_64CoreRegs) {
    let g = &capture.state.general;
    // CpuState keeps rsp before rbp; gdb wants rbp first.
    out.regs = [
        g[0], g[1], g[2], g[3], g[4], g[5], g[7], g[6], g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15],
    ];
    out.rip = capture.state.rip;
    out.eflags = capture.state.rflags as u32;
    out.segments.cs = u32::from(capture.state.cs.selector);
    out.segments.ss = u32::from(capture.state.ss.selector);
}

impl Target for GdbTarget {
    type Arch = X86_64_SSE;
    type Error = String;

    #[inline(always)]
    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }

    #[inline(always)]
    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    #[inline(always)]
    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadBase for GdbTarget {
    fn read_registers(&mut self, regs: &mut X86_64CoreRegs, tid: Tid) -> TargetResult<(), Self> {
        *regs = X86_64CoreRegs::default();
        let read = self.query(|machine| match Thread::of(tid) {
            Thread::Process(pid) => {
                let analysis = Analysis::new(machine);
                let read = inspect::registers(&analysis, machine, String::new(), pid)
                    .map(|r| process_registers(&r, regs));
                if let (Ok(()), Some(image)) = (&read, process_fpu(&analysis, machine, pid)) {
                    fpu_registers(&image, regs);
                }
                read
            }
            // Held at a kernel trap on that CPU: the kernel's registers
            // there (the vCPU itself is in the kernel's call to the VMM).
            Thread::Vcpu(cpu) => match machine.state.trap.filter(|t| t.pid == KERNEL_PID && t.cpu == cpu) {
                Some(trap) => {
                    trap_registers(&trap.registers, regs);
                    if let Some(image) = vcpu_capture(machine, cpu).ok().and_then(|c| c.state.fpu.as_ref()) {
                        fpu_registers(image, regs);
                    }
                    Ok(())
                }
                None => vcpu_capture(machine, cpu).map(|c| {
                    vcpu_registers(c, regs);
                    if let Some(image) = &c.state.fpu {
                        fpu_registers(image, regs);
                    }
                }),
            },
        });
        match read {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) | Err(why) => non_fatal(why),
        }
    }

    fn write_registers(&mut self, regs: &X86_64CoreRegs, tid: Tid) -> TargetResult<(), Self> {
        // Only where the trapped code resumes from the trap's registers: a
        // process held at its breakpoint or step, the kernel at one of its
        // breakpoints (the vCPU thread of its CPU).
        let (pid, cpu) = match Thread::of(tid) {
            Thread::Process(pid) => (pid, None),
            Thread::Vcpu(cpu) => (KERNEL_PID, Some(cpu)),
        };
        let r = &regs.regs;
        let new = superos_protocol::introspect::UserContext {
            rax: r[0],
            rbx: r[1],
            rcx: r[2],
            rdx: r[3],
            rsi: r[4],
            rdi: r[5],
            rbp: r[6],
            rsp: r[7],
            r8: r[8],
            r9: r[9],
            r10: r[10],
            r11: r[11],
            r12: r[12],
            r13: r[13],
            r14: r[14],
            r15: r[15],
            rip: regs.rip,
            rflags: u64::from(regs.eflags),
            ..Default::default()
        };
        match self.control.write_trap_registers(pid, cpu, &new) {
            Ok(()) => Ok(()),
            Err(why) => non_fatal(why),
        }
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], tid: Tid) -> TargetResult<usize, Self> {
        match self.query(|machine| read_memory(machine, Thread::of(tid), start, data)) {
            Ok(Ok(read)) => Ok(read),
            Ok(Err(why)) | Err(why) => non_fatal(why),
        }
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        let Thread::Process(pid) = Thread::of(tid) else {
            return non_fatal("memory writes go through a process thread");
        };
        let written = self.query(|machine| {
            let pml4 = process_pml4(machine, pid)?;
            // Every page first: all of the write or none of it.
            let mut pieces = Vec::new();
            let mut done = 0usize;
            while done < data.len() {
                let at = start.checked_add(done as u64).ok_or("the range overflows")?;
                let chunk = ((PAGE_SIZE - (at & (PAGE_SIZE - 1))) as usize).min(data.len() - done);
                let leaf = walk::translate(machine.ram, pml4, at)?;
                if at >= USER_HALF_END || !leaf.user || !leaf.writable {
                    return Err(format!("{at:#x} is not a page pid {pid} may write"));
                }
                pieces.push((leaf.phys, done, chunk));
                done += chunk;
            }
            for (phys, from, len) in pieces {
                machine.ram.write_bytes(phys, &data[from..from + len]).map_err(|e| e.to_string())?;
            }
            Ok(())
        });
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) | Err(why) => non_fatal(why),
        }
    }

    fn list_active_threads(&mut self, thread_is_active: &mut dyn FnMut(Tid)) -> Result<(), Self::Error> {
        let threads = self.query(|machine| {
            let analysis = Analysis::new(machine);
            let mut threads: Vec<Tid> =
                analysis.view.processes.iter().filter_map(|p| Thread::Process(p.pid).tid()).collect();
            let cpus =
                machine.state.cpus.iter().map(|c| c.cpu).chain((machine.state.cpus.is_empty()).then_some(0));
            threads.extend(cpus.filter_map(|cpu| Thread::Vcpu(cpu).tid()));
            threads
        })?;
        for tid in threads {
            thread_is_active(tid);
        }
        Ok(())
    }

    #[inline(always)]
    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }

    #[inline(always)]
    fn support_thread_extra_info(&mut self) -> Option<ThreadExtraInfoOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadResume for GdbTarget {
    fn resume(&mut self) -> Result<(), Self::Error> {
        // The process held at a trap steps or continues; every other one
        // gdb asked to step gets the trap flag where its registers are.
        let trap = self.control.held_trap();
        let mut trapped_steps = false;
        for tid in std::mem::take(&mut self.stepping) {
            let pid = match Thread::of(tid) {
                Thread::Process(pid) => pid,
                // Held at a kernel trap on that CPU: the kernel steps from
                // there (the trap flag, in the kernel's answer).
                Thread::Vcpu(cpu) if trap.is_some_and(|t| t.pid == KERNEL_PID && t.cpu == cpu) => {
                    trapped_steps = true;
                    self.control.step_kernel_at_trap(cpu);
                    continue;
                }
                Thread::Vcpu(0) => {
                    // KVM's single-step: one instruction of whatever vCPU 0
                    // runs, the kernel included.
                    self.control.request_kernel_step();
                    continue;
                }
                Thread::Vcpu(cpu) => {
                    tracing::warn!(cpu, "gdb asked to step a vCPU other than 0: it continues");
                    continue;
                }
            };
            if trap.is_some_and(|t| t.pid == pid) {
                trapped_steps = true;
                self.control.expect_step(pid);
                continue;
            }
            match self.control.arm_step(pid) {
                Ok(()) => self.control.expect_step(pid),
                Err(why) => {
                    tracing::warn!(pid, %why, "gdb asked to step a process that cannot be: it continues")
                }
            }
        }
        if trap.is_some() {
            self.control.set_trap_action(if trapped_steps {
                superos_protocol::hypercall::DEBUG_ACTION_STEP
            } else {
                superos_protocol::hypercall::DEBUG_ACTION_CONTINUE
            });
        }
        // A guest that has stopped cannot run on; the event loop reports how it ended.
        let _ = self.control.resume();
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<(), Self::Error> {
        self.stepping.clear();
        Ok(())
    }

    #[inline(always)]
    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    #[inline(always)]
    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }

    fn set_resume_action_continue(&mut self, _tid: Tid, _signal: Option<Signal>) -> Result<(), Self::Error> {
        // Every thread runs on: the guest is resumed as a whole.
        Ok(())
    }
}

impl MultiThreadSingleStep for GdbTarget {
    fn set_resume_action_step(&mut self, tid: Tid, _signal: Option<Signal>) -> Result<(), Self::Error> {
        self.stepping.push(tid);
        Ok(())
    }
}

impl MultiThreadSchedulerLocking for GdbTarget {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), Self::Error> {
        // gdb steps one thread this way. The guest resumes as a whole: the
        // stepped process runs at once (its trap is answered and resumed on
        // its CPU), and another process runs meanwhile only on another CPU
        // or if a timer tick preempts the step.
        Ok(())
    }
}

impl ThreadExtraInfo for GdbTarget {
    fn thread_extra_info(&self, tid: Tid, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let text = self.query(|machine| match Thread::of(tid) {
            Thread::Process(pid) => {
                let analysis = Analysis::new(machine);
                let name = analysis.view.process(pid).map_or("?".to_string(), |p| inspect::sanitize(&p.name));
                let cpu = analysis.view.process(pid).and_then(|p| p.record).map(|r| r.cpu);
                match cpu {
                    Some(cpu) if cpu != superos_protocol::introspect::NO_CPU => {
                        format!("pid {pid} {name}, on CPU {cpu}")
                    }
                    _ => format!("pid {pid} {name}"),
                }
            }
            Thread::Vcpu(cpu) => match vcpu_capture(machine, cpu) {
                Ok(c) if c.state.in_ring3() => format!("vCPU {cpu}, in ring 3"),
                Ok(_) => format!("vCPU {cpu}, in the kernel"),
                Err(_) => format!("vCPU {cpu}"),
            },
        })?;
        let n = text.len().min(buf.len());
        buf[..n].copy_from_slice(&text.as_bytes()[..n]);
        Ok(n)
    }
}

impl Breakpoints for GdbTarget {
    #[inline(always)]
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    #[inline(always)]
    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }
}

impl HwBreakpoint for GdbTarget {
    fn add_hw_breakpoint(&mut self, addr: u64, kind: usize) -> TargetResult<bool, Self> {
        if kind != 1 {
            return non_fatal(format!("a hardware breakpoint of kind {kind} (an instruction's is kind 1)"));
        }
        match self.control.insert_hardware_breakpoint(addr) {
            Ok(()) => Ok(true),
            Err(why) => non_fatal(why),
        }
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.control.remove_hardware_breakpoint(addr))
    }
}

impl SwBreakpoint for GdbTarget {
    fn add_sw_breakpoint(&mut self, addr: u64, kind: usize) -> TargetResult<bool, Self> {
        if kind != 1 {
            return non_fatal(format!("a breakpoint of kind {kind} (x86's int3 is kind 1)"));
        }
        // In the kernel's text: the one copy every CPU runs.
        if addr >= superos_protocol::layout::KERNEL_HALF_START {
            return match self.control.insert_kernel_breakpoint(addr) {
                Ok(()) => Ok(true),
                Err(why) => non_fatal(why),
            };
        }
        // Planted in every live process of the program gdb debugs with user
        // code there, and in every one spawned while it stays (a breakpoint
        // set at `--gdb-wait` waits for its program).
        let Some(program) = self.breakpoint_program() else {
            return non_fatal("which program? `monitor program NAME`");
        };
        match self.control.insert_breakpoint(addr, &program) {
            Ok(_) => Ok(true),
            Err(why) => non_fatal(why),
        }
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        match self.control.remove_breakpoint(addr) {
            Ok(removed) => Ok(removed),
            Err(why) => non_fatal(why),
        }
    }
}

/// The request a `monitor` command asks, or why it is not one.
pub fn monitor_request(command: &str) -> Result<crate::api::Request, String> {
    use crate::api::Request;
    let words: Vec<&str> = command.split_whitespace().collect();
    let number = |text: &str| crate::inspect_cli::parse_number(text);
    let pid =
        |text: &str| -> Result<u32, String> { text.parse().map_err(|_| format!("`{text}` is not a pid")) };
    match words.as_slice() {
        ["ps"] => Ok(Request::Ps),
        ["frames"] => Ok(Request::Frames),
        ["shares"] => Ok(Request::Shares),
        ["check"] => Ok(Request::Check),
        ["maps", p] => Ok(Request::Maps { pid: pid(p)? }),
        ["regs", p] => Ok(Request::Registers { pid: pid(p)? }),
        ["translate", p, vaddr] => Ok(Request::Translate { pid: pid(p)?, vaddr: number(vaddr)? }),
        _ => Err(format!(
            "unknown monitor command `{command}`; the commands: ps, maps <pid>, check, translate <pid> <vaddr>, regs <pid>, frames, shares, program [NAME]"
        )),
    }
}

impl MonitorCmd for GdbTarget {
    fn handle_monitor_cmd(&mut self, cmd: &[u8], mut out: ConsoleOutput<'_>) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(cmd);
        let words: Vec<&str> = command.split_whitespace().collect();
        if let ["program", rest @ ..] = words.as_slice() {
            let text = match rest {
                [] => self.program_command(None),
                [name] => self.program_command(Some(name)),
                _ => "usage: monitor program [NAME]\n".to_string(),
            };
            gdbstub::output!(out, "{text}");
            return Ok(());
        }
        let text = match monitor_request(&command) {
            Err(why) => why + "\n",
            Ok(request) => match self.query(|machine| inspect::answer(machine, &request)) {
                Ok(Ok(value)) => inspect::render(&request, &value).unwrap_or_else(|why| why + "\n"),
                Ok(Err(why)) | Err(why) => why + "\n",
            },
        };
        gdbstub::output!(out, "{text}");
        Ok(())
    }
}

/// The blocking event loop: while the guest runs, waits for a byte from gdb
/// (Ctrl-C) or the guest's end.
struct EventLoop<C>(std::marker::PhantomData<C>);

impl<C> run_blocking::BlockingEventLoop for EventLoop<C>
where
    C: ConnectionExt<Error = std::io::Error> + AsRawFd,
{
    type Target = GdbTarget;
    type Connection = C;
    type StopReason = MultiThreadStopReason<u64>;

    fn wait_for_stop_reason(
        target: &mut GdbTarget,
        conn: &mut C,
    ) -> Result<
        run_blocking::Event<Self::StopReason>,
        run_blocking::WaitForStopReasonError<String, std::io::Error>,
    > {
        loop {
            if let Some(ended) = target.control.ended() {
                return Ok(run_blocking::Event::TargetStopped(match ended {
                    Some(code) => MultiThreadStopReason::Exited(code),
                    None => MultiThreadStopReason::Terminated(Signal::SIGKILL),
                }));
            }
            if target.control.take_hardware_breakpoint_report() {
                let tid = Thread::Vcpu(0).tid().unwrap_or_else(|| target.current_thread());
                return Ok(run_blocking::Event::TargetStopped(MultiThreadStopReason::HwBreak(tid)));
            }
            if target.control.take_kernel_step_report() {
                let tid = Thread::Vcpu(0).tid().unwrap_or_else(|| target.current_thread());
                return Ok(run_blocking::Event::TargetStopped(MultiThreadStopReason::SignalWithThread {
                    tid,
                    signal: Signal::SIGTRAP,
                }));
            }
            if let Some(trap) = target.control.take_trap_report() {
                let thread = match trap.pid {
                    KERNEL_PID => Thread::Vcpu(trap.cpu),
                    pid => Thread::Process(pid),
                };
                let tid = thread.tid().unwrap_or_else(|| target.current_thread());
                return Ok(run_blocking::Event::TargetStopped(match trap.kind {
                    TrapKind::Breakpoint => MultiThreadStopReason::SwBreak(tid),
                    TrapKind::Step => {
                        MultiThreadStopReason::SignalWithThread { tid, signal: Signal::SIGTRAP }
                    }
                }));
            }
            if readable(conn.as_raw_fd(), POLL_INTERVAL) {
                let byte = conn.read().map_err(run_blocking::WaitForStopReasonError::Connection)?;
                return Ok(run_blocking::Event::IncomingData(byte));
            }
        }
    }

    fn on_interrupt(target: &mut GdbTarget) -> Result<Option<Self::StopReason>, String> {
        if target.control.ended().is_some() {
            return Ok(None);
        }
        target.control.pause()?;
        Ok(Some(MultiThreadStopReason::SignalWithThread {
            tid: target.current_thread(),
            signal: Signal::SIGINT,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fxsave_images_become_gdbs_x87_and_sse_registers() {
        let mut image = vec![0u8; crate::cpu::FXSAVE_BYTES];
        image[0..2].copy_from_slice(&0x37fu16.to_le_bytes());
        image[2..4].copy_from_slice(&0x3800u16.to_le_bytes()); // top of stack 7
        image[4] = 0b1000_0001; // st0 and st7 in use
        image[6..8].copy_from_slice(&0xfdd9u16.to_le_bytes()); // fop: 11 bits
        image[8..16].copy_from_slice(&0x40_1234u64.to_le_bytes());
        image[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        image[32 + 16 * 2..42 + 16 * 2].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        image[160 + 16 * 3..176 + 16 * 3]
            .copy_from_slice(&0x0123_4567_89ab_cdef_fedc_ba98_7654_3210u128.to_le_bytes());
        let mut regs = X86_64CoreRegs::default();
        fpu_registers(&image, &mut regs);
        assert_eq!(
            (regs.fpu.fctrl, regs.fpu.fstat, regs.fpu.fop, regs.fpu.fioff),
            (0x37f, 0x3800, 0x5d9, 0x40_1234)
        );
        assert_eq!(regs.fpu.ftag, 0x3ffc, "st0 and st7 valid, the rest empty");
        assert_eq!(regs.mxcsr, 0x1f80);
        assert_eq!(regs.st[2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(regs.xmm[3], 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        // A short image (none read) changes nothing.
        let mut untouched = X86_64CoreRegs::default();
        fpu_registers(&image[..100], &mut untouched);
        assert_eq!(untouched.mxcsr, 0);
    }

    #[test]
    fn thread_ids_name_processes_and_vcpus() {
        let tid = |n: usize| NonZeroUsize::new(n).unwrap();
        assert_eq!(Thread::of(tid(3)), Thread::Process(3));
        assert_eq!(Thread::of(tid(VCPU_THREAD_BASE + 1)), Thread::Vcpu(1));
        assert_eq!(Thread::Vcpu(1).tid(), Some(tid(VCPU_THREAD_BASE + 1)));
        assert_eq!(Thread::Process(7).tid(), Some(tid(7)));
        assert_eq!(Thread::Process(VCPU_THREAD_BASE as u32).tid(), None);
        assert_eq!(Thread::Process(0).tid(), None);
    }

    #[test]
    fn monitor_commands_are_inspect_requests_and_anything_else_is_explained() {
        use crate::api::Request;
        assert_eq!(monitor_request("ps"), Ok(Request::Ps));
        assert_eq!(monitor_request(" maps  2 "), Ok(Request::Maps { pid: 2 }));
        assert_eq!(
            monitor_request("translate 1 0x400010"),
            Ok(Request::Translate { pid: 1, vaddr: 0x40_0010 })
        );
        assert_eq!(monitor_request("regs 4"), Ok(Request::Registers { pid: 4 }));
        assert!(monitor_request("maps x").unwrap_err().contains("`x` is not a pid"));
        assert!(monitor_request("translate 1 zz").unwrap_err().contains("not a number"));
        let error = monitor_request("reboot").unwrap_err();
        assert!(
            error.contains("unknown monitor command `reboot`") && error.contains("ps, maps <pid>"),
            "{error}"
        );
    }

    #[test]
    fn addresses_are_tcp_or_unix() {
        assert_eq!(GdbAddress::parse("127.0.0.1:1234"), GdbAddress::Tcp("127.0.0.1:1234".into()));
        assert_eq!(GdbAddress::parse("/tmp/gdb.sock"), GdbAddress::Unix("/tmp/gdb.sock".into()));
        assert_eq!(GdbAddress::parse("gdb.sock"), GdbAddress::Unix("gdb.sock".into()));
    }
}
