"""Tokenizers: bytes, the RWKV World vocabulary (from the `rwkv` package), or a Hugging Face
tokenizer .json file; all with encode / decode / vocab_size.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import logging
import os
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"


TOKENIZER_CHOICES = '"byte", "world", or a path to a Hugging Face tokenizer .json file'


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens; needs no vocabulary file and never fails to encode."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # A window cut from the middle of the data can split a multi-byte character.
        return bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        return bytes(ids)


@functools.lru_cache(maxsize=1)
def _load_world_trie():
    """Builds the World trie once per process; construction takes seconds."""
    try:
        from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    except ImportError as e:
        raise ImportError(
            "The RWKV World tokenizer needs the `rwkv` package: pip install rwkv"
        ) from e
    vocab = importlib.resources.files("rwkv").joinpath(WORLD_VOCAB_FILE)
    with importlib.resources.as_file(vocab) as vocab_path:
        return TRIE_TOKENIZER(str(vocab_path))


def world_vocabulary() -> dict[int, bytes]:
    """The World vocabulary: id -> the bytes it stands for (id 0, the separator, is not listed)."""
    return dict(_load_world_trie().idx2token)


class WorldTokenizer:
    """The RWKV World tokenizer, using the vocabulary shipped with the `rwkv` package."""

    name = "world"
    vocab_size = 65536

    def __init__(self) -> None:
        self._trie = _load_world_trie()

    def encode(self, text: str) -> list[int]:
        return self._trie.encode(text)

    def decode(self, ids: list[int]) -> str:
        # The package's own decode turns any bad UTF-8 into a single U+FFFD,
        # losing the rest of the text; replace only the bad bytes instead.
        return self._trie.decodeBytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self._trie.decodeBytes(ids)


class HFTokenizer:
    """Any Hugging Face `tokenizers` JSON file."""

    def __init__(self, path: str | os.PathLike) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Tokenizer file not found: {path}")
        self.path = path
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for bad JSON
            raise ValueError(f"{path} is not a tokenizers .json file: {e}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # The content hash makes prepared token files go stale when the
        # tokenizer file is edited in place, not only when it is renamed.
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        self.name = f"hf:{path.name}:{digest}"

    def encode(self, text: str) -> list[int]:
        # Text is tokenized in blocks, so a post-processor's BOS/EOS would be
        # scattered through the corpus at arbitrary block boundaries.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def get_tokenizer(spec: str) -> Tokenizer:
    """Maps a config value ("byte", "world" or a .json path) to a tokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "world":
        return WorldTokenizer()
    if str(spec).endswith(".json"):
        return HFTokenizer(spec)
    raise ValueError(f"Unknown tokenizer {spec!r}; expected {TOKENIZER_CHOICES}.")
