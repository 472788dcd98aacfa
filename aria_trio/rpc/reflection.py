"""gRPC server reflection (v1 and v1alpha), so grpcurl, grpcui and evans work on the socket.

grpcio-reflection ships only the v1alpha descriptors; v1 is wire-identical, so its descriptor is
that file with the package renamed. The same renaming serves the API's legacy package name
(`aria.TaskService` next to `aria.v1.TaskService`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha  # descriptors only, no grpcio

from aria_trio.rpc.context import CallContext
from aria_trio.rpc.methods import methods_of
from aria_trio.rpc.server import Server

NOT_FOUND = 5


def renamed_pool(
    files: Iterable[FileDescriptor], old_package: str, new_package: str, rename_file: Callable[[str], str]
) -> descriptor_pool.DescriptorPool:
    """A pool holding copies of `files` with `old_package` renamed (type references included).

    Dependencies outside the set are copied unchanged."""
    files = list(files)
    names = {f.name for f in files}
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    old_ref, new_ref = f".{old_package}.", f".{new_package}."

    def add(fd: FileDescriptor) -> None:
        if fd.name in added:
            return
        for dep in fd.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        if fd.name in names:
            proto.name = rename_file(fd.name)
            proto.package = new_package
            proto.dependency[:] = [rename_file(d) if d in names else d for d in proto.dependency]
            for message in _all_messages(proto.message_type):
                for field in message.field:
                    if field.HasField("type_name"):
                        field.type_name = field.type_name.replace(old_ref, new_ref)
            for service in proto.service:
                for method in service.method:
                    method.input_type = method.input_type.replace(old_ref, new_ref)
                    method.output_type = method.output_type.replace(old_ref, new_ref)
        pool.Add(proto)
        added.add(fd.name)

    for fd in files:
        add(fd)
    return pool


def _all_messages(messages: Iterable[descriptor_pb2.DescriptorProto]) -> Iterable[descriptor_pb2.DescriptorProto]:
    for m in messages:
        yield m
        yield from _all_messages(m.nested_type)


_V1_POOL = renamed_pool(
    [v1alpha.DESCRIPTOR],
    "grpc.reflection.v1alpha",
    "grpc.reflection.v1",
    lambda name: name.replace("v1alpha", "v1"),
)
V1_SERVICE: ServiceDescriptor = _V1_POOL.FindServiceByName("grpc.reflection.v1.ServerReflection")
V1ALPHA_SERVICE: ServiceDescriptor = v1alpha.DESCRIPTOR.services_by_name["ServerReflection"]


class Reflection:
    def __init__(self, server: Server, response_type: Any, pools: list[descriptor_pool.DescriptorPool]) -> None:
        self.server = server
        self.response_type = response_type
        self.pools = pools

    async def ServerReflectionInfo(self, requests: AsyncIterator[Any], ctx: CallContext) -> AsyncIterator[Any]:
        sent: set[str] = set()  # files already sent on this stream, as grpc-go does
        async for request in requests:
            yield self._answer(request, sent)

    def _find(self, lookup: Callable[[descriptor_pool.DescriptorPool], Any]) -> Any:
        """The first pool's answer; KeyError when no pool knows."""
        for pool in self.pools:
            try:
                return lookup(pool)
            except KeyError:
                continue
        raise KeyError

    def _answer(self, request: Any, sent: set[str]) -> Any:
        respond = self.response_type
        kind = request.WhichOneof("message_request")
        try:
            if kind == "list_services":
                services = [{"name": name} for name in self.server.service_names]
                return respond(original_request=request, list_services_response={"service": services})
            if kind == "file_by_filename":
                fd = self._find(lambda p: p.FindFileByName(request.file_by_filename))
            elif kind == "file_containing_symbol":
                fd = self._find(lambda p: _file_containing(p, request.file_containing_symbol))
            elif kind == "file_containing_extension":
                ext = request.file_containing_extension
                fd = self._find(lambda p: p.FindFileContainingSymbol(_extension(p, ext).full_name))
            elif kind == "all_extension_numbers_of_type":
                name = request.all_extension_numbers_of_type
                numbers = self._find(
                    lambda p: sorted(e.number for e in p.FindAllExtensions(p.FindMessageTypeByName(name)))
                )
                return respond(
                    original_request=request,
                    all_extension_numbers_response={"base_type_name": name, "extension_number": numbers},
                )
            else:
                return respond(
                    original_request=request, error_response={"error_code": 3, "error_message": "unknown request"}
                )
        except KeyError:
            return respond(
                original_request=request, error_response={"error_code": NOT_FOUND, "error_message": "not found"}
            )
        return respond(
            original_request=request, file_descriptor_response={"file_descriptor_proto": _with_deps(fd, sent)}
        )


def _extension(pool: descriptor_pool.DescriptorPool, ext: Any) -> Any:
    return pool.FindExtensionByNumber(pool.FindMessageTypeByName(ext.containing_type), ext.extension_number)


def _file_containing(pool: descriptor_pool.DescriptorPool, symbol: str) -> FileDescriptor:
    try:
        return pool.FindFileContainingSymbol(symbol)
    except KeyError:
        # upb's pool does not resolve methods ("pkg.Service.Method"), which grpcurl asks for.
        service, _, method = symbol.rpartition(".")
        found = pool.FindServiceByName(service)
        if method not in found.methods_by_name:
            raise
        return found.file


def _with_deps(fd: FileDescriptor, sent: set[str]) -> list[bytes]:
    out: list[bytes] = []

    def walk(f: FileDescriptor, first: bool) -> None:
        if f.name in sent and not first:
            return
        sent.add(f.name)
        proto = descriptor_pb2.FileDescriptorProto()
        f.CopyToProto(proto)
        out.append(proto.SerializeToString())
        for dep in f.dependencies:
            walk(dep, False)

    walk(fd, True)
    return out


def add_reflection(server: Server, extra_pools: Iterable[descriptor_pool.DescriptorPool] = ()) -> None:
    """Serve reflection v1alpha and v1 for everything registered on `server` (now or later)."""
    pools = [descriptor_pool.Default(), *extra_pools, _V1_POOL]
    server.add_methods(
        methods_of(V1ALPHA_SERVICE, Reflection(server, v1alpha.ServerReflectionResponse, pools), authenticated=False)
    )
    v1_response = message_factory.GetMessageClass(
        _V1_POOL.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")
    )
    server.add_methods(methods_of(V1_SERVICE, Reflection(server, v1_response, pools), authenticated=False))
