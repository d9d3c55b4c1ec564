"""Weights for decoding: the decode-only layouts of the parameters, the choice of decode kernel,
and the forward pass that reads them.

    dw = pack_for_decode(config, params, kernels=choose_decode_kernels(config, bf16, rows))
    logits, state = decode_forward(config, dw, tokens, state)

The model (rwkv_jax.nn.model) knows the official layout only, which checkpoints hold and training
updates. A decode step reads every weight once per token, so its speed is how its products
read the weights; these layouts make them read faster and give the model's outputs:

- grouped (RWKV-4, the default): a layer's products that read the same input row side by side
  in one matrix, {"kvr": [key | value | receptance]} in the time-mix and {"kr": [key |
  receptance]} in the channel-mix: 4 products a layer rather than 7. Small products read the
  weights more slowly than big ones, and every product is a kernel launch.
- cuda (RWKV-4, kernels="cuda"): every matrix of a block transposed to (out, in) and stacked
  where the kernel reads several, the block's vectors packed in one table ("decode_vecs"), and
  the head as rows. Decode steps of one or two rows run each run of consecutive RWKV-4 blocks
  as one CUDA kernel (rwkv_jax.kernels.cuda.decode4); other inputs take XLA's products on the
  transposes.

Everything else (embedding, RWKV-7 and attention blocks, ln_out, the head of the other
layouts) runs through the model's own Flax modules on its official sub-parameters.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.config import ModelConfig
from rwkv_jax.kernels.cuda import decode4 as cuda_decode4
from rwkv_jax.nn.attention import AttentionBlock
from rwkv_jax.nn.common import dense, layer_norm, mix, token_shift
from rwkv_jax.nn.rwkv4 import RWKVBlock, learned_layer_state
from rwkv_jax.nn.rwkv7 import RWKV7Block
from rwkv_jax.nn.state import zero_layer_state
from rwkv_jax.ops.wkv4 import WKVState, wkv4

PALLAS_REMOVED = ("the fused Pallas decode kernels were slower than XLA's products "
                  "(docs/performance.md); use auto, xla or cuda")

_GROUPS = {"att": ("kvr", ("key", "value", "receptance")), "ffn": ("kr", ("key", "receptance"))}

# Up to this many rows (batch x time), a grouped product multiplies every input by the whole
# matrix and keeps the blocks it needs: the read of the weights is what costs, not the extra
# multiply-adds. Longer inputs (a prefill) multiply each input by its own columns instead.
_STACK_ROWS = 32

# The transposed layout of the CUDA kernel: (out, in) matrices, so that the kernel reads its
# output channels' weights as contiguous rows, stacked where it reads several:
#   att: kvr_t (3, C, C) = [key, value, receptance], output_t (C, C)
#   ffn: kr_t (F + C, C) = [key ; receptance], value_t (C, F)
_KERNEL_LAYOUT = {"att": {"kvr_t": ("key", "value", "receptance"), "output_t": ("output",)},
                  "ffn": {"kr_t": ("key", "receptance"), "value_t": ("value",)}}


@flax.struct.dataclass
class DecodeWeights:
    """The parameters in a decode layout (the official tree, RWKV-4 blocks' matrices packed)
    and the decode kernel they were packed for (None: XLA's products)."""

    params: dict
    kernel: str | None = flax.struct.field(pytree_node=False, default=None)


def _relayout(config: ModelConfig, params: dict, layer_fn) -> dict:
    """params with layer_fn(part, layer) -> layer applied to the att and ffn of every RWKV-4
    block; RWKV-7 and attention blocks stay as they are."""
    if config.version != "4":
        return params
    out = dict(params)
    for i in range(config.n_layer):
        if config.is_rwkv(i):
            block = dict(params[f"blocks_{i}"])
            for part in ("att", "ffn"):
                block[part] = layer_fn(part, dict(block[part]))
            out[f"blocks_{i}"] = block
    return out


def group_products(config: ModelConfig, params: dict) -> dict:
    """Params in the grouped layout (idempotent). Only RWKV-4 blocks change."""

    def group(part, layer):
        name, members = _GROUPS[part]
        if name not in layer:
            layer[name] = jnp.concatenate([layer.pop(m)["kernel"] for m in members], axis=1)
        return layer

    return _relayout(config, params, group)


_group = group_products  # pack_for_decode's argument of that name hides it there


def kernel_layout(config: ModelConfig, params: dict) -> dict:
    """Params with RWKV-4 blocks' matrices transposed and stacked as the CUDA kernel reads
    them (idempotent; from the official layout)."""

    def transpose(part, layer):
        for name, members in _KERNEL_LAYOUT[part].items():
            if name not in layer:
                mats = [layer.pop(m)["kernel"].T for m in members]
                layer[name] = jnp.stack(mats) if name == "kvr_t" else jnp.concatenate(mats)
        return layer

    return _relayout(config, params, transpose)


def cuda_layout(config: ModelConfig, params: dict) -> dict:
    """The kernel layout plus, in every RWKV-4 block, its per-channel vectors packed for the
    CUDA decode kernel ("decode_vecs"), and the head as rows. Builds the kernel; raises
    cuda_decode4.Unavailable, saying why, if it cannot run here or a block does not suit it."""
    cuda_decode4.check_device()
    out = dict(kernel_layout(config, params))
    names = [f"blocks_{i}" for i in range(config.n_layer)
             if config.version == "4" and config.is_rwkv(i)]
    for name in names:
        cuda_decode4.check_block(out[name])
    cuda_decode4.ensure()  # built now, before anything compiles
    for name in names:
        out[name] = {**out[name], "decode_vecs": cuda_decode4.pack_vectors(out[name])}
    return head_rows_layout(out)


def head_rows_layout(params: dict) -> dict:
    """The head as rows, {"kernel_t": (V, C)} (idempotent). A decode step's head is a
    matrix-vector product, which XLA reads faster from rows than from columns (figures in
    docs/performance.md, "Experiments whose conclusions are recorded")."""
    head = params.get("head", {})
    if "kernel" not in head:
        return params
    return {**params, "head": {"kernel_t": jnp.asarray(head["kernel"]).T}}


def choose_decode_kernels(config: ModelConfig, bf16: bool, rows: int) -> str | None:
    """What decode_kernels "auto" means: the CUDA kernel where it is the fastest and can run
    (RWKV-4 in bf16, one or two rows, a Hopper GPU and nvcc), else XLA's products (None).
    More rows run XLA's products on the kernel's layout at half their speed (bench/README.md)."""
    if config.version != "4" or not (bf16 or config.dtype == "bfloat16") or not 1 <= rows <= 2:
        return None
    try:
        cuda_decode4.check_available()
    except cuda_decode4.Unavailable:
        return None
    return "cuda"


def check_kernels(kernels) -> str | None:
    """The decode kernel a decode_kernels value names: None (XLA's products) or "cuda"."""
    if kernels == "pallas" or (kernels and not isinstance(kernels, str)):  # True: it meant pallas
        raise ValueError(f"decode_kernels={kernels!r} was removed: {PALLAS_REMOVED}")
    if not kernels or kernels == "xla":
        return None
    if kernels == "cuda":
        return "cuda"
    raise ValueError(f"decode_kernels={kernels!r}: must be None / False / 'xla' or 'cuda'")


def pack_for_decode(config: ModelConfig, params: dict, kernels=None, *,
                    group_products: bool = True) -> DecodeWeights:
    """The parameters as a decode path reads them: in the CUDA layout for kernels="cuda"
    (raising cuda_decode4.Unavailable, saying why, where it cannot run), else grouped (or
    official with group_products=False). Only RWKV-4 models have a decode kernel. The
    official matrices are not kept: pass host arrays or let the caller's copy go."""
    kernel = check_kernels(kernels)
    if config.version != "4":  # the CUDA kernel runs RWKV-4 blocks only
        kernel = None
    if kernel == "cuda":
        params = cuda_layout(config, params)
    elif group_products:
        params = _group(config, params)
    return DecodeWeights(params, kernel)


# ----------------------------------------------------------------------------- the forward


def _grouped_products(cfg: ModelConfig, w, xs, widths):
    """x_j @ W_j for each input x_j (B, T, C) and its block W_j of columns of the grouped
    matrix w, in the config's compute dtype."""
    dtype = jnp.dtype(cfg.dtype)
    w = w.astype(dtype)
    bounds = np.cumsum((0,) + tuple(widths))
    B, T = xs[0].shape[:2]
    if B * T <= _STACK_ROWS:
        y = jnp.concatenate(xs, axis=0).astype(dtype) @ w  # (n B, T, sum(widths))
        return [y[j * B : (j + 1) * B, :, bounds[j] : bounds[j + 1]] for j in range(len(xs))]
    return [x.astype(dtype) @ w[:, bounds[j] : bounds[j + 1]] for j, x in enumerate(xs)]


def _transposed_products(cfg: ModelConfig, w, pieces):
    """x @ W.T for each (x, W) in pieces, W picked from the (out, in) matrix w, in the compute
    dtype."""
    dtype = jnp.dtype(cfg.dtype)
    w = w.astype(dtype)
    return [x.astype(dtype) @ pick(w).T for x, pick in pieces]


def _dense(cfg: ModelConfig, p: dict, x):
    """nn.Dense of the official layout (the model's rounding) on the matrix p["kernel"]."""
    return dense(cfg, p["kernel"].shape[1], None, nn.initializers.zeros_init()).apply(
        {"params": p}, x)


def _time_mix(cfg: ModelConfig, p: dict, x, shift, wkv_state: WKVState):
    """rwkv_jax.nn.rwkv4.TimeMix on a packed layout."""
    A = cfg.dim_att
    xx = token_shift(x, shift)
    xk, xv, xr = (mix(x, xx, p[m]) for m in ("time_mix_k", "time_mix_v", "time_mix_r"))
    if "kvr" in p:
        k, v, r = _grouped_products(cfg, p["kvr"], (xk, xv, xr), (A,) * 3)
    else:
        k, v, r = _transposed_products(cfg, p["kvr_t"], [
            (xk, lambda w: w[0]), (xv, lambda w: w[1]), (xr, lambda w: w[2])])
    y, wkv_state = wkv4(p["time_decay"], p["time_first"], k, v, wkv_state,
                        impl=cfg.wkv_impl, chunk_size=cfg.wkv_chunk_size)
    out = jax.nn.sigmoid(r.astype(jnp.float32)) * y
    if "output_t" in p:
        (out,) = _transposed_products(cfg, p["output_t"], [(out, lambda w: w)])
    else:
        out = _dense(cfg, p["output"], out)
    return out, x[:, -1], wkv_state


def _channel_mix(cfg: ModelConfig, p: dict, x, shift):
    """rwkv_jax.nn.rwkv4.ChannelMix on a packed layout."""
    C, F = cfg.n_embd, cfg.dim_ffn
    xx = token_shift(x, shift)
    xk, xr = mix(x, xx, p["time_mix_k"]), mix(x, xx, p["time_mix_r"])
    if "kr" in p:
        k, r = _grouped_products(cfg, p["kr"], (xk, xr), (F, C))
    else:
        k, r = _transposed_products(cfg, p["kr_t"], [(xk, lambda w: w[:F]), (xr, lambda w: w[F:])])
    h = jnp.square(jax.nn.relu(k))
    if "value_t" in p:
        (kv,) = _transposed_products(cfg, p["value_t"], [(h, lambda w: w)])
    else:
        kv = _dense(cfg, p["value"], h)
    out = jax.nn.sigmoid(r.astype(jnp.float32)) * kv.astype(jnp.float32)
    return out, x[:, -1]


def _norm(cfg: ModelConfig, p: dict, x):
    return layer_norm(cfg, None).apply({"params": p}, x)


def _rwkv4_block(cfg: ModelConfig, i: int, p: dict, x, state: dict):
    """rwkv_jax.nn.rwkv4.RWKVBlock on a packed layout: the same operations in the same order."""
    if i == 0:
        x = _norm(cfg, p["ln0"], x)
    wkv = WKVState(state["aa"], state["bb"], state["pp"])
    att, shift_att, wkv = _time_mix(cfg, p["att"], _norm(cfg, p["ln1"], x), state["shift_att"], wkv)
    x = x + att
    ffn, shift_ffn = _channel_mix(cfg, p["ffn"], _norm(cfg, p["ln2"], x), state["shift_ffn"])
    x = x + ffn
    return x, {"shift_att": shift_att, "aa": wkv.aa, "bb": wkv.bb, "pp": wkv.pp,
               "shift_ffn": shift_ffn}


def _packed(p: dict) -> bool:
    return any(n in p.get("att", {}) for n in ("kvr", "kvr_t"))


def cuda_takes(config: ModelConfig, p: dict, rows: int) -> bool:
    """Whether the CUDA decode kernel runs a decode step of `rows` rows through the RWKV-4
    block with params p: the CUDA layout, rows and sizes it takes."""
    return ("decode_vecs" in p and rows <= cuda_decode4.MAX_ROWS
            and cuda_decode4.fits(config.n_embd, p["ffn"]["value_t"].shape[1], rows))


def _cuda_run(config: ModelConfig, params: dict, i: int, B: int, T: int) -> int:
    """How many blocks from block i the CUDA decode kernel runs in one launch here (0: none):
    a decode step (one token, one or two rows) through consecutive RWKV-4 blocks in the CUDA
    layout whose sizes it takes."""
    if T != 1 or config.version != "4":
        return 0
    n = 0
    while (i + n < config.n_layer and config.is_rwkv(i + n)
           and cuda_takes(config, params[f"blocks_{i + n}"], B)):
        n += 1
    return n


def _cuda_layers(config: ModelConfig, params: dict, i: int, n: int, x, states):
    """Blocks i .. i+n-1 of a decode step through the CUDA decode kernel: x (B, 1, C)."""
    blocks = [params[f"blocks_{j}"] for j in range(i, i + n)]
    h = x[:, 0]
    if i == 0:  # block 0's own ln0, outside the kernel
        h = _norm(config, blocks[0]["ln0"], h)
    h, states = cuda_decode4.layers_step(blocks, h, states, eps=config.layer_norm_eps)
    return h[:, None], states


def _rwkv4_state(config: ModelConfig, p: dict, i: int, B: int) -> dict:
    """A fresh layer's state, as RWKVBlock makes it when given None."""
    if config.learned_init_state:
        return learned_layer_state(p["init_state"], B)
    return zero_layer_state(config, i, B)


def decode_forward(config: ModelConfig, dw: DecodeWeights, tokens, state: dict | None = None,
                   last_only: bool = False):
    """rwkv_jax.nn.model.RWKV's forward on DecodeWeights: (logits, state), the model's outputs."""
    cfg, params = config, dw.params
    B, T = tokens.shape
    pos = jnp.zeros((B,), jnp.int32) if state is None else state["pos"]
    x = nn.Embed(cfg.vocab_size, cfg.n_embd, param_dtype=jnp.float32).apply(
        {"params": params["emb"]}, tokens)
    if cfg.pos_emb == "learned":
        positions = jnp.minimum(pos[:, None] + jnp.arange(T)[None, :], cfg.max_positions - 1)
        x = x + nn.Embed(cfg.max_positions, cfg.n_embd, param_dtype=jnp.float32).apply(
            {"params": params["pos_emb"]}, positions)

    new_layers = []
    v_first = None  # RWKV-7: the first RWKV layer's values (rwkv_jax.nn.model.RWKV)
    i = 0
    while i < cfg.n_layer:
        name = f"blocks_{i}"
        p = params[name]
        run = _cuda_run(cfg, params, i, B, T) if dw.kernel == "cuda" else 0
        if run:  # consecutive RWKV-4 blocks of a decode step, as one CUDA kernel
            states = [state["layers"][j] if state is not None else
                      _rwkv4_state(cfg, params[f"blocks_{j}"], j, B) for j in range(i, i + run)]
            x, states = _cuda_layers(cfg, params, i, run, x, states)
            new_layers.extend(states)
            i += run
            continue
        layer_state = None if state is None else state["layers"][i]
        if not cfg.is_rwkv(i):
            x, s = AttentionBlock(cfg, i).apply({"params": p}, x, layer_state, pos)
        elif cfg.version == "7":
            x, s, v_first = RWKV7Block(cfg, i).apply({"params": p}, x, layer_state, pos, v_first)
        elif _packed(p):
            if layer_state is None:
                layer_state = _rwkv4_state(cfg, p, i, B)
            x, s = _rwkv4_block(cfg, i, p, x, layer_state)
        else:
            x, s = RWKVBlock(cfg, i).apply({"params": p}, x, layer_state, pos)
        new_layers.append(s)
        i += 1

    if last_only:
        x = x[:, -1:]
    x = _norm(cfg, params["ln_out"], x)
    head = params["head"]
    if "kernel_t" in head:  # the head as rows (head_rows_layout)
        # Rounded as nn.Dense rounds: inputs, weights and the product in the config's dtype.
        dtype = jnp.dtype(cfg.dtype)
        logits = jnp.einsum("btc,vc->btv", x.astype(dtype), head["kernel_t"].astype(dtype))
    else:
        logits = _dense(cfg, head, x)
    return logits.astype(jnp.float32), {"pos": pos + T, "layers": tuple(new_layers)}
