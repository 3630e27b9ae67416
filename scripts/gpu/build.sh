#!/usr/bin/env bash
# Builds the CUDA binaries for a GPU check on a machine WITHOUT a GPU or a CUDA toolkit (how
# lambdachat's GPU figures were made), and packs them with what scripts/gpu/run.sh needs into
# .gpu/ (ignored by git). On a machine with the toolkit, `cargo build --release --features
# cuda` is all it takes; this script only stands in for the toolkit:
#   - nvcc, headers and libraries of CUDA 13.0 from PyPI (the driver of the target machine must
#     be 13.0 or newer: PTX from a newer nvcc does not load on an older driver);
#   - a stub libcuda.so (the driver library; the real one is loaded on the GPU machine);
#   - `target-cpu=x86-64-v3` instead of `native`, since the binaries run on another CPU.
# Usage: scripts/gpu/build.sh [compute capability, default 90 (H100/H200)]
set -euo pipefail
cd "$(dirname "$0")/../.."
CAP=${1:-90}
TOOLKIT=${CUDA_STANDIN:-$HOME/.cache/lambdachat/cuda13}
if [ ! -x "$TOOLKIT/home/bin/nvcc" ]; then
    python3 -m pip install -q --target "$TOOLKIT/site" nvidia-cuda-nvcc==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
        nvidia-cuda-cccl==13.0.85 "nvidia-cublas>=13.0,<13.1" "nvidia-curand>=10.4.0,<10.4.1" \
        nvidia-cuda-nvrtc==13.0.88
    N=$TOOLKIT/site/nvidia/cu13
    mkdir -p "$TOOLKIT/home/lib64" "$TOOLKIT/home/stubs"
    for d in bin include nvvm; do ln -sfn "$N/$d" "$TOOLKIT/home/$d"; done
    for f in "$N"/lib/*.so.*; do
        b=$(basename "$f"); ln -sf "$f" "$TOOLKIT/home/lib64/$b"; ln -sf "$f" "$TOOLKIT/home/lib64/${b%%.so*}.so"
    done
    # Every driver entry point cudarc links against, as empty functions.
    CUDARC=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19.* | tail -1)
    grep -oE '^\s+fn (cu[A-Za-z0-9_]+)\(' "$CUDARC/src/driver/sys/mod.rs" | sed -E 's/^\s+fn //; s/\($//' |
        sort -u | awk '{print "void " $1 "(void) {}"}' > "$TOOLKIT/home/stubs/cuda_stub.c"
    gcc -shared -fPIC -o "$TOOLKIT/home/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$TOOLKIT/home/stubs/cuda_stub.c"
    ln -sf "$TOOLKIT/home/stubs/libcuda.so" "$TOOLKIT/home/lib64/libcuda.so"
fi
export RUSTFLAGS="-C target-cpu=x86-64-v3" CUDA_HOME=$TOOLKIT/home PATH=$TOOLKIT/home/bin:$PATH \
    CUDA_COMPUTE_CAP=$CAP LIBRARY_PATH=$TOOLKIT/home/lib64
T=${CUDA_TARGET_DIR:-target-cuda}
cargo build --release --features cuda --target-dir $T
tests=$(cargo test --release --features cuda --target-dir $T --no-run --lib --test device_cache 2>&1 |
    grep -oE '\(([^)]+)\)' | tr -d '()')
mkdir -p .gpu/bin
cp $T/release/lambdachat .gpu/bin/lambdachat
for t in $tests; do
    case $t in */lambdachat-*) cp "$t" .gpu/bin/unit ;; */device_cache-*) cp "$t" .gpu/bin/device_cache ;; esac
done
strip .gpu/bin/*
tar cJf .gpu/bin.tar.xz -C .gpu/bin . && rm -r .gpu/bin
# Shapes of the two benchmark models (config + tokenizer; the weights are made on the GPU), by
# the CPU build (the CUDA one needs a driver to start).
env -u RUSTFLAGS -u CUDA_HOME cargo build --release
for m in qwen:default gemma:gemma3-270m; do
    name=${m%%:*}
    [ -d ".gpu/$name-cfg" ] && continue
    ./target/release/lambdachat models pull "${m#*:}" >/dev/null
    tmp=$(mktemp -d)/model
    ./target/release/lambdachat convert "$(./target/release/lambdachat models path "${m#*:}")" "$tmp" >/dev/null
    mkdir -p ".gpu/$name-cfg"
    cp "$tmp"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json} ".gpu/$name-cfg/"
    rm -r "$(dirname "$tmp")"
done
du -sh .gpu
echo "now, on the GPU machine, from the repo root (with .gpu carried): bash scripts/gpu/run.sh"
