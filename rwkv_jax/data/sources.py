"""What data.train_file and data.val_file name, opened, and the trainer's batches drawn from them.

A file is, by its name and what lies beside it: a binidx pair (PREFIX, PREFIX.bin or PREFIX.idx,
with both present: what RWKV-LM's make_data.py writes), a token cache (a .bin with its
.bin.json), jsonl (documents with loss masks: data.jsonl), or text (.txt, .txt.xz, .txt.gz,
tokenized once into the cache). data.train_file may be a mixture, "path:weight,...": each row
of a batch comes from one entry, drawn in proportion to the weights from (seed, step) alone.

Every batch is a function of (seed, step) and the global row, so a resumed run, or a run on
another number of processes, reads the same rows.
"""

from __future__ import annotations

import os
import queue
import threading
import time

import numpy as np

from rwkv_jax.config import data_entries
from rwkv_jax.data.batches import get_batch, row_range
from rwkv_jax.data.binidx import BinIdx, binidx_prefix
from rwkv_jax.data.jsonl import (DocumentFile, count_long, count_untrained, document_batch,
                                  prepare_jsonl)
from rwkv_jax.data.rwkv_lm import (check_magic_prime, check_rwkv_lm_batch, magic_prime,
                                   rwkv_lm_batch)
from rwkv_jax.data.text import text_stem
from rwkv_jax.data.tokens import TokenFile, prepare_tokens

# Rows of a mixture pick their entry from a stream of their own, apart from the windows'.
_MIXTURE_STREAM = 0x6D6978


def _cache_name(path: str, tokenizer, suffix: str, cache_dir: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in tokenizer.name)
    return os.path.join(cache_dir, f"{text_stem(path)}.{safe}{suffix}")


def open_source(path: str, tokenizer, cache_dir: str):
    """A TokenFile (text, tokenized into the cache; or a token cache .bin), a BinIdx or a
    DocumentFile (jsonl, tokenized with its loss masks into the cache)."""
    prefix = binidx_prefix(path)
    if prefix is not None:
        return BinIdx(prefix)
    if path.endswith(".bin"):
        return TokenFile(path)
    if path.endswith(".jsonl"):
        return prepare_jsonl(path, tokenizer, _cache_name(path, tokenizer, ".docs.bin", cache_dir))
    return prepare_tokens(path, tokenizer, _cache_name(path, tokenizer, ".bin", cache_dir))


def open_sources(spec: str, tokenizer, cache_dir: str) -> list[tuple[object, float]]:
    """data.train_file's entries, opened, with their weights."""
    return [(open_source(path, tokenizer, cache_dir), w) for path, w in data_entries(spec)]


def stream_of(source) -> np.ndarray:
    """A source's tokens as one stream (documents back to back)."""
    return source.tokens


class Batches:
    """The trainer's batches: `batches(step, rows)` -> (inputs, targets, loss mask or None),
    each (rows, seq_len); the mask is None where every target counts (token streams)."""

    def __init__(self, sources: list[tuple[object, float]], *, sampler: str, seed: int,
                 batch_size: int, seq_len: int, prime: int = 0, world_size: int = 1):
        self.sources = sources
        self.sampler, self.seed = sampler, seed
        self.batch_size, self.seq_len = batch_size, seq_len
        self.world_size = world_size
        self.masked = any(isinstance(s, DocumentFile) for s, _ in sources)
        self.prime = 0
        if sampler == "rwkv_lm":
            if len(sources) != 1:
                raise ValueError("data.sampler='rwkv_lm' reads one token stream: give "
                                 "data.train_file one file, not a mixture")
            source = sources[0][0]
            if isinstance(source, DocumentFile):
                raise ValueError("data.sampler='rwkv_lm' reads a token stream (text, binidx or a "
                                 "token .bin); jsonl documents take data.sampler='random'")
            check_rwkv_lm_batch(batch_size, world_size)
            n = len(stream_of(source))
            self.prime = prime or magic_prime(n, seq_len)
            check_magic_prime(self.prime, n, seq_len)

    def long_documents(self) -> tuple[int, int, int]:
        """(documents longer than a row, documents with no trained target within a row,
        documents) over the jsonl sources."""
        docs = [s for s, _ in self.sources if isinstance(s, DocumentFile)]
        return (sum(count_long(d, self.seq_len) for d in docs),
                sum(count_untrained(d, self.seq_len) for d in docs),
                sum(d.num_docs for d in docs))

    def __call__(self, step: int, rows: slice | None = None):
        if len(self.sources) == 1:
            return self._one(self.sources[0][0], step, rows)
        return self._mixture(step, rows)

    def _one(self, source, step: int, rows: slice | None, seed: int | None = None):
        seed = self.seed if seed is None else seed
        B, T = self.batch_size, self.seq_len
        if isinstance(source, DocumentFile):
            return document_batch(source, step=step, seed=seed, batch_size=B, seq_len=T, rows=rows)
        if self.sampler == "rwkv_lm":
            x, y = rwkv_lm_batch(stream_of(source), step=step, batch_size=B, ctx=T,
                                 prime=self.prime, world_size=self.world_size, rows=rows)
        else:
            x, y = get_batch(source if isinstance(source, TokenFile) else stream_of(source),
                             step=step, seed=seed, batch_size=B, seq_len=T, rows=rows)
        return x, y, (np.ones(x.shape, np.float32) if self.masked else None)

    def _mixture(self, step: int, rows: slice | None):
        B = self.batch_size
        start, stop = row_range(rows, B)
        weights = np.asarray([w for _, w in self.sources], np.float64)
        pick = np.random.default_rng([self.seed, step, _MIXTURE_STREAM]).choice(
            len(self.sources), size=B, p=weights / weights.sum())[start:stop]
        x = np.zeros((stop - start, self.seq_len), np.int32)
        y, m = np.zeros_like(x), np.ones(x.shape, np.float32)
        for k, (source, _) in enumerate(self.sources):
            chosen = np.flatnonzero(pick == k)
            if chosen.size:
                # The entry's own batch over these rows, from a seed of its own, and the rows
                # that picked it: one read per entry.
                seq = np.random.SeedSequence([self.seed, _MIXTURE_STREAM, k])
                seed = int(seq.generate_state(1)[0])
                xs, ys, ms = self._one(source, step, slice(start, stop), seed=seed)
                x[chosen], y[chosen] = xs[chosen], ys[chosen]
                if ms is not None:
                    m[chosen] = ms[chosen]
        return x, y, (m if self.masked else None)


class Prefetcher:
    """Batches made on a background thread a step ahead of the loop (one waiting, one being
    made), so reading and tokenizing overlap the device's step; `waited` is the time the loop
    spent waiting for them. Keys must be asked for in the order `keys` gives them."""

    def __init__(self, make, keys):
        self._make, self._keys = make, iter(keys)
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self.waited = 0.0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rwkv-batches", daemon=True)
        self._thread.start()

    def _run(self):
        try:
            for key in self._keys:
                batch = self._make(key)
                if not self._put((key, batch, None)):
                    return
            self._put((None, None, LookupError("no batch past the last key")))
        except BaseException as e:  # noqa: BLE001 - handed to the loop, which raises it
            self._put((None, None, e))

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self, key):
        t = time.perf_counter()
        got, batch, error = self._queue.get()
        self.waited += time.perf_counter() - t
        if error is not None:
            raise error
        if got != key:
            raise RuntimeError(f"batch for {key} expected, {got} came (a bug)")
        return batch

    def close(self) -> None:
        """Stops the thread and waits for it (a batch being made is finished first)."""
        self._closed.set()
        self._thread.join()


__all__ = ["Batches", "Prefetcher", "open_source", "open_sources", "stream_of"]
