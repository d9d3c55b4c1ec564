"""Hugging Face folders (rwkv_jax.io.hf): transformers' RwkvForCausalLM and rwkv7-hf's
RWKV7ForCausalLM on our exports give the `rwkv` package's logits for the same official .pth,
import after export is bit-exact, tokenizer.json encodes to our ids, what the layouts cannot
hold is refused in one line, and infer.py --hf / --export_hf, train.init_from=DIR."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import TEXT, random_official_state_dict, random_x070_state_dict, rel_err, repo_pythonpath

from rwkv_jax.config import ModelConfig
from rwkv_jax.data.tokenizers import get_tokenizer
from rwkv_jax.io.hf import check_hf_export, export_hf, import_hf
from rwkv_jax.data.hf_tokenizer import write_tokenizer
from rwkv_jax.io.official import import_official

torch = pytest.importorskip("torch", reason="parity with the rwkv package needs torch")
transformers = pytest.importorskip("transformers", reason="pip install 'rwkv_jax[hf]'")
rwkv7_hf = pytest.importorskip("rwkv7_hf", reason="the RWKV-7 parity test needs rwkv7-hf")
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")
os.environ["HF_HUB_OFFLINE"] = "1"
rwkv_model = pytest.importorskip("rwkv.model", reason="parity needs the official `rwkv` package")

TOKENS = [int(t) for t in np.random.default_rng(0).integers(0, 97, 40)]

# The rwkv package's RWKV-7 exists only with RWKV_V7_ON=1 set before its first import: a fresh
# interpreter.
X070 = textwrap.dedent(r'''
    import json, os, sys
    os.environ.update(RWKV_V7_ON="1", RWKV_CUDA_ON="0", RWKV_JIT_ON="0")
    import numpy as np
    from rwkv.model import RWKV_x070
    model = RWKV_x070(model=sys.argv[1][: -len(".pth")], strategy="cpu fp32")
    logits, _ = model.forward(json.loads(sys.argv[2]), None, full_output=True)
    np.save(sys.argv[3], logits.numpy())
''')


def _exported(tmp, sd):
    torch.save(sd, tmp / "model.pth")
    config, params = import_official(tmp / "model.pth")
    export_hf(params, config, tmp / "hf")
    return tmp, config, params


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    return _exported(tmp_path_factory.mktemp("hf4"), random_official_state_dict())


@pytest.fixture(scope="module")
def v7(tmp_path_factory):
    # Head size 64: fla's g_norm epsilon is head_dim * norm_eps, the official 64e-5 only there.
    # Without block 0's unused v0/v1/v2, which the layout drops (and import reads as zeros).
    sd = random_x070_state_dict(n_embd=128, head_size=64, n_layer=2, lora=(16, 16, 8, 24),
                                first_v=False)
    return _exported(tmp_path_factory.mktemp("hf7"), sd)


def _same_tree(a, b) -> bool:
    return (jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def test_transformers_runs_our_rwkv4_export_as_the_rwkv_package(v4):
    tmp, config, params = v4
    model, info = transformers.RwkvForCausalLM.from_pretrained(tmp / "hf", output_loading_info=True)
    assert not any(info.values()), info  # every tensor named as transformers names it
    with torch.no_grad():
        got = model.eval()(torch.tensor([TOKENS])).logits[0].numpy()
    want, _ = rwkv_model.RWKV(model=str(tmp / "model.pth"), strategy="cpu fp32").forward(
        TOKENS, None, full_output=True)
    assert rel_err(got, want.numpy()) <= 1e-5
    # A folder transformers itself saved (its config.json, its names) reads as the same model.
    model.train().save_pretrained(tmp / "saved")  # train(): the weights as stored, not rescaled
    got_config, got_params = import_hf(tmp / "saved")
    assert got_config == config and _same_tree(got_params, params)


def test_rwkv7_hf_runs_our_rwkv7_export_as_the_rwkv_package(v7):
    tmp, _, _ = v7
    subprocess.run([sys.executable, "-c", X070, str(tmp / "model.pth"), json.dumps(TOKENS),
                    str(tmp / "want.npy")], check=True, env={**os.environ, "PYTHONPATH": repo_pythonpath()})
    model, info = rwkv7_hf.RWKV7ForCausalLM.from_pretrained(tmp / "hf", output_loading_info=True,
                                                             dtype=torch.float32)
    assert not any(info.values()), info
    with torch.no_grad():
        got = model.eval()(torch.tensor([TOKENS])).logits[0].numpy()
    assert rel_err(got, np.load(tmp / "want.npy")) <= 1e-5


def test_a_folder_rwkv7_hf_converted_from_the_pth_imports_as_the_pth(v7, tmp_path):
    from rwkv7_hf import converter

    tmp, config, params = v7
    converter.main(["--input", str(tmp / "model.pth"), "--output", str(tmp_path), "--precision", "fp32"])
    got_config, got = import_hf(tmp_path)
    assert got_config == config and _same_tree(got, params)


@pytest.mark.parametrize("version", ["4", "7"])
def test_import_of_our_export_is_bit_exact_without_torch(v4, v7, version, tmp_path, monkeypatch):
    tmp, config, params = v4 if version == "4" else v7
    # bfloat16 weights (rounded first) come back as the same float32 values.
    rounded = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32), params)
    export_hf(rounded, config, tmp_path / "bf16", dtype="bfloat16")
    header = (tmp_path / "bf16" / "model.safetensors").read_bytes()[8:2000].decode(errors="ignore")
    assert '"dtype":"BF16"' in header and '"F32"' not in header
    monkeypatch.setitem(sys.modules, "torch", None)  # safetensors needs no torch to read
    for folder, want in ((tmp / "hf", params), (tmp_path / "bf16", rounded)):
        got_config, got = import_hf(folder)
        assert got_config == config
        assert _same_tree(got, want), folder


def test_a_pytorch_model_bin_folder_reads_the_same(v4, tmp_path):
    from safetensors.torch import load_file

    tmp, config, params = v4
    torch.save(load_file(str(tmp / "hf" / "model.safetensors")), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((tmp / "hf" / "config.json").read_text())
    got_config, got = import_hf(tmp_path)
    assert got_config == config and _same_tree(got, params)


SAMPLE = ("Hello, World! The quick brown fox -- 3.14159 \"quoted\" (x+y)*z;\n\n"
          "def f(a):\n\treturn a  # comment\n" + " " * 300 + "|" + "\t" * 5 + "end\r\n"
          "中文分词测试，日本語のテキスト、한국어 텍스트. Ünïcödé café naïve — “smart” 🙂🚀👍🏽\n"
          "\n\n\n" + "=" * 100 + "\x00\x7f" + "ab" * 50)


@pytest.mark.parametrize("name", ["world", "byte"])
def test_autotokenizer_encodes_to_our_ids(v4, name, tmp_path):
    write_tokenizer(str(tmp_path), name)
    (tmp_path / "config.json").write_text((v4[0] / "hf" / "config.json").read_text())
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = get_tokenizer(name)
    rng = np.random.default_rng(1)
    alphabet = list(" \n\t.,;:'!?-abcdeABCDE0123") + ["é", "中", "の", "🙂", "  ", "\n\n", "the", " the"]
    noise = "".join(rng.choice(alphabet, 3000))
    for text in (SAMPLE, noise, TEXT[:2000]):
        ids = ours.encode(text)
        assert hf.encode(text) == ids
        assert hf.decode(ids) == text


def test_what_the_layouts_cannot_hold_is_refused_in_one_line(v7, tmp_path):
    def refused(fn, *args, match):
        with pytest.raises(ValueError, match=match) as e:
            fn(*args)
        assert "\n" not in str(e.value)

    hybrid = ModelConfig(vocab_size=97, n_layer=2, n_embd=64, layer_types=("rwkv", "attn"))
    refused(check_hf_export, hybrid, match=r"RwkvForCausalLM cannot hold .*attention layers \(layers \[1\]\)")
    _, config, _ = v7
    refused(check_hf_export, dataclasses.replace(config, learned_init_state=True),
            match="RWKV-7 cannot hold this model's a learned initial state")
    refused(check_hf_export, dataclasses.replace(config, pos_emb="learned"), match="position embeddings")
    fla_cfg = json.loads((v7[0] / "hf" / "config.json").read_text())
    for change, match in (({"attn": {"layers": [1], "num_heads": 2}}, "attention layers .a hybrid"),
                          ({"model_type": "llama"}, "holds a 'llama' model"),
                          ({"head_dim": 32, "num_heads": 4}, "g_norm epsilon")):
        (tmp_path / "config.json").write_text(json.dumps({**fla_cfg, **change}))
        refused(import_hf, tmp_path, match=match)


def test_infer_reads_and_writes_hf_folders_and_init_from_reads_them(tmp_path, capsys):
    from rwkv_jax.cli.infer import main
    from rwkv_jax.train.run import read_init_from

    torch.save(random_official_state_dict(vocab=256, n_embd=32, n_layer=2, dim_ffn=64), tmp_path / "m.pth")
    (tmp_path / "s.txt").write_text(TEXT[:300])
    job = ["--prompt", "First", "--max_new_tokens", "6", "--temperature", "0",
           "--score", str(tmp_path / "s.txt")]
    assert main(["--official", str(tmp_path / "m.pth"), *job, "--export_hf", str(tmp_path / "a")]) == 0
    official_out = capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "a")) == ["config.json", "model.safetensors",
                                                  "tokenizer.json", "tokenizer_config.json"]
    assert main(["--hf", str(tmp_path / "a"), *job, "--export_hf", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out == official_out  # the same model, its tokenizer from the folder
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == \
        (tmp_path / "a" / "model.safetensors").read_bytes()

    assert main(["--run_dir", str(tmp_path / "a"), "--prompt", "x"]) == 2
    assert "is a Hugging Face folder, not a run: read it with --hf" in capsys.readouterr().err
    assert main(["--hf", str(tmp_path), "--prompt", "x"]) == 2
    assert capsys.readouterr().err.strip() == f"infer: --hf: {str(tmp_path)!r} has no Hugging Face " \
                                              "config.json (one naming its model_type)"

    config, weights = read_init_from(str(tmp_path / "a"))
    want_config, want = import_official(tmp_path / "m.pth")
    assert config == want_config
    assert all(np.array_equal(weights[jax.tree_util.keystr(k)], v)
               for k, v in jax.tree_util.tree_leaves_with_path(want))
