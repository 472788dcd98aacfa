"""Building .aria bundles for tests: flat and nested, good and bad."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import blake3

CALC_TOOLS = {
    "add": ("def add(a, b):\n    print('adding', a, b)\n    return a + b\n", {"a": "number", "b": "number"}),
    "shout": (
        "import asyncio\nasync def shout(text):\n    await asyncio.sleep(0)\n    return text.upper()\n",
        {"text": "string"},
    ),
    "Greeter": (
        "class Greeter:\n    def execute(self, name):\n        return {'greeting': 'hi ' + name}\n",
        {"name": "string"},
    ),
    "fails": ("def fails():\n    raise ValueError('no such city')\n", {}),
    "slow": ("import time\ndef slow():\n    time.sleep(30)\n", {}),
    "garbage": ("import os\ndef garbage():\n    os.write(1, b'this is not json')\n    os._exit(0)\n", {}),
    "hog": ("def hog():\n    x = bytearray(1024 ** 3)\n    return len(x)\n", {}),
    "crash": ("import os\ndef crash():\n    os._exit(7)\n", {}),
}


def manifest(name: str = "calc", **extra: Any) -> dict[str, Any]:
    tools = [{"name": n, "description": f"the {n} tool", "inputs": inputs} for n, (_, inputs) in CALC_TOOLS.items()]
    data = {
        "name": name,
        "version": "1.0.0",
        "tools": tools,
        "agents": [{"name": "Calculator", "description": "Does sums", "tools": ["add"], "max_iterations": 4}],
        "teams": [],
        "pipelines": [],
    }
    data.update(extra)
    return data


def flat(
    data: dict[str, Any] | None = None, files: dict[str, str | bytes] | None = None, raw_manifest: bytes | None = None
) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("manifest.json", raw_manifest if raw_manifest is not None else json.dumps(data or manifest()))
        for name, (source, _) in CALC_TOOLS.items():
            z.writestr(f"implementations/tools/{name}.py", source)
        for path, content in (files or {}).items():
            z.writestr(path, content)
    return out.getvalue()


NODE_TOOL = (
    "class Forecast { async execute({city}) { console.log('looking up', city); return {city, temp: 21}; } }\n"
    "module.exports = { Forecast };\n"
)


def nested(build_hash: str | None = "auto") -> bytes:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr(
            "manifest.json",
            json.dumps(
                {
                    "name": "weather",
                    "version": "0.1.0",
                    "tools": [
                        {
                            "name": "forecast",
                            "description": "Weather",
                            "inputs": {
                                "type": "object",
                                "properties": {"city": {"type": "string"}},
                                "required": ["city"],
                            },
                        }
                    ],
                    "agents": [{"name": "Weatherman", "description": "weather", "tools": ["forecast"]}],
                }
            ),
        )
        z.writestr("implementations/_sources/forecast.js", NODE_TOOL)
        z.writestr(
            "implementations/tools/forecast.js",
            "const { Forecast } = require('../_sources/forecast.js');\n"
            "module.exports = { Forecast: Forecast, forecast: Forecast };\n",
        )
        z.writestr("package.json", "{}")
    inner_bytes = inner.getvalue()
    digest = blake3.blake3(inner_bytes).hexdigest() if build_hash == "auto" else build_hash
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        build = {"created_at": "2026-11-01T00:00:00Z", "compiler_version": "0.9.0", "source_language": "typescript"}
        if digest is not None:
            build["build_hash"] = digest
        z.writestr("metadata/build.json", json.dumps(build))
        z.writestr("bundle.zip", inner_bytes)
    return out.getvalue()
