//! The fuzz harnesses of rustrag: each takes arbitrary bytes, hands them to the library's real entry
//! point (the bytes become a file on disk where the library reads files) and exercises what it
//! returns. Errors are fine; a panic, an abort or an unbounded allocation is a bug.
//!
//! Used by the cargo-fuzz targets in `fuzz_targets/` (nightly, `bench/fuzz.sh`) and, through
//! `#[path]`, by `tests/fuzz_regressions.rs` (stable), which replays every saved crash input
//! through the same harness.

use anyhow::{Context, Result};
use rustrag::generators::gguf::{tokenizer_from_gguf, ChatMessage, ChatTemplate, GgufFile};
use rustrag::generators::llama::{Llama, LlamaConfig};
use rustrag::kb::ingest::{read_corpus, IngestOptions};
use rustrag::kb::split::{document_id, split_document};
use rustrag::kb::KnowledgeBase;
use rustrag::tokenize::{Padding, TextTokenizer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// With `RUSTRAG_FUZZ_VERBOSE` set, print each harness's error (to check that seeds get deep).
pub fn report(r: Result<()>) {
    static VERBOSE: OnceLock<bool> = OnceLock::new();
    if *VERBOSE.get_or_init(|| std::env::var_os("RUSTRAG_FUZZ_VERBOSE").is_some()) {
        match r {
            Ok(()) => eprintln!("ok"),
            Err(e) => eprintln!("error: {e:#}"),
        }
    }
}

/// Let a panic raised inside a dependency's code unwind instead of aborting the fuzzer.
///
/// libfuzzer-sys's panic hook aborts on every panic, before unwinding. rustrag runs the
/// third-party readers of untrusted files (candle's safetensors, pickle and GGUF readers) under
/// `hub::parse_guarded`, which turns their panics into an error naming the file, so for those the
/// product's behaviour is a clean error, and the fuzzer should record the input as handled and go
/// on (before this, the `weights` target stopped within seconds at a pickle LONG1 overflow that
/// `parse_guarded` already handles). A panic in rustrag's own code still aborts at once, and a
/// dependency panic that no guard catches unwinds into libfuzzer-sys's `catch_unwind`, which
/// aborts: both remain crashes.
fn let_dependency_panics_unwind() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let fuzzer_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_dependency = info
                .location()
                .is_some_and(|l| l.file().contains("/.cargo/registry/"));
            if !in_dependency {
                fuzzer_hook(info);
            }
        }));
    });
}

/// Split off the first byte (the harness's selector) from the payload.
fn selector(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((s, rest)) => (*s, rest),
        None => (0, data),
    }
}

/// A scratch file named `name` holding `bytes` (the directory lives as long as the guard).
fn scratch_file(name: &str, bytes: &[u8]) -> Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(name);
    std::fs::write(&path, bytes)?;
    Ok((dir, path))
}

/// Corpus ingestion and splitting. Selector: bits 0-2 pick the file name (so the format),
/// bit 3 `--skip-bad`, bits 4-7 the words per passage; the payload is the file.
pub fn ingest(data: &[u8]) -> Result<()> {
    const NAMES: [&str; 8] = [
        "corpus.jsonl",
        "passages.tsv",
        "kb.csv",
        "doc.txt",
        "doc.md",
        "corpus.jsonl.gz",
        "title_text.tsv",
        "notes.markdown",
    ];
    let (sel, payload) = selector(data);
    let (_dir, path) = scratch_file(NAMES[(sel & 7) as usize], payload)?;
    let opts = IngestOptions {
        skip_bad: sel & 8 != 0,
        // Small, so the fuzzer reaches the over-the-limit paths.
        max_doc_bytes: 4096,
    };
    let words = (sel >> 4) as usize;
    let ingested = read_corpus(&[path], &opts)?;
    for doc in &ingested.documents {
        for p in split_document(doc, words) {
            let _ = document_id(&p.id);
        }
    }
    Ok(())
}

/// The GGUF reader: open the payload as a GGUF file, read the llama config and weights (quantized
/// or dequantized to f32, by the selector's bit 0), the tokenizer and the chat template, and use
/// them: one chat prompt encoded and decoded.
pub fn gguf(data: &[u8]) -> Result<()> {
    let_dependency_panics_unwind();
    let (sel, payload) = selector(data);
    let (_dir, path) = scratch_file("model.gguf", payload)?;
    let g = GgufFile::open(&path)?;
    let chat = ChatTemplate::from_gguf(&g);
    let cfg = LlamaConfig::from_gguf(&g);
    let vocab = match &cfg {
        Ok(c) => c.vocab_size,
        Err(_) => g
            .tensor_shape("token_embd.weight")
            .map(|s| s.dims().first().copied().unwrap_or(0))?,
    };
    let tok = tokenizer_from_gguf(&g, vocab)?;
    let prompt = match chat {
        Ok(c) => c.format(&[ChatMessage::new("user", "Who wrote RAG? ü 漢字")], true)?,
        Err(_) => "Who wrote RAG? ü 漢字".to_string(),
    };
    let enc = tok.encode_batch(&[&prompt], true, Some(64), Padding::None)?;
    tok.decode(&enc.input_ids[0], false)?;
    cfg?;
    let mode = if sel & 1 == 0 {
        rustrag::generators::llama::GgufWeights::default()
    } else {
        rustrag::generators::llama::GgufWeights::F32
    };
    Llama::from_gguf_with(&g, &candle_core::Device::Cpu, mode)?;
    Ok(())
}

/// The HF weight reader: the payload as `model.safetensors` (selector bit 0 clear) or
/// `pytorch_model.bin` (set), loaded as f32 (bit 1 clear) or bf16 (set); every tensor is read back.
pub fn weights(data: &[u8]) -> Result<()> {
    let_dependency_panics_unwind();
    use candle_core::DType;
    let (sel, payload) = selector(data);
    let name = if sel & 1 == 0 {
        "model.safetensors"
    } else {
        "pytorch_model.bin"
    };
    let dtype = if sel & 2 == 0 {
        DType::F32
    } else {
        DType::BF16
    };
    let (dir, _path) = scratch_file(name, payload)?;
    let w = rustrag::hub::Weights::from_dir(dir.path(), dtype, &candle_core::Device::Cpu, false)?;
    let mut names: Vec<String> = w.names().map(str::to_string).collect();
    names.sort();
    for n in &names {
        let t = w.get(n)?;
        // Read every element, as a model load does when it converts or uses them.
        t.flatten_all()?.to_dtype(DType::F32)?.sum_all()?;
    }
    Ok(())
}

/// The files of a knowledge-base generation, in the order the selector's bits 0-2 pick them.
pub const KB_FILES: [&str; 6] = [
    "manifest.json",
    "passages.bin",
    "passages.idx",
    "ids.idx",
    "embeddings",
    "hnsw.graph",
];

/// Dimension of the seed knowledge bases' embeddings.
const SEED_DIM: usize = 4;

/// A small knowledge base (5 passages, an HNSW graph), f32 or f16, written once per process by the
/// library's own writer into a directory that lives for the whole process.
pub fn seed_kb(f16: bool) -> Result<&'static Path> {
    static SEEDS: OnceLock<(tempfile::TempDir, tempfile::TempDir)> = OnceLock::new();
    if SEEDS.get().is_none() {
        let a = write_seed_kb(false)?;
        let b = write_seed_kb(true)?;
        let _ = SEEDS.set((a, b));
    }
    let (a, b) = SEEDS.get().expect("set above");
    Ok(if f16 { b.path() } else { a.path() })
}

fn write_seed_kb(f16: bool) -> Result<tempfile::TempDir> {
    use rustrag::kb::{write_kb, BuildOptions, EmbeddingDtype, HnswParams, Passage};
    let dir = tempfile::tempdir()?;
    let texts = [
        (
            "d1",
            "Retrieval",
            "RAG marginalises over retrieved passages.",
        ),
        ("d2", "BM25", "Okapi BM25 ranks by term frequency."),
        ("d3#0", "Ünïcode", "漢字 and emoji 🙂 survive the store."),
        ("d3#1", "Ünïcode", "second chunk"),
        ("d4", "", "untitled passage"),
    ];
    let passages: Vec<Passage> = texts
        .iter()
        .map(|(id, title, text)| Passage {
            id: id.to_string(),
            title: title.to_string(),
            text: text.to_string(),
        })
        .collect();
    let embeddings: Vec<f32> = (0..passages.len() * SEED_DIM)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0)
        .collect();
    let encoder = rustrag::encoders::EncoderFingerprint {
        source: "fuzz-seed".into(),
        kind: "sentence-transformers".into(),
        dim: SEED_DIM,
        pooling: "mean".into(),
        normalized: true,
        weights_sha256: "0".repeat(64),
        int8: false,
        prefixes: Default::default(),
    };
    let opts = BuildOptions {
        words_per_passage: 0,
        dtype: if f16 {
            EmbeddingDtype::F16
        } else {
            EmbeddingDtype::F32
        },
        hnsw: Some(HnswParams {
            m: 2,
            ef_construction: 8,
            ef_search: 8,
        }),
        ..BuildOptions::default()
    };
    write_kb(dir.path(), &passages, &embeddings, &encoder, &opts)?;
    Ok(dir)
}

/// The generation directory of the KB at `root` (named by `CURRENT`).
fn generation_dir(root: &Path) -> Result<PathBuf> {
    rustrag::kb::atomic::current_generation(root)?.context("seed KB has no CURRENT")
}

/// A scratch copy of a seed KB: its root directory and its generation directory.
pub fn copy_seed_kb(f16: bool) -> Result<(tempfile::TempDir, PathBuf)> {
    let seed = seed_kb(f16)?;
    let seed_gen = generation_dir(seed)?;
    let root = tempfile::tempdir()?;
    let gen = root
        .path()
        .join(seed_gen.file_name().context("generation name")?);
    std::fs::create_dir(&gen)?;
    for e in std::fs::read_dir(&seed_gen)? {
        let e = e?;
        std::fs::copy(e.path(), gen.join(e.file_name()))?;
    }
    for e in std::fs::read_dir(seed)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), root.path().join(e.file_name()))?;
        }
    }
    Ok((root, gen))
}

/// The knowledge-base readers: a copy of a seed KB with one file replaced by the payload, opened and
/// read through. Selector: bits 0-2 pick the file ([`KB_FILES`], modulo 6), bit 4 re-seals the
/// manifest (its size, sha256 and block checksums of the new file are recorded, so the readers
/// behind the integrity checks see the bytes), bit 5 picks the f16 KB.
pub fn kb_files(data: &[u8]) -> Result<()> {
    let (sel, payload) = selector(data);
    let f16 = sel & 0x20 != 0;
    let (root, gen) = copy_seed_kb(f16)?;
    let mut file = KB_FILES[(sel & 7) as usize % KB_FILES.len()].to_string();
    if file == "embeddings" {
        file = if f16 {
            "embeddings.f16"
        } else {
            "embeddings.f32"
        }
        .into();
    }
    std::fs::write(gen.join(&file), payload)?;
    if file == "manifest.json" {
        // Reach the parser: the manifest's own CRC file would refuse almost every payload.
        std::fs::remove_file(gen.join(rustrag::kb::manifest::MANIFEST_CRC_FILE))?;
    }
    if sel & 0x10 != 0 && file != "manifest.json" {
        let path = gen.join(rustrag::kb::manifest::MANIFEST_FILE);
        let mut m: rustrag::kb::Manifest = serde_json::from_slice(&std::fs::read(&path)?)?;
        m.files.insert(
            file.clone(),
            rustrag::kb::manifest::file_entry(&gen.join(&file))?,
        );
        m.write(&gen)?;
    }
    read_kb(root.path())
}

/// Open the KB at `root` and use every reader: each passage by row and by id, each embedding row,
/// both checksum checks, exact search and (when there is a graph) HNSW search.
pub fn read_kb(root: &Path) -> Result<()> {
    use rustrag::retrieve::dense::DenseRetriever;
    let kb = KnowledgeBase::open(root)?;
    // A reader walks at most what the files hold; cap the loop so that a valid but large KB (a
    // fuzzed manifest may claim many empty rows) does not make one input take seconds.
    let rows = kb.len().min(1000);
    for r in 0..rows {
        let p = kb.passage(r)?;
        kb.row_of(&p.id)?;
        kb.embeddings().row(r);
    }
    kb.row_of("d2")?;
    kb.verify_blocks()?;
    kb.verify()?;
    let dim = kb.dim().min(1 << 16);
    let query: Vec<f32> = (0..dim).map(|i| 1.0 / (1 + i) as f32).collect();
    let has_graph = kb.hnsw_path().is_some();
    let kb = Arc::new(kb);
    DenseRetriever::new(kb.clone(), None, None)?.search(&query, 3)?;
    if has_graph {
        DenseRetriever::new(kb, None, Some(8))?.search(&query, 3)?;
    }
    Ok(())
}

/// The real tokenizers: MiniLM's WordPiece (`all-MiniLM-L6-v2/tokenizer.json`) and SmolLM2's
/// byte-level BPE (from its GGUF metadata), under `$RUSTRAG_MODELS` (default `/work/models`).
pub struct Tokenizers {
    pub minilm: TextTokenizer,
    pub smollm: TextTokenizer,
    pub smollm_chat: ChatTemplate,
}

/// The tokenizers, loaded once per process.
pub fn tokenizers() -> Result<&'static Tokenizers> {
    static TOKS: OnceLock<Tokenizers> = OnceLock::new();
    if let Some(t) = TOKS.get() {
        return Ok(t);
    }
    let models =
        PathBuf::from(std::env::var_os("RUSTRAG_MODELS").unwrap_or_else(|| "/work/models".into()));
    let minilm = TextTokenizer::from_dir(&models.join("all-MiniLM-L6-v2"))?;
    let gguf = models.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = GgufFile::open(&gguf)?;
    let vocab = g.tensor_shape("token_embd.weight")?.dims()[0];
    let smollm = tokenizer_from_gguf(&g, vocab)?;
    let smollm_chat = ChatTemplate::from_gguf(&g)?;
    let _ = TOKS.set(Tokenizers {
        minilm,
        smollm,
        smollm_chat,
    });
    Ok(TOKS.get().expect("set above"))
}

/// The tokenizer front end. Selector bits 0-1: the payload (lossily UTF-8) encoded by MiniLM
/// (single text, truncated and padded as the encoder does), as a (title, text) pair split at the
/// first tab, by SmolLM2 inside its chat template, or read as little-endian u32 ids decoded by both;
/// encoded ids are decoded back.
pub fn tokenizer(data: &[u8]) -> Result<()> {
    let t = tokenizers()?;
    let (sel, payload) = selector(data);
    let text = String::from_utf8_lossy(payload);
    match sel & 3 {
        0 => {
            let e = t
                .minilm
                .encode_batch(&[&text, "short"], true, Some(128), Padding::Longest)?;
            t.minilm.decode(&e.input_ids[0], sel & 4 != 0)?;
        }
        1 => {
            let (a, b) = text.split_once('\t').unwrap_or((&text, ""));
            let e = t
                .minilm
                .encode_pairs(&[(a, b)], Some(64), Padding::Fixed(64))?;
            t.minilm.decode(&e.input_ids[0], true)?;
        }
        2 => {
            let prompt = t
                .smollm_chat
                .format(&[ChatMessage::new("user", &text)], true)?;
            let e = t
                .smollm
                .encode_batch(&[&prompt, &text], false, None, Padding::None)?;
            t.smollm.decode(&e.input_ids[0], sel & 4 != 0)?;
            t.smollm.decode(&e.input_ids[1], true)?;
        }
        _ => {
            let ids: Vec<u32> = payload
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            // Ids past the vocabulary are errors (or skipped), never a panic.
            let _ = t.minilm.decode(&ids, sel & 4 != 0);
            let _ = t.smollm.decode(&ids, sel & 4 != 0);
        }
    }
    Ok(())
}
