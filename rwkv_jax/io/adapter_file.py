"""Adapters on disk as RWKV-PEFT keeps them, so its merge scripts and ours read each other's.

A LoRA or PiSSA file is a torch state dict: `<module>.lora_A` (r, in) and `<module>.lora_B`
(out, r) for each adapted projection under its official name (`blocks.0.att.key`), and the
parameters trained whole under theirs (`blocks.0.ln1.weight`). RWKV-PEFT takes alpha on its
merge command line, not from the file; we record it in a 0-d entry, `lora_alpha`, whose name
its merge scripts pass by (they keep only keys without "lora"). PiSSA's merge also needs the
factors the run started from: written beside, `<stem>.pissa_init.pth`, with RWKV-PEFT's
`<module>.init_lora_A` / `.init_lora_B`; the file records `lora_pissa` (PiSSA scales by 1).
RWKV-PEFT's own PiSSA output records nothing: its init_pissa.pth is named by the reader.
"""

from __future__ import annotations

import os

import numpy as np

from rwkv_jax.config import ModelConfig
from rwkv_jax.io.official import (
    check_export_path,
    from_official,
    import_torch,
    load_official_state_dict,
    official_layout,
    save_state_dict,
    to_official,
)
from rwkv_jax.nn import adapters as ad

ALPHA, PISSA = "lora_alpha", "lora_pissa"


def init_path(path: str | os.PathLike) -> str:
    """Where PiSSA's initial factors go beside the adapter file `path`."""
    stem, _ = os.path.splitext(os.fspath(path))
    return f"{stem}.pissa_init.pth"


def _names(config: ModelConfig) -> dict:
    """Our leaf path -> (official name, how it is stored), for this model's layout."""
    return {ours: (name, kind) for name, ours, kind in
            official_layout(config.n_layer, config.version)}


def export_adapter(trainable: dict, spec: ad.AdapterSpec, config: ModelConfig,
                   path: str | os.PathLike) -> list[str]:
    """Write the adapters (and PiSSA's initial factors beside); returns the paths written."""
    torch = import_torch()
    path = check_export_path(path)
    names = _names(config)

    def name_of(leaf: tuple) -> tuple[str, str]:
        if leaf not in names:
            raise ValueError(f"export_adapter: {'/'.join(leaf)} has no name in RWKV-PEFT's "
                             f"layout (the official one has no attention layers, position "
                             f"table or learned state)")
        return names[leaf]

    sd = {}
    for d, f in ad.adapted(trainable.get(ad.LORA, {})):
        prefix = name_of(d + ("kernel",))[0].removesuffix(".weight")
        for part in ("lora_A", "lora_B"):
            sd[f"{prefix}.{part}"] = torch.from_numpy(np.array(f[part], np.float32))
    for leaf, value in ad.leaf_paths(trainable.get(ad.TUNED, {})):
        name, kind = name_of(leaf)
        sd[name] = to_official(np.asarray(value), kind, torch, torch.float32)
    written = [path]
    inits = trainable.get(ad.PISSA_INIT)
    if not inits:
        sd[ALPHA] = torch.tensor(float(spec.alpha))
        if os.path.exists(init_path(path)):  # an earlier PiSSA export's: not this file's
            os.remove(init_path(path))
    else:
        sd[PISSA] = torch.tensor(1.0)
        init_sd = {}
        for d, f in ad.adapted(inits, "init_lora_A"):
            prefix = name_of(d + ("kernel",))[0].removesuffix(".weight")
            for part in ("init_lora_A", "init_lora_B"):
                init_sd[f"{prefix}.{part}"] = torch.from_numpy(np.array(f[part], np.float32))
        save_state_dict(init_sd, init_path(path), torch)
        written.append(init_path(path))
    save_state_dict(sd, path, torch)
    return written


def read_adapter(path: str | os.PathLike, config: ModelConfig, params: dict,
                 alpha: float | None = None, rank: int | None = None,
                 pissa_init: str | None = None) -> tuple[dict, ad.AdapterSpec]:
    """(trainable tree, spec) of an adapter file for the model `config` with weights (or
    shapes) `params`; ValueError in one line for a file of another model, version or rank.
    alpha: where the file records none (RWKV-PEFT's own; one the file records must agree).
    pissa_init: PiSSA's initial factors (RWKV-PEFT's init_pissa.pth; default for a file that
    records lora_pissa: `<stem>.pissa_init.pth` beside it)."""
    path = os.fspath(path)
    sd = load_official_state_dict(path)
    recorded = _scalar(path, ALPHA, sd.pop(ALPHA, None))
    if recorded is not None and alpha is not None and recorded != alpha:
        raise ValueError(f"{path!r} records lora_alpha={recorded:g}, but {alpha:g} was given")
    alpha = recorded if recorded is not None else alpha
    pissa = _scalar(path, PISSA, sd.pop(PISSA, None)) is not None
    by_name = {name: (ours, kind) for ours, (name, kind) in _names(config).items()}
    what = f"this RWKV-{config.version} model ({config.n_layer} layers, n_embd {config.n_embd})"
    out = {ad.LORA: {}, ad.TUNED: {}}
    ranks = set()
    for key, t in sd.items():
        module, _, part = key.rpartition(".")
        if part in ("lora_A", "lora_B"):
            ours = by_name.get(f"{module}.weight", (None,))[0]
            if ours is None or ours[-1] != "kernel":
                raise ValueError(f"{path!r}: {key} adapts a projection {what} does not have")
            kin, kout = np.shape(ad.get_path(params, ours))
            a = from_official(t, "table")
            if a.ndim != 2:
                raise ValueError(f"{path!r}: {key} has shape {tuple(a.shape)}; an adapter factor "
                                 f"is a matrix")
            r = a.shape[0] if part == "lora_A" else a.shape[1]
            want = (r, kin) if part == "lora_A" else (kout, r)
            if a.shape != want:
                raise ValueError(f"{path!r}: {key} has shape {tuple(a.shape)}, but {what} "
                                 f"needs {want} there")
            ranks.add(r)
            ad.set_path(out[ad.LORA], ours[:-1] + (part,), a)
        elif key in by_name:
            ours, kind = by_name[key]
            value = from_official(t, kind)
            if value.shape != np.shape(ad.get_path(params, ours)):
                raise ValueError(f"{path!r}: {key} has shape {tuple(t.shape)}, which {what} "
                                 f"does not")
            ad.set_path(out[ad.TUNED], ours, value)
        else:
            raise ValueError(f"{path!r}: {key!r} is no adapter or parameter of {what}")
    _check_pairs(path, out[ad.LORA])
    if len(ranks) > 1:
        raise ValueError(f"{path!r} mixes adapter ranks {sorted(ranks)}")
    if rank is not None and ranks and ranks != {rank}:
        raise ValueError(f"{path!r} holds rank-{min(ranks)} adapters, but train.lora.rank={rank}")
    r = ranks.pop() if ranks else (rank or 1)
    if pissa and not pissa_init:
        pissa_init = init_path(path)
        if not os.path.isfile(pissa_init):
            raise ValueError(f"{path!r} holds PiSSA adapters, whose initial factors are not "
                             f"beside it ({pissa_init}): name them (infer.py --adapter_init)")
    if pissa_init:  # PiSSA: its factors carry the scale
        out[ad.PISSA_INIT] = _read_inits(pissa_init, out[ad.LORA], by_name)
        return out, ad.AdapterSpec("pissa", r, float(r))
    if alpha is None:
        raise ValueError(f"{path!r} records no lora_alpha (RWKV-PEFT keeps it on its merge "
                         f"command line): pass it (infer.py --adapter_alpha); a PiSSA file of "
                         f"RWKV-PEFT's needs its init_pissa.pth (--adapter_init)")
    return out, ad.AdapterSpec("lora", r, float(alpha))


def _scalar(path: str, name: str, t) -> float | None:
    """A metadata entry's value: one finite number > 0, or ValueError naming it."""
    if t is None:
        return None
    value = float(t.reshape(-1)[0]) if t.numel() == 1 else float("nan")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{path!r}: {name} must be one number > 0, got a tensor of shape "
                         f"{tuple(t.shape)}" + (f" holding {value:g}" if t.numel() == 1 else ""))
    return value


def _check_pairs(path: str, lora: dict) -> None:
    for p, _ in ad.leaf_paths(lora):
        other = "lora_B" if p[-1] == "lora_A" else "lora_A"
        try:
            ad.get_path(lora, p[:-1] + (other,))
        except KeyError:
            raise ValueError(f"{path!r}: {'.'.join(p)} has no {other} beside it") from None


def _read_inits(path: str, lora: dict, by_name: dict) -> dict:
    sd = load_official_state_dict(path)
    out = {}
    for d, f in ad.adapted(lora):
        name = next(n for n, (ours, _) in by_name.items() if ours == d + ("kernel",))
        prefix = name.removesuffix(".weight")
        try:
            a, b = (from_official(sd[f"{prefix}.{p}"], "table") for p in ("init_lora_A", "init_lora_B"))
        except KeyError:
            raise ValueError(f"{path!r} holds no initial factors for {prefix}") from None
        if a.shape != f["lora_A"].shape or b.shape != f["lora_B"].shape:
            raise ValueError(f"{path!r}: the initial factors of {prefix} have shapes "
                             f"{a.shape}, {b.shape}; the adapters' are "
                             f"{f['lora_A'].shape}, {f['lora_B'].shape}")
        ad.set_path(out, d, {"init_lora_A": a, "init_lora_B": b})
    return out
