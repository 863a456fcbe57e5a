"""The architecture, checked: one-way dependencies, stages that never import one another, formats in one place,
and the install stamp that keeps `make test` fast.

- flows -> pipelines -> clip, never back;
- a stage package (clip/collect, clip/dedup, clip/shards, clip/train, clip/export, clip/eval, clip/promote)
  imports no other stage package: stages meet through clip.formats and clip.storage;
- clip/model imports neither clip.train, clip.config nor clip.storage (model code is single-device, config- and
  storage-free); clip/tokenizer imports neither clip.config nor clip.storage (a tokenizer is a JSON document: where
  it is kept is its caller's business); clip/tracking.py imports no clip.runtime (the model registry, which logs a
  bundle with the runtime, is the promote stage's);
- only clip/formats knows a layout: it alone imports `tarfile` and names the artifact files (in clip/, pipelines/
  and flows/ no string literal outside clip/formats spells one, the run folder's `tokenizer.json` and
  `metrics.json` and evaluate's `scores.png` included);
- only clip/storage renames a file into place (`os.replace`): every other write goes through its atomic writes;
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
# What a shared library module may not import (a module counts with everything under it: clip.storage.local).
LIBRARY_FORBIDDEN = {
    "clip/model": {"clip.train", "clip.config", "clip.storage"},
    "clip/tokenizer": {"clip.config", "clip.storage"},
    "clip/tracking.py": {"clip.runtime"},
}
# Artifact file names and name patterns of docs/formats.md: only clip/formats spells them out.
ARTIFACT_NAMES = re.compile(
    r"(manifest\.json|sizes\.json|keep\.parquet|removed\.parquet|overlap_report\.json|candidates\.parquet|"
    r"query_counts\.json|final\.pt|tokenizer\.json|metrics\.json|scores\.png|"
    r"^raw-$|^shard-$|^step-$|raw-\{|shard-\{|step-\{|raw-\*|shard-\*|step-\*)"
)
FORMAT_ONLY_MODULES = {"tarfile"}
LAYOUT_CHECKED = ("clip", "pipelines", "flows")  # where only clip/formats may know a layout
ATOMIC_RENAMES = {"os.replace"}  # how a finished temporary file is moved into place: clip/storage's alone


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
    return sorted((node.lineno, node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings)


def layout_knowledge(path: Path) -> list[str]:
    """What in `path` knows an artifact layout: tarfile imports and artifact file names in string literals."""
    found = [f"imports {m}" for m in sorted(imported_top_level_packages(path) & FORMAT_ONLY_MODULES)]
    found += [f"line {line}: {text!r}" for line, text in string_constants(path) if ARTIFACT_NAMES.search(text)]
    return found


def forbidden_imports(path: Path, forbidden: set[str]) -> set[str]:
    """The modules `path` imports that are one of `forbidden` or inside one."""
    return {m for m in imported_modules(path) if any(m == f or m.startswith(f + ".") for f in forbidden)}


def atomic_renames(path: Path) -> list[str]:
    """Where `path` calls os.replace, under whatever name it imported os or os.replace as."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules = {"os"}  # names bound to the os module
    functions: set[str] = set()  # names bound to a forbidden os function
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.asname or alias.name for alias in node.names if alias.name == "os")
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and node.level == 0:
            functions.update(alias.asname or alias.name for alias in node.names
                             if f"os.{alias.name}" in ATOMIC_RENAMES)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in modules
                and f"os.{func.attr}" in ATOMIC_RENAMES) or (isinstance(func, ast.Name) and func.id in functions):
            found.append((node.lineno, f"line {node.lineno}: {ast.unparse(func)}()"))
    return [where for _, where in sorted(found)]


def checked_files(*roots: str) -> list[Path]:
    """Every Python file under the given folders of the repository (or the file itself)."""
    files: list[Path] = []
    for root in roots:
        path = REPO / root
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    assert files, f"no python files under {roots}"
    return files


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


@pytest.mark.parametrize("library", sorted(LIBRARY_FORBIDDEN))
def test_shared_libraries_keep_their_imports_few(library: str) -> None:
    forbidden = LIBRARY_FORBIDDEN[library]
    offenders = [f"{path.relative_to(REPO)} imports {sorted(bad)}" for path in checked_files(library)
                 if (bad := forbidden_imports(path, forbidden))]
    assert not offenders, f"{library} imports none of {sorted(forbidden)}:\n" + "\n".join(offenders)


def test_only_formats_knows_a_layout() -> None:
    offenders = []
    for path in checked_files(*LAYOUT_CHECKED):
        rel = path.relative_to(REPO)
        if rel.parts[:2] == ("clip", "formats"):
            continue
        offenders += [f"{rel} {what}" for what in layout_knowledge(path)]
    assert not offenders, "artifact layouts live in clip/formats only:\n" + "\n".join(offenders)


def test_only_storage_renames_into_place() -> None:
    offenders = []
    for path in checked_files(*LAYOUT_CHECKED):
        rel = path.relative_to(REPO)
        if rel.parts[:2] == ("clip", "storage"):
            continue
        offenders += [f"{rel} {where}" for where in atomic_renames(path)]
    assert not offenders, ("write through clip.storage (write_bytes, write_stream, upload_file), whose writes "
                           "are atomic, instead of renaming a temporary file yourself:\n" + "\n".join(offenders))


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


def test_checker_catches_planted_library_imports(tmp_path: Path) -> None:
    model = tmp_path / "model.py"
    model.write_text("import torch\nfrom clip.config import TrainConfig\nfrom clip import storage\n"
                     "from clip.model.config import CLIPConfig\n")
    assert forbidden_imports(model, LIBRARY_FORBIDDEN["clip/model"]) == {"clip.config", "clip.config.TrainConfig",
                                                                         "clip.storage"}
    tokenizer = tmp_path / "bpe.py"
    tokenizer.write_text("import json\nimport clip.storage.local\nfrom clip.tokenizer.clean import clean_caption\n"
                         "from clip.storage_notes import x\n")
    assert forbidden_imports(tokenizer, LIBRARY_FORBIDDEN["clip/tokenizer"]) == {"clip.storage.local"}
    tracking = tmp_path / "tracking.py"
    tracking.write_text("from clip.config import TrackingConfig\n\ndef log(tracker):\n"
                        "    from clip.runtime.mlflow_model import log_bundle_model\n")
    assert forbidden_imports(tracking, LIBRARY_FORBIDDEN["clip/tracking.py"]) == {
        "clip.runtime.mlflow_model", "clip.runtime.mlflow_model.log_bundle_model"}


def test_checker_catches_planted_layout_knowledge(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text('"""Reads manifest.json (a docstring may name it)."""\nimport tarfile\n'
                       'NAME = "manifest.json"\nshard = f"shard-{i:05d}.tar"\nok = "a manifest"\n'
                       'Field(3, description="holds manifest.json")\n')
    found = layout_knowledge(planted)
    assert found == ["imports tarfile", "line 3: 'manifest.json'", "line 4: 'shard-'"]


def test_checker_catches_planted_run_folder_and_report_names(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text('"""Writes tokenizer.json, metrics.json and scores.png."""\n'
                       'TOKENIZER_NAME = "tokenizer.json"  # the run\'s tokenizer.json\n'
                       'uri = storage.join(output, "metrics.json")\nplot = f"{folder}/scores.png"\n'
                       'CANDIDATES = "candidates.parquet"\nok = "a tokenizer, its metrics, the scores"\n'
                       'Field(None, description="where tokenizer.json and metrics.json go")\n')
    assert layout_knowledge(planted) == ["line 2: 'tokenizer.json'", "line 3: 'metrics.json'",
                                         "line 4: '/scores.png'", "line 5: 'candidates.parquet'"]


def test_checker_catches_planted_renames(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text("import os\nimport os as system\nfrom os import replace\nfrom os import replace as move\n"
                       "os.replace(tmp, dest)\nsystem.replace(tmp, dest)\nreplace(tmp, dest)\nmove(tmp, dest)\n"
                       "name = text.replace('-', '_')\nos.rename(old, new)\n")
    assert atomic_renames(planted) == ["line 5: os.replace()", "line 6: system.replace()", "line 7: replace()",
                                       "line 8: move()"]


MAX_FILE_LINES = 450  # any code file outside clip/model (one responsibility per file)
MAX_TRAIN_FUNCTION_LINES = 80  # any function in clip/train, docstring included (setup, loop, components)


def long_functions(path: Path, limit: int) -> list[str]:
    """`name (N lines)` for each function or method of `path` longer than `limit` lines, def line to last line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = node.end_lineno - first + 1
            if length > limit:
                found.append(f"{node.name} ({length} lines)")
    return found


def long_files(paths: list[Path], limit: int) -> list[str]:
    return [f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path} ({n} lines)" for path in paths
            if (n := len(path.read_text().splitlines())) > limit]


def test_files_keep_one_responsibility() -> None:
    code = [path for path in checked_files("clip", "pipelines", "flows")
            if not path.is_relative_to(REPO / "clip" / "model")]
    assert not long_files(code, MAX_FILE_LINES), f"split these files (over {MAX_FILE_LINES} lines)"


def test_training_functions_stay_short() -> None:
    found = {str(path.relative_to(REPO)): names for path in checked_files("clip/train")
             if (names := long_functions(path, MAX_TRAIN_FUNCTION_LINES))}
    assert not found, f"functions in clip/train over {MAX_TRAIN_FUNCTION_LINES} lines: {found}"


def test_size_checkers_catch_planted_long_code(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_TRAIN_FUNCTION_LINES))
    planted = tmp_path / "planted.py"
    planted.write_text(f"def short():\n    return 1\n\n\n@staticmethod\ndef loop():\n{body}\n")
    assert long_functions(planted, MAX_TRAIN_FUNCTION_LINES) == [f"loop ({MAX_TRAIN_FUNCTION_LINES + 2} lines)"]
    planted.write_text("x = 1\n" * (MAX_FILE_LINES + 1))
    assert long_files([planted], MAX_FILE_LINES) == [f"{planted} ({MAX_FILE_LINES + 1} lines)"]
    planted.write_text("x = 1\n" * MAX_FILE_LINES)
    assert long_files([planted], MAX_FILE_LINES) == []


OWN_PACKAGES = ("clip", "pipelines")


def module_file(name: str, importer: Path | None = None, level: int = 0) -> Path | None:
    """The file of this repository that importing `name` runs (`clip.config.load_config` -> clip/config/__init__.py: the
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
    assert "clip/config" in train["deps"]
    planted = {**train, "deps": [dep for dep in train["deps"] if dep != "clip/config"]}
    missing = uncovered_stage_code(planted)
    assert missing and all(name.startswith("clip/config/") for name in missing), missing
    assert "clip/config/train.py" in missing and "clip/config/__init__.py" in missing, missing
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
