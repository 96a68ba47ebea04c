//! The VMM-side state of one guest run: console, events, VMM log, boot
//! phases. Hypercall handlers update it; the run loop turns it into a
//! [`crate::run::RunReport`].

use crate::console::{Console, ConsoleLine};
use crate::events::EventRing;
use crate::memory::GuestRam;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use superos_protocol::event::{Event, EventRecord};

/// Prints one line on stdout. Write errors (a closed pipe, say) are
/// ignored: losing live output must not stop the VM.
pub fn emit(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// Warnings stored per run; later ones are only counted.
pub const MAX_WARNINGS: u64 = 100;

/// An event as received, with its ring metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventEntry {
    /// Sequence number assigned by the kernel.
    pub seq: u64,
    /// Timer tick at which it happened.
    pub tick: u64,
    /// The decoded event.
    pub event: Event,
}

/// Milestones of a run, measured from VMM start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Phases {
    /// The vCPU was about to run its first instruction.
    pub vcpu_start: Option<Duration>,
    /// The kernel's first hypercall (boot hello).
    pub kernel_entry: Option<Duration>,
    /// The kernel was about to run the first scenario process.
    pub first_user_instruction: Option<Duration>,
    /// The guest stopped.
    pub guest_exit: Option<Duration>,
}

/// Live-output settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Echo {
    /// Print console lines and events as they arrive.
    Live,
    /// Print nothing (tests, scripts using the report).
    Quiet,
}

/// State of one run.
pub struct Session<'a> {
    /// Guest RAM.
    pub ram: &'a GuestRam,
    /// When the VMM started (phases are relative to it).
    pub started: Instant,
    /// Where the phases are.
    pub phases: Phases,
    /// Complete console lines, in order.
    pub lines: Vec<ConsoleLine>,
    /// Events, in order.
    pub events: Vec<EventEntry>,
    /// Problems the VMM noticed about the guest (bad hypercalls etc.).
    pub log: Vec<String>,
    /// Records the kernel reported lost.
    pub lost_events: u64,
    /// Kernel text range announced at boot (gpa, len).
    pub kernel_text: Option<(u64, u64)>,
    warnings: u64,
    pub(crate) console: Console,
    pub(crate) ring: Option<EventRing>,
    echo: Echo,
    process_names: Vec<String>,
    pid_names: BTreeMap<u32, String>,
}

impl<'a> Session<'a> {
    /// A new session; `process_names` are the scenario's names by boot index.
    pub fn new(ram: &'a GuestRam, started: Instant, echo: Echo, process_names: Vec<String>) -> Self {
        Session {
            ram,
            started,
            phases: Phases::default(),
            lines: Vec::new(),
            events: Vec::new(),
            log: Vec::new(),
            lost_events: 0,
            kernel_text: None,
            warnings: 0,
            console: Console::default(),
            ring: None,
            echo,
            process_names,
            pid_names: BTreeMap::new(),
        }
    }

    /// Time since VMM start.
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Notes a problem with the guest's behaviour. After
    /// [`MAX_WARNINGS`] the rest are counted, not stored, so a guest that
    /// floods bad hypercalls cannot exhaust host memory.
    pub fn warn(&mut self, message: String) {
        self.warnings += 1;
        if self.warnings > MAX_WARNINGS {
            return;
        }
        let message = if self.warnings == MAX_WARNINGS {
            format!("{message} (further warnings are counted but not shown)")
        } else {
            message
        };
        if self.echo == Echo::Live {
            use std::io::Write;
            let _ = writeln!(std::io::stderr().lock(), "superos-vmm: {message}");
        }
        self.log.push(message);
    }

    /// Warnings raised, including suppressed ones.
    pub fn warning_count(&self) -> u64 {
        self.warnings
    }

    /// The label of a console source.
    pub fn label(&self, pid: u32) -> String {
        match (pid, self.pid_names.get(&pid)) {
            (0, _) => "kernel".to_string(),
            (_, Some(name)) => format!("{name}#{pid}"),
            (_, None) => format!("pid {pid}"),
        }
    }

    /// Records console lines.
    pub fn add_lines(&mut self, lines: Vec<ConsoleLine>) {
        for line in lines {
            if self.echo == Echo::Live {
                emit(format_args!("[{}] {}", self.label(line.pid), line.text));
            }
            self.lines.push(line);
        }
    }

    /// Records a drained event record.
    pub fn add_record(&mut self, record: EventRecord) {
        match record.decode() {
            Ok(event) => {
                if let Event::ProcessSpawned { pid, spec_index, .. } = event {
                    let name = self
                        .process_names
                        .get(spec_index as usize)
                        .cloned()
                        .unwrap_or_else(|| "?".into());
                    self.pid_names.insert(pid, name);
                }
                if self.echo == Echo::Live {
                    emit(format_args!(
                        "  event #{:<3} tick {:<5} {}",
                        record.seq, record.tick, event
                    ));
                }
                self.events.push(EventEntry {
                    seq: record.seq,
                    tick: record.tick,
                    event,
                });
            }
            Err(unknown) => self.warn(format!("event #{} has unknown kind {}", record.seq, unknown.0)),
        }
    }

    /// Flushes unterminated console lines at the end of a run.
    pub fn finish_console(&mut self) {
        let lines = self.console.flush();
        self.add_lines(lines);
    }
}
