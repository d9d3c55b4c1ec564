"""Train an RWKV (or hybrid) language model from one config file.

    rwkv-train --config=tiny [--config.train.steps=200 ...]          # a bundled config, by name
    python train.py --config=configs/tiny.py                          # or any config file

Running the same command again resumes from the run's newest checkpoint. On several hosts
every process runs this same command (README: "Several hosts"). `--help` lists every field.
"""

from __future__ import annotations

import ast
import logging
import os
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

from rwkv_jax.config import ConfigError, describe_schema

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT_CONFIG = "tiny"


def bundled_configs() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f[0] != "_")


def resolve_config(value: str) -> str:
    """A config file's path: a file that exists, else a bundled config's name (`tiny`)."""
    # A folder of that name (a run's output, say) does not hide the bundled config.
    if os.path.isfile(value) or os.sep in value or value.endswith(".py"):
        return value
    bundled = os.path.join(CONFIG_DIR, f"{value}.py")
    return bundled if os.path.isfile(bundled) else value


_CONFIG = config_flags.DEFINE_config_file(
    "config", resolve_config(DEFAULT_CONFIG),
    f"A config file, or the name of a bundled one ({', '.join(bundled_configs())}).")

USAGE = """\
usage: rwkv-train [--config=NAME_OR_FILE] [--config.GROUP.FIELD=VALUE ...]

Train (or resume) an RWKV / hybrid language model. --config names a bundled config
({bundled}; default {default}) or a config file (a .py with get_config()).
Any field below can be overridden on the command line, e.g. --config.train.steps=3000.
Running the same command again resumes from the run's newest checkpoint.

Config groups and fields (default, then meaning):
"""


def _help_text() -> str:

    return USAGE.format(bundled=", ".join(bundled_configs()), default=DEFAULT_CONFIG) + \
        describe_schema()


def _with_bundled_names(argv: list[str]) -> list[str]:
    """argv with `--config NAME` / `--config=NAME` of a bundled config turned into its path."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config="):
            arg = "--config=" + resolve_config(arg[len("--config="):])
        elif arg == "--config" and i + 1 < len(argv):
            out.append(arg)
            i += 1
            arg = resolve_config(argv[i])
        out.append(arg)
        i += 1
    return out


def _config_file_frame(e: BaseException, path: str) -> tuple[int, str] | None:
    """(line, text) of the deepest frame of `e` inside the config file, if it came from there."""
    if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == path:
        return e.lineno or 0, (e.text or "").strip()
    hits = [f for f in traceback.extract_tb(e.__traceback__)
            if os.path.abspath(f.filename) == path]
    return (hits[-1].lineno or 0, (hits[-1].line or "").strip()) if hits else None


def _config_path(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return os.path.abspath(arg[len("--config="):].split(":")[0])
        if arg == "--config" and i + 1 < len(argv):
            return os.path.abspath(argv[i + 1].split(":")[0])
    return os.path.abspath(resolve_config(DEFAULT_CONFIG))


def _parse_flags(argv):
    """absl's flag parsing, and the config file loaded with its overrides. A file that is
    missing, does not load or raises, and an override of no field or of the wrong type, are
    one line and exit status 2 (absl printed a traceback, or its usage and exit status 1)."""
    if any(a in ("-h", "--help", "-help", "--helpshort", "--helpfull") for a in argv[1:]):
        print(_help_text())
        sys.exit(0)
    argv = _with_bundled_names(list(argv))
    try:
        rest = flags.FLAGS(argv)
        # A file that failed to load is kept as an error that the first attribute raises.
        _CONFIG.value.experiment_name  # noqa: B018
        return rest
    except Exception as e:  # noqa: BLE001 - every way a config can fail is one line
        print(f"config error: {_describe_config_error(e, _config_path(argv))}", file=sys.stderr)
        sys.exit(2)


def load_config(argv: list[str]):
    """The run config of `argv` (`--config=NAME_OR_FILE --config.GROUP.FIELD=VALUE ...`), as
    train.py reads it: for the other command lines that act on a run's config (rwkv-data show).
    A bad config is one line and exit status 2."""
    saved, sys.argv = sys.argv, ["rwkv", *argv]  # ml_collections reads overrides from sys.argv
    try:
        flags.FLAGS.unparse_flags()
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
            delattr(flags.FLAGS, name)  # an earlier call's overrides, defined per parse
        _parse_flags(sys.argv)
        return _CONFIG.value
    finally:
        sys.argv = saved


def _describe_config_error(e: BaseException, path: str) -> str:
    frame = _config_file_frame(e, path)
    if frame is not None:  # the config file itself raised (at import or in get_config)
        line, text = frame
        where = f"{path}, line {line}" + (f" ({text})" if text else "")
        msg = e.msg if isinstance(e, SyntaxError) else str(e)
        return f"{where}: {type(e).__name__}: {msg}"[:500]
    text = str(e).strip()
    if text[:1] in "'\"":  # ml_collections quotes its message ("'stepz'\nDid you mean ...")
        try:
            text = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            pass
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if any("Failed loading config file" in line for line in lines):
        lines = [f"--config: {lines[-1]}"]  # "[Errno 2] No such file or directory: 'x.py'"
        if "No such file" in lines[0]:
            lines.append(f"(a config file, or a bundled name: {', '.join(bundled_configs())})")
    text = " ".join(lines)
    if isinstance(e, AttributeError) and "Did you mean" in text:
        text = f"no option {text}"
    return f"{type(e).__name__ + ': ' if isinstance(e, SyntaxError) else ''}{text[:500]}"


class _ProgressSafeHandler(logging.Handler):
    """Log lines written above the progress bar (tqdm.write) rather than over it."""

    def emit(self, record):
        try:
            from tqdm import tqdm  # noqa: PLC0415

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging() -> None:
    """Short lines (time and message) from our logger; other libraries' INFO chatter (JAX's
    "Unable to initialize backend 'tpu'", absl's thread ids) stays out."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = _ProgressSafeHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("rwkv_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)


def _crash(who: str, run_dir: str | None) -> int:
    """An unexpected exception: its whole traceback goes to run_dir/crash.log, one line here."""
    text = traceback.format_exc()
    last = text.strip().splitlines()[-1]
    if run_dir:
        path = os.path.join(run_dir, "crash.log")
        try:
            os.makedirs(run_dir, exist_ok=True)
            with open(path, "a") as f:
                f.write(text)
        except OSError:
            pass
        else:
            print(f"{who}failed: {last[:300]} (traceback in {path})", file=sys.stderr)
            return 1
    print(f"{who}failed:\n{text}", file=sys.stderr)
    return 1


def main(argv):
    del argv
    # jax, and all that imports it, after the flags: jax reads XLA_FLAGS at import.
    import jax  # noqa: PLC0415

    from rwkv_jax.io.integrity import CheckpointWriteError  # noqa: PLC0415
    from rwkv_jax.train import distributed  # noqa: PLC0415
    from rwkv_jax.train.loop import train  # noqa: PLC0415
    from rwkv_jax.train.memory import MemoryPlanError  # noqa: PLC0415
    from rwkv_jax.train.run import ResumeError, prepare, run_summary  # noqa: PLC0415
    from rwkv_jax.train.step import TrainingDiverged  # noqa: PLC0415

    setup_logging()
    cfg = _CONFIG.value
    run_dir = os.path.join(str(cfg.output_dir), str(cfg.experiment_name))
    try:
        multi = distributed.initialize(cfg.dist)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    who = f"[process {jax.process_index()}/{jax.process_count()}] " if multi else ""
    if multi and jax.process_index() != 0:
        logging.getLogger("rwkv_jax").setLevel(logging.WARNING)  # one process speaks
    try:
        run = prepare(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"{who}config error: {e}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - a bug: keep its traceback, say where
        return _crash(who, run_dir)
    logging.getLogger("rwkv_jax").info("run %s: %s", run.run_dir, run_summary(run))
    try:
        final = train(run)
    except (MemoryPlanError, ConfigError) as e:
        print(f"{who}config error: {e}", file=sys.stderr)
        return 2
    except ResumeError as e:
        print(f"{who}cannot resume: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{who}interrupted: the same command resumes from the newest checkpoint in "
              f"{run.run_dir}/checkpoints", file=sys.stderr)
        return 130
    except TrainingDiverged as e:
        print(f"{who}training stopped: {e}", file=sys.stderr)
        return 3
    except CheckpointWriteError as e:  # the disk, not the config: 4 tells a job script so
        print(f"{who}checkpoint error: {e}", file=sys.stderr)
        return 4
    except Exception:  # noqa: BLE001 - a bug: keep its traceback, say which process and where
        return _crash(who, run.run_dir)
    logging.getLogger("rwkv_jax").info("done: %s", {k: round(v, 4) for k, v in final.items()})
    return 0


def run() -> None:
    """The `rwkv-train` console script (and `python train.py`)."""
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
