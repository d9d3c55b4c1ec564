"""Official RWKV-LM `.pth` weights in and out (RWKV-4 and RWKV-7 "x070").

An official state dict names its tensors `emb.weight`, `blocks.N.att.time_decay` (RWKV-4) or
`blocks.N.att.w0` (RWKV-7), ..., `head.weight`; Linear weights are (out, in) where Flax kernels
are (in, out), and per-channel vectors are stored as (1, 1, C). Conversion is a rename, a
transpose and a reshape, nothing else, so import followed by export gives back the same bytes.
torch is needed only here, and imported only when a file is read or written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np

from rwkv_jax.config import ModelConfig
from rwkv_jax.config.layer_pattern import LayerKind
from rwkv_jax.nn.model import param_shapes

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


# (official name within a block, our path within blocks_i, how it is stored)
_BLOCK_TENSORS = (
    ("ln1.weight", ("ln1", "scale"), "vector"),
    ("ln1.bias", ("ln1", "bias"), "vector"),
    ("ln2.weight", ("ln2", "scale"), "vector"),
    ("ln2.bias", ("ln2", "bias"), "vector"),
    ("att.time_decay", ("att", "time_decay"), "vector"),
    ("att.time_first", ("att", "time_first"), "vector"),
    ("att.time_mix_k", ("att", "time_mix_k"), "mix"),
    ("att.time_mix_v", ("att", "time_mix_v"), "mix"),
    ("att.time_mix_r", ("att", "time_mix_r"), "mix"),
    ("att.key.weight", ("att", "key", "kernel"), "linear"),
    ("att.value.weight", ("att", "value", "kernel"), "linear"),
    ("att.receptance.weight", ("att", "receptance", "kernel"), "linear"),
    ("att.output.weight", ("att", "output", "kernel"), "linear"),
    ("ffn.time_mix_k", ("ffn", "time_mix_k"), "mix"),
    ("ffn.time_mix_r", ("ffn", "time_mix_r"), "mix"),
    ("ffn.key.weight", ("ffn", "key", "kernel"), "linear"),
    ("ffn.receptance.weight", ("ffn", "receptance", "kernel"), "linear"),
    ("ffn.value.weight", ("ffn", "value", "kernel"), "linear"),
)


_LN0 = (("ln0.weight", ("ln0", "scale"), "vector"), ("ln0.bias", ("ln0", "bias"), "vector"))


# RWKV-7 in the order of RWKV-LM's state dicts (RWKV-v7/train_temp): ln1, ln2, ln0 (block 0),
# then the time-mix's tensors as its constructor makes them, then the channel-mix's. The LoRA
# factors (w1 (C, D), w2 (D, C), ...) and r_k (H, N) are stored as they are used ("table").
_LORA7 = tuple((f"att.{n}{i}", ("att", f"{n}{i}"), "table") for n in "wavg" for i in (1, 2))


_ATT7 = (
    tuple((f"att.{n}", ("att", n), "mix") for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"))
    + _LORA7[0:2] + (("att.w0", ("att", "w0"), "mix"),)
    + _LORA7[2:4] + (("att.a0", ("att", "a0"), "mix"),)
    + _LORA7[4:6] + (("att.v0", ("att", "v0"), "mix"),)
    + _LORA7[6:8]
    + (("att.k_k", ("att", "k_k"), "mix"), ("att.k_a", ("att", "k_a"), "mix"),
       ("att.r_k", ("att", "r_k"), "table"))
    + tuple((f"att.{n}.weight", ("att", n, "kernel"), "linear")
            for n in ("receptance", "key", "value", "output"))
    + (("att.ln_x.weight", ("att", "ln_x", "scale"), "vector"),
       ("att.ln_x.bias", ("att", "ln_x", "bias"), "vector"))
)


_FFN7 = (
    ("ffn.x_k", ("ffn", "x_k"), "mix"),
    ("ffn.key.weight", ("ffn", "key", "kernel"), "linear"),
    ("ffn.value.weight", ("ffn", "value", "kernel"), "linear"),
)


_LN12 = _BLOCK_TENSORS[:4]


# The first layer's value-residual tensors, which RWKV-LM keeps (unused) in its checkpoints
# and some converted files drop: read as zeros when absent.
_UNUSED_IN_FIRST7 = ("att.v0", "att.v1", "att.v2")


_TOP = (
    ("emb.weight", ("emb", "embedding"), "table"),
    ("ln_out.weight", ("ln_out", "scale"), "vector"),
    ("ln_out.bias", ("ln_out", "bias"), "vector"),
    ("head.weight", ("head", "kernel"), "linear"),
)


# Tensors of RWKV-7 (read as version 7), and tensors that mark a generation this code does not
# read, to say so instead of failing on a missing key.
_V7_MARKERS = (".att.r_k", ".att.x_r", ".att.w0", ".att.k_k")


_LATER_VERSIONS = {".ln_x.": "RWKV-5 or later", ".time_maa": "RWKV-6", ".time_faaaa": "RWKV-5/6"}


def _block_layout(version: str, layer: int) -> tuple:
    if version == "7":
        return _LN12 + (_LN0 if layer == 0 else ()) + _ATT7 + _FFN7
    return (_LN0 if layer == 0 else ()) + _BLOCK_TENSORS


def official_layout(n_layer: int, version: str = "4") -> list[tuple[str, tuple, str]]:
    """(official name, our path in params, how it is stored) of each tensor of an n_layer model
    of this RWKV version, in the official file's order: "linear" is (out, in) there and
    (in, out) here, "mix" (1, 1, C) there and (C,) here, "vector" and "table" the same."""
    out = [_TOP[0]]
    for i in range(n_layer):
        out += [(f"blocks.{i}.{name}", (f"blocks_{i}",) + ours, kind)
                for name, ours, kind in _block_layout(str(version), i)]
    return out + list(_TOP[1:])


def import_torch():
    try:
        import torch  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - torch is in the dev extra
        raise ImportError('official .pth import/export needs torch: pip install "rwkv_jax[torch]"') from e
    return torch


def from_official(t, kind: str) -> np.ndarray:
    a = t.detach().cpu().float().numpy() if hasattr(t, "detach") else np.asarray(t, np.float32)
    if kind == "linear":
        return np.ascontiguousarray(a.T)
    if kind == "mix":
        return a.reshape(-1)
    return a


def to_official(a: np.ndarray, kind: str, torch, dtype):
    a = np.asarray(a, np.float32)
    if kind == "linear":
        a = a.T
    elif kind == "mix":
        a = a.reshape(1, 1, -1)
    return torch.from_numpy(np.array(a, np.float32, order="C", copy=True)).to(dtype)


def _set(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple):
    for p in path:
        tree = tree[p]
    return tree


def load_official_state_dict(path: str | os.PathLike) -> dict:
    """torch.load with the checks that turn a wrong file into one clear message."""
    torch = import_torch()
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory; an official checkpoint is one .pth file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no official checkpoint at {path!r}")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; files of torch before 1.6 are a bare pickle. Anything
    # else would get torch's advice to retry with weights_only=False, which is wrong here.
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise ValueError(f"{path!r} is not a torch checkpoint (neither the zip archive torch.save "
                         f"writes nor a pickle)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ValueError(f"{path!r} is not a readable torch checkpoint: {first}") from None
    if not isinstance(sd, Mapping) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path!r} is not an RWKV state dict (a mapping of names to tensors)")
    for name, t in sd.items():
        _check_weight(path, name, t, torch)
    return dict(sd)


def _check_weight(path: str, name: str, t, torch) -> None:
    """ValueError naming the tensor if it is not a finite floating-point weight: an integer
    tensor would be cast and used, and one NaN or Inf makes every logit NaN (generation then
    writes token 0 forever, training stops at its first step as if it had diverged)."""
    if not t.is_floating_point():
        raise ValueError(f"{path!r}: tensor {name!r} is {str(t.dtype).replace('torch.', '')}; "
                         f"the weights of an RWKV checkpoint are floating point (float32, "
                         f"bfloat16 or float16)")
    if t.numel() == 0:
        return
    # min and max carry a NaN through, and are Inf where any value is: 0.02 s for 0.5 GB of
    # bfloat16 on a 2-core CPU, where torch.isfinite took 0.8 s (a 3B file: 0.3 s, not 10).
    if not all(torch.isfinite(m) for m in torch.aminmax(t)):
        finite = torch.isfinite(t)
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        first = tuple(torch.nonzero(~finite)[0].tolist())
        raise ValueError(f"{path!r}: tensor {name!r} holds {nan} NaN and {inf} infinite "
                         f"value(s), the first at index {first}: the file is damaged, or was "
                         f"saved from a run that diverged")


def official_version(sd: Mapping) -> str:
    """"7" for an RWKV-7 (x070) state dict, else "4"."""
    return "7" if any(k.endswith(m) for k in sd for m in _V7_MARKERS) else "4"


def import_official(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """Read an official RWKV-LM RWKV-4 or RWKV-7 (x070) `.pth` into (model_config, params).

    The version, n_layer, n_embd, dim_ffn, vocab_size (and for RWKV-7 the head size and the
    LoRA ranks) come from the tensors. The params are float32 numpy arrays in our tree
    (jnp.asarray them, or hand them to jax.device_put).
    """
    return official_params(load_official_state_dict(path), repr(os.fspath(path)))


def official_params(sd: Mapping, where: str) -> tuple[ModelConfig, dict]:
    """(model_config, params) of an official RWKV-4 or RWKV-7 state dict (torch tensors or
    numpy arrays by official name), its dimensions read from the tensors; ValueError naming
    `where` and the tensor otherwise."""
    version = official_version(sd)
    if version == "4":
        for marker, name in _LATER_VERSIONS.items():
            hit = next((k for k in sd if marker in k), None)
            if hit:
                raise ValueError(f"{where} holds {hit!r}: an {name} checkpoint, not RWKV-4 "
                                 "(nor RWKV-7, the other version read here)")
    what = f"an RWKV-{version} state dict"
    missing_top = [k for k, _, _ in _TOP if k not in sd]
    if missing_top:
        raise ValueError(f"{where} is not {what}: missing {missing_top}")

    layers = {int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))}
    n_layer = max(layers) + 1 if layers else 0
    vocab_size, n_embd = sd["emb.weight"].shape
    if n_layer == 0 or "blocks.0.ffn.key.weight" not in sd:
        raise ValueError(f"{where} is not {what}: no blocks.N.att/ffn tensors")
    dim_ffn = sd["blocks.0.ffn.key.weight"].shape[0]
    dims = dict(vocab_size=int(vocab_size), n_layer=n_layer, n_embd=int(n_embd),
                dim_ffn=int(dim_ffn), layer_types=(LayerKind.RWKV,) * n_layer)
    if version == "7":
        dims.update(_x070_dims(sd, n_layer, where))
    try:
        config = ModelConfig(version=version, **dims)
    except ValueError as e:
        raise ValueError(f"{where}: the tensors describe no valid model: {e}") from None

    expected = {k for k, _, _ in _TOP}
    params: dict = {}
    shapes = param_shapes(config)
    for key, ours, kind in official_layout(n_layer, version):
        if key not in sd:
            name = key.split(".", 2)[-1]
            if version == "7" and key.startswith("blocks.0.") and name in _UNUSED_IN_FIRST7:
                _set(params, ours, _unused_first7(config, name))
                continue
            raise ValueError(f"{where} is not {what}: missing {key!r}")
        expected.add(key)
        value = from_official(sd[key], kind)
        want = _get(shapes, ours).shape
        if value.shape != want:
            raise ValueError(f"{where}: {key!r} has shape {tuple(sd[key].shape)}, but the model "
                             f"the rest of the file describes ({_describe_dims(config)}) needs "
                             f"{_official_shape(want, kind)}")
        _set(params, ours, value)
    extra = sorted(set(sd) - expected)
    if extra:
        raise ValueError(
            f"{where} has tensors this RWKV-{version} model does not know: {extra[:8]}"
            + (" ..." if len(extra) > 8 else "")
        )
    return config, params


def _x070_dims(sd: Mapping, n_layer: int, where: str) -> dict:
    """Head size and LoRA ranks of an RWKV-7 state dict (the same in every layer)."""
    if "blocks.0.att.r_k" not in sd:
        raise ValueError(f"{where} is not an RWKV-7 state dict: missing 'blocks.0.att.r_k'")
    out = {"head_size": int(sd["blocks.0.att.r_k"].shape[-1])}
    for n in "wavg":
        ranks = {int(sd[k].shape[-1]) for i in range(n_layer)
                 if (k := f"blocks.{i}.att.{n}1") in sd}
        if not ranks:
            raise ValueError(f"{where} is not an RWKV-7 state dict: no blocks.N.att.{n}1")
        if len(ranks) > 1:
            raise ValueError(f"{where}: att.{n}1 has ranks {sorted(ranks)} across layers; "
                             "this model has one rank per LoRA")
        out[f"dim_{n}_lora"] = ranks.pop()
    return out


def _official_shape(ours: tuple, kind: str) -> tuple:
    """The shape in an official file of a tensor of shape `ours` here (official_layout's kinds)."""
    if kind == "linear":
        return tuple(reversed(ours))
    if kind == "mix":
        return (1, 1) + tuple(ours)
    return tuple(ours)


def _describe_dims(config: ModelConfig) -> str:
    dims = (f"RWKV-{config.version}, n_layer {config.n_layer}, n_embd {config.n_embd}, ffn "
            f"{config.dim_ffn}, vocabulary {config.vocab_size}")
    if config.version == "7":
        dims += (f", head size {config.head_size}, LoRA ranks w {config.dim_w_lora} a "
                 f"{config.dim_a_lora} v {config.dim_v_lora} g {config.dim_g_lora}")
    return dims


def _unused_first7(config: ModelConfig, name: str) -> np.ndarray:
    C, d = config.n_embd, config.dim_v_lora
    shape = {"att.v0": (C,), "att.v1": (C, d), "att.v2": (d, C)}[name]
    return np.zeros(shape, np.float32)


def export_official(params: Mapping, config: ModelConfig, path: str | os.PathLike,
                    dtype: str = "float32") -> None:
    """Write params as an official RWKV-4 or RWKV-7 `.pth` (for ChatRWKV, rwkv.cpp, the `rwkv`
    package; RWKV-7 needs the package's RWKV_V7_ON=1).

    Only what the official format can hold: a pure RWKV model without position embeddings
    or a learned initial state. `dtype` is the tensors' dtype in the file.
    """
    torch = import_torch()
    if any(t != LayerKind.RWKV for t in config.layer_types):
        raise ValueError("export_official: the official format has no attention layers; "
                         f"this model's layers are {list(config.layer_types)}")
    if config.pos_emb != "none" or config.learned_init_state:
        raise ValueError(f"export_official: the official RWKV-{config.version} format has no "
                         "position embeddings or learned initial state (architecture.pos_emb "
                         "must be 'none', architecture.learned_init_state False)")
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if tdtype is None:
        raise ValueError(f"export_official dtype={dtype!r}: use float32, bfloat16 or float16")
    path = check_export_path(path)
    params = _as_numpy(params)
    sd = {name: to_official(_get(params, ours), kind, torch, tdtype)
          for name, ours, kind in official_layout(config.n_layer, config.version)}
    save_state_dict(sd, path, torch)


def save_state_dict(sd: Mapping, path: str, torch) -> None:
    """torch.save(sd, path), atomically: written beside the target under a name of this
    process's, then renamed, so a reader never sees half a file under the real name and a
    failed write leaves nothing; OSError in one line on failure."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        torch.save(sd, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a short write as RuntimeError
        raise OSError(f"writing {path!r} failed: {str(e).strip().splitlines()[0][:300]}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_export_path(path: str | os.PathLike) -> str:
    """`path` if an official .pth can be written there (ValueError saying why not): the
    folder exists and takes new files, the path is not a folder, and torch imports."""
    import_torch()
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory; name the .pth file to write")
    if not os.path.isdir(parent):
        raise ValueError(f"{path!r}: the directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path!r}: the directory {parent!r} is not writable")
    return path


def _as_numpy(tree):
    if isinstance(tree, Mapping):
        return {k: _as_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)
