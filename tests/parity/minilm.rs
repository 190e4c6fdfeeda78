//! `minilm-real` case: the real sentence-transformers/all-MiniLM-L6-v2 (weights are not in the
//! fixture: they are read from `$RUSTRAG_MODELS/all-MiniLM-L6-v2`, default `<crate>/models`).
//!
//! The reference embeddings were computed with `max_length=128` (what the shipped tokenizer.json
//! would do); `hf_default_truncation_variant` with 512 (transformers' model_max_length). Our
//! encoder's own default is sentence_bert_config.json's `max_seq_length` (256), as
//! sentence-transformers uses; both references are reproduced by setting the limit explicitly.

use crate::common::{flat, Checker, Fixture, HIDDEN};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use rustrag::encoders::bert::l2_normalize;
use rustrag::encoders::{LoadOptions, Pooling, SentenceEncoder, TextEncoder};
use std::path::PathBuf;

/// `$RUSTRAG_MODELS/all-MiniLM-L6-v2` (default `<crate>/models/all-MiniLM-L6-v2`).
pub fn minilm_dir() -> PathBuf {
    let root = std::env::var("RUSTRAG_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"));
    root.join("all-MiniLM-L6-v2")
}

fn load(max_length: Option<usize>) -> Result<SentenceEncoder> {
    let dir = minilm_dir();
    if !dir.join("model.safetensors").is_file() {
        bail!(
            "real model missing: {} has no model.safetensors (run scripts/fetch-models.sh or set RUSTRAG_MODELS)",
            dir.display()
        );
    }
    SentenceEncoder::load(
        &dir.display().to_string(),
        &LoadOptions {
            device: Device::Cpu,
            max_length,
            ..Default::default()
        },
    )
}

pub fn check(fx: &Fixture, c: &mut Checker) {
    let sentences = match fx.strings("sentences") {
        Ok(s) => s,
        Err(e) => return c.check("sentences", || Err(e)),
    };
    let sentences: Vec<&str> = sentences.iter().map(|s| s.as_str()).collect();
    let want_ids = match fx.ids2("input_ids") {
        Ok(v) => v,
        Err(e) => return c.check("input_ids", || Err(e)),
    };
    // The references truncate at 128 (the longest recorded row has exactly that many tokens).
    let ref_len = want_ids.iter().map(|r| r.len()).max().unwrap_or(0);
    let default = match load(None) {
        Ok(e) => e,
        Err(e) => return c.check("load all-MiniLM-L6-v2", || Err(e)),
    };
    c.check(
        "default max_length = sentence_bert_config.json max_seq_length (not tokenizer.json's 128)",
        || {
            let v: serde_json::Value =
                rustrag::hub::read_json(&minilm_dir().join("sentence_bert_config.json"))?;
            let want = v
                .get("max_seq_length")
                .and_then(|m| m.as_u64())
                .context("no max_seq_length")? as usize;
            anyhow::ensure!(
                default.max_length == want,
                "max_length {} != max_seq_length {want}",
                default.max_length
            );
            anyhow::ensure!(
                default.poolings == vec![Pooling::Mean] && default.normalize,
                "expected mean pooling + Normalize"
            );
            Ok(())
        },
    );
    c.check(
        "tokenizer_json_settings/truncation/max_length = the references' length",
        || {
            let m = fx.usize("tokenizer_json_settings/truncation/max_length")?;
            anyhow::ensure!(m == ref_len, "{m} vs the longest recorded row {ref_len}");
            Ok(())
        },
    );
    c.check("package/model_safetensors_bytes", || {
        let want = fx.usize("package/model_safetensors_bytes")? as u64;
        let got = std::fs::metadata(minilm_dir().join("model.safetensors"))?.len();
        anyhow::ensure!(got == want, "{got} bytes, expected {want}");
        Ok(())
    });
    let enc = match load(Some(ref_len)) {
        Ok(e) => e,
        Err(e) => return c.check("load all-MiniLM-L6-v2", || Err(e)),
    };
    match enc.tokenize(&sentences) {
        Ok(got) => c.ids(
            "input_ids (truncation at the reference length)",
            &got.input_ids,
            &want_ids,
        ),
        Err(e) => c.check("input_ids", || Err(e)),
    }
    c.check("embedding_dim", || {
        let want = fx.usize("embedding_dim")?;
        anyhow::ensure!(enc.dim() == want, "dim {} != {want}", enc.dim());
        Ok(())
    });
    let emb = match enc.encode_texts(&sentences) {
        Ok(e) => e,
        Err(e) => return c.check("encode_texts", || Err(e)),
    };
    let first8 = |t: &candle_core::Tensor| -> Result<Vec<f32>> { flat(&t.narrow(1, 0, 8)?) };
    // Unnormalised mean pooling from the same batch path.
    let mean = (|| -> Result<candle_core::Tensor> {
        let tok = enc.tokenize(&sentences)?;
        let pad = enc.tokenizer.special.pad.unwrap_or(0);
        rustrag::encoders::bert::run_sorted_batches(&tok, enc.batch_size, pad, &Device::Cpu, |b| {
            let h = enc
                .model
                .forward(&b.input_ids, &b.attention_mask, Some(&b.token_type_ids))?;
            Pooling::Mean.apply(&h, &b.attention_mask)
        })
    })();
    let checks: Vec<(&str, Result<Vec<f32>>)> = vec![
        ("embeddings_normalized", flat(&emb)),
        ("embeddings_normalized_first8", first8(&emb)),
        (
            "mean_pooled_first8",
            mean.as_ref()
                .map_err(|e| anyhow::anyhow!("{e:#}"))
                .and_then(first8),
        ),
        (
            "mean_pooled_l2_norm",
            mean.as_ref()
                .map_err(|e| anyhow::anyhow!("{e:#}"))
                .and_then(|m| flat(&m.sqr()?.sum(1)?.sqrt()?)),
        ),
        (
            "cosine_similarity_matrix",
            (|| flat(&l2_normalize(&emb)?.matmul(&l2_normalize(&emb)?.t()?)?))(),
        ),
    ];
    for (field, got) in checks {
        match (got, fx.f32s(field)) {
            (Ok(got), Ok(want)) => c.close(field, &got, &want, HIDDEN),
            (Err(e), _) | (_, Err(e)) => c.check(field, || Err(e)),
        }
    }
    {
        c.check(
            "hf_default_truncation_variant: token_counts + embeddings_normalized_first8",
            || {
                let counts = fx.ids1("hf_default_truncation_variant/token_counts")?;
                let limit = enc
                    .tokenizer
                    .max_length
                    .min(enc.model.config().max_position_embeddings);
                let variant = load(Some(limit))?;
                let tok = variant.tokenize(&sentences)?;
                let got_counts: Vec<u32> = tok.input_ids.iter().map(|r| r.len() as u32).collect();
                anyhow::ensure!(
                    got_counts == counts,
                    "token counts {got_counts:?} != {counts:?}"
                );
                let got = first8(&variant.encode_texts(&sentences)?)?;
                let want = fx.f32s("hf_default_truncation_variant/embeddings_normalized_first8")?;
                crate::common::compare(&got, &want, HIDDEN)
            },
        );
    }
}
