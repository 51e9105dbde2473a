//! Citations of the contract stay true (docs/architecture.md §10): every `architecture.md §N`
//! or `§N.M` in the repository's files names a heading of docs/architecture.md, a section
//! sign outside that file always comes with its path, and nothing cites the design document
//! that preceded it. Pure file reading: no broker, no database.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use sluice_tests::repo_root;

/// The contract, relative to the repository's top folder.
const DOC: &str = "docs/architecture.md";

/// This file's samples are dangling on purpose, so it is not scanned.
const SELF: &str = "tests/tests/docs_references.rs";

/// The one word by which files cited the design document before docs/architecture.md.
const OLD_DESIGN: &str = "DESIGN";

/// Lines that cite the old design and may not change: applied migrations are checksummed
/// (docs/architecture.md §6.5), so their comments stay as written (docs/architecture.md §10).
const FROZEN: [(&str, &str); 2] = [
    (
        "schema/migrations/0003_events.up.sql",
        "-- Hot-path tables: no foreign keys, few indexes (DESIGN §6 has the measured cost of each).",
    ),
    (
        "schema/migrations/0003_events.up.sql",
        "-- the exactly-once effect of DESIGN §5.",
    ),
];

/// One thing wrong with a file's citations.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Finding {
    file: String,
    line: usize,
    problem: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.problem)
    }
}

/// The section numbers of the document's headings (`## §5 Writer` -> `5`, `### §5.2 ...` ->
/// `5.2`), in order, duplicates kept so the caller can refuse them.
fn headings(doc: &str) -> Vec<String> {
    doc.lines()
        .filter(|line| line.starts_with('#'))
        .filter_map(|line| {
            let title = line.trim_start_matches('#').trim_start();
            title.strip_prefix('§').and_then(number)
        })
        .collect()
}

/// The section number at the start of `text` (`5.2` of `5.2. Next`), if it starts with one.
fn number(text: &str) -> Option<String> {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let n = text[..end].trim_end_matches('.');
    n.starts_with(|c: char| c.is_ascii_digit())
        .then(|| n.to_owned())
}

/// True when `word` occurs in `line` as a word of its own (not inside `UNDESIGNED`).
fn has_word(line: &str, word: &str) -> bool {
    let is_word_char = |c: char| c.is_ascii_alphanumeric() || c == '_';
    line.match_indices(word).any(|(at, _)| {
        let before = line[..at].chars().next_back();
        let after = line[at + word.len()..].chars().next();
        !before.is_some_and(is_word_char) && !after.is_some_and(is_word_char)
    })
}

/// Everything wrong with the citations in `text`, the content of `file`. `sections` are the
/// document's section numbers. Inside the document itself `§N.M` alone cites its own
/// section; everywhere else a citation is `architecture.md §N.M`. A `§` not followed by a
/// digit (`§N` in prose about citing) is no citation.
fn scan(file: &str, text: &str, sections: &BTreeSet<String>) -> Vec<Finding> {
    let inside_doc = file == DOC;
    let mut found = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if FROZEN.contains(&(file, line.trim_end())) {
            continue;
        }
        let mut report = |problem: String| {
            found.push(Finding {
                file: file.to_owned(),
                line: index + 1,
                problem,
            });
        };
        if has_word(line, OLD_DESIGN) {
            report(format!(
                "cites the design document that {DOC} replaced; cite `{DOC} §N.M` instead"
            ));
        }
        for (at, sign) in line.match_indices('§') {
            let Some(section) = number(&line[at + sign.len()..]) else {
                continue;
            };
            if !inside_doc && !line[..at].ends_with("architecture.md ") {
                report(format!(
                    "§{section} without the document's path: write `{DOC} §{section}` on one line"
                ));
            } else if !sections.contains(&section) {
                report(format!(
                    "{DOC} has no section §{section}: cite one of its headings or add the \
                     section"
                ));
            }
        }
    }
    found
}

/// The repository's files, tracked or new (not ignored), relative to its top folder.
fn repository_files(root: &Path) -> Vec<String> {
    let out = Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(root)
        .output()
        .unwrap_or_else(|err| panic!("running git ls-files (install git): {err}"));
    assert!(
        out.status.success(),
        "git ls-files failed in {}: {}",
        root.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("file names are UTF-8")
        .split('\0')
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_citation_of_the_contract_names_an_existing_section() {
    let root = repo_root();
    let doc = std::fs::read_to_string(root.join(DOC))
        .unwrap_or_else(|err| panic!("{DOC} must exist, it is the contract: {err}"));
    let numbers = headings(&doc);
    let sections: BTreeSet<String> = numbers.iter().cloned().collect();
    assert_eq!(
        sections.len(),
        numbers.len(),
        "{DOC} numbers two headings alike: {numbers:?}"
    );
    assert!(
        sections.contains("5.2") && sections.len() >= 40,
        "{DOC}'s headings were not read as sections: {numbers:?}"
    );

    let mut findings = Vec::new();
    let mut citations = 0;
    let mut scanned = 0;
    for file in repository_files(&root) {
        if file == SELF {
            continue;
        }
        // Deleted but not yet staged, or binary: nothing to cite from.
        let Ok(text) = std::fs::read_to_string(root.join(&file)) else {
            continue;
        };
        scanned += 1;
        if file != DOC {
            citations += text.matches("architecture.md §").count();
        }
        findings.extend(scan(&file, &text, &sections));
    }
    let report: Vec<String> = findings.iter().map(ToString::to_string).collect();
    assert!(
        findings.is_empty(),
        "{} dangling or malformed citations:\n{}",
        findings.len(),
        report.join("\n")
    );
    // The code cites the contract in over twenty places; far fewer means the scan broke.
    assert!(
        scanned > 100 && citations >= 20,
        "only {citations} citations in {scanned} files"
    );
}

mod scanner {
    use super::*;

    fn sections(numbers: &[&str]) -> BTreeSet<String> {
        numbers.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn headings_give_their_section_numbers() {
        let doc = "# Title\n## §1 Layout\ntext §9 in prose\n### §1.2 Files\n## §10 Citing.\n\
                   #### no number\n## §2. Flow\n";
        assert_eq!(headings(doc), ["1", "1.2", "10", "2"]);
    }

    #[test]
    fn a_dangling_citation_is_reported_with_its_line() {
        let text = "// fine: docs/architecture.md §5.2.\n// gone: docs/architecture.md §5.9 here\n";
        let found = scan("writer/src/x.rs", text, &sections(&["5", "5.2"]));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].line, 2);
        assert!(found[0].problem.contains("no section §5.9"), "{found:?}");
    }

    #[test]
    fn a_section_sign_without_the_path_is_reported_outside_the_document_only() {
        let text = "see (§5.2) and docs/architecture.md §5.2, §5\n";
        let known = sections(&["5", "5.2"]);
        let outside = scan("docs/writer.md", text, &known);
        assert_eq!(outside.len(), 2, "{outside:?}");
        assert!(outside
            .iter()
            .all(|f| f.problem.contains("without the document's path")));
        assert!(scan(DOC, text, &known).is_empty());
        let missing = scan(DOC, "as §7.4 says\n", &known);
        assert_eq!(missing.len(), 1, "{missing:?}");
    }

    #[test]
    fn placeholders_are_no_citations() {
        let text = "cite it as `docs/architecture.md §N` or `§N.M`; § alone\n";
        assert!(scan("README.md", text, &sections(&["1"])).is_empty());
    }

    #[test]
    fn the_old_design_is_reported_unless_the_line_is_frozen() {
        let known = sections(&["5", "6"]);
        let cited = scan("ingest/src/x.rs", "//! as DESIGN.md says\n", &known);
        assert_eq!(cited.len(), 1, "{cited:?}");
        assert!(cited[0].problem.contains("replaced"), "{cited:?}");
        assert!(scan("x.sql", "-- UNDESIGNED_DESIGNS are fine\n", &known).is_empty());
        let (file, line) = FROZEN[1];
        assert!(scan(file, &format!("{line}\n"), &known).is_empty());
        // The same line elsewhere is not frozen: the old word, and `§5` without the path.
        assert_eq!(
            scan("schema/migrations/0005_x.up.sql", line, &known).len(),
            2
        );
    }
}
