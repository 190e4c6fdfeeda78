//! Atomic training checkpoints: `<out>/checkpoints/step-NNNNNNN/` is filled in a temporary
//! directory, every file fsynced, renamed into place, and `<out>/checkpoints/latest` replaced
//! atomically ([`crate::kb::atomic`]) to name it. A kill at any point leaves the previous checkpoint
//! named by `latest` and complete. [`crate::train::rag::latest_checkpoint`] reads it back.
//! Also the run directory's JSONL metrics: [`append_jsonl`], [`read_jsonl`], and
//! [`keep_jsonl_until`] for resuming (the lines written after the checkpoint are dropped).

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Write checkpoint `step` of the run in `out`: `fill` writes the files into the directory it is
/// given (files and sub-directories); returns the final directory.
pub fn write_checkpoint(
    out: &Path,
    step: u64,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let root = out.join("checkpoints");
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let name = format!("step-{step:07}");
    let dir = root.join(&name);
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempdir_in(&root)
        .with_context(|| format!("creating a temporary directory in {}", root.display()))?;
    fill(tmp.path())?;
    sync_tree(tmp.path())?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("replacing {}", dir.display()))?;
    }
    let tmp_path = tmp.keep();
    std::fs::rename(&tmp_path, &dir).with_context(|| format!("renaming into {}", dir.display()))?;
    crate::kb::atomic::fsync_dir(&root)?;
    crate::kb::atomic::write_file_atomic(&root.join("latest"), name.as_bytes())?;
    Ok(dir)
}

/// fsync every file under `dir` and the directories themselves.
fn sync_tree(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() {
            sync_tree(&e.path())?;
        } else if t.is_file() {
            std::fs::File::open(e.path())?.sync_all()?;
        }
    }
    crate::kb::atomic::fsync_dir(dir)
}

/// Every record of a JSONL metrics file (missing file: none; errors name file:line).
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: bad metrics line", path.display(), i + 1))
        })
        .collect()
}

/// Append `record` as one JSON line to `path` (created if missing).
pub fn append_jsonl<T: serde::Serialize>(path: &Path, record: &T) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(record)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Rewrite the JSONL file `path` keeping the records for which `keep` holds (a resumed run drops
/// the lines written after its checkpoint).
pub fn keep_jsonl_until<T: serde::Serialize + serde::de::DeserializeOwned>(
    path: &Path,
    keep: impl Fn(&T) -> bool,
) -> Result<()> {
    let mut text = String::new();
    for r in read_jsonl::<T>(path)?.iter().filter(|r| keep(r)) {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The message of a run stopped at `step` by a non-finite `what` (loss, gradient norm), naming the
/// last good checkpoint.
pub fn diverged(step: u64, what: &str, value: f64, last_checkpoint: Option<&Path>) -> String {
    let kept = match last_checkpoint {
        Some(p) => format!("the last good checkpoint is {}", p.display()),
        None => "no checkpoint was written yet".to_string(),
    };
    format!(
        "training stopped at step {step}: the {what} is {value} (diverged: lower the learning rate or enable clipping); {kept}"
    )
}
