"""The data path up to batches: text (text.py), tokenizers (tokenizers.py), token caches
(tokens.py), RWKV-LM's binidx (binidx.py) and sample order (rwkv_lm.py), jsonl documents with
loss masks (jsonl.py), what a config's data files are and the batches drawn from them
(sources.py), windows and chunking (batches.py). Plain NumPy, no JAX."""

from rwkv_jax.data.batches import chunk_loss_masks, chunk_spans, get_batch, state_handoff
from rwkv_jax.data.binidx import BinIdx, binidx_prefix, write_binidx
from rwkv_jax.data.jsonl import DocumentFile, prepare_jsonl, record_segments, render_chat
from rwkv_jax.data.rwkv_lm import magic_prime, rwkv_lm_batch
from rwkv_jax.data.sources import Batches, open_source, open_sources
from rwkv_jax.data.text import DAMAGED_ARCHIVE, open_text_bytes, sample_path, text_stem
from rwkv_jax.data.tokenizers import (ByteTokenizer, HFTokenizer, Tokenizer, WorldTokenizer,
                                      get_tokenizer)
from rwkv_jax.data.tokens import TokenFile, check_token_ids, prepare_tokens

__all__ = [
    "DAMAGED_ARCHIVE", "Batches", "BinIdx", "ByteTokenizer", "DocumentFile", "HFTokenizer",
    "TokenFile", "Tokenizer", "WorldTokenizer", "binidx_prefix", "check_token_ids",
    "chunk_loss_masks", "chunk_spans", "get_batch", "get_tokenizer", "magic_prime",
    "open_source", "open_sources", "open_text_bytes", "prepare_jsonl", "prepare_tokens",
    "record_segments", "render_chat", "rwkv_lm_batch", "sample_path", "state_handoff",
    "text_stem", "write_binidx",
]
