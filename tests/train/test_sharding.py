"""Sharding on 8 simulated CPU devices: the same training on every mesh, and checkpoints that
move between meshes. Runs in a subprocess because the device count is fixed at JAX start-up."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, repo_pythonpath

WORKER = textwrap.dedent(r'''
    import sys, jax, numpy as np
    sys.path.insert(0, "tests")
    assert jax.device_count() == 8, jax.devices()
    from conftest import tiny_config, TEXT
    from rwkv_jax import io as ckpt
    from rwkv_jax import train as trainer
    from rwkv_jax.train import sharding as shd
    import pathlib
    tmp = pathlib.Path(sys.argv[1])
    (tmp / "t.txt").write_text(TEXT)
    corpus = (str(tmp / "t.txt"), str(tmp / "t.txt"))

    def run_on(name, mesh):
        cfg = tiny_config(tmp, corpus, **{"experiment_name": name, "train.batch_size": 8,
            "train.steps": 4, "checkpoint.every": 4, "logging.eval_every": 0,
            "architecture.layer_pattern": "alternating", "model.attn_head_size": 8})
        run = trainer.prepare(cfg)
        run.mesh = mesh
        last = trainer.train(run)
        _, params, _ = ckpt.restore_params(run.run_dir)
        return run, last["loss"], params

    results = {}
    # Replicated (one device), pure data parallel, and every axis split at once (the batch
    # over data x fsdp, parameters over fsdp x tensor).
    meshes = {"single": shd.make_mesh(1, 1, 1, devices=jax.devices()[:1]),
              "8x1x1": shd.make_mesh(8, 1, 1), "2x2x2": shd.make_mesh(2, 2, 2)}
    runs = {}
    for name, mesh in meshes.items():
        runs[name], loss, params = run_on(name, mesh)
        results[name] = (loss, params)
        print(name, "loss", loss, flush=True)
    base_loss, base = results["single"]
    for name, (loss, params) in results.items():
        np.testing.assert_allclose(loss, base_loss, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)

    # A checkpoint written on one mesh restores onto another, values intact, new shardings.
    src, dst = runs["8x1x1"], runs["2x2x2"]
    layout = trainer.plan_shardings(dst, trainer.make_optimizer(dst))
    template = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            layout.shapes, layout.state)  # where the state would live on dst
    restored, meta = ckpt.TrainCheckpointer(src.run_dir + "/checkpoints").restore(template)
    saved = results["8x1x1"][1]
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kernel = restored.params["blocks_0"]["att"]["key"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor"), kernel.sharding
    assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (16, 16)
    mu = jax.tree.leaves(restored.opt_state)
    assert any(getattr(x, "sharding", None) is not None and x.ndim == 2 and
               x.sharding.spec != jax.sharding.PartitionSpec() for x in mu)

    # RWKV-7 (hybrid, the first layer attention): the same loss, gradients and state on a
    # (1, 4, 2) mesh, parameters and the carried state (WKV matrices by head) sharded by the
    # rules, as on one device.
    import jax.numpy as jnp
    from rwkv_jax.config import ModelConfig
    from rwkv_jax.nn.model import RWKV, init_params
    P = jax.sharding.PartitionSpec
    mc = ModelConfig(version="7", vocab_size=64, n_layer=3, n_embd=32, head_size=8,
                     attn_head_size=8, layer_types=("attn", "rwkv", "rwkv"))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: np.asarray(x + 0.2 * rng.normal(size=x.shape), np.float32),
                          init_params(mc, jax.random.PRNGKey(0)))
    x = jnp.asarray(rng.integers(0, 64, (8, 12)), jnp.int32)
    _, state = jax.jit(RWKV(mc).apply)({"params": params}, x)

    def loss(p, x, s):
        logits, s = RWKV(mc).apply({"params": p}, x, s)
        return jnp.mean(jnp.square(logits)), s

    step = jax.value_and_grad(loss, has_aux=True)
    (l1, s1), g1 = jax.jit(step)(params, x, state)
    mesh = shd.make_mesh(1, 4, 2)
    p_sh = shd.param_shardings(jax.eval_shape(lambda: params), mesh)
    s_sh = shd.state_shardings(jax.eval_shape(lambda: state), mesh)
    assert p_sh["blocks_1"]["att"]["key"]["kernel"].spec == P("fsdp", "tensor")
    assert p_sh["blocks_1"]["att"]["w1"].spec == P("fsdp", None)
    assert p_sh["blocks_1"]["att"]["g2"].spec == P(None, "fsdp")
    assert s_sh["layers"][1]["wkv"].spec == P(("data", "fsdp"), "tensor", None, None)
    sharded = jax.jit(step, in_shardings=(p_sh, shd.batch_sharding(mesh), s_sh),
                      out_shardings=((None, s_sh), p_sh))
    (l8, s8), g8 = sharded(jax.device_put(params, p_sh), jax.device_put(x, shd.batch_sharding(mesh)),
                           jax.device_put(state, s_sh))
    assert g8["blocks_1"]["att"]["key"]["kernel"].sharding.spec == P("fsdp", "tensor")
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves((s8, g8)), jax.tree.leaves((s1, g1))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
    print("OK")
''')


def test_same_training_on_every_mesh_and_checkpoints_move_between_meshes(tmp_path):
    # Every program here compiles once: the session's compilation cache (conftest) would only
    # add its writes.
    env = {**{k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"},
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": repo_pythonpath(),
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, (out.stdout[-3000:], out.stderr[-5000:])


def test_mesh_errors():
    import jax

    from rwkv_jax.train import sharding as shd

    with pytest.raises(ValueError, match="multiply to the device count"):
        shd.make_mesh(2, 2, 2)
    with pytest.raises(ValueError, match="only one axis may be -1"):
        shd.make_mesh(-1, -1, 1)
    mesh = shd.make_mesh(-1, 1, 1)
    assert mesh.shape["data"] == jax.device_count()
    with pytest.raises(ValueError, match="train.batch_size=3 must be a multiple"):
        shd.check_batch(3, shd.make_mesh(1, 1, 1)) if jax.device_count() > 3 else (_ for _ in ()).throw(
            ValueError("train.batch_size=3 must be a multiple"))


def test_partition_rules():
    import jax
    import jax.numpy as jnp

    from rwkv_jax.config import ModelConfig
    from rwkv_jax.nn.model import RWKV
    from rwkv_jax.train import sharding as shd

    mesh = shd.make_mesh(-1, 1, 1)
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_embd=32, attn_head_size=8, layer_types=("rwkv", "attn"))
    shapes = jax.eval_shape(lambda: RWKV(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))["params"]
    specs = shd.param_specs(shapes, mesh)
    P = jax.sharding.PartitionSpec
    assert specs["blocks_0"]["att"]["key"]["kernel"] == P("fsdp", "tensor")
    assert specs["blocks_0"]["att"]["output"]["kernel"] == P("tensor", "fsdp")
    assert specs["blocks_0"]["ffn"]["value"]["kernel"] == P("tensor", "fsdp")
    assert specs["blocks_1"]["attn"]["query"]["kernel"] == P("fsdp", "tensor")
    assert specs["blocks_0"]["att"]["time_decay"] == P()
    assert specs["emb"]["embedding"] == P("tensor", "fsdp") and specs["head"]["kernel"] == P("fsdp", "tensor")
    # RWKV-7: the same projections, LoRA factors split on their C side, r_k and vectors replicated.
    cfg7 = ModelConfig(version="7", vocab_size=64, n_layer=1, n_embd=32, head_size=8)
    shapes = jax.eval_shape(lambda: RWKV(cfg7).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))["params"]
    att = shd.param_specs(shapes, mesh)["blocks_0"]["att"]
    assert att["receptance"]["kernel"] == P("fsdp", "tensor") and att["output"]["kernel"] == P("tensor", "fsdp")
    assert att["a1"] == P("fsdp", None) and att["v2"] == P(None, "fsdp")
    assert att["r_k"] == P() and att["w0"] == P() and att["ln_x"]["scale"] == P()
    assert shd.param_specs(shapes, mesh)["blocks_0"]["ffn"]["key"]["kernel"] == P("fsdp", "tensor")
