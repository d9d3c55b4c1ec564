"""The configuration: one schema (SCHEMA), and the ModelConfig the model takes, built from it.

A run's config is an ml_collections ConfigDict made from SCHEMA (`default_config()`), checked by
`validate()`. The model takes a `ModelConfig` (frozen and hashable, so it can be a Flax module
attribute and a static jit argument): its fields take their defaults from SCHEMA and name the
config path they come from, so `model_config_from(cfg)` reads them without a list of its own and
a bad value is reported under the path a user types (`efficiency.precision='fp8' is invalid`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from rwkv_jax import hybrid

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")  # efficiency.precision
POS_EMBS = ("none", "learned", "rotary")
REMAT_POLICIES = (
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "everything_saveable",
)
ATTN_IMPLS = ("auto", "xla", "cudnn")
VERSIONS = ("4", "7")  # RWKV-4, RWKV-7 ("x070", "Goose")
# RWKV-7 LoRA ranks when the config leaves them at 0: RWKV-LM's suggestion
# max(32, round(factor * sqrt(n_embd) / 32) * 32), with these factors (RWKV-v7/train_temp).
LORA_FACTORS = {"dim_w_lora": 2.5, "dim_a_lora": 2.5, "dim_v_lora": 1.7, "dim_g_lora": 5.0}


def official_lora_dim(field: str, n_embd: int) -> int:
    """RWKV-LM's LoRA rank for an RWKV-7 model of width n_embd (Python's round, as there)."""
    return max(32, int(round(LORA_FACTORS[field] * (n_embd**0.5) / 32) * 32))


STATE_COMPRESSIONS = ("none", "bf16", "int8", "learned")

# ----------------------------------------------------------------------------------------------
# The training / inference config: one ml_collections ConfigDict, grouped the way users look
# for things. Config files under configs/ start from `default_config()` and change fields;
# `validate()` checks the whole thing before any data is read or anything compiles.
# ----------------------------------------------------------------------------------------------

ON_DAMAGE = ("refuse", "previous")  # checkpoint.on_damage


class ConfigError(ValueError):
    """A bad config value; the message names the field, the value and what would be valid."""


# Every field a config may set: its default and what it means, in one place. default_config()
# builds the ConfigDict from it and `train.py --help` prints it.
SCHEMA = {
    "": dict(
        experiment_name=("run", "the run's directory: output_dir/experiment_name"),
        output_dir=("runs", "where runs (and the token cache, unless data.cache_dir) live"),
        seed=(0, "initialisation and the order of training windows"),
    ),
    "model": dict(
        version=("4", '"4" (RWKV-4) or "7" (RWKV-7, x070) time-mix in every RWKV layer'),
        vocab_size=(0, "0: the tokenizer's vocabulary size"),
        n_layer=(4, "layers"),
        n_embd=(128, "channels (width)"),
        dim_ffn=(0, "channel-mix width (0: 4 x n_embd)"),
        attn_head_size=(64, "attention layers: head size"),
        attn_window=(1024, "attention layers: past tokens each one sees (its KV state's length)"),
        head_size=(64, "RWKV-7: time-mix head size"),
        dim_w_lora=(0, "RWKV-7: decay LoRA rank (0: RWKV-LM's formula)"),
        dim_a_lora=(0, "RWKV-7: in-context learning rate LoRA rank (0: RWKV-LM's formula)"),
        dim_v_lora=(0, "RWKV-7: value residual LoRA rank (0: RWKV-LM's formula)"),
        dim_g_lora=(0, "RWKV-7: gate LoRA rank (0: RWKV-LM's formula)"),
    ),
    "architecture": dict(
        layer_pattern=("rwkv", "which layers are RWKV or attention: "
                               + " | ".join(hybrid.PATTERNS)),
        rwkv_layers=((), "layer_pattern=custom: indices of the RWKV layers"),
        attention_layers=((), "layer_pattern=custom: indices of the attention layers"),
        pos_emb=("none", "position embeddings: none | learned | rotary (attention layers)"),
        max_positions=(4096, "rows of the learned position table"),
        learned_init_state=(False, "a trained initial state per RWKV layer"),
    ),
    "memory": dict(
        use_rwkv_chunking=(True, "train train.max_seq_length in chunks, the state passed on"),
        rwkv_chunk_size=(256, "tokens of a chunk"),
        chunk_overlap=(0, "tokens each chunk repeats from the previous one (loss-masked)"),
        state_compression=("none", "states stored between chunks: none | bf16 | int8 | learned"),
        state_rank=(0, "learned compression: rank of the per-layer codec (0: n_embd // 4)"),
    ),
    # How the model computes, not what it is: a run may resume with other values.
    "efficiency": dict(
        precision=("float32", "compute dtype of matrix products: float32 | bfloat16 | float16"),
        wkv_impl=("auto", "WKV kernel: auto | scan | chunked | pallas (| assoc for RWKV-4)"),
        wkv_chunk_size=(64, "time steps per block of the parallel WKV kernels"),
        remat=(False, "recompute each block's activations in the backward pass"),
        remat_policy=("nothing_saveable", "what remat keeps: " + " | ".join(REMAT_POLICIES)),
        attn_impl=("auto", "attention: auto | xla | cudnn"),
        donate=(True, "let XLA reuse the train state's buffers in place"),
    ),
    "train": dict(
        batch_size=(8, "sequences per step (global, over all devices and hosts)"),
        max_seq_length=(256, "tokens per sequence"),
        steps=(1000, "train until this step; the same command resumes up to it"),
        trainable=("all", "what trains: all | state (the learned initial state alone)"),
        init_from=("", "start from these weights: an official .pth or a run / checkpoint dir"),
        loss_scale=(2.0**15, "float16: the initial dynamic loss scale"),
    ),
    "optimizer": dict(
        lr=(6e-4, "peak learning rate"),
        lr_final=(1e-5, "learning rate at the end of the schedule"),
        warmup_steps=(0, "linear warm-up steps"),
        total_steps=(0, "the schedule's horizon (0: train.steps); kept by a resumed run"),
        schedule=("cosine", "decay after warm-up: cosine | exponential | constant"),
        b1=(0.9, "AdamW beta1"),
        b2=(0.99, "AdamW beta2"),
        eps=(1e-8, "AdamW epsilon"),
        weight_decay=(0.1, "weight decay of matrices outside RWKV layers"),
        rwkv_att_weight_decay=(0.1, "weight decay of RWKV time-mix matrices"),
        rwkv_ffn_weight_decay=(0.1, "weight decay of RWKV channel-mix matrices"),
        rwkv_lr_multiplier=(1.0, "learning-rate multiplier of RWKV layers"),
        time_decay_lr_mult=(2.0, "learning-rate multiplier of time_decay / w0"),
        time_first_lr_mult=(3.0, "learning-rate multiplier of time_first"),
        grad_clip=(1.0, "global gradient-norm clip (0: none)"),
    ),
    "data": dict(
        tokenizer=("byte", "byte | world | a Hugging Face tokenizer .json file"),
        train_file=("", "training text (.txt, .txt.xz, .txt.gz) or a prepared .bin token file"),
        val_file=("", "validation text or .bin token file"),
        cache_dir=("", "where tokenized text is cached (empty: output_dir/data)"),
    ),
    "checkpoint": dict(
        every=(200, "steps between saves, and one at the end (0: never save)"),
        keep=(3, "newest checkpoints kept"),
        resume=(True, "continue from the run's newest checkpoint"),
        on_damage=("refuse", "a damaged newest checkpoint (checksums differ): refuse | previous "
                             "(resume from the newest intact one, setting the damaged aside)"),
    ),
    "logging": dict(
        every=(10, "steps between log lines / progress updates"),
        eval_every=(200, "steps between evaluations (0: none)"),
        eval_tokens=(65536, "validation tokens per evaluation (0: all of them)"),
        tensorboard=(True, "write tensorboard logs to the run's tb/"),
        progress=(True, "show a progress bar (else a log line every logging.every steps)"),
        verbose=(False, "log more detail (each optimizer group's tensors)"),
    ),
    "mesh": dict(
        data=(-1, "devices over which the batch splits (-1: the rest)"),
        fsdp=(1, "devices over which parameters and optimizer state shard"),
        tensor=(1, "devices over which matrices split (tensor parallelism)"),
    ),
    "dist": dict(
        coordinator_address=("", "process 0's host:port (empty: detected from SLURM / Open MPI, "
                                 "or one process)"),
        num_processes=(0, "processes in the run (0: detected)"),
        process_id=(-1, "this process's index (-1: detected)"),
        initialization_timeout=(300, "seconds to wait for every process to join"),
        heartbeat_timeout=(100, "seconds of silence after which a process counts as dead"),
    ),
}


# Fields that moved: old path -> new path. The old path still works, in a config file or as
# --config.OLD=VALUE, sets the new field and says so in one line.
MOVED = {
    "memory.remat_policy": "efficiency.remat_policy",
    "memory.wkv_chunk_size": "efficiency.wkv_chunk_size",
}


def schema_default(path: str):
    """SCHEMA's default of a dotted path ("efficiency.precision", "seed")."""
    group, _, name = path.rpartition(".")
    return SCHEMA[group][name][0]


def _from_schema(path: str):
    """A ModelConfig field that a config sets at `path`, with the schema's default."""
    return dataclasses.field(default=schema_default(path), metadata={"path": path})


def _own(default, path: str | None = None):
    """A ModelConfig field with a default of its own: not a config field (`path` None), or one
    whose config value means something else (model.vocab_size=0: the tokenizer's)."""
    return dataclasses.field(default=default, metadata={"path": path} if path else {})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # "4": RWKV-4; "7": RWKV-7 (its time-mix and channel-mix in every RWKV layer)
    version: str = _from_schema("model.version")
    vocab_size: int = _own(256, "model.vocab_size")
    n_layer: int = _from_schema("model.n_layer")
    n_embd: int = _from_schema("model.n_embd")
    dim_att: int = _own(0)  # 0: n_embd (RWKV-LM's default)
    dim_ffn: int = _from_schema("model.dim_ffn")  # 0: 4 * n_embd
    # "rwkv" / "attn" per layer; empty: all RWKV. From architecture.layer_pattern and its
    # index lists by hybrid.resolve_layer_pattern.
    layer_types: tuple[str, ...] = _own(())
    attn_head_size: int = _from_schema("model.attn_head_size")
    attn_window: int = _from_schema("model.attn_window")  # past tokens an attention layer sees
    attn_impl: str = _from_schema("efficiency.attn_impl")
    pos_emb: str = _from_schema("architecture.pos_emb")
    max_positions: int = _from_schema("architecture.max_positions")
    rope_base: float = _own(10000.0)
    learned_init_state: bool = _from_schema("architecture.learned_init_state")
    dtype: str = _from_schema("efficiency.precision")  # compute dtype of the matrix products
    wkv_impl: str = _from_schema("efficiency.wkv_impl")
    wkv_chunk_size: int = _from_schema("efficiency.wkv_chunk_size")
    remat: bool = _from_schema("efficiency.remat")
    remat_policy: str = _from_schema("efficiency.remat_policy")
    layer_norm_eps: float = _own(1e-5)  # torch's LayerNorm default, which the official weights use
    emb_init_scale: float = _own(1e-4)  # RWKV-LM: uniform(-lr_init, lr_init)
    # How states stored between chunks and between calls are compressed (rwkv_jax.state_codec).
    # "learned" adds a small per-layer codec, trained with the model, under params["state_codec"].
    state_compression: str = _from_schema("memory.state_compression")
    state_rank: int = _from_schema("memory.state_rank")  # learned codec: 0 means n_embd // 4
    # RWKV-7 only: the head size of its time-mix (n_embd / head_size heads) and the ranks of
    # its LoRA projections (decay w, in-context learning rate a, value residual v, gate g);
    # 0: RWKV-LM's formula (official_lora_dim).
    head_size: int = _from_schema("model.head_size")
    dim_w_lora: int = _from_schema("model.dim_w_lora")
    dim_a_lora: int = _from_schema("model.dim_a_lora")
    dim_v_lora: int = _from_schema("model.dim_v_lora")
    dim_g_lora: int = _from_schema("model.dim_g_lora")

    def __post_init__(self):
        if isinstance(self.version, int) and not isinstance(self.version, bool):
            object.__setattr__(self, "version", str(self.version))
        if not self.layer_types:  # (a bad n_layer is validate's to report)
            n = self.n_layer if isinstance(self.n_layer, int) else 0
            object.__setattr__(self, "layer_types", (hybrid.RWKV,) * n)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if not self.dim_att:
            object.__setattr__(self, "dim_att", self.n_embd)
        if not self.dim_ffn:
            object.__setattr__(self, "dim_ffn", 4 * self.n_embd)
        if self.version == "7" and isinstance(self.n_embd, int) and self.n_embd >= 1:
            for field in LORA_FACTORS:
                if getattr(self, field) == 0:
                    object.__setattr__(self, field, official_lora_dim(field, self.n_embd))
        self.validate()

    @property
    def attn_heads(self) -> int:
        return self.n_embd // self.attn_head_size

    @property
    def n_head(self) -> int:
        """RWKV-7 time-mix heads."""
        return self.n_embd // self.head_size

    @property
    def first_rwkv_layer(self) -> int | None:
        """The RWKV layer whose value every later RWKV-7 layer mixes in (v_first); None if none."""
        return self.layer_types.index(hybrid.RWKV) if hybrid.RWKV in self.layer_types else None

    @property
    def codec_rank(self) -> int:
        return self.state_rank or max(1, self.n_embd // 4)

    @property
    def has_attention(self) -> bool:
        return hybrid.ATTN in self.layer_types

    def is_rwkv(self, layer: int) -> bool:
        return self.layer_types[layer] == hybrid.RWKV

    def validate(self) -> None:
        def need(ok: bool, field: str, value: Any, valid: str):
            if not ok:
                raise ConfigError(f"{config_path(field)}={value!r} is invalid: {valid}")

        need(self.version in VERSIONS, "version", self.version,
             f"one of {VERSIONS} (RWKV-4 or RWKV-7)")
        for field in ("vocab_size", "n_layer", "n_embd", "dim_att", "dim_ffn", "attn_window",
                      "max_positions", "wkv_chunk_size"):
            value = getattr(self, field)
            need(isinstance(value, int) and value >= 1, field, value, "must be an integer >= 1")
        need(len(self.layer_types) == self.n_layer, "layer_types", self.layer_types,
             f"must name {self.n_layer} layers (model.n_layer)")
        bad = [t for t in self.layer_types if t not in (hybrid.RWKV, hybrid.ATTN)]
        need(not bad, "layer_types", self.layer_types, "each entry must be 'rwkv' or 'attn'")
        need(self.dim_att == self.n_embd, "dim_att", self.dim_att,
             f"must equal model.n_embd={self.n_embd} (RWKV-{self.version} keeps the residual width)")
        if self.version == "7":
            need(isinstance(self.head_size, int) and self.head_size >= 1
                 and self.n_embd % self.head_size == 0, "head_size", self.head_size,
                 f"must divide model.n_embd={self.n_embd} (RWKV-7 heads: n_embd / head_size)")
            for field in LORA_FACTORS:
                value = getattr(self, field)
                need(isinstance(value, int) and value >= 1, field, value,
                     "must be an integer >= 1 (0: RWKV-LM's formula)")
        if self.has_attention:
            need(self.attn_head_size >= 1 and self.n_embd % self.attn_head_size == 0,
                 "attn_head_size", self.attn_head_size,
                 f"must divide model.n_embd={self.n_embd}")
            if self.pos_emb == "rotary":
                need(self.attn_head_size % 2 == 0, "attn_head_size", self.attn_head_size,
                     "must be even for rotary position embeddings")
        need(self.attn_impl in ATTN_IMPLS, "attn_impl", self.attn_impl, f"one of {ATTN_IMPLS}")
        need(self.pos_emb in POS_EMBS, "pos_emb", self.pos_emb, f"one of {POS_EMBS}")
        need(self.dtype in DTYPES, "dtype", self.dtype, f"one of {DTYPES}")
        # (ops import no config)
        from rwkv_jax.ops.wkv4 import IMPLS as IMPLS4  # noqa: PLC0415
        from rwkv_jax.ops.wkv7 import IMPLS as IMPLS7  # noqa: PLC0415

        impls = IMPLS7 if self.version == "7" else IMPLS4
        need(self.wkv_impl in impls, "wkv_impl", self.wkv_impl,
             f"one of {impls} for model.version={self.version!r}")
        need(self.remat_policy in REMAT_POLICIES, "remat_policy", self.remat_policy,
             f"one of {REMAT_POLICIES}")
        need(self.state_compression in STATE_COMPRESSIONS, "state_compression",
             self.state_compression, f"one of {STATE_COMPRESSIONS}")
        need(isinstance(self.state_rank, int) and self.state_rank >= 0, "state_rank",
             self.state_rank, "must be an integer >= 0 (0: n_embd // 4)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """From a flat dict of fields; `layer_pattern` ("custom" with `rwkv_layers` /
        `attention_layers`, or a preset) resolves to layer_types as the config's does."""
        d = dict(d)
        pattern = d.pop("layer_pattern", None)
        rwkv_layers = d.pop("rwkv_layers", None)
        attention_layers = d.pop("attention_layers", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model option(s) {unknown}; valid options: {sorted(names)}")
        if pattern is not None or rwkv_layers or attention_layers:
            d["layer_types"] = hybrid.resolve_layer_pattern(
                pattern, d.get("n_layer", cls.n_layer), rwkv_layers, attention_layers)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)



def config_path(field: str) -> str:
    """Where a config sets a ModelConfig field ("dtype" -> "efficiency.precision")."""
    return _FIELDS[field].metadata.get("path", f"model.{field}")


_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}


def default_config():
    """Every field a config may set, with its default (SCHEMA). Unknown fields are errors."""
    import ml_collections  # noqa: PLC0415  (the library core does not need it)

    c = ml_collections.ConfigDict()
    for group, fields in SCHEMA.items():
        values = {name: default for name, (default, _) in fields.items()}
        if group:
            c[group] = ml_collections.ConfigDict(values)
        else:
            c.update(values)
    for old, new in MOVED.items():  # unset (None) unless a config file or flag sets it
        group, name = old.split(".")
        c[group][name] = ml_collections.config_dict.placeholder(type(schema_default(new)))
    return c


def resolve_moved(cfg) -> None:
    """Move the values set at old paths (MOVED) to their new ones, once, saying so in one line;
    the old fields leave the config (and so its config.json)."""
    for old, new in MOVED.items():
        group, name = old.split(".")
        if name not in cfg[group]:
            continue  # resolved before, or a config made without default_config()
        value = cfg[group][name]
        if value is not None:
            log.warning("config: %s is now %s", old, new)
            new_group, new_name = new.split(".")
            cfg[new_group][new_name] = value
        with cfg[group].unlocked():
            del cfg[group][name]


def describe_schema() -> str:
    """The config groups and fields with their defaults and meanings, for `--help`."""
    lines = []
    for group, fields in SCHEMA.items():
        lines.append(f"{group or 'top level'}:")
        for name, (default, meaning) in fields.items():
            key = f"  {group + '.' if group else ''}{name}={default!r}"
            lines.append(f"{key:<42} {meaning}" if len(key) < 42 else f"{key}\n{'':<42} {meaning}")
    lines.append("moved (the old path still works, with a note):")
    lines += [f"  {old} -> {new}" for old, new in MOVED.items()]
    return "\n".join(lines)


def _check_known(cfg, schema, prefix: str = "") -> None:
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            valid = ", ".join(sorted(schema.keys()))
            raise ConfigError(f"unknown option {name!r}; valid options here: {valid}")
        sub, ref = cfg[key], schema[key]
        if hasattr(ref, "keys") and hasattr(sub, "keys"):
            _check_known(sub, ref, name + ".")


def model_config_from(cfg, vocab_size: int | None = None) -> ModelConfig:
    """The ModelConfig a training config describes: every field with a config path read from
    there, the layer pattern resolved (hybrid), the vocabulary the tokenizer's unless set."""
    resolve_moved(cfg)
    m, a = cfg.model, cfg.architecture
    vocab = m.vocab_size or vocab_size
    if not vocab:
        raise ConfigError("model.vocab_size=0 needs a tokenizer to take the vocabulary size from")
    values = {}
    for name, f in _FIELDS.items():
        if "path" in f.metadata:
            group, key = f.metadata["path"].split(".")
            values[name] = cfg[group][key]
    values["vocab_size"] = int(vocab)
    try:
        # A bad n_layer is ModelConfig's to report; the pattern needs a good one.
        if isinstance(m.n_layer, int) and m.n_layer >= 1:
            values["layer_types"] = hybrid.resolve_layer_pattern(
                a.layer_pattern, m.n_layer, a.rwkv_layers, a.attention_layers,
                n_embd=m.n_embd, seq_len=cfg.train.max_seq_length)
        return ModelConfig(**values)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# ModelConfig fields that say how the model computes, not what it is: a run may resume with
# other values (bf16 after float32, another WKV implementation, remat on). The efficiency group
# and the embedding's init scale; every other field, and any added later, changes the model.
_HOW_IT_COMPUTES = tuple(name for name in _FIELDS
                         if config_path(name).startswith("efficiency.")) + ("emb_init_scale",)


def model_differences(saved: ModelConfig, current: ModelConfig) -> list[str]:
    """Where two configs describe different models (other parameters, or the same parameters
    meaning something else), as "field: saved -> current" with the training config's names."""
    out = []
    for f in dataclasses.fields(ModelConfig):
        name, a, b = f.name, getattr(saved, f.name), getattr(current, f.name)
        if name in _HOW_IT_COMPUTES or a == b:
            continue
        if name == "layer_types" and saved.n_layer != current.n_layer:
            continue  # said by n_layer
        if name == "state_compression" and "learned" not in (a, b):
            continue  # only the learned codec has parameters
        if name == "state_rank" and saved.state_compression != "learned":
            continue
        if name == "layer_types":
            out.append(f"architecture.layer_pattern: {hybrid.describe(a)} -> {hybrid.describe(b)}")
        else:
            out.append(f"{config_path(name)}: {a!r} -> {b!r}")
    return out


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
    _check_known(cfg, default_config())
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
    need(t.trainable in ("all", "state"), "train.trainable", t.trainable, "one of ('all', 'state')")
    need(cfg.checkpoint.on_damage in ON_DAMAGE, "checkpoint.on_damage", cfg.checkpoint.on_damage,
         f"one of {ON_DAMAGE}")
    if t.trainable == "state":
        need(a.learned_init_state, "train.trainable", t.trainable,
             "state tuning needs architecture.learned_init_state=True (the state it trains)")
    if mem.use_rwkv_chunking:
        check_chunking(t.max_seq_length, mem.rwkv_chunk_size, mem.chunk_overlap)
    if t.init_from:
        need(os.path.exists(t.init_from), "train.init_from", t.init_from,
             "no such file or directory (an official .pth, or a run or checkpoints directory)")
    for split in ("train_file", "val_file"):
        path = cfg.data[split]
        need(bool(path), f"data.{split}", path, "a text file (or a prepared .bin token file) is required")
        need(os.path.isfile(path), f"data.{split}", path, "no such file")
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
    from rwkv_jax.optim import make_schedule  # noqa: PLC0415

    try:
        make_schedule(optimizer_config_from(cfg))
    except ValueError as e:
        raise ConfigError(f"optimizer: {e}") from None
    # The model's fields wherever they live (sizes, pattern, precision, state compression);
    # the vocabulary is checked against the data once the tokenizer is known (rwkv_jax.trainer).
    model_config_from(cfg, vocab_size=cfg.model.vocab_size or 1 << 16)


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
