"""`aria serve`: the runtime daemon's life, from socket to shutdown, under one Trio nursery."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trio

from .identity import PeerIdentity
from .lifecycle import claim, serve_until_signal
from .preferences import Preferences
from .rpc import Health, Server, add_reflection
from .rpc.health import DESCRIPTOR as HEALTH
from .rpc.health import SERVING
from .services import legacy_pool, register
from .services.user_preference import UserPreferenceService
from .store import Store


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


async def _run(settings: dict[str, Any], store: Store) -> None:
    server = Server(
        max_message_length=settings["max_message_bytes"],
        max_concurrent_streams=settings["max_concurrent_streams"],
        max_connections=settings["max_connections"],
        authenticate=PeerIdentity(),
    )
    health = Health()
    server.add_service(HEALTH, health, authenticated=False)
    names = register(server, {"UserPreferenceService": UserPreferenceService(Preferences(store))})
    add_reflection(server, [legacy_pool()])
    for name in names:
        health.set(name, SERVING)
    await serve_until_signal(server, health, str(settings["socket"]), settings["grace"], database=str(store.path))
