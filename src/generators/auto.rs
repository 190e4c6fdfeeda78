//! Loading a seq2seq generator by what its `config.json` says it is: a plain HF BART/T5 directory (or a
//! cached hub id), or the generator nested in an HF RAG checkpoint (`config.json` with a `generator`
//! sub-config, weights `rag.generator.*`, tokenizer in `generator_tokenizer/`).

use super::bart::{BartConfig, BartForConditionalGeneration};
use super::t5::{T5Config, T5ForConditionalGeneration};
use super::Seq2Seq;
use crate::hub::{read_json, resolve_model_dir, Weights};
use crate::tokenize::{load_tokenizer, TextTokenizer};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The seq2seq architectures this crate implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seq2SeqKind {
    Bart,
    T5,
}

/// Where a generator lives inside a model directory.
#[derive(Clone, Debug)]
pub struct GeneratorLayout {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    /// The generator's own config (the `generator` sub-config of a RAG checkpoint).
    pub config: Value,
    /// Weight-name prefix: `""` or `"rag.generator"`.
    pub prefix: &'static str,
    /// The directory holding the generator's `tokenizer.json`.
    pub tokenizer_dir: PathBuf,
    pub kind: Seq2SeqKind,
}

fn is_rag(config: &Value) -> bool {
    config.get("model_type").and_then(Value::as_str) == Some("rag")
        || config
            .get("architectures")
            .and_then(Value::as_array)
            .is_some_and(|a| {
                a.iter()
                    .any(|s| s.as_str().is_some_and(|s| s.starts_with("Rag")))
            })
}

/// Decide the architecture from `model_type`, falling back to `architectures[0]`.
fn kind_of(config: &Value, config_path: &Path, field: &str) -> Result<Seq2SeqKind> {
    if let Some(mt) = config.get("model_type").and_then(Value::as_str) {
        return match mt {
            "bart" => Ok(Seq2SeqKind::Bart),
            // mT5 is the T5 v1.1 architecture (gated-gelu, untied head) with another vocabulary.
            "t5" | "mt5" => Ok(Seq2SeqKind::T5),
            other => bail!(
                "{}: unsupported generator architecture `{other}` in field `{field}model_type` (supported: bart, t5, mt5)",
                config_path.display()
            ),
        };
    }
    let arch = config
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str);
    match arch {
        Some("BartForConditionalGeneration") => Ok(Seq2SeqKind::Bart),
        Some("T5ForConditionalGeneration" | "MT5ForConditionalGeneration") => Ok(Seq2SeqKind::T5),
        Some(other) => bail!(
            "{}: unsupported generator architecture `{other}` in field `{field}architectures` \
             (supported: BartForConditionalGeneration, T5ForConditionalGeneration, MT5ForConditionalGeneration)",
            config_path.display()
        ),
        None => bail!(
            "{}: no `{field}model_type` or `{field}architectures` field: cannot tell which generator this is",
            config_path.display()
        ),
    }
}

/// Find the generator of a local directory or cached hub id.
pub fn generator_layout(dir_or_id: &str) -> Result<GeneratorLayout> {
    let dir = resolve_model_dir(dir_or_id)?;
    let config_path = dir.join("config.json");
    let root: Value = read_json(&config_path)?;
    let (config, prefix, tokenizer_dir, field) = if is_rag(&root) {
        let g = root
            .get("generator")
            .filter(|g| g.is_object())
            .with_context(|| {
                format!(
                    "{}: RAG config has no `generator` sub-config",
                    config_path.display()
                )
            })?;
        (
            g.clone(),
            "rag.generator",
            dir.join("generator_tokenizer"),
            "generator.",
        )
    } else {
        (root, "", dir.clone(), "")
    };
    let kind = kind_of(&config, &config_path, field)?;
    Ok(GeneratorLayout {
        dir,
        config_path,
        config,
        prefix,
        tokenizer_dir,
        kind,
    })
}

/// Load a BART or T5 generator from an HF directory, a cached hub id, or an HF RAG checkpoint.
///
/// Floats are converted to `dtype`; with `trainable` every parameter is a `Var`
/// ([`Seq2Seq::vars`]). When the directory has the generator's `tokenizer.json`, its vocabulary is
/// checked against the model's `vocab_size`.
pub fn load_seq2seq(
    dir_or_id: &str,
    dtype: DType,
    device: &Device,
    trainable: bool,
) -> Result<Box<dyn Seq2Seq>> {
    let layout = generator_layout(dir_or_id)?;
    let within = if layout.prefix.is_empty() {
        ""
    } else {
        " in field `generator`"
    };
    let bad_config = || {
        format!(
            "{}: invalid {:?} config{within}",
            layout.config_path.display(),
            layout.kind
        )
    };
    // Parse the config before reading (possibly large) weights, so config errors come first.
    enum Parsed {
        Bart(BartConfig),
        T5(T5Config),
    }
    let parsed = match layout.kind {
        Seq2SeqKind::Bart => {
            Parsed::Bart(serde_json::from_value(layout.config.clone()).with_context(bad_config)?)
        }
        Seq2SeqKind::T5 => {
            Parsed::T5(serde_json::from_value(layout.config.clone()).with_context(bad_config)?)
        }
    };
    let weights = Weights::from_dir(&layout.dir, dtype, device, trainable)?;
    let model: Box<dyn Seq2Seq> = match parsed {
        Parsed::Bart(cfg) => Box::new(
            BartForConditionalGeneration::load(cfg, weights, layout.prefix, dtype, device)
                .with_context(|| format!("loading BART generator from {}", layout.dir.display()))?,
        ),
        Parsed::T5(cfg) => Box::new(
            T5ForConditionalGeneration::load(cfg, weights, layout.prefix, dtype, device)
                .with_context(|| format!("loading T5 generator from {}", layout.dir.display()))?,
        ),
    };
    if layout.tokenizer_dir.join("tokenizer.json").is_file() {
        let tok = load_tokenizer(&layout.tokenizer_dir)?;
        tok.check_vocab(model.special_ids().vocab_size, &layout.config_path)?;
    }
    Ok(model)
}

/// The generator's tokenizer (`tokenizer.json` beside the config, or `generator_tokenizer/` of a RAG
/// checkpoint).
pub fn load_generator_tokenizer(dir_or_id: &str) -> Result<TextTokenizer> {
    load_tokenizer(&generator_layout(dir_or_id)?.tokenizer_dir)
}
