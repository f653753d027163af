"""docs/errors.md lists every bad input tried, its message and the test that checks it: every test it names must
exist, so that the table cannot rot."""

import ast
import re

from conftest import ROOT

DOC = ROOT / "docs" / "errors.md"
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def table_rows() -> list[str]:
    return [line for line in DOC.read_text().splitlines() if re.match(r"\|\s*\d+\s*\|", line)]


def functions_in(path) -> set[str]:
    tree = ast.parse((ROOT / path).read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.name.startswith("test_")}


def test_every_row_names_existing_tests():
    rows = table_rows()
    assert len(rows) >= 20
    missing = []
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        refs = TEST_REF.findall(cells[-1])
        assert refs, f"row without a test: {row}"
        for path, name in refs:
            if not (ROOT / path).is_file() or name not in functions_in(path):
                missing.append(f"{path}::{name}")
    assert not missing, f"docs/errors.md names tests that do not exist: {missing}"

