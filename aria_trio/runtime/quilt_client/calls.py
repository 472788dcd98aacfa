"""One typed method per Quilt call the runtime makes, and the one place where Quilt's errors
become the domain's (`as_domain_error`): the domain catches errors.NotFound, never a status code.

Unary calls return their reply. Server streams (ContainerLogs, TaskOutput) are async context
managers whose `Replies` are read while the block lasts: leaving it, for whatever reason (the
end, an error, a cancellation), cancels the call in Quilt too, at once; an async generator would
keep it open until collected. The upload sends its chunks and waits for Quilt's answer at once
(a refusal may come early). trio.Cancelled passes through untouched.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Generic, TypeVar

import structlog
import trio
from google.protobuf.message import Message

from aria_trio.proto.quilt.v1 import quilt_pb2 as q
from aria_trio.rpc import Channel, RpcError, StatusCode
from aria_trio.rpc.client import ClientCall
from aria_trio.shared import errors
from aria_trio.shared.quilt_api import BUNDLES, CONTAINERS, TASKS

log = structlog.get_logger("aria.quilt_link")

R = TypeVar("R")
TIMEOUT = 60.0  # seconds, a unary call's default deadline


def as_domain_error(exc: RpcError) -> errors.AriaError:
    """Quilt's status as the domain error of the same meaning, with Quilt's own message and
    details; any other status is logged (it is a bug or a broken Quilt) and told as UNAVAILABLE."""
    cls = {
        StatusCode.NOT_FOUND: errors.NotFound,
        StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
        StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
        StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
        StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
        StatusCode.UNAVAILABLE: errors.Unavailable,
    }.get(exc.code)
    if cls is None:
        log.error("quilt call failed", code=exc.code.name, message=exc.message)
        return errors.Unavailable("the container service (quilt) failed; see the runtime's log")
    info = exc.error_info()
    fields = exc.bad_fields()
    if cls is errors.InvalidArgument and not fields:
        fields = {"request": "refused by the container service"}
    metadata = {k: v for k, v in info.metadata.items() if k != "request_id"} if info is not None else {}
    return cls(exc.message, reason=info.reason if info is not None else None, fields=fields, metadata=metadata)


class Replies(Generic[R]):
    """The replies of a server stream, each typed; a failed stream raises a domain error."""

    def __init__(self, call: ClientCall[R]) -> None:
        self._call = call

    @property
    def waiting(self) -> bool:
        """Has the next reply (or the end) already arrived, so that receive() would not wait?"""
        return self._call.waiting

    async def receive(self) -> R | None:
        """The next reply; None once Quilt ended the stream with OK."""
        try:
            return await self._call.receive()
        except RpcError as exc:
            raise as_domain_error(exc) from None

    def __aiter__(self) -> Replies[R]:
        return self

    async def __anext__(self) -> R:
        reply = await self.receive()
        if reply is None:
            raise StopAsyncIteration
        return reply


class QuiltCalls:
    """The calls, each on the connection `_pick` gives (QuiltLink's: one with a free stream)."""

    async def _pick(self) -> Channel:
        raise NotImplementedError

    async def unary(self, path: str, request: Message, reply: type[R], timeout: float | None = TIMEOUT) -> R:
        """One call by its path (the typed methods below are these)."""
        try:
            channel = await self._pick()
            return await channel.unary(path, request, reply, timeout=timeout)
        except RpcError as exc:
            raise as_domain_error(exc) from None

    @asynccontextmanager
    async def _stream(self, path: str, request: Message, reply: type[R]) -> AsyncIterator[Replies[R]]:
        """A server stream, open while the block lasts (its end resets the call if unfinished)."""
        try:
            channel = await self._pick()
            async with channel.call(path, reply) as call:
                await call.send(request, end=True)
                yield Replies(call)
        except RpcError as exc:
            raise as_domain_error(exc) from None

    # -- Containers ---------------------------------------------------------------------------------

    async def create_container(self, request: q.CreateContainerRequest, timeout: float | None = TIMEOUT) -> q.Container:
        return await self.unary(CONTAINERS + "CreateContainer", request, q.Container, timeout)

    async def start_container(self, request: q.ContainerRef, timeout: float | None = TIMEOUT) -> q.Container:
        return await self.unary(CONTAINERS + "StartContainer", request, q.Container, timeout)

    async def stop_container(self, request: q.StopContainerRequest, timeout: float | None = TIMEOUT) -> q.Container:
        return await self.unary(CONTAINERS + "StopContainer", request, q.Container, timeout)

    async def remove_container(
        self, request: q.RemoveContainerRequest, timeout: float | None = TIMEOUT
    ) -> q.RemoveContainerResponse:
        return await self.unary(CONTAINERS + "RemoveContainer", request, q.RemoveContainerResponse, timeout)

    async def get_container(self, request: q.ContainerRef, timeout: float | None = TIMEOUT) -> q.Container:
        return await self.unary(CONTAINERS + "GetContainer", request, q.Container, timeout)

    async def list_containers(
        self, request: q.ListContainersRequest, timeout: float | None = TIMEOUT
    ) -> q.ListContainersResponse:
        return await self.unary(CONTAINERS + "ListContainers", request, q.ListContainersResponse, timeout)

    async def wait_container(self, request: q.ContainerRef, timeout: float | None = None) -> q.Container:
        """Answers once the container's main process has ended: no deadline unless given."""
        return await self.unary(CONTAINERS + "WaitContainer", request, q.Container, timeout)

    def container_logs(self, request: q.ContainerLogsRequest) -> AbstractAsyncContextManager[Replies[q.OutputLine]]:
        """`async with quilt.container_logs(request) as lines: async for line in lines: ...`"""
        return self._stream(CONTAINERS + "ContainerLogs", request, q.OutputLine)

    # -- Tasks --------------------------------------------------------------------------------------

    async def exec(self, request: q.ExecRequest, timeout: float | None = TIMEOUT) -> q.ExecResult:
        """Run a command and wait for it (give a deadline past the command's own timeout)."""
        return await self.unary(TASKS + "Exec", request, q.ExecResult, timeout)

    async def exec_async(self, request: q.ExecRequest, timeout: float | None = TIMEOUT) -> q.Task:
        return await self.unary(TASKS + "ExecAsync", request, q.Task, timeout)

    async def get_task(self, request: q.TaskRef, timeout: float | None = TIMEOUT) -> q.Task:
        return await self.unary(TASKS + "GetTask", request, q.Task, timeout)

    async def list_tasks(self, request: q.ListTasksRequest, timeout: float | None = TIMEOUT) -> q.ListTasksResponse:
        return await self.unary(TASKS + "ListTasks", request, q.ListTasksResponse, timeout)

    async def cancel_task(self, request: q.TaskRef, timeout: float | None = TIMEOUT) -> q.CancelTaskResponse:
        return await self.unary(TASKS + "CancelTask", request, q.CancelTaskResponse, timeout)

    async def task_result(self, request: q.TaskResultRequest, timeout: float | None = TIMEOUT) -> q.ExecResult:
        """A task's result (with `wait`, once it ended: give a deadline past its own timeout)."""
        return await self.unary(TASKS + "GetTaskResult", request, q.ExecResult, timeout)

    def task_output(self, request: q.TaskOutputRequest) -> AbstractAsyncContextManager[Replies[q.OutputLine]]:
        """`async with quilt.task_output(request) as lines: async for line in lines: ...`"""
        return self._stream(TASKS + "TaskOutput", request, q.OutputLine)

    # -- Bundles ------------------------------------------------------------------------------------

    async def upload_bundle(
        self,
        metadata: q.BundleMetadata,
        chunks: AsyncIterable[bytes],
        sent: Callable[[int], Awaitable[object]] | None = None,
    ) -> q.Bundle:
        """Send the metadata, then each chunk as it comes (each send waits for Quilt's flow-control
        credit: a slow Quilt slows the source), `sent(nbytes)` after each; Quilt's answer, which
        may come early (a refusal: the sending stops at once). Leaving early (an error, a
        cancellation) cancels the upload in Quilt, which removes what it had received."""
        answer: list[q.Bundle] = []
        try:
            channel = await self._pick()
            async with channel.call(BUNDLES + "UploadBundle", q.Bundle) as call:
                await call.send(q.UploadBundleRequest(metadata=metadata))

                async def send_all() -> None:
                    async for chunk in chunks:
                        await call.send(q.UploadBundleRequest(chunk=chunk))
                        if sent is not None:
                            await sent(len(chunk))
                    await call.done_writing()

                async def receive_answer() -> None:
                    answer.append(await call.single())

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_all)
                    nursery.start_soon(receive_answer)
        except RpcError as exc:
            raise as_domain_error(exc) from None
        except BaseExceptionGroup as group:
            failed = group.subgroup(RpcError)  # (both tasks may fail with the same error)
            if failed is None:
                raise
            first: BaseException = failed
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            assert isinstance(first, RpcError)
            raise as_domain_error(first) from None
        return answer[0]

    async def list_bundles(
        self, request: q.ListBundlesRequest, timeout: float | None = TIMEOUT
    ) -> q.ListBundlesResponse:
        return await self.unary(BUNDLES + "ListBundles", request, q.ListBundlesResponse, timeout)

    async def delete_bundle(self, request: q.BundleRef, timeout: float | None = TIMEOUT) -> q.DeleteBundleResponse:
        return await self.unary(BUNDLES + "DeleteBundle", request, q.DeleteBundleResponse, timeout)

    async def run_tool(self, request: q.RunToolRequest, timeout: float | None = TIMEOUT) -> q.RunToolResult:
        """Run a bundle's tool (give a deadline past the tool's own timeout)."""
        return await self.unary(BUNDLES + "RunTool", request, q.RunToolResult, timeout)

    def run_tool_stream(self, request: q.RunToolRequest) -> AbstractAsyncContextManager[Replies[q.RunToolEvent]]:
        """RunTool, with the tool's log lines as it prints them, then its result (the last reply)."""
        return self._stream(BUNDLES + "RunToolStream", request, q.RunToolEvent)
