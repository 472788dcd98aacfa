"""Helpers for the race tests (test_races.py): repeating a race many times at once, finding every
process a Quilt left behind, reading the runtime's and Quilt's records to compare them.

Finding a Quilt's sandboxes: `quilt_client.sandbox_processes(data_dir)` looks for the data folder
in command lines, but when Quilt runs as root its sandboxes are built from the stage's paths
(/run/aria-quilt/..., quilt/stage.py), so no sandbox's command line names the data folder, while
the Quilt daemon's own (`--data-dir <folder>`) does. `leftovers` below finds them by what they
really are: descendants of the daemon, and any process (even one reparented away from it) that
carries this run's marker in its environment (every command the tests start gets it).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from quilt_client import alive, descendants, sandbox_processes

MARK_KEY = "ARIA_RACE_MARK"


def new_mark() -> str:
    return "race-" + secrets.token_hex(8)


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def marked(mark: str) -> list[int]:
    """Live processes with MARK_KEY=mark in their environment."""
    needle = f"{MARK_KEY}={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0") and alive(int(entry)):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def describe(pids: Iterable[int]) -> list[str]:
    out = []
    for p in pids:
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:160]
        except OSError:
            cmd = "?"
        out.append(f"{p}: {cmd}")
    return out


def quilt_pid_of_runtime(runtime_pid: int) -> int | None:
    """The runtime's Quilt child (`... quilt serve ...`)."""
    for p in _children().get(runtime_pid, []):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if b"\0quilt\0serve\0" in f.read():
                    return p
        except OSError:
            pass
    return None


def leftovers(quilt_pid: int, quilt_data_dir: Path, mark: str, daemons: Iterable[int] = ()) -> list[int]:
    """Every process left of a Quilt's sandboxes: its descendants, the processes marked by this
    test, and what `sandbox_processes` names (less the daemons themselves, which it also finds)."""
    daemons = {quilt_pid, *daemons}
    found = descendants(quilt_pid) | set(marked(mark))
    found |= {p for p in sandbox_processes(str(quilt_data_dir)) if p not in daemons}
    return sorted(found - daemons)


def wait_no_leftovers(
    quilt_pid: int, quilt_data_dir: Path, mark: str, daemons: Iterable[int] = (), timeout: float = 10
) -> list[str]:
    """[] once nothing is left (within `timeout`), else what is still there."""
    deadline = time.monotonic() + timeout
    while True:
        left = leftovers(quilt_pid, quilt_data_dir, mark, daemons)
        if not left or time.monotonic() > deadline:
            return describe(left)
        time.sleep(0.05)


# -- doing things at once ---------------------------------------------------------------------------


class Pool:
    """A thread pool whose calls' errors are kept, not raised at once."""

    def __init__(self, threads: int) -> None:
        self.executor = ThreadPoolExecutor(threads)

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        return self.executor.submit(fn, *args, **kwargs)

    def map(self, fn: Callable[..., Any], items: Iterable[Any]) -> list[Any]:
        futures = [self.executor.submit(fn, item) for item in items]
        return [f.result() for f in futures]

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


def outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """("ok", value) or (status code name, details) of a call."""
    try:
        return "ok", fn(*args, **kwargs)
    except grpc.RpcError as err:
        return err.code().name, err.details()


def at(start: float, delay: float) -> None:
    """Sleep until `delay` seconds after the monotonic time `start`."""
    rest = start + delay - time.monotonic()
    if rest > 0:
        time.sleep(rest)


class Barrier:
    """Release `n` threads at once (as near as threads go)."""

    def __init__(self, n: int) -> None:
        self.barrier = threading.Barrier(n)

    def wait(self) -> None:
        self.barrier.wait(timeout=30)


# -- records ------------------------------------------------------------------------------------------


def db_rows(path: Path, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
    """Rows of a daemon's SQLite database, read-only (it is in WAL mode: readers do not block it)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(sql, list(params)).fetchall()]


def runtime_task_rows(data_dir: Path, ids: list[str]) -> dict[str, dict[str, Any]]:
    rows = db_rows(data_dir / "runtime.db", f"SELECT * FROM tasks WHERE id IN ({','.join('?' * len(ids))})", ids)
    return {r["id"]: r for r in rows}


def runtime_history(data_dir: Path, ids: list[str]) -> dict[str, list[int]]:
    """Each task's statuses in the order they were recorded (task_status_history)."""
    rows = db_rows(
        data_dir / "runtime.db",
        f"SELECT task_id, status FROM task_status_history WHERE task_id IN ({','.join('?' * len(ids))}) "
        "ORDER BY task_id, seq",
        ids,
    )
    out: dict[str, list[int]] = {i: [] for i in ids}
    for r in rows:
        out[r["task_id"]].append(r["status"])
    return out


def short(obj: Any) -> str:
    """A one-line view of a protobuf message (for assertion messages): its telling fields."""
    if obj is None:
        return "None"
    fields = [
        f
        for f in ("state", "status", "exit_code", "signal", "message", "error_message", "type", "ok", "error")
        if hasattr(obj, f) and (not obj.DESCRIPTOR.fields_by_name[f].has_presence or obj.HasField(f))
    ]
    if not fields:
        return str(obj).replace("\n", " ")[:400]
    parts = []
    for f in fields:
        value = getattr(obj, f)
        enum = obj.DESCRIPTOR.fields_by_name[f].enum_type
        parts.append(f"{f}={enum.values_by_number[value].name if enum else repr(value)}")
    return " ".join(parts)


def log_lines(daemon: Any, *words: str, limit: int = 40) -> list[str]:
    """Lines of a daemon's JSON log that mention all of `words` (for reports)."""
    out = []
    for e in daemon.logs():
        line = json.dumps(e)
        if all(w in line for w in words):
            out.append(line[:600])
    return out[-limit:]


_IDS = re.compile(r"\b(?:[ctb]|race)-[0-9a-f]{8,16}\b")


def norm(text: str) -> str:
    """`text` with the ids of containers, tasks and bundles as <id> (for counting kinds)."""
    return _IDS.sub("<id>", text)


class Problems:
    """What went wrong, grouped by kind (the same failure a hundred times reads as one line)."""

    def __init__(self) -> None:
        self.by_kind: dict[str, list[str]] = {}
        self.items = 0

    def add(self, where: str, kinds: Iterable[str], detail: str = "") -> None:
        kinds = [norm(k) for k in kinds]
        if kinds:
            self.items += 1
        for kind in kinds:
            self.by_kind.setdefault(kind, []).append(f"{where}: {detail}" if detail else where)

    def __bool__(self) -> bool:
        return bool(self.by_kind)

    def report(self, total: int, examples: int = 2) -> str:
        lines = [f"{self.items} bad of {total}:"]
        for kind, where in sorted(self.by_kind.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"  {len(where)}x {kind}")
            lines += [f"      e.g. {w}" for w in where[:examples]]
        return "\n".join(lines)
