"""A Session: one generator's state kept between calls, optionally compressed (state_codec).
"""

from __future__ import annotations

from rwkv_jax.generate.generator import Generation, Generator
from rwkv_jax.generate.text import one_prompt
from rwkv_jax.nn import state_codec


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
        rows = [text] if one_prompt(text) else list(text)
        self._packed = self._pack(self.generator.feed(
            [self.generator.encode(r) for r in rows], self.state))

    def generate(self, prompt, **kwargs) -> Generation:
        kwargs["keep_state"] = True
        result = self.generator.generate(prompt, state=self.state, **kwargs)
        self._packed = self._pack(result.state)
        return result
