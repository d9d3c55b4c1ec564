"""A run's starting point: fresh or initial weights (init_from), the optimizer, the shardings of
the train state, and the compiled step.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.config import (
    ConfigError,
    ModelConfig,
    optimizer_config_from,
)
from rwkv_jax.io.state_file import load_state
from rwkv_jax.nn import adapters
from rwkv_jax.nn.model import RWKV, param_shapes
from rwkv_jax.nn.state import zero_state
from rwkv_jax.train import optim
from rwkv_jax.train import sharding as shd
from rwkv_jax.train.memory import (
    MemoryPlanError,
    device_memory,
    suggestion,
    xla_step_bytes,
)
from rwkv_jax.train.run import Run, read_init_from
from rwkv_jax.train.sharding import TrainShardings
from rwkv_jax.train.step import TrainState

log = logging.getLogger("rwkv_jax")


def load_initial_weights(path: str, fresh: dict, model_config: ModelConfig | None = None) -> dict:
    """Weights to start from (`train.init_from`), onto the fresh init's tree.

    Leaves the source lacks (a learned initial state or codec a pretrained model never had)
    keep their fresh initialisation; a leaf of another shape is an error, and so are weights
    of another RWKV version than `model_config`'s (they share some names, not the model).
    """
    return _onto_fresh(path, read_initial_weights(path, model_config), fresh)


def read_initial_weights(path: str, model_config: ModelConfig | None = None) -> dict:
    """The weights of `train.init_from` by their path in the params tree, checked (readable,
    finite, floating point, this RWKV version); ConfigError naming the field otherwise."""
    source, flat = read_init_from(path)
    if model_config is not None and source.version != model_config.version:
        raise ConfigError(f"train.init_from={path!r} holds an RWKV-{source.version} model, but "
                          f"model.version={model_config.version!r}; set "
                          f"model.version={source.version!r} to start from it")
    return flat


def _onto_fresh(path: str, flat: dict, fresh: dict, field: str = "train.init_from") -> dict:
    def take(keypath, x):
        name = jax.tree_util.keystr(keypath)
        if name not in flat:
            return x
        y = jnp.asarray(flat[name], x.dtype)
        if y.shape != x.shape:
            raise ConfigError(f"{field}={path!r}: {name} has shape {y.shape}, but this "
                              f"config's model wants {x.shape}")
        return y

    return jax.tree_util.tree_map_with_path(take, fresh)




def trainable_shapes(run: Run) -> dict:
    """The shapes of what trains: the model's parameters, or an adapter run's adapters."""
    shapes = param_shapes(run.model_config)
    if run.adapters is None:
        return shapes
    return jax.eval_shape(_adapter_init(run), shapes, jax.random.PRNGKey(0))


def _adapter_init(run: Run):
    return lambda weights, rng: adapters.init(weights, run.adapters, run.adapter_plan, rng)


def plan_shardings(run: Run, optimizer) -> TrainShardings:
    mc, mesh, B = run.model_config, run.mesh, run.cfg.train.batch_size
    params = trainable_shapes(run)
    opt = jax.eval_shape(optimizer.init, params)
    carry = jax.eval_shape(lambda: zero_state(mc, B))
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt,
                        carry=carry, loss_scale=scalar, good_steps=jax.ShapeDtypeStruct((), jnp.int32))
    p_sh = shd.param_shardings(params, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = TrainState(step=replicated, params=p_sh,
                       opt_state=shd.opt_state_shardings(opt, params, p_sh, mesh),
                       carry=shd.state_shardings(carry, mesh), loss_scale=replicated,
                       good_steps=replicated)
    layout = TrainShardings(state=state, shapes=shapes, batch=shd.batch_sharding(mesh, 2))
    if run.adapters is not None:  # the frozen base: bf16 matrices, sharded like the model's
        weights = param_shapes(mc)
        layout.base = shd.param_shardings(weights, mesh)
        layout.base_shapes = jax.tree_util.tree_map_with_path(lambda kp, x: jax.ShapeDtypeStruct(
            x.shape, adapters.frozen_dtype(tuple(k.key for k in kp), x.dtype)), weights)
    return layout


def read_initial_state(path: str, model_config: ModelConfig) -> dict:
    """The learned initial state of `train.init_state_from` by its path in the params tree
    ("blocks_N/init_state/NAME"); ConfigError naming the field if the file does not fit."""
    try:
        values = load_state(path, model_config)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise ConfigError(f"train.init_state_from={path!r}: {e}") from None
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(values)}


def init_params_fn(mc: ModelConfig):
    model = RWKV(mc)
    return lambda rng: model.init(rng, jnp.zeros((1, 2), jnp.int32))["params"]


def make_optimizer(run: Run):
    return optim.make_optimizer(trainable_shapes(run), optimizer_config_from(run.cfg))


def init_train_state(run: Run, rng, layout: TrainShardings | None = None) -> tuple[TrainState, Any]:
    """A fresh training state, created directly in its shards: no device or host ever holds
    the whole of the parameters or the optimizer state (unless weights come from init_from)."""
    optimizer = make_optimizer(run)
    layout = layout or plan_shardings(run, optimizer)
    sh = layout.state
    state_file = run.cfg.train.init_state_from
    # Read and checked before anything compiles, like init_from's weights.
    tuned = read_initial_state(state_file, run.model_config) if state_file else None
    if run.adapters is not None:  # the state file's values go to the (frozen) model weights
        params = _init_adapters(run, rng, layout, (state_file, tuned))
        tuned = None
    elif run.cfg.train.init_from:
        params = jax.device_put(_initial_weights(run, rng), sh.params)
    else:
        params = jax.jit(init_params_fn(run.model_config), out_shardings=sh.params)(rng)
    if tuned is not None:
        params = jax.device_put(
            _onto_fresh(state_file, tuned, params, "train.init_state_from"), sh.params)
    opt_state = jax.jit(optimizer.init, out_shardings=sh.opt_state)(params)
    mc, B = run.model_config, run.cfg.train.batch_size
    scale = run.cfg.train.loss_scale if mc.dtype == "float16" else 1.0
    make_rest = jax.jit(
        lambda: (zero_state(mc, B), jnp.int32(0), jnp.float32(scale), jnp.int32(0)),
        out_shardings=(sh.carry, sh.step, sh.loss_scale, sh.good_steps))
    carry, step, loss_scale, good = make_rest()
    ts = TrainState(step=step, params=params, opt_state=opt_state, carry=carry,
                    loss_scale=loss_scale, good_steps=good)
    return ts, optimizer


def _initial_weights(run: Run, rng) -> dict:
    """train.init_from's weights on the fresh init's tree (read and checked in prepare, before
    anything compiled: weights that cannot be used are refused at once)."""
    source = run.initial_weights if run.initial_weights is not None else \
        read_initial_weights(run.cfg.train.init_from, run.model_config)
    run.initial_weights = None  # on the device from here: the host copy is not kept
    return _onto_fresh(run.cfg.train.init_from, source,
                       jax.jit(init_params_fn(run.model_config))(rng))


def _init_adapters(run: Run, rng, layout: TrainShardings, state: tuple) -> dict:
    """An adapter run's adapters at step 0 (fresh, or train.lora.init_from's); the base's
    float32 weights (with train.init_state_from's `state`, if any) wait in `run.base_weights`
    for freeze_base."""
    weights = _initial_weights(run, rng)
    if state[1] is not None:
        weights = _onto_fresh(state[0], state[1], weights, "train.init_state_from")
    weights = jax.device_put(weights, layout.base)
    trainable = jax.jit(_adapter_init(run), out_shardings=layout.state.params)(weights, rng)
    if run.initial_adapters is not None:  # train.lora.init_from's, checked in prepare
        trainable = jax.device_put(_onto_fresh(run.cfg.train.lora.init_from,
                                               _keyed(run.initial_adapters), trainable,
                                               "train.lora.init_from"), layout.state.params)
        run.initial_adapters = None
    run.base_weights = weights
    return trainable


def _keyed(tree: dict) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def freeze_base(run: Run, trainable, layout: TrainShardings) -> None:
    """The frozen base the steps read (run.base): bf16 matrices, PiSSA's residual computed
    from the initial factors in `trainable` (a resumed run's, restored). Called once the
    adapters are final; the float32 weights are let go."""
    run.base = jax.jit(adapters.frozen_base, out_shardings=layout.base)(run.base_weights, trainable)
    run.base_weights = None


def compile_step(fn, run: Run, layout: TrainShardings, donate: tuple, first: bool = False):
    """Compile a train step ahead of time; the first one's XLA memory figure joins the plan."""
    B, L = run.cfg.train.batch_size, run.chunk_len
    batch = jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=layout.batch)
    # Per-row loss masks where the data has them (jsonl), else one per chunk position.
    masked = run.batches is not None and run.batches.masked
    mask = jax.ShapeDtypeStruct((B, L) if masked else (L,), jnp.float32,
                                sharding=layout.batch if masked else None)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         layout.shapes, layout.state)
    base = None if layout.base is None else jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), layout.base_shapes,
        layout.base)
    jitted = jax.jit(fn, donate_argnums=donate,
                     in_shardings=(layout.state, layout.batch, layout.batch,
                                   layout.batch if masked else None, layout.base),
                     out_shardings=(layout.state, None))
    compiled = jitted.lower(state, batch, batch, mask, base).compile()
    if first:
        xla = xla_step_bytes(compiled)
        limit = device_memory()
        if xla is not None:
            log.info("XLA's plan for the train step: %.2f GiB per device%s", xla / 2**30,
                     f" of {limit / 2**30:.2f} GiB" if limit else "")
            if limit and xla > limit:
                raise MemoryPlanError(
                    f"XLA's compiled train step needs {xla / 2**30:.1f} GiB per device, more than "
                    f"the {limit / 2**30:.1f} GiB there is. Try: "
                    f"{suggestion(run.model_config, run.mesh)}")
    return compiled


def global_batch(local_rows: np.ndarray, sharding, global_shape) -> jax.Array:
    """The global batch array from this process's rows (all rows when there is one process)."""
    return jax.make_array_from_process_local_data(sharding, local_rows, global_shape)
