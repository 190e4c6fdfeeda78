//! RAG (Lewis et al. 2020) as HF transformers implements it: `RagModel` with the RAG-Sequence and
//! RAG-Token heads.
//!
//! - [`config`]: `RagConfig` and generation settings.
//! - [`context`]: context strings (`postprocess_docs`) and their generator tokenization.
//! - [`index`]: an exact in-memory inner-product index (the fixture / small KBs).
//! - [`loss`]: marginalisation and the two NLLs.
//! - [`search`]: logits processors, greedy and beam search.
//! - [`model`]: `RagModel`, the one RAG head for every generator (retrieval, forward, decoding, provenance).
//! - [`pipeline`]: `Pipeline`, question → retrieve → doc prior → generate, which every front end calls.
//! - [`checkpoint`]: loading and saving HF RAG checkpoints.

pub mod checkpoint;
pub mod config;
pub mod context;
pub mod index;
pub mod loss;
pub mod model;
pub mod pipeline;
pub mod search;

pub use config::{GenerationParams, GenerationSettings, RagConfig, RagMode};
pub use index::InMemoryIndex;
pub use model::{RagContext, RagModel, Retrieved};
