//! Search structures over a generation's embedding matrix, which the knowledge base builds and
//! stores and the dense retriever ([`crate::retrieve::dense`]) walks: the exact f32 scan and the
//! score every exact path ranks by ([`exact`]), the integer copy of the quantised first pass
//! ([`quantized`]), the HNSW graph ([`hnsw`]) and the row views they read ([`rows`]). They live
//! below the KB so that storage never depends on retrieval (`retrieve` re-exports them).

pub mod exact;
pub mod hnsw;
pub mod quantized;
pub(crate) mod row_scorer;
pub mod rows;
mod scored;
