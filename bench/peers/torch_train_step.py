"""PyTorch peer of `rustrag bench train`: one RAG-Token training step of a HF causal LM over n_docs
prompts (uniform doc prior), backward through the top --layers layers (+ final norm; embeddings
frozen), or of LoRA adapters loaded with PEFT from --adapter (the initial adapters rustrag saved),
torch.optim.AdamW(lr 1e-5). Prints one JSON line: first-step loss and mean step time."""
import argparse
import json
import math
import time

import torch
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--input", required=True)
ap.add_argument("--layers", type=int)
ap.add_argument("--adapter", help="PEFT LoRA directory: train its adapters instead of top layers")
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--threads", type=int, required=True)
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.set_num_interop_threads(1)

model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
model.train()  # SmolLM2 has no dropout: train mode computes the same function
if a.adapter:
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, a.adapter, is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
else:
    n = model.config.num_hidden_layers
    trainable = [f"model.layers.{i}." for i in range(n - a.layers, n)] + ["model.norm."]
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(t) for t in trainable))
        if p.requires_grad:
            params.append(p)
opt = torch.optim.AdamW(params, lr=1e-5)
inp = json.load(open(a.input))
prompts, labels = inp["prompts"], inp["labels"]
k, L, T = len(prompts), len(prompts[0]), len(labels)
# Position 0 of the labels stands for the prompt; the targets are labels[1:].
ids = torch.tensor([p + labels[1:] for p in prompts])
targets = torch.tensor(labels[1:])
log_prior = -math.log(k)

losses, secs = [], []
for _ in range(a.steps + 1):
    t = time.perf_counter()
    logits = model(input_ids=ids).logits[:, L - 1 : L - 1 + T - 1]
    lp = torch.log_softmax(logits, -1).gather(-1, targets.expand(k, -1).unsqueeze(-1)).squeeze(-1)
    loss = -torch.logsumexp(lp + log_prior, dim=0).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    secs.append(time.perf_counter() - t)
    losses.append(loss.item())
print(json.dumps({"torch": torch.__version__, "config": torch.__config__.show().splitlines()[:6],
                  "trainable_layers": a.layers, "adapter": a.adapter, "params": len(params), "loss_first_step": losses[0], "losses": losses,
                  "step_s": secs, "mean_step_s": sum(secs[1:]) / a.steps}))
