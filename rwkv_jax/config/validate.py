"""`validate(cfg)`: the whole run config checked before any data is read or anything compiles;
each fact in one place, each error one line naming the field, the value and what is valid.
"""

from __future__ import annotations

import math
import os

from rwkv_jax.config.model import model_config_from
from rwkv_jax.config.schema import (
    ON_DAMAGE,
    SAMPLERS,
    ConfigError,
    check_known,
    default_config,
    resolve_moved,
)


TRAINABLE = ("all", "state", "lora", "pissa")  # train.trainable


def optimizer_config_from(cfg):
    """The optimizer section with what it takes from elsewhere filled in."""
    opt = cfg.optimizer.copy_and_resolve_references()
    with opt.unlocked():
        opt.total_steps = opt.total_steps or cfg.train.steps
        opt.trainable = cfg.train.trainable
    return opt


def _validate_optimizer(cfg, need) -> None:
    """AdamW's settings: what would train backwards, divide by zero or never finish warming up."""
    o = cfg.optimizer
    finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
    need(finite(o.lr) and o.lr > 0, "optimizer.lr", o.lr, "must be a finite number > 0")
    need(finite(o.lr_final) and o.lr_final >= 0, "optimizer.lr_final", o.lr_final,
         "must be a finite number >= 0")
    for name in ("weight_decay", "rwkv_att_weight_decay", "rwkv_ffn_weight_decay", "grad_clip",
                 "rwkv_lr_multiplier", "time_decay_lr_mult", "time_first_lr_mult"):
        need(finite(o[name]) and o[name] >= 0, f"optimizer.{name}", o[name],
             "must be a finite number >= 0")
    for name in ("b1", "b2"):
        need(finite(o[name]) and 0 <= o[name] < 1, f"optimizer.{name}", o[name],
             "must be in [0, 1)")
    need(finite(o.eps) and o.eps > 0, "optimizer.eps", o.eps, "must be a finite number > 0")
    total = o.total_steps or cfg.train.steps
    if o.schedule != "constant" and isinstance(o.warmup_steps, int) and o.warmup_steps >= total:
        need(False, "optimizer.warmup_steps", o.warmup_steps,
             f"must be below the schedule's {total} steps (optimizer.total_steps, 0 meaning "
             f"train.steps) for schedule {o.schedule!r}")


def validate(cfg) -> None:
    """Check a whole config before any data is read or compiled; raise ConfigError naming the field."""
    resolve_moved(cfg)
    check_known(cfg, default_config())
    t, mem, a = cfg.train, cfg.memory, cfg.architecture

    def need(ok, field, value, valid):
        if not ok:
            raise ConfigError(f"{field}={value!r} is invalid: {valid}")

    for field in ("train.batch_size", "train.max_seq_length", "train.steps", "checkpoint.keep",
                  "logging.every"):
        group, key = field.split(".")
        value = cfg[group][key]
        need(isinstance(value, int) and value >= 1, field, value, "must be an integer >= 1")
    for field in ("checkpoint.every", "logging.eval_every"):
        group, key = field.split(".")
        value = cfg[group][key]
        need(isinstance(value, int) and value >= 0, field, value, "must be an integer >= 0 (0: never)")
    need(t.trainable in TRAINABLE, "train.trainable", t.trainable, f"one of {TRAINABLE}")
    need(cfg.checkpoint.on_damage in ON_DAMAGE, "checkpoint.on_damage", cfg.checkpoint.on_damage,
         f"one of {ON_DAMAGE}")
    if t.trainable == "state":
        need(a.learned_init_state, "train.trainable", t.trainable,
             "state tuning needs architecture.learned_init_state=True (the state it trains)")
    _validate_lora(cfg, need)
    if mem.use_rwkv_chunking:
        check_chunking(t.max_seq_length, mem.rwkv_chunk_size, mem.chunk_overlap)
    if t.init_state_from:
        need(os.path.isfile(t.init_state_from), "train.init_state_from", t.init_state_from,
             "no such file (a state file: infer.py --export_state, or a time_state .pth)")
        need(a.learned_init_state, "train.init_state_from", t.init_state_from,
             "a starting state is for a learned one: set architecture.learned_init_state=True")
    if t.init_from:
        need(os.path.exists(t.init_from), "train.init_from", t.init_from,
             "no such file or directory (an official .pth, or a run or checkpoints directory)")
    _validate_data(cfg, need)
    if cfg.data.tokenizer not in ("byte", "world") and not str(cfg.data.tokenizer).endswith(".json"):
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer!r} is invalid: 'byte', 'world' "
                          "or a Hugging Face tokenizer .json file")
    need(isinstance(cfg.seed, int) and cfg.seed >= 0, "seed", cfg.seed, "must be an integer >= 0")
    need(isinstance(cfg.logging.eval_tokens, int) and cfg.logging.eval_tokens >= 0,
         "logging.eval_tokens", cfg.logging.eval_tokens, "must be an integer >= 0 (0: all of it)")
    if a.pos_emb == "learned":
        need(a.max_positions >= t.max_seq_length, "architecture.max_positions", a.max_positions,
             f"must be >= train.max_seq_length={t.max_seq_length} (the learned position table "
             f"needs a row for every position of a sequence)")
    _validate_optimizer(cfg, need)
    # The model's fields wherever they live (sizes, pattern, precision, state compression);
    # the vocabulary is checked against the data once the tokenizer is known (train.run.prepare).
    model_config_from(cfg, vocab_size=cfg.model.vocab_size or 1 << 16)


def _validate_lora(cfg, need) -> None:
    t, lo = cfg.train, cfg.train.lora
    adapters = t.trainable in ("lora", "pissa")
    if adapters:
        need(bool(t.init_from), "train.trainable", t.trainable,
             "adapters fine-tune a base: set train.init_from to its .pth (or run directory)")
    need(isinstance(lo.rank, int) and lo.rank >= 1, "train.lora.rank", lo.rank,
         "must be an integer >= 1")
    need(isinstance(lo.alpha, (int, float)) and math.isfinite(lo.alpha) and lo.alpha > 0,
         "train.lora.alpha", lo.alpha, "must be a finite number > 0")
    need(isinstance(lo.dropout, (int, float)) and 0 <= lo.dropout < 1, "train.lora.dropout",
         lo.dropout, "must be >= 0 and < 1")
    need(isinstance(lo.targets, str) and any(x.strip() for x in lo.targets.split(",")),
         "train.lora.targets", lo.targets,
         "a comma-separated list of module or parameter names (att, ffn, ln, head, w0, ...)")
    if lo.init_from:
        need(adapters, "train.lora.init_from", lo.init_from,
             "starts adapters: set train.trainable to lora or pissa")
        need(os.path.isfile(lo.init_from), "train.lora.init_from", lo.init_from,
             "no such file (an adapter file: infer.py --export_adapter, or RWKV-PEFT's)")


def check_chunking(seq_len: int, chunk_size: int, overlap: int) -> None:
    """How a sequence splits into chunks (memory.*): the one check, which data.chunk_spans
    makes too; ConfigError naming the field."""
    def need(ok, field, value, valid):
        if not ok:
            raise ConfigError(f"{field}={value!r} is invalid: {valid}")

    T, L, o = seq_len, chunk_size, overlap
    need(isinstance(T, int) and T >= 1, "train.max_seq_length", T, "must be an integer >= 1")
    need(isinstance(L, int) and 1 <= L <= T, "memory.rwkv_chunk_size", L,
         f"must be between 1 and train.max_seq_length={T}")
    need(isinstance(o, int) and 0 <= o < L, "memory.chunk_overlap", o,
         f"must be >= 0 and < memory.rwkv_chunk_size={L}")
    if o == 0:
        need(T % L == 0, "memory.rwkv_chunk_size", L,
             f"must divide train.max_seq_length={T} (or set memory.chunk_overlap > 0)")


def data_entries(spec: str) -> list[tuple[str, float]]:
    """data.train_file as (path, weight) entries: one path, or a mixture "path:weight,...". An
    entry's last ":" followed by a number always starts its weight (so a file whose name ends
    in ":NUMBER" needs one written after it: "name:1:1"); paths cannot hold commas."""
    entries = []
    for item in str(spec).split(","):
        item = item.strip()
        path, _, weight = item.rpartition(":")
        try:
            entries.append((path, float(weight)) if path else (item, 1.0))
        except ValueError:
            entries.append((item, 1.0))
    return entries


def _exists(path: str) -> bool:
    """A file, or a binidx prefix (PREFIX.idx and PREFIX.bin)."""
    return os.path.isfile(path) or (os.path.isfile(path + ".idx") and os.path.isfile(path + ".bin"))


def _validate_data(cfg, need) -> None:
    d = cfg.data
    for split in ("train_file", "val_file"):
        spec = d[split]
        need(bool(spec), f"data.{split}", spec, "a text, jsonl, binidx or token .bin file is required")
        entries = data_entries(spec)
        need(split == "train_file" or len(entries) == 1, f"data.{split}", spec,
             "one file (a mixture of weighted files is for data.train_file)")
        for path, weight in entries:
            need(weight > 0 and math.isfinite(weight), f"data.{split}", spec,
                 f"the weight of {path!r} must be a number > 0")
            need(_exists(path), f"data.{split}", spec, f"no such file: {path!r}")
    need(d.sampler in SAMPLERS, "data.sampler", d.sampler, f"one of {SAMPLERS}")
    need(isinstance(d.magic_prime, int) and d.magic_prime >= 0, "data.magic_prime",
         d.magic_prime, "an integer >= 0 (0: the largest valid one)")
    need(isinstance(d.rwkv_lm_world_size, int) and d.rwkv_lm_world_size >= 1,
         "data.rwkv_lm_world_size", d.rwkv_lm_world_size, "an integer >= 1")
    if d.sampler == "rwkv_lm":
        need(len(data_entries(d.train_file)) == 1, "data.sampler", d.sampler,
             "rwkv_lm reads one token stream: give data.train_file one file, not a mixture")
