"""What the checkpoint checksums cost: rwkv_jax.io.integrity.tree_checksums over float32 arrays
of the 3B model's matrix shapes, on the default device, against hashing a host copy of the
same bytes (sha256, zlib's crc32), the alternative that needs the arrays on one host.

    python bench/checksums.py [--gib 1.0]

A save checksums the parameters and the optimizer state (AdamW: mu and nu), 12 bytes per
parameter in float32: 36 GB for 3B parameters; a restore checksums them again.
"""

from __future__ import annotations

import argparse
import hashlib
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.io import tree_checksums


def _best(fn, repeats=3) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, default=1.0, help="bytes to checksum per timing")
    a = p.parse_args()
    shape = (2560, 10240)  # the 3B model's FFN matrix
    n = max(1, round(a.gib * 2**30 / (4 * shape[0] * shape[1])))
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    tree = {f"w{i}": jax.random.normal(k, shape, jnp.float32) for i, k in enumerate(keys)}
    jax.block_until_ready(tree)
    nbytes = n * 4 * shape[0] * shape[1]
    device = _best(lambda: tree_checksums(tree))
    host = [np.asarray(x) for x in tree.values()]
    sha = _best(lambda: [hashlib.sha256(x.data).digest() for x in host])
    crc = _best(lambda: [zlib.crc32(x.data) for x in host])
    size_3b = 3e9 * 12
    print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {nbytes / 1e9:.2f} GB "
          f"in {n} arrays of {shape}")
    for name, t in (("tree_checksums on the device", device), ("sha256 of a host copy", sha),
                    ("zlib.crc32 of a host copy", crc)):
        print(f"  {name:30s} {nbytes / t / 1e9:8.2f} GB/s -> a 3B save (36 GB): "
              f"{size_3b / (nbytes / t):7.2f} s")


if __name__ == "__main__":
    main()
