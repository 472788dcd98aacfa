"""Client verbs for the runtime's aria.v1 services: `aria task|container|bundle|agents|tools|events`.

Every verb prints text for people, or with `aria --json` the messages as JSON (one object per line
for the streams). Streams that follow (`-f`, `events`) end quietly at Ctrl-C.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shlex
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
import trio
from google.protobuf import json_format, timestamp_pb2

from aria_trio.cli import Context, main
from aria_trio.cli.quilt import _env as parse_env
from aria_trio.proto.aria.v1 import aria_pb2
from aria_trio.proto.aria.v1 import bundle_pb2 as bundle_pb
from aria_trio.proto.aria.v1 import container_pb2 as container_pb
from aria_trio.proto.aria.v1 import notification_pb2 as notification_pb
from aria_trio.proto.aria.v1 import registry_pb2 as registry_pb
from aria_trio.proto.aria.v1 import task_pb2 as task_pb
from aria_trio.rpc import Channel

T = TypeVar("T")

TASKS = "/aria.v1.TaskService/"
CONTAINERS = "/aria.v1.ContainerService/"
BUNDLES = "/aria.v1.BundleService/"
REGISTRY = "/aria.v1.RegistryService/"
NOTIFICATIONS = "/aria.v1.NotificationService/"

CHUNK = 1024 * 1024
STATUS = {value: name.lower() for name, value in aria_pb2.TaskStatus.items() if value}
EVENT_KINDS = [f.name for f in notification_pb.Notification.DESCRIPTOR.oneofs_by_name["event_payload"].fields]
SINCE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# -- shared helpers -------------------------------------------------------------------------------


def _as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _show(obj: Context, message: Any, text: str) -> None:
    obj.output(_as_dict(message), text)


def _show_list(obj: Context, messages: Sequence[Any], text: str) -> None:
    obj.output([_as_dict(m) for m in messages], text)


def _call(obj: Context, path: str, request: Any, reply: type[T]) -> T:
    """One unary call, under the group's --timeout."""

    async def call(channel: Channel) -> T:
        return await channel.unary(path, request, reply, timeout=obj.timeout)

    return obj.run(call)


async def _each(channel: Channel, path: str, request: Any, reply: type[T], handle: Callable[[T], None]) -> None:
    """A server stream: `handle` each message until the server ends it (no deadline: it may follow)."""
    async with channel.call(path, reply) as call:
        await call.send(request, end=True)
        async for message in call:
            handle(message)


def _printer(obj: Context, render: Callable[[T], None]) -> Callable[[T], None]:
    """How a stream's messages are shown: a JSON object a line with --json, else `render`."""
    if obj.as_json:
        return lambda message: click.echo(json.dumps(_as_dict(message), sort_keys=True))
    return render


def _until_interrupted(obj: Context, fn: Callable[[Channel], Awaitable[T]]) -> T | None:
    """obj.run(fn), except that Ctrl-C (SIGINT) stops it quietly: None then."""

    async def watch(scope: trio.CancelScope, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            task_status.started()
            async for _ in signals:
                scope.cancel()
                return

    async def run(channel: Channel) -> T | None:
        done: list[T] = []
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(watch, nursery.cancel_scope)
                done.append(await fn(channel))
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # give the one error back as is (obj.run reports it)
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        return done[0] if done else None

    try:
        return obj.run(run)
    except KeyboardInterrupt:  # before the handler was in place
        return None


def _when(ts: timestamp_pb2.Timestamp) -> str:
    """A timestamp in local time, "-" when unset."""
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime(tzinfo=datetime.UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], empty: str = "(none)") -> str:
    """Columns padded to their widest cell; the last one is left ragged."""
    lines = [list(header), *(list(r) for r in rows)]
    if len(lines) == 1:
        return empty
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(line, widths, strict=False)), line[-1]]).rstrip()
        for line in lines
    )


def _fields(pairs: Iterable[tuple[str, str]]) -> str:
    """`name  value` lines, aligned, leaving out the empty values."""
    kept = [(name, value) for name, value in pairs if value]
    width = max((len(name) for name, _ in kept), default=0)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in kept)


def _command_text(command_json: str) -> str:
    try:
        argv = json.loads(command_json)
        return shlex.join(argv) if isinstance(argv, list) else command_json
    except (ValueError, TypeError):
        return command_json


def _env_text(env: Iterable[tuple[str, str]]) -> str:
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env))


# -- tasks ----------------------------------------------------------------------------------------


@main.group()
def task() -> None:
    """Run commands in containers; follow, list and cancel them."""


def _outcome(t: task_pb.Task) -> str:
    words = [STATUS.get(t.status, "unknown")]
    if t.HasField("exit_code"):
        words.append(f"exit code {t.exit_code}")
    if t.error_message:
        words.append(t.error_message)
    return ", ".join(words)


def _exit_status(t: task_pb.Task) -> int:
    """The task's exit code for our own exit: 0 if it completed; 1 if it ended without a usable code."""
    if t.status == aria_pb2.COMPLETED:
        return 0
    code = t.exit_code if t.HasField("exit_code") else 1
    return code if 0 < code < 256 else 1


def _task_text(t: task_pb.Task) -> str:
    progress = f"{t.progress_percent:.0f}% {t.current_operation}".strip() if t.progress_percent else ""
    return _fields(
        [
            ("id", t.id),
            ("status", _outcome(t)),
            ("type", t.type),
            ("command", _command_text(t.command_json)),
            ("environment", _env_text(t.environment.items())),
            ("timeout", f"{t.timeout_seconds}s" if t.timeout_seconds else ""),
            ("session", t.session_id),
            ("container", t.container_id),
            ("parent", t.parent_task_id),
            ("progress", progress or t.current_operation),
            ("created", _when(t.created_at)),
            ("started", _when(t.started_at) if t.HasField("started_at") else ""),
            ("completed", _when(t.completed_at) if t.HasField("completed_at") else ""),
        ]
    )


def _render_output(out: task_pb.TaskOutput) -> None:
    kind = out.WhichOneof("output")
    if kind == "stdout_line":
        click.echo(out.stdout_line)
    elif kind == "stderr_line":
        click.echo(out.stderr_line, err=True)
    elif kind == "progress":
        click.echo(f"[{out.progress.percent_complete:3.0f}%] {out.progress.operation_description}", err=True)


async def _task_output(obj: Context, channel: Channel, task_id: str, follow: bool) -> None:
    request = task_pb.StreamTaskOutputRequest(task_id=task_id, follow=follow)
    await _each(channel, TASKS + "StreamTaskOutput", request, task_pb.TaskOutput, _printer(obj, _render_output))


@task.command("launch")
@click.option("--type", "kind", default="", help='"container:run" (the default) or "container:exec:<container id>".')
@click.option("--session", default="", help="The session it belongs to.")
@click.option("--timeout", "seconds", type=click.IntRange(min=0), default=0, help="Kill it after SECONDS (0: never).")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", help="An environment variable (repeatable).")
@click.option("--parent", default=None, metavar="TASK_ID", help="The task that launched this one.")
@click.option("--follow", "-f", is_flag=True, help="Print its output until it ends, then exit with its exit code.")
@click.argument("argv", nargs=-1, required=True)
@click.pass_obj
def task_launch(
    obj: Context,
    kind: str,
    session: str,
    seconds: int,
    env: tuple[str, ...],
    parent: str | None,
    follow: bool,
    argv: tuple[str, ...],
) -> None:
    """Launch ARGV as a task and print its id (-f: follow it to its end).

    \b
    Examples:
      aria task launch -- make -j4
      aria task launch -f --timeout 60 -- sh -c 'echo hi; echo "::progress 50 half"'
      aria task launch --type container:exec:CONTAINER_ID -- ls /workspace

    A line `::progress PERCENT TEXT` of the task's output becomes a progress update.
    """
    request = task_pb.LaunchTaskRequest(
        session_id=session,
        type=kind,
        command_json=json.dumps(list(argv)),
        environment=parse_env(env),
        timeout_seconds=seconds,
        parent_task_id=parent,
    )
    if not follow:
        reply = _call(obj, TASKS + "LaunchTask", request, task_pb.LaunchTaskResponse)
        _show(obj, reply, reply.task_id)
        return
    launched: list[str] = []

    async def launch_and_follow(channel: Channel) -> task_pb.Task:
        reply = await channel.unary(TASKS + "LaunchTask", request, task_pb.LaunchTaskResponse, timeout=obj.timeout)
        launched.append(reply.task_id)
        if obj.as_json:
            _show(obj, reply, "")
        else:
            click.echo(f"task {reply.task_id}", err=True)
        await _task_output(obj, channel, reply.task_id, follow=True)
        get = task_pb.GetTaskRequest(task_id=reply.task_id)
        return await channel.unary(TASKS + "GetTask", get, task_pb.Task, timeout=obj.timeout)

    final = _until_interrupted(obj, launch_and_follow)
    if final is None:
        if launched:
            click.echo(f"detached: task {launched[0]} goes on (aria task logs -f {launched[0]})", err=True)
        sys.exit(130)
    if obj.as_json:
        _show(obj, final, "")
    else:
        click.echo(f"task {final.id} {_outcome(final)}", err=True)
    sys.exit(_exit_status(final))


@task.command("get")
@click.argument("task_id")
@click.pass_obj
def task_get(obj: Context, task_id: str) -> None:
    """Show a task: its status, exit code, progress and times."""
    t = _call(obj, TASKS + "GetTask", task_pb.GetTaskRequest(task_id=task_id), task_pb.Task)
    _show(obj, t, _task_text(t))


@task.command("list")
@click.option("--session", default=None, help="Only this session's tasks.")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(list(STATUS.values()), case_sensitive=False),
    help="Only tasks in this status (repeatable).",
)
@click.option("--limit", type=click.IntRange(min=0), default=0, help="Tasks per page (0: the server's default).")
@click.option("--page-token", default="", help="The page to show (as a previous listing said).")
@click.option("--all", "every_page", is_flag=True, help="Every page, not just the first.")
@click.pass_obj
def task_list(
    obj: Context, session: str | None, statuses: tuple[str, ...], limit: int, page_token: str, every_page: bool
) -> None:
    """List your tasks, newest first."""
    request = task_pb.ListTasksRequest(
        session_id=session,
        filter_by_status=[s.upper() for s in statuses],
        page_size=limit,
        page_token=page_token,
    )

    async def pages(channel: Channel) -> tuple[list[task_pb.Task], str]:
        found: list[task_pb.Task] = []
        while True:
            page = await channel.unary(TASKS + "ListTasks", request, task_pb.ListTasksResponse, timeout=obj.timeout)
            found.extend(page.tasks)
            request.page_token = page.next_page_token
            if not (every_page and page.next_page_token):
                return found, page.next_page_token

    tasks, more = obj.run(pages)
    rows = (
        (t.id, STATUS.get(t.status, "?"), _when(t.created_at), t.type, _command_text(t.command_json)) for t in tasks
    )
    _show_list(obj, tasks, _table(("ID", "STATUS", "CREATED", "TYPE", "COMMAND"), rows, "(no tasks)"))
    if more:
        click.echo(f"(more: --all, or --page-token {more})", err=True)


@task.command("logs")
@click.argument("task_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the task ends.")
@click.pass_obj
def task_logs(obj: Context, task_id: str, follow: bool) -> None:
    """Print a task's output.

    Its stdout goes to stdout; its stderr and its progress (`[ 40%] compiling`) to stderr.
    """

    async def stream(channel: Channel) -> None:
        await _task_output(obj, channel, task_id, follow)

    _until_interrupted(obj, stream)


@task.command("cancel")
@click.argument("task_id")
@click.pass_obj
def task_cancel(obj: Context, task_id: str) -> None:
    """Cancel a task (nothing happens if it has already ended)."""
    r = _call(obj, TASKS + "CancelTask", task_pb.CancelTaskRequest(task_id=task_id), task_pb.CancelTaskResponse)
    text = "cancellation initiated" if r.cancellation_initiated else "not cancelled: it has already ended"
    obj.output({"task_id": task_id, "cancellation_initiated": r.cancellation_initiated}, f"{task_id}: {text}")


# -- containers -----------------------------------------------------------------------------------


@main.group()
def container() -> None:
    """Create, start, stop and remove containers; read their logs."""


def _container_text(c: container_pb.Container) -> str:
    return _fields(
        [
            ("id", c.id),
            ("name", c.name),
            ("status", STATUS.get(c.status, "unknown")),
            ("image", c.image_path),
            ("session", c.session_id),
            ("created", _when(c.created_at)),
        ]
    )


class _Size(click.ParamType[int]):
    """A number of bytes: 1048576, 512K, 64M, 2G (powers of 1024)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        text = str(value).strip().upper().removesuffix("B").removesuffix("I")
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1:], 1)
        try:
            number = float(text[:-1] if scale > 1 else text)
        except ValueError:
            self.fail(f"{value!r} is not a size (e.g. 512M, 2G)", param, ctx)
        if number < 0:
            self.fail(f"{value!r} is negative", param, ctx)
        return int(number * scale)


SIZE = _Size()


@container.command("create")
@click.argument("name")
@click.option(
    "--image", default="", metavar="NAME", help='"host" (the default), or an image of the operator\'s --images-dir.'
)
@click.option(
    "--memory", type=SIZE, default=None, metavar="BYTES", help="Memory limit, e.g. 512M (default: the daemon's)."
)
@click.option("--cpus", type=float, default=None, help="CPU time limit in CPUs, e.g. 1.5 (default: the daemon's).")
@click.option("--pids", type=int, default=None, help="Limit on its processes (default: the daemon's).")
@click.option("--disk", type=SIZE, default=None, metavar="BYTES", help="Its disk (workspace and /tmp), e.g. 2G.")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", help="An environment variable (repeatable).")
@click.option("--persistent", is_flag=True, help="Keep it when its session ends.")
@click.option("--session", default=None, help="The session it belongs to.")
@click.option("--start", "start_now", is_flag=True, help="Start it at once.")
@click.argument("command", nargs=-1)
@click.pass_obj
def container_create(
    obj: Context,
    name: str,
    image: str,
    env: tuple[str, ...],
    persistent: bool,
    session: str | None,
    start_now: bool,
    command: tuple[str, ...],
    memory: int | None = None,
    cpus: float | None = None,
    pids: int | None = None,
    disk: int | None = None,
) -> None:
    """Create a container; print its id.

    Its main process is COMMAND (none: it idles until stopped).

    \b
    Example: aria container create web --start -- python3 -m http.server
    """
    request = container_pb.CreateContainerRequest(
        name=name,
        image_path=image,
        environment=[aria_pb2.KeyValuePair(key=k, value=v) for k, v in parse_env(env).items()],
        persistent=persistent,
        session_id=session,
        command=list(command),
    )
    if any(v is not None for v in (memory, cpus, pids, disk)):
        request.limits.CopyFrom(
            container_pb.ContainerLimits(memory_bytes=memory or 0, cpus=cpus or 0, pids=pids or 0, disk_bytes=disk or 0)
        )

    async def create(channel: Channel) -> container_pb.Container:
        c = await channel.unary(CONTAINERS + "CreateContainer", request, container_pb.Container, timeout=obj.timeout)
        if not start_now:
            return c
        ref = {"container_id": c.id}
        start = container_pb.StartContainerRequest(**ref)
        await channel.unary(
            CONTAINERS + "StartContainer", start, container_pb.StartContainerResponse, timeout=obj.timeout
        )
        get = container_pb.GetContainerRequest(**ref)
        return await channel.unary(CONTAINERS + "GetContainer", get, container_pb.Container, timeout=obj.timeout)

    c = obj.run(create)
    _show(obj, c, c.id)


def _container_verb(name: str, rpc: str, done: str, doc: str) -> None:
    """`aria container NAME ID`: the `rpc` of ContainerService on the id (its reply is empty)."""
    request, reply = getattr(container_pb, rpc + "Request"), getattr(container_pb, rpc + "Response")

    @container.command(name, help=doc)
    @click.argument("container_id")
    @click.pass_obj
    def verb(obj: Context, container_id: str) -> None:
        _call(obj, CONTAINERS + rpc, request(container_id=container_id), reply)
        obj.output({done: container_id}, f"{done} {container_id}")


_container_verb("start", "StartContainer", "started", "Start a created container.")
_container_verb("stop", "StopContainer", "stopped", "Stop a running container (its status becomes cancelled).")
_container_verb("rm", "RemoveContainer", "removed", "Remove a container and its files.")


@container.command("get")
@click.argument("container_id")
@click.pass_obj
def container_get(obj: Context, container_id: str) -> None:
    """Show a container."""
    request = container_pb.GetContainerRequest(container_id=container_id)
    c = _call(obj, CONTAINERS + "GetContainer", request, container_pb.Container)
    _show(obj, c, _container_text(c))


@container.command("ls")
@click.option("--session", default=None, help="Only this session's containers.")
@click.pass_obj
def container_ls(obj: Context, session: str | None) -> None:
    """List your containers."""
    request = container_pb.ListContainersRequest(session_id=session)
    found = _call(obj, CONTAINERS + "ListContainers", request, container_pb.ListContainersResponse).containers
    rows = ((c.id, STATUS.get(c.status, "?"), _when(c.created_at), c.name, c.image_path) for c in found)
    _show_list(obj, found, _table(("ID", "STATUS", "CREATED", "NAME", "IMAGE"), rows, "(no containers)"))


def _since(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime.datetime | None:
    """--since: seconds ago (90, 90s, 5m, 2h, 1d) or an ISO time (local unless it names its zone)."""
    if value is None:
        return None
    unit = SINCE_UNITS.get(value[-1:].lower())
    try:
        ago = float(value[:-1] if unit else value) * (unit or 1)
        return datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=ago)
    except (ValueError, OverflowError):
        pass
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither seconds ago (90, 5m, 2h) nor an ISO time") from None
    return when if when.tzinfo else when.astimezone()


def _render_log(log: container_pb.ContainerLog) -> None:
    click.echo(log.line, err=log.stream == container_pb.ContainerLog.STDERR)


@container.command("logs")
@click.argument("container_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the container ends.")
@click.option(
    "--since",
    callback=_since,
    metavar="WHEN",
    help="Only lines from then on: seconds ago (90, 5m, 2h, 1d) or an ISO time (2026-05-01T12:00).",
)
@click.pass_obj
def container_logs(obj: Context, container_id: str, follow: bool, since: datetime.datetime | None) -> None:
    """Print a container's output (its stderr on stderr)."""
    request = container_pb.StreamContainerLogsRequest(container_id=container_id, follow=follow)
    if since is not None:
        request.since.FromDatetime(since)

    async def stream(channel: Channel) -> None:
        path = CONTAINERS + "StreamContainerLogs"
        await _each(channel, path, request, container_pb.ContainerLog, _printer(obj, _render_log))

    _until_interrupted(obj, stream)


# -- bundles, agents and tools --------------------------------------------------------------------


@main.group()
def bundle() -> None:
    """Upload .aria bundles (their agents and tools get registered)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while data := f.read(CHUNK):
            digest.update(data)
    return digest.hexdigest()


class _Progress:
    """` 42%  3.0 / 7.1 MiB  12.3 MiB/s`, rewritten in place on stderr (a terminal), when shown at all."""

    def __init__(self, total: int, shown: bool) -> None:
        self.total, self.shown, self.started = total, shown, time.monotonic()

    def update(self, sent: int) -> None:
        if self.shown:
            rate = sent / CHUNK / max(time.monotonic() - self.started, 1e-6)
            percent = sent * 100 // max(self.total, 1)
            line = f"\r{percent:3d}%  {sent / CHUNK:.1f} / {self.total / CHUNK:.1f} MiB  {rate:.1f} MiB/s\x1b[K"
            click.echo(line, err=True, nl=False)

    def close(self) -> None:
        if self.shown:
            click.echo("", err=True)


async def _upload_requests(path: Path, metadata: bundle_pb.BundleMetadata, progress: _Progress) -> AsyncIterator[Any]:
    """The metadata, then the file in 1 MiB chunks."""
    yield bundle_pb.UploadBundleRequest(metadata=metadata)
    sent = 0
    try:
        async with await trio.open_file(path, "rb") as f:  # reads run in a worker thread
            while data := await f.read(CHUNK):
                yield bundle_pb.UploadBundleRequest(chunk=data)
                sent += len(data)
                progress.update(sent)
    finally:
        progress.close()


def _registered(path: Path, agents: Sequence[Any], tools: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Of the registry's agents and tools, those the bundle at `path` defines (by name)."""
    from aria_trio.shared.bundle_manifest import InvalidBundle, inspect_bundle

    try:
        manifest = inspect_bundle(str(path))
    except InvalidBundle:
        return [], []
    agent_names = {a.name for a in manifest.agents}
    tool_names = {t.name for t in manifest.tools}
    return [a for a in agents if a.name in agent_names], [t for t in tools if t.name in tool_names]


@bundle.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="The bundle's name (default: the file's name).")
@click.option("--no-checksum", is_flag=True, help="Do not send a SHA-256 of the file for the server to check.")
@click.pass_obj
def bundle_upload(obj: Context, path: Path, name: str | None, no_checksum: bool) -> None:
    """Upload a bundle; print its id, agents and tools.

    It goes in 1 MiB chunks with its SHA-256, showing progress on a terminal.
    """

    size = path.stat().st_size
    progress = _Progress(size, shown=sys.stderr.isatty() and not obj.as_json)

    async def upload(channel: Channel) -> tuple[bundle_pb.UploadBundleResponse, list[Any], list[Any]]:
        checksum = "" if no_checksum else await trio.to_thread.run_sync(_sha256, path)
        metadata = bundle_pb.BundleMetadata(name=name or path.name, total_size_bytes=size, sha256_checksum=checksum)
        reply = await channel.stream_unary(
            BUNDLES + "UploadBundle", _upload_requests(path, metadata, progress), bundle_pb.UploadBundleResponse
        )
        if not reply.success:
            return reply, [], []
        agents, tools = await _list_agents(obj, channel), await _list_tools(obj, channel)
        mine = await trio.to_thread.run_sync(_registered, path, agents, tools)
        return reply, *mine

    reply, agents, tools = obj.run(upload)
    if not reply.success:
        click.echo(f"error: upload failed: {reply.error_message or 'no reason given'}", err=True)
        sys.exit(1)
    text = [reply.bundle_id]
    text += [f"  agent {a.agent_id}  {a.name}" for a in agents]
    text += [f"  tool  {t.name}{_signature(t.parameters_json_schema)}" for t in tools]
    obj.output(
        {**_as_dict(reply), "agents": [_as_dict(a) for a in agents], "tools": [_as_dict(t) for t in tools]},
        "\n".join(text),
    )


async def _list_agents(obj: Context, channel: Channel) -> list[registry_pb.AgentSummary]:
    request = registry_pb.ListAgentsRequest()
    reply = await channel.unary(REGISTRY + "ListAgents", request, registry_pb.ListAgentsResponse, timeout=obj.timeout)
    return list(reply.agents)


async def _list_tools(obj: Context, channel: Channel) -> list[registry_pb.ToolDefinition]:
    request = registry_pb.ListToolsRequest()
    reply = await channel.unary(REGISTRY + "ListTools", request, registry_pb.ListToolsResponse, timeout=obj.timeout)
    return list(reply.tools)


def _schema(schema_json: str) -> Any:
    try:
        return json.loads(schema_json) if schema_json else {}
    except ValueError:
        return None


def _signature(schema_json: str) -> str:
    """A tool's parameters at a glance: `(city: string, days?: integer)`."""
    schema = _schema(schema_json)
    if not isinstance(schema, dict):
        return "(?)"
    properties = schema.get("properties") or {}
    required = set(schema.get("required") or ())
    params = []
    for param, spec in properties.items():
        kind = spec.get("type", "any") if isinstance(spec, dict) else "any"
        kind = "|".join(kind) if isinstance(kind, list) else str(kind)
        params.append(f"{param}{'' if param in required else '?'}: {kind}")
    return f"({', '.join(params)})"


def _tool_text(t: registry_pb.ToolDefinition, with_schema: bool) -> str:
    """`name(parameters)  description`, then (with_schema) its JSON Schema pretty-printed."""
    line = f"{t.name}{_signature(t.parameters_json_schema)}" + (f"  {t.description}" if t.description else "")
    if not with_schema:
        return line
    schema = _schema(t.parameters_json_schema)
    pretty = json.dumps(schema, indent=2, sort_keys=True) if schema is not None else t.parameters_json_schema
    return line + "\n" + "\n".join("    " + s for s in pretty.splitlines())


@main.group()
def agents() -> None:
    """The agents you can start sessions with."""


@agents.command("list")
@click.pass_obj
def agents_list(obj: Context) -> None:
    """List your agents (the built-in ones and those of your bundles)."""
    found = obj.run(lambda channel: _list_agents(obj, channel))
    rows = ((a.agent_id, a.name, a.description) for a in found)
    _show_list(obj, found, _table(("AGENT ID", "NAME", "DESCRIPTION"), rows, "(no agents)"))


@agents.command("show")
@click.argument("agent_id")
@click.pass_obj
def agents_show(obj: Context, agent_id: str) -> None:
    """Show an agent and its tools, with their parameters' JSON Schemas."""
    request = registry_pb.GetAgentDetailsRequest(agent_id=agent_id)
    a = _call(obj, REGISTRY + "GetAgentDetails", request, registry_pb.AgentDefinition)
    head = _fields([("agent", a.agent_id), ("name", a.name), ("description", a.description)])
    tools = "\n".join("  " + _tool_text(t, with_schema=True) for t in a.tools) or "  (none)"
    _show(obj, a, f"{head}\ntools:\n{tools}")


@main.group()
def tools() -> None:
    """The tools your agents can call."""


@tools.command("list")
@click.option("--schema", "-s", "with_schema", is_flag=True, help="Also print each tool's full JSON Schema.")
@click.pass_obj
def tools_list(obj: Context, with_schema: bool) -> None:
    """List your tools and their parameters.

    Built-in tools and those of your bundles; `name?` marks an optional parameter.
    """
    found = obj.run(lambda channel: _list_tools(obj, channel))
    _show_list(obj, found, "\n".join(_tool_text(t, with_schema) for t in found) or "(no tools)")


# -- events ---------------------------------------------------------------------------------------


def _event_details(n: notification_pb.Notification) -> str:
    kind = n.WhichOneof("event_payload")
    if kind == "bundle_upload":
        b = n.bundle_upload
        ending = "ok" if b.success else (f"failed: {b.error_message}" if b.HasField("error_message") else "")
        return " ".join(w for w in (b.bundle_name, f"{b.progress_percent:.0f}%", b.status_message, ending) if w)
    if kind in ("task_status", "container_status"):
        e = getattr(n, kind)
        subject = e.task_id if kind == "task_status" else e.container_id
        code = f"exit code {e.exit_code}" if e.HasField("exit_code") else ""
        return " ".join(w for w in (subject, STATUS.get(e.new_status, "?"), code, e.status_message) if w)
    return ""


def _render_event(n: notification_pb.Notification) -> None:
    click.echo(f"#{n.sequence} {_when(n.timestamp)} {n.WhichOneof('event_payload') or '?'} {_event_details(n)}")


@main.command()
@click.option(
    "--type",
    "kinds",
    multiple=True,
    type=click.Choice(EVENT_KINDS),
    help="Only events of this kind (repeatable; default: all).",
)
@click.option(
    "--after", type=click.IntRange(min=0), default=None, metavar="SEQ", help="First replay the events after SEQ."
)
@click.pass_obj
def events(obj: Context, kinds: tuple[str, ...], after: int | None) -> None:
    """Print your events as they happen, until Ctrl-C.

    One line an event: `#seq time kind details`. With --after 0 it first replays every stored
    event; each line's #seq is what to resume from.
    """
    request = notification_pb.StreamNotificationsRequest(event_types=kinds, after_sequence=after)

    async def stream(channel: Channel) -> None:
        path = NOTIFICATIONS + "StreamNotifications"
        await _each(channel, path, request, notification_pb.Notification, _printer(obj, _render_event))

    _until_interrupted(obj, stream)
