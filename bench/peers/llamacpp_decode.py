"""Peer for `rustrag bench decode`: llama.cpp (llama-cpp-python) greedy decoding on the same GGUF.

Only the last position's logits are kept (no `logits_all`, which would copy prompt-length x vocab
logits into numpy and inflate the prefill). Prefill and decode are reported from the same run (the
fastest end to end). Threads are pinned (n_threads for decode, n_threads_batch for the prefill), and
llama.cpp's build (system info: the SIMD it was compiled for) is recorded."""
import argparse, json, time

p = argparse.ArgumentParser()
p.add_argument("--gguf", required=True)
p.add_argument("--prompt", required=True)
p.add_argument("--tokens", type=int, default=64)
p.add_argument("--threads", type=int, required=True)
p.add_argument("--repeats", type=int, default=2)
a = p.parse_args()

import llama_cpp
import numpy as np

# Context for a 1,000-token RAG prompt plus the decoded tokens.
llm = llama_cpp.Llama(model_path=a.gguf, n_ctx=4096, n_threads=a.threads, n_threads_batch=a.threads,
                      n_batch=512, logits_all=False, verbose=False)
n_vocab = llm.n_vocab()


def last_logits():
    # Without logits_all, llama-cpp-python 0.3.36 leaves `scores` zero: read llama.cpp's own buffer.
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))


prompt_ids = llm.tokenize(a.prompt.encode("utf-8"), add_bos=False, special=True)
best = None  # (prefill, decode, ids) of the fastest run end to end
for _ in range(a.repeats):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    t1 = time.perf_counter()
    out_ids = []
    for i in range(a.tokens):
        tok = int(last_logits().argmax())
        out_ids.append(tok)
        if i + 1 < a.tokens:  # as rustrag: n argmaxes, n - 1 forward steps after the prefill
            llm.eval([tok])
    t2 = time.perf_counter()
    if best is None or (t2 - t0) < best[0] + best[1]:
        best = (t1 - t0, t2 - t1, out_ids)
prefill, decode, out_ids = best
print(json.dumps({"peer": "llama.cpp", "version": llama_cpp.__version__, "threads": a.threads,
                  "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
                  "prompt_tokens": len(prompt_ids), "decode_tokens": a.tokens,
                  "prefill_seconds": prefill, "decode_seconds": decode,
                  "decode_tokens_per_second": max(a.tokens - 1, 1) / decode,
                  "prompt_ids": prompt_ids, "generated_ids": out_ids}))
