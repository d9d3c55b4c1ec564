"""The RWKV-7 ("x070", "Goose") layers: time-mix, channel-mix, their block, and its learned
initial state.

The math is that of the official code (BlinkDL's `rwkv` package, RWKV_x070_TMix_seq and
RWKV_x070_CMix_seq; RWKV-LM RWKV-v7/train_temp for the initialisation). Per token, with
xx = previous token - x and C = H heads x N:

    xr, xw, xk, xv, xa, xg = x + xx * x_r, ..., x + xx * x_g
    r = xr R    k = xk K    v = xv V
    w = -0.606531 * sigmoid(w0 + tanh(xw w1) w2)         log decay, in (-0.61, 0)
    a = sigmoid(a0 + (xa a1) a2)                         in-context learning rate
    g = sigmoid(xg g1) g2                                output gate
    kk = L2-normalise(k * k_k) per head
    k = k * (1 + (a - 1) * k_a)
    v = v                                                 the first RWKV layer (v_first = v)
    v = v + (v_first - v) * sigmoid(v0 + (xv v1) v2)     every later one (value residual)
    y = WKV7(r, w, k, v, a=-kk, b=kk*a)                   rwkv_jax.ops.wkv7
    y = GroupNorm_H(y) + sum_N(r * k * r_k) * v           per head, eps 64e-5
    out = (y * g) O

    channel-mix: k = x + xx * x_k;  out = relu(k K)^2 V

Parameter names are the official ones (x_r, w0, w1, ..., r_k, receptance, key, value, output,
ln_x), the LoRA factors and r_k stored as the official file stores them ((C, D), (D, C),
(H, N)), so converting weights is a rename, a transpose of the four projections, a reshape.

Dtypes, as in rwkv_jax.nn.common: parameters float32; the matrix products (the four projections,
the LoRA factors, the channel-mix) in the configured compute dtype; the token-shift mixes,
norms, gates, the WKV recurrence and its state in float32.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.config import ModelConfig
from rwkv_jax.nn.common import const_init, dense, layer_norm, layer_ratios, token_shift
from rwkv_jax.nn.state import zero_layer_state
from rwkv_jax.ops.wkv7 import wkv7

# The official inference code's exp(-0.5), as it writes it (0.6065306597... exactly would be
# RWKV-LM's training kernel; the two differ by 6e-7 relative).
DECAY_SCALE = 0.606531
GROUP_NORM_EPS = 64e-5  # the official ln_x (nn.GroupNorm(H, C, eps=64e-5))
L2_EPS = 1e-12  # torch.nn.functional.normalize's default
LORAS = (("w", "dim_w_lora"), ("a", "dim_a_lora"), ("v", "dim_v_lora"), ("g", "dim_g_lora"))


def _orthogonal(scale: float):
    """RWKV-LM's ortho_init / generate_init_weight: orthogonal with gain `scale` (zero for 0)."""
    if scale == 0:
        return nn.initializers.zeros_init()
    return nn.initializers.orthogonal(scale=scale)


def _lora_init(d: int, c: int):
    """RWKV-LM's ortho_init(zeros(D, C), 0.1) for the second LoRA factor."""
    gain = math.sqrt(d / c) if d > c else 1.0
    return nn.initializers.orthogonal(scale=gain * 0.1)


def _matmul(config: ModelConfig, x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w in the compute dtype (like rwkv_jax.nn.common.dense)."""
    cdt = jnp.dtype(config.dtype)
    return jnp.matmul(x.astype(cdt), w.astype(cdt))


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


def l2_normalise(x: jax.Array, eps: float = L2_EPS) -> jax.Array:
    """x / max(||x||, eps) over the last axis (torch's F.normalize), with a gradient that
    stays finite at x = 0."""
    return x / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))


def head_group_norm(y: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """GroupNorm with one group per head over (..., H, N), per token (two-pass variance)."""
    mean = jnp.mean(y, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(y - mean), axis=-1, keepdims=True)
    out = (y - mean) * jax.lax.rsqrt(var + eps)
    return out * scale.reshape(y.shape[-2:]) + bias.reshape(y.shape[-2:])


class HeadNorm(nn.Module):
    """The official `ln_x`: nn.GroupNorm(H, C, eps=64e-5) applied per token."""

    n_head: int
    eps: float
    scale_init: float = 1.0

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:  # (B, T, H, N)
        C = y.shape[-2] * y.shape[-1]
        scale = self.param("scale", nn.initializers.constant(self.scale_init), (C,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (C,), jnp.float32)
        return head_group_norm(y, scale, bias, self.eps)


class TimeMix7(nn.Module):
    """RWKV-7 time-mix. `v_first` is the first RWKV layer's v (B, T, C) float32, or None in
    that layer itself, which returns its own v as v_first."""

    config: ModelConfig
    layer_id: int

    @nn.compact
    def __call__(self, x, shift, wkv_state, v_first):
        cfg = self.config
        B, T, C = x.shape
        H, N = cfg.n_head, cfg.head_size
        first = self.layer_id == cfg.first_rwkv_layer
        r0, r1 = layer_ratios(self.layer_id, cfg.n_layer)

        # RWKV-LM's initial values (computed in float64, stored float32).
        ddd = np.arange(C, dtype=np.float64) / C
        n = np.arange(C, dtype=np.float64)
        linear = n / max(C - 1, 1) - 0.5
        zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2) if N > 1 else np.zeros(C)
        zigzag = zigzag * np.abs(zigzag)
        www = -6 + 6 * (n / max(C - 1, 1)) ** (1 + r0**0.3)
        f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
        vec = lambda name, values: self.param(name, const_init(f32(values)), (C,))  # noqa: E731

        x_r = vec("x_r", 1 - ddd ** (0.2 * r1))
        x_w = vec("x_w", 1 - ddd ** (0.9 * r1))
        x_k = vec("x_k", 1 - ddd ** (0.7 * r1))
        x_v = vec("x_v", 1 - ddd ** (0.7 * r1))
        x_a = vec("x_a", 1 - ddd ** (0.9 * r1))
        x_g = vec("x_g", 1 - ddd ** (0.2 * r1))
        w0 = vec("w0", www + 0.5 + zigzag * 2.5)
        a0 = vec("a0", -0.19 + zigzag * 0.3 + linear * 0.4)
        v0 = vec("v0", 0.73 - linear * 0.4)
        k_k = vec("k_k", 0.71 - linear * 0.1)
        k_a = vec("k_a", np.full(C, 1.02))
        r_k = self.param("r_k", nn.initializers.constant(-0.04), (H, N), jnp.float32)
        lora = {}
        for name, field in LORAS:
            d = getattr(cfg, field)
            # The first layer's v1, v2 (and v0) go unused, as in RWKV-LM, whose checkpoints
            # carry them: kept so that official files convert both ways unchanged.
            lora[name] = (self.param(f"{name}1", nn.initializers.zeros_init(), (C, d), jnp.float32),
                          self.param(f"{name}2", _lora_init(d, C), (d, C), jnp.float32))

        xx = token_shift(x, shift) - x
        xr, xw, xk, xv, xa, xg = (x + xx * m for m in (x_r, x_w, x_k, x_v, x_a, x_g))

        r = _f32(dense(cfg, C, "receptance", _orthogonal(1.0))(xr))
        k = _f32(dense(cfg, C, "key", _orthogonal(0.1))(xk))
        v = _f32(dense(cfg, C, "value", _orthogonal(1.0))(xv))
        w1, w2 = lora["w"]
        w = _f32(_matmul(cfg, jnp.tanh(_f32(_matmul(cfg, xw, w1))), w2))
        a1, a2 = lora["a"]
        a = jax.nn.sigmoid(a0 + _f32(_matmul(cfg, _matmul(cfg, xa, a1), a2)))
        g1, g2 = lora["g"]
        g = _f32(_matmul(cfg, jax.nn.sigmoid(_f32(_matmul(cfg, xg, g1))), g2))

        heads = lambda t: t.reshape(B, T, H, N)  # noqa: E731
        kk = l2_normalise(heads(k * k_k))
        k = k * (1 + (a - 1) * k_a)
        if first:
            v_first = v
        else:
            if v_first is None:
                raise ValueError(f"RWKV-7 layer {self.layer_id} needs v_first, the value of the "
                                 f"first RWKV layer ({cfg.first_rwkv_layer})")
            v1, v2 = lora["v"]
            v = v + (v_first - v) * jax.nn.sigmoid(v0 + _f32(_matmul(cfg, _matmul(cfg, xv, v1), v2)))
        w_log = -DECAY_SCALE * jax.nn.sigmoid(w0 + w)

        # The WKV reads r, k, v, a, b in the compute dtype (bf16 halves the kernel's reads, as
        # RWKV-LM's bf16 kernel does) and the log decay in float32; it computes in float32.
        c = lambda t: t.astype(cfg.dtype)  # noqa: E731
        y, wkv_state = wkv7(c(heads(r)), heads(w_log), c(heads(k)), c(heads(v)), c(-kk),
                            c(kk * heads(a)), wkv_state, impl=cfg.wkv_impl,
                            chunk_size=cfg.wkv_chunk_size)
        ln_scale = ((1 + self.layer_id) / cfg.n_layer) ** 0.7
        y = HeadNorm(H, GROUP_NORM_EPS, ln_scale, name="ln_x")(y)
        bonus = jnp.sum(heads(r) * heads(k) * r_k, axis=-1, keepdims=True) * heads(v)
        y = (y + bonus).reshape(B, T, C)
        out = dense(cfg, C, "output", _orthogonal(0.0))(y * g)
        return out, x[:, -1], wkv_state, v_first


class ChannelMix7(nn.Module):
    """RWKV-7 channel-mix: squared-ReLU feed-forward on the token-shifted input (no gate)."""

    config: ModelConfig
    layer_id: int

    @nn.compact
    def __call__(self, x, shift):
        cfg = self.config
        C, F = cfg.n_embd, cfg.dim_ffn
        _, r1 = layer_ratios(self.layer_id, cfg.n_layer)
        ddd = np.arange(C, dtype=np.float64) / C
        x_k = self.param("x_k", const_init(np.asarray(1 - ddd ** (r1**4), np.float32)), (C,))
        xx = token_shift(x, shift) - x
        k = dense(cfg, F, "key", _orthogonal(1.0))(x + xx * x_k)
        k = jnp.square(jax.nn.relu(k))
        return dense(cfg, C, "value", _orthogonal(0.0))(k), x[:, -1]


class InitState7(nn.Module):
    """A learned initial state for one RWKV-7 layer; all-zero parameters equal the zero state."""

    config: ModelConfig

    @nn.compact
    def __call__(self, batch_size: int) -> dict:
        cfg = self.config
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        zeros = nn.initializers.zeros_init()
        p = {"shift_att": self.param("shift_att", zeros, (C,), jnp.float32),
             "wkv": self.param("wkv", zeros, (H, N, N), jnp.float32),
             "shift_ffn": self.param("shift_ffn", zeros, (C,), jnp.float32)}
        return learned_layer_state7(p, batch_size)


def learned_layer_state7(p: dict, batch_size: int) -> dict:
    expand = lambda a: jnp.broadcast_to(a, (batch_size,) + a.shape)  # noqa: E731
    return {"shift_att": expand(p["shift_att"]), "wkv": expand(p["wkv"]),
            "shift_ffn": expand(p["shift_ffn"])}


class RWKV7Block(nn.Module):
    """x + TimeMix7(ln1 x), then + ChannelMix7(ln2 x); block 0 also normalises the embedding.

    Called like RWKVBlock plus v_first: (x, state, pos, v_first) -> (x, state, v_first).
    The first RWKV layer takes v_first=None and returns its own v; later RWKV-7 layers take
    that and return it unchanged.
    """

    config: ModelConfig
    layer_id: int
    is_rwkv_block = True

    @nn.compact
    def __call__(self, x, state: dict | None, pos: jax.Array, v_first: jax.Array | None = None):
        del pos  # RWKV layers need no positions
        cfg = self.config
        if self.layer_id == 0:
            x = layer_norm(cfg, "ln0")(x)
        if cfg.learned_init_state:
            learned = InitState7(cfg, name="init_state")(x.shape[0])
            state = learned if state is None else state
        if state is None:
            state = zero_layer_state(cfg, self.layer_id, x.shape[0])
        att, shift_att, wkv, v_first = TimeMix7(cfg, self.layer_id, name="att")(
            layer_norm(cfg, "ln1")(x), state["shift_att"], state["wkv"], v_first)
        x = x + att
        ffn, shift_ffn = ChannelMix7(cfg, self.layer_id, name="ffn")(
            layer_norm(cfg, "ln2")(x), state["shift_ffn"])
        x = x + ffn
        return x, {"shift_att": shift_att, "wkv": wkv, "shift_ffn": shift_ffn}, v_first
