"""What every client verb shares: calling a daemon, and showing its answers to people or as JSON.

Each verb prints text for people, or with `aria --json` the messages as JSON (one object per line
for the streams). Streams that follow end quietly at Ctrl-C (`until_interrupted`). A failed call
reads `error: MESSAGE (CODE, request id ID)` and exits 1 (`Context.run`, `error_line`).
"""

from __future__ import annotations

import datetime
import json
import shlex
import signal
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

import click
import trio
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

from aria_trio.proto.aria.v1 import aria_pb2
from aria_trio.rpc import Channel, RpcError
from aria_trio.shared.json_input import JSON

if TYPE_CHECKING:
    from aria_trio.cli import Context

T = TypeVar("T")
M = TypeVar("M", bound=Message)
I = TypeVar("I")  # noqa: E741  (an item of a listing)

STATUS = {value: name.lower() for name, value in aria_pb2.TaskStatus.items() if value}
"""aria.v1's task and container statuses as the verbs print (and --status takes) them."""


# -- calls ----------------------------------------------------------------------------------------


def call(obj: Context, path: str, request: Message, reply: type[M], socket: str | None = None) -> M:
    """One unary call (to the runtime, or `socket`), under the group's --timeout."""

    async def unary(channel: Channel) -> M:
        return await channel.unary(path, request, reply, timeout=obj.timeout)

    return obj.run(unary, socket)


async def each(channel: Channel, path: str, request: Message, reply: type[M], handle: Callable[[M], None]) -> None:
    """A server stream: `handle` each message until the server ends it (no deadline: it may follow)."""
    async with channel.call(path, reply) as stream:
        await stream.send(request, end=True)
        async for message in stream:
            handle(message)


class PageRequest(Protocol):
    page_token: str


class Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


P = TypeVar("P", bound=Page)


async def pages(
    obj: Context,
    channel: Channel,
    path: str,
    request: PageRequest,
    reply: type[P],
    items: Callable[[P], Iterable[I]],
    every_page: bool,
) -> tuple[list[I], str]:
    """A listing's items (those of its first page, or of every page) and the next page's token."""
    found: list[I] = []
    while True:
        page = await channel.unary(path, request, reply, timeout=obj.timeout)
        found.extend(items(page))
        request.page_token = page.next_page_token
        if not (every_page and page.next_page_token):
            return found, page.next_page_token


def until_interrupted(obj: Context, fn: Callable[[Channel], Awaitable[T]]) -> T | None:
    """obj.run(fn), except that Ctrl-C (SIGINT) stops it quietly: None then."""

    async def watch(scope: trio.CancelScope, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
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


def error_line(exc: RpcError) -> str:
    """How `aria` reports a failed call: `error: MESSAGE (CODE, request id ID)`."""
    info = exc.error_info()
    request_id = info.metadata.get("request_id", "") if info is not None else ""
    return f"error: {exc.message} ({exc.code.name}{f', request id {request_id}' if request_id else ''})"


# -- showing --------------------------------------------------------------------------------------


def as_dict(message: Message) -> dict[str, JSON]:
    """A message as --json prints it (the .proto's field names)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def show(obj: Context, message: Message, text: str) -> None:
    obj.output(as_dict(message), text)


def show_list(obj: Context, messages: Iterable[Message], text: str) -> None:
    obj.output([as_dict(m) for m in messages], text)


def printer(obj: Context, render: Callable[[M], None]) -> Callable[[M], None]:
    """How a stream's messages are shown: a JSON object a line with --json, else `render`."""
    if obj.as_json:
        return lambda message: click.echo(json.dumps(as_dict(message), sort_keys=True))
    return render


def when(ts: timestamp_pb2.Timestamp) -> str:
    """A timestamp in local time, "-" when unset."""
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime(tzinfo=datetime.UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def table(header: Sequence[str], rows: Iterable[Sequence[str]], empty: str = "(none)") -> str:
    """Columns padded to their widest cell; the last one is left ragged."""
    lines = [list(header), *(list(r) for r in rows)]
    if len(lines) == 1:
        return empty
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(line, widths, strict=False)), line[-1]]).rstrip()
        for line in lines
    )


def fields(pairs: Iterable[tuple[str, str]]) -> str:
    """`name  value` lines, aligned, leaving out the empty values."""
    kept = [(name, value) for name, value in pairs if value]
    width = max((len(name) for name, _ in kept), default=0)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in kept)


def env_text(env: Iterable[tuple[str, str]]) -> str:
    """KEY=VALUE pairs as a shell would take them, sorted."""
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env))


# -- arguments ------------------------------------------------------------------------------------


def parse_env(pairs: Iterable[str]) -> dict[str, str]:
    """--env KEY=VALUE options (repeatable) as a dict; a pair without `=` or key is a usage error."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--env")
        out[key] = value
    return out
