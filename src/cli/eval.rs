//! `rustrag eval retrieval` (nDCG@10, recall@{1,5,20,100}, MRR@10 as trec_eval computes them) and
//! `rustrag eval qa` (answers from the pipeline, or given, scored with SQuAD EM/F1).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::pipeline_args::PipelineArgs;
use rustrag::encoders::{load_encoder, LoadOptions, TextEncoder};
use rustrag::eval::answers::{self, read_examples};
use rustrag::eval::beir::{read_qrels, read_queries, Query};
use rustrag::eval::metrics::{evaluate, MetricSpec, Report};
use rustrag::eval::{progress, qa, run_queries, write_trec_run};
use rustrag::kb::atomic::write_file_atomic;
use rustrag::kb::KnowledgeBase;
use rustrag::rag::pipeline::AnswerOptions;
use rustrag::retrieve::analysis::{AnalyzerConfig, StemmerKind};
use rustrag::retrieve::bm25::{build_index, Bm25Config, Bm25Params, Bm25Retriever, FieldLayout};
use rustrag::retrieve::dense::DenseRetriever;
use rustrag::retrieve::hybrid::{Fusion, HybridRetriever, ScoreNorm};
use rustrag::retrieve::{Passage, Retriever};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

// Parsed once per process: the size difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(clap::Subcommand, Debug)]
pub enum What {
    /// Retrieval quality on BEIR-format data.
    Retrieval(RetrievalArgs),
    /// SQuAD exact match / F1: answer a question file through the pipeline (closed book, RAG-Token
    /// or RAG-Sequence) and score it, or score a predictions file.
    Qa(QaArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RetrieverKind {
    Bm25,
    Dense,
    Hybrid,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FusionKind {
    Rrf,
    Weighted,
}

#[derive(clap::Args, Debug)]
pub struct RetrievalArgs {
    /// BEIR corpus.jsonl(.gz) (`_id`, `title`, `text`).
    #[arg(long)]
    pub corpus: PathBuf,
    /// queries.jsonl(.gz) (`_id`/`id`, `text`/`question`).
    #[arg(long)]
    pub queries: PathBuf,
    /// qrels TSV (`query-id corpus-id score`) or TREC qrels.
    #[arg(long)]
    pub qrels: PathBuf,
    #[arg(long, value_enum, default_value = "bm25")]
    pub retriever: RetrieverKind,
    /// Query encoder (dense, hybrid).
    #[arg(long)]
    pub encoder: Option<PathBuf>,
    /// Knowledge base directory (dense, hybrid; build it with `rustrag index build`). With --kb the BM25
    /// index is built from the KB's passages and lives in `<kb>/bm25` unless --index.
    #[arg(long)]
    pub kb: Option<PathBuf>,
    /// Search the KB's HNSW graph with this ef (default: exact inner-product search).
    #[arg(long)]
    pub ef_search: Option<usize>,
    /// BM25 index directory: built from --corpus if it holds no index (or with --rebuild). Without
    /// --index and --kb, a temporary index is built.
    #[arg(long)]
    pub index: Option<PathBuf>,
    /// Rebuild the BM25 index even if one exists.
    #[arg(long)]
    pub rebuild: bool,
    /// Passages retrieved per query (1..=10000).
    #[arg(long, default_value_t = 100)]
    pub k: usize,
    /// Queries per retrieve call.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Title and text as one field (flat) or two (multifield).
    #[arg(long, value_enum, default_value = "flat")]
    pub layout: FieldLayout,
    #[arg(long, value_enum, default_value = "porter")]
    pub stemmer: StemmerKind,
    /// Keep stopwords (default: drop Lucene's English stopwords).
    #[arg(long)]
    pub keep_stopwords: bool,
    #[arg(long, default_value_t = 0.9)]
    pub k1: f32,
    #[arg(long, default_value_t = 0.4)]
    pub b: f32,
    /// Title field weight (multifield).
    #[arg(long, default_value_t = 1.0)]
    pub title_boost: f32,
    #[arg(long, value_enum, default_value = "rrf")]
    pub fusion: FusionKind,
    /// RRF constant.
    #[arg(long, default_value_t = 60.0)]
    pub rrf_k: f32,
    /// Dense weight in weighted fusion.
    #[arg(long, default_value_t = 0.5)]
    pub dense_weight: f32,
    #[arg(long, value_enum, default_value = "min-max")]
    pub norm: ScoreNorm,
    /// Candidates per retriever before fusion.
    #[arg(long, default_value_t = 1000)]
    pub depth: usize,
    /// Also report `all_rel_K` (all relevant docs in the top K), e.g. 10 for HotpotQA.
    #[arg(long)]
    pub all_relevant: Vec<usize>,
    /// Count judged queries that got no results as zeros (trec_eval -c).
    #[arg(long)]
    pub complete: bool,
    /// Also time BM25 one query at a time (top-k rows only, and with stored passages): mean/p50/p99.
    #[arg(long)]
    pub latency: bool,
    /// Write the run in TREC format here.
    #[arg(long)]
    pub run_out: Option<PathBuf>,
    /// Rerank each query's first-stage candidates with a cross-encoder, then keep --k.
    #[command(flatten)]
    pub rerank: super::retrieve::RerankArgs,
}

#[derive(clap::Args, Debug)]
pub struct QaArgs {
    /// Questions with `answers`: JSONL(.gz) lines with `question`, `answers`, optional `id` and
    /// `gold_pid` (e.g. squad-dev/queries.jsonl.gz).
    #[arg(long, visible_alias = "queries")]
    pub questions: PathBuf,
    /// Score these predictions instead of answering: a JSON object `{question id: answer}` (the
    /// official SQuAD format) or JSONL lines `{"id": ..., "prediction": ...}`.
    #[arg(long, conflicts_with_all = ["kb", "generator", "model"])]
    pub predictions: Option<PathBuf>,
    /// Answer this many questions spread evenly over the file (question `i * N / count`).
    #[arg(long)]
    pub sample: Option<usize>,
    /// Write every question's prediction, scores, gold rank and prior here (JSONL, one line per
    /// question as soon as its batch is done).
    #[arg(long)]
    pub records: Option<PathBuf>,
    /// Write an HTML report here (summary, correctness against the gold passage's prior, every
    /// question).
    #[arg(long)]
    pub html: Option<PathBuf>,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
}

pub fn run(args: Args, json: bool) -> Result<()> {
    match args.what {
        What::Retrieval(a) => retrieval(a, json),
        What::Qa(a) => qa_eval(a, json),
    }
}

/// The BM25 configuration asked for; its source is the KB generation (rows must match the dense side)
/// or the corpus file.
fn bm25_config(a: &RetrievalArgs) -> Result<Bm25Config> {
    let source = match &a.kb {
        Some(dir) => KnowledgeBase::open(dir)?
            .dir()
            .canonicalize()?
            .display()
            .to_string(),
        None => a
            .corpus
            .canonicalize()
            .with_context(|| format!("{}", a.corpus.display()))?
            .display()
            .to_string(),
    };
    Ok(Bm25Config {
        analyzer: AnalyzerConfig {
            stopwords: !a.keep_stopwords,
            stemmer: a.stemmer,
            ..AnalyzerConfig::default()
        },
        layout: a.layout,
        source: Some(source),
    })
}

fn open_kb(a: &RetrievalArgs) -> Result<Arc<KnowledgeBase>> {
    let dir = a
        .kb
        .as_ref()
        .context("--retriever dense/hybrid needs --kb DIR (build it with `rustrag index build`)")?;
    Ok(Arc::new(KnowledgeBase::open(dir)?))
}

/// The passages a BM25 index is built from: the knowledge base's (so that rows match the dense side)
/// when `--kb` is given, else the corpus file.
fn bm25_passages(a: &RetrievalArgs) -> Result<Vec<Passage>> {
    match &a.kb {
        Some(dir) => KnowledgeBase::open(dir)?.passages().all(),
        None => corpus_passages(&a.corpus),
    }
}

pub use rustrag::eval::beir::corpus_passages;

/// Open the BM25 index at `dir`, building it when missing, built with another analysis, or when
/// `rebuild`.
fn open_or_build_bm25(
    dir: &Path,
    a: &RetrievalArgs,
    build_info: &mut Option<f64>,
) -> Result<Bm25Retriever> {
    let params = Bm25Params {
        k1: a.k1,
        b: a.b,
        title_boost: a.title_boost,
    };
    let config = bm25_config(a)?;
    if !a.rebuild {
        if let Ok(r) = Bm25Retriever::open(dir, params) {
            if r.manifest().config == config {
                return Ok(r);
            }
            tracing::info!(
                "BM25 index in {} has another configuration or source; rebuilding",
                dir.display()
            );
        }
    }
    let corpus = bm25_passages(a)?;
    let t = Instant::now();
    build_index(dir, &corpus, &config)?;
    *build_info = Some(t.elapsed().as_secs_f64());
    Bm25Retriever::open(dir, params)
}

fn retrieval(a: RetrievalArgs, json: bool) -> Result<()> {
    if !(1..=10_000).contains(&a.k) {
        bail!(
            "--k {} is out of bounds: metrics need 1..=10000 passages per query",
            a.k
        );
    }
    let queries = read_queries(&a.queries)?;
    let qrels = read_qrels(&a.qrels)?;
    // Only judged queries are evaluated (trec_eval skips the others).
    let judged: Vec<Query> = queries
        .into_iter()
        .filter(|q| qrels.contains_key(&q.id))
        .collect();
    if judged.is_empty() {
        bail!(
            "no query in {} has judgements in {}",
            a.queries.display(),
            a.qrels.display()
        );
    }
    let _tmp; // keeps a temporary index alive for the run
    let index_dir = match (&a.index, &a.kb) {
        (Some(d), _) => d.clone(),
        (None, Some(kb)) => kb.join("bm25"),
        (None, None) => {
            let t = tempfile::tempdir().context("create a temporary BM25 index dir")?;
            let p = t.path().to_path_buf();
            _tmp = t;
            p
        }
    };
    let mut build_seconds = None;
    let mut latency = None;
    let retriever: Box<dyn Retriever> = match a.retriever {
        RetrieverKind::Bm25 => {
            let bm25 = open_or_build_bm25(&index_dir, &a, &mut build_seconds)?;
            if a.latency {
                latency = Some(bm25_latency(&bm25, &judged, a.k)?);
            }
            Box::new(bm25)
        }
        RetrieverKind::Dense => dense_retriever(&a, &open_kb(&a)?)?,
        RetrieverKind::Hybrid => {
            let kb = open_kb(&a)?;
            let dense = dense_retriever(&a, &kb)?;
            let sparse = Box::new(open_or_build_bm25(&index_dir, &a, &mut build_seconds)?);
            let fusion = match a.fusion {
                FusionKind::Rrf => Fusion::Rrf { k: a.rrf_k },
                FusionKind::Weighted => Fusion::Weighted {
                    dense_weight: a.dense_weight,
                    norm: a.norm,
                },
            };
            Box::new(HybridRetriever::new(dense, sparse, fusion, a.depth)?)
        }
    };
    let retriever = a.rerank.wrap(retriever)?;
    let timed = run_queries(retriever.as_ref(), &judged, a.k, a.batch)?;
    let spec = MetricSpec {
        all_relevant: a.all_relevant.clone(),
        complete: a.complete,
        ..MetricSpec::default()
    };
    let report = evaluate(&qrels, &timed.run, &spec)?;
    if let Some(path) = &a.run_out {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?,
        );
        write_trec_run(
            &timed.run,
            &format!("rustrag-{:?}", a.retriever).to_lowercase(),
            &mut f,
        )?;
    }
    print_report(
        &a,
        &report,
        timed.seconds,
        judged.len(),
        build_seconds,
        latency,
        json,
    )
}

/// Single-query BM25 latency in microseconds: `{search: [mean, p50, p99], with_passages: [...]}`.
fn bm25_latency(bm25: &Bm25Retriever, queries: &[Query], k: usize) -> Result<serde_json::Value> {
    let stats = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let pct = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        json!({"mean_us": v.iter().sum::<f64>() / v.len() as f64, "p50_us": pct(0.5), "p99_us": pct(0.99)})
    };
    let (mut rows_only, mut with_passages) = (Vec::new(), Vec::new());
    for q in queries {
        let t = Instant::now();
        std::hint::black_box(bm25.search(&q.text, k)?);
        rows_only.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        std::hint::black_box(bm25.search_hits(&q.text, k)?);
        with_passages.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(
        json!({"k": k, "queries": queries.len(), "search": stats(rows_only), "with_passages": stats(with_passages)}),
    )
}

/// The dense retriever of the knowledge base at `--kb` with the question encoder `--encoder`.
fn dense_retriever(a: &RetrievalArgs, kb: &Arc<KnowledgeBase>) -> Result<Box<dyn Retriever>> {
    let enc_path = a
        .encoder
        .as_ref()
        .context("--retriever dense/hybrid needs --encoder (the question encoder)")?;
    let encoder: Arc<dyn TextEncoder> = Arc::from(load_encoder(
        &enc_path.to_string_lossy(),
        &LoadOptions::default(),
    )?);
    let mut dense = DenseRetriever::new(kb.clone(), Some(encoder), a.ef_search)?;
    dense.return_embeddings = false;
    Ok(Box::new(dense))
}

fn print_report(
    a: &RetrievalArgs,
    r: &Report,
    seconds: f64,
    num_queries: usize,
    build_seconds: Option<f64>,
    latency: Option<serde_json::Value>,
    json: bool,
) -> Result<()> {
    let pretty: Vec<(String, f64)> = r
        .mean
        .iter()
        .map(|(m, v)| {
            let name = if let Some(k) = m.strip_prefix("ndcg_cut_") {
                format!("nDCG@{k}")
            } else if let Some(k) = m.strip_prefix("recall_") {
                format!("Recall@{k}")
            } else if let Some(k) = m.strip_prefix("recip_rank_") {
                format!("MRR@{k}")
            } else if let Some(k) = m.strip_prefix("all_rel_") {
                format!("AllRel@{k}")
            } else {
                m.clone()
            };
            (name, *v)
        })
        .collect();
    let qps = num_queries as f64 / seconds.max(1e-9);
    if json {
        let metrics: BTreeMap<&str, f64> = r.mean.iter().map(|(m, v)| (m.as_str(), *v)).collect();
        let out = json!({
            "retriever": format!("{:?}", a.retriever).to_lowercase(),
            "rerank": a.rerank.config()?,
            "corpus": a.corpus, "queries": a.queries, "qrels": a.qrels,
            "k": a.k,
            "bm25": { "layout": a.layout, "stemmer": a.stemmer, "stopwords": !a.keep_stopwords, "k1": a.k1, "b": a.b },
            "num_queries": r.num_queries,
            "metrics": metrics,
            "retrieval_seconds": seconds,
            "queries_per_second": qps,
            "index_build_seconds": build_seconds,
            "bm25_latency": latency,
        });
        outln!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        outln!(
            "retriever {:?}, {} queries evaluated, k = {}",
            a.retriever,
            r.num_queries,
            a.k
        );
        for (name, v) in &pretty {
            outln!("{name:>12}  {v:.4}");
        }
        outln!(
            "retrieval: {seconds:.2} s ({qps:.1} queries/s, batch {})",
            a.batch
        );
        if let Some(b) = build_seconds {
            outln!("BM25 index build: {b:.2} s");
        }
        if let Some(l) = latency {
            outln!("BM25 single-query latency (µs): {l}");
        }
    }
    Ok(())
}

fn read_predictions(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(&text) {
        return map
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => Ok((k, s)),
                other => bail!(
                    "{}: prediction for {k} must be a string, found {other}",
                    path.display()
                ),
            })
            .collect();
    }
    let mut out = BTreeMap::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
        let id = v
            .get("id")
            .and_then(|x| x.as_str())
            .with_context(|| format!("{}:{}: missing `id`", path.display(), i + 1))?;
        let p = v
            .get("prediction")
            .and_then(|x| x.as_str())
            .with_context(|| {
                format!("{}:{}: missing string `prediction`", path.display(), i + 1)
            })?;
        out.insert(id.to_string(), p.to_string());
    }
    Ok(out)
}

fn qa_eval(a: QaArgs, json: bool) -> Result<()> {
    match &a.predictions {
        Some(p) => score_predictions(p, &a.questions, json),
        None => answer_and_score(&a, json),
    }
}

/// Score a predictions file against the questions' answers (no generation).
fn score_predictions(predictions: &Path, questions: &Path, json: bool) -> Result<()> {
    let preds = read_predictions(predictions)?;
    let queries = read_queries(questions)?;
    let bar = progress(queries.len() as u64, "score");
    let (mut em, mut f1, mut n, mut missing) = (0.0, 0.0, 0usize, 0usize);
    for q in &queries {
        bar.inc(1);
        if q.answers.is_empty() {
            continue;
        }
        n += 1;
        // The official script counts an unanswered question as 0 (and warns).
        let Some(p) = preds.get(&q.id) else {
            missing += 1;
            continue;
        };
        em += qa::max_over_answers(qa::exact_match, p, &q.answers);
        f1 += qa::max_over_answers(qa::f1_score, p, &q.answers);
    }
    bar.finish_and_clear();
    if n == 0 {
        bail!("{}: no question has `answers`", questions.display());
    }
    // Ids from another file (or another id field) would otherwise score a silent 0.
    if missing == n {
        bail!(
            "{}: none of its {} predictions names a question of {} (ids such as {:?} expected)",
            predictions.display(),
            preds.len(),
            questions.display(),
            queries.first().map(|q| q.id.as_str()).unwrap_or("")
        );
    }
    let (em, f1) = (100.0 * em / n as f64, 100.0 * f1 / n as f64);
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"exact_match": em, "f1": f1, "questions": n, "unanswered": missing})
            )?
        );
    } else {
        outln!("exact_match {em:.2}  f1 {f1:.2}  ({n} questions, {missing} unanswered)");
    }
    Ok(())
}

/// Answer the questions through the pipeline and score them (`eval qa --kb ... --generator ...`).
fn answer_and_score(a: &QaArgs, json: bool) -> Result<()> {
    let examples = answers::even_sample(read_examples(&a.questions)?, a.sample)?;
    let pipeline = a.pipeline.open()?;
    let config = a.pipeline.config()?;
    let mut records = Vec::with_capacity(examples.len());
    let mut sink = match &a.records {
        Some(p) => Some(RecordSink::create(p)?),
        None => None,
    };
    let bar = progress(examples.len() as u64, "answer");
    // Scores need the answers and the priors only, not per-token posteriors (another forward).
    let opts = AnswerOptions {
        provenance: false,
        ..config.answer.clone()
    };
    let summary = answers::evaluate_answers(&pipeline, &examples, &opts, config.batch_size, |r| {
        bar.inc(1);
        if let Some(s) = &mut sink {
            s.write(r)?;
        }
        records.push(r.clone());
        Ok(())
    })?;
    bar.finish_and_clear();
    if let Some(s) = sink {
        s.finish()?;
    }
    if let Some(path) = &a.html {
        let title = format!(
            "rustrag eval qa: {} ({} questions, {})",
            a.questions.display(),
            summary.questions,
            summary.mode
        );
        write_file_atomic(
            path,
            answers::html_report(&title, &summary, &records).as_bytes(),
        )?;
    }
    if json {
        outln!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let recall = summary
            .recall
            .map(|r| format!("  recall@{} {r:.1}", summary.n_docs))
            .unwrap_or_default();
        outln!(
            "{}: exact_match {:.2}  f1 {:.2}{recall}  ({} questions, {:.1} s, {:.3} questions/s)",
            summary.mode,
            summary.exact_match,
            summary.f1,
            summary.questions,
            summary.seconds,
            summary.questions_per_second
        );
        for (what, p) in [("records", &a.records), ("report", &a.html)] {
            if let Some(p) = p {
                outln!("{what}: {}", p.display());
            }
        }
    }
    Ok(())
}

/// Per-question records streamed to `<path>.partial` and renamed into place at the end, so an
/// interrupted run keeps what finished and never leaves a file that looks complete.
struct RecordSink {
    path: PathBuf,
    partial: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
}

impl RecordSink {
    fn create(path: &Path) -> Result<Self> {
        let partial = PathBuf::from(format!("{}.partial", path.display()));
        let f = std::fs::File::create(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            partial,
            out: std::io::BufWriter::new(f),
        })
    }

    fn write(&mut self, r: &answers::AnswerRecord) -> Result<()> {
        use std::io::Write;
        serde_json::to_writer(&mut self.out, r)?;
        writeln!(self.out).with_context(|| format!("writing {}", self.partial.display()))
    }

    fn finish(mut self) -> Result<()> {
        use std::io::Write;
        self.out
            .flush()
            .with_context(|| format!("writing {}", self.partial.display()))?;
        std::fs::rename(&self.partial, &self.path)
            .with_context(|| format!("renaming {} into place", self.partial.display()))
    }
}
