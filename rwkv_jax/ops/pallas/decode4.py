"""One RWKV-4 block for one token of a few rows (a decode step), as six fused Pallas kernels.

XLA compiles a decode step of a 3B model to ~12 kernels per layer: four matrix-vector
products and eight small kernels on the chain between them (the residual add with the
split-K sum, layer-norm statistics, normalise-and-mix, the WKV step, the squared ReLU), each
~1.5 us, mostly latency (bench/README.md, decode.py). Here each product carries the
elementwise work around it, and a layer is six kernels:

  norm_mix   x, shift -> LN(x), and LN(x) mixed with the shift once per product input, in the
             compute dtype; LN(x) is the new shift state
  att_in     rows of [key | value | receptance] for this program's channels, then the WKV
             step and the gate: sigmoid(r) * wkv; the new WKV state
  project    rows of the output matrix, plus the residual: x + W_o g
  norm_mix   (ln2)
  ffn_in     rows of [key ; receptance]: relu(k)^2 for key rows, sigmoid(r) for the others
  project    rows of the value matrix, gated, plus the residual: x + sigmoid(r) * (W_v k^2)

Matrices are stored transposed, (out, in), so that a program's rows are contiguous in
memory: each program streams `block_n` rows, `block_k` columns per loop step, multiplies on
the CUDA cores in float32 (with a few rows, tensor-core tiles would be mostly padding) and sums
along the row. The arithmetic and its roundings are the model's (rwkv_jax.layers): products
round to the compute dtype, everything else is float32.

Status (bench/decode_kernels.py, H200, a 3B block, batch 1, 2026-12-01): 91 us against XLA's
63 (floor 41), so rwkv_jax.generate leaves them off unless asked. Fewer launches do not pay
for the products' bandwidth: 1.9 TB/s here against XLA's 2.7. The products are the part to
redo: every program reads the whole input vector for a few rows (with 2 rows per program,
half as many bytes as it reads of the weights, from L2), and a program's loop over the
columns is latency-bound (software pipelining changed nothing: 3 stages or 1, 90.6 / 90.8
us). Split-K with atomic partial sums, measured as products alone, does not fix it: 1.9-2.0x
the floor against XLA's 1.39x (bench/decode_products.py). No matrix-vector kernel tried, XLA's,
cuBLAS's or these, reads faster than ~3 TB/s, where the card reads 4.2 (bench/README.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from rwkv_jax.ops.pallas.common import call, load, next_pow2, sds, store

# Rows (batch) the kernels take: each program keeps (rows, block_n, block_k) products in
# registers. Beyond this a decode step is a small matrix product, which XLA does well.
MAX_ROWS = 4


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiling of the products (powers of two). Defaults: the fastest of 14 tilings of
    bench/decode_kernels.py on an H200 (3B block, batch 1; bench/README.md)."""

    block_n: int = 2  # output rows per program
    block_k: int = 1024  # input columns per loop step
    warps: int = 4
    stages: int = 3  # Triton's software pipelining of the loop's loads
    warps_norm: int = 4

    def fit(self, n: int, k: int) -> "Config":
        return dataclasses.replace(self, block_n=min(self.block_n, next_pow2(n)),
                                   block_k=min(self.block_k, next_pow2(k)))


DEFAULT_CONFIG = Config()


def _iota(n):
    return lax.broadcasted_iota(jnp.int32, (n,), 0)


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


# --------------------------------------------------------------------------- the product


def _rows_times(w_ref, x_ref, row0, *, N, K, B, cfg: Config, w_lead=(), x_lead=()):
    """(rows_p, block_n) float32: rows row0 .. row0 + block_n of W (N, K) (after indexing
    w_ref by w_lead) times each of the B rows of x (after x_lead), x (B, K)."""
    BN, BK, Bp = cfg.block_n, cfg.block_k, next_pow2(B)
    w_mask_n = None if N % BN == 0 else (row0 + _iota(BN) < N)[:, None]
    x_mask_b = None if Bp == B else (_iota(Bp) < B)[:, None]

    def step(kb, acc):
        c0 = kb * BK
        k_mask = None if K % BK == 0 else (c0 + _iota(BK) < K)[None, :]
        wm = _and(w_mask_n, k_mask)
        xm = _and(x_mask_b, k_mask)
        w = load(w_ref, (*w_lead, pl.ds(row0, BN), pl.ds(c0, BK)), wm)
        x = load(x_ref, (*x_lead, pl.ds(0, Bp), pl.ds(c0, BK)), xm)
        prod = w.astype(jnp.float32)[None, :, :] * x.astype(jnp.float32)[:, None, :]
        return acc + jnp.sum(prod, axis=2)

    return lax.fori_loop(0, pl.cdiv(K, BK), step, jnp.zeros((Bp, BN), jnp.float32))


def _and(a, b):
    if a is None:
        return b
    return a if b is None else a & b


def _tile(B, n0, BN, N):
    """Index and mask of the (rows_p, BN) tile of a (B, N) array at columns n0 .. n0 + BN."""
    Bp = next_pow2(B)
    mask = _and(None if Bp == B else (_iota(Bp) < B)[:, None],
                None if N % BN == 0 else (n0 + _iota(BN) < N)[None, :])
    if mask is not None:
        mask = jnp.broadcast_to(mask, (Bp, BN))
    return (pl.ds(0, Bp), pl.ds(n0, BN)), mask


def _vector(ref, n0, BN, N):
    mask = None if N % BN == 0 else n0 + _iota(BN) < N
    return load(ref, (pl.ds(n0, BN),), mask)


# --------------------------------------------------------------------------- kernels


def _norm_mix_kernel(x_ref, shift_ref, scale_ref, bias_ref, mix_ref, xin_ref, xn_ref,
                     *, C, M, eps):
    """One row: LN(x), and LN(x) * mix_m + shift * (1 - mix_m) for each of the M mixes."""
    b = pl.program_id(0)
    Cp = next_pow2(C)
    cm = None if Cp == C else _iota(Cp) < C
    cs = pl.ds(0, Cp)
    x = load(x_ref, (b, cs), cm)
    mean = jnp.sum(x) / C
    d = x - mean if cm is None else jnp.where(cm, x - mean, 0.0)
    var = jnp.sum(d * d) / C
    xn = d * lax.rsqrt(var + eps) * load(scale_ref, (cs,), cm) + load(bias_ref, (cs,), cm)
    shift = load(shift_ref, (b, cs), cm)
    for m in range(M):
        mix = load(mix_ref, (m, cs), cm)
        store(xin_ref, (m, b, cs), xn * mix + shift * (1.0 - mix), cm)
    store(xn_ref, (b, cs), xn, cm)


def _att_in_kernel(w_ref, xin_ref, decay_ref, first_ref, aa_ref, bb_ref, pp_ref,
                   g_ref, aa_out, bb_out, pp_out, *, B, C, cfg: Config, cdt):
    """Channels j*BN ..: k, v, r from their rows of the three matrices, then one WKV step
    (rwkv_jax.ops.wkv4's recurrence) and the gate."""
    n0 = pl.program_id(0) * cfg.block_n
    k, v, r = (_rows_times(w_ref, xin_ref, n0, N=C, K=C, B=B, cfg=cfg, w_lead=(m,),
                           x_lead=(m,)).astype(cdt).astype(jnp.float32) for m in range(3))
    idx, mask = _tile(B, n0, cfg.block_n, C)
    aa, bb, pp = (load(ref, idx, mask) for ref in (aa_ref, bb_ref, pp_ref))
    w = _vector(decay_ref, n0, cfg.block_n, C)[None, :]
    u = _vector(first_ref, n0, cfg.block_n, C)[None, :]
    ww = u + k
    p = jnp.maximum(pp, ww)
    e1, e2 = jnp.exp(pp - p), jnp.exp(ww - p)
    y = (e1 * aa + e2 * v) / (e1 * bb + e2)
    ww = w + pp
    p = jnp.maximum(ww, k)
    e1, e2 = jnp.exp(ww - p), jnp.exp(k - p)
    store(aa_out, idx, e1 * aa + e2 * v, mask)
    store(bb_out, idx, e1 * bb + e2, mask)
    store(pp_out, idx, p, mask)
    store(g_ref, idx, _sigmoid(r) * y, mask)


def _project_kernel(w_ref, x_ref, res_ref, *rest, B, N, K, cfg: Config, cdt, gated):
    """res + W x (rows j*BN ..), times a gate first when gated."""
    gate_ref, out_ref = rest if gated else (None, rest[0])
    n0 = pl.program_id(0) * cfg.block_n
    y = _rows_times(w_ref, x_ref, n0, N=N, K=K, B=B, cfg=cfg).astype(cdt).astype(jnp.float32)
    idx, mask = _tile(B, n0, cfg.block_n, N)
    if gated:
        y = load(gate_ref, idx, mask) * y
    store(out_ref, idx, load(res_ref, idx, mask) + y, mask)


def _ffn_in_kernel(w_ref, xin_ref, h_ref, gate_ref, *, B, F, C, cfg: Config, cdt):
    """Rows of [key ; receptance]: a program's rows are all keys (relu(k)^2 into h) or all
    receptances (sigmoid(r) into gate)."""
    BN = cfg.block_n
    n0 = pl.program_id(0) * BN
    is_key = n0 < F
    y = _rows_times(w_ref, xin_ref, n0, N=F + C, K=C, B=B, cfg=cfg,
                    x_lead=(jnp.where(is_key, 0, 1),)).astype(cdt)
    relu = jnp.maximum(y, 0).astype(jnp.float32)
    idx_h, mask_h = _tile(B, jnp.minimum(n0, F - BN), BN, F)
    idx_g, mask_g = _tile(B, jnp.maximum(n0 - F, 0), BN, C)
    full = (next_pow2(B), BN)
    store(h_ref, idx_h, relu * relu, _and(mask_h, jnp.full(full, is_key)))
    store(gate_ref, idx_g, _sigmoid(y.astype(jnp.float32)),
           _and(mask_g, jnp.full(full, jnp.logical_not(is_key))))


# --------------------------------------------------------------------------- calls


def _interpret(interpret):
    return jax.default_backend() != "gpu" if interpret is None else bool(interpret)


def norm_mix(x, shift, scale, bias, mixes, *, eps, dtype, cfg, interpret=None):
    """(xin (M, B, C) in dtype: LN(x) mixed with shift by each row of mixes (M, C); LN(x) (B, C)
    float32, the new shift state)."""
    B, C = x.shape
    M = mixes.shape[0]
    kernel = functools.partial(_norm_mix_kernel, C=C, M=M, eps=eps)
    interpret = _interpret(interpret)
    return call(kernel, [sds((M, B, C), dtype), sds((B, C))], (B,), cfg.warps_norm, interpret,
                "rwkv4_decode_norm_mix")(x, shift, scale, bias, mixes)


def att_in(w_kvr, xin, decay, first, aa, bb, pp, *, cfg, interpret=None):
    """sigmoid(r) * WKV (B, C) in the compute dtype and the new (aa, bb, pp), for
    k, v, r = W_kvr[m] @ xin[m] (w_kvr (3, C, C) (out, in); decay = -exp(time_decay))."""
    _, B, C = xin.shape
    cdt = w_kvr.dtype
    cfg = cfg.fit(C, C)
    kernel = functools.partial(_att_in_kernel, B=B, C=C, cfg=cfg, cdt=cdt)
    state = sds((B, C))
    return call(kernel, [sds((B, C), cdt), state, state, state], (pl.cdiv(C, cfg.block_n),),
                cfg.warps, _interpret(interpret), "rwkv4_decode_att_in",
                cfg.stages)(w_kvr, xin, decay, first, aa, bb, pp)


def project(w, x, res, gate=None, *, cfg, interpret=None):
    """res + W x, or res + gate * (W x), per row: w (N, K) (out, in), x (B, K), res (B, N)."""
    N, K = w.shape
    B = x.shape[0]
    cfg = cfg.fit(N, K)
    kernel = functools.partial(_project_kernel, B=B, N=N, K=K, cfg=cfg, cdt=w.dtype,
                               gated=gate is not None)
    return call(kernel, sds((B, N)), (pl.cdiv(N, cfg.block_n),), cfg.warps,
                _interpret(interpret), "rwkv4_decode_project",
                cfg.stages)(w, x, res, *(() if gate is None else (gate,)))


def ffn_in(w_kr, xin, *, dim_ffn, cfg, interpret=None):
    """(relu(W_k xin[0])^2 (B, F) in the compute dtype, sigmoid(W_r xin[1]) (B, C) float32)
    for w_kr = [W_k ; W_r] (F + C, C) (out, in)."""
    _, B, C = xin.shape
    F = dim_ffn
    cfg = cfg.fit(F + C, C)
    if F % cfg.block_n:
        raise ValueError(f"ffn_in: dim_ffn={F} must be a multiple of block_n={cfg.block_n}")
    kernel = functools.partial(_ffn_in_kernel, B=B, F=F, C=C, cfg=cfg, cdt=w_kr.dtype)
    return call(kernel, [sds((B, F), w_kr.dtype), sds((B, C))], (pl.cdiv(F + C, cfg.block_n),),
                cfg.warps, _interpret(interpret), "rwkv4_decode_ffn_in", cfg.stages)(w_kr, xin)


def block_step(p: dict, x, state: dict, *, eps: float, cfg: Config | None = None,
               interpret=None):
    """One RWKV-4 block for one token per row: x (B, C) float32 (after ln0 in block 0) and the
    layer's state -> (x, state). p holds the block's parameters in the fused layout
    (rwkv_jax.layers.kernel_layout): ln1, ln2, and att / ffn with the stacked matrices."""
    cfg = cfg or DEFAULT_CONFIG  # read at call time, so that a bench can set another
    att, ffn = p["att"], p["ffn"]
    dtype = att["kvr_t"].dtype
    mix_att = jnp.stack([att["time_mix_k"], att["time_mix_v"], att["time_mix_r"]])
    xin, shift_att = norm_mix(x, state["shift_att"], p["ln1"]["scale"], p["ln1"]["bias"],
                              mix_att, eps=eps, dtype=dtype, cfg=cfg, interpret=interpret)
    decay = -jnp.exp(att["time_decay"].astype(jnp.float32))
    g, aa, bb, pp = att_in(att["kvr_t"], xin, decay, att["time_first"].astype(jnp.float32),
                           state["aa"], state["bb"], state["pp"], cfg=cfg, interpret=interpret)
    x = project(att["output_t"], g, x, cfg=cfg, interpret=interpret)
    mix_ffn = jnp.stack([ffn["time_mix_k"], ffn["time_mix_r"]])
    xin, shift_ffn = norm_mix(x, state["shift_ffn"], p["ln2"]["scale"], p["ln2"]["bias"],
                              mix_ffn, eps=eps, dtype=dtype, cfg=cfg, interpret=interpret)
    F = ffn["value_t"].shape[1]
    h, gate = ffn_in(ffn["kr_t"], xin, dim_ffn=F, cfg=cfg, interpret=interpret)
    x = project(ffn["value_t"], h, x, gate, cfg=cfg, interpret=interpret)
    return x, {"shift_att": shift_att, "aa": aa, "bb": bb, "pp": pp, "shift_ffn": shift_ffn}
