"""Every shipped config loads, validates, and builds the model it describes (shapes only)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os

import jax
import jax.numpy as jnp
import pytest
from conftest import REPO

from rwkv_jax import train as trainer
from rwkv_jax.config import (
    ConfigError,
    ModelConfig,
    default_config,
    model_config_from,
    model_differences,
    validate,
)
from rwkv_jax.io import model_config_of
from rwkv_jax.nn.model import RWKV, count_params


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


# ----------------------------------------------------------------------------- one schema


def test_model_config_defaults_are_the_config_defaults():
    """A default config builds the library's default ModelConfig: no field has a default of
    its own that disagrees with SCHEMA, and model_config_from reads every field it should."""
    assert model_config_from(default_config(), vocab_size=256) == ModelConfig(vocab_size=256)
    cfg = default_config()
    cfg.efficiency.remat_policy, cfg.architecture.max_positions = "dots_saveable", 77
    cfg.memory.state_rank, cfg.model.dim_g_lora = 3, 5
    mc = model_config_from(cfg, vocab_size=256)
    assert (mc.remat_policy, mc.max_positions, mc.state_rank, mc.dim_g_lora) == (
        "dots_saveable", 77, 3, 5)


def test_a_bad_value_is_named_by_the_path_a_user_types():
    """ModelConfig's check owns its fields; the message names where a config sets them."""
    with pytest.raises(ConfigError, match=r"^efficiency.precision='fp8' is invalid: one of"):
        ModelConfig(dtype="fp8")
    with pytest.raises(ConfigError, match=r"^efficiency.remat_policy='most' is invalid: one of"):
        ModelConfig(remat_policy="most")
    cfg = default_config()
    cfg.memory.state_compression = "zip"
    with pytest.raises(ConfigError, match=r"^memory.state_compression='zip' is invalid: one of"):
        model_config_from(cfg, vocab_size=256)


def test_moved_paths_still_work_with_one_line(caplog):
    """Old paths (MOVED) set the new fields, from a file or a flag, with one note each."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    tiny = os.path.join(REPO, "rwkv_jax", "configs", "tiny.py")
    argv = ["train.py", f"--config={tiny}", "--config.memory.remat_policy=dots_saveable",
            "--config.memory.wkv_chunk_size=32"]
    config_flags.DEFINE_config_file("config", tiny, flag_values=fv, sys_argv=argv)  # as train.py
    fv(argv)
    cfg = fv.config
    with caplog.at_level(logging.WARNING, logger="rwkv_jax"):
        validate(cfg)
        mc = model_config_from(cfg, vocab_size=256)  # moved once: no second note
    assert [r.getMessage() for r in caplog.records] == [
        "config: memory.remat_policy is now efficiency.remat_policy",
        "config: memory.wkv_chunk_size is now efficiency.wkv_chunk_size"]
    assert (mc.remat_policy, mc.wkv_chunk_size) == ("dots_saveable", 32)
    assert (cfg.efficiency.remat_policy, cfg.efficiency.wkv_chunk_size) == ("dots_saveable", 32)
    assert "remat_policy" not in cfg.memory and "remat_policy" not in json.loads(cfg.to_json())["memory"]
    # A bad value at the old path is reported once, at the new one.
    cfg = default_config()
    cfg.memory.remat_policy = "most"
    with pytest.raises(ConfigError, match=r"^efficiency.remat_policy='most' is invalid"):
        model_config_from(cfg, vocab_size=256)


def test_a_checkpoint_record_written_before_the_schema_change_loads():
    """The `model_config` record of a checkpoint saved before the move (its JSON, verbatim)."""
    record = json.loads(
        '{"version": "7", "vocab_size": 256, "n_layer": 2, "n_embd": 64, "dim_att": 64, '
        '"dim_ffn": 256, "layer_types": ["rwkv", "attn"], "attn_head_size": 64, '
        '"attn_window": 1024, "attn_impl": "auto", "pos_emb": "none", "max_positions": 4096, '
        '"rope_base": 10000.0, "learned_init_state": false, "dtype": "bfloat16", '
        '"wkv_impl": "auto", "wkv_chunk_size": 16, "remat": true, "remat_policy": '
        '"dots_saveable", "layer_norm_eps": 1e-05, "emb_init_scale": 0.0001, '
        '"state_compression": "none", "state_rank": 0, "head_size": 64, "dim_w_lora": 32, '
        '"dim_a_lora": 32, "dim_v_lora": 32, "dim_g_lora": 32}')
    mc = model_config_of({"model_config": record})
    assert mc.to_dict() == {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}


def test_memory_plan_counts_what_each_remat_policy_keeps():
    """train.memory.activation_bytes: dots_and_wkv_saveable is planned with what it keeps (JAX's
    dots_* policies as nothing_saveable), and the logits in the head's dtype (kept) plus
    their float32 gradient."""
    from rwkv_jax.train.memory import activation_bytes

    def plan(**kw):
        c = default_config()
        c.model.version, c.model.n_layer, c.model.n_embd = "7", 4, 256
        c.efficiency.precision = "bfloat16"
        for k, v in kw.items():
            setattr(c.efficiency, k, v)
        return activation_bytes(model_config_from(c, vocab_size=1000), 2, 128)

    policies = ["nothing_saveable", "dots_saveable", "dots_and_wkv_saveable"]
    kept = [plan(remat=True, remat_policy=p) for p in policies]
    assert kept[0] == kept[1] < kept[2], dict(zip(policies, kept))
    assert kept[-1] < plan(remat=False) == plan(remat=True, remat_policy="everything_saveable")
    logits = 2 * 128 * 1000 * (2 + 4)
    assert plan(remat=True) - logits == pytest.approx(4 * 2 * 128 * 256 * 4 + 2 * (
        plan(remat=False) - logits) / 4)
