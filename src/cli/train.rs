//! `rustrag train rag`: parse, call [`rustrag::train::rag::RagTrainer`], print.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use rustrag::generators::llama::LoraConfig;
use rustrag::rag::pipeline::{open_decoder_only, Pipeline, PipelineConfig, WeightsChoice};
use rustrag::rag::{InMemoryIndex, RagMode};
use rustrag::train::data::read_examples;
use rustrag::train::optim::AdamWConfig;
use rustrag::train::rag::{
    kb_towers, saved_towers, RagSource, RagTrainConfig, RagTrainer, Trainable,
};
use std::path::PathBuf;

#[derive(Parser, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Subcommand, Debug)]
pub enum What {
    /// Fine-tune an HF RAG checkpoint with the RAG-Sequence or RAG-Token loss.
    Rag(RagArgs),
    /// Train a bi-encoder retriever (sentence-transformers or DPR) on question/gold-passage pairs.
    Retriever(super::train_retriever::RetrieverArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TrainableArg {
    Generator,
    #[value(name = "generator+question-encoder")]
    GeneratorQuestionEncoder,
    /// Generator + question encoder + context encoder, the KB re-embedded in the background.
    EndToEnd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ModeArg {
    Token,
    Sequence,
}

#[derive(Parser, Debug)]
pub struct RagArgs {
    /// RAG checkpoint directory (HF `save_pretrained` layout). Ignored with --resume.
    #[arg(long, conflicts_with = "generator")]
    pub model: Option<String>,
    /// Decoder-only generator (GGUF file or HF directory) to train against a `rustrag index build`
    /// knowledge base (--kb), its encoder fixed. Ignored with --resume.
    #[arg(long)]
    pub generator: Option<PathBuf>,
    /// Knowledge base: with --model, a directory with passages.jsonl and embeddings.safetensors;
    /// with --generator, a `rustrag index build` directory.
    #[arg(long)]
    pub kb: PathBuf,
    /// Retriever over a `rustrag index build` knowledge base (dense, bm25, hybrid).
    #[arg(long, default_value = "hybrid")]
    pub retriever: String,
    /// Decoder-only generators: top layers trained (the rest and the embeddings frozen).
    #[arg(long, default_value_t = 6)]
    pub trainable_layers: usize,
    /// Decoder-only generators: train LoRA adapters of this rank on the frozen model instead of
    /// top layers (0: off). Checkpoints are then PEFT adapter directories.
    #[arg(long, default_value_t = 0)]
    pub lora_rank: usize,
    /// LoRA scale numerator (the update is alpha / rank · B A); default 2 × rank.
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Adapt only the top N layers (default: every layer).
    #[arg(long)]
    pub lora_layers: Option<usize>,
    /// Training JSONL: {"question", "answers": [..], "gold_pid"?} per line.
    #[arg(long)]
    pub train: PathBuf,
    /// Dev JSONL (same format) for loss, EM/F1 and retrieval recall.
    #[arg(long)]
    pub dev: Option<PathBuf>,
    /// Output directory (metrics.jsonl, metrics.png, checkpoints/).
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its latest checkpoint (its stored settings win).
    #[arg(long)]
    pub resume: bool,
    /// Head when the checkpoint's `architectures` names none.
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    #[arg(long, value_enum, default_value = "generator+question-encoder")]
    pub trainable: TrainableArg,
    #[arg(long)]
    pub n_docs: Option<usize>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 100)]
    pub steps: u64,
    #[arg(long, default_value_t = 3e-5)]
    pub lr: f64,
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Global L2 gradient-norm clip; 0 disables.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// Memory a micro-batch's activations may take, in GB (default: 90% of the memory available
    /// at the start); an estimate over it is refused before the forward pass.
    #[arg(long)]
    pub memory_budget_gb: Option<f64>,
    /// Train without the generator's dropout (BART/T5 apply their config.json rates in training
    /// steps by default, as HF's `model.train()` does).
    #[arg(long)]
    pub no_dropout: bool,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Questions per evaluation batch.
    #[arg(long, default_value_t = 8)]
    pub eval_batch_size: usize,
    /// Evaluate every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub save_every: u64,
    /// Learning rate of the question/context encoders (default: --lr).
    #[arg(long)]
    pub question_encoder_lr: Option<f64>,
    /// A DPR knowledge base trained end to end: its context encoder (DPRContextEncoder directory).
    #[arg(long)]
    pub context_encoder: Option<String>,
    /// End to end: re-embed the knowledge base in the background every N steps.
    #[arg(long, default_value_t = 50)]
    pub reindex_every: u64,
    /// Train the doc-prior temperature τ (as log τ).
    #[arg(long)]
    pub train_prior_temperature: bool,
    #[arg(long, default_value_t = 1e-2)]
    pub prior_temperature_lr: f64,
}

impl RagArgs {
    fn config(&self) -> RagTrainConfig {
        RagTrainConfig {
            trainable: match self.trainable {
                TrainableArg::Generator => Trainable::Generator,
                TrainableArg::GeneratorQuestionEncoder => Trainable::GeneratorQuestionEncoder,
                TrainableArg::EndToEnd => Trainable::EndToEnd,
            },
            n_docs: self.n_docs,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            max_steps: self.steps,
            optim: AdamWConfig {
                lr: self.lr,
                weight_decay: self.weight_decay,
                ..Default::default()
            },
            warmup_steps: self.warmup,
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            label_smoothing: self.label_smoothing,
            dropout: !self.no_dropout,
            memory_budget_gb: self.memory_budget_gb,
            seed: self.seed,
            eval_every: self.eval_every,
            save_every: self.save_every,
            trainable_layers: self.trainable_layers,
            lora: (self.lora_rank > 0).then(|| LoraConfig {
                rank: self.lora_rank,
                alpha: self.lora_alpha.unwrap_or(2.0 * self.lora_rank as f64),
                layers: self.lora_layers,
                seed: self.seed,
                ..Default::default()
            }),
            eval_batch_size: self.eval_batch_size,
            question_encoder_lr: self.question_encoder_lr,
            reindex_every: self.reindex_every,
            train_prior_temperature: self.train_prior_temperature,
            prior_temperature_lr: self.prior_temperature_lr,
            ..Default::default()
        }
    }
}

pub fn run(args: Args, json: bool) -> Result<()> {
    match args.what {
        What::Rag(a) => run_rag(a, json),
        What::Retriever(a) => super::train_retriever::run(a, json),
    }
}

fn run_rag(a: RagArgs, json: bool) -> Result<()> {
    let train = read_examples(&a.train)?;
    let dev = match &a.dev {
        Some(p) => read_examples(p)?,
        None => Vec::new(),
    };
    let mode = a.mode.map(|m| match m {
        ModeArg::Token => RagMode::Token,
        ModeArg::Sequence => RagMode::Sequence,
    });
    // A run over a `rustrag index build` KB stores a decoder-only generator in its checkpoints;
    // an HF checkpoint's KB is passages.jsonl + embeddings.safetensors.
    let kb_run = a.generator.is_some() || (a.resume && !a.kb.join("passages.jsonl").is_file());
    let index;
    let mut trainer = if kb_run {
        let pipeline_config = PipelineConfig {
            retriever: a.retriever.parse()?,
            gguf_weights: WeightsChoice::F32,
            ..Default::default()
        };
        // `resumed`: the generator is a checkpoint, which holds the trained retriever towers.
        let open = |generator: &std::path::Path,
                    c: &RagTrainConfig,
                    resumed: bool|
         -> Result<RagSource<'static>> {
            let mut rag = open_decoder_only(generator, WeightsChoice::F32, &c.decoder_training())?;
            if let Some(m) = mode {
                rag.mode = m;
            }
            let p = Pipeline::open_kb(&a.kb, rag, pipeline_config.clone())?;
            let towers = match (c.trainable, resumed) {
                (Trainable::Generator, _) => None,
                (_, true) => saved_towers(generator)?,
                (_, false) => Some(kb_towers(&p, a.context_encoder.as_deref())?),
            };
            Ok(RagSource::Kb {
                pipeline: Box::new(p),
                towers,
            })
        };
        if a.resume {
            RagTrainer::resume_with(&a.out, |g, c| open(g, c, true), train, dev)?
        } else {
            let config = a.config();
            let generator = a.generator.as_deref().context("--generator is required")?;
            RagTrainer::from_source(open(generator, &config, false)?, train, dev, &a.out, config)?
        }
    } else {
        index = InMemoryIndex::load(
            &a.kb.join("passages.jsonl"),
            &a.kb.join("embeddings.safetensors"),
        )?;
        if a.resume {
            RagTrainer::resume(&a.out, mode, &index, train, dev)?
        } else {
            let model = a
                .model
                .as_deref()
                .context("--model or --generator is required unless --resume")?;
            RagTrainer::new(model, mode, &index, train, dev, &a.out, a.config())?
        }
    };
    let bar = rustrag::train::progress_bar(trainer.config.max_steps, trainer.step);
    let summary = trainer.run(None, |r| {
        bar.set_position(r.step);
        let tau = r
            .prior_temperature
            .map_or(String::new(), |t| format!(" | τ {t:.4}"));
        let cut = match r.cut_prompts + r.cut_answers {
            0 => String::new(),
            _ => format!(" | cut {}p/{}a", r.cut_prompts, r.cut_answers),
        };
        bar.set_message(format!(
            "loss {:.4} | {:.0} tok/s{tau}{cut}",
            r.loss, r.tokens_per_s
        ));
    })?;
    bar.finish_and_clear();
    if json {
        outln!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        outln!(
            "trained {} steps: loss {} -> {} ({:.2} s/step)",
            summary.steps,
            summary.first_loss.map_or("-".into(), |l| format!("{l:.4}")),
            summary.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
            summary.mean_step_secs
        );
        for e in &summary.evals {
            outln!(
                "eval @ step {}: loss {:.4}, EM {:.1}, F1 {:.1}{}",
                e.step,
                e.eval_loss,
                e.em,
                e.f1,
                e.recall
                    .map_or(String::new(), |r| format!(", recall {r:.1}"))
            );
        }
        for s in &summary.index_swaps {
            outln!(
                "index re-embedded with step-{} weights, in use from step {} ({:.0} s)",
                s.weights_step,
                s.step,
                s.secs
            );
        }
        if let Some(c) = &summary.last_checkpoint {
            outln!("checkpoint: {}", c.display());
        }
        outln!("metrics: {}", summary.metrics.display());
        outln!("plot: {}", summary.plot.display());
    }
    Ok(())
}
