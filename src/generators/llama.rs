//! Llama-family decoder-only language model (`LlamaForCausalLM`: RMSNorm, rotary positions, grouped-query
//! attention, SwiGLU MLP, tied or untied `lm_head`), loaded from a GGUF file (weights stay quantized and
//! run through `QMatMul`) or from a HF safetensors directory.
//!
//! Prompts of different lengths are prefilled together, left-padded, each row with its own positions
//! (`position = index among the row's real tokens`), so every row computes what it would alone.

use super::gguf::GgufFile;
use super::quant::{self, QMatrix};
use super::{DecodeState, Decoder, GenInput, LayerCache, RawKv, SpecialIds};
use anyhow::{bail, Context, Result};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Longest prompt (tokens per row) prefilled on raw buffers by [`GgufWeights::Native`] models.
/// Measured on SmolLM2 (2 cores): a 214-token RAG prompt prefills in 1.15 s raw vs 1.46 s on the
/// tensor path; at 939 tokens the two are equal (7.8 s), the raw attention's O(len²) dot products
/// catching up with the saved per-op overhead.
const RAW_PREFILL_MAX_LEN: usize = 512;

/// Rotary embedding frequency scaling (HF `rope_scaling` / `rope_parameters`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.x wavelength-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// How GGUF weights are held in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GgufWeights {
    /// Q4_1 and Q8_0 stay as stored and run through this crate's own kernels ([`super::quant`]: AVX2
    /// when available, as llama.cpp), Q5_0/Q5_1 are re-quantized to Q8_0, other types go through
    /// candle. Prefill and decode steps then run on raw buffers (no per-op tensor overhead).
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

/// Model hyper-parameters.
#[derive(Clone, Debug)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

#[derive(serde::Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default)]
    rms_norm_eps: Option<f64>,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5.x: `{rope_theta, rope_type, ...}`.
    #[serde(default)]
    rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: Option<bool>,
    #[serde(default)]
    bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pad_token_id: Option<serde_json::Value>,
}

/// First id of a config token-id field that may be an int or a list.
fn first_id(v: &Option<serde_json::Value>) -> Option<u32> {
    match v.as_ref()? {
        serde_json::Value::Number(n) => n.as_u64().map(|x| x as u32),
        serde_json::Value::Array(a) => a.first()?.as_u64().map(|x| x as u32),
        _ => None,
    }
}

fn parse_rope_scaling(v: &serde_json::Value, file: &Path) -> Result<RopeScaling> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64> {
        v.get(k).and_then(|x| x.as_f64()).with_context(|| {
            format!(
                "{}: rope scaling `{kind}` needs numeric `{k}`",
                file.display()
            )
        })
    };
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => bail!(
            "{}: unsupported rope scaling type `{other}` (supported: default, linear, llama3)",
            file.display()
        ),
    })
}

impl LlamaConfig {
    /// Read a HF `config.json` of a `LlamaForCausalLM`.
    pub fn from_hf(path: &Path) -> Result<Self> {
        let c: HfConfig = crate::hub::read_json(path)?;
        if let Some(t) = c.model_type.as_deref() {
            if !matches!(t, "llama" | "mistral") {
                bail!(
                    "{}: model_type `{t}` is not a Llama-family model",
                    path.display()
                );
            }
        }
        if let Some(act) = c.hidden_act.as_deref() {
            if !matches!(act, "silu" | "swish") {
                bail!(
                    "{}: hidden_act `{act}` unsupported (Llama uses silu)",
                    path.display()
                );
            }
        }
        if c.attention_bias == Some(true) || c.mlp_bias == Some(true) {
            bail!(
                "{}: attention_bias / mlp_bias are not supported",
                path.display()
            );
        }
        let params = c.rope_parameters.as_ref();
        let rope_theta = params
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64())
            .or(c.rope_theta)
            .unwrap_or(10000.0);
        let rope_scaling = match (params, &c.rope_scaling) {
            (_, Some(s)) if !s.is_null() => parse_rope_scaling(s, path)?,
            (Some(p), _) => parse_rope_scaling(p, path)?,
            _ => RopeScaling::None,
        };
        if c.num_attention_heads == 0 {
            bail!("{}: num_attention_heads is 0", path.display());
        }
        let num_kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        if num_kv_heads == 0 || !c.num_attention_heads.is_multiple_of(num_kv_heads) {
            bail!(
                "{}: num_attention_heads {} is not a multiple of num_key_value_heads {num_kv_heads}",
                path.display(),
                c.num_attention_heads
            );
        }
        Ok(Self {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads,
            head_dim: c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads),
            rms_norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
            bos_token_id: first_id(&c.bos_token_id),
            eos_token_id: first_id(&c.eos_token_id),
            pad_token_id: first_id(&c.pad_token_id),
        })
    }

    /// Read the `llama.*` metadata of a GGUF file; errors name the file and key.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch = g.str("general.architecture")?;
        if !matches!(arch, "llama" | "mistral") {
            bail!(
                "{}: `general.architecture` = `{arch}` is not supported (llama)",
                g.path.display()
            );
        }
        let k = |s: &str| format!("{arch}.{s}");
        let hidden_size = g.usize(&k("embedding_length"))?;
        let num_heads = g.usize(&k("attention.head_count"))?;
        if num_heads == 0 {
            bail!("{}: `{}` is 0", g.path.display(), k("attention.head_count"));
        }
        let num_kv_heads = if g.has(&k("attention.head_count_kv")) {
            g.usize(&k("attention.head_count_kv"))?
        } else {
            num_heads
        };
        if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            bail!(
                "{}: head_count {num_heads} is not a multiple of head_count_kv {num_kv_heads}",
                g.path.display()
            );
        }
        let head_dim = if g.has(&k("attention.key_length")) {
            g.usize(&k("attention.key_length"))?
        } else {
            hidden_size / num_heads
        };
        if g.has(&k("rope.dimension_count")) && g.usize(&k("rope.dimension_count"))? != head_dim {
            bail!(
                "{}: partial rotary (`{}` != head dim {head_dim}) is not supported",
                g.path.display(),
                k("rope.dimension_count")
            );
        }
        let rope_scaling = if g.has(&k("rope.scaling.type")) {
            match g.str(&k("rope.scaling.type"))? {
                "none" => RopeScaling::None,
                "linear" => RopeScaling::Linear {
                    factor: g.f64(&k("rope.scaling.factor"))?,
                },
                other => bail!(
                    "{}: `{}` = `{other}` is not supported",
                    g.path.display(),
                    k("rope.scaling.type")
                ),
            }
        } else {
            RopeScaling::None
        };
        let vocab_size = g
            .tensor_shape("token_embd.weight")?
            .dims()
            .first()
            .copied()
            .unwrap_or(0);
        if g.has(&k("vocab_size")) && g.usize(&k("vocab_size"))? != vocab_size {
            bail!(
                "{}: `{}` = {} but tensor `token_embd.weight` has {vocab_size} rows",
                g.path.display(),
                k("vocab_size"),
                g.usize(&k("vocab_size"))?
            );
        }
        let id = |key: &str| -> Result<Option<u32>> {
            if g.has(key) {
                g.u32(key).map(Some)
            } else {
                Ok(None)
            }
        };
        Ok(Self {
            vocab_size,
            hidden_size,
            intermediate_size: g.usize(&k("feed_forward_length"))?,
            num_layers: g.usize(&k("block_count"))?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: g.f64(&k("attention.layer_norm_rms_epsilon"))?,
            rope_theta: if g.has(&k("rope.freq_base")) {
                g.f64(&k("rope.freq_base"))?
            } else {
                10000.0
            },
            rope_scaling,
            tie_word_embeddings: !g.content.tensor_infos.contains_key("output.weight"),
            bos_token_id: id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: id("tokenizer.ggml.eos_token_id")?,
            pad_token_id: id("tokenizer.ggml.padding_token_id")?,
        })
    }

    /// Rotary inverse frequencies `[head_dim / 2]`, computed in f32 as HF does.
    fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / (self.rope_theta as f32).powf((2 * i) as f32 / d as f32))
            .collect();
        match self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let low_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_wavelen = original_max_position_embeddings / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f as f64;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            (f as f64 / factor) as f32
                        } else {
                            let smooth = (original_max_position_embeddings / wavelen
                                - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            ((1.0 - smooth) * f as f64 / factor + smooth * f as f64) as f32
                        }
                    })
                    .collect()
            }
        }
    }
}

/// RMSNorm for inference: candle's fused kernel (this model is not trained here), f32 math as in HF.
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, self.eps)
    }
}

/// A linear layer without bias: candle's matmul (f32 or quantized) or a native quantized one.
enum Linear {
    Candle(QMatMul),
    Native(QMatrix),
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Candle(m) => m.forward(x),
            Linear::Native(m) => m.forward(x),
        }
    }

    fn native(&self) -> Option<&QMatrix> {
        match self {
            Linear::Native(m) => Some(m),
            Linear::Candle(_) => None,
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
    /// Stack native matrices of one type; anything else stays separate.
    fn new(parts: Vec<Linear>) -> Result<Self> {
        let natives: Option<Vec<&QMatrix>> = parts.iter().map(Linear::native).collect();
        if let Some(n) = natives {
            if n.iter().all(|m| m.dtype() == n[0].dtype()) {
                return Ok(Projections::Stacked {
                    sizes: n.iter().map(|m| m.rows()).collect(),
                    w: QMatrix::concat_rows(&n)?,
                });
            }
        }
        Ok(Projections::Separate(parts))
    }

    /// One output per projection, `[.., out_i]`.
    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Projections::Separate(ps) => ps.iter().map(|p| Ok(p.forward(x)?)).collect(),
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
    /// Every matmul is native (stacked projections): prefill and decode steps take
    /// [`Llama::run_native`].
    native_decode: bool,
    rope_layout: RopeLayout,
    special: SpecialIds,
    device: Device,
    /// File or directory the weights came from.
    pub source: PathBuf,
}

impl Llama {
    /// Load from a GGUF file; matmul weights stay quantized ([`GgufWeights::default`]).
    pub fn from_gguf(g: &GgufFile, device: &Device) -> Result<Self> {
        Self::from_gguf_with(g, device, GgufWeights::default())
    }

    /// Load from a GGUF file, holding the weights as `mode` says.
    pub fn from_gguf_with(g: &GgufFile, device: &Device, mode: GgufWeights) -> Result<Self> {
        let cfg = LlamaConfig::from_gguf(g)?;
        let native_ok = device.is_cpu();
        let to_qmm = |t: Arc<QTensor>, name: &str| -> Result<Linear> {
            use candle_core::quantized::GgmlDType as T;
            let ctx = || format!("{}: converting tensor `{name}`", g.path.display());
            let requant = |t: &QTensor| -> Result<QTensor> {
                let w = t.dequantize(device).with_context(ctx)?;
                QTensor::quantize(&w, T::Q8_0).with_context(ctx)
            };
            let native = |t: &QTensor| -> Result<Linear> {
                Ok(Linear::Native(
                    QMatrix::from_qtensor(t, name).with_context(ctx)?,
                ))
            };
            Ok(match (mode, t.dtype()) {
                (GgufWeights::F32, _) => {
                    Linear::Candle(QMatMul::Tensor(t.dequantize(device).with_context(ctx)?))
                }
                (GgufWeights::Native, T::Q4_1 | T::Q8_0 | T::F32) if native_ok => native(&t)?,
                (GgufWeights::Native, T::Q5_0 | T::Q5_1) if native_ok => native(&requant(&t)?)?,
                (GgufWeights::Fast | GgufWeights::Native, T::Q4_1 | T::Q5_0 | T::Q5_1) => {
                    Linear::Candle(QMatMul::from_qtensor(requant(&t)?)?)
                }
                _ => Linear::Candle(QMatMul::from_arc(t)?),
            })
        };
        let (h, kv, hd) = (
            cfg.hidden_size,
            cfg.num_kv_heads * cfg.head_dim,
            cfg.head_dim * cfg.num_heads,
        );
        let qmm = |name: &str, shape: &[usize]| -> Result<Linear> {
            to_qmm(Arc::new(g.tensor(name, shape, device)?), name)
        };
        let norm = |name: &str| -> Result<RmsNorm> {
            let w = g.tensor(name, &[h], device)?.dequantize(device)?;
            Ok(RmsNorm {
                weight: w,
                eps: cfg.rms_norm_eps as f32,
            })
        };
        let embed_q = Arc::new(g.tensor("token_embd.weight", &[cfg.vocab_size, h], device)?);
        let embed = embed_q.dequantize(device)?;
        let lm_head = if cfg.tie_word_embeddings {
            to_qmm(embed_q, "token_embd.weight")?
        } else {
            qmm("output.weight", &[cfg.vocab_size, h])?
        };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            blocks.push(Block {
                attn_norm: norm(&p("attn_norm"))?,
                attn: Attention {
                    qkv: Projections::new(vec![
                        qmm(&p("attn_q"), &[hd, h])?,
                        qmm(&p("attn_k"), &[kv, h])?,
                        qmm(&p("attn_v"), &[kv, h])?,
                    ])?,
                    o: qmm(&p("attn_output"), &[h, hd])?,
                },
                mlp_norm: norm(&p("ffn_norm"))?,
                mlp: Mlp {
                    gate_up: Projections::new(vec![
                        qmm(&p("ffn_gate"), &[cfg.intermediate_size, h])?,
                        qmm(&p("ffn_up"), &[cfg.intermediate_size, h])?,
                    ])?,
                    down: qmm(&p("ffn_down"), &[h, cfg.intermediate_size])?,
                },
            });
        }
        let norm = norm("output_norm.weight")?;
        Self::assemble(
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            RopeLayout::Interleaved,
            device,
            g.path.clone(),
        )
    }

    /// Load from a HF directory (`config.json` + safetensors / pytorch weights), f32.
    pub fn from_hf_dir(dir: &Path, device: &Device) -> Result<Self> {
        let cfg = LlamaConfig::from_hf(&dir.join("config.json"))?;
        let weights = crate::hub::Weights::from_dir(dir, DType::F32, device, false)?;
        let vb = weights.var_builder(DType::F32, device);
        let (h, kv, hd) = (
            cfg.hidden_size,
            cfg.num_kv_heads * cfg.head_dim,
            cfg.head_dim * cfg.num_heads,
        );
        let rms = |vb: candle_nn::VarBuilder| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: vb.get(h, "weight")?,
                eps: cfg.rms_norm_eps as f32,
            })
        };
        let lin =
            |vb: &candle_nn::VarBuilder, name: &str, out: usize, inp: usize| -> Result<Linear> {
                Ok(Linear::Candle(QMatMul::Tensor(
                    vb.pp(name).get((out, inp), "weight")?,
                )))
            };
        let vbm = vb.pp("model");
        let embed = vbm.pp("embed_tokens").get((cfg.vocab_size, h), "weight")?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let l = vbm.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let m = l.pp("mlp");
            blocks.push(Block {
                attn_norm: rms(l.pp("input_layernorm"))?,
                attn: Attention {
                    qkv: Projections::Separate(vec![
                        lin(&a, "q_proj", hd, h)?,
                        lin(&a, "k_proj", kv, h)?,
                        lin(&a, "v_proj", kv, h)?,
                    ]),
                    o: lin(&a, "o_proj", h, hd)?,
                },
                mlp_norm: rms(l.pp("post_attention_layernorm"))?,
                mlp: Mlp {
                    gate_up: Projections::Separate(vec![
                        lin(&m, "gate_proj", cfg.intermediate_size, h)?,
                        lin(&m, "up_proj", cfg.intermediate_size, h)?,
                    ]),
                    down: lin(&m, "down_proj", h, cfg.intermediate_size)?,
                },
            });
        }
        let norm = rms(vbm.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings && !weights.contains("lm_head.weight") {
            Linear::Candle(QMatMul::Tensor(embed.clone()))
        } else {
            lin(&vb, "lm_head", cfg.vocab_size, h)?
        };
        Self::assemble(
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            RopeLayout::Halves,
            device,
            dir.to_path_buf(),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        config: LlamaConfig,
        embed: Tensor,
        blocks: Vec<Block>,
        norm: RmsNorm,
        lm_head: Linear,
        rope_layout: RopeLayout,
        device: &Device,
        source: PathBuf,
    ) -> Result<Self> {
        let inv_freq = Tensor::new(config.inv_freq(), device)?;
        let eos = config
            .eos_token_id
            .with_context(|| format!("{}: no eos token id", source.display()))?;
        let special = SpecialIds {
            vocab_size: config.vocab_size,
            decoder_start: config.bos_token_id.unwrap_or(eos),
            bos: config.bos_token_id,
            eos,
            pad: config.pad_token_id.unwrap_or(eos),
            forced_bos: None,
            forced_eos: None,
        };
        let mut m = Self {
            config,
            embed,
            blocks,
            norm,
            lm_head,
            inv_freq,
            native_decode: false,
            rope_layout,
            special,
            device: device.clone(),
            source,
        };
        m.native_decode = m.native_decode_ok();
        Ok(m)
    }

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

    /// cos/sin `[rows, len, head_dim / 2]` for positions `[rows, len]` u32.
    fn rotary(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, l) = positions.dims2()?;
        let half = self.inv_freq.dim(0)?;
        let pos = positions.to_dtype(DType::F32)?.reshape((b, l, 1))?;
        let freqs = pos.broadcast_mul(&self.inv_freq.reshape((1, 1, half))?)?;
        Ok((freqs.cos()?.contiguous()?, freqs.sin()?.contiguous()?))
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(match self.rope_layout {
            RopeLayout::Halves => candle_nn::rotary_emb::rope(x, cos, sin)?,
            RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(x, cos, sin)?,
        })
    }

    /// Run the transformer over `ids: [rows, len]` at `positions: [rows, len]`, appending to `cache`
    /// (one entry per layer; empty = no past). `mask`: additive `[rows, 1, len, past + len]` or None
    /// (no padding, and causal masking unnecessary because `len == 1`). Returns hidden states
    /// `[rows, len, hidden]` after the final norm.
    fn run(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut [LayerCache],
    ) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let cfg = &self.config;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let n_rep = nh / nkv;
        let (cos, sin) = self.rotary(positions)?;
        let mut x =
            self.embed
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, l, cfg.hidden_size))?;
        let scale = 1.0 / (hd as f64).sqrt();
        // Mask broadcast over the n_rep query heads that share a key/value head.
        let mask = match mask {
            Some(m) => Some(m.unsqueeze(2)?), // [b, 1, 1, l, k]
            None => None,
        };
        for (block, layer_cache) in self.blocks.iter().zip(cache.iter_mut()) {
            let residual = &x;
            let hs = block.attn_norm.forward(&x)?;
            let a = &block.attn;
            let [q, k, v]: [Tensor; 3] = a
                .qkv
                .forward(&hs)?
                .try_into()
                .map_err(|_| anyhow::anyhow!("llama: q/k/v projections are not three"))?;
            let q = q.reshape((b, l, nh, hd))?.transpose(1, 2)?.contiguous()?;
            let k = k.reshape((b, l, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let v = v.reshape((b, l, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let q = self.rope(&q, &cos, &sin)?;
            let k = self.rope(&k, &cos, &sin)?;
            let (k, v) = match &layer_cache.self_kv {
                Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
                None => (k, v),
            };
            layer_cache.self_kv = Some((k.clone(), v.clone()));
            let k_len = k.dim(2)?;
            // Grouped-query attention without copying K/V: query heads h = j * n_rep + r use kv head j.
            let q = q.reshape((b, nkv, n_rep * l, hd))?;
            let att = (q.matmul(&k.t()?)? * scale)?;
            let att = match &mask {
                Some(m) => att
                    .reshape((b, nkv, n_rep, l, k_len))?
                    .broadcast_add(m)?
                    .reshape((b, nkv, n_rep * l, k_len))?,
                None => att,
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att
                .matmul(&v)?
                .reshape((b, nh, l, hd))?
                .transpose(1, 2)?
                .reshape((b, l, nh * hd))?;
            let y = a.o.forward(&y)?;
            x = (residual + y)?;
            let residual = &x;
            let hs = block.mlp_norm.forward(&x)?;
            let m = &block.mlp;
            let [gate, up]: [Tensor; 2] = m
                .gate_up
                .forward(&hs)?
                .try_into()
                .map_err(|_| anyhow::anyhow!("llama: gate/up projections are not two"))?;
            let gated = (gate.silu()? * up)?;
            x = (residual + m.down.forward(&gated)?)?;
        }
        Ok(self.norm.forward(&x)?)
    }

    /// The transformer on raw buffers (requires [`Llama::raw_decode`]) for `tokens: [rows, len]`
    /// (row-major) at `positions: [rows, len]`: query `i` of a row (absolute column `past + i`) sees
    /// key `j` when `j <= past + i` and `key_mask[r][j] == 1` (`None`: no padding; the mask covers
    /// past and new tokens). Appends in place to each layer's [`RawKv`] (taking over a tensor cache
    /// that [`Llama::run`] filled) and returns the next-token logits of each row's last position
    /// `[rows, vocab]`. Same math as `run` + `last_logits`, without ~25 tensor ops per layer.
    fn run_native(
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
        let scale = 1.0 / (hd as f32).sqrt();
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
        // cos/sin [rows * len, head_dim / 2], computed as `rotary` does (f32 position * frequency).
        let inv = self.config.inv_freq();
        let mut cos = vec![0f32; n * half];
        let mut sin = vec![0f32; n * half];
        for (r, &p) in positions.iter().enumerate() {
            for (i, f) in inv.iter().enumerate() {
                let a = p as f32 * f;
                cos[r * half + i] = a.cos();
                sin[r * half + i] = a.sin();
            }
        }
        let rope = |v: &mut [f32], r: usize| {
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
        for (block, lc) in self.blocks.iter().zip(cache.iter_mut()) {
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
                for head in row[..qd + kvd].chunks_exact_mut(hd) {
                    rope(head, r);
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
            // Grouped-query attention: query head `head` reads kv head `head / n_rep`. One task per
            // (query, head), on the pool when there is enough work.
            let attend = |(idx, out): (usize, &mut [f32])| {
                let (qi, head) = (idx / nh, idx % nh);
                let (r, i) = (qi / len, qi % len);
                let visible = |j: usize| j <= t_past + i && key_mask.is_none_or(|m| m[r][j] == 1);
                let q = &qkv[qi * qkv_w + head * hd..qi * qkv_w + (head + 1) * hd];
                let base = kv.offset(r, head / n_rep, 0);
                let mut scores: Vec<f32> = (0..t)
                    .map(|j| {
                        if visible(j) {
                            quant::dot_f32(q, &kc[base + j * hd..base + (j + 1) * hd]) * scale
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                    .collect();
                let max = scores.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                out.fill(0.0);
                if max == f32::NEG_INFINITY {
                    // A padding query that sees no key: its output is never used.
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
                        let v = &vc[base + j * hd..base + (j + 1) * hd];
                        for (o, &v) in out.iter_mut().zip(v) {
                            *o += p * v;
                        }
                    }
                }
            };
            if n * nh * t * hd < 1 << 18 {
                att.chunks_mut(hd).enumerate().for_each(attend);
            } else {
                att.par_chunks_mut(hd).enumerate().for_each(attend);
            }
            lc.raw_kv = Some(kv);
            o_m.matmul_into(&att, n, &mut proj)?;
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
            rms_norm_rows(&x, &block.mlp_norm, &mut xn)?;
            gu_m.matmul_into(&xn, n, &mut gu)?;
            for (a, g) in act.chunks_exact_mut(ffn).zip(gu.chunks_exact(2 * ffn)) {
                let (gate, up) = g.split_at(ffn);
                for ((a, &g), &u) in a.iter_mut().zip(gate).zip(up) {
                    *a = g / (1.0 + (-g).exp()) * u;
                }
            }
            down_m.matmul_into(&act, n, &mut proj)?;
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
        Ok(Tensor::from_vec(logits, (b, head.rows()), &self.device)?)
    }

    /// Additive mask `[rows, 1, q_len, past + q_len]`: query i (absolute column past + i) sees key j
    /// when `j <= past + i` and `key_mask[row, j] == 1`. Fully masked (padding) queries stay finite.
    fn additive_mask(key_mask: &[Vec<u32>], q_len: usize, device: &Device) -> Result<Tensor> {
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

    /// Logits `[rows, vocab]` of the last position of `hidden: [rows, len, hidden]`.
    fn last_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let l = hidden.dim(1)?;
        let last = hidden.narrow(1, l - 1, 1)?.contiguous()?;
        Ok(self
            .lm_head
            .forward(&last)?
            .squeeze(1)?
            .to_dtype(DType::F32)?)
    }

    /// Teacher-forced logits `[rows, len, vocab]` for `input_ids: [rows, len]` u32 and a right-padded
    /// `attention_mask: [rows, len]` (rows are left-padded internally; padded positions give zeros).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (left, lens) = left_pad(input_ids, attention_mask, self.special.pad)?;
        let rows = left.len();
        let l = left.first().map_or(0, |r| r.len());
        let key_mask = key_mask(&lens, l);
        let positions = positions(&lens, l);
        let ids = crate::tokenize::ids_tensor(&left, &self.device)?;
        let pos = crate::tokenize::ids_tensor(&positions, &self.device)?;
        let mask = Self::additive_mask(&key_mask, l, &self.device)?;
        let mut cache = vec![LayerCache::default(); self.blocks.len()];
        let hidden = self.run(&ids, &pos, Some(&mask), &mut cache)?;
        let logits = self.lm_head.forward(&hidden)?;
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

/// Run `f` on the f32 data of a contiguous CPU tensor (no copy).
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .context("llama: expected a contiguous tensor")?;
    match &*storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => Ok(f(&v[start..end])),
        _ => bail!("llama: expected an f32 CPU tensor"),
    }
}

/// RMSNorm of each `[hidden]` row of `x` into `out` (as candle's `rms_norm`).
fn rms_norm_rows(x: &[f32], norm: &RmsNorm, out: &mut [f32]) -> Result<()> {
    with_f32(&norm.weight, |w| {
        let h = w.len();
        for (xs, o) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
            let sum2: f32 = xs.iter().map(|v| v * v).sum();
            let m = (sum2 / h as f32 + norm.eps).sqrt();
            for ((o, &v), &w) in o.iter_mut().zip(xs).zip(w) {
                *o = v / m * w;
            }
        }
    })
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
            let hidden = self.run(&ids, &pos, mask.as_ref(), &mut layers)?;
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
            let hidden = self.run(&ids, &pos, mask.as_ref(), &mut state.layers)?;
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
}
