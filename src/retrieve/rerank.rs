//! Two-stage retrieval: a first-stage retriever returns `candidates` passages per question, a
//! cross-encoder ([`CrossEncoder`]) scores each (question, passage) pair, and the `k` best by
//! that score are kept, best first, with the cross-encoder's logit as their score.
//!
//! In the RAG pipeline the reranked score is the calibrated score of the doc prior:
//! p(z | x) = softmax over the kept passages of `rerank_score / τ_rerank`
//! ([`RerankConfig::temperature`], default 1: the logits of a one-label cross-encoder are
//! log-odds of relevance, so τ = 1 reads them as they were trained).

use super::{Hits, Retriever};
use crate::encoders::{joined_passage, CrossEncoder, LoadOptions};
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Cross-encoder reranking settings, with documented defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RerankConfig {
    /// Cross-encoder directory or cached hub id (sentence-transformers `CrossEncoder` layout).
    /// Required.
    pub model: String,
    /// Passages the first stage returns per question; the reranker keeps `k` of them. Default 100.
    pub candidates: usize,
    /// (question, passage) pairs per cross-encoder forward pass. Default 32.
    pub batch_size: usize,
    /// Most tokens of a pair (specials included; longest-first truncation). Default: the
    /// tokenizer's `model_max_length`, capped by the model's positions.
    pub max_length: Option<usize>,
    /// τ_rerank of the doc prior softmax(rerank_score / τ_rerank). Default 1.
    pub temperature: f64,
}

impl Default for RerankConfig {
    fn default() -> Self {
        Self {
            model: String::new(),
            candidates: 100,
            batch_size: 32,
            max_length: None,
            temperature: 1.0,
        }
    }
}

/// Upper bound of [`RerankConfig::candidates`] (every candidate is one cross-encoder pass).
pub const MAX_CANDIDATES: usize = 10_000;

impl RerankConfig {
    /// The settings with `model` and `candidates`, the rest default.
    pub fn new(model: &str, candidates: usize) -> Self {
        Self {
            model: model.into(),
            candidates,
            ..Default::default()
        }
    }

    /// Bounds: a model, 1..=[`MAX_CANDIDATES`] candidates, a positive batch, a positive finite τ.
    pub fn check(&self) -> Result<()> {
        if self.model.is_empty() {
            bail!("rerank: no cross-encoder model given");
        }
        if !(1..=MAX_CANDIDATES).contains(&self.candidates) {
            bail!(
                "rerank candidates {} is out of bounds: it must be in 1..={MAX_CANDIDATES}",
                self.candidates
            );
        }
        if self.batch_size == 0 {
            bail!("rerank batch size must be at least 1");
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!(
                "rerank temperature must be positive and finite, got {}",
                self.temperature
            );
        }
        Ok(())
    }

    /// Load the cross-encoder these settings name.
    pub fn load(&self) -> Result<CrossEncoder> {
        self.check()?;
        CrossEncoder::load(
            &self.model,
            &LoadOptions {
                batch_size: self.batch_size,
                max_length: self.max_length,
                ..Default::default()
            },
        )
    }
}

/// A first-stage retriever followed by a cross-encoder.
pub struct RerankingRetriever {
    first: Box<dyn Retriever>,
    reranker: Arc<CrossEncoder>,
    candidates: usize,
}

impl RerankingRetriever {
    /// `candidates` per question from `first`, reordered by `reranker`.
    pub fn new(first: Box<dyn Retriever>, reranker: Arc<CrossEncoder>, candidates: usize) -> Self {
        Self {
            first,
            reranker,
            candidates: candidates.max(1),
        }
    }

    /// From settings: the cross-encoder is loaded here.
    pub fn from_config(first: Box<dyn Retriever>, config: &RerankConfig) -> Result<Self> {
        Ok(Self::new(
            first,
            Arc::new(config.load()?),
            config.candidates,
        ))
    }
}

impl Retriever for RerankingRetriever {
    /// The `k` best of `max(candidates, k)` first-stage hits by cross-encoder logit (ties keep
    /// the first stage's order); scores are the logits.
    fn retrieve(
        &self,
        queries: &[&str],
        query_embeddings: Option<&Tensor>,
        k: usize,
    ) -> Result<Vec<Hits>> {
        let n = self.candidates.max(k).min(self.first.len());
        let first = self.first.retrieve(queries, query_embeddings, n)?;
        let passages: Vec<Vec<String>> = (first.iter())
            .map(|h| {
                (h.passages.iter())
                    .map(|p| joined_passage(&p.title, &p.text))
                    .collect()
            })
            .collect();
        let pairs: Vec<(&str, &str)> = (queries.iter().zip(&passages))
            .flat_map(|(q, ps)| ps.iter().map(move |p| (*q, p.as_str())))
            .collect();
        let scores = self.reranker.score_pairs(&pairs)?;
        let mut offset = 0;
        let mut out = Vec::with_capacity(first.len());
        for h in first {
            let s = &scores[offset..offset + h.doc_ids.len()];
            offset += h.doc_ids.len();
            let mut order: Vec<usize> = (0..s.len()).collect();
            order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
            order.truncate(k);
            out.push(Hits {
                doc_ids: order.iter().map(|&i| h.doc_ids[i]).collect(),
                scores: order.iter().map(|&i| s[i]).collect(),
                passages: order.iter().map(|&i| h.passages[i].clone()).collect(),
                embeddings: (h.embeddings.as_ref())
                    .map(|e| order.iter().map(|&i| e[i].clone()).collect()),
            });
        }
        Ok(out)
    }

    fn len(&self) -> usize {
        self.first.len()
    }
}
