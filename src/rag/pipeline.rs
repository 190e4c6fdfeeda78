//! The question-answering pipeline every front end calls (`ask`, and the server, `eval qa` and
//! `train` to come): questions → retrieve → doc prior p(z|x) = softmax(s(q,d)/τ) → generate with
//! the one RAG head → answers with sources, priors and per-token provenance.
//!
//! Two ways to open one:
//! - [`Pipeline::open`]: a knowledge base built by `rustrag index build` (its query encoder from the
//!   manifest; dense, BM25 or hybrid retrieval) with a decoder-only GGUF generator (SmolLM2, Llama);
//! - [`Pipeline::open_checkpoint`]: an HF RAG checkpoint (DPR question encoder + BART/T5) with its
//!   in-memory knowledge base (`passages.jsonl` + `embeddings.safetensors`).

use crate::encoders::{LoadOptions, TextEncoder};
use crate::generators::gguf::{tokenizer_from_gguf, ChatMessage, ChatTemplate, GgufFile};
use crate::generators::llama::{GgufWeights, Llama, LoraAdapter, LoraConfig};
use crate::generators::{Decoder, Generator};
use crate::kb::KnowledgeBase;
use crate::rag::config::{GenerationSettings, RagConfig, RagMode};
use crate::rag::context::{InputFormat, PromptFormat, Truncation};
use crate::rag::model::{RagContext, RagModel, TokenStep};
use crate::rag::{loss, search, InMemoryIndex};
use crate::retrieve::bm25::{build_index, Bm25Config, Bm25Params, Bm25Retriever};
use crate::retrieve::dense::DenseRetriever;
use crate::retrieve::hybrid::{Fusion, HybridRetriever};
use crate::retrieve::rerank::{RerankConfig, RerankingRetriever};
use crate::retrieve::{Passage, Retriever};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// Which retriever chooses the documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetrieverKind {
    /// The KB's encoder, exact inner-product search (HNSW when the KB has a graph).
    Dense,
    /// BM25 over the passages (index kept in `<kb>/bm25`, built on first use).
    Bm25,
    /// Dense + BM25 fused by reciprocal rank.
    Hybrid,
}

impl std::str::FromStr for RetrieverKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "dense" => Ok(Self::Dense),
            "bm25" => Ok(Self::Bm25),
            "hybrid" => Ok(Self::Hybrid),
            other => bail!("unknown retriever `{other}` (expected dense, bm25 or hybrid)"),
        }
    }
}

/// RAG-Sequence decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SequenceDecoding {
    /// HF's: beam search per document, every candidate rescored under every document.
    Thorough,
    /// The paper's approximation (§2.4): no extra forward passes.
    Fast,
}

/// GGUF weights as stored or dequantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightsChoice {
    /// Dequantized to f32: the most faithful answers (small models like SmolLM2-135M flip
    /// near-tied tokens under 8-bit activations).
    F32,
    /// As stored (quantized kernels): fastest.
    Quantized,
}

/// Per-request answer settings (what a server request may change).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnswerOptions {
    /// Documents per question. Default: the checkpoint's `n_docs`, else 3.
    pub n_docs: Option<usize>,
    /// RAG-Token or RAG-Sequence. Default: the checkpoint's head, else RAG-Token.
    pub mode: Option<RagMode>,
    /// RAG-Sequence decoding. Default thorough.
    pub sequence_decoding: SequenceDecoding,
    /// Beam size (1 = greedy). Default: the checkpoint's, else 1. 0 is an error.
    pub beams: Option<usize>,
    /// Answers per question (≤ beams). Default 1.
    pub num_return_sequences: Option<usize>,
    /// Generated tokens at most (not counting the start token). Default: the checkpoint's
    /// `max_length - 1`, else 32.
    pub max_new_tokens: Option<usize>,
    /// Minimum generated tokens before EOS. Default 0.
    pub min_new_tokens: Option<usize>,
    /// τ of the doc prior for this call. Default: the pipeline's.
    pub prior_temperature: Option<f64>,
    /// Compute per-token / per-answer document posteriors (one more teacher-forced pass over
    /// each answer). Default true.
    pub provenance: bool,
    /// Closed book: the generator answers from the question alone, nothing retrieved (the
    /// baseline RAG is measured against). Default false.
    pub closed_book: bool,
    /// Sampling temperature (RAG-Token, beams 1): the next token is drawn from the marginal
    /// p(y_i | x, y<i) with its log-probabilities divided by it ([`search::Sampling`]). None or 0:
    /// greedy, the default. Must be finite and non-negative.
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the most likely tokens up to this cumulative probability, in
    /// [0, 1]. Default 1 (all). No effect on greedy decoding (its argmax is in every nucleus).
    pub top_p: Option<f64>,
    /// Seed of the sampling stream: the same seed, question and settings give the same answer.
    /// Default: a fresh seed per question. Only used when sampling.
    pub seed: Option<u64>,
}

impl Default for AnswerOptions {
    fn default() -> Self {
        Self {
            n_docs: None,
            mode: None,
            sequence_decoding: SequenceDecoding::Thorough,
            beams: None,
            num_return_sequences: None,
            max_new_tokens: None,
            min_new_tokens: None,
            prior_temperature: None,
            provenance: true,
            closed_book: false,
            temperature: None,
            top_p: None,
            seed: None,
        }
    }
}

impl AnswerOptions {
    /// The sampling these options ask for (None: greedy), or why they are not valid; the error
    /// starts with the field's name.
    pub fn sampling(&self) -> Result<Option<search::Sampling>> {
        let t = self.temperature.unwrap_or(0.0);
        if !(t.is_finite() && t >= 0.0) {
            bail!("temperature must be finite and at least 0 (0: greedy), got {t}");
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&top_p) {
            bail!("top_p must be between 0 and 1, got {top_p}");
        }
        if t == 0.0 {
            // Greedy is sampling's T → 0 limit, and the argmax is inside every nucleus: top_p
            // changes nothing here.
            return Ok(None);
        }
        let s = search::Sampling {
            temperature: t,
            top_p,
            seed: self.seed,
        };
        s.validate()?;
        Ok(Some(s))
    }
}

/// Pipeline settings, with documented defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// Which retriever chooses the documents (KB pipelines). Default hybrid.
    pub retriever: RetrieverKind,
    /// k of reciprocal-rank fusion, score = Σ 1/(k + rank) (Cormack et al. 2009). Default 60.
    pub rrf_k: f32,
    /// Candidates each retriever returns before fusion. Default 100.
    pub candidates: usize,
    /// τ of the doc prior p(z|x) = softmax(s(q,d)/τ). Default: with `rerank`, its
    /// `temperature`; else the KB manifest's (0.05 for cosine sentence-transformers encoders, 1
    /// for DPR); 1 for HF checkpoints.
    pub prior_temperature: Option<f64>,
    /// Rerank the retriever's `rerank.candidates` passages with a cross-encoder and keep
    /// `n_docs` (KB pipelines, inference). The doc prior is then softmax(rerank_score /
    /// τ_rerank): the cross-encoder's logit is the calibrated score `s(q, d)`. Default none.
    pub rerank: Option<RerankConfig>,
    /// GGUF weights. Default f32.
    pub gguf_weights: WeightsChoice,
    /// Query encoder batch size. Default 32.
    pub encoder_batch_size: usize,
    /// Questions decoded together (rows = questions × n_docs × beams). Default 4.
    pub batch_size: usize,
    /// Longest question accepted, in characters. Default 4,096: far above any real question,
    /// low enough that tokenizing, BM25 and encoding one stay cheap (a question that does not
    /// fit the generator's context window with its template is refused when prompts are built).
    pub max_question_chars: usize,
    /// Most generator rows decoded at once: questions per batch × n_docs × beams. Default 256.
    /// It bounds the KV caches and prompt tensors (SmolLM2-135M: about 45 KB per row and token,
    /// so 256 rows of 1,000 tokens are about 12 GB): a call's questions are decoded in smaller
    /// batches to stay under it, and a single question over it is refused before anything is
    /// allocated.
    pub max_decode_rows: usize,
    /// Default answer settings of every question.
    pub answer: AnswerOptions,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            retriever: RetrieverKind::Hybrid,
            rrf_k: 60.0,
            candidates: 100,
            prior_temperature: None,
            rerank: None,
            gguf_weights: WeightsChoice::F32,
            encoder_batch_size: 32,
            batch_size: 4,
            max_question_chars: 4096,
            max_decode_rows: 256,
            answer: AnswerOptions::default(),
        }
    }
}

/// What [`Pipeline::answer_streamed`] tells as it goes.
#[derive(Clone, Copy, Debug)]
pub enum AnswerEvent<'a> {
    /// A question's documents, retrieved, before its answer is generated.
    Sources {
        /// Index of the question in the call.
        question: usize,
        sources: &'a [Source],
    },
    /// One generated token (RAG-Token, greedy or sampled), the end-of-sequence token included.
    Token {
        question: usize,
        /// Position among the question's generated tokens (0 = first).
        position: usize,
        id: u32,
        /// The token decoded alone (as [`GeneratedAnswer::tokens`] holds it).
        text: &'a str,
        /// p(z | x, y_i, y<i) over the question's documents, `[n_docs]`.
        doc_posterior: &'a [f32],
    },
}

/// Receives each [`AnswerEvent`]; an error stops the call.
pub type AnswerObserver<'a> = dyn FnMut(AnswerEvent<'_>) -> Result<()> + 'a;

/// One retrieved passage of an answer.
#[derive(Clone, Debug, Serialize)]
pub struct Source {
    pub rank: usize,
    /// Knowledge-base row.
    pub doc_id: u64,
    pub passage_id: String,
    pub title: String,
    pub text: String,
    /// The ranking score of the retriever that chose it (hybrid: the fused RRF score).
    pub retrieval_score: f32,
    /// s(q, d): the score the prior is computed from (the dense inner product; with reranking,
    /// the cross-encoder's logit).
    pub score: f32,
    /// p(z | x) = softmax over the retrieved documents of score / τ.
    pub prior: f32,
}

/// One generated answer with its provenance.
#[derive(Clone, Debug, Serialize)]
pub struct GeneratedAnswer {
    pub text: String,
    /// Generated ids, starting with the decoder start token.
    pub ids: Vec<u32>,
    /// RAG-Token: one row per generated token, p(z | x, y_i, y<i); RAG-Sequence: one row,
    /// p(z | x, y). `[rows][n_docs]`.
    pub doc_posteriors: Vec<Vec<f32>>,
    /// The generated tokens as text, one per row of `doc_posteriors` (RAG-Token).
    pub tokens: Vec<String>,
}

/// The answers to one question.
#[derive(Clone, Debug, Serialize)]
pub struct QaResult {
    pub question: String,
    pub mode: RagMode,
    /// Answered from the question alone ([`AnswerOptions::closed_book`]): no sources.
    pub closed_book: bool,
    pub prior_temperature: f64,
    pub sources: Vec<Source>,
    pub answers: Vec<GeneratedAnswer>,
    /// Prompts whose passage was cut to fit the context window (`row` = document index here).
    pub truncated: Vec<Truncation>,
}

/// The file of [`RetrievalSettings`] in a trained generator's directory.
pub const RETRIEVAL_SETTINGS_FILE: &str = "rag_retrieval.json";

/// `rag_retrieval.json` in a generator directory written by `rustrag train rag` over a knowledge
/// base: how [`Pipeline::open`] retrieves for this generator.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RetrievalSettings {
    /// τ of the doc prior at the checkpoint (trained or the run's).
    pub prior_temperature: f64,
    /// The trained question encoder, relative to the checkpoint (None: the KB's encoder).
    pub question_encoder: Option<String>,
    /// End to end: the trained context encoder the knowledge base must be re-embedded with,
    /// relative to the checkpoint.
    #[serde(default)]
    pub context_encoder: Option<String>,
    /// sha256 of the encoder that embedded the knowledge base the question encoder was trained
    /// against.
    pub kb_encoder_sha256: Option<String>,
    /// End to end: the context encoder trained too, so the KB must be re-embedded with
    /// `context_encoder` (`rustrag index reembed`) before the question encoder matches it.
    pub passages_reembedded: bool,
}

impl RetrievalSettings {
    /// The settings in generator directory `dir`, if it has them.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(RETRIEVAL_SETTINGS_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let s =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(Some(s))
    }
}

/// Where the documents come from.
enum Retrieval {
    /// An HF checkpoint's DPR question encoder over an in-memory index.
    Checkpoint(InMemoryIndex),
    /// A `rustrag index build` KB.
    Kb {
        kb: Arc<KnowledgeBase>,
        encoder: Arc<dyn TextEncoder>,
        retriever: Box<dyn Retriever>,
        /// Passage embeddings that replaced the KB's for dense search and doc scores
        /// ([`Pipeline::swap_dense_index`]: re-embedded while a context encoder trains).
        swapped: Option<Arc<InMemoryIndex>>,
    },
}

/// Retrieve → doc prior → generate. Models are loaded once; [`Pipeline::answer`] may be called
/// any number of times.
pub struct Pipeline {
    /// Shared by the pipelines [`Pipeline::reopen_kb`] makes (a server swapping knowledge bases
    /// keeps one copy of the generator).
    pub rag: Arc<RagModel>,
    pub config: PipelineConfig,
    retrieval: Retrieval,
    /// τ in use.
    prior_temperature: f64,
    /// Decoder-only: the generator's context window in tokens.
    context_window: Option<usize>,
}

/// The query encoder a KB was embedded with (the manifest's `encoder.source` and prefixes).
pub fn load_kb_encoder(kb: &KnowledgeBase, batch_size: usize) -> Result<Arc<dyn TextEncoder>> {
    let spec = &kb.manifest().encoder.source;
    let opts = LoadOptions {
        batch_size,
        prefixes: Some(kb.manifest().encoder.prefixes.clone()),
        ..Default::default()
    };
    let encoder = crate::encoders::load_encoder(spec, &opts)
        .with_context(|| format!("loading the query encoder {spec} of {}", kb.dir().display()))?;
    Ok(Arc::from(encoder))
}

/// The question encoder `dir/relative` trained by `rustrag train rag`, checked against `kb`: trained
/// with fixed documents, `kb` must be the one it was trained against; end to end, `kb` must have
/// been re-embedded with the trained context encoder.
fn trained_question_encoder(
    kb: &KnowledgeBase,
    dir: &Path,
    relative: &str,
    settings: &RetrievalSettings,
    config: &PipelineConfig,
) -> Result<Arc<dyn TextEncoder>> {
    let path = dir.join(relative);
    let opts = LoadOptions {
        batch_size: config.encoder_batch_size,
        ..Default::default()
    };
    let encoder = crate::encoders::load_encoder(&path.to_string_lossy(), &opts)
        .with_context(|| format!("loading the trained question encoder {}", path.display()))?;
    let kb_sha = &kb.manifest().encoder.weights_sha256;
    let settings_path = dir.join(RETRIEVAL_SETTINGS_FILE);
    if settings.passages_reembedded {
        let ctx = settings.context_encoder.as_deref().unwrap_or(relative);
        kb.check_query_encoder(&encoder.fingerprint()).with_context(|| {
            format!(
                "{} was trained end to end (its context encoder changed): re-embed the knowledge base with it first, `rustrag index reembed --kb {} --encoder {}`",
                settings_path.display(),
                kb.root().display(),
                dir.join(ctx).display()
            )
        })?;
    } else if settings.kb_encoder_sha256.as_deref() != Some(kb_sha.as_str()) {
        bail!(
            "{}: the question encoder was trained against a knowledge base embedded by encoder sha256 {}, {} was embedded by {} (sha256 {kb_sha})",
            settings_path.display(),
            settings.kb_encoder_sha256.as_deref().unwrap_or("?"),
            kb.root().display(),
            kb.manifest().encoder.source
        );
    } else if encoder.dim() != kb.embeddings().dim() {
        bail!(
            "{}: the question encoder has dim {}, the knowledge base {}",
            path.display(),
            encoder.dim(),
            kb.embeddings().dim()
        );
    }
    Ok(Arc::from(encoder))
}

/// The BM25 index kept in `<kb>/bm25` (Anserini defaults), built when missing or when the KB's
/// passages changed since it was built.
pub fn open_or_build_kb_bm25(kb: &KnowledgeBase) -> Result<Bm25Retriever> {
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

/// A RAG head over a decoder-only generator: prompts through `chat_template` when given (else
/// `[bos] + "{title} / {text} // {question}"`), `context_window` tokens of prompt + answer.
/// Fails when the tokenizer's vocabulary is larger than the generator's.
pub fn decoder_only_rag(
    generator: Box<dyn crate::generators::CausalLm>,
    tokenizer: crate::tokenize::TextTokenizer,
    chat_template: Option<ChatTemplate>,
    context_window: usize,
    source: &Path,
) -> Result<RagModel> {
    let s = generator.special_ids().clone();
    tokenizer.check_vocab(s.vocab_size, source)?;
    // No HF RAG config for these: defaults, with the generator named for the record.
    let config = RagConfig::from_value(serde_json::json!({
        "question_encoder": {"model_type": "external"},
        "generator": {"model_type": "llama"},
        "n_docs": 3,
    }))?;
    let generation = GenerationSettings {
        decoder_start_token_id: Some(s.decoder_start),
        bos_token_id: s.bos,
        eos_token_id: Some(s.eos),
        ..Default::default()
    };
    let format = InputFormat::Prompt(PromptFormat {
        chat_template,
        bos: s.bos,
        pad: s.pad,
        max_prompt_tokens: context_window,
    });
    let mut rag = RagModel {
        config,
        mode: RagMode::Token,
        question_encoder: None,
        question_tokenizer: None,
        device: generator.device(),
        generator: Generator::DecoderOnly(generator),
        generator_tokenizer: tokenizer,
        generation,
        format,
        prior_temperature: 1.0,
        source: Some(source.to_path_buf()),
    };
    rag.generation.pad_token_id = Some(rag.generator_pad());
    Ok(rag)
}

/// What of a decoder-only generator trains once opened.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum DecoderTraining {
    /// Nothing (inference; LoRA adapters are merged into the weights).
    #[default]
    Frozen,
    /// The top n blocks and the final norm ([`Llama::make_trainable`]).
    TopLayers(usize),
    /// LoRA adapters on the frozen model ([`Llama::add_lora`]); an adapter directory continues
    /// with its own adapters and settings.
    Lora(LoraConfig),
}

/// A Llama, its tokenizer, chat template and context window.
type LoadedLlama = (
    Llama,
    crate::tokenize::TextTokenizer,
    Option<ChatTemplate>,
    usize,
);

/// [`LoadedLlama`] from a GGUF file or a HF directory; `f32` dequantizes a GGUF. A chat template
/// that does not compile, or fails on the one-user-turn prompt every RAG prompt is, is an error
/// naming the file and key (here, not at the first question).
fn load_llama(path: &Path, weights: WeightsChoice, f32: bool) -> Result<LoadedLlama> {
    let device = crate::default_device();
    let check = |chat: Option<ChatTemplate>| -> Result<Option<ChatTemplate>> {
        if let Some(t) = &chat {
            t.format(&[ChatMessage::new("user", "?")], true)?;
        }
        Ok(chat)
    };
    if path.is_dir() {
        let llama = Llama::from_hf_dir(path, &device)?;
        let tokenizer = crate::tokenize::TextTokenizer::from_dir(path)?;
        let config_path = path.join("tokenizer_config.json");
        let config: serde_json::Value = crate::hub::read_json(&config_path)?;
        let chat = check(ChatTemplate::from_tokenizer_config(&config, &config_path)?)?;
        let window = config
            .get("model_max_length")
            .and_then(|v| v.as_u64())
            .with_context(|| format!("{}: no `model_max_length`", config_path.display()))?;
        Ok((llama, tokenizer, chat, window as usize))
    } else {
        let g = GgufFile::open(path)?;
        let weights = match (weights, f32) {
            (WeightsChoice::Quantized, false) => GgufWeights::default(),
            _ => GgufWeights::F32,
        };
        let llama = Llama::from_gguf_with(&g, &device, weights)?;
        let tokenizer = tokenizer_from_gguf(&g, llama.special_ids().vocab_size)?;
        // Chat-tuned models answer inside their chat format.
        let chat = match g.has("tokenizer.chat_template") {
            true => check(Some(ChatTemplate::from_gguf(&g)?))?,
            false => None,
        };
        let arch = g.str("general.architecture").unwrap_or("llama").to_string();
        let window = g
            .usize(&format!("{arch}.context_length"))
            .with_context(|| format!("{}: no {arch}.context_length", path.display()))?;
        Ok((llama, tokenizer, chat, window))
    }
}

/// The RAG head over a decoder-only generator read from `path`: a GGUF file (tokenizer, chat
/// template and context window from its metadata; weights as `weights` says), a HF
/// `LlamaForCausalLM` directory with `tokenizer.json` and `tokenizer_config.json` (special tokens,
/// `chat_template`, `model_max_length` as the context window), as [`save_decoder_only`] writes it,
/// or a PEFT LoRA directory (`adapter_config.json`) over either, its base read from
/// `base_model_name_or_path`. Anything but [`DecoderTraining::Frozen`] loads f32 weights.
pub fn open_decoder_only(
    path: &Path,
    weights: WeightsChoice,
    training: &DecoderTraining,
) -> Result<RagModel> {
    let adapter = LoraAdapter::is_adapter_dir(path)
        .then(|| LoraAdapter::read(path))
        .transpose()?;
    let base = adapter.as_ref().map_or(path, |a| a.base.as_path());
    let f32 = adapter.is_some() || *training != DecoderTraining::Frozen;
    let (mut llama, tokenizer, chat, window) = load_llama(base, weights, f32)?;
    match (&adapter, training) {
        (Some(_), DecoderTraining::TopLayers(_)) => bail!(
            "{}: a LoRA adapter trains its adapters (--lora), not top layers",
            path.display()
        ),
        (Some(a), _) => {
            let device = crate::default_device();
            let w = crate::hub::Weights::from_file(&a.weights, DType::F32, &device, false)?;
            llama.add_lora(&a.config, Some(&w))?;
            if *training == DecoderTraining::Frozen {
                llama.merge_lora()?;
            }
        }
        (None, DecoderTraining::Frozen) => {}
        (None, DecoderTraining::TopLayers(n)) => llama.make_trainable(*n)?,
        (None, DecoderTraining::Lora(c)) => llama.add_lora(c, None)?,
    }
    // Checkpoints of an adapter name the original base.
    llama.source = base.to_path_buf();
    decoder_only_rag(Box::new(llama), tokenizer, chat, window, path)
}

/// Save the decoder-only generator of `rag` as a HF directory that [`open_decoder_only`] and
/// transformers' `AutoModelForCausalLM` / `AutoTokenizer` load: weights and `config.json`,
/// `tokenizer.json`, and `tokenizer_config.json` with the chat template and context window.
pub fn save_decoder_only(rag: &RagModel, dir: &Path) -> Result<()> {
    let (Generator::DecoderOnly(g), InputFormat::Prompt(f)) = (&rag.generator, &rag.format) else {
        bail!("save_decoder_only: not a decoder-only RAG model");
    };
    g.save_pretrained(dir)?;
    let tok = &rag.generator_tokenizer;
    let json = tok
        .inner
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("serializing the tokenizer: {e}"))?;
    crate::kb::atomic::write_file_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
    let name = |id: Option<u32>| id.and_then(|i| tok.inner.id_to_token(i));
    let s = g.special_ids();
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(s.bos),
        "eos_token": name(Some(s.eos)),
        "pad_token": name(Some(s.pad)),
        "chat_template": f.chat_template.as_ref().map(ChatTemplate::source),
        "model_max_length": f.max_prompt_tokens,
        "clean_up_tokenization_spaces": false,
    });
    crate::kb::atomic::write_file_atomic(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )
}

impl Pipeline {
    /// A `rustrag index build` knowledge base with a decoder-only generator (a GGUF file or a
    /// directory from `rustrag train`; see [`open_decoder_only`]).
    /// A generator trained over a knowledge base brings its [`RetrievalSettings`]: its τ (unless
    /// `config` sets one) and its trained question encoder.
    pub fn open(kb_dir: &Path, generator: &Path, config: PipelineConfig) -> Result<Self> {
        let rag = open_decoder_only(generator, config.gguf_weights, &DecoderTraining::Frozen)?;
        let trained = match generator.is_dir() {
            true => RetrievalSettings::read(generator)?,
            false => None,
        };
        Self::open_kb_trained(
            kb_dir,
            Arc::new(rag),
            config,
            trained.map(|s| (generator, s)),
        )
    }

    /// A `rustrag index build` knowledge base with a RAG head built by the caller (e.g. a
    /// trainable one from [`open_decoder_only`]).
    pub fn open_kb(kb_dir: &Path, rag: RagModel, config: PipelineConfig) -> Result<Self> {
        Self::open_kb_trained(kb_dir, Arc::new(rag), config, None)
    }

    /// This pipeline's generator and settings over the live generation of the knowledge base at
    /// `kb_dir` (this one's after `rustrag index add`/`reembed`, or another): what a server swaps
    /// in when its KB changes. The generator is shared, not reloaded; the query encoder and
    /// retriever are opened for the KB (a trained question encoder is checked against it again).
    /// Only for `rustrag index build` knowledge bases.
    pub fn reopen_kb(&self, kb_dir: &Path) -> Result<Self> {
        if let Retrieval::Checkpoint(_) = self.retrieval {
            bail!("an HF checkpoint's in-memory knowledge base cannot be reopened");
        }
        let trained = match self.rag.source.as_deref() {
            Some(g) if g.is_dir() => RetrievalSettings::read(g)?.map(|s| (g, s)),
            _ => None,
        };
        Self::open_kb_trained(kb_dir, self.rag.clone(), self.config.clone(), trained)
    }

    /// [`Pipeline::open_kb`] with the retrieval settings saved in the generator directory.
    fn open_kb_trained(
        kb_dir: &Path,
        rag: Arc<RagModel>,
        mut config: PipelineConfig,
        trained: Option<(&Path, RetrievalSettings)>,
    ) -> Result<Self> {
        let kb = Arc::new(KnowledgeBase::open(kb_dir)?);
        let trained_encoder = match &trained {
            Some((dir, s)) => {
                config.prior_temperature = config.prior_temperature.or(Some(s.prior_temperature));
                match &s.question_encoder {
                    Some(q) => Some(trained_question_encoder(&kb, dir, q, s, &config)?),
                    None => None,
                }
            }
            None => None,
        };
        // A trained question encoder was checked against the KB above (its weights differ from
        // the KB's encoder unless the KB was re-embedded with them).
        let (encoder, dense) = match trained_encoder {
            Some(e) => (e, DenseRetriever::new(kb.clone(), None, None)?),
            None => {
                let e = load_kb_encoder(&kb, config.encoder_batch_size)?;
                (e.clone(), DenseRetriever::new(kb.clone(), Some(e), None)?)
            }
        };
        let mut retriever = kb_retriever(&kb, Box::new(dense), &config)?;
        if let Some(r) = &config.rerank {
            retriever = Box::new(RerankingRetriever::from_config(retriever, r)?);
        }
        let context_window = match &rag.format {
            InputFormat::Prompt(f) => Some(f.max_prompt_tokens),
            InputFormat::Seq2Seq(_) => None,
        };
        let tau = (config.prior_temperature)
            .or(config.rerank.as_ref().map(|r| r.temperature))
            .unwrap_or_else(|| kb.manifest().prior_temperature());
        Self::new(
            rag,
            Retrieval::Kb {
                kb,
                encoder,
                retriever,
                swapped: None,
            },
            config,
            tau,
            context_window,
        )
    }

    /// An HF RAG checkpoint (`--model`) with its in-memory knowledge base directory
    /// (`passages.jsonl` + `embeddings.safetensors`).
    pub fn open_checkpoint(model: &str, kb_dir: &Path, config: PipelineConfig) -> Result<Self> {
        if config.rerank.is_some() {
            bail!("reranking needs a `rustrag index build` knowledge base, not an HF checkpoint's index");
        }
        let (rag, index) =
            crate::rag::checkpoint::load_rag_with_kb(model, kb_dir, config.answer.mode)?;
        let tau = config.prior_temperature.unwrap_or(1.0);
        Self::new(
            Arc::new(rag),
            Retrieval::Checkpoint(index),
            config,
            tau,
            None,
        )
    }

    fn new(
        mut rag: Arc<RagModel>,
        retrieval: Retrieval,
        config: PipelineConfig,
        tau: f64,
        context_window: Option<usize>,
    ) -> Result<Self> {
        if !(tau.is_finite() && tau > 0.0) {
            bail!("prior temperature must be positive and finite, got {tau}");
        }
        if config.batch_size == 0 {
            bail!("batch_size must be at least 1");
        }
        // A fresh model takes the pipeline's τ (its checkpoint contexts read it); a shared one
        // (`reopen_kb`) serves a KB, whose contexts take the pipeline's τ directly.
        if let Some(r) = Arc::get_mut(&mut rag) {
            r.prior_temperature = tau;
        }
        Ok(Self {
            rag,
            config,
            retrieval,
            prior_temperature: tau,
            context_window,
        })
    }

    /// τ of the doc prior in use.
    pub fn prior_temperature(&self) -> f64 {
        self.prior_temperature
    }

    /// The `rustrag index build` knowledge base (None for an HF checkpoint's in-memory one).
    pub fn knowledge_base(&self) -> Option<&KnowledgeBase> {
        match &self.retrieval {
            Retrieval::Kb { kb, .. } => Some(kb),
            Retrieval::Checkpoint(_) => None,
        }
    }

    /// Passages in the knowledge base.
    pub fn kb_len(&self) -> usize {
        match &self.retrieval {
            Retrieval::Checkpoint(index) => index.len(),
            Retrieval::Kb { kb, .. } => kb.len(),
        }
    }

    /// Replace the knowledge base's passage embeddings (`[passages * dim]`, KB row order) for
    /// dense search and doc scores, e.g. with a re-embedding by a context encoder being trained.
    /// The KB on disk is unchanged; BM25 is unaffected.
    pub fn swap_dense_index(&mut self, embeddings: Vec<f32>) -> Result<()> {
        let Retrieval::Kb {
            kb,
            retriever,
            swapped,
            ..
        } = &mut self.retrieval
        else {
            bail!("only a `rustrag index build` knowledge base's embeddings can be swapped");
        };
        let index = Arc::new(InMemoryIndex::new(
            kb.passages().all()?,
            embeddings,
            kb.embeddings().dim(),
        )?);
        *retriever = kb_retriever(kb, Box::new(index.clone()), &self.config)?;
        *swapped = Some(index);
        Ok(())
    }

    /// The embeddings swapped in by [`Pipeline::swap_dense_index`], if any.
    pub fn swapped_dense_index(&self) -> Option<&InMemoryIndex> {
        match &self.retrieval {
            Retrieval::Kb { swapped, .. } => swapped.as_deref(),
            Retrieval::Checkpoint(_) => None,
        }
    }

    /// Answer `questions` with the configured settings.
    pub fn answer(&self, questions: &[String]) -> Result<Vec<QaResult>> {
        self.answer_with(questions, &self.config.answer)
    }

    /// Answer `questions` with per-call settings (unset fields: the pipeline's, then defaults).
    pub fn answer_with(&self, questions: &[String], opts: &AnswerOptions) -> Result<Vec<QaResult>> {
        self.answer_observed(questions, opts, None)
    }

    /// [`Pipeline::answer_with`] telling `on_event` each question's sources once retrieved and,
    /// for RAG-Token with greedy decoding or sampling, each generated token as it is chosen with its
    /// posterior over the documents (what a server streams). The tokens and posteriors are the
    /// ones the returned answers hold (posteriors up to float rounding: here from the decoding
    /// steps, there from a teacher-forced pass; no pass is made with `provenance: false`).
    /// Other modes and beam search are refused. An error from `on_event` stops the call.
    pub fn answer_streamed(
        &self,
        questions: &[String],
        opts: &AnswerOptions,
        on_event: &mut AnswerObserver<'_>,
    ) -> Result<Vec<QaResult>> {
        self.answer_observed(questions, opts, Some(on_event))
    }

    fn answer_observed(
        &self,
        questions: &[String],
        opts: &AnswerOptions,
        mut on_event: Option<&mut AnswerObserver<'_>>,
    ) -> Result<Vec<QaResult>> {
        let (n_docs, tau) = self.retrieval_settings(questions, opts)?;
        let d = &self.config.answer;
        let closed_book = opts.closed_book || d.closed_book;
        // One "document" (the question alone) with prior 1: both heads reduce to plain decoding.
        let (mode, n_docs) = match closed_book {
            true => (RagMode::Token, 1),
            false => (opts.mode.or(d.mode).unwrap_or(self.rag.mode), n_docs),
        };
        let decoder_only = self.rag.generator.is_decoder_only();
        let max_new = opts.max_new_tokens.or(d.max_new_tokens);
        let max_new = match (max_new, decoder_only) {
            (Some(m), _) => Some(m),
            (None, true) => Some(32),
            (None, false) => None,
        };
        if max_new == Some(0) {
            bail!("max_new_tokens must be at least 1");
        }
        let overrides = GenerationSettings {
            num_beams: opts.beams.or(d.beams).or(decoder_only.then_some(1)),
            num_return_sequences: opts.num_return_sequences.or(d.num_return_sequences),
            max_length: max_new.map(|m| m + 1),
            min_length: opts.min_new_tokens.or(d.min_new_tokens).map(|m| m + 1),
            ..Default::default()
        };
        let mut params = self.rag.generation_params(&overrides)?;
        params.sampling = AnswerOptions {
            temperature: opts.temperature.or(d.temperature),
            top_p: opts.top_p.or(d.top_p),
            seed: opts.seed.or(d.seed),
            ..AnswerOptions::default()
        }
        .sampling()?;
        if params.sampling.is_some() && (mode != RagMode::Token || params.num_beams != 1) {
            bail!(
                "sampling (temperature > 0) needs RAG-Token decoding with one beam, got {mode:?} with {} beams",
                params.num_beams
            );
        }
        if params.num_return_sequences > params.num_beams {
            bail!(
                "num_return_sequences ({}) must be at most the number of beams ({})",
                params.num_return_sequences,
                params.num_beams
            );
        }
        // Only when asked for: a checkpoint's own min_length above a short max is HF's warning.
        if overrides.min_length.is_some() && params.min_length > params.max_length {
            bail!(
                "min_new_tokens ({}) is above max_new_tokens ({})",
                params.min_length - 1,
                params.max_length - 1
            );
        }
        // Fewer questions per decode when their rows would not fit: only one question over the
        // limit is refused (a server batching equal requests must not turn valid ones into errors).
        let per_question = n_docs * params.num_beams;
        let batch_size = (self.config.max_decode_rows / per_question.max(1))
            .clamp(1, self.config.batch_size.max(1));
        let batch = batch_size.min(questions.len());
        let rows = batch * per_question;
        if rows > self.config.max_decode_rows {
            bail!(
                "{rows} generator rows at once (questions per batch {batch} × n_docs {n_docs} × beams {}) exceed PipelineConfig::max_decode_rows ({}): lower the beams, n_docs or batch size",
                params.num_beams,
                self.config.max_decode_rows
            );
        }
        if on_event.is_some() && (mode != RagMode::Token || params.num_beams != 1) {
            bail!(
                "streaming needs RAG-Token with one beam (mode token, beams 1), got {mode:?} with {} beams",
                params.num_beams
            );
        }
        let rag_format = self.format_leaving(params.max_length - 1)?;
        let tok = &self.rag.generator_tokenizer;
        let mut out = Vec::with_capacity(questions.len());
        for (c, chunk) in questions.chunks(batch_size).enumerate() {
            let first = c * batch_size;
            let (retrieved, ctx) = match closed_book {
                true => self.question_only(chunk, rag_format.as_ref())?,
                false => self.retrieve(chunk, n_docs, rag_format.as_ref())?,
            };
            let ctx = ctx.with_temperature(tau)?;
            let sources = sources(&retrieved, &ctx)?;
            let ids = match (mode, opts.sequence_decoding, on_event.as_mut()) {
                (RagMode::Token, _, Some(on_event)) => {
                    for (i, s) in sources.iter().enumerate() {
                        on_event(AnswerEvent::Sources {
                            question: first + i,
                            sources: s,
                        })?;
                    }
                    let mut observer = |step: TokenStep<'_>| -> Result<()> {
                        on_event(AnswerEvent::Token {
                            question: first + step.row,
                            position: step.position,
                            id: step.token,
                            text: &tok.decode(&[step.token], false)?,
                            doc_posterior: step.doc_posterior,
                        })
                    };
                    self.rag
                        .generate_token_observed(&ctx, &params, Some(&mut observer))?
                }
                (RagMode::Token, _, None) => self.rag.generate_token(&ctx, &params)?,
                (RagMode::Sequence, SequenceDecoding::Fast, _) => {
                    self.rag.generate_sequence_fast(&ctx, &params)?.0
                }
                (RagMode::Sequence, SequenceDecoding::Thorough, _) => {
                    self.rag
                        .generate_sequence(&ctx, &params, self.rag.config.do_deduplication)?
                        .0
                }
            };
            let per_q = ids.len() / chunk.len();
            for (i, (q, sources)) in chunk.iter().zip(sources).enumerate() {
                let r = &retrieved[i];
                let answers = ids[i * per_q..(i + 1) * per_q]
                    .iter()
                    .map(|a| {
                        let provenance = opts.provenance && !closed_book;
                        self.generated_answer(&ctx, i, a, mode, provenance)
                    })
                    .collect::<Result<Vec<_>>>()?;
                out.push(QaResult {
                    question: q.clone(),
                    mode,
                    closed_book,
                    prior_temperature: tau,
                    sources,
                    answers,
                    truncated: r.truncated.clone(),
                });
            }
        }
        Ok(out)
    }

    /// Decoder-only: the prompt format whose prompts leave `answer_tokens` of the context window.
    fn format_leaving(&self, answer_tokens: usize) -> Result<Option<InputFormat>> {
        let (Some(window), InputFormat::Prompt(f)) = (self.context_window, &self.rag.format) else {
            return Ok(None);
        };
        if answer_tokens >= window {
            bail!("{answer_tokens} answer tokens leave no room for a prompt in the {window}-token context window");
        }
        let mut f = f.clone();
        f.max_prompt_tokens = window - answer_tokens;
        Ok(Some(InputFormat::Prompt(f)))
    }

    /// Retrieval for training and evaluation loops: `n_docs` passages per question and the
    /// generator contexts (prior τ of the pipeline), prompts leaving `answer_tokens` of the context
    /// window. `doc_scores: [questions, n_docs]` are constants (the KB's encoder is not trained;
    /// [`Pipeline::contexts_from_queries`] is the trainable form).
    pub fn contexts(
        &self,
        questions: &[String],
        n_docs: usize,
        answer_tokens: usize,
    ) -> Result<TrainingContexts> {
        crate::rag::model::check_n_docs(n_docs, self.kb_len())?;
        let format = self.format_leaving(answer_tokens)?;
        let (docs, ctx) = self.retrieve(questions, n_docs, format.as_ref())?;
        Ok(TrainingContexts::new(ctx, docs, n_docs))
    }

    /// [`Pipeline::contexts`] with the caller's question embeddings `queries: [questions, dim]`
    /// (a question encoder being trained: its gradient reaches `doc_scores = q · d`). The
    /// configured retriever chooses the documents from `queries` (detached); `d` are the chosen
    /// passages' stored (or swapped-in) embeddings, or, with `encode_docs` (a context encoder
    /// being trained: passages → `[n, dim]`), their re-encodings, so that the gradient reaches
    /// both sides. Only for `rustrag index build` knowledge bases.
    pub fn contexts_from_queries(
        &self,
        questions: &[String],
        queries: &Tensor,
        n_docs: usize,
        answer_tokens: usize,
        encode_docs: Option<&DocEncoder<'_>>,
    ) -> Result<TrainingContexts> {
        crate::rag::model::check_n_docs(n_docs, self.kb_len())?;
        let format = self.format_leaving(answer_tokens)?;
        let (docs, ctx) =
            self.kb_contexts(questions, queries, n_docs, format.as_ref(), encode_docs)?;
        Ok(TrainingContexts::new(ctx, docs, n_docs))
    }

    /// Retrieval only: each question's sources with their priors (no generation).
    pub fn sources(&self, questions: &[String], opts: &AnswerOptions) -> Result<Vec<Vec<Source>>> {
        let (n_docs, tau) = self.retrieval_settings(questions, opts)?;
        let mut out = Vec::with_capacity(questions.len());
        for chunk in questions.chunks(self.config.batch_size) {
            let (retrieved, ctx) = self.retrieve(chunk, n_docs, None)?;
            out.extend(sources(&retrieved, &ctx.with_temperature(tau)?)?);
        }
        Ok(out)
    }

    /// Checked n_docs and τ of a call.
    fn retrieval_settings(
        &self,
        questions: &[String],
        opts: &AnswerOptions,
    ) -> Result<(usize, f64)> {
        if let Some(i) = questions.iter().position(|q| q.trim().is_empty()) {
            bail!("question {} is empty", i + 1);
        }
        let max = self.config.max_question_chars;
        if let Some((i, n)) = questions
            .iter()
            .map(|q| q.chars().count())
            .enumerate()
            .find(|&(_, n)| n > max)
        {
            bail!(
                "question {} has {n} characters, over the limit of {max} (PipelineConfig::max_question_chars)",
                i + 1
            );
        }
        let d = &self.config.answer;
        let n_docs = opts.n_docs.or(d.n_docs).unwrap_or(match self.retrieval {
            Retrieval::Checkpoint(_) => self.rag.config.n_docs,
            Retrieval::Kb { .. } => 3,
        });
        crate::rag::model::check_n_docs(n_docs, self.kb_len())?;
        let tau = opts
            .prior_temperature
            .or(d.prior_temperature)
            .unwrap_or(self.prior_temperature);
        if !(tau.is_finite() && tau > 0.0) {
            bail!("prior temperature must be positive and finite, got {tau}");
        }
        Ok((n_docs, tau))
    }

    fn generated_answer(
        &self,
        ctx: &RagContext,
        question: usize,
        ids: &[u32],
        mode: RagMode,
        provenance: bool,
    ) -> Result<GeneratedAnswer> {
        let tok = &self.rag.generator_tokenizer;
        let doc_posteriors = match provenance {
            true => self.rag.doc_posteriors_for(mode, ctx, question, ids)?,
            false => Vec::new(),
        };
        let tokens = match mode {
            RagMode::Token => ids[1..=doc_posteriors.len().min(ids.len() - 1)]
                .iter()
                .map(|&t| tok.decode(&[t], false))
                .collect::<Result<Vec<_>>>()?,
            RagMode::Sequence => Vec::new(),
        };
        Ok(GeneratedAnswer {
            text: tok.decode(&ids[1..], true)?.trim().to_string(),
            ids: ids.to_vec(),
            doc_posteriors,
            tokens,
        })
    }

    /// Closed-book contexts: one row per question holding the question alone, with no passage
    /// (`doc_scores: [questions, 1]` of zeros, so p(z|x) = 1).
    fn question_only(
        &self,
        questions: &[String],
        format: Option<&InputFormat>,
    ) -> Result<(Vec<QuestionDocs>, RagContext)> {
        let format = format.unwrap_or(&self.rag.format);
        let rows = format.question_rows(&self.rag.generator_tokenizer, questions)?;
        let (ids, mask) = rows.encoded.tensors(&self.rag.device)?;
        let scores = Tensor::zeros((questions.len(), 1), DType::F32, &self.rag.device)?;
        let docs = questions
            .iter()
            .map(|_| QuestionDocs {
                doc_ids: Vec::new(),
                passages: Vec::new(),
                retrieval_scores: Vec::new(),
                truncated: Vec::new(),
            })
            .collect();
        Ok((docs, RagContext::new(ids, mask, scores)?))
    }

    /// Retrieve `n_docs` passages per question and build the generator contexts (doc scores =
    /// dense inner products of the chosen passages, whichever retriever chose them).
    fn retrieve(
        &self,
        questions: &[String],
        n_docs: usize,
        format: Option<&InputFormat>,
    ) -> Result<(Vec<QuestionDocs>, RagContext)> {
        match &self.retrieval {
            Retrieval::Checkpoint(index) => {
                let refs: Vec<&str> = questions.iter().map(|s| s.as_str()).collect();
                let r = self.rag.retrieve(index, &refs, n_docs)?;
                let scores = r.context.doc_scores.detach().to_vec2::<f32>()?;
                let docs = (0..questions.len())
                    .map(|i| QuestionDocs {
                        doc_ids: r.doc_ids[i].clone(),
                        passages: r.passages[i].clone(),
                        retrieval_scores: scores[i].clone(),
                        truncated: Vec::new(),
                    })
                    .collect();
                Ok((docs, r.context))
            }
            Retrieval::Kb { encoder, .. } => {
                let refs: Vec<&str> = questions.iter().map(|s| s.as_str()).collect();
                let q = encoder.encode_texts(&refs)?.to_dtype(DType::F32)?;
                self.kb_contexts(questions, &q, n_docs, format, None)
            }
        }
    }

    /// [`Pipeline::retrieve`] over a knowledge base with the questions already embedded
    /// (`queries: [questions, dim]`, gradient kept into `doc_scores`).
    fn kb_contexts(
        &self,
        questions: &[String],
        queries: &Tensor,
        n_docs: usize,
        format: Option<&InputFormat>,
        encode_docs: Option<&DocEncoder<'_>>,
    ) -> Result<(Vec<QuestionDocs>, RagContext)> {
        let Retrieval::Kb {
            kb,
            retriever,
            swapped,
            ..
        } = &self.retrieval
        else {
            bail!("trainable question embeddings need a `rustrag index build` knowledge base");
        };
        let refs: Vec<&str> = questions.iter().map(|s| s.as_str()).collect();
        let hits = retriever.retrieve(&refs, Some(&queries.detach()), n_docs)?;
        if let Some(h) = hits.iter().find(|h| h.doc_ids.len() != n_docs) {
            bail!(
                "the retriever returned {} passages, asked for {n_docs}",
                h.doc_ids.len()
            );
        }
        // d: [questions * n_docs, dim], the chosen passages in order.
        let docs = match encode_docs {
            Some(encode) => {
                let chosen: Vec<&Passage> = hits.iter().flat_map(|h| &h.passages).collect();
                encode(&chosen)?
            }
            None => {
                let mut rows = Vec::with_capacity(hits.len() * n_docs * kb.embeddings().dim());
                let mut row = Vec::new();
                for &r in hits.iter().flat_map(|h| &h.doc_ids) {
                    let r = r as usize;
                    match swapped {
                        Some(index) => rows.extend_from_slice(index.embedding(r)),
                        None => {
                            // Converted when the KB stores f16.
                            kb.embeddings().rows_f32_into(r, r + 1, &mut row);
                            rows.extend_from_slice(&row);
                        }
                    }
                }
                let dim = kb.embeddings().dim();
                Tensor::from_vec(rows, (hits.len() * n_docs, dim), &self.rag.device)?
            }
        };
        let doc_scores = match (&self.config.rerank, encode_docs) {
            // The cross-encoder's logits are the calibrated scores (no gradient: inference).
            (Some(_), None) => {
                let s: Vec<f32> = hits.iter().flat_map(|h| h.scores.iter().copied()).collect();
                Tensor::from_vec(s, (hits.len(), n_docs), &self.rag.device)?
            }
            (Some(_), Some(_)) => bail!("reranking is inference only: passages re-embedded while training have no cross-encoder scores"),
            (None, _) => batched_scores(&queries.to_dtype(DType::F32)?, &docs, n_docs)?,
        };
        let passages: Vec<Vec<Passage>> = hits.iter().map(|h| h.passages.clone()).collect();
        let format = format.unwrap_or(&self.rag.format);
        let rows = format.rows(&self.rag.generator_tokenizer, questions, &passages)?;
        let (ci, cm) = rows.encoded.tensors(&self.rag.device)?;
        let ctx = RagContext::new(ci, cm, doc_scores)?.with_temperature(self.prior_temperature)?;
        let docs = hits
            .into_iter()
            .enumerate()
            .map(|(i, h)| QuestionDocs {
                doc_ids: h.doc_ids,
                passages: h.passages,
                retrieval_scores: h.scores,
                truncated: rows
                    .truncated
                    .iter()
                    .filter(|t| t.row / n_docs == i)
                    .map(|t| Truncation {
                        row: t.row % n_docs,
                        ..t.clone()
                    })
                    .collect(),
            })
            .collect();
        Ok((docs, ctx))
    }
}

/// Passages → their embeddings `[passages, dim]` (with gradient when the encoder trains).
pub type DocEncoder<'a> = dyn Fn(&[&Passage]) -> Result<Tensor> + 'a;

/// `doc_scores[b, j] = q[b] · d[b * n_docs + j]`: `queries: [batch, dim]`,
/// `docs: [batch * n_docs, dim]` → `[batch, n_docs]`.
fn batched_scores(queries: &Tensor, docs: &Tensor, n_docs: usize) -> Result<Tensor> {
    let (batch, dim) = queries.dims2()?;
    let docs = docs.to_dtype(DType::F32)?.reshape((batch, n_docs, dim))?;
    Ok(docs.matmul(&queries.unsqueeze(2)?)?.squeeze(2)?)
}

/// The configured retriever over a knowledge base with `dense` as its dense side.
fn kb_retriever(
    kb: &Arc<KnowledgeBase>,
    dense: Box<dyn Retriever>,
    config: &PipelineConfig,
) -> Result<Box<dyn Retriever>> {
    let bm25 = || -> Result<Box<dyn Retriever>> {
        Ok(Box::new(KbBm25 {
            bm25: open_or_build_kb_bm25(kb)?,
            kb: kb.clone(),
        }))
    };
    Ok(match config.retriever {
        RetrieverKind::Dense => dense,
        RetrieverKind::Bm25 => bm25()?,
        RetrieverKind::Hybrid => Box::new(HybridRetriever::new(
            dense,
            bm25()?,
            Fusion::Rrf { k: config.rrf_k },
            config.candidates,
        )?),
    })
}

/// BM25 over a knowledge base whose hits' passages are read from the KB's store, as the dense
/// retriever's are (each checked against its block checksums, and refused once the KB failed a
/// full check), not from the copy the BM25 index keeps, which has no block checksums.
struct KbBm25 {
    bm25: Bm25Retriever,
    kb: Arc<KnowledgeBase>,
}

impl Retriever for KbBm25 {
    fn retrieve(
        &self,
        queries: &[&str],
        _query_embeddings: Option<&Tensor>,
        k: usize,
    ) -> Result<Vec<crate::retrieve::Hits>> {
        use rayon::prelude::*;
        queries
            .par_iter()
            .map(|q| {
                let found: Vec<(u32, f32)> = (self.bm25.search(q, k)?.into_iter())
                    .map(|(row, score)| (row as u32, score))
                    .collect();
                crate::retrieve::Hits::from_rows(&found, |row| self.kb.passage(row), None)
            })
            .collect()
    }

    fn len(&self) -> usize {
        self.bm25.len()
    }
}

/// The sources of each question of `ctx`: passages, scores and p(z|x).
fn sources(retrieved: &[QuestionDocs], ctx: &RagContext) -> Result<Vec<Vec<Source>>> {
    let priors = loss::doc_log_prior(&ctx.prior_scores()?.detach(), DType::F32)?
        .exp()?
        .to_vec2::<f32>()?;
    let scores = ctx.doc_scores.detach().to_vec2::<f32>()?;
    Ok(retrieved
        .iter()
        .enumerate()
        .map(|(i, r)| {
            r.passages
                .iter()
                .enumerate()
                .map(|(j, p)| Source {
                    rank: j + 1,
                    doc_id: r.doc_ids[j],
                    passage_id: p.id.clone(),
                    title: p.title.clone(),
                    text: p.text.clone(),
                    retrieval_score: r.retrieval_scores[j],
                    score: scores[i][j],
                    prior: priors[i][j],
                })
                .collect()
        })
        .collect())
}

/// Generator contexts of a training or evaluation batch and what went into them.
pub struct TrainingContexts {
    pub context: RagContext,
    /// `[questions][n_docs]`.
    pub passages: Vec<Vec<Passage>>,
    /// Prompts whose passage was cut to fit the context window (`row`: question × n_docs + doc).
    pub truncated: Vec<Truncation>,
}

impl TrainingContexts {
    fn new(context: RagContext, docs: Vec<QuestionDocs>, n_docs: usize) -> Self {
        let mut passages = Vec::with_capacity(docs.len());
        let mut truncated = Vec::new();
        for (i, d) in docs.into_iter().enumerate() {
            passages.push(d.passages);
            truncated.extend(d.truncated.into_iter().map(|t| Truncation {
                row: i * n_docs + t.row,
                ..t
            }));
        }
        Self {
            context,
            passages,
            truncated,
        }
    }
}

/// What retrieval chose for one question.
struct QuestionDocs {
    doc_ids: Vec<u64>,
    passages: Vec<Passage>,
    retrieval_scores: Vec<f32>,
    truncated: Vec<Truncation>,
}
