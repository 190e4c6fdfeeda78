"""When `rustrag bench rag --mode sequence` reports differing outputs, score both sides' answers with HF's
own RAG-Sequence NLL (exclude_bos_score=True, what thorough decoding ranks by; lower is better).

    python bench/rag_sequence_rescore.py MODEL KB QUESTIONS.json BENCH_OUTPUT.txt
"""
import json, sys, torch, numpy as np, faiss
from datasets import Dataset
from safetensors.numpy import load_file
from transformers import AutoTokenizer, RagRetriever, RagSequenceForGeneration
from transformers.models.rag.retrieval_rag import CustomHFIndex
torch.set_num_threads(2)
M, KB, QUESTIONS, REPORT = sys.argv[1:5]
d=[l for l in open(REPORT) if l.startswith('peer:')][0]
diff=json.loads(d.split(':',1)[1])['differing_outputs']
model=RagSequenceForGeneration.from_pretrained(M).eval()
qtok=AutoTokenizer.from_pretrained(f"{M}/question_encoder_tokenizer"); gtok=AutoTokenizer.from_pretrained(f"{M}/generator_tokenizer")
passages=[json.loads(l) for l in open(f"{KB}/passages.jsonl") if l.strip()]
E=load_file(f"{KB}/embeddings.safetensors")["embeddings"].astype(np.float32)
ds=Dataset.from_dict({"title":[p["title"] for p in passages],"text":[p["text"] for p in passages],"embeddings":list(E)})
ds.add_faiss_index("embeddings", custom_index=faiss.IndexFlatIP(E.shape[1]))
ret=RagRetriever(model.config, question_encoder_tokenizer=qtok, generator_tokenizer=gtok, index=CustomHFIndex(E.shape[1], ds))
q=json.load(open(QUESTIONS))
enc=qtok(q, padding='longest', truncation=True, return_tensors='pt')
with torch.no_grad():
    qe=model.question_encoder(enc['input_ids'], attention_mask=enc['attention_mask'])[0]
r=ret(enc['input_ids'], qe.numpy(), n_docs=5, return_tensors='pt')
ds_=torch.bmm(qe.unsqueeze(1), r['retrieved_doc_embeds'].float().transpose(1,2)).squeeze(1)
for name in ['hf','rustrag']:
    lab=torch.tensor(diff[name])
    with torch.no_grad():
        out=model(context_input_ids=r['context_input_ids'], context_attention_mask=r['context_attention_mask'], doc_scores=ds_, labels=lab, n_docs=5, exclude_bos_score=True, reduce_loss=False)
    print(name, 'HF nll (exclude_bos_score)', out.loss.tolist())
