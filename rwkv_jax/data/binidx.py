"""RWKV-LM's Megatron-style binidx (`PREFIX.bin` + `PREFIX.idx`): read memory-mapped, checked
against its own lengths, and written byte for byte as RWKV-LM's make_data.py writes it.

`.idx`: magic b"MMIDIDX\\x00\\x00", u64 version 1, u8 dtype code, u64 item count n, u64 document
count d, then int32 sizes[n], int64 byte pointers[n], int64 doc_idx[d], all little-endian.
`.bin`: the items' tokens back to back. RWKV-LM samples the `.bin` as one token stream
(get(idx=0, offset, length)), so `BinIdx.tokens` is that stream, item boundaries ignored.
"""

from __future__ import annotations

import os
import struct
import tempfile
from array import array
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from rwkv_jax.data.tokens import map_array

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, items, documents: 34 bytes

# The dtype codes of RWKV-LM's binidx.py; 6 and 7 (float, double) are not tokens.
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
FLOAT_CODES = {6: "float64", 7: "float64 (double)"}
VALID_CODES = "1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16"

# Items checked per block, so validating a huge index holds only a block in memory: small
# enough that the block's temporaries stay under the allocator's heap-growth threshold and
# anonymous memory does not grow with the corpus (bench/data_loader.py).
CHECK_BLOCK = 1 << 18


def _split(path: str | os.PathLike) -> tuple[str, str]:
    path = os.fspath(path)
    if path.endswith((".bin", ".idx")):
        return path[:-4], path[-4:]
    return path, ""


def binidx_prefix(path: str | os.PathLike) -> str | None:
    """PREFIX when `path` (PREFIX, PREFIX.bin or PREFIX.idx) is a binidx pair; None when it is not
    binidx (a text file, or a token cache `.bin` with its `.bin.json`). ValueError when a `.bin`
    could be either (an `.idx` and a `.bin.json` beside it) or is neither, or half a pair exists."""
    prefix, ext = _split(path)
    bin_path, idx_path, meta_path = f"{prefix}.bin", f"{prefix}.idx", f"{prefix}.bin.json"
    has_bin, has_idx, has_meta = (os.path.isfile(p) for p in (bin_path, idx_path, meta_path))
    if not has_idx:
        if ext == ".idx":
            raise FileNotFoundError(f"binidx index not found: {idx_path}")
        if ext == ".bin" and has_bin and not has_meta:
            raise ValueError(f"{bin_path} has neither {idx_path} beside it (RWKV-LM binidx) nor "
                             f"{meta_path} (a prepare_tokens cache): cannot tell how to read it")
        return None
    if not has_bin:
        raise ValueError(f"{idx_path} has no {bin_path} beside it: a binidx needs both files")
    if has_meta:
        raise ValueError(f"{bin_path} has both {idx_path} (RWKV-LM binidx) and {meta_path} (a "
                         f"prepare_tokens cache) beside it: remove the one that is stale")
    return prefix


def _read_header(idx_path: str) -> tuple[np.dtype, int, int]:
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise ValueError(f"{idx_path} is {size} bytes, shorter than a binidx header "
                         f"({HEADER.size} bytes): not an RWKV-LM .idx file")
    magic, version, code, items, docs = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ValueError(f"{idx_path} starts with {magic!r}, not the binidx magic {MAGIC!r}: "
                         f"not an RWKV-LM .idx file")
    if version != VERSION:
        raise ValueError(f"{idx_path} is binidx version {version}; only version {VERSION} is read")
    if code in FLOAT_CODES:
        raise ValueError(f"{idx_path} has dtype code {code} ({FLOAT_CODES[code]}): tokens must be "
                         f"integers ({VALID_CODES})")
    if code not in DTYPE_CODES:
        raise ValueError(f"{idx_path} has dtype code {code}, not one of {VALID_CODES}")
    expected = HEADER.size + 12 * items + 8 * docs
    if size != expected:
        raise ValueError(f"{idx_path} is {size} bytes but its header says {items} items and "
                         f"{docs} documents ({expected} bytes): the file is damaged")
    return np.dtype(DTYPE_CODES[code]).newbyteorder("<"), items, docs


class BinIdx:
    """A binidx pair, memory-mapped: `tokens` (the whole `.bin` as one stream), `sizes`,
    `pointers` (byte offsets), `doc_idx`, `document(i)`. Nothing is read whole."""

    num_bytes = None  # UTF-8 bytes of the source text: binidx does not record them

    def __init__(self, path: str | os.PathLike) -> None:
        prefix = binidx_prefix(path)
        if prefix is None:
            raise ValueError(f"{os.fspath(path)} is not an RWKV-LM binidx (PREFIX.bin + PREFIX.idx)")
        self.prefix = prefix
        self.path = f"{prefix}.bin"
        idx_path = f"{prefix}.idx"
        self.dtype, self.num_items, num_docs = _read_header(idx_path)
        self.sizes = map_array(idx_path, "<i4", self.num_items, HEADER.size)
        after_sizes = HEADER.size + 4 * self.num_items
        self.pointers = map_array(idx_path, "<i8", self.num_items, after_sizes)
        self.doc_idx = map_array(idx_path, "<i8", num_docs, after_sizes + 8 * self.num_items)
        bin_bytes = os.path.getsize(self.path)
        # As RWKV-LM counts them: a trailing partial token is ignored.
        self.num_tokens = bin_bytes // self.dtype.itemsize
        self._check_items(bin_bytes)
        self._check_doc_idx()
        self.tokens = map_array(self.path, self.dtype, self.num_tokens)

    def _check_items(self, bin_bytes: int) -> None:
        item = self.dtype.itemsize
        for start in range(0, self.num_items, CHECK_BLOCK):
            sizes = np.asarray(self.sizes[start:start + CHECK_BLOCK], dtype=np.int64)
            ptrs = np.asarray(self.pointers[start:start + CHECK_BLOCK])
            bad = (sizes < 0) | (ptrs < 0) | (ptrs % item != 0) | (ptrs + sizes * item > bin_bytes)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"{self.path} is {bin_bytes} bytes but item {start + i} of {self.prefix}.idx "
                    f"spans bytes {int(ptrs[i])} to {int(ptrs[i] + sizes[i] * item)} ({int(sizes[i])}"
                    f" {self.dtype.name} tokens): the .bin is truncated or the .idx damaged")

    def _check_doc_idx(self) -> None:
        prev = 0
        for start in range(0, len(self.doc_idx), CHECK_BLOCK):
            block = np.asarray(self.doc_idx[start:start + CHECK_BLOCK])
            steps = np.diff(block, prepend=prev)
            bad = (block < 0) | (block > self.num_items) | (steps < 0)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"{self.prefix}.idx has doc_idx[{start + i}] = {int(block[i])}; "
                                 f"doc_idx must rise from 0 to the item count {self.num_items}")
            prev = int(block[-1])

    def document(self, i: int) -> np.ndarray:
        """Item i's tokens (RWKV-LM's dataset[i])."""
        if not -self.num_items <= i < self.num_items:
            raise IndexError(f"{self.prefix}.idx has {self.num_items} items; item {i} asked for")
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sizes[i])]

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"BinIdx({self.prefix!r}, num_items={self.num_items}, num_tokens={self.num_tokens})"


def _dtype_code(dtype) -> tuple[int, np.dtype]:
    dtype = np.dtype(dtype)
    for code, known in DTYPE_CODES.items():
        if dtype == np.dtype(known):
            return code, dtype.newbyteorder("<")
    raise ValueError(f"binidx cannot hold dtype {dtype}; expected one of {VALID_CODES}")


def _as_tokens(doc, dtype: np.dtype, n: int) -> np.ndarray:
    arr = np.asarray(doc)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"document {n} is a {arr.dtype} array of shape {arr.shape}; "
                         f"expected 1-D integer tokens")
    if arr.dtype != dtype and arr.size:
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise ValueError(f"document {n} has tokens outside {dtype.name}'s range "
                             f"{info.min}..{info.max}")
    return arr.astype(dtype, copy=False)


def _write_index(f, code: int, itemsize: int, sizes: array) -> None:
    # As make_data.py's builder: doc_idx = [0] then the item count after each document, and
    # every document there is one item, so doc_idx = 0..n and its count is n + 1.
    sizes_np = np.frombuffer(sizes, dtype=np.int64) if len(sizes) else np.zeros(0, np.int64)
    n = len(sizes_np)
    pointers = np.zeros(n, dtype="<i8")
    if n:
        np.cumsum(sizes_np[:-1] * itemsize, out=pointers[1:])
    f.write(HEADER.pack(MAGIC, VERSION, code, n, n + 1))
    f.write(sizes_np.astype("<i4").tobytes())
    f.write(pointers.tobytes())
    f.write(np.arange(n + 1, dtype="<i8").tobytes())


def write_binidx(prefix: str | os.PathLike, documents: Iterable, dtype=np.uint16) -> str:
    """Writes PREFIX.bin and PREFIX.idx as make_data.py does (one item and one document per
    array), through temporaries renamed at the end, so a failure leaves no partial pair."""
    prefix = os.fspath(prefix)
    code, dtype = _dtype_code(dtype)
    folder = os.path.dirname(os.path.abspath(prefix))
    name = os.path.basename(prefix)
    temps = []
    try:
        for ext in (".bin", ".idx"):
            fd, tmp = tempfile.mkstemp(prefix=f".{name}{ext}.", dir=folder)
            os.close(fd)
            temps.append(tmp)
        sizes = array("q")
        with open(temps[0], "wb") as f:
            for n, doc in enumerate(documents):
                arr = _as_tokens(doc, dtype, n)
                if arr.size >= 1 << 31:
                    raise ValueError(f"document {n} has {arr.size} tokens; binidx sizes are int32")
                f.write(arr.tobytes())
                sizes.append(arr.size)
        with open(temps[1], "wb") as f:
            _write_index(f, code, dtype.itemsize, sizes)
        # The .bin first: a reader needs both, and the new .idx arriving last completes the pair.
        os.replace(temps[0], f"{prefix}.bin")
        os.replace(temps[1], f"{prefix}.idx")
    finally:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
    return prefix
