"""RWKV-4 blocks for one token of one or two rows as one CUDA kernel (decode4_block.cuh),
through the XLA FFI: the batch-1 decode step on Hopper GPUs (sm_90).

decode4_block.cuh says how the kernel works and why. Here: building it (nvcc, on first use,
into a cache keyed by the sources, the GPU's architecture and the jax version), registering it
with XLA, the vector table it reads, `layers_step`, which rwkv_jax.generate.decode_weights.decode_forward
calls for each run of consecutive RWKV-4 blocks on a decode step, and `block_step`, the same for
one block (as rwkv_jax.nn.rwkv4.RWKVBlock on its own). Anything that stops it (no GPU, an older GPU, no nvcc,
weights that are not bf16) raises `Unavailable` with the reason, before any work.

It is faster than XLA's products at batch 1 and 2 (figures in docs/performance.md and
bench/README.md). infer.py takes it by itself where it runs (--decode_kernels auto;
rwkv_jax.generate.decode_weights.choose_decode_kernels); rwkv_jax.generate only when asked: a generator
serves one weight layout, and batch 16 on this one runs XLA's products at half their speed.

The kernel keeps its exchange buffers and launch counters in the library's device memory, so
its launches on one device must not overlap: JAX runs a device's computations on one stream.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).parent
SOURCES = ("decode4_ffi.cu", "decode4_block.cuh", "bulk_copy.cuh")
TARGET = "rwkv4_cuda_decode_layers"
MAX_ROWS = 2  # the kernel is built for 1 and 2 rows
MAX_LAYERS = 40  # layers in one launch (kMaxLayers: its table is the kernel's parameter)
MAX_C = 16 * 32 * 6  # kMaxC: 16 norm elements per consumer thread, 6 consumer warps
MAX_F = 4 * MAX_C
STATE = ("shift_att", "aa", "bb", "pp", "shift_ffn")
# The rows of the kernel's per-channel table, in the order of its `Vec` enum.
VECS = ("LN1_SCALE", "LN1_BIAS", "MIX_K", "MIX_V", "MIX_R", "DECAY", "FIRST", "LN2_SCALE",
        "LN2_BIAS", "FMIX_K", "FMIX_R")


class Unavailable(RuntimeError):
    """The CUDA decode kernel cannot run here; the message says why."""


def kernel_vec_names() -> tuple[str, ...]:
    """The `Vec` enum of decode4_block.cuh, read from the source (VECS must match it)."""
    text = (HERE / "decode4_block.cuh").read_text()
    body = re.search(r"enum Vec \{([^}]*)\}", text).group(1)
    return tuple(n.strip() for n in body.split(",") if n.strip() and n.strip() != "NVEC")


def _nvcc() -> str:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in ((Path(home) / "bin" / "nvcc") if home else None, shutil.which("nvcc"),
                 "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).is_file():
            return str(cand)
    raise Unavailable("the CUDA decode kernel is built on first use and needs nvcc (CUDA's "
                      "compiler): none in $CUDA_HOME/bin, on PATH or in /usr/local/cuda/bin")


def cache_dir() -> Path:
    root = os.environ.get("RWKV_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rwkv_jax")
    return Path(root) / "cuda"


def check_device() -> str:
    """The GPU's architecture ("90"), or Unavailable if JAX has none this kernel runs on."""
    if jax.default_backend() != "gpu":
        raise Unavailable(f"the CUDA decode kernel needs an NVIDIA GPU; JAX's backend here is "
                          f"{jax.default_backend()!r}")
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None)
    if cc is None:
        raise Unavailable(f"the CUDA decode kernel needs an NVIDIA GPU; the device is "
                          f"{dev.device_kind!r}")
    major, minor = (int(v) for v in str(cc).split(".")[:2])
    if major != 9:
        # Bulk copies into shared memory need 9.0; later GPUs differ in shared memory (those of
        # compute capability 12 have 99 KB a block, too little for the ring), and the kernel is
        # built and tuned for Hopper alone.
        raise Unavailable(f"the CUDA decode kernel runs on Hopper GPUs (compute capability "
                          f"9.x); {dev.device_kind} has {cc}")
    return f"{major}{minor}"


def check_available() -> None:
    """Raise Unavailable unless this machine can build and run the kernel (a GPU of compute
    capability 9.0 or newer, nvcc); cheap: builds nothing."""
    check_device()
    _nvcc()


def build() -> Path:
    """The shared library for this GPU, compiled if the cache lacks it."""
    arch = check_device()
    include = jax.ffi.include_dir()
    digest = hashlib.sha256(f"{arch} {jax.__version__} {include}".encode())
    for name in SOURCES:
        digest.update((HERE / name).read_bytes())
    lib = cache_dir() / f"decode4-sm{arch}-{digest.hexdigest()[:16]}.so"
    if lib.is_file():
        return lib
    nvcc = _nvcc()
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    # -diag-suppress / -Wno-return-type: warnings from XLA's FFI headers, not from the kernel.
    cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-Wno-return-type",
           "-diag-suppress", "940,2473", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-I",
           include,
           str(HERE / SOURCES[0]), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise Unavailable(f"building the CUDA decode kernel failed ({' '.join(cmd)}):\n"
                              f"{done.stderr[-2000:]}")
        os.replace(tmp, lib)  # atomic: a concurrent build finds a whole file or none
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return lib


@functools.cache
def _register() -> None:
    lib = ctypes.cdll.LoadLibrary(str(build()))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.RwkvDecode4Layers), platform="CUDA")


def ensure() -> None:
    """Build and register the kernel, or raise Unavailable saying why not."""
    _register()


# ----------------------------------------------------------------------------- layout


def pack_vectors(block: dict) -> jax.Array:
    """(len(VECS), C) float32: a kernel-layout block's per-channel vectors, in VECS's order."""
    att, ffn = block["att"], block["ffn"]
    rows = {"LN1_SCALE": block["ln1"]["scale"], "LN1_BIAS": block["ln1"]["bias"],
            "MIX_K": att["time_mix_k"], "MIX_V": att["time_mix_v"], "MIX_R": att["time_mix_r"],
            "DECAY": -jnp.exp(jnp.asarray(att["time_decay"], jnp.float32)),
            "FIRST": att["time_first"], "LN2_SCALE": block["ln2"]["scale"],
            "LN2_BIAS": block["ln2"]["bias"], "FMIX_K": ffn["time_mix_k"],
            "FMIX_R": ffn["time_mix_r"]}
    return jnp.stack([jnp.asarray(rows[n], jnp.float32).reshape(-1) for n in VECS])


# The kernel's shared memory (decode4_block.cuh, make_plan): a ring of at least a stage per
# consumer warp (6) of whole rows (up to 4 rows, 20 KB) beside the staged inputs, within
# sm_90's 227 KB a block.
SMEM_OPTIN = 232448
RING_STAGES, STAGE_BYTES, STAGE_ROWS = 6, 20480, 4
NARROW_C, NARROW_STAGE_ROWS = 768, 3  # stage_rows_cap: up to this n_embd, stages of 3 rows


def fits(C: int, F: int, rows: int) -> bool:
    """Whether the kernel's shared memory holds a block of these sizes for `rows` rows."""
    def stage(K):
        cap = NARROW_STAGE_ROWS if C <= NARROW_C else STAGE_ROWS
        return max(1, min(cap, STAGE_BYTES // (2 * K))) * 2 * K

    slot = (max(stage(C), stage(F)) + 127) // 128 * 128
    if C % 8 or F % 8 or not 8 <= C <= MAX_C or not 8 <= F <= MAX_F:
        return False
    cpc = C // 64 + 2  # channels per CTA, bounded for GPUs of 64 SMs or more
    fixed = 2 * rows * max(3 * C, F) + 4 * (13 * cpc * rows + 2) + 16
    return RING_STAGES * (slot + 16) <= SMEM_OPTIN - 1024 - fixed


def check_block(block: dict) -> None:
    """Raise Unavailable unless a kernel-layout block (rwkv_jax.generate.decode_weights.kernel_layout) suits the
    kernel."""
    att, ffn = block["att"], block["ffn"]
    C = att["output_t"].shape[0]
    F = ffn["value_t"].shape[1]
    for name, w in (("kvr_t", att["kvr_t"]), ("output_t", att["output_t"]),
                    ("kr_t", ffn["kr_t"]), ("value_t", ffn["value_t"])):
        if w.dtype != jnp.bfloat16:
            raise Unavailable(f"the CUDA decode kernel reads bf16 matrices; {name} is {w.dtype} "
                              f"(decode in bfloat16: infer.py --bf16, Generator(bf16=True))")
    if C % 8 or F % 8 or not 8 <= C <= MAX_C or not 8 <= F <= MAX_F:
        raise Unavailable(f"the CUDA decode kernel needs n_embd and the ffn width to be "
                          f"multiples of 8, at most {MAX_C} and {MAX_F}; they are {C} and {F}")
    if not fits(C, F, 1):
        raise Unavailable(f"the CUDA decode kernel's shared memory cannot hold a block of "
                          f"n_embd {C} and ffn width {F} (a ring of {RING_STAGES} stages of whole "
                          f"rows of {2 * F} bytes beside its inputs; 3B, n_embd 2560 and ffn "
                          f"10240, fits)")


# ----------------------------------------------------------------------------- the step


def layers_step(blocks, x, states, *, eps: float):
    """A run of RWKV-4 blocks for one token per row, as one kernel launch per MAX_LAYERS:
    x (B, C) (after ln0 if the run starts at block 0) and each block's state -> (x, states).
    blocks: the blocks' params in the kernel layout plus "decode_vecs" (pack_vectors).

    The call updates x and the states in place (input_output_aliases), so a decode loop that
    carries them needs no copies; the kernel streams straight across the blocks' boundaries."""
    B, C = x.shape
    if not 1 <= B <= MAX_ROWS:
        raise ValueError(f"the CUDA decode kernel takes 1..{MAX_ROWS} rows, got {B}")
    if len(blocks) != len(states) or not blocks:
        raise ValueError(f"layers_step needs a state for each of its blocks; got {len(blocks)} "
                         f"blocks and {len(states)} states")
    ensure()
    x = x.astype(jnp.float32)
    states = [dict(st) for st in states]
    f32 = jax.ShapeDtypeStruct((B, C), jnp.float32)
    for start in range(0, len(blocks), MAX_LAYERS):
        run = range(start, min(start + MAX_LAYERS, len(blocks)))
        operands = [x]
        for i in run:
            att, ffn = blocks[i]["att"], blocks[i]["ffn"]
            operands += [states[i][k].astype(jnp.float32) for k in STATE]
            operands += [blocks[i]["decode_vecs"], att["kvr_t"].reshape(3 * C, C),
                         att["output_t"], ffn["kr_t"], ffn["value_t"]]
        # Operand 1 + 10j + k is result 1 + 5j + k: layer j's state k; x is 0 and 0.
        aliases = {0: 0}
        aliases.update({1 + 10 * j + k: 1 + 5 * j + k for j in range(len(run)) for k in range(5)})
        out = jax.ffi.ffi_call(TARGET, [f32] * (1 + 5 * len(run)),
                               input_output_aliases=aliases)(*operands, eps=np.float32(eps))
        x = out[0]
        for j, i in enumerate(run):
            states[i] = dict(zip(STATE, out[1 + 5 * j:6 + 5 * j]))
    return x, states


def block_step(p: dict, x, state: dict, *, eps: float):
    """One RWKV-4 block for one token per row: x (B, C) float32 (after ln0 in block 0) and the
    layer's state -> (x, state), as rwkv_jax.nn.rwkv4.RWKVBlock gives them. p: the block in the
    kernel layout plus "decode_vecs" (pack_vectors)."""
    x, (state,) = layers_step([p], x, [state], eps=eps)
    return x, state
