//! Training: the optimiser ([`optim`]: AdamW, schedule, clipping, accumulation), training data
//! ([`data`]: JSONL examples, seeded order), RAG fine-tuning ([`rag`]), retriever training ([`retriever`]), background re-embedding of a knowledge base ([`reindex`]), checkpoints ([`checkpoint`]) and the metrics plot ([`plot`]).

pub mod checkpoint;
pub mod data;
pub mod optim;
pub mod plot;
pub mod rag;
pub mod reindex;
pub mod retriever;

/// A progress bar over optimiser steps with the step's loss and tokens/s as its message, and ETA.
pub fn progress_bar(steps: u64, done: u64) -> indicatif::ProgressBar {
    let bar = crate::progress::bar(steps, "train");
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "train {bar:30} {pos}/{len} {msg} ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(done);
    bar.reset_eta();
    bar
}
