"""The ModelConfig the nn modules take, built from the run config's schema.

ModelConfig is frozen and hashable, so it can be a Flax module attribute and a static jit
argument. Its fields take their defaults from SCHEMA and name the config path they come from,
so `model_config_from(cfg)` reads them without a list of its own and a bad value is reported
under the path a user types (`efficiency.precision='fp8' is invalid`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from rwkv_jax.config.layer_pattern import LayerKind, describe, resolve_layer_pattern
from rwkv_jax.config.schema import (
    ATTN_IMPLS,
    DTYPES,
    LORA_FACTORS,
    POS_EMBS,
    REMAT_POLICIES,
    STATE_COMPRESSIONS,
    VERSIONS,
    WKV_IMPLS,
    ConfigError,
    official_lora_dim,
    resolve_moved,
    schema_default,
)


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
    # index lists by resolve_layer_pattern.
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
    # How states stored between chunks and between calls are compressed (rwkv_jax.nn.state_codec).
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
            object.__setattr__(self, "layer_types", (LayerKind.RWKV,) * n)
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
        return self.layer_types.index(LayerKind.RWKV) if LayerKind.RWKV in self.layer_types else None

    @property
    def codec_rank(self) -> int:
        return self.state_rank or max(1, self.n_embd // 4)

    @property
    def has_attention(self) -> bool:
        return LayerKind.ATTN in self.layer_types

    def is_rwkv(self, layer: int) -> bool:
        return self.layer_types[layer] == LayerKind.RWKV

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
        bad = [t for t in self.layer_types if t not in (LayerKind.RWKV, LayerKind.ATTN)]
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
        impls = WKV_IMPLS["7" if self.version == "7" else "4"]
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
            d["layer_types"] = resolve_layer_pattern(
                pattern, d.get("n_layer", cls.n_layer), rwkv_layers, attention_layers)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_path(field: str) -> str:
    """Where a config sets a ModelConfig field ("dtype" -> "efficiency.precision")."""
    return _FIELDS[field].metadata.get("path", f"model.{field}")


_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}


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
            values["layer_types"] = resolve_layer_pattern(
                a.layer_pattern, m.n_layer, a.rwkv_layers, a.attention_layers,
                n_embd=m.n_embd, seq_len=cfg.train.max_seq_length)
        return ModelConfig(**values)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# ModelConfig fields that say how the model computes, not what it is: a run may resume with
# other values (bf16 after float32, another WKV implementation, remat on). The efficiency group
# and the embedding's init scale; every other field, and any added later, changes the model.
HOW_IT_COMPUTES = tuple(name for name in _FIELDS
                         if config_path(name).startswith("efficiency.")) + ("emb_init_scale",)


def model_differences(saved: ModelConfig, current: ModelConfig) -> list[str]:
    """Where two configs describe different models (other parameters, or the same parameters
    meaning something else), as "field: saved -> current" with the training config's names."""
    out = []
    for f in dataclasses.fields(ModelConfig):
        name, a, b = f.name, getattr(saved, f.name), getattr(current, f.name)
        if name in HOW_IT_COMPUTES or a == b:
            continue
        if name == "layer_types" and saved.n_layer != current.n_layer:
            continue  # said by n_layer
        if name == "state_compression" and "learned" not in (a, b):
            continue  # only the learned codec has parameters
        if name == "state_rank" and saved.state_compression != "learned":
            continue
        if name == "layer_types":
            out.append(f"architecture.layer_pattern: {describe(a)} -> {describe(b)}")
        else:
            out.append(f"{config_path(name)}: {a!r} -> {b!r}")
    return out
