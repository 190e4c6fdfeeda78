//! The rows a dense search scans ([`DenseRows`]): a knowledge base's embedding matrix or f32 rows
//! in memory. Its own module so that the exact scan, its quantised first pass and the
//! HNSW graph can all take rows without importing each other.

use crate::kb::{EmbeddingDtype, EmbeddingMatrix};

/// Rows an exact search scans: a knowledge base's embedding matrix, or f32 rows in memory.
pub trait DenseRows: Sync {
    fn rows(&self) -> usize;
    fn dim(&self) -> usize;
    /// Rows `start..end` as f32 `[(end - start) * dim]`, converted into `buf` if stored otherwise.
    fn block<'a>(&'a self, start: usize, end: usize, buf: &'a mut Vec<f32>) -> &'a [f32];
}

impl DenseRows for EmbeddingMatrix {
    fn rows(&self) -> usize {
        EmbeddingMatrix::rows(self)
    }
    fn dim(&self) -> usize {
        EmbeddingMatrix::dim(self)
    }
    fn block<'a>(&'a self, start: usize, end: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
        let d = EmbeddingMatrix::dim(self);
        match self.dtype() {
            EmbeddingDtype::F32 => &self.as_f32().expect("f32")[start * d..end * d],
            EmbeddingDtype::F16 => {
                self.rows_f32_into(start, end, buf);
                buf
            }
        }
    }
}

/// Row-major f32 rows in memory, `data: [rows, dim]`.
pub struct F32Rows<'a> {
    pub data: &'a [f32],
    pub dim: usize,
}

impl DenseRows for F32Rows<'_> {
    fn rows(&self) -> usize {
        self.data.len() / self.dim.max(1)
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn block<'a>(&'a self, start: usize, end: usize, _: &'a mut Vec<f32>) -> &'a [f32] {
        &self.data[start * self.dim..end * self.dim]
    }
}
