//! `rustrag embed`: embed texts with any supported encoder (DPR, RAG question encoder,
//! sentence-transformers, plain BERT) and print one vector per text.

use anyhow::{bail, Context, Result};
use rustrag::encoders::{load_encoder, LoadOptions, Pooling, Prefixes};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory or cached hub id (`org/name`).
    #[arg(long)]
    pub model: String,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Maximum tokens per text (default: the model's own limit, e.g. sentence_bert_config.json).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Pooling for a plain model directory: cls, mean, max, mean_sqrt_len, lasttoken (default mean).
    #[arg(long)]
    pub pooling: Option<String>,
    /// L2-normalise a plain BERT directory's vectors.
    #[arg(long)]
    pub normalize: bool,
    /// Run the linear layers in dynamic int8 (see `index build --int8`).
    #[arg(long)]
    pub int8: bool,
    /// Embed the texts as passages (the passage prefix) instead of queries (the query prefix).
    #[arg(long)]
    pub passages: bool,
    /// Query prefix instead of the model's `config_sentence_transformers.json` prompts
    /// (E5: "query: ").
    #[arg(long)]
    pub query_prefix: Option<String>,
    /// Passage prefix instead of the model's prompts (E5: "passage: ").
    #[arg(long)]
    pub passage_prefix: Option<String>,
    /// Read texts from this file, one per line (empty lines skipped).
    #[arg(long, conflicts_with = "texts")]
    pub file: Option<PathBuf>,
    /// Texts to embed.
    pub texts: Vec<String>,
}

pub fn run(args: Args, json: bool) -> Result<()> {
    let texts: Vec<String> = match &args.file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading {}", f.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(String::from)
            .collect(),
        None => args.texts.clone(),
    };
    if texts.is_empty() {
        bail!("no texts: pass TEXT... or --file F");
    }
    let opts = LoadOptions {
        batch_size: args.batch_size.max(1),
        max_length: args.max_length,
        pooling: args.pooling.as_deref().map(Pooling::parse).transpose()?,
        normalize: args.normalize.then_some(true),
        int8: args.int8,
        prefixes: (args.query_prefix.is_some() || args.passage_prefix.is_some()).then(|| {
            Prefixes {
                query: args.query_prefix.clone().unwrap_or_default(),
                passage: args.passage_prefix.clone().unwrap_or_default(),
                source: "flag".into(),
            }
        }),
        ..Default::default()
    };
    super::index::refuse_generator_file(&args.model)?;
    let encoder = load_encoder(&args.model, &opts)?;
    let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
    let t0 = std::time::Instant::now();
    let vectors = match args.passages {
        true => encoder.encode_passages(&vec![""; refs.len()], &refs)?,
        false => encoder.encode_texts(&refs)?,
    }
    .to_vec2::<f32>()?;
    tracing::info!(
        texts = texts.len(),
        secs = t0.elapsed().as_secs_f64(),
        "embedded"
    );
    if json {
        let out = serde_json::json!({
            "model": args.model,
            "dim": encoder.dim(),
            "fingerprint": encoder.fingerprint(),
            "embeddings": vectors,
        });
        outln!("{}", serde_json::to_string(&out)?);
    } else {
        for v in &vectors {
            let row: Vec<String> = v.iter().map(|x| format!("{x:.6}")).collect();
            outln!("{}", row.join(" "));
        }
    }
    Ok(())
}
