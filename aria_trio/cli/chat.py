"""`aria chat SESSION`: talk with a session's agent.

It reads lines from stdin (a `> ` prompt on a terminal; piped input works too), runs each as a turn
(ExecuteTurn) and shows its events as they arrive: a "thinking" spinner from a model call to its
first words, the assistant's text as the model writes it (its reasoning dimmed, or hidden with
--no-reasoning), `→ tool(arguments)` for each call with what the tool prints under it (dimmed)
while it runs, `✓`/`✗` with the result or the error, and a one-line usage summary (on stderr).
A turn's error is printed and the prompt goes on; the exit status is 1 if any turn failed.
Ctrl-C during a turn cancels it (not the chat); at the prompt it leaves. With --json, each event is
printed as one JSON object, a line each.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

import click
import trio

from aria_trio.cli import Context, main
from aria_trio.cli.output import each, error_line, printer
from aria_trio.cli.session import SESSIONS, call_line, short, usage_text
from aria_trio.proto.aria.v1 import aria_pb2
from aria_trio.proto.aria.v1 import session_pb2 as pb
from aria_trio.rpc import Channel, RpcError

SPIN = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
SPIN_INTERVAL = 0.08
BUSY_RETRY_S = 3.0  # how long a turn waits for the server to finish cancelling the previous one
QUIT = "/quit"


def _result_line(result: pb.ToolResult) -> str:
    if result.success:
        return f"✓ {result.tool_name}: {short(result.result_json)}"
    return f"✗ {result.tool_name}: {short(result.error_message or 'failed')}"


def _reason(exc: RpcError) -> str:
    info = exc.error_info()
    return info.reason if info is not None else ""


# -- the chat -------------------------------------------------------------------------------------


class _Spinner:
    """`⠋ thinking…` or `⠋ add…`, rewritten in place on stderr while the model thinks or tool calls
    run (only when `shown`: a terminal; never while a line of text is half written)."""

    def __init__(self, shown: bool) -> None:
        self.shown = shown
        self.pending: dict[str, str] = {}  # call id -> tool name
        self.thinking = False
        self.paused = False  # text is being written on the current line
        self.frame = 0
        self.drawn = False

    def start(self, call: pb.ToolCall) -> None:
        self.pending[call.call_id or call.tool_name] = call.tool_name
        self.draw()

    def stop(self, result: pb.ToolResult) -> None:
        self.pending.pop(result.call_id or result.tool_name, None)

    def draw(self) -> None:
        if not self.shown or self.paused:
            return
        what = ", ".join(dict.fromkeys(self.pending.values())) if self.pending else "thinking" if self.thinking else ""
        if what:
            click.echo(f"\r{SPIN[self.frame % len(SPIN)]} {what}…\x1b[K", err=True, nl=False)
            self.drawn = True

    def clear(self) -> None:
        if self.drawn:
            click.echo("\r\x1b[K", err=True, nl=False)
            self.drawn = False

    async def run(self) -> None:
        while True:
            await trio.sleep(SPIN_INTERVAL)
            self.frame += 1
            self.draw()


@dataclass
class _TurnView:
    """Shows one turn's events as they arrive."""

    spinner: _Spinner
    reasoning: bool = True  # show the model's reasoning (dimmed)
    last_text: str = ""  # the assistant's last text, not to print it again as the final answer
    writing: str = ""  # what the current line is being written with: "", "text" or "reasoning"
    streamed: str = ""  # the message id whose text came as deltas (not to print it again)
    usage: str = ""  # the turn's usage line, printed after its final answer

    def say(self, line: str, err: bool = False) -> None:
        self.end_line()
        self.spinner.clear()
        click.echo(line, err=err)
        self.spinner.draw()

    def end_line(self) -> None:
        if self.writing:
            click.echo("")
            self.writing = ""
            self.spinner.paused = False

    def write(self, text: str, kind: str) -> None:
        """A piece of text as it comes, on the current line."""
        if self.writing != kind:
            self.end_line()
        if not self.writing:
            self.spinner.clear()
            self.spinner.paused = True
        self.writing = kind
        click.echo(click.style(text, dim=True) if kind == "reasoning" else text, nl=False)
        sys.stdout.flush()

    def render(self, out: pb.TurnOutput) -> None:
        kind = out.WhichOneof("event")
        if kind == "model_call":
            self.spinner.thinking = True
            self.spinner.draw()
        elif kind == "text_delta":
            self.spinner.thinking = False
            delta = out.text_delta
            self.streamed = delta.message_id
            if not delta.reasoning:
                self.write(delta.text, "text")
            elif self.reasoning:
                self.write(delta.text, "reasoning")
        elif kind == "message":
            self.spinner.thinking = False
            m = out.message
            if m.role == aria_pb2.ASSISTANT:
                if m.id == self.streamed:
                    self.end_line()
                elif m.content:
                    self.say(m.content)
                if m.content:
                    self.last_text = m.content
                if m.truncated:
                    self.say("(cut short)", err=True)
        elif kind == "tool_call":
            self.say(call_line(out.tool_call))
            self.spinner.start(out.tool_call)
        elif kind == "tool_output":
            o = out.tool_output
            self.say(click.style(f"  │ {o.stdout_line or o.stderr_line}", dim=True))
        elif kind == "tool_result":
            self.spinner.stop(out.tool_result)
            self.say(_result_line(out.tool_result))
        elif kind == "usage":
            self.spinner.pending.clear()
            self.usage = click.style(f"({usage_text(out.usage)})", dim=True)  # (shown under the answer)
        elif kind == "final_response":
            self.spinner.pending.clear()
            if out.final_response != self.last_text:
                self.say(out.final_response)
            self.end_line()
            if self.usage:
                self.say(self.usage, err=True)


class _Chat:
    """A chat on one channel: turns, one at a time, each cancellable by Ctrl-C."""

    def __init__(self, obj: Context, channel: Channel, session_id: str, reasoning: bool = True) -> None:
        self.obj = obj
        self.reasoning = reasoning
        self.channel = channel
        self.session_id = session_id
        self.failed = False
        self.interrupted = False  # the last turn was cut short by Ctrl-C
        self.running: trio.CancelScope | None = None  # the turn that Ctrl-C cancels, until its answer is in
        self.leave: trio.CancelScope | None = None  # what Ctrl-C cancels otherwise: the whole chat

    async def watch_interrupts(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            task_status.started()
            async for _ in signals:
                scope = self.running or self.leave
                if scope is not None:
                    scope.cancel()

    async def turn(self, text: str) -> None:
        """Run one turn, showing its events; an error is printed (and remembered for the exit status)."""
        spinner = _Spinner(shown=sys.stderr.isatty() and not self.obj.as_json)
        view = _TurnView(spinner, reasoning=self.reasoning)
        show: Callable[[pb.TurnOutput], None] = printer(self.obj, view.render)

        def render(out: pb.TurnOutput) -> None:
            show(out)
            if out.WhichOneof("event") == "final_response":
                self.running = None  # answered: a Ctrl-C from now on is one at the prompt

        request = pb.ExecuteTurnRequest(session_id=self.session_id, input=text)
        retry_until = trio.current_time() + BUSY_RETRY_S if self.interrupted else 0.0
        self.interrupted = False
        with trio.CancelScope() as scope:
            self.running = scope
            try:
                async with trio.open_nursery() as nursery:
                    if spinner.shown:
                        nursery.start_soon(spinner.run)
                    try:
                        await self._stream(request, render, retry_until)
                    except RpcError as exc:
                        spinner.clear()
                        click.echo(error_line(exc), err=True)
                        self.failed = True
                    nursery.cancel_scope.cancel()
            finally:
                view.end_line()
                spinner.clear()
                self.running = None
        if scope.cancelled_caught:
            self.interrupted = True
            click.echo("(turn cancelled)", err=True)

    async def prompt(self, s: pb.Session) -> None:
        """A turn a line of stdin, until its end, /quit, or Ctrl-C at the prompt."""
        interactive = sys.stdin.isatty()
        if interactive:
            click.echo(f"session {s.id} with agent {s.agent_id or 'default'}; Ctrl-D or {QUIT} leaves", err=True)
        lines = _Lines()
        with trio.CancelScope() as waiting:
            self.leave = waiting
            while True:
                line = await lines.next("> " if interactive else "")
                if line is None or line.strip() == QUIT:
                    break
                if line.strip():
                    await self.turn(line)
        if waiting.cancelled_caught and interactive:
            click.echo("", err=True)  # Ctrl-C at the prompt: the shell's prompt on a line of its own

    async def _stream(
        self, request: pb.ExecuteTurnRequest, render: Callable[[pb.TurnOutput], None], retry_until: float
    ) -> None:
        """ExecuteTurn, its events to `render`; refused while the session still runs a turn (one just
        cancelled, that the server is still ending), it tries again until `retry_until`."""
        while True:
            try:
                await each(self.channel, SESSIONS + "ExecuteTurn", request, pb.TurnOutput, render)
                return
            except RpcError as exc:
                if _reason(exc) != "TURN_RUNNING" or trio.current_time() > retry_until:
                    raise
            await trio.sleep(0.05)


class _Lines:
    """Lines of stdin, read in a worker thread that Ctrl-C may abandon. It reads the file descriptor
    itself (os.read), not sys.stdin: a thread left blocked holding sys.stdin's lock would make the
    interpreter abort at exit."""

    def __init__(self) -> None:
        self.buffer = b""
        self.ended = False

    async def next(self, prompt: str) -> str | None:
        """The next line without its newline; None at the end of input."""
        if prompt:
            click.echo(prompt, err=True, nl=False)
        while b"\n" not in self.buffer and not self.ended:
            data = await trio.to_thread.run_sync(os.read, 0, 65536, abandon_on_cancel=True)
            self.buffer += data
            self.ended = not data
        if not self.buffer:
            return None
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode(errors="replace").rstrip("\r")


@main.command()
@click.argument("session_id")
@click.option("--message", "-m", "message", default=None, metavar="TEXT", help="Run this one turn, then exit.")
@click.option("--no-reasoning", "hide_reasoning", is_flag=True, help="Do not show the model's reasoning.")
@click.pass_obj
def chat(obj: Context, session_id: str, message: str | None, hide_reasoning: bool) -> None:
    """Talk with a session's agent: each line of input is a turn.

    Shows the assistant's text as the model writes it (its reasoning dimmed), each tool call
    (`→ tool(arguments)`) with what it prints while it runs, its result (`✓`) or error (`✗`),
    and the turn's usage (on stderr). With --json: each event as a JSON object, a line each.
    Without a configured model (`aria prefs set llm.model ...`), `/<tool> <json object>` runs
    one of the agent's tools directly. Ctrl-D or /quit leaves; Ctrl-C cancels the running
    turn, or leaves at the prompt. Exit status 1 if any turn failed.

    \b
    Examples:
      aria chat S
      aria chat S -m '/run_command {"command": ["echo", "hi"]}'
      printf 'hello\\nthanks\\n' | aria chat S
    """
    outcome: list[_Chat] = []

    async def talk(channel: Channel) -> None:
        get = pb.GetSessionRequest(session_id=session_id)
        s = await channel.unary(SESSIONS + "GetSession", get, pb.Session, timeout=obj.timeout)
        state = _Chat(obj, channel, session_id, reasoning=not hide_reasoning)
        outcome.append(state)
        async with trio.open_nursery() as nursery:
            state.leave = nursery.cancel_scope
            await nursery.start(state.watch_interrupts)
            if message is not None:
                await state.turn(message)
            else:
                await state.prompt(s)
            nursery.cancel_scope.cancel()

    try:
        obj.run(talk)
    except KeyboardInterrupt:  # before the handler was in place
        sys.exit(130)
    if message is not None and outcome and outcome[0].interrupted:
        sys.exit(130)
    sys.exit(1 if outcome and outcome[0].failed else 0)
