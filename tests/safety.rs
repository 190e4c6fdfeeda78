//! Safety of the `rustrag` binary as scripts and careless users drive it (issue 15): output into a
//! closed pipe or a full disk, concurrent writers and readers on one knowledge base, corpus
//! directories with symlink loops and special files, and out-of-bounds parameters.
//!
//! Every test runs the real release binary on real MiniLM knowledge bases. Needs
//! `$RUSTRAG_MODELS/all-MiniLM-L6-v2` (default `<crate>/models`); fails with a clear message when
//! it is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn minilm_dir() -> PathBuf {
    let models = std::env::var("RUSTRAG_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"));
    let dir = models.join("all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "real MiniLM missing at {} — run scripts/fetch-models.sh or set RUSTRAG_MODELS",
        dir.display()
    );
    dir
}

fn rustrag() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rustrag"));
    c.env("RUST_LOG", "warn");
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn assert_ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: exit {:?}\n{}",
        o.status.code(),
        stderr(o)
    );
}

#[track_caller]
fn assert_fails_with(o: &Output, what: &str, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{what}: exit status\n{err}");
    assert!(!err.contains("panicked"), "{what} panicked:\n{err}");
    for n in needles {
        assert!(err.contains(n), "{what}: stderr lacks {n:?}:\n{err}");
    }
}

/// A BEIR corpus of `n` short documents with ids `<prefix>-<i>`.
fn corpus(dir: &Path, name: &str, prefix: &str, n: usize) -> PathBuf {
    const TOPICS: [&str; 5] = [
        "The river delta floods every spring and the farmers plant rice in the silt",
        "A comet's tail points away from the sun because of the solar wind",
        "The violin concerto was first performed in Leipzig in 1845",
        "Copper conducts electricity well and is used in household wiring",
        "Penguins breed in large colonies on the Antarctic ice",
    ];
    let mut s = String::new();
    for i in 0..n {
        let line = serde_json::json!({
            "_id": format!("{prefix}-{i}"),
            "title": format!("{prefix} {i}"),
            "text": format!("{} ({prefix} note {i}).", TOPICS[i % TOPICS.len()]),
        });
        s.push_str(&line.to_string());
        s.push('\n');
    }
    let p = dir.join(name);
    std::fs::write(&p, s).unwrap();
    p
}

/// Build a MiniLM KB at `root` from `corpus` through the CLI.
fn build_kb(root: &Path, corpus: &Path) {
    let o = rustrag()
        .args(["index", "build", "--words-per-passage", "0", "--corpus"])
        .arg(corpus)
        .arg("--encoder")
        .arg(minilm_dir())
        .arg("--out")
        .arg(root)
        .output()
        .unwrap();
    assert_ok(&o, "index build");
}

/// Passage ids of the live generation, in row order.
fn passage_ids(root: &Path) -> Vec<String> {
    let kb = rustrag::kb::KnowledgeBase::open(root).unwrap();
    (0..kb.len())
        .map(|r| kb.passages().id(r).unwrap().to_string())
        .collect()
}

/// A pipe whose reading end is already closed: every write to it fails with EPIPE.
fn closed_pipe() -> std::io::PipeWriter {
    let (r, w) = std::io::pipe().unwrap();
    drop(r);
    w
}

// ---------------------------------------------------------------- 1. output errors

/// `rustrag … | true` exits 0 without a word in every subcommand that prints, and a build or add
/// that committed and then lost its reader reports success; `> /dev/full` is a clean error
/// (exit 1, no panic) that says the knowledge base was written.
#[test]
fn closed_stdout_is_quiet_success_and_full_disk_a_clean_error() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("kb");
    build_kb(&root, &corpus(t.path(), "a.jsonl", "a", 6));
    let kb = root.to_str().unwrap();
    let model = minilm_dir();
    let model = model.to_str().unwrap();
    let readers: Vec<Vec<&str>> = vec![
        vec!["index", "info", "--kb", kb],
        vec!["--json", "index", "info", "--verify", "--kb", kb],
        vec![
            "retrieve",
            "--kb",
            kb,
            "--query",
            "comet tail",
            "--query",
            "rice",
        ],
        vec!["--json", "retrieve", "--kb", kb, "--query", "violin"],
        vec!["embed", "--model", model, "one text", "another"],
        vec!["--json", "embed", "--model", model, "one text"],
    ];
    for args in &readers {
        let o = rustrag().args(args).stdout(closed_pipe()).output().unwrap();
        assert_ok(&o, &format!("{args:?} into a closed pipe"));
        assert!(
            stderr(&o).is_empty(),
            "{args:?}: a closed pipe is not worth a message:\n{}",
            stderr(&o)
        );
    }

    // A write that committed, then found its reader gone: success, and the data is there.
    let b = corpus(t.path(), "b.jsonl", "b", 3);
    let o = rustrag()
        .args(["index", "add", "--kb", kb, "--corpus"])
        .arg(&b)
        .stdout(closed_pipe())
        .output()
        .unwrap();
    assert_ok(&o, "index add into a closed pipe");
    assert_eq!(passage_ids(&root).len(), 9);

    if Path::new("/dev/full").exists() {
        for args in &readers[..4] {
            let o = rustrag()
                .args(args)
                .stdout(std::fs::File::create("/dev/full").unwrap())
                .output()
                .unwrap();
            assert_fails_with(
                &o,
                &format!("{args:?} > /dev/full"),
                &["writing to standard output", "No space left on device"],
            );
        }
        let c = corpus(t.path(), "c.jsonl", "c", 2);
        let o = rustrag()
            .args(["index", "add", "--kb", kb, "--corpus"])
            .arg(&c)
            .stdout(std::fs::File::create("/dev/full").unwrap())
            .output()
            .unwrap();
        assert_fails_with(
            &o,
            "index add > /dev/full",
            &["was written", "No space left on device"],
        );
        assert_eq!(passage_ids(&root).len(), 11, "the add committed");
    }
}
