//! The forward pass on raw f32 buffers (native weights on CPU): no per-op tensor overhead.

use super::{Llama, Projections, RmsNorm, RopeLayout};
use crate::generators::{LayerCache, RawKv};
use crate::kernels::attention;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use rayon::prelude::*;

impl Llama {
    /// The transformer on raw buffers (requires [`Llama::raw_decode`]) for `tokens: [rows, len]`
    /// (row-major) at `positions: [rows, len]`: query `i` of a row (absolute column `past + i`) sees
    /// key `j` when `j <= past + i` and `key_mask[r][j] == 1` (`None`: no padding; the mask covers
    /// past and new tokens). Appends in place to each layer's [`RawKv`] (taking over a tensor cache
    /// that [`Llama::run`] filled) and returns the next-token logits of each row's last position
    /// `[rows, vocab]`. Same math as `run` + `last_logits`, without ~25 tensor ops per layer.
    pub(super) fn run_native(
        &self,
        tokens: &[u32],
        len: usize,
        positions: &[u32],
        key_mask: Option<&[Vec<u32>]>,
        cache: &mut [LayerCache],
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (h, ffn) = (cfg.hidden_size, cfg.intermediate_size);
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let (n_rep, qd, kvd, half) = (nh / nkv, nh * hd, nkv * hd, hd / 2);
        if len == 0 || !tokens.len().is_multiple_of(len) || positions.len() != tokens.len() {
            bail!(
                "llama: {} tokens and {} positions for rows of {len}",
                tokens.len(),
                positions.len()
            );
        }
        let (b, n) = (tokens.len() / len, tokens.len());
        let qkv_w = qd + 2 * kvd;
        // Where llama.cpp scales the queries before q·k, so do we (scores then unscaled).
        let (q_scale, scale) = match cfg.q_prescaled() {
            true => (Some(cfg.attn_scale()), 1.0),
            false => (None, cfg.attn_scale()),
        };
        let gemma = cfg.gemma.as_ref();
        let attn_cap = gemma.and_then(|g| g.attn_softcap).map(|c| c as f32);
        let mut x = vec![0f32; n * h];
        with_f32(&self.embed, |e| -> Result<()> {
            for (r, &t) in tokens.iter().enumerate() {
                let t = t as usize;
                if t >= cfg.vocab_size {
                    bail!("llama: token id {t} >= vocab size {}", cfg.vocab_size);
                }
                x[r * h..(r + 1) * h].copy_from_slice(&e[t * h..(t + 1) * h]);
            }
            Ok(())
        })??;
        if gemma.is_some() {
            // Gemma scales the embeddings by sqrt(hidden) (f32, as ggml).
            let s = (h as f32).sqrt();
            x.iter_mut().for_each(|v| *v *= s);
        }
        // cos/sin [rows * len, head_dim / 2] of the rotary angles as llama.cpp computes them:
        // global, and Gemma 3's local ones where they differ.
        let tables = |local: bool| {
            let mut cos = vec![0f32; n * half];
            let mut sin = vec![0f32; n * half];
            let mut angles = vec![0f32; n * half];
            cfg.rope_angles(local, positions, &mut angles);
            let m = cfg.rope_attn_factor(local);
            for ((c, s), a) in cos.iter_mut().zip(sin.iter_mut()).zip(&angles) {
                *c = a.cos() * m;
                *s = a.sin() * m;
            }
            (cos, sin)
        };
        let global_rope = tables(false);
        let local_rope = (0..cfg.num_layers)
            .any(|i| cfg.local_rope(i))
            .then(|| tables(true));
        let rope = |(cos, sin): &(Vec<f32>, Vec<f32>), v: &mut [f32], r: usize| {
            let (c, s) = (
                &cos[r * half..(r + 1) * half],
                &sin[r * half..(r + 1) * half],
            );
            for i in 0..half {
                let (a, z) = match self.rope_layout {
                    RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                    RopeLayout::Halves => (i, i + half),
                };
                let (x0, x1) = (v[a], v[z]);
                v[a] = x0 * c[i] - x1 * s[i];
                v[z] = x0 * s[i] + x1 * c[i];
            }
        };
        let mut xn = vec![0f32; n * h];
        let mut qkv = vec![0f32; n * qkv_w];
        let mut att = vec![0f32; n * qd];
        let mut proj = vec![0f32; n * h];
        let mut gu = vec![0f32; n * 2 * ffn];
        let mut act = vec![0f32; n * ffn];
        for (layer, (block, lc)) in self.blocks.iter().zip(cache.iter_mut()).enumerate() {
            let tables = match (&local_rope, cfg.local_rope(layer)) {
                (Some(t), true) => t,
                _ => &global_rope,
            };
            let window = gemma.and_then(|g| g.window(layer));
            let (Projections::Stacked { w: qkv_m, .. }, Projections::Stacked { w: gu_m, .. }) =
                (&block.attn.qkv, &block.mlp.gate_up)
            else {
                bail!("llama run_native: projections are not stacked");
            };
            let (Some(o_m), Some(down_m)) = (block.attn.o.native(), block.mlp.down.native()) else {
                bail!("llama run_native: o/down projections are not native");
            };
            rms_norm_rows(&x, &block.attn_norm, &mut xn)?;
            qkv_m.matmul_into(&xn, n, &mut qkv)?;
            for (r, row) in qkv.chunks_exact_mut(qkv_w).enumerate() {
                block.attn.extras.apply_raw(row, nh, hd)?;
                for head in row[..qd + kvd].chunks_exact_mut(hd) {
                    rope(tables, head, r);
                }
                if let Some(s) = q_scale {
                    row[..qd].iter_mut().for_each(|v| *v *= s);
                }
            }
            // Append the new k/v in place: [rows, kv_heads, capacity, head_dim].
            let mut kv = match (lc.raw_kv.take(), &lc.self_kv) {
                (Some(kv), _) => kv,
                (None, Some((k, v))) => RawKv::from_tensors(k, v)?,
                (None, None) => RawKv::new(b, nkv, hd),
            };
            lc.self_kv = None;
            if (kv.rows, kv.heads, kv.head_dim) != (b, nkv, hd) {
                bail!(
                    "llama: cache of {} rows x {} heads x {} for {b} rows x {nkv} x {hd}",
                    kv.rows,
                    kv.heads,
                    kv.head_dim
                );
            }
            let t_past = kv.len;
            let t = t_past + len;
            if let Some(m) = key_mask {
                if m.len() != b || m.iter().any(|row| row.len() != t) {
                    bail!("llama: key mask is not [{b}, {t}]");
                }
            }
            kv.reserve(len);
            for r in 0..b {
                for j in 0..nkv {
                    for i in 0..len {
                        let (s, o) = ((r * len + i) * qkv_w + j * hd, kv.offset(r, j, t_past + i));
                        kv.k[o..o + hd].copy_from_slice(&qkv[s + qd..s + qd + hd]);
                        kv.v[o..o + hd].copy_from_slice(&qkv[s + qd + kvd..s + qd + kvd + hd]);
                    }
                }
            }
            kv.len = t;
            let (kc, vc) = (&kv.k, &kv.v);
            if key_mask.is_none() && len > 1 {
                // Prefill without padding: blocks of ATT_BLOCK positions × the n_rep query heads
                // of one kv head attend together (keys and values read once per block).
                const ATT_BLOCK: usize = 8;
                let nblk = len.div_ceil(ATT_BLOCK);
                let tasks: Vec<(usize, usize, usize)> = (0..b)
                    .flat_map(|r| (0..nkv).flat_map(move |g| (0..nblk).map(move |k| (r, g, k))))
                    .collect();
                let block = |&(r, g, k): &(usize, usize, usize)| -> Vec<f32> {
                    let (i0, i1) = (k * ATT_BLOCK, ((k + 1) * ATT_BLOCK).min(len));
                    let nq = (i1 - i0) * n_rep;
                    let mut qs = vec![0f32; nq * hd];
                    let mut limits = vec![0usize; nq];
                    for i in i0..i1 {
                        for rep in 0..n_rep {
                            let (u, head, qi) =
                                ((i - i0) * n_rep + rep, g * n_rep + rep, r * len + i);
                            let q = qi * qkv_w + head * hd;
                            qs[u * hd..(u + 1) * hd].copy_from_slice(&qkv[q..q + hd]);
                            limits[u] = t_past + i + 1;
                        }
                    }
                    let (base, tv) = (kv.offset(r, g, 0), t_past + i1);
                    let mut out = vec![0f32; nq * hd];
                    attention::attend_block(
                        &qs,
                        &limits,
                        &kc[base..base + tv * hd],
                        &vc[base..base + tv * hd],
                        &attention::Scoring {
                            scale,
                            softcap: attn_cap,
                            window,
                        },
                        &mut out,
                    );
                    out
                };
                let outs: Vec<Vec<f32>> = if n * nh * t * hd < 1 << 18 {
                    tasks.iter().map(block).collect()
                } else {
                    tasks.par_iter().map(block).collect()
                };
                for (&(r, g, k), o) in tasks.iter().zip(&outs) {
                    for i in k * ATT_BLOCK..((k + 1) * ATT_BLOCK).min(len) {
                        for rep in 0..n_rep {
                            let (u, head) = ((i - k * ATT_BLOCK) * n_rep + rep, g * n_rep + rep);
                            let a = (r * len + i) * qd + head * hd;
                            att[a..a + hd].copy_from_slice(&o[u * hd..(u + 1) * hd]);
                        }
                    }
                }
            } else {
                // Grouped-query attention: query head `head` reads kv head `head / n_rep`. One task
                // per (query, head), on the pool when there is enough work.
                let attend = |(idx, out): (usize, &mut [f32])| {
                    let (qi, head) = (idx / nh, idx % nh);
                    let (r, i) = (qi / len, qi % len);
                    let visible = |j: usize| {
                        j <= t_past + i
                            && window.is_none_or(|w| t_past + i - j < w)
                            && key_mask.is_none_or(|m| m[r][j] == 1)
                    };
                    let q = &qkv[qi * qkv_w + head * hd..qi * qkv_w + (head + 1) * hd];
                    let base = kv.offset(r, head / n_rep, 0);
                    // Causal: keys after `t_past + i` are never visible.
                    let tv = t_past + i + 1;
                    let (k, v) = (&kc[base..base + tv * hd], &vc[base..base + tv * hd]);
                    // A padding query that sees no key gets zeros; its output is never used.
                    attention::attend_query(q, k, v, scale, attn_cap, visible, out);
                };
                if n * nh * t * hd < 1 << 18 {
                    att.chunks_mut(hd).enumerate().for_each(attend);
                } else {
                    att.par_chunks_mut(hd).enumerate().for_each(attend);
                }
            }
            lc.raw_kv = Some(kv);
            o_m.matmul_into(&att, n, &mut proj)?;
            if let Some(p) = &block.post_norms {
                rms_norm_in_place_rows(&mut proj, &p.attn)?;
            }
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
            rms_norm_rows(&x, &block.mlp_norm, &mut xn)?;
            gu_m.matmul_into(&xn, n, &mut gu)?;
            for (a, g) in act.chunks_exact_mut(ffn).zip(gu.chunks_exact(2 * ffn)) {
                let (gate, up) = g.split_at(ffn);
                for ((a, &g), &u) in a.iter_mut().zip(gate).zip(up) {
                    *a = match gemma {
                        Some(_) => super::gemma::gelu(g) * u,
                        None => g / (1.0 + (-g).exp()) * u,
                    };
                }
            }
            down_m.matmul_into(&act, n, &mut proj)?;
            if let Some(p) = &block.post_norms {
                rms_norm_in_place_rows(&mut proj, &p.ffw)?;
            }
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
        }
        // Final norm and logits of each row's last position only.
        let last: Vec<f32> = x
            .chunks_exact(len * h)
            .flat_map(|row| row[(len - 1) * h..].iter().copied())
            .collect();
        let mut last_n = vec![0f32; b * h];
        rms_norm_rows(&last, &self.norm, &mut last_n)?;
        let head = self
            .lm_head
            .native()
            .context("llama run_native: lm_head is not native")?;
        let mut logits = vec![0f32; b * head.rows()];
        head.matmul_into(&last_n, b, &mut logits)?;
        if let Some(cap) = gemma.and_then(|g| g.final_softcap) {
            super::gemma::softcap_in_place(&mut logits, cap as f32);
        }
        Ok(Tensor::from_vec(logits, (b, head.rows()), &self.device)?)
    }
}

/// Run `f` on the f32 data of a contiguous CPU tensor (no copy).
pub(super) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .context("llama: expected a contiguous tensor")?;
    match &*storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => Ok(f(&v[start..end])),
        _ => bail!("llama: expected an f32 CPU tensor"),
    }
}

/// RMSNorm of each `[hidden]` row of `x` into `out`, rounded as ggml computes it (sum of squares
/// in f64, `x * (1 / sqrt(mean + eps))`, then the weight), so that the activations quantized next
/// land on the same integers as llama.cpp's.
fn rms_norm_rows(x: &[f32], norm: &RmsNorm, out: &mut [f32]) -> Result<()> {
    with_f32(&norm.weight, |w| {
        let h = w.len();
        for (xs, o) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
            o.copy_from_slice(xs);
            rms_norm_in_place(o, w, norm.eps);
        }
    })
}

/// [`rms_norm_rows`] in place.
fn rms_norm_in_place_rows(x: &mut [f32], norm: &RmsNorm) -> Result<()> {
    with_f32(&norm.weight, |w| {
        for xs in x.chunks_exact_mut(w.len()) {
            rms_norm_in_place(xs, w, norm.eps);
        }
    })
}

/// [`rms_norm_rows`] of one row in place (`w`: the weight, `x.len()` values).
pub(super) fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let sum2: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let scale = 1.0 / ((sum2 / x.len() as f64) as f32 + eps).sqrt();
    for (v, &w) in x.iter_mut().zip(w) {
        *v = (*v * scale) * w;
    }
}
