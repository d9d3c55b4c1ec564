"""RWKV-7 training throughput beside fla's RWKV7ForCausalLM at the same shapes (issue 37).

    python3 bench/train7_fla.py --out DIR [--shapes 169M,1.5B] [--steps 10] [--profile]
    python3 bench/train7_fla.py --quick --no_fla       # a CPU: the tiny shape, ours only

One GPU, one run: for each shape, our train step (bench/train_step.py, its own process: the
compiled step train.py runs, bf16 products, the Pallas WKV kernel) and fla's (flash-linear-
attention's `RWKV7ForCausalLM`: float32 weights under bf16 autocast, its chunk kernel, fused
norms and cross-entropy, fused AdamW; its own process), on random tokens, vocabulary 65536.
Both train the same architecture (fla's config gets our LoRA ranks and FFN width). Prints
tokens/s, MFU (the same FLOPs a token for both: rwkv_jax.train.metrics), peak memory and
ours / fla. `--profile` adds our step's device time by op (bench/profile_step.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

# name: (n_layer, n_embd, batch, seq_len, remat)
SHAPES = {"tiny": (2, 128, 2, 64, False), "169M": (12, 768, 16, 1024, False),
          "1.5B": (24, 2048, 8, 4096, True)}
VOCAB = 65536


def model_config(shape: str, vocab: int):
    from rwkv_jax.config import default_config, model_config_from  # noqa: PLC0415

    L, C, *_ = SHAPES[shape]
    c = default_config()
    c.model.version, c.model.n_layer, c.model.n_embd = "7", L, C
    return model_config_from(c, vocab_size=vocab)


def ours(shape: str, a, out: str, policy: str) -> dict | None:
    """Our step at `shape`; policy: a remat policy name, or "default" (the shape's own)."""
    L, C, B, T, remat = SHAPES[shape]
    path = os.path.join(out, f"ours_{shape}_{policy}.json")
    cmd = [sys.executable, os.path.join(HERE, "train_step.py"),
           f"--config={REPO}/rwkv_jax/configs/model_169m.py", "--config.model.version=7",
           f"--config.model.n_layer={L}", f"--config.model.n_embd={C}",
           f"--config.train.batch_size={B}", f"--config.train.max_seq_length={T}",
           f"--config.memory.rwkv_chunk_size={T}", f"--config.efficiency.remat={remat}",
           f"--config.model.vocab_size={a.vocab}",
           f"--config.output_dir={out}/runs", f"--steps={a.steps}", f"--warmup={a.warmup}",
           f"--label={shape} RWKV-7 ours", f"--json={path}", *a.ours_flag]
    if policy != "default":
        cmd += ["--config.efficiency.remat=True", f"--config.efficiency.remat_policy={policy}"]
    if shape == "tiny":
        cmd += ["--config.data.tokenizer=byte"]
    if a.profile and policy == a.remat.split(",")[0]:
        cmd.append(f"--profile={out}/profile_{shape}")
    return _child(cmd, path, a.timeout)


def _child(cmd: list[str], path: str, timeout: float) -> dict | None:
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.95")
    t0 = time.time()
    try:
        p = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        print(f"  timed out after {timeout:.0f} s: {' '.join(cmd[:3])}")
        return None
    keep = [ln for ln in (p.stdout + p.stderr).splitlines()
            if not ln.startswith(("I1", "W1", "I0", "W0"))]
    print("\n".join(keep[-90:]))
    if p.returncode or not os.path.exists(path):
        print(f"  exit {p.returncode} after {time.time() - t0:.0f} s")
        return None
    with open(path) as f:
        return json.load(f)


def fla_worker(a) -> None:
    """fla's training step, as its own examples train it (autocast bf16 over float32)."""
    import torch  # noqa: PLC0415
    from fla.models import RWKV7Config, RWKV7ForCausalLM  # noqa: PLC0415

    mc = model_config(a.shape, a.vocab)
    _, _, B, T, remat = SHAPES[a.shape]
    cfg = RWKV7Config(hidden_size=mc.n_embd, num_hidden_layers=mc.n_layer, head_dim=mc.head_size,
                      intermediate_size=mc.dim_ffn, hidden_ratio=None, vocab_size=a.vocab,
                      decay_low_rank_dim=mc.dim_w_lora, a_low_rank_dim=mc.dim_a_lora,
                      v_low_rank_dim=mc.dim_v_lora, gate_low_rank_dim=mc.dim_g_lora,
                      fuse_norm=True, fuse_cross_entropy=not a.fla_linear_ce,
                      fuse_linear_cross_entropy=a.fla_linear_ce, use_cache=False,
                      use_l2warp=False)  # RWKV-LM's L2Wrap: a pass over the logits ours lacks
    torch.manual_seed(0)
    model = RWKV7ForCausalLM(cfg).cuda().train()
    if remat:
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8,
                            weight_decay=0.1, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, a.vocab, (B, T), device="cuda", generator=g) for _ in range(3)]
    times, loss = [], None
    for i in range(a.warmup + a.steps):
        x = batches[i % len(batches)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    ms = 1e3 * statistics.median(times)
    result = {"step_ms": ms, "tokens_per_s": B * T / (ms / 1e3),
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
              "device": torch.cuda.get_device_name(), "loss": float(loss),
              "params": sum(p.numel() for p in model.parameters())}
    print(f"fla {a.shape}: all step ms {[round(1e3 * t, 1) for t in times]}")
    with open(a.json, "w") as f:
        json.dump(result, f)


def fla(shape: str, a, out: str) -> dict | None:
    path = os.path.join(out, f"fla_{shape}{'_lce' if a.fla_linear_ce else ''}.json")
    cmd = [sys.executable, __file__, "--worker", "--shape", shape, "--json", path,
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--vocab", str(a.vocab)]
    if a.fla_linear_ce:
        cmd.append("--fla_linear_ce")
    return _child(cmd, path, a.timeout)


def row(shape: str, who: str, r: dict | None, flops: float, base: dict | None) -> str:
    if r is None:
        return f"| {shape} | {who} | failed | | | | |"
    from rwkv_jax.train.metrics import PEAK_FLOPS  # noqa: PLC0415 - the chips' dense bf16 peaks

    peak = next((v for k, v in PEAK_FLOPS.items() if k in r["device"]), None)
    mfu = f"{100 * r['tokens_per_s'] * flops / peak:.1f}%" if peak else "-"
    ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
    gib = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "-"
    return (f"| {shape} | {who} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | "
            f"{gib} | {ratio} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="/tmp/train7_fla")
    p.add_argument("--shapes", default="169M,1.5B")
    p.add_argument("--quick", action="store_true", help="the tiny shape (a CPU)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--timeout", type=float, default=300,
                   help="seconds for each side's process (fla's first steps autotune Triton "
                        "kernels: over 95 s at 169M on an H100)")
    p.add_argument("--profile", action="store_true", help="profile our first --remat row")
    p.add_argument("--remat", default="default",
                   help="comma list of our rows: 'default' (remat as the shape has it: 1.5B "
                        "nothing_saveable, 169M off) or a remat policy name")
    p.add_argument("--no_fla", action="store_true")
    p.add_argument("--fla_linear_ce", action="store_true",
                   help="fla's fused linear cross-entropy (no logits kept) instead of fused CE")
    p.add_argument("--ours_flag", action="append", default=[],
                   help="another --config.X=Y for our step (repeatable)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return fla_worker(a)
    shapes = ["tiny"] if a.quick else a.shapes.split(",")
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        raise SystemExit(f"--shapes {','.join(bad)}: not one of {', '.join(SHAPES)}")
    os.makedirs(a.out, exist_ok=True)
    from rwkv_jax.train.metrics import model_flops_per_token  # noqa: PLC0415

    lines = ["| shape (B x T) | step | ms | tokens/s | MFU | peak GiB | ours / fla |",
             "|---|---|---|---|---|---|---|"]
    for shape in shapes:
        _, _, B, T, _ = SHAPES[shape]
        flops = model_flops_per_token(model_config(shape, a.vocab), T)
        theirs = None if a.no_fla else fla(shape, a, a.out)
        label = f"{shape} ({B} x {T})"
        if not a.no_fla:
            lines.append(row(label, "fla RWKV7ForCausalLM" + (" (linear CE)" if a.fla_linear_ce
                                                              else ""), theirs, flops, None))
        for policy in a.remat.split(","):
            if shape == "1.5B" and policy not in ("default", "nothing_saveable"):
                # 32k tokens x 24 layers of saved products do not fit in 80 GB
                lines.append(f"| {label} | rwkv_jax (remat {policy}) | skipped: no fit | | | | |")
                continue
            mine = ours(shape, a, a.out, policy)
            who = "rwkv_jax" + ("" if policy == "default" else f" (remat {policy})")
            lines.append(row(label, who, mine, flops, theirs))
        table = "\n".join(lines)
        with open(os.path.join(a.out, "table.md"), "w") as f:
            f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
