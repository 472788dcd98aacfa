"""`aria health`: whether the runtime is serving (its grpc.health.v1 statuses)."""

from __future__ import annotations

import sys

import click
from grpc_health.v1 import health_pb2

from aria_trio.cli import Context, main
from aria_trio.cli.output import call


@main.command()
@click.pass_obj
def health(obj: Context) -> None:
    """Ask the runtime whether it is serving (exit 0 if so, 1 if not)."""

    answer = call(obj, "/grpc.health.v1.Health/List", health_pb2.HealthListRequest(), health_pb2.HealthListResponse)
    statuses = {
        name: health_pb2.HealthCheckResponse.ServingStatus.Name(s.status) for name, s in answer.statuses.items()
    }
    overall = statuses.get("", "UNKNOWN")
    text = "\n".join([overall] + [f"  {name}: {status}" for name, status in sorted(statuses.items()) if name])
    obj.output({"status": overall, "services": {k: v for k, v in statuses.items() if k}}, text)
    sys.exit(0 if overall == "SERVING" else 1)
