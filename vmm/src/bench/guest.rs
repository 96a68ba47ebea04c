//! Timing runs: a scenario built in code, run quietly with
//! [`crate::run::run`], and the `bench: sample ...` lines its programs print.

use crate::check::CheckMode;
use crate::run::{self, RunConfig, RunReport};
use crate::scenario::Scenario;
use std::path::Path;
use std::time::Duration;

/// One `bench: sample op=<op> ops=<n> cycles=<c>` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// The operation.
    pub op: String,
    /// Operations in the sample.
    pub ops: u64,
    /// TSC cycles for all of them.
    pub cycles: u64,
}

/// Samples and the TSC frequency the programs printed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Printed {
    /// From `bench: tsc_khz=<kHz>` (the first one).
    pub tsc_khz: Option<u64>,
    /// The samples, in order.
    pub samples: Vec<Sample>,
    /// `bench: error: ...` lines.
    pub errors: Vec<String>,
    /// Any other `bench: ...` lines.
    pub remarks: Vec<String>,
}

impl Printed {
    /// Nanoseconds per operation of each sample of `op`.
    pub fn ns_per_op(&self, op: &str) -> Vec<f64> {
        let Some(khz) = self.tsc_khz.filter(|&k| k > 0) else {
            return Vec::new();
        };
        self.samples
            .iter()
            .filter(|s| s.op == op && s.ops > 0)
            .map(|s| s.cycles as f64 * 1e6 / khz as f64 / s.ops as f64)
            .collect()
    }
}

/// Parses the lines `bench-ops` prints; other lines are ignored.
pub fn parse<'a>(lines: impl IntoIterator<Item = &'a str>) -> Printed {
    let mut printed = Printed::default();
    for line in lines {
        let Some(rest) = line.strip_prefix("bench: ") else { continue };
        if let Some(khz) = rest.strip_prefix("tsc_khz=") {
            if printed.tsc_khz.is_none() {
                printed.tsc_khz = khz.trim().parse().ok();
            }
        } else if let Some(fields) = rest.strip_prefix("sample ") {
            let field = |key: &str| {
                fields
                    .split(' ')
                    .find_map(|word| word.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
            };
            let number = |key: &str| field(key).and_then(|v| v.parse::<u64>().ok());
            if let (Some(op), Some(ops), Some(cycles)) = (field("op"), number("ops"), number("cycles")) {
                printed.samples.push(Sample { op, ops, cycles });
            }
        } else if let Some(error) = rest.strip_prefix("error: ") {
            printed.errors.push(error.to_string());
        } else {
            printed.remarks.push(rest.to_string());
        }
    }
    printed
}

/// One `[[process]]` of a benchmark scenario.
#[derive(Clone, Debug)]
pub struct Process<'a> {
    /// Embedded program.
    pub program: &'a str,
    /// Name.
    pub name: &'a str,
    /// Arguments.
    pub args: String,
    /// Runs (1 = once).
    pub runs: u32,
    /// Expected fault, if it is meant to be killed.
    pub fault: Option<&'a str>,
}

impl<'a> Process<'a> {
    /// A process run once that must exit 0.
    pub fn new(program: &'a str, name: &'a str, args: impl Into<String>) -> Self {
        Process { program, name, args: args.into(), runs: 1, fault: None }
    }
}

/// The scenario text for `processes`.
pub fn scenario_text(description: &str, memory_mib: u64, processes: &[Process<'_>]) -> String {
    scenario_text_on(description, memory_mib, 1, processes)
}

/// The scenario text for `processes` on `cpus` vCPUs.
pub fn scenario_text_on(description: &str, memory_mib: u64, cpus: u32, processes: &[Process<'_>]) -> String {
    let mut text = format!("description = {description:?}\n[vm]\nmemory_mib = {memory_mib}\ncpus = {cpus}\n");
    for p in processes {
        text.push_str(&format!(
            "[[process]]\nprogram = {:?}\nname = {:?}\nargs = {:?}\nruns = {}\n",
            p.program, p.name, p.args, p.runs
        ));
        if let Some(fault) = p.fault {
            text.push_str(&format!("expect = {{ fault = {fault:?} }}\n"));
        }
    }
    text
}

/// The scenario for `processes`.
pub fn scenario(name: &str, memory_mib: u64, processes: &[Process<'_>]) -> Result<Scenario, String> {
    scenario_on(name, memory_mib, 1, processes)
}

/// The scenario for `processes` on `cpus` vCPUs.
pub fn scenario_on(
    name: &str,
    memory_mib: u64,
    cpus: u32,
    processes: &[Process<'_>],
) -> Result<Scenario, String> {
    let text = scenario_text_on(&format!("superos-vmm bench: {name}"), memory_mib, cpus, processes);
    Scenario::parse(&text, &format!("bench:{name}"), Path::new(".")).map_err(|e| e.to_string())
}

/// The run configuration the benchmarks use: quiet, embedded kernel, no
/// extra checking.
pub fn config(scenario: Scenario, timeout: Duration) -> RunConfig {
    let mut config = RunConfig::new(scenario);
    config.timeout = timeout;
    // The library default checks the invariants at every event; timing
    // runs measure the kernel, not the checker.
    config.check = CheckMode::Off;
    config
}

/// Runs `scenario`; an error unless every process did what it expects.
pub fn run(scenario: Scenario, timeout: Duration) -> Result<RunReport, String> {
    let report = run::run(config(scenario, timeout)).map_err(|e| e.to_string())?;
    if report.success() {
        return Ok(report);
    }
    Err(failure(&report))
}

/// Why a run did not go as expected, in one line.
pub fn failure(report: &RunReport) -> String {
    let mut why = report.exit.to_string();
    for process in report.processes.iter().filter(|p| !p.as_expected()) {
        why.push_str(&format!("; {}: {} (expected {})", process.name, process.describe(), process.expected));
    }
    let printed = parse(report.lines.iter().map(|l| l.text.as_str()));
    for error in printed.errors {
        why.push_str(&format!("; {error}"));
    }
    why
}

/// Runs `scenario` and parses what its programs printed.
pub fn run_and_parse(scenario: Scenario, timeout: Duration) -> Result<(RunReport, Printed), String> {
    let report = run(scenario, timeout)?;
    let printed = parse(report.lines.iter().map(|l| l.text.as_str()));
    if printed.tsc_khz.unwrap_or(0) == 0 {
        return Err("the guest knows no TSC frequency".into());
    }
    Ok((report, printed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_lines_parse() {
        let printed = parse([
            "hello",
            "bench: tsc_khz=2000000",
            "bench: sample op=syscall ops=1000 cycles=178000000",
            "bench: sample op=mem-16 ops=10 cycles=60000000",
            "bench: tsc_khz=1",
            "bench: sample op=broken ops=x cycles=1",
            "bench: error: mem_map: out-of-memory",
            "bench: a remark",
        ]);
        assert_eq!(printed.tsc_khz, Some(2_000_000));
        assert_eq!(printed.samples.len(), 2);
        assert_eq!(printed.samples[1], Sample { op: "mem-16".into(), ops: 10, cycles: 60_000_000 });
        assert_eq!(printed.errors, vec!["mem_map: out-of-memory".to_string()]);
        assert_eq!(printed.remarks, vec!["a remark".to_string()]);
        // 178000 cycles at 2 GHz = 89 µs.
        assert_eq!(printed.ns_per_op("syscall"), vec![89_000.0]);
        assert_eq!(printed.ns_per_op("mem-16"), vec![3_000_000.0]);
        assert!(printed.ns_per_op("nothing").is_empty());
        assert!(parse(["bench: sample op=x ops=1 cycles=1"]).ns_per_op("x").is_empty(), "no frequency");
    }

    #[test]
    fn scenarios_are_built_and_checked() {
        let mut grantee = Process::new("bench-ops", "grantee", "mode=grantee owner=1");
        grantee.runs = 3;
        grantee.fault = Some("use-after-revoke");
        let s =
            scenario("revoke", 32, &[Process::new("bench-ops", "owner", "mode=revoke samples=3"), grantee])
                .unwrap();
        assert_eq!(s.memory_mib, Some(32));
        assert_eq!(s.processes.len(), 2);
        assert_eq!(s.processes[1].runs, 3);
        assert_eq!(s.origin, "bench:revoke");
        assert!(scenario("bad", 32, &[Process::new("no-such-program", "x", "")]).is_err());
    }
}
