//! Per-token log-probs of a continuation after a prompt under a decoder-only generator (GGUF file or
//! HF directory, e.g. one `rustrag train rag` wrote), as JSON: the Rust side of
//! `tests/fixtures/check_decoder_only_checkpoint.py`, which compares them with transformers'.
//!
//! ```text
//! cargo run --release --example score_continuation -- GENERATOR PROMPT_IDS CONTINUATION_IDS
//! ```
//! ids are comma-separated.

use anyhow::{bail, Result};
use rustrag::rag::pipeline::{open_decoder_only, DecoderTraining, WeightsChoice};
use rustrag::tokenize::ids_tensor;

fn ids(s: &str) -> Result<Vec<u32>> {
    Ok(s.split(',').map(str::parse).collect::<Result<_, _>>()?)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [generator, prompt, continuation] = args.as_slice() else {
        bail!("usage: score_continuation GENERATOR PROMPT_IDS CONTINUATION_IDS");
    };
    let rag = open_decoder_only(
        generator.as_ref(),
        WeightsChoice::F32,
        &DecoderTraining::Frozen,
    )?;
    let (prompt, continuation) = (ids(prompt)?, ids(continuation)?);
    let device = &rag.device;
    let input = rustrag::generators::GenInput {
        input_ids: ids_tensor(std::slice::from_ref(&prompt), device)?,
        attention_mask: ids_tensor(&[vec![1; prompt.len()]], device)?,
    };
    // Position 0 stands for the prompt; the continuation's tokens are the targets.
    let start = rag.generator.special_ids().decoder_start;
    let decoder_input: Vec<u32> = std::iter::once(start)
        .chain(continuation[..continuation.len() - 1].iter().copied())
        .collect();
    let logits = rag
        .generator
        .forward(&input, &ids_tensor(&[decoder_input], device)?)?;
    let lp = candle_nn::ops::log_softmax(&logits.squeeze(0)?, 1)?.to_vec2::<f32>()?;
    let scores: Vec<f32> = continuation
        .iter()
        .enumerate()
        .map(|(t, &id)| lp[t][id as usize])
        .collect();
    println!("{}", serde_json::json!({ "logprobs": scores }));
    Ok(())
}
