//! The Qwen families on the Llama blocks: Qwen2 (Qwen2.5) adds a bias to the q/k/v projections,
//! Qwen3 drops it and RMS-normalises each query and key head (over `head_dim`, own weights)
//! before the rotary embedding. Both rotate halves (llama.cpp's NEOX rope: its converter does not
//! permute Qwen's q/k rows). Everything else — attention, MLP, RoPE, the caches — is the Llama
//! forward; this file holds what the two families add to it, for both the tensor and the
//! raw-buffer paths.

use super::raw::{rms_norm_in_place, with_f32};
use super::{Family, RmsNorm};
use crate::generators::gguf::GgufFile;
use anyhow::Result;
use candle_core::{Device, Tensor};

/// What a Qwen attention block adds to Llama's (all `None` for Llama).
#[derive(Default)]
pub(super) struct QkvExtras {
    /// q, k, v biases concatenated: `[q_dim + 2 * kv_dim]` (Qwen2).
    bias: Option<Tensor>,
    /// Per-head RMSNorm of queries and keys, weights `[head_dim]` (Qwen3).
    qk_norm: Option<(RmsNorm, RmsNorm)>,
}

impl QkvExtras {
    /// Read block `i`'s extra tensors of `family` from a GGUF file (shapes checked, errors name the
    /// file and tensor).
    pub(super) fn from_gguf(
        g: &GgufFile,
        family: Family,
        i: usize,
        (q_dim, kv_dim, head_dim): (usize, usize, usize),
        eps: f64,
        device: &Device,
    ) -> Result<Self> {
        let read = |name: String, n: usize| -> Result<Tensor> {
            Ok(g.tensor(&name, &[n], device)?.dequantize(device)?)
        };
        Ok(match family {
            Family::Llama | Family::Phi3 | Family::Gemma2 => Self::default(),
            Family::Qwen2 => {
                let parts = [
                    read(format!("blk.{i}.attn_q.bias"), q_dim)?,
                    read(format!("blk.{i}.attn_k.bias"), kv_dim)?,
                    read(format!("blk.{i}.attn_v.bias"), kv_dim)?,
                ];
                Self {
                    bias: Some(Tensor::cat(&parts, 0)?),
                    qk_norm: None,
                }
            }
            // Gemma 3 normalises its q/k heads the same way.
            Family::Qwen3 | Family::Gemma3 => Self {
                bias: None,
                qk_norm: Some((
                    RmsNorm::new(read(format!("blk.{i}.attn_q_norm.weight"), head_dim)?, eps),
                    RmsNorm::new(read(format!("blk.{i}.attn_k_norm.weight"), head_dim)?, eps),
                )),
            },
        })
    }

    /// Tensor path: `q/k/v: [b, l, heads * head_dim]` after the projections; returns q, k, v as
    /// `[b, l, heads, head_dim]` (`heads`: `nh`, `nkv`, `nkv`), bias added and heads normalised.
    pub(super) fn apply(
        &self,
        [q, k, v]: [Tensor; 3],
        (nh, nkv, hd): (usize, usize, usize),
        grad: bool,
    ) -> Result<[Tensor; 3]> {
        let (b, l, _) = q.dims3()?;
        let [q, k, v] = match &self.bias {
            Some(bias) => {
                let (qd, kvd) = (nh * hd, nkv * hd);
                [
                    q.broadcast_add(&bias.narrow(0, 0, qd)?)?,
                    k.broadcast_add(&bias.narrow(0, qd, kvd)?)?,
                    v.broadcast_add(&bias.narrow(0, qd + kvd, kvd)?)?,
                ]
            }
            None => [q, k, v],
        };
        let q = q.reshape((b, l, nh, hd))?;
        let k = k.reshape((b, l, nkv, hd))?;
        let v = v.reshape((b, l, nkv, hd))?;
        Ok(match &self.qk_norm {
            Some((qn, kn)) => [
                qn.forward(&q.contiguous()?, grad)?,
                kn.forward(&k.contiguous()?, grad)?,
                v,
            ],
            None => [q, k, v],
        })
    }

    /// Raw path: one row of the stacked projection output `[q_dim + 2 * kv_dim]` (heads of
    /// `head_dim`, q heads first, then k, then v), in place.
    pub(super) fn apply_raw(&self, row: &mut [f32], q_heads: usize, head_dim: usize) -> Result<()> {
        if let Some(bias) = &self.bias {
            with_f32(bias, |b| row.iter_mut().zip(b).for_each(|(x, b)| *x += b))?;
        }
        if let Some((qn, kn)) = &self.qk_norm {
            let qd = q_heads * head_dim;
            let kd = (row.len() - qd) / 2;
            let (qs, rest) = row.split_at_mut(qd);
            for (part, norm) in [(qs, qn), (&mut rest[..kd], kn)] {
                with_f32(&norm.weight, |w| {
                    for head in part.chunks_exact_mut(head_dim) {
                        rms_norm_in_place(head, w, norm.eps);
                    }
                })?;
            }
        }
        Ok(())
    }

    /// Whether this block has anything beyond Llama's (training and saving handle Llama only).
    pub(super) fn any(&self) -> bool {
        self.bias.is_some() || self.qk_norm.is_some()
    }
}
