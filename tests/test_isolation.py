"""Two real Unix users on one runtime: nothing of one is visible to, or usable by, the other."""

from __future__ import annotations

import pytest

from aria_client import run_as
from conftest import start_daemon
from users import open_path_to

# (the tests that make real Unix users share them, made once per process: so they run in the serial
# pass, in one process; xdist's `xdist_group` does not hold them together with this pytest)
pytestmark = pytest.mark.serial

OWNER = """
c.upload_bytes(bundles.flat())
session = c.session(agent_id="Calculator")
list(c.stream("/aria.v1.SessionService/ExecuteTurn",
              session_pb2.ExecuteTurnRequest(session_id=session.id, input='/add {"a": 1, "b": 2}'),
              session_pb2.TurnOutput, 60))
box = c.create_container("mine")
c.container_call("Start", box.id)
task = c.launch(["sleep", "30"])
prefs = struct_pb2.Struct(); prefs.update({"ui.theme": "dark"})
c.call("/aria.v1.UserPreferenceService/UpdateUserPreferences",
       user_preference_pb2.UpdateUserPreferencesRequest(updates=prefs), user_preference_pb2.UserPreferences)
result = {"session": session.id, "container": box.id, "task": task}
"""

INTRUDER = """
def code(fn):
    try:
        fn()
        return "OK"
    except grpc.RpcError as e:
        return e.code().name

s, box, task = ids["session"], ids["container"], ids["task"]
result = {
    "get task": code(lambda: c.task(task)),
    "task output": code(lambda: list(c.output(task))),
    "cancel task": code(lambda: c.cancel(task)),
    "exec into container": code(lambda: c.launch(["true"], type="container:exec:" + box)),
    "get container": code(lambda: c.container_call("Get", box)),
    "stop container": code(lambda: c.container_call("Stop", box)),
    "remove container": code(lambda: c.container_call("Remove", box)),
    "container logs": code(lambda: list(c.container_logs(box))),
    "get session": code(lambda: c.call("/aria.v1.SessionService/GetSession",
                                       session_pb2.GetSessionRequest(session_id=s), session_pb2.Session)),
    "messages": code(lambda: c.call("/aria.v1.SessionService/ListMessages",
                                    session_pb2.ListMessagesRequest(session_id=s), session_pb2.ListMessagesResponse)),
    "turn": code(lambda: list(c.stream("/aria.v1.SessionService/ExecuteTurn",
                                       session_pb2.ExecuteTurnRequest(session_id=s, input="/add {}"),
                                       session_pb2.TurnOutput, 30))),
    "end session": code(lambda: c.call("/aria.v1.SessionService/EndSession",
                                       session_pb2.EndSessionRequest(session_id=s), session_pb2.Session)),
    "agent": code(lambda: c.agent("Calculator")),
    "tasks listed": [t.id for t in c.list_tasks().tasks],
    "containers listed": [x.id for x in c.list_containers()],
    "sessions listed": [x.id for x in c.call(
        "/aria.v1.SessionService/ListSessions", session_pb2.ListSessionsRequest(), session_pb2.ListSessionsResponse
    ).sessions],
    "agents listed": [a.agent_id for a in c.agents()],
    "tools listed": [t.name for t in c.tools()],
    "preferences": dict(c.call("/aria.v1.UserPreferenceService/GetUserPreferences",
                               user_preference_pb2.GetUserPreferencesRequest(),
                               user_preference_pb2.UserPreferences).preferences),
}
events = []
try:
    for n in c.events(timeout=2, after_sequence=0):
        events.append(n.WhichOneof("event_payload"))
except grpc.RpcError:
    pass
result["events"] = events
"""


@pytest.fixture
def shared_daemon(sock_dir):
    d = start_daemon(sock_dir, "--socket-mode", "666")
    open_path_to(d.socket)
    yield d
    d.stop()


def test_nothing_of_one_user_is_visible_to_another(shared_daemon, unix_users):
    a, b = unix_users["aria-test-a"], unix_users["aria-test-b"]
    ids = run_as(a.uid, a.gid, shared_daemon.socket, OWNER)
    seen = run_as(b.uid, b.gid, shared_daemon.socket, f"ids = {ids!r}\n" + INTRUDER)
    refused = {k: v for k, v in seen.items() if isinstance(v, str)}
    assert refused == dict.fromkeys(refused, "NOT_FOUND"), refused
    assert seen["tasks listed"] == seen["containers listed"] == seen["sessions listed"] == []
    assert seen["agents listed"] == ["default"]
    assert seen["tools listed"] == ["run_command", "launch_task"]
    assert seen["preferences"] == {} and seen["events"] == []
    # and the owner still has everything, untouched
    mine = run_as(a.uid, a.gid, shared_daemon.socket, f"ids = {ids!r}\n" + INTRUDER)
    assert mine["get task"] == mine["get container"] == mine["get session"] == "OK"
    assert mine["agents listed"] == ["default", "Calculator"] and mine["preferences"] == {"ui.theme": "dark"}
    assert "task_status" in mine["events"] and "bundle_upload" in mine["events"]
