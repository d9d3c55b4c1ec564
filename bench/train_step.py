"""Training throughput of a config on the devices present: step time, tokens/s, MFU, memory.

    python bench/train_step.py --config=configs/model_169m.py [--config.efficiency.wkv_impl=assoc]
        [--steps=10] [--warmup=3] [--label=NAME] [--json=FILE] [--profile=DIR]

Random tokens, the real train step (the same compiled function train.py runs, chunk with the
recurrent state passed in), timed after warm-up; median over the timed steps. MFU is model
FLOPs (6 x matrix parameters + causal attention) over the device's dense bf16 peak. Prints
one table row; several runs append to --table (a markdown file) so variants sit side by side.
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "A config file.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (compile, autotune).")
_LABEL = flags.DEFINE_string("label", "", "Row label.")
_TABLE = flags.DEFINE_string("table", "", "Append the row to this markdown file too.")
_JSON = flags.DEFINE_string("json", "", "Write the row's numbers to this JSON file too.")
_PROFILE = flags.DEFINE_string("profile", "", "Trace 3 more steps into this folder and print "
                               "the device time by op (bench/profile_step.py); the step is "
                               "compiled without XLA's command buffers (CUDA graphs).")

HEADER = ("| run | devices | mesh (d,f,t) | batch x chunk | step ms | tokens/s | MFU | "
          "peak GiB | plan GiB | XLA GiB |\n|---|---|---|---|---|---|---|---|---|---|")


def main(argv):
    del argv
    if _PROFILE.value:
        # Inside a CUDA-graph command buffer the trace names only the buffer, not its kernels.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_gpu_enable_command_buffer=").strip()
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from rwkv_jax import train as trainer  # noqa: PLC0415
    from rwkv_jax.nn.model import RWKV  # noqa: PLC0415

    cfg = _CONFIG.value
    run = trainer.prepare(cfg)
    mc = run.model_config
    optimizer = trainer.make_optimizer(run)
    layout = trainer.plan_shardings(run, optimizer)
    plan = trainer.check_memory(run, layout)
    ts, _ = trainer.init_train_state(run, jax.random.PRNGKey(0), layout)
    if run.adapters is not None:  # train.trainable=lora|pissa: the frozen bf16 base
        trainer.freeze_base(run, ts.params, layout)
    # A chunk in the middle of a sequence: the state comes in, as in long-context training.
    fn = trainer.make_train_step(RWKV(mc), optimizer, fresh=False, handoff=run.chunk_len,
                                 float16=mc.dtype == "float16", adapters=run.adapters)
    step = trainer.compile_step(fn, run, layout, donate=(0,))
    xla = trainer.xla_step_bytes(step)

    B, L = cfg.train.batch_size, run.chunk_len
    rng = np.random.default_rng(0)
    mask = jnp.ones((L,), jnp.float32)
    batches = [tuple(jax.device_put(rng.integers(0, mc.vocab_size, (B, L), dtype=np.int32),
                                    layout.batch) for _ in range(2)) for _ in range(3)]
    times = []
    for i in range(_WARMUP.value + _STEPS.value):
        x, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        ts, metrics = step(ts, x, y, mask, run.base)
        jax.block_until_ready((ts, metrics))
        if i >= _WARMUP.value:
            times.append(time.perf_counter() - t0)
    ms = 1e3 * statistics.median(times)
    tps = B * L / (ms / 1e3)
    peak = trainer.device_peak_flops()
    mfu = tps * trainer.model_flops_per_token(mc, L) / peak if peak else float("nan")
    used = trainer.peak_device_bytes()
    gib = 2**30
    mesh = run.mesh.shape
    from rwkv_jax.ops import wkv4, wkv7  # noqa: PLC0415

    auto = wkv7.default_impl(L, mc.head_size) if mc.version == "7" else wkv4.default_impl(L)
    wkv = mc.wkv_impl if mc.wkv_impl != "auto" else f"auto={auto}"
    trains = f", trains {cfg.train.trainable}" if cfg.train.trainable != "all" else ""
    trains += ", no command buffers" if _PROFILE.value else ""
    row = (f"| {_LABEL.value or cfg.experiment_name} (wkv {wkv}, remat "
           f"{mc.remat_policy if mc.remat else 'off'}{trains}) | {jax.device_count()}x "
           f"{jax.devices()[0].device_kind} | ({mesh['data']},{mesh['fsdp']},{mesh['tensor']}) | "
           f"{B} x {L} | {ms:.1f} | {tps:,.0f} | {100 * mfu:.1f}% | "
           f"{used / gib if used else float('nan'):.1f} | {plan['total'] / gib:.1f} | "
           f"{xla / gib if xla else float('nan'):.1f} |")
    print(f"loss {float(metrics['loss']):.3f}; all step ms: {[round(1e3 * t, 1) for t in times]}")
    print(HEADER)
    print(row)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump({"step_ms": ms, "tokens_per_s": tps, "mfu": mfu, "peak_gib": used / gib
                       if used else None, "flops_per_token": trainer.model_flops_per_token(mc, L),
                       "device": jax.devices()[0].device_kind, "loss": float(metrics["loss"])}, f)
    if _PROFILE.value:
        import profile_step  # noqa: PLC0415 - beside this script

        def more(n, ts=ts):
            for i in range(n):
                x, y = batches[i % len(batches)]
                ts, m = step(ts, x, y, mask, run.base)
            jax.block_until_ready((ts, m))

        print(profile_step.profile(more, step.as_text(), _PROFILE.value, steps=3))
    if _TABLE.value:
        new = not os.path.exists(_TABLE.value)
        with open(_TABLE.value, "a") as f:
            if new:
                f.write(HEADER + "\n")
            f.write(row + "\n")


if __name__ == "__main__":
    app.run(main)
