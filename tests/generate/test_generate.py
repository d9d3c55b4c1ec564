"""Generation: prefill forms agree, ragged batches equal rows alone, seeds, stops, penalties,
sampling, streaming, scoring and sessions."""

from __future__ import annotations

import dataclasses
import re
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import perturbed

from rwkv_jax.config import ModelConfig
from rwkv_jax.data import ByteTokenizer
from rwkv_jax.generate import GREEDY, Generator, Sampling, Session
from rwkv_jax.generate.sampling import DecodeCarry, advance, draw
from rwkv_jax.generate.text import TextTail
from rwkv_jax.nn.model import RWKV, init_params, initial_state
from rwkv_jax.nn.state import FlatLayout, zero_state

CHARS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\n"
V = len(CHARS)


class CharTokenizer:
    """One character per token and no byte view, as a tokenizers-library model would be."""

    name, vocab_size = "chars", V

    def encode(self, text):
        return [CHARS.index(c) for c in text]

    def decode(self, ids):
        return "".join(CHARS[i] for i in ids)


PURE = ModelConfig(vocab_size=V, n_layer=2, n_embd=32)
HYBRID = ModelConfig(vocab_size=V, n_layer=2, n_embd=32, layer_types=("rwkv", "attn"),
                     attn_head_size=8, attn_window=6, pos_emb="rotary")
SAMPLED = Sampling(temperature=0.9, top_k=12, top_p=0.9, presence_penalty=0.3,
                   frequency_penalty=0.2, penalty_decay=0.95)
_GENERATORS: dict = {}


def _official(config) -> dict:
    """The generators' weights in the official layout (what the model reads)."""
    return perturbed(init_params(config, jax.random.PRNGKey(0)), scale=0.5)


def _generator(config) -> Generator:
    """One per config for the whole module, so each compiled step is reused across tests.
    Blocks of 3 decode steps: the tests' prompts and stops fall across block boundaries."""
    if config not in _GENERATORS:
        _GENERATORS[config] = Generator(config, _official(config), CharTokenizer(),
                                        prefill_chunk=4, decode_block=3)
    return _GENERATORS[config]


@partial(jax.jit, static_argnums=0)
def _full(config, params, tokens):
    return RWKV(config).apply({"params": params}, tokens)


def _prompt(n, seed):
    return [int(t) for t in np.random.default_rng(seed).integers(0, V, n)]


def _row(state, i):
    return jax.tree.map(lambda a: a[i : i + 1], state)


@pytest.mark.parametrize("config", [PURE, HYBRID], ids=["pure", "hybrid"])
def test_prefill_whole_in_chunks_or_token_by_token_gives_the_same_greedy_text(config):
    g = _generator(config)
    prompt = _prompt(13, seed=1)
    results = []
    for chunk in (0, 4, 1):  # one parallel call; 4+4+4+1; token by token
        g.prefill_chunk = chunk
        results.append(g.generate(prompt, max_new_tokens=8, keep_state=True))
    g.prefill_chunk = 4
    for r in results[1:]:
        assert r.tokens == results[0].tokens
        chex.assert_trees_all_close(r.state, results[0].state, rtol=1e-4, atol=1e-4)
    # Teacher forcing over the whole text picks the same tokens, and the state returned has
    # consumed every token, the last generated one included.
    whole = prompt + results[0].tokens[0]
    logits, state = _full(config, _official(config), jnp.asarray([whole]))
    np.testing.assert_array_equal(np.argmax(logits[0, len(prompt) - 1 : -1], -1), results[0].tokens[0])
    chex.assert_trees_all_close(results[0].state, state, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_batch_of_different_prompt_lengths_equals_each_row_alone(sampling):
    g = _generator(HYBRID)
    prompts = [_prompt(5, 2), _prompt(9, 3), _prompt(6, 4)]
    batch = g.generate(prompts, max_new_tokens=7, sampling=sampling, seed=[5, 6, 7], keep_state=True)
    for i, p in enumerate(prompts):
        alone = g.generate(p, max_new_tokens=7, sampling=sampling, seed=5 + i, keep_state=True)
        assert batch.tokens[i] == alone.tokens[0], i
        chex.assert_trees_all_close(_row(batch.state, i), alone.state, rtol=1e-4, atol=1e-4)
    assert [len(t) for t in batch.tokens] == [7, 7, 7]


def test_decode_block_size_changes_nothing_but_speed():
    g = _generator(HYBRID)
    prompts = [_prompt(5, 8), _prompt(11, 9), _prompt(6, 10)]
    base = g.generate(prompts, max_new_tokens=14, sampling=SAMPLED, seed=4)
    stop = base.texts[1][5:7]
    kw = dict(max_new_tokens=14, sampling=SAMPLED, seed=4, stop=[stop], stop_tokens=[7],
              keep_state=True)
    want = g.generate(prompts, **kw)
    assert "stop_string" in want.stop_reasons
    for block in (1, 16):
        other = Generator(HYBRID, _official(HYBRID), CharTokenizer(), prefill_chunk=4, decode_block=block)
        got = other.generate(prompts, **kw)
        assert (got.tokens, got.texts, got.stop_reasons) == (want.tokens, want.texts, want.stop_reasons)
        chex.assert_trees_all_close(got.state, want.state, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="decode_block=0"):
        Generator(HYBRID, g.params, decode_block=0)
    with pytest.raises(ValueError, match="prefill_chunk=-1: must be an integer >= 0"):
        Generator(HYBRID, g.params, prefill_chunk=-1)


def test_seeds_reproduce_and_differ():
    g = _generator(HYBRID)
    p = _prompt(5, 2)
    a, b, c = (g.generate(p, max_new_tokens=10, sampling=SAMPLED, seed=s).tokens for s in (11, 11, 12))
    assert a == b and a != c
    # An int seed gives row i seed + i.
    rows = g.generate([p, p, p], max_new_tokens=10, sampling=SAMPLED, seed=11).tokens
    assert rows[:2] == [a[0], c[0]]


def test_stop_strings_and_stop_tokens_end_a_row_and_its_state():
    g = _generator(HYBRID)
    prompts = [_prompt(5, 8), _prompt(7, 9), _prompt(6, 10)]
    base = g.generate(prompts, max_new_tokens=16)
    text = base.texts[0]
    stop = text[6:8]
    r = g.generate(prompts, max_new_tokens=16, stop=[stop], keep_state=True)
    assert r.texts[0] == text[: text.find(stop)] and r.stop_reasons[0] == "stop_string"
    for i in (1, 2):
        if stop not in base.texts[i]:
            assert r.texts[i] == base.texts[i] and r.stop_reasons[i] == "length"
    for i, p in enumerate(prompts):  # each row's state has seen exactly its own tokens
        chex.assert_trees_all_close(_row(r.state, i), g.feed([p + r.tokens[i]]), rtol=1e-4, atol=1e-4)
    p1 = prompts[0]
    pieces = list(g.stream(p1, max_new_tokens=16, stop=[stop]))
    assert "".join(pieces) == r.texts[0]
    with pytest.raises(ValueError, match="stream takes one prompt"):
        next(g.stream(prompts, max_new_tokens=16))
    with pytest.raises(ValueError, match="stream yields text only"):
        next(g.stream(p1, keep_state=True))

    stop_tok = base.tokens[0][4]
    cut = base.tokens[0].index(stop_tok)
    r = g.generate(p1, max_new_tokens=16, stop_tokens=[stop_tok], keep_state=True)
    assert r.tokens[0] == base.tokens[0][:cut] and r.stop_reasons == ["stop_token"]
    chex.assert_trees_all_close(r.state, g.feed([p1 + base.tokens[0][: cut + 1]]), rtol=1e-4, atol=1e-4)


def test_one_stop_string_or_stop_token_is_taken_whole():
    g = _generator(PURE)
    p = _prompt(5, 8)
    base = g.generate(p, max_new_tokens=12)
    # Two characters, the second seen before them: a str taken as its characters cuts earlier.
    t = base.text
    stop = next(t[j : j + 2] for j in range(1, len(t) - 1)
                if t[j + 1] in t[:j] and t.find(t[j : j + 2]) == j)
    assert g.generate(p, max_new_tokens=12, stop=stop).texts == \
        g.generate(p, max_new_tokens=12, stop=[stop]).texts == [base.text[: base.text.find(stop)]]
    tok = base.tokens[0][3]
    assert g.generate(p, max_new_tokens=12, stop_tokens=tok).tokens == \
        g.generate(p, max_new_tokens=12, stop_tokens=[tok]).tokens


class _Holes(CharTokenizer):
    """Ids without text, as the World tokenizer's 0 (end of text) and 65530-65535 are."""

    def decode(self, ids):
        if any(i % 5 == 0 for i in ids):
            raise KeyError([i for i in ids if i % 5 == 0][0])
        return super().decode(ids)


class _ByteHoles(_Holes):
    def decode_bytes(self, ids):
        return self.decode(ids).encode()


@pytest.mark.parametrize("tokenizer", [_Holes, _ByteHoles], ids=["text", "bytes"])
def test_sampled_ids_without_text_add_none(tokenizer):
    base = _generator(PURE)
    g = Generator(PURE, base.params, tokenizer(), decode_block=3)
    r = g.generate([_prompt(4, 1), _prompt(6, 2)], max_new_tokens=30,
                   sampling=Sampling(temperature=5.0), seed=3)
    for text, tokens in zip(r.texts, r.tokens):
        assert any(t % 5 == 0 for t in tokens)  # the call met such ids and went on
        assert text == "".join(CHARS[t] for t in tokens if t % 5)


def test_streaming_emits_whole_characters_and_holds_back_a_possible_stop():
    tail = TextTail(ByteTokenizer(), stops=["€!"])
    pieces = []
    for b in "héllo €€!x".encode():
        piece, hit = tail.push(b)
        pieces.append(piece)
        if hit:
            break
    assert "".join(pieces) == "héllo €" and hit
    assert pieces[1] == "" and pieces[2] == "é"  # the first byte of é waits for the second
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[-2] == "€"  # the first € goes out only once the second cannot start "€!"
    tail = TextTail(ByteTokenizer(), stops=[])
    assert tail.push(0xE2)[0] == "" and tail.finish() == "\ufffd"  # a cut-off character


def test_penalties_follow_chatrwkv():
    s = Sampling(temperature=0, presence_penalty=0.5, frequency_penalty=0.25, penalty_decay=0.5)
    spec, knobs = s.spec(5), jnp.asarray(s.knobs())
    weight = jnp.asarray([1.0, 1.0, 0.0, 1.0, 1.0])  # token 2 is a "space": never counted
    logits = jnp.asarray([[0.0, 0.2, 0.1, 0.0, 0.0]])
    carry = DecodeCarry(None, jnp.zeros((1, 2), jnp.uint32), jnp.zeros((1, 5)), jnp.zeros((1, 5), bool))
    free = (jnp.zeros((1,), jnp.int32), jnp.zeros((1,), bool))
    picked = []
    for _ in range(3):
        tok, carry = advance(spec, logits, carry, *free, knobs, weight)
        picked.append(int(tok[0]))
    # 1 first; then 1 costs 0.5 + 0.25 and 2 wins; then 1 costs 0.5 + 0.25*0.5, 2 costs 0.5: 0.
    assert picked == [1, 2, 0]
    np.testing.assert_allclose(carry.counts[0], [1.0, 0.25, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(carry.seen[0], [True, True, True, False, False])
    tok, after = advance(spec, logits, carry, jnp.asarray([4]), jnp.asarray([True]), knobs, weight)
    assert int(tok[0]) == 4  # a forced prompt token is fed and never counted
    chex.assert_trees_all_equal(after.counts, carry.counts)

    g = _generator(HYBRID)
    assert [CHARS[i] for i in np.flatnonzero(np.asarray(g.count_weights()) == 0)] == list(" 0123456789")
    strong = Sampling(**{**SAMPLED.__dict__, "presence_penalty": 100.0})
    tokens = g.generate(_prompt(5, 2), max_new_tokens=12, sampling=strong, seed=3).tokens[0]
    assert len(set(tokens)) == len(tokens)  # a generated token is never picked again


def test_top_k_top_p_and_temperature_draw_from_the_documented_distribution():
    probs = np.asarray([0.4, 0.3, 0.15, 0.1, 0.05])
    B = 4000
    keys = jax.random.key_data(jax.random.split(jax.random.key(0), B))
    logits = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32)), (B, 1))
    for s, want in [
        (Sampling(temperature=1.0, top_p=0.8), [0.4, 0.3, 0.15, 0, 0]),  # cumulative 0.85 >= 0.8
        (Sampling(temperature=0.5, top_k=2), [0.16, 0.09, 0, 0, 0]),  # p^(1/T) over the top 2
    ]:
        tok, _ = jax.jit(partial(draw, s.spec(5)))(keys, logits, jnp.asarray(s.knobs()))
        freq = np.bincount(np.asarray(tok), minlength=5) / B
        np.testing.assert_allclose(freq, np.asarray(want) / np.sum(want), atol=0.03)


def test_score_streams_any_length_and_equals_the_whole_sequence_loss():
    g = _generator(HYBRID)
    tokens = np.asarray(_prompt(28, 5))
    logits, _ = _full(HYBRID, _official(HYBRID), jnp.asarray(tokens[None, :-1]))
    want = float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[0], tokens[1:])))
    out = g.score(tokens, chunk_len=9)
    assert out["tokens"] == 27 and abs(out["loss"] - want) < 1e-5
    lossy = g.score(tokens, chunk_len=9, compression="int8")["loss"]
    assert lossy != out["loss"] and abs(lossy - want) < 0.05 * want
    text = "".join(CHARS[t] for t in tokens)
    assert g.score(text, chunk_len=9)["loss"] == out["loss"]


@pytest.mark.parametrize("args, match", [
    (([1, 2, V],), f"id {V}, outside this model's vocabulary of {V}"),
    (([-1, 2, 3],), "id -1, outside"),
    (([3],), "at least 2 tokens; got 1"),
    (([[1, 2], [3, 4]],), r"one row of integer token ids; got int64 values of shape \(2, 2\)"),
    (([1.5, 2.0],), "integer token ids; got float64 values"),
    (([1, 2, 3], 0), "chunk_len=0"),
    (([1, 2, 3], 4, None, "zip"), "'zip' is not one of"),
])
def test_score_refuses_bad_input_by_name(args, match):
    with pytest.raises(ValueError, match=match):
        _generator(PURE).score(*args)


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -1.0}, "temperature=-1.0 is invalid: must be >= 0"),
    ({"temperature": float("inf")}, "temperature=inf is invalid: must be a finite number"),
    ({"presence_penalty": float("nan")}, "presence_penalty=nan is invalid: must be a finite"),
    ({"top_p": 1.5}, "top_p=1.5 is invalid: must be between 0 and 1"),
    ({"top_k": 2.5}, "top_k=2.5 is invalid: must be an integer >= 0"),
    ({"penalty_decay": 0.0}, r"penalty_decay=0.0 is invalid: must be in \(0, 1\]"),
])
def test_sampling_refuses_bad_settings_by_name(kwargs, match):
    with pytest.raises(ValueError, match=f"sampling {match}"):
        Sampling(**kwargs)


def test_score_refuses_a_state_of_two_rows():
    g = _generator(PURE)
    with pytest.raises(ValueError, match="2 rows for 1 row of tokens"):
        g.score([1, 2, 3], state=g.reset(2))


def test_session_keeps_the_state_between_calls_and_compresses_it():
    g = _generator(HYBRID)
    p1, p2 = _prompt(4, 10), _prompt(3, 11)
    chat = Session(g)
    r1 = chat.generate(p1, max_new_tokens=5)
    r2 = chat.generate(p2, max_new_tokens=5)
    whole = g.generate(p1 + r1.tokens[0] + p2, max_new_tokens=5)
    assert r2.tokens == whole.tokens
    fed = Session(g)
    fed.feed(p1 + r1.tokens[0])  # token ids, one row
    assert fed.generate(p2, max_new_tokens=5).tokens == r2.tokens
    small = Session(g, compression="int8")
    small.generate(p1, max_new_tokens=5)
    assert small.nbytes < 0.3 * chat.nbytes
    with pytest.raises(ValueError, match="the prompt is empty"):
        g.generate("", max_new_tokens=3)
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        g.generate([V + 3], max_new_tokens=3)
    with pytest.raises(ValueError, match="integer token ids; got float64 values"):
        g.generate([1.7, 2.0], max_new_tokens=3)
    for bad in (0, 2.5, None, 2**40):
        with pytest.raises(ValueError, match=f"max_new_tokens={bad!r}: must be an integer"):
            g.generate(p1, max_new_tokens=bad)
    for seed, bad in ((2**70, 2**70), (1.5, 1.5), ([3, 2**64], 2**64)):
        with pytest.raises(ValueError, match=f"seed {bad!r}: seeds must be integers"):
            g.generate([p1, p1] if isinstance(seed, list) else p1, seed=seed, max_new_tokens=3)
    # Arrays: one row is one prompt, rows a batch.
    assert g.generate(jnp.asarray(p1), max_new_tokens=5).tokens == r1.tokens
    assert g.generate(np.asarray([p1, p1]), max_new_tokens=5).tokens == r1.tokens * 2


def test_a_callers_state_survives_the_calls_that_start_from_it():
    """The decode steps donate their state, so generate and feed start from a copy of the one
    they are given: it stays usable, as device arrays or as numpy."""
    gen = _generator(PURE)
    state = gen.feed("To be or")
    first = gen.generate(" not", state=state, max_new_tokens=6, keep_state=True)
    again = gen.generate(" not", state=state, max_new_tokens=6)
    on_host = gen.generate(" not", state=jax.device_get(state), max_new_tokens=6)
    assert first.tokens == again.tokens == on_host.tokens
    chex.assert_trees_all_equal(gen.feed(" not", state), gen.feed(" not", state))
    assert not any(a.is_deleted() for a in jax.tree.leaves(state))
    assert {a.unsafe_buffer_pointer() for a in jax.tree.leaves(first.state)}.isdisjoint(
        a.unsafe_buffer_pointer() for a in jax.tree.leaves(state))


def test_reset_gives_the_learned_initial_state_in_buffers_of_its_own():
    config = ModelConfig(vocab_size=V, n_layer=2, n_embd=32, learned_init_state=True)
    params = perturbed(init_params(config, jax.random.PRNGKey(0)), scale=0.5)
    gen = Generator(config, params, CharTokenizer())
    fresh = gen.reset(3)
    chex.assert_trees_all_close(fresh, initial_state(config, params, 3))
    assert float(jnp.abs(fresh["layers"][0]["aa"]).max()) > 0  # learned, not zero
    pointers = [a.unsafe_buffer_pointer() for a in jax.tree.leaves(fresh)]
    assert len(set(pointers)) == len(pointers)  # arrays of their own, none shared
    assert gen.generate("ab", max_new_tokens=3).tokens == gen.generate("ab", max_new_tokens=3).tokens


@pytest.mark.parametrize("learned", [False, True])
def test_fresh_and_returned_states_share_the_compiled_steps(learned):
    """reset and the copy of a caller's state are placed as the steps' outputs are (committed
    to the device): jit compiles a function again for arguments placed differently."""
    config = ModelConfig(vocab_size=V, n_layer=2, n_embd=32, learned_init_state=learned)
    gen = Generator(config, init_params(config, jax.random.PRNGKey(0)), CharTokenizer())
    assert all(a.committed for a in jax.tree.leaves(gen.reset(2)))
    first = gen.generate("a", max_new_tokens=20, keep_state=True)  # blocks of 16: two launches
    gen.generate("b", max_new_tokens=3, state=first.state)
    gen.generate("b", max_new_tokens=3, state=jax.device_get(first.state))
    assert [f._cache_size() for f in gen._blocks.values()] == [1]
    fed = gen.feed("abcd")
    gen.feed("abcd", fed)  # the same piece, from a state the generator returned
    assert gen._piece._cache_size() == 1


def test_a_flat_state_is_the_state_in_one_array_per_dtype():
    """FlatLayout, which the generator keeps its states in between compiled calls: a hybrid
    state (float32 RWKV, bf16 key-value window, int32 positions) joins into one (B, n) array
    per dtype, its large arrays (here the window, once the bound is lowered) kept as they are,
    and splits back bit for bit; a per-row select works on the flat arrays."""
    config = dataclasses.replace(HYBRID, dtype="bfloat16")
    state = jax.tree.map(lambda a: a + jnp.arange(a.size, dtype=a.dtype).reshape(a.shape),
                         zero_state(config, 3))
    rows = jnp.array([True, False, True])
    picked = jax.tree.map(lambda a: a[rows], state)
    kv = state["layers"][1]["k"]
    for separate_from, want in ((1 << 20, [(3, jnp.float32), (3, jnp.bfloat16), (3, jnp.int32)]),
                                (kv[0].size, [(3, jnp.float32), (3, jnp.int32)] + [kv.shape] * 2)):
        layout = FlatLayout.of(state, separate_from)  # the window joined, then its own arrays
        flat = jax.jit(layout.flatten)(state)
        assert [(a.shape if a.ndim > 2 else (a.shape[0], a.dtype)) for a in flat] == want
        assert sum(a.size for a in flat) == sum(a.size for a in jax.tree.leaves(state))
        chex.assert_trees_all_equal(jax.jit(layout.unflatten)(flat), state)
        chex.assert_trees_all_equal(layout.unflatten([a[rows] for a in flat]), picked)


def test_a_state_of_another_model_is_refused_with_the_reason():
    gen = _generator(PURE)
    wider = ModelConfig(vocab_size=V, n_layer=PURE.n_layer, n_embd=2 * PURE.n_embd)
    with pytest.raises(ValueError, match=re.escape("state['layers'][0]['aa'] has shape (1, 64); "
                                                   "this model's is (B, 32) with B = 1")):
        gen.generate("a", state=zero_state(wider, 1), max_new_tokens=2)
    deeper = ModelConfig(vocab_size=V, n_layer=PURE.n_layer + 1, n_embd=PURE.n_embd)
    with pytest.raises(ValueError, match=re.escape("the state is not this model's: it has no "
                                                   "place for ['layers'][2]['aa']")):
        gen.feed("a", zero_state(deeper, 1))
    with pytest.raises(ValueError, match=re.escape("state['pos'] has shape (2,)")):
        gen.feed("a", {**gen.reset(1), "pos": np.zeros(2, np.int32)})
    with pytest.raises(ValueError, match="the state holds 2 rows for 1 prompts"):
        gen.generate("a", state=gen.reset(2), max_new_tokens=2)


def test_no_block_is_launched_past_the_last_a_call_needs():
    """A launch costs the host milliseconds on a GPU: a call of n tokens from a one-token
    prompt launches ceil(n / K) blocks, and one more step (so perhaps a block) only when the
    state it returns must have fed the last token."""
    config = ModelConfig(vocab_size=V, n_layer=2, n_embd=32)
    gen = Generator(config, init_params(config, jax.random.PRNGKey(0)), CharTokenizer(),
                    decode_block=4)
    block = gen._block_fn(GREEDY.spec(V))
    launched = []
    gen._blocks[GREEDY.spec(V)] = lambda *a: launched.append(1) or block(*a)
    for n, keep, want in ((4, False, 1), (4, True, 2), (5, False, 2), (3, True, 1)):
        launched.clear()
        r = gen.generate("a", max_new_tokens=n, keep_state=keep)
        assert (len(launched), len(r.tokens[0])) == (want, n), (n, keep)
