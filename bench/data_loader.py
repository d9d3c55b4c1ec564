"""The data loader on a synthetic binidx corpus: start-up time, loader tokens/s alone and
anonymous memory (RssAnon: RSS also counts the memmap's touched file pages), for our random
windows and RWKV-LM's sampler. Prints a markdown table.

    python bench/data_loader.py [--tokens 1e9] [--dir /tmp/binidx_bench] [--batch 16] [--ctx 1024]

The corpus is written once (uint16 random ids, one document per 4096 tokens) and reused.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from rwkv_jax.data.binidx import BinIdx, write_binidx
from rwkv_jax.data.sources import Batches


def rss_anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_corpus(prefix: str, tokens: int, doc: int = 4096) -> None:
    if os.path.exists(prefix + ".idx"):
        return
    rng = np.random.default_rng(0)
    n_docs = tokens // doc

    def docs():
        for _ in range(n_docs):
            yield rng.integers(1, 65535, doc, dtype=np.uint16)

    t = time.perf_counter()
    write_binidx(prefix, docs(), dtype=np.uint16)
    print(f"wrote {n_docs * doc:,} tokens in {time.perf_counter() - t:.1f} s", flush=True)


def measure(prefix: str, sampler: str, batch: int, ctx: int, steps: int) -> dict:
    base = rss_anon_mib()
    t = time.perf_counter()
    source = BinIdx(prefix)
    batches = Batches([(source, 1.0)], sampler=sampler, seed=0, batch_size=batch, seq_len=ctx)
    startup = time.perf_counter() - t
    t = time.perf_counter()
    for step in range(steps):
        x, y, _ = batches(step)
    elapsed = time.perf_counter() - t
    return {"sampler": sampler, "tokens": source.num_tokens, "startup_s": startup,
            "tokens_per_s": steps * batch * ctx / elapsed,
            "rss_anon_mib": rss_anon_mib() - base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=float, default=1e9)
    p.add_argument("--dir", default="/tmp/binidx_bench")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    prefix = os.path.join(args.dir, f"synthetic_{int(args.tokens)}")
    make_corpus(prefix, int(args.tokens))
    print("| corpus tokens | sampler | start-up s | loader tokens/s | RssAnon growth MiB |")
    print("|---|---|---|---|---|")
    for sampler in ("random", "rwkv_lm"):
        r = measure(prefix, sampler, args.batch, args.ctx, args.steps)
        print(f"| {r['tokens']:,} | {sampler} | {r['startup_s']:.4f} | {r['tokens_per_s']:,.0f} "
              f"| {r['rss_anon_mib']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
