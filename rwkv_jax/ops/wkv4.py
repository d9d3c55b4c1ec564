"""The RWKV-4 WKV recurrence as pure functions over arrays.

Per channel c, with decay w = -exp(time_decay) < 0 and bonus u = time_first:

    y_t = (sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t)
        / (sum_{i<t} e^{(t-1-i) w + k_i}     + e^{u + k_t})

The state after a prefix is the pair (numerator, denominator) of those sums, kept as
(aa, bb, pp) with numerator = aa * e^pp and denominator = bb * e^pp, so that nothing
overflows for any T, decay or key (the official kernels' trick). A zero state is
aa = bb = 0 with pp very negative.

Every form takes and returns the state, so one call over T tokens equals several calls over
pieces of T with the state passed along. All math is float32, whatever the input dtype.

The stabiliser pp (a running max) cancels out of everything the state means, so it is held
under stop_gradient: gradients then flow through aa, bb and the explicit pp terms only, which
is exact for any function of the outputs and of the state's meaning (aa*e^pp, bb*e^pp),
and cheaper than differentiating the max.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from rwkv_jax.config.schema import WKV_IMPLS

# exp(NEG_INF - anything finite) underflows to exactly 0, and adding a decay to it stays
# finite in float32, so no inf - inf ever appears.
NEG_INF = -1e38

IMPLS = WKV_IMPLS["4"]


class WKVState(NamedTuple):
    aa: jax.Array  # (B, C) numerator / e^pp
    bb: jax.Array  # (B, C) denominator / e^pp
    pp: jax.Array  # (B, C) log scale


def zero_state(batch_size: int, channels: int) -> WKVState:
    zeros = jnp.zeros((batch_size, channels), jnp.float32)
    return WKVState(zeros, zeros, jnp.full((batch_size, channels), NEG_INF, jnp.float32))


def _sg_max(a, b):
    return lax.stop_gradient(jnp.maximum(a, b))


def _readout(state: WKVState, u, k, v):
    """Output for the current token given the state before it (the e^{u+k} bonus term)."""
    aa, bb, pp = state
    ww = u + k
    p = _sg_max(pp, ww)
    e1 = jnp.exp(pp - p)
    e2 = jnp.exp(ww - p)
    return (e1 * aa + e2 * v) / (e1 * bb + e2)


def _wkv_scan(w, u, k, v, state: WKVState):
    """Token by token: the reference form, and the decode path (T = 1)."""

    def step(carry, kv):
        aa, bb, pp = carry
        kt, vt = kv
        y = _readout(carry, u, kt, vt)
        ww = w + pp
        p = _sg_max(ww, kt)
        e1 = jnp.exp(ww - p)
        e2 = jnp.exp(kt - p)
        return WKVState(e1 * aa + e2 * vt, e1 * bb + e2, p), y

    final, ys = lax.scan(step, state, (jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)))
    return jnp.swapaxes(ys, 0, 1), final


def _combine(w):
    """Compose two span maps: (num, den) -> e^{n w} (num, den) + (a, b) e^p, first then second.

    Composition is associative, and a span's length is all we need of its decay because w
    does not change over time.
    """

    def combine(first, second):
        n1, a1, b1, p1 = first
        n2, a2, b2, p2 = second
        q1 = p1 + n2 * w  # the first span's sums, decayed across the second span
        p = _sg_max(q1, p2)
        e1 = jnp.exp(q1 - p)
        e2 = jnp.exp(p2 - p)
        return n1 + n2, e1 * a1 + e2 * a2, e1 * b1 + e2 * b2, p

    return combine


def _prefix_maps(w, span, a, b, p, axis):
    """Inclusive prefix composition of span maps along `axis` (lax.associative_scan)."""
    shape = [1] * a.ndim
    shape[axis] = a.shape[axis]
    n = jnp.full(shape, span, a.dtype)
    _, a, b, p = lax.associative_scan(_combine(w), (n, a, b, p), axis=axis)
    return a, b, p


def _fold(w, s0, steps, a, b, p):
    """The state s0, decayed over `steps` tokens, plus a prefix map's sums (a, b) e^p."""
    aa0, bb0, pp0 = s0
    q0 = pp0 + steps * w
    pt = _sg_max(q0, p)
    e0 = jnp.exp(q0 - pt)
    et = jnp.exp(p - pt)
    return WKVState(e0 * aa0 + et * a, e0 * bb0 + et * b, pt)


def _shift_in(first: WKVState, after: WKVState, axis: int) -> WKVState:
    """States before each token: the incoming one, then the states after each earlier token."""
    return WKVState(*(jnp.concatenate([jnp.expand_dims(f, axis), jnp.delete(s, -1, axis=axis)],
                                      axis=axis)
                      for f, s in zip(first, after)))


def _wkv_assoc(w, u, k, v, state: WKVState):
    """All prefix states at once with lax.associative_scan (log T depth)."""
    T = k.shape[1]
    a, b, p = _prefix_maps(w, 1.0, v, jnp.ones_like(v), k, axis=1)
    t = jnp.arange(1, T + 1, dtype=k.dtype)[None, :, None]
    after = _fold(w, tuple(s[:, None, :] for s in state), t, a, b, p)
    y = _readout(_shift_in(state, after, axis=1), u, k, v)
    return y, WKVState(*(s[:, -1] for s in after))


def _wkv_chunked(w, u, k, v, state: WKVState, chunk_size: int, block_chunks: int = 64):
    """Parallel within chunks, state carried between them.

    Every chunk scans its own tokens from nothing, all chunks at once (log chunk_size levels
    over the whole tensor, half the levels of a full-length scan at the usual sizes); then the
    chunks' summaries are composed (a scan over T / chunk_size small maps) to give each chunk
    its incoming state, which is folded into its local prefixes. Sequences longer than
    `block_chunks` chunks run block by block under lax.scan with each block rematerialised,
    so memory stays bounded however long T is.
    """
    B, T, C = k.shape
    block = chunk_size * block_chunks
    if T > block:
        n_full = T // block
        run = jax.checkpoint(functools.partial(_wkv_chunked, w, u, chunk_size=chunk_size,
                                               block_chunks=block_chunks))

        def body(s, kv):
            y, s = run(kv[0], kv[1], s)
            return s, y

        split = lambda x: jnp.moveaxis(  # noqa: E731
            x[:, : n_full * block].reshape(B, n_full, block, C), 1, 0)
        state, y = lax.scan(body, state, (split(k), split(v)))
        ys = [jnp.moveaxis(y, 0, 1).reshape(B, n_full * block, C)]
        if T % block:
            y, state = run(k[:, n_full * block :], v[:, n_full * block :], state)
            ys.append(y)
        return jnp.concatenate(ys, axis=1) if len(ys) > 1 else ys[0], state

    L = min(chunk_size, T)
    n = -(-T // L)
    pad = n * L - T
    if pad:  # tokens of zero weight (e^k = 0): they change nothing that is read back
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0)), constant_values=NEG_INF)
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0)))
    kc, vc = k.reshape(B, n, L, C), v.reshape(B, n, L, C)
    a, b, p = _prefix_maps(w, 1.0, vc, jnp.ones_like(vc), kc, axis=2)  # within each chunk
    sums = _prefix_maps(w, float(L), a[:, :, -1], b[:, :, -1], p[:, :, -1], axis=1)  # across
    j = jnp.arange(1, n + 1, dtype=k.dtype)[None, :, None] * L
    after_chunk = _fold(w, tuple(s[:, None, :] for s in state), j, *sums)
    incoming = _shift_in(state, after_chunk, axis=1)  # (B, n, C) each
    t = jnp.arange(1, L + 1, dtype=k.dtype)[None, None, :, None]
    after = _fold(w, tuple(s[:, :, None, :] for s in incoming), t, a, b, p)
    y = _readout(_shift_in(incoming, after, axis=2), u, kc, vc).reshape(B, n * L, C)[:, :T]
    final = WKVState(*(s.reshape(B, n * L, C)[:, T - 1] for s in after))
    return y, final


def default_impl(seq_len: int) -> str:
    """The fastest correct form for this platform and length.

    GPU: the Pallas kernel. CPU: the plain scan, whose one pass beats the scans' extra levels
    there (figures in docs/performance.md). Elsewhere the chunked form, parallel and of bounded
    memory. A one-token step (decode) is a scan step everywhere.
    """
    backend = jax.default_backend()
    if seq_len == 1 or backend == "cpu":
        return "scan"
    if backend == "gpu" and _pallas_wkv4() is not None:
        return "pallas"
    return "chunked"


def _pallas_wkv4():
    try:
        from rwkv_jax.ops.pallas import common  # noqa: PLC0415
        from rwkv_jax.ops.pallas import wkv4 as pallas_wkv4  # noqa: PLC0415
    except ImportError:
        return None
    if common.plgpu is None and jax.default_backend() == "gpu":
        return None  # this jax has no Pallas Triton backend
    return pallas_wkv4.wkv4


def wkv4(
    time_decay: jax.Array,
    time_first: jax.Array,
    k: jax.Array,
    v: jax.Array,
    state: WKVState | tuple | None = None,
    *,
    impl: str = "auto",
    chunk_size: int = 64,
) -> tuple[jax.Array, WKVState]:
    """RWKV-4 WKV over a sequence.

    Args:
      time_decay: (C,) raw parameter; the per-step decay is exp(-exp(time_decay)).
      time_first: (C,) raw parameter u, the current token's bonus.
      k, v: (B, T, C) keys and values, any float dtype (computed in float32).
      state: (aa, bb, pp), each (B, C) float32, or None for the zero state.
      impl: "scan" (recurrent), "assoc" (associative scan), "chunked" (parallel within chunks
        of `chunk_size`, sequential across them), "pallas" (GPU kernel), or "auto".
      chunk_size: chunk length for impl="chunked".

    Returns:
      y: (B, T, C) float32 (float64 for float64 inputs), and the state after the last token.
    """
    if impl not in IMPLS:
        raise ValueError(f"wkv4 impl={impl!r} is not one of {IMPLS}")
    if k.ndim != 3 or k.shape != v.shape:
        raise ValueError(f"wkv4 wants k and v of one shape (B, T, C); got {k.shape} and {v.shape}")
    B, T, C = k.shape
    if time_decay.shape != (C,) or time_first.shape != (C,):
        raise ValueError(
            f"wkv4 wants time_decay and time_first of shape ({C},); got "
            f"{time_decay.shape} and {time_first.shape}"
        )
    if chunk_size < 1:
        raise ValueError(f"wkv4 chunk_size must be >= 1, got {chunk_size}")
    # float32 at least: half-precision inputs are upcast; float64 (tests) stays float64.
    dt = jnp.promote_types(k.dtype, jnp.float32)
    state = zero_state(B, C) if state is None else state
    state = WKVState(*(jnp.asarray(s, dt) for s in state))
    w = -jnp.exp(time_decay.astype(dt))
    u = time_first.astype(dt)
    k_in, v_in = k, v  # the Pallas kernel reads half-precision inputs as they are
    k = k.astype(dt)
    v = v.astype(dt)
    if T == 0:
        return jnp.zeros((B, 0, C), dt), state

    if impl == "auto":
        impl = default_impl(T)
    if impl == "scan":
        return _wkv_scan(w, u, k, v, state)
    if impl == "assoc":
        return _wkv_assoc(w, u, k, v, state)
    if impl == "chunked":
        return _wkv_chunked(w, u, k, v, state, chunk_size)
    kernel = _pallas_wkv4()
    if kernel is None:
        raise ValueError("wkv4 impl='pallas' needs rwkv_jax.ops.pallas, which is not available here")
    if k_in.dtype == v_in.dtype and jnp.dtype(k_in.dtype).itemsize < jnp.dtype(dt).itemsize:
        k, v = k_in, v_in
    return kernel(w, u, k, v, state)
