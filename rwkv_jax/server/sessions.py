"""Stateful sessions, beyond OpenAI's API: a request with "session": true gets a "state_id" in
its response; a later request with "state_id" continues from there, sending only its new text.

A session keeps its tokens (every prompt and reply so far), not a state: the state comes from
the prefix cache, where each turn leaves the state at its start, so a continuation prefills only
the last reply and its new text, and a session that the cache has dropped still continues
(prefilling more). Sessions expire after `ttl_s` unused, and the least recently used go first
past `max_bytes` of tokens. Used from the event loop's thread only.
"""

from __future__ import annotations

import array
import collections
import secrets
import time


class Sessions:
    def __init__(self, ttl_s: float, max_bytes: int):
        self.ttl_s, self.max_bytes = ttl_s, max_bytes
        self.bytes = 0
        self._items: collections.OrderedDict[str, tuple[array.array, float]] = \
            collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, state_id: str) -> list[int] | None:
        """The session's tokens, or None if it is unknown or expired."""
        self._expire()
        item = self._items.get(state_id)
        if item is None:
            return None
        self._items[state_id] = (item[0], time.monotonic())  # used now
        self._items.move_to_end(state_id)
        return item[0].tolist()

    def put(self, tokens: list[int], state_id: str | None = None) -> str:
        """Keep `tokens` as the session `state_id` (a new one if None); its id."""
        state_id = state_id or "st-" + secrets.token_hex(12)
        self._drop(state_id)
        kept = array.array("i", tokens)
        self._items[state_id] = (kept, time.monotonic())
        self.bytes += kept.itemsize * len(kept)
        while self.bytes > self.max_bytes and self._items:
            self._drop(next(iter(self._items)))
        return state_id

    def _drop(self, state_id: str) -> None:
        item = self._items.pop(state_id, None)
        if item is not None:
            self.bytes -= item[0].itemsize * len(item[0])

    def _expire(self) -> None:
        now = time.monotonic()
        for state_id in [k for k, (_, t) in self._items.items() if now - t > self.ttl_s]:
            self._drop(state_id)
