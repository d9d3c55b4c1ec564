"""Reading text: plain or compressed (.xz, .gz), in blocks split at line or character boundaries,
and the path of the bundled sample.
"""

from __future__ import annotations

import gzip
import importlib.resources
import logging
import lzma
import os
import zlib
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


# Big enough that per-block overhead is negligible, small enough that the text,
# its token list and the NumPy copy of it fit comfortably in memory together.
DEFAULT_BLOCK_BYTES = 4 << 20


# Text may come compressed: read through the decompressor, so the bundled sample (xz) and
# users' .gz corpora need no unpacked copy. Token counts and bits per byte see the text's bytes.
COMPRESSED_TEXT = {".xz": lzma.open, ".gz": gzip.open}


DAMAGED_ARCHIVE = (lzma.LZMAError, gzip.BadGzipFile, zlib.error, EOFError)  # what a bad one raises


BUNDLED_SAMPLE = "shakespeare"


def open_text_bytes(path: str | os.PathLike):
    """A binary file object over a text file's bytes (`.txt`, `.txt.xz`, `.txt.gz`)."""
    opener = COMPRESSED_TEXT.get(Path(path).suffix, open)
    return opener(path, "rb")


def text_stem(path: str | os.PathLike) -> str:
    """The file's name without its compression and text suffixes (train.txt.xz -> train)."""
    name = Path(path).name
    for suffix in (*COMPRESSED_TEXT, ".txt"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    return name


def sample_path(name: str) -> str:
    """The bundled Shakespeare sample's `name` split ("train" or "val"): package data, xz."""
    return str(importlib.resources.files("rwkv_jax") / "samples" / BUNDLED_SAMPLE / f"{name}.txt.xz")


def _split_point(buf: bytes) -> int:
    """Where to cut `buf` so the head is whole lines (or, failing that, whole characters).

    Returns 0 when `buf` is too short to cut safely and more data is needed.
    """
    newline = buf.rfind(b"\n")
    if newline >= 0:
        return newline + 1
    # A single line longer than a block: cut before the last character's lead
    # byte so memory stays bounded. 0b10xxxxxx marks a continuation byte.
    for cut in range(len(buf) - 1, max(len(buf) - 4, 0), -1):
        if buf[cut] & 0xC0 != 0x80:
            return cut
    # No lead byte in the last three: either the buffer is too short to tell, or
    # it ends with a whole 4-byte character (or invalid data, which decoding reports).
    return 0 if len(buf) < 4 else len(buf)


def iter_text_blocks(text_path: Path, block_bytes: int) -> Iterator[str]:
    """Yields the file's text in pieces of about `block_bytes`, cut at line ends.

    Splitting never changes the byte tokenizer's output. For subword tokenizers a
    token cannot span a cut, so the result may differ slightly from tokenizing the
    whole text; cutting after a newline keeps that to rare merges across lines,
    which is an acceptable price for bounded memory.
    """
    carry = b""
    offset = 0
    with open_text_bytes(text_path) as f:
        while True:
            try:
                chunk = f.read(block_bytes)
            except DAMAGED_ARCHIVE as e:
                raise ValueError(f"{text_path} is not a readable compressed file ({e})") from e
            buf = carry + chunk
            if not buf:
                return
            cut = len(buf) if not chunk else _split_point(buf)
            if cut == 0:
                carry = buf
                continue
            head, carry = buf[:cut], buf[cut:]
            try:
                yield head.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{text_path} is not valid UTF-8 (byte {offset + e.start}): {e.reason}"
                ) from e
            offset += len(head)
            if not chunk and not carry:
                return
