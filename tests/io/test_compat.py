"""What earlier code wrote still works: the Flax parameter paths are unchanged, and a run,
its checkpoints and its exported .pth from before the restructure load, give the same
logits, and resume bit for bit (tests/fixtures/README.md says how they were made)."""

from __future__ import annotations

import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, repo_pythonpath

from rwkv_jax import io as ckpt
from rwkv_jax.config import ModelConfig
from rwkv_jax.data import sample_path
from rwkv_jax.nn.model import RWKV, param_shapes

FIXTURES = os.path.join(REPO, "tests", "fixtures")


def test_parameter_paths_and_shapes_are_those_checkpoints_hold():
    with open(os.path.join(FIXTURES, "param_paths.json")) as f:
        cases = json.load(f)
    for name, case in cases.items():
        config = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in case["config"].items()})
        shapes = param_shapes(config)
        now = {jax.tree_util.keystr(p, simple=True, separator="/"): list(x.shape)
               for p, x in jax.tree_util.tree_leaves_with_path(shapes)}
        assert now == case["params"], name


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """The fixture run unpacked, with the data it was trained on (from the bundled sample)."""
    root = tmp_path_factory.mktemp("pre_restructure")
    with tarfile.open(os.path.join(FIXTURES, "pre_restructure.tar.xz")) as tar:
        tar.extractall(root, filter="data")
    for split, size in (("train", 200_000), ("val", 20_000)):
        with lzma.open(sample_path(split)) as f:
            (root / f"{split}.txt").write_bytes(f.read(size))
    return root


def test_an_old_checkpoint_and_export_load_and_give_the_same_logits(old_run):
    run_dir = old_run / "old_run"
    config, params, meta = ckpt.restore_params(run_dir, step=6)
    want = json.loads((run_dir / "old_run_logits.json").read_text())
    tokens = jnp.asarray([want["tokens"]], jnp.int32)
    logits, _ = RWKV(config).apply({"params": params}, tokens)
    np.testing.assert_allclose(np.asarray(logits[0, -1]), want["last_logits"], rtol=0, atol=1e-5)
    official_config, official = ckpt.import_official(run_dir / "old_run.pth")
    assert (official_config.n_layer, official_config.n_embd) == (config.n_layer, config.n_embd)
    chex.assert_trees_all_equal(official, jax.tree.map(np.asarray, params))


def test_an_old_run_resumes_bit_for_bit(old_run, tmp_path):
    """Steps 4 -> 6 trained now from the old step-4 checkpoint equal the old step 6."""
    run_dir = tmp_path / "old_run"
    shutil.copytree(old_run / "old_run", run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "6")
    args = ["--config=configs/tiny.py", f"--config.output_dir={tmp_path}",
            "--config.experiment_name=old_run", f"--config.data.train_file={old_run / 'train.txt'}",
            f"--config.data.val_file={old_run / 'val.txt'}", "--config.model.n_layer=2",
            "--config.model.n_embd=16", "--config.train.batch_size=2",
            "--config.train.max_seq_length=32", "--config.memory.rwkv_chunk_size=16",
            "--config.train.steps=6", "--config.optimizer.warmup_steps=2",
            # The old tiny config left the horizon to train.steps (and saved none).
            "--config.optimizer.total_steps=0", "--config.checkpoint.every=2",
            "--config.checkpoint.keep=2", "--config.logging.eval_every=0",
            "--config.logging.progress=False", "--config.logging.tensorboard=False"]
    out = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": repo_pythonpath()},
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "at step 4" in out.stderr
    assert "records no schedule horizon (it was written before horizons were saved): " \
           "optimizer.total_steps=6 from this config" in out.stderr
    _, now, _ = ckpt.restore_params(run_dir, step=6)
    _, then, _ = ckpt.restore_params(old_run / "old_run", step=6)
    chex.assert_trees_all_equal(now, then)
