#!/usr/bin/env python3
"""lambdachat against llama.cpp on this machine: same GGUF, same thread count, one run.

Prints the table of docs/PERFORMANCE.md: prefill (pp512, pp4096) and decode at depth 0, 4096
and 8192 (llama-bench's -d; lambdachat's --context, window n_local 4096), with the ratios.
llama.cpp is built the first time from llama-cpp-python's source package (its vendor/llama.cpp,
CPU only, native flags without AMX) into ~/.cache/lambdachat/llama.cpp.

    scripts/bench_compare.py [--model default|gemma3-270m|qwen2.5-coder-1.5b] [--threads 2] [--long]

Each figure is the mean over all runs of its side; the two sides alternate, two rounds each.

--long adds lambdachat's decode at token 100,000 (a 100K-token prefill first: minutes).
"""
import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = pathlib.Path(os.environ.get("LLAMA_CPP_DIR", pathlib.Path.home() / ".cache/lambdachat/llama.cpp"))
LLAMA_CPP_PYTHON = "0.3.36"


def run(cmd, **kw):
    print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE, **kw).stdout


def llama_bench():
    exe = CACHE / "build/bin/llama-bench"
    if exe.exists():
        return exe
    CACHE.mkdir(parents=True, exist_ok=True)
    index = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/").read().decode()
    url = re.search(rf'https://[^"#]*llama_cpp_python-{LLAMA_CPP_PYTHON}\.tar\.gz', index).group(0)
    archive = CACHE / "src.tar.gz"
    urllib.request.urlretrieve(url, archive)
    with tarfile.open(archive) as t:
        t.extractall(CACHE / "src")
    src = CACHE / f"src/llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp"
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_AMX_TILE=OFF",
             "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF", "-DLLAMA_CURL=OFF"]
    run(["cmake", "-S", src, "-B", CACHE / "build", *flags])
    run(["cmake", "--build", CACHE / "build", "--target", "llama-bench", "-j", str(os.cpu_count())])
    return exe


ROUNDS = 2


def mean(xs):
    return sum(xs) / len(xs)


def llama(exe, model, threads, args):
    out = run([exe, "-m", model, "-t", str(threads), "-r", "2", "-o", "json", *args])
    return json.loads(out)


def ours(lc, model, threads, args):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), CANDLE_NUM_THREADS=str(threads))
    out = run([lc, *args, "--model", model, "--json"], env=env)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--long", action="store_true")
    a = p.parse_args()
    run(["cargo", "build", "--release", "-q"], cwd=ROOT)
    lc = ROOT / "target/release/lambdachat"
    run([lc, "models", "pull", a.model])
    model = run([lc, "models", "path", a.model]).strip()
    exe = llama_bench()
    rows = []
    # Both sides run ROUNDS times, alternating, and each side's figure is the mean of all its
    # runs (llama-bench's samples, our runs): a neighbour's burst hits both, and no side gets
    # its best set against the other's average.
    for n in (512, 4096):
        theirs, mine = [], []
        for _ in range(ROUNDS):
            theirs += llama(exe, model, a.threads, ["-p", str(n), "-n", "0"])[0]["samples_ts"]
            mine += ours(lc, model, a.threads, ["bench", "prefill", "--tokens", str(n), "--repeats", "2" if n <= 512 else "1"])[-1]["runs"]
        rows.append((f"prefill pp{n}", mean(mine), mean(theirs)))
    for depth in (0, 4096, 8192):
        theirs, mine = [], []
        for _ in range(ROUNDS):
            theirs += llama(exe, model, a.threads, ["-p", "0", "-n", "128", "-d", str(depth)])[0]["samples_ts"]
            mine.append(ours(lc, model, a.threads, ["bench", "decode", "--tokens", "128", "--every", "128",
                                                    "--context", str(depth), "--temperature", "0"])[-1]["tok_s"])
        rows.append((f"decode tg128 at depth {depth}", mean(mine), mean(theirs)))
    if a.long:
        mine = ours(lc, model, a.threads, ["bench", "decode", "--tokens", "128", "--every", "128",
                                           "--context", "100000", "--temperature", "0"])[-1]["tok_s"]
        rows.append(("decode tg128 at token 100,000 (lambdachat only)", mine, None))
    print(f"\n{pathlib.Path(model).name}, {a.threads} threads, means over all runs\n")
    print("| test | lambdachat tok/s | llama.cpp tok/s | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for name, mine, theirs in rows:
        ratio = f"{mine / theirs:.2f}×" if theirs else "—"
        print(f"| {name} | {mine:.1f} | {theirs:.1f} | {ratio} |" if theirs else f"| {name} | {mine:.1f} | — | — |")


if __name__ == "__main__":
    main()
