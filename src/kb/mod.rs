//! The on-disk knowledge base: passages (memory-mapped store), their embeddings (f32 or f16,
//! memory-mapped), an optional HNSW graph and a manifest, written atomically as a generation of a KB
//! directory (see [`atomic`]).
//!
//! Layout: `<root>/CURRENT` names `<root>/gen-NNNNNNNN/`, which holds `manifest.json`,
//! `passages.bin`, `passages.idx`, `ids.idx`, `embeddings.f32|f16` and optionally `hnsw.graph`.

pub mod atomic;
pub mod build;
pub mod embeddings;
pub mod index;
pub mod ingest;
pub mod lock;
pub mod manifest;
pub mod split;
pub mod store;

pub use build::{add_documents, build, reembed, write_kb, BuildOptions, BuildReport};
pub use embeddings::EmbeddingMatrix;
pub use manifest::{EmbeddingDtype, HnswParams, Manifest};
pub use store::PassageStore;

use crate::encoders::EncoderFingerprint;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};

/// One passage of a knowledge base.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Passage {
    /// Stable passage id (e.g. `<doc id>#<chunk>` or the corpus id).
    pub id: String,
    pub title: String,
    pub text: String,
}

/// File name of the persisted HNSW graph inside a generation.
pub const HNSW_FILE: &str = "hnsw.graph";

/// Knowledge bases whose data files total at most this many bytes have every block checksum
/// checked when they are opened (about 0.2 s per GB on 2 cores, see docs/safety.md); larger ones
/// are checked in a background thread started on open ([`KnowledgeBase::integrity`]).
pub const VERIFY_ON_OPEN_MAX_BYTES: u64 = 4 << 30;

/// The data files of a generation that carry block checksums, mapped (an empty file: `None`).
type MappedFiles = Vec<(PathBuf, manifest::BlockChecksums, Option<memmap2::Mmap>)>;

/// Map every data file of the generation in `dir` that has block checksums (files written before
/// block checksums existed are skipped). Mapping at open keeps them readable for a background
/// check even if a writer removes the generation afterwards.
fn map_checked_files(dir: &Path, manifest: &Manifest) -> Result<MappedFiles> {
    let mut out = Vec::new();
    for (name, entry) in &manifest.files {
        let Some(blocks) = &entry.blocks else {
            continue;
        };
        let path = dir.join(name);
        let data = match entry.bytes {
            0 => None,
            _ => Some(store::map(&path)?),
        };
        out.push((path, blocks.clone(), data));
    }
    Ok(out)
}

fn check_blocks(files: &MappedFiles) -> Result<()> {
    for (path, blocks, data) in files {
        blocks.check(path, data.as_deref().unwrap_or(&[]))?;
    }
    Ok(())
}

/// Default seconds between re-checks of an opened KB's blocks by a long-running reader
/// ([`KnowledgeBase::scrub_every`]; `rustrag serve --kb-scrub-interval-s`): 6 hours.
pub const DEFAULT_SCRUB_INTERVAL_S: u64 = 6 * 3600;

/// Who ran a full check of the blocks (for the logs).
#[derive(Clone, Copy)]
enum CheckKind {
    Open,
    Background,
    Scrub,
}

/// What the full checks of an opened KB's blocks found so far: the state behind
/// [`KnowledgeBase::integrity`], shared by the check on open, the background check of a large KB
/// and the periodic re-checks.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct IntegrityStatus {
    /// Full checks of every block finished since the KB was opened (0 while the first one runs in
    /// the background).
    pub checks: u64,
    /// When the last full check finished (unix seconds).
    pub last_check_unix: Option<u64>,
    /// How long it took.
    pub last_check_seconds: Option<f64>,
    /// Seconds between re-checks (0: none scheduled).
    pub scrub_interval_s: f64,
    /// The corruption found (file, block and byte range): once set, every passage read and dense
    /// search of this KB fails with it until the KB is reopened.
    pub error: Option<String>,
}

/// The mapped files and the one verdict every full check of them updates.
struct Checked {
    dir: PathBuf,
    files: MappedFiles,
    status: Mutex<IntegrityStatus>,
    /// Signalled when a full check lands.
    landed: Condvar,
    /// One full check at a time.
    running: Mutex<()>,
}

impl Checked {
    fn status(&self) -> MutexGuard<'_, IntegrityStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Check every block and record the verdict; a KB found corrupt stays so (not re-checked).
    fn run(&self, kind: CheckKind) -> Result<()> {
        let _one = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = &self.status().error {
            bail!("{e}");
        }
        let t = std::time::Instant::now();
        let verdict = match kind {
            // A re-check runs beside the requests of a server: one core, not all of them.
            CheckKind::Scrub => rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .thread_name(|_| "rustrag-kb-scrub".into())
                .build()
                .context("starting the re-check thread")?
                .install(|| check_blocks(&self.files)),
            CheckKind::Open | CheckKind::Background => check_blocks(&self.files),
        };
        let seconds = t.elapsed().as_secs_f64();
        {
            let mut s = self.status();
            s.checks += 1;
            s.last_check_unix = Some(manifest::now_unix());
            s.last_check_seconds = Some(seconds);
            if let Err(e) = &verdict {
                s.error = Some(format!("{e:#}"));
            }
        }
        self.landed.notify_all();
        let (dir, ms) = (self.dir.display(), seconds * 1e3);
        let bytes: usize = self
            .files
            .iter()
            .map(|(_, _, d)| d.as_ref().map_or(0, |m| m.len()))
            .sum();
        match (&verdict, kind) {
            // The caller of open reports its own error.
            (Err(_), CheckKind::Open) => {}
            (Err(e), _) => tracing::error!("knowledge base corrupt: {e:#}"),
            (Ok(()), CheckKind::Open) => {
                tracing::debug!(
                    "{dir}: block checksums of {bytes} bytes checked on open in {ms:.1} ms"
                )
            }
            (Ok(()), CheckKind::Background) => tracing::info!(
                "{dir}: block checksums of {bytes} bytes checked in the background in {ms:.1} ms"
            ),
            (Ok(()), CheckKind::Scrub) => {
                tracing::info!(
                    "{dir}: block checksums of {bytes} bytes re-checked in {ms:.1} ms: intact"
                )
            }
        }
        verdict
    }
}

/// How the block checksums of an opened generation are checked: on open or in a background
/// thread, then again whenever asked ([`KnowledgeBase::scrub`]) or periodically.
struct BlockCheck {
    checked: Arc<Checked>,
    /// The periodic re-check thread's line: dropping it (with the KB, or for a new interval)
    /// ends the thread at once, however long its interval.
    scrubber: Mutex<Option<mpsc::Sender<()>>>,
}

impl BlockCheck {
    fn new(dir: &Path, files: MappedFiles) -> Self {
        Self {
            checked: Arc::new(Checked {
                dir: dir.to_path_buf(),
                files,
                status: Default::default(),
                landed: Default::default(),
                running: Default::default(),
            }),
            scrubber: Default::default(),
        }
    }

    fn background(&self) {
        let checked = self.checked.clone();
        std::thread::spawn(move || checked.run(CheckKind::Background));
    }

    /// Every `every`, re-check all blocks in a thread of its own (zero: stop).
    fn scrub_every(&self, every: std::time::Duration) {
        let mut slot = self.scrubber.lock().unwrap_or_else(|p| p.into_inner());
        *slot = None;
        self.checked.status().scrub_interval_s = every.as_secs_f64();
        if every.is_zero() {
            return;
        }
        let (line, hangup) = mpsc::channel::<()>();
        let checked = self.checked.clone();
        std::thread::spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = hangup.recv_timeout(every) {
                if checked.run(CheckKind::Scrub).is_err() {
                    return; // failed for good; nothing more to find
                }
            }
        });
        *slot = Some(line);
    }

    /// The verdict so far: an error once corruption was found, else Ok (also while checking).
    fn so_far(&self) -> Result<()> {
        match &self.checked.status().error {
            Some(e) => bail!("{e}"),
            None => Ok(()),
        }
    }

    /// The verdict, waiting for the first full check to finish.
    fn wait(&self) -> Result<()> {
        let mut s = self.checked.status();
        while s.checks == 0 {
            s = self
                .checked
                .landed
                .wait(s)
                .unwrap_or_else(|p| p.into_inner());
        }
        match &s.error {
            Some(e) => bail!("{e}"),
            None => Ok(()),
        }
    }
}

/// An opened (read-only) knowledge base generation.
pub struct KnowledgeBase {
    root: PathBuf,
    /// Name of the generation opened (`None`: a KB written before generations existed).
    generation: Option<String>,
    /// Block checksums: checked on open or in the background, re-checked when asked.
    block_check: BlockCheck,
    dir: PathBuf,
    manifest: Manifest,
    store: PassageStore,
    embeddings: EmbeddingMatrix,
    /// `hnsw.graph`, mapped on open (a reader keeps it even if cleanup removes the generation).
    hnsw_graph: Option<memmap2::Mmap>,
}

impl KnowledgeBase {
    /// Open the live generation of the KB at `root`: reads the manifest (format version checked),
    /// maps the passage store and the embeddings and checks their sizes against the manifest.
    ///
    /// Readers take no lock: a writer may make a new generation live, and remove this one, while it
    /// is being opened. Such a failure is retried on the new live generation; once open, the files
    /// are mapped and stay readable whatever writers do.
    pub fn open(root: &Path) -> Result<Self> {
        Self::open_with(root, VERIFY_ON_OPEN_MAX_BYTES)
    }

    /// [`KnowledgeBase::open`], checking block checksums on open only when the data files total
    /// at most `verify_on_open_max_bytes` (else in the background).
    pub fn open_with(root: &Path, verify_on_open_max_bytes: u64) -> Result<Self> {
        const ATTEMPTS: usize = 8;
        let mut attempt = 0;
        loop {
            let name = atomic::current_generation_name(root)?;
            match Self::open_generation(root, name.as_deref(), verify_on_open_max_bytes) {
                Ok(kb) => return Ok(kb),
                Err(e) => {
                    attempt += 1;
                    let moved = atomic::current_generation_name(root).ok().flatten() != name;
                    if !moved || attempt == ATTEMPTS {
                        return Err(e);
                    }
                    tracing::debug!(
                        "{}: generation replaced while opening it ({e:#}); retrying",
                        root.display()
                    );
                }
            }
        }
    }

    fn open_generation(
        root: &Path,
        generation: Option<&str>,
        verify_on_open_max_bytes: u64,
    ) -> Result<Self> {
        let dir = match generation {
            Some(name) => {
                let dir = root.join(name);
                if !dir.is_dir() {
                    bail!(
                        "{} names {name}, but {} is missing",
                        root.join(atomic::CURRENT).display(),
                        dir.display()
                    );
                }
                dir
            }
            None if root.join(manifest::MANIFEST_FILE).exists() => root.to_path_buf(),
            None => bail!("{} is not a rustrag knowledge base (no {} file); build one with `rustrag index build`", root.display(), atomic::CURRENT),
        };
        let manifest = Manifest::load(&dir)?;
        for (name, entry) in &manifest.files {
            let p = dir.join(name);
            let len = std::fs::metadata(&p)
                .with_context(|| format!("knowledge base file {} is missing", p.display()))?
                .len();
            if len != entry.bytes {
                bail!(
                    "{}: {len} bytes, the manifest records {} (corrupt or partially copied)",
                    p.display(),
                    entry.bytes
                );
            }
        }
        let total: u64 = manifest.files.values().map(|f| f.bytes).sum();
        let files = map_checked_files(&dir, &manifest)?;
        let block_check = BlockCheck::new(&dir, files);
        if total <= verify_on_open_max_bytes {
            block_check.checked.run(CheckKind::Open)?;
        } else {
            tracing::info!(
                "{}: {total} bytes of data, over the {verify_on_open_max_bytes}-byte limit for checking on open; checking block checksums in the background",
                dir.display()
            );
            block_check.background();
        }
        let hnsw_graph = match &manifest.hnsw {
            Some(_) => Some(store::map(&dir.join(HNSW_FILE))?),
            None => None,
        };
        let store = PassageStore::open(&dir, &manifest)?;
        let embeddings =
            EmbeddingMatrix::open(&dir, manifest.passages, manifest.dim, manifest.dtype)?;
        Ok(Self {
            root: root.to_path_buf(),
            generation: generation.map(str::to_string),
            block_check,
            hnsw_graph,
            dir,
            manifest,
            store,
            embeddings,
        })
    }

    /// Every block checksum, checked: done on open, or the background check's verdict, waited
    /// for (writers call this before copying a generation forward, so corruption is never
    /// laundered under fresh checksums).
    pub fn verify_blocks(&self) -> Result<()> {
        self.block_check.wait()
    }

    /// Corruption found so far: an error once a full check (the background check of a large KB,
    /// or a re-check: [`KnowledgeBase::scrub`]) has found a bad block (reads of passages and dense
    /// searches then fail with it), else Ok — also while the background check is still running,
    /// when only the blocks of the passages read are checked (about 0.2 s per GB).
    pub fn integrity(&self) -> Result<()> {
        self.block_check
            .so_far()
            .with_context(|| format!("knowledge base {}", self.root.display()))
    }

    /// The full checks of this KB's blocks so far: how many, the last one's time and duration,
    /// the re-check interval, and the corruption found, if any.
    pub fn integrity_status(&self) -> IntegrityStatus {
        self.block_check.checked.status().clone()
    }

    /// Re-check every block of the files mapped on open, now (one core; about 0.1 s per GB):
    /// a mapped file sees bytes changed on disk after it was opened (bit rot, an edit in place),
    /// which the check on open cannot. On a mismatch the KB is failed for good, as by the
    /// background check: [`KnowledgeBase::integrity`] and every passage read and dense search
    /// return the error, naming the file, the block and its byte range.
    pub fn scrub(&self) -> Result<()> {
        self.block_check
            .checked
            .run(CheckKind::Scrub)
            .with_context(|| format!("knowledge base {}", self.root.display()))
    }

    /// Run [`KnowledgeBase::scrub`] every `every` in a background thread, for long-running
    /// readers (`rustrag serve`), until the KB is dropped or this is called again; zero: never.
    /// The thread stops at the first corruption found.
    pub fn scrub_every(&self, every: std::time::Duration) {
        self.block_check.scrub_every(every)
    }

    /// Recompute the sha256 of every data file and compare with the manifest.
    pub fn verify(&self) -> Result<()> {
        for (name, entry) in &self.manifest.files {
            let got = manifest::file_entry(&self.dir.join(name))?;
            if got.sha256 != entry.sha256 {
                bail!(
                    "{}: checksum mismatch (manifest {}, file {})",
                    self.dir.join(name).display(),
                    entry.sha256,
                    got.sha256
                );
            }
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Name of the generation in use (`gen-NNNNNNNN`), the base of a writer that starts from it.
    pub fn generation(&self) -> Option<&str> {
        self.generation.as_deref()
    }

    /// The generation directory in use.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn len(&self) -> usize {
        self.store.len()
    }

    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    pub fn dim(&self) -> usize {
        self.manifest.dim
    }

    pub fn passages(&self) -> &PassageStore {
        &self.store
    }

    pub fn passage(&self, row: usize) -> Result<Passage> {
        self.integrity()?;
        self.store.get(row)
    }

    pub fn row_of(&self, id: &str) -> Result<Option<usize>> {
        self.store.row_of(id)
    }

    /// Passage embeddings `[len, dim]`.
    pub fn embeddings(&self) -> &EmbeddingMatrix {
        &self.embeddings
    }

    /// The persisted HNSW graph's bytes (mapped on open), when the KB has one.
    pub fn hnsw_graph(&self) -> Option<&[u8]> {
        self.hnsw_graph.as_deref()
    }

    /// Path of the persisted HNSW graph, when the KB has one.
    pub fn hnsw_path(&self) -> Option<PathBuf> {
        self.manifest
            .hnsw
            .as_ref()
            .map(|_| self.dir.join(HNSW_FILE))
    }

    /// Refuse a query encoder that does not match the encoder recorded in the manifest.
    pub fn check_query_encoder(&self, q: &EncoderFingerprint) -> Result<()> {
        self.manifest
            .check_query_encoder(q)
            .with_context(|| format!("knowledge base {}", self.root.display()))
    }

    /// Bytes on disk of this generation's files.
    pub fn bytes_on_disk(&self) -> u64 {
        self.manifest.files.values().map(|f| f.bytes).sum::<u64>()
            + std::fs::metadata(self.dir.join(manifest::MANIFEST_FILE))
                .map(|m| m.len())
                .unwrap_or(0)
    }
}
