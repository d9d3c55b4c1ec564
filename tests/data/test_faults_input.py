"""Faults in what runs are given (issue 30, items 3, 4, 5, 8 and --official DIR of 9): weights
that are not finite floats, token ids outside the vocabulary, damaged token-cache metadata and
the temporaries of killed tokenizers, several processes with no way to meet. Each is made for
real (a crafted .pth, token file or checkpoint), run through train.py or infer.py, and must
end in one line naming the bad thing, before anything compiles, with nothing written lost."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, TEXT, random_official_state_dict, repo_pythonpath, run_train

from rwkv_jax import data as data_lib
from rwkv_jax import io as ckpt
from rwkv_jax import train as trainer
from rwkv_jax.cli import infer
from rwkv_jax.config import ConfigError, ModelConfig
from rwkv_jax.data import tokens as token_files
from rwkv_jax.nn.model import init_params
from rwkv_jax.train import distributed

torch = pytest.importorskip("torch", reason="crafted official checkpoints need torch")

# A byte-level model small enough that a train.py run is mostly starting Python and JAX.
TINY = ModelConfig(vocab_size=256, n_layer=1, n_embd=32)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("faults_input")


@pytest.fixture(scope="module")
def corpus(tmp):
    (tmp / "train.txt").write_text(TEXT)
    (tmp / "val.txt").write_text(TEXT[:600])
    return tmp / "train.txt", tmp / "val.txt"


def _train_args(out, train, val, **overrides):
    """train.py's command line for a tiny model (1 layer of 32, batch 2 of 16 tokens)."""
    settings = {"model.n_layer": 1, "model.n_embd": 32, "train.batch_size": 2,
                "train.max_seq_length": 16, "memory.rwkv_chunk_size": 16, "train.steps": 2,
                "optimizer.warmup_steps": 0, "logging.every": 1, "logging.eval_every": 2,
                "logging.eval_tokens": 64, "logging.progress": False,
                "logging.tensorboard": False, "checkpoint.every": 2, "output_dir": out,
                "data.train_file": train, "data.val_file": val, **overrides}
    return ["--config=configs/tiny.py"] + [f"--config.{k}={v}" for k, v in settings.items()]


def _infer(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": repo_pythonpath()},
                          capture_output=True, text=True, timeout=240)


def _refusal(out, prefix: str, status: int = 2) -> str:
    """The one line a refused run ends with (after the log lines of what it did before)."""
    assert out.returncode == status, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith(prefix), out.stderr[-3000:]
    assert sum(prefix in line for line in lines) == 1, out.stderr[-3000:]
    return lines[-1]


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ------------------------------------------------------------------ item 3: weights


@pytest.fixture(scope="module")
def damaged_official(tmp):
    """Random official RWKV-4 .pth files of the TINY model: one NaN, one -Inf, one int64
    tensor."""
    paths = {}
    for kind in ("nan", "inf", "int"):
        sd = random_official_state_dict(vocab=256, n_embd=32, n_layer=1, dim_ffn=128)
        if kind == "nan":
            sd["blocks.0.att.key.weight"][3, 5] = float("nan")
        elif kind == "inf":
            sd["head.weight"][7, 1] = float("-inf")
        else:
            sd["blocks.0.ffn.value.weight"] = sd["blocks.0.ffn.value.weight"].to(torch.int64)
        paths[kind] = tmp / f"{kind}.pth"
        torch.save(sd, paths[kind])
    return paths


def test_official_weights_not_finite_or_not_float_are_refused_by_name(damaged_official):
    nan, inf, ints = damaged_official["nan"], damaged_official["inf"], damaged_official["int"]
    # The faults are in the files as torch reads them.
    assert torch.isnan(torch.load(nan, weights_only=True)["blocks.0.att.key.weight"][3, 5])
    assert torch.isinf(torch.load(inf, weights_only=True)["head.weight"][7, 1])
    assert torch.load(ints, weights_only=True)["blocks.0.ffn.value.weight"].dtype == torch.int64

    for path, message in [
        (inf, "tensor 'head.weight' holds 0 NaN and 1 infinite value(s), the first at index (7, 1)"),
        (ints, "tensor 'blocks.0.ffn.value.weight' is int64; the weights of an RWKV checkpoint "
               "are floating point"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ckpt.import_official(path)

    # infer.py generated "\0" x 8 from the NaN file, with exit status 0.
    before = _digest(nan)
    out = _infer("--official", str(nan), "--prompt", "First", "--max_new_tokens", "8")
    line = _refusal(out, "infer: ")
    assert out.stderr.strip() == line and out.stdout == ""
    assert (f"'{nan}': tensor 'blocks.0.att.key.weight' holds 1 NaN and 0 infinite value(s), "
            f"the first at index (3, 5)") in line
    assert _digest(nan) == before


def test_init_from_weights_not_finite_or_not_float_are_refused_before_compiling(
        tmp, corpus, damaged_official, capsys):
    ints = damaged_official["int"]
    assert torch.load(ints, weights_only=True)["blocks.0.ffn.value.weight"].dtype == torch.int64
    out_dir = tmp / "init_from_int"
    # It stopped at step 1 with "lower optimizer.lr".
    out = run_train(_train_args(out_dir, *corpus, **{"train.init_from": ints}))
    line = _refusal(out, "config error: ")
    assert (f"config error: train.init_from='{ints}' cannot be read: '{ints}': tensor "
            f"'blocks.0.ffn.value.weight' is int64") in line
    assert "XLA's plan for the train step" not in out.stderr  # refused before the step compiled
    run_dir = out_dir / "tiny"
    assert not (run_dir / "config.json").exists()
    assert ckpt.TrainCheckpointer(run_dir / "checkpoints").all_steps() == []

    # A training run's checkpoint whose params hold a NaN, as init_from and for infer.py.
    params = init_params(TINY, jax.random.PRNGKey(0))
    kernel = params["blocks_0"]["att"]["key"]["kernel"]
    params["blocks_0"]["att"]["key"]["kernel"] = kernel.at[1, 2].set(jnp.nan)
    nan_run = tmp / "nan_run"
    manager = ckpt.TrainCheckpointer(nan_run / "checkpoints")
    manager.save_model_config(TINY, "byte")
    zero = jnp.zeros(())
    state = trainer.TrainState(step=jnp.int32(4), params=params, opt_state=zero, carry=zero,
                               loss_scale=zero, good_steps=jnp.int32(0))
    manager.save(4, state, {})
    manager.wait()
    saved, _ = manager.restore(state)  # the NaN is in the checkpoint as orbax reads it back
    manager.close()
    assert np.isnan(np.asarray(saved.params["blocks_0"]["att"]["key"]["kernel"])).sum() == 1
    array = "params['blocks_0']['att']['key']['kernel'] holds NaN or Inf values"
    fresh = init_params(TINY, jax.random.PRNGKey(1))
    with pytest.raises(ConfigError) as refused:
        trainer.load_initial_weights(str(nan_run), fresh, TINY)
    assert str(refused.value).startswith(f"train.init_from='{nan_run}' cannot be read: checkpoint ")
    assert f"step 4: {array}" in str(refused.value)
    capsys.readouterr()
    assert infer.main(["--run_dir", str(nan_run), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("infer: checkpoint ") and array in err and "\n" not in err
    assert ckpt.TrainCheckpointer(nan_run / "checkpoints").all_steps() == [4]


# ------------------------------------------------------------------ item 4: token ids


def _damage_id(path, offset: int, value: int) -> int:
    """Writes `value` over the token at `offset` of a token file, in place (as damage does);
    returns the id that was there."""
    tokens = np.memmap(path, dtype="<u2", mode="r+")
    was = int(tokens[offset])
    tokens[offset] = value
    tokens.flush()
    del tokens
    return was


def test_an_id_outside_the_vocabulary_is_refused_until_the_file_is_fixed(tmp, corpus):
    val_bin = tmp / "val_ids.bin"
    data_lib.prepare_tokens(corpus[1], "byte", val_bin)
    out_dir = tmp / "ids"
    args = _train_args(out_dir, corpus[0], val_bin, **{"data.cache_dir": tmp / "ids_cache"})
    was = _damage_id(val_bin, 100, 300)
    assert np.fromfile(val_bin, "<u2")[100] == 300
    assert json.loads((tmp / "val_ids.bin.json").read_text())["max_token_id"] < 256
    # It trained, evaluated to NaN and exited 0 (or stopped with the learning-rate advice
    # at every resume, when the id was in the training data).
    text_before = _digest(val_bin)
    out = run_train(args)
    line = _refusal(out, "config error: ")
    assert (f"config error: data.val_file='{val_bin}': {val_bin} holds token id 300 at token 100 "
            f"(byte 200), outside the vocabulary of 256 (ids 0 to 255)") in line
    assert not out_dir.exists() and _digest(val_bin) == text_before  # refused before anything

    time.sleep(0.01)  # a modification time of its own on file systems of coarse clocks
    mtime = val_bin.stat().st_mtime_ns
    _damage_id(val_bin, 100, was)  # fixed: the changed file is read again, and the run goes on
    assert val_bin.stat().st_mtime_ns != mtime
    out = run_train(args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Checking the token ids of {val_bin}" in out.stderr
    assert "val loss nan" not in out.stderr and "val loss" in out.stderr
    assert ckpt.TrainCheckpointer(out_dir / "tiny" / "checkpoints").all_steps() == [2]


def test_ids_are_read_once_per_version_of_a_file_and_in_bounded_blocks(tmp, corpus,
                                                                        monkeypatch):
    scans = []
    real_scan = token_files._scan_ids
    monkeypatch.setattr(token_files, "_scan_ids", lambda t: scans.append(len(t)) or real_scan(t))
    monkeypatch.setattr(token_files, "SCAN_BLOCK_TOKENS", 7)  # blocks: the bad id is in the 15th
    cache = tmp / "scan_cache"
    tf = data_lib.prepare_tokens(corpus[1], "byte", tmp / "scan.bin")
    assert tf.dtype == np.dtype("<u2")  # could hold an id past 255: it is read

    data_lib.check_token_ids(tf, 256, cache)
    data_lib.check_token_ids(data_lib.TokenFile(tmp / "scan.bin"), 256, cache)
    assert scans == [tf.num_tokens]  # the second time, the record in the cache answered
    # Where the dtype cannot hold an id past the vocabulary, nothing is read.
    data_lib.check_token_ids(tf, 65536, cache)
    np.frombuffer(TEXT[:600].encode(), np.uint8).tofile(tmp / "bytes.bin")
    meta = {**tf.meta, "dtype": "uint8"}
    (tmp / "bytes.bin.json").write_text(json.dumps(meta))
    data_lib.check_token_ids(data_lib.TokenFile(tmp / "bytes.bin"), 256, cache)
    assert scans == [tf.num_tokens]

    time.sleep(0.01)
    _damage_id(tmp / "scan.bin", 100, 256)  # a changed file is read again
    with pytest.raises(ValueError, match=r"scan.bin holds token id 256 at token 100 \(byte 200\), "
                                         r"outside the vocabulary of 256"):
        data_lib.check_token_ids(data_lib.TokenFile(tmp / "scan.bin"), 256, cache)
    assert scans == [tf.num_tokens] * 2


def test_damage_in_the_token_cache_is_named(tmp, corpus):
    from conftest import tiny_config

    cfg = tiny_config(tmp / "cache_damage", tuple(map(str, corpus)))
    run = trainer.prepare(cfg)
    cached = run.train_tokens.path  # the trainer's token cache of train.txt
    assert cached.parent == tmp / "cache_damage" / "runs" / "data"
    time.sleep(0.01)
    _damage_id(cached, 1234, 999)
    assert np.fromfile(cached, "<u2")[1234] == 999
    with pytest.raises(ConfigError, match=rf"data.train_file='{corpus[0]}': {cached} holds token "
                                          rf"id 999 at token 1234 \(byte 2468\), outside the "
                                          rf"vocabulary of 256"):
        trainer.prepare(cfg)


# ------------------------------------------------------------------ item 5: token cache


def test_damaged_cache_metadata_is_rebuilt(tmp, corpus):
    out = tmp / "meta_cache" / "val.byte.bin"
    clean = data_lib.prepare_tokens(corpus[1], "byte", out)
    want, meta_path = np.array(clean.tokens), token_files.metadata_path(out)
    good = json.loads(meta_path.read_text())
    damages = {
        "a key missing": {k: v for k, v in good.items() if k != "num_tokens"},
        "a JSON list": list(good.items()),
        "an unknown dtype": {**good, "dtype": "uint17"},
        "a float dtype": {**good, "dtype": "float32"},
        "a count that is text": {**good, "max_token_id": "122"},
    }
    for what, damaged in damages.items():
        meta_path.write_text(json.dumps(damaged))
        # As a file a user brings, it is named in one line (there is no text to rebuild it from).
        with pytest.raises(ValueError, match=f"the metadata of {out}, {meta_path}, is damaged: "):
            data_lib.TokenFile(out)
        # As the token cache of a text file, it is stale: rebuilt.
        tf = data_lib.prepare_tokens(corpus[1], "byte", out)
        np.testing.assert_array_equal(np.array(tf.tokens), want, err_msg=what)
        assert json.loads(meta_path.read_text()) == good, what
    # A cache file cut short is stale as well.
    with open(out, "r+b") as f:
        f.truncate(10)
    assert np.array_equal(np.array(data_lib.prepare_tokens(corpus[1], "byte", out).tokens), want)


def _gone_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_damaged_cache_and_killed_tokenizers_leftovers_are_cleaned_by_the_next_run(tmp, corpus):
    cache = tmp / "shared_cache"
    cached = cache / "train.byte.bin"
    tokens = np.array(data_lib.prepare_tokens(corpus[0], "byte", cached).tokens)
    meta_path = token_files.metadata_path(cached)
    meta_path.write_text(json.dumps(list(json.loads(meta_path.read_text()).items())))
    with pytest.raises(ValueError, match="holds a JSON list, not an object"):
        data_lib.TokenFile(cached)  # it tracebacked with AttributeError: 'list' object ...
    host = token_files._writer_tag().rpartition("-")[0]
    dead, alive = _gone_pid(), os.getpid()
    leftovers = {  # name: removed?
        f".train.byte.bin.{host}-{dead}.k1ll3d0.tmp": True,
        f".train.byte.bin.json.{host}-{dead}.k1ll3d1.tmp": True,
        f".train.byte.bin.{host}-{alive}.writing.tmp": False,  # a run tokenizing right now
        f".train.byte.bin.otherhost-{dead}.remote.tmp": False,  # a pid of another machine
        f".other.byte.bin.{host}-{dead}.notmine.tmp": False,  # another file's: its run cleans
    }
    for name in leftovers:
        (cache / name).write_bytes(b"\0" * 64)
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)  # the writer really is gone
    out = run_train(_train_args(tmp / "after_kill", *corpus, **{"data.cache_dir": cache,
                                                               "logging.eval_every": 0}))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert isinstance(json.loads(meta_path.read_text()), dict)  # rebuilt, to the same tokens
    np.testing.assert_array_equal(np.array(data_lib.TokenFile(cached).tokens), tokens)
    for name, removed in leftovers.items():
        assert (cache / name).exists() != removed, name
    assert ckpt.TrainCheckpointer(tmp / "after_kill" / "tiny" / "checkpoints").all_steps() == [2]


# ------------------------------------------------------------------ item 8: processes


def test_several_processes_with_nothing_to_meet_at_are_refused(tmp, corpus, monkeypatch):
    for var in ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.detected_cluster() is None
    out_dir = tmp / "two_alone"
    # It trained as one process without a word.
    out = run_train(_train_args(out_dir, *corpus, **{"dist.num_processes": 2}))
    line = _refusal(out, "config error: ")
    assert out.stderr.strip() == line
    assert line.startswith("config error: dist.num_processes=2 needs "
                           "dist.coordinator_address=HOST:PORT")
    assert not out_dir.exists()
    # The defaults (one process) go on; a process id alone is refused as well.
    from ml_collections import ConfigDict

    from rwkv_jax.config import default_config

    dist = ConfigDict(default_config().dist.to_dict())
    assert distributed.initialize(dist) is False
    dist.process_id = 1
    with pytest.raises(ValueError, match=r"^dist.process_id=1 needs dist.coordinator_address"):
        distributed.initialize(dist)


# ------------------------------------------------------------------ item 9: --official DIR


def test_official_directory_is_named_as_a_directory(tmp):
    folder = tmp / "a_folder"
    folder.mkdir()
    assert folder.is_dir()
    # It said "no official checkpoint at".
    out = _infer("--official", str(folder), "--prompt", "x")
    line = _refusal(out, "infer: ")
    assert out.stderr.strip() == line
    assert line == (f"infer: --official '{folder}' is a directory; it takes an official RWKV .pth "
                    f"file (a training run's directory goes to --run_dir)")
    with pytest.raises(ValueError, match="is a directory; an official checkpoint is one .pth file"):
        ckpt.import_official(folder)
