"""`aria serve`: the runtime daemon's life, from socket to shutdown, under one Trio nursery."""

from __future__ import annotations

import functools
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
import trio

from aria_trio.rpc import Health, Server, add_reflection
from aria_trio.rpc.health import DESCRIPTOR as HEALTH
from aria_trio.rpc.health import SERVING
from aria_trio.runtime.access.api_keys import ApiKeys
from aria_trio.runtime.access.audit import Audit
from aria_trio.runtime.access.identity import PeerIdentity
from aria_trio.runtime.access.pagination import PageTokens, load_key
from aria_trio.runtime.access.preferences import Preferences
from aria_trio.runtime.access.quotas import Quotas
from aria_trio.runtime.agents.llm import ChatModel
from aria_trio.runtime.agents.registry import Registry
from aria_trio.runtime.agents.sessions import Sessions
from aria_trio.runtime.agents.tool_calls import ToolCalls
from aria_trio.runtime.agents.turns import Turns
from aria_trio.runtime.operations.metrics import Live, Metrics, MetricsServer
from aria_trio.runtime.operations.tap import Tap
from aria_trio.runtime.quilt_client import QuiltLink, quilt_command
from aria_trio.runtime.services import legacy_pool, register
from aria_trio.runtime.services.auth import AuthService
from aria_trio.runtime.services.bundle import BundleService
from aria_trio.runtime.services.container import ContainerService
from aria_trio.runtime.services.notification import NotificationService
from aria_trio.runtime.services.registry import RegistryService
from aria_trio.runtime.services.session import SessionService
from aria_trio.runtime.services.task import TaskService
from aria_trio.runtime.services.user_preference import UserPreferenceService
from aria_trio.runtime.store import containers as containers_table
from aria_trio.runtime.store import notifications as notification_rows
from aria_trio.runtime.store import open_store
from aria_trio.runtime.store import tasks as tasks_table
from aria_trio.runtime.work.containers import Containers
from aria_trio.runtime.work.leftovers import remove_leftovers
from aria_trio.runtime.work.notifications import Notifications
from aria_trio.runtime.work.tasks import Tasks, TaskTimeouts
from aria_trio.runtime.work.uploads import Uploads
from aria_trio.shared.config import RuntimeSettings
from aria_trio.shared.lifecycle import claim, serve_until_signal
from aria_trio.shared.sqlite import Store

log = structlog.get_logger("aria.daemon")

# Served only while Quilt is reachable (health says NOT_SERVING for them while it is down).
NEED_QUILT = ("TaskService", "ContainerService", "BundleService")
PAGE_TOKEN_KEY = "page-token.key"


async def serve(settings: RuntimeSettings) -> None:
    data_dir = settings.data_dir
    lock_fd = await trio.to_thread.run_sync(claim, settings.socket, data_dir)
    try:
        store = await open_store(data_dir / "runtime.db")
        try:
            os.chmod(store.path, 0o600)
            gap = await store.run(notification_rows.begin_run, await trio.to_thread.run_sync(_boot_id))
            if gap:
                log.warning(
                    "the last run ended with the machine going down: notification sequences skip ahead",
                    skipped=gap,
                )
            await _run(settings, store)
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await store.run(notification_rows.end_run)
                except sqlite3.Error as exc:  # (a full disk: the next start skips ahead, harmlessly)
                    log.warning("could not record the end of this run", error=str(exc))
                await store.close()  # last: nothing else uses it by now
    finally:
        os.close(lock_fd)


def _boot_id() -> str:
    """The kernel's id of this boot ("" if it cannot be read)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


async def _stopping(store: Store, grace: float) -> None:
    store.stopping = True  # background writes waiting for disk space give up (they would hold us)
    await trio.lowlevel.checkpoint()


def quilt_link(settings: RuntimeSettings, health: Health) -> QuiltLink:
    """The link to a Quilt of our own (a child, under the data dir) or to the one configured."""
    needs = [f"aria.v1.{name}" for name in NEED_QUILT]
    if settings.quilt_socket:
        return QuiltLink(Path(settings.quilt_socket).expanduser(), spawn=None, health=health, services=needs)
    data_dir = settings.data_dir
    socket = data_dir / "quilt.sock"
    command = quilt_command(
        socket,
        data_dir / "quilt",
        settings.quilt_sandbox,
        settings.log_level,
        settings.log_format,
        images_dir=settings.images_dir,
        hide=(data_dir, Path(settings.socket)),
        orphan_grace=settings.quilt_orphan_grace,
    )
    return QuiltLink(socket, spawn=command, health=health, services=needs, data_dir=data_dir / "quilt")


async def _run(settings: RuntimeSettings, store: Store) -> None:
    model = ChatModel()  # one HTTP client for every model call (connections reused)
    try:
        await _serve(settings, store, model)
    finally:
        with trio.CancelScope(shield=True):
            await model.aclose()


async def _serve(settings: RuntimeSettings, store: Store, model: ChatModel) -> None:
    keys = ApiKeys(store)
    audit = Audit(store)
    metrics = Metrics()
    quotas = Quotas(settings)
    server = Server(
        max_message_length=settings.max_message_bytes,
        max_concurrent_streams=settings.max_concurrent_streams,
        max_connections=settings.max_connections,
        authenticate=PeerIdentity(keys.verify),
        metrics=metrics.rpc,
        admission=quotas,
    )
    health = Health()
    server.add_service(HEALTH, health, authenticated=False)
    quilt = quilt_link(settings, health)
    notifications = Notifications(store)
    tokens = PageTokens(await trio.to_thread.run_sync(load_key, settings.data_dir / PAGE_TOKEN_KEY))
    registry = Registry(store)
    sessions = Sessions(store, registry, tokens)
    containers = Containers(store, quilt, notifications, quotas)
    tasks = Tasks(
        store,
        quilt,
        notifications,
        tokens,
        quotas,
        TaskTimeouts(settings.task_timeout, settings.max_task_timeout),
    )
    preferences = Preferences(store)
    turns = Turns(
        store,
        sessions,
        registry,
        preferences,
        ToolCalls(store, quilt, tasks, settings.tool_timeout),
        model,
        quotas=quotas,
    )
    uploads = Uploads(quilt, registry, notifications)
    names = register(
        server,
        {
            "TaskService": TaskService(tasks, containers, sessions, audit),
            "SessionService": SessionService(sessions, containers, turns, audit),
            "ContainerService": ContainerService(containers, sessions, audit),
            "NotificationService": NotificationService(notifications),
            "BundleService": BundleService(uploads, audit),
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
    if settings.tap_port:
        background.append(Tap(settings.tap_port, notifications, tasks, keys.verify).run)
    if settings.metrics_port:
        live = live_metrics(store, notifications, quilt, uploads)
        background.append(MetricsServer(settings.metrics_port, metrics, live).run)
    await serve_until_signal(
        server,
        health,
        str(settings.socket),
        settings.grace,
        background=background,
        on_stop=functools.partial(_stopping, store),
        socket_mode=settings.socket_mode,
        socket_group=settings.socket_group,
        database=str(store.path),
        quilt=str(quilt.socket),
    )


def live_metrics(store: Store, notifications: Notifications, quilt: QuiltLink, uploads: Uploads) -> Live:
    """Where the runtime's live metrics come from: SQL counts through the store's worker thread,
    the rest from memory."""
    return Live(
        tasks_by_status=functools.partial(store.run, tasks_table.count_by_status),
        containers_running=functools.partial(store.run, containers_table.count_running),
        notifications_published=lambda: notifications.published,
        notification_subscribers=notifications.subscriber_count,
        quilt_up=quilt.connected,
        quilt_restarts=lambda: quilt.restarts,
        bundle_bytes_received=lambda: uploads.bytes_received,
    )
