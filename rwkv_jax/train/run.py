"""A run: its config checked and resolved (data, tokenizer, precision, model shape), its directory
locked, and what a resume must agree with (the run-shape record, the model, the horizon).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.config import (
    ConfigError,
    ModelConfig,
    model_config_from,
    model_differences,
    optimizer_config_from,
    validate,
)
from rwkv_jax.config.layer_pattern import describe
from rwkv_jax.data.batches import chunk_loss_masks, chunk_spans, state_handoff
from rwkv_jax.data.jsonl import DocumentFile
from rwkv_jax.data.sources import Batches, open_source, open_sources
from rwkv_jax.data.tokenizers import get_tokenizer
from rwkv_jax.data.tokens import check_token_ids
from rwkv_jax.config.model import HOW_IT_COMPUTES, config_path
from rwkv_jax.io.adapter_file import read_adapter
from rwkv_jax.io.checkpoint import (
    TrainCheckpointer,
    adapter_record,
    base_fingerprint,
    model_config_of,
    restore_params,
)
from rwkv_jax.io.hf import hf_model_type, import_hf
from rwkv_jax.io.official import import_official
from rwkv_jax.io.integrity import DamagedCheckpointError, cause_line
from rwkv_jax.nn import adapters
from rwkv_jax.nn.model import param_shapes
from rwkv_jax.train import optim
from rwkv_jax.train import sharding as shd

log = logging.getLogger("rwkv_jax")


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


def resume_step(manager: TrainCheckpointer, run: Run) -> int | None:
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


def lock_run_dir(run_dir: str):
    """An exclusive lock on the run directory for this process's lifetime in it (None where the
    file system has none): two train.py on one run would save over each other's checkpoints."""
    import fcntl  # noqa: PLC0415

    f = open(os.path.join(run_dir, ".lock"), "w")  # noqa: SIM115 - held until unlock_run_dir
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


def unlock_run_dir(lock) -> None:
    if lock is not None:
        lock.close()  # closing the file releases its flock


def _check_resumable(manager: TrainCheckpointer, step: int, run: Run) -> None:
    """Refuse, before anything compiles or is written, to resume from the checkpoints of
    another model or tokenizer than the config's (orbax would fail deep inside its restore,
    after the config.json of the run that wrote them had been replaced)."""
    try:
        meta = manager.meta(step)
        saved = model_config_of(meta)
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
    diff = _adapter_differences(meta.get("adapters") or {}, run.adapter_record or {})
    if diff:
        raise ResumeError(f"the checkpoints in {manager.directory} (step {step}) hold other "
                          f"adapters, or adapters of another base ({'; '.join(diff)}). {_NEW_RUN}")


def _adapter_differences(saved: dict, now: dict) -> list[str]:
    """What changed in an adapter run's spec or base since its checkpoints were written."""
    if not saved or not now:  # train.trainable differs, which run_shape says
        return []
    if saved["base_sha256"] != now["base_sha256"]:
        return [f"the base {now['base']} is another file than the one this run started from "
                f"(sha256 {saved['base_sha256'][:12]}... -> {now['base_sha256'][:12]}...)"]
    same = lambda k: set(saved[k]) == set(now[k]) if k == "targets" else saved[k] == now[k]  # noqa: E731
    return [f"train.lora.{k}: {saved[k]!r} -> {now[k]!r}" if k != "method" else
            f"train.trainable: {saved[k]!r} -> {now[k]!r}"
            for k in ("method", "rank", "alpha", "dropout", "targets")
            if k in saved and not same(k)]


def restore_train_state(manager: TrainCheckpointer, ts, resume: int, run: Run):
    """The training state of checkpoint `resume`, or why this run cannot go on from it. With
    checkpoint.on_damage='previous', a step that cannot be restored gives way to the newest
    earlier one that can (the steps passed over are set aside, not deleted), said in one line."""
    try:
        return manager.restore(ts, resume)[0]
    except Exception as e:  # noqa: BLE001 - orbax reports a mismatch or damage in many ways
        failure = e
    earlier = sorted((s for s in manager.all_steps() if s < resume), reverse=True)
    where = os.path.join(manager.directory, str(resume))
    if isinstance(failure, DamagedCheckpointError):
        why = f"{failure}."
    else:
        why = (f"the checkpoint in {manager.directory} (step {resume}) cannot be restored into "
               f"this run ({cause_line(failure)}): its optimizer settings differ from this "
               f"config's (optimizer.grad_clip on or off, ...), or it is damaged.")
    # Only damage gives way: a step that fails for another reason (another optimizer, a
    # device out of memory) is no reason to set intact checkpoints aside.
    if run.cfg.checkpoint.on_damage == "previous" and isinstance(failure, DamagedCheckpointError):
        passed = [resume]
        for step in earlier:
            try:
                restored = manager.restore(ts, step)[0]
            except DamagedCheckpointError:  # damaged as well: try the one before
                passed.append(step)
                continue
            moved = [manager.set_aside(s) for s in passed]
            log.warning("%s Resuming from step %d, the newest intact checkpoint "
                        "(checkpoint.on_damage='previous'); set aside: %s", why, step,
                        ", ".join(moved))
            return restored
        raise ResumeError(f"{why} No earlier checkpoint there can be restored either "
                          f"(steps {sorted(earlier)}). {_NEW_RUN}")
    if isinstance(failure, DamagedCheckpointError):
        raise ResumeError(f"{why} " + (
            f"Move {where} aside to resume from step {earlier[0]}, or set "
            f"checkpoint.on_damage=previous to have the run do it." if earlier else
            f"No earlier checkpoint is there to resume from: move {where} aside to start this "
            f"run afresh, or start a new run elsewhere (another experiment_name or output_dir)."))
    raise ResumeError(
        f"{why} " + (f"If damaged, move {where} aside to resume from step {earlier[0]} (or set "
                     f"checkpoint.on_damage=previous to have the run do it). " if earlier else "")
        + _NEW_RUN)


@dataclasses.dataclass
class Run:
    """Everything a training run needs, prepared (and checked) before anything compiles."""

    cfg: Any
    model_config: ModelConfig
    tokenizer: Any
    train_tokens: Any  # the (first) training source: TokenFile, BinIdx or DocumentFile
    val_tokens: Any  # the validation source: one stream, or documents (jsonl) one by one
    run_dir: str
    spans: list  # (start, stop) of each chunk within a sequence
    masks: np.ndarray  # (num_chunks, chunk) loss masks (overlap counted once)
    handoffs: list  # per chunk: the position whose state the next chunk starts from
    mesh: Any = None  # jax.sharding.Mesh over every device
    batches: Any = None  # data.sources.Batches: (step, rows) -> (inputs, targets, mask | None)
    initial_weights: dict | None = None  # train.init_from's weights by keystr path, read once
    adapters: adapters.AdapterSpec | None = None  # train.trainable=lora|pissa
    adapter_plan: adapters.Plan | None = None  # the modules and leaves they target
    adapter_record: dict | None = None  # the spec and the base's path and sha256, checkpointed
    initial_adapters: dict | None = None  # train.lora.init_from's, read and checked once
    base: Any = None  # the frozen base on the devices (train.init.freeze_base)
    base_weights: Any = None  # its float32 weights until then

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


def prepare(cfg) -> Run:
    """Validate the config, tokenize the data (cached), and fix the chunking. No compiles."""
    validate(cfg)
    try:  # the schedule's own checks (train.optim), with the config's other faults
        optim.make_schedule(optimizer_config_from(cfg))
    except ValueError as e:
        raise ConfigError(f"optimizer: {e}") from None
    try:  # before the data is read: the mesh needs only the config and the devices
        mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
        shd.check_batch(cfg.train.batch_size, mesh)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        tokenizer = get_tokenizer(cfg.data.tokenizer)
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
    try:
        train_sources = open_sources(cfg.data.train_file, tokenizer, cache_dir)
    except ValueError as e:
        raise ConfigError(f"data.train_file={cfg.data.train_file!r}: {e}") from None
    try:
        val_tokens = open_source(cfg.data.val_file, tokenizer, cache_dir)
    except ValueError as e:
        raise ConfigError(f"data.val_file={cfg.data.val_file!r}: {e}") from None
    if cfg.logging.eval_every > 0 and val_tokens.num_tokens < 2:
        raise ConfigError(f"data.val_file={cfg.data.val_file!r} has {val_tokens.num_tokens} "
                          f"token(s); evaluation needs at least 2 (or logging.eval_every=0)")
    model_config = model_config_from(cfg, vocab_size=tokenizer.vocab_size)
    model_config = dataclasses.replace(
        model_config, dtype=_resolve_precision(model_config.dtype))
    initial = None
    if cfg.train.init_from:  # a fine-tune: the weights say what the model is
        source, initial = read_init_from(cfg.train.init_from)
        model_config = _architecture_from(cfg.train.init_from, source, model_config)
    spec, where, record, start = _adapters(cfg, model_config, initial)
    sources = [("train_file", s) for s, _ in train_sources] + [("val_file", val_tokens)]
    for split, tf in sources:
        _check_ids(cfg, split, tf, model_config.vocab_size, cache_dir)
    batches = _batches(cfg, train_sources)
    T, mem = cfg.train.max_seq_length, cfg.memory
    L, overlap = (mem.rwkv_chunk_size, mem.chunk_overlap) if mem.use_rwkv_chunking else (T, 0)
    try:
        spans = chunk_spans(T, L, overlap)
        masks = chunk_loss_masks(T, L, overlap)
        handoffs = state_handoff(T, L, overlap) + [L]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if mem.chunk_overlap and len(spans) == 1:  # chunking off is one span too
        log.warning("memory.chunk_overlap=%d does nothing here: a sequence of train."
                    "max_seq_length=%d is one chunk (memory.rwkv_chunk_size=%d, "
                    "memory.use_rwkv_chunking=%s)", mem.chunk_overlap, T, mem.rwkv_chunk_size,
                    mem.use_rwkv_chunking)
    return Run(cfg, model_config, tokenizer, train_sources[0][0], val_tokens, run_dir, spans,
               masks, handoffs, mesh, batches, initial, spec, where, record, start)


def _adapters(cfg, mc: ModelConfig, base: dict):
    """(spec, plan, record, adapters of train.lora.init_from or None) of an adapter run (all
    None otherwise), checked against the base's model (`base`: its weights by keystr) before
    anything compiles."""
    if cfg.train.trainable not in adapters.METHODS:
        return None, None, None, None
    lo = cfg.train.lora
    spec = adapters.AdapterSpec(cfg.train.trainable, lo.rank, float(lo.alpha), float(lo.dropout),
                                tuple(t.strip() for t in lo.targets.split(",") if t.strip()))
    shapes = param_shapes(mc)
    try:
        where = adapters.plan(shapes, spec, f"this RWKV-{mc.version} model "
                                            f"({describe(mc.layer_types)})")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # What the run adds to the base (a learned initial state, a state codec) is in no file the
    # checkpoint points to: it trains, and checkpoints, as a target, or the run cannot keep it.
    for kp, _ in jax.tree_util.tree_leaves_with_path(shapes):
        path = tuple(k.key for k in kp)
        if jax.tree_util.keystr(kp) not in base and path not in where.tuned:
            part = path[1] if path[0].startswith("blocks_") else path[0]
            raise ConfigError(f"train.trainable={spec.method!r}: the base has no "
                              f"{'/'.join(path)}, which this config adds; name {part!r} in "
                              f"train.lora.targets to train it beside the adapters, or leave "
                              f"it out (architecture.learned_init_state, "
                              f"memory.state_compression)")
    start = _adapter_file(lo.init_from, mc, shapes, spec, where) if lo.init_from else None
    if spec.method == "pissa" and spec.dropout:
        log.info("train.lora.dropout=%g: PiSSA has no dropout (RWKV-PEFT's neither); unused",
                 spec.dropout)
        spec = dataclasses.replace(spec, dropout=0.0)
    log.info("adapters: %s r=%d on %d projections (scale %g), %d tensors trained whole",
             spec.method, spec.rank, len(where.lora), spec.scale, len(where.tuned))
    base = cfg.train.init_from
    return spec, where, adapter_record(spec, base, base_fingerprint(base)), start


def _adapter_file(path: str, mc: ModelConfig, shapes, spec, where) -> dict:
    """train.lora.init_from's adapters, checked against the run's: method, rank, alpha, and
    the same projections and whole-trained leaves as train.lora.targets names."""
    field = f"train.lora.init_from={path!r}"
    try:
        loaded, found = read_adapter(path, mc, shapes, alpha=spec.alpha if spec.method == "lora"
                                     else None, rank=spec.rank)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise ConfigError(f"{field}: {e}") from None
    if found.method != spec.method:
        raise ConfigError(f"{field} holds {found.method} adapters, but train.trainable="
                          f"{spec.method!r}" + (" (a PiSSA file needs its initial factors "
                                                 "beside it)" if spec.method == "pissa" else ""))
    have = ({d for d, _ in adapters.adapted(loaded[adapters.LORA])},
            {p for p, _ in adapters.leaf_paths(loaded[adapters.TUNED])})
    for got, want, what in ((have[0], set(where.lora), "adapts"),
                            (have[1], set(where.tuned), "trains whole")):
        if got != want:
            odd = sorted(want - got) or sorted(got - want)
            raise ConfigError(f"{field} {what} {len(got)} tensors where train.lora.targets="
                              f"{','.join(spec.targets)!r} names {len(want)} here (first "
                              f"difference: {'.'.join(odd[0])}); set the targets the file "
                              f"was trained with")
    return loaded


def read_init_from(path: str) -> tuple[ModelConfig, dict]:
    """(the model config, the weights by keystr path) of `train.init_from`: an official .pth, a
    Hugging Face folder (its config.json names an RWKV model_type) or a run / checkpoint
    directory, checked (readable, finite, floating point); ConfigError naming the field
    otherwise."""
    try:
        if os.path.isfile(path):
            source, loaded = import_official(path)
        elif hf_model_type(path) is not None:
            source, loaded = import_hf(path)
        else:
            source, loaded, _ = restore_params(path)
    except (ValueError, FileNotFoundError, ImportError) as e:  # said by the readers in one line
        raise ConfigError(f"train.init_from={path!r} cannot be read: {e}") from None
    return source, {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(loaded)}


# What a run decides for itself when it starts from other weights: how it computes, and the
# parts it adds (a learned initial state and its compression, trained from their fresh init).
_RUN_CHOICES = set(HOW_IT_COMPUTES) | {"learned_init_state", "state_compression", "state_rank"}


def _architecture_from(path: str, source: ModelConfig, mc: ModelConfig) -> ModelConfig:
    """The model of `train.init_from`: its shape (version, sizes, RWKV-7's LoRA ranks, the
    vocabulary, the layer pattern) replaces the config's, each change in a log line, so a
    fine-tuning config names its base, not the base's shape."""
    changes = {}
    for f in dataclasses.fields(ModelConfig):
        old, new = getattr(mc, f.name), getattr(source, f.name)
        if f.name in _RUN_CHOICES or old == new:
            continue
        changes[f.name] = new
        shown = (describe(old), describe(new)) if f.name == "layer_types" else (old, new)
        log.info("train.init_from: %s %r -> %r (from the weights)", config_path(f.name), *shown)
    try:
        return dataclasses.replace(mc, **changes)
    except ValueError as e:
        raise ConfigError(f"train.init_from={path!r}: its model does not fit this config: {e}") from None


def _check_ids(cfg, split: str, tf, vocab_size: int, cache_dir: str) -> None:
    """A source's ids against the model's vocabulary: from a token cache's metadata where it
    has one, and by a (cached) scan of the ids themselves."""
    largest = getattr(tf, "max_token_id", None)
    if largest is not None and largest >= vocab_size:
        raise ConfigError(
            f"model.vocab_size={vocab_size} is smaller than the largest token id {largest} in "
            f"data.{split} ({tf.path}); use at least {largest + 1}")
    try:  # the ids themselves, which damage or a hand-made file may set apart from the metadata
        check_token_ids(tf, vocab_size, cache_dir)
    except ValueError as e:
        raise ConfigError(f"data.{split}={cfg.data[split]!r}: {e}") from None


def _batches(cfg, train_sources) -> Batches:
    """The training batches, their sampler checked against the data before anything compiles."""
    d, T = cfg.data, cfg.train.max_seq_length
    for source, _ in train_sources:
        if isinstance(source, DocumentFile):
            if source.num_docs < 1:
                raise ConfigError(f"data.train_file: {source.path} holds no documents")
        elif source.num_tokens < T + 1:
            raise ConfigError(f"data.train_file has {source.num_tokens} tokens, fewer than "
                              f"train.max_seq_length + 1 = {T + 1}")
    try:
        batches = Batches(train_sources, sampler=d.sampler, seed=cfg.seed,
                          batch_size=cfg.train.batch_size, seq_len=T, prime=d.magic_prime,
                          world_size=d.rwkv_lm_world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if batches.prime and not d.magic_prime:
        log.info("data.sampler='rwkv_lm': data.magic_prime=%d (the largest valid for %d tokens "
                 "at ctx %d)", batches.prime, len(batches.sources[0][0].tokens), T)
    long, untrained, docs = batches.long_documents()
    if long:
        log.info("data.train_file: %d of %d documents are longer than train.max_seq_length + 1 "
                 "= %d tokens; rows take their first %d", long, docs, T + 1, T + 1)
    if untrained:
        log.warning("data.train_file: %d of %d documents have no trained token (an assistant's) "
                    "in their first %d: their rows teach nothing", untrained, docs, T + 1)
    return batches


def resolve_horizon(manager: TrainCheckpointer, resume: int | None, run: Run) -> None:
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


def run_summary(run: Run) -> str:
    mc = run.model_config
    return json.dumps({"layers": describe(mc.layer_types), "chunk": run.chunk_len,
                       "chunks_per_sequence": len(run.spans), "tokens_per_step": run.tokens_per_step})
