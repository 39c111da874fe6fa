"""The documentation's promises name tests that exist: a guarantee whose named test is gone is a broken promise."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted((REPO / "ds_configs").glob("*.md"))]
#: ``tests/test_x.py::test_y``, or ``::test_z`` continuing the file named last on the same line
REF = re.compile(r"(tests/test_\w+\.py)?::(\w+)")


def named_tests(text: str) -> list[tuple[str, str]]:
    """Every (test file, test name) a text names, ``::name`` after ``file::other`` on a line counting for ``file``."""
    refs = []
    for line in text.splitlines():
        current = None
        for m in REF.finditer(line):
            current = m.group(1) or current
            if current:
                refs.append((current, m.group(2)))
    return refs


def test_named_tests_are_parsed_with_their_file():
    line = "| x | y | `tests/test_a.py::test_one`, `::test_two` | and `tests/test_b.py::test_three` |"
    assert named_tests(line) == [("tests/test_a.py", "test_one"), ("tests/test_a.py", "test_two"),
                                 ("tests/test_b.py", "test_three")]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_test_the_docs_name_exists(doc):
    missing = []
    for file, name in named_tests(doc.read_text(encoding="utf-8")):
        path = REPO / file
        if not path.is_file() or not re.search(rf"^\s*def {name}\(", path.read_text(), re.MULTILINE):
            missing.append(f"{file}::{name}")
    assert not missing, f"{doc.name} names tests that do not exist: {missing}"
