"""The architecture, checked: one-way dependencies, stages that never import one another, formats in one place,
and the install stamp that keeps `make test` fast.

- flows -> pipelines -> clip, never back;
- a stage package (clip/collect, clip/dedup, clip/shards, clip/train, clip/export, clip/eval, clip/promote)
  imports no other stage package: stages meet through clip.formats and clip.storage;
- clip/model imports neither clip.train nor clip.config (model code is single-device and config-free);
- only clip/formats knows a layout: it alone imports `tarfile` and names the artifact files;
- dvc.yaml's deps of each stage cover every Python file its `pipelines/<stage>.py` imports, directly or not,
  within clip/ and pipelines/ (else `dvc repro` skips a stage whose code changed).
Each rule has a self-check that plants a violation and sees it caught.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

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


OWN_PACKAGES = ("clip", "pipelines")


def module_file(name: str, importer: Path | None = None, level: int = 0) -> Path | None:
    """The file of this repository that importing `name` runs (`clip.config.load_config` -> clip/config.py: the
    longest prefix that is a module or package); relative names resolve against `importer`; None when outside."""
    parts = name.split(".") if name else []
    if level and importer is not None:
        base = importer.parent.relative_to(REPO).parts
        parts = [*base[:len(base) - (level - 1)], *parts]
    if not parts or parts[0] not in OWN_PACKAGES:
        return None
    for end in range(len(parts), 0, -1):
        folder = REPO.joinpath(*parts[:end])
        for candidate in (folder.with_suffix(".py"), folder / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def import_closure(entry: Path) -> set[Path]:
    """`entry` and every Python file of clip/ and pipelines/ it imports, transitively, with the `__init__.py` of
    each package on the way (importing clip.train.loop runs clip/__init__.py and clip/train/__init__.py too)."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        found = [module_file(name) for name in imported_modules(path)]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):  # relative imports
            if isinstance(node, ast.ImportFrom) and node.level:
                found += [module_file(f"{node.module or ''}.{alias.name}".strip("."), path, node.level)
                          for alias in node.names]
        for file in filter(None, found):
            package = file.parent
            while package != REPO and (package / "__init__.py").is_file():
                todo.append(package / "__init__.py")
                package = package.parent
            todo.append(file)
    return seen


def uncovered_stage_code(stage: dict[str, Any]) -> list[str]:
    """The files a dvc.yaml stage's code imports (its cmd `python -m <module>`) that none of its deps covers (a
    dep that is a folder covers the files under it)."""
    module = re.search(r"python -m (\S+)", stage["cmd"])
    assert module, f"stage cmd {stage['cmd']!r} is not `python -m <module>`"
    deps = [Path(next(iter(dep)) if isinstance(dep, dict) else dep) for dep in stage.get("deps", [])]
    needed = {path.relative_to(REPO) for path in import_closure(module_file(module.group(1)) or Path("missing"))}
    return sorted(str(path) for path in needed if not any(path == dep or dep in path.parents for dep in deps))


def dvc_stages() -> dict[str, dict[str, Any]]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(dvc_stages()))
def test_dvc_deps_cover_the_code_each_stage_imports(stage: str) -> None:
    missing = uncovered_stage_code(dvc_stages()[stage])
    assert not missing, (f"dvc.yaml stage {stage!r}: its code imports files no dep covers, so `dvc repro` would "
                         f"not rerun it when they change; add them (or their folder) to its deps: {missing}")


def test_checker_catches_a_dvc_dep_left_out() -> None:
    train = dvc_stages()["train"]
    assert "clip/config.py" in train["deps"]
    planted = {**train, "deps": [dep for dep in train["deps"] if dep != "clip/config.py"]}
    assert uncovered_stage_code(planted) == ["clip/config.py"]
    assert "clip/train/stage.py" in uncovered_stage_code({**train, "deps": ["pipelines/train.py"]})


def test_second_make_test_does_not_reinstall() -> None:
    """The install stamp is keyed on pyproject.toml: with it present, make has nothing to do."""
    stamps = list((REPO / ".venv").glob(".installed-test-*"))
    if not stamps:
        pytest.skip("suite not started through `make test` (no install stamp in .venv)")
    result = subprocess.run(["make", "-q", "install-test"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, "make would reinstall although pyproject.toml is unchanged"
    plan = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True)
    assert "pip install" not in plan.stdout
