"""Host cost of one decode call: how the time to dispatch a jitted decode block grows with the
number of arrays it takes (a model's weights are one array per matrix and vector, per layer).

    python bench/dispatch.py            # CPU: seconds; prints a table

Tiny widths, so the device work is negligible and what is timed is the host: a one-step block
queued n times back to back (dispatch only) and then waited for. The generate loop pays it once
per block of decode_block steps (16 by default); the last column is that loop's ms per token.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from bench.decode import greedy_block_inputs, time_bare_blocks  # noqa: E402
from rwkv_jax.config import ModelConfig  # noqa: E402
from rwkv_jax.generate import Generator  # noqa: E402
from rwkv_jax.model import init_params  # noqa: E402


def main(layers=(4, 12, 24, 32), n: int = 200) -> None:
    print("| layers | arrays per call | dispatch us/call | us per array | generate loop ms/token |")
    print("|---|---|---|---|---|")
    for L in layers:
        cfg = ModelConfig(vocab_size=64, n_layer=L, n_embd=32)
        gen = Generator(cfg, init_params(cfg, jax.random.PRNGKey(0)))
        res = gen.generate([1, 2, 3], max_new_tokens=3, keep_state=True)
        block, carry, rest = greedy_block_inputs(gen, res.state, [0], 1)
        dispatch, _, _ = time_bare_blocks(gen, block, carry, rest, n)
        arrays = len(jax.tree.leaves((gen.weights, carry, rest)))
        loop = gen.generate([1, 2, 3], max_new_tokens=100).timings
        print(f"| {L} | {arrays} | {1e6 * dispatch:.0f} | {1e6 * dispatch / arrays:.2f} "
              f"| {1e3 * loop['decode_s'] / loop['steps']:.3f} |")
    print(f"\nDevice: {jax.devices()[0].device_kind}, jax {jax.__version__}")


if __name__ == "__main__":
    main()
