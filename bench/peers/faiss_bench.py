"""Peer for `rustrag bench retrieval`: faiss-cpu IndexFlatIP and IndexHNSWFlat (inner product) on the
same vectors, queries, k, M, efConstruction and efSearch values as the Rust side, on the same number
of threads (faiss.omp_set_num_threads); faiss's compile options (its SIMD level) are recorded.

Inputs are raw little-endian f32 files ([n, dim] row-major); the ground truth ([nq, k] u32 row ids of
the exact top-k computed by rustrag) is used for recall@k. Prints one JSON object."""
import argparse, json, time

p = argparse.ArgumentParser()
p.add_argument("--base", required=True)
p.add_argument("--queries", required=True)
p.add_argument("--gt", required=True)
p.add_argument("--dim", type=int, required=True)
p.add_argument("--k", type=int, default=10)
p.add_argument("--m", type=int, default=32)
p.add_argument("--ef-construction", type=int, default=128)
p.add_argument("--ef-search", default="16,32,64,128,256")
p.add_argument("--threads", type=int, required=True)
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--hnsw-cache", help="read the HNSW index from this file if it exists, else write it there "
               "(later rounds of the benchmark search the graph the first round built)")
a = p.parse_args()

import numpy as np
import faiss

faiss.omp_set_num_threads(a.threads)
xb = np.fromfile(a.base, dtype="<f4").reshape(-1, a.dim)
xq = np.fromfile(a.queries, dtype="<f4").reshape(-1, a.dim)
gt = np.fromfile(a.gt, dtype="<u4").reshape(xq.shape[0], -1)[:, : a.k]


def best_of(f):
    best, out = None, None
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        out = f()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best, out


def recall(ids):
    hit = sum(len(set(ids[i]).intersection(gt[i])) for i in range(len(gt)))
    return hit / (len(gt) * a.k)


t0 = time.perf_counter()
flat = faiss.IndexFlatIP(a.dim)
flat.add(xb)
flat_build = time.perf_counter() - t0
flat.search(xq[:16], a.k)  # warm-up
flat_s, (_, flat_ids) = best_of(lambda: flat.search(xq, a.k))

import os

if a.hnsw_cache and os.path.exists(a.hnsw_cache):
    hnsw, hnsw_build = faiss.read_index(a.hnsw_cache), None
else:
    t0 = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(a.dim, a.m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = a.ef_construction
    hnsw.add(xb)
    hnsw_build = time.perf_counter() - t0
    if a.hnsw_cache:
        faiss.write_index(hnsw, a.hnsw_cache)
curve = []
for ef in [int(x) for x in a.ef_search.split(",")]:
    hnsw.hnsw.efSearch = max(ef, a.k)
    hnsw.search(xq[:16], a.k)
    s, (_, ids) = best_of(lambda: hnsw.search(xq, a.k))
    curve.append({"ef_search": ef, "seconds": s, "qps": len(xq) / s, "recall": recall(ids)})

print(json.dumps({
    "peer": "faiss-cpu", "faiss": faiss.__version__, "threads": faiss.omp_get_max_threads(),
    "compile_options": faiss.get_compile_options(),
    "n": int(xb.shape[0]), "nq": int(xq.shape[0]), "dim": a.dim, "k": a.k,
    "flat": {"build_seconds": flat_build, "seconds": flat_s, "qps": len(xq) / flat_s, "recall": recall(flat_ids),
             # Queries whose k hits are rustrag's exact hits (as a set: faiss ranks ties its own way).
             "same_hits": int(sum(set(flat_ids[i]) == set(gt[i]) for i in range(len(gt))))},
    "hnsw": {"m": a.m, "ef_construction": a.ef_construction, "build_seconds": hnsw_build, "curve": curve},
}))
