"""Low-rank adapters (LoRA, PiSSA) over a frozen base: what they target, how they start, the
forward with them, and the merge back into plain weights.

The model stays the official one. An adapter is applied by intercepting the Dense projections
it targets (flax.linen.intercept_methods): y = x W + scale * (dropout(x) A^T) B^T, so the base
is read as it is (bf16, no copy, no gradient) and only the factors train. The factors keep
RWKV-PEFT's layout, A (r, in) and B (out, r), so they export under its names unchanged.

The trainable tree of an adapter run:
    {"lora":  {module path...: {"lora_A": (r, in), "lora_B": (out, r)}},
     "tuned": {leaf path...: value}              small parameters trained whole (ln, w0, ...)
     "pissa_init": {module path...: {"init_lora_A", "init_lora_B"}}}   PiSSA only, never trained
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import zlib
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("lora", "pissa")
LORA, TUNED, PISSA_INIT = "lora", "tuned", "pissa_init"
# Leaf-name groups a target may name besides modules: RWKV-PEFT's train_parts "ln" (every
# layer norm, the heads' group norm ln_x included) and "time" (RWKV-4's time_* vectors).
_GROUPS = {"ln": lambda modules, leaf: any(m.startswith("ln") for m in modules[-1:]),
           "time": lambda modules, leaf: leaf.startswith("time_")}


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """What `train.trainable=lora|pissa` and `train.lora.*` ask for."""

    method: str  # lora | pissa
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("att", "ffn", "ln")

    @property
    def scale(self) -> float:
        # PiSSA's factors carry the base's own singular values: no extra scale (RWKV-PEFT).
        return 1.0 if self.method == "pissa" else self.alpha / self.rank

    def record(self) -> dict:
        return dataclasses.asdict(self) | {"targets": list(self.targets)}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where a spec lands in one model: the Dense modules adapted, the leaves tuned whole."""

    lora: tuple[tuple[str, ...], ...]  # module paths, e.g. ("blocks_0", "att", "key")
    tuned: tuple[tuple[str, ...], ...]  # leaf paths, e.g. ("blocks_0", "ln1", "scale")


def leaf_paths(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from leaf_paths(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def get_path(tree: dict, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def set_path(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _contains(seq: tuple, part: tuple) -> bool:
    return any(seq[i:i + len(part)] == part for i in range(len(seq) - len(part) + 1))


def _parts(target: str) -> tuple[str, ...]:
    # Official names ("blocks.3.att.key") and ours ("blocks_3.att.key") both work.
    return tuple(re.sub(r"blocks\.(\d+)", r"blocks_\1", target.strip()).split("."))


def plan(params: dict, spec: AdapterSpec, what: str = "this model") -> Plan:
    """The modules and leaves `spec.targets` name in `params` (shapes suffice). A target names
    Dense projections (a module holding a `kernel`: LoRA on it) and, by name, other leaves
    (trained whole): "att" adapts every time-mix projection; "ln" tunes the layer norms; "w0",
    "time_decay", "emb" or "blocks.0.ln0" name leaves. ValueError for a target naming nothing."""
    leaves = list(leaf_paths(params))
    dense = sorted({p[:-1] for p, x in leaves if p[-1] == "kernel" and np.ndim(x) == 2})
    lora, tuned = set(), set()
    for target in spec.targets:
        parts = _parts(target)
        named = [d for d in dense if _contains(d, parts)]
        lora.update(named)
        for p, _ in leaves:
            if p[:-1] not in dense and _tunes(target, parts, p, dense):
                tuned.add(p)
                named.append(p)
        if not named:
            raise ValueError(f"train.lora.targets: {target!r} names nothing in {what}; "
                             f"projections here: {', '.join(_names(dense))}; other parameters "
                             f"by name: ln, {', '.join(_leaf_names(leaves, dense))}")
    for d in lora:
        kin, kout = np.shape(get_path(params, d + ("kernel",)))
        if spec.rank > min(kin, kout):
            raise ValueError(f"train.lora.rank={spec.rank} is invalid: above the smaller side "
                             f"of {'.'.join(d)} ({kin} x {kout})")
    return Plan(tuple(sorted(lora)), tuple(sorted(tuned)))


def _tunes(target: str, parts: tuple, path: tuple, dense) -> bool:
    """Whether `target` names leaf `path` to be trained whole: a group of _GROUPS, the leaf's
    own name ("w0", "att.w0"), or a module with no projection inside ("emb", "ln_x")."""
    modules, leaf = path[:-1], path[-1]
    if target in _GROUPS:
        return _GROUPS[target](modules, leaf)
    if path[-len(parts):] == parts:
        return True
    ends = [i + len(parts) for i in range(len(modules) - len(parts) + 1)
            if modules[i:i + len(parts)] == parts]
    return bool(ends) and not any(d[:ends[0]] == modules[:ends[0]] for d in dense)


def _names(dense) -> list[str]:
    return sorted({".".join(d[1:] if d[0].startswith("blocks_") else d) for d in dense})


def _leaf_names(leaves, dense) -> list[str]:
    return sorted({p[-1] for p, _ in leaves if p[:-1] not in dense and p[-1] not in
                   ("scale", "bias", "embedding")} | {"emb"})


def init(params: dict, spec: AdapterSpec, where: Plan, rng: jax.Array) -> dict:
    """The trainable tree at step 0 (module doc). LoRA: A uniform in +-1/sqrt(in) (torch's
    kaiming_uniform(a=sqrt(5)), as RWKV-PEFT), B = 0, so the model starts as the base. PiSSA:
    A and B from the top-r singular triplets of each float32 base matrix W (out, in):
    B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T; the base keeps W - B A (`frozen_base`)."""
    out = {LORA: {}, TUNED: {}}
    for p in where.tuned:
        set_path(out[TUNED], p, jnp.asarray(get_path(params, p), jnp.float32))
    keys = jax.random.split(rng, max(len(where.lora), 1))
    for key, d in zip(keys, where.lora):
        kernel = jnp.asarray(get_path(params, d + ("kernel",)), jnp.float32)  # (in, out)
        kin, kout = kernel.shape
        if spec.method == "pissa":
            u, s, vh = jnp.linalg.svd(kernel.T, full_matrices=False)
            root = jnp.sqrt(s[:spec.rank])
            a, b = root[:, None] * vh[:spec.rank], u[:, :spec.rank] * root[None, :]
            set_path(out.setdefault(PISSA_INIT, {}), d, {"init_lora_A": a, "init_lora_B": b})
        else:
            bound = 1.0 / np.sqrt(kin)
            a = jax.random.uniform(key, (spec.rank, kin), jnp.float32, -bound, bound)
            b = jnp.zeros((kout, spec.rank), jnp.float32)
        set_path(out[LORA], d, {"lora_A": a, "lora_B": b})
    return out


def delta(factors: dict, scale: float) -> jax.Array:
    """scale * B A in our kernel layout (in, out), float32."""
    return scale * (factors["lora_A"].T.astype(jnp.float32) @ factors["lora_B"].T.astype(jnp.float32))


# The base's leaves held in bf16: the projections, the embedding and RWKV-7's own low-rank
# factors (the model's bulk); norms, mixes, r_k, states and codecs stay float32.
_LOW_RANK7 = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")


def frozen_dtype(path: tuple, dtype, low=jnp.bfloat16):
    """The dtype the frozen base holds leaf `path` in."""
    return low if path[-1] in ("kernel", "embedding") + _LOW_RANK7 else dtype


def frozen_base(params: dict, trainable: dict, dtype=jnp.bfloat16) -> dict:
    """The base as the run reads it: projections and embeddings in `dtype`, the rest float32
    (frozen_dtype); PiSSA's targets hold the residual W - B0 A0 (computed in float32, then
    rounded once)."""
    out = jax.tree.map(lambda x: x, params)  # a new tree; only PiSSA's targets change
    for d, f in adapted(trainable.get(PISSA_INIT, {}), "init_lora_A"):
        kernel = jnp.asarray(get_path(out, d + ("kernel",)), jnp.float32)
        set_path(out, d + ("kernel",), kernel - delta(_initial(f), 1.0))
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: x.astype(frozen_dtype(tuple(k.key for k in kp), x.dtype, dtype)), out)


def _initial(f: dict) -> dict:
    return {"lora_A": f["init_lora_A"], "lora_B": f["init_lora_B"]}


def overlay(base: dict, trainable: dict) -> dict:
    """The base with the whole-trained leaves in place (a new tree; the base is not changed)."""
    out = jax.tree.map(lambda x: x, base)
    for p, v in leaf_paths(trainable.get(TUNED, {})):
        set_path(out, p, v)
    return out


def merge(base: dict, trainable: dict, spec: AdapterSpec, *, original: bool,
          keep_dtypes: bool = False) -> dict:
    """Plain weights: the base + scale * B A, with the tuned leaves in place, in float32 (or,
    keep_dtypes, each leaf in the base's dtype: no copy bigger than the base). `original`:
    the base is the model's own weights (the float32 file: PiSSA's B0 A0 come off here, the
    merged export) rather than frozen_base's (the residual already)."""
    weights = overlay(base, trainable)
    dtypes = jax.tree.map(lambda x: x.dtype, weights)
    out = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), weights)
    inits = trainable.get(PISSA_INIT, {})
    for d, factors in adapted(trainable.get(LORA, {})):
        w = get_path(out, d + ("kernel",))
        if inits and original:
            w = w - delta(_initial(get_path(inits, d)), 1.0)
        set_path(out, d + ("kernel",), w + delta(factors, spec.scale))
    return jax.tree.map(lambda x, t: x.astype(t), out, dtypes) if keep_dtypes else out


def adapted(tree: dict, first: str = "lora_A") -> Iterator[tuple[tuple[str, ...], dict]]:
    """(module path, its factors) of each adapted module in a tree of factors."""
    for p, _ in leaf_paths(tree):
        if p[-1] == first:
            yield p[:-1], get_path(tree, p[:-1])


@contextlib.contextmanager
def applied(trainable: dict, spec: AdapterSpec, rng: jax.Array | None = None):
    """Inside: every Dense of the model that `trainable` adapts adds scale * (x A^T) B^T to
    its output, in the layer's compute dtype; with `rng`, LoRA dropout on that x (its mask a
    function of rng and the module, so remat recomputes the same one)."""
    factors = dict(adapted(trainable.get(LORA, {})))

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return next_fun(*args, **kwargs)
        f = factors.get(tuple(module.path))
        y = next_fun(*args, **kwargs)
        if f is None:
            return y
        x = args[0]
        if rng is not None and spec.dropout > 0:
            key = jax.random.fold_in(rng, zlib.crc32("/".join(module.path).encode()))
            keep = jax.random.bernoulli(key, 1.0 - spec.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - spec.dropout), 0).astype(x.dtype)
        dt = module.dtype or jnp.float32
        low = (x.astype(dt) @ f["lora_A"].T.astype(dt)) @ f["lora_B"].T.astype(dt)
        return y + (spec.scale * low).astype(y.dtype)

    with nn.intercept_methods(intercept):
        yield
