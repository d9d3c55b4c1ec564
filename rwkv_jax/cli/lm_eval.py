"""`rwkv-lm-eval`: lm-evaluation-harness's own command line, with our model registered as
"rwkv_jax" (lm-eval 0.4 finds models only in its registry). Every lm-eval flag works as usual;
--model_args names the weights as infer.py's flags do:

    rwkv-lm-eval --model rwkv_jax --model_args official=RWKV-4-World-0.1B.pth \\
        --tasks lambada_openai,piqa --batch_size 32
    rwkv-lm-eval --model rwkv_jax --model_args run_dir=runs/tiny,step=1000,bf16=true --tasks ...
    rwkv-lm-eval --model rwkv_jax --model_args hf=rwkv-hf-folder --tasks ...

model_args: run_dir, step, official, hf, tokenizer, bf16 (as infer.py's flags), prefill_chunk,
reuse_context (default true), rolling_chunk, prefix_token (rwkv_jax.harness.RwkvLM).
Bad weights or arguments: one line on stderr, exit status 2.
"""

from __future__ import annotations

import sys

from rwkv_jax.cli import infer
from rwkv_jax.generate import Generator

try:  # the eval extra: without it this command is one line, not a traceback
    from lm_eval.api.registry import register_model

    from rwkv_jax.harness import RwkvLM
except ModuleNotFoundError as e:
    if (e.name or "").split(".")[0] != "lm_eval":
        raise
    print('rwkv-lm-eval needs lm-eval: pip install -e ".[eval]"', file=sys.stderr)
    sys.exit(2)

_WEIGHTS = ("run_dir", "step", "official", "hf", "tokenizer", "bf16")
_OPTIONS = ("prefill_chunk", "reuse_context", "rolling_chunk", "prefix_token")
_AUTO_BATCH = 64  # --batch_size auto: rows per call that a CPU or one GPU runs well


@register_model("rwkv_jax")
class RegisteredRwkvLM(RwkvLM):
    """RwkvLM built from --model_args (and lm-eval's --batch_size)."""

    def __init__(self, batch_size=1, max_batch_size=None, device=None, **model_args):
        unknown = sorted(set(model_args) - set(_WEIGHTS) - set(_OPTIONS))
        if unknown:
            raise infer.InputError(f"--model_args {', '.join(unknown)}: unknown; rwkv_jax takes "
                                   f"{', '.join(_WEIGHTS + _OPTIONS)}")
        batch = _AUTO_BATCH if str(batch_size).startswith("auto") else batch_size
        try:
            batch = int(batch)
        except ValueError:
            raise infer.InputError(f"--batch_size {batch_size!r}: an integer or auto") from None
        args = infer._parser().parse_args([])
        for name in _WEIGHTS:
            if name in model_args:
                setattr(args, name, model_args[name] if name != "bf16" else _flag(model_args[name]))
        for name in ("official", "hf", "tokenizer", "run_dir"):
            value = getattr(args, name)
            setattr(args, name, None if value is None else str(value))
        config, params, tokenizer_name, _ = infer.load_model(args)
        tokenizer = infer._tokenizer(args, config, tokenizer_name)
        try:
            generator = Generator(config, params, tokenizer, bf16=args.bf16,
                                  prefill_chunk=int(model_args.get("prefill_chunk", 1024)))
            super().__init__(generator, batch_size=batch,
                             reuse_context=_flag(model_args.get("reuse_context", True)),
                             rolling_chunk=int(model_args.get("rolling_chunk", 1024)),
                             prefix_token=int(model_args.get("prefix_token", 0)))
        except ValueError as e:
            raise infer.InputError(f"--model_args: {e}") from None


def _flag(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes"):
        return True
    if str(value).lower() in ("0", "false", "no"):
        return False
    raise infer.InputError(f"--model_args: {value!r} is not a boolean (true or false)")


def main(argv=None) -> int:
    from lm_eval.__main__ import cli_evaluate  # lm-eval's command line reads sys.argv

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except infer.InputError as e:
        print(f"rwkv-lm-eval: {e}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """The `rwkv-lm-eval` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
