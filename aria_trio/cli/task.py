"""`aria task ...`: launch commands in containers as tasks; follow, list and cancel them."""

from __future__ import annotations

import json
import shlex
import sys

import click

from aria_trio.cli import Context, main
from aria_trio.cli.output import (
    STATUS,
    call,
    each,
    env_text,
    fields,
    pages,
    parse_env,
    printer,
    show,
    show_list,
    table,
    until_interrupted,
    when,
)
from aria_trio.proto.aria.v1 import aria_pb2
from aria_trio.proto.aria.v1 import task_pb2 as task_pb
from aria_trio.rpc import Channel

TASKS = "/aria.v1.TaskService/"


@main.group()
def task() -> None:
    """Run commands in containers; follow, list and cancel them."""


def _command_text(command_json: str) -> str:
    try:
        argv = json.loads(command_json)
        return shlex.join(argv) if isinstance(argv, list) else command_json
    except (ValueError, TypeError):
        return command_json


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
    return fields(
        [
            ("id", t.id),
            ("status", _outcome(t)),
            ("type", t.type),
            ("command", _command_text(t.command_json)),
            ("environment", env_text(t.environment.items())),
            ("timeout", f"{t.timeout_seconds}s" if t.timeout_seconds else ""),
            ("session", t.session_id),
            ("container", t.container_id),
            ("parent", t.parent_task_id),
            ("progress", progress or t.current_operation),
            ("created", when(t.created_at)),
            ("started", when(t.started_at) if t.HasField("started_at") else ""),
            ("completed", when(t.completed_at) if t.HasField("completed_at") else ""),
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
    await each(channel, TASKS + "StreamTaskOutput", request, task_pb.TaskOutput, printer(obj, _render_output))


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
        reply = call(obj, TASKS + "LaunchTask", request, task_pb.LaunchTaskResponse)
        show(obj, reply, reply.task_id)
        return
    launched: list[str] = []

    async def launch_and_follow(channel: Channel) -> task_pb.Task:
        reply = await channel.unary(TASKS + "LaunchTask", request, task_pb.LaunchTaskResponse, timeout=obj.timeout)
        launched.append(reply.task_id)
        if obj.as_json:
            show(obj, reply, "")
        else:
            click.echo(f"task {reply.task_id}", err=True)
        await _task_output(obj, channel, reply.task_id, follow=True)
        get = task_pb.GetTaskRequest(task_id=reply.task_id)
        return await channel.unary(TASKS + "GetTask", get, task_pb.Task, timeout=obj.timeout)

    final = until_interrupted(obj, launch_and_follow)
    if final is None:
        if launched:
            click.echo(f"detached: task {launched[0]} goes on (aria task logs -f {launched[0]})", err=True)
        sys.exit(130)
    if obj.as_json:
        show(obj, final, "")
    else:
        click.echo(f"task {final.id} {_outcome(final)}", err=True)
    sys.exit(_exit_status(final))


@task.command("get")
@click.argument("task_id")
@click.pass_obj
def task_get(obj: Context, task_id: str) -> None:
    """Show a task: its status, exit code, progress and times."""
    t = call(obj, TASKS + "GetTask", task_pb.GetTaskRequest(task_id=task_id), task_pb.Task)
    show(obj, t, _task_text(t))


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

    async def listing(channel: Channel) -> tuple[list[task_pb.Task], str]:
        path, reply = TASKS + "ListTasks", task_pb.ListTasksResponse
        return await pages(obj, channel, path, request, reply, lambda page: page.tasks, every_page)

    tasks, more = obj.run(listing)
    rows = ((t.id, STATUS.get(t.status, "?"), when(t.created_at), t.type, _command_text(t.command_json)) for t in tasks)
    show_list(obj, tasks, table(("ID", "STATUS", "CREATED", "TYPE", "COMMAND"), rows, "(no tasks)"))
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

    until_interrupted(obj, stream)


@task.command("cancel")
@click.argument("task_id")
@click.pass_obj
def task_cancel(obj: Context, task_id: str) -> None:
    """Cancel a task (nothing happens if it has already ended)."""
    r = call(obj, TASKS + "CancelTask", task_pb.CancelTaskRequest(task_id=task_id), task_pb.CancelTaskResponse)
    text = "cancellation initiated" if r.cancellation_initiated else "not cancelled: it has already ended"
    obj.output({"task_id": task_id, "cancellation_initiated": r.cancellation_initiated}, f"{task_id}: {text}")
