"""The house rules that a reader can check mechanically: module and function sizes, and no dated
or narrative passages in the package, the design reference or the README."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bayesq_lightning"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80  # a function's lines past its docstring
NARRATIVE = re.compile(r"\b(this stop|last stop|a later stop|earlier stop|(first|second) wave"
                       r"|issue \d+)\b", re.IGNORECASE)


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the end of the function."""
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    return node.end_lineno - body[0].lineno + 1 if body else 0


def long_modules(paths: list[Path]) -> list[str]:
    """``path: N lines`` for every module over :data:`MAX_MODULE_LINES` lines."""
    out = []
    for path in paths:
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_MODULE_LINES:
            out.append(f"{path.relative_to(ROOT)}: {n} lines")
    return out


def long_functions(paths: list[Path]) -> list[str]:
    """``path:line name (N lines)`` for every function or method with more than
    :data:`MAX_FUNCTION_LINES` lines besides its docstring."""
    out = []
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            n = _code_lines(node)
            if n > MAX_FUNCTION_LINES:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return out


def narrative_passages(paths: list[Path]) -> list[str]:
    """``path:line: text`` for every line that dates itself ("this stop", "first wave", ...)."""
    out = []
    for path in paths:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if NARRATIVE.search(line):
                out.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    return out


def test_no_module_over_the_line_limit():
    offenders = long_modules(_modules())
    assert not offenders, f"modules over {MAX_MODULE_LINES} lines: " + "; ".join(offenders)


def test_no_function_over_the_line_limit_besides_its_docstring():
    offenders = long_functions(_modules())
    assert not offenders, (f"functions over {MAX_FUNCTION_LINES} lines besides their docstring: "
                           + "; ".join(offenders))


def test_no_dated_or_narrative_passages():
    offenders = narrative_passages(_modules() + [ROOT / "docs" / "design.md",
                                                 ROOT / "README.md"])
    assert not offenders, "dated or narrative passages:\n" + "\n".join(offenders)


def test_the_checks_name_what_breaks_a_rule(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES + 1))
    short = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    text = (f"def f():\n    \"\"\"Documented.\"\"\"\n{body}\n\n"
            f"def g():\n    \"\"\"Documented,\n    on two lines.\"\"\"\n{short}"
            "# measured at this stop\n" + "pass\n" * MAX_MODULE_LINES)
    src = tmp_path / "big.py"
    src.write_text(text)
    n = len(text.splitlines())
    assert long_modules([src]) == [f"big.py: {n} lines"]
    assert long_functions([src]) == [f"big.py:1 f ({MAX_FUNCTION_LINES + 1} lines)"]
    line = text.splitlines().index("# measured at this stop") + 1
    assert narrative_passages([src]) == [f"big.py:{line}: # measured at this stop"]
