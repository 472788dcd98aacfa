"""Reference server of bench.unary_prefs: aria's GetUserPreferences, served by grpcio.aio instead.

    python bench/ref_grpcio.py SOCKET DATABASE

Why it exists: the benchmark asks what aria's own RPC stack (Trio, purerpc and h2, all in Python)
costs next to grpcio's C core. For that the reference must differ from the daemon in the RPC stack
only, so it serves the same method on the same kind of socket, from the same data, doing the same
work per call:

* same data: at start it reads the current user's row of the daemon's own database (DATABASE, the
  `user_preferences` table of runtime.db) into a dict, as the daemon caches a user's preferences
  after its first read from SQLite. Start it after the data is written: it never reads again.
* same response: a Struct built from that dict per call, `llm.api_key` masked as the daemon masks it.
* same logging: one JSON line per call with the fields of the daemon's `rpc` line (method, code,
  duration_ms, request_id from x-request-id or fresh, user...), formatted and written per call like
  the daemon's, but to os.devnull.

What it skips: the daemon tells who calls from the socket's peer credentials (a dict lookup per call,
once a connection's uid is known); this server answers for its own user, who is the benchmark's
client's too. It stops at SIGTERM or SIGINT with exit code 0.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import pwd
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import grpc
from google.protobuf import struct_pb2

from aria_trio.proto.aria.v1 import user_preference_pb2 as pb

SERVICE = "aria.v1.UserPreferenceService"
METHOD = "GetUserPreferences"
SECRET = "llm.api_key"
STOP_GRACE_S = 1.0


def user_name(uid: int) -> str:
    """As the daemon names users: the passwd name, or uid:N for a uid without one."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid:{uid}"


def load_preferences(database: Path, user: str) -> dict[str, Any]:
    """The user's preferences in the database ({} if none), read-only."""
    with sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True) as db:
        row = db.execute("SELECT preferences_json FROM user_preferences WHERE user_id = ?", [user]).fetchone()
    return json.loads(row[0]) if row else {}


def mask(value: str) -> str:
    return "****" + value[-4:] if len(value) >= 12 else "****"


def masked(prefs: dict[str, Any]) -> dict[str, Any]:
    return {k: mask(v) if k == SECRET and isinstance(v, str) else v for k, v in prefs.items()}


class Preferences:
    """GetUserPreferences of one user, from a dict, with a JSON log line per call."""

    def __init__(self, user: str, prefs: dict[str, Any], log: TextIO) -> None:
        self.user = user
        self.prefs = prefs
        self.log = log
        self.uid = os.getuid()

    async def get(self, request: pb.GetUserPreferencesRequest, context: grpc.aio.ServicerContext) -> pb.UserPreferences:
        started = time.perf_counter()
        struct = struct_pb2.Struct()
        struct.update(masked(self.prefs))
        response = pb.UserPreferences(preferences=struct)
        self._log_call(context, started)
        return response

    def _log_call(self, context: grpc.aio.ServicerContext, started: float) -> None:
        metadata = dict(context.invocation_metadata() or ())
        line = {
            "method": f"/{SERVICE}/{METHOD}",
            "code": "OK",
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            "request_id": metadata.get("x-request-id") or os.urandom(16).hex(),
            "peer_uid": self.uid,
            "user": self.user,
            "event": "rpc",
            "level": "info",
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z"),
        }
        print(json.dumps(line), file=self.log, flush=True)


def handler(service: Preferences) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            METHOD: grpc.unary_unary_rpc_method_handler(
                service.get,
                request_deserializer=pb.GetUserPreferencesRequest.FromString,
                response_serializer=pb.UserPreferences.SerializeToString,
            )
        },
    )


async def serve(socket_path: str, database: Path, log: TextIO) -> None:
    user = user_name(os.getuid())
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler(Preferences(user, load_preferences(database, user), log)),))
    server.add_insecure_port(f"unix:{socket_path}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    await stop.wait()
    await server.stop(STOP_GRACE_S)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: ref_grpcio.py SOCKET DATABASE", file=sys.stderr)
        return 2
    socket_path, database = argv[0], Path(argv[1])
    if not database.is_file():
        print(f"ref_grpcio.py: no database at {database}", file=sys.stderr)
        return 1
    with open(os.devnull, "w") as log:
        asyncio.run(serve(socket_path, database, log))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
