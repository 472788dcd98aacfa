"""Runs one tool of a bundle (BUNDLES.md): JSON arguments on stdin, one JSON document on stdout.

    python3 python_runner.py ENTRY TOOL_NAME

The entry module is imported from its file; the callable is the function named TOOL_NAME, else a
class of that name (its `execute` on a fresh instance), else the module's `main`. It is called
with the arguments as keyword arguments and may be async. Whatever the tool prints goes to stderr
(its log), so stdout carries only the answer.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import IO, TypeVar

T = TypeVar("T")


def answer(out: IO[str], document: dict[str, object]) -> None:
    out.write(json.dumps(document))
    out.write("\n")
    out.flush()


def find(module: object, name: str) -> Callable[..., object]:
    found: object = getattr(module, name, None)
    if inspect.isclass(found):
        method: Callable[..., object] = found().execute  # type: ignore[attr-defined]
        return method
    if callable(found):
        return found
    default: object = getattr(module, "main", None)
    if callable(default):
        return default
    raise LookupError(f"the entry defines no function or class named {name!r} and no main()")


def main() -> None:
    entry, name = sys.argv[1], sys.argv[2]
    out = sys.stdout
    sys.stdout = sys.stderr  # the tool's prints are its log
    try:
        arguments = json.loads(sys.stdin.read() or "{}")
        if not isinstance(arguments, dict):
            raise TypeError("the arguments must be a JSON object")
        sys.path.insert(0, os.path.dirname(os.path.abspath(entry)))
        spec = importlib.util.spec_from_file_location("aria_tool_entry", entry)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {entry}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        result = find(module, name)(**arguments)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
        json.dumps(result)  # must be JSON-serialisable
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        message = str(exc) or type(exc).__name__
        print(f"{type(exc).__name__}: {message}", file=sys.stderr)
        answer(out, {"ok": False, "error": message})
        return
    answer(out, {"ok": True, "result": result})


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


if __name__ == "__main__":
    main()
