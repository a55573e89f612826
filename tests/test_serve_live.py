"""``lmtrain serve`` as users run it: a real server on a free port of 127.0.0.1, the official
``openai`` client, 16 concurrent clients, a client that goes away, SIGTERM, ``lmtrain chat``
through a pseudo-terminal, and the playground page in a headless Chromium."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmtrain.config import explicit_settings
from tests.conftest import TINY, child_env

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (the dev extra) is not installed")

pytestmark = pytest.mark.integration
QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?", "How many legs has a spider?",
             "What colour is the sky?", "What is two plus two?", "Where do penguins live?"]
ANSWERS = ["Paris.", "Shakespeare.", "Eight.", "Blue.", "Four.", "Antarctica."]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _train(root: Path, **flags: Any) -> Path:
    """A tiny question/answer run in ``root``; its run folder."""
    from lmtrain.train.session import train

    data = root / "qa.txt"
    data.write_text("".join(f"QUESTION: {q} ANSWER: {a}\n" for _ in range(30)
                            for q, a in zip(QUESTIONS, ANSWERS, strict=True)), encoding="utf-8")
    settings = {**TINY, "training_data_source": str(data), "block_size": 64, "n_embd": 32,
                "training_steps": 30, "eval_interval": 30, "checkpoint_interval": 30,
                "learning_rate": 1e-2, "max_new_tokens": 0, "run_name": "qa",
                "checkpoint_dir": str(root / "ckpt"), "log_dir": str(root / "logs"),
                "output_dir": str(root / "out"), "cache_dir": str(root / "cache"), **flags}
    if flags.get("model_type") == "gpt2":
        for name in ("n_layer", "n_head", "n_embd"):
            settings.pop(name)
    values, sources = explicit_settings(flags=settings, env={})
    return train(values, sources).checkpoint_dir


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("qa_run"))


class Server:
    """``lmtrain serve --port 0`` in a child process: its address is read from its startup
    line, and it is ready once ``/health`` answers there."""

    def __init__(self, path: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmtrain", "serve", str(path), "--port", "0",
             "--device", "cpu", *flags], env=child_env({"OMP_NUM_THREADS": "1", **(env or {})}),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        self.url = self._startup_url(deadline)
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the server did not answer at {self.url}")
            time.sleep(0.2)

    def _startup_url(self, deadline: float) -> str:
        """The address the startup line names (``serving 'qa' (step 30) at URL/ ...``)."""
        assert self.proc.stdout is not None
        while select.select([self.proc.stdout], [], [], max(deadline - time.monotonic(), 0))[0]:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"the server ended: {self.proc.communicate()}")
            found = re.match(r"serving '.*' \(step \d+\) at (http://127\.0\.0\.1:(\d+))/", line)
            if found:
                assert int(found[2]) > 0, line
                return found[1]
        self.stop()
        raise AssertionError("the server did not start in 120 s")

    def settles(self, seconds: float = 15) -> bool:
        """Whether no request is in flight within ``seconds``."""
        deadline = time.monotonic() + seconds
        while httpx.get(self.url + "/health").json()["in_flight"]:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.communicate()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(qa_run: Path) -> Iterator[Server]:
    served = Server(qa_run, "--max-tokens-limit", "100000")
    yield served
    assert served.stop() == 0


def _chat(url: str, question: str, **extra: Any) -> dict[str, Any]:
    body = {"model": "qa", "messages": [{"role": "user", "content": question}],
            "max_tokens": 12, "temperature": 0, **extra}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_openai_client_streams_and_not(server: Server) -> None:
    openai = pytest.importorskip("openai", reason="the openai client is not installed")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["qa"]
    whole = client.chat.completions.create(model="qa", temperature=0, max_tokens=12,
                                           messages=[{"role": "user", "content": QUESTIONS[0]}])
    answer = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant" and answer
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 10
    streamed = client.chat.completions.create(
        model="qa", temperature=0, max_tokens=12, stream=True,
        messages=[{"role": "user", "content": QUESTIONS[0]}])
    pieces = [c.choices[0].delta.content or "" for c in streamed if c.choices]
    assert "".join(pieces) == answer
    prompt = f"QUESTION: {QUESTIONS[1]} ANSWER:"
    done = client.completions.create(model="qa", prompt=prompt, max_tokens=10, temperature=0)
    parts = client.completions.create(model="qa", prompt=prompt, max_tokens=10, temperature=0,
                                      stream=True)
    assert "".join(c.choices[0].text for c in parts) == done.choices[0].text
    assert done.usage.completion_tokens == 10 or done.choices[0].finish_reason == "stop"
    seeded = [client.completions.create(model="qa", prompt="QUESTION:", max_tokens=15,
                                        temperature=1.0, seed=3).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        client.completions.create(model="qa", prompt="x", n=2)


def test_16_concurrent_clients_get_their_one_at_a_time_answers(server: Server) -> None:
    questions = [QUESTIONS[i % 6] + f" {QUESTIONS[(i + 1) % 6]}" * (i // 6) for i in range(16)]
    greedy = [_chat(server.url, q)["choices"][0]["message"]["content"] for q in questions]
    seeded = [_chat(server.url, q, temperature=1.0, seed=i)["choices"][0]["message"]["content"]
              for i, q in enumerate(questions)]
    together: dict[tuple[str, int], str] = {}

    def ask(i: int, sampled: bool) -> None:
        extra = {"temperature": 1.0, "seed": i} if sampled else {}
        together[sampled, i] = _chat(server.url, questions[i], **extra)["choices"][0][
            "message"]["content"]

    threads = [threading.Thread(target=ask, args=(i, sampled))
               for i in range(16) for sampled in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[False, i] for i in range(16)] == greedy
    assert [together[True, i] for i in range(16)] == seeded
    assert len(set(greedy)) > 1


def test_a_client_that_goes_away_stops_its_generation(server: Server) -> None:
    body = {"model": "qa", "prompt": "QUESTION:", "max_tokens": 100_000, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert httpx.get(server.url + "/health").json()["in_flight"] == 1
    assert server.settles(), "the request was still being decoded after its client left"
    assert _chat(server.url, QUESTIONS[0])["choices"][0]["message"]["content"]


def test_a_whole_answer_stops_when_its_client_goes_away(server: Server) -> None:
    """No write fails for a client waiting for a whole answer: the server polls for its
    leaving, and cancels the generation long before its max_tokens."""
    health = server.url + "/health"
    before = httpx.get(health).json()["ended"]
    body = json.dumps({"model": "qa", "prompt": "QUESTION:", "max_tokens": 100_000}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (host.encode(), len(body), body))
        deadline = time.monotonic() + 15
        while httpx.get(health).json()["in_flight"] != 1:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.05)
    assert server.settles(), "the request was still being decoded after its client left"
    after = httpx.get(health).json()["ended"]
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["length"] == before["length"]


def test_a_gpt2_lora_checkpoint_serves_through_the_openai_client(tmp_path: Path,
                                                                  tiny_gpt2_dir: Path) -> None:
    openai = pytest.importorskip("openai", reason="the openai client is not installed")
    run = _train(tmp_path, model_type="gpt2", use_lora=True, gpt2_model_name=str(tiny_gpt2_dir),
                 training_steps=3, checkpoint_interval=3, eval_interval=3, block_size=32)
    served = Server(run / "step_0000003.pt", "--model-name", "lora")
    try:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
        question = [{"role": "user", "content": QUESTIONS[2]}]
        whole = client.chat.completions.create(model="lora", messages=question, max_tokens=8,
                                               temperature=0)
        parts = client.chat.completions.create(model="lora", messages=question, max_tokens=8,
                                               temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices) == \
            whole.choices[0].message.content
        assert whole.usage.completion_tokens >= 1
    finally:
        assert served.stop() == 0


def test_sigterm_finishes_the_requests_in_flight_then_exits(qa_run: Path) -> None:
    served = Server(qa_run, "--max-tokens-limit", "100000", env={"LMTRAIN_API_KEY": "k"})
    headers = {"Authorization": "Bearer k"}
    assert httpx.get(served.url + "/v1/models").status_code == 401
    assert httpx.get(served.url + "/health").status_code == 200
    whole: list[httpx.Response] = []
    asked = threading.Thread(target=lambda: whole.append(httpx.post(
        served.url + "/v1/completions", headers=headers, timeout=120,
        json={"model": "qa", "prompt": "QUESTION:", "max_tokens": 2000})))
    asked.start()
    deadline = time.monotonic() + 15
    while not httpx.get(served.url + "/health").json()["in_flight"]:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.05)
    body = {"model": "qa", "prompt": "QUESTION:", "max_tokens": 400, "stream": True,
            "stream_options": {"include_usage": True}}
    events: list[str] = []
    with httpx.stream("POST", served.url + "/v1/completions", json=body, headers=headers,
                      timeout=120) as response:
        for line in response.iter_lines():
            if not line:
                continue
            events.append(line)
            if len(events) == 1:
                assert httpx.get(served.url + "/health").json()["in_flight"] == 2
                served.proc.send_signal(signal.SIGTERM)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 400
    asked.join()
    assert whole[0].status_code == 200, whole[0].text
    assert whole[0].json()["usage"]["completion_tokens"] == 2000
    assert served.proc.wait(timeout=30) == 0
    err = served.proc.communicate()[1]
    assert "SIGTERM: stopping once the requests in flight have ended" in err
    assert "Traceback" not in err


def test_a_second_ctrl_c_cuts_the_requests_in_flight_short(qa_run: Path) -> None:
    served = Server(qa_run, "--max-tokens-limit", "100000")
    body = {"model": "qa", "prompt": "QUESTION:", "max_tokens": 100_000, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=60) as r:
        lines = (line for line in r.iter_lines() if line)
        assert next(lines).startswith("data: ")
        served.proc.send_signal(signal.SIGINT)
        with pytest.raises(httpx.TransportError):  # stopping: no new connection is accepted
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                httpx.get(served.url + "/health", timeout=1)
                time.sleep(0.05)
        assert all(next(lines).startswith("data: {") for _ in range(20))  # the answer goes on
        served.proc.send_signal(signal.SIGINT)
        assert served.proc.wait(timeout=30) == 128 + signal.SIGINT
    err = served.proc.communicate()[1]
    assert "SIGINT again: exiting now" in err and "Traceback" not in err


def test_lmtrain_chat_through_a_pseudo_terminal(qa_run: Path, server: Server) -> None:
    pexpect = pytest.importorskip("pexpect", reason="pexpect is not installed")
    args = ["-m", "lmtrain", "chat", str(qa_run), "--top-k", "1", "--max-new-tokens", "12",
            "--device", "cpu"]
    env = child_env({"OMP_NUM_THREADS": "1"})
    child = pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", timeout=90)
    child.expect("/reset forgets")
    child.expect("> ")
    answers = []
    for question in QUESTIONS[:2]:
        child.sendline(question)
        child.expect(r"\r\n> ")
        echoed, _, said = child.before.partition("\r\n")
        assert echoed.strip() == question
        answers.append(said.strip())
    # the first answer is the server's; the second follows the conversation so far
    assert answers[0] == _chat(server.url, QUESTIONS[0])["choices"][0]["message"]["content"]
    child.sendline("/reset")
    child.expect("forgotten")
    child.expect("> ")
    child.sendline(QUESTIONS[0])
    child.expect(r"\r\n> ")
    assert child.before.partition("\r\n")[2].strip() == answers[0]
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    child = pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", timeout=90)
    child.expect("> ")
    child.sendeof()  # Ctrl-D
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


class _Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4)."""

    def __init__(self, profile: Path) -> None:
        to_browser, self.cmd = os.pipe()
        self.out, from_browser = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{to_browser} 4>&{from_browser}', "_", str(CHROMIUM),
             *flags], pass_fds=(to_browser, from_browser), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env=child_env())
        os.close(to_browser)
        os.close(from_browser)
        self.next_id, self.buffer, self.session = 0, b"", None

    def call(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self.cmd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise AssertionError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.out], [], [], left)[0]:
                raise AssertionError(f"{method}: no answer from Chromium in {timeout} s")
            chunk = os.read(self.out, 1 << 16)
            if not chunk:
                raise AssertionError("Chromium closed its pipe")
            self.buffer += chunk

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, expression: str, seconds: float = 90) -> Any:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"never true in the page: {expression}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.cmd)
        os.close(self.out)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get install "
                                             "chromium); the playground page is not tested")
def test_the_playground_page_streams_an_answer_in_chromium(server: Server,
                                                           tmp_path: Path) -> None:
    expected = _chat(server.url, QUESTIONS[3], max_tokens=20)["choices"][0]["message"]["content"]
    browser = _Browser(tmp_path / "profile")
    try:
        browser.open(server.url + "/")
        browser.wait_for("document.readyState === 'complete' && !!document.getElementById('send')")
        browser.js(f"""
            window.seen = [];
            const answer = document.getElementById('answer');
            new MutationObserver((records) => records.forEach(
                () => window.seen.push(answer.textContent))).observe(
                answer, {{childList: true, characterData: true, subtree: true}});
            document.getElementById('question').value = {json.dumps(QUESTIONS[3])};
            document.getElementById('temperature').value = '0';
            document.getElementById('max_tokens').value = '20';
            document.getElementById('send').click();""")
        status = browser.wait_for(
            "document.getElementById('status').textContent.startsWith('done') && "
            "document.getElementById('status').textContent")
        assert status.startswith("done")
        assert browser.js("document.getElementById('answer').textContent") == expected
        chunks = int(browser.js("document.getElementById('answer').dataset.chunks"))
        seen = [text for text in browser.js("window.seen") if text]
        assert chunks >= 1 and len(seen) >= chunks  # each streamed piece was shown as it came
        assert all(expected.startswith(text) for text in seen) and seen[-1] == expected
    finally:
        browser.close()
