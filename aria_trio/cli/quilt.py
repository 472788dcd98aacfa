"""`aria quilt ...`: run the container daemon, and drive it by hand."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import TypeVar

import click
import trio
from google.protobuf.message import Message

from aria_trio.cli import CONFIG_OPTION, Context, main, run_daemon, settings_options
from aria_trio.cli.output import as_dict, call, pages, parse_env, show
from aria_trio.proto.quilt.v1 import quilt_pb2 as pb
from aria_trio.rpc import Channel
from aria_trio.shared.config import QUILT_SETTINGS
from aria_trio.shared.quilt_api import BUNDLES, CONTAINERS, SYSTEM, TASKS

C, T, B, S = CONTAINERS, TASKS, BUNDLES, SYSTEM
CHUNK = 1024 * 1024
STATE = {v: k.removeprefix("CONTAINER_").lower() for k, v in pb.ContainerState.items()}
TASK_STATE = {v: k.removeprefix("TASK_").lower() for k, v in pb.TaskState.items()}

M = TypeVar("M", bound=Message)


@main.group()
@click.option(
    "--socket",
    "quilt_socket",
    metavar="PATH",
    envvar="QUILT_SOCK",
    help="Quilt's socket [env QUILT_SOCK; default ~/.aria/quilt.sock].",
)
@click.pass_obj
def quilt(obj: Context, quilt_socket: str | None) -> None:
    """The container daemon: sandboxes, tasks, bundles."""
    obj.quilt_socket_flag = quilt_socket


@quilt.command("serve")
@CONFIG_OPTION
@settings_options(QUILT_SETTINGS, "quilt")
@click.pass_obj
def quilt_serve(obj: Context, /, config_path: Path | None, **flags: object) -> None:
    """Run quilt in the foreground until SIGTERM or SIGINT.

    Containers are bubblewrap sandboxes (install the `bubblewrap` package); memory and process
    limits use cgroups where they are writable, else rlimits. At SIGTERM it drains calls, stops
    the running containers, and exits 0.
    """
    from aria_trio.quilt.daemon import serve as serve_quilt

    if flags.get("socket") is None and obj.quilt_socket_flag:
        flags["socket"] = obj.quilt_socket_flag
    run_daemon("aria quilt serve", QUILT_SETTINGS, flags, config_path, "quilt", serve_quilt)


def _call(obj: Context, path: str, request: Message, reply: type[M]) -> M:
    """One unary call to quilt, under the group's --timeout."""
    return call(obj, path, request, reply, obj.quilt_socket)


def _container_line(c: pb.Container) -> str:
    command = " ".join(c.spec.command) or "(idle)"
    ending = f"  {c.message}" if c.message else ""
    return f"{c.id}  {STATE[c.state]:<8} {c.spec.name or '-':<12} {command}{ending}"


@quilt.command("create")
@click.option("--name", default="", help="A name to recognise it by.")
@click.option("--image", default="host", show_default=True, help='"host", or the name of an image in --images-dir.')
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", help="An environment variable (repeatable).")
@click.option("--workdir", default="/workspace", show_default=True)
@click.option("--network", is_flag=True, help="Give it the host's network (off by default).")
@click.option("--memory", type=int, default=0, help="Memory limit in bytes (default: quilt's).")
@click.option("--pids", type=int, default=0, help="Process limit (default: quilt's).")
@click.option("--start", "start_now", is_flag=True, help="Start it at once.")
@click.argument("command", nargs=-1)
@click.pass_obj
def create(
    obj: Context,
    name: str,
    image: str,
    env: tuple[str, ...],
    workdir: str,
    network: bool,
    memory: int,
    pids: int,
    start_now: bool,
    command: tuple[str, ...],
) -> None:
    """Create a container whose main process is COMMAND (none: it idles until stopped).

    \b
    Example: aria quilt create --name web --start -- python3 -m http.server
    """
    spec = pb.ContainerSpec(
        name=name,
        image=image,
        command=list(command),
        env=parse_env(env),
        workdir=workdir,
        network=network,
        limits=pb.Limits(memory_bytes=memory, pids=pids),
    )
    c = _call(obj, C + "CreateContainer", pb.CreateContainerRequest(spec=spec), pb.Container)
    if start_now:
        c = _call(obj, C + "StartContainer", pb.ContainerRef(id=c.id), pb.Container)
    show(obj, c, c.id)


@quilt.command("start")
@click.argument("container_id")
@click.pass_obj
def start(obj: Context, container_id: str) -> None:
    """Start a created container."""
    c = _call(obj, C + "StartContainer", pb.ContainerRef(id=container_id), pb.Container)
    show(obj, c, _container_line(c))


@quilt.command("stop")
@click.argument("container_id")
@click.option("--grace", type=float, default=0.0, help="Seconds between SIGTERM and SIGKILL (default: quilt's).")
@click.pass_obj
def stop(obj: Context, container_id: str, grace: float) -> None:
    """Stop a running container: SIGTERM, then SIGKILL after the grace period."""
    c = _call(obj, C + "StopContainer", pb.StopContainerRequest(id=container_id, grace_seconds=grace), pb.Container)
    show(obj, c, _container_line(c))


@quilt.command("rm")
@click.argument("container_id")
@click.option("--force", "-f", is_flag=True, help="Kill it first if it runs.")
@click.pass_obj
def rm(obj: Context, container_id: str, force: bool) -> None:
    """Remove a container, its files and its tasks."""
    _call(
        obj, C + "RemoveContainer", pb.RemoveContainerRequest(id=container_id, force=force), pb.RemoveContainerResponse
    )
    obj.output({"removed": container_id}, f"removed {container_id}")


@quilt.command("ps")
@click.option("--all", "-a", "show_all", is_flag=True, help="Also the ones not running.")
@click.pass_obj
def ps(obj: Context, show_all: bool) -> None:
    """List containers (the running ones, or --all)."""
    states = [] if show_all else [pb.CONTAINER_RUNNING]
    found = _call(obj, C + "ListContainers", pb.ListContainersRequest(states=states), pb.ListContainersResponse)
    show(obj, found, "\n".join(_container_line(c) for c in found.containers) or "(none)")


@quilt.command("inspect")
@click.argument("container_id")
@click.pass_obj
def inspect_(obj: Context, container_id: str) -> None:
    """Show everything about a container."""
    c = _call(obj, C + "GetContainer", pb.ContainerRef(id=container_id), pb.Container)
    obj.output(as_dict(c))


async def _print_lines(lines: AsyncIterable[pb.OutputLine], as_json: bool) -> None:
    async for line in lines:
        if as_json:
            print(json.dumps(as_dict(line)), flush=True)
        else:
            print(line.text, file=sys.stderr if line.stream == pb.STDERR else sys.stdout, flush=True)


@quilt.command("logs")
@click.argument("container_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the container ends.")
@click.pass_obj
def logs(obj: Context, container_id: str, follow: bool) -> None:
    """Print the output of a container's main process."""

    async def stream(channel: Channel) -> None:
        async with channel.call(C + "ContainerLogs", pb.OutputLine) as lines:
            await lines.send(pb.ContainerLogsRequest(id=container_id, follow=follow), end=True)
            await _print_lines(lines, obj.as_json)

    obj.run(stream, obj.quilt_socket)


@quilt.command("exec")
@click.argument("container_id")
@click.argument("command", nargs=-1, required=True)
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE")
@click.option("--timeout", "task_timeout", type=float, default=0.0, help="Kill it after this many seconds.")
@click.option("--detach", "-d", is_flag=True, help="Start it and print its task id; follow with `task-logs -f`.")
@click.pass_obj
def exec_(
    obj: Context, container_id: str, command: tuple[str, ...], env: tuple[str, ...], task_timeout: float, detach: bool
) -> None:
    """Run COMMAND in a running container; its output is printed, its exit code returned."""
    request = pb.ExecRequest(
        container_id=container_id, command=list(command), env=parse_env(env), timeout_seconds=task_timeout
    )
    if detach:
        task = _call(obj, T + "ExecAsync", request, pb.Task)
        show(obj, task, task.id)
        return

    async def run(channel: Channel) -> pb.ExecResult:
        return await channel.unary(T + "Exec", request, pb.ExecResult)  # as long as it takes

    result = obj.run(run, obj.quilt_socket)
    if obj.as_json:
        show(obj, result, "")
    else:
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        if result.task.state != pb.TASK_COMPLETED:
            click.echo(f"[{TASK_STATE[result.task.state]}: {result.task.message}]", err=True)
    sys.exit(0 if result.task.state == pb.TASK_COMPLETED else (result.task.exit_code or 1))


@quilt.command("task")
@click.argument("task_id")
@click.pass_obj
def task(obj: Context, task_id: str) -> None:
    """Show a task's status."""
    t = _call(obj, T + "GetTask", pb.TaskRef(id=task_id), pb.Task)
    show(obj, t, f"{t.id}  {TASK_STATE[t.state]}  {t.message}")


@quilt.command("task-logs")
@click.argument("task_id")
@click.option("--follow", "-f", is_flag=True)
@click.option("--offset", type=int, default=0, help="From this line on.")
@click.pass_obj
def task_logs(obj: Context, task_id: str, follow: bool, offset: int) -> None:
    """Print a task's output."""

    async def stream(channel: Channel) -> None:
        async with channel.call(T + "TaskOutput", pb.OutputLine) as lines:
            await lines.send(pb.TaskOutputRequest(id=task_id, offset=offset, follow=follow), end=True)
            await _print_lines(lines, obj.as_json)

    obj.run(stream, obj.quilt_socket)


@quilt.command("cancel")
@click.argument("task_id")
@click.pass_obj
def cancel(obj: Context, task_id: str) -> None:
    """Kill a task (a no-op when it has ended)."""
    r = _call(obj, T + "CancelTask", pb.TaskRef(id=task_id), pb.CancelTaskResponse)
    show(obj, r, f"{task_id}  {TASK_STATE[r.task.state]}" + ("" if r.cancelled else " (had already ended)"))


@quilt.command("metrics")
@click.pass_obj
def metrics(obj: Context) -> None:
    """Show quilt's counters and the machine's load."""
    m = _call(obj, S + "GetSystemMetrics", pb.GetSystemMetricsRequest(), pb.SystemMetrics)
    obj.output(as_dict(m))


@quilt.group()
def bundle() -> None:
    """Upload, list and remove .aria bundles."""


@bundle.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_obj
def bundle_upload(obj: Context, path: Path) -> None:
    """Upload a bundle (streamed in 1 MiB chunks, with progress on a terminal)."""
    size = path.stat().st_size
    show_progress = sys.stderr.isatty() and not obj.as_json

    async def chunks() -> AsyncIterator[pb.UploadBundleRequest]:
        yield pb.UploadBundleRequest(metadata=pb.BundleMetadata(filename=path.name, size_bytes=size))
        sent, started = 0, time.monotonic()
        async with await trio.open_file(path, "rb") as f:
            while data := await f.read(CHUNK):
                yield pb.UploadBundleRequest(chunk=data)
                sent += len(data)
                if show_progress:
                    rate = sent / max(time.monotonic() - started, 1e-6) / CHUNK
                    click.echo(
                        f"\r{sent * 100 // max(size, 1):3d}%  {sent // CHUNK} / {size // CHUNK} MiB  {rate:.0f} MiB/s",
                        err=True,
                        nl=False,
                    )
        if show_progress:
            click.echo("", err=True)

    async def upload(channel: Channel) -> pb.Bundle:
        return await channel.stream_unary(B + "UploadBundle", chunks(), pb.Bundle)

    b = obj.run(upload, obj.quilt_socket)
    show(obj, b, f"{b.id}  {b.name} {b.version}  {len(b.tools)} tools, {len(b.agents)} agents")


@bundle.command("list")
@click.pass_obj
def bundle_list(obj: Context) -> None:
    """List the stored bundles, newest first."""

    async def everything(channel: Channel) -> list[pb.Bundle]:
        request, reply = pb.ListBundlesRequest(), pb.ListBundlesResponse
        found, _ = await pages(obj, channel, B + "ListBundles", request, reply, lambda page: page.bundles, True)
        return found

    bundles = obj.run(everything, obj.quilt_socket)
    rows = [as_dict(b) for b in bundles]
    obj.output(
        rows,
        "\n".join(f"{b.id[:16]}  {b.name:<20} {b.version:<8} {b.size_bytes:>10}  {b.filename}" for b in bundles)
        or "(none)",
    )


@bundle.command("rm")
@click.argument("bundle_id")
@click.pass_obj
def bundle_rm(obj: Context, bundle_id: str) -> None:
    """Delete a stored bundle."""
    _call(obj, B + "DeleteBundle", pb.BundleRef(id=bundle_id), pb.DeleteBundleResponse)
    obj.output({"removed": bundle_id}, f"removed {bundle_id}")


@bundle.command("run-tool")
@click.argument("bundle_id")
@click.argument("tool")
@click.argument("arguments", default="{}")
@click.pass_obj
def bundle_run_tool(obj: Context, bundle_id: str, tool: str, arguments: str) -> None:
    """Run TOOL of a stored bundle with ARGUMENTS (a JSON object)."""
    r = _call(
        obj,
        B + "RunTool",
        pb.RunToolRequest(bundle_id=bundle_id, tool_name=tool, arguments_json=arguments),
        pb.RunToolResult,
    )
    show(obj, r, r.result_json if r.ok else f"error: {r.error}")
    if not r.ok:
        sys.exit(1)
