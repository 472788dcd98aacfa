"""Who may import what: the layout of aria_trio/ is its architecture, and this keeps it so.

Read from `ls aria_trio`: `shared` and `rpc` serve both daemons, `quilt` is the Quilt daemon,
`runtime` the runtime daemon, `cli` the commands that start and call them. Inside the runtime,
the front ends (`services`, `operations`) call the domain (`work`, `agents`, `access`), which calls
`store` and `quilt_client`; never the other way round. README.md, "Layout", says the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "aria_trio"

DOMAIN = ("runtime.work", "runtime.agents", "runtime.access")
BASE = ("shared", "rpc", "proto", "runtime.kinds")
# part -> the parts it may import (a part also imports itself). Longest prefix names a module's part.
ALLOWED: dict[str, tuple[str, ...]] = {
    "proto": (),
    "shared": ("rpc", "proto"),
    "rpc": ("shared", "proto"),
    "quilt": ("shared", "rpc", "proto"),
    "runtime.kinds": ("proto",),
    "runtime.store": (*BASE,),
    "runtime.quilt_client": (*BASE,),
    "runtime.work": (*BASE, *DOMAIN, "runtime.store", "runtime.quilt_client"),
    "runtime.agents": (*BASE, *DOMAIN, "runtime.store", "runtime.quilt_client"),
    "runtime.access": (*BASE, *DOMAIN, "runtime.store"),
    "runtime.services": (*BASE, *DOMAIN),
    "runtime.operations": (*BASE, *DOMAIN, "runtime.services.convert"),
    "runtime.daemon": (*BASE, *DOMAIN, "runtime"),
    "runtime": (),  # the package's own __init__
    "cli": ("shared", "rpc", "proto", "runtime.daemon", "quilt.daemon"),
    "": ("cli",),  # aria_trio/__init__.py and __main__.py
}


def part_of(module: str) -> str:
    best = ""
    for part in ALLOWED:
        if part and (module == part or module.startswith(part + ".")) and len(part) > len(best):
            best = part
    return best


def module_of(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module relative to aria_trio) of each import of aria_trio code in the file."""
    found = []
    package = module_of(path).split(".") if path.name == "__init__.py" else module_of(path).split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
                found += [(node.lineno, f"aria_trio.{target}".rstrip("."))]
            elif node.module:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
                found += [(node.lineno, name) for name in names]
    return [(line, name.removeprefix("aria_trio.")) for line, name in found if name.startswith("aria_trio.")]


def allowed(source: str, target: str) -> bool:
    mine, theirs = part_of(source), part_of(target)
    if theirs == "":  # the package root: its version
        return True
    if theirs == mine or mine == "":
        return mine != "" or theirs == "cli"
    return any(theirs == ok or target == ok or target.startswith(ok + ".") for ok in ALLOWED[mine])


def test_every_import_goes_the_allowed_way() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "proto" in path.relative_to(PACKAGE).parts:
            continue
        source = module_of(path)
        for line, target in imports_of(path):
            if not allowed(source, target):
                wrong.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line}: {source} ({part_of(source)}) imports {target}"
                )
    assert not wrong, "imports against the layout (see tests/test_layout.py):\n" + "\n".join(wrong)


def test_every_module_has_a_part() -> None:
    loose = [module_of(p) for p in PACKAGE.rglob("*.py") if part_of(module_of(p)) == "" and p.parent != PACKAGE]
    assert not loose


def test_the_rule_catches_what_it_should() -> None:
    assert not allowed("runtime.work.tasks", "runtime.services.task")
    assert not allowed("runtime.work.uploads", "runtime.operations.metrics")
    assert not allowed("runtime.services.task", "runtime.store.tasks")
    assert not allowed("shared.lifecycle", "runtime.daemon")
    assert not allowed("quilt.engine", "runtime.work.tasks")
    assert not allowed("runtime.agents.turns", "quilt.engine")
    assert allowed("runtime.services.task", "runtime.work.tasks")
    assert allowed("cli.runtime", "runtime.daemon")
    assert allowed("quilt.engine", "quilt.images")


def test_the_readme_layout_names_every_module() -> None:
    """README.md's Layout section follows `ls`: every folder and module of aria_trio (but the
    generated proto/) is named there, so a new one cannot be added without saying where it belongs."""
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme[readme.index("## Layout") :]
    section = section[: section.index("\n## ", 3)] if "\n## " in section[3:] else section
    words = set(section.replace(",", " ").replace("(", " ").replace(")", " ").replace(":", " ").split())
    missing = []
    for path in sorted(PACKAGE.rglob("*")):
        rel = path.relative_to(PACKAGE)
        if (rel.parts[0] == "proto" and len(rel.parts) > 1) or "__pycache__" in rel.parts or path.name == "__init__.py":
            continue
        if path.suffix not in (".py", ".html", "") or path.name in ("py.typed", "__main__.py"):
            continue
        name = path.stem if path.suffix == ".py" else path.name
        if path.is_dir() and rel.parts[0] == "quilt" and len(rel.parts) > 1:
            name = f"{path.name}/"
        elif path.is_dir():
            name = f"{path.name}/"
        if name not in words and f"{name}.py" not in words and name.rstrip("/") not in words:
            missing.append(str(rel))
    assert not missing, "README.md, Layout, does not name: " + ", ".join(missing)
