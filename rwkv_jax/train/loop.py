"""Training: the jitted chunk step, streaming evaluation, and the loop.

A sequence of `train.max_seq_length` tokens is trained in chunks of `memory.rwkv_chunk_size`;
each chunk is one optimizer step that takes the recurrent state the previous chunk left and
returns the next one (no gradient flows between chunks: truncated backprop through time).
Batches are a pure function of (seed, step), and the carried state is part of the checkpoint,
so a run resumed from any checkpoint continues exactly as if it had never stopped: bit for bit
on CPUs, and on GPUs with XLA_FLAGS=--xla_gpu_deterministic_ops=true (without it, XLA's GPU
kernels may sum in another order from run to run: a straight and a resumed tiny run differed in
the last bit of their weights on an H200).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import warnings
from functools import partial
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rwkv_jax import checkpoint as ckpt
from rwkv_jax import data as data_lib
from rwkv_jax import distributed, hybrid, optim
from rwkv_jax import sharding as shd
from rwkv_jax import state_codec
from rwkv_jax.config import (ConfigError, ModelConfig, model_config_from, model_differences,
                             optimizer_config_from, validate)
from rwkv_jax.model import RWKV, count_params, param_shapes
from rwkv_jax.state import init_state

log = logging.getLogger("rwkv_jax")

# Dense bf16 peak of the chips we know, for MFU (FLOP/s).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5": 459e12}

# Called after every step with the number of steps done and a function that waits for the
# checkpoints being written: what a caller watches a run by (the tests send their signals so).
StepHook = Callable[[int, Callable[[], None]], None]


class ResumeError(RuntimeError):
    """The run directory holds checkpoints this config cannot continue from."""


_NEW_RUN = ("Resume with the settings they were written with, or start a new run elsewhere "
            "(another experiment_name or output_dir).")


def run_shape(run: Run) -> dict:
    """What the training state's shape and meaning depend on besides the model: the carried
    state has a row per sequence of the batch, and a step is a chunk of a sequence."""
    cfg = run.cfg
    return {"train.batch_size": cfg.train.batch_size,
            "train.max_seq_length": cfg.train.max_seq_length,
            "memory.rwkv_chunk_size": run.chunk_len,
            "memory.chunk_overlap": cfg.memory.chunk_overlap if cfg.memory.use_rwkv_chunking else 0,
            "train.trainable": cfg.train.trainable}


def _resume_step(manager: ckpt.TrainCheckpointer, run: Run) -> int | None:
    """The step to resume from (None: a fresh run), or why this run cannot go on here."""
    cfg = run.cfg
    steps = manager.all_steps()
    if not steps:
        return None
    if not cfg.checkpoint.resume:
        raise ConfigError(f"checkpoint.resume=False, but {manager.directory} holds the checkpoints "
                          f"of a run (steps {sorted(steps)}), which this one would overwrite or "
                          f"mix with: start it elsewhere (another experiment_name or output_dir), "
                          f"or move them away")
    step = max(steps)
    _check_resumable(manager, step, run)
    if step > cfg.train.steps:
        raise ConfigError(f"train.steps={cfg.train.steps} is below the step of the newest "
                          f"checkpoint in {manager.directory} ({step}): raise it to go on")
    return step


def _lock_run_dir(run_dir: str):
    """An exclusive lock on the run directory for this process's lifetime in it (None where the
    file system has none): two train.py on one run would save over each other's checkpoints."""
    import fcntl  # noqa: PLC0415

    f = open(os.path.join(run_dir, ".lock"), "w")  # noqa: SIM115 - held until _unlock
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(f"another train.py is training in {run_dir} (it holds {f.name}); "
                          f"wait for it, or start this run elsewhere (another experiment_name "
                          f"or output_dir)") from None
    except OSError:  # no locks on this file system: go on unguarded
        f.close()
        return None
    return f


def _unlock(lock) -> None:
    if lock is not None:
        lock.close()  # closing the file releases its flock


def _check_resumable(manager: ckpt.TrainCheckpointer, step: int, run: Run) -> None:
    """Refuse, before anything compiles or is written, to resume from the checkpoints of
    another model or tokenizer than the config's (orbax would fail deep inside its restore,
    after the config.json of the run that wrote them had been replaced)."""
    try:
        meta = manager.meta(step)
        saved = ckpt.model_config_of(meta)
    except Exception:  # noqa: BLE001 - no record to compare: the restore says what it finds
        return
    diff = model_differences(saved, run.model_config)
    tokenizer = meta.get("tokenizer")
    if tokenizer is not None and tokenizer != run.tokenizer.name:
        diff.append(f"data.tokenizer: {tokenizer!r} -> {run.tokenizer.name!r}")
    if diff:
        raise ResumeError(f"the checkpoints in {manager.directory} (step {step}) hold another "
                          f"model than this config ({'; '.join(diff)}). {_NEW_RUN}")
    shape = run_shape(run)
    diff = [f"{k}: {v!r} -> {shape[k]!r}" for k, v in meta.get("run_shape", {}).items()
            if k in shape and v != shape[k]]
    if diff:
        raise ResumeError(f"the checkpoints in {manager.directory} (step {step}) were trained on "
                          f"other batches than this config's ({'; '.join(diff)}): the carried "
                          f"state and the data position belong to those. {_NEW_RUN}")


def _restore(manager: ckpt.TrainCheckpointer, ts, resume: int, run: Run):
    """The training state of checkpoint `resume`, or why this run cannot go on from it. With
    checkpoint.on_damage='previous', a step that cannot be restored gives way to the newest
    earlier one that can (the steps passed over are set aside, not deleted), said in one line."""
    try:
        return manager.restore(ts, resume)[0]
    except Exception as e:  # noqa: BLE001 - orbax reports a mismatch or damage in many ways
        failure = e
    earlier = sorted((s for s in manager.all_steps() if s < resume), reverse=True)
    where = os.path.join(manager.directory, str(resume))
    if isinstance(failure, ckpt.DamagedCheckpointError):
        why = f"{failure}."
    else:
        why = (f"the checkpoint in {manager.directory} (step {resume}) cannot be restored into "
               f"this run ({ckpt.cause_line(failure)}): its optimizer settings differ from this "
               f"config's (optimizer.grad_clip on or off, ...), or it is damaged.")
    # Only damage gives way: a step that fails for another reason (another optimizer, a
    # device out of memory) is no reason to set intact checkpoints aside.
    if run.cfg.checkpoint.on_damage == "previous" and isinstance(failure, ckpt.DamagedCheckpointError):
        passed = [resume]
        for step in earlier:
            try:
                restored = manager.restore(ts, step)[0]
            except ckpt.DamagedCheckpointError:  # damaged as well: try the one before
                passed.append(step)
                continue
            moved = [manager.set_aside(s) for s in passed]
            log.warning("%s Resuming from step %d, the newest intact checkpoint "
                        "(checkpoint.on_damage='previous'); set aside: %s", why, step,
                        ", ".join(moved))
            return restored
        raise ResumeError(f"{why} No earlier checkpoint there can be restored either "
                          f"(steps {sorted(earlier)}). {_NEW_RUN}")
    if isinstance(failure, ckpt.DamagedCheckpointError):
        raise ResumeError(f"{why} " + (
            f"Move {where} aside to resume from step {earlier[0]}, or set "
            f"checkpoint.on_damage=previous to have the run do it." if earlier else
            f"No earlier checkpoint is there to resume from: move {where} aside to start this "
            f"run afresh, or start a new run elsewhere (another experiment_name or output_dir)."))
    raise ResumeError(
        f"{why} " + (f"If damaged, move {where} aside to resume from step {earlier[0]} (or set "
                     f"checkpoint.on_damage=previous to have the run do it). " if earlier else "")
        + _NEW_RUN)


class TrainingDiverged(RuntimeError):
    """The loss or the gradients went NaN/inf; the last good checkpoint is kept."""


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # optimizer updates done
    params: Any
    opt_state: Any
    carry: Any  # the recurrent state handed to the next chunk
    loss_scale: jax.Array  # dynamic loss scale (float16 only; 1 otherwise)
    good_steps: jax.Array  # finite steps since the loss scale last changed


@dataclasses.dataclass
class Run:
    """Everything a training run needs, prepared (and checked) before anything compiles."""

    cfg: Any
    model_config: ModelConfig
    tokenizer: Any
    train_tokens: data_lib.TokenFile
    val_tokens: data_lib.TokenFile
    run_dir: str
    spans: list  # (start, stop) of each chunk within a sequence
    masks: np.ndarray  # (num_chunks, chunk) loss masks (overlap counted once)
    handoffs: list  # per chunk: the position whose state the next chunk starts from
    mesh: Any = None  # jax.sharding.Mesh over every device

    @property
    def chunk_len(self) -> int:
        return self.spans[0][1] - self.spans[0][0]

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.batch_size * self.chunk_len


def _resolve_precision(precision: str) -> str:
    """Keep the requested compute dtype if this platform can multiply in it, else float32."""
    if precision == "float32":
        return precision
    try:
        x = jnp.ones((8, 8), precision)
        jax.block_until_ready(jax.jit(jnp.dot)(x, x))
    except Exception as e:  # noqa: BLE001 - any failure means the dtype is not usable here
        warnings.warn(f"efficiency.precision={precision!r} does not run on {jax.default_backend()} "
                      f"({e}); training in float32 instead", stacklevel=2)
        return "float32"
    return precision


def _token_file(text_or_bin: str, tokenizer, cache_dir: str) -> data_lib.TokenFile:
    if text_or_bin.endswith(".bin"):
        return data_lib.TokenFile(text_or_bin)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in tokenizer.name)
    base = data_lib.text_stem(text_or_bin)
    return data_lib.prepare_tokens(text_or_bin, tokenizer, os.path.join(cache_dir, f"{base}.{safe}.bin"))


def prepare(cfg) -> Run:
    """Validate the config, tokenize the data (cached), and fix the chunking. No compiles."""
    validate(cfg)
    try:  # before the data is read: the mesh needs only the config and the devices
        mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
        shd.check_batch(cfg.train.batch_size, mesh)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        tokenizer = data_lib.get_tokenizer(cfg.data.tokenizer)
    except (ValueError, OSError) as e:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer!r}: {e}") from None
    run_dir = os.path.join(cfg.output_dir, cfg.experiment_name)
    cache_dir = cfg.data.cache_dir or os.path.join(cfg.output_dir, "data")
    field = "data.cache_dir" if cfg.data.cache_dir else "output_dir"
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{field}: cannot make the directory {cache_dir!r} ({e.strerror})") from None
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}: the directory {cache_dir!r} is not writable")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"output_dir / experiment_name: the run directory {run_dir!r} is a file")
    existing = os.path.abspath(run_dir)
    while not os.path.exists(existing):  # where the run directory is, or will be made
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):  # access() knows read-only mounts too
        raise ConfigError(f"output_dir / experiment_name: {existing!r} is not writable, so the "
                          f"run directory {run_dir!r} cannot hold checkpoints")
    splits = {}
    for split in ("train_file", "val_file"):
        try:
            splits[split] = _token_file(cfg.data[split], tokenizer, cache_dir)
        except ValueError as e:
            raise ConfigError(f"data.{split}={cfg.data[split]!r}: {e}") from None
    train_tokens, val_tokens = splits["train_file"], splits["val_file"]
    if cfg.logging.eval_every > 0 and val_tokens.num_tokens < 2:
        raise ConfigError(f"data.val_file={cfg.data.val_file!r} has {val_tokens.num_tokens} "
                          f"token(s); evaluation needs at least 2 (or logging.eval_every=0)")
    model_config = model_config_from(cfg, vocab_size=tokenizer.vocab_size)
    model_config = dataclasses.replace(
        model_config, dtype=_resolve_precision(model_config.dtype))
    for split, tf in (("train_file", train_tokens), ("val_file", val_tokens)):
        if tf.max_token_id >= model_config.vocab_size:
            raise ConfigError(
                f"model.vocab_size={model_config.vocab_size} is smaller than the largest token id "
                f"{tf.max_token_id} in data.{split} ({tf.path}); use at least {tf.max_token_id + 1}")
        try:  # the ids themselves, which damage or a hand-made file may set apart from the metadata
            data_lib.check_token_ids(tf, model_config.vocab_size, cache_dir)
        except ValueError as e:
            raise ConfigError(f"data.{split}={cfg.data[split]!r}: {e}") from None
    T = cfg.train.max_seq_length
    for split, tf in (("train_file", train_tokens),):
        if tf.num_tokens < T + 1:
            raise ConfigError(f"data.{split} has {tf.num_tokens} tokens, fewer than "
                              f"train.max_seq_length + 1 = {T + 1}")
    mem = cfg.memory
    L, overlap = (mem.rwkv_chunk_size, mem.chunk_overlap) if mem.use_rwkv_chunking else (T, 0)
    try:
        spans = data_lib.chunk_spans(T, L, overlap)
        masks = data_lib.chunk_loss_masks(T, L, overlap)
        handoffs = data_lib.state_handoff(T, L, overlap) + [L]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if mem.chunk_overlap and len(spans) == 1:  # chunking off is one span too
        log.warning("memory.chunk_overlap=%d does nothing here: a sequence of train."
                    "max_seq_length=%d is one chunk (memory.rwkv_chunk_size=%d, "
                    "memory.use_rwkv_chunking=%s)", mem.chunk_overlap, T, mem.rwkv_chunk_size,
                    mem.use_rwkv_chunking)
    return Run(cfg, model_config, tokenizer, train_tokens, val_tokens, run_dir, spans, masks,
               handoffs, mesh)


# ----------------------------------------------------------------------------- the step


def _masked_ce(logits, targets, mask):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    mask = jnp.broadcast_to(mask, ce.shape)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0), jnp.sum(mask)


def chunk_forward(model: RWKV, params, inputs, state, handoff: int):
    """Logits of one chunk and the state at `handoff` (the next chunk's start).

    With overlapping chunks the next chunk starts inside this one, so the chunk runs as two
    calls split there; the state between them is the one to hand on.
    """
    L = inputs.shape[1]
    if handoff >= L:
        return model.apply({"params": params}, inputs, state)
    head, mid = model.apply({"params": params}, inputs[:, :handoff], state)
    tail, _ = model.apply({"params": params}, inputs[:, handoff:], mid)
    return jnp.concatenate([head, tail], axis=1), mid


def make_train_step(model: RWKV, optimizer, *, fresh: bool, handoff: int, float16: bool):
    """One optimizer update on one chunk. `fresh`: the chunk starts a sequence (state=None,
    i.e. the zero or learned initial state, so gradients reach a learned one)."""

    def loss_fn(params, inputs, targets, mask, carry, scale):
        if not fresh:
            # The chunk starts from the state as memory.state_compression stores it; with the
            # learned codec this round trip is what trains it.
            carry = state_codec.roundtrip(carry, model.config.state_compression, params)
        logits, new_carry = chunk_forward(model, params, inputs, None if fresh else carry, handoff)
        loss, count = _masked_ce(logits, targets, mask)
        return loss * scale, (loss, count, new_carry)

    def step(ts: TrainState, inputs, targets, mask):
        scale = ts.loss_scale if float16 else jnp.float32(1.0)
        grads, (loss, count, carry) = jax.grad(loss_fn, has_aux=True)(
            ts.params, inputs, targets, mask, ts.carry, scale)
        grads = jax.tree.map(lambda g: g / scale, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        # The new weights too: finite gradients can make weights that are not (an update's
        # norm would overflow where each of its elements does not).
        finite_params = jax.tree.reduce(lambda acc, p: acc & jnp.isfinite(p).all(), params,
                                        jnp.bool_(True))
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & finite_params
        # A non-finite step changes nothing (float16 overflow is routine; otherwise the host stops).
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        loss_scale, good = ts.loss_scale, ts.good_steps
        if float16:
            grow = ok & (good + 1 >= 2000)
            loss_scale = jnp.where(ok, jnp.where(grow, loss_scale * 2, loss_scale), loss_scale / 2)
            good = jnp.where(ok & ~grow, good + 1, 0)
        new = TrainState(
            step=ts.step + 1, params=keep(params, ts.params), opt_state=keep(opt_state, ts.opt_state),
            carry=carry, loss_scale=loss_scale, good_steps=good)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": ok, "tokens": count,
                   "loss_scale": loss_scale}
        return new, metrics

    return step


# ----------------------------------------------------------------------------- evaluation


def score_stream(apply_fn, params, tokens: np.ndarray, chunk_len: int, state=None):
    """Mean next-token loss of one long token stream fed through the state chunk by chunk.

    Memory does not grow with the stream's length. Returns (sum of losses in nats, count).
    `apply_fn(params, inputs, state) -> (logits, state)` is a jitted model call.
    """
    tokens = np.asarray(tokens)
    total, count = 0.0, 0
    n = len(tokens) - 1
    for a in range(0, n, chunk_len):
        b = min(a + chunk_len, n)
        inputs = jnp.asarray(tokens[None, a:b], jnp.int32)
        targets = jnp.asarray(tokens[None, a + 1 : b + 1], jnp.int32)
        logits, state = apply_fn(params, inputs, state)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        total += float(jnp.sum(ce))
        count += b - a
    return total, count


def evaluate(run: Run, params, max_tokens: int | None = None) -> dict:
    model = RWKV(run.model_config)
    apply_fn = _jitted_apply(model)
    tokens = np.asarray(run.val_tokens.tokens)
    if max_tokens:
        tokens = tokens[: max_tokens + 1]
    total, count = score_stream(apply_fn, params, tokens, run.chunk_len)
    loss = total / max(count, 1)
    # Bytes per token of this file, for bits per byte of the part scored.
    bytes_scored = run.val_tokens.num_bytes * count / max(run.val_tokens.num_tokens - 1, 1)
    return {"loss": loss, "bpb": data_lib.bits_per_byte(loss, count, bytes_scored),
            "tokens": count}


@partial(jax.jit, static_argnums=0)
def _apply(model, params, inputs, state):
    return model.apply({"params": params}, inputs, state)


def _jitted_apply(model):
    return lambda params, inputs, state: _apply(model, params, inputs, state)


# ----------------------------------------------------------------------------- the loop


def model_flops_per_token(mc: ModelConfig, chunk_len: int) -> float:
    """Training FLOPs per token: 6 x matrix parameters (embedding excluded) + causal attention."""
    C, F = mc.n_embd, mc.dim_ffn
    n_attn = mc.layer_types.count(hybrid.ATTN)
    n_rwkv = mc.n_layer - n_attn
    if mc.version == "7":
        # Four projections, the channel-mix (no receptance), the four LoRA pairs; and the WKV
        # recurrence, about 10 N^2 multiply-adds per head and token (decay, S a, two outer
        # products, S r), i.e. 10 C N, which the training pass does three times.
        lora = 2 * C * (mc.dim_w_lora + mc.dim_a_lora + mc.dim_v_lora + mc.dim_g_lora)
        rwkv_matrices = 4 * C * C + 2 * C * F + lora
        recurrence = n_rwkv * 3.0 * 2 * 10 * C * mc.head_size
    else:
        rwkv_matrices = 4 * C * C + 2 * C * F + C * C
        recurrence = 0.0
    matrices = n_rwkv * rwkv_matrices + n_attn * (4 * C * C + 2 * C * F)
    matrices += C * mc.vocab_size  # head
    ctx = min(mc.attn_window, chunk_len) / 2
    return 6.0 * matrices + n_attn * 12.0 * ctx * C + recurrence


def device_peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak * jax.device_count()
    return None


def load_initial_weights(path: str, fresh: dict, model_config: ModelConfig | None = None) -> dict:
    """Weights to start from (`train.init_from`), onto the fresh init's tree.

    Leaves the source lacks (a learned initial state or codec a pretrained model never had)
    keep their fresh initialisation; a leaf of another shape is an error, and so are weights
    of another RWKV version than `model_config`'s (they share some names, not the model).
    """
    return _onto_fresh(path, read_initial_weights(path, model_config), fresh)


def read_initial_weights(path: str, model_config: ModelConfig | None = None) -> dict:
    """The weights of `train.init_from` by their path in the params tree, checked (readable,
    finite, floating point, this RWKV version); ConfigError naming the field otherwise."""
    try:
        if os.path.isfile(path):
            source, loaded = ckpt.import_official(path)
        else:
            source, loaded, _ = ckpt.restore_params(path)
    except (ValueError, FileNotFoundError, ImportError) as e:  # said by the readers in one line
        raise ConfigError(f"train.init_from={path!r} cannot be read: {e}") from None
    if model_config is not None and source.version != model_config.version:
        raise ConfigError(f"train.init_from={path!r} holds an RWKV-{source.version} model, but "
                          f"model.version={model_config.version!r}; set "
                          f"model.version={source.version!r} to start from it")
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(loaded)}


def _onto_fresh(path: str, flat: dict, fresh: dict) -> dict:
    def take(keypath, x):
        name = jax.tree_util.keystr(keypath)
        if name not in flat:
            return x
        y = jnp.asarray(flat[name], x.dtype)
        if y.shape != x.shape:
            raise ConfigError(f"train.init_from={path!r}: {name} has shape {y.shape}, but this "
                              f"config's model wants {x.shape}")
        return y

    return jax.tree_util.tree_map_with_path(take, fresh)


@dataclasses.dataclass
class Layout:
    """Where every part of the training state lives on the mesh, known before it exists."""

    state: TrainState  # of NamedShardings
    shapes: TrainState  # of ShapeDtypeStructs
    batch: Any  # NamedSharding of a (B, L) batch


def plan_layout(run: Run, optimizer) -> Layout:
    mc, mesh, B = run.model_config, run.mesh, run.cfg.train.batch_size
    params = param_shapes(mc)
    opt = jax.eval_shape(optimizer.init, params)
    carry = jax.eval_shape(lambda: init_state(mc, B))
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt,
                        carry=carry, loss_scale=scalar, good_steps=jax.ShapeDtypeStruct((), jnp.int32))
    p_sh = shd.param_shardings(params, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = TrainState(step=replicated, params=p_sh,
                       opt_state=shd.opt_state_shardings(opt, params, p_sh, mesh),
                       carry=shd.state_shardings(carry, mesh), loss_scale=replicated,
                       good_steps=replicated)
    return Layout(state=state, shapes=shapes, batch=shd.batch_sharding(mesh, 2))


def init_params_fn(mc: ModelConfig):
    model = RWKV(mc)
    return lambda rng: model.init(rng, jnp.zeros((1, 2), jnp.int32))["params"]


def make_optimizer(run: Run):
    return optim.make_optimizer(param_shapes(run.model_config), optimizer_config_from(run.cfg))


def init_train_state(run: Run, rng, layout: Layout | None = None) -> tuple[TrainState, Any]:
    """A fresh training state, created directly in its shards: no device or host ever holds
    the whole of the parameters or the optimizer state (unless weights come from init_from)."""
    optimizer = make_optimizer(run)
    layout = layout or plan_layout(run, optimizer)
    sh = layout.state
    if run.cfg.train.init_from:
        # Read and checked before the fresh init compiles: weights that cannot be used are
        # refused at once.
        source = read_initial_weights(run.cfg.train.init_from, run.model_config)
        params = _onto_fresh(run.cfg.train.init_from, source,
                             jax.jit(init_params_fn(run.model_config))(rng))
        params = jax.device_put(params, sh.params)
    else:
        params = jax.jit(init_params_fn(run.model_config), out_shardings=sh.params)(rng)
    opt_state = jax.jit(optimizer.init, out_shardings=sh.opt_state)(params)
    mc, B = run.model_config, run.cfg.train.batch_size
    scale = run.cfg.train.loss_scale if mc.dtype == "float16" else 1.0
    make_rest = jax.jit(
        lambda: (init_state(mc, B), jnp.int32(0), jnp.float32(scale), jnp.int32(0)),
        out_shardings=(sh.carry, sh.step, sh.loss_scale, sh.good_steps))
    carry, step, loss_scale, good = make_rest()
    ts = TrainState(step=step, params=params, opt_state=opt_state, carry=carry,
                    loss_scale=loss_scale, good_steps=good)
    return ts, optimizer


class _Writer:
    """tensorboardX when available and asked for; a no-op otherwise."""

    def __init__(self, logdir: str | None):
        self._w = None
        if logdir:
            try:
                from tensorboardX import SummaryWriter  # noqa: PLC0415
            except ImportError:
                log.warning("tensorboardX is not installed: no tensorboard logs")
            else:
                self._w = SummaryWriter(logdir)

    def scalars(self, step: int, values: dict, prefix: str):
        if self._w:
            for k, v in values.items():
                self._w.add_scalar(f"{prefix}/{k}", float(v), step)
            self._w.flush()

    def close(self):
        if self._w:
            self._w.close()


def train(run: Run, on_step: StepHook | None = None) -> dict:
    """Train (or resume) until train.steps; returns the final metrics."""
    main = distributed.is_main_process()  # logs, tensorboard and progress come from one process
    os.makedirs(run.run_dir, exist_ok=True)
    lock = _lock_run_dir(run.run_dir) if main else None
    # Holding the run's lock, process 0 knows that whoever left a temporary there is gone.
    manager = ckpt.TrainCheckpointer(os.path.join(run.run_dir, "checkpoints"),
                                     keep=run.cfg.checkpoint.keep,
                                     clean_temporaries=lock is not None)
    try:
        return _train(run, manager, main, on_step)
    finally:
        # Waits for saves in flight, and stops a failed restore's reads, which would print
        # tracebacks at exit.
        manager.close()
        _unlock(lock)


def _train(run: Run, manager: ckpt.TrainCheckpointer, main: bool,
           on_step: StepHook | None) -> dict:
    cfg = run.cfg
    resume = _resume_step(manager, run)
    if resume is not None and resume >= cfg.train.steps:
        log.info("%s is at step %d of train.steps=%d already: nothing to train",
                 manager.directory, resume, cfg.train.steps)
        return {k: v for k, v in manager.meta(resume).items() if isinstance(v, float)}
    if cfg.checkpoint.every == 0:
        log.warning("checkpoint.every=0: this run writes no checkpoint, not even at the end")

    _resolve_horizon(manager, resume, run)
    mc = run.model_config
    model = RWKV(mc)
    optimizer = make_optimizer(run)
    layout = plan_layout(run, optimizer)
    check_memory(run, layout)
    ts, optimizer = init_train_state(run, jax.random.PRNGKey(cfg.seed), layout)
    log.info("model: %s, %.2fM parameters, compute %s; %s", f"RWKV-{mc.version}",
             count_params(ts.params) / 1e6,
             mc.dtype, hybrid.describe(mc.layer_types))
    groups = optim.describe_groups(ts.params, optimizer_config_from(cfg))
    log.info("optimizer groups (tensors): %s",
             ", ".join(f"{label} {len(paths)}" for label, paths in groups.items()))
    if cfg.logging.verbose:
        for label, paths in groups.items():
            log.info("  %s: %s", label, ", ".join(paths))

    start = 0
    if resume is not None:
        ts = _restore(manager, ts, resume, run)
        start = int(ts.step)
        log.info("resumed from %s at step %d", manager.directory, start)
    # Written once the run is known to go on: a run refused above keeps the config it was
    # written with, which infer.py reads.
    if main:
        with open(os.path.join(run.run_dir, "config.json"), "w") as f:
            f.write(cfg.to_json_best_effort(indent=2))
    manager.save_model_config(mc, run.tokenizer.name, run_shape(run))

    float16 = mc.dtype == "float16"
    donate = (0,) if cfg.efficiency.donate else ()
    steps = {}

    def step_fn(chunk: int):
        nonlocal window_t
        key = (chunk == 0, run.handoffs[chunk])
        if key not in steps:
            t = time.perf_counter()
            fn = make_train_step(model, optimizer, fresh=key[0], handoff=key[1], float16=float16)
            steps[key] = compile_step(fn, run, layout, donate, first=not steps)
            window_t += time.perf_counter() - t  # compiling is not training throughput
        return steps[key]

    n_chunks = len(run.spans)
    masks = [jnp.asarray(m) for m in run.masks]  # on the device once, not once per step
    schedule = optim.make_schedule(optimizer_config_from(cfg))
    flops_per_token = model_flops_per_token(mc, run.chunk_len)
    peak = device_peak_flops() if jax.default_backend() != "cpu" else None
    writer = _Writer(os.path.join(run.run_dir, "tb") if cfg.logging.tensorboard and main else None)
    progress = _progress(cfg, start, enabled=main)

    rows = distributed.process_rows(layout.batch, (cfg.train.batch_size, run.chunk_len))
    if jax.process_count() > 1:
        log.warning("process %d of %d loads rows %d:%d of each global batch of %d",
                    jax.process_index(), jax.process_count(), rows.start, rows.stop,
                    cfg.train.batch_size)
    batch_key, batch = None, None
    pending = None  # the previous step's metrics, read one step late so dispatch runs ahead
    window_t, window_tokens = time.perf_counter(), 0
    last, metrics = {}, None
    try:
        for step in range(start, cfg.train.steps):
            seq_step, chunk = divmod(step, n_chunks)
            if batch_key != seq_step:
                # This process's rows only; the global batch is the same for any process count.
                batch = data_lib.get_batch(run.train_tokens, step=seq_step, seed=cfg.seed,
                                           batch_size=cfg.train.batch_size,
                                           seq_len=cfg.train.max_seq_length, rows=rows)
                batch_key = seq_step
            a, b = run.spans[chunk]
            shape = (cfg.train.batch_size, b - a)
            ts, metrics = step_fn(chunk)(ts, _global(batch[0][:, a:b], layout.batch, shape),
                                         _global(batch[1][:, a:b], layout.batch, shape),
                                         masks[chunk])
            if pending is not None:
                _check_finite(pending, step, float16)
            pending = metrics
            window_tokens += run.tokens_per_step
            if on_step is not None:
                on_step(step + 1, manager.wait)

            if (step + 1) % cfg.logging.every == 0 or step + 1 == cfg.train.steps:
                jax.block_until_ready(metrics)
                _check_finite(metrics, step + 1, float16)
                elapsed = time.perf_counter() - window_t
                tps = window_tokens / elapsed
                last = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                        "lr": float(schedule(step)),
                        "tokens_per_sec": tps}
                if peak:
                    last["mfu"] = tps * flops_per_token / peak
                used = peak_device_bytes()
                if used:
                    last["peak_gib"] = used / 2**30
                writer.scalars(step + 1, last, "train")
                progress.set_postfix(_postfix(last))
                if not cfg.logging.progress:
                    log.info("step %d: %s", step + 1, _postfix(last))
                window_t, window_tokens = time.perf_counter(), 0
            progress.update(1)

            evals = cfg.logging.eval_every > 0
            if evals and ((step + 1) % cfg.logging.eval_every == 0 or step + 1 == cfg.train.steps):
                eval_t = time.perf_counter()
                ev = evaluate(run, ts.params, cfg.logging.eval_tokens or None)
                writer.scalars(step + 1, {"loss": ev["loss"], "bpb": ev["bpb"]}, "val")
                log.info("step %d: val loss %.4f nats/token, %.4f bits/byte (%d tokens)",
                         step + 1, ev["loss"], ev["bpb"], ev["tokens"])
                last.update(val_loss=ev["loss"], val_bpb=ev["bpb"])
                window_t += time.perf_counter() - eval_t  # evaluation is not training throughput
            saves = cfg.checkpoint.every > 0
            if saves and ((step + 1) % cfg.checkpoint.every == 0 or step + 1 == cfg.train.steps):
                jax.block_until_ready(ts)
                _check_finite(pending, step + 1, float16)
                _save(manager, step + 1, ts, run, last)
    except KeyboardInterrupt:
        _save_on_interrupt(run, manager, ts, metrics, last, start, float16)
        raise
    finally:
        progress.close()
        writer.close()
    return last


def _save(manager: ckpt.TrainCheckpointer, step: int, ts: TrainState, run: Run, last: dict):
    manager.save(step, ts, {"tokens_seen": step * run.tokens_per_step,
                            "total_steps": int(run.cfg.optimizer.total_steps),
                            **{k: float(v) for k, v in last.items()}})


def _resolve_horizon(manager: ckpt.TrainCheckpointer, resume: int | None, run: Run) -> None:
    """Fix the schedule's horizon (optimizer.total_steps) once for the run: a resumed run keeps
    the one its checkpoint saved, so raising train.steps extends training without moving the
    learning rate; only an explicit optimizer.total_steps changes it, and the log names the jump."""
    cfg = run.cfg
    asked = int(cfg.optimizer.total_steps)
    saved = None
    if resume is not None:
        try:
            saved = manager.meta(resume).get("total_steps")
        except Exception:  # noqa: BLE001 - an unreadable record: the restore says what it finds
            saved = None
    if saved is None:  # a fresh run, or a checkpoint from before horizons were saved
        horizon = asked or cfg.train.steps
        if resume is not None:
            log.info("the checkpoint of step %d records no schedule horizon (it was written "
                     "before horizons were saved): optimizer.total_steps=%d from this config",
                     resume, horizon)
    elif not asked or asked == saved:
        horizon = int(saved)
        if not asked and cfg.train.steps != horizon:
            log.info("the schedule keeps the horizon saved with this run, optimizer.total_steps="
                     "%d (train.steps is %d); set optimizer.total_steps to change it",
                     horizon, cfg.train.steps)
    else:
        horizon = asked
        try:
            old, new = (float(optim.make_schedule(_with_horizon(cfg, h))(resume)) for h in (saved, asked))
        except ValueError:  # the saved horizon is no schedule with today's warmup
            log.warning("optimizer.total_steps %d -> %d from step %d", saved, asked, resume)
        else:
            log.warning("optimizer.total_steps %d -> %d: the learning rate at step %d jumps "
                        "from %.4g to %.4g", saved, asked, resume, old, new)
    opt = cfg.optimizer
    if opt.schedule != "constant" and opt.warmup_steps >= horizon:
        raise ConfigError(f"optimizer.warmup_steps={opt.warmup_steps} is invalid: must be below "
                          f"the schedule's horizon of {horizon} steps, which this run keeps "
                          f"from its checkpoints (set optimizer.total_steps to change it)")
    if cfg.train.steps > horizon and cfg.optimizer.schedule != "constant":
        log.info("train.steps=%d runs past the schedule's horizon, optimizer.total_steps=%d: "
                 "the learning rate holds at optimizer.lr_final after it", cfg.train.steps, horizon)
    cfg.optimizer.total_steps = horizon


def _with_horizon(cfg, horizon: int):
    opt = optimizer_config_from(cfg)
    opt.total_steps = horizon
    return opt


def _save_on_interrupt(run: Run, manager: ckpt.TrainCheckpointer, ts: TrainState, metrics,
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
        _check_finite(metrics, step, float16)
    except TrainingDiverged as e:
        log.warning("interrupted: step %d not saved: %s", step, e)
        return
    log.warning("interrupted: saving step %d (Ctrl-C again abandons the save)", step)
    _save(manager, step, ts, run, last)
    manager.wait()
    log.warning("saved step %d in %s", step, manager.directory)


def compile_step(fn, run: Run, layout: Layout, donate: tuple, first: bool = False):
    """Compile a train step ahead of time; the first one's XLA memory figure joins the plan."""
    B, L = run.cfg.train.batch_size, run.chunk_len
    batch = jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=layout.batch)
    mask = jax.ShapeDtypeStruct((L,), jnp.float32)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         layout.shapes, layout.state)
    jitted = jax.jit(fn, donate_argnums=donate,
                     in_shardings=(layout.state, layout.batch, layout.batch, None),
                     out_shardings=(layout.state, None))
    compiled = jitted.lower(state, batch, batch, mask).compile()
    if first:
        xla = xla_step_bytes(compiled)
        limit = shd.device_memory()
        if xla is not None:
            log.info("XLA's plan for the train step: %.2f GiB per device%s", xla / 2**30,
                     f" of {limit / 2**30:.2f} GiB" if limit else "")
            if limit and xla > limit:
                raise MemoryPlanError(
                    f"XLA's compiled train step needs {xla / 2**30:.1f} GiB per device, more than "
                    f"the {limit / 2**30:.1f} GiB there is. Try: "
                    f"{shd.suggestion(run.model_config, run.mesh)}")
    return compiled


def xla_step_bytes(compiled) -> float | None:
    """Peak bytes XLA planned for a compiled step: arguments + outputs - donated + temporaries."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    if m is None:
        return None
    return float(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                 + m.temp_size_in_bytes)


def peak_device_bytes() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    return (stats or {}).get("peak_bytes_in_use")


def _global(local_rows: np.ndarray, sharding, global_shape) -> jax.Array:
    """The global batch array from this process's rows (all rows when there is one process)."""
    return jax.make_array_from_process_local_data(sharding, local_rows, global_shape)


class MemoryPlanError(RuntimeError):
    """The config cannot fit the devices; the message holds the plan and what to change."""


def check_memory(run: Run, layout: Layout) -> dict:
    """Print the memory plan per device; stop before compiling if it cannot fit."""
    sh, shapes = layout.state, layout.shapes
    plan = shd.memory_plan(shapes.params, sh.params, shapes.opt_state, sh.opt_state,
                           run.model_config, run.cfg.train.batch_size, run.chunk_len, run.mesh)
    limit = shd.device_memory()
    log.info("mesh %s\n%s", dict(run.mesh.shape), shd.format_plan(plan, limit))
    if limit and plan["total"] > limit:
        raise MemoryPlanError(f"this config needs about {plan['total'] / 2**30:.1f} GiB per device, "
                              f"more than the {limit / 2**30:.1f} GiB there is.\n"
                              f"{shd.format_plan(plan, limit)}\nTry: "
                              f"{shd.suggestion(run.model_config, run.mesh)}")
    return plan


def _check_finite(metrics, step: int, float16: bool):
    if float16:
        ok = bool(np.isfinite(float(metrics["loss"])))
    else:
        ok = bool(metrics["finite"])
    if not ok:
        raise TrainingDiverged(
            f"step {step}: the loss ({float(metrics['loss'])}), the gradient norm "
            f"({float(metrics['grad_norm'])}) or the update is not finite. The update was "
            f"skipped and no "
            "checkpoint is written past the last good one; lower optimizer.lr, raise "
            "optimizer.warmup_steps, or use efficiency.precision='float32'.")


def _postfix(m: dict) -> dict:
    out = {"loss": f"{m['loss']:.3f}", "tok/s": f"{m['tokens_per_sec']:,.0f}"}
    if "mfu" in m:
        out["mfu"] = f"{100 * m['mfu']:.1f}%"
    if "peak_gib" in m:
        out["peak"] = f"{m['peak_gib']:.1f}GiB"
    return out


def _progress(cfg, start: int, enabled: bool = True):
    if cfg.logging.progress and enabled:
        try:
            from tqdm import tqdm  # noqa: PLC0415
        except ImportError:
            pass
        else:
            return tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True)

    class _Null:
        def update(self, n):
            pass

        def set_postfix(self, d):
            pass

        def close(self):
            pass

    return _Null()


def run_summary(run: Run) -> str:
    mc = run.model_config
    return json.dumps({"layers": hybrid.describe(mc.layer_types), "chunk": run.chunk_len,
                       "chunks_per_sequence": len(run.spans), "tokens_per_step": run.tokens_per_step})
