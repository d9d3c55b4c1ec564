"""rwkv-serve against the real `openai` client: completions and chat, streamed and not, greedy
text equal to infer.py's, concurrent clients each getting what they get alone, a client that
leaves freeing its slot, 400s and 429s that leave the server serving, and SIGTERM draining.

One server for the module (a random byte-level RWKV-4, 4 slots), started as `python serve.py`
on a free 127.0.0.1 port; the SIGTERM test runs last and stops it.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import REPO, random_official_state_dict, repo_pythonpath

openai = pytest.importorskip("openai", reason="the server tests use the openai client")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
torch = pytest.importorskip("torch", reason="the tiny model is an official .pth")

SLOTS, QUEUE, CHUNK = 4, 16, 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pth = str(tmp_path_factory.mktemp("serve") / "tiny.pth")
    torch.save(random_official_state_dict(vocab=256, n_embd=32, n_layer=2, dim_ffn=64), pth)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "serve.py"), "--official", pth, "--port", str(port),
         "--max_batch", str(SLOTS), "--max_queue", str(QUEUE), "--prefill_chunk", str(CHUNK),
         "--decode_block", "4", "--max_tokens_cap", "1000000", "--grace", "20"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": repo_pythonpath()},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not start within 90 s"
        time.sleep(0.2)
    yield {"url": url, "proc": proc, "pth": pth}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)


def _metrics(url) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {m[1]: float(m[2]) for m in re.finditer(r"^(rwkv_\S+) (\S+)$", text, re.MULTILINE)}


def _streamed(stream) -> tuple[str, str]:
    text, reason = "", None
    for chunk in stream:
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            text += piece or ""
            reason = c.finish_reason or reason
    return text, reason


def test_completions_and_chat_streamed_and_not(client):
    kw = {"model": "tiny", "max_tokens": 12, "temperature": 0}
    whole = client.completions.create(prompt="To be, or not", **kw)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    assert whole.usage.prompt_tokens == len(b"To be, or not")
    assert _streamed(client.completions.create(prompt="To be, or not", stream=True, **kw)) == (
        whole.choices[0].text, "length")
    # top_k = 1 samples the argmax: the greedy text (a sampling row in the same compiled block).
    top1 = client.completions.create(prompt="To be, or not", extra_body={"top_k": 1},
                                     **{**kw, "temperature": 0.7})
    assert top1.choices[0].text == whole.choices[0].text

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(messages=msgs, **kw)
    assert chat.choices[0].message.role == "assistant"
    streamed = _streamed(client.chat.completions.create(messages=msgs, stream=True, **kw))
    assert streamed == (chat.choices[0].message.content, chat.choices[0].finish_reason)
    # n samples with seeds seed + i; logprobs of each chosen token.
    two = client.completions.create(prompt="abc", n=2, seed=5, logprobs=0,
                                    **{**kw, "temperature": 1.0})
    assert [c.index for c in two.choices] == [0, 1]
    assert len(two.choices[0].logprobs.token_logprobs) == 12
    assert all(lp <= 0 for lp in two.choices[0].logprobs.token_logprobs)
    assert client.models.list().data[0].id == "tiny"


def test_greedy_text_is_infer_py_temperature_0s(server, client, capsys):
    from rwkv_jax.cli import infer

    for prompt in ("First Citizen:", "A longer prompt that takes several prefill chunks."):
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=20,
                                        temperature=0).choices[0].text
        assert infer.main(["--official", server["pth"], "--prompt", prompt, "--temperature", "0",
                           "--max_new_tokens", "20", "--prefill_chunk", str(CHUNK)]) == 0
        assert capsys.readouterr().out == got + "\n"


def test_a_shared_prefix_is_prefilled_once(server, client):
    """The state after a chat's earlier turns (here the system prompt) and after a whole prompt
    is cached: a request that shares it prefills only its tail, and a repeated prompt gets the
    same greedy text without prefilling anything."""
    system = {"role": "system", "content": "You answer in verse, briefly and kindly. " * 3}
    chat = lambda text: client.chat.completions.create(
        model="tiny", messages=[system, {"role": "user", "content": text}], max_tokens=4,
        temperature=0)
    chat("What is the moon?")
    before = _metrics(server["url"])
    second = chat("And the sun?")
    after = _metrics(server["url"])
    head = len(b"System: " + system["content"].strip().encode() + b"\n\n")
    prefilled = (after["rwkv_prompt_tokens_prefilled_total"]
                 - before["rwkv_prompt_tokens_prefilled_total"])
    assert prefilled == second.usage.prompt_tokens - 1 - head
    assert after["rwkv_prefix_cache_hits_total"] == before["rwkv_prefix_cache_hits_total"] + 1

    once = client.completions.create(model="tiny", prompt="Once more, once more", max_tokens=8,
                                      temperature=0)
    before = _metrics(server["url"])
    again = client.completions.create(model="tiny", prompt="Once more, once more", max_tokens=8,
                                       temperature=0)
    after = _metrics(server["url"])
    assert again.choices[0].text == once.choices[0].text
    assert after["rwkv_prompt_tokens_prefilled_total"] == before["rwkv_prompt_tokens_prefilled_total"]


def test_a_session_continues_without_the_history(server, client):
    """"session": true gives a state_id; a request with it sends only its new text and gets
    what the whole conversation sent at once gets, prefilling only the last reply and the new
    text."""
    kw = {"model": "tiny", "max_tokens": 6, "temperature": 0}
    first = client.completions.create(prompt="Once upon", extra_body={"session": True}, **kw)
    state_id = first.model_extra["state_id"]
    before = _metrics(server["url"])
    second = client.completions.create(prompt=" and then", extra_body={"state_id": state_id}, **kw)
    after = _metrics(server["url"])
    assert second.model_extra["state_id"] == state_id
    whole = "Once upon" + first.choices[0].text + " and then"
    assert second.usage.prompt_tokens == len(whole.encode())
    assert (after["rwkv_prompt_tokens_prefilled_total"] - before["rwkv_prompt_tokens_prefilled_total"]
            == len((first.choices[0].text + " and then").encode()))
    alone = client.completions.create(prompt=whole, **kw)
    assert second.choices[0].text == alone.choices[0].text

    chat = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}],
                                          extra_body={"session": True}, **kw)
    more = client.chat.completions.create(
        messages=[{"role": "user", "content": "More"}], **kw,
        extra_body={"state_id": chat.model_extra["state_id"]})
    reply = chat.choices[0].message.content.encode()
    assert more.usage.prompt_tokens == (chat.usage.prompt_tokens + len(reply)
                                        + len(b"\n\nUser: More\n\nAssistant:"))
    with pytest.raises(openai.BadRequestError, match="unknown or has expired"):
        client.completions.create(prompt="x", extra_body={"state_id": "st-nope"}, **kw)


def test_sixteen_concurrent_streams_each_get_their_text_alone(client):
    """More clients than slots (4): the queue and joins between blocks; greedy and sampled
    rows, with penalties, in the same blocks."""
    def ask(i):
        kw = {"model": "tiny", "prompt": f"Client {i}: " + "x" * (i * 3), "max_tokens": 10 + i,
                  "seed": 100 + i, "temperature": 0 if i % 3 == 0 else 0.9}
        if i % 4 == 1:
            kw.update(top_p=0.7, frequency_penalty=0.5, presence_penalty=0.3)
        if i % 4 == 2:
            kw["extra_body"] = {"top_k": 5}
        return _streamed(client.completions.create(stream=True, **kw))

    alone = [ask(i) for i in range(16)]
    together = [None] * 16

    def worker(i):
        together[i] = ask(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert together == alone
    assert all(reason == "length" for _, reason in alone)


def test_a_client_that_leaves_frees_its_slot_and_a_full_queue_gets_429(server):
    url = server["url"]
    body = {"prompt": "endless", "max_tokens": 1000000, "temperature": 0, "stream": True}

    async def crowd():
        async with httpx.AsyncClient(timeout=30) as http:
            streams = [http.stream("POST", url + "/v1/completions", json=body)
                       for _ in range(SLOTS + QUEUE + 2)]
            responses = []
            for i, s in enumerate(streams):  # the slots filled first, then the queue
                responses.append(await s.__aenter__())
                while i == SLOTS - 1 and _metrics(url)["rwkv_slots_busy"] < SLOTS:
                    await asyncio.sleep(0.01)
            codes = [r.status_code for r in responses]
            first = await anext(responses[0].aiter_lines())
            busy = _metrics(url)["rwkv_slots_busy"]
            for s in reversed(streams):
                await s.__aexit__(None, None, None)
            return codes, first, busy

    before = _metrics(url).get('rwkv_requests_finished_total{reason="cancelled"}', 0)
    codes, first, busy = asyncio.run(crowd())
    assert first.startswith("data: ") and busy == SLOTS
    assert codes.count(200) == SLOTS + QUEUE and codes.count(429) == 2, codes
    deadline = time.monotonic() + 10
    while (m := _metrics(url))["rwkv_slots_busy"] or m["rwkv_queue_length"]:
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    assert m['rwkv_requests_finished_total{reason="cancelled"}'] - before == SLOTS + QUEUE
    assert m["rwkv_requests_rejected_total"] == 2


def test_bad_requests_get_400_and_the_next_good_one_succeeds(server, client):
    url = server["url"] + "/v1/completions"
    bad = [("{not json", None), (json.dumps({"prompt": "x", "temperature": "hot"}), "temperature"),
           (json.dumps({"prompt": ""}), "prompt"), (json.dumps({"prompt": [5, 300]}), "prompt"),
           (json.dumps({"prompt": "x", "tools": []}), "tools"),
           (json.dumps({"prompt": "x", "colour": 1}), "colour"),
           (json.dumps({"prompt": "x", "n": 0}), "n"),
           (json.dumps({"prompt": "x", "max_tokens": 10**7}), "max_tokens"),
           (json.dumps({"prompt": "x", "logprobs": 6}), "logprobs"),
           (json.dumps({"prompt": "x", "echo": True, "stream": True}), "echo"),
           (json.dumps({"prompt": "x", "max_tokens": 0}), "max_tokens"),
           (json.dumps(["x"]), None)]
    for body, param in bad:
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, body
        assert err["type"] == "invalid_request_error" and err["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    ok = client.completions.create(model="tiny", prompt="still here", max_tokens=3)
    assert ok.choices[0].finish_reason == "length"


def _model_logp(pth, ids):
    """The model's own log-probabilities (len(ids), V) of one whole sequence (rwkv_jax.nn)."""
    import jax
    import jax.numpy as jnp

    from rwkv_jax.io import import_official
    from rwkv_jax.nn.model import RWKV

    config, params = import_official(pth)
    logits, _ = RWKV(config).apply({"params": params}, jnp.asarray([ids], jnp.int32))
    return np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32)))


def test_echo_scores_the_prompt_as_the_model_does(server):
    """echo + logprobs (lm-eval's local-completions request): the prompt's tokens first, each
    with the model's log-probability (the first has none), then the generated token; top
    alternatives as asked; a prompt longer than a prefill piece; ids or text alike."""
    ids = list(b"To be, or not to be, that is the question: whether 'tis nobler")
    assert len(ids) > CHUNK
    url = server["url"] + "/v1/completions"
    body = {"model": "tiny", "temperature": 0, "max_tokens": 1, "logprobs": 2, "echo": True}
    by_ids = httpx.post(url, json={**body, "prompt": ids}, timeout=60).json()["choices"][0]
    by_text = httpx.post(url, json={**body, "prompt": bytes(ids).decode()},
                         timeout=60).json()["choices"][0]
    assert by_ids == by_text
    lp = by_ids["logprobs"]
    assert by_ids["text"].startswith(bytes(ids).decode()) and len(lp["tokens"]) == len(ids) + 1
    assert lp["tokens"][: len(ids)] == [chr(t) for t in ids]
    assert lp["text_offset"][: len(ids)] == list(range(len(ids)))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    logp = _model_logp(server["pth"], ids)  # greedy: the generated token is the argmax
    whole = ids + [int(np.argmax(logp[-1]))]
    want = logp[np.arange(len(ids)), whole[1:]]
    text = lambda t: bytes([t]).decode(errors="replace")
    assert lp["tokens"][-1] == text(whole[-1])
    np.testing.assert_allclose(lp["token_logprobs"][1:], want, atol=1e-4, rtol=0)
    for t, top in enumerate(lp["top_logprobs"][1:]):
        best = {}  # the two best; bytes that are not UTF-8 alone share a text, the best's
        for b in np.argsort(-logp[t])[:2]:
            best.setdefault(text(b), logp[t, b])
        assert list(top) == list(best)
        np.testing.assert_allclose(list(top.values()), list(best.values()), atol=1e-4, rtol=0)
    # Greedy: the generated token is the top one, its log-probability top's first, exactly.
    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
    # max_tokens 0: the prompt alone; logprobs=0 without echo: only the generated tokens.
    only = httpx.post(url, json={**body, "prompt": ids, "max_tokens": 0}, timeout=60).json()
    lps = only["choices"][0]["logprobs"]["token_logprobs"]  # in other pieces: not to the bit
    assert lps[0] is None and len(lps) == len(ids)
    np.testing.assert_allclose(lps[1:], lp["token_logprobs"][1:-1], atol=1e-5, rtol=0)
    assert only["choices"][0]["text"] == bytes(ids).decode()
    gen = httpx.post(url, json={**body, "prompt": ids, "echo": False}, timeout=60).json()
    np.testing.assert_allclose(gen["choices"][0]["logprobs"]["token_logprobs"],
                               lp["token_logprobs"][-1:], atol=1e-5, rtol=0)


def test_lm_eval_local_completions_scores_as_rwkv_lm_eval(server, tmp_path):
    """lm-eval's local-completions (tokenized requests, echo, logprobs=1) against this server,
    on the local multiple-choice task: each example's log-likelihoods are those rwkv-lm-eval's
    model (RwkvLM, in this process on the same weights) gives the same requests."""
    pytest.importorskip("lm_eval", reason="the eval extra: pip install -e .[eval]")
    pytest.importorskip("transformers", reason="local-completions' tokenizer is a transformers one")
    from types import SimpleNamespace

    from rwkv_jax.data import ByteTokenizer
    from rwkv_jax.generate import Generator
    from rwkv_jax.harness import RwkvLM
    from rwkv_jax.io import import_official

    task_dir = os.path.join(REPO, "tests", "fixtures", "lm_eval")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": repo_pythonpath()}
    hf = tmp_path / "hf"
    subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), "--official", server["pth"],
                    "--tokenizer", "byte", "--export_hf", str(hf)],
                   env=env, cwd=REPO, capture_output=True, timeout=120, check=True)
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
         (f"model=tiny,base_url={server['url']}/v1/completions,tokenizer_backend=huggingface,"
          f"tokenizer={hf},num_concurrent=1"), "--tasks", "rwkv_tiny_mc", "--include_path",
         task_dir, "--log_samples", "--output_path", str(tmp_path / "out")],
        cwd=task_dir, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = glob.glob(str(tmp_path / "out" / "*" / "samples_rwkv_tiny_mc_*.jsonl"))
    with open(path) as f:
        samples = [json.loads(line) for line in f]
    assert len(samples) == 40
    config, params = import_official(server["pth"])
    ours = RwkvLM(Generator(config, params, ByteTokenizer()))
    # lm-eval logs each request's arguments as {"gen_args_i": {"arg_0": context, "arg_1": ...}}.
    pairs = [(g["arg_0"], g["arg_1"]) for s in samples for _, g in sorted(
        s["arguments"].items(), key=lambda kv: int(kv[0].rsplit("_", 1)[1]))]
    want = [ll for ll, _ in ours.loglikelihood([SimpleNamespace(args=a) for a in pairs],
                                               disable_tqdm=True)]
    got = [float(r[0]) for s in samples for r in s["filtered_resps"]]
    assert len(got) == len(want) == 160
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_sigterm_drains_the_requests_in_flight_and_exits_0(server):
    """Runs last: SIGTERM while a stream is in flight; the stream ends as it would have, new
    requests are turned away, and the server exits 0."""
    proc, url = server["proc"], server["url"]
    body = {"prompt": "drain", "max_tokens": 20000, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        proc.send_signal(signal.SIGTERM)
        rest = [x for x in lines if x]
    events = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "length" and rest[-1] == "data: [DONE]"
    assert proc.wait(timeout=30) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)
