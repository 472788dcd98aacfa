"""The project's own client (the CLI and the Quilt link use it) against a real server."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
import trio
from grpc_health.v1 import health_pb2

from aria_trio.rpc import Channel, RpcError, StatusCode

from probe import Req, Resp


async def test_unary_streams_and_status_details(probe_server):
    async with Channel.connect(probe_server.path) as channel:
        reply = await channel.unary("/probe.v1.Probe/Unary", Req(mode="hi"), Resp, timeout=5)
        assert reply.text == "echo:hi"

        async with channel.call("/probe.v1.Probe/ServerStream", Resp, timeout=5) as call:
            await call.send(Req(n=4), end=True)
            assert [r.text async for r in call] == ["0", "1", "2", "3"]

        async def chunks():
            for size in (3, 4):
                yield Req(data=b"z" * size)

        total = await channel.stream_unary("/probe.v1.Probe/ClientStream", chunks(), Resp, timeout=5)
        assert total.count == 7

        with pytest.raises(RpcError) as info:
            await channel.unary("/probe.v1.Probe/Unary", Req(mode="invalid"), Resp, timeout=5)
        err = info.value
        assert err.code is StatusCode.INVALID_ARGUMENT and err.message == "n must be positive"
        assert err.error_info().reason == "INVALID_ARGUMENT"
        assert dict(err.trailing_metadata)["x-request-id"] == err.error_info().metadata["request_id"]


async def test_leaving_a_call_early_resets_it_on_the_server(probe_server):
    async with Channel.connect(probe_server.path) as channel:
        async with channel.call("/probe.v1.Probe/ServerStream", Resp, timeout=30) as call:
            await call.send(Req(n=10**6, seconds=5), end=True)
            assert (await call.receive()).text == "0"
        with trio.fail_after(2):
            while not probe_server.probe.saw("ServerStream", "cancelled"):
                await trio.sleep(0.01)


async def test_server_death_is_unavailable_not_a_hang(sock_dir):
    path = str(sock_dir / "dying.sock")
    script = textwrap.dedent(f"""
        import sys, trio
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from aria_trio.rpc import Health
        from aria_trio.rpc.health import DESCRIPTOR
        from probe import Probe, make_server
        async def main():
            server = make_server(Probe())
            server.add_service(DESCRIPTOR, Health(), authenticated=False)
            async with trio.open_nursery() as n:
                await n.start(server.serve, {path!r})
                print("ready", flush=True)
        trio.run(main)
    """)
    proc = await trio.lowlevel.open_process([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        said = b""
        while not said.endswith(b"\n"):  # (one print may arrive in two writes: PYTHONUNBUFFERED)
            chunk = await proc.stdout.receive_some(6)
            assert chunk, f"the server ended before it was ready: {said!r}"
            said += chunk
        assert said == b"ready\n"
        async with Channel.connect(path) as channel:
            async with channel.call("/grpc.health.v1.Health/Watch", health_pb2.HealthCheckResponse, timeout=30) as call:
                await call.send(health_pb2.HealthCheckRequest(), end=True)
                assert (await call.receive()).status == health_pb2.HealthCheckResponse.SERVING
                proc.send_signal(signal.SIGKILL)
                started = trio.current_time()
                with pytest.raises(RpcError) as info:
                    await call.receive()
                assert info.value.code is StatusCode.UNAVAILABLE
                assert trio.current_time() - started < 1.0
            with pytest.raises(RpcError) as again:
                await channel.unary(
                    "/grpc.health.v1.Health/Check",
                    health_pb2.HealthCheckRequest(),
                    health_pb2.HealthCheckResponse,
                    timeout=5,
                )
            assert again.value.code is StatusCode.UNAVAILABLE
    finally:
        proc.kill()
        await proc.wait()


async def test_connect_errors_are_clear(sock_dir):
    with pytest.raises(RpcError) as missing:
        async with Channel.connect(str(sock_dir / "nothing.sock")):
            pass
    assert missing.value.code is StatusCode.UNAVAILABLE and "is it running" in missing.value.message


def test_grpcio_server_is_reachable_too(sock_dir):
    """The client also speaks to grpcio servers (a peer we did not write)."""
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    path = str(sock_dir / "grpcio.sock")
    server.add_insecure_port("unix:" + path)
    server.start()
    try:

        async def main():
            async with Channel.connect(path) as channel:
                ok = await channel.unary(
                    "/grpc.health.v1.Health/Check",
                    health_pb2.HealthCheckRequest(),
                    health_pb2.HealthCheckResponse,
                    timeout=5,
                )
                with pytest.raises(RpcError) as info:
                    await channel.unary(
                        "/grpc.health.v1.Health/Check",
                        health_pb2.HealthCheckRequest(service="x"),
                        health_pb2.HealthCheckResponse,
                        timeout=5,
                    )
                return ok.status, info.value.code

        assert trio.run(main) == (health_pb2.HealthCheckResponse.SERVING, StatusCode.NOT_FOUND)
    finally:
        server.stop(0)
