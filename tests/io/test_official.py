"""Parity with the official RWKV inference code (`rwkv` on PyPI) and official .pth round trips."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_official_state_dict, rel_err

from rwkv_jax.config import ModelConfig
from rwkv_jax.io import export_official, import_official
from rwkv_jax.nn.model import RWKV, init_params

torch = pytest.importorskip("torch", reason="official-checkpoint tests need torch (pip install torch==2.13.0)")
os.environ.setdefault("RWKV_JIT_ON", "0")  # the package scripts its modules otherwise: slow to start
os.environ.setdefault("RWKV_CUDA_ON", "0")
rwkv_model = pytest.importorskip("rwkv.model", reason="parity tests need the official `rwkv` package")


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("official") / "rwkv4.pth")
    torch.save(random_official_state_dict(), path)
    return path, rwkv_model.RWKV(model=path, strategy="cpu fp32")


@pytest.fixture(scope="module")
def ours(official):
    config, params = import_official(official[0])
    apply = jax.jit(RWKV(config).apply)
    return config, params, apply


def _tokens(n, vocab=97, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab, n)]


def _official_logits(model, pieces):
    out, state = [], None
    for piece in pieces:
        logits, state = model.forward(piece, state, full_output=True)
        out.append(logits.reshape(len(piece), -1).numpy())
    return np.concatenate(out), state


def test_whole_sequence_matches_official(official, ours):
    _, params, apply = ours
    toks = _tokens(48)
    want, _ = _official_logits(official[1], [toks])
    got, _ = apply({"params": params}, jnp.asarray([toks]))
    assert rel_err(got[0], want) <= 1e-5


def test_pieces_and_token_by_token_match_official(official, ours):
    _, params, apply = ours
    toks = _tokens(40, seed=1)
    pieces = [toks[:13], toks[13:14], toks[14:31], toks[31:]]
    want, want_state = _official_logits(official[1], pieces)
    got, state = [], None
    for piece in pieces:
        logits, state = apply({"params": params}, jnp.asarray([piece]), state)
        got.append(logits[0])
    assert rel_err(np.concatenate(got), want) <= 1e-5

    got, state = [], None
    for t in toks:
        logits, state = apply({"params": params}, jnp.asarray([[t]]), state)
        got.append(logits[0])
    want_tok, want_state = _official_logits(official[1], [[t] for t in toks])
    assert rel_err(np.concatenate(got), want_tok) <= 1e-5
    # The official state per layer is [att shift, aa, bb, pp, ffn shift]: ours must mean the same.
    for i, layer in enumerate(state["layers"]):
        off = [s.numpy() for s in want_state[5 * i : 5 * i + 5]]
        np.testing.assert_allclose(layer["shift_att"][0], off[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(layer["shift_ffn"][0], off[4], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.log(layer["bb"][0]) + layer["pp"][0], np.log(off[2]) + off[3], atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_import_then_export_is_bit_exact(tmp_path, dtype):
    src = random_official_state_dict(seed=3, dtype=getattr(torch, dtype))
    torch.save(src, tmp_path / "in.pth")
    config, params = import_official(tmp_path / "in.pth")
    assert (config.n_layer, config.n_embd, config.vocab_size, config.dim_ffn) == (3, 64, 97, 256)
    export_official(params, config, tmp_path / "out.pth", dtype=dtype)
    out = torch.load(tmp_path / "out.pth", weights_only=True)
    assert list(out) == list(src)
    for k in src:
        assert out[k].dtype == src[k].dtype and out[k].shape == src[k].shape, k
        assert torch.equal(out[k], src[k]), k


def test_export_of_our_init_loads_in_official_package(tmp_path):
    config = ModelConfig(vocab_size=50, n_layer=2, n_embd=32)
    params = init_params(config, jax.random.PRNGKey(0))
    export_official(params, config, tmp_path / "ours.pth")
    official = rwkv_model.RWKV(model=str(tmp_path / "ours.pth"), strategy="cpu fp32")
    toks = _tokens(20, vocab=50)
    want, _ = _official_logits(official, [toks])
    got, _ = jax.jit(RWKV(config).apply)({"params": params}, jnp.asarray([toks]))
    assert rel_err(got[0], want) <= 1e-5


def test_bad_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no official checkpoint"):
        import_official(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a torch checkpoint"):
        import_official(tmp_path / "junk.pth")
    torch.save(random_official_state_dict(), tmp_path / "whole.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        import_official(tmp_path / "cut.pth")
    sd = random_official_state_dict()
    sd["blocks.0.att.ln_x.weight"] = torch.ones(64)
    torch.save(sd, tmp_path / "v5.pth")
    with pytest.raises(ValueError, match="not RWKV-4"):
        import_official(tmp_path / "v5.pth")
    sd = random_official_state_dict()
    del sd["blocks.1.att.key.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="blocks.1.att.key.weight"):
        import_official(tmp_path / "partial.pth")
    torch.save({"a": 1}, tmp_path / "notdict.pth")
    with pytest.raises(ValueError, match="not an RWKV state dict"):
        import_official(tmp_path / "notdict.pth")


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    config = ModelConfig(vocab_size=50, n_layer=2, n_embd=32, attn_head_size=16,
                         layer_types=("rwkv", "attn"))
    params = init_params(config, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="no attention layers"):
        export_official(params, config, tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()


def test_a_failed_export_leaves_the_old_file_and_nothing_else(tmp_path, monkeypatch):
    config = ModelConfig(vocab_size=50, n_layer=1, n_embd=32)
    params = init_params(config, jax.random.PRNGKey(0))
    out = tmp_path / "model.pth"
    out.write_bytes(b"the export before")

    def disk_full(obj, path):  # as torch.save fails when the file system fills up
        with open(path, "wb") as f:
            f.write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 101248")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=f"writing '{out}' failed: .*unexpected pos"):
        export_official(params, config, out)
    assert out.read_bytes() == b"the export before"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]
