"""RWKV-LM's pretraining sampler (RWKV-v7/train_temp/src/dataset.py): sample `ii` of a run reads
ctx+1 tokens at ((f * ii**3) mod p) * ctx, p the "magic prime", so each mini-epoch of 40320
samples visits ctx-slots in a fixed pseudo-random order. Our (step, global row) maps onto
RWKV-LM's (mini-epoch, DataLoader idx, rank), so a run here reads RWKV-LM's batches.
"""

from __future__ import annotations

import math

import numpy as np

from rwkv_jax.data.batches import row_range

MINI_EPOCH = 40320  # samples per RWKV-LM "epoch" (train.py asserts epoch_steps * real_bsz == 40320)


def is_prime(n: int) -> bool:
    if n <= 3:
        return n > 1
    if n % 2 == 0 or n % 3 == 0:
        return False
    i = 5
    while i * i <= n:
        if n % i == 0 or n % (i + 2) == 0:
            return False
        i += 6
    return True


def magic_prime(num_tokens: int, ctx: int) -> int:
    """The largest prime p = 2 mod 3 with 0.9 < p / (num_tokens // ctx) <= 1, searched from
    num_tokens // ctx - 1 down as make_data.py does, so the last window's ctx+1 tokens fit."""
    if ctx <= 0:
        raise ValueError(f"ctx must be positive, got {ctx}")
    slots = num_tokens // ctx
    p = slots - 1
    while p > 0 and p / slots > 0.9:
        if p % 3 == 2 and is_prime(p):
            return p
        p -= 1
    raise ValueError(f"no magic prime for {num_tokens} tokens at ctx {ctx} ({slots} slots of ctx "
                     f"tokens): need a prime p = 2 mod 3 with 0.9 < p / {slots} <= 1; use more data "
                     f"or a shorter ctx")


def check_magic_prime(p: int, num_tokens: int, ctx: int) -> None:
    """RWKV-LM's checks of --magic_prime (dataset.py), plus that every window lies in the data."""
    slots = num_tokens // ctx if ctx > 0 else 0
    why = None
    if not isinstance(p, int) or isinstance(p, bool) or not is_prime(p):
        why = "is not a prime"
    elif p % 3 != 2:
        why = f"is {p % 3} mod 3, not 2"
    elif not (slots and 0.9 < p / slots <= 1):
        why = f"is not within 0.9 to 1 times the {slots} slots of ctx={ctx} tokens"
    elif p * ctx + 1 > num_tokens:
        why = f"makes the last window end at token {p * ctx + 1}, past the data's {num_tokens}"
    if why:
        try:
            hint = f"; for this data and ctx use {magic_prime(num_tokens, ctx)}"
        except ValueError as e:
            hint = f"; {e}"
        raise ValueError(f"data.magic_prime={p!r} {why}{hint}")


def sample_offset(p: int, ctx: int, epoch: int, idx: int, world_size: int, rank: int) -> int:
    """The first token RWKV-LM's MyDataset.__getitem__ reads for (epoch, idx, rank)."""
    ii = 1 + epoch * MINI_EPOCH + idx * world_size + rank
    factor = int(p * ((math.sqrt(5) - 1) / 2))  # float golden ratio, as dataset.py computes it
    return ((factor * ii * ii * ii) % p) * ctx  # python ints: exact


def check_rwkv_lm_batch(batch_size: int, world_size: int) -> int:
    if world_size <= 0 or batch_size <= 0 or batch_size % world_size:
        raise ValueError(f"train.batch_size={batch_size} must be a positive multiple of "
                         f"data.rwkv_lm_world_size={world_size} (RWKV-LM's micro_bsz per rank)")
    if MINI_EPOCH % batch_size:
        raise ValueError(f"train.batch_size={batch_size} must divide {MINI_EPOCH}, RWKV-LM's samples "
                         f"per mini-epoch (e.g. 8, 16, 32, 64, 96, 128, 192, 320)")
    return batch_size // world_size


def rwkv_lm_batch(tokens, *, step: int, batch_size: int, ctx: int, prime: int,
                  world_size: int = 1, rows: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
    """int32 (inputs, targets) of shape (rows, ctx): global step `step`'s rows as RWKV-LM on
    `world_size` ranks reads them. Global row j is rank j // micro's k = j % micro'th sample of
    its DataLoader batch t = step % (40320 // batch_size), in mini-epoch step // (40320 // B)."""
    tokens = getattr(tokens, "tokens", tokens)  # a BinIdx or TokenFile, or a 1-D array
    micro = check_rwkv_lm_batch(batch_size, world_size)
    check_magic_prime(prime, len(tokens), ctx)
    epoch, t = divmod(step, MINI_EPOCH // batch_size)
    start, stop = row_range(rows, batch_size)
    out = np.empty((stop - start, ctx + 1), dtype=np.int32)
    for r, j in enumerate(range(start, stop)):
        rank, k = divmod(j, micro)
        offset = sample_offset(prime, ctx, epoch, t * micro + k, world_size, rank)
        out[r] = tokens[offset:offset + ctx + 1]
    return out[:, :-1], out[:, 1:]
