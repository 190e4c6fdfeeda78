//! RagModel integration tests on the HF RAG checkpoints of the parity fixtures
//! (`$RUSTRAG_PARITY_DIR`, default `../shared/parity`): save_pretrained round trip, `ask` with
//! provenance, training step, bad input.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rustrag::rag::checkpoint::{load_rag, LoadOptions};
use rustrag::rag::pipeline::{AnswerOptions, Pipeline, PipelineConfig};
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

#[test]
fn ask_returns_answers_sources_and_normalised_provenance() -> Result<()> {
    for (case, mode) in [
        ("bart-token", RagMode::Token),
        ("t5-seq", RagMode::Sequence),
    ] {
        let dir = case_dir(case)?;
        let config = PipelineConfig {
            answer: AnswerOptions {
                beams: Some(2),
                max_new_tokens: Some(11),
                ..Default::default()
            },
            ..Default::default()
        };
        let pipeline =
            Pipeline::open_checkpoint(&dir.join("rag").to_string_lossy(), &dir.join("kb"), config)?;
        let model = &pipeline.rag;
        let qs = questions(&dir)?;
        let res = pipeline.answer(&qs)?;
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

/// Thorough decoding agrees with the exposed per-candidate NLLs: the returned answer has the lowest NLL.
#[test]
fn thorough_decoding_returns_the_lowest_nll_candidate() -> Result<()> {
    let (model, index, dir) = load("t5-seq", false)?;
    let qs = questions(&dir)?;
    let refs: Vec<&str> = qs.iter().map(|s| s.as_str()).collect();
    let r = model.retrieve(&index, &refs, model.n_docs())?;
    let p = model.generation_params(&GenerationSettings {
        num_beams: Some(3),
        max_length: Some(12),
        ..Default::default()
    })?;
    let (ids, details) = model.generate_sequence(&r.context, &p, true)?;
    for (i, d) in details.iter().enumerate() {
        let best = d
            .candidate_nll
            .iter()
            .copied()
            .fold(f32::INFINITY, f32::min);
        assert_eq!(d.candidate_nll[d.top_candidate_indices[0]], best);
        let mut want = d.candidates[d.top_candidate_indices[0]].clone();
        want.resize(ids[i].len(), model.generator_pad());
        assert_eq!(ids[i], want);
    }
    Ok(())
}

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

/// The tiny decoder-only Llama of the parity fixtures as a RAG head with a `context_window`.
fn tiny_decoder_only(context_window: usize) -> Result<RagModel> {
    let dir = case_dir("bart-token")?.join("../decoder-only/model");
    let tok = rustrag::tokenize::load_tokenizer(&dir)?;
    let llama = rustrag::generators::llama::Llama::from_hf_dir(&dir, &Device::Cpu)?;
    rustrag::rag::pipeline::decoder_only_rag(Box::new(llama), tok, None, context_window, &dir)
}

fn passage(id: &str, words: usize) -> rustrag::retrieve::Passage {
    rustrag::retrieve::Passage {
        id: id.into(),
        title: format!("Title {id}"),
        text: (0..words)
            .map(|i| format!("word{i}"))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// Bad input: a generator whose vocabulary is smaller than its tokenizer's is refused at load,
/// naming both sizes.
#[test]
fn decoder_only_head_refuses_a_larger_tokenizer_vocabulary() -> Result<()> {
    let dir = case_dir("bart-token")?;
    let bart_tok = rustrag::tokenize::load_tokenizer(&dir.join("rag/generator_tokenizer"))?;
    let llama_dir = dir.join("../decoder-only/model");
    let llama = rustrag::generators::llama::Llama::from_hf_dir(&llama_dir, &Device::Cpu)?;
    let err = match rustrag::rag::pipeline::decoder_only_rag(
        Box::new(llama),
        bart_tok,
        None,
        512,
        &llama_dir,
    ) {
        Ok(_) => bail!("a 50k-token tokenizer on a 450-token generator was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("450"), "{err}");
    Ok(())
}

/// Bad input: prompts longer than the context window keep their question and have the passage cut
/// at the end, reported per row; a question that alone overflows the window is an error.
#[test]
fn long_prompts_are_cut_to_the_context_window_and_reported() -> Result<()> {
    let rag = tiny_decoder_only(96)?;
    let q = "what is word3?".to_string();
    let docs = vec![passage("short", 5), passage("long", 400)];
    let scores = Tensor::new(&[[1f32, 0.5]], &Device::Cpu)?;
    let (rows, ctx) = rag.context_from_passages(std::slice::from_ref(&q), &[docs], scores)?;
    assert_eq!(rows.truncated.len(), 1, "{:?}", rows.truncated);
    let t = &rows.truncated[0];
    assert_eq!(t.row, 1);
    assert!(
        t.prompt_tokens_before > 96 && t.prompt_tokens_after <= 96,
        "{t:?}"
    );
    assert!(t.passage_words_kept < t.passage_words);
    assert!(
        rows.strings[1].ends_with(&q),
        "question kept: {}",
        rows.strings[1]
    );
    assert!(rows.encoded.input_ids.iter().all(|r| r.len() <= 96));
    // The cut contexts decode.
    let p = rag.generation_params(&GenerationSettings {
        max_length: Some(4),
        ..Default::default()
    })?;
    assert_eq!(rag.generate_token(&ctx, &p)?.len(), 1);
    let tiny = tiny_decoder_only(3)?;
    let scores = Tensor::new(&[[1f32]], &Device::Cpu)?;
    let err = tiny
        .context_from_passages(&[q], &[vec![passage("p", 10)]], scores)
        .err()
        .context("a question longer than the window was accepted")?;
    assert!(format!("{err:#}").contains("context window"), "{err:#}");
    Ok(())
}

/// Bad input through the pipeline: n_docs 0 or larger than the knowledge base, beams 0, an empty
/// question, a non-positive prior temperature: clear errors, no panic.
#[test]
fn pipeline_rejects_bad_answer_options() -> Result<()> {
    let dir = case_dir("bart-token")?;
    let pipeline = Pipeline::open_checkpoint(
        &dir.join("rag").to_string_lossy(),
        &dir.join("kb"),
        PipelineConfig::default(),
    )?;
    let qs = questions(&dir)?;
    let kb = pipeline.kb_len();
    let cases: Vec<(AnswerOptions, String)> = vec![
        (
            AnswerOptions {
                n_docs: Some(kb + 1),
                ..Default::default()
            },
            format!("knowledge base has only {kb} passages"),
        ),
        (
            AnswerOptions {
                n_docs: Some(0),
                ..Default::default()
            },
            "n_docs must be at least 1".into(),
        ),
        (
            AnswerOptions {
                beams: Some(0),
                ..Default::default()
            },
            "num_beams` must be at least 1".into(),
        ),
        (
            AnswerOptions {
                prior_temperature: Some(0.0),
                ..Default::default()
            },
            "prior temperature must be positive".into(),
        ),
    ];
    for (opts, want) in cases {
        let err = pipeline
            .answer_with(&qs[..1], &opts)
            .err()
            .with_context(|| format!("{opts:?} was accepted"))?;
        assert!(format!("{err:#}").contains(&want), "{err:#} (want {want})");
    }
    let err = pipeline
        .answer(&["  ".to_string()])
        .err()
        .context("empty question")?;
    assert!(format!("{err:#}").contains("empty"), "{err:#}");
    // n_docs equal to the KB size is fine.
    let opts = AnswerOptions {
        n_docs: Some(kb),
        max_new_tokens: Some(3),
        ..Default::default()
    };
    let r = pipeline.answer_with(&qs[..1], &opts)?;
    assert_eq!(r[0].sources.len(), kb);
    Ok(())
}

/// Every decoding entry of the head runs on a decoder-only generator too: RAG-Token greedy and beam
/// search with num_return_sequences, RAG-Sequence thorough and fast with beams, the logits
/// processors (min length, no-repeat n-gram), both losses.
#[test]
fn every_decoding_entry_runs_on_a_decoder_only_generator() -> Result<()> {
    let mut rag = tiny_decoder_only(512)?;
    let qs = vec!["what is word3?".to_string(), "where is word7?".to_string()];
    let docs = vec![
        vec![passage("a", 12), passage("b", 20), passage("c", 6)],
        vec![passage("d", 9), passage("e", 15), passage("f", 30)],
    ];
    let scores = Tensor::new(&[[1f32, 0.5, 0.2], [0.3, 0.9, 0.1]], &Device::Cpu)?;
    let (_, ctx) = rag.context_from_passages(&qs, &docs, scores)?;
    let settings = GenerationSettings {
        num_beams: Some(3),
        num_return_sequences: Some(2),
        max_length: Some(8),
        min_length: Some(4),
        no_repeat_ngram_size: Some(2),
        ..Default::default()
    };
    let p = rag.generation_params(&settings)?;
    let eos = rag.generator.special_ids().eos;
    let token = rag.generate_token(&ctx, &p)?;
    assert_eq!(token.len(), 4, "2 questions x 2 returned sequences");
    for row in &token {
        // min_length: no EOS before position 4; no-repeat-ngram: no bigram twice.
        assert!(!row[1..4.min(row.len())].contains(&eos), "{row:?}");
        let bigrams: Vec<_> = row
            .windows(2)
            .filter(|w| w[1] != rag.generator_pad())
            .collect();
        let mut seen = std::collections::HashSet::new();
        assert!(
            bigrams.iter().all(|b| seen.insert(*b)),
            "repeated bigram in {row:?}"
        );
    }
    let (fast, scores) = rag.generate_sequence_fast(&ctx, &p)?;
    assert_eq!((fast.len(), scores.len()), (4, 4));
    assert!(scores.iter().all(|s| s.is_finite()));
    rag.mode = RagMode::Sequence;
    let (thorough, details) = rag.generate_sequence(&ctx, &p, true)?;
    assert_eq!(thorough.len(), 4);
    assert_eq!(details[0].generator_outputs.len(), 3 * 3);
    // Both losses over the returned sequences are finite and positive.
    let labels =
        rustrag::tokenize::ids_tensor(&[thorough[0].clone(), thorough[2].clone()], &Device::Cpu)?;
    for mode in [RagMode::Sequence, RagMode::Token] {
        rag.mode = mode;
        let loss = rag
            .loss(&ctx, &labels, &rag.default_nll_options())?
            .to_vec1::<f32>()?;
        assert!(
            loss.iter().all(|l| l.is_finite() && *l > 0.0),
            "{mode:?}: {loss:?}"
        );
    }
    Ok(())
}
