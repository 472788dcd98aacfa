"""A scripted OpenAI-compatible model server for tests: real HTTP on 127.0.0.1, in a background thread.

Because it runs in its own thread it serves pytest-trio tests in the same process and the real daemon
started as a subprocess alike.

    with FakeLLM() as llm:                          # or: llm = FakeLLM().start() ... llm.stop()
        llm.reply_text("Hello there")               # the next request gets this, streamed in pieces
        llm.call_tool("read_file", {"path": "a"})   # the one after that: one tool call
        config = LLMConfig(base_url=llm.base_url, model="fake")   # base_url ends in /v1
        ...
        llm.requests[0].body["tools"], llm.requests[0].headers["authorization"]

Scripting. Each POST to .../chat/completions takes the next response from a queue (`push`); when the
queue is empty it gets `default` if set, else a 400 with an OpenAI error "fake_llm: nothing scripted ...".
A queued item may also be a function `(Request) -> response`, called when that request arrives (if it
raises, the answer is a 400 naming the exception).
GET .../models lists one model, "fake-model". Responses:

    Stream(events, delay=0, interval=0, done=True, drop_after=None)
        An SSE reply (chunked). events: a dict is sent as `data: <json>`, a str as `data: <str>` (so
        "{oops" makes a malformed chunk), bytes verbatim. `delay`: seconds before the headers;
        `interval`: seconds before each event; `done`: end with `data: [DONE]`; `drop_after=n`: close
        the connection after n events, mid-stream, without ending the chunked body.
    Json(body, status=200, delay=0, headers=None)   a plain JSON answer (a server that ignores `stream`).
    Error(status, message=None, retry_after=None, body=None, delay=0, code=None)
        An HTTP error; body defaults to {"error": {"message": message, "type": ..., "code": code}}.

Builders: `chunk(delta, finish_reason=None)` (one chat.completion.chunk), `text_stream(text, pieces=3)`,
`tool_stream([(name, args), ...], text="", piece=7)` (each call's id and name first, then its arguments
in `piece`-character fragments), `completion(text="", tool_calls=())` (a plain chat.completion body).
Shortcuts on FakeLLM: `reply_text(text, **stream_options)`, `call_tool(name, args, **stream_options)`,
`call_tools([(name, args), ...], text="")`, `reply_json(text="", tool_calls=())`,
`fail(status, message=None, retry_after=None)`. args may be a dict (sent as JSON) or a str (sent as is).

Inspection. `requests`: the requests received, in order; each `Request` has method, path, headers
(lower-case names), body (the parsed JSON, or None), raw (bytes), `disconnected` (a threading.Event
set when the client closed the connection before the response was complete) and `answered` (set when
the whole response was written). `pending`: how many scripted responses are still queued.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import select
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "fake-model"


@dataclasses.dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    raw: bytes
    body: Any
    disconnected: threading.Event = dataclasses.field(default_factory=threading.Event)
    answered: threading.Event = dataclasses.field(default_factory=threading.Event)


@dataclasses.dataclass
class Stream:
    events: list[dict[str, Any] | str | bytes]
    delay: float = 0.0
    interval: float = 0.0
    done: bool = True
    drop_after: int | None = None
    batch: int = 1  # events written together, in one chunk (as a fast server's socket would deliver them)


@dataclasses.dataclass
class Json:
    body: Any
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] | None = None


@dataclasses.dataclass
class Error:
    status: int
    message: str | None = None
    retry_after: str | float | None = None
    body: Any = None
    delay: float = 0.0
    code: str | None = None


Response = Stream | Json | Error
Script = Response | Callable[[Request], Response]

_ids = itertools.count(1)


def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
    """One chat.completion.chunk with a single choice."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        **extra,
    }


def _pieces(text: str, n: int) -> list[str]:
    if not text:
        return []
    size = max(1, -(-len(text) // max(1, n)))
    return [text[i : i + size] for i in range(0, len(text), size)]


def _args(args: dict[str, Any] | str) -> str:
    return args if isinstance(args, str) else json.dumps(args)


def text_stream(text: str, pieces: int = 3, usage: dict[str, int] | None = None, **options: Any) -> Stream:
    """`text` streamed in about `pieces` deltas, then finish_reason "stop" (and `usage` if given)."""
    events: list[dict[str, Any] | str | bytes] = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": p}) for p in _pieces(text, pieces)]
    events.append(chunk({}, "stop"))
    if usage is not None:
        events.append({**chunk({}), "choices": [], "usage": usage})
    return Stream(events, **options)


def tool_stream(
    calls: Iterable[tuple[str, dict[str, Any] | str]],
    text: str = "",
    piece: int = 7,
    usage: dict[str, int] | None = None,
    **options: Any,
) -> Stream:
    """Tool calls as OpenAI streams them: per call, a fragment with index, id and name, then the
    arguments in `piece`-character fragments; finish_reason "tool_calls" (then `usage` if given)."""
    events: list[dict[str, Any] | str | bytes] = [chunk({"role": "assistant", "content": None})]
    events += [chunk({"content": p}) for p in _pieces(text, 2)]
    for index, (name, args) in enumerate(calls):
        head = {"index": index, "id": f"call_{next(_ids)}", "type": "function"}
        events.append(chunk({"tool_calls": [{**head, "function": {"name": name, "arguments": ""}}]}))
        text_args = _args(args)
        for i in range(0, len(text_args), piece):
            fragment = {"index": index, "function": {"arguments": text_args[i : i + piece]}}
            events.append(chunk({"tool_calls": [fragment]}))
    events.append(chunk({}, "tool_calls"))
    if usage is not None:
        events.append({**chunk({}), "choices": [], "usage": usage})
    return Stream(events, **options)


def completion(
    text: str = "", tool_calls: Iterable[tuple[str, dict[str, Any] | str]] = (), usage: dict[str, int] | None = None
) -> dict[str, Any]:
    """A plain (non-streamed) chat.completion body."""
    calls = [
        {"id": f"call_{next(_ids)}", "type": "function", "function": {"name": name, "arguments": _args(args)}}
        for name, args in tool_calls
    ]
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}],
        "usage": usage or {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


class _Gone(Exception):
    """The client closed the connection."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 30  # an idle kept-alive connection's thread ends after this

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms Nagle stalls

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "fake"}]})
        else:
            self._json(404, {"error": {"message": f"fake_llm: no route {self.path}", "type": "not_found"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        request = Request("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, raw, body)
        fake = self.server.fake
        with fake.lock:
            fake._requests.append(request)
            script = fake._queue.popleft() if fake._queue else fake.default
        if not self.path.rstrip("/").endswith("/chat/completions"):
            script = Error(404, f"fake_llm: no route {self.path}")
        elif script is None:
            script = Error(400, f"fake_llm: nothing scripted for request #{len(fake.requests)}")
        try:
            response = script(request) if callable(script) else script
        except Exception as exc:
            response = Error(400, f"fake_llm: the script for request #{len(fake.requests)} raised {exc!r}")
        try:
            self._answer(response)
            request.answered.set()
        except (_Gone, OSError):
            request.disconnected.set()
            self.close_connection = True

    def _answer(self, response: Response) -> None:
        if isinstance(response, Stream):
            self._stream(response)
        elif isinstance(response, Json):
            self._wait(response.delay)
            self._json(response.status, response.body, response.headers)
        else:
            self._wait(response.delay)
            body = response.body
            if body is None:
                kind = "rate_limit_error" if response.status == 429 else "invalid_request_error"
                message = response.message or f"fake_llm: error {response.status}"
                body = {"error": {"message": message, "type": kind, "code": response.code}}
            headers = {} if response.retry_after is None else {"Retry-After": str(response.retry_after)}
            self._json(response.status, body, headers)

    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, response: Stream) -> None:
        self._wait(response.delay)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        pending: list[bytes] = []
        for n, event in enumerate(response.events):
            if response.drop_after is not None and n >= response.drop_after:
                self._drop()
                return
            self._wait(response.interval)
            if isinstance(event, bytes):
                data = event
            else:
                data = b"data: " + (event if isinstance(event, str) else json.dumps(event)).encode() + b"\n\n"
            pending.append(data)
            if len(pending) >= response.batch or n == len(response.events) - 1:
                self._chunk(b"".join(pending))
                pending.clear()
        if response.drop_after is not None and response.drop_after >= len(response.events):
            self._drop()
            return
        if response.done:
            self._wait(response.interval)
            self._chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.server.fake.written.append((time.monotonic(), data))

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _wait(self, seconds: float) -> None:
        """Sleep, but notice at once when the client goes away (or the server stops)."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self.server.fake._stopping.is_set():
                raise _Gone
            readable, _, _ = select.select([self.connection], [], [], min(remaining, 0.05))
            if readable:
                try:
                    if not self.connection.recv(1, socket.MSG_PEEK):
                        raise _Gone
                except OSError as exc:
                    raise _Gone from exc
                time.sleep(min(remaining, 0.05))  # the client sent more bytes: not ours to read now


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeLLM

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is no news
            super().handle_error(request, client_address)


class FakeLLM:
    """The scripted server (see the module's docstring)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._queue: deque[Script] = deque()
        self._requests: list[Request] = []
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.default: Script | None = None
        self.written: list[tuple[float, bytes]] = []  # (time.monotonic(), the event) of each chunk written

    # -- lifetime

    def start(self) -> FakeLLM:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the fake first"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- scripting

    def push(self, *responses: Script) -> None:
        with self.lock:
            self._queue.extend(responses)

    def reply_text(self, text: str, **options: Any) -> None:
        self.push(text_stream(text, **options))

    def call_tool(self, name: str, args: dict[str, Any] | str, **options: Any) -> None:
        self.push(tool_stream([(name, args)], **options))

    def call_tools(self, calls: Iterable[tuple[str, dict[str, Any] | str]], text: str = "", **options: Any) -> None:
        self.push(tool_stream(calls, text=text, **options))

    def reply_json(self, text: str = "", tool_calls: Iterable[tuple[str, dict[str, Any] | str]] = ()) -> None:
        self.push(Json(completion(text, tool_calls)))

    def fail(self, status: int, message: str | None = None, retry_after: str | float | None = None) -> None:
        self.push(Error(status, message, retry_after))

    # -- inspection

    @property
    def requests(self) -> list[Request]:
        with self.lock:
            return list(self._requests)

    @property
    def pending(self) -> int:
        with self.lock:
            return len(self._queue)
