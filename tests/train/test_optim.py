import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rwkv_jax.train import optim

C, F, V, P = 8, 16, 11, 5

# Expected label of every leaf of the fake tree with trainable="all".
EXPECTED_LABELS = {
    "emb/embedding": "no_decay",
    "pos_emb/embedding": "no_decay",
    "blocks_0/ln0/scale": "no_decay",
    "blocks_0/ln0/bias": "no_decay",
    "blocks_0/ln1/scale": "no_decay",
    "blocks_0/ln1/bias": "no_decay",
    "blocks_0/ln2/scale": "no_decay",
    "blocks_0/ln2/bias": "no_decay",
    "blocks_0/att/time_decay": "time_decay",
    "blocks_0/att/time_first": "time_first",
    "blocks_0/att/time_mix_k": "rwkv_no_decay",
    "blocks_0/att/time_mix_v": "rwkv_no_decay",
    "blocks_0/att/time_mix_r": "rwkv_no_decay",
    "blocks_0/att/key/kernel": "rwkv_att_matrix",
    "blocks_0/att/value/kernel": "rwkv_att_matrix",
    "blocks_0/att/receptance/kernel": "rwkv_att_matrix",
    "blocks_0/att/output/kernel": "rwkv_att_matrix",
    "blocks_0/ffn/time_mix_k": "rwkv_no_decay",
    "blocks_0/ffn/time_mix_r": "rwkv_no_decay",
    "blocks_0/ffn/key/kernel": "rwkv_ffn_matrix",
    "blocks_0/ffn/receptance/kernel": "rwkv_ffn_matrix",
    "blocks_0/ffn/value/kernel": "rwkv_ffn_matrix",
    "blocks_0/init_state/shift_att": "rwkv_no_decay",
    "blocks_0/init_state/aa": "rwkv_no_decay",
    "blocks_0/init_state/bb": "rwkv_no_decay",
    "blocks_0/init_state/shift_ffn": "rwkv_no_decay",
    "blocks_0/state_codec/enc/kernel": "matrix",
    "blocks_0/state_codec/enc/bias": "no_decay",
    "blocks_0/state_codec/dec/kernel": "matrix",
    "blocks_1/ln1/scale": "no_decay",
    "blocks_1/ln1/bias": "no_decay",
    "blocks_1/ln2/scale": "no_decay",
    "blocks_1/ln2/bias": "no_decay",
    "blocks_1/attn/query/kernel": "att_matrix",
    "blocks_1/attn/key/kernel": "att_matrix",
    "blocks_1/attn/value/kernel": "att_matrix",
    "blocks_1/attn/output/kernel": "att_matrix",
    "blocks_1/mlp/fc/kernel": "ffn_matrix",
    "blocks_1/mlp/proj/kernel": "ffn_matrix",
    "ln_out/scale": "no_decay",
    "ln_out/bias": "no_decay",
    "head/kernel": "matrix",
}


def _shape(path):
    parts = path.split("/")
    name, module = parts[-1], parts[-2]
    if name == "embedding":
        return (V, C) if module == "emb" else (P, C)
    if path == "head/kernel":
        return (C, V)
    if path == "blocks_0/state_codec/enc/kernel":
        return (C, 4)
    if path == "blocks_0/state_codec/enc/bias":
        return (4,)
    if path == "blocks_0/state_codec/dec/kernel":
        return (4, C)
    if name == "kernel":
        if module in ("key", "fc") and parts[-3] in ("ffn", "mlp"):
            return (C, F)
        if (module == "value" and parts[-3] == "ffn") or module == "proj":
            return (F, C)
        return (C, C)
    return (C,)


def _unflatten(flat):
    tree = {}
    for path, value in flat.items():
        node = tree
        *modules, name = path.split("/")
        for m in modules:
            node = node.setdefault(m, {})
        node[name] = value
    return tree


def _flatten(tree):
    return {
        jax.tree_util.keystr(kp, simple=True, separator="/"): x
        for kp, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return _unflatten({
        path: jnp.asarray(rng.uniform(0.5, 1.5, _shape(path)), jnp.float32)
        for path in EXPECTED_LABELS
    })


def make_cfg(**overrides):
    cfg = optim.default_optimizer_config()
    # Constant lr past a zero-length warmup: the first update runs at the peak
    # lr, where the first Adam step is exactly lr * sign(grad).
    cfg.update(dict(lr=1e-2, warmup_steps=0, schedule="constant"))
    cfg.update(overrides)
    return cfg


def one_step(params, grads, cfg):
    tx = optim.make_optimizer(params, cfg)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    return _flatten(updates), state


def test_default_config():
    cfg = optim.default_optimizer_config()
    assert (cfg.b1, cfg.b2, cfg.eps) == (0.9, 0.99, 1e-8)
    assert (cfg.time_decay_lr_mult, cfg.time_first_lr_mult) == (2.0, 3.0)
    assert cfg.rwkv_lr_multiplier == 1.0
    assert (cfg.weight_decay, cfg.rwkv_att_weight_decay, cfg.rwkv_ffn_weight_decay) == (0.1,) * 3
    assert cfg.grad_clip == 1.0
    assert cfg.trainable == "all"
    assert cfg.schedule in optim.SCHEDULE_CHOICES


def test_labels_per_parameter():
    params = make_params()
    labels = _flatten(optim.label_params(params, make_cfg()))
    assert labels == EXPECTED_LABELS

    groups = optim.describe_groups(params, make_cfg())
    assert sum(len(v) for v in groups.values()) == len(EXPECTED_LABELS)
    for label, paths in groups.items():
        assert all(EXPECTED_LABELS[p] == label for p in paths)
    assert groups["time_decay"] == ["blocks_0/att/time_decay"]
    assert sorted(groups["matrix"]) == [
        "blocks_0/state_codec/dec/kernel", "blocks_0/state_codec/enc/kernel", "head/kernel",
    ]


def test_labels_generalise_to_new_names():
    # RWKV-6/7 style names are classified by rule, not by a list.
    params = {
        "blocks_0": {
            "att": {
                "time_faaaa": jnp.ones((C,)),
                "time_maa_x": jnp.ones((1, 1, C)),  # RWKV-LM stores vectors as (1, 1, C)
                "time_decay_w1": jnp.ones((C, 4)),  # LoRA factors: no decay
                "time_maa_w2": jnp.ones((5, 4, C)),
                "gate": {"kernel": jnp.ones((C, C))},
            },
            "ffn": {"time_maa_k": jnp.ones((C,))},
        }
    }
    labels = _flatten(optim.label_params(params, make_cfg()))
    assert labels == {
        "blocks_0/att/time_faaaa": "time_first",
        "blocks_0/att/time_maa_x": "rwkv_no_decay",
        "blocks_0/att/time_decay_w1": "rwkv_no_decay",
        "blocks_0/att/time_maa_w2": "rwkv_no_decay",
        "blocks_0/att/gate/kernel": "rwkv_att_matrix",
        "blocks_0/ffn/time_maa_k": "rwkv_no_decay",
    }


def test_labels_accept_shape_structs():
    shapes = jax.eval_shape(make_params)
    assert _flatten(optim.label_params(shapes, make_cfg())) == EXPECTED_LABELS


def test_group_learning_rates_with_unit_gradient():
    cfg = make_cfg(
        weight_decay=0.0, rwkv_att_weight_decay=0.0, rwkv_ffn_weight_decay=0.0,
        rwkv_lr_multiplier=0.5,
    )
    params = make_params()
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = one_step(params, grads, cfg)

    lr = cfg.lr
    expected_mult = {
        "time_decay": 2.0 * 0.5,
        "time_first": 3.0 * 0.5,
        "rwkv_att_matrix": 0.5,
        "rwkv_ffn_matrix": 0.5,
        "rwkv_no_decay": 0.5,  # time_mix and init_state
        "att_matrix": 1.0,
        "ffn_matrix": 1.0,
        "matrix": 1.0,  # head and state_codec
        "no_decay": 1.0,  # norms and embeddings
    }
    for path, label in EXPECTED_LABELS.items():
        np.testing.assert_allclose(
            # float32 bias correction leaves ~1e-6 relative error.
            updates[path], -lr * expected_mult[label], rtol=1e-5, err_msg=path
        )
    # The RWKV-LM ratios, independent of rwkv_lr_multiplier.
    td = updates["blocks_0/att/time_decay"][0]
    tf = updates["blocks_0/att/time_first"][0]
    mix = updates["blocks_0/att/time_mix_k"][0]
    np.testing.assert_allclose([td / mix, tf / mix], [2.0, 3.0], rtol=1e-5)


def test_weight_decay_with_zero_gradient():
    cfg = make_cfg(
        weight_decay=0.1, rwkv_att_weight_decay=0.2, rwkv_ffn_weight_decay=0.3,
        rwkv_lr_multiplier=0.5,
    )
    params = make_params()
    grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = one_step(params, grads, cfg)
    new = _flatten(optax.apply_updates(params, _unflatten(updates)))
    old = _flatten(params)

    lr = cfg.lr
    shrink = {  # lr_group * wd_group
        "rwkv_att_matrix": lr * 0.5 * 0.2,
        "att_matrix": lr * 0.2,
        "rwkv_ffn_matrix": lr * 0.5 * 0.3,
        "ffn_matrix": lr * 0.3,
        "matrix": lr * 0.1,
    }
    for path, label in EXPECTED_LABELS.items():
        if label in shrink:
            np.testing.assert_allclose(
                new[path], old[path] * (1 - shrink[label]), rtol=1e-6, err_msg=path
            )
        else:
            np.testing.assert_array_equal(new[path], old[path], err_msg=path)


def test_trainable_state_freezes_all_but_init_state():
    cfg = make_cfg(trainable="state", rwkv_lr_multiplier=0.5)
    params = make_params()
    groups = optim.describe_groups(params, cfg)
    assert set(groups) == {"frozen", "init_state"}
    assert sorted(groups["init_state"]) == sorted(p for p in EXPECTED_LABELS if "/init_state/" in p)

    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, state = one_step(params, grads, cfg)
    for path, u in updates.items():
        if "/init_state/" in path:
            # Base lr, as documented: rwkv_lr_multiplier does not apply.
            np.testing.assert_allclose(u, -cfg.lr, rtol=1e-5, err_msg=path)
        else:
            np.testing.assert_array_equal(u, 0.0, err_msg=path)

    # Adam moments exist only for the trainable leaves.
    vectors = [x for x in jax.tree_util.tree_leaves(state) if x.ndim > 0]
    assert sum(x.size for x in vectors) == 2 * 4 * C


def test_trainable_state_without_init_state_raises():
    params = make_params()
    del params["blocks_0"]["init_state"]
    with pytest.raises(ValueError, match="init_state"):
        optim.make_optimizer(params, make_cfg(trainable="state"))


def test_bad_trainable_raises():
    with pytest.raises(ValueError, match="train.trainable") as err:
        optim.label_params(make_params(), make_cfg(trainable="dora"))
    assert "'all'" in str(err.value) and "'lora'" in str(err.value)


@pytest.mark.parametrize("name", ["cosine", "exponential"])
def test_decaying_schedules(name):
    lr, lr_final, warmup, total = 6e-4, 1e-5, 10, 110
    s = optim.make_schedule(make_cfg(
        schedule=name, lr=lr, lr_final=lr_final, warmup_steps=warmup, total_steps=total,
    ))
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(warmup // 2)), lr / 2, rtol=1e-6)
    np.testing.assert_allclose(float(s(warmup)), lr, rtol=1e-6)
    np.testing.assert_allclose(float(s(total)), lr_final, rtol=1e-5)
    np.testing.assert_allclose(float(s(total + 1000)), lr_final, rtol=1e-5)
    values = np.array([float(s(i)) for i in range(warmup, total + 1)])
    assert np.all(np.diff(values) < 0)
    mid = float(s(warmup + (total - warmup) // 2))
    expected_mid = (lr + lr_final) / 2 if name == "cosine" else math.sqrt(lr * lr_final)
    np.testing.assert_allclose(mid, expected_mid, rtol=1e-5)


def test_constant_schedule():
    s = optim.make_schedule(make_cfg(schedule="constant", lr=1e-3, warmup_steps=4))
    assert [float(s(i)) for i in range(6)] == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    s0 = optim.make_schedule(make_cfg(schedule="constant", lr=1e-3, warmup_steps=0))
    assert float(s0(0)) == pytest.approx(1e-3)


def test_bad_schedule_raises():
    with pytest.raises(ValueError) as err:
        optim.make_schedule(make_cfg(schedule="linear"))
    for valid in ("constant", "cosine", "exponential"):
        assert valid in str(err.value)
    with pytest.raises(ValueError, match="total_steps"):
        optim.make_schedule(make_cfg(schedule="cosine", warmup_steps=10, total_steps=10))
    with pytest.raises(ValueError, match="lr_final"):
        optim.make_schedule(make_cfg(schedule="exponential", lr_final=0.0, total_steps=100))


def test_learning_rates_follow_schedule():
    cfg = make_cfg(schedule="cosine", warmup_steps=3, total_steps=20, rwkv_lr_multiplier=0.5)
    params = make_params()
    schedule = optim.make_schedule(cfg)
    tx = optim.make_optimizer(params, cfg)
    state = tx.init(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    update = jax.jit(tx.update)
    for step in range(5):
        _, state = update(grads, state, params)
        lrs = optim.learning_rates(state)
        base = float(schedule(step))
        assert set(lrs) == set(EXPECTED_LABELS.values())
        np.testing.assert_allclose(float(lrs["no_decay"]), base, rtol=1e-6)
        np.testing.assert_allclose(float(lrs["time_decay"]), base * 2.0 * 0.5, rtol=1e-6)
        np.testing.assert_allclose(float(lrs["rwkv_att_matrix"]), base * 0.5, rtol=1e-6)


def test_global_norm_clipping():
    # Adam's first step ignores gradient scale, so a second step is needed
    # for clipping to change the update. A small tree keeps compiles short.
    params = {
        "emb": {"embedding": jnp.ones((V, C))},
        "blocks_0": {"att": {"time_decay": jnp.ones((C,)), "key": {"kernel": jnp.ones((C, C))}}},
        "head": {"kernel": jnp.ones((C, V))},
    }
    g1 = jax.tree_util.tree_map(lambda p: 0.01 * jnp.ones_like(p), params)
    g2 = jax.tree_util.tree_map(lambda p: 1e4 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)
    norm = float(optax.tree.norm(g2))
    assert norm > 1.0 and float(optax.tree.norm(g1)) < 1.0
    g2_clipped = jax.tree_util.tree_map(lambda g: g / norm, g2)

    def second_update(cfg, second_grad):
        tx = optim.make_optimizer(params, cfg)
        update = jax.jit(tx.update)
        _, state = update(g1, tx.init(params), params)
        updates, _ = update(second_grad, state, params)
        return np.concatenate([np.ravel(u) for u in jax.tree_util.tree_leaves(updates)])

    clipped = second_update(make_cfg(grad_clip=1.0), g2)
    reference = second_update(make_cfg(grad_clip=0.0), g2_clipped)
    unclipped = second_update(make_cfg(grad_clip=0.0), g2)
    np.testing.assert_allclose(clipped, reference, rtol=1e-5, atol=1e-9)
    assert not np.allclose(unclipped, reference, rtol=1e-2)


def test_rwkv7_groups_follow_rwkv_lm():
    """RWKV-LM's RWKV-7 configure_optimizers: att.w0 at 2x lr without decay; weight decay only
    on 2D `.weight` matrices (our kernels), so LoRA factors, r_k and vectors get none."""
    from rwkv_jax.config import ModelConfig
    from rwkv_jax.nn.model import RWKV

    cfg = ModelConfig(version="7", vocab_size=V, n_layer=2, n_embd=32, head_size=8,
                      learned_init_state=True)
    shapes = jax.eval_shape(lambda: RWKV(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
    labels = _flatten(optim.label_params(shapes["params"], make_cfg()))
    att = {k.split("/att/")[1]: v for k, v in labels.items() if k.startswith("blocks_1/att/")}
    assert att.pop("w0") == "time_decay"
    for name in ("receptance", "key", "value", "output"):
        assert att.pop(f"{name}/kernel") == "rwkv_att_matrix", name
    # x_*, a0, v0, k_k, k_a, ln_x; the LoRA factors w1 ... g2; r_k (H, N).
    assert set(att.values()) == {"rwkv_no_decay"} and {"w1", "g2", "r_k", "ln_x/scale"} <= set(att)
    assert labels["blocks_1/ffn/key/kernel"] == labels["blocks_1/ffn/value/kernel"] == "rwkv_ffn_matrix"
    assert labels["blocks_1/ffn/x_k"] == labels["blocks_1/init_state/wkv"] == "rwkv_no_decay"
    specs = optim.group_specs(make_cfg())
    assert specs["time_decay"] == optim.GroupSpec(2.0, 0.0)


@pytest.mark.parametrize("low", ["bfloat16", "float16"])
def test_loss_keeping_half_precision_logits_is_exact(low):
    """train.step.masked_ce with saved_dtype: logits a half-precision head made (exact in that
    dtype) give optax's loss and gradient, while the backward keeps half the bytes."""
    from jax._src.ad_checkpoint import saved_residuals

    from rwkv_jax.train.step import masked_ce

    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    logits = (4 * jax.random.normal(k1, (2, 5, 300))).astype(low).astype(jnp.float32)
    targets = jax.random.randint(k2, (2, 5), 0, 300)
    mask = jnp.asarray([1.0, 1.0, 0.0, 1.0, 1.0])
    ref = jax.value_and_grad(lambda x: masked_ce(x, targets, mask)[0])(logits)
    kept = lambda x: masked_ce(x, targets, mask, saved_dtype=low)[0]  # noqa: E731
    got = jax.jit(jax.value_and_grad(kept))(logits)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-7)
    widest = max((a for a, _ in saved_residuals(kept, logits)), key=lambda a: a.size)
    assert widest.shape == logits.shape and widest.dtype == jnp.dtype(low)
    # Logits that are not exact in `low` (excess precision): loss and gradient are those of
    # the rounded logits, one function; a negative target indexes from the end, in both.
    fine = logits + 1e-3 * jax.random.normal(k2, logits.shape)
    wrapped = targets.at[0, 1].set(-1)
    rounded = jax.lax.reduce_precision(fine, jnp.finfo(low).nexp, jnp.finfo(low).nmant)
    ref = jax.value_and_grad(lambda x: masked_ce(x, wrapped % 300, mask)[0])(rounded)
    got = jax.value_and_grad(lambda x: masked_ce(x, wrapped, mask, saved_dtype=low)[0])(fine)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-7)
