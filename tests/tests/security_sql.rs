//! SQL is built only from constants, with values bound as parameters or sent by binary COPY:
//! no SQL text is assembled with `format!` (or concatenation) from anything a client sent.
//!
//! A source scan over the services and the schema crate: every `format!`-family macro, `+`
//! concatenation or `push_str` whose text holds an SQL statement keyword is a finding, unless it
//! is on the allow-list below, each entry a place where the only interpolated value is an
//! identifier the code made itself (and why that holds). A new finding fails the test: bind the
//! value as `$n`, or add the place here with the reason its input is not a client's.
//! PL/pgSQL in the migrations may build DDL only through `format()` with `%I`/`%L` (quoted
//! identifiers and literals), never with `||`.

use std::path::{Path, PathBuf};

/// (file, a substring of the flagged statement, why its interpolation is safe).
const ALLOWED: &[(&str, &str, &str)] = &[
    (
        "schema/src/partitions.rs",
        "DETACH PARTITION {t}",
        "t is a month table name read from pg_catalog by list() and checked by is_month_name \
         (event_yYYYYmMM): made by the partition manager, never by a client",
    ),
    (
        "schema/src/partitions.rs",
        "DROP TABLE {t}",
        "the same month table name as the detach above, from pg_catalog, checked by is_month_name",
    ),
    (
        "schema/src/erase.rs",
        "DELETE FROM {table}",
        "table, key and filter are string literals at every call site of delete_batched (values \
         bound as $n); month tables come from partitions::list and are checked by is_month_name",
    ),
    (
        "writer/src/copy.rs",
        "COPY {table} ",
        "copy_event_into is for the benchmark, which passes a leaf name it created itself; \
         the writer's own path uses the constant COPY_EVENT",
    ),
];

const KEYWORDS: &[&str] = &[
    "SELECT ",
    "INSERT ",
    "UPDATE ",
    "DELETE ",
    "CREATE ",
    "ALTER ",
    "DROP ",
    "COPY ",
    "TRUNCATE ",
    "LOCK ",
    "GRANT ",
    "EXECUTE ",
    "WHERE ",
    "VALUES",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The text of the string literal that opens the arguments at `from` (plain or raw), up to
/// 2 KB; `None` when the first argument is not a literal.
fn literal_after(src: &str, from: usize) -> Option<&str> {
    let rest = src[from..].trim_start();
    let (raw, rest) = match rest.strip_prefix("r#") {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let body = rest.strip_prefix('"')?;
    let mut end = body.len();
    let mut escaped = false;
    for (i, c) in body.char_indices() {
        if raw {
            if body[i..].starts_with("\"#") {
                end = i;
                break;
            }
        } else if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            end = i;
            break;
        }
    }
    let mut cut = end.min(2_048);
    while !body.is_char_boundary(cut) {
        cut -= 1;
    }
    Some(&body[..cut])
}

fn has_sql(text: &str) -> bool {
    KEYWORDS.iter().any(|k| text.contains(k))
}

/// Every place in the Rust sources that builds SQL text at run time.
fn sql_builders(root: &Path) -> Vec<(String, String)> {
    let mut files = Vec::new();
    for dir in ["ingest/src", "writer/src", "schema/src", "loadtest/src"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(
        files.len() > 20,
        "the scan found the sources ({} files)",
        files.len()
    );
    let mut found = Vec::new();
    for file in files {
        let src = std::fs::read_to_string(&file).unwrap_or_default();
        let rel = file
            .strip_prefix(root)
            .unwrap_or(&file)
            .to_string_lossy()
            .into_owned();
        for pattern in [
            "format!(",
            "format_args!(",
            "write!(",
            "writeln!(",
            "push_str(",
            "concat!(",
        ] {
            for (at, _) in src.match_indices(pattern) {
                if let Some(text) = literal_after(&src, at + pattern.len()) {
                    if has_sql(text) {
                        found.push((rel.clone(), text.to_owned()));
                    }
                }
            }
        }
        // `"SELECT ..." + x` / `x + "WHERE ..."`.
        for line in src.lines() {
            if (line.contains("\" +") || line.contains("+ \"") || line.contains("+ &"))
                && has_sql(line)
            {
                found.push((rel.clone(), line.trim().to_owned()));
            }
        }
    }
    found
}

#[test]
fn sql_is_built_only_from_constants_and_parameters() {
    let root = sluice_tests::repo_root();
    let mut unexplained = Vec::new();
    let mut allowed_seen = vec![false; ALLOWED.len()];
    for (file, text) in sql_builders(&root) {
        match ALLOWED
            .iter()
            .position(|(f, needle, _)| *f == file && text.contains(needle))
        {
            Some(i) => allowed_seen[i] = true,
            None => unexplained.push(format!("{file}: {text}")),
        }
    }
    assert!(
        unexplained.is_empty(),
        "SQL built from run-time text (bind values as $n instead, or allow-list with a reason):\n{}",
        unexplained.join("\n---\n")
    );
    // An allow-list entry that no longer matches is stale: remove it rather than keep a hole.
    for (seen, (file, needle, _)) in allowed_seen.iter().zip(ALLOWED) {
        assert!(seen, "stale allow-list entry {file}: {needle}");
    }
}

#[test]
fn the_scan_catches_a_format_built_query() {
    // The detector itself: a planted string-built query is found, a parameterised one is not.
    let dir = std::env::temp_dir().join(sluice_tests::unique_name("sqlscan"));
    let src = dir.join("ingest/src");
    std::fs::create_dir_all(&src).unwrap();
    for d in ["writer/src", "schema/src", "loadtest/src"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    for i in 0..21 {
        std::fs::write(src.join(format!("f{i}.rs")), "fn f() {}").unwrap();
    }
    std::fs::write(
        src.join("bad.rs"),
        "fn q(name: &str) { let _ = format!(\"SELECT * FROM lead WHERE user_id = '{name}'\"); }",
    )
    .unwrap();
    std::fs::write(
        src.join("good.rs"),
        "const Q: &str = \"SELECT * FROM lead WHERE user_id = $1\"; fn q() { let _ = format!(\"{Q}\"); }",
    )
    .unwrap();
    let found = sql_builders(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].0.ends_with("bad.rs"));
}

#[test]
fn migrations_build_dynamic_ddl_only_with_quoted_format() {
    let dir = sluice_tests::repo_root().join("schema/migrations");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for (n, line) in text.lines().enumerate() {
            let upper = line.to_ascii_uppercase();
            if upper.contains("EXECUTE") && !upper.trim_start().starts_with("--") {
                checked += 1;
                assert!(
                    !line.contains("||"),
                    "{}:{}: EXECUTE with || concatenation; use format() with %I/%L",
                    entry.path().display(),
                    n + 1
                );
            }
        }
    }
    assert!(
        checked > 0,
        "the migrations' dynamic DDL was found and checked"
    );
}
