//! Training: the optimiser ([`optim`]: AdamW, schedule, clipping, accumulation).

pub mod optim;
