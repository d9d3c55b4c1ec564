"""Fine-tuning with adapters (train.trainable=lora|pissa): the base stays untouched, the merged
export is what the `rwkv` package runs with our logits, adapter files round-trip in
RWKV-PEFT's naming, and bad input gets one line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TEXT, random_official_state_dict, random_x070_state_dict, rel_err, tiny_config

from rwkv_jax import train as trainer
from rwkv_jax.config import ConfigError
from rwkv_jax.io.adapter_file import export_adapter, init_path, read_adapter
from rwkv_jax.io.checkpoint import restore_params
from rwkv_jax.io.official import export_official, import_official
from rwkv_jax.nn import adapters as ad
from rwkv_jax.nn.model import RWKV

torch = pytest.importorskip("torch", reason="adapter files and the base .pth need torch")

V = 256  # the byte tokenizer's vocabulary

# The rwkv package in a fresh interpreter (its RWKV class is RWKV-7's only with RWKV_V7_ON=1
# set before its first import): the logits of a token list, whole sequence, per model file.
OFFICIAL = textwrap.dedent(r'''
    import json, os, sys
    os.environ["RWKV_V7_ON"] = "1" if sys.argv[3] == "7" else "0"
    os.environ["RWKV_JIT_ON"] = "0"
    os.environ["RWKV_CUDA_ON"] = "0"
    import numpy as np
    from rwkv.model import RWKV
    tokens, out = json.loads(sys.argv[1]), {}
    for i, path in enumerate(sys.argv[4:]):
        model = RWKV(model=path[: -len(".pth")], strategy="cpu fp32")
        out[str(i)] = model.forward(tokens, None, full_output=True)[0].numpy()
    np.savez(sys.argv[2], **out)
''')
TOKENS = [int(t) for t in np.random.default_rng(0).integers(0, V, 24)]


def _official_logits(version: str, paths, tmp_path) -> list[np.ndarray]:
    out = tmp_path / "official.npz"
    subprocess.run([sys.executable, "-c", OFFICIAL, json.dumps(TOKENS), str(out), version,
                    *map(str, paths)], check=True, timeout=300)
    got = np.load(out)
    return [got[str(i)] for i in range(len(paths))]


def _base(tmp, version: str) -> str:
    path = str(tmp / f"base{version}.pth")
    sd = random_official_state_dict(vocab=V, n_embd=32, n_layer=2, dim_ffn=64) if version == "4" \
        else random_x070_state_dict(vocab=V, n_embd=32, n_layer=2, head_size=8, dim_ffn=64,
                                    lora=(8, 8, 8, 16))
    torch.save(sd, path)
    return path


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bases")
    return {v: _base(tmp, v) for v in ("4", "7")}


def _cfg(tmp, base, method="lora", **over):
    (tmp / "train.txt").write_text(TEXT)
    (tmp / "val.txt").write_text(TEXT[:600])
    return tiny_config(tmp, (str(tmp / "train.txt"), str(tmp / "val.txt")), **{
        "train.trainable": method, "train.init_from": base, "train.lora.rank": 4,
        "train.lora.alpha": 8.0, "train.lora.targets": "att,ffn,ln,head",
        "train.steps": 4, "checkpoint.every": 4, "logging.eval_every": 4, **over})


@pytest.fixture(scope="module")
def lora_run(bases, tmp_path_factory):
    """RWKV-7 with LoRA (dropout on) for 4 steps, and its base's sha256 before."""
    tmp = tmp_path_factory.mktemp("lora_run")
    before = _sha(bases["7"])
    run = trainer.prepare(_cfg(tmp, bases["7"], **{"train.lora.dropout": 0.1}))
    metrics = trainer.train(run)
    return run, before, metrics


def _with_adapters(config, weights, trainable, spec):
    """Our logits with the adapters applied to the float32 base (not merged)."""
    with ad.applied(trainable, spec):
        return np.asarray(RWKV(config).apply({"params": ad.overlay(weights, trainable)},
                                             jnp.asarray([TOKENS]))[0][0])


def test_lora_trains_the_adapters_and_leaves_the_base_bit_identical(lora_run, bases):
    run, before, metrics = lora_run
    assert np.isfinite(metrics["val_loss"])
    assert _sha(bases["7"]) == before  # the file
    config, weights = import_official(bases["7"])
    # What the steps read: the base as frozen at the start, not one bit moved.
    frozen = ad.frozen_base(weights, {})
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, run.base),
                 jax.tree.map(np.asarray, frozen))
    _, trainable, meta = restore_params(run.run_dir, merged=False)
    assert meta["adapters"]["base_sha256"] == before and meta["adapters"]["rank"] == 4
    assert set(trainable) == {"lora", "tuned"}  # the checkpoint holds no base
    assert all(np.abs(f["lora_B"]).max() > 0 for _, f in ad.adapted(trainable["lora"]))
    trained = sum(x.size for x in jax.tree.leaves(trainable))
    assert trained < sum(x.size for x in jax.tree.leaves(weights)) / 4


@pytest.mark.parametrize("version", ["4", "7"])
def test_merged_export_gives_the_adapted_models_logits_in_the_rwkv_package(
        bases, version, tmp_path):
    config, weights = import_official(bases[version])
    ours, paths = [], []
    for method in ("lora", "pissa"):
        spec = ad.AdapterSpec(method, 4, 8.0, 0.0, ("att", "ffn", "ln", "head",
                                                     "w0" if version == "7" else "time_decay"))
        trainable = ad.init(weights, spec, ad.plan(weights, spec), jax.random.PRNGKey(0))
        # Trained-looking adapters: B far from zero, the tuned leaves moved.
        keys = iter(jax.random.split(jax.random.PRNGKey(1), 1000))
        trainable["lora"] = jax.tree.map(
            lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape), trainable["lora"])
        trainable["tuned"] = jax.tree.map(lambda x: x * 1.1 + 0.05, trainable["tuned"])
        frozen = ad.frozen_base(weights, trainable, jnp.float32)
        ours.append(_with_adapters(config, frozen, trainable, spec))
        paths.append(tmp_path / f"{method}.pth")
        export_official(ad.merge(weights, trainable, spec, original=True), config, paths[-1])
    for got, official in zip(ours, _official_logits(version, paths, tmp_path)):
        assert rel_err(got, official) <= 1e-5


def test_pissa_starts_as_the_base(bases):
    config, weights = import_official(bases["7"])
    spec = ad.AdapterSpec("pissa", 4, 8.0)
    trainable = ad.init(weights, spec, ad.plan(weights, spec), jax.random.PRNGKey(0))
    merged = ad.merge(weights, trainable, spec, original=True)
    residual = ad.merge(ad.frozen_base(weights, trainable, jnp.float32), trainable, spec,
                        original=False)
    for tree in (merged, residual):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-6),
                     tree, weights)
    # The residual is what is left: the top singular directions went to the adapters.
    d = ("blocks_0", "att", "key", "kernel")
    res = ad.get_path(ad.frozen_base(weights, trainable, jnp.float32), d)
    top = np.linalg.svd(np.asarray(ad.get_path(weights, d)), compute_uv=False)
    assert np.linalg.norm(res) ** 2 == pytest.approx(np.sum(top[4:] ** 2), rel=1e-4)


def test_infer_exports_the_merged_model_and_the_adapters(lora_run, bases, tmp_path, capsys):
    from rwkv_jax.cli.infer import main

    run, _, _ = lora_run
    merged, adapter = tmp_path / "merged.pth", tmp_path / "adapter.pth"
    assert main(["--run_dir", run.run_dir, "--export_official", str(merged)]) == 0
    assert main(["--run_dir", run.run_dir, "--export_adapter", str(adapter)]) == 0
    capsys.readouterr()
    config, weights = import_official(bases["7"])
    _, trainable, meta = restore_params(run.run_dir, merged=False)
    spec = ad.AdapterSpec("lora", 4, 8.0)
    ours = _with_adapters(config, weights, trainable, spec)
    (official,) = _official_logits("7", [merged], tmp_path)
    assert rel_err(ours, official) <= 1e-5
    sd = torch.load(adapter)
    assert sd["blocks.0.att.key.lora_A"].shape == (4, 32)  # RWKV-PEFT's (r, in)
    assert sd["blocks.1.ffn.value.lora_B"].shape == (32, 4)  # and (out, r)
    assert float(sd["lora_alpha"]) == 8.0 and "blocks.0.ln1.weight" in sd
    back, read_spec = read_adapter(adapter, config, weights)
    assert read_spec.scale == spec.scale
    jax.tree.map(np.testing.assert_array_equal, back["lora"],
                 jax.tree.map(np.asarray, trainable["lora"]))
    # The base plus the adapter file runs as the run does.
    gen = ["--prompt", "First", "--max_new_tokens", "6", "--temperature", "0"]
    assert main(["--run_dir", run.run_dir, *gen]) == 0
    from_run = capsys.readouterr().out
    assert main(["--official", bases["7"], "--adapter", str(adapter), *gen]) == 0
    assert capsys.readouterr().out == from_run


def test_pissa_adapter_files_carry_their_initial_factors(bases, tmp_path):
    config, weights = import_official(bases["4"])
    spec = ad.AdapterSpec("pissa", 4, 8.0, 0.0, ("att.key", "ffn"))
    trainable = ad.init(weights, spec, ad.plan(weights, spec), jax.random.PRNGKey(0))
    written = export_adapter(trainable, spec, config, tmp_path / "p.pth")
    assert written == [str(tmp_path / "p.pth"), init_path(tmp_path / "p.pth")]
    back, read_spec = read_adapter(tmp_path / "p.pth", config, weights)
    assert read_spec.method == "pissa" and read_spec.scale == 1.0
    # RWKV-PEFT's PiSSA output records nothing: its init_pissa.pth is named, or it is refused
    # (as LoRA it would merge into another model).
    sd = torch.load(tmp_path / "p.pth")
    del sd["lora_pissa"]
    torch.save(sd, tmp_path / "peft.pth")
    with pytest.raises(ValueError, match="records no lora_alpha .* init_pissa.pth"):
        read_adapter(tmp_path / "peft.pth", config, weights)
    peft, peft_spec = read_adapter(tmp_path / "peft.pth", config, weights,
                                   pissa_init=init_path(tmp_path / "p.pth"))
    assert peft_spec.method == "pissa"
    # A LoRA export over a PiSSA one takes the old initial factors away.
    lora = ad.AdapterSpec("lora", 4, 8.0, 0.0, ("att.key",))
    export_adapter(ad.init(weights, lora, ad.plan(weights, lora), jax.random.PRNGKey(0)), lora,
                   config, tmp_path / "p.pth")
    assert not os.path.exists(init_path(tmp_path / "p.pth"))
    assert read_adapter(tmp_path / "p.pth", config, weights)[1].method == "lora"
    jax.tree.map(np.testing.assert_array_equal, back["pissa_init"],
                 jax.tree.map(np.asarray, trainable["pissa_init"]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
                 ad.merge(weights, back, read_spec, original=True),
                 ad.merge(weights, trainable, spec, original=True))


def test_bad_adapters_get_one_line(bases, tmp_path):
    config4, weights4 = import_official(bases["4"])
    config7, weights7 = import_official(bases["7"])
    spec = ad.AdapterSpec("lora", 4, 8.0, 0.0, ("att", "ffn"))
    t4 = ad.init(weights4, spec, ad.plan(weights4, spec), jax.random.PRNGKey(0))
    export_adapter(t4, spec, config4, tmp_path / "v4.pth")
    with pytest.raises(ValueError, match="adapts a projection this RWKV-7 model"):
        read_adapter(tmp_path / "v4.pth", config7, weights7)  # ffn.receptance: RWKV-4 only
    with pytest.raises(ValueError, match="rank-4 adapters, but train.lora.rank=8"):
        read_adapter(tmp_path / "v4.pth", config4, weights4, rank=8)
    bigger = random_official_state_dict(vocab=V, n_embd=64, n_layer=2, dim_ffn=64)
    torch.save(bigger, tmp_path / "big.pth")
    config_big, weights_big = import_official(tmp_path / "big.pth")
    with pytest.raises(ValueError, match=r"has shape \(4, 32\), but .* needs \(4, 64\)"):
        read_adapter(tmp_path / "v4.pth", config_big, weights_big)
    sd = torch.load(tmp_path / "v4.pth")
    del sd["lora_alpha"]
    torch.save(sd, tmp_path / "peft.pth")
    with pytest.raises(ValueError, match="records no lora_alpha"):
        read_adapter(tmp_path / "peft.pth", config4, weights4)
    with pytest.raises(ValueError, match="'attn' names nothing"):
        ad.plan(weights4, dataclasses.replace(spec, targets=("attn",)))
    # A hybrid's attention layers are targets like any projection ("attn", "mlp"); their
    # projections have no name in RWKV-PEFT's (official) layout.
    from rwkv_jax.config import default_config, model_config_from
    from rwkv_jax.nn.model import param_shapes

    c = default_config()
    c.model.n_layer, c.model.n_embd, c.model.attn_head_size = 2, 32, 8
    c.architecture.layer_pattern = "alternating"
    hybrid = model_config_from(c, vocab_size=V)
    where = ad.plan(param_shapes(hybrid), dataclasses.replace(spec, targets=("attn", "att")))
    assert ("blocks_1", "attn", "query") in where.lora and ("blocks_0", "att", "key") in where.lora
    with pytest.raises(ValueError, match="'mlp.gate' names nothing"):
        ad.plan(param_shapes(hybrid), dataclasses.replace(spec, targets=("mlp.gate",)))


def test_bad_adapter_configs_are_refused_before_compiling(bases, tmp_path):
    with pytest.raises(ConfigError, match="set train.init_from"):
        trainer.prepare(_cfg(tmp_path, "", **{"train.init_from": ""}))
    with pytest.raises(ConfigError, match="'query' names nothing in this RWKV-7 model"):
        trainer.prepare(_cfg(tmp_path, bases["7"], **{"train.lora.targets": "att,query"}))
    with pytest.raises(ConfigError, match=r"train.lora.rank=64 is invalid: above the smaller"):
        trainer.prepare(_cfg(tmp_path, bases["7"], **{"train.lora.rank": 64}))
    with pytest.raises(ConfigError, match="train.lora.dropout=1.5 is invalid"):
        trainer.prepare(_cfg(tmp_path, bases["7"], **{"train.lora.dropout": 1.5}))
    # A learned initial state is no part of the base: it trains as a target, or is refused.
    state = {"architecture.learned_init_state": True}
    with pytest.raises(ConfigError, match="the base has no blocks_0/init_state/.*name 'init_state'"):
        trainer.prepare(_cfg(tmp_path, bases["7"], **state))
    run = trainer.prepare(_cfg(tmp_path, bases["7"], **state,
                               **{"train.lora.targets": "att,init_state"}))
    assert ("blocks_1", "init_state", "wkv") in run.adapter_plan.tuned


def test_an_adapter_run_resumes_exactly_and_refuses_another_base(lora_run, bases, tmp_path):
    """Stopped at step 2 and resumed to 4, the adapters are the uninterrupted run's bit for bit
    (dropout masks included); a base file that changed since is refused in one line."""
    run, _, _ = lora_run
    base = tmp_path / "base.pth"
    base.write_bytes(open(bases["7"], "rb").read())
    over = {"train.lora.dropout": 0.1, "checkpoint.every": 2, "optimizer.total_steps": 4,
            "logging.eval_every": 0}
    trainer.train(trainer.prepare(_cfg(tmp_path, str(base), **over, **{"train.steps": 2})))
    resumed = trainer.prepare(_cfg(tmp_path, str(base), **over))
    trainer.train(resumed)
    _, want, _ = restore_params(run.run_dir, merged=False)
    _, got, _ = restore_params(resumed.run_dir, merged=False)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got),
                 jax.tree.map(np.asarray, want))
    sd = torch.load(base)
    sd["head.weight"] = sd["head.weight"] * 1.01
    torch.save(sd, base)
    with pytest.raises(trainer.ResumeError, match="another file than the one this run started"):
        trainer.train(trainer.prepare(_cfg(tmp_path, str(base), **over, **{"train.steps": 6})))
    with pytest.raises(ValueError, match="is not the base these adapters were trained on"):
        restore_params(resumed.run_dir)


def test_a_run_starts_from_an_adapter_file(lora_run, tmp_path):
    from rwkv_jax.cli.infer import main

    run, _, _ = lora_run
    adapter = tmp_path / "a.pth"
    assert main(["--run_dir", run.run_dir, "--export_adapter", str(adapter)]) == 0
    cfg = run.cfg.copy_and_resolve_references()
    cfg.output_dir = str(tmp_path / "runs")
    cfg.train.lora.init_from = str(adapter)
    started = trainer.prepare(cfg)
    ts, _ = trainer.init_train_state(started, jax.random.PRNGKey(0))
    _, trained, _ = restore_params(run.run_dir, merged=False)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, ts.params),
                 jax.tree.map(np.asarray, trained))
    for field, value, why in (("rank", 2, "rank-4 adapters, but train.lora.rank=2"),
                              ("alpha", 4.0, "records lora_alpha=8, but 4 was given"),
                              ("targets", "att,ffn", "adapts 13 tensors where .* names 12")):
        bad = cfg.copy_and_resolve_references()
        bad.train.lora[field] = value
        with pytest.raises(ConfigError, match=why):
            trainer.prepare(bad)
    # The adapters alone leave: no base is read (nor needed) to write them.
    os.rename(run.cfg.train.init_from, f"{run.cfg.train.init_from}.moved")
    try:
        assert main(["--run_dir", run.run_dir, "--export_adapter", str(tmp_path / "b.pth")]) == 0
    finally:
        os.rename(f"{run.cfg.train.init_from}.moved", run.cfg.train.init_from)
