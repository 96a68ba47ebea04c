//! `fuzz-campaign`: runs the system-call fuzzer (`examples/src/bin/fuzz.rs`)
//! over many seeds, each in its own guest with the VMM's invariant checker at
//! every event, and checks every oracle of `superos_tests::check_fuzz_run`.
//!
//! ```text
//! cargo run --release -p superos-tests --bin fuzz-campaign -- --seeds 500 [--start N] [--calls M] [--jobs 2]
//! ```
//!
//! A progress bar goes to stderr; the summary (seeds, calls, distinct error
//! codes, events, checks, failures with the command that reruns each) goes
//! to stdout. The scenario of every failing seed is also written to
//! `target/fuzz-failures/seed-<N>.toml`, runnable with `superos-vmm run`.
//! Exit status: 0 if every seed passed, 1 if any failed, 2 on bad arguments.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use superos_tests::{
    check_fuzz_run, config, describe_fuzz_failure, fuzz_case, fuzz_known_bug, fuzz_reproduce_command,
    scenario, FuzzCase, FuzzStats, FUZZ_CALLS, FUZZ_KNOWN_BUGS, FUZZ_SHAPES,
};
use superos_vmm::run::run;

const USAGE: &str = "usage: fuzz-campaign [--seeds N] [--start S] [--calls M] [--jobs J] [--shape X] \
                     [--verbose] [--trace] [--quiet]

  --seeds N   how many seeds to run (default 100): S, S+1, ..., S+N-1
  --start S   the first seed (default 1)
  --calls M   system calls per fuzzer process (default 400)
  --jobs J    guests run at once (default: the number of CPUs)
  --shape X   only seeds whose scenario has shape X (solo, pair, quota, passive, crowd,
              tight): the first N of them from S on
  --verbose   print every seed's scenario, outcome and console output
  --trace     make the fuzzers print every call and its result (with --verbose)
  --quiet     no progress bar, failures only in the summary";

/// Command-line options.
struct Options {
    seeds: u64,
    start: u64,
    calls: u64,
    jobs: usize,
    shape: Option<&'static str>,
    verbose: bool,
    trace: bool,
    quiet: bool,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        seeds: 100,
        start: 1,
        calls: FUZZ_CALLS,
        jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
        shape: None,
        verbose: false,
        trace: false,
        quiet: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = |what: &str| args.next().ok_or_else(|| format!("{what} needs a value"));
        let number = |what: &str, text: String| -> Result<u64, String> {
            text.parse().map_err(|_| format!("{what} {text}: not a number"))
        };
        match flag.as_str() {
            "--seeds" => options.seeds = number("--seeds", value("--seeds")?)?,
            "--start" => options.start = number("--start", value("--start")?)?,
            "--calls" => options.calls = number("--calls", value("--calls")?)?,
            "--jobs" => options.jobs = number("--jobs", value("--jobs")?)?.clamp(1, 64) as usize,
            "--shape" => {
                let name = value("--shape")?;
                let shape = FUZZ_SHAPES.iter().find(|shape| **shape == name);
                options.shape =
                    Some(shape.ok_or_else(|| format!("--shape {name}: not one of {FUZZ_SHAPES:?}"))?);
            }
            "--verbose" | "-v" => options.verbose = true,
            "--trace" => options.trace = true,
            "--quiet" | "-q" => options.quiet = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(options)
}

/// What one seed came to.
struct SeedResult {
    case: FuzzCase,
    wall: Duration,
    /// The run's numbers, or the problems found and the full description.
    outcome: Result<FuzzStats, (Vec<String>, String)>,
    /// Everything the run printed (for --verbose).
    details: String,
}

fn run_seed(seed: u64, options: &Options) -> SeedResult {
    let mut case = fuzz_case(seed, options.calls);
    if options.trace {
        case.toml = case.toml.replace(" calls=", " trace=1 calls=");
    }
    let started = Instant::now();
    let report = match run(config(scenario(&case.toml))) {
        Ok(report) => report,
        Err(error) => {
            let problem = format!("the VMM could not start the guest: {error}");
            let outcome = Err((vec![problem.clone()], problem));
            return SeedResult { case, wall: started.elapsed(), outcome, details: String::new() };
        }
    };
    let wall = started.elapsed();
    let mut details = String::new();
    if options.verbose {
        details += &format!("== seed {seed} ({}):\n{}\n", case.shape, case.toml);
        for process in &report.processes {
            details += &format!("-- {} (pid {:?}): {}\n", process.name, process.pid, process.describe());
            for line in report.output_of(&process.name) {
                details += &format!("   | {line}\n");
            }
        }
        details += &format!(
            "-- {} events, {} invariant checks, {}, {:.2} s\n",
            report.events.len(),
            report.stats.checks.checks,
            report.exit,
            wall.as_secs_f64()
        );
    }
    let outcome = check_fuzz_run(&case, &report).map_err(|problems| {
        let description = describe_fuzz_failure(&case, &report, &problems);
        (problems, description)
    });
    SeedResult { case, wall, outcome, details }
}

/// A progress bar on stderr (a line per tenth when stderr is not a terminal).
struct Progress {
    total: usize,
    started: Instant,
    live: bool,
    quiet: bool,
    last_tenth: usize,
}

impl Progress {
    fn update(&mut self, done: usize, stats: &FuzzStats, failed: usize) {
        if self.quiet {
            return;
        }
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = if done == 0 { 0.0 } else { elapsed / done as f64 * (self.total - done) as f64 };
        let status = format!(
            "{done}/{} seeds, {} calls, {} distinct errors, {failed} failed, {} elapsed, eta {}",
            self.total,
            stats.calls,
            stats.errors.len(),
            clock(elapsed),
            clock(eta)
        );
        let mut stderr = std::io::stderr().lock();
        if self.live {
            const WIDTH: usize = 30;
            let filled = (done * WIDTH).checked_div(self.total).unwrap_or(WIDTH);
            let bar: String = (0..WIDTH)
                .map(|i| match i.cmp(&filled) {
                    std::cmp::Ordering::Less => '#',
                    std::cmp::Ordering::Equal => '>',
                    std::cmp::Ordering::Greater => '.',
                })
                .collect();
            let _ = write!(stderr, "\r\x1b[2K[{bar}] {status}");
            if done == self.total {
                let _ = writeln!(stderr);
            }
        } else {
            let tenth = (done * 10).checked_div(self.total).unwrap_or(10);
            if tenth != self.last_tenth || done == self.total {
                self.last_tenth = tenth;
                let _ = writeln!(stderr, "fuzz-campaign: {status}");
            }
        }
        let _ = stderr.flush();
    }
}

fn clock(seconds: f64) -> String {
    let seconds = seconds.round() as u64;
    if seconds >= 60 {
        format!("{}m{:02}s", seconds / 60, seconds % 60)
    } else {
        format!("{seconds}s")
    }
}

fn failures_dir() -> PathBuf {
    let tests = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    tests.parent().unwrap_or(&tests).join("target").join("fuzz-failures")
}

fn main() {
    let options = match parse_options() {
        Ok(options) => options,
        Err(error) => {
            eprintln!("fuzz-campaign: {error}\n{USAGE}");
            std::process::exit(2);
        }
    };
    if !superos_tests::kvm_available() {
        std::process::exit(2);
    }
    let seeds: Vec<u64> = (options.start..=u64::MAX)
        .filter(|&seed| options.shape.is_none_or(|shape| fuzz_case(seed, 0).shape == shape))
        .take(options.seeds as usize)
        .collect();
    let (first, last) = (seeds.first().copied().unwrap_or(0), seeds.last().copied().unwrap_or(0));
    println!(
        "fuzz-campaign: seeds {first}..={last} ({} seeds{}), {} calls per fuzzer, {} jobs, \
         invariants checked at every event",
        seeds.len(),
        options.shape.map_or(String::new(), |shape| format!(" of shape {shape}")),
        options.calls,
        options.jobs
    );
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let mut totals = FuzzStats::default();
    let mut failures: Vec<SeedResult> = Vec::new();
    let mut slowest = (0, Duration::ZERO);
    let mut progress = Progress {
        total: seeds.len(),
        started,
        live: std::io::stderr().is_terminal(),
        quiet: options.quiet || options.verbose,
        last_tenth: 0,
    };
    progress.update(0, &totals, 0);
    std::thread::scope(|scope| {
        let (sender, receiver) = mpsc::channel();
        for _ in 0..options.jobs.min(seeds.len().max(1)) {
            let sender = sender.clone();
            let (next, options, seeds) = (&next, &options, &seeds);
            scope.spawn(move || {
                while let Some(&seed) = seeds.get(next.fetch_add(1, Ordering::SeqCst)) {
                    if sender.send(run_seed(seed, options)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(sender);
        let mut done = 0;
        for result in receiver {
            done += 1;
            if options.verbose {
                print!("{}", result.details);
            }
            if result.wall > slowest.1 {
                slowest = (result.case.seed, result.wall);
            }
            match &result.outcome {
                Ok(stats) => totals.add(stats),
                Err((_, description)) => {
                    if !options.quiet {
                        eprintln!("\nfuzz-campaign: seed {} FAILED\n{description}", result.case.seed);
                    }
                    failures.push(result);
                }
            }
            progress.update(done, &totals, failures.len());
        }
    });
    let wall = started.elapsed();
    failures.sort_by_key(|failure| failure.case.seed);
    let passed = seeds.len() - failures.len();
    println!("fuzz-campaign: {} seeds run, {passed} passed, {} failed", seeds.len(), failures.len());
    println!(
        "fuzz-campaign: {} system calls, {} kernel events, {} invariant checks (passing seeds)",
        totals.calls, totals.events, totals.checks
    );
    let errors: Vec<String> = totals.errors.iter().map(|(name, count)| format!("{name}={count}")).collect();
    println!("fuzz-campaign: {} distinct error codes seen: {}", totals.errors.len(), errors.join(" "));
    println!(
        "fuzz-campaign: {:.1} s wall, {:.2} s per seed per job, slowest seed {} ({:.2} s)",
        wall.as_secs_f64(),
        wall.as_secs_f64() * options.jobs as f64 / seeds.len().max(1) as f64,
        slowest.0,
        slowest.1.as_secs_f64()
    );
    if failures.is_empty() {
        return;
    }
    let dir = failures_dir();
    let _ = std::fs::create_dir_all(&dir);
    let mut known = Vec::new();
    for failure in &failures {
        let Err((problems, _)) = &failure.outcome else { continue };
        let path = dir.join(format!("seed-{}.toml", failure.case.seed));
        let saved = std::fs::write(&path, &failure.case.toml).is_ok();
        let bug = fuzz_known_bug(problems);
        known.extend(bug);
        let label = bug.map_or(String::new(), |bug| format!(" [known bug {bug}]"));
        let first = problems.first().map_or("", String::as_str);
        println!("fuzz-campaign: FAILED seed {} ({}){label}: {first}", failure.case.seed, failure.case.shape);
        println!("    rerun: {}", fuzz_reproduce_command(failure.case.seed, failure.case.calls));
        if saved {
            println!(
                "    or:    cargo run --release -p superos-vmm -- run {} --check every-event",
                path.display()
            );
        }
    }
    for (name, _, what) in FUZZ_KNOWN_BUGS.iter().filter(|(name, _, _)| known.contains(name)) {
        println!("fuzz-campaign: known bug {name}: {what}");
    }
    std::process::exit(1);
}
