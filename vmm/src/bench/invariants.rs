//! The outside-in invariant check ([`crate::check::Checker`], `run --check`)
//! measured: how long one full check takes for 1, 16 and 32 live processes
//! at several resident sizes, and how many page-table entries per second
//! its walk covers; a scaling table and an SVG plot of check time against
//! mapped pages.
//!
//! Each point is one instrumented boot ([`super::probe`]) of `bench-ops
//! hold` processes that map and touch their pages, tell the releaser, and
//! wait; at the releaser's `MemProtected` event every process is alive and
//! resident, and the VMM runs the checker several times while the vCPU
//! waits. Guest memory is the same for every point, so the free-frame scan
//! (part of every check: free frames must be zero) covers about the same
//! RAM each time and the differences come from what is mapped.
//!
//! 64 live processes cannot be measured: the kernel starts at most
//! [`MAX_BOOT_PROCESSES`] (32) at boot and has no spawn call.

use super::guest::{self, Process};
use super::probe::{self, CheckSample, ProbeOptions, Stepping};
use super::report::{format_time, Row, Unit};
use super::stats::Summary;
use super::Plan;
use serde_json::{json, Value};
use std::fmt::Write as _;
use superos_protocol::boot::MAX_BOOT_PROCESSES;

/// Guest memory for every point.
pub const CHECK_MEMORY_MIB: u64 = 256;

/// One configuration, measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// Live processes (the releaser included).
    pub processes: u32,
    /// Pages each holds resident beyond its image and stack.
    pub pages: u64,
    /// User leaf mappings the walk found (all processes).
    pub mappings: u64,
    /// Page-table entries walked per check.
    pub ptes: u64,
    /// Free frames scanned per check.
    pub frames_scanned: u64,
    /// Whole check, ns.
    pub time: Summary,
    /// Walk only, ns.
    pub walk: Summary,
    /// Page-table entries per second of walk.
    pub ptes_per_second: Summary,
    /// Violations found (there should be none).
    pub violations: usize,
    /// The first check, ns: cold, it also faults the untouched guest RAM
    /// into the VMM (the free-frame scan reads all of it); not in `time`.
    pub cold: f64,
}

impl Point {
    /// A point from the checks run at one snapshot: the first is the cold
    /// one, the rest are the samples.
    fn from_samples(processes: u32, pages: u64, checks: &[CheckSample]) -> Option<Point> {
        let (cold, samples) = checks.split_first()?;
        let first = samples.first()?;
        let ns = |f: fn(&CheckSample) -> f64| Summary::of(&samples.iter().map(f).collect::<Vec<_>>());
        Some(Point {
            processes,
            pages,
            mappings: first.mappings,
            ptes: first.ptes,
            frames_scanned: first.frames_scanned,
            time: ns(|s| s.time.as_nanos() as f64)?,
            walk: ns(|s| s.walk_time.as_nanos() as f64)?,
            ptes_per_second: ns(|s| s.ptes as f64 / s.walk_time.as_secs_f64().max(1e-9))?,
            violations: checks.iter().map(|s| s.violations).max().unwrap_or(0),
            cold: cold.time.as_nanos() as f64,
        })
    }

    /// As JSON.
    pub fn json(&self) -> Value {
        json!({
            "processes": self.processes,
            "pages_per_process": self.pages,
            "user_mappings": self.mappings,
            "ptes_walked": self.ptes,
            "free_frames_scanned": self.frames_scanned,
            "check_ns": { "median": self.time.median, "min": self.time.min, "max": self.time.max, "samples": self.time.samples },
            "walk_ns": { "median": self.walk.median, "min": self.walk.min, "max": self.walk.max },
            "ptes_per_second": self.ptes_per_second.median,
            "cold_check_ns": self.cold,
            "violations": self.violations,
        })
    }
}

/// (live processes, pages each) to measure.
pub fn configurations(plan: &Plan) -> Vec<(u32, u64)> {
    let (counts, sizes): (&[u32], &[u64]) = if plan.quick {
        (&[1, 8], &[16, 64])
    } else {
        (&[1, 16, MAX_BOOT_PROCESSES as u32], &[16, 256, 1024])
    };
    let budget = (CHECK_MEMORY_MIB << 8) / 4; // at most a quarter of guest RAM held
    let mut configurations = Vec::new();
    for &count in counts {
        for &pages in sizes {
            if u64::from(count) * pages <= budget {
                configurations.push((count, pages));
            }
        }
    }
    configurations
}

/// `processes - 1` processes that map and touch `pages` pages each and
/// wait, and the releaser (the last pid), whose `MemProtected` event comes
/// once they all hold their pages.
pub fn hold_processes(processes: u32, pages: u64) -> Vec<Process<'static>> {
    let holders = processes - 1;
    let releaser = processes;
    let mut list: Vec<Process<'static>> = (0..holders)
        .map(|_| Process::new("bench-ops", "hold", format!("mode=hold pages={pages} peer={releaser}")))
        .collect();
    list.push(Process::new(
        "bench-ops",
        "release",
        format!("mode=release waiters={holders} pages={pages} sync=1"),
    ));
    list
}

/// Measures one configuration.
pub fn measure(plan: &Plan, processes: u32, pages: u64) -> Result<Point, String> {
    let scenario = guest::scenario("check", CHECK_MEMORY_MIB, &hold_processes(processes, pages))?;
    let options = ProbeOptions {
        stepping: Stepping::Off,
        snapshot: true,
        checks: 1 + if plan.quick { 3 } else { 7 },
        dirtied: &[],
        memory_mib: CHECK_MEMORY_MIB,
        timeout: plan.timeout,
    };
    let found = probe::probe(&scenario, &options)?;
    let snapshot = found.snapshot.ok_or_else(|| format!("no snapshot was taken ({})", found.exit))?;
    Point::from_samples(processes, pages, &snapshot.checks).ok_or_else(|| "no check ran".to_string())
}

/// The rows of the main table from the measured points: the largest
/// configuration's check time and walk rate.
pub fn rows(points: &[Point], errors: &[String]) -> Vec<Row> {
    let mut time = Row::new("check", "outside-in invariant check, one full check", Unit::Time);
    let mut rate =
        Row::new("check-ptes", "outside-in check: page-table entries walked per second", Unit::Rate);
    let largest = points.iter().max_by_key(|p| (p.mappings, p.processes));
    match largest {
        Some(p) => {
            time.operation = format!(
                "outside-in invariant check, {} processes x {} pages (one full check)",
                p.processes, p.pages
            );
            time.superos = Ok(p.time);
            rate.superos = Ok(p.ptes_per_second);
            time.notes.push(format!(
                "{} page-table entries, {} user mappings, {} free frames scanned (guest {} MiB); walk {}, the \
                 rest is the free-frame zero scan; the first (cold) check took {} and is left out; scaling table \
                 below",
                p.ptes,
                p.mappings,
                p.frames_scanned,
                CHECK_MEMORY_MIB,
                format_time(p.walk.median),
                format_time(p.cold)
            ));
            if p.violations > 0 {
                time.notes.push(format!("the checker reported {} violations", p.violations));
            }
        }
        None => {
            let why = errors.first().cloned().unwrap_or_else(|| "no configuration measured".into());
            time.superos = Err(why.clone());
            rate.superos = Err(why);
        }
    }
    for error in errors {
        time.notes.push(format!("a configuration failed: {error}"));
    }
    time.host_baseline = "none: the host has no outside-in checker".into();
    vec![time, rate]
}

/// The scaling table, as text.
pub fn scaling_table(points: &[Point]) -> String {
    let mut out = format!(
        "invariant check scaling (guest {CHECK_MEMORY_MIB} MiB; median of {} checks per point after a cold one):\n",
        points.first().map_or(0, |p| p.time.samples)
    );
    let _ = writeln!(
        out,
        "{:>9}  {:>11}  {:>13}  {:>11}  {:>12}  {:>11}  {:>10}  {:>10}",
        "processes", "pages each", "user mappings", "PTEs walked", "free scanned", "check", "walk", "PTEs/s"
    );
    for p in points {
        let _ = writeln!(
            out,
            "{:>9}  {:>11}  {:>13}  {:>11}  {:>12}  {:>11}  {:>10}  {:>10}",
            p.processes,
            p.pages,
            p.mappings,
            p.ptes,
            p.frames_scanned,
            format_time(p.time.median),
            format_time(p.walk.median),
            super::report::format_rate(p.ptes_per_second.median)
        );
    }
    out
}

/// An SVG plot against mapped pages, one series per process count: the
/// full check time (left) and the page-table walk alone (right).
pub fn svg(points: &[Point], title: &str) -> String {
    let (width, height) = (900.0, 420.0);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        width / 2.0,
        escape(title)
    );
    let mut counts: Vec<u32> = points.iter().map(|p| p.processes).collect();
    counts.sort_unstable();
    counts.dedup();
    let full = Panel {
        left: 70.0,
        top: 50.0,
        width: 330.0,
        height: 300.0,
        label: "full check, ms",
        scale: 1e6,
        value: |p| p.time.median,
    };
    let walk = Panel {
        left: 450.0,
        label: "page-table walk only, µs",
        scale: 1e3,
        value: |p| p.walk.median,
        ..full
    };
    panel(&mut out, points, &counts, full);
    panel(&mut out, points, &counts, walk);
    for (i, count) in counts.iter().enumerate() {
        let (lx, ly) = (800.0, 70.0 + 22.0 * i as f64);
        let _ = writeln!(
            out,
            "<circle cx=\"{lx}\" cy=\"{ly}\" r=\"4\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{count} process{}</text>",
            COLORS[i % COLORS.len()],
            lx + 10.0,
            ly + 4.0,
            if *count == 1 { "" } else { "es" }
        );
    }
    out.push_str("</svg>\n");
    out
}

const COLORS: [&str; 5] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"];

/// Where one plot goes and what it shows.
#[derive(Clone, Copy)]
struct Panel<'a> {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
    label: &'a str,
    /// Nanoseconds per unit on the y axis.
    scale: f64,
    value: fn(&Point) -> f64,
}

/// Round tick values for an axis from 0 to at least `max`: a step of 1, 2
/// or 5 times a power of ten giving 4 to 10 intervals, and the axis's end
/// (a whole number of steps).
fn ticks(max: f64) -> (f64, f64) {
    let max = if max.is_finite() && max > 0.0 { max } else { 1.0 };
    let power = 10f64.powf((max / 5.0).log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|step| max / step <= 10.0)
        .unwrap_or(power * 10.0);
    let step = if max / step < 4.0 { step / 2.0 } else { step };
    (step, (max / step).ceil() * step)
}

/// A tick value with as many decimals as the step needs.
fn tick_label(value: f64, step: f64) -> String {
    let decimals = if step >= 1.0 { 0 } else { (-step.log10().floor()) as usize };
    format!("{value:.decimals$}")
}

fn panel(out: &mut String, points: &[Point], counts: &[u32], p: Panel<'_>) {
    let (step_x, max_x) = ticks(points.iter().map(|q| q.mappings as f64).fold(1.0, f64::max));
    let (step_y, max_y) = ticks(points.iter().map(|q| (p.value)(q) / p.scale).fold(1e-3, f64::max));
    let bottom = p.top + p.height;
    let x = |v: f64| p.left + v / max_x * p.width;
    let y = |v: f64| bottom - v / max_y * p.height;
    let _ = writeln!(
        out,
        "<line x1=\"{0}\" y1=\"{bottom}\" x2=\"{1}\" y2=\"{bottom}\" stroke=\"black\"/>\n\
         <line x1=\"{0}\" y1=\"{2}\" x2=\"{0}\" y2=\"{bottom}\" stroke=\"black\"/>\n\
         <text x=\"{3}\" y=\"{4}\" text-anchor=\"middle\">{5}</text>\n\
         <text x=\"{3}\" y=\"{6}\" text-anchor=\"middle\">user pages mapped (all processes)</text>",
        p.left,
        p.left + p.width,
        p.top,
        p.left + p.width / 2.0,
        p.top - 8.0,
        escape(p.label),
        bottom + 36.0
    );
    // Gridlines and labels at round values.
    for i in 0..=(max_x / step_x).round() as u32 {
        let vx = step_x * f64::from(i);
        let _ = writeln!(
            out,
            "<line x1=\"{0:.1}\" y1=\"{1}\" x2=\"{0:.1}\" y2=\"{bottom}\" stroke=\"#e0e0e0\"/>\n\
             <text x=\"{0:.1}\" y=\"{2:.1}\" text-anchor=\"middle\">{3}</text>",
            x(vx),
            p.top,
            bottom + 16.0,
            tick_label(vx, step_x)
        );
    }
    for i in 0..=(max_y / step_y).round() as u32 {
        let vy = step_y * f64::from(i);
        let _ = writeln!(
            out,
            "<line x1=\"{0}\" y1=\"{1:.1}\" x2=\"{2}\" y2=\"{1:.1}\" stroke=\"#e0e0e0\"/>\n\
             <text x=\"{3:.1}\" y=\"{4:.1}\" text-anchor=\"end\">{5}</text>",
            p.left,
            y(vy),
            p.left + p.width,
            p.left - 6.0,
            y(vy) + 4.0,
            tick_label(vy, step_y)
        );
    }
    for (i, count) in counts.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut series: Vec<&Point> = points.iter().filter(|q| q.processes == *count).collect();
        series.sort_by_key(|q| q.mappings);
        let path: Vec<String> = series
            .iter()
            .map(|q| format!("{:.1},{:.1}", x(q.mappings as f64), y((p.value)(q) / p.scale)))
            .collect();
        let _ = writeln!(out, "<polyline fill=\"none\" stroke=\"{color}\" points=\"{}\"/>", path.join(" "));
        for q in series {
            let _ = writeln!(
                out,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{color}\"><title>{} processes x {} pages: {}</title></circle>",
                x(q.mappings as f64),
                y((p.value)(q) / p.scale),
                q.processes,
                q.pages,
                format_time((p.value)(q))
            );
        }
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_data() {
        for (max, step, end) in [
            (1.0, 0.1, 1.0),
            (7.3, 1.0, 8.0),
            (14.2, 2.0, 16.0),
            (96.0, 10.0, 100.0),
            (1234.0, 200.0, 1400.0),
            (0.037, 0.005, 0.04),
        ] {
            let (s, e) = ticks(max);
            assert!((s - step).abs() < step * 1e-9 && (e - end).abs() < step * 1e-6, "{max}: {s} {e}");
            let intervals = e / s;
            assert!((4.0..=10.5).contains(&intervals), "{max}: {intervals} intervals");
        }
        assert_eq!(ticks(0.0), ticks(1.0));
        assert_eq!(tick_label(0.6000000000000001, 0.2), "0.6");
        assert_eq!(tick_label(1400.0, 200.0), "1400");
        assert_eq!(tick_label(0.015, 0.005), "0.015");
    }

    fn point(processes: u32, pages: u64, ms: f64) -> Point {
        let s = Summary::single(ms * 1e6);
        Point {
            processes,
            pages,
            mappings: u64::from(processes) * (pages + 10),
            ptes: 512 * u64::from(processes),
            frames_scanned: 60_000,
            time: s,
            walk: s.scaled(0.001),
            ptes_per_second: Summary::single(1e7),
            violations: 0,
            cold: ms * 5e6,
        }
    }

    #[test]
    fn configurations_fit_the_guest_and_the_boot_limit() {
        for quick in [false, true] {
            let plan = Plan::new(quick);
            let configurations = configurations(&plan);
            assert!(configurations.len() >= 4);
            for (count, pages) in configurations {
                assert!(count as usize <= MAX_BOOT_PROCESSES);
                assert!(u64::from(count) * pages * 4096 <= (CHECK_MEMORY_MIB << 20) / 4);
            }
        }
        assert!(configurations(&Plan::new(false)).contains(&(32, 256)));
    }

    #[test]
    fn rows_table_and_plot() {
        let points = [point(1, 16, 20.0), point(1, 256, 22.0), point(16, 16, 25.0), point(16, 256, 40.0)];
        let rows = rows(&points, &[]);
        assert_eq!(rows.len(), 2);
        assert!(rows[0].operation.contains("16 processes x 256 pages"), "{}", rows[0].operation);
        assert_eq!(rows[0].superos.as_ref().unwrap().median, 40e6);
        assert_eq!(rows[1].superos.as_ref().unwrap().median, 1e7);
        let table = scaling_table(&points);
        assert_eq!(table.lines().count(), 2 + points.len());
        assert!(table.contains("40.0 ms"), "{table}");
        let svg = svg(&points, "check <time>");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(
            svg.matches("<circle").count(),
            2 * points.len() + 2,
            "a point per panel, a legend dot per series"
        );
        assert_eq!(svg.matches("<polyline").count(), 4, "a line per series and panel");
        assert!(svg.contains("check &lt;time&gt;"));
        let failed = super::rows(&[], &["boom".into()]);
        assert_eq!(failed[0].superos, Err("boom".into()));
    }
}
