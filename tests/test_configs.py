"""Every shipped config loads, validates, and builds the model it describes (shapes only)."""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import pytest

from rwkv_jax import trainer
from rwkv_jax.config import ModelConfig, model_config_from, model_differences, validate
from rwkv_jax.model import RWKV, count_params

@pytest.mark.parametrize("name, billions", [("tiny", 0.001), ("model_169m", 0.169),
                                            ("model_1b5", 1.5), ("model_3b_rwkv", 3.0)])
def test_config_validates_and_sizes_right(name, billions):
    cfg = importlib.import_module(f"rwkv_jax.configs.{name}").get_config()
    validate(cfg)  # the bundled sample is there: its files are checked
    mc = model_config_from(cfg, vocab_size=256 if cfg.data.tokenizer == "byte" else 65536)
    shapes = jax.eval_shape(lambda: RWKV(mc).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
    n = count_params(shapes["params"])
    assert 0.6 * billions * 1e9 <= n <= 1.6 * billions * 1e9, n


def test_3b_is_the_documented_model():
    cfg = importlib.import_module("rwkv_jax.configs.model_3b_rwkv").get_config()
    mc = model_config_from(cfg, vocab_size=65536)
    assert (mc.n_layer, mc.n_embd, mc.dtype, mc.remat) == (32, 2560, "bfloat16", True)
    assert mc.layer_types[:2] == ("rwkv", "attn")
    assert cfg.train.max_seq_length == 16384 and cfg.memory.rwkv_chunk_size == 1024
    assert cfg.train.batch_size == 8
    assert trainer.model_flops_per_token(mc, 1024) > 6 * 2.5e9


def test_model_differences_name_what_makes_another_model():
    """What a resumed run may change (how the model computes) and what it may not."""
    base = ModelConfig(n_layer=2, n_embd=64)
    same = dict(dtype="bfloat16", wkv_impl="scan", remat=True, attn_impl="xla",
                state_compression="int8")  # int8 and bf16 codecs have no parameters
    assert model_differences(base, dataclasses.replace(base, **same)) == []
    assert model_differences(base, dataclasses.replace(base, head_size=16, vocab_size=512)) == [
        "model.vocab_size: 256 -> 512", "model.head_size: 64 -> 16"]
    assert model_differences(base, dataclasses.replace(base, state_compression="learned")) == [
        "memory.state_compression: 'none' -> 'learned'"]
    hybrid = dataclasses.replace(base, layer_types=("rwkv", "attn"))
    assert model_differences(base, hybrid) == [
        "architecture.layer_pattern: 2 layers: 2 RWKV (100%), 0 attention (0%) at [] -> "
        "2 layers: 1 RWKV (50%), 1 attention (50%) at [1]"]
    assert model_differences(base, ModelConfig(n_layer=3, n_embd=64)) == ["model.n_layer: 2 -> 3"]
