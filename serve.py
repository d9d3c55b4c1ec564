"""Serve a model over OpenAI's HTTP API: `python serve.py --help` (also `rwkv-serve`).

The command line lives in rwkv_jax/cli/serve.py; this file keeps `python serve.py` working
from a clone.
"""

import sys

from rwkv_jax.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
