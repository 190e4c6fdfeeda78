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
            assert_eq!(
                stderr(&o).matches("No space left").count(),
                1,
                "said once: {}",
                stderr(&o)
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

// ---------------------------------------------------------------- 2. one writer per KB

/// 8 concurrent `index add`s (half with `--wait`, half without: those may be refused, with the KB
/// and the holder's pid named, and are then rerun with `--wait`) while readers query in a loop:
/// every added passage is there at the end, every read succeeds, and every generation a reader
/// opens holds each writer's documents all or none.
#[test]
fn concurrent_adds_lose_nothing_and_readers_see_whole_generations() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const WRITERS: usize = 8;
    const DOCS: usize = 3;
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("kb");
    build_kb(&root, &corpus(t.path(), "base.jsonl", "base", 5));
    let corpora: Vec<PathBuf> = (0..WRITERS)
        .map(|w| corpus(t.path(), &format!("w{w}.jsonl"), &format!("w{w}"), DOCS))
        .collect();
    let add = |w: usize, wait: bool| {
        let mut c = rustrag();
        c.args(["index", "add", "--kb"]).arg(&root).arg("--corpus");
        c.arg(&corpora[w]);
        if wait {
            c.arg("--wait");
        }
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        c
    };

    let done = Arc::new(AtomicBool::new(false));
    // In-process reader: each generation it opens is whole (every writer's docs all or none).
    let whole = {
        let (root, done) = (root.clone(), done.clone());
        std::thread::spawn(move || {
            let mut opened = 0;
            while !done.load(Ordering::Relaxed) || opened == 0 {
                let ids = passage_ids(&root);
                for w in 0..WRITERS {
                    let n = ids
                        .iter()
                        .filter(|id| id.starts_with(&format!("w{w}-")))
                        .count();
                    assert!(n == 0 || n == DOCS, "a generation with {n} of w{w}'s docs");
                }
                opened += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            opened
        })
    };
    // CLI reader: every query answered with k hits from the KB.
    let cli = {
        let (root, done) = (root.clone(), done.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            while !done.load(Ordering::Relaxed) || reads == 0 {
                let o = rustrag()
                    .args([
                        "--json",
                        "retrieve",
                        "--k",
                        "3",
                        "--query",
                        "comet tail sun",
                    ])
                    .arg("--kb")
                    .arg(&root)
                    .output()
                    .unwrap();
                assert_ok(&o, "retrieve during concurrent adds");
                let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                let hits = v["results"][0]["hits"].as_array().unwrap();
                assert_eq!(hits.len(), 3);
                assert!(
                    hits[0]["text"].as_str().unwrap().contains("comet"),
                    "sensible top hit: {}",
                    hits[0]
                );
                reads += 1;
            }
            reads
        })
    };

    let children: Vec<_> = (0..WRITERS)
        .map(|w| (w, add(w, w % 2 == 0).spawn().unwrap()))
        .collect();
    let mut refused = 0;
    for (w, child) in children {
        let o = child.wait_with_output().unwrap();
        if !o.status.success() {
            assert!(
                w % 2 == 1,
                "w{w} waited for the lock and still failed: {}",
                stderr(&o)
            );
            assert_fails_with(
                &o,
                &format!("index add w{w} without --wait"),
                &[
                    "is being written by another process (pid ",
                    root.to_str().unwrap(),
                    "--wait",
                ],
            );
            refused += 1;
            let o = add(w, true).output().unwrap();
            assert_ok(&o, &format!("index add w{w} --wait after a refusal"));
        }
    }
    done.store(true, Ordering::Relaxed);
    let opened = whole.join().unwrap();
    let reads = cli.join().unwrap();

    let ids = passage_ids(&root);
    assert_eq!(ids.len(), 5 + WRITERS * DOCS, "{ids:?}");
    for w in 0..WRITERS {
        for d in 0..DOCS {
            assert!(ids.contains(&format!("w{w}-{d}")), "w{w}-{d} lost");
        }
    }
    let live = rustrag::kb::KnowledgeBase::open(&root).unwrap();
    live.verify().unwrap();
    eprintln!("{refused} adds refused and rerun; {opened} generations opened, {reads} CLI reads");
}

/// The commit is a compare-and-swap on the generation a writer started from, lock or no lock: of
/// two writers that started from the same generation, the second to commit fails and writes
/// nothing. A directory where the next generation would go that holds a user's files is refused,
/// and a build never removes a generation directory holding files rustrag did not write.
#[test]
fn commit_is_a_compare_and_swap_and_user_files_survive() {
    use rustrag::kb::atomic::{current_generation_name, GenerationFiles, PendingGeneration};
    use rustrag::kb::lock::WriterLock;
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("idx");
    let lock = WriterLock::acquire(&root, false).unwrap();
    let write =
        |p: &PendingGeneration, what: &str| std::fs::write(p.dir().join("data"), what).unwrap();
    let first = PendingGeneration::begin(&lock, None, GenerationFiles::Any).unwrap();
    write(&first, "one");
    first.commit().unwrap();
    let base = current_generation_name(&root).unwrap();
    assert_eq!(base.as_deref(), Some("gen-00000001"));
    let slow = PendingGeneration::begin(&lock, base.as_deref(), GenerationFiles::Any).unwrap();
    let fast = PendingGeneration::begin(&lock, base.as_deref(), GenerationFiles::Any).unwrap();
    write(&slow, "slow");
    write(&fast, "fast");
    fast.commit().unwrap();
    let e = format!("{:#}", slow.commit().unwrap_err());
    assert!(
        e.contains("changed while this writer ran")
            && e.contains("gen-00000001")
            && e.contains("gen-00000002"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("gen-00000002/data")).unwrap(),
        "fast",
        "the first commit stands"
    );
    drop(lock);

    // A KB: a user's file in a generation directory survives the next build (with a warning), and
    // a user's directory where the next generation would go is refused.
    let kb = t.path().join("kb");
    let a = corpus(t.path(), "a.jsonl", "a", 3);
    build_kb(&kb, &a);
    std::fs::write(kb.join("gen-00000001/my-notes.txt"), "mine").unwrap();
    build_kb(&kb, &a);
    assert_eq!(
        std::fs::read_to_string(kb.join("gen-00000001/my-notes.txt")).unwrap(),
        "mine"
    );
    std::fs::create_dir(kb.join("gen-00000003")).unwrap();
    std::fs::write(kb.join("gen-00000003/plan.txt"), "mine").unwrap();
    let o = rustrag()
        .args(["index", "add", "--kb"])
        .arg(&kb)
        .arg("--corpus")
        .arg(corpus(t.path(), "b.jsonl", "b", 1))
        .output()
        .unwrap();
    assert_fails_with(
        &o,
        "add with a user's gen-00000003",
        &["gen-00000003", "plan.txt"],
    );
    assert!(kb.join("gen-00000003/plan.txt").exists());
    assert_eq!(passage_ids(&kb).len(), 3);

    // Debris of a commit killed between its rename and its CURRENT swap is cleared by the next
    // writer (which holds the lock).
    std::fs::remove_dir_all(kb.join("gen-00000003")).unwrap();
    copy_dir(&kb.join("gen-00000002"), &kb.join("gen-00000003"));
    let o = rustrag()
        .args(["index", "add", "--kb"])
        .arg(&kb)
        .arg("--corpus")
        .arg(corpus(t.path(), "c.jsonl", "c", 1))
        .output()
        .unwrap();
    assert_ok(&o, "add over commit debris");
    assert_eq!(passage_ids(&kb).len(), 4);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        match e.file_type().unwrap().is_dir() {
            true => copy_dir(&e.path(), &to.join(e.file_name())),
            false => {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }
}

// ---------------------------------------------------------------- 3. ingestion

/// Wait for `child` at most `secs` seconds (killing it after), returning its output.
fn output_within(mut child: std::process::Child, secs: u64, what: &str) -> Output {
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed().as_secs() > secs {
            child.kill().unwrap();
            panic!("{what} still running after {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// A corpus directory with a symlink loop (`loop/sub/up -> ..`), a directory linking to itself, a
/// self-referencing symlink, a second link to a file and a FIFO named `pipe.txt`: the walk ends
/// promptly, ingests every file once under its first path, and never opens the FIFO.
#[test]
fn directory_walk_survives_loops_links_and_fifos() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("d");
    std::fs::create_dir_all(d.join("loop/sub")).unwrap();
    std::fs::write(d.join("a.txt"), "Rivers carry silt to the delta.").unwrap();
    std::fs::write(
        d.join("loop/b.md"),
        "# Comets\nA comet's tail points away from the sun.",
    )
    .unwrap();
    std::fs::write(d.join("loop/sub/c.txt"), "Copper conducts electricity.").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::symlink;
        symlink("..", d.join("loop/sub/up")).unwrap();
        symlink(".", d.join("self")).unwrap();
        symlink("selfref.txt", d.join("selfref.txt")).unwrap();
        symlink("a.txt", d.join("alias.txt")).unwrap();
        let st = Command::new("mkfifo")
            .arg(d.join("pipe.txt"))
            .status()
            .unwrap();
        assert!(st.success(), "mkfifo");
    }

    // The library walk, bounded in time: a FIFO opened for reading would block forever.
    let (tx, rx) = std::sync::mpsc::channel();
    let dir = d.clone();
    std::thread::spawn(move || {
        let r = rustrag::kb::ingest::read_corpus(&[dir], &Default::default());
        tx.send(r.map(|i| i.documents.into_iter().map(|d| d.id).collect::<Vec<_>>()))
            .unwrap();
    });
    let ids = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the directory walk did not finish in 30 s")
        .unwrap();
    assert_eq!(ids, ["a.txt", "loop/b.md", "loop/sub/c.txt"]);

    // The CLI: same documents, warnings that name what was skipped.
    let root = t.path().join("kb");
    let child = rustrag()
        .args(["--json", "index", "build", "--corpus"])
        .arg(&d)
        .arg("--encoder")
        .arg(minilm_dir())
        .arg("--out")
        .arg(&root)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let o = output_within(child, 60, "index build over loops and a FIFO");
    assert_ok(&o, "index build over loops and a FIFO");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["documents"].as_u64(), v["passages"].as_u64()),
        (Some(3), Some(3))
    );
    let err = stderr(&o);
    for needle in [
        "pipe.txt: a FIFO",
        "symlink loop",
        "selfref.txt",
        "alias.txt: the same file as",
    ] {
        assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
    }
}

// ---------------------------------------------------------------- 4. parameter bounds

/// Out-of-bounds index and query parameters fail at once (before a model is loaded or a file
/// written) with the parameter and its bounds named.
#[test]
fn out_of_bounds_parameters_fail_fast_naming_the_bound() {
    let t = tempfile::tempdir().unwrap();
    let a = corpus(t.path(), "a.jsonl", "a", 3);
    let out = t.path().join("kb");
    let model = minilm_dir();
    let build = |extra: &[&str]| {
        let t0 = std::time::Instant::now();
        let o = rustrag()
            .args(["index", "build", "--corpus"])
            .arg(&a)
            .arg("--encoder")
            .arg(&model)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        (o, t0.elapsed())
    };
    for (extra, needles) in [
        (
            &["--hnsw", "--m", "1000000000"][..],
            &["--m 1000000000", "2..=256"][..],
        ),
        (
            &["--hnsw", "--ef-construction", "0"],
            &["--ef-construction 0", "1..=10000"],
        ),
        (
            &["--hnsw", "--ef-search", "99999999"],
            &["--ef-search 99999999"],
        ),
        (&["--max-length", "0"], &["--max-length 0"]),
        (&["--batch-size", "0"], &["--batch-size 0", "1..=4096"]),
    ] {
        let (o, took) = build(extra);
        assert_fails_with(&o, &format!("index build {extra:?}"), needles);
        assert!(took.as_secs() < 10, "{extra:?} took {took:?}");
        assert!(!out.exists(), "{extra:?} wrote {}", out.display());
    }
    build_kb(&out, &a);
    for (args, needles) in [
        (&["--k", "0"][..], &["--k 0", "1..=10000"][..]),
        (&["--k", "100000000"], &["--k 100000000"]),
        (&["--ef-search", "0"], &["--ef-search 0"]),
    ] {
        let o = rustrag()
            .args(["retrieve", "--query", "comet", "--kb"])
            .arg(&out)
            .args(args)
            .output()
            .unwrap();
        assert_fails_with(&o, &format!("retrieve {args:?}"), needles);
    }
    let o = rustrag()
        .args(["eval", "retrieval", "--k", "0", "--corpus"])
        .arg(&a)
        .args(["--queries", "q.jsonl", "--qrels", "qrels.tsv"])
        .output()
        .unwrap();
    assert_fails_with(&o, "eval retrieval --k 0", &["--k 0"]);
}

// ---------------------------------------------------------------- 5. careless input

/// `index add` refuses a document already in the KB (naming it) unless `--upsert`, which replaces
/// its passages; a relative `--encoder` is recorded absolute, and a manifest encoder that cannot be
/// found is named with the manifest; an encoder differing only in pooling is refused saying
/// "pooling"; a GGUF as `--encoder` is called a generator file; `--n-docs 0` and an empty question
/// are errors; control characters in a question are escaped in human output.
#[test]
fn careless_input_gets_clear_errors() {
    let t = tempfile::tempdir().unwrap();
    let kb = t.path().join("kb");
    // A relative --encoder path, built from `t`.
    #[cfg(unix)]
    std::os::unix::fs::symlink(minilm_dir(), t.path().join("relenc")).unwrap();
    let a = corpus(t.path(), "a.jsonl", "a", 3);
    let o = rustrag()
        .current_dir(t.path())
        .args([
            "index",
            "build",
            "--words-per-passage",
            "0",
            "--corpus",
            "a.jsonl",
            "--encoder",
            "relenc",
            "--out",
            "kb",
        ])
        .output()
        .unwrap();
    assert_ok(&o, "index build with a relative --encoder");
    let m = rustrag::kb::KnowledgeBase::open(&kb).unwrap();
    let source = m.manifest().encoder.source.clone();
    assert!(Path::new(&source).is_absolute(), "{source}");
    drop(m);
    let elsewhere = tempfile::tempdir().unwrap();
    let o = rustrag()
        .current_dir(elsewhere.path())
        .args(["retrieve", "--query", "comet", "--kb"])
        .arg(&kb)
        .output()
        .unwrap();
    assert_ok(&o, "retrieve from another directory");

    // Same id again: refused, naming the document; with --upsert, replaced.
    let again = t.path().join("again.jsonl");
    std::fs::write(
        &again,
        "{\"_id\":\"a-1\",\"title\":\"A one\",\"text\":\"Glaciers carve valleys into a U shape.\"}\n",
    )
    .unwrap();
    let add = |extra: &[&str]| {
        rustrag()
            .args(["index", "add", "--kb"])
            .arg(&kb)
            .arg("--corpus")
            .arg(&again)
            .args(extra)
            .output()
            .unwrap()
    };
    assert_fails_with(
        &add(&[]),
        "index add of an existing id",
        &[
            "again.jsonl:1",
            "document \"a-1\" is already in the knowledge base",
            "--upsert",
        ],
    );
    assert_ok(&add(&["--upsert"]), "index add --upsert");
    let kb2 = rustrag::kb::KnowledgeBase::open(&kb).unwrap();
    assert_eq!(kb2.len(), 3);
    assert_eq!(kb2.manifest().documents, 3);
    let row = kb2.row_of("a-1").unwrap().unwrap();
    assert!(kb2.passage(row).unwrap().text.contains("Glaciers"));
    drop(kb2);
    let o = rustrag()
        .args([
            "--json",
            "retrieve",
            "--k",
            "1",
            "--query",
            "glacier valley",
            "--kb",
        ])
        .arg(&kb)
        .output()
        .unwrap();
    assert_ok(&o, "retrieve after upsert");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["results"][0]["hits"][0]["id"], "a-1",
        "the new embedding is searched"
    );

    // Same weights, other pooling: refused, saying pooling.
    let cls = t.path().join("minilm-cls");
    std::fs::create_dir_all(cls.join("1_Pooling")).unwrap();
    for e in std::fs::read_dir(minilm_dir()).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "1_Pooling" {
            #[cfg(unix)]
            std::os::unix::fs::symlink(e.path(), cls.join(e.file_name())).unwrap();
        }
    }
    std::fs::write(
        cls.join("1_Pooling/config.json"),
        r#"{"word_embedding_dimension": 384, "pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}"#,
    )
    .unwrap();
    let o = rustrag()
        .args(["index", "add", "--kb"])
        .arg(&kb)
        .arg("--corpus")
        .arg(corpus(t.path(), "b.jsonl", "b", 1))
        .arg("--encoder")
        .arg(&cls)
        .output()
        .unwrap();
    assert_fails_with(
        &o,
        "index add with another pooling",
        &["they differ in pooling: cls vs mean"],
    );

    // A GGUF where an encoder belongs.
    let gguf = t.path().join("gen.gguf");
    std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00").unwrap();
    let o = rustrag()
        .args(["index", "build", "--corpus"])
        .arg(&a)
        .arg("--encoder")
        .arg(&gguf)
        .arg("--out")
        .arg(t.path().join("kb-gguf"))
        .output()
        .unwrap();
    assert_fails_with(
        &o,
        "GGUF as --encoder",
        &["is a GGUF generator file, not an encoder"],
    );

    // A manifest naming an encoder that is nowhere: the error names the manifest.
    let gen = rustrag::kb::KnowledgeBase::open(&kb)
        .unwrap()
        .dir()
        .to_path_buf();
    let mpath = gen.join("manifest.json");
    let text = std::fs::read_to_string(&mpath).unwrap();
    std::fs::write(&mpath, text.replace(&source, "moved-away/minilm")).unwrap();
    // Edited by hand: its CRC file goes too (or the edit itself is refused as corruption).
    std::fs::remove_file(gen.join("manifest.crc32")).unwrap();
    let o = rustrag()
        .args(["retrieve", "--query", "comet", "--kb"])
        .arg(&kb)
        .output()
        .unwrap();
    assert_fails_with(
        &o,
        "retrieve with a moved encoder",
        &[
            "\"moved-away/minilm\" recorded in",
            "manifest.json",
            "--encoder",
        ],
    );
    std::fs::write(&mpath, text).unwrap();

    // Empty question, --n-docs 0, control characters.
    let o = rustrag()
        .args(["retrieve", "--query", " ", "--kb"])
        .arg(&kb)
        .output()
        .unwrap();
    assert_fails_with(&o, "retrieve of an empty question", &["is empty"]);
    let o = rustrag()
        .args(["ask", "--n-docs", "0", "--generator"])
        .arg(&gguf)
        .arg("--kb")
        .arg(&kb)
        .arg("why?")
        .output()
        .unwrap();
    assert_fails_with(&o, "ask --n-docs 0", &["--n-docs 0"]);
    let o = rustrag()
        .args(["retrieve", "--query", "\x1b[2J\x1b[31mcomet\r", "--kb"])
        .arg(&kb)
        .output()
        .unwrap();
    assert_ok(&o, "retrieve with escapes");
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(!out.contains('\x1b') && !out.contains('\r'), "{out:?}");
    assert!(
        out.contains("query: \\u{1b}[2J\\u{1b}[31mcomet\\r"),
        "{out}"
    );
}

// ---------------------------------------------------------------- 6. integrity on read

/// 100 trials, each flipping one byte at a random offset of a random data file of a KB: every
/// trial is detected when the KB is opened (the error names the file), `retrieve` serves nothing
/// (exit 1, empty stdout), and `index add` refuses to copy the corrupt generation forward.
#[test]
fn flipped_bytes_are_detected_never_served_never_laundered() {
    use std::io::{Seek, SeekFrom, Write};
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("kb");
    build_kb(&root, &corpus(t.path(), "a.jsonl", "a", 40));
    let kb = rustrag::kb::KnowledgeBase::open(&root).unwrap();
    let gen = kb.dir().to_path_buf();
    let files: Vec<String> = kb.manifest().files.keys().cloned().collect();
    let before = kb.manifest().files.clone();
    drop(kb);
    assert!(files.len() >= 4, "{files:?}");
    let more = corpus(t.path(), "more.jsonl", "more", 1);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut rng = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut per_file = std::collections::BTreeMap::<&str, usize>::new();
    for trial in 0..100 {
        let name = &files[rng() as usize % files.len()];
        let path = gen.join(name);
        let len = std::fs::metadata(&path).unwrap().len();
        let at = rng() % len;
        let flip = 1 + (rng() % 255) as u8;
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut byte = [0u8];
        f.seek(SeekFrom::Start(at)).unwrap();
        std::io::Read::read_exact(&mut f, &mut byte).unwrap();
        let orig = byte[0];
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&[orig ^ flip]).unwrap();
        f.sync_all().unwrap();

        let e = match rustrag::kb::KnowledgeBase::open(&root) {
            Ok(_) => panic!("trial {trial}: byte {at} of {name} flipped, and the KB opened"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            e.contains(name.as_str()) && e.contains("CRC32"),
            "trial {trial}: {e}"
        );
        *per_file.entry(name.as_str()).or_default() += 1;
        if trial % 10 == 0 {
            let o = rustrag()
                .args(["--json", "retrieve", "--query", "comet tail", "--kb"])
                .arg(&root)
                .output()
                .unwrap();
            assert_fails_with(&o, &format!("trial {trial}: retrieve"), &["CRC32"]);
            assert!(o.stdout.is_empty(), "trial {trial}: something was served");
        }
        if trial % 25 == 0 {
            let o = rustrag()
                .args(["index", "add", "--kb"])
                .arg(&root)
                .arg("--corpus")
                .arg(&more)
                .output()
                .unwrap();
            assert_fails_with(&o, &format!("trial {trial}: index add"), &["CRC32"]);
        }

        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&[orig]).unwrap();
        f.sync_all().unwrap();
    }
    eprintln!("trials per file: {per_file:?}");
    // The manifest itself: a flipped byte that still parses (a digit of τ) is caught by its CRC32
    // file, as is any other; a generation without the CRC file (older KBs) still opens.
    let manifest = gen.join("manifest.json");
    let original = std::fs::read(&manifest).unwrap();
    let text = String::from_utf8(original.clone()).unwrap();
    let tau_at = text
        .find("\"prior_temperature\": 0.05")
        .expect("τ 0.05 in the manifest")
        + 23;
    for trial in 0..50 {
        let mut bytes = original.clone();
        let at = if trial == 0 {
            tau_at
        } else {
            rng() as usize % bytes.len()
        };
        bytes[at] ^= if trial == 0 {
            0x03
        } else {
            1 + (rng() % 255) as u8
        }; // 0.05 -> 0.06
        std::fs::write(&manifest, &bytes).unwrap();
        let e = match rustrag::kb::KnowledgeBase::open(&root) {
            Ok(_) => panic!("manifest trial {trial}: byte {at} flipped, and the KB opened"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            e.contains("manifest.json") && e.contains("CRC32") && e.contains("manifest.crc32"),
            "manifest trial {trial}: {e}"
        );
    }
    std::fs::write(&manifest, &original).unwrap();
    let crc = gen.join("manifest.crc32");
    let recorded = std::fs::read(&crc).unwrap();
    std::fs::remove_file(&crc).unwrap();
    rustrag::kb::KnowledgeBase::open(&root).expect("a generation without manifest.crc32 opens");
    std::fs::write(&crc, &recorded).unwrap();
    let kb = rustrag::kb::KnowledgeBase::open(&root).unwrap();
    kb.verify().unwrap();
    assert_eq!(
        kb.manifest().files,
        before,
        "no corrupt generation was committed"
    );
}

fn test_fingerprint(dim: usize) -> rustrag::encoders::EncoderFingerprint {
    rustrag::encoders::EncoderFingerprint {
        source: "synthetic".into(),
        kind: "sentence-transformers".into(),
        dim,
        pooling: "mean".into(),
        normalized: true,
        weights_sha256: "00".into(),
        int8: false,
        prefixes: Default::default(),
    }
}

/// An embedding with a NaN is refused when the KB is written, naming the passage and its row.
#[test]
fn non_finite_embeddings_are_refused_naming_the_row() {
    let t = tempfile::tempdir().unwrap();
    let (n, dim) = (6, 4);
    let passages: Vec<rustrag::kb::Passage> = (0..n)
        .map(|i| rustrag::kb::Passage {
            id: format!("p{i}"),
            title: String::new(),
            text: format!("text {i}"),
        })
        .collect();
    let mut v = vec![0.5f32; n * dim];
    v[3 * dim + 1] = f32::NAN;
    let root = t.path().join("kb");
    let r = rustrag::kb::write_kb(
        &root,
        &passages,
        &v,
        &test_fingerprint(dim),
        &Default::default(),
    );
    let e = format!("{:#}", r.expect_err("a NaN embedding was written"));
    assert!(e.contains("\"p3\" (row 3)") && e.contains("NaN"), "{e}");
    assert!(
        rustrag::kb::KnowledgeBase::open(&root).is_err(),
        "nothing committed"
    );
}

/// The cost of checking block checksums on open and in a re-check, and of a passage read, on a
/// synthetic 1M-passage, 384-dim f32 KB (1.5 GB of embeddings). Writes ~1.7 GB under $TMPDIR; run by hand:
/// `cargo test --release --test safety -- --ignored --nocapture checksum_cost`.
#[test]
#[ignore]
fn checksum_cost_on_a_1m_passage_kb() {
    let t = tempfile::tempdir().unwrap();
    let (n, dim) = (1_000_000usize, 384usize);
    let passages: Vec<rustrag::kb::Passage> = (0..n)
        .map(|i| rustrag::kb::Passage {
            id: format!("doc{i}"),
            title: format!("Title {}", i % 1000),
            text: format!(
                "passage {i} of a synthetic corpus with a few words in it to look like text"
            ),
        })
        .collect();
    let mut state = 1u32;
    let v: Vec<f32> = (0..n * dim)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect();
    let root = t.path().join("kb");
    let t0 = std::time::Instant::now();
    rustrag::kb::write_kb(
        &root,
        &passages,
        &v,
        &test_fingerprint(dim),
        &Default::default(),
    )
    .unwrap();
    let write = t0.elapsed();
    drop((passages, v));
    let bytes: u64 = {
        let kb = rustrag::kb::KnowledgeBase::open(&root).unwrap();
        kb.manifest().files.values().map(|f| f.bytes).sum()
    };
    for round in 0..3 {
        let t0 = std::time::Instant::now();
        let kb = rustrag::kb::KnowledgeBase::open(&root).unwrap();
        let open = t0.elapsed();
        let t1 = std::time::Instant::now();
        kb.scrub().unwrap();
        let scrub = t1.elapsed();
        // At random rows of a 100 MB store: the blocks are rarely in a CPU cache.
        let read = ns_per_passage_read(&kb, 20_000, 5);
        let t3 = std::time::Instant::now();
        kb.verify().unwrap();
        eprintln!(
            "round {round}: {bytes} bytes, open with block checks {:.3} s, re-check (scrub, one core) {:.3} s, passage read {read:.0} ns, sha256 verify {:.3} s (write {:.1} s)",
            open.as_secs_f64(),
            scrub.as_secs_f64(),
            t3.elapsed().as_secs_f64(),
            write.as_secs_f64()
        );
    }
    strip_store_checksums(&root);
    let kb = rustrag::kb::KnowledgeBase::open(&root).unwrap();
    eprintln!(
        "passage read, unchecked (no store checksums recorded): {:.0} ns",
        ns_per_passage_read(&kb, 20_000, 5)
    );
}

/// Every writer (`build`, `add`, `reembed`) takes the lock: while this process holds it, each is
/// refused naming the KB and this pid, and readers still answer; `--wait` waits for the release.
#[test]
fn every_writer_takes_the_lock_and_readers_never_do() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("kb");
    let a = corpus(t.path(), "a.jsonl", "a", 3);
    build_kb(&root, &a);
    let b = corpus(t.path(), "b.jsonl", "b", 2);
    let model = minilm_dir();
    let lock = rustrag::kb::lock::WriterLock::acquire(&root, false).unwrap();
    let pid = format!("pid {}", std::process::id());
    let writers: Vec<Vec<&std::ffi::OsStr>> = vec![
        vec![
            "index".as_ref(),
            "build".as_ref(),
            "--corpus".as_ref(),
            a.as_os_str(),
            "--encoder".as_ref(),
            model.as_os_str(),
            "--out".as_ref(),
            root.as_os_str(),
        ],
        vec![
            "index".as_ref(),
            "add".as_ref(),
            "--kb".as_ref(),
            root.as_os_str(),
            "--corpus".as_ref(),
            b.as_os_str(),
        ],
        vec![
            "index".as_ref(),
            "reembed".as_ref(),
            "--kb".as_ref(),
            root.as_os_str(),
            "--encoder".as_ref(),
            model.as_os_str(),
        ],
    ];
    for args in &writers {
        let o = rustrag().args(args).output().unwrap();
        assert_fails_with(
            &o,
            &format!("{args:?} while locked"),
            &["is being written by another process", &pid, "--wait"],
        );
    }
    for args in [
        vec![
            "retrieve",
            "--query",
            "comet",
            "--kb",
            root.to_str().unwrap(),
        ],
        vec!["index", "info", "--verify", "--kb", root.to_str().unwrap()],
    ] {
        assert_ok(
            &rustrag().args(&args).output().unwrap(),
            &format!("{args:?} while locked"),
        );
    }
    let mut waiting = rustrag()
        .args(&writers[1])
        .arg("--wait")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(waiting.try_wait().unwrap().is_none(), "--wait did not wait");
    assert_eq!(passage_ids(&root).len(), 3);
    drop(lock);
    let o = output_within(waiting, 60, "index add --wait");
    assert_ok(&o, "index add --wait after the release");
    assert!(
        stderr(&o).contains("waiting for the writer"),
        "{}",
        stderr(&o)
    );
    assert_eq!(passage_ids(&root).len(), 5);
}

/// A KB over the on-open limit is checked in a background thread: a flipped byte is reported by
/// `verify_blocks` (which writers call before copying) and, once found, every passage read and
/// dense search fails with it; a clean KB passes. An opened HNSW KB keeps its graph (mapped on
/// open) even when its generation directory is removed before the retriever is built.
#[test]
fn background_check_of_large_kbs_and_hnsw_graph_held_from_open() {
    use rustrag::kb::KnowledgeBase;
    use rustrag::retrieve::dense::DenseRetriever;
    use std::sync::Arc;
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("kb");
    let o = rustrag()
        .args([
            "index",
            "build",
            "--words-per-passage",
            "0",
            "--hnsw",
            "--corpus",
        ])
        .arg(corpus(t.path(), "a.jsonl", "a", 40))
        .arg("--encoder")
        .arg(minilm_dir())
        .arg("--out")
        .arg(&root)
        .output()
        .unwrap();
    assert_ok(&o, "index build --hnsw");

    // Clean: the background verdict is Ok and reads work.
    let kb = KnowledgeBase::open_with(&root, 0).unwrap();
    kb.verify_blocks().unwrap();
    kb.integrity().unwrap();
    kb.passage(0).unwrap();
    let gen = kb.dir().to_path_buf();
    drop(kb);

    // One flipped byte of the embeddings: opens (checked in the background), then refused.
    let emb = std::fs::read_dir(&gen)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("embeddings")
        })
        .expect("embeddings file");
    let mut bytes = std::fs::read(&emb).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&emb, &bytes).unwrap();
    let kb = Arc::new(KnowledgeBase::open_with(&root, 0).expect("large KBs open at once"));
    let name = emb.file_name().unwrap().to_string_lossy().to_string();
    let e = format!("{:#}", kb.verify_blocks().unwrap_err());
    assert!(e.contains(&name) && e.contains("CRC32"), "{e}");
    let e = format!("{:#}", kb.passage(0).unwrap_err());
    assert!(e.contains("CRC32"), "{e}");
    let dense = DenseRetriever::new(kb.clone(), None, None).unwrap();
    let q = vec![0.05f32; kb.dim()];
    let e = format!("{:#}", dense.search(&q, 3).unwrap_err());
    assert!(e.contains("CRC32"), "{e}");
    drop((dense, kb));
    bytes[mid] ^= 0x40;
    std::fs::write(&emb, &bytes).unwrap();

    // The HNSW graph is held from open: removing the generation afterwards does not break it.
    let kb = Arc::new(KnowledgeBase::open(&root).unwrap());
    let q = kb.embeddings().row(3);
    std::fs::remove_dir_all(&gen).unwrap();
    let hnsw = DenseRetriever::new(kb.clone(), None, Some(16)).expect("graph held from open");
    let hits = hnsw.search(&q, 1).unwrap();
    assert_eq!(
        hits[0][0].0, 3,
        "the row's own vector is its nearest neighbour"
    );
}

/// Overwrite bytes of `path` at `at` in place: the same file (inode), so a reader that mapped it
/// sees the new bytes, as with bit rot or an edit in place. Returns the bytes replaced.
fn overwrite_in_place(path: &Path, at: u64, bytes: &[u8]) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut old = vec![0u8; bytes.len()];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut old).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
    old
}

/// A KB of `n` synthetic passages (each ~300 bytes, so `passages.bin` spans several checksum
/// blocks) and random 8-dim embeddings, written by `write_kb` under `root`.
fn synthetic_kb(root: &Path, n: usize) -> Vec<rustrag::kb::Passage> {
    let dim = 8;
    let passages: Vec<rustrag::kb::Passage> = (0..n)
        .map(|i| rustrag::kb::Passage {
            id: format!("p{i}"),
            title: format!("Title {i}"),
            text: format!(
                "Passage {i} about glaciers. {}",
                "The ice moves slowly downhill. ".repeat(9)
            ),
        })
        .collect();
    let mut state = 7u32;
    let v: Vec<f32> = (0..n * dim)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect();
    rustrag::kb::write_kb(
        root,
        &passages,
        &v,
        &test_fingerprint(dim),
        &Default::default(),
    )
    .unwrap();
    passages
}

/// A passage read checks the CRC32 of the blocks its record and offsets lie in: bytes of
/// `passages.bin` (or `passages.idx`) corrupted in place after the KB was opened make that
/// passage an error naming the file, the block and its byte range, never the corrupt text; the
/// passages of other blocks still read, and a re-check (`scrub`) then fails the whole KB.
#[test]
fn passage_reads_check_their_blocks_after_open() {
    use rustrag::kb::manifest::{INDEX_CHECKSUM_BLOCK_BYTES, RECORDS_CHECKSUM_BLOCK_BYTES};
    use rustrag::kb::KnowledgeBase;
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("kb");
    let passages = synthetic_kb(&root, 1000);
    let kb = KnowledgeBase::open(&root).unwrap();
    let records = kb.dir().join("passages.bin");
    let blocks = kb.manifest().files["passages.bin"].blocks.clone().unwrap();
    assert_eq!(blocks.block_bytes, RECORDS_CHECKSUM_BLOCK_BYTES);
    assert!(blocks.crc32.len() >= 4, "{} blocks", blocks.crc32.len());
    let bs = RECORDS_CHECKSUM_BLOCK_BYTES as usize;

    // A record from row 500 on that lies in one block (block 2 or later), found by its offsets.
    let idx = std::fs::read(kb.dir().join("passages.idx")).unwrap();
    let offset = |row: usize| u64::from_le_bytes(idx[row * 8..row * 8 + 8].try_into().unwrap());
    let in_one_block = |r: usize| offset(r) as usize / bs == (offset(r + 1) as usize - 1) / bs;
    let row = (500..1000).find(|&r| in_one_block(r)).unwrap();
    let (start, end) = (offset(row), offset(row + 1));
    let block = start as usize / bs;
    assert!(block >= 2);
    let text_at = start + (end - start) / 2;
    let original = overwrite_in_place(&records, text_at, b"XYZZY");

    let e = format!("{:#}", kb.passage(row).unwrap_err());
    let range = format!(
        "block {block} (bytes {}..{})",
        block * bs,
        ((block + 1) * bs).min(std::fs::metadata(&records).unwrap().len() as usize)
    );
    assert!(
        e.contains(&records.display().to_string()) && e.contains(&range) && e.contains("CRC32"),
        "{e}"
    );
    assert!(!e.contains("XYZZY") && !e.contains("glaciers"), "{e}");
    for err in [
        kb.passages().id(row).map(|_| ()),
        kb.row_of(&passages[row].id).map(|_| ()),
        kb.passages().all().map(|_| ()),
    ] {
        let e = format!("{:#}", err.unwrap_err());
        assert!(e.contains("passages.bin") && e.contains(&range), "{e}");
    }
    // Other blocks still read; the KB as a whole is not failed by a read.
    for other in [0, 1, 999] {
        assert_ne!(offset(other) as usize / bs, block);
        assert_eq!(kb.passage(other).unwrap(), passages[other]);
        assert_eq!(kb.row_of(&passages[other].id).unwrap(), Some(other));
    }
    kb.integrity().unwrap();

    // The re-check finds it and fails every read of the KB until it is reopened.
    let e = format!("{:#}", kb.scrub().unwrap_err());
    assert!(e.contains("passages.bin") && e.contains(&range), "{e}");
    let e = format!("{:#}", kb.passage(0).unwrap_err());
    assert!(e.contains("passages.bin") && e.contains(&range), "{e}");
    let status = kb.integrity_status();
    assert_eq!(status.checks, 2, "{status:?}");
    assert!(status.error.unwrap().contains(&range));
    drop(kb);

    // Restored: reads again. An offset corrupted in place names passages.idx.
    overwrite_in_place(&records, text_at, &original);
    let kb = KnowledgeBase::open(&root).unwrap();
    assert_eq!(kb.passage(row).unwrap(), passages[row]);
    let offsets = kb.dir().join("passages.idx");
    overwrite_in_place(&offsets, (row * 8) as u64, &(start + 3).to_le_bytes());
    let (ibs, at) = (INDEX_CHECKSUM_BLOCK_BYTES as usize, row * 8);
    let range = format!(
        "block {} (bytes {}..{})",
        at / ibs,
        at / ibs * ibs,
        (at / ibs + 1) * ibs
    );
    let e = format!("{:#}", kb.passage(row).unwrap_err());
    assert!(e.contains("passages.idx") && e.contains(&range), "{e}");
    assert!(!e.contains("glaciers"), "{e}");
}

/// Embeddings corrupted in place after open are served until a re-check: `scrub` (called
/// directly, or every interval by `scrub_every`) finds the block, and from then every dense
/// search and passage read fails with the error naming the file and block.
#[test]
fn scrub_fails_a_kb_whose_embeddings_were_corrupted_in_place() {
    use rustrag::kb::KnowledgeBase;
    use rustrag::retrieve::dense::DenseRetriever;
    use std::sync::Arc;
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("kb");
    synthetic_kb(&root, 1000);
    let kb = Arc::new(KnowledgeBase::open(&root).unwrap());
    let emb = kb.dir().join("embeddings.f32");
    let len = std::fs::metadata(&emb).unwrap().len();
    assert_eq!(len, 1000 * 8 * 4);
    let dense = DenseRetriever::new(kb.clone(), None, None).unwrap();
    let q = kb.embeddings().row(3);
    assert_eq!(dense.search(&q, 1).unwrap()[0][0].0, 3);
    let status = kb.integrity_status();
    assert_eq!((status.checks, status.error.as_deref()), (1, None));
    assert!(status.last_check_unix.is_some());

    let at = len / 2;
    let original = overwrite_in_place(&emb, at, &1.0f32.to_le_bytes());
    // The gap a re-check closes: the mapped file serves the new bytes, unnoticed.
    dense.search(&q, 1).unwrap();
    kb.passage(0).unwrap();
    let range = format!("block 0 (bytes 0..{len})");
    let e = format!("{:#}", kb.scrub().unwrap_err());
    assert!(
        e.contains(&emb.display().to_string()) && e.contains(&range) && e.contains("CRC32"),
        "{e}"
    );
    for err in [
        dense.search(&q, 1).map(|_| ()),
        kb.passage(0).map(|_| ()),
        kb.integrity(),
    ] {
        let e = format!("{:#}", err.unwrap_err());
        assert!(e.contains("embeddings.f32") && e.contains(&range), "{e}");
    }
    assert_eq!(kb.integrity_status().checks, 2);
    drop((dense, kb));

    // Periodically: a KB re-checked every 50 ms fails on its own once corrupted.
    overwrite_in_place(&emb, at, &original);
    let kb = KnowledgeBase::open(&root).unwrap();
    kb.scrub_every(std::time::Duration::from_millis(50));
    assert_eq!(kb.integrity_status().scrub_interval_s, 0.05);
    let t0 = std::time::Instant::now();
    while kb.integrity_status().checks < 3 {
        assert!(t0.elapsed().as_secs() < 20, "not re-checked");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    kb.integrity().unwrap();
    overwrite_in_place(&emb, at, &1.0f32.to_le_bytes());
    let t0 = std::time::Instant::now();
    while kb.integrity().is_ok() {
        assert!(
            t0.elapsed().as_secs() < 20,
            "not caught by the periodic re-check"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let e = format!("{:#}", kb.passage(0).unwrap_err());
    assert!(e.contains("embeddings.f32") && e.contains(&range), "{e}");
}

/// Nanoseconds per [`rustrag::kb::KnowledgeBase::passage`] at random rows: the median of
/// `rounds` rounds of `reads` reads each.
fn ns_per_passage_read(kb: &rustrag::kb::KnowledgeBase, reads: usize, rounds: usize) -> f64 {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut per_read: Vec<f64> = (0..rounds)
        .map(|_| {
            let t = std::time::Instant::now();
            for _ in 0..reads {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                std::hint::black_box(kb.passage(state as usize % kb.len()).unwrap());
            }
            t.elapsed().as_secs_f64() * 1e9 / reads as f64
        })
        .collect();
    per_read.sort_by(f64::total_cmp);
    per_read[rounds / 2]
}

/// Drop the passage store's block checksums from the manifest of the live generation of `root`,
/// as in a KB written before they existed: its passage reads are then unchecked (the baseline of
/// their cost).
fn strip_store_checksums(root: &Path) {
    let gen = rustrag::kb::KnowledgeBase::open(root)
        .unwrap()
        .dir()
        .to_path_buf();
    let mut m = rustrag::kb::Manifest::load(&gen).unwrap();
    for name in ["passages.bin", "passages.idx", "ids.idx"] {
        m.files.get_mut(name).unwrap().blocks = None;
    }
    m.write(&gen).unwrap();
}

/// The cost of one passage read (`KnowledgeBase::passage`: row lookup, parsing, and the CRC32 of
/// the checksum blocks the passage lies in) at random rows of the KB at `$RUSTRAG_COST_KB`, page
/// cache warm; then the same reads unchecked, on a copy whose manifest records no store
/// checksums. Run by hand, e.g. on the SQuAD-dev KB of docs/safety.md:
/// `RUSTRAG_COST_KB=/tmp/scrub-kb cargo test --release --test safety -- --ignored --nocapture
/// passage_read_cost`.
#[test]
#[ignore]
fn passage_read_cost() {
    let root = std::env::var("RUSTRAG_COST_KB")
        .map(PathBuf::from)
        .expect("set RUSTRAG_COST_KB to a knowledge base (e.g. one built from SQuAD-dev)");
    let kb = rustrag::kb::KnowledgeBase::open(&root).unwrap();
    assert!(!kb.is_empty(), "{}: no passages", root.display());
    let blocks = |name: &str| {
        let b = kb.manifest().files[name].blocks.as_ref();
        b.map_or("none".to_string(), |b| format!("{} B", b.block_bytes))
    };
    let checked = ns_per_passage_read(&kb, 20_000, 21);
    eprintln!(
        "{}: {} passages, blocks of passages.bin {} and passages.idx {}: {checked:.0} ns per read",
        root.display(),
        kb.len(),
        blocks("passages.bin"),
        blocks("passages.idx")
    );
    let t = tempfile::tempdir().unwrap();
    let copy = t.path().join("kb");
    copy_dir(&root, &copy);
    strip_store_checksums(&copy);
    let unchecked = ns_per_passage_read(
        &rustrag::kb::KnowledgeBase::open(&copy).unwrap(),
        20_000,
        21,
    );
    eprintln!("the same, unchecked (no store checksums recorded): {unchecked:.0} ns per read");
}
