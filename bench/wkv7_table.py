"""RWKV-7 rows of bench/wkv.py (`python bench/wkv.py --version 7`): our forms beside the peers.

    python bench/wkv.py --version 7 [--shapes7 B,T,H,N ...] [--impls7 chunked:64 pallas ...]
                        [--peer7-src DIR] [--no-fla]

Inputs are those of an RWKV-7 time-mix (bf16): raw decay parameter wr, decay
exp(-0.6065 sigmoid(wr)); kk a unit vector per head; a = -kk, b = kk * iclr. Our forms and fla
take the log decay (float32 for ours, as the layer passes it; bf16 for fla, which casts);
the official kernel takes wr in bf16 and applies the same map inside.

Peers, timed in the same process (CUDA events around back-to-back calls):
  official  RWKV-LM's RWKV-7 training kernels (train_temp/cuda/rwkv7_clampw.cu and the
            rwkv7_clampw_v3_for_h100.cu it recommends on H100s; forward and backward, chunk
            16), built here with torch.utils.cpp_extension from --peer7-src.
  fla       flash-linear-attention's chunk_rwkv7 (Triton), from its PyPI wheel.

Reference: the float32 recurrent scan on the same (bf16-rounded) inputs; y and gradient
errors of every row are relative to it. Gradients of bf16 inputs are bf16, so ~2e-3 is the
floor of the gradient error.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import wkv as common  # bench/wkv.py: timing helpers and the log

from rwkv_jax.ops import wkv7 as ops

SHAPES7 = [(4, 4096, 40, 64), (8, 1024, 12, 64)]
IMPLS7 = ["chunked:16", "chunked:32", "chunked:64", "pallas"]
W_SCALE = -0.6065306597  # -exp(-0.5): RWKV-7's largest per-token log decay


def make_inputs(B, T, H, N, seed=0):
    rng = np.random.default_rng(seed)
    shp = (B, T, H, N)
    r, k = (rng.normal(size=shp) * 0.5 for _ in range(2))
    v = rng.normal(size=shp)
    wr = rng.normal(size=shp) * 2.0 - 1.0
    kk = rng.normal(size=shp)
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    iclr = 1.0 / (1.0 + np.exp(-rng.normal(size=shp)))
    dy = rng.normal(size=shp)
    bf = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))  # noqa: E731
    r, k, v, wr, a, b = (bf(x) for x in (r, k, v, wr, -kk, kk * iclr))
    logw = (W_SCALE / (1.0 + np.exp(-wr.astype(np.float64)))).astype(np.float32)
    return dict(r=r, k=k, v=v, wr=wr, logw=logw, a=a, b=b, dy=dy.astype(np.float32))


def _ours(impl):
    """'scan', 'chunked:L', 'pallas' or 'pallas:L:BV:warps_fwd:warps_bwd[:notf32]'."""
    name, *opts = impl.split(":")
    if name == "pallas" and opts:
        from rwkv_jax.ops.pallas import wkv7 as pk  # noqa: PLC0415

        keys = ("chunk", "block_v", "warps_fwd", "warps_bwd")
        cfg = pk.Config(**{k: int(o) for k, o in zip(keys, opts) if o.isdigit()},
                        tf32="notf32" not in opts)

        def y_of(w, r, k, v, a, b):  # float32 w first: device_time nudges the first argument
            B, T, H, N = r.shape
            return pk.wkv7(r, w, k, v, a, b, jnp.zeros((B, H, N, N)), config=cfg)[0]

        return y_of
    chunk = int(opts[0]) if opts else 64

    def y_of(w, r, k, v, a, b):
        return ops.wkv7(r, w, k, v, a, b, impl=name, chunk_size=chunk)[0]

    return y_of


def _loss_grad(y_of):
    def loss(w, r, k, v, a, b, dy):
        return jnp.sum(y_of(w, r, k, v, a, b) * dy)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5)))


def _jax_args(x, dt):
    return (jnp.asarray(x["logw"]), jnp.asarray(x["r"], dt), jnp.asarray(x["k"], dt),
            jnp.asarray(x["v"], dt), jnp.asarray(x["a"], dt), jnp.asarray(x["b"], dt))


# RWKV-LM's two training kernels: the portable one and the one it recommends for the H100.
OFFICIAL = {"rwkv7_clampw": ("rwkv7_clampw.cu", "rwkv7_clampw.cpp"),
            "rwkv7_clampw_v3": ("rwkv7_clampw_v3_for_h100.cu", "rwkv7_clampw_v3.cpp")}


def load_official(src):
    """Builds what of OFFICIAL is in `src`; returns the names that loaded."""
    from torch.utils.cpp_extension import load  # noqa: PLC0415

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    flags = ["-res-usage", "-D_N_=64", "-D_CHUNK_LEN_=16", "--use_fast_math", "-O3",
             "-Xptxas -O3", "--extra-device-vectorization"]
    built = []
    for name, files in OFFICIAL.items():
        if not all(os.path.exists(f"{src}/{f}") for f in files):
            continue
        build = f"/tmp/{name}_build"
        os.makedirs(build, exist_ok=True)
        t0 = time.perf_counter()
        load(name=name, sources=[f"{src}/{f}" for f in files], is_python_module=False,
             verbose=False, extra_cuda_cflags=flags, build_directory=build)
        common.log(f"  {name} built in {time.perf_counter() - t0:.0f} s")
        built.append(name)
    return built


def official_rows(x, reps, name):
    """An official kernel's forward and forward+backward (its own autograd wiring)."""
    import torch  # noqa: PLC0415

    op = getattr(torch.ops, name)
    B, T, H, N = x["r"].shape
    t = lambda a: torch.tensor(a, device="cuda").bfloat16().contiguous()  # noqa: E731
    r, wr, k, v, a, b, dy = (t(x[n]) for n in ("r", "wr", "k", "v", "a", "b", "dy"))
    y = torch.empty_like(v)
    s = torch.empty(B, H, T // 16, N, N, dtype=torch.float32, device="cuda")
    sa = torch.empty(B, T, H, N, dtype=torch.float32, device="cuda")
    grads = [torch.empty_like(z) for z in (r, wr, k, v, a, b)]

    def fwd():
        op.forward(r, wr, k, v, a, b, y, s, sa)

    def fwd_bwd():
        op.forward(r, wr, k, v, a, b, y, s, sa)
        op.backward(r, wr, k, v, a, b, dy, s, sa, *grads)

    fwd()
    torch.cuda.synchronize()
    y_out = y.float().cpu().numpy()
    f_ms = 1e3 * common.cuda_time(fwd, reps)
    b_ms = 1e3 * common.cuda_time(fwd_bwd, reps)
    fwd_bwd()
    torch.cuda.synchronize()
    g = [z.float().cpu().numpy() for z in grads]
    # d/d(raw decay) -> d/d(log decay): the chain rule through logw = W_SCALE * sigmoid(wr)
    sig = 1.0 / (1.0 + np.exp(-x["wr"].astype(np.float64)))
    with np.errstate(divide="ignore", invalid="ignore"):
        g[1] = np.where(sig > 0, g[1] / (W_SCALE * sig * (1 - sig)), 0.0)
    return f_ms, b_ms, y_out, g


def fla_rows(x, reps):
    import torch  # noqa: PLC0415
    from fla.ops.rwkv7 import chunk_rwkv7  # noqa: PLC0415

    t = lambda a: torch.tensor(a, device="cuda").bfloat16().contiguous().requires_grad_()  # noqa: E731
    r, w, k, v, a, b = (t(x[n]) for n in ("r", "logw", "k", "v", "a", "b"))
    dy = torch.tensor(x["dy"], device="cuda").bfloat16()

    def fwd():
        with torch.no_grad():
            return chunk_rwkv7(r, w, k, v, a, b, scale=1.0)[0]

    def fwd_bwd():
        for z in (r, w, k, v, a, b):
            z.grad = None
        out = chunk_rwkv7(r, w, k, v, a, b, scale=1.0)[0]
        out.backward(dy)

    y_out = fwd().float().cpu().numpy()
    f_ms = 1e3 * common.cuda_time(fwd, reps)
    b_ms = 1e3 * common.cuda_time(fwd_bwd, reps)
    fwd_bwd()
    g = [z.grad.float().cpu().numpy() for z in (r, w, k, v, a, b)]
    return f_ms, b_ms, y_out, g


@dataclasses.dataclass
class Row7:
    shape: str
    impl: str
    fwd_ms: float | None = None
    fb_ms: float | None = None
    y_err: float | None = None
    g_err: float | None = None
    note: str = ""


def render7(rows, device):
    f = common.fmt
    out = [f"RWKV-7 WKV, device: {device}; bf16 inputs (our log decay float32), float32 state",
           "| shape B,T,H,N | impl | fwd ms | fwd+bwd ms | y rel err | grad rel err | note |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r.shape} | {r.impl} | {f(r.fwd_ms, '.3f')} | {f(r.fb_ms, '.3f')} | "
                   f"{f(r.y_err, '.1e')} | {f(r.g_err, '.1e')} | {r.note} |")
    return "\n".join(out)


def run7(args, device, deadline):
    log = common.log
    rows = []
    reps = 3 if args.quick else 7
    official = []
    if args.peer7_src:
        try:
            official = load_official(args.peer7_src)
        except Exception as e:  # noqa: BLE001
            log(f"official RWKV-7 kernel unavailable: {e!r}\n{traceback.format_exc()[-2000:]}")

    def save():
        if args.out:
            with open(os.path.join(args.out, "table7.md"), "w") as fh:
                fh.write(render7(rows, device) + "\n")

    for B, T, H, N in args.shapes7:
        shape = f"{B},{T},{H},{N}"
        x = make_inputs(B, T, H, N)
        ref_args = _jax_args(x, jnp.float32)
        t0 = time.perf_counter()
        ref_fb = _loss_grad(_ours("scan"))
        dy = jnp.asarray(x["dy"])
        with jax.default_matmul_precision("highest"):
            y_ref = np.asarray(jax.jit(_ours("scan"))(*ref_args))
            g_ref = [np.asarray(g) for g in ref_fb(*ref_args, dy)[1]]
        log(f"[{shape}] float32 scan reference in {time.perf_counter() - t0:.1f} s")
        g_ref = [g_ref[1], g_ref[0]] + g_ref[2:]  # back to (r, w, k, v, a, b)
        g_err = lambda g: max(common.rel_err(a, b) for a, b in zip(g, g_ref))  # noqa: E731

        def measure(name, fill):
            """One row: fill(row) sets its times and errors; a failure is noted, not fatal."""
            row = Row7(shape, name)
            rows.append(row)
            if time.perf_counter() > deadline:
                row.note = "skipped: out of time"
                return
            try:
                fill(row)
            except Exception as e:  # noqa: BLE001
                row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                log(traceback.format_exc()[-3000:])
            save()
            log(f"  {shape} {name}: fwd {common.fmt(row.fwd_ms, '.3f')} ms, fwd+bwd "
                f"{common.fmt(row.fb_ms, '.3f')} ms, y err {common.fmt(row.y_err, '.1e')}, "
                f"grad err {common.fmt(row.g_err, '.1e')} {row.note}")

        def ours(row, impl):
            y_of = _ours(impl)
            args_bf = _jax_args(x, jnp.bfloat16)
            fwd = jax.jit(y_of)
            fb = _loss_grad(y_of)
            row.y_err = common.rel_err(np.asarray(fwd(*args_bf)), y_ref)
            row.fwd_ms = 1e3 * common.device_time(fwd, [args_bf], reps=reps)
            g = [np.asarray(g) for g in fb(*args_bf, dy)[1]]
            row.g_err = g_err([g[1], g[0]] + g[2:])
            row.fb_ms = 1e3 * common.device_time(fb, [args_bf + (dy,)], reps=reps)

        def peer(row, fn):
            row.fwd_ms, row.fb_ms, y, g = fn(x, reps)
            row.y_err = common.rel_err(y, y_ref)
            row.g_err = g_err(g)

        for impl in args.impls7:
            measure(impl, functools.partial(ours, impl=impl))
        for n in official:
            measure(f"official CUDA (RWKV-LM {n})",
                    functools.partial(peer, fn=functools.partial(official_rows, name=n)))
        if not args.no_fla:
            measure("fla chunk_rwkv7", functools.partial(peer, fn=fla_rows))
        try:
            import torch  # noqa: PLC0415

            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass
    return rows


# --------------------------------------------------------------------------- kernel-by-kernel


def _cfg_of(spec):
    """'L,BV,warps_fwd,warps_scan,warps_bwd,stages_scan,BK,warps_lam' -> pallas Config
    (a prefix: the fields left out keep their defaults)."""
    from rwkv_jax.ops.pallas import wkv7 as pk  # noqa: PLC0415

    keys = ("chunk", "block_v", "warps_fwd", "warps_scan", "warps_bwd", "stages_scan",
            "block_k", "warps_lam")
    return pk.Config(**{k: int(v) for k, v in zip(keys, spec.split(","))})


def stage_sweep(shape, specs, deadline):
    """ms per kernel call of each of the four Pallas kernels, per tiling."""
    from rwkv_jax.ops.pallas import wkv7 as pk  # noqa: PLC0415

    log = common.log
    B, T, H, N = shape
    x = make_inputs(B, T, H, N)
    r, w, k, v, a, b = (jnp.asarray(x[n], jnp.float32 if n == "logw" else jnp.bfloat16)
                        for n in ("r", "logw", "k", "v", "a", "b"))
    dy = jnp.asarray(x["dy"])
    log(f"stage sweep on B,T,H,N={B},{T},{H},{N} (ms per kernel call)")
    for spec in specs:
        if time.perf_counter() > deadline:
            log("  out of time")
            break
        try:
            cfg = _cfg_of(spec).fit(T, N)
            st = pk._stages(B, T, H, N, [z.dtype for z in (r, w, k, v, a, b)], cfg,
                            common.INTERPRET)
            m0 = jnp.zeros((B, H, N, N))
            p, e, q, f, mx = jax.jit(st["maps"])(r, w, k, v, a, b)
            y, u, ms, m_t = jax.jit(st["scan"])(w, k, v, b, p, e, q, f, m0)
            dms, _ = jax.jit(st["adjoint"])(w, b, p, e, dy, m0)
            lam, _ = jax.jit(st["lam"])(w, k, b, mx, dms, dy)
            args = dict(maps=(w, r, k, v, a, b), scan=(w, k, v, b, p, e, q, f, m0),
                        adjoint=(w, b, p, e, dy, m0), lam=(w, k, b, mx, dms, dy),
                        grads=(w, r, k, v, a, b, u, lam, ms, dms, dy))
            swap = dict(maps=lambda f: lambda w, r, *z: f(r, w, *z),
                        grads=lambda f: lambda w, r, *z: f(r, w, *z))
            res = {}
            for name, fn in st.items():
                fn = swap.get(name, lambda f: f)(fn)
                res[name] = 1e3 * common.device_time(jax.jit(fn), [args[name]], reps=3,
                                                     target_s=0.02)
            log(f"  {spec}: " + ", ".join(f"{n} {t:.3f}" for n, t in res.items())
                + f"; fwd {res['maps'] + res['scan']:.3f}, "
                f"bwd {res['adjoint'] + res['lam'] + res['grads']:.3f}")
        except Exception as e:  # noqa: BLE001
            log(f"  {spec}: failed {type(e).__name__}: {str(e).splitlines()[0][:150]}")
