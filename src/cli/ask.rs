//! `rustrag ask`: question(s) → answer(s) with doc priors p(z|x), sources and provenance. Parses
//! arguments into a [`PipelineConfig`], calls [`Pipeline`], prints.

use anyhow::{bail, Context, Result};
use rustrag::rag::pipeline::{
    AnswerOptions, Pipeline, PipelineConfig, QaResult, RetrieverKind, SequenceDecoding,
    WeightsChoice,
};
use rustrag::rag::RagMode;
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
    /// RAG-Token or RAG-Sequence decoding (default: the checkpoint's head, else token).
    #[arg(long, value_parser = ["token", "sequence"])]
    pub mode: Option<String>,
    /// Documents per question (default: the checkpoint's n_docs, else 3).
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
    /// With --generator: `dense` (the KB's encoder), `bm25`, or `hybrid` (dense + BM25 fused by
    /// reciprocal rank; the BM25 index is built next to the KB on first use).
    #[arg(long, default_value = "hybrid", value_parser = ["dense", "bm25", "hybrid"])]
    pub retriever: String,
    /// τ of the doc prior p(z|x) = softmax(score/τ) (default: the KB manifest's).
    #[arg(long)]
    pub prior_temperature: Option<f64>,
    /// With --generator: GGUF weights as stored (`quantized`, fastest) or dequantized to f32 (`f32`, the
    /// most faithful answers; small models like SmolLM2-135M flip near-tied tokens under 8-bit activations).
    #[arg(long, default_value = "f32", value_parser = ["f32", "quantized"])]
    pub gguf_weights: String,
    /// With --generator: rerank the retriever's candidates with a cross-encoder; the doc prior
    /// is then softmax(rerank score / --rerank-temperature).
    #[command(flatten)]
    pub rerank: super::retrieve::RerankArgs,
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
    Ok(qs)
}

fn config(args: &Args) -> Result<PipelineConfig> {
    if args.n_docs == Some(0) {
        bail!("--n-docs 0: RAG marginalises over the retrieved documents, it needs at least 1");
    }
    let length = |l: Option<usize>, name: &str| -> Result<Option<usize>> {
        match l {
            Some(0) => bail!("--{name} counts the decoder start token: it must be at least 1"),
            l => Ok(l.map(|l| l - 1)),
        }
    };
    Ok(PipelineConfig {
        retriever: args.retriever.parse::<RetrieverKind>()?,
        prior_temperature: args.prior_temperature,
        rerank: args.rerank.config()?,
        gguf_weights: match args.gguf_weights.as_str() {
            "quantized" => WeightsChoice::Quantized,
            _ => WeightsChoice::F32,
        },
        answer: AnswerOptions {
            n_docs: args.n_docs,
            mode: args
                .mode
                .as_deref()
                .map(str::parse::<RagMode>)
                .transpose()?,
            sequence_decoding: match args.decoding.as_str() {
                "fast" => SequenceDecoding::Fast,
                _ => SequenceDecoding::Thorough,
            },
            beams: args.beams,
            num_return_sequences: args.num_return_sequences,
            max_new_tokens: length(args.max_length, "max-length")?,
            min_new_tokens: length(args.min_length, "min-length")?,
            prior_temperature: None,
            provenance: true,
        },
        ..Default::default()
    })
}

pub fn run(args: Args, json: bool) -> Result<()> {
    let questions = read_questions(&args)?;
    let config = config(&args)?;
    let pipeline = match (&args.generator, &args.model) {
        (Some(g), _) => Pipeline::open(&args.kb, g, config)?,
        (None, Some(m)) => Pipeline::open_checkpoint(m, &args.kb, config)?,
        (None, None) => bail!("pass --model (HF RAG checkpoint) or --generator (GGUF)"),
    };
    let results = pipeline.answer(&questions)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        for r in &results {
            print_result(r, args.snippet_chars)?;
        }
    }
    Ok(())
}

/// Human-readable output.
fn print_result(r: &QaResult, snippet_chars: usize) -> Result<()> {
    outln!("Q: {}", super::printable(&r.question));
    for (k, a) in r.answers.iter().enumerate() {
        outln!("A{}: {}", k + 1, a.text);
        match r.mode {
            RagMode::Sequence => {
                if let Some(post) = a.doc_posteriors.first() {
                    let p: Vec<String> = post.iter().map(|x| format!("{x:.3}")).collect();
                    outln!("   p(z|x,y) over sources: [{}]", p.join(", "));
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
                        outln!("   {tok:?} <- source {j} (p={p:.3})");
                    }
                }
            }
        }
    }
    outln!("Sources (τ = {}):", r.prior_temperature);
    for s in &r.sources {
        let snippet: String = s.text.chars().take(snippet_chars).collect();
        outln!(
            "  [{}] p(z|x)={:.3} score={:.3} {} ({}): {}",
            s.rank,
            s.prior,
            s.score,
            s.title,
            s.passage_id,
            snippet
        );
    }
    for t in &r.truncated {
        outln!(
            "  note: source {} cut to {} of {} words ({} → {} prompt tokens) to fit the context window",
            t.row + 1,
            t.passage_words_kept,
            t.passage_words,
            t.prompt_tokens_before,
            t.prompt_tokens_after
        );
    }
    outln!();
    Ok(())
}
