//! Text encoders returning one vector per text: DPR question/context encoders (CLS pooling) and
//! sentence-transformers models (mean/CLS/max pooling, optional L2 normalisation), on a BERT body.

pub mod bert;
pub mod dpr;
pub mod sentence;

use anyhow::Result;
use candle_core::Tensor;

/// Anything that maps texts to embeddings `[batch, dim]`.
pub trait TextEncoder: Send + Sync {
    /// Embeddings `[texts.len(), dim]` (f32).
    fn encode_texts(&self, texts: &[&str]) -> Result<Tensor>;
    /// Embedding width.
    fn dim(&self) -> usize;
    /// A description that identifies the encoder (path/id, pooling, normalisation) for KB manifests.
    fn fingerprint(&self) -> EncoderFingerprint;
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
}
