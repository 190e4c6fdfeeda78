//! `encoders` case: standalone DPRQuestionEncoder / DPRContextEncoder and a plain BertModel with
//! mean pooling (see the parity README, "encoders/expected.json").

use crate::common::{flat, Checker, Fixture, HIDDEN};
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use rustrag::encoders::bert::l2_normalize;
use rustrag::encoders::{DprEncoder, LoadOptions, Pooling, SentenceEncoder, TextEncoder};
use rustrag::tokenize::{ids_tensor, Encoded};

fn opts() -> LoadOptions {
    LoadOptions {
        device: Device::Cpu,
        ..Default::default()
    }
}

fn model_dir(fx: &Fixture, key: &str) -> Result<String> {
    let rel = fx
        .get(&format!("paths/{key}"))?
        .as_str()
        .context("path is not a string")?;
    Ok(fx.dir.join(rel).display().to_string())
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

/// Pad unpadded rows to `width` (ids with `pad`, mask/type 0) for comparison with HF's padded output.
/// `(input_ids, attention_mask, token_type_ids)`, each `[rows][width]`.
type Rows3 = (Vec<Vec<u32>>, Vec<Vec<u32>>, Vec<Vec<u32>>);

fn padded(enc: &Encoded, width: usize, pad: u32) -> Rows3 {
    let fill = |rows: &[Vec<u32>], v: u32| -> Vec<Vec<u32>> {
        rows.iter()
            .map(|r| {
                let mut r = r.clone();
                r.resize(width.max(r.len()), v);
                r
            })
            .collect()
    };
    (
        fill(&enc.input_ids, pad),
        fill(&enc.attention_mask, 0),
        fill(&enc.type_ids, 0),
    )
}

fn check_ids(c: &mut Checker, name: &str, got: &[Vec<u32>], expected: &[Vec<u32>]) {
    c.ids(name, got, expected);
}

/// Fixture `[rows][cols]` ids as a u32 tensor.
fn ids_t(fx: &Fixture, path: &str) -> Result<Tensor> {
    ids_tensor(&fx.ids2(path)?, &Device::Cpu)
}

pub fn check(fx: &Fixture, c: &mut Checker) {
    question_encoder(fx, c);
    ctx_encoder(fx, c);
    bert_mean(fx, c);
}

fn question_encoder(fx: &Fixture, c: &mut Checker) {
    let enc = match model_dir(fx, "question_encoder").and_then(|d| DprEncoder::load(&d, &opts())) {
        Ok(e) => e,
        Err(e) => return c.check("question_encoder: load", || Err(e)),
    };
    let texts = match fx.strings("question_encoder/texts") {
        Ok(t) => t,
        Err(e) => return c.check("question_encoder: texts", || Err(e)),
    };
    let texts = strs(&texts);
    c.check("question_encoder: input_ids / attention_mask", || {
        let want_ids = fx.ids2("question_encoder/input_ids")?;
        let want_mask = fx.ids2("question_encoder/attention_mask")?;
        let width = want_ids.first().map_or(0, |r| r.len());
        let (ids, mask, _) = padded(
            &enc.tokenize(&texts)?,
            width,
            enc.tokenizer.special.pad.unwrap_or(0),
        );
        anyhow::ensure!(
            ids == want_ids,
            "input_ids differ:\n  got      {ids:?}\n  expected {want_ids:?}"
        );
        anyhow::ensure!(
            mask == want_mask,
            "attention_mask differ:\n  got      {mask:?}\n  expected {want_mask:?}"
        );
        Ok(())
    });
    let expected = fx
        .f32s("question_encoder/pooled_output")
        .unwrap_or_default();
    match (|| -> Result<Vec<f32>> {
        let ids = ids_t(fx, "question_encoder/input_ids")?;
        let mask = ids_t(fx, "question_encoder/attention_mask")?;
        flat(&enc.encode_ids(&ids, Some(&mask), None)?)
    })() {
        Ok(got) => c.close(
            "question_encoder: pooled_output (fixture ids, batched)",
            &got,
            &expected,
            HIDDEN,
        ),
        Err(e) => c.check(
            "question_encoder: pooled_output (fixture ids, batched)",
            || Err(e),
        ),
    }
    match enc.encode_texts(&texts).and_then(|t| flat(&t)) {
        Ok(got) => c.close(
            "question_encoder: pooled_output (encode_texts)",
            &got,
            &expected,
            HIDDEN,
        ),
        Err(e) => c.check("question_encoder: pooled_output (encode_texts)", || Err(e)),
    }
    match (|| -> Result<Vec<f32>> {
        let mut all = Vec::new();
        for t in &texts {
            all.extend(flat(&enc.encode_texts(&[t])?)?);
        }
        Ok(all)
    })() {
        Ok(got) => {
            let want = fx
                .f32s("question_encoder/pooled_output_unbatched")
                .unwrap_or_default();
            c.close(
                "question_encoder: pooled_output_unbatched",
                &got,
                &want,
                HIDDEN,
            )
        }
        Err(e) => c.check("question_encoder: pooled_output_unbatched", || Err(e)),
    }
}

fn ctx_encoder(fx: &Fixture, c: &mut Checker) {
    let enc = match model_dir(fx, "ctx_encoder").and_then(|d| DprEncoder::load(&d, &opts())) {
        Ok(e) => e,
        Err(e) => return c.check("ctx_encoder: load", || Err(e)),
    };
    let (titles, texts) = match (
        fx.strings("ctx_encoder/titles"),
        fx.strings("ctx_encoder/texts"),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return c.check("ctx_encoder: titles/texts", || Err(e)),
    };
    let (titles, texts) = (strs(&titles), strs(&texts));
    match (|| -> Result<_> {
        let want = fx.ids2("ctx_encoder/input_ids")?;
        let width = want.first().map_or(0, |r| r.len());
        Ok(padded(
            &enc.tokenize_pairs(&titles, &texts)?,
            width,
            enc.tokenizer.special.pad.unwrap_or(0),
        ))
    })() {
        Ok((ids, mask, types)) => {
            for (name, got) in [
                ("input_ids", ids),
                ("attention_mask", mask),
                ("token_type_ids", types),
            ] {
                match fx.ids2(&format!("ctx_encoder/{name}")) {
                    Ok(want) => check_ids(c, &format!("ctx_encoder: {name}"), &got, &want),
                    Err(e) => c.check(&format!("ctx_encoder: {name}"), || Err(e)),
                }
            }
        }
        Err(e) => c.check("ctx_encoder: tokenization", || Err(e)),
    }
    let tensors = || -> Result<(Tensor, Tensor, Tensor)> {
        Ok((
            ids_t(fx, "ctx_encoder/input_ids")?,
            ids_t(fx, "ctx_encoder/attention_mask")?,
            ids_t(fx, "ctx_encoder/token_type_ids")?,
        ))
    };
    type Run<'a> = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + 'a>;
    let runs: [(&str, Run); 3] = [
        (
            "pooled_output_with_attention_mask",
            Box::new(|i, m, _| enc.encode_ids(i, Some(m), None)),
        ),
        (
            "pooled_output_input_ids_only",
            Box::new(|i, _, _| enc.encode_ids(i, None, None)),
        ),
        (
            "pooled_output_with_token_type_ids",
            Box::new(|i, m, t| enc.encode_ids(i, Some(m), Some(t))),
        ),
    ];
    for (field, run) in runs {
        let name = format!("ctx_encoder: {field}");
        match tensors().and_then(|(i, m, t)| flat(&run(&i, &m, &t)?)) {
            Ok(got) => match fx.f32s(&format!("ctx_encoder/{field}")) {
                Ok(want) => c.close(&name, &got, &want, HIDDEN),
                Err(e) => c.check(&name, || Err(e)),
            },
            Err(e) => c.check(&name, || Err(e)),
        }
    }
    // KB-building path from raw strings (pairs, types 0) = the input-ids-only reference.
    match enc.encode_pairs(&titles, &texts).and_then(|t| flat(&t)) {
        Ok(got) => {
            let want = fx
                .f32s("ctx_encoder/pooled_output_input_ids_only")
                .unwrap_or_default();
            c.close(
                "ctx_encoder: encode_pairs = pooled_output_input_ids_only",
                &got,
                &want,
                HIDDEN,
            )
        }
        Err(e) => c.check("ctx_encoder: encode_pairs", || Err(e)),
    }
}

fn bert_mean(fx: &Fixture, c: &mut Checker) {
    let want_ids = match fx.ids2("bert_mean/input_ids") {
        Ok(v) => v,
        Err(e) => return c.check("bert_mean: input_ids", || Err(e)),
    };
    // HF padded to the longest row after truncating at max_length; truncating at that width
    // gives the same ids whatever max_length was (<= width).
    let width = want_ids.first().map_or(0, |r| r.len());
    let load = |normalize: bool| -> Result<SentenceEncoder> {
        let o = LoadOptions {
            pooling: Some(Pooling::Mean),
            normalize: Some(normalize),
            max_length: Some(width),
            ..opts()
        };
        SentenceEncoder::load(&model_dir(fx, "bert_mean")?, &o)
    };
    let (plain, normed) = match (load(false), load(true)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return c.check("bert_mean: load", || Err(e)),
    };
    let sentences = match fx.strings("bert_mean/sentences") {
        Ok(s) => s,
        Err(e) => return c.check("bert_mean: sentences", || Err(e)),
    };
    let sentences = strs(&sentences);
    match plain.tokenize(&sentences) {
        Ok(enc) => {
            let (ids, mask, types) = padded(&enc, width, plain.tokenizer.special.pad.unwrap_or(0));
            for (name, got) in [
                ("input_ids", ids),
                ("attention_mask", mask),
                ("token_type_ids", types),
            ] {
                match fx.ids2(&format!("bert_mean/{name}")) {
                    Ok(want) => check_ids(c, &format!("bert_mean: {name}"), &got, &want),
                    Err(e) => c.check(&format!("bert_mean: {name}"), || Err(e)),
                }
            }
        }
        Err(e) => c.check("bert_mean: tokenization", || Err(e)),
    }
    let hidden = (|| -> Result<(Tensor, Tensor)> {
        let ids = ids_t(fx, "bert_mean/input_ids")?;
        let mask = ids_t(fx, "bert_mean/attention_mask")?;
        let types = ids_t(fx, "bert_mean/token_type_ids")?;
        Ok((plain.model.forward(&ids, &mask, Some(&types))?, mask))
    })();
    let (hidden, mask) = match hidden {
        Ok(h) => h,
        Err(e) => return c.check("bert_mean: forward", || Err(e)),
    };
    let mean = Pooling::Mean.apply(&hidden, &mask);
    let cases: [(&str, Result<Tensor>); 4] = [
        (
            "mean_pooled",
            mean.as_ref()
                .map(|t| t.clone())
                .map_err(|e| anyhow::anyhow!("{e:#}")),
        ),
        (
            "mean_pooled_normalized",
            mean.and_then(|m| l2_normalize(&m)),
        ),
        ("pooler_output", plain.model.pool(&hidden)),
        (
            "last_hidden_state_sentence0",
            (|| -> Result<Tensor> {
                let len0 = fx
                    .get("bert_mean/last_hidden_state_sentence0")?
                    .as_array()
                    .map_or(0, |a| a.len());
                Ok(hidden.get(0)?.narrow(0, 0, len0)?)
            })(),
        ),
    ];
    for (field, got) in cases {
        let name = format!("bert_mean: {field}");
        match (
            got.and_then(|t| flat(&t)),
            fx.f32s(&format!("bert_mean/{field}")),
        ) {
            (Ok(got), Ok(want)) => c.close(&name, &got, &want, HIDDEN),
            (Err(e), _) | (_, Err(e)) => c.check(&name, || Err(e)),
        }
    }
    // The encoder API from raw strings (length-sorted batches, pooling, normalisation).
    for (enc, field) in [(&plain, "mean_pooled"), (&normed, "mean_pooled_normalized")] {
        let name = format!("bert_mean: encode_texts = {field}");
        match (
            enc.encode_texts(&sentences).and_then(|t| flat(&t)),
            fx.f32s(&format!("bert_mean/{field}")),
        ) {
            (Ok(got), Ok(want)) => c.close(&name, &got, &want, HIDDEN),
            (Err(e), _) | (_, Err(e)) => c.check(&name, || Err(e)),
        }
    }
}
