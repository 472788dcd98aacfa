"""Polling instead of sleeping: wait for the state a test needs, no longer, and say so when it never comes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> T:
    """The first truthy value of `predicate()`, polled every `interval` s; AssertionError (naming
    `what`, or the predicate) when none came within `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or getattr(predicate, '__name__', predicate)}")
        time.sleep(interval)
