"""A test service for the RPC adapter: every cardinality, handlers that sleep, fail and record.

Built from a descriptor at import (no code generation). `Probe.events` records what the
handlers saw, so tests can check that a handler was cancelled, and when.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
import trio
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from aria_trio.rpc import CallContext, Server
from aria_trio.shared import errors

_FILE = descriptor_pb2.FileDescriptorProto(name="probe/v1/probe.proto", package="probe.v1", syntax="proto3")
_req = _FILE.message_type.add(name="Req")
_resp = _FILE.message_type.add(name="Resp")
_T = descriptor_pb2.FieldDescriptorProto
for msg, fields in (
    (_req, [("mode", _T.TYPE_STRING), ("seconds", _T.TYPE_DOUBLE), ("n", _T.TYPE_INT32), ("data", _T.TYPE_BYTES)]),
    (_resp, [("text", _T.TYPE_STRING), ("count", _T.TYPE_INT64), ("data", _T.TYPE_BYTES)]),
):
    for number, (name, kind) in enumerate(fields, start=1):
        msg.field.add(name=name, number=number, type=kind, label=_T.LABEL_OPTIONAL)
_svc = _FILE.service.add(name="Probe")
for name, cs, ss in (
    ("Unary", False, False),
    ("ServerStream", False, True),
    ("ClientStream", True, False),
    ("Bidi", True, True),
    ("SafeStream", False, True),
):
    _svc.method.add(
        name=name, input_type=".probe.v1.Req", output_type=".probe.v1.Resp", client_streaming=cs, server_streaming=ss
    )
POOL = descriptor_pool.DescriptorPool()
DESCRIPTOR = POOL.Add(_FILE)
SERVICE = DESCRIPTOR.services_by_name["Probe"]
Req: Any = message_factory.GetMessageClass(POOL.FindMessageTypeByName("probe.v1.Req"))
Resp: Any = message_factory.GetMessageClass(POOL.FindMessageTypeByName("probe.v1.Resp"))

SECRET = "password=hunter2 in /srv/secret/config.py"


class Probe:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, float]] = []  # (method, what, trio time)
        self.last_ctx: CallContext | None = None
        self.running = 0
        self.max_running = 0

    def _note(self, method: str, what: str) -> None:
        self.events.append((method, what, trio.current_time()))

    def saw(self, method: str, what: str) -> bool:
        return any(m == method and w == what for m, w, _ in self.events)

    async def _behave(self, method: str, req: Any, ctx: CallContext) -> Any:
        self.last_ctx = ctx
        mode = req.mode
        if mode == "sleep":
            await trio.sleep(req.seconds)
            return Resp(text="slept")
        if mode == "not_found":
            raise errors.NotFound("thing 42 not found")
        if mode == "invalid":
            raise errors.InvalidArgument("n must be positive", fields={"n": "must be > 0"})
        if mode == "boom":
            raise RuntimeError(SECRET)
        if mode == "big":
            return Resp(data=b"x" * req.n)
        if mode == "peer":
            assert ctx.peer is not None
            return Resp(text=f"{ctx.peer.pid}:{ctx.peer.uid}:{ctx.peer.gid}")
        if mode == "trailing":
            ctx.initial_metadata.append(("x-initial", "hello"))
            ctx.trailing_metadata.append(("x-trailer", "bye"))
            return Resp(text="md")
        if mode == "deadline":
            remaining = ctx.time_remaining()
            return Resp(text="none" if remaining is None else f"{remaining:.3f}")
        return Resp(text=f"echo:{mode}", count=len(req.data))

    async def Unary(self, req: Any, ctx: CallContext) -> Any:
        self._note("Unary", "start")
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            return await self._behave("Unary", req, ctx)
        except trio.Cancelled:
            self._note("Unary", "cancelled")
            raise
        finally:
            self.running -= 1

    async def ServerStream(self, req: Any, ctx: CallContext) -> AsyncIterator[Any]:
        self._note("ServerStream", "start")
        try:
            for i in range(req.n if req.n else 2**31):
                yield Resp(text=str(i), count=i)
                if req.seconds:
                    await trio.sleep(req.seconds)
            if req.mode == "fail_after":
                raise errors.FailedPrecondition("stream failed after its messages")
        except trio.Cancelled:
            self._note("ServerStream", "cancelled")
            raise
        except GeneratorExit:
            self._note("ServerStream", "closed")
            raise

    async def ClientStream(self, requests: AsyncIterator[Any], ctx: CallContext) -> Any:
        self._note("ClientStream", "start")
        total = count = 0
        try:
            async for req in requests:
                count += 1
                total += len(req.data)
                if req.mode == "early":
                    if req.seconds:
                        await trio.sleep(req.seconds)
                    return Resp(text="early", count=total)
                if req.mode == "invalid":
                    raise errors.InvalidArgument("bad chunk", fields={"data": "bad"})
            return Resp(text=f"{count} messages", count=total)
        except trio.Cancelled:
            self._note("ClientStream", "cancelled")
            raise

    async def Bidi(self, requests: AsyncIterator[Any], ctx: CallContext) -> AsyncIterator[Any]:
        self._note("Bidi", "start")
        try:
            async for req in requests:
                yield Resp(text=f"echo:{req.mode}")
        except (trio.Cancelled, GeneratorExit):  # (GeneratorExit: cancelled while at its yield)
            self._note("Bidi", "cancelled")
            raise

    @trio.as_safe_channel
    async def SafeStream(self, req: Any, ctx: CallContext) -> AsyncGenerator[Any, None]:
        """A streaming handler made with trio.as_safe_channel: it yields from inside a nursery,
        what a background task of its own produces (n messages, `seconds` apart)."""
        self._note("SafeStream", "start")
        if req.mode == "not_found":
            raise errors.NotFound("thing 42 not found")
        send, receive = trio.open_memory_channel[Any](0)

        async def produce() -> None:
            try:
                async with send:
                    for i in range(req.n):
                        await send.send(Resp(text=str(i), count=i))
                        await trio.sleep(req.seconds)
                if req.mode == "fail_after":
                    raise errors.FailedPrecondition("stream failed after its messages")
            except trio.Cancelled:
                self._note("SafeStream", "producer cancelled")
                raise

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            async with receive:
                async for item in receive:
                    yield item


def make_server(probe: Probe, **options: Any) -> Server:
    server = Server(**options)
    server.add_service(SERVICE, probe, authenticated=False)
    return server


# -- grpcio (the independent client) -------------------------------------------------------------


def grpc_channel(path: str, **options: Any) -> grpc.Channel:
    return grpc.insecure_channel("unix:" + path, options=list(options.items()))


def unary(channel: grpc.Channel) -> Any:
    return channel.unary_unary("/probe.v1.Probe/Unary", Req.SerializeToString, Resp.FromString)


def server_stream(channel: grpc.Channel) -> Any:
    return channel.unary_stream("/probe.v1.Probe/ServerStream", Req.SerializeToString, Resp.FromString)


def client_stream(channel: grpc.Channel) -> Any:
    return channel.stream_unary("/probe.v1.Probe/ClientStream", Req.SerializeToString, Resp.FromString)


def bidi(channel: grpc.Channel) -> Any:
    return channel.stream_stream("/probe.v1.Probe/Bidi", Req.SerializeToString, Resp.FromString)


def safe_stream(channel: grpc.Channel) -> Any:
    return channel.unary_stream("/probe.v1.Probe/SafeStream", Req.SerializeToString, Resp.FromString)
