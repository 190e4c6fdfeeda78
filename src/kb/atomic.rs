//! Crash-safe writes. A knowledge-base directory holds generations (`gen-00000001/`, ...) and a
//! `CURRENT` file naming the live one. A build writes a new generation into a temp dir, fsyncs every
//! file and the dir, renames it into place, then atomically replaces `CURRENT` (temp file, fsync,
//! rename, fsync dir). A kill at any point leaves the previous generation live and intact.

use anyhow::{bail, Context, Result};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Name of the file in a KB root that names the live generation.
pub const CURRENT: &str = "CURRENT";
const GEN_PREFIX: &str = "gen-";
const TMP_PREFIX: &str = ".tmp-gen-";

/// fsync a directory so that renames/creations inside it are durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    // Directories cannot be opened for fsync on Windows; durability there relies on the rename.
    #[cfg(unix)]
    File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("fsync directory {}", dir.display()))?;
    Ok(())
}

/// Write `bytes` to `path` atomically: `path.tmp-<pid>`, fsync, rename, fsync the parent.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = parent.join(format!(
        "{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    {
        let mut f = File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("write {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("fsync {}", tmp.display()))?;
    }
    fs::rename(&tmp, path)
        .with_context(|| format!("rename {} -> {}", tmp.display(), path.display()))?;
    fsync_dir(parent)
}

/// The live generation directory of the KB rooted at `root`, if any.
pub fn current_generation(root: &Path) -> Result<Option<PathBuf>> {
    let cur = root.join(CURRENT);
    if !cur.exists() {
        return Ok(None);
    }
    let name = fs::read_to_string(&cur).with_context(|| format!("read {}", cur.display()))?;
    let name = name.trim();
    if !name.starts_with(GEN_PREFIX) || name.contains('/') || name.contains('\\') {
        bail!(
            "{}: expected a generation name like `gen-00000001`, found {name:?}",
            cur.display()
        );
    }
    let dir = root.join(name);
    if !dir.is_dir() {
        bail!(
            "{} names {name}, but {} is missing",
            cur.display(),
            dir.display()
        );
    }
    Ok(Some(dir))
}

fn generation_number(name: &str) -> Option<u64> {
    name.strip_prefix(GEN_PREFIX)?.parse().ok()
}

/// A generation being written. Dropping it without [`PendingGeneration::commit`] removes the temp dir
/// (a killed process leaves it behind; the next commit in that root cleans it up).
pub struct PendingGeneration {
    root: PathBuf,
    tmp: PathBuf,
    name: String,
    committed: bool,
}

impl PendingGeneration {
    /// Start a new generation under `root` (created if missing).
    pub fn begin(root: &Path) -> Result<Self> {
        if root.exists() && !root.is_dir() {
            bail!("{} exists and is not a directory", root.display());
        }
        if root.is_dir() && !root.join(CURRENT).exists() && fs::read_dir(root)?.next().is_some() {
            let foreign = fs::read_dir(root)?.filter_map(|e| e.ok()).any(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                !(n.starts_with(GEN_PREFIX) || n.starts_with(TMP_PREFIX))
            });
            if foreign {
                bail!(
                    "{} is a non-empty directory that is not a rustrag knowledge base; refusing to write into it",
                    root.display()
                );
            }
        }
        fs::create_dir_all(root).with_context(|| format!("create {}", root.display()))?;
        let mut next = 1;
        for e in fs::read_dir(root)?.filter_map(|e| e.ok()) {
            if let Some(n) = generation_number(&e.file_name().to_string_lossy()) {
                next = next.max(n + 1);
            }
        }
        let name = format!("{GEN_PREFIX}{next:08}");
        let tmp = root.join(format!("{TMP_PREFIX}{next:08}-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        Ok(Self {
            root: root.to_path_buf(),
            tmp,
            name,
            committed: false,
        })
    }

    /// Directory to write this generation's files into.
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// Make the generation live: fsync files and dirs, rename into place, swap `CURRENT`, then remove
    /// older generations and temp dirs left by dead builds. Returns the live generation dir.
    pub fn commit(mut self) -> Result<PathBuf> {
        for e in fs::read_dir(&self.tmp)? {
            let p = e?.path();
            File::open(&p)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("fsync {}", p.display()))?;
        }
        fsync_dir(&self.tmp)?;
        let live = self.root.join(&self.name);
        fs::rename(&self.tmp, &live)
            .with_context(|| format!("rename {} -> {}", self.tmp.display(), live.display()))?;
        fsync_dir(&self.root)?;
        write_file_atomic(
            &self.root.join(CURRENT),
            format!("{}\n", self.name).as_bytes(),
        )?;
        self.committed = true;
        cleanup(&self.root, &self.name);
        Ok(live)
    }
}

impl Drop for PendingGeneration {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Remove generations other than `keep` and temp dirs whose writer process is gone. Best effort:
/// a reader that still maps an old generation keeps its (unlinked) files until it closes them.
fn cleanup(root: &Path, keep: &str) {
    let Ok(rd) = fs::read_dir(root) else { return };
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().to_string();
        let stale = if name.starts_with(GEN_PREFIX) {
            name != keep
        } else if let Some(rest) = name.strip_prefix(TMP_PREFIX) {
            let pid = rest.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
            pid.is_some_and(|pid| pid != std::process::id() && !process_alive(pid))
        } else {
            false
        };
        if stale {
            if let Err(err) = fs::remove_dir_all(e.path()) {
                tracing::warn!("could not remove old {}: {err}", e.path().display());
            }
        }
    }
}

fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true // unknown: keep the dir rather than delete a live build
    }
}
