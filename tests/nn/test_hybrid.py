"""Layer patterns: construction, validation, distribution, choice by sequence length."""

from __future__ import annotations

import pytest

from rwkv_jax.config import layer_pattern as hybrid


def test_default_alternates_even_rwkv_odd_attention():
    assert hybrid.build_layer_pattern(4) == ("rwkv", "attn", "rwkv", "attn")


def test_one_list_implies_the_other():
    assert hybrid.build_layer_pattern(4, attention_layers=[3]) == ("rwkv",) * 3 + ("attn",)
    assert hybrid.build_layer_pattern(3, rwkv_layers=[0, -1]) == ("rwkv", "attn", "rwkv")


@pytest.mark.parametrize(
    "rwkv, attn, message",
    [
        ([0, 1, 2], [2, 3], r"layers \[2\] are in both"),
        ([0, 1], [3], r"layers \[2\] are in neither"),
        ([0, 1, 2], [4], "architecture.attention_layers holds layer 4, past the last layer"),
        ([0, "1"], None, "architecture.rwkv_layers holds '1'"),
    ],
)
def test_bad_index_lists(rwkv, attn, message):
    with pytest.raises(ValueError, match=message):
        hybrid.build_layer_pattern(4, rwkv, attn)


def test_distribution():
    d = hybrid.distribution(hybrid.build_layer_pattern(4, attention_layers=[3]))
    assert d["rwkv"]["count"] == 3 and d["attn"]["percent"] == 25.0 and d["attn"]["layers"] == [3]
    assert "3 RWKV (75%), 1 attention (25%) at [3]" in hybrid.describe(("rwkv",) * 3 + ("attn",))


def test_optimize_for_sequence_length_rule():
    short = hybrid.optimize_for_sequence_length(32, 2560, 1024)
    long = hybrid.optimize_for_sequence_length(32, 2560, 16384)
    longer = hybrid.optimize_for_sequence_length(32, 2560, 1 << 20)
    n = lambda p: p.count("attn")  # noqa: E731
    assert n(short) == 16  # capped at every other layer
    assert n(short) > n(long) > n(longer) == 1
    assert short[0] == long[0] == "rwkv"
    # The budget holds: attention-score FLOPs <= 10% of the total.
    C, T = 2560, 16384
    dense, attn = 24 * C * C * 32, 2 * T * C * n(long)
    assert attn <= 0.1 * (dense + attn) + 1e-6
    with pytest.raises(ValueError, match="attention_budget"):
        hybrid.optimize_for_sequence_length(4, 64, 128, attention_budget=1.5)


def test_presets():
    assert hybrid.preset_pattern("rwkv", 2) == ("rwkv", "rwkv")
    with pytest.raises(ValueError, match="architecture.layer_pattern='mixed'"):
        hybrid.preset_pattern("mixed", 2)
