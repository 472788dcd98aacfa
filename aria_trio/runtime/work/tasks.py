"""Tasks: a command run in a container (a fresh throw-away one, or a running one of the caller's),
followed to its end by a watcher that keeps everything in the runtime's store.

The watcher records each status transition (with a history line and exactly one TaskStatusEvent),
stores every output line as Quilt delivers it (a `::progress <percent> <text>` line becomes a
progress update), and enforces the timeout. Followers replay the stored output, then get new lines
as the watcher stores them. After a restart of either daemon, unfinished tasks are looked up in
Quilt again: resumed from the output already stored, or finished with what Quilt knows. A task
stored but not yet in Quilt (a launch cut short) is found there by its label, or launched then:
a stored task always runs, once.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal, cast

import sqlite_utils
import structlog
import trio

from aria_trio.proto.aria.v1 import aria_pb2
from aria_trio.proto.aria.v1 import notification_pb2 as npb
from aria_trio.proto.quilt.v1 import quilt_pb2 as q
from aria_trio.runtime.access.pagination import PageTokens, page_size
from aria_trio.runtime.access.quotas import Quotas, exceeded
from aria_trio.runtime.kinds import UNFINISHED, OutputStream, TaskStatus
from aria_trio.runtime.quilt_client import QuiltLink, Replies
from aria_trio.runtime.store import tasks as table
from aria_trio.runtime.store.tasks import OutputRow, TaskChange
from aria_trio.runtime.store.tasks import TaskRow as TaskRow  # (the services' too: re-exported)
from aria_trio.runtime.work.notifications import Notifications
from aria_trio.shared import errors, json_input
from aria_trio.shared.sqlite import Store, background, now_us

log = structlog.get_logger("aria.tasks")

PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT = TaskStatus
PROGRESS = re.compile(r"::progress\s+(-?\d+(?:\.\d+)?)\s*(.*)")
MAX_ARGV = 4096  # arguments
MAX_COMMAND_BYTES = 256 * 1024
MAX_ARG = 128 * 1024 - 1  # bytes of one argument or environment entry (what the kernel takes at exec)
MAX_ENV = 1024
OUTPUT_BATCH = 256
CANCEL_GRACE = 1.0  # seconds a cancelled task's processes get after SIGTERM (then SIGKILL)
CANCEL_WAIT = 5.0  # seconds CancelTask waits for the task's end, to answer what became of it
REPLAY_BATCH = 1000

QUILT_TASK_STATES = {
    q.TASK_COMPLETED: COMPLETED,
    q.TASK_FAILED: FAILED,
    q.TASK_CANCELLED: CANCELLED,
    q.TASK_TIMEOUT: TIMEOUT,
}


def parse_command(command_json: str) -> list[str]:
    bad = {"command_json": 'must be a JSON array of strings, e.g. ["echo", "hi"]'}
    if len(command_json.encode()) > MAX_COMMAND_BYTES:
        raise errors.InvalidArgument(f"command_json is larger than {MAX_COMMAND_BYTES} bytes", fields=bad)
    try:
        argv = json_input.loads(command_json)
    except ValueError:
        raise errors.InvalidArgument("command_json is not JSON", fields=bad) from None
    if not isinstance(argv, list):
        raise errors.InvalidArgument("command_json must be a JSON array", fields=bad)
    if not argv:
        raise errors.InvalidArgument("command_json must not be empty", fields=bad)
    if not all(isinstance(a, str) for a in argv) or not argv[0]:
        raise errors.InvalidArgument("command_json must hold strings only, the first not empty", fields=bad)
    if len(argv) > MAX_ARGV:
        raise errors.InvalidArgument(f"command_json has more than {MAX_ARGV} arguments", fields=bad)
    if any("\0" in a for a in argv):
        raise errors.InvalidArgument("command_json must not contain NUL characters", fields=bad)
    if any(len(a.encode()) > MAX_ARG for a in argv):
        raise errors.InvalidArgument(f"an argument of command_json is longer than {MAX_ARG} bytes", fields=bad)
    return argv


def check_environment(environment: Mapping[str, str]) -> None:
    """Names non-empty without '=' or NUL, values without NUL, each entry within MAX_ARG."""
    if len(environment) > MAX_ENV:
        raise errors.InvalidArgument(f"at most {MAX_ENV} environment variables", fields={"environment": "too many"})
    for key, value in environment.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise errors.InvalidArgument(
                "environment names must be non-empty, without '=' or NUL; values without NUL",
                fields={"environment": "bad entry"},
            )
        if len(key.encode()) + len(value.encode()) + 1 > MAX_ARG:
            raise errors.InvalidArgument(
                f"an environment entry is longer than {MAX_ARG} bytes", fields={"environment": "too long"}
            )


@dataclass(frozen=True)
class TaskTimeouts:
    default: int = 3600  # a task that asks for none (0) gets this: never "no limit"
    most: int = 7 * 24 * 3600


@dataclass
class Launch:
    session_id: str
    type: str
    command: list[str]
    environment: dict[str, str]
    timeout_seconds: int
    parent_task_id: str | None


@dataclass
class OutputItem:
    seq: int
    stream: int  # an OutputStream
    line: str
    percent: float | None
    at_us: int


class _Running:
    """What the runtime holds for a task while its watcher runs."""

    def __init__(self, row: TaskRow) -> None:
        self.row = row
        self.scope = trio.CancelScope()  # the current phase's: cancelled by CancelTask
        self.cancel_requested = False
        self.changed = trio.Event()  # new output stored, or the task ended
        self.ended = trio.Event()  # the watcher is done: the record is final
        self.seq = 0  # last output seq stored

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def phase(self) -> trio.CancelScope:
        """A fresh scope for the next cancellable phase (already cancelled if a cancel came)."""
        self.scope = trio.CancelScope()
        if self.cancel_requested:
            self.scope.cancel()
        return self.scope


class Tasks:
    def __init__(
        self,
        store: Store,
        quilt: QuiltLink,
        notifications: Notifications,
        tokens: PageTokens,
        quotas: Quotas | None = None,
        timeouts: TaskTimeouts = TaskTimeouts(),
    ) -> None:
        self.store = store
        self.quilt = quilt
        self.notifications = notifications
        self.tokens = tokens
        self.quotas = quotas
        self.timeouts = timeouts
        self._launching: dict[str, int] = {}  # launches under way per user (for the quota)
        self.running: dict[str, _Running] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch tasks until cancelled; first pick up those a previous run left unfinished."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for row in await self.store.run(table.unfinished):
                self._watch(row, resume=True)
            task_status.started()
            await trio.sleep_forever()

    # -- launching --------------------------------------------------------------------------------

    async def launch(self, user: str, launch: Launch, owned_container: Callable[[str, str], Awaitable[str]]) -> str:
        """`owned_container(user, id)` returns Quilt's id of the caller's container (NOT_FOUND else)."""
        self.quilt.channel()  # UNAVAILABLE at once while quilt is down (not a task doomed to fail)
        check_environment(launch.environment)
        kind = launch.type or "container:run"
        target = ""
        if kind.startswith("container:exec:"):
            target = await owned_container(user, kind.removeprefix("container:exec:"))
        elif kind != "container:run":
            raise errors.InvalidArgument(
                f'unknown task type {launch.type!r}: use "container:run" or "container:exec:<container id>"',
                fields={"type": "unknown"},
            )
        if not 0 <= launch.timeout_seconds <= self.timeouts.most:
            raise errors.InvalidArgument(
                f"timeout_seconds must be between 0 (the default, {self.timeouts.default} s) and {self.timeouts.most}",
                fields={"timeout_seconds": "out of range"},
            )
        if self.quotas is not None:  # (launches still on their way count too: no await before the +1)
            mine = self._launching.get(user, 0) + sum(
                1 for r in self.running.values() if r.row["user_id"] == user and r.row["status"] in UNFINISHED
            )
            if mine >= self.quotas.running_tasks:
                raise exceeded("max_running_tasks", self.quotas.running_tasks, "tasks pending or running")
        self._launching[user] = self._launching.get(user, 0) + 1
        try:
            return await self._launch(user, launch, kind, target)
        finally:
            self._launching[user] -= 1
            if not self._launching[user]:
                del self._launching[user]

    async def _launch(self, user: str, launch: Launch, kind: str, target: str) -> str:
        if launch.parent_task_id and await self.store.run(table.get, user, launch.parent_task_id) is None:
            raise errors.NotFound(f"no task {launch.parent_task_id!r}", fields={"parent_task_id": "not found"})
        row: TaskRow = {
            "id": "t-" + secrets.token_hex(8),
            "user_id": user,
            "session_id": launch.session_id,
            "container_id": target,
            "parent_task_id": launch.parent_task_id or None,
            "type": kind,
            "command_json": json.dumps(launch.command),
            "environment_json": json.dumps(launch.environment, sort_keys=True),
            "timeout_seconds": launch.timeout_seconds or self.timeouts.default,
            "status": PENDING,
            "created_at": now_us(),
            "started_at": None,
            "completed_at": None,
            "exit_code": None,
            "error_message": None,
            "progress_percent": 0.0,
            "current_operation": "",
            "quilt_task_id": None,
            "quilt_container_id": None,
            "output_offset": 0,
        }
        # A stored task always gets its watcher, whatever becomes of the caller: a launch whose
        # client gave up between the two left the task PENDING until the next restart.
        with trio.CancelScope(shield=True):
            await self._event(row, PENDING, "launched", functools.partial(table.insert, row=row, message="launched"))
            self._watch(row, resume=False)
        return row["id"]

    def _watch(self, row: TaskRow, *, resume: bool) -> None:
        assert self._nursery is not None
        running = _Running(row)
        self.running[row["id"]] = running
        self._nursery.start_soon(self._watcher, running, resume)

    # -- reading ----------------------------------------------------------------------------------

    async def get(self, user: str, task_id: str) -> TaskRow:
        running = self.running.get(task_id)
        if running is not None and running.row["user_id"] == user:
            return running.row
        row = await self.store.run(table.get, user, task_id)
        if row is None:
            raise errors.NotFound(f"no task {task_id!r}", reason="TASK_NOT_FOUND")
        return row

    async def page(
        self, user: str, session_id: str | None, statuses: list[int], size: int, token: str
    ) -> tuple[list[TaskRow], str]:
        limit = page_size(size)
        filter_key = json.dumps([user, session_id, sorted(set(statuses))])
        after = self.tokens.read(token, filter_key) if token else None
        rows = await self.store.run(table.page, user, session_id, sorted(set(statuses)), limit + 1, after)
        rows, next_token = self.tokens.cut(filter_key, rows, limit)
        return [self.running[r["id"]].row if r["id"] in self.running else r for r in rows], next_token

    async def output(self, user: str, task_id: str, follow: bool) -> AsyncIterator[OutputItem]:
        """Everything the task printed, from the start; with `follow`, until it ends."""
        await self.get(user, task_id)  # NOT_FOUND for someone else's
        seq = 0
        while True:
            running = self.running.get(task_id)
            changed = running.changed if running is not None else None
            while True:
                # (a batch is bounded by rows and by bytes: fewer than REPLAY_BATCH is not the end)
                rows = await self.store.run(table.output_after, task_id, seq, REPLAY_BATCH)
                for r in rows:
                    seq = r[0]
                    yield OutputItem(*r)
                if not rows:
                    break
            if not follow or changed is None:
                return
            await changed.wait()

    async def cancel(self, user: str, task_id: str) -> bool:
        """Cancel a pending or running task: True once it ended cancelled (or, past CANCEL_WAIT,
        while its end is still under way); False if it had ended, or ended by itself first."""
        row = await self.get(user, task_id)
        running = self.running.get(task_id)
        if row["status"] not in UNFINISHED or running is None:
            return False
        running.cancel_requested = True
        running.scope.cancel()
        with trio.move_on_after(CANCEL_WAIT):
            await running.ended.wait()
        return not running.ended.is_set() or running.row["status"] == CANCELLED

    # -- watching ---------------------------------------------------------------------------------

    async def _watcher(self, running: _Running, resume: bool) -> None:
        background()  # a full disk makes its writes wait for space, not fail (store/db.py)
        row = running.row
        try:
            running.seq = await self.store.run(table.last_output_seq, row["id"])
            while True:
                try:
                    if row["type"] == "container:run":
                        await self._watch_run(running, resume)
                    else:
                        await self._watch_exec(running, resume)
                    break
                except errors.Unavailable:
                    if self.quilt.connected():
                        raise  # quilt itself answered so
                    # Quilt went away (a restart, a crash): pick the task up again once it is back
                    # (a launch it may or may not have seen is found by its label, or made then).
                    log.warning("lost quilt while watching a task; resuming when it is back", task=row["id"])
                    await self.quilt.reconnected()
                    resume = True
        except errors.AriaError as exc:
            await self._finish_anyway(running, exc.message)
        except Exception:
            log.exception("task watcher failed", task=row["id"], user=row["user_id"])
            await self._finish_anyway(running, "the runtime lost track of this task (see its log)")
        finally:
            self.running.pop(row["id"], None)
            running.ended.set()
            running.notify()

    async def _finish_anyway(self, running: _Running, message: str) -> None:
        """Record the task FAILED; if even that fails, say so in the log and go on (the task is
        picked up again at the next start): nothing here may reach the runtime's nursery."""
        try:
            await self._finish(running, FAILED, message)
        except Exception:
            log.exception("could not record a task's failure", task=running.row["id"])

    async def _watch_run(self, running: _Running, resume: bool) -> None:
        row = running.row
        cid = row["quilt_container_id"]
        if resume and not cid:  # a runtime stopped in the middle of the launch: did Quilt get it?
            listed = await self.quilt.list_containers(q.ListContainersRequest(labels={"aria.task": row["id"]}))
            if listed.containers:
                cid = listed.containers[0].id
                await self._update(running, {"quilt_container_id": cid})
                log.info("adopted the container of a task whose launch was cut short", task=row["id"], container=cid)
            else:
                log.info("launching a task stored by a runtime that stopped before launching it", task=row["id"])
        if not cid:
            cid = await self._create_container(running)
        current = await self._quilt_container(cid)
        if current is not None and current.state == q.CONTAINER_CREATED:
            with trio.CancelScope(shield=True):  # (a start is local work of tens of milliseconds)
                current = await self.quilt.start_container(q.ContainerRef(id=cid))
            if current.state == q.CONTAINER_FAILED:
                await self._finish(running, FAILED, current.message)
                await self._remove(cid)
                return
        if current is None:
            await self._finish(running, FAILED, "lost: quilt no longer knows its container")
            return
        if row["status"] == PENDING:
            await self._transition(running, RUNNING, "started", {"started_at": _time(current, "started_at")})
        started_at = (row["started_at"] or now_us()) / 1e6
        deadline = started_at + row["timeout_seconds"] if row["timeout_seconds"] else None
        with trio.move_on_after(_remaining(deadline)) as timeout, running.phase():
            await self._follow(running, q.ContainerLogsRequest(id=cid, follow=True))
        timed_out = timeout.cancelled_caught
        try:
            if running.cancel_requested or timed_out:
                try:
                    await self.quilt.stop_container(q.StopContainerRequest(id=cid, grace_seconds=CANCEL_GRACE))
                except errors.FailedPrecondition:
                    pass  # it ended by itself meanwhile: its end says how
            await self._follow(running, q.ContainerLogsRequest(id=cid))  # what is left
            end = await self._quilt_container(cid)
            # What really happened: CANCELLED or TIMEOUT only if the stop ended it (Quilt says
            # STOPPED only then); a task that finished by itself first is what it was.
            stopped = end is not None and end.state == q.CONTAINER_STOPPED
            if end is None:
                await self._finish(running, FAILED, "lost: quilt no longer knows its container")
            elif stopped and running.cancel_requested:
                await self._finish(running, CANCELLED, "cancelled by the caller", end)
            elif stopped and timed_out:
                await self._finish(running, TIMEOUT, f"timed out after {row['timeout_seconds']} s; it was stopped", end)
            elif end.state == q.CONTAINER_EXITED and end.exit_code == 0 and not end.HasField("signal"):
                await self._finish(running, COMPLETED, "finished", end)
            else:
                await self._finish(running, FAILED, end.message or "failed", end)
        finally:
            with trio.CancelScope(shield=True):  # its throw-away container goes, whatever happened
                await self._remove(cid)

    async def _create_container(self, running: _Running) -> str:
        with trio.CancelScope(shield=True):  # so that we always know the container we made
            command, env, labels = _what_to_run(running.row)
            spec = q.ContainerSpec(name=running.row["id"], command=command, env=env, labels=labels)
            created = await self.quilt.create_container(q.CreateContainerRequest(spec=spec))
            await self._update(running, {"quilt_container_id": created.id})
        return created.id

    async def _watch_exec(self, running: _Running, resume: bool) -> None:
        row = running.row
        tid = row["quilt_task_id"]
        quilt_task: q.Task | None = None  # (its times, when we have them)
        if resume and not tid:  # a runtime stopped in the middle of the launch: did Quilt get it?
            try:
                listed = await self.quilt.list_tasks(q.ListTasksRequest(container_id=row["container_id"]))
            except errors.NotFound:
                listed = q.ListTasksResponse()  # (its container is gone: the exec below says so)
            for t in listed.tasks:
                if t.labels.get("aria.task") == row["id"]:
                    tid, quilt_task = t.id, t
                    await self._update(running, {"quilt_task_id": tid})
                    log.info("adopted the exec of a task whose launch was cut short", task=row["id"], quilt_task=tid)
                    break
            else:
                log.info("launching a task stored by a runtime that stopped before launching it", task=row["id"])
        if not tid:
            with trio.CancelScope(shield=True):  # so that we always know the task we started
                command, env, labels = _what_to_run(row)
                request = q.ExecRequest(
                    container_id=row["container_id"],
                    timeout_seconds=row["timeout_seconds"],
                    command=command,
                    env=env,
                    labels=labels,
                )
                quilt_task = await self.quilt.exec_async(request)
                tid = quilt_task.id
                await self._update(running, {"quilt_task_id": tid})
        if row["status"] == PENDING:
            await self._transition(running, RUNNING, "started", {"started_at": _time(quilt_task, "started_at")})
        with running.phase():
            await self._follow(running, q.TaskOutputRequest(id=tid, follow=True))
        if running.cancel_requested:
            await self.quilt.cancel_task(q.TaskRef(id=tid))
        # What is left (always: a follow cut short by a cancel, or by the task's end just as it
        # was cancelled, may not have read the last lines)
        await self._follow(running, q.TaskOutputRequest(id=tid))
        try:
            end = await self.quilt.get_task(q.TaskRef(id=tid))
        except errors.NotFound:
            await self._finish(running, FAILED, "lost: quilt no longer knows it")
            return
        # Quilt's end is the truth: CANCELLED only if the cancel ended it
        status = QUILT_TASK_STATES.get(end.state, FAILED)
        message = "finished" if status == COMPLETED else end.message
        if status == CANCELLED and running.cancel_requested:
            message = "cancelled by the caller"
        await self._finish(running, status, message, end)

    async def _quilt_container(self, cid: str) -> q.Container | None:
        try:
            return await self.quilt.get_container(q.ContainerRef(id=cid))
        except errors.NotFound:
            return None

    async def _remove(self, cid: str) -> None:
        try:
            await self.quilt.remove_container(q.RemoveContainerRequest(id=cid, force=True))
        except errors.AriaError as exc:
            log.warning("could not remove a task's container", container=cid, error=exc.message)

    async def _follow(self, running: _Running, request: q.ContainerLogsRequest | q.TaskOutputRequest) -> None:
        """Quilt's output lines from where the store is, into the store, until the stream ends."""
        request.offset = offset = running.row["output_offset"] or 0
        batch: list[OutputRow] = []
        if isinstance(request, q.ContainerLogsRequest):
            stream = self.quilt.container_logs(request)
        else:
            stream = self.quilt.task_output(request)
        try:
            async with stream as lines:
                async for line in _batched(lines):
                    if line is None:  # the stream paused: store what came
                        await self._store_output(running, batch, offset)
                        batch = []
                        continue
                    offset = line.offset + 1
                    batch.append(self._item(running, line))
                    if len(batch) >= OUTPUT_BATCH:
                        await self._store_output(running, batch, offset)
                        batch = []
        finally:
            if batch:
                with trio.CancelScope(shield=True):
                    await self._store_output(running, batch, offset)

    def _item(self, running: _Running, line: q.OutputLine) -> OutputRow:
        running.seq += 1
        at = line.timestamp.ToMicroseconds()
        if line.stream == q.STDOUT and (m := PROGRESS.fullmatch(line.text)):
            percent = max(0.0, min(100.0, float(m.group(1))))
            running.row["progress_percent"], running.row["current_operation"] = percent, m.group(2)
            return (running.seq, OutputStream.PROGRESS, m.group(2), percent, at)
        stream = OutputStream.STDERR if line.stream == q.STDERR else OutputStream.STDOUT
        return (running.seq, stream, line.text, None, at)

    async def _store_output(self, running: _Running, batch: list[OutputRow], offset: int) -> None:
        if not batch:
            return
        row = running.row
        await self.store.run(table.append_output, row["id"], batch, offset)
        row["output_offset"] = offset
        if any(item[1] == OutputStream.PROGRESS for item in batch):
            progress: TaskChange = {
                "progress_percent": row["progress_percent"],
                "current_operation": row["current_operation"],
            }
            await self.store.run(table.update, row["id"], progress)
        running.notify()

    # -- transitions ------------------------------------------------------------------------------

    async def _update(self, running: _Running, fields: TaskChange) -> None:
        await self.store.run(table.update, running.row["id"], fields)
        _apply(running.row, fields)

    async def _transition(self, running: _Running, status: TaskStatus, message: str, fields: TaskChange) -> None:
        with trio.CancelScope(shield=True):  # a transition is recorded whole (with its event), or not at all
            after: TaskRow = {**running.row, **fields, "status": status}
            change = functools.partial(
                table.set_status, task_id=running.row["id"], status=status, message=message, fields=fields
            )
            await self._event(after, status, message, change)
            _apply(running.row, {**fields, "status": status})
        log.info("task status", task=running.row["id"], status=status.name.lower(), message=message)

    async def _finish(
        self, running: _Running, status: TaskStatus, message: str, end: q.Container | q.Task | None = None
    ) -> None:
        if running.row["status"] not in UNFINISHED:
            return
        # (when it ended, as Quilt saw it: a runtime that was down then records it later)
        fields: TaskChange = {"completed_at": max(_time(end, "finished_at"), running.row["started_at"] or 0)}
        if end is not None and end.HasField("exit_code"):
            fields["exit_code"] = end.exit_code
        if status == COMPLETED:
            fields["progress_percent"] = 100.0
        if status != COMPLETED:
            fields["error_message"] = message
        await self._transition(running, status, message, fields)

    async def _event(
        self, row: TaskRow, status: TaskStatus, message: str, change: Callable[[sqlite_utils.Database], object]
    ) -> None:
        event = npb.TaskStatusEvent(
            task_id=row["id"], new_status=aria_pb2.TaskStatus.Name(status), status_message=message
        )
        if row["exit_code"] is not None:
            event.exit_code = row["exit_code"]
        name = status.name.lower()
        await self.notifications.publish(
            row["user_id"],
            "task_status",
            event,
            title=f"Task {row['id']} {name}",
            message=message,
            metadata={"task_id": row["id"], "status": name, "exit_code": row["exit_code"]},
            change=change,
        )


def _apply(row: TaskRow, fields: TaskChange) -> None:
    """`fields` into the row the watcher holds (the cast: TaskChange holds TaskRow's fields, with
    their types, none required, which mypy cannot say of a TypedDict's update)."""
    row.update(cast("TaskRow", fields))


def _what_to_run(row: TaskRow) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """A task's argv, environment and labels, as Quilt's requests take them."""
    command: list[str] = json.loads(row["command_json"])
    env: dict[str, str] = json.loads(row["environment_json"])
    return command, env, {"aria.user": row["user_id"], "aria.task": row["id"]}


def _time(message: q.Container | q.Task | None, name: Literal["started_at", "finished_at"]) -> int:
    """A Quilt message's timestamp `name` in microseconds; now if it has none (or no message)."""
    if message is None or not message.HasField(name):
        return now_us()
    return getattr(message, name).ToMicroseconds()  # type: ignore[no-any-return]


def _remaining(deadline: float | None) -> float:
    return float("inf") if deadline is None else max(0.0, deadline - time.time())


async def _batched(lines: Replies[q.OutputLine]) -> AsyncIterator[q.OutputLine | None]:
    """The stream's lines, with a None whenever no further line is waiting (time to store). It
    ends early once Quilt no longer knows what it follows; any other failure is a lost stream
    (the watcher picks the task up again once Quilt is back). Only the stream's own errors are
    changed here: the store's, raised where the lines are stored, stay what they are."""
    while True:
        try:
            line = await lines.receive()
        except errors.NotFound:
            return
        except errors.AriaError as exc:
            raise errors.Unavailable(f"lost the connection to quilt while following the task: {exc.message}") from None
        if line is None:
            return
        yield line
        if not lines.waiting:
            yield None
