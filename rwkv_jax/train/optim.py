"""Optimizer construction: parameter groups, learning-rate schedules, AdamW.

Parameter groups follow RWKV-LM's ``configure_optimizers`` (layerwise lr),
with separate weight decays for attention-like and FFN-like matrices. Every
leaf of the Flax ``params`` tree gets one string label, chosen from its path
(``"blocks_0/att/key/kernel"``), its leaf name and its shape; no fixed list
of parameter names is involved, so new ``time_*`` vectors or LoRA matrices
are classified by the same rules.

Labels, with learning-rate multiplier (times ``cfg.lr`` and the schedule) and
weight decay:

=================  ========================================  =========================
label              lr multiplier                             weight decay
=================  ========================================  =========================
time_decay         time_decay_lr_mult * rwkv_lr_multiplier   0
time_first         time_first_lr_mult * rwkv_lr_multiplier   0
rwkv_att_matrix    rwkv_lr_multiplier                        rwkv_att_weight_decay
att_matrix         1                                         rwkv_att_weight_decay
rwkv_ffn_matrix    rwkv_lr_multiplier                        rwkv_ffn_weight_decay
ffn_matrix         1                                         rwkv_ffn_weight_decay
matrix             1                                         weight_decay
rwkv_no_decay      rwkv_lr_multiplier                        0
no_decay           1                                         0
init_state         1  (only with trainable="state")          0
adapter            1  (LoRA / PiSSA factors)                 0
frozen             parameters receive no update              -
=================  ========================================  =========================

``time_decay`` holds RWKV-4's ``time_decay`` and RWKV-7's ``w0``; the default
``time_decay_lr_mult=2.0`` is RWKV-LM's 2x for both.

Classification rules, first match wins:

* leaf named ``time_decay`` or ``w0`` (the RWKV-7 decay, which RWKV-LM trains
  at 2x lr without decay) -> ``time_decay``; leaf named ``time_first`` or
  ``time_faaaa`` -> ``time_first``.
* leaf whose name starts with ``time_`` or ends with ``_w1``/``_w2`` (RWKV-6
  LoRA factors), a matrix that is not a Dense ``kernel`` (the RWKV-7 LoRA
  factors ``w1 w2 a1 a2 v1 v2 g1 g2`` and its ``r_k``: RWKV-LM decays only
  2D parameters named ``.weight``, which our kernels are), anything under
  ``init_state``, any leaf named ``embedding`` (``emb``, ``pos_emb``) and
  anything that is not a matrix (fewer than two dimensions of size > 1:
  norms, biases, ``time_mix_*``, RWKV-7's ``x_*``, ``a0``, ``k_k`` ...) ->
  no decay. RWKV-LM keeps the LoRA factors out of weight decay too.
* matrices under ``att`` (RWKV time mixing) or ``attn`` (attention block)
  -> att group; under ``ffn`` (RWKV channel mixing) or ``mlp`` -> ffn group.
* any other matrix (``head``, ``state_codec``) -> ``matrix``.

"RWKV-specific" means the path passes through an ``att``, ``ffn`` or
``init_state`` module (plus every ``time_decay``/``time_first`` leaf). Those
leaves take the ``rwkv_`` label variant and have their learning rate
multiplied by ``cfg.rwkv_lr_multiplier`` on top of any per-group multiplier;
the attention block's ``attn``/``mlp`` matrices, embeddings, norms, ``head``
and ``state_codec`` are not scaled by it. Labels do not depend on the
multiplier values, so the optimizer-state structure stays the same when only
hyper-parameters change between runs (checkpoints remain loadable).

Weight decay is decoupled (AdamW): each step a decayed parameter shrinks by
``lr_group(step) * weight_decay``, i.e. the group's lr multiplier scales the
decay as well, as in PyTorch's AdamW with per-group learning rates.

With ``cfg.trainable == "state"`` only the ``init_state`` leaves train (at the
base lr, without ``rwkv_lr_multiplier``); all other leaves are labelled
``frozen`` and handled by ``optax.set_to_zero``, which keeps no Adam moments
for them.

With ``cfg.trainable`` ``"lora"`` or ``"pissa"`` the tree is the adapters' (see
rwkv_jax.nn.adapters): the factors under ``lora`` take ``adapter`` (RWKV-PEFT trains
them at the base lr without decay), the leaves under ``tuned`` the labels above by
their own paths, and PiSSA's initial factors ``frozen``.

Logging the learning rate: :func:`make_schedule` is the source of truth, and
the optimizer counts steps exactly like the trainer does (0 for the first
update), so the base lr of update ``k`` is ``make_schedule(cfg)(k)``. For
per-group values, :func:`learning_rates` reads the rates that the most recent
update applied from the optimizer state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from rwkv_jax.config import default_config

TIME_DECAY_NAMES = ("time_decay", "w0")
TIME_FIRST_NAMES = ("time_first", "time_faaaa")
LORA_SUFFIXES = ("_w1", "_w2")
EMBEDDING_NAMES = ("embedding",)
DECAYED_MATRIX_NAMES = ("kernel",)  # RWKV-LM's 2D ".weight" parameters
RWKV_MODULES = ("att", "ffn", "init_state")
ATT_MODULES = ("att", "attn")
FFN_MODULES = ("ffn", "mlp")
STATE_MODULE = "init_state"

TRAINABLE_CHOICES = ("all", "state", "lora", "pissa")
SCHEDULE_CHOICES = ("constant", "cosine", "exponential")

FROZEN = "frozen"
INIT_STATE = "init_state"
ADAPTER = "adapter"
ADAPTER_CHOICES = ("lora", "pissa")


class GroupSpec(NamedTuple):
    """Hyper-parameters of one label; ``lr_mult`` multiplies ``cfg.lr``."""

    lr_mult: float
    weight_decay: float


def default_optimizer_config() -> ml_collections.ConfigDict:
    """The config schema's optimizer group (RWKV-LM's AdamW betas/eps and layerwise lr
    multipliers), standing alone: its own horizon and what trains."""
    cfg = default_config().optimizer
    with cfg.unlocked():
        cfg.total_steps = 10_000
        cfg.trainable = "all"
    return cfg


def _check_trainable(cfg: Any) -> str:
    trainable = cfg.trainable
    if trainable not in TRAINABLE_CHOICES:
        raise ValueError(
            f"train.trainable must be one of {TRAINABLE_CHOICES}, got {trainable!r}"
        )
    return trainable


def _is_matrix(shape: tuple[int, ...]) -> bool:
    # Squeezed like RWKV-LM, so vectors stored as (1, 1, C) stay vectors.
    return sum(1 for d in shape if d != 1) >= 2


def _label_one(path: str, shape: tuple[int, ...], trainable: str) -> str:
    parts = path.split("/")
    name = parts[-1]
    modules = parts[:-1]
    if trainable == "state":
        return INIT_STATE if STATE_MODULE in modules else FROZEN
    if trainable in ADAPTER_CHOICES:
        kind, rest = parts[0], "/".join(parts[1:])
        if kind == "tuned":
            return _label_one(rest, shape, "all")
        return ADAPTER if kind == "lora" else FROZEN

    if name in TIME_DECAY_NAMES:
        return "time_decay"
    if name in TIME_FIRST_NAMES:
        return "time_first"

    rwkv = any(m in RWKV_MODULES for m in modules)
    prefix = "rwkv_" if rwkv else ""
    if (
        name.startswith("time_")
        or name.endswith(LORA_SUFFIXES)
        or STATE_MODULE in modules
        or name in EMBEDDING_NAMES
        or not _is_matrix(shape)
        or name not in DECAYED_MATRIX_NAMES
    ):
        return prefix + "no_decay"
    if any(m in ATT_MODULES for m in modules):
        return prefix + "att_matrix"
    if any(m in FFN_MODULES for m in modules):
        return prefix + "ffn_matrix"
    # Only att/ffn can make a matrix RWKV-specific and both were handled above.
    return "matrix"


def _path_str(keypath) -> str:
    return jax.tree_util.keystr(keypath, simple=True, separator="/")


def label_params(params: Any, cfg: Any) -> Any:
    """Pytree of string labels with the structure of ``params``.

    Only shapes are read, so ``jax.eval_shape`` output works as well.
    """
    trainable = _check_trainable(cfg)
    labels = jax.tree_util.tree_map_with_path(
        lambda kp, x: _label_one(_path_str(kp), tuple(jnp.shape(x)), trainable),
        params,
    )
    if trainable == "state" and INIT_STATE not in jax.tree_util.tree_leaves(labels):
        # Otherwise the run would silently train nothing.
        raise ValueError(
            "train.trainable='state' but the params have no 'init_state' leaves; "
            "enable the learned initial state in the model config"
        )
    return labels


def describe_groups(params: Any, cfg: Any) -> dict[str, list[str]]:
    """``{label: [path, ...]}`` in tree order, labels sorted, for logs and tests."""
    labels = label_params(params, cfg)
    paths = [_path_str(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(params)]
    groups: dict[str, list[str]] = {}
    for path, label in zip(paths, jax.tree_util.tree_leaves(labels)):
        groups.setdefault(label, []).append(path)
    return dict(sorted(groups.items()))


def group_specs(cfg: Any) -> dict[str, GroupSpec]:
    """Learning-rate multiplier and weight decay of every label (see module doc)."""
    rwkv = float(cfg.rwkv_lr_multiplier)
    att_wd = float(cfg.rwkv_att_weight_decay)
    ffn_wd = float(cfg.rwkv_ffn_weight_decay)
    return {
        "time_decay": GroupSpec(float(cfg.time_decay_lr_mult) * rwkv, 0.0),
        "time_first": GroupSpec(float(cfg.time_first_lr_mult) * rwkv, 0.0),
        "rwkv_att_matrix": GroupSpec(rwkv, att_wd),
        "att_matrix": GroupSpec(1.0, att_wd),
        "rwkv_ffn_matrix": GroupSpec(rwkv, ffn_wd),
        "ffn_matrix": GroupSpec(1.0, ffn_wd),
        "matrix": GroupSpec(1.0, float(cfg.weight_decay)),
        "rwkv_no_decay": GroupSpec(rwkv, 0.0),
        "no_decay": GroupSpec(1.0, 0.0),
        INIT_STATE: GroupSpec(1.0, 0.0),
        ADAPTER: GroupSpec(1.0, 0.0),
        FROZEN: GroupSpec(0.0, 0.0),
    }


def make_schedule(cfg: Any) -> optax.Schedule:
    """Base learning rate per update count (0 for the first update).

    Linear warmup from 0 to ``cfg.lr`` over ``cfg.warmup_steps``, then:

    * ``"cosine"``: cosine decay reaching ``cfg.lr_final`` at ``cfg.total_steps``;
    * ``"exponential"``: RWKV-LM style ``lr * (lr_final / lr) ** progress`` with
      ``progress`` going 0 -> 1 between the end of warmup and ``total_steps``;
    * ``"constant"``: ``cfg.lr`` (``lr_final`` and ``total_steps`` unused).

    ``total_steps`` counts the warmup; both decays hold ``lr_final`` afterwards.
    """
    name = cfg.schedule
    if name not in SCHEDULE_CHOICES:
        raise ValueError(
            f"schedule must be one of {SCHEDULE_CHOICES}, got {name!r}"
        )
    lr = float(cfg.lr)
    lr_final = float(cfg.lr_final)
    warmup = int(cfg.warmup_steps)
    total = int(cfg.total_steps)
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if warmup < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup}")

    if name == "constant":
        # linear_schedule returns its init value forever when warmup == 0;
        # joining at boundary 0 makes the constant part take over at step 0.
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
            [warmup],
        )

    # optax quietly returns a constant schedule for these cases; refuse instead.
    if total <= warmup:
        raise ValueError(
            f"total_steps ({total}) must exceed warmup_steps ({warmup}) "
            f"for schedule {name!r}"
        )
    if lr_final < 0:
        raise ValueError(f"lr_final must be >= 0, got {lr_final}")

    if name == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=lr,
            warmup_steps=warmup,
            decay_steps=total,
            end_value=lr_final,
        )

    if lr_final == 0:
        raise ValueError("schedule 'exponential' needs lr_final > 0")
    return optax.warmup_exponential_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup,
        transition_steps=total - warmup,
        decay_rate=lr_final / lr,
        end_value=lr_final,
    )


def _scaled(schedule: optax.Schedule, mult: float) -> optax.Schedule:
    return lambda count: schedule(count) * mult


def make_optimizer(params: Any, cfg: Any) -> optax.GradientTransformation:
    """Global-norm clipping followed by one AdamW per parameter group.

    ``cfg.grad_clip <= 0`` disables clipping. Only the labels present in
    ``params`` get a transformation. Each group's learning rate is wrapped in
    ``optax.inject_hyperparams`` so :func:`learning_rates` can read it; the
    other hyper-parameters are static so a restored checkpoint cannot carry
    stale values of them.
    """
    labels = label_params(params, cfg)
    specs = group_specs(cfg)
    schedule = make_schedule(cfg)
    adamw = optax.inject_hyperparams(
        optax.adamw, static_args=("b1", "b2", "eps", "weight_decay")
    )

    transforms = {}
    for label in sorted(set(jax.tree_util.tree_leaves(labels))):
        if label == FROZEN:
            transforms[label] = optax.set_to_zero()
            continue
        spec = specs[label]
        transforms[label] = adamw(
            learning_rate=_scaled(schedule, spec.lr_mult),
            b1=float(cfg.b1),
            b2=float(cfg.b2),
            eps=float(cfg.eps),
            weight_decay=spec.weight_decay,
        )

    parts = []
    if float(cfg.grad_clip) > 0:
        parts.append(optax.clip_by_global_norm(float(cfg.grad_clip)))
    # optax.partition is the current name of optax.multi_transform.
    parts.append(optax.partition(transforms, labels))
    return optax.chain(*parts)


def learning_rates(opt_state: Any) -> dict[str, jax.Array]:
    """Per-group learning rate applied by the latest update (``{label: lr}``).

    Before the first update the values are those of step 0. Frozen groups are
    left out. Works on the state returned by :func:`make_optimizer` and inside
    ``jit``.
    """
    states = opt_state if isinstance(opt_state, tuple) else (opt_state,)
    for state in states:
        if isinstance(state, optax.PartitionState):
            break
    else:
        raise ValueError("opt_state does not come from make_optimizer")

    out = {}
    for label, inner in state.inner_states.items():
        # partition wraps every group in optax.masked.
        while not hasattr(inner, "hyperparams") and hasattr(inner, "inner_state"):
            inner = inner.inner_state
        if hasattr(inner, "hyperparams"):
            out[label] = inner.hyperparams["learning_rate"]
    return out
