"""grpc.health.v1 and server reflection (v1alpha and v1), as stock gRPC tools use them."""

from __future__ import annotations

import grpc
import trio
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from aria_trio.rpc import Health, add_reflection
from aria_trio.rpc.health import DESCRIPTOR as HEALTH
from aria_trio.rpc.health import NOT_SERVING, SERVING

from probe import POOL, Probe, make_server


async def _serve(nursery, sock_dir):
    health = Health()
    server = make_server(Probe())
    server.add_service(HEALTH, health, authenticated=False)
    add_reflection(server, [POOL])
    health.set("probe.v1.Probe", SERVING)
    path = str(sock_dir / "h.sock")
    await nursery.start(server.serve, path)
    return health, path


async def test_health_check_list_and_watch(nursery, sock_dir):
    health, path = await _serve(nursery, sock_dir)
    watching = trio.Event()

    def calls():
        with grpc.insecure_channel("unix:" + path) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            overall = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            probe = stub.Check(health_pb2.HealthCheckRequest(service="probe.v1.Probe"), timeout=5).status
            try:
                stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
            except grpc.RpcError as err:
                unknown = err.code()
            listed = {k: v.status for k, v in stub.List(health_pb2.HealthListRequest(), timeout=5).statuses.items()}
            watch = stub.Watch(health_pb2.HealthCheckRequest(service="probe.v1.Probe"), timeout=10)
            first = next(watch).status
            trio.from_thread.run_sync(watching.set)
            second = next(watch).status
            watch.cancel()
            return overall, probe, unknown, listed, first, second

    async with trio.open_nursery() as n:
        results = {}

        async def client():
            results["r"] = await trio.to_thread.run_sync(calls)

        n.start_soon(client)
        await watching.wait()
        health.set("probe.v1.Probe", NOT_SERVING)
    overall, probe, unknown, listed, first, second = results["r"]
    assert overall == SERVING and probe == SERVING
    assert unknown == grpc.StatusCode.NOT_FOUND
    assert listed == {"": SERVING, "probe.v1.Probe": SERVING}
    assert (first, second) == (SERVING, NOT_SERVING)


async def test_reflection_v1alpha_lists_and_describes(nursery, sock_dir):
    _, path = await _serve(nursery, sock_dir)

    def calls():
        with grpc.insecure_channel("unix:" + path) as ch:
            db = ProtoReflectionDescriptorDatabase(ch)
            services = sorted(db.get_services())
            pool = descriptor_pool.DescriptorPool(db)
            method = pool.FindMethodByName("probe.v1.Probe.ServerStream")
            return services, method.input_type.full_name, [f.name for f in method.input_type.fields]

    services, input_name, fields = await trio.to_thread.run_sync(calls)
    assert services == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "probe.v1.Probe",
    ]
    assert input_name == "probe.v1.Req"
    assert fields == ["mode", "seconds", "n", "data"]


async def test_reflection_v1_answers_like_v1alpha(nursery, sock_dir):
    _, path = await _serve(nursery, sock_dir)

    def calls():
        with grpc.insecure_channel("unix:" + path) as ch:
            # v1 is wire-identical to v1alpha: v1alpha's classes encode v1 requests and answers.
            info = ch.stream_stream(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                reflection_pb2.ServerReflectionRequest.SerializeToString,
                reflection_pb2.ServerReflectionResponse.FromString,
            )
            requests = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health"),
                reflection_pb2.ServerReflectionRequest(file_by_filename="does/not/exist.proto"),
            ]
            return list(info(iter(requests), timeout=5))

    listed, health_file, missing = await trio.to_thread.run_sync(calls)
    assert "grpc.reflection.v1.ServerReflection" in [s.name for s in listed.list_services_response.service]
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in health_file.file_descriptor_response.file_descriptor_proto
    ]
    assert files[0].package == "grpc.health.v1"
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
