"""Token files: a text tokenized once into a memory-mapped cache (`.bin` + `.bin.json`), written
atomically under a lock, and the scan that checks its ids against a vocabulary.

Plain NumPy, so the data path is tested without JAX and behaves the same on every host.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
from pathlib import Path

import numpy as np

from rwkv_jax.data.text import DEFAULT_BLOCK_BYTES, iter_text_blocks
from rwkv_jax.data.tokenizers import Tokenizer, get_tokenizer

try:
    import fcntl  # POSIX: token files are locked while written (_file_lock)
except ImportError:  # Windows: no lock
    fcntl = None


log = logging.getLogger(__name__)


def metadata_path(path: str | os.PathLike) -> Path:
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


def map_array(path: str | os.PathLike, dtype, count: int, offset: int = 0) -> np.ndarray:
    """`count` items of `dtype` at byte `offset` of a file, memory-mapped read-only (an empty
    array for none: np.memmap cannot map zero bytes)."""
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def source_record(source: Path, st: os.stat_result) -> dict:
    """What a cache records of the file it was made from, to know later whether it changed."""
    return {"source": str(source.resolve()), "source_size": st.st_size,
            "source_mtime_ns": st.st_mtime_ns}


def made_from(meta: dict, source: Path, tokenizer_name: str) -> bool:
    """Whether a cache's metadata says it was made from `source` as it is now, by this
    tokenizer."""
    return ({k: meta.get(k) for k in ("source", "source_size", "source_mtime_ns", "tokenizer")}
            == {**source_record(source, source.stat()), "tokenizer": tokenizer_name})


class TokenFile:
    """A read-only memory map of a file written by `prepare_tokens`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_path = metadata_path(self.path)
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
        self.tokens = map_array(self.path, self.dtype, self.num_tokens)

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


def _recorded_range(record: Path, key: dict) -> tuple[int, int] | None:
    """(min, max) id of an earlier scan recorded for the file as `key` describes it; None where
    there is no record, it is damaged, or the file changed since (then the file is scanned)."""
    try:
        seen = json.loads(record.read_text())
        if {k: seen.get(k) for k in key} == key:
            return int(seen["min_id"]), int(seen["max_id"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return None


def _id_range(tf: TokenFile, cache_dir: str | os.PathLike | None) -> tuple[int, int]:
    """The smallest and largest id in `tf`, from a scan of the file, or from the record of an
    earlier scan in `cache_dir` if the file has not changed since (same real path, size,
    modification time and dtype)."""
    real = os.path.realpath(tf.path)
    st = os.stat(real)  # before the scan: a change while it runs makes the record stale
    key = {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "dtype": tf.dtype.str}
    record = _scan_record(cache_dir, real) if cache_dir else None
    recorded = _recorded_range(record, key) if record is not None else None
    if recorded is not None:
        return recorded
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


def _is_up_to_date(out_path: Path, source: Path, tokenizer_name: str) -> bool:
    meta_path = metadata_path(out_path)
    if not (out_path.is_file() and meta_path.is_file()):
        return False
    try:
        meta = _read_metadata(meta_path)
        size = out_path.stat().st_size
    except (OSError, ValueError):  # damaged metadata: a stale cache, rebuilt
        return False
    return (made_from(meta, source, tokenizer_name)
            and size == meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize)


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
        for text in iter_text_blocks(text_path, block_bytes):
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
        metadata_path(out_path).unlink(missing_ok=True)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    meta = {
        "num_tokens": counts["num_tokens"],
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": tokenizer.name,
        **source_record(source, st),
        "max_token_id": counts["max_token_id"],
        "num_bytes": counts["num_bytes"],
    }
    _write_json_atomic(metadata_path(out_path), meta)
    log.info("Wrote %d tokens (%d bytes of text) to %s", meta["num_tokens"], meta["num_bytes"], out_path)
    return TokenFile(out_path)
