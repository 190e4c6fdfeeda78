//! Inner products of f32 queries with the stored rows of one embedding matrix (f32 or f16), for
//! graph search; the dot products are [`crate::kernels::dot`]'s.

use crate::kb::{EmbeddingDtype, EmbeddingMatrix};
use crate::kernels::dot;
use half::f16;

enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

/// Scores rows of one embedding matrix against f32 queries.
pub(crate) struct RowScorer<'a> {
    rows: Rows<'a>,
    dim: usize,
}

impl<'a> RowScorer<'a> {
    pub fn new(matrix: &'a EmbeddingMatrix) -> Self {
        let rows = match matrix.dtype() {
            EmbeddingDtype::F32 => Rows::F32(matrix.as_f32().expect("f32 matrix")),
            EmbeddingDtype::F16 => Rows::F16(matrix.as_f16().expect("f16 matrix")),
        };
        Self {
            rows,
            dim: matrix.dim(),
        }
    }

    /// `q · row`, `q: [dim]`.
    #[inline]
    pub fn score(&self, q: &[f32], row: usize) -> f32 {
        let d = self.dim;
        match &self.rows {
            Rows::F32(m) => dot::dot(q, &m[row * d..(row + 1) * d]),
            Rows::F16(m) => dot::dot_f16(q, &m[row * d..(row + 1) * d]),
        }
    }

    /// Scores of four rows at once (four independent memory streams keep more loads in flight).
    #[inline]
    pub fn score4(&self, q: &[f32], rows: [usize; 4]) -> [f32; 4] {
        let d = self.dim;
        match &self.rows {
            Rows::F32(m) => dot::dot4(q, rows.map(|row| &m[row * d..(row + 1) * d])),
            Rows::F16(_) => rows.map(|row| self.score(q, row)),
        }
    }

    /// Hint the CPU to start loading `row` (the next vectors a graph search will score).
    #[inline]
    pub fn prefetch(&self, row: usize) {
        let (ptr, bytes) = match &self.rows {
            Rows::F32(m) => (m[row * self.dim..].as_ptr() as *const u8, 4 * self.dim),
            Rows::F16(m) => (m[row * self.dim..].as_ptr() as *const u8, 2 * self.dim),
        };
        dot::prefetch(ptr, bytes);
    }
}
