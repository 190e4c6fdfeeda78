"""Peer for `rustrag bench rag`: HF transformers RAG on PyTorch CPU, same checkpoint, KB and questions.

Each run does what RagModel.forward + generate do, timed per phase:
  question_encoding  question_encoder_tokenizer(questions, padding="longest", truncation=True) + the DPR
                     question encoder;
  retrieval          HF's own RagRetriever over a CustomHFIndex (datasets.Dataset with a faiss IndexFlatIP on
                     the KB's embeddings), which searches and builds + tokenises the context strings, then
                     doc_scores = bmm(question, retrieved_doc_embeds);
  generation         model.generate on those contexts and doc scores (RAG-Token beam search, or RAG-Sequence
                     thorough decoding).
The fastest run end to end (after one warm-up) is reported with its phases. Threads are pinned
(torch.set_num_threads, faiss.omp_set_num_threads); torch's build and CPU capability are recorded.
Prints one JSON object with the timings, the retrieved doc ids and the generated ids."""
import argparse, json, time

p = argparse.ArgumentParser()
p.add_argument("--model", required=True, help="HF RAG checkpoint directory")
p.add_argument("--kb", required=True, help="directory with passages.jsonl and embeddings.safetensors")
p.add_argument("--questions", required=True, help="JSON list of question strings")
p.add_argument("--mode", choices=["token", "sequence"], required=True)
p.add_argument("--n-docs", type=int, required=True)
p.add_argument("--beams", type=int, required=True)
p.add_argument("--num-return-sequences", type=int, default=1)
p.add_argument("--max-length", type=int, required=True)
p.add_argument("--threads", type=int, required=True)
p.add_argument("--repeats", type=int, default=3)
a = p.parse_args()

import faiss
import numpy as np
import torch
import transformers
from datasets import Dataset
from safetensors.numpy import load_file
from transformers import AutoTokenizer, RagRetriever, RagSequenceForGeneration, RagTokenForGeneration
from transformers.models.rag.retrieval_rag import CustomHFIndex

torch.set_num_threads(a.threads)
torch.set_num_interop_threads(1)
faiss.omp_set_num_threads(a.threads)
questions = json.load(open(a.questions, encoding="utf-8"))
cls = RagTokenForGeneration if a.mode == "token" else RagSequenceForGeneration
model = cls.from_pretrained(a.model).eval()
qtok = AutoTokenizer.from_pretrained(f"{a.model}/question_encoder_tokenizer")
gtok = AutoTokenizer.from_pretrained(f"{a.model}/generator_tokenizer")
passages = [json.loads(l) for l in open(f"{a.kb}/passages.jsonl", encoding="utf-8") if l.strip()]
E = load_file(f"{a.kb}/embeddings.safetensors")["embeddings"].astype(np.float32)
ds = Dataset.from_dict({"title": [p["title"] for p in passages], "text": [p["text"] for p in passages],
                        "embeddings": list(E)})
ds.add_faiss_index("embeddings", custom_index=faiss.IndexFlatIP(E.shape[1]))
retriever = RagRetriever(model.config, question_encoder_tokenizer=qtok, generator_tokenizer=gtok,
                         index=CustomHFIndex(E.shape[1], ds))
prefix = getattr(model.generator.config, "prefix", None)


def run():
    t0 = time.perf_counter()
    enc = qtok(questions, padding="longest", truncation=True, return_tensors="pt")
    with torch.no_grad():
        q = model.question_encoder(enc["input_ids"], attention_mask=enc["attention_mask"])[0]
    t1 = time.perf_counter()
    r = retriever(enc["input_ids"], q.numpy(), prefix=prefix, n_docs=a.n_docs, return_tensors="pt")
    with torch.no_grad():
        doc_scores = torch.bmm(q.unsqueeze(1), r["retrieved_doc_embeds"].float().transpose(1, 2)).squeeze(1)
    t2 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(context_input_ids=r["context_input_ids"],
                             context_attention_mask=r["context_attention_mask"], doc_scores=doc_scores,
                             n_docs=a.n_docs, num_beams=a.beams, num_return_sequences=a.num_return_sequences,
                             max_length=a.max_length)
    t3 = time.perf_counter()
    phases = {"question_encoding": t1 - t0, "retrieval": t2 - t1, "generation": t3 - t2, "end_to_end": t3 - t0}
    return phases, r["doc_ids"].tolist(), out.tolist()


run()  # warm-up
best = None
for _ in range(a.repeats):
    res = run()
    if best is None or res[0]["end_to_end"] < best[0]["end_to_end"]:
        best = res
phases, doc_ids, out = best
print(json.dumps({"peer": "transformers", "transformers": transformers.__version__, "torch": torch.__version__,
                  "faiss": faiss.__version__, "threads": torch.get_num_threads(),
                  "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                  "torch_config": torch.__config__.show(), "mode": a.mode, "questions": len(questions),
                  "seconds": phases, "doc_ids": doc_ids, "output_ids": out}))
