"""`aria bundle upload`: send a .aria bundle to the runtime, which registers its agents and tools."""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import click
import trio

from aria_trio.cli import Context, main
from aria_trio.cli.output import as_dict
from aria_trio.cli.registry import list_agents, list_tools, signature
from aria_trio.proto.aria.v1 import bundle_pb2 as bundle_pb
from aria_trio.proto.aria.v1 import registry_pb2 as registry_pb
from aria_trio.rpc import Channel

BUNDLES = "/aria.v1.BundleService/"
CHUNK = 1024 * 1024


@main.group()
def bundle() -> None:
    """Upload .aria bundles (their agents and tools get registered)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while data := f.read(CHUNK):
            digest.update(data)
    return digest.hexdigest()


class _Progress:
    """` 42%  3.0 / 7.1 MiB  12.3 MiB/s`, rewritten in place on stderr (a terminal), when shown at all."""

    def __init__(self, total: int, shown: bool) -> None:
        self.total, self.shown, self.started = total, shown, time.monotonic()

    def update(self, sent: int) -> None:
        if self.shown:
            rate = sent / CHUNK / max(time.monotonic() - self.started, 1e-6)
            percent = sent * 100 // max(self.total, 1)
            line = f"\r{percent:3d}%  {sent / CHUNK:.1f} / {self.total / CHUNK:.1f} MiB  {rate:.1f} MiB/s\x1b[K"
            click.echo(line, err=True, nl=False)

    def close(self) -> None:
        if self.shown:
            click.echo("", err=True)


async def _upload_requests(
    path: Path, metadata: bundle_pb.BundleMetadata, progress: _Progress
) -> AsyncIterator[bundle_pb.UploadBundleRequest]:
    """The metadata, then the file in 1 MiB chunks."""
    yield bundle_pb.UploadBundleRequest(metadata=metadata)
    sent = 0
    try:
        async with await trio.open_file(path, "rb") as f:  # reads run in a worker thread
            while data := await f.read(CHUNK):
                yield bundle_pb.UploadBundleRequest(chunk=data)
                sent += len(data)
                progress.update(sent)
    finally:
        progress.close()


_Agents = list[registry_pb.AgentSummary]
_Tools = list[registry_pb.ToolDefinition]


def _registered(
    path: Path, agents: Sequence[registry_pb.AgentSummary], tools: Sequence[registry_pb.ToolDefinition]
) -> tuple[_Agents, _Tools]:
    """Of the registry's agents and tools, those the bundle at `path` defines (by name)."""
    from aria_trio.shared.bundle_manifest import InvalidBundle, inspect_bundle

    try:
        manifest = inspect_bundle(str(path))
    except InvalidBundle:
        return [], []
    agent_names = {a.name for a in manifest.agents}
    tool_names = {t.name for t in manifest.tools}
    return [a for a in agents if a.name in agent_names], [t for t in tools if t.name in tool_names]


@bundle.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="The bundle's name (default: the file's name).")
@click.option("--no-checksum", is_flag=True, help="Do not send a SHA-256 of the file for the server to check.")
@click.pass_obj
def bundle_upload(obj: Context, path: Path, name: str | None, no_checksum: bool) -> None:
    """Upload a bundle; print its id, agents and tools.

    It goes in 1 MiB chunks with its SHA-256, showing progress on a terminal.
    """

    size = path.stat().st_size
    progress = _Progress(size, shown=sys.stderr.isatty() and not obj.as_json)

    async def upload(channel: Channel) -> tuple[bundle_pb.UploadBundleResponse, _Agents, _Tools]:
        checksum = "" if no_checksum else await trio.to_thread.run_sync(_sha256, path)
        metadata = bundle_pb.BundleMetadata(name=name or path.name, total_size_bytes=size, sha256_checksum=checksum)
        reply = await channel.stream_unary(
            BUNDLES + "UploadBundle", _upload_requests(path, metadata, progress), bundle_pb.UploadBundleResponse
        )
        if not reply.success:
            return reply, [], []
        agents, tools = await list_agents(obj, channel), await list_tools(obj, channel)
        mine = await trio.to_thread.run_sync(_registered, path, agents, tools)
        return reply, *mine

    reply, agents, tools = obj.run(upload)
    if not reply.success:
        click.echo(f"error: upload failed: {reply.error_message or 'no reason given'}", err=True)
        sys.exit(1)
    text = [reply.bundle_id]
    text += [f"  agent {a.agent_id}  {a.name}" for a in agents]
    text += [f"  tool  {t.name}{signature(t.parameters_json_schema)}" for t in tools]
    obj.output(
        {**as_dict(reply), "agents": [as_dict(a) for a in agents], "tools": [as_dict(t) for t in tools]},
        "\n".join(text),
    )
