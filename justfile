# Recipes run inside the project's virtualenv (./dev makes it). `just --list` shows them.
set shell := ["bash", "-euo", "pipefail", "-c"]
set positional-arguments

venv := justfile_directory() / ".venv/bin"
export PATH := venv + ":" + env_var('PATH')

# Show the recipes.
default:
    @just --list

# Run the runtime daemon in the foreground (flags: aria serve --help).
serve *args:
    @aria serve "$@"

# Run the test suite (arguments go to pytest): first every test not marked `serial` in four workers
# (on two cores: the tests mostly wait on real daemons, sandboxes and a browser), then the `serial`
# ones (timed, measuring CPU, or making real Unix users) in one process. "No tests" is fine.
test *args:
    #!/usr/bin/env bash
    set -uo pipefail
    pytest -n 4 -m "not serial" "$@"; first=$?
    pytest -n 0 -m serial "$@"; second=$?
    for rc in $first $second; do
        if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then exit "$rc"; fi
    done

# Run the benchmarks; results in bench/results/ (arguments: benchmark names).
bench *args:
    @python -m bench "$@"

# Regenerate the protobuf and purerpc code from proto/ into aria_trio/proto/.
proto:
    python tools/protogen.py

# ruff and mypy.
lint:
    ruff check aria_trio tests bench tools
    ruff format --check aria_trio tests bench tools
    mypy

# Format the code.
fmt:
    ruff check --fix aria_trio tests bench tools
    ruff format aria_trio tests bench tools
