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

/// Cosine at or above which two f32 encoders' vectors count as the same output.
const SAME_COSINE: f64 = 0.9999;

/// The peer's vectors: raw little-endian f32, `n` rows.
fn read_f32_rows(path: &std::path::Path, n: usize) -> Result<Tensor> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    anyhow::ensure!(
        n > 0 && v.len().is_multiple_of(n),
        "{}: {} floats for {n} texts",
        path.display(),
        v.len()
    );
    let dim = v.len() / n;
    Ok(Tensor::from_vec(v, (n, dim), &candle_core::Device::Cpu)?)
}

/// Cosine similarity of each row of `a` with the same row of `b` (`[n, dim]` each).
fn row_cosines_each(a: &Tensor, b: &Tensor) -> Result<Vec<f64>> {
    anyhow::ensure!(
        a.dims() == b.dims(),
        "vectors {:?} vs the peer's {:?}",
        a.dims(),
        b.dims()
    );
    let (a, b) = (a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
    Ok(a.iter()
        .zip(&b)
        .map(|(x, y)| {
            let dot: f64 = x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum();
            let nx: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum();
            let ny: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum();
            dot / (nx.sqrt() * ny.sqrt()).max(1e-30)
        })
        .collect())
}

/// Cosine similarity of each row of `a` with the same row of `b`: (min, mean).
fn row_cosines(a: &Tensor, b: &Tensor) -> Result<(f64, f64)> {
    let cos = row_cosines_each(a, b)?;
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
    let mut timed = Vec::new(); // (label, seconds, embeddings)
    let mut f32_emb = None;
    if args.precision != Precision::Int8 {
        let (s, emb) = time_encoder(load(false)?.as_ref(), &refs, args.repeats)?;
        ours["seconds"] = json!(s);
        ours["per_second"] = json!(texts.len() as f64 / s);
        ours["first_embedding_head"] = json!(emb.get(0)?.narrow(0, 0, 4)?.to_vec1::<f32>()?);
        timed.push(("f32", s, emb.clone()));
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
        timed.push(("int8", s, emb));
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
        let emb_file =
            tempfile::NamedTempFile::new().context("temp file for the peer's vectors")?;
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
            "--out".into(),
            emb_file.path().display().to_string(),
        ];
        if args.precision != Precision::F32 {
            peer_args.push("--int8".into());
        }
        let mut p = peer.run("st_encode.py", &peer_args)?;
        let theirs = read_f32_rows(emb_file.path(), texts.len())?;
        let peer_f32 = p.get("seconds").and_then(|v| v.as_f64());
        let peer_int8 = p.pointer("/int8/seconds").and_then(|v| v.as_f64());
        let peer_int8_min_cos = p
            .pointer("/int8/cosine_to_f32/min")
            .and_then(|v| v.as_f64());
        for (label, s, emb) in &timed {
            let cos = row_cosines_each(emb, &theirs)?;
            let same = cos.iter().filter(|&&c| c >= SAME_COSINE).count();
            let min = cos.iter().copied().fold(f64::INFINITY, f64::min);
            // f32: every vector the same as sentence-transformers' (cosine >= SAME_COSINE).
            // int8: an approximation on both sides; comparable when ours is at least as close to
            // sentence-transformers' f32 vectors as torch's dynamic int8 is.
            let comparable = match *label {
                "f32" => same == cos.len(),
                _ => peer_int8_min_cos.is_some_and(|m| min >= m),
            };
            if let Some(o) = p.as_object_mut() {
                o.insert(
                    format!("rustrag_{label}_vs_these"),
                    json!({"rows_with_cosine_ge_0.9999": format!("{same}/{}", cos.len()),
                           "min_cosine": min, "ratio_reported": comparable}),
                );
            }
            if !comparable {
                tracing::warn!(
                    "{label}: outputs differ from the peer's (min cosine {min:.6}): no ratio"
                );
                continue;
            }
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
