"""`aria quilt serve`: the container daemon's life, under one Trio nursery."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import structlog
import trio

from aria_trio.proto.quilt.v1 import quilt_pb2
from aria_trio.quilt import limits, seccomp, stage
from aria_trio.quilt.attach import Attachments
from aria_trio.quilt.bundles import BundleStore
from aria_trio.quilt.disks import Disks
from aria_trio.quilt.engine import Engine, Settings
from aria_trio.quilt.images import Images
from aria_trio.quilt.sandbox import Sandbox
from aria_trio.quilt.service import BundlesService, ContainersService, SystemService, TasksService
from aria_trio.quilt.stage import Stage
from aria_trio.quilt.store import MIGRATIONS
from aria_trio.quilt.tools import RUNNERS, ToolRunner
from aria_trio.rpc import Health, Server, add_reflection
from aria_trio.rpc.health import DESCRIPTOR as HEALTH
from aria_trio.rpc.health import SERVING
from aria_trio.shared.config import QuiltSettings
from aria_trio.shared.lifecycle import StartupError, claim, serve_until_signal
from aria_trio.shared.sqlite import Store

log = structlog.get_logger("quilt.daemon")

PARENT_ENV = "QUILT_PARENT_PID"  # set by a runtime that starts this Quilt: then it is the runtimes' (attach.py)
# Calls one connection may carry at once: the runtime, its only client, keeps a long call per
# running task and container; past this it opens another connection (runtime/quilt_client/link.py, MAX_CONNECTIONS).
QUILT_STREAMS = 1024
SECCOMP_FILE = "seccomp.bpf"  # the sandboxes' filter, written at each start (quilt/seccomp.py)


async def serve(settings: QuiltSettings) -> None:
    data_dir = settings.data_dir
    as_root = os.geteuid() == 0 and settings.sandbox == "bubblewrap"
    if as_root:  # first, while no thread exists (quilt/stage.py)
        try:
            stage.enter_private_mounts()
        except OSError as exc:
            raise StartupError(f"quilt runs as root but cannot have a mount namespace of its own: {exc}") from None
    mode = await trio.to_thread.run_sync(limits.detect)
    try:
        sandbox = Sandbox.detect(settings.sandbox, mode)
    except FileNotFoundError as exc:
        raise StartupError(str(exc)) from None
    if sandbox.kind == "none":
        log.warning(
            "SANDBOX IS OFF: --sandbox=none runs every command as this user, unisolated, with full access "
            "to this machine; use it only for development"
        )
    log.info("sandbox", sandbox=sandbox.kind, bwrap=sandbox.bwrap, limits=mode.name)
    if mode.name == "rlimits":
        log.warning("cgroups are not writable here: limits fall back to rlimits (per process, weaker)")
    if mode.name != "rlimits" and not mode.cpu:
        log.warning("the cpu cgroup controller is not writable here: no CPU limits")
    lock_fd = await trio.to_thread.run_sync(claim, settings.socket, data_dir)
    try:
        if sandbox.kind == "bubblewrap":
            sandbox = await _harden(settings, sandbox, as_root)
        store = await Store.open(data_dir / "quilt.db", MIGRATIONS)
        try:
            os.chmod(store.path, 0o600)
            await _run(settings, store, sandbox, Disks.detect(as_root))
        finally:
            with trio.CancelScope(shield=True):
                await store.close()
    finally:
        os.close(lock_fd)


async def _harden(settings: QuiltSettings, sandbox: Sandbox, as_root: bool) -> Sandbox:
    """The seccomp filter, the paths no sandbox may see, and as root the sandbox user and stage."""
    data_dir = settings.data_dir
    try:
        await trio.to_thread.run_sync(seccomp.write, data_dir / SECCOMP_FILE)
    except RuntimeError as exc:  # a machine the filter does not know: no sandbox without it
        raise StartupError(f"cannot build the sandboxes' seccomp filter: {exc}") from None
    hidden = (data_dir, Path(settings.socket), *settings.hide)
    sandbox = dataclasses.replace(sandbox, seccomp=data_dir / SECCOMP_FILE, hidden=hidden)
    if not as_root:
        return sandbox
    folders = {
        "containers": data_dir / "containers",
        "bundles": data_dir / "bundles" / "unpacked",
        "images": data_dir / "images",
        "runners": RUNNERS,
    }
    images_dir = settings.images_dir
    if images_dir is not None:
        folders["operator-images"] = images_dir
        if not await trio.to_thread.run_sync(lambda: images_dir.is_dir() and bool(images_dir.stat().st_mode & 1)):
            log.warning("the sandbox user cannot enter the images folder: make it 0755", folder=str(images_dir))
    for name in ("containers", "bundles", "images"):  # ours: the sandbox user may pass (not list)
        await trio.to_thread.run_sync(_passable, folders[name])
    built = await trio.to_thread.run_sync(Stage.build, folders, data_dir)
    uid = settings.sandbox_uid
    log.info("sandboxes run as an unprivileged user", uid=uid, gid=uid)
    return dataclasses.replace(sandbox, user=(uid, uid), stage=built)


def _passable(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o711)


async def _run(settings: QuiltSettings, store: Store, sandbox: Sandbox, disks: Disks) -> None:
    data_dir = settings.data_dir
    if sandbox.kind == "bubblewrap" and not disks.enabled:
        log.warning("container disks have no size limit here", why=disks.why_not)
    engine = Engine(
        store,
        sandbox,
        Images(
            settings.images_dir,
            data_dir / "images",
            max_image_bytes=settings.max_image_bytes,
            max_cache_bytes=settings.max_image_cache_bytes,
        ),
        Settings(
            data_dir=data_dir,
            max_output_bytes=settings.max_output_bytes,
            default_memory_bytes=settings.memory_bytes,
            default_pids=settings.pids,
            default_cpus=settings.cpus,
            default_disk_bytes=settings.disk_bytes,
            max_memory_bytes=settings.max_memory_bytes,
            max_pids=settings.max_pids,
            max_cpus=settings.max_cpus,
            max_disk_bytes=settings.max_disk_bytes,
            exec_timeout=settings.exec_timeout,
            stop_grace=settings.stop_grace,
        ),
        disks,
    )
    bundles = BundleStore(data_dir / "bundles", store, settings.max_bundle_bytes)
    for removed in await trio.to_thread.run_sync(bundles.clean):
        log.info("removed what a crash left of a bundle", path=str(removed))
    runner = ToolRunner(
        sandbox,
        bundles,
        settings.tool_timeout,
        settings.memory_bytes,
        settings.pids,
        settings.cpus,
        cgroup_prefix=f"tool-{stage.stage_id(data_dir)}-",
    )
    for name in await trio.to_thread.run_sync(runner.clean):
        log.info("removed the cgroup of a tool run a crash left, with its processes", cgroup=name)
    server = Server(error_domain="quilt.v1", max_concurrent_streams=QUILT_STREAMS)
    managed = bool(os.environ.get(PARENT_ENV))
    attachments = Attachments(managed, settings.orphan_grace, data_dir / "quilt.log" if managed else None)
    health = Health()
    server.add_service(HEALTH, health, authenticated=False)
    services = quilt_pb2.DESCRIPTOR.services_by_name
    for name, impl in (
        ("Containers", ContainersService(engine)),
        ("Tasks", TasksService(engine)),
        ("Bundles", BundlesService(bundles, runner)),
        ("System", SystemService(engine, bundles, attachments)),
    ):
        server.add_service(services[name], impl, authenticated=False)
        health.set(f"quilt.v1.{name}", SERVING)
    add_reflection(server)
    await serve_until_signal(
        server,
        health,
        str(settings.socket),
        settings.grace,
        background=[engine.run, attachments.run],
        on_stop=engine.shutdown,
        sandbox=sandbox.kind,
        limits=sandbox.limits.name,
    )
