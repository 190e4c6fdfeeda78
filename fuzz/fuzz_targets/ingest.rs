#![no_main]
//! Fuzz target `ingest`: see [`rustrag_fuzz::ingest`] for what the input bytes mean.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    rustrag_fuzz::report(rustrag_fuzz::ingest(data));
});
