"""RWKV-7 ("x070"): parity with the official `rwkv` package, official .pth round trips,
recurrent == parallel (pure and hybrid), the WKV forms inside the model, options, state codecs,
config errors, and a version-7 training run that resumes, generates and exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, random_official_state_dict, random_x070_state_dict, rel_err

from rwkv_jax import io as ckpt
from rwkv_jax import train as trainer
from rwkv_jax.config import (
    ConfigError,
    ModelConfig,
    model_config_from,
    official_lora_dim,
)
from rwkv_jax.nn import state_codec
from rwkv_jax.nn.model import RWKV, init_params, initial_state
from rwkv_jax.nn.state import zero_state

torch = pytest.importorskip("torch", reason="official-checkpoint tests need torch")
V = 61

# The official model exists only when RWKV_V7_ON=1 is set before `rwkv.model` is first
# imported, and other tests import it for RWKV-4 without: it runs in a fresh interpreter.
OFFICIAL = textwrap.dedent(r'''
    import json, os, sys
    os.environ["RWKV_V7_ON"] = "1"
    os.environ["RWKV_CUDA_ON"] = "0"
    import numpy as np
    from rwkv.model import RWKV_x070
    path, runs, out = sys.argv[1], json.loads(sys.argv[2]), {}
    model = RWKV_x070(model=path[: -len(".pth")], strategy="cpu fp32")  # it appends .pth
    for name, pieces in runs.items():
        state, logits = None, []
        for piece in pieces:
            l, state = model.forward(piece, state, full_output=True)
            logits.append(l.reshape(len(piece), -1).numpy())
        out[name + "/logits"] = np.concatenate(logits)
        for i, s in enumerate(state):  # per layer: att x_prev, att kv (H, N, N), ffn x_prev
            out[f"{name}/state/{i}"] = s.numpy()
    np.savez(sys.argv[3], **out)
''')


def run_official(path, runs: dict, tmp) -> dict:
    """{name/logits, name/state/i} of the official RWKV_x070 ('cpu fp32') fed each run's pieces
    (a piece of one token goes through its forward_one, longer ones through forward_seq)."""
    pytest.importorskip("rwkv.model", reason="parity tests need the official `rwkv` package")
    out = os.path.join(str(tmp), "official.npz")
    res = subprocess.run([sys.executable, "-c", OFFICIAL, str(path), json.dumps(runs), out],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(out) as f:
        return dict(f)


def _moved(params, seed=1, scale=0.3):
    """conftest.perturbed in numpy (one host op per leaf instead of one compile per shape)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(x + scale * rng.normal(size=x.shape), np.float32), params)


def _tokens(n, vocab=97, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab, n)]


TOKS = _tokens(40, seed=1)
PIECES = [TOKS[:13], TOKS[13:14], TOKS[14:31], TOKS[31:]]


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("x070")
    path = tmp / "rwkv7.pth"
    torch.save(random_x070_state_dict(), path)
    official = run_official(path, {"whole": [_tokens(48)], "pieces": PIECES,
                                   "tokens": [[t] for t in TOKS]}, tmp)
    config, params = ckpt.import_official(path)
    return config, params, jax.jit(RWKV(config).apply), official


def _assert_state_matches(state, official, name):
    for i, layer in enumerate(state["layers"]):
        for j, key in enumerate(("shift_att", "wkv", "shift_ffn")):
            err = rel_err(layer[key][0], official[f"{name}/state/{3 * i + j}"])
            assert err <= 1e-5, (i, key, err)


def test_logits_and_states_match_official_whole_in_pieces_and_token_by_token(parity):
    config, params, apply, official = parity
    assert (config.version, config.n_head, config.head_size) == ("7", 4, 16)
    got, _ = apply({"params": params}, jnp.asarray([_tokens(48)]))
    assert rel_err(got[0], official["whole/logits"]) <= 1e-5
    chunked = ModelConfig(**{**config.to_dict(), "wkv_impl": "chunked", "wkv_chunk_size": 16})
    got, _ = jax.jit(RWKV(chunked).apply)({"params": params}, jnp.asarray([_tokens(48)]))
    assert rel_err(got[0], official["whole/logits"]) <= 1e-5

    out, state = [], None
    for piece in PIECES:
        logits, state = apply({"params": params}, jnp.asarray([piece]), state)
        out.append(logits[0])
    assert rel_err(np.concatenate(out), official["pieces/logits"]) <= 1e-5
    _assert_state_matches(state, official, "pieces")

    out, state = [], None
    for t in TOKS:
        logits, state = apply({"params": params}, jnp.asarray([[t]]), state)
        out.append(logits[0])
    assert rel_err(np.concatenate(out), official["tokens/logits"]) <= 1e-5
    _assert_state_matches(state, official, "tokens")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_x070_import_then_export_is_bit_exact(tmp_path, dtype):
    src = random_x070_state_dict(seed=3, dtype=getattr(torch, dtype))
    torch.save(src, tmp_path / "in.pth")
    config, params = ckpt.import_official(tmp_path / "in.pth")
    assert (config.version, config.n_layer, config.n_embd, config.vocab_size, config.dim_ffn,
            config.head_size) == ("7", 3, 64, 97, 256, 16)
    assert (config.dim_w_lora, config.dim_a_lora, config.dim_v_lora, config.dim_g_lora) == (16, 16, 8, 24)
    ckpt.export_official(params, config, tmp_path / "out.pth", dtype=dtype)
    out = torch.load(tmp_path / "out.pth", weights_only=True)
    assert list(out) == list(src)
    for k in src:
        assert out[k].dtype == src[k].dtype and out[k].shape == src[k].shape, k
        assert torch.equal(out[k], src[k]), k


def test_x070_files_without_first_layer_value_residual(tmp_path):
    src = random_x070_state_dict(seed=4, first_v=False)
    torch.save(src, tmp_path / "in.pth")
    config, params = ckpt.import_official(tmp_path / "in.pth")
    for name in ("v0", "v1", "v2"):  # unused by the first layer: read as zeros
        assert not np.any(params["blocks_0"]["att"][name]), name
    ckpt.export_official(params, config, tmp_path / "out.pth")
    out = torch.load(tmp_path / "out.pth", weights_only=True)
    assert set(out) - set(src) == {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
    assert all(torch.equal(out[k], src[k]) for k in src)



def test_our_tree_is_what_the_official_format_holds(tmp_path, pure_init):
    mine = _moved(pure_init)
    ckpt.export_official(mine, PURE, tmp_path / "ours.pth")
    config, back = ckpt.import_official(tmp_path / "ours.pth")
    fields = ("version", "vocab_size", "n_layer", "n_embd", "dim_ffn", "head_size", "dim_w_lora",
              "dim_a_lora", "dim_v_lora", "dim_g_lora")
    assert [getattr(config, f) for f in fields] == [getattr(PURE, f) for f in fields]
    chex.assert_trees_all_equal(back, mine)


def test_x070_bad_files_get_clear_errors(tmp_path):
    sd = random_x070_state_dict()
    del sd["blocks.1.att.a2"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="not an RWKV-7 state dict: missing 'blocks.1.att.a2'"):
        ckpt.import_official(tmp_path / "partial.pth")
    sd = random_x070_state_dict()
    sd["blocks.0.ffn.s_emb.weight"] = torch.ones(97, 1024)  # a DeepEmbed model
    torch.save(sd, tmp_path / "de.pth")
    with pytest.raises(ValueError, match="tensors this RWKV-7 model does not know"):
        ckpt.import_official(tmp_path / "de.pth")
    sd = random_x070_state_dict()
    sd["blocks.2.att.w1"] = torch.ones(64, 48)
    torch.save(sd, tmp_path / "ranks.pth")
    with pytest.raises(ValueError, match=r"att.w1 has ranks \[16, 48\] across layers"):
        ckpt.import_official(tmp_path / "ranks.pth")
    sd = random_official_state_dict()  # RWKV-5 markers on an RWKV-4 file: still refused
    sd["blocks.0.att.ln_x.weight"] = torch.ones(64)
    torch.save(sd, tmp_path / "v5.pth")
    with pytest.raises(ValueError, match="RWKV-5 or later checkpoint, not RWKV-4"):
        ckpt.import_official(tmp_path / "v5.pth")


# ----------------------------------------------------------------------------- the model


def _config(**kw):
    base = dict(version="7", vocab_size=V, n_layer=2, n_embd=32, head_size=8, attn_head_size=8,
                attn_window=64, dim_w_lora=8, dim_a_lora=8, dim_v_lora=8, dim_g_lora=16,
                wkv_impl="scan")
    base.update(kw)
    return ModelConfig(**base)


PURE = _config()
# Attention first: the first RWKV layer (which sets v_first) is layer 1, and the attention
# layer between the RWKV layers passes v_first by. With a learned initial state.
HYBRID = _config(n_layer=4, layer_types=("attn", "rwkv", "attn", "rwkv"), pos_emb="rotary",
                 learned_init_state=True)
T, B = 24, 2
TOKENS = jax.random.randint(jax.random.PRNGKey(7), (B, T), 0, V)
_apply = jax.jit(lambda cfg, p, x, s: RWKV(cfg).apply({"params": p}, x, s), static_argnums=0)
_roundtrip = jax.jit(state_codec.roundtrip, static_argnums=1)


@pytest.fixture(scope="module")
def hybrid():
    """Trained-looking (moved) hybrid params and the model's output on TOKENS."""
    params = _moved(init_params(HYBRID, jax.random.PRNGKey(0)))
    logits, state = _apply(HYBRID, params, TOKENS, zero_state(HYBRID, B))
    return params, logits, state


@pytest.fixture(scope="module")
def pure_init():
    return init_params(PURE, jax.random.PRNGKey(0))


def test_recurrent_equals_parallel_and_wkv_forms_agree(hybrid):
    params, full, full_state = hybrid
    chunked = _config(**{**HYBRID.to_dict(), "wkv_impl": "chunked", "wkv_chunk_size": 4})
    for cfg in (HYBRID, chunked):  # in pieces of 8 (the chunked form: two chunks each)
        pieces, state = [], zero_state(cfg, B)
        for a in range(0, T, 8):
            logits, state = _apply(cfg, params, TOKENS[:, a : a + 8], state)
            pieces.append(logits)
        chex.assert_trees_all_close(jnp.concatenate(pieces, 1), full, rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(state, full_state, rtol=1e-4, atol=1e-4)
    c_full, c_state = _apply(chunked, params, TOKENS, zero_state(chunked, B))  # six chunks
    chex.assert_trees_all_close(c_full, full, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(c_state, full_state, rtol=1e-4, atol=1e-4)

    steps, state = [], zero_state(HYBRID, B)
    for t in range(T):
        logits, state = _apply(HYBRID, params, TOKENS[:, t : t + 1], state)
        steps.append(logits)
    chex.assert_trees_all_close(jnp.concatenate(steps, 1), full, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(state, full_state, rtol=1e-4, atol=1e-4)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, zero_state(HYBRID, B))
    assert state["layers"][1]["wkv"].shape == (B, 4, 8, 8) and "k" in state["layers"][2]


def test_v_first_comes_from_the_first_rwkv_layer_and_remat_and_dtypes(hybrid):
    """Gradients show which layer set v_first; remat and bf16 give the same model. (Gradients
    under remat: the version-7 training run below trains with remat on.)"""
    params, full, _ = hybrid
    tokens = TOKENS[:, :8]
    loss = lambda p: jnp.mean(RWKV(HYBRID).apply({"params": p}, tokens)[0] ** 2)  # noqa: E731
    g = jax.jit(jax.grad(loss))(params)
    # Layer 1 (the first RWKV layer) makes v_first and mixes in no value residual; layer 3 does.
    for name in ("v0", "v1", "v2"):
        assert not np.any(g["blocks_1"]["att"][name]), name
        assert np.any(g["blocks_3"]["att"][name]), name
    # The gradient reaches the learned initial state through the WKV state.
    assert np.any(g["blocks_3"]["init_state"]["wkv"])

    remat = _config(**{**HYBRID.to_dict(), "remat": True, "remat_policy": "dots_saveable"})
    out, state = _apply(remat, params, TOKENS, zero_state(remat, B))
    chex.assert_trees_all_close(out, full, rtol=1e-6, atol=1e-6)

    bf16 = _config(**{**HYBRID.to_dict(), "dtype": "bfloat16"})
    low, state = _apply(bf16, params, TOKENS, zero_state(bf16, B))
    assert low.dtype == jnp.float32 and state["layers"][1]["wkv"].dtype == jnp.float32
    assert float(jnp.abs(low - full).max()) < 0.1 * float(jnp.abs(full).max())


def test_learned_initial_state(hybrid):
    trained, _, _ = hybrid
    assert jax.tree.map(jnp.shape, trained["blocks_1"]["init_state"]) == {
        "shift_att": (32,), "wkv": (4, 8, 8), "shift_ffn": (32,)}
    assert "init_state" not in trained["blocks_0"]  # attention layers start from an empty window
    zero_init = {k: {**v, "init_state": jax.tree.map(jnp.zeros_like, v["init_state"])}
                 if "init_state" in v else v for k, v in trained.items()}
    a, _ = _apply(HYBRID, zero_init, TOKENS, None)  # None: the learned state, here all zero
    b, _ = _apply(HYBRID, zero_init, TOKENS, zero_state(HYBRID, B))  # the zero state
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-5)
    a, _ = _apply(HYBRID, trained, TOKENS, None)
    c, _ = _apply(HYBRID, trained, TOKENS, initial_state(HYBRID, trained, B))
    chex.assert_trees_all_close(a, c, rtol=1e-5, atol=1e-5)
    assert not np.allclose(a, b)  # a trained initial state matters


def test_official_initialisation(pure_init):
    """RWKV-LM's RWKV-v7/train_temp: the constructors' values, then generate_init_weight."""
    cfg = ModelConfig(version="7", n_embd=128)
    assert (cfg.dim_w_lora, cfg.dim_a_lora, cfg.dim_v_lora, cfg.dim_g_lora) == (32, 32, 32, 64)
    assert official_lora_dim("dim_g_lora", 2560) == 256 and official_lora_dim("dim_v_lora", 768) == 32
    p = jax.tree.map(np.asarray, pure_init)
    att0, att1 = p["blocks_0"]["att"], p["blocks_1"]["att"]
    np.testing.assert_allclose(att0["ln_x"]["scale"], 0.5**0.7, rtol=1e-6)  # ((1 + i) / L)^0.7
    np.testing.assert_allclose(att1["ln_x"]["scale"], 1.0, rtol=1e-6)
    # w0 = -6 + 6 (n / (C-1))^(1 + r0^0.3) + 0.5 + 2.5 zigzag, the zigzag -1 at a head's first
    # channel and +1 at its last; layer 0 has r0 = 0, so the ramp is linear.
    np.testing.assert_allclose(att0["w0"][[0, 7, 31]], [-8, -6 + 6 * 7 / 31 + 3, 3], atol=1e-5)
    np.testing.assert_allclose(att0["r_k"], -0.04)
    np.testing.assert_allclose(att0["k_a"], 1.02)
    np.testing.assert_allclose(att0["x_r"][0], 1.0)  # 1 - 0^(...): channel 0 takes the last token
    for name in ("w1", "a1", "v1", "g1"):
        assert not np.any(att0[name]), name
    np.testing.assert_allclose(att0["w2"] @ att0["w2"].T, 0.01 * np.eye(8), atol=1e-6)  # ortho x0.1
    k = att0["key"]["kernel"]
    np.testing.assert_allclose(k.T @ k, 0.01 * np.eye(32), atol=1e-6)
    v = att0["value"]["kernel"]
    np.testing.assert_allclose(v.T @ v, np.eye(32), atol=1e-5)
    assert not np.any(att0["output"]["kernel"]) and not np.any(p["blocks_0"]["ffn"]["value"]["kernel"])
    fk = p["blocks_0"]["ffn"]["key"]["kernel"]  # (C, 4C), gain 1
    np.testing.assert_allclose(fk @ fk.T, np.eye(32), atol=1e-5)
    np.testing.assert_allclose(p["blocks_1"]["ffn"]["x_k"][16], 1 - 0.5 ** (0.5**4), rtol=1e-6)
    assert np.abs(p["emb"]["embedding"]).max() <= 1e-4


def test_state_codecs_on_rwkv7_states(hybrid):
    params, _, state = hybrid
    nxt = TOKENS[:, :8]
    want, _ = _apply(HYBRID, params, nxt, state)
    size = {m: state_codec.bytes_of(state_codec.compress(state, m)) for m in ("none", "bf16", "int8")}
    for mode, tol, logits_tol in (("bf16", 5e-3, 1e-2), ("int8", 2e-2, 3e-2)):
        back = _roundtrip(state, mode)
        chex.assert_trees_all_equal_shapes_and_dtypes(back, state)
        for key in ("shift_att", "wkv", "shift_ffn"):
            assert rel_err(back["layers"][3][key], state["layers"][3][key]) < tol, (mode, key)
        assert rel_err(_apply(HYBRID, params, nxt, back)[0], want) < logits_tol
        zero = zero_state(HYBRID, 2)
        chex.assert_trees_all_equal(_roundtrip(zero, mode), zero)
    assert size["bf16"] < 0.55 * size["none"] and size["int8"] < 0.35 * size["none"], size

    cfg = _config(**{**HYBRID.to_dict(), "state_compression": "learned", "state_rank": 5})
    p = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    assert set(p["state_codec"]) == {"layer_1", "layer_3"}
    assert p["state_codec"]["layer_1"]["enc"]["kernel"].shape == (2 * 32 + 4 * 8 * 8, 5)
    codec = {"state_codec": {f"layer_{i}": {
        "enc": {"kernel": jax.random.normal(jax.random.PRNGKey(i), (320, 5)), "bias": jnp.zeros(5)},
        "dec": {"kernel": jax.random.normal(jax.random.PRNGKey(9 + i), (5, 320)),
                "bias": jnp.arange(320.0)}} for i in (1, 3)}}
    packed = state_codec.compress(state, "learned", codec)
    assert packed["layers"][1]["code"].shape == (2, 5) and packed["layers"][0] is state["layers"][0]
    back = _roundtrip(state, "learned", codec)
    chex.assert_trees_all_equal_shapes_and_dtypes(back, state)
    layer = back["layers"][1]  # the decoder's output in order: shift_att, shift_ffn, wkv
    code = packed["layers"][1]["code"]
    flat = code @ codec["state_codec"]["layer_1"]["dec"]["kernel"] + jnp.arange(320.0)
    chex.assert_trees_all_close(layer["shift_att"], flat[:, :32], rtol=1e-6)
    chex.assert_trees_all_close(layer["shift_ffn"], flat[:, 32:64], rtol=1e-6)
    chex.assert_trees_all_close(layer["wkv"], flat[:, 64:].reshape(2, 4, 8, 8), rtol=1e-6)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("kw, message", [
    ({"version": "5"}, "model.version='5' is invalid: one of ('4', '7')"),
    ({"head_size": 48}, "model.head_size=48 is invalid: must divide model.n_embd=128"),
    ({"wkv_impl": "assoc"}, "efficiency.wkv_impl='assoc' is invalid: one of ('auto', 'scan', 'chunked', "
                            "'pallas') for model.version='7'"),
    ({"dim_att": 64}, "model.dim_att=64 is invalid: must equal model.n_embd=128 (RWKV-7"),
    ({"dim_g_lora": -1}, "model.dim_g_lora=-1 is invalid: must be an integer >= 1"),
])
def test_config_errors_name_the_field(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**{"version": "7", "n_embd": 128, **kw})


def test_training_config_version_7_and_its_errors(tmp_path):
    from absl import flags
    from ml_collections import config_flags

    # The command line's --config.model.version=7 (a string field) selects RWKV-7.
    fv = flags.FlagValues()
    tiny = os.path.join(REPO, "configs", "tiny.py")
    argv = ["train.py", f"--config={tiny}", "--config.model.version=7"]
    config_flags.DEFINE_config_file("config", tiny, flag_values=fv, sys_argv=argv)  # as train.py
    fv(argv)
    cfg = fv.config
    mc = model_config_from(cfg, vocab_size=256)
    assert (mc.version, mc.n_head, mc.dim_w_lora, mc.dim_g_lora) == ("7", 2, 32, 64)
    assert ModelConfig(version=7).version == "7"  # an int from code or a JSON record
    cfg.efficiency.wkv_impl = "assoc"  # RWKV-4's associative scan has no RWKV-7 form
    with pytest.raises(ConfigError, match=r"efficiency.wkv_impl='assoc' is invalid: one of \('auto', "
                                          r"'scan', 'chunked', 'pallas'\) for model.version='7'"):
        model_config_from(cfg, vocab_size=256)
    cfg.efficiency.wkv_impl = "auto"
    cfg.model.head_size = 48
    with pytest.raises(ConfigError, match="model.head_size=48 is invalid: must divide model.n_embd=128"):
        model_config_from(cfg, vocab_size=256)
    cfg.model.version = "6"
    with pytest.raises(ConfigError, match="model.version='6' is invalid: one of"):
        model_config_from(cfg, vocab_size=256)
    # Weights of the other version share names with this one's: refused, not half-loaded.
    torch.save(random_official_state_dict(vocab=V, n_embd=32, dim_ffn=128), tmp_path / "v4.pth")
    fresh = jax.eval_shape(lambda: init_params(PURE, jax.random.PRNGKey(0)))
    with pytest.raises(ConfigError, match="holds an RWKV-4 model, but model.version='7'"):
        trainer.load_initial_weights(str(tmp_path / "v4.pth"), fresh, PURE)


# ----------------------------------------------------------------------------- a training run


def test_version_7_trains_with_remat_resumes_generates_and_exports(tmp_path, caplog, capsys):
    import logging

    from conftest import TEXT, tiny_config

    from rwkv_jax.cli import infer
    from rwkv_jax.data import ByteTokenizer

    (tmp_path / "train.txt").write_text(TEXT)
    corpus = (str(tmp_path / "train.txt"), str(tmp_path / "train.txt"))
    # Two chunks per sequence: the first run stops after step 1, whose successor continues the
    # sequence, so the resumed run needs the carried RWKV-7 state from the checkpoint. The
    # state passed between chunks goes through the learned codec, which trains.
    base = {"model.version": "7", "model.head_size": 8, "logging.eval_every": 0,
            "efficiency.remat": True, "memory.state_compression": "learned",
            "memory.state_rank": 4, "optimizer.total_steps": 4, "optimizer.warmup_steps": 0}
    caplog.set_level(logging.INFO, logger="rwkv_jax")
    trainer.train(trainer.prepare(tiny_config(tmp_path, corpus, **base, **{"train.steps": 1})))
    run = trainer.prepare(tiny_config(tmp_path, corpus, **base, **{"train.steps": 2}))
    last = trainer.train(run)
    assert "at step 1" in caplog.text and "model: RWKV-7" in caplog.text
    assert np.isfinite(last["loss"])
    config, params, meta = ckpt.restore_params(run.run_dir)
    assert meta["step"] == 2 and config.version == "7" and config.remat
    assert np.abs(np.asarray(params["state_codec"]["layer_0"]["dec"]["kernel"])).max() > 0

    # infer.py generates from the checkpoint (greedy: each byte the argmax after the text before
    # it) and exports it for the official package, which computes the same logits.
    pth = tmp_path / "tiny7.pth"
    capsys.readouterr()
    assert infer.main(["--run_dir", run.run_dir, "--prompt", "First", "--max_new_tokens", "6",
                       "--temperature", "0", "--export_official", str(pth)]) == 0
    tokens = ByteTokenizer().encode("First" + capsys.readouterr().out[:-1])
    assert len(tokens) == 5 + 6
    logits, _ = jax.jit(RWKV(config).apply)({"params": params}, jnp.asarray([tokens]))
    assert np.argmax(logits[0, 4:-1], -1).tolist() == tokens[5:]
    official = run_official(pth, {"whole": [tokens]}, tmp_path)
    assert rel_err(logits[0], official["whole/logits"]) <= 1e-5
