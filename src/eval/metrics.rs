//! Retrieval metrics computed exactly as trec_eval 9.0.8 (and so pytrec_eval/BEIR) computes them:
//!
//! - a run is re-ranked by score descending, ties broken by doc id descending (byte order), whatever
//!   order the retriever returned — trec_eval ignores ranks;
//! - relevant means grade >= `relevance_level` (default 1); nDCG gains are the raw grades (> 0), discount
//!   `log2(rank + 1)`, ideal DCG over all judged grades of the query cut at the same depth;
//! - a query whose judgements have no relevant doc scores 0; queries in the run without judgements are
//!   skipped; judged queries missing from the run are skipped unless `complete` (trec_eval `-c`), where
//!   they count as 0;
//! - duplicate doc ids in a query's run or judgements are an error (trec_eval refuses them too).
//!
//! `recip_rank` with a cutoff (MRR@k) is trec_eval's `recip_rank` computed on the top k.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{bail, Result};
use serde::Serialize;

/// Relevance judgements: query id -> (doc id -> grade).
pub type Qrels = BTreeMap<String, HashMap<String, i64>>;

/// A run: query id -> retrieved `(doc id, score)` in any order.
pub type Run = BTreeMap<String, Vec<(String, f64)>>;

/// Which measures at which cutoffs.
#[derive(Clone, Debug, Serialize)]
pub struct MetricSpec {
    pub ndcg_cut: Vec<usize>,
    pub recall: Vec<usize>,
    pub recip_rank_cut: Vec<usize>,
    /// `all_rel_k`: 1 when every relevant doc is in the top k (multi-hop "both supporting passages"
    /// recall; not a trec_eval measure), 0 otherwise or when nothing is relevant.
    pub all_relevant: Vec<usize>,
    /// Grade at or above which a doc is relevant (trec_eval `-l`, default 1).
    pub relevance_level: i64,
    /// Count judged queries absent from the run as zeros (trec_eval `-c`).
    pub complete: bool,
}

impl Default for MetricSpec {
    /// nDCG@10, recall@{1,5,20,100}, MRR@10.
    fn default() -> Self {
        Self {
            ndcg_cut: vec![10],
            recall: vec![1, 5, 20, 100],
            recip_rank_cut: vec![10],
            all_relevant: vec![],
            relevance_level: 1,
            complete: false,
        }
    }
}

/// Scores of one query, keyed by measure name (`ndcg_cut_10`, `recall_5`, `recip_rank_10`).
pub type QueryScores = BTreeMap<String, f64>;

/// Mean scores over the evaluated queries.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub num_queries: usize,
    /// Measure name -> mean over `num_queries`.
    pub mean: BTreeMap<String, f64>,
    /// Query id -> its scores.
    pub per_query: BTreeMap<String, QueryScores>,
}

/// trec_eval's ranking: score descending, then doc id descending (`strcmp`). Errors on duplicate docs.
pub fn trec_rank<'a>(query: &str, docs: &'a [(String, f64)]) -> Result<Vec<&'a (String, f64)>> {
    let mut ranked: Vec<&(String, f64)> = docs.iter().collect();
    ranked.sort_by(|a, b| {
        b.1.total_cmp(&a.1)
            .then_with(|| b.0.as_bytes().cmp(a.0.as_bytes()))
    });
    let mut seen = HashSet::with_capacity(docs.len());
    for (d, _) in &ranked {
        if !seen.insert(d.as_str()) {
            bail!("query {query}: doc {d} is retrieved twice");
        }
    }
    Ok(ranked)
}

/// Scores of one query given its judgements and its retrieved docs.
pub fn evaluate_query(
    query: &str,
    judged: &HashMap<String, i64>,
    docs: &[(String, f64)],
    spec: &MetricSpec,
) -> Result<QueryScores> {
    let ranked = trec_rank(query, docs)?;
    let grades: Vec<i64> = ranked
        .iter()
        .map(|(d, _)| judged.get(d).copied().unwrap_or(0))
        .collect();
    let relevant = |g: i64| g >= spec.relevance_level;
    let num_rel = judged.values().filter(|&&g| relevant(g)).count();
    let mut ideal: Vec<i64> = judged.values().copied().filter(|&g| g > 0).collect();
    ideal.sort_unstable_by(|a, b| b.cmp(a));

    let mut out = QueryScores::new();
    for &k in &spec.ndcg_cut {
        let dcg = dcg(grades.iter().copied().take(k));
        let idcg = dcg_of_sorted(&ideal, k);
        out.insert(
            format!("ndcg_cut_{k}"),
            if idcg > 0.0 { dcg / idcg } else { dcg },
        );
    }
    for &k in &spec.recall {
        let rel_ret = grades.iter().take(k).filter(|&&g| relevant(g)).count();
        let v = if num_rel > 0 {
            rel_ret as f64 / num_rel as f64
        } else {
            0.0
        };
        out.insert(format!("recall_{k}"), v);
    }
    for &k in &spec.recip_rank_cut {
        let first = grades.iter().take(k).position(|&g| relevant(g));
        out.insert(
            format!("recip_rank_{k}"),
            first.map_or(0.0, |i| 1.0 / (i + 1) as f64),
        );
    }
    for &k in &spec.all_relevant {
        let rel_ret = grades.iter().take(k).filter(|&&g| relevant(g)).count();
        out.insert(
            format!("all_rel_{k}"),
            f64::from(u8::from(num_rel > 0 && rel_ret == num_rel)),
        );
    }
    Ok(out)
}

/// `Σ_i gain_i / log2(i + 2)` over positive gains (0-based `i`).
fn dcg(gains: impl Iterator<Item = i64>) -> f64 {
    gains
        .enumerate()
        .filter(|&(_, g)| g > 0)
        .map(|(i, g)| g as f64 / ((i + 2) as f64).log2())
        .sum()
}

fn dcg_of_sorted(ideal: &[i64], k: usize) -> f64 {
    dcg(ideal.iter().copied().take(k))
}

/// Evaluate a run against judgements (trec_eval semantics, see the module docs).
pub fn evaluate(qrels: &Qrels, run: &Run, spec: &MetricSpec) -> Result<Report> {
    let empty: Vec<(String, f64)> = Vec::new();
    let mut per_query = BTreeMap::new();
    for (q, judged) in qrels {
        let docs = match run.get(q) {
            Some(d) => d,
            None if spec.complete => &empty,
            None => continue,
        };
        per_query.insert(q.clone(), evaluate_query(q, judged, docs, spec)?);
    }
    let n = per_query.len();
    let mut mean: BTreeMap<String, f64> = BTreeMap::new();
    for scores in per_query.values() {
        for (m, v) in scores {
            *mean.entry(m.clone()).or_default() += v;
        }
    }
    for v in mean.values_mut() {
        *v /= n as f64;
    }
    Ok(Report {
        num_queries: n,
        mean,
        per_query,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qrels(q: &str, j: &[(&str, i64)]) -> HashMap<String, i64> {
        let _ = q;
        j.iter().map(|(d, g)| (d.to_string(), *g)).collect()
    }

    fn docs(d: &[(&str, f64)]) -> Vec<(String, f64)> {
        d.iter().map(|(d, s)| (d.to_string(), *s)).collect()
    }

    #[test]
    fn ties_break_by_docno_descending() {
        let d = docs(&[("a", 1.0), ("c", 1.0), ("b", 2.0)]);
        let r: Vec<&str> = trec_rank("q", &d)
            .unwrap()
            .iter()
            .map(|x| x.0.as_str())
            .collect();
        assert_eq!(r, ["b", "c", "a"]);
        assert!(trec_rank("q", &docs(&[("a", 1.0), ("a", 0.5)])).is_err());
    }

    #[test]
    fn graded_ndcg_by_hand() {
        // Ranking d1 (0), d2 (2), d3 (1); judged grades d2=2, d3=1, d4=3.
        let spec = MetricSpec {
            ndcg_cut: vec![2, 10],
            recall: vec![1, 3],
            recip_rank_cut: vec![1, 10],
            all_relevant: vec![3],
            ..Default::default()
        };
        let j = qrels("q", &[("d2", 2), ("d3", 1), ("d4", 3), ("d1", 0)]);
        let s = evaluate_query(
            "q",
            &j,
            &docs(&[("d1", 3.0), ("d2", 2.0), ("d3", 1.0)]),
            &spec,
        )
        .unwrap();
        let l = |x: f64| x.log2();
        let dcg10 = 2.0 / l(3.0) + 1.0 / l(4.0);
        let idcg10 = 3.0 + 2.0 / l(3.0) + 1.0 / l(4.0);
        assert!((s["ndcg_cut_10"] - dcg10 / idcg10).abs() < 1e-12);
        assert!((s["ndcg_cut_2"] - (2.0 / l(3.0)) / (3.0 + 2.0 / l(3.0))).abs() < 1e-12);
        assert_eq!(s["recall_1"], 0.0);
        assert!((s["recall_3"] - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(s["recip_rank_1"], 0.0);
        assert_eq!(s["recip_rank_10"], 0.5);
        assert_eq!(s["all_rel_3"], 0.0);
    }
}
