"""`serve` over loopback: OpenAI-shaped answers, streaming, validation errors, overload, a bounded load test."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bitsmith.pipeline import CompileOptions, MemoryOptions, QuantOptions
from bitsmith.runtime.artifact import load_artifact
from bitsmith.runtime.engine import Engine
from bitsmith.runtime.executor import KernelRunner
from bitsmith.runtime.server import Server
from conftest import attach_char_tokenizer

WORDS = ["hello", "the cat", "zebra", "quiet sea", "abc", "lighthouse", "moon", "xyz", "river bank", "tree"]


@pytest.fixture(scope="module")
def server(tiny_artifact, tmp_path_factory):
    shared = tiny_artifact(CompileOptions(quant=QuantOptions("rtn", bits=4, group_size=32),
                                          memory=MemoryOptions(context=64, concurrency=8)))
    path = Path(shutil.copytree(shared, tmp_path_factory.mktemp("serve") / "art"))
    attach_char_tokenizer(path)  # edits the manifest: on a copy, not the shared artifact
    art = load_artifact(path)
    tokenizer = art.tokenizer()
    srv = Server(Engine(KernelRunner(art), tokenizer), tokenizer, "tiny", None, port=0, max_pending=32)
    srv.start()
    yield srv
    srv.shutdown(drain_seconds=10)


def call(server, method, path, body=None, raw=None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read().decode()
    conn.close()
    return resp.status, payload


def stream(server, body, timeout=60):
    """(status, text reassembled from the SSE chunks, finish_reason)."""
    status, payload = call(server, "POST", "/v1/completions", {**body, "stream": True}, timeout=timeout)
    if status != 200:
        return status, payload, None
    text, finish = "", None
    events = [line[6:] for line in payload.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        choice = json.loads(event)["choices"][0]
        text += choice["text"]
        finish = choice["finish_reason"] or finish
    return status, text, finish


def test_routes_and_a_completion(server):
    assert call(server, "GET", "/health")[0] == 200
    status, body = call(server, "GET", "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "tiny"
    status, body = call(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 5,
                                                             "temperature": 0})
    out = json.loads(body)
    assert status == 200 and out["object"] == "text_completion" and out["usage"]["prompt_tokens"] == 5
    assert out["choices"][0]["finish_reason"] in ("length", "stop")
    # streaming gives exactly the same greedy text
    assert stream(server, {"prompt": "hello", "max_tokens": 5, "temperature": 0})[1] == out["choices"][0]["text"]
    status, body = call(server, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                                  "max_tokens": 3, "temperature": 0})
    assert status == 200 and json.loads(body)["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("raw, body, needle", [
    (b"{not json", None, "malformed JSON"),
    (None, {"prompt": "hi", "max_tokens": -3}, "max_tokens"),
    (None, {"prompt": "a" * 70, "max_tokens": 4}, "exceed the context"),
    (None, {"model": "gpt-4", "prompt": "hi"}, "unknown model"),
    (None, {"prompt": 5}, "prompt"),
    (None, {"messages": "hi"}, "messages"),
])
def test_bad_requests_get_400_and_the_server_keeps_serving(server, raw, body, needle):
    path = "/v1/chat/completions" if body and "messages" in body else "/v1/completions"
    status, payload = call(server, "POST", path, body, raw)
    assert status == 400 and needle in json.loads(payload)["error"]["message"]
    assert call(server, "POST", "/v1/completions", {"prompt": "ok", "max_tokens": 2})[0] == 200


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


def test_64_concurrent_streams_complete_unmixed_with_flat_memory(server):
    expected = {}
    for word in WORDS:  # greedy reference text per prompt, one request at a time
        status, body = call(server, "POST", "/v1/completions", {"prompt": word, "max_tokens": 12, "temperature": 0})
        expected[word] = json.loads(body)["choices"][0]["text"]

    def wave():
        results = [None] * 64

        def client(i):
            word = WORDS[i % len(WORDS)]
            try:
                results[i] = (word, *stream(server, {"prompt": word, "max_tokens": 12, "temperature": 0}, timeout=60))
            except OSError as exc:  # a refused connection would be a failure too: record it
                results[i] = (word, -1, str(exc), None)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert time.time() - t0 < 120
        return results

    first = wave()
    rss = _rss_mib()
    second = wave()
    for word, status, text, finish in first + second:
        assert status in (200, 429, 503), (status, text)
        if status == 200:
            assert text == expected[word] and finish in ("length", "stop")
        else:
            assert "error" in json.loads(text)
    completed = sum(r[1] == 200 for r in first + second)
    assert completed >= 64  # max_pending 32: at least half of each wave is served
    assert _rss_mib() - rss < 30
    assert server.loop.count == 0 and server.loop.engine.pool.available() == server.loop.engine.pool.num_blocks


def test_serve_command_starts_and_stops_gracefully(tiny_artifact, tmp_path):
    shared = tiny_artifact(CompileOptions(memory=MemoryOptions(context=64, concurrency=2)))
    path = Path(shutil.copytree(shared, tmp_path / "art"))
    attach_char_tokenizer(path)
    proc = subprocess.Popen([sys.executable, "-m", "bitsmith.cli", "serve", str(path), "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.time() + 60
        while "serving" not in line and time.time() < deadline:
            line = proc.stderr.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", line).group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
