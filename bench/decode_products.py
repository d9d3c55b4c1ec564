"""Where a batch-1 decode step loses time to the memory floor: one RWKV-4 block's four
matrix-vector products, by XLA, by Pallas kernels and by cuBLAS, beside what the card reads.

    python3 bench/decode_products.py [--model 3B] [--layers 4] [--steps 100]
    python bench/decode_products.py --quick        # CPU: tiny shapes through the interpreter

A block's products in decode order, each fed the previous one's first K outputs in bf16:
[key|value|receptance] (3C x C), output (C x C), [key;receptance] (5C x C), value (C x 4C).
`--layers` blocks with their own random bf16 weights (more bytes than the 50 MB L2), the whole
step repeated `--steps` times in one jitted loop, one CUDA graph. Variants:
  XLA, 2 rows          the generator's products: batch 1 padded to 2 rows, weights (in, out)
  Pallas rows BN,W     one program per BN output rows of (out, in) weights, the loads of all
                       of a row block's column chunks issued at once; with "split-K S", S
                       programs per row block, each over K / S columns, their partial sums
                       added atomically into a zeroed float32 row
  persistent xG,W      one kernel per block, G x (number of SMs) programs: the four products
                       are phases over row blocks with a grid barrier between them (an atomic
                       counter and a spin); with "prefetch", the next phase's first weights
                       load before the wait
  cuBLAS               torch.nn.functional.linear per product (eager; a library reference)
and the bandwidths: JAX copy (the floor's figure in bench/decode.py), torch copy and torch sum
(a pure read). The persistent kernel needs all of its programs resident at once: it takes
G = 1 or 2 (3 x 132 programs of 4 warps did not all fit on an H200 and spun).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from decode import MODELS, copy_bandwidth  # noqa: E402  bench/decode.py
from rwkv_jax.generate import _loop_options  # noqa: E402
from rwkv_jax.ops.pallas.common import compiler_params, plgpu  # noqa: E402

GPU = jax.default_backend() == "gpu"
BK = 512  # columns per load; every width here is a multiple
MAX_SPIN = 1 << 20  # a barrier gives up after this many polls rather than hang the GPU



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

def block_shapes(C: int):
    return [(3 * C, C), (C, C), (5 * C, C), (C, 4 * C)]  # (N, K) = (out, in)


# --------------------------------------------------------------------------- XLA


def xla_block(ws_kn, x):
    h = x
    for w in ws_kn:
        xk = h[:, : w.shape[0]]
        y = jnp.dot(jnp.concatenate([xk, jnp.zeros_like(xk)]), w,
                    preferred_element_type=jnp.float32)
        h = y[:1].astype(jnp.bfloat16)
    return h


# --------------------------------------------------------------------------- Pallas rows


def _row_tiles(w_ref, row0, BN, K, col0=0):
    bk = min(BK, K)
    return [w_ref[pl.ds(row0, BN), pl.ds(col0 + c * bk, bk)] for c in range(K // bk)]


def _x_chunks(x_ref, K, col0=0):
    bk = min(BK, K)
    return [x_ref[pl.ds(0, 1), pl.ds(col0 + c * bk, bk)].astype(jnp.float32)
            for c in range(K // bk)]


def _dot_rows(tiles, xs):
    """(BN,) float32: the row block's tiles times x, given as its column chunks (1, BK)."""
    acc = None
    for w, xc in zip(tiles, xs):
        part = w.astype(jnp.float32) * xc
        acc = part if acc is None else acc + part
    return jnp.sum(acc, axis=1)


def rows_product(w, x, *, BN, warps, splits=1):
    """x (1, K) @ W.T, W (N, K): a program per BN rows and K / splits columns. With splits > 1
    the programs add their partial sums atomically into a zeroed float32 row."""
    N, K = w.shape
    KS = K // splits

    def kernel(w_ref, x_ref, *refs):
        o_ref = refs[-1]
        n0 = pl.program_id(0) * BN
        k0 = pl.program_id(1) * KS
        y = _dot_rows(_row_tiles(w_ref, n0, BN, KS, k0), _x_chunks(x_ref, KS, k0))[None, :]
        if splits == 1:
            o_ref[pl.ds(0, 1), pl.ds(n0, BN)] = y.astype(o_ref.dtype)
        else:
            plgpu.atomic_add(o_ref, (pl.ds(0, 1), pl.ds(n0, BN)), y)

    params = None if not GPU else compiler_params(warps, 1)
    if splits == 1:
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((1, N), jnp.bfloat16),
                              grid=(N // BN, 1), interpret=not GPU, compiler_params=params)(w, x)
    y = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((1, N), jnp.float32),
                       grid=(N // BN, splits), input_output_aliases={2: 0}, interpret=not GPU,
                       compiler_params=params)(w, x, jnp.zeros((1, N), jnp.float32))
    return y.astype(jnp.bfloat16)


def rows_block(ws_nk, x, *, BN, warps, splits=1):
    h = x
    for w in ws_nk:
        h = rows_product(w, h[:, : w.shape[1]], BN=BN, warps=warps,
                         splits=max(1, min(splits, w.shape[1] // BK)))
    return h


# --------------------------------------------------------------------------- persistent


def _grid_barrier(cnt_ref, target):
    """Wait until `target` arrivals (programs x barriers so far); returns the polls it took."""
    zero = (jnp.int32(0),)
    plgpu.debug_barrier()  # this program's stores are all issued before it signs in
    arrived = plgpu.atomic_add(cnt_ref, zero, jnp.int32(1)) + 1  # acq_rel, GPU scope
    arrived, polls = lax.while_loop(
        lambda c: (c[0] < target) & (c[1] < MAX_SPIN),
        lambda c: (plgpu.atomic_add(cnt_ref, zero, jnp.int32(0)), c[1] + 1),
        (arrived, jnp.int32(0)))
    plgpu.debug_barrier()
    return polls


def persistent_block(ws_nk, x, *, G, BNs, warps, prefetch):
    """The block's four products as phases of one kernel of G programs."""
    shapes = [w.shape for w in ws_nk]
    tasks = [N // BN for (N, _), BN in zip(shapes, BNs)]

    def kernel(*refs):
        w_refs, x_ref, cnt_in = refs[:4], refs[4], refs[5]  # noqa: F841 (aliased to cnt)
        y_refs, cnt, polls_ref = refs[6:10], refs[10], refs[11]
        pid = pl.program_id(0)
        polls = jnp.int32(0)
        first = _row_tiles(w_refs[0], jnp.minimum(pid, tasks[0] - 1) * BNs[0], BNs[0],
                           shapes[0][1])
        for p in range(4):
            (N, K), BN, src = shapes[p], BNs[p], (x_ref, *y_refs)[p]
            w_ref, y_ref = w_refs[p], y_refs[p]

            xs = _x_chunks(src, K)  # once per phase: every task of the phase reuses them

            def body(i, tiles, BN=BN, K=K, xs=xs, w_ref=w_ref, y_ref=y_ref, n=tasks[p]):
                t = pid + i * G
                nxt = _row_tiles(w_ref, jnp.minimum(t + G, n - 1) * BN, BN, K)
                y_ref[pl.ds(0, 1), pl.ds(t * BN, BN)] = _dot_rows(
                    tiles, xs)[None, :].astype(y_ref.dtype)
                return nxt

            lax.fori_loop(0, (tasks[p] - pid + G - 1) // G, body, first)
            if p < 3:
                def next_first(p=p):
                    return _row_tiles(w_refs[p + 1], jnp.minimum(pid, tasks[p + 1] - 1) *
                                      BNs[p + 1], BNs[p + 1], shapes[p + 1][1])

                if prefetch:  # the next phase's first row block streams in during the wait
                    first = next_first()
                if GPU:
                    polls = jnp.maximum(polls, _grid_barrier(cnt, G * (p + 1)))
                if not prefetch:
                    first = next_first()

        @pl.when(pid == 0)
        def _():
            polls_ref[0] = polls

    out_shape = [jax.ShapeDtypeStruct((1, N), jnp.bfloat16) for N, _ in shapes]
    out_shape += [jax.ShapeDtypeStruct((1,), jnp.int32)] * 2
    outs = pl.pallas_call(kernel, out_shape=out_shape, grid=(G,), input_output_aliases={5: 4},
                          interpret=not GPU,
                          compiler_params=None if not GPU else compiler_params(warps, 1))(
        *ws_nk, x, jnp.zeros((1,), jnp.int32))
    return outs[3], outs[5]


# --------------------------------------------------------------------------- timing


def time_layers(fn, layers, x, steps):
    """Seconds per block, and the largest of the values fn returns beside its output."""

    def run(layers, x):
        def body(_, c):
            h, most = c
            for ws in layers:
                out = fn(ws, h)
                h, extra = out if isinstance(out, tuple) else (out, jnp.zeros((1,), jnp.int32))
                most = jnp.maximum(most, extra[0])
                h = jnp.tile(h, (1, x.shape[1] // h.shape[1]))
            return h, most

        return lax.fori_loop(0, steps, body, (x, jnp.int32(0)))

    best, _, out = best_of(jax.jit(run, compiler_options=_loop_options()), layers, x)
    return best / steps / len(layers), int(out[1])


def torch_figures(C, copies_bytes):
    """(torch copy, torch sum bytes/s, cuBLAS seconds per block) or None without CUDA torch."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    from wkv import copy_bandwidth as torch_copy, cuda_time  # noqa: PLC0415  bench/wkv.py

    copy, _ = torch_copy()
    a = torch.ones(1 << 29, dtype=torch.bfloat16, device="cuda")
    read = a.nbytes / cuda_time(lambda: a.sum(dtype=torch.float32), reps=5)
    del a
    per_block = 0.0
    for N, K in block_shapes(C):
        n = max(2, -(-copies_bytes // (N * K * 2)))
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)

        def run(ws=ws, x=x):
            for w in ws:
                torch.nn.functional.linear(x, w)

        per_block += cuda_time(run, reps=5) / n
    return copy, read, per_block


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="3B", choices=sorted(MODELS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU interpreter)")
    ap.add_argument("--rows", nargs="*", default=["4,4,1", "2,1,1", "8,4,1", "16,4,5", "8,4,5"],
                    help="Pallas rows variants: BN,warps,column splits (split-K; 1 = none)")
    ap.add_argument("--persistent", nargs="*",
                    default=["2,4,4,2,4,1,0", "2,4,4,2,4,1,1", "1,8,8,4,8,2,1",
                             "2,4,2,2,2,1,1"],
                    help="persistent variants: G per SM (1 or 2),warps,BN of each product,"
                         "prefetch across the barrier (0 or 1)")
    a = ap.parse_args()
    for spec in a.persistent:
        if int(spec.split(",")[0]) not in (1, 2):
            ap.error(f"--persistent {spec}: programs per SM must be 1 or 2 (all of them must "
                     "be resident at once for the grid barrier)")
    C = 64 if a.quick else MODELS[a.model][1]
    steps = 1 if a.quick else a.steps
    sms = getattr(jax.devices()[0], "core_count", 1) if GPU else 1
    bw = copy_bandwidth()
    key = jax.random.PRNGKey(0)
    layers_nk = []
    for _ in range(a.layers):
        ws = []
        for N, K in block_shapes(C):
            key, k = jax.random.split(key)
            ws.append((jax.random.normal(k, (N, K), jnp.float32) * K ** -0.5).astype(jnp.bfloat16))
        layers_nk.append(tuple(ws))
    layers_kn = [tuple(w.T.copy() for w in ws) for ws in layers_nk]
    nbytes = sum(w.nbytes for w in layers_nk[0])
    floor = nbytes / bw
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {sms} SMs; C={C}: "
          f"{nbytes / 1e6:.1f} MB of products per block, floor {1e6 * floor:.1f} us at the "
          f"JAX copy's {bw / 1e9:,.0f} GB/s", flush=True)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, C), jnp.float32).astype(jnp.bfloat16)
    want = xla_block(layers_kn[0], x).astype(jnp.float32)
    variants = [("XLA, 2 rows", xla_block, layers_kn)]
    for spec in a.rows:
        bn, w, sk = (int(v) for v in spec.split(","))
        variants.append((f"Pallas rows BN{bn} W{w}" + (f" split-K {sk}" if sk > 1 else ""),
                         functools.partial(rows_block, BN=bn, warps=w, splits=sk), layers_nk))
    for spec in a.persistent:
        g, w, *bns, pf = (int(v) for v in spec.split(","))
        # The interpreter runs programs one after another: only a grid of one sees its phases
        # in order without the barrier.
        variants.append((f"persistent x{g} W{w} BN {','.join(map(str, bns))}"
                         f"{', prefetch' if pf else ''}",
                         functools.partial(persistent_block, G=g * sms if GPU else 1, BNs=bns,
                                           warps=w, prefetch=bool(pf)), layers_nk))
    rows = []
    for label, fn, layers in variants:
        try:
            got = jax.jit(fn)(layers[0], x)
            got = (got[0] if isinstance(got, tuple) else got).astype(jnp.float32)
            err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
            per, polls = time_layers(fn, layers, x, steps)
        except Exception as e:  # noqa: BLE001 - a variant that does not compile: say so
            print(f"  {label}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        rows.append((label, per, err, polls))
        print(f"  {label}: {1e6 * per:.1f} us/block, {nbytes / per / 1e9:,.0f} GB/s, "
              f"{per / floor:.2f}x floor, rel. diff to XLA {err:.1e}, most polls {polls}",
              flush=True)
    figures = torch_figures(C, 300 << 20) if GPU and not a.quick else None
    if figures:
        rows.append(("cuBLAS (torch, eager)", figures[2], float("nan"), 0))
    print(f"\n{a.model if not a.quick else 'quick'} block products (C{C}), {a.layers} blocks, "
          f"floor {1e6 * floor:.1f} us/block\n")
    print("| variant | us/block | GB/s | x floor | rel. diff to XLA |")
    print("|---|---|---|---|---|")
    for label, per, err, _ in rows:
        print(f"| {label} | {1e6 * per:.1f} | {nbytes / per / 1e9:,.0f} | {per / floor:.2f} | "
              f"{err:.1e} |")
    print(f"\nbandwidth: JAX copy {bw / 1e9:,.0f} GB/s" + (
        f", torch copy {figures[0] / 1e9:,.0f} GB/s, torch sum (read) {figures[1] / 1e9:,.0f} GB/s"
        if figures else ""))


if __name__ == "__main__":
    main()
