//! Llama-family decoder-only language model (`LlamaForCausalLM`: RMSNorm, rotary positions, grouped-query
//! attention, SwiGLU MLP, tied or untied `lm_head`), loaded from a GGUF file (weights stay quantized and
//! run through `QMatMul`) or from a HF safetensors directory.
//!
//! Prompts of different lengths are prefilled together, left-padded, each row with its own positions
//! (`position = index among the row's real tokens`), so every row computes what it would alone.

mod config;
mod forward;
mod gemma;
mod load;
mod lora;
mod phi3;
mod qwen;
mod raw;
mod train;

pub use config::{Family, LlamaConfig, RopeScaling};
pub use gemma::GemmaConfig;
pub use lora::{LoraAdapter, LoraConfig, LORA_MODULES};

use super::quant::QMatrix;
use super::{ActivationShape, CausalLm, DecodeState, Decoder, GenInput, LayerCache, SpecialIds};
use anyhow::{bail, Context, Result};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor, D};
use std::path::PathBuf;

/// Longest prompt (tokens per row) prefilled on raw buffers by [`GgufWeights::Native`] models.
/// The raw path's prefill attention is blocked ([`crate::kernels::attention::attend_block`]: keys
/// and values read once per block of 8 positions × the query heads of a kv head, causal half
/// only), so it is faster than the tensor path's batched gemm + softmax at every length measured
/// (SmolLM2, 2 cores, 997-token RAG prompt: see `bench/results/decode-kquant`); the cap only
/// bounds the raw buffers (`[len, 2 × intermediate]` f32 and the like).
const RAW_PREFILL_MAX_LEN: usize = 16 * 1024;

/// How GGUF weights are held in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GgufWeights {
    /// The file's types stay as stored and run through this crate's own kernels
    /// ([`super::quant`]: F32/F16/BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K; AVX2 when
    /// available, as llama.cpp); other types go through candle. Prefill and decode steps then run
    /// on raw buffers (no per-op tensor overhead).
    #[default]
    Native,
    /// candle's `QMatMul` with the file's quantized types, except Q4_1/Q5_0/Q5_1, which are
    /// re-quantized to Q8_0 at load: candle 0.11's CPU kernels for those types are scalar while Q8_0
    /// has an AVX2 kernel. Q8_0 of a Q4_1 value adds an error ~8x smaller than Q4_1's own
    /// quantization step (measured in tests).
    Fast,
    /// Exactly the quantized types stored in the file.
    AsStored,
    /// Everything dequantized to f32: reference numerics (no activation quantization), 4-8x memory.
    F32,
}

/// RMSNorm, f32 math as in HF: candle's fused kernel, which has no backward pass, unless a gradient
/// must flow through it (trainable layers and everything above them).
struct RmsNorm {
    weight: Tensor,
    eps: f32,
    differentiable: bool,
}

impl RmsNorm {
    fn new(weight: Tensor, eps: f64) -> Self {
        Self {
            weight,
            eps: eps as f32,
            differentiable: false,
        }
    }

    /// `grad`: record the graph through a trainable weight (false: the weight is a constant).
    fn forward(&self, x: &Tensor, grad: bool) -> candle_core::Result<Tensor> {
        match self.differentiable && grad {
            true => candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps),
            false => candle_nn::ops::rms_norm(x, &self.weight.detach(), self.eps),
        }
    }
}

/// A linear layer without bias: candle's matmul (f32 or quantized), a native quantized one, or a
/// frozen one with a trainable LoRA update.
enum Linear {
    Candle(QMatMul),
    Native(QMatrix),
    Lora(Box<lora::LoraLinear>),
}

impl Linear {
    /// `grad`: record the graph through trainable weights. Without it a [`candle_core::Var`]
    /// weight is used detached, so that inference with a model being trained (evaluation while
    /// training) keeps no activations alive for a backward pass that never comes.
    fn forward(&self, x: &Tensor, grad: bool) -> candle_core::Result<Tensor> {
        match self {
            Linear::Candle(QMatMul::Tensor(w)) if !grad => QMatMul::Tensor(w.detach()).forward(x),
            Linear::Candle(m) => m.forward(x),
            Linear::Native(m) => m.forward(x),
            Linear::Lora(l) => l.forward(x, grad),
        }
    }

    fn native(&self) -> Option<&QMatrix> {
        match self {
            Linear::Native(m) => Some(m),
            Linear::Candle(_) | Linear::Lora(_) => None,
        }
    }
}

/// Linear maps that read the same input (q/k/v; gate/up): separate, or stacked into one native
/// matrix (one pass over the input, one parallel dispatch) whose output is split by `sizes`.
enum Projections {
    Separate(Vec<Linear>),
    Stacked { w: QMatrix, sizes: Vec<usize> },
}

impl Projections {
    /// Stack native matrices (of any types: a stacked matrix keeps a row range per type);
    /// anything else stays separate.
    fn new(parts: Vec<Linear>) -> Result<Self> {
        let natives: Option<Vec<&QMatrix>> = parts.iter().map(Linear::native).collect();
        if let Some(n) = natives {
            return Ok(Projections::Stacked {
                sizes: n.iter().map(|m| m.rows()).collect(),
                w: QMatrix::concat_rows(&n)?,
            });
        }
        Ok(Projections::Separate(parts))
    }

    /// One output per projection, `[.., out_i]`.
    fn forward(&self, x: &Tensor, grad: bool) -> Result<Vec<Tensor>> {
        match self {
            Projections::Separate(ps) => ps.iter().map(|p| Ok(p.forward(x, grad)?)).collect(),
            Projections::Stacked { w, sizes } => {
                let y = w.forward(x)?;
                let mut start = 0;
                let mut out = Vec::with_capacity(sizes.len());
                for &n in sizes {
                    out.push(y.narrow(D::Minus1, start, n)?.contiguous()?);
                    start += n;
                }
                Ok(out)
            }
        }
    }
}

struct Attention {
    /// q, k, v.
    qkv: Projections,
    /// The Qwen families' q/k/v bias or q/k head norms (and Gemma 3's).
    extras: qwen::QkvExtras,
    o: Linear,
}

struct Mlp {
    /// gate, up.
    gate_up: Projections,
    down: Linear,
}

struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: Mlp,
    /// Gemma's norms of the attention and MLP outputs (before each residual add).
    post_norms: Option<gemma::PostNorms>,
    /// Use ops with a backward pass (softmax, rotary) because a gradient flows through this block.
    differentiable: bool,
}

/// Rotary layout of the q/k projections: HF stores halves (`rotate_half`), llama.cpp's GGUF converter
/// permutes the rows so that pairs are interleaved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RopeLayout {
    Halves,
    Interleaved,
}

/// A Llama-family causal language model.
pub struct Llama {
    pub config: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    inv_freq: Tensor,
    /// Inverse frequencies of Gemma 3's sliding blocks, where they differ from `inv_freq`.
    inv_freq_local: Option<Tensor>,
    /// Every matmul is native (stacked projections): prefill and decode steps take
    /// [`Llama::run_native`].
    native_decode: bool,
    rope_layout: RopeLayout,
    special: SpecialIds,
    device: Device,
    /// File or directory the weights came from.
    pub source: PathBuf,
    /// Trainable parameters by HF name ([`Llama::make_trainable`]) or PEFT key
    /// ([`Llama::add_lora`]).
    vars: Vec<(String, candle_core::Var)>,
    /// The adapters' settings when LoRA adapters were added.
    lora: Option<LoraConfig>,
}

impl Llama {
    /// Whether prefill and decode steps run on raw buffers ([`GgufWeights::Native`] on CPU).
    pub fn raw_decode(&self) -> bool {
        self.native_decode
    }

    /// Turn the raw-buffer path off (`false`: prefill and steps run through the tensor path, as for
    /// the other weight modes) to compare the two. Turning it on only works where [`Llama::raw_decode`]
    /// was true at load.
    pub fn set_raw_decode(&mut self, on: bool) -> Result<()> {
        if on && !self.native_decode_ok() {
            bail!("llama: raw decode needs native weights on CPU (GgufWeights::Native)");
        }
        self.native_decode = on;
        Ok(())
    }

    fn native_decode_ok(&self) -> bool {
        self.device.is_cpu()
            && self.embed.dtype() == DType::F32
            && self.lm_head.native().is_some()
            && self.blocks.iter().all(|b| {
                matches!(b.attn.qkv, Projections::Stacked { ref sizes, .. } if sizes.len() == 3)
                    && matches!(b.mlp.gate_up, Projections::Stacked { ref sizes, .. } if sizes.len() == 2)
                    && b.attn.o.native().is_some()
                    && b.mlp.down.native().is_some()
            })
    }
}

/// Re-lay right-padded rows (`mask` 1 = token) as left-padded rows; returns them and the real lengths.
fn left_pad(ids: &Tensor, mask: &Tensor, pad: u32) -> Result<(Vec<Vec<u32>>, Vec<usize>)> {
    let ids = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let mask = mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let l = ids.first().map_or(0, |r| r.len());
    let mut out = Vec::with_capacity(ids.len());
    let mut lens = Vec::with_capacity(ids.len());
    for (r, (row, m)) in ids.iter().zip(&mask).enumerate() {
        let n = m.iter().filter(|&&x| x == 1).count();
        if n == 0 {
            bail!("row {r} of the generator input is empty (attention_mask all 0)");
        }
        if m[..n].iter().any(|&x| x != 1) {
            bail!("row {r} of the generator input is not right-padded");
        }
        let mut left = vec![pad; l - n];
        left.extend_from_slice(&row[..n]);
        out.push(left);
        lens.push(n);
    }
    Ok((out, lens))
}

fn key_mask(lens: &[usize], l: usize) -> Vec<Vec<u32>> {
    lens.iter()
        .map(|&n| (0..l).map(|j| u32::from(j >= l - n)).collect())
        .collect()
}

/// Per-row positions of left-padded rows: 0 at the first real token (padding gets 0 too).
fn positions(lens: &[usize], l: usize) -> Vec<Vec<u32>> {
    lens.iter()
        .map(|&n| (0..l).map(|j| (j + n).saturating_sub(l) as u32).collect())
        .collect()
}

impl Decoder for Llama {
    fn special_ids(&self) -> &SpecialIds {
        &self.special
    }

    /// Prefill the prompts (`input.input_ids: [rows, len]`, right-padded) together, left-padded;
    /// `pending_logits` = next-token logits `[rows, vocab]` of every prompt.
    fn start(&self, input: &GenInput) -> Result<DecodeState> {
        let (left, lens) = left_pad(&input.input_ids, &input.attention_mask, self.special.pad)?;
        let l = left.first().map_or(0, |r| r.len());
        let key_mask = key_mask(&lens, l);
        let mut layers = vec![LayerCache::default(); self.blocks.len()];
        // Raw buffers up to RAG-sized prompts; longer ones go through the tensor path, whose
        // attention is a batched gemm (the raw path's attention is O(len^2) dot products).
        let logits = if self.native_decode && l <= RAW_PREFILL_MAX_LEN {
            let toks: Vec<u32> = left.concat();
            let pos: Vec<u32> = positions(&lens, l).concat();
            let padded = lens.iter().any(|&n| n != l);
            let mask = padded.then_some(key_mask.as_slice());
            rayon::scope(|_| self.run_native(&toks, l, &pos, mask, &mut layers))?
        } else {
            let ids = crate::tokenize::ids_tensor(&left, &self.device)?;
            let pos = crate::tokenize::ids_tensor(&positions(&lens, l), &self.device)?;
            let mask = if l == 1 {
                None
            } else {
                Some(Self::additive_mask(&key_mask, l, &self.device)?)
            };
            // Decoding never backpropagates (training uses CausalLm::forward).
            let hidden = self.run(&ids, &pos, mask.as_ref(), &mut layers, false)?;
            self.last_logits(&hidden)?
        };
        let next: Vec<u32> = lens.iter().map(|&n| n as u32).collect();
        Ok(DecodeState {
            layers,
            past_mask: Some(crate::tokenize::ids_tensor(&key_mask, &self.device)?),
            next_position: Some(Tensor::new(next, &self.device)?),
            steps: 0,
            pending_logits: Some(logits),
            ..Default::default()
        })
    }

    /// Append one token per row (`tokens: [rows]` u32) and return next-token logits `[rows, vocab]`.
    fn step(&self, state: &mut DecodeState, tokens: &Tensor) -> Result<Tensor> {
        let rows = tokens.dim(0)?;
        let past_mask = state
            .past_mask
            .as_ref()
            .context("llama step: decode state has no past_mask (call start first)")?;
        let next = state
            .next_position
            .as_ref()
            .context("llama step: decode state has no next_position")?;
        if past_mask.dim(0)? != rows {
            bail!("llama step: {rows} tokens for {} rows", past_mask.dim(0)?);
        }
        let ones = Tensor::ones((rows, 1), DType::U32, &self.device)?;
        let new_mask = Tensor::cat(&[past_mask, &ones], 1)?;
        // Without padding every key is visible to the single query: no mask needed.
        let key_mask = new_mask.to_vec2::<u32>()?;
        let padded = key_mask.iter().flatten().any(|&m| m == 0);
        let mask = if padded && !self.native_decode {
            Some(Self::additive_mask(&key_mask, 1, &self.device)?)
        } else {
            None
        };
        let logits = if self.native_decode {
            let toks = tokens.to_dtype(DType::U32)?.to_vec1::<u32>()?;
            let pos = next.to_vec1::<u32>()?;
            let mask = padded.then_some(key_mask.as_slice());
            // On a pool thread, so that the matmuls' parallel splits are stolen by the other workers
            // instead of waking this thread after each one.
            let layers = &mut state.layers;
            rayon::scope(|_| self.run_native(&toks, 1, &pos, mask, layers))?
        } else {
            let ids = tokens.to_dtype(DType::U32)?.reshape((rows, 1))?;
            let pos = next.reshape((rows, 1))?;
            let hidden = self.run(&ids, &pos, mask.as_ref(), &mut state.layers, false)?;
            self.last_logits(&hidden)?
        };
        state.past_mask = Some(new_mask);
        state.next_position = Some((next + next.ones_like()?)?);
        state.steps += 1;
        Ok(logits)
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn activation_shape(&self) -> ActivationShape {
        let c = &self.config;
        ActivationShape {
            hidden: c.hidden_size,
            ffn: c.intermediate_size,
            heads: c.num_heads,
            vocab: c.vocab_size,
            input_layers: self.blocks.iter().filter(|b| b.differentiable).count(),
            decoder_layers: 0,
        }
    }
}

impl CausalLm for Llama {
    fn forward(&self, input: &GenInput, decoder_input_ids: &Tensor) -> Result<Tensor> {
        self.continuation_logits(input, decoder_input_ids)
    }

    fn vars(&self) -> Vec<(String, candle_core::Var)> {
        self.vars.clone()
    }

    /// HF `LlamaForCausalLM` weights, or with LoRA adapters the PEFT adapter directory (naming
    /// [`Llama::source`] as its base).
    fn save_pretrained(&self, dir: &std::path::Path) -> Result<()> {
        match self.lora {
            Some(_) => self.save_lora(dir, &self.source),
            None => self.save_hf(dir),
        }
    }
}
