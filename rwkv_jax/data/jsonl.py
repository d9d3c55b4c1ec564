"""Fine-tuning data from jsonl: records rendered in RWKV's chat convention, tokenized once into a
memory-mapped document file (tokens + loss mask + document starts), and batches of one document
per row whose loss covers only the tokens the model should learn to produce.

A record is one JSON object per line, of one of three kinds:

- ``{"text": t}``: plain text; every token trains.
- ``{"prompt": p, "response": r}``: the chat ``[user p, assistant r]``.
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a chat (roles system, user, assistant).

Other fields of a record are ignored. Plain NumPy; the files are written atomically under a lock
with the helpers of tokens.py, and reused while the jsonl and the tokenizer are unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from rwkv_jax.data.batches import row_range
from rwkv_jax.data.text import DAMAGED_ARCHIVE, open_text_bytes
from rwkv_jax.data.tokenizers import Tokenizer, get_tokenizer
from rwkv_jax.data.tokens import (
    _file_lock,
    _read_metadata,
    _remove_stale_temps,
    _temp_path_beside,
    _token_dtype,
    _write_json_atomic,
    made_from,
    map_array,
    metadata_path,
    source_record,
)

log = logging.getLogger(__name__)

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
TURN_SEPARATOR = "\n\n"
END_OF_DOCUMENT = 0  # the token appended to every document
RECORD_KINDS = '{"text": ...}, {"prompt": ..., "response": ...} or {"messages": [...]}'

# Bumped whenever rendering or the file layout changes, so older caches are rebuilt.
DOCUMENT_FORMAT = "rwkv_jax.jsonl.v1"

# A blank line (possibly holding spaces or tabs) inside a content: in the chat convention "\n\n"
# ends a turn, so the content's paragraphs are joined by a single "\n".
_BLANK_LINES = re.compile(r"\n\s*\n")


def _clean_content(content: str) -> str:
    r"""A message's content as the chat convention writes it: "\r\n" -> "\n", leading and
    trailing whitespace stripped, and every run of blank lines inside collapsed to one "\n"
    (as ChatRWKV's demos do with a user's message)."""
    return _BLANK_LINES.sub("\n", content.replace("\r\n", "\n").strip())


def _check_messages(messages, where: str = "messages") -> list[tuple[str, str]]:
    """(role, content) of each message, or ValueError naming the bad field."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where} must be a non-empty list of {{\"role\", \"content\"}} objects, "
                         f"got {type(messages).__name__}")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}[{i}] must be an object, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}[{i}].role is {role!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{where}[{i}].content must be a string, got "
                             f"{type(content).__name__}")
        turns.append((role, content))
    return turns


def render_chat(messages: list[dict]) -> str:
    r"""A chat as RWKV's chat models read it: each message is a turn ``Role: content`` (Role is
    System, User or Assistant), turns joined by "\n\n", nothing before the first or after the
    last. Each content is cleaned first: "\r\n" becomes "\n", leading and trailing whitespace
    is stripped, and a run of blank lines inside becomes one "\n" (a "\n\n" would end the turn).
    ValueError on an unknown role or a content that is not a string."""
    return "".join(text for text, _ in _chat_segments(_check_messages(messages)))


def _chat_segments(turns: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    """The chat's text cut into (text, trains) pieces: an assistant's content (with the space
    after "Assistant:") trains, and so does the "\n\n" that ends an assistant turn followed by
    another (the model learns to end its turn); the rest is context."""
    pieces: list[tuple[str, bool]] = []
    for i, (role, content) in enumerate(turns):
        if i:
            pieces.append((TURN_SEPARATOR, turns[i - 1][0] == "assistant"))
        content = _clean_content(content)
        if role == "assistant":
            # The space after the colon trains: at inference the prompt ends with "Assistant:"
            # (ChatRWKV: "dont add space after this final ':'") and the model writes " ...".
            pieces += [(f"{ROLES[role]}:", False), (f" {content}", True)]
        else:
            pieces.append((f"{ROLES[role]}: {content}", False))
    return pieces


def _merge(pieces: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Adjacent pieces with the same flag joined, so they are tokenized together."""
    merged: list[tuple[str, bool]] = []
    for text, trains in pieces:
        if merged and merged[-1][1] == trains:
            merged[-1] = (merged[-1][0] + text, trains)
        else:
            merged.append((text, trains))
    return merged


def record_segments(record) -> list[tuple[str, bool]]:
    """A jsonl record as (text, trains) pieces whose texts, joined, are the document.

    ``{"text": t}`` -> ``[(t, True)]`` (the text as is). ``{"prompt": p, "response": r}`` is the
    chat ``[user p, assistant r]``: ``[("User: p\\n\\nAssistant:", False), (" r", True)]``.
    ``{"messages": [...]}`` -> render_chat's text, where only the assistants' contents (with
    the space after "Assistant:") and the "\\n\\n" ending an assistant turn that another turn
    follows train. Adjacent pieces of the same flag are merged. ValueError naming the field
    when the record has none of these kinds, more than one, or a field of the wrong type."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object ({RECORD_KINDS}), got "
                         f"{type(record).__name__}")
    kinds = [k for k in ("text", "messages", "prompt") if k in record]
    if not kinds and "response" in record:
        kinds = ["prompt"]
    if len(kinds) != 1:
        found = ", ".join(repr(k) for k in kinds) if kinds else "none of their fields"
        raise ValueError(f"a record must be one of {RECORD_KINDS}; it has {found}")
    if kinds[0] == "text":
        if not isinstance(record["text"], str):
            raise ValueError(f"field 'text' must be a string, got {type(record['text']).__name__}")
        return [(record["text"], True)]
    if kinds[0] == "messages":
        return _merge(_chat_segments(_check_messages(record["messages"])))
    for key in ("prompt", "response"):
        if not isinstance(record.get(key), str):
            got = type(record[key]).__name__ if key in record else "nothing"
            raise ValueError(f"field {key!r} must be a string, got {got}")
    turns = [("user", record["prompt"]), ("assistant", record["response"])]
    return _merge(_chat_segments(turns))


def tokenize_record(record, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32, loss_mask bool) of a record's document: each piece of `record_segments`
    tokenized on its own (so the mask changes only between tokens), then END_OF_DOCUMENT (0),
    which trains when the last piece does (a text, or a chat whose last turn is the
    assistant's: the model learns to stop). loss_mask[i] says whether token i is a target
    the loss counts."""
    ids: list[int] = []
    mask: list[bool] = []
    segments = record_segments(record)
    for text, trains in segments:
        piece = tokenizer.encode(text)
        ids += piece
        mask += [trains] * len(piece)
    ids.append(END_OF_DOCUMENT)
    mask.append(segments[-1][1])
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)


def mask_path(path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}.mask")


def starts_path(path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}.starts")


_STARTS_DTYPE = np.dtype("<i8")


class DocumentFile:
    """A read-only memory map of a file written by `prepare_jsonl`: `tokens`, `loss_mask`
    (uint8, 1 where the token is a trained target) and `starts` (num_docs + 1 offsets;
    document i is tokens[starts[i]:starts[i+1]])."""

    num_bytes = None  # the documents' text bytes are not counted (their jsonl's are not theirs)

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_path = metadata_path(self.path)
        for p in (self.path, mask_path(self.path), starts_path(self.path), meta_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p} not found (create {self.path} with prepare_jsonl)")
        try:
            self.meta = _read_document_metadata(meta_path)
        except ValueError as e:
            raise ValueError(f"the metadata of {self.path}, {meta_path}, is damaged: it {e}; "
                             f"re-run prepare_jsonl for it") from None
        self.num_tokens: int = self.meta["num_tokens"]
        self.num_docs: int = self.meta["num_docs"]
        self.tokenizer: str = self.meta["tokenizer"]
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        problem = _size_problem(self.path, self.meta)
        if problem:
            raise ValueError(f"{problem}; re-run prepare_jsonl")
        self.tokens = map_array(self.path, self.dtype, self.num_tokens)
        self.loss_mask = map_array(mask_path(self.path), np.uint8, self.num_tokens)
        self.starts = map_array(starts_path(self.path), _STARTS_DTYPE, self.num_docs + 1)

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32, loss_mask bool) of document i."""
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} of {self.path}, which has {self.num_docs}")
        a, b = int(self.starts[i]), int(self.starts[i + 1])
        return np.asarray(self.tokens[a:b], dtype=np.int32), np.asarray(self.loss_mask[a:b]) != 0

    def __len__(self) -> int:
        return self.num_docs

    def __repr__(self) -> str:
        return (f"DocumentFile({str(self.path)!r}, num_docs={self.num_docs}, "
                f"num_tokens={self.num_tokens}, tokenizer={self.tokenizer!r})")


def _read_document_metadata(meta_path: Path) -> dict:
    meta = _read_metadata(meta_path)
    if meta.get("format") != DOCUMENT_FORMAT:
        raise ValueError(f"has format={meta.get('format')!r}, not {DOCUMENT_FORMAT!r}")
    for key in ("num_docs", "num_trained"):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"has {key}={value!r}, not a count")
    return meta


def _size_problem(path: Path, meta: dict) -> str | None:
    """What is wrong with the sizes of the three files against `meta`, or None."""
    expected = {
        path: meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize,
        mask_path(path): meta["num_tokens"],
        starts_path(path): (meta["num_docs"] + 1) * _STARTS_DTYPE.itemsize,
    }
    for p, size in expected.items():
        actual = p.stat().st_size
        if actual != size:
            return f"{p} is {actual} bytes but its metadata {metadata_path(path)} implies {size}"
    return None


def _is_up_to_date(out_path: Path, source: Path, tokenizer_name: str) -> bool:
    meta_path = metadata_path(out_path)
    try:
        meta = _read_document_metadata(meta_path)
        if _size_problem(out_path, meta):
            return False
    except (OSError, ValueError):  # missing or damaged: a stale cache, rebuilt
        return False
    return made_from(meta, source, tokenizer_name)


def _iter_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed record) of each non-blank line, read line by line; ValueError
    `FILE:LINE: ...` on a line that is not UTF-8 JSON."""
    try:
        with open_text_bytes(path) as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    yield lineno, json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not UTF-8 ({e})") from None
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not JSON ({e}); each line must be one of "
                                     f"{RECORD_KINDS}") from None
    except DAMAGED_ARCHIVE as e:
        raise ValueError(f"{path}: damaged archive ({e})") from None


# Tokens buffered before a write: few writes, little memory, however many short records.
_FLUSH_TOKENS = 1 << 20


def _tokenize_jsonl(source: Path, tokenizer: Tokenizer, dests: tuple[Path, Path, Path],
                    dtype: np.dtype) -> dict:
    """Streams the documents of `source` into the (tokens, mask, starts) files `dests`;
    returns the counts for the metadata."""
    limit = np.iinfo(dtype).max
    counts = {"num_tokens": 0, "num_docs": 0, "num_trained": 0, "max_token_id": -1}
    buf_ids: list[np.ndarray] = []
    buf_mask: list[np.ndarray] = []
    buf_ends: list[int] = []
    with open(dests[0], "wb") as f_ids, open(dests[1], "wb") as f_mask, \
            open(dests[2], "wb") as f_starts:
        np.zeros(1, dtype=_STARTS_DTYPE).tofile(f_starts)

        def flush() -> None:
            if buf_ids:
                np.concatenate(buf_ids).astype(dtype).tofile(f_ids)
                np.concatenate(buf_mask).astype(np.uint8).tofile(f_mask)
                np.asarray(buf_ends, dtype=_STARTS_DTYPE).tofile(f_starts)
            buf_ids.clear(), buf_mask.clear(), buf_ends.clear()

        pending = 0
        for lineno, record in _iter_records(source):
            try:
                ids, mask = tokenize_record(record, tokenizer)
            except ValueError as e:
                raise ValueError(f"{source}:{lineno}: {e}") from None
            if int(ids.max()) > limit or int(ids.min()) < 0:
                raise ValueError(f"{source}:{lineno}: tokenizer {tokenizer.name!r} produced id "
                                 f"{int(ids.max())} outside {dtype.name}; its vocab_size "
                                 f"({tokenizer.vocab_size}) is wrong")
            counts["max_token_id"] = max(counts["max_token_id"], int(ids.max()))
            counts["num_tokens"] += len(ids)
            counts["num_docs"] += 1
            counts["num_trained"] += int(mask.sum())
            buf_ids.append(ids), buf_mask.append(mask), buf_ends.append(counts["num_tokens"])
            pending += len(ids)
            if pending >= _FLUSH_TOKENS:
                flush()
                pending = 0
        flush()
    return counts


def prepare_jsonl(path: str | os.PathLike, tokenizer: Tokenizer | str,
                  out_path: str | os.PathLike) -> DocumentFile:
    """Tokenizes a jsonl file (plain, .gz or .xz) of records into `out_path` (tokens, uint16
    when the vocabulary fits, else uint32), `out_path.mask` (uint8 loss mask),
    `out_path.starts` (int64 document offsets) and `out_path.json` (counts, the source's
    size and mtime, the tokenizer), reusing them while up to date. Blank lines are skipped;
    a bad line is a one-line ValueError `FILE:LINE: what is wrong`."""
    if isinstance(tokenizer, str):
        tokenizer = get_tokenizer(tokenizer)
    source, out_path = Path(path), Path(out_path)
    if not source.is_file():
        raise FileNotFoundError(f"jsonl file not found: {source}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out_path):  # the first to come writes it, the others wait, then reuse it
        for p in (out_path, mask_path(out_path), starts_path(out_path)):
            _remove_stale_temps(p)
        if _is_up_to_date(out_path, source, tokenizer.name):
            log.info("Reusing %s (up to date with %s)", out_path, source)
            return DocumentFile(out_path)
        return _write_documents(source, tokenizer, out_path)


def _write_documents(source: Path, tokenizer: Tokenizer, out_path: Path) -> DocumentFile:
    log.info("Tokenizing %s with %s tokenizer into %s", source, tokenizer.name, out_path)
    st = source.stat()  # before reading: a change while we read leaves the record stale
    dtype = _token_dtype(tokenizer.vocab_size)
    finals = (out_path, mask_path(out_path), starts_path(out_path))
    temps = tuple(_temp_path_beside(p) for p in finals)
    try:
        counts = _tokenize_jsonl(source, tokenizer, temps, dtype)
        # Old metadata goes first: an interruption among the renames leaves no metadata
        # (DocumentFile refuses it) rather than metadata that matches some files only.
        metadata_path(out_path).unlink(missing_ok=True)
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    meta = {
        "format": DOCUMENT_FORMAT,
        **counts,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": tokenizer.name,
        **source_record(source, st),
        "num_bytes": st.st_size,  # of the jsonl (its text's bytes are not counted)
    }
    _write_json_atomic(metadata_path(out_path), meta)
    log.info("Wrote %d documents, %d tokens (%d trained) to %s", counts["num_docs"],
             counts["num_tokens"], counts["num_trained"], out_path)
    return DocumentFile(out_path)


def count_long(docs: DocumentFile, seq_len: int) -> int:
    """How many documents `document_batch` cuts at seq_len (longer than seq_len + 1 tokens)."""
    return int(np.count_nonzero(np.diff(docs.starts) > seq_len + 1))


def count_untrained(docs: DocumentFile, seq_len: int) -> int:
    """How many documents have no trained target within the first seq_len + 1 tokens a row
    takes (a prompt longer than the row, or no assistant turn): rows that teach nothing."""
    starts = np.asarray(docs.starts, np.int64)
    first = starts[:-1] + 1  # targets are tokens 1.. of a document
    last = np.minimum(starts[1:], starts[:-1] + seq_len + 1)
    has = last > first
    if not has.any():
        return len(first)
    # The mask summed over [first, last) of each document in one pass: reduceat over the
    # increasing edges f0, l0, f1, l1, ... sums every gap too, which [::2] drops; an edge at the
    # mask's end is left out, its segment then running to the end.
    edges = np.stack([first[has], last[has]], axis=1).ravel()
    if edges[-1] == docs.num_tokens:
        edges = edges[:-1]
    sums = np.add.reduceat(docs.loss_mask, edges, dtype=np.int64)[::2]
    return int(np.count_nonzero(~has) + np.count_nonzero(sums == 0))


def document_batch(docs: DocumentFile, *, step: int, seed: int, batch_size: int, seq_len: int,
                   rows: slice | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One document per row: (x int32, y int32, mask float32), each (rows, seq_len).

    The batch's documents depend only on (seed, step): all batch_size indices are drawn, then
    `rows` (a contiguous slice) taken, so any process count sees the same global batch. x is a
    document's tokens but the last, y the next tokens, mask the loss mask of y's tokens; a
    document longer than seq_len + 1 tokens is cut to its first seq_len + 1, a shorter one
    padded with token 0 and mask 0."""
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
    if docs.num_docs == 0:
        raise ValueError(f"{docs.path} holds no documents; a batch needs at least one")
    rng = np.random.default_rng([seed, step])
    picks = rng.integers(0, docs.num_docs, size=batch_size)
    start, stop = row_range(rows, batch_size)
    n = stop - start
    x = np.zeros((n, seq_len), dtype=np.int32)
    y = np.zeros((n, seq_len), dtype=np.int32)
    mask = np.zeros((n, seq_len), dtype=np.float32)
    for r, i in enumerate(picks[start:stop]):
        a = int(docs.starts[i])
        b = min(int(docs.starts[i + 1]), a + seq_len + 1)
        toks = np.asarray(docs.tokens[a:b], dtype=np.int32)
        k = len(toks) - 1
        if k > 0:
            x[r, :k], y[r, :k] = toks[:-1], toks[1:]
            mask[r, :k] = docs.loss_mask[a + 1 : b]
    return x, y, mask
