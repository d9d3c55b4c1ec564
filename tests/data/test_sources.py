"""The trainer's data through its real entry points: binidx, jsonl and mixtures as
data.train_file, RWKV-LM's sampler seen through `rwkv-data show`, SFT loss masks, and the
errors a bad data config gets before anything compiles."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, TEXT, tiny_config

from rwkv_jax import train as trainer
from rwkv_jax.cli import data as data_cli
from rwkv_jax.config import ConfigError, ModelConfig
from rwkv_jax.data import prepare_tokens
from rwkv_jax.data.binidx import write_binidx
from rwkv_jax.data.jsonl import prepare_jsonl
from rwkv_jax.data.sources import Batches
from rwkv_jax.data.tokenizers import get_tokenizer
from rwkv_jax.nn.model import RWKV, init_params
from rwkv_jax.train.step import masked_ce

FIXTURE = Path(REPO) / "tests" / "fixtures" / "rwkv_lm"
OFFSETS = json.loads((FIXTURE / "offsets.json").read_text())

CHATS = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Who wrote Hamlet?"},
                  {"role": "assistant", "content": "Shakespeare."}]},
    {"prompt": "Say hi.", "response": "Hi!"},
    {"text": "First Citizen: before we proceed any further, hear me speak."},
    {"messages": [{"role": "user", "content": "Count to three."},
                  {"role": "assistant", "content": "One, two, three."},
                  {"role": "user", "content": "Again?"},
                  {"role": "assistant", "content": "One, two, three!"}]},
]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """RWKV-LM's make_data.py output for the fixture jsonl: its prefix."""
    folder = tmp_path_factory.mktemp("make_data")
    with tarfile.open(FIXTURE / "shakespeare40_make_data.tar.xz") as tar:
        tar.extractall(folder, filter="data")
    return str(folder / "shakespeare40")


def _jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("world_size", [1, 2])
def test_show_prints_the_samples_rwkv_lm_draws(made, tmp_path, capsys, world_size):
    """`rwkv-data show` over the trainer's own batches gives RWKV-LM's MyDataset samples
    (offsets.json, made by RWKV-LM's code) for a global batch of 8 at ctx 16."""
    argv = ["show", "--steps", "2", "--decode", "--config=tiny", f"--config.output_dir={tmp_path}",
            f"--config.data.train_file={made}", f"--config.data.val_file={made}",
            "--config.data.tokenizer=world", "--config.data.sampler=rwkv_lm",
            f"--config.data.rwkv_lm_world_size={world_size}", "--config.train.batch_size=8",
            "--config.train.max_seq_length=16", "--config.memory.rwkv_chunk_size=16"]
    assert data_cli.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["step"], r["row"]) for r in lines] == [(s, r) for s in range(2) for r in range(8)]
    want = [s for s in OFFSETS["samples"]
            if (s["ctx"], s["epoch"], s["world_size"]) == (16, 0, world_size)]
    micro = 8 // world_size
    for s in want:
        step, k = divmod(s["idx"], micro)
        if step < 2:
            row = lines[step * 8 + s["rank"] * micro + k]
            assert row["tokens"][:8] == s["x8"] and row["tokens"][1:9] == s["y8"], s
            assert len(row["tokens"]) == 17 and "loss_mask" not in row
    assert isinstance(lines[0]["text"], str) and lines[0]["text"]


def test_binidx_of_the_text_trains_like_the_text(tmp_path):
    """The tiny config on the bundled sample, and on the same tokens as one binidx document (no
    end-of-document token), trains to the same losses under the same sampler."""
    from rwkv_jax.configs import tiny

    losses = []
    for name in ("text", "binidx"):
        cfg = tiny.get_config()
        cfg.output_dir = str(tmp_path / name)
        cfg.train.steps = cfg.logging.every = 3
        cfg.logging.eval_every, cfg.checkpoint.every = 0, 0
        cfg.logging.progress = False
        if name == "binidx":
            tf = prepare_tokens(cfg.data.train_file, get_tokenizer("byte"), tmp_path / "t.bin")
            write_binidx(str(tmp_path / "sample"), [np.asarray(tf.tokens)], dtype=tf.dtype)
            cfg.data.train_file = str(tmp_path / "sample.bin")
        final = trainer.train(trainer.prepare(cfg))
        losses.append((final["loss"], final["grad_norm"]))
    assert losses[0] == losses[1]


def test_sft_mixture_trains_with_masks_and_the_loop_waits_little(tmp_path, caplog):
    """A mixture of chat jsonl and text trains through train.py's code with per-row loss
    masks; the loop logs how long it waited for batches."""
    (tmp_path / "train.txt").write_text(TEXT)
    chats = _jsonl(tmp_path / "chats.jsonl", CHATS * 4)
    cfg = tiny_config(tmp_path, (f"{chats}:3,{tmp_path / 'train.txt'}:1", chats),
                      **{"train.steps": 3, "logging.eval_every": 3, "checkpoint.every": 0,
                         "logging.every": 3})
    with caplog.at_level("INFO", logger="rwkv_jax"):
        run = trainer.prepare(cfg)
    assert run.batches.masked and run.batches.long_documents() == (12, 8, 16)
    short = tiny_config(tmp_path / "short", (chats, chats), **{"train.max_seq_length": 8,
                                                                "memory.rwkv_chunk_size": 8})
    with caplog.at_level("INFO", logger="rwkv_jax"):
        trainer.prepare(short)
    assert "12 of 16 documents have no trained token (an assistant's) in their first 9" in \
        caplog.text
    x, y, mask = run.batches(0)
    again = run.batches(0, slice(1, 3))
    assert (again[0] == x[1:3]).all() and (again[2] == mask[1:3]).all()
    with caplog.at_level("INFO", logger="rwkv_jax"):
        final = trainer.train(run)
    assert np.isfinite(final["loss"]) and "val_bpb" not in final  # jsonl: no byte count
    assert any("the loop waited" in r.getMessage() for r in caplog.records)


def test_sft_loss_sees_only_assistant_tokens(tmp_path):
    """The loss's gradient with respect to the logits is zero wherever the target is not an
    assistant token; a user turn that no assistant turn follows leaves the loss unchanged."""
    tok = get_tokenizer("byte")
    turns = CHATS[3]["messages"]
    ask = [{"messages": turns + [{"role": "user", "content": c}]}
           for c in ("And now backwards?", "Thanks, that is all.")]
    losses = []
    for name, record in (("a", ask[0]), ("b", ask[1])):
        docs = prepare_jsonl(_jsonl(tmp_path / f"{name}.jsonl", [record]), tok,
                             tmp_path / f"{name}.docs.bin")
        x, y, mask = Batches([(docs, 1.0)], sampler="random", seed=0, batch_size=1,
                             seq_len=160)(0)
        assert 0 < mask.sum() < (y != 0).sum()  # some targets train, not all
        mc = ModelConfig(vocab_size=256, n_layer=2, n_embd=32)
        params = init_params(mc, jax.random.PRNGKey(0))
        logits, _ = RWKV(mc).apply({"params": params}, jnp.asarray(x))
        grad = jax.grad(lambda lg: masked_ce(lg, jnp.asarray(y), jnp.asarray(mask))[0])(logits)
        assert np.all(np.asarray(grad)[0][mask[0] == 0] == 0)
        assert np.any(np.asarray(grad)[0][mask[0] == 1] != 0)
        losses.append(float(masked_ce(logits, jnp.asarray(y), jnp.asarray(mask))[0]))
    assert losses[0] == losses[1]


@pytest.mark.parametrize("override, message", [
    ({"train.batch_size": 11, "data.sampler": "rwkv_lm"}, "must divide 40320"),
    ({"data.sampler": "rwkv_lm", "data.magic_prime": 11}, "data.magic_prime"),
    ({"data.sampler": "shuffle"},
     re.escape("data.sampler='shuffle' is invalid: one of ('random', 'rwkv_lm')")),
])
def test_bad_data_settings_are_one_line_before_compiling(made, tmp_path, override, message):
    cfg = tiny_config(tmp_path, (made, made), **{"data.tokenizer": "world", **override})
    with pytest.raises(ConfigError, match=message):
        trainer.prepare(cfg)


def test_a_mixture_names_its_bad_entry(tmp_path):
    (tmp_path / "train.txt").write_text(TEXT)
    missing = tmp_path / "nope.jsonl"
    cfg = tiny_config(tmp_path, (f"{tmp_path / 'train.txt'}:1,{missing}:2",
                                 str(tmp_path / "train.txt")))
    with pytest.raises(ConfigError, match=f"no such file: '{missing}'"):
        trainer.prepare(cfg)
    bad = _jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    cfg = tiny_config(tmp_path, (f"{bad}:1", str(tmp_path / "train.txt")))
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: .*robot"):
        trainer.prepare(cfg)


def test_the_prefetcher_hands_over_in_order_raises_what_failed_and_stops():
    from rwkv_jax.data.sources import Prefetcher

    made = []
    pf = Prefetcher(lambda k: made.append(k) or k * 10, range(3))
    assert [pf.get(k) for k in range(3)] == [0, 10, 20]
    with pytest.raises(LookupError, match="no batch past the last key"):
        pf.get(3)  # asking past the end is an error, not a hang
    pf.close()

    def broken(k):
        if k == 1:
            raise OSError("disk gone")
        return k

    pf = Prefetcher(broken, range(5))
    assert pf.get(0) == 0
    with pytest.raises(OSError, match="disk gone"):
        pf.get(1)
    pf.close()
    pf = Prefetcher(lambda k: k, range(10**9))  # a loop that stops early: close() returns
    assert pf.get(0) == 0
    pf.close()
    assert not pf._thread.is_alive()
