"""At start, both daemons clean what a crash left, and say in the log what they removed."""

from __future__ import annotations

import signal

from aria_trio.proto.quilt.v1 import quilt_pb2 as pb

from aria_client import AriaClient
from conftest import start_daemon, start_quilt
from quilt_client import QuiltClient


def listed(c: QuiltClient) -> list[pb.Container]:
    reply = c.call("/quilt.v1.Containers/ListContainers", pb.ListContainersRequest(), pb.ListContainersResponse)
    return list(reply.containers)


def test_quilt_removes_what_a_crash_left(sock_dir):
    q = start_quilt(sock_dir)
    c = QuiltClient(q.channel())
    thrown = c.run(["sleep", "600"], labels={"aria.tool": "run_command"})  # a call cut off by a crash
    kept = c.create(["true"], labels={"aria.user": "someone"})
    q.stop(signal.SIGKILL)
    bundles = q.data_dir / "bundles"
    (bundles / "incoming").mkdir(parents=True, exist_ok=True)
    (bundles / "incoming" / "upload-crashed.part").write_bytes(b"half an upload")
    (bundles / "unpacked" / ".unpack-crashed" / "x").mkdir(parents=True)
    q = start_quilt(sock_dir)
    try:
        c = QuiltClient(q.channel())
        ids = {
            x.id
            for x in c.call(
                "/quilt.v1.Containers/ListContainers", pb.ListContainersRequest(), pb.ListContainersResponse
            ).containers
        }
        assert thrown.id not in ids and kept.id in ids
        assert not (bundles / "incoming" / "upload-crashed.part").exists()
        assert not (bundles / "unpacked" / ".unpack-crashed").exists()
        said = [e for e in q.logs() if "removed" in str(e.get("event"))]
        assert any(e.get("container") == thrown.id for e in said), said
        assert sum(1 for e in said if "a bundle" in e["event"]) == 2, said
    finally:
        q.stop()


def test_a_runtime_removes_the_throw_away_containers_a_previous_one_left(sock_dir):
    """An adopted (or external) Quilt still holds run_command containers of calls that ended with
    the runtime before: the next runtime removes them before it serves."""
    q = start_quilt(sock_dir)
    try:
        c = QuiltClient(q.channel())
        left = c.run(["sleep", "600"], labels={"aria.tool": "run_command"})
        d = start_daemon(sock_dir, "--quilt-socket", str(q.socket))
        try:
            listed = c.call(
                "/quilt.v1.Containers/ListContainers", pb.ListContainersRequest(), pb.ListContainersResponse
            )
            assert left.id not in {x.id for x in listed.containers}
            assert any(e.get("event") == "removed a run_command container a previous runtime left" for e in d.logs())
            assert AriaClient(d.channel()).list_tasks().tasks == []  # (and it serves)
        finally:
            d.stop()
    finally:
        q.stop()


def test_a_broken_page_token_key_is_made_again_whole(sock_dir):
    data = sock_dir / "data"
    data.mkdir(mode=0o700)
    (data / "page-token.key").write_bytes(b"")  # a crash while it was first written, before
    d = start_daemon(sock_dir)
    try:
        assert len((data / "page-token.key").read_bytes()) == 32
        assert not list(data.glob(".page-token.key.*"))  # (no temporary file left)
    finally:
        d.stop()
