"""The `aria` command: `aria serve` runs the runtime; the other verbs talk to it over its socket."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TypeVar

import click
import trio

from aria_trio import __version__
from aria_trio.cli.output import error_line
from aria_trio.rpc import Channel, RpcError
from aria_trio.shared.config import (
    QUILT_SETTINGS,
    RUNTIME_SETTINGS,
    ConfigError,
    Setting,
    SettingsT,
    Table,
    default_config_path,
    resolve,
)

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., object])


class Context:
    """What the group's options give the client verbs."""

    def __init__(self, socket: str | None, as_json: bool, timeout: float) -> None:
        self._socket = socket
        self.quilt_socket_flag: str | None = None  # set by `aria quilt --socket`
        self.as_json = as_json
        self.timeout = timeout

    @property
    def socket(self) -> str:
        return self._socket or str(_configured(RUNTIME_SETTINGS, None).socket)

    @property
    def quilt_socket(self) -> str:
        return self.quilt_socket_flag or str(_configured(QUILT_SETTINGS, "quilt").socket)

    def run(self, fn: Callable[[Channel], Awaitable[T]], socket: str | None = None) -> T:
        """Connect (to the runtime, or `socket`), run fn(channel), and turn an RPC error into a
        message and an exit status."""

        async def main() -> T:
            async with Channel.connect(socket or self.socket) as channel:
                return await fn(channel)

        try:
            return trio.run(main)
        except RpcError as exc:
            click.echo(error_line(exc), err=True)
            sys.exit(1)

    def output(self, value: object, text: str | None = None) -> None:
        if self.as_json or text is None:
            click.echo(json.dumps(value, indent=None if self.as_json else 2, sort_keys=True))
        else:
            click.echo(text)


def _configured(declared: Table[SettingsT], section: str | None) -> SettingsT:
    try:
        return resolve(declared, {}, config_path=default_config_path(), section=section)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="aria")
@click.option(
    "--socket",
    metavar="PATH",
    envvar="ARIA_RUNTIME_SOCK",
    help="The runtime's socket [env ARIA_RUNTIME_SOCK; default ~/.aria/runtime.sock].",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait for an answer.")
@click.pass_context
def main(ctx: click.Context, socket: str | None, as_json: bool, timeout: float) -> None:
    """Aria: a local runtime for AI agents, served over gRPC on a Unix socket."""
    ctx.obj = Context(socket, as_json, timeout)


def settings_options(settings: tuple[Setting, ...], section: str | None = None) -> Callable[[F], F]:
    """A click option per setting, its help naming the environment variable and config key."""
    where = f"[{section}] " if section else ""

    def decorate(fn: F) -> F:
        for s in reversed(settings):
            default = s.default()
            kind = click.Choice(s.choices) if s.choices else None
            fn = click.option(
                s.flag,
                s.name,
                type=kind,
                default=None,
                metavar=s.name.upper() if not s.choices else None,
                help=f"{s.help} [env {s.env}; config {where}{s.name}; default {default}]",
            )(fn)
        return fn

    return decorate


CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Settings file [env ARIA_CONFIG; default ~/.aria/config.toml]. Flags beat environment beats file.",
)


def run_daemon(
    name: str,
    declared: Table[SettingsT],
    flags: Mapping[str, object],
    config_path: Path | None,
    section: str | None,
    serve_fn: Callable[[SettingsT], Awaitable[None]],
) -> None:
    """Resolve the settings, set up logging, run `serve_fn` under trio; startup errors exit 1."""
    from aria_trio.shared import errors, logs
    from aria_trio.shared.lifecycle import StartupError

    try:
        settings = resolve(declared, flags, config_path=config_path or default_config_path(), section=section)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    logs.setup(settings.log_level, settings.log_format)
    os.umask(0o077)  # databases hold API keys and bundles: every file made is this user's alone
    try:
        trio.run(serve_fn, settings)
    except (StartupError, BaseExceptionGroup) as exc:
        inner = errors.single(exc)  # (a background service that could not start: out of a nursery)
        if not isinstance(inner, StartupError):
            raise
        click.echo(f"{name}: {inner}", err=True)
        sys.exit(1)
    except PermissionError as exc:
        click.echo(f"{name}: {exc.strerror}: {exc.filename}", err=True)
        sys.exit(1)


@main.command()
@CONFIG_OPTION
@settings_options(RUNTIME_SETTINGS)
@click.pass_context
def serve(ctx: click.Context, /, config_path: Path | None, **flags: object) -> None:
    """Run the runtime daemon in the foreground until SIGTERM or SIGINT.

    Serves aria.v1 (and the legacy aria.* names), grpc.health.v1 and server reflection on a Unix
    socket. Tells systemd when it is ready ($NOTIFY_SOCKET). At SIGTERM/SIGINT it stops taking
    calls, gives in-flight ones --grace seconds, ends streams with UNAVAILABLE, removes its
    socket and exits 0; a second signal cuts the grace short.

    The model agents talk to (an OpenAI-compatible server) is each user's preferences llm.base_url,
    llm.model, llm.api_key, llm.temperature, llm.system_prompt (`aria prefs set`), else the
    environment: ARIA_LLM_BASE_URL, ARIA_LLM_MODEL, ARIA_LLM_API_KEY, else OPENAI_BASE_URL and
    OPENAI_API_KEY.
    """
    from aria_trio.runtime.daemon import serve as serve_daemon

    if flags.get("socket") is None and ctx.obj._socket:
        flags["socket"] = ctx.obj._socket  # `aria --socket X serve`
    run_daemon("aria serve", RUNTIME_SETTINGS, flags, config_path, None, serve_daemon)


from aria_trio.cli import (  # noqa: E402,F401  (they register their verbs)
    auth,
    bundle,
    chat,
    container,
    events,
    health,
    prefs,
    quilt,
    registry,
    session,
    task,
)
