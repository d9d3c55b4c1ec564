"""Decode weights (rwkv_jax.generate.decode_weights): pack_for_decode's layouts read by decode_forward
give the model's outputs (model.apply on the official layout), one token or a prefill, pure
RWKV-4, hybrid and RWKV-7; and the layouts themselves."""

from __future__ import annotations

import chex
import jax
import pytest
from conftest import perturbed

from rwkv_jax.config import ModelConfig
from rwkv_jax.generate.decode_weights import (
    DecodeWeights,
    decode_forward,
    group_products,
    kernel_layout,
    pack_for_decode,
)
from rwkv_jax.nn.model import RWKV, init_params

V = 61
CONFIGS = {
    "rwkv4": dict(layer_types=("rwkv", "rwkv")),
    "hybrid": dict(layer_types=("rwkv", "attn", "rwkv", "rwkv"), pos_emb="rotary"),
    "rwkv7": dict(version="7", head_size=8, layer_types=("rwkv", "rwkv")),
}


def _config(layer_types, **kw):
    base = dict(vocab_size=V, n_layer=len(layer_types), layer_types=layer_types, n_embd=32,
                dim_ffn=128, attn_head_size=8, attn_window=64)
    return ModelConfig(**{**base, **kw})


def _forward(config):
    return jax.jit(lambda w, t, s: decode_forward(config, w, t, s))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_packed_weights_give_the_models_outputs(kind, dtype):
    config = _config(**CONFIGS[kind], dtype=dtype)
    params = perturbed(init_params(config, jax.random.PRNGKey(3)))
    apply = jax.jit(RWKV(config).apply)
    forward = _forward(config)
    packed = pack_for_decode(config, params)
    assert packed.kernel is None
    tol = 1e-6 if dtype == "float32" else 2e-2
    # A prefill from the fresh state (each input through its own columns), then one token from
    # the state it left (every input through the whole grouped matrix).
    prefill = jax.random.randint(jax.random.PRNGKey(1), (2, 20), 0, V)  # 40 rows: > _STACK_ROWS
    want, want_state = apply({"params": params}, prefill)
    got, got_state = forward(packed, prefill, None)
    chex.assert_trees_all_close(got, want, rtol=tol, atol=tol)
    chex.assert_trees_all_close(got_state, want_state, rtol=tol, atol=tol)
    step = jax.random.randint(jax.random.PRNGKey(2), (2, 1), 0, V)
    want, want_next = apply({"params": params}, step, want_state)
    got, got_next = forward(packed, step, want_state)
    chex.assert_trees_all_close(got, want, rtol=tol, atol=tol)
    chex.assert_trees_all_close(got_next, want_next, rtol=tol, atol=tol)


def test_the_grouped_layout_packs_rwkv4_blocks_only():
    config = _config(**CONFIGS["hybrid"])
    params = init_params(config, jax.random.PRNGKey(3))
    grouped = group_products(config, params)
    assert "kvr" in grouped["blocks_2"]["att"] and "key" not in grouped["blocks_2"]["ffn"]
    assert grouped["blocks_2"]["ffn"]["kr"].shape == (32, 128 + 32)
    assert grouped["blocks_1"] == params["blocks_1"]  # attention blocks keep their layout
    chex.assert_trees_all_equal(group_products(config, grouped), grouped)
    assert pack_for_decode(config, params, group_products=False).params is params
    config7 = _config(**CONFIGS["rwkv7"])
    params7 = init_params(config7, jax.random.PRNGKey(0))
    assert group_products(config7, params7) is params7
    assert pack_for_decode(config7, params7, kernels="cuda") == DecodeWeights(params7, None)


def test_the_kernel_layout_gives_the_models_outputs_at_any_length():
    """The CUDA kernel's transposed layout, read through XLA's products: a prefill, single
    tokens of 2 rows and of 5 rows."""
    config = ModelConfig(vocab_size=V, n_layer=3, n_embd=48, dim_ffn=192,
                         layer_types=("rwkv", "attn", "rwkv"), attn_head_size=8, attn_window=6)
    params = perturbed(init_params(config, jax.random.PRNGKey(3)))
    fused = kernel_layout(config, params)
    assert fused["blocks_0"]["att"]["kvr_t"].shape == (3, 48, 48)
    assert fused["blocks_0"]["ffn"]["kr_t"].shape == (192 + 48, 48)
    assert fused["blocks_1"] == params["blocks_1"]  # attention blocks keep their layout
    chex.assert_trees_all_equal(kernel_layout(config, fused), fused)
    apply = jax.jit(RWKV(config).apply)
    forward = _forward(config)
    for B, T in ((2, 9), (2, 1), (5, 1)):
        tokens = jax.random.randint(jax.random.PRNGKey(T), (B, T), 0, V)
        want, want_state = apply({"params": params}, tokens)
        got, got_state = forward(DecodeWeights(fused), tokens, None)
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(got_state, want_state, rtol=1e-5, atol=1e-5)
