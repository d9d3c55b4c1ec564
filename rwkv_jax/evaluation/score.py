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


def score_documents(apply_fn, params, docs, chunk_len: int, max_tokens: int | None = None,
                    rows: int = 8) -> tuple[float, int, int]:
    """Loss of documents as training sees a jsonl row: each from the start state (learned,
    where the model has one), only its trained targets counted (an assistant's tokens), fed
    through the state chunk by chunk, whole (training cuts a row at train.max_seq_length + 1;
    the state carries a validation document to its end). `docs` has num_docs and document(i)
    -> (tokens, mask) (data.jsonl.DocumentFile). Documents go `rows` at a time, padded (pads
    are masked); with max_tokens, documents are taken in order until that many targets are
    counted.

    Returns (sum of losses in nats, targets counted, documents scored)."""
    total, count, scored = 0.0, 0, 0
    for first in range(0, docs.num_docs, rows):
        batch = [d for d in (docs.document(i) for i in range(first, min(first + rows,
                                                                          docs.num_docs)))
                 if d[1][1:].any()]  # a document with no trained target scores nothing
        if not batch:
            continue
        span = -(-max(len(t) - 1 for t, _ in batch) // chunk_len) * chunk_len
        x, y = np.zeros((2, rows, max(span, chunk_len)), np.int32)
        m = np.zeros(x.shape, np.float32)
        for r, (toks, mask) in enumerate(batch):
            k = len(toks) - 1
            x[r, :k], y[r, :k], m[r, :k] = toks[:-1], toks[1:], mask[1:]
        state = None
        for a in range(0, x.shape[1], chunk_len):
            logits, state = apply_fn(params, jnp.asarray(x[:, a:a + chunk_len]), state)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[:, a:a + chunk_len])
            total += float(jnp.sum(ce * m[:, a:a + chunk_len]))
        count += int(m.sum())
        scored += len(batch)
        if max_tokens and count >= max_tokens:
            break
    return total, count, scored


def evaluate(config: ModelConfig, params, token_file, chunk_len: int,
             max_tokens: int | None = None) -> dict:
    """Loss (nats per token) and bits per byte of a token source (its tokens, num_tokens and
    num_bytes: a data.TokenFile), or of its first max_tokens tokens; bpb is None for a source
    that does not know its text's bytes (binidx, jsonl). A source of documents (jsonl) is
    scored document by document on their trained tokens (score_documents), as it trains."""
    apply_fn = jitted_apply(RWKV(config))
    if hasattr(token_file, "loss_mask"):  # documents with trained targets (jsonl)
        total, count, scored = score_documents(apply_fn, params, token_file, chunk_len, max_tokens)
        return {"loss": total / max(count, 1), "bpb": None, "tokens": count, "documents": scored}
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
