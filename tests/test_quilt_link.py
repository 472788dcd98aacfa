"""Nothing one caller does stops the daemon: the Quilt link past a stream cap, and a watcher that
meets the unexpected; the typed client gives the domain its own errors, and leaves no call behind."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from aria_trio.proto.aria.v1 import aria_pb2
from aria_trio.proto.quilt.v1 import quilt_pb2 as q
from aria_trio.rpc import Channel, Health, RpcError, Server, StatusCode
from aria_trio.rpc.health import DESCRIPTOR as HEALTH
from aria_trio.runtime.quilt_client import QuiltLink
from aria_trio.shared import errors

from aria_client import AriaClient
from conftest import start_daemon
from probe import Probe, Req, Resp, make_server

pytestmark = pytest.mark.serial  # calls that must all run at once, timed

UNARY = "/probe.v1.Probe/Unary"


async def serve_probe(nursery: trio.Nursery, path: Path, streams: int) -> Probe:
    probe = Probe()
    await nursery.start(make_server(probe, max_concurrent_streams=streams).serve, str(path))
    return probe


async def test_calls_past_the_server_s_stream_cap_wait_for_a_stream_not_fail(nursery, sock_dir):
    probe = await serve_probe(nursery, sock_dir / "cap.sock", streams=4)
    async with Channel.connect(str(sock_dir / "cap.sock")) as channel:
        done: list[str] = []

        async def one() -> None:
            reply = await channel.unary(UNARY, Req(mode="sleep", seconds=0.2), Resp, timeout=10)
            done.append(reply.text)

        async with trio.open_nursery() as calls:
            for _ in range(20):
                calls.start_soon(one)
        assert done == ["slept"] * 20
        assert probe.max_running == 4  # never more than the server allows, none refused
        # a call that cannot get a stream before its deadline: DEADLINE_EXCEEDED, not a failure
        async with trio.open_nursery() as calls:
            for _ in range(4):
                calls.start_soon(lambda: channel.unary(UNARY, Req(mode="sleep", seconds=1), Resp, timeout=5))
            await trio.sleep(0.2)
            with pytest.raises(RpcError) as info:
                await channel.unary(UNARY, Req(mode="hi"), Resp, timeout=0.3)
            assert info.value.code is StatusCode.DEADLINE_EXCEEDED


async def test_the_quilt_link_opens_more_connections_when_one_is_full(nursery, sock_dir):
    path = sock_dir / "quilt.sock"
    probe = await serve_probe(nursery, path, streams=4)
    link = QuiltLink(path, spawn=None, health=Health(), services=[])
    await nursery.start(link.run)
    began = trio.current_time()
    async with trio.open_nursery() as calls:
        for _ in range(12):
            calls.start_soon(link.unary, UNARY, Req(mode="sleep", seconds=0.5), Resp)
    took = trio.current_time() - began
    assert probe.max_running == 12  # all at once, on three connections
    assert len(link._extra) >= 2 and took < 1.5


class FakeQuilt:
    """A Quilt that starts containers, then answers WaitContainer with bytes that are no message:
    the runtime's container watcher meets an error nobody planned for."""

    async def CreateContainer(self, request: q.CreateContainerRequest, ctx: Any) -> q.Container:
        return q.Container(id="c-fake", spec=request.spec, state=q.CONTAINER_CREATED)

    async def StartContainer(self, request: q.ContainerRef, ctx: Any) -> q.Container:
        return q.Container(id=request.id, state=q.CONTAINER_RUNNING)

    async def GetContainer(self, request: q.ContainerRef, ctx: Any) -> q.Container:
        return q.Container(id=request.id, state=q.CONTAINER_RUNNING)

    async def WaitContainer(self, request: q.ContainerRef, ctx: Any) -> Any:
        class Garbage:
            def SerializeToString(self) -> bytes:
                return b"\xff\xff\xff\xff"

        return Garbage()


async def test_an_unexpected_error_in_a_watcher_fails_that_resource_only(nursery, sock_dir):
    server = Server(error_domain="quilt.v1")
    server.add_service(q.DESCRIPTOR.services_by_name["Containers"], FakeQuilt(), authenticated=False)
    server.add_service(HEALTH, Health(), authenticated=False)
    fake = sock_dir / "fake-quilt.sock"
    await nursery.start(server.serve, str(fake))
    d = await trio.to_thread.run_sync(lambda: start_daemon(sock_dir, "--quilt-socket", str(fake)))
    try:

        def check() -> None:
            c = AriaClient(d.channel())
            box = c.create_container("box")
            c.container_call("Start", box.id)
            deadline = time.monotonic() + 10
            while (status := next(x.status for x in c.list_containers() if x.id == box.id)) == aria_pb2.RUNNING:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert status == aria_pb2.FAILED
            assert d.proc.poll() is None  # the daemon serves on
            assert c.list_tasks() is not None
            assert any(e.get("event") == "container watcher failed" and e.get("container") == box.id for e in d.logs())

        await trio.to_thread.run_sync(check)
    finally:
        await trio.to_thread.run_sync(d.stop)


class FakeTasksAndBundles:
    """A Quilt whose task output ends in NOT_FOUND ("gone") or never ends (noting its
    cancellation), that knows no task, and that refuses every upload after its metadata."""

    def __init__(self) -> None:
        self.follow_cancelled = trio.Event()

    async def TaskOutput(self, request: q.TaskOutputRequest, ctx: Any) -> AsyncIterator[q.OutputLine]:
        for n in range(2):
            yield q.OutputLine(offset=request.offset + n, text=f"line {n}")
        if request.id == "gone":
            raise errors.NotFound("no task 'gone'")
        try:
            await trio.sleep_forever()
        finally:
            self.follow_cancelled.set()

    async def GetTask(self, request: q.TaskRef, ctx: Any) -> q.Task:
        raise errors.NotFound(f"no task {request.id!r}", reason="TASK_NOT_FOUND")

    async def UploadBundle(self, requests: AsyncIterator[q.UploadBundleRequest], ctx: Any) -> q.Bundle:
        first = await anext(requests)
        raise errors.InvalidArgument(f"{first.metadata.filename} is too large", fields={"size_bytes": "too large"})


async def test_the_typed_client_gives_quilt_s_errors_as_the_domain_s_and_leaves_no_call_behind(nursery, sock_dir):
    fake = FakeTasksAndBundles()
    server = Server(error_domain="quilt.v1")
    for name in ("Tasks", "Bundles"):
        server.add_service(q.DESCRIPTOR.services_by_name[name], fake, authenticated=False)
    path = sock_dir / "quilt.sock"
    await nursery.start(server.serve, str(path))
    link = QuiltLink(path, spawn=None, health=Health(), services=[])
    await nursery.start(link.run)

    with pytest.raises(errors.NotFound) as unary:
        await link.get_task(q.TaskRef(id="t-1"))
    assert unary.value.reason == "TASK_NOT_FOUND" and "t-1" in unary.value.message

    seen: list[tuple[int, str]] = []
    with pytest.raises(errors.NotFound):  # (a stream's error comes as the domain's too, after its lines)
        async with link.task_output(q.TaskOutputRequest(id="gone", offset=5)) as lines:
            async for line in lines:
                seen.append((line.offset, line.text))
    assert seen == [(5, "line 0"), (6, "line 1")]

    # Leaving the block early ends the call in Quilt too; a cancellation stays a cancellation.
    async with link.task_output(q.TaskOutputRequest(id="forever", follow=True)) as lines:
        first = await lines.receive()
        assert first is not None and first.text == "line 0"
    with trio.fail_after(5):
        await fake.follow_cancelled.wait()
    fake.follow_cancelled = trio.Event()
    with trio.move_on_after(0.3) as waited:
        async with link.task_output(q.TaskOutputRequest(id="forever", follow=True)) as lines:
            async for _ in lines:
                pass
    assert waited.cancelled_caught
    with trio.fail_after(5):
        await fake.follow_cancelled.wait()

    # An upload Quilt refuses early: its refusal, at once, though the chunks had not all gone.
    send, receive = trio.open_memory_channel[bytes](1)

    async def feed() -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            async with send:
                for _ in range(10_000):
                    await send.send(b"x" * 1024)

    nursery.start_soon(feed)
    with trio.fail_after(5), pytest.raises(errors.InvalidArgument) as refused:
        async with receive:
            await link.upload_bundle(q.BundleMetadata(filename="big.aria", size_bytes=10_240_000), receive)
    assert refused.value.message == "big.aria is too large" and refused.value.fields == {"size_bytes": "too large"}
