//! `superos-vmm bench`: SuperOS operations beside host baselines measured by
//! the same binary in the same run.
//!
//! Each operation group boots purpose-built guest programs (`bench-ops`,
//! `bench-nop`; see `examples/src/bin/`) through [`crate::run::run`] with a
//! scenario built in code ([`guest`]), and reduces the per-sample figures the
//! programs print (TSC cycles, converted with the kernel-published TSC
//! frequency) to median, minimum and maximum ([`stats`]). The host baseline
//! for the same operation is measured right after with libc ([`host`]).
//! Machine-independent figures come from an instrumented run ([`probe`]):
//! ring-0 instructions per operation by single-stepping the vCPU, and VM
//! exits per operation. The outside-in invariant check figures have their
//! own hook ([`invariants`]). [`report`] prints the table and the JSON.

pub mod budget;
pub mod guest;
pub mod host;
pub mod incremental;
pub mod invariants;
pub mod probe;
pub mod report;
pub mod stats;
pub mod worst;

use guest::{Printed, Process};
use probe::{ProbeOptions, Stepping};
use report::{Row, Unit};
use serde_json::json;
use stats::Summary;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use superos_protocol::boot::HostFlavor;

/// `superos-vmm bench` arguments.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct BenchArgs {
    /// Fewer samples and smaller sizes: finishes in under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Run one operation group only (see the list in `--help`).
    #[arg(long, value_name = "NAME")]
    pub only: Option<String>,
    /// Also write the table as Markdown to this file (the machine and date
    /// above it, the check tables below: what the README shows).
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
    /// Write the invariant-check scaling plot (check time against mapped
    /// pages) as SVG to this file.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// After the table, where each operation's ring-0 instructions go: the
    /// kernel functions they were stepped in, per operation, most first.
    #[arg(long)]
    pub profile: bool,
}

/// Help text listing the groups.
pub const BENCH_HELP: &str = "\
Operation groups (for --only):
  boot        VMM start -> first user instruction -> one process exits, vs posix_spawn + wait
  syscall     null system call round trip, vs getppid()
  mem         mem_map + first touch + mem_unmap of 1, 16, 256 pages, vs mmap/touch/munmap
  fault       demand-zero fault alone, vs a host minor fault
  switch      a yield to another process (one process switch); cap_list with one capability
  ipc         64-byte message round trip between two processes, vs a pipe ping-pong
  stream-ipc  streaming 16 MiB between two processes by messages, vs a pipe
  stream-shm  streaming 16 MiB through a shared region, vs memcpy
  shm         shared region create + grant + map + revoke, and revocation latency
  smp         two vCPUs: the message round trip across CPUs, the revocation latency with the
              grantee on the other CPU (TLB shootdown), two computing processes on 2 CPUs vs 1
  spawn       process spawn + exit inside the guest, vs posix_spawn + wait; the exit entry alone
  vmm-peak    the VMM's peak resident memory under hostile kernels (console flood, event flood,
              both after all guest RAM is made resident), run as child processes for a
              bounded time, against its documented bound
  worst-entry the longest single kernel entry the worst system calls make (mem_protect and
              mem_unmap of 1 GiB, the largest shared region, exit holding it), in ring-0
              instructions, and a bystander process's longest wait for the CPU meanwhile
  overhead    kernel memory per process, and the VMM's resident memory beyond guest RAM
  check       outside-in invariant check: time per full check and page-table entries
              per second for 1, 16 and 32 live processes at several resident sizes; the
              incremental check of an idle 64 MiB, 256 MiB and 1 GiB guest against the
              full one, and after 16, 256 and 4096 pages were dirtied

Columns: SuperOS median (min-max) over samples; the host baseline's median,
measured by this binary in this run; their ratio; ring-0 instructions and VM
exits per operation, counted by single-stepping the vCPU (machine-independent).

Exit status: 0 every operation was measured; 1 some failed (see the notes);
2 bad arguments.";

/// Sizes and sample counts.
#[derive(Clone, Debug)]
pub struct Plan {
    /// `--quick`.
    pub quick: bool,
    /// Samples per guest operation.
    pub samples: u64,
    /// Samples per host baseline.
    pub host_samples: usize,
    /// `getpid` calls per sample.
    pub syscall_calls: u64,
    /// (pages, rounds per sample) for `mem`.
    pub mem: [(u64, u64); 3],
    /// Pages per demand-zero sample.
    pub fault_pages: u64,
    /// Round trips per `ipc` sample.
    pub ipc_rounds: u64,
    /// KiB per stream.
    pub stream_kib: u64,
    /// Stream samples.
    pub stream_samples: u64,
    /// Shared-region stream chunk in KiB.
    pub shm_chunk_kib: u64,
    /// Revocation rounds.
    pub revoke_rounds: u64,
    /// Runs per spawn boot, and boots.
    pub spawn_runs: u32,
    /// Boots for `spawn`.
    pub spawn_boots: usize,
    /// Boots for `boot`.
    pub boots: usize,
    /// Processes alive for the memory overhead.
    pub waiters: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Watchdog per guest run.
    pub timeout: Duration,
}

impl Plan {
    /// The full or the quick plan.
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                samples: 3,
                host_samples: 5,
                syscall_calls: 200,
                mem: [(1, 10), (16, 3), (256, 1)],
                fault_pages: 32,
                ipc_rounds: 10,
                stream_kib: 1024,
                stream_samples: 2,
                shm_chunk_kib: 256,
                // Rounds whose owner a timer tick switches out before
                // shm_revoke returns give no latency sample (the grantee
                // faults first): enough rounds that some always do.
                revoke_rounds: 12,
                spawn_runs: 10,
                spawn_boots: 2,
                boots: 3,
                waiters: 8,
                memory_mib: 64,
                timeout: Duration::from_secs(60),
            }
        } else {
            Plan {
                quick,
                samples: 7,
                host_samples: 11,
                syscall_calls: 2000,
                mem: [(1, 50), (16, 10), (256, 2)],
                fault_pages: 64,
                ipc_rounds: 50,
                stream_kib: 16 * 1024,
                stream_samples: 3,
                shm_chunk_kib: 256,
                revoke_rounds: 15,
                spawn_runs: 50,
                spawn_boots: 5,
                boots: 7,
                waiters: 16,
                memory_mib: 64,
                timeout: Duration::from_secs(300),
            }
        }
    }

    fn stream_label(&self) -> String {
        if self.stream_kib % 1024 == 0 {
            format!("{} MiB", self.stream_kib / 1024)
        } else {
            format!("{} KiB", self.stream_kib)
        }
    }
}

/// How much longer than a plain run a stepped run may take.
const STEPPED_TIMEOUT_FACTOR: u32 = 5;

/// The operation groups, in table order.
pub const GROUPS: [&str; 15] = [
    "boot",
    "overhead",
    "syscall",
    "mem",
    "fault",
    "switch",
    "ipc",
    "stream-ipc",
    "stream-shm",
    "shm",
    "smp",
    "spawn",
    "vmm-peak",
    "worst-entry",
    "check",
];

/// Progress on stderr: one line per step, rewritten in place on a terminal.
struct Progress {
    total: usize,
    done: usize,
    tty: bool,
    started: Instant,
}

impl Progress {
    fn new(total: usize) -> Progress {
        Progress { total, done: 0, tty: std::io::stderr().is_terminal(), started: Instant::now() }
    }

    fn group(&mut self, name: &str) {
        self.done += 1;
        self.say(&format!("[{}/{}] {name}", self.done, self.total));
    }

    fn step(&mut self, what: &str) {
        self.say(&format!("[{}/{}] {what}", self.done, self.total));
    }

    fn say(&self, text: &str) {
        let elapsed = self.started.elapsed().as_secs_f64();
        let mut stderr = std::io::stderr();
        if self.tty {
            let _ = write!(stderr, "\r\x1b[Kbench: {text} ({elapsed:.0} s)");
        } else {
            let _ = writeln!(stderr, "bench: {text} ({elapsed:.1} s)");
        }
        let _ = stderr.flush();
    }

    fn finish(&self) {
        if self.tty {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
}

/// What the instrumented runs found out about stepping.
#[derive(Clone, Debug, Default)]
struct SteppingState {
    /// `Some(Ok)` once single-stepping worked, `Some(Err)` if it failed.
    result: Option<Result<(), String>>,
    /// Kernel entries caught by a patch (ordinary KVM).
    patched_entries: u64,
    /// Of which whose stub instructions could not be counted.
    unaccounted_entries: u64,
    /// `KVM_SET_GUEST_DEBUG` calls while stepping (ordinary KVM) and their time.
    debug_calls: u64,
    debug_time: Duration,
    /// Time of the stepped runs.
    stepped_time: Duration,
    /// `rep` string instructions stepped over (ordinary KVM).
    rep_skips: u64,
}

struct Bench {
    plan: Plan,
    progress: Progress,
    stepping: SteppingState,
    /// Invariant-check points, once measured.
    points: Vec<invariants::Point>,
    /// Incremental-check points by guest size, once measured.
    sizes: Vec<incremental::SizePoint>,
    /// The latest timing run: its VM exits and what it printed (for VM
    /// exits per operation when single-stepping is not available).
    last: Option<(u64, Printed)>,
    /// VM exits of a boot of `bench-nop` alone, once measured.
    baseline_exits: Option<u64>,
    /// Ring-0 excursions of every stepped run, by kind.
    excursions: std::collections::BTreeMap<String, Vec<u64>>,
    /// The kernel's symbols (for the profiles).
    symbols: crate::diagnose::KernelSymbols,
}

fn summary(values: &[f64], what: &str) -> Result<Summary, String> {
    Summary::of(values).ok_or_else(|| format!("no samples of {what}"))
}

fn ns(duration: Duration) -> f64 {
    duration.as_nanos() as f64
}

impl Bench {
    fn timing(&mut self, name: &str, processes: &[Process<'_>]) -> Result<Printed, String> {
        self.timing_on(name, 1, processes).map(|(_, printed)| printed)
    }

    /// A timing run on `cpus` vCPUs; its report too.
    fn timing_on(
        &mut self,
        name: &str,
        cpus: u32,
        processes: &[Process<'_>],
    ) -> Result<(crate::run::RunReport, Printed), String> {
        self.progress.step(&format!("{name}: SuperOS on {cpus} vCPU{}", if cpus == 1 { "" } else { "s" }));
        let scenario = guest::scenario_on(name, self.plan.memory_mib, cpus, processes)?;
        let (report, printed) = guest::run_and_parse(scenario, self.plan.timeout)?;
        self.last = Some((report.stats.exits.values().sum(), printed.clone()));
        Ok((report, printed))
    }

    /// Two vCPUs: IPC across CPUs, revocation with the grantee on the other
    /// CPU (the TLB shootdown), and the speed-up of two computing processes.
    fn smp(&mut self) -> Vec<Row> {
        let mut ipc =
            Row::new("smp.ipc-rtt", "64-byte message round trip, two processes on 2 vCPUs", Unit::Time);
        let rounds = self.plan.ipc_rounds;
        let ping = [
            Process::new(
                "bench-ops",
                "ping",
                format!("mode=ping peer=2 rounds={rounds} samples={}", self.plan.samples),
            ),
            Process::new("bench-ops", "pong", "mode=pong"),
        ];
        ipc.superos = self
            .timing_on("smp-ipc", 2, &ping)
            .and_then(|(_, p)| summary(&p.ns_per_op("ipc-rtt"), "ipc-rtt"));
        ipc.notes.push(format!(
            "{} samples of {rounds} round trips; each process on its own CPU while the other waits in ipc_recv \
             (the receiver's CPU idles until the wake-up IPI); compare ipc-rtt (one vCPU)",
            self.plan.samples
        ));

        let mut latency = Row::new(
            "smp.shootdown",
            "revocation on 2 vCPUs: shm_revoke called -> the grantee on the other CPU loses the page",
            Unit::Time,
        );
        let rounds = self.plan.revoke_rounds;
        latency.superos = self
            .timing_on("smp-shm", 2, &Self::revoke_processes(rounds, false))
            .and_then(|(_, p)| summary(&p.ns_per_op("revoke-to-fault"), "revoke-to-fault"));
        latency.notes.push(
            "the grantee spins on another CPU reading the region and writing rdtsc to a second one; this is the \
             owner's rdtsc before shm_revoke to the grantee's last timestamp before the read that faulted: the \
             unmap, the TLB shootdown (flush IPI, the remote CR3 reload, the acknowledgement) and the grantee's \
             next access; the grantee faults before shm_revoke returns (revoke-latency on one vCPU is a process \
             switch instead)"
                .into(),
        );

        let mut throughput = Row::new(
            "smp.compute-2",
            "two processes computing 200 million steps each: first user instruction -> exit, on 2 vCPUs",
            Unit::Time,
        );
        let workers = [Process::new("hello", "a", "work=200"), Process::new("hello", "b", "work=200")];
        let mut runs = Vec::new();
        for cpus in [1, 2] {
            let mut times = Vec::new();
            for _ in 0..self.plan.samples.min(3) {
                self.progress.step(&format!(
                    "smp-compute: SuperOS on {cpus} vCPU{}",
                    if cpus == 1 { "" } else { "s" }
                ));
                let scenario = guest::scenario_on("smp-compute", self.plan.memory_mib, cpus, &workers);
                let time = scenario.and_then(|s| guest::run(s, self.plan.timeout)).and_then(|report| {
                    let phases = report.stats.phases;
                    match (phases.first_user_instruction, phases.guest_exit) {
                        (Some(first), Some(exit)) => Ok(ns(exit.saturating_sub(first))),
                        _ => Err("no phase timings".to_string()),
                    }
                });
                match time {
                    Ok(time) => times.push(time),
                    Err(e) => {
                        throughput.superos = Err(e);
                        return vec![ipc, latency, throughput];
                    }
                }
            }
            runs.push(summary(&times, "smp-compute"));
        }
        let one = runs.remove(0);
        throughput.superos = runs.remove(0);
        if let (Ok(one), Ok(two)) = (&one, &throughput.superos) {
            throughput.notes.push(format!(
                "on 1 vCPU: {:.1} ms (median); 2 vCPUs take {:.2}x as long",
                one.median / 1e6,
                two.median / one.median
            ));
        }
        vec![ipc, latency, throughput]
    }

    /// An instrumented run; `None` (and the reason kept) if stepping fails.
    fn probe(&mut self, name: &str, processes: &[Process<'_>], stepping: Stepping) -> Option<probe::Probe> {
        if matches!(self.stepping.result, Some(Err(_))) && stepping != Stepping::Off {
            return None;
        }
        self.progress.step(&format!("{name}: counting ring-0 instructions"));
        let options = ProbeOptions {
            stepping,
            snapshot: false,
            checks: 0,
            dirtied: &[],
            memory_mib: self.plan.memory_mib,
            // Stepped, ring 0 runs an exit per instruction: far slower than
            // a plain run (on ordinary KVM nested under QEMU's TCG, about
            // 0.2 ms an instruction).
            timeout: if stepping == Stepping::Off {
                self.plan.timeout
            } else {
                self.plan.timeout * STEPPED_TIMEOUT_FACTOR
            },
        };
        let outcome = guest::scenario(name, self.plan.memory_mib, processes)
            .and_then(|scenario| probe::probe(&scenario, &options));
        match outcome {
            Ok(found) => {
                if let Some(result) = &found.counts.stepping {
                    if result.is_err() || self.stepping.result.is_none() {
                        self.stepping.result = Some(result.clone());
                    }
                }
                let counts = &found.counts;
                self.stepping.patched_entries += counts.patched_entries;
                self.stepping.unaccounted_entries += counts.unaccounted_entries;
                self.stepping.debug_calls += counts.debug_calls;
                self.stepping.debug_time += counts.debug_time;
                self.stepping.stepped_time += counts.stepped_time;
                self.stepping.rep_skips += counts.rep_skips;
                for (kind, lengths) in &found.counts.excursions {
                    self.excursions.entry(kind.clone()).or_default().extend(lengths);
                }
                if !matches!(found.exit, crate::run::GuestExit::Shutdown { code: 0 }) {
                    self.stepping.result.get_or_insert(Err(format!("{name}: {}", found.exit)));
                    return None;
                }
                Some(found)
            }
            Err(error) => {
                self.stepping.result.get_or_insert(Err(format!("{name}: {error}")));
                None
            }
        }
    }

    /// Instructions and exits per operation from a probe's window `op`,
    /// scaled by `factor` (operations in the row per operation counted).
    fn window(&mut self, row: &mut Row, found: Option<&probe::Probe>, op: u64, factor: f64) {
        let Some(found) = found else {
            return self.fallback_exits(row);
        };
        let window = found.windows.get(&op).cloned().unwrap_or_default();
        row.instructions = window.instructions_per_op().map(|v| v * factor);
        row.profile = budget::profile(&window.pcs, window.ops as f64 / factor, &self.symbols);
        row.profile_addresses = budget::per_operation(&window.pcs, window.ops as f64 / factor);
        row.exits = window.exits_per_op().map(|v| v * factor);
    }

    /// Without stepping: VM exits per operation from the latest timing
    /// run's `RunReport.stats.exits`, less a `bench-nop` boot's, divided by
    /// the operations the run printed (named like the row).
    fn fallback_exits(&mut self, row: &mut Row) {
        let Some((exits, printed)) = self.last.clone() else { return };
        let ops: u64 = printed.samples.iter().filter(|s| s.op == row.name).map(|s| s.ops).sum();
        if ops == 0 {
            return;
        }
        if self.baseline_exits.is_none() {
            let nop = [Process::new("bench-nop", "nop", "")];
            let report = guest::scenario("baseline", self.plan.memory_mib, &nop)
                .and_then(|s| guest::run(s, self.plan.timeout));
            self.baseline_exits = report.ok().map(|r| r.stats.exits.values().sum());
        }
        if let Some(baseline) = self.baseline_exits {
            row.exits = Some(exits.saturating_sub(baseline) as f64 / ops as f64);
            row.notes.push(
                "VM exits/op: the timing run's RunReport.stats.exits less a bench-nop boot's, per operation"
                    .into(),
            );
        }
    }

    fn group(&mut self, name: &str) -> Vec<Row> {
        self.progress.group(name);
        match name {
            "boot" => self.boot(),
            "overhead" => self.overhead(),
            "vmm-peak" => vec![self.vmm_peak()],
            "syscall" => vec![self.syscall()],
            "switch" => vec![self.yield_row(), self.cap_list()],
            "mem" => self.mem(),
            "fault" => vec![self.fault()],
            "ipc" => vec![self.ipc()],
            "stream-ipc" => vec![self.stream_ipc()],
            "stream-shm" => vec![self.stream_shm()],
            "shm" => self.shm(),
            "smp" => self.smp(),
            "spawn" => self.spawn(),
            "worst-entry" => vec![self.worst_entry()],
            "check" => self.check(),
            _ => unreachable!("unknown group {name}"),
        }
    }

    fn boot(&mut self) -> Vec<Row> {
        let mut first = Row::new("boot.first-user", "boot: VMM start -> first user instruction", Unit::Time);
        let mut exit =
            Row::new("boot.exit", "boot: VMM start -> 1 process runs and exits -> guest exit", Unit::Time);
        let mut firsts = Vec::new();
        let mut exits = Vec::new();
        let (mut vcpu_starts, mut kernel_entries) = (Vec::new(), Vec::new());
        let mut vm_exits = Vec::new();
        let mut error = None;
        for boot in 0..self.plan.boots {
            self.progress.step(&format!("boot: SuperOS boot {} of {}", boot + 1, self.plan.boots));
            let outcome =
                guest::scenario("boot", self.plan.memory_mib, &[Process::new("bench-nop", "nop", "")])
                    .and_then(|s| guest::run(s, self.plan.timeout));
            match outcome {
                Ok(report) => {
                    let phases = report.stats.phases;
                    firsts.extend(phases.first_user_instruction.map(ns));
                    vcpu_starts.extend(phases.vcpu_start.map(ns));
                    kernel_entries.extend(phases.kernel_entry.map(ns));
                    exits.extend(phases.guest_exit.map(ns));
                    vm_exits.push(report.stats.exits.values().sum::<u64>() as f64);
                }
                Err(e) => error = Some(e),
            }
        }
        first.superos = summary(&firsts, "boot").map_err(|e| error.clone().unwrap_or(e));
        exit.superos = summary(&exits, "boot").map_err(|e| error.clone().unwrap_or(e));
        self.progress.step("boot: host posix_spawn + wait");
        let host = host::spawn_wait(1, self.plan.host_samples).and_then(|v| summary(&v, "spawn"));
        for row in [&mut first, &mut exit] {
            row.host = Some(host.clone());
            row.host_baseline = "posix_spawn + waitpid of a minimal static ELF (exit(0))".into();
        }
        exit.exits = Summary::of(&vm_exits).map(|s| s.median);
        let found = self.probe("boot", &[Process::new("bench-nop", "nop", "")], Stepping::FromBoot);
        if let Some(found) = found {
            first.instructions = Some(found.counts.boot_instructions as f64);
            first.profile = budget::profile(&found.counts.boot_pcs, 1.0, &self.symbols);
            first.profile_addresses = budget::per_operation(&found.counts.boot_pcs, 1.0);
            first.exits = Some(found.counts.boot_exits as f64);
            exit.instructions =
                Some((found.counts.boot_instructions + found.counts.counted_instructions) as f64);
            exit.notes.push(format!(
                "ring-0 instructions from the first kernel instruction to the shutdown hypercall; in the stepped run \
                 {} timer interrupts ({} instructions) are left out",
                found.counts.timer_excursions, found.counts.timer_instructions
            ));
        }
        first.notes.push(format!(
            "{} boots of one `bench-nop`, phases from RunReport.stats.phases",
            self.plan.boots
        ));
        if let (Some(vcpu), Some(entry)) = (Summary::of(&vcpu_starts), Summary::of(&kernel_entries)) {
            first.notes.push(format!(
                "median phases: vCPU thread starts {} (VMM: guest RAM, VM, loading), kernel's first hypercall {}, \
                 the rest is the kernel's boot",
                report::format_time(vcpu.median),
                report::format_time(entry.median)
            ));
        }
        vec![first, exit]
    }

    fn syscall(&mut self) -> Row {
        let mut row = Row::new("syscall", "null system call round trip (getpid)", Unit::Time);
        let (calls, samples) = (self.plan.syscall_calls, self.plan.samples);
        let args = format!("mode=syscall n={calls} samples={samples}");
        row.superos = self
            .timing("syscall", &[Process::new("bench-ops", "syscall", args)])
            .and_then(|p| summary(&p.ns_per_op("syscall"), "syscall"));
        self.progress.step("syscall: host getppid()");
        row.host = Some(summary(&host::getppid(calls * 100, self.plan.host_samples), "getppid"));
        row.host_baseline = "getppid()".into();
        let found = self.probe(
            "syscall",
            &[Process::new("bench-ops", "syscall", "mode=syscall n=20 samples=1 mark=1")],
            Stepping::FromFirstUser,
        );
        self.window(&mut row, found.as_ref(), probe::OP_SYSCALL, 1.0);
        row.notes.push(format!("{samples} samples of {calls} calls"));
        row
    }

    /// Two processes yielding to each other: per yield (a process switch).
    fn yield_row(&mut self) -> Row {
        let mut row = Row::new("yield", "yield to another process (one process switch)", Unit::Time);
        let (turns, samples) = (self.plan.syscall_calls / 4, self.plan.samples);
        let processes = |args: String| {
            [Process::new("bench-ops", "yield", args), Process::new("bench-ops", "yielder", "mode=yielder")]
        };
        row.superos = self
            .timing("yield", &processes(format!("mode=yield peer=2 n={turns} samples={samples}")))
            .and_then(|p| summary(&p.ns_per_op("yield"), "yield"));
        let found = self.probe(
            "yield",
            &processes("mode=yield peer=2 n=10 samples=1 mark=1".into()),
            Stepping::FromFirstUser,
        );
        self.window(&mut row, found.as_ref(), probe::OP_YIELD, 1.0);
        row.notes.push(format!(
            "{samples} samples of {turns} yields each way: the process switches to a partner that yields straight back; \
             each switch runs the yield, the save stub of the process left and the restore stub of the one resumed \
             (three kernel entries); no host baseline (a Linux sched_yield switches only if another task is runnable \
             on the same CPU)"
        ));
        row
    }

    /// `cap_list` with one capability held.
    fn cap_list(&mut self) -> Row {
        let mut row = Row::new("cap-list", "cap_list with one capability held", Unit::Time);
        let (calls, samples) = (self.plan.syscall_calls / 4, self.plan.samples);
        row.superos = self
            .timing(
                "cap-list",
                &[Process::new(
                    "bench-ops",
                    "cap-list",
                    format!("mode=cap-list n={calls} samples={samples}"),
                )],
            )
            .and_then(|p| summary(&p.ns_per_op("cap-list"), "cap-list"));
        let found = self.probe(
            "cap-list",
            &[Process::new("bench-ops", "cap-list", "mode=cap-list n=10 samples=1 mark=1")],
            Stepping::FromFirstUser,
        );
        self.window(&mut row, found.as_ref(), probe::OP_CAP_LIST, 1.0);
        row.notes.push(format!(
            "{samples} samples of {calls} calls; no host counterpart (Linux has no capabilities to list)"
        ));
        row
    }

    fn mem(&mut self) -> Vec<Row> {
        let mut rows = Vec::new();
        for (pages, rounds) in self.plan.mem {
            let name = format!("mem-{pages}");
            let label = format!(
                "mem_map + first touch + mem_unmap, {pages} page{}",
                if pages == 1 { "" } else { "s" }
            );
            let mut row = Row::new(&name, &label, Unit::Time);
            let samples = self.plan.samples;
            let args = format!("mode=mem pages={pages} rounds={rounds} samples={samples}");
            row.superos = self
                .timing(&name, &[Process::new("bench-ops", "mem", args)])
                .and_then(|p| summary(&p.ns_per_op(&name), &name));
            self.progress.step(&format!("{name}: host mmap/touch/munmap"));
            let host_rounds = (rounds * 20).max(20);
            row.host = Some(
                host::mmap_touch_unmap(pages as usize, host_rounds, self.plan.host_samples)
                    .and_then(|v| summary(&v, "mmap")),
            );
            row.host_baseline = format!(
                "mmap + one write per page + munmap of {pages} page{}",
                if pages == 1 { "" } else { "s" }
            );
            let step_rounds = if pages >= 256 { 1 } else { 2 };
            let args = format!("mode=mem pages={pages} rounds={step_rounds} samples=1 mark=1");
            let found = self.probe(&name, &[Process::new("bench-ops", "mem", args)], Stepping::FromFirstUser);
            self.window(&mut row, found.as_ref(), probe::OP_MEM, 1.0);
            row.notes.push(format!("{samples} samples of {rounds} rounds"));
            rows.push(row);
        }
        rows
    }

    fn fault(&mut self) -> Row {
        let mut row = Row::new("fault", "demand-zero fault alone (first write to a page)", Unit::Time);
        let (pages, samples) = (self.plan.fault_pages, self.plan.samples);
        let args = format!("mode=fault pages={pages} samples={samples}");
        row.superos = self
            .timing("fault", &[Process::new("bench-ops", "fault", args)])
            .and_then(|p| summary(&p.ns_per_op("fault"), "fault"));
        self.progress.step("fault: host minor fault");
        row.host =
            Some(host::minor_fault(256, self.plan.host_samples).and_then(|v| summary(&v, "minor fault")));
        row.host_baseline = "minor fault: first write to an anonymous page minus a second write".into();
        let found = self.probe(
            "fault",
            &[Process::new("bench-ops", "fault", "mode=fault pages=8 samples=1 mark=1")],
            Stepping::FromFirstUser,
        );
        self.window(&mut row, found.as_ref(), probe::OP_FAULT, 1.0);
        row.notes.push(format!("fresh write minus resident write, {samples} samples of {pages} pages"));
        row
    }

    fn ipc(&mut self) -> Row {
        let mut row = Row::new("ipc-rtt", "64-byte message round trip, two processes", Unit::Time);
        let (rounds, samples) = (self.plan.ipc_rounds, self.plan.samples);
        let ping = |args: String| {
            [Process::new("bench-ops", "ping", args), Process::new("bench-ops", "pong", "mode=pong")]
        };
        row.superos = self
            .timing("ipc", &ping(format!("mode=ping peer=2 rounds={rounds} samples={samples}")))
            .and_then(|p| summary(&p.ns_per_op("ipc-rtt"), "ipc-rtt"));
        self.progress.step("ipc: host pipe ping-pong");
        row.host = Some(
            host::pipe_ping_pong(rounds * 100, self.plan.host_samples).and_then(|v| summary(&v, "ping-pong")),
        );
        row.host_baseline = "64-byte ping-pong over two pipes with a forked child process".into();
        let found = self.probe(
            "ipc",
            &ping("mode=ping peer=2 rounds=4 samples=1 mark=1".into()),
            Stepping::FromFirstUser,
        );
        self.window(&mut row, found.as_ref(), probe::OP_IPC_RTT, 1.0);
        row.notes.push(format!("{samples} samples of {rounds} round trips"));
        row
    }

    fn stream_processes(kib: u64, samples: u64, mark: bool) -> [Process<'static>; 2] {
        let mark = u8::from(mark);
        [
            Process::new(
                "bench-ops",
                "sender",
                format!("mode=stream-send peer=2 kib={kib} samples={samples} mark={mark}"),
            ),
            Process::new(
                "bench-ops",
                "receiver",
                format!("mode=stream-recv peer=1 kib={kib} samples={samples} mark={mark}"),
            ),
        ]
    }

    fn stream_ipc(&mut self) -> Row {
        let label = format!("stream {} between two processes by 4 KiB messages", self.plan.stream_label());
        let mut row = Row::new("stream-ipc", &label, Unit::Time);
        let (kib, samples) = (self.plan.stream_kib, self.plan.stream_samples);
        row.superos = self
            .timing("stream-ipc", &Self::stream_processes(kib, samples, false))
            .and_then(|p| summary(&p.ns_per_op("stream-ipc"), "stream-ipc"));
        self.progress.step("stream-ipc: host pipe");
        let bytes = (kib << 10) as usize;
        row.host =
            Some(host::pipe_stream(bytes, self.plan.host_samples).and_then(|v| summary(&v, "pipe stream")));
        row.host_baseline =
            format!("{} through a pipe to a forked child, 64 KiB writes", self.plan.stream_label());
        let step_kib = 64;
        let found =
            self.probe("stream-ipc", &Self::stream_processes(step_kib, 1, true), Stepping::FromFirstUser);
        self.window(&mut row, found.as_ref(), probe::OP_STREAM_IPC, (kib / step_kib) as f64);
        if let Ok(s) = &row.superos {
            row.notes.push(format!("{:.0} KiB/s", kib as f64 / (s.median / 1e9)));
        }
        row.notes.push(format!(
            "{samples} samples; ring-0 instructions and exits counted on a {step_kib} KiB stream and scaled; they \
             include the sender's retries on a full mailbox (8 messages) and its yields, which depend on scheduling"
        ));
        row
    }

    fn shm_processes(kib: u64, chunk: u64, samples: u64, mark: bool) -> [Process<'static>; 2] {
        let mark = u8::from(mark);
        [
            Process::new(
                "bench-ops",
                "producer",
                format!("mode=shm-send peer=2 kib={kib} chunk={chunk} samples={samples} mark={mark}"),
            ),
            Process::new("bench-ops", "consumer", "mode=shm-recv peer=1"),
        ]
    }

    fn stream_shm(&mut self) -> Row {
        let chunk = self.plan.shm_chunk_kib;
        let label =
            format!("stream {} through a shared region ({chunk} KiB chunks)", self.plan.stream_label());
        let mut row = Row::new("stream-shm", &label, Unit::Time);
        let (kib, samples) = (self.plan.stream_kib, self.plan.samples.min(5));
        row.superos = self
            .timing("stream-shm", &Self::shm_processes(kib, chunk, samples, false))
            .and_then(|p| summary(&p.ns_per_op("stream-shm"), "stream-shm"));
        self.progress.step("stream-shm: host memcpy");
        let bytes = (kib << 10) as usize;
        row.host = Some(summary(&host::memcpy(bytes, self.plan.host_samples), "memcpy"));
        row.host_baseline = format!("memcpy of {} between two resident buffers", self.plan.stream_label());
        let step_kib = 2 * chunk;
        let found =
            self.probe("stream-shm", &Self::shm_processes(step_kib, chunk, 1, true), Stepping::FromFirstUser);
        self.window(&mut row, found.as_ref(), probe::OP_STREAM_SHM, (kib / step_kib) as f64);
        if let Ok(s) = &row.superos {
            row.notes.push(format!("{:.0} KiB/s", kib as f64 / (s.median / 1e9)));
        }
        row.notes.push(format!(
            "{samples} samples; producer copies each chunk in, consumer copies it out, one ready/ack message pair \
             per chunk; ring-0 figures counted on {step_kib} KiB and scaled"
        ));
        row
    }

    fn revoke_processes(rounds: u64, mark: bool) -> [Process<'static>; 2] {
        let mut grantee = Process::new("bench-ops", "grantee", "mode=grantee owner=1");
        grantee.runs = rounds as u32;
        grantee.fault = Some("use-after-revoke");
        [
            Process::new(
                "bench-ops",
                "owner",
                format!("mode=revoke samples={rounds} mark={}", u8::from(mark)),
            ),
            grantee,
        ]
    }

    fn shm(&mut self) -> Vec<Row> {
        let mut cycle =
            Row::new("shm-cycle", "shared region (1 page) create + grant + map + revoke", Unit::Time);
        let mut latency = Row::new(
            "revoke-latency",
            "revocation latency: revoke returns -> grantee's access faults",
            Unit::Time,
        );
        let rounds = self.plan.revoke_rounds;
        match self.timing("shm", &Self::revoke_processes(rounds, false)) {
            Ok(printed) => {
                cycle.superos = summary(&printed.ns_per_op("shm-cycle"), "shm-cycle");
                latency.superos = summary(&printed.ns_per_op("revoke-latency"), "revoke-latency");
                let stale = printed.remarks.iter().filter(|r| r.starts_with("stale")).count();
                if stale > 0 {
                    latency
                        .notes
                        .push(format!("{stale} of {rounds} samples dropped: a timer tick switched to the grantee before shm_revoke returned"));
                }
            }
            Err(e) => {
                cycle.superos = Err(e.clone());
                latency.superos = Err(e);
            }
        }
        self.progress.step("shm: host memfd");
        cycle.host =
            Some(host::memfd_cycle(200, self.plan.host_samples).and_then(|v| summary(&v, "memfd cycle")));
        cycle.host_baseline =
            "memfd_create + ftruncate + mmap + one write + munmap + close (Linux cannot revoke a mapping)"
                .into();
        latency.host_baseline = "none: Linux has no revocation of another process's mapping".into();
        let found = self.probe("shm", &Self::revoke_processes(2, true), Stepping::FromFirstUser);
        self.window(&mut cycle, found.as_ref(), probe::OP_SHM_CYCLE, 1.0);
        // The latency is the owner's yield that switches to the grantee.
        let yields = found.as_ref().and_then(|f| f.counts.excursions.get("syscall 3"));
        if let Some(yields) =
            yields.and_then(|y| Summary::of(&y.iter().map(|&n| n as f64).collect::<Vec<_>>()))
        {
            latency.instructions = Some(yields.median);
            latency.notes.push(
                "ring-0 instructions: the median `yield` excursion (the owner's yield that switches to the grantee)"
                    .into(),
            );
        }
        cycle.notes.push(format!(
            "{rounds} rounds, each with a fresh grantee that has the region mapped; the owner times its four calls"
        ));
        latency.notes.push(
            "measured in the guest: the grantee spins (yielding each turn, so it is parked at a known point) writing \
             rdtsc to a second region and reading the revoked one; its last timestamp (just before the read that \
             faulted) minus the owner's rdtsc right after shm_revoke returned. One vCPU: this is the owner's yield \
             and the switch to the grantee; the fault's own handling (the kill) comes after"
                .into(),
        );
        vec![cycle, latency]
    }

    fn spawn(&mut self) -> Vec<Row> {
        let mut row = Row::new("spawn", "process spawn + exit inside the guest", Unit::Time);
        let mut exit = Row::new(
            "exit",
            "process exit (small process): ring-0 instructions of the exit entry, median (min–max)",
            Unit::Count,
        );
        let runs = self.plan.spawn_runs;
        let mut values = Vec::new();
        let mut error = None;
        for boot in 0..self.plan.spawn_boots {
            self.progress.step(&format!("spawn: SuperOS boot {} of {}", boot + 1, self.plan.spawn_boots));
            let mut nop = Process::new("bench-nop", "nop", "");
            nop.runs = runs;
            let outcome = guest::scenario("spawn", self.plan.memory_mib, &[nop])
                .and_then(|s| guest::run(s, self.plan.timeout));
            match outcome {
                Ok(report) => {
                    let phases = report.stats.phases;
                    if let (Some(first), Some(exit)) = (phases.first_user_instruction, phases.guest_exit) {
                        values.push(ns(exit.saturating_sub(first)) / f64::from(runs));
                    }
                }
                Err(e) => error = Some(e),
            }
        }
        row.superos = summary(&values, "spawn").map_err(|e| error.unwrap_or(e));
        self.progress.step("spawn: host posix_spawn + wait");
        row.host = Some(host::spawn_wait(20, self.plan.host_samples).and_then(|v| summary(&v, "spawn")));
        row.host_baseline = "posix_spawn + waitpid of a minimal static ELF (exit(0))".into();
        let step_runs = 4;
        let mut nop = Process::new("bench-nop", "nop", "");
        nop.runs = step_runs;
        if let Some(found) = self.probe("spawn", &[nop], Stepping::FromFirstUser) {
            row.instructions = Some(found.counts.counted_instructions as f64 / f64::from(step_runs));
            row.profile = budget::profile(&found.counts.counted_pcs, f64::from(step_runs), &self.symbols);
            row.profile_addresses = budget::per_operation(&found.counts.counted_pcs, f64::from(step_runs));
            row.exits = Some(found.counts.counted_exits as f64 / f64::from(step_runs));
        }
        // The exit row: separate processes, one run each, all spawned at boot,
        // so that an exit entry is the exit alone (with runs = N, each exit
        // entry also spawns the next run, which is the spawn row's).
        let names: Vec<String> = (1..=step_runs).map(|i| format!("nop{i}")).collect();
        let nops: Vec<Process<'_>> = names.iter().map(|name| Process::new("bench-nop", name, "")).collect();
        if let Some(found) = self.probe("exit", &nops, Stepping::FromFirstUser) {
            let exit_kind = format!("syscall {}", superos_protocol::syscall::Syscall::Exit as u64);
            let exit_entries = found.counts.excursions.get(&exit_kind).cloned().unwrap_or_default();
            exit.superos = Summary::of(&exit_entries.iter().map(|&n| n as f64).collect::<Vec<_>>())
                .ok_or_else(|| "no exit entry was stepped".to_string());
            exit.instructions = exit.superos.as_ref().ok().map(|s| s.median);
            if let Some(pcs) = found.counts.excursion_pcs.get(&exit_kind) {
                exit.profile = budget::profile(pcs, exit_entries.len() as f64, &self.symbols);
                exit.profile_addresses = budget::per_operation(pcs, exit_entries.len() as f64);
            }
            exit.notes.push(format!(
                "the `exit` entries of {step_runs} `bench-nop` processes spawned at boot, {} stepped (the last \
                 one's is the kernel's shutdown, counted apart): the exit, the first slice of its teardown and \
                 the switch to the next process; the rest of the teardown goes a slice per later kernel entry",
                exit_entries.len()
            ));
        }
        row.notes.push(format!(
            "`bench-nop` with runs = {runs}: (guest exit - first user instruction) / {runs}, {} boots; the last \
             run's share includes the kernel's shutdown",
            self.plan.spawn_boots
        ));
        vec![row, exit]
    }

    /// Issue 11's row: the longest single kernel entry of the worst calls,
    /// and a bystander's longest wait for the CPU meanwhile ([`worst`]).
    fn worst_entry(&mut self) -> Row {
        let mut row = Row::new(
            "worst-entry",
            "worst kernel entry (ring-0 instr) / a bystander's longest wait for the CPU",
            Unit::Time,
        );
        let mut results = Vec::new();
        for (i, case) in worst::cases(self.plan.quick).iter().enumerate() {
            self.progress.step(&format!("worst-entry: case {} ({})", i + 1, case.hog));
            let stepping = !matches!(self.stepping.result, Some(Err(_)));
            let result = worst::run_case(case, self.plan.timeout, stepping);
            if let Some(outcome) = &result.stepping {
                if outcome.is_err() || self.stepping.result.is_none() {
                    self.stepping.result = Some(outcome.clone());
                }
            }
            results.push(result);
        }
        let (reference, measured) = results.split_first().expect("a reference case");
        let worst = measured
            .iter()
            .filter_map(|r| r.worst().map(|(entry, n)| (entry.to_string(), n, r.label.clone())))
            .max_by_key(|(_, n, _)| *n);
        let wait =
            measured.iter().filter_map(|r| r.wait_us.map(|w| (w, r.label.clone()))).max_by_key(|w| w.0);
        let errors: Vec<String> =
            results.iter().flat_map(|r| r.errors.iter().map(move |e| format!("{}: {e}", r.label))).collect();
        row.superos = match &wait {
            Some((us, _)) => Ok(Summary::single(*us as f64 * 1e3)),
            None => Err(if errors.is_empty() { "no bystander wait".into() } else { errors.join("; ") }),
        };
        if let Some((entry, n, _)) = &worst {
            row.instructions = Some(*n as f64);
            row.operation = format!("worst kernel entry ({entry}) / a bystander's longest wait for the CPU");
        }
        row.host_baseline =
            "none: Linux's long calls are preemptible; the figure to compare is the time slice \
                             (the reference case)"
                .into();
        if let Some((entry, n, label)) = &worst {
            row.notes.push(format!(
                "ring-0 instr: the longest single kernel entry, `{entry}`, {} ring-0 instructions, in: {label} \
                 (a stepped run of the hog alone, every kernel entry counted separately)",
                report::format_count(*n as f64)
            ));
        }
        if let Some((us, label)) = &wait {
            row.notes.push(format!(
                "median: the longest gap between two consecutive TSC reads of a `quota-hog mode=watch` bystander \
                 spinning in ring 3 beside the hog (wall time, a plain run), {}, in: {label}; beside a second \
                 ring-3 spinner instead (reference: the 10 ms time slice) it waited {}",
                report::format_time(*us as f64 * 1e3),
                reference.wait_us.map_or("?".into(), |w| report::format_time(w as f64 * 1e3)),
            ));
        }
        for result in measured {
            let entries: Vec<String> = result
                .worst_by_kind
                .iter()
                .map(|(entry, (n, count))| format!("{entry} {} ({count})", report::format_count(*n as f64)))
                .collect();
            row.notes.push(format!(
                "{}: bystander waited {}{}; longest entry by kind (entries): {}",
                result.label,
                result.wait_us.map_or("?".into(), |w| report::format_time(w as f64 * 1e3)),
                if result.covered { "" } else { " (it stopped watching before the hog exited)" },
                if entries.is_empty() { "not counted".into() } else { entries.join(", ") },
            ));
        }
        row.notes.extend(errors.iter().map(|e| format!("error: {e}")));
        row.details = json!({
            "worst_entry": worst.as_ref().map(|(entry, n, label)| {
                json!({ "entry": entry, "instructions": n, "case": label })
            }),
            "longest_wait_us": wait.as_ref().map(|(us, label)| json!({ "us": us, "case": label })),
            "reference_wait_us": reference.wait_us,
            "cases": results.iter().map(worst::CaseResult::json).collect::<Vec<_>>(),
        });
        row
    }

    /// Issue 13's row: the VMM's peak resident memory under each hostile
    /// kernel, run as a child process ([`worst::flood`]).
    fn vmm_peak(&mut self) -> Row {
        let memory_mib = self.plan.memory_mib;
        let bound = (memory_mib + worst::VMM_BUDGET_MIB) << 20;
        let seconds = if self.plan.quick { 2.0 } else { 4.0 };
        let mut row = Row::new(
            "vmm-peak-rss",
            &format!(
                "VMM peak RSS, worst hostile kernel, {memory_mib} MiB guest (bound {})",
                report::format_bytes(bound as f64)
            ),
            Unit::Bytes,
        );
        let mut floods = Vec::new();
        let mut errors = Vec::new();
        for inject in worst::FLOODS {
            self.progress.step(&format!("vmm-peak: {inject} for {seconds} s"));
            match worst::flood(inject, memory_mib, seconds) {
                Ok(flood) => floods.push(flood),
                Err(e) => errors.push(format!("{inject}: {e}")),
            }
        }
        let held = errors.is_empty() && floods.iter().all(|f| f.peak_bytes < bound);
        match floods.iter().max_by_key(|f| f.peak_bytes) {
            Some(worst) => {
                row.superos = Ok(Summary::single(worst.peak_bytes as f64));
                row.operation = format!(
                    "VMM peak RSS, worst hostile kernel ({}; {memory_mib} MiB guest, bound {} {})",
                    worst.inject,
                    report::format_bytes(bound as f64),
                    if held { "held" } else { "EXCEEDED" }
                );
            }
            None => row.superos = Err(errors.join("; ")),
        }
        for flood in &floods {
            row.notes.push(format!(
                "`run hello --debug-inject {}` for {seconds} s as a child process: peak RSS {} (ru_maxrss), exit \
                 status {}{}",
                flood.inject,
                report::format_bytes(flood.peak_bytes as f64),
                flood.status,
                if flood.status == 4 { " (the watchdog stopped it, as it must)" } else { " (expected 4: the watchdog)" },
            ));
        }
        row.notes.push(format!(
            "bound: guest RAM ({memory_mib} MiB) + the VMM's fixed budget ({} MiB: the caps of docs/ARCHITECTURE.md, \
             \"The VMM's memory bound\", and the program itself; vmm/tests/cli.rs asserts the same); `all-flood` \
             (DEBUG_ALL_FLOOD) is the worst of them: every usable page of guest RAM made resident, then the console \
             flood's writes and scrub request and the event flood's full ring in turn, forever",
            worst::VMM_BUDGET_MIB
        ));
        row.notes.extend(errors.iter().map(|e| format!("error: {e}")));
        row.details = json!({
            "guest_ram_bytes": memory_mib << 20,
            "bound_bytes": bound,
            "bound_held": held,
            "seconds_per_flood": seconds,
            "floods": floods.iter().map(|f| json!({ "inject": f.inject, "peak_rss_bytes": f.peak_bytes, "exit_status": f.status })).collect::<Vec<_>>(),
        });
        row
    }

    fn check(&mut self) -> Vec<Row> {
        let mut errors = Vec::new();
        for (processes, pages) in invariants::configurations(&self.plan) {
            self.progress.step(&format!("check: {processes} processes x {pages} pages"));
            match invariants::measure(&self.plan, processes, pages) {
                Ok(point) => self.points.push(point),
                Err(e) => errors.push(format!("{processes} processes x {pages} pages: {e}")),
            }
        }
        let mut rows = invariants::rows(&self.points, &errors);
        let mut errors = Vec::new();
        for mib in incremental::GUEST_SIZES_MIB {
            self.progress.step(&format!("check: incremental, {mib} MiB guest"));
            match incremental::measure(&self.plan, mib) {
                Ok(point) => self.sizes.push(point),
                Err(e) => errors.push(format!("{mib} MiB: {e}")),
            }
        }
        rows.extend(incremental::rows(&self.sizes, &errors));
        rows
    }

    fn overhead(&mut self) -> Vec<Row> {
        let mut kernel = Row::new("kernel-mem", "kernel memory per process (page tables)", Unit::Bytes);
        let mut vmm = Row::new("vmm-rss", "VMM resident memory beyond guest RAM", Unit::Bytes);
        let waiters = self.plan.waiters;
        let mut processes: Vec<Process<'_>> =
            (0..waiters).map(|_| Process::new("bench-nop", "waiter", "wait")).collect();
        processes.push(Process::new(
            "bench-ops",
            "release",
            format!("mode=release waiters={waiters} sync=0"),
        ));
        self.progress.step("overhead: SuperOS frame-owner table and VMM RSS");
        let options = ProbeOptions {
            stepping: Stepping::Off,
            snapshot: true,
            checks: 0,
            dirtied: &[],
            memory_mib: self.plan.memory_mib,
            timeout: self.plan.timeout,
        };
        let mut images = 0;
        let outcome = guest::scenario("overhead", self.plan.memory_mib, &processes)
            .and_then(|scenario| {
                // Copies only: embedded images are borrowed from the binary.
                images = scenario
                    .processes
                    .iter()
                    .filter(|p| matches!(p.image, std::borrow::Cow::Owned(_)))
                    .map(|p| p.image.len())
                    .sum::<usize>();
                probe::probe(&scenario, &options)
            })
            .and_then(|found| {
                found.snapshot.ok_or_else(|| format!("no snapshot was taken ({})", found.exit))
            });
        match outcome {
            Ok(snapshot) => {
                let waiter_frames: Vec<probe::ProcessFrames> =
                    (1..=waiters).filter_map(|pid| snapshot.processes.get(&pid).copied()).collect();
                let tables: Vec<f64> = waiter_frames.iter().map(|f| (f.page_tables * 4096) as f64).collect();
                kernel.superos = summary(&tables, "page-table frames");
                let private =
                    Summary::of(&waiter_frames.iter().map(|f| f.private as f64).collect::<Vec<_>>());
                kernel.notes.push(format!(
                    "{} idle `bench-nop` processes alive, read from the kernel's frame-owner table: the figure is each \
                     one's page-table frames; user frames (image, stack, gate excluded) {} each; plus one {}-byte process-table record; \
                     other kernel structures live in the kernel's static 1 MiB heap, not measured per process; \
                     kernel-owned frames: {}; free frames {} of {} (at boot, before any process: {})",
                    waiter_frames.len(),
                    private.map_or("?".into(), |s| format!("{:.0}", s.median)),
                    snapshot.process_record_size,
                    snapshot.kernel_frames,
                    snapshot.free_frames,
                    snapshot.total_frames,
                    snapshot.ready_free_frames.map_or("?".into(), |f| f.to_string()),
                ));
                let overhead = snapshot.vm_rss.saturating_sub(snapshot.guest_resident);
                vmm.superos = Ok(Summary::single(overhead as f64));
                vmm.notes.push(format!(
                    "VmRSS of this process ({}) minus the guest RAM pages resident in it (mincore over the {} guest \
                     mapping: {}), with {} processes alive: file-backed {} (the binary, whose embedded guest images \
                     were read, and shared libraries), anonymous beyond guest RAM {} (heap, of which copies of the \
                     processes' ELF images {}: embedded images are used in place; thread stacks; kvm_run); KVM's \
                     in-kernel state is not in VmRSS",
                    report::format_bytes(snapshot.vm_rss as f64),
                    report::format_bytes(snapshot.guest_size as f64),
                    report::format_bytes(snapshot.guest_resident as f64),
                    waiters + 1,
                    report::format_bytes(snapshot.rss_file as f64),
                    report::format_bytes(snapshot.rss_anon.saturating_sub(snapshot.guest_resident) as f64),
                    report::format_bytes(images as f64),
                ));
            }
            Err(e) => {
                kernel.superos = Err(e.clone());
                vmm.superos = Err(e);
            }
        }
        self.progress.step("overhead: host page tables of a tiny process");
        kernel.host = Some(host::tiny_process_page_tables().map(|b| Summary::single(b as f64)));
        kernel.host_baseline = "VmPTE of a paused minimal static process (Linux page tables only)".into();
        vec![kernel, vmm]
    }
}

/// What the machine is, for the table's label.
pub fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let host = crate::vm::detect_host_kind().to_string();
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_string))
        .unwrap_or_default();
    json!({ "cpu": cpu, "cores": cores, "host_kernel": kernel, "kvm": host, "load_average_1min": load })
}

/// Today's UTC date and time as `YYYY-MM-DD HH:MM UTC`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format_utc(secs)
}

/// `secs` since the Unix epoch as `YYYY-MM-DD HH:MM UTC`.
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let (hour, minute) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02} UTC")
}

/// Kernel entries by name with their median length and count.
pub fn kernel_entries(
    excursions: &std::collections::BTreeMap<String, Vec<u64>>,
) -> Vec<(String, f64, usize)> {
    excursions
        .iter()
        .filter_map(|(kind, lengths)| {
            let summary = Summary::of(&lengths.iter().map(|&n| n as f64).collect::<Vec<_>>())?;
            Some((entry_name(kind), summary.median, summary.samples))
        })
        .collect()
}

/// `syscall 4` -> `getpid`, `vector 14` -> `page fault`.
pub fn entry_name(kind: &str) -> String {
    use superos_protocol::syscall::Syscall;
    if let Some(number) = kind.strip_prefix("syscall ").and_then(|n| n.parse::<u64>().ok()) {
        return match Syscall::from_raw(number) {
            Some(Syscall::GateSelfTest) | None => format!("syscall {number:#x}"),
            Some(call) => call.name().to_string(),
        };
    }
    match kind {
        "vector 14" => "page fault".into(),
        other => other.to_string(),
    }
}

/// `items` joined with `, ` into lines of at most about `width` characters.
fn wrap(items: &[String], width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for item in items {
        let line = lines.last_mut().expect("never empty");
        if !line.is_empty() && line.len() + item.len() + 2 > width {
            lines.push(item.clone());
        } else {
            if !line.is_empty() {
                line.push_str(", ");
            }
            line.push_str(item);
        }
    }
    lines
}

fn stepping_note(state: &SteppingState, host: HostFlavor) -> String {
    match (&state.result, host) {
        (Some(Ok(())), HostFlavor::Pvm) => "ring-0 instr/op: counted by single-stepping the vCPU \
            (KVM_SET_GUEST_DEBUG, ENABLE|SINGLESTEP, set once): PVM's instruction emulator steps every ring-0 \
            instruction, and ring 3 runs unstepped; timer interrupts and the marker calls left out; VM exits/op: \
            exits to the VMM (hypercalls) in the same stepped runs"
            .into(),
        (Some(Ok(())), HostFlavor::Kvm) => {
            let share = if state.stepped_time.is_zero() {
                0.0
            } else {
                100.0 * state.debug_time.as_secs_f64() / state.stepped_time.as_secs_f64()
            };
            let unaccounted = match state.unaccounted_entries {
                0 => String::new(),
                n => format!(", {n} of them through a stub not decoded, short by its 2 or 3 instructions"),
            };
            format!(
                "ring-0 instr/op: counted by single-stepping the vCPU in ring 0 only. On ordinary KVM a step is \
                 the trap flag in the guest's RFLAGS, which syscall (SFMASK), interrupt and exception delivery and \
                 the kernel's popfq clear: the VMM writes `out 0x7e, al` over the first bytes of syscall_entry and \
                 trap_common, so every kernel entry stops in the VMM ({} entries{unaccounted}), counts the 2 or 3 \
                 instructions of the vector stub that ran before trap_common from its decoded text, and steps on \
                 with the original bytes back; every ring-0 step re-arms the trap flag ({} KVM_SET_GUEST_DEBUG \
                 calls, {share:.1}% of the stepped runs' time) and the return to ring 3 switches stepping off; a rep \
                 string instruction runs unstepped to a patch after it and counts once, as PVM's emulator counts it \
                 ({} of them); timer interrupts (not stepped here) and the marker calls left out; VM exits/op: exits \
                 to the VMM (hypercalls) in the same stepped runs",
                state.patched_entries, state.debug_calls, state.rep_skips
            )
        }
        (Some(Err(error)), _) => format!(
            "single-stepping the vCPU did not work here ({error}): no ring-0 instruction counts, and no VM exit counts \
             per operation"
        ),
        (None, _) => "no instrumented run was made".into(),
    }
}

/// Runs `superos-vmm bench`; returns the exit status.
pub fn command(args: BenchArgs) -> i32 {
    let groups: Vec<&str> = match &args.only {
        None => GROUPS.to_vec(),
        Some(name) if GROUPS.contains(&name.as_str()) => {
            vec![GROUPS[GROUPS.iter().position(|g| g == name).unwrap_or(0)]]
        }
        Some(name) => {
            eprintln!("superos-vmm: error: no benchmark group {name:?} (groups: {})", GROUPS.join(", "));
            return 2;
        }
    };
    // The outputs must be writable before minutes of measuring (a typo in a
    // path is a usage error at once, exit 2).
    for path in [&args.json, &args.svg, &args.markdown].into_iter().flatten() {
        if let Err(e) = check_writable(path) {
            eprintln!("superos-vmm: error: cannot write {}: {e}", path.display());
            return 2;
        }
    }
    let started = Instant::now();
    let plan = Plan::new(args.quick);
    let mut bench = Bench {
        plan,
        progress: Progress::new(groups.len()),
        stepping: SteppingState::default(),
        points: Vec::new(),
        sizes: Vec::new(),
        last: None,
        baseline_exits: None,
        excursions: Default::default(),
        symbols: crate::diagnose::KernelSymbols::parse(crate::images::KERNEL_ELF),
    };
    let mut rows = Vec::new();
    for group in &groups {
        rows.extend(bench.group(group));
    }
    for row in &mut rows {
        row.budget = budget::budget(&row.name);
        if !args.profile {
            row.profile_addresses.clear();
        }
    }
    bench.progress.finish();
    let date = utc_now();
    let machine = machine();
    let stepping = stepping_note(&bench.stepping, crate::vm::detect_host_flavor());
    print_results(&rows, &machine, &date, &stepping, args.quick, started.elapsed());
    if args.profile {
        print_profiles(&rows);
    }
    let entries = kernel_entries(&bench.excursions);
    if !entries.is_empty() {
        crate::session::emit(format_args!(""));
        crate::session::emit(format_args!(
            "ring-0 instructions per kernel entry, median (count) over every stepped run:"
        ));
        for line in wrap(
            &entries
                .iter()
                .map(|(name, median, count)| format!("{name} {median:.0} ({count})"))
                .collect::<Vec<_>>(),
            100,
        ) {
            crate::session::emit(format_args!("  {line}"));
        }
    }
    if !bench.points.is_empty() {
        crate::session::emit(format_args!(""));
        for line in invariants::scaling_table(&bench.points).lines() {
            crate::session::emit(format_args!("{line}"));
        }
    }
    if !bench.sizes.is_empty() {
        crate::session::emit(format_args!(""));
        for line in incremental::table(&bench.sizes).lines() {
            crate::session::emit(format_args!("{line}"));
        }
    }
    let mut status = i32::from(rows.iter().any(|r| r.superos.is_err() || matches!(r.host, Some(Err(_)))));
    if let Some(path) = &args.svg {
        let title = format!("SuperOS outside-in invariant check ({date})");
        if bench.points.is_empty() {
            eprintln!("superos-vmm: no invariant-check points to plot (run the `check` group)");
            status = 1;
        } else if let Err(e) = std::fs::write(path, invariants::svg(&bench.points, &title)) {
            eprintln!("superos-vmm: error: cannot write {}: {e}", path.display());
            status = 1;
        }
    }
    if let Some(path) = &args.markdown {
        let mut text = format!("{}\n\n", heading(&machine, &date, args.quick));
        text += &report::markdown(&rows);
        text += &format!("\nratio = SuperOS median / host median; {stepping}.\n");
        if !bench.points.is_empty() {
            text += &format!("\n```text\n{}```\n", invariants::scaling_table(&bench.points));
        }
        if !bench.sizes.is_empty() {
            text += &format!("\n```text\n{}```\n", incremental::table(&bench.sizes));
        }
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("superos-vmm: error: cannot write {}: {e}", path.display());
            return 1;
        }
    }
    if let Some(path) = &args.json {
        let document = json!({
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "date": date,
            "machine": machine,
            "quick": args.quick,
            "groups": groups,
            "stable_figures": stepping,
            "seconds": started.elapsed().as_secs_f64(),
            "rows": rows.iter().map(report::row_json).collect::<Vec<_>>(),
            "check_scaling": bench.points.iter().map(invariants::Point::json).collect::<Vec<_>>(),
            "check_incremental": bench.sizes.iter().map(incremental::SizePoint::json).collect::<Vec<_>>(),
            "kernel_entries": entries
                .iter()
                .map(|(name, median, count)| json!({ "entry": name, "median_instructions": median, "count": count }))
                .collect::<Vec<_>>(),
        });
        let text = serde_json::to_string_pretty(&document).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("superos-vmm: error: cannot write {}: {e}", path.display());
            return 1;
        }
    }
    status
}

/// Whether `path` can be created or written, checked without leaving a
/// file behind that was not there.
fn check_writable(path: &std::path::Path) -> std::io::Result<()> {
    let existed = path.exists();
    std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(path)?;
    if !existed {
        std::fs::remove_file(path)?;
    }
    Ok(())
}

/// Kernel functions listed per operation by `--profile`.
const PROFILE_LINES: usize = 16;

/// `--profile`: where each stepped operation's ring-0 instructions go.
fn print_profiles(rows: &[Row]) {
    use crate::session::emit;
    emit(format_args!(""));
    emit(format_args!(
        "where the ring-0 instructions go (--profile): stepped instructions per operation by the kernel function \
         they ran in (inlined code counts in its caller; a vector stub's 2 or 3 instructions are not stepped)"
    ));
    for row in rows.iter().filter(|r| !r.profile.is_empty()) {
        let total = row.instructions.map_or("?".into(), report::format_count);
        let budget = row.budget.map_or(String::new(), |b| format!(", budget {}", report::format_count(b)));
        emit(format_args!("  {} ({total} per operation{budget}):", row.name));
        for (function, count) in row.profile.iter().take(PROFILE_LINES) {
            emit(format_args!("    {:>10}  {function}", report::format_count(*count)));
        }
        if row.profile.len() > PROFILE_LINES {
            let rest: f64 = row.profile[PROFILE_LINES..].iter().map(|(_, c)| c).sum();
            emit(format_args!(
                "    {:>10}  ({} more functions)",
                report::format_count(rest),
                row.profile.len() - PROFILE_LINES
            ));
        }
    }
}

/// The line above the table: the command, the machine, the date.
fn heading(machine: &serde_json::Value, date: &str, quick: bool) -> String {
    format!(
        "superos-vmm bench{}: {}, {} cores, host kernel {}, {}; load average {} at the end; {date}",
        if quick { " --quick" } else { "" },
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cores"],
        machine["host_kernel"].as_str().unwrap_or("?"),
        machine["kvm"].as_str().unwrap_or("?"),
        machine["load_average_1min"].as_str().unwrap_or("?"),
    )
}

fn print_results(
    rows: &[Row],
    machine: &serde_json::Value,
    date: &str,
    stepping: &str,
    quick: bool,
    elapsed: Duration,
) {
    use crate::session::emit;
    emit(format_args!("{}", heading(machine, date, quick)));
    emit(format_args!(""));
    for line in report::table(rows).lines() {
        emit(format_args!("{line}"));
    }
    emit(format_args!(""));
    emit(format_args!("ratio = SuperOS median / host median; {stepping}."));
    emit(format_args!("host baselines:"));
    for row in rows.iter().filter(|r| !r.host_baseline.is_empty()) {
        emit(format_args!("  {:<15} {}", row.name, row.host_baseline));
    }
    emit(format_args!("notes:"));
    for row in rows {
        if let Err(error) = &row.superos {
            emit(format_args!("  {:<15} FAILED: {error}", row.name));
        }
        if let Some(Err(error)) = &row.host {
            emit(format_args!("  {:<15} host baseline FAILED: {error}", row.name));
        }
        for note in &row.notes {
            emit(format_args!("  {:<15} {note}", row.name));
        }
    }
    emit(format_args!("({:.1} s)", elapsed.as_secs_f64()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_entries_are_named() {
        assert_eq!(entry_name("syscall 4"), "getpid");
        assert_eq!(entry_name("syscall 21"), "ipc_recv");
        assert_eq!(entry_name("syscall 999"), "syscall 0x3e7");
        assert_eq!(entry_name("vector 14"), "page fault");
        assert_eq!(entry_name("vector 13"), "vector 13");
        let mut excursions = std::collections::BTreeMap::new();
        excursions.insert("syscall 4".to_string(), vec![120, 123, 125]);
        excursions.insert("vector 14".to_string(), vec![]);
        assert_eq!(kernel_entries(&excursions), vec![("getpid".to_string(), 123.0, 3)]);
        let lines = wrap(&["aaaa".into(), "bbbb".into(), "cccc".into()], 10);
        assert_eq!(lines, vec!["aaaa, bbbb".to_string(), "cccc".to_string()]);
    }

    #[test]
    fn utc_dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(format_utc(1_795_603_896), "2026-11-25 10:51 UTC");
    }

    #[test]
    fn every_group_has_a_help_line_and_plans_are_sane() {
        for group in GROUPS {
            assert!(BENCH_HELP.contains(&format!("  {group} ")), "{group}");
        }
        for quick in [false, true] {
            let plan = Plan::new(quick);
            assert!(plan.samples >= 3 && plan.boots >= 3);
            assert_eq!(plan.stream_kib % (2 * plan.shm_chunk_kib), 0);
            assert_eq!(plan.stream_kib % 64, 0);
        }
        assert_eq!(Plan::new(false).stream_label(), "16 MiB");
    }
}
