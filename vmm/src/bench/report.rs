//! The benchmark table: rows, number formatting, the text table and JSON.

use super::stats::{ratio, Summary};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// What a row's figures measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Nanoseconds per operation.
    Time,
    /// Bytes.
    Bytes,
    /// Events per second.
    Rate,
    /// A plain count (ring-0 instructions of one kernel entry).
    Count,
}

impl Unit {
    fn name(self) -> &'static str {
        match self {
            Unit::Time => "ns",
            Unit::Bytes => "bytes",
            Unit::Rate => "per-second",
            Unit::Count => "count",
        }
    }

    /// A value of this unit, for people.
    pub fn format(self, value: f64) -> String {
        match self {
            Unit::Time => format_time(value),
            Unit::Bytes => format_bytes(value),
            Unit::Rate => format_rate(value),
            Unit::Count => format_count(value),
        }
    }
}

/// One operation: the SuperOS figure, the host baseline, the stable figures.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Short name (`syscall`, `mem-16`, ...).
    pub name: String,
    /// What is measured, for people.
    pub operation: String,
    /// Unit of `superos` and `host`.
    pub unit: Unit,
    /// The SuperOS samples, or why there are none.
    pub superos: Result<Summary, String>,
    /// The host samples (`None`: there is no host counterpart).
    pub host: Option<Result<Summary, String>>,
    /// What the host baseline does.
    pub host_baseline: String,
    /// Ring-0 instructions per operation (single-stepped).
    pub instructions: Option<f64>,
    /// VM exits to the VMM per operation.
    pub exits: Option<f64>,
    /// Remarks: method, sizes, throughput, errors.
    pub notes: Vec<String>,
    /// Row-specific figures for the JSON (`details`; null if none).
    pub details: Value,
    /// Issue 16's budget for `instructions` (ring-0 instructions per
    /// operation), if the row has one.
    pub budget: Option<f64>,
    /// Where `instructions` go: kernel function and instructions per
    /// operation, most first (`bench --profile`; empty if not stepped).
    pub profile: Vec<(String, f64)>,
    /// The same by instruction address (kept for the JSON with `--profile`).
    pub profile_addresses: BTreeMap<u64, f64>,
}

impl Row {
    /// A row with no figures yet.
    pub fn new(name: &str, operation: &str, unit: Unit) -> Row {
        Row {
            name: name.to_string(),
            operation: operation.to_string(),
            unit,
            superos: Err("not measured".into()),
            host: None,
            host_baseline: String::new(),
            instructions: None,
            exits: None,
            notes: Vec::new(),
            details: Value::Null,
            budget: None,
            profile: Vec::new(),
            profile_addresses: BTreeMap::new(),
        }
    }

    /// Whether the counted ring-0 instructions exceed the row's budget.
    pub fn over_budget(&self) -> bool {
        matches!((self.instructions, self.budget), (Some(count), Some(budget)) if count > budget)
    }

    fn budget_cell(&self) -> String {
        match (self.budget, self.instructions) {
            (None, _) => "—".into(),
            (Some(budget), None) => format!("≤ {}", format_count(budget)),
            (Some(budget), Some(_)) if self.over_budget() => format!("≤ {} OVER", format_count(budget)),
            (Some(budget), Some(_)) => format!("≤ {} ok", format_count(budget)),
        }
    }

    /// SuperOS median / host median.
    pub fn ratio(&self) -> Option<f64> {
        match (&self.superos, &self.host) {
            (Ok(superos), Some(Ok(host))) => ratio(superos.median, host.median),
            _ => None,
        }
    }

    fn superos_cell(&self) -> String {
        match &self.superos {
            Ok(s) if s.samples > 1 => {
                format!(
                    "{} ({}–{})",
                    self.unit.format(s.median),
                    self.unit.format(s.min),
                    self.unit.format(s.max)
                )
            }
            Ok(s) => self.unit.format(s.median),
            Err(_) => "failed (see notes)".into(),
        }
    }

    fn host_cell(&self) -> String {
        match &self.host {
            None => "—".into(),
            Some(Ok(s)) => self.unit.format(s.median),
            Some(Err(_)) => "failed (see notes)".into(),
        }
    }
}

/// `123 ns`, `89.2 µs`, `1.55 ms`, `2.10 s`: three significant digits.
pub fn format_time(ns: f64) -> String {
    if !ns.is_finite() {
        return "?".into();
    }
    let (value, unit) = match ns.abs() {
        v if v < 1e3 => return format!("{ns:.0} ns"),
        v if v < 1e6 => (ns / 1e3, "µs"),
        v if v < 1e9 => (ns / 1e6, "ms"),
        _ => (ns / 1e9, "s"),
    };
    format!("{} {unit}", three_digits(value))
}

/// `512 B`, `28.0 KiB`, `1.50 MiB`.
pub fn format_bytes(bytes: f64) -> String {
    if !bytes.is_finite() {
        return "?".into();
    }
    match bytes.abs() {
        v if v < 1024.0 => format!("{bytes:.0} B"),
        v if v < 1024.0 * 1024.0 => format!("{} KiB", three_digits(bytes / 1024.0)),
        v if v < 1024.0 * 1024.0 * 1024.0 => format!("{} MiB", three_digits(bytes / (1024.0 * 1024.0))),
        _ => format!("{} GiB", three_digits(bytes / (1024.0 * 1024.0 * 1024.0))),
    }
}

/// `950/s`, `12.3 k/s`, `45.6 M/s`.
pub fn format_rate(per_second: f64) -> String {
    if !per_second.is_finite() {
        return "?".into();
    }
    match per_second.abs() {
        v if v < 1e3 => format!("{per_second:.0}/s"),
        v if v < 1e6 => format!("{} k/s", three_digits(per_second / 1e3)),
        v if v < 1e9 => format!("{} M/s", three_digits(per_second / 1e6)),
        _ => format!("{} G/s", three_digits(per_second / 1e9)),
    }
}

fn three_digits(value: f64) -> String {
    match value.abs() {
        v if v < 10.0 => format!("{value:.2}"),
        v if v < 100.0 => format!("{value:.1}"),
        _ => format!("{value:.0}"),
    }
}

/// `2.50×`, `12.5×`, `116×`.
pub fn format_ratio(ratio: f64) -> String {
    match ratio {
        r if r >= 100.0 => format!("{r:.0}×"),
        r if r >= 10.0 => format!("{r:.1}×"),
        r => format!("{r:.2}×"),
    }
}

/// A count per operation: `75 613`, `12.5`, `0.03`.
pub fn format_count(value: f64) -> String {
    if value >= 1000.0 {
        let digits = format!("{value:.0}");
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                grouped.push(' ');
            }
            grouped.push(c);
        }
        grouped
    } else if value >= 100.0 || value == value.trunc() {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// Columns of [`table`].
const COLUMNS: usize = 7;

/// The header cells of [`table`].
pub const HEADER: [&str; COLUMNS] = [
    "operation",
    "SuperOS median (min–max)",
    "host median",
    "ratio",
    "ring-0 instr/op",
    "budget",
    "VM exits/op",
];

/// The cells of one row of [`table`].
pub fn cells(row: &Row) -> [String; COLUMNS] {
    [
        row.operation.clone(),
        row.superos_cell(),
        row.host_cell(),
        row.ratio().map_or("—".into(), format_ratio),
        row.instructions.map_or("—".into(), format_count),
        row.budget_cell(),
        row.exits.map_or("—".into(), format_count),
    ]
}

/// The table as text: a header, a rule, one line per row; columns padded
/// to their widest cell (counted in characters), numbers right-aligned.
pub fn table(rows: &[Row]) -> String {
    let body: Vec<[String; COLUMNS]> = rows.iter().map(cells).collect();
    let mut widths = HEADER.map(|h| h.chars().count());
    for cells in &body {
        for (width, cell) in widths.iter_mut().zip(cells) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; COLUMNS]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            let pad = " ".repeat(width - cell.chars().count());
            match i {
                0 | 1 => text.push_str(&format!("{cell}{pad}")),
                _ => text.push_str(&format!("{pad}{cell}")),
            }
            if i + 1 < cells.len() {
                text.push_str("  ");
            }
        }
        text.trim_end().to_string()
    };
    let mut out = line(HEADER);
    out.push('\n');
    out.push_str(&line(widths.map(|w| "-".repeat(w)).each_ref().map(String::as_str)));
    out.push('\n');
    for cells in &body {
        out.push_str(&line(cells.each_ref().map(String::as_str)));
        out.push('\n');
    }
    out
}

/// The same table as a Markdown table (for the README).
pub fn markdown(rows: &[Row]) -> String {
    let mut out = format!("| {} |\n|{}\n", HEADER.join(" | "), " --- |".repeat(HEADER.len()));
    for row in rows {
        out.push_str(&format!("| {} |\n", cells(row).join(" | ")));
    }
    out
}

fn summary_json(summary: &Summary) -> Value {
    json!({ "median": summary.median, "min": summary.min, "max": summary.max, "samples": summary.samples })
}

/// One row as JSON.
pub fn row_json(row: &Row) -> Value {
    let (superos, error) = match &row.superos {
        Ok(s) => (summary_json(s), Value::Null),
        Err(e) => (Value::Null, Value::from(e.as_str())),
    };
    let (host, host_error) = match &row.host {
        Some(Ok(s)) => (summary_json(s), Value::Null),
        Some(Err(e)) => (Value::Null, Value::from(e.as_str())),
        None => (Value::Null, Value::Null),
    };
    json!({
        "name": row.name,
        "operation": row.operation,
        "unit": row.unit.name(),
        "superos": superos,
        "error": error,
        "host": host,
        "host_error": host_error,
        "host_baseline": row.host_baseline,
        "ratio": row.ratio(),
        "ring0_instructions_per_op": row.instructions,
        "vm_exits_per_op": row.exits,
        "budget_instructions_per_op": row.budget,
        "over_budget": row.over_budget(),
        "profile": row.profile.iter().map(|(function, count)| json!({ "function": function, "instructions_per_op": count })).collect::<Vec<_>>(),
        "profile_addresses": row.profile_addresses.iter().map(|(address, count)| json!({ "address": format!("{address:#x}"), "instructions_per_op": count })).collect::<Vec<_>>(),
        "notes": row.notes,
        "details": row.details,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, superos: &[f64], host: Option<f64>) -> Row {
        let mut row = Row::new(name, &format!("the {name} operation"), Unit::Time);
        row.superos = Summary::of(superos).ok_or_else(|| "no samples".to_string());
        row.host = host.map(|h| Ok(Summary::single(h)));
        row
    }

    #[test]
    fn numbers_are_formatted_for_people() {
        assert_eq!(format_time(123.4), "123 ns");
        assert_eq!(format_time(89_234.0), "89.2 µs");
        assert_eq!(format_time(1_554_000.0), "1.55 ms");
        assert_eq!(format_time(212_000_000.0), "212 ms");
        assert_eq!(format_time(2_100_000_000.0), "2.10 s");
        assert_eq!(format_bytes(512.0), "512 B");
        assert_eq!(format_bytes(28.0 * 1024.0), "28.0 KiB");
        assert_eq!(format_bytes(1.5 * 1024.0 * 1024.0), "1.50 MiB");
        assert_eq!(format_rate(950.0), "950/s");
        assert_eq!(format_rate(45_600_000.0), "45.6 M/s");
        assert_eq!(format_ratio(116.4), "116×");
        assert_eq!(format_ratio(12.46), "12.5×");
        assert_eq!(format_ratio(0.5), "0.50×");
        assert_eq!(format_count(75_613.0), "75 613");
        assert_eq!(format_count(1_234_567.4), "1 234 567");
        assert_eq!(format_count(3.0), "3");
        assert_eq!(format_count(12.34), "12.3");
        assert_eq!(format_count(0.031), "0.03");
    }

    #[test]
    fn the_table_has_a_header_a_rule_and_aligned_rows() {
        let mut failed = row("broken", &[], Some(5.0));
        failed.superos = Err("the guest crashed".into());
        let mut stable = row("syscall", &[90_000.0, 89_000.0, 95_000.0], Some(450.0));
        stable.instructions = Some(130.0);
        stable.exits = Some(0.0);
        stable.budget = Some(60.0);
        let mut within = row("within", &[1e6], None);
        within.instructions = Some(50.0);
        within.budget = Some(60.0);
        let rows = [stable, row("no-host", &[1e6], None), failed, within];
        let text = table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2 + rows.len());
        assert!(lines[0].starts_with("operation") && lines[0].ends_with("VM exits/op"));
        assert!(lines[1].chars().all(|c| c == '-' || c == ' '));
        // Every column starts where its header does.
        let second = lines[0].find("SuperOS").unwrap();
        for line in &lines[2..] {
            assert_eq!(line.chars().nth(second - 1), Some(' '), "{line}");
        }
        assert!(lines[2].contains("90.0 µs (89.0 µs–95.0 µs)"), "{}", lines[2]);
        assert!(lines[2].contains("450 ns") && lines[2].contains("200×"), "{}", lines[2]);
        assert!(lines[2].ends_with("130  ≤ 60 OVER            0"), "{}", lines[2]);
        assert!(lines[5].ends_with("50    ≤ 60 ok            —"), "{}", lines[5]);
        assert!(rows[0].over_budget() && !rows[3].over_budget() && !rows[1].over_budget());
        assert!(lines[3].contains("1.00 ms") && lines[3].contains('—'), "{}", lines[3]);
        assert!(lines[4].contains("failed (see notes)"), "{}", lines[4]);
        let widths: Vec<usize> = lines.iter().map(|l| l.chars().count()).collect();
        assert!(widths.iter().all(|&w| w <= widths[0].max(widths[1])), "{widths:?}");
    }

    #[test]
    fn markdown_has_one_line_per_row() {
        let rows = [row("a", &[1.0], Some(1.0)), row("b", &[2.0], None)];
        let text = markdown(&rows);
        assert_eq!(text.lines().count(), 4);
        assert!(text.lines().all(|l| l.starts_with('|') && l.ends_with('|')));
    }

    #[test]
    fn json_rows_carry_every_figure() {
        let mut r = row("syscall", &[3.0, 1.0, 2.0], Some(1.0));
        r.exits = Some(0.5);
        r.notes.push("a note".into());
        let value = row_json(&r);
        assert_eq!(value["name"], "syscall");
        assert_eq!(value["unit"], "ns");
        assert_eq!(value["superos"]["median"], 2.0);
        assert_eq!(value["superos"]["samples"], 3);
        assert_eq!(value["host"]["median"], 1.0);
        assert_eq!(value["ratio"], 2.0);
        assert_eq!(value["vm_exits_per_op"], 0.5);
        assert!(value["ring0_instructions_per_op"].is_null());
        assert_eq!(value["notes"][0], "a note");
        let mut failed = row("x", &[], None);
        failed.superos = Err("boom".into());
        let value = row_json(&failed);
        assert!(value["superos"].is_null() && value["ratio"].is_null());
        assert_eq!(value["error"], "boom");
    }
}
