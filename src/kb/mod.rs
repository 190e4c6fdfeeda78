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

/// A background check's verdict (None while running) and the condition signalled when it lands.
type Verdict = std::sync::Arc<(
    std::sync::Mutex<Option<Result<(), String>>>,
    std::sync::Condvar,
)>;

/// How the block checksums of an opened generation were, or are being, checked.
enum BlockCheck {
    /// All checked on open.
    Done,
    /// Checking in a background thread (KBs over [`VERIFY_ON_OPEN_MAX_BYTES`]); its verdict.
    Background(Verdict),
}

impl BlockCheck {
    fn background(files: MappedFiles) -> Self {
        let state = std::sync::Arc::new((std::sync::Mutex::new(None), std::sync::Condvar::new()));
        let shared = state.clone();
        std::thread::spawn(move || {
            let t = std::time::Instant::now();
            let verdict = check_blocks(&files).map_err(|e| format!("{e:#}"));
            match &verdict {
                Ok(()) => tracing::info!(
                    "block checksums checked in the background in {:.1} s",
                    t.elapsed().as_secs_f64()
                ),
                Err(e) => tracing::error!("knowledge base corrupt: {e}"),
            }
            let (lock, done) = &*shared;
            *lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(verdict);
            done.notify_all();
        });
        Self::Background(state)
    }

    /// The verdict so far: an error once corruption was found, else Ok (also while checking).
    fn so_far(&self) -> Result<()> {
        match self {
            Self::Done => Ok(()),
            Self::Background(state) => match &*state.0.lock().unwrap_or_else(|p| p.into_inner()) {
                Some(Err(e)) => bail!("{e}"),
                _ => Ok(()),
            },
        }
    }

    /// The verdict, waiting for a background check to finish.
    fn wait(&self) -> Result<()> {
        let Self::Background(state) = self else {
            return Ok(());
        };
        let (lock, done) = &**state;
        let mut verdict = lock.lock().unwrap_or_else(|p| p.into_inner());
        while verdict.is_none() {
            verdict = done.wait(verdict).unwrap_or_else(|p| p.into_inner());
        }
        match verdict.as_ref() {
            Some(Err(e)) => bail!("{e}"),
            _ => Ok(()),
        }
    }
}

/// An opened (read-only) knowledge base generation.
pub struct KnowledgeBase {
    root: PathBuf,
    /// Name of the generation opened (`None`: a KB written before generations existed).
    generation: Option<String>,
    /// Block checksums: checked on open, or being checked in the background.
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
        let block_check = if total <= verify_on_open_max_bytes {
            let t = std::time::Instant::now();
            check_blocks(&files)?;
            tracing::debug!(
                "{}: block checksums of {total} bytes checked in {:.1} ms",
                dir.display(),
                t.elapsed().as_secs_f64() * 1e3
            );
            BlockCheck::Done
        } else {
            tracing::info!(
                "{}: {total} bytes of data, over the {verify_on_open_max_bytes}-byte limit for checking on open; checking block checksums in the background",
                dir.display()
            );
            BlockCheck::background(files)
        };
        let hnsw_graph = match &manifest.hnsw {
            Some(_) => Some(store::map(&dir.join(HNSW_FILE))?),
            None => None,
        };
        let store = PassageStore::open(&dir, manifest.passages)?;
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

    /// Corruption found so far: an error once the background check of a large KB has found a bad
    /// block (reads of passages and dense searches then fail with it), else Ok — also while the
    /// check is still running, when reads are served unchecked (about 0.2 s per GB).
    pub fn integrity(&self) -> Result<()> {
        self.block_check
            .so_far()
            .with_context(|| format!("knowledge base {}", self.root.display()))
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
