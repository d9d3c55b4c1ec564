"""rwkv-serve under load: generated tokens/s, time to first token and inter-token latency at
1, 8, 32 and 128 concurrent streaming clients, beside Generator.generate at the same batch
sizes in the same run (the engine's own capacity, no HTTP).

    python bench/serve.py                                  # CPU: a random tiny RWKV-4
    python bench/serve.py --random 7 --n_layer 24 --n_embd 2048 --vocab 65536 --bf16 \\
        --prompt_len 128 --new_tokens 256                  # GPU: a random 1.5B RWKV-7
    python bench/serve.py --official RWKV-x070-World-0.1B.pth --clients 1,8
    python bench/serve.py --url http://127.0.0.1:8000 --clients 8 --no_generator  # a running server

Clients run in --workers separate processes, each an asyncio loop of httpx streams; each
client sends requests one after another until it has sent --requests or the row's --row_s has
passed. A worker's CPU share is printed, to show the clients are not the bottleneck. Prompts
are random token ids (no prefix cache hits); requests ask for logprobs so that every decode
block streams a chunk even where the tokens have no text (a random model's ids past a
tokenizer's table). A random model may emit the World tokenizer's end token 0; the server is
given the byte tokenizer so that nothing stops a row before --new_tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# The server and this process share the device: neither takes most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    m = p.add_argument_group("model")
    m.add_argument("--official", default=None, help="an official .pth")
    m.add_argument("--random", default="4", choices=("4", "7"),
                   help="without --official: a random RWKV-4 or RWKV-7 of the sizes below")
    m.add_argument("--n_layer", type=int, default=4)
    m.add_argument("--n_embd", type=int, default=128)
    m.add_argument("--vocab", type=int, default=256)
    m.add_argument("--bf16", action="store_true")
    m.add_argument("--url", default=None, help="a running server (its model is not started here)")
    r = p.add_argument_group("load")
    r.add_argument("--clients", default="1,8,32,128")
    r.add_argument("--workers", type=int, default=4, help="client processes")
    r.add_argument("--requests", type=int, default=1000, help="requests each client sends, at most")
    r.add_argument("--row_s", type=float, default=10.0,
                   help="seconds a row sends requests (those in flight then finish)")
    r.add_argument("--prompt_len", type=int, default=64)
    r.add_argument("--new_tokens", type=int, default=64)
    s = p.add_argument_group("server")
    s.add_argument("--max_batch", type=int, default=0, help="0: the most clients of a row")
    s.add_argument("--decode_block", type=int, default=8)
    s.add_argument("--prefill_chunk", type=int, default=256)
    s.add_argument("--no_generator", action="store_true", help="leave Generator.generate out")
    p.add_argument("--sampling_cost", default=None, metavar="B,V",
                   help="only time one sampling step of B rows over V tokens: greedy (argmax) "
                        "against per-row top-k / top-p (generate.slots.draw_rows), and exit")
    return p.parse_args()


# ----------------------------------------------------------------------------- the model


def _random_pth(args, path: str) -> None:
    """Random weights (our initialisation, perturbed so no matrix is zero) as an official .pth."""
    import jax

    from rwkv_jax.config import ModelConfig
    from rwkv_jax.io.official import export_official
    from rwkv_jax.nn.model import init_params

    config = ModelConfig(version=args.random, vocab_size=args.vocab, n_layer=args.n_layer,
                         n_embd=args.n_embd)
    params = init_params(config, jax.random.key(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    # Zero-initialised projections would make every row's logits alike.
    leaves = [x + 0.02 * jax.random.normal(k, x.shape, x.dtype) if x.ndim == 2 else x
              for x, k in zip(leaves, keys)]
    export_official(jax.tree.unflatten(tree, leaves), config, path,
                    dtype="bfloat16" if args.bf16 else "float32")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(args, pth: str, max_batch: int, max_queue: int):
    import httpx

    port = _free_port()
    cmd = [sys.executable, os.path.join(REPO, "serve.py"), "--official", pth, "--tokenizer", "byte",
           "--port", str(port), "--max_batch", str(max_batch), "--max_queue", str(max_queue),
           "--max_tokens_cap", str(args.new_tokens), "--max_prompt_tokens", str(args.prompt_len),
           "--decode_block", str(args.decode_block), "--prefill_chunk", str(args.prefill_chunk),
           "--prefix_cache_mb", "0"] + (["--bf16"] if args.bf16 else [])
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            sys.exit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)


# ----------------------------------------------------------------------------- clients


async def _one(http, url: str, body: dict) -> dict:
    import json

    t0 = time.perf_counter()
    chunks = []  # (arrival, tokens in the chunk)
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            lp = json.loads(line[6:])["choices"][0].get("logprobs")
            if lp and lp["token_logprobs"]:
                chunks.append((time.perf_counter(), len(lp["token_logprobs"])))
    return {"start": t0, "chunks": chunks}


async def _clients(url, n, requests, row_s, prompt_len, new_tokens, vocab, seed):
    import httpx

    rng = np.random.default_rng(seed)
    end = time.perf_counter() + row_s
    limits = httpx.Limits(max_connections=n + 1, max_keepalive_connections=n + 1)
    async with httpx.AsyncClient(timeout=None, limits=limits) as http:
        async def client(c):
            out = []
            for _ in range(requests):
                if time.perf_counter() > end:
                    break
                prompt = rng.integers(1, vocab, prompt_len).tolist()
                out.append(await _one(http, url, {
                    "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                    "stream": True, "logprobs": 0}))
            return out

        done = await asyncio.gather(*(client(c) for c in range(n)))
    return [r for rs in done for r in rs]


def _worker(job):
    import httpx  # noqa: F401 - imported before the clock starts

    url, n, requests, row_s, prompt_len, new_tokens, vocab, seed = job
    cpu, wall = time.process_time(), time.perf_counter()
    records = asyncio.run(_clients(url, n, requests, row_s, prompt_len, new_tokens, vocab, seed))
    return records, (time.process_time() - cpu) / max(time.perf_counter() - wall, 1e-9)


def _cpu_s(pid: int | None) -> float:
    """CPU seconds a process has used (Linux), 0 where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, TypeError, IndexError, ValueError):
        return 0.0


def _load(args, url: str, n: int, vocab: int, server_pid: int | None = None,
          requests: int | None = None, new_tokens: int | None = None) -> dict:
    """A row: n clients over the worker processes; tokens/s, TTFT and ITL percentiles, and the
    CPU share of the busiest client process and of the server."""
    cpu0 = _cpu_s(server_pid)
    workers = min(args.workers, n)
    shares = [n // workers + (i < n % workers) for i in range(workers)]
    jobs = [(url, k, requests or args.requests, args.row_s, args.prompt_len,
             new_tokens or args.new_tokens, vocab, 1000 * n + i) for i, k in enumerate(shares)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(workers) as pool:
        results = pool.map(_worker, jobs)
    wall = time.perf_counter() - t0
    server_cpu = (_cpu_s(server_pid) - cpu0) / wall
    records = [r for rs, _ in results for r in rs]
    tokens = sum(k for r in records for _, k in r["chunks"])
    ttft = [r["chunks"][0][0] - r["start"] for r in records if r["chunks"]]
    itl = []  # per token: the wait for its chunk, shared by the chunk's tokens
    for r in records:
        for (ta, _), (tb, k) in zip(r["chunks"], r["chunks"][1:]):
            itl += [(tb - ta) / k] * k
    span = max(c[-1][0] for c in (r["chunks"] for r in records) if c) - min(r["start"] for r in records)
    pct = lambda xs, q: 1e3 * float(np.percentile(xs, q)) if xs else float("nan")
    return {"clients": n, "requests": len(records), "tokens": tokens, "tok_s": tokens / span,
            "ttft50": pct(ttft, 50), "ttft99": pct(ttft, 99), "itl50": pct(itl, 50),
            "itl99": pct(itl, 99), "client_cpu": max(c for _, c in results), "wall": wall,
            "server_cpu": server_cpu}


def _sampling_cost(spec: str) -> None:
    """ms a step of per-row sampling (generate.slots.draw_rows) costs beside the argmax a greedy
    batch takes, for each path it can take."""
    import jax
    import jax.numpy as jnp

    from rwkv_jax.generate.sampling import Sampling
    from rwkv_jax.generate.slots import draw_rows

    B, V = (int(x) for x in spec.split(","))
    k1, k2 = jax.random.split(jax.random.key(0))
    flat = jax.random.normal(k1, (B, V), jnp.float32) * 3
    # A trained model's kind of distribution: Zipf (s = 1.5) over a shuffled vocabulary, where
    # the 256 most likely tokens hold ~95% of the mass.
    zipf = jax.vmap(lambda k: jax.random.permutation(k, -1.5 * jnp.log(jnp.arange(1.0, V + 1))))(
        jax.random.split(k2, B))
    keys = jax.vmap(lambda k: jax.random.key_data(jax.random.key(k)))(jnp.arange(B))

    def sampler(top_p, top_k):
        knobs = jnp.asarray(np.tile(Sampling(temperature=0.8, top_p=top_p).knobs(), (B, 1)))
        ks = jnp.full(B, top_k, jnp.int32)
        return jax.jit(lambda x: draw_rows(keys, x, knobs, ks)[0])

    cases = [("greedy (argmax)", jax.jit(lambda x: jnp.argmax(x, axis=-1)), zipf),
             ("temperature only (whole vocabulary)", sampler(1.0, 0), zipf),
             ("top_k 40", sampler(1.0, 40), zipf),
             ("top_p 0.9, peaked logits (within the top 256)", sampler(0.9, 0), zipf),
             ("top_p 0.9, flat logits (a full sort)", sampler(0.9, 0), flat)]
    for name, f, x in cases:
        jax.block_until_ready(f(x))
        n, t = 10, time.perf_counter()
        for _ in range(n):
            out = f(x)
        jax.block_until_ready(out)
        print(f"| {B} x {V} | {name} | {1e3 * (time.perf_counter() - t) / n:.2f} | "
              f"{jax.devices()[0].device_kind} |")


# ----------------------------------------------------------------------------- Generator


def _generator_rows(args, pth: str, sizes: list[int]) -> dict[int, float]:
    """Generator.generate's tokens/s at each batch size (prompt and length as the clients')."""
    from rwkv_jax.generate import Generator
    from rwkv_jax.io.official import import_official

    config, params = import_official(pth)
    gen = Generator(config, params, None, prefill_chunk=args.prefill_chunk, bf16=args.bf16,
                    decode_block=args.decode_block)
    rng = np.random.default_rng(0)
    out = {}
    for b in sizes:
        prompts = rng.integers(1, config.vocab_size, (b, args.prompt_len)).tolist()
        gen.generate(prompts, max_new_tokens=args.new_tokens)  # compiles
        t = time.perf_counter()
        result = gen.generate(prompts, max_new_tokens=args.new_tokens)
        out[b] = result.timings["new_tokens"] / (time.perf_counter() - t)
    return out


def main():
    args = _args()
    if args.sampling_cost:
        return _sampling_cost(args.sampling_cost)
    sizes = [int(x) for x in args.clients.split(",")]
    tmp = tempfile.TemporaryDirectory()
    pth = args.official
    if pth is None and args.url is None:
        pth = os.path.join(tmp.name, "random.pth")
        _random_pth(args, pth)
    proc, url = (None, args.url)
    if url is None:
        proc, url = _start_server(args, pth, args.max_batch or max(sizes), 2 * max(sizes))
    vocab = args.vocab if args.official is None else 256
    try:
        pid = None if proc is None else proc.pid
        rows = []
        for n in sizes:
            # A short burst first compiles the prefill of this many rows at once.
            _load(args, url, n, vocab, requests=1, new_tokens=2)
            rows.append(_load(args, url, n, vocab, pid))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    base = {} if args.no_generator or pth is None else _generator_rows(args, pth, sizes)
    print(f"\nprompt {args.prompt_len} tokens, {args.new_tokens} new, decode_block "
          f"{args.decode_block}, max_batch {args.max_batch or max(sizes)}, {args.workers} client "
          f"processes")
    print("| clients | requests | server tok/s | Generator.generate tok/s (batch = clients) | "
          "server / Generator | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
          "client CPU (busiest process) | server CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = base.get(r["clients"])
        gen, ratio = ("-", "-") if g is None else (f"{g:.0f}", f"{r['tok_s'] / g:.0%}")
        print(f"| {r['clients']} | {r['requests']} | {r['tok_s']:.0f} | {gen} | {ratio} | "
              f"{r['ttft50']:.1f} | {r['ttft99']:.1f} | {r['itl50']:.2f} | {r['itl99']:.2f} | "
              f"{r['client_cpu']:.0%} | {r['server_cpu']:.0%} |")

if __name__ == "__main__":
    main()
