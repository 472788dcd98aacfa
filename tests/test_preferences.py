"""UserPreferenceService end to end (grpcio client, real daemon, real SQLite), and its rules."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aria_trio.proto.aria.v1 import user_preference_pb2 as pb
from aria_trio.runtime.access.preferences import MAX_BYTES, Preferences
from aria_trio.runtime.store import open_store
from aria_trio.shared import errors

from conftest import start_daemon

SVC = "/aria.v1.UserPreferenceService/"


def update(ch, updates):
    s = struct_pb2.Struct()
    s.update(updates)
    call = ch.unary_unary(
        SVC + "UpdateUserPreferences", pb.UpdateUserPreferencesRequest.SerializeToString, pb.UserPreferences.FromString
    )
    return json_format.MessageToDict(call(pb.UpdateUserPreferencesRequest(updates=s), timeout=5).preferences)


def get(ch):
    call = ch.unary_unary(
        SVC + "GetUserPreferences", pb.GetUserPreferencesRequest.SerializeToString, pb.UserPreferences.FromString
    )
    return json_format.MessageToDict(call(pb.GetUserPreferencesRequest(), timeout=5).preferences)


def rejected(ch, updates):
    with pytest.raises(grpc.RpcError) as info:
        update(ch, updates)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = []
    for detail in rpc_status.from_call(err).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
    return err.details(), fields


def test_partial_updates_replace_and_null_removes(daemon):
    with daemon.channel() as ch:
        assert get(ch) == {}
        assert update(ch, {"llm.model": "llama3.1", "ui.theme": "dark", "ui.layout": {"panes": [1, 2]}}) == {
            "llm.model": "llama3.1",
            "ui.theme": "dark",
            "ui.layout": {"panes": [1.0, 2.0]},
        }
        assert update(ch, {"ui.theme": "light", "llm.temperature": 0.7}) == {
            "llm.model": "llama3.1",
            "ui.theme": "light",
            "ui.layout": {"panes": [1.0, 2.0]},
            "llm.temperature": 0.7,
        }
        assert update(ch, {"ui.layout": None, "never.set": None}) == {
            "llm.model": "llama3.1",
            "ui.theme": "light",
            "llm.temperature": 0.7,
        }
        assert get(ch) == {"llm.model": "llama3.1", "ui.theme": "light", "llm.temperature": 0.7}


@pytest.mark.parametrize(
    ("updates", "key", "words"),
    [
        ({"llm.model": 3}, "llm.model", "must be a string"),
        ({"llm.temperature": 2.5}, "llm.temperature", "between 0 and 2"),
        ({"llm.temperature": "hot"}, "llm.temperature", "must be a number"),
        ({"llm.temperature": True}, "llm.temperature", "must be a number"),
        ({"llm.system_prompt": "x" * (32 * 1024 + 1)}, "llm.system_prompt", "at most 32768"),
        ({"llm.base_url": "ftp://example.com"}, "llm.base_url", "http:// or https://"),
        ({"llm.base_url": "http://"}, "llm.base_url", "http:// or https://"),
        ({"llm.api_key": 42}, "llm.api_key", "must be a string"),
        ({"llm.modle": "x"}, "llm.modle", "unknown model setting"),
        ({"llm": {"model": "x"}}, "llm", "flat keys"),
        ({"": 1}, "", "characters long"),
    ],
)
def test_known_keys_are_checked(module_daemon, updates, key, words):
    # (the module's daemon: these refusals are the only tests there, and none of them may keep anything)
    with module_daemon.channel() as ch:
        message, fields = rejected(ch, updates)
        assert words in message
        assert fields == [f"updates.{key}"]
        assert get(ch) == {}  # nothing of a rejected update is kept


def test_valid_llm_settings_are_accepted(daemon):
    good = {
        "llm.model": "gpt-4o-mini",
        "llm.temperature": 0,
        "llm.system_prompt": "You are terse." * 100,
        "llm.base_url": "http://127.0.0.1:11434/v1",
    }
    with daemon.channel() as ch:
        assert update(ch, good) == {**good, "llm.temperature": 0.0}
        assert update(ch, {"llm.base_url": "https://api.openai.com/v1"})["llm.base_url"] == "https://api.openai.com/v1"


def test_api_key_is_stored_but_only_shown_masked(daemon):
    with daemon.channel() as ch:
        assert update(ch, {"llm.api_key": "sk-live-0123456789abcdef"})["llm.api_key"] == "****cdef"
        assert get(ch)["llm.api_key"] == "****cdef"
        assert update(ch, {"llm.api_key": "short"})["llm.api_key"] == "****"
    stored = daemon.data_dir / "runtime.db"
    import sqlite3

    row = sqlite3.connect(stored).execute("SELECT preferences_json FROM user_preferences").fetchone()
    assert '"llm.api_key":"short"' in row[0]  # the runtime can use it; clients never see it


def test_64_kib_cap_per_user(daemon):
    with daemon.channel() as ch:
        update(ch, {"a": "x" * 40_000})
        message, fields = rejected(ch, {"b": "y" * 30_000})
        assert "at most 65536" in message and fields == ["updates"]
        assert set(get(ch)) == {"a"}
        update(ch, {"a": None, "b": "y" * 30_000})  # room again once "a" goes


def test_preferences_survive_a_restart(sock_dir):
    first = start_daemon(sock_dir)
    with first.channel() as ch:
        update(ch, {"llm.model": "qwen2.5", "llm.api_key": "sk-0123456789abcdef"})
    assert first.stop() == 0
    second = start_daemon(sock_dir)
    try:
        with second.channel() as ch:
            assert get(ch) == {"llm.model": "qwen2.5", "llm.api_key": "****cdef"}
    finally:
        assert second.stop() == 0


async def test_each_user_has_their_own_document(tmp_path):
    store = await open_store(tmp_path / "p.db")
    try:
        prefs = Preferences(store)
        await prefs.update("alice", {"llm.model": "a"})
        await prefs.update("bob", {"llm.model": "b", "ui.x": 1})
        assert await prefs.get("alice") == {"llm.model": "a"}
        assert await prefs.get("bob") == {"llm.model": "b", "ui.x": 1}
        fresh = Preferences(store)  # no cache: straight from SQLite
        assert await fresh.get("alice") == {"llm.model": "a"}
        assert await fresh.get("carol") == {}
        with pytest.raises(errors.InvalidArgument):
            await fresh.update("alice", {"z": "x" * MAX_BYTES})
        assert await fresh.get("alice") == {"llm.model": "a"}
    finally:
        await store.close()
