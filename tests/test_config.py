"""Settings precedence: defaults < config.toml < ARIA_* environment < flags."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from aria_trio.shared.config import (
    QUILT_SETTINGS,
    RUNTIME_SETTINGS,
    ConfigError,
    QuiltSettings,
    RuntimeSettings,
    Setting,
    Table,
    resolve,
    setting,
)


def test_precedence(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('grace = 3\nlog_level = "warning"\nmax_connections = 9\n')
    env = {"ARIA_GRACE": "4", "ARIA_LOG_LEVEL": "error"}
    got = resolve(RUNTIME_SETTINGS, {"grace": "5"}, config_path=config, environ=env)
    assert isinstance(got, RuntimeSettings)
    assert got.grace == 5.0  # flag
    assert got.log_level == "error"  # environment
    assert got.max_connections == 9  # file
    assert got.max_concurrent_streams == 128  # default


def test_missing_file_means_defaults(tmp_path):
    got = resolve(RUNTIME_SETTINGS, {}, config_path=tmp_path / "nope.toml", environ={})
    assert got.grace == 10.0 and got.socket == Path.home() / ".aria" / "runtime.sock"


@pytest.mark.parametrize(
    ("text", "env", "words"),
    [
        ("grace = -2\n", {}, "grace in"),
        ("", {"ARIA_MAX_CONNECTIONS": "many"}, "$ARIA_MAX_CONNECTIONS"),
        ('log_level = "loud"\n', {}, "not one of"),
        ("gracee = 1\n", {}, "unknown setting gracee"),
        ("grace = [\n", {}, "cannot read"),
    ],
)
def test_bad_values_name_their_source(tmp_path, text, env, words):
    config = tmp_path / "config.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        resolve(RUNTIME_SETTINGS, {}, config_path=config, environ=env)
    assert words in str(info.value)


@pytest.mark.parametrize(("table", "kind"), [(RUNTIME_SETTINGS, RuntimeSettings), (QUILT_SETTINGS, QuiltSettings)])
def test_the_table_and_the_settings_class_agree(tmp_path, table, kind):
    """One declaration: the table (the CLI's flags) is the class's fields, in order, and every
    default resolves to a value of its field's type."""
    assert table.kind is kind
    assert [s.name for s in table] == [f.name for f in dataclasses.fields(kind)]
    assert all(isinstance(s, Setting) and s.env and s.help for s in table)
    got = resolve(table, {}, config_path=tmp_path / "none.toml", environ={})
    assert dataclasses.is_dataclass(got) and type(got) is kind
    hints = typing.get_type_hints(kind)
    for s in table:
        value, hint = getattr(got, s.name), hints[s.name]
        allowed = tuple(typing.get_origin(t) or t for t in (typing.get_args(hint) or (hint,)))
        if typing.get_origin(hint) is tuple:
            allowed = (tuple,)
        assert isinstance(value, allowed) or (value is None and type(None) in allowed), (s.name, value, hint)
        if s.choices:
            assert value in s.choices
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.grace = 1.0


def test_a_field_not_declared_as_a_setting_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Odd:
        socket: Path = setting(Path, Path, "ODD_SOCK", "where")
        log_level: str = setting(str, lambda: "info", "ODD_LOG_LEVEL", "level")
        log_format: str = setting(str, lambda: "auto", "ODD_LOG_FORMAT", "format")
        stray: int = 0

    with pytest.raises(TypeError, match=r"Odd\.stray is not declared with setting"):
        Table(Odd)
