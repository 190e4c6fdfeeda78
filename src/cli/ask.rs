//! `rustrag ask`: question(s) → answer(s) with doc priors p(z|x), sources and provenance.
//!
//! Backends (each fills the same [`AskResult`]s):
//! - an HF RAG checkpoint directory (`--model`) with a knowledge base given as `passages.jsonl` +
//!   `embeddings.safetensors` (`--kb DIR`);
//! - a real knowledge base built by `rustrag index build` (`--kb DIR`, its question encoder from the KB
//!   manifest, e.g. MiniLM) with a decoder-only GGUF generator (`--generator FILE.gguf`, e.g. SmolLM2):
//!   one prompt and KV cache per document, greedy RAG-Token / RAG-Sequence decoding.

use crate::rag::checkpoint::load_rag_with_kb;
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
    #[arg(
        long,
        conflicts_with = "generator",
        required_unless_present = "generator"
    )]
    pub model: Option<String>,
    /// Decoder-only generator (GGUF file, e.g. SmolLM2) used with a `rustrag index build` knowledge base.
    #[arg(long)]
    pub generator: Option<PathBuf>,
    /// Knowledge base: with --model, a directory with `passages.jsonl` and `embeddings.safetensors`;
    /// with --generator, a KB built by `rustrag index build`.
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
    /// With --generator: `dense` (the KB's encoder, exact search) or `hybrid` (dense + BM25 fused by
    /// reciprocal rank; the BM25 index is built next to the KB on first use).
    #[arg(long, default_value = "hybrid", value_parser = ["dense", "hybrid"])]
    pub retriever: String,
    /// With --generator: GGUF weights as stored (`quantized`, fastest) or dequantized to f32 (`f32`, the
    /// most faithful answers; small models like SmolLM2-135M flip near-tied tokens under 8-bit activations).
    #[arg(long, default_value = "f32", value_parser = ["f32", "quantized"])]
    pub gguf_weights: String,
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

/// Answer questions with a `rustrag index build` KB (dense, exact search, the manifest's encoder) and a
/// decoder-only GGUF generator. Greedy decoding: RAG-Token on the marginal, or RAG-Sequence (greedy
/// per document, every candidate rescored under all documents).
pub fn ask_decoder_only(
    generator: &std::path::Path,
    questions: &[String],
    args: &Args,
) -> Result<Vec<AskResult>> {
    use crate::generators::Decoder;
    use crate::retrieve::Retriever;
    let kb = std::sync::Arc::new(crate::kb::KnowledgeBase::open(&args.kb)?);
    let spec = kb.manifest().encoder.source.clone();
    let encoder: std::sync::Arc<dyn crate::encoders::TextEncoder> =
        std::sync::Arc::from(super::index::load_encoder(&spec, 32, None, false)?);
    let dense =
        crate::retrieve::dense::DenseRetriever::new(kb.clone(), Some(encoder.clone()), None)?;
    let retriever: Box<dyn Retriever> = match args.retriever.as_str() {
        "dense" => Box::new(dense),
        _ => {
            let bm25 = open_or_build_kb_bm25(&kb)?;
            Box::new(crate::retrieve::hybrid::HybridRetriever::new(
                Box::new(dense),
                Box::new(bm25),
                crate::retrieve::hybrid::Fusion::Rrf { k: 60.0 },
                100,
            )?)
        }
    };
    let g = crate::generators::gguf::GgufFile::open(generator)?;
    let weights = match args.gguf_weights.as_str() {
        "quantized" => crate::generators::llama::GgufWeights::default(),
        _ => crate::generators::llama::GgufWeights::F32,
    };
    let llama =
        crate::generators::llama::Llama::from_gguf_with(&g, &crate::default_device(), weights)?;
    let tok = crate::generators::gguf::tokenizer_from_gguf(&g, llama.special_ids().vocab_size)?;
    // Chat-tuned models answer inside their chat format; a model without a template gets the plain
    // "{title} / {text} // {question}" prompt.
    let chat = crate::generators::gguf::ChatTemplate::from_gguf(&g).ok();
    let rag = crate::rag::decoder_only::DecoderOnlyRag::new(&llama, &tok);
    let mode = match args.mode.as_deref() {
        Some(m) => m.parse::<RagMode>()?,
        None => RagMode::Token,
    };
    let n_docs = args.n_docs.unwrap_or(3);
    let max_new = args.max_length.unwrap_or(32);
    let mut out = Vec::new();
    for q in questions {
        let hits = retriever.retrieve(&[q.as_str()], None, n_docs)?.remove(0);
        // The doc prior p(z|x) is softmax(q · d) as in RAG, whichever retriever chose the documents
        // (fused hybrid scores are ranks, not logits).
        let q_emb = encoder
            .encode_texts(&[q.as_str()])?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut row = Vec::new();
        let inner: Vec<f32> = hits
            .doc_ids
            .iter()
            .map(|&r| {
                kb.embeddings()
                    .rows_f32_into(r as usize, r as usize + 1, &mut row);
                row.iter().zip(&q_emb).map(|(a, b)| a * b).sum()
            })
            .collect();
        let m = inner.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = inner.iter().map(|s| (s - m).exp()).sum();
        let priors: Vec<f32> = inner.iter().map(|s| (s - m).exp() / z).collect();
        let doc_lp: Vec<f32> = priors.iter().map(|p| p.ln()).collect();
        let passages: Vec<(&str, &str)> = hits
            .passages
            .iter()
            .map(|p| (p.title.as_str(), p.text.as_str()))
            .collect();
        let prompts = match &chat {
            Some(t) => rag.chat_prompt_ids(&passages, q, t)?,
            None => rag.prompt_ids(&passages, q)?,
        };
        let sources = hits
            .passages
            .iter()
            .enumerate()
            .map(|(j, p)| Source {
                rank: j + 1,
                doc_id: hits.doc_ids[j],
                passage_id: p.id.clone(),
                title: p.title.clone(),
                snippet: p.text.chars().take(args.snippet_chars).collect(),
                score: hits.scores[j],
                prior: priors[j],
            })
            .collect();
        let answers = match mode {
            RagMode::Token => {
                let gen = rag.generate_token_greedy(&prompts, &doc_lp, max_new, true)?;
                let tokens = gen
                    .ids
                    .iter()
                    .map(|&t| tok.decode(&[t], false))
                    .collect::<Result<Vec<_>>>()?;
                vec![AskAnswer {
                    text: tok.decode(&gen.ids, true)?.trim().to_string(),
                    ids: gen.ids,
                    doc_posteriors: gen.provenance,
                    tokens,
                }]
            }
            RagMode::Sequence => rag
                .generate_sequence_greedy(&prompts, &doc_lp, max_new)?
                .into_iter()
                .take(args.num_return_sequences.unwrap_or(1))
                .map(|c| {
                    Ok(AskAnswer {
                        text: tok.decode(&c.ids, true)?.trim().to_string(),
                        ids: c.ids,
                        doc_posteriors: vec![c.doc_posterior],
                        tokens: Vec::new(),
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        };
        out.push(AskResult {
            question: q.clone(),
            mode,
            sources,
            answers,
        });
    }
    Ok(out)
}

/// The BM25 index kept in `<kb>/bm25` (Anserini defaults), rebuilt when the KB's passages changed.
fn open_or_build_kb_bm25(
    kb: &crate::kb::KnowledgeBase,
) -> Result<crate::retrieve::bm25::Bm25Retriever> {
    use crate::retrieve::bm25::{build_index, Bm25Config, Bm25Params, Bm25Retriever};
    let dir = kb.root().join("bm25");
    let config = Bm25Config {
        source: Some(kb.dir().display().to_string()),
        ..Default::default()
    };
    if let Ok(r) = Bm25Retriever::open(&dir, Bm25Params::default()) {
        if r.manifest().config == config && r.manifest().num_passages as usize == kb.len() {
            return Ok(r);
        }
    }
    tracing::info!("building the BM25 index in {}", dir.display());
    build_index(&dir, &kb.passages().all()?, &config)?;
    Bm25Retriever::open(&dir, Bm25Params::default())
}

pub fn run(args: Args, json: bool) -> Result<()> {
    let questions = read_questions(&args)?;
    if let Some(g) = &args.generator {
        let results = ask_decoder_only(g, &questions, &args)?;
        return print_results(&results, json);
    }
    let model_dir = args
        .model
        .as_deref()
        .context("pass --model (HF RAG checkpoint) or --generator (GGUF)")?;
    let mode = args
        .mode
        .as_deref()
        .map(str::parse::<RagMode>)
        .transpose()?;
    let (model, index) = load_rag_with_kb(model_dir, &args.kb, mode)?;
    let results = ask_hf_rag(&model, &index, &questions, &args)?;
    print_results(&results, json)
}

fn print_results(results: &[AskResult], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        for r in results {
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
