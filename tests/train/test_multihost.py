"""Several processes on localhost with jax.distributed (gloo collectives on CPU): the same
training as one process with the same global mesh, each process loading only its rows,
checkpoints that move between process counts, and a killed process that stops the others."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time

import chex
import pytest
from conftest import REPO, repo_pythonpath

from rwkv_jax import io as ckpt

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


def _launch(args, devices, process=None, port=None, kill_at=None):
    env = {**os.environ, "PYTHONPATH": repo_pythonpath(), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    if process is not None:
        args = args + [f"--config.dist.coordinator_address=127.0.0.1:{port}",
                       "--config.dist.num_processes=2", f"--config.dist.process_id={process}"]
    program = ["train.py"] if kill_at is None else ["tests/signal_at_step.py", str(kill_at), "KILL"]
    return subprocess.Popen([sys.executable, *program, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _two_processes(args, kill1_at=None):
    port = _free_port()
    return [_launch(args, 2, process=i, port=port, kill_at=kill1_at if i == 1 else None)
            for i in (0, 1)]


def _final_loss(log: str) -> float:
    return float(re.search(r"done: \{'loss': ([0-9.]+)", log).group(1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three launches share the module's work. At the same time: one process on 4 devices and
    two processes on 2 each (a process's rows span several devices), both from scratch, the
    pair's process 1 killed after step 3 (between the checkpoints of steps 2 and 4). Then the
    same command for the pair again, once the single process's step-2 checkpoint has replaced
    the pair's (the two are checked equal first), so the rerun restores a checkpoint that
    another process count wrote."""
    tmp = tmp_path_factory.mktemp("multihost")
    one = _launch(_args(tmp, tmp / "one", 4), 4)
    args = _args(tmp, tmp / "two", 4)
    killed = _two_processes(args, kill1_at=3)
    logs = {"killed1": killed[1].communicate(timeout=300)[0]}
    died = time.time()
    logs["killed0"] = killed[0].communicate(timeout=300)[0]
    waited = time.time() - died
    logs["one"] = one.communicate(timeout=300)[0]
    assert one.returncode == 0, logs["one"][-3000:]
    codes = (killed[0].returncode, killed[1].returncode)
    after_kill = ckpt.TrainCheckpointer(tmp / "two" / "tiny" / "checkpoints").all_steps()
    assert 2 in after_kill, (codes, after_kill, logs["killed0"][-3000:], logs["killed1"][-3000:])
    _, at2, meta2 = ckpt.restore_params(tmp / "two" / "tiny", step=2)

    step2 = tmp / "two" / "tiny" / "checkpoints" / "2"
    shutil.rmtree(step2)
    shutil.copytree(tmp / "one" / "tiny" / "checkpoints" / "2", step2)
    rerun = _two_processes(args)
    for i, p in enumerate(rerun):
        logs[f"p{i}"] = p.communicate(timeout=300)[0]
        assert p.returncode == 0, logs[f"p{i}"][-3000:]
    return tmp, logs, {"codes": codes, "waited": waited, "after_kill": after_kill,
                       "two_at_2": (at2, meta2)}


def test_two_processes_train_like_one_and_load_only_their_rows(runs):
    tmp, logs, killed = runs
    for log in (logs["killed0"], logs["p0"]):
        assert "process 0 of 2 loads rows 0:4 of each global batch of 8" in log
    for log in (logs["killed1"], logs["p1"]):
        assert "process 1 of 2 loads rows 4:8 of each global batch of 8" in log
    assert "done:" in logs["p0"] and "done:" not in logs["p1"]  # one process reports
    # From scratch, two processes x 2 devices train as one process x 4 (step 2, written by
    # the two and restored in this single process), and they go on as it does from its own
    # checkpoint (step 4, after the rerun).
    _, one2, one_meta2 = ckpt.restore_params(tmp / "one" / "tiny", step=2)
    two2, two_meta2 = killed["two_at_2"]
    assert abs(two_meta2["loss"] - one_meta2["loss"]) <= 1e-5 * one_meta2["loss"]
    chex.assert_trees_all_close(two2, one2, rtol=2e-4, atol=2e-6)
    assert abs(_final_loss(logs["p0"]) - _final_loss(logs["one"])) <= 1e-5 * _final_loss(logs["one"])
    _, two, meta = ckpt.restore_params(tmp / "two" / "tiny")
    _, one, _ = ckpt.restore_params(tmp / "one" / "tiny")
    assert meta["step"] == 4
    chex.assert_trees_all_close(two, one, rtol=2e-4, atol=2e-6)


def test_killed_process_stops_the_other_and_the_rerun_resumes(runs):
    _, logs, killed = runs
    code0, code1 = killed["codes"]
    assert code1 == -9, logs["killed1"][-2000:]
    assert code0 != 0 and killed["waited"] < 60, (code0, killed["waited"])
    assert "stopped sending heartbeats" in logs["killed0"]
    assert killed["after_kill"] == [2]  # nothing half-written past the last complete save
    # The same command again resumes from the newest checkpoint (the single process's: it
    # restores in two) and finishes.
    assert "resumed from" in logs["p0"] and "at step 2" in logs["p0"]
