//! Generators: seq2seq (BART, T5) and decoder-only (Llama family) language models behind one
//! step-wise decoding interface that the RAG layer drives.
//!
//! The RAG layer encodes a batch of context rows once ([`Decoder::start`]), then asks for next-token
//! logits one step at a time for many rows ([`Decoder::step`]), reordering or duplicating rows between
//! steps ([`DecodeState::select_rows`]) for beam search and n_docs expansion.

pub mod attention;
pub mod auto;
pub mod bart;
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
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerCache {
                    self_kv: pair(&l.self_kv)?,
                    cross_kv: pair(&l.cross_kv)?,
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

    /// The `prefix` of the generator's config.json (T5: e.g. "context: "), which the retriever puts
    /// in front of every context string.
    fn config_prefix(&self) -> Option<&str> {
        None
    }
}
