//! Exact inner-product search with a quantised first pass.
//!
//! Every row is quantised once and each query per search to 12-bit integer codes (per-vector
//! scale), so `vpmaddwd` multiplies 16 pairs per instruction and the sums cannot overflow i32 for
//! any dim up to 512 (`512 · 2047² < 2³¹`; larger dims get fewer bits). The integer estimate `ã` of
//! `q · d` is off by at most `ε = ‖q‖·max‖d − d̃‖ + ‖q − q̃‖·max‖d̃‖` (Cauchy–Schwarz on
//! `q·d − q̃·d̃ = q·(d − d̃) + (q − q̃)·d̃`). A row whose estimate is more than `2ε` below the k-th best
//! estimate cannot be in the top k, so it is dropped without reading its f32 values; the few
//! survivors are scored in f32. The result is the top k of the f32 scan, not an approximation: the
//! integer pass only decides what need not be read, on half the bytes of f32.

use super::exact::exact_score;
use super::rows::DenseRows;
use super::scored::{top_k_of, Contenders};
use crate::kernels::{dot, int16};
use anyhow::{ensure, Result};
use rayon::prelude::*;
use std::ops::Range;

/// Codes are padded to a multiple of this (one AVX2 register of i16).
const LANES: usize = 16;
/// Rows scanned per block (their codes stay in L2 while every query pair passes over them).
const ROW_BLOCK: usize = 256;
/// Relative slack added to the bound for f32 rounding in the estimates and the bound itself.
const ROUNDING_SLACK: f32 = 1e-4;

/// The largest code magnitude for `dim`: 2047 (12 bits) while `dim · limit²` fits i32.
fn code_limit(dim: usize) -> i32 {
    let fit = ((i32::MAX as f64) / dim.max(1) as f64).sqrt().floor() as i32;
    fit.min(2047)
}

/// The integer copy of a row matrix: `[rows, stride]` codes and per-row scales, plus the largest
/// residual `‖d − d̃‖` and quantised norm `‖d̃‖` over all rows (for the bound).
pub struct QuantizedEmbeddings {
    dim: usize,
    stride: usize,
    limit: i32,
    codes: Codes,
    scale: Vec<f32>,
    max_residual: f32,
    max_norm: f32,
}

/// One query's codes, scale and pruning margin `2ε`.
pub(crate) struct Query {
    codes: Codes,
    scale: f32,
    margin: f32,
}

impl QuantizedEmbeddings {
    /// Quantise every row of `rows` (parallel over blocks).
    pub fn build(rows: &(impl DenseRows + ?Sized)) -> Self {
        let (n, dim) = (rows.rows(), rows.dim());
        let stride = dim.next_multiple_of(LANES).max(LANES);
        let limit = code_limit(dim);
        let mut codes = Codes::zeroed(n * stride);
        let mut stats = vec![RowStats::default(); n];
        codes
            .as_mut()
            .par_chunks_mut(ROW_BLOCK * stride)
            .zip(stats.par_chunks_mut(ROW_BLOCK))
            .enumerate()
            .for_each(|(b, (codes, stats))| {
                let start = b * ROW_BLOCK;
                let mut buf = Vec::new();
                let block = rows.block(start, start + stats.len(), &mut buf);
                for ((row, codes), stat) in block
                    .chunks(dim.max(1))
                    .zip(codes.chunks_mut(stride))
                    .zip(stats.iter_mut())
                {
                    *stat = quantize(row, limit, codes);
                }
            });
        Self {
            dim,
            stride,
            limit,
            codes,
            scale: stats.iter().map(|s| s.scale).collect(),
            max_residual: stats.iter().fold(0f32, |m, s| m.max(s.residual)),
            max_norm: stats.iter().fold(0f32, |m, s| m.max(s.norm)),
        }
    }

    pub fn rows(&self) -> usize {
        self.scale.len()
    }

    /// Bytes held in memory.
    pub fn memory_usage(&self) -> usize {
        self.codes.0.len() * 2 * LANES + self.rows() * 4
    }

    /// Top-`k` `(row, score)` per query, best first (ties: lower row first): the same hits as
    /// [`super::exact::exact_search`] over `rows`, which must be the matrix this copy was built
    /// from. `queries`: `[nq, dim]` row-major.
    pub fn search(
        &self,
        rows: &(impl DenseRows + ?Sized),
        queries: &[f32],
        k: usize,
    ) -> Result<Vec<Vec<(u32, f32)>>> {
        let dim = self.dim;
        ensure!(
            rows.rows() == self.rows() && rows.dim() == dim,
            "quantised copy of {} x {dim} does not match the embeddings ({} x {})",
            self.rows(),
            rows.rows(),
            rows.dim()
        );
        ensure!(
            dim > 0 && queries.len().is_multiple_of(dim),
            "query batch of {} floats is not a multiple of dim {dim}",
            queries.len()
        );
        let nq = queries.len() / dim;
        let n = self.rows();
        let k = k.min(n);
        if k == 0 {
            return Ok(vec![vec![]; nq]);
        }
        let qs: Vec<Query> = queries
            .chunks(dim)
            .map(|q| self.quantize_query(q))
            .collect();
        // One contiguous share of the rows per thread; each keeps its own estimates per query.
        let threads = rayon::current_num_threads().clamp(1, n);
        let share = n.div_ceil(threads);
        let partial: Vec<Vec<Estimates>> = (0..threads)
            .into_par_iter()
            .map(|t| self.scan(&qs, t * share..((t + 1) * share).min(n), k))
            .collect();
        // Merge: the global k-th estimate, then exact scores for the rows within the margin of it.
        Ok((0..nq)
            .into_par_iter()
            .map_init(Vec::new, |buf, qi| {
                let q = &queries[qi * dim..(qi + 1) * dim];
                top_k_of(
                    partial.iter().map(|p| &p[qi].contenders),
                    k,
                    qs[qi].margin,
                    |row| exact_score(rows, q, row, buf),
                )
            })
            .collect())
    }

    /// Integer estimates of `q · row` for graph search (off by at most half the query's margin).
    #[inline]
    pub(crate) fn estimate(&self, q: &Query, row: usize) -> f32 {
        q.scale * self.scale[row] * self.code_dot(q, row) as f32
    }

    /// `Σ q̃ᵢ · d̃ᵢ` over the integer codes of `q` and `row`.
    #[inline]
    fn code_dot(&self, q: &Query, row: usize) -> i32 {
        let d = &self.codes.as_ref()[row * self.stride..(row + 1) * self.stride];
        int16::dot(q.codes.as_ref(), d)
    }

    /// [`Self::estimate`] for four rows at once.
    #[inline]
    pub(crate) fn estimate4(&self, q: &Query, rows: [usize; 4]) -> [f32; 4] {
        let d = rows.map(|r| &self.codes.as_ref()[r * self.stride..(r + 1) * self.stride]);
        let dots = int16::dots_1x4(q.codes.as_ref(), d);
        std::array::from_fn(|j| q.scale * self.scale[rows[j]] * dots[j] as f32)
    }

    /// Hint the CPU to start loading `row`'s codes.
    #[inline]
    pub(crate) fn prefetch(&self, row: usize) {
        let p = self.codes.as_ref()[row * self.stride..].as_ptr() as *const u8;
        dot::prefetch(p, 2 * self.stride);
    }

    pub(crate) fn quantize_query(&self, q: &[f32]) -> Query {
        let mut codes = Codes::zeroed(self.stride);
        let stats = quantize(q, self.limit, codes.as_mut());
        let norm = q.iter().map(|x| x * x).sum::<f32>().sqrt();
        // The f32 score the survivors get (`exact_score`) is itself within `dim · ε_f32 · ‖q‖‖d‖`
        // of `q · d`, so that rounding is in the slack too.
        let slack = ROUNDING_SLACK + (self.dim as f32 + 2.0) * f32::EPSILON;
        let eps = norm * self.max_residual
            + stats.residual * self.max_norm
            + slack * norm * (self.max_norm + self.max_residual);
        Query {
            codes,
            // A zero query has scale 0; any positive scale keeps the floors finite.
            scale: if stats.scale > 0.0 { stats.scale } else { 1.0 },
            margin: 2.0 * eps,
        }
    }

    /// Integer pass over `range` for every query: each query's k best estimates, and every row
    /// whose estimate came within the margin of the running k-th best.
    fn scan(&self, qs: &[Query], range: Range<usize>, k: usize) -> Vec<Estimates> {
        let mut est: Vec<Estimates> = qs.iter().map(|q| Estimates::new(k, q)).collect();
        for block in range.clone().step_by(ROW_BLOCK) {
            let rows = block..(block + ROW_BLOCK).min(range.end);
            for (pair, est) in qs.chunks(2).zip(est.chunks_mut(2)) {
                // An odd last query is paired with itself; its second offers are ignored.
                let pair = [&pair[0], pair.get(1).unwrap_or(&pair[0])];
                let floors = [0, 1].map(|i| est.get(i).map_or(f32::INFINITY, Estimates::row_floor));
                let mut offer = |i: usize, value: f32, row: u32| match est.get_mut(i) {
                    Some(e) => e.offer(value, row),
                    None => f32::INFINITY,
                };
                let codes = pair.map(|q| q.codes.as_ref());
                let rest = int16::scan_pair(
                    self.codes.as_ref(),
                    self.stride,
                    &self.scale,
                    codes,
                    floors,
                    rows.clone(),
                    &mut offer,
                );
                for r in rest..rows.end {
                    for (i, q) in pair.iter().enumerate() {
                        offer(i, self.scale[r] * self.code_dot(q, r) as f32, r as u32);
                    }
                }
            }
        }
        est
    }
}

/// Per query: the k best estimates so far and the rows within the margin of the k-th.
struct Estimates {
    scale: f32,
    margin: f32,
    contenders: Contenders,
}

impl Estimates {
    fn new(k: usize, q: &Query) -> Self {
        Self {
            scale: q.scale,
            margin: q.margin,
            contenders: Contenders::new(k),
        }
    }

    /// [`Contenders::floor`] in row values (`scale_d · dot`, the estimate over the query scale).
    #[inline]
    fn row_floor(&self) -> f32 {
        self.contenders.floor(self.margin) / self.scale
    }

    /// Offer a row's value `scale_d · dot`; returns the new [`Self::row_floor`].
    #[inline]
    fn offer(&mut self, value: f32, row: u32) -> f32 {
        self.contenders.offer(self.scale * value, row, self.margin);
        self.row_floor()
    }
}

#[derive(Clone, Copy, Default)]
struct RowStats {
    scale: f32,
    residual: f32,
    norm: f32,
}

/// i16 codes in 32-byte aligned lanes, so that AVX2 loads never straddle a cache line.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Lane([i16; LANES]);

struct Codes(Vec<Lane>);

impl Codes {
    /// `len` zeros (a multiple of [`LANES`]).
    fn zeroed(len: usize) -> Self {
        debug_assert!(len.is_multiple_of(LANES));
        Self(vec![Lane([0; LANES]); len / LANES])
    }
}

impl AsRef<[i16]> for Codes {
    fn as_ref(&self) -> &[i16] {
        // SAFETY: `Lane` is `[i16; LANES]` with no padding.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const i16, self.0.len() * LANES) }
    }
}

impl AsMut<[i16]> for Codes {
    fn as_mut(&mut self) -> &mut [i16] {
        // SAFETY: as above.
        unsafe {
            std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut i16, self.0.len() * LANES)
        }
    }
}

/// Quantise `x` into `codes` (symmetric, one scale, magnitudes up to `limit`).
fn quantize(x: &[f32], limit: i32, codes: &mut [i16]) -> RowStats {
    let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if max == 0.0 {
        return RowStats::default();
    }
    let scale = max / limit as f32;
    let inv = limit as f32 / max;
    let (mut residual, mut norm) = (0f32, 0f32);
    // The bound uses the residual of the codes actually chosen, so rounding `v · inv` is safe.
    for (c, &v) in codes.iter_mut().zip(x) {
        let q = (v * inv).round().clamp(-limit as f32, limit as f32);
        *c = q as i16;
        residual += (v - q * scale).powi(2);
        norm += (q * scale).powi(2);
    }
    RowStats {
        scale,
        residual: residual.sqrt(),
        norm: norm.sqrt(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kb::index::exact::exact_search;
    use crate::kb::index::rows::F32Rows;

    /// Values in `[-0.5, 0.5)`.
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        crate::testutil::lcg(seed, n)
            .iter()
            .map(|x| x / 2.0)
            .collect()
    }

    /// The same hits as the f32 scan, to the bit.
    fn assert_same(data: &[f32], dim: usize, queries: &[f32], k: usize) {
        let rows = F32Rows { data, dim };
        let want = exact_search(&rows, queries, k).unwrap();
        let got = QuantizedEmbeddings::build(&rows)
            .search(&rows, queries, k)
            .unwrap();
        assert_eq!(got, want, "dim {dim}");
    }

    #[test]
    fn equals_the_f32_scan() {
        // Dims off the 16-lane padding, one large enough to lower the code limit, row counts
        // with tails of 1..3 rows, an odd query count, and k from 1 to more than the rows.
        for (n, dim, nq, k) in [
            (1, 7, 1, 3),
            (5, 33, 3, 2),
            (600, 33, 7, 10),
            (1027, 384, 9, 10),
            (300, 1000, 5, 4),
            (70, 16, 2, 100),
        ] {
            let data = noise(n * dim, 1 + n as u64);
            let queries = noise(nq * dim, 2 + dim as u64);
            assert_same(&data, dim, &queries, k);
        }
        assert!(
            code_limit(1000) < 2047 && 1000 * code_limit(1000).pow(2) as i64 <= i32::MAX as i64
        );
    }

    #[test]
    fn rows_of_very_different_norms_zero_rows_and_ties() {
        let dim = 40;
        let mut data = noise(500 * dim, 9);
        for (r, row) in data.chunks_mut(dim).enumerate() {
            let f = [1e-3, 1.0, 30.0, 0.0][r % 4];
            row.iter_mut().for_each(|x| *x *= f);
        }
        let dup = data[6 * dim..7 * dim].to_vec();
        data[18 * dim..19 * dim].copy_from_slice(&dup);
        let mut queries = noise(6 * dim, 10);
        queries[..dim].copy_from_slice(&dup); // ties between rows 6 and 18
        queries[dim..2 * dim].iter_mut().for_each(|x| *x = 0.0); // every score 0
        queries[2 * dim..3 * dim]
            .iter_mut()
            .for_each(|x| *x = -x.abs()); // mostly negative
        assert_same(&data, dim, &queries, 10);
        let rows = F32Rows { data: &data, dim };
        let hits = QuantizedEmbeddings::build(&rows)
            .search(&rows, &dup, 2)
            .unwrap();
        assert_eq!(hits[0].iter().map(|h| h.0).collect::<Vec<_>>(), [6, 18]);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let data = noise(10 * 8, 3);
        let rows = F32Rows {
            data: &data,
            dim: 8,
        };
        let q = QuantizedEmbeddings::build(&rows);
        assert!(q.search(&rows, &data[..7], 1).is_err());
        let other = F32Rows {
            data: &data[..72],
            dim: 8,
        };
        assert!(q.search(&other, &data[..8], 1).is_err());
        assert!(q.search(&rows, &data[..8], 0).unwrap()[0].is_empty());
    }
}
