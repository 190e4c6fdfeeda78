//! `rustrag ask`: question(s) → answer(s) with doc priors p(z|x), sources and provenance.
//!
//! Backends: an HF RAG checkpoint directory (`--model`) with a knowledge base given as
//! `passages.jsonl` + `embeddings.safetensors` (`--kb DIR`). Every backend produces [`AskResult`]s, so
//! another one (a real KB + sentence encoder + decoder-only LM) only has to fill the same struct.

use crate::rag::checkpoint::{load_rag, LoadOptions};
use crate::rag::{GenerationSettings, InMemoryIndex, RagMode, RagModel};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Questions to answer (or use --questions-file).
    pub questions: Vec<String>,
    /// A file with one question per line.
    #[arg(long)]
    pub questions_file: Option<PathBuf>,
    /// HF RAG checkpoint directory (RagSequence/RagTokenForGeneration `save_pretrained` layout) or hub id.
    #[arg(long)]
    pub model: String,
    /// Knowledge-base directory with `passages.jsonl` and `embeddings.safetensors`.
    #[arg(long)]
    pub kb: PathBuf,
    /// RAG-Token or RAG-Sequence decoding (default: the checkpoint's head).
    #[arg(long, value_parser = ["token", "sequence"])]
    pub mode: Option<String>,
    /// Documents per question (default: the checkpoint's n_docs).
    #[arg(long)]
    pub n_docs: Option<usize>,
    /// Beam size (1 = greedy).
    #[arg(long)]
    pub beams: Option<usize>,
    /// Answers per question (≤ beams).
    #[arg(long)]
    pub num_return_sequences: Option<usize>,
    /// Maximum answer length in tokens, counting the decoder start token.
    #[arg(long)]
    pub max_length: Option<usize>,
    #[arg(long)]
    pub min_length: Option<usize>,
    /// RAG-Sequence decoding: `thorough` (HF: rescore every candidate under every document) or `fast`
    /// (the paper's approximation without extra forward passes).
    #[arg(long, default_value = "thorough", value_parser = ["thorough", "fast"])]
    pub decoding: String,
    /// Characters of passage text shown per source.
    #[arg(long, default_value_t = 160)]
    pub snippet_chars: usize,
}

/// One retrieved passage as shown to the user.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Source {
    pub rank: usize,
    /// Knowledge-base row.
    pub doc_id: u64,
    pub passage_id: String,
    pub title: String,
    pub snippet: String,
    /// Retrieval score q·d.
    pub score: f32,
    /// p(z | x) = softmax over the retrieved docs' scores.
    pub prior: f32,
}

/// One answer with its provenance.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AskAnswer {
    pub text: String,
    pub ids: Vec<u32>,
    /// RAG-Sequence: `[[p(z|x,y) per doc]]`; RAG-Token: one row per generated token, p(z|x,y_i).
    pub doc_posteriors: Vec<Vec<f32>>,
    /// Decoded token per row of `doc_posteriors` (RAG-Token).
    pub tokens: Vec<String>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct AskResult {
    pub question: String,
    pub mode: RagMode,
    pub sources: Vec<Source>,
    pub answers: Vec<AskAnswer>,
}

fn read_questions(args: &Args) -> Result<Vec<String>> {
    let mut qs = args.questions.clone();
    if let Some(f) = &args.questions_file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        qs.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    if qs.is_empty() {
        bail!("no question given (pass questions as arguments or --questions-file)");
    }
    if let Some(i) = qs.iter().position(|q| q.trim().is_empty()) {
        bail!("question {} is empty", i + 1);
    }
    Ok(qs)
}

/// Answer questions with an HF RAG checkpoint and an in-memory dense KB.
pub fn ask_hf_rag(
    model: &RagModel,
    index: &InMemoryIndex,
    questions: &[String],
    args: &Args,
) -> Result<Vec<AskResult>> {
    let n_docs = args.n_docs.unwrap_or(model.config.n_docs);
    let refs: Vec<&str> = questions.iter().map(|s| s.as_str()).collect();
    let retrieved = model.retrieve(index, &refs, n_docs)?;
    let overrides = GenerationSettings {
        num_beams: args.beams,
        num_return_sequences: args.num_return_sequences,
        max_length: args.max_length,
        min_length: args.min_length,
        ..Default::default()
    };
    let p = model.generation_params(&overrides)?;
    let ctx = &retrieved.context;
    let ids = match model.mode {
        RagMode::Token => model.generate_token(ctx, &p)?,
        RagMode::Sequence if args.decoding == "fast" => model.generate_sequence_fast(ctx, &p)?.0,
        RagMode::Sequence => {
            model
                .generate_sequence(ctx, &p, model.config.do_deduplication)?
                .0
        }
    };
    let priors = crate::nn::softmax_last_dim(&ctx.doc_scores.detach())?.to_vec2::<f32>()?;
    let scores = ctx.doc_scores.detach().to_vec2::<f32>()?;
    let per_q = ids.len() / questions.len().max(1);
    let mut out = Vec::new();
    for (i, q) in questions.iter().enumerate() {
        let sources = retrieved.passages[i]
            .iter()
            .enumerate()
            .map(|(j, p)| Source {
                rank: j + 1,
                doc_id: retrieved.doc_ids[i][j],
                passage_id: p.id.clone(),
                title: p.title.clone(),
                snippet: p.text.chars().take(args.snippet_chars).collect(),
                score: scores[i][j],
                prior: priors[i][j],
            })
            .collect();
        let mut answers = Vec::new();
        for a in &ids[i * per_q..(i + 1) * per_q] {
            let text = model
                .generator_tokenizer
                .decode(a, true)?
                .trim()
                .to_string();
            let doc_posteriors = model.doc_posteriors(ctx, i, a)?;
            let tokens = match model.mode {
                RagMode::Token => a[1..=doc_posteriors.len().min(a.len() - 1)]
                    .iter()
                    .map(|&t| model.generator_tokenizer.decode(&[t], false))
                    .collect::<Result<Vec<_>>>()?,
                RagMode::Sequence => Vec::new(),
            };
            answers.push(AskAnswer {
                text,
                ids: a.clone(),
                doc_posteriors,
                tokens,
            });
        }
        out.push(AskResult {
            question: q.clone(),
            mode: model.mode,
            sources,
            answers,
        });
    }
    Ok(out)
}

pub fn run(args: Args, json: bool) -> Result<()> {
    let questions = read_questions(&args)?;
    let mode = args
        .mode
        .as_deref()
        .map(str::parse::<RagMode>)
        .transpose()?;
    let mut model = load_rag(
        &args.model,
        &LoadOptions {
            mode,
            ..Default::default()
        },
    )?;
    if let Some(m) = mode {
        model.mode = m;
    }
    let index = InMemoryIndex::load(
        &args.kb.join("passages.jsonl"),
        &args.kb.join("embeddings.safetensors"),
    )?;
    let results = ask_hf_rag(&model, &index, &questions, &args)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        for r in &results {
            print_result(r);
        }
    }
    Ok(())
}

/// Human-readable output.
pub fn print_result(r: &AskResult) {
    println!("Q: {}", r.question);
    for (k, a) in r.answers.iter().enumerate() {
        println!("A{}: {}", k + 1, a.text);
        match r.mode {
            RagMode::Sequence => {
                if let Some(post) = a.doc_posteriors.first() {
                    let p: Vec<String> = post.iter().map(|x| format!("{x:.3}")).collect();
                    println!("   p(z|x,y) over sources: [{}]", p.join(", "));
                }
            }
            RagMode::Token => {
                for (tok, post) in a.tokens.iter().zip(&a.doc_posteriors) {
                    let best = post
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .map(|(j, p)| (j + 1, *p));
                    if let Some((j, p)) = best {
                        println!("   {tok:?} <- source {j} (p={p:.3})");
                    }
                }
            }
        }
    }
    println!("Sources:");
    for s in &r.sources {
        println!(
            "  [{}] p(z|x)={:.3} score={:.3} {} ({}): {}",
            s.rank, s.prior, s.score, s.title, s.passage_id, s.snippet
        );
    }
    println!();
}
