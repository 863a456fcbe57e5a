"""The promotion gate: a new version takes `champion` only when its evaluation mean over the datasets both versions
were evaluated on beats the champion's; otherwise `challenger`. A real MLflow store (SQLite + artifact folder), a
real export bundle (tests/support/bundles.py), results tables in the evaluation stage's format.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from clip.config import PipelineConfig, load_config
from clip.formats.errors import MissingInputError
from clip.formats.results import ResultRow, ResultsTable
from clip.promote import stage
from clip.promote.stage import decide
from tests.support.bundles import make_bundle
from tests.support.servers import free_port, wait_until_up


def test_the_rule_compares_only_datasets_both_versions_have() -> None:
    assert decide({"a": 0.5}, None, 0.0).promote  # the first version becomes champion
    assert decide({"a": 0.6, "b": 0.6}, {"a": 0.5, "b": 0.5}, 0.0).promote
    assert not decide({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}, 0.0).promote  # equal is not better
    assert not decide({"a": 0.56}, {"a": 0.5}, 0.1).promote  # min_improvement
    # better on a dataset the champion never saw, worse on the common one: not promoted
    worse = decide({"a": 0.4, "new-set": 0.99}, {"a": 0.5}, 0.0)
    assert not worse.promote and worse.datasets == ("a",) and worse.new_mean == pytest.approx(0.4)
    nothing_common = decide({"x": 0.9}, {"a": 0.1}, 0.0)
    assert not nothing_common.promote and nothing_common.datasets == ()


def _write_results(path: Path, scores: dict[str, float]) -> str:
    rows = [ResultRow(dataset=d, task="zeroshot", metric="accuracy", value=v, samples=100) for d, v in scores.items()]
    rows.append(ResultRow(dataset="cifar10", task="zeroshot", metric="accuracy", value=None, status="skipped",
                          note="data/eval/cifar10"))
    path.write_bytes(ResultsTable(rows=tuple(rows)).to_json_bytes())
    return str(path)


def _cfg(bundle: str, results: str, store: dict[str, str]) -> PipelineConfig:
    return load_config(None, [f"promote.bundle={bundle}", f"promote.results={results}",
                              f"tracking.uri={store['uri']}", f"tracking.artifact_location={store['artifact_location']}",
                              "tracking.experiment=promote-test"])


def _promote(cfg: PipelineConfig) -> stage.PromoteResult:
    return stage.run(cfg.promote, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking)


def test_champion_moves_only_to_a_better_version(tmp_path: Path, mlflow_store: dict[str, str]) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    bundle = make_bundle(tmp_path / "bundle")
    first = _promote(_cfg(bundle, _write_results(tmp_path / "r1.json", {"synthetic-shapes": 0.6,
                                                                       "synthetic-colors": 0.5}), mlflow_store))
    name = first.metrics["model_name"]
    assert name == "clip-tiny-vit" and first.metrics["decision"] == "champion" and first.metrics["version"] == 1
    # a planted worse model: challenger; the champion stays at version 1
    worse = _promote(_cfg(bundle, _write_results(tmp_path / "r2.json", {"synthetic-shapes": 0.4,
                                                                       "synthetic-colors": 0.5}), mlflow_store))
    assert worse.metrics["decision"] == "challenger" and worse.metrics["promoted"] == 0
    assert worse.metrics["champion_mean"] == pytest.approx(0.55) and worse.metrics["new_mean"] == pytest.approx(0.45)
    client = MlflowClient(tracking_uri=mlflow_store["uri"], registry_uri=mlflow_store["uri"])
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
    # a better one takes champion; the decision and both means are on its MLflow run
    better = _promote(_cfg(bundle, _write_results(tmp_path / "r3.json", {"synthetic-shapes": 0.7,
                                                                        "synthetic-colors": 0.6}), mlflow_store))
    assert better.metrics["decision"] == "champion" and better.metrics["previous_champion"] == "1"
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == "3"
    run = client.get_run(champion.run_id)
    assert run.data.tags["decision"] == "champion" and run.data.metrics["promoted"] == 1.0
    assert run.data.metrics["champion_mean"] == pytest.approx(0.55)
    assert run.data.tags["compared_datasets"] == "synthetic-colors,synthetic-shapes"
    # its description is the bundle's model card with the evaluation results filled in
    assert "synthetic-colors" in champion.description and "<!-- evaluation:begin -->" in champion.description
    # the registered version is the bundle's pyfunc model
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert model.metadata.metadata["clip_model"] == "tiny-vit"


def test_a_promotion_run_again_registers_nothing_twice(tmp_path: Path, mlflow_store: dict[str, str]) -> None:
    """A promote stage run again on the same bundle and results (after a failure further on, or a rerun) reuses
    the version it registered: no duplicate in the registry, the aliases decided as before."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_store["uri"], registry_uri=mlflow_store["uri"])
    good, weak = make_bundle(tmp_path / "good", seed=1), make_bundle(tmp_path / "weak", seed=2)
    good_results = _write_results(tmp_path / "good.json", {"synthetic-shapes": 0.7})
    weak_results = _write_results(tmp_path / "weak.json", {"synthetic-shapes": 0.3})
    first = _promote(_cfg(good, good_results, mlflow_store))
    name = first.metrics["model_name"]
    again = _promote(_cfg(good, good_results, mlflow_store))
    assert (again.metrics["version"], again.metrics["decision"], again.metrics["reused"]) == (1, "champion", 1)
    assert "already holds champion" in again.metrics["reason"]
    weak_first = _promote(_cfg(weak, weak_results, mlflow_store))
    weak_again = _promote(_cfg(weak, weak_results, mlflow_store))
    assert (weak_first.metrics["version"], weak_first.metrics["decision"], weak_first.metrics["reused"]) == (
        2, "challenger", 0)
    assert (weak_again.metrics["version"], weak_again.metrics["decision"], weak_again.metrics["reused"]) == (
        2, "challenger", 1)
    assert sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'")) == [1, 2]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    # the same checkpoint evaluated anew (other scores) is a new promotion: registered, and compared
    rescored = _promote(_cfg(weak, _write_results(tmp_path / "rescored.json", {"synthetic-shapes": 0.9}),
                             mlflow_store))
    assert (rescored.metrics["version"], rescored.metrics["decision"], rescored.metrics["reused"]) == (
        3, "champion", 0)


def test_bad_inputs_are_refused_before_anything_is_registered(tmp_path: Path, mlflow_store: dict[str, str]) -> None:
    from mlflow.tracking import MlflowClient

    bundle = make_bundle(tmp_path / "bundle")
    with pytest.raises(MissingInputError, match="no evaluation results at .*missing.json"):
        _promote(_cfg(bundle, str(tmp_path / "missing.json"), mlflow_store))
    with pytest.raises(MissingInputError, match="no bundle at"):
        _promote(_cfg(str(tmp_path / "nobundle"), _write_results(tmp_path / "r.json", {"a": 1.0}), mlflow_store))
    off = _cfg(bundle, _write_results(tmp_path / "r.json", {"a": 1.0}), mlflow_store)
    off = off.model_copy(update={"tracking": off.tracking.model_copy(update={"enabled": False})})
    with pytest.raises(ValueError, match="tracking.enabled"):
        _promote(off)
    assert MlflowClient(tracking_uri=mlflow_store["uri"]).search_registered_models() == []


_BLOCK_TORCH = '''import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in the serving process")
sys.meta_path.insert(0, _NoTorch())
'''


@pytest.mark.heavy
def test_champion_is_served_by_mlflow_models_serve_without_torch(tmp_path: Path,
                                                                 mlflow_store: dict[str, str]) -> None:
    """`mlflow models serve -m models:/<name>@champion` on 127.0.0.1, in processes where importing torch raises
    (a sitecustomize on PYTHONPATH blocks it in the server and its workers), answers label probabilities."""
    import base64
    import io
    import os
    import subprocess
    import sys

    import httpx
    from PIL import Image

    bundle = make_bundle(tmp_path / "bundle")
    name = _promote(_cfg(bundle, _write_results(tmp_path / "r.json", {"synthetic-shapes": 0.5}),
                         mlflow_store)).metrics["model_name"]
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(_BLOCK_TORCH)
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store["uri"], "PYTHONPATH": str(blocker),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_ENABLE_TELEMETRY": "false"}
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([mlflow_cli, "models", "serve", "-m", f"models:/{name}@champion", "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)], env=env, cwd=tmp_path, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(f"{url}/ping", server, tmp_path / "serve.log")
        buf = io.BytesIO()
        Image.new("RGB", (48, 48), (220, 30, 30)).save(buf, format="PNG")
        request = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(buf.getvalue()).decode()]]},
                   "params": {"labels": ["red", "blue", "green"]}}
        answer = httpx.post(f"{url}/invocations", json=request, timeout=60)
        assert answer.status_code == 200, answer.text
        [row] = answer.json()["predictions"]
        assert row["label"] in ("red", "blue", "green") and abs(sum(row["probabilities"]) - 1) < 1e-5
        assert "torch is blocked" not in (tmp_path / "serve.log").read_text()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
