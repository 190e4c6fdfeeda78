//! `rustrag bench encode`: sentence-encoder throughput on real passages vs sentence-transformers
//! (PyTorch CPU), same texts, batch size and max length.

use super::{Peer, Report};
use anyhow::{Context, Result};
use candle_core::Tensor;
use rustrag::encoders::{load_encoder, LoadOptions, TextEncoder};
use rustrag::kb::ingest::{read_corpus, IngestOptions};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Sentence-transformers model directory or cached hub id.
    #[arg(long, default_value = "models/all-MiniLM-L6-v2")]
    pub model: String,
    /// Corpus to take passages from (any format `rustrag index build` reads).
    #[arg(long, default_value = "data/squad-dev/corpus.jsonl.gz")]
    pub corpus: PathBuf,
    /// Number of passages.
    #[arg(long, default_value_t = 1000)]
    pub n: usize,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Maximum tokens per passage (both sides).
    #[arg(long, default_value_t = 256)]
    pub max_length: usize,
    /// Timed repetitions (best is reported, both sides).
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
    /// Our encoder in f32, in dynamic int8 (`--int8` elsewhere), or both (int8 is then also
    /// compared with f32 vector by vector).
    #[arg(long, value_enum, default_value = "both")]
    pub precision: Precision,
}

/// Which of our encoders to time.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    Int8,
    Both,
}

/// Best wall time of `repeats` passes over `texts`, and the last pass's embeddings `[n, dim]`.
fn time_encoder(
    encoder: &dyn TextEncoder,
    texts: &[&str],
    repeats: usize,
) -> Result<(f64, Tensor)> {
    encoder.encode_texts(&texts[..texts.len().min(32)])?; // warm-up
    let mut best = f64::INFINITY;
    let mut emb = None;
    for _ in 0..repeats.max(1) {
        let t0 = Instant::now();
        emb = Some(encoder.encode_texts(texts)?);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok((best, emb.context("no pass ran")?))
}

/// Cosine similarity of each row of `a` with the same row of `b`: (min, mean).
fn row_cosines(a: &Tensor, b: &Tensor) -> Result<(f64, f64)> {
    let (a, b) = (a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
    let cos: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(x, y)| {
            let dot: f64 = x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum();
            let nx: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum();
            let ny: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum();
            dot / (nx.sqrt() * ny.sqrt()).max(1e-30)
        })
        .collect();
    let min = cos.iter().copied().fold(f64::INFINITY, f64::min);
    Ok((min, cos.iter().sum::<f64>() / cos.len().max(1) as f64))
}

pub fn run(args: Args, peer: Option<&Peer>) -> Result<Report> {
    let docs = read_corpus(
        std::slice::from_ref(&args.corpus),
        &IngestOptions::default(),
    )?
    .documents;
    let texts: Vec<String> = docs.into_iter().take(args.n).map(|d| d.text).collect();
    let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
    let load = |int8: bool| {
        let opts = LoadOptions {
            batch_size: args.batch_size,
            max_length: Some(args.max_length),
            int8,
            ..Default::default()
        };
        load_encoder(&args.model, &opts)
    };
    let mut ours = json!({"n": texts.len(), "threads": rayon::current_num_threads()});
    let mut timed = Vec::new(); // (label, seconds)
    let mut f32_emb = None;
    if args.precision != Precision::Int8 {
        let (s, emb) = time_encoder(load(false)?.as_ref(), &refs, args.repeats)?;
        ours["seconds"] = json!(s);
        ours["per_second"] = json!(texts.len() as f64 / s);
        ours["first_embedding_head"] = json!(emb.get(0)?.narrow(0, 0, 4)?.to_vec1::<f32>()?);
        timed.push(("f32", s));
        f32_emb = Some(emb);
    }
    if args.precision != Precision::F32 {
        let (s, emb) = time_encoder(load(true)?.as_ref(), &refs, args.repeats)?;
        let mut int8 = json!({"seconds": s, "per_second": texts.len() as f64 / s});
        if let Some(f) = &f32_emb {
            let (min, mean) = row_cosines(&emb, f)?;
            int8["cosine_to_f32"] = json!({"min": min, "mean": mean});
        }
        ours["int8"] = int8;
        timed.push(("int8", s));
    }
    let mut report = Report {
        benchmark: "encode".into(),
        setup: json!({"model": args.model, "corpus": args.corpus, "n": texts.len(),
                      "batch_size": args.batch_size, "max_length": args.max_length}),
        rustrag: ours,
        peer: None,
        ratios: vec![],
    };
    if let Some(peer) = peer {
        let tmp = tempfile::NamedTempFile::new().context("temp file for the peer's texts")?;
        super::write_texts(tmp.path(), &texts)?;
        let mut peer_args: Vec<String> = vec![
            "--model".into(),
            args.model.clone(),
            "--texts".into(),
            tmp.path().display().to_string(),
            "--batch-size".into(),
            args.batch_size.to_string(),
            "--max-length".into(),
            args.max_length.to_string(),
            "--repeats".into(),
            args.repeats.to_string(),
        ];
        if args.precision != Precision::F32 {
            peer_args.push("--int8".into());
        }
        let p = peer.run("st_encode.py", &peer_args)?;
        let peer_f32 = p.get("seconds").and_then(|v| v.as_f64());
        let peer_int8 = p.pointer("/int8/seconds").and_then(|v| v.as_f64());
        for (label, s) in &timed {
            if let Some(peer_s) = peer_f32 {
                report.ratios.push((
                    format!("throughput, {label} (rustrag / sentence-transformers f32)"),
                    peer_s / s,
                ));
            }
            if let (Some(peer_s), &"int8") = (peer_int8, label) {
                report.ratios.push((
                    "throughput, int8 (rustrag / sentence-transformers torch dynamic int8)".into(),
                    peer_s / s,
                ));
            }
        }
        report.peer = Some(p);
    }
    Ok(report)
}
