#!/usr/bin/env bash
# Cross-compiles lambdachat's library tests for 64-bit ARM Linux and runs them under qemu-user:
# the scalar matrix kernels and the portable attention code (there is no NEON path yet) on an
# ARM instruction set, from an x86-64 machine.
#
#   scripts/cross_aarch64.sh [TEST FILTER…]      default: kernels:: attention::
#
# Needs Debian's gcc- and g++-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user
# (installed here with apt-get when missing and root), and rustup's aarch64-unknown-linux-gnu
# target (added when missing). The build goes to target/aarch64/.
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-unknown-linux-gnu
packages=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)
if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y "${packages[@]}"
    else
        echo "needs ${packages[*]} (Debian packages): install them, then run this again" >&2
        exit 1
    fi
fi
rustup target list --installed | grep -qx "$target" || rustup target add "$target"

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar

filters=("$@")
[ ${#filters[@]} -eq 0 ] && filters=(kernels:: attention::)
cargo test --release --locked --target "$target" --target-dir target/aarch64 --lib -- "${filters[@]}"
