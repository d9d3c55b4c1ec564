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
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

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


def load_params(path: str, dtype):
    """Our params from an official .pth without a float32 copy on the host: each tensor goes to
    the device as stored and is transposed and cast there."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from rwkv_jax.io import official_layout  # noqa: PLC0415

    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    convert = {
        "linear": jax.jit(lambda a: a.T.astype(dtype)),
        "table": jax.jit(lambda a: a.astype(dtype)),
        "mix": jax.jit(lambda a: a.reshape(-1).astype(jnp.float32)),
        "vector": jax.jit(lambda a: a.astype(jnp.float32)),
    }
    params: dict = {}
    for name, ours, kind in official_layout(n_layer):
        t = sd[name]
        host = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        node = params
        for p in ours[:-1]:
            node = node.setdefault(p, {})
        node[ours[-1]] = convert[kind](jax.device_put(host))
    jax.block_until_ready(params)
    vocab, C = sd["emb.weight"].shape
    return params, dict(vocab_size=int(vocab), n_layer=n_layer, n_embd=int(C),
                        dim_ffn=int(sd["blocks.0.ffn.key.weight"].shape[0]))


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
    import torch  # noqa: PLC0415
    from rwkv.model import RWKV  # noqa: PLC0415

    cuda = "cuda" in a.strategy
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t = time.perf_counter()
    model = RWKV(model=a.pth, strategy=a.strategy, verbose=False)
    load_s = time.perf_counter() - t
    vocab = model.w["emb.weight"].shape[0]
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
            "first_tokens": tokens[:24], "cuda_on": os.environ.get("RWKV_CUDA_ON"),
            "strategy": a.strategy}


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
        elapsed = time.perf_counter() - start
        if elapsed > a.budget_s:
            log(f"{name}: skipped, {elapsed:.0f} s of the {a.budget_s:.0f} s budget used")
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
    p.add_argument("--budget_s", type=float, default=420.0)
    p.add_argument("--no_cuda_build", action="store_true")
    p.add_argument("--worker", choices=["jax", "rwkv", "build"])
    p.add_argument("--json")
    p.add_argument("--pth")
    p.add_argument("--strategy", default="cpu fp32")
    p.add_argument("--cuda_on", action="store_true")
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--batches", default="16", help="batch sizes beside batch 1")
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
    a.batches = [int(b) for b in a.batches.split(",") if b]
    a.rows = [int(r) for r in a.rows.split(",") if r]
    if a.worker:
        result = {"jax": jax_worker, "rwkv": rwkv_worker, "build": build_worker}[a.worker](a)
        with open(a.json, "w") as f:
            json.dump(result, f)
        return
    orchestrate(a)


if __name__ == "__main__":
    main()
