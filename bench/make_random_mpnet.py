"""A random MPNet the size of all-mpnet-base-v2 (hidden 768, 12 layers, 12 heads, intermediate 3072,
514 positions, 32 relative-attention buckets) as a sentence-transformers directory (mean pooling,
Normalize), for `rustrag bench encode` against sentence-transformers. Its weights are random: only
its speed means anything. The tokenizer is a WordPiece vocabulary trained here on SQuAD dev text
(up to 30,527 tokens, MPNet's specials), so texts split into pieces as they would with a real one.

    /work/pyenv/bin/python bench/make_random_mpnet.py /tmp/mpnet-base-random
"""
import gzip
import json
import os
import shutil
import sys

import torch
import transformers
from sentence_transformers import SentenceTransformer, models
from tokenizers import BertWordPieceTokenizer

out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/mpnet-base-random"
squad = os.environ.get("RUSTRAG_SQUAD", "/work/shared/data/squad-dev")
os.makedirs(out + ".work", exist_ok=True)
corpus = os.path.join(out + ".work", "corpus.txt")
with gzip.open(os.path.join(squad, "corpus.jsonl.gz"), "rt", encoding="utf-8") as f, open(corpus, "w") as w:
    for line in f:
        d = json.loads(line)
        w.write(d.get("title", "") + " " + d.get("text", "") + "\n")
wp = BertWordPieceTokenizer(lowercase=True)
wp.train([corpus], vocab_size=30526, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "[UNK]"])
vocab = {tok: i for tok, i in wp.get_vocab().items()}
vocab["<mask>"] = len(vocab)
tok = transformers.MPNetTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512)
torch.manual_seed(0)
cfg = transformers.MPNetConfig(vocab_size=30527, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                               intermediate_size=3072, max_position_embeddings=514, layer_norm_eps=1e-5,
                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, relative_attention_num_buckets=32)
hf = out + ".hf"
transformers.MPNetModel(cfg).eval().save_pretrained(hf, safe_serialization=True)
tok.save_pretrained(hf)
word = models.Transformer(hf, max_seq_length=384)
st = SentenceTransformer(modules=[word, models.Pooling(768, pooling_mode="mean"), models.Normalize()], device="cpu")
st.save(out)
shutil.rmtree(hf)
shutil.rmtree(out + ".work")
print(out, len(vocab), "tokens")
