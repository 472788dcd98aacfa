"""Reference server of bench.quilt_upload: Quilt's UploadBundle, served by grpcio.aio instead.

    python bench/ref_upload_grpcio.py SOCKET DATA_DIR

Why it exists: the benchmark asks what Quilt's own RPC stack (Trio, purerpc and h2, all in Python)
costs on a large client stream next to grpcio's C core. For that the reference must differ from
Quilt in the RPC stack only, so it serves `/quilt.v1.Bundles/UploadBundle` on the same kind of
socket, to the same client (bench/_quilt_client.py upload), with the same limits and the same work:

* the same limit: messages of at most 4 MiB (grpcio's default receive limit, Quilt's too);
* the same work per chunk, by Quilt's own code (`aria_trio.quilt.bundles._Upload`): hashed (blake3
  and sha256) and written to a temporary file in DATA_DIR/incoming, in a worker thread, while the
  event loop receives the next chunks; at most WRITE_AHEAD chunks wait in memory for the thread
  (when the disk is slower, the client waits), and the thread takes all of those waiting at once,
  as Quilt's does;
* the same end: the declared size and any checksums checked, the file fsynced, the archive and its
  manifest checked (`inspect_bundle`, Quilt's own), renamed to DATA_DIR/objects/<blake3>.aria and
  the folder fsynced; a failed upload's file is removed.

What it skips: Quilt's SQLite row for the bundle and its log lines (well under a millisecond per
upload). It stops at SIGTERM or SIGINT with exit code 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from aria_trio.proto.quilt.v1 import quilt_pb2 as pb
from aria_trio.quilt.bundles import WRITE_AHEAD
from aria_trio.quilt.bundles import _Upload as Upload  # Quilt's own file, hashes and page-cache handling
from aria_trio.shared.bundle_manifest import inspect_bundle

MAX_MESSAGE = 4 * 1024 * 1024
STOP_GRACE_S = 1.0


def keep(part: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    os.rename(part, final)
    fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Bundles:
    def __init__(self, root: Path) -> None:
        self.root = root

    async def upload(
        self, requests: AsyncIterator[pb.UploadBundleRequest], context: grpc.aio.ServicerContext
    ) -> pb.Bundle:
        first = await anext(requests, None)
        if first is None or first.WhichOneof("payload") != "metadata":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be the metadata")
        assert first is not None  # (abort raised otherwise)
        meta = first.metadata
        upload = await asyncio.to_thread(Upload, self.root / "incoming")
        try:
            checksum = await self._receive(requests, meta.size_bytes, upload, context)
            if upload.size != meta.size_bytes:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "size mismatch")
            digest, sha = upload.blake3.hexdigest(), upload.sha256.hexdigest()
            for want, got in ((meta.sha256, sha), (checksum.sha256, sha), (checksum.blake3, digest)):
                if want and want.lower() != got:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "checksum mismatch")
            await asyncio.to_thread(upload.finish)
            manifest = await asyncio.to_thread(inspect_bundle, str(upload.path))
            await asyncio.to_thread(keep, upload.path, self.root / "objects" / f"{digest}.aria")
            return pb.Bundle(
                id=digest,
                name=manifest.name,
                version=manifest.version,
                filename=meta.filename,
                size_bytes=upload.size,
                sha256=sha,
                blake3=digest,
                layout=manifest.layout,
            )
        finally:
            upload.discard()

    async def _receive(
        self,
        requests: AsyncIterator[pb.UploadBundleRequest],
        size: int,
        upload: Upload,
        context: grpc.aio.ServicerContext,
    ) -> pb.BundleChecksum:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(WRITE_AHEAD)

        async def write() -> None:
            done = False
            while not done:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                if batch[-1] is None:
                    done = True
                    batch.pop()
                if batch:
                    await asyncio.to_thread(upload.write, batch)  # type: ignore[arg-type]

        writer = asyncio.create_task(write())
        checksum = pb.BundleChecksum()
        received = 0
        try:
            async for request in requests:
                kind = request.WhichOneof("payload")
                if kind == "checksum":
                    checksum = request.checksum
                    break
                if kind != "chunk":
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "metadata may only come first")
                received += len(request.chunk)
                if received > size:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "more bytes than declared")
                await queue.put(request.chunk)
            await queue.put(None)
            await writer
        finally:
            writer.cancel()
        return checksum


def handler(service: Bundles) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "quilt.v1.Bundles",
        {
            "UploadBundle": grpc.stream_unary_rpc_method_handler(
                service.upload,
                request_deserializer=pb.UploadBundleRequest.FromString,
                response_serializer=pb.Bundle.SerializeToString,
            )
        },
    )


async def serve(socket_path: str, root: Path) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE)])
    server.add_generic_rpc_handlers((handler(Bundles(root)),))
    server.add_insecure_port(f"unix:{socket_path}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    await stop.wait()
    await server.stop(STOP_GRACE_S)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: ref_upload_grpcio.py SOCKET DATA_DIR", file=sys.stderr)
        return 2
    asyncio.run(serve(argv[0], Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
