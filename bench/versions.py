"""RWKV-7 against RWKV-4 on the tiny config: the same parameter count, the same training time.

    python bench/versions.py [--budget_s=300] [--config=configs/tiny.py]
    python bench/versions.py --steps=1876     # the same number of steps (tokens) instead

Both versions train through the real trainer (train.py's code) on the config's data. RWKV-7 at
the tiny width has LoRA projections RWKV-4 lacks, so its channel-mix is narrowed
(model.dim_ffn, a multiple of 32) until the two parameter counts agree to within 1%. A short
run of each measures its seconds per step on this machine; each then trains for the number of
steps that fills --budget_s, with its full learning-rate schedule, and is scored on the whole
validation file. With --steps, both train that many steps instead (the same tokens, not the
same time). Prints a markdown table.
"""

import logging
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "The base config.")
_BUDGET = flags.DEFINE_float("budget_s", 300.0, "Training seconds per version.")
_PROBE = flags.DEFINE_integer("probe_steps", 40, "Steps timed to learn each version's pace.")
_VERSIONS = flags.DEFINE_list("versions", ["4", "7"], "Which versions to train.")
_STEPS = flags.DEFINE_integer("steps", 0, "Train both this many steps (0: fill --budget_s).")

STEP_LINE = re.compile(r"^step (\d+): ")


class _StepClock(logging.Handler):
    """The wall time at which the trainer logs each step line."""

    def __init__(self):
        super().__init__()
        self.times = {}

    def emit(self, record):
        m = STEP_LINE.match(record.getMessage())
        if m:
            self.times.setdefault(int(m.group(1)), time.perf_counter())


def _params(cfg):
    from rwkv_jax.config import model_config_from  # noqa: PLC0415
    from rwkv_jax.nn.model import count_params, param_shapes  # noqa: PLC0415

    mc = model_config_from(cfg, vocab_size=256 if cfg.data.tokenizer == "byte" else None)
    return count_params(param_shapes(mc))


def _variant(base, version, out_dir):
    cfg = base.copy_and_resolve_references()
    cfg.model.version = version
    cfg.output_dir = out_dir
    cfg.experiment_name = f"v{version}"
    cfg.checkpoint.every = 0  # the comparison is about training, not disk
    cfg.logging.progress = False
    cfg.logging.tensorboard = False
    return cfg


def _match_params(cfg, target):
    """Narrow RWKV-7's channel-mix to RWKV-4's parameter count."""
    width = cfg.model.dim_ffn or 4 * cfg.model.n_embd
    best = None
    for dim in range(32, width + 1, 32):
        cfg.model.dim_ffn = dim
        gap = abs(_params(cfg) - target)
        if best is None or gap < best[0]:
            best = (gap, dim)
    cfg.model.dim_ffn = best[1]
    return cfg


def _train(cfg, steps, eval_every, eval_tokens):
    from rwkv_jax import train as trainer  # noqa: PLC0415

    cfg.train.steps = steps
    cfg.optimizer.warmup_steps = min(cfg.optimizer.warmup_steps, steps // 10)
    cfg.logging.every = min(cfg.logging.every, steps)
    cfg.logging.eval_every = eval_every
    cfg.logging.eval_tokens = eval_tokens
    clock = _StepClock()
    log = logging.getLogger("rwkv_jax")
    log.addHandler(clock)
    try:
        t0 = time.perf_counter()
        final = trainer.train(trainer.prepare(cfg))
        return final, clock.times, time.perf_counter() - t0
    finally:
        log.removeHandler(clock)


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)
    base = _CONFIG.value
    probe = _PROBE.value
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        v4 = _variant(base, "4", tmp)
        target = _params(v4)
        v7 = _match_params(_variant(base, "7", tmp), target)
        for cfg in (c for c in (v4, v7) if c.model.version in _VERSIONS.value):
            # The pace: steps logged every probe // 2 steps; time between the two lines.
            pace_cfg = cfg.copy_and_resolve_references()
            pace_cfg.experiment_name += "_pace"
            pace_cfg.logging.every = probe // 2
            _, times, _ = _train(pace_cfg, probe, 0, 0)
            s_per_step = (times[probe] - times[probe // 2]) / (probe - probe // 2)
            steps = _STEPS.value or max(probe, int(_BUDGET.value / s_per_step))
            final, _, wall = _train(cfg, steps, steps, 0)
            rows.append((cfg.model.version, _params(cfg), cfg.model.dim_ffn or 4 * cfg.model.n_embd,
                         s_per_step, steps, wall, final["val_loss"], final["val_bpb"]))
    print(f"\nbase config: n_layer={base.model.n_layer}, n_embd={base.model.n_embd}, "
          f"batch {base.train.batch_size} x {base.train.max_seq_length} tokens; "
          + (f"{_STEPS.value} steps per version" if _STEPS.value else
             f"budget {_BUDGET.value:.0f} s of training per version")
          + "; val loss on the whole file")
    print("| version | params | dim_ffn | s/step | steps | wall s (with compile, eval) | "
          "val loss nats/token | bits/byte |")
    print("|---|---|---|---|---|---|---|---|")
    for v, n, ffn, sps, steps, wall, loss, bpb in rows:
        print(f"| {v} | {n:,} | {ffn} | {sps:.3f} | {steps} | {wall:.0f} | {loss:.4f} | {bpb:.4f} |")


if __name__ == "__main__":
    app.run(main)
