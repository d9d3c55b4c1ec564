"""State files (rwkv_jax.io.state_file): the `rwkv` package started from an exported RWKV-7
state gives our logits, round trips are exact, bad files get one line, and infer.py's
--export_state / --state."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import (
    TEXT,
    random_official_state_dict,
    random_x070_state_dict,
    rel_err,
    tiny_config,
)

from rwkv_jax.config import ModelConfig
from rwkv_jax.io.checkpoint import find_checkpoint_dir, restore_params
from rwkv_jax.io.official import import_official
from rwkv_jax.io.state_file import export_state, load_state, state_tree
from rwkv_jax.nn.model import RWKV, init_params

torch = pytest.importorskip("torch", reason="state files need torch")

# The rwkv package's RWKV-7 exists only with RWKV_V7_ON=1 set before its first import: a fresh
# interpreter. Its state list is loaded as RWKV-Runner loads a version-7 state file (no
# transpose): per layer [att x_prev, time_state, ffn x_prev].
OFFICIAL = textwrap.dedent(r'''
    import json, os, sys
    os.environ["RWKV_V7_ON"] = "1"
    os.environ["RWKV_CUDA_ON"] = "0"
    import numpy as np, torch
    from rwkv.model import RWKV_x070
    model_path, state_path, tokens, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), {}
    model = RWKV_x070(model=model_path[: -len(".pth")], strategy="cpu fp32")
    raw = torch.load(state_path, map_location="cpu")
    C = model.args.n_embd
    for name in ("keep", "community", "transposed"):
        state = []
        for i in range(model.args.n_layer):
            ts = raw[f"blocks.{i}.att.time_state"].float()
            shift = name == "keep"
            state += [raw[f"blocks.{i}.att.shift_state"].float() if shift else torch.zeros(C),
                      (ts.transpose(1, 2) if name == "transposed" else ts).contiguous(),
                      raw[f"blocks.{i}.ffn.shift_state"].float() if shift else torch.zeros(C)]
        logits, _ = model.forward(tokens, state, full_output=True)
        out[name] = logits.numpy()
    np.savez(sys.argv[4], **out)
''')

V = 256  # the byte tokenizer's vocabulary, so that infer.py runs these models


def _with_random_state(config, params, seed=3):
    """params plus nonzero init_state values (non-symmetric (N, N) blocks)."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 3 * config.n_layer))
    shapes = {"shift_att": (config.n_embd,), "shift_ffn": (config.n_embd,),
              "wkv": (config.n_head, config.head_size, config.head_size)}
    return {**params, **{f"blocks_{i}": {**params[f"blocks_{i}"], "init_state": {
        k: np.asarray(0.5 * jax.random.normal(next(keys), s), np.float32) for k, s in shapes.items()}}
        for i in range(config.n_layer)}}


@pytest.fixture(scope="module")
def x070(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("state_file")
    torch.save(random_x070_state_dict(vocab=V, n_embd=32, n_layer=2, head_size=8, dim_ffn=64,
                                      lora=(8, 8, 8, 16)), tmp / "model.pth")
    config, params = import_official(tmp / "model.pth")
    config = dataclasses.replace(config, learned_init_state=True)
    return tmp, config, _with_random_state(config, params)


def test_rwkv_package_from_our_state_file_gives_our_logits(x070):
    pytest.importorskip("rwkv.model", reason="parity needs the official `rwkv` package")
    tmp, config, params = x070
    for i in range(config.n_layer):  # so that a transposed export would show
        wkv = params[f"blocks_{i}"]["init_state"]["wkv"]
        assert np.abs(wkv - wkv.swapaxes(1, 2)).max() > 0.1
    export_state(params, config, tmp / "state.pth", shift="keep")
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, V, 20)]
    out = tmp / "official.npz"
    res = subprocess.run([sys.executable, "-c", OFFICIAL, str(tmp / "model.pth"),
                          str(tmp / "state.pth"), json.dumps(tokens), str(out)],
                         check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    official = dict(np.load(out))
    apply = jax.jit(lambda p, x: RWKV(config).apply({"params": p}, x, None)[0])
    ours = np.asarray(apply(params, np.array([tokens])))[0]
    assert rel_err(ours, official["keep"]) <= 1e-5
    assert rel_err(ours, official["transposed"]) > 1e-2
    # What community loaders do with the file: time_state, the token shifts from zero.
    no_shift = {k: {**v, "init_state": {**v["init_state"], **{s: np.zeros_like(
        v["init_state"][s]) for s in ("shift_att", "shift_ffn")}}} if "init_state" in v else v
        for k, v in params.items()}
    assert rel_err(np.asarray(apply(no_shift, np.array([tokens])))[0], official["community"]) <= 1e-5


def _init_states(params):
    return {k: {"init_state": v["init_state"]} for k, v in params.items() if "init_state" in v}


def test_round_trips_are_bit_exact_and_shift_needs_a_choice(x070, tmp_path):
    _, config, params = x070
    export_state(params, config, tmp_path / "keep.pth", shift="keep")
    back = load_state(tmp_path / "keep.pth", config)
    jax.tree.map(np.testing.assert_array_equal, back, _init_states(params))
    with pytest.raises(ValueError, match="token-shift states are nonzero"):
        export_state(params, config, tmp_path / "x.pth")
    export_state(params, config, tmp_path / "drop.pth", shift="drop")
    sd = torch.load(tmp_path / "drop.pth")
    assert sorted(sd) == ["blocks.0.att.time_state", "blocks.1.att.time_state"]  # Runner: n_layer
    back = load_state(tmp_path / "drop.pth", config)
    for i in range(config.n_layer):
        got, want = back[f"blocks_{i}"]["init_state"], params[f"blocks_{i}"]["init_state"]
        np.testing.assert_array_equal(got["wkv"], want["wkv"])
        assert not got["shift_att"].any() and not got["shift_ffn"].any()
    state = state_tree(dataclasses.replace(config, learned_init_state=False), back, 3)
    assert state["layers"][1]["wkv"].shape == (3, config.n_head, 8, 8)
    np.testing.assert_array_equal(state["layers"][1]["wkv"][2], back["blocks_1"]["init_state"]["wkv"])


def test_rwkv4_state_files_round_trip(tmp_path):
    config = ModelConfig(version="4", vocab_size=V, n_layer=2, n_embd=32, learned_init_state=True)
    params = init_params(config, jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if "init_state" in jax.tree_util.keystr(p) else x, params)
    export_state(params, config, tmp_path / "s4.pth")
    assert sorted(torch.load(tmp_path / "s4.pth"))[:4] == [
        "blocks.0.att.shift_state", "blocks.0.att.state_aa", "blocks.0.att.state_bb",
        "blocks.0.ffn.shift_state"]
    jax.tree.map(np.testing.assert_array_equal, load_state(tmp_path / "s4.pth", config),
                 jax.tree.map(np.asarray, _init_states(params)))


def test_bad_state_files_get_one_line(x070, tmp_path):
    _, config, params = x070
    H, N, C = config.n_head, config.head_size, config.n_embd
    cases = {
        "transposed heads": ({f"blocks.{i}.att.time_state": torch.zeros(N, H, N) for i in (0, 1)},
                             r"blocks.0.att.time_state is \(8, 4, 8\); this model's is \(4, 8, 8\)"),
        "v4": ({"blocks.0.att.state_aa": torch.zeros(C)}, "holds an RWKV-4 state; this model is RWKV-7"),
        "layers": ({f"blocks.{i}.att.time_state": torch.zeros(H, N, N) for i in range(3)},
                   r"holds states for layers \[0, 1, 2\]; this model's RWKV layers are \[0, 1\]"),
        "unknown": ({"blocks.0.att.time_state": torch.zeros(H, N, N), "blocks.0.att.wkv": torch.zeros(1)},
                    "unknown tensor 'blocks.0.att.wkv'"),
        "not a state": ({"emb.weight": torch.zeros(2, 2)}, "is not a state file"),
    }
    for name, (sd, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(sd, path)
        with pytest.raises(ValueError, match=message) as e:
            load_state(path, config)
        assert "\n" not in str(e.value), name
    with pytest.raises(ValueError, match="no learned initial state"):
        export_state(params, dataclasses.replace(config, learned_init_state=False), tmp_path / "n.pth")


def test_infer_starts_from_a_state_file(x070, tmp_path, capsys):
    from rwkv_jax.cli.infer import main

    tmp, config, params = x070
    export_state(params, config, tmp_path / "s.pth", shift="keep")
    torch.save({k: torch.zeros_like(v) for k, v in torch.load(tmp_path / "s.pth").items()},
               tmp_path / "zero.pth")
    (tmp_path / "s.txt").write_text(TEXT[:300])
    model = ["--official", str(tmp / "model.pth")]
    gen = ["--prompt", "First", "--max_new_tokens", "8", "--temperature", "0"]
    score = ["--score", str(tmp_path / "s.txt")]
    outs = []
    for args in ([*gen, *score], [*gen, "--state", str(tmp_path / "s.pth")],
                 [*score, "--state", str(tmp_path / "zero.pth")]):
        assert main([*model, *args]) == 0
        outs.append(capsys.readouterr().out.splitlines())
    plain, tuned, zero = outs
    assert tuned != plain[:-1]  # the text starts from the file's state
    assert zero == plain[-1:] and zero[0].startswith("score")  # a zero file is the zero state
    assert main(["--official", str(tmp / "model.pth"), "--export_state", str(tmp_path / "x.pth")]) == 2
    assert "no learned initial state" in capsys.readouterr().err
    torch.save(random_official_state_dict(vocab=V, n_embd=32, n_layer=2, dim_ffn=64), tmp_path / "v4.pth")
    assert main(["--official", str(tmp_path / "v4.pth"), "--state", str(tmp_path / "s.pth"),
                 "--prompt", "First"]) == 2
    assert "holds an RWKV-7 state; this model is RWKV-4" in capsys.readouterr().err


@pytest.fixture(scope="module")
def state_run(tmp_path_factory):
    """A tiny RWKV-7 run that state-tunes its learned initial state for a step (its fresh
    RWKV-7 init has zero output projections, so the state gets no gradient and stays zero)."""
    from rwkv_jax import train as trainer

    tmp = tmp_path_factory.mktemp("state_run")
    (tmp / "train.txt").write_text(TEXT)
    (tmp / "val.txt").write_text(TEXT[:600])
    cfg = tiny_config(tmp, (str(tmp / "train.txt"), str(tmp / "val.txt")),
                      **{"model.version": "7", "model.head_size": 8,
                         "architecture.learned_init_state": True, "train.trainable": "state",
                         "train.steps": 1, "checkpoint.every": 1, "logging.eval_every": 0,
                         "optimizer.warmup_steps": 0})
    run = trainer.prepare(cfg)
    trainer.train(run)
    return run


def test_infer_exports_a_runs_learned_state(state_run, tmp_path, capsys):
    from rwkv_jax.cli.infer import main

    run_dir, out = state_run.run_dir, tmp_path / "tuned.pth"
    assert main(["--run_dir", run_dir, "--export_state", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    config, params, _ = restore_params(find_checkpoint_dir(run_dir))
    jax.tree.map(np.testing.assert_array_equal, load_state(out, config),
                 jax.tree.map(np.asarray, _init_states(params)))
    assert main(["--run_dir", run_dir, "--export_state", str(tmp_path / "no" / "x.pth")]) == 2
    assert "--export_state:" in capsys.readouterr().err


def test_a_state_file_starts_state_tuning(state_run, tmp_path):
    """train.init_state_from: the learned initial state starts from a state file's values
    (bit for bit), checked before anything compiles: a file of another version is one line."""
    from rwkv_jax import train as trainer
    from rwkv_jax.config import ConfigError

    out = tmp_path / "start.pth"
    run_config, run_params, _ = restore_params(find_checkpoint_dir(state_run.run_dir))
    export_state(_with_random_state(run_config, run_params, seed=5), run_config, out, shift="keep")
    cfg = state_run.cfg.copy_and_resolve_references()
    cfg.output_dir = str(tmp_path / "runs")
    cfg.train.init_state_from = str(out)
    ts, _ = trainer.init_train_state(trainer.prepare(cfg), jax.random.PRNGKey(0))
    jax.tree.map(np.testing.assert_array_equal, load_state(out, run_config),
                 jax.tree.map(np.asarray, _init_states(ts.params)))
    rwkv4 = tmp_path / "rwkv4_state.pth"
    torch.save({"blocks.0.att.state_aa": torch.zeros(32)}, rwkv4)
    cfg.train.init_state_from = str(rwkv4)
    with pytest.raises(ConfigError, match=r"train.init_state_from=.*RWKV-4"):
        trainer.init_train_state(trainer.prepare(cfg), jax.random.PRNGKey(0))
    cfg.train.init_state_from = str(out)
    cfg.architecture.learned_init_state, cfg.train.trainable = False, "all"
    with pytest.raises(ConfigError, match="set architecture.learned_init_state=True"):
        trainer.prepare(cfg)
