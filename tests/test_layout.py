"""The architecture, checked: one-way dependencies, stages that never import one another, formats in one place,
and the install stamp that keeps `make test` fast.

- flows -> pipelines -> clip, never back;
- a stage package (clip/collect, clip/dedup, clip/shards, clip/train, clip/export, clip/eval, clip/promote)
  imports no other stage package: stages meet through clip.formats and clip.storage;
- clip/model imports neither clip.train nor clip.config (model code is single-device and config-free);
- only clip/formats knows a layout: it alone imports `tarfile` and names the artifact files.
Each rule has a self-check that plants a violation and sees it caught.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"clip": {"pipelines", "flows"}, "pipelines": {"flows"}}
STAGE_PACKAGES = ("collect", "dedup", "shards", "train", "export", "eval", "promote")
MODEL_FORBIDDEN = {"clip.train", "clip.config"}
# Artifact file names and name patterns of docs/formats.md: only clip/formats spells them out.
ARTIFACT_NAMES = re.compile(
    r"(manifest\.json|sizes\.json|keep\.parquet|removed\.parquet|overlap_report\.json|candidates\.parquet|"
    r"query_counts\.json|final\.pt|^raw-$|^shard-$|^step-$|raw-\{|shard-\{|step-\{|raw-\*|shard-\*|step-\*)"
)
FORMAT_ONLY_MODULES = {"tarfile"}


def imported_modules(path: Path) -> set[str]:
    """Every module name an import statement (or import_module / __import__ call) in `path` names, in full."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from clip import dedup`
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module", "__import__",
        ):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
            elif node.args and isinstance(node.args[0], ast.JoinedStr) and node.args[0].values:
                first = node.args[0].values[0]
                if isinstance(first, ast.Constant):
                    names.add(str(first.value).rstrip("."))
    return names


def imported_top_level_packages(path: Path) -> set[str]:
    return {name.split(".")[0] for name in imported_modules(path)}


def stage_of(module: str) -> str | None:
    """'dedup' for clip.dedup or clip.dedup.pool; None for anything that is not a stage package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "clip" and parts[1] in STAGE_PACKAGES else None


def cross_stage_imports(path: Path, own_stage: str) -> set[str]:
    return {m for m in imported_modules(path) if stage_of(m) not in (None, own_stage)}


def string_constants(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal that is not a docstring or a description for people
    (`description=` / `help=` keyword arguments)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg in ("description", "help"):
            docstrings.update(id(sub) for sub in ast.walk(node.value))
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def layout_knowledge(path: Path) -> list[str]:
    """What in `path` knows an artifact layout: tarfile imports and artifact file names in string literals."""
    found = [f"imports {m}" for m in sorted(imported_top_level_packages(path) & FORMAT_ONLY_MODULES)]
    found += [f"line {line}: {text!r}" for line, text in string_constants(path) if ARTIFACT_NAMES.search(text)]
    return found


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


def test_stage_packages_never_import_each_other() -> None:
    offenders = []
    for stage in STAGE_PACKAGES:
        for path in sorted((REPO / "clip" / stage).rglob("*.py")):
            bad = cross_stage_imports(path, stage)
            if bad:
                offenders.append(f"{path.relative_to(REPO)} imports {sorted(bad)}")
    # Shared library modules (clip/*.py, clip/formats, clip/storage, clip/model) import no stage package at all.
    for path in sorted((REPO / "clip").rglob("*.py")):
        rel = path.relative_to(REPO / "clip")
        if rel.parts[0] not in STAGE_PACKAGES:
            bad = cross_stage_imports(path, "")
            if bad:
                offenders.append(f"clip/{rel} (shared) imports {sorted(bad)}")
    assert not offenders, "stages meet through clip.formats and clip.storage:\n" + "\n".join(offenders)


def test_model_imports_neither_training_nor_config() -> None:
    offenders = []
    for path in sorted((REPO / "clip" / "model").rglob("*.py")):
        bad = {m for m in imported_modules(path) if any(m == f or m.startswith(f + ".") for f in MODEL_FORBIDDEN)}
        if bad:
            offenders.append(f"{path.relative_to(REPO)} imports {sorted(bad)}")
    assert not offenders, "clip/model is single-device and config-free:\n" + "\n".join(offenders)


def test_only_formats_knows_a_layout() -> None:
    offenders = []
    for path in sorted((REPO / "clip").rglob("*.py")):
        rel = path.relative_to(REPO / "clip")
        if rel.parts[0] == "formats":
            continue
        offenders += [f"clip/{rel} {what}" for what in layout_knowledge(path)]
    assert not offenders, "artifact layouts live in clip/formats only:\n" + "\n".join(offenders)


def test_checker_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom pipelines.train import run\nimportlib.import_module(f'flows.{x}')\n")
    assert {"pipelines", "flows"} <= imported_top_level_packages(bad)


def test_checker_catches_a_planted_cross_stage_import(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text("from clip.dedup.pool import PoolMetadata\nfrom clip import shards\nimport clip.train.loop\n"
                       "from clip.formats.raw import list_raw_shards\nfrom clip import storage\n")
    assert {stage_of(m) for m in cross_stage_imports(planted, "collect")} == {"dedup", "shards", "train"}
    assert {stage_of(m) for m in cross_stage_imports(planted, "dedup")} == {"shards", "train"}
    model = tmp_path / "model.py"
    model.write_text("from clip.config import TrainConfig\n")
    assert imported_modules(model) & MODEL_FORBIDDEN


def test_checker_catches_planted_layout_knowledge(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text('"""Reads manifest.json (a docstring may name it)."""\nimport tarfile\n'
                       'NAME = "manifest.json"\nshard = f"shard-{i:05d}.tar"\nok = "a manifest"\n'
                       'Field(3, description="holds manifest.json")\n')
    found = layout_knowledge(planted)
    assert found == ["imports tarfile", "line 3: 'manifest.json'", "line 4: 'shard-'"]


def test_second_make_test_does_not_reinstall() -> None:
    """The install stamp is keyed on pyproject.toml: with it present, make has nothing to do."""
    stamps = list((REPO / ".venv").glob(".installed-test-*"))
    if not stamps:
        pytest.skip("suite not started through `make test` (no install stamp in .venv)")
    result = subprocess.run(["make", "-q", "install-test"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, "make would reinstall although pyproject.toml is unchanged"
    plan = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True)
    assert "pip install" not in plan.stdout
