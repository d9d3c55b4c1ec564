"""Causal attention with a KV window (rotary or learned positions) and the transformer block
that stands in for an RWKV block in a hybrid.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rwkv_jax.config import ModelConfig
from rwkv_jax.nn.common import (
    dense,
    layer_norm,
    matrix_init,
)


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

    cuDNN is the faster for a chunk alone and for a chunk with the previous chunk's KV window
    and an explicit mask, so both cases take it (figures in docs/performance.md,
    bench/attention.py).
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
        q = heads(dense(cfg, C, "query", matrix_init("attn.query", C, C))(x))
        k = heads(dense(cfg, C, "key", matrix_init("attn.key", C, C))(x))
        v = heads(dense(cfg, C, "value", matrix_init("attn.value", C, C))(x))
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
        out = dense(cfg, C, "output", matrix_init("att.output", C, C))(y.reshape(B, T, C))
        return out, new_state


class MLP(nn.Module):
    """The transformer feed-forward of attention blocks: GELU, zero-initialised output."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = dense(cfg, cfg.dim_ffn, "fc", matrix_init("mlp.fc", cfg.n_embd, cfg.dim_ffn))(x)
        h = jax.nn.gelu(h)
        return dense(cfg, cfg.n_embd, "proj", matrix_init("ffn.value", cfg.dim_ffn, cfg.n_embd))(h)


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
