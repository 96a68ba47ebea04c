//! Hypercalls from the guest kernel: [`decode`] turns a port write into a
//! typed [`Request`]; [`handle`] carries it out against the [`Session`].
//!
//! Every parameter block is copied out of guest memory and validated; a bad
//! block gets an error status written back (when its own address is valid)
//! and a line in the VMM log. Nothing the guest sends can panic the VMM.

use crate::events::EventRing;
use crate::memory::GuestRam;
use crate::monitor::Stop;
use crate::session::Session;
use superos_protocol::hypercall::{
    self as hc, BootHelloParams, BootPhase, ConsoleWriteParams, CpuStartParams, DebugTrapParams, Hypercall,
    PanicParams, ScrubFramesParams,
};
use superos_protocol::PROTOCOL_VERSION;
use thiserror::Error;
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// A decoded hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Boot hello; parameter block at the GPA.
    BootHello(u64),
    /// Console write; parameter block at the GPA.
    ConsoleWrite(u64),
    /// A boot phase number.
    Phase(u32),
    /// New events in the ring.
    EventNotify,
    /// Kernel panic; parameter block at the GPA.
    Panic(u64),
    /// Guest shutdown with a status.
    Shutdown(u32),
    /// Zero freed frames; parameter block at the GPA.
    ScrubFrames(u64),
    /// Start an application processor; parameter block at the GPA.
    CpuStart(u64),
    /// A process's breakpoint or single-step trap; parameter block at the GPA.
    DebugTrap(u64),
    /// New records in the trace ring at the GPA.
    TraceNotify(u64),
}

impl Request {
    /// The hypercall it is.
    pub fn call(&self) -> Hypercall {
        match self {
            Request::BootHello(_) => Hypercall::BootHello,
            Request::ConsoleWrite(_) => Hypercall::ConsoleWrite,
            Request::Phase(_) => Hypercall::Phase,
            Request::EventNotify => Hypercall::EventNotify,
            Request::Panic(_) => Hypercall::Panic,
            Request::Shutdown(_) => Hypercall::Shutdown,
            Request::ScrubFrames(_) => Hypercall::ScrubFrames,
            Request::CpuStart(_) => Hypercall::CpuStart,
            Request::DebugTrap(_) => Hypercall::DebugTrap,
            Request::TraceNotify(_) => Hypercall::TraceNotify,
        }
    }
}

/// A port write that is not a well-formed hypercall.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Not a hypercall port.
    #[error("write to unknown I/O port {0:#x}")]
    UnknownPort(u16),
    /// Hypercalls are 32-bit writes.
    #[error("{width}-byte write to hypercall port {port:#x} (hypercalls are 4-byte writes)")]
    BadWidth {
        /// The port.
        port: u16,
        /// Bytes written.
        width: usize,
    },
}

/// Decodes an `out` of `data` to `port`.
pub fn decode(port: u16, data: &[u8]) -> Result<Request, DecodeError> {
    let call = Hypercall::from_port(port).ok_or(DecodeError::UnknownPort(port))?;
    let value = <[u8; 4]>::try_from(data)
        .map(u32::from_le_bytes)
        .map_err(|_| DecodeError::BadWidth { port, width: data.len() })?;
    let gpa = u64::from(value);
    Ok(match call {
        Hypercall::BootHello => Request::BootHello(gpa),
        Hypercall::ConsoleWrite => Request::ConsoleWrite(gpa),
        Hypercall::Phase => Request::Phase(value),
        Hypercall::EventNotify => Request::EventNotify,
        Hypercall::Panic => Request::Panic(gpa),
        Hypercall::Shutdown => Request::Shutdown(value),
        Hypercall::ScrubFrames => Request::ScrubFrames(gpa),
        Hypercall::CpuStart => Request::CpuStart(gpa),
        Hypercall::DebugTrap => Request::DebugTrap(gpa),
        Hypercall::TraceNotify => Request::TraceNotify(gpa),
    })
}

/// How the run continues after a hypercall.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Resume the vCPU.
    Continue,
    /// The guest shut down with this status.
    Shutdown(u32),
    /// The kernel panicked.
    Panic(PanicReport),
    /// The invariant checker found a violation: stop the guest.
    InvariantViolated(Stop),
}

/// What the kernel said when it panicked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PanicReport {
    /// The panic message.
    pub message: String,
    /// The exception vector, if an exception caused it.
    pub vector: Option<u32>,
    /// The exception's error code.
    pub error_code: u64,
    /// The faulting RIP (0 if not from an exception).
    pub fault_rip: u64,
    /// CR2 for page faults.
    pub fault_addr: u64,
}

/// Carries out `request`.
pub fn handle(session: &mut Session<'_>, request: Request) -> Flow {
    // A kernel that batches its events (`EventNotifyPolicy::Batched`) leaves
    // them in the ring until it notifies; every other hypercall drains them
    // first, so the log keeps its order with console output and CPU starts.
    if matches!(
        request,
        Request::ConsoleWrite(_)
            | Request::Phase(_)
            | Request::ScrubFrames(_)
            | Request::CpuStart(_)
            | Request::DebugTrap(_)
    ) {
        let new = drain_events(session, false);
        if let Some(stop) = session.after_events(new) {
            return Flow::InvariantViolated(stop);
        }
    }
    match request {
        Request::BootHello(gpa) => boot_hello(session, gpa),
        Request::ConsoleWrite(gpa) => console_write(session, gpa),
        Request::Phase(raw) => {
            match BootPhase::from_raw(raw) {
                Some(BootPhase::FirstUserInstruction) => {
                    session.phases.first_user_instruction.get_or_insert(session.now());
                }
                None => session.warn(format!("hypercall phase: unknown phase {raw}")),
            }
            Flow::Continue
        }
        Request::EventNotify => {
            let new = drain_events(session, true);
            match session.after_events(new) {
                Some(stop) => Flow::InvariantViolated(stop),
                None => Flow::Continue,
            }
        }
        Request::Panic(gpa) => {
            drain_trace(session, false);
            let new = drain_events(session, false);
            // The panic is what ends the run; a check here only records.
            let _ = session.after_events(new);
            let _ = session.check_at_end(false);
            Flow::Panic(read_panic(session, gpa))
        }
        Request::Shutdown(code) => {
            drain_trace(session, false);
            let new = drain_events(session, false);
            if let Some(stop) = session.after_events(new) {
                return Flow::InvariantViolated(stop);
            }
            match session.check_at_end(true) {
                Some(stop) => Flow::InvariantViolated(stop),
                None => Flow::Shutdown(code),
            }
        }
        Request::ScrubFrames(gpa) => {
            scrub_frames(session, gpa);
            Flow::Continue
        }
        Request::CpuStart(gpa) => {
            cpu_start(session, gpa);
            Flow::Continue
        }
        Request::DebugTrap(gpa) => {
            debug_trap(session, gpa);
            Flow::Continue
        }
        Request::TraceNotify(gpa) => {
            trace_notify(session, gpa);
            Flow::Continue
        }
    }
}

/// The kernel's trace ring has records ([`Request::TraceNotify`]): the
/// first call announces the ring, which is validated; every call drains
/// it, its last record (a clock record) pairing the guest's TSC with the
/// VMM's clock. A notify in a run that keeps no trace, or naming another
/// ring, is a warning and changes nothing.
fn trace_notify(session: &mut Session<'_>, gpa: u64) {
    if session.trace.is_none() {
        session.warn("hypercall trace-notify in a run without --trace: ignored".into());
        return;
    }
    match session.trace_ring {
        Some(ring) if ring.gpa() != gpa => {
            session.warn(format!(
                "hypercall trace-notify names a ring at {gpa:#x}, the kernel announced {:#x}: ignored",
                ring.gpa()
            ));
            return;
        }
        Some(_) => {}
        None => match crate::events::TraceRing::open(session.ram, gpa, TRACE_RING_MAX_BYTES) {
            Ok(ring) => session.trace_ring = Some(ring),
            Err(error) => {
                session.warn(format!("hypercall trace-notify: {error}"));
                return;
            }
        },
    }
    drain_trace(session, true);
}

/// The most bytes a trace ring may span.
const TRACE_RING_MAX_BYTES: u64 = core::mem::size_of::<superos_protocol::event::EventRingHeader>() as u64
    + superos_protocol::trace::TRACE_RING_MAX_CAPACITY as u64
        * core::mem::size_of::<superos_protocol::trace::TraceRecord>() as u64;

/// Drains the trace ring into the timeline, in pieces; `clocked`: the
/// kernel's last record is a clock record written just before this exit,
/// whose TSC is paired with now.
pub(crate) fn drain_trace(session: &mut Session<'_>, clocked: bool) {
    let now = session.now();
    loop {
        let (Some(ring), Some(_)) = (session.trace_ring.as_mut(), session.trace.as_ref()) else { return };
        let drained = match ring.drain_at_most(session.ram, DRAIN_PIECE) {
            Ok(drained) => drained,
            Err(error) => {
                session.warn(error.to_string());
                return;
            }
        };
        if let Some((was, now)) = drained.lost_backwards {
            session.warn(format!(
                "the kernel's trace ring lost-record count went backwards from {was} to {now}"
            ));
        }
        let last = (drained.records.len() as u64) < DRAIN_PIECE;
        let Some(trace) = session.trace.as_mut() else { return };
        trace.kernel_lost += drained.newly_lost;
        if let (true, true, Some(record)) = (last, clocked, drained.records.last()) {
            if record.kind == superos_protocol::trace::TraceKind::Clock as u16 {
                trace.clock.anchor(record.tsc, now);
            }
        }
        for record in drained.records {
            if record.kind != superos_protocol::trace::TraceKind::Clock as u16 {
                trace.push(crate::trace::Record::Kernel(record));
            }
        }
        if last {
            return;
        }
    }
}

/// A trap a debugger may have asked for ([`Request::DebugTrap`]), answered
/// for now with [`hc::DEBUG_ACTION_KILL`]; the run loop hands it to the
/// debugger, if one is attached, before the vCPU resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DebugTrap {
    /// Where the kernel's parameter block is.
    pub gpa: u64,
    /// What it said.
    pub params: DebugTrapParams,
}

/// Answers a debug trap with "kill" (what the kernel does without a
/// debugger) and leaves it in [`Session::debug_trap`] for the run loop.
fn debug_trap(session: &mut Session<'_>, gpa: u64) {
    let Some(params) = read_params::<DebugTrapParams>(session, Hypercall::DebugTrap, gpa) else {
        return;
    };
    answer_debug_trap(session.ram, gpa, hc::DEBUG_ACTION_KILL, params.resume_rip, None);
    session.debug_trap = Some(DebugTrap { gpa, params });
}

/// Writes the answer to a debug trap: `action` (`DEBUG_ACTION_*`), where
/// the process resumes, and `status` OK. False if the block cannot be
/// written (the kernel then kills the process: its status stays pending).
pub fn answer_debug_trap(
    ram: &GuestRam,
    gpa: u64,
    action: u32,
    resume_rip: u64,
    registers: Option<&superos_protocol::introspect::UserContext>,
) -> bool {
    use core::mem::offset_of;
    use zerocopy::IntoBytes;
    let field = |offset: usize| gpa.checked_add(offset as u64);
    let action = action | if registers.is_some() { hc::DEBUG_ACTION_REGISTERS } else { 0 };
    let rewritten = registers.map(|r| (field(offset_of!(DebugTrapParams, registers)), r.as_bytes().to_vec()));
    let writes = rewritten.into_iter().chain([
        (field(offset_of!(DebugTrapParams, action)), action.to_le_bytes().to_vec()),
        (field(offset_of!(DebugTrapParams, resume_rip)), resume_rip.to_le_bytes().to_vec()),
        (field(offset_of!(DebugTrapParams, status)), hc::STATUS_OK.to_le_bytes().to_vec()),
    ]);
    // The status last: the kernel reads nothing else without it.
    writes.into_iter().all(|(at, bytes)| at.is_some_and(|at| ram.write_bytes(at, &bytes).is_ok()))
}

/// Accepts an AP start (its thread starts it once this exit is handled:
/// [`crate::aps`]) or refuses it with `STATUS_BAD_ARGUMENT` and a warning.
fn cpu_start(session: &mut Session<'_>, gpa: u64) {
    let Some(params) = read_params::<CpuStartParams>(session, Hypercall::CpuStart, gpa) else {
        return;
    };
    let status = match session.cpu_starts.accept(&params) {
        Ok(start) => {
            tracing::info!(
                cpu = start.cpu,
                rip = format_args!("{:#x}", start.rip),
                "starting an application processor"
            );
            hc::STATUS_OK
        }
        Err(reason) => {
            session.warn(format!("hypercall cpu-start refused: {reason}"));
            hc::STATUS_BAD_ARGUMENT
        }
    };
    write_status(session, gpa, core::mem::offset_of!(CpuStartParams, status), &status);
}

/// Reads a parameter block, or logs why it could not.
fn read_params<T: FromBytes>(session: &mut Session<'_>, call: Hypercall, gpa: u64) -> Option<T> {
    match session.ram.read::<T>(gpa) {
        Ok(params) => Some(params),
        Err(error) => {
            session.warn(format!("hypercall {}: parameter block unreadable: {error}", call.name()));
            None
        }
    }
}

/// Writes a `status` field back at `gpa + offset`.
fn write_status<T: IntoBytes + Immutable>(session: &mut Session<'_>, gpa: u64, offset: usize, status: &T) {
    // The block was readable a moment ago, so this cannot fail; if the guest
    // raced us there is nothing more useful to do than log it.
    if let Err(error) = session.ram.write(gpa + offset as u64, status) {
        session.warn(format!("hypercall status write at {gpa:#x}: {error}"));
    }
}

fn boot_hello(session: &mut Session<'_>, gpa: u64) -> Flow {
    session.phases.kernel_entry.get_or_insert(session.now());
    let Some(params) = read_params::<BootHelloParams>(session, Hypercall::BootHello, gpa) else {
        return Flow::Continue;
    };
    let text = Some((params.kernel_text_gpa, params.kernel_text_len));
    if session.hello.is_some() {
        // Exactly one boot hello: a later one would re-baseline or move
        // what the VMM watches. Refused, and a violation.
        session.hellos += 1;
        write_status(session, gpa, core::mem::offset_of!(BootHelloParams, status), &hc::STATUS_BAD_ARGUMENT);
        return match session.boot_hello_checked(text, params.introspection_root_gpa) {
            Some(stop) => Flow::InvariantViolated(stop),
            None => Flow::Continue,
        };
    }
    let mut flow = Flow::Continue;
    let status = if params.version != PROTOCOL_VERSION {
        session.warn(format!(
            "boot hello: kernel speaks protocol version {}, the VMM {PROTOCOL_VERSION}",
            params.version
        ));
        hc::STATUS_BAD_VERSION
    } else {
        match EventRing::open(session.ram, params.event_ring_gpa, params.event_ring_bytes) {
            Ok(ring) => {
                session.ring = Some(ring);
                session.hello = Some(params);
                session.hellos += 1;
                if session.ram.contains(params.kernel_text_gpa, params.kernel_text_len) {
                    session.kernel_text = Some((params.kernel_text_gpa, params.kernel_text_len));
                }
                if let Some(stop) = session.boot_hello_checked(text, params.introspection_root_gpa) {
                    flow = Flow::InvariantViolated(stop);
                }
                hc::STATUS_OK
            }
            Err(error) => {
                session.warn(format!("boot hello: {error}"));
                hc::STATUS_BAD_ADDRESS
            }
        }
    };
    write_status(session, gpa, core::mem::offset_of!(BootHelloParams, status), &status);
    flow
}

fn console_write(session: &mut Session<'_>, gpa: u64) -> Flow {
    let Some(params) = read_params::<ConsoleWriteParams>(session, Hypercall::ConsoleWrite, gpa) else {
        return Flow::Continue;
    };
    let status = if params.len > hc::CONSOLE_WRITE_MAX {
        session.warn(format!(
            "console write of {} bytes refused (limit {})",
            params.len,
            hc::CONSOLE_WRITE_MAX
        ));
        hc::STATUS_TOO_LARGE
    } else {
        let mut bytes = vec![0u8; params.len as usize];
        match session.ram.read_bytes(params.gpa, &mut bytes) {
            Ok(()) => {
                let lines = session.console.push(params.source_pid, &bytes);
                session.add_lines(lines);
                hc::STATUS_OK
            }
            Err(error) => {
                session.warn(format!("console write refused: {error}"));
                hc::STATUS_BAD_ADDRESS
            }
        }
    };
    write_status(session, gpa, core::mem::offset_of!(ConsoleWriteParams, status), &status);
    Flow::Continue
}

/// Zeroes the frames the kernel lists. The whole list is validated first
/// (count, alignment, inside guest RAM); on any error nothing is zeroed.
fn scrub_frames(session: &mut Session<'_>, gpa: u64) {
    let Some(params) = read_params::<ScrubFramesParams>(session, Hypercall::ScrubFrames, gpa) else {
        return;
    };
    let status = if u64::from(params.count) > hc::SCRUB_BATCH_MAX {
        session.warn(format!("scrub of {} frames refused (limit {})", params.count, hc::SCRUB_BATCH_MAX));
        hc::STATUS_TOO_LARGE
    } else {
        let mut list = vec![0u8; params.count as usize * 8];
        match session.ram.read_bytes(params.list_gpa, &mut list) {
            Err(error) => {
                session.warn(format!("scrub refused: frame list unreadable: {error}"));
                hc::STATUS_BAD_ADDRESS
            }
            Ok(()) => {
                let frames: Vec<u64> = list
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect();
                let page = superos_protocol::layout::PAGE_SIZE;
                match frames.iter().find(|&&f| f % page != 0 || !session.ram.contains(f, page)) {
                    Some(bad) => {
                        session.warn(format!("scrub refused: {bad:#x} is not a frame of guest memory"));
                        hc::STATUS_BAD_ADDRESS
                    }
                    None => {
                        let zero = [0u8; 4096];
                        for frame in frames {
                            // Validated above: aligned and inside guest RAM.
                            let _ = session.ram.write_bytes(frame, &zero);
                        }
                        hc::STATUS_OK
                    }
                }
            }
        }
    };
    write_status(session, gpa, core::mem::offset_of!(ScrubFramesParams, status), &status);
}

/// Drains the event ring; `notified` says the kernel claimed there are
/// events (so a missing ring is worth a warning). Returns how many events
/// were added.
pub(crate) fn drain_events(session: &mut Session<'_>, notified: bool) -> usize {
    let before = session.events.len();
    if session.ring.is_none() {
        if notified {
            session.warn("event notify before the kernel announced its event ring".into());
        }
        return 0;
    }
    // In pieces: a ring the kernel made as large as guest RAM never needs
    // more than one piece of records in the VMM at once.
    while let Some(ring) = session.ring.as_mut() {
        let drained = match ring.drain_at_most(session.ram, DRAIN_PIECE) {
            Ok(drained) => drained,
            Err(error) => {
                session.warn(error.to_string());
                break;
            }
        };
        if let Some((was, now)) = drained.lost_backwards {
            session.warn(format!(
                "the kernel's event ring lost-record count went backwards from {was} to {now}: records may have been lost unreported"
            ));
        }
        if drained.newly_lost > 0 {
            session.lost_events += drained.newly_lost;
            session.warn(format!("the kernel's event ring overflowed: {} events lost", drained.newly_lost));
        }
        let last = (drained.records.len() as u64) < DRAIN_PIECE;
        for record in drained.records {
            session.add_record(record);
        }
        if last {
            break;
        }
    }
    session.events.len() - before
}

/// Records drained from the ring at a time (see [`drain_events`]).
const DRAIN_PIECE: u64 = 4096;

fn read_panic(session: &mut Session<'_>, gpa: u64) -> PanicReport {
    let Some(params) = read_params::<PanicParams>(session, Hypercall::Panic, gpa) else {
        return PanicReport {
            message: format!("(panic parameter block at {gpa:#x} is unreadable)"),
            vector: None,
            error_code: 0,
            fault_rip: 0,
            fault_addr: 0,
        };
    };
    let len = params.msg_len.min(hc::PANIC_MESSAGE_MAX) as usize;
    let mut bytes = vec![0u8; len];
    let message = match session.ram.read_bytes(params.msg_gpa, &mut bytes) {
        // The message's own line breaks become spaces; the rest is escaped.
        Ok(()) => crate::console::sanitize(&bytes).replace("\\n", " "),
        Err(error) => format!("(panic message unreadable: {error})"),
    };
    PanicReport {
        message,
        vector: (params.vector != hc::PANIC_NO_VECTOR).then_some(params.vector),
        error_code: params.error_code,
        fault_rip: params.fault_rip,
        fault_addr: params.fault_addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use crate::session::Echo;
    use std::time::Instant;

    const PARAMS: u64 = 0x10_0000;

    fn console_params(ram: &GuestRam, gpa: u64, len: u64) -> u32 {
        let ram_ref = ram;
        let mut session = Session::new(ram_ref, Instant::now(), Echo::Quiet, vec![]);
        ram.write(PARAMS, &ConsoleWriteParams { source_pid: 7, status: hc::STATUS_PENDING, gpa, len })
            .unwrap();
        assert_eq!(handle(&mut session, Request::ConsoleWrite(PARAMS)), Flow::Continue);
        ram.read::<ConsoleWriteParams>(PARAMS).unwrap().status
    }

    #[test]
    fn decode_checks_port_and_width() {
        assert_eq!(decode(0x501, &0x1000u32.to_le_bytes()), Ok(Request::ConsoleWrite(0x1000)));
        assert_eq!(decode(0x505, &3u32.to_le_bytes()), Ok(Request::Shutdown(3)));
        assert_eq!(decode(0x3f8, b"x"), Err(DecodeError::UnknownPort(0x3f8)));
        assert_eq!(decode(0x501, &[1, 2]), Err(DecodeError::BadWidth { port: 0x501, width: 2 }));
    }

    #[test]
    fn console_writes_are_validated() {
        let ram = GuestRam::new(16).unwrap();
        ram.write_bytes(0x2000, b"hi\n").unwrap();
        assert_eq!(console_params(&ram, 0x2000, 3), hc::STATUS_OK);
        assert_eq!(console_params(&ram, 0x2000, hc::CONSOLE_WRITE_MAX + 1), hc::STATUS_TOO_LARGE);
        assert_eq!(console_params(&ram, ram.size() - 1, 2), hc::STATUS_BAD_ADDRESS);
        assert_eq!(console_params(&ram, u64::MAX, 16), hc::STATUS_BAD_ADDRESS);
    }

    #[test]
    fn console_output_is_collected_per_process() {
        let ram = GuestRam::new(16).unwrap();
        let mut session = Session::new(&ram, Instant::now(), Echo::Quiet, vec![]);
        ram.write_bytes(0x2000, b"hello\n").unwrap();
        ram.write(PARAMS, &ConsoleWriteParams { source_pid: 2, status: 0, gpa: 0x2000, len: 6 }).unwrap();
        handle(&mut session, Request::ConsoleWrite(PARAMS));
        assert_eq!(session.lines.len(), 1);
        assert_eq!((session.lines[0].pid, session.lines[0].text.as_str()), (2, "hello"));
    }

    #[test]
    fn unreadable_parameter_blocks_are_logged_not_fatal() {
        let ram = GuestRam::new(16).unwrap();
        let mut session = Session::new(&ram, Instant::now(), Echo::Quiet, vec![]);
        assert_eq!(handle(&mut session, Request::ConsoleWrite(ram.size() - 4)), Flow::Continue);
        assert_eq!(handle(&mut session, Request::BootHello(u32::MAX as u64)), Flow::Continue);
        assert_eq!(handle(&mut session, Request::EventNotify), Flow::Continue);
        assert_eq!(session.log.len(), 3, "{:?}", session.log);
        match handle(&mut session, Request::Panic(ram.size())) {
            Flow::Panic(report) => assert!(report.message.contains("unreadable")),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn panic_messages_are_bounded_and_sanitized() {
        let ram = GuestRam::new(16).unwrap();
        let mut session = Session::new(&ram, Instant::now(), Echo::Quiet, vec![]);
        ram.write_bytes(0x3000, b"boom\x1b").unwrap();
        let params = PanicParams {
            msg_gpa: 0x3000,
            msg_len: u64::MAX,
            vector: 14,
            status: 0,
            error_code: 2,
            fault_rip: 0x1234,
            fault_addr: 0x10,
        };
        ram.write(PARAMS, &params).unwrap();
        let Flow::Panic(report) = handle(&mut session, Request::Panic(PARAMS)) else { panic!("not a panic") };
        assert!(report.message.starts_with("boom\\u{1b}"));
        // Clamped to PANIC_MESSAGE_MAX bytes of guest memory (each escaped
        // control byte grows to at most 6 characters).
        assert!(report.message.len() <= 6 * hc::PANIC_MESSAGE_MAX as usize);
        assert_eq!((report.vector, report.fault_rip), (Some(14), 0x1234));
    }

    #[test]
    fn a_hello_with_the_wrong_version_is_refused() {
        let ram = GuestRam::new(16).unwrap();
        let mut session = Session::new(&ram, Instant::now(), Echo::Quiet, vec![]);
        ram.write(PARAMS, &BootHelloParams { version: 99, ..Default::default() }).unwrap();
        handle(&mut session, Request::BootHello(PARAMS));
        assert_eq!(ram.read::<BootHelloParams>(PARAMS).unwrap().status, hc::STATUS_BAD_VERSION);
        assert!(session.kernel_text.is_none());
    }

    const LIST: u64 = 0x3000;
    const PAGE: u64 = superos_protocol::layout::PAGE_SIZE;
    /// Frames the scrub tests fill with a pattern: 0x20_0000..0x20_8000.
    const DIRTY: u64 = 0x20_0000;
    const DIRTY_FRAMES: u64 = 8;

    /// Fills the dirty frames with 0xaa.
    fn dirty(ram: &GuestRam) {
        ram.write_bytes(DIRTY, &vec![0xaa; (DIRTY_FRAMES * PAGE) as usize]).unwrap();
    }

    /// Which of the dirty frames are now all zero, and whether every other
    /// byte of them is still 0xaa.
    fn zeroed_frames(ram: &GuestRam) -> Vec<u64> {
        let mut zeroed = Vec::new();
        for i in 0..DIRTY_FRAMES {
            let mut frame = vec![0u8; PAGE as usize];
            ram.read_bytes(DIRTY + i * PAGE, &mut frame).unwrap();
            if frame.iter().all(|&b| b == 0) {
                zeroed.push(DIRTY + i * PAGE);
            } else {
                assert!(frame.iter().all(|&b| b == 0xaa), "frame {i} partly scrubbed");
            }
        }
        zeroed
    }

    /// Sends a ScrubFrames hypercall for a list written at `list_gpa` (if
    /// `frames` is given) and returns the status and the VMM log.
    fn scrub(ram: &GuestRam, list_gpa: u64, frames: Option<&[u64]>, count: u32) -> (u32, Vec<String>) {
        let mut session = Session::new(ram, Instant::now(), Echo::Quiet, vec![]);
        if let Some(frames) = frames {
            let bytes: Vec<u8> = frames.iter().flat_map(|f| f.to_le_bytes()).collect();
            ram.write_bytes(list_gpa, &bytes).unwrap();
        }
        ram.write(PARAMS, &ScrubFramesParams { list_gpa, count, status: hc::STATUS_PENDING }).unwrap();
        assert_eq!(handle(&mut session, Request::ScrubFrames(PARAMS)), Flow::Continue);
        let status = ram.read::<ScrubFramesParams>(PARAMS).unwrap().status;
        (status, session.log)
    }

    #[test]
    fn a_valid_scrub_batch_zeroes_exactly_the_listed_frames() {
        let ram = GuestRam::new(16).unwrap();
        dirty(&ram);
        let listed = [DIRTY + PAGE, DIRTY + 4 * PAGE, DIRTY + 7 * PAGE];
        let (status, log) = scrub(&ram, LIST, Some(&listed), listed.len() as u32);
        assert_eq!(status, hc::STATUS_OK);
        assert!(log.is_empty(), "{log:?}");
        assert_eq!(zeroed_frames(&ram), listed);
        // The byte just below a scrubbed frame is untouched too.
        let mut edges = [0u8; 1];
        ram.write_bytes(DIRTY - 1, &[0x55]).unwrap();
        scrub(&ram, LIST, Some(&[DIRTY]), 1);
        ram.read_bytes(DIRTY - 1, &mut edges).unwrap();
        assert_eq!(edges, [0x55]);

        // An empty batch is fine and touches nothing.
        dirty(&ram);
        assert_eq!(scrub(&ram, LIST, Some(&[]), 0).0, hc::STATUS_OK);
        assert!(zeroed_frames(&ram).is_empty());

        // The largest batch allowed, the last frame of RAM included.
        let mut frames: Vec<u64> = (0..hc::SCRUB_BATCH_MAX - 1).map(|i| 0x40_0000 + i * PAGE).collect();
        frames.push(ram.size() - PAGE);
        for &frame in &frames {
            ram.write_bytes(frame, &[0xcc; 8]).unwrap();
        }
        let (status, _) = scrub(&ram, LIST, Some(&frames), frames.len() as u32);
        assert_eq!(status, hc::STATUS_OK);
        for frame in frames {
            assert_eq!(ram.read_u64(frame).unwrap(), 0, "frame {frame:#x}");
        }
    }

    #[test]
    fn a_scrub_batch_with_one_bad_frame_zeroes_nothing() {
        let ram = GuestRam::new(16).unwrap();
        let bad_frames = [
            DIRTY + 2 * PAGE + 8, // not page-aligned
            ram.size(),           // just past the end of RAM
            !(PAGE - 1),          // far outside, and end address overflows
            0x1_0000_0000,        // above RAM, aligned
        ];
        for bad in bad_frames {
            dirty(&ram);
            let list = [DIRTY, DIRTY + PAGE, bad, DIRTY + 3 * PAGE];
            let (status, log) = scrub(&ram, LIST, Some(&list), list.len() as u32);
            assert_eq!(status, hc::STATUS_BAD_ADDRESS, "frame {bad:#x}");
            assert!(zeroed_frames(&ram).is_empty(), "frame {bad:#x} let others be zeroed");
            assert_eq!(log.len(), 1, "{log:?}");
            assert!(log[0].contains(&format!("{bad:#x}")), "{log:?}");
        }
        // A bad frame beyond `count` is not part of the batch.
        dirty(&ram);
        let list = [DIRTY, DIRTY + 8];
        assert_eq!(scrub(&ram, LIST, Some(&list), 1).0, hc::STATUS_OK);
        assert_eq!(zeroed_frames(&ram), [DIRTY]);
    }

    #[test]
    fn an_oversized_scrub_batch_is_refused() {
        let ram = GuestRam::new(16).unwrap();
        dirty(&ram);
        let frames: Vec<u64> = (0..=hc::SCRUB_BATCH_MAX).map(|i| DIRTY + (i % DIRTY_FRAMES) * PAGE).collect();
        let (status, log) = scrub(&ram, LIST, Some(&frames), frames.len() as u32);
        assert_eq!(status, hc::STATUS_TOO_LARGE);
        assert!(zeroed_frames(&ram).is_empty());
        assert!(log[0].contains("limit 512"), "{log:?}");
        let (status, _) = scrub(&ram, LIST, None, u32::MAX);
        assert_eq!(status, hc::STATUS_TOO_LARGE);
        assert!(zeroed_frames(&ram).is_empty());
    }

    #[test]
    fn an_unreadable_scrub_list_is_refused() {
        let ram = GuestRam::new(16).unwrap();
        dirty(&ram);
        let end = ram.size();
        // The list starts inside RAM but its second entry lies past the end.
        ram.write_bytes(end - 8, &DIRTY.to_le_bytes()).unwrap();
        for (list_gpa, count) in [(end - 8, 2), (end, 1), (u64::MAX - 7, 1), (u64::MAX, 512)] {
            let (status, log) = scrub(&ram, list_gpa, None, count);
            assert_eq!(status, hc::STATUS_BAD_ADDRESS, "list at {list_gpa:#x}");
            assert!(log[0].contains("frame list unreadable"), "{log:?}");
        }
        assert!(zeroed_frames(&ram).is_empty());
        // And a parameter block that is itself unreadable is logged, not fatal.
        let mut session = Session::new(&ram, Instant::now(), Echo::Quiet, vec![]);
        assert_eq!(handle(&mut session, Request::ScrubFrames(end - 8)), Flow::Continue);
        assert!(session.log[0].contains("scrub-frames"), "{:?}", session.log);
    }

    /// Writes a trace ring of `capacity` slots at `gpa` holding `records`.
    fn trace_ring(ram: &GuestRam, gpa: u64, capacity: u32, records: &[superos_protocol::trace::TraceRecord]) {
        use superos_protocol::event::EventRingHeader;
        let header = EventRingHeader {
            magic: superos_protocol::trace::TRACE_RING_MAGIC,
            version: PROTOCOL_VERSION,
            capacity,
            record_size: 32,
            head: records.len() as u64,
            ..Default::default()
        };
        ram.write(gpa, &header).unwrap();
        for (i, record) in records.iter().enumerate() {
            ram.write(gpa + 48 + i as u64 * 32, record).unwrap();
        }
    }

    #[test]
    fn trace_notify_drains_the_ring_and_pairs_its_clock_record_with_the_vmm_clock() {
        use superos_protocol::trace::{TraceKind, TraceRecord};
        let ram = GuestRam::new(16).unwrap();
        let record =
            |kind: TraceKind, tsc: u64| TraceRecord { tsc, kind: kind as u16, cpu: 0, pid: 1, a: 0, b: 0 };
        trace_ring(&ram, PARAMS, 8, &[record(TraceKind::Run, 10), record(TraceKind::Clock, 20)]);
        let mut session = Session::new(&ram, Instant::now(), Echo::Quiet, vec![]).with_trace(Some(1000));
        assert_eq!(handle(&mut session, Request::TraceNotify(PARAMS)), Flow::Continue);
        let trace = session.trace.as_ref().unwrap();
        // The clock record is an anchor, not a record: TSC 20 is now.
        assert_eq!(trace.records(), [crate::trace::Record::Kernel(record(TraceKind::Run, 10))]);
        assert!(trace.clock.at(20).is_some());
        assert!(session.log.is_empty(), "{:?}", session.log);
        let header: superos_protocol::event::EventRingHeader = ram.read(PARAMS).unwrap();
        assert_eq!(header.tail, 2, "the slots are handed back");
    }

    #[test]
    fn hostile_trace_notifies_are_warnings_and_change_nothing() {
        let ram = GuestRam::new(16).unwrap();
        trace_ring(&ram, PARAMS, 8, &[]);
        // A run that keeps no trace.
        let mut session = Session::new(&ram, Instant::now(), Echo::Quiet, vec![]);
        assert_eq!(handle(&mut session, Request::TraceNotify(PARAMS)), Flow::Continue);
        assert!(session.log[0].contains("without --trace"), "{:?}", session.log);
        assert!(session.trace_ring.is_none());
        // Not a ring, a ring past the end of RAM, one larger than allowed.
        let mut session = Session::new(&ram, Instant::now(), Echo::Quiet, vec![]).with_trace(Some(0));
        trace_ring(&ram, 0x20_0000, superos_protocol::trace::TRACE_RING_MAX_CAPACITY + 1, &[]);
        for gpa in [0x30_0000, ram.size() - 16, u64::MAX - 7, 0x20_0000] {
            assert_eq!(handle(&mut session, Request::TraceNotify(gpa)), Flow::Continue);
        }
        assert_eq!(session.log.len(), 4, "{:?}", session.log);
        assert!(session.trace_ring.is_none());
        // Once announced, another ring is refused.
        assert_eq!(handle(&mut session, Request::TraceNotify(PARAMS)), Flow::Continue);
        assert_eq!(handle(&mut session, Request::TraceNotify(PARAMS + 0x1000)), Flow::Continue);
        assert!(session.log[4].contains("the kernel announced 0x100000"), "{:?}", session.log);
        // Indices that claim more than the ring holds.
        ram.write(PARAMS + 16, &100u64).unwrap();
        assert_eq!(handle(&mut session, Request::TraceNotify(PARAMS)), Flow::Continue);
        assert!(session.log[5].contains("trace ring indices are inconsistent"), "{:?}", session.log);
        assert!(session.trace.as_ref().unwrap().records().is_empty());
    }
}
