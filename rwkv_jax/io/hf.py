"""Hugging Face model folders in and out: transformers' `RwkvForCausalLM` (RWKV-4, model_type
"rwkv") and fla-hub's RWKV-7 layout (model_type "rwkv7", run by fla's and rwkv7-hf's
RWKV7ForCausalLM).

Both hold the official tensors under other names: RWKV-4 `rwkv.blocks.N.attention.time_mix_key`
for `blocks.N.att.time_mix_k` (the shapes are the official ones); RWKV-7
`model.layers.N.attn.r_proj.weight` for `blocks.N.att.receptance.weight`, the LoRA factors as
torch Linears (`w_lora.lora.0.weight` is w1 transposed, `lora.2.weight` w2 transposed,
`lora.2.bias` w0), k_k, k_a and ffn.x_k as (C,). A folder is read by renaming it to the
official state dict and reading that (io.official), so its dimensions, shape checks and errors
are the official import's, and import after export gives back the same bits. Reading
safetensors needs no torch (safetensors' flax API reads bfloat16 too); only a
pytorch_model.bin needs it.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections.abc import Mapping

import numpy as np

from rwkv_jax.config import ModelConfig
from rwkv_jax.config.layer_pattern import LayerKind
from rwkv_jax.io.official import load_official_state_dict, official_layout, official_params

MODEL_TYPES = {"rwkv": "4", "rwkv7": "7"}  # config.json's model_type -> our RWKV version
_WEIGHTS = "model.safetensors"
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


# RWKV-4, transformers: official name within a block -> its name under rwkv.blocks.N.
_HF4_PARTS = (("ln0.", "pre_ln."), ("att.", "attention."), ("ffn.", "feed_forward."))
_HF4_MIX = {"time_mix_k": "time_mix_key", "time_mix_v": "time_mix_value",
            "time_mix_r": "time_mix_receptance"}
_HF4_TOP = {"emb.weight": "rwkv.embeddings.weight", "ln_out.weight": "rwkv.ln_out.weight",
            "ln_out.bias": "rwkv.ln_out.bias", "head.weight": "head.weight"}

# RWKV-7, fla-hub: the same.
_HF7_PARTS = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm", "att": "attn", "ffn": "ffn"}
_HF7_ATT = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj",
            "ln_x": "g_norm"}
_HF7_LORA = {"1": ("lora.0.weight", "linear"), "2": ("lora.2.weight", "linear"),
             "0": ("lora.2.bias", "vector")}
_HF7_TOP = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
            "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
_UNUSED_FIRST7 = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")  # no layer-0 v_lora


def _hf4_name(name: str, kind: str) -> tuple[str, str]:
    if name in _HF4_TOP:
        return _HF4_TOP[name], kind
    i, rest = _BLOCK.match(name).groups()
    for old, new in _HF4_PARTS:
        rest = new + rest[len(old):] if rest.startswith(old) else rest
    part, _, leaf = rest.rpartition(".")
    return f"rwkv.blocks.{i}.{part}.{_HF4_MIX.get(leaf, leaf)}", kind


def _hf7_name(name: str, kind: str) -> tuple[str | None, str]:
    if name in _HF7_TOP:
        return _HF7_TOP[name], kind
    if name in _UNUSED_FIRST7:
        return None, kind
    i, rest = _BLOCK.match(name).groups()
    part, _, leaf = rest.partition(".")
    if part == "att" and re.fullmatch(r"[wavg][012]", leaf):
        sub, kind = _HF7_LORA[leaf[1]]
        leaf = f"{leaf[0]}_lora.{sub}"
    elif part == "att" and leaf.split(".")[0] in _HF7_ATT:
        head, _, tail = leaf.partition(".")
        leaf = f"{_HF7_ATT[head]}.{tail}"
    elif (part, leaf) in (("att", "k_k"), ("att", "k_a"), ("ffn", "x_k")):
        kind = "vector"  # fla keeps these as (C,), the official file as (1, 1, C)
    return f"model.layers.{i}.{_HF7_PARTS[part]}.{leaf}", kind


def hf_layout(n_layer: int, version: str) -> list[tuple[str, str, tuple, str, str]]:
    """(HF name, official name, our path, how HF stores it, how the official file stores it)
    of each tensor of an n_layer model: "linear" (out, in) (ours is (in, out)), "mix" (1, 1, C)
    (ours (C,)), "vector" and "table" as ours."""
    rename = _hf4_name if str(version) == "4" else _hf7_name
    out = []
    for name, ours, kind in official_layout(n_layer, str(version)):
        hf, hf_kind = rename(name, kind)
        if hf is not None:
            out.append((hf, name, ours, hf_kind, kind))
    return out


def _leaf(tree: Mapping, path: tuple):
    for p in path:
        tree = tree[p]
    return tree


def _stored(a: np.ndarray, kind: str) -> np.ndarray:
    """Ours -> as a file of this kind stores it."""
    if kind == "linear":
        return np.ascontiguousarray(a.T)
    return a.reshape(1, 1, -1) if kind == "mix" else a


def _ours(a: np.ndarray, kind: str) -> np.ndarray:
    """As a file of this kind stores it -> ours."""
    if kind == "linear":
        return np.ascontiguousarray(a.T)
    return a.reshape(-1) if kind == "mix" else a


def hf_model_type(path: str | os.PathLike) -> str | None:
    """config.json's model_type if `path` is a folder holding a Hugging Face config (one with a
    top-level model_type), else None: a run directory or a .pth is not such a folder."""
    cfg_path = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(cfg_path):
        return None
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    return kind if isinstance(kind, str) else None


def read_hf_config(path: str | os.PathLike) -> dict:
    """config.json of a Hugging Face RWKV folder (model_type "rwkv" or "rwkv7"); ValueError or
    FileNotFoundError in one line otherwise."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a folder; a Hugging Face model is a folder with "
                                "config.json and its weights")
    kind = hf_model_type(path)
    if kind is None:
        raise ValueError(f"{path!r} has no Hugging Face config.json (one naming its model_type)")
    if kind not in MODEL_TYPES:
        raise ValueError(f"{path!r} holds a {kind!r} model; read here: 'rwkv' (transformers' "
                         "RwkvForCausalLM, RWKV-4) and 'rwkv7' (fla-hub's RWKV-7)")
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        return json.load(f)


# The one group-norm epsilon of the official RWKV-7 (ln_x, nn.GroupNorm(H, C, eps=64e-5)); fla
# and rwkv7-hf use head_dim * norm_eps, the same only at head size 64 with norm_eps 1e-5.
_LN_X_EPS = 64e-5
_LN_EPS = 1e-5


def _misfits_hf(cfg: dict, version: str) -> list[str]:
    """What a folder's config says that our RWKV-4 / RWKV-7 cannot express."""
    C = cfg.get("hidden_size")
    eps = cfg.get("layer_norm_epsilon" if version == "4" else "norm_eps", _LN_EPS)
    bad = [(cfg.get("tie_word_embeddings", False), "tied input and output embeddings"),
           (not math.isclose(eps, _LN_EPS), f"layer-norm epsilon {eps} (ours: 1e-05)")]
    if version == "4":
        att = cfg.get("attention_hidden_size")
        bad.append((att not in (None, C), f"attention_hidden_size {att} != hidden_size {C}"))
        return [what for hit, what in bad if hit]
    head_dim = cfg.get("head_dim") or (C // cfg["num_heads"] if cfg.get("num_heads") else 64)
    value_dim = cfg.get("value_dim")
    bad += [(cfg.get("attn"), f"attention layers (a hybrid: attn {cfg.get('attn')})"),
            (cfg.get("norm_first") is False, "norm_first false (no pre_norm, our ln0)"),
            (cfg.get("norm_bias") is False, "layer norms without bias"),
            (cfg.get("hidden_act", "sqrelu") != "sqrelu", f"hidden_act {cfg.get('hidden_act')!r}"),
            (value_dim not in (None, C) and any(v != C for v in np.atleast_1d(value_dim)),
             f"value_dim {value_dim} != hidden_size {C}"),
            (not math.isclose(head_dim * eps, _LN_X_EPS),
             f"g_norm epsilon head_dim * norm_eps = {head_dim * eps:g} (ours: 64e-5, head size 64)")]
    return [what for hit, what in bad if hit]


def check_hf_export(config: ModelConfig) -> None:
    """ValueError in one line naming what of this model the Hugging Face layout of its version
    cannot hold."""
    layout = "transformers' RwkvForCausalLM" if config.version == "4" else "fla-hub's RWKV-7"
    bad = []
    if config.has_attention:
        bad.append(f"attention layers (layers {[i for i, t in enumerate(config.layer_types) if t == LayerKind.ATTN]})")
    if config.pos_emb != "none":
        bad.append(f"position embeddings (architecture.pos_emb={config.pos_emb!r})")
    if config.learned_init_state:
        bad.append("a learned initial state (export it with --export_state)")
    if not math.isclose(config.layer_norm_eps, _LN_EPS):
        bad.append(f"layer-norm epsilon {config.layer_norm_eps}")
    if config.version == "7" and config.head_size != 64:
        bad.append(f"head size {config.head_size} (its g_norm epsilon is 64e-5 only at head size 64)")
    if bad:
        raise ValueError(f"{layout} cannot hold this model's {'; '.join(bad)}")


def read_hf_tensors(path: str) -> dict[str, np.ndarray]:
    """The folder's tensors as float32 numpy arrays: every *.safetensors file (no torch needed),
    else pytorch_model*.bin (torch); each checked floating point and finite."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
        if not bins:
            raise FileNotFoundError(f"{path!r} holds no *.safetensors or pytorch_model.bin weights")
        out = {}
        for f in bins:  # torch.load with the official reader's checks (floating point, finite)
            out.update({k: v.float().numpy() for k, v in load_official_state_dict(f).items()})
        return out
    import jax  # noqa: PLC0415 - the flax API returns jax arrays: kept on the CPU
    from safetensors import safe_open  # noqa: PLC0415

    out = {}
    with jax.default_device(jax.devices("cpu")[0]):
        for f in files:
            with safe_open(f, framework="flax") as st:
                for k in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                    a = st.get_tensor(k)
                    if not np.issubdtype(a.dtype, np.floating) and a.dtype.name != "bfloat16":
                        raise ValueError(f"{f!r}: tensor {k!r} is {a.dtype}; weights are floating point")
                    out[k] = np.asarray(a.astype("float32"))
                    if not np.isfinite(out[k]).all():
                        raise ValueError(f"{f!r}: tensor {k!r} holds NaN or infinite values: the "
                                         "file is damaged, or was saved from a run that diverged")
    return out


def import_hf(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """Read a Hugging Face RWKV folder (transformers' RWKV-4, fla-hub's RWKV-7) into
    (model_config, params), the tree io.official.import_official returns."""
    path = os.fspath(path)
    where = repr(path)
    cfg = read_hf_config(path)
    version = MODEL_TYPES[cfg["model_type"]]
    bad = _misfits_hf(cfg, version)
    if bad:
        raise ValueError(f"{where}: rwkv_jax's RWKV-{version} cannot express its {'; '.join(bad)}")
    tensors = read_hf_tensors(path)
    n_layer = int(cfg.get("num_hidden_layers", 0))
    layout = hf_layout(n_layer, version)
    extra = sorted(set(tensors) - {hf for hf, *_ in layout})
    if extra:
        raise ValueError(f"{where} has tensors an RWKV-{version} model of {n_layer} layers "
                         f"(num_hidden_layers) does not have: {extra[:6]}"
                         + (f" and {len(extra) - 6} more" if len(extra) > 6 else ""))
    missing = [hf for hf, *_ in layout if hf not in tensors]
    if missing:
        raise ValueError(f"{where} lacks {missing[:6]}" + (f" and {len(missing) - 6} more"
                                                            if len(missing) > 6 else ""))
    sd = {name: _stored(_ours(tensors[hf], hf_kind), kind) for hf, name, _, hf_kind, kind in layout}
    if version == "7" and n_layer == 1:  # the v rank lives in layers >= 1 only: the config's
        C, d = int(cfg["hidden_size"]), int(cfg.get("v_low_rank_dim", 32))
        sd.update({"blocks.0.att.v1": np.zeros((C, d), np.float32),
                   "blocks.0.att.v2": np.zeros((d, C), np.float32)})
    return official_params(sd, where)


HF_DTYPES = ("float32", "bfloat16", "float16")


def hf_config(config: ModelConfig, dtype: str) -> dict:
    """config.json of the exported folder."""
    C, L = config.n_embd, config.n_layer
    common = {"vocab_size": config.vocab_size, "hidden_size": C, "num_hidden_layers": L,
              "intermediate_size": config.dim_ffn, "bos_token_id": 0, "eos_token_id": 0,
              "tie_word_embeddings": False, "use_cache": True, "torch_dtype": dtype}
    if config.version == "4":
        # rescale_every 0: transformers otherwise halves the residual every 6 layers at
        # inference (for float16's range), which moves the layer norms' inputs off ours.
        # context_length is only the length its CUDA kernel is built for; RWKV has no limit.
        return {"architectures": ["RwkvForCausalLM"], "model_type": "rwkv", **common,
                "attention_hidden_size": C, "context_length": 4096, "layer_norm_epsilon": _LN_EPS,
                "rescale_every": 0}
    return {"architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7", **common,
            "attn_mode": "chunk", "hidden_ratio": config.dim_ffn / C, "head_dim": config.head_size,
            "num_heads": config.n_head, "decay_low_rank_dim": config.dim_w_lora,
            "a_low_rank_dim": config.dim_a_lora, "v_low_rank_dim": config.dim_v_lora,
            "gate_low_rank_dim": config.dim_g_lora, "hidden_act": "sqrelu", "norm_first": True,
            "norm_bias": True, "norm_eps": _LN_EPS, "attn": None, "value_dim": [C] * L,
            "pad_token_id": 0}


def check_hf_dir(path: str | os.PathLike) -> str:
    """`path` if a Hugging Face folder can be written there (ValueError saying why not): a folder,
    or a new one in an existing writable folder."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path!r} is a file; a Hugging Face model is written as a folder")
    if not os.path.isdir(parent):
        raise ValueError(f"{path!r}: the directory {parent!r} does not exist")
    if not os.access(path if os.path.isdir(path) else parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path!r} is not writable")
    return path


def export_hf(params: Mapping, config: ModelConfig, path: str | os.PathLike,
              dtype: str = "float32") -> None:
    """Write params as a Hugging Face folder: RWKV-4 for transformers' RwkvForCausalLM, RWKV-7
    in fla-hub's layout; config.json and model.safetensors (`dtype`). Its tokenizer.json is
    data.hf_tokenizer.write_tokenizer's."""
    check_hf_export(config)
    if dtype not in HF_DTYPES:
        raise ValueError(f"export_hf dtype={dtype!r}: use one of {', '.join(HF_DTYPES)}")
    path = check_hf_dir(path)
    os.makedirs(path, exist_ok=True)
    tensors = {hf: _stored(np.asarray(_leaf(params, ours), np.float32), hf_kind)
               for hf, _, ours, hf_kind, _ in hf_layout(config.n_layer, config.version)}
    _save_safetensors(tensors, os.path.join(path, _WEIGHTS), dtype)
    _write_json(os.path.join(path, "config.json"), hf_config(config, dtype))


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _save_safetensors(tensors: dict, path: str, dtype: str) -> None:
    """safetensors' flax API (numpy's has no bfloat16), through a temporary file; the "pt"
    format mark is what transformers' from_pretrained reads safetensors by."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from safetensors.flax import save_file  # noqa: PLC0415

    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with jax.default_device(jax.devices("cpu")[0]):
            save_file({k: jnp.asarray(v, dtype) for k, v in tensors.items()}, tmp,
                      metadata={"format": "pt"})
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"writing {path!r} failed: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
