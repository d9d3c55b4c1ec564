"""What a run reports: model FLOPs per token and MFU, tensorboard scalars, the progress bar.
"""

from __future__ import annotations

import logging

import jax
from tqdm import tqdm

from rwkv_jax.config import (
    ModelConfig,
)
from rwkv_jax.config.layer_pattern import LayerKind

log = logging.getLogger("rwkv_jax")


# Dense bf16 peak of the chips we know, for MFU (FLOP/s).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5": 459e12}


def model_flops_per_token(mc: ModelConfig, chunk_len: int) -> float:
    """Training FLOPs per token: 6 x matrix parameters (embedding excluded) + causal attention."""
    C, F = mc.n_embd, mc.dim_ffn
    n_attn = mc.layer_types.count(LayerKind.ATTN)
    n_rwkv = mc.n_layer - n_attn
    if mc.version == "7":
        # Four projections, the channel-mix (no receptance), the four LoRA pairs; and the WKV
        # recurrence, about 10 N^2 multiply-adds per head and token (decay, S a, two outer
        # products, S r), i.e. 10 C N, which the training pass does three times.
        lora = 2 * C * (mc.dim_w_lora + mc.dim_a_lora + mc.dim_v_lora + mc.dim_g_lora)
        rwkv_matrices = 4 * C * C + 2 * C * F + lora
        recurrence = n_rwkv * 3.0 * 2 * 10 * C * mc.head_size
    else:
        rwkv_matrices = 4 * C * C + 2 * C * F + C * C
        recurrence = 0.0
    matrices = n_rwkv * rwkv_matrices + n_attn * (4 * C * C + 2 * C * F)
    matrices += C * mc.vocab_size  # head
    ctx = min(mc.attn_window, chunk_len) / 2
    return 6.0 * matrices + n_attn * 12.0 * ctx * C + recurrence


def device_peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak * jax.device_count()
    return None


class ScalarWriter:
    """tensorboardX when available and asked for; a no-op otherwise."""

    def __init__(self, logdir: str | None):
        self._w = None
        if logdir:
            try:
                from tensorboardX import SummaryWriter  # noqa: PLC0415
            except ImportError:
                log.warning("tensorboardX is not installed: no tensorboard logs")
            else:
                self._w = SummaryWriter(logdir)

    def scalars(self, step: int, values: dict, prefix: str):
        if self._w:
            for k, v in values.items():
                self._w.add_scalar(f"{prefix}/{k}", float(v), step)
            self._w.flush()

    def close(self):
        if self._w:
            self._w.close()


def postfix(m: dict) -> dict:
    out = {"loss": f"{m['loss']:.3f}", "tok/s": f"{m['tokens_per_sec']:,.0f}"}
    if "mfu" in m:
        out["mfu"] = f"{100 * m['mfu']:.1f}%"
    if "peak_gib" in m:
        out["peak"] = f"{m['peak_gib']:.1f}GiB"
    return out


def progress_bar(cfg, start: int, enabled: bool = True):
    if cfg.logging.progress and enabled:
        return tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True)

    class _Null:
        def update(self, n):
            pass

        def set_postfix(self, d):
            pass

        def close(self):
            pass

    return _Null()
