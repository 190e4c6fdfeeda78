//! sentence-transformers models (Reimers & Gurevych 2019) and plain BERT directories with a chosen
//! pooling: BERT -> pooling over non-padding tokens -> optional L2 normalisation.
//!
//! A sentence-transformers directory is read through `modules.json` (`Transformer`, `Pooling`,
//! `Normalize`); the pooling comes from `<pooling module>/config.json`; the token limit from
//! `sentence_bert_config.json`'s `max_seq_length` (all-MiniLM-L6-v2: 256), as sentence-transformers
//! does. The truncation/padding stored in `tokenizer.json` (128 / fixed 128 for all-MiniLM-L6-v2)
//! is NOT used: it is only the state the last tokenizer call left behind.

use super::bert::{self, BertConfig, BertModel, Pooling};
use super::dpr::{is_rag_dir, DprEncoder};
use super::{EncoderFingerprint, LoadOptions, TextEncoder};
use crate::hub::{self, Weights};
use crate::tokenize::{load_tokenizer, Encoded, Padding, TextTokenizer};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A BERT encoder with pooling and optional normalisation.
pub struct SentenceEncoder {
    pub bert: BertModel,
    pub tokenizer: TextTokenizer,
    /// Concatenated in this order (sentence-transformers' order: cls, max, mean, mean_sqrt_len).
    pub poolings: Vec<Pooling>,
    pub normalize: bool,
    /// Truncation limit (specials included).
    pub max_length: usize,
    pub batch_size: usize,
    /// `sentence-transformers` or `bert`.
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

/// The 1_Pooling/config.json flags.
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
}

/// Key prefix of a BERT body in a weight set: `""` (BertModel) or `bert.` (BertFor* heads).
fn bert_prefix(weights: &Weights) -> Result<&'static str> {
    ["", "bert.", "model."]
        .into_iter()
        .find(|p| weights.contains(&format!("{p}embeddings.word_embeddings.weight")))
        .with_context(|| {
            format!(
                "{}: no BERT weights (expected `embeddings.word_embeddings.weight`)",
                weights.origin().display()
            )
        })
}

impl SentenceEncoder {
    /// Load a sentence-transformers directory (with `modules.json`) or a plain BERT directory
    /// (`config.json` with `model_type: bert`, pooling from `opts.pooling`, default mean).
    pub fn load(path_or_id: &str, opts: &LoadOptions) -> Result<Self> {
        let dir = hub::resolve_model_dir(path_or_id)?;
        if dir.join("modules.json").is_file() {
            Self::load_sentence_transformers(&dir, opts)
        } else {
            let pooling = opts.pooling.unwrap_or(Pooling::Mean);
            Self::load_bert(
                &dir,
                vec![pooling],
                opts.normalize.unwrap_or(false),
                None,
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
        Self::load_bert(
            &tdir,
            poolings,
            normalize,
            max_seq_length,
            "sentence-transformers",
            opts,
        )
    }

    /// `max_seq_length`: the sentence-transformers limit; falls back to the tokenizer's
    /// `model_max_length`; both capped by `max_position_embeddings`; `opts.max_length` wins.
    fn load_bert(
        dir: &Path,
        poolings: Vec<Pooling>,
        normalize: bool,
        max_seq_length: Option<usize>,
        kind: &'static str,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config: serde_json::Value = hub::read_json(&config_path)?;
        match config.get("model_type").and_then(|v| v.as_str()) {
            Some("bert") | None => {}
            Some(other) => bail!(
                "{}: model_type `{other}` is not supported (bert)",
                config_path.display()
            ),
        }
        let cfg = BertConfig::from_value(&config, &config_path.display().to_string())?;
        let tokenizer = load_tokenizer(dir)?;
        tokenizer.check_vocab(cfg.vocab_size, &config_path)?;
        let files = hub::weight_files(dir)?;
        let weights = Weights::from_dir(dir, bert::DTYPE, &opts.device, opts.trainable)?;
        let prefix = bert_prefix(&weights)?;
        let vb = weights.var_builder(bert::DTYPE, &opts.device);
        let vb = if prefix.is_empty() {
            vb
        } else {
            vb.pp(prefix.trim_end_matches('.'))
        };
        let mut bert = BertModel::load(&cfg, vb, kind == "bert").with_context(|| {
            let list: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
            format!("loading BERT weights from {}", list.join(", "))
        })?;
        super::configure_bert(&mut bert, opts)?;
        let max_length = opts
            .max_length
            .or(max_seq_length)
            .unwrap_or(tokenizer.max_length)
            .min(cfg.max_position_embeddings);
        Ok(Self {
            bert,
            tokenizer,
            poolings,
            normalize,
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

    /// The weights the BERT body was built from, by their names in the weight file (trainable
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
            .bert
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
        let pad = bert::pad_id(&self.tokenizer, &self.bert.config);
        bert::run_sorted_batches(enc, self.batch_size, pad, &self.device, |b| {
            self.encode_ids(&b.input_ids, &b.attention_mask, Some(&b.token_type_ids))
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}

fn read_pooling(path: &Path) -> Result<Vec<Pooling>> {
    let cfg: PoolingConfig = hub::read_json(path)?;
    if cfg.pooling_mode_weightedmean_tokens || cfg.pooling_mode_lasttoken {
        bail!(
            "{}: weighted-mean and last-token pooling are not supported",
            path.display()
        );
    }
    let mut out = Vec::new();
    for (on, p) in [
        (cfg.pooling_mode_cls_token, Pooling::Cls),
        (cfg.pooling_mode_max_tokens, Pooling::Max),
        (cfg.pooling_mode_mean_tokens, Pooling::Mean),
        (cfg.pooling_mode_mean_sqrt_len_tokens, Pooling::MeanSqrtLen),
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
    fn encode_texts(&self, texts: &[&str]) -> Result<Tensor> {
        if texts.is_empty() {
            return Ok(Tensor::zeros((0, self.dim()), bert::DTYPE, &self.device)?);
        }
        let enc = self.tokenize(texts)?;
        self.encode_encoded(&enc)
    }

    fn dim(&self) -> usize {
        self.bert.hidden_size() * self.poolings.len()
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
            int8: self.bert.is_int8(),
        }
    }
}

/// Load any supported encoder from a directory or cached hub id, detecting its kind:
/// a RAG checkpoint or `DPRQuestionEncoder`/`DPRContextEncoder` -> [`DprEncoder`];
/// `modules.json` -> sentence-transformers; a plain BERT `config.json` -> [`SentenceEncoder`] with
/// `opts.pooling` (default mean).
pub fn load_encoder(path_or_id: &str, opts: &LoadOptions) -> Result<Box<dyn TextEncoder>> {
    let dir = hub::resolve_model_dir(path_or_id)?;
    let dir_str = dir.display().to_string();
    if dir.join("modules.json").is_file() {
        return Ok(Box::new(SentenceEncoder::load(&dir_str, opts)?));
    }
    let config_path = dir.join("config.json");
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
    if model_type == "bert" || arch.starts_with("Bert") {
        return Ok(Box::new(SentenceEncoder::load(&dir_str, opts)?));
    }
    bail!(
        "{}: unknown encoder (model_type `{model_type}`, architecture `{arch}`); supported: DPR, RAG, sentence-transformers, BERT",
        config_path.display()
    )
}
