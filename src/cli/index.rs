//! `rustrag index build|add|info|reembed`: build and maintain on-disk knowledge bases.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rustrag::encoders::{Prefixes, TextEncoder};
use rustrag::kb::ingest::IngestOptions;
use rustrag::kb::{self, BuildOptions, BuildReport, EmbeddingDtype, HnswParams, KnowledgeBase};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: IndexCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum IndexCommand {
    /// Build a knowledge base from a corpus (replaces the live one atomically).
    Build(BuildArgs),
    /// Add documents to an existing knowledge base (same encoder).
    Add(AddArgs),
    /// Show what a knowledge base holds.
    Info(InfoArgs),
    /// Re-embed every passage with another context encoder (e.g. after training).
    Reembed(ReembedArgs),
}

/// Options shared by the commands that embed passages.
#[derive(clap::Args, Debug, Clone)]
pub struct EmbedOpts {
    /// Passages per encoder forward pass (1..=4096).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Override the encoder's maximum tokens per passage (at least 1; capped by the model's
    /// position embeddings).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Skip (and report) malformed records instead of stopping at the first.
    #[arg(long)]
    pub skip_bad: bool,
    /// Run the encoder's linear layers in dynamic int8 (faster; vectors within quantisation
    /// error of f32, recorded in the manifest).
    #[arg(long)]
    pub int8: bool,
    /// Records larger than this many bytes are malformed.
    #[arg(long, default_value_t = 8 << 20)]
    pub max_doc_bytes: usize,
    /// Also build an HNSW graph (inner product).
    #[arg(long)]
    pub hnsw: bool,
    /// HNSW: neighbours per node (2..=256).
    #[arg(long, default_value_t = 32)]
    pub m: usize,
    /// HNSW: candidate list size while building (1..=10000).
    #[arg(long, default_value_t = 128)]
    pub ef_construction: usize,
    /// HNSW: default candidate list size while searching (1..=10000).
    #[arg(long, default_value_t = 128)]
    pub ef_search: usize,
    /// Wait for another writer of this knowledge base to finish instead of failing.
    #[arg(long)]
    pub wait: bool,
    /// Prefix prepended to each query (E5: "query: "); with --passage-prefix, replaces the
    /// model's `config_sentence_transformers.json` prompts. Recorded in the manifest, and
    /// queries of the knowledge base get it.
    #[arg(long)]
    pub query_prefix: Option<String>,
    /// Prefix prepended to each passage (E5: "passage: "); see --query-prefix.
    #[arg(long)]
    pub passage_prefix: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// Corpus file(s) or directories: BEIR corpus.jsonl[.gz], DPR TSV, title/text CSV/TSV, .txt/.md dirs.
    #[arg(long, required = true, num_args = 1..)]
    pub corpus: Vec<PathBuf>,
    /// Context encoder directory or hub id.
    #[arg(long)]
    pub encoder: String,
    /// Knowledge base directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Store embeddings as f16 (half the size).
    #[arg(long)]
    pub f16: bool,
    /// Words per passage (0 = do not split documents).
    #[arg(long, default_value_t = 100)]
    pub words_per_passage: usize,
    #[command(flatten)]
    pub embed: EmbedOpts,
}

#[derive(clap::Args, Debug)]
pub struct AddArgs {
    #[arg(long, required = true, num_args = 1..)]
    pub corpus: Vec<PathBuf>,
    /// Knowledge base directory.
    #[arg(long)]
    pub kb: PathBuf,
    /// Encoder (default: the one recorded in the manifest).
    #[arg(long)]
    pub encoder: Option<String>,
    /// Replace the passages of documents whose id is already in the knowledge base (without it,
    /// such a document is an error).
    #[arg(long)]
    pub upsert: bool,
    #[command(flatten)]
    pub embed: EmbedOpts,
}

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    #[arg(long)]
    pub kb: PathBuf,
    /// Recompute and check the sha256 of every file.
    #[arg(long)]
    pub verify: bool,
}

#[derive(clap::Args, Debug)]
pub struct ReembedArgs {
    #[arg(long)]
    pub kb: PathBuf,
    /// The new context encoder.
    #[arg(long)]
    pub encoder: String,
    #[command(flatten)]
    pub embed: EmbedOpts,
}

/// Load a text encoder for KB building/querying; `prefixes` replace the model's own.
pub fn load_encoder(
    spec: &str,
    batch_size: usize,
    max_length: Option<usize>,
    int8: bool,
    prefixes: Option<Prefixes>,
) -> Result<Box<dyn TextEncoder>> {
    refuse_generator_file(spec)?;
    let opts = rustrag::encoders::LoadOptions {
        batch_size,
        max_length,
        int8,
        prefixes,
        ..Default::default()
    };
    rustrag::encoders::load_encoder(spec, &opts)
}

/// A GGUF file given where an encoder directory belongs gets an error that says what it is.
pub fn refuse_generator_file(spec: &str) -> Result<()> {
    use std::io::Read;
    let path = Path::new(spec);
    if !path.is_file() {
        return Ok(());
    }
    let mut magic = [0u8; 4];
    let is_gguf = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF";
    if is_gguf
        || path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        bail!(
            "{spec} is a GGUF generator file, not an encoder: pass a sentence-transformers, DPR or \
             BERT model directory (GGUF files go to `rustrag ask --generator`)"
        );
    }
    Ok(())
}

/// The encoder a KB's manifest records, loaded with the prefixes the manifest records: a relative path (recorded before paths were stored
/// absolute) is looked up in the current directory, then in the KB directory and its parent; a
/// failure names the manifest it came from.
pub fn manifest_encoder(
    kb: &KnowledgeBase,
    batch_size: usize,
    max_length: Option<usize>,
    int8: bool,
) -> Result<Box<dyn TextEncoder>> {
    let source = &kb.manifest().encoder.source;
    let path = Path::new(source);
    let mut spec = source.clone();
    if path.is_relative() && !path.exists() {
        let candidates = [Some(kb.root()), kb.root().parent()];
        if let Some(found) = candidates
            .into_iter()
            .flatten()
            .map(|d| d.join(path))
            .find(|p| p.exists())
        {
            spec = found.display().to_string();
        }
    }
    let prefixes = Some(kb.manifest().encoder.prefixes.clone());
    load_encoder(&spec, batch_size, max_length, int8, prefixes).with_context(|| {
        format!(
            "loading the encoder {source:?} recorded in {}; pass --encoder to use another copy",
            kb.dir()
                .join(rustrag::kb::manifest::MANIFEST_FILE)
                .display()
        )
    })
}

impl EmbedOpts {
    /// The passage encoder at `spec` with these options; `kb_int8`: the KB being extended was
    /// embedded in int8, so new passages are too, with or without `--int8`.
    fn encoder(&self, spec: &str, kb_int8: bool) -> Result<Box<dyn TextEncoder>> {
        load_encoder(
            spec,
            self.batch_size,
            self.max_length,
            self.int8 || kb_int8,
            self.prefixes(),
        )
    }

    /// `--query-prefix` / `--passage-prefix`, if either is given.
    pub fn prefixes(&self) -> Option<Prefixes> {
        if self.query_prefix.is_none() && self.passage_prefix.is_none() {
            return None;
        }
        Some(Prefixes {
            query: self.query_prefix.clone().unwrap_or_default(),
            passage: self.passage_prefix.clone().unwrap_or_default(),
            source: "flag".into(),
        })
    }
}

/// The library's build options from the flags, checked against their documented bounds (before
/// any model is loaded or file read).
fn build_options(e: &EmbedOpts, words_per_passage: usize, f16: bool) -> Result<BuildOptions> {
    if e.max_length == Some(0) {
        bail!("--max-length 0 would embed every passage as an empty text; it must be at least 1");
    }
    let opts = BuildOptions {
        words_per_passage,
        dtype: if f16 {
            EmbeddingDtype::F16
        } else {
            EmbeddingDtype::F32
        },
        hnsw: e.hnsw.then_some(HnswParams {
            m: e.m,
            ef_construction: e.ef_construction,
            ef_search: e.ef_search,
        }),
        batch_size: e.batch_size,
        ingest: IngestOptions {
            skip_bad: e.skip_bad,
            max_doc_bytes: e.max_doc_bytes,
        },
        wait_for_lock: e.wait,
        upsert: false,
    };
    opts.validate()?;
    Ok(opts)
}

fn progress_bar(json: bool) -> ProgressBar {
    let pb = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} passages ({per_sec}, eta {eta})",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb.set_message("embedding");
    pb
}

pub fn run(args: Args, json: bool) -> Result<()> {
    match args.command {
        IndexCommand::Build(a) => {
            let opts = build_options(&a.embed, a.words_per_passage, a.f16)?;
            let encoder = a.embed.encoder(&a.encoder, false)?;
            let pb = progress_bar(json);
            let mut cb = |done: u64, total: u64| {
                pb.set_length(total);
                pb.set_position(done);
            };
            let r = kb::build(&a.out, &a.corpus, encoder.as_ref(), &opts, &mut cb)?;
            pb.finish_and_clear();
            print_report("built", &a.out, &r, json)
        }
        IndexCommand::Add(a) => {
            // New passages are embedded as the KB's were: same encoder, int8 if it was.
            let mut opts = build_options(&a.embed, 0, false)?;
            opts.upsert = a.upsert;
            let kb = KnowledgeBase::open(&a.kb)?;
            let int8 = a.embed.int8 || kb.manifest().encoder.int8;
            let encoder = match &a.encoder {
                Some(spec) => a.embed.encoder(spec, int8)?,
                None => manifest_encoder(&kb, a.embed.batch_size, a.embed.max_length, int8)?,
            };
            drop(kb);
            if !a.embed.hnsw {
                opts.hnsw = None; // keep the KB's own HNSW settings
            }
            let pb = progress_bar(json);
            let mut cb = |done: u64, total: u64| {
                pb.set_length(total);
                pb.set_position(done);
            };
            let r = kb::add_documents(&a.kb, &a.corpus, encoder.as_ref(), &opts, &mut cb)?;
            pb.finish_and_clear();
            print_report("added to", &a.kb, &r, json)
        }
        IndexCommand::Reembed(a) => {
            let cur = KnowledgeBase::open(&a.kb)?;
            let mut opts = build_options(&a.embed, 0, cur.manifest().dtype == EmbeddingDtype::F16)?;
            let encoder = a.embed.encoder(&a.encoder, false)?;
            if !a.embed.hnsw {
                opts.hnsw = None;
            }
            drop(cur);
            let pb = progress_bar(json);
            let mut cb = |done: u64, total: u64| {
                pb.set_length(total);
                pb.set_position(done);
            };
            let r = kb::reembed(&a.kb, encoder.as_ref(), &opts, &mut cb)?;
            pb.finish_and_clear();
            print_report("re-embedded", &a.kb, &r, json)
        }
        IndexCommand::Info(a) => {
            let kb = KnowledgeBase::open(&a.kb)?;
            if a.verify {
                kb.verify()?;
            }
            let m = kb.manifest();
            if json {
                let mut v = serde_json::to_value(m)?;
                v["generation_dir"] = serde_json::json!(kb.dir().display().to_string());
                v["bytes_on_disk"] = serde_json::json!(kb.bytes_on_disk());
                v["verified"] = serde_json::json!(a.verify);
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                outln!("knowledge base {} ({})", a.kb.display(), kb.dir().display());
                outln!(
                    "  passages     {} from {} documents ({} words/passage)",
                    m.passages,
                    m.documents,
                    m.words_per_passage
                );
                outln!("  embeddings   {} x {} {:?}", m.passages, m.dim, m.dtype);
                outln!(
                    "  encoder      {} ({}, pooling {}, normalized {}, sha256 {})",
                    m.encoder.source,
                    m.encoder.kind,
                    m.encoder.pooling,
                    m.encoder.normalized,
                    m.encoder.weights_sha256
                );
                match &m.hnsw {
                    Some(h) => outln!(
                        "  hnsw         M {} ef_construction {} ef_search {}",
                        h.m,
                        h.ef_construction,
                        h.ef_search
                    ),
                    None => outln!("  hnsw         none (exact search only)"),
                }
                let per = kb.bytes_on_disk() as f64 / m.passages.max(1) as f64;
                outln!(
                    "  on disk      {} bytes ({per:.0} bytes/passage)",
                    kb.bytes_on_disk()
                );
                outln!("  format       v{} by {}", m.format_version, m.writer);
                if a.verify {
                    outln!("  checksums    ok");
                }
            }
            Ok(())
        }
    }
}

/// Print what a committed write did; a failure here says the knowledge base stands.
fn print_report(what: &str, dir: &Path, r: &BuildReport, json: bool) -> Result<()> {
    print_report_lines(what, dir, r, json).with_context(|| {
        format!(
            "{} was written ({}), but its report could not be printed",
            dir.display(),
            r.dir.display()
        )
    })
}

fn print_report_lines(what: &str, dir: &Path, r: &BuildReport, json: bool) -> Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    outln!(
        "{what} {}: {} passages ({} new) from {} documents, dim {} {:?}, {} bytes on disk ({:.0} bytes/passage)",
        dir.display(),
        r.passages,
        r.added,
        r.documents,
        r.dim,
        r.dtype,
        r.bytes_on_disk,
        r.bytes_on_disk as f64 / r.passages.max(1) as f64
    );
    outln!(
        "time: {:.1}s total, {:.1}s embedding ({:.1} passages/s), {:.1}s HNSW",
        r.total_seconds,
        r.embed_seconds,
        r.added as f64 / r.embed_seconds.max(1e-9),
        r.hnsw_seconds
    );
    if r.replaced_documents > 0 {
        outln!(
            "replaced the passages of {} documents already in the knowledge base (--upsert)",
            r.replaced_documents
        );
    }
    if !r.bad_records.is_empty() {
        outln!("skipped {} bad records:", r.bad_records.len());
        for b in r.bad_records.iter().take(20) {
            outln!("  {b}");
        }
        if r.bad_records.len() > 20 {
            outln!("  ... and {} more", r.bad_records.len() - 20);
        }
    }
    Ok(())
}
