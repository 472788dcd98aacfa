"""The agents and tools a user can use: the built-in default agent with its built-in tools, and
whatever the user's bundles registered.

Built-in names are reserved: a bundle cannot shadow `run_command`, `launch_task` or the agent
`default` (its upload is refused), so an agent that asks for a built-in always gets the real one.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from aria_trio.proto.quilt.v1 import quilt_pb2 as q
from aria_trio.runtime.store import registry as table
from aria_trio.runtime.store.registry import AgentRow, BundleRow, NewAgent, NewTool, ToolRow
from aria_trio.shared import errors
from aria_trio.shared.json_input import JSON
from aria_trio.shared.sqlite import Store, now_us

DEFAULT_AGENT = "default"


@dataclass(frozen=True)
class ToolInfo:
    name: str
    description: str
    schema: dict[str, JSON]  # a JSON Schema of its arguments
    builtin: bool = False
    bundle_blake3: str = ""  # a bundle's tool: the bundle Quilt runs it from


@dataclass(frozen=True)
class AgentInfo:
    agent_id: str
    name: str
    description: str
    tools: list[str]
    system_prompt: str = ""
    model: str = ""
    max_iterations: int = 0  # 0: the runtime's default


BUILTIN_TOOLS = {
    t.name: t
    for t in (
        ToolInfo(
            "run_command",
            "Run a command (an argv) in a fresh sandbox and return its exit code, stdout and stderr (capped).",
            {
                "type": "object",
                "properties": {
                    "command": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    "timeout_seconds": {"type": "integer", "minimum": 1, "maximum": 3600},
                },
                "required": ["command"],
                "additionalProperties": False,
            },
            builtin=True,
        ),
        ToolInfo(
            "launch_task",
            "Start a command as a background task and return its id; follow it with the task service.",
            {
                "type": "object",
                "properties": {
                    "command": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    "timeout_seconds": {"type": "integer", "minimum": 0},
                    "environment": {"type": "object", "additionalProperties": {"type": "string"}},
                },
                "required": ["command"],
                "additionalProperties": False,
            },
            builtin=True,
        ),
    )
}
DEFAULT = AgentInfo(
    DEFAULT_AGENT,
    "Default agent",
    "A general assistant that can run commands in sandboxes and start background tasks.",
    list(BUILTIN_TOOLS),
)


def check_names(bundle: q.Bundle) -> None:
    """Refuse a bundle that would shadow a built-in name."""
    shadowed = [t.name for t in bundle.tools if t.name in BUILTIN_TOOLS]
    if shadowed:
        raise errors.InvalidArgument(
            f"tool name {shadowed[0]!r} is reserved for a built-in tool; rename it in manifest.json",
            reason="RESERVED_NAME",
            fields={"manifest.tools": "reserved name"},
        )
    if any(a.name == DEFAULT_AGENT for a in bundle.agents):
        raise errors.InvalidArgument(
            f"agent name {DEFAULT_AGENT!r} is reserved for the built-in agent; rename it in manifest.json",
            reason="RESERVED_NAME",
            fields={"manifest.agents": "reserved name"},
        )


class Registry:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def register(self, user: str, bundle: q.Bundle) -> str:
        """Record an uploaded bundle for the user and register its agents and tools; its id."""
        check_names(bundle)
        now = now_us()
        row = BundleRow(
            id="b-" + secrets.token_hex(8),
            user_id=user,
            name=bundle.name,
            version=bundle.version,
            blake3=bundle.blake3,
            sha256=bundle.sha256,
            size_bytes=bundle.size_bytes,
            manifest_json=bundle.manifest_json,
            filename=bundle.filename,
            layout=bundle.layout,
            created_at=now,
        )
        agents = [
            NewAgent(
                id="ag-" + secrets.token_hex(8),
                name=a.name,
                description=a.description,
                system_prompt=a.system_prompt or None,
                model=a.model or None,
                max_iterations=a.max_iterations or None,
                tools_json=json.dumps(list(a.tools)),
                created_at=now,
            )
            for a in bundle.agents
        ]
        tools = [
            NewTool(
                id="tl-" + secrets.token_hex(8),
                name=t.name,
                description=t.description,
                input_schema_json=t.input_schema_json,
                runtime=t.runtime,
                entry=t.entry,
                created_at=now,
            )
            for t in bundle.tools
        ]
        return await self.store.run(table.register, row, agents, tools)

    async def in_use(self, blake3: str) -> bool:
        return await self.store.run(table.blake3_in_use, blake3)

    async def agents(self, user: str) -> list[AgentInfo]:
        rows = await self.store.run(table.agents, user)
        return [DEFAULT] + [_agent(r) for r in rows]

    async def agent(self, user: str, agent_id: str) -> tuple[AgentInfo, list[ToolInfo]]:
        """The agent (by id, which is its name) and its tools; NOT_FOUND for anyone else's."""
        if agent_id in ("", DEFAULT_AGENT):
            return DEFAULT, list(BUILTIN_TOOLS.values())
        row = await self.store.run(table.agent, user, agent_id)
        if row is None:
            raise errors.NotFound(f"no agent {agent_id!r}", reason="AGENT_NOT_FOUND")
        info = _agent(row)
        own = {r["name"]: _tool(r) for r in await self.store.run(table.tools, user, info.tools)}
        return info, [own[name] for name in info.tools if name in own]

    async def tools(self, user: str) -> list[ToolInfo]:
        return list(BUILTIN_TOOLS.values()) + [_tool(r) for r in await self.store.run(table.tools, user)]


def _agent(row: AgentRow) -> AgentInfo:
    return AgentInfo(
        row["name"],
        row["name"],
        row["description"],
        json.loads(row["tools_json"]),
        row["system_prompt"] or "",
        row["model"] or "",
        row["max_iterations"] or 0,
    )


def _tool(row: ToolRow) -> ToolInfo:
    return ToolInfo(
        row["name"], row["description"], json.loads(row["input_schema_json"]), bundle_blake3=row["bundle_blake3"]
    )
