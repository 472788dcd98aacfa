"""The aria.v1 services, registered on a server under `aria.v1.` and the legacy `aria.` name.

A service not built yet is served by its purerpc-generated base class, whose methods the server
recognises as not implemented: clients get UNIMPLEMENTED with a plain message, not a hang.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool

from aria_trio.proto.aria.v1 import (
    aria_pb2,
    auth_grpc,
    auth_pb2,
    bundle_grpc,
    bundle_pb2,
    container_grpc,
    container_pb2,
    notification_grpc,
    notification_pb2,
    registry_grpc,
    registry_pb2,
    session_grpc,
    session_pb2,
    task_grpc,
    task_pb2,
    user_preference_grpc,
    user_preference_pb2,
)
from aria_trio.rpc import Server, renamed_pool

PACKAGE = "aria.v1"
LEGACY_PACKAGE = "aria"

# (file descriptor, service name, generated base class)
SERVICES = [
    (task_pb2.DESCRIPTOR, "TaskService", task_grpc.TaskServiceServicer),
    (session_pb2.DESCRIPTOR, "SessionService", session_grpc.SessionServiceServicer),
    (container_pb2.DESCRIPTOR, "ContainerService", container_grpc.ContainerServiceServicer),
    (notification_pb2.DESCRIPTOR, "NotificationService", notification_grpc.NotificationServiceServicer),
    (bundle_pb2.DESCRIPTOR, "BundleService", bundle_grpc.BundleServiceServicer),
    (registry_pb2.DESCRIPTOR, "RegistryService", registry_grpc.RegistryServiceServicer),
    (user_preference_pb2.DESCRIPTOR, "UserPreferenceService", user_preference_grpc.UserPreferenceServiceServicer),
    (auth_pb2.DESCRIPTOR, "AuthService", auth_grpc.AuthServiceServicer),  # ext
]


def legacy_pool() -> descriptor_pool.DescriptorPool:
    """The aria.v1 files renamed to package `aria`, so reflection can describe the legacy names."""
    files = [aria_pb2.DESCRIPTOR] + [fd for fd, _, _ in SERVICES]
    return renamed_pool(files, PACKAGE, LEGACY_PACKAGE, lambda name: name.replace("aria/v1/", "aria/"))


def register(server: Server, implementations: dict[str, object]) -> list[str]:
    """Register every aria.v1 service; `implementations` maps service names to objects.
    Returns the full names of the services, as health reports them."""
    names = []
    for fd, name, base in SERVICES:
        impl = implementations.get(name) or base()
        server.add_service(fd.services_by_name[name], impl, aliases=[f"{LEGACY_PACKAGE}.{name}"])
        names.append(f"{PACKAGE}.{name}")
    unknown = set(implementations) - {name for _, name, _ in SERVICES}
    if unknown:
        raise ValueError(f"no such services: {', '.join(sorted(unknown))}")
    return names
