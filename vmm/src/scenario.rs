//! Scenarios: which programs to run, with what arguments, and what each is
//! expected to do. Read from TOML files (or the embedded examples) with serde;
//! a bad file is reported with its path, line, column and reason.
//!
//! ```toml
//! description = "what this shows"
//! [vm]
//! memory_mib = 64                      # optional; --mem overrides it
//! check = "every-event"                # optional: when the VMM checks the isolation
//!                                      # invariants (as `run --check`, which overrides it)
//! cpus = 2                             # optional, 1 to 8 vCPUs; --cpus overrides it
//! [[process]]
//! program = "hello"                    # an embedded example program, or
//! # path = "build/my-program.elf"      # an ELF file, relative to this file
//! name = "hello-a"                     # optional, defaults to the program name
//! args = "spin=40"                     # optional, at most 128 bytes
//! expect = { exit = 0 }                # default; or { fault = "write-to-code" }
//! runs = 1                             # optional, 1 to 100000: start it this many
//!                                      # times in a row (each run after the last ended)
//! # optional memory quotas in KiB (missing or 0 = no limit) and what a
//! # violation does: "fail" (the request fails; the default) or "kill"
//! quota = { virtual_kib = 1024, resident_kib = 256, shared_kib = 64, on_violation = "fail" }
//! ```

use crate::check::CheckMode;
use crate::images;
use serde::Deserialize;
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use superos_protocol::boot::{
    QuotaSpec, ARGS_LEN, MAX_BOOT_PROCESSES, NAME_LEN, QUOTA_POLICY_FAIL, QUOTA_POLICY_KILL,
};
use superos_protocol::event::FaultKind;
use thiserror::Error;

/// Default guest memory when neither the scenario nor `--mem` sets it.
pub const DEFAULT_MEMORY_MIB: u64 = 64;

/// Most times one scenario process may be started in a row (`runs`).
pub const MAX_RUNS: u32 = 100_000;

/// What a process is expected to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expectation {
    /// Exit by itself with this code.
    Exit(i64),
    /// Be terminated by the kernel for this fault.
    Fault(FaultKind),
}

impl std::fmt::Display for Expectation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expectation::Exit(code) => write!(f, "exit {code}"),
            Expectation::Fault(kind) => write!(f, "killed: {kind}"),
        }
    }
}

/// One process of a scenario, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessConfig {
    /// Name shown in logs.
    pub name: String,
    /// The program's name (embedded name or file stem).
    pub program: String,
    /// The program's ELF image: the embedded one itself (borrowed, never
    /// copied per process), or a file's bytes.
    pub image: Cow<'static, [u8]>,
    /// Argument bytes.
    pub args: String,
    /// Expected outcome (of every run).
    pub expect: Expectation,
    /// Memory quotas in bytes (all zero = no limits), as the kernel gets them.
    pub quota: QuotaSpec,
    /// How many times the kernel starts the program in a row (1 to [`MAX_RUNS`]).
    pub runs: u32,
}

/// A resolved scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// Where it came from (a path, or `embedded:<name>`).
    pub origin: String,
    /// What it shows.
    pub description: String,
    /// Guest memory in MiB, if the scenario sets it.
    pub memory_mib: Option<u64>,
    /// When to check the isolation invariants, if the scenario says.
    pub check: Option<CheckMode>,
    /// vCPUs, if the scenario says.
    pub cpus: Option<u32>,
    /// The processes, in start order.
    pub processes: Vec<ProcessConfig>,
}

/// Why a scenario could not be used.
#[derive(Debug, Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("cannot read scenario {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown or mistyped fields.
    #[error("{origin}:{line}:{column}: {message}")]
    Syntax {
        /// The file.
        origin: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A field has a value that is well-typed but not acceptable.
    #[error("{origin}: process #{index} ({name}): {message}")]
    Invalid {
        /// The file.
        origin: String,
        /// 1-based index of the process.
        index: usize,
        /// Its name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A scenario-wide problem.
    #[error("{origin}: {message}")]
    Scenario {
        /// The file.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// Neither a file nor an embedded scenario has this name.
    #[error("no scenario file or embedded scenario named {name:?} (embedded: {available})")]
    NotFound {
        /// What was asked for.
        name: String,
        /// The embedded scenario names.
        available: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    #[serde(default)]
    description: String,
    #[serde(default)]
    vm: RawVm,
    #[serde(default)]
    process: Vec<RawProcess>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    memory_mib: Option<u64>,
    check: Option<String>,
    cpus: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProcess {
    program: Option<String>,
    path: Option<PathBuf>,
    name: Option<String>,
    #[serde(default)]
    args: String,
    expect: Option<RawExpect>,
    runs: Option<i64>,
    quota: Option<RawQuota>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuota {
    virtual_kib: Option<i64>,
    resident_kib: Option<i64>,
    shared_kib: Option<i64>,
    on_violation: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpect {
    exit: Option<i64>,
    fault: Option<String>,
}

impl Scenario {
    /// Loads `spec`: a path to a TOML file if one exists there, otherwise the
    /// name of an embedded scenario.
    pub fn load(spec: &str) -> Result<Scenario, ScenarioError> {
        let path = Path::new(spec);
        if path.exists() {
            let text = crate::input::read_regular_text(path, crate::input::MAX_SCENARIO_BYTES)
                .map_err(|source| ScenarioError::Read { path: path.to_path_buf(), source })?;
            let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
            return Scenario::parse(&text, &path.display().to_string(), &base);
        }
        match images::scenario(spec) {
            Some(text) => Scenario::parse(text, &format!("embedded:{spec}"), Path::new(".")),
            None => Err(ScenarioError::NotFound {
                name: spec.to_string(),
                available: images::scenario_names().join(", "),
            }),
        }
    }

    /// Parses scenario text. `origin` names it in errors; relative program
    /// paths are resolved against `base`.
    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<Scenario, ScenarioError> {
        let raw: RawScenario = toml::from_str(text).map_err(|error| {
            let (line, column) = error.span().map_or((1, 1), |span| line_column(text, span.start));
            ScenarioError::Syntax {
                origin: origin.to_string(),
                line,
                column,
                message: error.message().to_string(),
            }
        })?;
        let scenario_error =
            |message: String| ScenarioError::Scenario { origin: origin.to_string(), message };
        if raw.process.is_empty() {
            return Err(scenario_error("a scenario needs at least one [[process]]".into()));
        }
        if raw.process.len() > MAX_BOOT_PROCESSES {
            return Err(scenario_error(format!(
                "{} processes, but at most {MAX_BOOT_PROCESSES} can be started at boot",
                raw.process.len()
            )));
        }
        let check = match raw.vm.check.as_deref().map(str::parse::<CheckMode>) {
            Some(Err(e)) => return Err(scenario_error(format!("[vm] check: {e}"))),
            Some(Ok(mode)) => Some(mode),
            None => None,
        };
        let cpus = match raw.vm.cpus {
            Some(n) => Some(parse_cpus(n).map_err(|e| scenario_error(format!("[vm] cpus: {e}")))?),
            None => None,
        };
        let processes = raw
            .process
            .into_iter()
            .enumerate()
            .map(|(i, p)| resolve_process(p, i + 1, origin, base))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Scenario {
            origin: origin.to_string(),
            // Printed to a terminal: control characters are shown escaped.
            description: raw
                .description
                .chars()
                .flat_map(|c| {
                    let escaped: String =
                        if c.is_control() { c.escape_default().collect() } else { c.to_string() };
                    escaped.chars().collect::<Vec<_>>()
                })
                .collect(),
            memory_mib: raw.vm.memory_mib,
            check,
            cpus,
            processes,
        })
    }
}

/// A vCPU count, 1 ..= [`superos_protocol::cpu::MAX_CPUS`].
pub fn parse_cpus(n: i64) -> Result<u32, String> {
    let max = superos_protocol::cpu::MAX_CPUS;
    match u32::try_from(n) {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("{n} vCPUs: a VM has 1 to {max}")),
    }
}

fn resolve_process(
    raw: RawProcess,
    index: usize,
    origin: &str,
    base: &Path,
) -> Result<ProcessConfig, ScenarioError> {
    let shown = raw.name.clone().or(raw.program.clone()).unwrap_or_else(|| "?".into());
    let invalid = |message: String| ScenarioError::Invalid {
        origin: origin.to_string(),
        index,
        name: shown.clone(),
        message,
    };
    let mut shown_program = String::new();
    let (program, image) = match (&raw.program, &raw.path) {
        (Some(name), None) => match images::program(name) {
            Some(image) => (name.clone(), Cow::Borrowed(image)),
            None => {
                return Err(invalid(format!(
                    "no embedded program {name:?} (embedded: {})",
                    images::program_names().join(", ")
                )))
            }
        },
        (None, Some(path)) => {
            let full = base.join(path);
            let image = crate::input::read_regular(&full, crate::input::MAX_ELF_BYTES).map_err(|e| {
                let hint = if e.kind() == std::io::ErrorKind::NotFound {
                    " (not built yet? `cargo build --release` in the program's project)"
                } else {
                    ""
                };
                invalid(format!("cannot read {}: {e}{hint}", full.display()))
            })?;
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            shown_program = full.display().to_string();
            (stem, Cow::Owned(image))
        }
        _ => return Err(invalid("give exactly one of `program` (embedded) or `path` (ELF file)".into())),
    };
    let shown_program = if shown_program.is_empty() { program.clone() } else { shown_program };
    if let Err(kind) = guest_kernel::elf_image::check_user_image(&image) {
        let why =
            crate::user_elf::why_refused(&image).unwrap_or_else(|| "the kernel's check refuses it".into());
        return Err(invalid(format!(
            "program {shown_program} is not a loadable SuperOS program ({kind}): {why}"
        )));
    }
    let name = raw.name.unwrap_or_else(|| program.clone());
    if name.is_empty() || name.len() > NAME_LEN {
        return Err(invalid(format!("the name must be 1 to {NAME_LEN} bytes long")));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid(format!("the name {:?} has control characters", name)));
    }
    if raw.args.len() > ARGS_LEN {
        return Err(invalid(format!("args are {} bytes long; the limit is {ARGS_LEN}", raw.args.len())));
    }
    let expect = match raw.expect {
        None => Expectation::Exit(0),
        Some(RawExpect { exit: Some(code), fault: None }) => Expectation::Exit(code),
        Some(RawExpect { exit: None, fault: Some(fault) }) => {
            Expectation::Fault(FaultKind::from_name(&fault).ok_or_else(|| {
                let known: Vec<&str> = FaultKind::ALL.iter().map(|f| f.name()).collect();
                invalid(format!("unknown fault kind {fault:?} (known: {})", known.join(", ")))
            })?)
        }
        Some(_) => return Err(invalid("`expect` takes exactly one of `exit` or `fault`".into())),
    };
    let runs = match raw.runs {
        None => 1,
        Some(runs) => u32::try_from(runs)
            .ok()
            .filter(|runs| (1..=MAX_RUNS).contains(runs))
            .ok_or_else(|| invalid(format!("runs = {runs}: it must be 1 to {MAX_RUNS}")))?,
    };
    let quota = match raw.quota {
        None => QuotaSpec::default(),
        Some(quota) => resolve_quota(quota).map_err(invalid)?,
    };
    Ok(ProcessConfig { name, program, image, args: raw.args, expect, quota, runs })
}

/// Turns a `quota = { ... }` table into the kernel's [`QuotaSpec`] (bytes),
/// or says what is wrong with it.
fn resolve_quota(raw: RawQuota) -> Result<QuotaSpec, String> {
    let bytes = |field: &str, kib: Option<i64>| -> Result<u64, String> {
        let kib = kib.unwrap_or(0);
        let kib = u64::try_from(kib)
            .map_err(|_| format!("quota.{field} = {kib}: a size cannot be negative (0 means no limit)"))?;
        kib.checked_mul(1024)
            .ok_or_else(|| format!("quota.{field} = {kib}: too large (at most {} KiB)", u64::MAX / 1024))
    };
    let max_virtual_bytes = bytes("virtual_kib", raw.virtual_kib)?;
    let max_resident_bytes = bytes("resident_kib", raw.resident_kib)?;
    let max_shared_bytes = bytes("shared_kib", raw.shared_kib)?;
    if max_virtual_bytes != 0 && max_resident_bytes > max_virtual_bytes {
        return Err(format!(
            "quota.resident_kib ({}) is larger than quota.virtual_kib ({}): \
             a process cannot have more resident than virtual memory",
            max_resident_bytes / 1024,
            max_virtual_bytes / 1024
        ));
    }
    let policy = match raw.on_violation.as_deref() {
        None | Some("fail") => QUOTA_POLICY_FAIL,
        Some("kill") => QUOTA_POLICY_KILL,
        Some(other) => return Err(format!("unknown quota.on_violation {other:?} (known: fail, kill)")),
    };
    Ok(QuotaSpec { max_virtual_bytes, max_resident_bytes, max_shared_bytes, policy, reserved: 0 })
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        Scenario::parse(text, "test.toml", Path::new("."))
    }

    #[test]
    fn every_embedded_scenario_parses() {
        for name in images::scenario_names() {
            let scenario = Scenario::load(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!scenario.processes.is_empty());
        }
    }

    #[test]
    fn a_full_process_entry_resolves() {
        let s = parse(
            "[vm]\nmemory_mib = 32\n[[process]]\nprogram = \"exit-code\"\nname = \"x\"\nargs = \"5\"\nexpect = { exit = 5 }\n",
        )
        .unwrap();
        assert_eq!(s.memory_mib, Some(32));
        assert_eq!(s.processes[0].name, "x");
        assert_eq!(s.processes[0].expect, Expectation::Exit(5));
        let s =
            parse("[[process]]\nprogram = \"write-code\"\nexpect = { fault = \"write-to-code\" }\n").unwrap();
        assert_eq!(s.processes[0].expect, Expectation::Fault(FaultKind::WriteToCode));
        assert_eq!(s.processes[0].name, "write-code");
    }

    #[test]
    fn syntax_errors_name_file_line_and_column() {
        let error = parse("[[process]]\nprogram = \"hello\"\nbogus = 1\n").unwrap_err().to_string();
        assert!(error.starts_with("test.toml:3:1: unknown field `bogus`"), "{error}");
        let error = parse("[[process]]\nprogram = hello\n").unwrap_err().to_string();
        assert!(error.starts_with("test.toml:2:"), "{error}");
    }

    #[test]
    fn bad_values_are_rejected_with_reasons() {
        let cases = [
            ("", "at least one [[process]]"),
            ("[[process]]\nprogram = \"nope\"\n", "no embedded program \"nope\""),
            ("[[process]]\n", "exactly one of `program`"),
            ("[[process]]\nprogram = \"hello\"\npath = \"x\"\n", "exactly one of `program`"),
            ("[[process]]\npath = \"/nonexistent.elf\"\n", "cannot read /nonexistent.elf"),
            (
                "[[process]]\nprogram = \"hello\"\nexpect = { fault = \"melted\" }\n",
                "unknown fault kind \"melted\"",
            ),
            (
                "[[process]]\nprogram = \"hello\"\nexpect = { exit = 1, fault = \"stack-guard\" }\n",
                "exactly one of `exit`",
            ),
            ("[[process]]\nprogram = \"hello\"\nname = \"\"\n", "1 to 32 bytes"),
        ];
        for (text, needle) in cases {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(needle), "{text:?} gave {error:?}");
        }
        let long_args = format!("[[process]]\nprogram = \"hello\"\nargs = \"{}\"\n", "a".repeat(129));
        assert!(parse(&long_args).unwrap_err().to_string().contains("the limit is 128"));
        let many = "[[process]]\nprogram = \"hello\"\n".repeat(33);
        assert!(parse(&many).unwrap_err().to_string().contains("at most 32"));
    }

    #[test]
    fn quotas_and_runs_resolve_to_the_kernel_spec() {
        let s = parse(
            "[[process]]\nprogram = \"hello\"\nruns = 1000\n\
             quota = { virtual_kib = 1024, resident_kib = 256, shared_kib = 64, on_violation = \"kill\" }\n\
             [[process]]\nprogram = \"hello\"\nquota = { resident_kib = 8 }\n\
             [[process]]\nprogram = \"hello\"\nruns = 100000\nquota = {}\n",
        )
        .unwrap();
        let [full, partial, plain] = &s.processes[..] else {
            panic!("three processes expected, got {:?}", s.processes.len())
        };
        assert_eq!(full.runs, 1000);
        assert_eq!(
            full.quota,
            QuotaSpec {
                max_virtual_bytes: 1024 * 1024,
                max_resident_bytes: 256 * 1024,
                max_shared_bytes: 64 * 1024,
                policy: QUOTA_POLICY_KILL,
                reserved: 0,
            }
        );
        assert_eq!(partial.runs, 1, "runs defaults to 1");
        assert_eq!(
            partial.quota,
            QuotaSpec { max_resident_bytes: 8 * 1024, policy: QUOTA_POLICY_FAIL, ..QuotaSpec::default() }
        );
        assert_eq!(plain.runs, MAX_RUNS);
        assert_eq!(plain.quota, QuotaSpec::default());
        // Without a quota table there are no limits.
        let s = parse("[[process]]\nprogram = \"hello\"\n").unwrap();
        assert_eq!((s.processes[0].quota, s.processes[0].runs), (QuotaSpec::default(), 1));
        // A resident limit with an unlimited virtual size is fine.
        let s = parse("[[process]]\nprogram = \"hello\"\nquota = { virtual_kib = 0, resident_kib = 64 }\n")
            .unwrap();
        assert_eq!(s.processes[0].quota.max_resident_bytes, 64 * 1024);
    }

    #[test]
    fn control_characters_are_refused_in_names_and_escaped_in_descriptions() {
        let error =
            parse("[[process]]\nprogram = \"hello\"\nname = \"a\\u001b[2Jb\"\n").unwrap_err().to_string();
        assert!(error.contains("has control characters"), "{error}");
        let s = parse("description = \"red\\u001b[31m\\nline\"\n[[process]]\nprogram = \"hello\"\n").unwrap();
        assert_eq!(s.description, "red\\u{1b}[31m\\nline");
    }

    #[test]
    fn bad_quotas_and_runs_are_rejected_with_reasons() {
        let hello = "[[process]]\nprogram = \"hello\"\nname = \"h\"\n";
        let cases = [
            ("runs = 0", "test.toml: process #1 (h): runs = 0: it must be 1 to 100000"),
            ("runs = 100001", "runs = 100001: it must be 1 to 100000"),
            ("runs = -3", "runs = -3: it must be 1 to 100000"),
            ("runs = 9223372036854775807", "it must be 1 to 100000"),
            (
                "quota = { on_violation = \"explode\" }",
                "process #1 (h): unknown quota.on_violation \"explode\" (known: fail, kill)",
            ),
            ("quota = { virtual_kib = -1 }", "quota.virtual_kib = -1: a size cannot be negative"),
            (
                "quota = { shared_kib = 9223372036854775807 }",
                "quota.shared_kib = 9223372036854775807: too large",
            ),
            (
                "quota = { virtual_kib = 64, resident_kib = 128 }",
                "quota.resident_kib (128) is larger than quota.virtual_kib (64)",
            ),
            ("quota = { bogus = 1 }", "test.toml:4:11: unknown field `bogus`"),
            ("quota = { virtual_kib = \"1M\" }", "test.toml:4:"),
            ("runs = \"many\"", "test.toml:4:8:"),
        ];
        for (line, needle) in cases {
            let text = format!("{hello}{line}\n");
            let error = parse(&text).unwrap_err().to_string();
            assert!(error.contains(needle), "{line:?} gave {error:?}, expected {needle:?}");
        }
        // The largest size that still fits in u64 bytes is accepted.
        let max_kib = u64::MAX / 1024;
        let text = format!("{hello}quota = {{ shared_kib = {max_kib} }}\n");
        assert_eq!(parse(&text).unwrap().processes[0].quota.max_shared_bytes, max_kib * 1024);
        let text = format!("{hello}quota = {{ shared_kib = {} }}\n", max_kib + 1);
        assert!(parse(&text).unwrap_err().to_string().contains("too large"));
    }

    #[test]
    fn a_non_elf_program_file_is_rejected() {
        let dir = std::env::temp_dir().join(format!("superos-scenario-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("junk.elf"), b"not an elf").unwrap();
        let error =
            Scenario::parse("[[process]]\npath = \"junk.elf\"\n", "t.toml", &dir).unwrap_err().to_string();
        let shown = dir.join("junk.elf").display().to_string();
        assert!(
            error.contains(&format!(
                "program {shown} is not a loadable SuperOS program (bad-elf): not an ELF file"
            )),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest::proptest! {
        /// Arbitrary text and random corruptions of a real scenario are
        /// parsed or rejected with an error, never a panic; an error always
        /// names the file.
        #[test]
        fn untrusted_scenario_text_never_panics(
            text in "(\\PC|\n){0,200}",
            flips in proptest::collection::vec((0usize..2000, 0x20u8..0x7f), 0..20),
        ) {
            if let Err(error) = parse(&text) {
                proptest::prop_assert!(error.to_string().contains("test.toml"), "{}", error);
            }
            let mut bytes = images::scenario("default").unwrap().as_bytes().to_vec();
            for (at, value) in flips {
                let len = bytes.len();
                bytes[at % len] = value;
            }
            if let Err(error) = parse(&String::from_utf8_lossy(&bytes)) {
                proptest::prop_assert!(error.to_string().contains("test.toml"), "{}", error);
            }
        }
    }

    #[test]
    fn unknown_names_list_what_exists() {
        let error = Scenario::load("no-such-scenario").unwrap_err().to_string();
        assert!(error.contains("default"), "{error}");
    }
}
