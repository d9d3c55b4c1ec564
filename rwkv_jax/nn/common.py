"""What the RWKV-4, RWKV-7 and attention layers share: token shift, the official initialisers,
the dense and layer-norm constructors with the configured dtypes.

Dtypes: parameters float32; the residual stream, layer norms and mixes in float32; the matrix
products in the configured compute dtype.
"""

from __future__ import annotations

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.config import ModelConfig

# RWKV-LM v4neo zero-initialises these projections so that each block starts as the identity
# plus a small correction: training starts stable at any depth.
ZERO_INIT = {"att.key", "att.receptance", "att.output", "ffn.value", "ffn.receptance"}


def token_shift(x: jax.Array, prev: jax.Array) -> jax.Array:
    """x shifted one step right along time, with `prev` (the last token before x) in front."""
    return jnp.concatenate([prev[:, None, :].astype(x.dtype), x[:, :-1]], axis=1)


def layer_ratios(layer_id: int, n_layer: int) -> tuple[float, float]:
    ratio_0_to_1 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0
    ratio_1_to_almost0 = 1.0 - layer_id / n_layer
    return ratio_0_to_1, ratio_1_to_almost0


def const_init(values: np.ndarray):
    def init(key, shape, dtype=jnp.float32):
        del key
        chex.assert_shape(values, shape)
        return jnp.asarray(values, dtype)

    return init


def matrix_init(name: str, fan_in: int, fan_out: int, scale: float = 1.0):
    """RWKV-LM's recipe: orthogonal, gain sqrt(out/in) for widening matrices, some zero."""
    if name in ZERO_INIT:
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
