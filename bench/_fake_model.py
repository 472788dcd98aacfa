"""A scripted OpenAI-compatible model server that answers at once, for bench.turn_overhead.

    _fake_model.py
        Serves POST .../chat/completions on 127.0.0.1 (a free port), prints `ready PORT`, and serves
        until it is terminated. A request whose last message is a tool result gets a final text
        ("The sum is 3."); any other gets one tool call, `add` with {"a": 1, "b": 2}. With
        `"stream": true` the answer is an SSE stream (chat.completion.chunk events, then
        `data: [DONE]`), else a plain chat.completion. GET .../models lists the one model.

Each answer is written with one send on a socket with TCP_NODELAY, so that no Nagle / delayed-ACK
wait is added to a turn. Standard library only.
"""

from __future__ import annotations

import itertools
import json
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "bench-model"
FINAL = "The sum is 3."
ARGUMENTS = json.dumps({"a": 1, "b": 2})
_ids = itertools.count(1)


def _message(body: Any) -> dict[str, Any]:
    """The assistant's reply to a request: a final text after a tool result, else a call of `add`."""
    messages = body.get("messages") if isinstance(body, dict) else None
    last = messages[-1] if isinstance(messages, list) and messages else {}
    if isinstance(last, dict) and last.get("role") == "tool":
        return {"role": "assistant", "content": FINAL}
    call = {"id": f"call_{next(_ids)}", "type": "function", "function": {"name": "add", "arguments": ARGUMENTS}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


def _chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
    event = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def _sse(message: dict[str, Any]) -> bytes:
    calls = message.get("tool_calls")
    if calls:
        delta = {"role": "assistant", "content": None, "tool_calls": [{"index": 0, **calls[0]}]}
        events = [_chunk(delta, None), _chunk({}, "tool_calls")]
    else:
        events = [_chunk({"role": "assistant", "content": message["content"]}, None), _chunk({}, "stop")]
    return b"".join([*events, b"data: [DONE]\n\n"])


def _completion(message: dict[str, Any]) -> bytes:
    finish = "tool_calls" if "tool_calls" in message else "stop"
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }
    return json.dumps(body).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: str, content_type: str, data: bytes, chunked: bool = False) -> None:
        if chunked:
            head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
            payload = head.encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
        else:
            head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n\r\n"
            payload = head.encode() + data
        self.wfile.write(payload)

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._send("200 OK", "application/json", json.dumps({"object": "list", "data": [{"id": MODEL}]}).encode())
        else:
            self._send("404 Not Found", "application/json", b'{"error": {"message": "no such route"}}')

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send("404 Not Found", "application/json", b'{"error": {"message": "no such route"}}')
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._send("400 Bad Request", "application/json", b'{"error": {"message": "not JSON"}}')
            return
        message = _message(body)
        if isinstance(body, dict) and body.get("stream"):
            self._send("200 OK", "text/event-stream", _sse(message), chunked=True)
        else:
            self._send("200 OK", "application/json", _completion(message))


class _Server(ThreadingHTTPServer):
    daemon_threads = True


def main() -> None:
    server = _Server(("127.0.0.1", 0), _Handler)
    print(f"ready {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
