//! One RAG training step of a decoder-only generator: rustrag's training path (RAG-Token loss over
//! n_docs prompts, backward, AdamW) against PyTorch + transformers on the same f32 weights (the GGUF
//! dequantized and saved as a HF directory), the same token ids, layers and threads.

use anyhow::{bail, Result};
use candle_core::Tensor;
use rustrag::generators::llama::LoraConfig;
use rustrag::rag::loss::NllOptions;
use rustrag::rag::pipeline::{
    open_decoder_only, save_decoder_only, DecoderTraining, WeightsChoice,
};
use rustrag::rag::{RagContext, RagMode};
use rustrag::tokenize::ids_tensor;
use rustrag::train::optim::{AdamW, AdamWConfig, GradAccumulator};
use std::path::PathBuf;
use std::time::Instant;

/// `rustrag bench train` options.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Decoder-only generator (GGUF file or HF directory).
    #[arg(long, default_value = "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub generator: PathBuf,
    /// Documents (prompts) per question.
    #[arg(long, default_value_t = 3)]
    pub docs: usize,
    /// Tokens per prompt.
    #[arg(long, default_value_t = 200)]
    pub prompt_tokens: usize,
    /// Answer tokens (EOS included).
    #[arg(long, default_value_t = 8)]
    pub answer_tokens: usize,
    /// Trainable top layers, comma-separated runs (the model's layer count = every layer; the
    /// embeddings stay frozen on both sides).
    #[arg(long, default_value = "6,30", value_delimiter = ',')]
    pub layers: Vec<usize>,
    /// LoRA runs: adapter ranks (alpha = 2 rank, every projection of every layer), comma-separated.
    /// The peer loads the same initial adapters with PEFT, so every step's loss must agree.
    #[arg(long, default_value = "16", value_delimiter = ',')]
    pub lora_ranks: Vec<usize>,
    /// Timed steps per run, after one untimed warm-up step.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
}

/// Deterministic token ids in `[100, vocab)`, the same on both sides (written to the peer).
fn token_ids(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            100 + ((x >> 33) % (vocab as u64 - 100)) as u32
        })
        .collect()
}

pub fn run(args: Args, peer: Option<&super::Peer>) -> Result<super::Report> {
    if args.docs == 0 || args.prompt_tokens == 0 || args.answer_tokens < 2 || args.steps == 0 {
        bail!("bench train: --docs, --prompt-tokens, --steps ≥ 1 and --answer-tokens ≥ 2");
    }
    let work = tempfile::tempdir()?;
    let hf_dir = work.path().join("generator");
    let mut runs = Vec::new();
    let mut peer_runs = Vec::new();
    let mut ratios = Vec::new();
    let trainings = args
        .layers
        .iter()
        .map(|&n| DecoderTraining::TopLayers(n))
        .chain(args.lora_ranks.iter().map(|&rank| {
            DecoderTraining::Lora(LoraConfig {
                rank,
                alpha: 2.0 * rank as f64,
                ..Default::default()
            })
        }));
    for training in trainings {
        let (label, peer_args) = match &training {
            DecoderTraining::TopLayers(n) => (
                format!("top {n} layers"),
                vec!["--layers".into(), n.to_string()],
            ),
            DecoderTraining::Lora(c) => {
                let dir = work.path().join(format!("lora-{}", c.rank));
                (
                    format!("LoRA rank {}", c.rank),
                    vec!["--adapter".into(), dir.display().to_string()],
                )
            }
            DecoderTraining::Frozen => unreachable!("bench train runs trainable models"),
        };
        let rag = open_decoder_only(&args.generator, WeightsChoice::F32, &training)?;
        let s = rag.generator.special_ids().clone();
        if !hf_dir.exists() {
            // The base weights in HF's layout, for the peer: a top-layer model saves them all; a
            // LoRA model saves only its adapters, so its untouched base is opened for that.
            match &training {
                DecoderTraining::Lora(_) => {
                    let base = DecoderTraining::TopLayers(0);
                    let base = open_decoder_only(&args.generator, WeightsChoice::F32, &base)?;
                    save_decoder_only(&base, &hf_dir)?
                }
                _ => save_decoder_only(&rag, &hf_dir)?,
            }
        }
        if let DecoderTraining::Lora(_) = &training {
            // The initial adapters, for the peer to start from the same point.
            save_decoder_only(&rag, std::path::Path::new(&peer_args[1]))?;
        }
        let prompts: Vec<Vec<u32>> = (0..args.docs)
            .map(|d| token_ids(args.prompt_tokens, d as u64 + 1, s.vocab_size))
            .collect();
        let mut labels = vec![s.decoder_start];
        labels.extend(token_ids(args.answer_tokens - 1, 99, s.vocab_size));
        labels.push(s.eos);
        let ctx = RagContext::new(
            ids_tensor(&prompts, &rag.device)?,
            Tensor::ones(
                (args.docs, args.prompt_tokens),
                candle_core::DType::U32,
                &rag.device,
            )?,
            Tensor::zeros((1, args.docs), candle_core::DType::F32, &rag.device)?,
        )?;
        let label_tensor = ids_tensor(std::slice::from_ref(&labels), &rag.device)?;
        let opts = NllOptions {
            reduce_loss: true,
            epsilon: 0.0,
            exclude_bos_score: false,
        };
        let vars = rag.trainable_vars(false);
        let mut opt = AdamW::new(
            vars.clone(),
            AdamWConfig {
                lr: 1e-5,
                ..Default::default()
            },
        )?;
        let (mut losses, mut secs) = (Vec::new(), Vec::new());
        for _ in 0..=args.steps {
            let t = Instant::now();
            let loss = rag.nll(
                &rag.forward(&ctx, &label_tensor)?,
                &ctx.prior_scores()?,
                &label_tensor,
                args.docs,
                &opts,
            )?;
            let mut acc = GradAccumulator::new(vars.iter().map(|(_, v)| v.clone()).collect());
            acc.add(&loss.backward()?)?;
            opt.step(&acc.take(), 1e-5)?;
            secs.push(t.elapsed().as_secs_f64());
            losses.push(loss.to_scalar::<f32>()? as f64);
        }
        let mean = secs[1..].iter().sum::<f64>() / args.steps as f64;
        runs.push(serde_json::json!({"training": label, "params": vars.len(),
            "loss_first_step": losses[0], "losses": losses, "step_s": secs, "mean_step_s": mean}));
        if let Some(peer) = peer {
            let input = work.path().join("input.json");
            std::fs::write(
                &input,
                serde_json::to_string(&serde_json::json!({"prompts": prompts, "labels": labels}))?,
            )?;
            let p = peer.run(
                "torch_train_step.py",
                &[
                    "--model".into(),
                    hf_dir.display().to_string(),
                    "--input".into(),
                    input.display().to_string(),
                    "--steps".into(),
                    args.steps.to_string(),
                ]
                .into_iter()
                .chain(peer_args)
                .collect::<Vec<_>>(),
            )?;
            let their_loss = p.get("loss_first_step").and_then(|v| v.as_f64());
            let their_step = p.get("mean_step_s").and_then(|v| v.as_f64());
            // The same first-step loss (before any update) shows both sides computed one thing.
            match (their_loss, their_step) {
                (Some(l), Some(t)) if (l - losses[0]).abs() <= 1e-4 * l.abs().max(1.0) => {
                    ratios.push((format!("train step, {label} (torch / rustrag)"), t / mean));
                }
                (Some(l), _) => tracing::warn!(
                    "first-step losses differ ({l} vs {}): no ratio for {label}",
                    losses[0]
                ),
                _ => bail!("torch peer reported no loss/timing: {p}"),
            }
            peer_runs.push(p);
        }
    }
    Ok(super::Report {
        benchmark: "train".into(),
        setup: serde_json::json!({"generator": args.generator, "mode": format!("{:?}", RagMode::Token),
            "docs": args.docs, "prompt_tokens": args.prompt_tokens, "answer_tokens": args.answer_tokens,
            "optimizer": "AdamW lr 1e-5", "timing": "mean of --steps steps (forward + backward + AdamW) after one warm-up",
            "threads": rayon::current_num_threads()}),
        rustrag: serde_json::json!(runs),
        peer: peer.map(|_| serde_json::json!(peer_runs)),
        ratios,
    })
}
