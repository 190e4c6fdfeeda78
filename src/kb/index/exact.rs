//! Exact inner-product search: the plain f32 scan (blocked GEMM, doc blocks spread over threads,
//! per-query top-k heaps) and the one score definition every exact path ranks by.
//!
//! Exact means one definition for both the scan and the quantised first pass
//! ([`super::quantized::QuantizedEmbeddings`]): the score of a row is [`exact_score`] (one dot
//! routine, one summation order), and the top k is ranked by score descending, then row ascending.
//! The GEMM's scores differ from it in the last bits (another summation order, another kernel per
//! CPU), so the scan keeps every row within the GEMM's rounding bound of the k-th best and scores
//! those with [`exact_score`]; rows that tie only after rounding then rank the same on every CPU.

use super::rows::DenseRows;
use super::scored::{top_k_of, Contenders};
use crate::kernels::dot;
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// Most docs per block.
const DOC_BLOCK: usize = 2048;
/// Queries scored together against one doc block (large: each block is packed once per tile;
/// 256 keeps the score buffer at 2 MB).
const QUERY_TILE: usize = 256;

/// `dst[m, n] = lhs[m, d] · rhs[n, d]ᵀ`, all row-major, single-threaded (callers parallelise).
fn scores_into(dst: &mut [f32], lhs: &[f32], rhs: &[f32], m: usize, n: usize, d: usize) {
    debug_assert!(dst.len() >= m * n && lhs.len() >= m * d && rhs.len() >= n * d);
    // SAFETY: the strides describe the row-major buffers above, whose sizes are checked by the callers.
    unsafe {
        gemm::gemm(
            m,
            n,
            d,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            d as isize,
            rhs.as_ptr(),
            d as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Exact maximum-inner-product search: top-`k` `(row, score)` per query by [`exact_score`], best
/// first (ties: lower row first). `queries`: `[nq, dim]` row-major.
pub fn exact_search(
    matrix: &(impl DenseRows + ?Sized),
    queries: &[f32],
    k: usize,
) -> Result<Vec<Vec<(u32, f32)>>> {
    let dim = matrix.dim();
    ensure!(
        dim > 0 && queries.len().is_multiple_of(dim),
        "query batch of {} floats is not a multiple of dim {dim}",
        queries.len()
    );
    let nq = queries.len() / dim;
    let n = matrix.rows();
    let k = k.min(n);
    if k == 0 {
        return Ok(vec![vec![]; nq]);
    }
    // |GEMM − exact_score| ≤ 2·γ_dim·‖q‖·‖d‖ (any summation order, γ_n = n·u/(1 − n·u));
    // excluding a row needs its bound plus the k-th best's: a margin of twice that, with the
    // largest row norm seen. EPSILON = 2u over-covers γ and the rounding of the norms.
    let q_norms: Vec<f32> = queries.chunks(dim).map(norm).collect();
    let margin =
        |q_norm: f32, max_norm: f32| 2.0 * (dim + 2) as f32 * f32::EPSILON * q_norm * max_norm;
    // One contiguous share of the rows per thread, so each thread keeps one top-k per query
    // (its threshold rises across blocks) and reuses one score buffer.
    let threads = rayon::current_num_threads().clamp(1, n);
    let share = n.div_ceil(threads);
    let partial: Vec<(Vec<Contenders>, f32)> = (0..threads)
        .into_par_iter()
        .map(|t| {
            let (lo, hi) = (t * share, ((t + 1) * share).min(n));
            let mut tops = vec![Contenders::new(k); nq];
            let mut max_norm = 0f32;
            let mut scores = vec![0f32; QUERY_TILE.min(nq) * DOC_BLOCK.min(hi.saturating_sub(lo))];
            let mut conv = Vec::new();
            for start in (lo..hi).step_by(DOC_BLOCK) {
                let end = (start + DOC_BLOCK).min(hi);
                let rows = end - start;
                let docs = matrix.block(start, end, &mut conv);
                max_norm = docs.chunks(dim).map(norm).fold(max_norm, f32::max);
                for ((qtile, tops), q_norms) in queries
                    .chunks(QUERY_TILE * dim)
                    .zip(tops.chunks_mut(QUERY_TILE))
                    .zip(q_norms.chunks(QUERY_TILE))
                {
                    scores_into(&mut scores, qtile, docs, qtile.len() / dim, rows, dim);
                    for ((top, row_scores), &q_norm) in
                        tops.iter_mut().zip(scores.chunks(rows)).zip(q_norms)
                    {
                        top.offer_row(row_scores, start, margin(q_norm, max_norm));
                    }
                }
            }
            (tops, max_norm)
        })
        .collect();
    let max_norm = partial.iter().fold(0f32, |m, p| m.max(p.1));
    Ok((0..nq)
        .into_par_iter()
        .map_init(Vec::new, |buf, qi| {
            let q = &queries[qi * dim..(qi + 1) * dim];
            top_k_of(
                partial.iter().map(|p| &p.0[qi]),
                k,
                margin(q_norms[qi], max_norm),
                |row| exact_score(matrix, q, row, buf),
            )
        })
        .collect())
}

fn norm(x: &[f32]) -> f32 {
    x.iter().map(|v| v * v).sum::<f32>().sqrt()
}

/// The score of `row` for query `q` that exact search ranks by (one dot routine everywhere, so the
/// quantised pass and the f32 scan agree to the bit).
pub(crate) fn exact_score(
    matrix: &(impl DenseRows + ?Sized),
    q: &[f32],
    row: u32,
    buf: &mut Vec<f32>,
) -> f32 {
    let r = row as usize;
    dot::dot(q, matrix.block(r, r + 1, buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kb::index::quantized::QuantizedEmbeddings;
    use crate::kb::index::rows::F32Rows;

    /// Every row scored with [`exact_score`], ranked by score descending, then row ascending.
    fn brute_force(rows: &F32Rows, queries: &[f32], k: usize) -> Vec<Vec<(u32, f32)>> {
        queries
            .chunks(rows.dim)
            .map(|q| {
                let mut all: Vec<(u32, f32)> = (0..rows.rows() as u32)
                    .map(|r| (r, exact_score(rows, q, r, &mut Vec::new())))
                    .collect();
                all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                all.truncate(k);
                all
            })
            .collect()
    }

    /// Rows that differ from a few base rows by about one f32 ulp, and exact duplicates: their scores
    /// differ only in the last bits, where the GEMM's summation order and the dot routine's part
    /// ways. Both exact searches must return the brute-force ranking to the bit.
    #[test]
    fn near_ties_rank_the_same_in_both_exact_searches() {
        let dim = 384;
        let n = 4500; // three GEMM doc blocks
        let base = crate::testutil::lcg(7, 4 * dim);
        let jitter = crate::testutil::lcg(8, n * dim);
        let mut data = Vec::with_capacity(n * dim);
        for r in 0..n {
            let b = &base[(r % 4) * dim..][..dim];
            if r % 5 == 0 {
                data.extend_from_slice(b); // exact duplicates: ties broken by row
            } else {
                let j = &jitter[r * dim..][..dim];
                data.extend(b.iter().zip(j).map(|(x, e)| x * (1.0 + 2e-7 * e)));
            }
        }
        let mut queries = crate::testutil::lcg(9, 6 * dim);
        queries[..dim].copy_from_slice(&base[..dim]);
        let rows = F32Rows { data: &data, dim };
        for k in [1, 10, 50] {
            let want = brute_force(&rows, &queries, k);
            assert_eq!(
                exact_search(&rows, &queries, k).unwrap(),
                want,
                "f32 scan, k {k}"
            );
            let quantized = QuantizedEmbeddings::build(&rows);
            assert_eq!(
                quantized.search(&rows, &queries, k).unwrap(),
                want,
                "quantised pass, k {k}"
            );
        }
    }
}
