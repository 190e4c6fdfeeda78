//! The SentencePiece (`tokenizer.ggml.model = llama`) tokenizer built from GGUF metadata, against
//! llama.cpp on the same file. `tests/fixtures/spm-vocab.gguf` is a vocab-only Llama GGUF made by
//! `tests/fixtures/make_spm_vocab.py` (the `gguf` package); the expected ids are what
//! `llama_cpp.Llama(path, vocab_only=True).tokenize(text.encode(), add_bos=True)` returns
//! (llama-cpp-python 0.3.36).

use rustrag::generators::gguf::{tokenizer_from_gguf, GgufFile};
use rustrag::tokenize::Padding;
use std::path::PathBuf;

#[test]
fn sentencepiece_gguf_tokenizer_matches_llama_cpp() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spm-vocab.gguf");
    let g = GgufFile::open(&path).unwrap();
    let tok = tokenizer_from_gguf(&g, 290).unwrap();
    let cases: [(&str, &[u32]); 5] = [
        ("hello world", &[1, 277, 282]),
        ("the cat sat", &[1, 273, 285, 287]),
        (" hello  world", &[1, 259, 277, 259, 282]),
        // byte fallback for a character outside the vocabulary (é = 0xC3 0xA9)
        ("héllo", &[1, 259, 260, 198, 172, 275]),
        ("a\nb", &[1, 288, 13, 101]),
    ];
    for (text, want) in cases {
        let got = tok
            .encode_batch(&[text], true, None, Padding::None)
            .unwrap()
            .input_ids
            .remove(0);
        assert_eq!(got, want, "{text:?}");
    }
}
