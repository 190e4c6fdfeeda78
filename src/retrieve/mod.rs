//! Retrievers: questions -> top-k passages of a knowledge base, with scores (and, for dense retrievers,
//! the passage embeddings so that RAG can recompute differentiable doc scores `q · d`).

pub mod analysis;
pub mod bm25;
pub mod dense;
pub mod hybrid;
pub mod porter;
pub mod rerank;
// The search structures the KB builds (kb::index), under their retrieval names.
pub use crate::kb::index::{exact, hnsw, quantized, rows};

/// The knowledge base's passage type, which every retriever returns.
pub use crate::kb::Passage;
use anyhow::Result;
use candle_core::Tensor;

/// Top-k result for one query, best first.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Hits {
    /// Row indices into the knowledge base: `[k]`.
    pub doc_ids: Vec<u64>,
    /// Retrieval scores: `[k]` (inner product for dense, BM25 for sparse, fused for hybrid).
    pub scores: Vec<f32>,
    /// The passages: `[k]`.
    pub passages: Vec<Passage>,
    /// Passage embeddings `[k][dim]` (dense retrievers only).
    #[serde(skip)]
    pub embeddings: Option<Vec<Vec<f32>>>,
}

impl Hits {
    /// Hits from `(row, score)` pairs (best first), with each row's passage and, when `embedding`
    /// is given, its embedding.
    pub fn from_rows(
        found: &[(u32, f32)],
        passage: impl Fn(usize) -> Result<Passage>,
        embedding: Option<&dyn Fn(usize) -> Vec<f32>>,
    ) -> Result<Self> {
        Ok(Self {
            doc_ids: found.iter().map(|&(row, _)| row as u64).collect(),
            scores: found.iter().map(|&(_, score)| score).collect(),
            passages: found
                .iter()
                .map(|&(row, _)| passage(row as usize))
                .collect::<Result<_>>()?,
            embeddings: embedding.map(|e| found.iter().map(|&(row, _)| e(row as usize)).collect()),
        })
    }
}

/// A batched retriever.
pub trait Retriever: Send + Sync {
    /// Top-`k` hits per query. `queries`: `[batch]` texts; `query_embeddings`: `[batch, dim]` f32 when the
    /// caller has already encoded the questions (RAG does, to keep the gradient path); a dense retriever
    /// without them encodes `queries` itself or fails with a clear error.
    fn retrieve(
        &self,
        queries: &[&str],
        query_embeddings: Option<&Tensor>,
        k: usize,
    ) -> Result<Vec<Hits>>;

    /// Number of passages searchable.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A shared retriever (e.g. an index swapped into a pipeline and also read for its embeddings).
impl<T: Retriever + ?Sized> Retriever for std::sync::Arc<T> {
    fn retrieve(
        &self,
        queries: &[&str],
        query_embeddings: Option<&Tensor>,
        k: usize,
    ) -> Result<Vec<Hits>> {
        (**self).retrieve(queries, query_embeddings, k)
    }

    fn len(&self) -> usize {
        (**self).len()
    }
}
