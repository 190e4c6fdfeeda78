//! LoRA (Hu et al. 2021) on a frozen Llama: `W x + (alpha / r) · B (A x)` with `A: [r, in]`,
//! `B: [out, r]`, as PEFT initialises (A Kaiming-uniform, B zero) and stores it
//! (`adapter_config.json`, `adapter_model.safetensors` keyed
//! `base_model.model.model.layers.{i}.{module}.lora_{A,B}.weight`), so that
//! `peft.PeftModel.from_pretrained(base, dir)` loads what rustrag trains and the reverse.

use super::{Linear, Llama, Projections};
use anyhow::{bail, Context, Result};
use candle_core::quantized::QMatMul;
use candle_core::{Device, Tensor, Var};
use std::path::{Path, PathBuf};

/// The projections LoRA can adapt, by HF module name.
pub const LORA_MODULES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Which adapters to add and how they start.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    /// Rank r of every adapter [16].
    pub rank: usize,
    /// Scale numerator: the update is `alpha / rank · B A` [32, PEFT's convention of 2r].
    pub alpha: f64,
    /// Short module names adapted (`q_proj` … `down_proj`) [all seven projections].
    pub target_modules: Vec<String>,
    /// Adapt only the top `layers` blocks; None = every block [None]. Lower blocks then need no
    /// backward pass at all.
    pub layers: Option<usize>,
    /// Seed of A's initialisation [0].
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            target_modules: LORA_MODULES
                .iter()
                .map(|m| m.rsplit('.').next().unwrap_or(m).to_string())
                .collect(),
            layers: None,
            seed: 0,
        }
    }
}

impl LoraConfig {
    fn targets(&self, module: &str) -> bool {
        let short = module.rsplit('.').next().unwrap_or(module);
        self.target_modules.iter().any(|t| t == short)
    }

    fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            bail!("lora: rank must be at least 1");
        }
        for t in &self.target_modules {
            if !LORA_MODULES.iter().any(|m| m.ends_with(&format!(".{t}"))) {
                bail!("lora: unknown target module `{t}` (known: {LORA_MODULES:?})");
            }
        }
        if self.target_modules.is_empty() {
            bail!("lora: no target modules");
        }
        Ok(())
    }
}

/// A frozen linear layer plus a low-rank update.
pub(super) struct LoraLinear {
    pub base: Linear,
    /// `[rank, in]`.
    pub a: Tensor,
    /// `[out, rank]`.
    pub b: Tensor,
    pub scale: f64,
}

impl LoraLinear {
    pub fn forward(&self, x: &Tensor, grad: bool) -> candle_core::Result<Tensor> {
        let y = self.base.forward(x, grad)?;
        let (a, b) = match grad {
            true => (self.a.clone(), self.b.clone()),
            false => (self.a.detach(), self.b.detach()),
        };
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, dims[dims.len() - 1]))?;
        let update = x2.matmul(&a.t()?)?.matmul(&b.t()?)?;
        let mut out = dims;
        *out.last_mut().expect("non-empty dims") = b.dim(0)?;
        y + (update.reshape(out)? * self.scale)?
    }

    /// `W + scale · B A`, f32.
    fn merged(&self) -> Result<Tensor> {
        let Linear::Candle(QMatMul::Tensor(w)) = &self.base else {
            bail!("lora: merging needs an f32 base weight");
        };
        Ok((w + (self.b.matmul(&self.a)? * self.scale)?)?)
    }
}

/// Uniform(-1/sqrt(in), 1/sqrt(in)): `torch.nn.init.kaiming_uniform_(a=sqrt(5))`, PEFT's init of A.
fn kaiming_a(rank: usize, fan_in: usize, state: &mut u64, device: &Device) -> Result<Tensor> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let data: Vec<f32> = (0..rank * fan_in)
        .map(|_| {
            let u = (crate::nn::splitmix64(state) >> 11) as f64 / (1u64 << 53) as f64;
            ((2.0 * u - 1.0) * bound) as f32
        })
        .collect();
    Ok(Tensor::from_vec(data, (rank, fan_in), device)?)
}

/// Tensor `name` of `weights`, which must have `shape`.
fn shaped(weights: &crate::hub::Weights, name: &str, shape: &[usize]) -> Result<Tensor> {
    let t = weights.get(name)?;
    if t.dims() != shape {
        bail!(
            "{}: tensor `{name}` has shape {:?}, expected {shape:?}",
            weights.origin().display(),
            t.dims()
        );
    }
    Ok(t)
}

/// PEFT's key of an adapter matrix (`which`: `A` or `B`).
fn peft_key(layer: usize, module: &str, which: char) -> String {
    format!("base_model.model.model.layers.{layer}.{module}.lora_{which}.weight")
}

impl Llama {
    /// The block's projections in [`LORA_MODULES`] order.
    fn projections_mut(block: &mut super::Block) -> Result<[&mut Linear; 7]> {
        let (Projections::Separate(qkv), Projections::Separate(gu)) =
            (&mut block.attn.qkv, &mut block.mlp.gate_up)
        else {
            bail!("lora: stacked native projections (load f32 weights to add adapters)");
        };
        let [q, k, v] = qkv.as_mut_slice() else {
            bail!("llama: q/k/v projections are not three")
        };
        let [gate, up] = gu.as_mut_slice() else {
            bail!("llama: gate/up projections are not two")
        };
        Ok([q, k, v, &mut block.attn.o, gate, up, &mut block.mlp.down])
    }

    /// Add trainable LoRA adapters (the base stays frozen; its weights must be f32). `init`: A and B
    /// by PEFT key (an adapter being resumed or loaded), else PEFT's initialisation. Every block from
    /// the lowest adapted one up, and the final norm, switch to ops with a backward pass.
    pub fn add_lora(
        &mut self,
        config: &LoraConfig,
        init: Option<&crate::hub::Weights>,
    ) -> Result<()> {
        config.validate()?;
        if !self.vars.is_empty() {
            bail!("lora: the model already has trainable parameters");
        }
        self.use_hf_rope_layout()?;
        let n = self.blocks.len();
        let adapted = config.layers.unwrap_or(n);
        if adapted == 0 || adapted > n {
            bail!("lora: {adapted} adapted layers asked, the model has {n}");
        }
        let scale = config.alpha / config.rank as f64;
        let device = self.device.clone();
        let mut state = config.seed;
        let mut vars = Vec::new();
        for (i, block) in self.blocks.iter_mut().enumerate().skip(n - adapted) {
            block.differentiable = true;
            block.attn_norm.differentiable = true;
            block.mlp_norm.differentiable = true;
            for (module, slot) in LORA_MODULES.iter().zip(Self::projections_mut(block)?) {
                if !config.targets(module) {
                    continue;
                }
                let Linear::Candle(QMatMul::Tensor(w)) = &*slot else {
                    bail!("lora: layer {i} {module} is not f32 (load with GgufWeights::F32)");
                };
                let (out, inp) = w.dims2()?;
                let (ka, kb) = (peft_key(i, module, 'A'), peft_key(i, module, 'B'));
                let (a, b) = match init {
                    Some(wts) => (
                        shaped(wts, &ka, &[config.rank, inp])?,
                        shaped(wts, &kb, &[out, config.rank])?,
                    ),
                    None => (
                        kaiming_a(config.rank, inp, &mut state, &device)?,
                        Tensor::zeros((out, config.rank), w.dtype(), &device)?,
                    ),
                };
                let (a, b) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
                let base = std::mem::replace(slot, Linear::Candle(QMatMul::Tensor(w.clone())));
                *slot = Linear::Lora(Box::new(LoraLinear {
                    base,
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                    scale,
                }));
                vars.push((ka, a));
                vars.push((kb, b));
            }
        }
        self.norm.differentiable = true;
        self.native_decode = false;
        self.vars = vars;
        self.lora = Some(config.clone());
        Ok(())
    }

    /// Fold every adapter into its base weight (`W + alpha/r · B A`) and drop the trainable
    /// parameters: inference then costs what the base model costs.
    pub fn merge_lora(&mut self) -> Result<()> {
        for block in &mut self.blocks {
            let Ok(slots) = Self::projections_mut(block) else {
                continue;
            };
            for slot in slots {
                if let Linear::Lora(l) = slot {
                    *slot = Linear::Candle(QMatMul::Tensor(l.merged()?));
                }
            }
        }
        self.vars.clear();
        self.lora = None;
        Ok(())
    }

    /// Write the adapters as a PEFT directory: `adapter_model.safetensors` and
    /// `adapter_config.json` naming `base` (the GGUF file or HF directory the base weights came
    /// from) as `base_model_name_or_path`.
    pub fn save_lora(&self, dir: &Path, base: &Path) -> Result<()> {
        let config = self
            .lora
            .as_ref()
            .context("save_lora: the model has no LoRA adapters")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tensors: Vec<(String, Tensor)> = self
            .vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().contiguous()?)))
            .collect::<Result<_>>()?;
        let bytes = safetensors::tensor::serialize(tensors, None)
            .context("serializing the LoRA adapters")?;
        crate::kb::atomic::write_file_atomic(&dir.join("adapter_model.safetensors"), &bytes)?;
        let n = self.blocks.len();
        let adapted = config.layers.unwrap_or(n);
        let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
        let json = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": config.rank,
            "lora_alpha": config.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "target_modules": config.target_modules,
            // null = every layer (PEFT's reading too).
            "layers_to_transform": (adapted < n).then(|| (n - adapted..n).collect::<Vec<_>>()),
            "base_model_name_or_path": base,
            // rustrag's own record (PEFT ignores unknown keys): the init seed, for resume.
            "rustrag": {"seed": config.seed},
        });
        crate::kb::atomic::write_file_atomic(
            &dir.join("adapter_config.json"),
            serde_json::to_string_pretty(&json)?.as_bytes(),
        )
    }
}

/// A PEFT LoRA directory's settings and base model.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    /// `base_model_name_or_path`, resolved against the adapter directory.
    pub base: PathBuf,
    pub weights: PathBuf,
}

impl LoraAdapter {
    /// Whether `dir` holds a PEFT adapter (`adapter_config.json`).
    pub fn is_adapter_dir(dir: &Path) -> bool {
        dir.join("adapter_config.json").is_file()
    }

    /// Read `dir/adapter_config.json` (LoRA only, no bias or dropout at inference matters).
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("adapter_config.json");
        let v: serde_json::Value = crate::hub::read_json(&path)?;
        let field = |k: &str| {
            v.get(k)
                .with_context(|| format!("{}: no `{k}`", path.display()))
        };
        if field("peft_type")?.as_str() != Some("LORA") {
            bail!("{}: `peft_type` is not LORA", path.display());
        }
        // Variants that change the math are refused rather than silently run as plain LoRA.
        let on = |k: &str| v.get(k).and_then(|x| x.as_bool()) == Some(true);
        let non_empty = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_object())
                .is_some_and(|o| !o.is_empty())
        };
        for k in ["use_dora", "use_rslora", "fan_in_fan_out"] {
            if on(k) {
                bail!("{}: `{k}` is not supported", path.display());
            }
        }
        for k in ["rank_pattern", "alpha_pattern"] {
            if non_empty(k) {
                bail!("{}: per-module `{k}` is not supported", path.display());
            }
        }
        if v.get("bias")
            .and_then(|b| b.as_str())
            .is_some_and(|b| b != "none")
        {
            bail!(
                "{}: LoRA biases (`bias` other than none) are not supported",
                path.display()
            );
        }
        let rank = field("r")?
            .as_u64()
            .with_context(|| format!("{}: `r` is not an integer", path.display()))?
            as usize;
        let alpha = field("lora_alpha")?
            .as_f64()
            .with_context(|| format!("{}: `lora_alpha` is not a number", path.display()))?;
        let target_modules = match field("target_modules")? {
            serde_json::Value::Array(a) => a
                .iter()
                .map(|t| t.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>(),
            serde_json::Value::String(s) => Some(vec![s.clone()]),
            _ => None,
        }
        .with_context(|| {
            format!(
                "{}: `target_modules` is not a list of names",
                path.display()
            )
        })?;
        // rustrag adapts a top run of layers; anything else is refused rather than misread.
        let layers = match v.get("layers_to_transform") {
            Some(serde_json::Value::Array(a)) => {
                let idx: Vec<u64> = a.iter().filter_map(|x| x.as_u64()).collect();
                if idx.len() != a.len() || idx.windows(2).any(|w| w[1] != w[0] + 1) {
                    bail!(
                        "{}: `layers_to_transform` must be consecutive layer indices",
                        path.display()
                    );
                }
                Some(idx.len())
            }
            Some(serde_json::Value::Number(_)) => Some(1),
            _ => None,
        };
        let base = field("base_model_name_or_path")?
            .as_str()
            .with_context(|| {
                format!(
                    "{}: `base_model_name_or_path` is not a path",
                    path.display()
                )
            })?;
        let seed = v
            .pointer("/rustrag/seed")
            .and_then(|s| s.as_u64())
            .unwrap_or(0);
        Ok(Self {
            config: LoraConfig {
                rank,
                alpha,
                target_modules,
                layers,
                seed,
            },
            base: dir.join(base),
            weights: dir.join("adapter_model.safetensors"),
        })
    }
}
