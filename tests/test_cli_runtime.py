"""`aria task|container|bundle|agents|tools|events`: the real CLI against the real daemon."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
from cli_runner import run_aria

from aria_trio.proto.aria.v1 import session_pb2

import bundles

SCRIPT = "echo hi; echo '::progress 50 half'; echo oops >&2; exit 3"


def aria_env(daemon):
    return {**os.environ, "ARIA_RUNTIME_SOCK": str(daemon.socket)}


def aria(daemon, *args):
    """`aria ARGS...` against the daemon, in this process (see cli_runner)."""
    return run_aria(*args, socket=daemon.socket)


def ok(daemon, *args):
    out = aria(daemon, *args)
    assert out.returncode == 0, (args, out.stdout, out.stderr)
    return out.stdout


def as_json(daemon, *args):
    return json.loads(ok(daemon, "--json", *args))


def json_lines(text):
    return [json.loads(line) for line in text.splitlines()]


def new_session(daemon):
    """A session to put tasks and containers in (there is no CLI verb for sessions yet)."""
    with daemon.channel() as channel:
        create = channel.unary_unary(
            "/aria.v1.SessionService/CreateSession",
            session_pb2.CreateSessionRequest.SerializeToString,
            session_pb2.Session.FromString,
        )
        return create(session_pb2.CreateSessionRequest(), timeout=10).id


def fields(text):
    """`name  value` lines (up to a line that is not one) as a dict."""
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if not value.strip():
            break
        found[name] = value.strip()
    return found


def eventually(fn, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


class Lines:
    """A long-running `aria ...` whose stdout lines are read on a thread, with a timeout each: a
    process of its own, for the tests that press Ctrl-C (a signal to it) or write to its stdin."""

    def __init__(self, daemon, *args, stdin=None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aria_trio", *args],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=aria_env(daemon),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()
        _OPEN.append(self)

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def take(self, n, timeout=20.0):
        return [self.lines.get(timeout=timeout) for _ in range(n)]

    def interrupt(self):
        """Ctrl-C; its exit status and stderr."""
        self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(timeout=10)
        return rc, self.proc.stderr.read()

    def close(self):
        """Kill it if it still runs; close its pipes (else they warn when collected)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.pump.join(timeout=10)  # (at its end of file: the process is gone)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


_OPEN: list[Lines] = []


@pytest.fixture(autouse=True)
def close_lines():
    """Every Lines a test started is closed after it (see Lines.close)."""
    yield
    while _OPEN:
        _OPEN.pop().close()


# -- help -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("group", "verbs"),
    [
        ((), ["task", "container", "bundle", "agents", "tools", "events"]),
        (("task",), ["launch", "get", "list", "logs", "cancel"]),
        (("container",), ["create", "start", "stop", "rm", "get", "ls", "logs"]),
        (("bundle",), ["upload"]),
        (("agents",), ["list", "show"]),
        (("tools",), ["list"]),
        ((), ["session", "chat"]),
        (("session",), ["new", "list", "show", "end", "history"]),
    ],
)
def test_help_lists_the_verbs(group, verbs):
    out = run_aria(*group, "--help")
    assert out.returncode == 0
    summaries = {line.split()[0]: line for line in out.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert set(verbs) <= set(summaries)
    assert not [summaries[v] for v in verbs if summaries[v].endswith("...")], "a summary was cut short"


def test_bad_arguments_are_usage_errors(module_daemon):
    assert aria(module_daemon, "task", "launch").returncode == 2  # no ARGV
    bad_env = aria(module_daemon, "task", "launch", "--env", "NOVALUE", "--", "true")
    assert bad_env.returncode == 2 and "KEY=VALUE" in bad_env.stderr
    bad_status = aria(module_daemon, "task", "list", "--status", "sleeping")
    assert bad_status.returncode == 2 and "running" in bad_status.stderr
    bad_since = aria(module_daemon, "container", "logs", "--since", "yesterday-ish", "c-x")
    assert bad_since.returncode == 2 and "ISO time" in bad_since.stderr


# -- tasks ----------------------------------------------------------------------------------------


def test_launch_follow_prints_the_output_and_exits_with_the_task_code(module_daemon):
    out = aria(module_daemon, "task", "launch", "-f", "--", "sh", "-c", SCRIPT)
    assert out.returncode == 3
    assert out.stdout == "hi\n"
    err = out.stderr.splitlines()
    assert err[0].startswith("task t-")
    assert "[ 50%] half" in err and "oops" in err
    assert err[-1].startswith(err[0]) and "failed, exit code 3" in err[-1]

    done = aria(
        module_daemon, "task", "launch", "--follow", "--env", "WHO=world", "--", "sh", "-c", 'echo "hello $WHO"'
    )
    assert (done.returncode, done.stdout) == (0, "hello world\n")
    assert done.stderr.splitlines()[-1].endswith(" completed, exit code 0")


def test_launch_follow_as_json_lines(module_daemon):
    out = aria(module_daemon, "--json", "task", "launch", "-f", "--", "sh", "-c", SCRIPT)
    assert out.returncode == 3 and out.stderr == ""
    first, *outputs, final = json_lines(out.stdout)
    task_id = first["task_id"]
    assert all(o["task_id"] == task_id for o in outputs)
    stdout_side = [o.get("stdout_line") or o.get("progress") for o in outputs if "stderr_line" not in o]
    assert stdout_side == ["hi", {"percent_complete": 50.0, "operation_description": "half"}]
    assert [o["stderr_line"] for o in outputs if "stderr_line" in o] == ["oops"]
    assert final["id"] == task_id and final["status"] == "FAILED" and final["exit_code"] == 3


def test_a_timed_out_task_exits_1(module_daemon):
    out = aria(module_daemon, "task", "launch", "-f", "--timeout", "1", "--", "sleep", "30")
    assert out.returncode == 1
    assert " timeout" in out.stderr.splitlines()[-1]


def test_launch_get_list_cancel(daemon):
    session = new_session(daemon)
    done = ok(daemon, "task", "launch", "--", "sh", "-c", "echo '::progress 30 warming up'").strip()
    sleeper = ok(daemon, "task", "launch", "--session", session, "--env", "A=1", "--", "sleep", "30").strip()
    assert sleeper.startswith("t-") and "\n" not in sleeper
    assert eventually(lambda: as_json(daemon, "task", "get", done)["status"] == "COMPLETED")
    assert eventually(lambda: as_json(daemon, "task", "get", sleeper)["status"] == "RUNNING")

    shown = fields(ok(daemon, "task", "get", sleeper))
    assert shown["id"] == sleeper and shown["status"] == "running" and shown["command"] == "sleep 30"
    assert shown["environment"] == "A=1" and shown["session"] == session and shown["type"] == "container:run"
    assert "completed" not in shown and "exit" not in shown["status"]
    assert fields(ok(daemon, "task", "get", done))["progress"] == "100% warming up"

    listing = ok(daemon, "task", "list").splitlines()
    assert listing[0].split() == ["ID", "STATUS", "CREATED", "TYPE", "COMMAND"]
    assert listing[1].split()[:2] == [sleeper, "running"]  # newest first
    assert listing[1].endswith("container:run  sleep 30")
    assert listing[2].split()[:2] == [done, "completed"]

    running = as_json(daemon, "task", "list", "--status", "RUNNING", "--status", "pending")
    assert [t["id"] for t in running] == [sleeper]
    assert [t["id"] for t in as_json(daemon, "task", "list", "--session", session)] == [sleeper]
    assert as_json(daemon, "task", "list", "--status", "timeout") == []
    assert ok(daemon, "task", "list", "--status", "timeout").strip() == "(no tasks)"

    first_page = aria(daemon, "task", "list", "--limit", "1")
    assert len(first_page.stdout.splitlines()) == 2 and "--page-token" in first_page.stderr
    token = first_page.stderr.split("--page-token ")[1].split(")")[0]
    second_page = as_json(daemon, "task", "list", "--limit", "1", "--page-token", token)
    assert [t["id"] for t in second_page] == [done]
    everything = aria(daemon, "--json", "task", "list", "--limit", "1", "--all")
    assert [t["id"] for t in json.loads(everything.stdout)] == [sleeper, done] and everything.stderr == ""

    assert ok(daemon, "task", "cancel", sleeper).strip() == f"{sleeper}: cancellation initiated"
    assert eventually(lambda: as_json(daemon, "task", "get", sleeper)["status"] == "CANCELLED")
    again = as_json(daemon, "task", "cancel", sleeper)
    assert again == {"task_id": sleeper, "cancellation_initiated": False}
    assert fields(ok(daemon, "task", "get", sleeper))["status"].startswith("cancelled")

    missing = aria(daemon, "task", "get", "t-nope")
    assert missing.returncode == 1 and "(NOT_FOUND, request id " in missing.stderr


def test_task_logs(module_daemon):
    task_id = ok(
        module_daemon, "task", "launch", "--", "sh", "-c", "echo one; echo '::progress 40 compiling'; echo two >&2"
    )
    task_id = task_id.strip()
    followed = aria(module_daemon, "task", "logs", "-f", task_id)  # ends when the task does
    assert followed.returncode == 0 and followed.stdout == "one\n"
    # progress comes from the task's stdout, so it is not ordered with its stderr
    assert sorted(followed.stderr.splitlines()) == ["[ 40%] compiling", "two"]
    again = aria(module_daemon, "task", "logs", task_id)
    assert (again.stdout, again.stderr) == (followed.stdout, followed.stderr)
    lines = json_lines(ok(module_daemon, "--json", "task", "logs", task_id))
    assert all(line["task_id"] == task_id and line["timestamp"] for line in lines)
    assert [line["stdout_line"] for line in lines if "stdout_line" in line] == ["one"]
    assert [line["progress"] for line in lines if "progress" in line] == [
        {"percent_complete": 40.0, "operation_description": "compiling"}
    ]


def test_ctrl_c_detaches_from_a_followed_task(module_daemon):
    follower = Lines(module_daemon, "task", "launch", "-f", "--", "sh", "-c", "echo started; sleep 30")
    assert follower.take(1) == ["started"]
    rc, err = follower.interrupt()
    assert rc == 130 and "Traceback" not in err
    task_id = err.splitlines()[0].split()[1]
    assert f"detached: task {task_id} goes on" in err
    assert as_json(module_daemon, "task", "get", task_id)["status"] == "RUNNING"
    ok(module_daemon, "task", "cancel", task_id)


# -- containers -----------------------------------------------------------------------------------


def test_container_lifecycle(daemon):
    session = new_session(daemon)
    cid = ok(daemon, "container", "create", "idler", "--env", "A=1", "--persistent", "--session", session).strip()
    assert cid.startswith("c-")
    assert fields(ok(daemon, "container", "get", cid))["status"] == "pending"
    assert ok(daemon, "container", "start", cid).strip() == f"started {cid}"
    shown = fields(ok(daemon, "container", "get", cid))
    assert shown["id"] == cid and shown["name"] == "idler" and shown["status"] == "running"
    assert shown["image"] == "host" and shown["session"] == session and shown["created"].startswith("20")

    listing = ok(daemon, "container", "ls").splitlines()
    assert listing[0].split() == ["ID", "STATUS", "CREATED", "NAME", "IMAGE"]
    assert [line.split()[:2] for line in listing[1:]] == [[cid, "running"]]
    assert [c["id"] for c in as_json(daemon, "container", "ls", "--session", session)] == [cid]
    assert as_json(daemon, "container", "ls", "--session", new_session(daemon)) == []

    assert as_json(daemon, "container", "stop", cid) == {"stopped": cid}
    assert as_json(daemon, "container", "get", cid)["status"] == "CANCELLED"
    assert ok(daemon, "container", "rm", cid).strip() == f"removed {cid}"
    gone = aria(daemon, "container", "get", cid)
    assert gone.returncode == 1 and "(NOT_FOUND, request id " in gone.stderr
    assert ok(daemon, "container", "ls").strip() == "(no containers)"


def test_container_logs(module_daemon):
    made = as_json(
        module_daemon, "container", "create", "talker", "--start", "--", "sh", "-c", "echo hello; echo oops >&2"
    )
    assert made["status"] in ("RUNNING", "COMPLETED") and made["name"] == "talker"
    cid = made["id"]
    followed = aria(module_daemon, "container", "logs", "-f", cid)  # ends when the container does
    assert (followed.returncode, followed.stdout, followed.stderr) == (0, "hello\n", "oops\n")
    assert as_json(module_daemon, "container", "get", cid)["status"] == "COMPLETED"

    recent = aria(module_daemon, "container", "logs", "--since", "1h", cid)
    assert (recent.stdout, recent.stderr) == ("hello\n", "oops\n")
    assert aria(module_daemon, "container", "logs", "--since", "2m", cid).stdout == "hello\n"
    future = aria(module_daemon, "container", "logs", "--since", "2099-01-01T00:00:00+00:00", cid)
    assert (future.returncode, future.stdout, future.stderr) == (0, "", "")
    lines = json_lines(ok(module_daemon, "--json", "container", "logs", cid))
    assert sorted((line["stream"], line["line"]) for line in lines) == [("STDERR", "oops"), ("STDOUT", "hello")]


# -- bundles, agents, tools -----------------------------------------------------------------------


def test_bundle_upload_then_agents_and_tools(module_daemon, sock_dir):
    path = sock_dir / "calc.aria"
    path.write_bytes(bundles.flat())
    out = aria(module_daemon, "bundle", "upload", str(path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("b-")
    assert "  agent Calculator  Calculator" in lines
    assert "  tool  add(a: number, b: number)" in lines and "  tool  shout(text: string)" in lines
    assert "  tool  fails()" in lines
    assert out.stderr == ""  # no progress bar off a terminal

    agents = ok(module_daemon, "agents", "list").splitlines()
    assert agents[0].split() == ["AGENT", "ID", "NAME", "DESCRIPTION"]
    calc = next(a for a in as_json(module_daemon, "agents", "list") if a["name"] == "Calculator")
    assert any(line.split()[0] == calc["agent_id"] and line.endswith("Does sums") for line in agents)

    shown = ok(module_daemon, "agents", "show", calc["agent_id"])
    assert fields(shown) == {"agent": calc["agent_id"], "name": "Calculator", "description": "Does sums"}
    assert "\ntools:\n" in shown
    assert "  add(a: number, b: number)  the add tool" in shown
    assert '      "required": [' in shown and '      "additionalProperties": false,' in shown
    details = as_json(module_daemon, "agents", "show", calc["agent_id"])
    schema = json.loads(details["tools"][0]["parameters_json_schema"])
    assert schema["required"] == ["a", "b"]

    tools = ok(module_daemon, "tools", "list").splitlines()
    assert "add(a: number, b: number)  the add tool" in tools
    assert "Greeter(name: string)  the Greeter tool" in tools
    with_schemas = ok(module_daemon, "tools", "list", "--schema")
    assert '    "additionalProperties": false,' in with_schemas
    names = {t["name"] for t in as_json(module_daemon, "tools", "list")}
    assert {"add", "shout", "Greeter"} <= names


def test_bundle_upload_json_nested_and_without_checksum(module_daemon, sock_dir):
    path = sock_dir / "w.aria"
    path.write_bytes(bundles.nested())
    reply = as_json(module_daemon, "bundle", "upload", "--name", "weather-agent.aria", "--no-checksum", str(path))
    assert reply["success"] is True and reply["bundle_id"].startswith("b-")
    assert [a["name"] for a in reply["agents"]] == ["Weatherman"]
    assert [t["name"] for t in reply["tools"]] == ["forecast"]
    assert "forecast(city: string)  Weather" in ok(module_daemon, "tools", "list")


def test_a_bad_bundle_is_one_error_line(module_daemon, sock_dir):
    path = sock_dir / "bad.aria"
    path.write_bytes(b"not a zip")
    out = aria(module_daemon, "bundle", "upload", str(path))
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("error: ") and "(INVALID_ARGUMENT, request id " in out.stderr
    assert len(out.stderr.splitlines()) == 1
    broken = sock_dir / "broken.aria"
    broken.write_bytes(bundles.flat(bundles.manifest(agents=[{"name": "A", "description": "", "tools": ["nope"]}])))
    refused = aria(module_daemon, "bundle", "upload", str(broken))
    assert refused.returncode == 1 and "nope" in refused.stderr


# -- events ---------------------------------------------------------------------------------------


def test_events_replay_then_stop_quietly_at_ctrl_c(daemon):
    launched = aria(daemon, "task", "launch", "-f", "--", "true")
    assert launched.returncode == 0
    task_id = launched.stderr.split()[1]

    events = Lines(daemon, "--json", "events", "--after", "0", "--type", "task_status")
    replayed = [json.loads(line) for line in events.take(3)]
    assert [e["task_status"]["task_id"] for e in replayed] == [task_id] * 3
    assert [e["task_status"]["new_status"] for e in replayed] == ["PENDING", "RUNNING", "COMPLETED"]
    assert [int(e["sequence"]) for e in replayed] == sorted(int(e["sequence"]) for e in replayed)
    assert (replayed[-1]["task_status"]["exit_code"]) == 0
    # then live: a new task's events arrive on the open stream
    second = ok(daemon, "task", "launch", "--", "true").strip()
    assert [json.loads(line)["task_status"]["task_id"] for line in events.take(3)] == [second] * 3
    assert events.interrupt() == (0, "")

    text = Lines(daemon, "events", "--after", "0")
    first = text.take(1)[0].split()
    assert first[0] == f"#{replayed[0]['sequence']}" and first[3:6] == ["task_status", task_id, "pending"]
    assert text.interrupt() == (0, "")


def test_events_resume_after_a_sequence(daemon):
    ok(daemon, "task", "launch", "-f", "--", "true")
    everything = Lines(daemon, "events", "--after", "0")
    seqs = [int(line.split()[0][1:]) for line in everything.take(3)]
    everything.interrupt()
    resumed = Lines(daemon, "events", "--after", str(seqs[0]))
    assert [int(line.split()[0][1:]) for line in resumed.take(2)] == seqs[1:]
    resumed.interrupt()
