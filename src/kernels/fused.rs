//! The fused inference path of a BERT encoder layer (no gradient tracked, f32, contiguous CPU
//! tensors): the element-wise work around the matmuls done in one parallel pass each instead of
//! several candle ops: bias + residual + LayerNorm, the q/k/v split, masked softmax and per-head
//! attention. Training and other devices use the composed, differentiable path of the model.

use anyhow::{bail, Result};
use candle_core::{Device, Storage, Tensor};
use rayon::prelude::*;

use super::math::exp;

/// Run `f` on the f32 data of a contiguous CPU tensor.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("fused kernel: tensor is not contiguous");
    };
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(&cpu.as_slice::<f32>()?[start..end])),
        _ => bail!("fused kernel: tensor is not on the CPU"),
    }
}

/// `LayerNorm(x + bias + residual)` per row (two-pass mean/variance), all `[n, c]` / `[c]`.
pub fn bias_residual_layer_norm(
    x: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let (n, c) = x.dims2()?;
    let mut out = vec![0f32; n * c];
    let eps = eps as f32;
    with_f32(x, |x| {
        with_f32(residual, |r| {
            with_f32(bias, |b| {
                with_f32(gamma, |g| {
                    with_f32(beta, |be| {
                        out.par_chunks_mut(c)
                            .zip(x.par_chunks(c))
                            .zip(r.par_chunks(c))
                            .for_each(|((o, x), r)| layer_norm_row(o, x, r, b, g, be, eps))
                    })
                })
            })
        })
    })?????;
    Ok(Tensor::from_vec(out, (n, c), &Device::Cpu)?)
}

avx2_dispatch! {
    /// [`layer_norm_row_body`], vectorised where possible.
    fn layer_norm_row(
        o: &mut [f32],
        x: &[f32],
        r: &[f32],
        b: &[f32],
        g: &[f32],
        be: &[f32],
        eps: f32,
    ) => layer_norm_row_body
}

/// `o = LayerNorm(x + b + r)` for one row (two-pass mean/variance).
#[inline(always)]
fn layer_norm_row_body(
    o: &mut [f32],
    x: &[f32],
    r: &[f32],
    b: &[f32],
    g: &[f32],
    be: &[f32],
    eps: f32,
) {
    let c = o.len();
    for ((o, x), (r, b)) in o.iter_mut().zip(x).zip(r.iter().zip(b)) {
        *o = x + b + r;
    }
    let mean = o.iter().sum::<f32>() / c as f32;
    let var = o.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
    let inv = 1.0 / (var + eps).sqrt();
    for ((o, g), be) in o.iter_mut().zip(g).zip(be) {
        *o = (*o - mean) * inv * g + be;
    }
}

/// `o[t] = (src[t * stride..][..dh] + bias) * scale` for the `o.len() / dh` rows of `o`,
/// `dh = bias.len()`: one head's columns gathered from the fused projection rows.
#[inline(always)]
fn bias_scale_rows_body(o: &mut [f32], src: &[f32], stride: usize, bias: &[f32], scale: f32) {
    let dh = bias.len();
    for (t, o) in o.chunks_mut(dh).enumerate() {
        let row = &src[t * stride..][..dh];
        for ((o, x), bv) in o.iter_mut().zip(row).zip(bias) {
            *o = (x + bv) * scale;
        }
    }
}

avx2_dispatch! {
    /// [`bias_scale_rows_body`], vectorised where possible.
    fn bias_scale_rows(o: &mut [f32], src: &[f32], stride: usize, bias: &[f32], scale: f32)
        => bias_scale_rows_body
}

/// Split fused projections `qkv: [b * l, 3 * h]` (+ `bias: [3 * h]`) into `q * scale`, `k`, `v`,
/// each `[b, heads, l, h / heads]` contiguous.
pub fn split_qkv(
    qkv: &Tensor,
    bias: &Tensor,
    b: usize,
    heads: usize,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, h3) = qkv.dims2()?;
    let (l, h) = (n / b, h3 / 3);
    let dh = h / heads;
    let mut outs = [vec![0f32; n * h], vec![0f32; n * h], vec![0f32; n * h]];
    with_f32(qkv, |src| {
        with_f32(bias, |bias| {
            for (which, out) in outs.iter_mut().enumerate() {
                let s = if which == 0 { scale } else { 1.0 };
                // one task per (batch row, head): l * dh contiguous outputs
                out.par_chunks_mut(l * dh).enumerate().for_each(|(bh, o)| {
                    let (bi, hd) = (bh / heads, bh % heads);
                    let col = which * h + hd * dh;
                    let bias = &bias[col..col + dh];
                    bias_scale_rows(o, &src[bi * l * h3 + col..], h3, bias, s)
                });
            }
        })
    })??;
    let [q, k, v] = outs;
    let shape = (b, heads, l, dh);
    Ok((
        Tensor::from_vec(q, shape, &Device::Cpu)?,
        Tensor::from_vec(k, shape, &Device::Cpu)?,
        Tensor::from_vec(v, shape, &Device::Cpu)?,
    ))
}

/// Unnormalised softmax of one row of scores in place, `row = exp(row + mask - max)`, where
/// `mask` is 0 for kept keys and -inf for padding (probability 0, as HF's dtype-min mask
/// gives); returns the normaliser `1 / Σ row`. Every key masked: uniform, as HF.
#[inline(always)]
fn masked_exp_row(row: &mut [f32], mask: &[f32]) -> f32 {
    // Eight independent lanes over exact chunks, so that the reductions stay in registers.
    let body = row.len() / 8 * 8;
    let (head, tail) = row.split_at_mut(body);
    let (mask_head, mask_tail) = mask.split_at(body);
    let mut lanes = [f32::NEG_INFINITY; 8];
    for (xs, ms) in head.chunks_exact(8).zip(mask_head.chunks_exact(8)) {
        for i in 0..8 {
            let v = xs[i] + ms[i];
            lanes[i] = if v > lanes[i] { v } else { lanes[i] };
        }
    }
    let mut max = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for (x, m) in tail.iter().zip(mask_tail) {
        max = max.max(x + m);
    }
    if max == f32::NEG_INFINITY {
        row.fill(1.0);
        return 1.0 / row.len() as f32;
    }
    let mut sums = [0f32; 8];
    for (xs, ms) in head.chunks_exact_mut(8).zip(mask_head.chunks_exact(8)) {
        for i in 0..8 {
            let e = exp(xs[i] + ms[i] - max);
            xs[i] = e;
            sums[i] += e;
        }
    }
    let mut sum = sums.iter().sum::<f32>();
    for (x, m) in tail.iter_mut().zip(mask_tail) {
        *x = exp(*x + m - max);
        sum += *x;
    }
    1.0 / sum
}

/// [`masked_exp_row`] over every `l`-wide row of `scores`, normalisers into `inv_sums`.
#[inline(always)]
fn masked_exp_rows_body(scores: &mut [f32], l: usize, mask: &[f32], inv_sums: &mut [f32]) {
    for (row, inv) in scores.chunks_mut(l).zip(inv_sums) {
        *inv = masked_exp_row(row, mask);
    }
}

avx2_dispatch! {
    /// [`masked_exp_rows_body`], vectorised where possible.
    fn masked_exp_rows(scores: &mut [f32], l: usize, mask: &[f32], inv_sums: &mut [f32]) => masked_exp_rows_body
}

/// Additive key mask: 0 where `keep != 0`, -inf for padding.
fn key_mask(keep: &[u32]) -> Vec<f32> {
    (keep.iter())
        .map(|&k| if k != 0 { 0.0 } else { f32::NEG_INFINITY })
        .collect()
}

/// Softmax over keys of `scores: [b, heads, l, l]` with padding keys masked.
#[cfg(test)]
pub fn masked_softmax(scores: &Tensor, keep: &[u32]) -> Result<Tensor> {
    let (b, heads, lq, lk) = scores.dims4()?;
    let mut out = scores.flatten_all()?.to_vec1::<f32>()?;
    let mask = key_mask(keep);
    for (row, o) in out.chunks_mut(lk).enumerate() {
        let inv = masked_exp_row(o, &mask[(row / (heads * lq)) * lk..][..lk]);
        o.iter_mut().for_each(|x| *x *= inv);
    }
    Ok(Tensor::from_vec(out, (b, heads, lq, lk), &Device::Cpu)?)
}

struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Multi-head attention of one padded batch: `q` (already scaled), `k`, `v`:
/// `[b, heads, l, dh]` contiguous, `keep: [b * l]` -> context `[b * l, heads * dh]` with the
/// heads merged. One task per (row, head) with a single-threaded gemm each: the matrices are
/// small, so parallelising across heads beats parallelising inside each product.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, keep: &[u32]) -> Result<Tensor> {
    attention_with_bias(q, k, v, keep, None)
}

/// [`attention`] with `score_bias: [heads, l, l]` added to the scores of every batch row before
/// the softmax (MPNet's relative position bias).
pub fn attention_with_bias(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    keep: &[u32],
    score_bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, heads, l, dh) = q.dims4()?;
    if k.dims4()? != (b, heads, l, dh) || v.dims4()? != (b, heads, l, dh) || keep.len() != b * l {
        bail!(
            "attention: shapes q {:?} k {:?} v {:?} mask {}",
            q.dims(),
            k.dims(),
            v.dims(),
            keep.len()
        );
    }
    let score_bias = match score_bias {
        Some(t) => {
            if t.dims3()? != (heads, l, l) {
                bail!(
                    "attention: score bias {:?}, want [{heads}, {l}, {l}]",
                    t.dims()
                );
            }
            Some(t.flatten_all()?.to_vec1::<f32>()?)
        }
        None => None,
    };
    let h = heads * dh;
    let mask = key_mask(keep);
    let mut out = vec![0f32; b * l * h];
    let dst = SendPtr(out.as_mut_ptr());
    let dst = &dst;
    with_f32(q, |q| {
        with_f32(k, |k| {
            with_f32(v, |v| {
                (0..b * heads).into_par_iter().for_each_init(
                    || (vec![0f32; l * l], vec![0f32; l]),
                    |(scores, inv_sums), bh| {
                        let bi = bh / heads;
                        let hd = bh % heads;
                        let off = bh * l * dh;
                        let (qm, km, vm) = (
                            &q[off..off + l * dh],
                            &k[off..off + l * dh],
                            &v[off..off + l * dh],
                        );
                        // scores start from the bias (read by the product below) or zero
                        if let Some(bias) = &score_bias {
                            scores.copy_from_slice(&bias[hd * l * l..(hd + 1) * l * l]);
                        }
                        // SAFETY: all pointers address in-bounds row-major matrices of the
                        // stated sizes/strides; each task writes only its own head's columns
                        // of its own batch row in `out`, so writes never overlap.
                        unsafe {
                            // scores [l, l] (+)= q [l, dh] x k^T [dh, l]
                            gemm::gemm(
                                l,
                                l,
                                dh,
                                scores.as_mut_ptr(),
                                1,
                                l as isize,
                                score_bias.is_some(),
                                qm.as_ptr(),
                                1,
                                dh as isize,
                                km.as_ptr(),
                                dh as isize,
                                1,
                                1.0,
                                1.0,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                        }
                        let mask = &mask[bi * l..(bi + 1) * l];
                        // Normalised after the product: l x dh scalings instead of l x l.
                        masked_exp_rows(scores, l, mask, inv_sums);
                        unsafe {
                            // out[bi, :, hd, :] = probs [l, l] x v [l, dh]
                            gemm::gemm(
                                l,
                                dh,
                                l,
                                dst.0.add(bi * l * h + hd * dh),
                                1,
                                h as isize,
                                false,
                                scores.as_ptr(),
                                1,
                                l as isize,
                                vm.as_ptr(),
                                1,
                                dh as isize,
                                0.0,
                                1.0,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                            for (i, inv) in inv_sums.iter().enumerate() {
                                let row = dst.0.add(bi * l * h + i * h + hd * dh);
                                for j in 0..dh {
                                    *row.add(j) *= inv;
                                }
                            }
                        }
                    },
                )
            })
        })
    })???;
    Ok(Tensor::from_vec(out, (b * l, h), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn;
    use candle_core::DType;

    #[test]
    fn masked_softmax_matches_additive_mask_softmax() -> Result<()> {
        let dev = Device::Cpu;
        let scores = Tensor::randn(0f32, 3., (2, 3, 4, 5), &dev)?;
        let keep = [1u32, 1, 1, 0, 0, 1, 1, 1, 1, 1];
        let mask = Tensor::from_vec(keep.to_vec(), (2, 5), &dev)?;
        let want = nn::softmax_last_dim(
            &scores.broadcast_add(&nn::additive_padding_mask(&mask, DType::F32)?)?,
        )?;
        let got = masked_softmax(&scores, &keep)?;
        // and the whole fused attention against the composed one
        let (q, k, v) = (
            Tensor::randn(0f32, 1., (2, 3, 5, 4), &dev)?,
            Tensor::randn(0f32, 1., (2, 3, 5, 4), &dev)?,
            Tensor::randn(0f32, 1., (2, 3, 5, 4), &dev)?,
        );
        let probs = nn::softmax_last_dim(
            &q.matmul(&k.t()?)?
                .broadcast_add(&nn::additive_padding_mask(&mask, DType::F32)?)?,
        )?;
        let want_ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((10, 12))?;
        let got_ctx = attention(&q, &k, &v, &keep)?;
        let d = (got_ctx - want_ctx)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "attention max diff {d}");
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "max diff {diff}");
        Ok(())
    }
}
