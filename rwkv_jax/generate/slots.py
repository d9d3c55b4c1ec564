"""Decoding over a fixed set of state slots, each row with its own sampling settings, seed and
length limit: the device side of the server's continuous batching (rwkv_jax.server.engine puts
requests into slots and takes them out between blocks).

One compiled block serves every mix of settings: temperature, top_p, top_k and the penalties
are arrays with a value per row, not static choices as in Generator's blocks. A row's tokens
depend only on its prompt, its settings and its seed, never on the other rows:
  - greedy rows (temperature 0) take the argmax of their penalised logits, as Generator's greedy
    blocks do, so greedy output is Generator's (and infer.py --temperature 0's);
  - sampling rows keep their top_k and top_p candidates (ChatRWKV's cut, as in sampling.py)
    and draw by inverse CDF with their own PRNG key, which advances only when they draw (so a
    seed gives other tokens than Generator's categorical draw).
Sampling runs only in steps where some live row samples: a greedy batch skips it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rwkv_jax.generate.decode_loop import keep_rows, model_step
from rwkv_jax.generate.sampling import DECAY, FREQUENCY, PRESENCE, TEMPERATURE, TOP_P


class SlotCarry(NamedTuple):
    """Every slot's decoding state (donated by each block)."""

    state: tuple  # the model state, flat (rwkv_jax.nn.state.FlatLayout), B rows
    keys: jax.Array  # (B, key words) uint32: each row's PRNG key
    counts: jax.Array  # (B, V) float32 penalty counts
    seen: jax.Array  # (B, V) bool: generated before
    token: jax.Array  # (B,) int32: the token each row feeds next
    alive: jax.Array  # (B,) bool: the row still generates
    made: jax.Array  # (B,) int32: tokens generated
    max_new: jax.Array  # (B,) int32: the row's limit


def empty_carry(flat, keys, vocab_size: int) -> SlotCarry:
    """Slots with nothing in them: `flat` a state of B rows, `keys` (B, key words)."""
    B = keys.shape[0]
    zeros = jnp.zeros(B, jnp.int32)
    return SlotCarry(flat, keys, jnp.zeros((B, vocab_size), jnp.float32),
                     jnp.zeros((B, vocab_size), bool), zeros, jnp.zeros(B, bool), zeros, zeros)


def install(carry: SlotCarry, slot, key, token, max_new) -> SlotCarry:
    """Slot `slot`, its state prefilled, starts generating: its PRNG key, the prompt's last
    token (fed first) and its limit; counts cleared."""
    put = lambda a, v: a.at[slot].set(v)
    return carry._replace(keys=put(carry.keys, key), counts=put(carry.counts, 0.0),
                          seen=put(carry.seen, False), token=put(carry.token, token),
                          alive=put(carry.alive, True), made=put(carry.made, 0),
                          max_new=put(carry.max_new, max_new))


def set_row(carry: SlotCarry, slot, row_flat) -> SlotCarry:
    """Slot `slot`'s state set to `row_flat` (a flat state of one row)."""
    return carry._replace(state=tuple(a.at[slot].set(r[0]) for a, r in zip(carry.state, row_flat)))


def get_row(carry: SlotCarry, slot) -> tuple:
    """Slot `slot`'s state, a flat state of one row (a copy)."""
    return tuple(jax.lax.dynamic_slice_in_dim(a, slot, 1) for a in carry.state)


def prefill_rows(forward, layout, weights, carry: SlotCarry, idx, tokens) -> SlotCarry:
    """The states of slots idx (G,) after feeding tokens (G, n) in parallel: the prefill of
    several requests in one call. A slot may repeat (padding) with the same tokens."""
    rows = layout.unflatten(tuple(a[idx] for a in carry.state))
    _, state = forward(weights, tokens, rows, last_only=True)  # XLA drops the unused head
    new = layout.flatten(state)
    return carry._replace(state=tuple(a.at[idx].set(r) for a, r in zip(carry.state, new)))


# Sampling rows find their candidates among their K0 most likely tokens (a partial sort, 80x
# cheaper than a full one on a CPU at 128 x 65536: bench/README.md); a step where some row's
# candidates reach past them sorts whole rows instead, with the same result.
K0 = 256


def draw_rows(keys, logits, knobs, top_k, k0: int = K0):
    """A token per row from its top_k / top_p candidates at its temperature, and its next key.

    One uniform number a row picks by inverse CDF: over the candidates from the most likely
    down where top_k or top_p cuts, else over the whole vocabulary in token order. Either way
    the token depends only on the row (its logits, settings, key), never on which path its
    batch took.
    """
    B, V = logits.shape
    temperature, top_p = knobs[:, TEMPERATURE], knobs[:, TOP_P]
    k = jnp.where((top_k > 0) & (top_k < V), top_k, V)
    cut = (k < V) | (top_p < 1)
    pairs = jax.vmap(jax.random.split)(jax.random.wrap_key_data(keys))
    u = jax.vmap(jax.random.uniform)(pairs[:, 1])
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # ChatRWKV cuts at temperature 1

    def sorted_pick(width):
        vals, idx = jax.lax.top_k(logits, width)  # most likely first
        in_k = jnp.arange(width)[None] < k[:, None]
        probs = jnp.where(in_k, jnp.exp(vals - lse), 0.0)
        reached = (jnp.cumsum(probs, axis=-1) >= top_p[:, None]) & in_k
        last = jnp.where(jnp.any(reached, axis=-1), jnp.argmax(reached, axis=-1),
                         jnp.minimum(k, width) - 1)
        cutoff = jnp.where(top_p < 1, jnp.take_along_axis(vals, last[:, None], axis=-1)[:, 0],
                           -jnp.inf)
        keep = in_k & (vals >= cutoff[:, None])
        token = jnp.take_along_axis(idx, _inverse_cdf(vals, keep, temperature, u)[:, None],
                                    axis=-1)[:, 0]
        # The candidates lie within these `width`: the row's top_k does, or top_p's mass is.
        fits = (k <= width) | ((top_p < 1) & jnp.any(reached, axis=-1))
        return token, fits

    def cut_rows():
        if k0 >= V:
            return sorted_pick(V)[0]
        token, fits = sorted_pick(k0)
        return jax.lax.cond(jnp.all(fits | ~cut), lambda: token, lambda: sorted_pick(V)[0])

    def whole_rows():
        return _inverse_cdf(logits, jnp.ones_like(logits, bool), temperature, u)

    zeros = jnp.zeros(B, jnp.int32)
    picked = jnp.where(cut, jax.lax.cond(jnp.any(cut), cut_rows, lambda: zeros),
                       jax.lax.cond(jnp.any(~cut), whole_rows, lambda: zeros))
    return picked.astype(jnp.int32), jax.random.key_data(pairs[:, 0])


def _inverse_cdf(vals, keep, temperature, u):
    """Per row, the first position where the running sum of softmax(vals / temperature) over
    `keep` passes u times its total."""
    top = jnp.max(jnp.where(keep, vals, -jnp.inf), axis=-1, keepdims=True)
    weights = jnp.where(keep, jnp.exp((vals - top) / temperature[:, None]), 0.0)
    running = jnp.cumsum(weights, axis=-1)
    return jnp.argmax(running > u[:, None] * running[:, -1:], axis=-1).astype(jnp.int32)


def _pick(c: SlotCarry, logits, greedy, knobs, top_k, weight):
    """Each live row's next token, its log-probability (penalised logits at temperature 1) and
    the carry's keys and penalty counts after it."""
    logits = (logits.astype(jnp.float32) - knobs[:, PRESENCE, None] * c.seen
              - knobs[:, FREQUENCY, None] * c.counts)
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    draws = c.alive & ~greedy
    drawn, keys = jax.lax.cond(jnp.any(draws), draw_rows, lambda k, *_: (best, k),
                               c.keys, logits, knobs, top_k)
    token = jnp.where(draws, drawn, best)
    keys = jnp.where(draws[:, None], keys, c.keys)
    rows = jnp.arange(logits.shape[0])
    logprob = logits[rows, token] - jax.nn.logsumexp(logits, axis=-1)
    live = c.alive[:, None]
    counts = jnp.where(live, c.counts * knobs[:, DECAY, None], c.counts)
    counts = counts.at[rows, token].add(jnp.where(c.alive, weight[token], 0.0))
    seen = c.seen.at[rows, token].set(c.seen[rows, token] | c.alive)
    return token, logprob, c._replace(keys=keys, counts=counts, seen=seen)


def slots_block(forward, layout, rows, steps: int, used: int, weights, carry: SlotCarry, live,
                greedy, knobs, top_k, stop_ids, weight):
    """Up to `steps` decode steps of the first `used` slots (the engine fills the lowest free
    slot first, and compiles a block per power of two: a server of 128 slots with 3 requests
    computes 4 rows, not 128); fewer steps once no row is alive.

    live (B,) False ends a row now (finished or cancelled on the host); greedy (B,), knobs
    (B, 5) in Sampling.knobs() order and top_k (B,) are each row's settings; a token in
    stop_ids (padded with -1) or the row's max_new-th token ends it. weight (V,): what a token
    adds to the frequency count. Returns the carry, the tokens (used, steps) and their
    log-probabilities, token -1 where a row emitted none.
    """
    head = lambda a: a[:used]
    sub, out, lps = _block(forward, layout, rows, steps, weights, jax.tree.map(head, carry),
                           live[:used], greedy[:used], knobs[:used], top_k[:used], stop_ids,
                           weight)
    # In place: the carry is donated.
    carry = jax.tree.map(lambda a, b: a.at[:used].set(b), carry, sub)
    return carry, out, lps


def _block(forward, layout, rows, steps, weights, carry, live, greedy, knobs, top_k, stop_ids,
           weight):
    B = carry.token.shape[0]
    carry = carry._replace(state=layout.unflatten(carry.state), alive=carry.alive & live)

    def body(loop):
        s, c, out, lps = loop
        logits, state = model_step(forward, rows, weights, c.state, c.token)
        c = c._replace(state=keep_rows(c.alive, state, c.state))
        token, logprob, c = _pick(c, logits, greedy, knobs, top_k, weight)
        stop = jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
        made = c.made + (c.alive & ~stop)
        ends = c.alive & (stop | (made >= c.max_new))
        out = out.at[:, s].set(jnp.where(c.alive, token, -1))
        lps = lps.at[:, s].set(logprob)
        c = c._replace(token=jnp.where(c.alive, token, c.token), alive=c.alive & ~ends, made=made)
        return s + 1, c, out, lps

    def more(loop):
        return (loop[0] < steps) & jnp.any(loop[1].alive)

    _, carry, out, lps = jax.lax.while_loop(
        more, body, (jnp.int32(0), carry, jnp.full((B, steps), -1, jnp.int32),
                     jnp.zeros((B, steps), jnp.float32)))
    return carry._replace(state=layout.flatten(carry.state)), out, lps
