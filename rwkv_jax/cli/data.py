"""Data preparation from the command line (`rwkv-data SUBCOMMAND`, `python -m rwkv_jax.data`).

    rwkv-data prepare IN.jsonl OUT_PREFIX [--tokenizer world] [--shuffle SEED --repeat N]
                      [--ctx N] [--workers K]
    rwkv-data show --config=NAME_OR_FILE [--config.GROUP.FIELD=VALUE ...] [--steps N] [--decode]

`prepare` turns a jsonl of {"text": ...} lines into RWKV-LM's binidx as RWKV-LM's make_data.py
does: each line stripped, blank lines skipped, the text (unstripped) tokenized, checked to decode
back to itself, and ended with token 0. Without --shuffle the output is make_data.py's byte for
byte with its shuffle left out; --shuffle SEED --repeat N writes N passes, each in the order of
numpy's default_rng([SEED, pass]). The corpus is streamed, never held in memory.

`show` prints what the model sees: each row of the first steps' batches from the trainer's own
batch code (train.run.prepare), as JSON lines.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import re
import sys
from array import array
from collections.abc import Iterator

import numpy as np

from rwkv_jax.config import ConfigError
from rwkv_jax.data.binidx import write_binidx
from rwkv_jax.data.rwkv_lm import magic_prime
from rwkv_jax.data.tokenizers import TOKENIZER_CHOICES, get_tokenizer
from rwkv_jax.train.run import prepare as prepare_run

CHUNK_LINES = 256  # lines per task sent to a worker
_NEWLINE = re.compile(r"\r\n|\r|\n")  # make_data reads in text mode: universal newlines

_worker_tokenizer = None  # each worker process's tokenizer (set by _init_worker)


def _init_worker(spec: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = get_tokenizer(spec)


def _encode_text(text: str, where: str, tokenizer) -> np.ndarray:
    try:
        ids = tokenizer.encode(text)
        same = tokenizer.decode(ids) == text
    except UnicodeError as e:  # a lone surrogate ("\ud800") has no UTF-8
        raise ValueError(f"{where}: its text cannot be encoded as UTF-8 ({e.reason})") from None
    if not same:
        raise ValueError(f"{where}: its text does not decode back to itself after tokenizing "
                         f"(make_data.py stops there too)")
    ids.append(0)  # end of document, as make_data.py writes it
    return np.asarray(ids, dtype=np.int64)


def _encode_chunk(task: tuple[str, list[tuple[int, bytes]]]) -> list[np.ndarray]:
    """The documents of a chunk of raw lines, in order; ValueError naming file:line if bad."""
    path, lines = task
    docs = []
    for lineno, raw in lines:
        where = f"{path}:{lineno}"
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 (byte {e.start} of the line)") from None
        for piece in _NEWLINE.split(decoded):
            line = piece.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg}, column {e.colno}); each line must "
                                 f'be an object with a "text" string') from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{where}: has no "text" string; each line must be an object '
                                 f'with a "text" string')
            docs.append(_encode_text(record["text"], where, _worker_tokenizer))
    return docs


def _lines_in_order(path: str) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        yield from enumerate(f, start=1)


def _line_index(path: str) -> tuple[array, array]:
    """Byte offsets and line numbers of the non-blank lines: 16 bytes a line, not the text."""
    starts, numbers = array("q"), array("q")
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                starts.append(offset)
                numbers.append(lineno)
            offset += len(raw)
    return starts, numbers


def _lines_shuffled(path: str, seed: int, repeat: int) -> Iterator[tuple[int, bytes]]:
    starts, numbers = _line_index(path)
    with open(path, "rb") as f:
        for p in range(repeat):
            for i in np.random.default_rng([seed, p]).permutation(len(starts)):
                f.seek(starts[i])
                yield numbers[i], f.readline()


def _chunks(path: str, lines: Iterator[tuple[int, bytes]]):
    while chunk := list(itertools.islice(lines, CHUNK_LINES)):
        yield path, chunk


def _context():
    # Fork hands the workers the tokenizer the parent already built, but is unsafe in a process
    # that has imported JAX (its threads); the command line never does, a caller may have.
    if "jax" in sys.modules or "fork" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    return multiprocessing.get_context("fork")


def _documents(args, stats: dict) -> Iterator[np.ndarray]:
    if args.shuffle is None:
        lines = itertools.chain.from_iterable(_lines_in_order(args.input) for _ in range(args.repeat))
    else:
        lines = _lines_shuffled(args.input, args.shuffle, args.repeat)
    tasks = _chunks(args.input, lines)
    if args.workers == 1:
        results = map(_encode_chunk, tasks)
        pool = None
    else:
        pool = _context().Pool(args.workers, _init_worker, (args.tokenizer,))
        results = pool.imap(_encode_chunk, tasks)  # imap keeps the input's order
    try:
        for docs in results:
            for doc in docs:
                stats["documents"] += 1
                stats["tokens"] += len(doc)
                yield doc
    finally:
        if pool is not None:
            pool.terminate()


def prepare(args) -> int:
    """`rwkv-data prepare`: a jsonl to an RWKV-LM binidx."""
    if args.repeat < 1 or args.workers < 1 or (args.ctx is not None and args.ctx < 1):
        print("rwkv-data prepare: --repeat, --workers and --ctx must be positive", file=sys.stderr)
        return 2
    try:
        _init_worker(args.tokenizer)
        tokenizer = _worker_tokenizer
        dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
        stats = {"documents": 0, "tokens": 0}
        write_binidx(args.out_prefix, _documents(args, stats), dtype=dtype)
    except (ValueError, OSError) as e:
        print(f"rwkv-data prepare: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {args.out_prefix}.bin and .idx: {stats['documents']} documents, "
          f"{stats['tokens']} {np.dtype(dtype).name} tokens")
    if args.ctx is not None:
        try:
            print(f"data.magic_prime = {magic_prime(stats['tokens'], args.ctx)} (for ctx {args.ctx})")
        except ValueError as e:
            print(f"No magic prime: {e}")
    return 0


def show(args) -> int:
    """Each row of the first steps' batches as one JSON line, from the trainer's own batch code
    (train.run.prepare and its Batches): what the model sees."""
    from rwkv_jax.cli.train import load_config  # noqa: PLC0415  (defines train.py's flags)

    cfg = load_config(args.config_args)
    try:
        run = prepare_run(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"rwkv-data show: config error: {e}", file=sys.stderr)
        return 2
    B = cfg.train.batch_size
    for step in range(args.steps):
        x, y, mask = run.batches(step)
        for row in range(B):
            tokens = [int(t) for t in x[row]] + [int(y[row, -1])]
            line = {"step": step, "row": row, "tokens": tokens}
            if mask is not None:
                line["loss_mask"] = [int(m) for m in mask[row]]
            if args.decode:
                line["text"] = _decode(run.tokenizer, tokens)
            print(json.dumps(line, ensure_ascii=False))
    return 0


def _decode(tokenizer, tokens: list[int]) -> str:
    """A row's text, token 0 (end of document, which has no text) shown as <|0|>."""
    parts, part = [], []
    for t in tokens:
        if t == 0:
            parts.append(part)
            part = []
        else:
            part.append(t)
    return "<|0|>".join(tokenizer.decode(p) for p in parts + [part])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwkv-data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="a jsonl of {\"text\": ...} lines to an RWKV-LM binidx")
    p.add_argument("input", metavar="IN.jsonl")
    p.add_argument("out_prefix", metavar="OUT_PREFIX", help="writes OUT_PREFIX.bin and OUT_PREFIX.idx")
    p.add_argument("--tokenizer", default="world", help=f"{TOKENIZER_CHOICES} (default world)")
    p.add_argument("--shuffle", type=int, metavar="SEED", help="shuffle each pass's lines")
    p.add_argument("--repeat", type=int, default=1, metavar="N", help="passes over the data")
    p.add_argument("--ctx", type=int, metavar="N", help="print the magic prime for this ctx")
    p.add_argument("--workers", type=int, default=1, metavar="K", help="tokenizing processes")
    p.set_defaults(func=prepare)
    p = commands.add_parser("show", help="the first steps' batches as the trainer builds them",
                            description="Each row of the first --steps batches, one JSON line: "
                            "{step, row, tokens[, loss_mask][, text]}; config flags as train.py's.")
    p.add_argument("--steps", type=int, default=1, metavar="N", help="steps to show (default 1)")
    p.add_argument("--decode", action="store_true",
                   help="add each row's text (token 0, end of document, as <|0|>)")
    p.set_defaults(func=show)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # `show` takes train.py's config flags (--config=..., --config.GROUP.FIELD=...) as they are.
    config_args = [a for a in argv if a.startswith("--config")]
    args = _parser().parse_args([a for a in argv if not a.startswith("--config")])
    args.config_args = config_args
    if args.command == "show" and args.steps < 1:
        print(f"rwkv-data show: --steps={args.steps}: must be >= 1", file=sys.stderr)
        return 2
    return args.func(args)


def run() -> None:
    """The `rwkv-data` console script."""
    sys.exit(main())
