"""lm-evaluation-harness throughput: loglikelihood requests/s on the local multiple-choice task
(tests/fixtures/lm_eval, 40 questions x 4 choices), ours (rwkv_jax.harness.RwkvLM, with and
without shared-context reuse) beside lm-eval's own `hf` model (transformers' RwkvForCausalLM)
on the same random RWKV-4 weights, exported with io.hf.export_hf.

    python bench/lm_eval_speed.py                       # CPU, the tiny model's shape
    python bench/lm_eval_speed.py --model 169M --batch_size 32

Each model gets the same requests, built as lm-eval builds the task's (context: the question,
continuation: " " + choice), through its `loglikelihood`; the first pass includes compiling
(ours) and the second is timed warm. Prints requests/s of both passes and the largest
difference of a log-likelihood between ours and hf's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
TASK = os.path.join(REPO, "tests", "fixtures", "lm_eval", "tiny_mc.jsonl")


def requests() -> list:
    with open(TASK) as f:
        docs = [json.loads(line) for line in f]
    return [SimpleNamespace(args=(d["question"], " " + c)) for d in docs for c in d["choices"]]


def timed(lm, reqs, passes: int) -> tuple[list[float], list]:
    times, out = [], None
    for _ in range(passes):
        t = time.perf_counter()
        out = lm.loglikelihood(reqs, disable_tqdm=True)
        times.append(time.perf_counter() - t)
    return times, out


def main() -> None:
    from decode import (  # bench/decode.py: random official .pth at a sane scale
        MODELS,
        make_pth,
    )

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", choices=sorted(MODELS))
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--passes", type=int, default=2, help="first with compiles, the rest warm")
    args = p.parse_args()
    n_layer, n_embd, _ = MODELS[args.model]
    vocab = 256  # bytes: the task is ASCII, and the hf folder gets our byte tokenizer.json

    from lm_eval.models.huggingface import HFLM

    from rwkv_jax.data import ByteTokenizer
    from rwkv_jax.data.hf_tokenizer import write_tokenizer
    from rwkv_jax.generate import Generator
    from rwkv_jax.harness import RwkvLM
    from rwkv_jax.io import export_hf, import_official

    reqs = requests()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pth, folder = os.path.join(tmp, "m.pth"), os.path.join(tmp, "hf")
        make_pth(pth, n_layer, n_embd, vocab, "cpu", "float32")
        config, params = import_official(pth)
        export_hf(params, config, folder)
        write_tokenizer(folder, "byte")
        gen = Generator(config, params, ByteTokenizer())
        sides = {"rwkv_jax": RwkvLM(gen, batch_size=args.batch_size),
                 "rwkv_jax, no context reuse": RwkvLM(gen, batch_size=args.batch_size,
                                                      reuse_context=False),
                 "lm-eval hf": HFLM(pretrained=folder, dtype="float32", device="cpu",
                                    batch_size=args.batch_size, prefix_token_id=0)}
        outs = {}
        for name, lm in sides.items():
            times, outs[name] = timed(lm, reqs, args.passes)
            rows.append((name, times))
    diff = max(abs(a[0] - b[0]) for a, b in zip(outs["rwkv_jax"], outs["lm-eval hf"]))
    print(f"model {args.model} (RWKV-4, {n_layer} layers, n_embd {n_embd}, vocab {vocab}), "
          f"{len(reqs)} requests, batch_size {args.batch_size}")
    print(f"{'':28s} {'first pass req/s':>17s} {'warm req/s':>11s}")
    for name, times in rows:
        warm = min(times[1:]) if len(times) > 1 else times[0]
        print(f"{name:28s} {len(reqs) / times[0]:17.1f} {len(reqs) / warm:11.1f}")
    print(f"largest |log-likelihood difference| rwkv_jax vs hf: {diff:.2e}")


if __name__ == "__main__":
    main()
