//! `superos-vmm inspect ... map --svg <file>`: physical memory as a grid of
//! frames coloured by owner, so isolation can be seen at a glance.
//!
//! One cell per 4 KiB frame, 128 to a row, lowest address top left (for
//! RAM above [`MAX_CELLS`] frames, one cell stands for several frames and
//! takes the most telling owner among them: a violation, then shared,
//! private, page-table, message, kernel frames, then free). Every process
//! has its own hue: its private frames in that hue, its page tables in a
//! darker shade of it. Shared regions are warm colours of their own, kernel
//! frames dark grey (the gate page black), RAM outside the kernel's
//! allocator (kernel image, boot data, program images) mid grey, free
//! frames near white. A white dot marks a frame that two or more processes
//! map; a red outline a frame named by an isolation-invariant violation. A
//! legend on the right names every colour with its frame count; hovering a
//! cell (in a browser) shows its addresses and owner.

use crate::inspect::{sanitize, MapResult};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use superos_protocol::layout::PAGE_SIZE;

/// Most cells drawn; larger RAM is drawn several frames per cell.
pub const MAX_CELLS: u64 = 32 * 1024;
/// Tallest grid before the smaller cells are used.
const MAX_GRID_HEIGHT: u64 = 1100;
const LEFT: u64 = 100;
const TOP: u64 = 64;
const LEGEND_WIDTH: u64 = 540;
const LINE: u64 = 18;
/// Height of a collapsed band.
const GAP: u64 = 18;
/// Identical rows collapsed into a band from this many on.
const MIN_COLLAPSED_ROWS: u64 = 4;

const PROCESS_COLOURS: [(u8, u8, u8); 12] = [
    (0x1f, 0x77, 0xb4),
    (0x2c, 0xa0, 0x2c),
    (0x94, 0x67, 0xbd),
    (0x17, 0xbe, 0xcf),
    (0xe3, 0x77, 0xc2),
    (0x8c, 0x56, 0x4b),
    (0xbc, 0xbd, 0x22),
    (0x39, 0x3b, 0x79),
    (0x63, 0x79, 0x39),
    (0x7b, 0x41, 0x73),
    (0x31, 0x82, 0xbd),
    (0x31, 0xa3, 0x54),
];
const REGION_COLOURS: [&str; 6] = ["#ff7f0e", "#ffbb33", "#e6550d", "#fdae6b", "#f0e442", "#d9a000"];
const FREE: &str = "#f2f2f2";
const KERNEL: &str = "#4d4d4d";
const GATE: &str = "#000000";
const UNMANAGED: &str = "#8c8c8c";
const MESSAGE: &str = "#c9b3e6";
const CORRUPT: &str = "#ff0000";
const UNKNOWN: &str = "#d0d0d0";
const VIOLATION: &str = "#e00000";

/// Escapes text for XML content and attributes.
pub fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in sanitize(text).chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\u{fffe}' | '\u{ffff}' => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

fn hex((r, g, b): (u8, u8, u8)) -> String {
    format!("#{r:02x}{g:02x}{b:02x}")
}

fn darker((r, g, b): (u8, u8, u8)) -> (u8, u8, u8) {
    let d = |v: u8| (u16::from(v) * 11 / 20) as u8;
    (d(r), d(g), d(b))
}

/// How telling an owner is, when several frames share a cell.
fn priority(key: &str) -> u8 {
    match key.split(':').next().unwrap_or("") {
        "corrupt" => 9,
        "shared" => 8,
        "private" => 7,
        "table" => 6,
        "message" => 5,
        "gate" => 4,
        "kernel" => 3,
        "unmanaged" => 2,
        "unknown" => 1,
        _ => 0,
    }
}

struct Palette<'m> {
    processes: BTreeMap<u32, usize>,
    regions: BTreeMap<u32, usize>,
    map: &'m MapResult,
}

impl Palette<'_> {
    fn id(key: &str) -> Option<u32> {
        key.split_once(':').and_then(|(_, id)| id.parse().ok())
    }

    fn process(&self, pid: u32) -> (u8, u8, u8) {
        PROCESS_COLOURS[self.processes.get(&pid).copied().unwrap_or(0) % PROCESS_COLOURS.len()]
    }

    fn colour(&self, key: &str) -> String {
        let id = Self::id(key).unwrap_or(0);
        match key.split(':').next().unwrap_or("") {
            "free" => FREE.into(),
            "kernel" => KERNEL.into(),
            "gate" => GATE.into(),
            "unmanaged" => UNMANAGED.into(),
            "message" => MESSAGE.into(),
            "corrupt" => CORRUPT.into(),
            "private" => hex(self.process(id)),
            "table" => hex(darker(self.process(id))),
            "shared" => {
                REGION_COLOURS[self.regions.get(&id).copied().unwrap_or(0) % REGION_COLOURS.len()].into()
            }
            _ => UNKNOWN.into(),
        }
    }

    fn name(&self, pid: u32) -> String {
        match self.map.processes.iter().find(|p| p.pid == pid) {
            Some(p) => {
                let on = match p.cpu {
                    Some(cpu) if self.map.cpus > 1 => format!(" (on CPU {cpu})"),
                    _ => String::new(),
                };
                format!("pid {pid} {}{on}", p.name.chars().take(20).collect::<String>())
            }
            None => format!("pid {pid}"),
        }
    }

    fn words(&self, key: &str) -> String {
        let id = Self::id(key).unwrap_or(0);
        match key.split(':').next().unwrap_or("") {
            "free" => "free".into(),
            "kernel" => "kernel".into(),
            "gate" => "the gate page (kernel; every process maps it, read-only)".into(),
            "unmanaged" => "outside the allocator: kernel image, boot data, program images".into(),
            "message" => format!("message queued for {}", self.name(id)),
            "corrupt" => "corrupt owner entry".into(),
            "private" => format!("{}: private", self.name(id)),
            "table" => format!("{}: page tables", self.name(id)),
            "shared" => match self.map.regions.iter().find(|r| r.id == id) {
                Some(region) => {
                    let others: Vec<String> = region
                        .participants
                        .iter()
                        .filter(|&&p| p != region.owner)
                        .map(u32::to_string)
                        .collect();
                    if others.is_empty() {
                        format!("shared region {id} (owner pid {})", region.owner)
                    } else {
                        format!(
                            "shared region {id} (owner pid {}, granted to {})",
                            region.owner,
                            others.join(", ")
                        )
                    }
                }
                None => format!("shared region {id}"),
            },
            _ => "owner unknown (no kernel tables)".into(),
        }
    }
}

/// A drawn row of cells, or a collapsed stretch of identical rows.
enum Band {
    Row(u64),
    Gap { first: u64, last: u64, owner: String },
}

/// Owner words after a frame count: "free", "of pid 1 producer: private".
fn gap_words(words: &str) -> String {
    if words == "free" || words.starts_with("outside") {
        words.to_string()
    } else {
        format!("of {words}")
    }
}

fn plural(count: u64, what: &str) -> String {
    if count == 1 {
        format!("1 {what}")
    } else {
        format!("{count} {what}s")
    }
}

/// True if the `#rrggbb` colour is light (dark text reads on it).
fn light(colour: &str) -> bool {
    let channel = |i: usize| u32::from_str_radix(colour.get(i..i + 2).unwrap_or("ff"), 16).unwrap_or(255);
    channel(1) * 299 + channel(3) * 587 + channel(5) * 114 > 140_000
}

/// Where the rows go.
struct Layout {
    columns: u64,
    px: u64,
    bands: Vec<Band>,
    /// Top of each band.
    band_y: Vec<u64>,
    /// Top of each drawn row.
    row_y: Vec<Option<u64>>,
    bottom: u64,
}

impl Layout {
    /// `columns` cells of `px` pixels per row; long stretches of identical
    /// rows (free memory, mostly) are collapsed into one labelled band.
    fn new(cells: &[Cell], columns: u64, px: u64) -> Layout {
        let count = cells.len() as u64;
        let rows = count.div_ceil(columns);
        let uniform = |row: u64| -> Option<&str> {
            let (start, end) = (row * columns, ((row + 1) * columns).min(count));
            let first = &cells[start as usize];
            let same = end - start == columns
                && cells[start as usize..end as usize]
                    .iter()
                    .all(|c| c.owner == first.owner && !c.shared && !c.violation);
            same.then_some(first.owner.as_str())
        };
        let mut bands: Vec<Band> = Vec::new();
        let mut row = 0;
        while row < rows {
            if let Some(owner) = uniform(row) {
                let mut end = row + 1;
                while end < rows && uniform(end) == Some(owner) {
                    end += 1;
                }
                if end - row >= MIN_COLLAPSED_ROWS {
                    bands.push(Band::Gap { first: row, last: end - 1, owner: owner.to_string() });
                    row = end;
                    continue;
                }
            }
            bands.push(Band::Row(row));
            row += 1;
        }
        let mut y = TOP;
        let mut row_y = vec![None; rows as usize];
        let mut band_y = Vec::with_capacity(bands.len());
        for band in &bands {
            band_y.push(y);
            match band {
                Band::Row(row) => {
                    row_y[*row as usize] = Some(y);
                    y += px;
                }
                Band::Gap { .. } => y += GAP,
            }
        }
        Layout { columns, px, bands, band_y, row_y, bottom: y }
    }
}

#[derive(Clone, Default, PartialEq)]
struct Cell {
    owner: String,
    shared: bool,
    violation: bool,
}

/// Draws `map` as a standalone SVG document.
pub fn render(map: &MapResult) -> String {
    let frames = map.ram_bytes / PAGE_SIZE;
    let per_cell = frames.div_ceil(MAX_CELLS).max(1);
    let cell_count = frames.div_ceil(per_cell);

    let mut palette = Palette { processes: BTreeMap::new(), regions: BTreeMap::new(), map };
    for p in &map.processes {
        let next = palette.processes.len();
        palette.processes.entry(p.pid).or_insert(next);
    }
    for r in &map.regions {
        let next = palette.regions.len();
        palette.regions.entry(r.id).or_insert(next);
    }
    // Frame counts per owner, and cells.
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let (mut shared_frames, mut violation_frames) = (0u64, 0u64);
    let mut cells = vec![Cell { owner: "free".into(), ..Default::default() }; cell_count as usize];
    let mut filled = vec![false; cell_count as usize];
    for run in &map.runs {
        *counts.entry(run.owner.clone()).or_default() += run.frames;
        if run.shared {
            shared_frames += run.frames;
        }
        if run.violation {
            violation_frames += run.frames;
        }
        if let Some(pid) = Palette::id(&run.owner).filter(|_| !run.owner.starts_with("shared")) {
            let next = palette.processes.len();
            palette.processes.entry(pid).or_insert(next);
        }
        let first = run.start / PAGE_SIZE / per_cell;
        let last = ((run.start / PAGE_SIZE + run.frames).saturating_sub(1) / per_cell)
            .min(cell_count.saturating_sub(1));
        for c in first..=last {
            let Some(cell) = cells.get_mut(c as usize) else { break };
            if !filled[c as usize] || priority(&run.owner) > priority(&cell.owner) {
                cell.owner = run.owner.clone();
            }
            filled[c as usize] = true;
            cell.shared |= run.shared;
            cell.violation |= run.violation;
        }
    }

    // Big cells when few rows are drawn, small ones when many are.
    let mut layout = Layout::new(&cells, 64, 12);
    if layout.bottom > MAX_GRID_HEIGHT {
        layout = Layout::new(&cells, 128, 7);
    }
    let Layout { columns, px, bands, band_y, row_y, bottom: grid_bottom } = layout;

    let grid_width = columns * px;
    let legend_x = LEFT + grid_width + 28;
    let mut legend: Vec<(String, String)> = Vec::new();
    let mut keys: Vec<&String> = counts.keys().collect();
    keys.sort_by_key(|key| {
        let id = Palette::id(key).unwrap_or(0);
        match key.split(':').next().unwrap_or("") {
            "private" => (0, id, 0),
            "table" => (0, id, 1),
            "message" => (0, id, 2),
            "shared" => (1, id, 0),
            _ => (2, 0, 10 - priority(key)),
        }
    });
    for key in keys {
        legend.push((
            palette.colour(key),
            format!("{} ({})", palette.words(key), plural(counts[key], "frame")),
        ));
    }
    let cpu_line = map.cpu_line();
    let legend_lines = legend.len() as u64 + 6 + u64::from(cpu_line.is_some()) * 2;
    let height = (grid_bottom + 48).max(TOP + legend_lines * LINE + 24);
    let width = legend_x + LEGEND_WIDTH;

    let mut svg = String::new();
    let _ = writeln!(svg, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r##"<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>"##);
    let cell_text = if per_cell == 1 {
        "one cell per 4 KiB frame".to_string()
    } else {
        format!("one cell per {per_cell} frames ({} KiB)", per_cell * 4)
    };
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="22" font-size="15" font-weight="bold">SuperOS physical memory: {} MiB, {frames} frames, {cell_text}, {columns} per row</text>"#,
        map.ram_bytes >> 20
    );
    let verdict = map.verdict();
    let verdict_colour = match (map.violated.is_empty(), map.published) {
        (false, _) => VIOLATION,
        (true, false) => "#806000",
        (true, true) => "#206020",
    };
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="42">{} — <tspan fill="{verdict_colour}" font-weight="bold">{}</tspan></text>"#,
        xml_escape(&map.at),
        xml_escape(&verdict)
    );

    let row_address = |row: u64| row * columns * per_cell * PAGE_SIZE;
    // Row labels: the physical address a row starts at, every few rows and
    // after every collapsed band.
    let mut after_gap = true;
    for (band, &y) in bands.iter().zip(&band_y) {
        match band {
            Band::Row(row) => {
                if after_gap || row % 8 == 0 {
                    let _ = writeln!(
                        svg,
                        r##"<text x="{}" y="{}" font-size="10" font-family="DejaVu Sans Mono, monospace" text-anchor="end" fill="#555555">{:#010x}</text>"##,
                        LEFT - 6,
                        y + px - 1,
                        row_address(*row)
                    );
                }
                after_gap = false;
            }
            Band::Gap { .. } => after_gap = true,
        }
    }
    // The cells, one rectangle per run of equal cells in a row.
    let _ = writeln!(svg, r#"<g shape-rendering="crispEdges">"#);
    for (row, y) in row_y.iter().enumerate() {
        let Some(y) = *y else { continue };
        let row = row as u64;
        let mut column = 0;
        while column < columns {
            let index = row * columns + column;
            if index >= cell_count {
                break;
            }
            let owner = &cells[index as usize].owner;
            let mut end = column + 1;
            while end < columns
                && row * columns + end < cell_count
                && cells[(row * columns + end) as usize].owner == *owner
            {
                end += 1;
            }
            let first = index * per_cell * PAGE_SIZE;
            let last = ((row * columns + end) * per_cell).min(frames) * PAGE_SIZE - 1;
            let _ = writeln!(
                svg,
                r#"<rect x="{}" y="{y}" width="{}" height="{px}" fill="{}"><title>{first:#x}-{last:#x}: {}</title></rect>"#,
                LEFT + column * px,
                (end - column) * px,
                palette.colour(owner),
                xml_escape(&palette.words(owner))
            );
            column = end;
        }
    }
    let _ = writeln!(svg, "</g>");
    // Faint grid lines every 8 cells.
    let _ = writeln!(svg, r##"<g stroke="#ffffff" stroke-width="0.6" opacity="0.7">"##);
    for column in (8..columns).step_by(8) {
        let x = LEFT + column * px;
        let _ = writeln!(svg, r#"<line x1="{x}" y1="{TOP}" x2="{x}" y2="{grid_bottom}"/>"#);
    }
    let _ = writeln!(svg, "</g>");
    // Collapsed bands, over the grid lines.
    for (band, &y) in bands.iter().zip(&band_y) {
        let Band::Gap { first, last, owner } = band else { continue };
        let start = row_address(*first);
        let end = (row_address(last + 1)).min(map.ram_bytes) - 1;
        let count = ((last + 1 - first) * columns * per_cell).min(frames - first * columns * per_cell);
        let colour = palette.colour(owner);
        let ink = if light(&colour) { "#333333" } else { "#ffffff" };
        let _ = writeln!(
            svg,
            r##"<rect x="{LEFT}" y="{y}" width="{grid_width}" height="{GAP}" fill="{colour}" stroke="#999999" stroke-width="0.8" stroke-dasharray="4 3"/><text x="{}" y="{}" text-anchor="middle" font-size="11" fill="{ink}">{start:#x}-{end:#x}: {} {} ({} not drawn)</text>"##,
            LEFT + grid_width / 2,
            y + GAP - 5,
            plural(count, "frame"),
            xml_escape(&gap_words(&palette.words(owner))),
            plural(last + 1 - first, "row")
        );
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{grid_width}" height="{}" fill="none" stroke="#333333" stroke-width="1"/>"##,
        grid_bottom - TOP
    );
    // Marks.
    for (index, cell) in cells.iter().enumerate() {
        let (row, column) = (index as u64 / columns, index as u64 % columns);
        let Some(y) = row_y[row as usize] else { continue };
        let x = LEFT + column * px;
        if cell.shared {
            let _ = writeln!(
                svg,
                r##"<circle cx="{}" cy="{}" r="2" fill="#ffffff" stroke="#000000" stroke-width="0.5"/>"##,
                x as f64 + px as f64 / 2.0,
                y as f64 + px as f64 / 2.0
            );
        }
        if cell.violation {
            let _ = writeln!(
                svg,
                r#"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="{VIOLATION}" stroke-width="1.5"/>"#,
                x as f64 + 0.75,
                y as f64 + 0.75,
                px as f64 - 1.5,
                px as f64 - 1.5
            );
        }
    }

    // The legend.
    let mut y = TOP;
    let _ =
        writeln!(svg, r#"<text x="{legend_x}" y="{}" font-weight="bold">Owner of each frame</text>"#, y + 10);
    y += LINE + 4;
    for (colour, text) in &legend {
        let _ = writeln!(
            svg,
            r##"<rect x="{legend_x}" y="{}" width="12" height="12" fill="{colour}" stroke="#333333" stroke-width="0.5"/><text x="{}" y="{}">{}</text>"##,
            y,
            legend_x + 18,
            y + 10,
            xml_escape(text)
        );
        y += LINE;
    }
    y += 6;
    let _ = writeln!(
        svg,
        r##"<rect x="{legend_x}" y="{y}" width="12" height="12" fill="#999999"/><circle cx="{}" cy="{}" r="2.5" fill="#ffffff" stroke="#000000" stroke-width="0.5"/><text x="{}" y="{}">mapped by two or more processes ({})</text>"##,
        legend_x + 6,
        y + 6,
        legend_x + 18,
        y + 10,
        plural(shared_frames, "frame")
    );
    y += LINE;
    let _ = writeln!(
        svg,
        r#"<rect x="{}" y="{}" width="10" height="10" fill="none" stroke="{VIOLATION}" stroke-width="2"/><text x="{}" y="{}">named by an invariant violation ({})</text>"#,
        legend_x + 1,
        y + 1,
        legend_x + 18,
        y + 10,
        plural(violation_frames, "frame")
    );
    // On several CPUs, what each one runs.
    if let Some(line) = cpu_line {
        y += LINE + 12;
        let _ = writeln!(svg, r#"<text x="{legend_x}" y="{}">{}</text>"#, y + 10, xml_escape(&line));
    }
    let _ = writeln!(svg, "</svg>");
    svg
}

/// Checks text and attribute values: no control characters, `&` only as a
/// known entity, no `<`.
fn check_text(text: &str) -> Result<(), String> {
    if let Some(c) = text.chars().find(|&c| (c.is_control() && !matches!(c, '\t' | '\n' | '\r')) || c == '<')
    {
        return Err(format!("character {c:?} in text"));
    }
    let mut rest = text;
    while let Some(i) = rest.find('&') {
        rest = &rest[i + 1..];
        let end = rest.find(';').ok_or("`&` without `;`")?;
        let entity = &rest[..end];
        let known = matches!(entity, "amp" | "lt" | "gt" | "quot" | "apos")
            || entity
                .strip_prefix("#x")
                .is_some_and(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()))
            || entity
                .strip_prefix('#')
                .is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()));
        if !known {
            return Err(format!("unknown entity &{entity};"));
        }
        rest = &rest[end + 1..];
    }
    Ok(())
}

fn xml_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_alphanumeric() || matches!(c, '_' | ':' | '-' | '.'))
}

/// A small XML well-formedness check: an optional declaration, one root
/// element, elements that nest and close, quoted and unique attributes,
/// `&` only in known entities, no control characters. What [`render`]
/// produces must always pass it.
pub fn well_formed(xml: &str) -> Result<(), String> {
    let mut rest = xml;
    if let Some(after) = rest.strip_prefix("<?xml") {
        let end = after.find("?>").ok_or("unterminated XML declaration")?;
        rest = &after[end + 2..];
    }
    let mut open: Vec<&str> = Vec::new();
    let mut roots = 0;
    loop {
        let next = rest.find('<').unwrap_or(rest.len());
        let text = &rest[..next];
        check_text(text)?;
        if open.is_empty() && !text.trim().is_empty() {
            return Err("text outside the root element".into());
        }
        rest = &rest[next..];
        let Some(after) = rest.strip_prefix('<') else { break };
        if let Some(comment) = after.strip_prefix("!--") {
            let end = comment.find("-->").ok_or("unterminated comment")?;
            rest = &comment[end + 3..];
            continue;
        }
        // The tag ends at the first `>` outside quotes.
        let mut quote = None;
        let end = after
            .char_indices()
            .find(|&(_, c)| match quote {
                Some(q) => {
                    if c == q {
                        quote = None;
                    }
                    false
                }
                None if c == '"' || c == '\'' => {
                    quote = Some(c);
                    false
                }
                None => c == '>',
            })
            .map(|(i, _)| i)
            .ok_or("unterminated tag")?;
        let tag = &after[..end];
        rest = &after[end + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            match open.pop() {
                Some(top) if top == name.trim() => continue,
                Some(top) => return Err(format!("</{}> closes <{top}>", name.trim())),
                None => return Err(format!("</{}> closes nothing", name.trim())),
            }
        }
        let self_closing = tag.ends_with('/');
        let body = tag.strip_suffix('/').unwrap_or(tag);
        let name_end = body.find(char::is_whitespace).unwrap_or(body.len());
        let name = &body[..name_end];
        if !xml_name(name) {
            return Err(format!("bad element name {name:?}"));
        }
        let mut attributes = body[name_end..].trim_start();
        let mut seen = Vec::new();
        while !attributes.is_empty() {
            let eq = attributes.find('=').ok_or_else(|| format!("attribute without value in <{name}>"))?;
            let attribute = attributes[..eq].trim();
            if !xml_name(attribute) || seen.contains(&attribute) {
                return Err(format!("bad or repeated attribute {attribute:?} in <{name}>"));
            }
            seen.push(attribute);
            let value = attributes[eq + 1..].trim_start();
            let q =
                value.chars().next().filter(|&c| c == '"' || c == '\'').ok_or("unquoted attribute value")?;
            let close = value[1..].find(q).ok_or("unterminated attribute value")?;
            check_text(&value[1..1 + close])?;
            let after_value = &value[close + 2..];
            if !after_value.is_empty() && !after_value.starts_with(char::is_whitespace) {
                return Err(format!("attributes run together in <{name}>"));
            }
            attributes = after_value.trim_start();
        }
        if open.is_empty() {
            roots += 1;
            if roots > 1 {
                return Err("more than one root element".into());
            }
        }
        if !self_closing {
            open.push(name);
        }
    }
    match (open.last(), roots) {
        (Some(name), _) => Err(format!("<{name}> is never closed")),
        (None, 0) => Err("no root element".into()),
        (None, _) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::{FrameRun, MapProcess, MapRegion};

    fn run(start: u64, frames: u64, owner: &str) -> FrameRun {
        FrameRun { start, frames, owner: owner.into(), shared: false, violation: false }
    }

    #[test]
    fn owners_get_colours_a_legend_and_marks() {
        let mut runs = vec![
            run(0, 256, "unmanaged"),
            run(0x10_0000, 4, "kernel"),
            run(0x10_4000, 1, "gate"),
            run(0x10_5000, 4, "table:1"),
            run(0x10_9000, 10, "private:1"),
            run(0x11_3000, 2, "shared:1"),
            run(0x11_5000, 3, "private:2"),
            run(0x11_8000, 1, "message:2"),
        ];
        runs[5].shared = true;
        runs[6].violation = true;
        let used: u64 = runs.iter().map(|r| r.frames).sum();
        runs.push(run(0x11_9000, 4096 - used, "free"));
        let map = MapResult {
            at: "at kernel event #3 <&>".into(),
            ram_bytes: 16 << 20,
            runs,
            processes: vec![
                MapProcess { pid: 1, name: "producer".into(), cpu: Some(1) },
                MapProcess { pid: 2, name: "evil\u{1b}<name>".into(), cpu: None },
            ],
            regions: vec![MapRegion { id: 1, owner: 1, participants: vec![1, 2] }],
            violated: vec!["no-implicit-sharing".into()],
            published: true,
            cpus: 2,
        };
        let svg = render(&map);
        assert_eq!(well_formed(&svg), Ok(()));
        assert!(svg.starts_with("<?xml"));
        assert!(svg.contains("pid 1 producer (on CPU 1): private (10 frames)"), "{svg}");
        assert!(svg.contains("pid 1 producer (on CPU 1): page tables (4 frames)"));
        assert!(svg.contains("2 CPUs: CPU 0 idle, CPU 1 runs pid 1 producer"), "{svg}");
        assert!(svg.contains("shared region 1 (owner pid 1, granted to 2) (2 frames)"));
        assert!(svg.contains("pid 2 evil?&lt;name&gt;: private (3 frames)"));
        assert!(svg.contains("at kernel event #3 &lt;&amp;&gt;"));
        assert!(svg.contains("ISOLATION VIOLATED: no-implicit-sharing"));
        assert!(svg.contains("mapped by two or more processes (2 frames)"));
        assert!(svg.contains("named by an invariant violation (3 frames)"));
        assert_eq!(svg.matches("<circle").count(), 2 + 1, "two marked cells and the legend's dot");
        assert!(!svg.contains('\u{1b}'));
        // Private frames of the two processes have different colours.
        assert_ne!(hex(PROCESS_COLOURS[0]), hex(PROCESS_COLOURS[1]));
    }

    #[test]
    fn large_memory_is_drawn_several_frames_per_cell() {
        let frames = (3u64 << 30) / PAGE_SIZE;
        let map = MapResult {
            at: "x".into(),
            ram_bytes: 3 << 30,
            runs: vec![run(0, frames - 1, "free"), run((frames - 1) * PAGE_SIZE, 1, "private:7")],
            processes: vec![],
            regions: vec![],
            violated: vec![],
            published: false,
            cpus: 1,
        };
        let svg = render(&map);
        assert_eq!(well_formed(&svg), Ok(()));
        assert!(svg.contains("one cell per 24 frames"), "{}", &svg[..400]);
        // Nothing said to hold before the kernel's tables could be read.
        assert!(svg.contains("not fully checked: the kernel has not published its tables yet"));
        assert!(!svg.contains("every isolation invariant held"));
        assert!(svg.contains("pid 7: private (1 frame)"));
        assert!(svg.len() < 2 << 20, "{} bytes", svg.len());
    }

    #[test]
    fn the_well_formedness_check_catches_broken_xml() {
        assert_eq!(well_formed(r#"<?xml version="1.0"?><a x="1"><b/>t &amp; &#60;</a>"#), Ok(()));
        for bad in [
            "",
            "<a>",
            "<a></b>",
            "<a/><b/>",
            "<a x=1/>",
            r#"<a x="1" x="2"/>"#,
            "<a>&nbsp;</a>",
            "<a>x & y</a>",
            "<a>\u{1b}</a>",
            r#"<a x="<"/>"#,
            "text<a/>",
            "<a><!-- open </a>",
        ] {
            assert!(well_formed(bad).is_err(), "{bad:?}");
        }
    }
}
