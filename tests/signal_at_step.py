"""train.py's command line, with a signal sent to this process right after a given step:

    python tests/signal_at_step.py STEP KILL|INT [train.py's flags ...]

The tests' faults come from outside the library: this wraps rwkv_jax.train.loop.train (which the command line calls) with an on_step
hook. Before SIGKILL it waits for the checkpoints being written, so that what survives the
kill is decided by the step, not by the timing of the writes.
"""

import os
import signal
import sys

from rwkv_jax.cli import train as cli
from rwkv_jax.train import loop


def _signal_at(step: int, name: str):
    def hook(done: int, wait_for_checkpoints) -> None:
        if done == step:
            if name == "KILL":
                wait_for_checkpoints()
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
    return hook


if __name__ == "__main__":
    # A shell starts background jobs with SIGINT ignored, and Python then keeps it ignored:
    # Ctrl-C's KeyboardInterrupt is what the INT case tests, however the suite was started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    at, name = int(sys.argv.pop(1)), sys.argv.pop(1)
    train = loop.train
    loop.train = lambda run: train(run, on_step=_signal_at(at, name))
    cli.run()
