"""What each state compression saves and costs: bytes per stored state, and the validation loss
when every chunk starts from a state that went through the codec.

    python bench/state_compression.py [--run_dir runs/tiny] [--tokens 65536] [--codec_steps 300]

Bytes: one row's state for the tiny model and for 3B shapes (pure RWKV-4 L32 C2560, and the 3B
hybrid with attention on odd layers and a 1024-token KV window), from jax.eval_shape (nothing
is allocated). Loss: the checkpoint in --run_dir (trained with train.py --config=configs/tiny.py;
trained here briefly if there is none) scores the head of the validation file chunk by chunk,
the state round-tripped through each codec between chunks. The learned codec needs training:
the same model is trained --codec_steps more steps with memory.state_compression='learned'
(codec and model together, as the trainer does), and its loss with the codec is compared to
that same model without it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def state_bytes_table(configs: dict) -> dict:
    import jax  # noqa: PLC0415

    from rwkv_jax.nn import state_codec  # noqa: PLC0415
    from rwkv_jax.nn.model import RWKV  # noqa: PLC0415
    from rwkv_jax.nn.state import zero_state  # noqa: PLC0415

    out = {}
    for name, config in configs.items():
        learned = config.__class__(**{**config.to_dict(), "state_compression": "learned"})
        params = jax.eval_shape(lambda c=learned: RWKV(c).init(
            jax.random.PRNGKey(0), jax.numpy.zeros((1, 2), "int32"))["params"])
        row = {}
        for mode in state_codec.MODES:
            packed = jax.eval_shape(
                lambda p, m=mode, c=config: state_codec.compress(zero_state(c, 1), m, p), params)
            row[mode] = state_codec.bytes_of(packed)
        row["codec_params"] = state_codec.bytes_of(params["state_codec"]) if "state_codec" in params else 0
        out[name] = row
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run_dir", default="runs/tiny")
    p.add_argument("--tokens", type=int, default=65536, help="validation tokens scored (0: all)")
    p.add_argument("--codec_steps", type=int, default=300)
    p.add_argument("--codec_lr", type=float, default=2e-3, help="peak lr of that training")
    p.add_argument("--state_rank", type=int, default=0, help="learned codec rank (0: n_embd // 4)")
    p.add_argument("--work_dir", default="/tmp/bench_state_compression")
    a = p.parse_args()

    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from configs import tiny  # noqa: PLC0415
    from rwkv_jax import io as ckpt  # noqa: PLC0415
    from rwkv_jax import train as trainer
    from rwkv_jax.config import ModelConfig  # noqa: PLC0415
    from rwkv_jax.config import layer_pattern as hybrid
    from rwkv_jax.evaluation import score_stream
    from rwkv_jax.generate import Generator  # noqa: PLC0415
    from rwkv_jax.nn import state_codec  # noqa: PLC0415

    configs = {
        "tiny (L4 C128)": ModelConfig(vocab_size=256, n_layer=4, n_embd=128),
        "3B (L32 C2560)": ModelConfig(vocab_size=50277, n_layer=32, n_embd=2560),
        "3B hybrid, W1024": ModelConfig(vocab_size=50277, n_layer=32, n_embd=2560, attn_head_size=128,
                                        layer_types=hybrid.build_layer_pattern(32)),
    }
    sizes = state_bytes_table(configs)
    lines = ["Bytes of one row's stored state (learned: rank n_embd/4 per RWKV layer; attention KV "
             "windows kept as they are under it):", "",
             "| model | none | bf16 | int8 | learned | learned codec params |",
             "|---|---|---|---|---|---|"]
    for name, row in sizes.items():
        cells = [f"{row[m]:,} ({row['none'] / row[m]:.1f}x)" if m != "none" else f"{row[m]:,}"
                 for m in state_codec.MODES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['codec_params']:,} |")
    print("\n".join(lines), flush=True)

    # The model: the tiny run's checkpoint, or a short run of the same config here.
    cfg = tiny.get_config()
    run_dir = a.run_dir
    if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
        with cfg.unlocked():
            cfg.output_dir, cfg.experiment_name = a.work_dir, "tiny_base"
            cfg.train.steps, cfg.logging.progress = 300, False
        run = trainer.prepare(cfg)
        trainer.train(run)
        run_dir = run.run_dir
    config, params, meta = ckpt.restore_params(run_dir)
    step = meta.get("step")
    with cfg.unlocked():
        cfg.output_dir = a.work_dir
    run = trainer.prepare(cfg)  # the validation tokens and chunk length, as the trainer has them
    tokens = np.asarray(run.val_tokens.tokens)
    if a.tokens:
        tokens = tokens[: a.tokens + 1]
    L = run.chunk_len

    def loss_with(gen, mode):
        t = time.perf_counter()
        out = gen.score(tokens, L, compression=mode)
        return out["loss"], time.perf_counter() - t

    base = Generator(config, params)
    results = {}
    for mode in ("none", "bf16", "int8"):
        results[mode] = loss_with(base, mode)
        print(f"{mode}: val loss {results[mode][0]:.6f}", flush=True)
    # For scale: no state at all, every chunk from the zero state.
    t = time.perf_counter()
    total, count = score_stream(lambda p_, x, s: base._apply(p_, x, None), base.weights,
                                        tokens, L)
    results["no state (reset each chunk)"] = (total / count, time.perf_counter() - t)

    # The learned codec: the same model trained on with the codec in the loop.
    with cfg.unlocked():
        cfg.experiment_name = f"tiny_codec_{a.codec_steps}_{a.codec_lr}_{a.state_rank}"
        cfg.train.init_from = os.path.abspath(run_dir)
        cfg.train.steps = a.codec_steps
        cfg.memory.state_compression = "learned"
        cfg.memory.state_rank = a.state_rank
        cfg.optimizer.lr, cfg.optimizer.lr_final = a.codec_lr, a.codec_lr / 5
        cfg.optimizer.warmup_steps = 20
        cfg.logging.progress, cfg.logging.eval_every = False, 0
        cfg.checkpoint.every, cfg.checkpoint.resume = a.codec_steps, False
    t = time.perf_counter()
    learned_run = trainer.prepare(cfg)
    shutil.rmtree(learned_run.run_dir, ignore_errors=True)  # a fresh codec each time
    trainer.train(learned_run)
    train_s = time.perf_counter() - t
    lconfig, lparams, _ = ckpt.restore_params(learned_run.run_dir)
    lgen = Generator(lconfig, lparams)
    results["learned: same model, no codec"] = loss_with(lgen, "none")
    results["learned"] = loss_with(lgen, "learned")
    print(f"learned: {results['learned'][0]:.6f} (without codec {results['learned: same model, no codec'][0]:.6f})")

    tiny_row = sizes["tiny (L4 C128)"]
    n = len(tokens) - 1
    lines = ["", f"Validation loss, tiny model ({run_dir}, step {step}), first {n:,} tokens of "
             f"{cfg.data.val_file}, chunks of {L}, state passed through the codec between chunks "
             f"({n // L} round trips):", "",
             "| state | bytes / row | val loss (nats/token) | change vs none | scoring s |",
             "|---|---|---|---|---|"]
    ref = results["none"][0]
    for mode, (loss, secs) in results.items():
        if mode.startswith("learned:"):
            size, change = tiny_row["none"], loss - ref
        elif mode.startswith("no state"):
            size, change = 0, loss - ref
        else:
            size = tiny_row[mode]
            change = loss - (results["learned: same model, no codec"][0] if mode == "learned" else ref)
        lines.append(f"| {mode} | {size:,} | {loss:.6f} | {change:+.6f} | {secs:.1f} |")
    lines.append(f"\nlearned: the checkpoint trained {a.codec_steps} more steps with the codec "
                 f"in the loop ({train_s:.0f} s on {jax.default_backend()}); its change is against "
                 "that same model scored without the codec (the row above it, whose change is "
                 "against the original checkpoint).")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
