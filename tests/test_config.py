"""Settings precedence: defaults < config.toml < ARIA_* environment < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from aria_trio.shared.config import RUNTIME_SETTINGS, ConfigError, resolve


def test_precedence(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('grace = 3\nlog_level = "warning"\nmax_connections = 9\n')
    env = {"ARIA_GRACE": "4", "ARIA_LOG_LEVEL": "error"}
    got = resolve(RUNTIME_SETTINGS, {"grace": "5"}, config_path=config, environ=env)
    assert got["grace"] == 5.0  # flag
    assert got["log_level"] == "error"  # environment
    assert got["max_connections"] == 9  # file
    assert got["max_concurrent_streams"] == 128  # default


def test_missing_file_means_defaults(tmp_path):
    got = resolve(RUNTIME_SETTINGS, {}, config_path=tmp_path / "nope.toml", environ={})
    assert got["grace"] == 10.0 and got["socket"] == Path.home() / ".aria" / "runtime.sock"


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
