"""The decode kernels (rwkv_jax.ops.pallas.decode4) against XLA's decode step, block by block.

    python3 bench/decode_kernels.py [--model 3B] [--layers 4] [--rows 1,2]
                                   [--configs 8,512,4,3 16,256,4,3 ...]
                                   [--xla_options '' xla_gpu_enable_pdl=true ...]

A stack of `--layers` RWKV-4 blocks of a model's shape with random bf16 weights (more bytes
than the L2 holds, as in a whole model), one token per row through every block, the step
repeated `--steps` times inside one jitted loop compiled as one CUDA graph (the way
rwkv_jax.generate runs it), so the time is the device's alone. Rows:
  XLA grouped   RWKVBlock on the grouped layout (rwkv_jax.layers.group_products), the
                generator's default decode path; batch 1 padded to 2 rows, as it does on GPUs;
                one row per --xla_options set (XLA compile options on top of the loop's)
  kernels B,K,W,S   decode4.block_step with Config(block_n=B, block_k=K, warps=W, stages=S)
  CUDA          (--cuda) rwkv_jax.ops.cuda.decode4: a launch a block (block_step), and the
                whole stack in one launch (layers_step, what rwkv_jax.model does)
With --check, each variant first runs three steps from the same rows and state, and its x and
state are compared with the first variant's (max |difference| / max |value|, worst layer; more
than CHECK_TOLERANCE fails the run).
Each row gives us per block, the bytes of a block's weights over that time, and that time
over the floor (the weights over the measured copy bandwidth). Prints a table last.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from decode import MODELS, copy_bandwidth  # noqa: E402  bench/decode.py
from rwkv_jax import layers  # noqa: E402
from rwkv_jax.config import ModelConfig  # noqa: E402
from rwkv_jax.generate import _loop_options, inference_params  # noqa: E402
from rwkv_jax.layers import RWKVBlock  # noqa: E402
from rwkv_jax.ops.cuda import decode4 as cuda_decode4  # noqa: E402
from rwkv_jax.ops.pallas import decode4  # noqa: E402
from rwkv_jax.state import zero_layer_state  # noqa: E402


def random_blocks(config: ModelConfig, n: int, seed: int = 0):
    """n blocks' parameters (official layout) at a sane scale, matrices in the compute dtype."""
    block = RWKVBlock(config, 1)
    x = jnp.zeros((1, 1, config.n_embd), jnp.float32)
    init = jax.jit(lambda k: block.init(k, x, None, jnp.zeros((1,), jnp.int32))["params"])
    out = []
    for i in range(n):
        p = init(jax.random.PRNGKey(seed + i))
        leaves, tree = jax.tree.flatten(p)
        keys = jax.random.split(jax.random.PRNGKey(1000 + i), len(leaves))
        leaves = [a + jax.random.normal(k, a.shape) * (a.shape[0] ** -0.5 if a.ndim == 2 else 0.1)
                  for a, k in zip(leaves, keys)]
        out.append(inference_params(jax.tree.unflatten(tree, leaves), jnp.dtype(config.dtype)))
    return out


def parse_options(spec: str) -> dict:
    """'name=value,...' -> XLA compile options ('true'/'false' become bools, digits ints)."""
    out = {}
    for item in filter(None, spec.split(",")):
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--xla_options: {item!r} is not name=value")
        low = value.lower()
        out[name] = low == "true" if low in ("true", "false") else (
            int(value) if value.isdigit() else value)
    return out


def best_of(f, *args, repeats: int = 3):
    """(best seconds of `repeats` calls of the jitted f, seconds of the first call (compile),
    the first call's output)."""
    t = time.perf_counter()
    out = jax.block_until_ready(f(*args))
    first = time.perf_counter() - t
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t)
    return best, first, out


# Variants agree to their products' rounding: bf16 (a rounding boundary crossed moves a value
# by up to 2^-7 of itself, and three steps through the stack carry it on) or float32.
CHECK_TOLERANCE = {"bfloat16": 3e-2, "float32": 1e-4}


def per_block(step):
    """A step through the whole stack from a step through one block."""

    def stack(blocks, x, states):
        new = []
        for p, s in zip(blocks, states):
            x, s = step(p, x, s)
            new.append(s)
        return x, tuple(new)

    return stack


def three_steps(stack, blocks, x, states, rows: int, options: dict | None = None):
    """x and every state after three steps through the stack (so that the state and the WKV
    terms are not all zero), their first `rows` rows (the rest is padding)."""

    def run(blocks, x, states):
        for t in range(3):
            x, states = stack(blocks, x * (1.0 + 0.1 * t), states)
            states = tuple(states)
        return x[:rows], jax.tree.map(lambda a: a[:rows], states)

    return jax.jit(run, compiler_options=options)(blocks, x, states)


def check_error(got, want) -> dict:
    """max |got - want| / max |want| for x and each state field (worst layer); NaN where got
    is not finite."""
    def err(g, w):
        e = float(jnp.max(jnp.abs(g - w)) / jnp.maximum(jnp.max(jnp.abs(w)), 1e-30))
        return e if bool(jnp.all(jnp.isfinite(g))) else float("nan")

    def worst(errors):  # NaN is the worst
        errors = list(errors)
        return float("nan") if any(e != e for e in errors) else max(errors)

    fields = {"x": err(got[0], want[0])}
    for name in got[1][0]:
        fields[name] = worst(err(g[name], w[name]) for g, w in zip(got[1], want[1]))
    return fields


def time_stack(stack, blocks, x, states, steps: int, options: dict | None = None):
    """Seconds per step of `steps` steps in one jitted loop (one CUDA graph on a GPU), and the
    compile time. `options` go on top of the generator's loop options."""

    def run(blocks, x, states):
        def body(_, carry):
            x, states = stack(blocks, *carry)
            return x, tuple(states)

        return jax.lax.fori_loop(0, steps, body, (x, states))

    opts = _loop_options()
    if options:
        opts = dict(opts or {}, **options)
    best, compile_s, _ = best_of(jax.jit(run, compiler_options=opts), blocks, x, states)
    return best / steps, compile_s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="3B", choices=sorted(MODELS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rows", default="1,2")
    ap.add_argument("--configs", nargs="*", default=["2,1024,4,3"],
                    help="block_n,block_k,warps,stages per kernel row")
    ap.add_argument("--no_xla", action="store_true")
    ap.add_argument("--cuda", action="store_true",
                    help="also the CUDA decode block (rwkv_jax.ops.cuda.decode4), 1-2 rows")
    ap.add_argument("--check", action="store_true",
                    help="compare three steps of every variant with the first variant's")
    ap.add_argument("--xla_options", nargs="*", default=[""],
                    help="XLA rows, one per option set 'name=value,...' on top of the "
                         "generator's loop options ('' = those alone)")
    ap.add_argument("--best", default=None, help="write the fastest tiling here (B,K,W,S)")
    a = ap.parse_args()
    if a.cuda:
        try:
            cuda_decode4.check_device()
        except cuda_decode4.Unavailable as e:
            raise SystemExit(f"--cuda: {e}") from None
    option_sets = [(spec, parse_options(spec)) for spec in a.xla_options]
    gpu = jax.default_backend() == "gpu"
    L, C, V = MODELS[a.model]
    config = ModelConfig(vocab_size=V, n_layer=L, n_embd=C,
                         dtype="bfloat16" if gpu else "float32")
    blocks = random_blocks(config, a.layers)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(blocks[0]))
    bw = copy_bandwidth()
    floor = weight_bytes / bw
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; {a.model} blocks: "
          f"{weight_bytes / 1e6:.1f} MB each, copy {bw / 1e9:,.0f} GB/s, floor {1e6 * floor:.1f} us",
          flush=True)
    stack = ModelConfig(vocab_size=V, n_layer=len(blocks), n_embd=C, dtype=config.dtype)
    named = {f"blocks_{i}": p for i, p in enumerate(blocks)}
    grouped = [layers.group_products(stack, named)[f"blocks_{i}"] for i in range(len(blocks))]
    kernel = [layers.kernel_layout(stack, named)[f"blocks_{i}"] for i in range(len(blocks))]
    cuda = []
    if a.cuda:
        try:
            fused = layers.cuda_layout(stack, named)
        except cuda_decode4.Unavailable as e:
            raise SystemExit(f"--cuda: {e}") from None
        cuda = [fused[f"blocks_{i}"] for i in range(len(blocks))]
    pos = None
    rows_out = []
    failed = False
    for rows in [int(r) for r in a.rows.split(",")]:
        variants = []
        if not a.no_xla:
            xla_rows = max(rows, 2) if gpu else rows
            block = RWKVBlock(config, 1)

            def xla_step(p, x, s, block=block):
                y, s = block.apply({"params": p}, x[:, None], s, pos)
                return y[:, 0], s

            for spec, options in option_sets:
                variants.append((f"XLA grouped ({xla_rows} rows){' ' + spec if spec else ''}",
                                 per_block(xla_step), grouped, xla_rows, options))
        for spec in a.configs:
            bn, bk, w, st = (int(v) for v in spec.split(","))
            cfg = decode4.Config(block_n=bn, block_k=bk, warps=w, stages=st)

            def k_step(p, x, s, cfg=cfg):
                return decode4.block_step(p, x, s, eps=config.layer_norm_eps, cfg=cfg)

            variants.append((f"kernels {spec}", per_block(k_step), kernel, rows, None))
        if cuda and rows <= cuda_decode4.MAX_ROWS:
            def c_step(p, x, s):
                return cuda_decode4.block_step(p, x, s, eps=config.layer_norm_eps)

            def c_stack(blocks, x, states):
                return cuda_decode4.layers_step(blocks, x, states, eps=config.layer_norm_eps)

            variants.append(("CUDA, a launch a block", per_block(c_step), cuda, rows, None))
            variants.append((f"CUDA, {len(cuda)} blocks a launch", c_stack, cuda, rows, None))
        reference = None
        # Distinct rows, the same first rows for every variant however many it pads to.
        xs = jax.random.normal(jax.random.PRNGKey(7), (max(v[3] for v in variants), C))
        for label, step, params, r, options in variants:
            pos = jnp.zeros((r,), jnp.int32)
            x = xs[:r]
            states = tuple(zero_layer_state(config, 1, r) for _ in blocks)
            try:
                if a.check:
                    got = three_steps(step, params, x, states, rows, options)
                    if reference is None:
                        reference = got
                    else:
                        errors = check_error(got, reference)
                        tol = CHECK_TOLERANCE[config.dtype]
                        bad = not all(e <= tol for e in errors.values())  # NaN fails too
                        failed |= bad
                        print(f"  B{rows} {label}: against {variants[0][0]}, max |difference| "
                              f"/ max |value|: "
                              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
                              + (" FAIL" if bad else ""), flush=True)
                per_step, compile_s = time_stack(step, params, x, states, a.steps, options)
            except Exception as e:  # noqa: BLE001 - a tiling that does not compile: say so
                print(f"  {label}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            us = 1e6 * per_step / a.layers
            row = (rows, label, us, weight_bytes / (us * 1e-6) / 1e9, us / (1e6 * floor), compile_s)
            rows_out.append(row)
            print(f"  B{rows} {label}: {us:.1f} us/block ({row[3]:,.0f} GB/s, {row[4]:.2f}x floor)"
                  f", compiled in {compile_s:.1f} s", flush=True)
    print(f"\n{a.model} block (L{L} C{C}), {a.layers} blocks per step, {a.steps} steps per "
          f"call; floor {1e6 * floor:.1f} us/block\n")
    kernel_rows = [r for r in rows_out if r[1].startswith("kernels ")]
    if a.best and kernel_rows:
        with open(a.best, "w") as f:  # the fastest tiling at the first batch size
            f.write(min((r for r in kernel_rows if r[0] == kernel_rows[0][0]),
                        key=lambda r: r[2])[1].split()[1])
    print("| batch | variant | us/block | weights GB/s | x floor | compile s |")
    print("|---|---|---|---|---|---|")
    for rows, label, us, gbs, x, cs in rows_out:
        print(f"| {rows} | {label} | {us:.1f} | {gbs:,.0f} | {x:.2f} | {cs:.1f} |")
    if failed:
        raise SystemExit("--check: a variant differs from the first beyond "
                         f"{CHECK_TOLERANCE[config.dtype]}")


if __name__ == "__main__":
    main()
