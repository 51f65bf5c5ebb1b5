"""Every function of the package fits on a screen: at most MAX_LINES lines of code (its docstring not
counted) and MAX_BRANCHES branches, unless its docstring says why it is longer (a line starting "Longer than
a screen:"). Read from the source as the formatter lays it out, so a function that grows past the limit
fails here, named with its file and line."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fwsvd_export"
MAX_LINES, MAX_BRANCHES = 60, 20
BRANCHES = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.ExceptHandler, ast.match_case)
EXCUSED = "Longer than a screen:"


def _docstring_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = node.body[0]
    is_doc = (
        isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    )
    return first.end_lineno - first.lineno + 1 if is_doc else 0


def oversized(source: str, path: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        lines = node.end_lineno - node.lineno + 1 - _docstring_lines(node)
        branches = sum(isinstance(n, BRANCHES) for n in ast.walk(node))
        excused = EXCUSED in (ast.get_docstring(node) or "")
        if (lines > MAX_LINES or branches > MAX_BRANCHES) and not excused:
            found.append(f"{path}:{node.lineno} {node.name}: {lines} lines, {branches} branches")
    return found


def test_every_function_fits_on_a_screen():
    found = [
        f
        for path in sorted(PACKAGE.rglob("*.py"))
        for f in oversized(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    ]
    assert found == []


def test_the_rule_can_fail_and_be_excused():
    branchy = "def f(x):\n" + "".join(f"    if x == {i}:\n        return {i}\n" for i in range(MAX_BRANCHES + 1))
    assert oversized(branchy, "probe.py") == [
        f"probe.py:1 f: {2 * MAX_BRANCHES + 3} lines, {MAX_BRANCHES + 1} branches"
    ]
    long = "def g():\n    '''Longer than a screen: one table.'''\n" + "    x = 1\n" * MAX_LINES
    assert oversized(long, "probe.py") == []
