//! Seq2seq generators (BART, T5) on the real tiny HF checkpoints of the parity fixtures: every parameter
//! trains, decode-state row selection is consistent with decoding the selected rows from scratch, and bad
//! checkpoints give errors naming the file / field / tensor instead of panicking.
//!
//! Fixtures: `$RUSTRAG_PARITY_DIR` (default `<crate>/../shared/parity`); missing fixtures fail the tests.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rustrag::generators::auto::{load_generator_tokenizer, load_seq2seq};
use rustrag::generators::{GenInput, Seq2Seq};
use rustrag::tokenize::Padding;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn parity_dir() -> PathBuf {
    let dir = std::env::var("RUSTRAG_PARITY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/parity"));
    assert!(
        dir.is_dir(),
        "parity fixtures not found at {} (set RUSTRAG_PARITY_DIR)",
        dir.display()
    );
    dir
}

/// `<case>/generator` of the first case whose generator config has `model_type == kind`.
fn generator_dir(kind: &str) -> PathBuf {
    let root = parity_dir();
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("read parity dir")
        .filter_map(|e| e.ok().map(|e| e.path().join("generator")))
        .filter(|p| p.join("config.json").is_file())
        .collect();
    cases.sort();
    cases
        .into_iter()
        .find(|p| {
            let cfg: serde_json::Value =
                rustrag::hub::read_json(&p.join("config.json")).expect("config.json");
            cfg.get("model_type").and_then(|v| v.as_str()) == Some(kind)
        })
        .unwrap_or_else(|| panic!("no `{kind}` generator under {}", root.display()))
}

const TEXTS: [&str; 3] = [
    "Super Bowl 50 / the Denver Broncos defeated the Carolina Panthers // who won super bowl 50?",
    "Normans / The Normans were the people who gave their name to Normandy // where is normandy?",
    "short context",
];

/// Tokenized context rows `[3, len]` and decoder inputs `[3, 5]` (decoder start + ids from the contexts).
fn batch(dir: &Path, model: &dyn Seq2Seq) -> Result<(GenInput, Tensor)> {
    let tok = load_generator_tokenizer(&dir.to_string_lossy())?;
    let enc = tok.encode_batch(&TEXTS, true, Some(40), Padding::Longest)?;
    let (ids, mask) = enc.tensors(&Device::Cpu)?;
    let start = model.special_ids().decoder_start;
    let dec: Vec<Vec<u32>> = enc
        .input_ids
        .iter()
        .map(|r| {
            std::iter::once(start)
                .chain(r.iter().skip(1).take(4).copied())
                .collect()
        })
        .collect();
    Ok((
        GenInput {
            input_ids: ids,
            attention_mask: mask,
        },
        rustrag::tokenize::ids_tensor(&dec, &Device::Cpu)?,
    ))
}

fn every_parameter_gets_a_gradient(kind: &str) -> Result<()> {
    let dir = generator_dir(kind);
    let model = load_seq2seq(&dir.to_string_lossy(), DType::F32, &Device::Cpu, true)?;
    let vars = model.vars();
    let weights = rustrag::hub::Weights::from_dir(&dir, DType::F32, &Device::Cpu, false)?;
    // Every stored tensor except HF's buffers (BART's `final_logits_bias`, never trained).
    assert_eq!(
        vars.len(),
        weights
            .names()
            .filter(|n| !n.ends_with("final_logits_bias"))
            .count(),
        "{kind}: every stored parameter is a trainable variable"
    );
    let (input, dec) = batch(&dir, model.as_ref())?;
    let logits = model.forward(&input, &dec)?;
    // Teacher-forced NLL of the next decoder input (last position predicts the first one again, any target works).
    let (_, t_len, _) = logits.dims3()?;
    let next =
        Tensor::cat(&[dec.narrow(1, 1, t_len - 1)?, dec.narrow(1, 0, 1)?], 1)?.contiguous()?;
    let lp = rustrag::nn::log_softmax_last_dim(&logits)?;
    let loss = lp.gather(&next.unsqueeze(2)?, 2)?.sum_all()?.neg()?;
    assert!(loss.to_scalar::<f32>()?.is_finite());
    let grads = loss.backward()?;
    let mut missing = Vec::new();
    for (name, var) in &vars {
        let g = grads.get(var.as_tensor());
        let norm = match g {
            Some(g) => g.sqr()?.sum_all()?.to_scalar::<f32>()?,
            None => 0.0,
        };
        if norm.is_nan() || norm <= 0.0 {
            missing.push(name.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "{kind}: {} of {} parameters got no gradient: {missing:?}",
        missing.len(),
        vars.len()
    );
    Ok(())
}

#[test]
fn bart_every_parameter_gets_a_gradient() -> Result<()> {
    every_parameter_gets_a_gradient("bart")
}

#[test]
fn t5_every_parameter_gets_a_gradient() -> Result<()> {
    every_parameter_gets_a_gradient("t5")
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Decode two steps on rows `[0, 1, 2]`, reorder/duplicate to `[2, 0, 0, 1]` between the steps, and compare
/// with decoding the selected rows from scratch; also `select_rows` right after `start` (n_docs expansion).
fn select_rows_matches_fresh_decoding(kind: &str) -> Result<()> {
    let dir = generator_dir(kind);
    let model = load_seq2seq(&dir.to_string_lossy(), DType::F32, &Device::Cpu, false)?;
    let (input, dec) = batch(&dir, model.as_ref())?;
    let dev = Device::Cpu;
    let sel = Tensor::new(&[2u32, 0, 0, 1], &dev)?;
    let pick = |t: &Tensor| t.index_select(&sel, 0);
    let col = |t: &Tensor, i: usize| -> Result<Tensor> {
        Ok(t.narrow(1, i, 1)?.squeeze(1)?.contiguous()?)
    };

    let mut state = model.start(&input)?;
    model.step(&mut state, &col(&dec, 0)?)?;
    let mut moved = state.select_rows(&sel)?;
    assert_eq!(moved.rows()?, 4);
    let got = model.step(&mut moved, &pick(&col(&dec, 1)?)?)?;

    let fresh_input = GenInput {
        input_ids: pick(&input.input_ids)?,
        attention_mask: pick(&input.attention_mask)?,
    };
    let mut fresh = model.start(&fresh_input)?;
    model.step(&mut fresh, &pick(&col(&dec, 0)?)?)?;
    let want = model.step(&mut fresh, &pick(&col(&dec, 1)?)?)?;
    assert_eq!(got.dims(), [4, model.special_ids().vocab_size]);
    let d = max_diff(&got, &want)?;
    assert!(
        d < 1e-4,
        "{kind}: reordered cache differs from fresh decoding by {d}"
    );

    // Expansion before the first step (RAG: one encoder pass per doc row, then duplicated for beams).
    let mut expanded = model.start(&input)?.select_rows(&sel)?;
    let a = model.first_logits(&mut expanded)?;
    let b = model.first_logits(&mut model.start(&fresh_input)?)?;
    let d = max_diff(&a, &b)?;
    assert!(
        d < 1e-4,
        "{kind}: expanded state differs from fresh decoding by {d}"
    );
    // Duplicated rows give identical logits.
    let d = max_diff(&a.get(1)?, &a.get(2)?)?;
    assert!(d == 0.0, "{kind}: duplicated rows differ by {d}");
    Ok(())
}

#[test]
fn bart_select_rows_matches_fresh_decoding() -> Result<()> {
    select_rows_matches_fresh_decoding("bart")
}

#[test]
fn t5_select_rows_matches_fresh_decoding() -> Result<()> {
    select_rows_matches_fresh_decoding("t5")
}

// ---------------------------------------------------------------------------------------------------------
// Bad input

/// Copy a generator directory into a temp dir so that it can be damaged.
fn copy_dir(src: &Path) -> Result<tempfile::TempDir> {
    let tmp = tempfile::tempdir()?;
    for e in std::fs::read_dir(src)? {
        let p = e?.path();
        if p.is_file() {
            std::fs::copy(&p, tmp.path().join(p.file_name().context("file name")?))?;
        }
    }
    Ok(tmp)
}

fn load_err(dir: &Path) -> String {
    match load_seq2seq(&dir.to_string_lossy(), DType::F32, &Device::Cpu, false) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) -> Result<()> {
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value = rustrag::hub::read_json(&path)?;
    f(&mut cfg);
    std::fs::write(&path, serde_json::to_string_pretty(&cfg)?)?;
    Ok(())
}

fn edit_weights(
    dir: &Path,
    f: impl FnOnce(&mut HashMap<String, Tensor>) -> Result<()>,
) -> Result<()> {
    let path = dir.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu)?;
    f(&mut t)?;
    candle_core::safetensors::save(&t, &path)?;
    Ok(())
}

#[test]
fn unknown_architecture_names_file_and_field() -> Result<()> {
    let tmp = copy_dir(&generator_dir("bart"))?;
    edit_config(tmp.path(), |c| {
        c["model_type"] = "gpt2".into();
        c["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    })?;
    let e = load_err(tmp.path());
    assert!(
        e.contains("config.json") && e.contains("model_type") && e.contains("gpt2"),
        "{e}"
    );

    edit_config(tmp.path(), |c| {
        c.as_object_mut().unwrap().remove("model_type");
    })?;
    let e = load_err(tmp.path());
    assert!(
        e.contains("config.json") && e.contains("architectures") && e.contains("GPT2LMHeadModel"),
        "{e}"
    );
    Ok(())
}

#[test]
fn rag_checkpoint_without_generator_config_is_an_error() -> Result<()> {
    let rag = generator_dir("t5")
        .parent()
        .context("case dir")?
        .join("rag");
    let tmp = copy_dir(&rag)?;
    edit_config(tmp.path(), |c| {
        c.as_object_mut().unwrap().remove("generator");
    })?;
    let e = load_err(tmp.path());
    assert!(e.contains("config.json") && e.contains("generator"), "{e}");
    Ok(())
}

#[test]
fn wrong_tensor_shape_names_file_and_tensor() -> Result<()> {
    for kind in ["bart", "t5"] {
        let tmp = copy_dir(&generator_dir(kind))?;
        let name = if kind == "bart" {
            "model.decoder.layers.0.fc1.weight"
        } else {
            "decoder.block.0.layer.2.DenseReluDense.wi.weight"
        };
        edit_weights(tmp.path(), |w| {
            let t = w.get(name).context("tensor present")?.narrow(0, 1, 3)?;
            w.insert(name.to_string(), t);
            Ok(())
        })?;
        let e = load_err(tmp.path());
        assert!(
            e.contains("model.safetensors") && e.contains(name) && e.contains("shape"),
            "{kind}: {e}"
        );
    }
    Ok(())
}

#[test]
fn integer_tensor_names_file_tensor_and_dtype() -> Result<()> {
    let tmp = copy_dir(&generator_dir("bart"))?;
    let name = "model.decoder.layers.0.fc2.bias";
    edit_weights(tmp.path(), |w| {
        let t = w
            .get(name)
            .context("tensor present")?
            .to_dtype(DType::I64)?;
        w.insert(name.to_string(), t);
        Ok(())
    })?;
    let e = load_err(tmp.path());
    assert!(
        e.contains("model.safetensors") && e.contains(name) && e.contains("I64"),
        "{e}"
    );
    Ok(())
}

#[test]
fn missing_tensor_names_file_and_tensor() -> Result<()> {
    for kind in ["bart", "t5"] {
        let tmp = copy_dir(&generator_dir(kind))?;
        let name = if kind == "bart" {
            "model.encoder.layers.0.self_attn.k_proj.bias"
        } else {
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        };
        edit_weights(tmp.path(), |w| {
            w.remove(name).context("tensor present")?;
            Ok(())
        })?;
        let e = load_err(tmp.path());
        assert!(
            e.contains(&tmp.path().display().to_string())
                && e.contains("missing")
                && e.contains(name),
            "{kind}: {e}"
        );
    }
    Ok(())
}

#[test]
fn corrupt_weights_and_config_name_the_file() -> Result<()> {
    let tmp = copy_dir(&generator_dir("bart"))?;
    let weights = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&weights)?;
    std::fs::write(&weights, &bytes[..bytes.len() / 2])?;
    let e = load_err(tmp.path());
    assert!(e.contains("model.safetensors"), "truncated weights: {e}");
    std::fs::write(&weights, b"not a safetensors file at all")?;
    let e = load_err(tmp.path());
    assert!(e.contains("model.safetensors"), "garbage weights: {e}");

    std::fs::write(
        tmp.path().join("config.json"),
        b"{ \"model_type\": \"bart\", ",
    )?;
    let e = load_err(tmp.path());
    assert!(e.contains("config.json"), "corrupt config: {e}");
    std::fs::write(
        tmp.path().join("config.json"),
        b"{ \"model_type\": \"bart\", \"d_model\": 32 }",
    )?;
    let e = load_err(tmp.path());
    assert!(
        e.contains("config.json") && e.contains("vocab_size"),
        "incomplete config: {e}"
    );
    Ok(())
}

#[test]
fn tokenizer_larger_than_model_vocab_is_an_error() -> Result<()> {
    // The BART tokenizer has more tokens than the T5 model's vocab_size.
    let t5 = generator_dir("t5");
    let bart = generator_dir("bart");
    let tmp = copy_dir(&t5)?;
    std::fs::copy(
        bart.join("tokenizer.json"),
        tmp.path().join("tokenizer.json"),
    )?;
    let e = load_err(tmp.path());
    assert!(
        e.contains("tokenizer.json") && e.contains("vocab_size"),
        "{e}"
    );
    Ok(())
}

#[test]
fn bad_runtime_inputs_are_errors() -> Result<()> {
    for kind in ["bart", "t5"] {
        let dir = generator_dir(kind);
        let model = load_seq2seq(&dir.to_string_lossy(), DType::F32, &Device::Cpu, false)?;
        let dev = Device::Cpu;
        let vocab = model.special_ids().vocab_size as u32;
        let ids = Tensor::new(&[[5u32, 6, vocab]], &dev)?;
        let mask = Tensor::new(&[[1u32, 1, 1]], &dev)?;
        let e = model
            .start(&GenInput {
                input_ids: ids.clone(),
                attention_mask: mask.clone(),
            })
            .err()
            .context("id out of range")?;
        assert!(format!("{e:#}").contains("out of range"), "{kind}: {e:#}");
        let ok = Tensor::new(&[[5u32, 6, 7]], &dev)?;
        let e = model
            .start(&GenInput {
                input_ids: ok.clone(),
                attention_mask: Tensor::new(&[[1u32, 1]], &dev)?,
            })
            .err()
            .context("mask shape")?;
        assert!(format!("{e:#}").contains("attention_mask"), "{kind}: {e:#}");
        let mut state = model.start(&GenInput {
            input_ids: ok.clone(),
            attention_mask: mask.clone(),
        })?;
        let e = model
            .step(&mut state, &Tensor::new(&[1u32, 2], &dev)?)
            .err()
            .context("wrong token count")?;
        assert!(format!("{e:#}").contains("tokens"), "{kind}: {e:#}");
        let e = model
            .forward(
                &GenInput {
                    input_ids: ok,
                    attention_mask: mask,
                },
                &Tensor::new(&[[0u32], [0]], &dev)?,
            )
            .err()
            .context("rows")?;
        assert!(
            format!("{e:#}").contains("decoder_input_ids"),
            "{kind}: {e:#}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Config variants the fixtures do not exercise, proven by exact equivalences with the fixture models.

fn logits_of(dir: &Path, input: &GenInput, dec: &Tensor) -> Result<Tensor> {
    let model = load_seq2seq(&dir.to_string_lossy(), DType::F32, &Device::Cpu, false)?;
    model.forward(input, dec)
}

/// Relative max difference of two logit tensors.
fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let scale = b
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?
        .max(1e-12);
    Ok(max_diff(a, b)? / scale)
}

#[test]
fn bart_untied_lm_head_and_scaled_embeddings() -> Result<()> {
    // shared' = shared / sqrt(d) with scale_embedding = true, and an untied lm_head = the original table:
    // every logit must stay the same.
    let dir = generator_dir("bart");
    let model = load_seq2seq(&dir.to_string_lossy(), DType::F32, &Device::Cpu, false)?;
    let (input, dec) = batch(&dir, model.as_ref())?;
    let want = model.forward(&input, &dec)?;
    let tmp = copy_dir(&dir)?;
    let mut d_model = 0usize;
    edit_config(tmp.path(), |c| {
        d_model = c["d_model"].as_u64().unwrap_or(0) as usize;
        c["scale_embedding"] = true.into();
        c["tie_word_embeddings"] = false.into();
    })?;
    edit_weights(tmp.path(), |w| {
        let shared = w.get("model.shared.weight").context("shared")?.clone();
        w.insert("lm_head.weight".into(), shared.clone());
        w.insert(
            "model.shared.weight".into(),
            (shared / (d_model as f64).sqrt())?,
        );
        Ok(())
    })?;
    let got = logits_of(tmp.path(), &input, &dec)?;
    let d = rel_diff(&got, &want)?;
    assert!(d < 1e-5, "untied/scaled BART differs by {d}");
    // Without the untied head the (scaled-down) shared table is used for the logits: different numbers.
    edit_config(tmp.path(), |c| c["tie_word_embeddings"] = true.into())?;
    let tied = logits_of(tmp.path(), &input, &dec)?;
    assert!(
        rel_diff(&tied, &want)? > 1e-2,
        "tie_word_embeddings is ignored"
    );
    Ok(())
}

#[test]
fn t5_untied_lm_head_is_unscaled() -> Result<()> {
    // Tied: logits = (h * d^-0.5) @ shared^T. Untied with lm_head = shared * d^-0.5: the same logits.
    let dir = generator_dir("t5");
    let model = load_seq2seq(&dir.to_string_lossy(), DType::F32, &Device::Cpu, false)?;
    let (input, dec) = batch(&dir, model.as_ref())?;
    let want = model.forward(&input, &dec)?;
    let tmp = copy_dir(&dir)?;
    let mut d_model = 0usize;
    edit_config(tmp.path(), |c| {
        d_model = c["d_model"].as_u64().unwrap_or(0) as usize;
        c["tie_word_embeddings"] = false.into();
    })?;
    edit_weights(tmp.path(), |w| {
        let shared = w.get("shared.weight").context("shared")?.clone();
        w.insert(
            "lm_head.weight".into(),
            (shared * (d_model as f64).powf(-0.5))?,
        );
        Ok(())
    })?;
    let got = logits_of(tmp.path(), &input, &dec)?;
    let d = rel_diff(&got, &want)?;
    assert!(d < 1e-5, "untied T5 differs by {d}");
    Ok(())
}

#[test]
fn t5_gated_gelu_decodes_consistently_and_trains() -> Result<()> {
    // feed_forward_proj = "gated-gelu": wi_0 (gelu_new branch) * wi_1 (linear branch), then wo.
    let dir = generator_dir("t5");
    let tmp = copy_dir(&dir)?;
    edit_config(tmp.path(), |c| {
        c["feed_forward_proj"] = "gated-gelu".into();
        c["dense_act_fn"] = "gelu_new".into();
        c["is_gated_act"] = true.into();
    })?;
    edit_weights(tmp.path(), |w| {
        let names: Vec<String> = w
            .keys()
            .filter(|k| k.ends_with("DenseReluDense.wi.weight"))
            .cloned()
            .collect();
        assert!(!names.is_empty());
        for name in names {
            let wi = w.remove(&name).context("wi")?;
            let base = name.trim_end_matches("wi.weight");
            w.insert(format!("{base}wi_1.weight"), (wi.flip(&[0])? * 0.5)?);
            w.insert(format!("{base}wi_0.weight"), wi);
        }
        Ok(())
    })?;
    let model = load_seq2seq(
        &tmp.path().to_string_lossy(),
        DType::F32,
        &Device::Cpu,
        true,
    )?;
    let (input, dec) = batch(&dir, model.as_ref())?;
    let full = model.forward(&input, &dec)?;
    let mut state = model.start(&input)?;
    let steps = (0..dec.dim(1)?)
        .map(|t| model.step(&mut state, &dec.narrow(1, t, 1)?.squeeze(1)?.contiguous()?))
        .collect::<Result<Vec<_>>>()?;
    let d = rel_diff(&Tensor::stack(&steps, 1)?, &full)?;
    assert!(
        d < 1e-5,
        "gated T5: step-wise differs from teacher-forced by {d}"
    );
    let loss = rustrag::nn::log_softmax_last_dim(&full)?.sum_all()?.neg()?;
    let grads = loss.backward()?;
    for (name, var) in model.vars().iter().filter(|(n, _)| n.contains("wi_")) {
        let g = grads
            .get(var.as_tensor())
            .with_context(|| format!("no gradient for {name}"))?;
        assert!(
            g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0,
            "zero gradient for {name}"
        );
    }
    Ok(())
}

#[test]
fn forward_from_state_rescores_selected_rows_without_reencoding() -> Result<()> {
    for kind in ["bart", "t5"] {
        let dir = generator_dir(kind);
        let model = load_seq2seq(&dir.to_string_lossy(), DType::F32, &Device::Cpu, false)?;
        let (input, dec) = batch(&dir, model.as_ref())?;
        let sel = Tensor::new(&[1u32, 1, 0, 2], &Device::Cpu)?;
        let state = model.start(&input)?.select_rows(&sel)?;
        let dec_sel = dec.index_select(&sel, 0)?;
        let got = model.forward_from_state(&state, &dec_sel)?;
        let fresh = GenInput {
            input_ids: input.input_ids.index_select(&sel, 0)?,
            attention_mask: input.attention_mask.index_select(&sel, 0)?,
        };
        let want = model.forward(&fresh, &dec_sel)?;
        let d = rel_diff(&got, &want)?;
        assert!(d < 1e-5, "{kind}: forward_from_state differs by {d}");
    }
    Ok(())
}

#[test]
fn loads_by_hub_id_from_the_hf_cache_layout() -> Result<()> {
    // models--org--name/snapshots/<rev>/ with refs/main, as huggingface_hub writes it; nothing on the network.
    let cache = tempfile::tempdir()?;
    let repo = cache.path().join("models--tiny-org--rag-t5-generator");
    let snap = repo.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snap)?;
    std::fs::create_dir_all(repo.join("refs"))?;
    std::fs::write(repo.join("refs").join("main"), "0123abcd")?;
    let src = generator_dir("t5");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), snap.join(f))?;
    }
    // Only this test reads HF_HUB_CACHE.
    std::env::set_var("HF_HUB_CACHE", cache.path());
    let by_id = load_seq2seq("tiny-org/rag-t5-generator", DType::F32, &Device::Cpu, false)?;
    let by_dir = load_seq2seq(&src.to_string_lossy(), DType::F32, &Device::Cpu, false)?;
    let (input, dec) = batch(&src, by_dir.as_ref())?;
    let d = max_diff(
        &by_id.forward(&input, &dec)?,
        &by_dir.forward(&input, &dec)?,
    )?;
    assert_eq!(d, 0.0);
    let e = match load_seq2seq("tiny-org/not-cached", DType::F32, &Device::Cpu, false) {
        Ok(_) => panic!("an uncached id must not load"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("tiny-org/not-cached") && e.contains("models--tiny-org--not-cached"),
        "{e}"
    );
    Ok(())
}

/// Dropout at the config's rates is active only in train mode: decoding and evaluation give the
/// dropout-free logits bit for bit, train mode changes them, the same seed reproduces the same
/// masks (a resumed run), another seed draws others, and gradients flow through the masks.
fn dropout_only_in_train_mode(kind: &str) -> Result<()> {
    let dir = copy_dir(&generator_dir(kind))?;
    edit_config(dir.path(), |c| match kind {
        "bart" => {
            c["dropout"] = 0.3.into();
            c["attention_dropout"] = 0.1.into();
            c["activation_dropout"] = 0.1.into();
        }
        _ => c["dropout_rate"] = 0.3.into(),
    })?;
    // Both trainable: the same (differentiable) kernels, so equal means bit for bit.
    let plain = load_seq2seq(
        &generator_dir(kind).to_string_lossy(),
        DType::F32,
        &Device::Cpu,
        true,
    )?;
    let model = load_seq2seq(
        &dir.path().to_string_lossy(),
        DType::F32,
        &Device::Cpu,
        true,
    )?;
    let (input, dec) = batch(dir.path(), model.as_ref())?;
    let reference = plain.forward(&input, &dec)?;
    let eval = model.forward(&input, &dec)?;
    assert_eq!(
        max_diff(&eval, &reference)?,
        0.0,
        "{kind}: eval mode drops nothing"
    );

    model.dropout().train(7);
    let a = model.forward(&input, &dec)?;
    model.dropout().train(7);
    let b = model.forward(&input, &dec)?;
    model.dropout().train(8);
    let c = model.forward(&input, &dec)?;
    model.dropout().eval();
    assert!(
        max_diff(&a, &eval)? > 1e-3,
        "{kind}: train mode drops units"
    );
    assert_eq!(max_diff(&a, &b)?, 0.0, "{kind}: same seed, same masks");
    assert!(
        max_diff(&a, &c)? > 1e-3,
        "{kind}: another seed, other masks"
    );
    assert_eq!(max_diff(&model.forward(&input, &dec)?, &eval)?, 0.0);

    model.dropout().train(7);
    let loss = model.forward(&input, &dec)?.sqr()?.mean_all()?;
    model.dropout().eval();
    let grads = loss.backward()?;
    let vars = model.vars();
    let with_grad = vars.iter().filter(|(_, v)| grads.get(v).is_some()).count();
    assert_eq!(
        with_grad,
        vars.len(),
        "{kind}: every parameter gets a gradient"
    );
    Ok(())
}

#[test]
fn bart_dropout_only_in_train_mode() -> Result<()> {
    dropout_only_in_train_mode("bart")
}

#[test]
fn t5_dropout_only_in_train_mode() -> Result<()> {
    dropout_only_in_train_mode("t5")
}
