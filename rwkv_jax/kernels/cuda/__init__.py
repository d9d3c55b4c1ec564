"""Hand-written CUDA kernels, built with nvcc on first use and called through the XLA FFI."""
