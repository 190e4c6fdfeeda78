//! The optimiser side of training, each piece as PyTorch / transformers define it:
//! [`AdamW`] (`torch.optim.AdamW`), [`LinearSchedule`] (`get_linear_schedule_with_warmup`),
//! [`clip_grad_norm`] (`torch.nn.utils.clip_grad_norm_`) and [`GradAccumulator`] (summing the
//! gradients of several micro-batches before one optimiser step).
//!
//! `tests/fixtures/make_train_reference.py` records three torch steps; `tests/train.rs` matches them.

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// `torch.optim.AdamW` hyper-parameters. Defaults are torch's.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// Peak learning rate (the schedule scales it). Default 1e-3.
    pub lr: f64,
    /// Decay of the first moment. Default 0.9.
    pub beta1: f64,
    /// Decay of the second moment. Default 0.999.
    pub beta2: f64,
    /// Added to `sqrt(v̂)` (after bias correction), as torch does. Default 1e-8.
    pub eps: f64,
    /// Decoupled weight decay: `p ← p · (1 − lr · weight_decay)` before the Adam update. Default 1e-2.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// One parameter with its Adam moments (same shape, dtype and device as the parameter).
struct Slot {
    name: String,
    var: Var,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// This parameter's learning rate relative to the scheduled one ([`AdamW::scale_lr`]).
    lr_scale: f64,
}

/// AdamW over named parameters (non-amsgrad, not maximising: torch's defaults).
///
/// Per step `t` (from 1), with `g` the gradient and `lr` the scheduled rate:
/// `p ← p(1 − lr·wd)`; `m ← β1 m + (1−β1) g`; `v ← β2 v + (1−β2) g²`;
/// `p ← p − lr/(1−β1ᵗ) · m / (sqrt(v)/sqrt(1−β2ᵗ) + eps)`.
pub struct AdamW {
    pub config: AdamWConfig,
    slots: Vec<Slot>,
    /// Optimiser steps taken so far.
    step: u64,
}

impl AdamW {
    /// Zero moments for every parameter.
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(name, var)| {
                let zeros = var.as_tensor().zeros_like()?;
                Ok(Slot {
                    name,
                    lr_scale: 1.0,
                    exp_avg: zeros.clone(),
                    exp_avg_sq: zeros,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            slots,
            step: 0,
        })
    }

    /// Optimiser steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The parameters, in the order given to [`AdamW::new`].
    pub fn params(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.slots.iter().map(|s| (s.name.as_str(), &s.var))
    }

    /// Multiply the learning rate of the parameters whose names `select` accepts by `scale` (a
    /// torch parameter group with `lr = scale × lr`; the schedule applies to it as to the rest).
    pub fn scale_lr(&mut self, select: impl Fn(&str) -> bool, scale: f64) {
        for s in self.slots.iter_mut().filter(|s| select(&s.name)) {
            s.lr_scale = scale;
        }
    }

    /// One update with learning rate `lr`. `grads[i]` is the gradient of parameter `i`
    /// (`None`: no gradient reached it; torch skips such parameters, moments and decay included).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if grads.len() != self.slots.len() {
            bail!(
                "{} gradients for {} parameters",
                grads.len(),
                self.slots.len()
            );
        }
        self.step += 1;
        let c = &self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for (slot, g) in self.slots.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            let lr = lr * slot.lr_scale;
            let step_size = lr / bias1;
            let p = slot.var.as_tensor();
            if g.dims() != p.dims() {
                bail!(
                    "gradient of `{}` has shape {:?}, the parameter {:?}",
                    slot.name,
                    g.dims(),
                    p.dims()
                );
            }
            let g = g.to_dtype(p.dtype())?;
            let decayed = (p * (1.0 - lr * c.weight_decay))?;
            slot.exp_avg = ((&slot.exp_avg * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            slot.exp_avg_sq = ((&slot.exp_avg_sq * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((slot.exp_avg_sq.sqrt()? / bias2_sqrt)? + c.eps)?;
            let update = ((&slot.exp_avg / denom)? * step_size)?;
            slot.var.set(&(decayed - update)?)?;
        }
        Ok(())
    }

    /// Moments as named tensors (`exp_avg.<name>`, `exp_avg_sq.<name>`) on the CPU, for checkpoints.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for s in &self.slots {
            out.insert(
                format!("exp_avg.{}", s.name),
                s.exp_avg.to_device(&Device::Cpu)?,
            );
            out.insert(
                format!("exp_avg_sq.{}", s.name),
                s.exp_avg_sq.to_device(&Device::Cpu)?,
            );
        }
        Ok(out)
    }

    /// Write the moments to `path` (safetensors) and return the step count to store beside it.
    pub fn save(&self, path: &Path) -> Result<u64> {
        candle_core::safetensors::save(&self.state_tensors()?, path)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(self.step)
    }

    /// Restore moments written by [`AdamW::save`] and the step count. Every parameter must be there.
    pub fn load(&mut self, path: &Path, steps: u64) -> Result<()> {
        let t = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("reading {}", path.display()))?;
        for s in &mut self.slots {
            let shape = s.var.as_tensor().dims().to_vec();
            let get = |key: String| -> Result<Tensor> {
                let x = t
                    .get(&key)
                    .with_context(|| format!("{}: no optimiser state `{key}`", path.display()))?;
                if x.dims() != shape.as_slice() {
                    bail!(
                        "{}: `{key}` has shape {:?}, the parameter {shape:?}",
                        path.display(),
                        x.dims()
                    );
                }
                Ok(x.to_dtype(s.var.dtype())?.to_device(s.var.device())?)
            };
            s.exp_avg = get(format!("exp_avg.{}", s.name))?;
            s.exp_avg_sq = get(format!("exp_avg_sq.{}", s.name))?;
        }
        self.step = steps;
        Ok(())
    }
}

/// transformers' `get_linear_schedule_with_warmup`: the rate rises linearly from 0 over
/// `warmup_steps`, then falls linearly to 0 at `total_steps`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LinearSchedule {
    /// Steps of linear warm-up from 0. Default 0.
    pub warmup_steps: u64,
    /// Step at which the rate reaches 0.
    pub total_steps: u64,
}

impl LinearSchedule {
    /// The multiplier of the peak rate for optimiser step `step` (0-based: the rate of the first
    /// step is `lr · lambda(0)`, which is 0 when there is any warm-up — as with torch's scheduler).
    pub fn lambda(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / self.warmup_steps.max(1) as f64;
        }
        let left = self.total_steps.saturating_sub(step) as f64;
        (left / self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64).max(0.0)
    }
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)` (L2): scales every gradient by
/// `min(1, max_norm / (total_norm + 1e-6))` and returns the total norm before clipping
/// (`sqrt(Σ_i ‖g_i‖²)`, accumulated in f64 here). A non-finite norm is returned unclipped: the
/// caller decides to stop.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter().flatten() {
        sq += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    let total = sq.sqrt();
    if !total.is_finite() {
        return Ok(total);
    }
    let coef = (max_norm / (total + 1e-6)).min(1.0);
    if coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * coef)?;
        }
    }
    Ok(total)
}

/// Sums the gradients of several backward passes (micro-batches) for a fixed parameter list.
/// Scale each micro-batch's loss by `1 / accumulation_steps` to get the mean.
pub struct GradAccumulator {
    vars: Vec<Var>,
    sums: Vec<Option<Tensor>>,
    /// Backward passes added since the last [`GradAccumulator::take`].
    pub passes: usize,
}

impl GradAccumulator {
    pub fn new(vars: Vec<Var>) -> Self {
        let sums = vec![None; vars.len()];
        Self {
            vars,
            sums,
            passes: 0,
        }
    }

    /// Add the gradients of one backward pass (parameters without a gradient are left as they are).
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        for (var, sum) in self.vars.iter().zip(self.sums.iter_mut()) {
            if let Some(g) = grads.get(var.as_tensor()) {
                *sum = Some(match sum.take() {
                    Some(s) => (s + g)?,
                    None => g.clone(),
                });
            }
        }
        self.passes += 1;
        Ok(())
    }

    /// The summed gradients (in parameter order) and a reset.
    pub fn take(&mut self) -> Vec<Option<Tensor>> {
        self.passes = 0;
        std::mem::replace(&mut self.sums, vec![None; self.vars.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_transformers_formula() {
        let s = LinearSchedule {
            warmup_steps: 2,
            total_steps: 6,
        };
        let got: Vec<f64> = (0..8).map(|i| s.lambda(i)).collect();
        assert_eq!(got, vec![0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]);
        let flat = LinearSchedule {
            warmup_steps: 0,
            total_steps: 4,
        };
        assert_eq!(flat.lambda(0), 1.0);
    }

    #[test]
    fn accumulating_halves_equals_the_whole() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::new(&[1f32, -2., 3.], &dev)?;
        let x = Tensor::new(&[[0.5f32, 1.0, -1.0], [2.0, 0.0, 1.0]], &dev)?;
        let loss = |rows: &Tensor| -> Result<Tensor> {
            Ok(rows.broadcast_mul(w.as_tensor())?.sum_all()?.sqr()?)
        };
        let mut acc = GradAccumulator::new(vec![w.clone()]);
        acc.add(&loss(&x.narrow(0, 0, 1)?)?.backward()?)?;
        acc.add(&loss(&x.narrow(0, 1, 1)?)?.backward()?)?;
        assert_eq!(acc.passes, 2);
        let sum = acc.take()[0].clone().unwrap().to_vec1::<f32>()?;
        let whole = (loss(&x.narrow(0, 0, 1)?)? + loss(&x.narrow(0, 1, 1)?)?)?.backward()?;
        let want = whole.get(w.as_tensor()).unwrap().to_vec1::<f32>()?;
        assert_eq!(sum, want);
        assert!(acc.take()[0].is_none());
        Ok(())
    }

    #[test]
    fn clipping_leaves_small_gradients_alone() -> Result<()> {
        let dev = Device::Cpu;
        let mut g = vec![Some(Tensor::new(&[0.3f32, 0.4], &dev)?), None];
        let n = clip_grad_norm(&mut g, 1.0)?;
        assert!((n - 0.5).abs() < 1e-7);
        assert_eq!(g[0].as_ref().unwrap().to_vec1::<f32>()?, vec![0.3, 0.4]);
        let mut g = vec![Some(Tensor::new(&[3f32, 4.], &dev)?)];
        assert!((clip_grad_norm(&mut g, 1.0)? - 5.0).abs() < 1e-7);
        let v = g[0].as_ref().unwrap().to_vec1::<f32>()?;
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        Ok(())
    }
}
