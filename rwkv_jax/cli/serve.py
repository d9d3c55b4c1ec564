"""Serve a model over OpenAI's HTTP API with continuous batching (rwkv_jax.server).

`rwkv-serve` and `python serve.py` run this; for example:
    python serve.py --run_dir runs/tiny                                  # http://127.0.0.1:8000
    python serve.py --official RWKV-x070-World-0.1B.pth --max_batch 32 --api_key secret
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "To be", "max_tokens": 20, "temperature": 0}'

Weights are named as infer.py names them (--run_dir/--step, --official, --tokenizer, --bf16,
--state). Bad flags or weights get one line on stderr and exit status 2, before anything
compiles. SIGTERM stops admitting requests, lets those in flight finish within --grace seconds
and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from rwkv_jax.cli.weights import (
    InputError,
    add_weight_args,
    load_model,
    load_tokenizer,
    start_state,
)

_MISSING = 'serve: the server needs fastapi and uvicorn: pip install -e ".[serve]"'


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_weight_args(p)
    p.add_argument("--state", default=None, metavar="FILE",
                   help="every request starts from the initial state in this state file")
    net = p.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="where to listen (default: this machine only)")
    net.add_argument("--port", type=int, default=8000)
    net.add_argument("--api_key", default=os.environ.get("RWKV_API_KEY"),
                     help="require 'Authorization: Bearer KEY' on /v1/* (default: $RWKV_API_KEY)")
    net.add_argument("--model_name", default=None,
                     help="the model's id in /v1/models (default: the weights' file or run name)")
    net.add_argument("--request_timeout", type=float, default=600.0,
                     help="seconds a request may take, queue included")
    net.add_argument("--idle_timeout", type=float, default=5.0,
                     help="seconds an idle keep-alive connection stays open")
    net.add_argument("--grace", type=float, default=30.0,
                     help="seconds SIGTERM waits for requests in flight")
    eng = p.add_argument_group("engine")
    eng.add_argument("--max_batch", type=int, default=8, help="state slots: requests decoded together")
    eng.add_argument("--max_queue", type=int, default=64,
                     help="requests waiting for a slot; more get HTTP 429")
    eng.add_argument("--max_prompt_tokens", type=int, default=4096)
    eng.add_argument("--max_tokens_cap", type=int, default=2048,
                     help="the largest max_tokens a request may ask for")
    eng.add_argument("--max_n", type=int, default=16, help="the largest n a request may ask for")
    eng.add_argument("--prefill_chunk", type=int, default=256,
                     help="prompt tokens prefilled per engine turn: a long prompt stalls the "
                          "others for at most this many")
    eng.add_argument("--prefill_rows", type=int, default=8,
                     help="requests prefilled together in one call (more take several calls)")
    eng.add_argument("--decode_block", type=int, default=8,
                     help="decode steps per device call (text streams out this many at a time)")
    eng.add_argument("--prefix_cache_mb", type=float, default=64.0,
                     help="MiB of prompt-prefix states kept (0: none)")
    eng.add_argument("--session_mb", type=float, default=16.0,
                     help="MiB of session tokens kept for requests with session / state_id "
                          "(0: sessions off)")
    eng.add_argument("--session_ttl", type=float, default=3600.0,
                     help="seconds an unused session is kept")
    return p


def _check_args(args) -> None:
    for name in ("max_batch", "max_queue", "max_prompt_tokens", "max_tokens_cap", "max_n",
                 "prefill_chunk", "prefill_rows", "decode_block"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name}={getattr(args, name)}: must be >= 1")
    for name in ("request_timeout", "idle_timeout", "grace", "prefix_cache_mb", "session_mb",
                 "session_ttl"):
        if not getattr(args, name) >= 0:
            raise InputError(f"--{name}={getattr(args, name)}: must be >= 0")
    if not 0 <= args.port < 65536:
        raise InputError(f"--port={args.port}: must be from 0 to 65535")


def _engine(args):
    """The model loaded, its Engine started and compiled (a request of one token)."""
    import queue

    from rwkv_jax.generate.generator import Generator
    from rwkv_jax.generate.sampling import Sampling
    from rwkv_jax.io.state_file import state_tree
    from rwkv_jax.server.engine import Engine, Request

    config, params, tokenizer_name, _ = load_model(args)
    tokenizer = load_tokenizer(args, config, tokenizer_name)
    start = start_state(args, config)
    gen = Generator(config, params, tokenizer, prefill_chunk=args.prefill_chunk, bf16=args.bf16,
                    decode_block=args.decode_block)
    del params
    # The World vocabulary's 0 ends a text (whether its tokenizer is named or a --hf folder's).
    stop_tokens = (0,) if tokenizer_name == "world" or config.vocab_size == 65536 else ()
    engine = Engine(gen, max_batch=args.max_batch, max_queue=args.max_queue,
                    prefill_rows=args.prefill_rows,
                    start_state=None if start is None else state_tree(config, start, 1),
                    stop_tokens=stop_tokens, prefix_cache_bytes=int(args.prefix_cache_mb * 2**20))
    t = time.perf_counter()
    engine.compile()
    engine.start()
    done = queue.Queue()
    # A request's other steps (its slot's start, install, both sampling paths); kept out of
    # the prefix cache and the metrics.
    warm = Request(prompt=[1] * 3, max_tokens=2, seed=0, stop=[],
                   sampling=Sampling(temperature=0.5), emit=done.put)
    engine.submit(warm)
    try:
        while not done.get(timeout=900).finish_reason:
            pass
    except queue.Empty:
        engine.stop()
        raise InputError("the warm-up request did not finish in 900 s") from None
    engine.reset_stats()
    print(f"serve: compiled in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return engine


def _model_name(args) -> str:
    if args.model_name:
        return args.model_name
    path = args.official or args.hf or args.run_dir
    return os.path.basename(os.path.normpath(path)).removesuffix(".pth")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        print(_MISSING, file=sys.stderr)
        return 2
    from rwkv_jax.server.app import create_app
    from rwkv_jax.server.protocol import Limits
    from rwkv_jax.server.sessions import Sessions

    try:
        _check_args(args)
        engine = _engine(args)
    except InputError as e:
        print(f"serve: {e}", file=sys.stderr)
        return 2
    sessions = Sessions(args.session_ttl, int(args.session_mb * 2**20)) if args.session_mb \
        else None
    app = create_app(engine, model_name=_model_name(args), api_key=args.api_key,
                     request_timeout=args.request_timeout, sessions=sessions,
                     limits=Limits(args.max_prompt_tokens, args.max_tokens_cap, args.max_n))

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            engine.draining = True  # new requests get 503 while those in flight finish
            await super().shutdown(sockets)

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                   timeout_keep_alive=args.idle_timeout,
                                   timeout_graceful_shutdown=args.grace))
    # uvicorn raises the signal again once it has shut down; ours then ends the program with
    # status 0 rather than the signal's default (killed by SIGTERM).
    signal.signal(signal.SIGTERM, lambda *_: None)
    print(f"serve: http://{args.host}:{args.port}/v1 ({_model_name(args)}, "
          f"{args.max_batch} slots)", file=sys.stderr, flush=True)
    sys.setswitchinterval(5e-4)  # the event loop gets the GIL often while the engine computes
    server.run()
    engine.stop()
    return 0


def run() -> None:
    """The `rwkv-serve` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
