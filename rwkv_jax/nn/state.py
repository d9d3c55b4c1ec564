"""The recurrent state: one pytree for the whole model, one entry per layer.

    {"pos": (B,) int32,            tokens each row has seen (positions, attention masks)
     "layers": (layer_0, ...)}     per layer, by kind:
        RWKV-4:    {"shift_att": (B, C), "aa", "bb", "pp": (B, C), "shift_ffn": (B, C)}
        RWKV-7:    {"shift_att": (B, C), "wkv": (B, H, N, N), "shift_ffn": (B, C)}
        attention: {"k": (B, W, H, N), "v": (B, W, H, N)}   the last W keys and values

shift_att / shift_ffn are the last token's input to the time-mix / channel-mix (after ln1 /
ln2). The RWKV-7 "wkv" matrix per head is in the official layout (value index, key index), the
`att_kv` of the `rwkv` package's state. RWKV-7's v_first (the first RWKV layer's values) is
recomputed from each call's own tokens and is not state.

Everything RWKV is float32; the KV window is in the compute dtype. A zero state and a learned
initial state (rwkv_jax.nn.model) have the same tree, so either can enter any call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.config import ModelConfig
from rwkv_jax.ops.wkv4 import NEG_INF


def compute_dtype(config: ModelConfig):
    return jnp.dtype(config.dtype)


def zero_layer_state(config: ModelConfig, layer: int, batch_size: int) -> dict:
    B, C = batch_size, config.n_embd
    if config.is_rwkv(layer) and config.version == "7":
        zeros = jnp.zeros((B, C), jnp.float32)
        return {
            "shift_att": zeros,
            "wkv": jnp.zeros((B, config.n_head, config.head_size, config.head_size), jnp.float32),
            "shift_ffn": zeros,
        }
    if config.is_rwkv(layer):
        zeros = jnp.zeros((B, C), jnp.float32)
        return {
            "shift_att": zeros,
            "aa": zeros,
            "bb": zeros,
            "pp": jnp.full((B, C), NEG_INF, jnp.float32),
            "shift_ffn": zeros,
        }
    kv = jnp.zeros((B, config.attn_window, config.attn_heads, config.attn_head_size),
                   compute_dtype(config))
    return {"k": kv, "v": kv}


def zero_state(config: ModelConfig, batch_size: int) -> dict:
    """The zero state: what a model has seen before its first token."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return {
        "pos": jnp.zeros((batch_size,), jnp.int32),
        "layers": tuple(zero_layer_state(config, i, batch_size) for i in range(config.n_layer)),
    }


def state_shapes(config: ModelConfig, batch_size: int):
    """Shapes and dtypes of the state without allocating it (for shardings, memory plans)."""
    return jax.eval_shape(lambda: zero_state(config, batch_size))


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """A state's small arrays joined into one (B, n) array per dtype, and split back.

    For the boundary of a compiled call: each array a call returns costs the host a few
    microseconds to hand back, which a state of a hundred or more arrays pays at every call
    (figures in docs/performance.md), while slicing and joining a few megabytes on the device
    costs microseconds once. Arrays of `separate_from`
    elements a row or more (an attention layer's key-value window) stay arrays of their own:
    joining them would copy them at every call. Rows stay rows (every array's first axis is the
    batch), so a per-row select works on the flat arrays as on the tree. Hashable: a compiled
    function closes over it.
    """

    treedef: Any
    paths: tuple[str, ...]  # per leaf, as jax.tree_util.keystr writes it: for messages
    shapes: tuple[tuple[int, ...], ...]  # per leaf, without the batch axis
    dtypes: tuple[Any, ...]  # per leaf
    joined: tuple[bool, ...]  # per leaf: in its dtype's joined array, or an array of its own

    @staticmethod
    def of(state, separate_from: int = 1 << 20) -> FlatLayout:
        pairs, treedef = jax.tree_util.tree_flatten_with_path(state)
        shapes = tuple(tuple(a.shape[1:]) for _, a in pairs)
        return FlatLayout(treedef, tuple(jax.tree_util.keystr(k) for k, _ in pairs), shapes,
                          tuple(jnp.dtype(a.dtype) for _, a in pairs),
                          tuple(math.prod(shape) < separate_from for shape in shapes))

    @property
    def groups(self) -> tuple[Any, ...]:
        """The joined arrays' dtypes, in order of first use."""
        return tuple(dict.fromkeys(d for d, j in zip(self.dtypes, self.joined) if j))

    def check(self, state) -> list:
        """The state's arrays; ValueError unless it has this layout's tree and shapes (any
        batch size, the same for every array)."""
        leaves, treedef = jax.tree.flatten(state)
        if treedef != self.treedef:
            given = [jax.tree_util.keystr(k)
                     for k, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
            missing = [k for k in self.paths if k not in set(given)]
            extra = [k for k in given if k not in set(self.paths)]
            what = "; ".join(f"{name} {', '.join(ks[:3])}{' ...' if len(ks) > 3 else ''}"
                             for name, ks in (("it lacks", missing), ("it has no place for", extra))
                             if ks) or f"its tree is {treedef}"
            raise ValueError(f"the state is not this model's: {what} (a state of another model "
                             "or config?)")
        # .shape where there is one: np.shape on a jax.Array takes microseconds.
        shapes = [tuple(getattr(a, "shape", None) or np.shape(a)) for a in leaves]
        batch = shapes[0][:1]
        bad = next((i for i, (got, want) in enumerate(zip(shapes, self.shapes))
                    if got[:1] != batch or got[1:] != want), None) if batch else 0
        if bad is not None:
            rows = f"B = {batch[0]}, the rows of state{self.paths[0]}" if batch else "B its rows"
            raise ValueError(f"state{self.paths[bad]} has shape {shapes[bad]}; this model's is "
                             f"(B, {', '.join(map(str, self.shapes[bad]))}) with {rows}")
        return leaves

    def flatten(self, state) -> tuple[jax.Array, ...]:
        """One (B, n) array per dtype of the joined arrays, then the others as they are; each
        cast to the layout's dtype. For a state that `check` passed (its rows are read off its
        first array)."""
        leaves = jax.tree.leaves(state)
        B = leaves[0].shape[0]
        kinds = list(zip(leaves, self.dtypes, self.joined))
        joined = tuple(jnp.concatenate([jnp.asarray(a, d).reshape(B, -1)
                                        for a, dt, j in kinds if j and dt == d], axis=1)
                       for d in self.groups)
        return joined + tuple(jnp.asarray(a, d) for a, d, j in kinds if not j)

    def unflatten(self, flat: Sequence[jax.Array]):
        groups = self.groups
        B = flat[0].shape[0]
        at = dict.fromkeys(groups, 0)
        joined = dict(zip(groups, flat))
        separate = iter(flat[len(groups):])
        leaves = []
        for shape, d, j in zip(self.shapes, self.dtypes, self.joined):
            if not j:
                leaves.append(next(separate))
                continue
            n = math.prod(shape)
            leaves.append(joined[d][:, at[d] : at[d] + n].reshape((B, *shape)))
            at[d] += n
        return jax.tree.unflatten(self.treedef, leaves)
