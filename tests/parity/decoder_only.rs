//! decoder-only case: a tiny `LlamaForCausalLM` as a RAG generator with prompt = doc + question,
//! through the one RAG head (`RagModel` over `Generator::DecoderOnly`): doc prior, prompts, both
//! losses, per-token marginals, greedy RAG-Token decoding (see `definition` in expected.json).

use crate::common::{Checker, Fixture};
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use rustrag::encoders::dpr::DprEncoder;
use rustrag::encoders::{LoadOptions, TextEncoder};
use rustrag::generators::llama::Llama;
use rustrag::rag::context::prompt_text;
use rustrag::rag::loss::{self, NllOptions};
use rustrag::rag::pipeline::decoder_only_rag;
use rustrag::retrieve::Passage;
use rustrag::tokenize::{ids_tensor, load_tokenizer};

fn read_passages(path: &std::path::Path) -> Result<Vec<Passage>> {
    #[derive(serde::Deserialize)]
    struct Row {
        title: String,
        text: String,
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let r: Row =
                serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))?;
            Ok(Passage {
                id: i.to_string(),
                title: r.title,
                text: r.text,
            })
        })
        .collect()
}

/// Largest and second-largest value of a row.
fn top2(xs: &[f32]) -> (f32, f32) {
    let mut t = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in xs {
        if x > t.0 {
            t = (x, t.0);
        } else if x > t.1 {
            t.1 = x;
        }
    }
    t
}

pub fn check(fx: &Fixture, c: &mut Checker) {
    if let Err(e) = run(fx, c) {
        c.check("decoder-only setup", || Err(e));
    }
}

fn run(fx: &Fixture, c: &mut Checker) -> Result<()> {
    let path = |key: &str| -> Result<std::path::PathBuf> {
        Ok(fx.dir.join(
            fx.get(&format!("paths/{key}"))?
                .as_str()
                .context("path is not a string")?,
        ))
    };
    let model_dir = path("model")?;
    let tok = load_tokenizer(&model_dir)?;
    let rag = decoder_only_rag(
        Box::new(Llama::from_hf_dir(&model_dir, &Device::Cpu)?),
        tok,
        None,
        4096,
        &model_dir,
    )?;
    // A second copy for the one-sequence full forward (outside the RAG head).
    let model = Llama::from_hf_dir(&model_dir, &Device::Cpu)?;
    let passages = read_passages(&path("kb_passages")?)?;
    let steps = fx.usize("steps")?;
    let n_docs = fx.usize("n_docs")?;
    let sp = rag.generator.special_ids().clone();
    c.ids(
        "special ids",
        &[sp.bos, Some(sp.eos)],
        &[
            Some(fx.usize("bos_token_id")? as u32),
            Some(fx.usize("eos_token_id")? as u32),
        ],
    );
    let pad = rag.generator_pad();
    let n_questions = fx.get("questions")?.as_array().context("questions")?.len();
    // Retrieval: DPR question encoder over all questions (padding = longest), exact inner product
    // against the KB embeddings, top-K.
    let qenc = DprEncoder::load(
        &path("question_encoder")?.display().to_string(),
        &LoadOptions::default(),
    )?;
    let questions: Vec<String> = (0..n_questions)
        .map(|qi| {
            Ok(fx
                .get(&format!("questions/{qi}/question"))?
                .as_str()
                .context("question")?
                .to_string())
        })
        .collect::<Result<_>>()?;
    let q_refs: Vec<&str> = questions.iter().map(|s| s.as_str()).collect();
    let q_emb = qenc.encode_texts(&q_refs)?;
    let emb_path = path("kb_embeddings")?;
    let kb = candle_core::safetensors::load(&emb_path, &Device::Cpu)?;
    let kb = kb
        .get("embeddings")
        .with_context(|| format!("{}: no `embeddings` tensor", emb_path.display()))?;
    let all_scores = q_emb.matmul(&kb.t()?)?.to_vec2::<f32>()?;
    for (qi, kb_scores) in all_scores.iter().enumerate() {
        let q = |k: &str| format!("questions/{qi}/{k}");
        let question = questions[qi].clone();
        let answer = fx
            .get(&q("answer"))?
            .as_str()
            .context("answer")?
            .to_string();
        let doc_ids = fx.ids1(&q("doc_ids"))?;
        c.check(&format!("q{qi} n_docs"), || {
            anyhow::ensure!(
                doc_ids.len() == n_docs,
                "{} docs, n_docs {n_docs}",
                doc_ids.len()
            );
            Ok(())
        });
        let mut order: Vec<usize> = (0..kb_scores.len()).collect();
        order.sort_by(|&a, &b| kb_scores[b].total_cmp(&kb_scores[a]));
        let top: Vec<u32> = order[..n_docs.min(order.len())]
            .iter()
            .map(|&i| i as u32)
            .collect();
        c.ids(&format!("q{qi} retrieved doc_ids"), &top, &doc_ids);
        let doc_scores: Vec<f32> = top.iter().map(|&i| kb_scores[i as usize]).collect();
        c.close(
            &format!("q{qi} doc_scores"),
            &doc_scores,
            &fx.f32s(&q("doc_scores"))?,
        );
        let docs: Vec<Passage> = doc_ids
            .iter()
            .map(|&i| {
                passages
                    .get(i as usize)
                    .cloned()
                    .with_context(|| format!("doc id {i} outside the KB"))
            })
            .collect::<Result<_>>()?;
        let k = docs.len();
        let doc_scores = Tensor::new(doc_scores.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let (rows, ctx) = rag.context_from_passages(
            std::slice::from_ref(&question),
            std::slice::from_ref(&docs),
            doc_scores,
        )?;
        // doc_logprobs = log_softmax(doc_scores) over the retrieved top-K: the head's doc prior.
        let doc_lp = loss::doc_log_prior(&ctx.prior_scores()?, candle_core::DType::F32)?;
        c.close(
            &format!("q{qi} doc_logprobs"),
            &doc_lp.flatten_all()?.to_vec1::<f32>()?,
            &fx.f32s(&q("doc_logprobs"))?,
        );
        let prompts: Vec<String> = docs
            .iter()
            .map(|d| prompt_text(&d.title, &d.text, &question))
            .collect();
        c.ids(
            &format!("q{qi} prompts"),
            &prompts,
            &fx.strings(&q("prompts"))?,
        );
        c.ids(&format!("q{qi} context strings"), &rows.strings, &prompts);
        let expected_prompt_ids = fx.ids2(&q("prompt_ids"))?;
        for (z, exp) in expected_prompt_ids.iter().enumerate() {
            let got = &rows.encoded.input_ids[z];
            let len = rows.encoded.attention_mask[z].iter().sum::<u32>() as usize;
            c.ids(
                &format!("q{qi} prompt_ids[{z}] bos"),
                &got[..1],
                &[sp.bos.unwrap_or(0)],
            );
            c.ids(&format!("q{qi} prompt_ids[{z}]"), &got[1..len], exp);
        }
        // Labels = [start] + answer_ids; the answer's log-probs through the head's forward.
        let labels_row = rag.answer_labels(&answer)?;
        let answer_ids = labels_row[1..].to_vec();
        c.ids(
            &format!("q{qi} answer_ids"),
            &answer_ids,
            &fx.ids1(&q("answer_ids"))?,
        );
        let t = answer_ids.len();
        let labels = ids_tensor(std::slice::from_ref(&labels_row), &Device::Cpu)?;
        let logits = rag.forward(&ctx, &labels)?; // [k, t + 1, V]
        let tok_lp = loss::target_logprobs(&logits, &labels, k, pad)?.narrow(2, 0, t)?; // [1, k, t]
        c.close(
            &format!("q{qi} answer_token_logprobs"),
            &tok_lp.flatten_all()?.to_vec1::<f32>()?,
            &fx.f32s(&q("answer_token_logprobs"))?,
        );
        c.close(
            &format!("q{qi} answer_loglik_per_doc"),
            &tok_lp.sum(2)?.flatten_all()?.to_vec1::<f32>()?,
            &fx.f32s(&q("answer_loglik_per_doc"))?,
        );
        // Both losses of the head (no smoothing, per question) are the negated marginals.
        let opts = NllOptions {
            reduce_loss: false,
            epsilon: 0.0,
            exclude_bos_score: false,
        };
        let prior = ctx.prior_scores()?;
        let seq = loss::rag_sequence_nll(&logits, &prior, &labels, k, pad, None, &opts)?;
        c.close(
            &format!("q{qi} rag_sequence_loglik"),
            &[-seq.to_vec1::<f32>()?[0]],
            &fx.f32s(&q("rag_sequence_loglik"))?,
        );
        let tok_nll = loss::rag_token_nll(&logits, &prior, &labels, k, pad, &opts)?;
        c.close(
            &format!("q{qi} rag_token_loglik"),
            &[-tok_nll.to_vec1::<f32>()?[0]],
            &fx.f32s(&q("rag_token_loglik"))?,
        );
        let marginal = loss::marginalize(&logits, &prior, k)?
            .squeeze(0)?
            .to_vec2::<f32>()?;
        let per_token: Vec<f32> = (0..t)
            .map(|i| marginal[i][answer_ids[i] as usize])
            .collect();
        c.close(
            &format!("q{qi} rag_token_marginal_per_token"),
            &per_token,
            &fx.f32s(&q("rag_token_marginal_per_token"))?,
        );
        // The same log-probs through the full teacher-forced forward (one unpadded sequence per doc).
        let mut full = Vec::new();
        for z in 0..k {
            let len = rows.encoded.attention_mask[z].iter().sum::<u32>() as usize;
            full.extend(model.score_continuation(&rows.encoded.input_ids[z][..len], &answer_ids)?);
        }
        c.close(
            &format!("q{qi} answer_token_logprobs (full forward)"),
            &full,
            &fx.f32s(&q("answer_token_logprobs"))?,
        );

        // Greedy RAG-Token decoding through the head's search (stops at EOS, as HF generate does).
        let gp = |k: &str| q(&format!("greedy_rag_token/{k}"));
        let expected = fx.ids1(&gp("generated_ids"))?;
        let params = rag.generation_params(&rustrag::rag::GenerationSettings {
            num_beams: Some(1),
            max_length: Some(steps + 1),
            ..Default::default()
        })?;
        let generated = rag.generate_token(&ctx, &params)?;
        let until_eos = expected
            .iter()
            .position(|&x| x == sp.eos)
            .map_or(expected.len(), |i| i + 1);
        c.ids(
            &format!("q{qi} greedy generated_ids (to EOS)"),
            &generated[0][1..],
            &expected[..until_eos],
        );
        // The fixture's `steps` tokens (past EOS) teacher-forced through the marginal: the argmax,
        // chosen log-prob and top-1/top-2 margin at every step.
        let mut tf = vec![sp.decoder_start];
        tf.extend(&expected);
        let tf = ids_tensor(&[tf], &Device::Cpu)?;
        let marginal = loss::marginalize(&rag.forward(&ctx, &tf)?, &prior, k)?
            .squeeze(0)?
            .to_vec2::<f32>()?;
        let argmax: Vec<u32> = marginal[..steps]
            .iter()
            .map(|r| {
                r.iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(i, _)| i as u32)
            })
            .collect();
        c.ids(&format!("q{qi} greedy generated_ids"), &argmax, &expected);
        let chosen: Vec<f32> = (0..steps)
            .map(|i| marginal[i][expected[i] as usize])
            .collect();
        c.close(
            &format!("q{qi} greedy chosen_marginal_logprob"),
            &chosen,
            &fx.f32s(&gp("chosen_marginal_logprob"))?,
        );
        let margins: Vec<f32> = marginal[..steps]
            .iter()
            .map(|r| {
                let (a, b) = top2(r);
                a - b
            })
            .collect();
        c.close(
            &format!("q{qi} greedy top1_top2_margin"),
            &margins,
            &fx.f32s(&gp("top1_top2_margin"))?,
        );
        c.close(
            &format!("q{qi} greedy step0_marginal_logprobs"),
            &marginal[0],
            &fx.f32s(&gp("step0_marginal_logprobs"))?,
        );
        if fx.has(&gp("decoded")) {
            let decoded = rag.generator_tokenizer.decode(&argmax, false)?;
            c.ids(
                &format!("q{qi} greedy decoded"),
                &[decoded],
                &[fx.get(&gp("decoded"))?
                    .as_str()
                    .unwrap_or_default()
                    .to_string()],
            );
        }
    }
    Ok(())
}
