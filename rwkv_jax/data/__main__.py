"""`python -m rwkv_jax.data prepare ...`: the `rwkv-data` command line (rwkv_jax/cli/data.py)."""

from rwkv_jax.cli.data import run

if __name__ == "__main__":
    run()
