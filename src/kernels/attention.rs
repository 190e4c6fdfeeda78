//! Softmax attention of single queries over a key/value cache on raw f32 buffers (the decoder-only
//! generators' raw-buffer path): scores as 8-lane dots four keys at a time, a max-subtracted
//! softmax with the polynomial [`super::math::exp`], and the probability-weighted sum of the
//! values; compiled for AVX2 + FMA where the CPU has them (the loops vectorise 8 wide), else as
//! built.

use super::math;

/// `out = Σ_j p_j · values[j]` with `p = softmax_j(s_j)`, `s_j = q · keys[j] · scale` (soft-capped
/// to `cap * tanh(s_j / cap)` with `softcap`, as Gemma 2), over the keys `j < t` for which
/// `visible(j)`; `q, out: [d]`, `keys, values: [t, d]` row-major (`d = q.len()`).
/// A query that sees no key (padding) gets zeros.
pub fn attend_query(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    softcap: Option<f32>,
    visible: impl Fn(usize) -> bool,
    out: &mut [f32],
) {
    let d = q.len();
    let t = keys.len() / d.max(1);
    // 0: visible (its score is computed next), -inf: masked out.
    let mut scores: Vec<f32> = (0..t)
        .map(|j| if visible(j) { 0.0 } else { f32::NEG_INFINITY })
        .collect();
    attend_scored(q, keys, values, scale, softcap, &mut scores, out);
}

avx2_dispatch! {
    /// [`attend_query`] given `scores[j]`: 0 where key `j` is visible, -inf where not.
    fn attend_scored(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        scale: f32,
        softcap: Option<f32>,
        scores: &mut [f32],
        out: &mut [f32],
    ) => attend_body
}

/// `q · k` for the keys `k` of `keys` in `ks` (8-lane partial sums each; four independent chains).
#[inline(always)]
fn dots4(q: &[f32], ks: [&[f32]; 4]) -> [f32; 4] {
    let mut acc = [[0f32; 8]; 4];
    let n8 = q.len() / 8 * 8;
    for c in (0..n8).step_by(8) {
        // Fixed-size views: one bounds check per 8 lanes, so the lanes vectorise.
        let q8: &[f32; 8] = q[c..c + 8].try_into().expect("8 lanes");
        for (a, k) in acc.iter_mut().zip(ks) {
            let k8: &[f32; 8] = k[c..c + 8].try_into().expect("8 lanes");
            for l in 0..8 {
                a[l] += q8[l] * k8[l];
            }
        }
    }
    let mut out = [0f32; 4];
    for ((o, a), k) in out.iter_mut().zip(&acc).zip(ks) {
        let tail: f32 = (n8..q.len()).map(|c| q[c] * k[c]).sum();
        *o = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])) + tail;
    }
    out
}

/// `v = exp(v - max)` for every score in place (-inf becomes 0), returning their sum: the
/// softmax numerators of both attention kernels, summed in 8 lanes so the loop vectorises.
#[inline(always)]
fn exp_minus_max_sum(scores: &mut [f32], max: f32) -> f32 {
    let mut sums = [0f32; 8];
    let mut chunks = scores.chunks_exact_mut(8);
    for c in &mut chunks {
        for (s, v) in sums.iter_mut().zip(c.iter_mut()) {
            *v = math::exp(*v - max);
            *s += *v;
        }
    }
    for v in chunks.into_remainder() {
        *v = math::exp(*v - max);
        sums[0] += *v;
    }
    sums.iter().sum()
}

/// `cap * tanh(s / cap)` with a cap (Gemma 2's attention soft-capping), else `s`.
#[inline(always)]
fn soft_capped(s: f32, softcap: Option<f32>) -> f32 {
    match softcap {
        Some(c) => (s * (1.0 / c)).tanh() * c,
        None => s,
    }
}

#[inline(always)]
fn attend_body(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    softcap: Option<f32>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let d = q.len();
    let t = scores.len();
    let key = |j: usize| &keys[j * d..(j + 1) * d];
    let mut j = 0;
    while j + 4 <= t {
        let s = dots4(q, [key(j), key(j + 1), key(j + 2), key(j + 3)]);
        for (o, s) in scores[j..j + 4].iter_mut().zip(s) {
            if *o == 0.0 {
                *o = soft_capped(s * scale, softcap);
            }
        }
        j += 4;
    }
    for (j, o) in scores.iter_mut().enumerate().skip(j) {
        if *o == 0.0 {
            *o = soft_capped(dots4(q, [key(j); 4])[0] * scale, softcap);
        }
    }
    let max = scores.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    out.fill(0.0);
    if max == f32::NEG_INFINITY {
        return;
    }
    let inv = 1.0 / exp_minus_max_sum(scores, max);
    for (j, &p) in scores.iter().enumerate() {
        if p != 0.0 {
            let p = p * inv;
            for (o, &v) in out.iter_mut().zip(&values[j * d..(j + 1) * d]) {
                *o += p * v;
            }
        }
    }
}

/// Causal attention of `limits.len()` query vectors that share one key/value head (a block of
/// prompt positions × the query heads of a grouped-query head): query `u` (row `u` of `qs:
/// [nq, d]`) sees keys `0..limits[u]` of `keys, values: [t, d]` (`t >= max(limits)`), only the
/// last `w` of them with a sliding window `w`, scored as `scoring` says; `out: [nq, d]`. The math of [`attend_query`] per query, with the keys and values read once per
/// block: scores by an 8-key × 4-query tile over transposed keys, probabilities × values by a
/// 4-query × 16-column tile (prefill: no O(len²) stream of the cache per query).
pub fn attend_block(
    qs: &[f32],
    limits: &[usize],
    keys: &[f32],
    values: &[f32],
    scoring: &Scoring,
    out: &mut [f32],
) {
    let nq = limits.len();
    let tmax = limits.iter().copied().max().unwrap_or(0);
    if nq == 0 || tmax == 0 {
        out.fill(0.0);
        return;
    }
    let d = qs.len() / nq;
    let mut s = vec![0f32; nq * tmax.next_multiple_of(8)];
    let mut kt = vec![0f32; d * 8];
    attend_block_scored(qs, limits, keys, values, scoring, &mut s, &mut kt, out);
}

/// How [`attend_block`] turns `q · k` into probabilities.
pub struct Scoring {
    /// Multiplier of `q · k`.
    pub scale: f32,
    /// `cap * tanh(s / cap)` of the scaled scores (Gemma 2), or none.
    pub softcap: Option<f32>,
    /// Sliding window: a query sees only the last `w` of its keys, or all.
    pub window: Option<usize>,
}

/// [`attend_block`] with its scratch: `s: [nq, tmax rounded up to 8]`, `kt: [d, 8]`. Compiled for
/// AVX2 + FMA where the CPU has them (products accumulated with fused multiply-adds), else as built
/// (multiply, then add).
#[allow(clippy::too_many_arguments)]
fn attend_block_scored(
    qs: &[f32],
    limits: &[usize],
    keys: &[f32],
    values: &[f32],
    scoring: &Scoring,
    s: &mut [f32],
    kt: &mut [f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn avx2(
            qs: &[f32],
            limits: &[usize],
            keys: &[f32],
            values: &[f32],
            scoring: &Scoring,
            s: &mut [f32],
            kt: &mut [f32],
            out: &mut [f32],
        ) {
            attend_block_body(qs, limits, keys, values, scoring, s, kt, out, f32::mul_add)
        }
        if super::cpu().avx2_fma() {
            // SAFETY: avx2 and fma were detected.
            return unsafe { avx2(qs, limits, keys, values, scoring, s, kt, out) };
        }
    }
    attend_block_body(qs, limits, keys, values, scoring, s, kt, out, |a, b, c| {
        a * b + c
    })
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_block_body(
    qs: &[f32],
    limits: &[usize],
    keys: &[f32],
    values: &[f32],
    scoring: &Scoring,
    s: &mut [f32],
    kt: &mut [f32],
    out: &mut [f32],
    fma: impl Fn(f32, f32, f32) -> f32,
) {
    let nq = limits.len();
    let d = qs.len() / nq;
    let tp = s.len() / nq;
    let tmax = limits.iter().copied().max().unwrap_or(0);
    // Query u + v of a 4-query tile, clamped to the last one (its duplicate results are dropped).
    let qrow = |u: usize| &qs[u.min(nq - 1) * d..(u.min(nq - 1) + 1) * d];
    // Scores: 8 keys at a time, transposed so each query column broadcasts over 8 key lanes.
    for j0 in (0..tmax).step_by(8) {
        let w = (tmax - j0).min(8);
        for (l, kl) in (0..8).map(|l| (l, (j0 + l).min(j0 + w - 1))) {
            for (c, &k) in keys[kl * d..(kl + 1) * d].iter().enumerate() {
                kt[c * 8 + l] = k;
            }
        }
        for u in (0..nq).step_by(4) {
            let q = [qrow(u), qrow(u + 1), qrow(u + 2), qrow(u + 3)];
            let mut acc = [[0f32; 8]; 4];
            for (c, k8) in kt.chunks_exact(8).enumerate() {
                for v in 0..4 {
                    let qv = q[v][c];
                    for l in 0..8 {
                        acc[v][l] = fma(qv, k8[l], acc[v][l]);
                    }
                }
            }
            for (v, a) in acc.iter().enumerate().take(nq - u) {
                s[(u + v) * tp + j0..(u + v) * tp + j0 + 8].copy_from_slice(a);
            }
        }
    }
    // Softmax of each query's visible scores; the invisible ones become 0.
    for (row, &lim) in s.chunks_exact_mut(tp).zip(limits) {
        let (seen, rest) = row.split_at_mut(lim);
        rest.fill(0.0);
        let (slid_out, vis) =
            seen.split_at_mut(scoring.window.map_or(0, |w| lim.saturating_sub(w)));
        slid_out.fill(0.0);
        let mut max = f32::NEG_INFINITY;
        for v in vis.iter_mut() {
            *v = soft_capped(*v * scoring.scale, scoring.softcap);
            max = max.max(*v);
        }
        let inv = 1.0 / exp_minus_max_sum(vis, max);
        for v in vis.iter_mut() {
            *v *= inv;
        }
    }
    // Probabilities × values: 4 queries × 16 columns of accumulators over the keys.
    let c16 = d / 16 * 16;
    for u in (0..nq).step_by(4) {
        let lim = limits[u..(u + 4).min(nq)]
            .iter()
            .copied()
            .max()
            .unwrap_or(0);
        let p = [0, 1, 2, 3].map(|v| {
            let r = (u + v).min(nq - 1);
            &s[r * tp..r * tp + lim]
        });
        for c0 in (0..c16).step_by(16) {
            let mut acc = [[0f32; 16]; 4];
            for j in 0..lim {
                let vr = &values[j * d + c0..j * d + c0 + 16];
                for v in 0..4 {
                    let pv = p[v][j];
                    for l in 0..16 {
                        acc[v][l] = fma(pv, vr[l], acc[v][l]);
                    }
                }
            }
            for (v, a) in acc.iter().enumerate().take(nq - u) {
                out[(u + v) * d + c0..(u + v) * d + c0 + 16].copy_from_slice(a);
            }
        }
        for c in c16..d {
            for v in 0..(nq - u).min(4) {
                out[(u + v) * d + c] = (0..lim).map(|j| p[v][j] * values[j * d + c]).sum();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_softmax_attention() {
        let (t, d) = (5, 3);
        let q = [0.3f32, -1.0, 0.5];
        let keys: Vec<f32> = (0..t * d)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.2)
            .collect();
        let values: Vec<f32> = (0..t * d).map(|i| (i as f32) * 0.1).collect();
        let visible = |j: usize| j != 2;
        let mut out = [0f32; 3];
        attend_query(&q, &keys, &values, 0.5, None, visible, &mut out);
        let s: Vec<f64> = (0..t)
            .map(|j| {
                let dot: f64 = (0..d).map(|c| (q[c] * keys[j * d + c]) as f64).sum();
                if visible(j) {
                    (dot * 0.5).exp()
                } else {
                    0.0
                }
            })
            .collect();
        let z: f64 = s.iter().sum();
        for c in 0..d {
            let want: f64 = (0..t).map(|j| s[j] / z * values[j * d + c] as f64).sum();
            assert!(
                (out[c] as f64 - want).abs() < 1e-5,
                "{c}: {} vs {want}",
                out[c]
            );
        }
        attend_query(&q, &keys, &values, 0.5, None, |_| false, &mut out);
        assert_eq!(out, [0.0; 3]);
    }
    #[test]
    fn block_attention_equals_per_query_attention() {
        for (d, t, nq) in [(64, 37, 7), (16, 8, 4), (24, 5, 1), (64, 20, 12)] {
            let keys: Vec<f32> = (0..t * d)
                .map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.05)
                .collect();
            let values: Vec<f32> = (0..t * d)
                .map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.1)
                .collect();
            let qs: Vec<f32> = (0..nq * d)
                .map(|i| ((i * 5 % 19) as f32 - 9.0) * 0.07)
                .collect();
            let limits: Vec<usize> = (0..nq).map(|u| t - (u * 3) % t.min(6)).collect();
            // Plain causal, Gemma 2's soft-capping, and a sliding window shorter than t.
            for (softcap, window) in [
                (None, None),
                (Some(0.5), None),
                (None, Some(4)),
                (Some(0.5), Some(3)),
            ] {
                let mut out = vec![0f32; nq * d];
                attend_block(
                    &qs,
                    &limits,
                    &keys,
                    &values,
                    &Scoring {
                        scale: 0.125,
                        softcap,
                        window,
                    },
                    &mut out,
                );
                for u in 0..nq {
                    let mut want = vec![0f32; d];
                    let q = &qs[u * d..(u + 1) * d];
                    let visible =
                        |j: usize| j < limits[u] && window.is_none_or(|w| limits[u] - j <= w);
                    attend_query(q, &keys, &values, 0.125, softcap, visible, &mut want);
                    for c in 0..d {
                        let got = out[u * d + c];
                        assert!(
                            (got - want[c]).abs() < 1e-5,
                            "d {d} query {u} col {c} cap {softcap:?} window {window:?}: {got} vs {}",
                            want[c]
                        );
                    }
                }
            }
        }
    }
}
