"""Graceful shutdown: GOAWAY, in-flight unary calls finish within the grace period, streams end
with UNAVAILABLE at once, whatever is left ends with UNAVAILABLE at the deadline; socket removed."""

from __future__ import annotations

import os
import time

import grpc
import pytest
import trio

from probe import Probe, Req, grpc_channel, make_server, server_stream, unary

pytestmark = pytest.mark.serial  # grace periods measured: alone


async def test_shutdown_drains_then_ends_the_rest(nursery, sock_dir):
    probe = Probe()
    server = make_server(probe)
    path = str(sock_dir / "d.sock")
    await nursery.start(server.serve, path)
    results: dict[str, object] = {}
    in_flight = trio.Event()

    def client():
        with grpc_channel(path) as ch:
            short = unary(ch).future(Req(mode="sleep", seconds=0.6), timeout=20)
            long = unary(ch).future(Req(mode="sleep", seconds=30), timeout=60)
            stream = server_stream(ch)(Req(n=10**6, seconds=0.05), timeout=60)
            next(stream)
            trio.from_thread.run_sync(in_flight.set)
            started = time.monotonic()
            got = 1
            try:
                for _ in stream:
                    got += 1
            except grpc.RpcError as err:
                results["stream"] = (err.code(), err.details(), time.monotonic() - started)
            results["short"] = (short.result().text, time.monotonic() - started)
            try:
                long.result()
            except grpc.RpcError as err:
                results["long"] = (err.code(), err.details(), time.monotonic() - started)

    async with trio.open_nursery() as n:
        n.start_soon(trio.to_thread.run_sync, client)
        await in_flight.wait()
        await trio.sleep(0.1)
        started = trio.current_time()
        await server.shutdown(grace=1.5)
        took = trio.current_time() - started
        assert not os.path.exists(path), "the socket file outlived the listener"

    stream_code, stream_msg, stream_at = results["stream"]
    assert stream_code == grpc.StatusCode.UNAVAILABLE and stream_msg == "server shutting down"
    assert stream_at < 0.5  # streams do not wait for the grace period
    assert results["short"][0] == "slept"  # an in-flight unary call finished within the grace
    long_code, long_msg, long_at = results["long"]
    assert long_code == grpc.StatusCode.UNAVAILABLE and long_msg == "server shutting down"
    assert 1.4 < long_at < 2.5 and took < 3


async def test_new_connections_are_refused_during_the_grace_period(nursery, sock_dir):
    probe = Probe()
    server = make_server(probe)
    path = str(sock_dir / "r.sock")
    await nursery.start(server.serve, path)

    def busy():
        with grpc_channel(path) as ch:
            return unary(ch)(Req(mode="sleep", seconds=1.0), timeout=10).text

    def late():
        with grpc_channel(path) as ch:
            try:
                unary(ch)(Req(mode="late"), timeout=2)
            except grpc.RpcError as err:
                return err.code()

    async with trio.open_nursery() as n:
        n.start_soon(trio.to_thread.run_sync, busy)
        with trio.fail_after(5):
            while not probe.saw("Unary", "start"):
                await trio.sleep(0.01)
        n.start_soon(server.shutdown, 5.0)
        await trio.sleep(0.1)
        assert await trio.to_thread.run_sync(late) == grpc.StatusCode.UNAVAILABLE
    assert sum(1 for _, what, _ in probe.events if what == "start") == 1  # the late call never ran
