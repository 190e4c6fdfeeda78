//! MPNet (Song et al. 2020) as Hugging Face's `MPNetModel` (all-mpnet-base-v2's body): BERT's
//! post-LN layers (weights named `attention.attn.{q,k,v,o}`), RoBERTa's position ids, no token
//! types, and a T5-style relative position bias shared by every layer and added to the attention
//! scores.

use super::bert::{BertConfig, LayerNames};
use super::roberta::RobertaModel;
use super::EncoderModel;
use anyhow::{bail, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;

/// HF `MPNetLayer` weight names.
const MPNET_LAYER: LayerNames = LayerNames {
    query: "attention.attn.q",
    key: "attention.attn.k",
    value: "attention.attn.v",
    attn_out: "attention.attn.o",
    attn_norm: "attention.LayerNorm",
    intermediate: "intermediate.dense",
    output: "output.dense",
    out_norm: "output.LayerNorm",
};

/// HF's `relative_position_bucket` limit (fixed in `MPNetEncoder`).
const MAX_DISTANCE: i64 = 128;

/// HF `MPNetModel`: a RoBERTa body (MPNet's weight names, no token types) whose layers add the
/// relative position bias to their attention scores.
pub struct MpnetModel {
    body: RobertaModel,
    /// `relative_attention_bias`: `[num_buckets, heads]`.
    relative_attention_bias: Tensor,
}

impl MpnetModel {
    /// `vb` at the model root; `num_buckets`: config `relative_attention_num_buckets` (32).
    pub fn load(
        cfg: &BertConfig,
        num_buckets: usize,
        vb: VarBuilder,
        with_pooler: bool,
    ) -> Result<Self> {
        if num_buckets < 4 {
            bail!("relative_attention_num_buckets {num_buckets} is too small (at least 4)");
        }
        Ok(Self {
            body: RobertaModel::load_layout(cfg, vb.clone(), &MPNET_LAYER, false, with_pooler)?,
            relative_attention_bias: vb.pp("encoder").get(
                (num_buckets, cfg.num_attention_heads),
                "relative_attention_bias.weight",
            )?,
        })
    }

    /// The attention score bias of `l` tokens: `[heads, l, l]`, entry `(h, i, j)` the learnt bias
    /// of head `h` for the bucket of the distance `j - i` (HF `compute_position_bias`).
    fn position_bias(&self, l: usize) -> Result<Tensor> {
        let num_buckets = self.relative_attention_bias.dim(0)?;
        let buckets: Vec<u32> = (0..l as i64)
            .flat_map(|i| (0..l as i64).map(move |j| relative_position_bucket(j - i, num_buckets)))
            .collect();
        let ids = Tensor::from_vec(buckets, l * l, self.relative_attention_bias.device())?;
        let values = self.relative_attention_bias.index_select(&ids, 0)?; // [l*l, heads]
        Ok(values.t()?.reshape(((), l, l))?.contiguous()?)
    }
}

/// HF `MPNetEncoder.relative_position_bucket`: half the buckets for keys before the query, half
/// after; exact buckets up to `num_buckets / 4` away, logarithmic ones up to [`MAX_DISTANCE`].
/// The logarithm is computed in f32 and truncated, as torch does.
fn relative_position_bucket(relative_position: i64, num_buckets: usize) -> u32 {
    let half = (num_buckets / 2) as i64;
    let n = -relative_position;
    let mut ret = if n < 0 { half } else { 0 };
    let n = n.abs();
    let max_exact = half / 2;
    ret += if n < max_exact {
        n
    } else {
        let scale = (MAX_DISTANCE as f32 / max_exact as f32).ln();
        let large = max_exact
            + ((n as f32 / max_exact as f32).ln() / scale * (half - max_exact) as f32) as i64;
        large.min(half - 1)
    };
    ret as u32
}

impl EncoderModel for MpnetModel {
    /// `token_type_ids` are ignored (MPNet has none).
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        _token_type_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        (self.body).forward_with_bias(input_ids, attention_mask, |l| {
            Ok(Some(self.position_bias(l)?))
        })
    }

    fn config(&self) -> &BertConfig {
        self.body.config()
    }

    fn max_tokens(&self) -> usize {
        self.body.max_tokens()
    }

    fn pool(&self, last_hidden: &Tensor) -> Result<Tensor> {
        self.body.pool(last_hidden)
    }

    fn quantize_int8(&mut self) -> Result<()> {
        self.body.quantize_int8()
    }

    fn is_int8(&self) -> bool {
        self.body.is_int8()
    }
}

#[cfg(test)]
mod tests {
    use super::relative_position_bucket;

    #[test]
    fn buckets_match_hf() {
        // torch: MPNetEncoder.relative_position_bucket(torch.tensor([...]), 32, 128)
        let rel = [
            -200, -128, -64, -20, -8, -7, -1, 0, 1, 7, 8, 16, 20, 64, 127, 300,
        ];
        let want = [15, 15, 14, 10, 8, 7, 1, 0, 17, 23, 24, 26, 26, 30, 31, 31];
        let got: Vec<u32> = rel
            .iter()
            .map(|&r| relative_position_bucket(r, 32))
            .collect();
        assert_eq!(got, want);
    }
}
