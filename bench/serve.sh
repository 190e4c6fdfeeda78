#!/usr/bin/env bash
# Load and latency of `rustrag serve` (docs/serving.md), results in bench/results/serve/.
#  1. wrk (Debian) on loopback against POST /v1/retrieve and streaming POST /v1/answer at 1, 4 and 16
#     concurrent connections, $DURATION s each: req/s, p50/p90/p99, statuses (zero 5xx expected below
#     the queue limit); then /v1/retrieve at 16 connections against a server with --queue-capacity 4
#     (503 + Retry-After expected); the server's RSS before and after the runs.
#  2. Time to first token and tokens/s of a streamed answer, rustrag vs llama-cpp-python's own
#     OpenAI-compatible server on the same GGUF and the same prompt (bench/serve_ttft.py, the `openai`
#     client on both), same run.
#  3. (PARTS=soak, not in the default) resident memory over $SOAK_CYCLES (default 1) runs of
#     $SOAK_DURATION s (default 600), each followed by $SOAK_IDLE s idle (default 30):
#     retrieves and greedy streamed answers ($SOAK_CONNECTIONS wrk connections each, default 2) and
#     one connection of sampled answers (temperature 0.7) at once; RSS and the heap's live and
#     freed-but-held bytes (/metrics, glibc mallinfo2) after warm-up, then every 30 s.
# Threads pinned: the server on core $SERVER_CPU with 1 thread (RAYON_NUM_THREADS / --n_threads), the
# load generator on core $CLIENT_CPU. Usage: bench/serve.sh [DURATION_S]; PARTS="retrieve answer full ttft"
# (default all) picks parts; streamed answers run $ANSWER_DURATION s (default 60) per level with n_docs 2
# and 16 new tokens (an answer takes seconds on one core).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-20}"
ANSWER_DURATION="${ANSWER_DURATION:-60}"
PARTS="${PARTS:-retrieve answer full ttft}"
has() { [[ " $PARTS " == *" $1 "* ]]; }
SERVER_CPU="${SERVER_CPU:-1}"
CLIENT_CPU="${CLIENT_CPU:-0}"
PY="${RUSTRAG_BENCH_PYTHON:-python3}"
export RUSTRAG_MODELS="${RUSTRAG_MODELS:-$PWD/models}"
GGUF="$RUSTRAG_MODELS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT=bench/results/serve
WORK=target/bench-serve
mkdir -p "$OUT" "$WORK"
bin=target/release/rustrag
cargo build --release -q
# A KB of the first 200 SQuAD-dev paragraphs (MiniLM), built once.
if ! $bin index info --kb "$WORK/kb" >/dev/null 2>&1; then
  (set +o pipefail; zcat data/squad-dev/corpus.jsonl.gz | head -200 > "$WORK/corpus.jsonl")
  RUSTRAG_NO_PROGRESS=1 $bin index build --corpus "$WORK/corpus.jsonl" --encoder "$RUSTRAG_MODELS/all-MiniLM-L6-v2" \
    --out "$WORK/kb" --words-per-passage 0 >/dev/null
fi
Q="Which NFL team represented the AFC at Super Bowl 50?"

start_server() { # port, extra args...
  local port=$1; shift
  RAYON_NUM_THREADS=1 taskset -c "$SERVER_CPU" $bin serve --kb "$WORK/kb" --generator "$GGUF" \
    --addr "127.0.0.1:$port" "$@" > "$WORK/server-$port.log" 2>&1 &
  echo $! > "$WORK/server-$port.pid"
  for _ in $(seq 1 300); do
    grep -q listening "$WORK/server-$port.log" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "server on $port did not start:"; cat "$WORK/server-$port.log"; return 1
}
stop_server() { kill "$(cat "$WORK/server-$1.pid")" 2>/dev/null || true; wait "$(cat "$WORK/server-$1.pid")" 2>/dev/null || true; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$(cat "$WORK/server-$1.pid")/status"; }
# The heap's live and freed-but-held bytes from /metrics (glibc mallinfo2), as JSON fields.
heap_fields() {
  curl -s "http://127.0.0.1:$1/metrics" | awk '
    /^rustrag_heap_in_use_bytes / {u = $2} /^rustrag_heap_free_held_bytes / {f = $2}
    END {printf "\"heap_in_use_kb\": %d, \"heap_free_held_kb\": %d", u / 1024, f / 1024}'
}
load() { # port path body connections [seconds] -> one JSON line
  BODY="$3" taskset -c "$CLIENT_CPU" wrk -t1 -c"$4" -d"${5:-$DURATION}s" --timeout 180s -s bench/serve_post.lua \
    "http://127.0.0.1:$1$2" | tail -1
}

results="$OUT/load.jsonl"
retrieve='{"question": "'"$Q"'", "k": 3}'
answer='{"question": "'"$Q"'", "n_docs": 2, "max_new_tokens": 16, "stream": true}'
if has retrieve || has answer; then
  port=18181
  start_server $port
  # Warm up (BM25 index built on first use, first decode).
  curl -s -o /dev/null "http://127.0.0.1:$port/v1/answer" -d "{\"question\": \"$Q\", \"max_new_tokens\": 4}"
  rss_start=$(rss_kb $port)
  t0=$(date +%s)
  if has retrieve; then
    for c in 1 4 16; do
      echo "{\"endpoint\": \"/v1/retrieve\", \"body\": $retrieve, \"connections\": $c, \"wrk\": $(load $port /v1/retrieve "$retrieve" $c)}" | tee -a "$results"
    done
  fi
  if has answer; then
    for c in 1 4 16; do
      echo "{\"endpoint\": \"/v1/answer\", \"body\": $answer, \"connections\": $c, \"wrk\": $(load $port /v1/answer "$answer" $c "$ANSWER_DURATION")}" | tee -a "$results"
    done
  fi
  rss_end=$(rss_kb $port)
  t1=$(date +%s)
  curl -s "http://127.0.0.1:$port/metrics" > "$OUT/metrics-after-load.txt"
  stop_server $port
  echo "{\"parts\": \"$PARTS\", \"rss_kb_start\": $rss_start, \"rss_kb_end\": $rss_end, \"seconds_between\": $((t1 - t0))}" | tee -a "$OUT/rss.jsonl"
fi

if has full; then
  # Over the queue limit: capacity 4, 16 connections.
  port=18182
  start_server $port --queue-capacity 4
  curl -s -o /dev/null "http://127.0.0.1:$port/v1/retrieve" -d "$retrieve"
  echo "{\"endpoint\": \"/v1/answer, --queue-capacity 4\", \"body\": $answer, \"connections\": 16, \"wrk\": $(load $port /v1/answer "$answer" 16)}" | tee -a "$results"
  stop_server $port
fi

# Time to first token and tokens/s vs llama-cpp-python's server (same GGUF, same prompt, pinned alike).
if has ttft; then
  start_server 18183 --gguf-weights quantized
  start_server 18185
  taskset -c "$SERVER_CPU" "$PY" -m llama_cpp.server --model "$GGUF" --n_threads 1 --n_threads_batch 1 --n_ctx 2048 \
    --host 127.0.0.1 --port 18184 > "$WORK/llama-cpp.log" 2>&1 &
  llama_pid=$!
  for _ in $(seq 1 300); do curl -s -o /dev/null "http://127.0.0.1:18184/v1/models" && break; sleep 0.2; done
  taskset -c "$CLIENT_CPU" "$PY" bench/serve_ttft.py --rustrag "http://127.0.0.1:18183/v1" \
    --rustrag-f32 "http://127.0.0.1:18185/v1" --llama-cpp "http://127.0.0.1:18184/v1" \
    --question "$Q" --question "In what country is Normandy located?" --question "In what city did Tesla die?" \
    --repeats 3 | tee "$OUT/ttft.json"
  kill $llama_pid; wait $llama_pid 2>/dev/null || true
  stop_server 18183
  stop_server 18185
fi
# Resident memory at the start and end of a long mixed run (the issue's "10-minute run"), in
# $SOAK_CYCLES cycles of $SOAK_DURATION s of load then $SOAK_IDLE s idle: the heap's live bytes
# sampled idle after each cycle tell a leak (growing cycle after cycle) from working memory and
# allocator retention (RSS above live bytes).
if has soak; then
  SOAK_DURATION="${SOAK_DURATION:-600}"
  SOAK_CONNECTIONS="${SOAK_CONNECTIONS:-2}"
  SOAK_CYCLES="${SOAK_CYCLES:-1}"
  SOAK_IDLE="${SOAK_IDLE:-30}"
  port=18186
  start_server $port
  curl -s -o /dev/null "http://127.0.0.1:$port/v1/answer" -d "{\"question\": \"$Q\", \"max_new_tokens\": 4}"
  curl -s -o /dev/null "http://127.0.0.1:$port/v1/retrieve" -d "$retrieve"
  sampled='{"question": "'"$Q"'", "n_docs": 2, "max_new_tokens": 16, "stream": true, "temperature": 0.7}'
  soak="$OUT/soak.jsonl"
  : > "$soak"
  t0=$(date +%s)
  sample() { echo "{\"t_s\": $(( $(date +%s) - t0 )), \"phase\": \"$1\", \"rss_kb\": $(rss_kb $port), $(heap_fields $port)}" | tee -a "$soak"; }
  sample idle
  for cycle in $(seq 1 "$SOAK_CYCLES"); do
    load $port /v1/retrieve "$retrieve" "$SOAK_CONNECTIONS" "$SOAK_DURATION" > "$WORK/soak-retrieve-$cycle.json" &
    w1=$!
    load $port /v1/answer "$answer" "$SOAK_CONNECTIONS" "$SOAK_DURATION" > "$WORK/soak-answer-$cycle.json" &
    w2=$!
    load $port /v1/answer "$sampled" 1 "$SOAK_DURATION" > "$WORK/soak-sampled-$cycle.json" &
    w3=$!
    while kill -0 $w1 2>/dev/null || kill -0 $w2 2>/dev/null || kill -0 $w3 2>/dev/null; do
      sleep 30
      sample load
    done
    wait $w1 $w2 $w3 || true
    echo "{\"cycle\": $cycle, \"endpoint\": \"/v1/retrieve\", \"body\": $retrieve, \"connections\": $SOAK_CONNECTIONS, \"wrk\": $(cat "$WORK/soak-retrieve-$cycle.json")}" | tee -a "$soak"
    echo "{\"cycle\": $cycle, \"endpoint\": \"/v1/answer\", \"body\": $answer, \"connections\": $SOAK_CONNECTIONS, \"wrk\": $(cat "$WORK/soak-answer-$cycle.json")}" | tee -a "$soak"
    echo "{\"cycle\": $cycle, \"endpoint\": \"/v1/answer\", \"body\": $sampled, \"connections\": 1, \"wrk\": $(cat "$WORK/soak-sampled-$cycle.json")}" | tee -a "$soak"
    # Streams whose client left finish their current token first: wait for an empty queue.
    sleep "$SOAK_IDLE"
    sample idle
  done
  curl -s "http://127.0.0.1:$port/metrics" > "$OUT/metrics-after-soak.txt"
  curl -s "http://127.0.0.1:$port/healthz" | tee -a "$soak"; echo
  stop_server $port
fi
echo "results in $OUT"
