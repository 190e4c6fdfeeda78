//! One writer per knowledge base: an advisory `flock` on `<root>/LOCK`, taken by every writer
//! (`build`, `add`, `reembed`, [`super::write_kb`]) before it reads the generation it starts from
//! and held until its new generation is live. The OS releases it when the holder exits, however it
//! exits (kill -9 included), so there is no stale lock to clean up. The holder's pid is written
//! into the file for the error a second writer gets. Readers never take it.
//!
//! Where `flock` is unavailable (some network filesystems answer ENOLCK/EOPNOTSUPP) the writer goes
//! on unlocked, with a warning: the compare-and-swap in [`super::atomic::PendingGeneration::commit`]
//! still refuses a commit whose starting generation is no longer live. See docs/safety.md.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// Name of the lock file in a KB root.
pub const LOCK_FILE: &str = "LOCK";

/// The writer lock of one KB root (released on drop or process exit).
pub struct WriterLock {
    root: PathBuf,
    /// `None` where the filesystem has no advisory locks: only the generation CAS protects.
    _file: Option<File>,
}

impl WriterLock {
    /// Take the writer lock of the KB at `root` (creating `root` if missing). Another holder is an
    /// error naming the KB and the holder's pid, or, with `wait`, is waited for.
    pub fn acquire(root: &Path, wait: bool) -> Result<Self> {
        super::atomic::check_kb_root(root)?;
        std::fs::create_dir_all(root).with_context(|| format!("create {}", root.display()))?;
        let path = root.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("open the writer lock {}", path.display()))?;
        let file = match flock(&file, false) {
            Ok(()) => Some(file),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let holder = holder_pid(&path);
                if !wait {
                    bail!(
                        "knowledge base {} is being written by another process ({holder}, recorded in {}); \
                         pass --wait to wait for it",
                        root.display(),
                        path.display()
                    );
                }
                tracing::warn!(
                    "waiting for the writer of knowledge base {} ({holder}) to finish",
                    root.display()
                );
                flock(&file, true)
                    .with_context(|| format!("wait for the writer lock {}", path.display()))?;
                Some(file)
            }
            Err(e) if locks_unsupported(&e) => {
                tracing::warn!(
                    "{}: file locks are not supported here ({e}); relying on the generation \
                     compare-and-swap alone (see docs/safety.md)",
                    path.display()
                );
                None
            }
            Err(e) => {
                return Err(e).with_context(|| format!("lock {}", path.display()));
            }
        };
        if let Some(f) = &file {
            record_pid(f).with_context(|| format!("write {}", path.display()))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
            _file: file,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether this process really holds an OS lock (false on filesystems without locks).
    pub fn is_exclusive(&self) -> bool {
        self._file.is_some()
    }
}

fn holder_pid(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().parse::<u32>().is_ok() => format!("pid {}", s.trim()),
        _ => "pid unknown".into(),
    }
}

fn record_pid(f: &File) -> std::io::Result<()> {
    use std::io::{Seek, Write};
    let mut f = f;
    f.set_len(0)?;
    f.seek(std::io::SeekFrom::Start(0))?;
    writeln!(f, "{}", std::process::id())
}

#[cfg(unix)]
fn flock(f: &File, block: bool) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let op = if block {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    loop {
        // SAFETY: `f` is an open file descriptor for the duration of the call.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(not(unix))]
fn flock(_: &File, _: bool) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

fn locks_unsupported(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    if matches!(
        e.raw_os_error(),
        Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS)
    ) {
        return true;
    }
    e.kind() == std::io::ErrorKind::Unsupported
}
