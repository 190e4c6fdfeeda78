//! `RagConfig`: the HF RAG config.json (with its `question_encoder` / `generator` sub-configs) and the
//! generation settings RAG decoding reads (generation_config.json, the generator's config, and
//! transformers' global defaults, in that order).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// RAG settings of a checkpoint (`config.json` of `RagSequenceForGeneration` / `RagTokenForGeneration`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RagConfig {
    #[serde(default = "default_n_docs")]
    pub n_docs: usize,
    #[serde(default = "default_title_sep")]
    pub title_sep: String,
    #[serde(default = "default_doc_sep")]
    pub doc_sep: String,
    #[serde(default = "default_max_combined_length")]
    pub max_combined_length: usize,
    /// Prefix of every context string (HF passes `generator.config.prefix`; this top-level one is unused).
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub label_smoothing: f64,
    #[serde(default)]
    pub reduce_loss: bool,
    #[serde(default)]
    pub exclude_bos_score: bool,
    #[serde(default = "yes")]
    pub do_deduplication: bool,
    #[serde(default)]
    pub do_marginalize: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub retrieval_vector_size: Option<usize>,
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Raw sub-configs, handed to the encoder / generator loaders.
    pub question_encoder: Value,
    pub generator: Value,
    /// Every other field, kept so that saving writes the file back unchanged.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

fn default_n_docs() -> usize {
    5
}
fn default_title_sep() -> String {
    " / ".into()
}
fn default_doc_sep() -> String {
    " // ".into()
}
fn default_max_combined_length() -> usize {
    300
}
fn yes() -> bool {
    true
}

/// Which RAG head a checkpoint was saved with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RagMode {
    /// RAG-Sequence: one document per answer, p(y|x) = Σ_z p(z|x) Π_i p(y_i|x,z,y<i).
    Sequence,
    /// RAG-Token: one document per token, p(y|x) = Π_i Σ_z p(z|x) p(y_i|x,z,y<i).
    Token,
}

impl std::str::FromStr for RagMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sequence" | "seq" => Ok(Self::Sequence),
            "token" | "tok" => Ok(Self::Token),
            other => bail!("unknown RAG mode `{other}` (expected `token` or `sequence`)"),
        }
    }
}

impl RagConfig {
    /// Parse a RAG `config.json`; a missing or non-object sub-config is an error naming the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let v: Value = crate::hub::read_json(path)?;
        Self::from_value(v).with_context(|| format!("{}: not a RAG config", path.display()))
    }

    pub fn from_value(v: Value) -> Result<Self> {
        for key in ["question_encoder", "generator"] {
            match v.get(key) {
                Some(Value::Object(m)) if m.contains_key("model_type") => {}
                Some(Value::Object(_)) => bail!("sub-config `{key}` has no `model_type`"),
                _ => bail!("missing sub-config `{key}` (a RAG config.json needs `question_encoder` and `generator` objects)"),
            }
        }
        let cfg: Self = serde_json::from_value(v)?;
        if cfg.n_docs == 0 {
            bail!("field `n_docs` must be at least 1");
        }
        Ok(cfg)
    }

    /// The head named in `architectures` (`RagSequenceForGeneration` / `RagTokenForGeneration`).
    pub fn mode(&self) -> Option<RagMode> {
        self.architectures.iter().find_map(|a| match a.as_str() {
            "RagSequenceForGeneration" => Some(RagMode::Sequence),
            "RagTokenForGeneration" => Some(RagMode::Token),
            _ => None,
        })
    }

    /// `generator.<key>` as an id (None when absent or null).
    pub fn generator_id(&self, key: &str) -> Option<u32> {
        self.generator
            .get(key)
            .and_then(|v| v.as_u64())
            .map(|v| v as u32)
    }

    /// The generator's context prefix (T5: e.g. "context: "), prepended to every context string.
    pub fn generator_prefix(&self) -> Option<String> {
        self.generator
            .get("prefix")
            .and_then(|v| v.as_str())
            .map(String::from)
    }

    pub fn generator_pad(&self) -> Result<u32> {
        self.generator_id("pad_token_id")
            .context("generator config has no `pad_token_id`")
    }

    pub fn generator_vocab_size(&self) -> Result<usize> {
        self.generator
            .get("vocab_size")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .context("generator config has no `vocab_size`")
    }

    /// `bos_token_id` as RAG-Sequence's `exclude_bos_score` reads it:
    /// `config.bos_token_id or config.generator.bos_token_id` (Python `or`: 0 falls through).
    pub fn nll_bos_token_id(&self) -> Option<u32> {
        match self.bos_token_id {
            Some(b) if b != 0 => Some(b),
            _ => self.generator_id("bos_token_id"),
        }
    }

    /// Serialise as HF writes it.
    pub fn to_value(&self) -> Result<Value> {
        Ok(serde_json::to_value(self)?)
    }
}

/// Decoding settings (HF `GenerationConfig` fields RAG uses). `None` = not set at this level.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct GenerationSettings {
    pub max_length: Option<usize>,
    pub min_length: Option<usize>,
    pub num_beams: Option<usize>,
    pub num_return_sequences: Option<usize>,
    pub length_penalty: Option<f64>,
    /// `true`, `false` or `"never"`.
    pub early_stopping: Option<Value>,
    pub no_repeat_ngram_size: Option<usize>,
    pub bad_words_ids: Option<Vec<Vec<u32>>>,
    pub decoder_start_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub forced_bos_token_id: Option<u32>,
    pub forced_eos_token_id: Option<u32>,
}

impl GenerationSettings {
    /// Read the fields of a generation_config.json or a model config.json (other fields ignored;
    /// a list-valued `eos_token_id` keeps its first id).
    pub fn from_value(v: &Value) -> Self {
        let u = |k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
        let id = |k: &str| match v.get(k) {
            Some(Value::Array(a)) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
            Some(x) => x.as_u64().map(|x| x as u32),
            None => None,
        };
        Self {
            max_length: u("max_length"),
            min_length: u("min_length"),
            num_beams: u("num_beams"),
            num_return_sequences: u("num_return_sequences"),
            length_penalty: v.get("length_penalty").and_then(|x| x.as_f64()),
            early_stopping: v.get("early_stopping").filter(|x| !x.is_null()).cloned(),
            no_repeat_ngram_size: u("no_repeat_ngram_size"),
            bad_words_ids: v
                .get("bad_words_ids")
                .and_then(|x| serde_json::from_value(x.clone()).ok()),
            decoder_start_token_id: id("decoder_start_token_id"),
            bos_token_id: id("bos_token_id"),
            eos_token_id: id("eos_token_id"),
            pad_token_id: id("pad_token_id"),
            forced_bos_token_id: id("forced_bos_token_id"),
            forced_eos_token_id: id("forced_eos_token_id"),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let v: Value = crate::hub::read_json(path)?;
        Ok(Self::from_value(&v))
    }

    /// Fields set here win; unset ones come from `other`.
    pub fn or(&self, other: &Self) -> Self {
        Self {
            max_length: self.max_length.or(other.max_length),
            min_length: self.min_length.or(other.min_length),
            num_beams: self.num_beams.or(other.num_beams),
            num_return_sequences: self.num_return_sequences.or(other.num_return_sequences),
            length_penalty: self.length_penalty.or(other.length_penalty),
            early_stopping: self
                .early_stopping
                .clone()
                .or_else(|| other.early_stopping.clone()),
            no_repeat_ngram_size: self.no_repeat_ngram_size.or(other.no_repeat_ngram_size),
            bad_words_ids: self
                .bad_words_ids
                .clone()
                .or_else(|| other.bad_words_ids.clone()),
            decoder_start_token_id: self.decoder_start_token_id.or(other.decoder_start_token_id),
            bos_token_id: self.bos_token_id.or(other.bos_token_id),
            eos_token_id: self.eos_token_id.or(other.eos_token_id),
            pad_token_id: self.pad_token_id.or(other.pad_token_id),
            forced_bos_token_id: self.forced_bos_token_id.or(other.forced_bos_token_id),
            forced_eos_token_id: self.forced_eos_token_id.or(other.forced_eos_token_id),
        }
    }

    /// Resolve against transformers' global defaults (max_length 20, min_length 0, num_beams 1,
    /// num_return_sequences 1, length_penalty 1.0, early_stopping false, no_repeat_ngram_size 0).
    pub fn resolve(&self) -> Result<GenerationParams> {
        let early_stopping = match &self.early_stopping {
            None | Some(Value::Bool(false)) => EarlyStopping::False,
            Some(Value::Bool(true)) => EarlyStopping::True,
            Some(Value::String(s)) if s == "never" => EarlyStopping::Never,
            Some(other) => bail!("`early_stopping` must be true, false or \"never\", got {other}"),
        };
        let eos = self
            .eos_token_id
            .context("generation settings have no `eos_token_id`")?;
        let p = GenerationParams {
            max_length: self.max_length.unwrap_or(20),
            min_length: self.min_length.unwrap_or(0),
            num_beams: self.num_beams.unwrap_or(1),
            num_return_sequences: self.num_return_sequences.unwrap_or(1),
            length_penalty: self.length_penalty.unwrap_or(1.0),
            early_stopping,
            no_repeat_ngram_size: self.no_repeat_ngram_size.unwrap_or(0),
            bad_words_ids: self.bad_words_ids.clone().unwrap_or_default(),
            decoder_start_token_id: self
                .decoder_start_token_id
                .or(self.bos_token_id)
                .context("generation settings have no `decoder_start_token_id`")?,
            eos_token_id: eos,
            pad_token_id: self.pad_token_id.unwrap_or(eos),
            forced_bos_token_id: self.forced_bos_token_id,
            forced_eos_token_id: self.forced_eos_token_id,
            sampling: None,
        };
        if p.num_beams == 0 {
            bail!("`num_beams` must be at least 1");
        }
        if p.num_return_sequences == 0 {
            bail!("`num_return_sequences` must be at least 1");
        }
        if p.max_length < 2 {
            bail!("`max_length` must be at least 2 (it counts the decoder start token)");
        }
        Ok(p)
    }
}

/// HF `early_stopping`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum EarlyStopping {
    False,
    True,
    Never,
}

/// Fully resolved decoding parameters.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GenerationParams {
    /// Maximum output length, counting the decoder start token.
    pub max_length: usize,
    /// Minimum output length (counting the decoder start token) before EOS is allowed.
    pub min_length: usize,
    pub num_beams: usize,
    pub num_return_sequences: usize,
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
    pub no_repeat_ngram_size: usize,
    pub bad_words_ids: Vec<Vec<u32>>,
    pub decoder_start_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
    pub forced_bos_token_id: Option<u32>,
    pub forced_eos_token_id: Option<u32>,
    /// Sample instead of the greedy argmax (one beam only). Never read from a checkpoint's
    /// generation config: a caller asks for it per call (`AnswerOptions::temperature`). None:
    /// deterministic search.
    pub sampling: Option<crate::rag::search::Sampling>,
}
