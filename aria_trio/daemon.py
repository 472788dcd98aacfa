"""`aria serve`: the runtime daemon's life, from socket to shutdown, under one Trio nursery."""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from .api_keys import ApiKeys
from .audit import Audit
from .containers import Containers
from .identity import PeerIdentity
from .leftovers import remove_leftovers
from .lifecycle import claim, serve_until_signal
from .llm import ChatModel
from .metrics import Live, Metrics, MetricsServer
from .notifications import Notifications
from .pagination import PageTokens, load_key
from .preferences import Preferences
from .quilt_link import QuiltLink, quilt_command
from .quotas import Quotas
from .registry import Registry
from .rpc import Health, Server, add_reflection
from .rpc.health import DESCRIPTOR as HEALTH
from .rpc.health import SERVING
from .services import legacy_pool, register
from .services.auth import AuthService
from .services.bundle import BundleService
from .services.container import ContainerService
from .services.notification import NotificationService
from .services.registry import RegistryService
from .services.session import SessionService
from .services.task import TaskService
from .services.user_preference import UserPreferenceService
from .sessions import Sessions
from .store import Store
from .tap import Tap
from .tasks import Tasks, TaskTimeouts
from .tool_calls import ToolCalls
from .turns import Turns
from .uploads import Uploads

# Served only while Quilt is reachable (health says NOT_SERVING for them while it is down).
NEED_QUILT = ("TaskService", "ContainerService", "BundleService")
PAGE_TOKEN_KEY = "page-token.key"


async def serve(settings: dict[str, Any]) -> None:
    data_dir: Path = settings["data_dir"]
    lock_fd = await trio.to_thread.run_sync(claim, settings["socket"], data_dir)
    try:
        store = await Store.open(data_dir / "runtime.db")
        try:
            os.chmod(store.path, 0o600)
            await _run(settings, store)
        finally:
            with trio.CancelScope(shield=True):
                await store.close()  # last: nothing else uses it by now
    finally:
        os.close(lock_fd)


async def _stopping(store: Store, grace: float) -> None:
    store.stopping = True  # background writes waiting for disk space give up (they would hold us)
    await trio.lowlevel.checkpoint()


def quilt_link(settings: dict[str, Any], health: Health) -> QuiltLink:
    """The link to a Quilt of our own (a child, under the data dir) or to the one configured."""
    needs = [f"aria.v1.{name}" for name in NEED_QUILT]
    if settings["quilt_socket"]:
        return QuiltLink(Path(settings["quilt_socket"]).expanduser(), spawn=None, health=health, services=needs)
    data_dir: Path = settings["data_dir"]
    socket = data_dir / "quilt.sock"
    command = quilt_command(
        socket,
        data_dir / "quilt",
        settings["quilt_sandbox"],
        settings["log_level"],
        settings["log_format"],
        images_dir=settings["images_dir"],
        hide=(data_dir, Path(settings["socket"])),
        orphan_grace=settings["quilt_orphan_grace"],
    )
    return QuiltLink(socket, spawn=command, health=health, services=needs, data_dir=data_dir / "quilt")


async def _run(settings: dict[str, Any], store: Store) -> None:
    model = ChatModel()  # one HTTP client for every model call (connections reused)
    try:
        await _serve(settings, store, model)
    finally:
        with trio.CancelScope(shield=True):
            await model.aclose()


async def _serve(settings: dict[str, Any], store: Store, model: ChatModel) -> None:
    keys = ApiKeys(store)
    audit = Audit(store)
    metrics = Metrics()
    quotas = Quotas(settings)
    server = Server(
        max_message_length=settings["max_message_bytes"],
        max_concurrent_streams=settings["max_concurrent_streams"],
        max_connections=settings["max_connections"],
        authenticate=PeerIdentity(keys.verify),
        metrics=metrics.rpc,
        admission=quotas,
    )
    health = Health()
    server.add_service(HEALTH, health, authenticated=False)
    quilt = quilt_link(settings, health)
    notifications = Notifications(store)
    tokens = PageTokens(await trio.to_thread.run_sync(load_key, settings["data_dir"] / PAGE_TOKEN_KEY))
    registry = Registry(store)
    sessions = Sessions(store, registry, tokens)
    containers = Containers(store, quilt, notifications, quotas)
    tasks = Tasks(
        store,
        quilt,
        notifications,
        tokens,
        quotas,
        TaskTimeouts(settings["task_timeout"], settings["max_task_timeout"]),
    )
    preferences = Preferences(store)
    turns = Turns(
        store,
        sessions,
        registry,
        preferences,
        ToolCalls(store, quilt, tasks, settings["tool_timeout"]),
        model,
        quotas=quotas,
    )
    names = register(
        server,
        {
            "TaskService": TaskService(tasks, containers, sessions, audit),
            "SessionService": SessionService(sessions, containers, turns, audit),
            "ContainerService": ContainerService(containers, sessions, audit),
            "NotificationService": NotificationService(notifications),
            "BundleService": BundleService(Uploads(quilt, registry, notifications), audit),
            "RegistryService": RegistryService(registry),
            "UserPreferenceService": UserPreferenceService(preferences, audit),
            "AuthService": AuthService(keys, audit, tokens),
        },
    )
    add_reflection(server, [legacy_pool()])
    for name in names:
        if name.removeprefix("aria.v1.") not in NEED_QUILT:
            health.set(name, SERVING)
    background: list[Callable[..., Awaitable[None]]] = [
        quilt.run,
        functools.partial(remove_leftovers, quilt, store),  # (once, before the first call is served)
        containers.run,
        tasks.run,
    ]
    if settings["tap_port"]:
        background.append(Tap(settings["tap_port"], notifications, tasks, keys.verify).run)
    if settings["metrics_port"]:
        live = Live.of_runtime(store, notifications, quilt)
        background.append(MetricsServer(settings["metrics_port"], metrics, live).run)
    await serve_until_signal(
        server,
        health,
        str(settings["socket"]),
        settings["grace"],
        background=background,
        on_stop=functools.partial(_stopping, store),
        socket_mode=settings["socket_mode"],
        socket_group=settings["socket_group"],
        database=str(store.path),
        quilt=str(quilt.socket),
    )
