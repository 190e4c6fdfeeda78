//! `rustrag bench rag`: RAG-Token beam generate and RAG-Sequence thorough generate, rustrag vs HF
//! transformers (bench/peers/rag_hf.py) in the same run, same checkpoint, KB, questions and settings.
//! Both sides time question encoding + exact retrieval + context building + generation.

use crate::rag::checkpoint::{load_rag, LoadOptions};
use crate::rag::{GenerationSettings, InMemoryIndex, RagMode, RagModel};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Settings of one RAG benchmark run.
#[derive(Clone, Debug, clap::Args)]
pub struct RagBenchArgs {
    /// HF RAG checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Directory with passages.jsonl + embeddings.safetensors.
    #[arg(long)]
    pub kb: PathBuf,
    /// token or sequence (default: the checkpoint's head).
    #[arg(long)]
    pub mode: Option<String>,
    /// A JSON list of questions (default: built-in SQuAD-style questions).
    #[arg(long)]
    pub questions: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    pub n_docs: usize,
    #[arg(long, default_value_t = 4)]
    pub beams: usize,
    #[arg(long, default_value_t = 20)]
    pub max_length: usize,
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Python interpreter with torch + transformers for the peer (skip the peer when "none").
    #[arg(long, default_value = "python3")]
    pub python: String,
}

/// Timings of both sides.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RagBenchReport {
    pub mode: RagMode,
    pub questions: usize,
    pub n_docs: usize,
    pub beams: usize,
    pub max_length: usize,
    /// Best-of-N wall time of rustrag, seconds.
    pub rustrag_seconds: f64,
    /// Best-of-N wall time of HF transformers, seconds (None when the peer did not run).
    pub hf_seconds: Option<f64>,
    /// hf / rustrag.
    pub speedup: Option<f64>,
    /// Whether both produced the same ids.
    pub same_output: Option<bool>,
    pub peer: Option<serde_json::Value>,
    pub peer_error: Option<String>,
}

const DEFAULT_QUESTIONS: &[&str] = &[
    "Which NFL team represented the AFC at Super Bowl 50?",
    "Where did Super Bowl 50 take place?",
    "Who is the commissioner of the NFL?",
    "How many NFL teams have gone 15-1 in one season?",
];

fn generate(model: &RagModel, index: &InMemoryIndex, questions: &[&str], a: &RagBenchArgs) -> Result<Vec<Vec<u32>>> {
    let r = model.retrieve(index, questions, a.n_docs)?;
    let p = model.generation_params(&GenerationSettings {
        num_beams: Some(a.beams),
        max_length: Some(a.max_length),
        ..Default::default()
    })?;
    match model.mode {
        RagMode::Token => model.generate_token(&r.context, &p),
        RagMode::Sequence => Ok(model.generate_sequence(&r.context, &p, model.config.do_deduplication)?.0),
    }
}

/// Run rustrag, then the HF peer, on the same inputs.
pub fn bench_rag(a: &RagBenchArgs) -> Result<RagBenchReport> {
    let mode = a.mode.as_deref().map(str::parse::<RagMode>).transpose()?;
    let mut model = load_rag(&a.model.to_string_lossy(), &LoadOptions { mode, ..Default::default() })?;
    if let Some(m) = mode {
        model.mode = m;
    }
    let index = InMemoryIndex::load(&a.kb.join("passages.jsonl"), &a.kb.join("embeddings.safetensors"))?;
    let questions: Vec<String> = match &a.questions {
        Some(p) => crate::hub::read_json(p)?,
        None => DEFAULT_QUESTIONS.iter().map(|s| s.to_string()).collect(),
    };
    let refs: Vec<&str> = questions.iter().map(|s| s.as_str()).collect();
    if a.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let mut out = generate(&model, &index, &refs, a)?; // warm-up
    let mut best = f64::INFINITY;
    for _ in 0..a.repeats {
        let t0 = Instant::now();
        out = generate(&model, &index, &refs, a)?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    let mut report = RagBenchReport {
        mode: model.mode,
        questions: questions.len(),
        n_docs: a.n_docs,
        beams: a.beams,
        max_length: a.max_length,
        rustrag_seconds: best,
        hf_seconds: None,
        speedup: None,
        same_output: None,
        peer: None,
        peer_error: None,
    };
    if a.python != "none" {
        match run_peer(a, model.mode, &questions) {
            Ok(v) => {
                report.hf_seconds = v.get("seconds").and_then(|s| s.as_f64());
                report.speedup = report.hf_seconds.map(|h| h / best);
                let theirs: Option<Vec<Vec<u32>>> = v.get("output_ids").and_then(|o| serde_json::from_value(o.clone()).ok());
                report.same_output = theirs.map(|t| t == out);
                let mut v = v;
                if let Some(o) = v.as_object_mut() {
                    o.remove("output_ids");
                }
                report.peer = Some(v);
            }
            Err(e) => report.peer_error = Some(format!("{e:#}")),
        }
    }
    Ok(report)
}

fn peer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/peers/rag_hf.py")
}

fn run_peer(a: &RagBenchArgs, mode: RagMode, questions: &[String]) -> Result<serde_json::Value> {
    let qfile = tempfile::NamedTempFile::new()?;
    std::fs::write(qfile.path(), serde_json::to_string(questions)?)?;
    let mode = match mode {
        RagMode::Token => "token",
        RagMode::Sequence => "sequence",
    };
    let out = std::process::Command::new(&a.python)
        .arg(peer_script())
        .args(["--model", &a.model.to_string_lossy(), "--kb", &a.kb.to_string_lossy()])
        .args(["--questions", &qfile.path().to_string_lossy(), "--mode", mode])
        .args(["--n-docs", &a.n_docs.to_string(), "--beams", &a.beams.to_string()])
        .args(["--max-length", &a.max_length.to_string(), "--repeats", &a.repeats.to_string()])
        .output()
        .with_context(|| format!("running {} {}", a.python, peer_script().display()))?;
    if !out.status.success() {
        bail!("HF peer failed: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).context("HF peer printed no JSON")?;
    Ok(serde_json::from_str(line)?)
}

/// Human-readable summary.
pub fn print_report(r: &RagBenchReport) {
    println!(
        "rag {:?}: {} questions, n_docs {}, beams {}, max_length {}",
        r.mode, r.questions, r.n_docs, r.beams, r.max_length
    );
    println!("  rustrag      {:.4} s", r.rustrag_seconds);
    match (r.hf_seconds, r.speedup) {
        (Some(h), Some(s)) => println!("  transformers {h:.4} s  -> {s:.2}x (same output: {:?})", r.same_output),
        _ => println!("  transformers: not run ({})", r.peer_error.as_deref().unwrap_or("--python none")),
    }
}
