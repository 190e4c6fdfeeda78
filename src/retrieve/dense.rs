//! Dense retrieval behind [`DenseRetriever`]: exact inner-product search over the memory-mapped
//! embedding matrix, or HNSW. Exact search runs on the KB's quantised copy
//! ([`super::quantized::QuantizedEmbeddings`]: integer pass, f32 for the survivors), which must
//! equal [`exact_search`], the plain f32 scan of [`super::exact`] that small in-memory indexes use.

pub use super::exact::exact_search;
use super::hnsw::HnswIndex;
use super::quantized::QuantizedEmbeddings;
pub use super::rows::{DenseRows, F32Rows};
use super::{Hits, Retriever};
use crate::encoders::TextEncoder;
use crate::kb::KnowledgeBase;
use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;
use std::sync::{Arc, OnceLock};

/// How a [`DenseRetriever`] searches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SearchMode {
    Exact,
    Hnsw { ef_search: usize },
}

/// Dense retriever over a knowledge base: exact search, or HNSW when the KB has a graph.
pub struct DenseRetriever {
    kb: Arc<KnowledgeBase>,
    encoder: Option<Arc<dyn TextEncoder>>,
    hnsw: Option<HnswIndex>,
    /// The integer copy that exact search scans and HNSW walks, built on the first search.
    quantized: OnceLock<QuantizedEmbeddings>,
    mode: SearchMode,
    /// Return the `[k][dim]` passage embeddings with the hits (RAG needs them).
    pub return_embeddings: bool,
}

impl DenseRetriever {
    /// `encoder` (the question encoder) is checked against the KB manifest; without it, callers must
    /// pass query embeddings. `ef_search: None` = exact search; `Some(ef)` needs a KB built with HNSW.
    pub fn new(
        kb: Arc<KnowledgeBase>,
        encoder: Option<Arc<dyn TextEncoder>>,
        ef_search: Option<usize>,
    ) -> Result<Self> {
        if let Some(e) = &encoder {
            kb.check_query_encoder(&e.fingerprint())?;
        }
        let (hnsw, mode) = match ef_search {
            None => (None, SearchMode::Exact),
            Some(ef) => {
                let (path, graph) = kb.hnsw_path().zip(kb.hnsw_graph()).with_context(|| {
                    format!(
                        "{} has no HNSW index; rebuild with `--hnsw` or search with `--exact`",
                        kb.root().display()
                    )
                })?;
                (
                    Some(HnswIndex::from_bytes(graph, &path, kb.embeddings(), ef)?),
                    SearchMode::Hnsw { ef_search: ef },
                )
            }
        };
        Ok(Self {
            kb,
            encoder,
            hnsw,
            quantized: OnceLock::new(),
            mode,
            return_embeddings: true,
        })
    }

    pub fn knowledge_base(&self) -> &KnowledgeBase {
        &self.kb
    }

    pub fn mode(&self) -> SearchMode {
        self.mode
    }

    /// Top-`k` `(row, score)` per query for query embeddings `[nq, dim]` row-major.
    /// A score that is NaN or infinite is an error naming the row (corrupt data is never served).
    pub fn search(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        self.kb.integrity()?;
        ensure!(
            queries.iter().all(|x| x.is_finite()),
            "a question embedding is not finite (NaN or infinite values from the encoder)"
        );
        let found = match (&self.hnsw, self.mode) {
            (Some(h), SearchMode::Hnsw { ef_search }) => {
                h.set_ef_search(ef_search.max(k));
                h.search(self.kb.embeddings(), Some(self.quantized()), queries, k)?
            }
            _ => self.quantized().search(self.kb.embeddings(), queries, k)?,
        };
        if let Some(&(row, score)) = found.iter().flatten().find(|(_, s)| !s.is_finite()) {
            bail!(
                "knowledge base {}: passage row {row} scores {score}: its embedding is corrupt (run `rustrag index info --verify`)",
                self.kb.dir().display()
            );
        }
        Ok(found)
    }

    /// The KB's integer copy (built on first use: a few ms per 10k rows).
    fn quantized(&self) -> &QuantizedEmbeddings {
        self.quantized.get_or_init(|| {
            let t = std::time::Instant::now();
            let q = QuantizedEmbeddings::build(self.kb.embeddings());
            tracing::info!(
                "quantised {} embeddings in {:.2}s ({} MB)",
                q.rows(),
                t.elapsed().as_secs_f64(),
                q.memory_usage() >> 20
            );
            q
        })
    }

    fn query_matrix(
        &self,
        queries: &[&str],
        query_embeddings: Option<&Tensor>,
    ) -> Result<Vec<f32>> {
        let t = match (query_embeddings, &self.encoder) {
            (Some(t), _) => t.clone(),
            (None, Some(enc)) => enc.encode_texts(queries)?,
            (None, None) => bail!("dense retriever has no question encoder: pass query embeddings"),
        };
        let (b, d) = t.dims2().context("query embeddings must be [batch, dim]")?;
        ensure!(
            d == self.kb.dim(),
            "query embeddings have dim {d}, the knowledge base has dim {}",
            self.kb.dim()
        );
        ensure!(
            queries.is_empty() || b == queries.len(),
            "{b} query embeddings for {} queries",
            queries.len()
        );
        Ok(t.to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }
}

impl Retriever for DenseRetriever {
    fn retrieve(
        &self,
        queries: &[&str],
        query_embeddings: Option<&Tensor>,
        k: usize,
    ) -> Result<Vec<Hits>> {
        let q = self.query_matrix(queries, query_embeddings)?;
        let found = self.search(&q, k)?;
        let embedding = |row: usize| self.kb.embeddings().row(row);
        found
            .iter()
            .map(|hits| {
                Hits::from_rows(
                    hits,
                    |row| self.kb.passage(row),
                    self.return_embeddings
                        .then_some(&embedding as &dyn Fn(usize) -> Vec<f32>),
                )
            })
            .collect()
    }

    fn len(&self) -> usize {
        self.kb.len()
    }
}
