"""Long scenarios that run beside the rest of the suite, for the lifetimes we promise.

A scenario (a plain function, given a folder of its own) starts in a thread as soon as the tests
are collected, if a test that checks it is selected; that test runs last and waits for the
scenario's end, reporting its failure. So a check that must sit idle for two minutes costs the
suite almost nothing: the rest of the suite runs meanwhile. (grpcio and subprocess calls release
the GIL; a scenario spends its time asleep.)
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest


class Scenario:
    def __init__(self, fn: Callable[[Path], None]) -> None:
        self.fn = fn
        self.name = fn.__name__
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._trace = ""

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"scenario {self.name}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        folder = Path(tempfile.mkdtemp(prefix="aria-bg-", dir="/tmp"))
        try:
            self.fn(folder)
        except BaseException as exc:
            self._error = exc
            self._trace = traceback.format_exc()
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def check(self, timeout: float = 600) -> None:
        """Wait for the scenario; fail as it failed."""
        self.start()  # (run alone, the test starts it itself)
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            pytest.fail(f"scenario {self.name} still running after {timeout} s")
        if self._error is not None:
            pytest.fail(f"scenario {self.name} failed:\n{self._trace}", pytrace=False)


def scenario(fn: Callable[[Path], None]) -> Scenario:
    return Scenario(fn)


def start_early(items: list[pytest.Item]) -> None:
    """(conftest's collection hook) Tests marked `background(scenario)` go last; their scenarios
    start now."""
    marked = [i for i in items if i.get_closest_marker("background")]
    items[:] = [i for i in items if not i.get_closest_marker("background")] + marked
    for item in marked:
        marker = item.get_closest_marker("background")
        assert marker is not None
        marker.args[0].start()
