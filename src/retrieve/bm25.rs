//! BM25 on a tantivy inverted index, scored as Lucene's `BM25Similarity` (what Anserini runs):
//! `idf = ln(1 + (N - df + 0.5) / (df + 0.5))`, `score = Σ_fields boost · Σ_terms qtf · idf · tf / (tf +
//! k1 · (1 - b + b · dl / avgdl))`, with `N` the documents that have the field, `dl` the field length
//! (Lucene's one-byte norm, which tantivy's fieldnorm encodes identically) and configurable `k1`/`b`
//! (tantivy's own scorer hard-codes 1.2/0.75, so we score its postings ourselves).
//!
//! Title and text are indexed either as one field (Anserini "flat": `title + " " + text`) or as two
//! (Anserini "multifield": the score is the sum of the per-field BM25 scores).
//!
//! On disk an index is a root directory holding `CURRENT` (the live generation's name) and
//! `gen-NNNNNNNN/` (a tantivy index plus `bm25.json`), managed by [`crate::kb::atomic`] like a
//! knowledge base: a build writes a new generation into a temp directory and switches `CURRENT`
//! atomically, so a crash mid-build leaves the previous index usable.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tantivy::postings::Postings;
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, Value, FAST, STORED,
};
use tantivy::tokenizer::TextAnalyzer;
use tantivy::{
    DocAddress, DocSet, Index, IndexReader, ReloadPolicy, Searcher, TantivyDocument, Term,
    TERMINATED,
};

use super::analysis::{Analyzer, AnalyzerConfig};
use super::{Hits, Passage, Retriever};
use crate::kb::atomic::{
    current_generation, current_generation_name, fsync_dir, write_file_atomic, GenerationFiles,
    PendingGeneration,
};
use crate::kb::lock::WriterLock;

/// Manifest file inside a generation directory.
const MANIFEST: &str = "bm25.json";
const FORMAT: &str = "rustrag-bm25";
const FORMAT_VERSION: u32 = 1;
/// Name under which the analyzer is registered with tantivy.
const TOKENIZER: &str = "rustrag_bm25";

/// How title and text are indexed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FieldLayout {
    /// One field, `title + " " + text` (Anserini's BEIR "flat" indexes).
    #[default]
    Flat,
    /// Two fields, `title` and `text`, scored separately and summed (Anserini's "multifield").
    Multifield,
}

/// BM25 parameters (query time). Defaults are Anserini's: `k1 = 0.9`, `b = 0.4`, title boost 1.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bm25Params {
    pub k1: f32,
    pub b: f32,
    /// Weight of the title field's score in the multifield layout.
    pub title_boost: f32,
}

impl Default for Bm25Params {
    fn default() -> Self {
        Self {
            k1: 0.9,
            b: 0.4,
            title_boost: 1.0,
        }
    }
}

/// How an index is built.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Bm25Config {
    pub analyzer: AnalyzerConfig,
    pub layout: FieldLayout,
    /// What the passages came from (e.g. a knowledge-base generation), so that callers can tell an
    /// index of other passages (whose rows would not match) from a current one.
    #[serde(default)]
    pub source: Option<String>,
}

/// `bm25.json`: what a generation holds and how it was analysed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Bm25Manifest {
    pub format: String,
    pub version: u32,
    pub config: Bm25Config,
    pub num_passages: u64,
    /// Unix seconds.
    pub created: u64,
}

/// Build summary.
#[derive(Clone, Debug, Serialize)]
pub struct BuildSummary {
    pub generation: PathBuf,
    pub num_passages: u64,
    pub seconds: f64,
}

/// The tantivy schema of a BM25 index: stored passage fields plus the indexed term fields.
struct Fields {
    row: Field,
    id: Field,
    title: Field,
    text: Field,
    /// Indexed fields with their role: `contents` (flat) or `title_terms` + `text_terms` (multifield).
    indexed: Vec<(Field, IndexedRole)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IndexedRole {
    Contents,
    Title,
    Text,
}

fn schema(layout: FieldLayout) -> (Schema, Fields) {
    let mut b = Schema::builder();
    let row = b.add_u64_field("row", FAST);
    let id = b.add_text_field("id", STORED);
    let title = b.add_text_field("title", STORED);
    let text = b.add_text_field("text", STORED);
    let opts = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer(TOKENIZER)
            .set_index_option(IndexRecordOption::WithFreqs)
            .set_fieldnorms(true),
    );
    let indexed = match layout {
        FieldLayout::Flat => vec![(b.add_text_field("contents", opts), IndexedRole::Contents)],
        FieldLayout::Multifield => vec![
            (
                b.add_text_field("title_terms", opts.clone()),
                IndexedRole::Title,
            ),
            (b.add_text_field("text_terms", opts), IndexedRole::Text),
        ],
    };
    (
        b.build(),
        Fields {
            row,
            id,
            title,
            text,
            indexed,
        },
    )
}

fn resolve_fields(schema: &Schema, layout: FieldLayout) -> Result<Fields> {
    let get = |name: &str| {
        schema
            .get_field(name)
            .with_context(|| format!("BM25 index has no field `{name}`"))
    };
    let indexed = match layout {
        FieldLayout::Flat => vec![(get("contents")?, IndexedRole::Contents)],
        FieldLayout::Multifield => {
            vec![
                (get("title_terms")?, IndexedRole::Title),
                (get("text_terms")?, IndexedRole::Text),
            ]
        }
    };
    Ok(Fields {
        row: get("row")?,
        id: get("id")?,
        title: get("title")?,
        text: get("text")?,
        indexed,
    })
}

/// Build a BM25 index of `passages` (row `i` = `passages[i]`) as a new generation under `root`, and make
/// it live atomically. Older generations are removed after the switch.
pub fn build_index(root: &Path, passages: &[Passage], config: &Bm25Config) -> Result<BuildSummary> {
    let start = std::time::Instant::now();
    if passages.is_empty() {
        bail!("cannot build a BM25 index of an empty corpus");
    }
    // A derived index: a second builder waits for the first rather than failing.
    let lock = WriterLock::acquire(root, true)?;
    let base = current_generation_name(root)?;
    let pending = PendingGeneration::begin(&lock, base.as_deref(), GenerationFiles::Any)
        .with_context(|| format!("start a BM25 index generation in {}", root.display()))?;
    // On error `pending` is dropped, which removes its temp dir; the live generation is untouched.
    write_generation(pending.dir(), passages, config)?;
    let gen = pending.commit()?;
    tracing::info!(generation = %gen.display(), passages = passages.len(), "BM25 index built");
    Ok(BuildSummary {
        generation: gen,
        num_passages: passages.len() as u64,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn write_generation(dir: &Path, passages: &[Passage], config: &Bm25Config) -> Result<()> {
    let (schema, f) = schema(config.layout);
    let index = Index::create_in_dir(dir, schema)
        .with_context(|| format!("create tantivy index in {}", dir.display()))?;
    index.tokenizers().register(
        TOKENIZER,
        TextAnalyzer::from(Analyzer::new(config.analyzer.clone())),
    );
    let mut writer = index
        .writer_with_num_threads::<TantivyDocument>(1, 128_000_000)
        .context("open tantivy writer")?;
    let bar = crate::progress::bar(passages.len() as u64, "BM25 index");
    for (row, p) in passages.iter().enumerate() {
        let mut doc = TantivyDocument::new();
        doc.add_u64(f.row, row as u64);
        doc.add_text(f.id, &p.id);
        doc.add_text(f.title, &p.title);
        doc.add_text(f.text, &p.text);
        for (field, role) in &f.indexed {
            match role {
                IndexedRole::Contents => doc.add_text(*field, format!("{} {}", p.title, p.text)),
                IndexedRole::Title => doc.add_text(*field, &p.title),
                IndexedRole::Text => doc.add_text(*field, &p.text),
            }
        }
        writer
            .add_document(doc)
            .with_context(|| format!("index passage {:?} (row {row})", p.id))?;
        bar.inc(1);
    }
    writer.commit().context("commit tantivy index")?;
    writer
        .wait_merging_threads()
        .context("finish tantivy merges")?;
    bar.finish_and_clear();
    let manifest = Bm25Manifest {
        format: FORMAT.into(),
        version: FORMAT_VERSION,
        config: config.clone(),
        num_passages: passages.len() as u64,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    write_file_atomic(&dir.join(MANIFEST), &serde_json::to_vec_pretty(&manifest)?)?;
    fsync_dir(dir)
}

/// Per-field collection statistics (over all segments) and the length-normalisation table.
struct FieldStats {
    field: Field,
    boost: f32,
    /// Documents with at least one term in the field (Lucene's `docCount`).
    doc_count: u64,
    /// `k1 · (1 - b + b · len(norm_id) / avgdl)` for each of the 256 one-byte norms.
    norm: [f32; 256],
}

/// A BM25 retriever over a persisted index. Rows are the positions of the passages given to
/// [`build_index`].
pub struct Bm25Retriever {
    searcher: Searcher,
    // Keeps the index files mapped for `searcher`.
    _reader: IndexReader,
    analyzer: Analyzer,
    fields: Fields,
    stats: Vec<FieldStats>,
    manifest: Bm25Manifest,
    params: Bm25Params,
    generation: PathBuf,
    /// `[num_passages]`: the tantivy address of each row.
    row_addr: Vec<DocAddress>,
}

impl Bm25Retriever {
    /// Open the live generation under `root` with the given query-time parameters.
    pub fn open(root: &Path, params: Bm25Params) -> Result<Self> {
        let generation = current_generation(root)?.with_context(|| {
            format!(
                "no BM25 index in {} (no CURRENT generation); build one first",
                root.display()
            )
        })?;
        let mpath = generation.join(MANIFEST);
        let bytes = fs::read(&mpath).with_context(|| format!("read {}", mpath.display()))?;
        let manifest: Bm25Manifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not a rustrag BM25 manifest", mpath.display()))?;
        if manifest.format != FORMAT || manifest.version != FORMAT_VERSION {
            bail!(
                "{}: BM25 index format {} v{} is not supported (this build reads {FORMAT} v{FORMAT_VERSION}); rebuild the index",
                mpath.display(),
                manifest.format,
                manifest.version
            );
        }
        if !(params.k1 >= 0.0 && (0.0..=1.0).contains(&params.b) && params.title_boost >= 0.0) {
            bail!(
                "invalid BM25 parameters {params:?}: need k1 >= 0, 0 <= b <= 1, title_boost >= 0"
            );
        }
        let index = Index::open_in_dir(&generation)
            .with_context(|| format!("open tantivy index {}", generation.display()))?;
        let analyzer = Analyzer::new(manifest.config.analyzer.clone());
        index
            .tokenizers()
            .register(TOKENIZER, TextAnalyzer::from(analyzer.clone()));
        let fields = resolve_fields(&index.schema(), manifest.config.layout)?;
        let reader: IndexReader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        let searcher = reader.searcher();
        let num_docs: u64 = searcher
            .segment_readers()
            .iter()
            .map(|s| u64::from(s.num_docs()))
            .sum();
        if num_docs != manifest.num_passages {
            bail!(
                "{}: manifest says {} passages, index holds {num_docs}",
                generation.display(),
                manifest.num_passages
            );
        }
        let stats = fields
            .indexed
            .iter()
            .map(|&(field, role)| {
                let boost = if role == IndexedRole::Title {
                    params.title_boost
                } else {
                    1.0
                };
                field_stats(&searcher, field, boost, params)
            })
            .collect::<Result<Vec<_>>>()?;
        let row_addr = row_addresses(&searcher, manifest.num_passages)?;
        Ok(Self {
            searcher,
            _reader: reader,
            analyzer,
            fields,
            stats,
            manifest,
            params,
            generation,
            row_addr,
        })
    }

    pub fn manifest(&self) -> &Bm25Manifest {
        &self.manifest
    }

    pub fn params(&self) -> Bm25Params {
        self.params
    }

    /// The live generation directory.
    pub fn generation(&self) -> &Path {
        &self.generation
    }

    /// Query terms after analysis, with their counts (repeated terms weigh more, as in Anserini).
    pub fn query_terms(&self, query: &str) -> Vec<(String, u32)> {
        let mut counts: Vec<(String, u32)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for t in self.analyzer.terms(query) {
            match index.get(&t) {
                Some(&i) => counts[i].1 += 1,
                None => {
                    index.insert(t.clone(), counts.len());
                    counts.push((t, 1));
                }
            }
        }
        counts
    }

    /// Top-`k` `(row, score)` for one query, best first (ties: lower row first). Passages not loaded.
    pub fn search(&self, query: &str, k: usize) -> Result<Vec<(u64, f32)>> {
        let terms = self.query_terms(query);
        let mut best: Vec<(u64, f32)> = Vec::new();
        if terms.is_empty() || k == 0 {
            return Ok(best);
        }
        // Per (field, term): the clause weight `boost · qtf · idf`, from collection-wide statistics.
        let mut clauses: Vec<(&FieldStats, Term, f32)> = Vec::new();
        for fs in self.stats.iter().filter(|fs| fs.boost > 0.0) {
            for (term, qtf) in &terms {
                let term = Term::from_field_text(fs.field, term);
                let df = self.searcher.doc_freq(&term)?;
                if df == 0 {
                    continue;
                }
                let n = fs.doc_count as f64;
                let idf = (1.0 + (n - df as f64 + 0.5) / (df as f64 + 0.5)).ln() as f32;
                clauses.push((fs, term, fs.boost * *qtf as f32 * idf));
            }
        }
        for (seg_ord, seg) in self.searcher.segment_readers().iter().enumerate() {
            let mut acc = vec![0f32; seg.max_doc() as usize];
            let mut hit = vec![false; seg.max_doc() as usize];
            for (fs, term, weight) in &clauses {
                let inverted = seg.inverted_index(fs.field)?;
                let norms = seg.get_fieldnorms_reader(fs.field)?;
                let Some(mut postings) =
                    inverted.read_postings(term, IndexRecordOption::WithFreqs)?
                else {
                    continue;
                };
                let mut doc = postings.doc();
                while doc != TERMINATED {
                    let tf = postings.term_freq() as f32;
                    acc[doc as usize] +=
                        weight * tf / (tf + fs.norm[norms.fieldnorm_id(doc) as usize]);
                    hit[doc as usize] = true;
                    doc = postings.advance();
                }
            }
            let rows = seg
                .fast_fields()
                .u64("row")
                .with_context(|| format!("segment {seg_ord}: no row column"))?;
            for (doc, (&score, &h)) in acc.iter().zip(&hit).enumerate() {
                if h {
                    let row = rows
                        .first(doc as u32)
                        .with_context(|| format!("segment {seg_ord} doc {doc}: no row"))?;
                    best.push((row, score));
                }
            }
            // Keep memory bounded across segments.
            truncate_top_k(&mut best, k);
        }
        truncate_top_k(&mut best, k);
        Ok(best)
    }

    /// The stored passages of `rows`.
    pub fn passages(&self, rows: &[u64]) -> Result<Vec<Passage>> {
        rows.iter()
            .map(|&r| {
                let a = *self
                    .row_addr
                    .get(r as usize)
                    .with_context(|| format!("row {r} is not in the BM25 index"))?;
                let doc: TantivyDocument = self.searcher.doc(a)?;
                let get = |f: Field| {
                    doc.get_first(f)
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_string()
                };
                Ok(Passage {
                    id: get(self.fields.id),
                    title: get(self.fields.title),
                    text: get(self.fields.text),
                })
            })
            .collect()
    }

    /// Top-`k` hits with their stored passages.
    pub fn search_hits(&self, query: &str, k: usize) -> Result<Hits> {
        let top = self.search(query, k)?;
        let doc_ids: Vec<u64> = top.iter().map(|t| t.0).collect();
        let passages = self.passages(&doc_ids)?;
        Ok(Hits {
            scores: top.iter().map(|t| t.1).collect(),
            doc_ids,
            passages,
            embeddings: None,
        })
    }
}

/// Where each row lives: `[num_passages]` doc addresses, checking that rows are exactly `0..n`.
fn row_addresses(searcher: &Searcher, n: u64) -> Result<Vec<DocAddress>> {
    let mut addr = vec![None; n as usize];
    for (seg_ord, seg) in searcher.segment_readers().iter().enumerate() {
        let col = seg.fast_fields().u64("row")?;
        for doc in 0..seg.max_doc() {
            let row = col
                .first(doc)
                .with_context(|| format!("segment {seg_ord} doc {doc} has no row"))?;
            let slot = addr
                .get_mut(row as usize)
                .with_context(|| format!("row {row} out of range (n = {n})"))?;
            if slot.is_some() {
                bail!("row {row} appears twice in the BM25 index");
            }
            *slot = Some(DocAddress::new(seg_ord as u32, doc));
        }
    }
    addr.into_iter()
        .enumerate()
        .map(|(row, a)| a.with_context(|| format!("row {row} is missing from the BM25 index")))
        .collect()
}

/// Sort best first (score desc, row asc) and keep `k`.
fn truncate_top_k(v: &mut Vec<(u64, f32)>, k: usize) {
    let cmp = |a: &(u64, f32), b: &(u64, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if v.len() > k {
        v.select_nth_unstable_by(k - 1, cmp);
        v.truncate(k);
    }
    v.sort_unstable_by(cmp);
}

fn field_stats(searcher: &Searcher, field: Field, boost: f32, p: Bm25Params) -> Result<FieldStats> {
    let mut doc_count = 0u64;
    let mut total_tokens = 0u64;
    let mut lengths: [Option<u32>; 256] = [None; 256];
    for seg in searcher.segment_readers() {
        total_tokens += seg.inverted_index(field)?.total_num_tokens();
        let norms = seg.get_fieldnorms_reader(field)?;
        for doc in 0..seg.max_doc() {
            let id = norms.fieldnorm_id(doc);
            if id > 0 {
                doc_count += 1;
            }
            if lengths[id as usize].is_none() {
                lengths[id as usize] = Some(norms.fieldnorm(doc));
            }
        }
    }
    let avgdl = if doc_count > 0 {
        total_tokens as f32 / doc_count as f32
    } else {
        1.0
    };
    let mut norm = [0f32; 256];
    for (id, n) in norm.iter_mut().enumerate() {
        // Norm ids never seen in this index are never looked up; fill them with a harmless value.
        let len = lengths[id].unwrap_or(0) as f32;
        *n = p.k1 * (1.0 - p.b + p.b * len / avgdl);
    }
    Ok(FieldStats {
        field,
        boost,
        doc_count,
        norm,
    })
}

impl Retriever for Bm25Retriever {
    /// BM25 ignores `query_embeddings`.
    fn retrieve(
        &self,
        queries: &[&str],
        _query_embeddings: Option<&Tensor>,
        k: usize,
    ) -> Result<Vec<Hits>> {
        queries.par_iter().map(|q| self.search_hits(q, k)).collect()
    }

    fn len(&self) -> usize {
        self.manifest.num_passages as usize
    }
}
