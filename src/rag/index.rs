//! An exact in-memory inner-product index (HF `CustomHFIndex` over `faiss.IndexFlatIP`): passages from a
//! `passages.jsonl` (`{"index", "id", "title", "text"}` per line) and their embeddings
//! (`embeddings.safetensors`, tensor `embeddings` `[N, d]` f32).

use crate::retrieve::exact::exact_search;
use crate::retrieve::rows::F32Rows;
use crate::retrieve::{Hits, Passage, Retriever};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::path::Path;

/// Passages and their embeddings, searched exhaustively by inner product.
pub struct InMemoryIndex {
    pub passages: Vec<Passage>,
    /// Row-major `[N * dim]`.
    embeddings: Vec<f32>,
    dim: usize,
}

#[derive(serde::Deserialize)]
struct PassageLine {
    #[serde(default)]
    index: Option<u64>,
    id: serde_json::Value,
    #[serde(default)]
    title: String,
    text: String,
}

impl InMemoryIndex {
    /// Build from passages and `[N, dim]` embeddings (counts must agree).
    pub fn new(passages: Vec<Passage>, embeddings: Vec<f32>, dim: usize) -> Result<Self> {
        if dim == 0 || embeddings.len() != passages.len() * dim {
            bail!(
                "{} passages but {} embedding values of dim {dim}",
                passages.len(),
                embeddings.len()
            );
        }
        Ok(Self {
            passages,
            embeddings,
            dim,
        })
    }

    /// Load `passages.jsonl` + `embeddings.safetensors` (tensor `embeddings`).
    pub fn load(passages_path: &Path, embeddings_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(passages_path)
            .with_context(|| format!("reading {}", passages_path.display()))?;
        let mut passages = Vec::new();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let p: PassageLine = serde_json::from_str(line).with_context(|| {
                format!("{}:{}: bad passage line", passages_path.display(), n + 1)
            })?;
            if let Some(i) = p.index {
                if i as usize != passages.len() {
                    bail!(
                        "{}:{}: `index` {i} out of order (expected {})",
                        passages_path.display(),
                        n + 1,
                        passages.len()
                    );
                }
            }
            let id = match p.id {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            passages.push(Passage {
                id,
                title: p.title,
                text: p.text,
            });
        }
        let tensors = candle_core::safetensors::load(embeddings_path, &candle_core::Device::Cpu)
            .with_context(|| format!("reading {}", embeddings_path.display()))?;
        let emb = tensors
            .get("embeddings")
            .with_context(|| format!("{}: no tensor `embeddings`", embeddings_path.display()))?;
        let (n, dim) = emb.dims2().with_context(|| {
            format!("{}: `embeddings` must be [N, d]", embeddings_path.display())
        })?;
        if n != passages.len() {
            bail!(
                "{} has {n} embeddings but {} has {} passages",
                embeddings_path.display(),
                passages_path.display(),
                passages.len()
            );
        }
        let flat = emb
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Self::new(passages, flat, dim)
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// All embeddings, row-major `[N * dim]`.
    pub fn embeddings(&self) -> &[f32] {
        &self.embeddings
    }

    /// Embedding of passage `i`.
    pub fn embedding(&self, i: usize) -> &[f32] {
        &self.embeddings[i * self.dim..(i + 1) * self.dim]
    }

    /// Inner products of one query with every passage: `[N]`.
    pub fn scores(&self, query: &[f32]) -> Vec<f32> {
        self.embeddings
            .chunks(self.dim)
            .map(|e| e.iter().zip(query).map(|(a, b)| a * b).sum())
            .collect()
    }
}

impl Retriever for InMemoryIndex {
    fn retrieve(
        &self,
        queries: &[&str],
        query_embeddings: Option<&Tensor>,
        k: usize,
    ) -> Result<Vec<Hits>> {
        let q = query_embeddings.context(
            "the in-memory dense index needs query embeddings (encode the questions first)",
        )?;
        let (b, d) = q.dims2().context("query embeddings must be [batch, dim]")?;
        if d != self.dim {
            bail!(
                "query embeddings have dim {d}, the index has dim {}",
                self.dim
            );
        }
        if b != queries.len() {
            bail!("{} queries but {b} query embeddings", queries.len());
        }
        if k > self.passages.len() {
            bail!(
                "asked for {k} documents but the knowledge base has only {} passages",
                self.passages.len()
            );
        }
        let q = q
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let rows = F32Rows {
            data: &self.embeddings,
            dim: self.dim,
        };
        let embedding = |row: usize| self.embedding(row).to_vec();
        exact_search(&rows, &q, k)?
            .iter()
            .map(|top| Hits::from_rows(top, |row| Ok(self.passages[row].clone()), Some(&embedding)))
            .collect()
    }

    fn len(&self) -> usize {
        self.passages.len()
    }
}
