"""The layers: token shift, RWKV-4 time-mix and channel-mix, causal attention with a KV window,
and the two block kinds built from them.

Every layer takes its slice of the recurrent state and returns the updated slice, so the same
code runs a whole sequence, a chunk of one, or a single token. Parameter names follow the
official RWKV-LM checkpoints (time_decay, time_first, time_mix_k, key, value, receptance,
output, ln0/ln1/ln2), so converting weights is a rename and a transpose.

Dtypes: parameters float32; the residual stream, layer norms, mixes and the WKV recurrence in
float32; the matrix products in the configured compute dtype.
"""

from __future__ import annotations

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.config import ModelConfig
from rwkv_jax.ops.wkv4 import WKVState, wkv4

# RWKV-LM v4neo zero-initialises these projections so that each block starts as the identity
# plus a small correction: training starts stable at any depth.
_ZERO_INIT = {"att.key", "att.receptance", "att.output", "ffn.value", "ffn.receptance"}


def token_shift(x: jax.Array, prev: jax.Array) -> jax.Array:
    """x shifted one step right along time, with `prev` (the last token before x) in front."""
    return jnp.concatenate([prev[:, None, :].astype(x.dtype), x[:, :-1]], axis=1)


def _layer_ratios(layer_id: int, n_layer: int) -> tuple[float, float]:
    ratio_0_to_1 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0
    ratio_1_to_almost0 = 1.0 - layer_id / n_layer
    return ratio_0_to_1, ratio_1_to_almost0


def _const_init(values: np.ndarray):
    def init(key, shape, dtype=jnp.float32):
        del key
        chex.assert_shape(values, shape)
        return jnp.asarray(values, dtype)

    return init


def _matrix_init(name: str, fan_in: int, fan_out: int, scale: float = 1.0):
    """RWKV-LM's recipe: orthogonal, gain sqrt(out/in) for widening matrices, some zero."""
    if name in _ZERO_INIT:
        return nn.initializers.zeros_init()
    gain = math.sqrt(fan_out / fan_in) if fan_out > fan_in else 1.0
    return nn.initializers.orthogonal(scale=gain * scale)


def dense(config: ModelConfig, features: int, name: str, init, use_bias: bool = False):
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.float32,
        kernel_init=init,
        name=name,
    )


def layer_norm(config: ModelConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=jnp.float32, name=name)


def mix(x, xx, m):
    """The token-shift mix: x where m is 1, the previous token where it is 0."""
    return x * m + xx * (1 - m)


class TimeMix(nn.Module):
    """RWKV-4 time-mix: mix with the previous token, then the WKV recurrence gated by r."""

    config: ModelConfig
    layer_id: int

    @nn.compact
    def __call__(self, x, shift, wkv_state: WKVState):
        cfg = self.config
        C = cfg.n_embd
        r0, r1 = _layer_ratios(self.layer_id, cfg.n_layer)
        ddd = np.arange(C, dtype=np.float64) / C
        h = np.arange(cfg.dim_att, dtype=np.float64) / max(cfg.dim_att - 1, 1)
        decay = -5 + 8 * h ** (0.7 + 1.3 * r0)
        zigzag = 0.5 * (((np.arange(cfg.dim_att) + 1) % 3) - 1)
        f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731

        time_decay = self.param("time_decay", _const_init(f32(decay)), (cfg.dim_att,))
        time_first = self.param("time_first", _const_init(f32(math.log(0.3) + zigzag)), (cfg.dim_att,))
        mix_k = self.param("time_mix_k", _const_init(f32(ddd**r1)), (C,))
        mix_v = self.param("time_mix_v", _const_init(f32(ddd**r1 + 0.3 * r0)), (C,))
        mix_r = self.param("time_mix_r", _const_init(f32(ddd ** (0.5 * r1))), (C,))

        xx = token_shift(x, shift)
        xk, xv, xr = mix(x, xx, mix_k), mix(x, xx, mix_v), mix(x, xx, mix_r)
        k = dense(cfg, cfg.dim_att, "key", _matrix_init("att.key", C, cfg.dim_att))(xk)
        v = dense(cfg, cfg.dim_att, "value", _matrix_init("att.value", C, cfg.dim_att))(xv)
        r = dense(cfg, cfg.dim_att, "receptance",
                  _matrix_init("att.receptance", C, cfg.dim_att))(xr)
        y, wkv_state = wkv4(time_decay, time_first, k, v, wkv_state,
                            impl=cfg.wkv_impl, chunk_size=cfg.wkv_chunk_size)
        out = jax.nn.sigmoid(r.astype(jnp.float32)) * y
        out = dense(cfg, C, "output", _matrix_init("att.output", cfg.dim_att, C))(out)
        return out, x[:, -1], wkv_state


class ChannelMix(nn.Module):
    """RWKV-4 channel-mix: squared-ReLU feed-forward gated by a sigmoid receptance."""

    config: ModelConfig
    layer_id: int

    @nn.compact
    def __call__(self, x, shift):
        cfg = self.config
        C, F = cfg.n_embd, cfg.dim_ffn
        _, r1 = _layer_ratios(self.layer_id, cfg.n_layer)
        init = np.asarray((np.arange(C, dtype=np.float64) / C) ** r1, np.float32)
        mix_k = self.param("time_mix_k", _const_init(init), (C,))
        mix_r = self.param("time_mix_r", _const_init(init), (C,))

        xx = token_shift(x, shift)
        xk, xr = mix(x, xx, mix_k), mix(x, xx, mix_r)
        k = dense(cfg, F, "key", _matrix_init("ffn.key", C, F))(xk)
        r = dense(cfg, C, "receptance", _matrix_init("ffn.receptance", C, C))(xr)
        h = jnp.square(jax.nn.relu(k))
        kv = dense(cfg, C, "value", _matrix_init("ffn.value", F, C))(h)
        out = jax.nn.sigmoid(r.astype(jnp.float32)) * kv.astype(jnp.float32)
        return out, x[:, -1]


def rotary(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding on (B, T, H, N) at absolute positions (B, T)."""
    n = x.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, n, 2, dtype=jnp.float32) / n))
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, N/2)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _attention_impl(config: ModelConfig) -> str:
    """cuDNN flash attention on GPU in half precision (which it needs); XLA everywhere else.

    Measured on an H100 (bench/attention.py, B8 T1024 H20 N128 bf16, forward+backward): a
    chunk alone 0.99 ms cuDNN vs 3.13 ms XLA; a chunk with the previous chunk's KV window and
    an explicit mask 2.79 ms vs 5.84 ms, so both cases take cuDNN.
    """
    if config.attn_impl != "auto":
        return config.attn_impl
    half = config.dtype in ("bfloat16", "float16")
    return "cudnn" if jax.default_backend() == "gpu" and half else "xla"


def window_mask(pos: jax.Array, T: int, W: int) -> jax.Array:
    """Which keys each query sees when W cached keys precede T new ones: (B, 1, T, W + T).

    The query at absolute position p sees keys at positions p - W .. p (itself and the W
    before it) that exist: cached slot j holds position pos - W + j.
    """
    t = jnp.arange(T)[:, None]
    j = jnp.arange(W)[None, :]
    s = jnp.arange(T)[None, :]
    cached = (j >= t)[None] & (j[None] >= (W - pos)[:, None, None])  # (B, T, W)
    new = jnp.broadcast_to((s <= t) & (s >= t - W), (pos.shape[0], T, T))
    return jnp.concatenate([cached, new], axis=-1)[:, None]


class Attention(nn.Module):
    """Causal multi-head attention whose state is the last `attn_window` keys and values."""

    config: ModelConfig
    layer_id: int

    @nn.compact
    def __call__(self, x, kv_state: dict | None, pos: jax.Array):
        cfg = self.config
        B, T, C = x.shape
        H, N, W = cfg.attn_heads, cfg.attn_head_size, cfg.attn_window
        heads = lambda a: a.reshape(B, T, H, N)  # noqa: E731
        q = heads(dense(cfg, C, "query", _matrix_init("attn.query", C, C))(x))
        k = heads(dense(cfg, C, "key", _matrix_init("attn.key", C, C))(x))
        v = heads(dense(cfg, C, "value", _matrix_init("attn.value", C, C))(x))
        if cfg.pos_emb == "rotary":
            positions = pos[:, None] + jnp.arange(T)[None, :]
            q = rotary(q, positions, cfg.rope_base)
            k = rotary(k, positions, cfg.rope_base)

        if kv_state is None:
            # Nothing before this chunk: plain causal attention within a window, which cuDNN
            # runs without materialising a mask.
            y = jax.nn.dot_product_attention(
                q, k, v, is_causal=True, local_window_size=(W, 0),
                implementation=_attention_impl(cfg),
            )
            past_k = jnp.zeros((B, W, H, N), k.dtype)
            past_v = past_k
        else:
            past_k, past_v = kv_state["k"].astype(k.dtype), kv_state["v"].astype(v.dtype)
            y = jax.nn.dot_product_attention(
                q,
                jnp.concatenate([past_k, k], axis=1),
                jnp.concatenate([past_v, v], axis=1),
                mask=window_mask(pos, T, W),
                implementation=_attention_impl(cfg),
            )
        new_state = {
            "k": jnp.concatenate([past_k, k], axis=1)[:, -W:],
            "v": jnp.concatenate([past_v, v], axis=1)[:, -W:],
        }
        out = dense(cfg, C, "output", _matrix_init("att.output", C, C))(y.reshape(B, T, C))
        return out, new_state


class MLP(nn.Module):
    """The transformer feed-forward of attention blocks: GELU, zero-initialised output."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = dense(cfg, cfg.dim_ffn, "fc", _matrix_init("mlp.fc", cfg.n_embd, cfg.dim_ffn))(x)
        h = jax.nn.gelu(h)
        return dense(cfg, cfg.n_embd, "proj", _matrix_init("ffn.value", cfg.dim_ffn, cfg.n_embd))(h)


class InitState(nn.Module):
    """A learned initial state for one RWKV layer; all-zero parameters equal the zero state.

    The WKV part is held at scale pp = 0, where aa = bb = 0 means "nothing seen", exactly as
    the zero state does; bb is kept non-negative because it is a sum of weights.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, batch_size: int) -> dict:
        C = self.config.n_embd
        p = {n: self.param(n, nn.initializers.zeros_init(), (C,), jnp.float32)
             for n in ("shift_att", "aa", "bb", "shift_ffn")}
        return learned_layer_state(p, batch_size)


def learned_layer_state(p: dict, batch_size: int) -> dict:
    expand = lambda a: jnp.broadcast_to(a, (batch_size,) + a.shape)  # noqa: E731
    return {
        "shift_att": expand(p["shift_att"]),
        "aa": expand(p["aa"]),
        "bb": expand(jnp.maximum(p["bb"], 0.0)),
        "pp": jnp.zeros((batch_size, p["aa"].shape[0]), jnp.float32),
        "shift_ffn": expand(p["shift_ffn"]),
    }


class RWKVBlock(nn.Module):
    """x + TimeMix(ln1 x), then + ChannelMix(ln2 x); block 0 also normalises the embedding."""

    config: ModelConfig
    layer_id: int
    is_rwkv_block = True

    @nn.compact
    def __call__(self, x, state: dict | None, pos: jax.Array):
        cfg = self.config
        if self.layer_id == 0:
            x = layer_norm(cfg, "ln0")(x)
        if cfg.learned_init_state:
            learned = InitState(cfg, name="init_state")(x.shape[0])
            state = learned if state is None else state
        if state is None:
            from rwkv_jax.state import zero_layer_state  # noqa: PLC0415

            state = zero_layer_state(cfg, self.layer_id, x.shape[0])
        wkv = WKVState(state["aa"], state["bb"], state["pp"])
        att, shift_att, wkv = TimeMix(cfg, self.layer_id, name="att")(
            layer_norm(cfg, "ln1")(x), state["shift_att"], wkv)
        x = x + att
        ffn, shift_ffn = ChannelMix(cfg, self.layer_id, name="ffn")(
            layer_norm(cfg, "ln2")(x), state["shift_ffn"])
        x = x + ffn
        new = {"shift_att": shift_att, "aa": wkv.aa, "bb": wkv.bb, "pp": wkv.pp,
               "shift_ffn": shift_ffn}
        return x, new


class AttentionBlock(nn.Module):
    """A transformer block (pre-norm attention + GELU MLP) in place of an RWKV block."""

    config: ModelConfig
    layer_id: int
    is_rwkv_block = False

    @nn.compact
    def __call__(self, x, state: dict | None, pos: jax.Array):
        cfg = self.config
        if self.layer_id == 0:
            x = layer_norm(cfg, "ln0")(x)
        att, new_state = Attention(cfg, self.layer_id, name="attn")(
            layer_norm(cfg, "ln1")(x), state, pos)
        x = x + att
        x = x + MLP(cfg, name="mlp")(layer_norm(cfg, "ln2")(x))
        return x, new_state
