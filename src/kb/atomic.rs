//! Crash-safe writes. A knowledge-base directory holds generations (`gen-00000001/`, ...) and a
//! `CURRENT` file naming the live one. A build writes a new generation into a temp dir, fsyncs every
//! file and the dir, renames it into place, then atomically replaces `CURRENT` (temp file, fsync,
//! rename, fsync dir). A kill at any point leaves the previous generation live and intact.
//! Writers hold the KB's [`WriterLock`]; the commit is also a compare-and-swap on the generation
//! the writer started from (see [`PendingGeneration`]).

use anyhow::{bail, Context, Result};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::lock::{WriterLock, LOCK_FILE};

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

/// Name of the live generation (`gen-NNNNNNNN`) of the KB rooted at `root`, if it has one.
pub fn current_generation_name(root: &Path) -> Result<Option<String>> {
    let cur = root.join(CURRENT);
    let name = match fs::read_to_string(&cur) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("read {}", cur.display())),
    };
    let name = name.trim();
    if generation_number(name).is_none() {
        bail!(
            "{}: expected a generation name like `gen-00000001`, found {name:?}",
            cur.display()
        );
    }
    Ok(Some(name.to_string()))
}

/// The live generation directory of the KB rooted at `root`, if any.
pub fn current_generation(root: &Path) -> Result<Option<PathBuf>> {
    let Some(name) = current_generation_name(root)? else {
        return Ok(None);
    };
    let dir = root.join(&name);
    if !dir.is_dir() {
        bail!(
            "{} names {name}, but {} is missing",
            root.join(CURRENT).display(),
            dir.display()
        );
    }
    Ok(Some(dir))
}

fn generation_number(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(GEN_PREFIX)?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn generation_name(n: u64) -> String {
    format!("{GEN_PREFIX}{n:08}")
}

/// Refuse to write a KB into `root` when it is a file, or a non-empty directory that is neither a
/// KB nor the debris of one (generations, temp dirs, the lock).
pub fn check_kb_root(root: &Path) -> Result<()> {
    if root.exists() && !root.is_dir() {
        bail!("{} exists and is not a directory", root.display());
    }
    if root.is_dir() && !root.join(CURRENT).exists() {
        let foreign = fs::read_dir(root)
            .with_context(|| format!("read directory {}", root.display()))?
            .filter_map(|e| e.ok())
            .any(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                !(n.starts_with(GEN_PREFIX) || n.starts_with(TMP_PREFIX) || n == LOCK_FILE)
            });
        if foreign {
            bail!(
                "{} is a non-empty directory that is not a rustrag knowledge base; refusing to write into it",
                root.display()
            );
        }
    }
    Ok(())
}

/// The files a generation holds; a `gen-*` directory with anything else in it is not removed.
const GENERATION_FILES: &[&str] = &[
    super::manifest::MANIFEST_FILE,
    super::manifest::MANIFEST_CRC_FILE,
    super::store::RECORDS_FILE,
    super::store::OFFSETS_FILE,
    super::store::IDS_FILE,
    "embeddings.f32",
    "embeddings.f16",
    super::HNSW_FILE,
];

/// What a generation directory may hold for rustrag to treat it as its own (and remove it once it
/// is superseded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenerationFiles {
    /// Knowledge-base files only ([`GENERATION_FILES`]); anything else marks a user's directory.
    KnowledgeBase,
    /// Anything (an index directory with its own file names, such as the BM25 index's).
    Any,
}

/// Entries of `dir` that a generation does not hold (empty: safe to remove as ours).
fn foreign_entries(dir: &Path, files: GenerationFiles) -> Vec<String> {
    if files == GenerationFiles::Any {
        return vec![];
    }
    match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                !(e.file_type().is_ok_and(|t| t.is_file())
                    && GENERATION_FILES.contains(&n.as_str()))
            })
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect(),
        Err(e) => vec![format!("(unreadable: {e})")],
    }
}

/// A generation being written. Dropping it without [`PendingGeneration::commit`] removes the temp dir
/// (a killed process leaves it behind; the next commit in that root cleans it up).
///
/// The commit is a compare-and-swap: the new generation is numbered `base + 1`, where `base` is the
/// generation the writer started from, and is claimed by renaming the temp dir onto that name (a
/// rename onto an existing non-empty directory fails, atomically, on every POSIX filesystem); then
/// `CURRENT` is re-read and must still name `base`. A writer whose base moved on aborts and writes
/// nothing, lock or no lock.
pub struct PendingGeneration {
    root: PathBuf,
    tmp: PathBuf,
    base: Option<String>,
    name: String,
    files: GenerationFiles,
    committed: bool,
}

impl PendingGeneration {
    /// Start the generation that follows `base` (the live generation the writer read, `None` for a
    /// new KB) under the root of `lock`; `files` says which directories count as rustrag's.
    pub fn begin(lock: &WriterLock, base: Option<&str>, files: GenerationFiles) -> Result<Self> {
        let root = lock.root();
        let next = base.and_then(generation_number).unwrap_or(0) + 1;
        let name = generation_name(next);
        let target = root.join(&name);
        if target.exists() {
            // Not live (it follows the live one): the debris of a commit killed between its rename
            // and its CURRENT swap, or someone's own directory. Only the lock holder may remove it,
            // and only when it holds nothing but generation files.
            let foreign = foreign_entries(&target, files);
            if lock.is_exclusive() && foreign.is_empty() {
                fs::remove_dir_all(&target)
                    .with_context(|| format!("remove unfinished {}", target.display()))?;
            } else {
                bail!(
                    "{} exists but is not the live generation ({}){}; move it out of the knowledge base",
                    target.display(),
                    base.unwrap_or("none"),
                    if foreign.is_empty() {
                        String::new()
                    } else {
                        format!(", and holds files rustrag did not write ({})", foreign.join(", "))
                    }
                );
            }
        }
        // Unique per writer, also within one process; the pid comes last (see `cleanup`).
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = root.join(format!(
            "{TMP_PREFIX}{next:08}-{seq}-{}",
            std::process::id()
        ));
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        Ok(Self {
            root: root.to_path_buf(),
            tmp,
            base: base.map(str::to_string),
            name,
            files,
            committed: false,
        })
    }

    /// Directory to write this generation's files into.
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// Error unless `CURRENT` still names the generation this writer started from.
    fn check_base(&self) -> Result<()> {
        let now = current_generation_name(&self.root)?;
        if now != self.base {
            bail!(
                "knowledge base {} changed while this writer ran (it started from {}, {} is live now): another writer committed first; nothing was written, run this command again",
                self.root.display(),
                self.base.as_deref().unwrap_or("no generation"),
                now.as_deref().unwrap_or("no generation")
            );
        }
        Ok(())
    }

    /// Make the generation live: fsync files and dirs, claim its name by rename, check that the
    /// starting generation is still live, swap `CURRENT`, then remove older generations and temp
    /// dirs left by dead builds. Returns the live generation dir.
    pub fn commit(mut self) -> Result<PathBuf> {
        for e in fs::read_dir(&self.tmp)? {
            let p = e?.path();
            File::open(&p)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("fsync {}", p.display()))?;
        }
        fsync_dir(&self.tmp)?;
        self.check_base()?;
        let live = self.root.join(&self.name);
        if let Err(e) = fs::rename(&self.tmp, &live) {
            if live.exists() {
                self.check_base()?;
                bail!(
                    "knowledge base {}: {} was created by another writer while this one ran; nothing was written, run this command again",
                    self.root.display(),
                    live.display()
                );
            }
            return Err(e)
                .with_context(|| format!("rename {} -> {}", self.tmp.display(), live.display()));
        }
        // From here on the claimed directory is ours: remove it if the swap does not happen.
        self.tmp = live.clone();
        self.check_base()?;
        fsync_dir(&self.root)?;
        write_file_atomic(
            &self.root.join(CURRENT),
            format!("{}\n", self.name).as_bytes(),
        )?;
        self.committed = true;
        cleanup(&self.root, &self.name, self.files);
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

/// Remove generations older than `live` that hold only generation files (anything else — a user's
/// own files, a directory named like a generation — is left with a warning), and temp dirs whose
/// writer process is gone. Best effort: a reader that still maps an old generation keeps its
/// (unlinked) files until it closes them.
fn cleanup(root: &Path, live: &str, files: GenerationFiles) {
    let Ok(rd) = fs::read_dir(root) else { return };
    let live_n = generation_number(live).unwrap_or(0);
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().to_string();
        let stale = if let Some(n) = generation_number(&name) {
            let foreign = foreign_entries(&e.path(), files);
            if n < live_n && !foreign.is_empty() {
                tracing::warn!(
                    "left {} in place: it holds files rustrag did not write ({})",
                    e.path().display(),
                    foreign.join(", ")
                );
            }
            n < live_n && foreign.is_empty()
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
