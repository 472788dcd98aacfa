"""ContainerService end to end: ownership, status mapping, logs, and a notification per change."""

from __future__ import annotations

import time

import grpc
import pytest
from google.protobuf import timestamp_pb2

from aria_trio.proto.aria.v1 import aria_pb2, session_pb2
from aria_trio.proto.aria.v1 import container_pb2 as pb
from aria_trio.runtime.work.containers import status_of

from aria_client import CONTAINERS, SESSIONS, AriaClient, as_other_user
from conftest import give_up_midway, typical_seconds
from quilt_client import QuiltClient

FINISHED = {aria_pb2.COMPLETED, aria_pb2.FAILED, aria_pb2.CANCELLED}


def container_events(c: AriaClient, container_id: str, count: int) -> list[tuple[int, str]]:
    found = []
    for n in c.events(timeout=10, after_sequence=0, event_types=["container_status"]):
        if n.container_status.container_id == container_id:
            found.append((n.container_status.new_status, n.container_status.status_message))
            if len(found) == count:
                return found
    raise AssertionError(found)


def test_lifecycle_status_mapping_and_events(daemon):
    c = AriaClient(daemon.channel())
    box = c.create_container("worker", command=["sh", "-c", "echo ready; echo oops >&2; sleep 30"])
    assert (box.status, box.name, box.image_path, box.user_id) == (aria_pb2.PENDING, "worker", "host", "root")
    assert not box.HasField("session_id")
    c.container_call("Start", box.id)
    assert c.container_call("Get", box.id).status == aria_pb2.RUNNING
    c.container_call("Stop", box.id)
    assert c.container_call("Get", box.id).status == aria_pb2.CANCELLED
    assert container_events(c, box.id, 3) == [
        (aria_pb2.PENDING, "created"),
        (aria_pb2.RUNNING, "started"),
        (aria_pb2.CANCELLED, "stopped (killed: it does not handle SIGTERM)"),  # (sh, as pid 1)
    ]
    got = [(line.stream, line.line) for line in c.container_logs(box.id)]
    assert sorted(got) == [(pb.ContainerLog.STDOUT, "ready"), (pb.ContainerLog.STDERR, "oops")]
    c.container_call("Remove", box.id)
    with pytest.raises(grpc.RpcError) as info:
        c.container_call("Get", box.id)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_container_that_ends_by_itself_is_announced(daemon):
    c = AriaClient(daemon.channel())
    ok = c.create_container("ok", command=["true"])
    bad = c.create_container("bad", command=["sh", "-c", "exit 4"])
    for box in (ok, bad):
        c.container_call("Start", box.id)
    assert c.wait_container(ok.id, FINISHED).status == aria_pb2.COMPLETED
    assert c.wait_container(bad.id, FINISHED).status == aria_pb2.FAILED
    # the watcher announced it without anyone asking
    assert container_events(c, bad.id, 3)[-1][0] == aria_pb2.FAILED


def test_logs_follow_and_since(daemon):
    c = AriaClient(daemon.channel())
    box = c.create_container("talker", command=["sh", "-c", "echo early; sleep 0.6; echo late; sleep 30"])
    c.container_call("Start", box.id)
    followed = c.container_logs(box.id, follow=True)
    first = next(followed)
    assert first.line == "early"
    assert c.container_call("Get", box.id).status == aria_pb2.RUNNING
    second = next(followed)
    assert second.line == "late"
    followed.cancel()
    since = timestamp_pb2.Timestamp()
    since.FromNanoseconds(first.timestamp.ToNanoseconds() + 1)
    assert [line.line for line in c.container_logs(box.id, since=since)] == ["late"]
    c.container_call("Stop", box.id)


def test_bad_requests_and_wrong_states(daemon):
    c = AriaClient(daemon.channel())
    box = c.create_container("idle")
    with pytest.raises(grpc.RpcError) as info:
        c.container_call("Stop", box.id)  # never started
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    c.container_call("Start", box.id)
    with pytest.raises(grpc.RpcError) as info:
        c.container_call("Remove", box.id)  # running: stop it first
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    c.container_call("Stop", box.id)
    for kw in ({"name": "x" * 200}, {"environment": {"A=B": "c"}}):
        with pytest.raises(grpc.RpcError) as info:
            c.create_container(**kw)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kw
    with pytest.raises(grpc.RpcError) as info:
        c.create_container("x", session_id="s-unknown")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        c.create_container("x", image_path="/no/such/rootfs")
    assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)


def test_sessions_own_containers_and_others_see_none(daemon):
    c = AriaClient(daemon.channel())
    session = c.session()
    inside = c.create_container("in-session", session_id=session.id)
    outside = c.create_container("loose")
    assert inside.session_id == session.id
    assert [x.id for x in c.list_containers(session_id=session.id)] == [inside.id]
    assert {x.id for x in c.list_containers()} == {inside.id, outside.id}
    assert as_other_user(daemon, f"c.container_call('Get', {outside.id!r})") == "NOT_FOUND"
    assert as_other_user(daemon, f"c.container_call('Remove', {outside.id!r})") == "NOT_FOUND"
    assert as_other_user(daemon, f"list(c.container_logs({outside.id!r}))") == "NOT_FOUND"
    assert as_other_user(daemon, "assert not c.list_containers()") == "OK"
    assert c.container_call("Get", outside.id).status == aria_pb2.PENDING


def test_ending_a_session_removes_its_containers_that_are_not_persistent(daemon):
    c = AriaClient(daemon.channel())
    session = c.session()
    throwaway = c.create_container("scratch", session_id=session.id, command=["sleep", "60"])
    kept = c.create_container("kept", session_id=session.id, persistent=True)
    elsewhere = c.create_container("elsewhere")
    c.container_call("Start", throwaway.id)
    ended = c.call(SESSIONS + "EndSession", session_pb2.EndSessionRequest(session_id=session.id), session_pb2.Session)
    assert ended.status == "completed"
    assert {x.id for x in c.list_containers()} == {kept.id, elsewhere.id}
    assert container_events(c, throwaway.id, 3)[-1] == (aria_pb2.CANCELLED, "removed")
    again = c.call(SESSIONS + "EndSession", session_pb2.EndSessionRequest(session_id=session.id), session_pb2.Session)
    assert again.status == "completed"
    with pytest.raises(grpc.RpcError) as info:
        c.call(SESSIONS + "EndSession", session_pb2.EndSessionRequest(session_id="s-nope"), session_pb2.Session)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_start_whose_caller_gives_up_is_still_recorded_and_watched(daemon):
    """StartContainer calls whose deadline passes mid-way: each container either never started
    or is watched to its end (one whose client gave up in between stayed RUNNING forever)."""
    c = AriaClient(daemon.channel())
    warm = iter(range(5))
    typical = typical_seconds(
        lambda box_id: c.container_call("Start", box_id),
        lambda: c.create_container(f"warm-{next(warm)}", command=["true"]).id,
    )
    boxes = iter(range(40))

    def start(timeout: float) -> None:
        box = c.create_container(f"box-{next(boxes)}", command=["true"])
        request = pb.StartContainerRequest(container_id=box.id)
        c.call(CONTAINERS + "StartContainer", request, pb.StartContainerResponse, timeout=timeout)

    give_up_midway(start, [typical * (0.2 + step / 33) for step in range(40)])
    # What the runtime records must come to agree with what Quilt says (asked on Quilt's own
    # socket, which changes nothing in the runtime): a start given up on may still be finishing
    # for a moment, but one Quilt ran is never left PENDING or RUNNING here.
    with grpc.insecure_channel(f"unix:{daemon.data_dir / 'quilt.sock'}") as channel:
        quilt = QuiltClient(channel)
        deadline = time.monotonic() + 30
        while True:
            listed = c.list_containers()
            recorded = {box.id: box.status for box in listed}
            actual = {box_id: status_of(quilt.get(box_id)) for box_id in recorded}
            settled = recorded == actual and aria_pb2.RUNNING not in recorded.values()
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    running = [box_id for box_id, status in recorded.items() if status == aria_pb2.RUNNING]
    assert not running, f"never seen to end: {running}"
    stale = {box_id: (status, actual[box_id]) for box_id, status in recorded.items() if status != actual[box_id]}
    assert not stale, f"recorded state differs from Quilt's: {stale}"
    assert sum(box.status == aria_pb2.COMPLETED for box in listed) >= 5


def test_an_ended_container_starts_again_with_its_workspace(daemon):
    """StartContainer on a COMPLETED, FAILED or CANCELLED container starts it again (contract,
    second round), its workspace as it was; on a running one it is FAILED_PRECONDITION."""
    c = AriaClient(daemon.channel())
    box = c.create_container("again", persistent=True)
    c.container_call("Start", box.id)
    with pytest.raises(grpc.RpcError) as info:
        c.container_call("Start", box.id)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    wrote = c.launch(["sh", "-c", "echo kept > /workspace/note"], type=f"container:exec:{box.id}")
    assert c.wait_task(wrote).status == aria_pb2.COMPLETED
    c.container_call("Stop", box.id)
    assert c.container_call("Get", box.id).status == aria_pb2.CANCELLED
    c.container_call("Start", box.id)
    assert c.container_call("Get", box.id).status == aria_pb2.RUNNING
    read = c.launch(["cat", "/workspace/note"], type=f"container:exec:{box.id}")
    assert c.wait_task(read).status == aria_pb2.COMPLETED
    assert [o.stdout_line for o in c.output(read)] == ["kept"]
    c.container_call("Stop", box.id)
    events = container_events(c, box.id, 5)
    assert [s for s, _ in events] == [
        aria_pb2.PENDING,
        aria_pb2.RUNNING,
        aria_pb2.CANCELLED,
        aria_pb2.RUNNING,
        aria_pb2.CANCELLED,
    ]
