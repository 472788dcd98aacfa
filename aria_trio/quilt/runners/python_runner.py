"""Runs one tool of a bundle (BUNDLES.md): JSON arguments on stdin, one JSON document on stdout.

    python3 python_runner.py ENTRY TOOL_NAME

The entry module is imported from its file; the callable is the function named TOOL_NAME, else a
class of that name (its `execute` on a fresh instance), else the module's `main`. It is called
with the arguments as keyword arguments and may be async. Whatever the tool prints goes to stderr
(its log), so stdout carries only the answer.

It imports only what a call needs: every tool call starts an interpreter, and asyncio alone
costs it some 50 ms (inspect 18 ms), so asyncio is imported for an async tool only and neither
inspect nor importlib.util at all.
"""

from __future__ import annotations

import json
import os
import sys
import types
from collections.abc import Awaitable, Callable
from importlib.machinery import SourceFileLoader
from typing import IO, TypeVar

T = TypeVar("T")


def answer(out: IO[str], document: dict[str, object]) -> None:
    out.write(json.dumps(document))
    out.write("\n")
    out.flush()


def find(module: object, name: str) -> Callable[..., object]:
    found: object = getattr(module, name, None)
    if isinstance(found, type):
        method: Callable[..., object] = found().execute
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
        module = types.ModuleType("aria_tool_entry")
        module.__file__ = entry
        sys.modules[module.__name__] = module  # (as an import would: dataclasses and pickle look there)
        SourceFileLoader(module.__name__, entry).exec_module(module)
        result = find(module, name)(**arguments)
        if isinstance(result, Awaitable):
            import asyncio  # (only now: see above)

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
