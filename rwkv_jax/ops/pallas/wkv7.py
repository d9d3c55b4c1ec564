"""RWKV-7 WKV as fused chunked Pallas kernels, forward and backward (jax.custom_vjp).

Same contract as rwkv_jax.ops.wkv7 (its docstring has the recurrence and the chunk algebra).
In the key x value orientation M = S^T the recurrence is

    M_t = diag(e^{w_t}) M_{t-1} + b_t (a_t^T M_{t-1}) + k_t v_t^T,     y_t = M_t^T r_t

so every value column of M evolves on its own: the programs split the value channels into
blocks of BV and each walks all of T for one (batch, head, value block), the state tile
(N x BV, float32) held in registers from the first chunk to the last. Per chunk of L tokens
everything is matrix products on the tensor cores:

  forward   A_ab, A_ak, A_rb, A_rk  (L x L, decays folded in around the chunk's middle)
            Tinv = (I - A_ab)^{-1}  by block doubling: log2(L) levels of X += X A_off X,
                                    each level exact, so no power series that could cancel
            U  = Tinv (Ã M + A_ak V)            what the delta rule removes, per token
            Y  = R̃ M + A_rb U + A_rk V
            M' = diag(γ) M + B̂^T U + K̂^T V      (γ = the chunk's total decay)
            and M itself is stored at every chunk start for the backward.
  backward  the adjoint scan walks the chunks last to first with the adjoint dM of the
            state after each chunk (dM_prev = γ dM + R̃^T dY + Ã^T Λ) and stores it; then,
            every chunk at once, one kernel makes the sums over key channels
            Λ = Tinv^T (A_rb^T dY + B̂ dM)       (the adjoint of U's right-hand side)
            and dV, and a second, per block of key channels, the L x L mixes' adjoints and
            dr, dk, da, db, dw through the decay-scaled factors (one program for all key
            channels held too many tiles at once and spilled its registers).

The middle-of-chunk scaling cancels out of every product, so it is held constant in the
backward. Large dots use TF32 on the tensor cores (inputs are bf16 in training anyway); the
L x L inverse uses full float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl

from rwkv_jax.ops.pallas.common import call as _call
from rwkv_jax.ops.pallas.common import next_pow2 as _next_pow2
from rwkv_jax.ops.pallas.common import sds as _sds


@dataclasses.dataclass(frozen=True)
class Config:
    chunk: int = 16  # tokens per chunk (L)
    block_v: int = 64  # value channels per program of the sequential kernels (BV)
    warps_fwd: int = 4  # chunk-parallel forward kernel
    warps_scan: int = 4  # the two sequential kernels
    block_k: int = 64  # key channels per program of the gradient kernel (BK)
    warps_lam: int = 4  # chunk-parallel kernel of the adjoint Lambda and dv
    warps_bwd: int = 4  # chunk-parallel gradient kernel
    stages_scan: int = 3  # software-pipelining depth of the sequential kernels' loads
    # Tensor-core dots: TF32 for half-precision inputs (they carry 8 bits already), three TF32
    # passes (float32 accuracy) for float32 inputs; False: float32 FMAs throughout.
    tf32: bool = True
    inverse_x3: bool = False  # Tinv with three TF32 passes (~float32) instead of float32 FMAs

    def fit(self, T: int, N: int) -> "Config":
        return dataclasses.replace(self, chunk=max(16, min(self.chunk, _next_pow2(T))),
                                   block_v=min(self.block_v, N), block_k=min(self.block_k, N))

    def check(self, N: int) -> None:
        for name in ("chunk", "block_v", "block_k"):
            val = getattr(self, name)
            if val < 16 or val & (val - 1):
                raise ValueError(f"wkv7 pallas Config.{name}={val} must be a power of two >= 16")
        if N < 16 or N & (N - 1):
            raise ValueError(f"wkv7 pallas kernel needs a head size that is a power of two >= 16, "
                             f"got {N}")
        for name in ("block_v", "block_k"):
            if N % getattr(self, name):
                raise ValueError(f"wkv7 pallas Config.{name}={getattr(self, name)} must divide "
                                 f"N={N}")


DEFAULT_CONFIG = Config()


# --------------------------------------------------------------------------- in-kernel algebra


def _dot_fns(fast_precision):
    """dot(x, y) = x @ y, with transposes spelled out so Triton sees plain 2-D dots."""

    def dot(x, y, precision=fast_precision):
        return jnp.dot(x, y, precision=precision, preferred_element_type=jnp.float32)

    def dot_nt(x, y, precision=fast_precision):  # x @ y^T
        return lax.dot_general(x, y, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)

    def dot_tn(x, y, precision=fast_precision):  # x^T @ y
        return lax.dot_general(x, y, (((0,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)

    return dot, dot_nt, dot_tn


def _iota2(L):
    t = lax.broadcasted_iota(jnp.int32, (L, L), 0)
    s = lax.broadcasted_iota(jnp.int32, (L, L), 1)
    return t, s


def _decays(r, w, k, a, b):
    """The chunk's decays and the decay-scaled inputs (elementwise; cheap to recompute)."""
    c = jnp.cumsum(w, axis=0)  # (L, N) inclusive log decay
    ce = c - w
    c_l = jnp.sum(w, axis=0, keepdims=True)  # (1, N) the chunk's total
    mid = 0.5 * c_l
    e_in = jnp.exp(mid - c)
    e_out = jnp.exp(c_l - c)
    return dict(c=c, ce=ce, c_l=c_l, mid=mid, rq=r * jnp.exp(c - mid),
                aq=a * jnp.exp(ce - mid), kd=k * e_in, bd=b * e_in, a_t=a * jnp.exp(ce),
                r_t=r * jnp.exp(c), b_h=b * e_out, k_h=k * e_out)


def _mixes(q, L, dots, exact):
    """The chunk's L x L token-to-token products and Tinv = (I - a_ab)^{-1}."""
    dot, dot_nt, _ = dots
    t, s = _iota2(L)
    strict, incl = s < t, s <= t
    a_ab = jnp.where(strict, dot_nt(q["aq"], q["bd"]), 0.0)
    a_ak = jnp.where(strict, dot_nt(q["aq"], q["kd"]), 0.0)
    a_rb = jnp.where(incl, dot_nt(q["rq"], q["bd"]), 0.0)
    a_rk = jnp.where(incl, dot_nt(q["rq"], q["kd"]), 0.0)
    # The inverse of each diagonal block of size m, doubled each level: exact block algebra,
    # so no power series whose terms could cancel.
    x = jnp.where(t == s, 1.0, 0.0).astype(jnp.float32)
    m = 1
    while m < L:
        off = ((t // (2 * m)) == (s // (2 * m))) & (((t // m) % 2) == 1) & (((s // m) % 2) == 0)
        x = x + dot(dot(x, jnp.where(off, a_ab, 0.0), exact), x, exact)
        m *= 2
    return dict(a_ab=a_ab, a_ak=a_ak, a_rb=a_rb, a_rk=a_rk, tinv=x)


MIXES = ("a_ak", "a_rb", "a_rk", "tinv")  # what the backward reads (it never needs a_ab)


def _chunk_setup(r, w, k, a, b, L, dots, exact):
    """Everything in a chunk that does not depend on the state."""
    q = _decays(r, w, k, a, b)
    return {**q, **_mixes(q, L, dots, exact)}


# --------------------------------------------------------------------------- kernels


def _maps_kernel(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, p_ref, e_ref, q_ref, f_ref,
                 mx_ref, *, H, L, fast, exact):
    """Every chunk at once: U = P M + Q and Y = E M + F as maps of the incoming state M."""
    bh, j = pl.program_id(0), pl.program_id(1)
    bi, hi = bh // H, bh % H
    ts = pl.ds(j * L, L)
    dots = _dot_fns(fast)
    dot = dots[0]
    r, w, k, v, a, b = (x[bi, ts, hi, :].astype(jnp.float32)
                        for x in (r_ref, w_ref, k_ref, v_ref, a_ref, b_ref))
    q = _chunk_setup(r, w, k, a, b, L, dots, exact)
    p = dot(q["tinv"], q["a_t"])
    u0 = dot(q["tinv"], dot(q["a_ak"], v))
    p_ref[bi, ts, hi, :] = p
    e_ref[bi, ts, hi, :] = q["r_t"] + dot(q["a_rb"], p)
    q_ref[bi, ts, hi, :] = u0
    f_ref[bi, ts, hi, :] = dot(q["a_rb"], u0) + dot(q["a_rk"], v)
    for i, name in enumerate(MIXES):  # kept for the backward, which then skips the setup
        mx_ref[bi, hi, j, i] = q[name]


def _decay_out(w):
    """Each token's decay to the chunk's end (L, N), and the chunk's total decay as an (N, 1)
    column (it scales the state's key rows)."""
    c_l = jnp.sum(w, axis=0, keepdims=True)
    return jnp.exp(c_l - jnp.cumsum(w, axis=0)), jnp.exp(jnp.sum(w.T, axis=1, keepdims=True))


def _scan_kernel(w_ref, k_ref, v_ref, b_ref, p_ref, e_ref, q_ref, f_ref, m0_ref,
                 y_ref, u_ref, ms_ref, mT_ref, *, H, L, NC, BV, fast):
    """Per (batch, head, value block), chunk after chunk: the state and the outputs."""
    bh, vb = pl.program_id(0), pl.program_id(1)
    bi, hi = bh // H, bh % H
    vs = pl.ds(vb * BV, BV)
    dot, _, dot_tn = _dot_fns(fast)

    def body(j, m):
        ts = pl.ds(j * L, L)
        ld = lambda ref, cs=slice(None): ref[bi, ts, hi, cs].astype(jnp.float32)  # noqa: E731
        e_out, gamma = _decay_out(ld(w_ref))
        ms_ref[bi, hi, j, :, vs] = m
        u = dot(ld(p_ref), m) + ld(q_ref, vs)
        u_ref[bi, ts, hi, vs] = u
        y_ref[bi, ts, hi, vs] = dot(ld(e_ref), m) + ld(f_ref, vs)
        return (gamma * m + dot_tn(ld(b_ref) * e_out, u)
                + dot_tn(ld(k_ref) * e_out, ld(v_ref, vs)))

    m = lax.fori_loop(0, NC, body, m0_ref[bi, hi, :, vs].astype(jnp.float32))
    mT_ref[bi, hi, :, vs] = m


def _adjoint_kernel(w_ref, b_ref, p_ref, e_ref, dy_ref, dmT_ref, dms_ref, dm0_ref,
                    *, H, L, NC, BV, fast):
    """Per (batch, head, value block), last chunk to first: the state's adjoint at each
    chunk's end, dM_prev = gamma dM + P^T (b_h dM) + E^T dY."""
    bh, vb = pl.program_id(0), pl.program_id(1)
    bi, hi = bh // H, bh % H
    vs = pl.ds(vb * BV, BV)
    dot, _, dot_tn = _dot_fns(fast)

    def body(i, dm):
        j = NC - 1 - i
        ts = pl.ds(j * L, L)
        ld = lambda ref, cs=slice(None): ref[bi, ts, hi, cs].astype(jnp.float32)  # noqa: E731
        e_out, gamma = _decay_out(ld(w_ref))
        dms_ref[bi, hi, j, :, vs] = dm
        return (gamma * dm + dot_tn(ld(p_ref), dot(ld(b_ref) * e_out, dm))
                + dot_tn(ld(e_ref), ld(dy_ref, vs)))

    dm = lax.fori_loop(0, NC, body, dmT_ref[bi, hi, :, vs].astype(jnp.float32))
    dm0_ref[bi, hi, :, vs] = dm


def _lam_kernel(w_ref, k_ref, b_ref, mx_ref, dms_ref, dy_ref, lam_ref, dv_ref, *, H, L, fast):
    """Every chunk at once: Λ = Tinv^T (A_rb^T dY + B̂ dM), the adjoint of U's right-hand
    side, and dV. Both are sums over key channels, so they precede the key-split kernel."""
    bh, j = pl.program_id(0), pl.program_id(1)
    bi, hi = bh // H, bh % H
    ts = pl.ds(j * L, L)
    dot, _, dot_tn = _dot_fns(fast)
    w, k, b, dy = (x[bi, ts, hi, :].astype(jnp.float32) for x in (w_ref, k_ref, b_ref, dy_ref))
    mx = {name: mx_ref[bi, hi, j, i] for i, name in enumerate(MIXES)}
    dm = dms_ref[bi, hi, j]
    e_out, _ = _decay_out(w)
    lam = dot_tn(mx["tinv"], dot_tn(mx["a_rb"], dy) + dot(b * e_out, dm))
    lam_ref[bi, ts, hi, :] = lam
    dv = dot_tn(mx["a_ak"], lam) + dot_tn(mx["a_rk"], dy) + dot(k * e_out, dm)
    dv_ref[bi, ts, hi, :] = dv.astype(dv_ref.dtype)


def _grad_kernel(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, u_ref, lam_ref, ms_ref, dms_ref,
                 dy_ref, dr_ref, dw_ref, dk_ref, da_ref, db_ref, *, H, L, BK, fast):
    """Per (chunk, block of key channels), given Λ, the chunk's incoming state M and the
    adjoint dM at its end. Every gradient here belongs to one key channel, so the channels can
    be split over programs (block_k, for wide heads); each block then recomputes the L x L
    mixes' adjoints (sums over value channels). At N=64 one block of all 64 is fastest."""
    bh, j, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bi, hi = bh // H, bh % H
    ts, ks = pl.ds(j * L, L), pl.ds(kb * BK, BK)
    dot, dot_nt, dot_tn = _dot_fns(fast)
    t, s = _iota2(L)
    strict, incl = s < t, s <= t
    r, w, k, a, b = (x[bi, ts, hi, ks].astype(jnp.float32)
                     for x in (r_ref, w_ref, k_ref, a_ref, b_ref))
    v, u, lam, dy = (x[bi, ts, hi, :].astype(jnp.float32)
                     for x in (v_ref, u_ref, lam_ref, dy_ref))
    m, dm = ms_ref[bi, hi, j, ks, :], dms_ref[bi, hi, j, ks, :]  # (BK, N): key rows
    q = _decays(r, w, k, a, b)

    d_ab = jnp.where(strict, dot_nt(lam, u), 0.0)
    d_ak = jnp.where(strict, dot_nt(lam, v), 0.0)
    d_rb = jnp.where(incl, dot_nt(dy, u), 0.0)
    d_rk = jnp.where(incl, dot_nt(dy, v), 0.0)
    d_at = dot_nt(lam, m)
    d_rt = dot_nt(dy, m)
    d_bh = dot_nt(u, dm)
    d_kh = dot_nt(v, dm)

    d_aq = dot(d_ab, q["bd"]) + dot(d_ak, q["kd"])
    d_rq = dot(d_rb, q["bd"]) + dot(d_rk, q["kd"])
    d_bd = dot_tn(d_ab, q["aq"]) + dot_tn(d_rb, q["rq"])
    d_kd = dot_tn(d_ak, q["aq"]) + dot_tn(d_rk, q["rq"])

    c, ce, c_l, mid = q["c"], q["ce"], q["c_l"], q["mid"]
    e_in, e_out = jnp.exp(mid - c), jnp.exp(c_l - c)
    hb, hk = d_bh * q["b_h"], d_kh * q["k_h"]
    dc = d_rq * q["rq"] + d_rt * q["r_t"] - d_bd * q["bd"] - d_kd * q["kd"] - hb - hk
    dce = d_aq * q["aq"] + d_at * q["a_t"]
    # the chunk total c_l: through b_h, k_h and the state's decay gamma = e^{c_l}
    d_gamma = jnp.sum((dm * m).T, axis=0, keepdims=True)  # (1, BK)
    dcl = jnp.sum(hb + hk, axis=0, keepdims=True) + d_gamma * jnp.exp(c_l)
    # c = cumsum(w), ce = c - w, c_l = sum(w): dw_t = sum_{s>=t} (dc + dce)_s - dce_t + dcl
    g = dc + dce
    out = (
        (dr_ref, d_rq * jnp.exp(c - mid) + d_rt * jnp.exp(c)),
        (da_ref, d_aq * jnp.exp(ce - mid) + d_at * jnp.exp(ce)),
        (db_ref, d_bd * e_in + d_bh * e_out),
        (dk_ref, d_kd * e_in + d_kh * e_out),
        (dw_ref, jnp.sum(g, axis=0, keepdims=True) - jnp.cumsum(g, axis=0) + g - dce + dcl),
    )
    for ref, val in out:
        ref[bi, ts, hi, ks] = val.astype(ref.dtype)


# --------------------------------------------------------------------------- plumbing


def _precisions(cfg: Config, interpret: bool, half_inputs: bool = True):
    if interpret:  # the CPU interpreter knows no TF32: plain float32 dots
        return None, None
    presets = lax.DotAlgorithmPreset
    exact = presets.TF32_TF32_F32_X3 if cfg.inverse_x3 else presets.F32_F32_F32
    if not cfg.tf32:
        return presets.F32_F32_F32, exact
    return (presets.TF32_TF32_F32 if half_inputs else presets.TF32_TF32_F32_X3), exact


def _stages(B, T, H, N, dtypes, cfg: Config, interpret: bool):
    """The five pallas_calls for one shape, by name (bench/wkv7_table.py times them singly)."""
    L, BV, BK = cfg.chunk, cfg.block_v, cfg.block_k
    NC = T // L
    half = all(jnp.dtype(dt).itemsize < 4 for i, dt in enumerate(dtypes) if i != 1)  # not w
    fast, exact = _precisions(cfg, interpret, half)
    full, states = _sds((B, T, H, N)), _sds((B, H, NC, N, N))
    chunks, lanes = (B * H, NC), (B * H, N // BV)
    return dict(
        # (r, w, k, v, a, b) -> P, E, Q, F
        maps=_call(functools.partial(_maps_kernel, H=H, L=L, fast=fast, exact=exact),
                   [full] * 4 + [_sds((B, H, NC, len(MIXES), L, L))], chunks, cfg.warps_fwd,
                   interpret, "wkv7_chunk_maps"),
        # (w, k, v, b, P, E, Q, F, M0) -> y, U, the state entering each chunk, the final state
        scan=_call(functools.partial(_scan_kernel, H=H, L=L, NC=NC, BV=BV, fast=fast),
                   [full, full, states, _sds((B, H, N, N))], lanes, cfg.warps_scan, interpret,
                   "wkv7_state_scan", cfg.stages_scan),
        # (w, b, P, E, dy, dM_T) -> the state's adjoint at each chunk's end, and at the start
        adjoint=_call(functools.partial(_adjoint_kernel, H=H, L=L, NC=NC, BV=BV, fast=fast),
                      [states, _sds((B, H, N, N))], lanes, cfg.warps_scan, interpret,
                      "wkv7_adjoint_scan", cfg.stages_scan),
        # (w, k, b, mixes, dMs, dy) -> Λ, dv
        lam=_call(functools.partial(_lam_kernel, H=H, L=L, fast=fast),
                  [full, _sds((B, T, H, N), dtypes[3])], chunks, cfg.warps_lam, interpret,
                  "wkv7_adjoint_lambda"),
        # (r, w, k, v, a, b, U, Λ, Ms, dMs, dy) -> dr, dw, dk, da, db
        grads=_call(functools.partial(_grad_kernel, H=H, L=L, BK=BK, fast=fast),
                    [_sds((B, T, H, N), dtypes[i]) for i in (0, 1, 2, 4, 5)],
                    (B * H, NC, N // BK), cfg.warps_bwd, interpret, "wkv7_grads"),
    )


def _forward(r, w, k, v, a, b, m0, cfg: Config, interpret: bool):
    """-> y, the final state, and what the backward keeps: the state entering every chunk
    (B, H, NC, N, N), U, P, E and the chunks' L x L mixes."""
    st = _stages(*r.shape, [x.dtype for x in (r, w, k, v, a, b)], cfg, interpret)
    p, e, q, f, mx = st["maps"](r, w, k, v, a, b)
    y, u, ms, m_t = st["scan"](w, k, v, b, p, e, q, f, m0)
    return y, m_t, (ms, u, p, e, mx)


def _backward(r, w, k, v, a, b, saved, dy, dmT, cfg: Config, interpret: bool):
    ms, u, p, e, mx = saved
    st = _stages(*r.shape, [x.dtype for x in (r, w, k, v, a, b)], cfg, interpret)
    dms, dm0 = st["adjoint"](w, b, p, e, dy, dmT)
    lam, dv = st["lam"](w, k, b, mx, dms, dy)
    dr, dw, dk, da, db = st["grads"](r, w, k, v, a, b, u, lam, ms, dms, dy)
    return dr, dw, dk, dv, da, db, dm0


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _wkv(r, w, k, v, a, b, m0, cfg, interpret):
    y, m_t, _ = _forward(r, w, k, v, a, b, m0, cfg, interpret)
    return y, m_t


def _wkv_fwd(r, w, k, v, a, b, m0, cfg, interpret):
    y, m_t, saved = _forward(r, w, k, v, a, b, m0, cfg, interpret)
    # Named, so that a remat policy can keep the kernel's work (nn.model.remat_policy).
    saved = jax.tree.map(lambda x: checkpoint_name(x, "wkv"), saved)
    return (y, m_t), (r, w, k, v, a, b, saved)


def _wkv_bwd(cfg, interpret, res, cts):
    *xs, saved = res
    dy, dmT = cts
    *dx, dm0 = _backward(*xs, saved, dy.astype(jnp.float32), dmT.astype(jnp.float32), cfg,
                         interpret)
    return (*dx, dm0)


_wkv.defvjp(_wkv_fwd, _wkv_bwd)


def wkv7(r, w, k, v, a, b, state, *, config: Config | None = None,
         interpret: bool | None = None):
    """RWKV-7 WKV over (B, T, H, N) with the fused Pallas kernels; differentiable.

    Inputs are read in their own dtype (bf16 or float32; w, the log decay, best float32) and
    computed in float32. state: (B, H, N, N) float32, value x key (the official layout).
    Returns y (B, T, H, N) float32 and the final state. T is padded to whole chunks with
    tokens that leave the state unchanged.
    """
    B, T, H, N = r.shape
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    cfg = (config or DEFAULT_CONFIG).fit(T, N)
    cfg.check(N)
    L = cfg.chunk
    pad = -T % L
    xs = (r, w, k, v, a, b)
    if pad:  # w = 0 (no decay) and zero vectors: the padded tokens change nothing
        xs = tuple(jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in xs)
    m0 = jnp.swapaxes(state.astype(jnp.float32), -1, -2)  # key x value
    y, m_t = _wkv(*xs, m0, cfg, bool(interpret))
    return y[:, :T], jnp.swapaxes(m_t, -1, -2)
