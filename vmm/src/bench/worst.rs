//! The two worst-case rows: the worst kernel entry a user program can
//! construct with a bystander's wait for the CPU meanwhile (issue 11), and
//! the VMM's peak resident memory under the hostile kernels the VMM can be
//! made to run (issue 13).
//!
//! Worst entry: each [`Case`] runs `quota-hog` (the hog) twice. A plain run
//! beside a `quota-hog mode=watch` bystander, which spins reading the TSC and
//! prints the longest gap between two reads: the time the hog, and the kernel
//! for it, held the only CPU. And a stepped run of the hog alone
//! ([`super::probe`], from the first user instruction), whose per-excursion
//! ring-0 instruction counts give the longest single kernel entry by kind.
//!
//! VMM peak memory: `superos-vmm run hello --debug-inject <flood>` (console,
//! event, and all: both interleaved after all guest RAM is made resident) is run as
//! a child of this process for a bounded time (the watchdog ends it, exit
//! status 4), and its peak resident memory is read from `wait4`'s rusage
//! (`ru_maxrss`): a figure for that child alone.

use super::guest::{self, Process};
use super::probe::{self, ProbeOptions, Stepping};
use crate::run::{GuestExit, RunReport};
use std::collections::BTreeMap;
use std::time::Duration;
use superos_protocol::event::Event;

/// One worst-entry case: the hog's arguments and the guest it runs in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    /// What the hog does, for people.
    pub label: String,
    /// `quota-hog` arguments for the plain run beside the bystander.
    pub hog: String,
    /// `quota-hog` arguments for the stepped run (`None`: not counted, the
    /// reference case). Stepping costs ~10 µs a ring-0 instruction on the
    /// PVM host, so it may be given a smaller size where the longest entry
    /// does not grow with it.
    pub stepped: Option<String>,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// How long the bystander watches, in ms: long enough to outlast the
    /// hog (whether it did is checked, [`CaseResult::covered`]).
    pub watch_ms: u64,
}

/// The worst-entry cases, the reference (a second ring-3 spinner) first.
///
/// `mem_protect`/`mem_unmap` are sliced (`SLICE_BUDGET` units of work per
/// kernel entry), so their longest entry is the same for every region with
/// one full slice of present pages (`dense_kib=256`: 64 present pages in
/// one table); the full plan runs them over 1 GiB for the bystander and
/// counts 128 MiB. The shared-region calls are sliced or unlink whole page
/// tables and an exit's teardown goes a slice per kernel entry, so their
/// longest entry no longer grows with the region; it is still counted at
/// the largest (`SHM_MAX`, 64 MiB) in the full plan, to show it.
pub fn cases(quick: bool) -> Vec<Case> {
    // Sizes in KiB.
    let (range_kib, range_stepped_kib, shm_kib, shm_guest) =
        if quick { (4 << 10, 4 << 10, 256, 64) } else { (1 << 20, 128 << 10, 64 << 10, 128) };
    let (range_watch, shm_watch) = if quick { (600, 600) } else { (20_000, 30_000) };
    let ranges = |kib: u64| format!("mode=ranges kib={kib} dense_kib=256");
    vec![
        Case {
            label: "reference: a second ring-3 spinner".into(),
            hog: "mode=watch ms=300".into(),
            stepped: None,
            memory_mib: 64,
            watch_ms: 500,
        },
        Case {
            label: format!(
                "mem_protect + mem_unmap of {} (untouched, then with 1 page per 2 MiB and 256 KiB touched: a page \
                 table per 2 MiB){}",
                size_label(range_kib),
                if range_stepped_kib == range_kib {
                    String::new()
                } else {
                    format!(", counted on {}", size_label(range_stepped_kib))
                }
            ),
            hog: ranges(range_kib),
            stepped: Some(ranges(range_stepped_kib)),
            memory_mib: 64,
            watch_ms: range_watch,
        },
        Case {
            label: format!(
                "shm_create + shm_map + shm_unmap + shm_destroy of {}, then exit holding {} mapped",
                size_label(shm_kib),
                size_label(shm_kib)
            ),
            hog: format!("mode=shm kib={shm_kib} exit=1"),
            stepped: Some(format!("mode=shm kib={shm_kib} exit=1")),
            memory_mib: shm_guest,
            watch_ms: shm_watch,
        },
    ]
}

fn size_label(kib: u64) -> String {
    match kib {
        k if k >= 1 << 20 && k % (1 << 20) == 0 => format!("{} GiB", k >> 20),
        k if k >= 1 << 10 && k % (1 << 10) == 0 => format!("{} MiB", k >> 10),
        k => format!("{k} KiB"),
    }
}

/// What one case measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CaseResult {
    /// The case.
    pub label: String,
    /// The bystander's longest wait between two TSC reads, in µs.
    pub wait_us: Option<u64>,
    /// Whether the bystander was still watching when the hog exited.
    pub covered: bool,
    /// The longest kernel entry of each kind (named as in the bench's
    /// kernel-entry list), and how many entries of it there were.
    pub worst_by_kind: BTreeMap<String, (u64, usize)>,
    /// Steps (ring-0 instructions and any others) of the stepped run.
    pub steps: u64,
    /// Whether single-stepping worked in the stepped run (`None`: none made).
    pub stepping: Option<Result<(), String>>,
    /// What went wrong, if anything.
    pub errors: Vec<String>,
}

impl CaseResult {
    /// The longest kernel entry of any kind: (kind, instructions). The
    /// entry the kernel shut down in (after the last process, with nobody
    /// left to wait) is not a system call's and is left out.
    pub fn worst(&self) -> Option<(&str, u64)> {
        self.worst_by_kind
            .iter()
            .filter(|(kind, _)| kind.as_str() != probe::SHUTDOWN_EXCURSION)
            .max_by_key(|(_, (n, _))| *n)
            .map(|(kind, (n, _))| (kind.as_str(), *n))
    }

    /// As JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "case": self.label,
            "bystander_longest_wait_us": self.wait_us,
            "bystander_outlasted_hog": self.covered,
            "steps": self.steps,
            "worst_entry": self.worst().map(|(kind, n)| serde_json::json!({ "entry": kind, "instructions": n })),
            "worst_by_entry": self.worst_by_kind.iter().map(|(kind, (n, count))| {
                serde_json::json!({ "entry": kind, "instructions": n, "count": count })
            }).collect::<Vec<_>>(),
            "errors": self.errors,
        })
    }
}

/// `quota-hog: watch: longest wait <us> us in <ms> ms` -> µs.
pub fn parse_wait(line: &str) -> Option<u64> {
    let rest = line.split("watch: longest wait ").nth(1)?;
    rest.split(' ').next()?.parse().ok()
}

/// The bystander's wait (pid 1) and whether it exited after the hog (pid 2).
pub fn bystander(report: &RunReport) -> (Option<u64>, bool) {
    let wait = report.lines.iter().filter(|l| l.pid == 1).find_map(|l| parse_wait(&l.text));
    let exited = |who: u32| {
        report.events.iter().position(|e| matches!(e.event, Event::ProcessExited { pid, .. } if pid == who))
    };
    let covered = matches!((exited(1), exited(2)), (Some(b), Some(h)) if b > h);
    (wait, covered)
}

/// The longest excursion of each kind (`excursions` as the probe counts
/// them, named with `name`), with their counts.
pub fn worst_by_kind(
    excursions: &BTreeMap<String, Vec<u64>>,
    name: impl Fn(&str) -> String,
) -> BTreeMap<String, (u64, usize)> {
    let mut worst = BTreeMap::new();
    for (kind, lengths) in excursions {
        let Some(&longest) = lengths.iter().max() else { continue };
        let entry = worst.entry(name(kind)).or_insert((0, 0));
        entry.0 = entry.0.max(longest);
        entry.1 += lengths.len();
    }
    worst
}

/// Plain runs per case at most (the bystander's watch doubled each time).
const WATCH_TRIES: usize = 3;

/// Runs one case: the plain run with the bystander, then (if asked and
/// `stepping` has not failed before) the stepped run of the hog alone.
pub fn run_case(case: &Case, timeout: Duration, stepping: bool) -> CaseResult {
    let mut result = CaseResult { label: case.label.clone(), ..CaseResult::default() };
    // A loaded machine runs the hog slower: a bystander that stopped
    // watching before the hog exited watches twice as long the next time.
    let mut watch_ms = case.watch_ms;
    for _ in 0..WATCH_TRIES {
        let processes = [
            Process::new("quota-hog", "bystander", format!("mode=watch ms={watch_ms}")),
            Process::new("quota-hog", "hog", case.hog.clone()),
        ];
        match guest::scenario("worst-entry", case.memory_mib, &processes).and_then(|s| guest::run(s, timeout))
        {
            Ok(report) => (result.wait_us, result.covered) = bystander(&report),
            Err(e) => {
                result.errors.push(format!("plain run: {e}"));
                break;
            }
        }
        if result.covered {
            break;
        }
        watch_ms *= 2;
    }
    if result.wait_us.is_none() && result.errors.is_empty() {
        result.errors.push("the bystander printed no wait".into());
    }
    let Some(stepped) = case.stepped.clone().filter(|_| stepping) else {
        return result;
    };
    let options = ProbeOptions {
        stepping: Stepping::FromFirstUser,
        snapshot: false,
        checks: 0,
        dirtied: &[],
        memory_mib: case.memory_mib,
        timeout: timeout * super::STEPPED_TIMEOUT_FACTOR,
    };
    // The survivor keeps the kernel running past the hog's exit (the
    // entry the kernel shuts down in is counted apart).
    let hog = [
        Process::new("quota-hog", "hog", stepped),
        Process::new("quota-hog", "survivor", "mode=outlive pid=1"),
    ];
    match guest::scenario("worst-entry", case.memory_mib, &hog).and_then(|s| probe::probe(&s, &options)) {
        Ok(found) => {
            result.stepping = found.counts.stepping.clone();
            if let Some(Err(e)) = &found.counts.stepping {
                result.errors.push(format!("stepping: {e}"));
            } else if !matches!(found.exit, GuestExit::Shutdown { code: 0 }) {
                result.errors.push(format!("stepped run: {}", found.exit));
            } else {
                result.worst_by_kind = worst_by_kind(&found.counts.excursions, super::entry_name);
                result.steps = found.counts.steps;
            }
        }
        Err(e) => result.errors.push(format!("stepped run: {e}")),
    }
    result
}

/// The hostile kernels: `--debug-inject` values.
pub const FLOODS: [&str; 3] = ["console-flood", "event-flood", "all-flood"];

/// The VMM's fixed memory budget beyond guest RAM that the bound allows:
/// `vmm/tests/cli.rs` asserts 160 MiB for a 64 MiB guest (the caps of
/// docs/ARCHITECTURE.md, "The VMM's memory bound", and the program itself).
pub const VMM_BUDGET_MIB: u64 = 96;

/// One hostile run of the VMM as a child process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flood {
    /// The `--debug-inject` value.
    pub inject: String,
    /// The child's exit status (4: the watchdog stopped it).
    pub status: i32,
    /// Its peak resident memory in bytes (`ru_maxrss`).
    pub peak_bytes: u64,
}

/// Runs `superos-vmm run hello -q --mem <memory_mib> --timeout <seconds>
/// --debug-inject <inject>` (this executable) as a child; its exit status
/// and peak resident memory.
pub fn flood(inject: &str, memory_mib: u64, seconds: f64) -> Result<Flood, String> {
    let exe = std::env::current_exe().map_err(|e| format!("this executable: {e}"))?;
    let child = std::process::Command::new(&exe)
        .args(["run", "hello", "-q", "--mem", &memory_mib.to_string()])
        .args(["--timeout", &seconds.to_string(), "--debug-inject", inject])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", exe.display()))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is this process's own child, not yet waited for (`child`
    // is never waited on: dropping a Child does not wait); the pointers are
    // valid for the call.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if waited != pid {
        return Err(format!("wait4: {}", std::io::Error::last_os_error()));
    }
    let status = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -libc::WTERMSIG(status) };
    Ok(Flood { inject: inject.to_string(), status, peak_bytes: (usage.ru_maxrss.max(0) as u64) << 10 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bystander_lines_and_worst_entries_parse() {
        assert_eq!(parse_wait("quota-hog: watch: longest wait 391439 us in 3000 ms"), Some(391_439));
        assert_eq!(parse_wait("quota-hog: ranges: done"), None);
        let mut excursions = BTreeMap::new();
        excursions.insert("syscall 12".to_string(), vec![100, 16_700, 900]);
        excursions.insert("syscall 11".to_string(), vec![17_600]);
        excursions.insert("vector 14".to_string(), vec![]);
        let worst = worst_by_kind(&excursions, |k| k.to_string());
        assert_eq!(worst.len(), 2);
        assert_eq!(worst["syscall 12"], (16_700, 3));
        let result = CaseResult { worst_by_kind: worst, ..CaseResult::default() };
        assert_eq!(result.worst(), Some(("syscall 11", 17_600)));
        assert_eq!(result.json()["worst_entry"]["instructions"], 17_600);
    }

    #[test]
    fn cases_are_cheap_in_quick_and_the_worst_in_full() {
        for quick in [true, false] {
            let cases = cases(quick);
            assert_eq!(cases.len(), 3);
            assert!(cases[0].stepped.is_none() && cases[1..].iter().all(|c| c.stepped.is_some()));
            for case in &cases {
                guest::scenario("x", case.memory_mib, &[Process::new("quota-hog", "hog", case.hog.clone())])
                    .unwrap();
            }
        }
        let full = cases(false);
        assert!(full[1].hog.contains("kib=1048576") && full[2].hog.contains("kib=65536"));
        assert!(full[1].label.contains("of 1 GiB") && full[2].label.contains("of 64 MiB"));
        assert!(cases(true)[2].label.contains("of 256 KiB"));
        assert_eq!(full[2].stepped.as_deref(), Some(full[2].hog.as_str()), "the largest region is counted");
    }
}
