"""`offload serve` end to end: the real server process on a free port of 127.0.0.1 with the
bundled demo model, spoken to with the official ``openai`` client and raw ``httpx``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 512
PROMPT = "What is a list in Python?"
N = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``python -m cli serve`` process; killed in ``stop``."""

    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--port", str(self.port), "--context", str(CONTEXT), "-q",
             "-t", "1", *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.time() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("server did not answer /health within 60 s")
            time.sleep(0.1)

    def client(self, **kwargs) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0,
                             **kwargs)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server():
    s = Server()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def generated() -> str:
    """What ``offload generate --chat`` prints for PROMPT, greedy, N tokens (its final newline off)."""
    out = subprocess.run(
        [sys.executable, "-m", "cli", "generate", "--chat", "-p", PROMPT, "-n", str(N), "--temp", "0", "-q",
         "--context", str(CONTEXT)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert out.endswith("\n")
    return out[:-1]


def chat(client, prompt=PROMPT, n=N, **kwargs):
    return client.chat.completions.create(model="offload-demo", messages=[{"role": "user", "content": prompt}],
                                          max_tokens=n, temperature=0, **kwargs)


def test_chat_completion_matches_generate(server, generated):
    reply = chat(server.client())
    assert reply.choices[0].message.content == generated
    assert reply.choices[0].message.role == "assistant"
    assert reply.object == "chat.completion"
    assert reply.usage.completion_tokens <= N and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason == ("length" if reply.usage.completion_tokens == N else "stop")
    extra = reply.model_extra["offload"]
    assert extra["generation_tokens_per_s"] > 0
    assert {"expert_hit_rate", "mib_moved_per_token", "prompt_tokens_reused"} <= set(extra)


def test_streamed_chat_matches_generate(server, generated):
    chunks = list(chat(server.client(), stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == generated
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # streamed, not one piece
    final = chunks[-1]
    assert final.choices[0].finish_reason in ("length", "stop")
    assert final.usage.completion_tokens <= N
    assert "offload" in final.model_extra


def test_stream_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_completion_and_stop(server):
    client = server.client()
    reply = client.completions.create(model="offload-demo", prompt="The list type", max_tokens=8, temperature=0)
    out = subprocess.run([sys.executable, "-m", "cli", "generate", "-p", "The list type", "-n", "8", "--temp", "0",
                          "-q", "--context", str(CONTEXT)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert reply.choices[0].text == out[:-1]
    assert reply.usage.completion_tokens <= 8
    # a stop string from the text itself ends it there, finish_reason "stop"
    text = reply.choices[0].text
    word = next((w for w in text.split() if len(w) >= 2), None)
    if word is not None:
        cut = client.completions.create(model="offload-demo", prompt="The list type", max_tokens=8, temperature=0,
                                        stop=[word])
        assert cut.choices[0].finish_reason == "stop"
        assert word not in cut.choices[0].text
        assert text.startswith(cut.choices[0].text)


def test_models(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["offload-demo"]


def test_three_clients_at_once_match_serial(server):
    prompts = ["What is a tuple?", "How do I open a file?", "Explain dict.get"]
    serial = [chat(server.client(), p, 12).choices[0].message.content for p in prompts]
    results: dict[int, str] = {}
    errors = []

    def ask(i):
        try:
            results[i] = chat(server.client(), prompts[i], 12).choices[0].message.content
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert [results[i] for i in range(3)] == serial


def test_health_answers_during_generation(server):
    done = threading.Event()

    def long():
        chat(server.client(), "Write a long story", 400)
        done.set()

    t = threading.Thread(target=long)
    t.start()
    time.sleep(0.3)
    started = time.perf_counter()
    health = httpx.get(server.url + "/health", timeout=5)
    assert health.status_code == 200
    assert time.perf_counter() - started < 1.0
    t.join(60)
    assert done.is_set()


def test_dropped_stream_leaves_server_serving(server, generated):
    before = httpx.get(server.url + "/metrics").json()
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "Write a long story"}], "max_tokens": 450, "temperature": 0,
            "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 6:
                break  # the client goes away mid-stream
    reply = chat(server.client())  # the next request is served, and gives the same text
    assert reply.choices[0].message.content == generated
    deadline = time.time() + 10
    while time.time() < deadline:
        after = httpx.get(server.url + "/metrics").json()
        if after["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.1)
    assert after["cancelled"] == before["cancelled"] + 1
    # stopped at the next token, not after its 450
    assert after["completion_tokens"] - before["completion_tokens"] < 450


def post(server, path, body=None, content=None, headers=None):
    return httpx.post(server.url + path, json=body, content=content, headers=headers, timeout=30)


def error_of(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, status, param, words", [
    ({"messages": MSG, "temperature": 2.5}, 400, "temperature", ["2"]),
    ({"messages": MSG, "temperature": -1}, 400, "temperature", []),
    ({"messages": MSG, "top_p": 0}, 400, "top_p", []),
    ({"messages": MSG, "top_p": 1.5}, 400, "top_p", []),
    ({"messages": MSG, "temperature": "hot"}, 400, "temperature", ["hot"]),
    ({"messages": MSG, "max_tokens": "ten"}, 400, "max_tokens", []),
    ({"messages": "hi"}, 400, "messages", []),
    ({}, 400, "messages", []),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role", []),
    ({"messages": MSG, "n": 2}, 400, "n", ["2"]),
    ({"messages": MSG, "model": "gpt-4"}, 404, "model", ["gpt-4", "offload-demo"]),
    ({"messages": [{"role": "user", "content": "word " * 1000}]}, 400, "messages", [str(CONTEXT)]),
])
def test_bad_chat_requests(server, body, status, param, words):
    error = error_of(post(server, "/v1/chat/completions", body), status)
    assert error["param"] == param
    for word in words:
        assert word in error["message"]
    assert post(server, "/v1/chat/completions", {"messages": MSG, "max_tokens": 1}).status_code == 200


def test_bad_bodies_and_paths(server):
    error_of(post(server, "/v1/chat/completions", content=b"{not json",
                  headers={"content-type": "application/json"}), 400)
    error_of(post(server, "/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"}),
             400)
    error_of(post(server, "/v1/completions", {"prompt": 5}), 400)
    error_of(post(server, "/v1/completions", {"prompt": "x " * 2000}), 400)
    error_of(httpx.get(server.url + "/v1/nothing"), 404)
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="offload-demo", messages=MSG, temperature=9)
    assert httpx.get(server.url + "/health").status_code == 200


def test_soak_rss_flat(server):
    client = server.client()
    process = psutil.Process(server.proc.pid)
    rss = []
    for i in range(200):
        if i % 2:
            reply = client.completions.create(model="offload-demo", prompt=f"item {i}", max_tokens=1 + i % 2)
        else:
            reply = client.chat.completions.create(model="offload-demo", max_tokens=1 + i % 2,
                                                   messages=[{"role": "user", "content": f"number {i}"}])
        assert reply.usage.completion_tokens >= 1
        rss.append(process.memory_info().rss)
    baseline = rss[9]
    assert max(rss[10:]) <= baseline * 1.05, (baseline, max(rss[10:]))


def test_metrics_count(server):
    metrics = httpx.get(server.url + "/metrics").json()
    assert metrics["requests"] >= 200
    assert metrics["completion_tokens"] >= 200
    assert metrics["client_errors"] >= 10
    assert metrics["busy"] is False and metrics["waiting"] == 0


def test_queue_full_is_503_and_key_and_cors():
    s = Server("--queue-size", "1", "--api-key", "sekret", "--cors", "http://example.org")
    try:
        headers = {"Authorization": "Bearer sekret"}
        assert error_of(post(s, "/v1/chat/completions", {"messages": MSG}), 401)["type"] == "authentication_error"
        error_of(post(s, "/v1/chat/completions", {"messages": MSG}, headers={"Authorization": "Bearer wrong"}), 401)
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        assert s.client(api_key="sekret").models.list().data[0].id == "offload-demo"
        assert httpx.get(s.url + "/health").status_code == 200  # no key needed
        cors = httpx.options(s.url + "/v1/models", headers={"Origin": "http://example.org",
                                                            "Access-Control-Request-Method": "GET"})
        assert cors.headers.get("access-control-allow-origin") == "http://example.org"

        statuses, retry_after = [], []

        def ask():
            r = post(s, "/v1/chat/completions", {"messages": [{"role": "user", "content": "story"}],
                                                 "max_tokens": 300, "temperature": 0}, headers=headers)
            statuses.append(r.status_code)
            if r.status_code == 503:
                retry_after.append(r.headers.get("retry-after"))
                assert r.json()["error"]["code"] == "queue_full"

        threads = [threading.Thread(target=ask) for _ in range(5)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(120)
        assert statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
        assert set(statuses) <= {200, 503}
        assert all(r and int(r) > 0 for r in retry_after)
        assert post(s, "/v1/chat/completions", {"messages": MSG, "max_tokens": 1}, headers=headers).status_code == 200
    finally:
        assert s.stop() == 0  # SIGTERM: a clean exit


def test_no_cors_without_origin(server):
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "http://example.org"})
    assert "access-control-allow-origin" not in r.headers


def test_port_taken_is_one_line(server):
    out = subprocess.run([sys.executable, "-m", "cli", "serve", "--port", str(server.port), "-q"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "cannot listen" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_engine_error_is_500_for_that_request_only():
    """In process (create_app over a loaded engine): a decode that raises fails its request with
    a 500 in OpenAI's shape; the next request is served."""
    from starlette.testclient import TestClient

    from offload.demo import DEMO_MODEL_DIR
    from offload.engine import Engine
    from offload.server import create_app

    engine = Engine.load(DEMO_MODEL_DIR, device="cpu", context_length=CONTEXT)
    real = engine.decode
    calls = {"n": 0}

    def failing(token):
        calls["n"] += 1
        raise RuntimeError("simulated device failure")

    with TestClient(create_app(engine, "demo")) as client:
        engine.decode = failing
        r = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 5})
        error = error_of(r, 500)
        assert "simulated device failure" in error["message"] and error["type"] == "server_error"
        assert calls["n"] == 1
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 5, "stream": True})
        # the first token comes from prefill, so the 200 stream has begun: the failure is an error event
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert "simulated device failure" in events[-1]["error"]["message"]
        assert r.text.rstrip().endswith("data: [DONE]")
        engine.decode = real
        ok = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 3, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
        assert client.get("/metrics").json()["server_errors"] == 2
