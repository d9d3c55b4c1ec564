"""Fine-tuning data from jsonl (rwkv_jax/data/jsonl.py): the chat rendering's exact bytes, the
record kinds and their loss masks, the cached document file, and document batches."""

import json
import os

import numpy as np
import pytest

from rwkv_jax.data import jsonl
from rwkv_jax.data.jsonl import (
    DocumentFile,
    count_long,
    document_batch,
    prepare_jsonl,
    record_segments,
    render_chat,
    tokenize_record,
)
from rwkv_jax.data.tokenizers import get_tokenizer

try:
    import rwkv.rwkv_tokenizer  # noqa: F401

    HAVE_RWKV = True
except ImportError:
    HAVE_RWKV = False

BYTE = get_tokenizer("byte")


def _m(role, content):
    return {"role": role, "content": content}


# The exact bytes RWKV's chat models read: pinned, so a change of convention is a visible change.
RENDERED = [
    ([_m("system", "You are kind."), _m("user", "Hi"), _m("assistant", "Hello!")],
     b"System: You are kind.\n\nUser: Hi\n\nAssistant: Hello!"),
    ([_m("user", "a"), _m("assistant", "b"), _m("user", "c"), _m("assistant", "d")],
     b"User: a\n\nAssistant: b\n\nUser: c\n\nAssistant: d"),
    # Stripped; blank lines (even holding spaces) collapse to one "\n"; indentation kept.
    ([_m("user", "  one\n\n\ntwo\r\n\r\n  three\n \t\nfour \n\n"), _m("assistant", "ok")],
     b"User: one\ntwo\n  three\nfour\n\nAssistant: ok"),
    ([_m("user", "\u65e5\u672c\u8a9e\u3067\uff1f"),
      _m("assistant", "\u306f\u3044\u3001\U0001f680\u3000")],
     (b"User: \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e\xe3\x81\xa7\xef\xbc\x9f\n\nAssistant: "
      b"\xe3\x81\xaf\xe3\x81\x84\xe3\x80\x81\xf0\x9f\x9a\x80")),
]


@pytest.mark.parametrize("messages, expected", RENDERED)
def test_render_chat_bytes(messages, expected):
    assert render_chat(messages).encode("utf-8") == expected


def test_render_chat_unknown_role():
    with pytest.raises(ValueError) as e:
        render_chat([_m("user", "hi"), _m("tool", "x")])
    msg = str(e.value)
    assert "\n" not in msg and "messages[1].role is 'tool'" in msg
    assert "system, user, assistant" in msg


def test_record_kinds():
    assert record_segments({"text": "plain\n\ntext ", "id": 7}) == [("plain\n\ntext ", True)]
    assert record_segments({"prompt": " p ", "response": "r\n"}) == [
        ("User: p\n\nAssistant:", False), (" r", True)]
    assert record_segments({"messages": [_m("system", "s"), _m("user", "u"),
                                         _m("assistant", "a"), _m("user", "v")]}) == [
        ("System: s\n\nUser: u\n\nAssistant:", False), (" a\n\n", True), ("User: v", False)]
    # A prompt/response record is the two-turn chat.
    chat = {"messages": [_m("user", "p"), _m("assistant", "r")]}
    pr = {"prompt": "p", "response": "r"}
    assert record_segments(pr) == record_segments(chat)
    assert "".join(t for t, _ in record_segments(chat)) == render_chat(chat["messages"])


@pytest.mark.parametrize("record, names", [
    ({"title": "x"}, "none of their fields"),
    ({"text": "a", "messages": []}, "'text', 'messages'"),
    ({"text": 3}, "field 'text' must be a string, got int"),
    ({"prompt": "p"}, "field 'response' must be a string, got nothing"),
    ({"response": "r"}, "field 'prompt' must be a string, got nothing"),
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": [_m("user", None)]}, "messages[0].content must be a string"),
    ({"messages": ["hi"]}, "messages[0] must be an object"),
    (["text"], "must be a JSON object"),
])
def test_record_errors(record, names):
    with pytest.raises(ValueError) as e:
        record_segments(record)
    assert names in str(e.value) and "\n" not in str(e.value)


def test_mask_covers_assistant_contents_and_the_final_token():
    rec = {"messages": [_m("user", "a"), _m("assistant", "b"), _m("user", "c"),
                        _m("assistant", "dd")]}
    ids, mask = tokenize_record(rec, BYTE)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
    assert bytes(ids.tolist()) == render_chat(rec["messages"]).encode() + b"\0"
    # Trained: each assistant content with its leading space, the "\n\n" ending a turn that
    # another follows, and the end token (the last turn is the assistant's).
    assert bytes(ids[mask].tolist()) == b" b\n\n dd\0"
    assert bytes(ids[~mask].tolist()) == b"User: a\n\nAssistant:User: c\n\nAssistant:"

    rec["messages"].append(_m("user", "e"))  # ends with a user turn: the end token is context
    ids, mask = tokenize_record(rec, BYTE)
    assert bytes(ids[mask].tolist()) == b" b\n\n dd\n\n" and not mask[-1]

    ids, mask = tokenize_record({"text": "xyz"}, BYTE)
    assert bytes(ids.tolist()) == b"xyz\0" and mask.all()


@pytest.mark.skipif(not HAVE_RWKV, reason="rwkv package not installed")
def test_world_tokens_masks_and_a_trailing_user_turn():
    world = get_tokenizer("world")
    turns = [_m("system", "Be brief."), _m("user", "Say hi in Japanese."),
             _m("assistant", "\u3053\u3093\u306b\u3061\u306f"), _m("user", "Thanks!")]
    ids, mask = tokenize_record({"messages": turns}, world)
    assert world.decode(ids[:-1].tolist()) == render_chat(turns) and ids[-1] == 0
    assert world.decode(ids[mask].tolist()) == " \u3053\u3093\u306b\u3061\u306f\n\n"
    # The masked targets (what the loss counts) do not see a user turn that no answer follows.
    other = turns[:-1] + [_m("user", "Something much longer, with other words.")]
    ids2, mask2 = tokenize_record({"messages": other}, world)
    assert np.array_equal(ids[1:][mask[1:]], ids2[1:][mask2[1:]])
    assert np.flatnonzero(mask).tolist() == np.flatnonzero(mask2).tolist()


def _write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


RECORDS = [
    {"text": "hello world"},
    {"prompt": "2+2?", "response": "4"},
    {"messages": [_m("user", "hi"), _m("assistant", "hey"), _m("user", "bye")]},
    {"text": "a much longer document " * 4},
]


def test_prepare_jsonl_writes_documents(tmp_path):
    src = tmp_path / "sft.jsonl"
    _write_jsonl(src, [json.dumps(RECORDS[0]), "", "  ", *map(json.dumps, RECORDS[1:])])
    docs = prepare_jsonl(src, "byte", tmp_path / "sft.bin")
    assert docs.num_docs == 4 and len(docs.starts) == 5 and docs.tokens.dtype == np.uint16
    assert docs.num_tokens == int(docs.starts[-1]) == len(docs.tokens) == len(docs.loss_mask)
    for i, rec in enumerate(RECORDS):
        ids, mask = docs.document(i)
        want_ids, want_mask = tokenize_record(rec, BYTE)
        assert np.array_equal(ids, want_ids) and np.array_equal(mask, want_mask)
    with pytest.raises(IndexError):
        docs.document(4)
    meta = json.loads((tmp_path / "sft.bin.json").read_text())
    assert meta["num_docs"] == 4 and meta["tokenizer"] == "byte"
    assert meta["num_trained"] == int(np.asarray(docs.loss_mask).sum())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_prepare_jsonl_reuses_then_rebuilds(tmp_path, monkeypatch):
    src, out = tmp_path / "sft.jsonl", tmp_path / "cache" / "sft.bin"
    _write_jsonl(src, [json.dumps(r) for r in RECORDS[:2]])
    assert prepare_jsonl(src, BYTE, out).num_docs == 2

    def no_rewrite(*a, **k):
        raise AssertionError("rewrote an up-to-date document file")

    with monkeypatch.context() as m:
        m.setattr(jsonl, "_write_documents", no_rewrite)
        assert prepare_jsonl(src, BYTE, out).num_docs == 2
    _write_jsonl(src, [json.dumps(r) for r in RECORDS])
    os.utime(src, ns=(1, 1))  # a new mtime, whatever the clock's resolution
    assert prepare_jsonl(src, BYTE, out).num_docs == 4
    assert DocumentFile(out).num_docs == 4


def test_wide_vocabulary_is_uint32(tmp_path):
    class Wide:
        name, vocab_size = "wide", 70000

        def encode(self, text):
            return [65536 + ord(c) for c in text]

    src = tmp_path / "w.jsonl"
    _write_jsonl(src, ['{"text": "ab"}'])
    docs = prepare_jsonl(src, Wide(), tmp_path / "w.bin")
    assert docs.tokens.dtype == np.uint32 and docs.document(0)[0].tolist() == [65633, 65634, 0]


@pytest.mark.parametrize("bad_line, error", [
    ('{"text": "ok"', ":3: not JSON"),
    ('{"prompt": "only a prompt"}', ":3: field 'response' must be a string"),
    ('{"messages": [{"role": "bot", "content": "x"}]}',
     ":3: messages[0].role is 'bot'; valid roles: system, user, assistant"),
])
def test_bad_lines_name_file_and_line(tmp_path, bad_line, error):
    src = tmp_path / "bad.jsonl"
    _write_jsonl(src, ['{"text": "fine"}', "", bad_line, '{"text": "never read"}'])
    with pytest.raises(ValueError) as e:
        prepare_jsonl(src, BYTE, tmp_path / "bad.bin")
    assert str(e.value).startswith(f"{src}{error}") and "\n" not in str(e.value)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert not (tmp_path / "bad.bin").exists()


def test_damaged_document_file_is_refused(tmp_path):
    src = tmp_path / "d.jsonl"
    _write_jsonl(src, ['{"text": "abc"}'])
    prepare_jsonl(src, BYTE, tmp_path / "d.bin")
    with open(tmp_path / "d.bin.mask", "ab") as f:
        f.write(b"\1")
    with pytest.raises(ValueError, match="d.bin.mask is 5 bytes"):
        DocumentFile(tmp_path / "d.bin")
    assert prepare_jsonl(src, BYTE, tmp_path / "d.bin").loss_mask.shape == (4,)  # rebuilt


@pytest.fixture
def docs(tmp_path):
    src = tmp_path / "b.jsonl"
    lines = [json.dumps({"prompt": f"q{i}", "response": "r" * i}) for i in range(12)]
    _write_jsonl(src, lines + ['{"text": "' + "long " * 20 + '"}'])
    return prepare_jsonl(src, BYTE, tmp_path / "b.bin")


def test_document_batch_rows_padding_and_masks(docs):
    seq_len = 40  # the chats fit (padded), the long text is cut
    x, y, mask = document_batch(docs, step=3, seed=5, batch_size=8, seq_len=seq_len)
    assert x.shape == y.shape == mask.shape == (8, seq_len)
    assert x.dtype == y.dtype == np.int32 and mask.dtype == np.float32
    seen = set()
    for r in range(8):
        # Which document: the one whose first seq_len tokens (or all, padded) this row holds.
        for i in range(docs.num_docs):
            ids, m = docs.document(i)
            ids, m = ids[: seq_len + 1], m[: seq_len + 1]
            k = len(ids) - 1
            if np.array_equal(x[r, :k], ids[:-1]) and np.array_equal(y[r, :k], ids[1:]):
                break
        else:
            raise AssertionError(f"row {r} is no document")
        seen.add(i)
        assert np.array_equal(mask[r, :k], m[1:].astype(np.float32))
        assert not x[r, k:].any() and not y[r, k:].any() and not mask[r, k:].any()
    assert len(seen) > 1
    # Some row is a chat: context (0), then the response (1), then padding (0).
    assert any(0 < m[:k].sum() < k for m, k in zip(mask, (y != 0).sum(1) + 1))


def test_document_batch_is_deterministic_and_sliceable(docs):
    kw = {"seed": 1, "batch_size": 6, "seq_len": 12}
    full = document_batch(docs, step=7, **kw)
    again = document_batch(docs, step=7, **kw)
    other = document_batch(docs, step=8, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(full, again))
    assert not all(np.array_equal(a, b) for a, b in zip(full, other))
    parts = [document_batch(docs, step=7, rows=slice(a, a + 2), **kw) for a in (0, 2, 4)]
    for j in range(3):
        assert np.array_equal(np.concatenate([p[j] for p in parts]), full[j])
    with pytest.raises(ValueError, match="contiguous"):
        document_batch(docs, step=7, rows=slice(0, 6, 2), **kw)


def test_long_documents_are_cut_and_counted(docs):
    lengths = np.diff(docs.starts)
    assert count_long(docs, 16) == int((lengths > 17).sum()) >= 1
    assert count_long(docs, int(lengths.max()) - 1) == 0
    long_doc = int(np.argmax(lengths))
    # Draw batches until the long document appears; its row holds its first 17 tokens.
    for step in range(200):
        picks = np.random.default_rng([0, step]).integers(0, docs.num_docs, size=4)
        if long_doc in picks:
            break
    x, y, _ = document_batch(docs, step=step, seed=0, batch_size=4, seq_len=16)
    r = int(np.flatnonzero(picks == long_doc)[0])
    ids, _ = docs.document(long_doc)
    assert np.array_equal(x[r], ids[:16]) and np.array_equal(y[r], ids[1:17])


def test_empty_jsonl(tmp_path):
    src = tmp_path / "e.jsonl"
    src.write_text("\n\n")
    docs = prepare_jsonl(src, BYTE, tmp_path / "e.bin")
    assert docs.num_docs == 0 and docs.num_tokens == 0
    with pytest.raises(ValueError, match="no documents"):
        document_batch(docs, step=0, seed=0, batch_size=1, seq_len=4)


def test_documents_are_evaluated_one_by_one_on_their_trained_tokens(docs):
    """A jsonl validation source scores as it trains: each document from the start state, its
    assistant's tokens only, whatever the chunking and the rows a batch holds."""
    import jax
    import jax.numpy as jnp
    import optax

    from rwkv_jax.config import default_config, model_config_from
    from rwkv_jax.evaluation import evaluate
    from rwkv_jax.nn.model import RWKV, init_params

    c = default_config()
    c.model.n_layer, c.model.n_embd = 1, 16
    config = model_config_from(c, vocab_size=256)
    params = init_params(config, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(1), x.shape),
                          params)
    total, count = 0.0, 0
    for i in range(docs.num_docs):
        toks, mask = docs.document(i)
        logits, _ = RWKV(config).apply({"params": params}, jnp.asarray(toks[None, :-1]))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[0], toks[1:])
        total += float(jnp.sum(ce * mask[1:]))
        count += int(mask[1:].sum())
    for chunk in (4, 64):
        ev = evaluate(config, params, docs, chunk)
        assert ev["tokens"] == count and ev["documents"] == docs.num_docs and ev["bpb"] is None
        assert ev["loss"] == pytest.approx(total / count, rel=1e-5)
    assert evaluate(config, params, docs, 8, max_tokens=5)["documents"] == 8  # one batch
    # Other sources with documents (binidx) are one stream, as before.
    from rwkv_jax.data.binidx import BinIdx, write_binidx

    prefix = write_binidx(docs.path.parent / "v", [docs.document(i)[0] for i in range(3)])
    stream = evaluate(config, params, BinIdx(prefix), 8)
    assert "documents" not in stream and stream["tokens"] == int(docs.starts[3]) - 1
