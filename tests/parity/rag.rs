//! RAG cases: config, question tokenization/encoding, retrieval, context strings and ids, forward logits,
//! marginalisation, every NLL flag combination, gradients, the external-retriever path, and every
//! generate call (exact ids) including RAG-Sequence thorough-decoding details.

use crate::common::{flat, Checker, Fixture};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rustrag::rag::checkpoint::{load_rag, LoadOptions};
use rustrag::rag::loss::{self, NllOptions};
use rustrag::rag::{GenerationSettings, InMemoryIndex, RagContext, RagMode, RagModel};
use rustrag::tokenize::ids_tensor;
use serde_json::Value;

pub fn check(fx: &Fixture, c: &mut Checker) {
    let model = match load_rag(
        &fx.dir.join("rag").to_string_lossy(),
        &LoadOptions {
            trainable: true,
            ..Default::default()
        },
    ) {
        Ok(m) => m,
        Err(e) => {
            c.check("load rag checkpoint", || Err(e));
            return;
        }
    };
    c.check("load rag checkpoint", || Ok(()));
    let index = match InMemoryIndex::load(
        &fx.dir.join("kb/passages.jsonl"),
        &fx.dir.join("kb/embeddings.safetensors"),
    ) {
        Ok(i) => i,
        Err(e) => {
            c.check("load kb", || Err(e));
            return;
        }
    };
    settings(fx, c, &model);
    questions(fx, c, &model);
    let ctx = retrieval(fx, c, &model, &index);
    let Some(ctx) = ctx else { return };
    forward(fx, c, &model, &ctx);
    nll(fx, c, &model, &ctx);
    gradients(fx, c, &model, &index);
    external(fx, c, &model, &ctx);
    generation(fx, c, &model, &ctx);
    bad_input(fx, c, &model, &index);
}

fn settings(fx: &Fixture, c: &mut Checker, m: &RagModel) {
    c.check("settings", || {
        let want_mode = if fx.get("model_class")?.as_str() == Some("RagTokenForGeneration") {
            RagMode::Token
        } else {
            RagMode::Sequence
        };
        if m.mode != want_mode {
            bail!("mode {:?}, expected {want_mode:?}", m.mode);
        }
        if m.config.n_docs != fx.usize("settings/n_docs")?
            || m.config.max_combined_length != fx.usize("settings/max_combined_length")?
        {
            bail!("n_docs / max_combined_length differ");
        }
        let s = |k: &str| fx.get(k).map(|v| v.as_str().map(String::from));
        if Some(m.config.title_sep.clone()) != s("settings/title_sep")?
            || Some(m.config.doc_sep.clone()) != s("settings/doc_sep")?
        {
            bail!("separators differ");
        }
        let prefix = m.format.context_format().and_then(|f| f.prefix.clone());
        if prefix != s("settings/generator_prefix")? {
            bail!(
                "generator prefix {:?} vs {:?}",
                prefix,
                s("settings/generator_prefix")?
            );
        }
        let sp = m.generator.special_ids();
        if sp.pad != fx.usize("settings/generator_pad_token_id")? as u32
            || sp.eos != fx.usize("settings/generator_eos_token_id")? as u32
        {
            bail!("generator special ids differ: {sp:?}");
        }
        Ok(())
    });
}

fn texts(fx: &Fixture) -> Result<Vec<String>> {
    fx.strings("questions/texts")
}

fn questions(fx: &Fixture, c: &mut Checker, m: &RagModel) {
    let r = (|| {
        let t = texts(fx)?;
        let refs: Vec<&str> = t.iter().map(|s| s.as_str()).collect();
        let (ids, mask) = m.tokenize_questions(&refs)?;
        Ok::<_, anyhow::Error>((ids.to_vec2::<u32>()?, mask.to_vec2::<u32>()?))
    })();
    match r {
        Ok((ids, mask)) => {
            c.ids(
                "questions/input_ids",
                &ids,
                &fx.ids2("questions/input_ids").unwrap_or_default(),
            );
            c.ids(
                "questions/attention_mask",
                &mask,
                &fx.ids2("questions/attention_mask").unwrap_or_default(),
            );
        }
        Err(e) => c.check("questions tokenization", || Err(e)),
    }
    if m.question_encoder.is_some() {
        c.check("question_encoder/pooled_output", || {
            let (ids, mask) = question_tensors(fx)?;
            let q = m
                .question_encoder
                .as_ref()
                .unwrap()
                .encode_ids(&ids, &mask)?;
            crate::common::compare(
                &flat(&q)?,
                &fx.f32s("question_encoder/pooled_output")?,
                crate::common::RTOL,
            )
        });
    }
}

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

/// Retrieval from the fixture's question embeddings (and, when the model has its question encoder, from
/// its own); returns the contexts for the later checks.
fn retrieval(
    fx: &Fixture,
    c: &mut Checker,
    m: &RagModel,
    index: &InMemoryIndex,
) -> Option<RagContext> {
    let k = fx.usize("settings/n_docs").ok()?;
    let r = (|| {
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
    let want_ids: Vec<Vec<u64>> = fx
        .ids2("retrieval/doc_ids")
        .unwrap_or_default()
        .iter()
        .map(|r| r.iter().map(|&x| x as u64).collect())
        .collect();
    c.ids("retrieval/doc_ids", &r.doc_ids, &want_ids);
    let pids: Vec<Vec<String>> = r
        .passages
        .iter()
        .map(|ps| ps.iter().map(|p| p.id.clone()).collect())
        .collect();
    let want_pids: Vec<Vec<String>> = fx
        .get("retrieval/doc_passage_ids")
        .ok()
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default();
    c.ids("retrieval/doc_passage_ids", &pids, &want_pids);
    close_t(c, fx, "retrieval/retrieved_doc_embeds", &r.doc_embeddings);
    close_t(c, fx, "retrieval/doc_scores", &r.context.doc_scores);
    c.ids(
        "retrieval/decoded_question_strings",
        &r.decoded_questions,
        &fx.strings("retrieval/decoded_question_strings")
            .unwrap_or_default(),
    );
    c.ids(
        "retrieval/context_strings",
        &r.context_strings,
        &fx.strings("retrieval/context_strings").unwrap_or_default(),
    );
    c.ids(
        "retrieval/context_input_ids",
        &r.context.input_ids.to_vec2::<u32>().unwrap_or_default(),
        &fx.ids2("retrieval/context_input_ids").unwrap_or_default(),
    );
    c.ids(
        "retrieval/context_attention_mask",
        &r.context
            .attention_mask
            .to_vec2::<u32>()
            .unwrap_or_default(),
        &fx.ids2("retrieval/context_attention_mask")
            .unwrap_or_default(),
    );
    c.check("retrieval/all_kb_scores", || {
        let q = pooled(fx)?.to_vec2::<f32>()?;
        let got: Vec<f32> = q.iter().flat_map(|qv| index.scores(qv)).collect();
        crate::common::compare(
            &got,
            &fx.f32s("retrieval/all_kb_scores")?,
            crate::common::RTOL,
        )
    });
    if m.question_encoder.is_some() {
        c.check("retrieval through the question encoder", || {
            let (ids, mask) = question_tensors(fx)?;
            let own = m.retrieve_ids(index, &ids, &mask, k)?;
            if own.doc_ids != want_ids {
                bail!("doc ids {:?} vs {:?}", own.doc_ids, want_ids);
            }
            crate::common::compare(
                &flat(&own.context.doc_scores)?,
                &fx.f32s("retrieval/doc_scores")?,
                crate::common::RTOL,
            )
        });
    }
    Some(r.context)
}

/// Tolerance for d loss / d doc_scores (and the question embedding, which gets its gradient only
/// through them). These gradients are ~1e-4 differences of O(1) terms (posterior minus prior), so
/// float32 cancellation noise is ~1e-3 of their size: recomputing them in float64 from the fixture's
/// own logits differs from the recorded float32 values by up to 1e-3 relative.
const GRAD_RTOL: f64 = 1e-2;

fn close_tol_t(c: &mut Checker, fx: &Fixture, path: &str, t: &Tensor, rtol: f64) {
    match (flat(t), fx.f32s(path)) {
        (Ok(g), Ok(e)) => c.close_tol(path, &g, &e, rtol),
        (Err(e), _) | (_, Err(e)) => c.check(path, || Err(e)),
    }
}

fn close_t(c: &mut Checker, fx: &Fixture, path: &str, t: &Tensor) {
    match (flat(t), fx.f32s(path)) {
        (Ok(g), Ok(e)) => c.close(path, &g, &e),
        (Err(e), _) | (_, Err(e)) => c.check(path, || Err(e)),
    }
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

fn selected(c: &mut Checker, name: &str, lp: &Tensor, entries: &Value, row_key: &str) {
    let Some(list) = entries.as_array() else {
        c.check(name, || bail!("not a list"));
        return;
    };
    for (i, e) in list.iter().enumerate() {
        c.check(&format!("{name}/{i}"), || {
            let row = e.get(row_key).and_then(|v| v.as_u64()).context("row")? as usize;
            let t = e.get("t").and_then(|v| v.as_u64()).context("t")? as usize;
            let mut want = Vec::new();
            crate::common::flatten_f32(e.get("logprobs").context("logprobs")?, &mut want)?;
            let got = flat(&lp.get(row)?.get(t)?)?;
            crate::common::compare(&got, &want, crate::common::RTOL)
        });
    }
}

fn forward(fx: &Fixture, c: &mut Checker, m: &RagModel, ctx: &RagContext) {
    let logits = match labels(fx, "labels").and_then(|l| m.forward(ctx, &l)) {
        Ok(l) => l,
        Err(e) => {
            c.check("forward", || Err(e));
            return;
        }
    };
    match fx.tensor("forward.seq_logits") {
        Ok(want) => c.close(
            "forward.seq_logits",
            &flat(&logits).unwrap_or_default(),
            &flat(&want).unwrap_or_default(),
        ),
        Err(e) => c.check("forward.seq_logits", || Err(e)),
    }
    close_t(c, fx, "forward/doc_scores", &ctx.doc_scores);
    c.check("forward/loss_default", || {
        let l = m.loss(ctx, &labels(fx, "labels")?, &m.default_nll_options())?;
        crate::common::compare(
            &flat(&l)?,
            &fx.f32s("forward/loss_default")?,
            crate::common::RTOL,
        )
    });
    if let Ok(lp) = rustrag::nn::log_softmax_last_dim(&logits) {
        if let Ok(sel) = fx.get("forward/logprobs_selected") {
            selected(c, "forward/logprobs_selected", &lp, sel, "row");
        }
        c.check("forward/logprobs_top5", || {
            top5(&lp, fx, "forward/logprobs_top5")
        });
    }
    c.check(
        "forward/generator_encoder_last_hidden_state_row0_pos0",
        || {
            let g = m.generator.seq2seq().context("not a seq2seq generator")?;
            let h = g.encode(&ctx.gen_input())?;
            crate::common::compare(
                &flat(&h.get(0)?.get(0)?)?,
                &fx.f32s("forward/generator_encoder_last_hidden_state_row0_pos0")?,
                crate::common::RTOL,
            )
        },
    );
    if fx.has("forward/marginalized") {
        // From the fixture's own logits (pure marginalisation) and from ours.
        c.check("forward.marginalized_logprobs (fixture logits)", || {
            let got = loss::marginalize(
                &fx.tensor("forward.seq_logits")?,
                &doc_scores_of(fx, "forward/doc_scores")?,
                ctx.n_docs,
            )?;
            crate::common::compare(
                &flat(&got)?,
                &flat(&fx.tensor("forward.marginalized_logprobs")?)?,
                crate::common::RTOL,
            )
        });
        if let Ok(marg) = loss::marginalize(&logits, &ctx.doc_scores, ctx.n_docs) {
            c.close(
                "forward.marginalized_logprobs",
                &flat(&marg).unwrap_or_default(),
                &fx.tensor("forward.marginalized_logprobs")
                    .and_then(|t| flat(&t))
                    .unwrap_or_default(),
            );
            if let Ok(sel) = fx.get("forward/marginalized/selected") {
                selected(c, "forward/marginalized/selected", &marg, sel, "b");
            }
            c.check("forward/marginalized/top5", || {
                top5(&marg, fx, "forward/marginalized/top5")
            });
        }
    }
}

/// Top-5 ids exact and their log-probs close. `lp: [rows, T, V]`.
fn top5(lp: &Tensor, fx: &Fixture, path: &str) -> Result<()> {
    let want_ids: Vec<Vec<Vec<u32>>> =
        serde_json::from_value(fx.get(&format!("{path}/ids"))?.clone())?;
    let want_lp = fx.f32s(&format!("{path}/logprobs"))?;
    let v: Vec<Vec<Vec<f32>>> = lp.to_vec3()?;
    let mut got_lp = Vec::new();
    for (r, rows) in want_ids.iter().enumerate() {
        for (t, ids) in rows.iter().enumerate() {
            let row = &v[r][t];
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            let got: Vec<u32> = order[..ids.len()].iter().map(|&i| i as u32).collect();
            if &got != ids {
                bail!("row {r} t {t}: top ids {got:?} vs {ids:?}");
            }
            got_lp.extend(order[..ids.len()].iter().map(|&i| row[i]));
        }
    }
    crate::common::compare(&got_lp, &want_lp, crate::common::RTOL)
}

fn doc_scores_of(fx: &Fixture, path: &str) -> Result<Tensor> {
    let v = fx.f32s(path)?;
    let b = fx.ids2("questions/input_ids")?.len();
    Ok(Tensor::from_vec(v.clone(), (b, v.len() / b), &Device::Cpu)?)
}

fn nll(fx: &Fixture, c: &mut Checker, m: &RagModel, ctx: &RagContext) {
    let Ok(Value::Array(results)) = fx.get("nll/results").cloned() else {
        c.check("nll/results", || bail!("missing"));
        return;
    };
    let fixture_logits = fx.tensor("forward.seq_logits").ok();
    for (i, r) in results.iter().enumerate() {
        let name = r
            .get("labels")
            .and_then(|v| v.as_str())
            .unwrap_or("labels")
            .to_string();
        let opts = NllOptions {
            reduce_loss: r
                .get("reduce_loss")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            epsilon: r.get("epsilon").and_then(|v| v.as_f64()).unwrap_or(0.0),
            exclude_bos_score: r
                .get("exclude_bos_score")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        };
        let tag = format!(
            "nll/{i} ({name}, reduce={}, eps={}, exclude_bos={})",
            opts.reduce_loss, opts.epsilon, opts.exclude_bos_score
        );
        let mut want = Vec::new();
        if let Err(e) = r
            .get("value")
            .ok_or_else(|| anyhow!("no value"))
            .and_then(|v| crate::common::flatten_f32(v, &mut want))
        {
            c.check(&tag, || Err(e));
            continue;
        }
        c.check(&tag, || {
            let l = labels(fx, &name)?;
            let logits = m.forward(ctx, &l)?;
            let got = m.nll(&logits, &ctx.doc_scores, &l, ctx.n_docs, &opts)?;
            crate::common::compare(&flat(&got)?, &want, crate::common::RTOL)
        });
        // The pure loss math on HF's own logits (same label length only).
        if let (Some(fl), "labels") = (&fixture_logits, name.as_str()) {
            c.check(&format!("{tag} on fixture logits"), || {
                let l = labels(fx, &name)?;
                let got = m.nll(
                    fl,
                    &doc_scores_of(fx, "forward/doc_scores")?,
                    &l,
                    ctx.n_docs,
                    &opts,
                )?;
                crate::common::compare(&flat(&got)?, &want, crate::common::RTOL)
            });
        }
    }
}

/// Gradients of the training loss (label smoothing 0.1, reduce_loss) w.r.t. doc scores, the question
/// embedding and every parameter; then the end-to-end variant through the context encoder.
fn gradients(fx: &Fixture, c: &mut Checker, m: &RagModel, index: &InMemoryIndex) {
    if !fx.has("gradients") {
        return;
    }
    let opts = NllOptions {
        reduce_loss: true,
        epsilon: 0.1,
        exclude_bos_score: false,
    };
    // The same gradient on HF's own logits isolates the loss math from generator float noise.
    c.check("gradients/d_loss_d_doc_scores (fixture logits)", || {
        let ds = Var::from_tensor(&doc_scores_of(fx, "gradients/doc_scores")?)?;
        let l = m.nll(
            &fx.tensor("forward.seq_logits")?,
            ds.as_tensor(),
            &labels(fx, "labels")?,
            fx.usize("settings/n_docs")?,
            &opts,
        )?;
        let g = l
            .backward()?
            .get(ds.as_tensor())
            .context("no gradient")?
            .clone();
        crate::common::compare(
            &flat(&g)?,
            &fx.f32s("gradients/d_loss_d_doc_scores")?,
            GRAD_RTOL,
        )
    });
    let k = match fx.usize("settings/n_docs") {
        Ok(k) => k,
        Err(e) => return c.check("settings/n_docs", || Err(e)),
    };
    let r = (|| {
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
    close_t(c, fx, "gradients/loss", &loss);
    close_tol_t(c, fx, "gradients/d_loss_d_doc_scores", &g_ds, GRAD_RTOL);
    close_tol_t(
        c,
        fx,
        "gradients/d_loss_d_question_pooled_output",
        &g_q,
        GRAD_RTOL,
    );
    let mut vars: std::collections::HashMap<String, Var> = m.generator.vars().into_iter().collect();
    if let Some(q) = &m.question_encoder {
        vars.extend(q.vars());
    }
    // Question-encoder gradients are d loss / d doc_scores pushed back: they carry its float noise.
    grad_norms(
        c,
        fx,
        "gradients/grad_l2_norms_all",
        &grads,
        &vars,
        &[
            ("rag.generator.", 1e-3),
            ("rag.question_encoder.", GRAD_RTOL),
        ],
    );
    full_gradients(c, fx, "gradients/full_gradients", &grads, &vars);
    end_to_end(fx, c, m, &ret, &opts);
}

/// `grad_l2_norms`-style map at `path` (parameter name -> L2 norm) against our gradients, for the
/// parameters starting with each prefix (its relative tolerance), with an absolute floor of 1e-6 of
/// the largest norm: some gradients are mathematically zero (attention key biases: softmax is
/// shift-invariant) and both sides hold only float noise there. Parameters whose gradient is zero by
/// [`shift_invariant`] are checked to be negligible (< 1e-4 of the largest norm) on both sides instead,
/// since the size of float noise is not reproducible.
fn grad_norms(
    c: &mut Checker,
    fx: &Fixture,
    path: &str,
    grads: &candle_core::backprop::GradStore,
    vars: &std::collections::HashMap<String, Var>,
    groups: &[(&str, f64)],
) {
    let Ok(Value::Object(norms)) = fx.get(path).cloned() else {
        return;
    };
    for (prefix, rtol) in groups {
        let sel: Vec<(&String, f64)> = norms
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(n, v)| (n, v.as_f64().unwrap_or(f64::NAN)))
            .collect();
        if sel.is_empty() {
            continue;
        }
        c.check(
            &format!("{path} ({prefix}*, {} parameters)", sel.len()),
            || {
                let largest = sel.iter().fold(0f64, |m, (_, w)| m.max(w.abs()));
                let floor = 1e-6 * largest;
                let last_layer = sel
                    .iter()
                    .filter_map(|(n, _)| n.split(".layer.").nth(1)?.split('.').next()?.parse::<usize>().ok())
                    .max();
                for (name, want) in &sel {
                    let var = vars
                        .get(*name)
                        .with_context(|| format!("no trainable parameter {name}"))?;
                    let got = match grads.get(var.as_tensor()) {
                        Some(g) => g.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64,
                        None => 0.0,
                    };
                    if shift_invariant(path, name, last_layer) {
                        if got > 1e-4 * largest || *want > 1e-4 * largest {
                            bail!("{name}: gradient should be float noise, got {got} vs {want} (largest {largest})");
                        }
                    } else if (got - want).abs() > rtol * want.abs() + floor {
                        bail!("{name}: grad norm {got} vs {want}");
                    }
                }
                Ok(())
            },
        );
    }
}

/// Parameters whose gradient is mathematically zero in the end-to-end loss: the context encoder's
/// last output LayerNorm bias shifts every doc embedding by the same vector, and the doc prior is a
/// softmax over docs, so `Σ_j ∂L/∂score_ij = 0` cancels it exactly.
fn shift_invariant(path: &str, name: &str, last_layer: Option<usize>) -> bool {
    path.starts_with("end_to_end/")
        && name.starts_with("ctx_encoder.")
        && last_layer.is_some_and(|l| name.ends_with(&format!(".layer.{l}.output.LayerNorm.bias")))
}

fn full_gradients(
    c: &mut Checker,
    fx: &Fixture,
    path: &str,
    grads: &candle_core::backprop::GradStore,
    vars: &std::collections::HashMap<String, Var>,
) {
    let Ok(Value::Object(full)) = fx.get(path).cloned() else {
        return;
    };
    for (name, v) in &full {
        c.check(&format!("{path}/{name}"), || {
            let var = vars
                .get(name)
                .with_context(|| format!("no parameter {name}"))?;
            let g = grads.get(var.as_tensor()).context("no gradient")?;
            let mut want = Vec::new();
            crate::common::flatten_f32(v.get("grad").unwrap_or(v), &mut want)?;
            crate::common::compare(&flat(g)?, &want, GRAD_RTOL)
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
) {
    if !fx.has("end_to_end") {
        return;
    }
    let enc_opts = rustrag::encoders::LoadOptions {
        trainable: true,
        ..Default::default()
    };
    let ctx_enc = match rustrag::encoders::dpr::DprEncoder::load(
        &fx.dir.join("ctx_encoder").to_string_lossy(),
        &enc_opts,
    ) {
        Ok(e) => e,
        Err(e) => return c.check("end_to_end: load ctx_encoder", || Err(e)),
    };
    let r = (|| {
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
        Ok::<_, anyhow::Error>((enc, ctx, loss, g_ds, grads))
    })();
    let (enc, ctx, loss, g_ds, grads) = match r {
        Ok(x) => x,
        Err(e) => return c.check("end_to_end", || Err(e)),
    };
    c.ids(
        "end_to_end/tokenized_docs_input_ids",
        &enc.input_ids,
        &fx.ids2("end_to_end/tokenized_docs_input_ids")
            .unwrap_or_default(),
    );
    c.ids(
        "end_to_end/tokenized_docs_attention_mask",
        &enc.attention_mask,
        &fx.ids2("end_to_end/tokenized_docs_attention_mask")
            .unwrap_or_default(),
    );
    close_t(c, fx, "end_to_end/doc_scores", &ctx.doc_scores);
    close_t(c, fx, "end_to_end/loss", &loss);
    close_tol_t(c, fx, "end_to_end/d_loss_d_doc_scores", &g_ds, GRAD_RTOL);
    let vars: std::collections::HashMap<String, Var> = ctx_enc.vars().into_iter().collect();
    grad_norms(
        c,
        fx,
        "end_to_end/ctx_grad_l2_norms_all",
        &grads,
        &vars,
        &[("ctx_encoder.", GRAD_RTOL)],
    );
    full_gradients(c, fx, "end_to_end/ctx_full_gradients", &grads, &vars);
    if let Some(q) = &m.question_encoder {
        c.check(
            "end_to_end/question_encoder_grad_l2_norm_word_embeddings",
            || {
                let name = fx
                    .get("gradients/named_parameters/question_encoder_word_embeddings")?
                    .as_str()
                    .context("name")?
                    .to_string();
                let qv: std::collections::HashMap<String, Var> = q.vars().into_iter().collect();
                let g = grads
                    .get(
                        qv.get(&name)
                            .with_context(|| format!("no parameter {name}"))?
                            .as_tensor(),
                    )
                    .context("no gradient")?;
                let got = g.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
                let want = fx.f32s("end_to_end/question_encoder_grad_l2_norm_word_embeddings")?;
                crate::common::compare(&[got], &want, GRAD_RTOL)
            },
        );
    }
}

fn external(fx: &Fixture, c: &mut Checker, m: &RagModel, _ctx: &RagContext) {
    let Ok(Value::Array(variants)) = fx.get("external_retriever/variants").cloned() else {
        return;
    };
    for (i, v) in variants.iter().enumerate() {
        let name = v
            .get("name")
            .and_then(|n| n.as_str())
            .unwrap_or("?")
            .to_string();
        let r = (|| {
            let ds = doc_scores_of(fx, &format!("external_retriever/variants/{i}/doc_scores"))?;
            let ctx = fixture_context(fx, ds)?;
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
                close_t(
                    c,
                    fx,
                    &format!("external_retriever/variants/{i}/loss"),
                    &loss,
                );
                close_t(
                    c,
                    fx,
                    &format!("external_retriever/variants/{i}/loss_reduce_loss"),
                    &reduced,
                );
                if let Some(sel) = v.get("logprobs_selected") {
                    selected(
                        c,
                        &format!("external_retriever/{name}/logprobs_selected"),
                        &lp,
                        sel,
                        "row",
                    );
                }
            }
            Err(e) => c.check(&format!("external_retriever/{name}"), || Err(e)),
        }
    }
}

fn custom_scores(fx: &Fixture) -> Result<Tensor> {
    let Value::Array(vs) = fx.get("external_retriever/variants")?.clone() else {
        bail!("no variants")
    };
    let i = vs
        .iter()
        .position(|v| v.get("name").and_then(|n| n.as_str()) == Some("custom_doc_scores"))
        .context("no custom_doc_scores variant")?;
    doc_scores_of(fx, &format!("external_retriever/variants/{i}/doc_scores"))
}

fn generation(fx: &Fixture, c: &mut Checker, m: &RagModel, ctx: &RagContext) {
    let Ok(Value::Array(entries)) = fx.get("generation").cloned() else {
        return;
    };
    for e in &entries {
        let name = e
            .get("name")
            .and_then(|n| n.as_str())
            .unwrap_or("?")
            .to_string();
        let kw = e.get("kwargs").cloned().unwrap_or(Value::Null);
        let overrides = GenerationSettings::from_value(&kw);
        let dedup = kw
            .get("do_deduplication")
            .and_then(|v| v.as_bool())
            .unwrap_or(m.config.do_deduplication);
        let run = || -> Result<Generated> {
            let n_docs = kw
                .get("n_docs")
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .unwrap_or(ctx.n_docs);
            if n_docs != ctx.n_docs {
                bail!("n_docs {n_docs} differs from the retrieved contexts");
            }
            let ctx = if name.contains("custom") {
                fixture_context(fx, custom_scores(fx)?)?
            } else if name.starts_with("external") {
                fixture_context(fx, doc_scores_of(fx, "retrieval/doc_scores")?)?
            } else {
                ctx.clone()
            };
            let p = m.generation_params(&overrides)?;
            match m.mode {
                RagMode::Token => Ok((m.generate_token(&ctx, &p)?, None)),
                RagMode::Sequence => {
                    let (ids, d) = m.generate_sequence(&ctx, &p, dedup)?;
                    Ok((ids, Some(d)))
                }
            }
        };
        let got = run();
        if let Some(err) = e.get("error").and_then(|v| v.as_str()) {
            c.check(
                &format!("generation/{name} (expected error)"),
                || match got {
                    Ok(ids) => bail!("HF raised `{err}` but we returned {:?}", ids.0),
                    Err(_) => Ok(()),
                },
            );
            continue;
        }
        match got {
            Ok((ids, details)) => {
                c.ids(
                    &format!("generation/{name}"),
                    &ids,
                    &fx.ids2(&format!("generation/{}/output_ids", idx(&entries, &name)))
                        .unwrap_or_default(),
                );
                if let (Some(d), Some(Value::Array(want))) =
                    (details, e.get("sequence_generation_details"))
                {
                    for (q, (g, w)) in d.iter().zip(want).enumerate() {
                        let wid = |k: &str| {
                            w.get(k)
                                .map(|v| crate::common::value_ids2(v).unwrap_or_default())
                                .unwrap_or_default()
                        };
                        c.ids(
                            &format!("generation/{name}/q{q}/generator_outputs"),
                            &g.generator_outputs,
                            &wid("generator_outputs"),
                        );
                        c.ids(
                            &format!("generation/{name}/q{q}/candidates"),
                            &g.candidates,
                            &wid("candidates"),
                        );
                        let mut wn = Vec::new();
                        let _ = w
                            .get("candidate_nll")
                            .map(|v| crate::common::flatten_f32(v, &mut wn));
                        c.close(
                            &format!("generation/{name}/q{q}/candidate_nll"),
                            &g.candidate_nll,
                            &wn,
                        );
                        // Compared as the sequences they pick: identical candidates (no de-duplication)
                        // tie exactly, and torch.topk's choice among ties is arbitrary.
                        let wt: Vec<usize> = w
                            .get("top_candidate_indices")
                            .and_then(|v| serde_json::from_value(v.clone()).ok())
                            .unwrap_or_default();
                        let wc = wid("candidates");
                        let pick = |cands: &[Vec<u32>], idx: &[usize]| {
                            idx.iter()
                                .map(|&i| cands.get(i).cloned().unwrap_or_default())
                                .collect::<Vec<_>>()
                        };
                        c.ids(
                            &format!("generation/{name}/q{q}/top_candidates"),
                            &pick(&g.candidates, &g.top_candidate_indices),
                            &pick(&wc, &wt),
                        );
                    }
                }
            }
            Err(err) => c.check(&format!("generation/{name}"), || Err(err)),
        }
    }
}

/// Output ids, plus RAG-Sequence details per question.
type Generated = (
    Vec<Vec<u32>>,
    Option<Vec<rustrag::rag::model::SequenceDetails>>,
);

fn idx(entries: &[Value], name: &str) -> usize {
    entries
        .iter()
        .position(|e| e.get("name").and_then(|n| n.as_str()) == Some(name))
        .unwrap_or(0)
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
            if ids.dim(1)? > max {
                bail!("{} tokens > model_max_length {max}", ids.dim(1)?);
            }
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
    let _ = DType::F32;
}
