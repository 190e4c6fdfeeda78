//! Evaluation: retrieval metrics as trec_eval computes them ([`metrics`]), SQuAD EM/F1 ([`qa`]), a
//! pipeline answering a question file, scored ([`answers`]), BEIR readers ([`beir`]) and a runner
//! that turns a [`Retriever`] plus queries into a run.

pub mod answers;
pub mod beir;
pub mod metrics;
pub mod qa;

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{bail, Result};

use crate::kb::split::document_id;
use crate::retrieve::Retriever;
use beir::Query;
use metrics::Run;

/// A run plus how long it took.
pub struct TimedRun {
    pub run: Run,
    /// Wall time of all `retrieve` calls.
    pub seconds: f64,
}

/// Retrieve the top `k` passages for every query, `batch` queries per `retrieve` call, and key the
/// results by document id: a passage `<doc>#<chunk>` of a split document counts for `<doc>` with the
/// best score of its passages (so a run never holds a document twice).
pub fn run_queries(
    retriever: &dyn Retriever,
    queries: &[Query],
    k: usize,
    batch: usize,
) -> Result<TimedRun> {
    if batch == 0 {
        bail!("batch size must be > 0");
    }
    let bar = progress(queries.len() as u64, "retrieve");
    let mut run = Run::new();
    let mut seconds = 0.0;
    for chunk in queries.chunks(batch) {
        let texts: Vec<&str> = chunk.iter().map(|q| q.text.as_str()).collect();
        let t = Instant::now();
        let hits = retriever.retrieve(&texts, None, k)?;
        seconds += t.elapsed().as_secs_f64();
        if hits.len() != chunk.len() {
            bail!(
                "retriever returned {} result lists for {} queries",
                hits.len(),
                chunk.len()
            );
        }
        for (q, h) in chunk.iter().zip(hits) {
            if h.passages.len() != h.scores.len() {
                bail!(
                    "query {}: {} passages for {} scores",
                    q.id,
                    h.passages.len(),
                    h.scores.len()
                );
            }
            let mut best: HashMap<String, f64> = HashMap::with_capacity(h.scores.len());
            for (p, s) in h.passages.iter().zip(&h.scores) {
                let s = f64::from(*s);
                let e = best.entry(document_id(&p.id).to_string()).or_insert(s);
                *e = e.max(s);
            }
            run.insert(q.id.clone(), best.into_iter().collect());
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(TimedRun { run, seconds })
}

pub use crate::progress::bar as progress;

/// Write a run in TREC format (`qid Q0 docid rank score tag`), ranked as trec_eval ranks it.
pub fn write_trec_run(run: &Run, tag: &str, out: &mut impl std::io::Write) -> Result<()> {
    for (q, docs) in run {
        for (rank, (d, s)) in metrics::trec_rank(q, docs)?.into_iter().enumerate() {
            writeln!(out, "{q} Q0 {d} {} {s} {tag}", rank + 1)?;
        }
    }
    Ok(())
}
