//! Encoder families (MPNet, XLM-RoBERTa, RoBERTa) and cross-encoders (BERT, XLM-R) against
//! sentence-transformers / transformers on tiny random models made offline by
//! tests/fixtures/make_encoder_fixtures.py (reference values in tests/fixtures/encoders/reference.json).
//!
//! Tolerances: embeddings and logits to 1e-4 absolute. Both sides run float32; the references
//! are torch's outputs, ours sum in a different order (packed gemm panels, fused softmax and
//! LayerNorm), which moves float32 results by a few 1e-7 relative per layer; 1e-4 leaves two
//! orders of magnitude for that while still catching any wrong term (a missing bias, position
//! offset or pooling row changes values by >= 1e-2 on these random models). Token ids: exact.

use anyhow::Result;
use candle_core::Device;
use rustrag::encoders::{
    load_encoder, CrossEncoder, LoadOptions, Prefixes, SentenceEncoder, TextEncoder,
};
use rustrag::tokenize::Padding;
use serde_json::Value;
use std::path::PathBuf;

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/encoders")
}

fn reference() -> Value {
    let path = fixtures().join("reference.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run make_encoder_fixtures.py)", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn opts() -> LoadOptions {
    LoadOptions {
        device: Device::Cpu,
        batch_size: 3,
        ..Default::default()
    }
}

fn model(name: &str) -> String {
    fixtures().join(name).display().to_string()
}

fn strings(v: &Value) -> Vec<String> {
    serde_json::from_value(v.clone()).unwrap()
}

fn matrix(v: &Value) -> Vec<Vec<f32>> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Largest |got - want| over equal-shaped matrices (shape checked).
fn max_diff(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    assert_eq!(got.len(), want.len(), "rows");
    assert!(!got.is_empty(), "no rows compared");
    got.iter()
        .zip(want)
        .flat_map(|(g, w)| {
            assert_eq!(g.len(), w.len(), "columns");
            g.iter().zip(w).map(|(a, b)| (a - b).abs())
        })
        .fold(0f32, f32::max)
}

fn check_embeddings(name: &str, key: &str, got: &[Vec<f32>]) {
    let r = reference();
    let want = matrix(&r["models"][name][key]);
    let d = max_diff(got, &want);
    println!(
        "{name} {key}: max |diff| {d:.2e} over {} x {}",
        want.len(),
        want[0].len()
    );
    assert!(d < TOL, "{name} {key}: max |diff| {d} >= {TOL}");
}

fn texts() -> Vec<String> {
    strings(&reference()["texts"])
}

/// `enc`'s query embeddings of the reference texts.
fn embed_texts(enc: &dyn TextEncoder) -> Result<Vec<Vec<f32>>> {
    let t = texts();
    let refs: Vec<&str> = t.iter().map(|s| s.as_str()).collect();
    Ok(enc.encode_texts(&refs)?.to_vec2()?)
}

#[test]
fn mpnet_sentence_transformers_embeddings_equal_reference() -> Result<()> {
    let enc = load_encoder(&model("mpnet-st"), &opts())?;
    check_embeddings("mpnet-st", "embeddings", &embed_texts(enc.as_ref())?);
    let fp = enc.fingerprint();
    assert_eq!(
        (fp.pooling.as_str(), fp.normalized, fp.dim),
        ("mean", true, 32)
    );
    Ok(())
}

#[test]
fn xlmr_embeddings_and_prompts_equal_reference() -> Result<()> {
    let enc = SentenceEncoder::load(&model("xlmr-st"), &opts())?;
    assert_eq!(enc.prefixes.query, "query: ");
    assert_eq!(enc.prefixes.passage, "passage: ");
    assert!(enc
        .prefixes
        .source
        .ends_with("config_sentence_transformers.json prompts"));
    let t = texts();
    let refs: Vec<&str> = t.iter().map(|s| s.as_str()).collect();
    // queries carry the query prompt, passages (no title) the passage prompt
    check_embeddings(
        "xlmr-st",
        "query_embeddings",
        &enc.encode_texts(&refs)?.to_vec2()?,
    );
    let titles = vec![""; refs.len()];
    let passages = enc.encode_passages(&titles, &refs)?.to_vec2()?;
    check_embeddings("xlmr-st", "passage_embeddings", &passages);
    // no prompt: prefixes overridden to empty
    let plain = SentenceEncoder::load(
        &model("xlmr-st"),
        &LoadOptions {
            prefixes: Some(Prefixes::default()),
            ..opts()
        },
    )?;
    check_embeddings(
        "xlmr-st",
        "embeddings",
        &plain.encode_texts(&refs)?.to_vec2()?,
    );
    assert_eq!(enc.fingerprint().prefixes, enc.prefixes);
    assert!(plain.fingerprint().prefixes.is_empty());
    Ok(())
}

#[test]
fn roberta_max_and_lasttoken_pooling_equal_reference() -> Result<()> {
    let enc = load_encoder(&model("roberta-st"), &opts())?;
    check_embeddings("roberta-st", "embeddings", &embed_texts(enc.as_ref())?);
    let fp = enc.fingerprint();
    assert_eq!(
        (fp.pooling.as_str(), fp.normalized, fp.dim),
        ("max+lasttoken", false, 64)
    );
    Ok(())
}

#[test]
fn int8_mpnet_stays_close() -> Result<()> {
    // The relative position bias also goes through the int8 path's fused attention.
    let int8 = load_encoder(
        &model("mpnet-st"),
        &LoadOptions {
            int8: true,
            ..opts()
        },
    )?;
    assert!(int8.fingerprint().int8);
    let want = matrix(&reference()["models"]["mpnet-st"]["embeddings"]);
    let d = max_diff(&embed_texts(int8.as_ref())?, &want);
    // normalised vectors; dynamic int8 of tiny random layers: a few 1e-2 at most
    assert!(d < 0.1, "int8 max diff {d}");
    Ok(())
}

#[test]
fn trainable_mpnet_composed_path_equals_reference() -> Result<()> {
    // Trainable weights run the composed (non-fused) layers, bias added to the mask there.
    let enc = SentenceEncoder::load(
        &model("mpnet-st"),
        &LoadOptions {
            trainable: true,
            ..opts()
        },
    )?;
    check_embeddings("mpnet-st", "embeddings", &embed_texts(&enc)?);
    Ok(())
}

fn check_tokenizer(model_dir: &str, key: &str) -> Result<()> {
    let r = reference();
    let enc = SentenceEncoder::load(&model(model_dir), &opts())?;
    let mut sample = strings(&r["multilingual"]);
    sample.extend(strings(&r["texts"]));
    let refs: Vec<&str> = sample.iter().map(|s| s.as_str()).collect();
    let got = enc
        .tokenizer
        .encode_batch(&refs, true, None, Padding::None)?
        .input_ids;
    let want: Vec<Vec<u32>> = serde_json::from_value(r["tokenizers"][key].clone())?;
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "{key} tokenizer, text {i}: {:?}", refs[i]);
    }
    Ok(())
}

#[test]
fn mpnet_tokenizer_equals_hf_on_multilingual_text() -> Result<()> {
    check_tokenizer("mpnet-st", "mpnet")
}

#[test]
fn xlmr_sentencepiece_tokenizer_equals_hf_on_multilingual_text() -> Result<()> {
    check_tokenizer("xlmr-st", "xlmr")
}

fn check_cross_encoder(name: &str) -> Result<()> {
    let r = reference();
    let pairs: Vec<(String, String)> = serde_json::from_value(r["pairs"].clone())?;
    let refs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(q, p)| (q.as_str(), p.as_str()))
        .collect();
    let ce = CrossEncoder::load(&model(name), &opts())?;
    let got = ce.score_pairs(&refs)?;
    let want: Vec<f32> = serde_json::from_value(r["cross_encoders"][name].clone())?;
    let d = max_diff(std::slice::from_ref(&got), std::slice::from_ref(&want));
    println!("{name}: max |logit diff| {d:.2e} over {} pairs", want.len());
    assert!(d < TOL, "{name}: logits {got:?} vs {want:?}");
    // and the order a reranker takes from them
    let order = |s: &[f32]| {
        let mut o: Vec<usize> = (0..s.len()).collect();
        o.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
        o
    };
    assert_eq!(order(&got), order(&want));
    Ok(())
}

#[test]
fn bert_cross_encoder_scores_equal_reference() -> Result<()> {
    check_cross_encoder("bert-ce")
}

#[test]
fn xlmr_cross_encoder_scores_equal_reference() -> Result<()> {
    check_cross_encoder("xlmr-ce")
}

/// A copy of a fixture directory in a temp dir, to break.
fn copy_fixture(name: &str) -> Result<tempfile::TempDir> {
    let tmp = tempfile::tempdir()?;
    for e in std::fs::read_dir(fixtures().join(name))? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), tmp.path().join(e.file_name()))?;
        } else {
            let sub = tmp.path().join(e.file_name());
            std::fs::create_dir(&sub)?;
            for f in std::fs::read_dir(e.path())? {
                let f = f?;
                std::fs::copy(f.path(), sub.join(f.file_name()))?;
            }
        }
    }
    Ok(tmp)
}

fn edit_config(dir: &std::path::Path, edit: impl FnOnce(&mut Value)) -> Result<()> {
    let path = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string(&v)?)?;
    Ok(())
}

#[test]
fn unsupported_model_type_names_the_supported_ones() -> Result<()> {
    let tmp = copy_fixture("mpnet-st")?;
    edit_config(tmp.path(), |v| v["model_type"] = "deberta-v2".into())?;
    let err = match load_encoder(&tmp.path().display().to_string(), &opts()) {
        Ok(_) => panic!("deberta-v2 loaded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("config.json"), "{err}");
    assert!(err.contains("`deberta-v2` is not supported"), "{err}");
    assert!(err.contains("bert, roberta, xlm-roberta, mpnet"), "{err}");
    Ok(())
}

#[test]
fn tokenizer_larger_than_the_embedding_table_is_an_error_naming_both_files() -> Result<()> {
    let tmp = copy_fixture("xlmr-st")?;
    edit_config(tmp.path(), |v| v["vocab_size"] = 100.into())?;
    let err = match load_encoder(&tmp.path().display().to_string(), &opts()) {
        Ok(_) => panic!("loaded with a vocabulary larger than the model"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("tokenizer.json"), "{err}");
    assert!(err.contains("vocab_size 100"), "{err}");
    assert!(err.contains("config.json"), "{err}");
    // the same for a cross-encoder
    let tmp = copy_fixture("bert-ce")?;
    edit_config(tmp.path(), |v| v["vocab_size"] = 50.into())?;
    let err = match CrossEncoder::load(&tmp.path().display().to_string(), &opts()) {
        Ok(_) => panic!("cross-encoder loaded with a vocabulary larger than the model"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("tokenizer.json") && err.contains("vocab_size 50"),
        "{err}"
    );
    Ok(())
}

#[test]
fn cross_encoder_bad_input_is_refused() -> Result<()> {
    // an embedder is not a cross-encoder, and a cross-encoder is not an embedder
    let err = CrossEncoder::load(&model("mpnet-st"), &opts())
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("not a supported cross-encoder"),
        "{err:#}"
    );
    let err = load_encoder(&model("xlmr-ce"), &opts()).err().unwrap();
    assert!(
        format!("{err:#}").contains("pass it as `--rerank`"),
        "{err:#}"
    );
    // two labels
    let tmp = copy_fixture("bert-ce")?;
    edit_config(tmp.path(), |v| {
        v["id2label"] = serde_json::json!({"0": "no", "1": "yes"});
    })?;
    let err = CrossEncoder::load(&tmp.path().display().to_string(), &opts())
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("num_labels 1"), "{err:#}");
    // a missing head tensor names it
    let tmp = copy_fixture("xlmr-ce")?;
    let st = tmp.path().join("model.safetensors");
    let tensors = candle_core::safetensors::load(&st, &Device::Cpu)?;
    let kept: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .filter(|(k, _)| !k.starts_with("classifier.out_proj"))
        .collect();
    candle_core::safetensors::save(&kept, &st)?;
    let err = CrossEncoder::load(&tmp.path().display().to_string(), &opts())
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("out_proj"), "{err:#}");
    Ok(())
}

#[test]
fn pooling_config_with_include_prompt_false_is_refused() -> Result<()> {
    let tmp = copy_fixture("mpnet-st")?;
    std::fs::write(
        tmp.path().join("1_Pooling/config.json"),
        r#"{"embedding_dimension": 32, "pooling_mode": "mean", "include_prompt": false}"#,
    )?;
    let err = load_encoder(&tmp.path().display().to_string(), &opts())
        .err()
        .unwrap();
    let err = format!("{err:#}");
    assert!(
        err.contains("1_Pooling") && err.contains("include_prompt"),
        "{err}"
    );
    // legacy flags keep working: mean via pooling_mode_mean_tokens
    std::fs::write(
        tmp.path().join("1_Pooling/config.json"),
        r#"{"word_embedding_dimension": 32, "pooling_mode_mean_tokens": true}"#,
    )?;
    let enc = load_encoder(&tmp.path().display().to_string(), &opts())?;
    check_embeddings("mpnet-st", "embeddings", &embed_texts(enc.as_ref())?);
    Ok(())
}

#[test]
fn reranking_retriever_keeps_the_cross_encoders_top_k() -> Result<()> {
    use rustrag::kb::Passage;
    use rustrag::retrieve::bm25::{build_index, Bm25Config, Bm25Params, Bm25Retriever};
    use rustrag::retrieve::rerank::{RerankConfig, RerankingRetriever};
    use rustrag::retrieve::Retriever;
    let texts = [
        (
            "Broncos",
            "The Denver Broncos won Super Bowl 50 against the Carolina Panthers.",
        ),
        (
            "Panthers",
            "The Carolina Panthers lost Super Bowl 50 to the Broncos.",
        ),
        (
            "Normandy",
            "Normandy is a region in France named after the Normans.",
        ),
        (
            "Super Bowl",
            "Super Bowl 50 was played in Santa Clara, California.",
        ),
        (
            "Football",
            "The National Football League decides its champion in the Super Bowl.",
        ),
        ("Paris", "Paris is the capital of France."),
    ];
    let passages: Vec<Passage> = (texts.iter().enumerate())
        .map(|(i, (title, text))| Passage {
            id: format!("p{i}"),
            title: title.to_string(),
            text: text.to_string(),
        })
        .collect();
    let dir = tempfile::tempdir()?;
    build_index(dir.path(), &passages, &Bm25Config::default())?;
    let first = Bm25Retriever::open(dir.path(), Bm25Params::default())?;
    let queries = ["who won super bowl 50", "region of france"];
    let config = RerankConfig {
        batch_size: 4,
        ..RerankConfig::new(&model("bert-ce"), 6)
    };
    let reranking = RerankingRetriever::from_config(Box::new(first), &config)?;
    let hits = reranking.retrieve(&queries, None, 3)?;
    let ce = CrossEncoder::load(&model("bert-ce"), &opts())?;
    let first = Bm25Retriever::open(dir.path(), Bm25Params::default())?;
    let candidates = first.retrieve(&queries, None, 6)?;
    for ((q, h), c) in queries.iter().zip(&hits).zip(&candidates) {
        // every first-stage candidate scored as "title text", the best 3 kept in order
        let joined: Vec<String> = (c.passages.iter())
            .map(|p| format!("{} {}", p.title, p.text))
            .collect();
        let pairs: Vec<(&str, &str)> = joined.iter().map(|p| (*q, p.as_str())).collect();
        let scores = ce.score_pairs(&pairs)?;
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        // BM25 returns only passages sharing a term with the query
        let keep = 3.min(c.doc_ids.len());
        assert!(keep >= 2, "{q}: {} candidates", c.doc_ids.len());
        let want_ids: Vec<u64> = order[..keep].iter().map(|&i| c.doc_ids[i]).collect();
        assert_eq!(h.doc_ids, want_ids, "{q}");
        for (j, &i) in order[..keep].iter().enumerate() {
            assert!((h.scores[j] - scores[i]).abs() < 1e-6, "{q}: score {j}");
            assert_eq!(h.passages[j].id, c.passages[i].id);
        }
        assert!(
            h.scores.windows(2).all(|w| w[0] >= w[1]),
            "{q}: not best first"
        );
    }
    // bounds are checked before anything loads
    let bad = RerankConfig::new(&model("bert-ce"), 0).check().unwrap_err();
    assert!(format!("{bad}").contains("candidates 0"), "{bad}");
    let bad = RerankConfig {
        temperature: 0.0,
        ..RerankConfig::new(&model("bert-ce"), 5)
    }
    .check()
    .unwrap_err();
    assert!(format!("{bad}").contains("temperature"), "{bad}");
    Ok(())
}

fn rustrag(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rustrag"))
        .args(args)
        .output()
        .expect("run rustrag");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn kb_records_prefixes_and_queries_with_them_and_reranks() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let corpus = tmp.path().join("corpus.jsonl");
    let docs = [
        ("d1", "Broncos", "The Denver Broncos won Super Bowl 50."),
        ("d2", "Normandy", "Normandy is a region in France."),
        ("d3", "Moscow", "Москва — столица России."),
        ("d4", "Tokyo", "東京は日本の首都です。"),
    ];
    let lines: Vec<String> = (docs.iter())
        .map(|(id, t, x)| serde_json::json!({"_id": id, "title": t, "text": x}).to_string())
        .collect();
    std::fs::write(&corpus, lines.join("\n"))?;
    let kb = tmp.path().join("kb");
    let (kb_s, corpus_s) = (kb.display().to_string(), corpus.display().to_string());
    let enc = model("xlmr-st");
    let (ok, _, err) = rustrag(&[
        "index",
        "build",
        "--corpus",
        &corpus_s,
        "--encoder",
        &enc,
        "--out",
        &kb_s,
    ]);
    assert!(ok, "{err}");
    let m = rustrag::kb::KnowledgeBase::open(&kb)?.manifest().clone();
    assert_eq!(m.encoder.prefixes.query, "query: ");
    assert_eq!(m.encoder.prefixes.passage, "passage: ");
    // the stored vectors are the passage-prefixed ones
    let st = SentenceEncoder::load(&enc, &opts())?;
    let want = st.encode_passages(&["Broncos"], &["The Denver Broncos won Super Bowl 50."])?;
    let kb_open = rustrag::kb::KnowledgeBase::open(&kb)?;
    let mut row = Vec::new();
    kb_open.embeddings().rows_f32_into(0, 1, &mut row);
    let d = max_diff(&[row], &want.to_vec2()?);
    assert!(d < 1e-6, "KB row 0 vs passage-prefixed embedding: {d}");
    // queried through the manifest (prefix applied), reranked
    let q = "who won super bowl 50";
    let (ok, out, err) = rustrag(&[
        "--json",
        "retrieve",
        "--kb",
        &kb_s,
        "--query",
        q,
        "--k",
        "2",
        "--rerank",
        &model("xlmr-ce"),
        "--rerank-candidates",
        "4",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out)?;
    assert_eq!(v["rerank"]["candidates"], 4);
    let hits = v["results"][0]["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 2);
    // scores are the cross-encoder's logits for (query, title + text)
    let ce = CrossEncoder::load(&model("xlmr-ce"), &opts())?;
    for h in hits {
        let text = format!(
            "{} {}",
            h["title"].as_str().unwrap(),
            h["text"].as_str().unwrap()
        );
        let s = ce.score_pairs(&[(q, text.as_str())])?[0];
        assert!(
            (h["score"].as_f64().unwrap() as f32 - s).abs() < 1e-5,
            "{h}"
        );
    }
    // the same weights without the prompts: refused, naming both prefixes
    let bare = copy_fixture("xlmr-st")?;
    std::fs::remove_file(bare.path().join("config_sentence_transformers.json"))?;
    let (ok, _, err) = rustrag(&[
        "retrieve",
        "--kb",
        &kb_s,
        "--query",
        q,
        "--encoder",
        &bare.path().display().to_string(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("\"query: \"") && err.contains("query prefix"),
        "{err}"
    );
    // and adding passages with it would mix passage prefixes: refused
    let (ok, _, err) = rustrag(&[
        "index",
        "add",
        "--kb",
        &kb_s,
        "--corpus",
        &corpus_s,
        "--upsert",
        "--encoder",
        &bare.path().display().to_string(),
    ]);
    assert!(!ok);
    assert!(err.contains("passage prefix"), "{err}");
    Ok(())
}
