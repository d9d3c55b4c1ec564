"""The FastAPI app: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, /health and
/metrics (Prometheus text), over an Engine.

Each HTTP request becomes one engine request per prompt and sample (n), whose Events come back
from the engine thread into an asyncio queue. Streaming is OpenAI's server-sent events
(`data: {json}\\n\\n` chunks, then `data: [DONE]`). A client that goes away cancels its engine
requests, which leave their slots at the engine's next turn (within one decode block).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from rwkv_jax.server import protocol
from rwkv_jax.server.engine import Draining, Engine, Event, QueueFull
from rwkv_jax.server.engine import Request as EngineRequest
from rwkv_jax.server.protocol import APIError, Limits, Parsed
from rwkv_jax.server.sessions import Sessions


def create_app(engine: Engine, *, model_name: str, limits: Limits, api_key: str | None = None,
               request_timeout: float = 600.0, sessions: Sessions | None = None) -> FastAPI:
    app = FastAPI(title="rwkv_jax", docs_url=None, redoc_url=None)
    tokenizer, vocab = engine.gen.tokenizer, engine.config.vocab_size
    started = protocol.now()
    mail = _Mailbox()

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """--api_key on /v1/* (OpenAI's 401 body without it)."""
        if (api_key and request.url.path.startswith("/v1/")
                and request.headers.get("authorization", "") != f"Bearer {api_key}"):
            return _error(APIError("invalid or missing API key (Authorization: Bearer ...)",
                                   status=401, code="invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "draining" if engine.draining else "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": started, "owned_by": "rwkv_jax"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus(engine.snapshot()),
                                 media_type="text/plain; version=0.0.4")

    async def complete(request: Request, chat: bool):
        try:
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError) as e:
                raise APIError(f"the body is not valid JSON: {e}") from None
            parsed = protocol.parse(body, chat, tokenizer, vocab, limits)
            parsed.model = parsed.model or model_name
            _resume(parsed, sessions, limits)
            queue: asyncio.Queue = asyncio.Queue()
            reqs = _submit(engine, mail, parsed, queue, time.monotonic() + request_timeout)
        except APIError as e:
            return _error(e)
        if parsed.stream:
            return StreamingResponse(_stream(parsed, reqs, queue, tokenizer, sessions),
                                     media_type="text/event-stream")
        return await _whole(request, parsed, reqs, queue, tokenizer, sessions)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return app


def _resume(p: Parsed, sessions: Sessions | None, limits: Limits) -> None:
    """A session's tokens before the prompt of a request that continues it (state_id); an id
    for a request that starts one."""
    if not p.session:
        return
    if sessions is None:
        raise APIError("sessions are off on this server (--session_mb 0)", "session")
    if p.state_id is None:
        p.state_id = sessions.put([])
        return
    history = sessions.get(p.state_id)
    if history is None:
        raise APIError(f"state_id {p.state_id!r} is unknown or has expired", "state_id",
                       code="state_not_found")
    p.prompts[0] = history + p.prompts[0]
    p.cache_at[0] = (len(history), *(len(history) + n for n in p.cache_at[0]))
    if len(p.prompts[0]) > limits.max_prompt_tokens:
        raise APIError(f"the session is {len(p.prompts[0])} tokens with this prompt; this server "
                       f"takes at most {limits.max_prompt_tokens} (--max_prompt_tokens): start "
                       f"a new one", "state_id")


def _keep(p: Parsed, sessions: Sessions | None, tokenizer, reply: str) -> None:
    """The session after this turn: its prompt and the reply's text."""
    if p.session and sessions is not None:
        sessions.put(p.prompts[0] + (tokenizer.encode(reply) if reply else []), p.state_id)


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class _Mailbox:
    """Events from the engine thread into the event loop's queues, one wake-up of the loop for
    all that a decode block sends (call_soon_threadsafe for each writes to the loop's pipe and
    wakes it: 128 times a block at 128 requests)."""

    def __init__(self):
        self._loop, self._lock, self._items = None, threading.Lock(), []

    def bind(self) -> _Mailbox:
        """Deliver on the running loop (the server's one; called from it)."""
        self._loop = asyncio.get_running_loop()
        return self

    def post(self, queue: asyncio.Queue, item) -> None:
        with self._lock:
            self._items.append((queue, item))
            first = len(self._items) == 1
        if first:
            self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


def _submit(engine: Engine, mail: _Mailbox, p: Parsed, queue: asyncio.Queue,
            deadline: float) -> list:
    """One engine request per prompt and sample; all or none are queued."""
    mail.bind()
    reqs = []
    for i, (prompt, cache_at) in enumerate((pr, c) for pr, c in zip(p.prompts, p.cache_at)
                                           for _ in range(p.n)):
        def emit(event: Event, i=i):
            mail.post(queue, (i, event))

        reqs.append(EngineRequest(prompt=prompt, max_tokens=p.max_tokens, sampling=p.sampling,
                                  seed=(p.seed + i) % 2**63, stop=p.stop, emit=emit,
                                  deadline=deadline, cache_at=cache_at,
                                  score_top=p.top_logprobs if _scored(p) else -1))
    try:
        for r in reqs:
            engine.submit(r)
    except QueueFull as e:
        for r in reqs:
            r.cancel()
        raise APIError(str(e), status=429, kind="rate_limit_error", code="queue_full") from None
    except Draining as e:
        for r in reqs:
            r.cancel()
        raise APIError(str(e), status=503, kind="server_error", code="draining") from None
    return reqs


_FAILED = {"timeout": (504, "the request ran past --request_timeout"),
           "error": (500, "the engine failed on this request (the server log says why)"),
           "cancelled": (503, "the server stopped before the request finished")}


def _token_texts(tokenizer, tokens: list[int]) -> list[str]:
    texts = []
    for t in tokens:
        try:
            raw = tokenizer.decode_bytes([t]) if hasattr(tokenizer, "decode_bytes") else \
                tokenizer.decode([t]).encode()
        except (KeyError, IndexError, ValueError):
            raw = b""
        texts.append(raw.decode("utf-8", errors="replace"))
    return texts


def _scored(p: Parsed) -> bool:
    """Whether the log-probabilities come from scoring the whole text when it ends."""
    return p.echo or p.top_logprobs > 0


def _first_of_each(texts: list[str], lps: list[float]) -> dict:
    """{text: log-probability}, best first; tokens of one text (bytes that are not UTF-8 on
    their own) keep the best one's."""
    out = {}
    for t, lp in zip(texts, lps):
        out.setdefault(t, lp)
    return out


def _scored_block(p: Parsed, tokenizer, scored: tuple, prompt_len: int) -> dict:
    """The completions' logprobs from Engine's scoring: the prompt's tokens too with echo (the
    first has no log-probability: nothing comes before it), the top alternatives with k > 0."""
    tokens, picked, top_ids, top_lp = scored
    lps = [None, *picked.tolist()]
    top = None
    if p.top_logprobs:
        top = [None] + [_first_of_each(_token_texts(tokenizer, ids), lp)
                        for ids, lp in zip(top_ids.tolist(), top_lp.tolist())]
    a = 0 if p.echo else prompt_len
    return protocol.logprobs_block(False, _token_texts(tokenizer, tokens[a:]), lps[a:], 0,
                                   top[a:] if top else None)


async def _whole(request: Request, p: Parsed, reqs: list, queue: asyncio.Queue, tokenizer,
                 sessions: Sessions | None):
    """A non-streaming response, once every choice has ended."""
    n = len(reqs)
    texts, reasons = [""] * n, [None] * n
    toks, lps = [[] for _ in range(n)], [[] for _ in range(n)]
    scored = [None] * n
    prompt_tokens = completion_tokens = 0
    try:
        while None in reasons:
            try:
                i, ev = await asyncio.wait_for(queue.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)
                continue
            texts[i] += ev.text
            toks[i] += ev.tokens
            lps[i] += ev.logprobs
            if ev.finish_reason:
                reasons[i], scored[i] = ev.finish_reason, ev.scored
                prompt_tokens += ev.prompt_tokens
                completion_tokens += ev.completion_tokens
    finally:
        for r in reqs:
            r.cancel()
    failed = next((r for r in reasons if r in _FAILED), None)
    if failed:
        status, message = _FAILED[failed]
        return _error(APIError(message, status=status, kind="server_error", code=failed))
    _keep(p, sessions, tokenizer, texts[0])
    if p.echo:
        texts = [tokenizer.decode(r.prompt) + t for r, t in zip(reqs, texts)]
    if _scored(p):
        blocks = [_scored_block(p, tokenizer, scored[i], len(reqs[i].prompt)) for i in range(n)]
    else:
        blocks = [protocol.logprobs_block(p.chat, _token_texts(tokenizer, toks[i]), lps[i], 0)
                  if p.logprobs else None for i in range(n)]
    choices = [protocol.choice(p.chat, i, texts[i], reasons[i], blocks[i]) for i in range(n)]
    body = protocol.envelope(p.chat, protocol.new_id(p.chat), p.model, protocol.now(), choices,
                             use=protocol.usage(prompt_tokens // p.n, completion_tokens))
    if p.session:
        body["state_id"] = p.state_id
    return body


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _stream(p: Parsed, reqs: list, queue: asyncio.Queue, tokenizer,
                  sessions: Sessions | None):
    """OpenAI's chunks as server-sent events; leaving early (a client gone) cancels the rest."""
    rid, created, n = protocol.new_id(p.chat), protocol.now(), len(reqs)
    extra = {"state_id": p.state_id} if p.session else {}
    chunk = lambda choices, use=None: _sse({**protocol.envelope(
        p.chat, rid, p.model, created, choices, chunk=True, use=use), **extra})
    reply = ""
    offsets, left = [0] * n, set(range(n))
    prompt_tokens = completion_tokens = 0
    try:
        if p.chat:  # OpenAI's first chunk of each choice names the role
            for i in range(n):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
        while left:
            i, ev = await queue.get()
            if ev.finish_reason in _FAILED:
                status, message = _FAILED[ev.finish_reason]
                yield _sse(APIError(message, status=status, kind="server_error",
                                    code=ev.finish_reason).body())
                left.discard(i)
                continue
            lp = None
            if p.logprobs and ev.tokens:
                lp = protocol.logprobs_block(p.chat, _token_texts(tokenizer, ev.tokens),
                                             ev.logprobs, offsets[i])
            offsets[i] += len(ev.text)
            reply += ev.text if i == 0 else ""
            if ev.text or lp:
                yield chunk([protocol.choice(p.chat, i, ev.text, None, lp, chunk=True)])
            if ev.finish_reason:
                left.discard(i)
                prompt_tokens += ev.prompt_tokens
                completion_tokens += ev.completion_tokens
                if i == 0:
                    _keep(p, sessions, tokenizer, reply)
                yield chunk([protocol.choice(p.chat, i, "", ev.finish_reason, chunk=True)])
        if p.include_usage:
            yield chunk([], use=protocol.usage(prompt_tokens // p.n, completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        for r in reqs:
            r.cancel()


def _prometheus(s: dict) -> str:
    """The engine's numbers in Prometheus' text format (a handful of counters and gauges)."""
    finished = {k.removeprefix("finished_"): v for k, v in s.items() if k.startswith("finished_")}
    lines = []

    def metric(name, kind, help_, samples):
        lines.extend([f"# HELP rwkv_{name} {help_}", f"# TYPE rwkv_{name} {kind}"])
        lines.extend(f"rwkv_{name}{labels} {value}" for labels, value in samples)

    metric("requests_submitted_total", "counter", "requests queued",
           [("", s.get("submitted", 0))])
    metric("requests_rejected_total", "counter", "requests refused with 429 (queue full)",
           [("", s.get("rejected", 0))])
    metric("requests_finished_total", "counter", "requests ended, by reason",
           [(f'{{reason="{k}"}}', v) for k, v in sorted(finished.items())])
    metric("queue_length", "gauge", "requests waiting for a slot", [("", s["queue"])])
    metric("requests_prefilling", "gauge", "requests in their prefill", [("", s["prefilling"])])
    metric("slots_busy", "gauge", "state slots holding a request", [("", s["busy"])])
    metric("slots_total", "gauge", "state slots (--max_batch)", [("", s["slots"])])
    metric("prompt_tokens_total", "counter", "prompt tokens prefilled",
           [("", s.get("prompt_tokens", 0))])
    metric("generation_tokens_total", "counter", "tokens generated",
           [("", s.get("completion_tokens", 0))])
    metric("generation_tokens_per_second", "gauge", "tokens generated per second, last 10 s",
           [("", s["tokens_per_s"])])
    metric("prompt_tokens_prefilled_total", "counter",
           "prompt tokens run through the model (the rest came from the prefix cache)",
           [("", s.get("prefilled_tokens", 0))])
    metric("prefix_cache_hits_total", "counter", "requests that started from a cached prefix",
           [("", s["cache_hits"])])
    metric("prefix_cache_bytes", "gauge", "bytes of states in the prefix cache",
           [("", s["cache_bytes"])])
    return "\n".join(lines) + "\n"
