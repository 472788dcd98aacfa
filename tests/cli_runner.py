"""The `aria` command run in this process (click's CliRunner), for the CLI tests that need no real
terminal, no signal and no stdin of its own: the same command, without an interpreter's start-up
(~0.7 s of CPU each) per call. Runs a command that calls trio.run, so only from a sync test (not
from inside a trio test's event loop); the verbs that read fd 0 or take Ctrl-C run as processes."""

from __future__ import annotations

import dataclasses
import os
import threading

from click.testing import CliRunner

from aria_trio.cli import main


@dataclasses.dataclass(frozen=True)
class Ran:
    """What subprocess.run(..., capture_output=True, text=True) gives, for the same assertions."""

    returncode: int
    stdout: str
    stderr: str


def run_aria(*args: str, socket: str | os.PathLike[str] | None = None, stdin: str | None = None) -> Ran:
    """`aria ARGS...` with ARIA_RUNTIME_SOCK=socket; an exception the command let out (a traceback,
    in a process) is raised here, so a test never mistakes a crash for an exit status."""
    assert threading.current_thread() is threading.main_thread(), "(trio's signal handling wants the main thread)"
    env = {"ARIA_RUNTIME_SOCK": str(socket) if socket is not None else None, "COLUMNS": "80"}  # (as off a terminal)
    result = CliRunner().invoke(main, list(args), input=stdin, env=env, prog_name="aria")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"aria {' '.join(args)} raised:\n{result.stderr}") from result.exception
    return Ran(result.exit_code, result.stdout, result.stderr)
