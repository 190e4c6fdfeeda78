#!/usr/bin/env python3
"""Write the small seed inputs of the fuzz targets under fuzz/corpus/<target>/.

Run with a Python that has `gguf`, `safetensors`, `numpy` and `torch` (/work/pyenv/bin/python):
    python fuzz/make_seeds.py
Every seed starts with the harness's selector byte (see fuzz/src/lib.rs). The `kb_files` seeds are
written by `cargo test --release --test fuzz_regressions -- --ignored write_kb_seed_corpus`
(they are files of a KB written by rustrag itself).
"""
import gzip
import io
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def put(target, name, selector, payload):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(bytes([selector]) + payload)


def ingest():
    beir = (
        b'{"_id": "d1", "title": "RAG", "text": "Retrieval-augmented generation marginalises over passages."}\n'
        b'{"_id": 2, "text": "numeric id, no title"}\n'
        b'{"_id": "d3", "title": null, "text": "\\u00fc \\u6f22\\u5b57 emoji \\ud83d\\ude42"}\n'
        b'\n'
        b'{"_id": "d1", "text": "duplicate id"}\n'
        b'not json\n'
    )
    put("ingest", "beir.jsonl", 0x08 | 0x20, beir)
    put("ingest", "beir_strict.jsonl", 0x00, beir.split(b"\n\n")[0] + b"\n")
    put("ingest", "beir.jsonl.gz", 0x05 | 0x08, gzip.compress(beir, mtime=0))
    dpr = b"id\ttext\ttitle\n1\tAaron Aaron is a prophet.\tAaron\n2\t\"quoted \"\"text\"\"\"\tQ\n3\tonly two\n"
    put("ingest", "dpr.tsv", 0x01 | 0x08 | 0x30, dpr)
    put("ingest", "title_text.tsv", 0x06, b"title\ttext\nParis\tThe capital of France.\nBerlin\tCapital of Germany.\n")
    put("ingest", "title_text.csv", 0x02 | 0x08, b'title,text\nParis,"The capital, of France."\n"Bad"x,y\nBerlin,Germany\n')
    put("ingest", "plain.txt", 0x03 | 0x10, b"one two three four five\nsix seven\r\neight\n")
    put("ingest", "doc.md", 0x04 | 0x20, "# Heading \u00fc\n\nBody text with *markdown* and 漢字.\n".encode())
    put("ingest", "notes.markdown", 0x07, b"no heading here\n# late heading\n")


def tiny_llama(quantized):
    import gguf

    T = gguf.GGMLQuantizationType
    # Q8_0 rows need a multiple of 32 columns; the f32 model is smaller still.
    h, heads, kv_heads, ff, layers = (32, 2, 1, 32, 1) if quantized else (8, 2, 1, 16, 1)
    head_dim = h // heads
    tokens = ["<unk>", "<|im_start|>", "<|im_end|>"] + list("abcdefghijklmnopqrstuvwxyz") + [
        "\u0120", "\u0120a", "th", "the", "\u010a", "?", ".", "!"]
    merges = ["\u0120 a", "t h", "th e"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    vocab = len(tokens)
    path = os.path.join(HERE, "corpus", ".tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(h)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    rng = np.random.default_rng(0)

    def add(name, shape, quant=False):
        a = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if quant and quantized:
            q = gguf.quants.quantize(a, T.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=T.Q8_0)
        else:
            w.add_tensor(name, a)

    add("token_embd.weight", (vocab, h), True)
    add("output_norm.weight", (h,))
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (h,))
        add(f"blk.{i}.ffn_norm.weight", (h,))
        add(f"blk.{i}.attn_q.weight", (h, h), True)
        add(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, h), True)
        add(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, h), True)
        add(f"blk.{i}.attn_output.weight", (h, h), True)
        add(f"blk.{i}.ffn_gate.weight", (ff, h), True)
        add(f"blk.{i}.ffn_up.weight", (ff, h), True)
        add(f"blk.{i}.ffn_down.weight", (h, ff), True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = open(path, "rb").read()
    os.remove(path)
    return data


def gguf_seeds():
    put("gguf", "tiny_f32.gguf", 0, tiny_llama(False))
    put("gguf", "tiny_q8_0.gguf", 0, tiny_llama(True))
    put("gguf", "tiny_q8_0_dequant.gguf", 1, tiny_llama(True))


def weights():
    import torch
    from safetensors.numpy import save

    rng = np.random.default_rng(0)
    t = {
        "embeddings.word_embeddings.weight": rng.standard_normal((8, 4)).astype(np.float32),
        "embeddings.LayerNorm.bias": np.zeros(4, np.float16),
        "embeddings.position_ids": np.arange(8, dtype=np.int64)[None],
        "pooler.dense.weight": rng.standard_normal((2, 2)).astype(np.float64),
    }
    put("weights", "model.safetensors", 0, save(t, metadata={"format": "pt"}))
    put("weights", "model_bf16.safetensors", 2, save({"w": np.ones((3, 5), np.float32)}))
    b = io.BytesIO()
    torch.save({"w": torch.ones(2, 3), "b": torch.arange(4, dtype=torch.int64), "h": torch.zeros(3, dtype=torch.bfloat16)}, b)
    put("weights", "pytorch_model.bin", 1, b.getvalue())


def tokenizer():
    texts = [
        (0, "Who wrote the RAG paper? Lewis et al., 2020 — ü ß 漢字 🙂 [CLS] [SEP] [MASK]".encode()),
        (1, "Title\tThe passage text, with    spaces\u00a0and\u200bzero width.".encode()),
        (2, "<|im_start|>system\nignore<|im_end|>\n  \t\r\n ’s 's 123456 x".encode()),
        (6, "\u0000\u0001 control \x7f and combining e\u0301".encode()),
        (3, np.array([0, 1, 2, 100, 101, 102, 30521, 30522, 49151, 49152, 4294967295], "<u4").tobytes()),
        (7, np.array([1, 9690, 2, 30000, 7], "<u4").tobytes()),
    ]
    for i, (sel, payload) in enumerate(texts):
        put("tokenizer", f"seed{i}", sel, payload)
    put("tokenizer", "invalid_utf8", 0, b"\xff\xfe valid \xc3 \xe6\xbc")


if __name__ == "__main__":
    ingest()
    gguf_seeds()
    weights()
    tokenizer()
    for t in sorted(os.listdir(CORPUS)):
        d = os.path.join(CORPUS, t)
        if os.path.isdir(d):
            print(t, sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)), "bytes in", len(os.listdir(d)), "files")
