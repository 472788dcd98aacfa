"""Aria runtime on Trio: a local daemon for AI agents, served over gRPC on a Unix socket."""

__version__ = "0.1.0"
