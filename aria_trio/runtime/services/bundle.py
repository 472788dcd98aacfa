"""aria.v1.BundleService: uploads, streamed through to Quilt."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aria_trio.proto.aria.v1 import bundle_grpc
from aria_trio.proto.aria.v1 import bundle_pb2 as pb
from aria_trio.rpc import CallContext
from aria_trio.runtime.access.audit import Audit
from aria_trio.runtime.work.uploads import Uploads


class BundleService(bundle_grpc.BundleServiceServicer):  # type: ignore[misc]
    def __init__(self, uploads: Uploads, audit: Audit) -> None:
        self.uploads = uploads
        self.audit = audit

    async def UploadBundle(
        self, requests: AsyncIterator[pb.UploadBundleRequest], ctx: CallContext
    ) -> pb.UploadBundleResponse:
        """Failures answer with a status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...) whose message
        says what was wrong; a response always means success."""
        bundle_id = await self.uploads.upload(ctx.user, requests)
        await self.audit.record(ctx, "bundle.upload", "bundle", bundle_id)
        return pb.UploadBundleResponse(bundle_id=bundle_id, success=True)
