import gzip
import json
import lzma
import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rwkv_jax import data
from rwkv_jax.data import (
    ByteTokenizer,
    HFTokenizer,
    TokenFile,
    chunk_loss_masks,
    chunk_spans,
    get_batch,
    get_tokenizer,
    prepare_tokens,
    sample_path,
    state_handoff,
    text_stem,
    tokenizers,
)
from rwkv_jax.evaluation import bits_per_byte

UNICODE_TEXT = "Hello, wörld! Ünïcode: 日本語, emoji 🚀, Ελληνικά.\nSecond line\ttabbed.\n"

try:
    import rwkv.rwkv_tokenizer  # noqa: F401

    HAVE_RWKV = True
except ImportError:
    HAVE_RWKV = False
needs_rwkv = pytest.mark.skipif(not HAVE_RWKV, reason="rwkv package not installed")


class CountingTokenizer(ByteTokenizer):
    """Byte tokenizer that records how often it was asked to encode."""

    def __init__(self):
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return super().encode(text)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    lines = [f"line {i}: the quick brown fox — ümlaut {i * i}\n" for i in range(200)]
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture
def token_array():
    return np.arange(1000, dtype=np.uint16)


# --- tokenizers --------------------------------------------------------------


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(UNICODE_TEXT)
    assert ids == list(UNICODE_TEXT.encode("utf-8"))
    assert max(ids) < tok.vocab_size == 256
    assert tok.decode(ids) == UNICODE_TEXT


def test_byte_tokenizer_decode_replaces_split_characters():
    ids = ByteTokenizer().encode("ü")
    assert ByteTokenizer().decode(ids[:1]) == "\ufffd"


@needs_rwkv
def test_world_tokenizer_round_trip():
    tok = get_tokenizer("world")
    ids = tok.encode(UNICODE_TEXT)
    assert tok.vocab_size == 65536 and tok.name == "world"
    assert len(ids) < len(UNICODE_TEXT.encode("utf-8"))
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == UNICODE_TEXT


def test_world_tokenizer_without_rwkv_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("rwkv"):
            raise ImportError("No module named 'rwkv'")
        return real_import(name, *args, **kwargs)

    tokenizers._load_world_trie.cache_clear()
    monkeypatch.setattr(builtins, "__import__", fake_import)
    try:
        with pytest.raises(ImportError, match="pip install rwkv"):
            data.WorldTokenizer()
    finally:
        monkeypatch.undo()
        tokenizers._load_world_trie.cache_clear()


def _train_hf_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Byte-level pre-tokenization and decoding make the round trip exact for any text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["the quick brown fox", "jumps over the lazy dog"] * 10, trainer)
    tok.save(str(path))
    return path


def test_hf_tokenizer_round_trip(tmp_path):
    path = _train_hf_tokenizer(tmp_path / "tok.json")
    tok = get_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    assert tok.name.startswith("hf:tok.json:")
    for text in ["the quick brown fox", UNICODE_TEXT]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_get_tokenizer_rejects_unknown_spec():
    with pytest.raises(ValueError, match="'gpt9'") as info:
        get_tokenizer("gpt9")
    assert "byte" in str(info.value) and "world" in str(info.value)


def test_get_tokenizer_missing_json_names_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        get_tokenizer(str(missing))


# --- token files -------------------------------------------------------------


def _leftover_temp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_prepare_writes_uint16_and_metadata(tmp_path, text_file):
    out = tmp_path / "corpus.bin"
    tf = prepare_tokens(text_file, ByteTokenizer(), out)
    text = text_file.read_text(encoding="utf-8")
    raw = text.encode("utf-8")

    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["dtype"] == "uint16"
    assert meta["num_tokens"] == len(raw) == meta["num_bytes"]
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 256
    assert meta["max_token_id"] == max(raw)
    assert meta["source_size"] == text_file.stat().st_size
    assert meta["source_mtime_ns"] == text_file.stat().st_mtime_ns
    assert out.stat().st_size == 2 * len(raw)
    assert np.array_equal(np.fromfile(out, dtype="<u2"), np.frombuffer(raw, dtype=np.uint8))

    assert isinstance(tf.tokens, np.memmap) and not tf.tokens.flags.writeable
    assert (tf.num_tokens, tf.vocab_size, tf.num_bytes, tf.tokenizer) == (len(raw), 256, len(raw), "byte")
    assert _leftover_temp_files(tmp_path) == []


def test_num_bytes_counts_utf8_bytes_not_characters(tmp_path):
    src = tmp_path / "u.txt"
    src.write_text(UNICODE_TEXT, encoding="utf-8")
    tf = prepare_tokens(src, "byte", tmp_path / "u.bin")
    assert tf.num_bytes == len(UNICODE_TEXT.encode("utf-8")) > len(UNICODE_TEXT)


def test_prepare_reuses_when_unchanged_and_redoes_when_source_changes(tmp_path, text_file):
    out = tmp_path / "corpus.bin"
    tok = CountingTokenizer()
    prepare_tokens(text_file, tok, out)
    first_calls = tok.calls
    assert first_calls > 0

    tf = prepare_tokens(text_file, tok, out)
    assert tok.calls == first_calls, "unchanged source must not be re-tokenized"
    assert tf.num_tokens == text_file.stat().st_size

    text_file.write_text("short new text\n", encoding="utf-8")
    st = text_file.stat()
    os.utime(text_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse-mtime filesystems
    tf = prepare_tokens(text_file, tok, out)
    assert tok.calls > first_calls
    assert tf.num_tokens == len("short new text\n")
    assert ByteTokenizer().decode(tf.tokens.tolist()) == "short new text\n"
    assert _leftover_temp_files(tmp_path) == []


def test_prepare_redoes_when_tokenizer_changes(tmp_path, text_file):
    out = tmp_path / "corpus.bin"
    prepare_tokens(text_file, ByteTokenizer(), out)
    hf = HFTokenizer(_train_hf_tokenizer(tmp_path / "tok.json"))
    tf = prepare_tokens(text_file, hf, out)
    assert tf.tokenizer == hf.name
    assert tf.num_tokens < text_file.stat().st_size


def test_interrupted_prepare_leaves_no_partial_output(tmp_path, text_file):
    class Exploding(ByteTokenizer):
        def encode(self, text):
            raise KeyboardInterrupt

    out = tmp_path / "corpus.bin"
    with pytest.raises(KeyboardInterrupt):
        prepare_tokens(text_file, Exploding(), out, block_bytes=256)
    assert not out.exists() and not Path(f"{out}.json").exists()
    assert _leftover_temp_files(tmp_path) == []


def test_concurrent_prepares_of_one_file_tokenize_it_once(tmp_path, text_file):
    """The processes of a multi-process run prepare the same token file at the same time: the
    first writes it, the others wait for it and reuse it, none reads it half-written."""

    class Slow(CountingTokenizer):  # a wide window for the others to race into
        def encode(self, text):
            time.sleep(0.01)
            return super().encode(text)

    tok, out, results, errors = Slow(), tmp_path / "cache" / "corpus.bin", [], []

    def prepare():
        try:
            results.append(prepare_tokens(text_file, tok, out, block_bytes=512).num_tokens)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=prepare) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and results == [text_file.stat().st_size] * 4
    one_pass = CountingTokenizer()
    prepare_tokens(text_file, one_pass, tmp_path / "alone.bin", block_bytes=512)
    assert tok.calls == one_pass.calls  # tokenized once, by whoever came first


@pytest.mark.parametrize("block_bytes", [1, 7, 64, 1000])
def test_blockwise_tokenization_equals_whole_text_for_bytes(tmp_path, block_bytes):
    # Includes a long line with no newline so blocks must be cut mid-line,
    # and multi-byte characters that a careless cut would split.
    text = "short\n" + "ü日🚀x" * 60 + "\n\nend without newline é"
    src = tmp_path / "t.txt"
    src.write_text(text, encoding="utf-8")
    tf = prepare_tokens(src, ByteTokenizer(), tmp_path / "t.bin", block_bytes=block_bytes)
    assert tf.tokens.tolist() == ByteTokenizer().encode(text)
    assert tf.num_bytes == len(text.encode("utf-8"))


def test_invalid_utf8_names_file(tmp_path):
    src = tmp_path / "bad.txt"
    src.write_bytes(b"fine\n\xff\xfe oops\n")
    with pytest.raises(ValueError, match="bad.txt"):
        prepare_tokens(src, ByteTokenizer(), tmp_path / "bad.bin")
    assert _leftover_temp_files(tmp_path) == []


def test_token_file_missing_pieces_name_path(tmp_path, text_file):
    with pytest.raises(FileNotFoundError, match="absent.bin"):
        TokenFile(tmp_path / "absent.bin")
    out = tmp_path / "corpus.bin"
    prepare_tokens(text_file, ByteTokenizer(), out)
    Path(f"{out}.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"corpus\.bin\.json"):
        TokenFile(out)


def test_empty_text_file(tmp_path):
    src = tmp_path / "empty.txt"
    src.write_text("")
    tf = prepare_tokens(src, ByteTokenizer(), tmp_path / "empty.bin")
    assert tf.num_tokens == 0 and len(tf.tokens) == 0 and tf.max_token_id == -1


# --- batches -----------------------------------------------------------------


def test_get_batch_is_deterministic_per_seed_and_step(token_array):
    kw = dict(batch_size=8, seq_len=16)
    a = get_batch(token_array, step=5, seed=1, **kw)
    b = get_batch(token_array, step=5, seed=1, **kw)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], get_batch(token_array, step=6, seed=1, **kw)[0])
    assert not np.array_equal(a[0], get_batch(token_array, step=5, seed=2, **kw)[0])


def test_get_batch_shapes_and_shift(token_array):
    inputs, targets = get_batch(token_array, step=0, seed=0, batch_size=4, seq_len=32)
    assert inputs.shape == targets.shape == (4, 32)
    assert inputs.dtype == targets.dtype == np.int32
    # Tokens are 0..999 in order, so a window is a run of consecutive integers.
    assert np.array_equal(targets, inputs + 1)
    assert np.array_equal(inputs[:, 1:], targets[:, :-1])


def test_get_batch_row_slice_matches_full_batch_and_reads_only_those_rows(tmp_path, text_file):
    tf = prepare_tokens(text_file, ByteTokenizer(), tmp_path / "corpus.bin")
    kw = dict(step=3, seed=7, batch_size=8, seq_len=24)
    full_in, full_tg = get_batch(tf, **kw)
    for a, b in [(0, 2), (2, 4), (4, 8), (7, 8)]:
        reads = []
        part_in, part_tg = get_batch(tf, rows=slice(a, b), reads=reads, **kw)
        assert np.array_equal(part_in, full_in[a:b]) and np.array_equal(part_tg, full_tg[a:b])
        assert reads == [(a, b)]


def test_get_batch_rejects_non_contiguous_rows(token_array):
    with pytest.raises(ValueError, match="contiguous"):
        get_batch(token_array, step=0, seed=0, batch_size=4, seq_len=4, rows=slice(0, 4, 2))


def test_get_batch_too_short_names_file_and_counts(tmp_path):
    src = tmp_path / "tiny.txt"
    src.write_text("abcdefghij")
    tf = prepare_tokens(src, ByteTokenizer(), tmp_path / "tiny.bin")
    with pytest.raises(ValueError, match=r"tiny\.bin") as info:
        get_batch(tf, step=0, seed=0, batch_size=2, seq_len=10)
    assert "10 tokens" in str(info.value) and "11" in str(info.value)
    # Exactly seq_len + 1 tokens is enough: the only possible window.
    inputs, _ = get_batch(tf, step=0, seed=0, batch_size=2, seq_len=9)
    assert inputs.shape == (2, 9)


# --- chunking ----------------------------------------------------------------

CHUNK_CASES = [
    (16, 16, 0),
    (64, 16, 0),
    (64, 16, 4),
    (50, 16, 4),  # 50 - 16 is not a multiple of the stride 12
    (37, 10, 3),
    (100, 33, 32),
    (20, 20, 5),
]


@pytest.mark.parametrize("seq_len,chunk_size,overlap", CHUNK_CASES)
def test_every_target_counted_exactly_once(seq_len, chunk_size, overlap):
    spans = chunk_spans(seq_len, chunk_size, overlap)
    masks = chunk_loss_masks(seq_len, chunk_size, overlap)
    assert masks.dtype == np.float32 and masks.shape == (len(spans), chunk_size)
    assert spans[0][0] == 0 and spans[-1][1] == seq_len
    assert all(stop - start == chunk_size for start, stop in spans)

    counts = np.zeros(seq_len)
    for (start, stop), mask in zip(spans, masks):
        counts[start:stop] += mask
    assert np.array_equal(counts, np.ones(seq_len))


def test_chunk_spans_overlap_and_last_alignment():
    assert chunk_spans(64, 16, 0) == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert chunk_spans(50, 16, 4) == [(0, 16), (12, 28), (24, 40), (34, 50)]
    masks = chunk_loss_masks(50, 16, 4)
    # The realigned last chunk overlaps by 6, more than the configured 4.
    assert masks[1, :4].sum() == 0 and masks[1, 4] == 1
    assert masks[3, :6].sum() == 0 and masks[3, 6:].all()


@pytest.mark.parametrize(
    "args,field",
    [
        ((64, 0, 0), "rwkv_chunk_size"),
        ((64, 16, -1), "chunk_overlap"),
        ((64, 16, 16), "chunk_overlap"),
        ((8, 16, 0), "max_seq_length"),
        ((50, 16, 0), "rwkv_chunk_size"),
    ],
)
def test_chunk_validation_names_field(args, field):
    with pytest.raises(ValueError, match=field) as info:
        chunk_spans(*args)
    assert str(args[1]) in str(info.value)


def test_chunk_indivisible_error_suggests_fix():
    with pytest.raises(ValueError) as info:
        chunk_spans(50, 16, 0)
    msg = str(info.value)
    assert "max_seq_length" in msg and "50" in msg and "chunk_overlap" in msg


@pytest.mark.parametrize("seq_len,chunk_size,overlap", CHUNK_CASES)
def test_state_handoff_is_distance_to_next_start(seq_len, chunk_size, overlap):
    spans = chunk_spans(seq_len, chunk_size, overlap)
    handoff = state_handoff(seq_len, chunk_size, overlap)
    assert len(handoff) == len(spans) - 1
    for (start, _), (next_start, _), h in zip(spans, spans[1:], handoff):
        assert 0 < h <= chunk_size
        assert start + h == next_start


def test_state_handoff_values():
    assert state_handoff(64, 16, 0) == [16, 16, 16]
    assert state_handoff(50, 16, 4) == [12, 12, 10]
    assert state_handoff(16, 16, 0) == []


# --- metrics -----------------------------------------------------------------


def test_bits_per_byte():
    assert bits_per_byte(math.log(2), 100, 100) == pytest.approx(1.0)
    # Four bytes per token: the same per-token loss is a quarter of the per-byte bits.
    assert bits_per_byte(math.log(2), 100, 400) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 10, 0)


# --- real corpus -------------------------------------------------------------


def test_bundled_sample_reads_through_xz(tmp_path):
    """The packaged Shakespeare sample is tokenized straight from its .xz, its unpacked bytes
    counted (bits per byte divide by them), and cached under the name without suffixes."""
    src = Path(sample_path("val"))
    text = lzma.decompress(src.read_bytes())
    assert src.name == "val.txt.xz" and len(text) == 387_263
    # Small blocks force many cuts, exercising the blockwise path on real text.
    tf = prepare_tokens(src, ByteTokenizer(), tmp_path / "val.bin", block_bytes=64 << 10)
    assert tf.num_tokens == tf.num_bytes == len(text)
    assert bytes(tf.tokens[:1000].astype(np.uint8)) == text[:1000]
    assert text_stem(src) == "val" and text_stem("a/b.txt.gz") == "b" and text_stem("c.txt") == "c"

    inputs, targets = get_batch(tf, step=0, seed=0, batch_size=4, seq_len=256)
    assert inputs.shape == (4, 256) and inputs.max() < 256

    if HAVE_RWKV:
        world = prepare_tokens(src, "world", tmp_path / "val_world.bin", block_bytes=64 << 10)
        assert world.num_bytes == len(text) and world.num_tokens < len(text) / 2
        assert world.max_token_id < 65536
        assert get_tokenizer("world").decode(world.tokens.tolist()) == text.decode("utf-8")


def test_gzip_text_and_damaged_compressed_text(tmp_path):
    text = "To be, or not to be: that is the question.\n" * 50
    gz = tmp_path / "q.txt.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    tf = prepare_tokens(gz, ByteTokenizer(), tmp_path / "q.bin", block_bytes=100)
    assert tf.tokens.tolist() == list(text.encode())
    bad = tmp_path / "bad.txt.xz"
    bad.write_bytes(lzma.compress(text.encode())[:40])  # cut short
    with pytest.raises(ValueError, match="bad.txt.xz is not a readable compressed file"):
        prepare_tokens(bad, ByteTokenizer(), tmp_path / "bad.bin")


def test_blockwise_split_fuzz(tmp_path):
    rng = np.random.default_rng(0)
    alphabet = list("ab \n") + ["é", "日", "🚀"]
    src = tmp_path / "fuzz.txt"
    for trial in range(20):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 300))))
        src.write_text(text, encoding="utf-8")
        block = int(rng.integers(1, 40))
        tf = prepare_tokens(src, ByteTokenizer(), tmp_path / f"fuzz{trial}.bin", block_bytes=block)
        assert tf.tokens.tolist() == list(text.encode("utf-8")), (trial, block)
