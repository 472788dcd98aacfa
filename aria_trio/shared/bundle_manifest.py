"""`.aria` bundles: the archive layouts and manifest.json, checked per BUNDLES.md.

Used by quilt (to accept an upload) and by the runtime (to register agents and tools). Checking
is all-or-nothing: the first problem found rejects the whole bundle with a message that names it.
"""

from __future__ import annotations

import posixpath
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import IO

import blake3
import jsonschema

from aria_trio.shared import json_input
from aria_trio.shared.json_input import JSON

MAX_MANIFEST = 1024 * 1024
MAX_MEMBERS = 20_000
MAX_UNPACKED = 1024 * 1024 * 1024  # all members together, uncompressed
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,127}")
TYPES = {"string", "number", "integer", "boolean", "object", "array"}


class InvalidBundle(Exception):
    """Why the bundle is refused, in words for the uploader."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    input_schema: dict[str, JSON]
    runtime: str  # python, node
    entry: str  # path inside the (inner) archive


@dataclass(frozen=True)
class Agent:
    name: str
    description: str
    tools: list[str]
    system_prompt: str = ""
    model: str = ""
    max_iterations: int = 0


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    tools: list[Tool]
    agents: list[Agent]
    layout: str  # flat, nested
    raw: dict[str, JSON] = field(repr=False)

    def tool(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)


def schema_of(inputs: object, where: str) -> dict[str, JSON]:
    """A tool's `inputs` as a JSON Schema: a flat map is converted (every parameter required)."""
    if inputs is None:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    if not isinstance(inputs, dict):
        raise InvalidBundle(f"{where}: inputs must be an object")
    if inputs.get("type") == "object" and ("properties" in inputs or "required" in inputs or len(inputs) == 1):
        try:
            jsonschema.Draft202012Validator.check_schema(inputs)
        except jsonschema.SchemaError as exc:
            raise InvalidBundle(f"{where}: inputs is not a valid JSON Schema: {exc.message}") from None
        return inputs
    properties: dict[str, JSON] = {}
    for param, kind in inputs.items():
        if not isinstance(param, str) or not param:
            raise InvalidBundle(f"{where}: parameter names must be non-empty strings")
        properties[param] = {"type": kind} if isinstance(kind, str) and kind in TYPES else {}
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def check_member_names(names: list[str], archive: str) -> None:
    if len(names) > MAX_MEMBERS:
        raise InvalidBundle(f"{archive} has {len(names)} entries; at most {MAX_MEMBERS} are allowed")
    for name in names:
        normal = posixpath.normpath(name)
        if name.startswith("/") or "\\" in name or normal == ".." or normal.startswith("../") or ":" in name[:3]:
            raise InvalidBundle(f"{archive}: the path {name!r} escapes the archive")


def _open_zip(data: IO[bytes], archive: str) -> zipfile.ZipFile:
    try:
        z = zipfile.ZipFile(data)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InvalidBundle(f"{archive} is not a ZIP archive ({exc})") from None
    infos = z.infolist()
    check_member_names([i.filename for i in infos], archive)
    if sum(i.file_size for i in infos) > MAX_UNPACKED:
        raise InvalidBundle(f"{archive} would unpack to more than {MAX_UNPACKED} bytes")
    return z


def _read(z: zipfile.ZipFile, name: str, archive: str, limit: int) -> bytes:
    info = z.getinfo(name)
    if info.file_size > limit:
        raise InvalidBundle(f"{archive}: {name} is larger than {limit} bytes")
    try:
        return z.read(info)
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError) as exc:
        raise InvalidBundle(f"{archive}: cannot read {name} ({exc})") from None


def inspect_bundle(path: str) -> Manifest:
    """Check the bundle file at `path`, both layouts; its manifest, or InvalidBundle.
    Memory stays small whatever the size: the inner archive is copied to a temporary file."""
    with open(path, "rb") as f, _open_zip(f, "the bundle") as outer:
        names = set(outer.namelist())
        if "manifest.json" in names:
            return parse_manifest(_read(outer, "manifest.json", "the bundle", MAX_MANIFEST), names, "flat")
        if "bundle.zip" not in names:
            raise InvalidBundle("the bundle has neither manifest.json (flat layout) nor bundle.zip (nested layout)")
        build = None
        if "metadata/build.json" in names:
            build = _read(outer, "metadata/build.json", "the bundle", MAX_MANIFEST)
        with tempfile.TemporaryFile() as inner_file:
            digest = blake3.blake3()
            try:
                with outer.open("bundle.zip") as member:
                    while chunk := member.read(1024 * 1024):
                        inner_file.write(chunk)
                        digest.update(chunk)
            except (zipfile.BadZipFile, OSError, ValueError, RuntimeError) as exc:
                raise InvalidBundle(f"the bundle: cannot read bundle.zip ({exc})") from None
            if build is not None:
                _check_build(build, digest.hexdigest())
            inner_file.seek(0)
            with _open_zip(inner_file, "bundle.zip") as inner:
                inner_names = set(inner.namelist())
                if "manifest.json" not in inner_names:
                    raise InvalidBundle("bundle.zip has no manifest.json")
                return parse_manifest(_read(inner, "manifest.json", "bundle.zip", MAX_MANIFEST), inner_names, "nested")


def _check_build(raw: bytes, inner_blake3: str) -> None:
    try:
        build = json_input.loads(raw)
    except ValueError:
        raise InvalidBundle("metadata/build.json is not JSON") from None
    if not isinstance(build, dict):
        raise InvalidBundle("metadata/build.json must be an object")
    expected = build.get("build_hash")
    if expected is not None and expected != inner_blake3:
        raise InvalidBundle("metadata/build.json's build_hash does not match bundle.zip (a damaged bundle?)")


def parse_manifest(raw: bytes, files: set[str], layout: str) -> Manifest:
    try:
        data = json_input.loads(raw)
    except ValueError as exc:
        raise InvalidBundle(f"manifest.json is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidBundle("manifest.json must be a JSON object")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidBundle("manifest.json is missing name")
    version = data.get("version", "")
    if not isinstance(version, str):
        raise InvalidBundle("manifest.json: version must be a string")
    for key in ("tools", "agents", "teams", "pipelines"):
        if not isinstance(data.get(key, []), list):
            raise InvalidBundle(f"manifest.json: {key} must be a list")
    tools = [_tool(t, i, files) for i, t in enumerate(data.get("tools", []))]
    _unique([t.name for t in tools], "tool")
    agents = [_agent(a, i, {t.name for t in tools}) for i, a in enumerate(data.get("agents", []))]
    _unique([a.name for a in agents], "agent")
    for key in ("teams", "pipelines"):
        for i, item in enumerate(data.get(key, [])):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
                raise InvalidBundle(f"manifest.json: {key}[{i}] needs a name")
        _unique([item["name"] for item in data.get(key, [])], key[:-1])
    return Manifest(name, version, tools, agents, layout, data)


def _unique(names: list[str], kind: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise InvalidBundle(f"manifest.json: the {kind} name {n!r} is used twice")
        seen.add(n)


def _tool(item: object, i: int, files: set[str]) -> Tool:
    where = f"manifest.json: tools[{i}]"
    if not isinstance(item, dict):
        raise InvalidBundle(f"{where} must be an object")
    name = item.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidBundle(f"{where} needs a name (letters, digits, _ . -)")
    where = f"manifest.json: tool {name!r}"
    description = item.get("description", "")
    if not isinstance(description, str):
        raise InvalidBundle(f"{where}: description must be a string")
    schema = schema_of(item.get("inputs"), where)
    entry = item.get("entry")
    runtime = item.get("runtime")
    if entry is None:
        candidates = [f"implementations/tools/{name}.py", f"implementations/tools/{name}.js"]
        if runtime == "node":
            candidates.reverse()
        entry = next((c for c in candidates if c in files), None)
        if entry is None:
            raise InvalidBundle(
                f"{where}: no entry given and neither {candidates[0]} nor {candidates[1]} is in the bundle"
            )
    if not isinstance(entry, str) or entry not in files:
        raise InvalidBundle(f"{where}: its entry {entry!r} is not in the bundle")
    if runtime is None:
        runtime = "python" if entry.endswith(".py") else "node" if entry.endswith((".js", ".mjs", ".cjs")) else None
    if runtime not in ("python", "node"):
        raise InvalidBundle(f'{where}: runtime must be "python" or "node"')
    return Tool(name, description, schema, runtime, entry)


def _agent(item: object, i: int, tools: set[str]) -> Agent:
    where = f"manifest.json: agents[{i}]"
    if not isinstance(item, dict):
        raise InvalidBundle(f"{where} must be an object")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidBundle(f"{where} needs a name")
    where = f"manifest.json: agent {name!r}"
    names = item.get("tools", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InvalidBundle(f"{where}: tools must be a list of tool names")
    for n in names:
        if n not in tools:
            raise InvalidBundle(f"{where} names the tool {n!r}, which the bundle does not define")
    iterations = item.get("max_iterations", 0)
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
        raise InvalidBundle(f"{where}: max_iterations must be a positive integer")
    fields = {k: item.get(k, "") for k in ("description", "system_prompt", "model")}
    for key, value in fields.items():
        if not isinstance(value, str):
            raise InvalidBundle(f"{where}: {key} must be a string")
    return Agent(name, fields["description"], list(names), fields["system_prompt"], fields["model"], iterations)
