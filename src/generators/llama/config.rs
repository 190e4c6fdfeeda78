//! Llama hyper-parameters from a HF `config.json` or GGUF metadata.

use super::gemma::GemmaConfig;
use crate::generators::gguf::GgufFile;
use anyhow::{bail, Context, Result};
use std::path::Path;

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
    /// Per-frequency divisors of the rotary angles, `theta_i / factors[i]` (`factors: [head_dim / 2]`),
    /// with cos and sin multiplied by `attn_factor`. This is how llama.cpp's converter writes
    /// Llama 3.1+'s scaling (tensor `rope_freqs.weight`) and Phi-3's LongRoPE
    /// (`rope_factors_short`/`_long.weight`, `rope.scaling.attn_factor`); transformers reads it as
    /// `longrope` with equal short and long factors.
    Factors {
        factors: Vec<f32>,
        attn_factor: f32,
    },
    /// YaRN: each frequency blended between itself (extrapolation) and itself `/ factor`
    /// (interpolation) by a ramp over the dimensions that make between `beta_fast` and `beta_slow`
    /// rotations in `original_context` positions; cos and sin multiplied by `attn_factor`.
    Yarn {
        factor: f64,
        original_context: f64,
        beta_fast: f64,
        beta_slow: f64,
        attn_factor: f32,
    },
}

impl RopeScaling {
    /// YaRN from HF `rope_scaling` values, with transformers' defaults (beta 32 / 1; attention
    /// factor `0.1 ln(factor) + 1`).
    fn yarn(
        factor: f64,
        original_context: f64,
        beta: (Option<f64>, Option<f64>),
        attn_factor: Option<f64>,
    ) -> Self {
        Self::Yarn {
            factor,
            original_context,
            beta_fast: beta.0.unwrap_or(32.0),
            beta_slow: beta.1.unwrap_or(1.0),
            attn_factor: attn_factor.unwrap_or(0.1 * factor.ln() + 1.0) as f32,
        }
    }
}

/// YaRN's extrapolation share of each of the `head_dim / 2` frequencies, as ggml's
/// `rope_yarn_ramp` over `ggml_rope_yarn_corr_dims` (f32) and transformers'
/// `find_correction_range` + `linear_ramp_factor` compute it: 1 for the fast dimensions, 0 for the
/// slow ones, linear between.
fn yarn_ramp(head_dim: usize, base: f64, original_context: f64, beta: (f64, f64)) -> Vec<f32> {
    let n = head_dim as f32;
    let corr_dim = |rotations: f64| {
        n * (original_context as f32 / (rotations as f32 * 2.0 * std::f32::consts::PI)).ln()
            / (2.0 * (base as f32).ln())
    };
    let low = corr_dim(beta.0).floor().max(0.0);
    let high = corr_dim(beta.1).ceil().min(n - 1.0);
    (0..head_dim / 2)
        .map(|i| 1.0 - ((i as f32 - low) / (high - low).max(0.001)).clamp(0.0, 1.0))
        .collect()
}

/// The architecture families run by [`super::Llama`] (GGUF `general.architecture`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Family {
    /// Llama 2/3, SmolLM, Mistral.
    #[default]
    Llama,
    /// Qwen2 / Qwen2.5: q/k/v projections with bias.
    Qwen2,
    /// Qwen3: RMSNorm of each q/k head, no bias.
    Qwen3,
    /// Phi-3 / Phi-3.5 / Phi-4-mini: fused q/k/v and gate/up tensors ([`super::phi3`]).
    Phi3,
    /// Gemma 2: GELU MLP, post-norms, soft-capping, sliding window ([`super::gemma`]).
    Gemma2,
    /// Gemma 3 (text): Gemma 2 without soft-capping, plus q/k head norms and local rope base.
    Gemma3,
}

/// The `general.architecture` values [`LlamaConfig::from_gguf`] takes.
pub const GGUF_ARCHITECTURES: &str = "llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3";

/// Model hyper-parameters.
#[derive(Clone, Debug)]
pub struct LlamaConfig {
    pub family: Family,
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
    /// What the Gemma families add (None for the others).
    pub gemma: Option<GemmaConfig>,
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
        "longrope" => {
            let factors = |k: &str| -> Result<Vec<f32>> {
                let list = v.get(k).and_then(|x| x.as_array()).with_context(|| {
                    format!("{}: rope scaling `longrope` needs a list `{k}`", file.display())
                })?;
                list.iter()
                    .map(|x| x.as_f64().map(|f| f as f32))
                    .collect::<Option<_>>()
                    .with_context(|| format!("{}: `{k}` holds a non-number", file.display()))
            };
            let (short, long) = (factors("short_factor")?, factors("long_factor")?);
            // transformers switches from the short to the long factors once a sequence passes
            // `original_max_position_embeddings`, re-rotating nothing already cached: one set only.
            if short != long {
                bail!(
                    "{}: rope scaling `longrope` with different `short_factor` and `long_factor` \
                     is not supported for HF directories (the GGUF of the model is)",
                    file.display()
                );
            }
            RopeScaling::Factors {
                factors: short,
                attn_factor: num("attention_factor")? as f32,
            }
        }
        "yarn" => {
            // DeepSeek's mscale pair and untruncated ranges change the math: not taken.
            for k in ["mscale", "mscale_all_dim"] {
                if v.get(k).is_some_and(|x| !x.is_null()) {
                    bail!("{}: rope scaling `yarn` with `{k}` is not supported", file.display());
                }
            }
            if v.get("truncate").and_then(|t| t.as_bool()) == Some(false) {
                bail!("{}: rope scaling `yarn` with `truncate: false` is not supported", file.display());
            }
            let opt = |k: &str| v.get(k).and_then(|x| x.as_f64());
            RopeScaling::yarn(
                num("factor")?,
                num("original_max_position_embeddings")?,
                (opt("beta_fast"), opt("beta_slow")),
                opt("attention_factor"),
            )
        }
        other => bail!(
            "{}: unsupported rope scaling type `{other}` (supported: default, linear, llama3, longrope, yarn)",
            file.display()
        ),
    })
}

/// The rotary frequency factors of a GGUF, as llama.cpp picks them (`llama_model::get_rope_factors`):
/// `rope_freqs.weight` (Llama 3.1+) if present, else Phi-3's LongRoPE pair, the long factors when
/// the context window (`{arch}.context_length`) exceeds `{arch}.rope.scaling.original_context_length`
/// (llama.cpp's default context is the trained one). cos/sin are multiplied by
/// `{arch}.rope.scaling.attn_factor` (default 1).
fn rope_factors(g: &GgufFile, arch: &str, head_dim: usize) -> Result<Option<RopeScaling>> {
    let k = |s: &str| format!("{arch}.{s}");
    let has = |name: &str| g.content.tensor_infos.contains_key(name);
    let (long, short) = ("rope_factors_long.weight", "rope_factors_short.weight");
    let name = if has("rope_freqs.weight") {
        "rope_freqs.weight"
    } else if has(long) || has(short) {
        let orig = k("rope.scaling.original_context_length");
        let (window, orig_window) = (g.usize(&k("context_length"))?, g.usize(&orig)?);
        match window > orig_window {
            true => long,
            false => short,
        }
    } else {
        return Ok(None);
    };
    let factors = g
        .tensor(name, &[head_dim / 2], &candle_core::Device::Cpu)?
        .dequantize(&candle_core::Device::Cpu)
        .and_then(|t| t.to_vec1::<f32>())
        .with_context(|| format!("{}: reading tensor `{name}`", g.path.display()))?;
    if let Some(bad) = factors.iter().position(|f| !f.is_finite() || *f <= 0.0) {
        bail!(
            "{}: tensor `{name}`: factor {bad} is {} (must be positive)",
            g.path.display(),
            factors[bad]
        );
    }
    let attn_factor = match g.has(&k("rope.scaling.attn_factor")) {
        true => g.f64(&k("rope.scaling.attn_factor"))? as f32,
        false => 1.0,
    };
    Ok(Some(RopeScaling::Factors {
        factors,
        attn_factor,
    }))
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
            family: Family::Llama,
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
            gemma: None,
        })
    }

    /// HF `config.json` of a `LlamaForCausalLM` with these hyper-parameters (f32 weights).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let rope_scaling = match self.rope_scaling {
            RopeScaling::None => serde_json::Value::Null,
            RopeScaling::Linear { factor } => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
            RopeScaling::Factors {
                ref factors,
                attn_factor,
            } => serde_json::json!({
                "rope_type": "longrope",
                "short_factor": factors,
                "long_factor": factors,
                "attention_factor": attn_factor,
                "original_max_position_embeddings": 1u64 << 20,
                "factor": 1.0,
            }),
            RopeScaling::Yarn {
                factor,
                original_context,
                beta_fast,
                beta_slow,
                attn_factor,
            } => serde_json::json!({
                "rope_type": "yarn",
                "factor": factor,
                "original_max_position_embeddings": original_context,
                "beta_fast": beta_fast,
                "beta_slow": beta_slow,
                "attention_factor": attn_factor,
            }),
        };
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        })
    }

    /// Read the `llama.*` metadata of a GGUF file; errors name the file and key.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch = g.str("general.architecture")?;
        let family = match arch {
            "llama" | "mistral" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "phi3" => Family::Phi3,
            "gemma2" => Family::Gemma2,
            "gemma3" => Family::Gemma3,
            _ => bail!(
                "{}: `general.architecture` = `{arch}` is not supported ({GGUF_ARCHITECTURES})",
                g.path.display()
            ),
        };
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
        // Checked: the projections are [num_heads * head_dim, hidden]; a product that wraps around
        // could match a small tensor and size the rotary tables by the huge head_dim.
        if head_dim == 0 || num_heads.checked_mul(head_dim).is_none() {
            bail!(
                "{}: head dim {head_dim} x {num_heads} heads is out of range",
                g.path.display()
            );
        }
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
                // The factors are tensors, read below.
                "longrope" => RopeScaling::None,
                "yarn" => {
                    let opt = |key: &str| -> Result<Option<f64>> {
                        g.has(&k(key)).then(|| g.f64(&k(key))).transpose()
                    };
                    // ggml's attention factor: llama.cpp's context sets
                    // `get_mscale(f) / (1 + 0.1 ln f) * rope.scaling.attn_factor` and its rope
                    // multiplies by `1 + 0.1 ln(1 / freq_scale)` (f32 throughout).
                    let freq_scale = 1.0 / g.f64(&k("rope.scaling.factor"))? as f32;
                    let f = 1.0 / freq_scale;
                    let mscale = if f <= 1.0 { 1.0 } else { 0.1 * f.ln() + 1.0 };
                    let attn = mscale * (1.0 / (1.0 + 0.1 * f.ln()))
                        * opt("rope.scaling.attn_factor")?.unwrap_or(1.0) as f32
                        * (1.0 + 0.1 * (1.0 / freq_scale).ln());
                    let original = match opt("rope.scaling.original_context_length")? {
                        Some(n) => n,
                        None => g.f64(&k("context_length"))?,
                    };
                    RopeScaling::yarn(
                        f as f64,
                        original,
                        (opt("rope.scaling.yarn_beta_fast")?, opt("rope.scaling.yarn_beta_slow")?),
                        Some(attn as f64),
                    )
                }
                other => bail!(
                    "{}: `{}` = `{other}` is not supported (supported: none, linear, longrope, yarn)",
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
        let rope_scaling = match rope_factors(g, arch, head_dim)? {
            None if g.has(&k("rope.scaling.type"))
                && g.str(&k("rope.scaling.type"))? == "longrope" =>
            {
                bail!(
                    "{}: `{}` = `longrope` but no tensor `rope_factors_long.weight`/`rope_factors_short.weight`",
                    g.path.display(),
                    k("rope.scaling.type")
                )
            }
            None => rope_scaling,
            Some(f) if rope_scaling == RopeScaling::None => f,
            Some(_) => bail!(
                "{}: rotary frequency factors together with `{}` = {rope_scaling:?} are not supported",
                g.path.display(),
                k("rope.scaling.type")
            ),
        };
        let num_layers = match g.usize(&k("block_count"))? {
            0 => bail!("{}: `{}` is 0", g.path.display(), k("block_count")),
            n => n,
        };
        let rope_theta = if g.has(&k("rope.freq_base")) {
            g.f64(&k("rope.freq_base"))?
        } else {
            10000.0
        };
        let gemma = match family {
            Family::Gemma2 | Family::Gemma3 => Some(GemmaConfig::from_gguf(
                g,
                family,
                (num_layers, hidden_size, num_heads, head_dim),
                (rope_theta, &rope_scaling),
            )?),
            _ => None,
        };
        let id = |key: &str| -> Result<Option<u32>> {
            if g.has(key) {
                g.u32(key).map(Some)
            } else {
                Ok(None)
            }
        };
        Ok(Self {
            family,
            vocab_size,
            hidden_size,
            intermediate_size: g.usize(&k("feed_forward_length"))?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: g.f64(&k("attention.layer_norm_rms_epsilon"))?,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: !g.content.tensor_infos.contains_key("output.weight"),
            bos_token_id: id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: id("tokenizer.ggml.eos_token_id")?,
            pad_token_id: id("tokenizer.ggml.padding_token_id")?,
            gemma,
        })
    }

    /// Multiplier of the attention scores: Gemma's query scale, else `1 / sqrt(head_dim)`.
    pub(super) fn attn_scale(&self) -> f32 {
        match &self.gemma {
            Some(g) => g.query_scale as f32,
            None => 1.0 / (self.head_dim as f32).sqrt(),
        }
    }

    /// Whether llama.cpp scales the queries before `q·k` (Phi-3, Gemma) rather than the scores in
    /// its softmax (Llama, Qwen): the raw path does the same, to round as it does.
    pub(super) fn q_prescaled(&self) -> bool {
        matches!(self.family, Family::Phi3 | Family::Gemma2 | Family::Gemma3)
    }

    /// Rotary base and scaling of the global blocks, or (`local`) of Gemma's sliding-window ones.
    fn rope_params(&self, local: bool) -> (f64, &RopeScaling) {
        match &self.gemma {
            Some(g) if local => (g.local_rope_theta, &g.local_rope_scaling),
            _ => (self.rope_theta, &self.rope_scaling),
        }
    }

    /// Whether block `layer` rotates with the local (sliding-window) frequencies, which differ from
    /// the global ones (Gemma 3: base 10000 locally).
    pub(super) fn local_rope(&self, layer: usize) -> bool {
        self.gemma.as_ref().is_some_and(|g| g.is_sliding(layer))
            && self.rope_params(true) != self.rope_params(false)
    }

    /// Rotary angles `out: [positions, head_dim / 2]` (global or `local` frequencies), rounded as
    /// ggml's rope cache computes them (`theta_i = pos * base^(-2i/d)` by repeated f32
    /// multiplication, then scaled per dimension: `1 / factor` for linear scaling, `1 / f_i` for
    /// frequency factors, YaRN's ramp), so that the raw path's q/k match llama.cpp's to the last
    /// bits; Llama 3 scaling takes `pos * inv_freq`. What a scaling derives per dimension (the
    /// inverse frequencies, YaRN's ramp) is computed once for all positions.
    pub(super) fn rope_angles(&self, local: bool, positions: &[u32], out: &mut [f32]) {
        let (theta_base, scaling) = self.rope_params(local);
        let half = self.head_dim / 2;
        if let RopeScaling::Llama3 { .. } = scaling {
            let inv_freq = self.inv_freq(local);
            for (row, &pos) in out.chunks_exact_mut(half).zip(positions) {
                for (o, f) in row.iter_mut().zip(&inv_freq) {
                    *o = pos as f32 * f;
                }
            }
            return;
        }
        let ramp = match *scaling {
            RopeScaling::Yarn {
                original_context,
                beta_fast,
                beta_slow,
                ..
            } => yarn_ramp(
                self.head_dim,
                theta_base,
                original_context,
                (beta_fast, beta_slow),
            ),
            _ => Vec::new(),
        };
        let theta_scale = (theta_base as f32).powf(-2.0 / self.head_dim as f32);
        for (row, &pos) in out.chunks_exact_mut(half).zip(positions) {
            let mut theta = pos as f32;
            for (i, o) in row.iter_mut().enumerate() {
                *o = match scaling {
                    RopeScaling::None | RopeScaling::Llama3 { .. } => theta,
                    RopeScaling::Linear { factor } => (1.0 / factor) as f32 * theta,
                    RopeScaling::Factors { factors, .. } => theta / factors[i],
                    RopeScaling::Yarn { factor, .. } => {
                        (1.0 / factor) as f32 * theta * (1.0 - ramp[i]) + theta * ramp[i]
                    }
                };
                theta *= theta_scale;
            }
        }
    }

    /// Multiplier of the rotary cos and sin (LongRoPE's attention factor; 1 for the others).
    pub(super) fn rope_attn_factor(&self, local: bool) -> f32 {
        match self.rope_params(local).1 {
            RopeScaling::Factors { attn_factor, .. } | RopeScaling::Yarn { attn_factor, .. } => {
                *attn_factor
            }
            _ => 1.0,
        }
    }

    /// Rotary inverse frequencies `[head_dim / 2]` (global or `local`), computed in f32 as HF does.
    pub(super) fn inv_freq(&self, local: bool) -> Vec<f32> {
        let (theta_base, scaling) = self.rope_params(local);
        let d = self.head_dim;
        let base: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / (theta_base as f32).powf((2 * i) as f32 / d as f32))
            .collect();
        match *scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Factors { ref factors, .. } => {
                base.iter().zip(factors).map(|(f, d)| f / d).collect()
            }
            RopeScaling::Yarn {
                factor,
                original_context,
                beta_fast,
                beta_slow,
                ..
            } => {
                let ramp = yarn_ramp(d, theta_base, original_context, (beta_fast, beta_slow));
                base.iter()
                    .zip(ramp)
                    .map(|(&f, r)| f / factor as f32 * (1.0 - r) + f * r)
                    .collect()
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(rope_scaling: RopeScaling) -> LlamaConfig {
        LlamaConfig {
            family: Family::Llama,
            vocab_size: 10,
            hidden_size: 16,
            intermediate_size: 32,
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            pad_token_id: None,
            gemma: None,
        }
    }

    /// A model read from a GGUF with frequency factors is saved as transformers' `longrope` with
    /// equal short and long factors (which transformers computes as `1 / (f_i * base^(2i/d))`,
    /// cos/sin times `attention_factor`), and reads back the same.
    #[test]
    fn frequency_factors_round_trip_through_hf_config() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("config.json");
        let scaling = RopeScaling::Factors {
            factors: vec![1.0, 1.5, 4.0, 8.0],
            attn_factor: 1.25,
        };
        std::fs::write(&path, config(scaling.clone()).to_hf_json().to_string())?;
        let back = LlamaConfig::from_hf(&path)?;
        assert_eq!(back.rope_scaling, scaling);
        assert_eq!(back.rope_attn_factor(false), 1.25);
        let base = config(RopeScaling::None).inv_freq(false);
        let scaled = back.inv_freq(false);
        assert_eq!(scaled[2], base[2] / 4.0);

        // YaRN: the HF fields round-trip, and the ramp blends the fast dimensions unscaled (ramp 1)
        // into the slow ones divided by the factor (head_dim 8, base 10000, original context 64:
        // correction dims 0 and 2).
        let yarn = RopeScaling::yarn(4.0, 64.0, (None, None), None);
        std::fs::write(&path, config(yarn.clone()).to_hf_json().to_string())?;
        let back = LlamaConfig::from_hf(&path)?;
        assert_eq!(back.rope_scaling, yarn);
        assert_eq!(back.rope_attn_factor(false), (0.1 * 4f64.ln() + 1.0) as f32);
        assert_eq!(
            yarn_ramp(8, 10000.0, 64.0, (32.0, 1.0)),
            [1.0, 0.5, 0.0, 0.0]
        );
        let scaled = back.inv_freq(false);
        assert_eq!((scaled[0], scaled[3]), (base[0], base[3] / 4.0));

        // Different short and long factors switch by sequence length in transformers: refused.
        let mut v = config(RopeScaling::None).to_hf_json();
        v["rope_scaling"] = serde_json::json!({"rope_type": "longrope", "short_factor": [1.0, 1.0, 1.0, 1.0],
            "long_factor": [2.0, 2.0, 2.0, 2.0], "attention_factor": 1.0, "original_max_position_embeddings": 64});
        std::fs::write(&path, v.to_string())?;
        let err = format!("{:#}", LlamaConfig::from_hf(&path).unwrap_err());
        assert!(
            err.contains("short_factor") && err.contains("config.json"),
            "{err}"
        );
        Ok(())
    }
}
