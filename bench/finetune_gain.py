"""How much of full fine-tuning's validation-loss gain LoRA and state tuning recover (CPU).

A small RWKV-7 is trained here on the bundled Shakespeare sample (the base), then fine-tuned
from its exported .pth on a chat-formatted held-out play (The Tempest, which the base never
saw: one speech is the user's turn, the reply the assistant's), the same number of steps with
each recipe (configs/finetune_full, finetune_lora with r=8, finetune_state; their settings, on
the byte tokenizer at this model's size). Prints the validation loss of each on held-out
turns of the same play, and each method's share of full fine-tuning's gain.

    python bench/finetune_gain.py --out /tmp/ftgain            # about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from rwkv_jax import train as trainer  # noqa: E402
from rwkv_jax.configs import finetune_full, finetune_lora, finetune_state, tiny  # noqa: E402
from rwkv_jax.data.text import open_text_bytes, sample_path  # noqa: E402
from rwkv_jax.evaluation import evaluate  # noqa: E402
from rwkv_jax.io.checkpoint import restore_params  # noqa: E402
from rwkv_jax.io.official import export_official, import_official  # noqa: E402


def tempest_chats(out_dir: str) -> tuple[str, str]:
    """The Tempest as chat jsonl (train: 90% of its speech pairs, val: the last 10%)."""
    with open_text_bytes(sample_path("val")) as f:
        text = f.read().decode("utf-8")
    play = text[text.index("THE TEMPEST"):]
    play = play[:play.index("TWELFTH NIGHT")] if "TWELFTH NIGHT" in play else play
    speeches = []
    for block in re.split(r"\n\s*\n", play):
        lines = block.strip().splitlines()
        if len(lines) >= 2 and re.fullmatch(r"[A-Z][A-Z ]+\.", lines[0].strip()):
            speech = " ".join(x.strip() for x in lines[1:] if not x.strip().startswith("["))
            if speech:
                speeches.append(f"{lines[0].strip()[:-1].title()}: {speech}")
    # The user's turn keeps its speech's last 160 characters, so the reply is in each row.
    pairs = [{"messages": [{"role": "user", "content": a[-160:]},
                           {"role": "assistant", "content": b}]}
             for a, b in zip(speeches, speeches[1:])]
    cut = len(pairs) * 9 // 10
    paths = []
    for name, rows in (("train", pairs[:cut]), ("val", pairs[cut:])):
        paths.append(os.path.join(out_dir, f"tempest_{name}.jsonl"))
        with open(paths[-1], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return paths[0], paths[1]


def base_model(out_dir: str, steps: int) -> str:
    """A small RWKV-7 trained on the sample (the tiny recipe at version 7), as an official .pth."""
    path = os.path.join(out_dir, "base.pth")
    if os.path.exists(path):
        return path
    c = tiny.get_config()
    c.output_dir, c.experiment_name = out_dir, "base"
    c.model.version, c.model.head_size = "7", 32
    c.train.steps = c.optimizer.total_steps = steps
    c.logging.eval_every, c.logging.progress, c.logging.tensorboard = 0, False, False
    c.checkpoint.every = steps
    trainer.train(trainer.prepare(c))
    config, params, _ = restore_params(os.path.join(out_dir, "base"))
    export_official(params, config, path)
    return path


def finetune(recipe, name: str, base: str, data: tuple[str, str], out_dir: str, steps: int,
             lr: float, **fields) -> tuple[float, float, float]:
    """(validation loss before, after, seconds) of one recipe at this scale."""
    c = recipe.get_config()
    c.output_dir, c.experiment_name = out_dir, name
    c.train.init_from, (c.data.train_file, c.data.val_file) = base, data
    c.data.tokenizer = "byte"
    c.train.batch_size, c.train.max_seq_length, c.memory.rwkv_chunk_size = 8, 256, 256
    c.train.steps = c.optimizer.total_steps = steps
    c.optimizer.lr = lr
    c.optimizer.lr_final = min(c.optimizer.lr_final, lr)
    c.efficiency.precision, c.efficiency.remat = "float32", False
    c.logging.eval_every, c.logging.eval_tokens = steps, 0
    c.logging.progress, c.logging.tensorboard, c.checkpoint.every = False, False, steps
    for key, value in fields.items():
        *groups, field = key.split(".")
        node = c
        for group in groups:
            node = node[group]
        node[field] = value
    run = trainer.prepare(c)
    config, params = import_official(base)
    before = evaluate(config, params, run.val_tokens, run.chunk_len, None)["loss"]
    t = time.perf_counter()
    after = trainer.train(run)["val_loss"]
    return before, after, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="a directory for the runs")
    p.add_argument("--base_steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=60, help="fine-tuning steps of each method")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    base = base_model(args.out, args.base_steps)
    data = tempest_chats(args.out)
    rows = []
    for name, recipe, lr, fields in (
            ("full", finetune_full, 3e-4, {}),
            ("lora r=8", finetune_lora, 3e-3, {"train.lora.rank": 8, "train.lora.alpha": 16.0}),
            ("state", finetune_state, 1.0, {})):
        before, after, secs = finetune(recipe, name.split()[0], base, data, args.out,
                                       args.steps, lr, **fields)
        rows.append((name, lr, before, after, secs))
    full_gain = rows[0][2] - rows[0][3]
    print(f"\nfine-tuning gain, RWKV-7 base trained {args.base_steps} steps on the sample, "
          f"{args.steps} steps on The Tempest as chat ({jax.default_backend()})")
    print("| method | lr | val loss before | after | gain | share of full | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, lr, before, after, secs in rows:
        gain = before - after
        print(f"| {name} | {lr:g} | {before:.4f} | {after:.4f} | {gain:.4f} | "
              f"{100 * gain / full_gain:.0f}% | {secs:.0f} |")


if __name__ == "__main__":
    main()
