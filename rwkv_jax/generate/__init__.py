"""Generation: the Generator (generator.py) over decode weights (decode_weights.py), its jitted
prefill and decode blocks (decode_loop.py), sampling (sampling.py), prompts and text (text.py),
and Sessions that keep a state between calls (session.py)."""

from rwkv_jax.generate.decode_loop import inference_params
from rwkv_jax.generate.decode_weights import (DecodeWeights, choose_decode_kernels, decode_forward,
                                              pack_for_decode)
from rwkv_jax.generate.generator import Generation, Generator
from rwkv_jax.generate.sampling import GREEDY, Sampling
from rwkv_jax.generate.session import Session
from rwkv_jax.generate.text import check_options, encode_prompt, run_seeds

__all__ = [
    "GREEDY", "DecodeWeights", "Generation", "Generator", "Sampling", "Session", "check_options",
    "choose_decode_kernels", "decode_forward", "encode_prompt", "inference_params",
    "pack_for_decode", "run_seeds",
]
