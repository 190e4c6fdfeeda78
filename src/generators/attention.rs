//! Multi-head attention pieces shared by the seq2seq generators (BART, T5): head split/merge, the
//! attention product itself and the growing self-attention cache. Differentiable (uses
//! [`crate::nn::softmax_last_dim`]).

use super::{DecodeState, LayerCache};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

/// `[batch, len, heads * head_dim]` -> `[batch, heads, len, head_dim]` (contiguous).
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, hd) = x.dims3()?;
    Ok(x.reshape((b, t, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// `[batch, heads, len, head_dim]` -> `[batch, len, heads * head_dim]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.contiguous()?.reshape((b, t, h * d))?)
}

/// `softmax(q k^T * scale + bias) v` with `q: [b, h, tq, d]`, `k, v: [b, h, tk, d]` and an additive
/// `bias` broadcastable to `[b, h, tq, tk]` (padding/causal masks, T5 position bias), `dropout` on
/// the probabilities (train mode only). Returns `[b, h, tq, d]`.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
    dropout: &crate::nn::Dropout,
) -> Result<Tensor> {
    let mut scores = q.matmul(&k.t()?)?;
    if scale != 1.0 {
        scores = (scores * scale)?;
    }
    if let Some(bias) = bias {
        scores = scores.broadcast_add(bias)?;
    }
    // Softmax in f32 as HF does for half precision.
    let dtype = scores.dtype();
    let probs = crate::nn::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
    Ok(dropout.forward(&probs)?.matmul(v)?)
}

/// Append this step's keys/values `[b, h, t, d]` to a self-attention cache and return the full ones.
pub fn append_kv(
    cache: &mut Option<(Tensor, Tensor)>,
    k: Tensor,
    v: Tensor,
) -> Result<(Tensor, Tensor)> {
    let full = match cache.take() {
        Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        None => (k, v),
    };
    *cache = Some(full.clone());
    Ok(full)
}

/// Check that every id of `ids` (any shape, u32) is below `vocab`, naming `what` in the error.
pub fn check_ids(ids: &Tensor, vocab: usize, what: &str) -> Result<()> {
    if ids.dtype() != DType::U32 {
        bail!("{what}: token ids must be u32, got {:?}", ids.dtype());
    }
    if ids.elem_count() == 0 {
        return Ok(());
    }
    let max = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
    if max as usize >= vocab {
        bail!("{what}: token id {max} is out of range for vocab_size {vocab}");
    }
    Ok(())
}

/// The encoder padding mask `[rows, src_len]` (u32) as an additive bias `[rows, 1, 1, src_len]`.
pub fn padding_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(crate::nn::additive_padding_mask(mask, dtype)?)
}

/// Validate a [`super::GenInput`]: `[rows, len]` ids and mask of the same shape, ids in the vocabulary.
pub fn check_input(input: &super::GenInput, vocab: usize) -> Result<()> {
    let (r, l) = input.input_ids.dims2().map_err(|_| {
        anyhow::anyhow!(
            "input_ids must be [rows, len], got {:?}",
            input.input_ids.dims()
        )
    })?;
    if input.attention_mask.dims() != [r, l] {
        bail!(
            "attention_mask has shape {:?}, input_ids has [{r}, {l}]",
            input.attention_mask.dims()
        );
    }
    if r == 0 || l == 0 {
        bail!("empty generator input [{r}, {l}]");
    }
    check_ids(&input.input_ids, vocab, "input_ids")
}

/// Checks `tokens: [rows]` and the cache depth of `state` before a decoding step; returns the encoder
/// padding bias `[rows, 1, 1, src_len]`.
pub fn step_inputs(
    state: &DecodeState,
    tokens: &Tensor,
    layers: usize,
    dtype: DType,
) -> Result<Tensor> {
    let rows = state.rows()?;
    if tokens.dims() != [rows] {
        bail!("step: tokens must be [{rows}], got {:?}", tokens.dims());
    }
    if state.layers.len() != layers {
        bail!(
            "step: decode state has {} layer caches, the model has {layers} decoder layers",
            state.layers.len()
        );
    }
    encoder_bias(state, dtype)
}

/// The state after encoding: encoder output `[rows, src_len, hidden]` and padding mask, and one cache
/// per decoder layer holding that layer's cross-attention keys/values (computed once, reused by
/// every step).
pub fn encoded_state(
    encoder_hidden: Tensor,
    attention_mask: &Tensor,
    cross_kv: Vec<(Tensor, Tensor)>,
) -> DecodeState {
    DecodeState {
        layers: cross_kv
            .into_iter()
            .map(|kv| LayerCache {
                self_kv: None,
                raw_kv: None,
                cross_kv: Some(kv),
            })
            .collect(),
        encoder_hidden: Some(encoder_hidden),
        encoder_mask: Some(attention_mask.clone()),
        ..Default::default()
    }
}

/// One seq2seq decoding step: checks `tokens: [rows]`, runs the model's
/// `decode(ids [rows, 1], past, caches, enc_bias) -> logits [rows, 1, vocab]` at position
/// `state.steps`, advances the step counter; returns logits `[rows, vocab]`.
pub fn seq2seq_step(
    state: &mut DecodeState,
    tokens: &Tensor,
    layers: usize,
    dtype: DType,
    decode: impl FnOnce(&Tensor, usize, &mut [LayerCache], &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let enc_bias = step_inputs(state, tokens, layers, dtype)?;
    let logits = decode(
        &tokens.unsqueeze(1)?,
        state.steps,
        &mut state.layers,
        &enc_bias,
    )?;
    state.steps += 1;
    Ok(logits.squeeze(1)?)
}

/// Fresh decoder caches for a teacher-forced pass over the encoded rows of `state` (cross-attention
/// keys/values shared, self-attention empty) and the encoder padding bias. Checks that
/// `decoder_input_ids` is `[rows, tgt_len]`.
pub fn full_pass_inputs(
    state: &DecodeState,
    decoder_input_ids: &Tensor,
    layers: usize,
    dtype: DType,
) -> Result<(Vec<LayerCache>, Tensor)> {
    let rows = state.rows()?;
    match decoder_input_ids.dims() {
        [r, t] if *r == rows && *t > 0 => {}
        d => bail!("decoder_input_ids must be [{rows}, tgt_len > 0], got {d:?}"),
    }
    if state.layers.len() != layers {
        bail!(
            "decode state has {} layer caches, the model has {layers} decoder layers",
            state.layers.len()
        );
    }
    let caches = state
        .layers
        .iter()
        .map(|l| LayerCache {
            self_kv: None,
            raw_kv: None,
            cross_kv: l.cross_kv.clone(),
        })
        .collect();
    Ok((caches, encoder_bias(state, dtype)?))
}

fn encoder_bias(state: &DecodeState, dtype: DType) -> Result<Tensor> {
    let mask = state
        .encoder_mask
        .as_ref()
        .context("decode state has no encoder mask (call start first)")?;
    padding_bias(mask, dtype)
}
