"""fla's RWKV7ForCausalLM (GPU, bfloat16) on a folder that io.hf.export_hf wrote, against our
model on the same folder (issue 35: the fla-hub layout means the same model to fla as to us).

    python3 bench/hf_fla.py [--n_embd 768 --n_layer 12 --vocab 65536 --tokens 1024]
    python3 bench/hf_fla.py --peer rwkv7-hf --n_embd 256 --n_layer 4 --vocab 4096   # a CPU

A random RWKV-7 (our init moved far from itself, so no weight is zero or at its init) is
exported in bfloat16; fla (its chunk kernel and fused norms, as `import fla;
AutoModelForCausalLM.from_pretrained(DIR)` runs it), and ours (float32, and bfloat16 as
`infer.py --bf16` runs it) compute the logits of the same tokens from that folder. The table
gives each one's relative error against our float32 and how often its argmax agrees. On a CPU
in float32, tests/io/test_hf.py checks rwkv7-hf against the `rwkv` package to 1e-5; `--peer
rwkv7-hf` puts that pure-PyTorch RWKV7ForCausalLM in fla's place (where no GPU is).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rwkv_jax.config import ModelConfig  # noqa: E402
from rwkv_jax.generate.decode_loop import inference_params  # noqa: E402
from rwkv_jax.io.hf import export_hf, import_hf  # noqa: E402
from rwkv_jax.nn.model import RWKV, init_params  # noqa: E402


def moved(params, seed: int = 1, scale: float = 0.5):
    """params plus noise: scale / sqrt(fan_in) on matrices (ours are (in, out)), scale on vectors."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [
        x + scale / (x.shape[0] ** 0.5 if x.ndim == 2 else 1) * jax.random.normal(k, x.shape)
        for x, k in zip(leaves, keys)])


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def peer_logits(peer: str, folder: str, tokens: np.ndarray, dtype) -> np.ndarray:
    import torch  # noqa: PLC0415

    if peer == "fla":
        import fla  # noqa: F401, PLC0415 - registers model_type rwkv7 with transformers
        from transformers import AutoModelForCausalLM as cls  # noqa: PLC0415, N813
    else:
        from rwkv7_hf import RWKV7ForCausalLM as cls  # noqa: PLC0415, N813
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = cls.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    print(f"{peer}: {type(model).__module__}.{type(model).__name__} {dtype} on {device}")
    with torch.no_grad():
        out = model(torch.as_tensor(tokens, device=device)).logits
    return out.float().cpu().numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--peer", choices=("fla", "rwkv7-hf"), default="fla")
    args = p.parse_args()
    config = ModelConfig(version="7", vocab_size=args.vocab, n_layer=args.n_layer,
                         n_embd=args.n_embd, head_size=64)
    params = moved(init_params(config, jax.random.PRNGKey(0)))
    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.tokens))
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(params, config, tmp, dtype="bfloat16")
        config, params = import_hf(tmp)  # the folder's (bf16-rounded) weights, for both sides
        want = np.asarray(jax.jit(RWKV(config).apply)({"params": params}, jnp.asarray(tokens))[0])
        bf16 = dataclasses.replace(config, dtype="bfloat16")
        ours16 = np.asarray(jax.jit(RWKV(bf16).apply)(
            {"params": inference_params(params)}, jnp.asarray(tokens))[0], np.float32)
        rows = [("ours bfloat16 (infer.py --bf16)", ours16),
                *((f"{args.peer} {d}", peer_logits(args.peer, tmp, tokens, d))
                  for d in ("bfloat16", "float32"))]
    print(f"RWKV-7 n_embd {args.n_embd} n_layer {args.n_layer} vocab {args.vocab}, "
          f"{args.batch} x {args.tokens} tokens; against ours in float32 on the same folder")
    print(f"{'':34s} {'rel. error':>10s} {'argmax agrees':>14s}")
    for name, got in rows:
        agree = float(np.mean(got.argmax(-1) == want.argmax(-1)))
        print(f"{name:34s} {rel(got, want):10.2e} {agree:14.4f}")


if __name__ == "__main__":
    main()
