"""RWKV language models (RWKV-4, RWKV-7, hybrids with attention) in JAX/Flax.

The public API, importable from the package itself (loaded on first use, so `import rwkv_jax`
stays cheap):

    from rwkv_jax import ModelConfig, RWKV, init_params, initial_state, Generator, Sampling
"""

from __future__ import annotations

import importlib

# name -> the module that defines it
_PUBLIC = {
    "ModelConfig": "rwkv_jax.config",
    "default_config": "rwkv_jax.config",
    "RWKV": "rwkv_jax.nn.model",
    "init_params": "rwkv_jax.nn.model",
    "initial_state": "rwkv_jax.nn.model",
    "count_params": "rwkv_jax.nn.model",
    "Generator": "rwkv_jax.generate",
    "Sampling": "rwkv_jax.generate",
    "GREEDY": "rwkv_jax.generate",
    "Session": "rwkv_jax.generate",
    "DecodeWeights": "rwkv_jax.generate.decode_weights",
    "pack_for_decode": "rwkv_jax.generate.decode_weights",
    "decode_forward": "rwkv_jax.generate.decode_weights",
    "get_tokenizer": "rwkv_jax.data",
    "prepare_tokens": "rwkv_jax.data",
    "restore_params": "rwkv_jax.io",
    "import_official": "rwkv_jax.io",
    "export_official": "rwkv_jax.io",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rwkv_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
