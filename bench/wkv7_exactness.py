"""The RWKV-7 Pallas kernel against the float32 scan on the GPU: y, state, all gradients.

    python3 bench/wkv7_exactness.py     (on the GPU machine; float32 inputs, then bf16)

float32 inputs take the kernel's TF32x3 dots (float32 accuracy), bf16 inputs its TF32 dots; the
bf16 rows also carry the rounding of the inputs themselves.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from rwkv_jax.ops import wkv7 as ops  # noqa: E402

rng = np.random.default_rng(0)
B, T, H, N = 2, 300, 4, 64
shp = (B, T, H, N)
r, k, v = (rng.normal(size=shp) * 0.5 for _ in range(3))
w = -0.6065 / (1 + np.exp(-2 * rng.normal(size=shp)))
kk = rng.normal(size=shp); kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
ic = 1 / (1 + np.exp(-rng.normal(size=shp)))
xs = [jnp.asarray(x, jnp.float32) for x in (r, w, k, v, -kk, kk * ic)]
s0 = jnp.asarray(rng.normal(size=(B, H, N, N)), jnp.float32)
rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
with jax.default_matmul_precision("highest"):
    yr, sr = jax.jit(lambda *a: ops.wkv7(*a, impl="scan"))(*xs, s0)
    gr = jax.jit(jax.grad(lambda *a: jnp.sum(ops.wkv7(*a, impl="scan")[0]), argnums=(0, 1, 2, 3, 4, 5, 6)))(*xs, s0)
for name, dt in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
    ins = [x.astype(dt) if i != 1 else x for i, x in enumerate(xs)]
    y, s = jax.jit(lambda *a: ops.wkv7(*a, impl="pallas"))(*ins, s0)
    g = jax.jit(jax.grad(lambda *a: jnp.sum(ops.wkv7(*a, impl="pallas")[0]), argnums=(0, 1, 2, 3, 4, 5, 6)))(*ins, s0)
    print(name, "y", rel(y, yr), "state", rel(s, sr), "grads", max(rel(a.astype(jnp.float32), b) for a, b in zip(g, gr)), flush=True)
print("auto picks", ops.default_impl(300, 64))
