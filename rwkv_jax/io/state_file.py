"""Learned initial states in and out as a state file (a torch-saved dict of tensors).

RWKV-7: the community's state file, as RWKV-PEFT's state tuning writes it and ChatRWKV and
RWKV-Runner read it (ai00's reader, in web-rwkv, was not checked): one
`blocks.N.att.time_state` of shape (H, N, N) per layer, float32, each head's matrix with rows
indexed by value channel and columns by key channel. That is the `rwkv` package's x070 state (state[3N+1]: `vk = v.view(H,N,1) @ k.view(H,1,N)`,
output `state @ r`) and our "wkv" state (rwkv_jax.ops.wkv7), so nothing is transposed.
RWKV-Runner loads a version-7 file untransposed and transposes only RWKV-6 files (RWKV-6
kept its state key x value); ChatRWKV's API_DEMO_CHAT.py transposes, a remnant of its RWKV-6
example state. RWKV-Runner also refuses a file unless it holds exactly n_layer tensors.

So the token-shift parts of a learned state (shift_att, shift_ffn: the last token's input
to the time-mix and channel-mix) cannot travel in that file: community loaders start them
from zero. export_state refuses to drop nonzero ones silently; shift="drop" writes
time_state alone, shift="keep" adds `blocks.N.att.shift_state` and `blocks.N.ffn.shift_state`
(C,), which this project reads and ChatRWKV ignores, but RWKV-Runner then refuses the file.

RWKV-4 has no community convention; its file is ours: `blocks.N.att.state_aa`,
`blocks.N.att.state_bb`, `blocks.N.att.shift_state`, `blocks.N.ffn.shift_state`, each (C,),
the InitState parameters as trained (the state's scale pp is 0, bb is clamped at 0 on use).

Only RWKV layers have entries; attention layers of a hybrid start from an empty window.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import numpy as np

from rwkv_jax.config import ModelConfig
from rwkv_jax.io.official import (import_torch, check_export_path, load_official_state_dict,
                                  save_state_dict)
from rwkv_jax.nn.model import initial_state

# (file name within blocks.N, our InitState parameter) per version; the first is the marker.
_KEYS = {
    "7": (("att.time_state", "wkv"), ("att.shift_state", "shift_att"),
          ("ffn.shift_state", "shift_ffn")),
    "4": (("att.state_aa", "aa"), ("att.state_bb", "bb"), ("att.shift_state", "shift_att"),
          ("ffn.shift_state", "shift_ffn")),
}
_SHIFTS = ("shift_att", "shift_ffn")
_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _rwkv_layers(config: ModelConfig) -> list[int]:
    return [i for i in range(config.n_layer) if config.is_rwkv(i)]


def _shape(config: ModelConfig, ours: str) -> tuple:
    if ours == "wkv":
        return (config.n_head, config.head_size, config.head_size)
    return (config.n_embd,)


def export_state(params: Mapping, config: ModelConfig, path: str | os.PathLike,
                 shift: str | None = None) -> None:
    """Write the learned initial state of `params` as a state file (the module docstring has
    the format). shift (RWKV-7): None refuses nonzero learned token-shift states, "drop"
    leaves them out, "keep" writes them under our own keys."""
    torch = import_torch()
    if not config.learned_init_state:
        raise ValueError("export_state: this model has no learned initial state "
                         "(architecture.learned_init_state is False)")
    if shift not in (None, "drop", "keep"):
        raise ValueError(f"export_state shift={shift!r}: use 'drop' or 'keep'")
    path = check_export_path(path)
    values = {i: {k: np.asarray(v, np.float32) for k, v in params[f"blocks_{i}"]["init_state"].items()}
              for i in _rwkv_layers(config)}
    keys = _KEYS[config.version]
    if config.version == "7" and shift != "keep":
        moved = max((float(np.abs(v[s]).max()) for v in values.values() for s in _SHIFTS), default=0.0)
        if moved and shift is None:
            raise ValueError(f"export_state: the learned token-shift states are nonzero (max |x| "
                             f"{moved:.3g}) and the community state file holds time_state alone: "
                             f"choose shift 'drop' (loaders start them at zero) or 'keep' (our "
                             f"extra keys; RWKV-Runner then refuses the file)")
        keys = keys[:1]
    sd = {f"blocks.{i}.{name}": torch.from_numpy(np.array(v[ours], np.float32, order="C"))
          for i, v in values.items() for name, ours in keys}
    save_state_dict(sd, path, torch)


def _file_version(path: str, sd: Mapping) -> str:
    found = [v for v, keys in _KEYS.items() if any(k.endswith("." + keys[0][0]) for k in sd)]
    if len(found) != 1:
        raise ValueError(f"{path!r} is not a state file: it holds no blocks.N.att.time_state "
                         f"(RWKV-7) or blocks.N.att.state_aa (RWKV-4) tensor")
    return found[0]


def load_state(path: str | os.PathLike, config: ModelConfig) -> dict:
    """The initial state a state file holds, as InitState parameter values for `config`:
    {"blocks_N": {"init_state": {name: float32 array}}} for each RWKV layer N. Parts the file
    lacks (RWKV-7's token-shift states, in community files) are zero."""
    path = os.fspath(path)
    sd = load_official_state_dict(path)  # one-line errors for a missing or unreadable file
    version = _file_version(path, sd)
    if version != config.version:
        raise ValueError(f"{path!r} holds an RWKV-{version} state; this model is RWKV-{config.version}")
    names = {name: ours for name, ours in _KEYS[version]}
    layers, out = _rwkv_layers(config), {}
    for key in sd:
        m = _KEY.match(key)
        if m is None or m.group(2) not in names:
            raise ValueError(f"{path!r}: unknown tensor {key!r}; a state file holds "
                             f"blocks.N.{{{', '.join(names)}}}")
    in_file = sorted({int(_KEY.match(k).group(1)) for k in sd})
    if in_file != layers:
        raise ValueError(f"{path!r} holds states for layers {in_file}; this model's RWKV layers "
                         f"are {layers} (n_layer {config.n_layer})")
    for i in layers:
        values = {}
        for name, ours in _KEYS[version]:
            want, t = _shape(config, ours), sd.get(f"blocks.{i}.{name}")
            if t is None and not (version == "7" and ours in _SHIFTS):
                raise ValueError(f"{path!r}: blocks.{i}.{name} is missing")
            t = np.zeros(want, np.float32) if t is None else t.float().numpy()
            if tuple(t.shape) != want:
                raise ValueError(f"{path!r}: blocks.{i}.{name} is {tuple(t.shape)}; this model's is "
                                 f"{want} ({_dims(config)})")
            values[ours] = np.array(t, np.float32)
        out[f"blocks_{i}"] = {"init_state": values}
    return out


def _dims(config: ModelConfig) -> str:
    heads = f", n_head {config.n_head}, head_size {config.head_size}" if config.version == "7" else ""
    return f"n_embd {config.n_embd}{heads}"


def state_tree(config: ModelConfig, values: Mapping, batch_size: int) -> dict:
    """The model state (rwkv_jax.nn.state's tree, `batch_size` rows) starting from the values
    load_state returned, for any model of that shape, with a learned initial state or not."""
    return initial_state(dataclasses.replace(config, learned_init_state=True), values, batch_size)
