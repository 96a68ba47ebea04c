//! `superos-vmm`: command-line front end. Parses arguments, runs the
//! scenario, prints the summary, and maps the outcome to an exit status.

use clap::{Parser, Subcommand, ValueEnum};
use std::borrow::Cow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use superos_protocol::boot::{self, GatePreference, ScrubStrategy};
use superos_vmm::check::CheckMode;
use superos_vmm::images;
use superos_vmm::run::{self, RunConfig, RunReport, EXIT_USAGE};
use superos_vmm::scenario::Scenario;
use superos_vmm::session::{emit, Echo, EventFormat};

/// A line for people: on stdout (ignoring a closed stdout instead of
/// panicking), or on stderr while stdout carries JSON (`run --json`,
/// `run --events json`).
macro_rules! out {
    ($($arg:tt)*) => {
        human(format_args!($($arg)*))
    };
}

/// Set by `run --json` and `run --events json`: stdout is for JSON only.
static STDOUT_IS_JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn human(line: std::fmt::Arguments<'_>) {
    if STDOUT_IS_JSON.load(std::sync::atomic::Ordering::Relaxed) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    } else {
        emit(line);
    }
}

/// `--version`: the crate version, the git commit built from, and the
/// embedded kernel's build id (FNV-1a of its ELF).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("SUPEROS_GIT_COMMIT"),
    ", kernel ",
    env!("SUPEROS_KERNEL_ID"),
    ")"
);

#[derive(Parser)]
#[command(name = "superos-vmm", version = VERSION, about = "Boot the SuperOS kernel on KVM and run its processes")]
struct Cli {
    /// More log output on stderr: -v the VMM's steps, -vv each invariant check, -vvv each VM
    /// exit. RUST_LOG (tracing's filter syntax, e.g. `superos_vmm=debug`) overrides it.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot the kernel and run a scenario (the embedded `default` one if none is given).
    #[command(after_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// List the embedded scenarios and programs.
    List {
        /// Also each program's arguments (from its image).
        #[arg(long)]
        long: bool,
        /// Also write the kernel's and every embedded program's ELF file into
        /// this directory (created if missing), with their symbols and debug
        /// information, for gdb and objdump.
        #[arg(long, value_name = "DIR")]
        export: Option<std::path::PathBuf>,
    },
    /// Examine a running VM (`run --api`) or a snapshot (`run --snapshot-on-exit`).
    Inspect(superos_vmm::inspect_cli::InspectArgs),
    /// Measure SuperOS operations beside host baselines measured in the same run.
    #[command(after_help = superos_vmm::bench::BENCH_HELP)]
    Bench(superos_vmm::bench::BenchArgs),
    /// Create a program project: `cargo build --release` there, then
    /// `superos-vmm run DIR/scenario.toml`.
    New(superos_vmm::new_project::NewArgs),
    /// Print a shell completion script (e.g. `superos-vmm completions bash >
    /// ~/.local/share/bash-completion/completions/superos-vmm`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff; `superos-vmm man | man -l -`).
    Man,
}

const RUN_EXAMPLES: &str = "\
Examples:
  superos-vmm run                          run the embedded default scenario
  superos-vmm run two-hellos --stats       an embedded scenario, with exit counts and boot phases
  superos-vmm run my-scenario.toml         a scenario file (programs by name or ELF path)
  superos-vmm run --mem 128 --timeout 10   more guest memory, a shorter watchdog
  superos-vmm run --events json           events and console lines as JSON lines (summary on stderr)
  superos-vmm run --json > run.json        the whole run as one JSON document
  superos-vmm run --check every-event      check the isolation invariants at every kernel event
  superos-vmm run --api /tmp/vm.sock --linger   serve `superos-vmm inspect --api /tmp/vm.sock ...`
  superos-vmm run --snapshot-on-exit vm.snap    for `superos-vmm inspect --snapshot vm.snap ...`

Exit status: 0 every process did what the scenario expects; 1 some process did not;
2 bad arguments, scenario or image; 3 the guest crashed; 4 the watchdog fired;
5 an isolation invariant was violated (takes precedence over 1, 3 and 4; what the check at
a kernel panic finds is listed but leaves the status at 3). A guest stopped with
`inspect quit` exits 1 (its processes did not finish). 6: all went well but a requested
output (the snapshot, stdout) could not be written. 130/143: interrupted by SIGINT (Ctrl-C)
or SIGTERM: the guest stopped, the summary printed, the snapshot written whole, the
socket removed.";

#[derive(clap::Args)]
struct RunArgs {
    /// A scenario file (TOML) or the name of an embedded scenario (see `superos-vmm list`).
    #[arg(default_value = "default")]
    scenario: String,
    /// Guest memory in MiB (a multiple of 2, 16 to 3072); overrides the scenario's.
    #[arg(long, value_name = "MIB")]
    mem: Option<u64>,
    /// vCPUs (1 to 8); overrides the scenario's `[vm] cpus` (default 1). The kernel
    /// starts the others at boot; today they come online and idle (issue 14).
    #[arg(long, value_name = "N", value_parser = parse_cpus)]
    cpus: Option<u32>,
    /// Stop the guest after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = run::DEFAULT_TIMEOUT.as_secs_f64())]
    timeout: f64,
    /// Print VM exit counts and boot phase timings at the end.
    #[arg(long)]
    stats: bool,
    /// System-call gate the kernel tries first (it falls back if the boot self-test fails).
    #[arg(long, value_enum, default_value_t = Gate::Auto)]
    gate: Gate,
    /// Who zeroes freed frames before they are reused: the kernel, or the VMM at the
    /// kernel's request (one hypercall per batch; cheaper where ring-0 stores are emulated).
    #[arg(long, value_enum, default_value_t = Scrub::Auto)]
    scrub: Scrub,
    /// Boot this kernel ELF instead of the embedded one.
    #[arg(long, value_name = "ELF")]
    kernel: Option<PathBuf>,
    /// How kernel events are printed as they happen: `text` lines, or one JSON
    /// object per line (`{"seq":5,"tick":2,"kind":"process-exited","pid":3,...}`).
    #[arg(long, value_enum, default_value_t = Events::Text, value_name = "FORMAT")]
    events: Events,
    /// When the VMM checks the isolation invariants (page tables walked from
    /// outside against the kernel's published tables): at every kernel event,
    /// every <ms> milliseconds when the vCPU is in user mode (at least <ms> after the previous
    /// check ended), once at exit, or never.
    /// Default: the scenario's `[vm] check`, else `exit`.
    #[arg(long, value_name = "every-event|periodic:<ms>|exit|off", value_parser = parse_check)]
    check: Option<CheckMode>,
    /// Do not stop the guest at the first invariant violation: collect them
    /// all and report them at the end (the exit status is still 5).
    #[arg(long)]
    keep_going: bool,
    /// Only print the summary, not the console and events as they happen.
    #[arg(long, short)]
    quiet: bool,
    /// Print the run as one JSON document on stdout when it ends (what `--report` writes),
    /// and nothing else there: the summary goes to stderr, nothing is printed live.
    #[arg(long, conflicts_with = "events")]
    json: bool,
    /// Also write the run as one JSON document to FILE: each process's outcome against its
    /// expectation, the exit and its status, events, console lines, checks, violations, phases.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    #[command(flatten)]
    observe: superos_vmm::control::ObserveArgs,
    /// Write an ELF core file into DIR (created if missing) for every process the kernel
    /// kills: its registers at the fault, every page it maps, and a note with the fault and
    /// its event. Open it with `gdb PROGRAM DIR/NAME.PID.core` (the programs' ELF files:
    /// `superos-vmm list --export DIR`). Makes every kernel event a VM exit.
    #[arg(long, value_name = "DIR")]
    core_dir: Option<PathBuf>,
    /// Write the run's timeline to FILE as Chrome/Perfetto trace-event JSON (ui.perfetto.dev,
    /// chrome://tracing): a track per process (its life, its kernel events, its system calls),
    /// per CPU (the processes it ran), per vCPU (its VM exits) and for the VMM (invariant
    /// checks with their durations, holds). Makes every kernel event a VM exit, and has the
    /// kernel keep TSC-stamped run and system-call records (getpid then takes its lock).
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Make the kernel misbehave on purpose, to exercise the VMM's reports.
    #[arg(long, value_enum, hide = true)]
    debug_inject: Vec<Inject>,
}

fn parse_cpus(text: &str) -> Result<u32, String> {
    let n: i64 = text.parse().map_err(|_| format!("`{text}` is not a number of vCPUs"))?;
    superos_vmm::scenario::parse_cpus(n)
}

fn parse_check(text: &str) -> Result<CheckMode, String> {
    text.parse()
}

#[derive(Clone, Copy, ValueEnum)]
enum Gate {
    Auto,
    Syscall,
    Int3,
}

#[derive(Clone, Copy, ValueEnum)]
enum Scrub {
    /// The kernel picks: the VMM on the PVM host, itself on ordinary KVM.
    Auto,
    /// The kernel zeroes every freed frame itself.
    Kernel,
    /// The kernel hands batches of freed frames to the VMM, which zeroes them.
    Vmm,
}

#[derive(Clone, Copy, ValueEnum)]
enum Events {
    /// `event #N tick T <description>` lines, for people.
    Text,
    /// One JSON object per event and per console line on stdout, for programs (the summary goes to stderr).
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Inject {
    /// Panic right after boot.
    Panic,
    /// Triple-fault during boot.
    TripleFault,
    /// Send malformed hypercalls and check they are refused.
    BadHypercalls,
    /// Flood the VMM with malformed hypercalls and unknown-port writes.
    HypercallFlood,
    /// Corrupt the event ring header.
    CorruptEventRing,
    /// Corrupt the introspection root.
    CorruptIntrospection,
    /// Spin forever in ring 0.
    SpinInKernel,
    /// Send a boot hello with the wrong protocol version first.
    BadHello,
    /// Overwrite kernel text from ring 0 (CR0.WP cleared), as a compromised kernel would.
    WriteKernelText,
    /// Free the first non-zero frame released after boot without zeroing it.
    SkipOneScrub,
    /// Flood the console forever (partial lines from ever-new pids, long lines); only --timeout ends it.
    ConsoleFlood,
    /// Flood the event ring forever; only --timeout ends it.
    EventFlood,
    /// Send the boot hello a second time after boot (a violation).
    SecondHello,
    /// Revoke only the named capability, not what was derived from it (a violation).
    ShallowRevocation,
    /// Never ask another CPU to flush its TLB (no TLB shootdown).
    SkipShootdown,
    /// All guest RAM made resident, then console, scrub and event floods in turn, forever.
    AllFlood,
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match cli.command {
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "superos-vmm", &mut script);
            write_stdout(&script)
        }
        Command::Man => {
            use clap::CommandFactory;
            let mut page = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut page) {
                Ok(()) => write_stdout(&page),
                Err(e) => {
                    eprintln!("superos-vmm: error: cannot render the manual page: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::List { long, export } => {
            out!("embedded scenarios:");
            for name in images::scenario_names() {
                let description = Scenario::load(name).map(|s| s.description).unwrap_or_default();
                out!("  {name:<14} {description}");
            }
            if long {
                out!("embedded programs and their arguments (an unknown one makes a program exit 2):");
                for name in images::program_names() {
                    let usage = images::program(name).and_then(images::usage);
                    let usage = match usage.as_deref() {
                        Some("") => "(no arguments)".to_string(),
                        Some(usage) => usage.to_string(),
                        None => "(arguments not declared)".to_string(),
                    };
                    out!("  {name:<14} {usage}");
                }
            } else {
                out!("embedded programs: {}", images::program_names().join(", "));
                out!("(`superos-vmm list --long` shows each program's arguments)");
            }
            match export.map(|dir| images::export(&dir).map(|written| (dir, written))) {
                None => ExitCode::SUCCESS,
                Some(Ok((dir, written))) => {
                    out!("wrote {} ELF files into {}: {}", written.len(), dir.display(), written.join(", "));
                    ExitCode::SUCCESS
                }
                Some(Err(e)) => {
                    use std::io::Write;
                    let _ = writeln!(std::io::stderr(), "superos-vmm: error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Bench(args) => ExitCode::from(superos_vmm::bench::command(args) as u8),
        Command::New(args) => match superos_vmm::new_project::create(&args) {
            Ok(name) => {
                let dir = args.dir.display();
                out!("created the SuperOS program project {name} in {dir}");
                out!("  build it:  (cd {dir} && cargo build --release)");
                out!("  run it:    superos-vmm run {dir}/scenario.toml");
                ExitCode::SUCCESS
            }
            Err(e) => {
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "superos-vmm: error: {e}");
                ExitCode::from(1)
            }
        },
        Command::Inspect(args) => ExitCode::from(superos_vmm::inspect_cli::main(args)),
        Command::Run(args) => match run_command(args, started) {
            Ok(code) => ExitCode::from(code as u8),
            Err(message) => {
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "superos-vmm: error: {message}");
                ExitCode::from(EXIT_USAGE as u8)
            }
        },
    }
}

/// Writes generated text to stdout: a closed pipe or a full disk is the
/// exit status for an output that could not be written, not a panic.
fn write_stdout(bytes: &[u8]) -> ExitCode {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(run::EXIT_OUTPUT_FAILED as u8),
    }
}

/// Log output (tracing) on stderr: warnings by default, more with each
/// `-v`; `RUST_LOG`, when set, decides instead.
fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "superos_vmm=info",
        2 => "superos_vmm=debug",
        _ => "superos_vmm=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // A second initialisation (never here) would only be refused.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn run_command(args: RunArgs, started: Instant) -> Result<i32, String> {
    let scenario = Scenario::load(&args.scenario).map_err(|e| e.to_string())?;
    // At most a year: the watchdog's deadline is an `Instant` plus it.
    const MAX_TIMEOUT_SECS: f64 = 366.0 * 24.0 * 3600.0;
    if !(args.timeout.is_finite() && args.timeout > 0.0 && args.timeout <= MAX_TIMEOUT_SECS) {
        return Err(format!(
            "--timeout must be a positive number of seconds, at most {MAX_TIMEOUT_SECS} (a year), not {}",
            args.timeout
        ));
    }
    let kernel = match &args.kernel {
        Some(path) => Cow::Owned(
            superos_vmm::input::read_regular(path, superos_vmm::input::MAX_ELF_BYTES)
                .map_err(|e| format!("cannot read kernel {}: {e}", path.display()))?,
        ),
        None => Cow::Borrowed(images::KERNEL_ELF),
    };
    let debug_flags = args.debug_inject.iter().fold(0, |flags, inject| {
        flags
            | match inject {
                Inject::Panic => boot::DEBUG_PANIC_AFTER_BOOT,
                Inject::TripleFault => boot::DEBUG_TRIPLE_FAULT,
                Inject::BadHypercalls => boot::DEBUG_BAD_HYPERCALLS,
                Inject::HypercallFlood => boot::DEBUG_HYPERCALL_FLOOD,
                Inject::CorruptEventRing => boot::DEBUG_CORRUPT_EVENT_RING,
                Inject::CorruptIntrospection => boot::DEBUG_CORRUPT_INTROSPECTION,
                Inject::SpinInKernel => boot::DEBUG_SPIN_IN_KERNEL,
                Inject::BadHello => boot::DEBUG_BAD_HELLO,
                Inject::WriteKernelText => boot::DEBUG_WRITE_KERNEL_TEXT,
                Inject::SkipOneScrub => boot::DEBUG_SKIP_ONE_SCRUB,
                Inject::ConsoleFlood => boot::DEBUG_CONSOLE_FLOOD,
                Inject::EventFlood => boot::DEBUG_EVENT_FLOOD,
                Inject::SecondHello => boot::DEBUG_SECOND_HELLO,
                Inject::ShallowRevocation => boot::DEBUG_SHALLOW_REVOCATION,
                Inject::SkipShootdown => boot::DEBUG_SKIP_SHOOTDOWN,
                Inject::AllFlood => boot::DEBUG_ALL_FLOOD,
            }
    });
    let check = args.check.or(scenario.check).unwrap_or(CheckMode::Exit);
    if let Some(dir) = &args.core_dir {
        superos_vmm::core_dump::prepare_dir(dir)?;
    }
    let config = RunConfig {
        scenario,
        kernel,
        memory_mib: args.mem,
        cpus: args.cpus,
        timeout: Duration::from_secs_f64(args.timeout),
        gate: match args.gate {
            Gate::Auto => GatePreference::Auto,
            Gate::Syscall => GatePreference::Syscall,
            Gate::Int3 => GatePreference::Int3,
        },
        scrub: match args.scrub {
            Scrub::Auto => ScrubStrategy::Auto,
            Scrub::Kernel => ScrubStrategy::Kernel,
            Scrub::Vmm => ScrubStrategy::Hypercall,
        },
        debug_flags,
        echo: if args.quiet || args.json { Echo::Quiet } else { Echo::Live },
        events: match args.events {
            Events::Text => EventFormat::Text,
            Events::Json => EventFormat::Json,
        },
        started,
        check,
        keep_going: args.keep_going,
        tamper: None,
        vcpu_tamper: None,
        limits: Default::default(),
        core_dir: args.core_dir.clone(),
        trace: args.trace.clone(),
    };
    // Ctrl-C and SIGTERM stop the guest as the watchdog would (the summary,
    // the snapshot and the socket's removal then happen as usual).
    superos_vmm::interrupt::install()?;
    QUIET.store(args.quiet || args.json, std::sync::atomic::Ordering::Relaxed);
    STDOUT_IS_JSON
        .store(args.json || config.events == EventFormat::Json, std::sync::atomic::Ordering::Relaxed);
    let origin = config.scenario.origin.clone();
    if !(args.quiet || args.json) {
        out!("superos-vmm: running {origin}: {}", config.scenario.description);
    }
    let mut extras = args.observe.extras();
    let lingers = extras.lingers();
    if lingers {
        // Print the summary when the guest stops, not after `inspect quit`.
        extras.on_finish = Some(print_summary);
    }
    // The report's file is created before the guest runs (a bad path is a
    // usage error at once) and written whole at the end.
    let report_file = match &args.report {
        Some(path) => Some((
            path,
            std::fs::File::create(path)
                .map_err(|e| format!("cannot create the report {}: {e}", path.display()))?,
        )),
        None => None,
    };
    let report = run::run_with(config, extras).map_err(|e| e.to_string())?;
    if !lingers {
        print_summary(&report);
    }
    let document = || {
        let document = superos_vmm::run_report::to_json(&report, &origin);
        serde_json::to_string_pretty(&document).unwrap_or_default()
    };
    if args.json {
        emit(format_args!("{}", document()));
    }
    if let Some((path, mut file)) = report_file {
        use std::io::Write;
        let text = document();
        if let Err(e) = file.write_all(text.as_bytes()).and_then(|()| file.write_all(b"\n")) {
            eprintln!("superos-vmm: could not write the report {}: {e}", path.display());
            if report.exit_status() == run::EXIT_OK {
                return Ok(run::EXIT_OUTPUT_FAILED);
            }
        }
    }
    if args.stats {
        print_stats(&report);
    }
    // A requested output that could not be written (stdout here; the
    // snapshot is in the report) makes the status non-zero.
    match report.exit_status() {
        run::EXIT_OK if superos_vmm::session::output_failed() => {
            eprintln!("superos-vmm: could not write the output to stdout");
            Ok(run::EXIT_OUTPUT_FAILED)
        }
        status => Ok(status),
    }
}

/// `run -q`: no blank line before the summary.
static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn print_summary(report: &RunReport) {
    if let Some(diagnosis) = &report.diagnosis {
        use std::io::Write;
        let _ = write!(std::io::stderr(), "{diagnosis}");
    }
    let rows: Vec<(&str, String, String, String, &str)> = report
        .processes
        .iter()
        .map(|p| {
            let pid = p.pid.map_or("-".to_string(), |pid| pid.to_string());
            let verdict = if p.as_expected() { "ok" } else { "UNEXPECTED" };
            (p.name.as_str(), pid, p.describe(), p.expected.to_string(), verdict)
        })
        .collect();
    // Columns as wide as what they hold.
    let widest = |column: fn(&(&str, String, String, String, &str)) -> usize, title: &str| {
        rows.iter().map(column).max().unwrap_or(0).max(title.len())
    };
    let name_width = widest(|row| row.0.chars().count(), "process");
    let pid_width = widest(|row| row.1.len(), "pid");
    let outcome_width = widest(|row| row.2.len(), "outcome");
    let expected_width = widest(|row| row.3.len(), "expected");
    if !QUIET.load(std::sync::atomic::Ordering::Relaxed) {
        out!("");
    }
    out!("{:<name_width$}  {:>pid_width$}  {:<outcome_width$}  expected", "process", "pid", "outcome");
    for (name, pid, outcome, expected, verdict) in rows {
        out!("{name:<name_width$}  {pid:>pid_width$}  {outcome:<outcome_width$}  {expected:<expected_width$}  {verdict}");
    }
    if !report.violations.is_empty() {
        let total = report.violations.len() as u64 + report.violations_dropped;
        out!("");
        out!("isolation invariants VIOLATED ({total}):");
        for found in &report.violations {
            out!("  {found}");
        }
        if report.violations_dropped > 0 {
            out!("  ... and {} more", report.violations_dropped);
        }
    }
    for note in &report.check_notes {
        out!("superos-vmm: note: {note}");
    }
    if report.lost_events > 0 {
        out!("superos-vmm: note: {} events lost in the kernel's event ring", report.lost_events);
    }
    if !report.dropped.is_empty() {
        out!("superos-vmm: note: {}", report.dropped);
    }
    for core in &report.cores {
        out!("superos-vmm: core file {}", core.display());
    }
    let behaved = report.processes.iter().filter(|p| p.as_expected()).count();
    let checks = &report.stats.checks;
    let invariants = match (checks.checks, report.violations.len()) {
        (0, 0) => String::new(),
        (n, 0) => format!("; invariants held ({n} check{})", if n == 1 { "" } else { "s" }),
        (_, v) => format!("; {v} invariant violation{}", if v == 1 { "" } else { "s" }),
    };
    out!(
        "superos-vmm: {}; {behaved} of {} processes as expected{invariants}; {:.1} ms",
        report.exit,
        report.processes.len(),
        report.stats.wall.as_secs_f64() * 1e3
    );
}

fn print_stats(report: &RunReport) {
    let ms = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.3} ms", d.as_secs_f64() * 1e3));
    let phases = &report.stats.phases;
    out!("host: {}", superos_vmm::vm::detect_host_kind());
    out!("boot phases (since VMM start):");
    out!("  vCPU start              {}", ms(phases.vcpu_start));
    out!("  kernel entry            {}", ms(phases.kernel_entry));
    out!("  first user instruction  {}", ms(phases.first_user_instruction));
    out!("  guest exit              {}", ms(phases.guest_exit));
    let by_cpu = &report.stats.exits_by_cpu;
    if by_cpu.is_empty() {
        out!("VM exits:");
        for (kind, count) in &report.stats.exits {
            out!("  {kind:<28} {count}");
        }
        let total: u64 = report.stats.exits.values().sum();
        out!("  {:<28} {total}", "total");
    } else {
        // One column per vCPU, then the total.
        let header: String = (0..by_cpu.len()).map(|cpu| format!(" {:>9}", format!("vCPU {cpu}"))).collect();
        out!("VM exits:{:<21}{header} {:>9}", "", "total");
        let row = |kind: &str, count: &dyn Fn(&std::collections::BTreeMap<String, u64>) -> u64| {
            let cells: String = by_cpu.iter().map(|exits| format!(" {:>9}", count(exits))).collect();
            let total: u64 = by_cpu.iter().map(count).sum();
            out!("  {kind:<28}{cells} {total:>9}");
        };
        for kind in report.stats.exits.keys() {
            row(kind, &|exits| exits.get(kind).copied().unwrap_or(0));
        }
        row("total", &|exits| exits.values().sum());
        // Kernel events by the CPU that logged them.
        let events: String = (0..by_cpu.len() as u32)
            .map(|cpu| format!(" {:>9}", report.events.iter().filter(|e| e.cpu == Some(cpu)).count()))
            .collect();
        out!("  {:<28}{events} {:>9}", "kernel events logged", report.events.len());
        let pauses = report.stats.ap_pauses;
        out!(
            "the other vCPUs held out of the guest while the VMM looked at it: {} times, {:.3} ms in all",
            pauses.pauses,
            pauses.time.as_secs_f64() * 1e3
        );
    }
    let checks = &report.stats.checks;
    if checks.checks > 0 || checks.deferred > 0 {
        let per_check = |n: u64| n / checks.checks.max(1);
        out!("invariant checks:");
        out!(
            "  {:<28} {} ({} periodic ones in ring 3; {} kicks found the kernel running)",
            "checks",
            checks.checks,
            checks.in_ring3,
            checks.deferred
        );
        if let Some(gap) = checks.shortest_gap {
            out!("  {:<28} {:.3} ms", "shortest run between checks", gap.as_secs_f64() * 1e3);
        }
        out!(
            "  {:<28} {} ({} per check, {:.1} million per second of walking)",
            "page-table entries walked",
            checks.ptes_walked,
            per_check(checks.ptes_walked),
            checks.ptes_per_second() / 1e6
        );
        out!("  {:<28} {} ({} per check)", "tables read", checks.tables_read, per_check(checks.tables_read));
        out!("  {:<28} {} ({} per check)", "user mappings", checks.mappings, per_check(checks.mappings));
        out!(
            "  {:<28} {} ({} per check; {} per check known zero, not written since an earlier check read them)",
            "free frames read",
            checks.frames_scanned,
            per_check(checks.frames_scanned),
            per_check(checks.frames_known_zero)
        );
        out!(
            "  {:<28} {:.3} ms ({:.3} ms walking) for {} mappings, {} entries walked, {} free frames scanned",
            "the check at peak memory",
            checks.peak_time.as_secs_f64() * 1e3,
            checks.peak_walk_time.as_secs_f64() * 1e3,
            checks.peak_mappings,
            checks.peak_ptes,
            checks.peak_frames_scanned
        );
        out!(
            "  {:<28} {:.3} ms total ({:.3} ms walking), {:.3} ms per check, {:.3} ms at most",
            "time",
            checks.time.as_secs_f64() * 1e3,
            checks.walk_time.as_secs_f64() * 1e3,
            checks.time.as_secs_f64() * 1e3 / checks.checks.max(1) as f64,
            checks.max_time.as_secs_f64() * 1e3
        );
        if checks.cpu_checks > 0 {
            let per = |d: Duration| d.as_secs_f64() * 1e6 / checks.cpu_checks as f64;
            out!(
                "  {:<28} {}, {:.0} µs each ({:.0} µs reading the vCPU through KVM, {:.0} µs comparing with GDT, IDT and TSS read), {:.0} µs at most",
                "CPU-state checks",
                checks.cpu_checks,
                per(checks.cpu_read_time + checks.cpu_compare_time),
                per(checks.cpu_read_time),
                per(checks.cpu_compare_time),
                checks.cpu_max_time.as_secs_f64() * 1e6
            );
        }
    }
}
