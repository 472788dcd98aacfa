"""The bundle store: streamed, verified, content-addressed uploads; and bad ones refused cleanly."""

from __future__ import annotations

import hashlib
import json

import blake3
import grpc
import pytest

from aria_trio.proto.quilt.v1 import quilt_pb2 as pb

from bundles import flat, manifest, nested
from conftest import start_quilt
from quilt_client import B, QuiltClient, error_of

CHUNK = 64 * 1024


@pytest.fixture
def q(quilt):
    with quilt.channel() as ch:
        yield QuiltClient(ch)


def messages(data: bytes, *, size: int | None = None, sha256: str = "", checksum=None, filename="calc.aria"):
    yield pb.UploadBundleRequest(
        metadata=pb.BundleMetadata(filename=filename, size_bytes=len(data) if size is None else size, sha256=sha256)
    )
    for i in range(0, len(data), CHUNK):
        yield pb.UploadBundleRequest(chunk=data[i : i + CHUNK])
    if checksum is not None:
        yield pb.UploadBundleRequest(checksum=checksum)


def upload(q: QuiltClient, requests) -> pb.Bundle:
    call = q.channel.stream_unary(B + "UploadBundle", pb.UploadBundleRequest.SerializeToString, pb.Bundle.FromString)
    return call(requests, timeout=60)


def refused(q, requests):
    err = error_of(upload, q, requests)
    return err.code(), err.details()


def incoming_is_empty(quilt) -> bool:
    folder = quilt.data_dir / "bundles" / "incoming"
    return not folder.exists() or not any(folder.iterdir())


def test_flat_and_nested_uploads(q, quilt):
    data = flat()
    b = upload(
        q,
        messages(
            data,
            sha256=hashlib.sha256(data).hexdigest(),
            checksum=pb.BundleChecksum(blake3=blake3.blake3(data).hexdigest()),
        ),
    )
    assert b.id == blake3.blake3(data).hexdigest() == b.blake3 and b.sha256 == hashlib.sha256(data).hexdigest()
    assert (b.name, b.version, b.layout, b.size_bytes, b.filename) == ("calc", "1.0.0", "flat", len(data), "calc.aria")
    add = next(t for t in b.tools if t.name == "add")
    assert json.loads(add.input_schema_json) == {
        "type": "object",
        "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    assert (add.runtime, add.entry) == ("python", "implementations/tools/add.py")
    assert [(a.name, list(a.tools), a.max_iterations) for a in b.agents] == [("Calculator", ["add"], 4)]
    stored = quilt.data_dir / "bundles" / "objects" / b.id[:2] / f"{b.id}.aria"
    assert stored.read_bytes() == data

    n = upload(q, messages(nested(), filename="weather.aria"))
    assert (n.name, n.layout) == ("weather", "nested")
    assert [(t.name, t.runtime, t.entry) for t in n.tools] == [
        ("forecast", "node", "implementations/tools/forecast.js")
    ]
    assert incoming_is_empty(quilt)


def test_the_same_bytes_are_stored_once(q, quilt):
    data = flat()
    first = upload(q, messages(data, filename="one.aria"))
    second = upload(q, messages(data, filename="two.aria"))
    assert first.id == second.id and second.filename == "one.aria"
    listed = q.call(B + "ListBundles", pb.ListBundlesRequest(), pb.ListBundlesResponse)
    assert [b.id for b in listed.bundles] == [first.id]
    assert len(list((quilt.data_dir / "bundles" / "objects").rglob("*.aria"))) == 1


def test_get_list_pages_delete_validate(q, quilt):
    ids = [upload(q, messages(flat(manifest(f"b{i}")))).id for i in range(3)]
    assert q.call(B + "GetBundle", pb.BundleRef(id=ids[1]), pb.Bundle).name == "b1"
    seen, token = [], ""
    while True:
        page = q.call(B + "ListBundles", pb.ListBundlesRequest(page_size=2, page_token=token), pb.ListBundlesResponse)
        assert len(page.bundles) <= 2
        seen += [b.id for b in page.bundles]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(ids))  # newest first, no duplicates, no gaps
    bad = error_of(q.call, B + "ListBundles", pb.ListBundlesRequest(page_token="garbage!"), pb.ListBundlesResponse)
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT

    ok = q.call(B + "ValidateBundle", pb.BundleRef(id=ids[0]), pb.ValidateBundleResponse)
    assert ok.valid and ok.error == ""
    path = quilt.data_dir / "bundles" / "objects" / ids[0][:2] / f"{ids[0]}.aria"
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    damaged = q.call(B + "ValidateBundle", pb.BundleRef(id=ids[0]), pb.ValidateBundleResponse)
    assert not damaged.valid and "damaged" in damaged.error

    q.call(B + "DeleteBundle", pb.BundleRef(id=ids[2]), pb.DeleteBundleResponse)
    assert error_of(q.call, B + "GetBundle", pb.BundleRef(id=ids[2]), pb.Bundle).code() == grpc.StatusCode.NOT_FOUND
    assert not (quilt.data_dir / "bundles" / "objects" / ids[2][:2] / f"{ids[2]}.aria").exists()


def test_bad_uploads_get_the_right_status_and_leave_nothing(q, quilt):
    data = flat()

    def chunk_first():
        yield pb.UploadBundleRequest(chunk=b"PK\x03\x04")

    assert refused(q, chunk_first())[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, words = refused(q, messages(data, sha256="0" * 64))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "sha256 checksum mismatch" in words
    code, words = refused(q, messages(data, checksum=pb.BundleChecksum(blake3="ab" * 32)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "blake3 checksum mismatch" in words
    code, words = refused(q, messages(data, size=len(data) + 1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "size mismatch" in words
    code, words = refused(q, messages(data, size=len(data) - 1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "more bytes than" in words
    escaping = flat(files={"../x": "oops"})
    code, words = refused(q, messages(escaping))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'../x' escapes the archive" in words
    nameless = manifest()
    del nameless["name"]
    code, words = refused(q, messages(flat(nameless)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "missing name" in words
    stranger = manifest(agents=[{"name": "A", "description": "", "tools": ["add", "teleport"]}])
    code, words = refused(q, messages(flat(stranger)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'teleport', which the bundle does not define" in words
    twice = manifest(tools=manifest()["tools"] + [manifest()["tools"][0]])
    assert "used twice" in refused(q, messages(flat(twice)))[1]
    assert "not JSON" in refused(q, messages(flat(raw_manifest=b"{nope")))[1]
    assert "not a ZIP" in refused(q, messages(b"just some bytes"))[1]
    assert "build_hash does not match" in refused(q, messages(nested(build_hash="00" * 32)))[1]
    assert incoming_is_empty(quilt)
    listed = q.call(B + "ListBundles", pb.ListBundlesRequest(), pb.ListBundlesResponse)
    assert list(listed.bundles) == []  # nothing registered


def test_size_cap_is_resource_exhausted(sock_dir):
    quilt = start_quilt(sock_dir, "--max-bundle-bytes", "100000")
    try:
        with quilt.channel() as ch:
            q = QuiltClient(ch)
            code, words = refused(q, messages(b"x" * 10, size=200_000))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 100000" in words
            assert incoming_is_empty(quilt)
    finally:
        quilt.stop()


def test_an_interrupted_upload_leaves_nothing_behind(q, quilt):
    data = flat() + b"\0" * (2 * 1024 * 1024)  # (the size check comes after the bytes: it never gets there)

    def stalls():
        yield pb.UploadBundleRequest(metadata=pb.BundleMetadata(filename="x.aria", size_bytes=len(data) * 2))
        for i in range(0, len(data), CHUNK):
            yield pb.UploadBundleRequest(chunk=data[i : i + CHUNK])
        import time

        time.sleep(5)  # the client's deadline ends the call mid-upload

    call = q.channel.stream_unary(B + "UploadBundle", pb.UploadBundleRequest.SerializeToString, pb.Bundle.FromString)
    with pytest.raises(grpc.RpcError) as info:
        call(stalls(), timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    import time

    deadline = time.monotonic() + 5
    while not incoming_is_empty(quilt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert incoming_is_empty(quilt)


def test_a_batch_of_chunks_is_hashed_and_written_in_order(tmp_path):
    """The worker thread takes several chunks at once: hashed and written as if one by one."""
    from aria_trio.quilt.bundles import _Upload

    chunks = [bytes([i]) * (1000 + 37 * i) for i in range(9)] + [b""]
    upload = _Upload(tmp_path)
    upload.write(chunks[:4])
    upload.write(chunks[4:])
    upload.finish()
    data = b"".join(chunks)
    assert upload.path.read_bytes() == data and upload.size == len(data)
    assert upload.blake3.hexdigest() == blake3.blake3(data).hexdigest()
    assert upload.sha256.hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_large_upload_in_many_chunks_is_stored_right(q, quilt):
    """Many small chunks in flight at once (the worker thread takes them in batches of up to
    WRITE_AHEAD): every byte lands in order."""
    data = flat(files={"data/blob.bin": bytes(range(256)) * 4096})  # a MiB more, compressed a little
    sha = hashlib.sha256(data).hexdigest()

    def small_chunks():
        yield pb.UploadBundleRequest(metadata=pb.BundleMetadata(filename="many.aria", size_bytes=len(data), sha256=sha))
        for i in range(0, len(data), 4096):
            yield pb.UploadBundleRequest(chunk=data[i : i + 4096])

    b = upload(q, small_chunks())
    assert b.id == blake3.blake3(data).hexdigest() and b.sha256 == sha
    stored = quilt.data_dir / "bundles" / "objects" / b.id[:2] / f"{b.id}.aria"
    assert stored.read_bytes() == data
