//! RoBERTa (Liu et al. 2019) and XLM-RoBERTa (Conneau et al. 2020) as Hugging Face's
//! `RobertaModel` / `XLMRobertaModel`: BERT's layers with position ids that start after the
//! padding index (fairseq's convention) and, usually, a single token type.

use super::bert::{
    self, BertConfig, Embeddings, Encoder, LayerNames, Linear, Positions, BERT_LAYER,
};
use super::EncoderModel;
use anyhow::Result;
use candle_core::Tensor;
use candle_nn::VarBuilder;

/// HF `RobertaModel` / `XLMRobertaModel`.
pub struct RobertaModel {
    embeddings: Embeddings,
    encoder: Encoder,
    pooler: Option<Linear>,
    /// The padding token's id: position ids count from `padding_idx + 1`.
    padding_idx: u32,
    pub config: BertConfig,
}

impl RobertaModel {
    /// `vb` at the model root (`embeddings.*`, `encoder.layer.N.*`, `pooler.dense.*`).
    pub fn load(cfg: &BertConfig, vb: VarBuilder, with_pooler: bool) -> Result<Self> {
        Self::load_layout(cfg, vb, &BERT_LAYER, true, with_pooler)
    }

    /// The same body with other layer weight names and, optionally, no token types (MPNet).
    pub(crate) fn load_layout(
        cfg: &BertConfig,
        vb: VarBuilder,
        names: &LayerNames,
        token_types: bool,
        with_pooler: bool,
    ) -> Result<Self> {
        Ok(Self {
            embeddings: Embeddings::load(cfg, vb.pp("embeddings"), token_types)?,
            encoder: Encoder::load(cfg, vb.pp("encoder").pp("layer"), names)?,
            pooler: bert::load_pooler(cfg, &vb, with_pooler)?,
            padding_idx: cfg.pad_token_id.unwrap_or(1),
            config: cfg.clone(),
        })
    }

    /// [`EncoderModel::forward`] with `score_bias: [heads, l, l]` added to every layer's
    /// attention scores (MPNet's relative position bias; `l` is the padded length).
    pub(crate) fn forward_with_bias(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        score_bias: impl FnOnce(usize) -> Result<Option<Tensor>>,
    ) -> Result<Tensor> {
        let (b, l) = bert::check_inputs(input_ids, attention_mask, None, self.config.vocab_size)?;
        let positions = padded_position_ids(input_ids, self.padding_idx)?;
        let x = (self.embeddings).forward(input_ids, Positions::Ids(&positions), None)?;
        let bias = score_bias(l)?;
        let x = self.encoder.forward(x, attention_mask, bias.as_ref())?;
        Ok(x.reshape((b, l, self.config.hidden_size))?)
    }
}

/// fairseq's position ids, as HF's `create_position_ids_from_input_ids`: non-padding tokens count
/// `padding_idx + 1, padding_idx + 2, ...`; padding tokens get `padding_idx`. `[b, l]` -> `[b, l]`.
pub(crate) fn padded_position_ids(input_ids: &Tensor, padding_idx: u32) -> Result<Tensor> {
    let (b, l) = input_ids.dims2()?;
    let ids = input_ids.flatten_all()?.to_vec1::<u32>()?;
    let mut pos = Vec::with_capacity(ids.len());
    for row in ids.chunks(l.max(1)) {
        let mut count = 0;
        pos.extend(row.iter().map(|&t| {
            if t == padding_idx {
                padding_idx
            } else {
                count += 1;
                padding_idx + count
            }
        }));
    }
    Ok(Tensor::from_vec(pos, (b, l), input_ids.device())?)
}

impl EncoderModel for RobertaModel {
    /// `token_type_ids` are ignored: HF's RoBERTa and XLM-R tokenizers do not return them, so the
    /// model always reads type 0 (pairs are told apart by `</s></s>`).
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        _token_type_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_with_bias(input_ids, attention_mask, |_| Ok(None))
    }

    fn config(&self) -> &BertConfig {
        &self.config
    }

    fn max_tokens(&self) -> usize {
        (self.config.max_position_embeddings).saturating_sub(self.padding_idx as usize + 1)
    }

    fn pool(&self, last_hidden: &Tensor) -> Result<Tensor> {
        bert::tanh_pooler(self.pooler.as_ref(), last_hidden)
    }

    fn quantize_int8(&mut self) -> Result<()> {
        self.encoder.quantize_int8()
    }

    fn is_int8(&self) -> bool {
        self.encoder.is_int8()
    }
}
