//! The Gemma families on the Llama blocks. Gemma 2: embeddings scaled by `sqrt(hidden)`, a GELU
//! (tanh) gated MLP, RMSNorms after attention and after the MLP (`post_attention_norm`,
//! `post_ffw_norm`), attention-score and final-logit soft-capping (`cap * tanh(x / cap)`), and a
//! sliding window on alternate blocks. Gemma 3 drops the soft-capping (a final cap stays optional),
//! adds Qwen3's q/k head RMSNorms ([`super::qwen::QkvExtras`]), slides on 5 blocks of 6, and
//! rotates its sliding blocks with their own base (10000). Both rotate halves (NEOX). llama.cpp's
//! converter stores Gemma's RMSNorm weights with HF's `1 +` already added, so the norms are
//! Llama's. Everything else is the Llama forward; this file holds what Gemma adds to it, for both
//! the tensor and the raw-buffer paths.

use super::{Family, RmsNorm, RopeScaling};
use crate::generators::gguf::GgufFile;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// Gemma hyper-parameters beyond Llama's (GGUF `gemma2.*` / `gemma3.*`).
#[derive(Clone, Debug, PartialEq)]
pub struct GemmaConfig {
    /// Multiplier of the queries. HF's `query_pre_attn_scalar` is not in the GGUF; llama.cpp takes
    /// `1 / sqrt(head_dim)`, or `1 / sqrt(hidden / heads)` for the 27B models (by block count),
    /// as the reference implementation's configs do; so do we.
    pub query_scale: f64,
    /// `attn_logit_softcapping` (Gemma 2), applied to the scaled scores before the softmax.
    pub attn_softcap: Option<f64>,
    /// `final_logit_softcapping`, applied to the logits.
    pub final_softcap: Option<f64>,
    /// Keys at most `window - 1` positions behind the query are seen by sliding blocks; None: no
    /// block slides.
    pub sliding_window: Option<usize>,
    /// Per block: whether it slides.
    pub sliding_layers: Vec<bool>,
    /// Rotary base and scaling of the sliding blocks.
    pub local_rope_theta: f64,
    pub local_rope_scaling: RopeScaling,
}

impl GemmaConfig {
    /// Read the metadata of a `gemma2` / `gemma3` file, with llama.cpp's defaults for absent keys;
    /// errors name the file and key.
    pub(super) fn from_gguf(
        g: &GgufFile,
        family: Family,
        (num_layers, hidden, heads, head_dim): (usize, usize, usize, usize),
        (rope_theta, rope_scaling): (f64, &RopeScaling),
    ) -> Result<Self> {
        let gemma2 = family == Family::Gemma2;
        let arch = if gemma2 { "gemma2" } else { "gemma3" };
        let k = |s: &str| format!("{arch}.{s}");
        let opt_f64 = |key: &str| -> Result<Option<f64>> {
            Ok(match g.has(key) {
                true => Some(g.f64(key)?),
                false => None,
            })
        };
        // A cap of 0 means none (llama.cpp's test for the final cap).
        let cap = |v: Option<f64>| v.filter(|&c| c != 0.0);
        let (attn_softcap, final_softcap) = if gemma2 {
            (
                cap(Some(opt_f64(&k("attn_logit_softcapping"))?.unwrap_or(50.0))),
                cap(Some(
                    opt_f64(&k("final_logit_softcapping"))?.unwrap_or(30.0),
                )),
            )
        } else {
            // llama.cpp's Gemma 3 graph has no attention cap (its converter asserts none).
            (None, cap(opt_f64(&k("final_logit_softcapping"))?))
        };
        let window_key = k("attention.sliding_window");
        let window = match (g.has(&window_key), gemma2) {
            (true, _) => g.usize(&window_key)?,
            (false, true) => 4096,
            (false, false) => 0,
        };
        let pattern_key = k("attention.sliding_window_pattern");
        let sliding_layers: Vec<bool> = if !g.has(&pattern_key) {
            every_nth_global(num_layers, if gemma2 { 2 } else { 6 })
        } else if let Ok(n) = g.usize(&pattern_key) {
            every_nth_global(num_layers, n)
        } else {
            let v = g.value(&pattern_key)?;
            let flags = match v {
                candle_core::quantized::gguf_file::Value::Array(a) => a
                    .iter()
                    .map(|x| x.to_bool().ok())
                    .collect::<Option<Vec<bool>>>(),
                _ => None,
            };
            match flags {
                Some(f) if f.len() == num_layers => f,
                _ => bail!(
                    "{}: `{pattern_key}` is neither a count nor {num_layers} booleans",
                    g.path.display()
                ),
            }
        };
        let big = num_layers == if gemma2 { 46 } else { 62 };
        let query_scale = match big {
            true => 1.0 / ((hidden / heads) as f32).sqrt() as f64,
            false => 1.0 / (head_dim as f32).sqrt() as f64,
        };
        let local_rope_theta = match opt_f64(&k("rope.freq_base_swa"))? {
            Some(t) => t,
            None if gemma2 => rope_theta,
            None => 10000.0,
        };
        Ok(Self {
            query_scale,
            attn_softcap,
            final_softcap,
            sliding_window: (window > 0).then_some(window),
            sliding_layers,
            local_rope_theta,
            // Gemma 3's linear scaling is for the global blocks only.
            local_rope_scaling: match gemma2 {
                true => rope_scaling.clone(),
                false => RopeScaling::None,
            },
        })
    }

    /// Whether block `layer` attends through the sliding window.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && self.sliding_layers.get(layer) == Some(&true)
    }

    /// The window of block `layer` (None: it sees every past key).
    pub(super) fn window(&self, layer: usize) -> Option<usize> {
        self.sliding_window.filter(|_| self.is_sliding(layer))
    }
}

/// llama.cpp's `set_swa_pattern(n)`: every `n`-th block (the last of each group) is global, the
/// others slide; `n == 0`: all slide.
fn every_nth_global(layers: usize, n: usize) -> Vec<bool> {
    (0..layers).map(|i| n == 0 || i % n < n - 1).collect()
}

/// A Gemma block's norms of the attention and MLP outputs, weights `[hidden]`.
pub(super) struct PostNorms {
    pub(super) attn: RmsNorm,
    pub(super) ffw: RmsNorm,
}

impl PostNorms {
    /// Block `i`'s `post_attention_norm` and `post_ffw_norm` (shapes checked).
    pub(super) fn from_gguf(
        g: &GgufFile,
        i: usize,
        hidden: usize,
        eps: f64,
        device: &Device,
    ) -> Result<Self> {
        let read = |s: &str| -> Result<RmsNorm> {
            let name = format!("blk.{i}.{s}.weight");
            Ok(RmsNorm::new(
                g.tensor(&name, &[hidden], device)?.dequantize(device)?,
                eps,
            ))
        };
        Ok(Self {
            attn: read("post_attention_norm")?,
            ffw: read("post_ffw_norm")?,
        })
    }
}

/// `cap * tanh(x / cap)` in place, rounded as ggml's scale / tanh / scale.
pub(super) fn softcap_in_place(x: &mut [f32], cap: f32) {
    let inv = 1.0 / cap;
    for v in x.iter_mut() {
        *v = (*v * inv).tanh() * cap;
    }
}

/// [`softcap_in_place`] of a tensor.
pub(super) fn softcap(x: &Tensor, cap: f64) -> Result<Tensor> {
    Ok(((x * (1.0 / cap))?.tanh()? * cap)?)
}

/// GELU (tanh approximation) as ggml's CPU kernel computes it: through a table of f16 inputs
/// (`x` rounded to f16, the result rounded to f16), identity above 10 and 0 below -10.
pub(super) fn gelu(x: f32) -> f32 {
    if x <= -10.0 {
        return 0.0;
    }
    if x >= 10.0 {
        return x;
    }
    let x = half::f16::from_f32(x).to_f32();
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let y = 0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x * x)).tanh());
    half::f16::from_f32(y).to_f32()
}

/// [`gelu`] of every value, as a candle op without a backward pass (CPU, f32).
struct GgmlGelu;

impl candle_core::CustomOp1 for GgmlGelu {
    fn name(&self) -> &'static str {
        "ggml-gelu"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(v) = storage else {
            candle_core::bail!("ggml-gelu: f32 only");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("ggml-gelu: contiguous input only");
        };
        let out = v[start..end].iter().map(|&x| gelu(x)).collect();
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// The tensor path's GELU (tanh): [`gelu`]'s f16 table on CPU f32 tensors, so that the values
/// the down projection quantizes land where llama.cpp's do (the exact function moves a few of
/// them by an f16 step: 7.8e-2 on Gemma 3's Q6_K fixture logits at position 0); candle's GELU
/// elsewhere and where gradients flow.
pub(super) fn gelu_tensor(x: &Tensor, differentiable: bool) -> Result<Tensor> {
    Ok(
        match !differentiable && x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
            true => x.contiguous()?.apply_op1_no_bwd(&GgmlGelu)?,
            false => x.gelu()?,
        },
    )
}

/// Additive band `[1, 1, 1, q_len, past + q_len]` of a sliding block: query `i` (column
/// `past + i`) may see key `j` when `past + i - j < window` (0), else `f32::MIN`; combined with
/// the causal/padding mask by a minimum, so that a fully masked row stays finite.
pub(super) fn window_band(
    q_len: usize,
    k_len: usize,
    window: usize,
    device: &Device,
) -> Result<Tensor> {
    let past = k_len - q_len;
    let data: Vec<f32> = (0..q_len)
        .flat_map(|i| {
            (0..k_len).map(move |j| match (past + i).saturating_sub(j) < window {
                true => 0.0,
                false => f32::MIN,
            })
        })
        .collect();
    Ok(Tensor::from_vec(data, (1, 1, 1, q_len, k_len), device)?)
}
