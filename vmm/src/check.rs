//! The isolation invariants, checked from outside the guest.
//!
//! A check reads the kernel's claims ([`KernelView`], from the introspection
//! root or, until the kernel publishes one, from its events), walks the page
//! tables itself ([`crate::walk`]), and compares. Every invariant has one
//! kebab-case name ([`Invariant::name`]) used in reports, tests and
//! `docs/ARCHITECTURE.md`, which describes how each is computed.
//!
//! Each problem is reported once, under the invariant closest to its cause:
//! mappings below a shared or malformed table are reported as
//! `private-address-spaces` and left out of the frame checks; a frame mapped
//! by two processes without a region is `no-implicit-sharing`, not also an
//! ownership disagreement; processes with malformed tables are left out of
//! `quota-accounting`. So a single corruption names a single invariant.

use crate::introspect::{IntrospectError, KernelView, OwnerLookup, RegionInfo};
use crate::memory::GuestRam;
use crate::session::EventEntry;
use crate::walk::{self, Mapping, Walk, WalkStats, KERNEL_HALF};
use crate::write_log::{KnownZero, WriteSource};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};
use superos_protocol::event::Event;
use superos_protocol::introspect::{ParticipantRecord, PARTICIPANT_HOLDS, PARTICIPANT_OFFERED};
use superos_protocol::layout::{GATE_VA, PAGE_SIZE};
use superos_protocol::ownership::FrameOwner;
use superos_protocol::syscall::{CAPS_MAX, OFFERS_PER_GRANTER, PROT_WRITE, RIGHT_WRITE};

/// One isolation invariant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Invariant {
    /// Distinct PML4s; every user-half table in exactly one process's tree.
    PrivateAddressSpaces,
    /// A frame two processes map is a frame of a live region that lists
    /// both, mapped where and as the region allows.
    NoImplicitSharing,
    /// No user mapping of a kernel-owned frame (the gate page read-only
    /// excepted), and no user-accessible leaf in the kernel half.
    NoUserKernelMapping,
    /// No user mapping of a page-table frame.
    NoUserPageTableMapping,
    /// No user page both writable and executable; shared pages never
    /// executable.
    WXorX,
    /// The owner table agrees with the walk.
    OwnershipAgrees,
    /// The kernel's counters equal the walked counts and stay within quota.
    QuotaAccounting,
    /// Nothing maps a free frame, a dead process's frame, or a region frame
    /// it is not a mapped participant of.
    RevocationComplete,
    /// Every free frame is zero.
    FreeFramesScrubbed,
    /// The kernel text is what was loaded.
    KernelTextUnchanged,
    /// The kernel's own mappings obey W^X: no kernel-half leaf writable and
    /// executable, and no writable mapping of the kernel's text or
    /// read-only data anywhere.
    KernelWXorX,
    /// The vCPU's descriptor tables, entry MSRs, control registers,
    /// interrupt stacks, XCR0 and DR7 are as `superos_protocol::cpu`
    /// designs them.
    CpuStateIntact,
    /// The kernel's published tables are readable and well-formed.
    IntrospectionValid,
    /// The kernel says its boot hello once: a second one (which would move
    /// the event ring or the introspection root) is refused and reported.
    SingleBootHello,
}

impl Invariant {
    /// Every invariant, in report order.
    pub const ALL: [Invariant; 14] = [
        Invariant::PrivateAddressSpaces,
        Invariant::NoImplicitSharing,
        Invariant::NoUserKernelMapping,
        Invariant::NoUserPageTableMapping,
        Invariant::WXorX,
        Invariant::OwnershipAgrees,
        Invariant::QuotaAccounting,
        Invariant::RevocationComplete,
        Invariant::FreeFramesScrubbed,
        Invariant::KernelTextUnchanged,
        Invariant::KernelWXorX,
        Invariant::CpuStateIntact,
        Invariant::IntrospectionValid,
        Invariant::SingleBootHello,
    ];

    /// The one name of this invariant.
    pub const fn name(self) -> &'static str {
        match self {
            Invariant::PrivateAddressSpaces => "private-address-spaces",
            Invariant::NoImplicitSharing => "no-implicit-sharing",
            Invariant::NoUserKernelMapping => "no-user-kernel-mapping",
            Invariant::NoUserPageTableMapping => "no-user-page-table-mapping",
            Invariant::WXorX => "w-xor-x",
            Invariant::OwnershipAgrees => "ownership-agrees",
            Invariant::QuotaAccounting => "quota-accounting",
            Invariant::RevocationComplete => "revocation-complete",
            Invariant::FreeFramesScrubbed => "free-frames-scrubbed",
            Invariant::KernelTextUnchanged => "kernel-text-unchanged",
            Invariant::KernelWXorX => "kernel-w-xor-x",
            Invariant::CpuStateIntact => "cpu-state-intact",
            Invariant::IntrospectionValid => "introspection-valid",
            Invariant::SingleBootHello => "single-boot-hello",
        }
    }

    /// The invariant called `name`.
    pub fn from_name(name: &str) -> Option<Invariant> {
        Invariant::ALL.into_iter().find(|i| i.name() == name)
    }

    /// True if checking it needs the kernel's published tables.
    pub const fn needs_root(self) -> bool {
        matches!(
            self,
            Invariant::OwnershipAgrees
                | Invariant::QuotaAccounting
                | Invariant::RevocationComplete
                | Invariant::FreeFramesScrubbed
        )
    }
}

impl std::fmt::Display for Invariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One broken invariant, with the evidence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which invariant.
    pub invariant: Invariant,
    /// What was found, in words.
    pub details: String,
    /// Frames involved.
    pub frames: Vec<u64>,
    /// Processes involved.
    pub pids: Vec<u32>,
    /// Virtual addresses involved.
    pub vas: Vec<u64>,
    /// Raw page-table entries involved.
    pub ptes: Vec<u64>,
}

impl Violation {
    /// A violation with no evidence lists yet.
    pub fn new(invariant: Invariant, details: String) -> Violation {
        Violation {
            invariant,
            details,
            frames: Vec::new(),
            pids: Vec::new(),
            vas: Vec::new(),
            ptes: Vec::new(),
        }
    }

    fn with_mappings<'m>(mut self, mappings: impl IntoIterator<Item = &'m Mapping>) -> Violation {
        for m in mappings {
            if !self.frames.contains(&m.frame) {
                self.frames.push(m.frame);
            }
            if !self.pids.contains(&m.pid) {
                self.pids.push(m.pid);
            }
            self.vas.push(m.va);
            self.ptes.push(m.pte);
        }
        self
    }
}

/// Lists shown per violation line (the report keeps them all).
const SHOWN: usize = 8;

fn hex_list(values: &[u64]) -> String {
    let mut text: Vec<String> = values.iter().take(SHOWN).map(|v| format!("{v:#x}")).collect();
    if values.len() > SHOWN {
        text.push(format!("+{} more", values.len() - SHOWN));
    }
    text.join(" ")
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.invariant, self.details)?;
        let mut evidence = Vec::new();
        if !self.pids.is_empty() {
            let pids: Vec<String> = self
                .pids
                .iter()
                .map(|&p| if p == KERNEL_HALF { "kernel".to_string() } else { p.to_string() })
                .collect();
            evidence.push(format!("pids {}", pids.join(" ")));
        }
        for (name, values) in [("frames", &self.frames), ("vas", &self.vas), ("ptes", &self.ptes)] {
            if !values.is_empty() {
                evidence.push(format!("{name} {}", hex_list(values)));
            }
        }
        if !evidence.is_empty() {
            write!(f, " [{}]", evidence.join("; "))?;
        }
        Ok(())
    }
}

/// When the checker runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CheckMode {
    /// At every kernel event (and at shutdown and panic): the vCPU is
    /// stopped in the hypercall and the kernel's tables are consistent.
    #[default]
    EveryEvent,
    /// Every so often, when the vCPU is found in ring 3 (and at shutdown).
    Periodic(Duration),
    /// Once, when the kernel shuts down.
    Exit,
    /// Never.
    Off,
}

impl std::str::FromStr for CheckMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "every-event" => Ok(CheckMode::EveryEvent),
            "exit" => Ok(CheckMode::Exit),
            "off" => Ok(CheckMode::Off),
            _ => match text.strip_prefix("periodic:").map(str::parse::<u64>) {
                Some(Ok(ms)) if (1..=3_600_000).contains(&ms) => {
                    Ok(CheckMode::Periodic(Duration::from_millis(ms)))
                }
                _ => Err(format!(
                    "`{text}` is not a check mode: use every-event, periodic:<ms> (1 to 3600000), exit or off"
                )),
            },
        }
    }
}

impl std::fmt::Display for CheckMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckMode::EveryEvent => f.write_str("every-event"),
            CheckMode::Periodic(period) => write!(f, "periodic:{}", period.as_millis()),
            CheckMode::Exit => f.write_str("exit"),
            CheckMode::Off => f.write_str("off"),
        }
    }
}

/// The kernel's text and read-only data as the VMM loaded them (taken
/// from guest RAM right after loading, before the vCPU ran; the range is
/// the ELF's, [`KernelImage::read_only`], never the kernel's word).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextBaseline {
    /// Guest-physical start.
    pub gpa: u64,
    /// A copy of the bytes.
    pub bytes: Vec<u8>,
    /// FNV-1a hash of the bytes (for reports).
    pub hash: u64,
}

/// Largest kernel text the VMM keeps a copy of.
pub const MAX_KERNEL_TEXT: u64 = 64 << 20;

/// FNV-1a, 64-bit.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// What the VMM knows about the kernel from the image it loaded (and the
/// vCPU it created), whatever the kernel says; carried to the control
/// socket and into snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelImage {
    /// The kernel's text and read-only data, physical `[start, end)`
    /// (`boot::KernelLayout::read_only`).
    pub read_only: Option<(u64, u64)>,
    /// The kernel symbols the CPU design names, resolved in the ELF
    /// ([`crate::cpu::design_symbols`]; a missing one is absent).
    pub symbols: BTreeMap<String, u64>,
    /// The features of the CPUID given to the vCPU (`None`: unknown, as in
    /// a snapshot of an older format).
    pub features: Option<crate::cpu::CpuFeatures>,
}

/// What the VMM itself knows, independent of the kernel's claims.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// The usable RAM ranges the VMM gave the kernel (`[start, end)`);
    /// everything else (boot data, kernel image, program images) is never
    /// a user's.
    pub usable: Vec<(u64, u64)>,
    /// The kernel text at boot.
    pub text: Option<TextBaseline>,
    /// Why there is no text baseline although the VMM loaded the kernel
    /// (no non-writable segment, a range outside RAM or too large): every
    /// check reports `kernel-text-unchanged` as not checkable, never held.
    pub text_missing: Option<String>,
    /// Where the kernel said its text is at boot (to compare with the root).
    pub text_range: Option<(u64, u64)>,
    /// Live processes according to the events: pid -> PML4.
    pub live_from_events: BTreeMap<u32, u64>,
    /// The kernel's text and read-only data, physical `[start, end)`, from
    /// the ELF the VMM loaded (`boot::KernelLayout::read_only`): nothing may
    /// map it writable.
    pub kernel_read_only: Option<(u64, u64)>,
    /// The `int3`s a debugger (`run --gdb`) planted in the kernel's text:
    /// not a change of the text while they stay what it wrote.
    pub text_patches: crate::debug_trap::TextPatches,
}

impl Facts {
    fn usable(&self, frame: u64) -> bool {
        self.usable.iter().any(|&(start, end)| frame >= start && frame + PAGE_SIZE <= end)
    }
}

/// Counters of one check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckCounters {
    /// Page-table walk counters.
    pub walk: WalkStats,
    /// Free frames read to see they are zero.
    pub frames_scanned: u64,
    /// Free frames not read: verified zero by an earlier check and not
    /// written since (the write log, [`crate::write_log`]).
    pub frames_known_zero: u64,
    /// Bytes of kernel text compared.
    pub text_bytes: u64,
}

/// The result of one check.
#[derive(Clone, Debug, Default)]
pub struct CheckOutcome {
    /// What is broken (empty: every invariant held).
    pub violations: Vec<Violation>,
    /// Work done.
    pub counters: CheckCounters,
    /// Wall time of the whole check (read, walk, compare).
    pub elapsed: Duration,
    /// True if the kernel's introspection root was read.
    pub published: bool,
}

/// Violations listed per invariant and check; the rest are summarized.
pub const MAX_LISTED: usize = 16;

/// `violations` with at most [`MAX_LISTED`] per invariant, the rest
/// summarized in one more violation each.
pub fn listed(violations: Vec<Violation>) -> Vec<Violation> {
    let mut found = Findings { violations: Vec::new(), listed: BTreeMap::new(), unlisted: BTreeMap::new() };
    for violation in violations {
        found.add(violation);
    }
    found.finish()
}

struct Findings {
    violations: Vec<Violation>,
    listed: BTreeMap<Invariant, usize>,
    unlisted: BTreeMap<Invariant, usize>,
}

impl Findings {
    fn add(&mut self, violation: Violation) {
        let listed = self.listed.entry(violation.invariant).or_default();
        if *listed < MAX_LISTED {
            *listed += 1;
            self.violations.push(violation);
        } else {
            *self.unlisted.entry(violation.invariant).or_default() += 1;
        }
    }

    fn finish(mut self) -> Vec<Violation> {
        for (invariant, count) in self.unlisted {
            self.violations.push(Violation::new(
                invariant,
                format!("{count} more violations of {invariant} not listed"),
            ));
        }
        self.violations
    }
}

/// How the checker sees one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// Used as a page table, or owned `PageTable(_)`.
    Table,
    /// Kernel-owned: `Kernel`, `Message`, unmanaged, outside usable RAM.
    Kernel(&'static str),
    Free,
    Private(u32),
    Shared(u32),
    Corrupt(u32),
    /// In usable RAM, owner unknown (no root published).
    Usable,
}

fn pid_list(pids: &BTreeSet<u32>) -> String {
    pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}

/// Per-process counts from the walk.
#[derive(Default)]
struct Counts {
    /// Distinct private frames the process alone maps.
    resident: u64,
    /// Distinct shared frames it maps.
    shared: u64,
}

/// Compares `view` with `walk` and guest memory; the heart of a check.
pub fn evaluate(
    view: &KernelView,
    walk: &Walk,
    ram: &GuestRam,
    facts: &Facts,
    introspect_error: Option<&IntrospectError>,
) -> (Vec<Violation>, CheckCounters) {
    evaluate_with(view, walk, ram, facts, introspect_error, None)
}

/// [`evaluate`], skipping the free frames `known_zero` (refreshed by the
/// caller) knows are zero and recording those it reads as zero.
pub fn evaluate_with(
    view: &KernelView,
    walk: &Walk,
    ram: &GuestRam,
    facts: &Facts,
    introspect_error: Option<&IntrospectError>,
    known_zero: Option<&mut KnownZero>,
) -> (Vec<Violation>, CheckCounters) {
    let mut found = Findings { violations: Vec::new(), listed: BTreeMap::new(), unlisted: BTreeMap::new() };
    let mut counters = CheckCounters { walk: walk.stats, ..Default::default() };
    introspection_problems(&mut found, view, facts, introspect_error);
    for issue in &walk.issues {
        let who = if issue.pid == KERNEL_HALF {
            "the kernel's tables".to_string()
        } else {
            format!("pid {}", issue.pid)
        };
        let mut v = Violation::new(Invariant::PrivateAddressSpaces, format!("{who}: {}", issue.what));
        v.frames.push(issue.frame);
        if issue.pid != KERNEL_HALF {
            v.pids.push(issue.pid);
        }
        v.vas.push(issue.va);
        if issue.entry != 0 {
            v.ptes.push(issue.entry);
        }
        found.add(v);
    }
    if walk.issues_dropped > 0 {
        found.add(Violation::new(
            Invariant::PrivateAddressSpaces,
            format!("{} more structural problems in the page tables", walk.issues_dropped),
        ));
    }
    table_owners(&mut found, view, walk);
    for leaf in &walk.kernel_user_leaves {
        found.add(
            Violation::new(
                Invariant::NoUserKernelMapping,
                format!(
                    "kernel-half address {:#x} is user-accessible ({} byte leaf of frame {:#x})",
                    leaf.va, leaf.page_size, leaf.frame
                ),
            )
            .with_mappings([leaf]),
        );
    }
    let gate = gate_frame(&mut found, view, walk);
    let mut counts: BTreeMap<u32, Counts> = BTreeMap::new();
    for group in walk.by_frame() {
        let users: Vec<&Mapping> = group.iter().filter(|m| m.user && !m.tainted).collect();
        if users.is_empty() {
            continue;
        }
        let frame = users[0].frame;
        let class = classify(view, walk, ram, facts, frame);
        frame_checks(&mut found, view, &mut counts, &users, frame, class, gate);
        for m in &users {
            if m.writable && m.executable() {
                found.add(
                    Violation::new(
                        Invariant::WXorX,
                        format!(
                            "pid {} maps {:#x} writable and executable (frame {:#x})",
                            m.pid, m.va, m.frame
                        ),
                    )
                    .with_mappings([*m]),
                );
            } else if matches!(class, Class::Shared(_)) && m.executable() {
                found.add(
                    Violation::new(
                        Invariant::WXorX,
                        format!("pid {} maps shared frame {:#x} executable at {:#x}", m.pid, m.frame, m.va),
                    )
                    .with_mappings([*m]),
                );
            }
        }
    }
    if view.published() {
        quota_accounting(&mut found, view, walk, &counts);
        dead_participants(&mut found, view);
        (counters.frames_scanned, counters.frames_known_zero) =
            free_frames_scrubbed(&mut found, view, walk, ram, known_zero);
    }
    counters.text_bytes = kernel_text_unchanged(&mut found, ram, facts);
    kernel_w_xor_x(&mut found, walk, facts);
    (found.finish(), counters)
}

/// The kernel's own mappings obey W^X: no supervisor leaf of the kernel
/// half both writable and executable, and no writable supervisor mapping of
/// the kernel's text or read-only data, in the kernel half or in any
/// process's user half. (A user-accessible mapping of either kind is
/// `no-user-kernel-mapping`'s: reported there, not again here.)
fn kernel_w_xor_x(found: &mut Findings, walk: &Walk, facts: &Facts) {
    let protected = facts.kernel_read_only.filter(|&(start, end)| start < end);
    // The protected frames in `[frame, frame + len)`: (first, count).
    let overlap = |frame: u64, len: u64| {
        let (start, end) = protected?;
        let first = frame.max(start);
        let last = frame.saturating_add(len).min(end);
        (first < last).then(|| (first, (last - first).div_ceil(PAGE_SIZE)))
    };
    for m in walk.kernel_writable.iter().filter(|m| !m.user) {
        let text = overlap(m.frame, m.page_size);
        if !m.executable() && text.is_none() {
            continue;
        }
        let size = match m.page_size {
            s if s >= 1 << 30 => format!("{} GiB", s >> 30),
            s if s >= 1 << 20 => format!("{} MiB", s >> 20),
            s => format!("{} KiB", s >> 10),
        };
        let mut problems = Vec::new();
        if let Some((first, count)) = text {
            problems.push(format!(
                "maps {count} frame{} of the kernel's text and read-only data writable (first {first:#x})",
                if count == 1 { "" } else { "s" }
            ));
        }
        if m.executable() {
            problems.push("is writable and executable".to_string());
        }
        let mut v = Violation::new(
            Invariant::KernelWXorX,
            format!(
                "kernel-half address {:#x} ({size} leaf of frame {:#x}, entry at {:#x}) {}",
                m.va,
                m.frame,
                m.entry_gpa,
                problems.join(" and ")
            ),
        );
        v.frames.push(text.map_or(m.frame, |(first, _)| first));
        v.vas.push(m.va);
        v.ptes.push(m.pte);
        found.add(v);
    }
    if protected.is_none() {
        return;
    }
    for m in walk.mappings.iter().filter(|m| m.writable && !m.user && !m.tainted) {
        // One record per 4 KiB frame in the user half.
        if overlap(m.frame, PAGE_SIZE).is_some() {
            found.add(
                Violation::new(
                    Invariant::KernelWXorX,
                    format!(
                        "pid {} maps frame {:#x} of the kernel's text and read-only data writable (supervisor-only) at {:#x}",
                        m.pid, m.frame, m.va
                    ),
                )
                .with_mappings([m]),
            );
        }
    }
}

fn introspection_problems(
    found: &mut Findings,
    view: &KernelView,
    facts: &Facts,
    introspect_error: Option<&IntrospectError>,
) {
    let invalid = |text: String| Violation::new(Invariant::IntrospectionValid, text);
    if let Some(error) = introspect_error {
        found.add(invalid(format!("the kernel's introspection root is unusable: {error}")));
    }
    for problem in &view.problems {
        found.add(invalid(problem.clone()));
    }
    if view.problems_dropped > 0 {
        found.add(invalid(format!("{} more bad records", view.problems_dropped)));
    }
    let Some(root) = view.root else { return };
    if let Some((gpa, len)) = facts.text_range {
        if (root.kernel_text_gpa, root.kernel_text_len) != (gpa, len) {
            found.add(invalid(format!(
                "the root says the kernel text is {:#x}+{:#x}, the boot hello said {gpa:#x}+{len:#x}",
                root.kernel_text_gpa, root.kernel_text_len
            )));
        }
    }
    for range in &view.ranges {
        let inside = facts.usable.iter().any(|&(start, end)| range.start >= start && range.end <= end);
        if !facts.usable.is_empty() && !inside {
            let mut v = invalid(format!(
                "managed frames {:#x}..{:#x} are not inside RAM the VMM gave the kernel as usable",
                range.start, range.end
            ));
            v.frames.push(range.start);
            found.add(v);
        }
    }
    for (&pid, &pml4) in &facts.live_from_events {
        if !view.is_live(pid) {
            let mut v = invalid(format!(
                "pid {pid} is alive according to the events (spawned with PML4 {pml4:#x}, no exit) but not in the process table"
            ));
            v.pids.push(pid);
            v.frames.push(pml4);
            found.add(v);
        }
    }
}

/// The gate frame: the root's (if it is kernel-owned), or without a root
/// the frame most processes map read-only at `GATE_VA`.
fn gate_frame(found: &mut Findings, view: &KernelView, walk: &Walk) -> Option<u64> {
    if let Some(gate) = view.gate_frame() {
        return match view.owner(gate) {
            OwnerLookup::Owner(FrameOwner::Kernel) | OwnerLookup::Unmanaged => Some(gate),
            other => {
                let mut v = Violation::new(
                    Invariant::IntrospectionValid,
                    format!("the announced gate frame {gate:#x} is not kernel-owned ({other:?}); no gate exception"),
                );
                v.frames.push(gate);
                found.add(v);
                None
            }
        };
    }
    let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
    for m in walk.mappings.iter().filter(|m| m.va == GATE_VA && m.user && !m.writable && !m.tainted) {
        *votes.entry(m.frame).or_default() += 1;
    }
    votes.into_iter().max_by_key(|&(_, n)| n).map(|(frame, _)| frame)
}

fn classify(view: &KernelView, walk: &Walk, ram: &GuestRam, facts: &Facts, frame: u64) -> Class {
    if walk.is_table(frame) {
        return Class::Table;
    }
    if !ram.contains(frame, PAGE_SIZE) {
        return Class::Kernel("outside guest RAM");
    }
    match view.owner(frame) {
        OwnerLookup::Unknown if facts.usable.is_empty() || facts.usable(frame) => Class::Usable,
        OwnerLookup::Unknown => Class::Kernel("outside the RAM the kernel may give out"),
        OwnerLookup::Unmanaged => Class::Kernel("not managed by the kernel's allocator"),
        OwnerLookup::Corrupt(raw) => Class::Corrupt(raw),
        OwnerLookup::Owner(owner) => match owner {
            FrameOwner::Free => Class::Free,
            FrameOwner::Kernel => Class::Kernel("owned by the kernel"),
            FrameOwner::Message(_) => Class::Kernel("a kernel message buffer"),
            FrameOwner::PageTable(_) => Class::Table,
            FrameOwner::Private(pid) => Class::Private(pid),
            FrameOwner::Shared(region) => Class::Shared(region),
        },
    }
}

fn describe(users: &[&Mapping]) -> String {
    users
        .iter()
        .map(|m| format!("pid {} at {:#x} ({})", m.pid, m.va, m.rights()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[allow(clippy::too_many_arguments)]
fn frame_checks(
    found: &mut Findings,
    view: &KernelView,
    counts: &mut BTreeMap<u32, Counts>,
    users: &[&Mapping],
    frame: u64,
    class: Class,
    gate: Option<u64>,
) {
    let pids: BTreeSet<u32> = users.iter().map(|m| m.pid).collect();
    let report =
        |invariant, details: String| Violation::new(invariant, details).with_mappings(users.iter().copied());
    match class {
        Class::Table => found.add(report(
            Invariant::NoUserPageTableMapping,
            format!("page-table frame {frame:#x} is mapped user-accessible: {}", describe(users)),
        )),
        Class::Kernel(what) if Some(frame) == gate => {
            let writable: Vec<&Mapping> = users.iter().copied().filter(|m| m.writable).collect();
            if !writable.is_empty() {
                found.add(
                    Violation::new(
                        Invariant::NoUserKernelMapping,
                        format!(
                            "the gate frame {frame:#x} ({what}) is mapped writable: {}",
                            describe(&writable)
                        ),
                    )
                    .with_mappings(writable),
                );
            }
        }
        Class::Kernel(what) => found.add(report(
            Invariant::NoUserKernelMapping,
            format!("frame {frame:#x} ({what}) is mapped user-accessible: {}", describe(users)),
        )),
        Class::Free => found.add(report(
            Invariant::RevocationComplete,
            format!("free frame {frame:#x} is still mapped: {}", describe(users)),
        )),
        Class::Corrupt(raw) => {
            found.add(report(
                Invariant::OwnershipAgrees,
                format!(
                    "mapped frame {frame:#x} has an undecodable owner entry {raw:#x}: {}",
                    describe(users)
                ),
            ));
            if let [only] = pids.iter().collect::<Vec<_>>()[..] {
                // Its recorded owner is unknown: it is the resident memory of
                // the one process that maps it.
                counts.entry(*only).or_default().resident += 1;
            }
        }
        Class::Private(owner) if !view.is_live(owner) => found.add(report(
            Invariant::RevocationComplete,
            format!(
                "frame {frame:#x} of pid {owner}, which is not alive, is still mapped: {}",
                describe(users)
            ),
        )),
        Class::Private(owner) if pids.len() > 1 => {
            found.add(report(
                Invariant::NoImplicitSharing,
                format!(
                    "frame {frame:#x} (private to pid {owner}) is mapped by pids {} with no shared region: {}",
                    pid_list(&pids),
                    describe(users)
                ),
            ));
            if pids.contains(&owner) {
                counts.entry(owner).or_default().resident += 1;
            }
        }
        Class::Private(owner) => {
            let pid = users[0].pid;
            if pid != owner {
                found.add(report(
                    Invariant::OwnershipAgrees,
                    format!(
                        "frame {frame:#x} is recorded private to pid {owner} but mapped by pid {pid}: {}",
                        describe(users)
                    ),
                ));
            }
            // The frame is pid's resident memory either way: only it maps it.
            counts.entry(pid).or_default().resident += 1;
        }
        Class::Shared(region) => shared_frame(found, view, counts, users, frame, region),
        Class::Usable if pids.len() > 1 && Some(frame) != gate => found.add(report(
            Invariant::NoImplicitSharing,
            format!("frame {frame:#x} is mapped by pids {}: {}", pid_list(&pids), describe(users)),
        )),
        Class::Usable => {}
    }
}

fn shared_frame(
    found: &mut Findings,
    view: &KernelView,
    counts: &mut BTreeMap<u32, Counts>,
    users: &[&Mapping],
    frame: u64,
    id: u32,
) {
    let Some(region) = view.region(id) else {
        found.add(
            Violation::new(
                Invariant::RevocationComplete,
                format!(
                    "frame {frame:#x} of region {id}, which is not live, is still mapped: {}",
                    describe(users)
                ),
            )
            .with_mappings(users.iter().copied()),
        );
        return;
    };
    let Some(index) = region.frames.iter().position(|&f| f == frame) else {
        found.add(
            Violation::new(
                Invariant::OwnershipAgrees,
                format!(
                    "frame {frame:#x} is recorded as region {id}'s but the region does not list it: {}",
                    describe(users)
                ),
            )
            .with_mappings(users.iter().copied()),
        );
        // As for any frame whose recorded owner is wrong: the resident
        // memory of the one process that maps it.
        let pids: BTreeSet<u32> = users.iter().map(|m| m.pid).collect();
        if let [only] = pids.iter().collect::<Vec<_>>()[..] {
            counts.entry(*only).or_default().resident += 1;
        }
        return;
    };
    let mut not_participant = Vec::new();
    let mut misplaced = Vec::new();
    let mut too_strong = Vec::new();
    let mut counted = BTreeSet::new();
    for &m in users {
        let participant = region.participant(m.pid).filter(|p| {
            p.mapped_at != 0
                && m.va >= p.mapped_at
                && m.va - p.mapped_at < region.len.next_multiple_of(PAGE_SIZE)
        });
        let Some(p) = participant else {
            not_participant.push(m);
            continue;
        };
        if (m.va - p.mapped_at) / PAGE_SIZE != index as u64 {
            misplaced.push(m);
        } else if m.writable
            && (u64::from(p.rights) & RIGHT_WRITE == 0 || u64::from(p.prot) & PROT_WRITE == 0)
        {
            too_strong.push(m);
        }
        if counted.insert(m.pid) {
            counts.entry(m.pid).or_default().shared += 1;
        }
    }
    if !not_participant.is_empty() {
        found.add(
            Violation::new(
                Invariant::RevocationComplete,
                format!(
                    "frame {frame:#x} of region {id} is mapped by processes that are not mapped participants there: {}",
                    describe(&not_participant)
                ),
            )
            .with_mappings(not_participant),
        );
    }
    if !misplaced.is_empty() {
        found.add(
            Violation::new(
                Invariant::NoImplicitSharing,
                format!(
                    "frame {frame:#x} (page {index} of region {id}) is mapped where the region has another page: {}",
                    describe(&misplaced)
                ),
            )
            .with_mappings(misplaced),
        );
    }
    if !too_strong.is_empty() {
        found.add(
            Violation::new(
                Invariant::NoImplicitSharing,
                format!(
                    "frame {frame:#x} of region {id} is mapped writable without the write right or prot: {}",
                    describe(&too_strong)
                ),
            )
            .with_mappings(too_strong),
        );
    }
}

/// Checks who owns the frames the walk used as tables: a user-half table
/// must be `PageTable(pid)` of the process whose tree it is in.
fn table_owners(found: &mut Findings, view: &KernelView, walk: &Walk) {
    if !view.published() {
        return;
    }
    let mut frames: Vec<(&u64, &walk::TableReach)> =
        walk.tables.iter().filter(|(_, r)| !r.shared()).collect();
    frames.sort_by_key(|(f, _)| **f);
    for (&frame, reach) in frames {
        let Some(first) = reach.refs.first() else { continue };
        let owner = view.owner(frame);
        let user_half = reach.user > 0;
        let wrong = match owner {
            OwnerLookup::Owner(FrameOwner::PageTable(pid)) => !user_half || pid != first.pid,
            OwnerLookup::Owner(FrameOwner::Kernel) | OwnerLookup::Unmanaged => user_half,
            OwnerLookup::Unknown => false,
            _ => true,
        };
        if !wrong {
            continue;
        }
        let whose =
            if user_half { format!("pid {}'s user half", first.pid) } else { "the kernel half".to_string() };
        let invariant = if matches!(owner, OwnerLookup::Owner(FrameOwner::Free)) {
            Invariant::RevocationComplete
        } else {
            Invariant::OwnershipAgrees
        };
        let mut v = Violation::new(
            invariant,
            format!("frame {frame:#x} is a level-{} table of {whose} but recorded as {owner:?}", first.level),
        );
        v.frames.push(frame);
        if user_half {
            v.pids.push(first.pid);
        }
        v.vas.push(first.va);
        v.ptes.push(first.entry);
        found.add(v);
    }
}

fn quota_accounting(found: &mut Findings, view: &KernelView, walk: &Walk, counts: &BTreeMap<u32, Counts>) {
    capability_accounting(found, view);
    for process in &view.processes {
        let Some(record) = process.record else { continue };
        if walk.broken.contains(&process.pid) || !walk.complete {
            continue;
        }
        let pid = process.pid;
        let count = counts.get(&pid);
        let resident = count.map_or(0, |c| c.resident) * PAGE_SIZE;
        let shared_walked = count.map_or(0, |c| c.shared) * PAGE_SIZE;
        let mut problems = Vec::new();
        // Its page tables: the PML4 and every user-half table of its tree
        // (each reached once: a shared table is private-address-spaces').
        let tables = walk
            .tables
            .values()
            .filter(|reach| {
                reach.user == 1 && reach.kernel == 0 && reach.refs.first().is_some_and(|r| r.pid == pid)
            })
            .count() as u64
            * PAGE_SIZE;
        if record.table_bytes != tables {
            problems.push(format!(
                "the kernel counts {} bytes of page tables, its tree has {tables} bytes of tables",
                record.table_bytes
            ));
        }
        if record.resident_bytes != resident {
            problems.push(format!(
                "the kernel counts {} resident bytes, its page tables map {resident} bytes of private frames",
                record.resident_bytes
            ));
        }
        // The kernel charges a region to its owner from creation on, and to
        // every other participant while it has it mapped.
        let shared_charged: u64 = view
            .regions
            .iter()
            .filter(|r| r.owner == pid || r.participant(pid).is_some_and(|p| p.mapped_at != 0))
            .map(|r| r.len.next_multiple_of(PAGE_SIZE))
            .sum();
        if record.shared_bytes != shared_charged {
            problems.push(format!(
                "the kernel counts {} shared bytes, its regions add up to {shared_charged} (owned, or mapped)",
                record.shared_bytes
            ));
        }
        if shared_walked > record.shared_bytes {
            problems.push(format!(
                "its page tables map {shared_walked} bytes of shared frames, the kernel counts {}",
                record.shared_bytes
            ));
        }
        for (what, used, limit) in [
            ("virtual", record.virtual_bytes, record.max_virtual_bytes),
            (
                "resident (data pages and page tables)",
                record.resident_bytes.saturating_add(record.table_bytes),
                record.max_resident_bytes,
            ),
            ("shared", record.shared_bytes, record.max_shared_bytes),
        ] {
            if limit != 0 && used > limit {
                problems.push(format!("{what} size {used} exceeds its quota of {limit} bytes"));
            }
        }
        if !problems.is_empty() {
            let mut v = Violation::new(
                Invariant::QuotaAccounting,
                format!("pid {pid} ({}): {}", process.name, problems.join("; ")),
            );
            v.pids.push(pid);
            v.frames.push(process.pml4);
            found.add(v);
        }
    }
}

/// `quota-accounting` of capabilities, from the region records: no process
/// holds more than its table's `CAPS_MAX`, and no granter has more than
/// `OFFERS_PER_GRANTER` offers outstanding (offers are charged to it).
fn capability_accounting(found: &mut Findings, view: &KernelView) {
    let mut held: BTreeMap<u32, usize> = BTreeMap::new();
    let mut offered: BTreeMap<u32, usize> = BTreeMap::new();
    for p in view.regions.iter().flat_map(|r| r.participants.iter()) {
        if p.state == PARTICIPANT_OFFERED {
            *offered.entry(p.granted_by).or_default() += 1;
        } else {
            *held.entry(p.pid).or_default() += 1;
        }
    }
    let mut report = |pid: u32, details: String| {
        let mut v = Violation::new(Invariant::QuotaAccounting, details);
        v.pids.push(pid);
        found.add(v);
    };
    for (&pid, &n) in held.iter().filter(|(_, &n)| n > CAPS_MAX) {
        report(pid, format!("pid {pid} holds {n} capabilities; a capability table holds {CAPS_MAX}"));
    }
    for (&pid, &n) in offered.iter().filter(|(_, &n)| n > OFFERS_PER_GRANTER) {
        report(
            pid,
            format!(
                "pid {pid} has {n} offers outstanding; a granter is charged at most {OFFERS_PER_GRANTER}"
            ),
        );
    }
}

/// `revocation-complete` over the region records: no dead process is still
/// listed as mapping a region, an offer (not accepted) maps nothing, and
/// every capability's derivation chain runs through processes that still
/// hold theirs to the owner (revocation is transitive).
fn dead_participants(found: &mut Findings, view: &KernelView) {
    for region in &view.regions {
        for p in region.participants.iter().filter(|p| p.mapped_at != 0 && !view.is_live(p.pid)) {
            let mut v = Violation::new(
                Invariant::RevocationComplete,
                format!(
                    "region {} still lists pid {}, which is not alive, as mapped at {:#x}",
                    region.id, p.pid, p.mapped_at
                ),
            );
            v.pids.push(p.pid);
            v.vas.push(p.mapped_at);
            found.add(v);
        }
        for p in region.participants.iter().filter(|p| p.state == PARTICIPANT_OFFERED && p.mapped_at != 0) {
            let mut v = Violation::new(
                Invariant::NoImplicitSharing,
                format!(
                    "pid {} was only offered region {} (it never accepted) yet is listed as mapping it at {:#x}",
                    p.pid, region.id, p.mapped_at
                ),
            );
            v.pids.push(p.pid);
            v.vas.push(p.mapped_at);
            found.add(v);
        }
        for p in region.participants.iter().filter(|p| p.pid != region.owner) {
            if let Err(broken) = derivation_reaches_owner(region, p) {
                let mut v = Violation::new(
                    Invariant::RevocationComplete,
                    format!(
                        "region {}: pid {}'s capability derives from pid {}'s, which pid {} no longer holds \
                         (revocation did not reach what was derived from it)",
                        region.id, p.pid, broken, broken
                    ),
                );
                v.pids.push(p.pid);
                if p.mapped_at != 0 {
                    v.vas.push(p.mapped_at);
                }
                found.add(v);
            }
        }
    }
}

/// Follows `granted_by` from `p` through participants that hold their
/// capability; `Err(pid)` names the first granter that holds none (or a
/// cycle's member).
fn derivation_reaches_owner(region: &RegionInfo, p: &ParticipantRecord) -> Result<(), u32> {
    let mut at = *p;
    for _ in 0..=region.participants.len() {
        if at.pid == region.owner {
            return Ok(());
        }
        let granter = at.granted_by;
        at = *region
            .participants
            .iter()
            .find(|q| q.pid == granter && q.state == PARTICIPANT_HOLDS && q.pid != at.pid)
            .ok_or(granter)?;
    }
    Err(at.pid)
}

/// A zero page to compare free frames with (a slice comparison is a
/// `memcmp`, fast even in unoptimised test builds).
static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// Reads every free frame that `known_zero` does not know to be zero;
/// returns how many were read and how many were known. A free frame that
/// is in use (a table, or mapped) is reported as a revocation problem
/// instead, not again here.
fn free_frames_scrubbed(
    found: &mut Findings,
    view: &KernelView,
    walk: &Walk,
    ram: &GuestRam,
    mut known_zero: Option<&mut KnownZero>,
) -> (u64, u64) {
    let in_use =
        |frame: u64| walk.is_table(frame) || walk.mappings.binary_search_by_key(&frame, |m| m.frame).is_ok();
    const FREE: u32 = FrameOwner::Free.encode();
    const CHUNK_FRAMES: u64 = 16;
    let mut buffer = vec![0u8; (CHUNK_FRAMES * PAGE_SIZE) as usize];
    let mut dirty: Vec<(u64, usize)> = Vec::new();
    let mut dirty_count = 0u64;
    let mut scanned = 0u64;
    let mut known = 0u64;
    for range in &view.ranges {
        let frames = (range.end - range.start) / PAGE_SIZE;
        let owners = view.owners.get(range.first_index as usize..).unwrap_or_default();
        let is_free = |i: u64| owners.get(i as usize) == Some(&FREE);
        let is_known = |known_zero: &Option<&mut KnownZero>, i: u64| {
            known_zero.as_ref().is_some_and(|k| k.is_zero(range.start + i * PAGE_SIZE))
        };
        let mut i = 0;
        while i < frames {
            // A run of free frames to read, at most CHUNK_FRAMES long.
            if !is_free(i) {
                i += 1;
                continue;
            }
            if is_known(&known_zero, i) {
                known += 1;
                i += 1;
                continue;
            }
            let free = |i: u64| is_free(i) && !is_known(&known_zero, i);
            let mut run = 1;
            while run < CHUNK_FRAMES && i + run < frames && free(i + run) {
                run += 1;
            }
            let start = range.start + i * PAGE_SIZE;
            let bytes = &mut buffer[..(run * PAGE_SIZE) as usize];
            if ram.read_bytes(start, bytes).is_ok() {
                for (k, page) in bytes.chunks_exact(PAGE_SIZE as usize).enumerate() {
                    if page == ZERO_PAGE {
                        if let Some(known_zero) = known_zero.as_deref_mut() {
                            known_zero.mark_zero(start + k as u64 * PAGE_SIZE);
                        }
                    } else if !in_use(start + k as u64 * PAGE_SIZE) {
                        dirty_count += 1;
                        if dirty.len() < SHOWN * 2 {
                            let offset = page.iter().position(|&b| b != 0).unwrap_or(0);
                            dirty.push((start + k as u64 * PAGE_SIZE, offset));
                        }
                    }
                }
            }
            scanned += run;
            i += run;
        }
    }
    if dirty_count > 0 {
        let (first, offset) = dirty[0];
        let mut v = Violation::new(
            Invariant::FreeFramesScrubbed,
            format!(
                "{dirty_count} free frames are not zero (first: {first:#x}, non-zero at offset {offset:#x})"
            ),
        );
        v.frames = dirty.iter().map(|&(f, _)| f).collect();
        found.add(v);
    }
    (scanned, known)
}

/// Compares the kernel text with its copy; returns the bytes compared.
fn kernel_text_unchanged(found: &mut Findings, ram: &GuestRam, facts: &Facts) -> u64 {
    let Some(text) = &facts.text else {
        if let Some(why) = &facts.text_missing {
            found.add(Violation::new(
                Invariant::KernelTextUnchanged,
                format!("the kernel text cannot be compared: {why}"),
            ));
        }
        return 0;
    };
    let mut now = vec![0u8; text.bytes.len()];
    if let Err(error) = ram.read_bytes(text.gpa, &mut now) {
        found.add(Violation::new(
            Invariant::KernelTextUnchanged,
            format!("the kernel text at {:#x} cannot be read: {error}", text.gpa),
        ));
        return 0;
    }
    if now == text.bytes {
        return now.len() as u64;
    }
    let patches = facts.text_patches.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let debuggers = |i: usize, now: u8, was: u8| {
        now == crate::debug_trap::INT3 && patches.get(&(text.gpa + i as u64)) == Some(&was)
    };
    let changed: Vec<usize> = now
        .iter()
        .zip(&text.bytes)
        .enumerate()
        .filter(|&(i, (&a, &b))| a != b && !debuggers(i, a, b))
        .map(|(i, _)| i)
        .collect();
    if changed.is_empty() {
        return now.len() as u64;
    }
    let mut pages: Vec<u64> = changed.iter().map(|&i| (text.gpa + i as u64) & !(PAGE_SIZE - 1)).collect();
    pages.dedup();
    let first = changed[0];
    let mut details = format!(
        "{} bytes of kernel text differ from the text at boot (hash {:#018x} now {:#018x}); first at {:#x}: {:#04x} was {:#04x}",
        changed.len(),
        text.hash,
        fnv1a(&now),
        text.gpa + first as u64,
        now[first],
        text.bytes[first]
    );
    if pages.len() > 1 {
        let _ = write!(details, ", in {} pages", pages.len());
    }
    let mut v = Violation::new(Invariant::KernelTextUnchanged, details);
    v.frames = pages;
    found.add(v);
    now.len() as u64
}

/// Totals over a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckStats {
    /// Checks run.
    pub checks: u64,
    /// Periodic checks run when a kick found the vCPU in ring 3.
    pub in_ring3: u64,
    /// Periodic checks put off because the vCPU was in ring 0 (run at the
    /// next kick or event instead).
    pub deferred: u64,
    /// The shortest time between the end of a check and the start of the
    /// next periodic one (the guest's time to run; at least the period).
    pub shortest_gap: Option<Duration>,
    /// Page-table entries examined.
    pub ptes_walked: u64,
    /// Tables read.
    pub tables_read: u64,
    /// Leaf mappings recorded.
    pub mappings: u64,
    /// Free frames read to verify they are zero (or not).
    pub frames_scanned: u64,
    /// Free frames not read: known zero from an earlier check and not
    /// written since.
    pub frames_known_zero: u64,
    /// Time spent checking.
    pub time: Duration,
    /// Of which walking page tables.
    pub walk_time: Duration,
    /// The longest check.
    pub max_time: Duration,
    /// Violations found (listed or not).
    pub violations: u64,
    /// The check that found the most user mappings: how many...
    pub peak_mappings: u64,
    /// ...the page-table entries it walked...
    pub peak_ptes: u64,
    /// ...the free frames it scanned...
    pub peak_frames_scanned: u64,
    /// ...how long it took in all...
    pub peak_time: Duration,
    /// ...and of that, walking.
    pub peak_walk_time: Duration,
    /// CPU-state checks run (`cpu-state-intact`).
    pub cpu_checks: u64,
    /// Time spent reading the vCPU through KVM for them.
    pub cpu_read_time: Duration,
    /// Time spent comparing (GDT, IDT and TSS read from guest memory).
    pub cpu_compare_time: Duration,
    /// The longest CPU-state check (read and compare).
    pub cpu_max_time: Duration,
}

impl CheckStats {
    /// Page-table entries walked per second of walk time.
    pub fn ptes_per_second(&self) -> f64 {
        let secs = self.walk_time.as_secs_f64();
        if secs > 0.0 {
            self.ptes_walked as f64 / secs
        } else {
            0.0
        }
    }
}

/// The checker's state over a run: what the VMM knows on its own (usable
/// RAM, kernel text at boot, processes from the events) and the totals.
#[derive(Debug, Default)]
pub struct Checker {
    facts: Facts,
    root_gpa: Option<u64>,
    events_seen: usize,
    image: KernelImage,
    gate_kind: Option<u32>,
    cpu_design_in_force: bool,
    /// Free frames known zero, with the write log that keeps that true.
    known_zero: Option<KnownZero>,
    /// Totals.
    pub stats: CheckStats,
}

impl Checker {
    /// A checker; `usable` are the RAM ranges the VMM gave the kernel.
    pub fn new(usable: Vec<(u64, u64)>) -> Checker {
        Checker { facts: Facts { usable, ..Default::default() }, ..Default::default() }
    }

    /// Gives the checker a log of the writes to guest RAM (`pages` pages):
    /// each check then reads only the free frames written since an earlier
    /// check found them zero ([`crate::write_log`]).
    pub fn log_writes(&mut self, source: Box<dyn WriteSource>, pages: u64) {
        self.known_zero = Some(KnownZero::new(source, pages));
    }

    /// Why the write log failed at the last check, if it did (that check
    /// read every free frame).
    pub fn write_log_failure(&self) -> Option<&str> {
        self.known_zero.as_ref().and_then(|k| k.failure.as_deref())
    }

    /// What the VMM knows of the kernel image it loaded.
    pub fn set_image(&mut self, image: &KernelImage) {
        self.facts.kernel_read_only = image.read_only;
        self.image = image.clone();
    }

    /// What the VMM knows of the kernel image it loaded.
    pub fn image(&self) -> &KernelImage {
        &self.image
    }

    /// True once the kernel's CPU state must be as designed
    /// ([`crate::cpu::design_in_force`], from the events observed).
    pub fn cpu_design_in_force(&self) -> bool {
        self.cpu_design_in_force
    }

    /// Compares a CPU state read `read_time` ago (taking that long) with the
    /// design (`cpu-state-intact`).
    pub fn check_cpu(
        &mut self,
        ram: &GuestRam,
        cpu: u32,
        state: &crate::cpu::CpuState,
        read_time: Duration,
    ) -> Vec<Violation> {
        let started = Instant::now();
        let expected = crate::cpu::Expected { image: &self.image, gate_kind: self.gate_kind, cpu };
        let violations = listed(crate::cpu::check(state, expected, ram));
        let compare = started.elapsed();
        let stats = &mut self.stats;
        stats.cpu_checks += 1;
        stats.cpu_read_time += read_time;
        stats.cpu_compare_time += compare;
        stats.cpu_max_time = stats.cpu_max_time.max(read_time + compare);
        stats.violations += violations.len() as u64;
        violations
    }

    /// Right after the VMM loaded the kernel (before the vCPU runs): copies
    /// the kernel's text and read-only data, the range from the ELF
    /// ([`Checker::set_image`]), as the baseline of `kernel-text-unchanged`.
    /// A range that is missing, empty, outside RAM or too large is not
    /// skipped: every later check reports it.
    pub fn baseline_image(&mut self, ram: &GuestRam) {
        let why = match self.facts.kernel_read_only {
            None => {
                Some("the kernel ELF has no non-writable segment (no text the VMM could protect)".to_string())
            }
            Some((start, end)) if end <= start => {
                Some(format!("the kernel's text range {start:#x}..{end:#x} is empty"))
            }
            Some((start, end)) if end - start > MAX_KERNEL_TEXT => Some(format!(
                "the kernel's text and read-only data {start:#x}..{end:#x} exceed {MAX_KERNEL_TEXT} bytes"
            )),
            Some((start, end)) => {
                let mut bytes = vec![0u8; (end - start) as usize];
                match ram.read_bytes(start, &mut bytes) {
                    Ok(()) => {
                        let hash = fnv1a(&bytes);
                        self.facts.text = Some(TextBaseline { gpa: start, bytes, hash });
                        None
                    }
                    Err(error) => {
                        Some(format!("the kernel's text {start:#x}..{end:#x} is not in guest RAM: {error}"))
                    }
                }
            }
        };
        self.facts.text_missing = why;
    }

    /// Shares the debugger's record of the `int3`s it plants in the
    /// kernel's text ([`crate::control::Control::text_patches`]).
    pub fn share_text_patches(&mut self, patches: crate::debug_trap::TextPatches) {
        self.facts.text_patches = patches;
    }

    /// At the boot hello: remembers where the kernel says its text is (to
    /// compare with its root; the baseline is the VMM's own,
    /// [`Checker::baseline_image`]) and the root's address (0 = not
    /// published). Returns what is wrong with the announced text range: a
    /// range that is empty, outside RAM or outside the text the VMM loaded
    /// is a finding, never silently skipped.
    pub fn boot_hello(
        &mut self,
        ram: &GuestRam,
        text: Option<(u64, u64)>,
        root_gpa: u64,
    ) -> Option<Violation> {
        self.root_gpa = (root_gpa != 0).then_some(root_gpa);
        let (gpa, len) = text?;
        self.facts.text_range = Some((gpa, len));
        let inside_image = self
            .facts
            .kernel_read_only
            .is_some_and(|(start, end)| gpa >= start && gpa.checked_add(len).is_some_and(|e| e <= end));
        let problem = if len == 0 {
            Some("is empty".to_string())
        } else if !ram.contains(gpa, len) {
            Some("is not inside guest RAM".to_string())
        } else if self.facts.kernel_read_only.is_some() && !inside_image {
            let (start, end) = self.facts.kernel_read_only.unwrap_or_default();
            Some(format!("is not inside the text and read-only data the VMM loaded ({start:#x}..{end:#x})"))
        } else {
            None
        };
        problem.map(|problem| {
            Violation::new(
                Invariant::IntrospectionValid,
                format!("the boot hello says the kernel text is {gpa:#x}+{len:#x}, which {problem}"),
            )
        })
    }

    /// The introspection root the kernel announced, if it did.
    pub fn root_gpa(&self) -> Option<u64> {
        self.root_gpa
    }

    /// True if the kernel announced an introspection root.
    pub fn root_announced(&self) -> bool {
        self.root_gpa.is_some()
    }

    /// The kernel text baseline, if one was taken.
    pub fn text_baseline(&self) -> Option<&TextBaseline> {
        self.facts.text.as_ref()
    }

    /// Follows the events not seen yet: spawns add a live process, exits
    /// and kills remove it.
    pub fn observe(&mut self, events: &[EventEntry]) {
        for entry in events.get(self.events_seen..).unwrap_or_default() {
            match entry.event {
                Event::ProcessSpawned { pid, pml4_gpa, .. } => {
                    self.facts.live_from_events.insert(pid, pml4_gpa);
                }
                Event::ProcessExited { pid, .. } | Event::ProcessKilled { pid, .. } => {
                    self.facts.live_from_events.remove(&pid);
                }
                Event::KernelReady { gate_kind, .. } => {
                    self.gate_kind = Some(gate_kind);
                    self.cpu_design_in_force = true;
                }
                Event::GateSelfTestFailed { .. } => self.cpu_design_in_force = true,
                _ => {}
            }
        }
        self.events_seen = events.len();
    }

    /// The kernel's view now: from the root if there is one, else from the
    /// events. A root that cannot be read gives the event view and the
    /// error.
    pub fn view(&self, ram: &GuestRam) -> (KernelView, Option<IntrospectError>) {
        match self.root_gpa {
            Some(gpa) => match KernelView::read(ram, gpa) {
                Ok(view) => (view, None),
                Err(error) => (KernelView::from_events(&self.facts.live_from_events), Some(error)),
            },
            None => (KernelView::from_events(&self.facts.live_from_events), None),
        }
    }

    /// One full check.
    pub fn check(&mut self, ram: &GuestRam) -> CheckOutcome {
        let started = Instant::now();
        let (view, error) = self.view(ram);
        let mut processes: Vec<(u32, u64)> = view.processes.iter().map(|p| (p.pid, p.pml4)).collect();
        // A process the events know but the table hides is walked too.
        for (&pid, &pml4) in &self.facts.live_from_events {
            if !view.is_live(pid) {
                processes.push((pid, pml4));
            }
        }
        let walk_started = Instant::now();
        let walk = walk::walk(ram, view.kernel_pml4(), &processes);
        let walk_time = walk_started.elapsed();
        if let Some(known_zero) = &mut self.known_zero {
            known_zero.refresh(ram);
        }
        let (violations, counters) =
            evaluate_with(&view, &walk, ram, &self.facts, error.as_ref(), self.known_zero.as_mut());
        let elapsed = started.elapsed();
        let stats = &mut self.stats;
        stats.checks += 1;
        stats.ptes_walked += counters.walk.entries;
        stats.tables_read += counters.walk.tables;
        stats.mappings += counters.walk.mappings;
        stats.frames_scanned += counters.frames_scanned;
        stats.frames_known_zero += counters.frames_known_zero;
        stats.time += elapsed;
        stats.walk_time += walk_time;
        stats.max_time = stats.max_time.max(elapsed);
        stats.violations += violations.len() as u64;
        if counters.walk.mappings >= stats.peak_mappings {
            stats.peak_mappings = counters.walk.mappings;
            stats.peak_ptes = counters.walk.entries;
            stats.peak_frames_scanned = counters.frames_scanned;
            stats.peak_time = elapsed;
            stats.peak_walk_time = walk_time;
        }
        CheckOutcome { violations, counters, elapsed, published: view.published() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_kebab_case() {
        assert_eq!(Invariant::from_name("kernel-w-xor-x"), Some(Invariant::KernelWXorX));
        for invariant in Invariant::ALL {
            assert_eq!(Invariant::from_name(invariant.name()), Some(invariant));
            assert!(invariant.name().chars().all(|c| c.is_ascii_lowercase() || c == '-'));
        }
        assert_eq!(Invariant::from_name("w^x"), None);
    }

    #[test]
    fn a_debuggers_int3_in_the_kernel_text_is_not_a_change_but_any_other_byte_is() {
        let ram = GuestRam::new(16).unwrap();
        const TEXT: u64 = 0x10_0000;
        let bytes = vec![0x90u8; 64];
        ram.write_bytes(TEXT, &bytes).unwrap();
        let facts = Facts {
            text: Some(TextBaseline { gpa: TEXT, hash: fnv1a(&bytes), bytes }),
            ..Default::default()
        };
        let check = || {
            let mut found =
                Findings { violations: Vec::new(), listed: BTreeMap::new(), unlisted: BTreeMap::new() };
            kernel_text_unchanged(&mut found, &ram, &facts);
            found.violations.iter().map(|v| v.details.clone()).collect::<Vec<_>>()
        };
        // The debugger's int3 over the byte it recorded: held.
        ram.write_bytes(TEXT + 8, &[crate::debug_trap::INT3]).unwrap();
        facts.text_patches.lock().unwrap().insert(TEXT + 8, 0x90);
        assert!(check().is_empty(), "{:?}", check());
        // An int3 the debugger did not plant, or a patch it recorded wrongly: not.
        ram.write_bytes(TEXT + 9, &[crate::debug_trap::INT3]).unwrap();
        assert!(
            check()[0].contains("1 bytes of kernel text differ") && check()[0].contains("first at 0x100009")
        );
        ram.write_bytes(TEXT + 9, &[0x90]).unwrap();
        facts.text_patches.lock().unwrap().insert(TEXT + 8, 0x55);
        assert!(check()[0].contains("first at 0x100008"), "{:?}", check());
        // Where the debugger's patch is, any other byte is a change.
        facts.text_patches.lock().unwrap().insert(TEXT + 8, 0x90);
        ram.write_bytes(TEXT + 8, &[0x0f]).unwrap();
        assert!(check()[0].contains("first at 0x100008"), "{:?}", check());
    }

    #[test]
    fn check_modes_parse() {
        assert_eq!("every-event".parse(), Ok(CheckMode::EveryEvent));
        assert_eq!("periodic:250".parse(), Ok(CheckMode::Periodic(Duration::from_millis(250))));
        assert_eq!("exit".parse(), Ok(CheckMode::Exit));
        assert_eq!("off".parse(), Ok(CheckMode::Off));
        for bad in ["periodic:0", "periodic:", "periodic:x", "sometimes", ""] {
            assert!(bad.parse::<CheckMode>().is_err(), "{bad}");
        }
        for mode in ["every-event", "periodic:5", "exit", "off"] {
            assert_eq!(mode.parse::<CheckMode>().unwrap().to_string(), mode);
        }
    }

    #[test]
    fn violations_print_their_evidence() {
        let mut v = Violation::new(Invariant::WXorX, "pid 3 maps 0x400000 writable and executable".into());
        v.frames = vec![0x20_3000];
        v.pids = vec![3, KERNEL_HALF];
        v.vas = (0..10).map(|i| 0x40_0000 + i * 0x1000).collect();
        v.ptes = vec![0x20_3007];
        let text = v.to_string();
        assert!(text.starts_with("w-xor-x: pid 3 maps"), "{text}");
        assert!(text.contains("pids 3 kernel; frames 0x203000; vas 0x400000"), "{text}");
        assert!(text.contains("+2 more; ptes 0x203007]"), "{text}");
    }
}
