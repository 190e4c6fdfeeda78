//! sentence-transformers models (Reimers & Gurevych 2019) and plain encoder directories with a
//! chosen pooling: body ([`Family`]: BERT, RoBERTa/XLM-R, MPNet) -> pooling over non-padding
//! tokens -> optional L2 normalisation.
//!
//! A sentence-transformers directory is read through `modules.json` (`Transformer`, `Pooling`,
//! `Normalize`); the pooling comes from `<pooling module>/config.json` (the legacy
//! `pooling_mode_*_tokens` flags, or sentence-transformers 6's `pooling_mode` list); the token limit
//! from `sentence_bert_config.json`'s `max_seq_length` (all-MiniLM-L6-v2: 256), as
//! sentence-transformers does; instruction prefixes from `config_sentence_transformers.json`'s
//! `prompts` (`query`; `passage`, `document` or `corpus`), prepended to queries
//! ([`TextEncoder::encode_texts`]) and passages ([`TextEncoder::encode_passages`]) as
//! `encode(..., prompt_name=...)` does. The truncation/padding stored in `tokenizer.json` (128 /
//! fixed 128 for all-MiniLM-L6-v2) is NOT used: it is only the state the last tokenizer call left
//! behind.

use super::bert::{self, Pooling};
use super::dpr::{is_rag_dir, DprEncoder};
use super::TextEncoder;
use super::{EncoderFingerprint, EncoderModel, Family, LoadOptions, Prefixes};
use crate::hub::{self, Weights};
use crate::tokenize::{load_tokenizer, Encoded, Padding, TextTokenizer};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A transformer encoder with pooling, optional normalisation and instruction prefixes.
pub struct SentenceEncoder {
    pub model: Box<dyn EncoderModel>,
    pub family: Family,
    pub tokenizer: TextTokenizer,
    /// Concatenated in this order (legacy configs: cls, max, mean, mean_sqrt_len, lasttoken;
    /// `pooling_mode` lists: their order).
    pub poolings: Vec<Pooling>,
    pub normalize: bool,
    /// Prepended to queries and passages.
    pub prefixes: Prefixes,
    /// Truncation limit (specials included).
    pub max_length: usize,
    pub batch_size: usize,
    /// `sentence-transformers` or `bert` (a plain model directory of any family).
    kind: &'static str,
    source: String,
    weight_files: Vec<PathBuf>,
    sha256: OnceLock<String>,
    device: Device,
    weights: Weights,
}

#[derive(serde::Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

/// The 1_Pooling/config.json flags (legacy) or mode list (sentence-transformers 6).
#[derive(serde::Deserialize, Default)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
    /// `"mean"` or `["max", "lasttoken"]`.
    #[serde(default)]
    pooling_mode: Option<serde_json::Value>,
    /// false: prompt tokens are left out of the pooling (INSTRUCTOR); not supported.
    #[serde(default = "yes")]
    include_prompt: bool,
}

fn yes() -> bool {
    true
}

impl SentenceEncoder {
    /// Load a sentence-transformers directory (with `modules.json`) or a plain model directory
    /// (`config.json` with a [`Family::SUPPORTED`] `model_type`, pooling from `opts.pooling`,
    /// default mean).
    pub fn load(path_or_id: &str, opts: &LoadOptions) -> Result<Self> {
        let dir = hub::resolve_model_dir(path_or_id)?;
        if dir.join("modules.json").is_file() {
            Self::load_sentence_transformers(&dir, opts)
        } else {
            let pooling = opts.pooling.unwrap_or(Pooling::Mean);
            let prefixes = opts.prefixes.clone().unwrap_or_default();
            Self::load_body(
                &dir,
                vec![pooling],
                opts.normalize.unwrap_or(false),
                None,
                prefixes,
                "bert",
                opts,
            )
        }
    }

    fn load_sentence_transformers(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let modules_path = dir.join("modules.json");
        let modules: Vec<ModuleEntry> = hub::read_json(&modules_path)?;
        let mut transformer_dir = None;
        let mut poolings = None;
        let mut normalize = false;
        for m in &modules {
            let short = m.kind.rsplit('.').next().unwrap_or(&m.kind);
            let mdir = dir.join(&m.path);
            match short {
                "Transformer" => transformer_dir = Some(mdir),
                "Pooling" => poolings = Some(read_pooling(&mdir.join("config.json"))?),
                "Normalize" => normalize = true,
                other => bail!(
                    "{}: module `{other}` ({}) is not supported (Transformer, Pooling, Normalize)",
                    modules_path.display(),
                    m.kind
                ),
            }
        }
        let tdir = transformer_dir.with_context(|| {
            format!(
                "{}: no sentence_transformers.models.Transformer module",
                modules_path.display()
            )
        })?;
        let poolings = poolings.with_context(|| {
            format!(
                "{}: no sentence_transformers.models.Pooling module",
                modules_path.display()
            )
        })?;
        let st_config = tdir.join("sentence_bert_config.json");
        let max_seq_length = if st_config.is_file() {
            let v: serde_json::Value = hub::read_json(&st_config)?;
            v.get("max_seq_length")
                .and_then(|m| m.as_u64())
                .map(|m| m as usize)
        } else {
            None
        };
        let prefixes = match &opts.prefixes {
            Some(p) => p.clone(),
            None => read_prompts(dir)?,
        };
        Self::load_body(
            &tdir,
            poolings,
            normalize,
            max_seq_length,
            prefixes,
            "sentence-transformers",
            opts,
        )
    }

    /// `max_seq_length`: the sentence-transformers limit; falls back to the tokenizer's
    /// `model_max_length`; both capped by the model's positions; `opts.max_length` wins.
    #[allow(clippy::too_many_arguments)]
    fn load_body(
        dir: &Path,
        poolings: Vec<Pooling>,
        normalize: bool,
        max_seq_length: Option<usize>,
        prefixes: Prefixes,
        kind: &'static str,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config: serde_json::Value = hub::read_json(&config_path)?;
        let family = Family::from_config(&config, &config_path)?;
        let vocab_size = config.get("vocab_size").and_then(|v| v.as_u64());
        let tokenizer = load_tokenizer(dir)?;
        if let Some(n) = vocab_size {
            tokenizer.check_vocab(n as usize, &config_path)?;
        }
        let files = hub::weight_files(dir)?;
        let weights = Weights::from_dir(dir, bert::DTYPE, &opts.device, opts.trainable)?;
        let mut model = (family)
            .load(
                &config,
                &config_path,
                &weights,
                &opts.device,
                kind == "bert",
            )
            .with_context(|| {
                let list: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
                format!("loading {} weights from {}", family.name(), list.join(", "))
            })?;
        super::configure_model(model.as_mut(), opts)?;
        let max_length = opts
            .max_length
            .or(max_seq_length)
            .unwrap_or(tokenizer.max_length)
            .min(model.max_tokens());
        Ok(Self {
            model,
            family,
            tokenizer,
            poolings,
            normalize,
            prefixes,
            max_length,
            batch_size: opts.batch_size.max(1),
            kind,
            source: dir.display().to_string(),
            weight_files: files,
            sha256: OnceLock::new(),
            device: opts.device.clone(),
            weights,
        })
    }

    /// The weights the body was built from, by their names in the weight file (trainable
    /// `Var`s when loaded with [`LoadOptions::trainable`]): for training and saving.
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Tokenize with truncation at [`Self::max_length`], unpadded.
    pub fn tokenize(&self, texts: &[&str]) -> Result<Encoded> {
        self.tokenizer
            .encode_batch(texts, true, Some(self.max_length), Padding::None)
    }

    /// Pooled (and, if configured, normalised) vectors for one padded batch: `[b, l]` -> `[b, d]`.
    pub fn encode_ids(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        token_type_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        let hidden = self
            .model
            .forward(input_ids, attention_mask, token_type_ids)?;
        let pooled = self.pool(&hidden, attention_mask)?;
        if self.normalize {
            bert::l2_normalize(&pooled)
        } else {
            Ok(pooled)
        }
    }

    /// The configured poolings of `hidden: [b, l, h]`, concatenated: `[b, h * poolings]`.
    pub fn pool(&self, hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let parts = self
            .poolings
            .iter()
            .map(|p| p.apply(hidden, attention_mask))
            .collect::<Result<Vec<_>>>()?;
        Ok(if parts.len() == 1 {
            parts.into_iter().next().context("no pooling")?
        } else {
            Tensor::cat(&parts, 1)?
        })
    }

    /// Encode tokenized rows in length-sorted padded batches; `[rows, d]` in row order.
    pub fn encode_encoded(&self, enc: &Encoded) -> Result<Tensor> {
        let pad = self.pad_id();
        bert::run_sorted_batches(enc, self.batch_size, pad, &self.device, |b| {
            self.encode_ids(&b.input_ids, &b.attention_mask, Some(&b.token_type_ids))
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The id padding is filled with (tokenizer's, else the model's `pad_token_id`, else 0).
    pub fn pad_id(&self) -> u32 {
        bert::pad_id(&self.tokenizer, self.model.config())
    }

    /// Tokenize `prefix + text` for each text and encode: `[texts, d]`.
    fn encode_prefixed(&self, prefix: &str, texts: &[&str]) -> Result<Tensor> {
        if texts.is_empty() {
            return Ok(Tensor::zeros((0, self.dim()), bert::DTYPE, &self.device)?);
        }
        let enc = if prefix.is_empty() {
            self.tokenize(texts)?
        } else {
            let owned: Vec<String> = texts.iter().map(|t| format!("{prefix}{t}")).collect();
            self.tokenize(&owned.iter().map(|s| s.as_str()).collect::<Vec<_>>())?
        };
        self.encode_encoded(&enc)
    }
}

/// Instruction prefixes from `<dir>/config_sentence_transformers.json` `prompts`: `query` for
/// queries; `passage`, else `document`, else `corpus` for passages (the names E5, BGE and
/// sentence-transformers use). None there: no prefixes.
fn read_prompts(dir: &Path) -> Result<Prefixes> {
    let path = dir.join("config_sentence_transformers.json");
    if !path.is_file() {
        return Ok(Prefixes::default());
    }
    let v: serde_json::Value = hub::read_json(&path)?;
    let Some(prompts) = v.get("prompts").filter(|p| !p.is_null()) else {
        return Ok(Prefixes::default());
    };
    let prompts = prompts
        .as_object()
        .with_context(|| format!("{}: `prompts` is not an object", path.display()))?;
    let get = |names: &[&str]| -> Result<String> {
        for name in names {
            if let Some(p) = prompts.get(*name) {
                let p = p.as_str().with_context(|| {
                    format!("{}: prompts.{name} is not a string", path.display())
                })?;
                if !p.is_empty() {
                    return Ok(p.to_string());
                }
            }
        }
        Ok(String::new())
    };
    let mut prefixes = Prefixes {
        query: get(&["query"])?,
        passage: get(&["passage", "document", "corpus"])?,
        source: String::new(),
    };
    if !prefixes.is_empty() {
        prefixes.source = format!("{} prompts", path.display());
    }
    Ok(prefixes)
}

fn read_pooling(path: &Path) -> Result<Vec<Pooling>> {
    let cfg: PoolingConfig = hub::read_json(path)?;
    if !cfg.include_prompt {
        bail!(
            "{}: include_prompt false (prompt tokens left out of the pooling) is not supported",
            path.display()
        );
    }
    let mut out = Vec::new();
    if let Some(modes) = &cfg.pooling_mode {
        let names: Vec<&str> = match modes {
            serde_json::Value::String(s) => vec![s.as_str()],
            serde_json::Value::Array(a) => a.iter().filter_map(|m| m.as_str()).collect(),
            _ => vec![],
        };
        if names.is_empty() {
            bail!(
                "{}: pooling_mode {modes} is not a mode or a list of modes",
                path.display()
            );
        }
        for name in names {
            out.push(Pooling::parse(name).with_context(|| path.display().to_string())?);
        }
        return Ok(out);
    }
    if cfg.pooling_mode_weightedmean_tokens {
        bail!("{}: weighted-mean pooling is not supported", path.display());
    }
    for (on, p) in [
        (cfg.pooling_mode_cls_token, Pooling::Cls),
        (cfg.pooling_mode_max_tokens, Pooling::Max),
        (cfg.pooling_mode_mean_tokens, Pooling::Mean),
        (cfg.pooling_mode_mean_sqrt_len_tokens, Pooling::MeanSqrtLen),
        (cfg.pooling_mode_lasttoken, Pooling::LastToken),
    ] {
        if on {
            out.push(p);
        }
    }
    if out.is_empty() {
        bail!("{}: no pooling mode is enabled", path.display());
    }
    Ok(out)
}

impl TextEncoder for SentenceEncoder {
    /// Queries (and any other text): the query prefix, if any, is prepended.
    fn encode_texts(&self, texts: &[&str]) -> Result<Tensor> {
        self.encode_prefixed(&self.prefixes.query, texts)
    }

    /// `passage prefix + title + " " + text` per passage.
    fn encode_passages(&self, titles: &[&str], texts: &[&str]) -> Result<Tensor> {
        let joined = super::joined_passages(titles, texts)?;
        let refs: Vec<&str> = joined.iter().map(|s| s.as_str()).collect();
        self.encode_prefixed(&self.prefixes.passage, &refs)
    }

    fn dim(&self) -> usize {
        self.model.hidden_size() * self.poolings.len()
    }

    fn fingerprint(&self) -> EncoderFingerprint {
        EncoderFingerprint {
            source: self.source.clone(),
            kind: self.kind.into(),
            dim: self.dim(),
            pooling: self
                .poolings
                .iter()
                .map(|p| p.name())
                .collect::<Vec<_>>()
                .join("+"),
            normalized: self.normalize,
            weights_sha256: self
                .sha256
                .get_or_init(|| super::sha256_files(&self.weight_files))
                .clone(),
            int8: self.model.is_int8(),
            prefixes: self.prefixes.clone(),
        }
    }
}

/// Load any supported encoder from a directory or cached hub id, detecting its kind:
/// a RAG checkpoint or `DPRQuestionEncoder`/`DPRContextEncoder` -> [`DprEncoder`];
/// `modules.json` -> sentence-transformers; a plain `config.json` of a [`Family`] ->
/// [`SentenceEncoder`] with `opts.pooling` (default mean).
pub fn load_encoder(path_or_id: &str, opts: &LoadOptions) -> Result<Box<dyn TextEncoder>> {
    let dir = hub::resolve_model_dir(path_or_id)?;
    let dir_str = dir.display().to_string();
    let config_path = dir.join("config.json");
    if dir.join("modules.json").is_file() && !super::rerank::is_cross_encoder_dir(&dir) {
        return Ok(Box::new(SentenceEncoder::load(&dir_str, opts)?));
    }
    let config: serde_json::Value = hub::read_json(&config_path)?;
    let arch = config
        .get("architectures")
        .and_then(|a| a.as_array())
        .and_then(|a| a.first())
        .and_then(|a| a.as_str())
        .unwrap_or("");
    let model_type = config
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    if is_rag_dir(&config) || arch.starts_with("DPR") || model_type == "dpr" {
        return Ok(Box::new(DprEncoder::load(&dir_str, opts)?));
    }
    if arch.ends_with("ForSequenceClassification") {
        bail!(
            "{}: `{arch}` is a cross-encoder (it scores pairs, it does not embed texts); pass it as `--rerank`",
            config_path.display()
        );
    }
    let known_family = !model_type.is_empty() && Family::from_config(&config, &config_path).is_ok();
    if known_family || model_type.is_empty() && arch.starts_with("Bert") {
        return Ok(Box::new(SentenceEncoder::load(&dir_str, opts)?));
    }
    bail!(
        "{}: unknown encoder (model_type `{model_type}`, architecture `{arch}`); supported: DPR, RAG, sentence-transformers, and model_type {}",
        config_path.display(),
        Family::SUPPORTED
    )
}
