//! Softmax attention of single queries over a key/value cache on raw f32 buffers (the decoder-only
//! generators' raw-buffer path): scores as 8-lane dots four keys at a time, a max-subtracted
//! softmax with the polynomial [`super::math::exp`], and the probability-weighted sum of the
//! values; compiled for AVX2 + FMA where the CPU has them (the loops vectorise 8 wide), else as
//! built.

use super::math;

/// `out = Σ_j p_j · values[j]` with `p = softmax_j(q · keys[j] · scale)` over the keys `j < t`
/// for which `visible(j)`; `q, out: [d]`, `keys, values: [t, d]` row-major (`d = q.len()`).
/// A query that sees no key (padding) gets zeros.
pub fn attend_query(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    visible: impl Fn(usize) -> bool,
    out: &mut [f32],
) {
    let d = q.len();
    let t = keys.len() / d.max(1);
    // 0: visible (its score is computed next), -inf: masked out.
    let mut scores: Vec<f32> = (0..t)
        .map(|j| if visible(j) { 0.0 } else { f32::NEG_INFINITY })
        .collect();
    attend_scored(q, keys, values, scale, &mut scores, out);
}

avx2_dispatch! {
    /// [`attend_query`] given `scores[j]`: 0 where key `j` is visible, -inf where not.
    fn attend_scored(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        scale: f32,
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
        for (a, k) in acc.iter_mut().zip(ks) {
            for l in 0..8 {
                a[l] += q[c + l] * k[c + l];
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

#[inline(always)]
fn attend_body(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
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
                *o = s * scale;
            }
        }
        j += 4;
    }
    for (j, o) in scores.iter_mut().enumerate().skip(j) {
        if *o == 0.0 {
            *o = dots4(q, [key(j); 4])[0] * scale;
        }
    }
    let max = scores.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    out.fill(0.0);
    if max == f32::NEG_INFINITY {
        return;
    }
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
    let inv = 1.0 / sums.iter().sum::<f32>();
    for (j, &p) in scores.iter().enumerate() {
        if p != 0.0 {
            let p = p * inv;
            for (o, &v) in out.iter_mut().zip(&values[j * d..(j + 1) * d]) {
                *o += p * v;
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
        attend_query(&q, &keys, &values, 0.5, visible, &mut out);
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
        attend_query(&q, &keys, &values, 0.5, |_| false, &mut out);
        assert_eq!(out, [0.0; 3]);
    }
}
