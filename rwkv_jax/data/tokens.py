"""Tokenizers, on-disk token files, deterministic batches and sequence chunking.

Everything here is plain NumPy so the data path can be tested without JAX and
behaves identically on every host of a multi-host run.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import importlib.resources
import json
import logging
import lzma
import math
import os
import re
import socket
import tempfile
import zlib
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from rwkv_jax.config import check_chunking

try:
    import fcntl  # POSIX: token files are locked while written (_file_lock)
except ImportError:  # Windows: no lock
    fcntl = None

log = logging.getLogger(__name__)

WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"
TOKENIZER_CHOICES = '"byte", "world", or a path to a Hugging Face tokenizer .json file'

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


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Token files
# ---------------------------------------------------------------------------


def _metadata_path(path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}.json")


def _token_dtype(vocab_size: int) -> np.dtype:
    # Explicit little-endian so files are portable between machines.
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


_META_COUNTS = ("num_tokens", "vocab_size", "max_token_id", "num_bytes")


def _read_metadata(meta_path: Path) -> dict:
    """A token file's metadata, or ValueError saying how it is damaged (not JSON, not an
    object, a field missing or of the wrong type, a dtype that is not an integer type)."""
    try:
        meta = json.loads(meta_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"holds a JSON {type(meta).__name__}, not an object")
    missing = [k for k in (*_META_COUNTS, "tokenizer", "dtype") if k not in meta]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}")
    for key in _META_COUNTS:
        value = meta[key]
        least = -1 if key == "max_token_id" else 0  # -1: an empty file has no largest id
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"has {key}={value!r}, not a count")
    if not isinstance(meta["tokenizer"], str):
        raise ValueError(f"has tokenizer={meta['tokenizer']!r}, not a name")
    try:
        dtype = np.dtype(meta["dtype"]) if isinstance(meta["dtype"], str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "ui":
        raise ValueError(f"has dtype={meta['dtype']!r}, not an integer type such as 'uint16'")
    return meta


class TokenFile:
    """A read-only memory map of a file written by `prepare_tokens`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_path = _metadata_path(self.path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"Token file not found: {self.path} (create it with prepare_tokens)"
            )
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"Token metadata not found: {meta_path} (re-run prepare_tokens for {self.path})"
            )
        try:
            self.meta = _read_metadata(meta_path)
        except ValueError as e:
            raise ValueError(f"the metadata of {self.path}, {meta_path}, is damaged: it {e}; "
                             f"re-run prepare_tokens for it") from None
        self.num_tokens: int = self.meta["num_tokens"]
        self.vocab_size: int = self.meta["vocab_size"]
        self.max_token_id: int = self.meta["max_token_id"]
        self.num_bytes: int = self.meta["num_bytes"]
        self.tokenizer: str = self.meta["tokenizer"]
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")

        expected = self.num_tokens * self.dtype.itemsize
        actual = self.path.stat().st_size
        if actual != expected:
            raise ValueError(
                f"{self.path} is {actual} bytes but its metadata says {self.num_tokens} "
                f"{self.meta['dtype']} tokens ({expected} bytes); re-run prepare_tokens."
            )
        if self.num_tokens == 0:
            # np.memmap cannot map an empty file.
            self.tokens = np.zeros(0, dtype=self.dtype)
        else:
            self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r}, num_tokens={self.num_tokens}, tokenizer={self.tokenizer!r})"


# Tokens per block of a scan (check_token_ids): 64 MiB of uint32 at a time, however big the file.
SCAN_BLOCK_TOKENS = 1 << 24


def _scan_ids(tokens: np.ndarray) -> tuple[int, int]:
    """(smallest, largest) id of a non-empty token array (a memmap), read block by block."""
    lo, hi = None, None
    for a in range(0, len(tokens), SCAN_BLOCK_TOKENS):
        block = tokens[a : a + SCAN_BLOCK_TOKENS]
        b_lo, b_hi = int(block.min()), int(block.max())
        lo = b_lo if lo is None else min(lo, b_lo)
        hi = b_hi if hi is None else max(hi, b_hi)
    return lo, hi


def _first_outside(tokens: np.ndarray, vocab_size: int) -> int:
    """The offset of the first id outside 0..vocab_size-1, read block by block."""
    for a in range(0, len(tokens), SCAN_BLOCK_TOKENS):
        block = tokens[a : a + SCAN_BLOCK_TOKENS]
        bad = np.flatnonzero((block < 0) | (block >= vocab_size))
        if bad.size:
            return a + int(bad[0])
    raise AssertionError("no id outside the vocabulary")  # the caller saw one


def _scan_record(cache_dir: str | os.PathLike, real: str) -> Path:
    return Path(cache_dir) / "token_scans" / f"{hashlib.sha256(real.encode()).hexdigest()[:24]}.json"


def _id_range(tf: TokenFile, cache_dir: str | os.PathLike | None) -> tuple[int, int]:
    """The smallest and largest id in `tf`, from a scan of the file, or from the record of an
    earlier scan in `cache_dir` if the file has not changed since (same real path, size,
    modification time and dtype)."""
    real = os.path.realpath(tf.path)
    st = os.stat(real)  # before the scan: a change while it runs makes the record stale
    key = {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "dtype": tf.dtype.str}
    record = _scan_record(cache_dir, real) if cache_dir else None
    if record is not None:
        try:
            seen = json.loads(record.read_text())
            if {k: seen.get(k) for k in key} == key:
                return int(seen["min_id"]), int(seen["max_id"])
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            pass  # no record, or a damaged one: scan again
    log.info("Checking the token ids of %s", tf.path)
    lo, hi = _scan_ids(tf.tokens)
    if record is not None:
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temps(record)
            _write_json_atomic(record, {**key, "min_id": lo, "max_id": hi})
        except OSError as e:  # only a cost: the next run scans again
            log.warning("could not record the scan of %s in %s (%s)", tf.path, record, e)
    return lo, hi


def check_token_ids(tf: TokenFile, vocab_size: int,
                    cache_dir: str | os.PathLike | None = None) -> None:
    """ValueError naming the file, the offset and the vocabulary if `tf` holds an id outside
    0..vocab_size-1 (such an id makes the loss NaN). The ids are read, not the metadata, which
    a damaged or hand-made file may contradict; the scan is skipped where the file's dtype
    cannot hold such an id (uint16 and 65536 tokens), and remembered in `cache_dir`."""
    if tf.num_tokens == 0 or (tf.dtype.kind == "u" and np.iinfo(tf.dtype).max < vocab_size):
        return
    lo, hi = _id_range(tf, cache_dir)
    if lo >= 0 and hi < vocab_size:
        return
    offset = _first_outside(tf.tokens, vocab_size)
    raise ValueError(f"{tf.path} holds token id {int(tf.tokens[offset])} at token {offset} (byte "
                     f"{offset * tf.dtype.itemsize}), outside the vocabulary of {vocab_size} (ids "
                     f"0 to {vocab_size - 1}): the file is damaged, or was made with another "
                     f"tokenizer")


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


def _iter_text_blocks(text_path: Path, block_bytes: int) -> Iterator[str]:
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


def _is_up_to_date(out_path: Path, source: Path, tokenizer_name: str) -> bool:
    meta_path = _metadata_path(out_path)
    if not (out_path.is_file() and meta_path.is_file()):
        return False
    try:
        meta = _read_metadata(meta_path)
        size = out_path.stat().st_size
    except (OSError, ValueError):  # damaged metadata: a stale cache, rebuilt
        return False
    st = source.stat()
    return (
        meta.get("source") == str(source.resolve())
        and meta.get("source_size") == st.st_size
        and meta.get("source_mtime_ns") == st.st_mtime_ns
        and meta.get("tokenizer") == tokenizer_name
        and size == meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize
    )


def _writer_tag() -> str:
    """This process as temporary files name their writer: host and pid."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def _temp_path_beside(path: Path) -> Path:
    # Same folder, so os.replace is an atomic rename rather than a copy. The name carries the
    # writer (_writer_tag), so that a later run can tell the leftovers of a killed one.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_writer_tag()}.",
                                suffix=".tmp")
    os.close(fd)
    return Path(name)


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:  # it exists (another user's): not ours to judge
        return False
    return False


def _remove_stale_temps(path: Path) -> None:
    """Removes the temporaries of `path` and its metadata that writers killed mid-write left.
    Only those of this host whose process is gone: another run may be writing right now (the
    caller holds `path`'s lock, but a run on another host of a shared cache may not see it)."""
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return
    host = _writer_tag().rpartition("-")[0]
    pattern = re.compile(rf"\.{re.escape(path.name)}(\.json)?\.(?P<host>[A-Za-z0-9-]+)-"
                         rf"(?P<pid>\d+)\.[^.]+\.tmp")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        m = pattern.fullmatch(name)
        if m and m["host"] == host and _process_gone(int(m["pid"])):
            with contextlib.suppress(OSError):
                os.unlink(path.parent / name)
                log.info("removed %s, left by process %s, which is gone", path.parent / name,
                         m["pid"])


@contextlib.contextmanager
def _file_lock(path: Path):
    """Holds an exclusive lock on `path`.lock while the block runs: the processes of one
    multi-process run (and runs that share a data cache) tokenize into the same file, and one
    of them reading it while another rewrites it finds the metadata gone. Where there is no
    fcntl (Windows), nothing is locked."""
    if fcntl is None:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = _temp_path_beside(path)
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _tokenize_to_file(
    text_path: Path, tokenizer: Tokenizer, dest: Path, dtype: np.dtype, block_bytes: int
) -> dict:
    """Streams tokens of `text_path` into `dest`; returns counts for the metadata."""
    num_tokens = num_bytes = 0
    max_token_id = -1
    limit = np.iinfo(dtype).max
    with open(dest, "wb") as out:
        for text in _iter_text_blocks(text_path, block_bytes):
            ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
            if ids.size:
                block_max = int(ids.max())
                if block_max > limit or int(ids.min()) < 0:
                    raise ValueError(
                        f"Tokenizer {tokenizer.name!r} produced id {block_max} outside "
                        f"{dtype.name} range; its vocab_size ({tokenizer.vocab_size}) is wrong."
                    )
                max_token_id = max(max_token_id, block_max)
                ids.astype(dtype).tofile(out)
            num_tokens += int(ids.size)
            num_bytes += len(text.encode("utf-8"))
    return {"num_tokens": num_tokens, "num_bytes": num_bytes, "max_token_id": max_token_id}


def prepare_tokens(
    text_path: str | os.PathLike,
    tokenizer: Tokenizer | str,
    out_path: str | os.PathLike,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> TokenFile:
    """Tokenizes a UTF-8 text file into `out_path` (+ `out_path.json`), reusing it if current."""
    if isinstance(tokenizer, str):
        tokenizer = get_tokenizer(tokenizer)
    source = Path(text_path)
    out_path = Path(out_path)
    if not source.is_file():
        raise FileNotFoundError(f"Text file not found: {source}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out_path):  # the first to come writes it, the others wait, then reuse it
        _remove_stale_temps(out_path)
        if _is_up_to_date(out_path, source, tokenizer.name):
            log.info("Reusing %s (up to date with %s)", out_path, source)
            return TokenFile(out_path)
        return _write_tokens(source, tokenizer, out_path, block_bytes)


def _write_tokens(source: Path, tokenizer: Tokenizer, out_path: Path, block_bytes: int) -> TokenFile:
    log.info("Tokenizing %s with %s tokenizer into %s", source, tokenizer.name, out_path)
    # Stat before reading: if the source changes while we read, the recorded
    # mtime is stale and the next prepare redoes the work instead of trusting it.
    st = source.stat()
    dtype = _token_dtype(tokenizer.vocab_size)
    tmp = _temp_path_beside(out_path)
    try:
        counts = _tokenize_to_file(source, tokenizer, tmp, dtype, block_bytes)
        # Drop the old metadata first: an interruption after the data rename then
        # leaves no metadata (TokenFile refuses it) rather than mismatched metadata.
        _metadata_path(out_path).unlink(missing_ok=True)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    meta = {
        "num_tokens": counts["num_tokens"],
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": tokenizer.name,
        "source": str(source.resolve()),
        "source_size": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
        "max_token_id": counts["max_token_id"],
        "num_bytes": counts["num_bytes"],
    }
    _write_json_atomic(_metadata_path(out_path), meta)
    log.info("Wrote %d tokens (%d bytes of text) to %s", meta["num_tokens"], meta["num_bytes"], out_path)
    return TokenFile(out_path)


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


def _tokens_and_name(source: TokenFile | np.ndarray) -> tuple[np.ndarray, str]:
    if isinstance(source, TokenFile):
        return source.tokens, str(source.path)
    tokens = np.asarray(source)
    if tokens.ndim != 1:
        raise ValueError(f"Expected a 1-D token array, got shape {tokens.shape}.")
    return tokens, "<token array>"


def _check_length(tokens: np.ndarray, name: str, seq_len: int) -> None:
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}.")
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"{name} has {len(tokens)} tokens but a sequence of seq_len={seq_len} needs "
            f"at least {seq_len + 1} (inputs plus one target)."
        )


def _window_offsets(num_tokens: int, *, step: int, seed: int, batch_size: int, seq_len: int) -> np.ndarray:
    # Seeding from (seed, step) alone makes a batch independent of history, so a
    # resumed run replays exactly; all batch_size offsets are always drawn so any
    # subset of rows matches the full batch.
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, num_tokens - seq_len, size=batch_size)


def _row_range(rows: slice | None, batch_size: int) -> tuple[int, int]:
    if rows is None:
        return 0, batch_size
    start, stop, stride = rows.indices(batch_size)
    if stride != 1:
        raise ValueError(f"rows must be a contiguous slice, got step {stride}.")
    return start, max(start, stop)


def get_batch(
    token_file_or_array: TokenFile | np.ndarray,
    *,
    step: int,
    seed: int,
    batch_size: int,
    seq_len: int,
    rows: slice | None = None,
    reads: list | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Random windows whose positions depend only on (seed, step, row).

    Returns int32 (inputs, targets) of shape (rows, seq_len), targets shifted by
    one token. Only the selected rows' windows are read; their (row_start,
    row_stop) is appended to `reads` when given.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    tokens, name = _tokens_and_name(token_file_or_array)
    _check_length(tokens, name, seq_len)
    offsets = _window_offsets(len(tokens), step=step, seed=seed, batch_size=batch_size, seq_len=seq_len)
    start, stop = _row_range(rows, batch_size)
    index = offsets[start:stop, None] + np.arange(seq_len + 1)
    windows = np.asarray(tokens[index], dtype=np.int32)
    if reads is not None:
        reads.append((start, stop))
    return windows[:, :-1], windows[:, 1:]


# ---------------------------------------------------------------------------
# Chunking long sequences
# ---------------------------------------------------------------------------


def chunk_spans(seq_len: int, chunk_size: int, overlap: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk; every chunk is exactly `chunk_size` long.

    With overlap, the last chunk is pulled back to end at `seq_len` so no chunk
    needs padding, which can make it overlap its predecessor by more than `overlap`.
    """
    check_chunking(seq_len, chunk_size, overlap)
    stride = chunk_size - overlap
    starts = list(range(0, seq_len - chunk_size + 1, stride))
    if starts[-1] + chunk_size < seq_len:
        starts.append(seq_len - chunk_size)
    return [(s, s + chunk_size) for s in starts]


def chunk_loss_masks(seq_len: int, chunk_size: int, overlap: int) -> np.ndarray:
    """float32 (num_chunks, chunk_size): 1 where a target is counted for the first time."""
    spans = chunk_spans(seq_len, chunk_size, overlap)
    masks = np.ones((len(spans), chunk_size), dtype=np.float32)
    for i in range(1, len(spans)):
        already_counted = spans[i - 1][1] - spans[i][0]
        masks[i, :already_counted] = 0.0
    return masks


def state_handoff(seq_len: int, chunk_size: int, overlap: int) -> list[int]:
    """For each chunk but the last, the position within it whose state starts the next chunk."""
    spans = chunk_spans(seq_len, chunk_size, overlap)
    return [nxt[0] - cur[0] for cur, nxt in zip(spans, spans[1:])]


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def bits_per_byte(mean_loss_nats_per_token: float, num_tokens: int, num_bytes: int) -> float:
    """Converts mean token loss to bits per UTF-8 byte, comparable across tokenizers."""
    if num_bytes <= 0:
        raise ValueError(f"num_bytes must be positive, got {num_bytes}.")
    return float(mean_loss_nats_per_token) * num_tokens / (num_bytes * math.log(2))
