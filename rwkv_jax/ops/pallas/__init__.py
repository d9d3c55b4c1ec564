"""Pallas kernels (Triton on GPU, the Pallas interpreter elsewhere)."""
