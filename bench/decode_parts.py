"""Where a batch-1 decode step's time goes on the CUDA path: the layers kernel, the head, the
rest of the step on the device, and what a generate call costs besides its steps.

    python3 bench/decode_parts.py --models 1.5B,169M      # GPU machine (Hopper, nvcc)

For each model (random official-format weights in bf16, as bench/decode.py makes them),
Generator(decode_kernels="cuda"), one row, greedy, each part n times in one jitted loop:
- step: one decode block of n steps (the generator's, one launch);
- layers: the layers kernel alone (rwkv_jax.ops.cuda.decode4.layers_step over every block);
- head: ln_out, the head's product and the argmax, as the step runs them through XLA, the
  head as rows (V, C) as the CUDA layout has it, and as columns (C, V), the official layout;
- generate calls of 1, 100 and 400 new tokens from a state, wall clock: the slope is the
  per-token cost of the real loop, the intercept what a call costs besides its tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def best_of(f, *args, reps: int = 3) -> float:
    """Best seconds of f(*args) over reps calls after a warm-up call, outputs waited for."""
    import jax  # noqa: PLC0415

    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t)
    return best


def run_model(name: str, n: int, tmp: str) -> dict:
    import flax.linen as nn  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from decode import (MODELS, copy_bandwidth, greedy_block_inputs, load_params,  # noqa: PLC0415
                        make_pth, time_bare_blocks)
    from rwkv_jax.config import ModelConfig  # noqa: PLC0415
    from rwkv_jax.generate import Generator  # noqa: PLC0415
    from rwkv_jax.decode_weights import head_rows_layout  # noqa: PLC0415
    from rwkv_jax.ops.cuda import decode4  # noqa: PLC0415

    L, C, V = MODELS[name]
    pth = os.path.join(tmp, f"parts_{name}.pth")
    gpu = jax.default_backend() == "gpu"
    make_pth(pth, L, C, V, "cuda" if gpu else "cpu", "float16" if gpu else "float32")
    params, dims = load_params(pth, jnp.bfloat16)  # (bf16: what the CUDA kernel reads)
    os.remove(pth)
    weights = sum(x.nbytes for x in jax.tree.leaves(params)) - params["emb"]["embedding"].nbytes
    out = {"model": name, "floor_ms": 1e3 * weights / copy_bandwidth()}
    config = ModelConfig(**dims, dtype="bfloat16")
    gen = Generator(config, params, decode_rows=1, decode_kernels="cuda")
    del params
    p = gen.params
    prompt = np.random.default_rng(1).integers(0, V, 64).tolist()
    state = gen.feed([prompt])

    block, carry, rest = greedy_block_inputs(gen, state, [prompt[-1]], n)
    _, per_call, _ = time_bare_blocks(gen, block, carry, rest, 3)  # the carry is donated
    out["step_ms"] = 1e3 * per_call / n

    eps = config.layer_norm_eps
    blocks = [p[f"blocks_{i}"] for i in range(L)]
    x0 = jax.random.normal(jax.random.PRNGKey(0), (1, C), jnp.float32)

    @jax.jit
    def layers(blocks, x, states):
        return jax.lax.fori_loop(
            0, n, lambda _, c: tuple(decode4.layers_step(blocks, *c, eps=eps)), (x, states))

    states = [dict(s) for s in state["layers"]]  # (not donated: the loop's own copies)
    out["layers_ms"] = 1e3 * best_of(layers, blocks, x0, states) / n

    ln_out = nn.LayerNorm(epsilon=eps, dtype=jnp.float32)  # the model's ln_out

    @jax.jit
    def head(p, x):
        def body(_, x):
            xn = ln_out.apply({"params": p["ln_out"]}, x).astype(jnp.bfloat16)
            if "kernel_t" in p["head"]:  # rows (V, C): the CUDA layout's
                logits = xn @ p["head"]["kernel_t"].T
            else:  # columns (C, V): the official layout's
                logits = xn @ p["head"]["kernel"]
            token = jnp.argmax(logits.astype(jnp.float32), axis=-1)
            return x + 1e-3 * p["emb"]["embedding"][token].astype(jnp.float32)  # a dependency
        return jax.lax.fori_loop(0, n, body, x)

    rows = head_rows_layout(p)["head"]["kernel_t"]
    parts = {"ln_out": p["ln_out"], "emb": p["emb"], "head": {"kernel_t": rows}}
    out["head_ms"] = 1e3 * best_of(head, parts, x0) / n
    out["head_columns_ms"] = 1e3 * best_of(head, {**parts, "head": {"kernel": rows.T}}, x0) / n
    out["head_GBps"] = rows.nbytes / (out["head_ms"] * 1e6)

    # A call launches its first block on buffers it has just made (the state's copy, the small
    # inputs), the later ones on the buffers the block before wrote (donated): the difference
    # is what new buffers cost a launch (its CUDA graph rewritten for them, if that is it).
    K = gen.decode_block
    blockk, carry, rest = greedy_block_inputs(gen, state, [prompt[-1]], K)
    times = {"same": [], "fresh": []}
    for i in range(7):
        if i % 2:
            carry = greedy_block_inputs(gen, state, [prompt[-1]], K)[1]
        t = time.perf_counter()
        carry, o = blockk(p, carry, *rest)
        o.block_until_ready()
        if i:
            times["fresh" if i % 2 else "same"].append(time.perf_counter() - t)
    out["block_fresh_ms"], out["block_same_ms"] = (1e3 * min(times[k]) for k in ("fresh", "same"))

    gen.generate([prompt[-1]], state=state, max_new_tokens=4)  # compiles
    for k in (1, 100, 400):
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            assert len(gen.generate([prompt[-1]], state=state, max_new_tokens=k).tokens[0]) == k
            best = min(best, time.perf_counter() - t)
        out[f"generate_ms_{k}"] = 1e3 * best
    out["loop_ms"] = (out["generate_ms_400"] - out["generate_ms_100"]) / 300
    out["call_ms"] = out["generate_ms_100"] - 100 * out["loop_ms"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="1.5B,169M")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--tmp", default="/tmp")
    a = p.parse_args()
    rows = []
    for name in a.models.split(","):
        rows.append(run_model(name, a.steps, a.tmp))
        print(rows[-1], flush=True)
    print("\n| model | floor ms | step ms (device) | layers kernel ms | ln_out + head + argmax ms "
          "(head GB/s) | the same, head as columns | the rest ms | generate: ms a token (slope, 100 -> 400) | a call's "
          "own ms | generate(1) ms | a block of 16 steps ms: new buffers / its own |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rest = r["step_ms"] - r["layers_ms"] - r["head_ms"]
        print(f"| {r['model']} | {r['floor_ms']:.3f} | {r['step_ms']:.3f} | {r['layers_ms']:.3f} | "
              f"{r['head_ms']:.3f} ({r['head_GBps']:,.0f}) | {r['head_columns_ms']:.3f} | {rest:.3f} | {r['loop_ms']:.3f} | "
              f"{r['call_ms']:.1f} | {r['generate_ms_1']:.1f} | {r['block_fresh_ms']:.2f} / "
              f"{r['block_same_ms']:.2f} |")


if __name__ == "__main__":
    main()
