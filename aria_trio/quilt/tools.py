"""Running one tool of a stored bundle, per BUNDLES.md, in a sandbox of its own.

The bundle's files are mounted read-only at /bundle and the runner at /runner; the arguments go
to stdin as one JSON object and one JSON document comes back on stdout. A non-zero exit, a
timeout, or stdout that is not that document is a failed call, with the reason. What the tool
prints meanwhile (its stderr, its log) can be had line by line as it prints it (LiveLines).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from aria_trio.quilt.bundles import BundleStore
from aria_trio.quilt.images import HOST
from aria_trio.quilt.limits import Cgroup
from aria_trio.quilt.output import STDERR, Lines
from aria_trio.quilt.process import Captured, start_process
from aria_trio.quilt.sandbox import Sandbox, base_env
from aria_trio.shared import errors, json_input
from aria_trio.shared.live_output import LiveBound

RUNNERS = Path(__file__).resolve().parent / "runners"
SCRATCH_BYTES = 64 * 1024 * 1024  # each of a tool run's /tmp and /workspace (tmpfs: counted as its memory)
COMMANDS = {
    "python": ["python3", "/runner/python_runner.py"],
    "node": ["node", "/runner/node_runner.js"],
}


class LiveLines:
    """A tool run's stderr (its log; stdout is its answer) into `lines`, a line at a time as it is
    printed. Lines are cut at output.MAX_LINE; past LIVE_LINES lines or LIVE_BYTES bytes of one run
    the rest is not sent, and one line says so (the result's log keeps every line, to its own cap).
    The channel must hold LIVE_LINES + 1 lines: then a send never waits, so the tool is never slowed
    by whoever reads them, and what waits in memory for a slow reader is bounded by the same cap."""

    def __init__(self, lines: trio.MemorySendChannel[str]) -> None:
        self.channel = lines
        self.lines = Lines()
        self.bound = LiveBound("quilt")

    async def feed(self, stream: int, data: bytes | bytearray) -> None:
        if stream == STDERR:
            for _, text in self.lines.feed(stream, data):
                self._send(text)

    def close(self) -> None:
        for _, text in self.lines.rest():
            self._send(text)

    def _send(self, text: str) -> None:
        shown = self.bound.admit(text)
        if shown is None:
            return
        try:
            self.channel.send_nowait(shown)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.bound.cut = True  # nobody reads them any more
        # (trio.WouldBlock cannot happen with a channel of LIVE_LINES + 1: see above)


@dataclass
class ToolResult:
    ok: bool
    result_json: str
    error: str
    log: str
    duration_seconds: float
    exit_code: int | None
    timed_out: bool


class ToolRunner:
    def __init__(
        self,
        sandbox: Sandbox,
        bundles: BundleStore,
        default_timeout: float,
        default_memory: int,
        pids: int,
        cpus: float = 1.0,
        scratch_bytes: int = SCRATCH_BYTES,
        cgroup_prefix: str = "tool-",
    ) -> None:
        self.sandbox = sandbox
        # Tool runs are recorded nowhere: their cgroups carry the Quilt's name (its data folder's),
        # so that a Quilt starting after a crash finds the ones of its predecessor (clean()).
        self.cgroup_prefix = cgroup_prefix
        self.bundles = bundles
        self.default_timeout = default_timeout
        self.default_memory = default_memory
        self.pids = pids
        self.cpus = cpus
        self.scratch_bytes = scratch_bytes

    def clean(self) -> list[str]:
        """Kill and remove the cgroups of tool runs a crash of this Quilt left (a worker thread's
        job, at start): a sandbox that Quilt's death did not take (it died in the instant between
        the spawn and bubblewrap's --die-with-parent) is in one."""
        names = sorted({d.name for parent in self.sandbox.limits.parents if parent.is_dir() for d in parent.iterdir()})
        found = [n for n in names if n.startswith(self.cgroup_prefix)]
        for name in found:
            cgroup = Cgroup(self.sandbox.limits, name)
            cgroup.kill_all()
            cgroup.remove()
        return found

    async def run(
        self,
        bundle_id: str,
        tool_name: str,
        arguments_json: str,
        timeout: float,
        memory: int,
        network: bool,
        lines: trio.MemorySendChannel[str] | None = None,
    ) -> ToolResult:
        bundle = await self.bundles.get(bundle_id)
        tool = next((t for t in bundle.tools if t.name == tool_name), None)
        if tool is None:
            raise errors.NotFound(f"bundle {bundle_id} has no tool {tool_name!r}", reason="TOOL_NOT_FOUND")
        try:
            arguments = json_input.loads(arguments_json or "{}")
        except ValueError:
            raise errors.InvalidArgument("arguments_json is not JSON", fields={"arguments_json": "not JSON"}) from None
        if not isinstance(arguments, dict):
            raise errors.InvalidArgument(
                "the arguments must be a JSON object", fields={"arguments_json": "not an object"}
            )
        files = await self.bundles.unpacked(bundle_id)
        timeout = timeout or self.default_timeout
        memory = memory or self.default_memory
        name = self.cgroup_prefix + secrets.token_hex(6)
        cgroup = None
        try:
            if self.sandbox.limits.parents:
                cgroup = Cgroup(self.sandbox.limits, name)
                await trio.to_thread.run_sync(cgroup.create, memory, self.pids, self.cpus)
            command = [*COMMANDS[tool.runtime], f"/bundle/{tool.entry}", tool.name]
            argv = await trio.to_thread.run_sync(
                lambda: self.sandbox.argv(
                    command,
                    image=HOST,
                    workspace=None,  # /tmp and /workspace: the run's own tmpfs, gone with it
                    tmp=None,
                    scratch_bytes=self.scratch_bytes,
                    workdir="/bundle",
                    env=base_env({"NODE_PATH": "/bundle/node_modules"}),
                    network=network,
                    hostname="tool",
                    cgroup=cgroup,
                    memory_bytes=memory,
                    pids=self.pids,
                    ro_binds=[(files, "/bundle"), (RUNNERS, "/runner")],
                )
            )
            cwd = env = None
            if self.sandbox.kind == "none":  # no mounts: point the runner at the real paths
                argv = [a.replace("/bundle/", f"{files}/").replace("/runner/", f"{RUNNERS}/") for a in argv]
                cwd, env = str(files), base_env({})
            live = LiveLines(lines) if lines is not None else None
            return await self._call(argv, cwd, env, json.dumps(arguments).encode(), timeout, cgroup, memory, live)
        finally:
            with trio.CancelScope(shield=True):
                if cgroup is not None:
                    await trio.to_thread.run_sync(cgroup.kill_all)
                    await trio.to_thread.run_sync(cgroup.remove)

    async def _call(
        self,
        argv: list[str],
        cwd: str | None,
        env: dict[str, str] | None,
        stdin: bytes,
        timeout: float,
        cgroup: Cgroup | None,
        memory: int,
        live: LiveLines | None,
    ) -> ToolResult:
        captured = Captured()
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            run = await start_process(
                nursery,
                argv,
                live,
                sandboxed=self.sandbox.kind == "bubblewrap",
                cwd=cwd,
                env=env,
                stdin=stdin,
                captured=captured,
                files={"{seccomp_fd}": self.sandbox.seccomp} if self.sandbox.seccomp is not None else {},
            )
            with trio.move_on_after(timeout) as scope:
                await run.result()
            if scope.cancelled_caught:
                run.kill()  # the whole sandbox: pid 1 of its namespace
            exit_ = await run.result()
        if live is not None:
            live.close()
        duration = time.monotonic() - started
        log = captured.stderr.decode("utf-8", "replace")
        code = exit_.exit_code
        if scope.cancelled_caught:
            return ToolResult(False, "", f"the tool timed out after {timeout:g} s", log, duration, code, True)
        if exit_.signal is not None:
            reason = f"killed by signal {exit_.signal}"
            if cgroup is not None and cgroup.oom_killed():
                reason = f"out of memory (the limit is {memory} bytes)"
            return ToolResult(False, "", f"the tool failed: {reason}", log, duration, code, False)
        try:
            answer = json_input.loads(captured.stdout)
            if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
                raise ValueError("not an answer")
        except ValueError:
            head = captured.stdout[:200].decode("utf-8", "replace")
            why = f"exited with code {code}" if code else "printed something that is not its answer"
            return ToolResult(False, "", f"the tool {why}: {head!r}", log, duration, code, False)
        if answer["ok"]:
            return ToolResult(True, json.dumps(answer.get("result")), "", log, duration, code, False)
        return ToolResult(False, "", str(answer.get("error", "the tool failed")), log, duration, code, False)
