#![no_main]
//! Fuzz target `tokenizer`: see [`rustrag_fuzz::tokenizer`] for what the input bytes mean.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    rustrag_fuzz::report(rustrag_fuzz::tokenizer(data));
});
