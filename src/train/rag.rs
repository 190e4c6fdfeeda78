//! RAG fine-tuning (Lewis et al. 2020 §2.4; HF `finetune_rag.py`): the RAG-Sequence or RAG-Token
//! loss of [`RagModel`] on question/answer pairs retrieved against a knowledge base, with the
//! generator, the generator and the question encoder (through `doc_scores = q · d`, document
//! embeddings fixed), or end to end: the context encoder re-encodes the retrieved documents so
//! that `doc_scores` are differentiable on both sides, and the knowledge base is re-embedded in
//! the background every `reindex_every` steps and swapped in while training continues on the old
//! one (HF's `rag-end2end-retriever`; [`crate::train::reindex`]). The doc-prior temperature τ can
//! train too (`log τ` a parameter).
//!
//! A run lives in one output directory:
//! `metrics.jsonl` (one record per step and per evaluation), `metrics.png`, and
//! `checkpoints/step-NNNNNNN/` (HF `save_pretrained` layout + `optimizer.safetensors` +
//! `trainer_state.json`), with `checkpoints/latest` naming the newest complete one.

use crate::generators::llama::LoraConfig;
use crate::rag::checkpoint::{load_rag, LoadOptions};
use crate::rag::config::{GenerationSettings, RagMode};
use crate::rag::loss::NllOptions;
use crate::rag::pipeline::{
    save_decoder_only, DecoderTraining, DocEncoder, Pipeline, RetrievalSettings, TrainingContexts,
    RETRIEVAL_SETTINGS_FILE,
};
use crate::rag::{RagContext, RagModel};
use crate::retrieve::{Passage, Retriever};
use crate::tokenize::{ids_tensor, Padding};
use crate::train::checkpoint;
use crate::train::data::{stream_slice, Example};
use crate::train::optim::{clip_grad_norm, AdamW, AdamWConfig, GradAccumulator, LinearSchedule};
use crate::train::reindex::{save_embeddings, IndexRecord, PassageIndex, Reindexer};
use crate::train::retriever::Towers;
use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Which parameters train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trainable {
    /// The generator only (doc scores are constants).
    Generator,
    /// Generator and question encoder (gradient through `doc_scores`; document embeddings fixed).
    GeneratorQuestionEncoder,
    /// Generator, question and context encoders: retrieved documents re-encoded, the knowledge
    /// base re-embedded in the background (knowledge-base runs only).
    EndToEnd,
}

impl Trainable {
    fn question_encoder(self) -> bool {
        self != Self::Generator
    }
}

/// Settings of a RAG fine-tuning run. Defaults in brackets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
// Settings added later read their defaults from older runs' trainer_state.json.
#[serde(default)]
pub struct RagTrainConfig {
    /// [`Trainable::GeneratorQuestionEncoder`], as in the paper.
    pub trainable: Trainable,
    /// Documents per question [the checkpoint's `n_docs`].
    pub n_docs: Option<usize>,
    /// Questions per micro-batch [8].
    pub batch_size: usize,
    /// Micro-batches summed into one optimiser step [1]; each micro-batch loss is divided by it.
    pub grad_accum: usize,
    /// Optimiser steps of the run [100].
    pub max_steps: u64,
    /// AdamW [torch defaults, except `lr` 3e-5 as HF's RAG examples].
    pub optim: AdamWConfig,
    /// Linear warm-up steps before the linear decay to 0 at `max_steps` [0].
    pub warmup_steps: u64,
    /// Clip the global L2 gradient norm to this [1.0]; `None` disables clipping.
    pub max_grad_norm: Option<f64>,
    /// Label smoothing ε of the RAG loss [0.0].
    pub label_smoothing: f64,
    /// Apply the generator's dropout (its config.json rates: BART `dropout`, `attention_dropout`,
    /// `activation_dropout`; T5 `dropout_rate`) in training steps, as HF's `model.train()`;
    /// evaluation and decoding never drop [true]. Masks are seeded by (seed, step, micro-batch), so
    /// a resumed run drops the same units. The question and context encoders train without
    /// dropout.
    pub dropout: bool,
    /// Answer length cap in generator tokens, special tokens included [25, `finetune_rag.py`].
    pub max_target_length: usize,
    /// Seed of the data order [42].
    pub seed: u64,
    /// Evaluate on the dev set every this many steps (and at the end) [0 = only at the end].
    pub eval_every: u64,
    /// Write a checkpoint every this many steps (and at the end) [0 = only at the end].
    pub save_every: u64,
    /// Questions per evaluation batch [8]: decoding several questions' rows together keeps the
    /// matmuls wide (evaluation has no gradient, so memory is not the limit).
    pub eval_batch_size: usize,
    /// Decoder-only generators: the top layers trained, the rest (and the embeddings) frozen [6].
    /// Read where the run's generator is opened (the CLI, and resuming); see
    /// [`RagTrainConfig::decoder_training`].
    pub trainable_layers: usize,
    /// Decoder-only generators: train LoRA adapters on the frozen model instead of top layers
    /// [None].
    pub lora: Option<LoraConfig>,
    /// Maximum answer length (decoder start included) when decoding for EM/F1 [20]; greedy.
    pub eval_max_length: usize,
    /// Learning rate of the question and context encoders [None: `optim.lr`].
    pub question_encoder_lr: Option<f64>,
    /// End to end: start re-embedding the knowledge base every this many steps [50].
    pub reindex_every: u64,
    /// End to end: re-embed in a background thread while training continues on the old index
    /// [true]; false waits for it (the swap step, and so the run, is then reproducible).
    pub reindex_in_background: bool,
    /// Train the doc-prior temperature τ (as `log τ`, starting from the pipeline's τ) [false].
    pub train_prior_temperature: bool,
    /// Learning rate of `log τ` [1e-2].
    pub prior_temperature_lr: f64,
    /// Memory a micro-batch's activations may take, in GB (10⁹ bytes) [None: 90% of the memory
    /// available when the run starts, after the models are loaded]. A micro-batch whose estimate
    /// ([`crate::generators::ActivationShape::training_bytes`]) is over it is refused before its
    /// forward pass, with the numbers.
    pub memory_budget_gb: Option<f64>,
}

impl Default for RagTrainConfig {
    fn default() -> Self {
        Self {
            trainable: Trainable::GeneratorQuestionEncoder,
            n_docs: None,
            batch_size: 8,
            grad_accum: 1,
            max_steps: 100,
            optim: AdamWConfig {
                lr: 3e-5,
                ..Default::default()
            },
            warmup_steps: 0,
            max_grad_norm: Some(1.0),
            label_smoothing: 0.0,
            dropout: true,
            max_target_length: 25,
            seed: 42,
            eval_every: 0,
            save_every: 0,
            eval_max_length: 20,
            trainable_layers: 6,
            lora: None,
            eval_batch_size: 8,
            question_encoder_lr: None,
            reindex_every: 50,
            reindex_in_background: true,
            train_prior_temperature: false,
            prior_temperature_lr: 1e-2,
            memory_budget_gb: None,
        }
    }
}

impl RagTrainConfig {
    fn validate(&self) -> Result<()> {
        if self.batch_size == 0
            || self.eval_batch_size == 0
            || self.grad_accum == 0
            || self.max_steps == 0
        {
            bail!("batch_size, eval_batch_size, grad_accum and max_steps must be at least 1");
        }
        if !(self.optim.lr.is_finite() && self.optim.lr > 0.0) {
            bail!(
                "learning rate must be a positive number, got {}",
                self.optim.lr
            );
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            bail!(
                "label_smoothing must be in [0, 1), got {}",
                self.label_smoothing
            );
        }
        if self.max_target_length < 2 {
            bail!("max_target_length must be at least 2");
        }
        for (what, lr) in [
            ("question_encoder_lr", self.question_encoder_lr),
            ("prior_temperature_lr", Some(self.prior_temperature_lr)),
        ] {
            if lr.is_some_and(|lr| !(lr.is_finite() && lr > 0.0)) {
                bail!("{what} must be a positive number, got {lr:?}");
            }
        }
        if self.trainable == Trainable::EndToEnd && self.reindex_every == 0 {
            bail!("reindex_every must be at least 1 when training end to end");
        }
        Ok(())
    }

    /// What of a decoder-only generator trains: LoRA adapters when set, else the top layers.
    pub fn decoder_training(&self) -> DecoderTraining {
        match &self.lora {
            Some(c) => DecoderTraining::Lora(c.clone()),
            None => DecoderTraining::TopLayers(self.trainable_layers),
        }
    }

    /// Questions per optimiser step.
    pub fn questions_per_step(&self) -> usize {
        self.batch_size * self.grad_accum
    }
}

/// What one optimiser step did.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    /// Mean RAG loss per question over the step's micro-batches (with label smoothing).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient L2 norm before clipping.
    pub grad_norm: f64,
    /// Generator tokens (context + answer, padding excluded) per second.
    pub tokens_per_s: f64,
    pub secs: f64,
    /// Prompts of the step whose passage was cut to fit the generator's context window (with
    /// the answer room, `max_target_length`, kept), and answers cut at `max_target_length`.
    #[serde(default)]
    pub cut_prompts: usize,
    #[serde(default)]
    pub cut_answers: usize,
    /// τ after the step, when it trains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior_temperature: Option<f64>,
}

/// Dev-set metrics at a step.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalRecord {
    pub step: u64,
    /// Mean RAG loss per question (no label smoothing).
    pub eval_loss: f64,
    /// Exact match and token F1 of greedy answers, in percent (SQuAD normalisation).
    pub em: f64,
    pub f1: f64,
    /// Share of questions with a `gold_pid` whose gold passage was retrieved among the n_docs, in
    /// percent (`None` when no example has a `gold_pid`). A chunk `<gold_pid>#<n>` counts as gold.
    pub recall: Option<f64>,
    pub questions: usize,
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum MetricLine {
    Train(StepRecord),
    Eval(EvalRecord),
    /// End to end: a re-embedded knowledge base swapped in.
    Index(IndexRecord),
}

impl MetricLine {
    fn step(&self) -> u64 {
        match self {
            MetricLine::Train(r) => r.step,
            MetricLine::Eval(r) => r.step,
            MetricLine::Index(r) => r.step,
        }
    }
}

/// Stored in every checkpoint: enough to resume exactly.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    config: RagTrainConfig,
    train_examples: usize,
    /// sha256 of the knowledge base's embedding encoder (knowledge-base runs with a trained
    /// retriever), to refuse resuming over another KB.
    #[serde(default)]
    kb_encoder_sha256: Option<String>,
    /// End to end: the step of the weights that embedded `index.safetensors`.
    #[serde(default)]
    index_step: Option<u64>,
    /// τ when it trains.
    #[serde(default)]
    prior_temperature: Option<f64>,
}

/// Summary of a finished (or stopped) run.
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
}

/// Where a run's model and documents come from.
pub enum RagSource<'a> {
    /// An HF RAG checkpoint: its question encoder (which may train) over `retriever`.
    Checkpoint {
        model: Box<RagModel>,
        retriever: &'a dyn Retriever,
    },
    /// A knowledge base (dense, BM25 or hybrid retrieval, as the pipeline is configured) and the
    /// pipeline's RAG head, e.g. a decoder-only generator from
    /// [`crate::rag::pipeline::open_decoder_only`] with trainable top layers. `towers`: the
    /// question (and context) encoders loaded trainable, when they train — the encoder that
    /// embedded the KB at the start of a run ([`Towers::load`]), `retriever/` of a checkpoint
    /// when resuming ([`saved_towers`]); without them the KB's encoder is fixed.
    Kb {
        pipeline: Box<Pipeline>,
        towers: Option<Box<Towers>>,
    },
}

impl RagSource<'_> {
    pub fn model(&self) -> &RagModel {
        match self {
            Self::Checkpoint { model, .. } => model,
            Self::Kb { pipeline, .. } => &pipeline.rag,
        }
    }
}

/// One micro-batch's loss and what it saw.
struct BatchLoss {
    loss: Tensor,
    /// Non-pad generator tokens (contexts + answers).
    tokens: usize,
    cut_prompts: usize,
    cut_answers: usize,
}

/// Where a checkpoint keeps the retriever towers of a knowledge-base run.
const RETRIEVER_DIR: &str = "retriever";
/// The re-embedded knowledge base of an end-to-end run's checkpoint.
const INDEX_FILE: &str = "index.safetensors";

/// The encoder that embedded `pipeline`'s knowledge base, loaded trainable (a sentence-transformers
/// model: one shared tower; a DPR question encoder: with `context_encoder`, its
/// DPRContextEncoder directory).
pub fn kb_towers(pipeline: &Pipeline, context_encoder: Option<&str>) -> Result<Box<Towers>> {
    let kb = pipeline
        .knowledge_base()
        .context("retriever towers belong to a `rustrag index build` knowledge base")?;
    let source = &kb.manifest().encoder.source;
    let towers = Towers::load(source, context_encoder, true)
        .with_context(|| format!("loading {source}, the encoder of {}", kb.root().display()))?;
    Ok(Box::new(towers))
}

/// The retriever towers saved in checkpoint `ckpt` (trainable), if the run trained them.
pub fn saved_towers(ckpt: &Path) -> Result<Option<Box<Towers>>> {
    let dir = ckpt.join(RETRIEVER_DIR);
    if !dir.is_dir() {
        return Ok(None);
    }
    Ok(Some(Box::new(Towers::load_saved(&dir, true)?)))
}

/// A RAG fine-tuning run: model, optimiser, data and output directory.
pub struct RagTrainer<'a> {
    source: RagSource<'a>,
    pub config: RagTrainConfig,
    train: Vec<Example>,
    dev: Vec<Example>,
    out: PathBuf,
    opt: AdamW,
    /// Optimiser steps done.
    pub step: u64,
    n_docs: usize,
    last_checkpoint: Option<PathBuf>,
    /// `log τ` of the doc prior, when it trains.
    log_tau: Option<Var>,
    /// End to end: the step of the weights that embedded the index in use (None: the KB's own
    /// embeddings). The embeddings themselves live in the pipeline.
    index_step: Option<u64>,
    reindexer: Option<Reindexer>,
    /// Bytes a micro-batch's activations may take ([`RagTrainConfig::memory_budget_gb`]).
    memory_budget: u64,
}

/// Optimiser names of the retriever towers' parameters.
const RETRIEVER_PREFIX: &str = "retriever.";
const LOG_TAU: &str = "prior_log_temperature";

impl<'a> RagTrainer<'a> {
    /// Start a run from the RAG checkpoint `model_dir` (loaded trainable). `out` must not hold a run.
    pub fn new(
        model_dir: &str,
        mode: Option<RagMode>,
        retriever: &'a dyn Retriever,
        train: Vec<Example>,
        dev: Vec<Example>,
        out: &Path,
        config: RagTrainConfig,
    ) -> Result<Self> {
        // Settings and the output directory are checked before the (slow) model load.
        config.validate()?;
        check_new_run_dir(out)?;
        let model = load_trainable(model_dir, mode)?;
        Self::from_source(
            RagSource::Checkpoint {
                model: Box::new(model),
                retriever,
            },
            train,
            dev,
            out,
            config,
        )
    }

    /// Start a run from a model already loaded with trainable parameters, of either generator
    /// family ([`RagModel::trainable_vars`]), and its documents. `out` must not hold a run.
    pub fn from_source(
        source: RagSource<'a>,
        train: Vec<Example>,
        dev: Vec<Example>,
        out: &Path,
        config: RagTrainConfig,
    ) -> Result<Self> {
        config.validate()?;
        check_new_run_dir(out)?;
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        std::fs::write(out.join("metrics.jsonl"), b"")
            .with_context(|| format!("creating {}", out.join("metrics.jsonl").display()))?;
        Self::assemble(source, train, dev, out, config, 0)
    }

    /// Resume the run in `out` (an HF RAG checkpoint's) from its latest checkpoint: same config,
    /// same data order; metric lines written after that checkpoint are dropped.
    pub fn resume(
        out: &Path,
        mode: Option<RagMode>,
        retriever: &'a dyn Retriever,
        train: Vec<Example>,
        dev: Vec<Example>,
    ) -> Result<Self> {
        let load = |ckpt: &Path, _: &RagTrainConfig| {
            Ok(RagSource::Checkpoint {
                model: Box::new(load_trainable(&ckpt.to_string_lossy(), mode)?),
                retriever,
            })
        };
        Self::resume_with(out, load, train, dev)
    }

    /// [`Self::resume`] for any source: `load` opens the model saved in a checkpoint directory
    /// (with the run's stored settings) and its documents.
    pub fn resume_with(
        out: &Path,
        load: impl FnOnce(&Path, &RagTrainConfig) -> Result<RagSource<'a>>,
        train: Vec<Example>,
        dev: Vec<Example>,
    ) -> Result<Self> {
        let ckpt = latest_checkpoint(out)?
            .with_context(|| format!("{}: no checkpoint to resume from", out.display()))?;
        let state_path = ckpt.join("trainer_state.json");
        let state: TrainerState = serde_json::from_str(
            &std::fs::read_to_string(&state_path)
                .with_context(|| format!("reading {}", state_path.display()))?,
        )
        .with_context(|| format!("parsing {}", state_path.display()))?;
        if state.train_examples != train.len() {
            bail!(
                "{}: the run trained on {} examples, the training file now has {} (the data order would change)",
                state_path.display(),
                state.train_examples,
                train.len()
            );
        }
        let source = load(&ckpt, &state.config)?;
        if let (RagSource::Kb { pipeline, .. }, Some(want)) = (&source, &state.kb_encoder_sha256) {
            let kb = pipeline.knowledge_base().context("a knowledge-base run")?;
            if &kb.manifest().encoder.weights_sha256 != want {
                bail!(
                    "{}: the run started on a knowledge base embedded by another encoder (sha256 {want}) than {}'s",
                    state_path.display(),
                    kb.root().display()
                );
            }
        }
        let mut t = Self::assemble(source, train, dev, out, state.config, state.step)?;
        if let (Some(v), Some(tau)) = (&t.log_tau, state.prior_temperature) {
            v.set(&Tensor::new(&[tau.ln() as f32], &t.model().device)?)?;
        }
        if let Some(weights_step) = state.index_step {
            let rows = t.model_kb_len();
            let index = PassageIndex::load(&ckpt.join(INDEX_FILE), rows, weights_step)?;
            t.swap_index(index)?;
        }
        t.opt
            .load(&ckpt.join("optimizer.safetensors"), state.step)?;
        t.last_checkpoint = Some(ckpt);
        checkpoint::keep_jsonl_until(&t.metrics_path(), |m: &MetricLine| m.step() <= state.step)?;
        Ok(t)
    }

    fn assemble(
        source: RagSource<'a>,
        train: Vec<Example>,
        dev: Vec<Example>,
        out: &Path,
        config: RagTrainConfig,
        step: u64,
    ) -> Result<Self> {
        if train.is_empty() {
            bail!("no training examples");
        }
        let model = source.model();
        let n_docs = config.n_docs.unwrap_or(match &source {
            RagSource::Checkpoint { model, .. } => model.n_docs(),
            RagSource::Kb { pipeline, .. } => pipeline.config.answer.n_docs.unwrap_or(3),
        });
        // The parameters come from the model, whichever the generator family.
        let generator_params = model.trainable_vars(false).len();
        if generator_params == 0 {
            let family = match model.generator.is_decoder_only() {
                true => "decoder-only",
                false => "seq2seq",
            };
            bail!("the {family} generator has no trainable parameters");
        }
        let with_question_encoder = config.trainable.question_encoder();
        let mut params = match &source {
            RagSource::Checkpoint { .. } => {
                if config.trainable == Trainable::EndToEnd {
                    bail!("end-to-end training runs over a `rustrag index build` knowledge base (`--kb`); an HF RAG checkpoint trains its generator and question encoder");
                }
                if with_question_encoder && model.question_encoder.is_none() {
                    bail!("training the question encoder needs a checkpoint with one");
                }
                model.trainable_vars(with_question_encoder)
            }
            RagSource::Kb { pipeline, towers } => {
                let mut params = model.trainable_vars(false);
                match (with_question_encoder, towers) {
                    (true, Some(towers)) => {
                        if step == 0 {
                            let kb = pipeline.knowledge_base().context("a knowledge-base run")?;
                            kb.check_query_encoder(&towers.passage_encoder().fingerprint())
                                .context("the retriever trains from the encoder that embedded the knowledge base")?;
                        }
                        params.extend(
                            towers
                                .vars()
                                .into_iter()
                                .map(|(n, v)| (format!("{RETRIEVER_PREFIX}{n}"), v)),
                        );
                    }
                    (true, None) => bail!(
                        "training the retriever over a knowledge base needs its encoder loaded trainable"
                    ),
                    (false, _) => {}
                }
                params
            }
        };
        if params.len() == generator_params && with_question_encoder {
            bail!("the question encoder has no trainable parameters");
        }
        let log_tau = match config.train_prior_temperature {
            true => {
                let tau = match &source {
                    RagSource::Kb { pipeline, .. } => pipeline.prior_temperature(),
                    RagSource::Checkpoint { model, .. } => model.prior_temperature,
                };
                let v = Var::new(&[tau.ln() as f32], &model.device)?;
                params.push((LOG_TAU.to_string(), v.clone()));
                Some(v)
            }
            false => None,
        };
        let mut opt = AdamW::new(params, config.optim.clone())?;
        if let Some(lr) = config.question_encoder_lr {
            opt.scale_lr(|n| n.starts_with(RETRIEVER_PREFIX), lr / config.optim.lr);
        }
        opt.scale_lr(
            |n| n == LOG_TAU,
            config.prior_temperature_lr / config.optim.lr,
        );
        let reindexer = match (&source, config.trainable) {
            (RagSource::Kb { pipeline, .. }, Trainable::EndToEnd) => {
                let kb = pipeline.knowledge_base().context("a knowledge-base run")?;
                Some(Reindexer::new(Arc::new(kb.passages().all()?)))
            }
            _ => None,
        };
        let config_budget = config.memory_budget_gb;
        Ok(Self {
            source,
            config,
            train,
            dev,
            out: out.to_path_buf(),
            opt,
            step,
            n_docs,
            last_checkpoint: None,
            log_tau,
            index_step: None,
            reindexer,
            memory_budget: memory_budget(config_budget)?,
        })
    }

    fn model_kb_len(&self) -> usize {
        match &self.source {
            RagSource::Checkpoint { retriever, .. } => retriever.len(),
            RagSource::Kb { pipeline, .. } => pipeline.kb_len(),
        }
    }

    /// Start re-embedding the knowledge base with the current weights: in the background, or
    /// now (then swapped in at once; the record is returned).
    fn start_reindex(&mut self) -> Result<Option<IndexRecord>> {
        let (
            RagSource::Kb {
                towers: Some(towers),
                ..
            },
            Some(reindexer),
        ) = (&self.source, &mut self.reindexer)
        else {
            bail!("only an end-to-end knowledge-base run re-indexes");
        };
        reindexer.start(towers, self.step, &self.out)?;
        if self.config.reindex_in_background {
            return Ok(None);
        }
        let (index, swap) = reindexer.wait(self.step + 1)?;
        self.swap_in(index, &swap)?;
        Ok(Some(swap))
    }

    /// Retrieve from `index` (a re-embedded knowledge base) from now on, and log the swap.
    fn swap_in(&mut self, index: PassageIndex, swap: &IndexRecord) -> Result<()> {
        tracing::info!(step = swap.step, from = swap.weights_step, "index swapped");
        self.swap_index(index)?;
        self.log(&MetricLine::Index(swap.clone()))
    }

    /// Retrieve from `index` (a re-embedded knowledge base) from now on.
    fn swap_index(&mut self, index: PassageIndex) -> Result<()> {
        let RagSource::Kb { pipeline, .. } = &mut self.source else {
            bail!("only a knowledge-base run re-indexes");
        };
        pipeline.swap_dense_index(index.data)?;
        self.index_step = Some(index.weights_step);
        Ok(())
    }

    /// τ of the doc prior now (trained or fixed).
    pub fn prior_temperature(&self) -> Result<f64> {
        Ok(match (&self.log_tau, &self.source) {
            (Some(v), _) => (v.as_tensor().to_vec1::<f32>()?[0] as f64).exp(),
            (None, RagSource::Kb { pipeline, .. }) => pipeline.prior_temperature(),
            (None, RagSource::Checkpoint { model, .. }) => model.prior_temperature,
        })
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.out.join("metrics.jsonl")
    }

    pub fn plot_path(&self) -> PathBuf {
        self.out.join("metrics.png")
    }

    /// The trained parameters by name, in optimiser order.
    pub fn params(&self) -> Vec<(String, Var)> {
        self.opt
            .params()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect()
    }

    fn schedule(&self) -> LinearSchedule {
        LinearSchedule {
            warmup_steps: self.config.warmup_steps,
            total_steps: self.config.max_steps,
        }
    }

    /// Decoder inputs = labels `[batch, T]`. Seq2seq: as `finetune_rag.py` builds them, the answer
    /// tokenized with special tokens, truncated to `max_target_length`, padded to the longest with
    /// the generator pad; T5 (whose tokenizer adds no BOS) gets `decoder_start_token_id` prepended.
    /// Decoder-only: [`RagModel::answer_labels`] (`[start] + answer + [eos]`, continuing the
    /// prompt), cut to `max_target_length` with the EOS kept, padded with [`RagModel::generator_pad`].
    pub fn labels(&self, answers: &[&str]) -> Result<Tensor> {
        Ok(self.labels_counting_cuts(answers)?.0)
    }

    /// [`Self::labels`] and how many answers were cut at `max_target_length`.
    fn labels_counting_cuts(&self, answers: &[&str]) -> Result<(Tensor, usize)> {
        let m = self.model();
        let max = self.config.max_target_length;
        if m.generator.is_decoder_only() {
            let mut cut = 0;
            let mut rows = answers
                .iter()
                .map(|a| {
                    let mut ids = m.answer_labels(a)?;
                    if ids.len() > max {
                        cut += 1;
                        let eos = ids[ids.len() - 1];
                        ids.truncate(max - 1);
                        ids.push(eos);
                    }
                    Ok(ids)
                })
                .collect::<Result<Vec<_>>>()?;
            let len = rows.iter().map(Vec::len).max().unwrap_or(0);
            for r in &mut rows {
                r.resize(len, m.generator_pad());
            }
            return Ok((ids_tensor(&rows, &m.device)?, cut));
        }
        let t5 = m
            .config
            .generator
            .get("model_type")
            .and_then(|v| v.as_str())
            == Some("t5");
        let max = max - usize::from(t5);
        let whole = m
            .generator_tokenizer
            .encode_batch(answers, true, None, Padding::None)?;
        let cut = whole.input_ids.iter().filter(|r| r.len() > max).count();
        let enc = m
            .generator_tokenizer
            .encode_batch(answers, true, Some(max), Padding::Longest)?;
        let rows: Vec<Vec<u32>> = if t5 {
            let start = m.generator.special_ids().decoder_start;
            enc.input_ids
                .iter()
                .map(|r| std::iter::once(start).chain(r.iter().copied()).collect())
                .collect()
        } else {
            enc.input_ids
        };
        Ok((ids_tensor(&rows, &m.device)?, cut))
    }

    /// The model being trained.
    pub fn model(&self) -> &RagModel {
        self.source.model()
    }

    /// Retrieval and contexts for questions, with each question's passages; `doc_scores` carry
    /// the question encoder's gradient only when it trains.
    fn contexts(&self, questions: &[&str], n_docs: usize) -> Result<TrainingContexts> {
        let mut r = self.retrieved(questions, n_docs)?;
        if let Some(log_tau) = &self.log_tau {
            // p(z|x) = softmax(s / exp(log τ)): the scores carry τ, the context's own τ is 1.
            let c = r.context;
            let scores = c.doc_scores.broadcast_div(&log_tau.as_tensor().exp()?)?;
            r.context = RagContext::new(c.input_ids, c.attention_mask, scores)?;
        }
        Ok(r)
    }

    /// A diverged question encoder gives NaN scores, which retrieve nothing: stop the run instead.
    fn check_finite_queries(&self, q: &Tensor) -> Result<()> {
        let size = q.abs()?.sum_all()?.to_scalar::<f32>()?;
        if !size.is_finite() {
            bail!(self.non_finite("question embedding", size as f64));
        }
        Ok(())
    }

    /// [`Self::contexts`] before the trainable τ.
    fn retrieved(&self, questions: &[&str], n_docs: usize) -> Result<TrainingContexts> {
        let (m, retriever) = match &self.source {
            RagSource::Checkpoint { model, retriever } => (model.as_ref(), *retriever),
            RagSource::Kb { pipeline, towers } => {
                let strings: Vec<String> = questions.iter().map(|q| q.to_string()).collect();
                let answer_tokens = self.config.max_target_length;
                let towers = match towers {
                    Some(t) if self.config.trainable.question_encoder() => t,
                    _ => return pipeline.contexts(&strings, n_docs, answer_tokens),
                };
                let (q, _) = towers.encode_questions(questions, None)?;
                self.check_finite_queries(&q)?;
                let encode_docs = |ps: &[&Passage]| Ok(towers.encode_passages(ps, None)?.0);
                let encode_docs: Option<&DocEncoder<'_>> =
                    (self.config.trainable == Trainable::EndToEnd).then_some(&encode_docs);
                return pipeline.contexts_from_queries(
                    &strings,
                    &q,
                    n_docs,
                    answer_tokens,
                    encode_docs,
                );
            }
        };
        let (ids, mask) = m.tokenize_questions(questions)?;
        let q = m
            .question_encoder
            .as_ref()
            .context("this RAG model has no question encoder")?
            .encode_ids(&ids, &mask)?;
        self.check_finite_queries(&q)?;
        let r = m.retrieve_with_embeddings(retriever, &ids, &q, n_docs)?;
        let context = match self.config.trainable.question_encoder() {
            false => r.context.detached(),
            true => r.context,
        };
        // Seq2seq contexts are cut at max_combined_length as HF cuts them, not reported.
        Ok(TrainingContexts {
            context,
            passages: r.passages,
            truncated: Vec::new(),
        })
    }

    /// Refuse a micro-batch of `questions` whose activations would not fit the memory budget.
    fn check_memory(&self, questions: usize, input_len: usize, target_len: usize) -> Result<()> {
        let shape = self.model().generator.activation_shape();
        let rows = questions * self.n_docs;
        let need = shape.training_bytes(rows, input_len, target_len);
        if need > self.memory_budget {
            let gb = |b: u64| b as f64 / 1e9;
            bail!(
                "a micro-batch of {questions} questions × {} documents = {rows} generator rows × ({input_len} context + {target_len} answer tokens) needs about {:.2} GB of activations ({} + {} layers kept for backward, hidden {}, heads {}), over the memory budget of {:.2} GB (memory_budget_gb; default 90% of the memory available at the start): lower --batch-size (--grad-accum keeps the questions per step), --n-docs or --trainable-layers",
                self.n_docs,
                gb(need),
                shape.input_layers,
                shape.decoder_layers,
                shape.hidden,
                shape.heads,
                gb(self.memory_budget)
            );
        }
        Ok(())
    }

    /// Loss (scalar when `reduce`, else `[batch]`) of a micro-batch and what it saw.
    fn batch_loss(&self, batch: &[&Example], epsilon: f64, reduce: bool) -> Result<BatchLoss> {
        let questions: Vec<&str> = batch.iter().map(|e| e.question.as_str()).collect();
        let answers: Vec<&str> = batch.iter().map(|e| e.answers[0].as_str()).collect();
        let r = self.contexts(&questions, self.n_docs)?;
        let ctx = &r.context;
        let (labels, cut_answers) = self.labels_counting_cuts(&answers)?;
        self.check_memory(batch.len(), ctx.input_ids.dim(1)?, labels.dim(1)?)?;
        let pad = self.model().generator_pad();
        let tokens =
            count_non_pad(&ctx.input_ids, pad)? + self.n_docs * count_non_pad(&labels, pad)?;
        let opts = NllOptions {
            reduce_loss: reduce,
            epsilon,
            exclude_bos_score: false,
        };
        Ok(BatchLoss {
            loss: self.model().loss(ctx, &labels, &opts)?,
            tokens,
            cut_prompts: r.truncated.len(),
            cut_answers,
        })
    }

    /// One optimiser step on the next `questions_per_step` examples of the seeded stream. Stops with
    /// an error (and no update) when the loss or the gradient norm is not finite.
    pub fn train_step(&mut self) -> Result<StepRecord> {
        let started = Instant::now();
        let c = &self.config;
        let per_step = c.questions_per_step();
        let idx = stream_slice(
            self.train.len(),
            c.seed,
            self.step * per_step as u64,
            per_step,
        );
        let mut acc = GradAccumulator::new(self.opt.params().map(|(_, v)| v.clone()).collect());
        let (mut loss_sum, mut tokens) = (0f64, 0usize);
        let (mut cut_prompts, mut cut_answers) = (0usize, 0usize);
        for (m, micro) in idx.chunks(c.batch_size).enumerate() {
            let batch: Vec<&Example> = micro.iter().map(|&i| &self.train[i]).collect();
            let _train_mode = match c.dropout {
                true => TrainMode::on(self.model(), c.seed, self.step, m as u64),
                false => TrainMode(None),
            };
            // HF sums the per-question losses (reduce_loss); the mean over the optimiser step's
            // questions keeps the rate independent of batch size and accumulation.
            let b = self.batch_loss(&batch, c.label_smoothing, true)?;
            let value = b.loss.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                bail!(self.non_finite("loss", value));
            }
            loss_sum += value;
            tokens += b.tokens;
            cut_prompts += b.cut_prompts;
            cut_answers += b.cut_answers;
            acc.add(&(b.loss / per_step as f64)?.backward()?)?;
        }
        let mut grads = acc.take();
        let grad_norm = match c.max_grad_norm {
            Some(max) => clip_grad_norm(&mut grads, max)?,
            None => clip_grad_norm(&mut grads, f64::INFINITY)?,
        };
        if !grad_norm.is_finite() {
            bail!(self.non_finite("gradient norm", grad_norm));
        }
        let lr = c.optim.lr * self.schedule().lambda(self.step);
        self.opt.step(&grads, lr)?;
        self.step += 1;
        let secs = started.elapsed().as_secs_f64();
        Ok(StepRecord {
            step: self.step,
            loss: loss_sum / per_step as f64,
            lr,
            grad_norm,
            tokens_per_s: tokens as f64 / secs.max(1e-9),
            secs,
            cut_prompts,
            cut_answers,
            prior_temperature: match self.log_tau {
                Some(_) => Some(self.prior_temperature()?),
                None => None,
            },
        })
    }

    fn non_finite(&self, what: &str, value: f64) -> String {
        checkpoint::diverged(self.step + 1, what, value, self.last_checkpoint.as_deref())
    }

    /// Dev loss (no smoothing), greedy EM/F1 and retrieval recall over `examples`.
    pub fn evaluate(&self, examples: &[Example]) -> Result<EvalRecord> {
        if examples.is_empty() {
            bail!("no evaluation examples");
        }
        let mut p = self.model().generation_params(&GenerationSettings {
            num_beams: Some(1),
            num_return_sequences: Some(1),
            max_length: Some(self.config.eval_max_length),
            ..Default::default()
        })?;
        p.min_length = 0;
        let (mut loss, mut em, mut f1) = (0f64, 0f64, 0f64);
        let (mut with_gold, mut found) = (0usize, 0usize);
        for batch in examples.chunks(self.config.eval_batch_size) {
            let questions: Vec<&str> = batch.iter().map(|e| e.question.as_str()).collect();
            let answers: Vec<&str> = batch.iter().map(|e| e.answers[0].as_str()).collect();
            let TrainingContexts {
                context, passages, ..
            } = self.contexts(&questions, self.n_docs)?;
            let ctx = context.detached();
            let opts = NllOptions {
                reduce_loss: true,
                epsilon: 0.0,
                exclude_bos_score: false,
            };
            // One question at a time: with trainable weights the forward records its graph, and a
            // whole evaluation batch's graph (24 rows × 12 layers of SmolLM2: over 10 GB) is
            // what a training step's batch size was chosen to avoid.
            for (i, a) in answers.iter().enumerate() {
                loss += self
                    .model()
                    .loss(&ctx.questions(i, 1)?, &self.labels(&[a])?, &opts)?
                    .to_scalar::<f32>()? as f64;
            }
            let ids = match self.model().mode {
                RagMode::Token => self.model().generate_token(&ctx, &p)?,
                RagMode::Sequence => self.model().generate_sequence_fast(&ctx, &p)?.0,
            };
            for ((ex, out), passages) in batch.iter().zip(&ids).zip(&passages) {
                let text = self.model().generator_tokenizer.decode(out, true)?;
                em += crate::eval::qa::max_over_answers(
                    crate::eval::qa::exact_match,
                    &text,
                    &ex.answers,
                );
                f1 += crate::eval::qa::max_over_answers(
                    crate::eval::qa::f1_score,
                    &text,
                    &ex.answers,
                );
                if let Some(gold) = &ex.gold_pid {
                    with_gold += 1;
                    found += usize::from(
                        passages
                            .iter()
                            .any(|p| crate::eval::answers::is_gold(&p.id, gold)),
                    );
                }
            }
        }
        let n = examples.len() as f64;
        Ok(EvalRecord {
            step: self.step,
            eval_loss: loss / n,
            em: 100.0 * em / n,
            f1: 100.0 * f1 / n,
            recall: (with_gold > 0).then(|| 100.0 * found as f64 / with_gold as f64),
            questions: examples.len(),
        })
    }

    /// Write `checkpoints/step-NNNNNNN/` (model in HF layout, optimiser moments, trainer state)
    /// through a temporary directory renamed into place, then point `checkpoints/latest` at it.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let tau = self.prior_temperature()?;
        let (towers, kb_sha) = match &self.source {
            RagSource::Kb {
                pipeline,
                towers: Some(towers),
            } if self.config.trainable.question_encoder() => {
                let kb = pipeline.knowledge_base().context("a knowledge-base run")?;
                (
                    Some(towers),
                    Some(kb.manifest().encoder.weights_sha256.clone()),
                )
            }
            _ => (None, None),
        };
        let state = TrainerState {
            step: self.opt.steps(),
            config: self.config.clone(),
            train_examples: self.train.len(),
            kb_encoder_sha256: kb_sha.clone(),
            index_step: self.index_step,
            prior_temperature: self.log_tau.is_some().then_some(tau),
        };
        let dir = checkpoint::write_checkpoint(&self.out, self.step, |tmp| {
            match self.model().generator.is_decoder_only() {
                true => save_decoder_only(self.model(), tmp)?,
                false => self.model().save_pretrained(tmp)?,
            }
            if let Some(towers) = towers {
                towers.save(&tmp.join(RETRIEVER_DIR))?;
            }
            if let RagSource::Kb { pipeline, .. } = &self.source {
                if let Some(index) = pipeline.swapped_dense_index() {
                    save_embeddings(index.embeddings(), index.dim(), &tmp.join(INDEX_FILE))?;
                }
                let settings = RetrievalSettings {
                    prior_temperature: tau,
                    question_encoder: towers.map(|t| t.question_encoder_dir(RETRIEVER_DIR)),
                    context_encoder: towers.map(|t| t.context_encoder_dir(RETRIEVER_DIR)),
                    kb_encoder_sha256: kb_sha,
                    passages_reembedded: self.config.trainable == Trainable::EndToEnd,
                };
                std::fs::write(
                    tmp.join(RETRIEVAL_SETTINGS_FILE),
                    serde_json::to_string_pretty(&settings)?,
                )?;
            }
            self.opt.save(&tmp.join("optimizer.safetensors"))?;
            std::fs::write(
                tmp.join("trainer_state.json"),
                serde_json::to_string_pretty(&state)?,
            )?;
            Ok(())
        })?;
        self.last_checkpoint = Some(dir.clone());
        Ok(dir)
    }

    fn log(&self, line: &MetricLine) -> Result<()> {
        checkpoint::append_jsonl(&self.metrics_path(), line)
    }

    /// Train until `max_steps` (or `stop_at`, if smaller: an interrupted run, for tests), evaluating
    /// and checkpointing as configured; writes metrics and the plot. `on_step` sees every step.
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
        let result = (|| -> Result<()> {
            // The "before" point of the eval curve.
            if self.step == 0 && !self.dev.is_empty() {
                let e = self.evaluate(&self.dev)?;
                self.log(&MetricLine::Eval(e.clone()))?;
                evals.push(e);
            }
            while self.step < end {
                if let Some(r) = &mut self.reindexer {
                    if let Some((index, swap)) = r.poll(self.step + 1)? {
                        self.swap_in(index, &swap)?;
                        swaps.push(swap);
                    }
                }
                let rec = self.train_step()?;
                let every = |k: u64, step: u64| k > 0 && step.is_multiple_of(k);
                if self.reindexer.as_ref().is_some_and(|r| !r.is_running())
                    && every(self.config.reindex_every, self.step)
                    && self.step < self.config.max_steps
                {
                    if let Some(swap) = self.start_reindex()? {
                        swaps.push(swap);
                    }
                }
                first.get_or_insert(rec.loss);
                last = Some(rec.loss);
                secs += rec.secs;
                n += 1;
                self.log(&MetricLine::Train(rec.clone()))?;
                on_step(&rec);
                let at_end = self.step == self.config.max_steps;
                if !self.dev.is_empty() && (every(self.config.eval_every, self.step) || at_end) {
                    let e = self.evaluate(&self.dev)?;
                    tracing::info!(
                        step = e.step,
                        loss = e.eval_loss,
                        em = e.em,
                        f1 = e.f1,
                        "eval"
                    );
                    self.log(&MetricLine::Eval(e.clone()))?;
                    evals.push(e);
                }
                if every(self.config.save_every, self.step) || at_end {
                    self.save_checkpoint()?;
                }
            }
            Ok(())
        })();
        if let Some(r) = &mut self.reindexer {
            r.cancel();
        }
        // The plot shows whatever was logged, also when training stopped on an error.
        let plotted = crate::train::plot::plot_metrics(
            &read_metrics(&self.metrics_path())?,
            &self.plot_path(),
        );
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
        })
    }
}

fn check_new_run_dir(out: &Path) -> Result<()> {
    if out.join("checkpoints").join("latest").exists() {
        bail!(
            "{} already holds a run: resume it or choose another output directory",
            out.display()
        );
    }
    Ok(())
}

fn load_trainable(dir: &str, mode: Option<RagMode>) -> Result<RagModel> {
    load_rag(
        dir,
        &LoadOptions {
            trainable: true,
            mode,
            ..Default::default()
        },
    )
}

fn count_non_pad(ids: &Tensor, pad: u32) -> Result<usize> {
    Ok(ids
        .ne(pad)?
        .to_dtype(candle_core::DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()? as usize)
}

/// `memory_budget_gb` in bytes, or 90% of the memory available now (Linux `MemAvailable`; other
/// systems: no limit unless configured).
fn memory_budget(configured: Option<f64>) -> Result<u64> {
    if let Some(gb) = configured {
        if !(gb.is_finite() && gb > 0.0) {
            bail!("memory_budget_gb must be positive, got {gb}");
        }
        return Ok((gb * 1e9) as u64);
    }
    let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo") else {
        return Ok(u64::MAX);
    };
    let kb = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("/proc/meminfo has no readable MemAvailable line")?;
    Ok(kb * 1024 / 10 * 9)
}

/// The generator's dropout switched on for one micro-batch (forward and backward), and off again
/// when dropped, also on an error.
struct TrainMode<'a>(Option<&'a crate::nn::DropoutSwitch>);

impl<'a> TrainMode<'a> {
    fn on(model: &'a RagModel, seed: u64, step: u64, micro: u64) -> Self {
        let switch = model.generator.dropout();
        if let Some(s) = switch {
            let mut state = seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ micro.rotate_left(32);
            s.train(crate::nn::splitmix64(&mut state));
        }
        Self(switch)
    }
}

impl Drop for TrainMode<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.0 {
            s.eval();
        }
    }
}

/// The newest complete checkpoint of the run in `out` (`checkpoints/latest`), if any.
pub fn latest_checkpoint(out: &Path) -> Result<Option<PathBuf>> {
    let latest = out.join("checkpoints").join("latest");
    if !latest.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&latest)
        .with_context(|| format!("reading {}", latest.display()))?;
    let dir = out.join("checkpoints").join(name.trim());
    if !dir.join("trainer_state.json").is_file() {
        bail!(
            "{} names {}, which is not a complete checkpoint",
            latest.display(),
            dir.display()
        );
    }
    Ok(Some(dir))
}

/// Every record of a `metrics.jsonl` (errors name file:line).
pub fn read_metrics(path: &Path) -> Result<Vec<MetricLine>> {
    checkpoint::read_jsonl(path)
}
