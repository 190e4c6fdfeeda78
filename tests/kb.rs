//! Knowledge base tests: ingestion (all formats, bad input), the on-disk store, exact and HNSW dense
//! search, manifest checks, atomic generations (including killing a real `rustrag index build`),
//! incremental add and re-embedding — with the real all-MiniLM-L6-v2 and real SQuAD passages.
//!
//! Needs `$RUSTRAG_MODELS/all-MiniLM-L6-v2` (default `<crate>/models`) and `$RUSTRAG_DATA`
//! (default `<crate>/../shared/data`); fails with a clear message when they are missing.

use rustrag::encoders::{EncoderFingerprint, TextEncoder};
use rustrag::kb::ingest::{read_corpus, IngestOptions};
use rustrag::kb::{self, BuildOptions, EmbeddingDtype, HnswParams, KnowledgeBase};
use rustrag::retrieve::dense::{exact_search, DenseRetriever};
use rustrag::retrieve::quantized::QuantizedEmbeddings;
use rustrag::retrieve::{Passage, Retriever};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn minilm_dir() -> PathBuf {
    let models = std::env::var("RUSTRAG_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| crate_dir().join("models"));
    let dir = models.join("all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "real MiniLM missing at {} — run scripts/fetch-models.sh or set RUSTRAG_MODELS",
        dir.display()
    );
    dir
}

fn data_dir() -> PathBuf {
    let d = std::env::var("RUSTRAG_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| crate_dir().join("../shared/data"));
    assert!(
        d.join("squad-dev/corpus.jsonl.gz").is_file(),
        "evaluation data missing at {} — set RUSTRAG_DATA",
        d.display()
    );
    d
}

fn minilm() -> Arc<dyn TextEncoder> {
    static ENC: OnceLock<Arc<dyn TextEncoder>> = OnceLock::new();
    ENC.get_or_init(|| {
        Arc::from(
            rustrag::encoders::load_encoder(
                minilm_dir().to_str().unwrap(),
                &rustrag::encoders::LoadOptions::default(),
            )
            .expect("load MiniLM"),
        )
    })
    .clone()
}

/// The first `n` lines of SQuAD-dev's BEIR corpus, written to `dir/name`.
fn squad_subset(dir: &Path, name: &str, skip: usize, n: usize) -> PathBuf {
    let f = std::fs::File::open(data_dir().join("squad-dev/corpus.jsonl.gz")).unwrap();
    let r = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(f));
    let out = dir.join(name);
    let mut w = std::fs::File::create(&out).unwrap();
    for line in r.lines().skip(skip).take(n) {
        writeln!(w, "{}", line.unwrap()).unwrap();
    }
    out
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, bytes).unwrap();
    p
}

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

// ---------------------------------------------------------------- ingestion

#[test]
fn ingests_every_format() {
    let t = tempfile::tempdir().unwrap();
    let beir = write(
        t.path(),
        "c.jsonl",
        b"{\"_id\": \"a\", \"title\": \"T\", \"text\": \"x y\"}\n\n{\"_id\": 7, \"text\": \"z\"}\n",
    );
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(b"{\"_id\": \"g\", \"title\": \"\", \"text\": \"gz text\"}\n")
        .unwrap();
    let beir_gz = write(t.path(), "c2.jsonl.gz", &gz.finish().unwrap());
    let dpr = write(
        t.path(),
        "psgs.tsv",
        b"id\ttext\ttitle\n1\t\"Aaron \"\"the\"\" elder\"\tAaron\n2\tplain\tB\n",
    );
    let hf = write(
        t.path(),
        "kb.csv",
        b"Title A\ttext of A\nTitle B\ttext of B\n",
    );
    let csv = write(t.path(), "comma.csv", b"title,text\nC1,\"hello, world\"\n");
    write(
        t.path(),
        "md/sub/note.md",
        b"intro\n# Heading One\nbody words\n",
    );
    write(t.path(), "md/a.txt", b"plain file\n");
    write(t.path(), "md/ignored.bin", b"\xff\xfe");
    let srcs = [beir, beir_gz, dpr, hf, csv, t.path().join("md")];
    let ing = read_corpus(&srcs, &IngestOptions::default()).unwrap();
    let got: Vec<(&str, &str, &str)> = ing
        .documents
        .iter()
        .map(|d| (d.id.as_str(), d.title.as_str(), d.text.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("a", "T", "x y"),
            ("7", "", "z"),
            ("g", "", "gz text"),
            ("1", "Aaron", "Aaron \"the\" elder"),
            ("2", "B", "plain"),
            ("kb:1", "Title A", "text of A"),
            ("kb:2", "Title B", "text of B"),
            ("comma:2", "C1", "hello, world"),
            ("a.txt", "a", "plain file\n"),
            (
                "sub/note.md",
                "Heading One",
                "intro\n# Heading One\nbody words\n"
            ),
        ]
    );
    assert!(ing.bad.is_empty());
}

#[test]
fn bad_input_is_reported_with_file_and_line() {
    let t = tempfile::tempdir().unwrap();
    let strict = IngestOptions::default();
    let skip = IngestOptions {
        skip_bad: true,
        ..Default::default()
    };

    let f = write(t.path(), "bad.jsonl", b"{\"_id\":\"a\",\"text\":\"ok\"}\n{\"_id\":\"b\",\"text\":\n{\"_id\":\"c\"}\n{\"_id\":\"d\",\"text\":\"ok\"}\n");
    let e = err_of(read_corpus(std::slice::from_ref(&f), &strict));
    assert!(
        e.contains("bad.jsonl:2: not valid JSON") && e.contains("--skip-bad"),
        "{e}"
    );
    let ing = read_corpus(&[f], &skip).unwrap();
    assert_eq!(ing.documents.len(), 2);
    let bad: Vec<String> = ing
        .bad
        .iter()
        .map(|b| format!("{}:{}", b.line, b.reason))
        .collect();
    assert_eq!(bad.len(), 2);
    assert!(bad[1].starts_with("3:missing field `text`"), "{bad:?}");

    let f = write(
        t.path(),
        "utf.jsonl",
        b"{\"_id\":\"a\",\"text\":\"ok\"}\n{\"_id\":\"b\",\"text\":\"\xc3\x28\"}\n",
    );
    let e = err_of(read_corpus(&[f], &strict));
    assert!(e.contains("utf.jsonl:2: invalid UTF-8 at byte 19"), "{e}");

    let f = write(
        t.path(),
        "dup.jsonl",
        b"{\"_id\":\"a\",\"text\":\"1\"}\n{\"_id\":\"a\",\"text\":\"2\"}\n",
    );
    let e = err_of(read_corpus(&[f], &strict));
    assert!(
        e.contains("dup.jsonl:2: duplicate document id \"a\" (first seen at")
            && e.contains("dup.jsonl:1"),
        "{e}"
    );

    let f = write(t.path(), "empty.jsonl", b"\n\n");
    let e = err_of(read_corpus(&[f], &strict));
    assert!(e.contains("empty corpus"), "{e}");
    let f = write(t.path(), "allbad.jsonl", b"nope\n");
    let e = err_of(read_corpus(&[f], &skip));
    assert!(
        e.contains("empty corpus") && e.contains("1 bad records skipped"),
        "{e}"
    );

    let huge = format!(
        "{{\"_id\":\"h\",\"text\":\"{}\"}}\n{{\"_id\":\"s\",\"text\":\"small\"}}\n",
        "w ".repeat(600)
    );
    let f = write(t.path(), "huge.jsonl", huge.as_bytes());
    let small_limit = IngestOptions {
        max_doc_bytes: 1000,
        ..Default::default()
    };
    let e = err_of(read_corpus(std::slice::from_ref(&f), &small_limit));
    assert!(
        e.contains("huge.jsonl:1: record of 1221 bytes is over the limit of 1000 bytes"),
        "{e}"
    );
    let ing = read_corpus(
        &[f],
        &IngestOptions {
            skip_bad: true,
            ..small_limit
        },
    )
    .unwrap();
    assert_eq!(
        ing.documents[0].id, "s",
        "the line after a huge one is read intact"
    );

    let f = write(t.path(), "psgs.tsv", b"id\ttext\ttitle\n1\tonly two\n");
    let e = err_of(read_corpus(&[f], &strict));
    assert!(
        e.contains("psgs.tsv:2: expected 3 tab-separated fields"),
        "{e}"
    );

    let f = write(t.path(), "x.parquet", b"");
    assert!(err_of(read_corpus(&[f], &strict)).contains("unknown corpus format"));
    let e = err_of(read_corpus(&[t.path().join("missing.jsonl")], &strict));
    assert!(e.contains("missing.jsonl"), "{e}");
}

// ---------------------------------------------------------------- exact search

/// Deterministic pseudo-random vectors (LCG) with exact duplicates to exercise tie-breaking.
fn vectors(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut v: Vec<f32> = (0..n * dim)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    if n > 10 {
        let row3 = v[3 * dim..4 * dim].to_vec();
        v[9 * dim..10 * dim].copy_from_slice(&row3);
    }
    v
}

fn naive_top(base: &[f32], q: &[f32], dim: usize, k: usize) -> Vec<(u32, f32)> {
    let mut s: Vec<(u32, f32)> = base
        .chunks(dim)
        .enumerate()
        .map(|(i, d)| (i as u32, d.iter().zip(q).map(|(a, b)| a * b).sum()))
        .collect();
    s.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    s.truncate(k);
    s
}

fn fingerprint(dim: usize) -> EncoderFingerprint {
    EncoderFingerprint {
        source: "test-vectors".into(),
        kind: "test".into(),
        dim,
        pooling: "mean".into(),
        normalized: false,
        weights_sha256: "0".repeat(64),
        int8: false,
        prefixes: Default::default(),
    }
}

fn passages(n: usize) -> Vec<Passage> {
    (0..n)
        .map(|i| Passage {
            id: format!("p{i}"),
            title: format!("title {i}"),
            text: format!("text {i} ünïcödé"),
        })
        .collect()
}

/// An exact search over one knowledge base: `(queries, k)` -> top-k `(row, score)` per query.
type Search<'a> = dyn Fn(&[f32], usize) -> anyhow::Result<Vec<Vec<(u32, f32)>>> + 'a;

#[test]
fn exact_search_matches_brute_force_f32_and_f16() {
    let (n, dim, nq) = (5000, 48, 300); // several doc blocks, two query tiles
    let base = vectors(n, dim, 1);
    let queries = vectors(nq, dim, 2);
    let t = tempfile::tempdir().unwrap();
    for dtype in [EmbeddingDtype::F32, EmbeddingDtype::F16] {
        let root = t.path().join(format!("{dtype:?}"));
        kb::write_kb(
            &root,
            &passages(n),
            &base,
            &fingerprint(dim),
            &BuildOptions {
                dtype,
                ..Default::default()
            },
        )
        .unwrap();
        let kb = KnowledgeBase::open(&root).unwrap();
        kb.verify().unwrap();
        // The reference scores the stored (possibly f16-rounded) vectors.
        let mut stored = Vec::new();
        kb.embeddings().rows_f32_into(0, n, &mut stored);
        // Both exact searches: the f32 scan, and the quantised pass with f32 survivors.
        let quantized = QuantizedEmbeddings::build(kb.embeddings());
        let searches: [(&str, &Search); 2] = [
            ("f32 scan", &|q, k| exact_search(kb.embeddings(), q, k)),
            ("quantised", &|q, k| quantized.search(kb.embeddings(), q, k)),
        ];
        for (name, search) in searches {
            let got = search(&queries, 10).unwrap();
            assert_eq!(got.len(), nq);
            for (qi, q) in queries.chunks(dim).enumerate() {
                let want = naive_top(&stored, q, dim, 10);
                let got_rows: Vec<u32> = got[qi].iter().map(|h| h.0).collect();
                let want_rows: Vec<u32> = want.iter().map(|h| h.0).collect();
                for (g, w) in got[qi].iter().zip(&want) {
                    assert!(
                        (g.1 - w.1).abs() <= 1e-4 * w.1.abs().max(1.0),
                        "{name} {dtype:?} query {qi}: {g:?} vs {w:?}"
                    );
                }
                // Ranks can swap only between (numerically) tied scores.
                if got_rows != want_rows {
                    let gs: Vec<f32> = got[qi].iter().map(|h| h.1).collect();
                    let ws: Vec<f32> = want.iter().map(|h| h.1).collect();
                    assert!(
                        gs.iter().zip(&ws).all(|(a, b)| (a - b).abs() < 1e-4),
                        "{name} {dtype:?} query {qi}: {got_rows:?} vs {want_rows:?}"
                    );
                }
            }
            // Duplicate rows 3 and 9 tie: the lower row ranks first.
            let q3 = stored[3 * dim..4 * dim].to_vec();
            let hits = search(&q3, 2).unwrap();
            assert_eq!(
                hits[0].iter().map(|h| h.0).collect::<Vec<_>>(),
                [3, 9],
                "{name}"
            );
            // k larger than the KB, k = 0.
            assert_eq!(search(&q3, n + 5).unwrap()[0].len(), n, "{name}");
            assert!(search(&q3, 0).unwrap()[0].is_empty(), "{name}");
            assert!(search(&q3[..dim - 1], 1).is_err(), "{name}");
        }
    }
}

#[test]
fn store_lookup_and_manifest_refusals() {
    let (n, dim) = (300, 16);
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("kb");
    let ps = passages(n);
    kb::write_kb(
        &root,
        &ps,
        &vectors(n, dim, 3),
        &fingerprint(dim),
        &BuildOptions::default(),
    )
    .unwrap();
    let kb = KnowledgeBase::open(&root).unwrap();
    assert_eq!(kb.len(), n);
    for row in [0, 1, 150, n - 1] {
        assert_eq!(kb.passage(row).unwrap(), ps[row]);
        assert_eq!(kb.row_of(&ps[row].id).unwrap(), Some(row));
    }
    assert_eq!(kb.row_of("nope").unwrap(), None);
    assert!(err_of(kb.passage(n)).contains("out of range"));
    let m = kb.manifest().clone();
    assert_eq!(
        (m.passages, m.dim, m.dtype),
        (n as u64, dim, EmbeddingDtype::F32)
    );
    assert_eq!(m.files["embeddings.f32"].bytes, (n * dim * 4) as u64);

    // Query encoders that do not match are refused.
    let e = err_of(kb.check_query_encoder(&fingerprint(dim + 1)));
    assert!(e.contains("has dim 17") && e.contains("dim 16"), "{e}");
    let other = EncoderFingerprint {
        weights_sha256: "f".repeat(64),
        ..fingerprint(dim)
    };
    assert!(err_of(kb.check_query_encoder(&other)).contains("is not the encoder that embedded"));
    let pooled = EncoderFingerprint {
        pooling: "cls".into(),
        ..fingerprint(dim)
    };
    assert!(err_of(kb.check_query_encoder(&pooled)).contains("pooling cls"));
    kb.check_query_encoder(&fingerprint(dim)).unwrap();
    // The same model run in int8 is accepted: its vectors are comparable.
    let int8 = EncoderFingerprint {
        int8: true,
        ..fingerprint(dim)
    };
    kb.check_query_encoder(&int8).unwrap();
    let r = DenseRetriever::new(Arc::new(kb), None, None).unwrap();
    let qe = candle_core::Tensor::zeros(
        (1, dim + 2),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(err_of(r.retrieve(&["q"], Some(&qe), 3)).contains("dim 18"));
    assert!(err_of(r.retrieve(&["q"], None, 3)).contains("no question encoder"));
    let r2 = DenseRetriever::new(
        Arc::new(KnowledgeBase::open(&root).unwrap()),
        None,
        Some(64),
    );
    assert!(err_of(r2).contains("has no HNSW index"));

    let gen = KnowledgeBase::open(&root).unwrap().dir().to_path_buf();
    // Another format version is refused with a clear message.
    let mpath = gen.join("manifest.json");
    let orig = std::fs::read_to_string(&mpath).unwrap();
    // Edited by hand, as a KB from before manifest.crc32 (else the CRC refuses the edit first).
    std::fs::remove_file(gen.join("manifest.crc32")).unwrap();
    std::fs::write(
        &mpath,
        orig.replace("\"format_version\": 2", "\"format_version\": 99"),
    )
    .unwrap();
    let e = err_of(KnowledgeBase::open(&root));
    assert!(
        e.contains("format version 99") && e.contains("rebuild"),
        "{e}"
    );
    // Version 1 differed only in its HNSW file: a v1 KB without a graph still opens.
    assert!(orig.contains("\"hnsw\": null"));
    std::fs::write(
        &mpath,
        orig.replace("\"format_version\": 2", "\"format_version\": 1"),
    )
    .unwrap();
    KnowledgeBase::open(&root).unwrap();
    std::fs::write(&mpath, &orig).unwrap();
    // A truncated embeddings file is caught at open.
    let emb = gen.join("embeddings.f32");
    let bytes = std::fs::read(&emb).unwrap();
    std::fs::write(&emb, &bytes[..bytes.len() - 4]).unwrap();
    assert!(err_of(KnowledgeBase::open(&root)).contains("the manifest records"));
    // Same size, flipped byte: the block checksums catch it at open.
    let mut flipped = bytes.clone();
    flipped[100] ^= 1;
    std::fs::write(&emb, &flipped).unwrap();
    assert!(err_of(KnowledgeBase::open(&root))
        .contains("block 0 (bytes 0..19200) fails its CRC32 check"));
    // Not a KB at all; a non-KB directory is never written into.
    assert!(err_of(KnowledgeBase::open(t.path())).contains("not a rustrag knowledge base"));
    write(t.path(), "other/important.txt", b"keep me");
    let e = err_of(kb::write_kb(
        &t.path().join("other"),
        &ps,
        &vectors(n, dim, 3),
        &fingerprint(dim),
        &BuildOptions::default(),
    ));
    assert!(e.contains("not a rustrag knowledge base; refusing"), "{e}");
    // Duplicate passage ids and a wrong-sized matrix are refused before anything is written.
    let mut dup = passages(3);
    dup[2].id = "p0".into();
    assert!(err_of(kb::write_kb(
        &t.path().join("d"),
        &dup,
        &vectors(3, dim, 1),
        &fingerprint(dim),
        &BuildOptions::default()
    ))
    .contains("duplicate passage id"));
    assert!(!t.path().join("d").exists());
    assert!(err_of(kb::write_kb(
        &t.path().join("d"),
        &passages(3),
        &vectors(2, dim, 1),
        &fingerprint(dim),
        &BuildOptions::default()
    ))
    .contains("expected 3 x 16"));
}

#[test]
fn failed_or_abandoned_generation_leaves_previous_kb_live() {
    let (n, dim) = (50, 8);
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("kb");
    kb::write_kb(
        &root,
        &passages(n),
        &vectors(n, dim, 1),
        &fingerprint(dim),
        &BuildOptions::default(),
    )
    .unwrap();
    {
        let lock = kb::lock::WriterLock::acquire(&root, false).unwrap();
        let base = kb::atomic::current_generation_name(&root).unwrap();
        let pending = kb::atomic::PendingGeneration::begin(
            &lock,
            base.as_deref(),
            kb::atomic::GenerationFiles::KnowledgeBase,
        )
        .unwrap();
        std::fs::write(pending.dir().join("embeddings.f32"), b"partial").unwrap();
        // dropped without commit (an error mid-build)
    }
    let kb = KnowledgeBase::open(&root).unwrap();
    assert_eq!(kb.len(), n);
    // A second complete build replaces it and removes the old generation.
    let old_gen = kb.dir().to_path_buf();
    drop(kb);
    kb::write_kb(
        &root,
        &passages(n + 1),
        &vectors(n + 1, dim, 1),
        &fingerprint(dim),
        &BuildOptions::default(),
    )
    .unwrap();
    let kb = KnowledgeBase::open(&root).unwrap();
    assert_eq!(kb.len(), n + 1);
    assert!(!old_gen.exists());
}

// ---------------------------------------------------------------- real encoder, real data

/// SQuAD question -> gold paragraph id, from queries.jsonl.gz, for the paragraphs in `ids`.
fn squad_questions(ids: &[String], per_para: usize) -> Vec<(String, String)> {
    let f = std::fs::File::open(data_dir().join("squad-dev/queries.jsonl.gz")).unwrap();
    let r = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(f));
    let mut out = Vec::new();
    let mut count = std::collections::HashMap::new();
    for line in r.lines() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        let gold = v["gold_pid"].as_str().unwrap().to_string();
        if ids.contains(&gold) {
            let c = count.entry(gold.clone()).or_insert(0);
            if *c < per_para {
                *c += 1;
                out.push((v["question"].as_str().unwrap().to_string(), gold));
            }
        }
    }
    out
}

/// `--int8` MiniLM stays within quantisation error of f32 on real passages: every vector keeps
/// cosine > 0.99 with its f32 twin, and questions rank passages as they do in f32.
#[test]
fn int8_minilm_agrees_with_f32() {
    let t = tempfile::tempdir().unwrap();
    let corpus = squad_subset(t.path(), "squad100.jsonl", 0, 100);
    let docs = rustrag::kb::ingest::read_corpus(&[corpus], &Default::default())
        .unwrap()
        .documents;
    let texts: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
    let int8 = rustrag::encoders::load_encoder(
        minilm_dir().to_str().unwrap(),
        &rustrag::encoders::LoadOptions {
            int8: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(int8.fingerprint().int8 && !minilm().fingerprint().int8);
    let rows = |e: &dyn TextEncoder, texts: &[&str]| -> Vec<Vec<f32>> {
        e.encode_texts(texts).unwrap().to_vec2::<f32>().unwrap()
    };
    let dot = |a: &[f32], b: &[f32]| -> f32 { a.iter().zip(b).map(|(x, y)| x * y).sum() };
    let (p32, p8) = (rows(minilm().as_ref(), &texts), rows(int8.as_ref(), &texts));
    for (i, (a, b)) in p32.iter().zip(&p8).enumerate() {
        // MiniLM normalises, so the dot product is the cosine.
        let cos = dot(a, b);
        assert!(cos > 0.99, "passage {i}: cosine {cos} between int8 and f32");
    }
    let ids: Vec<String> = docs.iter().map(|d| d.id.clone()).collect();
    let qs = squad_questions(&ids, 1);
    let q_texts: Vec<&str> = qs.iter().map(|(q, _)| q.as_str()).collect();
    let (q32, q8) = (
        rows(minilm().as_ref(), &q_texts),
        rows(int8.as_ref(), &q_texts),
    );
    let best = |q: &[f32], ps: &[Vec<f32>]| -> usize {
        (0..ps.len())
            .max_by(|&i, &j| dot(q, &ps[i]).total_cmp(&dot(q, &ps[j])))
            .unwrap()
    };
    let same = q32
        .iter()
        .zip(&q8)
        .filter(|(a, b)| best(a, &p32) == best(b, &p8))
        .count();
    assert!(
        same as f64 >= 0.9 * qs.len() as f64,
        "int8 and f32 agree on the top passage for only {same}/{} questions",
        qs.len()
    );
    // Quantised weights cannot be trained.
    let e = rustrag::encoders::load_encoder(
        minilm_dir().to_str().unwrap(),
        &rustrag::encoders::LoadOptions {
            int8: true,
            trainable: true,
            ..Default::default()
        },
    );
    assert!(err_of(e).contains("inference only"));
}

#[test]
fn real_minilm_kb_build_retrieve_add_reembed_hnsw() {
    let t = tempfile::tempdir().unwrap();
    let corpus = squad_subset(t.path(), "squad40.jsonl", 0, 40);
    let more = squad_subset(t.path(), "squad_more.jsonl", 40, 20);
    let enc = minilm();
    let root = t.path().join("kb");
    let hnsw = HnswParams {
        m: 16,
        ef_construction: 64,
        ef_search: 64,
    };
    let opts = BuildOptions {
        words_per_passage: 0,
        hnsw: Some(hnsw),
        ..Default::default()
    };
    let mut calls = 0;
    let r = kb::build(&root, &[corpus], enc.as_ref(), &opts, &mut |_, _| {
        calls += 1
    })
    .unwrap();
    assert_eq!((r.documents, r.passages), (40, 40));
    assert!(calls >= 2, "progress reported");
    let kb = Arc::new(KnowledgeBase::open(&root).unwrap());
    kb.verify().unwrap();
    let ids: Vec<String> = (0..kb.len())
        .map(|i| kb.passages().id(i).unwrap().to_string())
        .collect();
    let qs = squad_questions(&ids, 2);
    assert!(qs.len() >= 60);
    let texts: Vec<&str> = qs.iter().map(|(q, _)| q.as_str()).collect();

    // Exact: MiniLM puts the gold paragraph in the top 5 for most SQuAD questions.
    let exact = DenseRetriever::new(kb.clone(), Some(enc.clone()), None).unwrap();
    let hits = exact.retrieve(&texts, None, 5).unwrap();
    let found = hits
        .iter()
        .zip(&qs)
        .filter(|(h, (_, g))| h.passages.iter().any(|p| &p.id == g))
        .count();
    assert!(
        found as f64 >= 0.8 * qs.len() as f64,
        "gold in top-5 for only {found}/{}",
        qs.len()
    );
    // Scores are q·d of the returned embeddings, best first.
    let qe = enc
        .encode_texts(&texts[..1])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let h0 = &hits[0];
    for (i, e) in h0.embeddings.as_ref().unwrap().iter().enumerate() {
        let dot: f32 = e.iter().zip(&qe[0]).map(|(a, b)| a * b).sum();
        assert!((dot - h0.scores[i]).abs() < 1e-4);
        assert!(i == 0 || h0.scores[i - 1] >= h0.scores[i]);
    }
    // HNSW on 40 points with ef 64 is exact.
    let ann = DenseRetriever::new(kb.clone(), Some(enc.clone()), Some(64)).unwrap();
    let ann_hits = ann.retrieve(&texts, None, 5).unwrap();
    for (a, e) in ann_hits.iter().zip(&hits) {
        assert_eq!(a.doc_ids, e.doc_ids);
        for (x, y) in a.scores.iter().zip(&e.scores) {
            assert!((x - y).abs() < 1e-4);
        }
    }
    drop((exact, ann));

    // Incremental add: old rows keep their embeddings, new documents become searchable.
    let r = kb::add_documents(
        &root,
        std::slice::from_ref(&more),
        enc.as_ref(),
        &BuildOptions::default(),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!((r.passages, r.added), (60, 20));
    let kb2 = Arc::new(KnowledgeBase::open(&root).unwrap());
    assert_eq!(kb2.len(), 60);
    assert_eq!(kb2.embeddings().row(7), kb.embeddings().row(7));
    assert!(kb2.manifest().hnsw.is_some(), "add keeps the HNSW graph");
    let ids2: Vec<String> = (40..60)
        .map(|i| kb2.passages().id(i).unwrap().to_string())
        .collect();
    let new_qs = squad_questions(&ids2, 1);
    let r2 = DenseRetriever::new(kb2.clone(), Some(enc.clone()), Some(64)).unwrap();
    let nt: Vec<&str> = new_qs.iter().map(|(q, _)| q.as_str()).collect();
    let nh = r2.retrieve(&nt, None, 5).unwrap();
    let found = nh
        .iter()
        .zip(&new_qs)
        .filter(|(h, (_, g))| h.passages.iter().any(|p| &p.id == g))
        .count();
    assert!(
        found as f64 >= 0.7 * new_qs.len() as f64,
        "added passages found for {found}/{}",
        new_qs.len()
    );
    // Adding the same documents again is refused, naming the source line and the document.
    let e = err_of(kb::add_documents(
        &root,
        &[more],
        enc.as_ref(),
        &BuildOptions::default(),
        &mut |_, _| {},
    ));
    assert!(
        e.contains("squad_more.jsonl:1: document")
            && e.contains("is already in the knowledge base"),
        "{e}"
    );

    // Re-embed (same encoder here: the embeddings must come out identical) into f16.
    let opts16 = BuildOptions {
        dtype: EmbeddingDtype::F16,
        ..Default::default()
    };
    kb::reembed(&root, enc.as_ref(), &opts16, &mut |_, _| {}).unwrap();
    let kb3 = KnowledgeBase::open(&root).unwrap();
    assert_eq!(kb3.manifest().dtype, EmbeddingDtype::F16);
    assert_eq!(kb3.passage(45).unwrap(), kb2.passage(45).unwrap());
    let (a, b) = (kb3.embeddings().row(45), kb2.embeddings().row(45));
    assert!(
        a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 2e-3),
        "f16 re-embedding matches"
    );
    assert!(kb3.bytes_on_disk() < kb2.bytes_on_disk());
}

// ---------------------------------------------------------------- CLI and kill mid-build

fn rustrag() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_rustrag"));
    c.env("RUST_LOG", "warn");
    c
}

#[test]
fn killing_index_build_keeps_previous_kb_usable() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("kb");
    let small = squad_subset(t.path(), "small.jsonl", 0, 30);
    let model = minilm_dir();
    let out = rustrag()
        .args(["--json", "index", "build", "--corpus"])
        .arg(&small)
        .args([
            "--encoder",
            model.to_str().unwrap(),
            "--out",
            root.to_str().unwrap(),
            "--words-per-passage",
            "0",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "first build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["passages"], 30);

    // Rebuild from the whole SQuAD-dev corpus into the same KB and kill it while it is embedding.
    let mut child = rustrag()
        .args(["index", "build", "--corpus"])
        .arg(data_dir().join("squad-dev/corpus.jsonl.gz"))
        .args([
            "--encoder",
            model.to_str().unwrap(),
            "--out",
            root.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let partial = loop {
        let tmp = std::fs::read_dir(&root)
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with(".tmp-gen-"));
        if let Some(tmp) = tmp {
            let emb = tmp.path().join("embeddings.f32");
            if emb.metadata().map(|m| m.len() > 0).unwrap_or(false) {
                break tmp.path();
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the big build finished before it could be killed"
        );
        assert!(
            t0.elapsed().as_secs() < 600,
            "the big build never started embedding"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    child.kill().unwrap(); // SIGKILL: no cleanup runs
    child.wait().unwrap();
    assert!(
        partial.exists(),
        "the killed build left its partial generation behind"
    );

    // The previous KB still loads and answers, through the library and through the CLI.
    let kb = Arc::new(KnowledgeBase::open(&root).unwrap());
    assert_eq!(kb.len(), 30);
    kb.verify().unwrap();
    let p3 = kb.passage(3).unwrap();
    let q = squad_questions(std::slice::from_ref(&p3.id), 1);
    let r = DenseRetriever::new(kb.clone(), Some(minilm()), None).unwrap();
    let hits = r.retrieve(&[q[0].0.as_str()], None, 3).unwrap();
    assert!(
        hits[0].passages.iter().any(|p| p.id == p3.id),
        "gold passage retrieved after the kill"
    );
    let out = rustrag()
        .args([
            "--json",
            "retrieve",
            "--kb",
            root.to_str().unwrap(),
            "--k",
            "3",
            "--query",
            &q[0].0,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["results"][0]["hits"].as_array().unwrap().len(), 3);
    assert!(v["results"][0]["hits"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["id"] == p3.id.as_str()));

    // The next successful build removes the dead build's temp dir.
    let out = rustrag()
        .args(["index", "build", "--corpus"])
        .arg(&small)
        .args([
            "--encoder",
            model.to_str().unwrap(),
            "--out",
            root.to_str().unwrap(),
            "--f16",
            "--words-per-passage",
            "0",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!partial.exists());
    let info = rustrag()
        .args([
            "--json",
            "index",
            "info",
            "--verify",
            "--kb",
            root.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(info.status.success());
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(
        (v["dtype"].as_str(), v["passages"].as_u64()),
        (Some("f16"), Some(30))
    );
}

#[test]
fn cli_reports_bad_input_and_writes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let bad = write(
        t.path(),
        "bad.jsonl",
        b"{\"_id\":\"a\",\"text\":\"fine\"}\n{oops\n",
    );
    let root = t.path().join("kb");
    let model = minilm_dir();
    let out = rustrag()
        .args(["index", "build", "--corpus"])
        .arg(&bad)
        .args([
            "--encoder",
            model.to_str().unwrap(),
            "--out",
            root.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.jsonl:2: not valid JSON"), "{err}");
    assert!(!root.exists(), "nothing written for a bad corpus");
    let out = rustrag()
        .args(["--json", "index", "build", "--skip-bad", "--corpus"])
        .arg(&bad)
        .args([
            "--encoder",
            model.to_str().unwrap(),
            "--out",
            root.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["passages"], 1);
    assert_eq!(v["bad_records"][0]["line"], 2);
    let out = rustrag()
        .args([
            "retrieve",
            "--kb",
            t.path().to_str().unwrap(),
            "--query",
            "x",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a rustrag knowledge base"));
}
