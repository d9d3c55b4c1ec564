"""Training: the loop over chunk steps, with evaluation, checkpoints and Ctrl-C.

A sequence of `train.max_seq_length` tokens is trained in chunks of `memory.rwkv_chunk_size`;
each chunk is one optimizer step that takes the recurrent state the previous chunk left and
returns the next one. Batches are a pure function of (seed, step), and the carried state is part
of the checkpoint, so a run resumed from any checkpoint continues exactly as if it had never
stopped: bit for bit on CPUs, and on GPUs with XLA_FLAGS=--xla_gpu_deterministic_ops=true
(without it XLA's GPU kernels may sum in another order from run to run).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp

from rwkv_jax.config import (
    optimizer_config_from,
)
from rwkv_jax.config.layer_pattern import describe
from rwkv_jax.data.sources import Prefetcher
from rwkv_jax.evaluation.score import evaluate
from rwkv_jax.io.checkpoint import TrainCheckpointer
from rwkv_jax.nn import adapters
from rwkv_jax.nn.model import RWKV, count_params
from rwkv_jax.train import distributed, optim
from rwkv_jax.train.init import (
    compile_step,
    freeze_base,
    global_batch,
    init_train_state,
    make_optimizer,
    plan_shardings,
)
from rwkv_jax.train.memory import check_memory, peak_device_bytes
from rwkv_jax.train.metrics import (
    ScalarWriter,
    device_peak_flops,
    model_flops_per_token,
    postfix,
    progress_bar,
)
from rwkv_jax.train.run import (
    Run,
    lock_run_dir,
    resolve_horizon,
    restore_train_state,
    resume_step,
    run_shape,
    unlock_run_dir,
)
from rwkv_jax.train.sharding import TrainShardings
from rwkv_jax.train.step import (
    TrainingDiverged,
    TrainState,
    check_finite,
    make_train_step,
)

log = logging.getLogger("rwkv_jax")


# Called after every step with the number of steps done and a function that waits for the
# checkpoints being written: what a caller watches a run by (the tests send their signals so).
StepHook = Callable[[int, Callable[[], None]], None]


def train(run: Run, on_step: StepHook | None = None) -> dict:
    """Train (or resume) until train.steps; returns the final metrics."""
    main = distributed.is_main_process()  # logs, tensorboard and progress come from one process
    os.makedirs(run.run_dir, exist_ok=True)
    lock = lock_run_dir(run.run_dir) if main else None
    # Holding the run's lock, process 0 knows that whoever left a temporary there is gone.
    manager = TrainCheckpointer(os.path.join(run.run_dir, "checkpoints"),
                                     keep=run.cfg.checkpoint.keep,
                                     clean_temporaries=lock is not None)
    try:
        return _train(run, manager, main, on_step)
    finally:
        # Waits for saves in flight, and stops a failed restore's reads, which would print
        # tracebacks at exit.
        manager.close()
        unlock_run_dir(lock)


def _train(run: Run, manager: TrainCheckpointer, main: bool,
           on_step: StepHook | None) -> dict:
    cfg = run.cfg
    resume = resume_step(manager, run)
    if resume is not None and resume >= cfg.train.steps:
        log.info("%s is at step %d of train.steps=%d already: nothing to train",
                 manager.directory, resume, cfg.train.steps)
        return {k: v for k, v in manager.meta(resume).items() if isinstance(v, float)}
    if cfg.checkpoint.every == 0:
        log.warning("checkpoint.every=0: this run writes no checkpoint, not even at the end")
    optimizer, layout, ts, start = _start(run, manager, resume, main)
    float16 = run.model_config.dtype == "float16"
    report = _Report(run, start, main)
    steps = _StepFunctions(run, optimizer, layout, report)
    n_chunks = len(run.spans)
    masks = [jnp.asarray(m) for m in run.masks]  # on the device once, not once per step
    rows = distributed.process_rows(layout.batch, (cfg.train.batch_size, run.chunk_len))
    if jax.process_count() > 1:
        log.warning("process %d of %d loads rows %d:%d of each global batch of %d",
                    jax.process_index(), jax.process_count(), rows.start, rows.stop,
                    cfg.train.batch_size)
    batch_key, batch = None, None
    pending = None  # the previous step's metrics, read one step late so dispatch runs ahead
    metrics = None
    # This process's rows only; the global batch is the same for any process count.
    prefetch = Prefetcher(lambda s: run.batches(s, rows),
                          range(start // n_chunks, -(-cfg.train.steps // n_chunks)))
    t_loop = time.perf_counter()
    try:
        for step in range(start, cfg.train.steps):
            seq_step, chunk = divmod(step, n_chunks)
            if batch_key != seq_step:
                batch, batch_key = prefetch.get(seq_step), seq_step
            a, b = run.spans[chunk]
            shape = (cfg.train.batch_size, b - a)
            x, y, row_mask = batch
            mask = masks[chunk] if row_mask is None else global_batch(
                row_mask[:, a:b] * run.masks[chunk], layout.batch, shape)
            ts, metrics = steps(chunk)(ts, global_batch(x[:, a:b], layout.batch, shape),
                                       global_batch(y[:, a:b], layout.batch, shape), mask,
                                       run.base)
            if pending is not None:
                check_finite(pending, step, float16)
            pending = metrics
            report.window_tokens += run.tokens_per_step
            if on_step is not None:
                on_step(step + 1, manager.wait)
            done = step + 1
            if done % cfg.logging.every == 0 or done == cfg.train.steps:
                report.train_metrics(done, metrics, float16)
            report.progress.update(1)
            if _due(cfg.logging.eval_every, done, cfg.train.steps):
                report.evaluate(done, steps.weights(ts.params))
            if _due(cfg.checkpoint.every, done, cfg.train.steps):
                jax.block_until_ready(ts)
                check_finite(pending, done, float16)
                _save(manager, done, ts, run, report.last)
    except KeyboardInterrupt:
        _save_on_interrupt(run, manager, ts, metrics, report.last, start, float16)
        raise
    finally:
        prefetch.close()
        report.close()
    elapsed = time.perf_counter() - t_loop
    log.info("data: the loop waited %.2f s for batches, %.2f%% of its %.1f s", prefetch.waited,
             100 * prefetch.waited / max(elapsed, 1e-9), elapsed)
    return report.last


def _due(every: int, done: int, total: int) -> bool:
    """Whether something done every `every` steps (0: never) is due after step `done`; the last
    step always has it."""
    return every > 0 and (done % every == 0 or done == total)


def _start(run: Run, manager: TrainCheckpointer, resume: int | None, main: bool):
    """(optimizer, shardings, train state, first step): fresh, or restored from `resume`."""
    cfg, mc = run.cfg, run.model_config
    resolve_horizon(manager, resume, run)
    optimizer = make_optimizer(run)
    layout = plan_shardings(run, optimizer)
    check_memory(run, layout)
    ts, optimizer = init_train_state(run, jax.random.PRNGKey(cfg.seed), layout)
    if run.adapters is None:
        log.info("model: %s, %.2fM parameters, compute %s; %s", f"RWKV-{mc.version}",
                 count_params(ts.params) / 1e6, mc.dtype, describe(mc.layer_types))
    else:
        log.info("model: %s, %.2fM parameters (frozen, bf16), %.3fM trained (adapters), compute "
                 "%s; %s", f"RWKV-{mc.version}", count_params(run.base_weights) / 1e6,
                 count_params(ts.params) / 1e6, mc.dtype, describe(mc.layer_types))
    groups = optim.describe_groups(ts.params, optimizer_config_from(cfg))
    log.info("optimizer groups (tensors): %s",
             ", ".join(f"{label} {len(paths)}" for label, paths in groups.items()))
    if cfg.logging.verbose:
        for label, paths in groups.items():
            log.info("  %s: %s", label, ", ".join(paths))
    start = 0
    if resume is not None:
        ts = restore_train_state(manager, ts, resume, run)
        start = int(ts.step)
        log.info("resumed from %s at step %d", manager.directory, start)
    if run.adapters is not None:  # PiSSA's residual follows the (restored) initial factors
        freeze_base(run, ts.params, layout)
    # Written once the run is known to go on: a run refused above keeps the config it was
    # written with, which infer.py reads.
    if main:
        with open(os.path.join(run.run_dir, "config.json"), "w") as f:
            f.write(cfg.to_json_best_effort(indent=2))
    manager.save_model_config(mc, run.tokenizer.name, run_shape(run), run.adapter_record)
    return optimizer, layout, ts, start


class _StepFunctions:
    """The compiled step of each kind of chunk (the first, fresh state or not, and each state
    hand-off point), compiled on first use; compile time is kept out of throughput."""

    def __init__(self, run: Run, optimizer, layout: TrainShardings, report: _Report):
        self.run, self.optimizer, self.layout, self.report = run, optimizer, layout, report
        self.model = RWKV(run.model_config)
        self.donate = (0,) if run.cfg.efficiency.donate else ()
        self.float16 = run.model_config.dtype == "float16"
        self.compiled = {}
        spec = run.adapters
        self._merge = None if spec is None else jax.jit(
            lambda base, t: adapters.merge(base, t, spec, original=False, keep_dtypes=True))

    def weights(self, params):
        """The model's weights for evaluation: an adapter run's merged into its frozen base, in
        its dtypes (one more copy of the base's size, which the memory plan counts)."""
        return params if self._merge is None else self._merge(self.run.base, params)

    def __call__(self, chunk: int):
        key = (chunk == 0, self.run.handoffs[chunk])
        if key not in self.compiled:
            t = time.perf_counter()
            fn = make_train_step(self.model, self.optimizer, fresh=key[0], handoff=key[1],
                                 float16=self.float16, adapters=self.run.adapters,
                                 seed=self.run.cfg.seed)
            self.compiled[key] = compile_step(fn, self.run, self.layout, self.donate,
                                              first=not self.compiled)
            self.report.window_t += time.perf_counter() - t  # compiling is not training
        return self.compiled[key]


class _Report:
    """What a run says as it goes: train metrics over a window of steps (throughput, MFU, peak
    memory), evaluation, tensorboard and the progress bar; `last` is the newest of each."""

    def __init__(self, run: Run, start: int, main: bool):
        cfg, mc = run.cfg, run.model_config
        self.run = run
        self.schedule = optim.make_schedule(optimizer_config_from(cfg))
        self.flops_per_token = model_flops_per_token(mc, run.chunk_len)
        self.peak = device_peak_flops() if jax.default_backend() != "cpu" else None
        tb = os.path.join(run.run_dir, "tb") if cfg.logging.tensorboard and main else None
        self.writer = ScalarWriter(tb)
        self.progress = progress_bar(cfg, start, enabled=main)
        self.window_t, self.window_tokens = time.perf_counter(), 0
        self.last = {}

    def train_metrics(self, done: int, metrics, float16: bool) -> None:
        jax.block_until_ready(metrics)
        check_finite(metrics, done, float16)
        tps = self.window_tokens / (time.perf_counter() - self.window_t)
        last = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                "lr": float(self.schedule(done - 1)), "tokens_per_sec": tps}
        if self.peak:
            last["mfu"] = tps * self.flops_per_token / self.peak
        used = peak_device_bytes()
        if used:
            last["peak_gib"] = used / 2**30
        self.last = last
        self.writer.scalars(done, last, "train")
        self.progress.set_postfix(postfix(last))
        if not self.run.cfg.logging.progress:
            log.info("step %d: %s", done, postfix(last))
        self.window_t, self.window_tokens = time.perf_counter(), 0

    def evaluate(self, done: int, params) -> None:
        t = time.perf_counter()
        run = self.run
        ev = evaluate(run.model_config, params, run.val_tokens, run.chunk_len,
                      run.cfg.logging.eval_tokens or None)
        bpb = ev["bpb"]  # None where the source does not know its bytes
        known = bpb is not None
        self.writer.scalars(done, {"loss": ev["loss"], **({"bpb": bpb} if known else {})}, "val")
        log.info("step %d: val loss %.4f nats/token%s (%d tokens%s)", done, ev["loss"],
                 f", {bpb:.4f} bits/byte" if known else "", ev["tokens"],
                 f" trained in {ev['documents']} documents" if "documents" in ev else "")
        self.last.update(val_loss=ev["loss"], **({"val_bpb": bpb} if known else {}))
        self.window_t += time.perf_counter() - t  # evaluation is not training throughput

    def close(self) -> None:
        self.progress.close()
        self.writer.close()


def _save(manager: TrainCheckpointer, step: int, ts: TrainState, run: Run, last: dict):
    manager.save(step, ts, {"tokens_seen": step * run.tokens_per_step,
                            "total_steps": int(run.cfg.optimizer.total_steps),
                            **{k: float(v) for k, v in last.items()}})


def _save_on_interrupt(run: Run, manager: TrainCheckpointer, ts: TrainState, metrics,
                       last: dict, start: int, float16: bool) -> None:
    """Ctrl-C keeps the steps trained since the newest checkpoint, so that the same command
    resumes from where it stopped (bit for bit, as from any checkpoint)."""
    if run.cfg.checkpoint.every == 0:
        return
    if jax.process_count() > 1:
        # A save is collective, and the other processes may not have been interrupted.
        log.warning("interrupted: with several processes nothing is saved past the newest "
                    "checkpoint")
        return
    if any(x.is_deleted() for x in jax.tree_util.tree_leaves(ts) if isinstance(x, jax.Array)):
        # The interrupt came between a step taking its (donated) inputs and handing back
        # its outputs: there is no whole state to save.
        log.warning("interrupted inside a step: nothing saved past the newest checkpoint")
        return
    manager.wait()
    step = int(ts.step)
    if step <= max(start, manager.latest_step() or 0) or metrics is None:
        return
    try:
        check_finite(metrics, step, float16)
    except TrainingDiverged as e:
        log.warning("interrupted: step %d not saved: %s", step, e)
        return
    log.warning("interrupted: saving step %d (Ctrl-C again abandons the save)", step)
    _save(manager, step, ts, run, last)
    manager.wait()
    log.warning("saved step %d in %s", step, manager.directory)
