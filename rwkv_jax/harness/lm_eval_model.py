"""lm-evaluation-harness's `LM` over a Generator: contexts of any length go through the recurrent
state (nothing is truncated), and a context's state is computed once for all its continuations.

    import lm_eval
    from rwkv_jax.harness import RwkvLM
    lm = RwkvLM(Generator(config, params, tokenizer), batch_size=32)
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai", "piqa"])

loglikelihood(context, continuation): each distinct context is fed once, all but its last token
(contexts sorted by length; a batch feeds its common length in parallel prefill pieces,
Generator.feed, and each row's few remaining tokens one a step); every continuation of it then starts from a copy of that
state and is fed [last context token] + continuation[:-1] in one parallel call, whose logits
score the continuation. Multiple-choice tasks ask four or more continuations per context, so
the context, usually the long part, runs once instead of four times. Continuations are batched
by length, padded at the end (a recurrent model's outputs at a position do not depend on what
follows) to power-of-two lengths and rows, so few shapes compile.
loglikelihood_rolling: the whole text from the prefix token, in chunks through the state.
generate_until: Generator.generate, greedy unless do_sample, with `until` as stop strings.
"""

from __future__ import annotations

import json
from collections import defaultdict
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from rwkv_jax.generate import GREEDY, Generator, Sampling, decode_forward
from rwkv_jax.generate.decode_loop import keep_rows

# Contexts whose states are held at once: bounds memory (a 1.5B model's state is ~1 MB a row).
_WINDOW = 512
# A batch of contexts feeds its common length, in multiples of _QUANTUM, in parallel; the rest
# of each (at most _MAX_TAIL tokens) one token a step.
_QUANTUM = 8
_MAX_TAIL = 32


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _score(config, weights, state, tokens, targets, mask):
    """Per row: the summed log-probability of targets where mask, whether each masked target is
    the argmax, and the state after all tokens."""
    logits, state = decode_forward(config, weights, tokens, state)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets
    return (jnp.sum(jnp.where(mask, picked, 0.0), axis=1),
            jnp.all(greedy | ~mask, axis=1), state)


def _feed_tails(config, weights, state, tokens, counts):
    """The state after row i has fed tokens[i, :counts[i]], one token a step."""

    def step(s, state):
        token = jax.lax.dynamic_slice_in_dim(tokens, s, 1, axis=1)
        _, new = decode_forward(config, weights, token, state)
        return keep_rows(s < counts, new, state)

    return jax.lax.fori_loop(0, tokens.shape[1], step, state)


def _take_rows(tree, idx):
    return jax.tree.map(lambda a: a[idx], tree)


def _concat_rows(*trees):
    return jax.tree.map(lambda *a: jnp.concatenate(a), *trees)


class RwkvLM(TemplateLM):
    """An lm-eval model over a Generator (its weights, tokenizer and prefill).

    batch_size: rows per model call; reuse_context: compute a context's state once for all its
    continuations (False: once per request, for comparison); rolling_chunk: tokens per call
    of loglikelihood_rolling; prefix_token: what an empty context or a rolling text starts
    from (default 0: the World tokenizer's end of text, a NUL byte for bytes).
    """

    def __init__(self, generator: Generator, *, batch_size: int = 16, reuse_context: bool = True,
                 rolling_chunk: int = 1024, prefix_token: int = 0):
        super().__init__()
        if generator.tokenizer is None:
            raise ValueError("RwkvLM needs a Generator with a tokenizer")
        for name, value in (("batch_size", batch_size), ("rolling_chunk", rolling_chunk)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}={value!r}: must be an integer >= 1")
        if not 0 <= prefix_token < generator.config.vocab_size:
            raise ValueError(f"prefix_token={prefix_token}: must be a token id below "
                             f"{generator.config.vocab_size}")
        self.generator = generator
        self.tokenizer = generator.tokenizer
        self.batch_size = batch_size
        self.reuse_context = reuse_context
        self.rolling_chunk = rolling_chunk
        self._prefix = prefix_token
        self._score = jax.jit(partial(_score, generator.config))
        self._feed_tails = jax.jit(partial(_feed_tails, generator.config))
        self._take = jax.jit(_take_rows)
        self._concat = jax.jit(_concat_rows)
        self.contexts_fed = 0  # distinct context states computed (tests and benches read it)

    # --------------------------------------------------------------- tokens

    @property
    def eot_token_id(self) -> int:
        return self._prefix

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(list(tokens))

    # --------------------------------------------------------------- log-likelihoods

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """[(logprob, is_greedy)] of each ((context, continuation), context_ids, continuation_ids)."""
        keys, contexts = [], {}
        for i, (_, ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise ValueError(f"request {i}: empty context or continuation tokens")
            key = tuple(ctx) if self.reuse_context else i
            keys.append(key)
            contexts.setdefault(key, ctx)
        # Contexts of one length side by side, so that they feed as one batch.
        order = sorted(contexts, key=lambda k: len(contexts[k]))
        by_key = defaultdict(list)
        for i, k in enumerate(keys):
            by_key[k].append(i)
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="rwkv loglikelihood")
        for a in range(0, len(order), _WINDOW):
            window = order[a : a + _WINDOW]
            states = self._context_states([contexts[k] for k in window])
            todo = [(i, j) for j, k in enumerate(window) for i in by_key[k]]
            for i, out in self._continuations(states, todo, requests):
                results[i] = out
                if self.cache_hook is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out)
                bar.update(1)
        bar.close()
        return results

    def _context_states(self, contexts: list[list[int]]):
        """The states after each context but its last token, rows in the order given.

        Contexts of similar lengths (the window comes sorted by length) share a batch: all rows
        feed their common length, rounded down to a multiple of _QUANTUM, in parallel prefill
        pieces, then each its own tail one token a step, rows whose tail is over left as they
        are. So a batch is full whatever the spread of lengths, and few shapes compile."""
        gen, parts = self.generator, []
        prefix = [len(c) - 1 for c in contexts]
        batches, start = [], 0
        for j in range(1, len(contexts) + 1):
            if j == len(contexts) or j - start == self.batch_size or \
                    prefix[j] - prefix[start] > _MAX_TAIL - _QUANTUM:
                batches.append(list(range(start, j)))
                start = j
        where = np.zeros(len(contexts), np.int32)
        row = 0
        for batch in batches:
            padded = batch + [batch[0]] * (_pow2(len(batch)) - len(batch))  # few shapes compile
            common = min(prefix[j] for j in batch) // _QUANTUM * _QUANTUM
            state = (gen.feed([contexts[j][:common] for j in padded]) if common
                     else gen.reset(len(padded)))
            width = max(prefix[j] for j in batch) - common
            if width:
                tails = np.zeros((len(padded), _pow2(width)), np.int32)
                counts = np.zeros(len(padded), np.int32)
                for r, j in enumerate(padded):
                    counts[r] = prefix[j] - common
                    tails[r, : counts[r]] = contexts[j][common : prefix[j]]
                state = self._feed_tails(gen.weights, state, tails, counts)
            parts.append(state)
            where[batch] = row + np.arange(len(batch))
            row += len(padded)
        self.contexts_fed += len(contexts)
        return (parts[0] if len(parts) == 1 else self._concat(*parts)), where

    def _continuations(self, states, todo, requests):
        """(request index, (logprob, is_greedy)) for each (request, its context's row)."""
        stacked, where = states
        by_len = defaultdict(list)
        for i, j in todo:
            by_len[_pow2(len(requests[i][2]))].append((i, j))
        for width, items in sorted(by_len.items()):
            for b in range(0, len(items), self.batch_size):
                batch = items[b : b + self.batch_size]
                rows = _pow2(len(batch))
                tokens = np.zeros((rows, width), np.int32)
                targets = np.zeros((rows, width), np.int32)
                mask = np.zeros((rows, width), bool)
                idx = np.zeros(rows, np.int32)
                for r, (i, j) in enumerate(batch):
                    _, ctx, cont = requests[i]
                    tokens[r, : len(cont)] = [ctx[-1], *cont[:-1]]
                    targets[r, : len(cont)] = cont
                    mask[r, : len(cont)] = True
                    idx[r] = where[j]
                state = self._take(stacked, idx)
                lp, greedy, _ = self._score(self.generator.weights, state, tokens, targets, mask)
                lp, greedy = np.asarray(lp), np.asarray(greedy)
                for r, (i, _) in enumerate(batch):
                    yield i, (float(lp[r]), bool(greedy[r]))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text from the prefix token, through the state."""
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="rwkv loglikelihood_rolling"):
            (text,) = req.args
            ids = [self._prefix, *self.tok_encode(text)]
            state, total = self.generator.reset(1), 0.0
            for a in range(0, len(ids) - 1, self.rolling_chunk):
                piece = ids[a : a + self.rolling_chunk + 1]
                n = len(piece) - 1
                width = self.rolling_chunk if n == self.rolling_chunk else _pow2(n)
                tokens = np.zeros((1, width), np.int32)
                targets = np.zeros((1, width), np.int32)
                tokens[0, :n], targets[0, :n] = piece[:-1], piece[1:]
                mask = np.arange(width)[None] < n
                # A padded last chunk leaves a state that nothing reads.
                lp, _, state = self._score(self.generator.weights, state, tokens, targets, mask)
                total += float(lp[0])
            out.append(total)
            if self.cache_hook is not None:
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    # --------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations, cut at the first `until` string."""
        groups = defaultdict(list)
        for i, req in enumerate(requests):  # one group per generation settings
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="rwkv generate_until")
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until, max_new, sampling = self._gen_options(kwargs)
            # Longest first: a batch's prompts are of similar lengths.
            members.sort(key=lambda i: -len(requests[i].args[0]))
            for b in range(0, len(members), self.batch_size):
                batch = members[b : b + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0]) or [self._prefix] for i in batch]
                result = self.generator.generate(prompts, max_new_tokens=max_new,
                                                 sampling=sampling, stop=until,
                                                 stop_tokens=[self._prefix])
                for i, text in zip(batch, result.texts):
                    out[i] = text
                    if self.cache_hook is not None:
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out

    def _gen_options(self, kwargs: dict):
        """(stop strings, max new tokens, sampling) of a request's gen_kwargs."""
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", 256))
        if kwargs.pop("do_sample", False):
            sampling = Sampling(temperature=float(kwargs.pop("temperature", 1.0)),
                                top_p=float(kwargs.pop("top_p", 1.0)),
                                top_k=int(kwargs.pop("top_k", 0) or 0))
        else:
            kwargs.pop("temperature", None)
            sampling = GREEDY
        return until, max_new, sampling
