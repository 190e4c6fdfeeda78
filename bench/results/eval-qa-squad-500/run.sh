#!/bin/bash
# usage: run1.sh MODE [extra flags]. 500 held-out SQuAD-dev questions (articles 36-47, even sample of eval-all.jsonl),
# trained SmolLM2 (top 12 layers, step 400), MiniLM KB, hybrid, n_docs 3, greedy, 20 new tokens.
G=/work/runs/smol-top12/checkpoints/step-0000400
m=$1; shift
/usr/bin/time -f "%e s wall %U s user %M KB" ./rustrag eval qa --kb /work/kb-squad --generator $G --questions /work/squad-split/eval-all.jsonl --sample 500 --mode $m --max-length 21 --records $m.jsonl --html $m.html --json "$@" > $m.summary.json 2> $m.err
