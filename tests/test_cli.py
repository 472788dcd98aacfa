"""The `aria` command against a running daemon, over its socket."""

from __future__ import annotations

import json
import subprocess
import sys

from cli_runner import run_aria


def aria(daemon, *args, socket=None):
    """`aria ARGS...` in this process (see cli_runner)."""
    return run_aria(*args, socket=socket or daemon.socket)


def test_health(module_daemon):
    out = aria(module_daemon, "health")
    assert out.returncode == 0
    assert out.stdout.splitlines()[0] == "SERVING"
    assert "aria.v1.UserPreferenceService: SERVING" in out.stdout
    as_json = json.loads(aria(module_daemon, "--json", "health").stdout)
    assert as_json["status"] == "SERVING"
    assert len(as_json["services"]) == 8  # the seven of the contract, and AuthService (ext)


def test_prefs_set_get_unset(daemon):
    assert aria(daemon, "prefs", "set", "llm.model", "llama3.1").stdout.strip() == 'llm.model = "llama3.1"'
    assert aria(daemon, "prefs", "set", "llm.temperature", "0.2").stdout.strip() == "llm.temperature = 0.2"
    assert aria(daemon, "prefs", "set", "ui.count", "3").stdout.strip() == "ui.count = 3"
    assert aria(daemon, "prefs", "set", "--string", "ui.label", "3").stdout.strip() == 'ui.label = "3"'
    assert aria(daemon, "prefs", "get", "llm.model").stdout.strip() == "llama3.1"
    everything = json.loads(aria(daemon, "--json", "prefs", "get").stdout)
    assert everything == {"llm.model": "llama3.1", "llm.temperature": 0.2, "ui.count": 3, "ui.label": "3"}
    assert aria(daemon, "prefs", "unset", "ui.count").stdout.strip() == "ui.count removed"
    missing = aria(daemon, "prefs", "get", "ui.count")
    assert missing.returncode == 1 and "not set" in missing.stderr


def test_socket_flag_overrides_the_environment(module_daemon, sock_dir):
    out = run_aria("--socket", str(module_daemon.socket), "health", socket=sock_dir / "nowhere.sock")
    assert out.returncode == 0


def test_the_command_runs_as_a_program(module_daemon):
    """(the other tests run the command in-process: once as `python -m aria_trio` too, its
    entry point, exit status and output as a user sees them)"""
    out = subprocess.run(
        [sys.executable, "-m", "aria_trio", "--socket", str(module_daemon.socket), "health"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and out.stdout.splitlines()[0] == "SERVING" and out.stderr == ""


def test_errors_are_one_clear_line(module_daemon, sock_dir):
    bad = aria(module_daemon, "prefs", "set", "llm.temperature", "7")
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: llm.temperature must be between 0 and 2 (INVALID_ARGUMENT, request id ")
    assert "Traceback" not in bad.stderr
    nobody = aria(module_daemon, "health", socket=sock_dir / "nowhere.sock")
    assert nobody.returncode == 1
    assert "no server at" in nobody.stderr and "Traceback" not in nobody.stderr
