"""BundleService uploads through the runtime to Quilt, and the registry they fill; every bad input."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import grpc
import pytest

from aria_trio.proto.aria.v1 import bundle_pb2 as pb

import bundles
from aria_client import BUNDLES, AriaClient, as_other_user, bad_fields

TWO_TOOLS = bundles.manifest(
    name="helper",
    tools=[
        {"name": "add", "description": "Adds two numbers", "inputs": {"a": "number", "b": "number"}},
        {
            "name": "shout",
            "description": "Upper-cases text",
            "inputs": {
                "type": "object",
                "properties": {"text": {"type": "string", "maxLength": 100}},
                "required": ["text"],
            },
        },
    ],
    agents=[{"name": "Helper", "description": "Adds and shouts", "tools": ["add", "shout"]}],
)


def meta(data: bytes, name: str = "helper.aria", **kw) -> pb.UploadBundleRequest:
    return pb.UploadBundleRequest(metadata=pb.BundleMetadata(name=name, total_size_bytes=len(data), **kw))


def chunk(data: bytes) -> pb.UploadBundleRequest:
    return pb.UploadBundleRequest(chunk=data)


def upload_events(c: AriaClient, name: str) -> list:
    found = []
    for n in c.events(timeout=5, after_sequence=0, event_types=["bundle_upload"]):
        if n.bundle_upload.bundle_name == name:
            found.append(n.bundle_upload)
            if n.bundle_upload.success or n.bundle_upload.HasField("error_message"):
                return found
    raise AssertionError(found)


def leftovers(daemon) -> list:
    return list((daemon.data_dir / "quilt").rglob("*.part"))


def test_an_agent_and_two_tools_registered_with_their_schemas(daemon):
    c = AriaClient(daemon.channel())
    data = bundles.flat(TWO_TOOLS)
    reply = c.upload_bytes(data, name="helper.aria", chunk=1000)
    assert reply.success and reply.bundle_id.startswith("b-") and not reply.HasField("error_message")

    assert [(a.agent_id, a.name) for a in c.agents()] == [("default", "Default agent"), ("Helper", "Helper")]
    helper = c.agent("Helper")
    assert helper.description == "Adds and shouts"
    schemas = {t.name: json.loads(t.parameters_json_schema) for t in helper.tools}
    assert schemas == {
        "add": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
        "shout": {
            "type": "object",
            "properties": {"text": {"type": "string", "maxLength": 100}},
            "required": ["text"],
        },
    }
    assert [t.name for t in c.tools()] == ["run_command", "launch_task", "add", "shout"]
    default = c.agent("default")
    assert [t.name for t in default.tools] == ["run_command", "launch_task"]
    assert json.loads(default.tools[0].parameters_json_schema)["required"] == ["command"]

    events = upload_events(c, "helper.aria")
    assert events[0].status_message == "upload started" and events[-1].success
    assert events[-1].progress_percent == 100.0
    percents = [e.progress_percent for e in events]
    assert percents == sorted(percents)
    assert len(events) <= 2 + 20 + 1  # throttled: at most every 5% (the upload took well under 250 ms a step)

    # the same bytes again: the same bundle; another user sees none of it
    assert c.upload_bytes(data, name="helper.aria").bundle_id == reply.bundle_id
    assert as_other_user(daemon, "assert [a.agent_id for a in c.agents()] == ['default']") == "OK"
    assert as_other_user(daemon, "c.agent('Helper')") == "NOT_FOUND"


def test_a_newer_bundle_takes_over_a_tool_name(daemon):
    c = AriaClient(daemon.channel())
    c.upload_bytes(bundles.flat(TWO_TOOLS))
    newer = dict(TWO_TOOLS, name="other", agents=[], tools=[{"name": "add", "description": "v2", "inputs": {}}])
    c.upload_bytes(bundles.flat(newer), name="other.aria")
    assert {t.name: t.description for t in c.tools()}["add"] == "v2"
    assert len(c.tools()) == 4


def rejected(c: AriaClient, messages) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        c.upload(messages)
    return info.value


def test_bad_uploads_register_nothing_and_leave_nothing(daemon):
    c = AriaClient(daemon.channel())
    data = bundles.flat(TWO_TOOLS)
    half = len(data) // 2
    broken = bundles.flat(raw_manifest=b"{")
    shadow = bundles.flat(
        dict(TWO_TOOLS, tools=[{"name": "run_command", "description": "", "inputs": {}}], agents=[]),
        files={"implementations/tools/run_command.py": "def run_command():\n    return 1\n"},
    )
    cases = {
        "chunk before metadata": [chunk(data), meta(data)],
        "nothing at all": [],
        "a second metadata": [meta(data), chunk(data[:half]), meta(data), chunk(data[half:])],
        "more bytes than declared": [meta(data), chunk(data), chunk(b"x")],
        "fewer bytes than declared": [meta(data), chunk(data[:half])],
        "wrong checksum": [meta(data, sha256_checksum=hashlib.sha256(b"other").hexdigest()), chunk(data)],
        "malformed checksum": [meta(data, sha256_checksum="abc"), chunk(data)],
        "no name": [meta(data, name=""), chunk(data)],
        "invalid manifest": [meta(broken), chunk(broken)],
        "not a zip": [meta(b"not a zip"), chunk(b"not a zip")],
        "shadows a built-in tool": [meta(shadow), chunk(shadow)],
    }
    problems = {}
    for case, messages in cases.items():
        err = rejected(c, messages)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, err.details())
        problems[case] = err.details()
    assert "first message" in problems["chunk before metadata"]
    assert "metadata" in problems["a second metadata"]
    assert "more bytes" in problems["more bytes than declared"]
    assert "ended after" in problems["fewer bytes than declared"]
    assert "sha256" in problems["wrong checksum"].lower()
    assert "reserved" in problems["shadows a built-in tool"]
    assert [a.agent_id for a in c.agents()] == ["default"]
    assert [t.name for t in c.tools()] == ["run_command", "launch_task"]
    assert leftovers(daemon) == []
    assert bad_fields(rejected(c, cases["fewer bytes than declared"])) == ["metadata.total_size_bytes"]


def stalled_upload(c: AriaClient, first: list[pb.UploadBundleRequest]) -> tuple[grpc.Future, threading.Event]:
    """An upload that sends `first`, then stalls (until the event is set) without ending."""
    release = threading.Event()

    def messages():
        yield from first
        release.wait(30)

    fn = c.channel.stream_unary(
        BUNDLES + "UploadBundle", pb.UploadBundleRequest.SerializeToString, pb.UploadBundleResponse.FromString
    )
    return fn.future(messages(), timeout=60), release


def test_too_large_is_refused_at_once_while_the_client_still_sends(daemon):
    c = AriaClient(daemon.channel())
    huge = pb.UploadBundleRequest(metadata=pb.BundleMetadata(name="huge.aria", total_size_bytes=10 * 1024**3))
    future, release = stalled_upload(c, [huge, chunk(b"x" * 1000)])
    try:
        err = future.exception(timeout=10)  # Quilt's refusal ends the call; the client never finished
    finally:
        release.set()
    assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at most" in err.details()
    assert upload_events(c, "huge.aria")[-1].error_message


def test_a_client_that_disconnects_mid_upload(daemon):
    c = AriaClient(daemon.channel())
    data = bundles.flat(TWO_TOOLS) + b"\0" * (4 * 1024 * 1024)
    future, release = stalled_upload(c, [meta(data, name="gone.aria"), chunk(data[: 1024 * 1024])])
    deadline = time.monotonic() + 10
    while not leftovers(daemon) and time.monotonic() < deadline:
        time.sleep(0.02)  # until Quilt has a temp file with the first chunk
    assert leftovers(daemon)
    future.cancel()
    release.set()

    events = upload_events(c, "gone.aria")
    assert not events[-1].success and events[-1].error_message == "the upload was interrupted"
    deadline = time.monotonic() + 10
    while leftovers(daemon) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers(daemon) == []
    assert [a.agent_id for a in c.agents()] == ["default"]
