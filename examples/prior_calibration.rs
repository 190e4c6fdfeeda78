//! Doc-prior calibration on SQuAD-dev: for a fixed sample of questions, the prior p(z|x) on the gold
//! passage and the EM/F1 of RAG-Token and RAG-Sequence at several prior temperatures τ, through the
//! library's [`Pipeline`]. Every (question, τ, mode) result is written as one JSON line as soon as it
//! is done, so an interrupted run keeps what finished.
//!
//! ```text
//! cargo run --release --example prior_calibration -- KB GGUF QUERIES.jsonl[.gz] OUT.jsonl \
//!     [--sample 200] [--taus 1,0.05] [--modes token,sequence] [--beams 1] [--max-new-tokens 32]
//!     [--weights f32|quantized]
//! ```
//! The sample is questions `i * (N / sample)` for `i < sample` (N = questions in the file).

use anyhow::{bail, Context, Result};
use rustrag::eval::answers::{read_examples, Example};
use rustrag::eval::qa::{exact_match, f1_score, max_over_answers};
use rustrag::rag::pipeline::{
    AnswerOptions, Pipeline, PipelineConfig, SequenceDecoding, WeightsChoice,
};
use rustrag::rag::RagMode;
use std::io::Write;
use std::path::PathBuf;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        bail!("usage: prior_calibration KB GGUF QUERIES OUT [--sample N] [--taus 1,0.05] [--modes token,sequence] [--beams B] [--max-new-tokens T]");
    }
    let (kb, gguf, queries, out) = (
        PathBuf::from(&args[0]),
        PathBuf::from(&args[1]),
        PathBuf::from(&args[2]),
        PathBuf::from(&args[3]),
    );
    let opt = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| default.to_string())
    };
    let sample: usize = opt("--sample", "200").parse()?;
    let taus: Vec<f64> = opt("--taus", "1,0.05")
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let modes: Vec<RagMode> = opt("--modes", "token,sequence")
        .split(',')
        .map(str::parse)
        .collect::<Result<_>>()?;
    let beams: usize = opt("--beams", "1").parse()?;
    let max_new: usize = opt("--max-new-tokens", "32").parse()?;
    let all = read_examples(&queries)?;
    if sample == 0 || sample > all.len() {
        bail!("--sample must be in 1..={}", all.len());
    }
    let stride = all.len() / sample;
    let config = PipelineConfig {
        gguf_weights: match opt("--weights", "f32").as_str() {
            "quantized" => WeightsChoice::Quantized,
            _ => WeightsChoice::F32,
        },
        ..Default::default()
    };
    let pipeline = Pipeline::open(&kb, &gguf, config)?;
    eprintln!(
        "{} questions, every {stride}th ({sample}); KB τ = {}",
        all.len(),
        pipeline.prior_temperature()
    );
    let mut w = std::fs::File::create(&out).with_context(|| out.display().to_string())?;
    let picked: Vec<&Example> = (0..sample).map(|i| &all[i * stride]).collect();
    // Priors first (retrieval only, every question), then generation question by question.
    let texts: Vec<String> = picked.iter().map(|q| q.question.clone()).collect();
    for &tau in &taus {
        let opts = AnswerOptions {
            prior_temperature: Some(tau),
            ..Default::default()
        };
        for (n, (q, sources)) in picked
            .iter()
            .zip(pipeline.sources(&texts, &opts)?)
            .enumerate()
        {
            let gold_prior = sources
                .iter()
                .find(|s| Some(s.passage_id.as_str()) == q.gold_pid.as_deref())
                .map(|s| s.prior);
            let line = serde_json::json!({
                "n": n, "id": q.id, "kind": "prior", "tau": tau,
                "gold_retrieved": gold_prior.is_some(), "gold_prior": gold_prior,
                "priors": sources.iter().map(|s| s.prior).collect::<Vec<_>>(),
                "scores": sources.iter().map(|s| s.score).collect::<Vec<_>>(),
                "passages": sources.iter().map(|s| s.passage_id.clone()).collect::<Vec<_>>(),
            });
            writeln!(w, "{line}")?;
        }
        w.flush()?;
    }
    for (n, q) in picked.iter().enumerate() {
        for &mode in &modes {
            for &tau in &taus {
                let t0 = std::time::Instant::now();
                let opts = AnswerOptions {
                    mode: Some(mode),
                    beams: Some(beams),
                    max_new_tokens: Some(max_new),
                    sequence_decoding: SequenceDecoding::Thorough,
                    prior_temperature: Some(tau),
                    provenance: false,
                    ..Default::default()
                };
                let r = pipeline
                    .answer_with(std::slice::from_ref(&q.question), &opts)?
                    .remove(0);
                let text = &r.answers[0].text;
                let gold = q.gold_pid.as_deref();
                let gold_prior = r
                    .sources
                    .iter()
                    .find(|s| Some(s.passage_id.as_str()) == gold)
                    .map(|s| s.prior);
                let line = serde_json::json!({
                    "n": n, "id": q.id, "kind": "answer", "mode": mode, "tau": tau, "answer": text,
                    "em": max_over_answers(exact_match, text, &q.answers),
                    "f1": max_over_answers(f1_score, text, &q.answers),
                    "gold_retrieved": gold_prior.is_some(), "gold_prior": gold_prior,
                    "priors": r.sources.iter().map(|s| s.prior).collect::<Vec<_>>(),
                    "passages": r.sources.iter().map(|s| s.passage_id.clone()).collect::<Vec<_>>(),
                    "seconds": t0.elapsed().as_secs_f64(),
                });
                writeln!(w, "{line}")?;
                w.flush()?;
            }
        }
        eprintln!("{}/{sample} done", n + 1);
    }
    Ok(())
}
