//! `rustrag retrieve`: top-k passages for questions from a knowledge base.

use super::printable;
use anyhow::{bail, Result};
use rustrag::kb::{HnswParams, KnowledgeBase};
use rustrag::retrieve::dense::DenseRetriever;
use rustrag::retrieve::rerank::{RerankConfig, RerankingRetriever};
use rustrag::retrieve::Retriever;
use std::path::PathBuf;
use std::sync::Arc;

/// Upper bound of `--k` (each question keeps a k-long candidate list).
const MAX_K: usize = 10_000;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Knowledge base directory.
    #[arg(long)]
    pub kb: PathBuf,
    /// Question(s).
    #[arg(long, required = true, num_args = 1..)]
    pub query: Vec<String>,
    /// Passages per question (1..=10000).
    #[arg(long, default_value_t = 5)]
    pub k: usize,
    /// HNSW candidate list size (default: the KB's; 1..=10000); ignored with --exact.
    #[arg(long)]
    pub ef_search: Option<usize>,
    /// Exact inner-product search even when the KB has an HNSW graph.
    #[arg(long)]
    pub exact: bool,
    /// Question encoder (default: the encoder recorded in the KB manifest).
    #[arg(long)]
    pub encoder: Option<String>,
    /// Characters of passage text to print (text output).
    #[arg(long, default_value_t = 160)]
    pub width: usize,
    #[command(flatten)]
    pub rerank: RerankArgs,
}

/// Cross-encoder reranking flags (`retrieve`, `ask`, `eval retrieval`).
#[derive(clap::Args, Debug, Clone)]
pub struct RerankArgs {
    /// Rerank with this cross-encoder (sentence-transformers CrossEncoder directory:
    /// BertForSequenceClassification / XLMRobertaForSequenceClassification, one label).
    #[arg(long)]
    pub rerank: Option<String>,
    /// Passages the first stage returns per question for the reranker (1..=10000).
    #[arg(long, default_value_t = 100, requires = "rerank")]
    pub rerank_candidates: usize,
    /// (question, passage) pairs per cross-encoder forward pass.
    #[arg(long, default_value_t = 32, requires = "rerank")]
    pub rerank_batch_size: usize,
    /// τ_rerank of the doc prior softmax(rerank_score / τ_rerank) (`ask`).
    #[arg(long, default_value_t = 1.0, requires = "rerank")]
    pub rerank_temperature: f64,
}

impl RerankArgs {
    /// The library's settings (checked), if --rerank was given.
    pub fn config(&self) -> Result<Option<RerankConfig>> {
        let Some(model) = &self.rerank else {
            return Ok(None);
        };
        let c = RerankConfig {
            batch_size: self.rerank_batch_size,
            temperature: self.rerank_temperature,
            ..RerankConfig::new(model, self.rerank_candidates)
        };
        c.check()?;
        Ok(Some(c))
    }

    /// `first`, reranked when --rerank was given.
    pub fn wrap(&self, first: Box<dyn Retriever>) -> Result<Box<dyn Retriever>> {
        Ok(match self.config()? {
            Some(c) => Box::new(RerankingRetriever::from_config(first, &c)?),
            None => first,
        })
    }
}

pub fn run(args: Args, json: bool) -> Result<()> {
    if !(1..=MAX_K).contains(&args.k) {
        bail!("--k {} is out of bounds: it must be in 1..={MAX_K}", args.k);
    }
    if let Some(i) = args.query.iter().position(|q| q.trim().is_empty()) {
        bail!(
            "--query number {} is empty: there is nothing to retrieve for",
            i + 1
        );
    }
    if let Some(ef) = args.ef_search {
        if !(1..=HnswParams::MAX_EF).contains(&ef) {
            bail!(
                "--ef-search {ef} is out of bounds: it must be in 1..={}",
                HnswParams::MAX_EF
            );
        }
    }
    let kb = Arc::new(KnowledgeBase::open(&args.kb)?);
    let m = kb.manifest().clone();
    let encoder = match &args.encoder {
        Some(spec) => super::index::load_encoder(spec, 32, None, false, None)?,
        None => super::index::manifest_encoder(&kb, 32, None, false)?,
    };
    let ef = match (args.exact, &m.hnsw) {
        (true, _) | (false, None) => None,
        (false, Some(h)) => Some(args.ef_search.unwrap_or(h.ef_search)),
    };
    if args.ef_search.is_some() && m.hnsw.is_none() && !args.exact {
        bail!(
            "{} has no HNSW index; drop --ef-search or rebuild with `rustrag index build --hnsw`",
            args.kb.display()
        );
    }
    let dense = DenseRetriever::new(kb, Some(Arc::from(encoder)), ef)?;
    let retriever = args.rerank.wrap(Box::new(dense))?;
    let queries: Vec<&str> = args.query.iter().map(|s| s.as_str()).collect();
    let t0 = std::time::Instant::now();
    let hits = retriever.retrieve(&queries, None, args.k)?;
    let seconds = t0.elapsed().as_secs_f64();
    let mode = if ef.is_some() { "hnsw" } else { "exact" };
    if json {
        let results: Vec<_> = queries
            .iter()
            .zip(&hits)
            .map(|(q, h)| {
                let hits: Vec<_> = (0..h.doc_ids.len())
                    .map(|i| {
                        serde_json::json!({"rank": i + 1, "row": h.doc_ids[i], "score": h.scores[i], "id": h.passages[i].id,
                                           "title": h.passages[i].title, "text": h.passages[i].text})
                    })
                    .collect();
                serde_json::json!({"query": q, "hits": hits})
            })
            .collect();
        let out = serde_json::json!({"kb": args.kb.display().to_string(), "search": mode, "ef_search": ef, "k": args.k,
                                     "rerank": args.rerank.config()?, "seconds": seconds, "results": results});
        outln!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for (q, h) in queries.iter().zip(&hits) {
        outln!("query: {}", printable(q));
        for (i, p) in h.passages.iter().enumerate() {
            let text: String = p.text.chars().take(args.width).collect();
            let text = printable(&text);
            let more = if p.text.chars().count() > args.width {
                "…"
            } else {
                ""
            };
            outln!(
                "  {:>2}. {:.4}  [{}] {} — {text}{more}",
                i + 1,
                h.scores[i],
                printable(&p.id),
                printable(&p.title)
            );
        }
    }
    Ok(())
}
