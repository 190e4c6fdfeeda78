//! T5 (`T5ForConditionalGeneration`, Raffel et al. 2020) as HF transformers implements it: relative position
//! buckets (bidirectional in the encoder, causal in the decoder; the bias lives in the first layer and is
//! shared by the others), RMS-style T5LayerNorm before every sub-layer, unscaled attention scores, ReLU or
//! gated-GELU feed-forward, tied embeddings with the decoder output scaled by d_model^-0.5. Differentiable;
//! decodes step by step with a key/value cache.

use super::attention::{
    append_kv, attend, check_ids, check_input, encoded_state, full_pass_inputs, merge_heads,
    padding_bias, seq2seq_step, split_heads,
};
use super::{ActivationShape, DecodeState, Decoder, GenInput, LayerCache, Seq2Seq, SpecialIds};
use crate::hub::Weights;
use crate::nn::{causal_mask, linear, Activation, Dropout, DropoutSwitch, RmsNorm};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Linear, VarBuilder};

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ffp() -> String {
    "relu".into()
}
fn default_true() -> bool {
    true
}
fn default_eos() -> u32 {
    1
}

/// `config.json` of a T5 model (the fields the forward pass needs).
#[derive(Clone, Debug, serde::Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `"relu"`, `"gated-gelu"`, `"gated-<act>"` or `"<act>"`.
    #[serde(default = "default_ffp")]
    pub feed_forward_proj: String,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Multiply the decoder output by d_model^-0.5 before a tied lm_head (defaults to `tie_word_embeddings`).
    #[serde(default)]
    pub scale_decoder_outputs: Option<bool>,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub decoder_start_token_id: Option<u32>,
    #[serde(default)]
    pub forced_bos_token_id: Option<u32>,
    #[serde(default)]
    pub forced_eos_token_id: Option<u32>,
    #[serde(default)]
    pub prefix: Option<String>,
    /// Dropout rate of every T5 dropout (embeddings, attention probabilities, feed-forward, each
    /// sub-layer's output, the final norm), in training only [0.1, HF's default].
    #[serde(default = "default_dropout_rate")]
    pub dropout_rate: f64,
}

fn default_dropout_rate() -> f64 {
    0.1
}

impl T5Config {
    pub fn special_ids(&self) -> SpecialIds {
        SpecialIds {
            vocab_size: self.vocab_size,
            decoder_start: self.decoder_start_token_id.unwrap_or(self.pad_token_id),
            bos: self.bos_token_id,
            eos: self.eos_token_id,
            pad: self.pad_token_id,
            forced_bos: self.forced_bos_token_id,
            forced_eos: self.forced_eos_token_id,
        }
    }

    /// (gated, activation) from `feed_forward_proj` as T5Config.__init__ parses it.
    pub fn feed_forward(&self) -> Result<(bool, Activation)> {
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        let (gated, act) = match parts.as_slice() {
            [act] => (false, *act),
            ["gated", act] => (true, *act),
            _ => bail!(
                "unsupported feed_forward_proj `{}` in config field `feed_forward_proj`",
                self.feed_forward_proj
            ),
        };
        // HF maps "gated-gelu" to the tanh approximation (gelu_new) for backwards compatibility.
        let act = if act == "gelu" && gated {
            "gelu_new"
        } else {
            act
        };
        Ok((gated, Activation::from_hf(act, "feed_forward_proj")?))
    }
}

/// T5 relative position bucket of `relative = key - query` (HF `_relative_position_bucket`).
pub fn relative_position_bucket(
    relative: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut buckets = num_buckets;
    let mut bucket = 0usize;
    let rel = if bidirectional {
        buckets /= 2;
        if relative > 0 {
            bucket += buckets;
        }
        relative.unsigned_abs() as usize
    } else {
        (-relative.min(0)) as usize
    };
    let max_exact = buckets / 2;
    if rel < max_exact {
        bucket + rel
    } else {
        // Same f32 arithmetic as torch: log(rel / max_exact) / log(max_distance / max_exact) * (buckets - max_exact).
        let ratio = ((rel as f32 / max_exact as f32).ln()
            / ((max_distance as f64 / max_exact as f64).ln() as f32)
            * (buckets - max_exact) as f32) as usize;
        bucket + (max_exact + ratio).min(buckets - 1)
    }
}

#[derive(Clone, Debug)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    /// `[num_buckets, heads]`, first layer only.
    relative_attention_bias: Option<Tensor>,
    /// On the attention probabilities.
    dropout: Dropout,
}

impl Attention {
    fn load(cfg: &T5Config, has_bias: bool, dropout: &Dropout, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        Ok(Self {
            q: linear(cfg.d_model, inner, false, vb.pp("q"))?,
            k: linear(cfg.d_model, inner, false, vb.pp("k"))?,
            v: linear(cfg.d_model, inner, false, vb.pp("v"))?,
            o: linear(inner, cfg.d_model, false, vb.pp("o"))?,
            heads: cfg.num_heads,
            relative_attention_bias: if has_bias {
                Some(vb.get(
                    (cfg.relative_attention_num_buckets, cfg.num_heads),
                    "relative_attention_bias.weight",
                )?)
            } else {
                None
            },
            dropout: dropout.clone(),
        })
    }

    fn key_values(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            split_heads(&self.k.forward(xs)?, self.heads)?,
            split_heads(&self.v.forward(xs)?, self.heads)?,
        ))
    }

    fn forward(
        &self,
        xs: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let q = split_heads(&self.q.forward(xs)?, self.heads)?;
        let ctx = attend(&q, k, v, bias, 1.0, &self.dropout)?;
        Ok(self.o.forward(&merge_heads(&ctx)?)?)
    }
}

#[derive(Clone, Debug)]
struct FeedForward {
    layer_norm: RmsNorm,
    /// `wi` (plain) or `wi_0` (gated, activated branch).
    wi: Linear,
    /// `wi_1` (gated, linear branch).
    wi_1: Option<Linear>,
    wo: Linear,
    act: Activation,
    dropout: Dropout,
}

impl FeedForward {
    fn load(cfg: &T5Config, dropout: &Dropout, vb: VarBuilder) -> Result<Self> {
        let (gated, act) = cfg.feed_forward()?;
        let dense = vb.pp("DenseReluDense");
        let (wi, wi_1) = if gated {
            (
                linear(cfg.d_model, cfg.d_ff, false, dense.pp("wi_0"))?,
                Some(linear(cfg.d_model, cfg.d_ff, false, dense.pp("wi_1"))?),
            )
        } else {
            (linear(cfg.d_model, cfg.d_ff, false, dense.pp("wi"))?, None)
        };
        Ok(Self {
            layer_norm: RmsNorm::load(cfg.d_model, cfg.layer_norm_epsilon, vb.pp("layer_norm"))?,
            wi,
            wi_1,
            wo: linear(cfg.d_ff, cfg.d_model, false, dense.pp("wo"))?,
            act,
            dropout: dropout.clone(),
        })
    }

    /// Residual block `xs + dropout(wo(dropout(act(wi(norm(xs))) [* wi_1(norm(xs))])))`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.layer_norm.forward(xs)?;
        let mut inner = self.act.forward(&self.wi.forward(&h)?)?;
        if let Some(wi_1) = &self.wi_1 {
            inner = (inner * wi_1.forward(&h)?)?;
        }
        let out = self.wo.forward(&self.dropout.forward(&inner)?)?;
        Ok((xs + self.dropout.forward(&out)?)?)
    }
}

#[derive(Clone, Debug)]
struct EncoderBlock {
    self_attn: Attention,
    self_attn_norm: RmsNorm,
    ffn: FeedForward,
    /// On the attention output before the residual.
    dropout: Dropout,
}

#[derive(Clone, Debug)]
struct DecoderBlock {
    self_attn: Attention,
    self_attn_norm: RmsNorm,
    cross_attn: Attention,
    cross_attn_norm: RmsNorm,
    ffn: FeedForward,
    /// On each attention output before its residual.
    dropout: Dropout,
}

impl EncoderBlock {
    fn load(cfg: &T5Config, first: bool, dropout: &Dropout, vb: VarBuilder) -> Result<Self> {
        let l0 = vb.pp("layer.0");
        Ok(Self {
            self_attn: Attention::load(cfg, first, dropout, l0.pp("SelfAttention"))?,
            self_attn_norm: RmsNorm::load(
                cfg.d_model,
                cfg.layer_norm_epsilon,
                l0.pp("layer_norm"),
            )?,
            ffn: FeedForward::load(cfg, dropout, vb.pp("layer.1"))?,
            dropout: dropout.clone(),
        })
    }

    fn forward(&self, xs: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let h = self.self_attn_norm.forward(xs)?;
        let (k, v) = self.self_attn.key_values(&h)?;
        let attn = self.self_attn.forward(&h, &k, &v, Some(bias))?;
        let xs = (xs + self.dropout.forward(&attn)?)?;
        self.ffn.forward(&xs)
    }
}

impl DecoderBlock {
    fn load(cfg: &T5Config, first: bool, dropout: &Dropout, vb: VarBuilder) -> Result<Self> {
        let (l0, l1) = (vb.pp("layer.0"), vb.pp("layer.1"));
        Ok(Self {
            self_attn: Attention::load(cfg, first, dropout, l0.pp("SelfAttention"))?,
            self_attn_norm: RmsNorm::load(
                cfg.d_model,
                cfg.layer_norm_epsilon,
                l0.pp("layer_norm"),
            )?,
            cross_attn: Attention::load(cfg, false, dropout, l1.pp("EncDecAttention"))?,
            cross_attn_norm: RmsNorm::load(
                cfg.d_model,
                cfg.layer_norm_epsilon,
                l1.pp("layer_norm"),
            )?,
            ffn: FeedForward::load(cfg, dropout, vb.pp("layer.2"))?,
            dropout: dropout.clone(),
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        cache: &mut LayerCache,
        self_bias: &Tensor,
        enc_bias: &Tensor,
    ) -> Result<Tensor> {
        let h = self.self_attn_norm.forward(xs)?;
        let (k, v) = self.self_attn.key_values(&h)?;
        let (k, v) = append_kv(&mut cache.self_kv, k, v)?;
        let attn = self.self_attn.forward(&h, &k, &v, Some(self_bias))?;
        let xs = (xs + self.dropout.forward(&attn)?)?;
        let h = self.cross_attn_norm.forward(&xs)?;
        let (ck, cv) = cache
            .cross_kv
            .as_ref()
            .context("decoder cache has no cross-attention keys/values")?;
        let cross = self.cross_attn.forward(&h, ck, cv, Some(enc_bias))?;
        let xs = (&xs + self.dropout.forward(&cross)?)?;
        self.ffn.forward(&xs)
    }
}

/// `T5ForConditionalGeneration`.
pub struct T5ForConditionalGeneration {
    pub config: T5Config,
    special: SpecialIds,
    /// Shared token embeddings `[vocab, d_model]`.
    shared: Tensor,
    encoder_blocks: Vec<EncoderBlock>,
    encoder_final_norm: RmsNorm,
    decoder_blocks: Vec<DecoderBlock>,
    decoder_final_norm: RmsNorm,
    /// `[vocab, d_model]`: the shared embeddings when tied.
    lm_head: Tensor,
    /// d_model^-0.5 with tied embeddings (`scale_decoder_outputs`), else 1.
    output_scale: f64,
    weights: Weights,
    prefix: String,
    dtype: DType,
    device: Device,
    /// Train mode of every dropout (off unless a trainer switches it on).
    dropout_switch: DropoutSwitch,
    /// After the embeddings and after each stack's final norm.
    dropout: Dropout,
}

impl T5ForConditionalGeneration {
    /// Build from weights whose names start with `prefix` (`""` for a plain HF directory,
    /// `"rag.generator"` inside a RAG checkpoint).
    pub fn load(
        config: T5Config,
        weights: Weights,
        prefix: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
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
        let (v, d) = (config.vocab_size, config.d_model);
        let shared_name = [
            "shared.weight",
            "encoder.embed_tokens.weight",
            "decoder.embed_tokens.weight",
        ]
        .into_iter()
        .find(|n| weights.contains(&full(n)))
        .unwrap_or("shared.weight");
        let shared = vb.get((v, d), shared_name)?;
        let n_dec = config.num_decoder_layers.unwrap_or(config.num_layers);
        let dropout_switch = DropoutSwitch::default();
        let dropout = Dropout::new(config.dropout_rate, &dropout_switch)
            .context("config.json `dropout_rate`")?;
        let encoder_blocks = (0..config.num_layers)
            .map(|i| {
                EncoderBlock::load(
                    &config,
                    i == 0,
                    &dropout,
                    vb.pp(format!("encoder.block.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let decoder_blocks = (0..n_dec)
            .map(|i| {
                DecoderBlock::load(
                    &config,
                    i == 0,
                    &dropout,
                    vb.pp(format!("decoder.block.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        if encoder_blocks.is_empty() || decoder_blocks.is_empty() {
            bail!("T5 config needs at least one encoder and one decoder layer (num_layers / num_decoder_layers)");
        }
        let lm_head = if config.tie_word_embeddings {
            shared.clone()
        } else {
            vb.get((v, d), "lm_head.weight")?
        };
        let scale = config.tie_word_embeddings && config.scale_decoder_outputs.unwrap_or(true);
        Ok(Self {
            special: config.special_ids(),
            encoder_final_norm: RmsNorm::load(
                d,
                config.layer_norm_epsilon,
                vb.pp("encoder.final_layer_norm"),
            )?,
            decoder_final_norm: RmsNorm::load(
                d,
                config.layer_norm_epsilon,
                vb.pp("decoder.final_layer_norm"),
            )?,
            shared,
            encoder_blocks,
            decoder_blocks,
            lm_head,
            output_scale: if scale { (d as f64).powf(-0.5) } else { 1.0 },
            weights,
            prefix: prefix.to_string(),
            config,
            dtype,
            device: device.clone(),
            dropout_switch,
            dropout,
        })
    }

    /// Position bias `[1, heads, q_len, past + q_len]` for queries at positions `past..past+q_len`.
    fn position_bias(
        &self,
        table: &Tensor,
        q_len: usize,
        past: usize,
        bidirectional: bool,
    ) -> Result<Tensor> {
        let k_len = past + q_len;
        let (nb, md) = (
            self.config.relative_attention_num_buckets,
            self.config.relative_attention_max_distance,
        );
        let buckets: Vec<u32> = (0..q_len)
            .flat_map(|i| {
                (0..k_len).map(move |j| {
                    relative_position_bucket(j as i64 - (past + i) as i64, bidirectional, nb, md)
                        as u32
                })
            })
            .collect();
        let idx = Tensor::from_vec(buckets, q_len * k_len, &self.device)?;
        let heads = table.dim(1)?;
        // [q*k, heads] -> [1, heads, q, k]
        Ok(table
            .index_select(&idx, 0)?
            .reshape((q_len, k_len, heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .contiguous()?)
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let tok = self
            .shared
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, ()))?;
        self.dropout.forward(&tok)
    }

    /// Decoder over `ids: [rows, t]` at positions `past..past+t`, using/extending `cache`;
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
        let table = self.decoder_blocks[0]
            .self_attn
            .relative_attention_bias
            .as_ref()
            .context("decoder block 0 has no relative_attention_bias")?;
        let mut self_bias = self.position_bias(table, t, past, false)?;
        if t > 1 {
            self_bias =
                self_bias.broadcast_add(&causal_mask(t, past, self.dtype, &self.device)?)?;
        }
        let mut h = self.embed(ids)?;
        for (block, c) in self.decoder_blocks.iter().zip(cache.iter_mut()) {
            h = block.forward(&h, c, &self_bias, enc_bias)?;
        }
        let h = self
            .dropout
            .forward(&self.decoder_final_norm.forward(&h)?)?;
        let h = if self.output_scale != 1.0 {
            (h * self.output_scale)?
        } else {
            h
        };
        let (b, t, d) = h.dims3()?;
        Ok(h.reshape((b * t, d))?
            .matmul(&self.lm_head.t()?)?
            .reshape((b, t, ()))?)
    }
}

impl Decoder for T5ForConditionalGeneration {
    fn special_ids(&self) -> &SpecialIds {
        &self.special
    }

    fn start(&self, input: &GenInput) -> Result<DecodeState> {
        let encoder_hidden = self.encode(input)?;
        let cross_kv = self
            .decoder_blocks
            .iter()
            .map(|l| l.cross_attn.key_values(&encoder_hidden))
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
            self.decoder_blocks.len(),
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
            hidden: c.d_model.max(c.num_heads * c.d_kv),
            ffn: c.d_ff,
            heads: c.num_heads,
            vocab: c.vocab_size,
            input_layers: self.encoder_blocks.len(),
            decoder_layers: self.decoder_blocks.len(),
        }
    }
}

impl Seq2Seq for T5ForConditionalGeneration {
    fn encode(&self, input: &GenInput) -> Result<Tensor> {
        check_input(input, self.config.vocab_size)?;
        let t = input.input_ids.dim(1)?;
        let table = self.encoder_blocks[0]
            .self_attn
            .relative_attention_bias
            .as_ref()
            .context("encoder block 0 has no relative_attention_bias")?;
        let bias = self
            .position_bias(table, t, 0, true)?
            .broadcast_add(&padding_bias(&input.attention_mask, self.dtype)?)?;
        let mut h = self.embed(&input.input_ids)?;
        for block in &self.encoder_blocks {
            h = block.forward(&h, &bias)?;
        }
        self.dropout.forward(&self.encoder_final_norm.forward(&h)?)
    }

    fn forward_from_state(
        &self,
        state: &DecodeState,
        decoder_input_ids: &Tensor,
    ) -> Result<Tensor> {
        let (mut cache, enc_bias) = full_pass_inputs(
            state,
            decoder_input_ids,
            self.decoder_blocks.len(),
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
        self.weights
            .vars()
            .into_iter()
            .filter(|(n, _)| n.starts_with(&p))
            .collect()
    }

    fn dropout(&self) -> &DropoutSwitch {
        &self.dropout_switch
    }

    fn config_prefix(&self) -> Option<&str> {
        self.config.prefix.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::relative_position_bucket;

    #[test]
    fn buckets_match_hf_formula() {
        // Worked by hand from T5Attention._relative_position_bucket (32 buckets, distance 128): exact
        // buckets below max_exact, the log-spaced ones start at max_exact, and the last bucket saturates.
        let bi = |r| relative_position_bucket(r, true, 32, 128);
        assert_eq!(
            [bi(0), bi(1), bi(-1), bi(7), bi(-8), bi(8)],
            [0, 17, 1, 23, 8, 24]
        );
        let causal = |r| relative_position_bucket(r, false, 32, 128);
        assert_eq!(
            [
                causal(0),
                causal(1),
                causal(-1),
                causal(-15),
                causal(-16),
                causal(-1000)
            ],
            [0, 0, 1, 15, 16, 31]
        );
    }

    #[test]
    fn feed_forward_proj_parsing() {
        use crate::nn::Activation;
        let cfg = |ffp: &str| -> super::T5Config {
            serde_json::from_value(serde_json::json!({
                "vocab_size": 10, "d_model": 4, "d_kv": 2, "d_ff": 8, "num_layers": 1, "num_heads": 2,
                "feed_forward_proj": ffp
            }))
            .expect("config")
        };
        assert_eq!(
            cfg("relu").feed_forward().unwrap(),
            (false, Activation::Relu)
        );
        assert_eq!(
            cfg("gated-gelu").feed_forward().unwrap(),
            (true, Activation::GeluTanh)
        );
        assert_eq!(
            cfg("gated-silu").feed_forward().unwrap(),
            (true, Activation::Silu)
        );
        assert!(
            format!("{:#}", cfg("gated-foo").feed_forward().unwrap_err())
                .contains("feed_forward_proj")
        );
        assert!(
            format!("{:#}", cfg("a-b-c").feed_forward().unwrap_err()).contains("feed_forward_proj")
        );
    }
}
