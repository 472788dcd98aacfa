"""ListTasks: filters in SQL, newest first, keyset pages with tokens that cannot be forged or reused."""

from __future__ import annotations

import grpc
import pytest
import trio

from aria_trio.proto.aria.v1 import aria_pb2
from aria_trio.runtime.store import open_store
from aria_trio.runtime.store import tasks as table

from aria_client import AriaClient, bad_fields
from conftest import start_daemon

SEEDED = 1200


def seed(data_dir) -> None:
    """Finished tasks of root, written with the store's own code, before the daemon starts."""

    async def write() -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        store = await open_store(data_dir / "runtime.db")
        for i in range(SEEDED):
            row = {
                "id": f"t-seed{i:05d}",
                "user_id": "root",
                "session_id": "s-a" if i % 2 else "",
                "type": "container:run",
                "command_json": '["true"]',
                "status": aria_pb2.FAILED if i % 3 == 0 else aria_pb2.COMPLETED,
                "created_at": 1_700_000_000_000_000 + i // 2,  # pairs share a time: the id breaks the tie
            }
            await store.run(table.insert, row, "seeded")
        await store.close()

    trio.run(write)


@pytest.fixture
def seeded(sock_dir):
    seed(sock_dir / "data")
    d = start_daemon(sock_dir)
    yield d
    d.stop()


def all_pages(c: AriaClient, **kw) -> list[list[str]]:
    pages, token = [], ""
    while True:
        reply = c.list_tasks(page_token=token, **kw)
        pages.append([t.id for t in reply.tasks])
        token = reply.next_page_token
        if not token:
            return pages


def test_sizes_order_and_filters(seeded):
    c = AriaClient(seeded.channel())
    assert len(c.list_tasks().tasks) == 50  # the default
    assert len(c.list_tasks(page_size=5000).tasks) == 1000  # clamped
    pages = all_pages(c, page_size=1000)
    ids = [i for p in pages for i in p]
    expected = [f"t-seed{i:05d}" for i in reversed(range(SEEDED))]  # newest first, ties by id
    assert [len(p) for p in pages] == [1000, 200] and ids == expected
    failed = [i for p in all_pages(c, page_size=100, filter_by_status=[aria_pb2.FAILED]) for i in p]
    assert failed == [f"t-seed{i:05d}" for i in reversed(range(SEEDED)) if i % 3 == 0]
    session = [
        i for p in all_pages(c, page_size=77, session_id="s-a", filter_by_status=[aria_pb2.COMPLETED]) for i in p
    ]
    assert session == [f"t-seed{i:05d}" for i in reversed(range(SEEDED)) if i % 2 and i % 3]
    assert c.list_tasks(session_id="s-none").tasks == []


def test_no_duplicates_or_gaps_while_tasks_are_added(seeded):
    c = AriaClient(seeded.channel())
    seen, token, launched = [], "", []
    while True:
        reply = c.list_tasks(page_size=97, page_token=token)
        seen += [t.id for t in reply.tasks]
        launched.append(c.launch(["true"]))  # newer than everything listed so far
        token = reply.next_page_token
        if not token:
            break
    # every seeded task exactly once; the new ones sort before page 1, so no page shows them
    assert sorted(seen) == sorted(f"t-seed{i:05d}" for i in range(SEEDED))
    assert [t.id for t in c.list_tasks(page_size=len(launched)).tasks] == launched[::-1]
    for task_id in launched:
        c.wait_task(task_id)


def test_bad_tokens_and_sizes(seeded):
    c = AriaClient(seeded.channel())
    token = c.list_tasks(page_size=10).next_page_token
    body, sig = token.split(".")
    forged_body = body[:-2] + ("AA" if body[-2:] != "AA" else "BB")
    cases = {
        "tampered": forged_body + "." + sig,
        "garbage": "not-a-token",
        "truncated": token[:-3],
        "empty signature": body + ".",
    }
    for name, bad in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            c.list_tasks(page_size=10, page_token=bad)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert bad_fields(info.value) == ["page_token"], name
        assert "invalid page token" in info.value.details()
    for other_filter in (
        {"page_size": 10, "session_id": "s-a"},
        {"page_size": 10, "filter_by_status": [aria_pb2.FAILED]},
    ):
        with pytest.raises(grpc.RpcError) as info:
            c.list_tasks(page_token=token, **other_filter)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "different query" in info.value.details()
    assert len(c.list_tasks(page_size=20, page_token=token).tasks) == 20  # the size may change
    with pytest.raises(grpc.RpcError) as info:
        c.list_tasks(page_size=-1)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(info.value) == ["page_size"]
    with pytest.raises(grpc.RpcError) as info:
        c.list_tasks(filter_by_status=[42])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
