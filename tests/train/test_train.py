"""Training: config validation, chunking with state passing, exact resume after SIGKILL or Ctrl-C,
divergence handling, state tuning."""

from __future__ import annotations

import logging
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    TEXT,
    finish,
    perturbed,
    run_train,
    start_train,
    tiny_config,
)

from rwkv_jax import io as ckpt
from rwkv_jax import train as trainer
from rwkv_jax.config import ConfigError, ModelConfig
from rwkv_jax.nn.model import RWKV, init_params


@pytest.fixture
def corpus(tmp_path):
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text(TEXT)
    val.write_text(TEXT[:1500])
    return str(train), str(val)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"memory.rwkv_chunk_size": 12}, "memory.rwkv_chunk_size=12 is invalid: must divide train.max_seq_length=32"),
        ({"memory.chunk_overlap": 16}, "memory.chunk_overlap=16 is invalid: must be >= 0 and < memory.rwkv_chunk_size=16"),
        ({"architecture.layer_pattern": "custom", "architecture.attention_layers": (5,)},
         "architecture.attention_layers holds layer 5, past the last layer"),
        ({"data.train_file": "/nonexistent/train.txt"}, "data.train_file='/nonexistent/train.txt' is invalid: no such file"),
        ({"model.vocab_size": 100}, "model.vocab_size=100 is smaller than the largest token id 122 in data.train_file"),
        ({"efficiency.precision": "fp8"}, "efficiency.precision='fp8' is invalid"),
        ({"train.trainable": "state"}, "state tuning needs architecture.learned_init_state=True"),
        ({"seed": -1}, "seed=-1 is invalid: must be an integer >= 0"),
        ({"optimizer.lr": float("nan")}, "optimizer.lr=nan is invalid: must be a finite number > 0"),
        ({"optimizer.rwkv_lr_multiplier": -1.0}, "optimizer.rwkv_lr_multiplier=-1.0 is invalid"),
        ({"optimizer.b2": 1.0}, "optimizer.b2=1.0 is invalid: must be in"),
        ({"optimizer.warmup_steps": 8}, "optimizer.warmup_steps=8 is invalid: must be below the "
                                        "schedule's 8 steps"),
        ({"logging.eval_tokens": -5}, "logging.eval_tokens=-5 is invalid"),
        ({"checkpoint.on_damage": "skip"},
         "checkpoint.on_damage='skip' is invalid: one of ('refuse', 'previous')"),
        ({"architecture.pos_emb": "learned", "architecture.max_positions": 16},
         "architecture.max_positions=16 is invalid: must be >= train.max_seq_length=32"),
        ({"mesh.data": 3}, "mesh"),  # before the data is read
    ],
)
def test_invalid_config_names_the_field(tmp_path, corpus, overrides, message):
    cfg = tiny_config(tmp_path, corpus, **overrides)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        trainer.prepare(cfg)
    assert not os.path.exists(os.path.join(cfg.output_dir, "t"))  # nothing started


def test_bad_files_and_places_are_named(tmp_path, corpus):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("Fran\xe7ois".encode("latin-1") * 100)
    (tmp_path / "afile").write_text("")
    for overrides, message in [
        ({"data.val_file": str(tmp_path / "empty.txt")}, "data.val_file=.* has 0 token"),
        ({"data.train_file": str(tmp_path / "latin1.txt")}, "data.train_file=.* is not valid UTF-8"),
        ({"output_dir": str(tmp_path / "afile")}, "output_dir: cannot make the directory"),
        ({"data.tokenizer": str(tmp_path / "none.json")}, "data.tokenizer=.*none.json"),
    ]:
        with pytest.raises(ConfigError, match=message):
            trainer.prepare(tiny_config(tmp_path, corpus, **overrides))


def test_unknown_option_is_refused(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus)
    with cfg.unlocked():
        cfg.train.bath_size = 3
    with pytest.raises(ConfigError, match="unknown option 'train.bath_size'; valid options here: batch_size"):
        trainer.prepare(cfg)


def test_cli_reports_config_errors_without_traceback(tmp_path):
    out = run_train(["--config=configs/tiny.py", "--config.memory.chunk_overlap=300",
                    f"--config.output_dir={tmp_path}"])
    assert out.returncode == 2, out.stderr[-2000:]
    assert "config error: memory.chunk_overlap=300 is invalid" in out.stderr
    assert "Traceback" not in out.stderr
    # The config file and the overrides, read while the flags are parsed.
    for args, message in [
        (["--config=configs/none.py"], "config error: --config: [Errno 2] No such file"),
        (["--config=configs/tiny.py", "--config.train.stepz=3"],
         "config error: no option 'stepz' Did you mean \"steps\""),
        (["--config=configs/tiny.py", "--config.train.steps=abc"],
         "config error: flag --config.train.steps=abc: invalid literal for int()"),
    ]:
        out = run_train(args)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr[-2000:])
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


_apply = jax.jit(lambda model, *a: model.apply(*a), static_argnums=0)
_chunk_forward = jax.jit(trainer.chunk_forward, static_argnums=(0, 4))  # as the train step runs it


def _per_token_ce(model, params, tokens, targets, state=None):
    logits, state = _apply(model, {"params": params}, tokens, state)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets), state


def test_chunked_training_matches_unchunked_for_the_first_chunk(tmp_path, corpus):
    run = trainer.prepare(tiny_config(tmp_path, corpus, **{"architecture.layer_pattern": "alternating",
                                                           "model.attn_head_size": 8}))
    model = RWKV(run.model_config)
    params = perturbed(init_params(run.model_config, jax.random.PRNGKey(0)))
    from rwkv_jax.data import get_batch

    x, y = (jnp.asarray(a) for a in get_batch(run.train_tokens, step=0, seed=0, batch_size=4, seq_len=32))
    L = run.chunk_len
    # Forward: chunks with the state passed give the unchunked per-token losses.
    full, _ = _per_token_ce(model, params, x, y)
    first, state = _per_token_ce(model, params, x[:, :L], y[:, :L])
    second, _ = _per_token_ce(model, params, x[:, L:], y[:, L:], state)
    chex.assert_trees_all_close(jnp.concatenate([first, second], 1), full, rtol=1e-5, atol=1e-5)

    # Loss and gradients of the first chunk's train step equal unchunked training restricted
    # to those targets.
    def unchunked(p):
        ce, _ = _per_token_ce(model, p, x, y)
        return jnp.mean(ce[:, :L])

    optimizer = optax.sgd(1.0)
    step = trainer.make_train_step(model, optimizer, fresh=True, handoff=L, float16=False)
    ts = trainer.TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params),
                            carry=None, loss_scale=jnp.float32(1), good_steps=jnp.int32(0))
    new, metrics = jax.jit(step)(ts, x[:, :L], y[:, :L], jnp.asarray(run.masks[0]))
    loss, grads = jax.jit(jax.value_and_grad(unchunked))(params)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    chex.assert_trees_all_close(jax.tree.map(lambda a, b: a - b, params, new.params), grads,
                                rtol=1e-4, atol=1e-6)


def test_overlapping_chunks_count_each_target_once_with_exact_state(tmp_path, corpus):
    run = trainer.prepare(tiny_config(tmp_path, corpus, **{"memory.chunk_overlap": 6,
                                                           "memory.rwkv_chunk_size": 12}))
    model = RWKV(run.model_config)
    params = perturbed(init_params(run.model_config, jax.random.PRNGKey(0)))
    x = jax.random.randint(jax.random.PRNGKey(1), (2, 32), 0, 256)
    y = jnp.roll(x, -1, axis=1)
    full, _ = _per_token_ce(model, params, x, y)
    counted = np.zeros((2, 32))
    total, state = 0.0, None
    for (a, b), mask, handoff in zip(run.spans, run.masks, run.handoffs):
        logits, state = _chunk_forward(model, params, x[:, a:b], state, handoff)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[:, a:b])
        chex.assert_trees_all_close(ce, full[:, a:b], rtol=1e-5, atol=1e-5)  # the state is exact
        counted[:, a:b] += mask
        total += float(jnp.sum(ce * mask))
    np.testing.assert_array_equal(counted, 1.0)
    np.testing.assert_allclose(total, float(jnp.sum(full)), rtol=1e-5)


def test_an_overlap_that_does_nothing_is_named(tmp_path, corpus, caplog):
    with caplog.at_level(logging.WARNING, logger="rwkv_jax"):
        trainer.prepare(tiny_config(tmp_path, corpus, **{"memory.chunk_overlap": 6,
                                                         "memory.rwkv_chunk_size": 12}))
        assert "chunk_overlap" not in caplog.text  # three chunks: it does something
        trainer.prepare(tiny_config(tmp_path, corpus, **{"memory.chunk_overlap": 6,
                                                         "memory.rwkv_chunk_size": 32}))
    assert "memory.chunk_overlap=6 does nothing here: a sequence of train.max_seq_length=32 " \
           "is one chunk" in caplog.text


def _final_params(run_dir):
    _, params, meta = ckpt.restore_params(run_dir)
    return params, meta


def test_sigkill_or_ctrl_c_then_same_command_resumes_bit_exact(tmp_path):
    text = tmp_path / "train.txt"
    text.write_text(TEXT)
    base = ["--config=configs/tiny.py", f"--config.data.train_file={text}",
            f"--config.data.val_file={text}", "--config.model.n_layer=2", "--config.model.n_embd=32",
            "--config.train.batch_size=4", "--config.train.max_seq_length=32",
            "--config.memory.rwkv_chunk_size=16", "--config.train.steps=9",
            "--config.optimizer.warmup_steps=2",
            "--config.checkpoint.every=4", "--config.logging.every=3",
            "--config.logging.eval_every=1000", "--config.logging.eval_tokens=128",
            "--config.logging.progress=False"]
    # The killed run goes first and compiles both train steps into the session's compilation
    # cache (conftest); then the uninterrupted run and the resumed one load them, side by side.
    interrupted = base + [f"--config.output_dir={tmp_path / 'b'}"]
    killed = run_train(interrupted, signal_at=(6, "KILL"))  # between checkpoints 4 and 8
    assert killed.returncode == -9, killed.stderr[-3000:]
    steps = ckpt.TrainCheckpointer(tmp_path / "b" / "tiny" / "checkpoints").all_steps()
    assert steps == [4]  # only whole checkpoints are visible
    straight = start_train(base + [f"--config.output_dir={tmp_path / 'a'}"])
    # The same command resumes; Ctrl-C (a real SIGINT) after step 7, in the middle of a
    # sequence of two chunks, saves the steps since the last checkpoint, state passed included.
    stopped = run_train(interrupted, signal_at=(7, "INT"))
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "resumed from" in stopped.stderr and "at step 4" in stopped.stderr
    assert "saved step 7" in stopped.stderr and "the same command resumes" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert ckpt.TrainCheckpointer(tmp_path / "b" / "tiny" / "checkpoints").all_steps() == [4, 7]
    resumed = run_train(interrupted)
    straight = finish(straight)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 7" in resumed.stderr

    a, meta_a = _final_params(tmp_path / "a" / "tiny")
    b, meta_b = _final_params(tmp_path / "b" / "tiny")
    assert meta_a["step"] == meta_b["step"] == 9
    chex.assert_trees_all_equal(a, b)  # bit for bit

    # The same command with another model is refused in one line, before anything compiles,
    # and the run keeps its checkpoints and the config.json that infer.py reads.
    config_json = (tmp_path / "b" / "tiny" / "config.json").read_text()
    other = run_train(interrupted + ["--config.model.n_layer=3", "--config.train.steps=12"])
    assert other.returncode == 2, other.stderr[-3000:]
    assert ("cannot resume: the checkpoints in" in other.stderr
            and "hold another model than this config (model.n_layer: 2 -> 3)" in other.stderr)
    assert "Traceback" not in other.stderr
    assert (tmp_path / "b" / "tiny" / "config.json").read_text() == config_json
    assert ckpt.TrainCheckpointer(tmp_path / "b" / "tiny" / "checkpoints").all_steps()[-1] == 9


def test_resuming_from_a_damaged_checkpoint_names_it(tmp_path, tiny_run):
    cfg = tiny_run.cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.output_dir = str(tmp_path)
        cfg.train.steps = 9  # past the checkpoint's 6: it has to be read
    run_dir = tmp_path / cfg.experiment_name
    shutil.copytree(tiny_run.run_dir, run_dir)
    chunks = [f for f in (run_dir / "checkpoints" / "6" / "params").rglob("*")
              if f.is_file() and f.parent.name == "d"]
    assert chunks
    for f in chunks:
        f.write_bytes(b"\0" * 64)
    # tensorstore's reading error names the damage (the checksums catch what it reads fine:
    # tests/io/test_faults_checkpoint.py); with no earlier step, the way on is to move it aside.
    with pytest.raises(trainer.ResumeError, match=r"the checkpoint of step 6 in .* is damaged "
                                                  r"\(ValueError: .*\)\. No earlier checkpoint is "
                                                  r"there to resume from: move .*6 aside"):
        trainer.train(trainer.prepare(cfg))


def test_a_run_directory_with_checkpoints_is_continued_or_refused(tmp_path, tiny_run):
    cfg = tiny_run.cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.output_dir = str(tmp_path)
    run_dir = tmp_path / cfg.experiment_name
    shutil.copytree(tiny_run.run_dir, run_dir)
    config_json = (run_dir / "config.json").read_text()

    def train(**changes):
        c = cfg.copy_and_resolve_references()
        for key, value in changes.items():
            group, field = key.split(".")
            c[group][field] = value
        return trainer.train(trainer.prepare(c))

    refusals = [
        ({"checkpoint.resume": False}, ConfigError,
         r"checkpoint.resume=False, but .* holds the checkpoints of a run \(steps \[6\]\)"),
        ({"train.steps": 4}, ConfigError, "train.steps=4 is below the step of the newest checkpoint"),
        ({"train.batch_size": 2, "train.steps": 9}, trainer.ResumeError,
         r"were trained on other batches than this config's \(train.batch_size: 4 -> 2\)"),
    ]
    for changes, error, message in refusals:
        with pytest.raises(error, match=message):
            train(**changes)
    lock = trainer.lock_run_dir(str(run_dir))  # as another train.py in this run holds it
    with pytest.raises(ConfigError, match="another train.py is training in"):
        train(**{"train.steps": 9})
    trainer.unlock_run_dir(lock)
    # At its last step already: nothing trains, and the checkpoint's own metrics come back.
    assert set(train(**{"train.steps": 6})) >= {"loss", "lr"}
    assert ckpt.TrainCheckpointer(run_dir / "checkpoints").all_steps() == [6]
    assert (run_dir / "config.json").read_text() == config_json


def test_a_step_whose_update_is_not_finite_changes_nothing():
    config = ModelConfig(vocab_size=16, n_layer=1, n_embd=8)
    model = RWKV(config)
    params = init_params(config, jax.random.PRNGKey(0))
    blowup = optax.scale(float("inf"))  # finite gradients, infinite weights
    ts = trainer.TrainState(step=jnp.int32(0), params=params, opt_state=blowup.init(params),
                            carry=None, loss_scale=jnp.float32(1), good_steps=jnp.int32(0))
    step = trainer.make_train_step(model, blowup, fresh=True, handoff=4, float16=False)
    tokens = jnp.ones((1, 4), jnp.int32)
    new, metrics = jax.jit(step)(ts, tokens, tokens, jnp.ones((4,), jnp.float32))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert not bool(metrics["finite"])
    chex.assert_trees_all_equal(new.params, params)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus):
    # One chunk a sequence: one train step to compile.
    cfg = tiny_config(tmp_path, corpus, **{"optimizer.lr": 1e30, "optimizer.warmup_steps": 0,
                                           "optimizer.grad_clip": 0.0, "train.steps": 40,
                                           "checkpoint.every": 1, "train.max_seq_length": 16})
    run = trainer.prepare(cfg)
    with pytest.raises(trainer.TrainingDiverged, match="is not finite"):
        trainer.train(run)
    _, params, _ = ckpt.restore_params(run.run_dir)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_state_tuning_trains_only_the_initial_state(tmp_path, corpus, tiny_run):
    # Tune the state of a trained model (the session's tiny run, conftest; its state codec is
    # not part of this model and stays behind): at the official init the output projections
    # are zero, so no state could matter yet.
    cfg = tiny_config(tmp_path, corpus, **{"architecture.learned_init_state": True,
                                           "train.trainable": "state", "train.steps": 3,
                                           "train.init_from": tiny_run.run_dir})
    run = trainer.prepare(cfg)
    before, _ = trainer.init_train_state(run, jax.random.PRNGKey(cfg.seed))
    before = jax.tree.map(np.asarray, before.params)
    # Weights to start from that cannot be read are named as the field they came from.
    (tmp_path / "not.pth").write_text("no torch file")
    with cfg.unlocked():
        cfg.train.init_from = str(tmp_path / "not.pth")
    with pytest.raises(ConfigError, match=r"train.init_from='.*not.pth' cannot be read: .* is not "
                                          r"a torch checkpoint"):
        trainer.init_train_state(trainer.prepare(cfg), jax.random.PRNGKey(cfg.seed))
    with cfg.unlocked():
        cfg.train.init_from = tiny_run.run_dir
    trainer.train(run)
    _, after, _ = ckpt.restore_params(run.run_dir)
    for path, old in jax.tree_util.tree_leaves_with_path(before):
        new = after
        for k in path:
            new = new[k.key]
        changed = not np.array_equal(old, np.asarray(new))
        assert changed == ("init_state" in jax.tree_util.keystr(path)), jax.tree_util.keystr(path)


def test_a_fine_tune_takes_its_model_from_the_weights(tmp_path, corpus, caplog):
    """train.init_from names the base, not its shape: the file's version, sizes and vocabulary
    replace the config's (each change logged), and the weights start the run as they are."""
    torch = pytest.importorskip("torch")
    from conftest import random_official_state_dict

    base = tmp_path / "base.pth"
    torch.save(random_official_state_dict(vocab=300, n_embd=48, n_layer=3, dim_ffn=96), base)
    cfg = tiny_config(tmp_path, corpus, **{"train.init_from": str(base), "model.version": "7",
                                           "model.head_size": 8,
                                           "architecture.learned_init_state": True})
    with caplog.at_level(logging.INFO, logger="rwkv_jax"):
        run = trainer.prepare(cfg)
    mc = run.model_config
    assert (mc.version, mc.n_layer, mc.n_embd, mc.dim_ffn, mc.vocab_size) == ("4", 3, 48, 96, 300)
    assert mc.learned_init_state  # the run's own choice stays
    for line in ("model.version '7' -> '4'", "model.n_layer 2 -> 3", "model.n_embd 32 -> 48",
                 "model.vocab_size 256 -> 300"):
        assert f"train.init_from: {line} (from the weights)" in caplog.text, line
    ts, _ = trainer.init_train_state(run, jax.random.PRNGKey(0))
    _, want = ckpt.import_official(base)
    got = {k: v for k, v in ts.params.items()}
    for path, w in jax.tree_util.tree_leaves_with_path(want):
        g = got
        for k in path:
            g = g[k.key]
        np.testing.assert_array_equal(np.asarray(g), w)


def test_the_schedule_horizon_is_fixed_by_the_run(tmp_path, corpus, caplog):
    """A resumed run keeps the horizon its checkpoint saved (raising train.steps moves no
    learning rate); an explicit optimizer.total_steps changes it, and the log names the jump."""
    def train(**changes):
        cfg = tiny_config(tmp_path, corpus, **{"train.max_seq_length": 16, "checkpoint.every": 4,
                                               "logging.every": 1, **changes})
        with caplog.at_level(logging.INFO, logger="rwkv_jax"):
            caplog.clear()
            return trainer.train(trainer.prepare(cfg))

    train(**{"train.steps": 4})  # the horizon: train.steps, 4
    run_dir = tmp_path / "runs" / "t"
    assert ckpt.TrainCheckpointer(run_dir / "checkpoints").meta(4)["total_steps"] == 4
    final = train(**{"train.steps": 6})
    assert ("the schedule keeps the horizon saved with this run, optimizer.total_steps=4 "
            "(train.steps is 6)") in caplog.text
    assert final["lr"] == pytest.approx(1e-5)  # cosine past its horizon: lr_final
    assert ckpt.TrainCheckpointer(run_dir / "checkpoints").meta(6)["total_steps"] == 4
    with pytest.raises(ConfigError, match="optimizer.warmup_steps=4 is invalid: must be below "
                                          "the schedule's horizon of 4 steps, which this run keeps"):
        train(**{"train.steps": 8, "optimizer.warmup_steps": 4})
    final = train(**{"train.steps": 8, "optimizer.total_steps": 12})
    assert "optimizer.total_steps 4 -> 12: the learning rate at step 6 jumps from 1e-05 to " \
           "0.001" in caplog.text
    assert final["lr"] > 1e-3
    assert ckpt.TrainCheckpointer(run_dir / "checkpoints").meta(8)["total_steps"] == 12


def test_a_resume_in_another_precision_is_not_taken_for_damage(tmp_path, corpus):
    """The carried attention window is kept in the compute dtype: a hybrid run resumed in
    bfloat16 restores it cast, and its float32 checksums cannot be compared (they used to
    call the checkpoint damaged)."""
    overrides = {"architecture.layer_pattern": "alternating", "model.attn_head_size": 16,
                 "train.max_seq_length": 16, "checkpoint.every": 2, "optimizer.warmup_steps": 0}
    trainer.train(trainer.prepare(tiny_config(tmp_path, corpus, **overrides, **{"train.steps": 2})))
    final = trainer.train(trainer.prepare(tiny_config(
        tmp_path, corpus, **overrides, **{"train.steps": 3, "efficiency.precision": "bfloat16"})))
    assert np.isfinite(final["loss"])
    # A real change of the words is still damage.
    run_dir = tmp_path / "runs" / "t"
    meta = ckpt.TrainCheckpointer(run_dir / "checkpoints").meta(3)
    assert meta["checksum_dtypes"]["train"]["['carry']['layers'][1]['k']"] == "bfloat16"
