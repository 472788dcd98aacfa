"""`aria prefs ...`: read and change your preferences (the model your agents use, ...)."""

from __future__ import annotations

import json
import sys
from typing import TypeAlias

import click
from google.protobuf import json_format, struct_pb2

from aria_trio.cli import Context, main
from aria_trio.cli.output import call
from aria_trio.proto.aria.v1 import user_preference_pb2 as prefs_pb
from aria_trio.rpc import Channel

PREFS = "/aria.v1.UserPreferenceService/"

JSON: TypeAlias = "str | int | float | bool | list[JSON] | dict[str, JSON] | None"


@main.group()
def prefs() -> None:
    """Read and change your preferences (llm.model, llm.temperature, llm.base_url, ...)."""


def _values(message: prefs_pb.UserPreferences) -> dict[str, JSON]:
    """The preferences as JSON values; a whole number as an int (a Struct holds only floats)."""
    return {k: _number_or_value(v) for k, v in json_format.MessageToDict(message.preferences).items()}


def _number_or_value(value: JSON) -> JSON:
    return int(value) if isinstance(value, float) and value.is_integer() else value


@prefs.command("get")
@click.argument("key", required=False)
@click.pass_obj
def prefs_get(obj: Context, key: str | None) -> None:
    """Print all preferences, or the value of KEY."""

    request = prefs_pb.GetUserPreferencesRequest()
    values = _values(call(obj, PREFS + "GetUserPreferences", request, prefs_pb.UserPreferences))
    if key is None:
        obj.output(
            values, "\n".join(f"{k} = {json.dumps(v)}" for k, v in sorted(values.items())) or "(no preferences set)"
        )
    elif key in values:
        value = values[key]
        obj.output(value, value if isinstance(value, str) else json.dumps(value))
    else:
        click.echo(f"error: {key} is not set", err=True)
        sys.exit(1)


def _update(obj: Context, updates: dict[str, JSON]) -> None:
    async def update(channel: Channel) -> prefs_pb.UserPreferences:
        struct = struct_pb2.Struct()
        struct.update(updates)
        return await channel.unary(
            PREFS + "UpdateUserPreferences",
            prefs_pb.UpdateUserPreferencesRequest(updates=struct),
            prefs_pb.UserPreferences,
            timeout=obj.timeout,
        )

    values = _values(obj.run(update))
    key = next(iter(updates))
    if key in values:
        obj.output(values, f"{key} = {json.dumps(values[key])}")
    else:
        obj.output(values, f"{key} removed")


@prefs.command("set")
@click.argument("key")
@click.argument("value")
@click.option("--string", "as_string", is_flag=True, help="Store VALUE as a string even if it reads as JSON.")
@click.pass_obj
def prefs_set(obj: Context, key: str, value: str, as_string: bool) -> None:
    """Set KEY to VALUE. VALUE is read as JSON when it is JSON (0.7, true, {"a": 1}), else as text.

    \b
    Examples:
      aria prefs set llm.model llama3.1
      aria prefs set llm.temperature 0.2
      aria prefs set llm.base_url http://127.0.0.1:11434/v1
    """
    parsed: JSON = value
    if not as_string:
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
    if parsed is None:
        raise click.UsageError("null removes a key: use `aria prefs unset KEY`")
    _update(obj, {key: parsed})


@prefs.command("unset")
@click.argument("key")
@click.pass_obj
def prefs_unset(obj: Context, key: str) -> None:
    """Remove KEY."""
    _update(obj, {key: None})
