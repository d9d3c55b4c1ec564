"""Deterministic training batches (random windows of a token stream, a function of the step and
seed alone, so a resumed or multi-host run draws the same rows) and how a sequence splits into
chunks with their loss masks and state hand-off points.
"""

from __future__ import annotations

import numpy as np

from rwkv_jax.config import check_chunking
from rwkv_jax.data.tokens import TokenFile


def _tokens_and_name(source: TokenFile | np.ndarray) -> tuple[np.ndarray, str]:
    if isinstance(source, TokenFile):
        return source.tokens, str(source.path)
    tokens = np.asarray(source)
    if tokens.ndim != 1:
        raise ValueError(f"Expected a 1-D token array, got shape {tokens.shape}.")
    return tokens, "<token array>"


def _check_length(tokens: np.ndarray, name: str, seq_len: int) -> None:
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}.")
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"{name} has {len(tokens)} tokens but a sequence of seq_len={seq_len} needs "
            f"at least {seq_len + 1} (inputs plus one target)."
        )


def window_offsets(num_tokens: int, *, step: int, seed: int, batch_size: int, seq_len: int) -> np.ndarray:
    # Seeding from (seed, step) alone makes a batch independent of history, so a
    # resumed run replays exactly; all batch_size offsets are always drawn so any
    # subset of rows matches the full batch.
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, num_tokens - seq_len, size=batch_size)


def row_range(rows: slice | None, batch_size: int) -> tuple[int, int]:
    if rows is None:
        return 0, batch_size
    start, stop, stride = rows.indices(batch_size)
    if stride != 1:
        raise ValueError(f"rows must be a contiguous slice, got step {stride}.")
    return start, max(start, stop)


def get_batch(
    token_file_or_array: TokenFile | np.ndarray,
    *,
    step: int,
    seed: int,
    batch_size: int,
    seq_len: int,
    rows: slice | None = None,
    reads: list | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Random windows whose positions depend only on (seed, step, row).

    Returns int32 (inputs, targets) of shape (rows, seq_len), targets shifted by
    one token. Only the selected rows' windows are read; their (row_start,
    row_stop) is appended to `reads` when given.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    tokens, name = _tokens_and_name(token_file_or_array)
    _check_length(tokens, name, seq_len)
    offsets = window_offsets(len(tokens), step=step, seed=seed, batch_size=batch_size, seq_len=seq_len)
    start, stop = row_range(rows, batch_size)
    index = offsets[start:stop, None] + np.arange(seq_len + 1)
    windows = np.asarray(tokens[index], dtype=np.int32)
    if reads is not None:
        reads.append((start, stop))
    return windows[:, :-1], windows[:, 1:]


def chunk_spans(seq_len: int, chunk_size: int, overlap: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk; every chunk is exactly `chunk_size` long.

    With overlap, the last chunk is pulled back to end at `seq_len` so no chunk
    needs padding, which can make it overlap its predecessor by more than `overlap`.
    """
    check_chunking(seq_len, chunk_size, overlap)
    stride = chunk_size - overlap
    starts = list(range(0, seq_len - chunk_size + 1, stride))
    if starts[-1] + chunk_size < seq_len:
        starts.append(seq_len - chunk_size)
    return [(s, s + chunk_size) for s in starts]


def chunk_loss_masks(seq_len: int, chunk_size: int, overlap: int) -> np.ndarray:
    """float32 (num_chunks, chunk_size): 1 where a target is counted for the first time."""
    spans = chunk_spans(seq_len, chunk_size, overlap)
    masks = np.ones((len(spans), chunk_size), dtype=np.float32)
    for i in range(1, len(spans)):
        already_counted = spans[i - 1][1] - spans[i][0]
        masks[i, :already_counted] = 0.0
    return masks


def state_handoff(seq_len: int, chunk_size: int, overlap: int) -> list[int]:
    """For each chunk but the last, the position within it whose state starts the next chunk."""
    spans = chunk_spans(seq_len, chunk_size, overlap)
    return [nxt[0] - cur[0] for cur, nxt in zip(spans, spans[1:])]
