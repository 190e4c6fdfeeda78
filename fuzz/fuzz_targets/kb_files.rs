#![no_main]
//! Fuzz target `kb_files`: see [`rustrag_fuzz::kb_files`] for what the input bytes mean.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    rustrag_fuzz::report(rustrag_fuzz::kb_files(data));
});
