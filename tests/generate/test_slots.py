"""Per-row sampling of generate.slots: each row's candidates (top_k, ChatRWKV's top_p), a token
that depends on the row alone, and the partial-sort path giving what a full sort gives."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.generate.sampling import Sampling
from rwkv_jax.generate.slots import draw_rows


def _draw(keys, knobs, top_k, logits, k0=256):
    return jax.jit(draw_rows, static_argnames="k0")(keys, logits, knobs, top_k, k0=k0)


def _inputs(settings, seed=0):
    knobs = jnp.asarray(np.stack([Sampling(temperature=t, top_p=p).knobs() for t, p, _ in settings]))
    top_k = jnp.asarray([k for _, _, k in settings], jnp.int32)
    keys = jax.vmap(lambda s: jax.random.key_data(jax.random.key(s)))(
        jnp.arange(len(settings)) + seed)
    return keys, knobs, top_k


def test_candidates_are_top_k_and_the_top_p_prefix():
    probs = np.asarray([0.05, 0.5, 0.15, 0.3])  # by mass: 1, 3, 2, 0
    # 150 rows of each setting (rows are independent: one call draws them all).
    settings = [(1.0, 0.7, 0), (1.0, 1.0, 3), (2.0, 1.0, 0)] * 150
    logits = jnp.asarray(np.log(probs), jnp.float32)[None].repeat(len(settings), 0)
    tokens, _ = _draw(*_inputs(settings), logits)
    seen = [set(np.asarray(tokens)[i::3].tolist()) for i in range(3)]
    # top_p 0.7: the mass first reaches 0.7 at token 3 (0.5 + 0.3); top_k 3 drops token 0.
    assert seen == [{1, 3}, {1, 2, 3}, {0, 1, 2, 3}]


def test_a_rows_token_is_its_own_and_the_partial_sort_gives_the_full_sorts():
    rng = np.random.default_rng(0)
    V = 64
    # Peaked rows (their candidates within the 4 most likely) and flat ones (past them).
    logits = rng.normal(size=(6, V)).astype(np.float32)
    logits[:3] *= 8
    settings = [(0.8, 0.6, 0), (1.0, 1.0, 3), (0.5, 0.9, 2), (1.0, 0.9, 0), (0.7, 1.0, 10),
                (1.2, 1.0, 0)]
    keys, knobs, top_k = _inputs(settings)
    x = jnp.asarray(logits)
    together, next_keys = _draw(keys, knobs, top_k, x, k0=4)
    assert np.array_equal(together, _draw(keys, knobs, top_k, x, k0=V)[0])
    for i in range(6):  # each row alone: the same token and key
        alone, key = _draw(keys[i:i + 1], knobs[i:i + 1], top_k[i:i + 1], x[i:i + 1], k0=4)
        assert int(alone[0]) == int(together[i]) and np.array_equal(key[0], next_keys[i])
