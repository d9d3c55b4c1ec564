"""The language model: embedding -> blocks (by layer pattern) -> ln_out -> head.

    model = RWKV(config)
    params = model.init(rng, tokens)["params"]
    logits, state = model.apply({"params": params}, tokens, state)

One forward function serves training, prefill and decode: pass state=None for a fresh
sequence (the zero state, or the learned initial state when the config asks for one), or the
state a previous call returned to continue where it stopped.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from rwkv_jax.config import ModelConfig
from rwkv_jax.nn.attention import AttentionBlock
from rwkv_jax.nn.common import dense, layer_norm
from rwkv_jax.nn.rwkv4 import RWKVBlock, learned_layer_state
from rwkv_jax.nn.rwkv7 import RWKV7Block, learned_layer_state7
from rwkv_jax.nn.state import zero_state
from rwkv_jax.nn.state_codec import StateCodec


def _block_class(config: ModelConfig, layer: int):
    if config.is_rwkv(layer):
        cls = RWKV7Block if config.version == "7" else RWKVBlock
    else:
        cls = AttentionBlock
    if config.remat:
        cls = nn.remat(cls, policy=remat_policy(config.remat_policy))
    return cls


def remat_policy(name: str):
    """jax.checkpoint_policies by name, and ours: "dots_and_wkv_saveable" keeps the matrix
    products and what the WKV kernels return and keep for their backward (tagged "wkv"), and
    recomputes the elementwise rest, which a memory-bound step reads faster than it stores."""
    cp = jax.checkpoint_policies
    if name == "dots_and_wkv_saveable":
        return cp.save_from_both_policies(cp.dots_saveable, cp.save_only_these_names("wkv"))
    return getattr(cp, name)


class RWKV(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, state: dict | None = None, *, last_only: bool = False):
        """(logits (B, T, V), state); with last_only=True the logits of the last position
        only, (B, 1, V): a prefill needs no others, and the head is the model's widest matrix."""
        cfg = self.config
        chex.assert_rank(tokens, 2)
        chex.assert_type(tokens, int)
        B, T = tokens.shape
        if state is not None:
            chex.assert_shape(state["pos"], (B,))
        pos = jnp.zeros((B,), jnp.int32) if state is None else state["pos"]

        x = nn.Embed(
            cfg.vocab_size, cfg.n_embd, param_dtype=jnp.float32, name="emb",
            embedding_init=nn.initializers.uniform_range(-cfg.emb_init_scale, cfg.emb_init_scale)
            if hasattr(nn.initializers, "uniform_range") else _uniform(cfg.emb_init_scale),
        )(tokens)
        if cfg.pos_emb == "learned":
            positions = jnp.minimum(pos[:, None] + jnp.arange(T)[None, :], cfg.max_positions - 1)
            x = x + nn.Embed(cfg.max_positions, cfg.n_embd, param_dtype=jnp.float32,
                             embedding_init=nn.initializers.zeros_init(), name="pos_emb")(positions)

        new_layers = []
        # RWKV-7: the first RWKV layer's values, which every later RWKV-7 layer mixes into its
        # own. Recomputed from this call's tokens (not state); attention layers pass it by.
        v_first = None
        for i in range(cfg.n_layer):
            layer_state = None if state is None else state["layers"][i]
            block = _block_class(cfg, i)(cfg, i, name=f"blocks_{i}")
            if cfg.version == "7" and cfg.is_rwkv(i):
                x, s, v_first = block(x, layer_state, pos, v_first)
            else:
                x, s = block(x, layer_state, pos)
            new_layers.append(s)

        if last_only:
            x = x[:, -1:]
        x = layer_norm(cfg, "ln_out")(x)
        gain = 0.5 * (cfg.vocab_size / cfg.n_embd) ** 0.5 if cfg.vocab_size > cfg.n_embd else 0.5
        logits = dense(cfg, cfg.vocab_size, "head", nn.initializers.orthogonal(gain))(x)
        logits = logits.astype(jnp.float32)
        chex.assert_shape(logits, (B, x.shape[1], cfg.vocab_size))
        if cfg.state_compression == "learned" and self.is_initializing():
            # The codec runs between calls, not in one, but its parameters belong in this tree
            # so that they train, checkpoint and shard with the model.
            StateCodec(cfg, name="state_codec")()
        return logits, {"pos": pos + T, "layers": tuple(new_layers)}


def _uniform(scale: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return init


def param_shapes(config: ModelConfig) -> dict:
    """The parameters' shapes and dtypes (traced: nothing is allocated or compiled)."""
    return jax.eval_shape(lambda: RWKV(config).init(jax.random.PRNGKey(0),
                                                    jnp.zeros((1, 2), jnp.int32)))["params"]


def init_params(config: ModelConfig, rng: jax.Array, seq_len: int = 2) -> dict:
    """Fresh parameters (the official initialisation of the config's RWKV version)."""
    init = jax.jit(RWKV(config).init)  # one compile beats op-by-op dispatch of every init
    return init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]


def initial_state(config: ModelConfig, params: dict | None, batch_size: int) -> dict:
    """The state a fresh sequence starts from: learned where the config learns it, else zero.

    Same tree as rwkv_jax.nn.state.zero_state, so it can be passed to any call.
    """
    state = zero_state(config, batch_size)
    if not config.learned_init_state:
        return state
    if params is None:
        raise ValueError("architecture.learned_init_state=True: the initial state needs the parameters")
    layers = list(state["layers"])
    learned = learned_layer_state7 if config.version == "7" else learned_layer_state
    for i in range(config.n_layer):
        if config.is_rwkv(i):
            layers[i] = learned(params[f"blocks_{i}"]["init_state"], batch_size)
    return {"pos": state["pos"], "layers": tuple(layers)}


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
