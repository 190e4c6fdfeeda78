//! `rustrag ask`: question(s) → answer(s) with doc priors p(z|x), sources and provenance. Parses
//! arguments into a `PipelineConfig` ([`PipelineArgs`]), calls the `Pipeline`, prints.

use super::pipeline_args::PipelineArgs;
use anyhow::{bail, Context, Result};
use rustrag::rag::pipeline::QaResult;
use rustrag::rag::RagMode;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Questions to answer (or use --questions-file).
    pub questions: Vec<String>,
    /// A file with one question per line.
    #[arg(long)]
    pub questions_file: Option<PathBuf>,
    /// Characters of passage text shown per source.
    #[arg(long, default_value_t = 160)]
    pub snippet_chars: usize,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
}

fn read_questions(args: &Args) -> Result<Vec<String>> {
    let mut qs = args.questions.clone();
    if let Some(f) = &args.questions_file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        qs.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    if qs.is_empty() {
        bail!("no question given (pass questions as arguments or --questions-file)");
    }
    Ok(qs)
}

pub fn run(args: Args, json: bool) -> Result<()> {
    let questions = read_questions(&args)?;
    let pipeline = args.pipeline.open()?;
    let results = pipeline.answer(&questions)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        for r in &results {
            print_result(r, args.snippet_chars)?;
        }
    }
    Ok(())
}

/// Human-readable output.
fn print_result(r: &QaResult, snippet_chars: usize) -> Result<()> {
    outln!("Q: {}", super::printable(&r.question));
    for (k, a) in r.answers.iter().enumerate() {
        outln!("A{}: {}", k + 1, a.text);
        match r.mode {
            RagMode::Sequence => {
                if let Some(post) = a.doc_posteriors.first() {
                    let p: Vec<String> = post.iter().map(|x| format!("{x:.3}")).collect();
                    outln!("   p(z|x,y) over sources: [{}]", p.join(", "));
                }
            }
            RagMode::Token => {
                for (tok, post) in a.tokens.iter().zip(&a.doc_posteriors) {
                    let best = post
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .map(|(j, p)| (j + 1, *p));
                    if let Some((j, p)) = best {
                        outln!("   {tok:?} <- source {j} (p={p:.3})");
                    }
                }
            }
        }
    }
    if r.closed_book {
        outln!("(closed book: answered from the question alone)");
        outln!();
        return Ok(());
    }
    outln!("Sources (τ = {}):", r.prior_temperature);
    for s in &r.sources {
        let snippet: String = s.text.chars().take(snippet_chars).collect();
        outln!(
            "  [{}] p(z|x)={:.3} score={:.3} {} ({}): {}",
            s.rank,
            s.prior,
            s.score,
            s.title,
            s.passage_id,
            snippet
        );
    }
    for t in &r.truncated {
        outln!(
            "  note: source {} cut to {} of {} words ({} → {} prompt tokens) to fit the context window",
            t.row + 1,
            t.passage_words_kept,
            t.passage_words,
            t.prompt_tokens_before,
            t.prompt_tokens_after
        );
    }
    outln!();
    Ok(())
}
