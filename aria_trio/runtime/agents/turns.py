"""The agent turn loop: a user's input, then model calls and tool calls until a final answer,
streamed as it happens.

A turn: the USER message; then up to `max_iterations` model calls. Each model call is announced
(ModelCallStarted), its text and reasoning reach the client piece by piece as the model writes
them (TextDelta), and the whole reply is then stored as an ASSISTANT message with the deltas'
id; each tool call it makes is checked and run (the calls of one reply run concurrently, in a
nursery), their output lines stream as they print them (ToolOutput), each result is sent as it
comes and stored as a TOOL message fed back to the model; a reply without tool calls is the final
response, after the turn's Usage. Everything is persisted as it happens, so a turn cut short (the
client left, the model server failed) leaves a consistent history, with the text streamed so far
kept as a truncated ASSISTANT message, and the session stays usable. One turn at a time per
session. Without a configured model, `/<tool> <json object>` runs a tool directly (same
permission and schema checks); any other input is refused with a message that says how to
configure a model.

The turn runs in a task of its own and sends its events into a bounded channel (EVENTS), which
the caller reads; an event waits for room, so the turn runs ahead of a slow client by at most
that buffer (and the HTTP/2 window). Such a client never slows a running tool, though: ToolCalls
reads a tool's output at the turn's pace while the tool runs on (see tool_calls), and a result is
stored whole however fast its lines were read.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, replace

import structlog
import trio

from aria_trio.runtime.access.preferences import Preferences
from aria_trio.runtime.access.quotas import Quotas
from aria_trio.runtime.agents.llm import ChatModel, LLMConfig, resolve_config
from aria_trio.runtime.agents.llm import ToolCall as ModelToolCall
from aria_trio.runtime.agents.registry import AgentInfo, Registry, ToolInfo
from aria_trio.runtime.agents.sessions import Sessions
from aria_trio.runtime.agents.tool_calls import Call, Outcome, ToolCalls
from aria_trio.runtime.kinds import OutputStream, Role
from aria_trio.runtime.store import messages as table
from aria_trio.runtime.store.messages import MessageRow, NewMessage
from aria_trio.shared import errors
from aria_trio.shared.json_input import JSON
from aria_trio.shared.sqlite import Store, now_us

log = structlog.get_logger("aria.turns")

MAX_INPUT = 1024 * 1024  # bytes of input per turn
DEFAULT_MAX_ITERATIONS = 8
INTERRUPTED = "interrupted: the turn ended before this call did (its client left, or the runtime stopped)"
DEFAULT_AT_ONCE, DEFAULT_PER_REPLY = 8, 32  # (the settings tool_calls_at_once, max_tool_calls_per_reply)
HISTORY = 200  # newest messages sent to the model; older ones stay in the store only
EVENTS = 256  # a turn's events waiting for its client (then the turn waits)
NO_MODEL = (
    "no model is configured: set one with `aria prefs set llm.model NAME` and `aria prefs set llm.base_url URL` "
    "(an OpenAI-compatible server, e.g. http://127.0.0.1:11434/v1 for Ollama), or ARIA_LLM_MODEL and "
    "ARIA_LLM_BASE_URL for the daemon; without a model, run a tool directly: /<tool> <json object>"
)


@dataclass(frozen=True)
class MessageStored:
    """A message of the turn, as stored (the user's input, a reply, a tool's result)."""

    message: MessageRow


@dataclass(frozen=True)
class ModelCallStarted:
    iteration: int  # 1 for the turn's first model call


@dataclass(frozen=True)
class TextDelta:
    message_id: str  # the ASSISTANT message these pieces make
    text: str
    reasoning: bool


@dataclass(frozen=True)
class ToolCallStarted:
    call: Call


@dataclass(frozen=True)
class ToolOutput:
    call_id: str
    stream: OutputStream  # STDOUT or STDERR
    line: str


@dataclass(frozen=True)
class ToolResult:
    call: Call
    outcome: Outcome


@dataclass(frozen=True)
class Usage:
    """The turn's totals, just before its Final."""

    prompt_tokens: int
    completion_tokens: int
    model_calls: int
    tool_calls: int
    duration_seconds: float


@dataclass(frozen=True)
class Final:
    """The turn's last event: the final answer (or why there is none)."""

    text: str


TurnEvent = MessageStored | ModelCallStarted | TextDelta | ToolCallStarted | ToolOutput | ToolResult | Usage | Final


class Turns:
    def __init__(
        self,
        store: Store,
        sessions: Sessions,
        registry: Registry,
        preferences: Preferences,
        tool_calls: ToolCalls,
        model: ChatModel,
        env: Mapping[str, str] | None = None,
        *,
        quotas: Quotas | None = None,
    ) -> None:
        self.store = store
        self.sessions = sessions
        self.registry = registry
        self.preferences = preferences
        self.tool_calls = tool_calls
        self.model = model
        self.env = os.environ if env is None else env
        self._busy: set[str] = set()  # sessions with a turn running
        self.quotas = quotas
        self.at_once = quotas.tool_calls_at_once if quotas is not None else DEFAULT_AT_ONCE
        self.per_reply = quotas.tool_calls_per_reply if quotas is not None else DEFAULT_PER_REPLY

    @trio.as_safe_channel
    async def execute(self, user: str, session_id: str, text: str) -> AsyncGenerator[TurnEvent, None]:
        """Run one turn: `async with turns.execute(...) as events: async for event in events`.
        Every check that can refuse the turn happens before the first event."""
        session = await self.sessions.get(user, session_id)
        if not text.strip():
            raise errors.InvalidArgument("input is empty", fields={"input": "empty"})
        if len(text.encode()) > MAX_INPUT:
            raise errors.InvalidArgument(f"input is larger than {MAX_INPUT} bytes", fields={"input": "too large"})
        if session["status"] != "active":
            raise errors.FailedPrecondition(f"session {session_id} has ended", reason="SESSION_ENDED")
        agent, tool_list = await self.registry.agent(user, session["agent_id"])
        tools = {t.name: t for t in tool_list}
        config = resolve_config(await self.preferences.get(user), self.env)
        if config is not None and agent.model:
            config = replace(config, model=agent.model)
        if config is None and not text.startswith("/"):
            raise errors.FailedPrecondition(NO_MODEL, reason="NO_MODEL")
        if session_id in self._busy:
            raise errors.FailedPrecondition(
                f"session {session_id} is already running a turn; wait for it to end", reason="TURN_RUNNING"
            )
        held = self.quotas.turns.hold(user) if self.quotas is not None else contextlib.nullcontext()
        with held:
            self._busy.add(session_id)
            try:
                send, receive = trio.open_memory_channel[TurnEvent](EVENTS)
                turn = _Turn(self, user, session_id, agent, tools, send)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(turn.run, config, text)
                    async with receive:
                        async for event in receive:
                            yield event
                if turn.failure is not None:
                    raise turn.failure  # (after every event sent before it)
            finally:
                self._busy.discard(session_id)


class _Turn:
    """One turn's state: who, where, with which agent and tools, and where its events go."""

    def __init__(
        self,
        turns: Turns,
        user: str,
        session_id: str,
        agent: AgentInfo,
        tools: dict[str, ToolInfo],
        events: trio.MemorySendChannel[TurnEvent],
    ) -> None:
        self.turns = turns
        self.user = user
        self.session_id = session_id
        self.agent = agent
        self.tools = tools
        self.events = events
        self.failure: Exception | None = None
        self.pair = trio.Lock()  # a result and its TOOL message go out together
        self.started = time.monotonic()
        self.prompt_tokens = self.completion_tokens = self.model_calls = self.tool_calls = 0

    async def run(self, config: LLMConfig | None, text: str) -> None:
        """The turn, to its end; a failure is kept (`failure`) for the reader to raise once it has
        sent every event that came before it (raised here, it would cancel the reader at once)."""
        async with self.events:
            try:
                if config is None:
                    await self.direct(text)
                else:
                    await self.with_model(config, text)
            except Exception as exc:
                self.failure = exc

    async def emit(self, event: TurnEvent) -> None:
        await self.events.send(event)

    async def direct(self, text: str) -> None:
        """`/<tool> <json object>`: run one tool, without a model."""
        await self.emit(MessageStored(await self._store(Role.USER, text)))
        name, _, arguments = text[1:].partition(" ")
        call = Call("call-" + secrets.token_hex(6), name.strip(), arguments.strip() or "{}")
        assistant = await self._store(Role.ASSISTANT, "", tool_calls=[call])
        await self.emit(ToolCallStarted(call))
        outcome = await self._run_one(assistant["id"], call)
        await self._finish(outcome.result_json if outcome.ok else f"error: {outcome.error}")

    async def with_model(self, config: LLMConfig, text: str) -> None:
        system = self.agent.system_prompt or config.system_prompt
        if system and not await self.turns.store.run(table.last, self.session_id, 1):
            await self._store(Role.SYSTEM, system)  # a session's first turn: its system prompt leads
        config = replace(config, system_prompt=None)  # (it is in the history: not twice)
        await self._close_interrupted()
        await self.emit(MessageStored(await self._store(Role.USER, text)))
        specs: list[dict[str, JSON]] = [
            {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.schema}}
            for t in self.tools.values()
        ]
        limit = self.agent.max_iterations or DEFAULT_MAX_ITERATIONS
        for iteration in range(1, limit + 1):
            history = await self.turns.store.run(table.last, self.session_id, HISTORY)
            assistant = await self._model_call(config, iteration, _as_openai(history), specs)
            calls = tool_calls_of(assistant)
            if not calls:
                await self._finish(assistant["content"])
                return
            for call in calls:
                await self.emit(ToolCallStarted(call))
            await self._run_all(assistant["id"], calls)
        await self._finish(f"Stopped: the agent made {limit} model calls (its max_iterations) without a final answer.")

    async def _model_call(
        self, config: LLMConfig, iteration: int, history: list[dict[str, JSON]], specs: list[dict[str, JSON]]
    ) -> MessageRow:
        """One model call, its text streamed as deltas; its reply stored (and sent) whole. A call cut
        short after some text was streamed leaves that text stored, marked truncated."""
        await self.emit(ModelCallStarted(iteration))
        message_id = _new_id()
        content: list[str] = []
        reasoning: list[str] = []

        async def on_delta(piece: str, is_reasoning: bool) -> None:
            (reasoning if is_reasoning else content).append(piece)
            await self.emit(TextDelta(message_id, piece, is_reasoning))

        started = time.monotonic()
        self.model_calls += 1
        try:
            reply = await self.turns.model.complete(config, history, specs, on_delta)
        except BaseException:
            if content or reasoning:
                with trio.CancelScope(shield=True):
                    await self._store(
                        Role.ASSISTANT, "".join(content), id=message_id, reasoning="".join(reasoning), truncated=True
                    )
                log.info("kept a reply cut short", session=self.session_id, message=message_id)
            raise
        calls = [_call(c) for c in reply.tool_calls]
        self.prompt_tokens += reply.usage.prompt_tokens
        self.completion_tokens += reply.usage.completion_tokens
        usage = {
            "prompt_tokens": reply.usage.prompt_tokens,
            "completion_tokens": reply.usage.completion_tokens,
            "tool_calls": len(calls),
            "duration_seconds": round(time.monotonic() - started, 3),
        }
        assistant = await self._store(
            Role.ASSISTANT,
            reply.content,
            id=message_id,
            tool_calls=calls,
            reasoning=reply.reasoning,
            usage_json=json.dumps(usage),
        )
        await self.emit(MessageStored(assistant))
        return assistant

    async def _finish(self, text: str) -> None:
        await self.emit(
            Usage(
                self.prompt_tokens,
                self.completion_tokens,
                self.model_calls,
                self.tool_calls,
                time.monotonic() - self.started,
            )
        )
        await self.emit(Final(text))

    async def _run_one(self, message_id: str, call: Call) -> Outcome:
        """One call, its output streamed; its result sent and stored as soon as it is there."""
        self.tool_calls += 1

        async def on_output(stream: OutputStream, line: str) -> None:
            await self.emit(ToolOutput(call.call_id, stream, line))

        outcome = await self.turns.tool_calls.run(self.user, self.session_id, message_id, self.tools, call, on_output)
        await self._result(call, outcome)
        return outcome

    async def _result(self, call: Call, outcome: Outcome) -> None:
        """A call's result and its TOOL message, stored, then sent together (no other event of a
        concurrent call between the two)."""
        stored = await self._tool_message(call, outcome)
        async with self.pair:
            await self.emit(ToolResult(call, outcome))
            await self.emit(MessageStored(stored))

    async def _run_all(self, message_id: str, calls: list[Call]) -> None:
        """The calls of one reply, concurrently, at most `tool_calls_at_once` at a time (the rest
        wait their turn); past `max_tool_calls_per_reply`, a call does not run: its result says
        why. Each result is sent as its call ends."""
        slots = trio.Semaphore(self.turns.at_once)
        per_reply = self.turns.per_reply

        async def one(call: Call) -> None:
            async with slots:
                await self._run_one(message_id, call)

        async with trio.open_nursery() as nursery:
            for i, call in enumerate(calls):
                if i < per_reply:
                    nursery.start_soon(one, call)
                else:
                    outcome = Outcome(
                        False,
                        "null",
                        f"not run: the reply asked for {len(calls)} tool calls, and at most {per_reply} run per "
                        "reply (the runtime's max_tool_calls_per_reply setting); ask for fewer at a time",
                    )
                    await self._result(call, outcome)

    async def _close_interrupted(self) -> None:
        """A turn cut short (its client gone, the runtime killed) may leave tool calls without a
        result, a history no model server accepts: each gets a failed TOOL message first."""
        history = await self.turns.store.run(table.last, self.session_id, HISTORY)
        answered = {row["tool_call_id"] for row in history if row["role"] == Role.TOOL}
        for row in history:
            if row["role"] == Role.ASSISTANT:
                for call in tool_calls_of(row):
                    if call.call_id not in answered:
                        await self._tool_message(call, Outcome(False, "null", INTERRUPTED))
                        log.info("closed an interrupted tool call", session=self.session_id, call=call.call_id)

    async def _tool_message(self, call: Call, outcome: Outcome) -> MessageRow:
        content = outcome.result_json if outcome.ok else json.dumps({"error": outcome.error})
        return await self._store(Role.TOOL, content, tool_call_id=call.call_id, tool_name=call.name)

    async def _store(
        self,
        role: Role,
        content: str,
        *,
        id: str | None = None,
        tool_calls: list[Call] | None = None,
        tool_call_id: str | None = None,
        tool_name: str | None = None,
        reasoning: str = "",
        truncated: bool = False,
        usage_json: str | None = None,
    ) -> MessageRow:
        row = NewMessage(
            id=id or _new_id(),
            session_id=self.session_id,
            role=role,
            content=content,
            tool_calls_json=json.dumps([c.__dict__ for c in tool_calls]) if tool_calls else None,
            tool_call_id=tool_call_id,
            tool_name=tool_name,
            created_at=now_us(),
            reasoning=reasoning,
            truncated=int(truncated),
            usage_json=usage_json,
        )
        return await self.turns.store.run(table.append, row)


def _new_id() -> str:
    return "m-" + secrets.token_hex(8)


def _call(c: ModelToolCall) -> Call:
    return Call(c.id or "call-" + secrets.token_hex(6), c.name, c.arguments)


def tool_calls_of(row: MessageRow) -> list[Call]:
    return [Call(**c) for c in json.loads(row["tool_calls_json"] or "[]")]


def _as_openai(rows: list[MessageRow]) -> list[dict[str, JSON]]:
    """Stored messages in the Chat Completions format (a history cut by HISTORY never starts with
    tool results whose call was cut off)."""
    out: list[dict[str, JSON]] = []
    for row in rows:
        role = row["role"]
        if role == Role.TOOL:
            if not out:
                continue
            out.append({"role": "tool", "tool_call_id": row["tool_call_id"], "content": row["content"]})
        elif role == Role.ASSISTANT:
            message: dict[str, JSON] = {"role": "assistant", "content": row["content"] or None}
            calls = tool_calls_of(row)
            if calls:
                message["tool_calls"] = [
                    {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in calls
                ]
            out.append(message)
        else:
            out.append({"role": "system" if role == Role.SYSTEM else "user", "content": row["content"]})
    return out
