"""RWKV training framework in JAX/Flax."""
