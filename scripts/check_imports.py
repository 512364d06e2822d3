"""Herald's import rules, checked from the source (``make lint``, scripts/test.sh).

Builds the graph of imports between the modules of campaigns/, tasks/, web/ and sendgrid_sink/ (module-level
and function-level imports alike: an import inside a function still makes a circle) and fails,
naming the modules, when:

- modules of a checked package import each other in a circle;
- campaigns/ imports Flask, Huey, web or tasks; tasks/ imports web (lower layers never import
  higher ones); sendgrid_sink/ imports any of Herald's packages.

Usage: ``python scripts/check_imports.py [ROOT]`` (ROOT: the project's directory, default the
one holding this script). Exit status 0 when every rule holds, 1 otherwise.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("campaigns", "tasks", "web", "sendgrid_sink")
# Packages whose circles fail the check (all of them; a package added to PACKAGES while it still
# has a circle can be left out of this list for a while, and its circles are then warnings).
CYCLE_FREE = PACKAGES
FORBIDDEN = {
    "campaigns": ("flask", "flask_wtf", "huey", "web", "tasks"),
    "tasks": ("web", "flask"),
    # the local SendGrid sink is a development tool that stands alone
    "sendgrid_sink": ("campaigns", "web", "tasks"),
}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def find_modules(root: Path) -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            modules[module_name(root, path)] = path
    return modules


def _resolve(modules: dict[str, Path], name: str) -> str | None:
    """The longest prefix of a dotted name that is one of the project's modules."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], list[tuple[str, int]]]:
    """The project modules ``module`` imports, and every imported name (dotted) with its line."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    internal: set[str] = set()
    named: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                named.append((alias.name, node.lineno))
                target = _resolve(modules, alias.name)
                if target:
                    internal.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = module.split(".")
                drop = node.level - 1 if is_package else node.level
                base_parts = base_parts[: len(base_parts) - drop] if drop else base_parts
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            named.append((base, node.lineno))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                target = full if full in modules else _resolve(modules, base)
                if target:
                    internal.add(target)
    internal.discard(module)
    return internal, named


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (a list of modules, the first repeated at the end) per strongly connected
    component of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return [_circle(graph, set(c)) for c in components]


def _circle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest circle through the component's first module (breadth-first)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child == start:
                    return paths[node] + [start]
                if child in component and child not in paths:
                    paths[child] = paths[node] + [child]
                    nxt.append(child)
        frontier = nxt
    return sorted(component)


def check(root: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) for the project under ``root``."""
    modules = find_modules(root)
    graph: dict[str, set[str]] = {}
    errors: list[str] = []
    for module, path in modules.items():
        graph[module], named = imports_of(module, path, modules)
        package = module.split(".")[0]
        for name, line in named:
            for banned in FORBIDDEN.get(package, ()):
                if name == banned or name.startswith(banned + "."):
                    errors.append(f"{path.relative_to(root)}:{line}: {package}/ must not import {name}")
    warnings: list[str] = []
    for circle in find_cycles(graph):
        text = "import cycle: " + " -> ".join(circle)
        if circle[0].split(".")[0] in CYCLE_FREE:
            errors.append(text)
        else:
            warnings.append(text + " (not enforced yet)")
    return errors, warnings


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    errors, warnings = check(root)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
