"""A fake OpenAI-compatible server for tests: scripted replies, recorded requests.

::

    with FakeLLMServer() as server:                       # a free port, in a thread
        server.push(TextReply("hello", prompt_tokens=12, completion_tokens=3),
                    ErrorReply(429, {"error": {"message": "slow down"}}, retry_after="0"))
        os.environ["ORCH_LLM_BASE_URL"] = server.url        # http://127.0.0.1:PORT/v1
        ...
        server.chat_requests[0].body["messages"]           # what was sent

Replies are served in order; once the queue is empty every chat gets ``default``. A
:class:`HoldReply` keeps the request open until :meth:`FakeLLMServer.release` or the
client goes away, which sets :attr:`FakeLLMServer.disconnected` (how a test sees that a
cancelled call closed its connection).

As a process, ``python -m tests.fakes.llm_server --port 0 [--script replies.json]``
prints ``{"url": ..., "port": ...}`` as one JSON line and serves until killed; scripts
go to ``POST /_control/replies`` (a JSON list of replies as :func:`reply_from_dict`
reads them), ``POST /_control/release`` lets held requests go, and the record comes
from ``GET /_control/requests``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import select
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final, Self

#: The one model the fake lists.
MODEL_ID: Final = "fake-model"
#: How often a held request checks whether its client went away or it was released.
HOLD_POLL_S: Final = 0.02
#: How often the serving thread checks for shutdown (the stdlib's 0.5 s slows teardown).
SHUTDOWN_POLL_S: Final = 0.05
#: How long a held request waits at most (a test that forgets to release it ends anyway).
HOLD_MAX_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class TextReply:
    """A successful completion, sent after ``delay_s`` (longer than the client's timeout
    makes a timeout); ``usage=False`` leaves the usage block out."""

    text: str = "ok"
    prompt_tokens: int = 10
    completion_tokens: int = 5
    delay_s: float = 0.0
    usage: bool = True
    kind: str = "text"


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """An HTTP error: ``status`` with a JSON (dict) or text body, and a Retry-After
    header when ``retry_after`` is given."""

    status: int
    body: dict[str, Any] | str = field(default_factory=lambda: {"error": {"message": "error"}})
    retry_after: str | None = None
    kind: str = "error"


@dataclass(frozen=True, slots=True)
class HoldReply:
    """Keep the request open (no reply) until released or the client disconnects."""

    kind: str = "hold"


Reply = TextReply | ErrorReply | HoldReply


def reply_from_dict(spec: dict[str, Any]) -> Reply:
    """A reply from its JSON form: ``{"kind": "text"|"error"|"hold", ...fields}``.

    Raises:
        ValueError: an unknown kind or field.
    """
    fields = dict(spec)
    kind = fields.pop("kind", "text")
    classes: dict[str, type[TextReply | ErrorReply | HoldReply]] = {
        "text": TextReply, "error": ErrorReply, "hold": HoldReply}
    if kind not in classes:
        raise ValueError(f"unknown reply kind {kind!r}; expected one of {sorted(classes)}")
    try:
        return classes[kind](**fields)
    except TypeError as e:
        raise ValueError(f"bad {kind} reply {spec!r}: {e}") from None


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request the fake received."""

    method: str
    path: str
    #: names in lower case
    headers: dict[str, str]
    body: Any


class FakeLLMServer:
    """The fake, serving on 127.0.0.1 in a daemon thread.

    Args:
        port: 0 for a free port.
        default: the reply once the scripted queue is empty.
    """

    def __init__(self, port: int = 0, default: Reply | None = None,
                 host: str = "127.0.0.1") -> None:
        self.default: Reply = default or TextReply()
        self._replies: deque[Reply] = deque()
        self._requests: list[RecordedRequest] = []
        self._changed = threading.Condition()
        self._released = threading.Event()
        #: set when a client closed its connection while its request was held or delayed
        self.disconnected = threading.Event()
        #: set when a request starts being held (the client is now waiting on us)
        self.holding = threading.Event()
        self._ids = itertools.count(1)
        self._httpd = ThreadingHTTPServer((host, port), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The base URL clients use (``ORCH_LLM_BASE_URL``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> Self:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        args=(SHUTDOWN_POLL_S,), name="fake-llm", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, release held requests and close the socket."""
        self._released.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ script

    def push(self, *replies: Reply) -> None:
        """Queue replies for the next chat requests, in order."""
        with self._changed:
            self._replies.extend(replies)

    def release(self) -> None:
        """Let held requests go (they then answer with the default reply)."""
        self._released.set()

    def next_reply(self) -> Reply:
        """The reply for the chat request being served."""
        with self._changed:
            return self._replies.popleft() if self._replies else self.default

    # ------------------------------------------------------------------ record

    def record(self, request: RecordedRequest) -> None:
        """Keep ``request`` and wake waiters."""
        with self._changed:
            self._requests.append(request)
            self._changed.notify_all()

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request so far (control requests excepted), oldest first."""
        with self._changed:
            return list(self._requests)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        """The chat completion requests so far."""
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def wait_chat_requests(self, count: int, timeout: float = 10.0) -> list[RecordedRequest]:
        """Block until ``count`` chat requests arrived; raise TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len([r for r in self._requests if r.path.endswith("/chat/completions")]) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{count} chat requests expected within {timeout} s, "
                                       f"got {len(self.chat_requests)}")
                self._changed.wait(left)
        return self.chat_requests

    def next_id(self) -> int:
        """A fresh completion number."""
        return next(self._ids)

    def wait_held(self, request_socket: socket.socket, delay_s: float | None) -> bool:
        """Wait until released (``delay_s`` None) or ``delay_s`` passed; returns False
        (and sets :attr:`disconnected`) when the client closed the connection first."""
        deadline = time.monotonic() + (HOLD_MAX_S if delay_s is None else delay_s)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (delay_s is None and self._released.is_set()):
                return True
            readable, _, _ = select.select([request_socket], [], [], min(left, HOLD_POLL_S))
            if readable and not request_socket.recv(1, socket.MSG_PEEK):
                self.disconnected.set()
                return False


def _lower(headers: Any) -> dict[str, str]:
    """Header names in lower case (HTTP names are case-insensitive; clients differ)."""
    return {name.lower(): value for name, value in headers.items()}


def _handler_for(server: FakeLLMServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        fake = server

    return Handler


class _Handler(BaseHTTPRequestHandler):
    """Serves the OpenAI routes and the control routes of one :class:`FakeLLMServer`."""

    fake: FakeLLMServer
    # HTTP/1.1 keeps connections alive, as real servers do (httpx pools them).
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: tests read the record, not a log."""

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return raw.decode("utf-8", "replace")

    def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type",
                         "text/plain" if isinstance(body, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        """``/v1/models`` and ``/_control/requests``."""
        if self.path == "/_control/requests":
            self._send_json(200, [asdict(r) for r in self.fake.requests])
            return
        self.fake.record(RecordedRequest("GET", self.path, _lower(self.headers), None))
        if self.path.rstrip("/").endswith("/models"):
            self._send_json(200, {"object": "list", "data": [
                {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "fake"}]})
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        """``/v1/chat/completions``, ``/_control/replies`` and ``/_control/release``."""
        body = self._body()
        if self.path == "/_control/release":
            self.fake.release()
            self._send_json(200, {"released": True})
            return
        if self.path == "/_control/replies":
            try:
                self.fake.push(*[reply_from_dict(spec) for spec in body or []])
            except (ValueError, TypeError) as e:
                self._send_json(400, {"error": {"message": str(e)}})
                return
            self._send_json(200, {"queued": len(body or [])})
            return
        self.fake.record(RecordedRequest("POST", self.path, _lower(self.headers), body))
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})
            return
        self._answer_chat(body if isinstance(body, dict) else {}, self.fake.next_reply())

    def _answer_chat(self, body: dict[str, Any], reply: Reply) -> None:
        if isinstance(reply, HoldReply):
            self.fake.holding.set()
            if not self.fake.wait_held(self.connection, None):
                self.close_connection = True
                return
            reply = self.fake.default if not isinstance(self.fake.default, HoldReply) \
                else TextReply()
        if isinstance(reply, ErrorReply):
            headers = {} if reply.retry_after is None else {"Retry-After": reply.retry_after}
            self._send_json(reply.status, reply.body, headers)
            return
        if reply.delay_s and not self.fake.wait_held(self.connection, reply.delay_s):
            self.close_connection = True
            return
        answer: dict[str, Any] = {
            "id": f"chatcmpl-{self.fake.next_id()}", "object": "chat.completion",
            "created": int(time.time()), "model": body.get("model", MODEL_ID),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": reply.text}}],
        }
        if reply.usage:
            answer["usage"] = {"prompt_tokens": reply.prompt_tokens,
                               "completion_tokens": reply.completion_tokens,
                               "total_tokens": reply.prompt_tokens + reply.completion_tokens}
        try:
            self._send_json(200, answer)
        except (BrokenPipeError, ConnectionResetError):
            self.fake.disconnected.set()
            self.close_connection = True


def main(argv: list[str] | None = None) -> None:
    """Serve until killed; print the URL as one JSON line first."""
    parser = argparse.ArgumentParser(description="A fake OpenAI-compatible chat server.")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--script", help="a JSON file: a list of replies to queue")
    args = parser.parse_args(argv)
    server = FakeLLMServer(args.port)
    if args.script:
        with open(args.script, encoding="utf-8") as f:
            server.push(*[reply_from_dict(spec) for spec in json.load(f)])
    print(json.dumps({"url": server.url, "port": server.port}), flush=True)
    try:
        server._httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
