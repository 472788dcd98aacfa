"""Containers a user owns: kept in Quilt, owned here, watched for every status change.

Status is Quilt's state in the API's words: created is PENDING, running RUNNING, exited with 0
COMPLETED, exited otherwise or never started FAILED, stopped by a caller CANCELLED. Each change
is stored and announced once (a ContainerStatusEvent); a watcher per running container waits for
its end in Quilt, so a container that ends by itself is announced too.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Callable

import sqlite_utils
import structlog
import trio

from aria_trio.proto.aria.v1 import aria_pb2
from aria_trio.proto.aria.v1 import notification_pb2 as npb
from aria_trio.proto.quilt.v1 import quilt_pb2 as q
from aria_trio.runtime.access.quotas import Quotas, exceeded
from aria_trio.runtime.kinds import TaskStatus
from aria_trio.runtime.quilt_client import QuiltLink
from aria_trio.runtime.store import containers as table
from aria_trio.runtime.store.containers import ContainerChange
from aria_trio.runtime.store.containers import ContainerRow as ContainerRow  # (the services' too: re-exported)
from aria_trio.runtime.work.notifications import Notifications
from aria_trio.shared import errors
from aria_trio.shared.sqlite import Store, background, now_us

log = structlog.get_logger("aria.containers")

PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, _ = TaskStatus  # (a container never times out)
MAX_NAME = 128
START_TIMEOUT = 10.0  # seconds for Quilt to start a container (it takes tens of milliseconds)
STOP_TIMEOUT = 60.0  # seconds for Quilt to stop one (its grace, 10 s by default, then kills)


def status_of(c: q.Container) -> TaskStatus:
    if c.state == q.CONTAINER_CREATED:
        return PENDING
    if c.state == q.CONTAINER_RUNNING:
        return RUNNING
    if c.state == q.CONTAINER_STOPPED:
        return CANCELLED
    if c.state == q.CONTAINER_EXITED and c.exit_code == 0 and not c.HasField("signal"):
        return COMPLETED
    return FAILED


class Containers:
    def __init__(
        self, store: Store, quilt: QuiltLink, notifications: Notifications, quotas: Quotas | None = None
    ) -> None:
        self.store = store
        self.quilt = quilt
        self.notifications = notifications
        self.quotas = quotas
        self._locks: dict[str, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch running containers until cancelled, starting with those recorded as pending or
        running (a previous runtime may have been stopped between Quilt's answer and its record)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for row in await self.store.run(table.running):
                nursery.start_soon(self._watch, row)
            task_status.started()
            await trio.sleep_forever()

    async def owned(self, user: str, container_id: str) -> ContainerRow:
        row = await self.store.run(table.get, user, container_id)
        if row is None:
            raise errors.NotFound(f"no container {container_id!r}", reason="CONTAINER_NOT_FOUND")
        return row

    async def running_quilt_id(self, user: str, container_id: str) -> str:
        """Quilt's id of the caller's container, which must be running (for exec)."""
        row = await self.get(user, container_id)
        if row["status"] != RUNNING:
            raise errors.FailedPrecondition(f"container {container_id} is not running", reason="CONTAINER_NOT_RUNNING")
        return str(row["quilt_container_id"])

    async def create(
        self,
        user: str,
        *,
        name: str,
        image_path: str,
        environment: dict[str, str],
        persistent: bool,
        session_id: str | None,
        command: list[str],
        limits: q.Limits | None = None,
    ) -> ContainerRow:
        if len(name) > MAX_NAME:
            raise errors.InvalidArgument(f"name is longer than {MAX_NAME} characters", fields={"name": "too long"})
        spec = q.ContainerSpec(
            name=name,
            image=image_path or "host",
            command=command,
            env=environment,
            limits=limits,
            labels={"aria.user": user, "aria.persistent": str(persistent).lower(), "aria.session": session_id or ""},
        )
        # Shielded, the create and its record together: a caller who gives up in between would
        # otherwise leave a container in Quilt that nobody knows of (until the next start).
        with trio.CancelScope(shield=True):
            created = await self.quilt.create_container(q.CreateContainerRequest(spec=spec))
            row: ContainerRow = {
                "id": created.id,
                "user_id": user,
                "session_id": session_id,
                "name": name,
                "image_path": image_path or "host",
                "environment_json": _json(environment),
                "command_json": _json(command),
                "persistent": int(persistent),
                "status": PENDING,
                "exit_code": None,
                "quilt_container_id": created.id,
                "created_at": now_us(),
                "updated_at": now_us(),
                "message": "",
            }
            await self._announce(row, "created", functools.partial(table.insert, row=row))
        return row

    async def start(self, user: str, container_id: str) -> ContainerRow:
        row = await self.owned(user, container_id)
        async with self._lock(container_id), self._lock(f"user:{user}"):
            if self.quotas is not None and row["status"] != RUNNING:
                limit = self.quotas.running_containers
                if await self.store.run(table.running_count, user) >= limit:
                    raise exceeded("max_running_containers", limit, "containers running")
            # Once Quilt is asked, the start is recorded and watched whatever becomes of the
            # caller (a client that gave up in between left a running container nobody watched).
            # A start is local work: START_TIMEOUT bounds the wait this shield can cause.
            with trio.CancelScope(shield=True):
                started = await self.quilt.start_container(q.ContainerRef(id=row["quilt_container_id"]), START_TIMEOUT)
                await self._record(row, started, "started")
                if row["status"] == RUNNING:
                    assert self._nursery is not None
                    self._nursery.start_soon(self._watch, row)
        return row

    async def stop(self, user: str, container_id: str) -> ContainerRow:
        row = await self.owned(user, container_id)
        async with self._lock(container_id):
            # Once Quilt is asked, the stop is seen through and recorded whatever becomes of the
            # caller (a client that left made Quilt's stop stop half-way); STOP_TIMEOUT bounds it.
            with trio.CancelScope(shield=True):
                stop = q.StopContainerRequest(id=row["quilt_container_id"])
                stopped = await self.quilt.stop_container(stop, timeout=STOP_TIMEOUT)
                await self._record(row, stopped)
        return row

    async def remove(self, user: str, container_id: str, *, force: bool = False) -> None:
        row = await self.owned(user, container_id)
        async with self._lock(container_id):
            try:
                remove = q.RemoveContainerRequest(id=row["quilt_container_id"], force=force)
                await self.quilt.remove_container(remove, timeout=None)
            except errors.NotFound:
                pass  # quilt lost it already (its data was reset): forget it here too
            if row["status"] in (PENDING, RUNNING):  # it ends here: say so (nothing else will), together
                row["status"] = CANCELLED
                await self._announce(row, "removed", functools.partial(table.delete, container_id=container_id))
            else:
                await self.store.run(table.delete, container_id)
        log.info("container removed", container=container_id, user=user)

    async def get(self, user: str, container_id: str) -> ContainerRow:
        """The container, its status refreshed from Quilt."""
        row = await self.owned(user, container_id)
        try:
            current = await self.quilt.get_container(q.ContainerRef(id=row["quilt_container_id"]))
        except errors.Unavailable:
            return row  # what we last knew
        except errors.NotFound:
            current = q.Container(state=q.CONTAINER_FAILED, message="lost: quilt no longer knows it")
        async with self._lock(container_id):
            await self._record(row, current)
        return row

    async def list(self, user: str, session_id: str | None) -> list[ContainerRow]:
        return await self.store.run(table.of_user, user, session_id)

    async def logs(
        self, user: str, container_id: str, follow: bool, since_ns: int | None
    ) -> AsyncIterator[q.OutputLine]:
        row = await self.owned(user, container_id)
        request = q.ContainerLogsRequest(id=row["quilt_container_id"], follow=follow)
        if since_ns is not None:
            request.since.FromNanoseconds(since_ns)
        try:
            async with self.quilt.container_logs(request) as lines:
                async for line in lines:
                    if line.stream != q.SYSTEM:
                        yield line
        except errors.AriaError as exc:
            raise errors.Unavailable(f"lost the container service while reading logs: {exc.message}") from None

    async def end_session(self, user: str, session_id: str) -> None:
        """A session ended: its containers that are not persistent go."""
        for row in await self.store.run(table.of_user, user, session_id):
            if not row["persistent"]:
                await self.remove(user, row["id"], force=True)

    # -- status -----------------------------------------------------------------------------------

    def _lock(self, container_id: str) -> trio.Lock:
        return self._locks.setdefault(container_id, trio.Lock())

    async def _record(self, row: ContainerRow, current: q.Container, message: str = "") -> None:
        """Store Quilt's view if the status changed, and announce it (once: callers hold the
        container's lock, and the stored status, not `row`'s copy, is what is compared)."""
        status = status_of(current)
        exit_code = current.exit_code if current.HasField("exit_code") else None
        stored = await self.store.run(table.status, row["id"])
        if stored is None or status == stored:
            row["status"] = status
            return
        fields: ContainerChange = {
            "status": status,
            "exit_code": exit_code,
            "message": current.message or message,
            "updated_at": now_us(),
        }
        row["status"], row["exit_code"] = fields["status"], fields["exit_code"]
        row["message"], row["updated_at"] = fields["message"], fields["updated_at"]
        # the change and its event together (a runtime killed between the two left either an
        # unannounced change, or, announced again after a restart, a duplicate)
        await self._announce(
            row, row["message"], functools.partial(table.update, container_id=row["id"], fields=fields)
        )

    async def _announce(
        self, row: ContainerRow, message: str, change: Callable[[sqlite_utils.Database], object]
    ) -> None:
        event = npb.ContainerStatusEvent(
            container_id=row["id"], new_status=aria_pb2.TaskStatus.Name(row["status"]), status_message=message
        )
        if row["exit_code"] is not None:
            event.exit_code = row["exit_code"]
        name = aria_pb2.TaskStatus.Name(row["status"]).lower()
        await self.notifications.publish(
            row["user_id"],
            "container_status",
            event,
            title=f"Container {row['name'] or row['id']} {name}",
            message=message,
            metadata={"container_id": row["id"], "status": name},
            change=change,
        )

    async def _watch(self, row: ContainerRow) -> None:
        """Wait in Quilt for the end of a running container; record how it ended. An unexpected
        error is logged and the container recorded FAILED: nothing here reaches the nursery."""
        background()  # a full disk makes its writes wait for space, not fail (store/db.py)
        try:
            await self._wait_for_end(row)
        except Exception as exc:
            log.exception("container watcher failed", container=row["id"], user=row["user_id"])
            why = exc.message if isinstance(exc, errors.AriaError) else "the runtime lost track of it (see its log)"
            try:
                async with self._lock(row["id"]):
                    await self._record(row, q.Container(state=q.CONTAINER_FAILED, message=why))
            except Exception:
                log.exception("could not record a container's failure", container=row["id"])

    async def _wait_for_end(self, row: ContainerRow) -> None:
        quilt_id = row["quilt_container_id"]
        while row["status"] == PENDING:  # (at start) a start the last runtime asked for may have been made
            try:
                await self.quilt.up.wait()
                current = await self.quilt.get_container(q.ContainerRef(id=quilt_id))
            except errors.Unavailable:
                await trio.sleep(0.5)
                continue
            except errors.NotFound:
                current = q.Container(state=q.CONTAINER_FAILED, message="lost: quilt no longer knows it")
            async with self._lock(row["id"]):
                await self._record(row, current)
            break
        while row["status"] == RUNNING:
            try:
                await self.quilt.up.wait()
                ended = await self.quilt.wait_container(q.ContainerRef(id=quilt_id))
            except errors.Unavailable:
                await trio.sleep(0.5)  # quilt is restarting: ask again once it is back
                continue
            except errors.NotFound:
                ended = q.Container(state=q.CONTAINER_FAILED, message="lost: quilt no longer knows it")
            async with self._lock(row["id"]):
                await self._record(row, ended)


def _json(value: dict[str, str] | list[str]) -> str:
    return json.dumps(value, sort_keys=True)
