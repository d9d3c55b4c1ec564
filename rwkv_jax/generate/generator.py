"""Generation: prefill in parallel, then blocks of decode steps with the sampling inside them.

    gen = Generator(config, params, tokenizer)
    out = gen.generate(["To be", "Once upon a time"], max_new_tokens=100,
                       sampling=Sampling(temperature=0.8, top_p=0.9), seed=0, stop=["\\n\\n"])
    for piece in gen.stream("To be", max_new_tokens=100):
        print(piece, end="", flush=True)
    chat = Session(gen, compression="int8")     # keeps a compressed state between calls
    chat.generate("User: hi\\n\\nBot:", max_new_tokens=50, stop=["\\n\\n"])
    gen.score(tokens, chunk_len=256)            # a text of any length, memory independent of it

Prefill: the prompts' common length but its last token runs as parallel model calls, in chunks
of `prefill_chunk` and the rest in power-of-two pieces, so prompts of any length compile at
most log2(prefill_chunk) + 1 shapes (prefill_chunk=0: one call, compiled for that length).
Decode: one jitted call runs a block of up to `decode_block` steps on the device (a while
loop), each feeding a token per row, updating the state in place (donated), sampling the next
token and advancing each row's PRNG key; the prompt's last token goes through it too, which
picks the first new token. Rows whose prompt is longer than the shortest go through the same
steps with the sampled token replaced by their next prompt token, so every row's output is the
one it would get alone (with the same seed). Stop tokens and max_new_tokens end a row on the
device, and the block ends early once every row has ended, so the host launches one call per
block rather than per token: a batch-1 step of a big model on a GPU takes milliseconds, and
launching it (hundreds of weight arrays) costs the host about as much again.

The host reads each block's tokens one block late, after queueing the next block (none past
the last block a call can need), so the device never waits for Python; stop strings and
streaming work on those tokens. Between the generator's own compiled calls the state stays flat
on the device, one array per dtype (rwkv_jax.state.FlatLayout): what a call costs the host
grows with the arrays it returns; callers get the tree. A stop string ends its row from the
next block queued on; the state a call returns has consumed every token of each row, the last
generated one included (a row that stopped early is frozen from then on), so a next call
continues from it with new text. Where a stop string ended a row in the middle of a block and
the state is kept, that row's state is recomputed from the block's start (a copy taken before
the block ran) through its last token.

Sampling follows ChatRWKV (the `rwkv` package's PIPELINE):
  1. penalties: logits[t] -= presence_penalty * [t was generated] + frequency_penalty * count[t];
     count[t] is the number of times t was generated, every count shrinking by
     `penalty_decay` per generated token, and tokens that decode to a space, tab or digits
     counting 0 (ChatRWKV's exemption; they still take the presence penalty). Prompt tokens
     are not counted.
  2. temperature 0: the argmax of the penalised logits.
  3. otherwise the candidates are the top_k most likely tokens and, within them, those whose
     probability (at temperature 1, as ChatRWKV cuts before applying its temperature) is at
     least that of the token where the cumulative probability first reaches top_p; the token
     is drawn from softmax(logits / temperature) over the candidates.
"""

from __future__ import annotations

import codecs
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax import state_codec
from rwkv_jax.config import ModelConfig
from rwkv_jax.decode_weights import DecodeWeights, decode_forward, pack_for_decode
from rwkv_jax.model import initial_state
from rwkv_jax.state import FlatLayout, state_shapes

# ChatRWKV counts a generated token 0 towards the frequency penalty when its text is a
# substring of this (a space, a tab, digits).
_UNCOUNTED = " \t0123456789"


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1: no limit
    presence_penalty: float = 0.0  # ChatRWKV alpha_presence
    frequency_penalty: float = 0.0  # ChatRWKV alpha_frequency
    penalty_decay: float = 1.0  # ChatRWKV alpha_decay (its default is 0.996)

    def __post_init__(self):
        def need(ok, field, valid):
            if not ok:
                raise ValueError(f"sampling {field}={getattr(self, field)!r} is invalid: {valid}")

        for field in ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                      "penalty_decay"):  # NaN passes every comparison below
            need(math.isfinite(getattr(self, field)), field, "must be a finite number")
        need(self.temperature >= 0, "temperature", "must be >= 0 (0: greedy)")
        need(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be an integer >= 0")
        need(0 <= self.top_p <= 1, "top_p", "must be between 0 and 1")
        need(0 < self.penalty_decay <= 1, "penalty_decay", "must be in (0, 1]")

    def spec(self, vocab_size: int) -> _Spec:
        top_k = self.top_k if 0 < self.top_k < vocab_size else 0
        return _Spec(greedy=self.temperature == 0, top_k=top_k, top_p=self.top_p < 1,
                     penalties=bool(self.presence_penalty or self.frequency_penalty))

    def knobs(self) -> np.ndarray:
        return np.asarray([max(self.temperature, 1e-6), self.top_p, self.presence_penalty,
                           self.frequency_penalty, self.penalty_decay], np.float32)


GREEDY = Sampling(temperature=0.0)
# Where each number sits in Sampling.knobs(), the array a compiled step reads them from.
_TEMPERATURE, _TOP_P, _PRESENCE, _FREQUENCY, _DECAY = range(5)


class _Spec(NamedTuple):
    """What the compiled step does (static); the numbers themselves are arguments."""

    greedy: bool
    top_k: int
    top_p: bool
    penalties: bool


class _Carry(NamedTuple):
    """Everything a decode block updates in place (donated)."""

    state: tuple  # the state as one (B, n) array per dtype (rwkv_jax.state.FlatLayout)
    keys: jax.Array  # (B, key words) uint32: each row's own PRNG key
    counts: jax.Array  # (B, V) float32 penalty counts; (B, 0) without penalties
    seen: jax.Array  # (B, V) bool: generated before; (B, 0) without penalties
    token: jax.Array | None = None  # (B,) int32: the token each row's next step feeds
    consume: jax.Array | None = None  # (B,) bool: the next step feeds it (else the row is done)
    alive: jax.Array | None = None  # (B,) bool: the row still picks tokens
    made: jax.Array | None = None  # (B,) int32: tokens generated (towards max_new_tokens)


@dataclasses.dataclass
class Generation:
    texts: list[str]
    tokens: list[list[int]]  # generated tokens per row (a stop token itself not included)
    stop_reasons: list[str]  # "length", "stop_token" or "stop_string"
    state: dict | None  # after every token of each row (keep_state=True)
    timings: dict  # prefill_s, decode_s (each with its compiles on a first call), steps, new_tokens

    @property
    def text(self) -> str:
        return self.texts[0]


# ----------------------------------------------------------------------------- jitted pieces


def _penalised(spec: _Spec, logits, carry: _Carry, knobs):
    if not spec.penalties:
        return logits
    return logits - knobs[_PRESENCE] * carry.seen - knobs[_FREQUENCY] * carry.counts


def _draw(spec: _Spec, keys, logits, knobs):
    """A token per row from the candidates top_k / top_p leave, at the temperature."""
    temperature, top_p = knobs[_TEMPERATURE], knobs[_TOP_P]
    if spec.top_k:
        vals, idx = jax.lax.top_k(logits, spec.top_k)
    elif spec.top_p:
        idx = jnp.argsort(-logits, axis=-1)
        vals = jnp.take_along_axis(logits, idx, axis=-1)
    else:
        vals, idx = logits, None
    if spec.top_p:
        probs = jnp.exp(vals - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
        reached = jnp.cumsum(probs, axis=-1) >= top_p
        last = jnp.where(jnp.any(reached, axis=-1), jnp.argmax(reached, axis=-1), vals.shape[-1] - 1)
        cutoff = jnp.take_along_axis(vals, last[:, None], axis=-1)
        vals = jnp.where(vals >= cutoff, vals, -jnp.inf)
    pairs = jax.vmap(jax.random.split)(jax.random.wrap_key_data(keys))
    choice = jax.vmap(jax.random.categorical)(pairs[:, 1], vals / temperature)
    token = choice if idx is None else jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
    return token.astype(jnp.int32), jax.random.key_data(pairs[:, 0])


def _advance(spec: _Spec, logits, carry: _Carry, forced_tok, forced_mask, knobs, weight):
    """The next token per row from its logits (B, V): sampled, or forced where forced_mask."""
    logits = _penalised(spec, logits.astype(jnp.float32), carry, knobs)
    keys, counts, seen = carry.keys, carry.counts, carry.seen
    if spec.greedy:
        sampled = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        sampled, new_keys = _draw(spec, keys, logits, knobs)
        # A forced step draws nothing, so a row's random stream does not depend on its batch.
        keys = jnp.where(forced_mask[:, None], keys, new_keys)
    if spec.penalties:
        generated = ~forced_mask
        rows = jnp.arange(logits.shape[0])
        counts = jnp.where(generated[:, None], counts * knobs[_DECAY], counts)
        counts = counts.at[rows, sampled].add(jnp.where(generated, weight[sampled], 0.0))
        seen = seen.at[rows, sampled].set(seen[rows, sampled] | generated)
    token = jnp.where(forced_mask, forced_tok, sampled)
    return token, carry._replace(keys=keys, counts=counts, seen=seen)


def _keep_rows(live, new, old):
    def pick(a, b):
        return jnp.where(live.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, new, old)


def _prefill_piece(forward, layout, weights, tokens, flat):
    _, state = forward(weights, tokens, layout.unflatten(flat), last_only=True)
    return layout.flatten(state)  # the logits are unused, so XLA drops the head


def _model_step(forward, rows, weights, state, token):
    """Logits (B, V) and the state after feeding one token per row."""
    B = token.shape[0]
    if B < rows:
        # Matrix products of a single row compile to matrix-vector forms that read the weights
        # more slowly than a small matrix product does; padding rows (discarded) cost no reads.
        grow = lambda a: jnp.concatenate([a, jnp.zeros((rows - B,) + a.shape[1:], a.dtype)])  # noqa: E731
        state, token = jax.tree.map(grow, state), grow(token)
    logits, state = forward(weights, token[:, None], state)
    if B < rows:
        logits, state = logits[:B], jax.tree.map(lambda a: a[:B], state)
    return logits[:, 0], state


def _decode_block(forward, layout, spec, rows, weights, carry: _Carry, forced_tok, forced_mask,
                  allowed, stop_ids, max_new, knobs, weight):
    """Up to K = forced_tok.shape[1] decode steps; fewer once no row has a token left to feed.

    Step s feeds each row's `carry.token` and picks the row's next token: its prompt token
    where forced_mask[:, s], else a sampled one (emitted). An emitted stop token (in stop_ids,
    padded with -1) or the max_new-th generated token ends the row: the next step feeds it,
    then the row's state stays as it is. `allowed` False ends a row now (a stop string the
    host found). Returns the carry and the emitted tokens (B, K), -1 where none was.
    """
    B, K = forced_tok.shape
    carry = carry._replace(state=layout.unflatten(carry.state), consume=carry.consume & allowed,
                           alive=carry.alive & allowed)

    def body(loop):
        s, c, out = loop
        logits, state = _model_step(forward, rows, weights, c.state, c.token)
        if B > 1:  # finished rows keep their state; one row runs only while it consumes
            # (and the select would make XLA copy the state around an in-place kernel)
            state = _keep_rows(c.consume, state, c.state)
        emitted = c.alive & ~forced_mask[:, s]
        token, c = _advance(spec, logits, c._replace(state=state), forced_tok[:, s], ~emitted,
                            knobs, weight)
        stop = jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
        made = c.made + (emitted & ~stop)
        ends = emitted & (stop | (made >= max_new))
        out = out.at[:, s].set(jnp.where(emitted, token, -1))
        c = c._replace(token=token, consume=c.alive, alive=c.alive & ~ends, made=made)
        return s + 1, c, out

    def more(loop):
        s, c, _ = loop
        return (s < K) & jnp.any(c.consume)

    _, carry, out = jax.lax.while_loop(more, body, (jnp.int32(0), carry,
                                                    jnp.full((B, K), -1, jnp.int32)))
    return carry._replace(state=layout.flatten(carry.state)), out


def _flat_state(config, layout, learned, state, batch_size: int):
    """`state`, or where it is None the initial state of `batch_size` rows, flat and copied
    (the steps donate what they are given)."""
    if state is None:
        state = initial_state(config, learned, batch_size)
    return _copy(layout.flatten(state))


def _start(config, layout, learned, state, keys, token, pen: int) -> _Carry:
    """A call's first carry: the state as _flat_state makes it; every row consumes `token`
    first and is alive; penalty counts of width `pen` (0: none)."""
    B = token.shape[0]
    return _Carry(_flat_state(config, layout, learned, state, B), keys,
                  jnp.zeros((B, pen), jnp.float32), jnp.zeros((B, pen), bool), token,
                  jnp.ones(B, bool), jnp.ones(B, bool), jnp.zeros(B, jnp.int32))


def _feed_rows(forward, layout, rows, weights, flat, tokens, counts):
    """The state after row i has fed tokens[i, :counts[i]] one step at a time, as decoding
    does (the replay of a row that a stop string ended in the middle of a block)."""

    def body(s, state):
        _, new = _model_step(forward, rows, weights, state, tokens[:, s])
        return _keep_rows(s < counts, new, state)

    state = jax.lax.fori_loop(0, tokens.shape[1], body, layout.unflatten(flat))
    return layout.flatten(state)


# Leaves kept in float32 although they have two or more dimensions: the learned codec, learned
# initial states (RWKV-7's are matrices) and RWKV-7's per-head bonus r_k, which multiplies
# elementwise rather than in a matrix product.
_FLOAT32_PATHS = ("state_codec", "init_state", "'r_k'")


def inference_params(params, dtype=jnp.bfloat16):
    """Weights for decoding: matrices and tables in `dtype` (what each token reads), vectors
    (mixes, decays, norms), initial states and the state codec in float32."""

    def cast(path, x):
        x = jnp.asarray(x)
        name = jax.tree_util.keystr(path)
        if x.ndim < 2 or any(p in name for p in _FLOAT32_PATHS):
            return x
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


# ----------------------------------------------------------------------------- text per row


# What a tokenizer raises for an id it has no text for (a dict's, a list's, or its own check).
_NO_TEXT = (KeyError, IndexError, ValueError)


class _TextTail:
    """One row's text as it grows: whole characters only, cut at the first stop string, and no
    text emitted that a stop string might still claim."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self._tokenizer = tokenizer
        self._bytes = getattr(tokenizer, "decode_bytes", None)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending: list[int] = []  # tokens a tokenizer without bytes could not yet decode
        self._stops = [s for s in stops if s]
        self.text = ""
        self._emitted = 0

    def push(self, token: int) -> tuple[str, bool]:
        """(new text to emit, whether a stop string ended the row).

        A token the tokenizer has no text for adds none: the World tokenizer's 0 (end of text)
        and the ids past its table up to the model's vocabulary (65530-65535), which a model may
        still sample; its KeyError would have lost the whole call."""
        if self._bytes is not None:
            try:
                raw = self._bytes([token])
            except _NO_TEXT:
                return "", False
            new = self._utf8.decode(raw)
        else:
            self._pending.append(token)
            try:
                new = self._tokenizer.decode(self._pending)
            except _NO_TEXT:
                self._pending.pop()
                return "", False
            if new.endswith("\ufffd") and len(self._pending) < 8:
                return "", False  # likely a character split across tokens
            self._pending = []
        start = len(self.text)
        self.text += new
        hits = [p for s in self._stops
                if (p := self.text.find(s, max(0, start - len(s) + 1))) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self._take(len(self.text)), True
        return self._take(len(self.text) - self._holdback()), False

    def finish(self) -> str:
        """The rest of the text, once the row ends without a stop string."""
        if self._bytes is not None:
            self.text += self._utf8.decode(b"", final=True)
        elif self._pending:
            self.text += self._tokenizer.decode(self._pending)
            self._pending = []
        return self._take(len(self.text))

    def _holdback(self) -> int:
        """Length of the longest end of the text that begins some stop string."""
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _take(self, upto: int) -> str:
        piece = self.text[self._emitted : upto] if upto > self._emitted else ""
        self._emitted = max(self._emitted, upto)
        return piece


# ----------------------------------------------------------------------------- the generator


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _one_prompt(prompts) -> bool:
    """Whether `prompts` is one prompt (a text, or token ids) rather than a batch of them."""
    if hasattr(prompts, "ndim"):  # a numpy or JAX array: one row, or rows
        return prompts.ndim == 1
    return isinstance(prompts, str) or (len(prompts) > 0 and _is_int(prompts[0]))


def _token_ids(ids, vocab_size: int, what: str) -> np.ndarray:
    """`ids` as one row of integer token ids inside the vocabulary, or a ValueError naming what
    is wrong with them. Vectorised and not copied: a file to score may be millions of tokens,
    memory-mapped."""
    arr = np.asarray(ids)
    # int() would quietly truncate a float id.
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{what} must be a text or one row of integer token ids; got "
                         f"{arr.dtype} values of shape {arr.shape}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{what} holds token id {lo if lo < 0 else hi}, outside this "
                             f"model's vocabulary of {vocab_size} (made with another tokenizer?)")
    return arr


def run_seeds(max_new_tokens, seed, rows: int) -> list[int]:
    """The seed of each of `rows` rows (seed + i, or one seed a row), after checking them and
    max_new_tokens against what the device holds: it counts tokens in int32 and keys a PRNG
    from a 64-bit seed. Plain Python, for callers to check before anything compiles."""
    if not (_is_int(max_new_tokens) and 1 <= max_new_tokens < 2**31):
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer from 1 to "
                         f"2**31 - 1")
    if _is_int(seed):
        seeds = [seed + i for i in range(rows)]
    elif isinstance(seed, (list, tuple, np.ndarray)):
        seeds = list(seed)
    else:
        seeds = [seed] * rows  # refused below, by name
    if len(seeds) != rows:
        raise ValueError(f"{len(seeds)} seeds for {rows} prompts")
    bad = [s for s in seeds if not (_is_int(s) and -2**63 <= s < 2**63)]
    if bad:
        raise ValueError(f"seed {bad[0]!r}: seeds must be integers that fit in 64 bits")
    return seeds


# Past a few dozen steps a block saves the host nothing measurable (bench/README.md), while its
# forced tokens take rows x block on the device and text streams out a block at a time.
MAX_DECODE_BLOCK = 4096


def check_options(prefill_chunk, decode_block) -> None:
    """Generator's sizes; plain Python, for callers to check before anything loads."""
    if not (_is_int(decode_block) and 1 <= decode_block <= MAX_DECODE_BLOCK):
        raise ValueError(f"decode_block={decode_block!r}: must be an integer from 1 to "
                         f"{MAX_DECODE_BLOCK} (decode steps per device call)")
    if not (_is_int(prefill_chunk) and prefill_chunk >= 0):
        raise ValueError(f"prefill_chunk={prefill_chunk!r}: must be an integer >= 0 (prompt "
                         "tokens per parallel call; 0: the whole prompt at once)")


def encode_prompt(tokenizer, prompt: str | Sequence[int], vocab_size: int) -> list[int]:
    """Token ids of a prompt (text, or ids as they are); ValueError if empty or outside the
    vocabulary. Plain Python: callers check their input with it before anything compiles."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer (or pass token ids)")
        prompt = tokenizer.encode(prompt)
    ids = _token_ids(prompt, vocab_size, "the prompt").tolist()
    if not ids:
        raise ValueError("the prompt is empty: give at least one token of text")
    return ids


class Generator:
    """A model ready to generate: its jitted prefill and decode steps, compiled on first use."""

    def __init__(self, config: ModelConfig, params, tokenizer=None, *, prefill_chunk: int = 1024,
                 bf16: bool = False, decode_rows: int | None = None, decode_block: int = 16,
                 group_products: bool = True, decode_kernels: str | None = None):
        check_options(prefill_chunk, decode_block)
        if bf16:
            config = dataclasses.replace(config, dtype="bfloat16")
            params = inference_params(params, jnp.bfloat16)
        # decode_kernels: None (XLA's products) or "cuda" (rwkv_jax.decode_weights, which
        # raises cuda_decode4.Unavailable, saying why, where it cannot run; True / "pallas",
        # removed, a ValueError); group_products=False keeps the official layout.
        weights = pack_for_decode(config, params, decode_kernels, group_products=group_products)
        del params  # the official matrices are not kept beside the packed ones
        self.decode_kernels = weights.kernel
        self.config = config
        # Every array a compiled step takes is placed ("committed") on this device: jit compiles
        # again for an argument placed differently (a fresh jnp.asarray is not committed; a
        # step's outputs are), and a numpy tree would be copied over at every step.
        self._device = jax.devices()[0]
        self.weights: DecodeWeights = self._put(weights)
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        # Decode steps compute at least this many rows. On an H100 XLA's batch-1 step of a 3B
        # model took 5.1 ms with one row and 3.1 ms padded to two (bench/decode.py); the decode
        # kernels and CPUs gain nothing from padding.
        if decode_rows is None:
            decode_rows = 2 if jax.default_backend() == "gpu" and not self.decode_kernels else 1
        self.decode_rows = decode_rows
        # Steps per decode call: the host's cost per call (launching a step that takes every
        # weight array) is paid once per block, and text streams out a block at a time.
        self.decode_block = decode_block
        self._forward = forward = partial(decode_forward, config)
        # Between its compiled calls the generator keeps a state flat: one (B, n) array per
        # dtype, where the tree has several arrays a layer (121 for a 24-layer RWKV-4), each of
        # which a call hands back to the host one by one (FlatLayout says what that costs).
        self._layout = layout = FlatLayout.of(state_shapes(config, 1))
        self._piece = jax.jit(partial(_prefill_piece, forward, layout), donate_argnums=(2,))
        self._blocks: dict[_Spec, Callable] = {}
        self._feed_fn = jax.jit(partial(_feed_rows, forward, layout, decode_rows),
                                compiler_options=_loop_options())
        # Outputs committed to this device, as the steps' are: jit compiles a function again for
        # an argument placed differently. A caller's state is copied (the steps donate theirs).
        self._on_device = on_device = jax.sharding.SingleDeviceSharding(self._device)
        self._snapshot = jax.jit(_copy, out_shardings=on_device)
        self._flat_state = jax.jit(partial(_flat_state, config, layout), static_argnums=(2,),
                                   out_shardings=on_device)
        # A generate call's whole first carry in one call (each costs the host ~0.6 ms on the
        # H200 machine).
        self._start = jax.jit(partial(_start, config, layout), static_argnums=(4,),
                              out_shardings=on_device)
        self._unflatten = jax.jit(layout.unflatten, out_shardings=on_device)
        self._initial = jax.jit(partial(initial_state, config), static_argnums=(1,),
                                out_shardings=on_device)
        self._merge = jax.jit(_keep_rows)
        self._apply = jax.jit(forward)
        self._weights: jax.Array | None = None
        self._codec_fns: dict[str, Callable] = {}
        # Inputs a call would otherwise make afresh each time, on the host or the device: a
        # batch-1 call's own host work (~6 ms on the H200 machine before, most of it in such
        # small steps) is paid by every call of a chat, a hundred 169M tokens' worth.
        self._keys: dict[tuple, np.ndarray] = {}  # a seed's PRNG key data, per key kind
        self._consts: dict[tuple, Any] = {}  # device arrays that no step donates

    def _block_fn(self, spec: _Spec) -> Callable:
        """The compiled decode block for these sampling settings (compiled on first use)."""
        if spec not in self._blocks:
            self._blocks[spec] = jax.jit(
                partial(_decode_block, self._forward, self._layout, spec, self.decode_rows),
                donate_argnums=(1,), compiler_options=_loop_options())
        return self._blocks[spec]

    # --------------------------------------------------------------- inputs and states

    @property
    def params(self) -> dict:
        """The parameter tree the steps read (RWKV-4 matrices in the decode layout)."""
        return self.weights.params

    def _put(self, tree):
        return jax.device_put(tree, self._device)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt (text, or ids as they are), checked against the vocabulary."""
        return encode_prompt(self.tokenizer, prompt, self.config.vocab_size)

    def reset(self, batch_size: int) -> dict:
        """A fresh state: the zero state, or the learned initial state where the model has one."""
        return self._initial(self._learned(), batch_size)

    def _learned(self) -> dict | None:
        """The learned initial state's parameters, where the model has them."""
        if not self.config.learned_init_state:
            return None
        # Only what initial_state reads goes in the call.
        return {name: {"init_state": block["init_state"]}
                for name, block in self.params.items() if "init_state" in block}

    def _placed(self, state: dict, batch_size: int, what: str = "prompts") -> dict:
        """A caller's state, checked against the model and the batch, on this device."""
        leaves = self._layout.check(state)
        if np.shape(leaves[0])[0] != batch_size:
            raise ValueError(f"the state holds {np.shape(leaves[0])[0]} rows for {batch_size} "
                             f"{what}")
        if not all(isinstance(a, jax.Array) and a.sharding == self._on_device for a in leaves):
            state = self._put(state)
        return state

    def _key_data(self, seed: int) -> np.ndarray:
        key = (seed, str(jax.config.jax_default_prng_impl))
        data = self._keys.get(key)
        if data is None:
            if len(self._keys) > 4096:  # a caller drawing a new seed for every call
                self._keys.clear()
            data = self._keys[key] = np.asarray(jax.random.key_data(jax.random.key(seed)))
        return data

    def _const(self, *parts: np.ndarray):
        """Device copies of host arrays that no step donates, kept for calls that pass the same
        values."""
        key = tuple((a.dtype.str, a.shape, a.tobytes()) for a in parts)
        arrays = self._consts.get(key)
        if arrays is None:
            if len(self._consts) > 64:  # the few setting combinations of a session
                self._consts.clear()
            arrays = self._consts[key] = self._put(tuple(a.copy() for a in parts))
        return arrays

    def _pieces(self, n: int) -> list[int]:
        c = self.prefill_chunk
        if c <= 0:
            return [n]
        pieces = [c] * (n // c)
        rest = n % c
        while rest:
            p = 1 << (rest.bit_length() - 1)
            pieces.append(p)
            rest -= p
        return pieces

    def feed(self, tokens, state: dict | None = None) -> dict:
        """The state after feeding a text or tokens (one row, or rows of one length) in parallel
        pieces: conditioning on a text of any length, with memory set by prefill_chunk."""
        rows = [self.encode(r) for r in ([tokens] if _one_prompt(tokens) else tokens)]
        if len({len(r) for r in rows}) != 1:
            raise ValueError("feed: every row must have the same number of tokens "
                             "(generate takes prompts of different lengths)")
        tokens = np.asarray(rows, np.int32)
        if state is not None:
            state = self._placed(state, len(tokens), "rows of tokens")
        flat = self._flat_state(self._learned(), state, len(tokens))
        a = 0
        for n in self._pieces(tokens.shape[1]):
            flat = self._piece(self.weights, self._put(tokens[:, a : a + n]), flat)
            a += n
        return self._unflatten(flat)

    def score(self, tokens, chunk_len: int = 256, state: dict | None = None,
              compression: str = "none") -> dict:
        """Mean next-token loss of a text or token stream of any length, fed through the state
        in chunks (rwkv_jax.trainer.score_stream, the trainer's evaluation). With `compression`,
        the state passed between chunks goes through that codec, as if stored and restored.

        Returns loss (nats/token), tokens scored, and the state after the last chunk.
        """
        from rwkv_jax.trainer import score_stream  # noqa: PLC0415  (the trainer pulls in optax)

        tokens = self._score_tokens(tokens)
        if not (_is_int(chunk_len) and chunk_len >= 1):
            raise ValueError(f"chunk_len={chunk_len!r}: must be an integer >= 1 (tokens per chunk)")
        state_codec.check_mode(compression)
        if state is not None:
            state = self._placed(state, 1, "row of tokens (score takes one)")
        roundtrip = self._codec("roundtrip", compression) if compression != "none" else None
        last = {}

        def apply_fn(weights, inputs, s):
            if s is not None and roundtrip is not None:
                s = roundtrip(s, weights.params)
            logits, s = self._apply(weights, inputs, s)
            last["state"] = s
            return logits, s

        total, count = score_stream(apply_fn, self.weights, tokens, int(chunk_len), state)
        return {"loss": total / count, "tokens": count, "state": last.get("state")}

    def _score_tokens(self, tokens) -> np.ndarray:
        """A text, or one row of token ids checked as a prompt's are."""
        if isinstance(tokens, str):
            tokens = self.encode(tokens)
        ids = _token_ids(tokens, self.config.vocab_size, "the text to score")
        if ids.size < 2:
            raise ValueError(f"scoring needs at least 2 tokens; got {ids.size}")
        return ids

    def _codec(self, fn: str, mode: str) -> Callable:
        key = f"{fn}:{mode}"
        if key not in self._codec_fns:
            f = getattr(state_codec, fn)
            self._codec_fns[key] = jax.jit(lambda s, p: f(s, mode, p))
        return self._codec_fns[key]

    # --------------------------------------------------------------- generation

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]], *,
                 max_new_tokens: int = 100, sampling: Sampling = GREEDY,
                 seed: int | Sequence[int] = 0, stop: str | Sequence[str] = (),
                 stop_tokens: int | Sequence[int] = (), state: dict | None = None,
                 keep_state: bool = False,
                 callback: Callable[[int, str], Any] | None = None) -> Generation:
        """Generate for one prompt or a batch (text or token ids, any mix of lengths).

        seed: an int (row i uses seed + i) or one per row; a row's output depends only on its
        prompt, its seed and the sampling settings, not on the rest of the batch.
        stop: strings that end a row (cut from its text); stop_tokens: ids that end a row.
        state: where to start (one row per prompt), e.g. a previous call's `state`.
        callback(row, text): called with each new piece of text as it is produced.
        """
        run = self._run(prompts, max_new_tokens, sampling, seed, stop, stop_tokens, state, keep_state)
        while True:
            try:
                row, piece = next(run)
            except StopIteration as done:
                return done.value
            if callback is not None:
                callback(row, piece)

    def stream(self, prompt: str | Sequence[int], **kwargs) -> Iterator[str]:
        """The text of one prompt's continuation, piece by piece as it is generated."""
        args = _run_args(kwargs)
        if not _one_prompt(prompt):
            raise ValueError("stream takes one prompt (text or token ids); for a batch, "
                             "generate(prompts, callback=...) gets each piece with its row")
        if args["keep_state"]:
            raise ValueError("stream yields text only: for the state, "
                             "generate(prompt, keep_state=True, callback=...)")
        for _, piece in self._run(prompt, **args):
            yield piece

    def _run(self, prompts, max_new_tokens, sampling, seed, stop, stop_tokens, state, keep_state):
        # One stop string or one stop token as it is, not its characters (a str is a sequence).
        if isinstance(stop, str):
            stop = [stop]
        if _is_int(stop_tokens):
            stop_tokens = [stop_tokens]
        if _one_prompt(prompts):
            prompts = [prompts]
        rows = [self.encode(p) for p in prompts]
        B = len(rows)
        if not B:
            raise ValueError("no prompts")
        seeds = run_seeds(max_new_tokens, seed, B)
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (stop_tokens do not)")
        lengths = [len(r) for r in rows]
        L0 = min(lengths)
        spec = sampling.spec(self.config.vocab_size)
        V, K = self.config.vocab_size, self.decode_block
        if state is not None:
            state = self._placed(state, B)
        stop_set = {int(t) for t in stop_tokens}
        # Padded to a power of two with -1 (no token), so the block compiles once per size class.
        stop_ids = np.full(1 << max(len(stop_set) - 1, 0).bit_length(), -1, np.int32)
        stop_ids[: len(stop_set)] = sorted(stop_set)
        pen = V if spec.penalties else 0
        keys = np.stack([self._key_data(int(s)) for s in seeds])
        common = np.asarray([r[:L0] for r in rows], np.int32)
        no_force = (np.zeros((B, K), np.int32), np.zeros((B, K), bool))
        allowed_np = np.ones(B, bool)
        allowed_sent = allowed_np.copy()  # what the device has; the loop changes allowed_np
        # What the steps donate, made on the device by one compiled call (jit moves numpy
        # arguments over in ~30 us where device_put takes ~300 for seven on a CPU); the rest as
        # kept from earlier calls.
        carry = self._start(self._learned(), state, keys, common[:, -1].copy(), pen)
        weight = (self._count_weights(),) if spec.penalties else self._const(np.ones(1, np.float32))
        consts = (*self._const(stop_ids, np.int32(max_new_tokens), sampling.knobs()), *weight)
        no_force_dev = self._const(*no_force)
        (allowed,) = self._const(allowed_sent)
        block = self._block_fn(spec)
        t0 = time.perf_counter()

        # All but the last common token in parallel; the last one goes through the first decode
        # step, which picks selection 0 from its logits (one compiled function fewer).
        a = 0
        for n in self._pieces(L0 - 1) if L0 > 1 else ():
            carry = carry._replace(
                state=self._piece(self.weights, self._put(common[:, a : a + n]), carry.state))
            a += n
        if a:  # waited for only to time the prefill: a wait costs a short call ~1 ms (H200 host)
            jax.block_until_ready(carry.state)
        t1 = time.perf_counter()

        # Selection j is the token at position L0 + j of every row: its prompt's while that
        # lasts (forced), sampled after. Block b picks selections b*K .. b*K + K - 1.
        n_forced = max(lengths) - L0

        def forced(b):
            if b * K >= n_forced:
                return no_force, no_force_dev
            pos = L0 + b * K + np.arange(K)
            tok, mask = np.zeros((B, K), np.int32), np.zeros((B, K), bool)
            for i, r in enumerate(rows):
                mask[i] = pos < len(r)
                tok[i, mask[i]] = np.asarray(r)[pos[mask[i]]]
            return (tok, mask), self._put((tok, mask))

        # A stop string can end a row in the middle of a block the device has already run on
        # (and the next one): with the state kept, the row is replayed from the block's start.
        replay = keep_state and bool(stop)
        snapshots: dict[int, Any] = {}
        fixes: list[tuple[jax.Array, dict]] = []

        def launch(b, carry, allowed):
            if replay:
                snapshots[b] = self._snapshot(carry.state)
            host_forced, dev_forced = forced(b)
            carry, out = block(self.weights, carry, *dev_forced, allowed, *consts)
            return carry, (out, host_forced)

        # Without a tokenizer there is no text: token ids only.
        texts = [_TextTail(self.tokenizer, stop) if self.tokenizer is not None else None
                 for _ in range(B)]
        generated: list[list[int]] = [[] for _ in range(B)]
        reasons = [""] * B
        feed_in = common[:, -1].copy()  # the token each row feeds first in the current block
        steps = 0
        # Every row is done within its prompt plus max_new_tokens selections, and one step more
        # feeds its last token into a state kept: no block is launched past those (a launch
        # costs the host ~2 ms at 1.5B on the H200 machine, in the way of a short call's read).
        n_blocks = -(-(n_forced + max_new_tokens + int(bool(keep_state))) // K)
        carry, current = launch(0, carry, allowed)
        for b in range(n_blocks):
            # Queue block b + 1, then read block b: the device runs a block ahead of this loop.
            if not np.array_equal(allowed_sent, allowed_np):
                # A copy: on CPU the device array may share the numpy buffer, which this loop
                # goes on changing while queued blocks still read it.
                allowed_sent = allowed_np.copy()
                allowed = self._put(allowed_sent)
            out, (ftok, fmask) = current
            if b + 1 < n_blocks:
                carry, current = launch(b + 1, carry, allowed)
            picked = np.asarray(out)
            selections = np.where(fmask, ftok, picked)
            cut = np.zeros(B, np.int32)  # per row ended by a stop string here: tokens to replay
            for i in range(B):
                for s in range(K):
                    if reasons[i]:
                        break
                    steps = max(steps, b * K + s + 1)
                    if fmask[i, s]:
                        continue
                    t = int(picked[i, s])
                    if t in stop_set:
                        reasons[i] = "stop_token"
                    else:
                        generated[i].append(t)
                        piece, hit = texts[i].push(t) if texts[i] else ("", False)
                        if piece:
                            yield i, piece
                        if hit:
                            reasons[i] = "stop_string"
                            allowed_np[i] = False
                            cut[i] = s + 2  # the block's first token and selections 0..s
                        elif len(generated[i]) >= max_new_tokens:
                            reasons[i] = "length"
                    if reasons[i]:
                        piece = texts[i].finish() if texts[i] and reasons[i] != "stop_string" else ""
                        if piece:
                            yield i, piece
            if replay and cut.any():
                tokens = np.concatenate([feed_in[:, None], selections], axis=1)
                fixes.append((self._put(cut > 0), self._feed_fn(
                    self.weights, snapshots[b], self._put(tokens), self._put(cut))))
            snapshots.pop(b, None)
            feed_in = selections[:, -1].copy()
            if all(reasons):
                break
        final = carry.state
        for rows_fixed, fixed in fixes:
            final = self._merge(rows_fixed, fixed, final)
        final = jax.block_until_ready(self._unflatten(final)) if keep_state else None
        t2 = time.perf_counter()
        return Generation(
            texts=[t.text if t else "" for t in texts], tokens=generated, stop_reasons=reasons,
            state=final,
            timings={"prefill_s": t1 - t0, "decode_s": t2 - t1, "steps": steps,
                     "new_tokens": sum(len(g) for g in generated)})

    def _count_weights(self) -> jax.Array:
        """Per token: 1, or 0 where ChatRWKV leaves it out of the frequency count."""
        if self._weights is None:
            w = np.ones(self.config.vocab_size, np.float32)
            if self.tokenizer is not None:
                for t in range(min(self.config.vocab_size, self.tokenizer.vocab_size)):
                    try:
                        text = self.tokenizer.decode([t])
                    except Exception:  # noqa: BLE001 - an id the tokenizer has no text for
                        continue
                    if text in _UNCOUNTED:
                        w[t] = 0.0
            self._weights = self._put(w)
        return self._weights


def _loop_options() -> dict | None:
    """XLA options for a compiled decode loop: on GPUs, the whole loop in one CUDA graph.

    By default XLA runs a while loop's condition on the host: each step copies it back and
    launches the next step from there, so the host waits on every step and cannot queue the
    next call. With loops inside the graph (conditional nodes), a 3B batch-1 block took 2.74 ms
    per token on an H100 against 3.25 (bench/README.md).
    """
    if jax.default_backend() != "gpu":
        return None
    return {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"}


def _run_args(kwargs: dict) -> dict:
    defaults = dict(max_new_tokens=100, sampling=GREEDY, seed=0, stop=(), stop_tokens=(),
                    state=None, keep_state=False)
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"unknown arguments {sorted(unknown)}")
    return {**defaults, **kwargs}


def _copy(state: dict) -> dict:
    # The steps donate their state; a caller's own arrays must survive the call. Under jit an
    # array a function returns as it came in may be handed back as the input itself (a leaf
    # that flattens to itself); a copy is an operation of its own, so its output never is.
    return jax.tree.map(jnp.copy, state)


# ----------------------------------------------------------------------------- sessions


class Session:
    """A conversation: the state is kept between calls, compressed as asked.

    `compression` defaults to the model's `state_compression` (the codec it was trained with).
    """

    def __init__(self, generator: Generator, *, batch_size: int = 1, compression: str | None = None):
        self.generator = generator
        self.compression = compression or generator.config.state_compression
        self._packed = self._pack(generator.reset(batch_size))

    def _pack(self, state):
        if self.compression == "none":
            return state
        return self.generator._codec("compress", self.compression)(state, self.generator.params)

    @property
    def state(self) -> dict:
        if self.compression == "none":
            return self._packed
        return self.generator._codec("decompress", self.compression)(self._packed,
                                                                     self.generator.params)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored state."""
        return state_codec.bytes_of(self._packed)

    def feed(self, text) -> None:
        """Condition on a text or token ids (or one of them per row) without generating."""
        rows = [text] if _one_prompt(text) else list(text)
        self._packed = self._pack(self.generator.feed(
            [self.generator.encode(r) for r in rows], self.state))

    def generate(self, prompt, **kwargs) -> Generation:
        kwargs["keep_state"] = True
        result = self.generator.generate(prompt, state=self.state, **kwargs)
        self._packed = self._pack(result.state)
        return result
