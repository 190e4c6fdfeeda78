"""Peer for `rustrag bench decode`: llama.cpp (llama-cpp-python) greedy decoding on the same GGUF."""
import argparse, json, time

p = argparse.ArgumentParser()
p.add_argument("--gguf", required=True)
p.add_argument("--prompt", required=True)
p.add_argument("--tokens", type=int, default=64)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--repeats", type=int, default=2)
a = p.parse_args()

import llama_cpp

llm = llama_cpp.Llama(model_path=a.gguf, n_ctx=1024, n_threads=a.threads, n_batch=512, logits_all=True, verbose=False)
prompt_ids = llm.tokenize(a.prompt.encode("utf-8"), add_bos=False, special=True)
best_decode, best_prefill, out_ids = None, None, []
for _ in range(a.repeats):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    t1 = time.perf_counter()
    out_ids = []
    for _ in range(a.tokens):
        logits = llm.scores[llm.n_tokens - 1]
        tok = int(logits.argmax())
        out_ids.append(tok)
        llm.eval([tok])
    t2 = time.perf_counter()
    best_prefill = (t1 - t0) if best_prefill is None else min(best_prefill, t1 - t0)
    best_decode = (t2 - t1) if best_decode is None else min(best_decode, t2 - t1)
print(json.dumps({"peer": "llama.cpp", "version": llama_cpp.__version__, "threads": a.threads,
                  "prompt_tokens": len(prompt_ids), "decode_tokens": a.tokens,
                  "prefill_seconds": best_prefill, "decode_seconds": best_decode,
                  "decode_tokens_per_second": a.tokens / best_decode,
                  "generated_ids": out_ids}))
