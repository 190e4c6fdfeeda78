//! BART (`BartForConditionalGeneration`, Lewis et al. 2019) as HF transformers implements it: shared token
//! embeddings (optionally scaled by sqrt(d_model)), learned positions with offset 2, `layernorm_embedding`,
//! post-LayerNorm encoder/decoder layers, cross attention, `lm_head` tied to the shared embeddings plus
//! `final_logits_bias`. Differentiable; decodes step by step with a key/value cache.

use super::attention::{
    append_kv, attend, check_ids, check_input, encoded_state, full_pass_inputs, merge_heads,
    padding_bias, seq2seq_step, split_heads,
};
use super::{ActivationShape, DecodeState, Decoder, GenInput, LayerCache, Seq2Seq, SpecialIds};
use crate::hub::Weights;
use crate::nn::{causal_mask, linear, Activation, Dropout, DropoutSwitch, LayerNorm};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Linear, VarBuilder};

/// HF positions are looked up at `position + 2` (fairseq legacy offset).
const POSITION_OFFSET: usize = 2;

fn default_activation() -> String {
    "gelu".into()
}
fn default_true() -> bool {
    true
}
fn default_pad() -> u32 {
    1
}
fn default_eos() -> u32 {
    2
}
fn default_bos() -> Option<u32> {
    Some(0)
}

/// `config.json` of a BART model (the fields the forward pass needs).
#[derive(Clone, Debug, serde::Deserialize)]
pub struct BartConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub decoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub decoder_ffn_dim: usize,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub scale_embedding: bool,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_pad")]
    pub pad_token_id: u32,
    #[serde(default = "default_bos")]
    pub bos_token_id: Option<u32>,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
    #[serde(default)]
    pub decoder_start_token_id: Option<u32>,
    #[serde(default)]
    pub forced_bos_token_id: Option<u32>,
    #[serde(default)]
    pub forced_eos_token_id: Option<u32>,
    #[serde(default)]
    pub prefix: Option<String>,
    /// Dropout of the hidden states (after embeddings, attention and the feed-forward), in
    /// training only [0.1, HF's default].
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// Dropout of the attention probabilities [0].
    #[serde(default)]
    pub attention_dropout: f64,
    /// Dropout after the feed-forward activation [0].
    #[serde(default)]
    pub activation_dropout: f64,
}

fn default_dropout() -> f64 {
    0.1
}

/// The three dropouts of a BART layer, switched by the model's train mode.
#[derive(Clone, Debug)]
struct Dropouts {
    hidden: Dropout,
    attention: Dropout,
    activation: Dropout,
}

impl Dropouts {
    fn new(cfg: &BartConfig, switch: &DropoutSwitch) -> Result<Self> {
        let d = |p: f64, what: &str| {
            Dropout::new(p, switch).with_context(|| format!("config.json `{what}`"))
        };
        Ok(Self {
            hidden: d(cfg.dropout, "dropout")?,
            attention: d(cfg.attention_dropout, "attention_dropout")?,
            activation: d(cfg.activation_dropout, "activation_dropout")?,
        })
    }
}

impl BartConfig {
    pub fn special_ids(&self) -> SpecialIds {
        SpecialIds {
            vocab_size: self.vocab_size,
            decoder_start: self.decoder_start_token_id.unwrap_or(self.eos_token_id),
            bos: self.bos_token_id,
            eos: self.eos_token_id,
            pad: self.pad_token_id,
            forced_bos: self.forced_bos_token_id,
            forced_eos: self.forced_eos_token_id,
        }
    }
}

/// Multi-head attention with biased q/k/v/out projections; queries scaled by head_dim^-0.5.
#[derive(Clone, Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    scale: f64,
    /// On the attention probabilities.
    dropout: Dropout,
}

impl Attention {
    fn load(dim: usize, heads: usize, dropout: &Dropout, vb: VarBuilder) -> Result<Self> {
        if heads == 0 || !dim.is_multiple_of(heads) {
            bail!("d_model {dim} is not divisible by the number of attention heads {heads}");
        }
        Ok(Self {
            q_proj: linear(dim, dim, true, vb.pp("q_proj"))?,
            k_proj: linear(dim, dim, true, vb.pp("k_proj"))?,
            v_proj: linear(dim, dim, true, vb.pp("v_proj"))?,
            out_proj: linear(dim, dim, true, vb.pp("out_proj"))?,
            heads,
            scale: ((dim / heads) as f64).powf(-0.5),
            dropout: dropout.clone(),
        })
    }

    /// Keys and values `[b, h, len, head_dim]` of `xs: [b, len, dim]`.
    fn key_values(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            split_heads(&self.k_proj.forward(xs)?, self.heads)?,
            split_heads(&self.v_proj.forward(xs)?, self.heads)?,
        ))
    }

    /// `xs: [b, tq, dim]` attending over `k, v: [b, h, tk, head_dim]`.
    fn forward(
        &self,
        xs: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let q = split_heads(&self.q_proj.forward(xs)?, self.heads)?;
        let ctx = attend(&q, k, v, bias, self.scale, &self.dropout)?;
        Ok(self.out_proj.forward(&merge_heads(&ctx)?)?)
    }
}

#[derive(Clone, Debug)]
struct FeedForward {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
    dropout: Dropouts,
}

impl FeedForward {
    fn load(
        dim: usize,
        ffn: usize,
        act: Activation,
        dropout: &Dropouts,
        vb: &VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            fc1: linear(dim, ffn, true, vb.pp("fc1"))?,
            fc2: linear(ffn, dim, true, vb.pp("fc2"))?,
            act,
            dropout: dropout.clone(),
        })
    }

    /// `dropout(fc2(activation_dropout(act(fc1(xs)))))`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.act.forward(&self.fc1.forward(xs)?)?;
        let h = self.fc2.forward(&self.dropout.activation.forward(&h)?)?;
        self.dropout.hidden.forward(&h)
    }
}

const LN_EPS: f64 = 1e-5;

#[derive(Clone, Debug)]
struct EncoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    ffn: FeedForward,
    final_layer_norm: LayerNorm,
    dropout: Dropout,
}

impl EncoderLayer {
    fn load(cfg: &BartConfig, act: Activation, dropout: &Dropouts, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        let heads = cfg.encoder_attention_heads;
        Ok(Self {
            self_attn: Attention::load(d, heads, &dropout.attention, vb.pp("self_attn"))?,
            self_attn_layer_norm: LayerNorm::load(d, LN_EPS, vb.pp("self_attn_layer_norm"))?,
            ffn: FeedForward::load(d, cfg.encoder_ffn_dim, act, dropout, &vb)?,
            final_layer_norm: LayerNorm::load(d, LN_EPS, vb.pp("final_layer_norm"))?,
            dropout: dropout.hidden.clone(),
        })
    }

    fn forward(&self, xs: &Tensor, pad_bias: &Tensor) -> Result<Tensor> {
        let (k, v) = self.self_attn.key_values(xs)?;
        let attn = self.self_attn.forward(xs, &k, &v, Some(pad_bias))?;
        let h = (xs + self.dropout.forward(&attn)?)?;
        let h = self.self_attn_layer_norm.forward(&h)?;
        let h = (&h + self.ffn.forward(&h)?)?;
        Ok(self.final_layer_norm.forward(&h)?)
    }
}

#[derive(Clone, Debug)]
struct DecoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    encoder_attn: Attention,
    encoder_attn_layer_norm: LayerNorm,
    ffn: FeedForward,
    final_layer_norm: LayerNorm,
    dropout: Dropout,
}

impl DecoderLayer {
    fn load(cfg: &BartConfig, act: Activation, dropout: &Dropouts, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        let heads = cfg.decoder_attention_heads;
        let attn = &dropout.attention;
        Ok(Self {
            self_attn: Attention::load(d, heads, attn, vb.pp("self_attn"))?,
            self_attn_layer_norm: LayerNorm::load(d, LN_EPS, vb.pp("self_attn_layer_norm"))?,
            encoder_attn: Attention::load(d, heads, attn, vb.pp("encoder_attn"))?,
            encoder_attn_layer_norm: LayerNorm::load(d, LN_EPS, vb.pp("encoder_attn_layer_norm"))?,
            ffn: FeedForward::load(d, cfg.decoder_ffn_dim, act, dropout, &vb)?,
            final_layer_norm: LayerNorm::load(d, LN_EPS, vb.pp("final_layer_norm"))?,
            dropout: dropout.hidden.clone(),
        })
    }

    /// `xs: [b, t, d]`; `cache.cross_kv` must hold the encoder keys/values; `cache.self_kv` grows by `t`.
    fn forward(
        &self,
        xs: &Tensor,
        cache: &mut LayerCache,
        causal: Option<&Tensor>,
        enc_bias: &Tensor,
    ) -> Result<Tensor> {
        let (k, v) = self.self_attn.key_values(xs)?;
        let (k, v) = append_kv(&mut cache.self_kv, k, v)?;
        let attn = self.self_attn.forward(xs, &k, &v, causal)?;
        let h = (xs + self.dropout.forward(&attn)?)?;
        let h = self.self_attn_layer_norm.forward(&h)?;
        let (ck, cv) = cache
            .cross_kv
            .as_ref()
            .context("decoder cache has no cross-attention keys/values")?;
        let cross = self.encoder_attn.forward(&h, ck, cv, Some(enc_bias))?;
        let h = (&h + self.dropout.forward(&cross)?)?;
        let h = self.encoder_attn_layer_norm.forward(&h)?;
        let h = (&h + self.ffn.forward(&h)?)?;
        Ok(self.final_layer_norm.forward(&h)?)
    }
}

/// `BartForConditionalGeneration`.
pub struct BartForConditionalGeneration {
    pub config: BartConfig,
    special: SpecialIds,
    /// Shared token embeddings `[vocab, d_model]`.
    shared: Tensor,
    embed_scale: f64,
    encoder_positions: Tensor,
    decoder_positions: Tensor,
    encoder_layernorm_embedding: LayerNorm,
    decoder_layernorm_embedding: LayerNorm,
    encoder_layers: Vec<EncoderLayer>,
    decoder_layers: Vec<DecoderLayer>,
    /// `[vocab, d_model]`: the shared embeddings when tied.
    lm_head: Tensor,
    /// `[1, vocab]`.
    final_logits_bias: Tensor,
    weights: Weights,
    prefix: String,
    dtype: DType,
    device: Device,
    /// Train mode of every dropout below (off unless a trainer switches it on).
    dropout_switch: DropoutSwitch,
    /// After `layernorm_embedding`.
    embed_dropout: Dropout,
}

impl BartForConditionalGeneration {
    /// Build from weights whose names start with `prefix` (`""` for a plain HF directory,
    /// `"rag.generator"` inside a RAG checkpoint).
    pub fn load(
        config: BartConfig,
        weights: Weights,
        prefix: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let act = Activation::from_hf(&config.activation_function, "activation_function")?;
        let root = weights.var_builder(dtype, device);
        let vb = if prefix.is_empty() {
            root.clone()
        } else {
            root.pp(prefix)
        };
        let full = |name: &str| {
            if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}.{name}")
            }
        };
        let d = config.d_model;
        let v = config.vocab_size;
        // The shared table is stored once; older checkpoints may only have the per-stack copies.
        let shared_name = [
            "model.shared.weight",
            "model.encoder.embed_tokens.weight",
            "model.decoder.embed_tokens.weight",
        ]
        .into_iter()
        .find(|n| weights.contains(&full(n)))
        .unwrap_or("model.shared.weight");
        let shared = vb.get((v, d), shared_name)?;
        let positions = config.max_position_embeddings + POSITION_OFFSET;
        let model = vb.pp("model");
        let enc = model.pp("encoder");
        let dec = model.pp("decoder");
        let lm_head = if config.tie_word_embeddings {
            shared.clone()
        } else {
            vb.get((v, d), "lm_head.weight")?
        };
        // A buffer that HF zero-initialises when absent.
        let final_logits_bias = if weights.contains(&full("final_logits_bias")) {
            vb.get((1, v), "final_logits_bias")?
        } else {
            Tensor::zeros((1, v), dtype, device)?
        };
        let dropout_switch = DropoutSwitch::default();
        let dropouts = Dropouts::new(&config, &dropout_switch)?;
        let encoder_layers = (0..config.encoder_layers)
            .map(|i| EncoderLayer::load(&config, act, &dropouts, enc.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let decoder_layers = (0..config.decoder_layers)
            .map(|i| DecoderLayer::load(&config, act, &dropouts, dec.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            special: config.special_ids(),
            embed_scale: if config.scale_embedding {
                (d as f64).sqrt()
            } else {
                1.0
            },
            encoder_positions: enc.get((positions, d), "embed_positions.weight")?,
            decoder_positions: dec.get((positions, d), "embed_positions.weight")?,
            encoder_layernorm_embedding: LayerNorm::load(d, LN_EPS, enc.pp("layernorm_embedding"))?,
            decoder_layernorm_embedding: LayerNorm::load(d, LN_EPS, dec.pp("layernorm_embedding"))?,
            encoder_layers,
            decoder_layers,
            shared,
            lm_head,
            final_logits_bias,
            prefix: prefix.to_string(),
            weights,
            config,
            dtype,
            device: device.clone(),
            embed_dropout: dropouts.hidden,
            dropout_switch,
        })
    }

    /// Token embeddings (scaled) plus learned positions `past..past+len`, then `layernorm_embedding`.
    fn embed(
        &self,
        ids: &Tensor,
        past: usize,
        positions: &Tensor,
        ln: &LayerNorm,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let table = positions.dim(0)?;
        if past + t + POSITION_OFFSET > table {
            bail!(
                "sequence of {} positions exceeds max_position_embeddings {}",
                past + t,
                self.config.max_position_embeddings
            );
        }
        let tok = self
            .shared
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, ()))?;
        let tok = if self.embed_scale != 1.0 {
            (tok * self.embed_scale)?
        } else {
            tok
        };
        let pos = positions
            .narrow(0, past + POSITION_OFFSET, t)?
            .unsqueeze(0)?;
        self.embed_dropout
            .forward(&ln.forward(&tok.broadcast_add(&pos)?)?)
    }

    /// Decoder over `ids: [rows, t]` starting at position `past`, using/extending `cache`;
    /// returns logits `[rows, t, vocab]`.
    fn decode(
        &self,
        ids: &Tensor,
        past: usize,
        cache: &mut [LayerCache],
        enc_bias: &Tensor,
    ) -> Result<Tensor> {
        check_ids(ids, self.config.vocab_size, "decoder_input_ids")?;
        let t = ids.dim(1)?;
        let mut h = self.embed(
            ids,
            past,
            &self.decoder_positions,
            &self.decoder_layernorm_embedding,
        )?;
        let causal = if t > 1 {
            Some(causal_mask(t, past, self.dtype, &self.device)?)
        } else {
            None
        };
        for (layer, c) in self.decoder_layers.iter().zip(cache.iter_mut()) {
            h = layer.forward(&h, c, causal.as_ref(), enc_bias)?;
        }
        let (b, t, d) = h.dims3()?;
        let logits = h
            .reshape((b * t, d))?
            .matmul(&self.lm_head.t()?)?
            .broadcast_add(&self.final_logits_bias)?;
        Ok(logits.reshape((b, t, ()))?)
    }
}

impl Decoder for BartForConditionalGeneration {
    fn special_ids(&self) -> &SpecialIds {
        &self.special
    }

    fn start(&self, input: &GenInput) -> Result<DecodeState> {
        let encoder_hidden = self.encode(input)?;
        let cross_kv = self
            .decoder_layers
            .iter()
            .map(|l| l.encoder_attn.key_values(&encoder_hidden))
            .collect::<Result<Vec<_>>>()?;
        Ok(encoded_state(
            encoder_hidden,
            &input.attention_mask,
            cross_kv,
        ))
    }

    fn step(&self, state: &mut DecodeState, tokens: &Tensor) -> Result<Tensor> {
        seq2seq_step(
            state,
            tokens,
            self.decoder_layers.len(),
            self.dtype,
            |ids, past, cache, bias| self.decode(ids, past, cache, bias),
        )
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn activation_shape(&self) -> ActivationShape {
        let c = &self.config;
        ActivationShape {
            hidden: c.d_model,
            ffn: c.encoder_ffn_dim.max(c.decoder_ffn_dim),
            heads: c.encoder_attention_heads.max(c.decoder_attention_heads),
            vocab: c.vocab_size,
            input_layers: c.encoder_layers,
            decoder_layers: c.decoder_layers,
        }
    }
}

impl Seq2Seq for BartForConditionalGeneration {
    fn encode(&self, input: &GenInput) -> Result<Tensor> {
        check_input(input, self.config.vocab_size)?;
        let bias = padding_bias(&input.attention_mask, self.dtype)?;
        let mut h = self.embed(
            &input.input_ids,
            0,
            &self.encoder_positions,
            &self.encoder_layernorm_embedding,
        )?;
        for layer in &self.encoder_layers {
            h = layer.forward(&h, &bias)?;
        }
        Ok(h)
    }

    fn forward_from_state(
        &self,
        state: &DecodeState,
        decoder_input_ids: &Tensor,
    ) -> Result<Tensor> {
        let (mut cache, enc_bias) = full_pass_inputs(
            state,
            decoder_input_ids,
            self.decoder_layers.len(),
            self.dtype,
        )?;
        self.decode(decoder_input_ids, 0, &mut cache, &enc_bias)
    }

    fn vars(&self) -> Vec<(String, Var)> {
        let p = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}.", self.prefix)
        };
        // `final_logits_bias` is a registered buffer in HF, not a parameter: it is never trained.
        self.weights
            .vars()
            .into_iter()
            .filter(|(n, _)| n.starts_with(&p) && !n.ends_with("final_logits_bias"))
            .collect()
    }

    fn config_prefix(&self) -> Option<&str> {
        self.config.prefix.as_deref()
    }

    fn dropout(&self) -> &DropoutSwitch {
        &self.dropout_switch
    }
}
