//! Parity suite: every case of the fixture set under `$RUSTRAG_PARITY_DIR` (default `../shared/parity`)
//! is checked against the HF transformers reference values it holds. Shapes and settings are read from
//! the files, so any set made by `make_parity.py` (other seeds and sizes) must pass.
//!
//! The case list is `manifest.json`'s (its RAG cases: the keys of `generate_errors`) plus the
//! non-RAG cases of the fixture README's layout; a listed case that is missing, a case directory
//! not listed, a case without `expected.json`, a missing section or an unread field all fail.
//! After the cases, the self-tests mutate a copy of a RAG case and require the checks to fail.
//!
//! Run: `cargo test --release --test parity [-- FILTER]` (`FILTER` matches case names; `selftest`
//! runs only the self-tests). `RUSTRAG_PARITY_VERBOSE=1` prints every float comparison's error.

mod common;
mod decoder_only;
mod encoders;
mod generators;
mod minilm;
mod rag;
mod selftest;

use anyhow::{bail, Context, Result};
use common::{Checker, Fixture};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Cases of the fixture README's layout that are not RAG cases (those come from manifest.json).
const NON_RAG_CASES: &[(&str, &str)] = &[
    ("encoders", "encoders"),
    ("decoder-only", "decoder-only"),
    ("minilm-real", "minilm-real"),
];

/// `(case name, kind)` in manifest order, after checking the directory listing against it.
pub fn case_list(root: &Path, manifest: &Value) -> Result<Vec<(String, &'static str)>> {
    let rag = manifest
        .get("generate_errors")
        .and_then(|v| v.as_object())
        .context("manifest.json has no `generate_errors` object (its keys are the RAG cases)")?;
    if rag.is_empty() {
        bail!("manifest.json lists no RAG case");
    }
    let mut cases: Vec<(String, &'static str)> = rag.keys().map(|k| (k.clone(), "rag")).collect();
    cases.extend(NON_RAG_CASES.iter().map(|(n, k)| (n.to_string(), *k)));
    let mut unlisted = Vec::new();
    for e in std::fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
        let p = e?.path();
        if p.is_dir() {
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if !cases.iter().any(|(n, _)| *n == name) {
                unlisted.push(name);
            }
        }
    }
    if !unlisted.is_empty() {
        bail!("case directories not listed in manifest.json / the README layout: {unlisted:?}");
    }
    let missing: Vec<&String> = cases
        .iter()
        .map(|(n, _)| n)
        .filter(|n| !root.join(n).join("expected.json").is_file())
        .collect();
    if !missing.is_empty() {
        bail!("listed cases without a directory holding expected.json: {missing:?}");
    }
    Ok(cases)
}

/// All checks of one case, then the field coverage of its expected.json.
pub fn run_case(fx: &Fixture, kind: &str, manifest: &Value, c: &mut Checker) {
    c.check("case name", || {
        let name = fx.str("case")?;
        if name != fx.name {
            bail!(
                "expected.json says case `{name}`, directory is `{}`",
                fx.name
            );
        }
        Ok(())
    });
    match kind {
        "decoder-only" => decoder_only::check(fx, c),
        "minilm-real" => minilm::check(fx, c),
        "encoders" => encoders::check(fx, c),
        "rag" => {
            generators::check(fx, c);
            rag::check(fx, manifest, c);
        }
        _ => c.check("case kind", || bail!("unknown case kind `{kind}`")),
    }
    common::coverage(fx, kind, c);
}

fn main() -> ExitCode {
    let root = std::env::var("RUSTRAG_PARITY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/parity"));
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let mut total = Checker::new("parity");
    let manifest: Value = match rustrag::hub::read_json(&root.join("manifest.json")) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("parity: {e:#} (set RUSTRAG_PARITY_DIR)");
            println!("0 passed, 1 failed");
            return ExitCode::FAILURE;
        }
    };
    let cases = match case_list(&root, &manifest) {
        Ok(c) => c,
        Err(e) => {
            total.check("case list", || Err(e));
            Vec::new()
        }
    };
    let mut n_cases = 0;
    for (name, kind) in &cases {
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let mut c = Checker::new(name);
        let t0 = std::time::Instant::now();
        match Fixture::load(&root.join(name)) {
            Ok(fx) => run_case(&fx, kind, &manifest, &mut c),
            Err(e) => c.check("expected.json", || Err(e)),
        }
        n_cases += 1;
        println!(
            "case {:<14} [{kind}] {} checks passed, {} failed ({:.1}s)",
            name,
            c.passed,
            c.failed.len(),
            t0.elapsed().as_secs_f64()
        );
        total.passed += c.passed;
        total.failed.extend(c.failed);
    }
    if filter.as_ref().is_none_or(|f| f == "selftest") {
        let t0 = std::time::Instant::now();
        let (p, f) = (total.passed, total.failed.len());
        selftest::run(&root, &cases, &manifest, &mut total);
        println!(
            "self-tests: {} passed, {} failed ({:.1}s)",
            total.passed - p,
            total.failed.len() - f,
            t0.elapsed().as_secs_f64()
        );
    }
    println!(
        "\nparity: {n_cases} cases under {}, {} checks",
        root.display(),
        total.passed + total.failed.len()
    );
    for f in &total.failed {
        println!("FAILED {f}");
    }
    println!("{} passed, {} failed", total.passed, total.failed.len());
    if total.failed.is_empty() && total.passed > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
