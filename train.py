"""Train an RWKV (or hybrid) language model: `python train.py --help` (also `rwkv-train`).

The command line lives in rwkv_jax/cli/train.py; this file keeps `python train.py
--config=configs/tiny.py` working from a clone.
"""

from rwkv_jax.cli.train import run

if __name__ == "__main__":
    run()
