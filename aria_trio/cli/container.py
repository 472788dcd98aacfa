"""`aria container ...`: create, start, stop and remove the runtime's containers; read their logs."""

from __future__ import annotations

import datetime

import click

from aria_trio.cli import Context, main
from aria_trio.cli.output import (
    STATUS,
    call,
    each,
    fields,
    parse_env,
    printer,
    show,
    show_list,
    table,
    until_interrupted,
    when,
)
from aria_trio.proto.aria.v1 import aria_pb2
from aria_trio.proto.aria.v1 import container_pb2 as container_pb
from aria_trio.rpc import Channel

CONTAINERS = "/aria.v1.ContainerService/"
SINCE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@main.group()
def container() -> None:
    """Create, start, stop and remove containers; read their logs."""


def _container_text(c: container_pb.Container) -> str:
    return fields(
        [
            ("id", c.id),
            ("name", c.name),
            ("status", STATUS.get(c.status, "unknown")),
            ("image", c.image_path),
            ("session", c.session_id),
            ("created", when(c.created_at)),
        ]
    )


class _Size(click.ParamType[int, object]):
    """A number of bytes: 1048576, 512K, 64M, 2G (powers of 1024)."""

    name = "size"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
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
    show(obj, c, c.id)


_Ref = container_pb.StartContainerRequest | container_pb.StopContainerRequest | container_pb.RemoveContainerRequest
_Empty = container_pb.StartContainerResponse | container_pb.StopContainerResponse | container_pb.RemoveContainerResponse


def _container_verb(name: str, rpc: str, request: type[_Ref], reply: type[_Empty], done: str, doc: str) -> None:
    """`aria container NAME ID`: the `rpc` of ContainerService on the id (its reply is empty)."""

    @container.command(name, help=doc)
    @click.argument("container_id")
    @click.pass_obj
    def verb(obj: Context, container_id: str) -> None:
        call(obj, CONTAINERS + rpc, request(container_id=container_id), reply)
        obj.output({done: container_id}, f"{done} {container_id}")


_container_verb(
    "start",
    "StartContainer",
    container_pb.StartContainerRequest,
    container_pb.StartContainerResponse,
    "started",
    "Start a created container.",
)
_container_verb(
    "stop",
    "StopContainer",
    container_pb.StopContainerRequest,
    container_pb.StopContainerResponse,
    "stopped",
    "Stop a running container (its status becomes cancelled).",
)
_container_verb(
    "rm",
    "RemoveContainer",
    container_pb.RemoveContainerRequest,
    container_pb.RemoveContainerResponse,
    "removed",
    "Remove a container and its files.",
)


@container.command("get")
@click.argument("container_id")
@click.pass_obj
def container_get(obj: Context, container_id: str) -> None:
    """Show a container."""
    request = container_pb.GetContainerRequest(container_id=container_id)
    c = call(obj, CONTAINERS + "GetContainer", request, container_pb.Container)
    show(obj, c, _container_text(c))


@container.command("ls")
@click.option("--session", default=None, help="Only this session's containers.")
@click.pass_obj
def container_ls(obj: Context, session: str | None) -> None:
    """List your containers."""
    request = container_pb.ListContainersRequest(session_id=session)
    found = call(obj, CONTAINERS + "ListContainers", request, container_pb.ListContainersResponse).containers
    rows = ((c.id, STATUS.get(c.status, "?"), when(c.created_at), c.name, c.image_path) for c in found)
    show_list(obj, found, table(("ID", "STATUS", "CREATED", "NAME", "IMAGE"), rows, "(no containers)"))


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
        at = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither seconds ago (90, 5m, 2h) nor an ISO time") from None
    return at if at.tzinfo else at.astimezone()


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
        await each(channel, path, request, container_pb.ContainerLog, printer(obj, _render_log))

    until_interrupted(obj, stream)
