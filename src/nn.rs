//! Differentiable building blocks shared by every model.
//!
//! candle 0.11's `candle_nn::LayerNorm` and `candle_nn::ops::softmax_last_dim` run fused kernels that
//! record no backward op (candle issue #3011): gradients would silently stop there. Everything here
//! is composed of primitive tensor ops, so it trains.

use anyhow::{bail, Result};
use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

/// splitmix64: a small, fixed PRNG, so that a seed gives the same stream (data order, dropout
/// masks, LoRA initialisation) on every platform and release.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Train mode of one model, shared by all its [`Dropout`]s (torch's `model.train()` /
/// `model.eval()`). Off by default: decoding, evaluation and the parity suite never drop.
///
/// Masks are drawn from splitmix64 streams seeded by [`DropoutSwitch::train`]'s seed and the
/// number of dropout calls since, so a forward repeated with the same seed (a resumed run) drops
/// the same units.
#[derive(Clone, Debug, Default)]
pub struct DropoutSwitch(std::sync::Arc<SwitchState>);

#[derive(Debug, Default)]
struct SwitchState {
    on: std::sync::atomic::AtomicBool,
    seed: std::sync::atomic::AtomicU64,
    calls: std::sync::atomic::AtomicU64,
}

impl DropoutSwitch {
    /// Train mode with masks seeded by `seed`.
    pub fn train(&self, seed: u64) {
        use std::sync::atomic::Ordering::SeqCst;
        self.0.seed.store(seed, SeqCst);
        self.0.calls.store(0, SeqCst);
        self.0.on.store(true, SeqCst);
    }

    /// Evaluation mode: every dropout is the identity.
    pub fn eval(&self) {
        self.0.on.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_training(&self) -> bool {
        self.0.on.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The PRNG state of the next mask, None in evaluation mode.
    fn next_stream(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::SeqCst;
        if !self.is_training() {
            return None;
        }
        let call = self.0.calls.fetch_add(1, SeqCst);
        let mut state = self.0.seed.load(SeqCst) ^ call.wrapping_mul(0xd1b5_4a32_d192_ed03);
        Some(splitmix64(&mut state))
    }
}

/// Dropout as torch's `nn.Dropout`: in train mode each element is zeroed with probability `p` and
/// the rest scaled by `1 / (1 - p)`; the identity in evaluation mode or when `p` is 0.
#[derive(Clone, Debug)]
pub struct Dropout {
    p: f64,
    switch: DropoutSwitch,
}

impl Dropout {
    /// `p` in [0, 1) (a config's rate; 1 would zero everything), switched by `switch`.
    pub fn new(p: f64, switch: &DropoutSwitch) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            bail!("dropout probability must be in [0, 1), got {p}");
        }
        Ok(Self {
            p,
            switch: switch.clone(),
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.p == 0.0 {
            return Ok(xs.clone());
        }
        let Some(mut state) = self.switch.next_stream() else {
            return Ok(xs.clone());
        };
        let scale = (1.0 / (1.0 - self.p)) as f32;
        // Keep an element when its 53-bit uniform draw is at or above p.
        let threshold = (self.p * (1u64 << 53) as f64) as u64;
        let mask: Vec<f32> = (0..xs.elem_count())
            .map(|_| match splitmix64(&mut state) >> 11 >= threshold {
                true => scale,
                false => 0.0,
            })
            .collect();
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        Ok((xs * mask)?)
    }
}

/// Softmax over the last dimension (max-subtracted), differentiable.
///
/// When no gradient is tracked (inference), candle's fused kernel is used instead: same values,
/// several times faster.
pub fn softmax_last_dim(xs: &Tensor) -> candle_core::Result<Tensor> {
    if !xs.track_op() && xs.is_contiguous() {
        return candle_nn::ops::softmax_last_dim(xs);
    }
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let exp = xs.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dimension, differentiable.
pub fn log_softmax_last_dim(xs: &Tensor) -> candle_core::Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let shifted = xs.broadcast_sub(&max)?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// log(sum(exp(x))) over `dim`, numerically stable, differentiable. Keeps no dimension.
pub fn logsumexp(xs: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
    let max = xs.max_keepdim(dim)?.detach();
    // Rows that are all -inf would give NaN; their max is replaced by 0 (result stays -inf).
    let max = max.is_finite_mask()?.where_cond(&max, &max.zeros_like()?)?;
    let s = xs.broadcast_sub(&max)?.exp()?.sum_keepdim(dim)?.log()?;
    s.broadcast_add(&max)?.squeeze(dim)
}

trait FiniteMask {
    fn is_finite_mask(&self) -> candle_core::Result<Tensor>;
}

impl FiniteMask for Tensor {
    fn is_finite_mask(&self) -> candle_core::Result<Tensor> {
        // x - x is 0 for finite x and NaN for ±inf; NaN != 0.
        #[allow(clippy::eq_op)]
        let diff = (self - self)?;
        diff.eq(&diff.zeros_like()?)
    }
}

/// Additive attention mask from a padding mask `[batch, len]` (1 = token, 0 = padding):
/// `[batch, 1, 1, len]` with 0 for tokens and the dtype's most negative value for padding,
/// as Hugging Face builds it.
pub fn additive_padding_mask(mask: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    let (b, l) = mask.dims2()?;
    let keep = mask.to_dtype(DType::F32)?;
    let min = match dtype {
        DType::F16 => half::f16::MIN.to_f32(),
        DType::BF16 => half::bf16::MIN.to_f32(),
        _ => f32::MIN,
    };
    let neg = ((1.0 - keep)? * min as f64)?;
    neg.to_dtype(dtype)?.reshape((b, 1, 1, l))
}

/// Additive causal mask `[1, 1, q_len, past + q_len]`: position i may see keys 0..=past+i.
pub fn causal_mask(
    q_len: usize,
    past: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let k_len = past + q_len;
    let min = f32::MIN;
    let data: Vec<f32> = (0..q_len)
        .flat_map(|i| (0..k_len).map(move |j| if j <= past + i { 0.0 } else { min }))
        .collect();
    Tensor::from_vec(data, (1, 1, q_len, k_len), device)?.to_dtype(dtype)
}

/// Layer normalisation with optional bias, differentiable.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub eps: f64,
}

impl LayerNorm {
    /// `weight`/`bias` of shape `[size]` under `vb`.
    pub fn load(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: Some(vb.get(size, "bias")?),
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        // Inference fast path: candle's fused kernel (records no backward op, so only when no
        // gradient is tracked).
        if let Some(b) = &self.bias {
            if !xs.track_op()
                && !self.weight.track_op()
                && !b.track_op()
                && xs.dtype() == DType::F32
            {
                return candle_nn::ops::layer_norm(
                    &xs.contiguous()?,
                    &self.weight,
                    b,
                    self.eps as f32,
                );
            }
        }
        let mean = xs.mean_keepdim(D::Minus1)?;
        let centered = xs.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let out = normed.broadcast_mul(&self.weight)?;
        match &self.bias {
            Some(b) => out.broadcast_add(b),
            None => Ok(out),
        }
    }
}

/// Root-mean-square normalisation without mean removal (T5LayerNorm, LlamaRMSNorm), differentiable.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        // Inference fast path: candle's fused kernel (no backward op, so only when no gradient is tracked).
        if !xs.track_op() && !self.weight.track_op() && xs.dtype() == DType::F32 {
            return candle_nn::ops::rms_norm(&xs.contiguous()?, &self.weight, self.eps as f32);
        }
        let dtype = xs.dtype();
        let x = xs.to_dtype(DType::F32)?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        normed.broadcast_mul(&self.weight)
    }
}

/// Feed-forward activations named as in HF configs (`activation_function`, `hidden_act`, `dense_act_fn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU with erf (`gelu`).
    Gelu,
    /// Tanh approximation (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
    Relu,
    Silu,
}

impl Activation {
    /// Parse an HF activation name; unknown names are an error naming the config field.
    pub fn from_hf(name: &str, field: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => bail!("unsupported activation `{other}` in config field `{field}`"),
        })
    }
}

impl Module for Activation {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Gelu => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
            Self::Relu => xs.relu(),
            Self::Silu => xs.silu(),
        }
    }
}

/// Dense layer `y = x W^T + b` with `weight: [out, in]` (HF layout), differentiable.
pub fn linear(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<candle_nn::Linear> {
    let w = vb.get((out_dim, in_dim), "weight")?;
    let b = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Ok(candle_nn::Linear::new(w, b))
}

/// Token embedding table `weight: [vocab, dim]`.
pub fn embedding(vocab: usize, dim: usize, vb: VarBuilder) -> Result<candle_nn::Embedding> {
    Ok(candle_nn::Embedding::new(
        vb.get((vocab, dim), "weight")?,
        dim,
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn dropout_keeps_expectation_and_is_seeded() {
        let switch = super::DropoutSwitch::default();
        let d = super::Dropout::new(0.25, &switch).unwrap();
        let x = Tensor::ones(100_000, DType::F32, &candle_core::Device::Cpu).unwrap();
        assert_eq!(
            d.forward(&x).unwrap().to_vec1::<f32>().unwrap(),
            x.to_vec1::<f32>().unwrap()
        );
        switch.train(1);
        let a = d.forward(&x).unwrap().to_vec1::<f32>().unwrap();
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        assert!((dropped - 0.25).abs() < 0.01, "dropped {dropped}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
        assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
        let next = d.forward(&x).unwrap().to_vec1::<f32>().unwrap();
        assert_ne!(a, next, "each call draws a new mask");
        switch.train(1);
        assert_eq!(
            d.forward(&x).unwrap().to_vec1::<f32>().unwrap(),
            a,
            "same seed, same mask"
        );
        switch.eval();
        assert!(super::Dropout::new(1.0, &switch).is_err());
    }

    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn layer_norm_and_softmax_pass_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::new(&[[1f32, 2., 4.], [0., -1., 3.]], &dev)?)?;
        let ln = LayerNorm {
            weight: Tensor::new(&[1f32, 2., 3.], &dev)?,
            bias: Some(Tensor::new(&[0f32, 1., 0.], &dev)?),
            eps: 1e-5,
        };
        let loss = (softmax_last_dim(&ln.forward(x.as_tensor())?)?
            * Tensor::new(&[[1f32, 0., 2.], [3., 1., 0.]], &dev)?)?
        .sum_all()?;
        let grads = loss.backward()?;
        let g = grads
            .get(x.as_tensor())
            .expect("gradient reaches the input");
        assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 1e-4);
        Ok(())
    }

    #[test]
    fn logsumexp_matches_naive_and_handles_neg_inf() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(
            &[
                [0.5f32, -1.0, 2.0],
                [f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY],
            ],
            &dev,
        )?;
        let v = logsumexp(&x, 1)?.to_vec1::<f32>()?;
        let naive = (0.5f32.exp() + (-1.0f32).exp() + 2.0f32.exp()).ln();
        assert!((v[0] - naive).abs() < 1e-6);
        assert_eq!(v[1], f32::NEG_INFINITY);
        Ok(())
    }
}
