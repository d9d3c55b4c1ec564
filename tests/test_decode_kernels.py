"""The fused RWKV-4 decode kernels (rwkv_jax.ops.pallas.decode4), in the Pallas interpreter:
a block step equals the model's block, the kernel layout gives the model's outputs at any
length, generation through them equals generation through XLA, and they lower to valid
Triton IR for a GPU."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import pytest

from conftest import perturbed, rel_err, seasoned_block
from rwkv_jax.config import ModelConfig
from rwkv_jax.generate import GREEDY, Generator
from rwkv_jax.layers import kernel_layout
from rwkv_jax.model import RWKV, init_params
from rwkv_jax.ops.pallas import decode4
from rwkv_jax.state import zero_layer_state

V = 61
# C = 48 is no power of two (masked tiles); the tilings split the rows and columns unevenly.
TILINGS = [decode4.Config(block_n=8, block_k=16), decode4.Config(block_n=4, block_k=64)]


def _config(**kw):
    return ModelConfig(**{"vocab_size": V, "n_layer": 3, "n_embd": 48, "dim_ffn": 192, **kw})


@pytest.mark.parametrize("rows", [1, 3])
def test_block_step_equals_the_model_block(rows):
    config = _config()
    params, x, state, want, want_state = seasoned_block(config, rows)
    fused = kernel_layout(_config(n_layer=1), {"blocks_0": params})["blocks_0"]
    for cfg in TILINGS:  # jitted: one compile per tiling instead of op-by-op dispatch
        step = jax.jit(lambda p, x, s: decode4.block_step(p, x, s, eps=config.layer_norm_eps,  # noqa: B023
                                                          cfg=cfg, interpret=True))
        got, got_state = step(fused, x[:, 0], state)
        assert rel_err(got, want[:, 0]) <= 1e-6
        for name in want_state:
            assert rel_err(got_state[name], want_state[name]) <= 1e-6, name


def test_kernel_layout_gives_the_model_outputs_at_any_length():
    config = _config(layer_types=("rwkv", "attn", "rwkv"), attn_head_size=8, attn_window=6)
    params = perturbed(init_params(config, jax.random.PRNGKey(3)))
    fused = kernel_layout(config, params)
    assert fused["blocks_0"]["att"]["kvr_t"].shape == (3, 48, 48)
    assert fused["blocks_0"]["ffn"]["kr_t"].shape == (192 + 48, 48)
    assert fused["blocks_1"] == params["blocks_1"]  # attention blocks keep their layout
    chex.assert_trees_all_equal(kernel_layout(config, fused), fused)
    apply = jax.jit(RWKV(config).apply)
    # A prefill (XLA, products by the transposes) and single tokens of 2 rows (the kernels)
    # and of 5 rows (more than the kernels take: XLA again).
    for B, T in ((2, 9), (2, 1), (5, 1)):
        tokens = jax.random.randint(jax.random.PRNGKey(T), (B, T), 0, V)
        want, want_state = apply({"params": params}, tokens)
        got, got_state = apply({"params": fused}, tokens)
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(got_state, want_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_types", [("rwkv", "rwkv"), ("rwkv", "attn")],
                         ids=["pure", "hybrid"])
def test_generation_through_the_kernels_equals_generation_through_xla(layer_types):
    config = _config(n_layer=2, layer_types=layer_types, attn_head_size=8, attn_window=6,
                     pos_emb="rotary")
    params = perturbed(init_params(config, jax.random.PRNGKey(0)), scale=0.5)
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]  # ragged: the longer row's tail is decoded
    results = []
    for kernels in (False, True):
        gen = Generator(config, params, decode_block=4, decode_kernels=kernels)
        # XLA's steps pad one row to two on a GPU (Generator's decode_rows); kernels take one.
        rows = 2 if jax.default_backend() == "gpu" and not kernels else 1
        assert gen.decode_kernels == ("pallas" if kernels else None) and gen.decode_rows == rows
        results.append(gen.generate(prompts, max_new_tokens=7, sampling=GREEDY,
                                    keep_state=True))
    xla, kern = results
    assert kern.tokens == xla.tokens
    chex.assert_trees_all_close(kern.state, xla.state, rtol=1e-4, atol=1e-4)


def test_kernels_lower_to_valid_triton_ir(triton_modules):
    """Lower a bf16 block step for CUDA and verify every Triton module (conftest)."""
    config = _config(n_layer=2, dtype="bfloat16")
    params = kernel_layout(config, init_params(config, jax.random.PRNGKey(0)))["blocks_1"]
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.ndim > 1 else a, params)
    spec = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)  # noqa: E731
    for rows in (1, 3):
        state = zero_layer_state(config, 1, rows)
        step = lambda p, x, s: decode4.block_step(p, x, s, eps=1e-5, interpret=False)  # noqa: E731
        try:
            jax.jit(step).trace(spec(params), jax.ShapeDtypeStruct((rows, 48), jnp.float32),
                                spec(state)).lower(lowering_platforms=("cuda",))
        except (TypeError, AttributeError) as e:  # an older or newer tracing API
            pytest.skip(f"cannot lower for cuda here: {e}")
    assert len(triton_modules) == 12, triton_modules
