//! Hybrid retrieval: fuse the ranked lists of two retrievers over the same knowledge base (rows must
//! mean the same passages), typically dense + BM25.
//!
//! - Reciprocal rank fusion (Cormack et al. 2009): `score(d) = Σ_lists 1 / (k + rank(d))`, rank from 1,
//!   `k = 60` by default; a doc missing from a list gets nothing from it.
//! - Weighted score fusion: `score(d) = w · norm(dense(d)) + (1 - w) · norm(sparse(d))` with min-max or
//!   z-score normalisation per query and list; a doc missing from a list takes that list's minimum
//!   normalised score (what it would have had at the bottom of the list).
//!
//! Each retriever is asked for `depth` candidates (at least `k`).

use anyhow::{bail, Result};
use candle_core::Tensor;
use std::collections::HashMap;

use super::{Hits, Passage, Retriever};

/// How scores are normalised before weighted fusion.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ScoreNorm {
    /// `(s - min) / (max - min)` (1 when all scores are equal).
    MinMax,
    /// `(s - mean) / std` (0 when all scores are equal).
    ZScore,
}

/// The fusion rule.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub enum Fusion {
    /// Reciprocal rank fusion with constant `k`.
    Rrf { k: f32 },
    /// `dense_weight · norm(dense) + (1 - dense_weight) · norm(sparse)`.
    Weighted { dense_weight: f32, norm: ScoreNorm },
}

impl Default for Fusion {
    fn default() -> Self {
        Fusion::Rrf { k: 60.0 }
    }
}

/// Dense + sparse fused retriever.
pub struct HybridRetriever {
    dense: Box<dyn Retriever>,
    sparse: Box<dyn Retriever>,
    fusion: Fusion,
    depth: usize,
}

impl HybridRetriever {
    /// `depth`: candidates asked from each retriever per query (raised to `k` when smaller).
    pub fn new(
        dense: Box<dyn Retriever>,
        sparse: Box<dyn Retriever>,
        fusion: Fusion,
        depth: usize,
    ) -> Result<Self> {
        if dense.len() != sparse.len() {
            bail!(
                "hybrid retrieval needs both retrievers over the same knowledge base: dense has {} passages, BM25 has {}",
                dense.len(),
                sparse.len()
            );
        }
        match fusion {
            Fusion::Rrf { k } if k.is_nan() || k < 0.0 => bail!("RRF k must be >= 0, got {k}"),
            Fusion::Weighted { dense_weight, .. } if !(0.0..=1.0).contains(&dense_weight) => {
                bail!("dense weight must be in [0, 1], got {dense_weight}")
            }
            _ => {}
        }
        Ok(Self {
            dense,
            sparse,
            fusion,
            depth,
        })
    }

    pub fn fusion(&self) -> Fusion {
        self.fusion
    }
}

/// Fuse two best-first lists into the top `k` (ties: lower row first).
pub fn fuse(dense: &Hits, sparse: &Hits, fusion: Fusion, k: usize) -> Hits {
    let mut fused: HashMap<u64, f32> = HashMap::new();
    match fusion {
        Fusion::Rrf { k: c } => {
            for hits in [dense, sparse] {
                for (rank, &row) in hits.doc_ids.iter().enumerate() {
                    *fused.entry(row).or_default() += 1.0 / (c + rank as f32 + 1.0);
                }
            }
        }
        Fusion::Weighted { dense_weight, norm } => {
            let d = normalize(&dense.scores, norm);
            let s = normalize(&sparse.scores, norm);
            let d_min = d.iter().copied().fold(f32::INFINITY, f32::min);
            let s_min = s.iter().copied().fold(f32::INFINITY, f32::min);
            let d_of: HashMap<u64, f32> = dense.doc_ids.iter().copied().zip(d).collect();
            let s_of: HashMap<u64, f32> = sparse.doc_ids.iter().copied().zip(s).collect();
            for &row in dense.doc_ids.iter().chain(&sparse.doc_ids) {
                let dv = d_of.get(&row).copied().unwrap_or(d_min);
                let sv = s_of.get(&row).copied().unwrap_or(s_min);
                fused.insert(row, dense_weight * dv + (1.0 - dense_weight) * sv);
            }
        }
    }
    let mut ranked: Vec<(u64, f32)> = fused.into_iter().collect();
    ranked.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(k);

    // Passages (and dense embeddings) come from whichever list holds the row.
    let mut passage: HashMap<u64, &Passage> = HashMap::new();
    let mut embedding: HashMap<u64, &Vec<f32>> = HashMap::new();
    for hits in [sparse, dense] {
        for (i, row) in hits.doc_ids.iter().enumerate() {
            if let Some(p) = hits.passages.get(i) {
                passage.insert(*row, p);
            }
            if let Some(e) = hits.embeddings.as_ref().and_then(|e| e.get(i)) {
                embedding.insert(*row, e);
            }
        }
    }
    let embeddings: Option<Vec<Vec<f32>>> = ranked
        .iter()
        .map(|(row, _)| embedding.get(row).map(|e| (*e).clone()))
        .collect();
    Hits {
        doc_ids: ranked.iter().map(|r| r.0).collect(),
        scores: ranked.iter().map(|r| r.1).collect(),
        passages: ranked
            .iter()
            .filter_map(|(row, _)| passage.get(row).map(|p| (*p).clone()))
            .collect(),
        embeddings,
    }
}

/// Normalise one list's scores.
fn normalize(scores: &[f32], norm: ScoreNorm) -> Vec<f32> {
    if scores.is_empty() {
        return vec![];
    }
    match norm {
        ScoreNorm::MinMax => {
            let (lo, hi) = scores
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &s| {
                    (l.min(s), h.max(s))
                });
            let range = hi - lo;
            scores
                .iter()
                .map(|&s| if range > 0.0 { (s - lo) / range } else { 1.0 })
                .collect()
        }
        ScoreNorm::ZScore => {
            let n = scores.len() as f32;
            let mean = scores.iter().sum::<f32>() / n;
            let std = (scores.iter().map(|s| (s - mean) * (s - mean)).sum::<f32>() / n).sqrt();
            scores
                .iter()
                .map(|&s| if std > 0.0 { (s - mean) / std } else { 0.0 })
                .collect()
        }
    }
}

impl Retriever for HybridRetriever {
    /// `query_embeddings` go to the dense retriever. The fused hits carry embeddings only when every
    /// fused passage came with one (i.e. it was also in the dense list).
    fn retrieve(
        &self,
        queries: &[&str],
        query_embeddings: Option<&Tensor>,
        k: usize,
    ) -> Result<Vec<Hits>> {
        // Candidates beyond the knowledge base's size do not exist (k itself is checked below).
        let depth = self.depth.max(k).min(self.dense.len().max(k));
        let dense = self.dense.retrieve(queries, query_embeddings, depth)?;
        let sparse = self.sparse.retrieve(queries, None, depth)?;
        if dense.len() != queries.len() || sparse.len() != queries.len() {
            bail!(
                "a retriever returned {} / {} result lists for {} queries",
                dense.len(),
                sparse.len(),
                queries.len()
            );
        }
        Ok(dense
            .iter()
            .zip(&sparse)
            .map(|(d, s)| fuse(d, s, self.fusion, k))
            .collect())
    }

    fn len(&self) -> usize {
        self.dense.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hits(rows: &[u64], scores: &[f32]) -> Hits {
        Hits {
            doc_ids: rows.to_vec(),
            scores: scores.to_vec(),
            passages: rows
                .iter()
                .map(|r| Passage {
                    id: format!("p{r}"),
                    title: String::new(),
                    text: String::new(),
                })
                .collect(),
            embeddings: None,
        }
    }

    #[test]
    fn rrf_by_hand() {
        let d = hits(&[1, 2, 3], &[0.9, 0.8, 0.7]);
        let s = hits(&[3, 4, 1], &[12.0, 11.0, 10.0]);
        let f = fuse(&d, &s, Fusion::Rrf { k: 60.0 }, 3);
        // 1: 1/61 + 1/63; 3: 1/63 + 1/61 (tie, lower row first); 2: 1/62; 4: 1/62.
        assert_eq!(f.doc_ids, [1, 3, 2]);
        assert!((f.scores[0] - (1.0 / 61.0 + 1.0 / 63.0)).abs() < 1e-7);
        assert_eq!(f.passages[1].id, "p3");
    }

    #[test]
    fn weighted_minmax_by_hand() {
        let d = hits(&[1, 2], &[0.9, 0.5]);
        let s = hits(&[2, 3], &[10.0, 4.0]);
        let f = fuse(
            &d,
            &s,
            Fusion::Weighted {
                dense_weight: 0.5,
                norm: ScoreNorm::MinMax,
            },
            3,
        );
        // dense norm: 1 -> 1, 2 -> 0; sparse norm: 2 -> 1, 3 -> 0; missing -> 0.
        // 1: 0.5, 2: 0.5, 3: 0.
        assert_eq!(f.doc_ids, [1, 2, 3]);
        assert_eq!(f.scores, [0.5, 0.5, 0.0]);
        let z = fuse(
            &d,
            &s,
            Fusion::Weighted {
                dense_weight: 0.8,
                norm: ScoreNorm::ZScore,
            },
            1,
        );
        assert_eq!(z.doc_ids, [1]);
    }
}
