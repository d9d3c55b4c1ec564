"""Training checkpoints (orbax): parameters, optimizer state, the carried recurrent state, the
step (which fixes the data position: batches are a function of (seed, step)), and a JSON record
with the model config, so infer.py can rebuild the model from the checkpoint alone.

orbax writes each step to a temporary directory and renames it when complete, so a process
killed mid-save never leaves a checkpoint that looks whole; integrity.py checks what it reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from rwkv_jax.config import ModelConfig
from rwkv_jax.io.integrity import (
    CHECKSUM_FORMAT,
    CheckpointWriteError,
    cause_line,
    check_finite_params,
    damage_error,
    quiet_abandoned_io,
    quiet_orbax_write_errors,
    tree_checksums,
    tree_dtypes,
    verify_checksums,
    write_failure,
)
from rwkv_jax.io.official import import_official
from rwkv_jax.nn import adapters
from rwkv_jax.nn.model import param_shapes


def _abstract(tree):
    def spec(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(spec, tree)


class TrainCheckpointer:
    """Save every N steps, keep the last k, restore the newest (onto the template's shardings).

    clean_temporaries: remove the temporaries of unfinished saves found in the directory (a
    killed run's) before the first save; only for the process that owns the run directory
    (lock_run_dir), so that no live writer's temporary is taken. In a run of several
    processes orbax leaves it to process 0."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3,
                 clean_temporaries: bool = False):
        quiet_orbax_write_errors()
        quiet_abandoned_io()
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=clean_temporaries,
                # The step's directories are made in save() itself, so that a directory that
                # cannot be written fails there. Made in the background (orbax's default),
                # the failure left the save's other threads waiting for a "directories made"
                # signal that never came, and Python waited for them at exit: a hang.
                async_options=ocp.AsyncOptions(create_directories_asynchronously=False)),
            item_names=("params", "train", "meta"),
        )
        self._in_flight = None  # the step whose save may still be running in the background
        self._failure = None  # the CheckpointWriteError once a save has failed

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def meta(self, step: int | None = None) -> dict:
        """The record saved beside a step's arrays (default: newest), without reading them."""
        return _read_meta(self._manager, self.latest_step() if step is None else step)

    def save(self, step: int, train_state, meta: dict) -> None:
        """Start saving `step` (the writes go on in the background); CheckpointWriteError if
        this save, or the one before still in flight, cannot be written."""
        params, rest = _split(train_state)
        checksums = {"params": tree_checksums(params), "train": tree_checksums(rest)}
        dtypes = {"params": tree_dtypes(params), "train": tree_dtypes(rest)}
        self._guarded(lambda: self._manager.wait_until_finished())
        self._in_flight = step
        self._guarded(lambda: self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            train=ocp.args.StandardSave(rest),
            meta=ocp.args.JsonSave({**self._meta, **meta, "step": int(step),
                                    "checksum_format": CHECKSUM_FORMAT,
                                    "checksums": checksums, "checksum_dtypes": dtypes}),
        )))

    _meta: dict = {}

    def save_model_config(self, model_config: ModelConfig, tokenizer: str,
                          run_shape: dict | None = None, adapters: dict | None = None) -> None:
        """What every later save records beside the arrays (run_shape: run_shape; adapters:
        an adapter run's spec and its base's path and fingerprint, see adapter_record)."""
        self._meta = {"model_config": model_config.to_dict(), "tokenizer": tokenizer,
                      "format": "rwkv_jax/1", **({"run_shape": run_shape} if run_shape else {}),
                      **({"adapters": adapters} if adapters else {})}

    def restore(self, template, step: int | None = None):
        """(train_state, meta) of `step` (default: newest), shaped and sharded like `template`;
        DamagedCheckpointError if an array differs from its recorded checksum."""
        quiet_abandoned_io()
        step = self.latest_step() if step is None else step
        params, rest = _split(template)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(params)),
                train=ocp.args.StandardRestore(_abstract(rest)),
                meta=ocp.args.JsonRestore(),
            ))
        except Exception as e:  # noqa: BLE001 - damaged, or another tree than the template's
            damage = damage_error(e, step, self.directory)
            if damage is None:
                raise
            raise damage from None
        for item in ("params", "train"):
            verify_checksums(out[item], out["meta"], item, step, self.directory)
        return template.replace(params=out["params"], **out["train"]), out["meta"]

    def set_aside(self, step: int) -> str:
        """Rename a step's directory out of orbax's sight (`<step>.damaged`, kept for a look),
        so that the run can write that step again; returns the new path."""
        src = os.path.join(self.directory, str(step))
        dst, n = f"{src}.damaged", 1
        while os.path.exists(dst):
            dst, n = f"{src}.damaged{n}", n + 1
        if jax.process_index() == 0:
            os.rename(src, dst)
        if jax.process_count() > 1:  # the others list the steps once it is gone
            multihost_utils.sync_global_devices(f"rwkv_jax set aside step {step}")
        self._manager.reload()
        return dst

    def wait(self) -> None:
        self._guarded(lambda: self._manager.wait_until_finished())

    def close(self) -> None:
        if self._failure is not None:  # reported once; orbax would raise it again
            return
        self._guarded(lambda: self._manager.close())

    def _guarded(self, call) -> None:
        """`call()`, with a failed write turned into CheckpointWriteError: one line naming the
        step, the directory and the cause, after the step's temporary is removed."""
        if self._failure is not None:
            raise self._failure
        try:
            call()
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds
            cause = write_failure(e)
            if cause is None:
                raise
            self._failure = self._write_error(cause)
            raise self._failure from None

    def _write_error(self, cause: str) -> CheckpointWriteError:
        step = self._in_flight
        if jax.process_index() == 0:  # one process removes what all wrote into
            _join_orbax_threads(timeout=30.0)
            tmp = ocp.path.atomicity_types.TMP_DIR_SUFFIX
            for name in os.listdir(self.directory) if os.path.isdir(self.directory) else ():
                if name.startswith(f"{step}{tmp}"):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        kept = sorted(s for s in self.all_steps() if s != step)
        return CheckpointWriteError(
            f"cannot write the checkpoint of step {step} in {self.directory}: {cause}. "
            + (f"The checkpoints of steps {kept} are kept: make room there (space or inodes, or make it "
               f"writable) and the same command resumes from step {kept[-1]}." if kept else
               "No earlier checkpoint is there: make room (space or inodes, or make it writable) and run "
               "again."))


def _join_orbax_threads(timeout: float) -> None:
    """Wait (up to `timeout` s in all) for orbax's save threads that are still running after
    one of them failed, so that none writes into the temporary once it is removed."""
    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t is not threading.current_thread() and type(t).__module__.startswith("orbax."):
            # Thread's own join: orbax's raises the thread's exception, reported already.
            threading.Thread.join(t, max(0.0, deadline - time.monotonic()))


def _split(train_state):
    rest = {f: getattr(train_state, f) for f in ("step", "opt_state", "carry", "loss_scale", "good_steps")}
    return train_state.params, rest


def find_checkpoint_dir(path: str | os.PathLike) -> str:
    """A run directory (holding checkpoints/) or the checkpoints directory itself."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path!r}")
    return path


def _read_meta(manager, step: int) -> dict:
    """The JSON record an orbax manager of ours holds beside a step's arrays."""
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def model_config_of(meta: dict) -> ModelConfig:
    """The ModelConfig a checkpoint's record holds (fields added since it was written take
    their defaults); KeyError, TypeError or ValueError if it holds none that is valid."""
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in meta["model_config"].items()})


def base_fingerprint(path: str | os.PathLike) -> str:
    """What identifies an adapter run's base: the sha256 of a .pth file, or of the recorded
    checksums of a run's newest checkpoint (its arrays' own fingerprints)."""
    path = os.fspath(path)
    h = hashlib.sha256()
    if os.path.isfile(path):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        return h.hexdigest()
    directory = find_checkpoint_dir(path)
    manager = ocp.CheckpointManager(directory, item_names=("params", "train", "meta"))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{directory!r} holds no complete checkpoint")
    meta = _read_meta(manager, step)
    manager.close()
    h.update(json.dumps({"step": step, "checksums": meta.get("checksums", {}).get("params")},
                        sort_keys=True).encode())
    return h.hexdigest()


def adapter_record(spec: adapters.AdapterSpec, base: str, fingerprint: str) -> dict:
    """What an adapter run's checkpoints record: the spec, and the base they need (they hold
    only the adapters), by path and fingerprint."""
    return {**spec.record(), "base": os.path.abspath(base), "base_sha256": fingerprint}


def spec_of(record: dict) -> adapters.AdapterSpec:
    return adapters.AdapterSpec(record["method"], int(record["rank"]), float(record["alpha"]),
                                float(record["dropout"]), tuple(record["targets"]))


def read_base(record: dict, base: str | None = None) -> tuple[ModelConfig, dict]:
    """(config, float32 params) of an adapter run's base: its recorded path, or `base` where
    the file has moved; ValueError if it is gone or no longer the file the run trained on."""
    path = base or record["base"]
    if not os.path.exists(path):
        raise FileNotFoundError(f"the base of these adapters, {path!r}, is gone; pass its new "
                                f"path (infer.py --base)")
    found = base_fingerprint(path)
    if found != record["base_sha256"]:
        raise ValueError(f"{path!r} is not the base these adapters were trained on (sha256 "
                         f"{found[:12]}..., the run recorded {record['base_sha256'][:12]}...)")
    if os.path.isfile(path):
        return import_official(path)
    config, params, _ = restore_params(path)
    return config, params


def restore_params(path: str | os.PathLike, step: int | None = None, shardings=None, *,
                   base: str | None = None, merged: bool = True
                   ) -> tuple[ModelConfig, dict, dict]:
    """(model_config, params, meta) from a training checkpoint, without the optimizer state.

    `shardings`: a tree of jax.sharding.Sharding like the params (default: one local device).
    DamagedCheckpointError (a ValueError) if an array differs from its recorded checksum.
    An adapter run's checkpoint gives its adapters merged into its base's float32 weights
    (read again from `base`, default the recorded path), or with merged=False the adapter tree.
    """
    quiet_abandoned_io()
    directory = find_checkpoint_dir(path)
    manager = ocp.CheckpointManager(directory, item_names=("params", "train", "meta"))
    steps = list(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"{directory!r} holds no complete checkpoint")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {directory!r}; steps there: {sorted(steps)}")
    try:
        meta = _read_meta(manager, step)
        config = model_config_of(meta)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        raise ValueError(f"checkpoint {directory!r} step {step} has no readable model record: {e}") from None
    record = meta.get("adapters")
    abstract = param_shapes(config)
    if record:  # the adapters alone: their shapes follow from the model's and the spec
        spec = spec_of(record)
        where = adapters.plan(abstract, spec)
        abstract = jax.eval_shape(lambda p, k: adapters.init(p, spec, where, k), abstract,
                                  jax.random.PRNGKey(0))
        shardings = None
    # Restore onto this process's first device whatever topology wrote the checkpoint (orbax
    # needs target shardings once the writer's differ); pass `shardings` to place it otherwise.
    if shardings is None:
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: here, abstract)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, shardings)
    try:
        params = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract)))["params"]
    except Exception as e:  # noqa: BLE001 - orbax reports a mismatch or corruption in many ways
        raise damage_error(e, step, directory) or ValueError(
            f"checkpoint {directory!r} step {step} could not be restored as the model it records "
            f"({cause_line(e)})") from None
    manager.close()
    verify_checksums(params, meta, "params", step, directory)
    check_finite_params(params, f"checkpoint {directory!r} step {step}")
    if record and merged:
        _, weights = read_base(record, base)
        params = jax.jit(lambda w, t: adapters.merge(w, t, spec, original=True))(weights, params)
    return config, params, meta
