"""A scripted OpenAI-compatible model server that streams slowly, for bench.turn_stream.

    _paced_model.py CHUNKS INTERVAL_MS
        Serves POST .../chat/completions on 127.0.0.1 (a free port), prints `ready PORT`, and serves
        until it is terminated. Each request gets an SSE stream of CHUNKS content chunks, one every
        INTERVAL_MS, then finish_reason "stop" and `data: [DONE]`. Each chunk's text is
        `<n>@<time.monotonic_ns() when it was written> `, so that a reader anywhere on the machine
        (CLOCK_MONOTONIC is one clock for every process) knows how long the chunk took to reach it.

Each chunk is written with one send on a socket with TCP_NODELAY. Standard library only.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CHUNKS = int(sys.argv[1]) if len(sys.argv) > 1 else 200
INTERVAL = (float(sys.argv[2]) if len(sys.argv) > 2 else 10.0) / 1000


def _event(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-paced",
        "object": "chat.completion.chunk",
        "model": "paced",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    data = b"data: " + json.dumps(chunk).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        send = self.connection.sendall
        send(_event({"role": "assistant", "content": ""}))
        next_at = time.monotonic()
        for n in range(CHUNKS):
            next_at += INTERVAL
            time.sleep(max(0.0, next_at - time.monotonic()))
            send(_event({"content": f"{n}@{time.monotonic_ns()} "}))
        send(_event({}, "stop") + b"%x\r\n%s\r\n" % (14, b"data: [DONE]\n\n") + b"0\r\n\r\n")


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"ready {server.server_address[1]}", flush=True)
    server.serve_forever()
