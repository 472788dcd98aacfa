"""At start, both daemons clean what a crash left, and say in the log what they removed."""

from __future__ import annotations

import os
import signal
import time

import grpc

from aria_trio.proto.quilt.v1 import quilt_pb2 as pb

import bundles
from aria_client import AriaClient
from conftest import start_daemon, start_quilt
from quilt_client import QuiltClient


def listed(c: QuiltClient) -> list[pb.Container]:
    reply = c.call("/quilt.v1.Containers/ListContainers", pb.ListContainersRequest(), pb.ListContainersResponse)
    return list(reply.containers)


def quilt_upload(c: QuiltClient, data: bytes, labels: dict[str, str]) -> pb.Bundle:
    meta = pb.BundleMetadata(filename="b.aria", size_bytes=len(data), labels=labels)
    call = c.channel.stream_unary(
        "/quilt.v1.Bundles/UploadBundle", pb.UploadBundleRequest.SerializeToString, pb.Bundle.FromString
    )
    return call(iter([pb.UploadBundleRequest(metadata=meta), pb.UploadBundleRequest(chunk=data)]), timeout=30)


def quilt_bundles(c: QuiltClient) -> list[pb.Bundle]:
    return list(c.call("/quilt.v1.Bundles/ListBundles", pb.ListBundlesRequest(), pb.ListBundlesResponse).bundles)


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
    (q.data_dir / "containers" / "c-0123456789ab" / "workspace").mkdir(parents=True)  # a create cut short
    (q.data_dir / "tasks").mkdir(exist_ok=True)
    (q.data_dir / "tasks" / "t-0123456789ab.jsonl").write_text("{}\n")  # an exec cut short
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
        assert not (q.data_dir / "containers" / "c-0123456789ab").exists()
        assert not (q.data_dir / "tasks" / "t-0123456789ab.jsonl").exists()
        assert (q.data_dir / "containers" / kept.id).is_dir()
        assert sum(1 for e in said if e["event"] == "removed the folder of a container a crash left half-made") == 2
    finally:
        q.stop()


def test_a_runtime_removes_what_nobody_owns_any_more(sock_dir):
    """An adopted (or external) Quilt still holds what the runtime before made and did not get to
    remove: run_command containers, containers of tasks that are over, containers whose creation
    it never recorded. The next runtime removes those before it serves, and only those."""
    q = start_quilt(sock_dir)
    try:
        c = QuiltClient(q.channel())
        user = {"aria.user": "root"}
        thrown = c.run(["sleep", "600"], labels={"aria.tool": "run_command"})
        over = c.create(["true"], labels={**user, "aria.task": "t-0000000000000001"})  # no such task
        unrecorded = c.create(["true"], labels={**user, "aria.persistent": "true"})
        foreign = c.create(["true"], labels=user)  # not one the runtime makes: not its to judge
        other = c.create(["true"])  # `aria quilt run` and the like
        unregistered = quilt_upload(c, bundles.flat(bundles.manifest("left")), {"aria.user": "root"})
        direct = quilt_upload(c, bundles.flat(bundles.manifest("direct")), {})  # uploaded to Quilt itself
        d = start_daemon(sock_dir, "--quilt-socket", str(q.socket))
        try:
            a = AriaClient(d.channel())
            ids = {x.id for x in listed(c)}
            assert ids.isdisjoint({thrown.id, over.id, unrecorded.id}) and {foreign.id, other.id} <= ids
            said = {
                e["container"]: e["what"]
                for e in d.logs()
                if e.get("event") == "removed what a previous runtime left in quilt" and "container" in e
            }
            assert said == {
                thrown.id: "a run_command container",
                over.id: "the container of a task that is over",
                unrecorded.id: "a container whose creation was never recorded",
            }
            gone = [e for e in d.logs() if e.get("what") == "a bundle never registered"]
            assert [e["bundle"] for e in gone] == [unregistered.id]
            assert {b.id for b in quilt_bundles(c)} == {direct.id}
            registered = a.upload_bytes(bundles.flat(bundles.manifest("kept")))  # through the runtime
            assert a.list_tasks().tasks == []  # (and it serves)
            box = a.create_container("kept")  # recorded: a runtime that starts again keeps it
        finally:
            d.stop()
        d = start_daemon(sock_dir, "--quilt-socket", str(q.socket))
        try:
            assert box.id in {x.id for x in listed(c)}
            assert len(quilt_bundles(c)) == 2 and registered.bundle_id
            assert not [e for e in d.logs() if e.get("event") == "removed what a previous runtime left in quilt"]
            assert AriaClient(d.channel()).container_call("Get", box.id).id == box.id
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


def test_after_quilt_restarts_the_runtime_removes_what_the_crash_swallowed(sock_dir):
    """A create or an upload whose answer died with Quilt: stored by it, never recorded by the
    runtime (which kept running). Swept when the link to the restarted Quilt comes up."""
    from test_survival import quilts_of

    d = start_daemon(sock_dir)
    try:
        c = QuiltClient(grpc.insecure_channel(f"unix:{d.data_dir / 'quilt.sock'}"))
        user = {"aria.user": "root"}
        unrecorded = c.create(["true"], labels={**user, "aria.persistent": "false"})
        unregistered = quilt_upload(c, bundles.flat(bundles.manifest("swallowed")), user)
        a = AriaClient(d.channel())
        kept = a.create_container("kept")
        (old,) = quilts_of(d.data_dir)
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 20
        said: list = []
        while len(said) < 2 and time.monotonic() < deadline:
            said = [e for e in d.logs() if e.get("event") == "removed what a previous runtime left in quilt"]
            time.sleep(0.05)
        assert sorted((e.get("container") or e.get("bundle"), e["what"]) for e in said) == sorted(
            [
                (unrecorded.id, "a container whose creation was never recorded"),
                (unregistered.id, "a bundle never registered"),
            ]
        )
        assert quilts_of(d.data_dir) != [old]
        assert {x.id for x in listed(c)} == {kept.id}
        assert a.container_call("Get", kept.id).id == kept.id
    finally:
        d.stop()


def test_quilt_kills_what_a_crash_left_in_the_cgroups_of_starts_and_tool_runs(sock_dir):
    """A sandbox spawned in the instant before bubblewrap's --die-with-parent took hold outlives
    a Quilt killed then; it is in its container's (or tool run's) cgroup, which the next Quilt
    kills: for a container whose start the crash cut (CREATED), and for a tool run."""
    import subprocess

    from aria_trio.quilt import limits
    from aria_trio.quilt.stage import stage_id

    mode = limits.detect()
    if not mode.parents:
        raise AssertionError("this machine has cgroups (CI too): the test needs them")
    q = start_quilt(sock_dir)
    c = QuiltClient(q.channel())
    created = c.create(["true"])  # CREATED: its start is what the crash cuts
    q.stop(signal.SIGKILL)
    survivors = []
    names = (created.id, f"tool-{stage_id(q.data_dir)}-0123456789ab")
    for name in names:
        cgroup = limits.Cgroup(mode, name)
        cgroup.create(64 << 20, 16)
        procs = " ".join(f"echo $$ > {f};" for f in cgroup.procs_files)
        survivors.append(subprocess.Popen(["sh", "-c", f"{procs} exec sleep 600"]))
    deadline = time.monotonic() + 5
    while not all(limits.Cgroup(mode, n).pids() for n in names) and time.monotonic() < deadline:
        time.sleep(0.02)
    q = start_quilt(sock_dir)
    try:
        for p in survivors:
            assert p.wait(10) == -signal.SIGKILL
        said = [e for e in q.logs() if "crash left" in str(e.get("event"))]
        assert any(e.get("container") == created.id for e in said), said
        assert any(str(e.get("cgroup", "")).startswith("tool-") for e in said), said
        assert QuiltClient(q.channel()).get(created.id).state == pb.CONTAINER_CREATED  # (and it may start)
    finally:
        q.stop()
