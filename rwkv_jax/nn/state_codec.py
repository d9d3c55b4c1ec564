"""Compressed recurrent states: what is stored between training chunks and between generation
calls, and what that costs.

    packed = compress(state, mode, params)     # params: the model's (needed for "learned")
    state = decompress(packed, mode, params)
    state = roundtrip(state, mode, params)     # decompress(compress(.)), dtypes kept
    n = bytes_of(packed)                       # also for jax.eval_shape outputs

Modes (`memory.state_compression`, `ModelConfig.state_compression`):
  none     the state as it is.
  bf16     shifts and the WKV mean in bfloat16, the WKV log scale in float32, KV windows bf16;
           RWKV-7: shifts and the WKV matrices in bfloat16.
  int8     per row, per layer, per tensor absmax int8; the WKV log scale as int16 around a
           per-row offset; KV windows int8 with one scale per row and window slot; RWKV-7 WKV
           matrices int8 with one scale per row, head and value channel (a row of the matrix).
  learned  per RWKV layer a linear encoder to `state_rank` numbers and a decoder back, trained
           with the language model (the trainer passes every carried state through it).
           Attention layers' KV windows are kept as they are. RWKV-7: the encoder reads the
           shifts and the whole WKV matrices (2 C + H N^2 numbers per layer).

RWKV-7's WKV state is a matrix per head whose entries are bounded sums of decayed products of
values and keys: it is coded as it is (no log scale), which also keeps the zero state exact.

The WKV state (aa, bb, pp) means a numerator aa * e^pp and a denominator bb * e^pp; nothing
else about it matters. Before coding it is renormalised to
    mean   = aa / bb          a weighted mean of past values: bounded, fine at low precision
    logden = pp + log(bb)     the log of the denominator: a log scale, kept precise
and decoded as aa = mean, bb = 1, pp = logden, which are the same two sums. After any token
pp >= the latest key and bb >= 1, so logden spans the keys' range, not the sequence length.
A channel that has seen nothing (bb = 0: the zero state) is marked and decodes exactly.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.config import STATE_COMPRESSIONS, ModelConfig
from rwkv_jax.ops.wkv4 import NEG_INF

MODES = STATE_COMPRESSIONS
_EMPTY16 = -32768  # int16 code of "this channel has seen nothing"
_Q16 = 32767
# The learned codec sees log scales clamped here: e^-60 weighs nothing beside any real key.
_LOGDEN_FLOOR = -60.0


def _is_rwkv(layer: dict) -> bool:
    return "aa" in layer


def _is_rwkv7(layer: dict) -> bool:
    return "wkv" in layer


def _normalise(layer: dict):
    aa, bb, pp = (layer[k].astype(jnp.float32) for k in ("aa", "bb", "pp"))
    seen = bb > 0
    safe = jnp.where(seen, bb, 1.0)
    mean = jnp.where(seen, aa / safe, 0.0)
    logden = jnp.where(seen, pp + jnp.log(safe), NEG_INF)
    return mean, logden


def _wkv(mean, logden, seen) -> dict:
    return {"aa": jnp.where(seen, mean, 0.0), "bb": seen.astype(jnp.float32),
            "pp": jnp.where(seen, logden, NEG_INF)}


def _rwkv_layer(shift_att, shift_ffn, wkv: dict) -> dict:
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    return {"shift_att": f32(shift_att), "aa": wkv["aa"], "bb": wkv["bb"], "pp": wkv["pp"],
            "shift_ffn": f32(shift_ffn)}


# ----------------------------------------------------------------------------- int8 helpers


def _q8(x: jax.Array, axes: tuple[int, ...]) -> dict:
    """Symmetric absmax int8 with one float32 scale per index of the axes not in `axes`."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=axes, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
    return {"q": q, "scale": jnp.squeeze(scale, axis=axes)}


def _dq8(p: dict, axes: tuple[int, ...]) -> jax.Array:
    return p["q"].astype(jnp.float32) * jnp.expand_dims(p["scale"], axes)


def _q16_logscale(logden: jax.Array) -> dict:
    """int16 around the row's midpoint; empty channels get their own code."""
    seen = logden > NEG_INF / 2
    lo = jnp.min(jnp.where(seen, logden, jnp.inf), axis=-1, keepdims=True)
    hi = jnp.max(jnp.where(seen, logden, -jnp.inf), axis=-1, keepdims=True)
    any_seen = jnp.any(seen, axis=-1, keepdims=True)
    offset = jnp.where(any_seen, (lo + hi) / 2, 0.0)
    step = jnp.where(any_seen, (hi - lo) / (2 * _Q16), 0.0)
    step = jnp.where(step > 0, step, 1.0)
    q = jnp.clip(jnp.round((logden - offset) / step), -_Q16, _Q16)
    q = jnp.where(seen, q, _EMPTY16).astype(jnp.int16)
    return {"q": q, "offset": offset[..., 0], "step": step[..., 0]}


def _dq16_logscale(p: dict):
    seen = p["q"] != _EMPTY16
    return p["q"].astype(jnp.float32) * p["step"][..., None] + p["offset"][..., None], seen


# ----------------------------------------------------------------------------- per layer codecs


def _compress_layer7(layer: dict, mode: str, codec: dict | None):
    if mode == "bf16":
        return {k: layer[k].astype(jnp.bfloat16) for k in ("shift_att", "wkv", "shift_ffn")}
    if mode == "int8":
        return {k: _q8(layer[k], (-1,)) for k in ("shift_att", "wkv", "shift_ffn")}
    wkv = layer["wkv"]
    # A zero-size leaf records the heads' shape for the decoder; it takes no bytes.
    return {"code": _encode(codec, _features7(layer)),
            "wkv_like": jnp.zeros((0,) + wkv.shape[1:], jnp.float32)}


def _decompress_layer7(p: dict, mode: str, codec: dict | None):
    if mode == "bf16":
        return {k: p[k].astype(jnp.float32) for k in ("shift_att", "wkv", "shift_ffn")}
    if mode == "int8":
        return {k: _dq8(p[k], (-1,)) for k in ("shift_att", "wkv", "shift_ffn")}
    heads = p["wkv_like"].shape[1:]
    out = _decode(codec, p["code"])
    C = (out.shape[-1] - int(np.prod(heads))) // 2
    shift_att, shift_ffn, wkv = jnp.split(out, [C, 2 * C], axis=-1)
    return {"shift_att": shift_att, "wkv": wkv.reshape(wkv.shape[:-1] + heads),
            "shift_ffn": shift_ffn}


def _compress_layer(layer: dict, mode: str, codec: dict | None):
    if mode == "none":
        return layer
    if _is_rwkv7(layer):
        return _compress_layer7(layer, mode, codec)
    if not _is_rwkv(layer):
        like = jnp.zeros((0,), layer["k"].dtype)  # records the dtype to decode to; 0 bytes
        if mode == "bf16":
            return {"k": layer["k"].astype(jnp.bfloat16), "v": layer["v"].astype(jnp.bfloat16),
                    "like": like}
        if mode == "int8":
            return {"k": _q8(layer["k"], (2, 3)), "v": _q8(layer["v"], (2, 3)), "like": like}
        return layer  # learned: the codec is for RWKV states only
    mean, logden = _normalise(layer)
    if mode == "bf16":
        return {"shift_att": layer["shift_att"].astype(jnp.bfloat16),
                "shift_ffn": layer["shift_ffn"].astype(jnp.bfloat16),
                "mean": mean.astype(jnp.bfloat16), "logden": logden}
    if mode == "int8":
        return {"shift_att": _q8(layer["shift_att"], (-1,)),
                "shift_ffn": _q8(layer["shift_ffn"], (-1,)),
                "mean": _q8(mean, (-1,)), "logden": _q16_logscale(logden)}
    return {"code": _encode(codec, _features(layer["shift_att"], layer["shift_ffn"], mean, logden))}


def _decompress_layer(p: dict, mode: str, codec: dict | None):
    if mode == "none":
        return p
    if "like" in p:
        dtype = p["like"].dtype
        if mode == "bf16":
            return {"k": p["k"].astype(dtype), "v": p["v"].astype(dtype)}
        return {"k": _dq8(p["k"], (2, 3)).astype(dtype), "v": _dq8(p["v"], (2, 3)).astype(dtype)}
    if "k" in p:  # an attention layer under the learned codec: stored as it was
        return p
    if "wkv" in p or "wkv_like" in p:
        return _decompress_layer7(p, mode, codec)
    if mode == "bf16":
        logden = p["logden"]
        return _rwkv_layer(p["shift_att"], p["shift_ffn"],
                           _wkv(p["mean"].astype(jnp.float32), logden, logden > NEG_INF / 2))
    if mode == "int8":
        logden, seen = _dq16_logscale(p["logden"])
        return _rwkv_layer(_dq8(p["shift_att"], (-1,)), _dq8(p["shift_ffn"], (-1,)),
                           _wkv(_dq8(p["mean"], (-1,)), logden, seen))
    shift_att, shift_ffn, mean, logden = jnp.split(_decode(codec, p["code"]), 4, axis=-1)
    return _rwkv_layer(shift_att, shift_ffn, _wkv(mean, logden, jnp.ones(mean.shape, bool)))


# ----------------------------------------------------------------------------- learned codec


def _features(shift_att, shift_ffn, mean, logden) -> jax.Array:
    logden = jnp.maximum(logden, _LOGDEN_FLOOR)
    return jnp.concatenate([shift_att.astype(jnp.float32), shift_ffn.astype(jnp.float32),
                            mean, logden], axis=-1)


def _features7(layer: dict) -> jax.Array:
    wkv = layer["wkv"].astype(jnp.float32)
    return jnp.concatenate([layer["shift_att"].astype(jnp.float32),
                            layer["shift_ffn"].astype(jnp.float32),
                            wkv.reshape(wkv.shape[0], -1)], axis=-1)


def codec_features(config: ModelConfig) -> int:
    """Numbers the learned codec of one RWKV layer encodes."""
    if config.version == "7":
        return 2 * config.n_embd + config.n_head * config.head_size**2
    return 4 * config.n_embd


def _dense(p: dict, x: jax.Array) -> jax.Array:
    return x @ p["kernel"].astype(jnp.float32) + p["bias"].astype(jnp.float32)


def _encode(codec: dict, features: jax.Array) -> jax.Array:
    return _dense(codec["enc"], features)


def _decode(codec: dict, code: jax.Array) -> jax.Array:
    return _dense(codec["dec"], code)


class _LayerCodec(nn.Module):
    features: int
    rank: int

    @nn.compact
    def __call__(self):
        nn.Dense(self.rank, name="enc")(jnp.zeros((1, self.features)))
        # The decoder starts at zero, so a fresh codec hands on a fixed neutral state and the
        # language model's gradient alone decides what passes (as LoRA starts its B at zero).
        nn.Dense(self.features, kernel_init=nn.initializers.zeros_init(), name="dec")(
            jnp.zeros((1, self.rank)))


class StateCodec(nn.Module):
    """Creates the learned codec's parameters: an encoder/decoder pair per RWKV layer.

    The model (rwkv_jax.nn.model.RWKV) makes these at init when the config asks for the learned
    codec, so they live in the one params tree (params["state_codec"]["layer_i"]["enc"|"dec"])
    and train, checkpoint and shard with the rest.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self):
        cfg = self.config
        for i in range(cfg.n_layer):
            if cfg.is_rwkv(i):
                _LayerCodec(codec_features(cfg), cfg.codec_rank, name=f"layer_{i}")()


# ----------------------------------------------------------------------------- the API


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"state compression {mode!r} is not one of {MODES}")


def _codecs(state_layers, mode: str, params):
    if mode != "learned":
        return [None] * len(state_layers)
    codec = None if params is None else params.get("state_codec", params)
    if codec is None or not any(k.startswith("layer_") for k in codec):
        raise ValueError("state compression 'learned' needs the model's params with a trained "
                         "codec (params['state_codec']): train with "
                         "memory.state_compression='learned'")
    out = []
    for i, layer in enumerate(state_layers):
        if "aa" in layer or "wkv" in layer or "code" in layer:
            if f"layer_{i}" not in codec:
                raise ValueError(f"the learned state codec has no entry for layer {i}")
            out.append(codec[f"layer_{i}"])
        else:
            out.append(None)
    return out


def compress(state: dict, mode: str, params: dict | None = None) -> dict:
    """The state as stored: a pytree of arrays (`pos` kept as it is)."""
    check_mode(mode)
    if mode == "none":
        return state
    codecs = _codecs(state["layers"], mode, params)
    return {"pos": state["pos"],
            "layers": tuple(_compress_layer(l, mode, c) for l, c in zip(state["layers"], codecs))}


def decompress(packed: dict, mode: str, params: dict | None = None) -> dict:
    """A state any model call takes, from what `compress` stored."""
    check_mode(mode)
    if mode == "none":
        return packed
    codecs = _codecs(packed["layers"], mode, params)
    return {"pos": packed["pos"],
            "layers": tuple(_decompress_layer(l, mode, c) for l, c in zip(packed["layers"], codecs))}


def roundtrip(state: dict, mode: str, params: dict | None = None) -> dict:
    """decompress(compress(state)) with the original dtypes: what a consumer of a stored state
    sees. Differentiable in `params` (the learned codec trains through it)."""
    if mode == "none":
        return state
    out = decompress(compress(state, mode, params), mode, params)
    return jax.tree.map(lambda new, old: new.astype(old.dtype), out, state)


def bytes_of(packed) -> int:
    """Bytes of a (packed) state: arrays or jax.eval_shape structures."""
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(packed)))
