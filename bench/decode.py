"""Decode speed: ms per token and tokens/s at batch 1 and 16, beside the `rwkv` package on the
same random weights and prompts, and the memory floor (weight bytes read per token over the
measured copy bandwidth).

    python bench/decode.py                   # CPU: the tiny model's shape, rwkv 'cpu fp32'
    python bench/decode.py --quick           # smallest shapes: the whole path in seconds
    python bench/decode.py --gpu --out DIR   # 169M, 1.5B, 3B in bf16, rwkv 'cuda fp16'

Each model is a random official-format .pth (saved with torch). Ours: rwkv_jax.generate (the
real generate loop: one jitted call per block of decode steps, state donated, sampling
inside; greedy) with bf16 weights on GPU; also the bare block queued back to back with no host
reads, and one block of n steps (the device's own speed). Workers write their progress to workers.log in
--out as they go.
Batch 1 runs as one row and padded to 2 or 8 rows (Generator(decode_rows=...)); on GPU also
through the CUDA decode kernel (Generator(decode_kernels="cuda"), one row; batch 16 falls back
to XLA's products on its weight layout).
Theirs: `rwkv.model.RWKV(model, strategy)` with its CUDA kernels built (RWKV_CUDA_ON=1) when
nvcc can build them, fed the same prompt, greedy by argmax. Each side runs in its own process
so neither holds the other's GPU memory; the CUDA extension builds in the background while the
JAX side runs.

    python bench/decode.py --version 7 [--quick | --gpu] [--batches 16,128]

RWKV-7 (x070): a random model saved by io.official.export_official (and on a GPU by
io.hf.export_hf for fla); ours as above (XLA only: the CUDA decode kernel runs RWKV-4 blocks)
at batch 1 and --batches; the rwkv package's RWKV_x070 ('cuda fp16' / 'cpu fp32', batch 1);
on a GPU fla's RWKV7ForCausalLM (bf16, its recurrent cache) at every batch; greedy tokens of
each peer against ours. --gpu: 169M and 1.5B, vocabulary 65536, 128-token prompts, 256 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODELS = {  # name: (n_layer, n_embd, vocab)
    "quick": (2, 64, 512),
    "tiny": (4, 128, 256),
    "169M": (12, 768, 50277),
    "430M": (24, 1024, 50277),
    "1.5B": (24, 2048, 50277),
    "3B": (32, 2560, 50277),
}
# RWKV-7 (x070, head size 64): the same sizes with the World vocabulary's size.
MODELS7 = {name: (L, C, 65536 if V == 50277 else V) for name, (L, C, V) in MODELS.items()}


# ----------------------------------------------------------------------------- weights


def make_pth(path: str, n_layer: int, n_embd: int, vocab: int, device: str, dtype: str, seed=0):
    """A random RWKV-4 state dict in the official layout, weights at a sane scale (unit-gain
    matrices, decays spread as in a trained model), saved with torch."""
    import torch  # noqa: PLC0415

    g = torch.Generator(device=device).manual_seed(seed)
    C, F = n_embd, 4 * n_embd
    dt = getattr(torch, dtype)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt).cpu()

    def rand(*shape, lo=0.0, hi=1.0):
        return (torch.rand(*shape, generator=g, device=device) * (hi - lo) + lo).to(dt).cpu()

    sd = {"emb.weight": randn(vocab, C, scale=0.5)}
    for i in range(n_layer):
        b = f"blocks.{i}."
        for n in (["ln0"] if i == 0 else []) + ["ln1", "ln2"]:
            sd[b + n + ".weight"] = 1 + randn(C, scale=0.1)
            sd[b + n + ".bias"] = randn(C, scale=0.1)
        sd[b + "att.time_decay"] = rand(C, lo=-4, hi=2)
        sd[b + "att.time_first"] = randn(C)
        for n in "kvr":
            sd[b + f"att.time_mix_{n}"] = rand(1, 1, C)
        for n in ("key", "value", "receptance", "output"):
            sd[b + f"att.{n}.weight"] = randn(C, C, scale=C**-0.5)
        for n in "kr":
            sd[b + f"ffn.time_mix_{n}"] = rand(1, 1, C)
        sd[b + "ffn.key.weight"] = randn(F, C, scale=C**-0.5)
        sd[b + "ffn.receptance.weight"] = randn(C, C, scale=C**-0.5)
        sd[b + "ffn.value.weight"] = randn(C, F, scale=F**-0.5)
    sd["ln_out.weight"] = 1 + randn(C, scale=0.1)
    sd["ln_out.bias"] = randn(C, scale=0.1)
    sd["head.weight"] = randn(vocab, C, scale=C**-0.5)
    torch.save(sd, path)
    if device == "cuda":
        torch.cuda.empty_cache()  # the workers need the memory, not this process


def make_x070(path: str, hf_dir: str | None, n_layer: int, n_embd: int, vocab: int,
              dtype: str, seed=0) -> None:
    """A random RWKV-7 (x070): our init moved by noise at each tensor's scale (the official init
    leaves some projections zero), saved as an official .pth by io.official.export_official and,
    with hf_dir, as an fla-hub folder by io.hf.export_hf (the same model for each peer)."""
    import jax  # noqa: PLC0415

    from rwkv_jax.config import ModelConfig  # noqa: PLC0415
    from rwkv_jax.io.hf import export_hf  # noqa: PLC0415
    from rwkv_jax.io.official import export_official  # noqa: PLC0415
    from rwkv_jax.nn.model import init_params  # noqa: PLC0415

    config = ModelConfig(version="7", vocab_size=vocab, n_layer=n_layer, n_embd=n_embd, head_size=64)
    params = init_params(config, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    # Matrices (in, out) by 0.5 / sqrt(fan_in): unit-gain products; vectors by 0.5.
    params = jax.tree.unflatten(tree, [
        x + 0.5 / (x.shape[0] ** 0.5 if x.ndim == 2 else 1) * jax.random.normal(k, x.shape, x.dtype)
        for x, k in zip(leaves, keys)])
    params = jax.device_get(params)  # one host copy for both writers
    # The two files side by side: their host conversions release the GIL (a 1.5B model is 6 GB
    # of float32 to convert for each).
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(export_official, params, config, path, dtype=dtype)]
        if hf_dir:
            jobs.append(pool.submit(export_hf, params, config, hf_dir, dtype="bfloat16"))
        for job in jobs:
            job.result()


def load_params(path: str, dtype):
    """Our params from an official .pth without a float32 copy on the host: each tensor goes to
    the device as stored and is transposed and cast there."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from rwkv_jax.io import official_layout, official_version  # noqa: PLC0415

    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    version = official_version(sd)
    convert = {
        "linear": jax.jit(lambda a: a.T.astype(dtype)),
        "table": jax.jit(lambda a: a.astype(dtype)),
        "mix": jax.jit(lambda a: a.reshape(-1).astype(jnp.float32)),
        "vector": jax.jit(lambda a: a.astype(jnp.float32)),
    }
    params: dict = {}
    for name, ours, kind in official_layout(n_layer, version):
        if ours[-1] == "r_k":  # RWKV-7's bonus stays float32 (decode_loop.inference_params)
            kind = "vector"
        t = sd[name]
        host = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        node = params
        for p in ours[:-1]:
            node = node.setdefault(p, {})
        node[ours[-1]] = convert[kind](jax.device_put(host))
    jax.block_until_ready(params)
    vocab, C = sd["emb.weight"].shape
    dims = dict(vocab_size=int(vocab), n_layer=n_layer, n_embd=int(C),
                dim_ffn=int(sd["blocks.0.ffn.key.weight"].shape[0]))
    if version == "7":  # head size and LoRA ranks from the tensors, as io.official reads them
        dims.update(version="7", head_size=int(sd["blocks.0.att.r_k"].shape[-1]),
                    **{f"dim_{n}_lora": int(sd[f"blocks.0.att.{n}1"].shape[-1]) for n in "wavg"})
    return params, dims


def prompt_tokens(vocab: int, n: int, rows: int, seed: int = 1):
    import numpy as np  # noqa: PLC0415

    return np.random.default_rng(seed).integers(0, vocab, (rows, n)).tolist()


# ----------------------------------------------------------------------------- workers


def copy_bandwidth() -> float:
    """Bytes per second a device copy moves (read + write), as the anchors count it."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    n = (256 << 20) if jax.default_backend() == "gpu" else (32 << 20)
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda a: a + 1)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        y = f(x)
        for _ in range(9):
            y = f(y)
        y.block_until_ready()
        best = min(best, (time.perf_counter() - t) / 10)
    return 2 * x.nbytes / best


def gemv_bandwidth(C: int, dtype) -> dict:
    """Bytes per second one (B, C) x (C, 4C) product reads from its matrix: how well the
    compiler's batch-1 products use the memory, apart from everything else in a step."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    w = jax.random.normal(jax.random.PRNGKey(0), (C, 4 * C), jnp.float32).astype(dtype)
    n = 50
    # One call, n dependent products: no dispatch in the time.
    f = jax.jit(lambda x, w: jax.lax.fori_loop(
        0, n, lambda i, x: (x @ w)[:, :C].astype(x.dtype) * 0.5, x))
    out = {}
    for B in (1, 16):
        x = jnp.ones((B, C), dtype)
        f(x, w).block_until_ready()
        t = time.perf_counter()
        f(x, w).block_until_ready()
        out[f"B{B}_GBps"] = w.nbytes * n / (time.perf_counter() - t) / 1e9
    return out


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def jax_worker(a) -> dict:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from rwkv_jax.config import ModelConfig  # noqa: PLC0415
    from rwkv_jax.generate import Generator  # noqa: PLC0415

    gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if gpu else jnp.float32
    t = time.perf_counter()
    params, dims = load_params(a.pth, dtype)
    progress(f"weights loaded in {time.perf_counter() - t:.1f} s")
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "load_s": time.perf_counter() - t, "dtype": jnp.dtype(dtype).name,
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "variants": {}}
    # Bytes a decode step reads: every weight but the embedding table (one row of it).
    weights = sum(x.nbytes for x in jax.tree.leaves(params)) - params["emb"]["embedding"].nbytes
    out["weight_bytes"] = int(weights)
    out["bandwidth"] = copy_bandwidth()
    out["floor_ms"] = 1e3 * weights / out["bandwidth"]
    out["gemv"] = gemv_bandwidth(dims["n_embd"], dtype)
    prompt = prompt_tokens(dims["vocab_size"], a.prompt_len + 1, 1)[0]
    config = ModelConfig(**dims, dtype=jnp.dtype(dtype).name)

    kernels = a.kernels
    gen = None
    if a.prefill:
        wkv = "auto"
        for attempt in ("auto", "chunked"):
            config = ModelConfig(**dims, dtype=jnp.dtype(dtype).name, wkv_impl=attempt)
            gen = Generator(config, params, prefill_chunk=a.prompt_len, decode_rows=1,
                            decode_kernels=kernels)
            try:
                t = time.perf_counter()
                gen.generate(prompt, max_new_tokens=4)  # compiles the prefill and the B1 step
                out["compile_s"] = time.perf_counter() - t
                wkv = attempt
                break
            except Exception as e:  # noqa: BLE001 - a GPU kernel that fails here: say so, go on
                out["prefill_fallback"] = f"wkv_impl={attempt} failed: {type(e).__name__}: {str(e)[:200]}"
                if attempt == "chunked":
                    raise
        out["prefill_wkv"] = wkv
        progress(f"prefill and batch-1 step compiled in {out['compile_s']:.1f} s")
        res = gen.generate(prompt, max_new_tokens=a.new_tokens)
        out["prefill_s"] = res.timings["prefill_s"]
        out["first_tokens"] = res.tokens[0][:24]
        out["tokens"] = res.tokens[0]  # all of them: RWKV-7's agreement with each peer
        prefilled = gen.feed([prompt[:-1]])
    else:
        prefilled = Generator(config, params).reset(1)

    # Decode from the prompt's state, the state repeated for a batch (the speed of B prompts
    # without compiling a (B, prompt) prefill).
    for rows in a.rows:
        if not (rows == 1 and gen is not None):  # the prefill's generator has the 1-row step
            gen = Generator(config, params, decode_rows=rows, group_products=not a.ungrouped,
                            decode_kernels=kernels)
        out["decode_kernels"] = gen.decode_kernels
        out["variants"][f"B1 rows={rows}"] = measure_decode(gen, prefilled, prompt[-1], 1, a.new_tokens)
        progress(f"B1 rows={rows}: {out['variants'][f'B1 rows={rows}']}")
        gen = None
    for B in a.batches:
        gen = Generator(config, params, group_products=not a.ungrouped, decode_kernels=kernels)
        out["variants"][f"B{B}"] = measure_decode(gen, prefilled, prompt[-1], B, a.new_tokens)
        progress(f"B{B}: {out['variants'][f'B{B}']}")
    return out


def greedy_block_inputs(gen, state, tokens, steps: int):
    """The generator's compiled greedy decode block and what it takes, for timing it bare:
    (block, carry, rest) with `carry, out = block(gen.weights, carry, *rest)` running `steps`
    steps that never end a row. state: a state (copied), or a carry's flat state (taken)."""
    import numpy as np  # noqa: PLC0415

    from rwkv_jax.generate import GREEDY  # noqa: PLC0415
    from rwkv_jax.generate.sampling import DecodeCarry  # noqa: PLC0415

    B = len(tokens)
    if isinstance(state, dict):  # the tree callers see; a block carries it flat
        state = gen.flat_state(None, gen._placed(state, B), B)
    yes = np.ones((B,), bool)
    carry = gen._put(DecodeCarry(state, np.zeros((B, 2), np.uint32), np.zeros((B, 0), np.float32),
                            np.zeros((B, 0), bool), np.asarray(tokens, np.int32), yes, yes,
                            np.zeros((B,), np.int32)))
    rest = gen._put((np.zeros((B, steps), np.int32), np.zeros((B, steps), bool), yes,
                     np.full((1,), -1, np.int32), np.int32(2**30), GREEDY.knobs(),
                     np.ones((1,), np.float32)))
    return gen._block_fn(GREEDY.spec(gen.config.vocab_size)), carry, rest


def time_bare_blocks(gen, block, carry, rest, n: int):
    """Queue the block n times back to back (after 3 warm-up calls): (seconds per call to
    queue it, seconds per call until the last one finished, the final carry)."""
    for _ in range(3):
        carry, out = block(gen.weights, carry, *rest)
    out.block_until_ready()
    t = time.perf_counter()
    for _ in range(n):
        carry, out = block(gen.weights, carry, *rest)
    queued = time.perf_counter() - t
    out.block_until_ready()
    return queued / n, (time.perf_counter() - t) / n, carry


def measure_decode(gen, prefilled, token: int, B: int, n: int) -> dict:
    """ms per step of a whole generate call (n tokens, from a state), of the bare decode block
    queued back to back, and of one block of n steps (the device alone: one launch)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    state = jax.tree.map(lambda x: jnp.repeat(x, B, axis=0), prefilled)
    rows = [[token]] * B
    t = time.perf_counter()
    gen.generate(rows, state=state, max_new_tokens=4, keep_state=True)  # compiles
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    res = gen.generate(rows, state=state, max_new_tokens=n, keep_state=True)
    call_s = time.perf_counter() - t  # the whole call: its setup and last read included
    tm = res.timings
    last = [r[-1] for r in res.tokens]
    K = gen.decode_block
    block, carry, rest = greedy_block_inputs(gen, res.state, last, K)
    _, bare, carry = time_bare_blocks(gen, block, carry, rest, max(2, n // K))
    block, carry, rest = greedy_block_inputs(gen, carry.state, last, n)
    _, device, _ = time_bare_blocks(gen, block, carry, rest, 2)
    return {"loop_ms": 1e3 * call_s / tm["steps"], "bare_ms": 1e3 * bare / K,
            "device_ms": 1e3 * device / n, "compile_s": compile_s, "block": K}


def rwkv_worker(a) -> dict:
    os.environ["RWKV_CUDA_ON"] = "1" if a.cuda_on else "0"
    # The package's RWKV-7 exists only with RWKV_V7_ON=1 set before rwkv.model is imported.
    os.environ["RWKV_V7_ON"] = "1" if a.version == "7" else "0"
    import torch  # noqa: PLC0415
    import rwkv.model  # noqa: PLC0415

    cuda = "cuda" in a.strategy
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t = time.perf_counter()
    if a.version == "7":  # RWKV_x070 appends ".pth" to the name it is given
        model = rwkv.model.RWKV_x070(model=a.pth.removesuffix(".pth"), strategy=a.strategy)
        vocab = model.z["emb.weight"].shape[0]
    else:
        model = rwkv.model.RWKV(model=a.pth, strategy=a.strategy, verbose=False)
        vocab = model.w["emb.weight"].shape[0]
    load_s = time.perf_counter() - t
    prompt = prompt_tokens(vocab, a.prompt_len + 1, 1)[0]
    model.forward(prompt[:8], None)  # TorchScript and kernels warm up
    out, state = model.forward([prompt[0]], None)
    sync()
    t = time.perf_counter()
    out, state = model.forward(prompt, None)
    sync()
    prefill_s = time.perf_counter() - t
    tokens = []
    for _ in range(3):  # warm-up of the one-token path
        token = int(torch.argmax(out))
        o, s = model.forward([token], [x.clone() for x in state])
    sync()
    t = time.perf_counter()
    for _ in range(a.new_tokens):
        token = int(torch.argmax(out))  # the host reads each token: what generation does
        tokens.append(token)
        out, state = model.forward([token], state)
    sync()
    ms = 1e3 * (time.perf_counter() - t) / a.new_tokens
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_ms_per_token": ms,
            "first_tokens": tokens[:24], "tokens": tokens, "cuda_on": os.environ.get("RWKV_CUDA_ON"),
            "strategy": a.strategy}


def fla_worker(a) -> dict:
    """fla's RWKV7ForCausalLM (bf16, its Triton kernels) on the export_hf folder: the prompt in
    one call, then one call per token with its recurrent cache (fused_mul_recurrent at one
    token under no_grad), greedy by argmax on the device; per batch the median of a few timed
    decode loops, each from a fresh prefill, synchronised around the whole loop."""
    import torch  # noqa: PLC0415
    import fla  # noqa: F401, PLC0415 - registers model_type rwkv7 with transformers
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.bfloat16).to("cuda").eval()
    out = {"load_s": time.perf_counter() - t, "class": type(model).__name__, "fla": fla.__version__,
           "torch": torch.__version__, "batches": {}}
    prompt = prompt_tokens(model.config.vocab_size, a.prompt_len + 1, 1)[0]

    def prefill(B):
        ids = torch.tensor([prompt] * B, device="cuda")
        res = model(ids, use_cache=True, logits_to_keep=1)
        return res.past_key_values, res.logits[:, -1].argmax(-1)

    def decode(cache, token, n):
        tokens = []
        for _ in range(n):
            tokens.append(token)
            res = model(token[:, None], past_key_values=cache, use_cache=True)
            cache, token = res.past_key_values, res.logits[:, -1].argmax(-1)
        return torch.stack(tokens, 1)

    with torch.inference_mode():
        for B in [1, *a.batches]:
            try:  # a batch that fails (memory, a kernel) is one cell, not the whole peer
                decode(*prefill(B), 4)  # Triton compiles (and tunes) its kernels for this shape
                times = []
                for _ in range(3):
                    cache, token = prefill(B)
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    tokens = decode(cache, token, a.new_tokens)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
                ms = 1e3 * sorted(times)[1] / a.new_tokens
                out["batches"][f"B{B}"] = {"ms": ms, "tokens": tokens[0].tolist(),
                                           "rows_equal": bool((tokens == tokens[:1]).all())}
                progress(f"fla B{B}: {ms:.2f} ms per step")
            except Exception as e:  # noqa: BLE001
                out["batches"][f"B{B}"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                progress(f"fla B{B} failed: {out['batches'][f'B{B}']['error']}")
            cache = tokens = None
            torch.cuda.empty_cache()
    return out


def make_worker(a) -> dict:
    """Save the random RWKV-7 (JAX's init on this process's device, gone when it exits)."""
    t = time.perf_counter()
    make_x070(a.pth, a.hf, *a.shape, a.pth_dtype)
    return {"make_s": time.perf_counter() - t}


def build_worker(a) -> dict:
    """Build the rwkv package's CUDA extension (cached for the later rwkv workers)."""
    os.environ["RWKV_CUDA_ON"] = "1"
    t = time.perf_counter()
    import rwkv.model  # noqa: F401, PLC0415

    return {"built": os.environ.get("RWKV_CUDA_ON") == "1", "build_s": time.perf_counter() - t}


# ----------------------------------------------------------------------------- orchestration


def _worker(kind: str, args: list[str], log, timeout: float, env=None) -> dict | None:
    out_json = os.path.join(args_out(), f"{kind}_{os.getpid()}_{time.monotonic_ns()}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--json", out_json, *args]
    t = time.perf_counter()
    # The worker's output goes to a file as it runs: a worker that times out still shows how
    # far it got.
    log_path = os.path.join(args_out(), "workers.log")
    with open(log_path, "a") as f:
        f.write(f"\n=== {kind} {' '.join(args)}\n")
        f.flush()  # the header before the child's output, which goes to the file directly
        start = f.tell()
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True,
                                  timeout=timeout, env={**os.environ, **(env or {})})
            failed = proc.returncode != 0
            why = f"failed ({time.perf_counter() - t:.0f} s)"
        except subprocess.TimeoutExpired:
            failed, why = True, f"timed out after {timeout:.0f} s"
    if failed:
        with open(log_path) as f:
            f.seek(start)
            tail = [ln for ln in f.read().splitlines() if ln.strip()][-6:]
        log(f"  {kind} {why}: " + " | ".join(tail))
        return None
    with open(out_json) as f:
        result = json.load(f)
    os.remove(out_json)
    return result


_OUT = [None]


def _save(out_dir: str, results: dict) -> None:
    with open(os.path.join(out_dir, "decode.json"), "w") as f:
        json.dump(results, f, indent=1)


def _over_budget(name: str, start: float, budget_s: float, log) -> bool:
    elapsed = time.perf_counter() - start
    if elapsed > budget_s:
        log(f"{name}: skipped, {elapsed:.0f} s of the {budget_s:.0f} s budget used")
    return elapsed > budget_s


def args_out() -> str:
    return _OUT[0]


def orchestrate(a):
    os.makedirs(a.out, exist_ok=True)
    _OUT[0] = a.out
    logf = open(os.path.join(a.out, "decode.log"), "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    if a.version == "7":
        orchestrate7(a, log)
        return
    start = time.perf_counter()
    # (label, environment, worker flags): the first one also times the prefill.
    variants = [("XLA defaults", {}, ["--prefill", "--rows", "1,2,8"])]
    if a.gpu:
        names, device, pdtype, strategy = ["3B", "169M", "1.5B"], "cuda", "float16", "cuda fp16"
        prompt_len, new_tokens, batches = 1024, 100, [16]
        # The default (XLA's products on the grouped layout; batch 1 padded to two rows:
        # 2026-11-25 on an H100, 2.98 ms against 5.19 for one row and 3.03 for 8) beside the
        # CUDA decode kernel, which needs no padding. (The fused Pallas decode kernels, slower
        # than XLA, were removed; bench/README.md keeps their figures.)
        variants = [("XLA, grouped products", {}, ["--prefill", "--rows", "1,2"]),
                    ("CUDA decode block", {}, ["--rows", "1", "--kernels", "cuda"])]
        keep = {"xla": "XLA", "cuda": "CUDA"}
        wanted = [v for v in a.variants.split(",") if v] or list(keep)
        unknown = [v for v in wanted if v not in keep]
        if unknown:
            raise SystemExit(f"--variants {a.variants!r}: unknown {unknown}; choose from "
                             f"{','.join(keep)}")
        picked = [keep[v] for v in wanted]
        variants = [v for v in variants if any(v[0].startswith(k) for k in picked)]
    elif a.quick:
        names, device, pdtype, strategy = ["quick"], "cpu", "float32", "cpu fp32"
        prompt_len, new_tokens, batches = 16, 8, [4]
        variants = [("XLA defaults", {}, ["--prefill", "--rows", "1,2"])]
    else:
        names, device, pdtype, strategy = ["tiny"], "cpu", "float32", "cpu fp32"
        prompt_len, new_tokens, batches = 128, 64, [16]
        variants = [("XLA defaults", {}, ["--prefill", "--rows", "1"])]
    if a.models:
        names = a.models.split(",")
    build = None
    if a.gpu and not a.no_cuda_build and not a.no_rwkv:
        build = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", "build",
             "--json", os.path.join(a.out, "build.json")],
            stdout=open(os.path.join(a.out, "rwkv_cuda_build.log"), "w"), stderr=subprocess.STDOUT)
    common = ["--prompt_len", str(prompt_len), "--new_tokens", str(new_tokens)]
    results = {}
    for name in names:
        if _over_budget(name, start, a.budget_s, log):
            continue
        n_layer, n_embd, vocab = MODELS[name]
        pth = os.path.join(a.tmp, f"rwkv4_{name}.pth")
        t = time.perf_counter()
        make_pth(pth, n_layer, n_embd, vocab, device, pdtype)
        log(f"{name}: L{n_layer} C{n_embd} V{vocab}, random weights saved in {time.perf_counter() - t:.1f} s")
        results[name] = {"ours": {}, "rwkv": None, "shape": MODELS[name]}
        for label, env, extra in variants:
            remaining = max(a.budget_s + 60 - (time.perf_counter() - start), 30)
            ours = _worker("jax", ["--pth", pth, "--batches", ",".join(map(str, batches)),
                                   *common, *extra], log, timeout=remaining, env=env)
            log(f"  ours ({label}): {json.dumps(ours)}")
            results[name]["ours"][label] = ours
            _save(a.out, results)
        # The rwkv package's CUDA extension, if it has finished building by now (it builds in
        # the background from the start; the time goes to measuring, not waiting).
        cuda_on = False
        if build is not None and build.poll() is not None:
            try:
                with open(os.path.join(a.out, "build.json")) as f:
                    cuda_on = json.load(f)["built"]
            except (OSError, ValueError, KeyError):
                cuda_on = False
        remaining = max(a.budget_s + 60 - (time.perf_counter() - start), 30)
        if a.no_rwkv:
            results[name]["rwkv"] = {}
            os.remove(pth)
            continue
        theirs = _worker("rwkv", ["--pth", pth, "--strategy", strategy, *common]
                         + (["--cuda_on"] if cuda_on else []), log, timeout=remaining)
        log(f"  rwkv: {json.dumps(theirs)}")
        results[name]["rwkv"] = theirs
        _save(a.out, results)
        os.remove(pth)
    if build is not None:
        log(f"rwkv CUDA extension build: {'finished' if build.poll() is not None else 'still running'}"
            f", returncode {build.poll()}")
        if build.poll() is None:
            build.kill()
    table = format_table(results, batches, prompt_len, new_tokens)
    log(table)
    with open(os.path.join(a.out, "decode.md"), "w") as f:
        f.write(table + "\n")


def orchestrate7(a, log) -> None:
    """RWKV-7: ours (XLA; no CUDA decode kernel exists for it) at batch 1 and a.batches, the
    rwkv package at batch 1 and, on a GPU with CUDA, fla at every batch, each in its own
    process on one random model per shape."""
    start = time.perf_counter()
    if a.gpu:
        names, strategy, pdtype = ["169M", "1.5B"], "cuda fp16", "bfloat16"
        prompt_len, new_tokens, batches = 128, 256, [16, 128]
        rows = "1,2"
    elif a.quick:
        names, strategy, pdtype = ["quick"], "cpu fp32", "float32"
        prompt_len, new_tokens, batches, rows = 16, 8, [4], "1"
    else:
        names, strategy, pdtype = ["tiny"], "cpu fp32", "float32"
        prompt_len, new_tokens, batches, rows = 128, 64, [16], "1"
    names = a.models.split(",") if a.models else names
    batches = a.batches_given or batches
    unknown = [n for n in names if n not in MODELS7]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {','.join(MODELS7)}")
    if a.gpu and "cuda" in (a.variants.split(",") if a.variants else ["cuda"]):
        log("CUDA decode block: skipped for RWKV-7 (rwkv_jax.kernels.cuda.decode4 runs RWKV-4 "
            "blocks only)")
    fla = a.gpu and not a.no_fla and _cuda_visible()
    if not fla:
        log("fla: skipped (" + ("--no_fla" if a.no_fla else "no --gpu" if not a.gpu
                                else "no CUDA device") + ")")
    common = ["--version", "7", "--prompt_len", str(prompt_len), "--new_tokens", str(new_tokens)]
    results = {}
    for name in names:
        if _over_budget(name, start, a.budget_s, log):
            continue
        shape = MODELS7[name]
        pth, hf = os.path.join(a.tmp, f"rwkv7_{name}.pth"), os.path.join(a.tmp, f"rwkv7_{name}_hf")

        def remaining():
            return max(a.budget_s + 60 - (time.perf_counter() - start), 30)

        made = _worker("make", ["--pth", pth, "--shape", ",".join(map(str, shape)), "--pth_dtype",
                                pdtype] + (["--hf", hf] if fla else []), log, timeout=remaining())
        if made is None:
            continue
        log(f"{name}: RWKV-7 L{shape[0]} C{shape[1]} V{shape[2]}, random weights saved in "
            f"{made['make_s']:.1f} s")
        # None: the worker failed; {}: not run.
        r = results[name] = {"shape": shape, "ours": None, "rwkv": {}, "fla": {}}
        r["ours"] = _worker("jax", ["--pth", pth, "--batches", ",".join(map(str, batches)),
                                    "--prefill", "--rows", rows, *common], log, timeout=remaining())
        log(f"  ours: {json.dumps(r['ours'])}")
        if fla:
            r["fla"] = _worker("fla", ["--hf", hf, "--batches", ",".join(map(str, batches)),
                                       *common], log, timeout=remaining())
            log(f"  fla: {json.dumps(r['fla'])}")
        if not a.no_rwkv:
            r["rwkv"] = _worker("rwkv", ["--pth", pth, "--strategy", strategy, *common], log,
                                timeout=remaining())
            log(f"  rwkv: {json.dumps(r['rwkv'])}")
        _save(a.out, results)
        os.remove(pth)
        shutil.rmtree(hf, ignore_errors=True)
    table = format_table7(results, batches, prompt_len, new_tokens)
    log(table)
    with open(os.path.join(a.out, "decode.md"), "w") as f:
        f.write(table + "\n")


def _cuda_visible() -> bool:
    """Whether torch sees a CUDA device, asked in a child (this process must hold no GPU)."""
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    try:
        return subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def agreement(ours: list | None, theirs: list | None) -> str:
    """Greedy tokens of two sides from the same prompt: the share of positions equal, and how
    many lead before the first difference (after which the two continue different texts)."""
    if not ours or not theirs:
        return "n/a"
    n = min(len(ours), len(theirs))
    same = sum(x == y for x, y in zip(ours[:n], theirs[:n]))
    lead = next((i for i in range(n) if ours[i] != theirs[i]), n)
    return f"{100 * same / n:.0f}% (first {lead} of {n})"


def format_table7(results: dict, batches, prompt_len: int, new_tokens: int) -> str:
    lines = [f"RWKV-7, greedy decode after a {prompt_len + 1}-token prompt, {new_tokens} tokens "
             "timed per row: ms per decode step (one token for each row) of whole calls, "
             "ours in brackets as the bare decode block queued back to back / one block of n "
             "steps; x floor = ours / (weight bytes read per step / copy bandwidth).", "",
             "| model | batch | ours ms/step (bare / device) | ours tokens/s | ours x floor "
             "| fla ms/step | fla tokens/s | rwkv pkg ms/step | greedy ours = fla | greedy ours = rwkv pkg |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    first = None
    for name, r in results.items():
        o, f, t = r["ours"], r["fla"], r["rwkv"]
        first = first or o
        fla_b = f["batches"] if f else {}
        for B in [1, *batches]:
            v = None
            if o:  # batch 1: the fastest of its row paddings
                cands = [x for k, x in o["variants"].items() if k.startswith("B1 ")] if B == 1 \
                    else [o["variants"].get(f"B{B}")]
                cands = [x for x in cands if x]
                v = min(cands, key=lambda x: x["loop_ms"]) if cands else None
            ours = (f"{v['loop_ms']:.2f} ({v['bare_ms']:.2f} / {v['device_ms']:.2f})", 
                    f"{1e3 * B / v['loop_ms']:,.0f}", f"{v['loop_ms'] / o['floor_ms']:.2f}x") \
                if v else ("failed" if not o else "", "", "")
            fb = fla_b.get(f"B{B}")
            if fb and "error" in fb:
                theirs, fb = (f"failed ({fb['error'].split(':')[0]})", ""), None
            else:
                theirs = (f"{fb['ms']:.2f}", f"{1e3 * B / fb['ms']:,.0f}") if fb else \
                    ("not run" if f == {} else "failed" if f is None else "", "")
            pkg = ("not run" if t == {} else f"{t['decode_ms_per_token']:.2f}" if t else "failed") \
                if B == 1 else ""
            tokens = o.get("tokens") if o else None
            agree_fla = agreement(tokens, fb["tokens"]) if fb else ""
            agree_pkg = agreement(tokens, t.get("tokens")) if B == 1 and t else ""
            lines.append(f"| {name} | {B} | {ours[0]} | {ours[1]} | {ours[2]} | {theirs[0]} "
                         f"| {theirs[1]} | {pkg} | {agree_fla} | {agree_pkg} |")
    if first:
        lines += ["", f"Device: {first['device']}, jax {first['jax']}, ours in {first['dtype']}; "
                  f"copy bandwidth {first['bandwidth'] / 1e9:,.0f} GB/s (read + write); floor "
                  f"{first['floor_ms']:.3f} ms for the first model. Batch 1: ours' fastest row "
                  "padding (Generator(decode_rows)); fla in bfloat16 with its recurrent cache, "
                  "rows of one prompt; rwkv package one row. Greedy agreement: fla's first row "
                  "and the package's tokens against ours at batch 1. The floor counts the "
                  "weights only: at batch B each step also reads and writes B states "
                  "(n_layer x n_embd x head size float32 a row)."]
        if first["device"] == "cpu":
            lines[-1] += (" On a CPU the weights of a small model stay in cache, so the floor "
                          "(from a copy of an array larger than the cache) is not a bound.")
    return "\n".join(lines)


def format_table(results: dict, batches, prompt_len: int, new_tokens: int) -> str:
    lines = [f"Greedy decode from the state of a {prompt_len + 1}-token prompt, {new_tokens} tokens "
             "timed: ms per decode step (one token per row) of a whole generate call, and in "
             "brackets the bare decode block queued back to back (no host reads) / one block of "
             "n steps (the device alone).", "",
             "| model | ours | B1, 1 row | B1 padded to 2 rows | B1 padded to 8 rows "
             + "".join(f"| B{b} ms/step (tokens/s) " for b in batches) + "|",
             "|---|---|---|---|---" + "|---" * len(batches) + "|"]

    def cell(v):
        return f"{v['loop_ms']:.2f} ({v['bare_ms']:.2f} / {v['device_ms']:.2f})" if v else ""

    summary = ["", "| model | floor ms | best ours B1 ms/token | best / floor | rwkv pkg B1 ms/token "
               "| rwkv / best ours | prefill tokens/s ours / rwkv | greedy tokens equal |",
               "|---|---|---|---|---|---|---|---|"]
    first = None
    for name, r in results.items():
        best, main = None, None
        for label, o in r["ours"].items():
            if not o:
                lines.append(f"| {name} | {label}: failed |")
                continue
            main = main or o
            first = first or o
            v = o["variants"]
            batch_cells = "".join(
                f"| {cell(v.get(f'B{b}'))} ({1e3 * b / v[f'B{b}']['loop_ms']:,.0f}) " if v.get(f"B{b}")
                else "| " for b in batches)
            lines.append(f"| {name} ({o['dtype']}) | {label} | {cell(v.get('B1 rows=1'))} "
                         f"| {cell(v.get('B1 rows=2'))} | {cell(v.get('B1 rows=8'))} {batch_cells}|")
            for k, x in v.items():
                if k.startswith("B1 ") and (best is None or x["loop_ms"] < best[0]):
                    best = (x["loop_ms"], f"{label}, {k[3:]}")
        if not main or not best:
            continue
        t = r["rwkv"]
        theirs = f"{t['decode_ms_per_token']:.2f}" + (" (CUDA ext)" if t.get("cuda_on") == "1" else "") \
            if t else "not run" if t == {} else "failed"
        agree, pre_theirs = "", "n/a"
        if t and main.get("first_tokens"):
            n = min(len(main["first_tokens"]), len(t["first_tokens"]))
            same = next((i for i in range(n) if main["first_tokens"][i] != t["first_tokens"][i]), n)
            agree = f"first {same} of {n}"
            pre_theirs = f"{(prompt_len + 1) / t['prefill_s']:,.0f}"
        pre_ours = f"{(prompt_len + 1) / main['prefill_s']:,.0f}" if main.get("prefill_s") else "n/a"
        ratio = f"{t['decode_ms_per_token'] / best[0]:.1f}x" if t else ""
        summary.append(
            f"| {name} | {main['floor_ms']:.3f} | {best[0]:.2f} ({best[1]}) | {best[0] / main['floor_ms']:.2f}x "
            f"| {theirs} | {ratio} "
            f"| {pre_ours} / {pre_theirs} | {agree} |")
    lines += summary
    if first:
        note = f"; {first['prefill_fallback']}" if first.get("prefill_fallback") else ""
        lines += ["", f"Device: {first['device']}, jax {first['jax']}; copy bandwidth "
                  f"{first['bandwidth'] / 1e9:,.0f} GB/s (read + write); floor = weight bytes read per "
                  f"token ({first['dtype']}, embedding table aside) / that bandwidth; prefill "
                  f"wkv_impl={first.get('prefill_wkv')}{note}."]
        if any("ungrouped products" in r["ours"] for r in results.values()):
            lines[-1] += (" Ungrouped products: the official weight layout, one product per "
                          "matrix (Generator(group_products=False)).")
        if any("CUDA decode block" in r["ours"] for r in results.values()):
            lines[-1] += (" CUDA decode block: a block as one CUDA kernel (rwkv_jax.kernels.cuda."
                          "decode4, Generator(decode_kernels='cuda')), one row; batch 16 runs "
                          "XLA's products on its weight layout.")
        if first["device"] == "cpu":
            lines[-1] += (" On a CPU the weights of a small model stay in cache, so the floor "
                          "(from a copy of an array larger than the cache) is not a bound.")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", default="", help="comma list of " + ",".join(MODELS))
    p.add_argument("--out", default="/tmp/bench_decode")
    p.add_argument("--tmp", default="/tmp")
    p.add_argument("--budget_s", type=float, default=None,
                   help="seconds before later models are skipped (420; --version 7: 300)")
    p.add_argument("--no_cuda_build", action="store_true")
    p.add_argument("--worker", choices=["jax", "rwkv", "build", "make", "fla"])
    p.add_argument("--json")
    p.add_argument("--pth")
    p.add_argument("--strategy", default="cpu fp32")
    p.add_argument("--cuda_on", action="store_true")
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--version", default="4", choices=("4", "7"),
                   help="RWKV-4, or RWKV-7 (x070) beside the rwkv package and fla's RWKV7ForCausalLM")
    p.add_argument("--batches", default="",
                   help="batch sizes beside batch 1 (--version 7; RWKV-4 runs 16, --quick 4)")
    p.add_argument("--no_fla", action="store_true", help="--version 7: leave fla out")
    p.add_argument("--hf", help="worker: an export_hf folder")
    p.add_argument("--shape", help="worker: n_layer,n_embd,vocab of the model to make")
    p.add_argument("--pth_dtype", default="float32", help="worker: the .pth's dtype")
    p.add_argument("--rows", default="1", help="batch 1 decoded with this many rows (padding)")
    p.add_argument("--prefill", action="store_true", help="also time the prefill of the prompt")
    p.add_argument("--kernels", default=None, choices=("cuda",),
                   help="decode with the CUDA decode kernel (Generator(decode_kernels='cuda'))")
    p.add_argument("--variants", default="",
                   help="--gpu: which of xla,cuda to run (default: all)")
    p.add_argument("--no_rwkv", action="store_true", help="leave the rwkv package out")
    p.add_argument("--ungrouped", action="store_true",
                   help="decode with the official weight layout (Generator(group_products=False))")
    a = p.parse_args()
    try:
        # Batch 1 always runs (its own rows): drop it from the others.
        a.batches = [int(b) for b in a.batches.split(",") if b and int(b) != 1]
    except ValueError:
        raise SystemExit(f"--batches {a.batches!r}: give batch sizes like 16,128") from None
    if any(b < 1 for b in a.batches):
        raise SystemExit(f"--batches {a.batches}: batch sizes must be at least 1")
    a.batches_given = a.batches or None
    if a.budget_s is None:
        a.budget_s = 300.0 if a.version == "7" else 420.0
    a.shape = [int(x) for x in a.shape.split(",")] if a.shape else None
    a.rows = [int(r) for r in a.rows.split(",") if r]
    if a.worker:
        result = {"jax": jax_worker, "rwkv": rwkv_worker, "build": build_worker,
                  "make": make_worker, "fla": fla_worker}[a.worker](a)
        with open(a.json, "w") as f:
            json.dump(result, f)
        return
    orchestrate(a)


if __name__ == "__main__":
    main()
