"""Layer patterns: which layers are RWKV and which are attention.

A pattern is a tuple of "rwkv" / "attn", one per layer. It is built from index lists, checked
so that every layer is named exactly once, and can be chosen for a target sequence length.
`resolve_layer_pattern` turns the config's `architecture` fields into one; it is the only
place that does, so messages name those fields.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


class LayerKind:
    """What a layer is: the strings ModelConfig.layer_types and config.json hold."""

    RWKV = "rwkv"
    ATTN = "attn"

PRESETS = ("alternating", "rwkv", "attention")
PATTERNS = PRESETS + ("custom", "auto")  # architecture.layer_pattern


def build_layer_pattern(
    n_layer: int,
    rwkv_layers: Sequence[int] | None = None,
    attention_layers: Sequence[int] | None = None,
) -> tuple[str, ...]:
    """Pattern from index lists; either list alone implies the other is the rest.

    With neither list the pattern alternates: even layers RWKV, odd layers attention.
    Indices may be negative (counted from the end, as in Python).
    """
    if n_layer < 1:
        raise ValueError(f"model.n_layer must be >= 1, got {n_layer}")
    if rwkv_layers is None and attention_layers is None:
        return tuple(LayerKind.RWKV if i % 2 == 0 else LayerKind.ATTN for i in range(n_layer))
    rwkv = _normalise(rwkv_layers, n_layer, "architecture.rwkv_layers")
    attn = _normalise(attention_layers, n_layer, "architecture.attention_layers")
    if rwkv is None:
        rwkv = set(range(n_layer)) - attn
    if attn is None:
        attn = set(range(n_layer)) - rwkv
    both = sorted(rwkv & attn)
    if both:
        raise ValueError(
            f"layers {both} are in both architecture.rwkv_layers and architecture.attention_layers; "
            "each layer must be exactly one kind"
        )
    missing = sorted(set(range(n_layer)) - rwkv - attn)
    if missing:
        raise ValueError(
            f"layers {missing} are in neither architecture.rwkv_layers nor architecture.attention_layers; "
            f"together they must cover 0..{n_layer - 1}"
        )
    return tuple(LayerKind.RWKV if i in rwkv else LayerKind.ATTN for i in range(n_layer))


def _normalise(indices, n_layer: int, field: str) -> set[int] | None:
    if indices is None:
        return None
    out = set()
    for i in indices:
        if not isinstance(i, int) or isinstance(i, bool):
            raise ValueError(f"{field} holds {i!r}; layer indices are integers")
        if not -n_layer <= i < n_layer:
            raise ValueError(
                f"{field} holds layer {i}, past the last layer of a {n_layer}-layer model "
                f"(valid: 0..{n_layer - 1}, or -{n_layer}..-1 from the end)"
            )
        out.add(i % n_layer)
    return out


def preset_pattern(name: str, n_layer: int) -> tuple[str, ...]:
    if name == "alternating":
        return build_layer_pattern(n_layer)
    if name == "rwkv":
        return (LayerKind.RWKV,) * n_layer
    if name == "attention":
        return (LayerKind.ATTN,) * n_layer
    raise ValueError(f"architecture.layer_pattern={name!r} is not one of {PATTERNS}")


def resolve_layer_pattern(
    pattern: str | None,
    n_layer: int,
    rwkv_layers: Sequence[int] | None = None,
    attention_layers: Sequence[int] | None = None,
    *,
    n_embd: int | None = None,
    seq_len: int | None = None,
) -> tuple[str, ...]:
    """The pattern the config's architecture fields describe: a preset, "custom" (the index
    lists; also when pattern is None and a list is given), or "auto" (by n_embd and seq_len)."""
    rwkv_layers, attention_layers = _none_if_empty(rwkv_layers), _none_if_empty(attention_layers)
    if pattern == "custom" or (pattern is None and (rwkv_layers or attention_layers)):
        return build_layer_pattern(n_layer, rwkv_layers, attention_layers)
    if pattern is None:
        return (LayerKind.RWKV,) * n_layer
    if pattern == "auto":
        return optimize_for_sequence_length(n_layer, n_embd, seq_len)
    return preset_pattern(pattern, n_layer)


def _none_if_empty(x):
    # Config files hold () for "not given".
    if x is None or (hasattr(x, "__len__") and len(x) == 0):
        return None
    return list(x)


def distribution(pattern: Sequence[str]) -> dict:
    """Counts and percentages of each kind, with the indices of each."""
    n = len(pattern)
    out = {}
    for kind in (LayerKind.RWKV, LayerKind.ATTN):
        idx = [i for i, p in enumerate(pattern) if p == kind]
        out[kind] = {"count": len(idx), "percent": 100.0 * len(idx) / n, "layers": idx}
    return out


def describe(pattern: Sequence[str]) -> str:
    d = distribution(pattern)
    r, a = d[LayerKind.RWKV], d[LayerKind.ATTN]
    return (
        f"{len(pattern)} layers: {r['count']} RWKV ({r['percent']:.0f}%), "
        f"{a['count']} attention ({a['percent']:.0f}%) at {a['layers']}"
    )


def optimize_for_sequence_length(
    n_layer: int, n_embd: int, seq_len: int, attention_budget: float = 0.10
) -> tuple[str, ...]:
    """A pattern whose attention-score FLOPs stay within a budget of the model's FLOPs.

    The rule: every layer costs about 24 n_embd^2 FLOPs per token in its matrices (time-mix
    or attention projections 4 C^2, the feed-forward 8 C^2, times 2 for multiply-add). An
    attention layer adds about 2 T C for its causal scores and weighted sum (T/2 keys on
    average, two products, two FLOPs each). We take the largest number of attention layers
    whose score FLOPs are at most `attention_budget` of the whole, at least one (attention is
    what gives exact recall over the window) and at most every other layer, and spread them
    evenly so that each sits after a run of RWKV layers; layer 0 stays RWKV.

    Short contexts therefore get the alternating pattern, and each doubling of the sequence
    length roughly halves the number of attention layers.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not 0 < attention_budget < 1:
        raise ValueError(f"attention_budget must be in (0, 1), got {attention_budget}")
    dense = 24.0 * n_embd * n_embd * n_layer
    per_attn = 2.0 * seq_len * n_embd
    # n * per_attn <= budget * (dense + n * per_attn)
    n_attn = math.floor(attention_budget * dense / ((1 - attention_budget) * per_attn))
    n_attn = max(1, min(n_attn, n_layer // 2))
    if n_layer == 1:
        return (LayerKind.RWKV,)
    stride = n_layer / n_attn
    attn = {min(n_layer - 1, round(stride * (j + 1)) - 1) for j in range(n_attn)}
    return tuple(LayerKind.ATTN if i in attn and i > 0 else LayerKind.RWKV for i in range(n_layer))
