//! Tokenization: HF `tokenizer.json` + `tokenizer_config.json`, with truncation and padding chosen per call
//! (as transformers does), never taken from state serialised into `tokenizer.json`.

use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, TruncationParams, TruncationStrategy,
};

/// Ids of the special tokens a model declares (None where the tokenizer has no such token).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
    pub cls: Option<u32>,
    pub sep: Option<u32>,
}

/// How a batch is padded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Padding {
    /// No padding: rows keep their own lengths.
    None,
    /// Pad to the longest row (`padding="longest"`).
    Longest,
    /// Pad every row to exactly this length (`padding="max_length"`).
    Fixed(usize),
}

/// A tokenized batch. `input_ids`, `attention_mask`, `type_ids`: `[batch][len]`.
#[derive(Clone, Debug, Default)]
pub struct Encoded {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u32>>,
    pub type_ids: Vec<Vec<u32>>,
}

impl Encoded {
    /// `[batch, len]` u32 tensors (ids, mask); rows must have equal length (use padding).
    pub fn tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        Ok((
            ids_tensor(&self.input_ids, device)?,
            ids_tensor(&self.attention_mask, device)?,
        ))
    }
}

/// `[rows, len]` u32 tensor from equal-length rows.
pub fn ids_tensor(rows: &[Vec<u32>], device: &Device) -> Result<Tensor> {
    let len = rows.first().map_or(0, |r| r.len());
    if let Some((i, r)) = rows.iter().enumerate().find(|(_, r)| r.len() != len) {
        return Err(anyhow!(
            "row {i} has length {}, row 0 has {len}: pad the batch",
            r.len()
        ));
    }
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (rows.len(), len), device)?)
}

/// Tokenizers set up for one (truncation length, padding) setting each.
type ConfiguredTokenizers = HashMap<(Option<usize>, Padding), Arc<tokenizers::Tokenizer>>;

/// A HF tokenizer with its special tokens and maximum length.
#[derive(Clone)]
pub struct TextTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub special: SpecialTokens,
    /// `model_max_length` from tokenizer_config.json (or set by the caller).
    pub max_length: usize,
    pub source: PathBuf,
    /// `inner` set up for truncation and padding, one per setting, made on first use and kept:
    /// tokenizers' BPE keeps a thread-local cache per instance, keyed by an id each clone draws
    /// afresh and never removed when the instance is dropped, so a clone per call (as before)
    /// leaked a cache of the call's words on every call (~100 KB a retrieval in `serve`).
    /// Shared by clones of this `TextTokenizer`; a handful of settings exist per model.
    configured: Arc<Mutex<ConfiguredTokenizers>>,
}

impl TextTokenizer {
    /// Load `tokenizer.json` (and `tokenizer_config.json` if present) from a directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let file = dir.join("tokenizer.json");
        let mut inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", file.display()))?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| anyhow!("{}: {e}", file.display()))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = if config_path.is_file() {
            crate::hub::read_json(&config_path)?
        } else {
            serde_json::Value::Null
        };
        let token_id = |key: &str| -> Option<u32> {
            let v = config.get(key)?;
            let s = v
                .as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            inner.token_to_id(s)
        };
        let special = SpecialTokens {
            bos: token_id("bos_token"),
            eos: token_id("eos_token"),
            pad: token_id("pad_token"),
            unk: token_id("unk_token"),
            cls: token_id("cls_token"),
            sep: token_id("sep_token"),
        };
        // transformers uses a huge sentinel (1e30) when no limit is known.
        let max_length = config
            .get("model_max_length")
            .and_then(|v| v.as_f64())
            .filter(|v| *v < 1e9)
            .map(|v| v as usize)
            .unwrap_or(usize::MAX);
        Ok(Self {
            inner,
            special,
            max_length,
            source: file,
            configured: Arc::default(),
        })
    }

    /// Wrap an already-built tokenizer (e.g. one read from GGUF metadata).
    pub fn from_tokenizer(
        inner: tokenizers::Tokenizer,
        special: SpecialTokens,
        source: PathBuf,
    ) -> Self {
        Self {
            inner,
            special,
            max_length: usize::MAX,
            source,
            configured: Arc::default(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Check that every id the tokenizer can produce is a row of the model's embedding table.
    pub fn check_vocab(&self, model_vocab: usize, model: &Path) -> Result<()> {
        let n = self.vocab_size();
        if n > model_vocab {
            anyhow::bail!(
                "tokenizer {} has {n} tokens but model {} has vocab_size {model_vocab}",
                self.source.display(),
                model.display()
            );
        }
        Ok(())
    }

    /// `inner` with this truncation and padding (made once per setting, see `configured`).
    fn configured(
        &self,
        max_length: Option<usize>,
        padding: Padding,
    ) -> Result<Arc<tokenizers::Tokenizer>> {
        let mut made = self.configured.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tok) = made.get(&(max_length, padding)) {
            return Ok(tok.clone());
        }
        let tok = Arc::new(self.configure(max_length, padding)?);
        made.insert((max_length, padding), tok.clone());
        Ok(tok)
    }

    fn configure(
        &self,
        max_length: Option<usize>,
        padding: Padding,
    ) -> Result<tokenizers::Tokenizer> {
        let mut tok = self.inner.clone();
        if let Some(max) = max_length {
            tok.with_truncation(Some(TruncationParams {
                max_length: max,
                strategy: TruncationStrategy::LongestFirst,
                ..Default::default()
            }))
            .map_err(|e| anyhow!("{}: {e}", self.source.display()))?;
        }
        let pad_id = self.special.pad.unwrap_or(0);
        let pad_token = self.inner.id_to_token(pad_id).unwrap_or_default();
        let strategy = match padding {
            Padding::None => None,
            Padding::Longest => Some(PaddingStrategy::BatchLongest),
            Padding::Fixed(n) => Some(PaddingStrategy::Fixed(n)),
        };
        if let Some(strategy) = strategy {
            tok.with_padding(Some(PaddingParams {
                strategy,
                direction: PaddingDirection::Right,
                pad_id,
                pad_type_id: 0,
                pad_token,
                pad_to_multiple_of: None,
            }));
        }
        Ok(tok)
    }

    /// Encode single texts. `max_length`: truncate to this many tokens (specials included).
    pub fn encode_batch(
        &self,
        texts: &[&str],
        add_special_tokens: bool,
        max_length: Option<usize>,
        padding: Padding,
    ) -> Result<Encoded> {
        let tok = self.configured(max_length, padding)?;
        let encs = tok
            .encode_batch(texts.to_vec(), add_special_tokens)
            .map_err(|e| anyhow!("{}: tokenization failed: {e}", self.source.display()))?;
        Ok(collect(encs))
    }

    /// Encode (first, second) pairs, e.g. DPR's `(title, text)`; truncation is `longest_first`.
    pub fn encode_pairs(
        &self,
        pairs: &[(&str, &str)],
        max_length: Option<usize>,
        padding: Padding,
    ) -> Result<Encoded> {
        let tok = self.configured(max_length, padding)?;
        let inputs: Vec<tokenizers::EncodeInput> =
            pairs.iter().map(|(a, b)| (*a, *b).into()).collect();
        let encs = tok
            .encode_batch(inputs, true)
            .map_err(|e| anyhow!("{}: tokenization failed: {e}", self.source.display()))?;
        Ok(collect(encs))
    }

    /// Decode ids to text.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("{}: decode failed: {e}", self.source.display()))
    }
}

fn collect(encs: Vec<tokenizers::Encoding>) -> Encoded {
    let mut out = Encoded::default();
    for e in encs {
        out.input_ids.push(e.get_ids().to_vec());
        out.attention_mask.push(e.get_attention_mask().to_vec());
        out.type_ids.push(e.get_type_ids().to_vec());
    }
    out
}

/// Read a tokenizer directory, naming it in the error.
pub fn load_tokenizer(dir: &Path) -> Result<TextTokenizer> {
    TextTokenizer::from_dir(dir)
        .with_context(|| format!("loading tokenizer from {}", dir.display()))
}
