//! The tensor forward pass (candle ops): prefill of long prompts, teacher forcing, and every weight
//! mode other than native.

use super::{key_mask, left_pad, positions, Llama, RopeLayout};
use crate::generators::{GenInput, LayerCache};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};

impl Llama {
    /// cos/sin `[rows, len, head_dim / 2]` for positions `[rows, len]` u32 and inverse
    /// frequencies `inv_freq: [head_dim / 2]`, both multiplied by `scale` (LongRoPE's attention
    /// factor, else 1).
    pub(super) fn rotary(
        &self,
        positions: &Tensor,
        inv_freq: &Tensor,
        scale: f32,
    ) -> Result<(Tensor, Tensor)> {
        let (b, l) = positions.dims2()?;
        let half = inv_freq.dim(0)?;
        let pos = positions.to_dtype(DType::F32)?.reshape((b, l, 1))?;
        let freqs = pos.broadcast_mul(&inv_freq.reshape((1, 1, half))?)?;
        let (cos, sin) = (freqs.cos()?, freqs.sin()?);
        Ok(if scale == 1.0 {
            (cos.contiguous()?, sin.contiguous()?)
        } else {
            ((cos * scale as f64)?, (sin * scale as f64)?)
        })
    }

    /// Rotary embedding of `x: [rows, heads, len, head_dim]` with cos/sin `[rows, len, head_dim / 2]`.
    /// candle's fused kernels have no backward pass; `differentiable` spells HF's `rotate_half` out.
    pub(super) fn rope(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        differentiable: bool,
    ) -> Result<Tensor> {
        Ok(match (self.rope_layout, differentiable) {
            (RopeLayout::Halves, false) => candle_nn::rotary_emb::rope(x, cos, sin)?,
            (RopeLayout::Interleaved, false) => candle_nn::rotary_emb::rope_i(x, cos, sin)?,
            (RopeLayout::Halves, true) => {
                let full = |t: &Tensor| Tensor::cat(&[t, t], D::Minus1)?.unsqueeze(1);
                let half = x.dim(D::Minus1)? / 2;
                let rotated = Tensor::cat(
                    &[
                        &x.narrow(D::Minus1, half, half)?.neg()?,
                        &x.narrow(D::Minus1, 0, half)?,
                    ],
                    D::Minus1,
                )?;
                (x.broadcast_mul(&full(cos)?)? + rotated.broadcast_mul(&full(sin)?)?)?
            }
            (RopeLayout::Interleaved, true) => {
                bail!(
                    "llama: training needs HF's rotary layout (Llama::make_trainable converts it)"
                )
            }
        })
    }

    /// Run the transformer over `ids: [rows, len]` at `positions: [rows, len]`, appending to `cache`
    /// (one entry per layer; empty = no past). `mask`: additive `[rows, 1, len, past + len]` or None
    /// (no padding, and causal masking unnecessary because `len == 1`). `grad`: record the graph
    /// through trainable weights (teacher forcing for training), else inference with the fused
    /// kernels. Returns hidden states `[rows, len, hidden]` after the final norm.
    pub(super) fn run(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut [LayerCache],
        grad: bool,
    ) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let cfg = &self.config;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let n_rep = nh / nkv;
        let global_rope = self.rotary(positions, &self.inv_freq, cfg.rope_attn_factor(false))?;
        let local_rope = match &self.inv_freq_local {
            Some(f) => Some(self.rotary(positions, f, cfg.rope_attn_factor(true))?),
            None => None,
        };
        let mut x =
            self.embed
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, l, cfg.hidden_size))?;
        if cfg.gemma.is_some() {
            // Gemma scales the embeddings by sqrt(hidden), rounded to f32 as HF and ggml do.
            x = (x * (cfg.hidden_size as f32).sqrt() as f64)?;
        }
        let scale = cfg.attn_scale() as f64;
        // Mask broadcast over the n_rep query heads that share a key/value head.
        let mask = match mask {
            Some(m) => Some(m.unsqueeze(2)?), // [b, 1, 1, l, k]
            None => None,
        };
        // Sliding blocks add a band to the mask (every layer's cache has the same length).
        let past = match cache.first().and_then(|c| c.self_kv.as_ref()) {
            Some((k, _)) => k.dim(2)?,
            None => 0,
        };
        let window_mask = match cfg.gemma.as_ref().and_then(|g| g.sliding_window) {
            Some(w) if past + l > 1 => {
                let band = super::gemma::window_band(l, past + l, w, &self.device)?;
                Some(match &mask {
                    Some(m) => m.broadcast_minimum(&band)?,
                    None => band,
                })
            }
            _ => None,
        };
        for (i, (block, layer_cache)) in self.blocks.iter().zip(cache.iter_mut()).enumerate() {
            let (cos, sin) = match (&local_rope, cfg.local_rope(i)) {
                (Some(r), true) => r,
                _ => &global_rope,
            };
            let window = cfg.gemma.as_ref().and_then(|g| g.window(i));
            let mask = match window {
                Some(_) => window_mask.as_ref(),
                None => mask.as_ref(),
            };
            let residual = &x;
            let differentiable = block.differentiable && grad;
            let hs = block.attn_norm.forward(&x, grad)?;
            let a = &block.attn;
            let qkv: [Tensor; 3] = a
                .qkv
                .forward(&hs, grad)?
                .try_into()
                .map_err(|_| anyhow::anyhow!("llama: q/k/v projections are not three"))?;
            let [q, k, v] = a.extras.apply(qkv, (nh, nkv, hd), grad)?;
            let q = q.transpose(1, 2)?.contiguous()?;
            let k = k.transpose(1, 2)?.contiguous()?;
            let v = v.transpose(1, 2)?.contiguous()?;
            let q = self.rope(&q, cos, sin, differentiable)?;
            let k = self.rope(&k, cos, sin, differentiable)?;
            let (k, v) = match &layer_cache.self_kv {
                Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
                None => (k, v),
            };
            layer_cache.self_kv = Some((k.clone(), v.clone()));
            let k_len = k.dim(2)?;
            // Grouped-query attention without copying K/V: query heads h = j * n_rep + r use kv head j.
            let q = q.reshape((b, nkv, n_rep * l, hd))?;
            let att = (q.matmul(&k.t()?)? * scale)?;
            let att = match cfg.gemma.as_ref().and_then(|g| g.attn_softcap) {
                Some(cap) => super::gemma::softcap(&att, cap)?,
                None => att,
            };
            let att = match mask {
                Some(m) => att
                    .reshape((b, nkv, n_rep, l, k_len))?
                    .broadcast_add(m)?
                    .reshape((b, nkv, n_rep * l, k_len))?,
                None => att,
            };
            let att = match differentiable {
                true => candle_nn::ops::softmax(&att, D::Minus1)?,
                false => candle_nn::ops::softmax_last_dim(&att)?,
            };
            let y = att
                .matmul(&v)?
                .reshape((b, nh, l, hd))?
                .transpose(1, 2)?
                .reshape((b, l, nh * hd))?;
            let y = a.o.forward(&y, grad)?;
            let y = match &block.post_norms {
                Some(p) => p.attn.forward(&y, grad)?,
                None => y,
            };
            x = (residual + y)?;
            let residual = &x;
            let hs = block.mlp_norm.forward(&x, grad)?;
            let m = &block.mlp;
            let [gate, up]: [Tensor; 2] = m
                .gate_up
                .forward(&hs, grad)?
                .try_into()
                .map_err(|_| anyhow::anyhow!("llama: gate/up projections are not two"))?;
            let gated = match cfg.gemma {
                Some(_) => (super::gemma::gelu_tensor(&gate, differentiable)? * up)?,
                None => (gate.silu()? * up)?,
            };
            let y = m.down.forward(&gated, grad)?;
            let y = match &block.post_norms {
                Some(p) => p.ffw.forward(&y, grad)?,
                None => y,
            };
            x = (residual + y)?;
        }
        Ok(self.norm.forward(&x, grad)?)
    }

    /// Additive mask `[rows, 1, q_len, past + q_len]`: query i (absolute column past + i) sees key j
    /// when `j <= past + i` and `key_mask[row, j] == 1`. Fully masked (padding) queries stay finite.
    pub(super) fn additive_mask(
        key_mask: &[Vec<u32>],
        q_len: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let rows = key_mask.len();
        let k_len = key_mask.first().map_or(0, |r| r.len());
        let past = k_len - q_len;
        let mut data = Vec::with_capacity(rows * q_len * k_len);
        for row in key_mask {
            for i in 0..q_len {
                data.extend(row.iter().enumerate().map(|(j, &m)| {
                    if j <= past + i && m == 1 {
                        0f32
                    } else {
                        f32::MIN
                    }
                }));
            }
        }
        Ok(Tensor::from_vec(data, (rows, 1, q_len, k_len), device)?)
    }

    /// Logits `[.., vocab]` of final hidden states `[.., hidden]` (Gemma's final soft-cap applied).
    fn head(&self, hidden: &Tensor, grad: bool) -> Result<Tensor> {
        let logits = self.lm_head.forward(hidden, grad)?;
        match self.config.gemma.as_ref().and_then(|g| g.final_softcap) {
            Some(cap) => super::gemma::softcap(&logits, cap),
            None => Ok(logits),
        }
    }

    /// Logits `[rows, vocab]` of the last position of `hidden: [rows, len, hidden]`.
    pub(super) fn last_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let l = hidden.dim(1)?;
        let last = hidden.narrow(1, l - 1, 1)?.contiguous()?;
        Ok(self.head(&last, false)?.squeeze(1)?.to_dtype(DType::F32)?)
    }

    /// Hidden states `[rows, len, hidden]` of left-padded `rows` (real lengths `lens`), each row at
    /// its own positions, causal and padding mask applied, no past.
    fn run_left_padded(&self, rows: &[Vec<u32>], lens: &[usize]) -> Result<Tensor> {
        let l = rows.first().map_or(0, |r| r.len());
        let ids = crate::tokenize::ids_tensor(rows, &self.device)?;
        let pos = crate::tokenize::ids_tensor(&positions(lens, l), &self.device)?;
        let mask = Self::additive_mask(&key_mask(lens, l), l, &self.device)?;
        let mut cache = vec![LayerCache::default(); self.blocks.len()];
        self.run(&ids, &pos, Some(&mask), &mut cache, true)
    }

    /// Teacher-forced logits `[rows, len, vocab]` for `input_ids: [rows, len]` u32 and a right-padded
    /// `attention_mask: [rows, len]` (rows are left-padded internally; padded positions give zeros).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (left, lens) = left_pad(input_ids, attention_mask, self.special.pad)?;
        let rows = left.len();
        let l = left.first().map_or(0, |r| r.len());
        let hidden = self.run_left_padded(&left, &lens)?;
        let logits = self.head(&hidden, true)?;
        // Back to the caller's right-padded layout.
        let per_row = (0..rows)
            .map(|r| {
                let row = logits.get(r)?;
                let real = row.narrow(0, l - lens[r], lens[r])?;
                if lens[r] == l {
                    Ok(real)
                } else {
                    Ok(Tensor::cat(
                        &[&real, &row.narrow(0, 0, l - lens[r])?.zeros_like()?],
                        0,
                    )?)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&per_row, 0)?)
    }

    /// [`CausalLm::forward`](crate::generators::CausalLm::forward): prompts (right-padded `input`)
    /// followed by `decoder_input_ids[:, 1..]`, in one pass; logits `[rows, T, vocab]` from the
    /// last prompt position on (the vocabulary projection only where a target is predicted).
    pub(super) fn continuation_logits(
        &self,
        input: &GenInput,
        decoder_input_ids: &Tensor,
    ) -> Result<Tensor> {
        let (left, lens) = left_pad(&input.input_ids, &input.attention_mask, self.special.pad)?;
        let continuation = decoder_input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        if continuation.len() != left.len() {
            bail!(
                "llama forward: {} continuations for {} prompts",
                continuation.len(),
                left.len()
            );
        }
        let t = continuation.first().map_or(0, |r| r.len());
        if t == 0 {
            bail!("llama forward: empty decoder_input_ids");
        }
        let l = left.first().map_or(0, |r| r.len());
        let rows: Vec<Vec<u32>> = left
            .iter()
            .zip(&continuation)
            .map(|(p, c)| p.iter().chain(&c[1..]).copied().collect())
            .collect();
        let lens: Vec<usize> = lens.iter().map(|n| n + t - 1).collect();
        let hidden = self.run_left_padded(&rows, &lens)?;
        let targets = hidden.narrow(1, l - 1, t)?.contiguous()?;
        Ok(self.head(&targets, true)?.to_dtype(DType::F32)?)
    }

    /// Log-probabilities of `continuation` given `prompt` (teacher forcing, one unpadded sequence):
    /// entry t is `log p(continuation[t] | prompt, continuation[..t])`. `prompt` must be non-empty.
    pub fn score_continuation(&self, prompt: &[u32], continuation: &[u32]) -> Result<Vec<f32>> {
        if prompt.is_empty() {
            bail!("score_continuation: empty prompt (start it with BOS)");
        }
        let mut all = prompt.to_vec();
        all.extend_from_slice(continuation);
        let n = all.len();
        let ids = Tensor::from_vec(all.clone(), (1, n), &self.device)?;
        let mask = Tensor::ones((1, n), DType::U32, &self.device)?;
        let logits = self.forward(&ids, &mask)?.squeeze(0)?;
        let logp = candle_nn::ops::log_softmax(
            &logits.narrow(0, prompt.len() - 1, continuation.len())?,
            D::Minus1,
        )?;
        let logp = logp.to_vec2::<f32>()?;
        Ok(continuation
            .iter()
            .enumerate()
            .map(|(t, &id)| logp[t][id as usize])
            .collect())
    }
}
