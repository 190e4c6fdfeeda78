//! RAG marginalisation and losses, exactly as HF's `RagTokenForGeneration.marginalize` / `get_nll` and
//! `RagSequenceForGeneration.get_nll` compute them. Everything is differentiable (candle autograd) with
//! respect to both the generator logits and the doc scores.

use crate::nn::{log_softmax_last_dim, logsumexp};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, D};

/// Options of `get_nll`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NllOptions {
    /// Sum the per-question losses into a scalar.
    pub reduce_loss: bool,
    /// Label smoothing ε: loss = (1-ε)·nll + ε/V·smooth.
    pub epsilon: f64,
    /// RAG-Sequence only: drop target position 0 when every row starts with `bos`.
    pub exclude_bos_score: bool,
}

/// Labels shifted left by one with `pad` appended (`target[:, t]` is predicted by `logits[:, t]`).
/// `labels: [batch, T]` u32 → `[batch, T]` u32.
pub fn shift_left(labels: &Tensor, pad: u32) -> Result<Tensor> {
    let (b, t) = labels.dims2()?;
    let pad_col = Tensor::full(pad, (b, 1), labels.device())?;
    Ok(Tensor::cat(&[&labels.narrow(1, 1, t - 1)?, &pad_col], 1)?)
}

/// log p(z|x) = log_softmax(doc_scores) over docs, `[batch, n_docs]` in `dtype`.
///
/// Computed in f64: its backward then gives d loss / d doc_scores rows that sum to zero to f64 precision
/// (as the softmax Jacobian requires). In f32 the rows keep a common-mode error ~1e-7 that gradients
/// which should cancel exactly (e.g. a context-encoder output bias, since every doc of a question shares
/// q) turn into visible noise.
pub fn doc_log_prior(doc_scores: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(log_softmax_last_dim(&doc_scores.to_dtype(DType::F64)?)?.to_dtype(dtype)?)
}

/// Split `seq_logits: [batch*n_docs, T, V]` into log-probs `[batch, n_docs, T, V]`.
fn doc_logprobs(seq_logits: &Tensor, n_docs: usize) -> Result<Tensor> {
    let (rows, t, v) = seq_logits
        .dims3()
        .context("seq_logits must be [batch*n_docs, T, V]")?;
    if n_docs == 0 || rows % n_docs != 0 {
        bail!("seq_logits has {rows} rows, not a multiple of n_docs = {n_docs}");
    }
    Ok(log_softmax_last_dim(seq_logits)?.reshape((rows / n_docs, n_docs, t, v))?)
}

fn check_doc_scores(doc_scores: &Tensor, batch: usize, n_docs: usize) -> Result<()> {
    let dims = doc_scores.dims();
    if dims != [batch, n_docs] {
        bail!("doc_scores has shape {dims:?}, expected [{batch}, {n_docs}]");
    }
    Ok(())
}

/// The one marginalisation over documents: `log Σ_z p(z|x) p(·|x,z) = logsumexp_z(doc_lp + lp)`.
/// `lp: [batch, n_docs, ...]` log-probabilities under each document, `doc_lp: [batch, n_docs]`
/// log p(z|x) (or `[1, n_docs]`, broadcast) → `[batch, ...]`. Differentiable in both.
pub fn marginalize_docs(lp: &Tensor, doc_lp: &Tensor) -> Result<Tensor> {
    Ok(logsumexp(&joint(lp, doc_lp)?, 1)?)
}

/// Posterior over documents `p(z | x, ·) = softmax_z(doc_lp + lp)`: shapes as
/// [`marginalize_docs`], result `[batch, n_docs, ...]` (sums to 1 over dim 1).
pub fn doc_posterior(lp: &Tensor, doc_lp: &Tensor) -> Result<Tensor> {
    let joint = joint(lp, doc_lp)?;
    let marginal = logsumexp(&joint, 1)?.unsqueeze(1)?;
    Ok(joint.broadcast_sub(&marginal)?.exp()?)
}

/// `lp + doc_lp` with `doc_lp: [batch, n_docs]` broadcast over `lp`'s trailing dims.
fn joint(lp: &Tensor, doc_lp: &Tensor) -> Result<Tensor> {
    let mut d = doc_lp.to_dtype(lp.dtype())?;
    while d.rank() < lp.rank() {
        d = d.unsqueeze(d.rank())?;
    }
    Ok(lp.broadcast_add(&d)?)
}

/// RAG-Token marginal (HF `RagTokenForGeneration.marginalize`) for every position and vocabulary entry.
/// `seq_logits: [batch*n_docs, T, V]`, `doc_scores: [batch, n_docs]` → `[batch, T, V]` log-probs.
pub fn marginalize(seq_logits: &Tensor, doc_scores: &Tensor, n_docs: usize) -> Result<Tensor> {
    let lp = doc_logprobs(seq_logits, n_docs)?;
    check_doc_scores(doc_scores, lp.dim(0)?, n_docs)?;
    marginalize_docs(&lp, &doc_log_prior(doc_scores, lp.dtype())?)
}

/// Gather `logprobs[..., target]` over the last dim: `logprobs: [.., T, V]`, `target` broadcastable
/// to `[.., T]` (u32) → `[.., T]`.
fn gather_last(logprobs: &Tensor, target: &Tensor) -> Result<Tensor> {
    let dims = logprobs.dims().to_vec();
    let idx_shape: Vec<usize> = dims[..dims.len() - 1].iter().copied().chain([1]).collect();
    let idx = target
        .unsqueeze(D::Minus1)?
        .broadcast_as(idx_shape)?
        .contiguous()?;
    Ok(logprobs.gather(&idx, D::Minus1)?.squeeze(D::Minus1)?)
}

/// `1.0` where `target != pad`, else `0.0`: `[batch, T]` f32.
fn non_pad_mask(target: &Tensor, pad: u32, dtype: DType) -> Result<Tensor> {
    Ok(target.ne(pad)?.to_dtype(dtype)?)
}

fn finish(nll: Tensor, smooth: Tensor, opts: &NllOptions, vocab: usize) -> Result<Tensor> {
    let (nll, smooth) = if opts.reduce_loss {
        (nll.sum_all()?, smooth.sum_all()?)
    } else {
        (nll, smooth)
    };
    let eps_i = opts.epsilon / vocab as f64;
    Ok(((nll * (1.0 - opts.epsilon))? + (smooth * eps_i)?)?)
}

/// RAG-Token loss. `labels: [batch, T]` u32 (the decoder inputs, shifted left inside as HF does);
/// returns `[batch]` or a scalar when `reduce_loss`.
pub fn rag_token_nll(
    seq_logits: &Tensor,
    doc_scores: &Tensor,
    labels: &Tensor,
    n_docs: usize,
    pad: u32,
    opts: &NllOptions,
) -> Result<Tensor> {
    let rag_lp = marginalize(seq_logits, doc_scores, n_docs)?; // [B, T, V]
    let (b, t, v) = rag_lp.dims3()?;
    if labels.dims() != [b, t] {
        bail!(
            "labels have shape {:?}, the logits need [{b}, {t}]",
            labels.dims()
        );
    }
    let target = shift_left(labels, pad)?;
    let mask = non_pad_mask(&target, pad, rag_lp.dtype())?;
    let ll = (gather_last(&rag_lp, &target)? * &mask)?.sum(1)?;
    let smooth = (rag_lp.sum(D::Minus1)? * &mask)?.sum(1)?;
    finish(ll.neg()?, smooth.neg()?, opts, v)
}

/// RAG-Sequence loss: `-log Σ_z p(z|x) Π_t p(y_t|x,z,y<t)` (the doc prior enters at target position 1,
/// as in HF). `bos`: `config.bos_token_id or generator.bos_token_id` (None for T5).
pub fn rag_sequence_nll(
    seq_logits: &Tensor,
    doc_scores: &Tensor,
    labels: &Tensor,
    n_docs: usize,
    pad: u32,
    bos: Option<u32>,
    opts: &NllOptions,
) -> Result<Tensor> {
    let lp = doc_logprobs(seq_logits, n_docs)?; // [B, K, T, V]
    let (b, k, t, v) = lp.dims4()?;
    check_doc_scores(doc_scores, b, k)?;
    if labels.dims() != [b, t] {
        bail!(
            "labels have shape {:?}, the logits need [{b}, {t}]",
            labels.dims()
        );
    }
    let dev = lp.device();
    let target = shift_left(labels, pad)?;
    let first: Vec<u32> = target.narrow(1, 0, 1)?.flatten_all()?.to_vec1()?;
    let use_bos = bos.is_some_and(|bos| first.iter().all(|&f| f == bos));
    // log p(z|x) is added to the token log-probs of target position 1 only (every vocab entry).
    let at_second: Vec<f32> = (0..t).map(|i| if i == 1 { 1.0 } else { 0.0 }).collect();
    let at_second = Tensor::from_vec(at_second, (1, 1, t), dev)?.to_dtype(lp.dtype())?;
    let doc_lp = doc_log_prior(doc_scores, lp.dtype())?.unsqueeze(2)?; // [B, K, 1]
    let prior = doc_lp.broadcast_mul(&at_second)?; // [B, K, T]
    let mask = non_pad_mask(&target, pad, lp.dtype())?.unsqueeze(1)?; // [B, 1, T]
    let ll = (gather_last(&lp, &target.unsqueeze(1)?)? + &prior)?.broadcast_mul(&mask)?;
    let smooth = (lp.sum(D::Minus1)? + (&prior * v as f64)?)?.broadcast_mul(&mask)?;
    let ll = if opts.exclude_bos_score && use_bos {
        ll.narrow(2, 1, t - 1)?.sum(2)?
    } else {
        ll.sum(2)?
    };
    // The prior is already inside `ll` (added at position 1, as HF does), so the marginal over
    // documents is a plain log-sum-exp here.
    let ll = logsumexp(&ll, 1)?;
    let smooth = logsumexp(&smooth.sum(2)?, 1)?;
    finish(ll.neg()?, smooth.neg()?, opts, v)
}

/// Log-probability of each target token under each document: `seq_logits: [batch*n_docs, T, V]`,
/// `labels: [batch, T]` (shifted left inside, as the losses do) → `[batch, n_docs, T]`.
pub fn target_logprobs(
    seq_logits: &Tensor,
    labels: &Tensor,
    n_docs: usize,
    pad: u32,
) -> Result<Tensor> {
    let lp = doc_logprobs(seq_logits, n_docs)?;
    let target = shift_left(labels, pad)?;
    gather_last(&lp, &target.unsqueeze(1)?)
}

/// RAG-Sequence posterior over documents given a whole answer, p(z | x, y) ∝ p(z|x) Π_t p(y_t|x,z,y<t):
/// `[batch, n_docs]` probabilities. Pad targets are ignored.
pub fn sequence_doc_posterior(
    seq_logits: &Tensor,
    doc_scores: &Tensor,
    labels: &Tensor,
    n_docs: usize,
    pad: u32,
) -> Result<Tensor> {
    let target = shift_left(labels, pad)?;
    let tok_lp = target_logprobs(seq_logits, labels, n_docs, pad)?;
    let mask = non_pad_mask(&target, pad, tok_lp.dtype())?.unsqueeze(1)?;
    let ll = tok_lp.broadcast_mul(&mask)?.sum(2)?; // [B, K]
    doc_posterior(&ll, &doc_log_prior(doc_scores, ll.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// RAG-Token with one document reduces to plain token cross-entropy.
    #[test]
    fn token_nll_with_one_doc_is_cross_entropy() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[[1f32, 2., 0.5], [0.1, 0.2, 3.0], [0.0, 0.0, 0.0]]], &dev)?;
        let scores = Tensor::new(&[[0.7f32]], &dev)?;
        let labels = Tensor::new(&[[0u32, 1, 2]], &dev)?; // targets: 1, 2, pad(0)
        let opts = NllOptions {
            reduce_loss: false,
            epsilon: 0.0,
            exclude_bos_score: false,
        };
        let got = rag_token_nll(&logits, &scores, &labels, 1, 0, &opts)?.to_vec1::<f32>()?;
        let lse = |r: [f32; 3]| r.iter().map(|x| x.exp()).sum::<f32>().ln();
        let want = -((2.0 - lse([1., 2., 0.5])) + (3.0 - lse([0.1, 0.2, 3.0])));
        assert!((got[0] - want).abs() < 1e-5, "{got:?} vs {want}");
        let seq =
            rag_sequence_nll(&logits, &scores, &labels, 1, 0, None, &opts)?.to_vec1::<f32>()?;
        assert!((seq[0] - want).abs() < 1e-5);
        Ok(())
    }

    /// The one marginalisation gives both RAG marginals and the posteriors by their definitions
    /// (two documents, a two-token answer).
    #[test]
    fn marginalize_docs_matches_definitions() -> Result<()> {
        let dev = Device::Cpu;
        // lp[z][t] = log p(y_t | x, z, y<t); prior (0.25, 0.75).
        let lp = Tensor::new(&[[[-1.0f64, -2.0], [-0.5, -3.0]]], &dev)?; // [1, 2, 2]
        let doc_lp = Tensor::new(&[[0.25f64.ln(), 0.75f64.ln()]], &dev)?;
        let token = marginalize_docs(&lp, &doc_lp)?
            .sum_all()?
            .to_scalar::<f64>()?;
        let want = (0.25 * (-1.0f64).exp() + 0.75 * (-0.5f64).exp()).ln()
            + (0.25 * (-2.0f64).exp() + 0.75 * (-3.0f64).exp()).ln();
        assert!((token - want).abs() < 1e-12);
        let seq = marginalize_docs(&lp.sum(2)?, &doc_lp)?.to_vec1::<f64>()?[0];
        let want = (0.25 * (-3.0f64).exp() + 0.75 * (-3.5f64).exp()).ln();
        assert!((seq - want).abs() < 1e-12);
        let post = doc_posterior(&lp.sum(2)?, &doc_lp)?.to_vec2::<f64>()?;
        let p0 = 0.25 * (-3.0f64).exp() / (0.25 * (-3.0f64).exp() + 0.75 * (-3.5f64).exp());
        assert!((post[0][0] - p0).abs() < 1e-12 && (post[0][0] + post[0][1] - 1.0).abs() < 1e-12);
        Ok(())
    }

    /// p(z|x) = softmax(s/τ): τ = 0.05 sharpens MiniLM-like cosine scores that τ = 1 leaves near
    /// uniform.
    #[test]
    fn prior_temperature_scales_the_scores() -> Result<()> {
        let dev = Device::Cpu;
        let s = Tensor::new(&[[0.70f32, 0.66, 0.52]], &dev)?;
        let flat = doc_log_prior(&s, DType::F32)?.exp()?.to_vec2::<f32>()?;
        let sharp = doc_log_prior(&(&s / 0.05)?, DType::F32)?
            .exp()?
            .to_vec2::<f32>()?;
        assert!(flat[0][0] < 0.36 && sharp[0][0] > 0.6, "{flat:?} {sharp:?}");
        let raw = s.to_vec2::<f32>()?;
        let z: f32 = raw[0].iter().map(|x| ((x - 0.70) / 0.05).exp()).sum();
        assert!((sharp[0][0] - 1.0 / z).abs() < 1e-6);
        Ok(())
    }
}
