"""API keys, administrators, the socket opened to a group, and the audit log: real users, real socket."""

from __future__ import annotations

import json
import subprocess

import grpc
import pytest
from test_cli_runtime import aria, ok

from aria_trio.proto.aria.v1 import auth_pb2 as pb
from aria_trio.proto.aria.v1 import task_pb2
from aria_trio.proto.aria.v1 import user_preference_pb2 as prefs_pb

from aria_client import AriaClient, run_as
from conftest import start_daemon
from users import group_id, open_path_to

# (the tests that make real Unix users share them, made once per process: so they run in the serial
# pass, in one process; xdist's `xdist_group` does not hold them together with this pytest)
pytestmark = pytest.mark.serial

AUTH = "/aria.v1.AuthService/"
PREFS = "/aria.v1.UserPreferenceService/GetUserPreferences"


def create_key(c: AriaClient, **kw) -> pb.CreatedApiKey:
    return c.call(AUTH + "CreateApiKey", pb.CreateApiKeyRequest(**kw), pb.CreatedApiKey)


def prefs(c: AriaClient, authorization: str | None = None) -> prefs_pb.UserPreferences:
    metadata = [("authorization", authorization)] if authorization is not None else []
    return c.call(PREFS, prefs_pb.GetUserPreferencesRequest(), prefs_pb.UserPreferences, metadata=metadata)


def tasks_of(c: AriaClient, authorization: str) -> list[str]:
    request = task_pb2.ListTasksRequest()
    reply = c.call(
        "/aria.v1.TaskService/ListTasks",
        request,
        task_pb2.ListTasksResponse,
        metadata=[("authorization", authorization)],
    )
    return [t.id for t in reply.tasks]


def refused(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def audit(c: AriaClient, metadata=(), **kw) -> list[pb.AuditEvent]:
    request = pb.ListAuditEventsRequest(**kw)
    reply = c.call(AUTH + "ListAuditEvents", request, pb.ListAuditEventsResponse, metadata=metadata)
    return list(reply.events)


def test_keys_act_for_their_user_and_bad_ones_never_fall_back(daemon, unix_users):
    c = AriaClient(daemon.channel())
    b = unix_users["aria-test-b"]
    made = create_key(c, user_id=b.name, name="web")
    assert made.secret.startswith("aria_") and made.key.user_id == b.name
    bearer = f"Bearer {made.secret}"
    as_b = [("authorization", bearer)]
    # the key acts for b: b's tasks (none), not root's
    c.launch(["true"])
    assert c.list_tasks().tasks and tasks_of(c, bearer) == []
    for bad in ("garbage", "Bearer ", "Bearer aria_short", "Basic " + made.secret, "Bearer " + made.secret[:-1] + "x"):
        err = refused(lambda bad=bad: prefs(c, bad))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and err.details() == "invalid API key", bad
    # a key cannot make keys; b (not an administrator) cannot see root's
    err = refused(lambda: c.call(AUTH + "CreateApiKey", pb.CreateApiKeyRequest(), pb.CreatedApiKey, metadata=as_b))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    request = pb.ListApiKeysRequest(user_id="root")
    err = refused(lambda: c.call(AUTH + "ListApiKeys", request, pb.ListApiKeysResponse, metadata=as_b))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    listed = c.call(AUTH + "ListApiKeys", pb.ListApiKeysRequest(user_id="*"), pb.ListApiKeysResponse).keys
    assert [k.id for k in listed] == [made.key.id] and listed[0].HasField("last_used_at")
    # revoked: refused from then on
    c.call(AUTH + "RevokeApiKey", pb.RevokeApiKeyRequest(key_id=made.key.id), pb.ApiKey)
    assert refused(lambda: prefs(c, bearer)).code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused(lambda: create_key(c, user_id="no-such-user-here")).code() == grpc.StatusCode.NOT_FOUND


def test_a_deleted_user_s_key_is_refused(daemon):
    c = AriaClient(daemon.channel())
    subprocess.run(["userdel", "aria-test-gone"], capture_output=True)
    subprocess.run(["useradd", "--system", "--no-create-home", "aria-test-gone"], check=True, capture_output=True)
    made = create_key(c, user_id="aria-test-gone")
    prefs(c, f"Bearer {made.secret}")  # works
    subprocess.run(["userdel", "aria-test-gone"], check=True, capture_output=True)
    assert refused(lambda: prefs(c, f"Bearer {made.secret}")).code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_socket_opened_to_a_group_and_who_may_do_what(sock_dir, unix_users):
    d = start_daemon(sock_dir, "--socket-mode", "660", "--socket-group", "aria-test-g")
    try:
        open_path_to(d.socket)
        assert d.socket.stat().st_gid == group_id("aria-test-g") and d.socket.stat().st_mode & 0o777 == 0o660
        a, b = unix_users["aria-test-a"], unix_users["aria-test-b"]  # a is in the group, b is not
        groups = (group_id("aria-test-g"),)
        mine = run_as(
            a.uid,
            a.gid,
            d.socket,
            """
made = c.call("/aria.v1.AuthService/CreateApiKey", auth_pb2.CreateApiKeyRequest(name="mine"), auth_pb2.CreatedApiKey)
try:
    c.call("/aria.v1.AuthService/CreateApiKey", auth_pb2.CreateApiKeyRequest(user_id="root"), auth_pb2.CreatedApiKey)
    other = "OK"
except grpc.RpcError as e:
    other = e.code().name
c.launch(["true"])
events = c.call(
    "/aria.v1.AuthService/ListAuditEvents", auth_pb2.ListAuditEventsRequest(), auth_pb2.ListAuditEventsResponse
)
result = {"user": made.key.user_id, "other": other, "actors": sorted({e.actor for e in events.events})}
""",
            groups=groups,
        )
        assert mine == {"user": "aria-test-a", "other": "PERMISSION_DENIED", "actors": ["aria-test-a"]}
        with pytest.raises(AssertionError, match=r"Permission denied|PermissionError|UNAVAILABLE"):
            run_as(b.uid, b.gid, d.socket, "c.agents()")  # not in the group: cannot even connect
        # root (an administrator) sees everyone's audit, with request ids
        c = AriaClient(d.channel())
        c.launch(["true"])
        everything = audit(c)
        assert {e.actor for e in everything} == {"root", "aria-test-a"}
        assert [e.action for e in audit(c, actor="aria-test-a")] == ["task.launch", "key.create"]
        assert all(len(e.request_id) >= 16 for e in everything)
    finally:
        d.stop()


def test_the_audit_log_records_who_did_what_with_the_request_id(daemon):
    c = AriaClient(daemon.channel())
    request = task_pb2.LaunchTaskRequest(command_json='["sleep", "30"]')
    metadata = [("x-request-id", "req-launch-1")]
    task_id = c.call("/aria.v1.TaskService/LaunchTask", request, task_pb2.LaunchTaskResponse, metadata=metadata).task_id
    c.cancel(task_id)
    box = c.create_container("audited")
    c.container_call("Remove", box.id)
    events = audit(c)
    assert [(e.action, e.resource_id) for e in events] == [
        ("container.remove", box.id),
        ("container.create", box.id),
        ("task.cancel", task_id),
        ("task.launch", task_id),
    ]
    launch = events[-1]
    assert launch.actor == "root" and launch.request_id == "req-launch-1"
    assert json.loads(launch.detail_json)["command"] == ["sleep", "30"]
    page = audit(c, page_size=2)
    assert len(page) == 2


def test_the_auth_and_audit_commands(daemon, unix_users):
    made = ok(daemon, "auth", "create-key", "--user", "aria-test-b", "--name", "dashboard")
    secret, note = made.splitlines()
    assert secret.startswith("aria_") and "shown only this once" in note
    key_id = note.split()[1]
    assert "dashboard" in ok(daemon, "auth", "list-keys", "--user", "aria-test-b")
    assert secret not in ok(daemon, "auth", "list-keys", "--user", "*")
    assert ok(daemon, "auth", "revoke-key", key_id).startswith(f"revoked {key_id}")
    assert "revoked" in ok(daemon, "auth", "list-keys", "--user", "aria-test-b")
    log = ok(daemon, "audit")
    assert "key.revoke" in log.splitlines()[1] and "key.create" in log.splitlines()[2]
    listed = json.loads(ok(daemon, "--json", "audit", "--actor", "root"))
    assert [e["action"] for e in listed] == ["key.revoke", "key.create"]
    bad = aria(daemon, "auth", "create-key", "--user", "no-such-user-here")
    assert bad.returncode == 1 and "no user" in bad.stderr
