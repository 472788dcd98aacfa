"""What a server serves: its methods, described from the services' protobuf descriptors.

A method is its path, its message types, its cardinality, the handler that implements it (or
None: the API has it but this server does not yet) and whether it needs an authenticated caller.
The server (server.py) routes calls by path to these, and reflection (reflection.py) lists them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message


@dataclasses.dataclass(frozen=True)
class Method:
    path: str
    request_type: type[Message]
    response_type: type[Message]
    client_streaming: bool
    server_streaming: bool
    # impl.Method(request_or_requests, ctx) -> response | async iterator of responses.
    # None: the service is known but this method is not built yet (UNIMPLEMENTED, said plainly).
    handler: Callable[..., Any] | None
    authenticated: bool


def methods_of(
    descriptor: ServiceDescriptor,
    impl: object,
    *,
    service_name: str | None = None,
    authenticated: bool = True,
) -> list[Method]:
    """The methods of a service from its descriptor; `impl` provides those it implements.

    A method `impl` inherits from a purerpc-generated Servicer base (which only raises
    NotImplementedError) counts as not implemented."""
    get_class = message_factory.GetMessageClass
    name = service_name or descriptor.full_name
    out = []
    for m in descriptor.methods:
        fn = getattr(impl, m.name, None)
        if fn is not None and _is_generated_stub(type(impl), m.name):
            fn = None
        out.append(
            Method(
                path=f"/{name}/{m.name}",
                request_type=get_class(m.input_type),
                response_type=get_class(m.output_type),
                client_streaming=m.client_streaming,
                server_streaming=m.server_streaming,
                handler=fn,
                authenticated=authenticated,
            )
        )
    return out


def _is_generated_stub(cls: type, name: str) -> bool:
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass.__module__.endswith("_grpc")
    return False
