"""The run config's one schema: every field a config may set, with its default and meaning
(SCHEMA), the ml_collections ConfigDict built from it (`default_config()`), fields that moved,
and the `--help` text. Config files under rwkv_jax/configs/ start from `default_config()`.
"""

from __future__ import annotations

import logging

import ml_collections

from rwkv_jax.config.layer_pattern import PATTERNS

log = logging.getLogger(__name__)


DTYPES = ("float32", "bfloat16", "float16")  # efficiency.precision


POS_EMBS = ("none", "learned", "rotary")


REMAT_POLICIES = (
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "dots_and_wkv_saveable",  # the products and the Pallas WKV kernel's outputs and residuals
    "everything_saveable",
)


ATTN_IMPLS = ("auto", "xla", "cudnn")
# efficiency.wkv_impl by model.version (rwkv_jax.ops.wkv4 / wkv7 implement them)
WKV_IMPLS = {"4": ("auto", "scan", "assoc", "chunked", "pallas"), "7": ("auto", "scan", "chunked", "pallas")}


VERSIONS = ("4", "7")  # RWKV-4, RWKV-7 ("x070", "Goose")


# RWKV-7 LoRA ranks when the config leaves them at 0: RWKV-LM's suggestion
# max(32, round(factor * sqrt(n_embd) / 32) * 32), with these factors (RWKV-v7/train_temp).
LORA_FACTORS = {"dim_w_lora": 2.5, "dim_a_lora": 2.5, "dim_v_lora": 1.7, "dim_g_lora": 5.0}


def official_lora_dim(field: str, n_embd: int) -> int:
    """RWKV-LM's LoRA rank for an RWKV-7 model of width n_embd (Python's round, as there)."""
    return max(32, int(round(LORA_FACTORS[field] * (n_embd**0.5) / 32) * 32))


STATE_COMPRESSIONS = ("none", "bf16", "int8", "learned")


ON_DAMAGE = ("refuse", "previous")  # checkpoint.on_damage
SAMPLERS = ("random", "rwkv_lm")  # data.sampler


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
                               + " | ".join(PATTERNS)),
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
        trainable=("all", "what trains: all | state (the learned initial state alone) | lora | "
                          "pissa (low-rank adapters over the frozen bf16 base of "
                          "train.init_from; train.lora.*)"),
        init_from=("", "start from these weights (an official .pth, a Hugging Face folder or a "
                       "run / checkpoint dir); the model's shape comes from them"),
        init_state_from=("", "start the learned initial state from this state file (infer.py "
                             "--export_state, or a community time_state .pth); needs "
                             "architecture.learned_init_state"),
        loss_scale=(2.0**15, "float16: the initial dynamic loss scale"),
    ),
    # RWKV-PEFT's defaults (r 32, alpha 32, dropout 0; it trains the layer norms beside).
    "train.lora": dict(
        rank=(32, "adapter rank r"),
        alpha=(32.0, "LoRA scale alpha / r (PiSSA: unused, its factors carry the scale)"),
        dropout=(0.0, "dropout on each adapted projection's input (LoRA branch only)"),
        targets=("att,ffn,ln", "what adapts: projections by module (att, ffn, head, att.key, "
                               "blocks.3.ffn, ...) get adapters; other parameters named (ln, "
                               "w0, time_decay, emb, ...) train whole"),
        init_from=("", "start the adapters from this adapter file (infer.py --export_adapter "
                       "or RWKV-PEFT's)"),
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
        train_file=("", "training data: text (.txt, .txt.xz, .txt.gz), jsonl (text, prompt/"
                        "response or chat messages), a binidx prefix (RWKV-LM's .bin + .idx), a "
                        "token cache .bin; or a mixture 'path:weight,path:weight,...'"),
        val_file=("", "validation data: text, jsonl, binidx or token cache .bin"),
        sampler=("random", "random: windows (documents for jsonl) drawn from (seed, step) | "
                           "rwkv_lm: RWKV-LM's pretraining sample order over one token stream"),
        magic_prime=(0, "rwkv_lm sampler: RWKV-LM's magic_prime (0: the largest valid one)"),
        rwkv_lm_world_size=(1, "rwkv_lm sampler: the GPU count of the RWKV-LM run whose sample "
                               "order this run reproduces (any process count here)"),
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


def default_config():
    """Every field a config may set, with its default (SCHEMA). Unknown fields are errors."""
    c = ml_collections.ConfigDict()
    for group, fields in SCHEMA.items():
        values = {name: default for name, (default, _) in fields.items()}
        if "." in group:  # a group inside a group: train.lora
            parent, child = group.split(".")
            c[parent][child] = ml_collections.ConfigDict(values)
        elif group:
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


def check_known(cfg, schema, prefix: str = "") -> None:
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            valid = ", ".join(sorted(schema.keys()))
            raise ConfigError(f"unknown option {name!r}; valid options here: {valid}")
        sub, ref = cfg[key], schema[key]
        if hasattr(ref, "keys") and hasattr(sub, "keys"):
            check_known(sub, ref, name + ".")
