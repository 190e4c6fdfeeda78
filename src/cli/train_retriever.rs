//! `rustrag train retriever`: parse, call [`rustrag::train::retriever::RetrieverTrainer`], print.

use anyhow::Result;
use clap::{Parser, ValueEnum};
use rustrag::train::optim::AdamWConfig;
use rustrag::train::retriever::{
    Negatives, RetrieverData, RetrieverTrainConfig, RetrieverTrainer, Similarity,
};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum NegativesArg {
    InBatch,
    Bm25,
    Ance,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SimilarityArg {
    Dot,
    Cosine,
}

#[derive(Parser, Debug)]
pub struct RetrieverArgs {
    /// sentence-transformers directory (one shared tower) or DPRQuestionEncoder directory.
    /// Ignored with --resume.
    #[arg(long, required_unless_present = "resume")]
    pub encoder: Option<String>,
    /// DPRContextEncoder directory (DPR only).
    #[arg(long)]
    pub context_encoder: Option<String>,
    /// `rustrag index build` knowledge base embedded by the (context) encoder being trained.
    #[arg(long)]
    pub kb: PathBuf,
    /// BM25 index of the same passages [<kb>/bm25].
    #[arg(long)]
    pub bm25: Option<PathBuf>,
    /// Training JSONL: {"question", "gold_pid"} per line.
    #[arg(long)]
    pub train: PathBuf,
    /// Dev JSONL (same format) for recall@k over the whole knowledge base.
    #[arg(long)]
    pub dev: Option<PathBuf>,
    /// Output directory (metrics.jsonl, metrics.png, checkpoints/).
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its latest checkpoint (its stored settings win).
    #[arg(long)]
    pub resume: bool,
    #[arg(long, value_enum, default_value = "in-batch")]
    pub negatives: NegativesArg,
    /// Similarity [cosine × scale for sentence-transformers models, dot for DPR].
    #[arg(long, value_enum)]
    pub similarity: Option<SimilarityArg>,
    #[arg(long, default_value_t = 20.0)]
    pub scale: f64,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 100)]
    pub steps: u64,
    #[arg(long, default_value_t = 2e-5)]
    pub lr: f64,
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Global L2 gradient-norm clip; 0 disables.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Question token cap in training [the model's].
    #[arg(long)]
    pub max_query_length: Option<usize>,
    /// Passage token cap in training [the model's]; evaluation embeds passages as the KB does.
    #[arg(long)]
    pub max_passage_length: Option<usize>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Evaluate every N steps (0: at the start and the end only).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub save_every: u64,
    /// ANCE: re-embed the knowledge base in the background every N steps.
    #[arg(long, default_value_t = 50)]
    pub ance_refresh_every: u64,
}

impl RetrieverArgs {
    fn config(&self) -> RetrieverTrainConfig {
        RetrieverTrainConfig {
            negatives: match self.negatives {
                NegativesArg::InBatch => Negatives::InBatch,
                NegativesArg::Bm25 => Negatives::Bm25,
                NegativesArg::Ance => Negatives::Ance,
            },
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
            similarity: self.similarity.map(|s| match s {
                SimilarityArg::Dot => Similarity::Dot,
                SimilarityArg::Cosine => Similarity::Cosine,
            }),
            scale: self.scale,
            max_query_length: self.max_query_length,
            max_passage_length: self.max_passage_length,
            seed: self.seed,
            eval_every: self.eval_every,
            save_every: self.save_every,
            ance_refresh_every: self.ance_refresh_every,
            ..Default::default()
        }
    }
}

pub fn run(a: RetrieverArgs, json: bool) -> Result<()> {
    let data = RetrieverData {
        kb: &a.kb,
        bm25: a.bm25.as_deref(),
        train: &a.train,
        dev: a.dev.as_deref(),
    };
    let mut trainer = match &a.encoder {
        Some(_) if a.resume => RetrieverTrainer::resume(&a.out, &data)?,
        None => RetrieverTrainer::resume(&a.out, &data)?,
        Some(enc) => {
            RetrieverTrainer::new(enc, a.context_encoder.as_deref(), &data, &a.out, a.config())?
        }
    };
    let bar = rustrag::train::progress_bar(trainer.config.max_steps, trainer.step);
    let summary = trainer.run(None, |r| {
        bar.set_position(r.step);
        bar.set_message(format!("loss {:.4} | {:.1} q/s", r.loss, r.questions_per_s));
    })?;
    bar.finish_and_clear();
    if json {
        outln!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    outln!(
        "trained {} steps: loss {} -> {} ({:.2} s/step, {:.0} s training)",
        summary.steps,
        summary.first_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary.mean_step_secs,
        summary.train_secs
    );
    for s in &summary.index_swaps {
        outln!(
            "ANCE index from step {} swapped in at step {} ({:.0} s)",
            s.weights_step,
            s.step,
            s.secs
        );
    }
    for e in &summary.evals {
        let recall: Vec<String> = e
            .recall
            .iter()
            .map(|r| format!("R@{} {:.1}", r.k, r.recall))
            .collect();
        outln!(
            "eval @ step {} ({} questions): {}",
            e.step,
            e.questions,
            recall.join(", ")
        );
    }
    if let Some(c) = &summary.last_checkpoint {
        outln!("checkpoint: {}", c.display());
    }
    outln!("metrics: {}", summary.metrics.display());
    outln!("plot: {}", summary.plot.display());
    Ok(())
}
