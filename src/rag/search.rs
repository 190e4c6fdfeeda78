//! Decoding loops with HF transformers' semantics: logits processors, greedy search and seeded
//! sampling (`_sample` without / with `do_sample`, temperature and top-p warpers), and the
//! vectorised beam search of transformers ≥ 4.50 (`_beam_search`), over any [`StepScorer`] — the
//! RAG-Token marginal or a plain generator.

use crate::rag::config::{EarlyStopping, GenerationParams};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Supplies next-token scores for the live rows of a search.
pub trait StepScorer {
    /// Scores `[rows * vocab]` (row-major) for the next token of every row. `last`: the token each row
    /// consumed last (`None` on the first call, when every row holds only the decoder start token).
    fn next_scores(&mut self, last: Option<&[u32]>) -> Result<Vec<f32>>;
    /// Keep/reorder/duplicate rows: new row `i` continues old row `rows[i]`.
    fn reorder(&mut self, rows: &[usize]) -> Result<()>;
    fn vocab_size(&self) -> usize;
    /// The token [`greedy`] (or [`sample_scored`]) chose for every row at this step; `live[r]`: row `r` had not finished,
    /// so its token is generated, not padding. For streaming: an error stops the search (the
    /// reader went away). Beam search does not call it (a beam's tokens are not final until the
    /// end). Default: nothing.
    fn chosen(&mut self, _tokens: &[u32], _live: &[bool]) -> Result<()> {
        Ok(())
    }
}

/// In-place log-softmax of one row.
pub fn log_softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return;
    }
    let sum: f32 = row.iter().map(|x| (x - max).exp()).sum();
    let lse = max + sum.ln();
    row.iter_mut().for_each(|x| *x -= lse);
}

/// The logits processors HF builds for these settings (no-repeat-ngram, bad words, min length,
/// forced BOS, forced EOS), applied to one row's scores given the row's tokens so far.
pub fn process_row(p: &GenerationParams, input: &[u32], scores: &mut [f32]) {
    let cur_len = input.len();
    let n = p.no_repeat_ngram_size;
    if n > 0 && cur_len + 1 >= n {
        let prefix = &input[cur_len + 1 - n..];
        for start in 0..=(cur_len - (n - 1)) {
            if start + n > cur_len {
                break;
            }
            if &input[start..start + n - 1] == prefix {
                scores[input[start + n - 1] as usize] = f32::NEG_INFINITY;
            }
        }
    }
    for bad in &p.bad_words_ids {
        if let Some((&last, prev)) = bad.split_last() {
            if prev.is_empty() || input.ends_with(prev) {
                if let Some(s) = scores.get_mut(last as usize) {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
    }
    if cur_len < p.min_length {
        scores[p.eos_token_id as usize] = f32::NEG_INFINITY;
    }
    let force = |scores: &mut [f32], id: u32| {
        scores.iter_mut().for_each(|s| *s = f32::NEG_INFINITY);
        scores[id as usize] = 0.0;
    };
    if let (Some(bos), 1) = (p.forced_bos_token_id, cur_len) {
        force(scores, bos);
    }
    if let Some(eos) = p.forced_eos_token_id {
        if cur_len == p.max_length - 1 {
            force(scores, eos);
        }
    }
}

fn check_ids(p: &GenerationParams, vocab: usize) -> Result<()> {
    for (name, id) in [
        ("eos_token_id", Some(p.eos_token_id)),
        ("pad_token_id", Some(p.pad_token_id)),
        ("decoder_start_token_id", Some(p.decoder_start_token_id)),
        ("forced_bos_token_id", p.forced_bos_token_id),
        ("forced_eos_token_id", p.forced_eos_token_id),
    ] {
        if let Some(id) = id {
            if id as usize >= vocab {
                bail!("generation setting `{name}` = {id} is outside the generator vocabulary ({vocab})");
            }
        }
    }
    Ok(())
}

/// Index of the largest value (first one on ties, like `torch.argmax`).
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Greedy decoding of `rows` sequences: `[rows][len]` ids starting with the decoder start token, finished
/// rows padded with `pad_token_id` up to the longest row (HF `_sample`, do_sample=False).
/// `step_scores(i)` (optional) receives each step's processed scores (for provenance / margins).
pub fn greedy(
    scorer: &mut dyn StepScorer,
    rows: usize,
    p: &GenerationParams,
) -> Result<Vec<Vec<u32>>> {
    Ok(greedy_scored(scorer, rows, p)?.ids)
}

/// Generated sequences with their log-likelihoods (sum over generated tokens of the log-softmaxed,
/// processed scores; beam search: the final beam score times `length ** length_penalty`).
#[derive(Clone, Debug)]
pub struct Hypotheses {
    pub ids: Vec<Vec<u32>>,
    pub logprobs: Vec<f32>,
}

/// [`greedy`] with sequence log-likelihoods.
pub fn greedy_scored(
    scorer: &mut dyn StepScorer,
    rows: usize,
    p: &GenerationParams,
) -> Result<Hypotheses> {
    decode_scored(scorer, rows, p, |_, row| argmax(row) as u32)
}

/// Sampling settings: HF `do_sample=True` with its `TemperatureLogitsWarper` then
/// `TopPLogitsWarper` applied to the processed scores (for RAG-Token, the marginal
/// log p(y_i | x, y<i) = log Σ_z p(z|x) p(y_i | x, z, y<i)).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sampling {
    /// Scores are divided by it before the softmax; positive and finite. Towards 0 the
    /// distribution concentrates on the argmax (greedy), above 1 it flattens.
    pub temperature: f64,
    /// Nucleus: only the most likely tokens whose cumulative probability reaches `top_p` are
    /// kept (HF: a token is dropped when the tokens less likely than it, itself included, sum to
    /// at most `1 - top_p`; the most likely one is always kept). In [0, 1]; 1 keeps every token,
    /// 0 only the most likely.
    pub top_p: f64,
    /// Seed of the random stream. Every row of a call starts from it, so a question's answer does
    /// not depend on the questions it is batched with. None: a fresh seed per row.
    pub seed: Option<u64>,
}

impl Sampling {
    /// Checks the ranges documented on the fields; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!(
                "temperature must be positive and finite to sample, got {}",
                self.temperature
            );
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            bail!("top_p must be between 0 and 1, got {}", self.top_p);
        }
        Ok(())
    }

    /// One token drawn from `row` (processed scores, any additive constant) after the
    /// temperature and top-p warpers.
    pub fn draw(&self, rng: &mut SplitMix64, row: &[f32]) -> u32 {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            // Every token banned (or a NaN row): nothing to sample from; as greedy does.
            return argmax(row) as u32;
        }
        // Shifted by the max before dividing, so a tiny temperature gives -inf, never +inf or NaN:
        // the same softmax as HF's scores / T, without overflow.
        let t = self.temperature;
        let mut probs: Vec<(f64, u32)> = row
            .iter()
            .enumerate()
            .map(|(i, &v)| (((v - max) as f64 / t).exp(), i as u32))
            .filter(|&(q, _)| q > 0.0)
            .collect();
        // Most likely first; equal ones by id, so a draw is a function of (seed, scores) alone.
        probs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let total: f64 = probs.iter().map(|&(q, _)| q).sum();
        let mut keep = probs.len();
        if self.top_p < 1.0 {
            // HF walks up from the least likely: drop while the cumulative mass (from the bottom)
            // stays <= 1 - top_p; the most likely token always stays.
            let mut below = 0.0;
            let floor = (1.0 - self.top_p) * total;
            for (i, &(q, _)) in probs.iter().enumerate().rev() {
                below += q;
                if below <= floor && i > 0 {
                    keep = i;
                } else {
                    break;
                }
            }
        }
        let kept = &probs[..keep];
        let mass: f64 = kept.iter().map(|&(q, _)| q).sum();
        let mut u = rng.next_f64() * mass;
        for &(q, id) in kept {
            if u < q {
                return id;
            }
            u -= q;
        }
        // Rounding left u at the end of the mass: the least likely kept token.
        kept.last().map_or(argmax(row) as u32, |&(_, id)| id)
    }
}

/// SplitMix64 (Steele, Lea & Flood 2014): a small, fast generator whose output for a seed is fixed
/// by this code, not by a dependency's version, so a seeded answer stays reproducible across builds.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A seed from the process' hasher keys (random per process and per call).
    pub fn from_entropy() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0);
        Self(h.finish())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Sampling of `rows` sequences (HF `_sample` with `do_sample=True`): the greedy loop of
/// [`greedy_scored`] with each row's token drawn by `s` instead of taken as the argmax, so
/// [`StepScorer::chosen`] (streaming, per-token provenance) is told each sampled token the same
/// way. Log-likelihoods are of the processed, unwarped scores (as greedy's).
pub fn sample_scored(
    scorer: &mut dyn StepScorer,
    rows: usize,
    p: &GenerationParams,
    s: &Sampling,
) -> Result<Hypotheses> {
    s.validate()?;
    let mut rngs: Vec<SplitMix64> = (0..rows)
        .map(|_| {
            s.seed
                .map_or_else(SplitMix64::from_entropy, SplitMix64::new)
        })
        .collect();
    decode_scored(scorer, rows, p, |r, row| s.draw(&mut rngs[r], row))
}

/// The one token-by-token loop behind greedy search and sampling: `pick(row, scores)` chooses a
/// live row's next token from its processed scores.
fn decode_scored(
    scorer: &mut dyn StepScorer,
    rows: usize,
    p: &GenerationParams,
    mut pick: impl FnMut(usize, &[f32]) -> u32,
) -> Result<Hypotheses> {
    let vocab = scorer.vocab_size();
    check_ids(p, vocab)?;
    let mut total = vec![0f32; rows];
    let mut seqs: Vec<Vec<u32>> = vec![vec![p.decoder_start_token_id]; rows];
    let mut unfinished = vec![true; rows];
    let mut last: Option<Vec<u32>> = None;
    while unfinished.iter().any(|&u| u) {
        let mut scores = scorer.next_scores(last.as_deref())?;
        if scores.len() != rows * vocab {
            bail!(
                "scorer returned {} scores for {rows} rows x {vocab}",
                scores.len()
            );
        }
        let mut next = Vec::with_capacity(rows);
        for (r, row) in scores.chunks_mut(vocab).enumerate() {
            process_row(p, &seqs[r], row);
            let tok = if unfinished[r] {
                pick(r, row)
            } else {
                p.pad_token_id
            };
            if unfinished[r] {
                let mut ls = row.to_vec();
                log_softmax(&mut ls);
                total[r] += ls[tok as usize];
            }
            next.push(tok);
        }
        scorer.chosen(&next, &unfinished)?;
        for r in 0..rows {
            seqs[r].push(next[r]);
            let len = seqs[r].len();
            if next[r] == p.eos_token_id || len >= p.max_length {
                unfinished[r] = false;
            }
        }
        last = Some(next);
    }
    Ok(Hypotheses {
        ids: seqs,
        logprobs: total,
    })
}

/// Beam search with HF transformers' vectorised algorithm (`_beam_search`, ≥ 4.50): `batch` items of
/// `num_beams` rows each (row `b * num_beams + k`). The scorer's scores are log-softmaxed, processed,
/// and accumulated. Returns `[batch * num_return_sequences][len]`, best first per item, right-filled
/// with `pad_token_id or eos_token_id` (HF's `output_fill_value`) to the longest returned hypothesis.
pub fn beam_search(
    scorer: &mut dyn StepScorer,
    batch: usize,
    p: &GenerationParams,
) -> Result<Vec<Vec<u32>>> {
    Ok(beam_search_scored(scorer, batch, p)?.ids)
}

/// [`beam_search`] with sequence log-likelihoods.
pub fn beam_search_scored(
    scorer: &mut dyn StepScorer,
    batch: usize,
    p: &GenerationParams,
) -> Result<Hypotheses> {
    let nb = p.num_beams;
    let vocab = scorer.vocab_size();
    check_ids(p, vocab)?;
    if p.num_return_sequences > nb {
        bail!(
            "`num_return_sequences` ({}) has to be smaller or equal to `num_beams` ({nb})",
            p.num_return_sequences
        );
    }
    let max_len = p.max_length;
    let prompt = 1usize;
    let fill = if p.pad_token_id != 0 {
        p.pad_token_id
    } else {
        p.eos_token_id
    };
    let keep = 2 * nb; // beams_to_keep = max(2, 1 + n_eos) * num_beams with one EOS id
    let neg = -1.0e9f32;

    let mut run_seq = vec![vec![vec![fill; max_len]; nb]; batch];
    for b in run_seq.iter_mut() {
        for s in b.iter_mut() {
            s[0] = p.decoder_start_token_id;
        }
    }
    let mut seqs = run_seq.clone();
    let mut run_scores = vec![vec![0f32; nb]; batch];
    for s in run_scores.iter_mut() {
        s[1..].iter_mut().for_each(|x| *x = neg);
    }
    let mut beam_scores = vec![vec![neg; nb]; batch];
    let mut finished = vec![vec![false; nb]; batch];
    let mut early_unsat = vec![true; batch];
    // Generated length of each hypothesis (HF tracks it through `beam_indices != -1`).
    let mut run_len = vec![vec![0usize; nb]; batch];
    let mut hyp_len = vec![vec![0usize; nb]; batch];

    let mut cur_len = prompt;
    let mut last: Option<Vec<u32>> = None;
    loop {
        let mut lp = scorer.next_scores(last.as_deref())?;
        if lp.len() != batch * nb * vocab {
            bail!(
                "scorer returned {} scores for {} rows x {vocab}",
                lp.len(),
                batch * nb
            );
        }
        for (r, row) in lp.chunks_mut(vocab).enumerate() {
            log_softmax(row);
            process_row(p, &run_seq[r / nb][r % nb][..cur_len], row);
        }
        let mut reorder = Vec::with_capacity(batch * nb);
        let mut all_hit = true;
        for b in 0..batch {
            // c. top-`keep` continuations over all beams of this item.
            let acc = &lp[b * nb * vocab..(b + 1) * nb * vocab];
            let mut cand: Vec<(f32, usize)> = acc
                .iter()
                .enumerate()
                .map(|(i, &v)| (v + run_scores[b][i / vocab], i))
                .collect();
            let top = top_k(&mut cand, keep);
            let mut t_seq = Vec::with_capacity(keep);
            let mut t_len = Vec::with_capacity(keep);
            let mut t_src = Vec::with_capacity(keep);
            let mut hits = Vec::with_capacity(keep);
            for &(_, i) in &top {
                let (beam, tok) = (i / vocab, (i % vocab) as u32);
                let mut s = run_seq[b][beam].clone();
                s[cur_len] = tok;
                t_seq.push(s);
                t_len.push(run_len[b][beam] + 1);
                t_src.push(beam);
                // d. stopping criteria: EOS, or max_length reached.
                hits.push(tok == p.eos_token_id || cur_len + 1 >= max_len);
            }
            all_hit &= hits.iter().all(|&h| h);
            // e. best `nb` unfinished continuations keep running.
            let mut running: Vec<(f32, usize)> = top
                .iter()
                .enumerate()
                .map(|(j, &(v, _))| (if hits[j] { v + neg } else { v }, j))
                .collect();
            let next_run = top_k(&mut running, nb);
            // f. finished hypotheses among the top `nb` compete with the stored ones.
            let denom = ((cur_len + 1 - prompt) as f64).powf(p.length_penalty) as f32;
            let batch_full =
                finished[b].iter().all(|&f| f) && p.early_stopping == EarlyStopping::True;
            let mut merged: Vec<(f32, usize)> = beam_scores[b]
                .iter()
                .enumerate()
                .map(|(k, &v)| (v, k))
                .collect();
            for (j, &(v, _)) in top.iter().enumerate() {
                let just_finished = hits[j] && j < nb;
                let mut s = v / denom;
                if batch_full {
                    s += neg;
                }
                if !early_unsat[b] {
                    s += neg;
                }
                if !just_finished {
                    s += neg;
                }
                merged.push((s, nb + j));
            }
            let best = top_k(&mut merged, nb);
            let (old_seq, old_len, old_fin) =
                (seqs[b].clone(), hyp_len[b].clone(), finished[b].clone());
            for (k, &(v, m)) in best.iter().enumerate() {
                beam_scores[b][k] = v;
                if m < nb {
                    seqs[b][k] = old_seq[m].clone();
                    hyp_len[b][k] = old_len[m];
                    finished[b][k] = old_fin[m];
                } else {
                    let j = m - nb;
                    seqs[b][k] = t_seq[j].clone();
                    hyp_len[b][k] = t_len[j];
                    finished[b][k] = hits[j] && j < nb;
                }
            }
            let mut new_seq = Vec::with_capacity(nb);
            for (k, &(v, j)) in next_run.iter().enumerate() {
                run_scores[b][k] = v;
                run_len[b][k] = t_len[j];
                new_seq.push(t_seq[j].clone());
                reorder.push(b * nb + t_src[j]);
            }
            run_seq[b] = new_seq;
        }
        scorer.reorder(&reorder)?;
        last = Some(
            (0..batch * nb)
                .map(|r| run_seq[r / nb][r % nb][cur_len])
                .collect(),
        );
        cur_len += 1;
        // g. can the running beams still beat the worst finished hypothesis?
        let best_len = if p.early_stopping == EarlyStopping::Never && p.length_penalty > 0.0 {
            max_len - prompt
        } else {
            cur_len - prompt
        };
        let denom = (best_len as f64).powf(p.length_penalty) as f32;
        for b in 0..batch {
            let best_possible = run_scores[b][0] / denom;
            let worst = beam_scores[b].iter().copied().fold(f32::INFINITY, f32::min);
            let improvable =
                (0..nb).any(|k| best_possible > if finished[b][k] { worst } else { neg });
            early_unsat[b] = early_unsat[b] && improvable;
        }
        let improvement_possible = early_unsat.iter().any(|&u| u);
        let all_done = finished.iter().all(|f| f.iter().all(|&x| x))
            && p.early_stopping == EarlyStopping::True;
        if !improvement_possible || all_done || all_hit {
            break;
        }
    }
    let nrs = p.num_return_sequences;
    let gen_len = (0..batch)
        .flat_map(|b| hyp_len[b][..nrs].iter().copied())
        .max()
        .unwrap_or(0);
    let out_len = prompt + gen_len;
    let ids = (0..batch)
        .flat_map(|b| {
            seqs[b][..nrs]
                .iter()
                .map(|s| s[..out_len].to_vec())
                .collect::<Vec<_>>()
        })
        .collect();
    let logprobs = (0..batch)
        .flat_map(|b| (0..nrs).map(move |k| (b, k)))
        .map(|(b, k)| beam_scores[b][k] * (hyp_len[b][k] as f64).powf(p.length_penalty) as f32)
        .collect();
    Ok(Hypotheses { ids, logprobs })
}

/// The `k` largest `(value, index)` pairs, best first; equal values keep the lower index first.
fn top_k(cand: &mut [(f32, usize)], k: usize) -> Vec<(f32, usize)> {
    let k = k.min(cand.len());
    let cmp = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if k < cand.len() {
        cand.select_nth_unstable_by(k, cmp);
    }
    let mut top = cand[..k].to_vec();
    top.sort_by(cmp);
    top
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rag::config::GenerationSettings;

    /// A fixed table of next-token distributions keyed by the row's last token.
    struct Table {
        vocab: usize,
        rows: Vec<u32>,
        table: Vec<Vec<f32>>,
        /// What [`StepScorer::chosen`] was told.
        chosen: Vec<(Vec<u32>, Vec<bool>)>,
    }

    impl StepScorer for Table {
        fn next_scores(&mut self, last: Option<&[u32]>) -> Result<Vec<f32>> {
            if let Some(l) = last {
                self.rows = l.to_vec();
            }
            Ok(self
                .rows
                .iter()
                .flat_map(|&t| self.table[t as usize].iter().map(|p| p.ln()))
                .collect())
        }
        fn reorder(&mut self, rows: &[usize]) -> Result<()> {
            self.rows = rows.iter().map(|&r| self.rows[r]).collect();
            Ok(())
        }
        fn vocab_size(&self) -> usize {
            self.vocab
        }
        fn chosen(&mut self, tokens: &[u32], live: &[bool]) -> Result<()> {
            self.chosen.push((tokens.to_vec(), live.to_vec()));
            Ok(())
        }
    }

    fn params(beams: usize, nrs: usize) -> GenerationParams {
        GenerationSettings {
            max_length: Some(6),
            num_beams: Some(beams),
            num_return_sequences: Some(nrs),
            decoder_start_token_id: Some(0),
            eos_token_id: Some(1),
            pad_token_id: Some(0),
            ..Default::default()
        }
        .resolve()
        .unwrap()
    }

    // tokens: 0 start/pad, 1 eos, 2 a, 3 b. After start: a 0.6, b 0.4. After a: eos 0.5, b 0.5 (tie broken
    // to eos by index), after b: eos 0.9.
    fn table() -> Table {
        Table {
            vocab: 4,
            rows: vec![0],
            table: vec![
                vec![1e-9, 1e-9, 0.6, 0.4],
                vec![1e-9, 0.97, 0.01, 0.01],
                vec![1e-9, 0.3, 0.05, 0.65],
                vec![1e-9, 0.9, 0.05, 0.05],
            ],
            chosen: Vec::new(),
        }
    }

    #[test]
    fn logits_processors_follow_hf() {
        let mut p = params(1, 1);
        p.no_repeat_ngram_size = 2;
        p.bad_words_ids = vec![vec![3], vec![2, 1]];
        p.min_length = 4;
        // input 0 2 3 2: bigram (2, 3) seen -> 3 banned after 2; bad word 3 always; [2, 1] bans 1 after 2;
        // min_length 4 not reached -> eos (1) banned.
        let mut s = vec![0.0f32; 4];
        process_row(&p, &[0, 2, 3, 2], &mut s);
        assert_eq!(s, vec![0.0, f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY]);
        // forced BOS at length 1, forced EOS at max_length - 1 (max_length 6).
        p.forced_bos_token_id = Some(2);
        p.forced_eos_token_id = Some(1);
        p.min_length = 0;
        let mut s = vec![0.5f32; 4];
        process_row(&p, &[0], &mut s);
        assert_eq!(
            s,
            vec![f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY]
        );
        let mut s = vec![0.5f32; 4];
        process_row(&p, &[0, 2, 3, 2, 2], &mut s);
        assert_eq!(
            s,
            vec![f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, f32::NEG_INFINITY]
        );
    }

    #[test]
    fn greedy_follows_the_argmax_and_pads() -> Result<()> {
        let mut t = table();
        t.rows = vec![0, 0];
        let out = greedy(&mut t, 2, &params(1, 1))?;
        assert_eq!(out, vec![vec![0, 2, 3, 1], vec![0, 2, 3, 1]]);
        // Each step's tokens are told as chosen, every row live until its EOS.
        let told: Vec<u32> = t.chosen.iter().map(|(tok, _)| tok[0]).collect();
        assert_eq!(told, vec![2, 3, 1]);
        assert!(t.chosen.iter().all(|(_, live)| live == &[true, true]));
        Ok(())
    }

    fn sampled(t: f64, top_p: f64, seed: u64) -> Result<(Vec<u32>, Vec<u32>)> {
        let mut tab = table();
        let s = Sampling {
            temperature: t,
            top_p,
            seed: Some(seed),
        };
        let out = sample_scored(&mut tab, 1, &params(1, 1), &s)?;
        let told = tab.chosen.iter().map(|(tok, _)| tok[0]).collect();
        Ok((out.ids[0].clone(), told))
    }

    #[test]
    fn sampling_is_seeded_and_tends_to_greedy() -> Result<()> {
        let greedy_ids = greedy(&mut table(), 1, &params(1, 1))?[0].clone();
        // Same seed, same draws; each drawn token is told as chosen (streaming provenance).
        let (a, told) = sampled(1.0, 1.0, 42)?;
        assert_eq!(a, sampled(1.0, 1.0, 42)?.0);
        assert_eq!(told, a[1..].to_vec());
        // Other seeds reach other sequences (a b eos, b eos, a eos ...).
        let distinct: std::collections::BTreeSet<Vec<u32>> = (0..20)
            .map(|s| sampled(1.0, 1.0, s).map(|x| x.0))
            .collect::<Result<_>>()?;
        assert!(distinct.len() > 1, "{distinct:?}");
        // T -> 0 and a tiny nucleus are greedy, whatever the seed.
        for seed in 0..20 {
            assert_eq!(sampled(1e-4, 1.0, seed)?.0, greedy_ids);
            assert_eq!(sampled(1.0, 1e-9, seed)?.0, greedy_ids);
            assert_eq!(sampled(1.0, 0.0, seed)?.0, greedy_ids);
        }
        Ok(())
    }

    #[test]
    fn draws_follow_the_warped_distribution() {
        // log-probs of a 0.6 / b 0.4 (and banned tokens).
        let row = [
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
            0.6f32.ln(),
            0.4f32.ln(),
        ];
        let freq = |t: f64, top_p: f64| {
            let s = Sampling {
                temperature: t,
                top_p,
                seed: None,
            };
            let mut rng = SplitMix64::new(9);
            (0..20_000).filter(|_| s.draw(&mut rng, &row) == 2).count() as f64 / 20_000.0
        };
        assert!((freq(1.0, 1.0) - 0.6).abs() < 0.02);
        // T = 2: p ∝ sqrt(0.6), sqrt(0.4) -> 0.5505.
        assert!((freq(2.0, 1.0) - 0.5505).abs() < 0.02);
        // HF top-p: b (0.4) is dropped when 0.4 <= 1 - top_p, i.e. top_p <= 0.6; kept above.
        assert_eq!(freq(1.0, 0.5), 1.0);
        assert!((freq(1.0, 0.7) - 0.6).abs() < 0.02);
        // Every token banned: the argmax, as greedy.
        let mut rng = SplitMix64::new(1);
        let s = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            seed: None,
        };
        assert_eq!(s.draw(&mut rng, &[f32::NEG_INFINITY; 3]), 0);
        assert!(Sampling {
            temperature: 0.0,
            ..s
        }
        .validate()
        .is_err());
        assert!(Sampling { top_p: 1.5, ..s }.validate().is_err());
    }

    #[test]
    fn beam_search_finds_the_better_sequence() -> Result<()> {
        // a b eos: ln(.351)/3 = -0.349 beats b eos: ln(.36)/2 = -0.511 (length penalty 1.0);
        // the shorter one is right-filled with eos because pad is 0.
        let mut t = table();
        t.rows = vec![0, 0];
        let out = beam_search(&mut t, 1, &params(2, 2))?;
        assert_eq!(out[0], vec![0, 2, 3, 1]);
        assert_eq!(out[1], vec![0, 3, 1, 1]);
        Ok(())
    }
}
