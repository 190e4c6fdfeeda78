#!/usr/bin/env bash
# Fuzz the JSON endpoints of `rustrag serve` with schemathesis (PyPI) against its own /openapi.json,
# every check on; the server must stay up, never answer 5xx, and end with queue depth 0.
# Usage: bench/serve_fuzz.sh [MAX_EXAMPLES]   (schemathesis from $SCHEMATHESIS, default target/st-venv;
# the run is bounded by $MAX_TIME seconds, default 900). Responses may take up to the server's
# request timeout (120 s): latency is bench/serve.sh's business, not the fuzzer's.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-30}"
MAX_TIME="${MAX_TIME:-900}"
ST="${SCHEMATHESIS:-target/st-venv/bin/schemathesis}"
[ -x "$ST" ] || { python3 -m venv target/st-venv && target/st-venv/bin/pip install -q schemathesis; }
export RUSTRAG_MODELS="${RUSTRAG_MODELS:-$PWD/models}"
WORK=target/bench-serve
OUT=bench/results/serve
mkdir -p "$WORK" "$OUT"
[ -d "$WORK/kb" ] || { echo "run bench/serve.sh first (builds $WORK/kb)"; exit 1; }
port=18190
# Small generation limits keep each valid request cheap (the served document states them, so the
# fuzzer keeps to them). A body-size limit cannot be written in JSON Schema: it is raised above the
# largest body the schemas allow (64 questions of 4,096 characters, escaped), so a 413 is not a
# finding.
target/release/rustrag serve --kb "$WORK/kb" --generator "$RUSTRAG_MODELS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" \
  --addr 127.0.0.1:$port --max-new-tokens 4 --max-n-docs 8 --max-body-bytes 8388608 > "$WORK/fuzz-server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do grep -q listening "$WORK/fuzz-server.log" && break; sleep 0.2; done
set +e
"$ST" run "http://127.0.0.1:$port/openapi.json" --checks all -n "$N" --workers 1 --request-timeout 120 \
  --max-response-time 120 --max-time "$MAX_TIME" --generation-deterministic 2>&1 | tee "$OUT/schemathesis.txt"
st=$?
set -e
echo "--- after the run" | tee -a "$OUT/schemathesis.txt"
curl -s "http://127.0.0.1:$port/healthz" | tee -a "$OUT/schemathesis.txt"; echo | tee -a "$OUT/schemathesis.txt"
curl -s "http://127.0.0.1:$port/metrics" | grep -E '^rustrag_(http_requests_total|queue_depth|panics_total)' | tee -a "$OUT/schemathesis.txt"
exit $st
