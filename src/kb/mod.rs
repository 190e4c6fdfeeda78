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
/// are checked by writers before they copy them and by `rustrag index info --verify`.
pub const VERIFY_ON_OPEN_MAX_BYTES: u64 = 4 << 30;

/// Check the block checksums of every data file of the generation in `dir` (files written before
/// block checksums existed are skipped).
fn check_blocks(dir: &Path, manifest: &Manifest) -> Result<()> {
    for (name, entry) in &manifest.files {
        let Some(blocks) = &entry.blocks else {
            continue;
        };
        let path = dir.join(name);
        if entry.bytes == 0 {
            blocks.check(&path, &[])?;
            continue;
        }
        let data = store::map(&path)?;
        blocks.check(&path, &data)?;
    }
    Ok(())
}

/// An opened (read-only) knowledge base generation.
pub struct KnowledgeBase {
    root: PathBuf,
    /// Name of the generation opened (`None`: a KB written before generations existed).
    generation: Option<String>,
    /// Every block checksum was checked when it was opened.
    blocks_verified: bool,
    dir: PathBuf,
    manifest: Manifest,
    store: PassageStore,
    embeddings: EmbeddingMatrix,
}

impl KnowledgeBase {
    /// Open the live generation of the KB at `root`: reads the manifest (format version checked),
    /// maps the passage store and the embeddings and checks their sizes against the manifest.
    ///
    /// Readers take no lock: a writer may make a new generation live, and remove this one, while it
    /// is being opened. Such a failure is retried on the new live generation; once open, the files
    /// are mapped and stay readable whatever writers do.
    pub fn open(root: &Path) -> Result<Self> {
        const ATTEMPTS: usize = 8;
        let mut attempt = 0;
        loop {
            let name = atomic::current_generation_name(root)?;
            match Self::open_generation(root, name.as_deref()) {
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

    fn open_generation(root: &Path, generation: Option<&str>) -> Result<Self> {
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
        let blocks_verified = total <= VERIFY_ON_OPEN_MAX_BYTES;
        if blocks_verified {
            let t = std::time::Instant::now();
            check_blocks(&dir, &manifest)?;
            tracing::debug!(
                "{}: block checksums of {total} bytes checked in {:.1} ms",
                dir.display(),
                t.elapsed().as_secs_f64() * 1e3
            );
        } else {
            tracing::warn!(
                "{}: {total} bytes of data, over the {VERIFY_ON_OPEN_MAX_BYTES}-byte limit for checking on open; run `rustrag index info --verify` to check it",
                dir.display()
            );
        }
        let store = PassageStore::open(&dir, manifest.passages)?;
        let embeddings =
            EmbeddingMatrix::open(&dir, manifest.passages, manifest.dim, manifest.dtype)?;
        Ok(Self {
            root: root.to_path_buf(),
            generation: generation.map(str::to_string),
            blocks_verified,
            dir,
            manifest,
            store,
            embeddings,
        })
    }

    /// Check every block checksum now, unless that was done on open (writers call this before
    /// copying a generation forward, so corruption is never laundered under fresh checksums).
    pub fn verify_blocks(&self) -> Result<()> {
        if self.blocks_verified {
            return Ok(());
        }
        check_blocks(&self.dir, &self.manifest)
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
        self.store.get(row)
    }

    pub fn row_of(&self, id: &str) -> Result<Option<usize>> {
        self.store.row_of(id)
    }

    /// Passage embeddings `[len, dim]`.
    pub fn embeddings(&self) -> &EmbeddingMatrix {
        &self.embeddings
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
