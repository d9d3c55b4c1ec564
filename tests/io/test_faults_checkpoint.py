"""Checkpoint faults through the real command lines (issue 30, items 1, 2, 7, 9): a checkpoint
directory that cannot be written (read-only, no inodes, no space) ends in one line and exit
status 4 within seconds, the temporary removed and the older checkpoints kept; a flipped byte
is caught by the checksums on restore, refused by name or skipped when told; a killed run's
temporary is removed by the next run that owns the directory; a damaged step read by infer.py
is one line. The faults are real: tmpfs mounts, a read-only bind mount, bytes changed on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, TEXT, finish, repo_pythonpath, run_train, start_train

from rwkv_jax import io as ckpt
from rwkv_jax import train as trainer

TMP = ".orbax-checkpoint-tmp"  # orbax's suffix for a step it has not finished writing


def _args(data, out, steps, *extra):
    return ["--config=configs/tiny.py", f"--config.data.train_file={data / 'train.txt'}",
            f"--config.data.val_file={data / 'val.txt'}", f"--config.data.cache_dir={data / 'cache'}",
            "--config.model.n_layer=1", "--config.model.n_embd=32",
            "--config.train.batch_size=2", "--config.train.max_seq_length=16",
            "--config.memory.rwkv_chunk_size=16", "--config.optimizer.warmup_steps=0",
            # One schedule for runs of 4 and of 6 steps: a resumed run can match a straight one.
            "--config.optimizer.total_steps=6",
            f"--config.train.steps={steps}", "--config.checkpoint.every=2",
            "--config.logging.every=2", "--config.logging.eval_every=0",
            "--config.logging.progress=False", "--config.logging.tensorboard=False",
            f"--config.output_dir={out}", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained to step 4 with checkpoints at steps 2 and 4, shared (copied before a test
    damages it)."""
    data = tmp_path_factory.mktemp("faults_data")
    (data / "train.txt").write_text(TEXT)
    (data / "val.txt").write_text(TEXT[:600])
    out = tmp_path_factory.mktemp("faults_run")
    done = run_train(_args(data, out, 4))
    assert done.returncode == 0, done.stderr[-3000:]
    return data, out / "tiny"


def _copy(trained, where) -> str:
    """The shared run copied under `where` (an output_dir); its run directory."""
    run_dir = os.path.join(where, "tiny")
    shutil.copytree(trained[1], run_dir)
    return run_dir


def _digest(directory) -> dict:
    """{relative path: sha256} of every file under `directory`: what must not change."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, directory)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _steps(run_dir) -> list[str]:
    return sorted(os.listdir(os.path.join(run_dir, "checkpoints")))


def _message(stderr: str, prefix: str) -> str:
    """The one line that says what failed: the last line of stderr, and nothing logged as an
    error or traceback besides it (the run's INFO lines before it are the usual progress)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not re.search(r"^[EF]\d{4} ", stderr, re.M), stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith(prefix), stderr[-3000:]
    assert sum(line.startswith(prefix) for line in lines) == 1, stderr[-3000:]
    return lines[-1]


def _mount(*args):
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} is not permitted here: {done.stderr.strip()}")


@contextlib.contextmanager
def _tmpfs(path, **options):
    os.makedirs(path, exist_ok=True)
    _mount("-t", "tmpfs", "-o", ",".join(f"{k}={v}" for k, v in options.items()), "tmpfs", str(path))
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _inodes_used(path) -> int:
    st = os.statvfs(path)
    return st.f_files - st.f_ffree


def _bytes_used(path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _timed(args, timeout=60):
    """The run and its wall time; a run that hangs is killed and fails the test."""
    t = time.perf_counter()
    proc = start_train(args)
    try:
        done = finish(proc, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"train.py still running after {timeout} s: it hangs")
    return done, time.perf_counter() - t


def test_a_read_only_checkpoint_directory_ends_in_one_line_not_a_hang(trained, tmp_path):
    data, _ = trained
    run_dir = _copy(trained, tmp_path)
    checkpoints = os.path.join(run_dir, "checkpoints")
    before = _digest(checkpoints)
    _mount("--bind", checkpoints, checkpoints)
    try:
        _mount("-o", "remount,bind,ro", checkpoints)
        with pytest.raises(OSError, match="Read-only file system"):  # the fault is there
            os.mkdir(os.path.join(checkpoints, "probe"))
        done, wall = _timed(_args(data, tmp_path, 6))
    finally:
        subprocess.run(["umount", "-l", checkpoints], check=False)
    assert done.returncode == 4, done.stderr[-3000:]
    assert wall < 30, wall
    line = _message(done.stderr, "checkpoint error: ")
    assert (f"cannot write the checkpoint of step 6 in {checkpoints}: Read-only file system "
            f"(EROFS). The checkpoints of steps [2, 4] are kept") in line
    assert _digest(checkpoints) == before
    again = run_train(_args(data, tmp_path, 6))
    assert again.returncode == 0 and "at step 4" in again.stderr, again.stderr[-3000:]
    assert _steps(run_dir) == ["2", "4", "6"]


def test_a_read_only_output_dir_is_one_line_before_anything_runs(trained, tmp_path):
    """The run directory itself cannot be made (train.py printed OSError's traceback)."""
    data, _ = trained
    out = tmp_path / "out"
    out.mkdir()
    _mount("--bind", str(out), str(out))
    try:
        _mount("-o", "remount,bind,ro", str(out))
        with pytest.raises(OSError, match="Read-only file system"):  # the fault is there
            os.mkdir(out / "probe")
        done, wall = _timed(_args(data, out, 2))
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    line = _message(done.stderr, "config error: ")
    assert f"output_dir / experiment_name: {str(out)!r} is not writable" in line


def test_no_free_inodes_ends_in_one_line_not_a_hang(trained, tmp_path):
    data, _ = trained
    with _tmpfs(tmp_path / "fs", size="16m", nr_inodes=2000) as fs:
        run_dir = _copy(trained, fs)
        before = _digest(os.path.join(run_dir, "checkpoints"))
        used = _inodes_used(fs)
        _mount("-o", f"remount,nr_inodes={used + 1}", fs)  # room for one more file, no more
        open(os.path.join(fs, "probe"), "w").close()
        with pytest.raises(OSError, match="No space left on device"):
            open(os.path.join(fs, "probe2"), "w").close()
        os.remove(os.path.join(fs, "probe"))
        done, wall = _timed(_args(data, fs, 6))
        assert done.returncode == 4, done.stderr[-3000:]
        assert wall < 30, wall
        line = _message(done.stderr, "checkpoint error: ")
        assert ("cannot write the checkpoint of step 6 in" in line
                and "No space left on device (ENOSPC). The checkpoints of steps [2, 4] are kept"
                in line), line
        assert _steps(run_dir) == ["2", "4"]  # the temporary removed
        assert _digest(os.path.join(run_dir, "checkpoints")) == before
        _mount("-o", "remount,nr_inodes=2000", fs)
        again = run_train(_args(data, fs, 6))
        assert again.returncode == 0 and "at step 4" in again.stderr, again.stderr[-3000:]
        assert _steps(run_dir) == ["2", "4", "6"]


def test_a_full_disk_mid_write_is_one_line_and_temporaries_go_with_their_writer(trained, tmp_path):
    data, _ = trained
    with _tmpfs(tmp_path / "fs", size="16m") as fs:
        run_dir = _copy(trained, fs)
        checkpoints = os.path.join(run_dir, "checkpoints")
        before = _digest(checkpoints)
        # Room for a third of a checkpoint: step 6's writes start, and fail part way.
        step_bytes = sum(os.path.getsize(os.path.join(r, f))
                         for r, _, fs_ in os.walk(os.path.join(checkpoints, "4")) for f in fs_)
        _mount("-o", f"remount,size={(_bytes_used(fs) + step_bytes // 3) // 1024}k", fs)
        st = os.statvfs(fs)
        assert 0 < st.f_bavail * st.f_frsize < step_bytes  # a checkpoint cannot fit
        done, wall = _timed(_args(data, fs, 6))
        assert done.returncode == 4, done.stderr[-3000:]
        line = _message(done.stderr, "checkpoint error: ")
        assert (f"cannot write the checkpoint of step 6 in {checkpoints}: No space left on device "
                f"(ENOSPC). The checkpoints of steps [2, 4] are kept") in line, line
        assert "same command resumes from step 4" in line
        assert _steps(run_dir) == ["2", "4"]  # no temporary left behind
        assert _digest(checkpoints) == before
        assert wall < 30, wall

        # What a run killed while writing step 6 leaves; while the run directory's owner (this
        # test holds its lock, as a live train.py does) may still be writing it, it stays.
        _mount("-o", "remount,size=16m", fs)
        leftover = os.path.join(checkpoints, f"6{TMP}")
        shutil.copytree(os.path.join(checkpoints, "4", "params"),
                        os.path.join(leftover, f"params{TMP}"))
        lock = trainer.lock_run_dir(run_dir)
        try:
            busy = run_train(_args(data, fs, 6))
        finally:
            trainer.unlock_run_dir(lock)
        assert busy.returncode == 2, busy.stderr[-3000:]
        assert "another train.py is training in" in _message(busy.stderr, "config error: ")
        assert os.path.isdir(leftover)
        # Its writer gone, the next run removes it and writes step 6 whole.
        again = run_train(_args(data, fs, 6))
        assert again.returncode == 0 and "at step 4" in again.stderr, again.stderr[-3000:]
        assert _steps(run_dir) == ["2", "4", "6"]


def _flip_a_byte_in_step(run_dir, step) -> None:
    """One byte of the largest file of the step's parameter data, inverted."""
    d = os.path.join(run_dir, "checkpoints", str(step), "params", "ocdbt.process_0", "d")
    path = max((os.path.join(d, f) for f in os.listdir(d)), key=os.path.getsize)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def _orbax_params(run_dir, step):
    """The step's parameters as orbax alone reads them: no checksums verified."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"),
                                    item_names=("params", "train", "meta"))
    try:
        return manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore()))["params"]
    finally:
        manager.close()


def _infer(*args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": repo_pythonpath()}, capture_output=True,
                          text=True, timeout=timeout)


def test_a_flipped_byte_is_refused_by_name_or_skipped_when_told(trained, tmp_path):
    data, original = trained
    run_dir = _copy(trained, tmp_path)
    _flip_a_byte_in_step(run_dir, 4)
    # The fault fired, and orbax alone reads it without a word.
    good, bad = _orbax_params(str(original), 4), _orbax_params(run_dir, 4)
    differ = [k for (k, a), b in zip(jax.tree_util.tree_leaves_with_path(good), jax.tree.leaves(bad))
              if not np.array_equal(np.asarray(a), np.asarray(b))]
    assert differ
    checkpoints = os.path.join(run_dir, "checkpoints")
    before = _digest(checkpoints)

    refused = run_train(_args(data, tmp_path, 6))
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = _message(refused.stderr, "cannot resume: ")
    assert (f"the checkpoint of step 4 in {checkpoints} is damaged: {len(differ)} of its" in line
            and re.search(r"parameter arrays differs? from the checksums recorded", line)
            and f"Move {checkpoints}/4 aside to resume from step 2, or set "
                f"checkpoint.on_damage=previous" in line), line
    assert _digest(checkpoints) == before

    # infer.py verifies the same way, and names the steps it could read instead.
    seen = _infer("--run_dir", run_dir, "--step", "4", "--prompt", "Fi", "--max_new_tokens", "2")
    assert seen.returncode == 2, seen.stderr[-3000:]
    assert seen.stderr.count("\n") == 1 and "Traceback" not in seen.stderr, seen.stderr
    assert seen.stderr.startswith(f"infer: the checkpoint of step 4 in {checkpoints} is damaged")
    assert "(other steps there: [2]; pick one with --step)" in seen.stderr

    told = run_train(_args(data, tmp_path, 6, "--config.checkpoint.on_damage=previous"))
    assert told.returncode == 0, told.stderr[-3000:]
    warned = [line for line in told.stderr.splitlines() if "is damaged" in line]
    assert len(warned) == 1 and "Traceback" not in told.stderr, told.stderr[-3000:]
    assert ("Resuming from step 2, the newest intact checkpoint "
            f"(checkpoint.on_damage='previous'); set aside: {checkpoints}/4.damaged") in warned[0]
    assert _steps(run_dir) == ["2", "4", "4.damaged", "6"]
    # Step 4 trained again from step 2 is the undamaged step 4, bit for bit.
    _, again, _ = ckpt.restore_params(run_dir, 4)
    for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoints_without_checksums_resume_with_a_warning(trained, tmp_path):
    data, _ = trained
    run_dir = _copy(trained, tmp_path)
    meta_file = os.path.join(run_dir, "checkpoints", "4", "meta", "metadata")
    with open(meta_file) as f:
        meta = json.load(f)
    del meta["checksums"], meta["checksum_format"]  # as written before checksums were recorded
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    done = run_train(_args(data, tmp_path, 6))
    assert done.returncode == 0 and "at step 4" in done.stderr, done.stderr[-3000:]
    warned = [line for line in done.stderr.splitlines() if "without checksums" in line]
    assert len(warned) == 1, done.stderr[-3000:]
    assert (f"the checkpoint of step 4 in {run_dir}/checkpoints was written without checksums "
            "(by rwkv_jax before they were recorded): restored unverified") in warned[0]


@pytest.mark.parametrize("damage", ["truncated data", "damaged manifest"])
def test_a_damaged_step_read_by_infer_is_one_line(trained, tmp_path, damage):
    run_dir = _copy(trained, tmp_path)
    params = os.path.join(run_dir, "checkpoints", "4", "params")
    if damage == "truncated data":  # showed a pybind11 repr of tensorstore's spec
        d = os.path.join(params, "ocdbt.process_0", "d")
        path = max((os.path.join(d, f) for f in os.listdir(d)), key=os.path.getsize)
        os.truncate(path, 100)
    else:  # printed "Event loop is closed" tracebacks around the message
        path = os.path.join(params, "manifest.ocdbt")
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            f.write(b"\xff\x00\xff")
    seen = _infer("--run_dir", run_dir, "--step", "4", "--prompt", "Fi", "--max_new_tokens", "2")
    assert seen.returncode == 2, seen.stderr[-3000:]
    assert seen.stderr.count("\n") == 1, seen.stderr[-3000:]
    assert "Traceback" not in seen.stderr and "pybind11" not in seen.stderr, seen.stderr
    assert seen.stderr.startswith(f"infer: the checkpoint of step 4 in {run_dir}/checkpoints is "
                                  f"damaged (ValueError: "), seen.stderr
    assert "(other steps there: [2]; pick one with --step)" in seen.stderr
