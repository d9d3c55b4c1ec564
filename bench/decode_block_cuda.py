"""A hand-written CUDA RWKV-4 decode kernel (rwkv_jax/ops/cuda/decode4_block.cuh, through
bench/cuda/decode_block.cu) against the card's read rate: how close one cooperative kernel per
block, or per run of blocks, gets to the memory floor at batch 1, and where the rest goes.

    python3 bench/decode_block_cuda.py [--model 3B] [--layers 1,32] [--window 2] [--depth 0]

Needs nvcc and an NVIDIA GPU of compute capability 9.0 or newer (bulk copies, mbarriers); no
JAX. Builds four programs with nvcc and prints four tables:
  stream      1 GiB read by one CTA per SM: the bulk copy engine into a ring of D stages of S
              bytes (the kernel's scheme), and plain 16-byte loads (bench/cuda/stream.cu)
  block       a 32-layer model of the size's blocks (4 weight sets in turn, more than L2 holds),
              10 tokens in one CUDA graph, 1 or more layers a launch: us per block, GB/s of
              weights, x the floor at the best streaming rate. Checked against a host reference
              with the kernel's roundings, before and after the timed launches: one layer from
              the host inputs (the worst max |error| / max |value|, and the fraction of elements
              off by more than float noise), and one launch of 4 layers (max error only: a
              rounding flip in one layer moves every later value a little)
  no math     the same kernel with the products' arithmetic skipped: streaming, norms and
              exchanges alone
  timeline    one launch of builds that record each CTA's phase times (%globaltimer) in its
              second layer (the steady state): min / mean / max over CTAs
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from decode import MODELS  # noqa: E402  bench/decode.py

# A product whose float sum lands on the other side of a bf16 rounding boundary moves by one
# bf16 ulp (up to 2^-7 of itself): rare, and small against the largest value, but it travels:
# one such key in layer 1 of the 2-row run moved 12.5% of that layer's x by more than float
# noise (2026-12-01). A rounding missed or added moves nearly all of them (97% in a CPU test).
# A flip early in the time-mix travels further: at n_embd 3072 (the most six warps take) a few
# phase-0 keys and values flipped (0.4% of aa and bb off, LN1's output matching) and put 54% of
# the layer's x off by at most 2.2e-3 (H200, session 13). The norms are no longer a cause: the
# reference sums them in the kernel's order, where in double it had put 50.8% of a 169M layer
# off for 4, 6 and 8 warps (session 12); in the kernel's order none is (max error 8e-8).
MAX_ERROR, MAX_OFF = 1e-2, 0.75


def nvcc() -> str:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in (home and os.path.join(home, "bin", "nvcc"), shutil.which("nvcc"),
                 "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand):
            return cand
    raise SystemExit("nvcc (CUDA's compiler) not found in $CUDA_HOME/bin, on PATH or in "
                     "/usr/local/cuda/bin: this benchmark builds CUDA programs")


def arch() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"no NVIDIA GPU found (nvidia-smi: {e})") from None
    if not out:
        raise SystemExit("no NVIDIA GPU found (nvidia-smi lists none)")
    major, minor = out[0].split(".")
    if int(major) < 9:
        raise SystemExit(f"compute capability {out[0]}: the kernels need 9.0 or newer (bulk "
                         "copies into shared memory)")
    return f"{major}{minor}"


def build(out: str, sm: str, consumers=(), defines=()) -> dict:
    cc = nvcc()
    flags = [cc, "-O3", "-std=c++17", f"-gencode=arch=compute_{sm},code=sm_{sm}"]
    block = os.path.join(HERE, "cuda", "decode_block.cu")
    # Timings come from the builds without the timeline's timer stores and extra barriers.
    jobs = {"block": (block, []), "nomath": (block, ["-DRWKV_NOCOMPUTE"]),
            "trace": (block, ["-DRWKV_TRACE"]),
            "trace_nomath": (block, ["-DRWKV_TRACE", "-DRWKV_NOCOMPUTE"]),
            "stream": (os.path.join(HERE, "cuda", "stream.cu"), [])}
    for n in consumers:
        jobs[f"block_c{n}"] = (block, [f"-DRWKV_CONSUMERS={n}"])
    for d in defines:
        jobs[f"block_{d}"] = (block, [f"-D{kv}" for kv in d.split(",")])

    def one(name):
        src, extra = jobs[name]
        exe = os.path.join(out, name)
        done = subprocess.run([*flags, *extra, src, "-o", exe], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"building {name} failed:\n{done.stderr[-3000:]}")
        return name, exe

    with ThreadPoolExecutor(len(jobs)) as pool:
        return dict(pool.map(one, jobs))


def run(exe: str, *args) -> list[list[str]]:
    cmd = [exe, *map(str, args)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{' '.join(cmd)} ran past 300 s (a hang?)") from None
    lines = [line.split() for line in done.stdout.splitlines() if line.strip()]
    if done.returncode or any(line[0] == "error" for line in lines):
        raise SystemExit(f"{os.path.basename(exe)} {' '.join(map(str, args))} failed:\n"
                         f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="3B", choices=sorted(MODELS))
    ap.add_argument("--out", default="/tmp/decode_block_cuda", help="where the programs go")
    ap.add_argument("--layers", default="1,32", type=lambda v: [int(p) for p in v.split(",")],
                    help="layers a launch to time (1: a launch per block, as through JAX before "
                         "whole runs; 32: the 32-layer model in one)")
    ap.add_argument("--window", default="2", type=lambda v: [int(p) for p in v.split(",")],
                    help="limits on the stages in flight per SM to time (0: the ring's free "
                         "slots)")
    ap.add_argument("--depth", default="0", type=lambda v: [int(p) for p in v.split(",")],
                    help="ring depths to time, in stages (0: as many as fit in shared memory, "
                         "up to the kernel's kMaxDepth)")
    ap.add_argument("--consumers", default="", type=lambda v: [int(p) for p in v.split(",") if p],
                    help="also time kernels built with these many consumer warps (5 otherwise)")
    ap.add_argument("--define", nargs="*", default=[],
                    help="also time kernels built with these macros, one build each: "
                         "NAME=VALUE[,NAME=VALUE] (RWKV_MAX_STAGE_ROWS=3, RWKV_MAX_DEPTH=16, "
                         "RWKV_STAGE_KB=16)")
    a = ap.parse_args()
    bad = [d for d in a.define
           if not re.fullmatch(r"RWKV_[A-Z_]+=\d+(,RWKV_[A-Z_]+=\d+)*", d)]
    if bad:
        ap.error(f"--define {bad}: each must be NAME=INTEGER[,NAME=INTEGER], names RWKV_...")
    if any(not 1 <= n <= 16 for n in a.consumers):
        ap.error(f"--consumers {a.consumers}: 1..16 warps")
    if any(not 1 <= n <= 40 for n in a.layers):
        ap.error(f"--layers {a.layers}: layers a launch must be 1..40")
    if any(d < 0 for d in a.depth):
        ap.error(f"--depth {a.depth}: 0 (as deep as fits) or more stages")
    if any(w < 0 for w in a.window):
        ap.error(f"--window {a.window}: limits must be 0 (none) or more stages")
    _, C, _ = MODELS[a.model]
    F = 4 * C
    os.makedirs(a.out, exist_ok=True)
    exes = build(a.out, arch(), a.consumers, a.define)
    weight_bytes = 2 * (3 * C * C + C * C + (F + C) * C + C * F)

    stream = run(exes["stream"])
    best = max(float(line[-1]) for line in stream)  # GB/s
    floor_us = weight_bytes / (best * 1e3)
    print(f"\n{a.model} block (C{C}, F{F}): {weight_bytes / 1e6:.1f} MB of weights; best "
          f"streaming rate {best:,.0f} GB/s, so the floor is {floor_us:.1f} us\n")
    print("| stream 1 GiB, one CTA per SM | GB/s |\n|---|---|")
    for line in stream:
        label = (f"bulk copies, {int(line[2])} x {int(line[1]) // 1024} KB stages"
                 if line[0] == "tma" else f"16-byte loads, {line[1]} threads")
        print(f"| {label} | {float(line[-1]):,.0f} |")

    rows = []
    failed = False

    def block(B, W, N, D, exe="block"):
        nonlocal failed
        out = run(exes[exe], C, F, B, W, N, D)
        us = float(next(line for line in out if line[0] == "us_per_block")[1])
        if exe == "nomath":
            return us, "-", "-"

        def worst(kind):  # (name, error, off) triples after the kind
            lines = [line[1:] for line in out if line[0] == kind]
            return (max(float(c[i + 1]) for c in lines for i in range(0, len(c), 3)),
                    max(float(c[i + 2]) for c in lines for i in range(0, len(c), 3)))

        err, off = worst("check")
        chain, _ = worst("check_chain")
        bad = not (err <= MAX_ERROR and off <= MAX_OFF and chain <= MAX_ERROR)  # NaN fails
        failed |= bad
        return us, f"{err:.1e} / {off:.3f}", f"{chain:.1e}{' FAIL' if bad else ''}"

    def row_label(B, W, N, D, what="kernel"):
        how = [f"at most {W} stages in flight"] if W else ["ring only"]
        how.append(f"{N} layer{'s' if N > 1 else ''} a launch")
        if D:
            how.append(f"a ring of at most {D}")
        return f"{what}, {B} row{'s' if B > 1 else ''}, {', '.join(how)}"

    best, best_us = (a.window[0], a.layers[0], a.depth[0]), float("inf")
    for W in a.window:
        for N in a.layers:
            for D in a.depth:
                us, err, chain = block(1, W, N, D)
                rows.append((row_label(1, W, N, D), us, err, chain))
                if us < best_us:
                    best, best_us = (W, N, D), us
    rows.append((row_label(2, *best), *block(2, *best)))
    for n in a.consumers:
        for N in a.layers:
            rows.append((row_label(1, best[0], N, best[2], f"kernel with {n} consumer warps"),
                         *block(1, best[0], N, best[2], f"block_c{n}")))
    for d in a.define:
        for W in a.window:
            for D in a.depth:
                rows.append((row_label(1, W, best[1], D, f"kernel built with {d}"),
                             *block(1, W, best[1], D, f"block_{d}")))
    for N in sorted({1, best[1]}):
        rows.append((row_label(1, best[0], N, best[2], "products' arithmetic skipped (streaming, "
                               "norms, exchanges)"), *block(1, best[0], N, best[2], "nomath")))
    print("\n| variant | us / block | GB/s of weights | x floor | one layer: max error / "
          "fraction off | 4 layers in a launch: max error |\n|---|---|---|---|---|---|")
    for label, us, err, chain in rows:
        print(f"| {label} | {us:.1f} | {weight_bytes / us / 1e3:,.0f} | {us / floor_us:.2f} | "
              f"{err} | {chain} |")

    trace = run(exes["trace"], C, F, 1, *best)
    trace_nomath = run(exes["trace_nomath"], C, F, 1, *best)
    print(f"\nOne launch, {row_label(1, *best, 'the fastest')}, its second layer (the only one "
          "at 1 a launch): us since the first CTA began it (min / mean / max over CTAs)\n")
    print("| event | with math | no math |\n|---|---|---|")
    nm = {line[1]: line[2:] for line in trace_nomath if line[0] == "trace"}
    for line in trace:
        if line[0] == "trace":
            name, lo, mean, hi = line[1], *line[2:]
            other = nm.get(name, ["-"] * 3)
            print(f"| {name.replace('_', ' ')} | {lo} / {mean} / {hi} | "
                  f"{' / '.join(other)} |")
    if failed:
        raise SystemExit(f"the block kernel differs from the host reference (allowed: max "
                         f"error {MAX_ERROR}, fraction off {MAX_OFF})")


if __name__ == "__main__":
    main()
