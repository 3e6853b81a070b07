"""Docstrings state what a module does, its invariant and its boundary; rationale and measured
numbers live in docs/design.md, benchmark runs in BENCHMARKS.md, unbuilt designs in issues."""

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "specdec"
MAX_MODULE_DOCSTRING_LINES = 15

# What a benchmark diary or an unbuilt design leaves behind in a docstring or a comment.
DIARY_MARKERS = {
    "a speedup or ratio (1.37x, 2-3x)": re.compile(r"(?<![\w.])\d+(\.\d+)?x(?![\w.])"),
    "a timing in ms": re.compile(r"\d(\.\d+)?\s?ms\b"),
    "a percentage": re.compile(r"\d\s?%"),
    "a citation of the benchmark report": re.compile(r"BENCHMARKS\.md|bench-results/"),
    "a note of one run": re.compile(r"\(measured\b|\bmeasured here\b", re.IGNORECASE),
    "a plan instead of code": re.compile(r"\bTODO\b|\bFIXME\b|not done here|needs a core change"),
}


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def _texts(source: str):
    """(line, text) of every docstring and comment in a module."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                yield node.body[0].lineno, doc
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_module_docstring_is_short(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{_name(path)}: no module docstring (say what it does, its invariant, its boundary)"
    lines = len(doc.splitlines())
    assert lines <= MAX_MODULE_DOCSTRING_LINES, (
        f"{_name(path)}: module docstring is {lines} lines (at most {MAX_MODULE_DOCSTRING_LINES}); "
        "move rationale and numbers to docs/design.md")


def test_no_benchmark_diary_in_docstrings_or_comments():
    found = []
    for path in _modules():
        for line, text in _texts(path.read_text()):
            for what, pattern in DIARY_MARKERS.items():
                for match in pattern.finditer(text):
                    found.append(f"{_name(path)}:{line}: {what}: {match.group(0)!r}")
    assert not found, "docstrings/comments state rules, not runs (move them to docs/design.md):\n" + "\n".join(found)


def test_markers_catch_a_diary():
    diary = '"""Fast.\n\n1.37x on qwen (measured: bench); 3.5 ms at k = 8 (BENCHMARKS.md), 38% less."""\n# TODO\n'
    hits = {what for _, text in _texts(diary) for what, p in DIARY_MARKERS.items() if p.search(text)}
    assert hits == set(DIARY_MARKERS)
    rules = '"""A [vocab, rank] matrix, 8960x1536 weights at k = 8; hex 0x1f."""\n# measured on first use\n'
    assert not [w for _, text in _texts(rules) for w, p in DIARY_MARKERS.items() if p.search(text)]
