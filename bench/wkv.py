"""RWKV-4 WKV on the GPU: every impl side by side, forward and forward+backward.

    python bench/wkv.py --version 7 ...   (RWKV-7: bench/wkv7_table.py)
    python bench/wkv.py [--quick] [--peer-src DIR | --peer-lib FILE] [--out DIR]
                        [--sweep NAME] [--shapes B,T,C ...] [--impls scan assoc chunked pallas]

Prints one table last: median device ms per call (the jitted call repeated n times inside one
jitted fori_loop, so host dispatch drops out; after warm-up; inputs rotated when a set would
sit in L2, which none of the default shapes does; see device_time),
achieved forward GB/s (read k, v + write y) against a measured device-to-device copy, and the
relative error of y (and of the gradients) against float64. The peer is the official RWKV-4
forward CUDA kernel of the `rwkv` PyPI package (cuda/operators.cu + cuda/wrapper.cpp, built
here with torch.utils.cpp_extension as rwkv/model.py builds it); it has no backward.
--sweep times the six Pallas kernels one by one over tilings (tuning; see SWEEPS).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import time
import traceback

# Preallocate (no cudaMalloc while timing), but leave room for torch's copy test and the peer.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rwkv_jax.ops import wkv4 as ops  # noqa: E402
from rwkv_jax.ops.pallas import wkv4 as pk  # noqa: E402

SHAPES = [(4, 4096, 2560), (8, 1024, 768), (1, 16384, 2560)]
IMPLS = ["scan", "assoc", "chunked", "pallas"]
L2_BYTES = 50 << 20
LOG = []
INTERPRET = jax.default_backend() != "gpu"  # lets the script run (slowly) on a CPU


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)


# --------------------------------------------------------------------------- inputs and references


def make_inputs(B, T, C, seed=0):
    """The tests' ranges: time_decay over [-10, 10] (decays from ~1 to 0) and keys up to +-30."""
    rng = np.random.default_rng(seed)
    td = rng.uniform(-10, 10, C).astype(np.float32)
    tf = rng.uniform(-3, 3, C).astype(np.float32)
    k = rng.uniform(-30, 30, (B, T, C)).astype(np.float32)
    v = rng.normal(size=(B, T, C)).astype(np.float32)
    r = rng.normal(size=(B, T, C)).astype(np.float32)
    return td, tf, k, v, r


def reference_y(td, tf, k, v):
    """float64, straight from the definition with the running-max scaling (tests/conftest.py)."""
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    w = -np.exp(np.asarray(td, np.float64))
    u = np.asarray(tf, np.float64)
    B, T, C = k.shape
    num, den, lp = np.zeros((B, C)), np.zeros((B, C)), np.full((B, C), -np.inf)
    y = np.empty((B, T, C))
    for t in range(T):
        kt, vt = k[:, t], v[:, t]
        m = np.maximum(lp, u + kt)
        a, b = np.exp(lp - m), np.exp(u + kt - m)
        y[:, t] = (num * a + b * vt) / (den * a + b)
        m2 = np.maximum(lp + w, kt)
        a, b = np.exp(lp + w - m2), np.exp(kt - m2)
        num, den, lp = num * a + b * vt, den * a + b, m2
    return y


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _x64():
    ctx = getattr(jax, "enable_x64", None)
    if ctx is None:
        from jax.experimental import enable_x64 as ctx  # noqa: PLC0415
    return ctx(True)


def reference_grads(td, tf, k, v, r):
    """float64 gradients of sum(y * r) w.r.t. (time_decay, time_first, k, v) via impl=chunked."""
    with _x64():
        f = jax.jit(jax.grad(lambda *a: jnp.sum(ops.wkv4(*a[:4], impl="chunked", chunk_size=64)[0]
                                                * a[4]), argnums=(0, 1, 2, 3)))
        g = f(*(jnp.asarray(x, jnp.float64) for x in (td, tf, k, v, r)))
        return [np.asarray(x) for x in g]


# --------------------------------------------------------------------------- timing


def bench_calls(fn, arg_sets, *, reps, min_batch_s=0.02, max_inner=50):
    """Median seconds per call of batches of back-to-back jitted calls (each batch closed by a
    sync). Host dispatch (~50 us here) bounds it from below: a cross-check only."""
    out = None
    for i in range(2):  # warm-up: compile, first-touch
        out = fn(*arg_sets[i % len(arg_sets)])
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[0]))
    one = time.perf_counter() - t0
    inner = int(max(1, min(max_inner, min_batch_s / max(one, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(inner):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def device_time(fn, arg_sets, *, reps=5, target_s=0.03, max_iters=400, est=None):
    """Median device seconds per call of fn(*args), free of host dispatch.

    fn runs n times inside one jitted fori_loop (a known trip count: no host round trip per
    iteration). Each call nudges its first argument by 1e-30 times a scalar read from the
    previous outputs, so no call can be hoisted or skipped, and every output is live out.
    One call of the loop is timed (block_until_ready) and divided by n; n is chosen so that a
    call lasts ~target_s and dispatch is noise. With several input sets (used when one set
    would sit in L2) each iteration calls fn once per set. Kernel-launch gaps between calls
    stay in, as they would in a real step.
    """
    if est is None:  # one plain call, for the trip count
        plain = jax.jit(fn)
        jax.block_until_ready(plain(*arg_sets[0]))  # compile
        t0 = time.perf_counter()
        jax.block_until_ready(plain(*arg_sets[0]))
        est = time.perf_counter() - t0
    R = len(arg_sets)
    n = int(max(4, min(max_iters, target_s / max(est * R, 1e-6))))
    shapes = jax.eval_shape(fn, *arg_sets[0])

    def loop(*flat):
        sets = [flat[i * len(flat) // R:(i + 1) * len(flat) // R] for i in range(R)]

        def body(i, carry):
            s, out = carry
            for a in sets:
                out = fn(a[0] + s * 1e-30, *a[1:])
                s = s + jax.tree.leaves(out)[0].reshape(-1)[0].astype(jnp.float32)
            return s, out

        init = (jnp.float32(0), jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes))
        return jax.lax.fori_loop(0, n, body, init)

    looped = jax.jit(loop)
    flat = [x for a in arg_sets for x in a]
    jax.block_until_ready(looped(*flat))  # compile + warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(looped(*flat))
        times.append((time.perf_counter() - t0) / (n * R))
    return statistics.median(times)


def copy_bandwidth():
    """Device-to-device copy, bytes read + written per second (torch; jax if torch is missing)."""
    n = 1 << 28  # 1 GiB of float32
    try:
        import torch  # noqa: PLC0415

        a = torch.randn(n, device="cuda")
        b = torch.empty_like(a)
        for _ in range(3):
            b.copy_(a)
        torch.cuda.synchronize()
        ts = []
        for _ in range(10):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            b.copy_(a)
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e) / 1e3)
        del a, b
        torch.cuda.empty_cache()
        return 2 * 4 * n / statistics.median(ts), "torch copy_"
    except Exception:  # noqa: BLE001
        x = jnp.ones((n,), jnp.float32)
        f = jax.jit(lambda x: x + 1.0)
        return 2 * 4 * n / device_time(f, [(x,)]), "jax x+1"


# --------------------------------------------------------------------------- the official kernel


def load_peer(src, lib, out_dir):
    """torch.ops.rwkv.wkv_forward from the rwkv package's CUDA sources (or a prebuilt .so)."""
    import torch  # noqa: PLC0415

    if lib and os.path.exists(lib):
        try:
            torch.ops.load_library(lib)
            return f"prebuilt {os.path.basename(lib)}"
        except Exception as e:  # noqa: BLE001
            log(f"prebuilt {lib} did not load ({e!r}); building")
    if not src:
        raise RuntimeError("no --peer-src or --peer-lib")
    from torch.utils.cpp_extension import load  # noqa: PLC0415

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    build = "/tmp/rwkv_peer_build"
    os.makedirs(build, exist_ok=True)
    t0 = time.perf_counter()
    # As rwkv/model.py builds it (RWKV_CUDA_ON=1), without the fp16 cuBLAS matmul.
    load(name="wkv_cuda", sources=[f"{src}/wrapper.cpp", f"{src}/operators.cu"],
         extra_cuda_cflags=["--use_fast_math", "-O3", "--extra-device-vectorization"],
         extra_cflags=["-DDISABLE_CUBLAS_GEMM"], build_directory=build,
         is_python_module=False, verbose=False)
    if out_dir:
        shutil.copy(f"{build}/wkv_cuda.so", f"{out_dir}/wkv_cuda.so")
    return f"built in {time.perf_counter() - t0:.0f} s"


def peer_forward(td, tf, k, v, dtype, reps):
    import torch  # noqa: PLC0415

    B, T, C = k.shape
    w = -torch.exp(torch.tensor(td, dtype=torch.float32, device="cuda"))
    u = torch.tensor(tf, dtype=torch.float32, device="cuda")
    kt = torch.tensor(k, device="cuda").to(dtype).contiguous()
    vt = torch.tensor(v, device="cuda").to(dtype).contiguous()
    y = torch.empty_like(kt)
    zero = torch.zeros((B, C), device="cuda")
    aa, bb, pp = zero.clone(), zero.clone(), torch.full((B, C), -1e38, device="cuda")
    torch.ops.rwkv.wkv_forward(B, T, C, w, u, kt, vt, y, aa, bb, pp)
    torch.cuda.synchronize()
    y_out = y.float().cpu().numpy()

    def call():
        torch.ops.rwkv.wkv_forward(B, T, C, w, u, kt, vt, y, aa, bb, pp)

    sec = cuda_time(call, reps, target_s=0.02)
    del kt, vt, y
    torch.cuda.empty_cache()
    return sec, y_out


def cuda_time(fn, reps, target_s=0.03):
    """Median seconds per call of a torch CUDA callable: CUDA events around batches of
    back-to-back calls, after warm-up."""
    import torch  # noqa: PLC0415

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    inner = int(max(1, min(50, target_s / (time.perf_counter() - t0))))
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(inner):
            fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3 / inner)
    return statistics.median(ts)


# --------------------------------------------------------------------------- the table


@dataclasses.dataclass
class Row:
    shape: str
    impl: str
    dtype: str
    fwd_ms: float | None = None
    gbs: float | None = None
    fb_ms: float | None = None
    y_err: float | None = None
    g_err: float | None = None
    note: str = ""


def fmt(x, f):
    return "-" if x is None else format(x, f)


def render(rows, copy_bw, copy_how, device):
    out = [f"device: {device}; copy bandwidth {copy_bw / 1e9:.0f} GB/s ({copy_how}, read+write)",
           "| shape B,T,C | impl | dtype | fwd ms | fwd GB/s | % of copy | fwd+bwd ms | y rel err "
           "| grad rel err | note |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        pct = None if r.gbs is None else 100 * r.gbs * 1e9 / copy_bw
        out.append(f"| {r.shape} | {r.impl} | {r.dtype} | {fmt(r.fwd_ms, '.3f')} | "
                   f"{fmt(r.gbs, '.0f')} | {fmt(pct, '.0f')} | {fmt(r.fb_ms, '.3f')} | "
                   f"{fmt(r.y_err, '.1e')} | {fmt(r.g_err, '.1e')} | {r.note} |")
    return "\n".join(out)


def run_table(args, copy_bw, copy_how, device, peer_ok, deadline):
    rows = []

    def save():  # after every row, so a run cut short still leaves its table behind
        if args.out:
            with open(os.path.join(args.out, "table.md"), "w") as f:
                f.write(render(rows, copy_bw, copy_how, device) + "\n")

    reps = 3 if args.quick else 7
    for B, T, C in args.shapes:
        shape = f"{B},{T},{C}"
        td, tf, k, v, r = make_inputs(B, T, C)
        t0 = time.perf_counter()
        y_ref = reference_y(td, tf, k, v)
        log(f"[{shape}] float64 reference y in {time.perf_counter() - t0:.1f} s")
        try:
            t0 = time.perf_counter()
            g_ref = reference_grads(td, tf, k, v, r)
            log(f"[{shape}] float64 reference grads in {time.perf_counter() - t0:.1f} s")
        except Exception as e:  # noqa: BLE001
            g_ref = None
            log(f"[{shape}] no float64 grads: {e!r}")
        n = B * T * C
        set_bytes = 3 * 4 * n
        n_sets = 1 if set_bytes > L2_BYTES else 3  # none of the default shapes fits
        variants = [(impl, "fp32") for impl in args.impls] + (
            [("pallas", "bf16")] if "pallas" in args.impls else [])
        for impl, dt in variants:
            row = Row(shape, impl, dt)
            rows.append(row)
            if time.perf_counter() > deadline:
                row.note = "skipped: out of time"
                continue
            if impl == "scan" and T * B > args.scan_max_tokens:
                row.note = f"skipped: scan too slow past {args.scan_max_tokens} tokens"
                continue
            jdt = jnp.bfloat16 if dt == "bf16" else jnp.float32
            sets = []
            for s in range(n_sets):
                kk, vv, rr = (k, v, r) if s == 0 else make_inputs(B, T, C, seed=s)[2:]
                sets.append((jnp.asarray(td), jnp.asarray(tf), jnp.asarray(kk, jdt),
                             jnp.asarray(vv, jdt), jnp.asarray(rr)))
            fwd = jax.jit(lambda td, tf, k, v, r, impl=impl: ops.wkv4(td, tf, k, v, impl=impl)[0])
            loss = lambda td, tf, k, v, r, impl=impl: jnp.sum(  # noqa: E731
                ops.wkv4(td, tf, k, v, impl=impl)[0] * r)
            # value_and_grad, not grad: with grad alone XLA drops the forward's output kernel
            # (the backward needs only the chunk states), which a training step never could.
            fb = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
            nrep = 3 if impl == "scan" else reps
            try:
                y = np.asarray(fwd(*sets[0]))
                yr = y_ref if dt == "fp32" else reference_y(
                    td, tf, np.asarray(sets[0][2], np.float32), np.asarray(sets[0][3], np.float32))
                row.y_err = rel_err(y, yr)
                del y
                row.fwd_ms = 1e3 * device_time(fwd, sets, reps=nrep)
                if impl != "scan":  # cross-check: host-dispatched calls (too slow for scan)
                    log(f"    fwd: {row.fwd_ms:.4f} ms in a device loop, "
                        f"{1e3 * bench_calls(fwd, sets, reps=nrep):.4f} ms per dispatched call")
                in_bytes = 2 if dt == "bf16" else 4
                row.gbs = n * (2 * in_bytes + 4) / (row.fwd_ms * 1e-3) / 1e9
                g = fb(*sets[0])[1]
                if g_ref is not None and dt == "fp32":
                    row.g_err = max(rel_err(a, b) for a, b in zip(g, g_ref))
                del g
                row.fb_ms = 1e3 * device_time(fb, sets, reps=nrep)
                if impl != "scan":
                    log(f"    fwd+bwd: {row.fb_ms:.4f} ms in a device loop, "
                        f"{1e3 * bench_calls(fb, sets, reps=nrep):.4f} ms per dispatched call")
            except Exception as e:  # noqa: BLE001
                row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                log(traceback.format_exc()[-3000:])
            save()
            log(f"  {shape} {impl} {dt}: fwd {fmt(row.fwd_ms, '.3f')} ms, fwd+bwd "
                f"{fmt(row.fb_ms, '.3f')} ms, y err {fmt(row.y_err, '.1e')}, "
                f"grad err {fmt(row.g_err, '.1e')} {row.note}")
            del sets
        if peer_ok:
            for dt in ("fp32", "fp16"):
                row = Row(shape, "official CUDA (rwkv pkg)", dt, note="forward only")
                rows.append(row)
                try:
                    import torch  # noqa: PLC0415

                    tdt = torch.float32 if dt == "fp32" else torch.float16
                    sec, y = peer_forward(td, tf, k, v, tdt, reps)
                    row.fwd_ms = 1e3 * sec
                    row.gbs = n * (3 * (4 if dt == "fp32" else 2)) / sec / 1e9
                    if dt == "fp32":
                        row.y_err = rel_err(y, y_ref)
                    else:
                        kh = np.asarray(torch.tensor(k).half().float())
                        vh = np.asarray(torch.tensor(v).half().float())
                        row.y_err = rel_err(y, reference_y(td, tf, kh, vh))
                        row.note += ", fp16 in/out"
                except Exception as e:  # noqa: BLE001
                    row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    log(traceback.format_exc()[-3000:])
                save()
                log(f"  {shape} peer {dt}: fwd {fmt(row.fwd_ms, '.3f')} ms, "
                    f"y err {fmt(row.y_err, '.1e')} {row.note}")
    return rows


# --------------------------------------------------------------------------- kernel-by-kernel sweeps


def _cfg(**kw):
    return dataclasses.replace(pk.DEFAULT_CONFIG, **kw)


def _fwd_variants(c, out=None):
    return dict(
        summary=[dict(block_c_summary=b, warps_summary=nw) for b, nw in
                 ((32, 2), (64, 4), (128, 4)) if b * c <= 8192],
        scan=[dict(block_c_scan=b, group=g) for b, g in ((32, 8), (16, 8), (32, 16))],
        output=out or [dict(block_c_fwd=b, warps_fwd=nw, unroll=u) for b, nw, u in
                       ((64, 1, 8), (128, 1, 8), (32, 1, 8), (64, 1, 4), (64, 1, 16),
                        (128, 2, 8), (256, 2, 8))],
    )


def _bwd_variants():
    return dict(
        adjoint_summary=[dict(block_c_bwd1=b, warps_bwd1=nw) for b, nw in ((32, 1), (64, 1), (128, 1))],
        adjoint_scan=[dict(block_c_scan=b) for b in (32, 16)],
        grad=[dict(block_c_bwd=b, warps_bwd=nw) for b, nw in ((32, 1), (64, 1), (64, 2))],
    )


# name -> [(shape, [(chunk, sub, {stage: [overrides of DEFAULT_CONFIG to try]})])]
def _grad_variants(*pairs):
    return [dict(block_c_bwd=b, warps_bwd=nw, prefetch_bwd=pf) for b, nw in pairs for pf in (False, True)]


SWEEPS = {
    "first": [
        ((4, 4096, 2560), [(64, 8, {**_fwd_variants(64), **_bwd_variants()}),
                           (32, 8, {**_fwd_variants(32), **_bwd_variants()}),
                           (128, 8, {**_fwd_variants(128), **_bwd_variants()}),
                           (64, 16, {k: v for k, v in _bwd_variants().items() if k != "adjoint_scan"}),
                           (64, 4, {k: v for k, v in _bwd_variants().items() if k != "adjoint_scan"})]),
        ((8, 1024, 768), [(c, 8, {"summary": _fwd_variants(c)["summary"][:2],
                                  "scan": [dict(block_c_scan=16), dict(block_c_scan=32)],
                                  "output": [dict(block_c_fwd=b) for b in (32, 64, 128)],
                                  "adjoint_summary": [dict(block_c_bwd1=b) for b in (32, 64)],
                                  "grad": [dict(block_c_bwd=b) for b in (32, 64)]})
                          for c in (16, 32, 64)]),
        ((1, 16384, 2560), [(c, 8, {"scan": [dict(block_c_scan=b, group=g) for b, g in
                                             ((32, 8), (16, 8), (16, 16))],
                                    "adjoint_scan": [dict(block_c_scan=b, group=g) for b, g in
                                                     ((32, 8), (16, 8), (16, 16))],
                                    "output": [dict(block_c_fwd=64)]})
                            for c in (64, 128, 256)]),
    ],
    # Device-loop timing (run 3): chunk length per shape, B3 prefetch, sub-block length.
    # What run 3 ran out of time for: chunk length on the small and the long shape.
    "third": [
        ((8, 1024, 768), [
            (c, min(c, 16), {"summary": [dict(block_c_summary=64, warps_summary=4)],
                             "scan": [dict(block_c_scan=32)],
                             "output": [dict(block_c_fwd=b) for b in (32, 64)],
                             "adjoint_summary": [dict(block_c_bwd1=32)],
                             "adjoint_scan": [dict(block_c_scan=32)],
                             "grad": [dict(block_c_bwd=32)]})
            for c in (16, 32, 64)]),
        ((1, 16384, 2560), [
            (c, 16, {"summary": [dict(block_c_summary=64, warps_summary=4)],
                     "scan": [dict(block_c_scan=b) for b in (32, 16)],
                     "output": [dict(block_c_fwd=64)],
                     "adjoint_summary": [dict(block_c_bwd1=32)],
                     "adjoint_scan": [dict(block_c_scan=b) for b in (32, 16)],
                     "grad": [dict(block_c_bwd=32)]})
            for c in (128, 64, 256)]),
    ],
    "second": [
        ((4, 4096, 2560), [
            (c, 8, {"summary": [dict(block_c_summary=b, warps_summary=nw) for b, nw in
                                ((64, 4), (32, 4), (128, 8)) if b * c <= 8192],
                    "scan": [dict(block_c_scan=b, group=g) for b, g in ((32, 8), (16, 8), (32, 16))],
                    "output": [dict(block_c_fwd=b, warps_fwd=nw, unroll=u) for b, nw, u in
                               ((64, 1, 8), (128, 2, 8), (64, 1, 16), (32, 1, 8))],
                    "adjoint_summary": [dict(block_c_bwd1=b) for b in (32, 64)],
                    "adjoint_scan": [dict(block_c_scan=b) for b in (32, 16)],
                    "grad": _grad_variants((32, 1), (64, 2))})
            for c in (128, 64)] + [
            (128, 16, {"adjoint_summary": [dict(block_c_bwd1=b) for b in (32, 64)],
                       "grad": _grad_variants((32, 1), (64, 2))})]),
        ((8, 1024, 768), [
            (c, 8, {"summary": [dict(block_c_summary=b, warps_summary=nw) for b, nw in ((32, 2), (64, 4))],
                    "scan": [dict(block_c_scan=b) for b in (16, 32)],
                    "output": [dict(block_c_fwd=b) for b in (32, 64)],
                    "adjoint_summary": [dict(block_c_bwd1=b) for b in (32, 64)],
                    "adjoint_scan": [dict(block_c_scan=b) for b in (16, 32)],
                    "grad": _grad_variants((32, 1))})
            for c in (16, 32, 64)]),
        ((1, 16384, 2560), [
            (c, 8, {"summary": [dict(block_c_summary=64, warps_summary=4)],
                    "scan": [dict(block_c_scan=b, group=g) for b, g in ((32, 8), (16, 8), (16, 16))],
                    "output": [dict(block_c_fwd=64)],
                    "adjoint_summary": [dict(block_c_bwd1=64)],
                    "adjoint_scan": [dict(block_c_scan=b, group=g) for b, g in ((32, 8), (16, 8), (16, 16))],
                    "grad": [dict(block_c_bwd=32)]})
            for c in (64, 128, 256)]),
    ],
}


def stage_inputs(B, T, C, kdt, cfg):
    td, tf, k, v, r = make_inputs(B, T, C)
    w = -jnp.exp(jnp.asarray(td))
    u = jnp.asarray(tf)
    k, v, gy = jnp.asarray(k, kdt), jnp.asarray(v, kdt), jnp.asarray(r)
    z = jnp.zeros((B, C))
    s0 = (z, z, jnp.full((B, C), ops.NEG_INF))
    st = pk._stages(B, T, C, k.dtype, jnp.float32, cfg, INTERPRET)
    summ = jax.jit(st["summary"])(w, k, v)
    S = jax.jit(st["scan"])(w, *summ, *s0)
    *X, ra, rb, rp = jax.jit(st["adjoint_summary"])(w, u, k, v, gy, *S)
    G = jax.jit(st["adjoint_scan"])(w, ra, rb, rp, S[0][:, -1], S[1][:, -1], S[2])[:3]
    return dict(summary=(w, k, v), scan=(w, *summ, *s0), output=(w, u, k, v, *S),
                adjoint_summary=(w, u, k, v, gy, *S),
                adjoint_scan=(w, ra, rb, rp, S[0][:, -1], S[1][:, -1], S[2]),
                grad=(w, u, k, v, gy, *X, *G))


def run_sweep(name, kdt, deadline):
    for shape, entries in SWEEPS[name]:
        _sweep_shape(shape, entries, kdt, deadline)


def _sweep_shape(shape, entries, kdt, deadline):
    B, T, C = shape
    log(f"sweep on B,T,C={B},{T},{C} {jnp.dtype(kdt).name} (ms per kernel call)")
    best = {}
    for chunk, sub, stages in entries:
        base = _cfg(chunk=chunk, sub=sub)
        if time.perf_counter() > deadline:
            log("  out of time")
            break
        try:
            inputs = stage_inputs(B, T, C, kdt, base)
        except Exception as e:  # noqa: BLE001
            log(f"  chunk={chunk} sub={sub}: inputs failed {e!r}"[:1500])
            continue
        for stage, variants in stages.items():
            for over in variants:
                if time.perf_counter() > deadline:
                    break
                cfg = dataclasses.replace(base, **over)
                try:
                    cfg.check()
                    fn = jax.jit(pk._stages(B, T, C, jnp.dtype(kdt), jnp.float32, cfg, INTERPRET)[stage])
                    nbytes = sum(x.nbytes for x in inputs[stage]) + sum(
                        x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(fn, *inputs[stage])))
                    ms = 1e3 * device_time(fn, [inputs[stage]], reps=3, target_s=0.02,
                                           est=nbytes / 2.5e12 + 10e-6)
                    res = f"{ms:.4f}"
                    key = (stage, chunk, sub)
                    if key not in best or ms < best[key][0]:
                        best[key] = (ms, over)
                except Exception as e:  # noqa: BLE001
                    res = f"failed {type(e).__name__}: {str(e).splitlines()[0][:100]}"
                log(f"  chunk={chunk:<4} sub={sub:<3} {stage:<16} {over} -> {res}")
        del inputs
    log(f"best per (stage, chunk, sub) on {B},{T},{C}:")
    for (stage, c, s), (ms, over) in sorted(best.items()):
        log(f"  {stage:<16} chunk={c:<4} sub={s:<3} {ms:.4f} ms {over}")
    tot = {}
    for (stage, c, s), (ms, _) in best.items():
        tot.setdefault((c, s), {})[stage] = ms
    for (c, s), d in sorted(tot.items()):
        f = sum(d.get(x, 0) for x in ("summary", "scan", "output"))
        b = sum(d.get(x, 0) for x in ("adjoint_summary", "adjoint_scan", "grad"))
        log(f"  chunk={c} sub={s}: forward kernels {f:.3f} ms, backward kernels {b:.3f} ms "
            f"(stages timed: {sorted(d)})")


# --------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer timed batches")
    ap.add_argument("--shapes", nargs="*", default=None, help="B,T,C ...")
    ap.add_argument("--impls", nargs="*", default=IMPLS)
    ap.add_argument("--peer-src", default=None, help="folder with the rwkv package's cuda/ sources")
    ap.add_argument("--peer-lib", default=None, help="a wkv_cuda.so built earlier on this image")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--sweep", default=None, choices=sorted(SWEEPS))
    ap.add_argument("--sweep-first", action="store_true", help="sweep before the table")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--scan-max-tokens", type=int, default=1 << 20)
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting work after this")
    ap.add_argument("--version", default="4", choices=["4", "7"], help="7: the RWKV-7 rows")
    ap.add_argument("--shapes7", nargs="*", default=None, help="B,T,H,N ... (RWKV-7)")
    ap.add_argument("--impls7", nargs="*", default=None, help="scan chunked:L pallas (RWKV-7)")
    ap.add_argument("--peer7-src", default=None, help="RWKV-LM train_temp/cuda sources (RWKV-7)")
    ap.add_argument("--no-fla", action="store_true", help="RWKV-7: skip fla's chunk_rwkv7")
    ap.add_argument("--sweep7", nargs="*", default=None,
                    help="RWKV-7: time each kernel for tilings L,BV,warps_fwd,warps_scan,"
                         "warps_bwd,stages_scan[,BK,warps_lam]")
    args = ap.parse_args()
    args.shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    deadline = time.perf_counter() + args.budget_s

    device = f"{jax.devices()[0].device_kind} (jax {jax.__version__}, {jax.default_backend()})"
    log(device)
    copy_bw, copy_how = copy_bandwidth()
    log(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s ({copy_how})")
    peer_ok = False
    if args.peer_src or args.peer_lib:
        try:
            log("official kernel:", load_peer(args.peer_src, args.peer_lib, args.out))
            peer_ok = True
        except Exception as e:  # noqa: BLE001
            log(f"official kernel unavailable: {e!r}")
            log(traceback.format_exc()[-2000:])

    if args.version == "7":
        # wkv7_table imports this file as `wkv`: make that this very module, so that its log
        # lines land in LOG (and bench_log7.txt) instead of in a second copy's.
        sys.modules.setdefault("wkv", sys.modules[__name__])
        import wkv7_table  # noqa: PLC0415

        args.shapes7 = ([tuple(int(x) for x in s.split(",")) for s in args.shapes7]
                        if args.shapes7 else wkv7_table.SHAPES7)
        args.impls7 = args.impls7 or wkv7_table.IMPLS7
        if args.sweep7:
            wkv7_table.stage_sweep(args.shapes7[0], args.sweep7, deadline)
        rows7 = [] if args.no_table else wkv7_table.run7(args, device, deadline)
        table = wkv7_table.render7(rows7, device)
        if args.out:
            with open(os.path.join(args.out, "bench_log7.txt"), "w") as f:
                f.write("\n".join(LOG) + "\n\n" + table + "\n")
        print("\n" + table, flush=True)
        return

    sweep = lambda: run_sweep(args.sweep, jnp.float32, deadline)  # noqa: E731
    if args.sweep and args.sweep_first:
        sweep()
    rows = [] if args.no_table else run_table(args, copy_bw, copy_how, device, peer_ok, deadline)
    if args.sweep and not args.sweep_first:
        sweep()
    table = render(rows, copy_bw, copy_how, device) if rows else ""
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_log.txt"), "w") as f:
            f.write("\n".join(LOG) + "\n\n" + table + "\n")
    print("\n" + table, flush=True)


if __name__ == "__main__":
    main()
