"""Generate text, score a file, or export the weights, from a training run or an official .pth.

`rwkv-infer` and `python infer.py` run this; for example:
    python infer.py --prompt "ROMEO:" --max_new_tokens 200        # newest checkpoint of runs/tiny
    python infer.py --run_dir runs/tiny --step 1000 --prompt "To be" --prompt "Once" --temperature 0
    python infer.py --official RWKV-4-World-0.1B.pth --prompt "The capital of France is"
    python infer.py --official RWKV-x070-World-0.1B.pth --prompt "Hi"  # RWKV-7 as well
    python infer.py --score val.txt                                # loss, perplexity, bits/byte
    python infer.py --export_official tiny.pth                     # for ChatRWKV / the rwkv package
    python infer.py --hf rwkv7-folder --prompt "Hi"   # a Hugging Face folder (RWKV-4 or fla-hub RWKV-7)
    python infer.py --export_hf tiny-hf               # for transformers (RWKV-4) / fla (RWKV-7)
    python infer.py --run_dir runs/st --export_state st.pth        # a tuned state, as RWKV-PEFT's
    python infer.py --official RWKV-x070-World-0.1B.pth --state st.pth --prompt "Q:"

`\\n` and `\\t` in --prompt and --stop are newline and tab. Bad input (a missing or broken
checkpoint, another architecture, an empty prompt, tokens outside the model's vocabulary) gets
one line on stderr and exit status 2, before anything compiles.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import time

import numpy as np

from rwkv_jax.cli.weights import (
    InputError,
    add_weight_args,
    load_model,
    load_tokenizer,
    one_line,
    start_state,
)
from rwkv_jax.data.hf_tokenizer import write_tokenizer
from rwkv_jax.data.text import DAMAGED_ARCHIVE, open_text_bytes
from rwkv_jax.data.tokens import TokenFile, check_token_ids, prepare_tokens
from rwkv_jax.evaluation.score import bits_per_byte
from rwkv_jax.generate.decode_weights import PALLAS_REMOVED, choose_decode_kernels
from rwkv_jax.generate.generator import Generator
from rwkv_jax.generate.sampling import Sampling
from rwkv_jax.generate.text import check_options, encode_prompt, run_seeds
from rwkv_jax.io.adapter_file import export_adapter
from rwkv_jax.io.checkpoint import find_checkpoint_dir, restore_params, spec_of
from rwkv_jax.io.hf import check_hf_dir, export_hf
from rwkv_jax.io.official import check_export_path, export_official
from rwkv_jax.io.state_file import export_state, state_tree
from rwkv_jax.kernels.cuda import decode4 as cuda_decode4
from rwkv_jax.kernels.cuda.decode4 import Unavailable


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_weight_args(p)
    gen = p.add_argument_group("generation")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    gen.add_argument("--prompt_file", default=None,
                     help="a file whose text is one more prompt (.txt, .txt.xz, .txt.gz)")
    gen.add_argument("--num_samples", "--batch_size", dest="num_samples", type=int, default=1,
                     help="samples drawn for each prompt (--batch_size: its old name)")
    gen.add_argument("--max_new_tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    gen.add_argument("--top_p", type=float, default=0.85)
    gen.add_argument("--top_k", type=int, default=0, help="0: no limit")
    gen.add_argument("--presence_penalty", type=float, default=0.0)
    gen.add_argument("--frequency_penalty", type=float, default=0.0)
    gen.add_argument("--penalty_decay", type=float, default=1.0)
    gen.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    gen.add_argument("--state", default=None, metavar="FILE",
                     help="start generating (and --score) from the initial state in this state "
                          "file (written by --export_state or RWKV-PEFT's state tuning)")
    gen.add_argument("--seed", type=int, default=0, help="sample i of the batch uses seed + i")
    gen.add_argument("--prefill_chunk", type=int, default=1024,
                     help="prompt tokens per parallel prefill call (0: the whole prompt at once)")
    gen.add_argument("--decode_block", type=int, default=16,
                     help="decode steps per device call: text streams out this many tokens at a "
                          "time; larger blocks cost the host less per token")
    gen.add_argument("--decode_kernels", nargs="?", const="pallas", default="auto",
                     choices=("auto", "xla", "pallas", "cuda"),
                     help="RWKV-4: how a decode step runs. 'cuda': each run of blocks as one "
                          "CUDA kernel (rwkv_jax.kernels.cuda.decode4; Hopper GPUs, nvcc, bf16 "
                          "weights, 1-2 rows); 'xla': XLA's products; 'auto' (the default): "
                          "'cuda' where it can run, else 'xla'. 'pallas' (the flag alone) was "
                          "removed. docs/performance.md has the numbers")
    other = p.add_argument_group("scoring and export")
    other.add_argument("--score", default=None, metavar="FILE",
                       help="print loss, perplexity and bits per byte of a whole text file")
    other.add_argument("--chunk_len", type=int, default=None,
                       help="tokens per chunk for --score (default: the run's chunk length, or 256)")
    other.add_argument("--export_official", default=None, metavar="OUT.pth",
                       help="write the weights as an official .pth (RWKV-4 or RWKV-7, as the model is)")
    other.add_argument("--export_hf", default=None, metavar="DIR",
                       help="write the weights as a Hugging Face folder with tokenizer.json (RWKV-4: "
                            "transformers' RwkvForCausalLM; RWKV-7: fla-hub's layout)")
    other.add_argument("--export_dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                       help="the tensors' dtype in the exported .pth or folder (default float32)")
    other.add_argument("--export_adapter", default=None, metavar="OUT.pth",
                       help="write an adapter run's adapters in RWKV-PEFT's naming (LoRA alpha "
                            "recorded; PiSSA's initial factors beside, OUT.pissa_init.pth)")
    other.add_argument("--export_state", default=None, metavar="OUT.pth",
                       help="write the run's learned initial state as a state file (RWKV-7: the "
                            "community's time_state file; docs/inference.md)")
    other.add_argument("--export_state_shift", default=None, choices=("drop", "keep"),
                       help="RWKV-7 learned token-shift states, which the community file cannot "
                            "hold: drop them, or keep them under our own keys (RWKV-Runner then "
                            "refuses the file)")
    # argparse reads "-1e-3" as an option (its pattern for negative numbers knows "-1" and "-.5"
    # only), so a negative penalty in exponent form needed the "=" form.
    p._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    return p


def _unescape(s: str) -> str:
    return s.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t").replace("\0", "\\")


def _score_tokens(path: str, tokenizer, vocab_size: int) -> dict:
    """The file's tokens exactly as the trainer's evaluation reads them, and its byte count."""
    if os.path.isdir(path):
        raise InputError(f"--score {path!r} is a directory; give a text file (or a token .bin)")
    if not os.path.isfile(path):
        raise InputError(f"--score {path!r}: no such file")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tf = TokenFile(path) if path.endswith(".bin") else \
                prepare_tokens(path, tokenizer, os.path.join(tmp, "score.bin"))
            out = {"tokens": np.array(tf.tokens), "num_tokens": tf.num_tokens,
                   "num_bytes": tf.num_bytes, "max_token_id": tf.max_token_id}
            # The ids themselves: a .bin's metadata may not tell (a damaged or hand-made file).
            check_token_ids(tf, vocab_size)
    except (ValueError, OSError) as e:
        raise InputError(f"--score {path!r}: {e}") from None
    if out["num_tokens"] < 2:
        raise InputError(f"--score {path!r} has {out['num_tokens']} token(s); scoring needs at least 2")
    if out["max_token_id"] >= vocab_size:
        raise InputError(f"--score {path!r} holds token id {out['max_token_id']}, outside this "
                         f"model's vocabulary of {vocab_size}")
    return out


# Flags that some jobs only read, and the flags that ask for those jobs.
_JOB_FLAGS = {
    ("--prompt/--prompt_file",): ("num_samples", "max_new_tokens", "temperature", "top_p", "top_k",
                                  "presence_penalty", "frequency_penalty", "penalty_decay",
                                  "stop", "seed", "prefill_chunk", "decode_block",
                                  "decode_kernels"),
    ("--score",): ("chunk_len",),
    ("--prompt/--prompt_file", "--score"): ("bf16", "state"),
    ("--export_official", "--export_hf"): ("export_dtype",),
    ("--export_state",): ("export_state_shift",),
}


def _warn_unused(args, parser: argparse.ArgumentParser) -> None:
    """A flag set for a job this command does not run would otherwise be dropped unseen (a
    --temperature beside --score alone, a --run_dir beside --official)."""
    asked = {"--prompt/--prompt_file": bool(args.prompt or args.prompt_file),
             "--score": bool(args.score), "--export_official": bool(args.export_official),
             "--export_hf": bool(args.export_hf),
             "--export_state": bool(args.export_state),
             "--export_adapter": bool(args.export_adapter)}
    unused = [f"--{name} is ignored: it is read only with {' or '.join(jobs)}"
              for jobs, names in _JOB_FLAGS.items() if not any(asked[j] for j in jobs)
              for name in names if getattr(args, name) != parser.get_default(name)]
    for flag in ("official", "hf"):
        if getattr(args, flag) and args.run_dir != parser.get_default("run_dir"):
            unused.append(f"--run_dir is ignored: --{flag} names the weights")
    for line in unused:
        print(f"infer: {line}", file=sys.stderr)


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.decode_kernels == "pallas":  # the flag alone, or named: before anything else
        print(f"infer: --decode_kernels pallas was removed: {PALLAS_REMOVED}", file=sys.stderr)
        return 2
    _warn_unused(args, parser)
    try:
        return _main(args)
    except InputError as e:
        print(f"infer: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`| head`): stop as quietly as `cat` does
        return 141  # 128 + SIGPIPE, the shell's status for a program a closed pipe ended


def _decode_kernels(args, config, rows: int):
    """The Generator's decode_kernels for --decode_kernels ('auto': the library's choice)."""
    if args.decode_kernels != "auto":
        return None if args.decode_kernels == "xla" else args.decode_kernels
    return choose_decode_kernels(config, args.bf16, rows)


def _main(args) -> int:
    _check_args(args)
    if args.export_adapter:  # the run's adapters alone: the base is not read
        _export_one(args.export_adapter, lambda: _export_adapter(args))
        if not (args.prompt or args.prompt_file or args.score or args.export_official
                or args.export_hf or args.export_state):
            return 0
    config, params, tokenizer_name, chunk_len = load_model(args)
    tokenizer = _tokenizer(args, config, tokenizer_name)
    rows = _prompt_rows(args, tokenizer, config)
    try:
        sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            presence_penalty=args.presence_penalty,
                            frequency_penalty=args.frequency_penalty,
                            penalty_decay=args.penalty_decay)
    except ValueError as e:
        raise InputError(str(e)) from None
    score_file = _score_tokens(args.score, tokenizer, config.vocab_size) if args.score else None
    chunk_len = args.chunk_len or chunk_len

    start = start_state(args, config)
    _export(args, config, params, tokenizer_name)
    if not (rows or score_file):
        return 0
    # Everything is checked; from here on things compile and run.
    generator = _generator(args, config, params, tokenizer, len(rows))
    if rows:
        _generate(args, generator, rows, sampling,
                  None if start is None else state_tree(config, start, len(rows)))
    if score_file is not None:
        out = generator.score(score_file["tokens"], chunk_len,
                              state=None if start is None else state_tree(config, start, 1))
        loss, count = out["loss"], out["tokens"]
        bytes_scored = score_file["num_bytes"] * count / max(score_file["num_tokens"] - 1, 1)
        bpb = bits_per_byte(loss, count, bytes_scored)
        print(f"score {args.score}: loss {loss:.6f} nats/token, perplexity {math.exp(loss):.4f}, "
              f"{bpb:.4f} bits/byte over {count} tokens (chunk_len {chunk_len})")
    return 0


def _export(args, config, params, tokenizer_name) -> None:
    """--export_official, --export_hf and --export_state."""
    for path, write in (
            (args.export_official,
             lambda: export_official(params, config, args.export_official, dtype=args.export_dtype)),
            (args.export_hf,
             lambda: (export_hf(params, config, args.export_hf, dtype=args.export_dtype),
                      write_tokenizer(args.export_hf, tokenizer_name))),
            (args.export_state,
             lambda: export_state(params, config, args.export_state, shift=args.export_state_shift))):
        if path:
            _export_one(path, write)


def _export_one(path: str, write) -> None:
    """write(), its failure one line (InputError), its success a line on stderr."""
    try:
        write()
    except (ValueError, OSError, ImportError) as e:
        hint = " (--export_state_shift drop or keep)" if "shift 'drop'" in str(e) else ""
        raise InputError(f"{one_line(e)}{hint}") from None
    print(f"wrote {path}", file=sys.stderr)


def _export_adapter(args) -> None:
    """The adapters of the run --run_dir names (their checkpoint holds nothing else)."""
    if args.official or args.hf:
        raise ValueError("--export_adapter writes a run's adapters: give its --run_dir")
    config, trainable, meta = restore_params(find_checkpoint_dir(args.run_dir), args.step,
                                             merged=False)
    if "adapters" not in meta:
        raise ValueError(f"{args.run_dir!r} trained no adapters (train.trainable="
                         f"{meta.get('run_shape', {}).get('train.trainable', 'all')!r}); "
                         f"--export_official writes its weights")
    export_adapter(trainable, spec_of(meta["adapters"]), config, args.export_adapter)


def _check_args(args) -> None:
    """What the flags alone say is wrong, before any weights are read."""
    if not (args.prompt or args.prompt_file or args.score or args.export_official
            or args.export_hf or args.export_state or args.export_adapter):
        raise InputError("nothing to do: give --prompt/--prompt_file, --score, --export_official, "
                         "--export_hf, --export_adapter or --export_state")
    for name in ("max_new_tokens", "num_samples", "chunk_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name}={value}: must be >= 1")
    try:  # what Generator and generate() would refuse after the model is loaded (and exported)
        check_options(args.prefill_chunk, args.decode_block)
        run_seeds(args.max_new_tokens, args.seed, (len(args.prompt) + bool(args.prompt_file))
                  * args.num_samples)
    except ValueError as e:
        raise InputError(f"--{e}") from None
    for flag, path in (("--export_official", args.export_official),
                       ("--export_adapter", args.export_adapter),
                       ("--export_state", args.export_state)):
        try:
            if path:
                check_export_path(path)
        except (ValueError, ImportError) as e:
            raise InputError(f"{flag}: {e}") from None
    if args.export_hf:
        try:
            check_hf_dir(args.export_hf)
        except ValueError as e:
            raise InputError(f"--export_hf: {e}") from None
    if args.decode_kernels == "cuda":  # before the checkpoint is read
        try:
            cuda_decode4.check_device()
        except cuda_decode4.Unavailable as e:
            raise InputError(f"--decode_kernels cuda: {e}") from None


def _tokenizer(args, config, tokenizer_name):
    """The model's tokenizer, and the checks that need the model's config."""
    if args.decode_kernels == "cuda" and config.version != "4":
        raise InputError(f"--decode_kernels: the decode kernels run RWKV-4 blocks; this model "
                         f"is RWKV-{config.version} (leave the flag out)")
    if args.decode_kernels == "cuda" and not args.bf16 and config.dtype != "bfloat16":
        raise InputError(f"--decode_kernels cuda: the kernel reads bf16 weights and this model "
                         f"computes in {config.dtype}; add --bf16")
    return load_tokenizer(args, config, tokenizer_name)


def _prompt_rows(args, tokenizer, config) -> list[list[int]]:
    """Each sample's prompt tokens (--prompt and --prompt_file, --num_samples of each)."""
    prompts = [_unescape(p) for p in args.prompt]
    names = [f"--prompt {i + 1} of {len(prompts)}" if len(prompts) > 1 else "--prompt"
             for i in range(len(prompts))]
    if args.prompt_file:
        try:
            with open_text_bytes(args.prompt_file) as f:  # .txt, .txt.xz, .txt.gz
                prompts.append(f.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, *DAMAGED_ARCHIVE) as e:
            raise InputError(f"--prompt_file {args.prompt_file!r}: {e}") from None
        names.append(f"--prompt_file {args.prompt_file!r}")
    rows = []
    for name, p in zip(names, prompts):
        try:
            rows += [encode_prompt(tokenizer, p, config.vocab_size)] * args.num_samples
        except ValueError as e:  # UnicodeEncodeError too (undecodable bytes in the argument)
            raise InputError(f"{name}: {e}") from None
    return rows


def _generator(args, config, params, tokenizer, rows: int) -> Generator:
    kernels = _decode_kernels(args, config, rows)
    try:
        return Generator(config, params, tokenizer, prefill_chunk=args.prefill_chunk,
                         bf16=args.bf16, decode_block=args.decode_block, decode_kernels=kernels)
    except Unavailable as e:  # the CUDA kernel's build, or a block it cannot take
        if args.decode_kernels == "cuda":
            raise InputError(f"--decode_kernels cuda: {e}") from None
        print(f"decoding with XLA's products: {e}", file=sys.stderr)
        return Generator(config, params, tokenizer, prefill_chunk=args.prefill_chunk,
                         bf16=args.bf16, decode_block=args.decode_block)


def _generate(args, generator: Generator, rows, sampling, state=None) -> None:
    """Generates and prints: one sample as it comes, several each under a header."""
    stops = [_unescape(s) for s in args.stop]
    t = time.perf_counter()
    if len(rows) == 1:
        result = generator.generate(rows, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                    seed=args.seed, stop=stops, state=state,
                                    callback=lambda _, piece: print(piece, end="", flush=True))
        print()
    else:
        result = generator.generate(rows, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                    seed=args.seed, stop=stops, state=state)
        for i, text in enumerate(result.texts):
            print(f"--- sample {i} (prompt {i // args.num_samples}, seed {args.seed + i}) ---")
            print(text)
    tm = result.timings
    steps = max(tm["steps"], 1)
    print(f"[{tm['new_tokens']} tokens in {time.perf_counter() - t:.2f} s; prefill "
          f"{1e3 * tm['prefill_s']:.1f} ms, decode {1e3 * tm['decode_s'] / steps:.2f} "
          f"ms/step, both with their compiles: bench/decode.py times decoding alone]",
          file=sys.stderr)


def run() -> None:
    """The `rwkv-infer` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
