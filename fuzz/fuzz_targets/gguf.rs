#![no_main]
//! Fuzz target `gguf`: see [`rustrag_fuzz::gguf`] for what the input bytes mean.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    rustrag_fuzz::report(rustrag_fuzz::gguf(data));
});
