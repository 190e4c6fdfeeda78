"""Peer for `rustrag bench encode`: sentence-transformers on PyTorch CPU, same texts, batch size and max length.

Reads texts (one JSON string per line) from --texts, prints one JSON object with timings. With
--int8 it also times the same model after torch's dynamic int8 quantisation of every nn.Linear
(`torch.ao.quantization.quantize_dynamic`), the like-for-like peer of rustrag's --int8. Threads are
pinned (torch.set_num_threads) and torch's build and CPU capability are recorded. With --out, the f32
embeddings are written there (raw little-endian f32, [n, dim]) for rustrag to compare row by row."""
import argparse, json, time

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--texts", required=True)
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--max-length", type=int, default=256)
p.add_argument("--threads", type=int, required=True)
p.add_argument("--out", help="write the f32 embeddings here (raw little-endian f32 [n, dim])")
p.add_argument("--repeats", type=int, default=2)
p.add_argument("--int8", action="store_true")
a = p.parse_args()

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

torch.set_num_threads(a.threads)
torch.set_num_interop_threads(1)
texts = [json.loads(l) for l in open(a.texts, encoding="utf-8")]


def best_time(model):
    model.encode(texts[: a.batch_size], batch_size=a.batch_size)  # warm-up
    best, emb = None, None
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        emb = model.encode(texts, batch_size=a.batch_size, normalize_embeddings=False, convert_to_numpy=True)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best, emb


model = SentenceTransformer(a.model, device="cpu")
model.max_seq_length = a.max_length
best, emb = best_time(model)
if a.out:
    np.ascontiguousarray(emb, dtype="<f4").tofile(a.out)
out = {"peer": "sentence-transformers", "torch": torch.__version__, "threads": torch.get_num_threads(),
       "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_config": torch.__config__.show(),
       "n": len(texts), "seconds": best, "per_second": len(texts) / best,
       "first_embedding_head": [float(x) for x in emb[0][:4]]}
if a.int8:
    qmodel = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    qbest, qemb = best_time(qmodel)
    cos = (qemb * emb).sum(1) / (np.linalg.norm(qemb, axis=1) * np.linalg.norm(emb, axis=1))
    out["int8"] = {"seconds": qbest, "per_second": len(texts) / qbest, "engine": torch.backends.quantized.engine,
                   "cosine_to_f32": {"min": float(cos.min()), "mean": float(cos.mean())}}
print(json.dumps(out))
