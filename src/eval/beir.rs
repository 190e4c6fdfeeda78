//! Readers for BEIR-format evaluation data: `queries.jsonl(.gz)` (`_id`/`id`, `text`/`question`,
//! optional `answers`) and qrels (`query-id corpus-id score` TSV with a header, or TREC `qid 0 docid
//! rel`). Every error names the file and line. Corpora are read by [`crate::kb::ingest`].

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use anyhow::{bail, Context, Result};
use flate2::read::MultiGzDecoder;
use serde_json::Value;

use super::metrics::Qrels;

/// One evaluation question.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Query {
    pub id: String,
    pub text: String,
    /// Reference answers (QA sets); empty for pure retrieval sets.
    pub answers: Vec<String>,
}

/// Open a file, transparently gunzipping `.gz` files (or any file that starts with the gzip magic).
pub fn open_text(path: &Path) -> Result<Box<dyn BufRead>> {
    let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut magic = [0u8; 2];
    let n = f
        .read(&mut magic)
        .with_context(|| format!("read {}", path.display()))?;
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    if n == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(BufReader::new(MultiGzDecoder::new(f))))
    } else {
        Ok(Box::new(BufReader::new(f)))
    }
}

/// Call `f(line_number, line)` for every non-empty line (1-based), with UTF-8 and I/O errors located.
fn for_each_line(path: &Path, mut f: impl FnMut(usize, &str) -> Result<()>) -> Result<()> {
    let mut r = open_text(path)?;
    let mut buf = Vec::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        let n = r
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("{}:{}: read error", path.display(), line_no + 1))?;
        if n == 0 {
            return Ok(());
        }
        line_no += 1;
        let line = std::str::from_utf8(&buf)
            .map_err(|e| anyhow::anyhow!("{}:{line_no}: invalid UTF-8 ({e})", path.display()))?;
        let line = line.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            continue;
        }
        f(line_no, line).map_err(|e| anyhow::anyhow!("{}:{line_no}: {e:#}", path.display()))?;
    }
}

fn str_field<'a>(obj: &'a Value, names: &[&str]) -> Option<&'a Value> {
    names.iter().find_map(|n| obj.get(*n))
}

/// A JSON value that is a string, or a number (BEIR ids are sometimes numbers), as a string.
fn as_id(v: &Value, what: &str) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        other => bail!("field `{what}` must be a string, found {other}"),
    }
}

/// Read queries from JSONL (`_id` or `id`; `text` or `question`; optional `answers`: list of strings) or,
/// for `.tsv` files, `id<TAB>text` lines.
pub fn read_queries(path: &Path) -> Result<Vec<Query>> {
    let tsv = path
        .to_string_lossy()
        .trim_end_matches(".gz")
        .ends_with(".tsv");
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for_each_line(path, |_, line| {
        let q = if tsv {
            let (id, text) = line.split_once('\t').context("expected `id<TAB>text`")?;
            Query {
                id: id.to_string(),
                text: text.to_string(),
                answers: vec![],
            }
        } else {
            let v: Value = serde_json::from_str(line).context("invalid JSON")?;
            let id = as_id(
                str_field(&v, &["_id", "id"]).context("missing `_id` (or `id`)")?,
                "_id",
            )?;
            let text = str_field(&v, &["text", "question"])
                .and_then(Value::as_str)
                .context("missing string field `text` (or `question`)")?
                .to_string();
            let answers = match v.get("answers") {
                None | Some(Value::Null) => vec![],
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|x| {
                        x.as_str()
                            .map(str::to_string)
                            .context("`answers` must be a list of strings")
                    })
                    .collect::<Result<_>>()?,
                Some(_) => bail!("`answers` must be a list of strings"),
            };
            Query { id, text, answers }
        };
        if !seen.insert(q.id.clone()) {
            bail!("duplicate query id {:?}", q.id);
        }
        out.push(q);
        Ok(())
    })?;
    if out.is_empty() {
        bail!("{}: no queries", path.display());
    }
    Ok(out)
}

/// Read qrels: BEIR TSV `query-id<TAB>corpus-id<TAB>score` (the first line may be a header) or TREC
/// `qid iter docid rel` (whitespace separated). Grades are integers; a doc judged twice for a query is
/// an error.
pub fn read_qrels(path: &Path) -> Result<Qrels> {
    let mut qrels = Qrels::new();
    let mut first = true;
    for_each_line(path, |_, line| {
        let cols: Vec<&str> = if line.contains('\t') {
            line.split('\t').map(str::trim).collect()
        } else {
            line.split_whitespace().collect()
        };
        let is_first = std::mem::replace(&mut first, false);
        let (q, d, g) = match cols.as_slice() {
            [q, d, g] => (*q, *d, *g),
            [q, _iter, d, g] => (*q, *d, *g),
            _ => bail!("expected 3 columns (query-id, corpus-id, score) or 4 (TREC qid iter docid rel), found {}", cols.len()),
        };
        let grade = match g.parse::<i64>() {
            Ok(v) => v,
            // A BEIR header line (`query-id corpus-id score`).
            Err(_) if is_first => return Ok(()),
            Err(_) => bail!("relevance grade {g:?} is not an integer"),
        };
        if q.is_empty() || d.is_empty() {
            bail!("empty query or doc id");
        }
        if qrels
            .entry(q.to_string())
            .or_default()
            .insert(d.to_string(), grade)
            .is_some()
        {
            bail!("query {q}: doc {d} is judged twice");
        }
        Ok(())
    })?;
    if qrels.is_empty() {
        bail!("{}: no judgements", path.display());
    }
    Ok(qrels)
}

/// The documents of a corpus file as passages, unsplit (BEIR evaluates whole documents).
pub fn corpus_passages(path: &std::path::Path) -> anyhow::Result<Vec<crate::retrieve::Passage>> {
    let docs =
        crate::kb::ingest::read_corpus(&[path.to_path_buf()], &Default::default())?.documents;
    Ok(docs
        .into_iter()
        .map(|d| crate::retrieve::Passage {
            id: d.id,
            title: d.title,
            text: d.text,
        })
        .collect())
}
