"""OpenAI's API as this server speaks it: request bodies checked field by field (one APIError,
an HTTP 400 with OpenAI's error body, naming the bad field and what would be valid), prompts
rendered and tokenized, and the response and stream-chunk shapes. Plain Python.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time

from rwkv_jax.data.jsonl import TURN_SEPARATOR, render_chat
from rwkv_jax.generate.sampling import Sampling
from rwkv_jax.generate.text import encode_prompt


class APIError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = (
            message, param, status, kind, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclasses.dataclass
class Limits:
    max_prompt_tokens: int = 4096
    max_tokens_cap: int = 2048
    max_n: int = 16


@dataclasses.dataclass
class Parsed:
    """A checked request: one engine request per prompt and sample."""

    chat: bool
    model: str
    prompts: list[list[int]]
    cache_at: list[tuple[int, ...]]  # per prompt: lengths whose states the prefix cache keeps
    n: int
    max_tokens: int
    sampling: Sampling
    seed: int
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: bool
    echo: bool = False  # the prompt's tokens come first in text and logprobs
    top_logprobs: int = 0  # the k most likely tokens at each position (completions' logprobs=k)
    session: bool = False  # the response names a state_id to continue from
    state_id: str | None = None  # continue this session (its text comes before this prompt)


# Fields users send that this server does not do: a 400 names them rather than ignoring them.
_UNSUPPORTED = {"suffix", "logit_bias", "tools", "tool_choice", "functions", "function_call",
                "parallel_tool_calls", "audio", "modalities", "prediction", "store", "metadata",
                "service_tier", "reasoning_effort", "web_search_options"}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n",
           "presence_penalty", "frequency_penalty", "penalty_decay", "stream", "stream_options",
           "user", "logprobs", "session", "state_id"}
_COMPLETION = _COMMON | {"prompt", "echo", "best_of"}
_CHAT = _COMMON | {"messages", "top_logprobs", "max_completion_tokens", "response_format"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _get(body, name, kind, default, check=None, valid=""):
    """body[name] if it is of `kind` ("int", "number", "bool", "str") and passes `check`."""
    v = body.get(name)
    if v is None:
        return default
    ok = {"int": _is_int(v), "number": (_is_int(v) or isinstance(v, float)) and math.isfinite(v),
          "bool": isinstance(v, bool), "str": isinstance(v, str)}[kind]
    if not ok:
        raise APIError(f"{name}={v!r} is not {'an' if kind == 'int' else 'a'} {kind}", name)
    if check is not None and not check(v):
        raise APIError(f"{name}={v!r} is invalid: {valid}", name)
    return v


def parse(body, chat: bool, tokenizer, vocab_size: int, limits: Limits) -> Parsed:
    """The request, checked; APIError for the first thing wrong with it."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    known = _CHAT if chat else _COMPLETION
    for name in body:
        if name in _UNSUPPORTED:
            raise APIError(f"{name} is not supported by this server", name)
        if name not in known:
            raise APIError(f"unrecognized request argument: {name}", name)
    state_id = _get(body, "state_id", "str", None)
    session = _get(body, "session", "bool", False) or state_id is not None
    if chat:
        prompts, cache_at = _chat_prompt(body.get("messages"), tokenizer, vocab_size,
                                         continuing=state_id is not None)
        fmt = body.get("response_format")
        if fmt is not None and fmt != {"type": "text"}:
            raise APIError("response_format: only {\"type\": \"text\"} is supported",
                           "response_format")
    else:
        prompts, cache_at = _completion_prompts(body.get("prompt"), tokenizer, vocab_size)
    for p in prompts:
        if len(p) > limits.max_prompt_tokens:
            raise APIError(f"the prompt is {len(p)} tokens; this server takes at most "
                           f"{limits.max_prompt_tokens} (--max_prompt_tokens)", "prompt")
    seed = _get(body, "seed", "int", None, lambda s: -2**63 <= s < 2**63, "must fit in 64 bits")
    n = _get(body, "n", "int", 1, lambda n: 1 <= n <= limits.max_n,
             f"must be from 1 to {limits.max_n}")
    if session and (n > 1 or len(prompts) > 1):
        raise APIError("a session (session, state_id) takes one prompt and n = 1",
                       "state_id" if state_id else "session")
    stream = _get(body, "stream", "bool", False)
    logprobs, top, echo = _logprobs(body, chat, stream)
    return Parsed(chat=chat, model=_get(body, "model", "str", ""), prompts=prompts,
                  cache_at=cache_at, n=n, max_tokens=_max_tokens(body, chat, limits, echo),
                  sampling=_sampling(body),
                  seed=secrets.randbits(63) if seed is None else seed,
                  stop=_stop(body.get("stop")) + ([TURN_SEPARATOR] if chat else []),
                  stream=stream, include_usage=_usage(body), logprobs=logprobs, echo=echo,
                  top_logprobs=top, session=session, state_id=state_id)


def _max_tokens(body, chat: bool, limits: Limits, echo: bool = False) -> int:
    cap, least = limits.max_tokens_cap, 0 if echo else 1  # echo with 0: score the prompt only
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    # OpenAI's defaults: 16 for completions, as many as fit for chat.
    return _get(body, name, "int", cap if chat else min(16, cap), lambda v: least <= v <= cap,
                f"must be from {least} to {cap} (--max_tokens_cap)")


def _sampling(body) -> Sampling:
    num = lambda name, default, lo, hi: _get(
        body, name, "number", default, lambda v: lo <= v <= hi, f"must be from {lo} to {hi}")
    return Sampling(temperature=float(num("temperature", 1.0, 0, 2)),
                    top_p=float(num("top_p", 1.0, 0, 1)),
                    top_k=_get(body, "top_k", "int", 0, lambda v: v >= 0, "must be >= 0 (0: no limit)"),
                    presence_penalty=float(num("presence_penalty", 0.0, -2, 2)),
                    frequency_penalty=float(num("frequency_penalty", 0.0, -2, 2)),
                    penalty_decay=float(_get(body, "penalty_decay", "number", 1.0,
                                             lambda v: 0 < v <= 1, "must be in (0, 1]")))


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)
            and len(stops) <= 16):
        raise APIError("stop must be a non-empty string or a list of at most 16 of them", "stop")
    return stops


def _usage(body) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
        raise APIError("stream_options takes only {\"include_usage\": bool}", "stream_options")
    return bool(_get(opts, "include_usage", "bool", False))


MAX_TOP_LOGPROBS = 5  # OpenAI's limit for the completions' logprobs


def _logprobs(body, chat: bool, stream: bool) -> tuple[bool, int, bool]:
    """(logprobs wanted, top alternatives k, echo). Chat: each chosen token's log-probability
    only. Completions: logprobs=k gives the k most likely tokens at each position too, and
    echo the prompt's tokens first, both computed by one pass over the whole text when the
    request ends, so not streamed."""
    if chat:
        if _get(body, "top_logprobs", "int", 0):
            raise APIError("top_logprobs > 0 is not supported (logprobs: true gives each chosen "
                           "token's)", "top_logprobs")
        return _get(body, "logprobs", "bool", False), 0, False
    if _get(body, "best_of", "int", 1) != 1:
        raise APIError("best_of other than 1 is not supported (n is)", "best_of")
    lp = _get(body, "logprobs", "int", None, lambda v: 0 <= v <= MAX_TOP_LOGPROBS,
              f"must be from 0 to {MAX_TOP_LOGPROBS}")
    echo = _get(body, "echo", "bool", False)
    if stream and (echo or lp):
        raise APIError(f"{'echo' if echo else 'logprobs > 0'} is not supported with stream: "
                       "the log-probabilities come from one pass when the request ends",
                       "echo" if echo else "logprobs")
    return lp is not None, lp or 0, echo


def _encode(tokenizer, prompt, vocab_size: int, param: str) -> list[int]:
    try:
        return encode_prompt(tokenizer, prompt, vocab_size)
    except (ValueError, TypeError) as e:
        raise APIError(f"{param}: {e}", param) from None


def _completion_prompts(prompt, tokenizer, vocab_size):
    if prompt is None:
        raise APIError("prompt is required", "prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and _is_int(prompt[0])):
        prompt = [prompt]
    if not (isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and all(_is_int(t) for t in p))
            for p in prompt)):
        raise APIError("prompt must be a string, a list of token ids, or a non-empty list of "
                       "either", "prompt")
    rows = [_encode(tokenizer, p, vocab_size, "prompt") for p in prompt]
    return rows, [()] * len(rows)


def _chat_prompt(messages, tokenizer, vocab_size, continuing: bool = False):
    """The chat rendered as RWKV's chat models read it, ending with "Assistant:"; the prefix
    cache keeps the state after each earlier turn (a system prompt, a conversation so far).
    continuing: the messages follow a session's last reply (a turn separator first)."""
    if not (isinstance(messages, list) and messages):
        raise APIError("messages must be a non-empty list of {role, content}", "messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise APIError(f"messages[{i}] must be an object with role and content", "messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: text ones only
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise APIError(f"messages[{i}].content: only text parts are supported",
                               "messages")
            content = "".join(p["text"] for p in content)
        if m["role"] == "developer":
            m = {**m, "role": "system"}
        turns.append({"role": m["role"], "content": content})
    lead = TURN_SEPARATOR if continuing else ""
    try:
        text = lead + render_chat(turns) + TURN_SEPARATOR + "Assistant:"
        prefixes = [lead + render_chat(turns[:i]) + TURN_SEPARATOR for i in range(1, len(turns))]
    except ValueError as e:
        raise APIError(f"messages: {e}", "messages") from None
    ids = _encode(tokenizer, text, vocab_size, "messages")
    cache_at = []
    for p in prefixes:  # only where the prefix's tokens are the chat's first tokens
        n = len(tokenizer.encode(p))
        if n < len(ids) and tokenizer.encode(p) == ids[:n]:
            cache_at.append(n)
    return [ids], [tuple(cache_at)]


# ---------------------------------------------------------------- responses


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprobs_block(chat: bool, tokens: list[str], logprobs: list, offset: int,
                   top: list | None = None) -> dict:
    """OpenAI's logprobs object; top: per token, {token text: log-probability} or None."""
    if chat:
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                             "top_logprobs": []} for t, lp in zip(tokens, logprobs)]}
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top,
            "text_offset": offsets}


def choice(chat: bool, index: int, text: str, finish_reason, logprobs=None,
           chunk: bool = False) -> dict:
    if not chat:
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}
    body = {"index": index, "logprobs": logprobs, "finish_reason": finish_reason}
    if chunk:
        body["delta"] = {"content": text} if text else {}
    else:
        body["message"] = {"role": "assistant", "content": text}
    return body


def envelope(chat: bool, rid: str, model: str, created: int, choices: list[dict],
             chunk: bool = False, use: dict | None = None) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    out = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if use is not None or not chunk:
        out["usage"] = use
    return out


def now() -> int:
    return int(time.time())
