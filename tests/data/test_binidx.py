"""RWKV-LM's binidx and sampler against files and offsets made by RWKV-LM's own code
(tests/fixtures/rwkv_lm, README there), bad files, and `rwkv-data prepare`."""

import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from rwkv_jax.cli.data import main as data_main
from rwkv_jax.data.binidx import BinIdx, binidx_prefix, write_binidx
from rwkv_jax.data.rwkv_lm import (
    MINI_EPOCH,
    check_magic_prime,
    is_prime,
    magic_prime,
    rwkv_lm_batch,
    sample_offset,
)
from rwkv_jax.data.tokenizers import get_tokenizer

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "rwkv_lm"
JSONL = FIXTURE / "shakespeare40.jsonl"
OFFSETS = json.loads((FIXTURE / "offsets.json").read_text())


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """make_data.py's shakespeare40.bin/.idx, unpacked: its prefix."""
    folder = tmp_path_factory.mktemp("make_data")
    with tarfile.open(FIXTURE / "shakespeare40_make_data.tar.xz") as tar:
        tar.extractall(folder, filter="data")
    return folder / "shakespeare40"


@pytest.fixture(scope="module")
def texts():
    """The texts make_data.py tokenizes: stripped non-blank lines' "text", unstripped."""
    lines = [line.strip() for line in JSONL.read_text(encoding="utf-8").splitlines()]
    return [json.loads(line)["text"] for line in lines if line]


def _bytes(prefix):
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def test_reads_make_data_output(made, texts):
    data = BinIdx(f"{made}.bin")
    tok = get_tokenizer("world")
    docs = [tok.encode(t) + [0] for t in texts]
    assert len(texts) == 40 and any(t != t.strip() for t in texts)  # a text keeps its spaces
    assert data.prefix == str(made) and data.path == f"{made}.bin" and data.num_bytes is None
    assert data.dtype == np.uint16 and data.num_items == 40
    assert data.sizes.tolist() == [len(d) for d in docs]
    assert data.doc_idx.tolist() == list(range(41))  # make_data: [0] + one per document
    assert data.pointers.tolist() == np.cumsum([0] + [2 * len(d) for d in docs[:-1]]).tolist()
    assert data.num_tokens == OFFSETS["num_tokens"] == sum(map(len, docs))
    assert data.tokens.tolist() == sum(docs, [])
    assert isinstance(data.tokens, np.memmap)
    assert data.document(7).tolist() == docs[7] and data.document(-1).tolist() == docs[-1]
    for path in (made, f"{made}.idx"):
        assert BinIdx(path).num_tokens == data.num_tokens


def test_write_binidx_reproduces_make_data(made, texts, tmp_path):
    tok = get_tokenizer("world")
    docs = (np.array(tok.encode(t) + [0], dtype=np.uint16) for t in texts)
    assert write_binidx(tmp_path / "ours", docs) == str(tmp_path / "ours")
    assert _bytes(tmp_path / "ours") == _bytes(made)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.bin", "ours.idx"]  # no temporaries


def test_write_binidx_other_dtype_and_empty(tmp_path):
    write_binidx(tmp_path / "a", [[1, 2, 3], np.array([70000, 0])], dtype=np.int32)
    data = BinIdx(tmp_path / "a")
    assert data.dtype == np.int32 and data.tokens.tolist() == [1, 2, 3, 70000, 0]
    assert data.pointers.tolist() == [0, 12] and data.document(1).tolist() == [70000, 0]
    with pytest.raises(ValueError, match="document 1 has tokens outside uint16"):
        write_binidx(tmp_path / "b", [[1], [70000]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.idx"]  # b left nothing
    write_binidx(tmp_path / "e", [])
    assert BinIdx(tmp_path / "e").num_tokens == 0


def test_sampler_reproduces_rwkv_lm(made):
    """offsets.json: RWKV-LM's MyDataset.__getitem__ at ctx 16 and 32, epochs 0 and 1,
    world sizes 1 and 2 (micro_bsz 8 and 4, so a global batch of 8)."""
    data = BinIdx(made)
    samples = OFFSETS["samples"]
    assert {(s["ctx"], s["epoch"], s["world_size"]) for s in samples} == {
        (c, e, w) for c in (16, 32) for e in (0, 1) for w in (1, 2)}
    batch_size = 8
    steps_per_epoch = MINI_EPOCH // batch_size
    for s in samples:
        args = (s["magic_prime"], s["ctx"], s["epoch"], s["idx"], s["world_size"], s["rank"])
        assert sample_offset(*args) == s["offset"], s
        t, k = divmod(s["idx"], s["micro_bsz"])
        row = s["rank"] * s["micro_bsz"] + k
        x, y = rwkv_lm_batch(data, step=s["epoch"] * steps_per_epoch + t, batch_size=batch_size,
                             ctx=s["ctx"], prime=s["magic_prime"], world_size=s["world_size"],
                             rows=slice(row, row + 1))
        assert x.dtype == np.int32 and x.shape == (1, s["ctx"])
        assert x[0, :8].tolist() == s["x8"] and y[0, :8].tolist() == s["y8"], s
        assert (x[0, 1:] == y[0, :-1]).all()


def test_rows_are_a_slice_of_the_global_batch(made):
    data = BinIdx(made)
    kw = dict(step=5043, batch_size=16, ctx=16, prime=113, world_size=2)
    x, y = rwkv_lm_batch(data.tokens, **kw)
    xs, ys = rwkv_lm_batch(data.tokens, rows=slice(5, 12), **kw)
    assert x.shape == (16, 16) and (xs == x[5:12]).all() and (ys == y[5:12]).all()


def test_magic_prime():
    assert magic_prime(OFFSETS["num_tokens"], 16) == OFFSETS["make_data_magic_prime_ctx16"]
    for n, ctx in [(1869, 32), (10**6, 512), (10**9 + 7, 4096), (123457, 1)]:
        p = magic_prime(n, ctx)
        slots = n // ctx
        assert is_prime(p) and p % 3 == 2 and 0.9 < p / slots <= 1 and p * ctx + 1 <= n
        assert not any(is_prime(q) and q % 3 == 2 for q in range(p + 1, slots))  # the largest
        check_magic_prime(p, n, ctx)
    with pytest.raises(ValueError, match="no magic prime"):
        magic_prime(100, 16)
    for bad, why in [(111, "not a prime"), (109, "1 mod 3, not 2"), (89, "0.9 to 1"), (131, "0.9 to 1")]:
        with pytest.raises(ValueError, match=f"data.magic_prime={bad} .*{why}.*use 113"):
            check_magic_prime(bad, 1869, 16)
    with pytest.raises(ValueError, match="past the data"):
        check_magic_prime(113, 113 * 16, 16)  # p == slots: RWKV-LM allows it, its last read overruns


def test_batch_size_must_divide_the_mini_epoch(made):
    data = BinIdx(made)
    with pytest.raises(ValueError, match="train.batch_size=11 must divide 40320"):
        rwkv_lm_batch(data, step=0, batch_size=11, ctx=16, prime=113)
    with pytest.raises(ValueError, match="data.rwkv_lm_world_size=3"):
        rwkv_lm_batch(data, step=0, batch_size=8, ctx=16, prime=113, world_size=3)


def _copy(made, tmp_path, name="bad"):
    for ext in (".bin", ".idx"):
        (tmp_path / f"{name}{ext}").write_bytes(Path(f"{made}{ext}").read_bytes())
    return tmp_path / name


def _patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("offset,data,why", [
    (0, b"MMIDIDY", "not the binidx magic"),
    (9, struct.pack("<Q", 2), "binidx version 2"),
    (17, b"\x06", "dtype code 6"),
    (17, b"\x07", "dtype code 7"),
    (17, b"\x09", "dtype code 9"),
    (18, struct.pack("<Q", 41), "header says 41 items"),
])
def test_bad_index_is_one_line_naming_the_file(made, tmp_path, offset, data, why):
    bad = _copy(made, tmp_path)
    _patch(tmp_path / "bad.idx", offset, data)
    with pytest.raises(ValueError, match=why) as e:
        BinIdx(bad)
    assert str(tmp_path / "bad.idx") in str(e.value) and "\n" not in str(e.value)


def test_truncated_bin_names_the_file_and_first_bad_item(made, tmp_path):
    bad = _copy(made, tmp_path)
    data = BinIdx(made)
    cut = int(data.pointers[30]) + 4  # item 30 is cut short
    (tmp_path / "bad.bin").write_bytes((tmp_path / "bad.bin").read_bytes()[:cut])
    with pytest.raises(ValueError, match=rf"bad.bin is {cut} bytes but item 30 of .*truncated") as e:
        BinIdx(bad)
    assert "\n" not in str(e.value)


def test_binidx_prefix(made, tmp_path):
    assert binidx_prefix(made) == binidx_prefix(f"{made}.idx") == str(made)
    assert binidx_prefix(tmp_path / "corpus.txt") is None
    (tmp_path / "cache.bin").write_bytes(b"\0\0")
    with pytest.raises(ValueError, match="has neither .*cache.idx.* nor .*cache.bin.json"):
        binidx_prefix(tmp_path / "cache.bin")
    (tmp_path / "cache.bin.json").write_text("{}")
    assert binidx_prefix(tmp_path / "cache.bin") is None  # a prepare_tokens cache
    (tmp_path / "cache.idx").write_bytes(b"")
    with pytest.raises(ValueError, match="has both .*cache.idx.* and .*cache.bin.json"):
        binidx_prefix(tmp_path / "cache.bin")
    (tmp_path / "half.idx").write_bytes(b"")
    with pytest.raises(ValueError, match="half.idx has no .*half.bin"):
        binidx_prefix(tmp_path / "half")


def test_prepare_matches_make_data(made, tmp_path, capsys):
    assert data_main(["prepare", str(JSONL), str(tmp_path / "ours"), "--ctx", "16"]) == 0
    assert _bytes(tmp_path / "ours") == _bytes(made)
    assert "data.magic_prime = 113 (for ctx 16)" in capsys.readouterr().out


def test_prepare_shuffle_repeat_is_deterministic(made, texts, tmp_path):
    args = ["prepare", str(JSONL), "--shuffle", "7", "--repeat", "2"]
    assert data_main([*args[:2], str(tmp_path / "a"), *args[2:]]) == 0
    assert data_main([*args[:2], str(tmp_path / "b"), *args[2:], "--workers", "2"]) == 0
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
    ours, theirs = BinIdx(tmp_path / "a"), BinIdx(made)
    assert ours.num_items == 80 and ours.num_tokens == 2 * theirs.num_tokens
    docs = [ours.document(i).tolist() for i in range(80)]
    originals = [theirs.document(i).tolist() for i in range(40)]
    assert sorted(docs[:40]) == sorted(originals) == sorted(docs[40:])  # each pass all lines once
    assert docs[:40] != originals and docs[:40] != docs[40:]  # and shuffled, differently


@pytest.mark.parametrize("line,why", [
    ('{"text": "fine"', "not JSON"),
    ('{"txt": "no text"}', 'has no "text" string'),
    ('["text"]', 'has no "text" string'),
    ('{"text": "\\ud800"}', "cannot be encoded as UTF-8"),
])
def test_prepare_bad_line_names_file_and_line(tmp_path, capsys, line, why):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n\n{"text": "b"}\n' + line + "\n")
    assert data_main(["prepare", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{src}:4: " in err and why in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
