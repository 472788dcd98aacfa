"""aria.v1.RegistryService: the agents and tools the caller can use."""

from __future__ import annotations

import json

from aria_trio.proto.aria.v1 import registry_grpc
from aria_trio.proto.aria.v1 import registry_pb2 as pb
from aria_trio.rpc import CallContext
from aria_trio.runtime.agents.registry import Registry, ToolInfo
from aria_trio.shared import errors


def _tool(t: ToolInfo) -> pb.ToolDefinition:
    return pb.ToolDefinition(
        name=t.name, description=t.description, parameters_json_schema=json.dumps(t.schema, sort_keys=True)
    )


class RegistryService(registry_grpc.RegistryServiceServicer):  # type: ignore[misc]
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def ListAgents(self, request: pb.ListAgentsRequest, ctx: CallContext) -> pb.ListAgentsResponse:
        agents = await self.registry.agents(ctx.user)
        return pb.ListAgentsResponse(
            agents=[pb.AgentSummary(agent_id=a.agent_id, name=a.name, description=a.description) for a in agents]
        )

    async def GetAgentDetails(self, request: pb.GetAgentDetailsRequest, ctx: CallContext) -> pb.AgentDefinition:
        if not request.agent_id:
            raise errors.InvalidArgument("agent_id is required", fields={"agent_id": "missing"})
        agent, tools = await self.registry.agent(ctx.user, request.agent_id)
        return pb.AgentDefinition(
            agent_id=agent.agent_id, name=agent.name, description=agent.description, tools=[_tool(t) for t in tools]
        )

    async def ListTools(self, request: pb.ListToolsRequest, ctx: CallContext) -> pb.ListToolsResponse:
        return pb.ListToolsResponse(tools=[_tool(t) for t in await self.registry.tools(ctx.user)])
