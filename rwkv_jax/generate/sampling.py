"""Sampling settings and the per-row sampling step that runs inside the decode loop.

Sampling follows ChatRWKV (the `rwkv` package's PIPELINE):
  1. penalties: logits[t] -= presence_penalty * [t was generated] + frequency_penalty * count[t];
     count[t] is the number of times t was generated, every count shrinking by
     `penalty_decay` per generated token, and tokens that decode to a space, tab or digits
     counting 0 (ChatRWKV's exemption; they still take the presence penalty). Prompt tokens
     are not counted.
  2. temperature 0: the argmax of the penalised logits.
  3. otherwise the candidates are the top_k most likely tokens and, within them, those whose
     probability (at temperature 1, as ChatRWKV cuts before applying its temperature) is at
     least that of the token where the cumulative probability first reaches top_p; the token
     is drawn from softmax(logits / temperature) over the candidates.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# ChatRWKV counts a generated token 0 towards the frequency penalty when its text is a
# substring of this (a space, a tab, digits).
UNCOUNTED = " \t0123456789"


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1: no limit
    presence_penalty: float = 0.0  # ChatRWKV alpha_presence
    frequency_penalty: float = 0.0  # ChatRWKV alpha_frequency
    penalty_decay: float = 1.0  # ChatRWKV alpha_decay (its default is 0.996)

    def __post_init__(self):
        def need(ok, field, valid):
            if not ok:
                raise ValueError(f"sampling {field}={getattr(self, field)!r} is invalid: {valid}")

        for field in ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                      "penalty_decay"):  # NaN passes every comparison below
            need(math.isfinite(getattr(self, field)), field, "must be a finite number")
        need(self.temperature >= 0, "temperature", "must be >= 0 (0: greedy)")
        need(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be an integer >= 0")
        need(0 <= self.top_p <= 1, "top_p", "must be between 0 and 1")
        need(0 < self.penalty_decay <= 1, "penalty_decay", "must be in (0, 1]")

    def spec(self, vocab_size: int) -> SampleSpec:
        top_k = self.top_k if 0 < self.top_k < vocab_size else 0
        return SampleSpec(greedy=self.temperature == 0, top_k=top_k, top_p=self.top_p < 1,
                     penalties=bool(self.presence_penalty or self.frequency_penalty))

    def knobs(self) -> np.ndarray:
        return np.asarray([max(self.temperature, 1e-6), self.top_p, self.presence_penalty,
                           self.frequency_penalty, self.penalty_decay], np.float32)


GREEDY = Sampling(temperature=0.0)


# Where each number sits in Sampling.knobs(), the array a compiled step reads them from.
TEMPERATURE, TOP_P, PRESENCE, FREQUENCY, DECAY = range(5)


class SampleSpec(NamedTuple):
    """What the compiled step does (static); the numbers themselves are arguments."""

    greedy: bool
    top_k: int
    top_p: bool
    penalties: bool


class DecodeCarry(NamedTuple):
    """Everything a decode block updates in place (donated)."""

    state: tuple  # the state as one (B, n) array per dtype (rwkv_jax.nn.state.FlatLayout)
    keys: jax.Array  # (B, key words) uint32: each row's own PRNG key
    counts: jax.Array  # (B, V) float32 penalty counts; (B, 0) without penalties
    seen: jax.Array  # (B, V) bool: generated before; (B, 0) without penalties
    token: jax.Array | None = None  # (B,) int32: the token each row's next step feeds
    consume: jax.Array | None = None  # (B,) bool: the next step feeds it (else the row is done)
    alive: jax.Array | None = None  # (B,) bool: the row still picks tokens
    made: jax.Array | None = None  # (B,) int32: tokens generated (towards max_new_tokens)


def penalised(spec: SampleSpec, logits, carry: DecodeCarry, knobs):
    if not spec.penalties:
        return logits
    return logits - knobs[PRESENCE] * carry.seen - knobs[FREQUENCY] * carry.counts


def draw(spec: SampleSpec, keys, logits, knobs):
    """A token per row from the candidates top_k / top_p leave, at the temperature."""
    temperature, top_p = knobs[TEMPERATURE], knobs[TOP_P]
    if spec.top_k:
        vals, idx = jax.lax.top_k(logits, spec.top_k)
    elif spec.top_p:
        idx = jnp.argsort(-logits, axis=-1)
        vals = jnp.take_along_axis(logits, idx, axis=-1)
    else:
        vals, idx = logits, None
    if spec.top_p:
        probs = jnp.exp(vals - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
        reached = jnp.cumsum(probs, axis=-1) >= top_p
        last = jnp.where(jnp.any(reached, axis=-1), jnp.argmax(reached, axis=-1), vals.shape[-1] - 1)
        cutoff = jnp.take_along_axis(vals, last[:, None], axis=-1)
        vals = jnp.where(vals >= cutoff, vals, -jnp.inf)
    pairs = jax.vmap(jax.random.split)(jax.random.wrap_key_data(keys))
    choice = jax.vmap(jax.random.categorical)(pairs[:, 1], vals / temperature)
    token = choice if idx is None else jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
    return token.astype(jnp.int32), jax.random.key_data(pairs[:, 0])


def advance(spec: SampleSpec, logits, carry: DecodeCarry, forced_tok, forced_mask, knobs, weight):
    """The next token per row from its logits (B, V): sampled, or forced where forced_mask."""
    logits = penalised(spec, logits.astype(jnp.float32), carry, knobs)
    keys, counts, seen = carry.keys, carry.counts, carry.seen
    if spec.greedy:
        sampled = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        sampled, new_keys = draw(spec, keys, logits, knobs)
        # A forced step draws nothing, so a row's random stream does not depend on its batch.
        keys = jnp.where(forced_mask[:, None], keys, new_keys)
    if spec.penalties:
        generated = ~forced_mask
        rows = jnp.arange(logits.shape[0])
        counts = jnp.where(generated[:, None], counts * knobs[DECAY], counts)
        counts = counts.at[rows, sampled].add(jnp.where(generated, weight[sampled], 0.0))
        seen = seen.at[rows, sampled].set(seen[rows, sampled] | generated)
    token = jnp.where(forced_mask, forced_tok, sampled)
    return token, carry._replace(keys=keys, counts=counts, seen=seen)
