"""Deadlines, client cancels and disconnects end the handler at once, and leave nothing behind."""

from __future__ import annotations

import gc
import socket
import subprocess
import sys
import textwrap
import time
import tracemalloc

import grpc
import pytest
import trio
from purerpc.grpclib.config import GRPCConfiguration

from aria_trio.rpc.protocol import ClientConnection

from probe import Req, bidi, client_stream, grpc_channel, safe_stream, server_stream, unary

pytestmark = pytest.mark.serial  # deadlines and cancels measured to 100 ms: alone


async def test_deadline_exceeded_within_100ms(probe_server):
    def call():
        with grpc_channel(probe_server.path) as ch:
            started = time.monotonic()
            try:
                unary(ch)(Req(mode="sleep", seconds=10), timeout=0.5)
            except grpc.RpcError as err:
                return err, time.monotonic() - started

    err, took = await trio.to_thread.run_sync(call)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert took < 0.6
    probe = probe_server.probe
    start = next(t for m, w, t in probe.events if (m, w) == ("Unary", "start"))
    cancelled = next(t for m, w, t in probe.events if (m, w) == ("Unary", "cancelled"))
    assert 0.4 < cancelled - start < 0.6  # the server's own cancel scope: the deadline, within 100 ms


async def test_own_client_sends_its_deadline_and_gets_deadline_exceeded(probe_server):
    from aria_trio.rpc import Channel, RpcError, StatusCode

    from probe import Resp

    async with Channel.connect(probe_server.path) as channel:
        started = trio.current_time()
        try:
            await channel.unary("/probe.v1.Probe/Unary", Req(mode="sleep", seconds=5), Resp, timeout=0.3)
        except RpcError as exc:
            assert exc.code is StatusCode.DEADLINE_EXCEEDED
        else:
            raise AssertionError("no DEADLINE_EXCEEDED")
        assert trio.current_time() - started < 0.45
    await _wait_for(probe_server.probe, "Unary", "cancelled")


async def _wait_for(probe, method, what, timeout=2.0):
    with trio.fail_after(timeout):
        while not probe.saw(method, what):
            await trio.sleep(0.005)
    return trio.current_time()


async def test_cancel_of_server_stream_cancels_the_handler_at_once(probe_server):
    probe = probe_server.probe

    def call():
        with grpc_channel(probe_server.path) as ch:
            it = server_stream(ch)(Req(n=1000, seconds=3), timeout=20)
            next(it)
            it.cancel()
            return time.monotonic()

    await trio.to_thread.run_sync(call)
    cancelled_at = await _wait_for(probe, "ServerStream", "cancelled")
    start = next(t for m, w, t in probe.events if (m, w) == ("ServerStream", "start"))
    assert cancelled_at - start < 1.0  # not at the next message, 3 s later


async def test_cancel_of_client_stream_waiting_for_input(probe_server):
    probe = probe_server.probe
    release = trio.Event()

    def call():
        with grpc_channel(probe_server.path) as ch:

            def requests():
                yield Req(data=b"1")
                trio.from_thread.run_sync(lambda: None)
                time.sleep(0.2)
                raise RuntimeError("client gives up")  # grpcio cancels the call

            try:
                client_stream(ch)(requests(), timeout=20)
            except grpc.RpcError as err:
                return err

    err = await trio.to_thread.run_sync(call)
    assert err.code() == grpc.StatusCode.UNKNOWN or err.code() == grpc.StatusCode.CANCELLED
    await _wait_for(probe, "ClientStream", "cancelled")
    release.set()


async def test_cancel_of_bidi_stream(probe_server):
    probe = probe_server.probe

    def call():
        with grpc_channel(probe_server.path) as ch:

            def requests():
                yield Req(mode="a")
                time.sleep(10)

            it = bidi(ch)(requests(), timeout=20)
            first = next(it).text
            it.cancel()
            return first

    assert await trio.to_thread.run_sync(call) == "echo:a"
    await _wait_for(probe, "Bidi", "cancelled")


async def test_killed_client_process_cancels_its_handler(probe_server):
    probe = probe_server.probe
    script = textwrap.dedent(f"""
        import sys, grpc
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        from probe import Req, grpc_channel, client_stream
        ch = grpc_channel({probe_server.path!r})
        def requests():
            yield Req(data=b"x")
            print("sent", flush=True)
            import time; time.sleep(60)
        client_stream(ch)(requests(), timeout=60)
    """)
    proc = await trio.lowlevel.open_process([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        await proc.stdout.receive_some(10)
        await _wait_for(probe, "ClientStream", "start", timeout=10)
        proc.kill()
        await _wait_for(probe, "ClientStream", "cancelled")
    finally:
        proc.kill()
        await proc.wait()


def _raw_request(path: str, method: str, message: bytes) -> socket.socket:
    """Start a call like a client would, then leave without a word (no RST_STREAM, no GOAWAY)."""
    conn = ClientConnection(GRPCConfiguration(client_side=True), max_concurrent_streams=10, connection_window=1 << 20)
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.start_request(sid, "http", "probe.v1.Probe", method, None, "localhost", None, "+proto", ())
    conn.send_data(sid, len(message).to_bytes(5, "big") + message, end_stream=True)  # flag 0, length
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(conn.data_to_send())
    return sock


def _task_count() -> int:
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


async def test_two_hundred_vanishing_clients_leak_nothing(probe_server):
    server, probe = probe_server.server, probe_server.probe
    request = Req(n=10**6, seconds=0.05).SerializeToString()

    async def vanish(rounds):
        for _ in range(rounds):
            sock = _raw_request(probe_server.path, "ServerStream", request)
            await trio.sleep(0.005)
            sock.close()  # like a killed process: the kernel closes the socket
        with trio.fail_after(5):
            while server._connections or server._active_calls:
                await trio.sleep(0.01)

    await vanish(20)  # warm up caches and allocator
    gc.collect()
    tracemalloc.start()
    tasks_before = _task_count()
    before = tracemalloc.take_snapshot()
    await vanish(200)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert _task_count() == tasks_before
    assert server._active_calls == 0 and not server._connections
    assert probe.events.count  # the handlers did run...
    started = sum(1 for m, w, _ in probe.events if (m, w) == ("ServerStream", "start"))
    ended = sum(1 for m, w, _ in probe.events if m == "ServerStream" and w in ("cancelled", "closed"))
    assert started == ended == 220  # ...and every one of them was ended
    # The probe's own event list grows by 440 tuples (~50 KiB); anything per-call beyond that leaks.
    assert growth < 256 * 1024, f"memory grew by {growth} bytes over 200 vanished clients"


# -- a streaming handler made with trio.as_safe_channel ---------------------------------------------


async def test_a_safe_channel_handler_streams_fails_and_is_cancelled_with_its_tasks(probe_server):
    """The adapter serves a handler that returns trio.as_safe_channel's context manager: its
    messages in order, an error before the first one as the call's status, one after them after
    them, and a client's cancel cancels the handler's own background task at once."""
    probe = probe_server.probe

    def calls():
        with grpc_channel(probe_server.path) as ch:
            got = [r.count for r in safe_stream(ch)(Req(n=5), timeout=20)]
            try:
                list(safe_stream(ch)(Req(mode="not_found"), timeout=20))
            except grpc.RpcError as err:
                early = err
            seen = []
            try:
                for r in safe_stream(ch)(Req(n=2, mode="fail_after"), timeout=20):
                    seen.append(r.count)
            except grpc.RpcError as err:
                late = err
            it = safe_stream(ch)(Req(n=1000, seconds=3), timeout=20)
            next(it)
            it.cancel()
            return got, early, seen, late

    got, early, seen, late = await trio.to_thread.run_sync(calls)
    assert got == [0, 1, 2, 3, 4]
    assert early.code() == grpc.StatusCode.NOT_FOUND and "thing 42" in early.details()
    assert seen == [0, 1] and late.code() == grpc.StatusCode.FAILED_PRECONDITION
    cancelled_at = await _wait_for(probe, "SafeStream", "producer cancelled")
    start = [t for m, w, t in probe.events if (m, w) == ("SafeStream", "start")][-1]
    assert cancelled_at - start < 1.0  # not at its next message, 3 s later
