"""`aria events`: your notifications (task and container statuses, bundle uploads) as they happen."""

from __future__ import annotations

import click

from aria_trio.cli import Context, main
from aria_trio.cli.output import STATUS, each, printer, until_interrupted, when
from aria_trio.proto.aria.v1 import notification_pb2 as notification_pb
from aria_trio.rpc import Channel

NOTIFICATIONS = "/aria.v1.NotificationService/"
EVENT_KINDS = [f.name for f in notification_pb.Notification.DESCRIPTOR.oneofs_by_name["event_payload"].fields]


def _event_details(n: notification_pb.Notification) -> str:
    kind = n.WhichOneof("event_payload")
    if kind == "bundle_upload":
        b = n.bundle_upload
        ending = "ok" if b.success else (f"failed: {b.error_message}" if b.HasField("error_message") else "")
        return " ".join(w for w in (b.bundle_name, f"{b.progress_percent:.0f}%", b.status_message, ending) if w)
    if kind in ("task_status", "container_status"):
        e = n.task_status if kind == "task_status" else n.container_status
        subject = n.task_status.task_id if kind == "task_status" else n.container_status.container_id
        code = f"exit code {e.exit_code}" if e.HasField("exit_code") else ""
        return " ".join(w for w in (subject, STATUS.get(e.new_status, "?"), code, e.status_message) if w)
    return ""


def _render_event(n: notification_pb.Notification) -> None:
    click.echo(f"#{n.sequence} {when(n.timestamp)} {n.WhichOneof('event_payload') or '?'} {_event_details(n)}")


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
        await each(channel, path, request, notification_pb.Notification, printer(obj, _render_event))

    until_interrupted(obj, stream)
