//! Decoding loops with HF transformers' semantics: logits processors, greedy search (`_sample` without
//! sampling) and the vectorised beam search of transformers ≥ 4.50 (`_beam_search`), over any
//! [`StepScorer`] — the RAG-Token marginal or a plain generator.

use crate::rag::config::{EarlyStopping, GenerationParams};
use anyhow::{bail, Result};

/// Supplies next-token scores for the live rows of a search.
pub trait StepScorer {
    /// Scores `[rows * vocab]` (row-major) for the next token of every row. `last`: the token each row
    /// consumed last (`None` on the first call, when every row holds only the decoder start token).
    fn next_scores(&mut self, last: Option<&[u32]>) -> Result<Vec<f32>>;
    /// Keep/reorder/duplicate rows: new row `i` continues old row `rows[i]`.
    fn reorder(&mut self, rows: &[usize]) -> Result<()>;
    fn vocab_size(&self) -> usize;
    /// The token [`greedy`] chose for every row at this step; `live[r]`: row `r` had not finished,
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
                argmax(row) as u32
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
