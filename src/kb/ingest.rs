//! Corpus readers: BEIR `corpus.jsonl(.gz)` (`_id`, `title`, `text`), DPR passage TSV (header
//! `id, text, title`), HF `use_own_knowledge_dataset` CSV/TSV (tab-separated `title, text`, no header;
//! a `title,text` header is skipped, comma-separated CSV needs that header), and directories (or
//! single files) of plain text / markdown. Bad records are reported as `file:line: reason`; with
//! `skip_bad` they are collected and skipped, otherwise the first one stops ingestion.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// A source document before splitting.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    pub id: String,
    pub title: String,
    pub text: String,
    /// `file:line` (or the file) it came from, for error messages.
    pub origin: String,
}

/// A record that could not be ingested.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BadRecord {
    pub file: String,
    pub line: u64,
    pub reason: String,
}

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.reason)
    }
}

#[derive(Clone, Debug)]
pub struct IngestOptions {
    /// Skip (and report) bad records instead of stopping at the first.
    pub skip_bad: bool,
    /// Documents (or lines) larger than this are bad records.
    pub max_doc_bytes: usize,
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            skip_bad: false,
            max_doc_bytes: 8 << 20,
        }
    }
}

/// Documents read from one or more sources, and the bad records skipped.
#[derive(Debug, Default)]
pub struct Ingested {
    pub documents: Vec<Document>,
    pub bad: Vec<BadRecord>,
}

/// Corpus file formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    BeirJsonl,
    DprTsv,
    TitleText { delimiter: u8 },
    PlainText,
}

struct Sink<'a> {
    opts: &'a IngestOptions,
    bad: Vec<BadRecord>,
    documents: u64,
    seen: HashMap<String, String>,
    on_doc: &'a mut dyn FnMut(Document) -> Result<()>,
}

impl Sink<'_> {
    fn bad(&mut self, file: &Path, line: u64, reason: String) -> Result<()> {
        let rec = BadRecord {
            file: file.display().to_string(),
            line,
            reason,
        };
        if self.opts.skip_bad {
            tracing::warn!("skipping {rec}");
            self.bad.push(rec);
            Ok(())
        } else {
            bail!("{rec} (use --skip-bad to skip bad records)")
        }
    }

    fn doc(
        &mut self,
        file: &Path,
        line: u64,
        id: String,
        title: String,
        text: String,
    ) -> Result<()> {
        if id.trim().is_empty() {
            return self.bad(file, line, "empty document id".into());
        }
        if title.trim().is_empty() && text.trim().is_empty() {
            return self.bad(
                file,
                line,
                format!("document {id:?} has no title and no text"),
            );
        }
        let origin = format!("{}:{line}", file.display());
        if let Some(first) = self.seen.get(&id) {
            let reason = format!("duplicate document id {id:?} (first seen at {first})");
            return self.bad(file, line, reason);
        }
        self.seen.insert(id.clone(), origin.clone());
        self.documents += 1;
        (self.on_doc)(Document {
            id,
            title,
            text,
            origin,
        })
    }
}

/// Read every source (file or directory) in order. Fails on an empty result.
pub fn read_corpus(sources: &[PathBuf], opts: &IngestOptions) -> Result<Ingested> {
    let mut documents = Vec::new();
    let bad = read_corpus_with(sources, opts, &mut |d| {
        documents.push(d);
        Ok(())
    })?;
    Ok(Ingested { documents, bad })
}

/// Read every source in order, handing each document to `on_doc` as it is read (memory is bounded
/// by one document, not by the corpus). Returns the bad records skipped; fails on an empty result.
pub fn read_corpus_with(
    sources: &[PathBuf],
    opts: &IngestOptions,
    on_doc: &mut dyn FnMut(Document) -> Result<()>,
) -> Result<Vec<BadRecord>> {
    let mut sink = Sink {
        opts,
        bad: Vec::new(),
        documents: 0,
        seen: HashMap::new(),
        on_doc,
    };
    for src in sources {
        if src.is_dir() {
            read_dir(src, &mut sink)?;
        } else {
            read_file(src, &mut sink)?;
        }
    }
    if sink.documents == 0 {
        let names: Vec<_> = sources.iter().map(|s| s.display().to_string()).collect();
        bail!(
            "empty corpus: no documents in {} ({} bad records skipped)",
            names.join(", "),
            sink.bad.len()
        );
    }
    Ok(sink.bad)
}

/// Pick the reader from the file name (and, for TSV/CSV, the header line).
pub fn detect_format(path: &Path, first_line: &str) -> Result<Format> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let name = name.strip_suffix(".gz").unwrap_or(&name);
    let header: Vec<String> = first_line
        .trim_end()
        .split('\t')
        .map(|h| h.trim().to_lowercase())
        .collect();
    if name.ends_with(".jsonl") || name.ends_with(".json") {
        Ok(Format::BeirJsonl)
    } else if name.ends_with(".tsv") || name.ends_with(".csv") {
        if header.len() >= 3 && header[0] == "id" && header[1] == "text" {
            Ok(Format::DprTsv)
        } else if name.ends_with(".csv") && !first_line.contains('\t') {
            Ok(Format::TitleText { delimiter: b',' })
        } else {
            Ok(Format::TitleText { delimiter: b'\t' })
        }
    } else if name.ends_with(".txt") || name.ends_with(".md") || name.ends_with(".markdown") {
        Ok(Format::PlainText)
    } else {
        bail!("{}: unknown corpus format (expected .jsonl[.gz], .tsv, .csv, .txt, .md or a directory)", path.display())
    }
}

fn open(path: &Path) -> Result<Box<dyn BufRead>> {
    let f = File::open(path).with_context(|| format!("open corpus {}", path.display()))?;
    let is_gz = path.extension().is_some_and(|e| e == "gz");
    Ok(if is_gz {
        Box::new(BufReader::with_capacity(
            1 << 20,
            flate2::read::MultiGzDecoder::new(f),
        ))
    } else {
        Box::new(BufReader::with_capacity(1 << 20, f))
    })
}

enum Line {
    Text(String),
    TooLong(usize),
    BadUtf8(usize),
}

/// Next line (without `\n`/`\r\n`), reading at most `max` bytes of it into memory.
fn next_line(r: &mut dyn BufRead, buf: &mut Vec<u8>, max: usize) -> std::io::Result<Option<Line>> {
    buf.clear();
    let n = (&mut *r).take(max as u64 + 1).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.len() > max && buf.last() != Some(&b'\n') {
        // Drain the rest of the oversized line.
        let mut total = buf.len();
        loop {
            let avail = r.fill_buf()?;
            if avail.is_empty() {
                break;
            }
            match avail.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    total += i;
                    r.consume(i + 1);
                    break;
                }
                None => {
                    let l = avail.len();
                    total += l;
                    r.consume(l);
                }
            }
        }
        return Ok(Some(Line::TooLong(total)));
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    match String::from_utf8(std::mem::take(buf)) {
        Ok(s) => Ok(Some(Line::Text(s))),
        Err(e) => Ok(Some(Line::BadUtf8(e.utf8_error().valid_up_to()))),
    }
}

fn read_file(path: &Path, sink: &mut Sink) -> Result<()> {
    let mut r = open(path)?;
    let mut buf = Vec::new();
    let max = sink.opts.max_doc_bytes;
    let mut lineno = 0u64;
    let mut format = None;
    let read_err =
        |e: std::io::Error| anyhow::Error::from(e).context(format!("read {}", path.display()));
    if detect_format(path, "")? == Format::PlainText {
        let mut bytes = Vec::new();
        r.take(max as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        return plain_text(
            path,
            bytes,
            path.file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default(),
            sink,
        );
    }
    while let Some(line) = next_line(&mut r, &mut buf, max).map_err(read_err)? {
        lineno += 1;
        let line = match line {
            Line::Text(s) => s,
            Line::TooLong(n) => {
                sink.bad(
                    path,
                    lineno,
                    format!(
                        "record of {n} bytes is over the limit of {max} bytes (--max-doc-bytes)"
                    ),
                )?;
                continue;
            }
            Line::BadUtf8(at) => {
                sink.bad(
                    path,
                    lineno,
                    format!("invalid UTF-8 at byte {at} of the line"),
                )?;
                continue;
            }
        };
        let fmt = match format {
            Some(f) => f,
            None => {
                let f = detect_format(path, &line)?;
                format = Some(f);
                let lower = line.trim().to_lowercase();
                let is_header = match f {
                    Format::DprTsv => true,
                    Format::TitleText { delimiter } => {
                        lower == format!("title{}text", delimiter as char) || delimiter == b','
                    }
                    _ => false,
                };
                if is_header {
                    if let Format::TitleText { delimiter: b',' } = f {
                        if lower != "title,text" {
                            bail!("{}:1: comma-separated CSV needs a `title,text` header, found {line:?}", path.display());
                        }
                    }
                    continue;
                }
                f
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        match fmt {
            Format::BeirJsonl => beir_line(path, lineno, &line, sink)?,
            Format::DprTsv | Format::TitleText { .. } => {
                let delim = if let Format::TitleText { delimiter } = fmt {
                    delimiter
                } else {
                    b'\t'
                };
                match split_fields(&line, delim as char) {
                    Err(e) => sink.bad(path, lineno, e)?,
                    Ok(fields) => {
                        if fmt == Format::DprTsv {
                            if fields.len() != 3 {
                                sink.bad(path, lineno, format!("expected 3 tab-separated fields (id, text, title), found {}", fields.len()))?;
                                continue;
                            }
                            let [id, text, title]: [String; 3] =
                                fields.try_into().expect("3 fields");
                            sink.doc(path, lineno, id, title, text)?;
                        } else {
                            if fields.len() != 2 {
                                let d = if delim == b'\t' { "tab" } else { "comma" };
                                sink.bad(
                                    path,
                                    lineno,
                                    format!(
                                        "expected 2 {d}-separated fields (title, text), found {}",
                                        fields.len()
                                    ),
                                )?;
                                continue;
                            }
                            let [title, text]: [String; 2] = fields.try_into().expect("2 fields");
                            let stem = path
                                .file_stem()
                                .map(|s| s.to_string_lossy().to_string())
                                .unwrap_or_default();
                            sink.doc(path, lineno, format!("{stem}:{lineno}"), title, text)?;
                        }
                    }
                }
            }
            Format::PlainText => unreachable!("handled above"),
        }
    }
    Ok(())
}

fn beir_line(path: &Path, lineno: u64, line: &str, sink: &mut Sink) -> Result<()> {
    let v: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return sink.bad(path, lineno, format!("not valid JSON: {e}")),
    };
    let Some(obj) = v.as_object() else {
        return sink.bad(path, lineno, "expected a JSON object".into());
    };
    let id = match obj.get("_id").or_else(|| obj.get("id")) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => {
            return sink.bad(
                path,
                lineno,
                "field `_id` must be a string or number".into(),
            )
        }
        None => return sink.bad(path, lineno, "missing field `_id`".into()),
    };
    let text = match obj.get("text") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return sink.bad(path, lineno, "field `text` must be a string".into()),
        None => return sink.bad(path, lineno, "missing field `text`".into()),
    };
    let title = match obj.get("title") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => String::new(),
        Some(_) => return sink.bad(path, lineno, "field `title` must be a string".into()),
    };
    sink.doc(path, lineno, id, title, text)
}

/// Split one CSV/TSV line; fields may be double-quoted with `""` escapes (as Python's csv writes).
fn split_fields(line: &str, delim: char) -> std::result::Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                    None => {
                        return Err(
                            "unterminated quoted field (multi-line fields are not supported)"
                                .into(),
                        )
                    }
                }
            }
            match chars.next() {
                None => {
                    fields.push(field);
                    return Ok(fields);
                }
                Some(c) if c == delim => fields.push(field),
                Some(c) => return Err(format!("unexpected {c:?} after a closing quote")),
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        fields.push(field);
                        return Ok(fields);
                    }
                    Some(c) if c == delim => break,
                    Some(c) => field.push(c),
                }
            }
            fields.push(field);
        }
    }
}

fn plain_text(path: &Path, bytes: Vec<u8>, id: String, sink: &mut Sink) -> Result<()> {
    let max = sink.opts.max_doc_bytes;
    if bytes.len() > max {
        let size = std::fs::metadata(path)
            .map(|m| m.len())
            .unwrap_or(bytes.len() as u64);
        return sink.bad(
            path,
            1,
            format!("document of {size} bytes is over the limit of {max} bytes (--max-doc-bytes)"),
        );
    }
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() as u64;
            return sink.bad(
                path,
                line,
                format!("invalid UTF-8 at byte {at} of the file"),
            );
        }
    };
    let is_md = path
        .extension()
        .is_some_and(|e| e == "md" || e == "markdown");
    let heading = if is_md {
        text.lines()
            .find_map(|l| l.trim().strip_prefix("# ").map(|h| h.trim().to_string()))
    } else {
        None
    };
    let title = heading.unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default()
    });
    sink.doc(path, 1, id, title, text)
}

/// Record `path` (filesystem identity `key`) as seen; false, with a warning, when the same
/// `what` was already reached by another path.
fn first_visit(
    seen: &mut HashMap<FileKey, PathBuf>,
    key: FileKey,
    path: &Path,
    what: &str,
    why: &str,
) -> bool {
    if let Some(first) = seen.get(&key) {
        tracing::warn!(
            "skipping {}: the same {what} as {} ({why})",
            path.display(),
            first.display()
        );
        return false;
    }
    seen.insert(key, path.to_path_buf());
    true
}

/// Plain text / markdown files under `dir`, recursively, in sorted path order; ids are the paths
/// relative to `dir` (`/`-separated). Symlinks are followed, but every directory and every file is
/// visited once (by device and inode): a symlink loop ends, and a file reachable through two paths
/// is ingested once, under the first. Anything that is neither a regular file nor a directory
/// (FIFO, socket, device, broken link) is skipped with a warning and never opened.
fn read_dir(dir: &Path, sink: &mut Sink) -> Result<()> {
    let mut dirs_seen: HashMap<FileKey, PathBuf> = HashMap::new();
    let mut files_seen: HashMap<FileKey, PathBuf> = HashMap::new();
    let mut files = Vec::new();
    let meta =
        std::fs::metadata(dir).with_context(|| format!("read directory {}", dir.display()))?;
    dirs_seen.insert(file_key(dir, &meta), dir.to_path_buf());
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries = Vec::new();
        for e in std::fs::read_dir(&d).with_context(|| format!("read directory {}", d.display()))? {
            entries.push(
                e.with_context(|| format!("read directory {}", d.display()))?
                    .path(),
            );
        }
        entries.sort();
        let mut subdirs = Vec::new();
        for p in entries {
            let meta = match std::fs::metadata(&p) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!("skipping {}: {e}", p.display());
                    continue;
                }
            };
            let key = file_key(&p, &meta);
            if meta.is_dir() {
                let why = "a symlink loop or a second link";
                if first_visit(&mut dirs_seen, key, &p, "directory", why) {
                    subdirs.push(p);
                }
                continue;
            }
            if !matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("txt" | "md" | "markdown")
            ) {
                continue;
            }
            if !meta.is_file() {
                tracing::warn!(
                    "skipping {}: a {}, not a regular file (never opened)",
                    p.display(),
                    special_kind(&meta)
                );
                continue;
            }
            if first_visit(&mut files_seen, key, &p, "file", "ingested once") {
                files.push(p);
            }
        }
        // Depth first, in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    files.sort();
    for f in files {
        let rel = f.strip_prefix(dir).unwrap_or(&f);
        let id = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().to_string())
            .collect::<Vec<_>>()
            .join("/");
        let mut bytes = Vec::new();
        File::open(&f)
            .and_then(|h| {
                h.take(sink.opts.max_doc_bytes as u64 + 1)
                    .read_to_end(&mut bytes)
            })
            .with_context(|| format!("read {}", f.display()))?;
        plain_text(&f, bytes, id, sink)?;
    }
    Ok(())
}

/// Identity of a file or directory, the same through every path that reaches it.
type FileKey = (u64, u64);

#[cfg(unix)]
fn file_key(_: &Path, m: &std::fs::Metadata) -> FileKey {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

#[cfg(not(unix))]
fn file_key(p: &Path, _: &std::fs::Metadata) -> FileKey {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .hash(&mut h);
    (0, h.finish())
}

fn special_kind(m: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = m.file_type();
        if t.is_fifo() {
            return "FIFO";
        }
        if t.is_socket() {
            return "socket";
        }
        if t.is_char_device() || t.is_block_device() {
            return "device";
        }
    }
    let _ = m;
    "special file"
}

#[cfg(test)]
mod tests {
    use super::split_fields;

    #[test]
    fn quoted_fields() {
        assert_eq!(
            split_fields("1\t\"a \"\"b\"\"\"\tT", '\t').unwrap(),
            ["1", "a \"b\"", "T"]
        );
        assert_eq!(split_fields("a,b", ',').unwrap(), ["a", "b"]);
        assert!(split_fields("\"abc", '\t').is_err());
    }
}
