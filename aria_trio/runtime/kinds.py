"""The runtime's enumerations, one source each: the numbers are aria.v1's (what the store keeps and
the wire carries), the names are Python's. IntEnums, so a row's integer compares equal to them."""

from __future__ import annotations

import enum

from aria_trio.proto.aria.v1 import aria_pb2


class TaskStatus(enum.IntEnum):
    """aria.v1.TaskStatus: of tasks and of containers (a container has no TIMEOUT)."""

    PENDING = aria_pb2.PENDING
    RUNNING = aria_pb2.RUNNING
    COMPLETED = aria_pb2.COMPLETED
    FAILED = aria_pb2.FAILED
    CANCELLED = aria_pb2.CANCELLED
    TIMEOUT = aria_pb2.TIMEOUT

    @property
    def finished(self) -> bool:
        return self not in UNFINISHED


UNFINISHED = frozenset({TaskStatus.PENDING, TaskStatus.RUNNING})


class Role(enum.IntEnum):
    """aria.v1.MessageRole of a stored message."""

    SYSTEM = aria_pb2.SYSTEM
    USER = aria_pb2.USER
    ASSISTANT = aria_pb2.ASSISTANT
    TOOL = aria_pb2.TOOL


class OutputStream(enum.IntEnum):
    """Where a stored task output line came from (the task_output table's `stream`)."""

    STDOUT = 1
    STDERR = 2
    PROGRESS = 3  # a `::progress N text` line, taken out of stdout
