#!/bin/bash
# The GPU check (docs/GPU.md), run on the device machine from the repo root: the CUDA build's unit
# and integration tests on the GPU, then decode/prefill figures on random-weight models shaped
# like the default model and gemma3-270m. UNIT_ARGS passes options to the unit tests (e.g.
# `--skip the_device_sampler`, the slowest on a GPU: 36,000 draws).
G=.gpu; S=scripts/gpu; B=/tmp/lc; mkdir -p $B
step() { echo; echo "=== $* ($(date +%T))"; }
step gpu; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
lscpu | grep -E 'Model name|^CPU\(s\)|Flags' | cut -c1-200
tar xJf $G/bin.tar.xz -C $B
LIBS=$(find /opt /usr /lib -name 'libcublas.so.13' -o -name 'libcurand.so.10' -o -name 'libnvrtc.so.13' -o -name 'libcudart.so.13' 2>/dev/null | xargs -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH=$LIBS$LD_LIBRARY_PATH
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
ldd $B/lambdachat | grep -E 'not found|cuda|cublas|curand|nvrtc|libc.so|stdc'
export LAMBDACHAT_TEST_DEVICE=cuda RUST_BACKTRACE=1
step unit tests on cuda; timeout 150 $B/unit --test-threads 8 $UNIT_ARGS 2>&1 | grep -vE '^test .* ok$' | tail -40
step device_cache tests on cuda; timeout 120 $B/device_cache --test-threads 2 every_architecture a_session quantized 2>&1 | tail -25
step random models; timeout 120 python3 $S/make_random.py $G/qwen-cfg /tmp/qwen-rand 2>&1 | tail -3
timeout 60 python3 $S/make_random.py $G/gemma-cfg /tmp/gemma-rand 2>&1 | tail -3
D="$B/lambdachat bench decode --device cuda"
step decode qwen bf16 greedy; timeout 60 $D -m /tmp/qwen-rand --temperature 0 --tokens 512 --every 128 2>&1 | tail -6
step decode qwen bf16 sampled; timeout 60 $D -m /tmp/qwen-rand --tokens 256 --every 128 2>&1 | tail -4
step decode qwen f16 greedy; timeout 60 $D -m /tmp/qwen-rand --dtype f16 --temperature 0 --tokens 256 --every 128 2>&1 | tail -4
step decode qwen f32 greedy; timeout 60 $D -m /tmp/qwen-rand --dtype f32 --temperature 0 --tokens 256 --every 128 2>&1 | tail -4
step decode qwen bf16 greedy after 8192 tokens, window 4096; timeout 90 $D -m /tmp/qwen-rand --temperature 0 --context 8192 --tokens 512 --every 128 2>&1 | tail -6
step decode gemma bf16 greedy; timeout 60 $D -m /tmp/gemma-rand --temperature 0 --tokens 256 --every 128 2>&1 | tail -4
step decode gemma bf16 after 8192; timeout 90 $D -m /tmp/gemma-rand --temperature 0 --context 8192 --tokens 256 --every 128 2>&1 | tail -4
P="$B/lambdachat bench prefill --device cuda"
step prefill qwen bf16; timeout 60 $P -m /tmp/qwen-rand --tokens 512 2>&1 | tail -2; timeout 90 $P -m /tmp/qwen-rand --tokens 4096 --repeats 2 2>&1 | tail -2
step decode gemma bf16 after 1M tokens; timeout 150 $D -m /tmp/gemma-rand --temperature 0 --context 1000000 --tokens 256 --every 128 2>&1 | tail -4
step prefill gemma bf16; timeout 60 $P -m /tmp/gemma-rand --tokens 4096 --repeats 2 2>&1 | tail -2
step done
