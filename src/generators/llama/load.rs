//! Loading a [`Llama`] from a GGUF file or a HF directory.

use super::gemma::PostNorms;
use super::phi3;
use super::qwen::QkvExtras;
use super::{
    Attention, Block, Family, GgufWeights, Linear, Llama, LlamaConfig, Mlp, Projections, RmsNorm,
    RopeLayout,
};
use crate::generators::gguf::GgufFile;
use crate::generators::quant::QMatrix;
use crate::generators::SpecialIds;
use anyhow::{Context, Result};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

impl Llama {
    /// Load from a GGUF file; matmul weights stay quantized ([`GgufWeights::default`]).
    pub fn from_gguf(g: &GgufFile, device: &Device) -> Result<Self> {
        Self::from_gguf_with(g, device, GgufWeights::default())
    }

    /// Load from a GGUF file, holding the weights as `mode` says.
    pub fn from_gguf_with(g: &GgufFile, device: &Device, mode: GgufWeights) -> Result<Self> {
        let cfg = LlamaConfig::from_gguf(g)?;
        let native_ok = device.is_cpu();
        let to_qmm = |t: Arc<QTensor>, name: &str| -> Result<Linear> {
            use candle_core::quantized::GgmlDType as T;
            let ctx = || format!("{}: converting tensor `{name}`", g.path.display());
            let requant = |t: &QTensor| -> Result<QTensor> {
                let w = t.dequantize(device).with_context(ctx)?;
                QTensor::quantize(&w, T::Q8_0).with_context(ctx)
            };
            let native = |t: &QTensor| -> Result<Linear> {
                Ok(Linear::Native(
                    QMatrix::from_qtensor(t, name).with_context(ctx)?,
                ))
            };
            Ok(match (mode, t.dtype()) {
                (GgufWeights::F32, _) => {
                    Linear::Candle(QMatMul::Tensor(t.dequantize(device).with_context(ctx)?))
                }
                (GgufWeights::Native, dtype) if native_ok && QMatrix::supports(dtype) => {
                    native(&t)?
                }
                (GgufWeights::Fast | GgufWeights::Native, T::Q4_1 | T::Q5_0 | T::Q5_1) => {
                    Linear::Candle(QMatMul::from_qtensor(requant(&t)?)?)
                }
                _ => Linear::Candle(QMatMul::from_arc(t)?),
            })
        };
        let (h, kv, hd) = (
            cfg.hidden_size,
            cfg.num_kv_heads * cfg.head_dim,
            cfg.head_dim * cfg.num_heads,
        );
        let qmm = |name: &str, shape: &[usize]| -> Result<Linear> {
            to_qmm(Arc::new(g.tensor(name, shape, device)?), name)
        };
        let norm = |name: &str| -> Result<RmsNorm> {
            let w = g.tensor(name, &[h], device)?.dequantize(device)?;
            Ok(RmsNorm::new(w, cfg.rms_norm_eps))
        };
        let embed_q = Arc::new(g.tensor("token_embd.weight", &[cfg.vocab_size, h], device)?);
        let embed = embed_q.dequantize(device)?;
        let lm_head = if cfg.tie_word_embeddings {
            to_qmm(embed_q, "token_embd.weight")?
        } else {
            qmm("output.weight", &[cfg.vocab_size, h])?
        };
        // Not `with_capacity(num_layers)`: the count comes from the file, and a corrupt one must end
        // at the first missing tensor, not abort allocating.
        let mut blocks = Vec::new();
        for i in 0..cfg.num_layers {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            let ffn = cfg.intermediate_size;
            // Phi-3 stores q/k/v (and gate/up) fused: split into the Llama projections.
            let split = |name: String, rows: &[usize]| -> Result<Vec<Linear>> {
                phi3::split_rows(g, &name, rows, h, device)?
                    .into_iter()
                    .map(|t| to_qmm(Arc::new(t), &name))
                    .collect()
            };
            let qkv = match g.content.tensor_infos.contains_key(&p("attn_qkv")) {
                true => split(p("attn_qkv"), &[hd, kv, kv])?,
                false => vec![
                    qmm(&p("attn_q"), &[hd, h])?,
                    qmm(&p("attn_k"), &[kv, h])?,
                    qmm(&p("attn_v"), &[kv, h])?,
                ],
            };
            let gate_up = match cfg.family {
                Family::Phi3 => split(p("ffn_up"), &[ffn, ffn])?,
                _ => vec![
                    qmm(&p("ffn_gate"), &[ffn, h])?,
                    qmm(&p("ffn_up"), &[ffn, h])?,
                ],
            };
            let post_norms = match cfg.gemma {
                Some(_) => Some(PostNorms::from_gguf(g, i, h, cfg.rms_norm_eps, device)?),
                None => None,
            };
            blocks.push(Block {
                attn_norm: norm(&p("attn_norm"))?,
                attn: Attention {
                    qkv: Projections::new(qkv)?,
                    extras: QkvExtras::from_gguf(
                        g,
                        cfg.family,
                        i,
                        (hd, kv, cfg.head_dim),
                        cfg.rms_norm_eps,
                        device,
                    )?,
                    o: qmm(&p("attn_output"), &[h, hd])?,
                },
                mlp_norm: norm(&p("ffn_norm"))?,
                mlp: Mlp {
                    gate_up: Projections::new(gate_up)?,
                    down: qmm(&p("ffn_down"), &[h, ffn])?,
                },
                post_norms,
                differentiable: false,
            });
        }
        let norm = norm("output_norm.weight")?;
        // llama.cpp's converter permutes Llama's q/k rows to interleaved pairs, not the others'.
        let rope = match cfg.family {
            Family::Llama => RopeLayout::Interleaved,
            _ => RopeLayout::Halves,
        };
        Self::assemble(
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            rope,
            device,
            g.path.clone(),
        )
    }

    /// Load from a HF directory (`config.json` + safetensors / pytorch weights), f32.
    pub fn from_hf_dir(dir: &Path, device: &Device) -> Result<Self> {
        let cfg = LlamaConfig::from_hf(&dir.join("config.json"))?;
        let weights = crate::hub::Weights::from_dir(dir, DType::F32, device, false)?;
        let vb = weights.var_builder(DType::F32, device);
        let (h, kv, hd) = (
            cfg.hidden_size,
            cfg.num_kv_heads * cfg.head_dim,
            cfg.head_dim * cfg.num_heads,
        );
        let rms = |vb: candle_nn::VarBuilder| -> Result<RmsNorm> {
            Ok(RmsNorm::new(vb.get(h, "weight")?, cfg.rms_norm_eps))
        };
        let lin =
            |vb: &candle_nn::VarBuilder, name: &str, out: usize, inp: usize| -> Result<Linear> {
                Ok(Linear::Candle(QMatMul::Tensor(
                    vb.pp(name).get((out, inp), "weight")?,
                )))
            };
        let vbm = vb.pp("model");
        let embed = vbm.pp("embed_tokens").get((cfg.vocab_size, h), "weight")?;
        // Not `with_capacity(num_layers)`: the count comes from the file, and a corrupt one must end
        // at the first missing tensor, not abort allocating.
        let mut blocks = Vec::new();
        for i in 0..cfg.num_layers {
            let l = vbm.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let m = l.pp("mlp");
            blocks.push(Block {
                attn_norm: rms(l.pp("input_layernorm"))?,
                attn: Attention {
                    qkv: Projections::Separate(vec![
                        lin(&a, "q_proj", hd, h)?,
                        lin(&a, "k_proj", kv, h)?,
                        lin(&a, "v_proj", kv, h)?,
                    ]),
                    extras: QkvExtras::default(),
                    o: lin(&a, "o_proj", h, hd)?,
                },
                mlp_norm: rms(l.pp("post_attention_layernorm"))?,
                mlp: Mlp {
                    gate_up: Projections::Separate(vec![
                        lin(&m, "gate_proj", cfg.intermediate_size, h)?,
                        lin(&m, "up_proj", cfg.intermediate_size, h)?,
                    ]),
                    down: lin(&m, "down_proj", h, cfg.intermediate_size)?,
                },
                post_norms: None,
                differentiable: false,
            });
        }
        let norm = rms(vbm.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings && !weights.contains("lm_head.weight") {
            Linear::Candle(QMatMul::Tensor(embed.clone()))
        } else {
            lin(&vb, "lm_head", cfg.vocab_size, h)?
        };
        Self::assemble(
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            RopeLayout::Halves,
            device,
            dir.to_path_buf(),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        config: LlamaConfig,
        embed: Tensor,
        blocks: Vec<Block>,
        norm: RmsNorm,
        lm_head: Linear,
        rope_layout: RopeLayout,
        device: &Device,
        source: PathBuf,
    ) -> Result<Self> {
        let inv_freq = Tensor::new(config.inv_freq(false), device)?;
        let inv_freq_local = match (0..config.num_layers).any(|i| config.local_rope(i)) {
            true => Some(Tensor::new(config.inv_freq(true), device)?),
            false => None,
        };
        let eos = config
            .eos_token_id
            .with_context(|| format!("{}: no eos token id", source.display()))?;
        let special = SpecialIds {
            vocab_size: config.vocab_size,
            decoder_start: config.bos_token_id.unwrap_or(eos),
            bos: config.bos_token_id,
            eos,
            pad: config.pad_token_id.unwrap_or(eos),
            forced_bos: None,
            forced_eos: None,
        };
        let mut m = Self {
            config,
            embed,
            blocks,
            norm,
            lm_head,
            inv_freq,
            inv_freq_local,
            native_decode: false,
            rope_layout,
            special,
            device: device.clone(),
            source,
            vars: Vec::new(),
            lora: None,
        };
        m.native_decode = m.native_decode_ok();
        Ok(m)
    }
}
