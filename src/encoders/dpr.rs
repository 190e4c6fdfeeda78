//! DPR question / context encoders (Karpukhin et al. 2020) as HF's `DPRQuestionEncoder` and
//! `DPRContextEncoder`: a BERT body without pooler; the pooled output is the `[CLS]` vector of the
//! last layer, followed by `encode_proj` when `projection_dim > 0`.
//!
//! Loads a standalone `save_pretrained` directory (keys `question_encoder.bert_model.*` /
//! `ctx_encoder.bert_model.*`) or the question encoder nested in an HF RAG checkpoint (keys
//! `rag.question_encoder.question_encoder.bert_model.*`, config = `question_encoder` of the
//! RAG config.json, tokenizer in `question_encoder_tokenizer/`).

use super::bert::{self, BertConfig, BertModel, Linear, Pooling};
use super::{EncoderFingerprint, LoadOptions, TextEncoder};
use crate::hub::{self, Weights};
use crate::tokenize::{load_tokenizer, Encoded, Padding, TextTokenizer};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Which DPR tower a checkpoint holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DprKind {
    Question,
    Context,
}

impl DprKind {
    /// The module name HF uses as key prefix (`question_encoder` / `ctx_encoder`).
    pub fn module(&self) -> &'static str {
        match self {
            Self::Question => "question_encoder",
            Self::Context => "ctx_encoder",
        }
    }
}

/// A DPR question or context encoder.
pub struct DprEncoder {
    pub bert: BertModel,
    projection: Option<Linear>,
    pub tokenizer: TextTokenizer,
    pub kind: DprKind,
    /// Truncation limit for texts (tokenizer `model_max_length`, capped by the position table).
    pub max_length: usize,
    pub batch_size: usize,
    weights: Weights,
    /// Key prefix of this encoder inside `weights`, ending in `.`.
    prefix: String,
    source: String,
    weight_files: Vec<PathBuf>,
    sha256: OnceLock<String>,
    device: Device,
}

/// `architectures[0]` of a config, if any.
fn architecture(config: &serde_json::Value) -> Option<&str> {
    config.get("architectures")?.as_array()?.first()?.as_str()
}

/// True when `dir/config.json` declares a RAG model (`model_type: rag` or a `Rag*` architecture).
pub fn is_rag_dir(config: &serde_json::Value) -> bool {
    config.get("model_type").and_then(|v| v.as_str()) == Some("rag")
        || architecture(config).is_some_and(|a| a.starts_with("Rag"))
}

impl DprEncoder {
    /// Load a `DPRQuestionEncoder` / `DPRContextEncoder` directory, or a RAG checkpoint directory
    /// (its question encoder). `path_or_id` may be a cached hub id.
    pub fn load(path_or_id: &str, opts: &LoadOptions) -> Result<Self> {
        let dir = hub::resolve_model_dir(path_or_id)?;
        let config_path = dir.join("config.json");
        let config: serde_json::Value = hub::read_json(&config_path)?;
        if is_rag_dir(&config) {
            return Self::load_from_rag(&dir, opts);
        }
        let kind = match architecture(&config) {
            Some("DPRQuestionEncoder") => DprKind::Question,
            Some("DPRContextEncoder") => DprKind::Context,
            Some(other) => bail!(
                "{}: architecture `{other}` is not a DPR encoder (DPRQuestionEncoder or DPRContextEncoder)",
                config_path.display()
            ),
            None => bail!("{}: no `architectures` field: cannot tell a DPR question from a context encoder", config_path.display()),
        };
        let files = hub::weight_files(&dir)?;
        let weights = Weights::from_dir(&dir, bert::DTYPE, &opts.device, opts.trainable)?;
        let tokenizer = load_tokenizer(&dir)?;
        let prefix = format!("{}.", kind.module());
        Self::new(
            &config,
            &config_path,
            weights,
            &prefix,
            kind,
            tokenizer,
            dir.display().to_string(),
            files,
            opts,
        )
    }

    /// The question encoder of a RAG checkpoint directory (`config.json` with a `question_encoder`
    /// sub-config, `model.safetensors` with `rag.question_encoder.*` keys).
    pub fn load_from_rag(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let weights = Weights::from_dir(dir, bert::DTYPE, &opts.device, opts.trainable)?;
        Self::from_rag_weights(dir, weights, opts)
    }

    /// The question encoder of a RAG checkpoint whose weights are already loaded (shared with the
    /// generator, e.g. for training the whole RAG model).
    pub fn from_rag_weights(dir: &Path, weights: Weights, opts: &LoadOptions) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config: serde_json::Value = hub::read_json(&config_path)?;
        let qe = config.get("question_encoder").with_context(|| {
            format!(
                "{}: no `question_encoder` sub-config",
                config_path.display()
            )
        })?;
        let tok_dir = dir.join("question_encoder_tokenizer");
        let tokenizer = load_tokenizer(if tok_dir.is_dir() { &tok_dir } else { dir })?;
        let prefix = ["rag.question_encoder.question_encoder.", "question_encoder.question_encoder."]
            .into_iter()
            .find(|p| weights.contains(&format!("{p}bert_model.embeddings.word_embeddings.weight")))
            .with_context(|| {
                format!(
                    "{}: no question encoder weights (expected keys `rag.question_encoder.question_encoder.bert_model.*`)",
                    weights.origin().display()
                )
            })?;
        let files = hub::weight_files(dir).unwrap_or_default();
        let origin = format!("{} (question_encoder)", config_path.display());
        Self::new(
            qe,
            Path::new(&origin),
            weights,
            prefix,
            DprKind::Question,
            tokenizer,
            dir.display().to_string(),
            files,
            opts,
        )
    }

    /// Build from a parsed DPR config and weights whose keys start with `prefix`
    /// (`<prefix>bert_model.*`, optional `<prefix>encode_proj.*`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &serde_json::Value,
        config_path: &Path,
        weights: Weights,
        prefix: &str,
        kind: DprKind,
        tokenizer: TextTokenizer,
        source: String,
        weight_files: Vec<PathBuf>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let origin = config_path.display().to_string();
        let cfg = BertConfig::from_value(config, &origin)?;
        tokenizer.check_vocab(cfg.vocab_size, config_path)?;
        let projection_dim = config
            .get("projection_dim")
            .and_then(|v| v.as_u64())
            .unwrap_or(0) as usize;
        let vb = weights
            .var_builder(bert::DTYPE, &opts.device)
            .pp(prefix.trim_end_matches('.'));
        let files_list = || {
            let list: Vec<String> = weight_files
                .iter()
                .map(|f| f.display().to_string())
                .collect();
            list.join(", ")
        };
        let mut bert = BertModel::load(&cfg, vb.pp("bert_model"), false)
            .with_context(|| format!("loading `{prefix}bert_model.*` from {}", files_list()))?;
        super::configure_model(&mut bert, opts)?;
        let projection = if projection_dim > 0 {
            let proj = Linear::load(cfg.hidden_size, projection_dim, vb.pp("encode_proj"))
                .with_context(|| {
                    format!("loading `{prefix}encode_proj.*` from {}", files_list())
                })?;
            Some(proj)
        } else {
            None
        };
        let max_length = opts
            .max_length
            .unwrap_or(tokenizer.max_length)
            .min(cfg.max_position_embeddings);
        Ok(Self {
            bert,
            projection,
            tokenizer,
            kind,
            max_length,
            batch_size: opts.batch_size.max(1),
            weights,
            prefix: prefix.to_string(),
            source,
            weight_files,
            sha256: OnceLock::new(),
            device: opts.device.clone(),
        })
    }

    /// Pooled output for token ids: `input_ids, attention_mask, token_type_ids: [b, l]` u32 ->
    /// `[b, d]` (`d` = projection_dim if > 0 else hidden size). Differentiable.
    /// `attention_mask` None: inferred as `input_ids != pad_token_id` (as HF DPR does).
    pub fn encode_ids(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        token_type_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        let inferred;
        let mask = match attention_mask {
            Some(m) => m,
            None => {
                let pad = self.bert.config.pad_token_id.unwrap_or(0);
                inferred = input_ids.ne(pad)?.to_dtype(candle_core::DType::U32)?;
                &inferred
            }
        };
        let hidden = self.bert.forward(input_ids, mask, token_type_ids)?;
        let cls = Pooling::Cls.apply(&hidden, mask)?;
        Ok(match &self.projection {
            Some(p) => p.forward(&cls)?,
            None => cls,
        })
    }

    /// Tokenize texts as HF's DPR tokenizer does (`truncation=True`, no padding).
    pub fn tokenize(&self, texts: &[&str]) -> Result<Encoded> {
        self.tokenizer
            .encode_batch(texts, true, Some(self.max_length), Padding::None)
    }

    /// Tokenize `(title, text)` pairs: `[CLS] title [SEP] text [SEP]`, `longest_first` truncation.
    pub fn tokenize_pairs(&self, titles: &[&str], texts: &[&str]) -> Result<Encoded> {
        if titles.len() != texts.len() {
            bail!("{} titles but {} texts", titles.len(), texts.len());
        }
        let pairs: Vec<(&str, &str)> = titles.iter().copied().zip(texts.iter().copied()).collect();
        self.tokenizer
            .encode_pairs(&pairs, Some(self.max_length), Padding::None)
    }

    /// Encode context passages as the KB is built (`use_own_knowledge_dataset.py`): pair encoding,
    /// attention mask from padding, token_type_ids 0 everywhere. `[n, d]`.
    pub fn encode_pairs(&self, titles: &[&str], texts: &[&str]) -> Result<Tensor> {
        let enc = self.tokenize_pairs(titles, texts)?;
        self.encode_encoded(&enc, false)
    }

    /// Encode tokenized rows in sorted, padded batches; `with_token_types` passes the tokenizer's
    /// segment ids, else zeros. `[rows, d]` in row order.
    pub fn encode_encoded(&self, enc: &Encoded, with_token_types: bool) -> Result<Tensor> {
        let pad = bert::pad_id(&self.tokenizer, &self.bert.config);
        bert::run_sorted_batches(enc, self.batch_size, pad, &self.device, |b| {
            let types = with_token_types.then_some(&b.token_type_ids);
            self.encode_ids(&b.input_ids, Some(&b.attention_mask), types)
        })
    }

    /// Output width: projection_dim if > 0, else hidden size.
    pub fn output_dim(&self) -> usize {
        match &self.projection {
            Some(p) => p.out_dim(),
            None => self.bert.hidden_size(),
        }
    }

    /// Trainable variables of this encoder by full weight name (empty unless loaded trainable).
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.weights
            .vars()
            .into_iter()
            .filter(|(n, _)| n.starts_with(&self.prefix))
            .collect()
    }

    /// The weights this encoder was built from (possibly shared with a RAG generator).
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}

impl TextEncoder for DprEncoder {
    fn encode_texts(&self, texts: &[&str]) -> Result<Tensor> {
        if texts.is_empty() {
            return Ok(Tensor::zeros((0, self.dim()), bert::DTYPE, &self.device)?);
        }
        let enc = self.tokenize(texts)?;
        self.encode_encoded(&enc, false)
    }

    fn encode_passages(&self, titles: &[&str], texts: &[&str]) -> Result<Tensor> {
        if texts.is_empty() {
            return Ok(Tensor::zeros((0, self.dim()), bert::DTYPE, &self.device)?);
        }
        self.encode_pairs(titles, texts)
    }

    fn dim(&self) -> usize {
        self.output_dim()
    }

    fn fingerprint(&self) -> EncoderFingerprint {
        EncoderFingerprint {
            source: self.source.clone(),
            kind: format!("dpr-{}", self.kind.module().trim_end_matches("_encoder")),
            dim: self.output_dim(),
            pooling: "cls".into(),
            normalized: false,
            weights_sha256: self
                .sha256
                .get_or_init(|| super::sha256_files(&self.weight_files))
                .clone(),
            int8: self.bert.is_int8(),
            prefixes: Default::default(),
        }
    }
}
