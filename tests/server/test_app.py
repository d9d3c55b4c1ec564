"""The app's gate and error mapping without a model: --api_key (Bearer) on /v1/* only, a
draining server's 503, and request checks that need no engine (protocol.parse)."""

from __future__ import annotations

import types

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from rwkv_jax.data import ByteTokenizer
from rwkv_jax.server import protocol
from rwkv_jax.server.app import create_app
from rwkv_jax.server.engine import Draining


class _ShuttingDown:
    """An engine that is draining: every request is turned away."""

    gen = types.SimpleNamespace(tokenizer=ByteTokenizer())
    config = types.SimpleNamespace(vocab_size=256)
    draining = True

    def submit(self, req):
        raise Draining("the server is shutting down")


@pytest.fixture(scope="module")
def http():
    app = create_app(_ShuttingDown(), model_name="m", limits=protocol.Limits(), api_key="k3y")
    return TestClient(app)


def test_api_key_guards_v1_only_and_a_draining_server_answers_503(http):
    body = {"prompt": "x", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k3y"}):
        r = http.post("/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert http.get("/health").json() == {"status": "draining"}
    ok = {"Authorization": "Bearer k3y"}
    assert http.get("/v1/models", headers=ok).json()["data"][0]["id"] == "m"
    r = http.post("/v1/completions", json=body, headers=ok)
    assert r.status_code == 503 and r.json()["error"]["code"] == "draining"


def test_parse_reads_openai_fields_and_names_the_bad_one():
    tok, limits = ByteTokenizer(), protocol.Limits(max_prompt_tokens=8, max_tokens_cap=50)
    p = protocol.parse({"prompt": ["ab", [1, 2]], "n": 2, "seed": 3, "stop": "x",
                        "temperature": 0.5, "top_p": 0.9, "presence_penalty": 0.1},
                       False, tok, 256, limits)
    assert p.prompts == [[97, 98], [1, 2]] and p.n == 2 and p.seed == 3 and p.stop == ["x"]
    assert p.max_tokens == 16 and p.sampling.top_p == 0.9 and not p.stream
    chat = protocol.parse({"messages": [{"role": "user", "content": "hi"}]}, True, tok, 256,
                          protocol.Limits())
    assert bytes(chat.prompts[0]).decode() == "User: hi\n\nAssistant:"
    assert chat.stop == ["\n\n"] and chat.max_tokens == protocol.Limits().max_tokens_cap
    for body, param in (({"prompt": "123456789"}, "prompt"), ({"prompt": "x", "top_p": 2}, "top_p"),
                        ({"prompt": "x", "stream": 1}, "stream"), ({"prompt": "x", "n": True}, "n"),
                        ({"prompt": "x", "max_tokens": 51}, "max_tokens"),
                        ({"prompt": "x", "stop": ["a", 3]}, "stop"), ({"prompt": [[1], "a", 2]}, "prompt")):
        with pytest.raises(protocol.APIError) as e:
            protocol.parse(body, False, tok, 256, limits)
        assert e.value.param == param and e.value.status == 400, body
