"""The whole model: recurrent mode equals parallel mode, pure and hybrid; options; init recipe."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import perturbed

from rwkv_jax.config import ModelConfig
from rwkv_jax.config import layer_pattern as hybrid
from rwkv_jax.nn.attention import AttentionBlock
from rwkv_jax.nn.model import RWKV, init_params, initial_state
from rwkv_jax.nn.rwkv4 import RWKVBlock
from rwkv_jax.nn.state import zero_state

V = 61


def _config(**kw):
    base = dict(vocab_size=V, n_layer=4, n_embd=32, attn_head_size=8, attn_window=64)
    base.update(kw)
    return ModelConfig(**base)


PURE = _config()
HYBRID = _config(layer_types=hybrid.build_layer_pattern(4), pos_emb="rotary")
LEARNED_POS = _config(layer_types=("rwkv", "attn", "attn", "rwkv"), pos_emb="learned", max_positions=64)
SMALL_WINDOW = _config(layer_types=hybrid.build_layer_pattern(4), attn_window=5)


def _run_modes(config, T=24, B=2, seed=0):
    params = perturbed(init_params(config, jax.random.PRNGKey(seed)))
    apply = jax.jit(RWKV(config).apply)
    tokens = jax.random.randint(jax.random.PRNGKey(seed + 7), (B, T), 0, V)
    full, full_state = apply({"params": params}, tokens)

    pieces, state = [], None
    for a, b in [(0, 5), (5, 6), (6, 15), (15, T)]:  # the last two of one length: one compile
        logits, state = apply({"params": params}, tokens[:, a:b], state)
        pieces.append(logits)
    chunked = jnp.concatenate(pieces, axis=1)

    steps, state_tok = [], zero_state(config, B)
    for t in range(T):
        logits, state_tok = apply({"params": params}, tokens[:, t : t + 1], state_tok)
        steps.append(logits)
    return full, full_state, chunked, state, jnp.concatenate(steps, axis=1), state_tok


@pytest.mark.parametrize("config", [PURE, HYBRID, LEARNED_POS, SMALL_WINDOW],
                         ids=["pure", "hybrid-rotary", "hybrid-learned-pos", "window-5"])
def test_recurrent_equals_parallel(config):
    full, full_state, chunked, state, stepped, state_tok = _run_modes(config)
    chex.assert_trees_all_close(chunked, full, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(stepped, full, rtol=1e-5, atol=1e-5)
    # The state itself, attention KV windows included, ends the same whichever way it was fed.
    chex.assert_trees_all_close(state, full_state, rtol=1e-4, atol=1e-4)
    chex.assert_trees_all_close(state_tok, full_state, rtol=1e-4, atol=1e-4)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, zero_state(config, 2))


def test_window_limits_what_attention_sees():
    """With a window of 5, a token 6+ steps back changes nothing in a one-attention-layer model."""
    config = _config(n_layer=1, layer_types=("attn",), attn_window=5)
    params = perturbed(init_params(config, jax.random.PRNGKey(0)))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 12), 0, V)
    changed = tokens.at[0, 2].set((tokens[0, 2] + 1) % V)
    apply = jax.jit(RWKV(config).apply)
    a, _ = apply({"params": params}, tokens)
    b, _ = apply({"params": params}, changed)
    assert not np.allclose(a[0, 7], b[0, 7])  # position 7 sees 2..7
    np.testing.assert_allclose(a[0, 8:], b[0, 8:], atol=1e-6)


def test_wkv_forms_give_the_same_model():
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 19), 0, V)
    params = perturbed(init_params(PURE, jax.random.PRNGKey(0)))  # the same for every form
    outs = []
    for impl in ("scan", "assoc", "chunked"):
        config = _config(wkv_impl=impl, wkv_chunk_size=8)
        outs.append(jax.jit(RWKV(config).apply)({"params": params}, tokens)[0])
    chex.assert_trees_all_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(outs[2], outs[0], rtol=1e-5, atol=1e-5)


def test_learned_initial_state_same_tree_and_zero_init_equals_zero_state():
    config = _config(learned_init_state=True, layer_types=hybrid.build_layer_pattern(4))
    params = init_params(config, jax.random.PRNGKey(0))
    assert set(params["blocks_0"]["init_state"]) == {"shift_att", "aa", "bb", "shift_ffn"}
    assert "init_state" not in params["blocks_1"]  # attention layers start from an empty window
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, V)
    learned = initial_state(config, params, 2)
    chex.assert_trees_all_equal_shapes_and_dtypes(learned, zero_state(config, 2))
    model = RWKV(config)
    model.apply = jax.jit(model.apply)
    a, _ = model.apply({"params": params}, tokens)  # None: the learned state
    b, _ = model.apply({"params": params}, tokens, zero_state(config, 2))  # the zero state
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-5)
    # A trained (non-zero) initial state is what state=None starts from, and it matters.
    params = perturbed(params)
    a, _ = model.apply({"params": params}, tokens)
    c, _ = model.apply({"params": params}, tokens, initial_state(config, params, 2))
    d, _ = model.apply({"params": params}, tokens, zero_state(config, 2))
    chex.assert_trees_all_close(a, c, rtol=1e-5, atol=1e-5)
    assert not np.allclose(a, d)


def test_remat_and_dtype_options():
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, V)
    params = perturbed(init_params(HYBRID, jax.random.PRNGKey(0)))
    base, _ = jax.jit(RWKV(HYBRID).apply)({"params": params}, tokens)
    remat = _config(layer_types=HYBRID.layer_types, pos_emb="rotary", remat=True,
                    remat_policy="dots_saveable")
    out, _ = jax.jit(RWKV(remat).apply)({"params": params}, tokens)
    chex.assert_trees_all_close(out, base, atol=1e-6)
    loss = lambda p, cfg: jnp.mean(RWKV(cfg).apply({"params": p}, tokens)[0] ** 2)  # noqa: E731
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    chex.assert_trees_all_close(grad(params, remat), grad(params, HYBRID),
                                rtol=1e-5, atol=1e-6)
    bf16 = _config(layer_types=HYBRID.layer_types, pos_emb="rotary", dtype="bfloat16")
    out, state = jax.jit(RWKV(bf16).apply)({"params": params}, tokens)
    assert out.dtype == jnp.float32 and state["layers"][0]["aa"].dtype == jnp.float32
    assert state["layers"][1]["k"].dtype == jnp.bfloat16
    assert float(jnp.abs(out - base).max()) < 0.1 * float(jnp.abs(base).max())


def test_official_initialisation_recipe():
    config = _config(n_layer=3)
    p = init_params(config, jax.random.PRNGKey(0))
    att0, att2 = p["blocks_0"]["att"], p["blocks_2"]["att"]
    # time_decay spreads from -5 to 3 across channels; time_first is log(0.3) plus a zigzag.
    np.testing.assert_allclose([att0["time_decay"][0], att0["time_decay"][-1]], [-5.0, 3.0], atol=1e-6)
    assert np.all(np.diff(att2["time_decay"]) > 0)
    np.testing.assert_allclose(att0["time_first"][:3], np.log(0.3) + np.array([0, 0.5, -0.5]), atol=1e-6)
    # time_mix ramps: 0 at channel 0, and the top layer's ramp is flatter (closer to 1).
    assert att0["time_mix_k"][0] == 0 and att2["time_mix_k"][16] > att0["time_mix_k"][16]
    for name in ("key", "receptance", "output"):
        assert not np.any(att0[name]["kernel"]), name
    for name in ("value", "receptance"):
        assert not np.any(p["blocks_0"]["ffn"][name]["kernel"]), name
    v = np.asarray(att0["value"]["kernel"])
    np.testing.assert_allclose(v.T @ v, np.eye(32), atol=1e-5)  # orthogonal
    assert np.abs(p["emb"]["embedding"]).max() <= 1e-4


def test_block_kinds_and_boundaries():
    assert RWKVBlock.is_rwkv_block and not AttentionBlock.is_rwkv_block
    params = init_params(HYBRID, jax.random.PRNGKey(0))
    assert "att" in params["blocks_0"] and "attn" in params["blocks_1"]
    with pytest.raises(AssertionError):
        RWKV(HYBRID).apply({"params": params}, jnp.zeros((2,), jnp.int32))  # tokens must be (B, T)
    with pytest.raises(AssertionError):
        RWKV(HYBRID).apply({"params": params}, jnp.zeros((2, 3), jnp.int32), zero_state(HYBRID, 3))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="model.attn_head_size"):
        ModelConfig(n_embd=30, attn_head_size=8, layer_types=("rwkv", "attn"), n_layer=2)
    with pytest.raises(ValueError, match="efficiency.precision"):
        ModelConfig(dtype="float8")
    with pytest.raises(ValueError, match="efficiency.wkv_impl"):
        ModelConfig(wkv_impl="cuda")
    with pytest.raises(ValueError, match="unknown model option"):
        ModelConfig.from_dict({"n_layers": 4})
    cfg = ModelConfig.from_dict({"n_layer": 6, "layer_pattern": "custom", "attention_layers": [2, 5]})
    assert cfg.layer_types == ("rwkv", "rwkv", "attn", "rwkv", "rwkv", "attn")
