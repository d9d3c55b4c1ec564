"""The Pallas WKV kernels (interpreted on CPU) against the float64 reference and impl="scan".

Tiles are shrunk so that the small shapes here still have several chunks, several sub-blocks,
channel tails and a partial last chunk: B2 T37 C20 with chunks of 8 tokens and 16 channels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err, wkv4_reference, wkv_inputs

from rwkv_jax.ops import wkv4 as ops
from rwkv_jax.ops.pallas import wkv4 as pk

SMALL = pk.Config(chunk=8, unroll=4, sub=4, group=2, block_c_summary=16, block_c_scan=8,
                  block_c_fwd=16, block_c_bwd1=16, block_c_bwd=8)
wkv4 = jax.jit(ops.wkv4, static_argnames=("impl", "chunk_size"))


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(pk, "DEFAULT_CONFIG", SMALL)


def _inputs(rng, B=2, T=37, C=20, k_range=30.0):
    return wkv_inputs(rng, B, T, C, k_range)


def _state(rng, B=2, C=20):
    aa = rng.normal(size=(B, C)).astype(np.float32)
    bb = rng.uniform(0.5, 2, (B, C)).astype(np.float32)
    pp = rng.uniform(-20, 20, (B, C)).astype(np.float32)
    return aa, bb, pp


def test_auto_is_not_pallas_off_gpu():
    assert jax.default_backend() == "gpu" or ops.default_impl(100) != "pallas"
    assert ops._pallas_wkv4() is pk.wkv4


def test_matches_float64_reference_with_and_without_incoming_state(rng):
    td, tf, k, v = _inputs(rng)
    for s0 in (None, _state(rng)):
        y, (aa, bb, pp) = wkv4(td, tf, k, v, s0, impl="pallas")
        y_ref, (num, den, lp) = wkv4_reference(td, tf, k, v, s0)
        assert y.dtype == jnp.float32 and y.shape == k.shape
        assert rel_err(y, y_ref) <= 1e-5
        aa, bb, pp = (np.asarray(s, np.float64) for s in (aa, bb, pp))
        np.testing.assert_allclose(np.log(bb) + pp, np.log(den) + lp, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(aa / bb, num / den, rtol=1e-4, atol=1e-5)


def test_pieces_with_state_equal_one_call(rng):
    td, tf, k, v = _inputs(rng, T=50)
    y_full, s_full = wkv4(td, tf, k, v, impl="pallas")
    ys, state = [], None
    for a, b in [(0, 13), (13, 14), (14, 27), (27, 50)]:  # uneven pieces, a one-token piece
        y, state = wkv4(td, tf, k[:, a:b], v[:, a:b], state, impl="pallas")
        ys.append(y)
    assert rel_err(np.concatenate(ys, axis=1), y_full) <= 1e-5
    for got, want in zip(state, s_full):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _loss(impl):
    """tests/ops/test_wkv4.py's loss: outputs and the state's meaning, so pp cancels."""

    def f(td, tf, k, v, aa, bb, pp, gy):
        y, (a2, b2, p2) = ops.wkv4(td, tf, k, v, (aa, bb, pp), impl=impl, chunk_size=4)
        return jnp.sum(y * gy) + jnp.sum(jnp.log(b2) + p2) + jnp.sum(a2 / b2)

    return f


@pytest.mark.parametrize("extreme", [False, True])
def test_gradients_equal_scan_including_the_incoming_state(rng, monkeypatch, extreme):
    # The extreme case also runs B3 with its next sub-block prefetched.
    monkeypatch.setattr(pk, "DEFAULT_CONFIG", dataclasses.replace(SMALL, prefetch_bwd=extreme))
    B, T, C = 2, 37, 20
    td, tf, k, v = _inputs(rng, B, T, C, k_range=30.0 if extreme else 3.0)
    if not extreme:
        td = rng.uniform(-2, 1, C).astype(np.float32)
    aa, bb, pp = _state(rng, B, C)
    gy = rng.normal(size=(B, T, C)).astype(np.float32)
    args = [jnp.asarray(a) for a in (td, tf, k, v, aa, bb, pp, gy)]
    argnums = tuple(range(7))
    got = jax.jit(jax.grad(_loss("pallas"), argnums))(*args)
    want = jax.jit(jax.grad(_loss("scan"), argnums))(*args)
    for name, g, g_ref in zip(["td", "tf", "k", "v", "aa", "bb", "pp"], got, want):
        assert np.isfinite(np.asarray(g)).all(), name
        assert rel_err(g, g_ref) <= 1e-4, name
    assert np.abs(np.asarray(want[6])).sum() > 0  # the incoming pp does get gradient


def test_bf16_inputs_are_read_as_bf16_and_computed_in_float32(rng):
    td, tf, k, v = _inputs(rng, k_range=5.0)
    kb, vb = jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16)
    y, state = wkv4(td, tf, kb, vb, impl="pallas")
    assert y.dtype == jnp.float32 and all(s.dtype == jnp.float32 for s in state)
    y_ref, _ = wkv4_reference(td, tf, np.asarray(kb, np.float32), np.asarray(vb, np.float32))
    assert rel_err(y, y_ref) <= 1e-5

    def loss(k, v, impl):
        y, _ = ops.wkv4(td, tf, k, v, impl=impl)
        return jnp.sum(y * y_ref)

    dk, dv = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(kb, vb, "pallas")
    assert dk.dtype == jnp.bfloat16 and dv.dtype == jnp.bfloat16
    dk32, dv32 = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(kb, vb, "scan")
    assert rel_err(dk, dk32) <= 1e-2 and rel_err(dv, dv32) <= 1e-2  # bf16 rounding of the result


def test_long_sequence_with_extreme_decays_stays_finite(rng):
    td, tf, k, v = _inputs(rng, B=1, T=300, C=8)
    y, state = wkv4(td, tf, k, v, impl="pallas")
    assert rel_err(y, wkv4_reference(td, tf, k, v)[0]) <= 1e-5
    assert all(np.isfinite(np.asarray(s)).all() for s in state)


def test_config_is_checked():
    with pytest.raises(ValueError, match="power of two"):
        pk.Config(chunk=12).check()
    with pytest.raises(ValueError, match="divide"):
        pk.Config(chunk=8, unroll=16, sub=4).check()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_to_valid_triton_ir(triton_modules, dtype):
    """Lower forward and backward for CUDA and verify every Triton module (conftest)."""
    verified = triton_modules
    B, T, C = 2, 200, 96

    def grads(td, tf, k, v, gy):
        def loss(td, tf, k, v):
            y, (a2, b2, _) = pk.wkv4(-jnp.exp(td), tf, k, v, ops.zero_state(B, C),
                                     config=pk.Config(), interpret=False)
            return jnp.sum(y * gy) + jnp.sum(a2 / b2)

        return jax.grad(loss, (0, 1, 2, 3))(td, tf, k, v)

    vec = jax.ShapeDtypeStruct((C,), jnp.float32)
    seq = jax.ShapeDtypeStruct((B, T, C), dtype)
    try:
        gy = jax.ShapeDtypeStruct((B, T, C), jnp.float32)
        jax.jit(grads).trace(vec, vec, seq, seq, gy).lower(lowering_platforms=("cuda",))
    except (TypeError, AttributeError) as e:  # an older or newer tracing API
        pytest.skip(f"cannot lower for cuda here: {e}")
    assert len(verified) == 6, verified

