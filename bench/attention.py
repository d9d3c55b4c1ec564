"""Attention-layer cost of chunked training: a chunk alone (causal) versus a chunk that also
sees the previous chunk's KV window (an explicit mask), per implementation.

    python bench/attention.py [--b 8 --t 1024 --w 1024 --h 20 --n 128]

Prints forward and forward+backward median ms for cuDNN and XLA, bf16.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed(fn, *args, reps=10):
    import jax  # noqa: PLC0415

    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(out)


def main():
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from rwkv_jax.nn.attention import window_mask  # noqa: PLC0415

    ap = argparse.ArgumentParser()
    for name, default in (("b", 8), ("t", 1024), ("w", 1024), ("h", 20), ("n", 128)):
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args()
    k0, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(k0, (a.b, a.t, a.h, a.n), jnp.bfloat16)
    kv = jax.random.normal(k1, (a.b, a.w + a.t, a.h, a.n), jnp.bfloat16)
    vv = jax.random.normal(k2, (a.b, a.w + a.t, a.h, a.n), jnp.bfloat16)
    mask = window_mask(jnp.full((a.b,), a.w, jnp.int32), a.t, a.w)

    def causal(impl):
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k[:, a.w:], v[:, a.w:], is_causal=True, local_window_size=(a.w, 0), implementation=impl)

    def windowed(impl):
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)

    rows = []
    for name, make in (("chunk alone, causal", causal), ("chunk + KV window, mask", windowed)):
        for impl in ("cudnn", "xla"):
            f = make(impl)
            loss = lambda q, k, v, f=f: jnp.sum(f(q, k, v).astype(jnp.float32))  # noqa: E731
            try:
                fwd = timed(jax.jit(f), q, kv, vv)
                bwd = timed(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), q, kv, vv)
                rows.append((name, impl, f"{fwd:.2f}", f"{bwd:.2f}"))
            except Exception as e:  # noqa: BLE001 - report what does not run
                rows.append((name, impl, "fails", str(e).splitlines()[0][:60]))
    print(f"B{a.b} T{a.t} W{a.w} H{a.h} N{a.n} bf16 on {jax.devices()[0].device_kind}")
    print("| attention | impl | fwd ms | fwd+bwd ms |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
