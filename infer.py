"""Generate text, score a file, or export weights: `python infer.py --help` (also `rwkv-infer`).

The command line lives in rwkv_jax/cli/infer.py; this file keeps `python infer.py` working
from a clone.
"""

import sys

from rwkv_jax.cli.infer import main

if __name__ == "__main__":
    sys.exit(main())
