//! `superos-vmm inspect`: the command-line client of the control socket
//! ([`crate::api`]) and the offline reader of snapshots
//! ([`crate::snapshot`]). Both answer with [`crate::inspect::answer`] and
//! print with [`crate::inspect::render`] (or `--json`), so a live VM and a
//! snapshot of it look the same.
//!
//! Exit status: 0 answered; 1 the VMM refused the request (no such
//! process, an unmapped range to dump, ...); 2 bad arguments, no VMM at the
//! socket, or an unreadable snapshot; 5 `check` found an isolation
//! invariant violated; 6 the answer could not be written to stdout.

use crate::api::{Client, ClientError, ControlResult, Request};
use crate::inspect::{self, CheckResult, EventsResult, Machine, MapResult, MAX_EVENTS_PER_ANSWER};
use crate::snapshot;
use crate::svg;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Exit status: answered.
pub const EXIT_OK: u8 = 0;
/// Exit status: the VMM refused the request.
pub const EXIT_REFUSED: u8 = 1;
/// Exit status: bad arguments, no VMM, unreadable snapshot.
pub const EXIT_USAGE: u8 = 2;
/// Exit status: `check` found a violation.
pub const EXIT_VIOLATED: u8 = 5;
/// Exit status: the answer could not be written (stdout, the SVG file).
pub const EXIT_OUTPUT_FAILED: u8 = 6;

const EXAMPLES: &str = "\
Examples:
  superos-vmm run shm-pipeline --api /tmp/vm.sock --paused &    a VM waiting to be examined
  superos-vmm inspect --api /tmp/vm.sock resume                 let it run
  superos-vmm inspect --api /tmp/vm.sock ps                     live processes
  superos-vmm inspect --api /tmp/vm.sock maps 1                 what pid 1 maps, from its page tables
  superos-vmm inspect --api /tmp/vm.sock check                  the isolation invariants, now
  superos-vmm inspect --api /tmp/vm.sock dump 1 0x400000 64     bytes pid 1 maps
  superos-vmm inspect --api /tmp/vm.sock regs 1                 the registers pid 1 resumes with
  superos-vmm inspect --api /tmp/vm.sock core 1 hello.core      a core file of pid 1, for gdb
  superos-vmm inspect --api /tmp/vm.sock events --follow        kernel events until the guest stops
  superos-vmm inspect --api /tmp/vm.sock map --svg memory.svg   physical memory, coloured by owner
  superos-vmm inspect --snapshot vm.snap ps                     the same, offline

Exit status: 0 answered; 1 the VMM refused the request; 2 bad arguments, no VMM at the
socket or an unreadable snapshot; 5 `check` found an isolation invariant violated;
6 the answer could not be written to stdout.";

/// `superos-vmm inspect` arguments.
#[derive(clap::Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct InspectArgs {
    /// The control socket of a `superos-vmm run --api <SOCKET>`.
    /// (Before or after the request.)
    #[arg(long, value_name = "SOCKET", global = true, conflicts_with = "snapshot")]
    pub api: Option<PathBuf>,
    /// A snapshot written by `superos-vmm run --snapshot-on-exit <FILE>`, examined offline
    /// (before or after the request).
    #[arg(long, value_name = "FILE", global = true)]
    pub snapshot: Option<PathBuf>,
    /// Print the answer as JSON (events: one object per line) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// With --api: wait up to SECONDS for the VMM's socket to accept a
    /// connection (a VMM just started in the background may not serve yet).
    #[arg(long, value_name = "SECONDS", global = true, default_value_t = 0.0)]
    pub wait: f64,
    /// What to show or do.
    #[command(subcommand)]
    pub command: InspectCommand,
}

/// One `inspect` command.
#[derive(clap::Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum InspectCommand {
    /// Where the guest is: running, paused (and where), or finished.
    Status,
    /// Live processes: state, PML4, the kernel's counters against their
    /// quotas, and what walking their page tables finds.
    Ps,
    /// A process's mappings, from walking its page tables: address ranges
    /// with rights, frames and owners.
    Maps {
        /// The process.
        pid: u32,
    },
    /// Frames per owner (free, kernel, page tables, private, shared, messages).
    Frames,
    /// Shared regions: owner, frames, participants with their rights and mappings.
    Shares,
    /// The kernel's events so far.
    Events {
        /// Keep printing new events until the guest stops.
        #[arg(long)]
        follow: bool,
    },
    /// Run the isolation checker now and show what it finds.
    Check,
    /// Walk one virtual address of a process through its page tables.
    Translate {
        /// The process.
        pid: u32,
        /// The address (0x... or decimal).
        #[arg(value_parser = parse_number)]
        vaddr: u64,
    },
    /// Hex dump of bytes a process maps (refused where it maps nothing).
    Dump {
        /// The process.
        pid: u32,
        /// First address (0x... or decimal).
        #[arg(value_parser = parse_number)]
        vaddr: u64,
        /// How many bytes (at most 65536).
        #[arg(value_parser = parse_number)]
        len: u64,
    },
    /// A process's user registers (those it resumes with) and where the
    /// kernel keeps them.
    Regs {
        /// The process.
        pid: u32,
    },
    /// Write an ELF core file of a live process (its registers and every
    /// page it maps), for `gdb PROGRAM FILE`. A running guest is paused
    /// while it is read and resumed after.
    Core {
        /// The process.
        pid: u32,
        /// The core file to write.
        file: PathBuf,
    },
    /// Physical memory frame by frame, coloured by owner.
    Map {
        /// Draw it into this SVG file.
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
    },
    /// Hold the vCPU at the next consistent point until `resume`.
    Pause,
    /// Let a paused vCPU run again.
    Resume,
    /// Stop the guest if it still runs and end the VMM (ends `run --linger`).
    Quit,
}

/// Parses `0x...` hex or decimal.
pub fn parse_number(text: &str) -> Result<u64, String> {
    let text = text.trim().replace('_', "");
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("`{text}` is not a number (use 0x... for hex)"))
}

impl InspectCommand {
    /// The socket request for this command.
    pub fn request(&self) -> Request {
        match *self {
            InspectCommand::Status => Request::Status,
            InspectCommand::Ps => Request::Ps,
            InspectCommand::Maps { pid } => Request::Maps { pid },
            InspectCommand::Frames => Request::Frames,
            InspectCommand::Shares => Request::Shares,
            InspectCommand::Events { .. } => Request::Events { since: 0, wait_ms: 0 },
            InspectCommand::Check => Request::Check,
            InspectCommand::Translate { pid, vaddr } => Request::Translate { pid, vaddr },
            InspectCommand::Dump { pid, vaddr, len } => Request::Dump { pid, vaddr, len },
            InspectCommand::Map { .. } => Request::Map,
            InspectCommand::Regs { pid } => Request::Registers { pid },
            // Registers first; `core` asks for the rest itself.
            InspectCommand::Core { pid, .. } => Request::Registers { pid },
            InspectCommand::Pause => Request::Pause,
            InspectCommand::Resume => Request::Resume,
            InspectCommand::Quit => Request::Quit,
        }
    }
}

fn print(text: &str) {
    let mut stdout = std::io::stdout().lock();
    if stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).is_err() {
        crate::session::note_output_failure();
    }
}

/// Set by `--json`: a failure is also a JSON object on stdout.
static JSON_ERRORS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Reports a failure on stderr (and with `--json` as
/// `{"error":"...","exit_status":N}` on stdout, where a script reads) and
/// returns `code`.
fn fail(code: u8, message: &str) -> u8 {
    let _ = writeln!(std::io::stderr(), "superos-vmm inspect: {message}");
    if JSON_ERRORS.load(std::sync::atomic::Ordering::Relaxed) {
        print(&format!("{}\n", json!({ "error": message, "exit_status": code })));
    }
    code
}

/// Where answers come from.
enum Source {
    Live(Client),
    Offline(Box<snapshot::Loaded>),
}

impl Source {
    fn ask(&mut self, request: &Request) -> Result<Value, ClientError> {
        match self {
            Source::Live(client) => client.request(request),
            Source::Offline(loaded) => {
                let machine = Machine { ram: &loaded.ram, state: &loaded.state };
                match request {
                    Request::Pause | Request::Resume | Request::Quit => Err(ClientError::Refused(format!(
                        "`{}` needs a running VMM (--api); a snapshot cannot be paused, resumed or quit",
                        request.name()
                    ))),
                    Request::Status => {
                        let meta = &loaded.meta;
                        Ok(json!(ControlResult {
                            state: "snapshot".into(),
                            message: format!(
                                "snapshot of {} written by superos-vmm {} {}; {} events ({} lost)",
                                inspect::sanitize(&meta.scenario),
                                inspect::sanitize(&meta.vmm_version),
                                loaded.state.point,
                                loaded.state.events.len(),
                                meta.lost_events
                            ),
                            clients: 0,
                        }))
                    }
                    query => inspect::answer(&machine, query).map_err(ClientError::Refused),
                }
            }
        }
    }
}

/// Runs `superos-vmm inspect`; returns the exit status (non-zero if the
/// answer could not be written).
pub fn main(args: InspectArgs) -> u8 {
    JSON_ERRORS.store(args.json, std::sync::atomic::Ordering::Relaxed);
    match answer(args) {
        EXIT_OK if crate::session::output_failed() => {
            fail(EXIT_OUTPUT_FAILED, "could not write the answer to stdout")
        }
        status => status,
    }
}

fn answer(args: InspectArgs) -> u8 {
    let mut source = match (&args.api, &args.snapshot) {
        (Some(_), Some(_)) => {
            return fail(EXIT_USAGE, "give one of --api <SOCKET> and --snapshot <FILE>, not both")
        }
        (Some(path), None) => {
            if !(args.wait.is_finite() && (0.0..=3600.0).contains(&args.wait)) {
                return fail(EXIT_USAGE, &format!("--wait must be 0 to 3600 seconds, not {}", args.wait));
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(args.wait);
            loop {
                match Client::connect(path) {
                    Ok(client) => break Source::Live(client),
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(20))
                    }
                    Err(error) => return fail(EXIT_USAGE, &error.to_string()),
                }
            }
        }
        (None, Some(file)) => match snapshot::read(file) {
            Ok(loaded) => Source::Offline(Box::new(loaded)),
            Err(error) => return fail(EXIT_USAGE, &error.to_string()),
        },
        (None, None) => {
            return fail(EXIT_USAGE, "name a VMM with --api <SOCKET> or a snapshot with --snapshot <FILE>")
        }
    };
    if matches!(source, Source::Offline(_))
        && matches!(args.command, InspectCommand::Pause | InspectCommand::Resume | InspectCommand::Quit)
    {
        let name = args.command.request().name();
        return fail(
            EXIT_USAGE,
            &format!("`{name}` needs a running VMM (--api); a snapshot cannot be paused, resumed or quit"),
        );
    }
    match &args.command {
        InspectCommand::Events { follow } => events(&mut source, *follow, args.json),
        InspectCommand::Map { svg } => map(&mut source, svg.as_deref(), args.json),
        InspectCommand::Core { pid, file } => core(&mut source, *pid, file, args.json),
        command => {
            let request = command.request();
            let value = match source.ask(&request) {
                Ok(value) => value,
                Err(ClientError::Refused(why)) => return fail(EXIT_REFUSED, &why),
                Err(ClientError::Transport(why)) => return fail(EXIT_USAGE, &why),
            };
            if args.json {
                print(&format!("{value}\n"));
            } else {
                match inspect::render(&request, &value) {
                    Ok(text) => print(&text),
                    Err(why) => return fail(EXIT_USAGE, &why),
                }
            }
            match serde_json::from_value::<CheckResult>(value) {
                Ok(check) if request == Request::Check && !check.violations.is_empty() => EXIT_VIOLATED,
                _ => EXIT_OK,
            }
        }
    }
}

fn events(source: &mut Source, follow: bool, json: bool) -> u8 {
    if follow && matches!(source, Source::Offline(_)) {
        return fail(EXIT_USAGE, "--follow needs a running VMM (--api); a snapshot has no new events");
    }
    let mut since = 0;
    loop {
        let wait_ms = if follow { 1000 } else { 0 };
        let value = match source.ask(&Request::Events { since, wait_ms }) {
            Ok(value) => value,
            Err(ClientError::Refused(why)) => return fail(EXIT_REFUSED, &why),
            // The VMM ended (it does not linger): that is the end of the events.
            Err(ClientError::Transport(_)) if follow && since > 0 => return EXIT_OK,
            Err(ClientError::Transport(why)) => return fail(EXIT_USAGE, &why),
        };
        let answer: EventsResult = match serde_json::from_value(value) {
            Ok(answer) => answer,
            Err(e) => return fail(EXIT_USAGE, &format!("unexpected answer from the VMM: {e}")),
        };
        let mut text = String::new();
        for event in &answer.events {
            if json {
                text.push_str(&event.event.to_string());
            } else {
                text.push_str(&event.text);
            }
            text.push('\n');
        }
        print(&text);
        since = answer.next;
        let more = answer.events.len() == MAX_EVENTS_PER_ANSWER;
        if more {
            continue;
        }
        if let Some(exit) = answer.finished {
            if follow && !json {
                let _ = writeln!(std::io::stderr(), "superos-vmm inspect: the guest has stopped: {exit}");
            }
            return EXIT_OK;
        }
        if !follow {
            return EXIT_OK;
        }
    }
}

/// Asks `request` and decodes its answer as `T`; a failure is the exit
/// status and message `fail` reports.
fn ask_as<T: serde::de::DeserializeOwned>(source: &mut Source, request: &Request) -> Result<T, (u8, String)> {
    let value = source.ask(request).map_err(|e| match e {
        ClientError::Refused(why) => (EXIT_REFUSED, why),
        ClientError::Transport(why) => (EXIT_USAGE, why),
    })?;
    serde_json::from_value(value).map_err(|e| (EXIT_USAGE, format!("unexpected answer from the VMM: {e}")))
}

/// `core <pid> <file>`: the process's registers (`regs`), its mappings
/// (`maps`) and their bytes (`dump`, [`inspect::MAX_DUMP`] at a time) made
/// into a core file ([`crate::core_dump::assemble`]). A running guest is
/// paused for the reading, so that all of it is of one moment, and resumed.
fn core(source: &mut Source, pid: u32, file: &Path, json: bool) -> u8 {
    let paused_here = match source {
        Source::Live(_) => match ask_as::<ControlResult>(source, &Request::Status) {
            Ok(status) if status.state == "running" => match ask_as::<ControlResult>(source, &Request::Pause)
            {
                Ok(_) => true,
                Err((code, why)) => return fail(code, &why),
            },
            Ok(_) => false,
            Err((code, why)) => return fail(code, &why),
        },
        Source::Offline(_) => false,
    };
    let written = read_core(source, pid);
    if paused_here {
        if let Err((code, why)) = ask_as::<ControlResult>(source, &Request::Resume) {
            return fail(code, &format!("the core was read, but the guest could not be resumed: {why}"));
        }
    }
    let (regs, segments) = match written {
        Ok(read) => read,
        Err((code, why)) => return fail(code, &why),
    };
    let fault_registers = superos_protocol::introspect::FaultRegisters {
        pid,
        vector: regs.entry.map_or(0, |(vector, _)| u32::try_from(vector).unwrap_or(u32::MAX)),
        pml4: regs.pml4,
        error_code: regs.entry.map_or(0, |(_, code)| code),
        addr: 0,
        rax: regs.get("rax"),
        rbx: regs.get("rbx"),
        rcx: regs.get("rcx"),
        rdx: regs.get("rdx"),
        rsi: regs.get("rsi"),
        rdi: regs.get("rdi"),
        rbp: regs.get("rbp"),
        rsp: regs.get("rsp"),
        r8: regs.get("r8"),
        r9: regs.get("r9"),
        r10: regs.get("r10"),
        r11: regs.get("r11"),
        r12: regs.get("r12"),
        r13: regs.get("r13"),
        r14: regs.get("r14"),
        r15: regs.get("r15"),
        rip: regs.get("rip"),
        rflags: regs.get("rflags"),
        cs: regs.get("cs"),
        ss: regs.get("ss"),
    };
    let process = crate::core_dump::CoreProcess {
        name: &regs.name,
        regs: fault_registers,
        fault: None,
        event: regs.at.clone(),
        live: true,
    };
    let bytes = crate::core_dump::assemble(&process, &segments);
    if let Err(e) = std::fs::write(file, &bytes) {
        return fail(EXIT_OUTPUT_FAILED, &format!("cannot write {}: {e}", file.display()));
    }
    let pages: usize = segments.iter().map(|s| s.bytes.len() / 4096).sum();
    if json {
        print(&format!(
            "{}\n",
            json!({ "file": file.display().to_string(), "pid": pid, "name": regs.name, "at": regs.at,
                    "registers_from": regs.source, "segments": segments.len(), "pages": pages, "bytes": bytes.len() })
        ));
    } else {
        print(&format!(
            "wrote {}: pid {} ({}) {}, registers from {}, {} pages in {} segments\n",
            file.display(),
            pid,
            regs.name,
            regs.at,
            regs.source,
            pages,
            segments.len()
        ));
    }
    EXIT_OK
}

/// The registers and memory of process `pid`, for [`core`].
fn read_core(
    source: &mut Source,
    pid: u32,
) -> Result<(inspect::RegistersResult, Vec<crate::core_dump::LoadSegment>), (u8, String)> {
    let regs: inspect::RegistersResult = ask_as(source, &Request::Registers { pid })?;
    let maps: inspect::MapsResult = ask_as(source, &Request::Maps { pid })?;
    if maps.partial {
        return Err((
            EXIT_REFUSED,
            format!("pid {pid}'s page tables are larger than the walk's budget: no core"),
        ));
    }
    let mut segments = Vec::new();
    for range in maps.ranges.iter().filter(|r| r.user) {
        let mut bytes = Vec::with_capacity((range.end - range.start) as usize);
        let mut at = range.start;
        while at < range.end {
            let len = (range.end - at).min(inspect::MAX_DUMP);
            let dump: inspect::DumpResult = ask_as(source, &Request::Dump { pid, vaddr: at, len })?;
            let chunk = inspect::hex_decode(&dump.hex)
                .filter(|chunk| chunk.len() as u64 == len)
                .ok_or((EXIT_USAGE, "unexpected answer from the VMM: bad hex".to_string()))?;
            bytes.extend_from_slice(&chunk);
            at += len;
        }
        segments.push(crate::core_dump::LoadSegment {
            va: range.start,
            writable: range.writable,
            executable: !range.nx,
            bytes,
        });
    }
    Ok((regs, segments))
}

fn map(source: &mut Source, file: Option<&Path>, json: bool) -> u8 {
    let value = match source.ask(&Request::Map) {
        Ok(value) => value,
        Err(ClientError::Refused(why)) => return fail(EXIT_REFUSED, &why),
        Err(ClientError::Transport(why)) => return fail(EXIT_USAGE, &why),
    };
    if json {
        print(&format!("{value}\n"));
    }
    if file.is_none() && json {
        return EXIT_OK;
    }
    let map: MapResult = match serde_json::from_value(value) {
        Ok(map) => map,
        Err(e) => return fail(EXIT_USAGE, &format!("unexpected answer from the VMM: {e}")),
    };
    let Some(file) = file else {
        print(&text_map(&map, TEXT_MAP_RUNS));
        return EXIT_OK;
    };
    if let Err(e) = std::fs::write(file, svg::render(&map)) {
        return fail(EXIT_USAGE, &format!("cannot write {}: {e}", file.display()));
    }
    if !json {
        let owners: std::collections::BTreeSet<&str> = map.runs.iter().map(|r| r.owner.as_str()).collect();
        let verdict = map.verdict();
        print(&format!(
            "wrote {}: {} MiB, {} frames, {} owners, {} live processes, {} shared regions {}; {verdict}\n",
            file.display(),
            map.ram_bytes >> 20,
            map.ram_bytes / 4096,
            owners.len(),
            map.processes.len(),
            map.regions.len(),
            map.at
        ));
    }
    EXIT_OK
}

/// Runs a text map lists at most.
const TEXT_MAP_RUNS: usize = 200;

/// `map` without `--svg`: physical memory as a list of runs of frames with
/// one owner, at most `limit` of them.
fn text_map(map: &MapResult, limit: usize) -> String {
    let verdict = map.verdict();
    let cpus = map.cpu_line().map_or(String::new(), |line| format!("{line}\n"));
    let mut out = format!(
        "physical memory {}: {} MiB, {} frames in {} runs; {verdict}\n{cpus}{:>12}  {:>12}  {:>7}  owner\n",
        map.at,
        map.ram_bytes >> 20,
        map.ram_bytes / 4096,
        map.runs.len(),
        "first",
        "last",
        "frames"
    );
    for run in map.runs.iter().take(limit) {
        let mut notes = String::new();
        if run.shared {
            notes.push_str("  (mapped by several processes)");
        }
        if run.violation {
            notes.push_str("  VIOLATION");
        }
        out.push_str(&format!(
            "{:>#12x}  {:>#12x}  {:>7}  {}{notes}\n",
            run.start,
            run.start + (run.frames.max(1) - 1) * 4096,
            run.frames,
            run.owner
        ));
    }
    if map.runs.len() > limit {
        out.push_str(&format!(
            "... {} more runs (--json lists them all, --svg draws them)\n",
            map.runs.len() - limit
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_map_lists_runs_and_says_what_it_left_out() {
        let run = |start: u64, frames: u64, owner: &str| crate::inspect::FrameRun {
            start,
            frames,
            owner: owner.into(),
            shared: false,
            violation: false,
        };
        let map = MapResult {
            at: "at event #3".into(),
            ram_bytes: 16 << 20,
            runs: vec![run(0, 256, "kernel"), run(0x10_0000, 3, "private:1"), run(0x10_3000, 3837, "free")],
            processes: Vec::new(),
            regions: Vec::new(),
            violated: Vec::new(),
            published: true,
            cpus: 1,
        };
        let text = text_map(&map, 2);
        assert!(text.starts_with("physical memory at event #3: 16 MiB, 4096 frames in 3 runs"), "{text}");
        assert!(text.contains("    0x100000      0x102000        3  private:1"), "{text}");
        assert!(text.contains("... 1 more runs"), "{text}");
        assert!(!text.contains("free"), "{text}");
    }

    #[test]
    fn numbers_parse_in_hex_and_decimal() {
        assert_eq!(parse_number("0x400000"), Ok(0x40_0000));
        assert_eq!(parse_number("0X10"), Ok(16));
        assert_eq!(parse_number("4096"), Ok(4096));
        assert_eq!(parse_number("0x7fff_ffff_0000"), Ok(0x7fff_ffff_0000));
        assert!(parse_number("0x").is_err());
        assert!(parse_number("-1").is_err());
        assert!(parse_number("0x1_0000_0000_0000_0000").is_err());
    }
}
