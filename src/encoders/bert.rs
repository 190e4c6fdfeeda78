//! BERT (Devlin et al. 2019) as Hugging Face's `BertModel`: the body of the DPR and
//! sentence-transformers encoders.
//!
//! Written with [`crate::nn`] so that every parameter receives gradients (RAG fine-tunes the
//! question encoder). Linear layers run as one 2-D matmul over all `batch * len` tokens.

use crate::kernels::fused;
use crate::kernels::int8::Int8Linear;
use crate::kernels::math::gelu_in_place;
use crate::kernels::packed::PackedLinear;
use crate::nn::{self, Activation, LayerNorm};
use crate::tokenize::{Encoded, TextTokenizer};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use std::path::Path;

fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_type_vocab_size() -> usize {
    2
}
fn default_position_embedding_type() -> String {
    "absolute".into()
}

/// The fields of an HF BERT `config.json` that shape the model (DPR configs are a superset).
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
}

impl BertConfig {
    /// Parse and validate a config object; `origin` names the file in errors.
    pub fn from_value(v: &serde_json::Value, origin: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_value(v.clone())
            .with_context(|| format!("{origin}: not a BERT config"))?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Read `config.json` (or any BERT-like config file).
    pub fn from_file(path: &Path) -> Result<Self> {
        let v: serde_json::Value = crate::hub::read_json(path)?;
        Self::from_value(&v, &path.display().to_string())
    }

    fn validate(&self, origin: &str) -> Result<()> {
        if self.position_embedding_type != "absolute" {
            bail!(
                "{origin}: position_embedding_type `{}` is not supported (only `absolute`)",
                self.position_embedding_type
            );
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            bail!(
                "{origin}: hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        Activation::from_hf(&self.hidden_act, "hidden_act").with_context(|| origin.to_string())?;
        Ok(())
    }
}

/// Linear layer `y = x W^T + b` on `[n, in]` rows (HF weight layout `[out, in]`).
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub(crate) fn load(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let l = nn::linear(in_dim, out_dim, true, vb)?;
        let bias = l.bias().cloned().context("dense layer without bias")?;
        Ok(Self {
            weight: l.weight().clone(),
            bias,
        })
    }

    pub(crate) fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `x: [n, in] -> [n, out]`; also accepts `[b, l, in]` (flattened to one matmul).
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / in_dim.max(1);
        let y = x
            .reshape((rows, in_dim))?
            .matmul(&self.weight.t()?)?
            .broadcast_add(&self.bias)?;
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.weight.dim(0)?;
        }
        y.reshape(out_dims)
    }
}

/// Which row of the position table each token reads.
pub(crate) enum Positions<'a> {
    /// `0..l` for every text (BERT).
    Absolute,
    /// Explicit ids `[b, l]` u32 (RoBERTa and MPNet count from `padding_idx + 1`).
    Ids(&'a Tensor),
}

/// Word + position (+ token type) embeddings, then LayerNorm (HF `BertEmbeddings`; RoBERTa's and
/// MPNet's differ only in their position ids and, for MPNet, no token types).
pub(crate) struct Embeddings {
    word: Tensor,
    position: Tensor,
    token_type: Option<Tensor>,
    layer_norm: LayerNorm,
}

impl Embeddings {
    /// `vb` at `embeddings`; `token_types`: the model has `token_type_embeddings`.
    pub(crate) fn load(cfg: &BertConfig, vb: VarBuilder, token_types: bool) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            word: vb.get((cfg.vocab_size, h), "word_embeddings.weight")?,
            position: vb.get(
                (cfg.max_position_embeddings, h),
                "position_embeddings.weight",
            )?,
            token_type: if token_types {
                Some(vb.get((cfg.type_vocab_size, h), "token_type_embeddings.weight")?)
            } else {
                None
            },
            layer_norm: LayerNorm::load(h, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    /// `ids, types: [b, l] -> [b * l, h]`.
    pub(crate) fn forward(
        &self,
        input_ids: &Tensor,
        positions: Positions,
        token_type_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let h = self.word.dim(1)?;
        let max_pos = self.position.dim(0)?;
        let word = self
            .word
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, l, h))?;
        let mut x = match positions {
            Positions::Absolute => {
                if l > max_pos {
                    bail!(
                        "sequence of {l} tokens is longer than max_position_embeddings {max_pos}"
                    );
                }
                word.broadcast_add(&self.position.narrow(0, 0, l)?)?
            }
            Positions::Ids(ids) => {
                let ids = ids.flatten_all()?;
                if b * l > 0 && ids.max(0)?.to_scalar::<u32>()? as usize >= max_pos {
                    bail!("sequence of {l} tokens needs more than max_position_embeddings {max_pos} positions");
                }
                (word + self.position.index_select(&ids, 0)?.reshape((b, l, h))?)?
            }
        };
        if let Some(table) = &self.token_type {
            x = match token_type_ids {
                Some(t) => {
                    (x + table
                        .index_select(&t.flatten_all()?, 0)?
                        .reshape((b, l, h))?)?
                }
                // HF's default token_type_ids buffer is all zeros.
                None => x.broadcast_add(&table.narrow(0, 0, 1)?)?,
            };
        }
        Ok(self.layer_norm.forward(&x.reshape((b * l, h))?)?)
    }
}

struct Layer {
    /// The fused inference path's weights (None when the weights are trainable: a copy would
    /// not follow their updates).
    fused: Option<FusedWeights>,
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
}

/// A layer's four products as the fused path runs them, packed once at load (f32) or
/// quantised by [`BertModel::quantize_int8`]: a second copy of the weights (the candle tensors
/// stay, for the composed path and for re-deriving these).
struct FusedWeights {
    /// query|key|value stacked: `[3h, h]`, and its bias `[3h]`.
    qkv: FusedLinear,
    qkv_bias: Tensor,
    attn_out: FusedLinear,
    intermediate: FusedLinear,
    output: FusedLinear,
}

/// One linear map `y = x W^T` of the fused path (bias and activation go in its epilogue), its
/// weights packed as f32 panels or quantised to int8.
enum FusedLinear {
    F32(PackedLinear),
    Int8(Int8Linear),
}

impl FusedLinear {
    /// From `weight: [out, in]` (f32, CPU).
    fn new(weight: &Tensor, int8: bool) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        fused::with_f32(&weight.contiguous()?, |w| {
            if int8 {
                FusedLinear::Int8(Int8Linear::new(w, n, k))
            } else {
                FusedLinear::F32(PackedLinear::new(w, n, k))
            }
        })
    }

    /// `x: [m, in] -> x W^T: [m, out]`, `epilogue(c0, values)` applied to each row's run of
    /// outputs from column `c0` before they are stored.
    fn forward_with<F>(&self, x: &Tensor, epilogue: F) -> Result<Tensor>
    where
        F: Fn(usize, &mut [f32]) + Sync,
    {
        let m = x.dim(0)?;
        let (y, n) = fused::with_f32(x, |x| match self {
            FusedLinear::F32(p) => (p.forward_with(x, m, epilogue), p.out_dim()),
            FusedLinear::Int8(p) => (p.forward_with(x, m, epilogue), p.out_dim()),
        })?;
        Ok(Tensor::from_vec(y, (m, n), x.device())?)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, |_, _| {})
    }
}

/// Where a layer's weights live under `encoder.layer.N`: the same post-LN layer is named
/// differently by BERT/RoBERTa ([`BERT_LAYER`]) and MPNet (`attention.attn.q`, ...).
pub(crate) struct LayerNames {
    pub query: &'static str,
    pub key: &'static str,
    pub value: &'static str,
    pub attn_out: &'static str,
    pub attn_norm: &'static str,
    pub intermediate: &'static str,
    pub output: &'static str,
    pub out_norm: &'static str,
}

/// HF `BertLayer` (and `RobertaLayer`, `XLMRobertaLayer`) weight names.
pub(crate) const BERT_LAYER: LayerNames = LayerNames {
    query: "attention.self.query",
    key: "attention.self.key",
    value: "attention.self.value",
    attn_out: "attention.output.dense",
    attn_norm: "attention.output.LayerNorm",
    intermediate: "intermediate.dense",
    output: "output.dense",
    out_norm: "output.LayerNorm",
};

impl Layer {
    fn load(cfg: &BertConfig, vb: VarBuilder, names: &LayerNames) -> Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let mut layer = Self {
            fused: None,
            query: Linear::load(h, h, vb.pp(names.query))?,
            key: Linear::load(h, h, vb.pp(names.key))?,
            value: Linear::load(h, h, vb.pp(names.value))?,
            attn_out: Linear::load(h, h, vb.pp(names.attn_out))?,
            attn_norm: LayerNorm::load(h, eps, vb.pp(names.attn_norm))?,
            intermediate: Linear::load(h, i, vb.pp(names.intermediate))?,
            output: Linear::load(i, h, vb.pp(names.output))?,
            out_norm: LayerNorm::load(h, eps, vb.pp(names.out_norm))?,
        };
        let dense = [
            &layer.query,
            &layer.key,
            &layer.value,
            &layer.attn_out,
            &layer.intermediate,
            &layer.output,
        ];
        let fusable = dense.iter().all(|d| {
            !d.weight.track_op() && d.weight.device().is_cpu() && d.weight.dtype() == DType::F32
        });
        if fusable {
            layer.fused = Some(layer.fused_weights(false)?);
        }
        Ok(layer)
    }

    fn fused_weights(&self, int8: bool) -> Result<FusedWeights> {
        let (q, k, v) = (&self.query, &self.key, &self.value);
        Ok(FusedWeights {
            qkv: FusedLinear::new(&Tensor::cat(&[&q.weight, &k.weight, &v.weight], 0)?, int8)?,
            qkv_bias: Tensor::cat(&[&q.bias, &k.bias, &v.bias], 0)?.contiguous()?,
            attn_out: FusedLinear::new(&self.attn_out.weight, int8)?,
            intermediate: FusedLinear::new(&self.intermediate.weight, int8)?,
            output: FusedLinear::new(&self.output.weight, int8)?,
        })
    }

    fn quantize_int8(&mut self) -> Result<()> {
        anyhow::ensure!(
            self.fused.is_some(),
            "int8 needs frozen f32 CPU weights (not trainable ones)"
        );
        self.fused = Some(self.fused_weights(true)?);
        Ok(())
    }

    /// Inference path with fused CPU kernels; `keep: [b * l]` padding mask (1 = token);
    /// `score_bias: [heads, l, l]` added to every row's attention scores (MPNet).
    #[allow(clippy::too_many_arguments)]
    fn forward_fused(
        &self,
        x: &Tensor,
        w: &FusedWeights,
        keep: &[u32],
        score_bias: Option<&Tensor>,
        b: usize,
        heads: usize,
        act: Activation,
    ) -> Result<Tensor> {
        let h = x.dim(1)?;
        let dh = h / heads;
        let scale = 1.0 / (dh as f32).sqrt();
        let (q, k, v) = fused::split_qkv(&w.qkv.forward(x)?, &w.qkv_bias, b, heads, scale)?;
        let ctx = fused::attention_with_bias(&q, &k, &v, keep, score_bias)?;
        let norm = |ln: &LayerNorm| -> Result<(Tensor, Tensor, f64)> {
            let bias = ln.bias.clone().context("LayerNorm without bias")?;
            Ok((ln.weight.clone(), bias, ln.eps))
        };
        let (g, be, eps) = norm(&self.attn_norm)?;
        let attn = w.attn_out.forward(&ctx)?;
        let x = fused::bias_residual_layer_norm(&attn, &self.attn_out.bias, x, &g, &be, eps)?;
        let bias = &self.intermediate.bias;
        let inter = match act {
            // Bias and GELU in the product's epilogue.
            Activation::Gelu => fused::with_f32(bias, |bias| {
                w.intermediate
                    .forward_with(&x, |c0, v| gelu_in_place(v, &bias[c0..]))
            })??,
            other => other.forward(&w.intermediate.forward(&x)?.broadcast_add(bias)?)?,
        };
        let (g, be, eps) = norm(&self.out_norm)?;
        let out = w.output.forward(&inter)?;
        fused::bias_residual_layer_norm(&out, &self.output.bias, &x, &g, &be, eps)
    }

    /// `x: [b * l, h]`, `mask: [b, 1, 1, l]` or `[b, heads, l, l]` additive -> `[b * l, h]`.
    fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        b: usize,
        heads: usize,
        act: Activation,
    ) -> Result<Tensor> {
        let (n, h) = x.dims2()?;
        let l = n / b;
        let dh = h / heads;
        // [b*l, h] -> [b, heads, l, dh]
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, l, heads, dh))?.transpose(1, 2)?.contiguous()
        };
        // Scaling q before the product is cheaper than scaling the [l, l] scores.
        let q = split((self.query.forward(x)? * (1.0 / (dh as f64).sqrt()))?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let probs = nn::softmax_last_dim(&scores)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((n, h))?;
        let x = self
            .attn_norm
            .forward(&(self.attn_out.forward(&ctx)? + x)?)?;
        let inter = act.forward(&self.intermediate.forward(&x)?)?;
        Ok(self
            .out_norm
            .forward(&(self.output.forward(&inter)? + x)?)?)
    }
}

/// The stack of post-LN transformer layers under `encoder.layer.N` that BERT, RoBERTa/XLM-R and
/// MPNet share: `[b * l, h]` in, `[b * l, h]` out.
pub(crate) struct Encoder {
    layers: Vec<Layer>,
    activation: Activation,
    heads: usize,
}

impl Encoder {
    /// `vb` at `encoder.layer`; `names` where each layer keeps its weights.
    pub(crate) fn load(cfg: &BertConfig, vb: VarBuilder, names: &LayerNames) -> Result<Self> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(cfg, vb.pp(i.to_string()), names))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            activation: Activation::from_hf(&cfg.hidden_act, "hidden_act")?,
            heads: cfg.num_attention_heads,
        })
    }

    /// `x: [b * l, h]` embedded tokens, `attention_mask: [b, l]` u32, `score_bias: [heads, l, l]`
    /// added to the attention scores of every layer (MPNet's relative position bias).
    pub(crate) fn forward(
        &self,
        mut x: Tensor,
        attention_mask: &Tensor,
        score_bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let b = attention_mask.dim(0)?;
        // Fused kernels for inference; the composed path when gradients are tracked.
        if !x.track_op() && self.layers.iter().all(|l| l.fused.is_some()) {
            let keep = attention_mask.flatten_all()?.to_vec1::<u32>()?;
            for layer in &self.layers {
                let w = layer.fused.as_ref().context("fused weights")?;
                x = layer.forward_fused(
                    &x,
                    w,
                    &keep,
                    score_bias,
                    b,
                    self.heads,
                    self.activation,
                )?;
            }
        } else {
            let mut mask = nn::additive_padding_mask(attention_mask, x.dtype())?;
            if let Some(bias) = score_bias {
                mask = mask.broadcast_add(&bias.unsqueeze(0)?)?;
            }
            for layer in &self.layers {
                x = layer.forward(&x, &mask, b, self.heads, self.activation)?;
            }
        }
        Ok(x)
    }

    pub(crate) fn quantize_int8(&mut self) -> Result<()> {
        self.layers.iter_mut().try_for_each(Layer::quantize_int8)
    }

    pub(crate) fn is_int8(&self) -> bool {
        (self.layers.iter()).any(|l| {
            matches!(
                l.fused,
                Some(FusedWeights {
                    qkv: FusedLinear::Int8(_),
                    ..
                })
            )
        })
    }
}

/// Check `input_ids`, `attention_mask` (and `token_type_ids`): `[b, l]` each, every id a row of
/// the embedding table.
pub(crate) fn check_inputs(
    input_ids: &Tensor,
    attention_mask: &Tensor,
    token_type_ids: Option<&Tensor>,
    vocab_size: usize,
) -> Result<(usize, usize)> {
    let (b, l) = input_ids.dims2()?;
    if attention_mask.dims2()? != (b, l) {
        bail!(
            "attention_mask shape {:?} != input_ids shape {:?}",
            attention_mask.dims(),
            input_ids.dims()
        );
    }
    if let Some(t) = token_type_ids {
        if t.dims2()? != (b, l) {
            bail!(
                "token_type_ids shape {:?} != input_ids shape {:?}",
                t.dims(),
                input_ids.dims()
            );
        }
    }
    if b * l > 0 {
        let max_id = input_ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max_id as usize >= vocab_size {
            bail!("token id {max_id} is outside the model's vocabulary (vocab_size {vocab_size})");
        }
    }
    Ok((b, l))
}

/// HF `BertModel`: embeddings, `num_hidden_layers` post-LN transformer layers, optional pooler.
pub struct BertModel {
    embeddings: Embeddings,
    encoder: Encoder,
    pooler: Option<Linear>,
    pub config: BertConfig,
}

impl BertModel {
    /// Load from `vb` positioned at the model root (keys `embeddings.*`, `encoder.layer.N.*`,
    /// `pooler.dense.*`). The pooler is loaded when `with_pooler` and present.
    pub fn load(cfg: &BertConfig, vb: VarBuilder, with_pooler: bool) -> Result<Self> {
        Ok(Self {
            embeddings: Embeddings::load(cfg, vb.pp("embeddings"), true)?,
            encoder: Encoder::load(cfg, vb.pp("encoder").pp("layer"), &BERT_LAYER)?,
            pooler: load_pooler(cfg, &vb, with_pooler)?,
            config: cfg.clone(),
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Run every layer's linear products in dynamic int8 from now on (inference only: the model
    /// must have been loaded with frozen f32 CPU weights). Outputs then differ from f32 by the
    /// quantisation error; see [`Int8Linear`].
    pub fn quantize_int8(&mut self) -> Result<()> {
        self.encoder.quantize_int8()
    }

    /// Whether [`Self::quantize_int8`] was applied.
    pub fn is_int8(&self) -> bool {
        self.encoder.is_int8()
    }

    pub fn has_pooler(&self) -> bool {
        self.pooler.is_some()
    }

    /// `input_ids, attention_mask, token_type_ids: [b, l]` u32 -> last hidden state `[b, l, h]`.
    /// `token_type_ids` None means all zeros (as HF).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        token_type_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, l) = check_inputs(
            input_ids,
            attention_mask,
            token_type_ids,
            self.config.vocab_size,
        )?;
        let x = (self.embeddings).forward(input_ids, Positions::Absolute, token_type_ids)?;
        let x = self.encoder.forward(x, attention_mask, None)?;
        Ok(x.reshape((b, l, self.config.hidden_size))?)
    }

    /// HF pooler: `tanh(dense(h[:, 0]))`, `last_hidden: [b, l, h] -> [b, h]`.
    pub fn pool(&self, last_hidden: &Tensor) -> Result<Tensor> {
        tanh_pooler(self.pooler.as_ref(), last_hidden)
    }
}

/// `pooler.dense` when `with_pooler` and the checkpoint has it.
pub(crate) fn load_pooler(
    cfg: &BertConfig,
    vb: &VarBuilder,
    with_pooler: bool,
) -> Result<Option<Linear>> {
    Ok(
        if with_pooler && vb.contains_tensor("pooler.dense.weight") {
            Some(Linear::load(
                cfg.hidden_size,
                cfg.hidden_size,
                vb.pp("pooler").pp("dense"),
            )?)
        } else {
            None
        },
    )
}

/// HF pooler `tanh(dense(h[:, 0]))`: `last_hidden: [b, l, h] -> [b, h]`.
pub(crate) fn tanh_pooler(pooler: Option<&Linear>, last_hidden: &Tensor) -> Result<Tensor> {
    let pooler = pooler.context("this checkpoint has no pooler weights")?;
    let cls = last_hidden.narrow(1, 0, 1)?.squeeze(1)?;
    Ok(pooler.forward(&cls)?.tanh()?)
}

/// How token vectors `[b, l, h]` become one vector per text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The first (`[CLS]`) token.
    Cls,
    /// Mean over non-padding tokens: `sum(h * mask) / max(sum(mask), 1e-9)`.
    Mean,
    /// Element-wise max over non-padding tokens (padding set to -1e9 first, as sentence-transformers).
    Max,
    /// Sum over non-padding tokens divided by `sqrt(n_tokens)`.
    MeanSqrtLen,
    /// The last non-padding token (padding is on the right).
    LastToken,
}

impl Pooling {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Cls => "cls",
            Self::Mean => "mean",
            Self::Max => "max",
            Self::MeanSqrtLen => "mean_sqrt_len",
            Self::LastToken => "lasttoken",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "cls" => Self::Cls,
            "mean" => Self::Mean,
            "max" => Self::Max,
            "mean_sqrt_len" | "mean_sqrt_len_tokens" => Self::MeanSqrtLen,
            "lasttoken" | "last_token" | "last" => Self::LastToken,
            other => bail!("unknown pooling `{other}` (cls, mean, max, mean_sqrt_len, lasttoken)"),
        })
    }

    /// `last_hidden: [b, l, h]`, `attention_mask: [b, l]` (u32) -> `[b, h]`.
    pub fn apply(&self, last_hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        if *self == Self::Cls {
            return Ok(last_hidden.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?);
        }
        if *self == Self::LastToken {
            let (b, l, h) = last_hidden.dims3()?;
            let counts = attention_mask.sum(1)?.to_vec1::<u32>()?;
            let rows: Vec<u32> = (counts.iter().enumerate())
                .map(|(i, &n)| (i * l + (n.max(1) as usize - 1)) as u32)
                .collect();
            let rows = Tensor::from_vec(rows, b, last_hidden.device())?;
            return Ok(last_hidden.reshape((b * l, h))?.index_select(&rows, 0)?);
        }
        let mask = attention_mask
            .to_dtype(last_hidden.dtype())?
            .unsqueeze(D::Minus1)?; // [b, l, 1]
        Ok(match self {
            Self::Cls | Self::LastToken => unreachable!("handled above"),
            Self::Max => {
                let neg = ((1.0 - &mask)? * -1e9)?;
                last_hidden
                    .broadcast_mul(&mask)?
                    .broadcast_add(&neg)?
                    .max(1)?
            }
            Self::Mean | Self::MeanSqrtLen => {
                let sum = last_hidden.broadcast_mul(&mask)?.sum(1)?; // [b, h]
                let count = mask.sum(1)?; // [b, 1]
                let denom = match self {
                    Self::Mean => count.clamp(1e-9, f64::MAX)?,
                    _ => count.sqrt()?,
                };
                sum.broadcast_div(&denom)?
            }
        })
    }
}

/// L2-normalise rows: `x / max(||x||, 1e-12)` (torch `F.normalize`).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}

/// One padded batch as `[b, l]` u32 tensors.
pub struct Batch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub token_type_ids: Tensor,
}

/// Pad `rows` (indices into `enc`) to their longest with `pad_id`; mask 0 and type 0 on padding.
pub fn pad_rows(enc: &Encoded, rows: &[usize], pad_id: u32, device: &Device) -> Result<Batch> {
    let len = rows
        .iter()
        .map(|&i| enc.input_ids[i].len())
        .max()
        .unwrap_or(0);
    let n = rows.len();
    let (mut ids, mut mask, mut types) = (
        Vec::with_capacity(n * len),
        Vec::with_capacity(n * len),
        Vec::with_capacity(n * len),
    );
    for &i in rows {
        let row = &enc.input_ids[i];
        let pad = len - row.len();
        ids.extend_from_slice(row);
        ids.extend(std::iter::repeat_n(pad_id, pad));
        mask.extend_from_slice(&enc.attention_mask[i]);
        mask.extend(std::iter::repeat_n(0u32, pad));
        types.extend_from_slice(&enc.type_ids[i]);
        types.extend(std::iter::repeat_n(0u32, pad));
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (n, len), device)?,
        attention_mask: Tensor::from_vec(mask, (n, len), device)?,
        token_type_ids: Tensor::from_vec(types, (n, len), device)?,
    })
}

/// Run `f` on batches of at most `batch_size` rows of `enc`, longest rows first so that each
/// batch holds rows of similar length (little padding), and return the `[rows, d]` results in the
/// original row order.
pub fn run_sorted_batches(
    enc: &Encoded,
    batch_size: usize,
    pad_id: u32,
    device: &Device,
    mut f: impl FnMut(&Batch) -> Result<Tensor>,
) -> Result<Tensor> {
    let n = enc.input_ids.len();
    if n == 0 {
        bail!("no texts to encode");
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(enc.input_ids[i].len()));
    let mut outs = Vec::new();
    for chunk in order.chunks(batch_size.max(1)) {
        outs.push(f(&pad_rows(enc, chunk, pad_id, device)?)?);
    }
    let sorted = Tensor::cat(&outs, 0)?.contiguous()?;
    // position of original row i inside `sorted`
    let mut inverse = vec![0u32; n];
    for (pos, &i) in order.iter().enumerate() {
        inverse[i] = pos as u32;
    }
    if order.iter().enumerate().all(|(p, &i)| p == i) {
        return Ok(sorted);
    }
    Ok(sorted.index_select(&Tensor::from_vec(inverse, n, device)?, 0)?)
}

/// The pad id of a tokenizer, falling back to the model's `pad_token_id`, then 0.
pub fn pad_id(tokenizer: &TextTokenizer, config: &BertConfig) -> u32 {
    tokenizer.special.pad.or(config.pad_token_id).unwrap_or(0)
}

/// Tensor dtype used by the encoders.
pub const DTYPE: DType = DType::F32;
