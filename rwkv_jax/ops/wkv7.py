"""The RWKV-7 WKV recurrence ("generalised delta rule") as pure functions over arrays.

Per head, with state S (N x N, rows indexed by value channel i, columns by key channel j,
the official layout) and per-token vectors r, w, k, v, a, b of size N:

    S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t) b_t^T + v_t k_t^T
    y_t = S_t r_t

w is the log of the decay (<= 0). RWKV-7 uses a = -kk, b = kk * iclr (kk the normalised key):
the state first forgets what it holds along kk, then writes v along k. The official CUDA
kernels take the raw decay parameter and apply exp(-0.6065 sigmoid(.)) inside; here the caller
passes the log decay (as fla does), so the op stays one recurrence with no model choices in it.

Forms (same contract, same results to float32 rounding):

  scan     token by token; the reference, and the decode step.
  chunked  parallel within chunks of L tokens using matrix products (the WY form of the
           delta rule), associative scan over chunk summaries; the tensor cores do the work.
  pallas   the GPU kernel (rwkv_jax.ops.pallas.wkv7).

The chunked form, with M = S^T (key x value), c_t = sum_{s<=t} w_s inside a chunk, and
u_t = S_{t-1} a_t (what the delta rule removes at t):

    u_t = (a_t e^{c_{t-1}})^T M_0 + sum_{s<t} (a_t e^{c_{t-1}-c_s})^T (b_s u_s^T + k_s v_s^T)
    y_t = (r_t e^{c_t})^T M_0     + sum_{s<=t} (r_t e^{c_t - c_s})^T (b_s u_s^T + k_s v_s^T)
    M_L = e^{c_L} M_0             + sum_s e^{c_L - c_s} (b_s u_s^T + k_s v_s^T)

The first line is a unit lower-triangular system in U = (u_t), solved once per chunk by
inverting it (unit_lower_inverse), which makes every output and the chunk's end state affine in M_0:  Y = E M_0 + F,  M_L = G M_0 + H.
The maps (G, H) compose associatively across chunks.

Range: the chunked form scales by e^{+-c/2} around the chunk's middle, so it needs
sum |w| over one chunk below ~170 (float32). RWKV-7's decay keeps |w| < 0.61 per token, so any
chunk up to 256 tokens is safe; the scan has no limit.

All math is float32 (float64 stays float64), whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from rwkv_jax.config.schema import WKV_IMPLS

IMPLS = WKV_IMPLS["7"]


def zero_state(batch_size: int, n_head: int, head_size: int, dtype=jnp.float32) -> jax.Array:
    return jnp.zeros((batch_size, n_head, head_size, head_size), dtype)


def _wkv7_scan(r, w, k, v, a, b, state):
    """(B, T, H, N) inputs, state (B, H, N, N) -> y (B, T, H, N), state."""
    hp = lax.Precision.HIGHEST

    def step(S, x):
        rt, wt, kt, vt, at, bt = x
        sa = jnp.einsum("bhij,bhj->bhi", S, at, precision=hp)
        S = (S * jnp.exp(wt)[:, :, None, :] + sa[..., None] * bt[:, :, None, :]
             + vt[..., None] * kt[:, :, None, :])
        return S, jnp.einsum("bhij,bhj->bhi", S, rt, precision=hp)

    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (r, w, k, v, a, b))
    state, ys = lax.scan(step, state, xs)
    return jnp.swapaxes(ys, 0, 1), state


def _tril(x, diagonal: int):
    L = x.shape[-1]
    keep = jnp.arange(L)[:, None] >= jnp.arange(L)[None, :] + (-diagonal)
    return jnp.where(keep, x, 0)


def unit_lower_inverse(a: jax.Array) -> jax.Array:
    """(I - a)^{-1} for strictly lower-triangular a (..., L, L), by block doubling.

    Level by level, each pair of adjacent diagonal blocks (size m) merges into one of size 2m:
    (I - [[A11, 0], [A21, A22]])^{-1} = [[X1, 0], [X2 A21 X1, X2]], X_i = (I - A_ii)^{-1}.
    Every level is exact block algebra on the true inverse (no power series whose terms could
    cancel): log2(L) levels of matrix products. Used rather than a triangular solve, which XLA's CPU runtime
    can deadlock on when several run concurrently (one per layer in a model).
    """
    hp = lax.Precision.HIGHEST
    L = a.shape[-1]
    t = jnp.arange(L)[:, None]
    s = jnp.arange(L)[None, :]
    x = jnp.broadcast_to(jnp.eye(L, dtype=a.dtype), a.shape)
    m = 1
    while m < L:
        off = ((t // (2 * m)) == (s // (2 * m))) & ((t // m) % 2 == 1) & ((s // m) % 2 == 0)
        x = x + jnp.matmul(jnp.matmul(x, jnp.where(off, a, 0), precision=hp), x, precision=hp)
        m *= 2
    return x


def chunk_maps(r, w, k, v, a, b):
    """Per chunk, the affine maps of the incoming state M_0 (key x value):

        Y = E @ M_0 + F   (outputs, L x N)     M_L = G @ M_0 + H   (end state, N x N)

    Inputs are (..., L, N) per chunk; returns E, F (..., L, N), G, H (..., N, N).
    """
    hp = lax.Precision.HIGHEST
    mm = lambda x, y: jnp.matmul(x, y, precision=hp)  # noqa: E731
    t_ = lambda x: jnp.swapaxes(x, -1, -2)  # noqa: E731
    L = w.shape[-2]
    c = jnp.cumsum(w, axis=-2)  # inclusive log decay from the chunk start
    ce = c - w  # exclusive: the decay before token t is applied
    c_end = c[..., -1:, :]
    mid = 0.5 * c_end  # scaling around the middle halves the exponents' range
    rq = r * jnp.exp(c - mid)
    aq = a * jnp.exp(ce - mid)
    kd = k * jnp.exp(mid - c)
    bd = b * jnp.exp(mid - c)

    a_b = _tril(mm(aq, t_(bd)), -1)  # (L, L): u_t's dependence on u_s, s < t
    a_k = _tril(mm(aq, t_(kd)), -1)
    r_b = _tril(mm(rq, t_(bd)), 0)
    r_k = _tril(mm(rq, t_(kd)), 0)

    # U = (I - a_b)^{-1} [ (a e^{ce}) M_0 + a_k V ]  =  P M_0 + Q
    tinv = unit_lower_inverse(a_b)
    P = mm(tinv, a * jnp.exp(ce))
    Q = mm(tinv, mm(a_k, v))

    E = r * jnp.exp(c) + mm(r_b, P)
    F = mm(r_b, Q) + mm(r_k, v)
    tail = jnp.exp(c_end - c)
    bt, kt = b * tail, k * tail
    G = jnp.exp(c_end)[..., 0, :, None] * jnp.eye(w.shape[-1], dtype=w.dtype) + mm(t_(bt), P)
    H = mm(t_(bt), Q) + mm(t_(kt), v)
    return E, F, G, H


def _compose(first, second):
    """(G, H) maps M -> G M + H; apply `first`, then `second`."""
    g1, h1 = first
    g2, h2 = second
    hp = lax.Precision.HIGHEST
    return jnp.matmul(g2, g1, precision=hp), jnp.matmul(g2, h1, precision=hp) + h2


def _wkv7_chunked(r, w, k, v, a, b, state, chunk_size: int):
    B, T, H, N = r.shape
    L = min(chunk_size, T)
    n = -(-T // L)
    pad = n * L - T
    if pad:  # w = 0 and zero vectors: padded tokens leave the state as it is
        r, w, k, v, a, b = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
                            for x in (r, w, k, v, a, b))
    # (B, T, H, N) -> (B, H, n, L, N)
    chunks = lambda x: jnp.moveaxis(x.reshape(B, n, L, H, N), 3, 1)  # noqa: E731
    E, F, G, Hm = chunk_maps(*(chunks(x) for x in (r, w, k, v, a, b)))

    m0 = jnp.swapaxes(state, -1, -2)  # (B, H, N, N) key x value
    g_all, h_all = lax.associative_scan(_compose, (G, Hm), axis=2)
    hp = lax.Precision.HIGHEST
    after = jnp.matmul(g_all, m0[:, :, None], precision=hp) + h_all  # state after each chunk
    before = jnp.concatenate([m0[:, :, None], after[:, :, :-1]], axis=2)
    y = jnp.matmul(E, before, precision=hp) + F  # (B, H, n, L, N)
    y = jnp.moveaxis(y, 1, 3).reshape(B, n * L, H, N)[:, :T]
    return y, jnp.swapaxes(after[:, :, -1], -1, -2)


def default_impl(seq_len: int, head_size: int = 64) -> str:
    """Short inputs (decode steps): the scan. GPU: the Pallas kernel when this jax has it and
    the head size is a power of two >= 16 (its tiles). Elsewhere the chunked form, whose
    matrix products beat the scan's per-token N x N updates on CPU too (figures in
    docs/performance.md)."""
    backend = jax.default_backend()
    if seq_len < 16:
        return "scan"
    pow2 = head_size >= 16 and head_size & (head_size - 1) == 0
    if backend == "gpu" and pow2 and _pallas_wkv7() is not None:
        return "pallas"
    return "chunked"


def _pallas_wkv7():
    try:
        from rwkv_jax.ops.pallas import common  # noqa: PLC0415
        from rwkv_jax.ops.pallas import wkv7 as pallas_wkv7  # noqa: PLC0415
    except ImportError:
        return None
    if common.plgpu is None and jax.default_backend() == "gpu":  # no Pallas Triton backend
        return None
    return pallas_wkv7.wkv7


def wkv7(
    r: jax.Array,
    w: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    state: jax.Array | None = None,
    *,
    impl: str = "auto",
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """RWKV-7 WKV over a sequence.

    Args:
      r, w, k, v, a, b: (B, T, H, N); w is the log decay (<= 0), the others any float dtype.
      state: (B, H, N, N) float32 in the official layout (value x key), or None for zeros.
      impl: "scan", "chunked", "pallas" or "auto" (see the module docstring).
      chunk_size: tokens per chunk for impl="chunked".

    Returns:
      y: (B, T, H, N) float32 (float64 for float64 inputs), and the state after the last token.
    """
    if impl not in IMPLS:
        raise ValueError(f"wkv7 impl={impl!r} is not one of {IMPLS}")
    shapes = {n: x.shape for n, x in zip("rwkvab", (r, w, k, v, a, b))}
    if r.ndim != 4 or len(set(shapes.values())) != 1:
        raise ValueError(f"wkv7 wants r, w, k, v, a, b of one shape (B, T, H, N); got {shapes}")
    B, T, H, N = r.shape
    if state is not None and state.shape != (B, H, N, N):
        raise ValueError(f"wkv7 state must have shape {(B, H, N, N)}, got {state.shape}")
    if chunk_size < 1:
        raise ValueError(f"wkv7 chunk_size must be >= 1, got {chunk_size}")
    dt = jnp.promote_types(r.dtype, jnp.float32)
    state = zero_state(B, H, N, dt) if state is None else state.astype(dt)
    if T == 0:
        return jnp.zeros((B, 0, H, N), dt), state
    if impl == "auto":
        impl = default_impl(T, N)
    if impl == "pallas":
        kernel = _pallas_wkv7()
        if kernel is None:
            raise ValueError("wkv7 impl='pallas' needs rwkv_jax.ops.pallas.wkv7, not available here")
        y, state = kernel(r, w, k, v, a, b, state)
        return checkpoint_name(y, "wkv"), checkpoint_name(state, "wkv")
    r, w, k, v, a, b = (x.astype(dt) for x in (r, w, k, v, a, b))
    if impl == "scan":
        return _wkv7_scan(r, w, k, v, a, b, state)
    return _wkv7_chunked(r, w, k, v, a, b, state, chunk_size)
