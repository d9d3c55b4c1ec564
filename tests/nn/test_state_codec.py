"""State compression: exact 'none', bounded error for bf16 / int8 (what the state means, and the
next logits), exact empty states, sizes, and a learned codec that trains with the model."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import perturbed, rel_err

from rwkv_jax.config import ModelConfig
from rwkv_jax.nn import state_codec
from rwkv_jax.nn.model import RWKV, init_params
from rwkv_jax.nn.state import zero_state

V = 61
HYBRID = ModelConfig(vocab_size=V, n_layer=3, n_embd=32, layer_types=("rwkv", "attn", "rwkv"),
                     attn_head_size=8, attn_window=8)
_apply = jax.jit(lambda cfg, p, x, s: RWKV(cfg).apply({"params": p}, x, s), static_argnums=0)
_roundtrip = jax.jit(state_codec.roundtrip, static_argnums=1)


@pytest.fixture(scope="module")
def fed():
    """A hybrid model and the state after 20 tokens (KV window full, WKV sums far from zero)."""
    params = perturbed(init_params(HYBRID, jax.random.PRNGKey(0)))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 20), 0, V)
    _, state = _apply(HYBRID, params, tokens, zero_state(HYBRID, 2))
    nxt = jax.random.randint(jax.random.PRNGKey(2), (2, 3), 0, V)
    want, _ = _apply(HYBRID, params, nxt, state)
    return params, state, nxt, want


def _sums(layer):
    return layer["aa"] * jnp.exp(layer["pp"]), layer["bb"] * jnp.exp(layer["pp"])


@pytest.mark.parametrize("mode, meaning_tol, logits_tol", [("bf16", 5e-3, 5e-3), ("int8", 3e-2, 1.5e-2)])
def test_lossy_codecs_keep_the_state_meaning(fed, mode, meaning_tol, logits_tol):
    params, state, nxt, want = fed
    back = _roundtrip(state, mode, None)
    chex.assert_trees_all_equal_shapes_and_dtypes(back, state)
    for old, new in zip(state["layers"], back["layers"]):
        if "aa" in old:
            for a, b in zip(_sums(new), _sums(old)):
                assert rel_err(a, b) < meaning_tol
            for k in ("shift_att", "shift_ffn"):
                assert rel_err(new[k], old[k]) < meaning_tol
        else:
            assert rel_err(new["k"], old["k"]) < meaning_tol
    got, _ = _apply(HYBRID, params, nxt, back)
    assert rel_err(got, want) < logits_tol


def test_none_is_the_identity_and_empty_states_are_exact(fed):
    _, state, _, _ = fed
    assert state_codec.compress(state, "none") is state
    chex.assert_trees_all_equal(_roundtrip(state, "none", None), state)
    zero = zero_state(HYBRID, 2)
    for mode in ("bf16", "int8"):
        chex.assert_trees_all_equal(_roundtrip(zero, mode, None), zero)


def test_sizes_shrink_as_documented(fed):
    _, state, _, _ = fed
    size = {m: state_codec.bytes_of(state_codec.compress(state, m)) for m in ("none", "bf16", "int8")}
    assert size["bf16"] < 0.55 * size["none"] and size["int8"] < 0.3 * size["none"], size
    # The same numbers from shapes alone (what the benchmark uses for a 3B model).
    shapes = jax.eval_shape(lambda: state_codec.compress(zero_state(HYBRID, 2), "int8"))
    assert state_codec.bytes_of(shapes) == size["int8"]
    with pytest.raises(ValueError, match="not one of"):
        state_codec.compress(state, "fp4")


def test_learned_codec_parameters_shapes_and_errors(fed):
    _, state, _, _ = fed
    cfg = ModelConfig(**{**HYBRID.to_dict(), "state_compression": "learned", "state_rank": 5})
    params = init_params(cfg, jax.random.PRNGKey(0))
    codec = params["state_codec"]
    assert set(codec) == {"layer_0", "layer_2"}  # RWKV layers only
    assert codec["layer_0"]["enc"]["kernel"].shape == (4 * 32, 5)
    assert not np.any(codec["layer_0"]["dec"]["kernel"])  # starts at zero
    packed = state_codec.compress(state, "learned", params)
    assert packed["layers"][0]["code"].shape == (2, 5)
    assert packed["layers"][1] is state["layers"][1]  # attention windows pass as they are
    back = _roundtrip(state, "learned", params)
    chex.assert_trees_all_equal_shapes_and_dtypes(back, state)
    with pytest.raises(ValueError, match="needs the model's params with a trained codec"):
        state_codec.compress(state, "learned", None)


def test_learned_codec_trains_with_the_model(tiny_run):
    """The trainer passes each carried state through the codec, so the LM loss trains it."""
    from rwkv_jax import io as ckpt  # noqa: PLC0415

    config, params, _ = ckpt.restore_params(tiny_run.run_dir)
    assert config.state_compression == "learned" and config.codec_rank == 4
    for layer in ("layer_0", "layer_1"):
        # Zero at init, and weight decay keeps a zero at zero: only gradients move it.
        assert np.abs(np.asarray(params["state_codec"][layer]["dec"]["kernel"])).max() > 1e-4
