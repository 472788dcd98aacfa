"""aria.v1.TaskService: launch, read, list, follow and cancel the caller's tasks."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aria_trio.proto.aria.v1 import task_grpc
from aria_trio.proto.aria.v1 import task_pb2 as pb
from aria_trio.rpc import CallContext
from aria_trio.runtime.access.audit import Audit
from aria_trio.runtime.agents.sessions import Sessions
from aria_trio.runtime.kinds import TaskStatus
from aria_trio.runtime.services import convert
from aria_trio.runtime.work.containers import Containers
from aria_trio.runtime.work.tasks import Launch, Tasks, parse_command
from aria_trio.shared import errors


class TaskService(task_grpc.TaskServiceServicer):  # type: ignore[misc]
    def __init__(self, tasks: Tasks, containers: Containers, sessions: Sessions, audit: Audit) -> None:
        self.tasks = tasks
        self.containers = containers
        self.sessions = sessions
        self.audit = audit

    async def LaunchTask(self, request: pb.LaunchTaskRequest, ctx: CallContext) -> pb.LaunchTaskResponse:
        launch = Launch(
            session_id=request.session_id,
            type=request.type,
            command=parse_command(request.command_json),
            environment=dict(request.environment),
            timeout_seconds=request.timeout_seconds,
            parent_task_id=request.parent_task_id if request.HasField("parent_task_id") else None,
        )
        if request.session_id:
            await self.sessions.get(ctx.user, request.session_id)  # NOT_FOUND for an unknown one
        task_id = await self.tasks.launch(ctx.user, launch, self.containers.running_quilt_id)
        await self.audit.record(ctx, "task.launch", "task", task_id, type=request.type, command=launch.command)
        return pb.LaunchTaskResponse(task_id=task_id)

    async def GetTask(self, request: pb.GetTaskRequest, ctx: CallContext) -> pb.Task:
        return convert.task(await self.tasks.get(ctx.user, request.task_id))

    async def ListTasks(self, request: pb.ListTasksRequest, ctx: CallContext) -> pb.ListTasksResponse:
        statuses = [int(s) for s in request.filter_by_status]
        if any(s not in TaskStatus._value2member_map_ for s in statuses):
            raise errors.InvalidArgument(
                "filter_by_status holds an unknown status", fields={"filter_by_status": "unknown status"}
            )
        session = request.session_id if request.HasField("session_id") else None
        rows, token = await self.tasks.page(ctx.user, session, statuses, request.page_size, request.page_token)
        return pb.ListTasksResponse(tasks=[convert.task(r) for r in rows], next_page_token=token)

    async def StreamTaskOutput(
        self, request: pb.StreamTaskOutputRequest, ctx: CallContext
    ) -> AsyncIterator[pb.TaskOutput]:
        async for item in self.tasks.output(ctx.user, request.task_id, request.follow):
            yield convert.task_output(request.task_id, item)

    async def CancelTask(self, request: pb.CancelTaskRequest, ctx: CallContext) -> pb.CancelTaskResponse:
        initiated = await self.tasks.cancel(ctx.user, request.task_id)
        if initiated:
            await self.audit.record(ctx, "task.cancel", "task", request.task_id)
        return pb.CancelTaskResponse(cancellation_initiated=initiated)
