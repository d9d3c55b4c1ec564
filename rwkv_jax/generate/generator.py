"""Generation: prefill in parallel, then blocks of decode steps with the sampling inside them.

    gen = Generator(config, params, tokenizer)
    out = gen.generate(["To be", "Once upon a time"], max_new_tokens=100,
                       sampling=Sampling(temperature=0.8, top_p=0.9), seed=0, stop=["\\n\\n"])
    for piece in gen.stream("To be", max_new_tokens=100):
        print(piece, end="", flush=True)
    chat = Session(gen, compression="int8")     # keeps a compressed state between calls
    chat.generate("User: hi\\n\\nBot:", max_new_tokens=50, stop=["\\n\\n"])
    gen.score(tokens, chunk_len=256)            # a text of any length, memory independent of it

How the pieces run is in decode_loop.py, how tokens are drawn in sampling.py.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.config import ModelConfig
from rwkv_jax.evaluation.score import score_stream
from rwkv_jax.generate.decode_loop import (
    copy_state,
    feed_rows,
    flat_state,
    inference_params,
    keep_rows,
    prefill_piece,
    run_decode_block,
    start_carry,
)
from rwkv_jax.generate.decode_weights import (
    DecodeWeights,
    decode_forward,
    pack_for_decode,
)
from rwkv_jax.generate.sampling import GREEDY, UNCOUNTED, SampleSpec, Sampling
from rwkv_jax.generate.text import (
    RowsOut,
    check_options,
    checked_token_ids,
    encode_prompt,
    is_int,
    one_prompt,
    run_seeds,
)
from rwkv_jax.nn import state_codec
from rwkv_jax.nn.model import initial_state
from rwkv_jax.nn.state import FlatLayout, state_shapes


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


class Generator:
    """A model ready to generate: its jitted prefill and decode steps, compiled on first use."""

    def __init__(self, config: ModelConfig, params, tokenizer=None, *, prefill_chunk: int = 1024,
                 bf16: bool = False, decode_rows: int | None = None, decode_block: int = 16,
                 group_products: bool = True, decode_kernels: str | None = None):
        check_options(prefill_chunk, decode_block)
        if bf16:
            config = dataclasses.replace(config, dtype="bfloat16")
            params = inference_params(params, jnp.bfloat16)
        # decode_kernels: None (XLA's products) or "cuda" (rwkv_jax.generate.decode_weights, which
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
        # Decode steps compute at least this many rows: on GPUs XLA's batch-1 products run
        # faster padded to two rows (docs/performance.md); the decode kernels and CPUs gain
        # nothing from padding.
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
        self._piece = jax.jit(partial(prefill_piece, forward, layout), donate_argnums=(2,))
        self._blocks: dict[SampleSpec, Callable] = {}
        self._feed_fn = jax.jit(partial(feed_rows, forward, layout, decode_rows),
                                compiler_options=_loop_options())
        # Outputs committed to this device, as the steps' are: jit compiles a function again for
        # an argument placed differently. A caller's state is copied (the steps donate theirs).
        self._on_device = on_device = jax.sharding.SingleDeviceSharding(self._device)
        self._snapshot = jax.jit(copy_state, out_shardings=on_device)
        self.flat_state = jax.jit(partial(flat_state, config, layout), static_argnums=(2,),
                                   out_shardings=on_device)
        # A generate call's whole first carry in one call (each call costs the host time).
        self.start_carry = jax.jit(partial(start_carry, config, layout), static_argnums=(4,),
                              out_shardings=on_device)
        self._unflatten = jax.jit(layout.unflatten, out_shardings=on_device)
        self._initial = jax.jit(partial(initial_state, config), static_argnums=(1,),
                                out_shardings=on_device)
        self._merge = jax.jit(keep_rows)
        self._apply = jax.jit(forward)
        self._weights: jax.Array | None = None
        self._codec_fns: dict[str, Callable] = {}
        self._logprob_fns: dict[int, Callable] = {}  # token_logprobs' step, per top
        # Inputs a call would otherwise make afresh each time, on the host or the device: a
        # batch-1 call's own host work (milliseconds, most of it in such small steps) is paid by
        # every call of a chat.
        self._keys: dict[tuple, np.ndarray] = {}  # a seed's PRNG key data, per key kind
        self._consts: dict[tuple, Any] = {}  # device arrays that no step donates

    def _block_fn(self, spec: SampleSpec) -> Callable:
        """The compiled decode block for these sampling settings (compiled on first use)."""
        if spec not in self._blocks:
            self._blocks[spec] = jax.jit(
                partial(run_decode_block, self._forward, self._layout, spec, self.decode_rows),
                donate_argnums=(1,), compiler_options=_loop_options())
        return self._blocks[spec]

    # --------------------------------------------------------------- inputs and states

    @property
    def forward(self) -> Callable:
        """forward(weights, tokens, state) of this model (decode_forward with its config)."""
        return self._forward

    @property
    def layout(self) -> FlatLayout:
        """How the steps keep a state flat (rwkv_jax.nn.state.FlatLayout)."""
        return self._layout

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

    def start_flat(self, rows: int, state: dict | None = None):
        """A flat state of `rows` rows to prefill into: `state` (copied), else the initial one."""
        if state is not None:
            state = self._placed(state, rows)
        return self.flat_state(self._learned(), state, rows)

    def prefill_piece(self, flat, tokens: np.ndarray):
        """The flat state after feeding `tokens` (rows, n) in parallel; `flat` is donated. For
        callers that schedule prefill themselves (the server): n from pieces() compiles few
        shapes."""
        return self._piece(self.weights, self._put(np.asarray(tokens, np.int32)), flat)

    def pieces(self, n: int) -> list[int]:
        """The lengths that feed n tokens: prefill_chunk each, the rest in powers of two."""
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
        rows = [self.encode(r) for r in ([tokens] if one_prompt(tokens) else tokens)]
        if len({len(r) for r in rows}) != 1:
            raise ValueError("feed: every row must have the same number of tokens "
                             "(generate takes prompts of different lengths)")
        tokens = np.asarray(rows, np.int32)
        if state is not None:
            state = self._placed(state, len(tokens), "rows of tokens")
        flat = self.flat_state(self._learned(), state, len(tokens))
        a = 0
        for n in self.pieces(tokens.shape[1]):
            flat = self._piece(self.weights, self._put(tokens[:, a : a + n]), flat)
            a += n
        return self._unflatten(flat)

    def score(self, tokens, chunk_len: int = 256, state: dict | None = None,
              compression: str = "none") -> dict:
        """Mean next-token loss of a text or token stream of any length, fed through the state
        in chunks (rwkv_jax.evaluation.score.score_stream, the trainer's evaluation). With `compression`,
        the state passed between chunks goes through that codec, as if stored and restored.

        Returns loss (nats/token), tokens scored, and the state after the last chunk.
        """

        tokens = self._score_tokens(tokens)
        if not (is_int(chunk_len) and chunk_len >= 1):
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

    def token_logprobs(self, tokens, top: int = 0, state: dict | None = None):
        """Each token's log-probability given those before it, from one pass over the tokens
        through the state in pieces (pieces(): memory set by prefill_chunk, few shapes), and the
        `top` most likely tokens at each position: (picked (n-1,), top ids (n-1, top), their
        log-probabilities (n-1, top)), numpy, for tokens 1..n-1. The picked and the top values
        come from one log-softmax, so a picked token that is the argmax equals top's first.
        `state`: where the tokens start from (default: the initial state)."""
        ids = np.asarray(checked_token_ids(tokens, self.config.vocab_size, "the tokens to score"))
        if not (is_int(top) and 0 <= top <= self.config.vocab_size):
            raise ValueError(f"top={top!r}: must be an integer from 0 to the vocabulary size")
        picked = np.zeros(max(ids.size - 1, 0), np.float32)
        top_lp = np.zeros((picked.size, top), np.float32)
        top_ids = np.zeros((picked.size, top), np.int32)
        if ids.size < 2:
            return picked, top_ids, top_lp
        fn = self._logprob_fns.get(top)
        if fn is None:
            fn = self._logprob_fns[top] = jax.jit(partial(_logprob_piece, self._forward, top))
        s = self._unflatten(self.start_flat(1, state))
        a = 0
        for n in self.pieces(ids.size - 1):
            out = fn(self.weights, self._put(ids[None, a : a + n]),
                     self._put(ids[None, a + 1 : a + n + 1]), s)
            s = out[-1]
            picked[a : a + n], top_lp[a : a + n], top_ids[a : a + n] = (
                np.asarray(x[0]) for x in out[:3])
            a += n
        return picked, top_ids, top_lp

    def _score_tokens(self, tokens) -> np.ndarray:
        """A text, or one row of token ids checked as a prompt's are."""
        if isinstance(tokens, str):
            tokens = self.encode(tokens)
        ids = checked_token_ids(tokens, self.config.vocab_size, "the text to score")
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
        if not one_prompt(prompt):
            raise ValueError("stream takes one prompt (text or token ids); for a batch, "
                             "generate(prompts, callback=...) gets each piece with its row")
        if args["keep_state"]:
            raise ValueError("stream yields text only: for the state, "
                             "generate(prompt, keep_state=True, callback=...)")
        for _, piece in self._run(prompt, **args):
            yield piece

    def _run(self, prompts, max_new_tokens, sampling, seed, stop, stop_tokens, state, keep_state):
        stop, stop_tokens, rows, seeds = self._requests(prompts, max_new_tokens, seed, stop,
                                                        stop_tokens)
        B, K = len(rows), self.decode_block
        lengths = [len(r) for r in rows]
        L0 = min(lengths)
        spec = sampling.spec(self.config.vocab_size)
        if state is not None:
            state = self._placed(state, B)
        common = np.asarray([r[:L0] for r in rows], np.int32)
        out = RowsOut(self.tokenizer, stop, {int(t) for t in stop_tokens}, B, max_new_tokens)
        carry, consts = self._run_inputs(spec, sampling, state, seeds, common, out.stop_set,
                                         max_new_tokens)
        no_force = (np.zeros((B, K), np.int32), np.zeros((B, K), bool))
        no_force_dev = self._const(*no_force)
        allowed_sent = out.allowed.copy()  # what the device has; reading blocks changes out's
        (allowed,) = self._const(allowed_sent)
        block = self._block_fn(spec)
        t0 = time.perf_counter()
        carry = self._prefill(carry, common)
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

        feed_in = common[:, -1].copy()  # the token each row feeds first in the current block
        # Every row is done within its prompt plus max_new_tokens selections, and one step more
        # feeds its last token into a state kept: no block is launched past those (a launch
        # costs the host milliseconds, in the way of a short call's read).
        n_blocks = -(-(n_forced + max_new_tokens + int(bool(keep_state))) // K)
        carry, current = launch(0, carry, allowed)
        for b in range(n_blocks):
            # Queue block b + 1, then read block b: the device runs a block ahead of this loop.
            if not np.array_equal(allowed_sent, out.allowed):
                # A copy: on CPU the device array may share the numpy buffer, which reading
                # blocks goes on changing while queued blocks still read it.
                allowed_sent = out.allowed.copy()
                allowed = self._put(allowed_sent)
            picked, (ftok, fmask) = current
            if b + 1 < n_blocks:
                carry, current = launch(b + 1, carry, allowed)
            picked = np.asarray(picked)
            selections = np.where(fmask, ftok, picked)
            cut = yield from out.read(b, K, picked, fmask)
            if replay and cut.any():
                tokens = np.concatenate([feed_in[:, None], selections], axis=1)
                fixes.append((self._put(cut > 0), self._feed_fn(
                    self.weights, snapshots[b], self._put(tokens), self._put(cut))))
            snapshots.pop(b, None)
            feed_in = selections[:, -1].copy()
            if all(out.reasons):
                break
        final = carry.state
        for rows_fixed, fixed in fixes:
            final = self._merge(rows_fixed, fixed, final)
        final = jax.block_until_ready(self._unflatten(final)) if keep_state else None
        t2 = time.perf_counter()
        return Generation(
            texts=[t.text if t else "" for t in out.texts], tokens=out.generated,
            stop_reasons=out.reasons, state=final,
            timings={"prefill_s": t1 - t0, "decode_s": t2 - t1, "steps": out.steps,
                     "new_tokens": sum(len(g) for g in out.generated)})

    def _requests(self, prompts, max_new_tokens, seed, stop, stop_tokens):
        """(stop strings, stop tokens, each row's prompt tokens, each row's seed), checked."""
        # One stop string or one stop token as it is, not its characters (a str is a sequence).
        if isinstance(stop, str):
            stop = [stop]
        if is_int(stop_tokens):
            stop_tokens = [stop_tokens]
        if one_prompt(prompts):
            prompts = [prompts]
        rows = [self.encode(p) for p in prompts]
        if not rows:
            raise ValueError("no prompts")
        seeds = run_seeds(max_new_tokens, seed, len(rows))
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (stop_tokens do not)")
        return stop, stop_tokens, rows, seeds

    def _run_inputs(self, spec, sampling, state, seeds, common, stop_set, max_new_tokens):
        """The decode carry and the block's constant inputs, on the device."""
        # Padded to a power of two with -1 (no token), so the block compiles once per size class.
        stop_ids = np.full(1 << max(len(stop_set) - 1, 0).bit_length(), -1, np.int32)
        stop_ids[: len(stop_set)] = sorted(stop_set)
        pen = self.config.vocab_size if spec.penalties else 0
        keys = np.stack([self._key_data(int(s)) for s in seeds])
        # What the steps donate, made on the device by one compiled call (jit moves numpy
        # arguments over faster than device_put does them one by one); the rest as kept from
        # earlier calls.
        carry = self.start_carry(self._learned(), state, keys, common[:, -1].copy(), pen)
        weight = (self.count_weights(),) if spec.penalties else self._const(np.ones(1, np.float32))
        consts = (*self._const(stop_ids, np.int32(max_new_tokens), sampling.knobs()), *weight)
        return carry, consts

    def _prefill(self, carry, common):
        """All but the last common prompt token in parallel pieces; the last one goes through
        the first decode step, which picks selection 0 from its logits (one compiled function
        fewer)."""
        L0, a = common.shape[1], 0
        for n in self.pieces(L0 - 1) if L0 > 1 else ():
            carry = carry._replace(
                state=self._piece(self.weights, self._put(common[:, a : a + n]), carry.state))
            a += n
        if a:  # waited for only to time the prefill
            jax.block_until_ready(carry.state)
        return carry

    def count_weights(self) -> jax.Array:
        """Per token: 1, or 0 where ChatRWKV leaves it out of the frequency count."""
        if self._weights is None:
            w = np.ones(self.config.vocab_size, np.float32)
            if self.tokenizer is not None:
                for t in range(min(self.config.vocab_size, self.tokenizer.vocab_size)):
                    try:
                        text = self.tokenizer.decode([t])
                    except Exception:  # noqa: BLE001 - an id the tokenizer has no text for
                        continue
                    if text in UNCOUNTED:
                        w[t] = 0.0
            self._weights = self._put(w)
        return self._weights


def _logprob_piece(forward, top: int, weights, tokens, targets, state):
    """token_logprobs' step: log p(targets | tokens so far), the top-k, and the state after."""
    logits, state = forward(weights, tokens, state)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    top_lp, top_ids = jax.lax.top_k(logp, top)
    return picked, top_lp, top_ids, state


def _loop_options() -> dict | None:
    """XLA options for a compiled decode loop: on GPUs, the whole loop in one CUDA graph.

    By default XLA runs a while loop's condition on the host: each step copies it back and
    launches the next step from there, so the host waits on every step and cannot queue the
    next call. With loops inside the graph (conditional nodes), the host queues the next
    call while a block runs (docs/performance.md has the gain).
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
