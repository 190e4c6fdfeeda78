//! `rustrag bench encode`: sentence-encoder throughput on real passages vs sentence-transformers
//! (PyTorch CPU), same texts, batch size and max length.

use super::{Peer, Report};
use crate::encoders::{load_encoder, LoadOptions};
use crate::kb::ingest::{read_corpus, IngestOptions};
use anyhow::{Context, Result};
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
}

pub fn run(args: Args, peer: Option<&Peer>) -> Result<Report> {
    let docs = read_corpus(
        std::slice::from_ref(&args.corpus),
        &IngestOptions::default(),
    )?
    .documents;
    let texts: Vec<String> = docs.into_iter().take(args.n).map(|d| d.text).collect();
    let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
    let opts = LoadOptions {
        batch_size: args.batch_size,
        max_length: Some(args.max_length),
        ..Default::default()
    };
    let encoder = load_encoder(&args.model, &opts)?;
    encoder.encode_texts(&refs[..refs.len().min(args.batch_size)])?; // warm-up
    let mut best = f64::INFINITY;
    let mut first = Vec::new();
    for _ in 0..args.repeats.max(1) {
        let t0 = Instant::now();
        let emb = encoder.encode_texts(&refs)?;
        best = best.min(t0.elapsed().as_secs_f64());
        first = emb.get(0)?.narrow(0, 0, 4)?.to_vec1::<f32>()?;
    }
    let ours = json!({
        "n": texts.len(), "seconds": best, "per_second": texts.len() as f64 / best,
        "threads": rayon::current_num_threads(), "first_embedding_head": first,
    });
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
        let p = peer.run(
            "st_encode.py",
            &[
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
            ],
        )?;
        if let Some(s) = p.get("seconds").and_then(|v| v.as_f64()) {
            report.ratios.push((
                "throughput (rustrag / sentence-transformers)".into(),
                s / best,
            ));
        }
        report.peer = Some(p);
    }
    Ok(report)
}
