"""Hand-written device kernels outside JAX's own (cuda/: the RWKV-4 decode kernel and its nvcc
build)."""
