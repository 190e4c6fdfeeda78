//! Retriever training (src/train/retriever.rs) against sentence-transformers/torch on the real
//! all-MiniLM-L6-v2 (`$RUSTRAG_MODELS`; the tests fail when it is missing). Reference:
//! tests/fixtures/retriever_reference.json, written by tests/fixtures/make_retriever_reference.py.
//!
//! Tolerances. Both sides train in f32 and sum in different orders through six layers, so each
//! quantity is compared with torch's float64 run of the same computation (the fixture's `*_f64`),
//! allowing rustrag twice torch-float32's own distance from it plus a floor:
//! - loss: |got − torch64| ≤ 1e-5 · max(1, |torch64|); global gradient norm within 1e-3 relative;
//! - gradient slices: max |got − torch64| ≤ 2 · max |torch32 − torch64| + 1e-4 · max |torch64|
//!   (small gradients such as one word-embedding row are dominated by f32 cancellation in the
//!   embedding LayerNorm's backward: torch32 itself is 2% off there);
//! - parameters after one AdamW step: max |got − torch64| ≤ 2 · max |torch32 − torch64| + 1e-7
//!   (0.5% of the step size lr = 2e-5: an Adam step moves each weight by about lr).

use anyhow::{Context, Result};
use candle_core::Tensor;
use rustrag::encoders::{LoadOptions, SentenceEncoder, TextEncoder};
use rustrag::kb::{write_kb, BuildOptions, Passage};
use rustrag::train::optim::AdamWConfig;
use rustrag::train::retriever::{
    read_pairs, LossSettings, Negatives, RetrieverData, RetrieverTrainConfig, RetrieverTrainer,
    Similarity, Towers,
};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn model_dir() -> PathBuf {
    let root = std::env::var("RUSTRAG_MODELS")
        .expect("RUSTRAG_MODELS must name the models directory (scripts/fetch-models.sh)");
    let dir = Path::new(&root).join("all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: fetch it with scripts/fetch-models.sh",
        dir.display()
    );
    dir
}

fn fixture() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/retriever_reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).expect("retriever_reference.json"))
        .expect("fixture JSON")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn questions(fx: &Value) -> Vec<&str> {
    fx["train"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["question"].as_str().unwrap())
        .collect()
}

fn passages(fx: &Value) -> Vec<Passage> {
    serde_json::from_value(fx["passages"].clone()).expect("passages")
}

/// Assert `got` is as close to the float64 reference as torch's float32 run is (×2), plus `floor`.
fn check_slice(what: &str, got: &[f32], torch32: &Value, torch64: &Value, floor: f64) {
    let (w32, w64) = (floats(&torch32["values"]), floats64(&torch64["values"]));
    let err = max_abs_diff64(got, &w64);
    let torch_err = max_abs_diff64(&w32, &w64);
    eprintln!("{what}: |got − torch64| {err:.3e}, |torch32 − torch64| {torch_err:.3e}");
    assert!(
        err <= 2.0 * torch_err + floor,
        "{what}: max |got − torch64| {err:e} > 2 × {torch_err:e} (torch32's) + {floor:e}\n got {got:?}\nf32  {w32:?}\nf64  {w64:?}"
    );
}

fn floats64(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn max_abs_diff64(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()))
}

fn max_abs_diff(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()))
}

/// The slice `start..start + values.len()` of the flattened tensor.
fn slice(t: &Tensor, start: usize, n: usize) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .narrow(0, start, n)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// A knowledge base of the fixture passages embedded by `model` (or with `fingerprint_sha`
/// replaced, to fake another encoder).
fn build_kb(dir: &Path, model: &Path, passages: &[Passage], fake_sha: Option<&str>) -> PathBuf {
    let enc = SentenceEncoder::load(&model.display().to_string(), &LoadOptions::default()).unwrap();
    let titles: Vec<&str> = passages.iter().map(|p| p.title.as_str()).collect();
    let texts: Vec<&str> = passages.iter().map(|p| p.text.as_str()).collect();
    let e: Vec<f32> = enc
        .encode_passages(&titles, &texts)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut fp = enc.fingerprint();
    if let Some(sha) = fake_sha {
        fp.weights_sha256 = sha.into();
    }
    let kb = dir.join("kb");
    write_kb(&kb, passages, &e, &fp, &BuildOptions::default()).unwrap();
    kb
}

fn write_train(dir: &Path, fx: &Value) -> PathBuf {
    let p = dir.join("train.jsonl");
    let lines: Vec<String> = fx["train"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            serde_json::json!({"question": t["question"], "gold_pid": t["gold_pid"]}).to_string()
        })
        .collect();
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn step_config(max_steps: u64) -> RetrieverTrainConfig {
    let fx = fixture();
    let s = &fx["adamw_step"];
    RetrieverTrainConfig {
        negatives: Negatives::InBatch,
        batch_size: 4,
        max_steps,
        optim: AdamWConfig {
            lr: s["lr"].as_f64().unwrap(),
            weight_decay: s["weight_decay"].as_f64().unwrap(),
            ..Default::default()
        },
        max_grad_norm: Some(s["max_grad_norm"].as_f64().unwrap()),
        scale: fx["scale"].as_f64().unwrap(),
        ..Default::default()
    }
}

/// The fixture batch through `towers.loss` (columns: the 4 gold passages, then the 4 hard
/// negatives, a duplicate kept as `MultipleNegativesRankingLoss` keeps it): the loss, the global
/// gradient norm and the gradient slices against `fx[key]` (float32) and `fx[key_f64]`.
fn check_loss_and_gradients(towers: &Towers, settings: &LossSettings, key: &str) -> Result<()> {
    let fx = fixture();
    let ps = passages(&fx);
    let by_id: HashMap<&str, &Passage> = ps.iter().map(|p| (p.id.as_str(), p)).collect();
    let train = fx["train"].as_array().unwrap();
    let questions = questions(&fx);
    let columns: Vec<&Passage> = train
        .iter()
        .map(|t| by_id[t["gold_pid"].as_str().unwrap()])
        .chain(train.iter().map(|t| by_id[t["negative"].as_str().unwrap()]))
        .collect();
    let labels: Vec<u32> = (0..questions.len() as u32).collect();
    let (loss, truncated) = towers.loss(&questions, &columns, &labels, settings)?;
    assert_eq!(truncated, 0, "the fixture passages are short");
    let want = &fx[format!("{key}_f64")];
    let (got_loss, want_loss) = (
        loss.to_scalar::<f32>()? as f64,
        want["loss"].as_f64().unwrap(),
    );
    assert!(
        (got_loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0),
        "{key}: loss {got_loss} vs the float64 reference {want_loss}"
    );
    let grads = loss.backward()?;
    let vars: HashMap<String, _> = towers.vars().into_iter().collect();
    let mut sq = 0f64;
    for v in vars.values() {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let want_norm = want["grad_norm"].as_f64().unwrap();
    assert!(
        (sq.sqrt() - want_norm).abs() <= 1e-3 * want_norm,
        "{key}: gradient norm {} vs the reference {want_norm}",
        sq.sqrt()
    );
    for (s32, s64) in fx[key]["grads"]
        .as_array()
        .unwrap()
        .iter()
        .zip(want["grads"].as_array().unwrap())
    {
        let name = s64["name"].as_str().unwrap();
        let n = floats64(&s64["values"]).len();
        let var = vars
            .get(name)
            .with_context(|| format!("no parameter {name}"))?;
        let g = grads
            .get(var.as_tensor())
            .with_context(|| format!("no gradient for {name}"))?;
        let got = slice(g, s64["start"].as_u64().unwrap() as usize, n);
        let scale = floats64(&s64["values"])
            .iter()
            .fold(0f64, |m, v| m.max(v.abs()));
        check_slice(
            &format!("{key}: gradient of {name}"),
            &got,
            s32,
            s64,
            1e-4 * scale,
        );
    }
    Ok(())
}

#[test]
fn loss_and_gradients_with_hard_negatives_match_sentence_transformers() -> Result<()> {
    let fx = fixture();
    let towers = Towers::load(&model_dir().display().to_string(), None, true)?;
    assert_eq!(towers.default_similarity(), Similarity::Cosine);
    let settings = LossSettings {
        similarity: Similarity::Cosine,
        scale: fx["scale"].as_f64().unwrap(),
        max_query_length: None,
        max_passage_length: None,
    };
    check_loss_and_gradients(&towers, &settings, "with_negatives")
}

#[test]
fn one_adamw_step_matches_torch_and_the_checkpoint_loads_with_the_same_embeddings() -> Result<()> {
    let fx = fixture();
    let model = model_dir();
    let tmp = tempfile::tempdir()?;
    let ps = passages(&fx);
    let kb = build_kb(tmp.path(), &model, &ps, None);
    let train = write_train(tmp.path(), &fx);
    let data = RetrieverData {
        kb: &kb,
        bm25: None,
        train: &train,
        dev: None,
    };
    let out = tmp.path().join("run");
    let mut t = RetrieverTrainer::new(
        &model.display().to_string(),
        None,
        &data,
        &out,
        step_config(1),
    )?;
    let rec = t.train_step()?;
    let want = &fx["adamw_step_f64"];
    let want_loss = want["loss"].as_f64().unwrap();
    assert!(
        (rec.loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0),
        "loss {} vs torch (float64) {want_loss}",
        rec.loss
    );
    let want_norm = want["grad_norm"].as_f64().unwrap();
    assert!(
        (rec.grad_norm - want_norm).abs() <= 1e-3 * want_norm,
        "gradient norm {} vs torch {want_norm}",
        rec.grad_norm
    );
    assert_eq!(rec.passages_per_question, 1.0);
    assert_eq!(rec.truncated_passages, 0);
    let params: HashMap<String, _> = t.params().into_iter().collect();
    let after32 = fx["adamw_step"]["after"].as_array().unwrap();
    for (a32, a64) in after32.iter().zip(want["after"].as_array().unwrap()) {
        let name = a64["name"].as_str().unwrap();
        let n = floats64(&a64["values"]).len();
        let got = slice(
            params[name].as_tensor(),
            a64["start"].as_u64().unwrap() as usize,
            n,
        );
        check_slice(
            &format!("{name} after one AdamW step"),
            &got,
            a32,
            a64,
            1e-7,
        );
    }

    // The checkpoint is a sentence-transformers directory with the original tensor names that our
    // loader reads back to the same embeddings.
    let ckpt = t.save_checkpoint()?;
    for f in [
        "modules.json",
        "1_Pooling/config.json",
        "tokenizer.json",
        "config.json",
    ] {
        assert!(ckpt.join(f).is_file(), "checkpoint lacks {f}");
    }
    let names = |p: &Path| -> Result<Vec<String>> {
        let t = candle_core::safetensors::load(p, &candle_core::Device::Cpu)?;
        let mut n: Vec<String> = t
            .into_iter()
            .filter(|(_, v)| v.dtype().is_float())
            .map(|(k, _)| k)
            .collect();
        n.sort();
        Ok(n)
    };
    assert_eq!(
        names(&ckpt.join("model.safetensors"))?,
        names(&model.join("model.safetensors"))?
    );
    let loaded = SentenceEncoder::load(&ckpt.display().to_string(), &LoadOptions::default())?;
    let questions = questions(&fx);
    let trained = t.towers().question_encoder().encode_texts(&questions)?;
    let reloaded = loaded.encode_texts(&questions)?;
    let err = max_abs_diff(
        &trained.flatten_all()?.to_vec1()?,
        &reloaded.flatten_all()?.to_vec1()?,
    );
    assert!(
        err < 1e-5,
        "reloaded checkpoint embeddings differ by {err:e}"
    );
    let original = SentenceEncoder::load(&model.display().to_string(), &LoadOptions::default())?
        .encode_texts(&questions)?;
    let moved = max_abs_diff(
        &original.flatten_all()?.to_vec1()?,
        &reloaded.flatten_all()?.to_vec1()?,
    );
    assert!(moved > 1e-6, "the checkpoint is the untrained model");
    Ok(())
}

#[test]
fn an_interrupted_run_resumes_with_the_same_losses() -> Result<()> {
    let fx = fixture();
    let model = model_dir();
    let tmp = tempfile::tempdir()?;
    let kb = build_kb(tmp.path(), &model, &passages(&fx), None);
    let train = write_train(tmp.path(), &fx);
    let data = RetrieverData {
        kb: &kb,
        bm25: None,
        train: &train,
        dev: Some(&train),
    };
    let mut config = step_config(2);
    config.batch_size = 2;
    config.optim.lr = 1e-3;
    let losses = |out: &Path| -> Vec<f64> {
        rustrag::train::retriever::read_metrics(&out.join("metrics.jsonl"))
            .unwrap()
            .into_iter()
            .filter_map(|m| match m {
                rustrag::train::retriever::MetricLine::Train(r) => Some(r.loss),
                _ => None,
            })
            .collect()
    };
    let whole = tmp.path().join("whole");
    let m = model.display().to_string();
    let summary =
        RetrieverTrainer::new(&m, None, &data, &whole, config.clone())?.run(None, |_| {})?;
    assert_eq!(summary.steps, 2);
    assert_eq!(summary.evals.len(), 2, "evaluated before and after");
    assert!(whole.join("metrics.png").is_file());
    let parts = tmp.path().join("parts");
    RetrieverTrainer::new(&m, None, &data, &parts, config)?.run(Some(1), |_| {})?;
    let mut resumed = RetrieverTrainer::resume(&parts, &data)?;
    assert_eq!(resumed.step, 1);
    resumed.run(None, |_| {})?;
    let (a, b) = (losses(&whole), losses(&parts));
    assert_eq!(a.len(), 2);
    assert_eq!(b.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-6, "losses {a:?} vs resumed {b:?}");
    }
    Ok(())
}

#[test]
fn bad_training_lines_and_a_foreign_kb_are_refused() -> Result<()> {
    let fx = fixture();
    let model = model_dir();
    let tmp = tempfile::tempdir()?;
    let ps = passages(&fx);
    let kb_dir = build_kb(tmp.path(), &model, &ps, None);
    let kb = rustrag::kb::KnowledgeBase::open(&kb_dir)?;
    let p = tmp.path().join("bad.jsonl");
    let good = r#"{"question": "Where does the Rhine flow?", "gold_pid": "p0"}"#;
    for (second, wants) in [
        (
            r#"{"question": "No gold here"}"#,
            &["bad.jsonl:2", "gold_pid"][..],
        ),
        (
            r#"{"question": "Unknown", "gold_pid": "p99"}"#,
            &["bad.jsonl:2", "\"p99\""][..],
        ),
        (
            r#"{"question": "", "gold_pid": "p0"}"#,
            &["bad.jsonl:2", "question"][..],
        ),
        (r#"not json"#, &["bad.jsonl:2"][..]),
    ] {
        std::fs::write(&p, format!("{good}\n{second}\n"))?;
        let e = format!("{:#}", read_pairs(&p, &kb).unwrap_err());
        for w in wants {
            assert!(e.contains(w), "{e:?} should name {w}");
        }
    }
    // Through the trainer as well, before any training.
    std::fs::write(
        &p,
        format!("{good}\n\n{}\n", r#"{"question": "q", "gold_pid": "nope"}"#),
    )?;
    let data = RetrieverData {
        kb: &kb_dir,
        bm25: None,
        train: &p,
        dev: None,
    };
    let m = model.display().to_string();
    let e = format!(
        "{:#}",
        RetrieverTrainer::new(&m, None, &data, &tmp.path().join("r"), step_config(1))
            .err()
            .unwrap()
    );
    assert!(e.contains("bad.jsonl:3") && e.contains("nope"), "{e}");
    // A knowledge base embedded by another encoder is refused.
    let other = tempfile::tempdir()?;
    let foreign = build_kb(other.path(), &model, &ps, Some("0123456789abcdef"));
    let train = write_train(other.path(), &fx);
    let data = RetrieverData {
        kb: &foreign,
        bm25: None,
        train: &train,
        dev: None,
    };
    let e = format!(
        "{:#}",
        RetrieverTrainer::new(&m, None, &data, &other.path().join("r"), step_config(1))
            .err()
            .unwrap()
    );
    assert!(e.contains("not the encoder that embedded"), "{e}");
    Ok(())
}

/// Separate DPR towers (tiny random encoders in tests/fixtures/dpr-tiny, from the parity set):
/// DPR's dot-product loss and both towers' gradients against transformers, and a save that loads
/// back as two HF DPR directories with the same embeddings.
#[test]
fn dpr_towers_match_transformers_and_save_in_the_hf_layout() -> Result<()> {
    let fx = fixture();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dpr-tiny");
    let (qdir, cdir) = (dir.join("question_encoder"), dir.join("ctx_encoder"));
    let towers = Towers::load(
        &qdir.display().to_string(),
        Some(&cdir.display().to_string()),
        true,
    )?;
    assert_eq!(towers.default_similarity(), Similarity::Dot);
    let settings = LossSettings {
        similarity: Similarity::Dot,
        scale: 1.0,
        max_query_length: None,
        max_passage_length: None,
    };
    check_loss_and_gradients(&towers, &settings, "dpr")?;

    let ps = passages(&fx);
    let questions = questions(&fx);
    // A token cap is reported: every fixture passage is longer than 8 tokens.
    let refs: Vec<&Passage> = ps.iter().collect();
    let (capped, cut) = towers.encode_passages(&refs, Some(8))?;
    assert_eq!((capped.dims2()?.0, cut), (ps.len(), ps.len()));
    assert_eq!(towers.encode_passages(&refs, None)?.1, 0);

    let tmp = tempfile::tempdir()?;
    towers.save(tmp.path())?;
    let saved = Towers::load_saved(tmp.path(), false)?;
    let titles: Vec<&str> = ps.iter().map(|p| p.title.as_str()).collect();
    let texts: Vec<&str> = ps.iter().map(|p| p.text.as_str()).collect();
    for (what, a, b) in [
        (
            "questions",
            towers.question_encoder().encode_texts(&questions)?,
            saved.question_encoder().encode_texts(&questions)?,
        ),
        (
            "passages",
            towers.passage_encoder().encode_passages(&titles, &texts)?,
            saved.passage_encoder().encode_passages(&titles, &texts)?,
        ),
    ] {
        let err = max_abs_diff(&a.flatten_all()?.to_vec1()?, &b.flatten_all()?.to_vec1()?);
        assert!(err < 1e-5, "saved DPR {what} embeddings differ by {err:e}");
    }
    Ok(())
}

#[test]
fn a_diverging_run_stops_and_names_the_last_good_checkpoint() -> Result<()> {
    let fx = fixture();
    let model = model_dir();
    let tmp = tempfile::tempdir()?;
    let kb = build_kb(tmp.path(), &model, &passages(&fx), None);
    let train = write_train(tmp.path(), &fx);
    let data = RetrieverData {
        kb: &kb,
        bm25: None,
        train: &train,
        dev: None,
    };
    // An absurd rate moves every weight by ±1e30 in the first step: the second loss is not finite.
    let mut config = step_config(3);
    config.optim.lr = 1e30;
    config.save_every = 1;
    let out = tmp.path().join("run");
    let m = model.display().to_string();
    let e = RetrieverTrainer::new(&m, None, &data, &out, config)?
        .run(None, |_| {})
        .err()
        .context("the run should stop")?;
    let e = format!("{e:#}");
    assert!(e.contains("training stopped at step 2"), "{e}");
    assert!(
        e.contains("last good checkpoint") && e.contains("step-0000001"),
        "{e}"
    );
    let latest = rustrag::train::rag::latest_checkpoint(&out)?.context("a checkpoint")?;
    assert!(latest.ends_with("step-0000001"));
    assert!(
        out.join("metrics.png").is_file(),
        "the plot is drawn on a stop too"
    );
    Ok(())
}
