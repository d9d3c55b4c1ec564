"""Train an RWKV (or hybrid) language model from one config file.

    python train.py --config=configs/tiny.py [--config.train.steps=200 ...]

Running the same command again resumes from the run's newest checkpoint. On several hosts
every process runs this same command (see README: "Several hosts").
"""

import ast
import logging
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "A config file (configs/*.py).")


def _parse_flags(argv):
    """absl's flag parsing, and the config file loaded with its overrides, where a file that
    is missing or broken or an override of no field or of the wrong type is one line and exit
    status 2 (absl printed a traceback, or its usage and exit status 1)."""
    try:
        rest = flags.FLAGS(argv)
        # A file that failed to load is kept as an error that the first attribute raises.
        _CONFIG.value.experiment_name  # noqa: B018
        return rest
    except (flags.Error, OSError, SyntaxError, AttributeError, KeyError, TypeError,
            ValueError) as e:
        text = str(e).strip()
        if text[:1] in "'\"":  # ml_collections quotes its message ("'stepz'\nDid you mean ...")
            try:
                text = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                pass
        lines = [line.strip() for line in str(text).splitlines() if line.strip()]
        if any("Failed loading config file" in line for line in lines):
            lines = [f"--config: {lines[-1]}"]  # "[Errno 2] No such file or directory: 'x.py'"
        text = " ".join(lines)
        if isinstance(e, AttributeError) and "Did you mean" in text:
            text = f"no option {text}"
        print(f"config error: {type(e).__name__ + ': ' if isinstance(e, SyntaxError) else ''}"
              f"{text[:500]}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    del argv
    import jax  # noqa: PLC0415  (after flags: jax reads XLA_FLAGS at import)

    from rwkv_jax import distributed, trainer  # noqa: PLC0415
    from rwkv_jax.checkpoint import CheckpointWriteError  # noqa: PLC0415
    from rwkv_jax.config import ConfigError  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)
    cfg = _CONFIG.value
    try:
        multi = distributed.initialize(cfg.dist)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    who = f"[process {jax.process_index()}/{jax.process_count()}] " if multi else ""
    if multi and jax.process_index() != 0:
        logging.getLogger("rwkv_jax").setLevel(logging.WARNING)  # one process speaks
    try:
        run = trainer.prepare(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"{who}config error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("rwkv_jax").info("run %s: %s", run.run_dir, trainer.run_summary(run))
    try:
        final = trainer.train(run)
    except (trainer.MemoryPlanError, ConfigError) as e:
        print(f"{who}config error: {e}", file=sys.stderr)
        return 2
    except trainer.ResumeError as e:
        print(f"{who}cannot resume: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{who}interrupted: the same command resumes from the newest checkpoint in "
              f"{run.run_dir}/checkpoints", file=sys.stderr)
        return 130
    except trainer.TrainingDiverged as e:
        print(f"{who}training stopped: {e}", file=sys.stderr)
        return 3
    except CheckpointWriteError as e:  # the disk, not the config: 4 tells a job script so
        print(f"{who}checkpoint error: {e}", file=sys.stderr)
        return 4
    except Exception:  # noqa: BLE001 - say which process failed, then fail
        print(f"{who}failed:\n{traceback.format_exc()}", file=sys.stderr)
        return 1
    logging.getLogger("rwkv_jax").info("done: %s", {k: round(v, 4) for k, v in final.items()})
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)
