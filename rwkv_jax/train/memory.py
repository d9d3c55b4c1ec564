"""Whether a step fits the device: the planned bytes of the train state and activations
against the device's memory, checked before the first step.
"""

from __future__ import annotations

import logging

log = logging.getLogger("rwkv_jax")

import logging

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from rwkv_jax.train.run import Run
from rwkv_jax.train.sharding import TrainShardings


def xla_step_bytes(compiled) -> float | None:
    """Peak bytes XLA planned for a compiled step: arguments + outputs - donated + temporaries."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    if m is None:
        return None
    return float(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                 + m.temp_size_in_bytes)


def peak_device_bytes() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    return (stats or {}).get("peak_bytes_in_use")


class MemoryPlanError(RuntimeError):
    """The config cannot fit the devices; the message holds the plan and what to change."""


def check_memory(run: Run, layout: TrainShardings) -> dict:
    """Print the memory plan per device; stop before compiling if it cannot fit."""
    sh, shapes = layout.state, layout.shapes
    plan = memory_plan(shapes.params, sh.params, shapes.opt_state, sh.opt_state,
                           run.model_config, run.cfg.train.batch_size, run.chunk_len, run.mesh)
    if layout.base is not None:  # an adapter run's frozen base: no gradient, no optimizer state
        base = _nbytes(layout.base_shapes, layout.base)
        plan = {"frozen base (bf16)": base, **plan}
        if run.cfg.logging.eval_every:  # evaluation reads the adapters merged into a copy
            plan["merged copy (evaluation)"] = base
        plan["total"] = sum(v for k, v in plan.items() if k != "total")
    limit = device_memory()
    log.info("mesh %s\n%s", dict(run.mesh.shape), format_plan(plan, limit))
    if limit and plan["total"] > limit:
        raise MemoryPlanError(f"this config needs about {plan['total'] / 2**30:.1f} GiB per device, "
                              f"more than the {limit / 2**30:.1f} GiB there is.\n"
                              f"{format_plan(plan, limit)}\nTry: "
                              f"{suggestion(run.model_config, run.mesh)}")
    return plan


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
    (2 F) plus norms, in the compute dtype or float32, and the head's logits in the compute
    dtype with a float32 gradient. dots_and_wkv_saveable also keeps every block's products
    and WKV residuals. These are estimates; XLA's own plan is reported beside them.
    """
    mc = model_config
    B, L, C, F, V = batch_per_device, chunk_len, mc.n_embd, mc.dim_ffn, mc.vocab_size
    cbytes = jnp.dtype(mc.dtype).itemsize
    per_block = B * L * ((8 * C + 2 * F) * cbytes / tensor + 6 * C * 4)
    if mc.version == "7":
        # RWKV-7 also keeps its six mixed inputs, w, a, g, kk and the LoRA hidden layers, and
        # the value residual, mostly in float32.
        per_block += B * L * 12 * C * 4 / tensor
    # The logits as the head makes them (kept for the loss's backward) and their float32
    # gradient.
    logits = B * L * V * (cbytes + 4)
    if not mc.remat or mc.remat_policy == "everything_saveable":
        return mc.n_layer * per_block + logits
    kept = C * 4  # each block's input
    # JAX's dots_* policies are planned as nothing_saveable: on the 3B hybrid XLA kept far less
    # than every product (52.8 GiB peak, docs/performance.md), and its own figure follows.
    if mc.remat_policy == "dots_and_wkv_saveable":
        kept += (6 * C + F) * cbytes / tensor  # the products
        if mc.version == "7":
            # the WKV kernel's y and U (float32) and its state at every 16-token chunk start
            kept += (8 * C + C * mc.head_size / 4) / tensor
    return mc.n_layer * B * L * kept + 2 * per_block + logits


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
