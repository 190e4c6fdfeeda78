//! The flags that open a [`Pipeline`] and set its answers, shared by `ask` and `eval qa`.

use anyhow::{bail, Result};
use rustrag::rag::pipeline::{
    AnswerOptions, Pipeline, PipelineConfig, RetrieverKind, SequenceDecoding, WeightsChoice,
};
use rustrag::rag::RagMode;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct PipelineArgs {
    /// HF RAG checkpoint directory (RagSequence/RagTokenForGeneration `save_pretrained` layout) or hub id.
    #[arg(long, conflicts_with = "generator")]
    pub model: Option<String>,
    /// Decoder-only generator (GGUF file, e.g. SmolLM2, or a directory written by `rustrag train
    /// rag`) used with a `rustrag index build` knowledge base.
    #[arg(long)]
    pub generator: Option<PathBuf>,
    /// Knowledge base: with --model, a directory with `passages.jsonl` and `embeddings.safetensors`;
    /// with --generator, a KB built by `rustrag index build`.
    #[arg(long)]
    pub kb: Option<PathBuf>,
    /// `token` (RAG-Token), `sequence` (RAG-Sequence) or `closed` (closed book: the question alone,
    /// nothing retrieved). Default: the checkpoint's head, else token.
    #[arg(long, value_parser = ["closed", "token", "sequence"])]
    pub mode: Option<String>,
    /// Documents per question (default: the checkpoint's n_docs, else 3).
    #[arg(long)]
    pub n_docs: Option<usize>,
    /// Beam size (1 = greedy).
    #[arg(long)]
    pub beams: Option<usize>,
    /// Sample the answer (RAG-Token, beams 1) at this temperature from the marginal next-token
    /// distribution; 0 (the default) is greedy decoding.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the most likely tokens up to this cumulative probability (used
    /// with --temperature > 0). Default 1.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Seed of the sampling: the same seed gives the same answer. Default: a fresh one.
    #[arg(long)]
    pub seed: Option<u64>,
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
    /// Questions decoded together (generator rows = questions × n_docs × beams).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// With --generator: rerank the retriever's candidates with a cross-encoder; the doc prior
    /// is then softmax(rerank score / --rerank-temperature).
    #[command(flatten)]
    pub rerank: super::retrieve::RerankArgs,
}

impl PipelineArgs {
    /// The pipeline settings these flags ask for (unset flags: [`PipelineConfig`]'s defaults).
    pub fn config(&self) -> Result<PipelineConfig> {
        if self.n_docs == Some(0) {
            bail!("--n-docs 0: RAG marginalises over the retrieved documents, it needs at least 1");
        }
        if self.batch_size == Some(0) {
            bail!("--batch-size must be at least 1");
        }
        let length = |l: Option<usize>, name: &str| -> Result<Option<usize>> {
            match l {
                Some(0) => bail!("--{name} counts the decoder start token: it must be at least 1"),
                l => Ok(l.map(|l| l - 1)),
            }
        };
        let defaults = PipelineConfig::default();
        Ok(PipelineConfig {
            retriever: self.retriever.parse::<RetrieverKind>()?,
            prior_temperature: self.prior_temperature,
            rerank: self.rerank.config()?,
            gguf_weights: match self.gguf_weights.as_str() {
                "quantized" => WeightsChoice::Quantized,
                _ => WeightsChoice::F32,
            },
            batch_size: self.batch_size.unwrap_or(defaults.batch_size),
            answer: AnswerOptions {
                n_docs: self.n_docs,
                mode: match self.mode.as_deref() {
                    None | Some("closed") => None,
                    Some(m) => Some(m.parse::<RagMode>()?),
                },
                closed_book: self.mode.as_deref() == Some("closed"),
                sequence_decoding: match self.decoding.as_str() {
                    "fast" => SequenceDecoding::Fast,
                    _ => SequenceDecoding::Thorough,
                },
                beams: self.beams,
                num_return_sequences: self.num_return_sequences,
                max_new_tokens: length(self.max_length, "max-length")?,
                min_new_tokens: length(self.min_length, "min-length")?,
                prior_temperature: None,
                provenance: true,
                temperature: self.temperature,
                top_p: self.top_p,
                seed: self.seed,
            },
            ..defaults
        })
    }

    /// Load the models and the knowledge base once.
    pub fn open(&self) -> Result<Pipeline> {
        let config = self.config()?;
        let Some(kb) = &self.kb else {
            bail!("pass --kb (the knowledge base to retrieve from)");
        };
        match (&self.generator, &self.model) {
            (Some(g), _) => Pipeline::open(kb, g, config),
            (None, Some(m)) => Pipeline::open_checkpoint(m, kb, config),
            (None, None) => bail!("pass --model (HF RAG checkpoint) or --generator (GGUF)"),
        }
    }
}
