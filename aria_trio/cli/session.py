"""`aria session ...`: start, list, show and end sessions (conversations with an agent); read
their history."""

from __future__ import annotations

import json

import click

from aria_trio.cli import Context, main
from aria_trio.cli.output import call, env_text, fields, pages, show, show_list, table, when
from aria_trio.proto.aria.v1 import aria_pb2
from aria_trio.proto.aria.v1 import session_pb2 as pb
from aria_trio.rpc import Channel

SESSIONS = "/aria.v1.SessionService/"
PAGE = 500  # messages asked for per ListMessages page
SHORT = 200  # characters of a tool's arguments or result shown on one line
ROLES = {aria_pb2.SYSTEM: "system", aria_pb2.USER: "you", aria_pb2.ASSISTANT: "assistant", aria_pb2.TOOL: "tool"}


# -- text -----------------------------------------------------------------------------------------


def short(text: str, limit: int = SHORT) -> str:
    """One line of at most `limit` characters."""
    line = " ".join(text.split("\n"))
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _arguments(parameters_json: str) -> str:
    """A call's arguments as compact JSON on one line (as written, if they are not JSON)."""
    try:
        return short(json.dumps(json.loads(parameters_json or "{}"), ensure_ascii=False))
    except ValueError:
        return short(parameters_json)


def call_line(tool_call: pb.ToolCall) -> str:
    """`→ tool(arguments)`: a tool call the assistant made."""
    return f"→ {tool_call.tool_name}({_arguments(tool_call.parameters_json)})"


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("s" if n != 1 else "")


def usage_text(u: pb.TurnUsage, calls: bool = True) -> str:
    """`12+30 tokens, 1.2 s` (and the calls it made): one model call's, or a turn's."""
    tokens = u.prompt_tokens or u.completion_tokens
    parts = [f"{u.prompt_tokens}+{u.completion_tokens} tokens" if tokens else "no token counts"]
    if calls:
        parts.insert(0, f"{_count(u.model_calls, 'model call')}, {_count(u.tool_calls, 'tool call')}")
    parts.append(f"{u.duration_seconds:.1f} s")
    return ", ".join(parts)


def _transcript(messages: list[pb.Message]) -> str:
    """A conversation as people read it: `you:`, `assistant:` (its reasoning, whether it was cut
    short, its model call's usage), `→ tool(args)`, `← tool: result`."""
    lines: list[str] = []
    for m in messages:
        if m.role == aria_pb2.TOOL:
            lines.append(f"← {m.tool_name or 'tool'}: {short(m.content)}")
            continue
        if m.reasoning:
            lines.append(f"(thinking: {short(m.reasoning)})")
        if m.content or m.role != aria_pb2.ASSISTANT:
            lines.append(f"{ROLES.get(m.role, 'unknown')}: {m.content}" + (" [cut short]" if m.truncated else ""))
        elif m.truncated:
            lines.append("assistant: [cut short]")
        lines.extend(call_line(c) for c in m.tool_calls)
        if m.HasField("usage"):
            lines.append(f"  ({usage_text(m.usage, calls=False)})")
    return "\n".join(lines) or "(no messages)"


def _session_text(s: pb.Session) -> str:
    return fields(
        [
            ("id", s.id),
            ("status", s.status),
            ("agent", s.agent_id),
            ("created", when(s.created_at)),
            ("context", env_text(s.context_data.items())),
        ]
    )


# -- sessions -------------------------------------------------------------------------------------


@main.group()
def session() -> None:
    """Start, list, show and end sessions; read their history."""


def _context(ctx: click.Context, param: click.Parameter, pairs: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not (sep and key):
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE")
        found[key] = value
    return found


@session.command("new")
@click.option("--agent", "agent_id", default="", metavar="AGENT_ID", help="The agent to talk to (default: default).")
@click.option("--context", multiple=True, callback=_context, metavar="KEY=VALUE", help="A context entry (repeatable).")
@click.pass_obj
def session_new(obj: Context, agent_id: str, context: dict[str, str]) -> None:
    """Start a session; print its id.

    \b
    Example: aria chat "$(aria session new --agent Calculator)"
    """
    request = pb.CreateSessionRequest(agent_id=agent_id, context_data=context)
    s = call(obj, SESSIONS + "CreateSession", request, pb.Session)
    show(obj, s, s.id)


@session.command("list")
@click.option("--limit", type=click.IntRange(min=0), default=0, help="Sessions per page (0: the server's default).")
@click.option("--page-token", default="", help="The page to show (as a previous listing said).")
@click.option("--all", "every_page", is_flag=True, help="Every page, not just the first.")
@click.pass_obj
def session_list(obj: Context, limit: int, page_token: str, every_page: bool) -> None:
    """List your sessions, newest first."""
    request = pb.ListSessionsRequest(page_size=limit, page_token=page_token)
    reply = pb.ListSessionsResponse

    async def listing(channel: Channel) -> tuple[list[pb.Session], str]:
        return await pages(obj, channel, SESSIONS + "ListSessions", request, reply, lambda p: p.sessions, every_page)

    found, more = obj.run(listing)
    rows = ((s.id, s.status, when(s.created_at), s.agent_id, env_text(s.context_data.items())) for s in found)
    show_list(obj, found, table(("ID", "STATUS", "CREATED", "AGENT", "CONTEXT"), rows, "(no sessions)"))
    if more:
        click.echo(f"(more: --all, or --page-token {more})", err=True)


@session.command("show")
@click.argument("session_id")
@click.pass_obj
def session_show(obj: Context, session_id: str) -> None:
    """Show a session: its status, agent, creation time and context."""
    s = call(obj, SESSIONS + "GetSession", pb.GetSessionRequest(session_id=session_id), pb.Session)
    show(obj, s, _session_text(s))


@session.command("end")
@click.argument("session_id")
@click.pass_obj
def session_end(obj: Context, session_id: str) -> None:
    """End a session; its non-persistent containers are removed.

    Ending an ended session changes nothing.
    """
    s = call(obj, SESSIONS + "EndSession", pb.EndSessionRequest(session_id=session_id), pb.Session)
    show(obj, s, f"ended {s.id} ({s.status})")


@session.command("history")
@click.argument("session_id")
@click.option("--page-size", type=click.IntRange(min=1), default=PAGE, hidden=True)
@click.pass_obj
def session_history(obj: Context, session_id: str, page_size: int) -> None:
    """Print a session's conversation, oldest first.

    `you:` and `assistant:` lines, `→ tool(arguments)` for each call the assistant made and
    `← tool: result` for its result (with --json: every message in full).
    """
    request = pb.ListMessagesRequest(session_id=session_id, page_size=page_size)
    reply = pb.ListMessagesResponse

    async def listing(channel: Channel) -> tuple[list[pb.Message], str]:
        return await pages(obj, channel, SESSIONS + "ListMessages", request, reply, lambda p: p.messages, True)

    found, _ = obj.run(listing)
    show_list(obj, found, _transcript(found))
