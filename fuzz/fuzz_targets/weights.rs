#![no_main]
//! Fuzz target `weights`: see [`rustrag_fuzz::weights`] for what the input bytes mean.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    rustrag_fuzz::report(rustrag_fuzz::weights(data));
});
