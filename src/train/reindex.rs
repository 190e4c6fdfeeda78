//! Re-embedding a knowledge base with an encoder that is being trained (ANCE negatives, end-to-end
//! RAG): the current weights are written to a snapshot, a background thread embeds every passage
//! from it (the fused inference path, no gradients), and the trainer swaps the new index in at the
//! first step after it is ready, training on the old one meanwhile. A swap therefore lands at a
//! step that depends on timing; the `index` lines of a run's `metrics.jsonl` record it.

use crate::kb::{KnowledgeBase, Passage};
use crate::retrieve::exact::exact_search;
use crate::retrieve::rows::F32Rows;
use crate::train::retriever::Towers;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Passage embeddings `[rows, dim]` (row-major) of the whole knowledge base, in KB row order.
#[derive(Clone)]
pub struct PassageIndex {
    pub data: Vec<f32>,
    pub dim: usize,
    /// Optimiser step of the weights that embedded it (0: the knowledge base's own embeddings).
    pub weights_step: u64,
}

impl PassageIndex {
    /// The knowledge base's stored embeddings (step 0).
    pub fn from_kb(kb: &KnowledgeBase) -> Self {
        let m = kb.embeddings();
        let mut data = Vec::with_capacity(m.rows() * m.dim());
        m.rows_f32_into(0, m.rows(), &mut data);
        Self {
            data,
            dim: m.dim(),
            weights_step: 0,
        }
    }

    /// Every passage embedded by `towers`' passage encoder (as a knowledge base is built).
    pub fn embed(towers: &Towers, passages: &[Passage], weights_step: u64) -> Result<Self> {
        Ok(Self {
            data: embed_passages(towers, passages, &AtomicBool::new(false))?,
            dim: towers.passage_encoder().dim(),
            weights_step,
        })
    }

    /// Top-`k` rows per query (`queries: [nq, dim]`), best first.
    pub fn search(&self, queries: &Tensor, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        let q: Vec<f32> = queries.flatten_all()?.to_vec1()?;
        let rows = F32Rows {
            data: &self.data,
            dim: self.dim,
        };
        exact_search(&rows, &q, k)
    }

    /// Written as tensor `embeddings` `[rows, dim]` ([`save_embeddings`]).
    pub fn save(&self, path: &Path) -> Result<()> {
        save_embeddings(&self.data, self.dim, path)
    }

    /// Read what [`PassageIndex::save`] wrote; it must have `rows` rows.
    pub fn load(path: &Path, rows: usize, weights_step: u64) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("reading {}", path.display()))?;
        let e = tensors
            .get("embeddings")
            .with_context(|| format!("{}: no `embeddings` tensor", path.display()))?;
        let (n, dim) = e.dims2()?;
        if n != rows {
            bail!(
                "{}: {n} rows, the knowledge base has {rows} passages",
                path.display()
            );
        }
        Ok(Self {
            data: e.flatten_all()?.to_vec1()?,
            dim,
            weights_step,
        })
    }
}

/// Row-major embeddings `[data.len() / dim, dim]` written as safetensors tensor `embeddings`
/// (what [`PassageIndex::load`] reads).
pub fn save_embeddings(data: &[f32], dim: usize, path: &Path) -> Result<()> {
    let t = Tensor::from_slice(data, (data.len() / dim.max(1), dim), &Device::Cpu)?;
    candle_core::safetensors::save(&HashMap::from([("embeddings".to_string(), t)]), path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Embed every passage with `towers`' passage encoder, stopping early when `cancel` is set.
fn embed_passages(towers: &Towers, passages: &[Passage], cancel: &AtomicBool) -> Result<Vec<f32>> {
    let enc = towers.passage_encoder();
    let mut out = Vec::with_capacity(passages.len() * enc.dim());
    for chunk in passages.chunks(256) {
        if cancel.load(Ordering::Relaxed) {
            bail!("cancelled");
        }
        let titles: Vec<&str> = chunk.iter().map(|p| p.title.as_str()).collect();
        let texts: Vec<&str> = chunk.iter().map(|p| p.text.as_str()).collect();
        out.extend(
            enc.encode_passages(&titles, &texts)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
    }
    Ok(out)
}

/// An index swap.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IndexRecord {
    /// The first step trained on the new index.
    pub step: u64,
    /// Step of the weights that embedded it.
    pub weights_step: u64,
    /// Seconds from the snapshot to the swap.
    pub secs: f64,
}

/// A re-embedding running in the background.
struct Running {
    weights_step: u64,
    started: Instant,
    cancel: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Result<Vec<f32>>>,
    dim: usize,
    // Removed when dropped (after the thread has loaded from it or been cancelled).
    _snapshot: tempfile::TempDir,
}

/// At most one background re-embedding of a knowledge base's passages at a time.
pub struct Reindexer {
    passages: Arc<Vec<Passage>>,
    running: Option<Running>,
}

impl Reindexer {
    pub fn new(passages: Arc<Vec<Passage>>) -> Self {
        Self {
            passages,
            running: None,
        }
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Start re-embedding from `towers`' weights after `step` optimiser steps; the snapshot is a
    /// temporary directory under `scratch`.
    pub fn start(&mut self, towers: &Towers, step: u64, scratch: &Path) -> Result<()> {
        self.cancel();
        let snapshot = tempfile::Builder::new()
            .prefix(".snapshot-")
            .tempdir_in(scratch)
            .with_context(|| format!("creating a snapshot directory in {}", scratch.display()))?;
        towers.save(snapshot.path())?;
        let cancel = Arc::new(AtomicBool::new(false));
        let (path, passages, flag) = (
            snapshot.path().to_path_buf(),
            self.passages.clone(),
            cancel.clone(),
        );
        let handle = std::thread::Builder::new()
            .name("reindex".into())
            .spawn(move || embed_passages(&Towers::load_saved(&path, false)?, &passages, &flag))?;
        self.running = Some(Running {
            weights_step: step,
            started: Instant::now(),
            cancel,
            handle,
            dim: towers.passage_encoder().dim(),
            _snapshot: snapshot,
        });
        Ok(())
    }

    /// The finished index, if the background work is done, and its record: `next_step` is the
    /// first step that will train on it.
    pub fn poll(&mut self, next_step: u64) -> Result<Option<(PassageIndex, IndexRecord)>> {
        if !self
            .running
            .as_ref()
            .is_some_and(|r| r.handle.is_finished())
        {
            return Ok(None);
        }
        let r = self.running.take().context("re-indexing")?;
        Self::finish(r, next_step).map(Some)
    }

    /// Wait for the started re-embedding; what [`Reindexer::poll`] returns once it is done.
    pub fn wait(&mut self, next_step: u64) -> Result<(PassageIndex, IndexRecord)> {
        let r = self.running.take().context("no re-indexing started")?;
        Self::finish(r, next_step)
    }

    fn finish(r: Running, next_step: u64) -> Result<(PassageIndex, IndexRecord)> {
        let data = r
            .handle
            .join()
            .map_err(|_| anyhow::anyhow!("the re-indexing thread panicked"))??;
        let record = IndexRecord {
            step: next_step,
            weights_step: r.weights_step,
            secs: r.started.elapsed().as_secs_f64(),
        };
        let index = PassageIndex {
            data,
            dim: r.dim,
            weights_step: r.weights_step,
        };
        Ok((index, record))
    }

    /// Stop the background work (if any) and wait for its thread.
    pub fn cancel(&mut self) {
        if let Some(r) = self.running.take() {
            r.cancel.store(true, Ordering::Relaxed);
            let _ = r.handle.join();
        }
    }
}

impl Drop for Reindexer {
    fn drop(&mut self) {
        self.cancel();
    }
}
