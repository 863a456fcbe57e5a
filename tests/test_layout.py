"""The architecture's one-way dependencies and the install stamp that keeps `make test` fast."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"clip": {"pipelines", "flows"}, "pipelines": {"flows"}}


def imported_top_level_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module", "__import__",
        ):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.add(node.args[0].value.split(".")[0])
            elif node.args and isinstance(node.args[0], ast.JoinedStr) and node.args[0].values:
                first = node.args[0].values[0]
                if isinstance(first, ast.Constant):
                    names.add(str(first.value).split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_run_one_way(package: str) -> None:
    offenders = []
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no python files under {package}/"
    for path in files:
        bad = imported_top_level_packages(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(REPO)} imports {sorted(bad)}")
    assert not offenders, "dependency direction is flows -> pipelines -> clip:\n" + "\n".join(offenders)


def test_checker_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom pipelines.train import run\nimportlib.import_module(f'flows.{x}')\n")
    assert {"pipelines", "flows"} <= imported_top_level_packages(bad)


def test_second_make_test_does_not_reinstall() -> None:
    """The install stamp is keyed on pyproject.toml: with it present, make has nothing to do."""
    stamps = list((REPO / ".venv").glob(".installed-test-*"))
    if not stamps:
        pytest.skip("suite not started through `make test` (no install stamp in .venv)")
    result = subprocess.run(["make", "-q", "install-test"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, "make would reinstall although pyproject.toml is unchanged"
    plan = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True)
    assert "pip install" not in plan.stdout
