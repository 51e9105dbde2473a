//! Secrets read from files (`SLUICE_DATABASE_URL_FILE`, `SLUICE_PII_KEYS_FILE`): a
//! Kubernetes Secret mounted as a volume stays out of the process environment, out of
//! `ps e`, and out of crash reports that dump the environment.

use std::path::Path;

use crate::SchemaError;

/// The value of a setting that may come from a file: the file's content (surrounding
/// whitespace and the trailing newline of `echo` or an editor trimmed) when `file` is given,
/// else `value`. The file wins, so an image's default variable cannot mask a mounted Secret.
pub fn value_or_file(
    value: &str,
    file: Option<&Path>,
    setting: &'static str,
) -> Result<String, SchemaError> {
    let Some(path) = file else {
        return Ok(value.to_owned());
    };
    let text = std::fs::read_to_string(path).map_err(|e| SchemaError::SecretFile {
        setting,
        path: path.display().to_string(),
        reason: format!("cannot read it: {e}"),
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Err(SchemaError::SecretFile {
            setting,
            path: path.display().to_string(),
            reason: "the file is empty".into(),
        });
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_wins_over_the_value_and_is_trimmed() {
        let path = std::env::temp_dir().join(format!("sluice-secret-{}", std::process::id()));
        std::fs::write(&path, "postgres://u:p@h/db\n").unwrap();
        assert_eq!(
            value_or_file("default", Some(&path), "SLUICE_DATABASE_URL_FILE").unwrap(),
            "postgres://u:p@h/db"
        );
        assert_eq!(
            value_or_file("given", None, "SLUICE_DATABASE_URL_FILE").unwrap(),
            "given"
        );
        std::fs::write(&path, "\n").unwrap();
        let err = value_or_file("x", Some(&path), "SLUICE_DATABASE_URL_FILE")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("SLUICE_DATABASE_URL_FILE") && err.contains("empty"),
            "{err}"
        );
        let _ = std::fs::remove_file(&path);
        let err = value_or_file(
            "x",
            Some(Path::new("/nonexistent/s")),
            "SLUICE_PII_KEYS_FILE",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/nonexistent/s"), "{err}");
    }
}
