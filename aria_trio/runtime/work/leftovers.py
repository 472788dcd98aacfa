"""What a previous runtime left in Quilt when it was stopped half-way: removed at start.

An adopted Quilt keeps everything the last runtime made. Some of it nobody owns any more:
run_command's throw-away containers (their calls ended with that runtime), containers made for
tasks that are over (the runtime died before removing them), and containers a CreateContainer
made in Quilt that the runtime never recorded (it died in between), and bundles Quilt stored for
a runtime's upload that it did not get to register (labelled with their user: others' bundles,
uploaded to Quilt directly, are kept). This runs once, before the
runtime serves and before the task watchers resume (they adopt the containers of unfinished
tasks), so no call of this runtime can be racing it; and again whenever the link to Quilt comes
up anew (a Quilt restarted after a crash holds what its predecessor stored), limited to what was
made before that connection.
"""

from __future__ import annotations

import contextlib

import structlog
import trio

from aria_trio.proto.quilt.v1 import quilt_pb2 as q
from aria_trio.runtime.quilt_client import QuiltLink
from aria_trio.runtime.store import containers as containers_table
from aria_trio.runtime.store import registry as registry_table
from aria_trio.runtime.store import tasks as tasks_table
from aria_trio.shared import errors
from aria_trio.shared.sqlite import Store

log = structlog.get_logger("aria.leftovers")

RETRY_S = 60.0  # a sweep that could not look (quilt down or failing) is tried again after this


def _orphaned(c: q.Container, unfinished_tasks: set[str], recorded: set[str]) -> str | None:
    """Why nobody owns the container any more (None: someone does, or it is not the runtime's)."""
    labels = c.spec.labels
    if labels.get("aria.tool") == "run_command":
        return "a run_command container"
    if "aria.user" not in labels:
        return None  # not made by a runtime (e.g. `aria quilt run`): not ours to judge
    if "aria.task" in labels:
        return None if labels["aria.task"] in unfinished_tasks else "the container of a task that is over"
    if "aria.persistent" in labels and c.id not in recorded:
        return "a container whose creation was never recorded"
    return None


async def remove_leftovers(
    quilt: QuiltLink, store: Store, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Sweep once before the runtime serves, then again at each new connection to Quilt (a
    restarted Quilt keeps what its predecessor had stored, and a create or upload whose answer
    the crash swallowed is in it): only what existed before that connection, so that no call
    made over it can be racing the sweep."""
    ok = quilt.connected() and await _sweep(quilt, store, before_us=None)
    task_status.started()
    while True:
        with trio.move_on_after(float("inf") if ok else RETRY_S):
            await quilt.reconnected()
        if quilt.connected():
            ok = await _sweep(quilt, store, before_us=quilt.connected_at_us)


async def _sweep(quilt: QuiltLink, store: Store, before_us: int | None) -> bool:
    """Remove what nobody owns (made before `before_us`, if given), saying each in the log;
    False if it could not look (tried again later)."""
    try:
        listed = await quilt.list_containers(q.ListContainersRequest(), timeout=30)
        unfinished = {row["id"] for row in await store.run(tasks_table.unfinished)}
        recorded = await store.run(containers_table.ids)
        for c in listed.containers:
            why = _orphaned(c, unfinished, recorded)
            if why is not None and (before_us is None or c.created_at.ToMicroseconds() < before_us):
                with contextlib.suppress(errors.NotFound):  # (its watcher removed it meanwhile)
                    await quilt.remove_container(q.RemoveContainerRequest(id=c.id, force=True))
                log.info("removed what a previous runtime left in quilt", container=c.id, what=why)
        await _remove_unregistered_bundles(quilt, store, before_us)
    except errors.AriaError as exc:
        log.warning("could not look for what a previous runtime left in quilt", error=exc.message)
        return False
    return True


async def _remove_unregistered_bundles(quilt: QuiltLink, store: Store, before_us: int | None) -> None:
    token = ""
    while True:
        page = await quilt.list_bundles(q.ListBundlesRequest(page_size=1000, page_token=token), timeout=30)
        for b in page.bundles:
            if "aria.user" not in b.labels or (before_us is not None and b.created_at.ToMicroseconds() >= before_us):
                continue
            if not await store.run(registry_table.blake3_in_use, b.blake3):
                with contextlib.suppress(errors.NotFound):
                    await quilt.delete_bundle(q.BundleRef(id=b.id))
                log.info("removed what a previous runtime left in quilt", bundle=b.id, what="a bundle never registered")
        token = page.next_page_token
        if not token:
            return
