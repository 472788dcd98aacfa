"""list_tasks: ListTasks (page_size 100) over 1,000,000 tasks of one user: the first page against the
last one, 10,000 pages deep; and the same deep page read with OFFSET pagination, straight from SQLite.

The tasks are written straight into the runtime's database (schema by the runtime's own migrations,
status COMPLETED, distinct created_at), then `aria serve` serves them. The deep page's token is made
with the daemon's own signing key (data dir/page-token.key), which is what following 9,999 tokens
would end with; the bench checks the token it makes for page 2 is the one the daemon answered.

The client (bench/_aria_client.py, a process of its own) asks for the first and the deep page in
turn, WARMUP times each, then CALLS times each, tagging every call with an x-request-id; the time at
the server of each call is read from the daemon's `rpc` log lines (duration_ms). References, in this
process with sqlite3 on the same file: the keyset query the runtime runs, and OFFSET 999,900.

Targets (reported, not enforced): at the server, the deep page within 1.5x of the first (medians),
and each under 10 ms.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlite_utils

from aria_trio.runtime.access.identity import user_name
from aria_trio.runtime.access.pagination import PageTokens
from aria_trio.runtime.store.migrations import MIGRATIONS
from aria_trio.shared.sqlite import migrate

from .harness import BenchError, percentile, progress, rpc_durations, run_script, start_aria

TASKS = 1_000_000
PAGE = 100
DEEP_PAGE = 10_000  # counted from 1: rows 999,900 to 999,999, the last page
DEEP_OFFSET = (DEEP_PAGE - 1) * PAGE
CALLS = 100
WARMUP = 20
OFFSET_RUNS = 10
SEED_BATCH = 100_000
KEY_FILE = "page-token.key"
METHOD = "/aria.v1.TaskService/ListTasks"
TARGET_RATIO = 1.5
TARGET_SERVER_MS = 10.0
CLIENT = Path(__file__).resolve().parent / "_aria_client.py"

ORDER = "ORDER BY created_at DESC, id DESC"
KEYSET_SQL = f"SELECT * FROM tasks WHERE user_id = ? AND (created_at, id) < (?, ?) {ORDER} LIMIT {PAGE + 1}"
FIRST_SQL = f"SELECT * FROM tasks WHERE user_id = ? {ORDER} LIMIT {PAGE + 1}"
OFFSET_SQL = f"SELECT * FROM tasks WHERE user_id = ? {ORDER} LIMIT {PAGE} OFFSET {DEEP_OFFSET}"
INSERT_SQL = (
    "INSERT INTO tasks (id, user_id, type, command_json, status, created_at, started_at, completed_at, "
    "exit_code, progress_percent) VALUES (?, ?, 'container:run', '[\"echo\", \"hi\"]', 3, ?, ?, ?, 0, 100.0)"
)


def _seed(path: Path, user: str) -> None:
    """The runtime's schema, then TASKS completed tasks of `user`, one millisecond apart, oldest first."""
    db = sqlite_utils.Database(sqlite3.connect(path, isolation_level=None))
    try:
        migrate(db, MIGRATIONS)
        db.execute("PRAGMA synchronous = OFF")  # a scratch database: no need to survive a crash
        first = time.time_ns() // 1000 - TASKS * 1000
        for start in range(0, TASKS, SEED_BATCH):
            rows = (
                ("t-" + secrets.token_hex(8), user, at, at + 100, at + 900)
                for at in range(first + start * 1000, first + (start + SEED_BATCH) * 1000, 1000)
            )
            db.execute("BEGIN")
            db.conn.executemany(INSERT_SQL, rows)
            db.execute("COMMIT")
    finally:
        db.conn.close()


def _client(tmp: Path, mode: str, *args: str) -> dict[str, Any]:
    argv = [sys.executable, str(CLIENT), mode, *args]
    answer: dict[str, Any] = json.loads(run_script(argv, f"the ListTasks client ({mode})", tmp / f"{mode}.err"))
    return answer


def _key_at(conn: sqlite3.Connection, user: str, offset: int) -> tuple[int, str]:
    """(created_at, id) of the user's task at `offset`, newest first: what a page token after it holds."""
    row = conn.execute(f"SELECT created_at, id FROM tasks WHERE user_id = ? {ORDER} LIMIT 1 OFFSET ?", [user, offset])
    created_at, task_id = row.fetchone()
    return created_at, task_id


def _deep_token(data: Path, user: str, conn: sqlite3.Connection, page_2_token: str, after: tuple[int, str]) -> str:
    """The token of the page after the task `after`, made with the daemon's key; first checked: the token
    made so for page 2 must be the daemon's."""
    key = data / KEY_FILE
    tokens = PageTokens(key.read_bytes()) if key.exists() else None
    filter_key = json.dumps([user, None, []])  # what the runtime signs for "no filter"
    if tokens is None or tokens.make(filter_key, *_key_at(conn, user, PAGE - 1)) != page_2_token:
        raise BenchError(
            f"cannot make the deep page's token: with the key in {key} the token for page 2 is not the one "
            "the daemon answered (its key file or token format changed?)"
        )
    return tokens.make(filter_key, *after)


def _timed(run: Callable[[], Any], times: int) -> list[float]:
    out = []
    for _ in range(times):
        started = time.perf_counter()
        run()
        out.append((time.perf_counter() - started) * 1000)
    return out


def _summary(ms: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(ms), 3), "p90": round(percentile(ms, 0.9), 3), "n": len(ms)}


def run() -> dict[str, Any]:
    user = user_name(os.getuid())  # who the daemon takes the bench's calls to be
    with tempfile.TemporaryDirectory(prefix="aria-bench-", dir=os.environ.get("BENCH_TMP")) as name:
        tmp = Path(name)
        data = tmp / "data"
        data.mkdir(mode=0o700)
        database = data / "runtime.db"
        progress(f"seeding {TASKS:,} tasks")
        started = time.perf_counter()
        _seed(database, user)
        seed_s = time.perf_counter() - started

        conn = sqlite3.connect(database)
        before_deep = _key_at(conn, user, DEEP_OFFSET - 1)

        progress("starting aria serve")
        with start_aria(tmp / "aria.sock", data, tmp) as aria:
            sock = str(aria.socket_path)
            page_2_token = _client(tmp, "page", sock)["next_page_token"]
            deep_token = _deep_token(data, user, conn, page_2_token, before_deep)
            deep = _client(tmp, "page", sock, deep_token)
            if deep["ids"] != [row[0] for row in conn.execute(OFFSET_SQL, [user])]:
                raise BenchError(f"the daemon's page {DEEP_PAGE:,} is not the tasks {DEEP_OFFSET:,} and after")
            progress(f"ListTasks: first and deep page, {WARMUP} + {CALLS} calls each")
            client = _client(tmp, "list", sock, deep_token, str(CALLS), str(WARMUP))
            aria.stop()
        durations = rpc_durations(tmp / "aria.log", METHOD)

        progress("the same pages in SQL: keyset, and OFFSET")
        sql = {
            "keyset_first": _timed(lambda: conn.execute(FIRST_SQL, [user]).fetchall(), CALLS),
            "keyset_deep": _timed(lambda: conn.execute(KEYSET_SQL, [user, *before_deep]).fetchall(), CALLS),
            "offset_deep": _timed(lambda: conn.execute(OFFSET_SQL, [user]).fetchall(), OFFSET_RUNS),
        }
        plans = {
            name: " / ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {query}", params))
            for name, query, params in (("keyset", KEYSET_SQL, [user, *before_deep]), ("offset", OFFSET_SQL, [user]))
        }
        conn.close()

    server = {}
    for page in ("first", "deep"):
        missing = [i for i in range(CALLS) if f"{page}-{i}" not in durations]
        if missing:
            raise BenchError(f"no rpc log line for {len(missing)} of the {page} page's calls (log format changed?)")
        server[page] = [durations[f"{page}-{i}"] for i in range(CALLS)]
    return _report(seed_s, server, {page: client[f"{page}_ms"] for page in ("first", "deep")}, sql, plans)


def _report(
    seed_s: float,
    server: dict[str, list[float]],
    client: dict[str, list[float]],
    sql: dict[str, list[float]],
    plans: dict[str, str],
) -> dict[str, Any]:
    at_server = {page: _summary(ms) for page, ms in server.items()}
    sql_summary = {name: _summary(ms) for name, ms in sql.items()}
    deep_vs_first = at_server["deep"]["median"] / at_server["first"]["median"]
    targets = [
        {
            "metric": "server deep / first (medians)",
            "value": round(deep_vs_first, 3),
            "target": f"<= {TARGET_RATIO}",
            "pass": deep_vs_first <= TARGET_RATIO,
        },
        *(
            {
                "metric": f"server {page} page median ms",
                "value": at_server[page]["median"],
                "target": f"< {TARGET_SERVER_MS:g}",
                "pass": at_server[page]["median"] < TARGET_SERVER_MS,
            }
            for page in ("first", "deep")
        ),
    ]
    offset = sql_summary["offset_deep"]["median"]
    return {
        "parameters": {
            "tasks": TASKS,
            "page_size": PAGE,
            "deep_page": DEEP_PAGE,
            "deep_offset": DEEP_OFFSET,
            "calls": CALLS,
            "warmup_calls": WARMUP,
            "offset_runs": OFFSET_RUNS,
            "method": METHOD,
            "deep_token": "made with the daemon's key (data dir/page-token.key), checked against page 2's",
            "sqlite": sqlite3.sqlite_version,
        },
        "seed_s": round(seed_s, 1),
        "server_ms": at_server,
        "client_ms": {page: _summary(ms) for page, ms in client.items()},
        "sql_ms": sql_summary,
        "query_plans": plans,
        "ratios": {
            "server_deep_vs_first": round(deep_vs_first, 3),
            "sql_keyset_deep_vs_offset_deep": round(sql_summary["keyset_deep"]["median"] / offset, 5),
            "server_deep_vs_sql_offset_deep": round(at_server["deep"]["median"] / offset, 4),
        },
        "targets": targets,
        "all_targets_met": all(t["pass"] for t in targets),
        "raw": {"server_ms": server, "client_ms": client},
    }


def table(r: dict[str, Any]) -> str:
    p, server, client, sql = r["parameters"], r["server_ms"], r["client_ms"], r["sql_ms"]
    lines = [
        f"list_tasks: ListTasks page_size {p['page_size']} over {p['tasks']:,} tasks of one user "
        f"(medians of {p['calls']} calls; p90 in brackets)",
        f"{'page':<28} {'server ms':>16} {'client ms':>16} {'SQL ms':>16}",
    ]
    for page, label in (("first", "first"), ("deep", f"deep (page {p['deep_page']:,}, keyset)")):
        sql_row = sql[f"keyset_{page}"]
        lines.append(f"{label:<28} {_cell(server[page]):>16} {_cell(client[page]):>16} {_cell(sql_row):>16}")
    lines.append(
        f"{'deep with OFFSET ' + format(p['deep_offset'], ','):<28} {'':>16} {'':>16} {_cell(sql['offset_deep']):>16}"
    )
    ratios = r["ratios"]
    lines.append(
        f"SQL keyset deep / OFFSET deep: {ratios['sql_keyset_deep_vs_offset_deep']}; "
        f"server deep / SQL OFFSET deep: {ratios['server_deep_vs_sql_offset_deep']}"
    )
    for t in r["targets"]:
        lines.append(f"{t['metric']:<34} {t['value']:>8} {t['target']:>7} {'pass' if t['pass'] else 'FAIL':>6}")
    return "\n".join(lines)


def _cell(s: dict[str, float]) -> str:
    return f"{s['median']:.2f} ({s['p90']:.2f})"
