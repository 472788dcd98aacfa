"""Settings of the daemons: defaults, then ~/.aria/config.toml, then ARIA_* variables, then flags.

Each setting is declared once (name, type, default, environment variable, help); the CLI builds
its flags and its --help from these declarations, so every setting is documented where it is set.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar, Generic, Protocol, TypeVar, cast

MiB = 1024 * 1024
T = TypeVar("T")


def aria_home() -> Path:
    return Path(os.path.expanduser("~")) / ".aria"


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str  # config.toml key and --flag (underscores become dashes)
    type: Callable[[str], object]
    default: Callable[[], object]
    env: str
    help: str
    choices: Sequence[str] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def setting(parse: Callable[[str], T], default: Callable[[], T], env: str, help: str, choices: Sequence[str] = ()) -> T:
    """A field of a settings class, declared once: the field is the setting (its name is the
    field's), and mypy checks that the parser and the default give the field's type."""
    declared = Setting("", parse, default, env, help, choices)
    return cast(T, dataclasses.field(metadata={SETTING: declared}))


SETTING = "aria.setting"  # the key of a field's Setting in its metadata


class DaemonSettings(Protocol):
    """What every daemon's settings are: a dataclass of settings (the CLI's part of them: where,
    and how to log)."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[object]]]

    @property
    def socket(self) -> Path: ...
    @property
    def log_level(self) -> str: ...
    @property
    def log_format(self) -> str: ...


SettingsT = TypeVar("SettingsT", bound=DaemonSettings)
_Settings_co = TypeVar("_Settings_co", bound=DaemonSettings, covariant=True)


class Table(tuple[Setting, ...], Generic[_Settings_co]):
    """The settings of one daemon in their order (the CLI makes a flag of each), and the frozen
    dataclass `resolve` makes of them: the table is read off that class's fields, so the two are
    one declaration."""

    kind: type[_Settings_co]

    def __new__(cls, kind: type[_Settings_co]) -> Table[_Settings_co]:
        declared = []
        for f in dataclasses.fields(kind):
            if SETTING not in f.metadata:
                raise TypeError(f"{kind.__name__}.{f.name} is not declared with setting()")
            declared.append(dataclasses.replace(f.metadata[SETTING], name=f.name))
        table = super().__new__(cls, declared)
        table.kind = kind
        return table


class ConfigError(Exception):
    """A setting has a value we cannot use; the message names the setting and where it came from."""


def _positive_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be positive")
    return value


def _mode(text: str | int) -> int:
    mode = int(str(text), 8)  # (a TOML number 660 means octal 660 too)
    if not 0 <= mode <= 0o777 or mode & 0o600 != 0o600:
        raise ValueError("must be octal permissions that keep the owner's read and write, e.g. 600 or 660")
    return mode


def _port(text: str | int) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError("must be a port number from 0 (off) to 65535")
    return port


def _path(text: str) -> Path:
    return Path(os.path.expanduser(str(text)))


def _optional_path(text: str) -> Path | None:
    return Path(os.path.expanduser(str(text))) if str(text) else None


def _paths(text: str) -> tuple[Path, ...]:
    """Paths separated by ':' (as in PATH)."""
    return tuple(Path(os.path.expanduser(p)) for p in str(text).split(":") if p)


def _uid(text: str) -> int:
    value = int(text)
    if not 1 <= value < 2**32 - 1:
        raise ValueError("must be a uid from 1 to 4294967294 (never 0: root)")
    return value


def _cpus(text: str) -> float:
    value = float(text)
    if not 0.01 <= value <= 1024:
        raise ValueError("must be a number of CPUs from 0.01 to 1024")
    return value


def _log_level(prefix: str) -> str:
    return setting(str, lambda: "info", f"{prefix}_LOG_LEVEL", "Least severe log level written.", LEVELS)


def _log_format(prefix: str) -> str:
    return setting(
        str,
        lambda: "auto",
        f"{prefix}_LOG_FORMAT",
        "json (one object a line), console, or auto (console on a terminal).",
        ("auto", "json", "console"),
    )


LEVELS = ("debug", "info", "warning", "error")


@dataclasses.dataclass(frozen=True)
class RuntimeSettings:
    """`aria serve`: the runtime daemon."""

    socket: Path = setting(
        _path,
        lambda: aria_home() / "runtime.sock",
        "ARIA_RUNTIME_SOCK",
        "Unix socket to serve on (mode 0600, folder 0700).",
    )
    data_dir: Path = setting(_path, aria_home, "ARIA_DATA_DIR", "Folder of the runtime's database (runtime.db).")
    grace: float = setting(
        _positive_float, lambda: 10.0, "ARIA_GRACE", "Seconds in-flight calls get to finish at shutdown."
    )
    log_level: str = _log_level("ARIA")
    log_format: str = _log_format("ARIA")
    max_message_bytes: int = setting(
        _positive_int, lambda: 4 * MiB, "ARIA_MAX_MESSAGE_BYTES", "Largest gRPC message taken or sent."
    )
    max_concurrent_streams: int = setting(
        _positive_int, lambda: 128, "ARIA_MAX_CONCURRENT_STREAMS", "Calls one connection may have open at once."
    )
    max_connections: int = setting(
        _positive_int,
        lambda: 256,
        "ARIA_MAX_CONNECTIONS",
        "Client connections served at once; more wait to be accepted.",
    )
    quilt_socket: str = setting(
        str,
        lambda: "",
        "ARIA_QUILT_SOCKET",
        "Socket of a Quilt already running; empty: run `aria quilt serve` as a child (its socket"
        " <data dir>/quilt.sock, its data in <data dir>/quilt/).",
    )
    socket_mode: int = setting(
        _mode,
        lambda: 0o600,
        "ARIA_SOCKET_MODE",
        "Permissions of the socket, in octal (e.g. 660 with --socket-group: that group may connect too).",
    )
    socket_group: str = setting(
        str, lambda: "", "ARIA_SOCKET_GROUP", "Group that owns the socket and its folder (empty: the daemon's own)."
    )
    tap_port: int = setting(
        _port,
        lambda: 0,
        "ARIA_TAP_PORT",
        "Port on 127.0.0.1 of the websocket notification tap and its dashboard (0: off).",
    )
    metrics_port: int = setting(
        _port, lambda: 0, "ARIA_METRICS_PORT", "Port on 127.0.0.1 serving Prometheus metrics at /metrics (0: off)."
    )
    tool_timeout: float = setting(
        _positive_float,
        lambda: 60.0,
        "ARIA_TOOL_TIMEOUT",
        "Seconds an agent's tool call may run (bundle tools and run_command).",
    )
    images_dir: Path | None = setting(
        _optional_path,
        lambda: None,
        "ARIA_IMAGES_DIR",
        "Folder of the images containers may use by name (rootfs folders or tar archives; given to the"
        " child Quilt); empty: only the host view.",
    )
    task_timeout: int = setting(
        _positive_int,
        lambda: 3600,
        "ARIA_TASK_TIMEOUT",
        "Seconds a task may run when it asks for no timeout (timeout_seconds 0 is this, never no limit).",
    )
    max_task_timeout: int = setting(
        _positive_int, lambda: 7 * 24 * 3600, "ARIA_MAX_TASK_TIMEOUT", "The longest timeout a task may ask for."
    )
    # Per-user quotas (runtime/access/quotas.py): past one, RESOURCE_EXHAUSTED naming the setting.
    max_running_containers: int = setting(
        _positive_int, lambda: 16, "ARIA_MAX_RUNNING_CONTAINERS", "Containers one user may have running at once."
    )
    max_running_tasks: int = setting(
        _positive_int, lambda: 32, "ARIA_MAX_RUNNING_TASKS", "Tasks one user may have pending or running at once."
    )
    max_streams: int = setting(
        _positive_int,
        lambda: 64,
        "ARIA_MAX_STREAMS",
        "Streaming calls (follows, subscriptions, turns, uploads) one user may have open at once.",
    )
    max_connections_per_user: int = setting(
        _positive_int,
        lambda: 32,
        "ARIA_MAX_CONNECTIONS_PER_USER",
        "Connections one local user may have open at once (past it, each call on a new one is refused).",
    )
    max_turns: int = setting(_positive_int, lambda: 4, "ARIA_MAX_TURNS", "Turns one user may have running at once.")
    tool_calls_at_once: int = setting(
        _positive_int,
        lambda: 8,
        "ARIA_TOOL_CALLS_AT_ONCE",
        "Tool calls of one model reply run at once; the rest wait their turn.",
    )
    max_tool_calls_per_reply: int = setting(
        _positive_int,
        lambda: 32,
        "ARIA_MAX_TOOL_CALLS_PER_REPLY",
        "Tool calls of one model reply that run; any more get a failed result without running.",
    )
    quilt_orphan_grace: float = setting(
        _positive_float,
        lambda: 600.0,
        "ARIA_QUILT_ORPHAN_GRACE",
        "Seconds the child Quilt keeps the work running when this runtime is gone (a restart adopts it).",
    )
    quilt_sandbox: str = setting(
        str,
        lambda: "bubblewrap",
        "ARIA_QUILT_SANDBOX",
        "The child Quilt's sandbox: bubblewrap, or none (NO isolation; only when asked).",
        ("bubblewrap", "none"),
    )


RUNTIME_SETTINGS = Table(RuntimeSettings)


@dataclasses.dataclass(frozen=True)
class QuiltSettings:
    """`aria quilt serve`: the container daemon (config.toml's [quilt] table)."""

    socket: Path = setting(
        _path, lambda: aria_home() / "quilt.sock", "QUILT_SOCK", "Unix socket to serve on (mode 0600, folder 0700)."
    )
    data_dir: Path = setting(
        _path,
        lambda: aria_home() / "quilt",
        "QUILT_DATA_DIR",
        "Folder of quilt's database, containers, output and bundles.",
    )
    sandbox: str = setting(
        str,
        lambda: "bubblewrap",
        "QUILT_SANDBOX",
        "bubblewrap, or none: NO isolation at all (only when asked).",
        ("bubblewrap", "none"),
    )
    grace: float = setting(
        _positive_float, lambda: 10.0, "QUILT_GRACE", "Seconds in-flight calls get to finish at shutdown."
    )
    stop_grace: float = setting(
        _positive_float, lambda: 10.0, "QUILT_STOP_GRACE", "Seconds between SIGTERM and SIGKILL when a container stops."
    )
    memory_bytes: int = setting(
        _positive_int, lambda: 512 * MiB, "QUILT_MEMORY_BYTES", "Default memory limit of a container or tool run."
    )
    pids: int = setting(_positive_int, lambda: 256, "QUILT_PIDS", "Default limit on the processes of a container.")
    cpus: float = setting(_cpus, lambda: 1.0, "QUILT_CPUS", "Default CPU time a container may use, in CPUs.")
    disk_bytes: int = setting(
        _positive_int,
        lambda: 1024 * MiB,
        "QUILT_DISK_BYTES",
        "Default size of a container's disk (its workspace and /tmp together; enforced when Quilt runs as root).",
    )
    max_memory_bytes: int = setting(
        _positive_int, lambda: 8 * 1024 * MiB, "QUILT_MAX_MEMORY_BYTES", "Most memory a container may ask for."
    )
    max_pids: int = setting(_positive_int, lambda: 4096, "QUILT_MAX_PIDS", "Most processes a container may ask for.")
    max_cpus: float = setting(
        _cpus,
        lambda: float(os.cpu_count() or 1),
        "QUILT_MAX_CPUS",
        "Most CPUs a container may ask for (default: this machine's count).",
    )
    max_disk_bytes: int = setting(
        _positive_int, lambda: 64 * 1024 * MiB, "QUILT_MAX_DISK_BYTES", "Largest disk a container may ask for."
    )
    exec_timeout: float = setting(
        _positive_float,
        lambda: 3600.0,
        "QUILT_EXEC_TIMEOUT",
        "Seconds a command run in a container may take when it asks for no timeout (0 is this, never no limit).",
    )
    images_dir: Path | None = setting(
        _optional_path,
        lambda: None,
        "QUILT_IMAGES_DIR",
        "Folder of the images containers may use, by name (rootfs folders or tar archives); empty: only host.",
    )
    max_image_bytes: int = setting(
        _positive_int,
        lambda: 4 * 1024 * MiB,
        "QUILT_MAX_IMAGE_BYTES",
        "Largest image archive unpacked (bytes written).",
    )
    max_image_cache_bytes: int = setting(
        _positive_int,
        lambda: 16 * 1024 * MiB,
        "QUILT_MAX_IMAGE_CACHE_BYTES",
        "Unpacked images kept; past this, the least recently used unused ones go.",
    )
    orphan_grace: float = setting(
        _positive_float,
        lambda: 600.0,
        "QUILT_ORPHAN_GRACE",
        "Started for a runtime: seconds its work goes on with no runtime attached (then it stops and exits).",
    )
    sandbox_uid: int = setting(
        _uid,
        lambda: 200000,
        "QUILT_SANDBOX_UID",
        "When Quilt runs as root: the unprivileged uid (and gid) its sandboxes run as; a uid of no one else's.",
    )
    hide: tuple[Path, ...] = setting(
        _paths,
        lambda: (),
        "QUILT_HIDE",
        "More paths no sandbox may see, ':'-separated (Quilt's own socket and data folder always are).",
    )
    max_output_bytes: int = setting(
        _positive_int, lambda: 64 * MiB, "QUILT_MAX_OUTPUT_BYTES", "Output kept per task and per container."
    )
    max_bundle_bytes: int = setting(
        _positive_int, lambda: 512 * MiB, "QUILT_MAX_BUNDLE_BYTES", "Largest bundle accepted."
    )
    tool_timeout: float = setting(
        _positive_float, lambda: 60.0, "QUILT_TOOL_TIMEOUT", "Default seconds a tool run may take."
    )
    log_level: str = _log_level("QUILT")
    log_format: str = _log_format("QUILT")


QUILT_SETTINGS = Table(QuiltSettings)


def default_config_path() -> Path:
    return Path(os.environ["ARIA_CONFIG"]) if os.environ.get("ARIA_CONFIG") else aria_home() / "config.toml"


def load_file(path: Path, section: str | None = None) -> dict[str, object]:
    """The settings of config.toml: top-level keys, or the keys of [section] when given."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (tomllib.TOMLDecodeError, OSError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if section is not None:
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{section}] must be a table")
        return table
    return {k: v for k, v in data.items() if not isinstance(v, dict)}


def resolve(
    settings: Table[SettingsT],
    flags: Mapping[str, object],
    *,
    config_path: Path,
    section: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> SettingsT:
    """One value per setting: a flag if given, else the environment, else the file, else the default."""
    environ = os.environ if environ is None else environ
    file_values = load_file(config_path, section)
    known = {s.name for s in settings}
    unknown = sorted(set(file_values) - known)
    if unknown:
        raise ConfigError(
            f"{config_path}: unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"(known: {', '.join(sorted(known))})"
        )
    out: dict[str, object] = {}  # (each value of its field's type: setting() checked its parser)
    for s in settings:
        if flags.get(s.name) is not None:
            raw, origin = flags[s.name], s.flag
        elif environ.get(s.env):
            raw, origin = environ[s.env], f"${s.env}"
        elif s.name in file_values:
            raw, origin = file_values[s.name], f"{s.name} in {config_path}"
        else:
            out[s.name] = s.default()
            continue
        try:
            value = s.type(str(raw))
        except ValueError as exc:
            raise ConfigError(f"{origin}: {raw!r} is not a valid {s.name.replace('_', ' ')} ({exc})") from None
        if s.choices and value not in s.choices:
            raise ConfigError(f"{origin}: {raw!r} is not one of {', '.join(s.choices)}")
        out[s.name] = value
    return settings.kind(**out)
