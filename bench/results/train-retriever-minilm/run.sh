#!/bin/bash
cd /work/wt/retriever
export RUSTRAG_MODELS=/work/models
for NEG in in-batch bm25 ance; do
  rm -rf /tmp/rtbench/$NEG
  echo "=== $NEG start $(date -u +%T)" >> /tmp/rtbench/progress.log
  /usr/bin/time -f "%e s wall, %U s user, %S s sys, %M KB max RSS" \
    /tmp/rtbench/rustrag --json train retriever --encoder models/all-MiniLM-L6-v2 --kb /work/kb-squad \
    --train /work/squad-split/train.jsonl --dev /work/squad-split/eval-all.jsonl --out /tmp/rtbench/$NEG \
    --negatives $NEG --steps 30 --batch-size 16 --max-passage-length 128 --lr 3e-5 --warmup 3 \
    --ance-refresh-every 10 > /tmp/rtbench/$NEG.json 2> /tmp/rtbench/$NEG.stderr
  echo "=== $NEG end $(date -u +%T) rc=$?" >> /tmp/rtbench/progress.log
  uptime >> /tmp/rtbench/progress.log
done
