"""cloudllm_runtime is layered: no module imports one that imports it back, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import cloudllm_runtime

PACKAGE = Path(cloudllm_runtime.__file__).parent


def imports_of(path: Path) -> set[str]:
    """The runtime modules path imports, anywhere in the file (top level or inside a function)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("cloudllm_runtime."):
                found.add(node.module.split(".")[1])
            elif node.module == "cloudllm_runtime":
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("cloudllm_runtime."))
    return found


def test_no_import_cycles() -> None:
    modules = {path.stem: path for path in PACKAGE.glob("*.py")}
    graph = {name: imports_of(path) & set(modules) - {name} for name, path in modules.items()}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in graph[start]:
            if nxt == target or (nxt not in seen and (seen.add(nxt) or reaches(nxt, target, seen))):
                return True
        return False

    cycles = sorted(name for name in graph if reaches(name, name, set()))
    assert not cycles, {name: sorted(graph[name]) for name in cycles}


def test_the_runtime_never_imports_cloudllm() -> None:
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            assert not [n for n in names if n == "cloudllm" or n.startswith("cloudllm.")], path.name
