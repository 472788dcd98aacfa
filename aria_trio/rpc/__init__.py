"""The purerpc adapter: gRPC over Unix sockets under Trio, with the behaviour a daemon needs."""

from aria_trio.rpc.client import Channel, ClientCall
from aria_trio.rpc.context import CallContext, Identity, PeerCred
from aria_trio.rpc.health import Health
from aria_trio.rpc.methods import Method, methods_of
from aria_trio.rpc.reflection import add_reflection, renamed_pool
from aria_trio.rpc.server import Server
from aria_trio.rpc.status import RpcError, StatusCode

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
