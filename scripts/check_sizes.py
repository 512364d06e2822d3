"""Herald's size rules, checked from the source (``make lint``, scripts/test.sh).

Fails, naming the file, the function and its length, when a module of campaigns/, tasks/, web/
or sendgrid_sink/ is over 600 lines or a function (or method) is over 80 lines, counted from
its ``def`` to its last line. A long one is allowed when a comment starting with ``# long:``
says why: on the line just above the ``def`` (or above its first decorator) for a function, in
the module's first lines for a module.

Usage: ``python scripts/check_sizes.py [ROOT]`` (ROOT: the project's directory, default the one
holding this script). Exit status 0 when every rule holds, 1 otherwise.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("campaigns", "tasks", "web", "sendgrid_sink")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
MODULE_HEAD = 15  # a module's "# long:" comment must be within its first lines
WAIVER = "# long:"


def _waived(lines: list[str], lineno: int) -> bool:
    """Whether the line before 1-based ``lineno`` is a ``# long:`` comment."""
    return lineno >= 2 and lines[lineno - 2].strip().startswith(WAIVER)


def check_file(root: Path, path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    rel = path.relative_to(root)
    errors = []
    if len(lines) > MAX_MODULE_LINES and not any(
        line.strip().startswith(WAIVER) for line in lines[:MODULE_HEAD]
    ):
        errors.append(f"{rel}: module is {len(lines)} lines (at most {MAX_MODULE_LINES}, "
                      f"or a '{WAIVER}' comment in its first {MODULE_HEAD} lines saying why)")
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        length = node.end_lineno - node.lineno + 1
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        if length > MAX_FUNCTION_LINES and not (_waived(lines, node.lineno) or _waived(lines, first)):
            errors.append(f"{rel}:{node.lineno}: function {node.name} is {length} lines (at most "
                          f"{MAX_FUNCTION_LINES}, or a '{WAIVER}' comment on the line before it saying why)")
    return errors


def check(root: Path) -> list[str]:
    errors = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            errors += check_file(root, path)
    return errors


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    errors = check(root)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
