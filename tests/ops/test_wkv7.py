"""The RWKV-7 WKV forms against a float64 reference, against each other, and their gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from rwkv_jax.ops import wkv7 as ops
from rwkv_jax.ops.pallas import wkv7 as pk

# Jitted: one compile per shape instead of op-by-op dispatch of every step (as test_wkv4.py).
wkv7 = jax.jit(ops.wkv7, static_argnames=("impl", "chunk_size"))


def wkv7_reference(r, w, k, v, a, b, state):
    """Straight from the definition, float64, token by token."""
    r, w, k, v, a, b = (np.asarray(x, np.float64) for x in (r, w, k, v, a, b))
    S = np.array(state, np.float64)
    y = np.zeros(r.shape)
    for t in range(r.shape[1]):
        sa = np.einsum("bhij,bhj->bhi", S, a[:, t])
        S = (S * np.exp(w[:, t])[:, :, None, :] + sa[..., None] * b[:, t][:, :, None, :]
             + v[:, t][..., None] * k[:, t][:, :, None, :])
        y[:, t] = np.einsum("bhij,bhj->bhi", S, r[:, t])
    return y, S


def wkv7_inputs(rng, B=2, T=37, H=2, N=16):
    """As an RWKV-7 layer makes them: log decay in (-0.61, 0), a = -kk, b = kk * iclr, with
    some decays at both ends of the range and a repeated key (the delta rule's hard case)."""
    shp = (B, T, H, N)
    r, k, v = (rng.normal(size=shp) for _ in range(3))
    w = -0.6065 / (1 + np.exp(-3 * rng.normal(size=shp)))
    w[:, :, :, 0], w[:, :, :, 1] = -0.6065, -1e-4
    kk = rng.normal(size=shp)
    kk[:, 5:12] = kk[:, 5:6]  # the same key seven times running
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    iclr = 1 / (1 + np.exp(-rng.normal(size=shp)))
    iclr[:, 5:12] = 1.0
    state = rng.normal(size=(B, H, N, N))
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    return tuple(f32(x) for x in (r, w, k, v, -kk, kk * iclr)), f32(state)


@pytest.fixture
def data(rng):
    return wkv7_inputs(rng)


@pytest.mark.parametrize("impl,chunk", [("scan", 64), ("chunked", 16), ("chunked", 5),
                                        ("pallas", 16)])
def test_forms_match_float64_reference(data, impl, chunk):
    xs, s0 = data
    y_ref, s_ref = wkv7_reference(*xs, s0)
    y, s = wkv7(*map(jnp.asarray, xs), jnp.asarray(s0), impl=impl, chunk_size=chunk)
    assert y.dtype == jnp.float32 and y.shape == xs[0].shape
    assert rel_err(y, y_ref) < 2e-6
    assert rel_err(s, s_ref) < 2e-6


@pytest.mark.parametrize("impl", ["scan", "chunked", "pallas"])
def test_pieces_with_state_equal_one_call(data, impl):
    xs, s0 = data
    xs = tuple(map(jnp.asarray, xs))
    y_all, s_all = wkv7(*xs, jnp.asarray(s0), impl=impl, chunk_size=16)
    s, ys = jnp.asarray(s0), []
    for lo, hi in ((0, 13), (13, 14), (14, 37)):
        y, s = wkv7(*(x[:, lo:hi] for x in xs), s, impl=impl, chunk_size=16)
        ys.append(y)
    assert rel_err(jnp.concatenate(ys, axis=1), y_all) < 2e-6
    assert rel_err(s, s_all) < 2e-6


def test_zero_state_and_empty_sequence(data):
    xs, _ = data
    xs = tuple(map(jnp.asarray, xs))
    B, _, H, N = xs[0].shape
    y0, s0 = wkv7(*xs, impl="scan")
    y1, s1 = wkv7(*xs, jnp.zeros((B, H, N, N)), impl="chunked")
    assert rel_err(y1, y0) < 2e-6 and rel_err(s1, s0) < 2e-6
    y, s = ops.wkv7(*(x[:, :0] for x in xs), s0)
    assert y.shape == (B, 0, H, N) and s is not None


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_gradients_match_the_scan(data, impl, rng):
    """All six inputs and the incoming state, through y and the outgoing state."""
    xs, s0 = data
    args = tuple(map(jnp.asarray, xs)) + (jnp.asarray(s0),)
    gy = jnp.asarray(rng.normal(size=xs[0].shape), jnp.float32)
    gs = jnp.asarray(rng.normal(size=s0.shape), jnp.float32)

    def loss(impl):
        def f(*a):
            y, s = ops.wkv7(*a[:6], a[6], impl=impl, chunk_size=16)
            return jnp.sum(y * gy) + jnp.sum(s * gs)
        return jax.grad(f, argnums=tuple(range(7)))

    ref = jax.jit(loss("scan"))(*args)
    got = jax.jit(loss(impl))(*args)
    for name, g, g_ref in zip(("r", "w", "k", "v", "a", "b", "state"), got, ref):
        assert rel_err(g, g_ref) < 1e-5, name


def test_remat_policy_keeps_the_pallas_kernels_work(data):
    """nn.model's "dots_and_wkv_saveable": under remat the kernel's outputs and residuals are
    kept (not its forward run again in the backward) and the gradients are unchanged."""
    from jax._src.ad_checkpoint import saved_residuals

    from rwkv_jax.nn.model import remat_policy

    xs, s0 = data
    args = tuple(map(jnp.asarray, xs)) + (jnp.asarray(s0),)

    def f(*a):  # elementwise work around the kernel, as a layer has
        y, s = ops.wkv7(jnp.tanh(a[0]), *a[1:6], a[6], impl="pallas")
        return jnp.sum(jnp.sin(y)) + jnp.sum(s * s)

    kept = jax.checkpoint(f, policy=remat_policy("dots_and_wkv_saveable"))
    saved = [why for _, why in saved_residuals(kept, *args)]
    assert sum("'wkv'" in why for why in saved) >= 5, saved  # y, the state, the kernel's own
    assert not any("pallas_call" in why and "'wkv'" not in why for why in saved), saved
    grad = lambda fn: jax.jit(jax.grad(fn, argnums=tuple(range(7))))(*args)  # noqa: E731
    for g, g_ref in zip(grad(kept), grad(f)):
        assert rel_err(g, g_ref) < 1e-6


def test_pallas_gradients_split_over_key_blocks(rng):
    """The gradient kernel's programs each own a block of key channels; with two blocks (and
    two value blocks in the scans) every gradient still matches the scan's."""
    xs, s0 = wkv7_inputs(rng, B=1, T=21, H=1, N=32)
    args = tuple(map(jnp.asarray, xs)) + (jnp.asarray(s0),)
    gy = jnp.asarray(rng.normal(size=xs[0].shape), jnp.float32)
    cfg = pk.Config(block_k=16, block_v=16)

    def grads(f):  # jitted: one compile instead of op-by-op dispatch
        return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)[0] * gy) + jnp.sum(f(*a)[1]),
                                argnums=tuple(range(7))))(*args)

    ref = grads(lambda *a: ops.wkv7(*a[:6], a[6], impl="scan"))
    got = grads(lambda *a: pk.wkv7(*a[:6], a[6], config=cfg))
    for name, g, g_ref in zip(("r", "w", "k", "v", "a", "b", "state"), got, ref):
        assert rel_err(g, g_ref) < 1e-5, name


def test_pallas_half_precision_inputs(data):
    """bf16 inputs are read as they are; their gradients come back bf16."""
    xs, s0 = data
    args = [jnp.asarray(x, jnp.bfloat16) for x in xs]
    args[1] = jnp.asarray(xs[1])  # the log decay stays float32, as the layer passes it
    y, _ = wkv7(*args, jnp.asarray(s0), impl="pallas")
    y_ref, _ = wkv7(*[a.astype(jnp.float32) for a in args], jnp.asarray(s0), impl="scan")
    # Compiled for a GPU, the kernel multiplies half-precision inputs in TF32 by design (its
    # Config.tf32; 3.6e-4 at a 3B shape, bench/README.md); the CPU interpreter in float32.
    assert rel_err(y, y_ref) < (1e-3 if jax.default_backend() == "gpu" else 1e-5)
    g = jax.jit(jax.grad(lambda r: jnp.sum(ops.wkv7(r, *args[1:], impl="pallas")[0])))(args[0])
    assert g.dtype == jnp.bfloat16


def test_pallas_block_inverse_is_exact():
    """The in-kernel (I - A)^{-1} by block doubling equals a dense solve."""
    rng = np.random.default_rng(1)
    L, N = 16, 16
    r, k, a, b = (jnp.asarray(rng.normal(size=(L, N)), jnp.float32) for _ in range(4))
    w = jnp.asarray(-0.6 * rng.uniform(size=(L, N)), jnp.float32)
    q = pk._chunk_setup(r, w, k, a, b, L, pk._dot_fns(None), None)
    inv = np.linalg.inv(np.eye(L) - np.asarray(q["a_ab"], np.float64))
    assert rel_err(q["tinv"], inv) < 1e-6


def test_bad_arguments_are_named():
    x = jnp.zeros((1, 4, 2, 16))
    with pytest.raises(ValueError, match="impl='assoc'"):
        ops.wkv7(x, x, x, x, x, x, impl="assoc")
    with pytest.raises(ValueError, match="one shape"):
        ops.wkv7(x, x, x, x, x, jnp.zeros((1, 4, 2, 8)))
    with pytest.raises(ValueError, match="state must have shape"):
        ops.wkv7(x, x, x, x, x, x, jnp.zeros((1, 2, 16, 8)))
    with pytest.raises(ValueError, match="power of two"):
        pk.wkv7(*(jnp.zeros((1, 4, 2, 24)),) * 6, jnp.zeros((1, 2, 24, 24)))
