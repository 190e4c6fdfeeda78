//! Retriever (bi-encoder) training: DPR (Karpukhin et al. 2020) with in-batch negatives, BM25 hard
//! negatives, or ANCE (Xiong et al. 2021) negatives mined from an index of the knowledge base that
//! is re-embedded with the encoder being trained.
//!
//! Towers ([`Towers`]): one shared sentence-transformers model (questions and passages through
//! the same weights; pooling and normalisation as the model declares) or a DPR question encoder
//! with a separate DPR context encoder. For a micro-batch of `B` questions with gold passages and
//! optional hard negatives, the passages of the batch (gold passages first, then negatives,
//! duplicates merged: a passage shared by two questions is one column, so it is never a negative
//! for a question whose gold it is) are scored against every question, `scores: [B, P]`, and the
//! loss is the mean softmax cross-entropy of each question's gold column — sentence-transformers'
//! `MultipleNegativesRankingLoss` (cosine × `scale`) for sentence models, DPR's NLL (dot product)
//! for DPR towers. BERT has no dropout here (sentence-transformers trains with dropout 0.1).
//!
//! ANCE: the index of passage embeddings starts as the knowledge base's own (checked to come from
//! the same encoder); every `ance_refresh_every` steps the current weights are written to a
//! snapshot, a background thread re-embeds all passages from it, and the new index is swapped in
//! at the first step after it is ready while training continues on the old one (so an ANCE run's
//! swap step depends on timing; the `index` lines of `metrics.jsonl` record it).
//!
//! A run lives in one output directory like `train rag`'s: `metrics.jsonl` (`train`, `eval` and
//! `index` lines), `metrics.png`, `checkpoints/step-NNNNNNN/` with the model in its own layout (a
//! sentence-transformers directory at the checkpoint root, or `question_encoder/` and
//! `ctx_encoder/` HF DPR directories) plus `optimizer.safetensors`, `trainer_state.json` and, for
//! ANCE, `ance_index.safetensors`; `checkpoints/latest` names the newest complete one.

use crate::encoders::bert::{self, l2_normalize};
use crate::encoders::dpr::is_rag_dir;
use crate::encoders::{joined_passage, DprEncoder, LoadOptions, SentenceEncoder, TextEncoder};
use crate::hub::{self, Weights};
use crate::kb::{KnowledgeBase, Passage};
use crate::retrieve::bm25::{Bm25Params, Bm25Retriever};
use crate::tokenize::Padding;
use crate::train::data::stream_slice;
use crate::train::optim::{clip_grad_norm, AdamW, AdamWConfig, GradAccumulator, LinearSchedule};
use crate::train::rag::latest_checkpoint;
use crate::train::reindex::{IndexRecord, PassageIndex, Reindexer};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Where each question's hard negative comes from (besides the other passages of the batch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Negatives {
    /// None: the other questions' passages only.
    InBatch,
    /// The best BM25 passage for the question that is not its gold passage.
    Bm25,
    /// The best passage of the current dense index (re-embedded with the encoder being trained
    /// every `ance_refresh_every` steps) that is not the gold passage.
    Ance,
}

/// How a question and a passage embedding are scored.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Similarity {
    /// `q · p` (DPR).
    Dot,
    /// `scale · cos(q, p)` (sentence-transformers' `MultipleNegativesRankingLoss`).
    Cosine,
}

/// Settings of a retriever training run. Defaults in brackets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetrieverTrainConfig {
    /// [`Negatives::InBatch`].
    pub negatives: Negatives,
    /// Questions per micro-batch [32].
    pub batch_size: usize,
    /// Micro-batches summed into one optimiser step [1]; each micro-batch loss is divided by it.
    pub grad_accum: usize,
    /// Optimiser steps of the run [100].
    pub max_steps: u64,
    /// AdamW [torch defaults, except `lr` 2e-5 as sentence-transformers' `fit`].
    pub optim: AdamWConfig,
    /// Linear warm-up steps before the linear decay to 0 at `max_steps` [0].
    pub warmup_steps: u64,
    /// Clip the global L2 gradient norm to this [1.0, as sentence-transformers]; `None`: no clip.
    pub max_grad_norm: Option<f64>,
    /// Similarity [None: cosine for sentence-transformers models, dot product for DPR].
    pub similarity: Option<Similarity>,
    /// Multiplier of the cosine similarity [20.0, `MultipleNegativesRankingLoss`].
    pub scale: f64,
    /// Question token cap, specials included [None: the model's limit].
    pub max_query_length: Option<usize>,
    /// Passage token cap in training, specials included [None: the model's limit]. Evaluation and
    /// the ANCE index always embed passages as the knowledge base does (the model's limit).
    pub max_passage_length: Option<usize>,
    /// Seed of the data order [42].
    pub seed: u64,
    /// Evaluate every this many steps (and at the start and the end) [0 = start and end only].
    pub eval_every: u64,
    /// Write a checkpoint every this many steps (and at the end) [0 = only at the end].
    pub save_every: u64,
    /// ANCE: re-embed the passages with a snapshot of the weights every this many steps [50].
    pub ance_refresh_every: u64,
    /// Recall cut-offs of the evaluation [1, 5, 20].
    pub recall_ks: Vec<usize>,
}

impl Default for RetrieverTrainConfig {
    fn default() -> Self {
        Self {
            negatives: Negatives::InBatch,
            batch_size: 32,
            grad_accum: 1,
            max_steps: 100,
            optim: AdamWConfig {
                lr: 2e-5,
                ..Default::default()
            },
            warmup_steps: 0,
            max_grad_norm: Some(1.0),
            similarity: None,
            scale: 20.0,
            max_query_length: None,
            max_passage_length: None,
            seed: 42,
            eval_every: 0,
            save_every: 0,
            ance_refresh_every: 50,
            recall_ks: vec![1, 5, 20],
        }
    }
}

impl RetrieverTrainConfig {
    fn validate(&self) -> Result<()> {
        if self.batch_size == 0 || self.grad_accum == 0 || self.max_steps == 0 {
            bail!("batch_size, grad_accum and max_steps must be at least 1");
        }
        if !(self.optim.lr.is_finite() && self.optim.lr > 0.0) {
            bail!(
                "learning rate must be a positive number, got {}",
                self.optim.lr
            );
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            bail!("scale must be a positive number, got {}", self.scale);
        }
        if self.negatives == Negatives::Ance && self.ance_refresh_every == 0 {
            bail!("ance_refresh_every must be at least 1 with ANCE negatives");
        }
        if self.recall_ks.is_empty() || self.recall_ks.contains(&0) {
            bail!("recall_ks needs at least one cut-off, each at least 1");
        }
        Ok(())
    }

    /// Questions per optimiser step.
    pub fn questions_per_step(&self) -> usize {
        self.batch_size * self.grad_accum
    }
}

/// A training or evaluation question with the knowledge-base row of its gold passage.
#[derive(Clone, Debug, PartialEq)]
pub struct Pair {
    pub question: String,
    pub gold_pid: String,
    /// Row of `gold_pid` in the knowledge base.
    pub gold: usize,
}

/// Read a JSONL file of `{"question", "gold_pid", ...}` lines (other fields ignored, blank lines
/// skipped), resolving each `gold_pid` in `kb`. Errors name `file:line` and the field.
pub fn read_pairs(path: &Path, kb: &KnowledgeBase) -> Result<Vec<Pair>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let field = |name: &str| -> Result<String> {
            match v.get(name) {
                Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
                Some(serde_json::Value::String(_)) => bail!("{}: `{name}` is empty", at()),
                Some(_) => bail!("{}: `{name}` is not a string", at()),
                None => bail!("{}: no `{name}` field", at()),
            }
        };
        let question = field("question")?;
        let gold_pid = field("gold_pid")?;
        let gold = kb.row_of(&gold_pid)?.with_context(|| {
            format!(
                "{}: gold_pid {gold_pid:?} is not a passage of the knowledge base {}",
                at(),
                kb.root().display()
            )
        })?;
        out.push(Pair {
            question,
            gold_pid,
            gold,
        });
    }
    if out.is_empty() {
        bail!("{}: no examples", path.display());
    }
    Ok(out)
}

/// The encoders being trained.
pub enum Towers {
    /// One sentence-transformers model for questions and passages.
    Shared {
        encoder: Box<SentenceEncoder>,
        /// The sentence-transformers directory (with `modules.json`).
        dir: PathBuf,
        /// Where the Transformer module's weights live, relative to `dir`.
        transformer: PathBuf,
    },
    /// DPR question and context encoders (separate weights).
    Dpr {
        question: Box<DprEncoder>,
        context: Box<DprEncoder>,
        question_dir: PathBuf,
        context_dir: PathBuf,
    },
}

/// How [`Towers::loss`] scores and truncates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossSettings {
    pub similarity: Similarity,
    /// Multiplier of the cosine similarity (unused with [`Similarity::Dot`]).
    pub scale: f64,
    /// Token caps, specials included (None: the model's limit).
    pub max_query_length: Option<usize>,
    pub max_passage_length: Option<usize>,
}

/// The ANCE index in a checkpoint.
const ANCE_INDEX_FILE: &str = "ance_index.safetensors";

/// Subdirectories of a DPR checkpoint.
const QUESTION_DIR: &str = "question_encoder";
const CONTEXT_DIR: &str = "ctx_encoder";

impl Towers {
    /// Load a sentence-transformers directory (one shared tower; `context` must be None) or a
    /// `DPRQuestionEncoder` directory with the `DPRContextEncoder` directory `context`.
    /// `trainable`: every weight a `Var`.
    pub fn load(encoder: &str, context: Option<&str>, trainable: bool) -> Result<Self> {
        let opts = LoadOptions {
            trainable,
            ..Default::default()
        };
        let dir = hub::resolve_model_dir(encoder)?;
        if dir.join("modules.json").is_file() {
            if let Some(c) = context {
                bail!("{}: a sentence-transformers model is one shared tower; a context encoder ({c}) is for DPR question encoders", dir.display());
            }
            let transformer = transformer_path(&dir)?;
            let encoder = Box::new(SentenceEncoder::load(&dir.display().to_string(), &opts)?);
            return Ok(Self::Shared {
                encoder,
                dir,
                transformer,
            });
        }
        let config_path = dir.join("config.json");
        let config: serde_json::Value = hub::read_json(&config_path)?;
        if is_rag_dir(&config) {
            bail!(
                "{}: a RAG checkpoint; its question encoder trains with `rustrag train rag`",
                dir.display()
            );
        }
        let question = DprEncoder::load(&dir.display().to_string(), &opts)?;
        if question.kind != crate::encoders::dpr::DprKind::Question {
            bail!(
                "{}: not a DPRQuestionEncoder (retriever training starts from the question encoder and takes the context encoder separately)",
                config_path.display()
            );
        }
        let context_dir = hub::resolve_model_dir(context.with_context(|| {
            format!(
                "{}: a DPR question encoder needs its context encoder (DPRContextEncoder directory)",
                dir.display()
            )
        })?)?;
        let ctx = DprEncoder::load(&context_dir.display().to_string(), &opts)?;
        if ctx.kind != crate::encoders::dpr::DprKind::Context {
            bail!(
                "{}: not a DPRContextEncoder",
                context_dir.join("config.json").display()
            );
        }
        Ok(Self::Dpr {
            question: Box::new(question),
            context: Box::new(ctx),
            question_dir: dir,
            context_dir,
        })
    }

    /// Load the towers saved by [`Towers::save`] in `dir`.
    pub fn load_saved(dir: &Path, trainable: bool) -> Result<Self> {
        if dir.join("modules.json").is_file() {
            return Self::load(&dir.display().to_string(), None, trainable);
        }
        let q = dir.join(QUESTION_DIR);
        let c = dir.join(CONTEXT_DIR);
        Self::load(
            &q.display().to_string(),
            Some(&c.display().to_string()),
            trainable,
        )
    }

    /// Where [`Towers::save`] into `dir` puts the question encoder's own directory.
    pub fn question_encoder_dir(&self, dir: &str) -> String {
        match self {
            Self::Shared { .. } => dir.to_string(),
            Self::Dpr { .. } => format!("{dir}/{QUESTION_DIR}"),
        }
    }

    /// Where [`Towers::save`] into `dir` puts the passage encoder's own directory.
    pub fn context_encoder_dir(&self, dir: &str) -> String {
        match self {
            Self::Shared { .. } => dir.to_string(),
            Self::Dpr { .. } => format!("{dir}/{CONTEXT_DIR}"),
        }
    }

    /// The similarity the model family is trained with.
    pub fn default_similarity(&self) -> Similarity {
        match self {
            Self::Shared { .. } => Similarity::Cosine,
            Self::Dpr { .. } => Similarity::Dot,
        }
    }

    /// The encoder that embeds passages (the one a knowledge base records).
    pub fn passage_encoder(&self) -> &dyn TextEncoder {
        match self {
            Self::Shared { encoder, .. } => encoder.as_ref(),
            Self::Dpr { context, .. } => context.as_ref(),
        }
    }

    /// The encoder that embeds questions.
    pub fn question_encoder(&self) -> &dyn TextEncoder {
        match self {
            Self::Shared { encoder, .. } => encoder.as_ref(),
            Self::Dpr { question, .. } => question.as_ref(),
        }
    }

    /// Every trainable parameter by its name in the saved weight files (DPR names carry their
    /// tower: `question_encoder.*`, `ctx_encoder.*`). Empty unless loaded trainable.
    pub fn vars(&self) -> Vec<(String, Var)> {
        match self {
            Self::Shared { encoder, .. } => encoder.weights().vars(),
            Self::Dpr {
                question, context, ..
            } => question.vars().into_iter().chain(context.vars()).collect(),
        }
    }

    fn device(&self) -> &Device {
        match self {
            Self::Shared { encoder, .. } => encoder.device(),
            Self::Dpr { question, .. } => question.device(),
        }
    }

    /// Question embeddings with gradient: `[n, d]`, and how many texts reached the token cap
    /// `max_length` (None: the model's limit) and were cut there.
    pub fn encode_questions(
        &self,
        texts: &[&str],
        max_length: Option<usize>,
    ) -> Result<(Tensor, usize)> {
        match self {
            Self::Shared { encoder, .. } => {
                let cap = max_length.unwrap_or(encoder.max_length);
                let enc = encoder
                    .tokenizer
                    .encode_batch(texts, true, Some(cap), Padding::None)?;
                let pad = encoder.pad_id();
                let e = bert::run_sorted_batches(&enc, FORWARD_ROWS, pad, encoder.device(), |b| {
                    encoder.encode_ids(&b.input_ids, &b.attention_mask, Some(&b.token_type_ids))
                })?;
                Ok((e, at_cap(&enc, cap)))
            }
            Self::Dpr { question, .. } => {
                let cap = max_length.unwrap_or(question.max_length);
                let enc = question
                    .tokenizer
                    .encode_batch(texts, true, Some(cap), Padding::None)?;
                Ok((dpr_forward(question, &enc)?, at_cap(&enc, cap)))
            }
        }
    }

    /// Passage embeddings with gradient: `[n, d]`, embedded as the knowledge base embeds them
    /// (sentence models: `title text` as one text; DPR: the `(title, text)` pair), and how many
    /// reached the token cap.
    pub fn encode_passages(
        &self,
        passages: &[&Passage],
        max_length: Option<usize>,
    ) -> Result<(Tensor, usize)> {
        match self {
            Self::Shared { .. } => {
                let joined: Vec<String> = passages
                    .iter()
                    .map(|p| joined_passage(&p.title, &p.text))
                    .collect();
                let refs: Vec<&str> = joined.iter().map(|s| s.as_str()).collect();
                self.encode_questions(&refs, max_length)
            }
            Self::Dpr { context, .. } => {
                let cap = max_length.unwrap_or(context.max_length);
                let pairs: Vec<(&str, &str)> = passages
                    .iter()
                    .map(|p| (p.title.as_str(), p.text.as_str()))
                    .collect();
                let enc = context
                    .tokenizer
                    .encode_pairs(&pairs, Some(cap), Padding::None)?;
                Ok((dpr_forward(context, &enc)?, at_cap(&enc, cap)))
            }
        }
    }

    /// Save in the models' own layouts under `dst`: a sentence-transformers directory (its
    /// non-weight files copied, `model.safetensors` with the original tensor names), or
    /// `question_encoder/` and `ctx_encoder/` HF DPR directories.
    pub fn save(&self, dst: &Path) -> Result<()> {
        match self {
            Self::Shared {
                encoder,
                dir,
                transformer,
            } => {
                copy_model_files(dir, dst)?;
                save_weights(encoder.weights(), "", &dst.join(transformer))
            }
            Self::Dpr {
                question,
                context,
                question_dir,
                context_dir,
            } => {
                for (enc, src, sub) in [
                    (question, question_dir, QUESTION_DIR),
                    (context, context_dir, CONTEXT_DIR),
                ] {
                    let d = dst.join(sub);
                    copy_model_files(src, &d)?;
                    save_weights(enc.weights(), &format!("{}.", enc.kind.module()), &d)?;
                }
                Ok(())
            }
        }
    }

    /// The loss of one micro-batch: `questions[i]`'s gold passage is `passages[labels[i]]`, every
    /// other passage a negative. `scores = sim(q, p)`: `[B, P]`; returns the mean cross-entropy
    /// (a scalar) with gradient to every tower, and the number of passages cut at the token cap.
    pub fn loss(
        &self,
        questions: &[&str],
        passages: &[&Passage],
        labels: &[u32],
        settings: &LossSettings,
    ) -> Result<(Tensor, usize)> {
        if labels.len() != questions.len() {
            bail!("{} labels for {} questions", labels.len(), questions.len());
        }
        if let Some(&bad) = labels.iter().find(|&&l| l as usize >= passages.len()) {
            bail!("label {bad} is not one of the {} passages", passages.len());
        }
        let (q, _) = self.encode_questions(questions, settings.max_query_length)?;
        let (p, cut) = self.encode_passages(passages, settings.max_passage_length)?;
        let scores = match settings.similarity {
            Similarity::Dot => q.matmul(&p.t()?)?,
            Similarity::Cosine => {
                (l2_normalize(&q)?.matmul(&l2_normalize(&p)?.t()?)? * settings.scale)?
            }
        };
        let labels = Tensor::new(labels, self.device())?;
        Ok((candle_nn::loss::cross_entropy(&scores, &labels)?, cut))
    }
}

/// Rows per padded forward pass in training: texts are sorted by length and run in groups of this
/// many, so that a long passage pads only its group (the results are put back in order, with
/// gradient).
const FORWARD_ROWS: usize = 8;

/// Rows of `enc` as long as `cap`: cut there (or exactly that long, which counts the same).
fn at_cap(enc: &crate::tokenize::Encoded, cap: usize) -> usize {
    enc.input_ids.iter().filter(|r| r.len() >= cap).count()
}

/// DPR forward with gradient on unpadded rows, token types 0 (as the KB is embedded).
fn dpr_forward(enc: &DprEncoder, rows: &crate::tokenize::Encoded) -> Result<Tensor> {
    let pad = bert::pad_id(&enc.tokenizer, &enc.bert.config);
    bert::run_sorted_batches(rows, FORWARD_ROWS, pad, enc.device(), |b| {
        enc.encode_ids(&b.input_ids, Some(&b.attention_mask), None)
    })
}

/// The path of the `sentence_transformers.models.Transformer` module in `dir/modules.json`.
fn transformer_path(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("modules.json");
    let modules: Vec<serde_json::Value> = hub::read_json(&path)?;
    modules
        .iter()
        .find(|m| {
            m.get("type")
                .and_then(|t| t.as_str())
                .is_some_and(|t| t.ends_with("Transformer"))
        })
        .map(|m| PathBuf::from(m.get("path").and_then(|p| p.as_str()).unwrap_or("")))
        .with_context(|| format!("{}: no Transformer module", path.display()))
}

/// Weight files a saved model replaces (and stale copies in other formats that must not be kept).
fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name.ends_with(".bin")
        || name.ends_with(".h5")
        || name.ends_with(".msgpack")
        || name.ends_with(".ot")
        || name.ends_with(".index.json")
}

/// Copy the model directory `src` to `dst` without weight files and other-runtime exports
/// (`onnx/`, `openvino/`), recursively.
fn copy_model_files(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    for e in std::fs::read_dir(src).with_context(|| format!("listing {}", src.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        let t = std::fs::metadata(e.path())?;
        if t.is_dir() {
            if !["onnx", "openvino", "checkpoints"].contains(&name.as_str()) {
                copy_model_files(&e.path(), &dst.join(&name))?;
            }
        } else if !is_weight_file(&name) {
            std::fs::copy(e.path(), dst.join(&name))
                .with_context(|| format!("copying {} to {}", e.path().display(), dst.display()))?;
        }
    }
    Ok(())
}

/// Write every tensor of `weights` whose name starts with `prefix` (current values) to
/// `dir/model.safetensors`, names unchanged.
fn save_weights(weights: &Weights, prefix: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tensors = HashMap::new();
    for name in weights.names().filter(|n| n.starts_with(prefix)) {
        let t = weights.get(name)?.to_device(&Device::Cpu)?.contiguous()?;
        tensors.insert(name.to_string(), t);
    }
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path)
        .with_context(|| format!("writing {}", path.display()))
}

/// What one optimiser step did.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    /// Mean cross-entropy per question over the step's micro-batches.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient L2 norm before clipping.
    pub grad_norm: f64,
    /// Passages (columns) per question, averaged over micro-batches.
    pub passages_per_question: f64,
    /// Passages of the step cut at the training token cap (`max_passage_length`).
    #[serde(default)]
    pub truncated_passages: usize,
    pub questions_per_s: f64,
    pub secs: f64,
}

/// Dev-set retrieval at a step: whole knowledge base re-embedded with the current weights.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalRecord {
    pub step: u64,
    /// recall@k in percent (the gold passage among the top k), by increasing k.
    pub recall: Vec<RecallAt>,
    pub questions: usize,
    /// Seconds to snapshot the weights and embed the passages (the knowledge base's own
    /// embeddings before the first step).
    pub embed_secs: f64,
    pub secs: f64,
}

/// recall@k in percent.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct RecallAt {
    pub k: usize,
    pub recall: f64,
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum MetricLine {
    Train(StepRecord),
    Eval(EvalRecord),
    Index(IndexRecord),
}

impl MetricLine {
    fn step(&self) -> u64 {
        match self {
            Self::Train(r) => r.step,
            Self::Eval(r) => r.step,
            Self::Index(r) => r.step,
        }
    }
}

/// Stored in every checkpoint: enough to resume exactly.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    config: RetrieverTrainConfig,
    train_examples: usize,
    /// sha256 of the knowledge base's embedding encoder, to refuse resuming on another KB.
    kb_encoder_sha256: String,
    /// ANCE: the step of the weights that embedded `ance_index.safetensors`.
    index_step: Option<u64>,
}

/// Summary of a finished run.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub steps: u64,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub evals: Vec<EvalRecord>,
    pub index_swaps: Vec<IndexRecord>,
    pub last_checkpoint: Option<PathBuf>,
    pub metrics: PathBuf,
    pub plot: PathBuf,
    pub mean_step_secs: f64,
    /// Training wall time (steps, mining and index swaps; evaluation and checkpoints excluded).
    pub train_secs: f64,
}

/// Where a run's data comes from.
pub struct RetrieverData<'a> {
    /// `rustrag index build` knowledge base (passages and, for the start, their embeddings).
    pub kb: &'a Path,
    /// BM25 index over the same passages (for [`Negatives::Bm25`]) [`<kb>/bm25`].
    pub bm25: Option<&'a Path>,
    /// Training JSONL (`question`, `gold_pid`).
    pub train: &'a Path,
    /// Dev JSONL for recall@k; None: no evaluation.
    pub dev: Option<&'a Path>,
}

/// A retriever training run.
pub struct RetrieverTrainer {
    towers: Towers,
    pub config: RetrieverTrainConfig,
    kb: KnowledgeBase,
    passages: Arc<Vec<Passage>>,
    bm25: Option<Bm25Retriever>,
    train: Vec<Pair>,
    dev: Vec<Pair>,
    out: PathBuf,
    opt: AdamW,
    similarity: Similarity,
    /// Optimiser steps done.
    pub step: u64,
    /// ANCE: the index negatives are mined from.
    index: Option<PassageIndex>,
    reindexer: Reindexer,
    /// The towers are still the encoder that embedded the knowledge base (no step taken).
    kb_embeddings_current: bool,
    last_checkpoint: Option<PathBuf>,
}

impl RetrieverTrainer {
    /// Start a run: `encoder` (sentence-transformers or DPR question encoder) with `context` (DPR
    /// context encoder) trained on `data`; `out` must not hold a run. The knowledge base must have
    /// been embedded by the (passage) encoder being trained.
    pub fn new(
        encoder: &str,
        context: Option<&str>,
        data: &RetrieverData,
        out: &Path,
        config: RetrieverTrainConfig,
    ) -> Result<Self> {
        config.validate()?;
        if out.join("checkpoints").join("latest").exists() {
            bail!(
                "{} already holds a run: resume it or choose another output directory",
                out.display()
            );
        }
        let towers = Towers::load(encoder, context, true)?;
        let kb = KnowledgeBase::open(data.kb)?;
        kb.check_query_encoder(&towers.passage_encoder().fingerprint())
            .context("retriever training starts from the encoder that embedded the knowledge base (its embeddings are the step-0 index)")?;
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        std::fs::write(out.join("metrics.jsonl"), b"")
            .with_context(|| format!("creating {}", out.join("metrics.jsonl").display()))?;
        let mut t = Self::assemble(towers, kb, data, out, config, 0)?;
        if t.config.negatives == Negatives::Ance {
            t.index = Some(PassageIndex::from_kb(&t.kb));
        }
        Ok(t)
    }

    /// Resume the run in `out` from its latest checkpoint: same settings and data order; metric
    /// lines written after that checkpoint are dropped.
    pub fn resume(out: &Path, data: &RetrieverData) -> Result<Self> {
        let ckpt = latest_checkpoint(out)?
            .with_context(|| format!("{}: no checkpoint to resume from", out.display()))?;
        let state_path = ckpt.join("trainer_state.json");
        let state: TrainerState = serde_json::from_str(
            &std::fs::read_to_string(&state_path)
                .with_context(|| format!("reading {}", state_path.display()))?,
        )
        .with_context(|| format!("parsing {}", state_path.display()))?;
        let kb = KnowledgeBase::open(data.kb)?;
        if kb.manifest().encoder.weights_sha256 != state.kb_encoder_sha256 {
            bail!(
                "{}: the run started on a knowledge base embedded by another encoder ({}) than {}'s",
                state_path.display(),
                state.kb_encoder_sha256,
                data.kb.display()
            );
        }
        let towers = Towers::load_saved(&ckpt, true)?;
        let mut t = Self::assemble(towers, kb, data, out, state.config, state.step)?;
        if t.train.len() != state.train_examples {
            bail!(
                "{}: the run trained on {} examples, the training file now has {} (the data order would change)",
                state_path.display(),
                state.train_examples,
                t.train.len()
            );
        }
        t.opt
            .load(&ckpt.join("optimizer.safetensors"), state.step)?;
        t.kb_embeddings_current = false;
        if let Some(weights_step) = state.index_step {
            t.index = Some(PassageIndex::load(
                &ckpt.join(ANCE_INDEX_FILE),
                t.kb.len(),
                weights_step,
            )?);
        }
        t.last_checkpoint = Some(ckpt);
        crate::train::checkpoint::keep_jsonl_until(&t.metrics_path(), |m: &MetricLine| {
            m.step() <= state.step
        })?;
        Ok(t)
    }

    fn assemble(
        towers: Towers,
        kb: KnowledgeBase,
        data: &RetrieverData,
        out: &Path,
        config: RetrieverTrainConfig,
        step: u64,
    ) -> Result<Self> {
        let train = read_pairs(data.train, &kb)?;
        let dev = match data.dev {
            Some(p) => read_pairs(p, &kb)?,
            None => Vec::new(),
        };
        let bm25 = match config.negatives {
            Negatives::Bm25 => {
                let root = data
                    .bm25
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| data.kb.join("bm25"));
                let r = Bm25Retriever::open(&root, Bm25Params::default())?;
                if r.manifest().num_passages != kb.len() as u64 {
                    bail!(
                        "BM25 index {} has {} passages, the knowledge base {} has {}",
                        root.display(),
                        r.manifest().num_passages,
                        data.kb.display(),
                        kb.len()
                    );
                }
                Some(r)
            }
            _ => None,
        };
        let params = towers.vars();
        if params.is_empty() {
            bail!("the encoder has no trainable parameters");
        }
        let similarity = config
            .similarity
            .unwrap_or_else(|| towers.default_similarity());
        let opt = AdamW::new(params, config.optim.clone())?;
        let passages = Arc::new(kb.passages().all()?);
        let reindexer = Reindexer::new(passages.clone());
        Ok(Self {
            towers,
            config,
            kb,
            passages,
            bm25,
            train,
            dev,
            out: out.to_path_buf(),
            opt,
            similarity,
            step,
            index: None,
            reindexer,
            kb_embeddings_current: step == 0,
            last_checkpoint: None,
        })
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.out.join("metrics.jsonl")
    }

    pub fn plot_path(&self) -> PathBuf {
        self.out.join("metrics.png")
    }

    /// The towers being trained.
    pub fn towers(&self) -> &Towers {
        &self.towers
    }

    /// The trained parameters by name, in optimiser order.
    pub fn params(&self) -> Vec<(String, Var)> {
        self.opt
            .params()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect()
    }

    /// The current weights as frozen towers (written to a snapshot and loaded for inference, as a
    /// checkpoint would be), so that embedding runs the fused inference path without gradients.
    fn frozen(&self) -> Result<Towers> {
        let snap = tempfile::Builder::new()
            .prefix(".snapshot-")
            .tempdir_in(&self.out)?;
        self.towers.save(snap.path())?;
        Towers::load_saved(snap.path(), false)
    }

    fn schedule(&self) -> LinearSchedule {
        LinearSchedule {
            warmup_steps: self.config.warmup_steps,
            total_steps: self.config.max_steps,
        }
    }

    /// Each question's hard negative (a KB row that is not its gold), or None.
    fn hard_negatives(&self, batch: &[&Pair]) -> Result<Vec<Option<usize>>> {
        let not_gold = |p: &Pair, rows: Vec<usize>| rows.into_iter().find(|&r| r != p.gold);
        match self.config.negatives {
            Negatives::InBatch => Ok(vec![None; batch.len()]),
            Negatives::Bm25 => {
                let bm25 = self.bm25.as_ref().context("no BM25 index")?;
                batch
                    .iter()
                    .map(|p| {
                        let hits = bm25.search(&p.question, 2)?;
                        Ok(not_gold(
                            p,
                            hits.into_iter().map(|(r, _)| r as usize).collect(),
                        ))
                    })
                    .collect()
            }
            Negatives::Ance => {
                // Mined with the current question encoder against the (possibly older) index.
                let index = self.index.as_ref().context("no ANCE index")?;
                let questions: Vec<&str> = batch.iter().map(|p| p.question.as_str()).collect();
                let q = self
                    .towers
                    .question_encoder()
                    .encode_texts(&questions)?
                    .detach();
                let hits = index.search(&q, 2)?;
                Ok(batch
                    .iter()
                    .zip(hits)
                    .map(|(p, h)| not_gold(p, h.into_iter().map(|(r, _)| r as usize).collect()))
                    .collect())
            }
        }
    }

    /// Loss of one micro-batch (mean over its questions), the number of passage columns and of
    /// passages cut at the token cap.
    fn batch_loss(&self, batch: &[&Pair]) -> Result<(Tensor, usize, usize)> {
        let c = &self.config;
        let questions: Vec<&str> = batch.iter().map(|p| p.question.as_str()).collect();
        let negatives = self.hard_negatives(batch)?;
        // Columns: gold passages in question order, then negatives; each KB row once.
        let mut columns: Vec<usize> = Vec::new();
        let mut column_of: HashMap<usize, u32> = HashMap::new();
        let mut add = |row: usize, columns: &mut Vec<usize>| -> u32 {
            *column_of.entry(row).or_insert_with(|| {
                columns.push(row);
                (columns.len() - 1) as u32
            })
        };
        let labels: Vec<u32> = batch.iter().map(|p| add(p.gold, &mut columns)).collect();
        for row in negatives.into_iter().flatten() {
            add(row, &mut columns);
        }
        let passages: Vec<&Passage> = columns.iter().map(|&r| &self.passages[r]).collect();
        let settings = LossSettings {
            similarity: self.similarity,
            scale: c.scale,
            max_query_length: c.max_query_length,
            max_passage_length: c.max_passage_length,
        };
        let (loss, cut) = self
            .towers
            .loss(&questions, &passages, &labels, &settings)?;
        Ok((loss, columns.len(), cut))
    }

    /// One optimiser step on the next `questions_per_step` examples of the seeded stream. Stops
    /// with an error (and no update) when the loss or the gradient norm is not finite.
    pub fn train_step(&mut self) -> Result<StepRecord> {
        let started = Instant::now();
        let per_step = self.config.questions_per_step();
        let idx = stream_slice(
            self.train.len(),
            self.config.seed,
            self.step * per_step as u64,
            per_step,
        );
        let mut acc = GradAccumulator::new(self.opt.params().map(|(_, v)| v.clone()).collect());
        let (mut loss_sum, mut columns, mut micro_batches, mut truncated) = (0f64, 0, 0, 0);
        for micro in idx.chunks(self.config.batch_size) {
            let batch: Vec<&Pair> = micro.iter().map(|&i| &self.train[i]).collect();
            let (loss, cols, cut) = self.batch_loss(&batch)?;
            let value = loss.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                bail!(self.non_finite("loss", value));
            }
            loss_sum += value;
            columns += cols;
            truncated += cut;
            micro_batches += 1;
            acc.add(&(loss / self.config.grad_accum as f64)?.backward()?)?;
        }
        let mut grads = acc.take();
        let grad_norm = clip_grad_norm(
            &mut grads,
            self.config.max_grad_norm.unwrap_or(f64::INFINITY),
        )?;
        if !grad_norm.is_finite() {
            bail!(self.non_finite("gradient norm", grad_norm));
        }
        let lr = self.config.optim.lr * self.schedule().lambda(self.step);
        self.opt.step(&grads, lr)?;
        self.step += 1;
        self.kb_embeddings_current = false;
        let secs = started.elapsed().as_secs_f64();
        Ok(StepRecord {
            step: self.step,
            loss: loss_sum / micro_batches as f64,
            lr,
            grad_norm,
            passages_per_question: columns as f64 / per_step as f64,
            truncated_passages: truncated,
            questions_per_s: per_step as f64 / secs.max(1e-9),
            secs,
        })
    }

    fn non_finite(&self, what: &str, value: f64) -> String {
        crate::train::checkpoint::diverged(
            self.step + 1,
            what,
            value,
            self.last_checkpoint.as_deref(),
        )
    }

    /// recall@k of `examples` over the whole knowledge base embedded with the current weights
    /// (the knowledge base's own embeddings before the first step).
    pub fn evaluate(&self, examples: &[Pair]) -> Result<EvalRecord> {
        if examples.is_empty() {
            bail!("no evaluation examples");
        }
        let started = Instant::now();
        let frozen = self.frozen()?;
        let index = if self.kb_embeddings_current {
            PassageIndex::from_kb(&self.kb)
        } else {
            PassageIndex::embed(&frozen, &self.passages, self.step)?
        };
        let embed_secs = started.elapsed().as_secs_f64();
        let questions: Vec<&str> = examples.iter().map(|p| p.question.as_str()).collect();
        let max_k = *self
            .config
            .recall_ks
            .iter()
            .max()
            .context("no recall cut-off")?;
        let mut found = vec![0usize; self.config.recall_ks.len()];
        for chunk in examples.chunks(256).zip(questions.chunks(256)) {
            let q = frozen.question_encoder().encode_texts(chunk.1)?;
            for (pair, hits) in chunk.0.iter().zip(index.search(&q, max_k)?) {
                if let Some(rank) = hits.iter().position(|&(r, _)| r as usize == pair.gold) {
                    for (f, &k) in found.iter_mut().zip(&self.config.recall_ks) {
                        *f += usize::from(rank < k);
                    }
                }
            }
        }
        let n = examples.len() as f64;
        Ok(EvalRecord {
            step: self.step,
            recall: (self.config.recall_ks.iter().copied())
                .zip(found.iter().map(|&f| 100.0 * f as f64 / n))
                .map(|(k, recall)| RecallAt { k, recall })
                .collect(),
            questions: examples.len(),
            embed_secs,
            secs: started.elapsed().as_secs_f64(),
        })
    }

    /// Write `checkpoints/step-NNNNNNN/` (model in its own layout, optimiser moments, trainer
    /// state, ANCE index) atomically and point `checkpoints/latest` at it.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let dir = crate::train::checkpoint::write_checkpoint(&self.out, self.step, |d| {
            self.towers.save(d)?;
            let steps = self.opt.save(&d.join("optimizer.safetensors"))?;
            let index_step = match &self.index {
                Some(ix) => {
                    ix.save(&d.join(ANCE_INDEX_FILE))?;
                    Some(ix.weights_step)
                }
                None => None,
            };
            let state = TrainerState {
                step: steps,
                config: self.config.clone(),
                train_examples: self.train.len(),
                kb_encoder_sha256: self.kb.manifest().encoder.weights_sha256.clone(),
                index_step,
            };
            std::fs::write(
                d.join("trainer_state.json"),
                serde_json::to_string_pretty(&state)?,
            )?;
            Ok(())
        })?;
        self.last_checkpoint = Some(dir.clone());
        Ok(dir)
    }

    fn log(&self, line: &MetricLine) -> Result<()> {
        crate::train::checkpoint::append_jsonl(&self.metrics_path(), line)
    }

    /// Train until `max_steps` (or `stop_at`, if smaller), evaluating (at the start too), swapping
    /// ANCE indexes and checkpointing as configured; writes metrics and the plot.
    pub fn run(
        &mut self,
        stop_at: Option<u64>,
        mut on_step: impl FnMut(&StepRecord),
    ) -> Result<RunSummary> {
        let end = stop_at
            .unwrap_or(self.config.max_steps)
            .min(self.config.max_steps);
        let (mut evals, mut swaps) = (Vec::new(), Vec::new());
        let (mut first, mut last, mut secs, mut n) = (None, None, 0f64, 0u64);
        let mut train_secs = 0f64;
        let result = (|| -> Result<()> {
            if self.step == 0 && !self.dev.is_empty() {
                let e = self.evaluate(&self.dev)?;
                self.log(&MetricLine::Eval(e.clone()))?;
                evals.push(e);
            }
            while self.step < end {
                let started = Instant::now();
                if let Some((index, swap)) = self.reindexer.poll(self.step + 1)? {
                    self.index = Some(index);
                    tracing::info!(
                        step = swap.step,
                        from = swap.weights_step,
                        "ANCE index swapped"
                    );
                    self.log(&MetricLine::Index(swap.clone()))?;
                    swaps.push(swap);
                }
                let rec = self.train_step()?;
                let every = |k: u64, step: u64| k > 0 && step.is_multiple_of(k);
                if self.config.negatives == Negatives::Ance
                    && !self.reindexer.is_running()
                    && every(self.config.ance_refresh_every, self.step)
                    && self.step < self.config.max_steps
                {
                    self.reindexer.start(&self.towers, self.step, &self.out)?;
                }
                train_secs += started.elapsed().as_secs_f64();
                first.get_or_insert(rec.loss);
                last = Some(rec.loss);
                secs += rec.secs;
                n += 1;
                self.log(&MetricLine::Train(rec.clone()))?;
                on_step(&rec);
                let at_end = self.step == self.config.max_steps;
                if !self.dev.is_empty() && (every(self.config.eval_every, self.step) || at_end) {
                    let e = self.evaluate(&self.dev)?;
                    tracing::info!(step = e.step, recall = ?e.recall, "eval");
                    self.log(&MetricLine::Eval(e.clone()))?;
                    evals.push(e);
                }
                if every(self.config.save_every, self.step) || at_end || self.step == end {
                    self.save_checkpoint()?;
                }
            }
            Ok(())
        })();
        self.reindexer.cancel();
        let plotted = plot(&read_metrics(&self.metrics_path())?, &self.plot_path());
        result?;
        plotted?;
        Ok(RunSummary {
            steps: self.step,
            first_loss: first,
            last_loss: last,
            evals,
            index_swaps: swaps,
            last_checkpoint: self.last_checkpoint.clone(),
            metrics: self.metrics_path(),
            plot: self.plot_path(),
            mean_step_secs: secs / n.max(1) as f64,
            train_secs,
        })
    }
}

/// `metrics.png`: training loss on top, recall@k (%) below.
fn plot(lines: &[MetricLine], path: &Path) -> Result<()> {
    let mut train = Vec::new();
    let mut recall: BTreeMap<usize, Vec<(f64, f64)>> = BTreeMap::new();
    for l in lines {
        match l {
            MetricLine::Train(r) => train.push((r.step as f64, r.loss)),
            MetricLine::Eval(r) => {
                for r_at in &r.recall {
                    let point = (r.step as f64, r_at.recall);
                    recall.entry(r_at.k).or_default().push(point);
                }
            }
            MetricLine::Index(_) => {}
        }
    }
    let names: Vec<String> = recall.keys().map(|k| format!("recall@{k}")).collect();
    let series: Vec<(&str, Vec<(f64, f64)>)> = names
        .iter()
        .map(|s| s.as_str())
        .zip(recall.into_values())
        .collect();
    crate::train::plot::plot_curves(path, "retriever loss per question", &train, &[], &series)
}

/// Every record of a retriever run's `metrics.jsonl` (errors name file:line).
pub fn read_metrics(path: &Path) -> Result<Vec<MetricLine>> {
    crate::train::checkpoint::read_jsonl(path)
}
