//! Seq2seq generator parity (BART / T5), run for every RAG case directory: the generator loaded from the
//! case's `generator/` dir and from the RAG checkpoint `rag/` is fed the retrieved context rows and the
//! labels exactly as `RagModel.forward` feeds it, and its logits, log-probs and encoder output are compared
//! with HF's; step-wise decoding with the KV cache must reproduce the teacher-forced logits; the generator
//! tokenizer must reproduce the context ids.

use crate::common::{flat, Checker, Fixture, HIDDEN, LOGPROB};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rustrag::generators::auto::{load_generator_tokenizer, load_seq2seq};
use rustrag::generators::{GenInput, Seq2Seq};
use rustrag::tokenize::{ids_tensor, Padding};

pub fn check(fx: &Fixture, c: &mut Checker) {
    for (label, sub) in [
        ("generator", fx.get("paths/generator")),
        ("rag", fx.get("paths/rag")),
    ] {
        let dir = match sub.ok().and_then(|v| v.as_str()) {
            Some(s) => fx.dir.join(s),
            None => {
                c.check(&format!("{label}: path"), || {
                    bail!("expected.json has no paths/{label}")
                });
                continue;
            }
        };
        check_tokenizer(fx, c, label, &dir);
        check_model(fx, c, label, &dir);
    }
}

/// `generator_tokenizer(context_strings, max_length, padding="max_length", truncation=True)`.
fn check_tokenizer(fx: &Fixture, c: &mut Checker, label: &str, dir: &std::path::Path) {
    type Rows = Vec<Vec<u32>>;
    let run = || -> Result<(Rows, Rows)> {
        let tok = load_generator_tokenizer(&dir.to_string_lossy())?;
        let max = fx.usize("settings/max_combined_length")?;
        let strings = fx.strings("retrieval/context_strings")?;
        let refs: Vec<&str> = strings.iter().map(String::as_str).collect();
        let enc = tok.encode_batch(&refs, true, Some(max), Padding::Fixed(max))?;
        Ok((enc.input_ids, enc.attention_mask))
    };
    match run() {
        Ok((ids, mask)) => {
            let flat2 = |v: Rows| v.into_iter().flatten().collect::<Vec<_>>();
            match (
                fx.ids2("retrieval/context_input_ids"),
                fx.ids2("retrieval/context_attention_mask"),
            ) {
                (Ok(ei), Ok(em)) => {
                    c.ids(
                        &format!("{label}: context_input_ids"),
                        &flat2(ids),
                        &flat2(ei),
                    );
                    c.ids(
                        &format!("{label}: context_attention_mask"),
                        &flat2(mask),
                        &flat2(em),
                    );
                }
                (Err(e), _) | (_, Err(e)) => c.check(&format!("{label}: context ids"), || Err(e)),
            }
        }
        Err(e) => c.check(&format!("{label}: tokenize contexts"), || Err(e)),
    }
}

/// Inputs as RagModel feeds the generator: context rows `[B*K, L]` and the labels repeated per doc.
fn inputs(fx: &Fixture, dev: &Device) -> Result<(GenInput, Tensor, usize)> {
    let ids = ids_tensor(&fx.ids2("retrieval/context_input_ids")?, dev)?;
    let mask = ids_tensor(&fx.ids2("retrieval/context_attention_mask")?, dev)?;
    let k = fx.usize("settings/n_docs")?;
    let labels = fx.ids2("targets/labels")?;
    let rows: Vec<Vec<u32>> = labels
        .iter()
        .flat_map(|r| std::iter::repeat_n(r.clone(), k))
        .collect();
    if rows.len() != ids.dim(0)? {
        bail!(
            "{} label rows x {k} docs != {} context rows",
            labels.len(),
            ids.dim(0)?
        );
    }
    Ok((
        GenInput {
            input_ids: ids,
            attention_mask: mask,
        },
        ids_tensor(&rows, dev)?,
        k,
    ))
}

/// Name inside tensors.safetensors from `forward/logits_tensor` ("tensors.safetensors['forward.seq_logits'] ...").
fn logits_tensor_name(fx: &Fixture) -> Result<String> {
    let s = fx
        .get("forward/logits_tensor")?
        .as_str()
        .context("forward/logits_tensor is not a string")?;
    let start = s
        .find("['")
        .ok_or_else(|| anyhow!("cannot parse forward/logits_tensor `{s}`"))?
        + 2;
    let end = s[start..]
        .find("']")
        .ok_or_else(|| anyhow!("cannot parse forward/logits_tensor `{s}`"))?
        + start;
    Ok(s[start..end].to_string())
}

fn check_model(fx: &Fixture, c: &mut Checker, label: &str, dir: &std::path::Path) {
    let dev = Device::Cpu;
    let model = match load_seq2seq(&dir.to_string_lossy(), DType::F32, &dev, false) {
        Ok(m) => m,
        Err(e) => return c.check(&format!("{label}: load"), || Err(e)),
    };
    let (input, decoder_ids, _k) = match inputs(fx, &dev) {
        Ok(x) => x,
        Err(e) => return c.check(&format!("{label}: inputs"), || Err(e)),
    };
    let logits = match model.forward(&input, &decoder_ids) {
        Ok(l) => l,
        Err(e) => return c.check(&format!("{label}: forward"), || Err(e)),
    };
    let (rows, t_len, vocab) = match logits.dims3() {
        Ok(d) => d,
        Err(e) => return c.check(&format!("{label}: logits shape"), || Err(e.into())),
    };
    c.check(&format!("{label}: logits shape"), || {
        let want: Vec<usize> = fx
            .ids1("forward/logits_shape")?
            .into_iter()
            .map(|x| x as usize)
            .collect();
        (want == [rows, t_len, vocab])
            .then_some(())
            .ok_or_else(|| anyhow!("got {:?}, expected {want:?}", logits.dims()))
    });
    let expected = logits_tensor_name(fx).and_then(|n| fx.tensor(&n));
    match (&expected, flat(&logits)) {
        (Ok(e), Ok(g)) => match flat(e) {
            Ok(e) => c.close(&format!("{label}: forward logits"), &g, &e, LOGPROB),
            Err(err) => c.check(&format!("{label}: forward logits"), || Err(err)),
        },
        (Err(e), _) => c.check(&format!("{label}: forward logits"), || {
            Err(anyhow!("{e:#}"))
        }),
        (_, Err(e)) => c.check(&format!("{label}: forward logits"), || Err(e)),
    }
    let logprobs = match rustrag::nn::log_softmax_last_dim(&logits) {
        Ok(l) => l,
        Err(e) => return c.check(&format!("{label}: log_softmax"), || Err(e.into())),
    };
    check_top5(fx, c, label, &logprobs);
    check_selected(fx, c, label, &logprobs);
    c.check(&format!("{label}: encoder_last_hidden_state[0, 0]"), || {
        let h = model.encode(&input)?.get(0)?.get(0)?;
        let e = fx.f32s("forward/generator_encoder_last_hidden_state_row0_pos0")?;
        crate::common::compare(&flat(&h)?, &e, HIDDEN)
    });
    check_stepwise(c, label, model.as_ref(), &input, &decoder_ids, &logits);
}

fn rows_close(got: &[f32], expected: &[f32]) -> Result<()> {
    crate::common::compare(got, expected, LOGPROB)
}

/// Top-5 ids (exact) and log-probs of every (row, t).
fn check_top5(fx: &Fixture, c: &mut Checker, label: &str, logprobs: &Tensor) {
    c.check(&format!("{label}: logprobs_top5"), || {
        let want_ids = fx.get("forward/logprobs_top5/ids")?;
        let want_lp = fx.f32s("forward/logprobs_top5/logprobs")?;
        let lp = logprobs.to_vec3::<f32>()?;
        let (mut got_ids, mut exp_ids, mut got_lp) = (Vec::new(), Vec::new(), Vec::new());
        for (r, row) in lp.iter().enumerate() {
            for (t, v) in row.iter().enumerate() {
                let path = format!("{r}/{t}");
                let ids = crate::common::value_ids1(crate::common::lookup(want_ids, &path)?)?;
                let mut order: Vec<usize> = (0..v.len()).collect();
                order.sort_by(|a, b| v[*b].total_cmp(&v[*a]));
                got_ids.extend(order.iter().take(ids.len()).map(|i| *i as u32));
                got_lp.extend(order.iter().take(ids.len()).map(|i| v[*i]));
                exp_ids.extend(ids);
            }
        }
        if got_ids != exp_ids {
            bail!("top-5 ids differ:\n  got      {got_ids:?}\n  expected {exp_ids:?}");
        }
        rows_close(&got_lp, &want_lp)
    });
}

/// Full log-prob vectors at a few (row, t).
fn check_selected(fx: &Fixture, c: &mut Checker, label: &str, logprobs: &Tensor) {
    crate::rag::selected(
        c,
        fx,
        &format!("{label}: "),
        "forward/logprobs_selected",
        logprobs,
        "row",
    );
}

/// `start` + one `step` per label position reproduces the teacher-forced logits at every position.
fn check_stepwise(
    c: &mut Checker,
    label: &str,
    model: &dyn Seq2Seq,
    input: &GenInput,
    decoder_ids: &Tensor,
    full: &Tensor,
) {
    c.check(
        &format!("{label}: step-wise decoding with cache == teacher-forced logits"),
        || {
            let mut state = model.start(input)?;
            let t_len = decoder_ids.dim(1)?;
            let mut steps = Vec::with_capacity(t_len);
            for t in 0..t_len {
                let tokens = decoder_ids.narrow(1, t, 1)?.squeeze(1)?.contiguous()?;
                steps.push(model.step(&mut state, &tokens)?);
            }
            let stepped = Tensor::stack(&steps, 1)?;
            rows_close(&flat(&stepped)?, &flat(full)?)
        },
    );
}
