"""`aria serve` as a supervisor runs it: socket, lock, readiness, signals, shutdown, services."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from aria_trio.proto.aria.v1 import session_pb2
from aria_trio.proto.aria.v1 import user_preference_pb2 as prefs_pb
from aria_trio.shared.config import RUNTIME_SETTINGS

from conftest import start_daemon

GET = "/aria.v1.UserPreferenceService/GetUserPreferences"


def get_prefs(channel, path=GET, **kwargs):
    return channel.unary_unary(
        path, prefs_pb.GetUserPreferencesRequest.SerializeToString, prefs_pb.UserPreferences.FromString
    )(prefs_pb.GetUserPreferencesRequest(), timeout=5, **kwargs)


def test_socket_and_folder_are_private(daemon):
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(daemon.socket.parent).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(daemon.socket).st_mode)
    with daemon.channel() as ch:
        get_prefs(ch)  # the WAL and its index exist once the database is used
    for path in daemon.data_dir.iterdir():  # (quilt/ is the Quilt child's folder)
        assert stat.S_IMODE(os.stat(path).st_mode) == (0o700 if path.is_dir() else 0o600), path


def test_stale_socket_file_is_replaced(sock_dir):
    (sock_dir / "run").mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_dir / "run" / "runtime.sock"))
    stale.close()  # the file stays, nobody listens: what a crashed daemon leaves
    d = start_daemon(sock_dir)
    try:
        with d.channel() as ch:
            get_prefs(ch)
        assert any(e["event"] == "replacing a stale socket file" for e in d.logs())
    finally:
        assert d.stop() == 0


def test_second_daemon_on_the_same_socket_refuses_to_start(daemon, sock_dir):
    second = start_daemon(sock_dir, wait=False)
    assert second.proc.wait(20) == 1
    assert "already serving" in second.log_path.read_text()
    with daemon.channel() as ch:  # the first one is unharmed
        get_prefs(ch)


def test_foreign_listener_is_never_stolen(sock_dir):
    (sock_dir / "run").mkdir(mode=0o700)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(sock_dir / "run" / "runtime.sock"))
    other.listen()
    try:
        d = start_daemon(sock_dir, wait=False)
        assert d.proc.wait(20) == 1
        assert "already listening" in d.log_path.read_text()
        assert os.path.exists(sock_dir / "run" / "runtime.sock")
    finally:
        other.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.serial  # timed: a stop under 5 s
def test_signal_stops_streams_with_unavailable_and_exits_zero(sock_dir, sig, request):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    request.addfinalizer(notify.close)  # (else it warns when collected)
    notify_path = str(sock_dir / "notify.sock")
    notify.bind(notify_path)
    notify.settimeout(10)
    d = start_daemon(sock_dir, env={"NOTIFY_SOCKET": notify_path})
    ready = notify.recv(4096).decode()
    assert "READY=1" in ready.splitlines()
    seen = []
    errors = []

    def watch():
        with d.channel() as ch:
            try:
                for reply in health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=30):
                    seen.append(reply.status)
            except grpc.RpcError as err:
                errors.append((err.code(), err.details()))

    watcher = threading.Thread(target=watch)
    watcher.start()
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    assert d.stop(sig) == 0
    watcher.join(10)
    assert time.monotonic() - started < 5  # streams do not hold shutdown for the grace period
    # the watcher saw SERVING, then NOT_SERVING at the signal, then its stream ended UNAVAILABLE
    assert seen == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]
    assert errors and errors[0][0] == grpc.StatusCode.UNAVAILABLE
    assert "STOPPING=1" in notify.recv(4096).decode().splitlines()
    assert not d.socket.exists()
    assert any(e["event"] == "stopped" for e in d.logs())


def test_both_names_reach_the_same_service_and_unknown_methods_are_unimplemented(daemon):
    with daemon.channel() as ch:
        for path in ("/aria.v1.SessionService/ExecuteTurn", "/aria.SessionService/ExecuteTurn"):
            call = ch.unary_stream(
                path, session_pb2.ExecuteTurnRequest.SerializeToString, session_pb2.TurnOutput.FromString
            )
            with pytest.raises(grpc.RpcError) as info:
                list(call(session_pb2.ExecuteTurnRequest(session_id="s-none", input="hi"), timeout=5))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND and "no session" in info.value.details()
        with pytest.raises(grpc.RpcError) as unknown:
            ch.unary_unary("/aria.v1.TaskService/Nope", lambda b: b, lambda b: b)(b"", timeout=5)
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_legacy_package_name_serves_the_same_service(daemon):
    with daemon.channel() as ch:
        assert get_prefs(ch, "/aria.UserPreferenceService/GetUserPreferences") == get_prefs(ch)


def test_reflection_describes_current_and_legacy_names(daemon):
    with daemon.channel() as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        from google.protobuf import descriptor_pool

        pool = descriptor_pool.DescriptorPool(db)
        legacy = pool.FindServiceByName("aria.TaskService").methods_by_name["GetTask"].output_type.full_name
        current = pool.FindServiceByName("aria.v1.TaskService").methods_by_name["GetTask"].output_type.full_name
    for name in ("Task", "Session", "Container", "Notification", "Bundle", "Registry", "UserPreference", "Auth"):
        assert f"aria.v1.{name}Service" in services and f"aria.{name}Service" in services
    assert {"grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= services
    assert (legacy, current) == ("aria.Task", "aria.v1.Task")


def test_health_lists_every_service(daemon):
    with daemon.channel() as ch:
        statuses = health_pb2_grpc.HealthStub(ch).List(health_pb2.HealthListRequest(), timeout=5).statuses
    names = {k for k in statuses if k}
    assert len(names) == 8 and all(s.status == health_pb2.HealthCheckResponse.SERVING for s in statuses.values())


def test_calls_are_logged_with_the_caller(daemon):
    with daemon.channel() as ch:
        get_prefs(ch, metadata=[("x-request-id", "log-me-1")])
    time.sleep(0.2)
    line = next(e for e in daemon.logs() if e.get("request_id") == "log-me-1")
    assert line["event"] == "rpc" and line["code"] == "OK" and line["method"] == GET
    assert line["peer_uid"] == os.getuid() and line["user"] == __import__("pwd").getpwuid(os.getuid()).pw_name
    assert isinstance(line["duration_ms"], float)


def test_an_api_key_we_cannot_check_is_refused(daemon):
    with daemon.channel() as ch, pytest.raises(grpc.RpcError) as info:
        get_prefs(ch, metadata=[("authorization", "Bearer garbage")])
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_serve_help_documents_every_setting():
    out = subprocess.run(
        [sys.executable, "-m", "aria_trio", "serve", "--help"], capture_output=True, text=True, check=True
    )
    text = " ".join(out.stdout.split())
    for s in RUNTIME_SETTINGS:
        assert s.flag in text and s.env in text and f"config {s.name}" in text


def test_config_file_then_environment_then_flags(sock_dir):
    from_file = sock_dir / "file" / "rt.sock"
    from_env = sock_dir / "env" / "rt.sock"
    (sock_dir / ".aria").mkdir()
    (sock_dir / ".aria" / "config.toml").write_text(f'socket = "{from_file}"\ngrace = 3\n')
    base = [sys.executable, "-m", "aria_trio", "serve", "--data-dir", str(sock_dir / "data"), "--log-format", "json"]
    env = {**os.environ, "HOME": str(sock_dir)}
    env.pop("ARIA_RUNTIME_SOCK", None)

    def served_on(extra_env, extra_args):
        proc = subprocess.Popen(base + extra_args, env={**env, **extra_env}, stderr=subprocess.PIPE, text=True)
        try:
            for line in proc.stderr:
                if '"serving"' in line and '"database"' in line:  # (not its Quilt child's)
                    return __import__("json").loads(line)["socket"]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
        raise AssertionError("never served")

    assert served_on({}, []) == str(from_file)
    assert served_on({"ARIA_RUNTIME_SOCK": str(from_env)}, []) == str(from_env)
    flag = sock_dir / "flag" / "rt.sock"
    assert served_on({"ARIA_RUNTIME_SOCK": str(from_env)}, ["--socket", str(flag)]) == str(flag)


def test_bad_configuration_is_a_clear_error(sock_dir):
    (sock_dir / ".aria").mkdir()
    (sock_dir / ".aria" / "config.toml").write_text("grace = -1\nsokcet = 'x'\n")
    out = subprocess.run(
        [sys.executable, "-m", "aria_trio", "serve"],
        env={**os.environ, "HOME": str(sock_dir)},
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert "unknown setting sokcet" in out.stderr
