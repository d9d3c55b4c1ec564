"""The data path up to batches: text (text.py), tokenizers (tokenizers.py), token files
(tokens.py), and training batches and chunking (batches.py). Plain NumPy, no JAX."""

from rwkv_jax.data.batches import chunk_loss_masks, chunk_spans, get_batch, state_handoff
from rwkv_jax.data.text import DAMAGED_ARCHIVE, open_text_bytes, sample_path, text_stem
from rwkv_jax.data.tokenizers import (ByteTokenizer, HFTokenizer, Tokenizer, WorldTokenizer,
                                      get_tokenizer)
from rwkv_jax.data.tokens import TokenFile, check_token_ids, prepare_tokens

__all__ = [
    "DAMAGED_ARCHIVE", "ByteTokenizer", "HFTokenizer", "TokenFile", "Tokenizer", "WorldTokenizer",
    "check_token_ids", "chunk_loss_masks", "chunk_spans", "get_batch", "get_tokenizer",
    "open_text_bytes", "prepare_tokens", "sample_path", "state_handoff", "text_stem",
]
