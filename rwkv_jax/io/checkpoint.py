"""Checkpoints: official RWKV-LM `.pth` import and export (RWKV-4 and RWKV-7 "x070").

An official state dict names its tensors `emb.weight`, `blocks.N.att.time_decay` (RWKV-4) or
`blocks.N.att.w0` (RWKV-7), ..., `head.weight`; Linear weights are (out, in) where Flax kernels
are (in, out), and per-channel vectors are stored as (1, 1, C). Conversion is a rename, a
transpose and a reshape, nothing else, so import followed by export gives back the same bytes.
torch is needed only here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np

from rwkv_jax.config import ModelConfig
from rwkv_jax.hybrid import RWKV as RWKV_LAYER

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


def _torch():
    try:
        import torch  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - torch is in the dev extra
        raise ImportError('official .pth import/export needs torch: pip install "rwkv_jax[torch]"') from e
    return torch


def _from_official(t, kind: str) -> np.ndarray:
    a = t.detach().cpu().float().numpy()
    if kind == "linear":
        return np.ascontiguousarray(a.T)
    if kind == "mix":
        return a.reshape(-1)
    return a


def _to_official(a: np.ndarray, kind: str, torch, dtype):
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
    torch = _torch()
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
    sd = load_official_state_dict(path)
    where = repr(os.fspath(path))
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
                dim_ffn=int(dim_ffn), layer_types=(RWKV_LAYER,) * n_layer)
    if version == "7":
        dims.update(_x070_dims(sd, n_layer, where))
    try:
        config = ModelConfig(version=version, **dims)
    except ValueError as e:
        raise ValueError(f"{where}: the tensors describe no valid model: {e}") from None

    expected = {k for k, _, _ in _TOP}
    params: dict = {}
    from rwkv_jax.model import param_shapes  # noqa: PLC0415

    shapes = param_shapes(config)
    for key, ours, kind in official_layout(n_layer, version):
        if key not in sd:
            name = key.split(".", 2)[-1]
            if version == "7" and key.startswith("blocks.0.") and name in _UNUSED_IN_FIRST7:
                _set(params, ours, _unused_first7(config, name))
                continue
            raise ValueError(f"{where} is not {what}: missing {key!r}")
        expected.add(key)
        value = _from_official(sd[key], kind)
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
    torch = _torch()
    if any(t != RWKV_LAYER for t in config.layer_types):
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
    sd = {name: _to_official(_get(params, ours), kind, torch, tdtype)
          for name, ours, kind in official_layout(config.n_layer, config.version)}
    # Written beside the target under a name of this process's, then renamed: a reader never
    # sees half a file under the real name, and a failed write leaves nothing.
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
    _torch()
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


# ----------------------------------------------------------------------------------------------
# Training checkpoints (orbax): parameters, optimizer state, the carried recurrent state, the
# step (which fixes the data position: batches are a function of (seed, step)), and a JSON
# record with the model config, so infer.py can rebuild the model from the checkpoint alone.
# orbax writes each step to a temporary directory and renames it when complete, so a process
# killed mid-save never leaves a checkpoint that looks whole. The record also holds a checksum
# of every array, verified on restore: orbax and tensorstore check their own indexes and
# manifests (crc32c), not the array data, where a flipped byte was restored without a word.
# ----------------------------------------------------------------------------------------------


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (no space or inodes left, a read-only or vanished
    directory). The checkpoints written before it are kept, its temporary is removed."""


class DamagedCheckpointError(ValueError):
    """A checkpoint's arrays differ from the checksums recorded when it was written."""


# The checksum of an array, as recorded: two position-weighted sums of its 32-bit words
# (_word_sums). Named so that a later format can be told apart from this one.
CHECKSUM_FORMAT = "wsum64/1"

_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)|\[Errno (\d+)\]")


def _ocp():
    import orbax.checkpoint as ocp  # noqa: PLC0415

    return ocp


def _abstract(tree):
    import jax  # noqa: PLC0415

    def spec(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(spec, tree)


def _word_sums(x):
    """(2,) uint32: sum_i w_i * a_i and sum_i mix(w_i) * b_i (mod 2**32) over the array's
    32-bit words w_i (narrower elements widened, 64-bit ones split), with odd weights a_i, b_i
    that depend on the word's position. Any change to one word changes the first sum (an odd
    weight is invertible mod 2**32); moved or several changed words go unseen only where both
    sums come out the same (random damage: odds of about 2**-64). It guards against damage,
    not against tampering. Integer sums are exact in any order, so the result is the same bits
    for any sharding, device or process count, and it runs where the array lives: an
    all-reduce of two words per array, no copy to the host."""
    import jax.numpy as jnp  # noqa: PLC0415
    from jax import lax  # noqa: PLC0415

    u32 = jnp.uint32
    if x.dtype == jnp.bool_:
        w = x.astype(u32)
    elif x.dtype.itemsize == 8:
        w = lax.bitcast_convert_type(x, u32)  # a trailing axis of 2 words
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: u32}[x.dtype.itemsize]
        w = lax.bitcast_convert_type(x, unsigned).astype(u32)
    # Each word's flat position from per-axis iotas: a reshape to 1-D could make XLA gather
    # a sharded array onto one device.
    pos, stride = jnp.zeros(w.shape, u32), 1
    for axis in reversed(range(w.ndim)):
        pos = pos + lax.broadcasted_iota(u32, w.shape, axis) * u32(stride % 2**32)
        stride *= w.shape[axis]
    m = pos * u32(0x9E3779B9) + u32(0x7F4A7C15)
    h = (w ^ (w >> 16)) * u32(0x85EBCA6B)
    h = h ^ (h >> 13)
    return jnp.stack([jnp.sum(w * (m | 1), dtype=u32),
                      jnp.sum(h * ((m ^ (m >> 15)) | 1), dtype=u32)])


_checksum_fn = None


def tree_checksums(tree) -> dict[str, str]:
    """{key path: 16 hex digits} of every array in `tree` (CHECKSUM_FORMAT), computed on the
    arrays' devices by one compiled call."""
    import jax  # noqa: PLC0415

    global _checksum_fn
    if _checksum_fn is None:
        _checksum_fn = jax.jit(lambda t: jax.tree.map(_word_sums, t))
    sums = jax.device_get(_checksum_fn(tree))
    return {jax.tree_util.keystr(path): f"{int(v[0]):08x}{int(v[1]):08x}"
            for path, v in jax.tree_util.tree_leaves_with_path(sums)}


def tree_dtypes(tree) -> dict[str, str]:
    """{key path: dtype name} of every array in `tree`, as tree_checksums keys them."""
    import jax  # noqa: PLC0415

    return {jax.tree_util.keystr(path): str(x.dtype)
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _verify(tree, meta: dict, item: str, step: int, directory: str) -> None:
    """DamagedCheckpointError if an array of `tree` (the checkpoint's `item`) differs from the
    checksum its record holds; a one-line warning for a checkpoint written without them."""
    recorded = meta.get("checksums")
    if recorded is None:
        _warn_unverified(step, directory)
        return
    if meta.get("checksum_format") != CHECKSUM_FORMAT:
        raise DamagedCheckpointError(
            f"the checkpoint of step {step} in {directory} records checksums of format "
            f"{meta.get('checksum_format')!r}, which this version does not know (it computes "
            f"{CHECKSUM_FORMAT!r}): its record is damaged, or a newer rwkv_jax wrote it")
    recorded = recorded.get(item, {})
    actual = tree_checksums(tree)
    # An array restored in another dtype than it was written in (a resume in another
    # efficiency.precision casts the carried attention window) has other words: its sum
    # cannot be compared, which is a change of settings, not damage.
    saved_dtypes = meta.get("checksum_dtypes", {}).get(item, {})
    now = tree_dtypes(tree)
    actual = {k: v for k, v in actual.items() if saved_dtypes.get(k, now[k]) == now[k]}
    bad = [k for k, v in actual.items() if recorded.get(k, v) != v]
    missing = [k for k in actual if k not in recorded]
    if bad or missing:
        what = {"params": "parameter", "train": "optimizer and carried-state"}.get(item, item)
        names = ", ".join((bad or missing)[:3]) + (" ..." if len(bad or missing) > 3 else "")
        raise DamagedCheckpointError(
            f"the checkpoint of step {step} in {directory} is damaged: "
            + (f"{len(bad)} of its {len(actual)} {what} arrays "
               f"{'differs' if len(bad) == 1 else 'differ'} from the checksums "
               f"recorded when it was written ({names})" if bad else
               f"its record has no checksum for {len(missing)} of its {len(actual)} {what} "
               f"arrays ({names})"))


_warned_unverified: set = set()


def _warn_unverified(step: int, directory: str) -> None:
    import logging  # noqa: PLC0415

    if (directory, step) not in _warned_unverified:
        _warned_unverified.add((directory, step))
        logging.getLogger("rwkv_jax").warning(
            "the checkpoint of step %d in %s was written without checksums (by rwkv_jax before "
            "they were recorded): restored unverified", step, directory)


def cause_line(e: BaseException) -> str:
    """`Type: first line` of the innermost exception a failed orbax call was raised from: the
    outer ones wrap it in a repr of tensorstore's bound methods ("See full TensorStore
    details: <bound method pybind11_detail...")."""
    seen = set()
    while e.__cause__ is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__
    text = str(e).split("See full TensorStore details")[0].strip().rstrip(".")
    first = (text.splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


# tensorstore's codes for data that is there but wrong (a checksum or decoding failure), cut
# short, or missing: a damaged checkpoint, where other failures may be a mismatch of the trees.
_DAMAGE_CODES = re.compile(r"^(\w+: )?(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND):")


def _damage(e: BaseException, step: int, directory: str) -> DamagedCheckpointError | None:
    """The DamagedCheckpointError a failed orbax restore means, if tensorstore says so."""
    cause = cause_line(e)
    if _DAMAGE_CODES.match(cause):
        return DamagedCheckpointError(f"the checkpoint of step {step} in {directory} is damaged "
                                      f"({cause})")
    return None


def _write_failure(e: BaseException | None) -> str | None:
    """The file system's reason a save failed ('No space left on device (ENOSPC)'), or None
    when the failure is not the file system's (a bug: it keeps its traceback)."""
    import errno  # noqa: PLC0415

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = e.errno if isinstance(e, OSError) and e.errno else None
        if code is None and (m := _OS_ERROR_CODE.search(str(e))):
            code = int(m.group(1) or m.group(2))  # tensorstore: "... [os_error_code='28']"
        if code:
            return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
        e = e.__cause__ or e.__context__
    return None


def _in_orbax(exc: BaseException) -> bool:
    import traceback  # noqa: PLC0415

    return any("orbax" in f.filename for f in traceback.extract_tb(exc.__traceback__))


def _add_filter(logger_name: str, keep) -> None:
    """logging.Filter `keep(record)` on a logger, once per name of `keep`."""
    import logging  # noqa: PLC0415

    logger = logging.getLogger(logger_name)
    if not any(getattr(f, "name", None) == keep.__name__ for f in logger.filters):
        f = logging.Filter(keep.__name__)
        f.filter = keep
        logger.addFilter(f)


def _quiet_orbax_write_errors() -> None:
    """orbax logs a failed save's exception, traceback and all, from every thread it passes
    through (with asyncio's reports below, 79 tracebacks for one full disk). The first failure
    reaches TrainCheckpointer, which reports it in one line; other orbax errors are still
    logged."""

    def drop_orbax_write_errors(record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or "orbax" not in record.pathname or _write_failure(exc) is None

    _add_filter("absl", drop_orbax_write_errors)  # orbax logs through absl.logging


def _quiet_abandoned_io() -> None:
    """A restore or save that fails on one array leaves tensorstore's other reads or writes in
    flight, and orbax closes their event loop. asyncio then logs each that failed as well as
    "exception was never retrieved", and each that ends later reports 'Event loop is closed' as
    an unraisable exception: tens of tracebacks before or after the one line that says what
    failed (the first failure, which reached the caller). Only those are dropped."""
    import sys  # noqa: PLC0415

    def drop_abandoned_orbax_io(record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        # A tensorstore write's future may carry no orbax frame (it failed in C++); its file
        # system error is the one already reported.
        return not (exc is not None and "never retrieved" in record.getMessage()
                    and (_in_orbax(exc) or _write_failure(exc) is not None))

    _add_filter("asyncio", drop_abandoned_orbax_io)
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    hook._drops_closed_loop = True
    sys.unraisablehook = hook


class TrainCheckpointer:
    """Save every N steps, keep the last k, restore the newest (onto the template's shardings).

    clean_temporaries: remove the temporaries of unfinished saves found in the directory (a
    killed run's) before the first save; only for the process that owns the run directory
    (trainer._lock_run_dir), so that no live writer's temporary is taken. In a run of several
    processes orbax leaves it to process 0."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3,
                 clean_temporaries: bool = False):
        ocp = _ocp()
        _quiet_orbax_write_errors()
        _quiet_abandoned_io()
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=clean_temporaries,
                # The step's directories are made in save() itself, so that a directory that
                # cannot be written fails there. Made in the background (orbax's default),
                # the failure left the save's other threads waiting for a "directories made"
                # signal that never came, and Python waited for them at exit: a hang.
                async_options=ocp.AsyncOptions(create_directories_asynchronously=False)),
            item_names=("params", "train", "meta"),
        )
        self._in_flight = None  # the step whose save may still be running in the background
        self._failure = None  # the CheckpointWriteError once a save has failed

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def meta(self, step: int | None = None) -> dict:
        """The record saved beside a step's arrays (default: newest), without reading them."""
        return _read_meta(self._manager, self.latest_step() if step is None else step)

    def save(self, step: int, train_state, meta: dict) -> None:
        """Start saving `step` (the writes go on in the background); CheckpointWriteError if
        this save, or the one before still in flight, cannot be written."""
        ocp = _ocp()
        params, rest = _split(train_state)
        checksums = {"params": tree_checksums(params), "train": tree_checksums(rest)}
        dtypes = {"params": tree_dtypes(params), "train": tree_dtypes(rest)}
        self._guarded(lambda: self._manager.wait_until_finished())
        self._in_flight = step
        self._guarded(lambda: self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            train=ocp.args.StandardSave(rest),
            meta=ocp.args.JsonSave({**self._meta, **meta, "step": int(step),
                                    "checksum_format": CHECKSUM_FORMAT,
                                    "checksums": checksums, "checksum_dtypes": dtypes}),
        )))

    _meta: dict = {}

    def save_model_config(self, model_config: ModelConfig, tokenizer: str,
                          run_shape: dict | None = None) -> None:
        """What every later save records beside the arrays (run_shape: trainer.run_shape)."""
        self._meta = {"model_config": model_config.to_dict(), "tokenizer": tokenizer,
                      "format": "rwkv_jax/1", **({"run_shape": run_shape} if run_shape else {})}

    def restore(self, template, step: int | None = None):
        """(train_state, meta) of `step` (default: newest), shaped and sharded like `template`;
        DamagedCheckpointError if an array differs from its recorded checksum."""
        ocp = _ocp()
        _quiet_abandoned_io()
        step = self.latest_step() if step is None else step
        params, rest = _split(template)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(params)),
                train=ocp.args.StandardRestore(_abstract(rest)),
                meta=ocp.args.JsonRestore(),
            ))
        except Exception as e:  # noqa: BLE001 - damaged, or another tree than the template's
            damage = _damage(e, step, self.directory)
            if damage is None:
                raise
            raise damage from None
        for item in ("params", "train"):
            _verify(out[item], out["meta"], item, step, self.directory)
        return template.replace(params=out["params"], **out["train"]), out["meta"]

    def set_aside(self, step: int) -> str:
        """Rename a step's directory out of orbax's sight (`<step>.damaged`, kept for a look),
        so that the run can write that step again; returns the new path."""
        import jax  # noqa: PLC0415

        src = os.path.join(self.directory, str(step))
        dst, n = f"{src}.damaged", 1
        while os.path.exists(dst):
            dst, n = f"{src}.damaged{n}", n + 1
        if jax.process_index() == 0:
            os.rename(src, dst)
        if jax.process_count() > 1:  # the others list the steps once it is gone
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices(f"rwkv_jax set aside step {step}")
        self._manager.reload()
        return dst

    def wait(self) -> None:
        self._guarded(lambda: self._manager.wait_until_finished())

    def close(self) -> None:
        if self._failure is not None:  # reported once; orbax would raise it again
            return
        self._guarded(lambda: self._manager.close())

    def _guarded(self, call) -> None:
        """`call()`, with a failed write turned into CheckpointWriteError: one line naming the
        step, the directory and the cause, after the step's temporary is removed."""
        if self._failure is not None:
            raise self._failure
        try:
            call()
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds
            cause = _write_failure(e)
            if cause is None:
                raise
            self._failure = self._write_error(cause)
            raise self._failure from None

    def _write_error(self, cause: str) -> CheckpointWriteError:
        import jax  # noqa: PLC0415

        step = self._in_flight
        if jax.process_index() == 0:  # one process removes what all wrote into
            _join_orbax_threads(timeout=30.0)
            tmp = _ocp().path.atomicity_types.TMP_DIR_SUFFIX
            for name in os.listdir(self.directory) if os.path.isdir(self.directory) else ():
                if name.startswith(f"{step}{tmp}"):
                    import shutil  # noqa: PLC0415

                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        kept = sorted(s for s in self.all_steps() if s != step)
        return CheckpointWriteError(
            f"cannot write the checkpoint of step {step} in {self.directory}: {cause}. "
            + (f"The checkpoints of steps {kept} are kept: make room there (space or inodes, or make it "
               f"writable) and the same command resumes from step {kept[-1]}." if kept else
               "No earlier checkpoint is there: make room (space or inodes, or make it writable) and run "
               "again."))


def _join_orbax_threads(timeout: float) -> None:
    """Wait (up to `timeout` s in all) for orbax's save threads that are still running after
    one of them failed, so that none writes into the temporary once it is removed."""
    import threading  # noqa: PLC0415
    import time  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t is not threading.current_thread() and type(t).__module__.startswith("orbax."):
            # Thread's own join: orbax's raises the thread's exception, reported already.
            threading.Thread.join(t, max(0.0, deadline - time.monotonic()))


def _split(train_state):
    rest = {f: getattr(train_state, f) for f in ("step", "opt_state", "carry", "loss_scale", "good_steps")}
    return train_state.params, rest


def find_checkpoint_dir(path: str | os.PathLike) -> str:
    """A run directory (holding checkpoints/) or the checkpoints directory itself."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path!r}")
    return path


def _read_meta(manager, step: int) -> dict:
    """The JSON record an orbax manager of ours holds beside a step's arrays."""
    ocp = _ocp()
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def model_config_of(meta: dict) -> ModelConfig:
    """The ModelConfig a checkpoint's record holds (fields added since it was written take
    their defaults); KeyError, TypeError or ValueError if it holds none that is valid."""
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in meta["model_config"].items()})


def restore_params(path: str | os.PathLike, step: int | None = None,
                   shardings=None) -> tuple[ModelConfig, dict, dict]:
    """(model_config, params, meta) from a training checkpoint, without the optimizer state.

    `shardings`: a tree of jax.sharding.Sharding like the params (default: one local device).
    DamagedCheckpointError (a ValueError) if an array differs from its recorded checksum.
    """
    import jax  # noqa: PLC0415

    from rwkv_jax.model import param_shapes  # noqa: PLC0415

    ocp = _ocp()
    _quiet_abandoned_io()
    directory = find_checkpoint_dir(path)
    manager = ocp.CheckpointManager(directory, item_names=("params", "train", "meta"))
    steps = list(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"{directory!r} holds no complete checkpoint")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {directory!r}; steps there: {sorted(steps)}")
    try:
        meta = _read_meta(manager, step)
        config = model_config_of(meta)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        raise ValueError(f"checkpoint {directory!r} step {step} has no readable model record: {e}") from None
    # Restore onto this process's first device whatever topology wrote the checkpoint (orbax
    # needs target shardings once the writer's differ); pass `shardings` to place it otherwise.
    abstract = param_shapes(config)
    if shardings is None:
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: here, abstract)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, shardings)
    try:
        params = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract)))["params"]
    except Exception as e:  # noqa: BLE001 - orbax reports a mismatch or corruption in many ways
        raise _damage(e, step, directory) or ValueError(
            f"checkpoint {directory!r} step {step} could not be restored as the model it records "
            f"({cause_line(e)})") from None
    manager.close()
    _verify(params, meta, "params", step, directory)
    check_finite_params(params, f"checkpoint {directory!r} step {step}")
    return config, params, meta


def _finite_leaves(xs):
    import jax.numpy as jnp  # noqa: PLC0415

    return jnp.stack([jnp.isfinite(x).all() for x in xs])


def check_finite_params(params, where: str) -> None:
    """ValueError naming the first array of `params` that holds a NaN or Inf. One jitted
    reduction on the devices that hold the arrays (nothing is copied to the host)."""
    import jax  # noqa: PLC0415

    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not leaves:
        return
    finite = jax.jit(_finite_leaves)([x for _, x in leaves])
    bad = [jax.tree_util.keystr(k) for (k, _), ok in zip(leaves, np.asarray(finite)) if not ok]
    if bad:
        raise ValueError(f"{where}: params{bad[0]} holds NaN or Inf values"
                         + (f" (and {len(bad) - 1} more arrays)" if len(bad) > 1 else "")
                         + ": it was saved from a run that diverged, or is damaged")
