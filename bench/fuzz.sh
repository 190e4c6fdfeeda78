#!/usr/bin/env bash
# Run every cargo-fuzz target of rustrag for a bounded time and print executions and crashes per
# target. Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`); CI does not run
# this, only the regression tests (tests/fuzz_regressions.rs).
#
#   bench/fuzz.sh [SECONDS_PER_TARGET=60] [TARGET...]
#
# Targets: ingest gguf weights kb_files tokenizer (all by default). The seeds in fuzz/corpus/<target>/
# are read, never written: what the fuzzer finds goes to $RUSTRAG_FUZZ_WORK/corpus/<target>/
# (default /tmp/rustrag-fuzz, kept between runs so a later run resumes), crash inputs to
# $RUSTRAG_FUZZ_WORK/artifacts/<target>/. The tokenizer target reads the real MiniLM and SmolLM2
# tokenizers from $RUSTRAG_MODELS (default /work/models). Runs at nice 19 on one core.
set -euo pipefail

secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(ingest gguf weights kb_files tokenizer)
root=$(cd "$(dirname "$0")/.." && pwd)
work=${RUSTRAG_FUZZ_WORK:-${TMPDIR:-/tmp}/rustrag-fuzz}
host=$(rustc +nightly -vV | sed -n 's/^host: //p')
export RUSTRAG_MODELS=${RUSTRAG_MODELS:-/work/models}

cd "$root/fuzz"
# No sanitizer: the library is safe Rust apart from its memory maps, and ASan would cost ~2x
# executions. cargo-fuzz's default build: optimised, with debug assertions and overflow checks on
# (stricter than the release build, where an overflow wraps around silently).
mkdir -p "$work"
for t in "${targets[@]}"; do
    if ! nice -n 19 cargo +nightly fuzz build -s none "$t" >"$work/build.log" 2>&1; then
        cat "$work/build.log" >&2
        exit 1
    fi
done

printf '%-10s %8s %12s %10s %8s  %s\n' target seconds executions exec/s crashes artifacts
for t in "${targets[@]}"; do
    mkdir -p "$work/corpus/$t" "$work/artifacts/$t"
    log="$work/$t.log"
    before=$(ls "$work/artifacts/$t" | wc -l)
    start=$(date +%s)
    nice -n 19 "target/$host/release/$t" \
        -max_total_time="$secs" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 \
        -artifact_prefix="$work/artifacts/$t/" "$work/corpus/$t" "corpus/$t" >"$log" 2>&1 || true
    elapsed=$(($(date +%s) - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    execs=${execs:-$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#')}
    crashes=$(($(ls "$work/artifacts/$t" | wc -l) - before))
    rate=$(awk -v e="${execs:-0}" -v s="$elapsed" 'BEGIN { r = 0; if (s > 0) r = e / s; printf "%.0f", r }')
    printf '%-10s %8s %12s %10s %8s  %s\n' "$t" "$elapsed" "${execs:-?}" "$rate" "$crashes" "$work/artifacts/$t"
    if [ "$crashes" -gt 0 ]; then
        grep -a -m1 -A3 -E "panicked|ERROR: libFuzzer|out-of-memory|deadly signal" "$log" | sed 's/^/    /' || true
    fi
done
