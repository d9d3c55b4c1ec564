"""A `tokenizer.json` (Hugging Face `tokenizers`) that encodes text to our ids: bytes, or the
RWKV World vocabulary, so that `AutoTokenizer.from_pretrained(DIR)` works on a folder that
io.hf.export_hf wrote.

The World tokenizer (rwkv_jax.data.tokenizers) takes, at each position of the UTF-8 bytes, the
longest vocabulary entry that matches. `tokenizers` has that algorithm: WordPiece with an empty
continuation prefix is greedy longest-match-first over each pre-tokenized piece. Its cost is
quadratic in a piece's length, so the text is cut first, but only between two bytes that no
vocabulary entry holds side by side: no token can cross such a cut, so every token the whole-text
match picks lies inside one piece and the pieces give the same ids. (README.md's 6 KB cut into
pieces of at most 35 bytes; 200 KB of text encode in 0.3 s.) Bytes become characters by GPT-2's
byte-to-unicode map (`tokenizers`' ByteLevel) so that any byte sequence is a string.
"""

from __future__ import annotations

import json
import os
import shutil

from rwkv_jax.data.tokenizers import world_vocabulary

# The World vocabulary's id 0, which it does not list: the document separator RWKV's World
# models were trained with. As a special token, the literal text "<|endoftext|>" encodes to 0.
WORLD_EOS = "<|endoftext|>"


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode map (the one `tokenizers`' ByteLevel pre-tokenizer uses): the
    printable bytes stand for themselves, the others for chr(256 + n) in order."""
    keep = {*range(33, 127), *range(161, 173), *range(174, 256)}
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _char_class(byte_values, chars) -> str:
    return "[" + "".join(f"\\x{{{ord(chars[b]):x}}}" for b in sorted(byte_values)) + "]"


def _safe_cuts(tokens, chars) -> str:
    """A regex matching byte x (as its character) where the next byte y makes a pair (x, y) that
    no token holds: the piece ends after x. Bytes with the same set of followers share one
    alternative (about 200 alternatives for the World vocabulary)."""
    followers: dict[int, set] = {x: set() for x in range(256)}
    for t in tokens:
        for x, y in zip(t, t[1:]):
            followers[x].add(y)
    groups: dict[frozenset, list] = {}
    for x, ys in followers.items():
        groups.setdefault(frozenset(ys), []).append(x)
    return "|".join(_char_class(xs, chars) + (f"(?!{_char_class(ys, chars)})" if ys else "")
                    for ys, xs in groups.items())


def _byte_level(split: dict | None) -> dict:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False}
    if split is None:
        return byte_level
    return {"type": "Sequence", "pretokenizers": [byte_level, split]}


def _tokenizer_json(model: dict, pre_tokenizer: dict, added: list) -> dict:
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": pre_tokenizer, "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                        "use_regex": False},
            "model": model}


def byte_tokenizer_json() -> dict:
    """Bytes 0..255 as ids 0..255 (a BPE without merges: each byte character its own token)."""
    chars = _byte_chars()
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
             "ignore_merges": False, "vocab": {c: b for b, c in enumerate(chars)}, "merges": []}
    return _tokenizer_json(model, _byte_level(None), [])


def world_tokenizer_json() -> dict:
    """The World vocabulary (rwkv package's rwkv_vocab_v20230424) as greedy longest match."""
    tokens = world_vocabulary()
    chars = _byte_chars()
    vocab = {"".join(chars[b] for b in t): i for i, t in tokens.items()}
    vocab[WORLD_EOS] = 0
    split = {"type": "Split", "pattern": {"Regex": _safe_cuts(tokens.values(), chars)},
             "behavior": "MergedWithPrevious", "invert": False}
    model = {"type": "WordPiece", "unk_token": WORLD_EOS, "continuing_subword_prefix": "",
             "max_input_chars_per_word": 2**31 - 1, "vocab": vocab}
    added = [{"id": 0, "content": WORLD_EOS, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True}]
    return _tokenizer_json(model, _byte_level(split), added)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_tokenizer(directory: str, spec: str) -> None:
    """tokenizer.json and tokenizer_config.json for tokenizer `spec` ("byte", "world" or a
    tokenizers .json file, copied) in `directory`, each written whole or not at all."""
    special = {}
    if spec == "byte":
        body = byte_tokenizer_json()
    elif spec == "world":
        body, special = world_tokenizer_json(), {"eos_token": WORLD_EOS}
    elif str(spec).endswith(".json") and os.path.isfile(spec):
        body = None
    else:
        raise ValueError(f"tokenizer {spec!r}: a Hugging Face folder gets 'byte', 'world' or an "
                         "existing tokenizers .json")
    target = os.path.join(directory, "tokenizer.json")
    if body is None:
        shutil.copyfile(spec, target + ".tmp")
        os.replace(target + ".tmp", target)
    else:
        write_json(target, body, indent=None)
    # The generic fast tokenizer: a model-specific class (RWKV-4's is GPT-NeoX's) would build
    # its own pipeline instead of this file's.
    write_json(os.path.join(directory, "tokenizer_config.json"),
               {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                "add_bos_token": False, "add_eos_token": False, **special})


def write_json(path: str, obj, indent: int | None = 2) -> None:
    """json.dump to `path` through a temporary file beside it, so a reader never sees half."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, ensure_ascii=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
