"""`bitsmith serve`: an OpenAI-compatible HTTP API over the continuous-batching engine (stdlib HTTP, one engine thread)."""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bitsmith.errors import BitsmithError
from bitsmith.runtime.engine import Engine, Request, Sequence
from bitsmith.runtime.server_api import ApiError, Job, RequestBuilder
from bitsmith.runtime.server_output import Shaper

# Threads: the HTTP server answers each connection on its own thread; those threads only validate,
# enqueue and wait. One engine thread owns the Engine (not thread safe): it admits queued requests
# between steps, runs steps, and pushes each request's new text into that request's own queue.


@dataclass
class Pending:
    """A request between its HTTP thread and the engine thread."""

    request: Request
    events: "queue.Queue[tuple[str, Any]]" = field(default_factory=queue.Queue)  # ("text", delta) | ("done", seq)
    seq: Sequence | None = None
    sent: str = ""
    cancelled: bool = False


class EngineLoop(threading.Thread):
    """Owns the engine; bounded admission (max_pending) so overload is refused early with 429."""

    def __init__(self, engine: Engine, max_pending: int) -> None:
        super().__init__(name="bitsmith-engine", daemon=True)
        self.engine, self.max_pending = engine, max_pending
        self.inbox: "queue.Queue[Pending]" = queue.Queue()
        self.active: list[Pending] = []
        self.lock = threading.Lock()
        self.count = 0  # admitted and not finished
        self.stopping = threading.Event()
        self.wake = threading.Event()

    def submit(self, pending: Pending) -> None:
        with self.lock:
            if self.stopping.is_set():
                raise ApiError(503, "the server is shutting down", "unavailable")
            if self.count >= self.max_pending:
                raise ApiError(429, f"too many requests in flight ({self.max_pending}); retry later", "rate_limit")
            self.count += 1
        self.inbox.put(pending)
        self.wake.set()

    def _finish(self, pending: Pending) -> None:
        with self.lock:
            self.count -= 1
        self.active.remove(pending)
        seq = pending.seq
        if seq.constraint_error and not pending.cancelled:  # not an answer: the client must learn why it stopped
            pending.events.put(("error", f"constrained decoding stopped after {len(seq.generated)} tokens: "
                                         f"{seq.constraint_error}; change the schema, pattern or grammar so the "
                                         "model's vocabulary can write it"))
        else:
            pending.events.put(("done", seq))

    def run(self) -> None:
        while True:
            while not self.inbox.empty():
                pending = self.inbox.get()
                try:
                    pending.seq = self.engine.add(pending.request)
                    self.active.append(pending)
                except Exception as exc:  # a request the engine refuses must not stop this thread (all would hang)
                    with self.lock:
                        self.count -= 1
                    pending.events.put(("error", exc.problem if isinstance(exc, BitsmithError)
                                        else f"the engine refused the request: {exc}"))
            for pending in [p for p in self.active if p.cancelled]:
                self.engine.abort(pending.seq)
                self._finish(pending)
            if not self.engine.has_work():
                if self.stopping.is_set() and not self.active:
                    return
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as exc:  # a kernel failure: fail every in-flight request rather than hang them
                for pending in list(self.active):
                    self.engine.abort(pending.seq)
                    pending.events.put(("error", f"engine failure: {exc}"))
                    self.active.remove(pending)
                    with self.lock:
                        self.count -= 1
                continue
            for pending in list(self.active):
                seq = pending.seq
                text = seq.text
                ready = text
                if not seq.done:
                    # hold back what a stop string could still cut, and a trailing partial UTF-8 character
                    hold = max((len(s) for s in seq.request.stop_strings), default=1) - 1
                    ready = text[:len(text) - hold] if hold else text
                    ready = ready.rstrip("\ufffd")
                if len(ready) > len(pending.sent):
                    pending.events.put(("text", ready[len(pending.sent):]))
                    pending.sent = ready
                if seq.done:
                    self._finish(pending)


class Api:
    """The request builder, the response shaper and the engine loop the HTTP threads share."""

    def __init__(self, loop: EngineLoop, tokenizer: Any, model_name: str, chat_template: str | None,
                 max_context: int, vocab_size: int | None) -> None:
        self.loop, self.model_name = loop, model_name
        self.builder = RequestBuilder(tokenizer, model_name, chat_template, max_context, vocab_size)
        self.shaper = Shaper(tokenizer, model_name)


def make_handler(api: Api) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # one small write per streamed token: send each at once (TCP_NODELAY) instead of letting Nagle's
        # algorithm hold it until the client acknowledges the previous one
        disable_nagle_algorithm = True
        server_version = "bitsmith"

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet: one line per request is too much under load
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, exc: ApiError) -> None:
            self._send(exc.status, {"error": {"message": exc.message, "type": exc.kind, "code": exc.status}})

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200, {"status": "ok", "in_flight": api.loop.count})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": api.model_name, "object": "model",
                                                             "owned_by": "bitsmith", "created": 0}]})
            else:
                self._error(ApiError(404, f"no route {self.path}", "not_found"))

        def do_POST(self) -> None:
            chat = self.path == "/v1/chat/completions"
            if self.path not in ("/v1/completions", "/v1/chat/completions"):
                self._error(ApiError(404, f"no route {self.path}", "not_found"))
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length > 1 << 20:
                    raise ApiError(413, "the body is larger than 1 MiB")
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise ApiError(400, f"malformed JSON: {exc}") from exc
                job = api.builder.build(body, chat)
                pendings = [Pending(request) for request in job.requests]
                for i, pending in enumerate(pendings):
                    try:
                        api.loop.submit(pending)
                    except ApiError:
                        self._cancel(pendings[:i])
                        raise
            except ApiError as exc:
                self._error(exc)
                return
            if job.stream:
                self._stream(job, pendings[0])
            else:
                self._collect(job, pendings)

        def _cancel(self, pendings: list[Pending]) -> None:
            for pending in pendings:
                pending.cancelled = True  # the engine thread frees its blocks
            api.loop.wake.set()

        def _collect(self, job: Job, pendings: list[Pending]) -> None:
            seqs = []
            for i, pending in enumerate(pendings):
                while True:
                    kind, value = pending.events.get()
                    if kind == "error":
                        self._cancel(pendings[i + 1:])
                        self._error(ApiError(400, value))
                        return
                    if kind == "done":
                        seqs.append(value)
                        break
            self._send(200, api.shaper.final(job, seqs))

        def _stream(self, job: Job, pending: Pending) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            hold = bool(job.tools)  # a tools answer is a call or text: known once it is complete
            try:
                while True:
                    kind, value = pending.events.get()
                    if kind == "error":
                        payloads = [{"error": {"message": value, "type": "invalid_request_error", "code": 400}}]
                    elif kind == "text":
                        payloads = [] if hold else [api.shaper.chunk(job, value, None)]
                    else:
                        payloads = api.shaper.last_chunks(job, value, hold)
                    for payload in payloads:
                        self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
                    self.wfile.flush()
                    if kind != "text":
                        break
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                self._cancel([pending])  # the client left

    return Handler


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # listen backlog: bursts of clients queue instead of being reset (default 5)


class Server:
    """The HTTP server plus its engine thread; `shutdown()` stops accepting and drains in-flight requests."""

    def __init__(self, engine: Engine, tokenizer: Any, model_name: str, chat_template: str | None,
                 host: str = "127.0.0.1", port: int = 8000, max_pending: int = 64) -> None:
        self.loop = EngineLoop(engine, max_pending)
        self.api = Api(self.loop, tokenizer, model_name, chat_template, engine.runner.max_context,
                       getattr(engine.runner, "vocab_size", None))
        self.httpd = _HTTPServer((host, port), make_handler(self.api))
        self.port = self.httpd.server_address[1]

    def serve_forever(self) -> None:
        self.loop.start()
        self.httpd.serve_forever(poll_interval=0.1)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="bitsmith-http", daemon=True)
        thread.start()
        return thread

    def shutdown(self, drain_seconds: float = 30.0) -> None:
        self.loop.stopping.set()  # new requests get 503
        deadline = time.time() + drain_seconds
        while self.loop.count and time.time() < deadline:
            time.sleep(0.05)
        self.httpd.shutdown()
        self.httpd.server_close()
        self.loop.wake.set()
