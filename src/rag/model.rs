//! `RagModel`: question encoder → retriever → `doc_scores = q · d` → generator input rows → generator
//! over `batch × n_docs` rows, with the RAG-Sequence and RAG-Token heads (losses, decoding,
//! provenance). One head for every generator family: seq2seq (BART, T5) and decoder-only (Llama)
//! differ only in how a (document, question) pair becomes input ([`InputFormat`]).
//!
//! Rows of every context tensor are ordered `[question][doc]` (row `i * n_docs + j` = doc `j` of
//! question `i`), as in HF.

use crate::generators::{DecodeState, GenInput, Generator};
use crate::rag::config::{GenerationParams, GenerationSettings, RagConfig, RagMode};
use crate::rag::context::{InputFormat, Truncation};
use crate::rag::loss::{self, NllOptions};
use crate::rag::search::{self, StepScorer};
use crate::retrieve::{Passage, Retriever};
use crate::tokenize::{ids_tensor, Padding, TextTokenizer};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};

/// Maps tokenized questions to one vector each (DPR: the pooled [CLS] state). Differentiable.
pub trait QuestionEncoder: Send + Sync {
    /// `input_ids`, `attention_mask`: `[batch, len]` u32 → `[batch, dim]` f32.
    fn encode_ids(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor>;
    /// Trainable parameters by name (empty unless loaded trainable).
    fn vars(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
}

impl QuestionEncoder for crate::encoders::dpr::DprEncoder {
    fn encode_ids(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        crate::encoders::dpr::DprEncoder::encode_ids(self, input_ids, Some(attention_mask), None)
    }

    fn vars(&self) -> Vec<(String, Var)> {
        crate::encoders::dpr::DprEncoder::vars(self)
    }
}

/// The generator inputs of a batch plus the doc scores: what both heads consume. Produced by
/// [`RagModel::retrieve`] or passed by the caller (external retriever).
#[derive(Clone, Debug)]
pub struct RagContext {
    /// `[batch * n_docs, max_combined_length]` u32.
    pub input_ids: Tensor,
    /// `[batch * n_docs, max_combined_length]` u32.
    pub attention_mask: Tensor,
    /// `[batch, n_docs]` f32 (differentiable w.r.t. the question embeddings when retrieved here).
    pub doc_scores: Tensor,
    pub n_docs: usize,
    /// τ of the doc prior p(z|x) = softmax(doc_scores / τ); 1 for HF RAG checkpoints.
    pub prior_temperature: f64,
}

/// The smallest τ the doc prior is computed with (see [`RagContext::prior_scores`]).
pub const MIN_PRIOR_TEMPERATURE: f64 = 1e-30;

impl RagContext {
    /// Check shapes: rows = batch × n_docs.
    pub fn new(input_ids: Tensor, attention_mask: Tensor, doc_scores: Tensor) -> Result<Self> {
        let (batch, n_docs) = doc_scores
            .dims2()
            .context("doc_scores must be [batch, n_docs]")?;
        let (rows, len) = input_ids
            .dims2()
            .context("context_input_ids must be [batch * n_docs, len]")?;
        if n_docs == 0 || rows != batch * n_docs {
            bail!("context_input_ids has {rows} rows but doc_scores is [{batch}, {n_docs}] (need batch * n_docs rows)");
        }
        if attention_mask.dims() != [rows, len] {
            bail!(
                "context_attention_mask has shape {:?}, context_input_ids [{rows}, {len}]",
                attention_mask.dims()
            );
        }
        Ok(Self {
            input_ids,
            attention_mask,
            doc_scores,
            n_docs,
            prior_temperature: 1.0,
        })
    }

    /// The same contexts with prior temperature `tau` (must be positive and finite).
    pub fn with_temperature(mut self, tau: f64) -> Result<Self> {
        if !(tau.is_finite() && tau > 0.0) {
            bail!("prior temperature must be positive and finite, got {tau}");
        }
        self.prior_temperature = tau;
        Ok(self)
    }

    /// The logits of the doc prior, `doc_scores / τ`: `[batch, n_docs]`. Every head takes
    /// p(z|x) from these through [`loss::doc_log_prior`].
    pub fn prior_scores(&self) -> Result<Tensor> {
        if self.prior_temperature == 1.0 {
            return Ok(self.doc_scores.clone());
        }
        // Any positive τ is accepted, but below this 1/τ overflows f32 (the division is a multiply
        // by 1/τ in the scores' dtype) and 0 · ∞ makes the prior NaN; at this τ the prior is
        // already one-hot for any realistic score gap, so clamping changes no answer.
        Ok((&self.doc_scores / self.prior_temperature.max(MIN_PRIOR_TEMPERATURE))?)
    }

    pub fn batch(&self) -> usize {
        self.doc_scores.dim(0).unwrap_or(0)
    }

    pub fn gen_input(&self) -> GenInput {
        GenInput {
            input_ids: self.input_ids.clone(),
            attention_mask: self.attention_mask.clone(),
        }
    }

    /// The same contexts with `doc_scores` cut from the autograd graph (the doc prior a constant).
    pub fn detached(&self) -> Self {
        Self {
            doc_scores: self.doc_scores.detach(),
            ..self.clone()
        }
    }

    /// The rows of questions `range` only.
    pub fn questions(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            input_ids: self
                .input_ids
                .narrow(0, start * self.n_docs, len * self.n_docs)?,
            attention_mask: self.attention_mask.narrow(
                0,
                start * self.n_docs,
                len * self.n_docs,
            )?,
            doc_scores: self.doc_scores.narrow(0, start, len)?,
            n_docs: self.n_docs,
            prior_temperature: self.prior_temperature,
        })
    }
}

/// Everything the retrieval half of a forward produced.
#[derive(Clone, Debug)]
pub struct Retrieved {
    /// Question encoder output `[batch, dim]`.
    pub question_embeddings: Tensor,
    /// Knowledge-base rows `[batch][n_docs]`.
    pub doc_ids: Vec<Vec<u64>>,
    pub passages: Vec<Vec<Passage>>,
    /// `[batch, n_docs, dim]`.
    pub doc_embeddings: Tensor,
    /// `question_encoder_tokenizer.decode(ids, skip_special_tokens=True)` per question.
    pub decoded_questions: Vec<String>,
    /// `[batch * n_docs]`.
    pub context_strings: Vec<String>,
    /// Prompts whose passage was cut to fit the generator's context window (decoder-only).
    pub truncated: Vec<Truncation>,
    pub context: RagContext,
}

/// A RAG model: question encoder (optional: without it the caller supplies contexts and doc scores),
/// generator of either family, and their tokenizers.
pub struct RagModel {
    pub config: RagConfig,
    pub mode: RagMode,
    pub question_encoder: Option<Box<dyn QuestionEncoder>>,
    pub question_tokenizer: Option<TextTokenizer>,
    pub generator: Generator,
    pub generator_tokenizer: TextTokenizer,
    /// Generation settings stored with the model (generation_config.json over the generator config).
    pub generation: GenerationSettings,
    pub format: InputFormat,
    /// τ of the doc prior for contexts this model builds (1 for HF checkpoints).
    pub prior_temperature: f64,
    pub device: Device,
    /// The checkpoint directory this model was loaded from.
    pub source: Option<std::path::PathBuf>,
}

/// One generated answer with its provenance.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Answer {
    /// Generated ids, starting with the decoder start token.
    pub ids: Vec<u32>,
    pub text: String,
    /// RAG-Token: p(z | x, y_i) for each generated token (after the start token): `[tokens][n_docs]`.
    /// RAG-Sequence: one row, p(z | x, y).
    pub doc_posteriors: Vec<Vec<f32>>,
}

impl RagModel {
    pub fn n_docs(&self) -> usize {
        self.config.n_docs
    }

    /// Trainable parameters by HF name (empty unless loaded trainable): the generator's, whichever
    /// its family ([`Generator::vars`]), then the question encoder's when `with_question_encoder`.
    pub fn trainable_vars(&self, with_question_encoder: bool) -> Vec<(String, Var)> {
        let mut vars = self.generator.vars();
        if let (true, Some(q)) = (with_question_encoder, &self.question_encoder) {
            vars.extend(q.vars());
        }
        vars
    }

    /// The id that pads label and output rows. A decoder-only model without its own pad token
    /// (pad = eos, e.g. SmolLM2) would have EOS masked out of the losses as padding, so its rows are
    /// padded with BOS instead, which never follows a prompt.
    pub fn generator_pad(&self) -> u32 {
        let s = self.generator.special_ids();
        match s.bos {
            Some(bos) if self.generator.is_decoder_only() && s.pad == s.eos => bos,
            _ => s.pad,
        }
    }

    /// Tokenize questions for the question encoder (`padding="longest", truncation=True`).
    pub fn tokenize_questions(&self, questions: &[&str]) -> Result<(Tensor, Tensor)> {
        let tok = self
            .question_tokenizer
            .as_ref()
            .context("this RAG model has no question encoder tokenizer")?;
        if let Some(i) = questions.iter().position(|q| q.trim().is_empty()) {
            bail!("question {i} is empty");
        }
        let max = (tok.max_length != usize::MAX).then_some(tok.max_length);
        let enc = tok.encode_batch(questions, true, max, Padding::Longest)?;
        enc.tensors(&self.device)
    }

    /// Encode + retrieve + build the generator contexts for tokenized questions.
    pub fn retrieve_ids(
        &self,
        retriever: &dyn Retriever,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        n_docs: usize,
    ) -> Result<Retrieved> {
        let enc = self
            .question_encoder
            .as_ref()
            .context("this RAG model has no question encoder: pass contexts and doc scores")?;
        let q = enc.encode_ids(input_ids, attention_mask)?;
        self.retrieve_with_embeddings(retriever, input_ids, &q, n_docs)
    }

    /// Retrieval given question embeddings `q: [batch, dim]` (kept in the autograd graph:
    /// `doc_scores = bmm(q, d^T)` is differentiable w.r.t. `q`).
    pub fn retrieve_with_embeddings(
        &self,
        retriever: &dyn Retriever,
        input_ids: &Tensor,
        q: &Tensor,
        n_docs: usize,
    ) -> Result<Retrieved> {
        let tok = self
            .question_tokenizer
            .as_ref()
            .context("this RAG model has no question encoder tokenizer")?;
        check_n_docs(n_docs, retriever.len())?;
        let ids: Vec<Vec<u32>> = input_ids.to_vec2()?;
        let decoded = ids
            .iter()
            .map(|r| tok.decode(r, true))
            .collect::<Result<Vec<_>>>()?;
        let queries: Vec<&str> = decoded.iter().map(|s| s.as_str()).collect();
        let hits = retriever.retrieve(&queries, Some(&q.detach()), n_docs)?;
        let (batch, dim) = q.dims2()?;
        let mut flat = Vec::with_capacity(batch * n_docs * dim);
        for h in &hits {
            let e = h.embeddings.as_ref().context("the retriever returned no passage embeddings (dense retriever needed for doc scores)")?;
            if e.len() != n_docs {
                bail!(
                    "retriever returned {} passages, asked for {n_docs}",
                    e.len()
                );
            }
            for v in e {
                if v.len() != dim {
                    bail!(
                        "passage embedding has dim {}, question embedding {dim}",
                        v.len()
                    );
                }
                flat.extend_from_slice(v);
            }
        }
        let doc_embeddings =
            Tensor::from_vec(flat, (batch, n_docs, dim), &self.device)?.to_dtype(q.dtype())?;
        let doc_scores = q
            .unsqueeze(1)?
            .matmul(&doc_embeddings.transpose(1, 2)?)?
            .squeeze(1)?;
        let passages: Vec<Vec<Passage>> = hits.iter().map(|h| h.passages.clone()).collect();
        let (rows, context) = self.context_from_passages(&decoded, &passages, doc_scores)?;
        Ok(Retrieved {
            question_embeddings: q.clone(),
            doc_ids: hits.iter().map(|h| h.doc_ids.clone()).collect(),
            passages,
            doc_embeddings,
            decoded_questions: decoded,
            context_strings: rows.strings,
            truncated: rows.truncated,
            context,
        })
    }

    /// End-to-end retrieval training (HF `set_context_encoder_for_training`): re-encode the retrieved
    /// passages with `ctx_encoder` (`ctx_tokenizer(titles, texts, truncation=True, padding="longest")`,
    /// input ids + attention mask, no token types) so that `doc_scores = q · ctx_encoder(doc)` is
    /// differentiable w.r.t. the context encoder too. Returns the tokenized docs `[batch*n_docs][len]`
    /// and the updated contexts.
    pub fn reencode_docs(
        &self,
        ctx_encoder: &crate::encoders::dpr::DprEncoder,
        retrieved: &Retrieved,
    ) -> Result<(crate::tokenize::Encoded, RagContext)> {
        let pairs: Vec<(&str, &str)> = retrieved
            .passages
            .iter()
            .flatten()
            .map(|p| (p.title.as_str(), p.text.as_str()))
            .collect();
        let enc = ctx_encoder.tokenizer.encode_pairs(
            &pairs,
            Some(ctx_encoder.max_length),
            Padding::Longest,
        )?;
        let (ids, mask) = enc.tensors(&self.device)?;
        let emb = ctx_encoder.encode_ids(&ids, Some(&mask), None)?; // [b*k, d]
        let (b, k) = retrieved.context.doc_scores.dims2()?;
        let d = emb.dim(1)?;
        let emb = emb.reshape((b, k, d))?;
        let q = &retrieved.question_embeddings;
        let doc_scores = q.unsqueeze(1)?.matmul(&emb.transpose(1, 2)?)?.squeeze(1)?;
        let c = &retrieved.context;
        Ok((
            enc,
            RagContext::new(c.input_ids.clone(), c.attention_mask.clone(), doc_scores)?
                .with_temperature(c.prior_temperature)?,
        ))
    }

    /// Question texts → retrieval and contexts.
    pub fn retrieve(
        &self,
        retriever: &dyn Retriever,
        questions: &[&str],
        n_docs: usize,
    ) -> Result<Retrieved> {
        let (ids, mask) = self.tokenize_questions(questions)?;
        self.retrieve_ids(retriever, &ids, &mask, n_docs)
    }

    /// Contexts from caller-supplied strings (external retriever): `[batch * n_docs]` strings and
    /// `doc_scores: [batch, n_docs]`.
    pub fn context_from_strings(
        &self,
        strings: &[String],
        doc_scores: Tensor,
    ) -> Result<RagContext> {
        let InputFormat::Seq2Seq(format) = &self.format else {
            bail!("context strings are seq2seq generator input; pass passages for a decoder-only generator (context_from_passages)");
        };
        let enc = format.tokenize(&self.generator_tokenizer, strings)?;
        let (ci, cm) = enc.tensors(&self.device)?;
        RagContext::new(ci, cm, doc_scores)?.with_temperature(self.prior_temperature)
    }

    /// Contexts from retrieved passages (any retriever): `passages[i]` are question `i`'s n_docs
    /// documents, `doc_scores: [batch, n_docs]` their scores. The generator input rows are built by
    /// this model's [`InputFormat`].
    pub fn context_from_passages(
        &self,
        questions: &[String],
        passages: &[Vec<Passage>],
        doc_scores: Tensor,
    ) -> Result<(crate::rag::context::ContextRows, RagContext)> {
        let rows = self
            .format
            .rows(&self.generator_tokenizer, questions, passages)?;
        let (ci, cm) = rows.encoded.tensors(&self.device)?;
        let ctx = RagContext::new(ci, cm, doc_scores)?.with_temperature(self.prior_temperature)?;
        Ok((rows, ctx))
    }

    /// Labels `[decoder_start] + answer tokens + [eos]` for an answer string (the losses' and
    /// rescoring's `labels` row), without the tokenizer's special tokens. A plain decoder-only
    /// prompt is continued after a space; a chat prompt ends with the assistant header's newline
    /// and seq2seq answers start a fresh sequence, so those take the answer as is.
    pub fn answer_labels(&self, answer: &str) -> Result<Vec<u32>> {
        let s = self.generator.special_ids();
        let plain_prompt =
            matches!(&self.format, InputFormat::Prompt(f) if f.chat_template.is_none());
        let text = match plain_prompt {
            true => format!(" {answer}"),
            false => answer.to_string(),
        };
        let mut e =
            self.generator_tokenizer
                .encode_batch(&[text.as_str()], false, None, Padding::None)?;
        let mut ids = vec![s.decoder_start];
        ids.append(&mut e.input_ids[0]);
        ids.push(s.eos);
        Ok(ids)
    }

    /// Raw generator logits `[batch * n_docs, T, V]` for `decoder_input_ids: [batch, T]` (each row
    /// repeated for its n_docs contexts). Differentiable.
    pub fn forward(&self, ctx: &RagContext, decoder_input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = decoder_input_ids
            .dims2()
            .context("decoder_input_ids must be [batch, T]")?;
        if b != ctx.batch() {
            bail!(
                "decoder_input_ids has {b} rows, the contexts are for {} questions",
                ctx.batch()
            );
        }
        let vocab = self.generator.special_ids().vocab_size as u32;
        let max = decoder_input_ids.max_all()?.to_scalar::<u32>()?;
        if max >= vocab {
            bail!("decoder input id {max} is outside the generator vocabulary ({vocab})");
        }
        if t == 0 {
            bail!("decoder_input_ids is empty");
        }
        let dec = repeat_interleave_rows(decoder_input_ids, ctx.n_docs)?;
        self.generator.forward(&ctx.gen_input(), &dec)
    }

    /// The loss of this model's head (`config.reduce_loss`, `config.label_smoothing`, and
    /// `exclude_bos_score` as given) for `labels: [batch, T]` used as decoder inputs too.
    pub fn loss(&self, ctx: &RagContext, labels: &Tensor, opts: &NllOptions) -> Result<Tensor> {
        let logits = self.forward(ctx, labels)?;
        self.nll(&logits, &ctx.prior_scores()?, labels, ctx.n_docs, opts)
    }

    /// `get_nll` of this model's head over precomputed logits; `doc_scores` are the prior logits
    /// ([`RagContext::prior_scores`]).
    pub fn nll(
        &self,
        logits: &Tensor,
        doc_scores: &Tensor,
        labels: &Tensor,
        n_docs: usize,
        opts: &NllOptions,
    ) -> Result<Tensor> {
        let pad = self.generator_pad();
        match self.mode {
            RagMode::Token => loss::rag_token_nll(logits, doc_scores, labels, n_docs, pad, opts),
            RagMode::Sequence => loss::rag_sequence_nll(
                logits,
                doc_scores,
                labels,
                n_docs,
                pad,
                self.config.nll_bos_token_id(),
                opts,
            ),
        }
    }

    /// Options from the config (`reduce_loss`, `label_smoothing`, `exclude_bos_score`).
    pub fn default_nll_options(&self) -> NllOptions {
        NllOptions {
            reduce_loss: self.config.reduce_loss,
            epsilon: self.config.label_smoothing,
            exclude_bos_score: self.config.exclude_bos_score,
        }
    }

    /// Resolve decoding settings: `overrides` over the model's stored settings over HF defaults.
    pub fn generation_params(&self, overrides: &GenerationSettings) -> Result<GenerationParams> {
        overrides.or(&self.generation).resolve()
    }

    /// RAG-Token decoding over the marginal (greedy when `num_beams == 1`, sampled from the marginal
    /// when `p.sampling` is set, else beam search with the
    /// KV cache of every (beam, doc) row reordered per step). Returns `[batch * num_return_sequences]`
    /// sequences (HF padding/fill conventions).
    pub fn generate_token(&self, ctx: &RagContext, p: &GenerationParams) -> Result<Vec<Vec<u32>>> {
        self.generate_token_observed(ctx, p, None)
    }

    /// [`Self::generate_token`] telling `observer` each token as greedy decoding (or sampling) chooses it, with
    /// its posterior p(z | x, y_i, y<i) over the question's documents (the quantity
    /// [`Self::doc_posteriors`] computes after the fact, here from the decoding step's own
    /// log-probabilities). An observer needs greedy decoding (`num_beams == 1`); its error stops
    /// decoding and is returned.
    pub fn generate_token_observed(
        &self,
        ctx: &RagContext,
        p: &GenerationParams,
        observer: Option<&mut TokenObserver<'_>>,
    ) -> Result<Vec<Vec<u32>>> {
        let batch = ctx.batch();
        let k = ctx.n_docs;
        let nb = p.num_beams;
        if nb == 1 && p.num_return_sequences > 1 {
            bail!("greedy RAG-Token decoding returns one sequence per question: num_return_sequences must be 1 (got {})", p.num_return_sequences);
        }
        let state = self.generator.decoder().start(&ctx.gen_input())?;
        // rows [batch][beam][doc]
        let rows: Vec<u32> = (0..batch)
            .flat_map(|b| (0..nb).flat_map(move |_| (0..k).map(move |j| (b * k + j) as u32)))
            .collect();
        let state = state.select_rows(&Tensor::new(rows.as_slice(), &self.device)?)?;
        let doc_lp = loss::doc_log_prior(&ctx.prior_scores()?.detach(), DType::F32)?;
        let doc_lp = repeat_interleave_rows(&doc_lp, nb)?; // [batch*nb, k]
        if observer.is_some() && nb != 1 {
            bail!("token-by-token observation needs greedy decoding (beams 1), got {nb} beams");
        }
        let mut scorer = MarginalScorer {
            model: self,
            state,
            doc_lp,
            n_docs: k,
            started: false,
            observer,
            last_lp: None,
            position: 0,
        };
        match (nb, &p.sampling) {
            (1, Some(s)) => Ok(search::sample_scored(&mut scorer, batch, p, s)?.ids),
            (1, None) => search::greedy(&mut scorer, batch, p),
            (_, Some(_)) => {
                bail!("sampling draws one sequence per question: it needs beams 1, got {nb} beams")
            }
            _ => search::beam_search(&mut scorer, batch, p),
        }
    }

    /// Plain generator decoding of context rows (what RAG-Sequence runs per question):
    /// `num_return_sequences = num_beams` outputs per row, `[rows * num_beams][len]`.
    pub fn generate_per_doc(
        &self,
        state: &DecodeState,
        rows: usize,
        p: &GenerationParams,
    ) -> Result<Vec<Vec<u32>>> {
        Ok(self.generate_per_doc_scored(state, rows, p)?.ids)
    }

    /// [`Self::generate_per_doc`] with each hypothesis' log-likelihood under its own document.
    pub fn generate_per_doc_scored(
        &self,
        state: &DecodeState,
        rows: usize,
        p: &GenerationParams,
    ) -> Result<search::Hypotheses> {
        let nb = p.num_beams;
        let sel: Vec<u32> = (0..rows)
            .flat_map(|r| std::iter::repeat_n(r as u32, nb))
            .collect();
        let state = state.select_rows(&Tensor::new(sel.as_slice(), &self.device)?)?;
        let mut scorer = GeneratorScorer {
            model: self,
            state,
            started: false,
        };
        if p.sampling.is_some() {
            // RAG-Sequence decodes each document separately and rescores: sampling is RAG-Token's.
            bail!("sampling is implemented for RAG-Token decoding (mode token), not per document");
        }
        let mut p = p.clone();
        p.num_return_sequences = nb;
        if nb == 1 {
            search::greedy_scored(&mut scorer, rows, &p)
        } else {
            search::beam_search_scored(&mut scorer, rows, &p)
        }
    }

    /// RAG-Sequence fast decoding (Lewis et al. 2020, §2.4): beam search per document, then
    /// p(y|x) ≈ Σ_{z : y ∈ beam(z)} p(z|x) p(y|x,z), taking p(y|x,z) ≈ 0 where document z's beam did not
    /// produce y — no extra forward passes. Returns `[batch * num_return_sequences]` rows (right-padded
    /// with the generator pad id) and, per returned answer, its approximate log p(y|x).
    pub fn generate_sequence_fast(
        &self,
        ctx: &RagContext,
        p: &GenerationParams,
    ) -> Result<(Vec<Vec<u32>>, Vec<f32>)> {
        let k = ctx.n_docs;
        let nb = p.num_beams;
        let pad = self.generator_pad();
        let doc_lp = loss::doc_log_prior(&ctx.prior_scores()?.detach(), DType::F32)?;
        let (mut hypos, mut scores) = (Vec::new(), Vec::new());
        for i in 0..ctx.batch() {
            let qctx = ctx.questions(i, 1)?;
            let state = self
                .generator
                .decoder()
                .start(&self.sequence_input(&qctx)?)?;
            let h = self.generate_per_doc_scored(&state, k, p)?;
            // lp[c][z] = log p(y_c | x, z) where document z's beams produced candidate c, else -inf.
            let mut cands: Vec<Vec<u32>> = Vec::new();
            let mut lp: Vec<Vec<f32>> = Vec::new();
            for (r, (ids, l)) in h.ids.iter().zip(&h.logprobs).enumerate() {
                let c = match cands.iter().position(|c| c == ids) {
                    Some(c) => c,
                    None => {
                        cands.push(ids.clone());
                        lp.push(vec![f32::NEG_INFINITY; k]);
                        cands.len() - 1
                    }
                };
                // Several beams of one document cannot give the same hypothesis.
                lp[c][r / nb] = *l;
            }
            let lp = Tensor::new(lp, &self.device)?;
            let marginal =
                loss::marginalize_docs(&lp, &doc_lp.narrow(0, i, 1)?)?.to_vec1::<f32>()?;
            let mut scored: Vec<(f32, usize)> = marginal
                .into_iter()
                .enumerate()
                .map(|(c, s)| (s, c))
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let nrs = p.num_return_sequences;
            if nrs > scored.len() {
                bail!(
                    "num_return_sequences = {nrs} but question {i} has only {} distinct candidates",
                    scored.len()
                );
            }
            for &(s, c) in &scored[..nrs] {
                hypos.push(cands[c].clone());
                scores.push(s);
            }
        }
        let len = hypos.iter().map(|h| h.len()).max().unwrap_or(0);
        for h in hypos.iter_mut() {
            h.resize(len, pad);
        }
        Ok((hypos, scores))
    }

    /// RAG-Sequence thorough decoding: beam search per document, optional de-duplication, then every
    /// candidate rescored under all n_docs contexts (reusing the encoded contexts — no second question
    /// encoding or retrieval), best `num_return_sequences` by NLL (with `exclude_bos_score`).
    /// Returns `[batch * num_return_sequences]` rows right-padded with the generator pad id, plus
    /// per-question details.
    pub fn generate_sequence(
        &self,
        ctx: &RagContext,
        p: &GenerationParams,
        do_deduplication: bool,
    ) -> Result<(Vec<Vec<u32>>, Vec<SequenceDetails>)> {
        let k = ctx.n_docs;
        let pad = self.generator_pad();
        let mut hypos = Vec::new();
        let mut details = Vec::new();
        for i in 0..ctx.batch() {
            let qctx = ctx.questions(i, 1)?;
            let state = self
                .generator
                .decoder()
                .start(&self.sequence_input(&qctx)?)?;
            let outputs = self.generate_per_doc(&state, k, p)?;
            let mut candidates: Vec<Vec<u32>> = Vec::new();
            for o in &outputs {
                if !do_deduplication || !candidates.contains(o) {
                    candidates.push(o.clone());
                }
            }
            let nll = self.rescore(&state, &qctx, &candidates)?;
            let nrs = p.num_return_sequences;
            if nrs > candidates.len() {
                bail!(
                    "num_return_sequences = {nrs} but question {i} has only {} distinct candidates (HF: `selected index k out of range`)",
                    candidates.len()
                );
            }
            let mut order: Vec<usize> = (0..candidates.len()).collect();
            order.sort_by(|&a, &b| nll[a].total_cmp(&nll[b]).then(a.cmp(&b)));
            order.truncate(nrs);
            hypos.extend(order.iter().map(|&c| candidates[c].clone()));
            details.push(SequenceDetails {
                generator_outputs: outputs,
                candidates,
                candidate_nll: nll,
                top_candidate_indices: order,
            });
        }
        let len = hypos.iter().map(|h| h.len()).max().unwrap_or(0);
        for h in hypos.iter_mut() {
            h.resize(len, pad);
        }
        Ok((hypos, details))
    }

    /// RAG-Sequence NLL (exclude_bos_score=True, config reduce/smoothing off per candidate) of each
    /// candidate `[n][T]` for one question, teacher-forced step by step on the already-encoded contexts.
    fn rescore(
        &self,
        state: &DecodeState,
        qctx: &RagContext,
        candidates: &[Vec<u32>],
    ) -> Result<Vec<f32>> {
        let k = qctx.n_docs;
        let n = candidates.len();
        let t = candidates[0].len();
        let labels = ids_tensor(candidates, &self.device)?;
        let logits = self.teacher_forced(state, k, &labels)?; // [n*k, t, V]
        let doc_scores = qctx.prior_scores()?.broadcast_as((n, k))?.contiguous()?;
        let opts = NllOptions {
            reduce_loss: false,
            epsilon: self.config.label_smoothing,
            exclude_bos_score: true,
        };
        let pad = self.generator_pad();
        let _ = t;
        let loss = loss::rag_sequence_nll(
            &logits,
            &doc_scores,
            &labels,
            k,
            pad,
            self.config.nll_bos_token_id(),
            &opts,
        )?;
        Ok(loss.to_vec1::<f32>()?)
    }

    /// Logits `[n * k, T, V]` of `labels: [n, T]` under each of the `k` contexts of `state`
    /// (row `c * k + j` = candidate `c` with context `j`), decoded incrementally with the KV cache.
    fn teacher_forced(&self, state: &DecodeState, k: usize, labels: &Tensor) -> Result<Tensor> {
        let n = labels.dim(0)?;
        let sel: Vec<u32> = (0..n).flat_map(|_| 0..k as u32).collect();
        let st = state.select_rows(&Tensor::new(sel.as_slice(), &self.device)?)?;
        let dec = repeat_interleave_rows(labels, k)?; // [n*k, t]
        self.generator.forward_from_state(&st, &dec)
    }

    /// Generator input of one question's rows for RAG-Sequence decoding. Seq2seq: HF passes
    /// `attention_mask=None` and generate() infers it as `ids != pad`; decoder-only: the rows' mask.
    fn sequence_input(&self, qctx: &RagContext) -> Result<GenInput> {
        let attention_mask = match self.generator.is_decoder_only() {
            true => qctx.attention_mask.clone(),
            false => qctx
                .input_ids
                .ne(self.generator_pad())?
                .to_dtype(DType::U32)?,
        };
        Ok(GenInput {
            input_ids: qctx.input_ids.clone(),
            attention_mask,
        })
    }

    /// Provenance: RAG-Token per-token posteriors p(z | x, y_i) ∝ p(z|x) p(y_i | x, z, y<i) or the
    /// RAG-Sequence answer posterior p(z | x, y), for `ids` generated for question `question`.
    pub fn doc_posteriors(
        &self,
        ctx: &RagContext,
        question: usize,
        ids: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        self.doc_posteriors_for(self.mode, ctx, question, ids)
    }

    /// [`Self::doc_posteriors`] of the given head.
    pub fn doc_posteriors_for(
        &self,
        mode: RagMode,
        ctx: &RagContext,
        question: usize,
        ids: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        let qctx = ctx.questions(question, 1)?;
        let k = qctx.n_docs;
        let pad = self.generator_pad();
        // Stop at the answer's EOS (kept) or padding (dropped).
        let eos = self.generator.special_ids().eos;
        let end = generated_end(ids, eos, pad);
        let ids = &ids[..end.max(2).min(ids.len())];
        let labels = ids_tensor(&[ids.to_vec()], &self.device)?;
        let logits = self.forward(&qctx, &labels)?; // [k, T, V]
        let prior = qctx.prior_scores()?;
        match mode {
            RagMode::Sequence => {
                let post = loss::sequence_doc_posterior(&logits, &prior, &labels, k, pad)?;
                Ok(post.to_vec2::<f32>()?)
            }
            RagMode::Token => {
                let t = ids.len();
                let tok_lp = loss::target_logprobs(&logits, &labels, k, pad)?; // [1, k, T]
                let doc_lp = loss::doc_log_prior(&prior, tok_lp.dtype())?;
                let post = loss::doc_posterior(&tok_lp, &doc_lp)?.squeeze(0)?.t()?; // [T, k]
                                                                                    // Position t predicts ids[t + 1]; keep the generated tokens only.
                Ok(post.narrow(0, 0, t - 1)?.contiguous()?.to_vec2::<f32>()?)
            }
        }
    }
}

/// Per-question record of RAG-Sequence thorough decoding.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SequenceDetails {
    /// `[n_docs * num_beams][len]` beams per document.
    pub generator_outputs: Vec<Vec<u32>>,
    /// After de-duplication (first-occurrence order).
    pub candidates: Vec<Vec<u32>>,
    /// RAG-Sequence NLL of each candidate (exclude_bos_score).
    pub candidate_nll: Vec<f32>,
    /// Returned candidates, best first.
    pub top_candidate_indices: Vec<usize>,
}

/// Length of a generated row `ids` (decoder start token first): up to its first EOS (kept) or
/// padding (dropped), else all of it.
pub fn generated_end(ids: &[u32], eos: u32, pad: u32) -> usize {
    ids.iter()
        .enumerate()
        .skip(1)
        .find(|(_, &t)| t == eos || t == pad)
        .map_or(ids.len(), |(i, &t)| if t == eos { i + 1 } else { i })
}

/// Refuse `n_docs` of 0 or more than the knowledge base holds (no silent clamp: the prior and the
/// losses are over exactly n_docs documents).
pub fn check_n_docs(n_docs: usize, kb_len: usize) -> Result<()> {
    if n_docs == 0 {
        bail!("n_docs must be at least 1");
    }
    if n_docs > kb_len {
        bail!("n_docs = {n_docs} but the knowledge base has only {kb_len} passages");
    }
    Ok(())
}

/// `[rows, ..]` → `[rows * n, ..]` with each row repeated `n` times in place (torch `repeat_interleave`).
pub fn repeat_interleave_rows(t: &Tensor, n: usize) -> Result<Tensor> {
    let rows = t.dim(0)?;
    let idx: Vec<u32> = (0..rows as u32)
        .flat_map(|r| std::iter::repeat_n(r, n))
        .collect();
    Ok(t.index_select(&Tensor::new(idx.as_slice(), t.device())?, 0)?)
}

/// One token of a greedy or sampled RAG-Token decode, as it is chosen.
#[derive(Clone, Copy, Debug)]
pub struct TokenStep<'a> {
    /// Row of the decoded batch (the question).
    pub row: usize,
    /// Position among the generated tokens (0 = the first after the decoder start token).
    pub position: usize,
    pub token: u32,
    /// p(z | x, y_i, y<i) ∝ p(z|x) p(y_i | x, z, y<i): `[n_docs]`, sums to 1.
    pub doc_posterior: &'a [f32],
}

/// Receives each [`TokenStep`]; an error stops decoding.
pub type TokenObserver<'a> = dyn FnMut(TokenStep<'_>) -> Result<()> + 'a;

/// RAG-Token marginal scores for search rows `[batch][beam]` over decoder rows `[batch][beam][doc]`.
struct MarginalScorer<'a, 'o, 'f> {
    model: &'a RagModel,
    state: DecodeState,
    /// `[search rows, n_docs]` log p(z|x).
    doc_lp: Tensor,
    n_docs: usize,
    started: bool,
    /// Told each chosen token (greedy or sampling, not beam search).
    observer: Option<&'o mut TokenObserver<'f>>,
    /// With an observer: the last step's per-document log-probs `[search rows, n_docs, vocab]`.
    last_lp: Option<Tensor>,
    /// Generated tokens so far.
    position: usize,
}

impl StepScorer for MarginalScorer<'_, '_, '_> {
    fn next_scores(&mut self, last: Option<&[u32]>) -> Result<Vec<f32>> {
        let g = &self.model.generator;
        let logits = match (last, self.started) {
            (Some(l), true) => {
                let toks: Vec<u32> = l
                    .iter()
                    .flat_map(|&t| std::iter::repeat_n(t, self.n_docs))
                    .collect();
                g.decoder().step(
                    &mut self.state,
                    &Tensor::new(toks.as_slice(), &self.model.device)?,
                )?
            }
            _ => {
                self.started = true;
                g.decoder().first_logits(&mut self.state)?
            }
        };
        let (rows, v) = logits.dims2()?;
        let lp = crate::nn::log_softmax_last_dim(&logits.to_dtype(DType::F32)?)?.reshape((
            rows / self.n_docs,
            self.n_docs,
            v,
        ))?;
        let marg = loss::marginalize_docs(&lp, &self.doc_lp)?;
        if self.observer.is_some() {
            self.last_lp = Some(lp);
        }
        Ok(marg.flatten_all()?.to_vec1::<f32>()?)
    }

    fn chosen(&mut self, tokens: &[u32], live: &[bool]) -> Result<()> {
        let (Some(observer), Some(lp)) = (self.observer.as_mut(), &self.last_lp) else {
            return Ok(());
        };
        let k = self.n_docs;
        // log p(y_i | x, z, y<i) of each row's chosen token: [rows, n_docs].
        let idx: Vec<u32> = tokens
            .iter()
            .flat_map(|&t| std::iter::repeat_n(t, k))
            .collect();
        let idx = Tensor::from_vec(idx, (tokens.len(), k, 1), &self.model.device)?;
        let tok_lp = lp.gather(&idx, 2)?.squeeze(2)?;
        let post = loss::doc_posterior(&tok_lp, &self.doc_lp)?.to_vec2::<f32>()?;
        for (row, post) in post.iter().enumerate().filter(|&(r, _)| live[r]) {
            observer(TokenStep {
                row,
                position: self.position,
                token: tokens[row],
                doc_posterior: post,
            })?;
        }
        self.position += 1;
        Ok(())
    }

    fn reorder(&mut self, rows: &[usize]) -> Result<()> {
        let k = self.n_docs;
        let sel: Vec<u32> = rows
            .iter()
            .flat_map(|&r| (0..k).map(move |j| (r * k + j) as u32))
            .collect();
        self.state = self
            .state
            .select_rows(&Tensor::new(sel.as_slice(), &self.model.device)?)?;
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        self.doc_lp = self
            .doc_lp
            .index_select(&Tensor::new(idx.as_slice(), &self.model.device)?, 0)?;
        Ok(())
    }

    fn vocab_size(&self) -> usize {
        self.model.generator.special_ids().vocab_size
    }
}

/// Raw generator logits for search rows (one decoder row each).
struct GeneratorScorer<'a> {
    model: &'a RagModel,
    state: DecodeState,
    started: bool,
}

impl StepScorer for GeneratorScorer<'_> {
    fn next_scores(&mut self, last: Option<&[u32]>) -> Result<Vec<f32>> {
        let g = &self.model.generator;
        let logits = match (last, self.started) {
            (Some(l), true) => g
                .decoder()
                .step(&mut self.state, &Tensor::new(l, &self.model.device)?)?,
            _ => {
                self.started = true;
                g.decoder().first_logits(&mut self.state)?
            }
        };
        Ok(logits
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    fn reorder(&mut self, rows: &[usize]) -> Result<()> {
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        self.state = self
            .state
            .select_rows(&Tensor::new(idx.as_slice(), &self.model.device)?)?;
        Ok(())
    }

    fn vocab_size(&self) -> usize {
        self.model.generator.special_ids().vocab_size
    }
}
