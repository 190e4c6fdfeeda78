//! Building knowledge bases: ingest -> split -> embed -> write a new generation atomically.
//! Also incremental add of documents and re-embedding with a new context encoder.

use super::atomic::{current_generation_name, GenerationFiles, PendingGeneration};
use super::embeddings::{self, EmbeddingWriter};
use super::ingest::{read_corpus_with, BadRecord, Document, IngestOptions};
use super::lock::WriterLock;
use super::manifest::{
    file_entry, fingerprint_differences, now_unix, EmbeddingDtype, HnswParams, Manifest, FORMAT,
    FORMAT_VERSION,
};
use super::split::{document_id, split_document};
use super::Passage;
use super::{store, KnowledgeBase, HNSW_FILE};
use crate::encoders::{EncoderFingerprint, TextEncoder};
use anyhow::{bail, ensure, Context, Result};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// Words per passage (HF default 100; 0 = do not split).
    pub words_per_passage: usize,
    pub dtype: EmbeddingDtype,
    /// Build and persist an HNSW graph with these parameters.
    pub hnsw: Option<HnswParams>,
    /// Passages per encoder call.
    pub batch_size: usize,
    pub ingest: IngestOptions,
    /// Wait for another writer of the KB to finish instead of failing (see [`super::lock`]).
    pub wait_for_lock: bool,
    /// `add`: replace the passages of documents already in the KB instead of refusing them.
    pub upsert: bool,
}

impl BuildOptions {
    /// Upper bound of `batch_size` (an encoder batch is padded to its longest passage: a bigger
    /// one only costs memory).
    pub const MAX_BATCH_SIZE: usize = 4096;

    /// Error naming the option and its bounds when one is out of them; every writer checks this
    /// before reading anything.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (1..=Self::MAX_BATCH_SIZE).contains(&self.batch_size),
            "--batch-size {} is out of bounds: it must be in 1..={}",
            self.batch_size,
            Self::MAX_BATCH_SIZE
        );
        ensure!(
            self.ingest.max_doc_bytes > 0,
            "--max-doc-bytes must be at least 1"
        );
        if let Some(h) = &self.hnsw {
            h.validate()?;
        }
        Ok(())
    }
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            words_per_passage: 100,
            dtype: EmbeddingDtype::F32,
            hnsw: None,
            batch_size: 32,
            ingest: IngestOptions::default(),
            wait_for_lock: false,
            upsert: false,
        }
    }
}

/// What a build did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BuildReport {
    /// The live generation directory.
    pub dir: PathBuf,
    pub documents: u64,
    pub passages: u64,
    /// Passages added by this call (= `passages` for a fresh build).
    pub added: u64,
    /// Documents of the KB whose passages an `add --upsert` replaced.
    pub replaced_documents: u64,
    pub bad_records: Vec<BadRecord>,
    pub dim: usize,
    pub dtype: EmbeddingDtype,
    pub bytes_on_disk: u64,
    pub embed_seconds: f64,
    pub hnsw_seconds: f64,
    pub total_seconds: f64,
}

/// Progress callback: `(passages embedded so far, total to embed)`.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Ingest `sources`, split, embed with `encoder` and write a new generation of the KB at `out`
/// (previous generation stays live until the new one is complete).
pub fn build(
    out: &Path,
    sources: &[PathBuf],
    encoder: &dyn TextEncoder,
    opts: &BuildOptions,
    progress: Progress,
) -> Result<BuildReport> {
    let t0 = Instant::now();
    opts.validate()?;
    let ReadPassages {
        passages,
        documents,
        bad,
        ..
    } = read_passages(sources, &opts.ingest, opts.words_per_passage, None)?;
    let fp = recorded_fingerprint(encoder);
    let src: Vec<String> = sources.iter().map(|s| s.display().to_string()).collect();
    // Locked after the corpus checks, so a bad corpus leaves nothing behind.
    let lock = WriterLock::acquire(out, opts.wait_for_lock)?;
    let base = current_generation_name(out)?;
    let mut report = write_generation(
        &lock,
        base.as_deref(),
        &passages,
        documents,
        src,
        &fp,
        opts,
        None,
        &mut |batch: &[Passage]| embed(encoder, batch),
        progress,
    )?;
    report.bad_records = bad;
    report.total_seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// Write a KB from passages and precomputed embeddings `[passages.len(), dim]` (row-major f32).
pub fn write_kb(
    out: &Path,
    passages: &[Passage],
    embeddings: &[f32],
    encoder: &EncoderFingerprint,
    opts: &BuildOptions,
) -> Result<BuildReport> {
    let dim = encoder.dim;
    ensure!(
        dim > 0 && embeddings.len() == passages.len() * dim,
        "embeddings hold {} floats, expected {} x {dim}",
        embeddings.len(),
        passages.len()
    );
    check_unique(passages)?;
    let mut next = 0usize;
    let mut from_matrix = |batch: &[Passage]| {
        let s = &embeddings[next * dim..(next + batch.len()) * dim];
        next += batch.len();
        Ok::<_, anyhow::Error>(s.to_vec())
    };
    let t0 = Instant::now();
    opts.validate()?;
    let lock = WriterLock::acquire(out, opts.wait_for_lock)?;
    let base = current_generation_name(out)?;
    let mut r = write_generation(
        &lock,
        base.as_deref(),
        passages,
        passages.len() as u64,
        vec![],
        encoder,
        opts,
        None,
        &mut from_matrix,
        &mut |_, _| {},
    )?;
    r.total_seconds = t0.elapsed().as_secs_f64();
    Ok(r)
}

/// Add the documents of `sources` to the KB at `root`: the new generation holds the old passages with
/// their stored embeddings plus the new ones embedded by `encoder` (which must be the KB's encoder).
/// A document whose id is already in the KB is an error naming it and its source line, unless
/// `opts.upsert`: then its old passages are replaced by the new ones.
pub fn add_documents(
    root: &Path,
    sources: &[PathBuf],
    encoder: &dyn TextEncoder,
    opts: &BuildOptions,
    progress: Progress,
) -> Result<BuildReport> {
    let t0 = Instant::now();
    opts.validate()?;
    drop(KnowledgeBase::open(root)?); // a clear error for a missing KB before any lock file
    let lock = WriterLock::acquire(root, opts.wait_for_lock)?;
    let kb = KnowledgeBase::open(root)?;
    kb.verify_blocks()?; // never copy corrupt data forward under fresh checksums
    let m = kb.manifest().clone();
    let fp = recorded_fingerprint(encoder);
    let differences = fingerprint_differences(&fp, &m.encoder);
    if !differences.is_empty() {
        bail!(
            "encoder {} is not the one that embedded {} ({}); they differ in {}; use `rustrag index build` or re-embed",
            fp.source,
            root.display(),
            m.encoder.source,
            differences.join("; ")
        );
    }
    let mut existing = Existing {
        root,
        upsert: opts.upsert,
        passages: HashMap::new(),
        documents: HashMap::new(),
    };
    // Read once, each block checked once (not per passage).
    let old = kb.passages().all()?;
    for (row, p) in old.iter().enumerate() {
        existing.passages.insert(p.id.clone(), row);
        existing
            .documents
            .entry(document_id(&p.id).to_string())
            .or_default()
            .push(row);
    }
    let read = read_passages(sources, &opts.ingest, m.words_per_passage, Some(&existing))?;
    let (keep, mut passages): (Vec<usize>, Vec<Passage>) = old
        .into_iter()
        .enumerate()
        .filter(|(r, _)| !read.replaced_rows.contains(r))
        .unzip();
    passages.extend(read.passages);
    let mut sources_all = m.sources.clone();
    sources_all.extend(sources.iter().map(|s| s.display().to_string()));
    let opts = BuildOptions {
        words_per_passage: m.words_per_passage,
        dtype: m.dtype,
        hnsw: opts.hnsw.clone().or(m.hnsw.clone()),
        ..opts.clone()
    };
    let mut report = write_generation(
        &lock,
        kb.generation(),
        &passages,
        m.documents + read.documents - read.replaced_documents,
        sources_all,
        &m.encoder,
        &opts,
        Some((&kb, &keep)),
        &mut |batch: &[Passage]| embed(encoder, batch),
        progress,
    )?;
    report.added = (passages.len() - keep.len()) as u64;
    report.replaced_documents = read.replaced_documents;
    report.bad_records = read.bad;
    report.total_seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// The encoder's fingerprint as a manifest records it: a local encoder path is stored absolute, so
/// the KB can be used (and extended) from any directory.
fn recorded_fingerprint(encoder: &dyn TextEncoder) -> EncoderFingerprint {
    let mut fp = encoder.fingerprint();
    let path = Path::new(&fp.source);
    if path.is_relative() && path.exists() {
        if let Ok(abs) = std::fs::canonicalize(path) {
            fp.source = abs.display().to_string();
        }
    }
    fp
}

/// Re-embed every passage of the KB at `root` with a new context encoder (e.g. after training) and
/// make that the live generation; passages and ids are unchanged.
pub fn reembed(
    root: &Path,
    encoder: &dyn TextEncoder,
    opts: &BuildOptions,
    progress: Progress,
) -> Result<BuildReport> {
    let t0 = Instant::now();
    opts.validate()?;
    drop(KnowledgeBase::open(root)?); // a clear error for a missing KB before any lock file
    let lock = WriterLock::acquire(root, opts.wait_for_lock)?;
    let kb = KnowledgeBase::open(root)?;
    kb.verify_blocks()?;
    let m = kb.manifest().clone();
    let passages = kb.passages().all()?;
    let base = kb.generation().map(str::to_string);
    drop(kb);
    let opts = BuildOptions {
        words_per_passage: m.words_per_passage,
        hnsw: opts.hnsw.clone().or(m.hnsw.clone()),
        ..opts.clone()
    };
    let mut r = write_generation(
        &lock,
        base.as_deref(),
        &passages,
        m.documents,
        m.sources,
        &recorded_fingerprint(encoder),
        &opts,
        None,
        &mut |b: &[Passage]| embed(encoder, b),
        progress,
    )?;
    r.total_seconds = t0.elapsed().as_secs_f64();
    Ok(r)
}

/// Encoder batches per `embed` call (and per progress update).
const EMBED_BATCHES_PER_CALL: usize = 16;

fn embed(encoder: &dyn TextEncoder, batch: &[Passage]) -> Result<Vec<f32>> {
    let titles: Vec<&str> = batch.iter().map(|p| p.title.as_str()).collect();
    let texts: Vec<&str> = batch.iter().map(|p| p.text.as_str()).collect();
    let t = encoder.encode_passages(&titles, &texts)?;
    let (rows, dim) = t.dims2().context("encoder output is not [batch, dim]")?;
    ensure!(
        rows == batch.len() && dim == encoder.dim(),
        "encoder returned [{rows}, {dim}] for {} texts, dim {}",
        batch.len(),
        encoder.dim()
    );
    Ok(t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// What new documents may not collide with when they are added to a KB.
struct Existing<'a> {
    root: &'a Path,
    /// Replace the passages of documents already present instead of refusing them.
    upsert: bool,
    /// passage id -> row
    passages: HashMap<String, usize>,
    /// document id -> rows of its passages
    documents: HashMap<String, Vec<usize>>,
}

/// Passages read from a corpus.
struct ReadPassages {
    passages: Vec<Passage>,
    documents: u64,
    bad: Vec<BadRecord>,
    /// Rows of the KB replaced by new versions of their documents (`--upsert`).
    replaced_rows: HashSet<usize>,
    replaced_documents: u64,
}

/// Read `sources` and split each document as it is read (the corpus is held once, as passages);
/// passage ids must be unique among themselves and, for an add, not in the KB (documents already in
/// it are refused, or replaced with `upsert`).
fn read_passages(
    sources: &[PathBuf],
    ingest: &IngestOptions,
    words: usize,
    existing: Option<&Existing>,
) -> Result<ReadPassages> {
    // passage id -> origin of its document
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut out = Vec::new();
    let mut documents = 0u64;
    let mut replaced_rows = HashSet::new();
    let mut replaced_documents = 0u64;
    let bad = read_corpus_with(sources, ingest, &mut |d: Document| {
        documents += 1;
        if let Some(rows) = existing.and_then(|e| e.documents.get(&d.id)) {
            let e = existing.expect("checked");
            if !e.upsert {
                bail!(
                    "{}: document {:?} is already in the knowledge base {} ({} passages); pass --upsert to replace them",
                    d.origin,
                    d.id,
                    e.root.display(),
                    rows.len()
                );
            }
            replaced_rows.extend(rows.iter().copied());
            replaced_documents += 1;
        }
        for p in split_document(&d, words) {
            if let Some(&row) = existing.and_then(|e| e.passages.get(&p.id)) {
                if !replaced_rows.contains(&row) {
                    bail!(
                        "{}: passage id {:?} already exists in the knowledge base",
                        d.origin,
                        p.id
                    );
                }
            }
            if let Some(first) = seen.insert(p.id.clone(), d.origin.clone()) {
                bail!(
                    "{}: passage id {:?} collides with a passage from {first}",
                    d.origin,
                    p.id
                );
            }
            out.push(p);
        }
        Ok(())
    })?;
    Ok(ReadPassages {
        passages: out,
        documents,
        bad,
        replaced_rows,
        replaced_documents,
    })
}

fn check_unique(passages: &[Passage]) -> Result<()> {
    let mut seen = HashMap::new();
    for (i, p) in passages.iter().enumerate() {
        if let Some(j) = seen.insert(p.id.as_str(), i) {
            bail!("duplicate passage id {:?} (rows {j} and {i})", p.id);
        }
    }
    Ok(())
}

/// Write passages, embeddings (rows `0..keep` copied from `previous`, the rest from `embed`), optional
/// HNSW and the manifest into a pending generation that follows `base`, then commit it (which fails
/// if `base` is no longer live).
#[allow(clippy::too_many_arguments)]
fn write_generation(
    lock: &WriterLock,
    base: Option<&str>,
    passages: &[Passage],
    documents: u64,
    sources: Vec<String>,
    fp: &EncoderFingerprint,
    opts: &BuildOptions,
    previous: Option<(&KnowledgeBase, &[usize])>,
    embed: &mut dyn FnMut(&[Passage]) -> Result<Vec<f32>>,
    progress: Progress,
) -> Result<BuildReport> {
    ensure!(!passages.is_empty(), "empty corpus: nothing to write");
    ensure!(opts.batch_size > 0, "batch size must be positive");
    let dim = fp.dim;
    let pending = PendingGeneration::begin(lock, base, GenerationFiles::KnowledgeBase)?;
    let dir = pending.dir().to_path_buf();
    store::write_store(&dir, passages)?;
    let mut writer = EmbeddingWriter::create(&dir, dim, opts.dtype)?;
    let mut start = 0usize;
    if let Some((kb, rows)) = previous {
        ensure!(
            kb.dim() == dim,
            "knowledge base dim {} != encoder dim {dim}",
            kb.dim()
        );
        // Copy runs of consecutive rows, at most 4096 at a time.
        let mut buf = Vec::new();
        let mut i = 0;
        while i < rows.len() {
            let s = rows[i];
            let mut e = s + 1;
            i += 1;
            while i < rows.len() && rows[i] == e && e - s < 4096 {
                e += 1;
                i += 1;
            }
            kb.embeddings().rows_f32_into(s, e, &mut buf);
            writer.append(&buf)?;
        }
        start = rows.len();
    }
    let t_embed = Instant::now();
    let total = (passages.len() - start) as u64;
    progress(0, total);
    // Many batches per encoder call: the encoder sorts a chunk by length before batching, so
    // batches hold passages of similar length (little padding) instead of a random mix.
    for batch in passages[start..].chunks(opts.batch_size * EMBED_BATCHES_PER_CALL) {
        let v = embed(batch)?;
        ensure!(
            v.len() == batch.len() * dim,
            "embedding batch has {} floats, expected {} x {dim}",
            v.len(),
            batch.len()
        );
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            let p = &batch[i / dim];
            bail!(
                "passage {:?} (row {}): the encoder returned {} in its embedding; nothing was written",
                p.id,
                writer.rows() as usize + i / dim,
                v[i]
            );
        }
        writer.append(&v)?;
        progress(writer.rows() - start as u64, total);
    }
    let embed_seconds = t_embed.elapsed().as_secs_f64();
    writer.finish()?;
    let mut hnsw_seconds = 0.0;
    if let Some(params) = &opts.hnsw {
        let t = Instant::now();
        let matrix = super::EmbeddingMatrix::open(&dir, passages.len() as u64, dim, opts.dtype)?;
        let index = super::index::hnsw::HnswIndex::build(&matrix, params)?;
        index.save(&dir.join(HNSW_FILE))?;
        hnsw_seconds = t.elapsed().as_secs_f64();
    }
    let mut files = BTreeMap::new();
    let mut names = vec![
        store::RECORDS_FILE,
        store::OFFSETS_FILE,
        store::IDS_FILE,
        embeddings::file_name(opts.dtype),
    ];
    if opts.hnsw.is_some() {
        names.push(HNSW_FILE);
    }
    for name in names {
        files.insert(name.to_string(), file_entry(&dir.join(name))?);
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        writer: format!("rustrag {}", env!("CARGO_PKG_VERSION")),
        encoder: fp.clone(),
        dim,
        dtype: opts.dtype,
        passages: passages.len() as u64,
        documents,
        words_per_passage: opts.words_per_passage,
        sources,
        files,
        hnsw: opts.hnsw.clone(),
        created_unix: now_unix(),
        // A new generation of an existing KB keeps its τ (it may have been set by hand).
        prior_temperature: previous
            .and_then(|(kb, _)| kb.manifest().prior_temperature)
            .or(Some(super::manifest::default_prior_temperature(fp))),
    };
    manifest.write(&dir)?;
    let bytes_on_disk = manifest.files.values().map(|f| f.bytes).sum::<u64>();
    let live = pending.commit()?;
    Ok(BuildReport {
        dir: live,
        documents,
        passages: passages.len() as u64,
        added: total,
        replaced_documents: 0,
        bad_records: vec![],
        dim,
        dtype: opts.dtype,
        bytes_on_disk,
        embed_seconds,
        hnsw_seconds,
        total_seconds: 0.0,
    })
}
