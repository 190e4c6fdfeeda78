//! Question answering end to end: a [`Pipeline`] answers a question file (closed book, RAG-Token or
//! RAG-Sequence), each answer is scored with SQuAD's EM/F1 ([`super::qa`]) and, where the question
//! names its gold passage, the retrieval is scored too (recall@n_docs, the gold passage's rank and
//! prior). [`html_report`] draws the per-question records as a self-contained page.

use std::time::Instant;

use anyhow::{bail, Result};
use serde::Serialize;

use super::qa::{exact_match, f1_score, max_over_answers};
use crate::rag::pipeline::{AnswerOptions, Pipeline, QaResult};
use crate::rag::RagMode;
use anyhow::Context;
use std::io::BufRead;
use std::path::Path;

/// One training or evaluation example (a JSONL line `{"question", "answers", "gold_pid"?, "id"?}`,
/// as `../shared/data/squad-dev/queries.jsonl.gz` has them; other fields are ignored).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    /// Question id (SQuAD's), when the file has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub question: String,
    /// Reference answers; the first is the training target, all count for EM/F1.
    pub answers: Vec<String>,
    /// Knowledge-base passage id of the gold passage (for retrieval recall), when known.
    #[serde(default)]
    pub gold_pid: Option<String>,
}

/// Read a JSONL file (or `.jsonl.gz`) of [`Example`]s (blank lines skipped). Errors name
/// `file:line` and the field.
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (i, line) in super::beir::open_text(path)?.lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: reading", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let ex: Example = serde_json::from_str(&line)
            .with_context(|| format!("{}: not a {{\"question\", \"answers\"}} object", at()))?;
        if ex.question.trim().is_empty() {
            bail!("{}: `question` is empty", at());
        }
        if ex.answers.is_empty() || ex.answers[0].trim().is_empty() {
            bail!("{}: `answers` needs at least one non-empty answer", at());
        }
        out.push(ex);
    }
    if out.is_empty() {
        bail!("{}: no examples", path.display());
    }
    Ok(out)
}

/// Passage `id` is the gold passage or one of its chunks (`<gold>#<chunk>`, as HF's `split_text`
/// KBs and the parity fixtures name them).
pub fn is_gold(id: &str, gold: &str) -> bool {
    id == gold || id.split_once('#').is_some_and(|(doc, _)| doc == gold)
}

/// One question's answer and scores.
#[derive(Clone, Debug, Serialize)]
pub struct AnswerRecord {
    /// Position in the evaluated list.
    pub index: usize,
    pub id: Option<String>,
    pub question: String,
    pub answers: Vec<String>,
    pub prediction: String,
    /// 0 or 1 (max over the reference answers).
    pub em: f64,
    /// Token F1 in [0, 1] (max over the reference answers).
    pub f1: f64,
    pub gold_pid: Option<String>,
    /// 1-based rank of the gold passage among the documents the generator saw, if among them.
    pub gold_rank: Option<usize>,
    /// p(z_gold | x) when the gold passage was retrieved.
    pub gold_prior: Option<f32>,
    /// Passage ids of the documents, by rank (empty closed book).
    pub sources: Vec<String>,
    /// Documents cut to fit the context window.
    pub truncated: usize,
}

/// Scores of a whole question file.
#[derive(Clone, Debug, Serialize)]
pub struct AnswerSummary {
    /// `closed`, `token` or `sequence`.
    pub mode: String,
    pub questions: usize,
    /// Percent.
    pub exact_match: f64,
    /// Percent.
    pub f1: f64,
    /// Documents per question (0 closed book).
    pub n_docs: usize,
    /// Questions that name a gold passage.
    pub with_gold: usize,
    /// recall@n_docs in percent: the gold passage among the documents the generator saw (None
    /// closed book or without `gold_pid`s).
    pub recall: Option<f64>,
    pub prior_temperature: f64,
    /// Wall time of answering (models loaded before).
    pub seconds: f64,
    pub questions_per_second: f64,
}

fn record(index: usize, ex: &Example, r: &QaResult) -> AnswerRecord {
    let prediction = r
        .answers
        .first()
        .map(|a| a.text.clone())
        .unwrap_or_default();
    let gold = ex.gold_pid.as_deref().and_then(|g| {
        r.sources
            .iter()
            .find(|s| is_gold(&s.passage_id, g))
            .map(|s| (s.rank, s.prior))
    });
    AnswerRecord {
        index,
        id: ex.id.clone(),
        question: ex.question.clone(),
        answers: ex.answers.clone(),
        em: max_over_answers(exact_match, &prediction, &ex.answers),
        f1: max_over_answers(f1_score, &prediction, &ex.answers),
        prediction,
        gold_pid: ex.gold_pid.clone(),
        gold_rank: gold.map(|g| g.0),
        gold_prior: gold.map(|g| g.1),
        sources: r.sources.iter().map(|s| s.passage_id.clone()).collect(),
        truncated: r.truncated.len(),
    }
}

/// Answer `examples` through `pipeline` with `opts`, `batch` questions per call (decoded together),
/// handing each record to `on_record` as soon as its batch is done (to stream it to a file and a
/// progress bar), and return the scores.
pub fn evaluate_answers(
    pipeline: &Pipeline,
    examples: &[Example],
    opts: &AnswerOptions,
    batch: usize,
    mut on_record: impl FnMut(&AnswerRecord) -> Result<()>,
) -> Result<AnswerSummary> {
    if examples.is_empty() {
        bail!("no questions to evaluate");
    }
    if batch == 0 {
        bail!("batch size must be at least 1");
    }
    let start = Instant::now();
    let (mut em, mut f1, mut with_gold, mut found) = (0.0, 0.0, 0usize, 0usize);
    let (mut mode, mut n_docs, mut tau) = (String::new(), 0, 0.0);
    for (b, chunk) in examples.chunks(batch).enumerate() {
        let questions: Vec<String> = chunk.iter().map(|e| e.question.clone()).collect();
        let results = pipeline.answer_with(&questions, opts)?;
        for (i, (ex, r)) in chunk.iter().zip(&results).enumerate() {
            let rec = record(b * batch + i, ex, r);
            em += rec.em;
            f1 += rec.f1;
            if rec.gold_pid.is_some() && !r.closed_book {
                with_gold += 1;
                found += usize::from(rec.gold_rank.is_some());
            }
            mode = match (r.closed_book, r.mode) {
                (true, _) => "closed",
                (false, RagMode::Token) => "token",
                (false, RagMode::Sequence) => "sequence",
            }
            .to_string();
            n_docs = r.sources.len();
            tau = r.prior_temperature;
            on_record(&rec)?;
        }
    }
    let n = examples.len() as f64;
    let seconds = start.elapsed().as_secs_f64();
    Ok(AnswerSummary {
        mode,
        questions: examples.len(),
        exact_match: 100.0 * em / n,
        f1: 100.0 * f1 / n,
        n_docs,
        with_gold,
        recall: (with_gold > 0).then(|| 100.0 * found as f64 / with_gold as f64),
        prior_temperature: tau,
        seconds,
        questions_per_second: n / seconds.max(1e-9),
    })
}

/// `count` questions spread evenly over `examples` (question `i * len / count`), in file order: a
/// fixed sample that covers every article of a file sorted by article.
pub fn even_sample(examples: Vec<Example>, count: Option<usize>) -> Result<Vec<Example>> {
    match count {
        None => Ok(examples),
        Some(0) => bail!("a sample of 0 questions"),
        Some(c) if c >= examples.len() => Ok(examples),
        Some(c) => {
            let n = examples.len();
            let mut keep = vec![false; n];
            for i in 0..c {
                keep[i * n / c] = true;
            }
            Ok(examples
                .into_iter()
                .zip(keep)
                .filter_map(|(e, k)| k.then_some(e))
                .collect())
        }
    }
}

/// Escape text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Buckets of the gold passage's prior: not retrieved, then [0, .2), …, [.8, 1].
const BUCKETS: [&str; 6] = [
    "not retrieved",
    "0–0.2",
    "0.2–0.4",
    "0.4–0.6",
    "0.6–0.8",
    "0.8–1",
];

fn bucket(r: &AnswerRecord) -> usize {
    match r.gold_prior {
        None => 0,
        Some(p) => 1 + ((p.clamp(0.0, 1.0) * 5.0) as usize).min(4),
    }
}

/// Per-question F1 against the prior p(z_gold|x) as an SVG scatter (x: prior, with "not
/// retrieved" at the left; y: F1; green = exact match), over bucket means of EM (bars).
fn scatter_svg(records: &[AnswerRecord]) -> String {
    let (w, h, left, bottom, top, right) = (760.0, 360.0, 60.0, 50.0, 20.0, 20.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    // x: "not retrieved" takes the first sixth, prior 0..1 the rest.
    let x_of = |r: &AnswerRecord, jitter: f64| match r.gold_prior {
        None => left + plot_w * (0.04 + 0.09 * jitter),
        Some(p) => left + plot_w * (1.0 / 6.0 + 5.0 / 6.0 * f64::from(p.clamp(0.0, 1.0))),
    };
    let y_of = |v: f64| top + plot_h * (1.0 - v);
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"##
    );
    // EM per bucket as bars behind the points.
    let mut sums = [(0.0f64, 0usize); 6];
    for r in records {
        let b = bucket(r);
        sums[b].0 += r.em;
        sums[b].1 += 1;
    }
    for (b, (s, n)) in sums.iter().enumerate() {
        if *n == 0 {
            continue;
        }
        let em = s / *n as f64;
        let x0 = left + plot_w * b as f64 / 6.0;
        svg += &format!(
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#dde8f6"/><text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#335">EM {:.0}% (n={n})</text>"##,
            x0 + 4.0,
            y_of(em),
            plot_w / 6.0 - 8.0,
            plot_h * em,
            x0 + plot_w / 12.0,
            y_of(em) - 4.0,
            100.0 * em
        );
    }
    for r in records {
        // A fixed jitter per question (golden-ratio sequence) keeps points apart and reproducible.
        let jitter = (r.index as f64 * 0.618_034).fract();
        let colour = if r.em > 0.0 { "#2a9d3a" } else { "#d1495b" };
        svg += &format!(
            r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}" fill-opacity="0.6"><title>{}</title></circle>"##,
            x_of(r, jitter),
            y_of(r.f1) + 6.0 * (jitter - 0.5) * f64::from(u8::from(r.f1 == 0.0 || r.f1 == 1.0)),
            esc(&format!("{} → {}", r.question, r.prediction))
        );
    }
    // Axes and labels.
    svg += &format!(
        r##"<line x1="{left}" y1="{0}" x2="{1}" y2="{0}" stroke="#333"/><line x1="{left}" y1="{top}" x2="{left}" y2="{0}" stroke="#333"/>"##,
        top + plot_h,
        left + plot_w
    );
    for (b, label) in BUCKETS.iter().enumerate() {
        svg += &format!(
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            left + plot_w * (b as f64 + 0.5) / 6.0,
            top + plot_h + 18.0
        );
    }
    for v in [0.0, 0.5, 1.0] {
        svg += &format!(
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{v}</text>"##,
            left - 6.0,
            y_of(v) + 4.0
        );
    }
    svg += &format!(
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">prior p(z_gold | x) of the gold passage</text><text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">F1 per question</text></svg>"##,
        left + plot_w / 2.0,
        h - 8.0,
        top + plot_h / 2.0
    );
    svg
}

/// A self-contained HTML page: the summary, the scatter of correctness against the prior on the
/// gold passage, and every question with its prediction, references and sources.
pub fn html_report(title: &str, summary: &AnswerSummary, records: &[AnswerRecord]) -> String {
    let recall = summary
        .recall
        .map(|r| format!("{r:.1}% ({} with a gold passage)", summary.with_gold))
        .unwrap_or_else(|| "–".into());
    let mut rows = String::new();
    for r in records {
        rows += &format!(
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{}</td><td>{}</td></tr>\n",
            if r.em > 0.0 { "em" } else { "miss" },
            r.index,
            esc(&r.question),
            esc(&r.prediction),
            esc(&r.answers.join(" | ")),
            r.f1,
            r.gold_rank.map(|k| k.to_string()).unwrap_or_else(|| "–".into()),
            r.gold_prior.map(|p| format!("{p:.3}")).unwrap_or_else(|| "–".into()),
        );
    }
    format!(
        r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }}
tr.em td:nth-child(3) {{ color: #2a9d3a; }} tr.miss td:nth-child(3) {{ color: #d1495b; }}
dl {{ display: grid; grid-template-columns: max-content auto; gap: 2px 16px; }}
</style></head><body>
<h1>{title}</h1>
<dl>
<dt>mode</dt><dd>{mode}</dd>
<dt>questions</dt><dd>{n}</dd>
<dt>exact match</dt><dd>{em:.2}</dd>
<dt>F1</dt><dd>{f1:.2}</dd>
<dt>documents per question</dt><dd>{n_docs}</dd>
<dt>recall@{n_docs}</dt><dd>{recall}</dd>
<dt>prior temperature τ</dt><dd>{tau}</dd>
<dt>wall time</dt><dd>{secs:.1} s ({qps:.3} questions/s)</dd>
</dl>
<h2>Correctness against the prior on the gold passage</h2>
<p>Each point is a question (green: exact match); bars are the exact-match rate per bucket.</p>
{svg}
<h2>Questions</h2>
<table><tr><th>#</th><th>question</th><th>prediction</th><th>answers</th><th>F1</th><th>gold rank</th><th>p(z_gold|x)</th></tr>
{rows}</table>
</body></html>
"##,
        title = esc(title),
        mode = summary.mode,
        n = summary.questions,
        em = summary.exact_match,
        f1 = summary.f1,
        n_docs = summary.n_docs,
        tau = summary.prior_temperature,
        secs = summary.seconds,
        qps = summary.questions_per_second,
        svg = scatter_svg(records),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(i: usize) -> Example {
        Example {
            id: Some(format!("q{i}")),
            question: format!("question {i}?"),
            answers: vec!["a".into()],
            gold_pid: None,
        }
    }

    #[test]
    fn even_sample_is_fixed_and_spread() {
        let all: Vec<Example> = (0..10).map(ex).collect();
        let ids: Vec<String> = even_sample(all.clone(), Some(4))
            .unwrap()
            .into_iter()
            .map(|e| e.id.unwrap())
            .collect();
        assert_eq!(ids, ["q0", "q2", "q5", "q7"]);
        assert_eq!(even_sample(all.clone(), Some(99)).unwrap().len(), 10);
        assert!(even_sample(all, Some(0)).is_err());
    }

    #[test]
    fn gold_matches_the_passage_and_its_chunks_only() {
        assert!(is_gold("36-0", "36-0"));
        assert!(is_gold("36-0#2", "36-0"));
        assert!(!is_gold("36-01", "36-0"));
        assert!(!is_gold("36-1#0", "36-0"));
    }

    #[test]
    fn report_escapes_text_and_buckets_priors() {
        let mut r = AnswerRecord {
            index: 0,
            id: None,
            question: "<script>x</script>?".into(),
            answers: vec!["a".into()],
            prediction: "a & b".into(),
            em: 0.0,
            f1: 0.5,
            gold_pid: Some("1-0".into()),
            gold_rank: Some(1),
            gold_prior: Some(0.9),
            sources: vec!["1-0".into()],
            truncated: 0,
        };
        assert_eq!(bucket(&r), 5);
        r.gold_prior = Some(1.0);
        assert_eq!(bucket(&r), 5);
        r.gold_prior = Some(0.1);
        assert_eq!(bucket(&r), 1);
        r.gold_prior = None;
        assert_eq!(bucket(&r), 0);
        let s = AnswerSummary {
            mode: "token".into(),
            questions: 1,
            exact_match: 0.0,
            f1: 50.0,
            n_docs: 3,
            with_gold: 1,
            recall: Some(0.0),
            prior_temperature: 0.05,
            seconds: 1.0,
            questions_per_second: 1.0,
        };
        let html = html_report("t", &s, &[r]);
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;script&gt;") && html.contains("a &amp; b"));
        assert!(html.contains("<svg") && html.contains("EM 0% (n=1)"));
    }
}
