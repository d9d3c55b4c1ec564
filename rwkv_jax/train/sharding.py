"""Device mesh, partition rules, sharded initialisation, and the memory plan.

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

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: spec_for(_path(kp), x.shape, mesh), params_shapes)


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


# ----------------------------------------------------------------------------- memory plan


def _nbytes(tree, shardings=None) -> float:
    """Bytes per device of a tree of shapes, given its shardings (or unsharded)."""
    total = 0.0
    leaves = jax.tree.leaves(tree)
    shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)) \
        if shardings is not None else [None] * len(leaves)
    for x, s in zip(leaves, shards):
        n = x.size * jnp.dtype(x.dtype).itemsize
        if s is not None:
            n /= _shard_factor(s)
        total += n
    return total


def _shard_factor(s: NamedSharding) -> int:
    f = 1
    for entry in s.spec:
        for axis in (entry if isinstance(entry, tuple) else (entry,)):
            if axis is not None:
                f *= s.mesh.shape[axis]
    return f


def activation_bytes(model_config, batch_per_device: int, chunk_len: int, tensor: int = 1) -> float:
    """Activations kept for the backward pass of one chunk, per device.

    With remat each block keeps its input (the residual stream, float32) and one block at a
    time is recomputed with everything it needs. Without it every block keeps roughly its
    k, v, r, WKV output and gate (time-mix, 5 C) and the channel-mix's key and its square
    (2 F) plus norms, in the compute dtype or float32, and the head's logits are kept in
    float32. These are estimates; XLA's own plan is reported beside them.
    """
    mc = model_config
    B, L, C, F, V = batch_per_device, chunk_len, mc.n_embd, mc.dim_ffn, mc.vocab_size
    cbytes = jnp.dtype(mc.dtype).itemsize
    per_block = B * L * ((8 * C + 2 * F) * cbytes / tensor + 6 * C * 4)
    if mc.version == "7":
        # RWKV-7 also keeps its six mixed inputs, w, a, g, kk and the LoRA hidden layers, and
        # the value residual, mostly in float32.
        per_block += B * L * 12 * C * 4 / tensor
    logits = B * L * V * 4 * 2  # logits and their gradient
    if mc.remat:
        return mc.n_layer * B * L * C * 4 + 2 * per_block + logits
    return mc.n_layer * per_block + logits


def memory_plan(params_shapes, p_shardings, opt_shapes, o_shardings, model_config,
                batch_size: int, chunk_len: int, mesh: Mesh) -> dict:
    """Bytes per device for parameters, optimizer state, gradients and activations."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    plan = {
        "parameters": _nbytes(params_shapes, p_shardings),
        "optimizer state": _nbytes(opt_shapes, o_shardings),
        "gradients": _nbytes(params_shapes, p_shardings),
        "activations (one chunk)": activation_bytes(model_config, batch_size // dp, chunk_len,
                                                    mesh.shape["tensor"]),
    }
    plan["total"] = sum(plan.values())
    return plan


def device_memory() -> int | None:
    """Usable bytes of one device, where the platform says (GPU, TPU); None on CPU."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - not every backend has memory_stats
        return None
    return (stats or {}).get("bytes_limit")


def format_plan(plan: dict, limit: int | None, xla_bytes: float | None = None) -> str:
    gib = 1024**3
    lines = ["memory plan per device:"]
    for k, v in plan.items():
        lines.append(f"  {k:<26} {v / gib:8.2f} GiB")
    if xla_bytes is not None:
        lines.append(f"  {'XLA compiled step':<26} {xla_bytes / gib:8.2f} GiB")
    lines.append(f"  {'device memory':<26} " + (f"{limit / gib:8.2f} GiB" if limit else "     n/a"))
    return "\n".join(lines)


def suggestion(model_config, mesh: Mesh) -> str:
    tips = []
    if mesh.shape["data"] > 1:
        tips.append("move data-parallel devices to fsdp (--config.mesh.fsdp=N --config.mesh.data=1) "
                    "so parameters and optimizer state are sharded")
    tips.append("a smaller memory.rwkv_chunk_size or train.batch_size")
    if not model_config.remat:
        tips.append("--config.efficiency.remat=True")
    elif model_config.remat_policy != "nothing_saveable":
        tips.append("--config.efficiency.remat_policy=nothing_saveable")
    return "; or ".join(tips)
