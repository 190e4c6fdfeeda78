//! RagModel integration tests on the HF RAG checkpoints of the parity fixtures
//! (`$RUSTRAG_PARITY_DIR`, default `../shared/parity`): save_pretrained round trip, `ask` with
//! provenance, training step, bad input.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rustrag::cli::ask::{ask_hf_rag, Args as AskArgs};
use rustrag::rag::checkpoint::{load_rag, LoadOptions};
use rustrag::rag::{GenerationSettings, InMemoryIndex, RagMode, RagModel};
use std::path::PathBuf;

fn case_dir(name: &str) -> Result<PathBuf> {
    let root = std::env::var("RUSTRAG_PARITY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/parity"));
    let dir = root.join(name);
    if !dir.join("rag/config.json").is_file() {
        bail!(
            "parity fixture {} missing (set RUSTRAG_PARITY_DIR)",
            dir.display()
        );
    }
    Ok(dir)
}

fn load(name: &str, trainable: bool) -> Result<(RagModel, InMemoryIndex, PathBuf)> {
    let dir = case_dir(name)?;
    let model = load_rag(
        &dir.join("rag").to_string_lossy(),
        &LoadOptions {
            trainable,
            ..Default::default()
        },
    )?;
    let index = InMemoryIndex::load(
        &dir.join("kb/passages.jsonl"),
        &dir.join("kb/embeddings.safetensors"),
    )?;
    Ok((model, index, dir))
}

fn answers(dir: &std::path::Path) -> Result<Tensor> {
    let v: serde_json::Value = rustrag::hub::read_json(&dir.join("expected.json"))?;
    let labels: Vec<Vec<u32>> = serde_json::from_value(v["targets"]["labels"].clone())?;
    rustrag::tokenize::ids_tensor(&labels, &Device::Cpu)
}

fn questions(dir: &std::path::Path) -> Result<Vec<String>> {
    let v: serde_json::Value = rustrag::hub::read_json(&dir.join("expected.json"))?;
    Ok(serde_json::from_value(v["questions"]["texts"].clone())?)
}

#[test]
fn save_pretrained_round_trip_keeps_the_loss() -> Result<()> {
    for case in ["bart-seq", "t5-token"] {
        let (model, index, dir) = load(case, false)?;
        let qs = questions(&dir)?;
        let refs: Vec<&str> = qs.iter().map(|s| s.as_str()).collect();
        let labels = answers(&dir)?;
        let r = model.retrieve(&index, &refs, model.n_docs())?;
        let before = model
            .loss(&r.context, &labels, &model.default_nll_options())?
            .to_vec1::<f32>()?;
        let out = tempfile::tempdir()?;
        model.save_pretrained(out.path())?;
        for f in [
            "config.json",
            "model.safetensors",
            "generator_tokenizer/tokenizer.json",
            "question_encoder_tokenizer/tokenizer.json",
        ] {
            assert!(out.path().join(f).is_file(), "{case}: {f} not written");
        }
        let again = load_rag(&out.path().to_string_lossy(), &LoadOptions::default())?;
        assert_eq!(again.mode, model.mode);
        assert_eq!(again.config.n_docs, model.config.n_docs);
        let r2 = again.retrieve(&index, &refs, again.n_docs())?;
        assert_eq!(r2.doc_ids, r.doc_ids);
        let after = again
            .loss(&r2.context, &labels, &again.default_nll_options())?
            .to_vec1::<f32>()?;
        assert_eq!(before, after, "{case}: loss changed after save/load");
    }
    Ok(())
}

/// One SGD step on the RAG loss lowers it, and save_pretrained writes the trained weights.
#[test]
fn a_training_step_lowers_the_loss_and_is_saved() -> Result<()> {
    let (model, index, dir) = load("bart-token", true)?;
    let qs = questions(&dir)?;
    let refs: Vec<&str> = qs.iter().map(|s| s.as_str()).collect();
    let labels = answers(&dir)?;
    let mut opts = model.default_nll_options();
    opts.reduce_loss = true;
    let r = model.retrieve(&index, &refs, model.n_docs())?;
    let loss = model.loss(&r.context, &labels, &opts)?;
    let grads = loss.backward()?;
    let mut vars = model.generator.vars();
    vars.extend(
        model
            .question_encoder
            .as_ref()
            .context("question encoder")?
            .vars(),
    );
    assert!(!vars.is_empty());
    for (_, v) in &vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            v.set(&(v.as_tensor() - (g * 1e-3)?)?)?;
        }
    }
    let r = model.retrieve(&index, &refs, model.n_docs())?;
    let after = model.loss(&r.context, &labels, &opts)?.to_scalar::<f32>()?;
    let before = loss.to_scalar::<f32>()?;
    assert!(after < before, "loss {before} -> {after}");
    let out = tempfile::tempdir()?;
    model.save_pretrained(out.path())?;
    let again = load_rag(&out.path().to_string_lossy(), &LoadOptions::default())?;
    let r2 = again.retrieve(&index, &refs, again.n_docs())?;
    let reloaded = again
        .loss(&r2.context, &labels, &opts)?
        .to_scalar::<f32>()?;
    assert!(
        (reloaded - after).abs() < 1e-4 * after.abs(),
        "saved model gives {reloaded}, trained {after}"
    );
    Ok(())
}

fn ask_args(dir: &std::path::Path, beams: usize) -> AskArgs {
    AskArgs {
        questions: vec![],
        questions_file: None,
        model: Some(dir.join("rag").to_string_lossy().into_owned()),
        generator: None,
        kb: dir.join("kb"),
        mode: None,
        n_docs: None,
        beams: Some(beams),
        num_return_sequences: None,
        max_length: Some(12),
        min_length: None,
        decoding: "thorough".into(),
        snippet_chars: 40,
        retriever: "dense".into(),
        gguf_weights: "f32".into(),
    }
}

#[test]
fn ask_returns_answers_sources_and_normalised_provenance() -> Result<()> {
    for (case, mode) in [
        ("bart-token", RagMode::Token),
        ("t5-seq", RagMode::Sequence),
    ] {
        let (model, index, dir) = load(case, false)?;
        let qs = questions(&dir)?;
        let res = ask_hf_rag(&model, &index, &qs, &ask_args(&dir, 2))?;
        assert_eq!(res.len(), qs.len());
        for r in &res {
            assert_eq!(r.mode, mode);
            assert_eq!(r.sources.len(), model.n_docs());
            let prior: f32 = r.sources.iter().map(|s| s.prior).sum();
            assert!((prior - 1.0).abs() < 1e-5);
            assert!(
                r.sources.windows(2).all(|w| w[0].score >= w[1].score),
                "sources not ranked"
            );
            let a = &r.answers[0];
            assert!(!a.text.is_empty());
            assert!(!a.doc_posteriors.is_empty());
            for row in &a.doc_posteriors {
                assert_eq!(row.len(), model.n_docs());
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-4);
            }
            if mode == RagMode::Token {
                assert_eq!(a.tokens.len(), a.doc_posteriors.len());
            }
        }
    }
    Ok(())
}

// Thorough decoding (candidates, their NLLs, the pick) is compared with HF's in the parity suite
// (`tests/parity/rag.rs`, `sequence_generation_details`) for every RAG-Sequence generate call.

#[test]
fn bad_inputs_give_clear_errors() -> Result<()> {
    let (model, index, dir) = load("bart-token", false)?;
    let e = model
        .retrieve(&index, &["who?"], index.passages.len() + 1)
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("knowledge base has only"),
        "{e:#}"
    );
    let e = model.retrieve(&index, &[""], 2).unwrap_err();
    assert!(format!("{e:#}").contains("empty"), "{e:#}");
    let p = model.generation_params(&GenerationSettings {
        num_beams: Some(2),
        num_return_sequences: Some(3),
        ..Default::default()
    })?;
    let r = model.retrieve(&index, &["who?"], 2)?;
    let e = model.generate_token(&r.context, &p).unwrap_err();
    assert!(format!("{e:#}").contains("num_return_sequences"), "{e:#}");
    // A config without its generator sub-config.
    let tmp = tempfile::tempdir()?;
    let mut cfg: serde_json::Value = rustrag::hub::read_json(&dir.join("rag/config.json"))?;
    cfg.as_object_mut()
        .context("config")?
        .remove("question_encoder");
    std::fs::write(tmp.path().join("config.json"), serde_json::to_string(&cfg)?)?;
    let e = load_rag(&tmp.path().to_string_lossy(), &LoadOptions::default())
        .err()
        .context("no error")?;
    assert!(format!("{e:#}").contains("question_encoder"), "{e:#}");
    // A generator tokenizer bigger than the generator's vocabulary.
    let tmp = tempfile::tempdir()?;
    let mut cfg: serde_json::Value = rustrag::hub::read_json(&dir.join("rag/config.json"))?;
    cfg["generator"]["vocab_size"] = serde_json::json!(10);
    std::fs::write(tmp.path().join("config.json"), serde_json::to_string(&cfg)?)?;
    for sub in ["generator_tokenizer", "question_encoder_tokenizer"] {
        std::fs::create_dir_all(tmp.path().join(sub))?;
        for f in std::fs::read_dir(dir.join("rag").join(sub))? {
            let f = f?;
            std::fs::copy(f.path(), tmp.path().join(sub).join(f.file_name()))?;
        }
    }
    std::fs::copy(
        dir.join("rag/model.safetensors"),
        tmp.path().join("model.safetensors"),
    )?;
    let e = load_rag(&tmp.path().to_string_lossy(), &LoadOptions::default())
        .err()
        .context("no error")?;
    let msg = format!("{e:#}");
    assert!(msg.contains("vocab") || msg.contains("shape"), "{msg}");
    Ok(())
}

/// Fast decoding drops the terms of documents whose beams did not produce a candidate, so its score is a
/// lower bound of the exact log p(y|x) that thorough decoding's rescoring computes; it is exact when every
/// document produced the candidate.
#[test]
fn fast_decoding_scores_bound_the_thorough_ones() -> Result<()> {
    let (model, index, dir) = load("t5-seq", false)?;
    let qs = questions(&dir)?;
    let refs: Vec<&str> = qs.iter().map(|s| s.as_str()).collect();
    let r = model.retrieve(&index, &refs, model.n_docs())?;
    // Greedy per document: finished rows are padded with pad, which the NLL ignores.
    let p = model.generation_params(&GenerationSettings {
        num_beams: Some(1),
        num_return_sequences: Some(1),
        max_length: Some(12),
        ..Default::default()
    })?;
    let (fast, scores) = model.generate_sequence_fast(&r.context, &p)?;
    let (_, details) = model.generate_sequence(&r.context, &p, true)?;
    assert_eq!(fast.len(), qs.len());
    for (i, d) in details.iter().enumerate() {
        let pad = model.generator_pad();
        let c = d
            .candidates
            .iter()
            .position(|c| {
                let mut c = c.clone();
                c.resize(fast[i].len(), pad);
                c == fast[i]
            })
            .context("fast answer is not a thorough candidate")?;
        let exact = -d.candidate_nll[c];
        assert!(
            scores[i] <= exact + 1e-4,
            "fast {} > exact {exact}",
            scores[i]
        );
        let produced = d
            .generator_outputs
            .iter()
            .filter(|o| **o == d.candidates[c])
            .count();
        if produced == model.n_docs() {
            assert!(
                (scores[i] - exact).abs() < 1e-4,
                "all docs produced it: fast {} vs exact {exact}",
                scores[i]
            );
        }
    }
    Ok(())
}
