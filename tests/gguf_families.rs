//! GGUF decoder families (llama, qwen2, qwen3, phi3, gemma2, gemma3) × quantisation types (Q4_K_M, Q5_K_M, Q6_K, Q8_0,
//! Q4_0), and the rope-scaling variants `llama31` (Llama 3.1's scaling as `rope_freqs.weight`),
//! `qwen2yarn` (YaRN) and `phi3long` (Phi-3-128k's LongRoPE: long/short factor tensors and an
//! attention factor) in Q4_K_M and Q8_0, against llama.cpp on the same files: logits of a 64-token prompt and 32 greedy
//! tokens, greedy ids, and the GGUF tokenizer's ids for the prompt text.
//!
//! The fixtures are tiny random models converted and quantised by llama.cpp's own tools, with
//! llama.cpp's outputs recorded by tests/fixtures/make_gguf_fixtures.py. The files the tests read
//! (~49 MB: quantised GGUFs, llama.cpp's logits and ids) are committed in `tests/fixtures/gguf`, so
//! CI needs neither torch nor a llama.cpp build; `$RUSTRAG_GGUF_FIXTURES` points elsewhere. A
//! missing fixture directory fails the tests.
//!
//! Tolerance on logits: both sides quantise the activations of every matmul the same way (Q8_K per
//! 256 values for k-quant weights, Q8_0/Q8_1 per 32 for the others) and sum integer products
//! exactly; the raw decode path also rounds RMSNorm and the rotary angles as ggml does. Where no
//! activation lands differently the logits agree to ~1e-6 (measured: 11 of the 15 files on the
//! decode path). But a last-bit difference upstream (f32 summation order in attention, softmax,
//! exp) occasionally flips the rounding of one activation value `x / d` sitting at a half step,
//! which moves its products by `|w| * d` (d = max|x| / 127 of the block) and propagates through
//! the later layers: measured up to 9.4e-2 (gemma3, 6 blocks) on these models, whose logits span
//! about ±3. We allow 0.1 — a modelling error (a missing bias or head norm, the wrong rotary layout
//! or frequency factors, a mis-read block) moves logits by O(1) (leaving out the frequency factors
//! of llama31/phi3long: 2.3–2.8) — and require greedy ids equal wherever llama.cpp's top-2 margin
//! exceeds it.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use rustrag::generators::gguf::{tokenizer_from_gguf, ChatMessage, ChatTemplate, GgufFile};
use rustrag::generators::llama::Llama;
use rustrag::generators::{Decoder, GenInput};
use rustrag::tokenize::ids_tensor;
use std::path::PathBuf;

/// Largest |logit difference| allowed vs llama.cpp (see the module doc).
const LOGIT_TOL: f32 = 0.1;

fn fixtures_dir() -> PathBuf {
    let dir = std::env::var("RUSTRAG_GGUF_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf"));
    assert!(
        dir.join("index.json").is_file(),
        "GGUF family fixtures missing in {} (they are committed in tests/fixtures/gguf; \
         regenerate with `python tests/fixtures/make_gguf_fixtures.py --install`)",
        dir.display()
    );
    dir
}

#[derive(serde::Deserialize)]
struct Meta {
    family: String,
    quant: String,
    gguf: String,
    vocab: usize,
    prompt: Vec<u32>,
    greedy: Vec<u32>,
    text: String,
    text_ids: Vec<u32>,
    logits: String,
    logits_rows: usize,
}

struct Fixture {
    meta: Meta,
    path: PathBuf,
    /// llama.cpp's logits `[logits_rows, vocab]`: row t follows token t of prompt + greedy.
    logits: Vec<f32>,
}

impl Fixture {
    fn row(&self, t: usize) -> &[f32] {
        &self.logits[t * self.meta.vocab..(t + 1) * self.meta.vocab]
    }
}

fn fixtures() -> Result<Vec<Fixture>> {
    let dir = fixtures_dir();
    let index: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("index.json"))?)?;
    assert_eq!(
        index.len(),
        36,
        "6 families x 5 types + 3 rope-scaling variants x 2 types expected: {index:?}"
    );
    index
        .iter()
        .map(|stem| {
            let meta: Meta =
                serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{stem}.json")))?)
                    .with_context(|| format!("{stem}.json"))?;
            let bytes = std::fs::read(dir.join(&meta.logits))?;
            let logits: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(logits.len(), meta.logits_rows * meta.vocab, "{stem}");
            assert_eq!(meta.logits_rows, meta.prompt.len() + meta.greedy.len());
            Ok(Fixture {
                path: dir.join(&meta.gguf),
                meta,
                logits,
            })
        })
        .collect()
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        )
        .0
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Per-row comparison: max |diff|, and whether our argmax agrees with llama.cpp's (else the
/// margin in llama.cpp's logits between its choice and ours).
struct RowCheck {
    max_diff: f32,
    agree: usize,
    rows: usize,
    worst_margin: f32,
}

impl RowCheck {
    fn new() -> Self {
        Self {
            max_diff: 0.0,
            agree: 0,
            rows: 0,
            worst_margin: 0.0,
        }
    }

    fn add(&mut self, ours: &[f32], theirs: &[f32]) {
        self.max_diff = self.max_diff.max(max_abs_diff(ours, theirs));
        let (a, b) = (argmax(ours), argmax(theirs));
        self.rows += 1;
        if a == b {
            self.agree += 1;
        } else {
            self.worst_margin = self.worst_margin.max(theirs[b] - theirs[a]);
        }
    }
}

#[test]
fn families_match_llama_cpp_logits_and_greedy_ids() -> Result<()> {
    let mut failures = Vec::new();
    let mut worst = 0f32;
    eprintln!(
        "{:<7} {:<7} {:>12} {:>12} {:>8} {:>10}",
        "family", "type", "decode max", "prefill max", "greedy", "margin"
    );
    for f in fixtures()? {
        let m = &f.meta;
        let g = GgufFile::open(&f.path)?;
        let model = Llama::from_gguf(&g, &Device::Cpu)?;
        assert!(
            model.raw_decode(),
            "{}: not on the native path",
            f.path.display()
        );
        assert_eq!(model.config.vocab_size, m.vocab);
        let p = m.prompt.len();
        // 1) Raw-buffer prefill + decode steps, fed llama.cpp's greedy tokens: rows p-1 .. p+31.
        let input = GenInput {
            input_ids: ids_tensor(std::slice::from_ref(&m.prompt), &Device::Cpu)?,
            attention_mask: ids_tensor(&[vec![1u32; p]], &Device::Cpu)?,
        };
        let mut state = model.start(&input)?;
        let mut logits = model.first_logits(&mut state)?;
        let mut decode = RowCheck::new();
        for (k, &tok) in m.greedy.iter().enumerate() {
            decode.add(&logits.get(0)?.to_vec1::<f32>()?, f.row(p - 1 + k));
            logits = model.step(&mut state, &Tensor::new(&[tok], &Device::Cpu)?)?;
        }
        let last = logits.get(0)?.to_vec1::<f32>()?;
        decode.max_diff = decode
            .max_diff
            .max(max_abs_diff(&last, f.row(m.logits_rows - 1)));
        // 2) Teacher-forced tensor path over all 96 tokens: every row.
        let all: Vec<u32> = m.prompt.iter().chain(&m.greedy).copied().collect();
        let n = all.len();
        let ours = model
            .forward(
                &Tensor::from_vec(all, (1, n), &Device::Cpu)?,
                &Tensor::ones((1, n), candle_core::DType::U32, &Device::Cpu)?,
            )?
            .squeeze(0)?
            .to_vec2::<f32>()?;
        let mut prefill = RowCheck::new();
        for (t, row) in ours.iter().enumerate() {
            prefill.add(row, f.row(t));
        }
        eprintln!(
            "{:<7} {:<7} {:>12.2e} {:>12.2e} {:>5}/{:<2} {:>10.2e}",
            m.family,
            m.quant,
            decode.max_diff,
            prefill.max_diff,
            decode.agree,
            decode.rows,
            decode.worst_margin.max(prefill.worst_margin)
        );
        worst = worst.max(decode.max_diff).max(prefill.max_diff);
        for (what, c) in [("decode", &decode), ("prefill", &prefill)] {
            if c.max_diff > LOGIT_TOL || c.worst_margin > LOGIT_TOL {
                failures.push(format!(
                    "{}-{} {what}: max |logit diff| {:.3e}, argmax agreement {}/{}, worst margin at a disagreement {:.3e}",
                    m.family, m.quant, c.max_diff, c.agree, c.rows, c.worst_margin
                ));
            }
        }
    }
    eprintln!("worst max |logit diff| {worst:.3e} (tolerance {LOGIT_TOL})");
    assert!(failures.is_empty(), "{failures:#?}");
    Ok(())
}

/// The tokenizer rebuilt from each family's GGUF metadata (byte-level BPE, `tokenizer.ggml.pre` =
/// llama-bpe / qwen2; SentencePiece BPE with byte fallback for phi3 and gemma, the latter without
/// the space prefix) splits the text as llama.cpp does, and the family's chat template renders.
#[test]
fn gguf_tokenizers_match_llama_cpp() -> Result<()> {
    let mut families = 0;
    for f in fixtures()?.iter().filter(|f| f.meta.quant == "Q8_0") {
        let g = GgufFile::open(&f.path)?;
        let tok = tokenizer_from_gguf(&g, f.meta.vocab)?;
        let ids = tok
            .encode_batch(
                &[f.meta.text.as_str()],
                false,
                None,
                rustrag::tokenize::Padding::None,
            )?
            .input_ids
            .remove(0);
        assert_eq!(ids, f.meta.text_ids, "{}: tokenisation", f.meta.family);
        // llama/qwen fixtures carry a ChatML template (as Qwen's), the others their family's.
        let chat = ChatTemplate::from_gguf(&g)?;
        let text = chat.format(&[ChatMessage::new("user", "Hi")], true)?;
        let want = match f.meta.family.as_str() {
            "phi3" | "phi3long" => "<|user|>\nHi<|end|>\n<|assistant|>\n",
            "gemma2" | "gemma3" => {
                "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
            }
            _ => "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        };
        assert_eq!(text, want, "{}: chat template", f.meta.family);
        families += 1;
    }
    assert_eq!(families, 9);
    Ok(())
}

/// A truncated GGUF and a file whose tensor shape disagrees with its metadata are errors naming
/// the file, not panics.
#[test]
fn truncated_and_inconsistent_ggufs_are_clear_errors() -> Result<()> {
    let fx = fixtures()?;
    let f = fx
        .iter()
        .find(|f| f.meta.quant == "Q4_K_M")
        .context("a Q4_K_M fixture")?;
    let bytes = std::fs::read(&f.path)?;
    let dir = tempfile::tempdir()?;
    for cut in [100, bytes.len() / 3, bytes.len() - 1000] {
        let p = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&p, &bytes[..cut])?;
        let err = match GgufFile::open(&p) {
            Err(e) => e,
            Ok(g) => match Llama::from_gguf(&g, &Device::Cpu) {
                Err(e) => e,
                Ok(_) => panic!("{} truncated at {cut} loaded", p.display()),
            },
        };
        let msg = format!("{err:#}");
        assert!(msg.contains(&*p.to_string_lossy()), "cut {cut}: {msg}");
    }
    Ok(())
}

/// A GGUF with a tensor type rustrag does not read (llama.cpp's IQ4_NL) is an error naming the
/// file and the supported types.
#[test]
fn unsupported_tensor_type_names_the_supported_ones() {
    let p = fixtures_dir().join("qwen2-IQ4_NL.gguf");
    assert!(
        p.is_file(),
        "{} missing (re-run the fixture script)",
        p.display()
    );
    let err = match GgufFile::open(&p) {
        Err(e) => format!("{e:#}"),
        Ok(_) => panic!("{} opened", p.display()),
    };
    assert!(
        err.contains(&*p.to_string_lossy()) && err.contains("type id 20") && err.contains("Q4_K"),
        "{err}"
    );
}

use candle_core::quantized::gguf_file::Value;

/// `src` rewritten to `dst` with the metadata `edits` (key, new value or None to remove it) and
/// tensor `replace.0` replaced by `replace.1` (f32).
fn rewrite_gguf(
    src: &std::path::Path,
    dst: &std::path::Path,
    edits: &[(&str, Option<Value>)],
    replace: Option<(&str, Vec<f32>)>,
) -> Result<()> {
    use candle_core::quantized::{gguf_file, QTensor};
    let mut f = std::fs::File::open(src)?;
    let content = gguf_file::Content::read(&mut f)?;
    let mut meta: Vec<(&str, &Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| !edits.iter().any(|(e, _)| e == k))
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    meta.extend(
        edits
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (*k, v))),
    );
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for name in content.tensor_infos.keys() {
        let t = match &replace {
            Some((n, values)) if n == name => QTensor::quantize(
                &Tensor::new(values.as_slice(), &Device::Cpu)?,
                candle_core::quantized::GgmlDType::F32,
            )?,
            _ => content.tensor(&mut f, name, &Device::Cpu)?,
        };
        tensors.push((name.clone(), t));
    }
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(dst)?, &meta, &refs)?;
    Ok(())
}

/// LongRoPE's factor tensors without the original context length that picks between them, and a
/// frequency factor that is not positive, are errors naming the file and the key or tensor.
#[test]
fn bad_rope_factors_are_clear_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = fixtures_dir().join("phi3long-Q8_0.gguf");
    let err = |p: &std::path::Path| -> String {
        match GgufFile::open(p).and_then(|g| Llama::from_gguf(&g, &Device::Cpu)) {
            Ok(_) => panic!("{} loaded", p.display()),
            Err(e) => format!("{e:#}"),
        }
    };
    let no_orig = dir.path().join("no-orig.gguf");
    let key = "phi3.rope.scaling.original_context_length";
    rewrite_gguf(&src, &no_orig, &[(key, None)], None)?;
    let msg = err(&no_orig);
    assert!(
        msg.contains(&*no_orig.to_string_lossy()) && msg.contains(key),
        "{msg}"
    );
    let zero = dir.path().join("zero-factor.gguf");
    let mut factors = vec![1.5f32; 32];
    factors[3] = 0.0;
    rewrite_gguf(
        &src,
        &zero,
        &[],
        Some(("rope_factors_long.weight", factors)),
    )?;
    let msg = err(&zero);
    assert!(
        msg.contains(&*zero.to_string_lossy())
            && msg.contains("rope_factors_long.weight")
            && msg.contains("factor 3"),
        "{msg}"
    );
    Ok(())
}

/// Gemma's sliding-window metadata of the wrong type or length is an error naming the file and key.
#[test]
fn bad_sliding_window_metadata_is_a_clear_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = fixtures_dir().join("gemma3-Q8_0.gguf");
    let cases = [
        (
            "gemma3.attention.sliding_window_pattern",
            Value::Array(vec![Value::Bool(true); 2]),
        ),
        (
            "gemma3.attention.sliding_window",
            Value::String("sixteen".into()),
        ),
    ];
    for (i, (key, value)) in cases.into_iter().enumerate() {
        let p = dir.path().join(format!("bad-window-{i}.gguf"));
        rewrite_gguf(&src, &p, &[(key, Some(value))], None)?;
        let msg = match GgufFile::open(&p).and_then(|g| Llama::from_gguf(&g, &Device::Cpu)) {
            Ok(_) => panic!("{} loaded", p.display()),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            msg.contains(&*p.to_string_lossy()) && msg.contains(key),
            "{key}: {msg}"
        );
    }
    Ok(())
}
