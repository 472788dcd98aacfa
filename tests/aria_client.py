"""A grpcio client for aria.v1 (an independent peer of the runtime), with helpers the tests share."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aria_trio.proto.aria.v1 import aria_pb2, bundle_pb2, container_pb2, notification_pb2, registry_pb2, session_pb2
from aria_trio.proto.aria.v1 import task_pb2 as tpb

TASKS, CONTAINERS = "/aria.v1.TaskService/", "/aria.v1.ContainerService/"
NOTIFY, BUNDLES, REGISTRY, SESSIONS = (
    "/aria.v1.NotificationService/",
    "/aria.v1.BundleService/",
    "/aria.v1.RegistryService/",
    "/aria.v1.SessionService/",
)
FINISHED = {aria_pb2.COMPLETED, aria_pb2.FAILED, aria_pb2.CANCELLED, aria_pb2.TIMEOUT}


def bad_fields(err: grpc.RpcError) -> list[str]:
    """The fields a BadRequest detail names."""
    for detail in rpc_status.from_call(err).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return [v.field for v in bad.field_violations]
    return []


class AriaClient:
    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel

    def call(self, path: str, request: Any, reply: Any, timeout: float = 30, **kw: Any) -> Any:
        fn = self.channel.unary_unary(path, request.SerializeToString, reply.FromString)
        return fn(request, timeout=timeout, **kw)

    def stream(self, path: str, request: Any, reply: Any, timeout: float | None = 30) -> Any:
        return self.channel.unary_stream(path, request.SerializeToString, reply.FromString)(request, timeout=timeout)

    # tasks
    def launch(self, argv: Any, **kw: Any) -> str:
        command = argv if isinstance(argv, str) else json.dumps(argv)
        request = tpb.LaunchTaskRequest(command_json=command, **kw)
        return str(self.call(TASKS + "LaunchTask", request, tpb.LaunchTaskResponse).task_id)

    def task(self, task_id: str) -> tpb.Task:
        return self.call(TASKS + "GetTask", tpb.GetTaskRequest(task_id=task_id), tpb.Task)

    def wait_task(self, task_id: str, timeout: float = 30) -> tpb.Task:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = self.task(task_id)
            if t.status in FINISHED:
                return t
            time.sleep(0.02)
        raise AssertionError(f"task {task_id} still {aria_pb2.TaskStatus.Name(t.status)}")

    def list_tasks(self, **kw: Any) -> tpb.ListTasksResponse:
        return self.call(TASKS + "ListTasks", tpb.ListTasksRequest(**kw), tpb.ListTasksResponse)

    def output(self, task_id: str, follow: bool = False, timeout: float | None = 30) -> Iterator[tpb.TaskOutput]:
        request = tpb.StreamTaskOutputRequest(task_id=task_id, follow=follow)
        return self.stream(TASKS + "StreamTaskOutput", request, tpb.TaskOutput, timeout)  # type: ignore[no-any-return]

    def cancel(self, task_id: str) -> bool:
        reply = self.call(TASKS + "CancelTask", tpb.CancelTaskRequest(task_id=task_id), tpb.CancelTaskResponse)
        return bool(reply.cancellation_initiated)

    # containers
    def create_container(self, name: str = "box", **kw: Any) -> container_pb2.Container:
        env = kw.pop("environment", {})
        request = container_pb2.CreateContainerRequest(
            name=name, environment=[aria_pb2.KeyValuePair(key=k, value=v) for k, v in env.items()], **kw
        )
        return self.call(CONTAINERS + "CreateContainer", request, container_pb2.Container)

    def container_call(self, verb: str, container_id: str) -> Any:
        request = getattr(container_pb2, f"{verb}ContainerRequest")(container_id=container_id)
        reply = container_pb2.Container if verb == "Get" else getattr(container_pb2, f"{verb}ContainerResponse")
        return self.call(CONTAINERS + f"{verb}Container", request, reply)

    def container_logs(self, container_id: str, timeout: float | None = 30, **kw: Any) -> Any:
        request = container_pb2.StreamContainerLogsRequest(container_id=container_id, **kw)
        return self.stream(CONTAINERS + "StreamContainerLogs", request, container_pb2.ContainerLog, timeout)

    def list_containers(self, **kw: Any) -> list[container_pb2.Container]:
        request = container_pb2.ListContainersRequest(**kw)
        return list(self.call(CONTAINERS + "ListContainers", request, container_pb2.ListContainersResponse).containers)

    def wait_container(self, container_id: str, statuses: set[int], timeout: float = 20) -> container_pb2.Container:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            c = self.container_call("Get", container_id)
            if c.status in statuses:
                return c
            time.sleep(0.05)
        raise AssertionError(f"container {container_id} still {aria_pb2.TaskStatus.Name(c.status)}")

    # notifications
    def events(self, timeout: float | None = 30, **kw: Any) -> Any:
        request = notification_pb2.StreamNotificationsRequest(**kw)
        return self.stream(NOTIFY + "StreamNotifications", request, notification_pb2.Notification, timeout)

    # sessions
    def session(self, **kw: Any) -> session_pb2.Session:
        return self.call(SESSIONS + "CreateSession", session_pb2.CreateSessionRequest(**kw), session_pb2.Session)

    # bundles and registry
    def upload(self, messages: list[bundle_pb2.UploadBundleRequest], timeout: float = 60) -> Any:
        fn = self.channel.stream_unary(
            BUNDLES + "UploadBundle",
            bundle_pb2.UploadBundleRequest.SerializeToString,
            bundle_pb2.UploadBundleResponse.FromString,
        )
        return fn(iter(messages), timeout=timeout)

    def upload_bytes(self, data: bytes, name: str = "calc.aria", checksum: bool = True, chunk: int = 64 * 1024) -> Any:
        meta = bundle_pb2.BundleMetadata(
            name=name, total_size_bytes=len(data), sha256_checksum=hashlib.sha256(data).hexdigest() if checksum else ""
        )
        messages = [bundle_pb2.UploadBundleRequest(metadata=meta)]
        messages += [bundle_pb2.UploadBundleRequest(chunk=data[i : i + chunk]) for i in range(0, len(data), chunk)]
        return self.upload(messages)

    def agents(self) -> list[registry_pb2.AgentSummary]:
        reply = self.call(REGISTRY + "ListAgents", registry_pb2.ListAgentsRequest(), registry_pb2.ListAgentsResponse)
        return list(reply.agents)

    def agent(self, agent_id: str) -> registry_pb2.AgentDefinition:
        request = registry_pb2.GetAgentDetailsRequest(agent_id=agent_id)
        return self.call(REGISTRY + "GetAgentDetails", request, registry_pb2.AgentDefinition)

    def tools(self) -> list[registry_pb2.ToolDefinition]:
        reply = self.call(REGISTRY + "ListTools", registry_pb2.ListToolsRequest(), registry_pb2.ListToolsResponse)
        return list(reply.tools)


OTHER_UID = 65534  # nobody


def as_other_user(daemon: Any, call: str) -> str:
    """Run `call` (an expression on `c`, an AriaClient) as another Unix user over the daemon's
    socket; the status code's name it ended with ("OK" if none). The socket is opened up to that
    user for the test; identity still comes from SO_PEERCRED, as for any caller."""
    for folder in (daemon.socket.parent, daemon.socket.parent.parent):
        folder.chmod(0o711)
    daemon.socket.chmod(0o666)
    return str(
        run_as(
            OTHER_UID,
            OTHER_UID,
            daemon.socket,
            f"""
try:
    {call}
    result = "OK"
except grpc.RpcError as e:
    result = e.code().name
""",
        )
    )


def run_as(uid: int, gid: int, socket: Path, code: str, groups: tuple[int, ...] = ()) -> Any:
    """Run `code` as user `uid` (a subprocess: imports first, as root, since the interpreter may
    live where others cannot read; then setgid/setuid, then the socket is dialled, so SO_PEERCRED
    names that user). The code has `c` (an AriaClient) and `grpc`, and sets `result` (JSON-able)."""
    script = f"""
import json, os, sys, grpc
sys.path.insert(0, {str(Path(__file__).parent)!r})
import bundles, zipfile, io
from google.protobuf import struct_pb2
from aria_client import AriaClient, bad_fields
from aria_trio.proto.aria.v1 import aria_pb2, auth_pb2, session_pb2, user_preference_pb2
# (grpc imports modules lazily, at the first channel and the first call: all of them now, while
# root, as the checkout and the interpreter may be where the other user cannot read)
import importlib, pkgutil
for m in pkgutil.walk_packages(grpc.__path__, "grpc."):
    try:
        importlib.import_module(m.name)
    except Exception:
        pass
grpc.insecure_channel("unix:/nonexistent").close()
os.setgroups({list(groups)!r}); os.setgid({gid}); os.setuid({uid})
c = AriaClient(grpc.insecure_channel("unix:" + {str(socket)!r}))
result = None
{code}
print(json.dumps(result))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise AssertionError(f"as uid {uid}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
