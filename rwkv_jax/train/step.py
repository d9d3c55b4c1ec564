"""The jitted training step: one chunk of every row, the loss masked to the chunk's own tokens,
the recurrent state carried out (no gradient flows between chunks: truncated backprop through
time), dynamic loss scaling under float16.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rwkv_jax.nn import adapters as ad
from rwkv_jax.nn import state_codec
from rwkv_jax.nn.model import RWKV


class TrainingDiverged(RuntimeError):
    """The loss or the gradients went NaN/inf; the last good checkpoint is kept."""


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # optimizer updates done
    params: Any
    opt_state: Any
    carry: Any  # the recurrent state handed to the next chunk
    loss_scale: jax.Array  # dynamic loss scale (float16 only; 1 otherwise)
    good_steps: jax.Array  # finite steps since the loss scale last changed


def masked_ce(logits, targets, mask, saved_dtype=None):
    """(mean cross-entropy over the masked tokens, their count). saved_dtype: what the backward
    keeps of the logits (bf16 where a bf16 head made them, so the round trip is exact: half
    the bytes of the step's widest tensor); None keeps them as they come: optax's loss, whose
    rounding an old run's bit-for-bit resume pins (tests/io/test_compat.py)."""
    if saved_dtype is None or jnp.dtype(saved_dtype) == logits.dtype:
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    else:
        ce = _token_ce(logits, targets, jnp.dtype(saved_dtype))
    mask = jnp.broadcast_to(mask, ce.shape)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0), jnp.sum(mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _token_ce(logits, targets, saved_dtype):
    return _token_ce_fwd(logits, targets, saved_dtype)[0]


def _token_ce_fwd(logits, targets, saved_dtype):
    # Rounded to what the backward keeps: a no-op on logits a half-precision head made, and
    # the loss and its gradient stay one function where XLA kept excess precision.
    fi = jnp.finfo(saved_dtype)
    logits = jax.lax.reduce_precision(logits, fi.nexp, fi.nmant)
    targets = jnp.where(targets < 0, targets + logits.shape[-1], targets)  # as take_along_axis
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - picked, (logits.astype(saved_dtype), lse, targets)


def _token_ce_bwd(saved_dtype, res, g):
    low, lse, targets = res
    logits = low.astype(jnp.float32)
    onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
    return (g[..., None] * (jnp.exp(logits - lse[..., None]) - onehot), None)


_token_ce.defvjp(_token_ce_fwd, _token_ce_bwd)


def chunk_forward(model: RWKV, params, inputs, state, handoff: int,
                  around=lambda call: contextlib.nullcontext()):
    """Logits of one chunk and the state at `handoff` (the next chunk's start).

    With overlapping chunks the next chunk starts inside this one, so the chunk runs as two
    calls split there; the state between them is the one to hand on. around(i): a context
    for model call i (adapters, with dropout masks of their own per call).
    """
    L = inputs.shape[1]
    if handoff >= L:
        with around(0):
            return model.apply({"params": params}, inputs, state)
    with around(0):
        head, mid = model.apply({"params": params}, inputs[:, :handoff], state)
    with around(1):
        tail, _ = model.apply({"params": params}, inputs[:, handoff:], mid)
    return jnp.concatenate([head, tail], axis=1), mid


def make_train_step(model: RWKV, optimizer, *, fresh: bool, handoff: int, float16: bool,
                    adapters: ad.AdapterSpec | None = None, seed: int = 0):
    """One optimizer update on one chunk. `fresh`: the chunk starts a sequence (state=None,
    i.e. the zero or learned initial state, so gradients reach a learned one). `adapters`:
    the params are an adapter run's (nn.adapters) over the frozen `base` the step is given."""

    def loss_fn(params, inputs, targets, mask, carry, scale, base, rng):
        weights, around = params, lambda call: contextlib.nullcontext()
        if adapters is not None:
            weights = ad.overlay(base, params)
            around = lambda call: ad.applied(  # noqa: E731
                params, adapters, None if rng is None else jax.random.fold_in(rng, call))
        if not fresh:
            # The chunk starts from the state as memory.state_compression stores it; with the
            # learned codec this round trip is what trains it.
            carry = state_codec.roundtrip(carry, model.config.state_compression, weights)
        logits, new_carry = chunk_forward(model, weights, inputs, None if fresh else carry,
                                          handoff, around)
        # A bf16 head makes bf16 logits (adapters add to them in that dtype too): the loss
        # keeps those for its backward.
        with jax.named_scope("loss"):
            loss, count = masked_ce(logits, targets, mask, saved_dtype=model.config.dtype)
        return loss * scale, (loss, count, new_carry)

    def step(ts: TrainState, inputs, targets, mask, base=None):
        scale = ts.loss_scale if float16 else jnp.float32(1.0)
        # LoRA dropout's masks: a function of (seed, step), so a resumed run draws the same.
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), ts.step) \
            if adapters is not None and adapters.dropout > 0 else None
        grads, (loss, count, carry) = jax.grad(loss_fn, has_aux=True)(
            ts.params, inputs, targets, mask, ts.carry, scale, base, rng)
        with jax.named_scope("optimizer"):
            grads = jax.tree.map(lambda g: g / scale, grads)
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
            params = optax.apply_updates(ts.params, updates)
        # The new weights too: finite gradients can make weights that are not (an update's
        # norm would overflow where each of its elements does not).
        finite_params = jax.tree.reduce(lambda acc, p: acc & jnp.isfinite(p).all(), params,
                                        jnp.bool_(True))
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & finite_params
        # A non-finite step changes nothing (float16 overflow is routine; otherwise the host stops),
        # and neither does one with no target to learn from (a chunk of jsonl prompts alone):
        # AdamW's momentum and weight decay would move the weights on no data.
        update = ok & (count > 0)

        def keep(new, old):
            return jax.tree.map(lambda a, b: jnp.where(update, a, b), new, old)

        loss_scale, good = ts.loss_scale, ts.good_steps
        if float16:
            grow = ok & (good + 1 >= 2000)
            loss_scale = jnp.where(ok, jnp.where(grow, loss_scale * 2, loss_scale), loss_scale / 2)
            good = jnp.where(ok & ~grow, good + 1, 0)
        new = TrainState(
            step=ts.step + 1, params=keep(params, ts.params), opt_state=keep(opt_state, ts.opt_state),
            carry=carry, loss_scale=loss_scale, good_steps=good)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": ok, "tokens": count,
                   "loss_scale": loss_scale}
        return new, metrics

    return step


def check_finite(metrics, step: int, float16: bool):
    if float16:
        ok = bool(np.isfinite(float(metrics["loss"])))
    else:
        ok = bool(metrics["finite"])
    if not ok:
        raise TrainingDiverged(
            f"step {step}: the loss ({float(metrics['loss'])}), the gradient norm "
            f"({float(metrics['grad_norm'])}) or the update is not finite. The update was "
            f"skipped and no "
            "checkpoint is written past the last good one; lower optimizer.lr, raise "
            "optimizer.warmup_steps, or use efficiency.precision='float32'.")
