//! The real SmolLM2-135M-Instruct (Q4_1 GGUF, tokenizer only in its metadata): chat answer, batched
//! left-padded prefill, row selection, tokenizer round trips.
//!
//! Needs `$RUSTRAG_MODELS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (default `<crate>/models`).

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use rustrag::generators::gguf::{tokenizer_from_gguf, ChatMessage, ChatTemplate, GgufFile};
use rustrag::generators::llama::{GgufWeights, Llama};
use rustrag::generators::{Decoder, GenInput};
use rustrag::tokenize::{ids_tensor, TextTokenizer};
use std::path::PathBuf;
use std::sync::OnceLock;

fn gguf_path() -> PathBuf {
    let models = std::env::var("RUSTRAG_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"));
    let p = models
        .join("smollm2")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "SmolLM2 GGUF missing: {} (fetch it with scripts/fetch-models.sh or set RUSTRAG_MODELS)",
        p.display()
    );
    p
}

struct Smol {
    model: Llama,
    tok: TextTokenizer,
    chat: ChatTemplate,
}

fn smol() -> &'static Smol {
    static M: OnceLock<Smol> = OnceLock::new();
    M.get_or_init(|| {
        let g = GgufFile::open(&gguf_path()).expect("open GGUF");
        let model = Llama::from_gguf(&g, &Device::Cpu).expect("load SmolLM2");
        let tok = tokenizer_from_gguf(&g, model.config.vocab_size).expect("GGUF tokenizer");
        let chat = ChatTemplate::from_gguf(&g).expect("chat template");
        Smol { model, tok, chat }
    })
}

fn enc(tok: &TextTokenizer, s: &str) -> Vec<u32> {
    tok.encode_batch(&[s], false, None, rustrag::tokenize::Padding::None)
        .expect("encode")
        .input_ids
        .remove(0)
}

/// Right-padded generator input from rows of ids.
fn gen_input(rows: &[Vec<u32>], pad: u32) -> Result<GenInput> {
    let l = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let ids: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .copied()
                .chain(std::iter::repeat(pad))
                .take(l)
                .collect()
        })
        .collect();
    let mask: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| (0..l).map(|j| u32::from(j < r.len())).collect())
        .collect();
    Ok(GenInput {
        input_ids: ids_tensor(&ids, &Device::Cpu)?,
        attention_mask: ids_tensor(&mask, &Device::Cpu)?,
    })
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        )
        .0 as u32
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.flatten_all()?.to_vec1::<f32>()?;
    let b = b.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    Ok(a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale)
}

/// Greedy decoding of one prompt until EOS or `max_new` tokens.
fn greedy(model: &Llama, prompt: &[u32], max_new: usize) -> Result<Vec<u32>> {
    let mut state = model.start(&gen_input(&[prompt.to_vec()], 0)?)?;
    let mut logits = model.first_logits(&mut state)?;
    let mut out = Vec::new();
    for _ in 0..max_new {
        let next = argmax(&logits.get(0)?.to_vec1::<f32>()?);
        if next == model.special_ids().eos {
            break;
        }
        out.push(next);
        logits = model.step(&mut state, &Tensor::new(&[next], &Device::Cpu)?)?;
    }
    Ok(out)
}

#[test]
fn smollm2_answers_capital_of_france() -> Result<()> {
    let s = smol();
    let text = s.chat.format(
        &[ChatMessage::new("user", "What is the capital of France?")],
        true,
    )?;
    assert!(
        text.starts_with("<|im_start|>system\n"),
        "ChatML default system turn: {text:?}"
    );
    assert!(text.ends_with(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ));
    let prompt = enc(&s.tok, &text);
    assert_eq!(prompt[0], 1, "<|im_start|> is one special token");
    // The GGUF's weights with f32 activations. (With 8-bit activation quantization inside the
    // quantized matmuls, as llama.cpp also does, the first token flips: f32 gives "The" -1.88 vs
    // "L" -1.96, quantized "L" -1.89 vs "The" -2.18, and the model answers in French.)
    let out = greedy(smol_f32(), &prompt, 40)?;
    let answer = s.tok.decode(&out, true)?;
    eprintln!("SmolLM2 answer: {answer:?}");
    assert!(
        answer.contains("Paris"),
        "answer {answer:?} does not mention Paris"
    );
    Ok(())
}

/// SmolLM2 with every weight dequantized to f32: no activation quantization, so batching and padding
/// must not change any number beyond float rounding.
fn smol_f32() -> &'static Llama {
    static M: OnceLock<Llama> = OnceLock::new();
    M.get_or_init(|| {
        let g = GgufFile::open(&gguf_path()).expect("open GGUF");
        Llama::from_gguf_with(&g, &Device::Cpu, GgufWeights::F32).expect("load SmolLM2 (f32)")
    })
}

#[test]
fn batched_left_padded_prefill_matches_single_prompts() -> Result<()> {
    // f32 weights: exact up to rounding. Quantized weights: activations are quantized to 8 bits per
    // block inside the matmuls, so a different summation order upstream can flip a rounding and the
    // logits move by up to a few 1e-2 relative (measured 2.2e-2 for prefill vs token-by-token of the
    // same prompt); there we require the same greedy tokens.
    check_batched_prefill(smol_f32(), &smol().tok, 1e-4, true)?;
    check_batched_prefill(&smol().model, &smol().tok, 1e-1, false)
}

fn check_batched_prefill(
    model: &Llama,
    tok: &TextTokenizer,
    tol: f32,
    same_tokens: bool,
) -> Result<()> {
    let prompts: Vec<Vec<u32>> = [
        "The capital of Italy is",
        "Water boils at a temperature of 100 degrees Celsius at sea level, and it freezes at",
        "One, two,",
    ]
    .iter()
    .map(|p| enc(tok, p))
    .collect();
    assert!(prompts[1].len() > prompts[0].len() && prompts[0].len() > prompts[2].len());
    let mut batch = model.start(&gen_input(&prompts, 0)?)?;
    let mut batch_logits = model.first_logits(&mut batch)?;
    let mut singles = Vec::new();
    for p in &prompts {
        let mut st = model.start(&gen_input(std::slice::from_ref(p), 0)?)?;
        let l = model.first_logits(&mut st)?;
        singles.push((st, l));
    }
    for step in 0..3 {
        let mut next = Vec::new();
        for (r, (st, l)) in singles.iter_mut().enumerate() {
            let d = max_rel_diff(&batch_logits.get(r)?, &l.get(0)?)?;
            assert!(
                d < tol,
                "step {step} row {r}: batched vs single logits differ by {d:.2e} (relative)"
            );
            let t = argmax(&l.get(0)?.to_vec1::<f32>()?);
            if same_tokens {
                assert_eq!(
                    t,
                    argmax(&batch_logits.get(r)?.to_vec1::<f32>()?),
                    "step {step} row {r}: greedy token differs"
                );
            }
            *l = model.step(st, &Tensor::new(&[t], &Device::Cpu)?)?;
            next.push(t);
        }
        batch_logits = model.step(&mut batch, &Tensor::new(next, &Device::Cpu)?)?;
    }
    Ok(())
}

#[test]
fn select_rows_reorders_and_duplicates_caches() -> Result<()> {
    let s = smol();
    let prompts = vec![
        enc(&s.tok, "Roses are red, violets are"),
        enc(&s.tok, "1 2 3 4"),
    ];
    let mut state = s.model.start(&gen_input(&prompts, 0)?)?;
    let logits = s.model.first_logits(&mut state)?;
    let toks: Vec<u32> = (0..2)
        .map(|r| Ok(argmax(&logits.get(r)?.to_vec1::<f32>()?)))
        .collect::<Result<_>>()?;
    let mut base = state.clone();
    let base_logits = s
        .model
        .step(&mut base, &Tensor::new(toks.as_slice(), &Device::Cpu)?)?;
    // Row order [1, 0, 1]: a reorder plus a duplicate (beam search / n_docs expansion).
    let order = [1u32, 0, 1];
    let mut sel = state.select_rows(&Tensor::new(&order, &Device::Cpu)?)?;
    assert_eq!(sel.rows()?, 3);
    let sel_toks: Vec<u32> = order.iter().map(|&r| toks[r as usize]).collect();
    let sel_logits = s
        .model
        .step(&mut sel, &Tensor::new(sel_toks, &Device::Cpu)?)?;
    for (i, &r) in order.iter().enumerate() {
        let d = max_rel_diff(&sel_logits.get(i)?, &base_logits.get(r as usize)?)?;
        assert!(d < 1e-5, "selected row {i} (from {r}) differs by {d:.2e}");
    }
    Ok(())
}

#[test]
fn gguf_tokenizer_round_trips_and_splits_digits() -> Result<()> {
    let s = smol();
    assert_eq!(s.tok.vocab_size(), s.model.config.vocab_size);
    assert_eq!(s.tok.special.bos, Some(1));
    assert_eq!(s.tok.special.eos, Some(2));
    for text in [
        "What is the capital of France?",
        "  leading spaces, tabs\tand\nnew lines\n\n",
        "Zürich, naïve café — 東京 🙂",
        "It cost $1234.56 in 2024!",
        "<|im_start|>user\nhi<|im_end|>\n",
    ] {
        let ids = enc(&s.tok, text);
        assert!(!ids.is_empty());
        assert_eq!(
            s.tok.decode(&ids, false)?,
            text,
            "round trip of {text:?} via {ids:?}"
        );
    }
    // SmolLM's pre-tokenizer splits digits individually.
    let ids = enc(&s.tok, "2024");
    assert_eq!(ids.len(), 4, "digits are single tokens: {ids:?}");
    // Special tokens are matched whole and skipped when asked.
    let ids = enc(&s.tok, "<|im_start|>assistant\nParis<|im_end|>");
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(s.tok.decode(&ids, true)?, "assistant\nParis");
    Ok(())
}

#[test]
fn gguf_errors_name_file_and_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("broken.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00garbage")?;
    let err = GgufFile::open(&bad)
        .err()
        .context("a corrupt GGUF must not open")?;
    assert!(format!("{err:#}").contains("broken.gguf"), "{err:#}");
    let g = GgufFile::open(&gguf_path())?;
    let err = g.u32("llama.no_such_key").err().context("missing key")?;
    let msg = format!("{err:#}");
    assert!(
        msg.contains("SmolLM2-135M-Instruct.Q4_1.gguf") && msg.contains("llama.no_such_key"),
        "{msg}"
    );
    let err = g
        .tensor("blk.0.attn_q.weight", &[7, 7], &Device::Cpu)
        .err()
        .context("wrong shape")?;
    let msg = format!("{err:#}");
    assert!(
        msg.contains("blk.0.attn_q.weight") && msg.contains("[576, 576]"),
        "{msg}"
    );
    let err = tokenizer_from_gguf(&g, 1000)
        .err()
        .context("vocab mismatch")?;
    assert!(format!("{err:#}").contains("vocab_size 1000"), "{err:#}");
    Ok(())
}

/// SmolLM2's own template (`tokenizer.chat_template`, evaluated as Jinja) gives the RAG prompt
/// the pipeline has always built: default system turn, user turn, opened assistant turn.
#[test]
fn smollm2_chat_template_renders_its_chatml() -> Result<()> {
    let text = smol()
        .chat
        .format(&[ChatMessage::new("user", "Hi")], true)?;
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(smol().chat.tokens().bos.as_deref(), Some("<|im_start|>"));
    Ok(())
}

fn parity_dir() -> PathBuf {
    std::env::var("RUSTRAG_PARITY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/parity"))
}

/// Write the fixture's tiny HF Llama (and its byte-level BPE tokenizer) as a GGUF file the way
/// llama.cpp's converter does (q/k rows permuted for interleaved rotary pairs), with `dtype` weights.
fn write_fixture_gguf(
    hf_dir: &std::path::Path,
    out: &std::path::Path,
    dtype: candle_core::quantized::GgmlDType,
) -> Result<()> {
    use candle_core::quantized::{gguf_file::Value, QTensor};
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf_dir.join("config.json"))?)?;
    let n = |k: &str| {
        cfg[k]
            .as_u64()
            .map(|v| v as u32)
            .with_context(|| format!("config {k}"))
    };
    let (heads, kv_heads, head_dim) = (
        n("num_attention_heads")?,
        n("num_key_value_heads")?,
        n("head_dim")?,
    );
    let tj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf_dir.join("tokenizer.json"))?)?;
    let vocab = tj["model"]["vocab"].as_object().context("vocab")?;
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().context("id")? as usize] = t.clone();
    }
    let specials: Vec<u64> = tj["added_tokens"]
        .as_array()
        .context("added_tokens")?
        .iter()
        .filter_map(|a| a["id"].as_u64())
        .collect();
    let types: Vec<Value> = (0..tokens.len() as u64)
        .map(|i| Value::I32(if specials.contains(&i) { 3 } else { 1 }))
        .collect();
    let merges: Vec<Value> = tj["model"]["merges"]
        .as_array()
        .context("merges")?
        .iter()
        .map(|m| match m {
            serde_json::Value::Array(p) => Value::String(format!(
                "{} {}",
                p[0].as_str().unwrap_or(""),
                p[1].as_str().unwrap_or("")
            )),
            other => Value::String(other.as_str().unwrap_or("").to_string()),
        })
        .collect();
    let rope_theta = cfg["rope_parameters"]["rope_theta"]
        .as_f64()
        .or(cfg["rope_theta"].as_f64())
        .unwrap_or(10000.0);
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(n("num_hidden_layers")?)),
        ("llama.embedding_length", Value::U32(n("hidden_size")?)),
        (
            "llama.feed_forward_length",
            Value::U32(n("intermediate_size")?),
        ),
        ("llama.attention.head_count", Value::U32(heads)),
        ("llama.attention.head_count_kv", Value::U32(kv_heads)),
        ("llama.attention.key_length", Value::U32(head_dim)),
        ("llama.rope.dimension_count", Value::U32(head_dim)),
        ("llama.rope.freq_base", Value::F32(rope_theta as f32)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg["rms_norm_eps"].as_f64().context("eps")? as f32),
        ),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", Value::Array(merges)),
        (
            "tokenizer.ggml.bos_token_id",
            Value::U32(n("bos_token_id")?),
        ),
        (
            "tokenizer.ggml.eos_token_id",
            Value::U32(n("eos_token_id")?),
        ),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
    ];
    let w = rustrag::hub::Weights::from_dir(hf_dir, candle_core::DType::F32, &Device::Cpu, false)?;
    // llama.cpp's converter: rows of each head reordered so rotary pairs are adjacent.
    let permute = |t: Tensor, nh: u32| -> Result<Tensor> {
        let (out, inp) = t.dims2()?;
        let nh = nh as usize;
        Ok(t.reshape((nh, 2, out / nh / 2, inp))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((out, inp))?)
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut put = |name: String, t: Tensor, q: bool| -> Result<()> {
        let dt = if q {
            dtype
        } else {
            candle_core::quantized::GgmlDType::F32
        };
        tensors.push((name, QTensor::quantize(&t, dt)?));
        Ok(())
    };
    put(
        "token_embd.weight".into(),
        w.get("model.embed_tokens.weight")?,
        true,
    )?;
    put("output.weight".into(), w.get("lm_head.weight")?, true)?;
    put(
        "output_norm.weight".into(),
        w.get("model.norm.weight")?,
        false,
    )?;
    for i in 0..n("num_hidden_layers")? {
        let hf = |s: &str| w.get(&format!("model.layers.{i}.{s}.weight"));
        let g = |s: &str| format!("blk.{i}.{s}.weight");
        put(g("attn_norm"), hf("input_layernorm")?, false)?;
        put(g("ffn_norm"), hf("post_attention_layernorm")?, false)?;
        put(g("attn_q"), permute(hf("self_attn.q_proj")?, heads)?, true)?;
        put(
            g("attn_k"),
            permute(hf("self_attn.k_proj")?, kv_heads)?,
            true,
        )?;
        put(g("attn_v"), hf("self_attn.v_proj")?, true)?;
        put(g("attn_output"), hf("self_attn.o_proj")?, true)?;
        put(g("ffn_gate"), hf("mlp.gate_proj")?, true)?;
        put(g("ffn_up"), hf("mlp.up_proj")?, true)?;
        put(g("ffn_down"), hf("mlp.down_proj")?, true)?;
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(out)?;
    candle_core::quantized::gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
    Ok(())
}

/// The parity fixture's tiny HF Llama: its directory, the model (safetensors path) and tokenizer.
fn fixture_llama() -> Result<(PathBuf, Llama, TextTokenizer)> {
    let hf_dir = parity_dir().join("decoder-only").join("model");
    assert!(
        hf_dir.is_dir(),
        "parity fixture missing: {} (set RUSTRAG_PARITY_DIR)",
        hf_dir.display()
    );
    let hf = Llama::from_hf_dir(&hf_dir, &Device::Cpu)?;
    let hf_tok = rustrag::tokenize::load_tokenizer(&hf_dir)?;
    Ok((hf_dir, hf, hf_tok))
}

/// The GGUF path (interleaved rotary, metadata config, tokenizer from metadata) computes what the HF
/// safetensors path computes, on the parity fixture's tiny Llama converted as llama.cpp would.
#[test]
fn gguf_conversion_of_fixture_matches_hf_safetensors() -> Result<()> {
    let (hf_dir, hf, hf_tok) = fixture_llama()?;
    let dir = tempfile::tempdir()?;
    let texts = [
        "Super Bowl 50 / The Broncos defeated the Panthers 24–10. // Who won Super Bowl 50?",
        "How many NFL teams have gone 15-1 in one season?",
    ];
    let prompts: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| std::iter::once(1).chain(enc(&hf_tok, t)).collect())
        .collect();
    let hf_logits = hf.forward(
        &gen_input(&prompts, 0)?.input_ids,
        &gen_input(&prompts, 0)?.attention_mask,
    )?;
    for (dtype, tol) in [
        (candle_core::quantized::GgmlDType::F32, 1e-4f32),
        (candle_core::quantized::GgmlDType::Q8_0, 5e-2),
    ] {
        let path = dir.path().join(format!("tiny-{dtype:?}.gguf"));
        write_fixture_gguf(&hf_dir, &path, dtype)?;
        let g = GgufFile::open(&path)?;
        let m = Llama::from_gguf(&g, &Device::Cpu)?;
        let tok = tokenizer_from_gguf(&g, m.config.vocab_size)?;
        for t in texts {
            assert_eq!(
                enc(&tok, t),
                enc(&hf_tok, t),
                "GGUF tokenizer differs from tokenizer.json on {t:?}"
            );
        }
        let input = gen_input(&prompts, 0)?;
        let logits = m.forward(&input.input_ids, &input.attention_mask)?;
        for (r, p) in prompts.iter().enumerate() {
            let a = logits.get(r)?.narrow(0, 0, p.len())?;
            let b = hf_logits.get(r)?.narrow(0, 0, p.len())?;
            let d = max_rel_diff(&a, &b)?;
            assert!(
                d < tol,
                "{dtype:?} GGUF vs HF logits (row {r}): relative difference {d:.2e}"
            );
        }
    }
    Ok(())
}

/// Runs the decode benchmark through the binary (timings printed, not asserted;
/// `RUSTRAG_BENCH_TOKENS` sets the length, default 8).
#[test]
fn decode_bench_reports_counts() -> Result<()> {
    let n: usize = std::env::var("RUSTRAG_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let modes = match std::env::var("RUSTRAG_BENCH_ALL_MODES") {
        Ok(_) => vec!["native", "fast", "as-stored", "f32"],
        Err(_) => vec!["native"],
    };
    let prompt = "The history of the city of Paris begins";
    for mode in modes {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rustrag"))
            .args(["--json", "bench", "--no-peer", "decode", "--gguf"])
            .arg(gguf_path())
            .args(["--prompt", prompt, "--tokens", &n.to_string()])
            .args(["--repeats", "1", "--weights", mode])
            .env("RUSTRAG_NO_PROGRESS", "1")
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "bench decode failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let b = &report["rustrag"];
        eprintln!("{b}");
        assert_eq!(b["decode_tokens"].as_u64(), Some(n as u64));
        assert_eq!(
            b["prompt_tokens"].as_u64(),
            Some(enc(&smol().tok, prompt).len() as u64)
        );
        assert!(!b["text"].as_str().unwrap_or("").is_empty());
    }
    Ok(())
}

/// The RAG head over the real SmolLM2 (decoder-only) on real SQuAD-dev passages (doc priors given,
/// as the retriever would pass them), prompts through the chat template: RAG-Token greedy and beam
/// search, RAG-Sequence thorough decoding with beams, provenance, and the RAG-Sequence loss agreeing
/// with the rescoring.
#[test]
fn smollm2_decoder_only_rag_on_squad_passages() -> Result<()> {
    use rustrag::rag::pipeline::decoder_only_rag;
    use rustrag::rag::{GenerationSettings, RagMode};
    use rustrag::retrieve::Passage;
    let s = smol();
    let data = parity_dir().join("../data/squad-dev/corpus.jsonl.gz");
    assert!(
        data.is_file(),
        "SQuAD-dev passages missing: {}",
        data.display()
    );
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(std::fs::File::open(&data)?),
        &mut text,
    )?;
    let docs: Vec<serde_json::Value> = text
        .lines()
        .take(40)
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let pick = |id: &str| -> Result<Passage> {
        let d = docs
            .iter()
            .find(|d| d["_id"] == id)
            .with_context(|| format!("passage {id}"))?;
        Ok(Passage {
            id: id.to_string(),
            title: d["title"].as_str().unwrap_or("").to_string(),
            text: d["text"].as_str().unwrap_or("").to_string(),
        })
    };
    // The answer passage first, then two distractors from the same article.
    let passages = vec![pick("0-0")?, pick("0-5")?, pick("0-9")?];
    let g = GgufFile::open(&gguf_path())?;
    let llama = Llama::from_gguf_with(&g, &Device::Cpu, GgufWeights::F32)?;
    let tok = tokenizer_from_gguf(&g, llama.config.vocab_size)?;
    let eos = llama.special_ids().eos;
    let mut rag = decoder_only_rag(
        Box::new(llama),
        tok,
        Some(s.chat.clone()),
        8192,
        &gguf_path(),
    )?;
    let question = "Which NFL team represented the AFC at Super Bowl 50?".to_string();
    // Doc scores whose softmax is (0.5, 0.25, 0.25).
    let doc_scores = Tensor::new(&[[0.5f32.ln(), 0.25f32.ln(), 0.25f32.ln()]], &Device::Cpu)?;
    let (_, ctx) = rag.context_from_passages(&[question], &[passages], doc_scores)?;
    let settings = |beams: usize| GenerationSettings {
        num_beams: Some(beams),
        max_length: Some(33),
        ..Default::default()
    };
    // SmolLM2-135M is weak: with these distractors it may name the wrong team, so the check is that
    // the answer is grounded in the passages (a team only they mention).
    let grounded = |a: &str| a.contains("Broncos") || a.contains("Panthers");
    let greedy = rag.generate_token(&ctx, &rag.generation_params(&settings(1))?)?;
    let answer = rag.generator_tokenizer.decode(&greedy[0][1..], true)?;
    let provenance = rag.doc_posteriors_for(RagMode::Token, &ctx, 0, &greedy[0])?;
    eprintln!("RAG-Token answer: {answer:?}, provenance {provenance:?}");
    assert!(grounded(&answer), "RAG-Token answer {answer:?}");
    assert_eq!(greedy[0].last(), Some(&eos));
    assert_eq!(provenance.len(), greedy[0].len() - 1);
    for p in &provenance {
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    }
    let beam = rag.generate_token(&ctx, &rag.generation_params(&settings(2))?)?;
    let beam_answer = rag.generator_tokenizer.decode(&beam[0][1..], true)?;
    eprintln!("RAG-Token beam 2 answer: {beam_answer:?}");
    assert!(
        grounded(&beam_answer),
        "RAG-Token beam answer {beam_answer:?}"
    );

    rag.mode = RagMode::Sequence;
    let (best, details) =
        rag.generate_sequence(&ctx, &rag.generation_params(&settings(2))?, true)?;
    let best_text = rag.generator_tokenizer.decode(&best[0][1..], true)?;
    let d = &details[0];
    eprintln!(
        "RAG-Sequence answer: {best_text:?} (candidates {}, nll {:?})",
        d.candidates.len(),
        d.candidate_nll
    );
    assert!(grounded(&best_text), "RAG-Sequence answer {best_text:?}");
    assert_eq!(d.generator_outputs.len(), 3 * 2);
    let top = d.top_candidate_indices[0];
    assert!(d.candidate_nll.iter().all(|&n| n >= d.candidate_nll[top]));
    // The RAG-Sequence loss of the chosen candidate is its rescoring NLL.
    let labels = Tensor::new(d.candidates[top].as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let mut opts = rag.default_nll_options();
    opts.reduce_loss = false;
    opts.exclude_bos_score = true;
    let loss = rag.loss(&ctx, &labels, &opts)?.to_vec1::<f32>()?[0];
    assert!(
        (loss - d.candidate_nll[top]).abs() < 1e-3 * loss.abs().max(1.0),
        "loss {loss} vs rescoring {}",
        d.candidate_nll[top]
    );
    let posterior = rag.doc_posteriors(&ctx, 0, &best[0])?;
    assert!((posterior[0].iter().sum::<f32>() - 1.0).abs() < 1e-4);
    Ok(())
}

/// The native Q4_1/Q8_0 kernels on SmolLM2's real tensors: equal to candle's scalar
/// `BlockQ4_1::vec_dot` / `BlockQ8_0::vec_dot`-style reference with the same activation
/// quantization (~1e-5 relative), and equal to the f32 matmul with the dequantized weights within the
/// activation quantization error bound (`sum_c |w_c| * d_block / 2`, d = max|x| / 127 per block).
#[test]
fn native_kernels_match_candle_and_f32_on_smollm2_tensors() -> Result<()> {
    use candle_core::quantized::k_quants::{self, GgmlType};
    use rustrag::generators::quant::{quantize_q8_1, simd_available, BlockQ8_1, QMatrix, QK};
    let g = GgufFile::open(&gguf_path())?;
    let mut checked = 0;
    for (name, m) in [
        ("blk.0.attn_q.weight", 1),
        ("blk.3.attn_k.weight", 3),
        ("blk.7.ffn_down.weight", 1),
        ("blk.29.ffn_gate.weight", 5),
        ("token_embd.weight", 2),
    ] {
        let shape = g.tensor_shape(name)?.dims().to_vec();
        let qt = g.tensor(name, &shape, &Device::Cpu)?;
        let w = QMatrix::from_qtensor(&qt, name)?;
        let (rows, cols) = (w.rows(), w.cols());
        let nb = cols / QK;
        // Activations with an outlier per row, as real hidden states have.
        let x: Vec<f32> = (0..m * cols)
            .map(|i| {
                ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * if i % 97 == 0 { 8.0 } else { 1.0 }
            })
            .collect();
        // 1) Same activation quantization as candle's `BlockQ8_1::from_float` (f16 d and s).
        let mut cx = vec![k_quants::BlockQ8_1::zeros(); m * nb];
        k_quants::BlockQ8_1::from_float(&x, &mut cx);
        let cbytes = unsafe { std::slice::from_raw_parts(cx.as_ptr() as *const u8, cx.len() * 36) };
        let xq: Vec<BlockQ8_1> = cbytes
            .chunks_exact(36)
            .map(|b| BlockQ8_1 {
                d: half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                s: half::f16::from_le_bytes([b[2], b[3]]).to_f32(),
                qs: std::array::from_fn(|j| b[4 + j] as i8),
            })
            .collect();
        let mut ours = vec![0f32; m * rows];
        w.matmul_q8(&xq, m, &mut ours, simd_available())?;
        let data = qt.data()?;
        let n_rows_checked = rows.min(300);
        for i in 0..m {
            let xs = &cx[i * nb..(i + 1) * nb];
            for r in 0..n_rows_checked {
                let theirs = match qt.dtype() {
                    candle_core::quantized::GgmlDType::Q4_1 => {
                        let blocks: &[k_quants::BlockQ4_1] = unsafe {
                            std::slice::from_raw_parts(
                                data.as_ptr() as *const k_quants::BlockQ4_1,
                                rows * nb,
                            )
                        };
                        k_quants::BlockQ4_1::vec_dot(cols, &blocks[r * nb..(r + 1) * nb], xs)
                    }
                    candle_core::quantized::GgmlDType::Q8_0 => {
                        // candle's Q8_0 dots with Q8_0 activations: the same q and d, without s.
                        let blocks: &[k_quants::BlockQ8_0] = unsafe {
                            std::slice::from_raw_parts(
                                data.as_ptr() as *const k_quants::BlockQ8_0,
                                rows * nb,
                            )
                        };
                        let mut x8 = vec![k_quants::BlockQ8_0::zeros(); nb];
                        k_quants::BlockQ8_0::from_float(&x[i * cols..(i + 1) * cols], &mut x8);
                        k_quants::BlockQ8_0::vec_dot_unopt(cols, &blocks[r * nb..(r + 1) * nb], &x8)
                    }
                    other => panic!("{name}: unexpected type {other:?}"),
                };
                let got = ours[i * rows + r];
                assert!(
                    (got - theirs).abs() <= 1e-5 * theirs.abs().max(1.0),
                    "{name} row {r} act {i}: native {got} vs candle {theirs}"
                );
                checked += 1;
            }
        }
        // 2) Our own activation quantization vs the f32 matmul with dequantized weights.
        let wf = w.dequantize();
        let out = w.matmul(&x, m)?;
        let xq = quantize_q8_1(&x, cols);
        for i in 0..m {
            let xs = &x[i * cols..(i + 1) * cols];
            for r in 0..rows {
                let wr = &wf[r * cols..(r + 1) * cols];
                let exact: f64 = wr.iter().zip(xs).map(|(&a, &b)| a as f64 * b as f64).sum();
                let bound: f64 = (0..nb)
                    .map(|blk| {
                        let d = xq[i * nb + blk].d as f64;
                        wr[blk * QK..(blk + 1) * QK]
                            .iter()
                            .map(|w| w.abs() as f64)
                            .sum::<f64>()
                            * d
                            / 2.0
                    })
                    .sum();
                let got = out[i * rows + r] as f64;
                assert!(
                    (got - exact).abs() <= bound * 1.001 + 1e-4 * exact.abs().max(1.0),
                    "{name} row {r} act {i}: native {got} vs f32 {exact} (bound {bound})"
                );
                checked += 1;
            }
        }
    }
    eprintln!("native kernels: {checked} dot products checked");
    Ok(())
}

/// The raw-buffer prefill and decode steps (default weights) against the tensor path on the same
/// SmolLM2 weights, left-padded batch:
/// logits within activation-quantization noise (a float-rounding difference upstream flips 8-bit
/// roundings inside the matmuls: measured 1.7e-2..3.8e-2 relative, the same size as either path's
/// difference from f32 activations, 3e-2..5e-2). The exact check is
/// `raw_decode_of_fixture_matches_hf_and_tensor_path` (f32 weights, no activation quantization).
#[test]
fn raw_decode_step_matches_tensor_path() -> Result<()> {
    let s = smol();
    assert!(
        s.model.raw_decode(),
        "default GGUF weights should decode on raw buffers"
    );
    let g = GgufFile::open(&gguf_path())?;
    let mut tensor_path = Llama::from_gguf(&g, &Device::Cpu)?;
    tensor_path.set_raw_decode(false)?;
    // Two rows of different lengths: left padding exercises the key mask in both paths.
    let prompts = vec![
        enc(&s.tok, "The capital of Italy is"),
        enc(&s.tok, "Water boils at a temperature of"),
    ];
    let input = gen_input(&prompts, 0)?;
    let mut a = s.model.start(&input)?;
    let mut b = tensor_path.start(&input)?;
    let mut la = s.model.first_logits(&mut a)?;
    let mut lb = tensor_path.first_logits(&mut b)?;
    let mut worst = 0f32;
    for step in 0..6 {
        let mut toks = Vec::new();
        for r in 0..prompts.len() {
            let d = max_rel_diff(&la.get(r)?, &lb.get(r)?)?;
            worst = worst.max(d);
            assert!(d < 1e-1, "step {step} row {r}: logits differ by {d:.2e}");
            // Both paths are fed the same tokens (a near-tie may pick differently under the noise).
            toks.push(argmax(&la.get(r)?.to_vec1::<f32>()?));
        }
        la = s
            .model
            .step(&mut a, &Tensor::new(toks.as_slice(), &Device::Cpu)?)?;
        lb = tensor_path.step(&mut b, &Tensor::new(toks.as_slice(), &Device::Cpu)?)?;
    }
    eprintln!("raw vs tensor decode: worst relative logit difference {worst:.2e}");
    Ok(())
}

/// The raw-buffer path, exactly: the parity fixture's tiny Llama converted to an F32 GGUF runs natively
/// (f32 weights, no activation quantization), and its prefill and greedy steps over a left-padded
/// batch equal both the tensor path and the HF safetensors model to 1e-4.
#[test]
fn raw_decode_of_fixture_matches_hf_and_tensor_path() -> Result<()> {
    let (hf_dir, hf, hf_tok) = fixture_llama()?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tiny-F32.gguf");
    write_fixture_gguf(&hf_dir, &path, candle_core::quantized::GgmlDType::F32)?;
    let g = GgufFile::open(&path)?;
    let raw = Llama::from_gguf(&g, &Device::Cpu)?;
    assert!(raw.raw_decode(), "F32 GGUF weights should decode natively");
    let mut tensor_path = Llama::from_gguf(&g, &Device::Cpu)?;
    tensor_path.set_raw_decode(false)?;
    assert!(!hf.raw_decode());
    // Short prompts are prefilled on raw buffers, long ones (> 64 tokens) through the tensor path;
    // decode steps are raw in both cases.
    let long = "Super Bowl 50 was an American football game to determine the champion of the \
        National Football League for the 2015 season. The American Football Conference champion \
        Denver Broncos defeated the National Football Conference champion Carolina Panthers 24–10 \
        to earn their third Super Bowl title. // Who won?";
    let mut checks = 0;
    for texts in [
        [
            "Super Bowl 50 / The Broncos defeated the Panthers 24–10. // Who won?",
            "How many NFL teams",
        ],
        [long, "How many NFL teams"],
    ] {
        let prompts: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| std::iter::once(1).chain(enc(&hf_tok, t)).collect())
            .collect();
        let input = gen_input(&prompts, 0)?;
        let models = [&raw, &tensor_path, &hf];
        let mut states = Vec::new();
        let mut logits = Vec::new();
        for m in models {
            let mut st = m.start(&input)?;
            logits.push(m.first_logits(&mut st)?);
            states.push(st);
        }
        for step in 0..6 {
            for other in 1..3 {
                let d = max_rel_diff(&logits[0], &logits[other])?;
                assert!(
                    d < 1e-4,
                    "prompt len {} step {step}: raw vs model {other} differ by {d:.2e}",
                    prompts[0].len()
                );
                checks += 1;
            }
            let toks: Vec<u32> = (0..prompts.len())
                .map(|r| Ok(argmax(&logits[0].get(r)?.to_vec1::<f32>()?)))
                .collect::<Result<_>>()?;
            for (i, m) in models.iter().enumerate() {
                logits[i] = m.step(&mut states[i], &Tensor::new(toks.as_slice(), &Device::Cpu)?)?;
            }
        }
        eprintln!(
            "fixture raw path: prompt lengths {:?}",
            prompts.iter().map(|p| p.len()).collect::<Vec<_>>()
        );
    }
    assert_eq!(checks, 24);
    Ok(())
}
