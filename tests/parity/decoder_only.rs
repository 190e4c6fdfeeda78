//! decoder-only case: a tiny `LlamaForCausalLM` as a RAG generator with prompt = doc + question,
//! both marginals, per-token marginals and greedy RAG-Token decoding (see `definition` in expected.json).

use crate::common::{Checker, Fixture, LOGPROB, SCORE};
use anyhow::{Context, Result};
use candle_core::Device;
use rustrag::encoders::dpr::DprEncoder;
use rustrag::encoders::{LoadOptions, TextEncoder};
use rustrag::generators::llama::Llama;
use rustrag::generators::Decoder;
use rustrag::rag::decoder_only::{prompt_text, DecoderOnlyRag};
use rustrag::tokenize::load_tokenizer;

#[derive(serde::Deserialize)]
struct Passage {
    id: String,
    title: String,
    text: String,
}

fn read_passages(path: &std::path::Path) -> Result<Vec<Passage>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))
        })
        .collect()
}

fn log_softmax(xs: &[f32]) -> Vec<f32> {
    let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z = m + xs.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    xs.iter().map(|&x| (x as f64 - z) as f32).collect()
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
    c.check("model_class", || {
        anyhow::ensure!(
            fx.str("model_class")? == "LlamaForCausalLM",
            "unknown class"
        );
        Ok(())
    });
    let model_dir = path("model")?;
    let model = Llama::from_hf_dir(&model_dir, &Device::Cpu)?;
    let tok = load_tokenizer(&model_dir)?;
    tok.check_vocab(model.config.vocab_size, &model_dir)?;
    let passages = read_passages(&path("kb_passages")?)?;
    let rag = DecoderOnlyRag::new(&model, &tok);
    let steps = fx.usize("steps")?;
    let n_docs = fx.usize("n_docs")?;
    c.ids(
        "special ids",
        &[model.special_ids().bos, Some(model.special_ids().eos)],
        &[
            Some(fx.usize("bos_token_id")? as u32),
            Some(fx.usize("eos_token_id")? as u32),
        ],
    );
    let n_questions = fx.len("questions")?;
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
        let question = fx
            .get(&q("question"))?
            .as_str()
            .context("question")?
            .to_string();
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
        let pids: Vec<String> = doc_ids
            .iter()
            .map(|&i| {
                passages
                    .get(i as usize)
                    .map(|p| p.id.clone())
                    .unwrap_or_default()
            })
            .collect();
        c.ids(
            &format!("q{qi} doc_passage_ids"),
            &pids,
            &fx.strings(&q("doc_passage_ids"))?,
        );
        let doc_scores: Vec<f32> = top.iter().map(|&i| kb_scores[i as usize]).collect();
        c.close(
            &format!("q{qi} doc_scores"),
            &doc_scores,
            &fx.f32s(&q("doc_scores"))?,
            SCORE,
        );
        // doc_logprobs = log_softmax(doc_scores) over the retrieved top-K.
        let doc_lp = log_softmax(&doc_scores);
        let doc_lp_expected = fx.f32s(&q("doc_logprobs"))?;
        c.close(
            &format!("q{qi} doc_logprobs"),
            &doc_lp,
            &doc_lp_expected,
            LOGPROB,
        );
        let docs: Vec<&Passage> = doc_ids
            .iter()
            .map(|&i| {
                passages
                    .get(i as usize)
                    .with_context(|| format!("doc id {i} outside the KB"))
            })
            .collect::<Result<_>>()?;
        let prompts: Vec<String> = docs
            .iter()
            .map(|d| prompt_text(&d.title, &d.text, &question))
            .collect();
        c.ids(
            &format!("q{qi} prompts"),
            &prompts,
            &fx.strings(&q("prompts"))?,
        );
        let pairs: Vec<(&str, &str)> = docs
            .iter()
            .map(|d| (d.title.as_str(), d.text.as_str()))
            .collect();
        let prompt_rows = rag.prompt_ids(&pairs, &question)?;
        let expected_prompt_ids = fx.ids2(&q("prompt_ids"))?;
        // Our rows start with bos; HF's prompt_ids do not.
        let ours: Vec<Vec<u32>> = prompt_rows.iter().map(|r| r[1..].to_vec()).collect();
        c.ids(&format!("q{qi} prompt_ids"), &ours, &expected_prompt_ids);
        let answer_ids = rag.answer_ids(&answer)?;
        c.ids(
            &format!("q{qi} answer_ids"),
            &answer_ids,
            &fx.ids1(&q("answer_ids"))?,
        );

        // End to end: our retrieval's priors feed the marginals.
        let scores = rag.score(&prompt_rows, &doc_lp, &answer_ids)?;
        let flat: Vec<f32> = scores.token_logprobs.iter().flatten().copied().collect();
        c.close(
            &format!("q{qi} answer_token_logprobs"),
            &flat,
            &fx.f32s(&q("answer_token_logprobs"))?,
            LOGPROB,
        );
        c.close(
            &format!("q{qi} answer_loglik_per_doc"),
            &scores.loglik_per_doc,
            &fx.f32s(&q("answer_loglik_per_doc"))?,
            LOGPROB,
        );
        c.close(
            &format!("q{qi} rag_sequence_loglik"),
            &[scores.rag_sequence_loglik],
            &fx.f32s(&q("rag_sequence_loglik"))?,
            LOGPROB,
        );
        c.close(
            &format!("q{qi} rag_token_loglik"),
            &[scores.rag_token_loglik],
            &fx.f32s(&q("rag_token_loglik"))?,
            LOGPROB,
        );
        c.close(
            &format!("q{qi} rag_token_marginal_per_token"),
            &scores.token_marginals,
            &fx.f32s(&q("rag_token_marginal_per_token"))?,
            LOGPROB,
        );
        // The same log-probs through the full teacher-forced forward (one unpadded sequence per doc).
        let mut full = Vec::new();
        for p in &prompt_rows {
            full.extend(model.score_continuation(p, &answer_ids)?);
        }
        c.close(
            &format!("q{qi} answer_token_logprobs (full forward)"),
            &full,
            &fx.f32s(&q("answer_token_logprobs"))?,
            LOGPROB,
        );

        let g = rag.generate_token_greedy(&prompt_rows, &doc_lp, steps, false)?;
        let gp = |k: &str| q(&format!("greedy_rag_token/{k}"));
        c.ids(
            &format!("q{qi} greedy generated_ids"),
            &g.ids,
            &fx.ids1(&gp("generated_ids"))?,
        );
        c.close(
            &format!("q{qi} greedy chosen_marginal_logprob"),
            &g.chosen_logprobs,
            &fx.f32s(&gp("chosen_marginal_logprob"))?,
            LOGPROB,
        );
        c.close(
            &format!("q{qi} greedy top1_top2_margin"),
            &g.top1_top2_margin,
            &fx.f32s(&gp("top1_top2_margin"))?,
            LOGPROB,
        );
        c.close(
            &format!("q{qi} greedy step0_marginal_logprobs"),
            &g.first_marginal,
            &fx.f32s(&gp("step0_marginal_logprobs"))?,
            LOGPROB,
        );
        let decoded = tok.decode(&g.ids, false)?;
        c.ids(
            &format!("q{qi} greedy decoded"),
            &[decoded],
            &[fx.str(&gp("decoded"))?],
        );
    }
    Ok(())
}
