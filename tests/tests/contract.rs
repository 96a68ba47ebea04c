//! docs/CONTRACT.md is checked against the code: every test it names exists,
//! every invariant it names is one the VMM's checker reports, and every
//! clause row has at least one test.

use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the workspace").to_path_buf()
}

struct Row {
    number: u32,
    clause: String,
    invariants: Vec<String>,
    tests: Vec<String>,
}

fn backticked(cell: &str) -> Vec<String> {
    cell.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

fn rows() -> Vec<Row> {
    let text = std::fs::read_to_string(workspace().join("docs/CONTRACT.md")).expect("docs/CONTRACT.md");
    text.lines()
        .filter(|line| line.starts_with("| ") && !line.starts_with("| #") && !line.starts_with("| ---"))
        .map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
            assert_eq!(cells.len(), 5, "malformed row: {line}");
            Row {
                number: cells[0].parse().unwrap_or_else(|_| panic!("row number in {line}")),
                clause: cells[1].to_string(),
                invariants: backticked(cells[3]),
                tests: backticked(cells[4]),
            }
        })
        .collect()
}

#[test]
fn every_clause_has_a_row_and_every_row_a_test() {
    let rows = rows();
    let numbers: Vec<u32> = rows.iter().map(|r| r.number).collect();
    assert_eq!(
        numbers,
        (1..=numbers.len() as u32).collect::<Vec<_>>(),
        "rows are numbered 1..N without gaps"
    );
    assert!(rows.len() >= 70, "the contract has more clauses than {}", rows.len());
    for row in &rows {
        assert!(!row.tests.is_empty(), "clause {} ({}) names no test", row.number, row.clause);
    }
}

#[test]
fn every_named_test_exists() {
    for row in rows() {
        for reference in &row.tests {
            let (path, function) = reference
                .rsplit_once("::")
                .unwrap_or_else(|| panic!("clause {}: {reference} is not path::function", row.number));
            let source = std::fs::read_to_string(workspace().join(path))
                .unwrap_or_else(|e| panic!("clause {}: {path}: {e}", row.number));
            assert!(
                source.contains(&format!("fn {function}(")),
                "clause {} names {reference}, which does not exist",
                row.number
            );
        }
    }
}

#[test]
fn every_named_invariant_is_one_the_checker_reports() {
    let checker = std::fs::read_to_string(workspace().join("vmm/src/check.rs")).expect("vmm/src/check.rs");
    for row in rows() {
        for invariant in &row.invariants {
            assert!(
                checker.contains(&format!("\"{invariant}\"")),
                "clause {} names invariant {invariant}, which the checker does not know",
                row.number
            );
        }
    }
}

/// The contract and every document a clone has link inside the repository
/// (issue 15): a clone has no `../shared/`.
#[test]
fn the_docs_link_only_inside_the_repository() {
    let contract = workspace().join("docs/memory-model-contract.md");
    assert!(contract.is_file(), "the memory-model contract lives in docs/");
    let mut documents = vec![workspace().join("README.md")];
    for entry in std::fs::read_dir(workspace().join("docs")).expect("docs/") {
        let path = entry.expect("a docs/ entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            documents.push(path);
        }
    }
    for document in documents {
        let text = std::fs::read_to_string(&document).expect("a document");
        assert!(!text.contains("../shared"), "{} points outside the repository", document.display());
    }
}
