//! Training support: the top layers as variables over f32 weights, and saving in HF's layout.
//!
//! Lower layers stay frozen and run candle's fused kernels (no graph is recorded through them);
//! trainable blocks and the final norm switch to ops with a backward pass.

use super::{Block, Linear, Llama, Projections, RopeLayout};
use anyhow::{bail, Context, Result};
use candle_core::quantized::QMatMul;
use candle_core::{Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// HF names of a block's weights, in [`Block::weights`] order.
const BLOCK_WEIGHTS: [&str; 9] = [
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

fn f32_weight(l: &Linear) -> Result<&Tensor> {
    match l {
        Linear::Candle(QMatMul::Tensor(t)) => Ok(t),
        Linear::Lora(_) => bail!("llama: LoRA adapters present (save_lora, or merge_lora first)"),
        _ => bail!("llama: training and saving need f32 weights (load with GgufWeights::F32)"),
    }
}

fn f32_weight_mut(l: &mut Linear) -> Result<&mut Tensor> {
    match l {
        Linear::Candle(QMatMul::Tensor(t)) => Ok(t),
        Linear::Lora(_) => bail!("llama: LoRA adapters present (save_lora, or merge_lora first)"),
        _ => bail!("llama: training and saving need f32 weights (load with GgufWeights::F32)"),
    }
}

fn separate(p: &Projections) -> Result<&[Linear]> {
    match p {
        Projections::Separate(v) => Ok(v),
        Projections::Stacked { .. } => bail!("llama: stacked native projections are not f32"),
    }
}

fn separate_mut(p: &mut Projections) -> Result<&mut [Linear]> {
    match p {
        Projections::Separate(v) => Ok(v),
        Projections::Stacked { .. } => bail!("llama: stacked native projections are not f32"),
    }
}

impl Block {
    /// The block's f32 weights in [`BLOCK_WEIGHTS`] order.
    fn weights(&self) -> Result<[&Tensor; 9]> {
        let [q, k, v] = separate(&self.attn.qkv)? else {
            bail!("llama: q/k/v projections are not three")
        };
        let [gate, up] = separate(&self.mlp.gate_up)? else {
            bail!("llama: gate/up projections are not two")
        };
        Ok([
            &self.attn_norm.weight,
            f32_weight(q)?,
            f32_weight(k)?,
            f32_weight(v)?,
            f32_weight(&self.attn.o)?,
            &self.mlp_norm.weight,
            f32_weight(gate)?,
            f32_weight(up)?,
            f32_weight(&self.mlp.down)?,
        ])
    }

    fn weights_mut(&mut self) -> Result<[&mut Tensor; 9]> {
        let [q, k, v] = separate_mut(&mut self.attn.qkv)? else {
            bail!("llama: q/k/v projections are not three")
        };
        let [gate, up] = separate_mut(&mut self.mlp.gate_up)? else {
            bail!("llama: gate/up projections are not two")
        };
        Ok([
            &mut self.attn_norm.weight,
            f32_weight_mut(q)?,
            f32_weight_mut(k)?,
            f32_weight_mut(v)?,
            f32_weight_mut(&mut self.attn.o)?,
            &mut self.mlp_norm.weight,
            f32_weight_mut(gate)?,
            f32_weight_mut(up)?,
            f32_weight_mut(&mut self.mlp.down)?,
        ])
    }
}

/// llama.cpp's converter interleaves the two rotary halves of every q/k head
/// (`reshape(n, 2, hd/2, in).swapaxes(1, 2)`); this undoes it, giving HF's row order.
fn unpermute(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / n_heads;
    Ok(w.reshape((n_heads, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

impl Llama {
    /// Make the top `layers` decoder blocks and the final norm trainable (their weights become
    /// [`Var`]s, listed by HF name in [`CausalLm::vars`](crate::generators::CausalLm::vars)); the
    /// embeddings, the tied `lm_head` and lower blocks stay frozen. Needs f32 weights
    /// ([`super::GgufWeights::F32`] or a HF directory); a GGUF's q/k rows are first put back in HF's
    /// rotary layout so that training and [`Llama::save_hf`] see HF's parameters.
    pub fn make_trainable(&mut self, layers: usize) -> Result<()> {
        let n = self.blocks.len();
        if layers > n {
            bail!("llama: {layers} trainable layers asked, the model has {n}");
        }
        if !self.vars.is_empty() {
            bail!("llama: the model already has trainable parameters");
        }
        self.use_hf_rope_layout()?;
        let mut vars = Vec::new();
        for (i, b) in self.blocks.iter_mut().enumerate().skip(n - layers) {
            b.differentiable = true;
            b.attn_norm.differentiable = true;
            b.mlp_norm.differentiable = true;
            for (name, w) in BLOCK_WEIGHTS.iter().zip(b.weights_mut()?) {
                let v = Var::from_tensor(w)?;
                *w = v.as_tensor().clone();
                vars.push((format!("model.layers.{i}.{name}.weight"), v));
            }
        }
        if layers > 0 {
            self.norm.differentiable = true;
            let v = Var::from_tensor(&self.norm.weight)?;
            self.norm.weight = v.as_tensor().clone();
            vars.push(("model.norm.weight".to_string(), v));
        }
        self.native_decode = false;
        self.vars = vars;
        Ok(())
    }

    /// Put a GGUF's q/k rows back in HF's rotary layout (training and saving work in HF's
    /// parameters; the tensor path's rotary follows the layout).
    pub(super) fn use_hf_rope_layout(&mut self) -> Result<()> {
        self.llama_family_only()?;
        if self.rope_layout == RopeLayout::Interleaved {
            let (nh, nkv) = (self.config.num_heads, self.config.num_kv_heads);
            for b in &mut self.blocks {
                let w = b.weights_mut()?;
                *w[1] = unpermute(w[1], nh)?;
                *w[2] = unpermute(w[2], nkv)?;
            }
            self.rope_layout = RopeLayout::Halves;
        }
        Ok(())
    }

    /// Training and saving know Llama's parameters only (not the Qwen families' bias / head norms).
    fn llama_family_only(&self) -> Result<()> {
        if self.config.family != super::Family::Llama
            || self.blocks.iter().any(|b| b.attn.extras.any())
        {
            bail!(
                "{}: training and saving support the llama family only, this model is {:?}",
                self.source.display(),
                self.config.family
            );
        }
        Ok(())
    }

    /// Every weight by HF name (`LlamaForCausalLM` state dict, f32).
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        self.llama_family_only()?;
        let interleaved = self.rope_layout == RopeLayout::Interleaved;
        let (nh, nkv) = (self.config.num_heads, self.config.num_kv_heads);
        let mut out = HashMap::new();
        out.insert("model.embed_tokens.weight".to_string(), self.embed.clone());
        for (i, b) in self.blocks.iter().enumerate() {
            for (j, (name, w)) in BLOCK_WEIGHTS.iter().zip(b.weights()?).enumerate() {
                let w = match (interleaved, j) {
                    (true, 1) => unpermute(w, nh)?,
                    (true, 2) => unpermute(w, nkv)?,
                    _ => w.clone(),
                };
                out.insert(format!("model.layers.{i}.{name}.weight"), w);
            }
        }
        out.insert("model.norm.weight".to_string(), self.norm.weight.clone());
        if !self.config.tie_word_embeddings {
            out.insert("lm_head.weight".into(), f32_weight(&self.lm_head)?.clone());
        }
        Ok(out)
    }

    /// Save as a HF `LlamaForCausalLM` directory: `config.json` and `model.safetensors` (f32), each
    /// written atomically.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tensors: Vec<(String, Tensor)> = self
            .state_dict()?
            .into_iter()
            .map(|(k, t)| Ok((k, t.contiguous()?)))
            .collect::<Result<_>>()?;
        let bytes = safetensors::tensor::serialize(tensors, None)
            .context("serializing the llama weights")?;
        crate::kb::atomic::write_file_atomic(&dir.join("model.safetensors"), &bytes)?;
        let config = serde_json::to_string_pretty(&self.config.to_hf_json())?;
        crate::kb::atomic::write_file_atomic(&dir.join("config.json"), config.as_bytes())
    }
}
