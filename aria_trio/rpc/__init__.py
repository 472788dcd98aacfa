"""The purerpc adapter: gRPC over Unix sockets under Trio, with the behaviour a daemon needs."""

from .client import Channel, ClientCall
from .context import CallContext, Identity, PeerCred
from .health import Health
from .reflection import add_reflection, renamed_pool
from .server import Method, Server, methods_of
from .status import RpcError, StatusCode

__all__ = [
    "CallContext",
    "Channel",
    "ClientCall",
    "Health",
    "Identity",
    "Method",
    "PeerCred",
    "RpcError",
    "Server",
    "StatusCode",
    "add_reflection",
    "methods_of",
    "renamed_pool",
]
