"""lm-evaluation-harness: `rwkv-lm-eval` and `lm_eval --model hf` on the same tiny RWKV-4 (ours
from the official .pth, theirs from its transformers export) agree on a local multiple-choice
task, example by example; RwkvLM's shared contexts, rolling log-likelihoods and generation
match the model run on whole sequences."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, random_official_state_dict, repo_pythonpath

pytest.importorskip("lm_eval", reason="the eval extra: pip install -e .[eval]")
torch = pytest.importorskip("torch", reason="the random official checkpoint is written with torch")
pytest.importorskip("transformers", reason="lm_eval --model hf runs transformers")

from rwkv_jax.data import ByteTokenizer
from rwkv_jax.generate import Generator
from rwkv_jax.harness import RwkvLM
from rwkv_jax.io import import_official
from rwkv_jax.nn.model import RWKV

TASK_DIR = os.path.join(REPO, "tests", "fixtures", "lm_eval")
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random byte-level RWKV-4 as an official .pth and as a transformers folder."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    pth, hf = tmp / "m.pth", tmp / "hf"
    torch.save(random_official_state_dict(vocab=256, n_embd=32, n_layer=2, dim_ffn=64), pth)
    out = subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), "--official", str(pth),
                          "--tokenizer", "byte", "--export_hf", str(hf)],
                         env={**os.environ, "PYTHONPATH": repo_pythonpath()}, cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return SimpleNamespace(tmp=tmp, pth=pth, hf=hf)


@pytest.fixture(scope="module")
def lm(weights):
    config, params = import_official(str(weights.pth))
    return SimpleNamespace(config=config, params=params, apply=jax.jit(RWKV(config).apply),
                           gen=Generator(config, params, ByteTokenizer(), prefill_chunk=8))


def _lm_eval(argv, out_dir, *, ours: bool):
    command = ([sys.executable, "-m", "rwkv_jax.cli.lm_eval"] if ours else
               [sys.executable, "-m", "lm_eval"])
    return subprocess.Popen(
        [*command, *argv, "--tasks", "rwkv_tiny_mc", "--include_path", TASK_DIR,
         "--batch_size", "8", "--output_path", str(out_dir), "--log_samples"],
        cwd=TASK_DIR, env={**os.environ, **OFFLINE, "PYTHONPATH": repo_pythonpath()},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _samples(out_dir) -> dict:
    (path,) = glob.glob(os.path.join(out_dir, "*", "samples_rwkv_tiny_mc_*.jsonl"))
    with open(path) as f:
        return {r["doc_id"]: r for r in map(json.loads, f)}


def test_rwkv_lm_eval_scores_each_example_as_lm_eval_hf_does(weights):
    with open(os.path.join(TASK_DIR, "tiny_mc.jsonl")) as f:
        docs = [json.loads(line) for line in f]
    hf_context = json.loads((weights.hf / "config.json").read_text())["context_length"]
    assert max(len(d["question"]) + 4 for d in docs) < hf_context  # nothing for hf to cut
    ours = _lm_eval(["--model", "rwkv_jax", "--model_args", f"official={weights.pth},tokenizer=byte"],
                    weights.tmp / "ours", ours=True)
    _, err = ours.communicate(timeout=240)
    assert ours.returncode == 0, err[-3000:]
    # The byte tokenizer has no BOS/EOS: hf's prefix token is given, as ours defaults to 0.
    theirs = _lm_eval(["--model", "hf", "--device", "cpu", "--model_args",
                       f"pretrained={weights.hf},dtype=float32,prefix_token_id=0"],
                      weights.tmp / "hf_out", ours=False)
    _, err = theirs.communicate(timeout=240)
    assert theirs.returncode == 0, err[-3000:]

    a, b = _samples(weights.tmp / "ours"), _samples(weights.tmp / "hf_out")
    assert sorted(a) == sorted(b) == list(range(len(docs)))
    for k in a:
        assert a[k]["acc"] == b[k]["acc"] and a[k]["acc_norm"] == b[k]["acc_norm"]
        ll_a = [float(r[0]) for r in a[k]["filtered_resps"]]
        ll_b = [float(r[0]) for r in b[k]["filtered_resps"]]
        assert len(ll_a) == 4
        np.testing.assert_allclose(ll_a, ll_b, atol=1e-4, rtol=0)


def test_bad_model_args_get_one_line(weights, monkeypatch, capsys):
    from rwkv_jax.cli.lm_eval import main

    monkeypatch.chdir(TASK_DIR)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() hands lm-eval its own argv
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    assert main(["--model", "rwkv_jax", "--model_args", f"official={weights.pth},temprature=0",
                 "--tasks", "rwkv_tiny_mc", "--include_path", TASK_DIR]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "rwkv-lm-eval: --model_args temprature: unknown; rwkv_jax takes run_dir, step, official, "
        "hf, tokenizer, bf16, prefill_chunk, reuse_context, rolling_chunk, prefix_token")


def _reference_logp(lm, rows, width=512):
    """Log-probabilities (rows, width, V) from one call on whole sequences, padded at the end
    (outputs at a position do not depend on what follows: one compile for every check)."""
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    logits, _ = lm.apply({"params": lm.params}, jnp.asarray(tokens))
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))


def _picked(logp, tokens) -> np.ndarray:
    """log p(tokens[t + 1] | tokens[: t + 1]) of one row of _reference_logp."""
    return logp[np.arange(len(tokens) - 1), tokens[1:]]


def _requests(*pairs):
    return [SimpleNamespace(args=p) for p in pairs]


def test_shared_contexts_score_as_separate_ones_and_as_whole_sequences(lm):
    long = "a long context, longer than a prefill piece and than any batch: " * 4
    pairs = [(long, " yes"), (long, " no"), ("Q: 1 + 1 =", " 2"), ("Q: 1 + 1 =", " 11"),
             ("x", " 3"), (long, " maybe not"), ("Q: 2 + 2 =", " 4"), ("", "abc")]
    shared = RwkvLM(lm.gen, batch_size=2, reuse_context=True)
    separate = RwkvLM(lm.gen, batch_size=3, reuse_context=False)
    got = shared.loglikelihood(_requests(*pairs), disable_tqdm=True)
    alone = separate.loglikelihood(_requests(*pairs), disable_tqdm=True)
    assert shared.contexts_fed == 5 and separate.contexts_fed == len(pairs)
    np.testing.assert_allclose([g[0] for g in got], [g[0] for g in alone], atol=1e-5, rtol=0)
    assert [g[1] for g in got] == [g[1] for g in alone]
    tok = ByteTokenizer()
    # lm-eval moves a context's trailing spaces to the continuation (the long one has one).
    splits = [len(tok.encode(ctx.rstrip(" "))) if ctx else 1 for ctx, _ in pairs]
    wholes = [(tok.encode(ctx) if ctx else [0]) + tok.encode(cont) for ctx, cont in pairs]
    logp = _reference_logp(lm, wholes)
    for i, (ll, _) in enumerate(got):
        want = _picked(logp[i], wholes[i])[splits[i] - 1 :].sum()
        assert abs(ll - want) < 1e-4, pairs[i]


def test_rolling_loglikelihood_and_greedy_generation_follow_the_model(lm):
    text = "To be, or not to be, that is the question: whether 'tis nobler"
    model = RwkvLM(lm.gen, rolling_chunk=8)
    (rolling,) = model.loglikelihood_rolling(_requests((text,)), disable_tqdm=True)
    whole = [0, *ByteTokenizer().encode(text)]
    assert abs(rolling - _picked(_reference_logp(lm, [whole])[0], whole).sum()) < 1e-4

    prompts = ["Q: 1 + 1 =", "To be"]
    outs = model.generate_until(_requests(*[(p, {"until": ["zz"], "max_gen_toks": 6})
                                            for p in prompts]), disable_tqdm=True)
    rows = [ByteTokenizer().encode(p) for p in prompts]
    for _ in range(6):  # greedy: each new byte is the argmax after what came before
        logp = _reference_logp(lm, rows)
        for i, r in enumerate(rows):
            r.append(int(np.argmax(logp[i, len(r) - 1])))
    for prompt, out, r in zip(prompts, outs, rows):
        assert out == ByteTokenizer().decode(r)[len(prompt):].split("zz")[0]
    # A stop string ends the text where it first starts.
    stop = outs[1][2:4]
    (cut,) = model.generate_until(_requests((prompts[1], {"until": [stop], "max_gen_toks": 6})),
                                  disable_tqdm=True)
    assert len(stop) == 2 and cut == outs[1][: outs[1].find(stop)]
