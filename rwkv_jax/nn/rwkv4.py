"""RWKV-4 time-mix and channel-mix, a learned initial state, and the RWKV-4 block.

Every layer takes its slice of the recurrent state and returns the updated slice, so the same
code runs a whole sequence, a chunk of one, or a single token. Parameter names follow the
official RWKV-LM checkpoints (time_decay, time_first, time_mix_k, key, value, receptance,
output, ln0/ln1/ln2), so converting weights is a rename and a transpose.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.config import ModelConfig
from rwkv_jax.nn.common import (
    const_init,
    dense,
    layer_norm,
    layer_ratios,
    matrix_init,
    mix,
    token_shift,
)
from rwkv_jax.nn.state import zero_layer_state
from rwkv_jax.ops.wkv4 import WKVState, wkv4


class TimeMix(nn.Module):
    """RWKV-4 time-mix: mix with the previous token, then the WKV recurrence gated by r."""

    config: ModelConfig
    layer_id: int

    @nn.compact
    def __call__(self, x, shift, wkv_state: WKVState):
        cfg = self.config
        C = cfg.n_embd
        r0, r1 = layer_ratios(self.layer_id, cfg.n_layer)
        ddd = np.arange(C, dtype=np.float64) / C
        h = np.arange(cfg.dim_att, dtype=np.float64) / max(cfg.dim_att - 1, 1)
        decay = -5 + 8 * h ** (0.7 + 1.3 * r0)
        zigzag = 0.5 * (((np.arange(cfg.dim_att) + 1) % 3) - 1)
        f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731

        time_decay = self.param("time_decay", const_init(f32(decay)), (cfg.dim_att,))
        time_first = self.param("time_first", const_init(f32(math.log(0.3) + zigzag)), (cfg.dim_att,))
        mix_k = self.param("time_mix_k", const_init(f32(ddd**r1)), (C,))
        mix_v = self.param("time_mix_v", const_init(f32(ddd**r1 + 0.3 * r0)), (C,))
        mix_r = self.param("time_mix_r", const_init(f32(ddd ** (0.5 * r1))), (C,))

        xx = token_shift(x, shift)
        xk, xv, xr = mix(x, xx, mix_k), mix(x, xx, mix_v), mix(x, xx, mix_r)
        k = dense(cfg, cfg.dim_att, "key", matrix_init("att.key", C, cfg.dim_att))(xk)
        v = dense(cfg, cfg.dim_att, "value", matrix_init("att.value", C, cfg.dim_att))(xv)
        r = dense(cfg, cfg.dim_att, "receptance",
                  matrix_init("att.receptance", C, cfg.dim_att))(xr)
        y, wkv_state = wkv4(time_decay, time_first, k, v, wkv_state,
                            impl=cfg.wkv_impl, chunk_size=cfg.wkv_chunk_size)
        out = jax.nn.sigmoid(r.astype(jnp.float32)) * y
        out = dense(cfg, C, "output", matrix_init("att.output", cfg.dim_att, C))(out)
        return out, x[:, -1], wkv_state


class ChannelMix(nn.Module):
    """RWKV-4 channel-mix: squared-ReLU feed-forward gated by a sigmoid receptance."""

    config: ModelConfig
    layer_id: int

    @nn.compact
    def __call__(self, x, shift):
        cfg = self.config
        C, F = cfg.n_embd, cfg.dim_ffn
        _, r1 = layer_ratios(self.layer_id, cfg.n_layer)
        init = np.asarray((np.arange(C, dtype=np.float64) / C) ** r1, np.float32)
        mix_k = self.param("time_mix_k", const_init(init), (C,))
        mix_r = self.param("time_mix_r", const_init(init), (C,))

        xx = token_shift(x, shift)
        xk, xr = mix(x, xx, mix_k), mix(x, xx, mix_r)
        k = dense(cfg, F, "key", matrix_init("ffn.key", C, F))(xk)
        r = dense(cfg, C, "receptance", matrix_init("ffn.receptance", C, C))(xr)
        h = jnp.square(jax.nn.relu(k))
        kv = dense(cfg, C, "value", matrix_init("ffn.value", F, C))(h)
        out = jax.nn.sigmoid(r.astype(jnp.float32)) * kv.astype(jnp.float32)
        return out, x[:, -1]


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
