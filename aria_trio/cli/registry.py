"""`aria agents ...` and `aria tools ...`: what the runtime's registry holds (the built-in agents
and tools, and those of your bundles)."""

from __future__ import annotations

import json

import click

from aria_trio.cli import Context, main
from aria_trio.cli.output import call, fields, show, show_list, table
from aria_trio.proto.aria.v1 import registry_pb2 as registry_pb
from aria_trio.rpc import Channel

REGISTRY = "/aria.v1.RegistryService/"


async def list_agents(obj: Context, channel: Channel) -> list[registry_pb.AgentSummary]:
    request = registry_pb.ListAgentsRequest()
    reply = await channel.unary(REGISTRY + "ListAgents", request, registry_pb.ListAgentsResponse, timeout=obj.timeout)
    return list(reply.agents)


async def list_tools(obj: Context, channel: Channel) -> list[registry_pb.ToolDefinition]:
    request = registry_pb.ListToolsRequest()
    reply = await channel.unary(REGISTRY + "ListTools", request, registry_pb.ListToolsResponse, timeout=obj.timeout)
    return list(reply.tools)


def _schema(schema_json: str) -> object:
    """A tool's parameters' JSON Schema; None if it is not JSON."""
    try:
        return json.loads(schema_json) if schema_json else {}
    except ValueError:
        return None


def signature(schema_json: str) -> str:
    """A tool's parameters at a glance: `(city: string, days?: integer)`."""
    schema = _schema(schema_json)
    if not isinstance(schema, dict):
        return "(?)"
    properties = schema.get("properties") or {}
    required = set(schema.get("required") or ())
    params = []
    for param, spec in properties.items():
        kind = spec.get("type", "any") if isinstance(spec, dict) else "any"
        kind = "|".join(kind) if isinstance(kind, list) else str(kind)
        params.append(f"{param}{'' if param in required else '?'}: {kind}")
    return f"({', '.join(params)})"


def _tool_text(t: registry_pb.ToolDefinition, with_schema: bool) -> str:
    """`name(parameters)  description`, then (with_schema) its JSON Schema pretty-printed."""
    line = f"{t.name}{signature(t.parameters_json_schema)}" + (f"  {t.description}" if t.description else "")
    if not with_schema:
        return line
    schema = _schema(t.parameters_json_schema)
    pretty = json.dumps(schema, indent=2, sort_keys=True) if schema is not None else t.parameters_json_schema
    return line + "\n" + "\n".join("    " + s for s in pretty.splitlines())


@main.group()
def agents() -> None:
    """The agents you can start sessions with."""


@agents.command("list")
@click.pass_obj
def agents_list(obj: Context) -> None:
    """List your agents (the built-in ones and those of your bundles)."""
    found = obj.run(lambda channel: list_agents(obj, channel))
    rows = ((a.agent_id, a.name, a.description) for a in found)
    show_list(obj, found, table(("AGENT ID", "NAME", "DESCRIPTION"), rows, "(no agents)"))


@agents.command("show")
@click.argument("agent_id")
@click.pass_obj
def agents_show(obj: Context, agent_id: str) -> None:
    """Show an agent and its tools, with their parameters' JSON Schemas."""
    request = registry_pb.GetAgentDetailsRequest(agent_id=agent_id)
    a = call(obj, REGISTRY + "GetAgentDetails", request, registry_pb.AgentDefinition)
    head = fields([("agent", a.agent_id), ("name", a.name), ("description", a.description)])
    tools = "\n".join("  " + _tool_text(t, with_schema=True) for t in a.tools) or "  (none)"
    show(obj, a, f"{head}\ntools:\n{tools}")


@main.group()
def tools() -> None:
    """The tools your agents can call."""


@tools.command("list")
@click.option("--schema", "-s", "with_schema", is_flag=True, help="Also print each tool's full JSON Schema.")
@click.pass_obj
def tools_list(obj: Context, with_schema: bool) -> None:
    """List your tools and their parameters.

    Built-in tools and those of your bundles; `name?` marks an optional parameter.
    """
    found = obj.run(lambda channel: list_tools(obj, channel))
    show_list(obj, found, "\n".join(_tool_text(t, with_schema) for t in found) or "(no tools)")
