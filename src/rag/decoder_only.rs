//! RAG with a decoder-only generator (Llama family): the same two marginals as the paper, with
//! "prompt = passage + question" instead of an encoder.
//!
//! For each retrieved document z the model reads `[bos] + enc("{title} / {text} // {question}")`
//! followed by the answer `enc(" " + answer) + [eos]` (prompt and answer tokenized separately).
//! With `lp[z, t] = log p(y_t | x, z, y<t)` and doc priors `doc_lp[z] = log p(z | x)`:
//!
//! - RAG-Sequence: `log p(y|x) = logsumexp_z(doc_lp[z] + Σ_t lp[z, t])`
//! - RAG-Token:    `log p(y|x) = Σ_t logsumexp_z(doc_lp[z] + lp[z, t])`
//!
//! Every document row keeps its own KV cache; generation feeds the same token to all rows.
//! Retrieval is the caller's: doc log-priors come in as `doc_logprobs: [n_docs]`.

use crate::generators::{DecodeState, Decoder, GenInput};
use crate::tokenize::{ids_tensor, Padding, TextTokenizer};
use anyhow::{bail, Context, Result};
use candle_core::{Tensor, D};

/// The prompt of one document: `"{title} / {text} // {question}"` (raw strings, no clean-up).
pub fn prompt_text(title: &str, text: &str, question: &str) -> String {
    format!("{title} / {text} // {question}")
}

/// Log-probabilities of an answer under every document, and both RAG marginals.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AnswerScores {
    /// `lp[z][t] = log p(y_t | x, z, y<t)`, `[n_docs][answer_len]`.
    pub token_logprobs: Vec<Vec<f32>>,
    /// `Σ_t lp[z][t]`, `[n_docs]`.
    pub loglik_per_doc: Vec<f32>,
    /// `logsumexp_z(doc_lp[z] + Σ_t lp[z][t])`.
    pub rag_sequence_loglik: f32,
    /// `Σ_t logsumexp_z(doc_lp[z] + lp[z][t])`.
    pub rag_token_loglik: f32,
    /// RAG-Token per-token marginal `logsumexp_z(doc_lp[z] + lp[z][t])`, `[answer_len]`.
    pub token_marginals: Vec<f32>,
    /// RAG-Token provenance `p(z | x, y_t, y<t) ∝ p(z|x) p(y_t | x, z, y<t)`, `[answer_len][n_docs]`.
    pub token_provenance: Vec<Vec<f32>>,
    /// RAG-Sequence provenance `p(z | x, y≤t) ∝ p(z|x) Π_{s≤t} p(y_s | x, z, y<s)`, `[answer_len][n_docs]`;
    /// the last row is `p(z | x, y)`.
    pub sequence_provenance: Vec<Vec<f32>>,
}

/// Greedy RAG-Token generation on the marginal.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TokenGeneration {
    /// Generated ids (EOS included when generation stopped on it).
    pub ids: Vec<u32>,
    /// Marginal log-probability of each chosen token.
    pub chosen_logprobs: Vec<f32>,
    /// Marginal log-probability gap between the best and second-best token at each step.
    pub top1_top2_margin: Vec<f32>,
    /// The first step's marginal log-probabilities `[vocab]`.
    pub first_marginal: Vec<f32>,
    /// `p(z | x, y_t, y<t)` for each generated token, `[steps][n_docs]`.
    pub provenance: Vec<Vec<f32>>,
}

/// One answer of RAG-Sequence generation, rescored under every document.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SequenceCandidate {
    /// Answer ids without the final EOS.
    pub ids: Vec<u32>,
    /// `log p(y | x)` under RAG-Sequence (the ids plus EOS when the candidate ended).
    pub loglik: f32,
    /// `p(z | x, y)`, `[n_docs]`.
    pub doc_posterior: Vec<f32>,
    /// The documents whose greedy decoding produced this candidate.
    pub from_docs: Vec<usize>,
}

/// Decoder-only RAG over any step-wise [`Decoder`] and its tokenizer.
pub struct DecoderOnlyRag<'a> {
    pub decoder: &'a dyn Decoder,
    pub tokenizer: &'a TextTokenizer,
}

fn logsumexp(xs: impl IntoIterator<Item = f64>) -> f64 {
    let v: Vec<f64> = xs.into_iter().collect();
    let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// `softmax` of `xs` (f64 math, f32 out).
fn normalize(xs: &[f64]) -> Vec<f32> {
    let z = logsumexp(xs.iter().copied());
    xs.iter().map(|x| (x - z).exp() as f32).collect()
}

impl<'a> DecoderOnlyRag<'a> {
    pub fn new(decoder: &'a dyn Decoder, tokenizer: &'a TextTokenizer) -> Self {
        Self { decoder, tokenizer }
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut e = self
            .tokenizer
            .encode_batch(&[text], false, None, Padding::None)?;
        Ok(e.input_ids.remove(0))
    }

    fn bos(&self) -> Result<u32> {
        let s = self.decoder.special_ids();
        s.bos
            .or(Some(s.decoder_start))
            .context("generator has no BOS token")
    }

    /// `[bos] + enc(prompt_text(title, text, question))` for each `(title, text)` passage.
    pub fn prompt_ids(&self, passages: &[(&str, &str)], question: &str) -> Result<Vec<Vec<u32>>> {
        if question.trim().is_empty() {
            bail!("empty question");
        }
        let bos = self.bos()?;
        passages
            .iter()
            .map(|(title, text)| {
                let mut ids = vec![bos];
                ids.extend(self.encode(&prompt_text(title, text, question))?);
                Ok(ids)
            })
            .collect()
    }

    /// `enc(" " + answer) + [eos]`.
    pub fn answer_ids(&self, answer: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(&format!(" {answer}"))?;
        ids.push(self.decoder.special_ids().eos);
        Ok(ids)
    }

    /// Prefill the document prompts as rows (left-padded by the decoder).
    fn start(&self, prompts: &[Vec<u32>]) -> Result<(DecodeState, Tensor)> {
        if prompts.is_empty() {
            bail!("no documents");
        }
        if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
            bail!("prompt of document {i} is empty");
        }
        let pad = self.decoder.special_ids().pad;
        let l = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let ids: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                p.iter()
                    .copied()
                    .chain(std::iter::repeat(pad))
                    .take(l)
                    .collect()
            })
            .collect();
        let mask: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| (0..l).map(|j| u32::from(j < p.len())).collect())
            .collect();
        let dev = self.decoder.device();
        let input = GenInput {
            input_ids: ids_tensor(&ids, &dev)?,
            attention_mask: ids_tensor(&mask, &dev)?,
        };
        let mut state = self.decoder.start(&input)?;
        let logits = self.decoder.first_logits(&mut state)?;
        Ok((state, logits))
    }

    fn check_priors(prompts: &[Vec<u32>], doc_logprobs: &[f32]) -> Result<()> {
        if prompts.len() != doc_logprobs.len() {
            bail!(
                "{} document prompts but {} doc log-probabilities",
                prompts.len(),
                doc_logprobs.len()
            );
        }
        Ok(())
    }

    /// Teacher-forced `lp[z][t]` of `answer` after each prompt, `[n_docs][answer_len]`.
    pub fn answer_token_logprobs(
        &self,
        prompts: &[Vec<u32>],
        answer: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        let (mut state, mut logits) = self.start(prompts)?;
        let n = prompts.len();
        let mut lp = vec![Vec::with_capacity(answer.len()); n];
        let dev = self.decoder.device();
        for (t, &tok) in answer.iter().enumerate() {
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let col = logp
                .narrow(1, tok as usize, 1)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (z, v) in col.into_iter().enumerate() {
                lp[z].push(v);
            }
            if t + 1 < answer.len() {
                logits = self
                    .decoder
                    .step(&mut state, &Tensor::new(vec![tok; n], &dev)?)?;
            }
        }
        Ok(lp)
    }

    /// Score `answer` (ids, usually ending with EOS) under every document and marginalize.
    /// `doc_logprobs: [n_docs]` = log p(z | x).
    pub fn score(
        &self,
        prompts: &[Vec<u32>],
        doc_logprobs: &[f32],
        answer: &[u32],
    ) -> Result<AnswerScores> {
        Self::check_priors(prompts, doc_logprobs)?;
        if answer.is_empty() {
            bail!("empty answer");
        }
        let lp = self.answer_token_logprobs(prompts, answer)?;
        Ok(marginals(lp, doc_logprobs))
    }

    /// Greedy decoding on the RAG-Token marginal `logsumexp_z(doc_lp[z] + log p(y_t | x, z, y<t))`, one KV
    /// cache per document row. Exactly `max_new_tokens` steps unless `stop_at_eos`.
    pub fn generate_token_greedy(
        &self,
        prompts: &[Vec<u32>],
        doc_logprobs: &[f32],
        max_new_tokens: usize,
        stop_at_eos: bool,
    ) -> Result<TokenGeneration> {
        Self::check_priors(prompts, doc_logprobs)?;
        let n = prompts.len();
        let dev = self.decoder.device();
        let eos = self.decoder.special_ids().eos;
        let prior = Tensor::new(doc_logprobs, &dev)?.reshape((n, 1))?;
        let (mut state, mut logits) = self.start(prompts)?;
        let mut out = TokenGeneration {
            ids: Vec::new(),
            chosen_logprobs: Vec::new(),
            top1_top2_margin: Vec::new(),
            first_marginal: Vec::new(),
            provenance: Vec::new(),
        };
        for step in 0..max_new_tokens {
            let joint =
                candle_nn::ops::log_softmax(&logits.to_dtype(candle_core::DType::F32)?, D::Minus1)?
                    .broadcast_add(&prior)?;
            let marginal = crate::nn::logsumexp(&joint, 0)?.to_vec1::<f32>()?;
            let (best, second) = top2(&marginal).context("empty vocabulary")?;
            let tok = best as u32;
            let col: Vec<f64> = joint
                .narrow(1, best, 1)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f64::from)
                .collect();
            out.provenance.push(normalize(&col));
            out.chosen_logprobs.push(marginal[best]);
            out.top1_top2_margin
                .push(marginal[best] - second.map_or(f32::NEG_INFINITY, |s| marginal[s]));
            if step == 0 {
                out.first_marginal = marginal;
            }
            out.ids.push(tok);
            if (stop_at_eos && tok == eos) || step + 1 == max_new_tokens {
                break;
            }
            logits = self
                .decoder
                .step(&mut state, &Tensor::new(vec![tok; n], &dev)?)?;
        }
        Ok(out)
    }

    /// RAG-Sequence generation: greedy decoding under each document separately, then every distinct
    /// candidate rescored under all documents (`logsumexp_z(doc_lp + Σ_t lp)`), best first.
    pub fn generate_sequence_greedy(
        &self,
        prompts: &[Vec<u32>],
        doc_logprobs: &[f32],
        max_new_tokens: usize,
    ) -> Result<Vec<SequenceCandidate>> {
        Self::check_priors(prompts, doc_logprobs)?;
        let n = prompts.len();
        let dev = self.decoder.device();
        let eos = self.decoder.special_ids().eos;
        let (mut state, mut logits) = self.start(prompts)?;
        let mut seqs: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut done = vec![false; n];
        for step in 0..max_new_tokens {
            let rows = logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
            let mut feed = Vec::with_capacity(n);
            for z in 0..n {
                let tok = if done[z] {
                    eos
                } else {
                    top2(&rows[z]).context("empty vocabulary")?.0 as u32
                };
                if !done[z] {
                    seqs[z].push(tok);
                    done[z] = tok == eos;
                }
                feed.push(tok);
            }
            if done.iter().all(|&d| d) || step + 1 == max_new_tokens {
                break;
            }
            logits = self.decoder.step(&mut state, &Tensor::new(feed, &dev)?)?;
        }
        let mut candidates: Vec<SequenceCandidate> = Vec::new();
        for (z, seq) in seqs.into_iter().enumerate() {
            if let Some(c) = candidates.iter_mut().find(|c| {
                let ended = seq.last() == Some(&eos);
                c.ids.as_slice()
                    == if ended {
                        &seq[..seq.len() - 1]
                    } else {
                        &seq[..]
                    }
            }) {
                c.from_docs.push(z);
                continue;
            }
            if seq.is_empty() {
                continue;
            }
            let s = self.score(prompts, doc_logprobs, &seq)?;
            let ids = if seq.last() == Some(&eos) {
                seq[..seq.len() - 1].to_vec()
            } else {
                seq
            };
            candidates.push(SequenceCandidate {
                ids,
                loglik: s.rag_sequence_loglik,
                doc_posterior: s.sequence_provenance.last().cloned().unwrap_or_default(),
                from_docs: vec![z],
            });
        }
        candidates.sort_by(|a, b| b.loglik.total_cmp(&a.loglik));
        Ok(candidates)
    }
}

/// Indices of the largest and second-largest values.
fn top2(xs: &[f32]) -> Option<(usize, Option<usize>)> {
    let mut best: Option<usize> = None;
    let mut second: Option<usize> = None;
    for (i, &x) in xs.iter().enumerate() {
        match best {
            None => best = Some(i),
            Some(b) if x > xs[b] => {
                second = best;
                best = Some(i);
            }
            _ => {
                if second.is_none_or(|s| x > xs[s]) {
                    second = Some(i);
                }
            }
        }
    }
    best.map(|b| (b, second))
}

/// Both marginals and provenance from `lp: [n_docs][answer_len]` and `doc_logprobs: [n_docs]`.
pub fn marginals(lp: Vec<Vec<f32>>, doc_logprobs: &[f32]) -> AnswerScores {
    let n = lp.len();
    let t_len = lp.first().map_or(0, |r| r.len());
    let prior: Vec<f64> = doc_logprobs.iter().map(|&x| x as f64).collect();
    let loglik_per_doc: Vec<f64> = lp
        .iter()
        .map(|r| r.iter().map(|&x| x as f64).sum())
        .collect();
    let rag_sequence_loglik = logsumexp((0..n).map(|z| prior[z] + loglik_per_doc[z]));
    let mut token_marginals = Vec::with_capacity(t_len);
    let mut token_provenance = Vec::with_capacity(t_len);
    let mut sequence_provenance = Vec::with_capacity(t_len);
    let mut cumulative = prior.clone();
    for t in 0..t_len {
        let joint: Vec<f64> = (0..n).map(|z| prior[z] + lp[z][t] as f64).collect();
        token_marginals.push(logsumexp(joint.iter().copied()));
        token_provenance.push(normalize(&joint));
        for (c, row) in cumulative.iter_mut().zip(&lp) {
            *c += row[t] as f64;
        }
        sequence_provenance.push(normalize(&cumulative));
    }
    AnswerScores {
        rag_token_loglik: token_marginals.iter().sum::<f64>() as f32,
        rag_sequence_loglik: rag_sequence_loglik as f32,
        token_marginals: token_marginals.into_iter().map(|x| x as f32).collect(),
        loglik_per_doc: loglik_per_doc.into_iter().map(|x| x as f32).collect(),
        token_logprobs: lp,
        token_provenance,
        sequence_provenance,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marginals_match_definitions() {
        let lp = vec![vec![-1.0f32, -2.0], vec![-0.5, -3.0]];
        let prior = [(0.25f32).ln(), (0.75f32).ln()];
        let s = marginals(lp, &prior);
        let seq = (0.25 * (-3.0f64).exp() + 0.75 * (-3.5f64).exp()).ln();
        assert!((s.rag_sequence_loglik as f64 - seq).abs() < 1e-6);
        let tok = (0.25 * (-1.0f64).exp() + 0.75 * (-0.5f64).exp()).ln()
            + (0.25 * (-2.0f64).exp() + 0.75 * (-3.0f64).exp()).ln();
        assert!((s.rag_token_loglik as f64 - tok).abs() < 1e-6);
        let p0 = 0.25 * (-3.0f64).exp() / (0.25 * (-3.0f64).exp() + 0.75 * (-3.5f64).exp());
        assert!((s.sequence_provenance[1][0] as f64 - p0).abs() < 1e-6);
        assert!((s.token_provenance[0].iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn top2_finds_best_two() {
        assert_eq!(top2(&[0.1, 3.0, 2.0, -1.0]), Some((1, Some(2))));
        assert_eq!(top2(&[5.0, 1.0]), Some((0, Some(1))));
        assert_eq!(top2(&[]), None);
    }
}
