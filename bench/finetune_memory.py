"""Fine-tuning a 1.5B RWKV-7 on one GPU: tokens/s and peak memory, LoRA against full.

Writes a random RWKV-7 1.5B base (L24 C2048, official .pth, bf16) and a data file, then runs
bench/train_step.py once per recipe (configs/finetune_full, finetune_lora, finetune_lora with
PiSSA, finetune_state), each in its own process so each peak is its own, at the same batch
and context. Prints the table rows.

    python bench/finetune_memory.py --out /tmp/ft1b5 [--batch 4 --ctx 4096]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def make_base(out: str) -> tuple[str, str]:
    import jax  # noqa: PLC0415

    from rwkv_jax.config import default_config, model_config_from  # noqa: PLC0415
    from rwkv_jax.data.text import open_text_bytes, sample_path  # noqa: PLC0415
    from rwkv_jax.io.official import export_official  # noqa: PLC0415
    from rwkv_jax.nn.model import init_params  # noqa: PLC0415

    base, text = os.path.join(out, "rwkv7_1b5.pth"), os.path.join(out, "train.txt")
    if not os.path.exists(base):
        c = default_config()
        c.model.version, c.model.n_layer, c.model.n_embd = "7", 24, 2048
        mc = model_config_from(c, vocab_size=65536)
        params = init_params(mc, jax.random.PRNGKey(0))
        # Random weights everywhere (the official init leaves some projections zero).
        keys = iter(jax.random.split(jax.random.PRNGKey(1), 10_000))
        params = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(next(keys), x.shape), params)
        export_official(params, mc, base, dtype="bfloat16")
    if not os.path.exists(text):
        with open(text, "wb") as f, open_text_bytes(sample_path("val")) as src:
            f.write(src.read())
    return base, text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--table", default=None, help="append the rows here (default OUT/table.md)")
    p.add_argument("--only", default="full,lora,pissa,state", help="which recipes, in order")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    base, text = make_base(args.out)
    table = args.table or os.path.join(args.out, "table.md")
    recipes = {"full": ("full fine-tune", "finetune_full", []),
               "lora": ("LoRA r=32", "finetune_lora", []),
               "pissa": ("PiSSA r=32", "finetune_lora", ["--config.train.trainable=pissa"]),
               "state": ("state tuning", "finetune_state", [])}
    for label, recipe, extra in (recipes[k] for k in args.only.split(",")):
        cmd = [sys.executable, os.path.join(HERE, "train_step.py"),
               f"--config={os.path.dirname(HERE)}/rwkv_jax/configs/{recipe}.py",
               f"--config.train.init_from={base}", f"--config.data.train_file={text}",
               f"--config.data.val_file={text}", f"--config.output_dir={args.out}/runs",
               f"--config.train.batch_size={args.batch}",
               f"--config.train.max_seq_length={args.ctx}",
               f"--config.memory.rwkv_chunk_size={args.ctx}",
               f"--label=1.5B RWKV-7 {label}", f"--table={table}", f"--steps={args.steps}",
               "--warmup=2", *extra]
        subprocess.run(cmd, check=False)
    print(open(table).read() if os.path.exists(table) else "no rows")


if __name__ == "__main__":
    main()
