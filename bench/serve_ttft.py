"""Time to first token and tokens/s of a streamed chat completion: rustrag serve vs llama-cpp-python's
OpenAI-compatible server, same GGUF, same prompt, the official `openai` client on both.

rustrag answers with RAG over one retrieved passage (n_docs 1); llama.cpp gets the prompt rustrag builds
for that passage (`{title} / {text} // {question}` as the user turn, each server applying the GGUF's chat
template). Greedy, max_tokens 32. The questions (from different articles) alternate, so llama.cpp's
reuse of the previous prompt's KV cache (its longest common prefix) covers only the chat template's
system turn, as rustrag, which prefills every prompt, gets nothing reused. Prints one JSON object
(medians over --repeats rounds of every question, after one warm-up round).
"""
import argparse
import json
import statistics
import time
import urllib.request

import openai

p = argparse.ArgumentParser()
p.add_argument("--rustrag", required=True, help="rustrag base URL (…/v1), --gguf-weights quantized")
p.add_argument("--rustrag-f32", help="rustrag base URL with f32 weights (the default)")
p.add_argument("--llama-cpp", required=True, help="llama-cpp-python server base URL (…/v1)")
p.add_argument("--question", action="append", required=True)
p.add_argument("--repeats", type=int, default=5)
p.add_argument("--max-tokens", type=int, default=32)
a = p.parse_args()



def prompt_for(question):
    """The prompt rustrag builds for its first retrieved passage."""
    req = urllib.request.Request(a.rustrag.rsplit("/v1", 1)[0] + "/v1/retrieve",
                                 data=json.dumps({"question": question, "k": 1}).encode(),
                                 headers={"content-type": "application/json"})
    top = json.load(urllib.request.urlopen(req))["results"][0]["sources"][0]
    return top["passage_id"], f"{top['title']} / {top['text']} // {question}"


prompts = {q: prompt_for(q) for q in a.question}


def run(base, content, extra):
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    t0 = time.perf_counter()
    first = last = None
    pieces = []
    for chunk in client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": content}],
            max_tokens=a.max_tokens, temperature=0, stream=True, extra_body=extra):
        if not chunk.choices:
            continue
        text = chunk.choices[0].delta.content
        if text:
            now = time.perf_counter()
            first = first or now
            last = now
            pieces.append(text)
    n = len(pieces)
    return {
        "ttft_ms": (first - t0) * 1e3 if first else None,
        "tokens": n,
        "tokens_per_s": (n - 1) / (last - first) if n > 1 and last > first else None,
        "text": "".join(pieces).strip(),
    }


def measure(name, base, llama):
    def one(q):
        if llama:
            return run(base, prompts[q][1], None)
        return run(base, q, {"n_docs": 1})

    for q in a.question:  # warm-up round
        one(q)
    runs = []
    for _ in range(a.repeats):
        for q in a.question:
            r = one(q)
            r["question"] = q
            runs.append(r)
    return {
        "server": name,
        "ttft_ms_median": statistics.median(r["ttft_ms"] for r in runs),
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in runs if r["tokens_per_s"]),
        "texts": {q: next(r["text"] for r in runs if r["question"] == q) for q in a.question},
        "tokens": {q: next(r["tokens"] for r in runs if r["question"] == q) for q in a.question},
        "runs": runs,
    }


out = {"questions": a.question, "passages": {q: prompts[q][0] for q in a.question}, "max_tokens": a.max_tokens,
       "repeats": a.repeats, "results": []}
out["results"].append(measure("rustrag (quantized weights), RAG n_docs=1", a.rustrag, False))
if a.rustrag_f32:
    out["results"].append(measure("rustrag (f32 weights), RAG n_docs=1", a.rustrag_f32, False))
out["results"].append(measure("llama-cpp-python server, same prompt", a.llama_cpp, True))
llama = out["results"][-1]
for r in out["results"][:-1]:
    r["ttft_ratio_vs_llama_cpp"] = r["ttft_ms_median"] / llama["ttft_ms_median"]
    r["tokens_per_s_ratio_vs_llama_cpp"] = r["tokens_per_s_median"] / llama["tokens_per_s_median"]
    r["same_text_as_llama_cpp"] = {q: r["texts"][q] == llama["texts"][q] for q in a.question}
print(json.dumps(out, indent=1))
