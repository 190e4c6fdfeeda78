//! Parity suite: every case directory under `$RUSTRAG_PARITY_DIR` (default `../shared/parity`) is
//! checked against the HF transformers reference values it holds. Shapes and settings are read from
//! the files, so any set made by `make_parity.py` (other seeds and sizes) must pass.
//!
//! Run: `cargo test --release --test parity`.

mod common;
mod decoder_only;
mod encoders;
mod generators;
mod minilm;
mod rag;

use common::{Checker, Fixture};
use std::path::PathBuf;
use std::process::ExitCode;

/// What a case directory holds, judged by its `expected.json`.
fn case_kind(fx: &Fixture) -> &'static str {
    if fx.has("definition") {
        "decoder-only"
    } else if fx.has("package") {
        "minilm-real"
    } else if fx.has("retrieval") && fx.dir.join("rag").is_dir() {
        "rag"
    } else if fx.has("question_encoder/texts") || fx.has("bert_mean") {
        "encoders"
    } else {
        "unknown"
    }
}

fn main() -> ExitCode {
    let root = std::env::var("RUSTRAG_PARITY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/parity"));
    let mut dirs: Vec<PathBuf> = match std::fs::read_dir(&root) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("expected.json").is_file())
            .collect(),
        Err(e) => {
            eprintln!(
                "parity: cannot read {}: {e} (set RUSTRAG_PARITY_DIR)",
                root.display()
            );
            println!("0 passed, 1 failed");
            return ExitCode::FAILURE;
        }
    };
    dirs.sort();
    if dirs.is_empty() {
        eprintln!(
            "parity: no case directory (with expected.json) under {}",
            root.display()
        );
        println!("0 passed, 1 failed");
        return ExitCode::FAILURE;
    }
    let filter = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let (mut passed, mut failed, mut cases) = (0usize, Vec::new(), 0usize);
    for dir in &dirs {
        let fx = match Fixture::load(dir) {
            Ok(fx) => fx,
            Err(e) => {
                failed.push(format!("{}: {e:#}", dir.display()));
                continue;
            }
        };
        if filter
            .as_ref()
            .is_some_and(|f| !fx.name.contains(f.as_str()))
        {
            continue;
        }
        let kind = case_kind(&fx);
        let mut c = Checker::new(&fx.name);
        let t0 = std::time::Instant::now();
        match kind {
            "decoder-only" => decoder_only::check(&fx, &mut c),
            "minilm-real" => minilm::check(&fx, &mut c),
            "encoders" => encoders::check(&fx, &mut c),
            "rag" => {
                generators::check(&fx, &mut c);
                rag::check(&fx, &mut c);
            }
            _ => c.check("case kind", || anyhow::bail!("unrecognised case directory")),
        }
        cases += 1;
        println!(
            "case {:<14} [{kind}] {} checks passed, {} failed ({:.1}s)",
            fx.name,
            c.passed,
            c.failed.len(),
            t0.elapsed().as_secs_f64()
        );
        passed += c.passed;
        failed.extend(c.failed);
    }
    println!(
        "\nparity: {cases} cases under {}, {} checks",
        root.display(),
        passed + failed.len()
    );
    for f in &failed {
        println!("FAILED {f}");
    }
    println!("{passed} passed, {} failed", failed.len());
    if failed.is_empty() && passed > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
