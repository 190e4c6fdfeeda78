//! Encoder integration tests on the real fixture checkpoints (`$RUSTRAG_PARITY_DIR`, default
//! `../shared/parity`): gradients reach every parameter, the RAG-nested question encoder equals the
//! standalone one, kind detection, and bad input gives errors that name the file and tensor.

use anyhow::Result;
use candle_core::{Device, Tensor};
use rustrag::encoders::{load_encoder, DprEncoder, LoadOptions, SentenceEncoder, TextEncoder};
use std::path::{Path, PathBuf};

fn parity_dir() -> PathBuf {
    let dir = std::env::var("RUSTRAG_PARITY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/parity"));
    assert!(
        dir.join("encoders").is_dir(),
        "parity fixtures missing: {} has no encoders/ (set RUSTRAG_PARITY_DIR)",
        dir.display()
    );
    dir
}

fn opts() -> LoadOptions {
    LoadOptions {
        device: Device::Cpu,
        ..Default::default()
    }
}

fn dir_str(p: &Path) -> String {
    p.display().to_string()
}

fn fixture_questions() -> Result<Vec<String>> {
    let v: serde_json::Value =
        rustrag::hub::read_json(&parity_dir().join("encoders/expected.json"))?;
    Ok(serde_json::from_value(
        v["question_encoder"]["texts"].clone(),
    )?)
}

/// A loss on the pooled outputs must give a non-zero gradient to every weight of the encoder
/// (candle's fused LayerNorm/softmax would silently stop gradients).
fn assert_all_params_get_gradient(enc: &DprEncoder, texts: &[&str]) -> Result<()> {
    let vars = enc.vars();
    assert!(
        vars.len() > 10,
        "expected the encoder's variables, got {}",
        vars.len()
    );
    let tok = enc.tokenize(texts)?;
    let batch = rustrag::encoders::bert::pad_rows(
        &tok,
        &(0..texts.len()).collect::<Vec<_>>(),
        0,
        &Device::Cpu,
    )?;
    // Alternating token types so that both rows of the type embedding are used.
    let (b, l) = batch.input_ids.dims2()?;
    let types = Tensor::from_vec(
        (0..b * l).map(|i| (i % 2) as u32).collect::<Vec<_>>(),
        (b, l),
        &Device::Cpu,
    )?;
    let pooled = enc.encode_ids(&batch.input_ids, Some(&batch.attention_mask), Some(&types))?;
    let weights =
        Tensor::arange(0f32, pooled.elem_count() as f32, &Device::Cpu)?.reshape(pooled.shape())?;
    let loss = ((pooled.sqr()? * 0.5)? + (pooled * weights.sin()?)?)?.sum_all()?;
    let grads = loss.backward()?;
    let mut missing = Vec::new();
    for (name, var) in &vars {
        let g = grads.get(var.as_tensor());
        let norm = match g {
            Some(g) => g.abs()?.sum_all()?.to_scalar::<f32>()?,
            None => 0.0,
        };
        if norm.is_nan() || norm <= 0.0 {
            missing.push(name.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "parameters without gradient: {missing:?}"
    );
    Ok(())
}

#[test]
fn every_dpr_parameter_receives_gradient() -> Result<()> {
    let qs = fixture_questions()?;
    let texts: Vec<&str> = qs.iter().map(|s| s.as_str()).collect();
    let o = LoadOptions {
        trainable: true,
        ..opts()
    };
    let q = DprEncoder::load(
        &dir_str(&parity_dir().join("encoders/question_encoder")),
        &o,
    )?;
    assert_all_params_get_gradient(&q, &texts)?;
    let ctx = DprEncoder::load(&dir_str(&parity_dir().join("encoders/ctx_encoder")), &o)?;
    assert_all_params_get_gradient(&ctx, &texts)?;
    // Nested in a RAG checkpoint: only the question encoder's variables are returned.
    let rag = DprEncoder::load(&dir_str(&parity_dir().join("bart-seq/rag")), &o)?;
    assert!(rag
        .vars()
        .iter()
        .all(|(n, _)| n.starts_with("rag.question_encoder.")));
    assert_all_params_get_gradient(&rag, &texts)
}

#[test]
fn rag_nested_question_encoder_matches_reference() -> Result<()> {
    for case in ["bart-seq", "t5-token"] {
        let case_dir = parity_dir().join(case);
        let v: serde_json::Value = rustrag::hub::read_json(&case_dir.join("expected.json"))?;
        let texts: Vec<String> = serde_json::from_value(v["questions"]["texts"].clone())?;
        let texts: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
        let want: Vec<Vec<f32>> =
            serde_json::from_value(v["question_encoder"]["pooled_output"].clone())?;
        let want_ids: Vec<Vec<u32>> = serde_json::from_value(v["questions"]["input_ids"].clone())?;
        let rag = load_encoder(&dir_str(&case_dir.join("rag")), &opts())?;
        let want_mask: Vec<Vec<u32>> =
            serde_json::from_value(v["questions"]["attention_mask"].clone())?;
        let got = rag.encode_texts(&texts)?.to_vec2::<f32>()?;
        // Same shapes, then every element within the parity suite's HIDDEN tolerance.
        assert_eq!(
            got.iter().map(|r| r.len()).collect::<Vec<_>>(),
            want.iter().map(|r| r.len()).collect::<Vec<_>>(),
            "{case}: pooled output shape"
        );
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!(
                (g - w).abs() <= 1e-5 + 1e-5 * w.abs(),
                "{case}: pooled {g} vs reference {w}"
            );
        }
        assert_eq!(rag.fingerprint().kind, "dpr-question");
        let nested = DprEncoder::load(&dir_str(&case_dir.join("rag")), &opts())?;
        let tok = nested.tokenize(&texts)?;
        // Our rows are unpadded; HF's are padded to the longest: compare the unmasked part.
        let want_unpadded: Vec<Vec<u32>> = want_ids
            .iter()
            .zip(&want_mask)
            .map(|(ids, m)| ids[..m.iter().filter(|&&x| x == 1).count()].to_vec())
            .collect();
        assert_eq!(tok.input_ids, want_unpadded, "{case}: question ids");
    }
    Ok(())
}

#[test]
fn load_encoder_detects_kinds() -> Result<()> {
    let p = parity_dir().join("encoders");
    let q = load_encoder(&dir_str(&p.join("question_encoder")), &opts())?;
    let c = load_encoder(&dir_str(&p.join("ctx_encoder")), &opts())?;
    let b = load_encoder(&dir_str(&p.join("bert_mean")), &opts())?;
    assert_eq!(
        (
            q.fingerprint().kind.as_str(),
            q.fingerprint().pooling.as_str()
        ),
        ("dpr-question", "cls")
    );
    assert_eq!(c.fingerprint().kind, "dpr-ctx");
    assert_eq!(
        (
            b.fingerprint().kind.as_str(),
            b.fingerprint().pooling.as_str()
        ),
        ("bert", "mean")
    );
    let fp = q.fingerprint();
    assert_eq!(fp.weights_sha256.len(), 64, "{fp:?}");
    let hidden: serde_json::Value =
        rustrag::hub::read_json(&p.join("question_encoder/config.json"))?;
    assert_eq!(Some(fp.dim as u64), hidden["hidden_size"].as_u64());
    assert_ne!(
        q.fingerprint().weights_sha256,
        c.fingerprint().weights_sha256
    );
    assert_eq!(q.encode_texts(&[])?.dims(), &[0, q.dim()]);
    // Output order is the input order even though batches are sorted by length.
    let texts = [
        "a",
        "a much longer question about the national football league teams",
        "b c",
    ];
    let all = q.encode_texts(&texts)?.to_vec2::<f32>()?;
    assert_eq!(all.len(), texts.len());
    for (i, t) in texts.iter().enumerate() {
        let one = q.encode_texts(&[t])?.to_vec2::<f32>()?;
        assert_eq!(all[i].len(), one[0].len());
        for (a, b) in all[i].iter().zip(&one[0]) {
            assert!((a - b).abs() < 1e-5, "row {i}: {a} vs {b}");
        }
    }
    Ok(())
}

/// Copy a fixture model directory into a temp dir so that it can be damaged.
fn copy_model(src: &Path) -> Result<tempfile::TempDir> {
    let tmp = tempfile::tempdir()?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        if entry.path().is_file() {
            std::fs::copy(entry.path(), tmp.path().join(entry.file_name()))?;
        }
    }
    Ok(tmp)
}

fn load_err(dir: &Path) -> String {
    match load_encoder(&dir_str(dir), &opts()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn missing_config_is_an_error_naming_the_file() -> Result<()> {
    let tmp = copy_model(&parity_dir().join("encoders/question_encoder"))?;
    std::fs::remove_file(tmp.path().join("config.json"))?;
    let err = load_err(tmp.path());
    assert!(err.contains("config.json"), "{err}");
    Ok(())
}

#[test]
fn corrupt_safetensors_is_an_error_naming_the_file() -> Result<()> {
    let tmp = copy_model(&parity_dir().join("encoders/question_encoder"))?;
    let file = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&file)?;
    std::fs::write(&file, &bytes[..bytes.len() / 2])?;
    let err = load_err(tmp.path());
    assert!(err.contains("model.safetensors"), "{err}");
    Ok(())
}

#[test]
fn wrong_tensor_shape_names_file_and_tensor() -> Result<()> {
    let src = parity_dir().join("encoders/question_encoder");
    let tmp = copy_model(&src)?;
    let file = tmp.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu)?;
    let name = "question_encoder.bert_model.encoder.layer.0.intermediate.dense.weight";
    let t = tensors.get(name).expect("fixture tensor").clone();
    tensors.insert(name.to_string(), t.narrow(0, 0, t.dim(0)? - 1)?);
    candle_core::safetensors::save(&tensors, &file)?;
    let err = load_err(tmp.path());
    assert!(
        err.contains("model.safetensors") && err.contains(name),
        "{err}"
    );
    Ok(())
}

#[test]
fn missing_tensor_names_file_and_tensor() -> Result<()> {
    let tmp = copy_model(&parity_dir().join("encoders/ctx_encoder"))?;
    let file = tmp.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu)?;
    let name = "ctx_encoder.bert_model.encoder.layer.1.output.LayerNorm.bias";
    tensors.remove(name);
    candle_core::safetensors::save(&tensors, &file)?;
    let err = load_err(tmp.path());
    assert!(
        err.contains("model.safetensors") && err.contains(name),
        "{err}"
    );
    Ok(())
}

#[test]
fn tokenizer_larger_than_model_vocab_is_an_error() -> Result<()> {
    let tmp = copy_model(&parity_dir().join("encoders/bert_mean"))?;
    // A consistent but smaller model: vocab_size and the embedding table both cut to 100 rows.
    let file = tmp.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu)?;
    let name = "embeddings.word_embeddings.weight";
    let t = tensors[name].narrow(0, 0, 100)?;
    tensors.insert(name.to_string(), t);
    candle_core::safetensors::save(&tensors, &file)?;
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = rustrag::hub::read_json(&cfg_path)?;
    cfg["vocab_size"] = 100.into();
    std::fs::write(&cfg_path, serde_json::to_string(&cfg)?)?;
    let err = load_err(tmp.path());
    assert!(
        err.contains("tokenizer.json") && err.contains("vocab_size 100"),
        "{err}"
    );
    Ok(())
}

#[test]
fn unknown_architecture_and_bad_config_are_errors() -> Result<()> {
    let tmp = copy_model(&parity_dir().join("encoders/bert_mean"))?;
    let cfg_path = tmp.path().join("config.json");
    let good: serde_json::Value = rustrag::hub::read_json(&cfg_path)?;
    let mut cfg = good.clone();
    cfg["model_type"] = "gpt2".into();
    cfg["architectures"] = serde_json::json!(["GPT2Model"]);
    std::fs::write(&cfg_path, serde_json::to_string(&cfg)?)?;
    let err = load_err(tmp.path());
    assert!(err.contains("config.json") && err.contains("gpt2"), "{err}");
    let mut cfg = good.clone();
    cfg["position_embedding_type"] = "relative_key".into();
    std::fs::write(&cfg_path, serde_json::to_string(&cfg)?)?;
    let err = load_err(tmp.path());
    assert!(
        err.contains("config.json") && err.contains("relative_key"),
        "{err}"
    );
    let mut cfg = good;
    cfg.as_object_mut().expect("object").remove("hidden_size");
    std::fs::write(&cfg_path, serde_json::to_string(&cfg)?)?;
    let err = load_err(tmp.path());
    assert!(
        err.contains("config.json") && err.contains("hidden_size"),
        "{err}"
    );
    std::fs::write(&cfg_path, "{ not json")?;
    let err = load_err(tmp.path());
    assert!(err.contains("config.json"), "{err}");
    Ok(())
}

#[test]
fn missing_model_names_the_id_and_paths() {
    let err = match load_encoder("no-such-org/no-such-model", &opts()) {
        Ok(_) => panic!("should fail"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("no-such-org/no-such-model") && err.contains("searched"),
        "{err}"
    );
}

#[test]
fn sentence_transformers_dir_reads_modules() -> Result<()> {
    // A sentence-transformers layout around the fixture BERT: CLS pooling + Normalize, limit 16.
    let tmp = copy_model(&parity_dir().join("encoders/bert_mean"))?;
    let root = tmp.path();
    std::fs::write(
        root.join("modules.json"),
        r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
            {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
            {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#,
    )?;
    std::fs::create_dir(root.join("1_Pooling"))?;
    std::fs::write(
        root.join("1_Pooling/config.json"),
        r#"{"word_embedding_dimension":32,"pooling_mode_cls_token":true,"pooling_mode_mean_tokens":false}"#,
    )?;
    std::fs::write(
        root.join("sentence_bert_config.json"),
        r#"{"max_seq_length":16}"#,
    )?;
    let st = SentenceEncoder::load(&dir_str(root), &opts())?;
    assert_eq!(st.max_length, 16);
    let texts = [
        "Who won Super Bowl 50 and where was the game played in the end?",
        "short",
    ];
    let emb = st.encode_texts(&texts)?;
    assert_eq!(emb.dims(), &[2, 32]);
    for n in emb.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()? {
        assert!((n - 1.0).abs() < 1e-5, "norm {n}");
    }
    // Same vectors as the plain BERT dir with CLS pooling, normalised, at 16 tokens.
    let plain_opts = LoadOptions {
        pooling: Some(rustrag::encoders::Pooling::Cls),
        normalize: Some(true),
        max_length: Some(16),
        ..opts()
    };
    let plain = SentenceEncoder::load(
        &dir_str(&parity_dir().join("encoders/bert_mean")),
        &plain_opts,
    )?;
    let a = emb.flatten_all()?.to_vec1::<f32>()?;
    let b = plain
        .encode_texts(&texts)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert_eq!(a.len(), b.len());
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-6));
    assert_eq!(st.tokenize(&texts)?.input_ids[0].len(), 16);
    Ok(())
}

#[test]
fn fused_inference_path_equals_differentiable_path() -> Result<()> {
    // Non-trainable weights run the fused CPU kernels; trainable ones the composed candle ops.
    let dir = dir_str(&parity_dir().join("encoders/bert_mean"));
    let texts = [
        "How many NFL teams have gone 15-1 in one season?",
        "Who won?",
        "Super Bowl 50 was an American football game",
    ];
    let fast = SentenceEncoder::load(&dir, &opts())?;
    let slow = SentenceEncoder::load(
        &dir,
        &LoadOptions {
            trainable: true,
            ..opts()
        },
    )?;
    let a = fast.encode_texts(&texts)?.flatten_all()?.to_vec1::<f32>()?;
    let b = slow.encode_texts(&texts)?.flatten_all()?.to_vec1::<f32>()?;
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * scale, "fused {x} vs composed {y}");
    }
    Ok(())
}

#[test]
fn dpr_context_knowledge_base_embeds_title_text_pairs() -> Result<()> {
    let ctx_dir = parity_dir().join("encoders/ctx_encoder");
    let boxed = load_encoder(&dir_str(&ctx_dir), &opts())?;
    let ctx = DprEncoder::load(&dir_str(&ctx_dir), &opts())?;
    let t = tempfile::tempdir()?;
    let corpus = t.path().join("corpus.jsonl");
    let docs = [
        ("Aaron", "Aaron is a prophet and the brother of Moses."),
        ("", "A passage without a title."),
        (
            "Paris",
            "Paris is the capital and most populous city of France.",
        ),
    ];
    let lines: Vec<String> = docs
        .iter()
        .enumerate()
        .map(|(i, (title, text))| {
            serde_json::json!({"_id": format!("d{i}"), "title": title, "text": text}).to_string()
        })
        .collect();
    std::fs::write(&corpus, lines.join("\n"))?;
    let root = t.path().join("kb");
    rustrag::kb::build(
        &root,
        &[corpus],
        boxed.as_ref(),
        &rustrag::kb::BuildOptions::default(),
        &mut |_, _| {},
    )?;
    let kb = rustrag::kb::KnowledgeBase::open(&root)?;
    let mut stored = Vec::new();
    kb.embeddings().rows_f32_into(0, kb.len(), &mut stored);
    let titles: Vec<&str> = docs.iter().map(|d| d.0).collect();
    let texts: Vec<&str> = docs.iter().map(|d| d.1).collect();
    // As HF's use_own_knowledge_dataset.py: ctx_tokenizer(titles, texts), i.e. the pair.
    let pairs = ctx
        .encode_pairs(&titles, &texts)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let max_diff = max_abs_diff(&stored, &pairs);
    assert!(
        max_diff < 1e-5,
        "KB rows differ from pair encoding by {max_diff}"
    );
    let joined = ctx
        .encode_texts(&["Aaron Aaron is a prophet and the brother of Moses."])?
        .flatten_all()?
        .to_vec1::<f32>()?;
    // Row 0 of the pair encodings is the same doc.
    let d = max_abs_diff(&joined, &pairs[..joined.len()]);
    assert!(d > 1e-4, "pair and joined encodings should differ");
    Ok(())
}

/// Largest element-wise `|a - b|` (the lengths must match).
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}
