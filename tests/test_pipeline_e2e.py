"""The README's main job, as a user runs it: `clip-pipeline all` on a small embedded default, in a fresh folder.

Checks that the stages hand over through their documented formats (docs/formats.md): queries and raw shards ->
dedup keep-list -> manifest with a data version -> a self-contained checkpoint whose MLflow run is tagged
with that data version.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("clip-pipeline"))

# 8 epochs (96 steps): at 1 epoch the 1-layer towers were barely past chance on the colours (0.27 against the 0.25
# bound), so any change of the demo pool's pixels could fail the test without the model learning any less.
SMALL = [
    "collect.synthetic.num_samples=384", "collect.synthetic.image_size=32", "collect.samples_per_shard=128",
    "shard.samples_per_shard=100", "train.batch_size=32", "train.epochs=8", "train.num_workers=1",
    "train.warmup_steps=2", "train.checkpoint_every=4", "train.tokenizer.vocab_size=600",
    "train.model_overrides={image_size: 32, vision_layers: 1, text_layers: 1}",
]


@pytest.mark.heavy
def test_pipeline_all_on_the_embedded_default(tmp_path: Path) -> None:
    args = [CLI, "all", "--params", str(REPO / "params.yaml")]
    for override in SMALL:
        args += ["--set", override]
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("collect", "dedup", "shard", "train", "export", "evaluate", "promote"):
        assert (tmp_path / f"reports/metrics/{stage}.json").exists(), stage
    # the tiny model learned: zero-shot on the synthetic sets well above chance; the first version is champion
    evaluation = json.loads((tmp_path / "reports/metrics/evaluate.json").read_text())
    assert evaluation["synthetic-colors/zeroshot"] > 2 / 8, evaluation  # 8 colours: chance is 1/8
    assert json.loads((tmp_path / "reports/metrics/promote.json").read_text())["decision"] == "champion"
    assert (tmp_path / "models/bundle/manifest.json").exists() and (tmp_path / "reports/eval/results.md").exists()

    queries = (tmp_path / "data/queries.txt").read_text().splitlines()
    assert queries and queries == sorted(set(queries))

    raw_stats = json.loads((tmp_path / "data/raw/stats.json").read_text())
    assert raw_stats["by_status"]["ok"] == 384

    # Every stage's metrics land in one place (docs/formats.md "Stage metrics").
    metrics = {stage: json.loads((tmp_path / f"reports/metrics/{stage}.json").read_text())
               for stage in ("collect", "dedup", "shard")}
    assert metrics["collect"]["collect_ok"] == 384

    keep = pd.read_parquet(tmp_path / "data/dedup/keep.parquet")
    removed = pd.read_parquet(tmp_path / "data/dedup/removed.parquet")
    assert len(keep) + len(removed) == 384 and len(keep) > 300

    # The data version lives in its own folder; latest.json points at it (docs/formats.md).
    version = json.loads((tmp_path / "data/shards/latest.json").read_text())["data_version"]
    manifest = json.loads((tmp_path / "data/shards" / version / "manifest.json").read_text())
    assert manifest["total_samples"] == len(keep) and manifest["data_version"] == version
    assert metrics["dedup"]["kept"] == len(keep) and metrics["shard"]["data_version"] == manifest["data_version"]
    shard_keys = set()
    for shard in manifest["shards"]:
        with tarfile.open(tmp_path / "data/shards" / version / shard["name"]) as tar:
            shard_keys |= {m.name.rsplit(".", 1)[0] for m in tar.getmembers()}
    assert shard_keys == set(keep["key"])

    # train.output unset: the run lives in models/runs/<model>-<data_version[:12]>
    [checkpoints] = list((tmp_path / "models/runs").iterdir())
    assert checkpoints.name.endswith("-" + manifest["data_version"][:12])
    final = torch.load(checkpoints / "final.pt", weights_only=True, map_location="cpu")
    assert final["data_version"] == manifest["data_version"]
    assert final["step"] == 8 * (len(keep) // 32)  # 8 epochs of full global batches
    assert (checkpoints / "tokenizer.json").exists()

    # The checkpoint alone rebuilds the model and tokenizer and embeds a caption (what export will do).
    from clip.model import create_model_from_config
    from clip.tokenizer import Tokenizer

    model = create_model_from_config(final["model_config"])
    model.load_state_dict(final["model"], strict=True)
    tokenizer = Tokenizer.from_json(final["tokenizer"])
    text = model.encode_text(tokenizer(["a red circle"]), normalize=True)
    assert text.shape == (1, final["model_config"]["embed_dim"])
    assert torch.allclose(text.norm(dim=-1), torch.ones(1), atol=1e-5)

    # The MLflow run in the local store is tied to the data version.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("clip")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "train"]
    assert len(runs) == 1
    assert runs[0].data.tags["data_version"] == manifest["data_version"]
    history = client.get_metric_history(runs[0].info.run_id, "loss")  # every step, all flushed before the run ended
    assert sorted(m.step for m in history) == list(range(1, final["step"] + 1))
    assert runs[0].info.status == "FINISHED"

    # The weekly rerun (issue 11.2): new data (here another collect.seed) and no other edit trains a new run on
    # the new data version beside the first, whose checkpoint is left as it was.
    import hashlib

    first_final = checkpoints / "final.pt"
    first_digest = hashlib.sha256(first_final.read_bytes()).hexdigest()
    first_version_files = {p: p.read_bytes() for p in (tmp_path / "data/shards" / version).iterdir()}
    rerun = subprocess.run([*args, "--set", "collect.seed=1"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    second_version = json.loads((tmp_path / "data/shards/latest.json").read_text())["data_version"]
    second_manifest = json.loads((tmp_path / "data/shards" / second_version / "manifest.json").read_text())
    assert second_manifest["data_version"] != manifest["data_version"]
    assert {p: p.read_bytes() for p in (tmp_path / "data/shards" / version).iterdir()} == first_version_files
    second = tmp_path / "models/runs" / f"{checkpoints.name.rsplit('-', 1)[0]}-{second_manifest['data_version'][:12]}"
    assert torch.load(second / "final.pt", weights_only=True)["data_version"] == second_manifest["data_version"]
    assert hashlib.sha256(first_final.read_bytes()).hexdigest() == first_digest
