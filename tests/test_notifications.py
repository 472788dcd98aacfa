"""The notification broadcaster on a real SQLite store: order, filters, resume, and slow subscribers."""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio

from aria_trio.proto.aria.v1 import notification_pb2 as pb
from aria_trio.runtime.store import open_store
from aria_trio.runtime.work import notifications as notifications_module
from aria_trio.runtime.work.notifications import Notifications


def task_event(i: int) -> pb.TaskStatusEvent:
    return pb.TaskStatusEvent(task_id=f"t-{i}", new_status=2, status_message="running")


async def take(events, count: int) -> list[pb.Notification]:
    got = []
    with trio.fail_after(10):
        async for n in events:
            got.append(n)
            if len(got) == count:
                break
    return got


async def test_live_in_order_filtered_and_per_user(tmp_path):
    store = await open_store(tmp_path / "runtime.db")
    hub = Notifications(store)
    async with AsyncExitStack() as stack:
        everything = await stack.enter_async_context(hub.subscription("ann", [], None))
        tasks_only = await stack.enter_async_context(hub.subscription("ann", ["task_status"], None))
        others = await stack.enter_async_context(hub.subscription("bob", [], None))
        assert hub.subscriber_count() == 3
        await hub.publish("ann", "task_status", task_event(0))
        await hub.publish("ann", "bundle_upload", pb.BundleUploadEvent(bundle_name="b"))
        await hub.publish("ann", "task_status", task_event(1))
        await hub.publish("bob", "task_status", task_event(9))
        got = await take(everything, 3)
        assert [n.sequence for n in got] == [1, 2, 3]
        assert [n.WhichOneof("event_payload") for n in got] == ["task_status", "bundle_upload", "task_status"]
        assert all(n.id and n.timestamp.seconds for n in got)
        assert [n.task_status.task_id for n in await take(tasks_only, 2)] == ["t-0", "t-1"]
        bobs = await take(others, 1)
        assert (bobs[0].sequence, bobs[0].task_status.task_id) == (1, "t-9")  # bob's own sequence
    assert hub.subscriber_count() == 0  # every subscription went away with its block
    # the seed's table keeps type, title, message, metadata and the read flag
    rows = await store.run(lambda db: list(db.query("SELECT type, read FROM notifications WHERE user_id = 'ann'")))
    assert sorted(r["type"] for r in rows) == ["bundle_upload", "task_status", "task_status"]
    assert {r["read"] for r in rows} == {0}
    await store.close()


async def test_resume_replays_what_was_missed_then_goes_live(tmp_path):
    store = await open_store(tmp_path / "runtime.db")
    hub = Notifications(store)
    for i in range(5):
        await hub.publish("ann", "task_status", task_event(i))
    async with hub.subscription("ann", [], 2) as events:
        assert [n.sequence for n in await take(events, 3)] == [3, 4, 5]
        await hub.publish("ann", "task_status", task_event(5))
        live = await take(events, 1)
        assert live[0].sequence == 6 and live[0].task_status.task_id == "t-5"
    async with hub.subscription("ann", [], 1000) as events:  # beyond the last: live from now
        await hub.publish("ann", "task_status", task_event(6))
        assert [n.sequence for n in await take(events, 1)] == [7]
    await store.close()


async def test_a_slow_subscriber_blocks_nobody_and_loses_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(notifications_module, "BUFFER", 8)
    store = await open_store(tmp_path / "runtime.db")
    hub = Notifications(store)
    total = 200
    async with hub.subscription("ann", [], None) as slow, hub.subscription("ann", [], None) as fast:
        fast_got: list[pb.Notification] = []
        async with trio.open_nursery() as nursery:

            async def fast_reader() -> None:
                fast_got.extend(await take(fast, total))

            nursery.start_soon(fast_reader)
            with trio.fail_after(20):  # the slow one's full buffer never holds the publisher up
                for i in range(total):
                    await hub.publish("ann", "task_status", task_event(i))
        got = await take(slow, total)  # it had read nothing: caught up from the store
    assert [n.sequence for n in got] == list(range(1, total + 1))
    assert [n.task_status.task_id for n in got] == [f"t-{i}" for i in range(total)]
    assert [n.sequence for n in fast_got] == list(range(1, total + 1))
    await store.close()
