"""The model's configuration: a frozen dataclass with defaults and checks.

The model takes a `ModelConfig` (hashable, so it can be a Flax module attribute and a static
jit argument). Config files under configs/ hold an ml_collections `model` section that
`ModelConfig.from_dict` turns into one, naming the field of any bad value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from rwkv_jax import hybrid

DTYPES = ("float32", "bfloat16", "float16")
POS_EMBS = ("none", "learned", "rotary")
REMAT_POLICIES = (
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "everything_saveable",
)
ATTN_IMPLS = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    n_layer: int = 4
    n_embd: int = 128
    dim_att: int = 0  # 0: n_embd (RWKV-LM's default)
    dim_ffn: int = 0  # 0: 4 * n_embd
    # "rwkv" / "attn" per layer; empty: all RWKV. Build it with rwkv_jax.hybrid.
    layer_types: tuple[str, ...] = ()
    attn_head_size: int = 64
    attn_window: int = 1024  # past tokens an attention layer sees (its KV state's length)
    attn_impl: str = "auto"
    pos_emb: str = "none"
    max_positions: int = 4096  # rows of the learned position table
    rope_base: float = 10000.0
    learned_init_state: bool = False
    dtype: str = "float32"  # compute dtype of the matrix products
    wkv_impl: str = "auto"
    wkv_chunk_size: int = 64
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    layer_norm_eps: float = 1e-5  # torch's LayerNorm default, which the official weights use
    emb_init_scale: float = 1e-4  # RWKV-LM: uniform(-lr_init, lr_init)

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (hybrid.RWKV,) * self.n_layer)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if not self.dim_att:
            object.__setattr__(self, "dim_att", self.n_embd)
        if not self.dim_ffn:
            object.__setattr__(self, "dim_ffn", 4 * self.n_embd)
        self.validate()

    @property
    def attn_heads(self) -> int:
        return self.n_embd // self.attn_head_size

    @property
    def has_attention(self) -> bool:
        return hybrid.ATTN in self.layer_types

    def is_rwkv(self, layer: int) -> bool:
        return self.layer_types[layer] == hybrid.RWKV

    def validate(self) -> None:
        def need(ok: bool, field: str, value: Any, valid: str):
            if not ok:
                raise ValueError(f"model.{field}={value!r} is invalid: {valid}")

        for field in ("vocab_size", "n_layer", "n_embd", "dim_att", "dim_ffn", "attn_window",
                      "max_positions", "wkv_chunk_size"):
            value = getattr(self, field)
            need(isinstance(value, int) and value >= 1, field, value, "must be an integer >= 1")
        need(len(self.layer_types) == self.n_layer, "layer_types", self.layer_types,
             f"must name {self.n_layer} layers (model.n_layer)")
        bad = [t for t in self.layer_types if t not in (hybrid.RWKV, hybrid.ATTN)]
        need(not bad, "layer_types", self.layer_types, "each entry must be 'rwkv' or 'attn'")
        need(self.dim_att == self.n_embd, "dim_att", self.dim_att,
             f"must equal model.n_embd={self.n_embd} (RWKV-4 keeps the residual width)")
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
        from rwkv_jax.ops.wkv4 import IMPLS  # noqa: PLC0415  (ops import no config)

        need(self.wkv_impl in IMPLS, "wkv_impl", self.wkv_impl, f"one of {IMPLS}")
        need(self.remat_policy in REMAT_POLICIES, "remat_policy", self.remat_policy,
             f"one of {REMAT_POLICIES}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """From a config file's `model` section; layer pattern fields resolve to layer_types.

        `layer_pattern` is a preset ("alternating", "rwkv", "attention") or "custom", in which
        case `rwkv_layers` / `attention_layers` give the indices.
        """
        d = dict(d)
        pattern = d.pop("layer_pattern", None)
        rwkv_layers = d.pop("rwkv_layers", None)
        attention_layers = d.pop("attention_layers", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model option(s) {unknown}; valid options: {sorted(names)}")
        n_layer = d.get("n_layer", cls.n_layer)
        if pattern == "custom" or (pattern is None and (rwkv_layers or attention_layers)):
            d["layer_types"] = hybrid.build_layer_pattern(
                n_layer, _none_if_empty(rwkv_layers), _none_if_empty(attention_layers)
            )
        elif pattern is not None:
            d["layer_types"] = hybrid.preset_pattern(pattern, n_layer)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _none_if_empty(x):
    if x is None or (hasattr(x, "__len__") and len(x) == 0):
        return None
    return [int(i) for i in x]
