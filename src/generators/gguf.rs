//! GGUF files (llama.cpp's format): metadata access whose errors name the file and key, quantized
//! tensors, and the tokenizer stored in the metadata (rebuilt as a HF `tokenizers::Tokenizer`). The
//! chat template in `tokenizer.chat_template` is evaluated by [`super::chat_template`].
//!
//! Tokenizer models supported: `gpt2` (byte-level BPE: `tokenizer.ggml.tokens` + `tokenizer.ggml.merges`,
//! with the pre-tokenizer named by `tokenizer.ggml.pre`) and `llama` (SentencePiece BPE with byte
//! fallback; merges from the metadata or, when absent, derived from the token scores).

pub use super::chat_template::{ChatMessage, ChatTemplate};
use crate::tokenize::{SpecialTokens, TextTokenizer};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{Device, Shape};
use std::path::{Path, PathBuf};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{unicode::NFC, Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

/// The GGML tensor types a GGUF file may hold: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and
/// Q4_K, Q5_K, Q6_K run on this crate's kernels ([`super::quant`]); Q2_K, Q3_K on candle's.
pub const GGUF_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (ids 0-3, 6-8, 10-14, 30)";

/// An opened GGUF file: its metadata and tensor directory (tensor data is read on demand).
pub struct GgufFile {
    pub path: PathBuf,
    pub content: gguf_file::Content,
}

impl GgufFile {
    /// Read the header, metadata and tensor directory of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let mut f = std::fs::File::open(path)
            .with_context(|| format!("opening GGUF file {}", path.display()))?;
        let content = crate::hub::parse_guarded(path, || {
            gguf_file::Content::read(&mut f).map_err(anyhow::Error::from)
        })
        .map_err(|e| {
            // candle's reader stops at the first tensor of a type it does not know (IQ*, TQ*).
            let cause = format!("{e:#}");
            match cause.split("unknown dtype for tensor ").nth(1) {
                Some(id) => anyhow!(
                    "{}: a tensor has GGML type id {}, which is not supported (supported: {GGUF_TYPES})",
                    path.display(),
                    id.split(|c: char| !c.is_ascii_digit()).next().unwrap_or(id)
                ),
                None => e.context(format!(
                    "{}: not a readable GGUF file (corrupt or truncated?)",
                    path.display()
                )),
            }
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
        })
    }

    /// The metadata value under `key`, or an error naming the file and the key.
    pub fn value(&self, key: &str) -> Result<&gguf_file::Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| anyhow!("{}: missing GGUF metadata key `{key}`", self.path.display()))
    }

    pub fn has(&self, key: &str) -> bool {
        self.content.metadata.contains_key(key)
    }

    /// An unsigned integer (any integer width in the file).
    pub fn u64(&self, key: &str) -> Result<u64> {
        use gguf_file::Value::*;
        let v = self.value(key)?;
        let n: i128 = match v {
            U8(x) => *x as i128,
            I8(x) => *x as i128,
            U16(x) => *x as i128,
            I16(x) => *x as i128,
            U32(x) => *x as i128,
            I32(x) => *x as i128,
            U64(x) => *x as i128,
            I64(x) => *x as i128,
            other => bail!(
                "{}: metadata `{key}` should be an integer, found {other:?}",
                self.path.display()
            ),
        };
        u64::try_from(n).map_err(|_| {
            anyhow!(
                "{}: metadata `{key}` is negative ({n})",
                self.path.display()
            )
        })
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        Ok(self.u64(key)? as usize)
    }

    pub fn u32(&self, key: &str) -> Result<u32> {
        let v = self.u64(key)?;
        u32::try_from(v).map_err(|_| {
            anyhow!(
                "{}: metadata `{key}` = {v} does not fit in u32",
                self.path.display()
            )
        })
    }

    /// A float (f32 or f64 in the file; integers are accepted too).
    pub fn f64(&self, key: &str) -> Result<f64> {
        match self.value(key)? {
            gguf_file::Value::F32(x) => Ok(*x as f64),
            gguf_file::Value::F64(x) => Ok(*x),
            _ => self.u64(key).map(|v| v as f64),
        }
    }

    pub fn bool(&self, key: &str) -> Result<bool> {
        match self.value(key)? {
            gguf_file::Value::Bool(b) => Ok(*b),
            other => bail!(
                "{}: metadata `{key}` should be a bool, found {other:?}",
                self.path.display()
            ),
        }
    }

    pub fn str(&self, key: &str) -> Result<&str> {
        match self.value(key)? {
            gguf_file::Value::String(s) => Ok(s),
            other => bail!(
                "{}: metadata `{key}` should be a string, found {:?}",
                self.path.display(),
                other.value_type()
            ),
        }
    }

    fn array(&self, key: &str) -> Result<&Vec<gguf_file::Value>> {
        match self.value(key)? {
            gguf_file::Value::Array(a) => Ok(a),
            other => bail!(
                "{}: metadata `{key}` should be an array, found {:?}",
                self.path.display(),
                other.value_type()
            ),
        }
    }

    /// A string array (e.g. `tokenizer.ggml.tokens`).
    pub fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                gguf_file::Value::String(s) => Ok(s.clone()),
                _ => bail!(
                    "{}: metadata `{key}`[{i}] is not a string",
                    self.path.display()
                ),
            })
            .collect()
    }

    /// A numeric array as f32 (e.g. `tokenizer.ggml.scores`).
    pub fn f32s(&self, key: &str) -> Result<Vec<f32>> {
        use gguf_file::Value::*;
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                F32(x) => Ok(*x),
                F64(x) => Ok(*x as f32),
                _ => bail!(
                    "{}: metadata `{key}`[{i}] is not a float",
                    self.path.display()
                ),
            })
            .collect()
    }

    /// An integer array (e.g. `tokenizer.ggml.token_type`).
    pub fn i64s(&self, key: &str) -> Result<Vec<i64>> {
        use gguf_file::Value::*;
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                U8(x) => Ok(*x as i64),
                I8(x) => Ok(*x as i64),
                U16(x) => Ok(*x as i64),
                I16(x) => Ok(*x as i64),
                U32(x) => Ok(*x as i64),
                I32(x) => Ok(*x as i64),
                U64(x) => Ok(*x as i64),
                I64(x) => Ok(*x),
                _ => bail!(
                    "{}: metadata `{key}`[{i}] is not an integer",
                    self.path.display()
                ),
            })
            .collect()
    }

    /// Shape of tensor `name` (row-major, e.g. `[vocab, hidden]` for `token_embd.weight`), or an
    /// error naming the file and tensor.
    pub fn tensor_shape(&self, name: &str) -> Result<&Shape> {
        self.content
            .tensor_infos
            .get(name)
            .map(|t| &t.shape)
            .ok_or_else(|| anyhow!("{}: missing tensor `{name}`", self.path.display()))
    }

    /// Read tensor `name` (kept in its quantized type), checking its shape against `expected`.
    pub fn tensor(&self, name: &str, expected: &[usize], device: &Device) -> Result<QTensor> {
        let shape = self.tensor_shape(name)?;
        if shape.dims() != expected {
            bail!(
                "{}: tensor `{name}` has shape {:?}, the model metadata expects {expected:?}",
                self.path.display(),
                shape.dims()
            );
        }
        let mut f = std::fs::File::open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        self.content
            .tensor(&mut f, name, device)
            .with_context(|| format!("{}: reading tensor `{name}`", self.path.display()))
    }
}

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TOKEN_NORMAL: i64 = 1;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;
const TOKEN_BYTE: i64 = 6;

/// Pre-tokenizer regexes of llama.cpp's `tokenizer.ggml.pre` families (as in their HF tokenizer.json).
const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Build the tokenizer stored in a GGUF file's metadata and check it against the model's vocabulary
/// size (`model_vocab`, the rows of `token_embd.weight`).
pub fn tokenizer_from_gguf(g: &GgufFile, model_vocab: usize) -> Result<TextTokenizer> {
    let model = g.str("tokenizer.ggml.model")?;
    let tokens = g.strings("tokenizer.ggml.tokens")?;
    if tokens.is_empty() {
        bail!(
            "{}: metadata `tokenizer.ggml.tokens` is empty",
            g.path.display()
        );
    }
    let types = if g.has("tokenizer.ggml.token_type") {
        let t = g.i64s("tokenizer.ggml.token_type")?;
        if t.len() != tokens.len() {
            bail!(
                "{}: `tokenizer.ggml.token_type` has {} entries but `tokenizer.ggml.tokens` has {}",
                g.path.display(),
                t.len(),
                tokens.len()
            );
        }
        t
    } else {
        vec![TOKEN_NORMAL; tokens.len()]
    };
    let id_key = |key: &str| -> Result<Option<u32>> {
        if !g.has(key) {
            return Ok(None);
        }
        let id = g.u32(key)?;
        if id as usize >= tokens.len() {
            bail!(
                "{}: `{key}` = {id} is outside the vocabulary ({} tokens)",
                g.path.display(),
                tokens.len()
            );
        }
        Ok(Some(id))
    };
    let special = SpecialTokens {
        bos: id_key("tokenizer.ggml.bos_token_id")?,
        eos: id_key("tokenizer.ggml.eos_token_id")?,
        pad: id_key("tokenizer.ggml.padding_token_id")?,
        unk: id_key("tokenizer.ggml.unknown_token_id")?,
        cls: id_key("tokenizer.ggml.cls_token_id")?,
        sep: id_key("tokenizer.ggml.seperator_token_id")?,
    };
    let mut tok = match model {
        "gpt2" => byte_level_bpe(g, &tokens)?,
        "llama" => sentencepiece_bpe(g, &tokens, &types, special.unk)?,
        other => bail!(
            "{}: unsupported `tokenizer.ggml.model` = `{other}` (supported: gpt2, llama)",
            g.path.display()
        ),
    };
    // Control tokens (<|im_start|>, </s>, ...) are special: matched whole, skipped when decoding.
    // User-defined tokens are matched whole but decoded as text.
    let mut specials: Vec<AddedToken> = Vec::new();
    let mut added: Vec<AddedToken> = Vec::new();
    for (i, (t, ty)) in tokens.iter().zip(&types).enumerate() {
        let is_declared =
            [special.bos, special.eos, special.pad, special.unk].contains(&Some(i as u32));
        if *ty == TOKEN_CONTROL || (is_declared && *ty != TOKEN_BYTE) {
            specials.push(AddedToken::from(t.clone(), true).normalized(false));
        } else if *ty == TOKEN_USER_DEFINED {
            added.push(AddedToken::from(t.clone(), false).normalized(false));
        }
    }
    let err = |e| anyhow!("{}: adding special tokens: {e}", g.path.display());
    tok.add_special_tokens(specials).map_err(err)?;
    tok.add_tokens(added).map_err(err)?;
    // `add_bos_token`: encode(add_special_tokens = true) prepends BOS, as llama.cpp does.
    let add_bos = if g.has("tokenizer.ggml.add_bos_token") {
        g.bool("tokenizer.ggml.add_bos_token")?
    } else {
        model == "llama"
    };
    if let (true, Some(bos)) = (add_bos, special.bos) {
        let bos_tok = tokens[bos as usize].clone();
        let err = |e: String| anyhow!("{}: BOS template: {e}", g.path.display());
        let mut b = TemplateProcessing::builder();
        b.try_single(format!("{bos_tok} $A"))
            .map_err(|e| err(e.to_string()))?;
        b.try_pair(format!("{bos_tok} $A {bos_tok}:1 $B:1"))
            .map_err(|e| err(e.to_string()))?;
        b.special_tokens(vec![(bos_tok, bos)]);
        let tp = b.build().map_err(|e| err(e.to_string()))?;
        tok.with_post_processor(Some(tp));
    }
    let out = TextTokenizer::from_tokenizer(tok, special, g.path.clone());
    out.check_vocab(model_vocab, &g.path)?;
    Ok(out)
}

/// GPT-2 style byte-level BPE; the pre-tokenizer follows `tokenizer.ggml.pre` (llama.cpp's names).
fn byte_level_bpe(g: &GgufFile, tokens: &[String]) -> Result<tokenizers::Tokenizer> {
    let merges = read_merges(g)?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow!("{}: building BPE from tokens/merges: {e}", g.path.display()))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let pre = if g.has("tokenizer.ggml.pre") {
        g.str("tokenizer.ggml.pre")?
    } else {
        "default"
    };
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        Ok(Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| anyhow!("pre-tokenizer regex: {e}"))?
        .into())
    };
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        // GPT-2 regex inside ByteLevel.
        "default" | "gpt2" | "gpt-2" => ByteLevel::new(false, true, true).into(),
        // HF tokenizer.json: Sequence[Digits(individual_digits), ByteLevel(use_regex)] (SmolLM, StarCoder).
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            PreSequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into()
        }
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" => {
            PreSequence::new(vec![split(REGEX_LLAMA3)?, ByteLevel::new(false, true, false).into()]).into()
        }
        "qwen2" => {
            let nfc: NormalizerWrapper = NFC.into();
            tok.with_normalizer(Some(nfc)).map_err(|e| anyhow!("{e}"))?;
            PreSequence::new(vec![split(REGEX_QWEN2)?, ByteLevel::new(false, true, false).into()]).into()
        }
        other => bail!(
            "{}: unsupported `tokenizer.ggml.pre` = `{other}` (supported: default, gpt2, smollm, starcoder, llama3, llama-bpe, qwen2)",
            g.path.display()
        ),
    };
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
    Ok(tok)
}

fn read_merges(g: &GgufFile) -> Result<Vec<(String, String)>> {
    g.strings("tokenizer.ggml.merges")?
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    anyhow!(
                        "{}: `tokenizer.ggml.merges`[{i}] = `{m}` is not `left right`",
                        g.path.display()
                    )
                })
        })
        .collect()
}

/// SentencePiece BPE (Llama 1/2, Mistral): `▁` for spaces, a `▁` prepended, byte fallback `<0xXX>`.
/// Merges come from the metadata, or are derived from the scores like HF's SentencePiece converter.
fn sentencepiece_bpe(
    g: &GgufFile,
    tokens: &[String],
    types: &[i64],
    unk: Option<u32>,
) -> Result<tokenizers::Tokenizer> {
    let merges = if g.has("tokenizer.ggml.merges") {
        read_merges(g)?
    } else {
        let scores = g.f32s("tokenizer.ggml.scores")?;
        if scores.len() != tokens.len() {
            bail!(
                "{}: `tokenizer.ggml.scores` has {} entries, tokens {}",
                g.path.display(),
                scores.len(),
                tokens.len()
            );
        }
        merges_from_scores(tokens, types, &scores)
    };
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(u) = unk {
        builder = builder.unk_token(tokens[u as usize].clone());
    }
    let bpe = builder
        .build()
        .map_err(|e| anyhow!("{}: building SentencePiece BPE: {e}", g.path.display()))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let add_prefix = if g.has("tokenizer.ggml.add_space_prefix") {
        g.bool("tokenizer.ggml.add_space_prefix")?
    } else {
        true
    };
    let replace = Replace::new(" ", "\u{2581}").map_err(|e| anyhow!("{e}"))?;
    let normalizer: NormalizerWrapper = if add_prefix {
        tokenizers::normalizers::Sequence::new(vec![
            Prepend::new("\u{2581}".into()).into(),
            replace.into(),
        ])
        .into()
    } else {
        replace.into()
    };
    tok.with_normalizer(Some(normalizer))
        .map_err(|e| anyhow!("{e}"))?;
    let mut decoders: Vec<DecoderWrapper> = vec![
        tokenizers::decoders::DecoderWrapper::Replace(
            Replace::new("\u{2581}", " ").map_err(|e| anyhow!("{e}"))?,
        ),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tok)
}

/// Every (left, right) pair of pieces whose concatenation is a piece, ordered by the merged piece's
/// score (higher first), then by the ids of the parts — the order HF's SentencePiece converter uses.
fn merges_from_scores(tokens: &[String], types: &[i64], scores: &[f32]) -> Vec<(String, String)> {
    let index: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types[*i] == TOKEN_NORMAL || types[*i] == TOKEN_USER_DEFINED)
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (&piece, &id) in &index {
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                merges.push((scores[id], id, li, ri));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    merges
        .into_iter()
        .map(|(_, _, l, r)| (tokens[l].clone(), tokens[r].clone()))
        .collect()
}
