"""The jitted pieces of generation: prefill pieces, the decode block (a device-side loop of
steps), flat states.

Prefill: the prompts' common length but its last token runs as parallel model calls, in chunks
of `prefill_chunk` and the rest in power-of-two pieces, so prompts of any length compile at
most log2(prefill_chunk) + 1 shapes (prefill_chunk=0: one call, compiled for that length).
Decode: one jitted call runs a block of up to `decode_block` steps on the device (a while
loop), each feeding a token per row, updating the state in place (donated), sampling the next
token and advancing each row's PRNG key; the prompt's last token goes through it too, which
picks the first new token. Rows whose prompt is longer than the shortest go through the same
steps with the sampled token replaced by their next prompt token, so every row's output is the
one it would get alone (with the same seed). Stop tokens and max_new_tokens end a row on the
device, and the block ends early once every row has ended, so the host launches one call per
block rather than per token: a batch-1 step of a big model on a GPU takes milliseconds, and
launching it (hundreds of weight arrays) costs the host about as much again.

The host reads each block's tokens one block late, after queueing the next block (none past
the last block a call can need), so the device never waits for Python; stop strings and
streaming work on those tokens. Between the generator's own compiled calls the state stays flat
on the device, one array per dtype (rwkv_jax.nn.state.FlatLayout): what a call costs the host
grows with the arrays it returns; callers get the tree. A stop string ends its row from the
next block queued on; the state a call returns has consumed every token of each row, the last
generated one included (a row that stopped early is frozen from then on), so a next call
continues from it with new text. Where a stop string ended a row in the middle of a block and
the state is kept, that row's state is recomputed from the block's start (a copy taken before
the block ran) through its last token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rwkv_jax.generate.sampling import DecodeCarry, advance
from rwkv_jax.nn.model import initial_state


def keep_rows(live, new, old):
    def pick(a, b):
        return jnp.where(live.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, new, old)


def prefill_piece(forward, layout, weights, tokens, flat):
    _, state = forward(weights, tokens, layout.unflatten(flat), last_only=True)
    return layout.flatten(state)  # the logits are unused, so XLA drops the head


def model_step(forward, rows, weights, state, token):
    """Logits (B, V) and the state after feeding one token per row."""
    B = token.shape[0]
    if B < rows:
        # Matrix products of a single row compile to matrix-vector forms that read the weights
        # more slowly than a small matrix product does; padding rows (discarded) cost no reads.
        grow = lambda a: jnp.concatenate([a, jnp.zeros((rows - B,) + a.shape[1:], a.dtype)])  # noqa: E731
        state, token = jax.tree.map(grow, state), grow(token)
    logits, state = forward(weights, token[:, None], state)
    if B < rows:
        logits, state = logits[:B], jax.tree.map(lambda a: a[:B], state)
    return logits[:, 0], state


def run_decode_block(forward, layout, spec, rows, weights, carry: DecodeCarry, forced_tok, forced_mask,
                  allowed, stop_ids, max_new, knobs, weight):
    """Up to K = forced_tok.shape[1] decode steps; fewer once no row has a token left to feed.

    Step s feeds each row's `carry.token` and picks the row's next token: its prompt token
    where forced_mask[:, s], else a sampled one (emitted). An emitted stop token (in stop_ids,
    padded with -1) or the max_new-th generated token ends the row: the next step feeds it,
    then the row's state stays as it is. `allowed` False ends a row now (a stop string the
    host found). Returns the carry and the emitted tokens (B, K), -1 where none was.
    """
    B, K = forced_tok.shape
    carry = carry._replace(state=layout.unflatten(carry.state), consume=carry.consume & allowed,
                           alive=carry.alive & allowed)

    def body(loop):
        s, c, out = loop
        logits, state = model_step(forward, rows, weights, c.state, c.token)
        if B > 1:  # finished rows keep their state; one row runs only while it consumes
            # (and the select would make XLA copy the state around an in-place kernel)
            state = keep_rows(c.consume, state, c.state)
        emitted = c.alive & ~forced_mask[:, s]
        token, c = advance(spec, logits, c._replace(state=state), forced_tok[:, s], ~emitted,
                            knobs, weight)
        stop = jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
        made = c.made + (emitted & ~stop)
        ends = emitted & (stop | (made >= max_new))
        out = out.at[:, s].set(jnp.where(emitted, token, -1))
        c = c._replace(token=token, consume=c.alive, alive=c.alive & ~ends, made=made)
        return s + 1, c, out

    def more(loop):
        s, c, _ = loop
        return (s < K) & jnp.any(c.consume)

    _, carry, out = jax.lax.while_loop(more, body, (jnp.int32(0), carry,
                                                    jnp.full((B, K), -1, jnp.int32)))
    return carry._replace(state=layout.flatten(carry.state)), out


def flat_state(config, layout, learned, state, batch_size: int):
    """`state`, or where it is None the initial state of `batch_size` rows, flat and copied
    (the steps donate what they are given)."""
    if state is None:
        state = initial_state(config, learned, batch_size)
    return copy_state(layout.flatten(state))


def start_carry(config, layout, learned, state, keys, token, pen: int) -> DecodeCarry:
    """A call's first carry: the state as flat_state makes it; every row consumes `token`
    first and is alive; penalty counts of width `pen` (0: none)."""
    B = token.shape[0]
    return DecodeCarry(flat_state(config, layout, learned, state, B), keys,
                  jnp.zeros((B, pen), jnp.float32), jnp.zeros((B, pen), bool), token,
                  jnp.ones(B, bool), jnp.ones(B, bool), jnp.zeros(B, jnp.int32))


def feed_rows(forward, layout, rows, weights, flat, tokens, counts):
    """The state after row i has fed tokens[i, :counts[i]] one step at a time, as decoding
    does (the replay of a row that a stop string ended in the middle of a block)."""

    def body(s, state):
        _, new = model_step(forward, rows, weights, state, tokens[:, s])
        return keep_rows(s < counts, new, state)

    state = jax.lax.fori_loop(0, tokens.shape[1], body, layout.unflatten(flat))
    return layout.flatten(state)


# Leaves kept in float32 although they have two or more dimensions: the learned codec, learned
# initial states (RWKV-7's are matrices) and RWKV-7's per-head bonus r_k, which multiplies
# elementwise rather than in a matrix product.
_FLOAT32_PATHS = ("state_codec", "init_state", "'r_k'")


def inference_params(params, dtype=jnp.bfloat16):
    """Weights for decoding: matrices and tables in `dtype` (what each token reads), vectors
    (mixes, decays, norms), initial states and the state codec in float32."""

    def cast(path, x):
        x = jnp.asarray(x)
        name = jax.tree_util.keystr(path)
        if x.ndim < 2 or any(p in name for p in _FLOAT32_PATHS):
            return x
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def copy_state(state: dict) -> dict:
    # The steps donate their state; a caller's own arrays must survive the call. Under jit an
    # array a function returns as it came in may be handed back as the input itself (a leaf
    # that flattens to itself); a copy is an operation of its own, so its output never is.
    return jax.tree.map(jnp.copy, state)
