"""Every WKV form against a float64 reference, with state, in pieces, and differentiated."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err, wkv4_reference, wkv_inputs
from jax.test_util import check_grads

from rwkv_jax.ops import wkv4 as ops
from rwkv_jax.ops.wkv4 import NEG_INF, zero_state

FORMS = ["scan", "assoc", "chunked"]
# Jitted: one compile per shape instead of op-by-op dispatch of every scan level.
wkv4 = jax.jit(ops.wkv4, static_argnames=("impl", "chunk_size"))


def _inputs(rng, B=2, T=45, C=12, k_range=30.0):
    return wkv_inputs(rng, B, T, C, k_range)


@pytest.mark.parametrize("impl", FORMS)
def test_matches_float64_reference(rng, impl):
    td, tf, k, v = _inputs(rng)
    y, state = wkv4(td, tf, k, v, impl=impl, chunk_size=8)
    y_ref, (num, den, lp) = wkv4_reference(td, tf, k, v)
    assert y.dtype == jnp.float32 and y.shape == k.shape
    assert rel_err(y, y_ref) <= 1e-5
    # The state means (aa e^pp, bb e^pp); compare that in log space where it is huge or tiny.
    aa, bb, pp = (np.asarray(s, np.float64) for s in state)
    np.testing.assert_allclose(np.log(bb) + pp, np.log(den) + lp, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(aa / bb, num / den, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", FORMS)
def test_state_in_and_out_makes_pieces_equal_one_call(rng, impl):
    td, tf, k, v = _inputs(rng, T=50)
    y_full, s_full = wkv4(td, tf, k, v, impl=impl, chunk_size=8)
    ys, state = [], None
    for a, b in [(0, 7), (7, 8), (8, 31), (31, 50)]:  # uneven pieces, a one-token piece
        y, state = wkv4(td, tf, k[:, a:b], v[:, a:b], state, impl=impl, chunk_size=8)
        ys.append(y)
    assert rel_err(np.concatenate(ys, axis=1), y_full) <= 1e-5
    for got, want in zip(state, s_full):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_forms_agree_from_a_nonzero_state(rng):
    td, tf, k, v = _inputs(rng, T=33)
    _, s0 = wkv4_reference(td, tf, *_inputs(rng, T=5)[2:])
    y_ref, _ = wkv4_reference(td, tf, k, v, s0)
    s0 = tuple(np.asarray(s, np.float32) for s in s0)
    for impl in FORMS:
        y, _ = wkv4(td, tf, k, v, s0, impl=impl, chunk_size=16)
        assert rel_err(y, y_ref) <= 1e-5, impl


@pytest.mark.parametrize("T", [1, 16, 17, 100])
def test_chunked_any_length(rng, T):
    td, tf, k, v = _inputs(rng, T=T)
    y, _ = wkv4(td, tf, k, v, impl="chunked", chunk_size=16)
    assert rel_err(y, wkv4_reference(td, tf, k, v)[0]) <= 1e-5


def test_long_sequence_stays_finite(rng):
    td, tf, k, v = _inputs(rng, B=1, T=4096, C=4)
    for impl in ("assoc", "chunked"):
        y, state = wkv4(td, tf, k, v, impl=impl, chunk_size=256)
        assert np.isfinite(np.asarray(y)).all() and all(np.isfinite(np.asarray(s)).all() for s in state)


def test_bf16_inputs_compute_in_float32(rng):
    td, tf, k, v = _inputs(rng, k_range=5.0)
    y, state = wkv4(td, tf, jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16), impl="chunked")
    assert y.dtype == jnp.float32 and all(s.dtype == jnp.float32 for s in state)
    y_ref, _ = wkv4_reference(td, tf, np.asarray(jnp.asarray(k, jnp.bfloat16), np.float32),
                              np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32))
    assert rel_err(y, y_ref) <= 1e-5


def _loss(impl, chunk_size=4):
    """A scalar of the outputs and of what the state means, so the stabiliser pp cancels."""

    def f(td, tf, k, v, aa, bb, pp, gy):
        y, (a2, b2, p2) = wkv4(td, tf, k, v, (aa, bb, pp), impl=impl, chunk_size=chunk_size)
        return jnp.sum(y * gy) + jnp.sum(jnp.log(b2) + p2) + jnp.sum(a2 / b2)

    return f


def _grad_inputs(rng, B=2, T=11, C=3):
    td, tf, k, v = _inputs(rng, B=B, T=T, C=C, k_range=3.0)
    td = rng.uniform(-2, 1, C).astype(np.float32)  # finite differences want moderate decays
    aa = rng.normal(size=(B, C)).astype(np.float32)
    bb = rng.uniform(0.5, 2, (B, C)).astype(np.float32)
    pp = rng.normal(size=(B, C)).astype(np.float32)
    gy = rng.normal(size=(B, T, C)).astype(np.float32)
    return td, tf, k, v, aa, bb, pp, gy


def test_gradients_agree_between_forms_including_the_incoming_state(rng):
    args = [jnp.asarray(a) for a in _grad_inputs(rng, T=23, C=5)]
    argnums = tuple(range(7))
    grads = {impl: jax.jit(jax.grad(_loss(impl), argnums))(*args) for impl in FORMS}
    for impl in ("assoc", "chunked"):
        for g, g_ref in zip(grads[impl], grads["scan"]):
            assert rel_err(g, g_ref) <= 1e-4, impl
    assert np.abs(np.asarray(grads["scan"][4])).sum() > 0  # the incoming state does get gradient


@pytest.mark.parametrize("impl", FORMS)
def test_gradients_match_finite_differences(rng, impl):
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in _grad_inputs(rng)]
        check_grads(_loss(impl), args, order=1, modes=["rev"], atol=1e-4, rtol=1e-4, eps=1e-4)


def test_zero_state_and_errors():
    s = zero_state(2, 3)
    assert s.pp[0, 0] == np.float32(NEG_INF) and float(jnp.abs(s.aa).sum()) == 0.0
    k = jnp.zeros((1, 4, 3))
    with pytest.raises(ValueError, match="impl='nope'"):
        ops.wkv4(jnp.zeros(3), jnp.zeros(3), k, k, impl="nope")
    with pytest.raises(ValueError, match=r"\(3,\)"):
        ops.wkv4(jnp.zeros(4), jnp.zeros(3), k, k)
    with pytest.raises(ValueError, match="chunk_size"):
        ops.wkv4(jnp.zeros(3), jnp.zeros(3), k, k, impl="chunked", chunk_size=0)


def test_chunked_blocks_bound_memory_and_stay_exact(rng):
    """Past block_chunks chunks the chunked form runs block by block (rematerialised)."""
    td, tf, k, v = _inputs(rng, T=50)
    w, u = -np.exp(td), tf
    s0 = zero_state(2, 12)
    blocked = jax.jit(lambda k, v, s: ops._wkv_chunked(w, u, k, v, s, 4, block_chunks=3))
    y, state = blocked(k, v, s0)  # blocks of 12 tokens: 4 whole ones and a remainder of 2
    y_ref, _ = wkv4_reference(td, tf, k, v)
    assert rel_err(y, y_ref) <= 1e-5
    g = jax.jit(jax.grad(lambda k: jnp.sum(blocked(k, v, s0)[0] * v)))(k)
    g_ref = jax.jit(jax.grad(lambda k: jnp.sum(wkv4(td, tf, k, v, impl="scan")[0] * v)))(k)
    assert rel_err(g, g_ref) <= 1e-4
