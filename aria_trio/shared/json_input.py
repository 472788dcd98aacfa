"""JSON that came from outside (a caller, a model, a sandbox, an archive): parsed with bounds.

`json.loads` alone lets through what breaks later: nesting deep enough to raise RecursionError
(here, or in whatever walks the value next, such as a JSON Schema check), and strings with lone
surrogates (`"\\ud800"`), which no UTF-8 encoder takes. Each is a ValueError here, like any
malformed JSON, so every caller's existing "not valid JSON" answer covers them.
"""

from __future__ import annotations

import json
from typing import TypeAlias

# A JSON value, as json.loads gives it (for values that are JSON, not for anything shaped like it).
JSON: TypeAlias = dict[str, "JSON"] | list["JSON"] | str | int | float | bool | None

MAX_DEPTH = 100  # arrays and objects within each other; deeper is refused


def loads(text: str | bytes | bytearray) -> object:
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested more than {MAX_DEPTH} deep") from None
    _check(value)
    return value


def _check(value: object) -> None:
    """Depth within MAX_DEPTH and every string valid UTF-8; iterative (no recursion to exhaust)."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _utf8(item)
        elif isinstance(item, (list, dict)):
            if depth >= MAX_DEPTH:
                raise ValueError(f"nested more than {MAX_DEPTH} deep")
            if isinstance(item, dict):
                for key, inner in item.items():
                    _utf8(key)
                    stack.append((inner, depth + 1))
            else:
                stack.extend((inner, depth + 1) for inner in item)


def _utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("a string that is not valid UTF-8 (a lone surrogate)") from None
