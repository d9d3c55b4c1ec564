"""Scoring a token stream: its loss fed through the recurrent state chunk by chunk (memory does
not grow with its length), and bits per byte, comparable across tokenizers."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rwkv_jax.config import ModelConfig
from rwkv_jax.nn.model import RWKV


def score_stream(apply_fn, params, tokens: np.ndarray, chunk_len: int, state=None):
    """Mean next-token loss of one long token stream fed through the state chunk by chunk.

    Returns (sum of losses in nats, count). `apply_fn(params, inputs, state) -> (logits, state)`
    is a jitted model call.
    """
    tokens = np.asarray(tokens)
    total, count = 0.0, 0
    n = len(tokens) - 1
    for a in range(0, n, chunk_len):
        b = min(a + chunk_len, n)
        inputs = jnp.asarray(tokens[None, a:b], jnp.int32)
        targets = jnp.asarray(tokens[None, a + 1 : b + 1], jnp.int32)
        logits, state = apply_fn(params, inputs, state)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        total += float(jnp.sum(ce))
        count += b - a
    return total, count


def evaluate(config: ModelConfig, params, token_file, chunk_len: int,
             max_tokens: int | None = None) -> dict:
    """Loss (nats per token) and bits per byte of a token source (its tokens, num_tokens and
    num_bytes: a data.TokenFile), or of its first max_tokens tokens; bpb is None for a source
    that does not know its text's bytes (binidx, jsonl)."""
    apply_fn = jitted_apply(RWKV(config))
    tokens = np.asarray(token_file.tokens)
    if max_tokens:
        tokens = tokens[: max_tokens + 1]
    total, count = score_stream(apply_fn, params, tokens, chunk_len)
    loss = total / max(count, 1)
    num_bytes = token_file.num_bytes
    if not num_bytes:
        return {"loss": loss, "bpb": None, "tokens": count}
    # Bytes per token of this file, for bits per byte of the part scored.
    bytes_scored = num_bytes * count / max(token_file.num_tokens - 1, 1)
    return {"loss": loss, "bpb": bits_per_byte(loss, count, bytes_scored), "tokens": count}


def bits_per_byte(mean_loss_nats_per_token: float, num_tokens: int, num_bytes: int) -> float:
    """Converts mean token loss to bits per UTF-8 byte, comparable across tokenizers."""
    if num_bytes <= 0:
        raise ValueError(f"num_bytes must be positive, got {num_bytes}.")
    return float(mean_loss_nats_per_token) * num_tokens / (num_bytes * math.log(2))


@partial(jax.jit, static_argnums=0)
def _apply(model, params, inputs, state):
    return model.apply({"params": params}, inputs, state)


def jitted_apply(model):
    """`apply_fn(params, inputs, state) -> (logits, state)` for score_stream, jitted once per
    model (a Flax module is hashable by its config)."""
    return lambda params, inputs, state: _apply(model, params, inputs, state)
