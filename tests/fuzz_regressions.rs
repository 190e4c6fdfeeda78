//! Regression tests for what the fuzzers found (fuzz/, bench/fuzz.sh): every saved input under
//! `fuzz/regressions/<target>/` and every seed under `fuzz/corpus/<target>/` is replayed through the
//! same harness the fuzz target runs (fuzz/src/lib.rs), on stable, in plain `cargo test`.
//! A panic fails the test and names the input; the seeds must also be read without error, so that
//! the harnesses are known to reach the readers behind the parsers.

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

type Harness = fn(&[u8]) -> anyhow::Result<()>;

const TARGETS: [(&str, Harness); 5] = [
    ("ingest", harness::ingest),
    ("gguf", harness::gguf),
    ("weights", harness::weights),
    ("kb_files", harness::kb_files),
    ("tokenizer", harness::tokenizer),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `dir`, sorted (none when it does not exist).
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.expect("read_dir entry").path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Run `h` on the file at `path`; a panic fails with the input's name.
fn replay(h: Harness, path: &Path) -> anyhow::Result<()> {
    let data = std::fs::read(path).expect("read input");
    match catch_unwind(AssertUnwindSafe(|| h(&data))) {
        Ok(r) => r,
        Err(_) => panic!("{} panicked (see the message above)", path.display()),
    }
}

/// Every saved crash input: an error (or success) is fine, a panic is not.
#[test]
fn saved_crash_inputs_do_not_panic() {
    let mut n = 0;
    for (target, h) in TARGETS {
        for p in inputs(&fuzz_dir().join("regressions").join(target)) {
            let r = replay(h, &p);
            eprintln!("{}: {:?}", p.display(), r.err().map(|e| format!("{e:#}")));
            n += 1;
        }
    }
    assert!(n > 0, "no saved inputs under fuzz/regressions/");
}

/// Every seed of every target is read without a panic, and those named below without an error:
/// the harness reaches the whole reader with them.
#[test]
fn seed_corpora_are_read() {
    let must_succeed = [
        "ingest/beir.jsonl",
        "ingest/beir.jsonl.gz",
        "ingest/dpr.tsv",
        "ingest/title_text.tsv",
        "ingest/plain.txt",
        "ingest/doc.md",
        "gguf/tiny_f32.gguf",
        "gguf/tiny_q8_0.gguf",
        "gguf/tiny_q8_0_dequant.gguf",
        "weights/model.safetensors",
        "weights/model_bf16.safetensors",
        "weights/pytorch_model.bin",
        "kb_files/manifest.json",
        "kb_files/passages.bin.sealed",
        "kb_files/embeddings.f16.sealed",
        "kb_files/hnsw.graph.sealed",
        "tokenizer/seed0",
        "tokenizer/seed1",
        "tokenizer/seed2",
        "tokenizer/seed4",
    ];
    let corpus = fuzz_dir().join("corpus");
    let mut counts = Vec::new();
    for (target, h) in TARGETS {
        let files = inputs(&corpus.join(target));
        assert!(!files.is_empty(), "no seeds under fuzz/corpus/{target}/");
        for p in &files {
            let name = format!("{target}/{}", p.file_name().unwrap().to_string_lossy());
            let r = replay(h, p);
            if must_succeed.contains(&name.as_str()) {
                if let Err(e) = r {
                    panic!("seed {name}: {e:#}");
                }
            }
        }
        counts.push((target, files.len()));
    }
    eprintln!("seeds replayed: {counts:?}");
}

/// Write the `kb_files` seeds (each file of the seed KBs, with its selector byte: see
/// `harness::kb_files`) and the KB regression input. Run by hand when the KB format changes:
/// `cargo test --release --test fuzz_regressions -- --ignored write_kb_seed_corpus`.
#[test]
#[ignore]
fn write_kb_seed_corpus() {
    let out = fuzz_dir().join("corpus/kb_files");
    std::fs::create_dir_all(&out).unwrap();
    for f16 in [false, true] {
        let root = harness::seed_kb(f16).unwrap();
        let gen = rustrag::kb::atomic::current_generation(root)
            .unwrap()
            .unwrap();
        for (i, name) in harness::KB_FILES.iter().enumerate() {
            let file = match *name {
                "embeddings" if f16 => "embeddings.f16",
                "embeddings" => "embeddings.f32",
                n => n,
            };
            let bytes = std::fs::read(gen.join(file)).unwrap();
            if f16 && *name != "embeddings" {
                // The f16 KB shares every other file with the f32 one.
                continue;
            }
            // Unsealed (the integrity checks see the bytes) and sealed (the readers do).
            for (seal, suffix) in [(0u8, ""), (0x10, ".sealed")] {
                if seal != 0 && file == "manifest.json" {
                    continue;
                }
                let mut data = vec![i as u8 | seal | if f16 { 0x20 } else { 0 }];
                data.extend_from_slice(&bytes);
                std::fs::write(out.join(format!("{file}{suffix}")), data).unwrap();
            }
        }
    }
    // The regression input of `manifest_passage_count_that_wraps_is_refused`, as the fuzz target
    // takes it (selector 0: manifest.json replaced).
    let gen = rustrag::kb::atomic::current_generation(harness::seed_kb(false).unwrap())
        .unwrap()
        .unwrap();
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(gen.join("manifest.json")).unwrap()).unwrap();
    m["passages"] = ((1u64 << 62) + 5).into();
    let mut data = vec![0u8];
    data.extend(serde_json::to_vec_pretty(&m).unwrap());
    let dir = fuzz_dir().join("regressions/kb_files");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("manifest_passages_wrap.json"), data).unwrap();
}

/// A manifest whose passage count wraps the size arithmetic around (2^62 + 5 rows: 8 (n + 1) and
/// 4 n bytes come to the 48 and 20 bytes of the real passages.idx and ids.idx, and n x 4 x 4 to the
/// real 80-byte embeddings) was opened as a KB of 2^62 + 5 passages, and reading row 5 panicked
/// (index out of range in `passages.idx`). Found reading the code behind the `kb_files` target;
/// the same input is fuzz/regressions/kb_files/manifest_passages_wrap.json.
#[test]
fn manifest_passage_count_that_wraps_is_refused() {
    let (root, gen) = harness::copy_seed_kb(false).unwrap();
    let path = gen.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(m["passages"], 5, "the seed KB changed: update this test");
    m["passages"] = ((1u64 << 62) + 5).into();
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    // As the fuzz target does for a replaced manifest: past its CRC file, to the size checks.
    std::fs::remove_file(gen.join("manifest.crc32")).unwrap();
    let err = match catch_unwind(AssertUnwindSafe(|| harness::read_kb(root.path()))) {
        Ok(r) => r.expect_err("a KB claiming 2^62 + 5 passages was opened"),
        Err(_) => panic!("reading a KB with a wrapping passage count panicked"),
    };
    let msg = format!("{err:#}");
    assert!(
        msg.contains("do not match 4611686018427387909 passages"),
        "unclear error: {msg}"
    );
}

/// Found by the `gguf` target (minimised): `llama.block_count` near 2^64 made the loader reserve
/// that many layers up front, and the allocation aborted the process (no panic to catch: without
/// the fix this test binary dies). Now the layer loop stops at the first missing tensor.
#[test]
fn gguf_with_a_huge_block_count_is_an_error() {
    let path = fuzz_dir().join("regressions/gguf/block_count_huge.gguf");
    let err = replay(harness::gguf, &path).expect_err("a corrupt GGUF was loaded");
    eprintln!("{err:#}");
    assert!(
        format!("{err:#}").contains("model.gguf"),
        "error names no file: {err:#}"
    );
}

/// Found by the `weights` target: a pickle `LONG1` opcode of more than 8 bytes panicked in candle's
/// pickle reader ("attempt to shift left with overflow"; with overflow checks, as in debug builds
/// and the fuzzer; a release build wraps silently). Readers of untrusted files now run under
/// `hub::parse_guarded`, which turns a panic in the dependency into an error naming the file.
#[test]
fn pickle_reader_panic_is_an_error_naming_the_file() {
    let path = fuzz_dir().join("regressions/weights/pickle_long1_shift.bin");
    let _ = replay(harness::weights, &path);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pytorch_model.bin");
    let err = rustrag::hub::parse_guarded(&file, || -> anyhow::Result<()> {
        panic!("attempt to shift left with overflow")
    })
    .expect_err("a panicking reader returned");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("pytorch_model.bin") && msg.contains("shift left"),
        "{msg}"
    );
}
