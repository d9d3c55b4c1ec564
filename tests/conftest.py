"""Shared test helpers: a float64 WKV reference, random official checkpoints, and one XLA
compilation cache for the programs that tests start."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rwkv_jax.config import default_config

# The suite's time on a CPU is mostly XLA compiling tiny programs that then run for
# milliseconds: LLVM's optimisation passes are most of a compile and buy nothing here (the
# whole suite on 2 cores: 793 s -> 593 s; 443 s with README's two workers, -n 2). The programs
# tests start get the same through the environment (_shared_environment).
jax.config.update("jax_disable_most_optimizations", True)

# Set before JAX starts its backend: on a GPU, several processes of one suite share the card
# (pytest-xdist's workers and the programs tests start), and each would otherwise take 75% of
# its memory when it starts (a child train.py of the H200 run then failed to load its kernels:
# CUDA_ERROR_OUT_OF_MEMORY). Children inherit it; a value the caller set stays.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# The tests hold float32 results to float32 tolerances (1e-4 and tighter). On a GPU, JAX's
# default precision for float32 matrix products is TF32's 10-bit mantissa: prefilling in one
# piece and token by token then gave states up to 0.75% apart (H200, test_generate.py). A GPU run of
# the suite asks for float32 products; on a CPU they are float32 already.
_ON_GPU = jax.default_backend() == "gpu"
if _ON_GPU:
    jax.config.update("jax_default_matmul_precision", "highest")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_pythonpath() -> str:
    """PYTHONPATH for a program a test starts: the repository, then the caller's own entries
    (packages installed by path, as on the GPU machine, where dropping them lost ml_collections)."""
    return os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="session", autouse=True)
def _shared_environment(tmp_path_factory):
    """The programs that tests start (train.py, infer.py, the multihost workers)
    share one persistent XLA compilation cache for the session: several runs of a test compile
    the same tiny model, and a warm start takes half the time. Set in the environment that
    child processes inherit; this process imported JAX at collection and keeps its own
    caches. A size limit turns on the cache's file lock, which processes that run at the same
    time (the multihost tests) need. They compile without LLVM's optimisations, as this
    process does."""
    settings = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
                "JAX_COMPILATION_CACHE_MAX_SIZE": str(1 << 31),
                "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    if _ON_GPU:  # float32 products, as this process asks for above
        settings["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
        # Programs that tests compare bit for bit (a killed and resumed run against a straight
        # one) sum in the same order only so: without it, an H200 run differed in the last bit.
        settings["XLA_FLAGS"] = " ".join(filter(None, (os.environ.get("XLA_FLAGS"),
                                                       "--xla_gpu_deterministic_ops=true")))
    with pytest.MonkeyPatch.context() as mp:
        for name, value in settings.items():
            mp.setenv(name, value)
        yield


def wkv4_reference(time_decay, time_first, k, v, state=None):
    """The RWKV-4 WKV in float64 straight from its definition (sums kept in log scale)."""
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    w = -np.exp(np.asarray(time_decay, np.float64))
    u = np.asarray(time_first, np.float64)
    B, T, C = k.shape
    if state is None:
        num, den, lp = np.zeros((B, C)), np.zeros((B, C)), np.full((B, C), -np.inf)
    else:
        num, den, lp = (np.asarray(s, np.float64) for s in state)
    y = np.zeros((B, T, C))
    for t in range(T):
        m = np.maximum(lp, u + k[:, t])
        a, b = np.exp(lp - m), np.exp(u + k[:, t] - m)
        y[:, t] = (num * a + b * v[:, t]) / (den * a + b)
        m2 = np.maximum(lp + w, k[:, t])
        a, b = np.exp(lp + w - m2), np.exp(k[:, t] - m2)
        num, den, lp = num * a + b * v[:, t], den * a + b, m2
    return y, (num, den, lp)


def wkv_inputs(rng, B=2, T=45, C=12, k_range=30.0):
    """Decays over the whole allowed range (time_decay in [-10, 10]) and keys up to +-30."""
    td = np.concatenate([[-10.0, 10.0], rng.uniform(-10, 10, C - 2)]).astype(np.float32)
    tf = rng.uniform(-3, 3, C).astype(np.float32)
    k = rng.uniform(-k_range, k_range, (B, T, C)).astype(np.float32)
    v = rng.normal(size=(B, T, C)).astype(np.float32)
    return td, tf, k, v


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def random_official_state_dict(vocab=97, n_embd=64, n_layer=3, dim_ffn=256, seed=0, dtype=None):
    """A random RWKV-4 state dict in the official layout, with weights far from their
    initialisation (zero-initialised projections would hide mistakes)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    C, F = n_embd, dim_ffn
    sd = {"emb.weight": randn(vocab, C) * 0.5}
    for i in range(n_layer):
        b = f"blocks.{i}."
        for n in (["ln0"] if i == 0 else []) + ["ln1", "ln2"]:
            sd[b + n + ".weight"] = 1 + 0.1 * randn(C)
            sd[b + n + ".bias"] = 0.1 * randn(C)
        sd[b + "att.time_decay"] = torch.rand(C, generator=g) * 6 - 4
        sd[b + "att.time_first"] = randn(C)
        for n in "kvr":
            sd[b + f"att.time_mix_{n}"] = torch.rand(1, 1, C, generator=g)
        for n in ("key", "value", "receptance", "output"):
            sd[b + f"att.{n}.weight"] = randn(C, C) / C**0.5
        for n in "kr":
            sd[b + f"ffn.time_mix_{n}"] = torch.rand(1, 1, C, generator=g)
        sd[b + "ffn.key.weight"] = randn(F, C) / C**0.5
        sd[b + "ffn.receptance.weight"] = randn(C, C) / C**0.5
        sd[b + "ffn.value.weight"] = randn(C, F) / F**0.5
    return _with_head(sd, randn, vocab, C, dtype)


def _with_head(sd, randn, vocab, C, dtype):
    """The tensors after the blocks (ln_out, head), then every tensor in `dtype`."""
    sd["ln_out.weight"] = 1 + 0.1 * randn(C)
    sd["ln_out.bias"] = 0.1 * randn(C)
    sd["head.weight"] = randn(vocab, C) / C**0.5
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    return sd


def random_x070_state_dict(vocab=97, n_embd=64, n_layer=3, head_size=16, dim_ffn=256,
                           lora=(16, 16, 8, 24), seed=0, dtype=None, first_v=True):
    """A random RWKV-7 (x070) state dict in the official layout and order (RWKV-LM's
    RWKV-v7/train_temp: ln1, ln2, ln0, then the time-mix's tensors as its constructor makes
    them), every tensor random and far from its initialisation: no zero LoRA factor or output
    projection to hide a mistake, decays across their whole range. lora: the ranks of w, a, v, g.
    first_v=False drops block 0's unused v0/v1/v2 as some converted files do."""
    import torch

    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    rand = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    C, F, H, N = n_embd, dim_ffn, n_embd // head_size, head_size
    dw, da, dv, dg = lora
    sd = {"emb.weight": randn(vocab, C) * 0.5}
    for i in range(n_layer):
        b = f"blocks.{i}."
        for n in ["ln1", "ln2"] + (["ln0"] if i == 0 else []):
            sd[b + n + ".weight"] = 1 + 0.1 * randn(C)
            sd[b + n + ".bias"] = 0.1 * randn(C)
        for n in ("r", "w", "k", "v", "a", "g"):
            sd[b + f"att.x_{n}"] = rand(1, 1, C)
        for n, d, vec in (("w", dw, lambda: rand(1, 1, C) * 8 - 5),  # sigmoid(w0) over 0.007..0.95
                          ("a", da, lambda: randn(1, 1, C)),
                          ("v", dv, lambda: randn(1, 1, C)),
                          ("g", dg, None)):
            if n == "v" and i == 0 and not first_v:
                continue
            sd[b + f"att.{n}1"] = randn(C, d) / C**0.5
            sd[b + f"att.{n}2"] = randn(d, C) / d**0.5
            if vec is not None:
                sd[b + f"att.{n}0"] = vec()
        sd[b + "att.k_k"] = 0.7 + 0.3 * randn(1, 1, C)
        sd[b + "att.k_a"] = 1 + 0.3 * randn(1, 1, C)
        sd[b + "att.r_k"] = 0.3 * randn(H, N)
        for n in ("receptance", "key", "value", "output"):
            sd[b + f"att.{n}.weight"] = randn(C, C) / C**0.5
        sd[b + "att.ln_x.weight"] = 1 + 0.2 * randn(C)
        sd[b + "att.ln_x.bias"] = 0.1 * randn(C)
        sd[b + "ffn.x_k"] = rand(1, 1, C)
        sd[b + "ffn.key.weight"] = randn(F, C) / C**0.5
        sd[b + "ffn.value.weight"] = randn(C, F) / F**0.5
    return _with_head(sd, randn, vocab, C, dtype)


def perturbed(params, seed=1, scale=0.3):
    """Params moved away from their initialisation so that every weight matters in a test."""
    import jax

    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    )


def seasoned_block(config, rows: int, matrices=None):
    """An RWKV-4 block (layer 1) with perturbed parameters (2-D ones cast to `matrices` if
    given), a state that has seen three tokens, and one more token for it: (params, x (rows, 1,
    C), state, the block's output for x, its state after x)."""
    import jax
    import jax.numpy as jnp

    from rwkv_jax.nn.rwkv4 import RWKVBlock
    from rwkv_jax.nn.state import zero_layer_state

    block = RWKVBlock(config, 1)
    pos = jnp.zeros((rows,), jnp.int32)
    x = jax.random.normal(jax.random.PRNGKey(0), (rows, 1, config.n_embd)) * 3 + 1
    params = perturbed(block.init(jax.random.PRNGKey(1), x, None, pos)["params"])
    if matrices is not None:
        params = jax.tree.map(lambda a: a.astype(matrices) if a.ndim == 2 else a, params)
    apply = jax.jit(block.apply)
    state = zero_layer_state(config, 1, rows)
    for t in range(3):
        _, state = apply({"params": params}, jax.random.normal(jax.random.PRNGKey(t), x.shape),
                         state, pos)
    want, want_state = apply({"params": params}, x, state, pos)
    return params, x, state, want, want_state


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny training run with the learned state codec on, shared by the inference, state
    codec and state tuning tests (one training compile for all)."""
    from rwkv_jax import train as trainer

    tmp = tmp_path_factory.mktemp("tiny_run")
    (tmp / "train.txt").write_text(TEXT)
    (tmp / "val.txt").write_text(TEXT[:600])
    cfg = tiny_config(tmp, (str(tmp / "train.txt"), str(tmp / "val.txt")),
                      **{"train.steps": 6, "checkpoint.every": 6, "logging.eval_every": 0,
                         "optimizer.warmup_steps": 0, "memory.state_compression": "learned",
                         "memory.state_rank": 4})
    run = trainer.prepare(cfg)
    trainer.train(run)
    return run


@pytest.fixture
def triton_modules(monkeypatch):
    """Lowering Pallas kernels for CUDA (no GPU needed) runs the MLIR verifier on every Triton
    module made, and lists their names here: it catches lowering bugs that otherwise only show
    on a GPU."""
    lowering = pytest.importorskip("jax._src.pallas.triton.lowering")
    if not hasattr(lowering, "lower_jaxpr_to_triton_module"):
        pytest.skip("this jax lowers Pallas to Triton differently")
    verified = []
    original = lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*args, **kwargs):
        result = original(*args, **kwargs)
        op = result.module.operation
        assert op.verify(), str(op.attributes["sym_name"])
        verified.append(str(op.attributes["sym_name"]))
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    return verified


# ------------------------------------------------ training runs shared by the test packages

# A small English text: enough tokens for a few steps of a tiny model.
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 60)


def tiny_config(tmp_path, corpus, **overrides):
    """A tiny RWKV-4 run config over `corpus` (train, val) writing under tmp_path/runs; overrides
    as {"group.field": value}."""
    c = default_config()
    c.experiment_name = "t"
    c.output_dir = str(tmp_path / "runs")
    c.model.n_layer, c.model.n_embd = 2, 32
    c.data.train_file, c.data.val_file = corpus
    c.train.batch_size, c.train.max_seq_length, c.train.steps = 4, 32, 8
    c.memory.rwkv_chunk_size = 16
    c.optimizer.lr, c.optimizer.warmup_steps = 3e-3, 2
    c.logging.every, c.logging.eval_every, c.logging.eval_tokens = 4, 1000, 256
    c.logging.progress, c.logging.tensorboard = False, False
    c.checkpoint.every = 3
    for key, value in overrides.items():
        *groups, field = key.split(".")
        node = c
        for group in groups:
            node = node[group]
        node[field] = value
    return c


def start_train(args, env=None, signal_at=None):
    """train.py with `args`; signal_at=(step, "KILL" or "INT") sends that signal after the step
    (tests/signal_at_step.py)."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": repo_pythonpath()}
    program = [os.path.join(REPO, "train.py")] if signal_at is None else \
        [os.path.join(REPO, "tests", "signal_at_step.py"), str(signal_at[0]), signal_at[1]]
    return subprocess.Popen([sys.executable, *program, *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=240):
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_train(args, env=None, timeout=240, signal_at=None):
    return finish(start_train(args, env, signal_at), timeout)
