//! `rustrag bench rag`: RAG-Token beam generate and RAG-Sequence thorough generate, rustrag vs HF
//! transformers (bench/peers/rag_hf.py) in the same run, same checkpoint, KB, questions and settings.
//! Both sides time question encoding + exact retrieval + context building + generation.

use super::{Peer, Report};
use anyhow::{bail, Result};
use rustrag::rag::checkpoint::load_rag_with_kb;
use rustrag::rag::{GenerationSettings, InMemoryIndex, RagMode, RagModel};
use std::path::PathBuf;
use std::time::Instant;

/// Settings of one RAG benchmark run.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
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
}

const DEFAULT_QUESTIONS: &[&str] = &[
    "Which NFL team represented the AFC at Super Bowl 50?",
    "Where did Super Bowl 50 take place?",
    "Who is the commissioner of the NFL?",
    "How many NFL teams have gone 15-1 in one season?",
];

fn generate(
    model: &RagModel,
    index: &InMemoryIndex,
    questions: &[&str],
    a: &Args,
) -> Result<Vec<Vec<u32>>> {
    let r = model.retrieve(index, questions, a.n_docs)?;
    let p = model.generation_params(&GenerationSettings {
        num_beams: Some(a.beams),
        max_length: Some(a.max_length),
        ..Default::default()
    })?;
    match model.mode {
        RagMode::Token => model.generate_token(&r.context, &p),
        RagMode::Sequence => Ok(model
            .generate_sequence(&r.context, &p, model.config.do_deduplication)?
            .0),
    }
}

/// Run rustrag, then (when given) the HF peer `rag_hf.py`, on the same inputs.
pub fn run(a: Args, peer: Option<&Peer>) -> Result<Report> {
    let mode = a.mode.as_deref().map(str::parse::<RagMode>).transpose()?;
    let (model, index) = load_rag_with_kb(&a.model.to_string_lossy(), &a.kb, mode)?;
    let questions: Vec<String> = match &a.questions {
        Some(p) => rustrag::hub::read_json(p)?,
        None => DEFAULT_QUESTIONS.iter().map(|s| s.to_string()).collect(),
    };
    let refs: Vec<&str> = questions.iter().map(|s| s.as_str()).collect();
    if a.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let mut out = generate(&model, &index, &refs, &a)?; // warm-up
    let mut best = f64::INFINITY;
    for _ in 0..a.repeats {
        let t0 = Instant::now();
        out = generate(&model, &index, &refs, &a)?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    let mode_name = match model.mode {
        RagMode::Token => "token",
        RagMode::Sequence => "sequence",
    };
    let setup = serde_json::json!({
        "model": a.model, "kb": a.kb, "mode": mode_name, "questions": questions.len(), "n_docs": a.n_docs,
        "beams": a.beams, "max_length": a.max_length, "repeats": a.repeats, "timing": "best of repeats after one warm-up",
    });
    let mut report = Report {
        benchmark: format!("rag-{mode_name}-generate"),
        setup,
        rustrag: serde_json::json!({ "seconds": best, "threads": rayon::current_num_threads() }),
        peer: None,
        ratios: Vec::new(),
    };
    if let Some(peer) = peer {
        let qfile = tempfile::NamedTempFile::new()?;
        std::fs::write(qfile.path(), serde_json::to_string(&questions)?)?;
        let args: Vec<String> = [
            "--model",
            &a.model.to_string_lossy(),
            "--kb",
            &a.kb.to_string_lossy(),
            "--questions",
            &qfile.path().to_string_lossy(),
            "--mode",
            mode_name,
            "--n-docs",
            &a.n_docs.to_string(),
            "--beams",
            &a.beams.to_string(),
            "--max-length",
            &a.max_length.to_string(),
            "--repeats",
            &a.repeats.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut v = peer.run("rag_hf.py", &args)?;
        let theirs: Option<Vec<Vec<u32>>> = v
            .get("output_ids")
            .and_then(|o| serde_json::from_value(o.clone()).ok());
        if let Some(o) = v.as_object_mut() {
            o.remove("output_ids");
            o.insert(
                "same_output_ids".into(),
                serde_json::json!(theirs.map(|t| t == out)),
            );
        }
        if let Some(h) = v.get("seconds").and_then(|s| s.as_f64()) {
            report
                .ratios
                .push(("hf_seconds / rustrag_seconds".into(), h / best));
        }
        report.peer = Some(v);
    }
    Ok(report)
}
