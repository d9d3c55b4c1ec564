"""The weights a command line serves or generates from: a training run (--run_dir/--step; an
adapter run's merged into its base), an official .pth (--official) or a Hugging Face folder
(--hf), either with an --adapter file merged in, its tokenizer (--tokenizer) and a state file (--state), read and
checked with one line per problem (InputError) before anything compiles. Shared by rwkv-infer
and rwkv-serve.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

from rwkv_jax.data.tokenizers import get_tokenizer
from rwkv_jax.io.adapter_file import read_adapter
from rwkv_jax.io.checkpoint import (
    TrainCheckpointer,
    find_checkpoint_dir,
    restore_params,
)
from rwkv_jax.io.hf import MODEL_TYPES, hf_model_type, import_hf
from rwkv_jax.io.integrity import DamagedCheckpointError
from rwkv_jax.io.official import import_official
from rwkv_jax.io.state_file import load_state
from rwkv_jax.nn import adapters


class InputError(Exception):
    """Bad input: reported in one line, exit status 2."""



def _run_dir_of(checkpoint_dir: str) -> str:
    return os.path.dirname(checkpoint_dir) if os.path.basename(checkpoint_dir) == "checkpoints" \
        else checkpoint_dir


def _run_config(run_dir: str) -> dict:
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def one_line(e: Exception) -> str:
    lines = str(e).strip().splitlines() or [e.__class__.__name__]
    return lines[0][:400] + (" ..." if len(lines) > 1 or len(lines[0]) > 400 else "")


def _quiet_failed_restore() -> None:
    """A failed orbax restore leaves reads in flight whose errors Python would print later
    (thousands of lines) through asyncio's logger, the unraisable hook and warnings; the one
    line this program prints says it all."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda _: None
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited")


def load_model(args):
    """(model_config, params, tokenizer name or None, default chunk length) of the weights asked
    for."""

    if args.hf:
        return _load_hf(args)
    if args.adapter and not args.official:
        raise InputError("--adapter merges into an --official .pth or a --hf folder (a run's own "
                         "adapters come with its --run_dir)")
    if args.official:
        if args.step is not None:
            raise InputError("--step picks a checkpoint of a training run (--run_dir); "
                             "--official reads one .pth")
        if os.path.isdir(args.official):
            raise InputError(f"--official {args.official!r} is a directory; it takes an official "
                             f"RWKV .pth file (a training run's directory goes to --run_dir)")
        try:
            config, params = import_official(args.official)
        except (ValueError, FileNotFoundError, ImportError) as e:
            raise InputError(one_line(e)) from None
        if args.adapter:
            params = _with_adapter(args, config, params)
        # None: a vocabulary no tokenizer here is known for (_main says so, after the checks
        # that need no tokenizer).
        return config, params, args.tokenizer or _OFFICIAL_TOKENIZERS.get(config.vocab_size), 256
    run_dir, step = args.run_dir, args.step
    if hf_model_type(run_dir) in MODEL_TYPES:
        raise InputError(f"--run_dir {run_dir!r} is a Hugging Face folder, not a run: read it "
                         "with --hf")
    parent, name = os.path.split(os.path.abspath(run_dir))
    if name.isdigit() and os.path.basename(parent) == "checkpoints":  # one step's directory
        if step is not None and step != int(name):
            raise InputError(f"--run_dir {run_dir!r} is the checkpoint of step {name}, but "
                             f"--step {step}")
        run_dir, step = parent, int(name)
    try:
        directory = find_checkpoint_dir(run_dir)
        config, params, meta = restore_params(directory, step, base=args.base)
    except DamagedCheckpointError as e:
        _quiet_failed_restore()
        others = _other_steps(directory, step)
        raise InputError(f"{e}" + (f" (other steps there: {others}; pick one with --step)"
                                   if others else "")) from None
    except (ValueError, FileNotFoundError) as e:
        _quiet_failed_restore()
        raise InputError(one_line(e)) from None
    except Exception as e:  # noqa: BLE001 - orbax reports damaged files in many ways
        _quiet_failed_restore()
        others = _other_steps(directory, step)
        raise InputError(f"cannot read the checkpoint in {run_dir!r}: "
                         f"{e.__class__.__name__}: {one_line(e)}"
                         + (f" (other steps there: {others}; pick one with --step)" if others
                            else "")) from None
    run_cfg = _run_config(_run_dir_of(directory))
    tokenizer = args.tokenizer or meta.get("tokenizer", "byte")
    if tokenizer.startswith("hf:"):  # a name, not a path: the run's config holds the path
        tokenizer = run_cfg.get("data", {}).get("tokenizer", tokenizer)
    mem = run_cfg.get("memory", {})
    chunk = meta.get("chunk_len") or (mem.get("rwkv_chunk_size") if mem.get("use_rwkv_chunking", True)
                                      else run_cfg.get("train", {}).get("max_seq_length"))
    return config, params, tokenizer, int(chunk or 256)


def _load_hf(args):
    """load_model for --hf: the folder's tokenizer.json, else the tokenizer its vocabulary
    says (as for --official)."""
    if args.official or args.step is not None:
        raise InputError("--hf names the weights: leave out --official and --step")
    try:
        config, params = import_hf(args.hf)
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        raise InputError(f"--hf: {one_line(e)}") from None
    if args.adapter:
        params = _with_adapter(args, config, params)
    own = os.path.join(args.hf, "tokenizer.json")
    tokenizer = args.tokenizer or (own if os.path.isfile(own) else
                                   _OFFICIAL_TOKENIZERS.get(config.vocab_size))
    return config, params, tokenizer, 256


def _with_adapter(args, config, params) -> dict:
    """--official's weights with --adapter merged in (float32)."""
    try:
        trainable, spec = read_adapter(args.adapter, config, params, alpha=args.adapter_alpha,
                                       pissa_init=args.adapter_init)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise InputError(f"--adapter: {one_line(e)}") from None
    return adapters.merge(params, trainable, spec, original=True)


# The tokenizer of an official .pth by its vocabulary: RWKV World models, and byte-level ones
# (this project's exports of byte models).
_OFFICIAL_TOKENIZERS = {65536: "world", 256: "byte"}


def _other_steps(directory: str, step: int | None) -> list[int]:
    """The steps of a checkpoint directory besides `step` (None: the newest), if it lists them."""

    try:
        steps = sorted(TrainCheckpointer(directory).all_steps())
    except Exception:  # noqa: BLE001 - only a hint in a message
        return []
    step = steps[-1] if step is None and steps else step
    return [s for s in steps if s != step]



def start_state(args, config):
    """--state: the initial state values of the file (rwkv_jax.io.state_file), or None."""
    if not args.state:
        return None
    try:
        return load_state(args.state, config)
    except (ValueError, OSError, ImportError) as e:
        raise InputError(f"--state: {one_line(e)}") from None


def add_weight_args(p: argparse.ArgumentParser) -> None:
    """The flags that name the weights (the "weights" group of --help)."""
    src = p.add_argument_group("weights")
    src.add_argument("--run_dir", default="runs/tiny",
                     help="a training run (or its checkpoints/ directory); default runs/tiny")
    src.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    src.add_argument("--official", default=None,
                     help="an official RWKV-4 or RWKV-7 (x070) .pth instead of a run")
    src.add_argument("--hf", default=None, metavar="DIR",
                     help="a Hugging Face folder instead of a run: transformers' RWKV-4 "
                          "(model_type rwkv) or fla-hub's RWKV-7 (rwkv7)")
    src.add_argument("--adapter", default=None, metavar="FILE",
                     help="with --official or --hf: merge this adapter file into it (--export_adapter's, "
                          "or RWKV-PEFT's LoRA / PiSSA)")
    src.add_argument("--adapter_alpha", type=float, default=None,
                     help="LoRA alpha of an --adapter file that records none (RWKV-PEFT's)")
    src.add_argument("--adapter_init", default=None, metavar="FILE",
                     help="PiSSA's initial factors for --adapter (RWKV-PEFT's init_pissa.pth; "
                          "ours lie beside the adapter file)")
    src.add_argument("--base", default=None, metavar="PATH",
                     help="an adapter run's base where it has moved (default: the path the run "
                          "recorded; the file must be the same)")
    src.add_argument("--tokenizer", default=None,
                     help="byte | world | a tokenizers .json (default: the run's; world for --official; "
                          "a --hf folder's tokenizer.json)")
    src.add_argument("--bf16", action="store_true", help="bfloat16 weights and matrix products")


def load_tokenizer(args, config, tokenizer_name):
    """The model's tokenizer, checked against the model's vocabulary."""
    if tokenizer_name is None:
        source = f"--hf {args.hf!r}" if args.hf else f"--official {args.official!r}"
        raise InputError(f"{source} has a vocabulary of {config.vocab_size}, "
                         f"which is neither the World tokenizer's (65536) nor bytes' (256): name "
                         f"its tokenizer with --tokenizer (a tokenizers .json, such as the 20B "
                         f"tokenizer of the RWKV-4 Pile models)")
    try:
        tokenizer = get_tokenizer(tokenizer_name)
    except (ValueError, ImportError, OSError) as e:
        raise InputError(f"tokenizer {tokenizer_name!r}: {e}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise InputError(f"tokenizer {tokenizer_name!r} has {tokenizer.vocab_size} tokens, more "
                         f"than this model's vocabulary of {config.vocab_size}: the model was "
                         f"made with another tokenizer (name it with --tokenizer)")
    return tokenizer
