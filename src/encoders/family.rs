//! The encoder families rustrag runs, chosen by `config.json`'s `model_type`, and the loading of
//! their bodies from a weight set (bare, or under a task head's prefix such as `roberta.`).

use super::bert::{self, BertConfig, BertModel};
use super::mpnet::MpnetModel;
use super::roberta::RobertaModel;
use super::EncoderModel;
use crate::hub::Weights;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use candle_nn::VarBuilder;
use std::path::Path;

/// An encoder architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `bert` (MiniLM, BGE, E5, GTE, DPR bodies).
    Bert,
    /// `roberta` and `xlm-roberta` (multilingual E5, BGE-M3).
    Roberta,
    /// `mpnet` (all-mpnet-base-v2).
    Mpnet,
}

impl Family {
    /// The `model_type` values [`Family::from_config`] accepts.
    pub const SUPPORTED: &'static str = "bert, roberta, xlm-roberta, mpnet";

    /// From `config.json` (`config_path` names it in errors); no `model_type` means BERT, as
    /// old BERT/DPR configs.
    pub fn from_config(config: &serde_json::Value, config_path: &Path) -> Result<Self> {
        Ok(match config.get("model_type").and_then(|v| v.as_str()) {
            Some("bert") | None => Self::Bert,
            Some("roberta") | Some("xlm-roberta") => Self::Roberta,
            Some("mpnet") => Self::Mpnet,
            Some(other) => bail!(
                "{}: model_type `{other}` is not supported ({})",
                config_path.display(),
                Self::SUPPORTED
            ),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Bert => "bert",
            Self::Roberta => "roberta",
            Self::Mpnet => "mpnet",
        }
    }

    /// Where the body's weights may sit: bare (`*Model`) or under a task head's prefix.
    fn prefixes(&self) -> &'static [&'static str] {
        match self {
            Self::Bert => &["", "bert.", "model."],
            Self::Roberta => &["", "roberta.", "model."],
            Self::Mpnet => &["", "mpnet.", "model."],
        }
    }

    /// The body's key prefix in `weights`.
    pub fn weight_prefix(&self, weights: &Weights) -> Result<&'static str> {
        (self.prefixes().iter().copied())
            .find(|p| weights.contains(&format!("{p}embeddings.word_embeddings.weight")))
            .with_context(|| {
                format!(
                    "{}: no {} weights (expected `embeddings.word_embeddings.weight` under one of {:?})",
                    weights.origin().display(),
                    self.name(),
                    self.prefixes()
                )
            })
    }

    /// The body `config` describes, from `weights` (under [`Self::weight_prefix`]); the HF pooler
    /// is loaded when `with_pooler` and present.
    pub fn load(
        &self,
        config: &serde_json::Value,
        config_path: &Path,
        weights: &Weights,
        device: &Device,
        with_pooler: bool,
    ) -> Result<Box<dyn EncoderModel>> {
        let origin = config_path.display().to_string();
        let cfg = BertConfig::from_value(config, &origin)?;
        let prefix = self.weight_prefix(weights)?;
        let vb = weights.var_builder(bert::DTYPE, device);
        let vb: VarBuilder = if prefix.is_empty() {
            vb
        } else {
            vb.pp(prefix.trim_end_matches('.'))
        };
        let model: Box<dyn EncoderModel> = match self {
            Self::Bert => Box::new(BertModel::load(&cfg, vb, with_pooler)?),
            Self::Roberta => Box::new(RobertaModel::load(&cfg, vb, with_pooler)?),
            Self::Mpnet => {
                let buckets = config
                    .get("relative_attention_num_buckets")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(32) as usize;
                Box::new(
                    MpnetModel::load(&cfg, buckets, vb, with_pooler)
                        .with_context(|| origin.clone())?,
                )
            }
        };
        Ok(model)
    }
}
