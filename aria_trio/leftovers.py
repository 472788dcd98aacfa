"""What a previous runtime left in Quilt when it was stopped half-way: removed at start.

An adopted Quilt keeps everything the last runtime made. Some of it nobody owns any more:
run_command's throw-away containers (their calls ended with that runtime), containers made for
tasks that are over (the runtime died before removing them), and containers a CreateContainer
made in Quilt that the runtime never recorded (it died in between), and bundles Quilt stored for
a runtime's upload that it did not get to register (labelled with their user: others' bundles,
uploaded to Quilt directly, are kept). This runs once, before the
runtime serves and before the task watchers resume (they adopt the containers of unfinished
tasks), so no call of this runtime can be racing it.
"""

from __future__ import annotations

from typing import Any

import structlog
import trio

from . import errors
from .proto.quilt.v1 import quilt_pb2 as q
from .quilt_link import QuiltLink
from .store import Store
from .store import containers as containers_table
from .store import registry as registry_table
from .store import tasks as tasks_table

log = structlog.get_logger("aria.leftovers")

QC = "/quilt.v1.Containers/"
QB = "/quilt.v1.Bundles/"


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


async def remove_leftovers(quilt: QuiltLink, store: Store, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Remove every container in Quilt that nobody owns any more, saying each in the log."""
    if quilt.connected():
        try:
            listed = await quilt.unary(
                QC + "ListContainers", q.ListContainersRequest(), q.ListContainersResponse, timeout=30
            )
            unfinished = {row["id"] for row in await store.run(tasks_table.unfinished)}
            recorded = await store.run(containers_table.ids)
            for c in listed.containers:
                why = _orphaned(c, unfinished, recorded)
                if why is not None:
                    await quilt.unary(
                        QC + "RemoveContainer", q.RemoveContainerRequest(id=c.id, force=True), q.RemoveContainerResponse
                    )
                    log.info("removed what a previous runtime left in quilt", container=c.id, what=why)
            await _remove_unregistered_bundles(quilt, store)
        except errors.AriaError as exc:
            log.warning("could not look for what a previous runtime left in quilt", error=exc.message)
    task_status.started()


async def _remove_unregistered_bundles(quilt: QuiltLink, store: Store) -> None:
    token = ""
    while True:
        page = await quilt.unary(
            QB + "ListBundles",
            q.ListBundlesRequest(page_size=1000, page_token=token),
            q.ListBundlesResponse,
            timeout=30,
        )
        for b in page.bundles:
            if "aria.user" in b.labels and not await store.run(registry_table.blake3_in_use, b.blake3):
                await quilt.unary(QB + "DeleteBundle", q.BundleRef(id=b.id), q.DeleteBundleResponse)
                log.info("removed what a previous runtime left in quilt", bundle=b.id, what="a bundle never registered")
        token = page.next_page_token
        if not token:
            return
