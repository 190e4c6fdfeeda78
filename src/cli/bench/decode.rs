//! Decode speed of a GGUF Llama-family model: prefill and greedy decode tokens/s (the peer is
//! llama.cpp via llama-cpp-python on the same file, run by the bench driver).

use crate::generators::gguf::{tokenizer_from_gguf, GgufFile};
use crate::generators::llama::{GgufWeights, Llama};
use crate::generators::{Decoder, GenInput};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use std::path::Path;
use std::time::Instant;

/// Timings of one prefill + greedy decode run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DecodeBench {
    pub model: String,
    /// How the weights were held (`Fast`, `AsStored`, `F32`).
    pub weights: String,
    /// Worker threads available to the matmuls (rayon pool).
    pub threads: usize,
    pub load_s: f64,
    pub prompt_tokens: usize,
    pub prefill_s: f64,
    pub prefill_tokens_per_s: f64,
    /// Tokens generated after the prefill (greedy, no EOS stop, so every run does the same work).
    pub decode_tokens: usize,
    pub decode_s: f64,
    pub decode_tokens_per_s: f64,
    /// The generated text (sanity check that the model runs correctly).
    pub text: String,
}

/// Load `gguf`, prefill `prompt` (encoded without special tokens) and greedily decode `n_tokens`,
/// with the default weight handling ([`GgufWeights::Fast`]).
pub fn bench_decode(gguf: &Path, prompt: &str, n_tokens: usize) -> Result<DecodeBench> {
    bench_decode_with(gguf, prompt, n_tokens, GgufWeights::default())
}

/// [`bench_decode`] with the weights held as `weights` says.
pub fn bench_decode_with(
    gguf: &Path,
    prompt: &str,
    n_tokens: usize,
    weights: GgufWeights,
) -> Result<DecodeBench> {
    if n_tokens == 0 {
        bail!("bench decode: n_tokens must be at least 1");
    }
    let device = Device::Cpu;
    let t0 = Instant::now();
    let g = GgufFile::open(gguf)?;
    let model = Llama::from_gguf_with(&g, &device, weights)?;
    let tok = tokenizer_from_gguf(&g, model.config.vocab_size)?;
    let load_s = t0.elapsed().as_secs_f64();
    let mut ids = tok
        .encode_batch(&[prompt], false, None, crate::tokenize::Padding::None)?
        .input_ids
        .remove(0);
    if let (true, Some(bos)) = (ids.is_empty(), tok.special.bos) {
        ids.push(bos);
    }
    if ids.is_empty() {
        bail!("bench decode: empty prompt");
    }
    let n = ids.len();
    let input = GenInput {
        input_ids: Tensor::from_vec(ids.clone(), (1, n), &device)?,
        attention_mask: Tensor::ones((1, n), candle_core::DType::U32, &device)?,
    };
    let t1 = Instant::now();
    let mut state = model.start(&input)?;
    let mut logits = model.first_logits(&mut state)?;
    let prefill_s = t1.elapsed().as_secs_f64();
    let mut out = Vec::with_capacity(n_tokens);
    let t2 = Instant::now();
    for i in 0..n_tokens {
        let next = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?[0];
        out.push(next);
        if i + 1 < n_tokens {
            logits = model.step(&mut state, &Tensor::new(&[next], &device)?)?;
        }
    }
    let decode_s = t2.elapsed().as_secs_f64();
    // n_tokens argmaxes, n_tokens - 1 forward steps (the first token came from the prefill).
    let steps = n_tokens.saturating_sub(1).max(1);
    Ok(DecodeBench {
        model: gguf.display().to_string(),
        weights: format!("{weights:?}"),
        threads: rayon::current_num_threads(),
        load_s,
        prompt_tokens: n,
        prefill_s,
        prefill_tokens_per_s: n as f64 / prefill_s,
        decode_tokens: n_tokens,
        decode_s,
        decode_tokens_per_s: steps as f64 / decode_s,
        text: tok.decode(&out, true)?,
    })
}
