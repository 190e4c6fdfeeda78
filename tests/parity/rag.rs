//! RAG cases: identity and settings, question tokenization/encoding, the KB (tokenization and
//! embeddings recomputed with the context encoder), targets built from the answers, retrieval,
//! context strings and ids, forward logits, marginalisation, every NLL flag combination, gradients
//! (incl. end-to-end through the context encoder), the external-retriever path, every generate call
//! (exact ids and decoded strings) incl. RAG-Sequence thorough-decoding details, the stored
//! generation configs and the reload check. Every section is required: a missing one fails.

use crate::common::{
    flat, Checker, Fixture, Tol, GRAD_DOC, GRAD_PARAM, HF_NOISE_FACTOR, HIDDEN, LOGPROB, LOSS,
    SCORE, SCORE_GAP, ZERO_GRADIENT_NOISE,
};
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use rustrag::rag::checkpoint::{load_rag, LoadOptions};
use rustrag::rag::loss::{self, NllOptions};
use rustrag::rag::{GenerationSettings, InMemoryIndex, RagContext, RagMode, RagModel};
use rustrag::tokenize::{ids_tensor, Padding};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};

/// Parameters whose gradient is mathematically zero, so both sides hold float noise only: attention
/// key biases (they add `q·b` to every score of a query row and softmax is shift-invariant), and in
/// the end-to-end loss the context encoder's last output LayerNorm bias (it shifts every doc
/// embedding by the same vector; the doc prior is a softmax over docs). Checked to be below
/// [`ZERO_GRADIENT_NOISE`] × the largest norm of the map on both sides.
pub fn zero_gradient(path: &str, name: &str, last_layer: Option<usize>) -> bool {
    name.ends_with("self_attn.k_proj.bias")
        || name.ends_with("encoder_attn.k_proj.bias")
        || name.ends_with("attention.self.key.bias")
        || (path.starts_with("end_to_end/")
            && last_layer
                .is_some_and(|l| name.ends_with(&format!(".layer.{l}.output.LayerNorm.bias"))))
}

/// Tolerance of a parameter's gradient: generator parameters get float32 backprop noise only;
/// encoder parameters receive their gradient through d loss / d doc_scores (see [`GRAD_DOC`]).
fn grad_tol(name: &str, doc: Tol) -> Tol {
    if name.contains("generator") {
        GRAD_PARAM
    } else {
        doc
    }
}

fn rtol(t: Tol) -> f64 {
    match t {
        Tol::Rel { rtol } | Tol::Elem { rtol, .. } => rtol,
    }
}

/// HF errors recorded in `generation/*/error` and what our error must say for the same call:
/// (start of HF's message, substrings our message must contain).
const EXPECTED_ERRORS: &[(&str, &[&str])] = &[(
    "RuntimeError: selected index k out of range",
    &["num_return_sequences", "distinct candidates"],
)];

pub fn check(fx: &Fixture, manifest: &Value, c: &mut Checker) {
    identity(fx, c);
    let load = |p: &str| -> Result<std::path::PathBuf> { Ok(fx.dir.join(fx.str(p)?)) };
    let model = match load("paths/rag").and_then(|d| {
        load_rag(
            &d.to_string_lossy(),
            &LoadOptions {
                trainable: true,
                ..Default::default()
            },
        )
    }) {
        Ok(m) => m,
        Err(e) => return c.check("load rag checkpoint", || Err(e)),
    };
    let index = match (|| {
        InMemoryIndex::load(&load("paths/kb_passages")?, &load("paths/kb_embeddings")?)
    })() {
        Ok(i) => i,
        Err(e) => return c.check("load kb", || Err(e)),
    };
    c.check("paths/tensors", || {
        ensure!(
            fx.str("paths/tensors")? == "tensors.safetensors",
            "tensors are read from tensors.safetensors"
        );
        Ok(())
    });
    settings(fx, manifest, c, &model, &index);
    questions(fx, manifest, c, &model);
    kb(fx, c, &index);
    targets(fx, c, &model);
    let Some(ctx) = retrieval(fx, c, &model, &index) else {
        return;
    };
    forward(fx, c, &model, &ctx);
    nll(fx, c, &model, &ctx);
    gradients(fx, c, &model, &index);
    external(fx, c, &model);
    generation(fx, manifest, c, &model, &ctx);
    generation_configs(fx, c, &model);
    reload_check(fx, c, &model, &ctx);
    bad_input(fx, c, &model, &index);
}

/// Class names: the only classes this suite knows how to run.
fn identity(fx: &Fixture, c: &mut Checker) {
    for (path, allowed) in [
        (
            "model_class",
            &["RagTokenForGeneration", "RagSequenceForGeneration"][..],
        ),
        (
            "generator_class",
            &["BartForConditionalGeneration", "T5ForConditionalGeneration"][..],
        ),
        ("question_encoder_class", &["DPRQuestionEncoder"][..]),
        ("ctx_encoder_class", &["DPRContextEncoder"][..]),
    ] {
        c.check(path, || {
            let v = fx.str(path)?;
            ensure!(allowed.contains(&v.as_str()), "unknown class `{v}`");
            Ok(())
        });
    }
}

fn generator_type(m: &RagModel) -> String {
    m.config
        .generator
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string()
}

fn settings(fx: &Fixture, manifest: &Value, c: &mut Checker, m: &RagModel, index: &InMemoryIndex) {
    c.check("model_class / generator_class vs the checkpoint", || {
        let want_mode = match fx.str("model_class")?.as_str() {
            "RagTokenForGeneration" => RagMode::Token,
            _ => RagMode::Sequence,
        };
        ensure!(
            m.mode == want_mode,
            "mode {:?}, expected {want_mode:?}",
            m.mode
        );
        let gen = fx.str("generator_class")?;
        let ty = generator_type(m);
        ensure!(
            gen.to_lowercase().starts_with(&ty),
            "generator model_type `{ty}` vs {gen}"
        );
        let qe = m
            .config
            .question_encoder
            .get("model_type")
            .and_then(|v| v.as_str());
        ensure!(qe == Some("dpr"), "question encoder model_type {qe:?}");
        Ok(())
    });
    c.check("settings", || {
        let p = |k: &str| {
            manifest
                .get("profile")
                .and_then(|p| p.get(k))
                .and_then(|v| v.as_u64())
        };
        for (key, ours, profile) in [
            ("n_docs", m.config.n_docs, p("n_docs")),
            (
                "max_combined_length",
                m.config.max_combined_length,
                p("max_combined_length"),
            ),
            ("retrieval_vector_size", index.dim(), None),
        ] {
            let want = fx.usize(&format!("settings/{key}"))?;
            ensure!(ours == want, "{key}: ours {ours}, expected {want}");
            if let Some(p) = profile {
                ensure!(p as usize == want, "{key}: manifest profile says {p}");
            }
        }
        let mt = fx.usize("settings/max_target_length")?;
        ensure!(
            p("max_target_length") == Some(mt as u64),
            "max_target_length {mt} vs manifest profile {:?}",
            p("max_target_length")
        );
        let s = |k: &str| fx.get(k).map(|v| v.as_str().map(String::from));
        let prefix = m.format.context_format().and_then(|f| f.prefix.clone());
        ensure!(
            Some(m.config.title_sep.clone()) == s("settings/title_sep")?
                && Some(m.config.doc_sep.clone()) == s("settings/doc_sep")?,
            "separators differ"
        );
        ensure!(
            prefix == s("settings/generator_prefix")?,
            "generator prefix {:?} vs {:?}",
            prefix,
            s("settings/generator_prefix")?
        );
        let sp = m.generator.special_ids();
        let want = (
            fx.usize("settings/generator_pad_token_id")? as u32,
            fx.usize("settings/generator_eos_token_id")? as u32,
            fx.opt_id("settings/generator_bos_token_id")?,
            fx.usize("settings/generator_decoder_start_token_id")? as u32,
        );
        ensure!(
            (sp.pad, sp.eos, sp.bos, sp.decoder_start) == want,
            "generator (pad, eos, bos, decoder_start) {:?} vs {want:?}",
            (sp.pad, sp.eos, sp.bos, sp.decoder_start)
        );
        // The RAG-Sequence NLL's exclude_bos_score uses the same bos.
        ensure!(
            m.config.nll_bos_token_id() == want.2,
            "NLL bos {:?} vs {:?}",
            m.config.nll_bos_token_id(),
            want.2
        );
        ensure!(
            !fx.bool("settings/question_encoder_tokenizer_clean_up_tokenization_spaces")?,
            "clean_up_tokenization_spaces=true is not implemented by our WordPiece decode"
        );
        Ok(())
    });
}

fn questions(fx: &Fixture, manifest: &Value, c: &mut Checker, m: &RagModel) {
    c.check(
        "questions/squad_ids = manifest data.eval_question_ids",
        || {
            let want: Vec<String> = manifest
                .pointer("/data/eval_question_ids")
                .and_then(|v| serde_json::from_value(v.clone()).ok())
                .context("manifest.json has no data.eval_question_ids")?;
            ensure!(
                fx.strings("questions/squad_ids")? == want,
                "differ from {want:?}"
            );
            Ok(())
        },
    );
    c.check("questions/input_ids + attention_mask", || {
        let t = fx.strings("questions/texts")?;
        let refs: Vec<&str> = t.iter().map(|s| s.as_str()).collect();
        let (ids, mask) = m.tokenize_questions(&refs)?;
        let (want_ids, want_mask) = (
            fx.ids2("questions/input_ids")?,
            fx.ids2("questions/attention_mask")?,
        );
        ensure!(ids.to_vec2::<u32>()? == want_ids, "input_ids differ");
        ensure!(mask.to_vec2::<u32>()? == want_mask, "attention_mask differ");
        Ok(())
    });
    let q = m.question_encoder.as_ref();
    c.close_at(
        fx,
        "question_encoder/pooled_output",
        (|| {
            let (ids, mask) = question_tensors(fx)?;
            flat(&q.context("no question encoder")?.encode_ids(&ids, &mask)?)
        })(),
        HIDDEN,
    );
    // The standalone question_encoder/ dir holds the same weights as rag/.
    c.check("paths/question_encoder: same pooled output", || {
        let enc = rustrag::encoders::DprEncoder::load(
            &fx.dir
                .join(fx.str("paths/question_encoder")?)
                .to_string_lossy(),
            &rustrag::encoders::LoadOptions::default(),
        )?;
        let (ids, mask) = question_tensors(fx)?;
        crate::common::compare(
            &flat(&enc.encode_ids(&ids, Some(&mask), None)?)?,
            &fx.f32s("question_encoder/pooled_output")?,
            HIDDEN,
        )
    });
}

/// `kb/ctx_tokenization.json` and `kb/embeddings.safetensors` recomputed with the context encoder
/// (`use_own_knowledge_dataset.py`: input ids only, batches of `batch_size` padded to the longest).
fn kb(fx: &Fixture, c: &mut Checker, index: &InMemoryIndex) {
    let run = || -> Result<()> {
        let enc = rustrag::encoders::DprEncoder::load(
            &fx.dir.join(fx.str("paths/ctx_encoder")?).to_string_lossy(),
            &rustrag::encoders::LoadOptions::default(),
        )?;
        let path = fx.dir.join(fx.str("paths/kb_ctx_tokenization")?);
        let tokj: Value = rustrag::hub::read_json(&path)?;
        let rows = tokj
            .get("rows")
            .and_then(|r| r.as_array())
            .with_context(|| format!("{}: no `rows`", path.display()))?;
        let batch = tokj
            .get("batch_size")
            .and_then(|b| b.as_u64())
            .with_context(|| format!("{}: no `batch_size`", path.display()))?
            as usize;
        ensure!(
            rows.len() == index.passages.len(),
            "{} tokenized rows for {} passages",
            rows.len(),
            index.passages.len()
        );
        let pairs: Vec<(&str, &str)> = index
            .passages
            .iter()
            .map(|p| (p.title.as_str(), p.text.as_str()))
            .collect();
        let ours = enc
            .tokenizer
            .encode_pairs(&pairs, Some(enc.max_length), Padding::None)?;
        for (i, (got, want)) in ours.input_ids.iter().zip(rows).enumerate() {
            let ids = crate::common::value_ids1(want.get("input_ids").context("input_ids")?)?;
            ensure!(*got == ids, "passage {i}: ids {got:?} vs {ids:?}");
            let padded = want
                .get("padded_length")
                .and_then(|v| v.as_u64())
                .context("padded_length")? as usize;
            let start = i / batch * batch;
            let longest = ours.input_ids[start..(start + batch).min(pairs.len())]
                .iter()
                .map(|r| r.len())
                .max()
                .unwrap_or(0);
            ensure!(
                longest == padded,
                "passage {i}: batch padded to {longest}, expected {padded}"
            );
            let extra: Vec<&String> = want
                .as_object()
                .context("row")?
                .keys()
                .filter(|k| *k != "input_ids" && *k != "padded_length")
                .collect();
            ensure!(extra.is_empty(), "passage {i}: unknown fields {extra:?}");
        }
        Ok(())
    };
    c.check(
        "kb/ctx_tokenization.json (ctx tokenizer on every passage)",
        run,
    );
    c.check("kb/embeddings recomputed with the context encoder", || {
        let enc = rustrag::encoders::DprEncoder::load(
            &fx.dir.join(fx.str("paths/ctx_encoder")?).to_string_lossy(),
            &rustrag::encoders::LoadOptions::default(),
        )?;
        let titles: Vec<&str> = index.passages.iter().map(|p| p.title.as_str()).collect();
        let texts: Vec<&str> = index.passages.iter().map(|p| p.text.as_str()).collect();
        let got = flat(&enc.encode_pairs(&titles, &texts)?)?;
        let want: Vec<f32> = (0..index.passages.len())
            .flat_map(|i| index.embedding(i).to_vec())
            .collect();
        crate::common::compare(&got, &want, HIDDEN)
    });
}

/// `targets`: answers through our generator tokenizer give target_ids; labels as finetune_rag.py
/// builds them (T5: decoder start prepended); BART's labels_genstyle = [decoder start] + labels.
fn targets(fx: &Fixture, c: &mut Checker, m: &RagModel) {
    let built = (|| -> Result<(Rows, Rows)> {
        let answers = fx.strings("targets/answers")?;
        let refs: Vec<&str> = answers.iter().map(|s| s.as_str()).collect();
        let max = fx.usize("settings/max_target_length")?;
        let enc = m
            .generator_tokenizer
            .encode_batch(&refs, true, Some(max), Padding::Longest)?;
        let start = m.generator.special_ids().decoder_start;
        let labels = if generator_type(m) == "t5" {
            enc.input_ids
                .iter()
                .map(|r| std::iter::once(start).chain(r.iter().copied()).collect())
                .collect()
        } else {
            enc.input_ids.clone()
        };
        Ok((enc.input_ids, labels))
    })();
    let (target_ids, labels) = match built {
        Ok(x) => x,
        Err(e) => return c.check("targets from answers", || Err(e)),
    };
    c.check("targets/target_ids (our tokenizer on the answers)", || {
        ensure!(
            fx.ids2("targets/target_ids")? == target_ids,
            "differ: ours {target_ids:?}"
        );
        Ok(())
    });
    c.check("targets/labels (built from the answers)", || {
        ensure!(
            fx.ids2("targets/labels")? == labels,
            "differ: ours {labels:?}"
        );
        Ok(())
    });
    if generator_type(m) == "bart" {
        c.check("targets/labels_genstyle", || {
            let start = m.generator.special_ids().decoder_start;
            let want: Vec<Vec<u32>> = labels
                .iter()
                .map(|r| std::iter::once(start).chain(r.iter().copied()).collect())
                .collect();
            ensure!(
                fx.ids2("targets/labels_genstyle")? == want,
                "differ: ours {want:?}"
            );
            Ok(())
        });
    }
}

type Rows = Vec<Vec<u32>>;

/// Output ids, plus RAG-Sequence details per question.
type Generated = (Rows, Option<Vec<rustrag::rag::model::SequenceDetails>>);

fn question_tensors(fx: &Fixture) -> Result<(Tensor, Tensor)> {
    Ok((
        ids_tensor(&fx.ids2("questions/input_ids")?, &Device::Cpu)?,
        ids_tensor(&fx.ids2("questions/attention_mask")?, &Device::Cpu)?,
    ))
}

fn pooled(fx: &Fixture) -> Result<Tensor> {
    let ids = fx.ids2("questions/input_ids")?;
    let v = fx.f32s("question_encoder/pooled_output")?;
    let d = v.len() / ids.len();
    Ok(Tensor::from_vec(v, (ids.len(), d), &Device::Cpu)?)
}

/// Retrieval from the fixture's question embeddings and through our question encoder; returns the
/// contexts (from our retrieval) for the later checks.
fn retrieval(
    fx: &Fixture,
    c: &mut Checker,
    m: &RagModel,
    index: &InMemoryIndex,
) -> Option<RagContext> {
    let r = (|| {
        let k = fx.usize("settings/n_docs")?;
        let (ids, _) = question_tensors(fx)?;
        m.retrieve_with_embeddings(index, &ids, &pooled(fx)?, k)
    })();
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            c.check("retrieval", || Err(e));
            return None;
        }
    };
    doc_ids(c, fx, "retrieval/doc_ids", &r.doc_ids);
    c.check("retrieval/doc_passage_ids", || {
        let got: Vec<Vec<String>> = r
            .passages
            .iter()
            .map(|ps| ps.iter().map(|p| p.id.clone()).collect())
            .collect();
        let want: Vec<Vec<String>> =
            serde_json::from_value(fx.get("retrieval/doc_passage_ids")?.clone())?;
        ensure!(got == want, "ours {got:?} vs {want:?}");
        Ok(())
    });
    c.close_at(
        fx,
        "retrieval/retrieved_doc_embeds",
        flat(&r.doc_embeddings),
        HIDDEN,
    );
    c.close_at(
        fx,
        "retrieval/doc_scores",
        flat(&r.context.doc_scores),
        SCORE,
    );
    for (path, got) in [
        ("retrieval/decoded_question_strings", &r.decoded_questions),
        ("retrieval/context_strings", &r.context_strings),
    ] {
        c.check(path, || {
            let want = fx.strings(path)?;
            ensure!(*got == want, "ours {got:?} vs {want:?}");
            Ok(())
        });
    }
    for (path, t) in [
        ("retrieval/context_input_ids", &r.context.input_ids),
        (
            "retrieval/context_attention_mask",
            &r.context.attention_mask,
        ),
    ] {
        c.check(path, || {
            ensure!(t.to_vec2::<u32>()? == fx.ids2(path)?, "differ");
            Ok(())
        });
    }
    let kb_scores = (|| -> Result<Vec<Vec<f32>>> {
        let q = pooled(fx)?.to_vec2::<f32>()?;
        Ok(q.iter().map(|qv| index.scores(qv)).collect())
    })();
    c.close_at(
        fx,
        "retrieval/all_kb_scores",
        kb_scores
            .as_ref()
            .map(|s| s.concat())
            .map_err(|e| anyhow!("{e:#}")),
        SCORE,
    );
    // min over ranks 1..K of (score_r - score_{r+1}), recomputed from our scores.
    c.close_at(
        fx,
        "retrieval/min_gap_between_top_k_plus_1_scores",
        kb_scores.map_err(|e| anyhow!("{e:#}")).and_then(|all| {
            let k = fx.usize("settings/n_docs")?;
            Ok(all
                .iter()
                .map(|s| {
                    let mut s = s.clone();
                    s.sort_by(|a, b| b.total_cmp(a));
                    (0..k)
                        .map(|r| s[r] - s[r + 1])
                        .fold(f32::INFINITY, f32::min)
                })
                .collect())
        }),
        SCORE_GAP,
    );
    c.check("retrieval through the question encoder", || {
        let k = fx.usize("settings/n_docs")?;
        let (ids, mask) = question_tensors(fx)?;
        let own = m.retrieve_ids(index, &ids, &mask, k)?;
        ensure!(
            own.doc_ids == r.doc_ids,
            "doc ids {:?} vs {:?}",
            own.doc_ids,
            r.doc_ids
        );
        crate::common::compare(
            &flat(&own.context.doc_scores)?,
            &fx.f32s("retrieval/doc_scores")?,
            SCORE,
        )
    });
    Some(r.context)
}

/// KB row ids `[batch][n_docs]` equal the recorded ones.
fn doc_ids(c: &mut Checker, fx: &Fixture, path: &str, got: &[Vec<u64>]) {
    c.check(path, || {
        let want: Vec<Vec<u64>> = fx
            .ids2(path)?
            .iter()
            .map(|r| r.iter().map(|&x| x as u64).collect())
            .collect();
        ensure!(got == want, "ours {got:?} vs {want:?}");
        Ok(())
    });
}

fn labels(fx: &Fixture, name: &str) -> Result<Tensor> {
    ids_tensor(&fx.ids2(&format!("targets/{name}"))?, &Device::Cpu)
}

/// Fixture contexts (ids, mask) with the given doc scores.
fn fixture_context(fx: &Fixture, doc_scores: Tensor) -> Result<RagContext> {
    let ids = ids_tensor(&fx.ids2("retrieval/context_input_ids")?, &Device::Cpu)?;
    let mask = ids_tensor(&fx.ids2("retrieval/context_attention_mask")?, &Device::Cpu)?;
    RagContext::new(ids, mask, doc_scores)
}

/// `[{row|b, t, logprobs}]` at `path`: full log-prob vectors of `lp: [rows, T, V]` (`label`
/// prefixes the check names).
pub fn selected(
    c: &mut Checker,
    fx: &Fixture,
    label: &str,
    path: &str,
    lp: &Tensor,
    row_key: &str,
) {
    let n = match fx.len(path) {
        Ok(n) => n,
        Err(e) => return c.check(&format!("{label}{path}"), || Err(e)),
    };
    for i in 0..n {
        let p = format!("{path}/{i}");
        c.check(&format!("{label}{p}"), || {
            let row = fx.usize(&format!("{p}/{row_key}"))?;
            let t = fx.usize(&format!("{p}/t"))?;
            let got = flat(&lp.get(row)?.get(t)?)?;
            crate::common::compare(&got, &fx.f32s(&format!("{p}/logprobs"))?, LOGPROB)
        });
    }
}

/// Name inside tensors.safetensors from a "tensors.safetensors['NAME'] ..." string.
pub fn tensor_name(fx: &Fixture, path: &str) -> Result<String> {
    let s = fx.str(path)?;
    let start = s
        .find("tensors.safetensors['")
        .ok_or_else(|| anyhow!("cannot parse {path} `{s}`"))?
        + "tensors.safetensors['".len();
    let end = s[start..]
        .find("']")
        .ok_or_else(|| anyhow!("cannot parse {path} `{s}`"))?
        + start;
    Ok(s[start..end].to_string())
}

fn forward(fx: &Fixture, c: &mut Checker, m: &RagModel, ctx: &RagContext) {
    let logits = match labels(fx, "labels").and_then(|l| m.forward(ctx, &l)) {
        Ok(l) => l,
        Err(e) => return c.check("forward", || Err(e)),
    };
    c.check("forward.seq_logits (RagModel.forward)", || {
        let want = fx.tensor(&tensor_name(fx, "forward/logits_tensor")?)?;
        crate::common::compare(&flat(&logits)?, &flat(&want)?, LOGPROB)
    });
    c.close_at(fx, "forward/doc_scores", flat(&ctx.doc_scores), SCORE);
    c.close_at(
        fx,
        "forward/loss_default",
        labels(fx, "labels")
            .and_then(|l| m.loss(ctx, &l, &m.default_nll_options()))
            .and_then(|l| flat(&l)),
        LOSS,
    );
    let lp = match rustrag::nn::log_softmax_last_dim(&logits) {
        Ok(lp) => lp,
        Err(e) => return c.check("forward log_softmax", || Err(e.into())),
    };
    selected(c, fx, "", "forward/logprobs_selected", &lp, "row");
    c.check("forward/logprobs_top5", || {
        top5(&lp, fx, "forward/logprobs_top5")
    });
    c.close_at(
        fx,
        "forward/generator_encoder_last_hidden_state_row0_pos0",
        (|| {
            let g = m.generator.seq2seq().context("not a seq2seq generator")?;
            flat(&g.encode(&ctx.gen_input())?.get(0)?.get(0)?)
        })(),
        HIDDEN,
    );
    if m.mode != RagMode::Token {
        return;
    }
    // RAG-Token: the marginalized log-probs, from HF's own logits (pure marginalisation) and ours.
    let name = match tensor_name(fx, "forward/marginalized/tensor") {
        Ok(n) => n,
        Err(e) => return c.check("forward/marginalized", || Err(e)),
    };
    c.check("forward.marginalized (HF's logits)", || {
        let got = loss::marginalize(
            &fx.tensor(&tensor_name(fx, "forward/logits_tensor")?)?,
            &doc_scores_of(fx, "forward/doc_scores")?,
            ctx.n_docs,
        )?;
        crate::common::compare(&flat(&got)?, &flat(&fx.tensor(&name)?)?, LOGPROB)
    });
    let marg = match loss::marginalize(&logits, &ctx.doc_scores, ctx.n_docs) {
        Ok(x) => x,
        Err(e) => return c.check("forward.marginalized", || Err(e)),
    };
    c.check("forward/marginalized/shape", || {
        let want: Vec<usize> = fx
            .ids1("forward/marginalized/shape")?
            .into_iter()
            .map(|x| x as usize)
            .collect();
        ensure!(marg.dims() == want, "{:?} vs {want:?}", marg.dims());
        Ok(())
    });
    c.check("forward.marginalized", || {
        crate::common::compare(&flat(&marg)?, &flat(&fx.tensor(&name)?)?, LOGPROB)
    });
    selected(c, fx, "", "forward/marginalized/selected", &marg, "b");
    c.check("forward/marginalized/top5", || {
        top5(&marg, fx, "forward/marginalized/top5")
    });
}

/// Top-5 ids exact and their log-probs close, for every (row, t). `lp: [rows, T, V]`.
fn top5(lp: &Tensor, fx: &Fixture, path: &str) -> Result<()> {
    let want_ids: Vec<Vec<Vec<u32>>> =
        serde_json::from_value(fx.get(&format!("{path}/ids"))?.clone())?;
    let want_lp = fx.f32s(&format!("{path}/logprobs"))?;
    let v: Vec<Vec<Vec<f32>>> = lp.to_vec3()?;
    ensure!(
        want_ids.len() == v.len() && want_ids.iter().zip(&v).all(|(a, b)| a.len() == b.len()),
        "shape: {} rows recorded, {} computed",
        want_ids.len(),
        v.len()
    );
    let mut got_lp = Vec::new();
    for (r, rows) in want_ids.iter().enumerate() {
        for (t, ids) in rows.iter().enumerate() {
            let row = &v[r][t];
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            let got: Vec<u32> = order[..ids.len()].iter().map(|&i| i as u32).collect();
            ensure!(&got == ids, "row {r} t {t}: top ids {got:?} vs {ids:?}");
            got_lp.extend(order[..ids.len()].iter().map(|&i| row[i]));
        }
    }
    crate::common::compare(&got_lp, &want_lp, LOGPROB)
}

fn doc_scores_of(fx: &Fixture, path: &str) -> Result<Tensor> {
    let v = fx.f32s(path)?;
    let b = fx.ids2("questions/input_ids")?.len();
    ensure!(
        v.len() % b == 0 && !v.is_empty(),
        "{path}: {} values for {b} questions",
        v.len()
    );
    Ok(Tensor::from_vec(v.clone(), (b, v.len() / b), &Device::Cpu)?)
}

fn nll(fx: &Fixture, c: &mut Checker, m: &RagModel, ctx: &RagContext) {
    let n = match fx.len("nll/results") {
        Ok(n) => n,
        Err(e) => return c.check("nll/results", || Err(e)),
    };
    let hf_logits = tensor_name(fx, "forward/logits_tensor").and_then(|n| fx.tensor(&n));
    let mut seen = BTreeSet::new();
    for i in 0..n {
        let p = |k: &str| format!("nll/results/{i}/{k}");
        let r = (|| -> Result<(String, NllOptions)> {
            let exclude = if m.mode == RagMode::Sequence {
                fx.bool(&p("exclude_bos_score"))?
            } else {
                ensure!(
                    !fx.has(&p("exclude_bos_score")),
                    "RAG-Token get_nll has no exclude_bos_score"
                );
                false
            };
            Ok((
                fx.str(&p("labels"))?,
                NllOptions {
                    reduce_loss: fx.bool(&p("reduce_loss"))?,
                    epsilon: fx.f64(&p("epsilon"))?,
                    exclude_bos_score: exclude,
                },
            ))
        })();
        let (name, opts) = match r {
            Ok(x) => x,
            Err(e) => {
                c.check(&format!("nll/results/{i}"), || Err(e));
                continue;
            }
        };
        seen.insert((
            name.clone(),
            opts.reduce_loss,
            opts.epsilon.to_bits(),
            opts.exclude_bos_score,
        ));
        let tag = format!(
            "nll/{i} ({name}, reduce={}, eps={}, exclude_bos={})",
            opts.reduce_loss, opts.epsilon, opts.exclude_bos_score
        );
        c.check(&tag, || {
            let l = labels(fx, &name)?;
            let logits = m.forward(ctx, &l)?;
            let got = m.nll(&logits, &ctx.doc_scores, &l, ctx.n_docs, &opts)?;
            crate::common::compare(&flat(&got)?, &fx.f32s(&p("value"))?, LOSS)
        });
        // The pure loss math on HF's own logits (same label length only).
        if name == "labels" {
            c.check(&format!("{tag} on HF's logits"), || {
                let got = m.nll(
                    hf_logits.as_ref().map_err(|e| anyhow!("{e:#}"))?,
                    &doc_scores_of(fx, "forward/doc_scores")?,
                    &labels(fx, &name)?,
                    ctx.n_docs,
                    &opts,
                )?;
                crate::common::compare(&flat(&got)?, &fx.f32s(&p("value"))?, LOSS)
            });
        }
    }
    // The README's combinations, each once: every label set x reduce x epsilon (x exclude_bos).
    c.check("nll/results: every documented combination", || {
        let mut sets = vec!["labels"];
        if fx.has("targets/labels_genstyle") {
            sets.push("labels_genstyle");
        }
        let excl: &[bool] = if m.mode == RagMode::Sequence {
            &[false, true]
        } else {
            &[false]
        };
        let mut want = BTreeSet::new();
        for s in &sets {
            for r in [false, true] {
                for e in [0.0f64, 0.1] {
                    for x in excl {
                        want.insert((s.to_string(), r, e.to_bits(), *x));
                    }
                }
            }
        }
        ensure!(
            seen.len() == n,
            "{} results but {} distinct combinations",
            n,
            seen.len()
        );
        ensure!(
            seen == want,
            "recorded combinations differ from the documented {}",
            want.len()
        );
        Ok(())
    });
}

/// Gradients of the training loss (label smoothing 0.1, reduce_loss) w.r.t. doc scores, the question
/// embedding and every parameter; then the end-to-end variant through the context encoder.
fn gradients(fx: &Fixture, c: &mut Checker, m: &RagModel, index: &InMemoryIndex) {
    let opts = NllOptions {
        reduce_loss: true,
        epsilon: 0.1,
        exclude_bos_score: false,
    };
    // On HF's own logits: isolates the loss math from generator noise. HF's float32 value is also
    // compared with a float64 recomputation from the same logits, to show the size of HF's own
    // cancellation noise that GRAD_DOC allows for.
    let d_ds = |logits: &Tensor, ds: Tensor| -> Result<Tensor> {
        let ds = Var::from_tensor(&ds)?;
        let l = m.nll(
            logits,
            ds.as_tensor(),
            &labels(fx, "labels")?.to_dtype(DType::U32)?,
            fx.usize("settings/n_docs")?,
            &opts,
        )?;
        Ok(l.backward()?
            .get(ds.as_tensor())
            .context("no gradient")?
            .clone())
    };
    let hf_noise = (|| -> Result<(f64, Vec<f32>)> {
        let logits = fx.tensor(&tensor_name(fx, "forward/logits_tensor")?)?;
        let ds = doc_scores_of(fx, "gradients/doc_scores")?;
        let want = fx.f32s("gradients/d_loss_d_doc_scores")?;
        let g64 = flat(&d_ds(
            &logits.to_dtype(DType::F64)?,
            ds.to_dtype(DType::F64)?,
        )?)?;
        let g32 = flat(&d_ds(&logits, ds)?)?;
        if c_verbose() {
            println!(
                "  gradients/d_loss_d_doc_scores: HF float32 vs float64 recomputation: {}; ours (float32) vs float64: {}",
                crate::common::error_summary(&want, &g64),
                crate::common::error_summary(&g32, &g64)
            );
        }
        Ok((crate::common::rel_error(&want, &g64), g32))
    })();
    let (hf_noise, g32) = match hf_noise {
        Ok(x) => x,
        Err(e) => return c.check("gradients/d_loss_d_doc_scores (HF's logits)", || Err(e)),
    };
    let doc = Tol::Rel {
        rtol: rtol(GRAD_DOC).max(HF_NOISE_FACTOR * hf_noise),
    };
    c.check(
        &format!(
            "gradients/d_loss_d_doc_scores (HF's logits; HF's float32 error vs float64 {hf_noise:.1e} -> rtol {:.1e})",
            rtol(doc)
        ),
        || crate::common::compare(&g32, &fx.f32s("gradients/d_loss_d_doc_scores")?, doc),
    );
    let r = (|| {
        let k = fx.usize("settings/n_docs")?;
        let (ids, mask) = question_tensors(fx)?;
        let ret = m.retrieve_ids(index, &ids, &mask, k)?;
        let l = labels(fx, "labels")?;
        let logits = m.forward(&ret.context, &l)?;
        // doc_scores as an explicit leaf too, to read d loss / d doc_scores.
        let ds = Var::from_tensor(&ret.context.doc_scores.detach())?;
        let loss_ds = m.nll(&logits.detach(), ds.as_tensor(), &l, k, &opts)?;
        let g_ds = loss_ds
            .backward()?
            .get(ds.as_tensor())
            .context("no gradient for doc_scores")?
            .clone();
        let loss = m.nll(&logits, &ret.context.doc_scores, &l, k, &opts)?;
        let grads = loss.backward()?;
        // candle keeps gradients of leaves only: d loss / d q through a leaf copy of the question embedding.
        let q = Var::from_tensor(&ret.question_embeddings.detach())?;
        let ret_q = m.retrieve_with_embeddings(index, &ids, q.as_tensor(), k)?;
        let loss_q = m.nll(&logits.detach(), &ret_q.context.doc_scores, &l, k, &opts)?;
        let g_q = loss_q
            .backward()?
            .get(q.as_tensor())
            .context("no gradient for the question embedding")?
            .clone();
        Ok::<_, anyhow::Error>((loss, g_ds, g_q, grads, ret))
    })();
    let (loss, g_ds, g_q, grads, ret) = match r {
        Ok(x) => x,
        Err(e) => return c.check("gradients", || Err(e)),
    };
    c.close_at(fx, "gradients/loss", flat(&loss), LOSS);
    c.close_at(
        fx,
        "gradients/doc_scores",
        flat(&ret.context.doc_scores),
        SCORE,
    );
    c.close_at(fx, "gradients/d_loss_d_doc_scores", flat(&g_ds), doc);
    c.close_at(
        fx,
        "gradients/d_loss_d_question_pooled_output",
        flat(&g_q),
        doc,
    );
    let mut vars: HashMap<String, Var> = m.generator.vars().into_iter().collect();
    if let Some(q) = &m.question_encoder {
        vars.extend(q.vars());
    }
    c.check(
        "gradients/full_gradients: a question-encoder and a generator tensor",
        || {
            let names = fx.keys("gradients/full_gradients")?;
            let q = names
                .iter()
                .filter(|n| n.starts_with("rag.question_encoder."))
                .count();
            let g = names
                .iter()
                .filter(|n| n.starts_with("rag.generator."))
                .count();
            ensure!(q >= 1 && g >= 1 && q + g == names.len(), "{names:?}");
            Ok(())
        },
    );
    parameter_gradients(
        c,
        fx,
        "gradients/",
        [
            "named_parameters",
            "grad_l2_norms_selected",
            "grad_l2_norms_all",
            "full_gradients",
        ],
        &GradSet {
            grads: &grads,
            vars: &vars,
            doc,
        },
    );
    end_to_end(fx, c, m, &ret, &opts, doc);
}

fn c_verbose() -> bool {
    std::env::var("RUSTRAG_PARITY_VERBOSE").is_ok_and(|v| v != "0")
}

/// Gradients of one backward pass, the parameters they belong to, and the tolerance of gradients
/// that flow through d loss / d doc_scores in this case.
struct GradSet<'a> {
    grads: &'a GradStore,
    vars: &'a HashMap<String, Var>,
    doc: Tol,
}

/// The four parameter-gradient sections under `prefix`: short names, their norms, every norm, and
/// the full tensors.
fn parameter_gradients(c: &mut Checker, fx: &Fixture, prefix: &str, keys: [&str; 4], g: &GradSet) {
    let p = |k: &str| format!("{prefix}{k}");
    named_norms(c, fx, &p(keys[0]), &p(keys[1]), g);
    grad_norms(c, fx, &p(keys[2]), g);
    full_gradients(c, fx, &p(keys[3]), g);
}

fn norm_of(grads: &GradStore, var: &Var) -> Result<f64> {
    Ok(match grads.get(var.as_tensor()) {
        Some(g) => g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?
            .sqrt(),
        None => 0.0,
    })
}

/// `<named>/<short> = full name` with `<norms>/<short>` = that parameter's gradient L2 norm.
fn named_norms(c: &mut Checker, fx: &Fixture, named: &str, norms: &str, g: &GradSet) {
    c.check(&format!("{norms}: same short names as {named}"), || {
        let (a, b) = (fx.keys(named)?, fx.keys(norms)?);
        ensure!(!a.is_empty() && a == b, "{a:?} vs {b:?}");
        Ok(())
    });
    for short in fx.keys(norms).unwrap_or_default() {
        c.check(&format!("{norms}/{short}"), || {
            let name = fx.str(&format!("{named}/{short}"))?;
            let var = g
                .vars
                .get(&name)
                .with_context(|| format!("no parameter {name}"))?;
            let got = norm_of(g.grads, var)?;
            let want = fx.f64(&format!("{norms}/{short}"))?;
            let tol = rtol(grad_tol(&name, g.doc));
            ensure!(
                (got - want).abs() <= tol * want,
                "{name}: norm {got} vs {want} (rtol {tol:.0e})"
            );
            Ok(())
        });
    }
}

/// `grad_l2_norms`-style map at `path` (every trainable parameter -> L2 norm of its gradient): the
/// same parameter set as ours, each norm within its group's relative tolerance; parameters in
/// [`zero_gradient`] hold float noise on both sides.
fn grad_norms(c: &mut Checker, fx: &Fixture, path: &str, g: &GradSet) {
    let names = match fx.keys(path).and_then(|n| {
        ensure!(!n.is_empty(), "empty");
        Ok(n)
    }) {
        Ok(n) => n,
        Err(e) => return c.check(path, || Err(e)),
    };
    c.check(
        &format!("{path}: every parameter of ours, no other"),
        || {
            let ours: BTreeSet<&String> = g.vars.keys().collect();
            let theirs: BTreeSet<&String> = names.iter().collect();
            ensure!(
                ours == theirs,
                "only ours: {:?}; only recorded: {:?}",
                ours.difference(&theirs).collect::<Vec<_>>(),
                theirs.difference(&ours).collect::<Vec<_>>()
            );
            Ok(())
        },
    );
    let want: Vec<(String, Result<f64>)> = names
        .iter()
        .map(|n| (n.clone(), fx.f64(&format!("{path}/{n}"))))
        .collect();
    let largest = want
        .iter()
        .filter_map(|(_, w)| w.as_ref().ok())
        .fold(0f64, |m, w| m.max(*w));
    let last_layer = names
        .iter()
        .filter_map(|n| {
            n.split(".layer.")
                .nth(1)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max();
    let (mut zero, mut bad, mut worst) = (0usize, Vec::new(), (0f64, String::new()));
    for (name, w) in &want {
        let r = (|| -> Result<()> {
            let w = *w.as_ref().map_err(|e| anyhow!("{e:#}"))?;
            let var = g
                .vars
                .get(name)
                .with_context(|| format!("no trainable parameter {name}"))?;
            let got = norm_of(g.grads, var)?;
            if zero_gradient(path, name, last_layer) {
                zero += 1;
                let noise = ZERO_GRADIENT_NOISE * largest;
                ensure!(
                    got <= noise && w <= noise,
                    "should be float noise (< {noise:.1e}): got {got:.3e}, expected {w:.3e}"
                );
            } else {
                let tol = rtol(grad_tol(name, g.doc));
                if (got - w).abs() / w > worst.0 {
                    worst = ((got - w).abs() / w, name.clone());
                }
                ensure!(
                    (got - w).abs() <= tol * w,
                    "norm {got:.6e} vs {w:.6e} (rtol {tol:.1e})"
                );
            }
            Ok(())
        })();
        if let Err(e) = r {
            bad.push(format!("{name}: {e:#}"));
        }
    }
    if c.verbose {
        println!(
            "  {path}: worst relative norm error {:.2e} ({})",
            worst.0, worst.1
        );
    }
    c.check(
        &format!(
            "{path} ({} parameters, {zero} mathematically zero)",
            want.len()
        ),
        || {
            ensure!(
                bad.is_empty(),
                "{} parameters off: {}",
                bad.len(),
                bad.join("; ")
            );
            Ok(())
        },
    );
}

/// `{name: {shape, grad}}` (or `{name: grad}`) at `path`, each tensor relative.
fn full_gradients(c: &mut Checker, fx: &Fixture, path: &str, g: &GradSet) {
    let names = match fx.keys(path).and_then(|n| {
        ensure!(!n.is_empty(), "empty");
        Ok(n)
    }) {
        Ok(n) => n,
        Err(e) => return c.check(path, || Err(e)),
    };
    for name in names {
        let p = format!("{path}/{name}");
        c.check(&p, || {
            let var = g
                .vars
                .get(&name)
                .with_context(|| format!("no parameter {name}"))?;
            let grad = g.grads.get(var.as_tensor()).context("no gradient")?;
            let want = if fx.get(&p)?.is_object() {
                let shape: Vec<usize> = fx
                    .ids1(&format!("{p}/shape"))?
                    .into_iter()
                    .map(|x| x as usize)
                    .collect();
                ensure!(grad.dims() == shape, "shape {:?} vs {shape:?}", grad.dims());
                fx.f32s(&format!("{p}/grad"))?
            } else {
                fx.f32s(&p)?
            };
            crate::common::compare(&flat(grad)?, &want, grad_tol(&name, g.doc))
        });
    }
}

/// End-to-end retrieval training: the context encoder re-encodes the retrieved docs.
fn end_to_end(
    fx: &Fixture,
    c: &mut Checker,
    m: &RagModel,
    ret: &rustrag::rag::Retrieved,
    opts: &NllOptions,
    doc: Tol,
) {
    let r = (|| {
        let ctx_enc = rustrag::encoders::dpr::DprEncoder::load(
            &fx.dir.join(fx.str("paths/ctx_encoder")?).to_string_lossy(),
            &rustrag::encoders::LoadOptions {
                trainable: true,
                ..Default::default()
            },
        )?;
        let (enc, ctx) = m.reencode_docs(&ctx_enc, ret)?;
        let l = labels(fx, "labels")?;
        let logits = m.forward(&ctx, &l)?;
        let ds = Var::from_tensor(&ctx.doc_scores.detach())?;
        let g_ds = m
            .nll(&logits.detach(), ds.as_tensor(), &l, ctx.n_docs, opts)?
            .backward()?
            .get(ds.as_tensor())
            .context("no gradient")?
            .clone();
        let loss = m.nll(&logits, &ctx.doc_scores, &l, ctx.n_docs, opts)?;
        let grads = loss.backward()?;
        Ok::<_, anyhow::Error>((ctx_enc, enc, ctx, loss, g_ds, grads))
    })();
    let (ctx_enc, enc, ctx, loss, g_ds, grads) = match r {
        Ok(x) => x,
        Err(e) => return c.check("end_to_end", || Err(e)),
    };
    doc_ids(c, fx, "end_to_end/retrieved_doc_ids", &ret.doc_ids);
    for (path, got) in [
        ("end_to_end/tokenized_docs_input_ids", &enc.input_ids),
        (
            "end_to_end/tokenized_docs_attention_mask",
            &enc.attention_mask,
        ),
    ] {
        c.check(path, || {
            ensure!(*got == fx.ids2(path)?, "differ");
            Ok(())
        });
    }
    c.close_at(fx, "end_to_end/doc_scores", flat(&ctx.doc_scores), SCORE);
    c.close_at(fx, "end_to_end/loss", flat(&loss), LOSS);
    c.close_at(fx, "end_to_end/d_loss_d_doc_scores", flat(&g_ds), doc);
    let vars: HashMap<String, Var> = ctx_enc.vars().into_iter().collect();
    parameter_gradients(
        c,
        fx,
        "end_to_end/",
        [
            "ctx_encoder_named_parameters",
            "ctx_grad_l2_norms_selected",
            "ctx_grad_l2_norms_all",
            "ctx_full_gradients",
        ],
        &GradSet {
            grads: &grads,
            vars: &vars,
            doc,
        },
    );
    c.check(
        "end_to_end/question_encoder_grad_l2_norm_word_embeddings",
        || {
            let q = m.question_encoder.as_ref().context("no question encoder")?;
            let name = fx.str("gradients/named_parameters/question_encoder_word_embeddings")?;
            let qv: HashMap<String, Var> = q.vars().into_iter().collect();
            let got = norm_of(
                &grads,
                qv.get(&name)
                    .with_context(|| format!("no parameter {name}"))?,
            )?;
            let want = fx.f64("end_to_end/question_encoder_grad_l2_norm_word_embeddings")?;
            let tol = rtol(doc);
            ensure!(
                (got - want).abs() <= tol * want,
                "norm {got} vs {want} (rtol {tol:.1e})"
            );
            Ok(())
        },
    );
}

fn external(fx: &Fixture, c: &mut Checker, m: &RagModel) {
    c.check("external_retriever/context_input_ids", || {
        let s = fx.str("external_retriever/context_input_ids")?;
        ensure!(
            s == "same as retrieval.context_input_ids",
            "unknown context source `{s}`"
        );
        Ok(())
    });
    let n = match fx.len("external_retriever/variants") {
        Ok(n) => n,
        Err(e) => return c.check("external_retriever/variants", || Err(e)),
    };
    let mut names = Vec::new();
    for i in 0..n {
        let p = |k: &str| format!("external_retriever/variants/{i}/{k}");
        let name = fx.str(&p("name")).unwrap_or_else(|e| format!("<{e:#}>"));
        names.push(name.clone());
        let r = (|| {
            let ctx = fixture_context(fx, doc_scores_of(fx, &p("doc_scores"))?)?;
            let l = labels(fx, "labels")?;
            let logits = m.forward(&ctx, &l)?;
            let mut opts = m.default_nll_options();
            let loss = m.nll(&logits, &ctx.doc_scores, &l, ctx.n_docs, &opts)?;
            opts.reduce_loss = true;
            let reduced = m.nll(&logits, &ctx.doc_scores, &l, ctx.n_docs, &opts)?;
            Ok::<_, anyhow::Error>((loss, reduced, rustrag::nn::log_softmax_last_dim(&logits)?))
        })();
        match r {
            Ok((loss, reduced, lp)) => {
                c.close_at(fx, &p("loss"), flat(&loss), LOSS);
                c.close_at(fx, &p("loss_reduce_loss"), flat(&reduced), LOSS);
                selected(c, fx, "", &p("logprobs_selected"), &lp, "row");
            }
            Err(e) => c.check(&format!("external_retriever/{name}"), || Err(e)),
        }
    }
    c.check(
        "external_retriever/variants: retrieved + custom doc scores",
        || {
            names.sort();
            ensure!(
                names == ["custom_doc_scores", "retrieved_doc_scores"],
                "variants {names:?}"
            );
            // README: the retrieved-scores variant must equal the retriever path.
            let i = variant(fx, "retrieved_doc_scores")?;
            crate::common::compare(
                &fx.f32s(&format!("external_retriever/variants/{i}/doc_scores"))?,
                &fx.f32s("retrieval/doc_scores")?,
                SCORE,
            )
        },
    );
}

fn variant(fx: &Fixture, name: &str) -> Result<usize> {
    (0..fx.len("external_retriever/variants")?)
        .find(|i| lookup_str(fx, &format!("external_retriever/variants/{i}/name")) == Some(name))
        .with_context(|| format!("no external_retriever variant `{name}`"))
}

fn lookup_str<'a>(fx: &'a Fixture, path: &str) -> Option<&'a str> {
    crate::common::lookup(&fx.expected, path).ok()?.as_str()
}

/// Which contexts a generate call used, from its recorded `hf_call`: the retriever path
/// (`model.generate(input_ids, ...)`), or the external path with the doc scores named in its
/// `[doc_scores = ...]` note (RAG-Sequence's `[input_ids=None path]` passes `retrieval.doc_scores`).
fn generation_context(fx: &Fixture, i: usize, retrieved: &RagContext) -> Result<RagContext> {
    let call = fx.str(&format!("generation/{i}/hf_call"))?;
    if call.starts_with("model.generate(input_ids") {
        return Ok(retrieved.clone());
    }
    ensure!(
        call.starts_with("model_without_retriever.generate(context_input_ids="),
        "unknown generate call `{call}`"
    );
    let scores = match call.split("[doc_scores = ").nth(1) {
        Some(rest) => rest.split(']').next().unwrap_or_default().to_string(),
        None if call.ends_with("[input_ids=None path]") => "retrieval.doc_scores".into(),
        None => bail!("`{call}`: which doc_scores?"),
    };
    let ds = match scores.as_str() {
        "retrieval.doc_scores" => doc_scores_of(fx, "retrieval/doc_scores")?,
        s if s.starts_with("external_retriever.variants[") => {
            let name = s
                .trim_start_matches("external_retriever.variants[")
                .split(']')
                .next()
                .unwrap_or_default();
            doc_scores_of(
                fx,
                &format!(
                    "external_retriever/variants/{}/doc_scores",
                    variant(fx, name)?
                ),
            )?
        }
        other => bail!("unknown doc_scores source `{other}`"),
    };
    fixture_context(fx, ds)
}

/// Generate kwargs as our settings; an unknown kwarg is an error (it would change HF's output).
fn generation_kwargs(fx: &Fixture, i: usize, m: &RagModel) -> Result<(GenerationSettings, bool)> {
    let mut s = GenerationSettings::default();
    let mut dedup = m.config.do_deduplication;
    let base = format!("generation/{i}/kwargs");
    for k in fx.keys(&base)? {
        let p = format!("{base}/{k}");
        match k.as_str() {
            "max_length" => s.max_length = Some(fx.usize(&p)?),
            "min_length" => s.min_length = Some(fx.usize(&p)?),
            "num_beams" => s.num_beams = Some(fx.usize(&p)?),
            "num_return_sequences" => s.num_return_sequences = Some(fx.usize(&p)?),
            "n_docs" => ensure!(
                fx.usize(&p)? == m.config.n_docs,
                "n_docs differs from the model's"
            ),
            "do_deduplication" if m.mode == RagMode::Sequence => dedup = fx.bool(&p)?,
            other => bail!("unknown generate kwarg `{other}`"),
        }
    }
    Ok((s, dedup))
}

fn generation(fx: &Fixture, manifest: &Value, c: &mut Checker, m: &RagModel, ctx: &RagContext) {
    let n = match fx.len("generation") {
        Ok(n) => n,
        Err(e) => return c.check("generation", || Err(e)),
    };
    let mut errors = Vec::new();
    for i in 0..n {
        let name = fx
            .str(&format!("generation/{i}/name"))
            .unwrap_or_else(|e| format!("{i} <{e:#}>"));
        let tag = format!("generation/{name}");
        let run = || -> Result<Generated> {
            let (settings, dedup) = generation_kwargs(fx, i, m)?;
            let ctx = generation_context(fx, i, ctx)?;
            let p = m.generation_params(&settings)?;
            match m.mode {
                RagMode::Token => Ok((m.generate_token(&ctx, &p)?, None)),
                RagMode::Sequence => {
                    let (ids, d) = m.generate_sequence(&ctx, &p, dedup)?;
                    Ok((ids, Some(d)))
                }
            }
        };
        let got = run();
        if fx.has(&format!("generation/{i}/error")) {
            let err = fx.str(&format!("generation/{i}/error")).unwrap_or_default();
            errors.push(format!("{name}: {err}"));
            c.check(&format!("{tag} (HF raised)"), || {
                let (_, needles) = EXPECTED_ERRORS
                    .iter()
                    .find(|(hf, _)| err.starts_with(hf))
                    .with_context(|| format!("unknown HF error `{err}`"))?;
                match got {
                    Ok((ids, _)) => bail!("HF raised `{err}` but we returned {ids:?}"),
                    Err(e) => {
                        let msg = format!("{e:#}");
                        ensure!(
                            needles.iter().all(|s| msg.contains(s)),
                            "HF raised `{err}`; our error has another cause: {msg}"
                        );
                        Ok(())
                    }
                }
            });
            continue;
        }
        let (ids, details) = match got {
            Ok(x) => x,
            Err(e) => {
                c.check(&tag, || Err(e));
                continue;
            }
        };
        c.check(&format!("{tag}/output_ids"), || {
            let want = fx.ids2(&format!("generation/{i}/output_ids"))?;
            ensure!(
                ids == want,
                "differ:\n  got      {ids:?}\n  expected {want:?}"
            );
            Ok(())
        });
        c.check(&format!("{tag}/decoded"), || {
            let got: Vec<String> = ids
                .iter()
                .map(|r| m.generator_tokenizer.decode(r, true))
                .collect::<Result<_>>()?;
            let want = fx.strings(&format!("generation/{i}/decoded"))?;
            ensure!(got == want, "ours {got:?} vs {want:?}");
            Ok(())
        });
        let dpath = format!("generation/{i}/sequence_generation_details");
        match details {
            None => c.check(&format!("{tag}: no sequence details for RAG-Token"), || {
                ensure!(!fx.has(&dpath), "unexpected {dpath}");
                Ok(())
            }),
            Some(d) => sequence_details(fx, c, &tag, &dpath, &d, ctx, i),
        }
    }
    // README: RagToken: greedy (+ min_length), beams with nrs = beams (each) and = 1 (first beam;
    // last beam + min_length), 3 external calls; RagSequence: beams {1} + beams x dedup x nrs {1, 2},
    // one min_length variant, 2 external calls. A shorter list fails.
    c.check("generation: every documented call", || {
        let beams = manifest
            .pointer("/profile/beams")
            .and_then(|b| b.as_array())
            .context("manifest.json has no profile.beams")?
            .len();
        let want = match m.mode {
            RagMode::Token => 2 + beams + 2 + 3,
            RagMode::Sequence => (1 + beams) * 4 + 1 + 2,
        };
        ensure!(
            n == want,
            "{n} generate calls recorded, the README's list has {want}"
        );
        let mut kw = BTreeSet::new();
        for i in 0..n {
            let call = crate::common::lookup(&fx.expected, &format!("generation/{i}"))?;
            let key = (
                call.get("kwargs").map(|k| k.to_string()),
                call.get("hf_call").map(|k| k.to_string()),
            );
            ensure!(kw.insert(key), "generation/{i} repeats another call");
        }
        Ok(())
    });
    c.check("generation errors = manifest generate_errors", || {
        let want: Vec<String> = manifest
            .pointer(&format!("/generate_errors/{}", fx.name))
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .context("manifest.json has no generate_errors for this case")?;
        ensure!(errors == want, "recorded {errors:?}, manifest {want:?}");
        Ok(())
    });
}

fn sequence_details(
    fx: &Fixture,
    c: &mut Checker,
    tag: &str,
    dpath: &str,
    d: &[rustrag::rag::model::SequenceDetails],
    retrieved: &RagContext,
    entry: usize,
) {
    c.check(&format!("{tag}: one detail per question"), || {
        let n = fx.len(dpath)?;
        ensure!(n == d.len(), "{n} recorded, {} computed", d.len());
        Ok(())
    });
    let retriever_path = lookup_str(fx, &format!("generation/{entry}/hf_call"))
        .is_some_and(|s| s.starts_with("model.generate(input_ids"));
    for (q, g) in d.iter().enumerate() {
        let p = |k: &str| format!("{dpath}/{q}/{k}");
        for (key, got) in [
            ("generator_outputs", &g.generator_outputs),
            ("candidates", &g.candidates),
        ] {
            c.check(&format!("{tag}/q{q}/{key}"), || {
                let want = fx.ids2(&p(key))?;
                ensure!(
                    *got == want,
                    "differ:\n  got      {got:?}\n  expected {want:?}"
                );
                Ok(())
            });
        }
        c.close_at(fx, &p("candidate_nll"), Ok(g.candidate_nll.clone()), LOSS);
        // Compared as the sequences they pick: identical candidates (no de-duplication) tie exactly,
        // and torch.topk's choice among ties is arbitrary.
        c.check(&format!("{tag}/q{q}/top_candidates"), || {
            let wt: Vec<usize> = fx
                .ids1(&p("top_candidate_indices"))?
                .into_iter()
                .map(|x| x as usize)
                .collect();
            let wc = fx.ids2(&p("candidates"))?;
            ensure!(
                wt.len() == g.top_candidate_indices.len(),
                "{} picked, {} recorded",
                g.top_candidate_indices.len(),
                wt.len()
            );
            let pick = |cands: &[Vec<u32>], idx: &[usize]| -> Result<Vec<Vec<u32>>> {
                idx.iter()
                    .map(|&i| {
                        cands
                            .get(i)
                            .cloned()
                            .with_context(|| format!("index {i} out of range"))
                    })
                    .collect()
            };
            ensure!(
                pick(&g.candidates, &g.top_candidate_indices)? == pick(&wc, &wt)?,
                "picked sequences differ"
            );
            Ok(())
        });
        // HF re-runs retrieval when rescoring; we reuse the contexts, which must be the same docs.
        if retriever_path {
            c.check(&p("rescoring_retrieval/doc_ids"), || {
                let want = fx.ids1(&p("rescoring_retrieval/doc_ids"))?;
                let ours = fx.ids2("retrieval/doc_ids")?;
                ensure!(
                    ours.get(q) == Some(&want),
                    "rescoring used docs {want:?}, our contexts {:?}",
                    ours.get(q)
                );
                Ok(())
            });
            c.close_at(
                fx,
                &p("rescoring_retrieval/doc_scores"),
                (|| flat(&retrieved.doc_scores.get(q)?))(),
                SCORE,
            );
        } else {
            c.check(
                &format!("{tag}/q{q}: no rescoring_retrieval on the external path"),
                || {
                    ensure!(
                        !fx.has(&p("rescoring_retrieval")),
                        "unexpected rescoring_retrieval"
                    );
                    Ok(())
                },
            );
        }
    }
}

/// `generation_config` (RagToken; null for RagSequence), `generation_config_generator` and
/// `generation_global_defaults` against what our decoding uses when a call sets nothing.
fn generation_configs(fx: &Fixture, c: &mut Checker, m: &RagModel) {
    // Every recorded key of `path` (but the NOT_APPLICABLE ones) equals `ours[key]`; keys missing
    // from `ours` fail.
    let same = |path: &str, ours: Value| -> Result<()> {
        for k in fx.keys(path)? {
            if crate::common::not_applicable("rag", &format!("{path}/{k}")).is_some() {
                continue;
            }
            let want = fx.get(&format!("{path}/{k}"))?;
            let got = ours
                .get(&k)
                .with_context(|| format!("`{k}` is not modelled"))?;
            ensure!(got == want, "{k}: ours {got}, recorded {want}");
        }
        Ok(())
    };
    c.check("generation_global_defaults", || {
        let p = GenerationSettings {
            eos_token_id: Some(0),
            decoder_start_token_id: Some(0),
            ..Default::default()
        }
        .resolve()?;
        same(
            "generation_global_defaults",
            serde_json::json!({
                "max_length": p.max_length,
                "min_length": p.min_length,
                "num_beams": p.num_beams,
                "num_return_sequences": p.num_return_sequences,
                "length_penalty": p.length_penalty,
                "early_stopping": p.early_stopping == rustrag::rag::config::EarlyStopping::True,
                "no_repeat_ngram_size": p.no_repeat_ngram_size,
                "forced_bos_token_id": p.forced_bos_token_id,
                "forced_eos_token_id": p.forced_eos_token_id,
                // Not implemented: HF's defaults must be off.
                "do_sample": false,
                "repetition_penalty": 1.0,
            }),
        )
    });
    let token = m.mode == RagMode::Token;
    let sp = m.generator.special_ids();
    // The stored special ids; every other stored value must be unset (null): transformers' global
    // defaults then apply, which our defaults reproduce (checked above).
    let stored = serde_json::json!({
        "decoder_start_token_id": sp.decoder_start,
        "bos_token_id": sp.bos,
        "eos_token_id": sp.eos,
        "pad_token_id": sp.pad,
        "forced_bos_token_id": sp.forced_bos,
        "forced_eos_token_id": sp.forced_eos,
        "length_penalty": null, "early_stopping": null, "num_beams": null,
        "num_return_sequences": null, "max_length": null, "min_length": null,
        "no_repeat_ngram_size": null, "repetition_penalty": null, "do_sample": null,
        "temperature": null, "top_k": null, "top_p": null,
    });
    // RagSequenceForGeneration is not a GenerationMixin: no generation_config of its own.
    c.check("generation_config", || {
        if token {
            same("generation_config", stored.clone())
        } else {
            ensure!(
                fx.get("generation_config")?.is_null(),
                "RagSequence has no generation_config"
            );
            Ok(())
        }
    });
    c.check("generation_config_generator", || {
        same("generation_config_generator", stored.clone())
    });
    // What our decoding resolves when a call sets nothing must be those ids.
    c.check("resolved default generation ids", || {
        let p = m.generation_params(&GenerationSettings::default())?;
        ensure!(
            (
                p.decoder_start_token_id,
                p.eos_token_id,
                p.pad_token_id,
                p.forced_bos_token_id,
                p.forced_eos_token_id
            ) == (
                sp.decoder_start,
                sp.eos,
                sp.pad,
                sp.forced_bos,
                sp.forced_eos
            ),
            "resolved {p:?}"
        );
        Ok(())
    });
}

fn reload_check(fx: &Fixture, c: &mut Checker, m: &RagModel, ctx: &RagContext) {
    c.check("reload_check/identical_to_recorded_forward_loss", || {
        ensure!(
            fx.bool("reload_check/identical_to_recorded_forward_loss")?,
            "HF's reload changed the loss"
        );
        Ok(())
    });
    // Our model is loaded from the same saved rag/ dir.
    c.close_at(
        fx,
        "reload_check/reloaded_loss",
        labels(fx, "labels")
            .and_then(|l| m.loss(ctx, &l, &m.default_nll_options()))
            .and_then(|l| flat(&l)),
        LOSS,
    );
}

/// Issue 4's bad inputs: clear errors, no panics.
fn bad_input(fx: &Fixture, c: &mut Checker, m: &RagModel, index: &InMemoryIndex) {
    c.check("bad input: n_docs larger than the KB", || {
        let (ids, _) = question_tensors(fx)?;
        match m.retrieve_with_embeddings(index, &ids, &pooled(fx)?, index.passages.len() + 1) {
            Ok(_) => bail!("no error"),
            Err(e) if format!("{e:#}").contains("knowledge base has only") => Ok(()),
            Err(e) => bail!("unclear error: {e:#}"),
        }
    });
    c.check("bad input: empty question", || {
        match m.tokenize_questions(&["ok?", "  "]) {
            Ok(_) => bail!("no error"),
            Err(e) if format!("{e:#}").contains("empty") => Ok(()),
            Err(e) => bail!("unclear error: {e:#}"),
        }
    });
    c.check(
        "bad input: over-long question is truncated to the tokenizer limit",
        || {
            let long = "why ".repeat(5000);
            let (ids, _) = m.tokenize_questions(&[long.as_str()])?;
            let max = m
                .question_tokenizer
                .as_ref()
                .map(|t| t.max_length)
                .unwrap_or(usize::MAX);
            ensure!(
                ids.dim(1)? <= max,
                "{} tokens > model_max_length {max}",
                ids.dim(1)?
            );
            Ok(())
        },
    );
    c.check(
        "bad input: label id outside the generator vocabulary",
        || {
            let v = m.generator.special_ids().vocab_size as u32;
            let b = fx.ids2("questions/input_ids")?.len();
            let l = Tensor::new(vec![vec![0u32, v + 5]; b], &Device::Cpu)?;
            let ctx = fixture_context(fx, doc_scores_of(fx, "retrieval/doc_scores")?)?;
            match m.forward(&ctx, &l) {
                Ok(_) => bail!("no error"),
                Err(e) if format!("{e:#}").contains("vocabulary") => Ok(()),
                Err(e) => bail!("unclear error: {e:#}"),
            }
        },
    );
    c.check(
        "bad input: RAG config without a generator sub-config",
        || {
            let mut v: Value = rustrag::hub::read_json(&fx.dir.join("rag/config.json"))?;
            v.as_object_mut().context("config")?.remove("generator");
            match rustrag::rag::RagConfig::from_value(v) {
                Ok(_) => bail!("no error"),
                Err(e) if format!("{e:#}").contains("generator") => Ok(()),
                Err(e) => bail!("unclear error: {e:#}"),
            }
        },
    );
}
