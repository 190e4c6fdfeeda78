//! Text encoders returning one vector per text: DPR question/context encoders (CLS pooling) and
//! sentence-transformers models (CLS/mean/max/last-token pooling, optional L2 normalisation,
//! instruction prefixes) on a BERT, RoBERTa/XLM-RoBERTa or MPNet body ([`family`]); and
//! cross-encoders that score (question, passage) pairs ([`rerank`]).

pub mod bert;
pub mod dpr;
pub mod family;
pub mod mpnet;
pub mod rerank;
pub mod roberta;
pub mod sentence;

use anyhow::Result;
use candle_core::Tensor;

/// A transformer body that maps token ids to hidden states: [`bert::BertModel`],
/// [`roberta::RobertaModel`], [`mpnet::MpnetModel`].
pub trait EncoderModel: Send + Sync {
    /// `input_ids, attention_mask, token_type_ids: [b, l]` u32 -> last hidden state `[b, l, h]`.
    /// `token_type_ids` None means all zeros (as HF); models without token types ignore them.
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        token_type_ids: Option<&Tensor>,
    ) -> Result<Tensor>;
    /// The shape fields every family shares (hidden size, vocabulary, pad id, ...).
    fn config(&self) -> &bert::BertConfig;
    /// The longest input in tokens, specials included (RoBERTa and MPNet lose `pad_id + 1`
    /// position rows to their offset).
    fn max_tokens(&self) -> usize {
        self.config().max_position_embeddings
    }
    /// HF pooler `tanh(dense(h[:, 0]))`: `[b, l, h] -> [b, h]`; an error where the checkpoint has
    /// none.
    fn pool(&self, last_hidden: &Tensor) -> Result<Tensor>;
    /// Run the linear layers in dynamic int8 from now on (frozen f32 CPU weights only).
    fn quantize_int8(&mut self) -> Result<()>;
    fn is_int8(&self) -> bool;
    fn hidden_size(&self) -> usize {
        self.config().hidden_size
    }
}

impl EncoderModel for bert::BertModel {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        token_type_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        bert::BertModel::forward(self, input_ids, attention_mask, token_type_ids)
    }
    fn config(&self) -> &bert::BertConfig {
        &self.config
    }
    fn pool(&self, last_hidden: &Tensor) -> Result<Tensor> {
        bert::BertModel::pool(self, last_hidden)
    }
    fn quantize_int8(&mut self) -> Result<()> {
        bert::BertModel::quantize_int8(self)
    }
    fn is_int8(&self) -> bool {
        bert::BertModel::is_int8(self)
    }
}

/// Anything that maps texts to embeddings `[batch, dim]`.
pub trait TextEncoder: Send + Sync {
    /// Embeddings `[texts.len(), dim]` (f32).
    fn encode_texts(&self, texts: &[&str]) -> Result<Tensor>;
    /// Passage embeddings `[n, dim]` from `(title, text)` pairs, as knowledge bases are embedded.
    /// Default: `title + " " + text` as one text (sentence-transformers, BEIR); DPR context
    /// encoders tokenize the pair, as HF's `use_own_knowledge_dataset.py` does.
    fn encode_passages(&self, titles: &[&str], texts: &[&str]) -> Result<Tensor> {
        let joined = joined_passages(titles, texts)?;
        let refs: Vec<&str> = joined.iter().map(|s| s.as_str()).collect();
        self.encode_texts(&refs)
    }
    /// Embedding width.
    fn dim(&self) -> usize;
    /// A description that identifies the encoder (path/id, pooling, normalisation) for KB manifests.
    fn fingerprint(&self) -> EncoderFingerprint;
}

/// [`joined_passage`] of each `(title, text)`.
pub fn joined_passages(titles: &[&str], texts: &[&str]) -> Result<Vec<String>> {
    anyhow::ensure!(
        titles.len() == texts.len(),
        "{} titles but {} texts",
        titles.len(),
        texts.len()
    );
    Ok((titles.iter().zip(texts))
        .map(|(title, text)| joined_passage(title, text))
        .collect())
}

/// A passage as one text for single-text encoders: `title + " " + text` (the text alone without a
/// title), as [`TextEncoder::encode_passages`] embeds knowledge bases.
pub fn joined_passage(title: &str, text: &str) -> String {
    if title.is_empty() {
        text.to_string()
    } else {
        format!("{title} {text}")
    }
}

/// What a knowledge base records about the encoder that embedded it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EncoderFingerprint {
    /// Path or hub id the encoder was loaded from.
    pub source: String,
    /// `dpr`, `sentence-transformers`, ...
    pub kind: String,
    pub dim: usize,
    /// `cls`, `mean`, `max`.
    pub pooling: String,
    pub normalized: bool,
    /// sha256 of the weight files.
    pub weights_sha256: String,
    /// The linear layers ran in dynamic int8 ([`LoadOptions::int8`]); recorded, not checked:
    /// int8 and f32 vectors of one model are comparable.
    #[serde(default)]
    pub int8: bool,
    /// Instruction prefixes prepended to queries and passages (E5's `"query: "` / `"passage: "`);
    /// a knowledge base is queried with the prefixes it was built with.
    #[serde(default, skip_serializing_if = "Prefixes::is_empty")]
    pub prefixes: Prefixes,
}

/// Instruction prefixes of an embedding model: prepended to each text before tokenization, as
/// sentence-transformers' `encode(..., prompt_name=...)` does.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Prefixes {
    #[serde(default)]
    pub query: String,
    #[serde(default)]
    pub passage: String,
    /// Where they came from: `<dir>/config_sentence_transformers.json prompts`, `flag`,
    /// `knowledge base manifest`.
    #[serde(default)]
    pub source: String,
}

impl Prefixes {
    pub fn is_empty(&self) -> bool {
        self.query.is_empty() && self.passage.is_empty()
    }
}

pub use bert::Pooling;
pub use dpr::DprEncoder;
pub use family::Family;
pub use rerank::CrossEncoder;
pub use sentence::{load_encoder, SentenceEncoder};

/// Options for loading an encoder ([`load_encoder`], [`DprEncoder::load`], [`SentenceEncoder::load`]).
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Make every weight a trainable `Var` (for fine-tuning).
    pub trainable: bool,
    /// Texts per forward pass in [`TextEncoder::encode_texts`].
    pub batch_size: usize,
    /// Override the maximum number of tokens per text (specials included).
    pub max_length: Option<usize>,
    /// Pooling for a plain BERT directory (default mean); sentence-transformers and DPR
    /// directories declare their own.
    pub pooling: Option<Pooling>,
    /// L2-normalise a plain BERT directory's output (default false).
    pub normalize: Option<bool>,
    /// Run the BERT body's linear layers in dynamic int8 ([`crate::kernels::int8::Int8Linear`]): faster on CPUs,
    /// embeddings within quantisation error of f32. Inference only (not with `trainable`).
    pub int8: bool,
    /// Query/passage prefixes instead of the model's own (`config_sentence_transformers.json`
    /// `prompts`: `query`, and `passage`, `document` or `corpus`).
    pub prefixes: Option<Prefixes>,
    pub device: candle_core::Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            trainable: false,
            batch_size: 32,
            max_length: None,
            pooling: None,
            normalize: None,
            int8: false,
            prefixes: None,
            device: crate::default_device(),
        }
    }
}

/// Apply the load-time options that change how a loaded body runs (`int8`).
fn configure_model(model: &mut dyn EncoderModel, opts: &LoadOptions) -> Result<()> {
    if opts.int8 {
        anyhow::ensure!(
            !opts.trainable,
            "int8 encoding is inference only: it cannot be combined with trainable weights"
        );
        model.quantize_int8()?;
    }
    Ok(())
}

/// Hex sha256 over the concatenated contents of `files` (in order); a read error is reported in
/// the string instead of failing, since a fingerprint is descriptive.
pub fn sha256_files(files: &[std::path::PathBuf]) -> String {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut file = match std::fs::File::open(f) {
            Ok(file) => file,
            Err(e) => return format!("unavailable ({}: {e})", f.display()),
        };
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => hasher.update(&buf[..n]),
                Err(e) => return format!("unavailable ({}: {e})", f.display()),
            }
        }
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
