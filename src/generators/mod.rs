//! Generators: seq2seq (BART, T5) and decoder-only (Llama family) language models behind one
//! step-wise decoding interface that the RAG layer drives.
//!
//! The RAG layer encodes a batch of context rows once ([`Decoder::start`]), then asks for next-token
//! logits one step at a time for many rows ([`Decoder::step`]), reordering or duplicating rows between
//! steps ([`DecodeState::select_rows`]) for beam search and n_docs expansion.

pub mod attention;
pub mod auto;
pub mod bart;
pub mod chat_template;
pub mod gguf;
pub mod llama;
pub mod quant;
pub mod t5;

use anyhow::Result;
use candle_core::{Tensor, Var};

/// Special token ids and vocabulary size of a generator (from its config.json).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SpecialIds {
    pub vocab_size: usize,
    /// First decoder input of seq2seq models (BART: `</s>`, T5: `<pad>`); decoder-only: `bos`.
    pub decoder_start: u32,
    pub bos: Option<u32>,
    pub eos: u32,
    pub pad: u32,
    pub forced_bos: Option<u32>,
    pub forced_eos: Option<u32>,
}

/// Context rows fed to a generator. `input_ids`, `attention_mask`: `[rows, len]` u32, right-padded.
#[derive(Clone, Debug)]
pub struct GenInput {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
}

/// Key/value cache of one attention layer. `k`, `v`: `[rows, heads, len, head_dim]`.
#[derive(Clone, Debug, Default)]
pub struct LayerCache {
    pub self_kv: Option<(Tensor, Tensor)>,
    /// Cross-attention keys/values over the encoder output (seq2seq only), computed once.
    pub cross_kv: Option<(Tensor, Tensor)>,
    /// Self-attention keys/values on growable raw buffers (decoder-only native decode), used
    /// instead of `self_kv` so that a step appends in place rather than copying the whole cache.
    pub raw_kv: Option<RawKv>,
}

/// Keys and values `[rows, heads, capacity, head_dim]` of which the first `len` positions of each
/// (row, head) are filled; capacity doubles when full, so appending a step is amortised O(1).
#[derive(Clone, Debug, Default)]
pub struct RawKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub rows: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub len: usize,
    pub capacity: usize,
}

impl RawKv {
    pub fn new(rows: usize, heads: usize, head_dim: usize) -> Self {
        Self {
            rows,
            heads,
            head_dim,
            ..Default::default()
        }
    }

    /// From `[rows, heads, len, head_dim]` tensors (a cache the tensor path filled).
    pub fn from_tensors(k: &Tensor, v: &Tensor) -> Result<Self> {
        let (rows, heads, len, head_dim) = k.dims4()?;
        anyhow::ensure!(
            v.dims4()? == (rows, heads, len, head_dim),
            "k/v cache shapes differ"
        );
        let flat = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?)
        };
        Ok(Self {
            k: flat(k)?,
            v: flat(v)?,
            rows,
            heads,
            head_dim,
            len,
            capacity: len,
        })
    }

    /// Make room for `extra` more positions (re-laid out at double capacity when full).
    pub fn reserve(&mut self, extra: usize) {
        if self.len + extra <= self.capacity {
            return;
        }
        let cap = (2 * self.capacity).max(self.len + extra).max(16);
        let (d, n) = (self.head_dim, self.rows * self.heads);
        for buf in [&mut self.k, &mut self.v] {
            let mut grown = vec![0f32; n * cap * d];
            for (i, dst) in grown.chunks_exact_mut(cap * d).enumerate() {
                let src = i * self.capacity * d;
                dst[..self.len * d].copy_from_slice(&buf[src..src + self.len * d]);
            }
            *buf = grown;
        }
        self.capacity = cap;
    }

    /// Offset of position `pos` of (`row`, `head`).
    #[inline]
    pub fn offset(&self, row: usize, head: usize, pos: usize) -> usize {
        ((row * self.heads + head) * self.capacity + pos) * self.head_dim
    }

    /// Row `i` of the result is row `rows[i]` of `self`.
    pub fn select_rows(&self, rows: &[u32]) -> Result<Self> {
        let block = self.heads * self.capacity * self.head_dim;
        let mut out = Self {
            k: Vec::with_capacity(rows.len() * block),
            v: Vec::with_capacity(rows.len() * block),
            rows: rows.len(),
            heads: self.heads,
            head_dim: self.head_dim,
            len: self.len,
            capacity: self.capacity,
        };
        for &r in rows {
            let r = r as usize;
            anyhow::ensure!(r < self.rows, "row {r} of a {}-row cache", self.rows);
            out.k.extend_from_slice(&self.k[r * block..(r + 1) * block]);
            out.v.extend_from_slice(&self.v[r * block..(r + 1) * block]);
        }
        Ok(out)
    }
}

/// Everything needed to continue decoding a batch of rows.
#[derive(Clone, Debug, Default)]
pub struct DecodeState {
    /// Encoder output `[rows, src_len, hidden]` (seq2seq).
    pub encoder_hidden: Option<Tensor>,
    /// Encoder padding mask `[rows, src_len]` u32 (seq2seq).
    pub encoder_mask: Option<Tensor>,
    /// One cache per decoder layer.
    pub layers: Vec<LayerCache>,
    /// Padding mask over every cached self-attention position `[rows, past_len]` u32
    /// (decoder-only prompts of different lengths are left-padded).
    pub past_mask: Option<Tensor>,
    /// Per-row position of the next token `[rows]` u32 (decoder-only, with left padding).
    pub next_position: Option<Tensor>,
    /// Decoder positions processed so far (same for all rows).
    pub steps: usize,
    /// Logits `[rows, vocab]` already computed for the next token (decoder-only prefill), consumed by
    /// [`Decoder::first_logits`].
    pub pending_logits: Option<Tensor>,
}

impl DecodeState {
    /// Keep/reorder/duplicate rows: row `i` of the result is row `rows[i]` of `self`. `rows: [n]` u32.
    pub fn select_rows(&self, rows: &Tensor) -> Result<Self> {
        let sel = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
            Ok(match t {
                Some(t) => Some(t.index_select(rows, 0)?),
                None => None,
            })
        };
        let pair = |p: &Option<(Tensor, Tensor)>| -> Result<Option<(Tensor, Tensor)>> {
            Ok(match p {
                Some((k, v)) => Some((k.index_select(rows, 0)?, v.index_select(rows, 0)?)),
                None => None,
            })
        };
        let raw_rows = match self.layers.iter().any(|l| l.raw_kv.is_some()) {
            true => rows.to_vec1::<u32>()?,
            false => Vec::new(),
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerCache {
                    self_kv: pair(&l.self_kv)?,
                    cross_kv: pair(&l.cross_kv)?,
                    raw_kv: l
                        .raw_kv
                        .as_ref()
                        .map(|r| r.select_rows(&raw_rows))
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            encoder_hidden: sel(&self.encoder_hidden)?,
            encoder_mask: sel(&self.encoder_mask)?,
            layers,
            past_mask: sel(&self.past_mask)?,
            next_position: sel(&self.next_position)?,
            steps: self.steps,
            pending_logits: sel(&self.pending_logits)?,
        })
    }

    /// Number of rows in the state.
    pub fn rows(&self) -> Result<usize> {
        if let Some(t) = self.encoder_hidden.as_ref().or(self.past_mask.as_ref()) {
            return Ok(t.dim(0)?);
        }
        for l in &self.layers {
            if let Some((k, _)) = &l.self_kv {
                return Ok(k.dim(0)?);
            }
            if let Some(r) = &l.raw_kv {
                return Ok(r.rows);
            }
        }
        anyhow::bail!("empty decode state")
    }
}

/// Step-wise decoding, shared by seq2seq and decoder-only generators.
pub trait Decoder: Send + Sync {
    fn special_ids(&self) -> &SpecialIds;

    /// Encode the context rows (seq2seq) or prefill the prompts (decoder-only, which also sets
    /// `pending_logits`). No decoder token has been consumed yet.
    fn start(&self, input: &GenInput) -> Result<DecodeState>;

    /// Feed one token per row, `tokens: [rows]` u32; returns next-token logits `[rows, vocab]`.
    fn step(&self, state: &mut DecodeState, tokens: &Tensor) -> Result<Tensor>;

    /// Logits for the first generated token: the prefill's (decoder-only) or one step on
    /// `decoder_start` (seq2seq). `[rows, vocab]`.
    fn first_logits(&self, state: &mut DecodeState) -> Result<Tensor> {
        if let Some(l) = state.pending_logits.take() {
            return Ok(l);
        }
        let rows = state.rows()?;
        let start = Tensor::full(
            self.special_ids().decoder_start,
            rows,
            &candle_core::Device::Cpu,
        )?
        .to_device(&self.device())?;
        self.step(state, &start)
    }

    fn device(&self) -> candle_core::Device;

    /// The sizes a training forward's kept activations scale with (the trainer's memory check).
    fn activation_shape(&self) -> ActivationShape;
}

/// The sizes that a training forward's activations (kept for backward) scale with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActivationShape {
    pub hidden: usize,
    /// Feed-forward width.
    pub ffn: usize,
    pub heads: usize,
    pub vocab: usize,
    /// Layers over the context rows whose activations are kept: the encoder's (seq2seq), or the
    /// blocks a gradient flows through (decoder-only: the trainable blocks).
    pub input_layers: usize,
    /// Decoder layers over the answer tokens (seq2seq; 0 for decoder-only, whose answer tokens go
    /// through `input_layers` after the prompt).
    pub decoder_layers: usize,
}

impl ActivationShape {
    /// candle keeps about this many f32 values per token and layer for each one counted by
    /// [`ActivationShape::training_bytes`] (contiguous copies, broadcast masks, f32 softmax
    /// inputs). Calibrated on SmolLM2-135M with 12 trainable layers over the SQuAD-dev KB: one
    /// training step of 1 and 4 questions × 3 documents (223 and 267 prompt tokens) peaked at 3.2
    /// and 10.7 GB RSS, about 0.84 GB per prompt row; with 3.5 the estimate is 2.0 and 10.0 GB.
    pub const KEPT_PER_COUNTED: f64 = 3.5;

    /// Estimated bytes one training forward and backward over `rows` rows of `input_len` context
    /// (or prompt) tokens and `target_len` answer tokens holds at its peak, beyond the weights and
    /// optimiser state. Counted per token and layer: the attention and MLP values kept for backward
    /// (≈ 12 × hidden + 4 × ffn) and every head's scores and probabilities over the keys; plus the
    /// answer tokens' logits, log-softmax and gradient.
    pub fn training_bytes(&self, rows: usize, input_len: usize, target_len: usize) -> u64 {
        let per_token =
            |keys: usize| (12 * self.hidden + 4 * self.ffn + 2 * self.heads * keys) as f64;
        let (s, t) = (input_len, target_len);
        let counted = match self.decoder_layers {
            0 => self.input_layers as f64 * (s + t) as f64 * per_token(s + t),
            d => {
                let cross = (4 * self.hidden + 2 * self.heads * s) as f64;
                self.input_layers as f64 * s as f64 * per_token(s)
                    + d as f64 * t as f64 * (per_token(t) + cross)
            }
        };
        let logits = 3.0 * t as f64 * self.vocab as f64;
        (4.0 * rows as f64 * (Self::KEPT_PER_COUNTED * counted + logits)) as u64
    }
}

/// Seq2seq generators (BART, T5): adds the teacher-forced forward used by the losses.
pub trait Seq2Seq: Decoder {
    /// Encoder output `[rows, src_len, hidden]`.
    fn encode(&self, input: &GenInput) -> Result<Tensor>;

    /// Teacher-forced logits `[rows, tgt_len, vocab]`: `logits[:, t]` predicts the token after
    /// `decoder_input_ids[:, t]` (`decoder_input_ids: [rows, tgt_len]` u32). Differentiable.
    fn forward(&self, input: &GenInput, decoder_input_ids: &Tensor) -> Result<Tensor> {
        self.forward_from_state(&self.start(input)?, decoder_input_ids)
    }

    /// Teacher-forced logits `[rows, tgt_len, vocab]` over rows that are already encoded: `state` from
    /// [`Decoder::start`], possibly reordered/duplicated by [`DecodeState::select_rows`] (e.g. rescoring
    /// many candidates against the same contexts without re-encoding). The state's self-attention cache is
    /// ignored and left untouched. Differentiable.
    fn forward_from_state(&self, state: &DecodeState, decoder_input_ids: &Tensor)
        -> Result<Tensor>;

    /// Trainable parameters by HF name (empty unless loaded trainable).
    fn vars(&self) -> Vec<(String, Var)>;

    /// The train-mode switch of the model's dropouts (rates from its config.json).
    fn dropout(&self) -> &crate::nn::DropoutSwitch;

    /// The `prefix` of the generator's config.json (T5: e.g. "context: "), which the retriever puts
    /// in front of every context string.
    fn config_prefix(&self) -> Option<&str> {
        None
    }
}

/// Decoder-only generators (Llama family): adds the one-pass teacher-forced forward the losses use,
/// the trainable parameters and saving in HF's layout.
pub trait CausalLm: Decoder {
    /// Teacher-forced logits `[rows, tgt_len, vocab]` of `decoder_input_ids: [rows, tgt_len]` u32
    /// after each row's prompt (`input`, right-padded): `decoder_input_ids[:, 0]` stands for the
    /// prompt (the start token is not fed), so `logits[:, 0]` predicts the first token after the
    /// prompt and `logits[:, t]` the one after `decoder_input_ids[:, t]`. Differentiable with respect
    /// to [`CausalLm::vars`].
    fn forward(&self, input: &GenInput, decoder_input_ids: &Tensor) -> Result<Tensor>;

    /// Trainable parameters by HF name (empty unless made trainable).
    fn vars(&self) -> Vec<(String, Var)>;

    /// Write the model in HF's layout (`config.json` + `model.safetensors`) to `dir`.
    fn save_pretrained(&self, dir: &std::path::Path) -> Result<()>;
}

/// A generator of either family, as the RAG head drives it. Decoding goes through [`Decoder`] for
/// both; the only difference the RAG head sees is how teacher-forced logits are computed and which
/// padding mask RAG-Sequence decoding uses.
pub enum Generator {
    /// Encoder-decoder (BART, T5): context rows are encoder inputs.
    Seq2Seq(Box<dyn Seq2Seq>),
    /// Decoder-only (Llama family): context rows are prompts, prefilled by [`Decoder::start`].
    DecoderOnly(Box<dyn CausalLm>),
}

impl Generator {
    pub fn decoder(&self) -> &dyn Decoder {
        match self {
            Self::Seq2Seq(g) => g.as_ref(),
            Self::DecoderOnly(g) => g.as_ref(),
        }
    }

    pub fn special_ids(&self) -> &SpecialIds {
        self.decoder().special_ids()
    }

    pub fn device(&self) -> candle_core::Device {
        self.decoder().device()
    }

    pub fn is_decoder_only(&self) -> bool {
        matches!(self, Self::DecoderOnly(_))
    }

    pub fn activation_shape(&self) -> ActivationShape {
        self.decoder().activation_shape()
    }

    /// The encoder-decoder, when it is one.
    pub fn seq2seq(&self) -> Option<&dyn Seq2Seq> {
        match self {
            Self::Seq2Seq(g) => Some(g.as_ref()),
            Self::DecoderOnly(_) => None,
        }
    }

    /// The train-mode switch of the generator's dropouts: seq2seq generators only (the Llama-family
    /// configs rustrag loads have no dropout; LoRA adapters are trained with `lora_dropout` 0).
    pub fn dropout(&self) -> Option<&crate::nn::DropoutSwitch> {
        self.seq2seq().map(|g| g.dropout())
    }

    /// Teacher-forced logits `[rows, tgt_len, vocab]` for `decoder_input_ids: [rows, tgt_len]` u32:
    /// `logits[:, t]` predicts the token after `decoder_input_ids[:, t]`. Seq2seq: the model's
    /// differentiable forward. Decoder-only: the prompt stands in for `decoder_input_ids[:, 0]` (the
    /// start token), so `logits[:, 0]` are the prefill's ([`CausalLm::forward`], one pass).
    pub fn forward(&self, input: &GenInput, decoder_input_ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Seq2Seq(g) => g.forward(input, decoder_input_ids),
            Self::DecoderOnly(g) => g.forward(input, decoder_input_ids),
        }
    }

    /// [`Self::forward`] over rows already started (state from [`Decoder::start`], possibly
    /// reordered or duplicated), decoded step by step with the KV cache; `state` is left untouched.
    pub fn forward_from_state(
        &self,
        state: &DecodeState,
        decoder_input_ids: &Tensor,
    ) -> Result<Tensor> {
        teacher_forced_steps(self.decoder(), state, decoder_input_ids)
    }

    /// Trainable parameters by HF name (empty unless loaded or made trainable).
    pub fn vars(&self) -> Vec<(String, Var)> {
        match self {
            Self::Seq2Seq(g) => g.vars(),
            Self::DecoderOnly(g) => g.vars(),
        }
    }
}

/// Teacher forcing through [`Decoder::step`]: position 0 is the pending prefill logits when the state
/// has them (decoder-only), else a step on `ids[:, 0]`; then one step per later token.
fn teacher_forced_steps(dec: &dyn Decoder, state: &DecodeState, ids: &Tensor) -> Result<Tensor> {
    let (_, t) = ids.dims2()?;
    let mut st = state.clone();
    let mut steps = Vec::with_capacity(t);
    for i in 0..t {
        let logits = match (i, st.pending_logits.take()) {
            (0, Some(l)) => l,
            _ => dec.step(&mut st, &ids.narrow(1, i, 1)?.squeeze(1)?.contiguous()?)?,
        };
        steps.push(logits);
    }
    Ok(Tensor::stack(&steps, 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_kv_grows_in_place_and_selects_rows() {
        let (rows, heads, d) = (3, 2, 4);
        let mut kv = RawKv::new(rows, heads, d);
        // Append 40 positions one at a time; value = row * 1000 + head * 100 + pos (+ 0.5 in v).
        for pos in 0..40 {
            kv.reserve(1);
            for r in 0..rows {
                for h in 0..heads {
                    let o = kv.offset(r, h, pos);
                    let x = (r * 1000 + h * 100 + pos) as f32;
                    kv.k[o..o + d].fill(x);
                    kv.v[o..o + d].fill(x + 0.5);
                }
            }
            kv.len += 1;
        }
        assert!(kv.capacity >= 40 && kv.capacity < 80);
        let picked = kv.select_rows(&[2, 0, 2]).unwrap();
        assert_eq!(picked.rows, 3);
        for (i, r) in [2usize, 0, 2].into_iter().enumerate() {
            for h in 0..heads {
                for pos in 0..40 {
                    let o = picked.offset(i, h, pos);
                    let x = (r * 1000 + h * 100 + pos) as f32;
                    assert!(picked.k[o..o + d].iter().all(|&y| y == x));
                    assert!(picked.v[o..o + d].iter().all(|&y| y == x + 0.5));
                }
            }
        }
        assert!(kv.select_rows(&[3]).is_err());
        // From tensors: capacity = len, same layout.
        let t = Tensor::arange(
            0f32,
            (rows * heads * 5 * d) as f32,
            &candle_core::Device::Cpu,
        )
        .unwrap()
        .reshape((rows, heads, 5, d))
        .unwrap();
        let from = RawKv::from_tensors(&t, &t).unwrap();
        assert_eq!((from.len, from.capacity), (5, 5));
        assert_eq!(
            from.k[from.offset(1, 1, 3)],
            ((heads + 1) * 5 * d + 3 * d) as f32
        );
    }
}
