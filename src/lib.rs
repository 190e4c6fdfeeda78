//! rustrag: retrieval-augmented generation (Lewis et al. 2020) in Rust.
//!
//! - [`hub`]: finding and loading HF model directories and weights.
//! - [`tokenize`]: HF tokenizers with per-call truncation/padding.
//! - [`nn`]: differentiable layers shared by the models.
//! - [`encoders`]: DPR and sentence-transformers text encoders (BERT).
//! - [`generators`]: BART, T5 and Llama generators behind one step-wise decoding interface.
//! - [`kb`]: the on-disk knowledge base (passages, embeddings, manifest).
//! - [`kernels`]: SIMD kernels with scalar fallbacks, one CPU-feature check (`RUSTRAG_FORCE_SCALAR`).
//! - [`retrieve`]: dense (exact, HNSW), BM25 and hybrid retrievers.
//! - [`rag`]: RagModel, RAG-Sequence and RAG-Token (losses, decoding, provenance).
//! - [`eval`]: retrieval and QA metrics.
//! - [`progress`]: progress bars for long work.
//! - [`train`]: optimiser (AdamW, schedule, clipping) and RAG fine-tuning.

pub mod encoders;
pub mod eval;
pub mod generators;
pub mod hub;
pub mod kb;
pub mod kernels;
pub mod nn;
pub mod progress;
pub mod rag;
pub mod retrieve;
pub mod serve;
#[cfg(test)]
mod testutil;
pub mod tokenize;
pub mod train;

/// Keep large freed buffers in the process heap for reuse. glibc serves every allocation above
/// its mmap threshold (at most 32 MiB) with a fresh mapping, so a model's per-batch activations
/// would be page-faulted in and zeroed by the kernel on every batch. Call once at startup;
/// a no-op off glibc.
pub fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; both values are valid for them.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// What the process heap holds, as glibc's allocator counts it (all arenas).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeapUsage {
    /// Bytes in live allocations (`mallinfo2` `uordblks` + `hblkhd`: arena chunks in use plus
    /// directly mapped blocks).
    pub in_use: u64,
    /// Bytes freed by the program and kept by the allocator for reuse (`fordblks`): resident if
    /// touched, but no longer owned by anything. [`reuse_freed_memory`] makes this large on purpose.
    pub free_held: u64,
}

/// The heap's live and freed-but-held bytes, to tell a leak (live bytes growing) from allocator
/// retention (resident memory growing while live bytes stay flat). `None` off glibc.
pub fn heap_usage() -> Option<HeapUsage> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no arguments and only reads the allocator's statistics (under
        // each arena's lock).
        let m = unsafe { libc::mallinfo2() };
        Some(HeapUsage {
            in_use: (m.uordblks + m.hblkhd) as u64,
            free_held: m.fordblks as u64,
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// The device models run on: CUDA device 0 when built with `cuda` and available, else CPU.
pub fn default_device() -> candle_core::Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = candle_core::Device::new_cuda(0) {
        return d;
    }
    candle_core::Device::Cpu
}
