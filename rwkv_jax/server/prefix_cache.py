"""The prefix-state cache: the state after a prompt prefix (a system prompt, a few-shot header),
kept by its tokens in an LRU bounded in bytes, so a request that starts with it prefills only
its tail. An RWKV state is kilobytes to megabytes whatever the prefix's length.

Entries are one-row flat states (rwkv_jax.nn.state.FlatLayout) on the device, which nothing
donates: the engine copies them into its slots. The engine thread is the only user, so nothing
here locks. A state resumed from the cache is prefilled in
other pieces than a straight prefill would use, so its floats may differ in the last bits.
"""

from __future__ import annotations

import collections

import jax


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: collections.OrderedDict[tuple[int, ...], tuple] = collections.OrderedDict()
        self._lengths: collections.Counter[int] = collections.Counter()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, tokens: list[int]) -> tuple[int, tuple | None]:
        """(n, the state after tokens[:n]) for the longest cached prefix, (0, None) if none
        is cached."""
        for n in sorted((n for n in self._lengths if n <= len(tokens)), reverse=True):
            key = tuple(tokens[:n])
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return n, self._entries[key]
        self.misses += bool(self.max_bytes)
        return 0, None

    def put(self, tokens: list[int], flat) -> None:
        """Keep the state after `tokens` (a copy of the engine's), dropping the least
        recently used."""
        size = sum(a.nbytes for a in jax.tree.leaves(flat))
        key = tuple(tokens)
        if not key or size > self.max_bytes or key in self._entries:
            return
        self._entries[key] = flat
        self._lengths[len(key)] += 1
        self.bytes += size
        while self.bytes > self.max_bytes:
            old, state = self._entries.popitem(last=False)
            self.bytes -= sum(a.nbytes for a in jax.tree.leaves(state))
            self._lengths[len(old)] -= 1
            if not self._lengths[len(old)]:
                del self._lengths[len(old)]
