//! Cross-encoders (Nogueira & Cho 2019): a transformer reads `[CLS] question [SEP] passage [SEP]`
//! and a classification head gives one relevance logit per pair. Hugging Face layouts:
//! `BertForSequenceClassification` (`bert.*`, HF pooler, `classifier`) and
//! `XLMRobertaForSequenceClassification` / `RobertaForSequenceClassification` (`roberta.*`,
//! `classifier.dense` -> tanh -> `classifier.out_proj` on the first token), as
//! sentence-transformers' `CrossEncoder` saves them. The score is the raw logit (`num_labels` 1),
//! what `CrossEncoder.predict(..., activation_fn=Identity())` returns; its sigmoid is monotone, so
//! the order is the same either way.

use super::bert::{self, Linear};
use super::{EncoderModel, Family, LoadOptions};
use crate::hub::{self, Weights};
use crate::tokenize::{load_tokenizer, Padding, TextTokenizer};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

/// The classification head on top of the body.
enum Head {
    /// BERT: `classifier(tanh(pooler(h[:, 0])))`.
    Pooler { classifier: Linear },
    /// RoBERTa: `out_proj(tanh(dense(h[:, 0])))`.
    Roberta { dense: Linear, out_proj: Linear },
}

/// A sequence-classification model with one label, scoring (question, passage) pairs.
pub struct CrossEncoder {
    model: Box<dyn EncoderModel>,
    head: Head,
    tokenizer: TextTokenizer,
    /// Truncation limit of a pair (specials included): `longest_first`, as transformers.
    pub max_length: usize,
    /// Pairs per forward pass.
    pub batch_size: usize,
    source: String,
    device: Device,
}

/// `config.json`'s first architecture.
fn architecture(config: &serde_json::Value) -> &str {
    config
        .get("architectures")
        .and_then(|a| a.as_array())
        .and_then(|a| a.first())
        .and_then(|a| a.as_str())
        .unwrap_or("")
}

/// Whether `dir` holds a sequence-classification model (a cross-encoder, not an embedder).
pub fn is_cross_encoder_dir(dir: &Path) -> bool {
    hub::read_json::<serde_json::Value>(&dir.join("config.json"))
        .map(|c| architecture(&c).ends_with("ForSequenceClassification"))
        .unwrap_or(false)
}

/// The architectures [`CrossEncoder::load`] reads.
const SUPPORTED: &str = "BertForSequenceClassification, RobertaForSequenceClassification, \
                         XLMRobertaForSequenceClassification";

impl CrossEncoder {
    /// Load a cross-encoder directory (or cached hub id). `opts`: `batch_size`, `max_length`
    /// (default: the tokenizer's `model_max_length`, capped by the model's positions), `device`.
    pub fn load(path_or_id: &str, opts: &LoadOptions) -> Result<Self> {
        let dir = hub::resolve_model_dir(path_or_id)?;
        let config_path = dir.join("config.json");
        let config: serde_json::Value = hub::read_json(&config_path)?;
        let arch = architecture(&config);
        let family = Family::from_config(&config, &config_path)?;
        let expected = match family {
            Family::Bert => "BertForSequenceClassification",
            Family::Roberta => match arch {
                "XLMRobertaForSequenceClassification" => arch,
                _ => "RobertaForSequenceClassification",
            },
            Family::Mpnet => "",
        };
        if arch != expected || expected.is_empty() {
            bail!(
                "{}: architecture `{arch}` (model_type {}) is not a supported cross-encoder ({SUPPORTED})",
                config_path.display(),
                family.name()
            );
        }
        let labels = config
            .get("id2label")
            .and_then(|m| m.as_object())
            .map(|m| m.len())
            .or_else(|| {
                config
                    .get("num_labels")
                    .and_then(|n| n.as_u64())
                    .map(|n| n as usize)
            })
            .unwrap_or(2);
        if labels != 1 {
            bail!(
                "{}: {labels} labels; a reranker needs num_labels 1 (one relevance logit per pair)",
                config_path.display()
            );
        }
        let tokenizer = load_tokenizer(&dir)?;
        let cfg = bert::BertConfig::from_value(&config, &config_path.display().to_string())?;
        tokenizer.check_vocab(cfg.vocab_size, &config_path)?;
        let weights = Weights::from_dir(&dir, bert::DTYPE, &opts.device, false)?;
        let with_pooler = family == Family::Bert;
        let mut model = family
            .load(&config, &config_path, &weights, &opts.device, with_pooler)
            .with_context(|| format!("loading the cross-encoder body from {}", dir.display()))?;
        super::configure_model(model.as_mut(), opts)?;
        let vb = weights.var_builder(bert::DTYPE, &opts.device);
        let h = cfg.hidden_size;
        let head = match family {
            Family::Bert => {
                // The classifier reads the pooler: BertForSequenceClassification always has it.
                model.pool(&Tensor::zeros((1, 1, h), bert::DTYPE, &opts.device)?)?;
                Head::Pooler {
                    classifier: Linear::load(h, 1, vb.pp("classifier"))?,
                }
            }
            _ => Head::Roberta {
                dense: Linear::load(h, h, vb.pp("classifier").pp("dense"))?,
                out_proj: Linear::load(h, 1, vb.pp("classifier").pp("out_proj"))?,
            },
        };
        let max_length = opts
            .max_length
            .unwrap_or(tokenizer.max_length)
            .min(model.max_tokens());
        Ok(Self {
            model,
            head,
            tokenizer,
            max_length,
            batch_size: opts.batch_size.max(1),
            source: dir.display().to_string(),
            device: opts.device.clone(),
        })
    }

    /// Where it was loaded from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// One relevance logit per `(question, passage)` pair: `[pairs]`.
    pub fn score_pairs(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let enc = (self.tokenizer).encode_pairs(pairs, Some(self.max_length), Padding::None)?;
        let pad = bert::pad_id(&self.tokenizer, self.model.config());
        let logits = bert::run_sorted_batches(&enc, self.batch_size, pad, &self.device, |b| {
            let hidden =
                (self.model).forward(&b.input_ids, &b.attention_mask, Some(&b.token_type_ids))?;
            self.logits(&hidden)
        })?;
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    }

    /// `last_hidden: [b, l, h]` -> logits `[b, 1]`.
    fn logits(&self, last_hidden: &Tensor) -> Result<Tensor> {
        Ok(match &self.head {
            Head::Pooler { classifier } => classifier.forward(&self.model.pool(last_hidden)?)?,
            Head::Roberta { dense, out_proj } => {
                let first = last_hidden.narrow(1, 0, 1)?.squeeze(1)?;
                out_proj.forward(&dense.forward(&first)?.tanh()?)?
            }
        })
    }
}
