//! `rustrag bench rag`: RAG-Token beam generate and RAG-Sequence thorough generate, rustrag vs HF
//! transformers (bench/peers/rag_hf.py, through HF's own RagRetriever over a faiss index) in the same
//! run, same checkpoint, KB, questions, settings and threads. Both sides time three phases —
//! question encoding, retrieval (search + context strings + tokenisation + doc scores), generation —
//! and report the fastest run end to end with its phases. Ratios are reported only when every
//! question's retrieved doc ids and generated ids are the same on both sides.
//! Real-size models: `bench/make_rag_bench_models.py`.

use super::{Peer, Report};
use anyhow::{bail, Context, Result};
use rustrag::rag::checkpoint::load_rag_with_kb;
use rustrag::rag::{GenerationSettings, InMemoryIndex, RagMode, RagModel};
use rustrag::retrieve::Retriever;
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
    #[arg(long, default_value_t = 5)]
    pub n_docs: usize,
    #[arg(long, default_value_t = 4)]
    pub beams: usize,
    #[arg(long, default_value_t = 32)]
    pub max_length: usize,
    /// Timed runs after one warm-up (the fastest end to end is reported), both sides.
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
}

const DEFAULT_QUESTIONS: &[&str] = &[
    "Which NFL team represented the AFC at Super Bowl 50?",
    "Where did Super Bowl 50 take place?",
    "Who is the commissioner of the NFL?",
    "How many NFL teams have gone 15-1 in one season?",
];

/// Seconds per phase of one run.
#[derive(Clone, Copy, Debug, serde::Serialize)]
struct Phases {
    question_encoding: f64,
    retrieval: f64,
    generation: f64,
    end_to_end: f64,
}

/// One run's timings, retrieved rows `[batch][n_docs]` and generated ids.
struct Run {
    phases: Phases,
    doc_ids: Vec<Vec<u64>>,
    output_ids: Vec<Vec<u32>>,
}

fn run_once(model: &RagModel, index: &InMemoryIndex, questions: &[&str], a: &Args) -> Result<Run> {
    let t0 = Instant::now();
    let (ids, mask) = model.tokenize_questions(questions)?;
    let q = model
        .question_encoder
        .as_ref()
        .context("this RAG checkpoint has no question encoder")?
        .encode_ids(&ids, &mask)?;
    let t1 = Instant::now();
    let r = model.retrieve_with_embeddings(index, &ids, &q, a.n_docs)?;
    let t2 = Instant::now();
    let p = model.generation_params(&GenerationSettings {
        num_beams: Some(a.beams),
        max_length: Some(a.max_length),
        ..Default::default()
    })?;
    let output_ids = match model.mode {
        RagMode::Token => model.generate_token(&r.context, &p)?,
        RagMode::Sequence => {
            model
                .generate_sequence(&r.context, &p, model.config.do_deduplication)?
                .0
        }
    };
    let t3 = Instant::now();
    let secs = |a: Instant, b: Instant| (b - a).as_secs_f64();
    Ok(Run {
        phases: Phases {
            question_encoding: secs(t0, t1),
            retrieval: secs(t1, t2),
            generation: secs(t2, t3),
            end_to_end: secs(t0, t3),
        },
        doc_ids: r.doc_ids,
        output_ids,
    })
}

/// Rows of `ours` equal to the same row of `theirs`, trailing `pad` ignored (HF pads the batch).
fn matching_rows<T: PartialEq + Copy>(ours: &[Vec<T>], theirs: &[Vec<T>], pad: Option<T>) -> usize {
    let trim = |r: &[T]| -> usize {
        let mut n = r.len();
        while n > 0 && pad.is_some_and(|p| r[n - 1] == p) {
            n -= 1;
        }
        n
    };
    ours.iter()
        .zip(theirs)
        .filter(|(o, t)| o[..trim(o)] == t[..trim(t)])
        .count()
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
    run_once(&model, &index, &refs, &a)?; // warm-up
    let mut best: Option<Run> = None;
    for _ in 0..a.repeats {
        let r = run_once(&model, &index, &refs, &a)?;
        if best
            .as_ref()
            .is_none_or(|b| r.phases.end_to_end < b.phases.end_to_end)
        {
            best = Some(r);
        }
    }
    let ours = best.context("no timed run")?;
    let mode_name = match model.mode {
        RagMode::Token => "token",
        RagMode::Sequence => "sequence",
    };
    let setup = serde_json::json!({
        "model": a.model, "kb": a.kb, "kb_passages": index.len(), "mode": mode_name,
        "questions": questions.len(), "n_docs": a.n_docs, "beams": a.beams, "max_length": a.max_length,
        "repeats": a.repeats, "threads": rayon::current_num_threads(),
        "timing": "per side, the fastest run end to end (after one warm-up) with its phases",
    });
    let mut report = Report {
        benchmark: format!("rag-{mode_name}-generate"),
        setup,
        rustrag: serde_json::json!({ "seconds": ours.phases, "threads": rayon::current_num_threads() }),
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
        let take =
            |v: &mut serde_json::Value, key: &str| v.as_object_mut().and_then(|o| o.remove(key));
        let their_ids: Vec<Vec<u32>> = serde_json::from_value(
            take(&mut v, "output_ids").context("HF peer returned no output_ids")?,
        )?;
        let their_docs: Vec<Vec<u64>> = serde_json::from_value(
            take(&mut v, "doc_ids").context("HF peer returned no doc_ids")?,
        )?;
        let n = ours.output_ids.len();
        let same_out = matching_rows(&ours.output_ids, &their_ids, Some(model.generator_pad()));
        let same_docs = matching_rows(&ours.doc_ids, &their_docs, None);
        let all_same = same_out == n
            && their_ids.len() == n
            && same_docs == ours.doc_ids.len()
            && their_docs.len() == ours.doc_ids.len();
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "same_output_ids".into(),
                serde_json::json!(format!("{same_out}/{n}")),
            );
            o.insert(
                "same_doc_ids".into(),
                serde_json::json!(format!("{same_docs}/{}", ours.doc_ids.len())),
            );
        }
        if all_same {
            let phase = |key: &str| v["seconds"][key].as_f64();
            for (key, ours_s) in [
                ("question_encoding", ours.phases.question_encoding),
                ("retrieval", ours.phases.retrieval),
                ("generation", ours.phases.generation),
                ("end_to_end", ours.phases.end_to_end),
            ] {
                if let Some(h) = phase(key) {
                    report
                        .ratios
                        .push((format!("{key} (hf_seconds / rustrag_seconds)"), h / ours_s));
                }
            }
        } else {
            tracing::warn!(
                "outputs differ (generated ids {same_out}/{n}, doc ids {same_docs}/{}): no ratio",
                ours.doc_ids.len()
            );
            // Both sides' ids, to see where they part.
            if let Some(o) = v.as_object_mut() {
                o.insert(
                    "differing_outputs".into(),
                    serde_json::json!({"rustrag": ours.output_ids, "hf": their_ids,
                        "rustrag_doc_ids": ours.doc_ids, "hf_doc_ids": their_docs}),
                );
            }
        }
        report.peer = Some(v);
    }
    Ok(report)
}
