//! HNSW graph for inner-product search, on usearch (persisted next to the embeddings, memory-mapped
//! when served). Scores are inner products (usearch reports `1 - ip`).

use crate::kb::{EmbeddingDtype, EmbeddingMatrix, HnswParams};
use anyhow::{anyhow, ensure, Context, Result};
use rayon::prelude::*;
use std::path::Path;
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

pub struct HnswIndex {
    index: Index,
    dim: usize,
}

fn err<E: std::fmt::Display>(what: String) -> impl FnOnce(E) -> anyhow::Error {
    move |e| anyhow!("{what}: {e}")
}

impl HnswIndex {
    /// Build over all rows of `matrix` (keys = row numbers), adding in parallel.
    pub fn build(matrix: &EmbeddingMatrix, p: &HnswParams) -> Result<Self> {
        ensure!(p.m >= 2, "HNSW M must be at least 2 (got {})", p.m);
        let opts = IndexOptions {
            dimensions: matrix.dim(),
            metric: MetricKind::IP,
            quantization: match matrix.dtype() {
                EmbeddingDtype::F32 => ScalarKind::F32,
                EmbeddingDtype::F16 => ScalarKind::F16,
            },
            connectivity: p.m,
            expansion_add: p.ef_construction,
            expansion_search: p.ef_search,
            multi: false,
        };
        let index = Index::new(&opts).map_err(err("create usearch index".into()))?;
        let threads = rayon::current_num_threads();
        index
            .reserve_capacity_and_threads(matrix.rows(), threads)
            .map_err(err(format!("reserve {} vectors", matrix.rows())))?;
        let dim = matrix.dim();
        match (matrix.as_f32(), matrix.as_f16()) {
            (Some(m), _) => m.par_chunks(dim).enumerate().try_for_each(|(row, v)| {
                index
                    .add(row as u64, v)
                    .map_err(err(format!("add row {row}")))
            })?,
            (_, Some(m)) => m.par_chunks(dim).enumerate().try_for_each(|(row, v)| {
                index
                    .add(row as u64, usearch::f16::from_i16s(bytes_as_i16(v)))
                    .map_err(err(format!("add row {row}")))
            })?,
            _ => unreachable!("matrix is f32 or f16"),
        }
        Ok(Self { index, dim })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let s = path
            .to_str()
            .with_context(|| format!("{}: non UTF-8 path", path.display()))?;
        self.index
            .save(s)
            .map_err(err(format!("save HNSW to {}", path.display())))
    }

    /// Memory-map a saved graph; its vectors are served from the file.
    pub fn open(path: &Path, ef_search: usize) -> Result<Self> {
        let s = path
            .to_str()
            .with_context(|| format!("{}: non UTF-8 path", path.display()))?;
        let index = Index::restore_view(s).map_err(err(format!("open HNSW {}", path.display())))?;
        index.change_expansion_search(ef_search);
        let dim = index.dimensions();
        Ok(Self { index, dim })
    }

    /// Candidate list size during search (`ef_search`); applies to later searches.
    pub fn set_ef_search(&self, ef: usize) {
        if self.index.expansion_search() != ef {
            self.index.change_expansion_search(ef);
        }
    }

    pub fn len(&self) -> usize {
        self.index.size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn memory_usage(&self) -> usize {
        self.index.memory_usage()
    }

    /// Top-`k` `(row, inner product)` per query; `queries`: `[nq, dim]` row-major.
    pub fn search(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        ensure!(
            queries.len().is_multiple_of(self.dim),
            "query batch of {} floats is not a multiple of dim {}",
            queries.len(),
            self.dim
        );
        queries
            .par_chunks(self.dim)
            .map(|q| {
                let m = self.index.search(q, k).map_err(err("HNSW search".into()))?;
                Ok(m.keys
                    .iter()
                    .zip(&m.distances)
                    .map(|(&key, &d)| (key as u32, 1.0 - d))
                    .collect())
            })
            .collect()
    }
}

fn bytes_as_i16(v: &[half::f16]) -> &[i16] {
    // SAFETY: f16 is a transparent 16-bit value; same size and alignment as i16.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const i16, v.len()) }
}
