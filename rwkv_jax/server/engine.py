"""The engine: one thread that owns the device and serves every request through a fixed set of
state slots (continuous batching).

Each turn of the loop (1) frees the slots of finished, cancelled or timed-out requests, (2) moves
waiting requests into free slots (their state: the start state, or the longest cached prefix of
the prompt), (3) advances every prefilling request by up to `prefill_chunk` tokens, requests
with pieces of one length in one call, so that a long prompt stalls the others for at most one
chunk a turn, (4) starts the fully prefilled ones and (5) runs one decode block
(rwkv_jax.generate.slots) that advances every live slot. A request's state is fixed-size, so
joining or leaving between blocks costs nothing but a row copy. Prefill goes as Generator's
does (all but the last prompt token in Generator.pieces, the last token through the first
decode step), so a greedy request's text is Generator.generate's for the same prompt (on a GPU,
up to the last bits of products of other batch sizes).

A request that asks for the whole text's log-probabilities (echo, or logprobs=k alternatives)
is scored when it ends, on this thread, by one more pass over its prompt and generated tokens
(Generator.token_logprobs, from the same start state); with max_tokens 0 it takes no slot.

The HTTP side (app.py) talks to the engine through `submit` and each request's `emit` callback,
which the engine calls from its thread with Events.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from functools import partial

import jax
import numpy as np

from rwkv_jax.generate.generator import Generator
from rwkv_jax.generate.sampling import Sampling
from rwkv_jax.generate.slots import (
    empty_carry,
    get_row,
    install,
    set_row,
    slots_block,
)
from rwkv_jax.generate.slots import (
    prefill_rows as prefill_slot_rows,
)
from rwkv_jax.generate.text import TextTail
from rwkv_jax.server.prefix_cache import PrefixCache

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The bounded queue of waiting requests is full (HTTP 429)."""


class Draining(Exception):
    """The server is shutting down and admits no new request (HTTP 503)."""


@dataclasses.dataclass
class Event:
    """What the engine tells a request: new text (with its tokens), or the end."""

    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled", "timeout", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # A scored request's last event: (its tokens, then for tokens 1.. their log-probabilities,
    # the top ids and the top log-probabilities), Generator.token_logprobs' arrays.
    scored: tuple | None = None


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]  # token ids, checked against the vocabulary
    max_tokens: int
    sampling: Sampling
    seed: int
    stop: list[str]
    emit: Callable[[Event], None]  # called from the engine thread
    deadline: float = float("inf")  # time.monotonic() after which the request is dropped
    cache_at: tuple[int, ...] = ()  # prompt lengths whose states the prefix cache keeps
    score_top: int = -1  # >= 0: score the whole text when it ends, with this many alternatives
    cancelled: bool = False  # set by the HTTP side (a client that went away)
    done: bool = False  # ended (set by the engine)
    # The engine's own:
    slot: int = -1
    fed: int = 0  # prompt tokens prefilled
    tail: TextTail | None = None
    made: int = 0
    out: list[int] = dataclasses.field(default_factory=list)  # generated ids, a stop token too
    submitted: float = 0.0

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """Continuous batching over `max_batch` slots of a Generator's model."""

    def __init__(self, generator: Generator, *, max_batch: int = 8, max_queue: int = 64,
                 prefill_rows: int = 8, start_state: dict | None = None, stop_tokens=(),
                 prefix_cache_bytes: int = 0):
        self.gen, self.max_batch, self.max_queue = generator, max_batch, max_queue
        self.prefill_rows = min(prefill_rows, max_batch)
        self.config = generator.config
        self.stop_tokens = {int(t) for t in stop_tokens}
        self.cache = PrefixCache(prefix_cache_bytes)
        B, K = max_batch, generator.decode_block
        stop_ids = np.full(max(1, len(self.stop_tokens)), -1, np.int32)
        stop_ids[: len(self.stop_tokens)] = sorted(self.stop_tokens)
        self._consts = jax.device_put((stop_ids, generator.count_weights()))
        self._block = jax.jit(partial(slots_block, generator.forward, generator.layout,
                                      generator.decode_rows, K), static_argnums=(0,),
                              donate_argnums=(2,))
        self._install = jax.jit(install, donate_argnums=(0,))
        self._set_row = jax.jit(set_row, donate_argnums=(0,))
        self._get_row = jax.jit(get_row)
        self._prefill_rows = jax.jit(partial(prefill_slot_rows, generator.forward, generator.layout),
                                     donate_argnums=(1,))
        self._start_row = generator.start_flat(1, start_state)
        self._start_state = start_state
        keys = np.zeros((B, self._key_data(0).shape[0]), np.uint32)
        self.carry = jax.jit(empty_carry, static_argnums=(2,))(
            generator.start_flat(B), keys, self.config.vocab_size)
        # Each slot's request and settings, on the host; sent with every block.
        self.slots: list[Request | None] = [None] * B
        self.live = np.zeros(B, bool)
        self.greedy = np.ones(B, bool)
        self.knobs = np.tile(Sampling().knobs(), (B, 1))
        self.top_k = np.zeros(B, np.int32)
        self._waiting: collections.deque[Request] = collections.deque()
        self._pending: tuple | None = None  # the block queued on the device, not yet read
        self._prefilling: list[Request] = []
        self._cv = threading.Condition()
        self._stopping = False
        self.draining = False
        self._thread = threading.Thread(target=self._run, name="rwkv-engine", daemon=True)
        self.stats = collections.Counter()  # requests by outcome, tokens
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def _key_data(self, seed: int) -> np.ndarray:
        return np.asarray(jax.random.key_data(jax.random.key(seed)), np.uint32)

    # ------------------------------------------------------------------ the HTTP side's calls

    def submit(self, req: Request) -> None:
        """Queue a request; QueueFull when max_queue wait already, Draining when shutting down."""
        with self._cv:
            if self.draining or self._stopping:
                raise Draining("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max_queue "
                                f"{self.max_queue}); retry later")
            req.submitted = time.monotonic()
            self._waiting.append(req)
            self.stats["submitted"] += 1
            self._cv.notify()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the loop; requests still there end with finish_reason "cancelled"."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=60)

    def reset_stats(self) -> None:
        """Forget counts and cached prefixes (those of a warm-up request)."""
        self.stats.clear()
        self._recent.clear()
        self.cache = PrefixCache(self.cache.max_bytes)

    def snapshot(self) -> dict:
        """Numbers for /metrics."""
        now = time.monotonic()
        # list() copies in one step: the engine thread appends meanwhile.
        recent = sum(n for t, n in list(self._recent) if t > now - 10)
        return {"queue": len(self._waiting), "prefilling": len(self._prefilling),
                "busy": sum(s is not None for s in self.slots), "slots": self.max_batch,
                "tokens_per_s": recent / 10, "cache_bytes": self.cache.bytes,
                "cache_entries": len(self.cache), "cache_hits": self.cache.hits, **self.stats}

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        while True:
            with self._cv:
                if self._stopping:
                    break
                idle = not (self._waiting or self._prefilling or self.live.any()
                            or self._pending)
                if idle:
                    self._cv.wait(timeout=0.1)
            try:
                self._turn()
            except Exception:
                log.exception("engine turn failed; its requests end with an error")
                for req in [*self._prefilling, *(s for s in self.slots if s is not None)]:
                    self._finish(req, "error")
                self._prefilling.clear()
                self._pending = None
        for req in [*self._waiting, *self._prefilling, *(s for s in self.slots if s is not None)]:
            self._finish(req, "cancelled")

    def _turn(self) -> None:
        self._drop_cancelled()
        self._admit()
        self._prefill()
        # The device runs a block ahead of the host: block b + 1 is queued before block b's
        # tokens are read, so the device does not wait for this thread's Python. A request the
        # host ends (a stop string, a client gone) may have a block's tokens computed and
        # dropped; the device ends rows at their stop tokens and max_tokens itself.
        launched = self._launch() if self.live.any() else None
        if self._pending is not None:
            self._read(*self._pending)
        self._pending = launched

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        for req in [*self._waiting, *self._prefilling, *(s for s in self.slots if s is not None)]:
            if req.cancelled or now > req.deadline:
                self._finish(req, "cancelled" if req.cancelled else "timeout")

    def _admit(self) -> None:
        """Waiting requests into free slots (the lowest first), each slot's state set to the
        longest cached prefix of its prompt or the start state."""
        free = [i for i, s in enumerate(self.slots) if s is None]
        while free:
            with self._cv:
                if not self._waiting:
                    return
                req = self._waiting.popleft()
            if req.max_tokens == 0:  # echo only: scored now, no slot
                self._send(req, Event(finish_reason="length"))
                continue
            req.slot = free.pop(0)
            self.slots[req.slot] = req
            req.tail = TextTail(self.gen.tokenizer, req.stop)
            req.fed, row = self.cache.longest(req.prompt[:-1])
            self.carry = self._set_row(self.carry, np.int32(req.slot),
                                       self._start_row if row is None else row)
            self._prefilling.append(req)

    def _prefill(self) -> None:
        """Each prefilling request advances by up to prefill_chunk tokens (its next pieces),
        requests whose next pieces have one length in one call, so a long prompt stalls the
        others for at most one chunk a turn; the done ones join."""
        budget = {id(r): max(self.gen.prefill_chunk, 1) for r in self._prefilling}
        while True:
            groups = collections.defaultdict(list)
            for req in self._prefilling:
                todo = len(req.prompt) - 1
                if req.fed < todo:  # stopping at lengths whose states the cache keeps
                    upto = min([n for n in req.cache_at if n > req.fed] + [todo])
                    n = self.gen.pieces(upto - req.fed)[0]
                    if n <= budget[id(req)]:
                        groups[n].append(req)
            if not groups:
                break
            for n, same in groups.items():
                for a in range(0, len(same), self.prefill_rows):
                    self._prefill_group(n, same[a: a + self.prefill_rows])
                for r in same:
                    budget[id(r)] -= n
        for req in [r for r in self._prefilling if r.fed >= len(r.prompt) - 1]:
            self._prefilling.remove(req)
            self._join(req)

    def _prefill_group(self, n: int, reqs: list[Request]) -> None:
        """One piece of n tokens for each of reqs in one call of 1 or prefill_rows rows (padded
        with the first request's, which writes the same state twice): two shapes a length."""
        pad = [reqs[0]] * ((self.prefill_rows if len(reqs) > 1 else 1) - len(reqs))
        idx = np.asarray([r.slot for r in reqs + pad], np.int32)
        tokens = np.asarray([r.prompt[r.fed: r.fed + n] for r in reqs + pad], np.int32)
        self.carry = self._prefill_rows(self.gen.weights, self.carry, idx, tokens)
        self.stats["prefilled_tokens"] += n * len(reqs)
        for r in reqs:
            r.fed += n
            if self.cache.max_bytes and (r.fed in r.cache_at or r.fed == len(r.prompt) - 1):
                self.cache.put(r.prompt[: r.fed], self._get_row(self.carry, np.int32(r.slot)))

    def _join(self, req: Request) -> None:
        s, i = req.sampling, req.slot
        self.carry = self._install(self.carry, np.int32(i), self._key_data(req.seed),
                                   np.int32(req.prompt[-1]), np.int32(req.max_tokens))
        self.live[i], self.greedy[i] = True, s.temperature == 0
        self.knobs[i], self.top_k[i] = s.knobs(), s.top_k
        self.stats["prompt_tokens"] += len(req.prompt)

    def compile(self) -> None:
        """Compile what a request may need, so none waits for a compile: the decode block for
        every number of rows it runs (no slot is live, so none runs a step) and the prefill
        of every piece length at 1 and prefill_rows rows (on a free slot, which admission
        overwrites)."""
        n = 1
        while n <= max(self.gen.prefill_chunk, 1):
            for rows in {1, self.prefill_rows}:
                self.carry = self._prefill_rows(self.gen.weights, self.carry,
                                                np.zeros(rows, np.int32),
                                                np.zeros((rows, n), np.int32))
            n *= 2
        used = 1
        while True:
            self.carry = self._block(used, self.gen.weights, self.carry, np.zeros_like(self.live),
                                     self.greedy, self.knobs, self.top_k, *self._consts)[0]
            if used >= self.max_batch:
                break
            used = min(2 * used, self.max_batch)

    def _used(self) -> int:
        """The rows a block runs: the live slots' span, rounded up to a power of two."""
        n = int(np.flatnonzero(self.live)[-1]) + 1
        return min(1 << (n - 1).bit_length(), self.max_batch)

    def _launch(self) -> tuple:
        """Queue a decode block; (its tokens, log-probabilities, each slot's request then)."""
        used = self._used()
        self.carry, out, lps = self._block(used, self.gen.weights, self.carry,
                                           self.live.copy(), self.greedy.copy(),
                                           self.knobs.copy(), self.top_k.copy(), *self._consts)
        return out, lps, self.slots[:used]

    def _read(self, out, lps, owners: list) -> None:
        """A block's tokens to their requests (those that have not ended since it was queued)."""
        out, lps = np.asarray(out), np.asarray(lps)
        made = 0
        for i, req in enumerate(owners):
            if req is None or req.done:
                continue
            event = Event()
            for t, lp in zip(out[i].tolist(), lps[i].tolist()):
                if t < 0 or event.finish_reason:
                    break
                made += 1
                self._take(req, t, lp, event)
            if event.text or event.tokens or event.finish_reason:
                self._send(req, event)
        self.stats["completion_tokens"] += made
        now = time.monotonic()
        self._recent.append((now, made))
        while self._recent and self._recent[0][0] < now - 10:
            self._recent.popleft()

    def _take(self, req: Request, token: int, logprob: float, event: Event) -> None:
        """One generated token of a request into its event; the event ends it where it stops."""
        req.out.append(token)
        if token in self.stop_tokens:
            event.finish_reason = "stop"
            event.text += req.tail.finish()
            return
        req.made += 1
        event.tokens.append(token)
        event.logprobs.append(logprob)
        piece, hit = req.tail.push(token)
        event.text += piece
        if hit:
            event.finish_reason = "stop"
        elif req.made >= req.max_tokens:
            event.finish_reason = "length"
            event.text += req.tail.finish()

    def _send(self, req: Request, event: Event) -> None:
        if req.score_top >= 0 and event.finish_reason in ("stop", "length"):
            try:
                tokens = req.prompt + req.out
                event.scored = (tokens, *self.gen.token_logprobs(tokens, req.score_top,
                                                                 self._start_state))
            except Exception:
                log.exception("scoring a request failed")
                event.finish_reason = "error"
        if event.finish_reason:
            self._free(req, event.finish_reason)
            event.prompt_tokens, event.completion_tokens = len(req.prompt), req.made
        try:
            req.emit(event)
        except Exception:
            log.debug("emit failed", exc_info=True)

    def _finish(self, req: Request, reason: str) -> None:
        """End a request that did not end by its own tokens."""
        self._send(req, Event(finish_reason=reason))

    def _free(self, req: Request, reason: str) -> None:
        with self._cv:
            if req in self._waiting:
                self._waiting.remove(req)
        if req in self._prefilling:
            self._prefilling.remove(req)
        if req.slot >= 0 and self.slots[req.slot] is req:
            self.slots[req.slot] = None
            self.live[req.slot] = False
        req.done = True
        self.stats[f"finished_{reason}"] += 1
