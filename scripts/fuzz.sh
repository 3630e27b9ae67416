#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for a fixed time each and prints the executions,
# crashes and peak memory of each as a table (docs/RELIABILITY.md keeps the latest one).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET…]     default: 600 s, all targets
#
# Needs nightly Rust and cargo-fuzz (installed here when missing). Inputs that crash land in
# fuzz/artifacts/TARGET/ — each one found becomes a regression test in tests/. The working
# corpus grows in fuzz/corpus/TARGET/ (not committed); fuzz/seeds/TARGET/ is where it starts.
# JOBS (default 1) targets run side by side; on a 2-core machine one at a time measures best.
# RUNS=N stops a target earlier, once it has executed N inputs (the goal is 1,000,000 each).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-600}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(gguf_open gguf_vocab kv_snapshot store_load chat_template config)
fi

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked

# Limits: a crash, a leak (AddressSanitizer's leak check), an input slower than 10 s or
# an RSS above 2 GiB all stop the run and count as failures.
limits=(-timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 -print_final_stats=1)
mkdir -p logs
cargo +nightly fuzz build -O

run_one() {
    local t=$1
    local extra=()
    [ -f "dict/$t.dict" ] && extra+=("-dict=dict/$t.dict")
    # The model seeds are ~400 KB; the other targets' inputs stay small.
    [ "$t" = gguf_open ] && extra+=(-max_len=200000)
    mkdir -p "corpus/$t" "seeds/$t"
    cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$seconds" ${RUNS:+-runs=$RUNS} "${limits[@]}" "${extra[@]}" >"logs/$t.log" 2>&1 && rc=0 || rc=$?
    echo "$rc" >"logs/$t.rc"
}

# One thread for candle's pool: libFuzzer runs inputs one at a time, and the pool's workers
# spinning between tiny matrix products took a third of store_load's time.
export RAYON_NUM_THREADS=1
# A smaller quarantine of freed memory than AddressSanitizer's 256 MB, so that the 2 GiB limit
# measures the target rather than the quarantine (one gguf_vocab input run 10,000 times: 448 MB
# with the default, 73 MB with none). Freed memory stays poisoned until 32 MB more is freed.
export ASAN_OPTIONS=${ASAN_OPTIONS:-quarantine_size_mb=32}
jobs=${JOBS:-1}
for t in "${targets[@]}"; do
    run_one "$t" &
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
done
wait

printf '| target | seconds | executions | exec/s | corpus | peak RSS MiB | result |\n'
printf '| --- | ---: | ---: | ---: | ---: | ---: | --- |\n'
failed=0
for t in "${targets[@]}"; do
    log=logs/$t.log
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
    rss=$(grep -o 'stat::peak_rss_mb: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
    corpus=$(ls "corpus/$t" | wc -l)
    # "Done N runs in S second(s)" when a run count ended it; else the time it was given.
    secs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | grep -o 'in [0-9]*' | grep -o '[0-9]*' || echo "$seconds")
    if [ "$(cat "logs/$t.rc")" = 0 ]; then
        result="no crash, leak or time-out"
    else
        result="FAILED: $(grep -m1 -E 'ERROR|panicked|SUMMARY' "$log" | cut -c1-80 || true) (fuzz/$log)"
        failed=1
    fi
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$t" "$secs" "$execs" "$rate" "$corpus" "$rss" "$result"
done
exit $failed
