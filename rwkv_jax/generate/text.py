"""Prompts in, text out: prompt encoding and checks, per-row seeds, option checks, and the
streamed text of a row with its stop strings.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

import numpy as np

# What a tokenizer raises for an id it has no text for (a dict's, a list's, or its own check).
_NO_TEXT = (KeyError, IndexError, ValueError)


class TextTail:
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


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def one_prompt(prompts) -> bool:
    """Whether `prompts` is one prompt (a text, or token ids) rather than a batch of them."""
    if hasattr(prompts, "ndim"):  # a numpy or JAX array: one row, or rows
        return prompts.ndim == 1
    return isinstance(prompts, str) or (len(prompts) > 0 and is_int(prompts[0]))


def checked_token_ids(ids, vocab_size: int, what: str) -> np.ndarray:
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
    if not (is_int(max_new_tokens) and 1 <= max_new_tokens < 2**31):
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer from 1 to "
                         f"2**31 - 1")
    if is_int(seed):
        seeds = [seed + i for i in range(rows)]
    elif isinstance(seed, (list, tuple, np.ndarray)):
        seeds = list(seed)
    else:
        seeds = [seed] * rows  # refused below, by name
    if len(seeds) != rows:
        raise ValueError(f"{len(seeds)} seeds for {rows} prompts")
    bad = [s for s in seeds if not (is_int(s) and -2**63 <= s < 2**63)]
    if bad:
        raise ValueError(f"seed {bad[0]!r}: seeds must be integers that fit in 64 bits")
    return seeds


# Past a few dozen steps a block saves the host nothing measurable (bench/README.md), while its
# forced tokens take rows x block on the device and text streams out a block at a time.
MAX_DECODE_BLOCK = 4096


def check_options(prefill_chunk, decode_block) -> None:
    """Generator's sizes; plain Python, for callers to check before anything loads."""
    if not (is_int(decode_block) and 1 <= decode_block <= MAX_DECODE_BLOCK):
        raise ValueError(f"decode_block={decode_block!r}: must be an integer from 1 to "
                         f"{MAX_DECODE_BLOCK} (decode steps per device call)")
    if not (is_int(prefill_chunk) and prefill_chunk >= 0):
        raise ValueError(f"prefill_chunk={prefill_chunk!r}: must be an integer >= 0 (prompt "
                         "tokens per parallel call; 0: the whole prompt at once)")


def encode_prompt(tokenizer, prompt: str | Sequence[int], vocab_size: int) -> list[int]:
    """Token ids of a prompt (text, or ids as they are); ValueError if empty or outside the
    vocabulary. Plain Python: callers check their input with it before anything compiles."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer (or pass token ids)")
        prompt = tokenizer.encode(prompt)
    ids = checked_token_ids(prompt, vocab_size, "the prompt").tolist()
    if not ids:
        raise ValueError("the prompt is empty: give at least one token of text")
    return ids


class RowsOut:
    """Each row's output as the blocks are read: its tokens, its text (stop strings found in it)
    and why it stopped; `allowed` is False for rows a stop string ended."""

    def __init__(self, tokenizer, stop, stop_set: set[int], rows: int, max_new_tokens: int):
        # Without a tokenizer there is no text: token ids only.
        self.texts = [TextTail(tokenizer, stop) if tokenizer is not None else None
                      for _ in range(rows)]
        self.generated: list[list[int]] = [[] for _ in range(rows)]
        self.reasons = [""] * rows
        self.allowed = np.ones(rows, bool)
        self.stop_set, self.max_new_tokens = stop_set, max_new_tokens
        self.steps = 0

    def read(self, b: int, K: int, picked: np.ndarray, forced: np.ndarray):
        """Yields (row, text) of block b's selections; returns, per row a stop string ended in
        this block, the number of its tokens to replay (0 for the others)."""
        cut = np.zeros(len(self.reasons), np.int32)
        for i in range(len(self.reasons)):
            for s in range(K):
                if self.reasons[i]:
                    break
                self.steps = max(self.steps, b * K + s + 1)
                if not forced[i, s]:
                    yield from self._take(i, s, int(picked[i, s]), cut)
        return cut

    def _take(self, i: int, s: int, t: int, cut: np.ndarray):
        text = self.texts[i]
        if t in self.stop_set:
            self.reasons[i] = "stop_token"
        else:
            self.generated[i].append(t)
            piece, hit = text.push(t) if text else ("", False)
            if piece:
                yield i, piece
            if hit:
                self.reasons[i] = "stop_string"
                self.allowed[i] = False
                cut[i] = s + 2  # the block's first token and selections 0..s
            elif len(self.generated[i]) >= self.max_new_tokens:
                self.reasons[i] = "length"
        if self.reasons[i]:
            piece = text.finish() if text and self.reasons[i] != "stop_string" else ""
            if piece:
                yield i, piece
