"""Device mesh and partition rules: the sharding of parameters, optimizer state, batches and states
as data (RULES: a regex on the parameter path and a spec by dimension).

The mesh has three axes: `data` (pure data parallelism: parameters replicated), `fsdp` (data
parallelism with parameters, gradients and optimizer state sharded over it, ZeRO-3 style) and
`tensor` (matrices split along their channel dimension). The batch is split over data x fsdp.

RWKV-4 suits tensor parallelism well: its WKV recurrence is per channel, so with the key,
value and receptance matrices split by output channel every device runs the recurrence for
its own channels with no communication; the output projection splits by input channel and one
reduction closes the block, as in Megatron's MLP.

RWKV-7 keeps the names and shapes of those projections, so the same rules split them; its
recurrence is per head, so with the heads divisible by the tensor axis each device runs whole
heads (the WKV state (B, H, N, N) is split by head). Its LoRA factors (C x D, D x C with
D ~ sqrt(C)) are small: only their C side is split, over fsdp.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")


BATCH = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes


# (regex on the parameter path, spec by dimension). First match wins; what matches nothing
# (norms, time_* vectors, initial states) is replicated.
RULES: tuple[tuple[str, tuple], ...] = (
    (r"^emb/embedding$", ("tensor", "fsdp")),  # (V, C)
    (r"^pos_emb/embedding$", (None, "fsdp")),
    (r"^head/kernel$", ("fsdp", "tensor")),  # (C, V)
    # RWKV time-mix: k, v, r split by output channel; output by input channel.
    (r"/att/(key|value|receptance)/kernel$", ("fsdp", "tensor")),
    (r"/att/output/kernel$", ("tensor", "fsdp")),
    # RWKV channel-mix: key (C, F) by F; value (F, C) by F; receptance (C, C) by output.
    (r"/ffn/(key|receptance)/kernel$", ("fsdp", "tensor")),
    (r"/ffn/value/kernel$", ("tensor", "fsdp")),
    # RWKV-7 LoRA factors: w1, a1, v1, g1 (C, D) and w2, a2, v2, g2 (D, C).
    (r"/att/[wavg]1$", ("fsdp", None)),
    (r"/att/[wavg]2$", (None, "fsdp")),
    # Attention blocks: heads split over tensor.
    (r"/attn/(query|key|value)/kernel$", ("fsdp", "tensor")),
    (r"/attn/output/kernel$", ("tensor", "fsdp")),
    (r"/mlp/fc/kernel$", ("fsdp", "tensor")),
    (r"/mlp/proj/kernel$", ("tensor", "fsdp")),
    (r"state_codec/.*kernel$", ("fsdp", None)),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices (of every process); -1 = the rest."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {sizes}")
    for k, v in sizes.items():
        if v != -1 and (not isinstance(v, int) or v < 1):
            raise ValueError(f"mesh.{k}={v!r} is invalid: a positive integer, or -1 for the rest")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n % fixed:
            raise ValueError(f"mesh {sizes}: {fixed} does not divide the {n} devices")
        sizes[free[0]] = n // fixed
    if math.prod(sizes.values()) != n:
        raise ValueError(f"mesh {sizes} has {math.prod(sizes.values())} places for {n} devices; "
                         "the sizes must multiply to the device count (use -1 for one of them)")
    shape = tuple(sizes[a] for a in AXES)
    # Auto axes: shardings of inputs and parameters propagate through the step as in pjit.
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def _path(keypath) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh) -> P:
    """The PartitionSpec of one parameter; an axis that does not divide its dimension is dropped."""
    for pattern, dims in RULES:
        if re.search(pattern, path):
            if len(dims) != len(shape):
                return P()
            out = []
            for dim, axis in zip(shape, dims):
                out.append(axis if axis is not None and dim % mesh.shape[axis] == 0 else None)
            return P(*out)
    return P()


def param_specs(params_shapes: Any, mesh: Mesh) -> Any:
    # An adapter run's whole-trained leaves ("tuned/emb/embedding") shard as the model's do.
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: spec_for(_path(kp).removeprefix("tuned/"), x.shape, mesh), params_shapes)


def param_shardings(params_shapes: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params_shapes, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def opt_state_shardings(opt_shapes: Any, params_shapes: Any, p_shardings: Any, mesh: Mesh) -> Any:
    """Adam moments and the like follow their parameter's sharding; counters are replicated.

    A moment's key path ends with its parameter's path (optax keeps per-parameter trees, with
    masked-out leaves where a group does not own a parameter), which is how it is matched.
    """
    replicated = NamedSharding(mesh, P())
    by_path = {}
    for (kp, x), s in zip(jax.tree_util.tree_leaves_with_path(params_shapes),
                          jax.tree.leaves(p_shardings, is_leaf=lambda v: isinstance(v, NamedSharding))):
        by_path[_path(kp)] = (x.shape, s)

    def pick(kp, x):
        keys = []
        for k in reversed(kp):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.append(str(k.key))
        match = by_path.get("/".join(reversed(keys)))
        return match[1] if match and match[0] == x.shape else replicated

    return jax.tree_util.tree_map_with_path(pick, opt_shapes)


def batch_spec(ndim: int) -> P:
    return P(BATCH, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(ndim))


def state_shardings(state_shapes: Any, mesh: Mesh) -> Any:
    """The recurrent state: batch over data x fsdp, channels (or heads) over tensor where they
    divide."""

    def spec(kp, x):
        if x.ndim == 1:  # pos (B,)
            return NamedSharding(mesh, batch_spec(1))
        if kp and getattr(kp[-1], "key", None) == "wkv":  # RWKV-7 WKV (B, H, N, N): by head
            heads = "tensor" if x.shape[1] % mesh.shape["tensor"] == 0 else None
            return NamedSharding(mesh, P(BATCH, heads, None, None))
        last = "tensor" if x.shape[-1] % mesh.shape["tensor"] == 0 and x.ndim == 2 else None
        if x.ndim == 4:  # KV window (B, W, H, N): heads over tensor
            heads = "tensor" if x.shape[2] % mesh.shape["tensor"] == 0 else None
            return NamedSharding(mesh, P(BATCH, None, heads, None))
        return NamedSharding(mesh, P(BATCH, *([None] * (x.ndim - 2)), last))

    return jax.tree_util.tree_map_with_path(spec, state_shapes)


def check_batch(batch_size: int, mesh: Mesh) -> None:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n:
        raise ValueError(f"train.batch_size={batch_size} must be a multiple of mesh data x fsdp = {n}")


@dataclasses.dataclass
class TrainShardings:
    """Where every part of the training state lives on the mesh, known before it exists."""

    state: Any  # a train.step.TrainState of NamedShardings
    shapes: Any  # a TrainState of ShapeDtypeStructs
    batch: Any  # NamedSharding of a (B, L) batch
    base: Any = None  # an adapter run's frozen base: NamedShardings like the model's params
    base_shapes: Any = None  # and its ShapeDtypeStructs (bf16 matrices)
