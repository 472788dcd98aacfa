"""Long scenarios run in threads (they mostly wait), so that several share the wall time."""

from __future__ import annotations

import shutil
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path


class Scenario:
    def __init__(self, fn: Callable[[Path], None]) -> None:
        self.fn = fn
        self.name = fn.__name__
        self._thread: threading.Thread | None = None
        self._trace = ""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"scenario {self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        folder = Path(tempfile.mkdtemp(prefix="aria-sc-", dir="/tmp"))
        try:
            self.fn(folder)
        except BaseException:
            self._trace = traceback.format_exc()
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def failure(self, timeout: float) -> str:
        """Wait for the end: "" if it passed, else why (its traceback)."""
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            return f"scenario {self.name}: still running after {timeout} s"
        return f"scenario {self.name} failed:\n{self._trace}" if self._trace else ""


def scenario(fn: Callable[[Path], None]) -> Scenario:
    return Scenario(fn)
