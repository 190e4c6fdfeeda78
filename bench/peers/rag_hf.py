"""Peer for `rustrag bench rag`: HF transformers RAG on PyTorch CPU, same checkpoint, KB and questions.

Times question encoding + exact inner-product retrieval + context building + generate() (RagToken beam search
or RagSequence thorough decoding over the passed contexts and doc scores), best of --repeats.
Prints one JSON object with timings and the generated ids (so the Rust side can compare outputs)."""
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
p.add_argument("--threads", type=int, default=0)
p.add_argument("--repeats", type=int, default=3)
a = p.parse_args()

import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import AutoTokenizer, RagSequenceForGeneration, RagTokenForGeneration

if a.threads:
    torch.set_num_threads(a.threads)
questions = json.load(open(a.questions, encoding="utf-8"))
cls = RagTokenForGeneration if a.mode == "token" else RagSequenceForGeneration
model = cls.from_pretrained(a.model).eval()
qtok = AutoTokenizer.from_pretrained(f"{a.model}/question_encoder_tokenizer")
gtok = AutoTokenizer.from_pretrained(f"{a.model}/generator_tokenizer")
passages = [json.loads(l) for l in open(f"{a.kb}/passages.jsonl", encoding="utf-8") if l.strip()]
E = load_file(f"{a.kb}/embeddings.safetensors")["embeddings"]
cfg = model.config
prefix = getattr(model.generator.config, "prefix", None) or ""


def context_string(title, text, question):
    if title.startswith('"'):
        title = title[1:]
    if title.endswith('"'):
        title = title[:-1]
    return (prefix + title + cfg.title_sep + text + cfg.doc_sep + question).replace("  ", " ")


def run():
    enc = qtok(questions, padding="longest", truncation=True, return_tensors="pt")
    with torch.no_grad():
        q = model.question_encoder(enc["input_ids"], attention_mask=enc["attention_mask"])[0]
        scores = q.numpy() @ E.T
        top = np.argsort(-scores, axis=1, kind="stable")[:, : a.n_docs]
        embeds = torch.from_numpy(E[top])
        doc_scores = torch.bmm(q.unsqueeze(1), embeds.transpose(1, 2)).squeeze(1)
        decoded = qtok.batch_decode(enc["input_ids"], skip_special_tokens=True)
        strings = [context_string(passages[j]["title"], passages[j]["text"], decoded[i])
                   for i in range(len(questions)) for j in top[i]]
        ctx = gtok(strings, max_length=cfg.max_combined_length, padding="max_length", truncation=True,
                   return_tensors="pt")
        return model.generate(context_input_ids=ctx["input_ids"], context_attention_mask=ctx["attention_mask"],
                              doc_scores=doc_scores, n_docs=a.n_docs, num_beams=a.beams,
                              num_return_sequences=a.num_return_sequences, max_length=a.max_length)


out = run()  # warm-up
best = None
for _ in range(a.repeats):
    t0 = time.perf_counter()
    out = run()
    dt = time.perf_counter() - t0
    best = dt if best is None else min(best, dt)
import transformers

print(json.dumps({"peer": "transformers", "transformers": transformers.__version__, "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "mode": a.mode, "questions": len(questions),
                  "seconds": best, "output_ids": out.tolist()}))
