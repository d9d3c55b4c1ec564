"""What every Pallas kernel module here shares: masked loads and stores, compiler params and
the pallas_call wrapper, so that the same kernels run on a GPU (Triton) and in the interpreter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # The Triton-specific API (masked loads, compiler params); its home moved between versions.
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - very old or stripped jax
    plgpu = None


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def index(idx):
    # Static ints become int32 scalars: the interpreter's discharge rules want array indices.
    return tuple(jnp.int32(i) if isinstance(i, int) else i for i in idx)


def load(ref, idx, mask=None, other=0.0):
    """ref[idx], with lanes outside `mask` reading `other` (no mask: a plain, vector load)."""
    idx = index(idx)
    if mask is None:
        return ref[idx]
    if plgpu is not None:
        return plgpu.load(ref.at[idx], mask=mask, other=other)
    return pl.load(ref, idx, mask=mask, other=other)  # pragma: no cover


def store(ref, idx, val, mask=None):
    """ref[idx] = val in ref's dtype, only where `mask` (no mask: everywhere)."""
    val = val.astype(ref.dtype)
    idx = index(idx)
    if mask is None:
        ref[idx] = val
    elif plgpu is not None:
        plgpu.store(ref.at[idx], val, mask=mask)
    else:  # pragma: no cover
        pl.store(ref, idx, val, mask=mask)


def compiler_params(num_warps: int, num_stages: int):
    if plgpu is None:  # pragma: no cover
        return None
    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def call(kernel, out_shape, grid, num_warps, interpret, name, num_stages=1):
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, interpret=interpret, name=name,
        compiler_params=None if interpret else compiler_params(num_warps, num_stages))


def sds(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)
