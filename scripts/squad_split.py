"""Split SQuAD-dev questions by article (ids `article-paragraph`): train on articles 0-35, evaluate
on 36-47, as the training recipe in docs/training.md uses them. Writes OUT/train.jsonl,
OUT/eval-all.jsonl, and OUT/eval{50,100,200}.jsonl (every k-th evaluation question).

    python3 scripts/squad_split.py ../shared/data/squad-dev/queries.jsonl.gz OUT
"""
import gzip
import json
import pathlib
import sys

queries, out = sys.argv[1], pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
rows = [json.loads(l) for l in gzip.open(queries, "rt")]
article = lambda q: int(q["gold_pid"].split("-")[0])
train = [q for q in rows if article(q) <= 35]
evaluation = [q for q in rows if article(q) >= 36]


def write(name, qs):
    with open(out / name, "w") as f:
        for q in qs:
            keep = {k: q[k] for k in ("id", "question", "answers", "gold_pid")}
            f.write(json.dumps(keep) + "\n")


write("train.jsonl", train)
write("eval-all.jsonl", evaluation)
step = len(evaluation) // 200
eval200 = [evaluation[i * step] for i in range(200)]
write("eval200.jsonl", eval200)
write("eval100.jsonl", eval200[:100])
write("eval50.jsonl", eval200[:50])
print(f"{len(train)} training, {len(evaluation)} evaluation questions -> {out}")
