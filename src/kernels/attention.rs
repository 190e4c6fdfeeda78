//! Softmax attention of single queries over a key/value cache on raw f32 buffers (the decoder-only
//! generators' raw-buffer path): scores by [`super::dot::dot_unrolled`], a max-subtracted softmax
//! with `f32::exp`, and the probability-weighted sum of the values. Portable code that vectorises
//! as built; no CPU-specific path.

use super::dot::dot_unrolled;

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
    let mut scores: Vec<f32> = (0..t)
        .map(|j| {
            if visible(j) {
                let s = dot_unrolled(q, &keys[j * d..(j + 1) * d]) * scale;
                match softcap {
                    Some(c) => (s * (1.0 / c)).tanh() * c,
                    None => s,
                }
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let max = scores.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    out.fill(0.0);
    if max == f32::NEG_INFINITY {
        return;
    }
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    for (j, &p) in scores.iter().enumerate() {
        if p != 0.0 {
            let p = p / sum;
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
}
