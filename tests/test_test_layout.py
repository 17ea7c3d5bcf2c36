"""The test suite's own layout: shared helpers come from tests/support.py only, so a test module can
be moved, renamed or run alone without breaking another."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_test_modules(path: Path) -> set[str]:
    """The modules under tests/ that `path` imports, anywhere in it (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tests":
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "tests"}
    return found


def test_test_modules_import_helpers_only_from_support():
    wrong = {
        f"{path.name} imports {module}"
        for path in sorted(TESTS.glob("*.py"))
        for module in imported_test_modules(path)
        if module != "tests.support"
    }
    assert not wrong, "move shared helpers into tests/support.py: " + "; ".join(sorted(wrong))
