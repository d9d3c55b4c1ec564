"""Several processes on localhost with jax.distributed (gloo collectives on CPU): the same
training as one process with the same global mesh, each process loading only its rows,
checkpoints that move between process counts, and a killed process that stops the others."""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time

import chex
import jax
import pytest

from rwkv_jax import checkpoint as ckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(tmp, out, steps):
    text = tmp / "t.txt"
    if not text.exists():
        text.write_text(TEXT)
    return ["--config=configs/tiny.py", f"--config.data.train_file={text}",
            f"--config.data.val_file={text}", "--config.model.n_layer=2", "--config.model.n_embd=32",
            "--config.train.batch_size=8", "--config.train.max_seq_length=32",
            "--config.memory.rwkv_chunk_size=16", f"--config.train.steps={steps}",
            "--config.optimizer.warmup_steps=2", "--config.checkpoint.every=2",
            "--config.logging.every=2", "--config.logging.eval_every=0",
            "--config.logging.progress=False", "--config.dist.heartbeat_timeout=10",
            f"--config.output_dir={out}"]


def _launch(args, devices, env=None, process=None, port=None):
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **(env or {})}
    if process is not None:
        args = args + [f"--config.dist.coordinator_address=127.0.0.1:{port}",
                       "--config.dist.num_processes=2", f"--config.dist.process_id={process}"]
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _two_processes(args, env1=None):
    port = _free_port()
    procs = [_launch(args, 4, process=i, port=port, env=env1 if i == 1 else None) for i in (0, 1)]
    return procs


def _final_loss(log: str) -> float:
    return float(re.search(r"done: \{'loss': ([0-9.]+)", log).group(1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    two = _two_processes(_args(tmp, tmp / "two", 4))
    one = _launch(_args(tmp, tmp / "one", 4), 8)
    logs = {"one": one.communicate(timeout=300)[0]}
    t0 = time.time()
    for i, p in enumerate(two):
        logs[f"p{i}"] = p.communicate(timeout=300)[0]
        assert p.returncode == 0, logs[f"p{i}"][-3000:]
    assert one.returncode == 0, logs["one"][-3000:]
    return tmp, logs, time.time() - t0


def test_two_processes_train_like_one_and_load_only_their_rows(runs):
    tmp, logs, _ = runs
    assert "process 0 of 2 loads rows 0:4 of each global batch of 8" in logs["p0"]
    assert "process 1 of 2 loads rows 4:8 of each global batch of 8" in logs["p1"]
    assert "done:" not in logs["p1"]  # one process reports
    assert abs(_final_loss(logs["p0"]) - _final_loss(logs["one"])) <= 1e-5 * _final_loss(logs["one"])
    # The 2-process checkpoint restores in this single process; parameters match 1 x 8 devices.
    _, two, meta = ckpt.restore_params(tmp / "two" / "tiny")
    _, one, _ = ckpt.restore_params(tmp / "one" / "tiny")
    assert meta["step"] == 4
    chex.assert_trees_all_close(two, one, rtol=2e-4, atol=2e-6)


def test_killed_process_stops_the_other_and_the_rerun_resumes(runs):
    tmp, _, _ = runs
    # Start from the checkpoint one process wrote: it restores in two.
    out = tmp / "kill"
    shutil.copytree(tmp / "one", out)
    args = _args(tmp, out, 8)
    procs = _two_processes(args, env1={"RWKV_JAX_DIE_AT_STEP": "6"})
    log1 = procs[1].communicate(timeout=300)[0]
    died = time.time()
    log0 = procs[0].communicate(timeout=300)[0]
    waited = time.time() - died
    assert procs[1].returncode == -9, log1[-2000:]
    assert procs[0].returncode != 0 and waited < 60, (procs[0].returncode, waited)
    assert "stopped sending heartbeats" in log0
    assert "resumed from" in log0 and "at step 4" in log0
    steps = ckpt.TrainCheckpointer(out / "tiny" / "checkpoints").all_steps()
    assert max(steps) == 4  # nothing half-written past the last complete save

    procs = _two_processes(args)
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:]
    assert "at step 4" in logs[0]
    _, _, meta = ckpt.restore_params(out / "tiny")
    assert meta["step"] == 8
