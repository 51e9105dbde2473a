//! The third-party SDKs the compatibility tests drive, installed from their lockfiles: npm
//! packages (`npm ci` into the folder's `node_modules`) and posthog-python (a venv under the
//! cache). A missing tool is an error that says how to install it: these tests fail, never
//! skip, when they cannot run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use anyhow::{bail, Context, Result};

use crate::repo_root;

/// `tests/posthog-sdk`: posthog-node, posthog-js, analytics-next, playwright-core, the
/// drivers, and posthog-python's requirements.
pub fn posthog_dir() -> PathBuf {
    repo_root().join("tests/posthog-sdk")
}

/// The tool's `--version` output, or an error naming the Debian package.
pub fn tool_version(tool: &str, package: &str) -> Result<String> {
    Command::new(tool)
        .arg("--version")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .with_context(|| {
            format!(
                "`{tool}` is not installed: this test needs it (Debian: `apt-get install \
                 {package}`; deploy/local/test installs it)"
            )
        })
}

/// Runs `npm ci` in `dir` when its `node_modules` is missing or older than the lockfile,
/// once per process and folder (tests run in parallel and would race in npm).
pub fn npm_ci(dir: &Path) -> Result<()> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let node = tool_version("node", "nodejs")?;
    tool_version("npm", "npm")?;
    let major = node
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok());
    if major.is_none_or(|m| m < 18) {
        bail!("node {node} is too old: Node.js 18 or later is needed");
    }
    let modified = |p: PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let fresh = match (
        modified(dir.join("node_modules/.package-lock.json")),
        modified(dir.join("package-lock.json")),
    ) {
        (Some(installed), Some(locked)) => installed >= locked,
        _ => false,
    };
    if fresh {
        return Ok(());
    }
    let out = Command::new("npm")
        .args([
            "ci",
            "--no-audit",
            "--no-fund",
            "--ignore-scripts",
            "--prefer-offline",
        ])
        .current_dir(dir)
        .output()
        .context("running npm ci")?;
    if !out.status.success() {
        bail!(
            "npm ci in {} failed:\n{}\n{}",
            dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The Python of a venv (under the cache) holding posthog-python and its dependencies, as
/// pinned by `tests/posthog-sdk/requirements.txt`; made on first use and again when the
/// requirements change.
pub fn posthog_python() -> Result<PathBuf> {
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    VENV.get_or_init(|| make_venv().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn make_venv() -> Result<PathBuf> {
    tool_version("python3", "python3")?;
    // The cache deploy/local/lib.sh uses: SLUICE_CACHE, else XDG_CACHE_HOME/sluice, else
    // ~/.cache/sluice.
    let cache = std::env::var_os("SLUICE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("sluice")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sluice")))
        .context("none of SLUICE_CACHE, XDG_CACHE_HOME and HOME is set")?;
    let venv = cache.join("posthog-python");
    let python = venv.join("bin/python");
    let wanted = std::fs::read_to_string(posthog_dir().join("requirements.txt"))?;
    let stamp = venv.join("sluice-requirements.txt");
    if python.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&wanted) {
        return Ok(python);
    }
    let run = |cmd: &mut Command, what: &str| -> Result<()> {
        let out = cmd.output().with_context(|| format!("running {what}"))?;
        if !out.status.success() {
            bail!(
                "{what} failed (Debian: `apt-get install python3-venv`):\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    let _ = std::fs::remove_dir_all(&venv);
    run(
        Command::new("python3").arg("-m").arg("venv").arg(&venv),
        "python3 -m venv",
    )?;
    run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "-r",
            ])
            .arg(posthog_dir().join("requirements.txt")),
        "pip install -r tests/posthog-sdk/requirements.txt",
    )?;
    std::fs::write(&stamp, wanted)?;
    Ok(python)
}
