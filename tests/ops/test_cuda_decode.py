"""The CUDA decode block (rwkv_jax.kernels.cuda.decode4). Here, on a CPU: the vector table it
reads is the kernel's, and asking for it where it cannot run fails at once with the reason.
On a Hopper GPU with nvcc (skipped elsewhere): a bf16 block step through it equals XLA's."""

from __future__ import annotations

import re
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import perturbed, seasoned_block

from rwkv_jax.config import ModelConfig
from rwkv_jax.generate import Generator
from rwkv_jax.generate.decode_weights import (
    DecodeWeights,
    cuda_layout,
    decode_forward,
    head_rows_layout,
    kernel_layout,
    pack_for_decode,
)
from rwkv_jax.kernels.cuda import decode4 as cuda_decode4
from rwkv_jax.nn.model import RWKV, init_params
from rwkv_jax.nn.rwkv4 import RWKVBlock
from rwkv_jax.nn.state import zero_layer_state


def _config(**kw):
    return ModelConfig(**{"vocab_size": 61, "n_layer": 2, "n_embd": 64, "dim_ffn": 256, **kw})


def _runs_here() -> bool:
    try:
        cuda_decode4.check_available()
    except cuda_decode4.Unavailable:
        return False
    return True


def test_the_vector_table_is_the_kernels():
    """pack_vectors writes the rows the kernel's `Vec` enum names, in its order."""
    assert cuda_decode4.VECS == cuda_decode4.kernel_vec_names()
    config = _config()
    params = perturbed(init_params(config, jax.random.PRNGKey(0)))
    block = kernel_layout(config, params)["blocks_1"]
    table = np.asarray(cuda_decode4.pack_vectors(block))
    assert table.shape == (len(cuda_decode4.VECS), 64) and table.dtype == np.float32
    row = dict(zip(cuda_decode4.VECS, table))
    np.testing.assert_array_equal(row["LN2_BIAS"], block["ln2"]["bias"])
    np.testing.assert_array_equal(row["MIX_V"], block["att"]["time_mix_v"])
    np.testing.assert_array_equal(row["FMIX_R"], block["ffn"]["time_mix_r"])
    np.testing.assert_allclose(row["DECAY"], -np.exp(block["att"]["time_decay"]), rtol=1e-6)


@pytest.mark.skipif(_runs_here(), reason="the kernel runs here")
def test_asking_for_it_where_it_cannot_run_says_why():
    config = _config(dtype="bfloat16")
    params = init_params(config, jax.random.PRNGKey(0))
    with pytest.raises(cuda_decode4.Unavailable, match="needs an NVIDIA GPU|compute capability"):
        Generator(config, params, decode_kernels="cuda")


def test_a_decode_kernels_value_outside_the_choices_is_refused():
    config = _config()
    params = init_params(config, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="decode_kernels='triton': must be None / False / 'xla' "
                                         "or 'cuda'"):
        Generator(config, params, decode_kernels="triton")
    assert Generator(config, params, decode_kernels="xla").decode_kernels is None


@pytest.mark.parametrize("kernels", [True, 1, "pallas"])
@pytest.mark.parametrize("version", ["4", "7"])
def test_the_removed_pallas_kernels_say_where_they_went(kernels, version):
    config = _config(version=version, head_size=8) if version == "7" else _config()
    params = init_params(config, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"was removed: the fused Pallas decode kernels were "
                                         r"slower than XLA's products \(docs/performance.md\); use "
                                         r"auto, xla or cuda"):
        Generator(config, params, decode_kernels=kernels)


def test_the_size_limits_are_the_kernels():
    text = (Path(cuda_decode4.__file__).parent / "decode4_block.cuh").read_text()
    consumers = int(re.search(r"#define RWKV_CONSUMERS (\d+)", text).group(1))
    per = int(re.search(r"constexpr int kPer = (\d+);", text).group(1))
    assert cuda_decode4.MAX_C == per * 32 * consumers and cuda_decode4.MAX_F == 4 * per * 32 * consumers
    assert cuda_decode4.RING_STAGES == consumers  # make_plan's smallest ring
    define = lambda name: int(re.search(rf"#define {name} (\d+)", text).group(1))  # noqa: E731
    assert cuda_decode4.STAGE_ROWS == define("RWKV_MAX_STAGE_ROWS")
    assert cuda_decode4.NARROW_C == define("RWKV_NARROW_C")
    assert cuda_decode4.NARROW_STAGE_ROWS == define("RWKV_NARROW_STAGE_ROWS")
    assert cuda_decode4.STAGE_BYTES == 1024 * define("RWKV_STAGE_KB")
    assert int(re.search(r"constexpr int kMaxLayers = (\d+);", text).group(1)) == (
        cuda_decode4.MAX_LAYERS)


def test_sizes_it_cannot_take_are_refused_before_any_work():
    assert cuda_decode4.fits(2560, 10240, 1) and cuda_decode4.fits(2560, 10240, 2)  # 3B
    assert not cuda_decode4.fits(4096, 16384, 1)  # 7B: wider than its norms take
    assert not cuda_decode4.fits(2048, cuda_decode4.MAX_F + 8, 1)
    config = _config(n_embd=4096, dim_ffn=16384, n_layer=1, dtype="bfloat16")
    block = jax.eval_shape(lambda: jax.tree.map(  # shapes only: no 7B arrays on the CPU
        lambda a: a.astype(jnp.bfloat16) if a.ndim > 1 else a,
        kernel_layout(config, init_params(config, jax.random.PRNGKey(0)))))["blocks_0"]
    with pytest.raises(cuda_decode4.Unavailable, match="at most 3072 and 12288; they are 4096 "
                                                       "and 16384"):
        cuda_decode4.check_block(block)


def test_rows_the_kernel_does_not_take_run_xlas_products(monkeypatch):
    """A model in the CUDA layout given 3 rows (the kernel takes 1 or 2) gives the model's
    outputs through XLA's products, not through a kernel."""
    config = _config(n_layer=1)
    params = perturbed(init_params(config, jax.random.PRNGKey(1)))
    fused = DecodeWeights(_cuda_params(config, params), "cuda")

    def no_kernel(*args, **kwargs):
        raise AssertionError("the kernel was asked for 3 rows")

    monkeypatch.setattr(cuda_decode4, "layers_step", no_kernel)
    tokens = jnp.array([[3], [9], [27]])
    state = RWKV(config).apply({"params": params}, jnp.array([[1, 2], [4, 5], [7, 8]]))[1]
    want, want_state = RWKV(config).apply({"params": params}, tokens, state)
    got, got_state = decode_forward(config, fused, tokens, state)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(got_state, want_state, rtol=1e-5, atol=1e-5)


def _cuda_params(config, params):
    """What cuda_layout gives, built on a CPU (cuda_layout itself wants the GPU)."""
    out = dict(kernel_layout(config, params))
    for i in range(config.n_layer):
        if config.is_rwkv(i):
            b = out[f"blocks_{i}"]
            out[f"blocks_{i}"] = {**b, "decode_vecs": cuda_decode4.pack_vectors(b)}
    return out


@pytest.mark.skipif(_runs_here(), reason="the kernel runs here: test_model_decode_steps_equal_"
                                         "xlas covers the same with the kernel itself")
def test_a_decode_step_sends_each_run_of_rwkv_blocks_to_one_launch(monkeypatch):
    """The model hands every run of consecutive RWKV-4 blocks of a decode step to one call of
    the kernel (split around attention layers), with x after ln0 and the run's states, and puts
    the returned states back in their layers' places. The kernel's stand-in here is XLA's block
    on the official weights, so the step must give what the official layout gives (float32
    products at full precision: a GPU's TF32 would turn float noise into 1% after 4 layers)."""
    config = _config(n_layer=4, layer_types=("rwkv", "attn", "rwkv", "rwkv"), attn_head_size=8,
                     attn_window=6)
    params = perturbed(init_params(config, jax.random.PRNGKey(0)))
    model = RWKV(config)
    rwkv_layers = [i for i in range(config.n_layer) if config.is_rwkv(i)]
    runs = []

    def stand_in(blocks, x, states, *, eps):
        first = sum(runs)
        runs.append(len(blocks))
        out = []
        for j, (p, state) in enumerate(zip(blocks, states)):
            assert "decode_vecs" in p and eps == config.layer_norm_eps
            official = params[f"blocks_{rwkv_layers[first + j]}"]
            x, state = RWKVBlock(config, 1).apply(  # layer 1: x comes after ln0
                {"params": official}, x[:, None], state, jnp.zeros((x.shape[0],), jnp.int32))
            x = x[:, 0]
            out.append(state)
        return x, out

    monkeypatch.setattr(cuda_decode4, "layers_step", stand_in)
    # Traced, not run: which calls reach the kernel is decided while tracing.
    fused = DecodeWeights(_cuda_params(config, params), "cuda")
    forward = jax.jit(lambda w, t, s: decode_forward(config, w, t, s))
    for rows, length in ((2, 5), (3, 1)):  # a prefill; three rows
        tokens = jax.ShapeDtypeStruct((rows, length), jnp.int32)
        state = jax.eval_shape(lambda t: model.apply({"params": params}, t)[1], tokens)
        jax.eval_shape(forward, fused, tokens, state)
    assert runs == []  # a prefill and three rows run XLA's products
    with jax.default_matmul_precision("highest"):
        apply = jax.jit(model.apply)
        state = apply({"params": params}, jnp.array([[1, 4, 2], [5, 0, 9]]))[1]
        step = jnp.array([[3], [7]])
        want, want_state = apply({"params": params}, step, state)
        got, got_state = forward(fused, step, state)
    assert runs == [1, 2]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(got_state, want_state, rtol=1e-5, atol=1e-5)


def _assert_like_xla(x, state, want_x, want_state, what):
    """Within 2% of the largest value, field by field. Products are rounded to bf16 in both; a
    sum that lands on the other side of a rounding boundary moves one value by a bf16 ulp, and
    what follows it a little."""
    for name, got, want in [("x", x, want_x)] + [(n, state[n], want_state[n]) for n in want_state]:
        assert float(jnp.max(jnp.abs(got - want))) <= 2e-2 * float(jnp.max(jnp.abs(want))), (
            what, name)


@pytest.mark.skipif(not _runs_here(), reason="needs a GPU of compute capability 9.0 and nvcc")
@pytest.mark.parametrize("rows", [1, 2])
def test_block_step_equals_xlas_block(rows):
    config = _config(dtype="bfloat16")
    params, x, state, want, want_state = seasoned_block(config, rows, jnp.bfloat16)
    fused = cuda_layout(_config(n_layer=1, dtype="bfloat16"), {"blocks_0": params})["blocks_0"]
    got, got_state = jax.jit(lambda p, x, s: cuda_decode4.block_step(
        p, x, s, eps=config.layer_norm_eps))(fused, x[:, 0], state)
    _assert_like_xla(got, got_state, want[:, 0], want_state, rows)


@pytest.mark.skipif(not _runs_here(), reason="needs a GPU of compute capability 9.0 and nvcc")
def test_steps_of_one_and_two_rows_in_turn_stay_with_xla():
    """Sizes where every CTA's stages wrap the ring, launches one after another, the rows
    changing between them (the exchange words of the second row go unused, then are used
    again)."""
    config = _config(n_embd=1024, dim_ffn=4096, dtype="bfloat16")
    block = RWKVBlock(config, 1)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 1, 1024)) * 3 + 1
    params = perturbed(block.init(jax.random.PRNGKey(1), x, None, jnp.zeros((2,), jnp.int32))[
        "params"])
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.ndim == 2 else a, params)
    fused = cuda_layout(_config(n_layer=1, n_embd=1024, dim_ffn=4096, dtype="bfloat16"),
                        {"blocks_0": params})["blocks_0"]
    apply = jax.jit(block.apply)
    step = jax.jit(lambda p, x, s: cuda_decode4.block_step(p, x, s, eps=config.layer_norm_eps))
    for t, rows in enumerate((1, 2, 2, 1, 2)):
        xt = jax.random.normal(jax.random.PRNGKey(10 + t), (rows, 1, 1024)) * 3 + 1
        state = zero_layer_state(config, 1, rows)
        want, want_state = apply({"params": params}, xt, state, jnp.zeros((rows,), jnp.int32))
        got, got_state = step(fused, xt[:, 0], state)
        _assert_like_xla(got, got_state, want[:, 0], want_state, (t, rows))


@pytest.mark.skipif(not _runs_here(), reason="needs a GPU of compute capability 9.0 and nvcc")
@pytest.mark.parametrize("layer_types", [("rwkv", "attn", "rwkv", "rwkv"), ("rwkv",) * 4])
def test_model_decode_steps_equal_xlas(layer_types):
    """Whole decode steps of a model in the CUDA layout: each run of RWKV blocks in one launch,
    x and the states carried between steps."""
    config = _config(n_layer=len(layer_types), layer_types=layer_types, attn_head_size=8,
                     attn_window=6, dtype="bfloat16")
    params = perturbed(init_params(config, jax.random.PRNGKey(0)))
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.ndim == 2 else a, params)
    fused = pack_for_decode(config, params, kernels="cuda")
    assert "decode_vecs" in fused.params["blocks_0"] and fused.kernel == "cuda"
    apply = jax.jit(RWKV(config).apply)
    forward = jax.jit(lambda w, t, s: decode_forward(config, w, t, s))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 6), 0, config.vocab_size)
    _, state = apply({"params": params}, tokens[:, :3])
    want_state = got_state = state
    for t in range(3, 6):
        want, want_state = apply({"params": params}, tokens[:, t:t + 1], want_state)
        got, got_state = forward(fused, tokens[:, t:t + 1], got_state)
        scale = float(jnp.max(jnp.abs(want)))
        assert float(jnp.max(jnp.abs(got - want))) <= 3e-2 * scale, t
    for i, (g, w) in enumerate(zip(got_state["layers"], want_state["layers"])):
        for name in w:
            assert float(jnp.max(jnp.abs(g[name] - w[name]))) <= 3e-2 * float(
                jnp.max(jnp.abs(w[name]))) + 1e-6, (i, name)


@pytest.mark.skipif(not _runs_here(), reason="needs a GPU of compute capability 9.0 and nvcc")
def test_a_run_split_over_launches_gives_the_same_bits(monkeypatch):
    """A run longer than one launch takes (MAX_LAYERS) goes in several; x crosses between them
    through memory instead of the kernel's exchange, bit for bit the same values."""
    config = _config(n_layer=5, dtype="bfloat16")
    params = perturbed(init_params(config, jax.random.PRNGKey(0)))
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.ndim == 2 else a, params)
    fused = pack_for_decode(config, params, kernels="cuda")
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 4), 0, config.vocab_size)
    _, state = RWKV(config).apply({"params": params}, tokens)
    step = jnp.array([[5]])

    def forward():  # traced afresh each time: MAX_LAYERS is read while tracing
        return jax.jit(lambda w, t, s: decode_forward(config, w, t, s))(fused, step, state)

    one = forward()  # 5 layers, one launch
    for most in (2, 1):
        monkeypatch.setattr(cuda_decode4, "MAX_LAYERS", most)
        chex.assert_trees_all_equal(forward(), one)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_head_as_rows_gives_the_same_logits(dtype):
    """head_rows_layout (the CUDA layout's head, which XLA reads faster in a decode step), on
    any backend: a prefill and a decode step, bit for bit the model's logits."""
    config = _config(dtype=dtype)
    params = perturbed(init_params(config, jax.random.PRNGKey(0)))
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.ndim == 2 else a, params)
    rows = head_rows_layout(params)
    assert set(rows["head"]) == {"kernel_t"} and rows["head"]["kernel_t"].shape == (61, 64)
    assert head_rows_layout(rows) is rows  # idempotent
    apply = jax.jit(RWKV(config).apply)
    forward = jax.jit(lambda w, t, s: decode_forward(config, w, t, s))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 5), 0, config.vocab_size)
    want, state = apply({"params": params}, tokens)
    chex.assert_trees_all_equal(forward(DecodeWeights(rows), tokens, None), (want, state))
    step = tokens[:, :1]
    chex.assert_trees_all_equal(forward(DecodeWeights(rows), step, state),
                                apply({"params": params}, step, state))


@pytest.mark.skipif(not _runs_here(), reason="needs a GPU of compute capability 9.0 and nvcc")
def test_generate_through_the_kernel_keeps_the_state_of_every_token():
    """generate with the CUDA kernel, end to end (the state flat between calls, blocks of 16
    steps, a caller's state left as it was): the state it returns is XLA's after the prompt and
    every generated token."""
    config = _config(n_layer=3, dtype="bfloat16")
    params = perturbed(init_params(config, jax.random.PRNGKey(0)))
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.ndim == 2 else a, params)
    gen = Generator(config, params, decode_kernels="cuda")
    prompt = [3, 14, 15, 9, 2, 6]
    start = gen.feed(prompt[:4])
    before = jax.tree.map(np.asarray, start)
    first = gen.generate(prompt[4:], state=start, max_new_tokens=20, keep_state=True)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, start), before)  # the caller's, kept
    assert len(first.tokens[0]) == 20
    _, want = jax.jit(RWKV(config).apply)({"params": params},
                                           jnp.asarray([prompt + first.tokens[0]]))
    for g, w in zip(jax.tree.leaves(first.state), jax.tree.leaves(want)):
        assert float(jnp.max(jnp.abs(g - w))) <= 3e-2 * float(jnp.max(jnp.abs(w))) + 1e-6
