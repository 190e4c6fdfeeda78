"""Real-size models and knowledge base for `rustrag bench rag` (run with /work/pyenv/bin/python).

Creates, with transformers, from configs with random weights (seeded, transformers' own init):
  OUT/rag-token     RagTokenForGeneration     DPR question encoder (bert-base: 12 layers, hidden 768, 12 heads,
  OUT/rag-sequence  RagSequenceForGeneration  FFN 3072, vocab 30,522) + BART generator (bart-base: d_model 768,
                                              6+6 layers, 12 heads, FFN 3072, vocab 50,265); the same weights
                                              in both, saved with save_pretrained (+ RagTokenizer).
  OUT/kb            passages.jsonl + embeddings.safetensors: the first --passages SQuAD-dev passages,
                    embedded as HF's use_own_knowledge_dataset.py does (title, text pair; input ids only;
                    pooler output) by a DPR context encoder of bert-base dimensions, also random, on the
                    first --ctx-max-length tokens (the KB build is not timed; this keeps it short on 2 cores).
  OUT/questions.json  --questions real SQuAD-dev questions whose gold passage is in the KB.

No pretrained tokenizer exists on this machine, so both are trained here with `tokenizers` on the KB passages
and the SQuAD-dev questions: a BERT WordPiece (lower-cased) for DPR and a byte-level BPE for BART, each
vocabulary padded with unused entries (`[unusedN]` / `<unusedN>`, never produced by the tokenizer) up to the
model's vocab size, so every id the models can emit has a token.
"""
import argparse, gzip, json, os

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--data", default="/work/shared/data/squad-dev")
p.add_argument("--passages", type=int, default=100)
p.add_argument("--ctx-max-length", type=int, default=128, help="context encoder truncation (KB build cost only)")
p.add_argument("--questions", type=int, default=8)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--threads", type=int, default=os.cpu_count())
a = p.parse_args()

import numpy as np
import torch
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (BartConfig, BartForConditionalGeneration, BartTokenizer, DPRConfig,
                          DPRContextEncoder, DPRContextEncoderTokenizerFast, DPRQuestionEncoder,
                          DPRQuestionEncoderTokenizerFast, RagConfig, RagSequenceForGeneration,
                          RagTokenForGeneration, RagTokenizer)

torch.set_num_threads(a.threads)
os.makedirs(a.out, exist_ok=True)
corpus = [json.loads(l) for l in gzip.open(f"{a.data}/corpus.jsonl.gz", "rt", encoding="utf-8")][: a.passages]
kb_ids = {d["_id"] for d in corpus}
queries = [json.loads(l) for l in gzip.open(f"{a.data}/queries.jsonl.gz", "rt", encoding="utf-8")]
# Spread the questions over the KB's articles: every n-th question whose gold passage is in the KB.
pool = [q for q in queries if q.get("gold_pid") in kb_ids]
step = max(1, len(pool) // a.questions)
questions = [q["question"] for q in pool[::step][: a.questions]]
assert len(questions) == a.questions, f"only {len(questions)} questions have their gold passage in the KB"
texts = [d["title"] for d in corpus] + [d["text"] for d in corpus] + [q["question"] for q in queries]

BERT_VOCAB, BART_VOCAB = 30522, 50265

# BERT WordPiece for DPR
wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
wp.normalizer = normalizers.BertNormalizer(lowercase=True)
wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
wp.train_from_iterator(texts, trainers.WordPieceTrainer(
    vocab_size=BERT_VOCAB, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
wp_vocab = dict(sorted(wp.get_vocab().items(), key=lambda kv: kv[1]))
for i in range(len(wp_vocab), BERT_VOCAB):
    wp_vocab[f"[unused{i}]"] = i
qtok = DPRQuestionEncoderTokenizerFast(vocab=dict(wp_vocab), model_max_length=512)
ctok = DPRContextEncoderTokenizerFast(vocab=dict(wp_vocab), model_max_length=512)

# byte-level BPE for BART
bpe = Tokenizer(models.BPE())
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
bpe.train_from_iterator(texts, trainers.BpeTrainer(
    vocab_size=BART_VOCAB, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
bj = json.loads(bpe.to_str())
vocab = dict(bj["model"]["vocab"])
for i in range(len(vocab), BART_VOCAB):
    vocab[f"<unused{i}>"] = i
merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bj["model"]["merges"]]
gtok = BartTokenizer(vocab=vocab, merges=merges, model_max_length=1024)
assert [gtok.bos_token_id, gtok.pad_token_id, gtok.eos_token_id] == [0, 1, 2]
assert [qtok.pad_token_id, qtok.cls_token_id, qtok.sep_token_id] == [0, 2, 3]

torch.manual_seed(a.seed)
bert = dict(vocab_size=BERT_VOCAB, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, max_position_embeddings=512, projection_dim=0)
qcfg = DPRConfig(**bert)
gcfg = BartConfig(vocab_size=BART_VOCAB, d_model=768, encoder_layers=6, decoder_layers=6,
                  encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                  decoder_ffn_dim=3072, max_position_embeddings=1024, bos_token_id=0, pad_token_id=1,
                  eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0, forced_eos_token_id=2)
qe = DPRQuestionEncoder(qcfg).eval()
gen = BartForConditionalGeneration(gcfg).eval()
ce = DPRContextEncoder(DPRConfig(**bert)).eval()

# KB as use_own_knowledge_dataset.py embeds it (batches of 16, input ids only, pooler output)
emb = []
with torch.no_grad():
    for s in range(0, len(corpus), 16):
        chunk = corpus[s : s + 16]
        ids = ctok([d["title"] for d in chunk], [d["text"] for d in chunk], truncation=True,
                   max_length=a.ctx_max_length, padding="longest", return_tensors="pt")["input_ids"]
        emb.append(ce(ids, return_dict=True).pooler_output.numpy())
        print(f"kb {s + len(chunk)}/{len(corpus)}", flush=True)
kb_dir = os.path.join(a.out, "kb")
os.makedirs(kb_dir, exist_ok=True)
save_file({"embeddings": np.ascontiguousarray(np.concatenate(emb), dtype=np.float32)},
          os.path.join(kb_dir, "embeddings.safetensors"))
with open(os.path.join(kb_dir, "passages.jsonl"), "w", encoding="utf-8") as f:
    for i, d in enumerate(corpus):
        f.write(json.dumps({"index": i, "id": d["_id"], "title": d["title"], "text": d["text"]}) + "\n")
with open(os.path.join(a.out, "questions.json"), "w", encoding="utf-8") as f:
    json.dump(questions, f, indent=1)

for t in (qtok, gtok):  # saved tokenizer.json must not carry the last call's padding/truncation
    t.backend_tokenizer.no_padding()
    t.backend_tokenizer.no_truncation()
for name, cls in (("rag-token", RagTokenForGeneration), ("rag-sequence", RagSequenceForGeneration)):
    cfg = RagConfig.from_question_encoder_generator_configs(
        qcfg, gcfg, n_docs=5, max_combined_length=300, index_name="custom", retrieval_vector_size=768,
        title_sep=" / ", doc_sep=" // ")
    model = cls(cfg, question_encoder=qe, generator=gen).eval()
    d = os.path.join(a.out, name)
    model.save_pretrained(d)
    RagTokenizer(question_encoder=qtok, generator=gtok).save_pretrained(d)
    print(f"saved {d}", flush=True)
print(json.dumps({"out": a.out, "passages": len(corpus), "questions": len(questions),
                  "wordpiece_trained": len(wp.get_vocab()), "bpe_trained": len(bj["model"]["vocab"])}))
