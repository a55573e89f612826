"""The OpenAI-compatible API in-process (FastAPI's TestClient): every bad request gets its
status and a one-line OpenAI-shaped error, and the server answers correctly after them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
pytest.importorskip("httpx", reason="httpx (the dev extra) is not installed")

from fastapi.testclient import TestClient

from lmtrain.data.qa_format import QATemplate
from lmtrain.inference import load_trained_model
from lmtrain.serve.app import Served, create_app
from lmtrain.serve.engine import Engine

pytestmark = pytest.mark.unit
KEY = "sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD = {"model": "tiny", "prompt": "First", "max_tokens": 5, "temperature": 0}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Who?"}], "max_tokens": 5,
        "temperature": 0}


@pytest.fixture(scope="module")
def client(tiny_checkpoint: Path):
    loaded = load_trained_model(tiny_checkpoint)
    engine = Engine(loaded.model, loaded.tokenizer, loaded.config.model.block_size,
                    torch.device("cpu"))
    served = Served(engine, "tiny", QATemplate(loaded.config.data.qa_template),
                    loaded.config.generation, api_key=KEY, max_tokens=64, max_body=4096)
    with TestClient(create_app(served)) as client:
        yield client


def _with(base: dict, **changes) -> dict:
    out = dict(base)
    for name, value in changes.items():
        if value is _DROP:
            out.pop(name)
        else:
            out[name] = value
    return out


_DROP = object()
C, H = "/v1/completions", "/v1/chat/completions"
#: (method, path, body (a dict is sent as JSON, bytes as they are), headers, status, param)
BAD = [
    ("POST", C, GOOD, {}, 401, None),  # no key
    ("POST", C, GOOD, {"Authorization": "Bearer wrong"}, 401, None),
    ("POST", C, GOOD, {"Authorization": KEY}, 401, None),  # not a bearer token
    ("GET", "/v1/models", None, {}, 401, None),
    ("POST", C, b"{not json", AUTH, 400, None),
    ("POST", C, b"", AUTH, 400, None),
    ("POST", C, b"[1, 2]", AUTH, 400, None),
    ("POST", C, b"\xff\xfe", AUTH, 400, None),
    ("POST", C, _with(GOOD, model=_DROP), AUTH, 400, "model"),
    ("POST", C, _with(GOOD, model="gpt-4"), AUTH, 404, "model"),
    ("POST", H, _with(CHAT, model="nope"), AUTH, 404, "model"),
    ("POST", C, _with(GOOD, prompt=""), AUTH, 400, "prompt"),
    ("POST", C, _with(GOOD, prompt=_DROP), AUTH, 400, "prompt"),
    ("POST", C, _with(GOOD, prompt=["a", "b"]), AUTH, 400, "prompt"),
    ("POST", C, _with(GOOD, prompt=[1, 2, 3]), AUTH, 400, "prompt.str"),
    ("POST", C, _with(GOOD, prompt="\u00e9\u00e9"), AUTH, 400, "prompt"),  # outside the vocab
    ("POST", C, _with(GOOD, max_tokens=-1), AUTH, 400, "max_tokens"),
    ("POST", C, _with(GOOD, max_tokens=0), AUTH, 400, "max_tokens"),
    ("POST", C, _with(GOOD, max_tokens=10_000), AUTH, 400, "max_tokens"),
    ("POST", C, _with(GOOD, max_tokens="5"), AUTH, 400, "max_tokens"),
    ("POST", C, _with(GOOD, max_tokens=2.5), AUTH, 400, "max_tokens"),
    ("POST", C, _with(GOOD, temperature=-0.5), AUTH, 400, "temperature"),
    ("POST", C, _with(GOOD, temperature=3), AUTH, 400, "temperature"),
    ("POST", C, _with(GOOD, temperature="hot"), AUTH, 400, "temperature"),
    ("POST", C, _with(GOOD, top_p=0), AUTH, 400, "top_p"),
    ("POST", C, _with(GOOD, top_k=0), AUTH, 400, "top_k"),
    ("POST", C, _with(GOOD, stream="yes"), AUTH, 400, "stream"),
    ("POST", C, _with(GOOD, stop=["a", "b", "c", "d", "e"]), AUTH, 400, "stop"),
    ("POST", C, _with(GOOD, seed=1.5), AUTH, 400, "seed"),
    ("POST", C, _with(GOOD, seed=2**64), AUTH, 400, "seed"),
    ("POST", C, b'{"model": "tiny", "prompt": "First", "temperature": NaN}', AUTH, 400,
     "temperature"),
    ("POST", C, _with(GOOD, n=2), AUTH, 400, "n"),
    ("POST", C, _with(GOOD, logprobs=1), AUTH, 400, "logprobs"),
    ("POST", C, _with(GOOD, echo=True), AUTH, 400, "echo"),
    ("POST", C, _with(GOOD, best_of=3), AUTH, 400, "best_of"),
    ("POST", C, _with(GOOD, presence_penalty=0.5), AUTH, 400, "presence_penalty"),
    ("POST", C, _with(GOOD, wibble=1), AUTH, 400, "wibble"),
    ("POST", C, _with(GOOD, stream_options={"include_usage": True}), AUTH, 400,
     "stream_options"),
    ("POST", H, _with(CHAT, messages=[]), AUTH, 400, "messages"),
    ("POST", H, _with(CHAT, messages="hi"), AUTH, 400, "messages"),
    ("POST", H, _with(CHAT, messages=[{"role": "wizard", "content": "x"}]), AUTH, 400,
     "messages.0.role"),
    ("POST", H, _with(CHAT, messages=[{"role": "assistant", "content": "x"}]), AUTH, 400,
     "messages"),
    ("POST", H, _with(CHAT, messages=[{"role": "user", "content": "  "}]), AUTH, 400,
     "messages"),
    ("POST", H, _with(CHAT, messages=[{"content": "x"}]), AUTH, 400, "messages.0.role"),
    ("POST", H, _with(CHAT, logprobs=True), AUTH, 400, "logprobs"),
    ("POST", H, _with(CHAT, tools=[{"type": "function"}]), AUTH, 400, "tools"),
    ("POST", H, _with(CHAT, response_format={"type": "json_object"}), AUTH, 400,
     "response_format"),
    ("POST", H, _with(CHAT, max_completion_tokens=100_000), AUTH, 400,
     "max_completion_tokens"),
    ("POST", C, {"model": "tiny", "prompt": "x" * 5000}, AUTH, 413, None),  # over 4096 bytes
    ("GET", C, None, AUTH, 405, None),
    ("GET", "/v1/nothing", None, AUTH, 404, None),
    ("GET", "/v1/models/other", None, AUTH, 404, "model"),
]


def _send(client: TestClient, method: str, path: str, body, headers):
    if isinstance(body, dict):
        return client.request(method, path, json=body, headers=headers)
    return client.request(method, path, content=body, headers=headers)


def test_every_bad_request_gets_its_status_and_one_line_then_a_good_one_works(client) -> None:
    assert len(BAD) >= 25
    before = client.post(C, json=GOOD, headers=AUTH).json()["choices"][0]["text"]
    for method, path, body, headers, status, param in BAD:
        response = _send(client, method, path, body, headers)
        where = f"{method} {path} {body!r:.60} -> {response.status_code} {response.text:.200}"
        assert response.status_code == status, where
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, where
        assert error["message"] and "\n" not in error["message"], where
        assert error["param"] == param, where
    after = client.post(C, json=GOOD, headers=AUTH)
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == before
    assert client.post(H, json=CHAT, headers=AUTH).status_code == 200
    assert _settles(client)


def _settles(client: TestClient) -> bool:
    """Whether the server has no request in flight within a few seconds."""
    import time

    deadline = time.monotonic() + 10
    while client.get("/health").json()["in_flight"]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_health_and_the_page_are_open_and_the_rest_needs_the_key(client) -> None:
    assert client.get("/health").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and "<textarea" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no external asset
    assert client.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == "tiny"
    assert client.get("/v1/models/tiny", headers=AUTH).json()["id"] == "tiny"


def test_health_counts_the_requests_ended_by_how_they_ended(client) -> None:
    before = client.get("/health").json()["ended"]
    assert set(before) == {"stop", "length", "cancelled", "error"}
    finish = client.post(C, json=GOOD, headers=AUTH).json()["choices"][0]["finish_reason"]
    after = client.get("/health").json()["ended"]
    assert after == before | {finish: before[finish] + 1}


def test_a_streamed_answer_is_the_whole_answer_in_pieces(client) -> None:
    whole = client.post(C, json=_with(GOOD, max_tokens=12), headers=AUTH).json()
    lines = []
    body = _with(GOOD, max_tokens=12, stream=True, stream_options={"include_usage": True})
    with client.stream("POST", C, json=body, headers=AUTH) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == whole["choices"][0]["text"]
    assert chunks[-1]["usage"] == whole["usage"]
    assert whole["usage"]["completion_tokens"] == 12
    assert whole["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("args", [["serve", "missing.pt"], ["chat", "missing.pt"],
                                  ["serve", "{ckpt}", "--step", "3"],
                                  ["serve", "{ckpt}", "--max-batch", "0"],
                                  ["serve", "{ckpt}", "--port", "70000"],
                                  ["chat", "{ckpt}", "--temperature", "0"]])
def test_bad_serve_and_chat_arguments_are_one_line(args, tiny_checkpoint: Path, capsys) -> None:
    from lmtrain.cli import main

    assert main([a.replace("{ckpt}", str(tiny_checkpoint)) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_a_port_in_use_is_one_line_before_the_model_loads(tiny_checkpoint: Path,
                                                          capsys) -> None:
    import socket

    from lmtrain.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tiny_checkpoint), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot listen on --host 127.0.0.1 --port {port}")
