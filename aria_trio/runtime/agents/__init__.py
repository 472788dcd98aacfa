"""Agents and turns: sessions, the turn loop, tool calls, the registry of agents and tools, the model."""
