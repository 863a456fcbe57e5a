"""Deployments of the pipeline flow: weekly retraining on a schedule, and retraining when new data is published.

    python -m flows.deploy                      # serve both deployments from this process (Ctrl-C to stop)
    clip-pipeline serve                         # the same
    prefect deployment run 'clip-pipeline/weekly-retrain'                                  # retrain by hand
    prefect deployment run 'clip-pipeline/weekly-retrain' --param 'overrides=["train.epochs=8"]'

- `weekly-retrain`: the whole flow (flows/pipeline.py) on a cron schedule (`--cron`, Mondays 03:00 by default).
  DVC decides what actually runs: unchanged stages are skipped.
- `on-new-data`: a deployment trigger on the `clip.data.published` event (pipelines/events.py, emitted by the shard
  stage when it publishes a data version): runs train -> export -> evaluate -> promote; the event's data version
  becomes the flow run's `data_version` parameter (checked against shard.output's latest.json when it starts).
Both are served by this process (`flow.serve` semantics through `prefect.serve`); a Prefect server is needed for
the schedule and the trigger (`prefect server start`, PREFECT_API_URL).
"""

from __future__ import annotations

import argparse

from prefect import serve
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

from flows.pipeline import pipeline
from pipelines.events import DATA_PUBLISHED_EVENT

DEFAULT_CRON = "0 3 * * 1"
RETRAIN_STAGES = ["train", "export", "evaluate", "promote"]


def deployments(cron: str = DEFAULT_CRON, repo: str | None = None,
                retrain_stages: list[str] | None = None) -> list:
    """The two RunnerDeployments (not yet served)."""
    stages = retrain_stages or RETRAIN_STAGES
    weekly = pipeline.to_deployment(name="weekly-retrain", cron=cron, parameters={"repo": repo},
                                    description="The whole pipeline, weekly; DVC skips what did not change.")
    on_new_data = pipeline.to_deployment(
        name="on-new-data",
        parameters={"repo": repo, "stages": stages},
        triggers=[DeploymentEventTrigger(
            expect={DATA_PUBLISHED_EVENT},
            parameters={"repo": repo, "stages": stages,
                        "data_version": "{{ event.resource['clip.data_version'] }}"},
        )],
        description="Train, export, evaluate and promote when the shard stage publishes a new data version.",
    )
    return [weekly, on_new_data]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the scheduled and the event-triggered deployments.")
    parser.add_argument("--cron", default=DEFAULT_CRON, help=f"weekly-retrain schedule (default {DEFAULT_CRON!r})")
    parser.add_argument("--repo", default=None, help="the checkout the flows run in (default: this one)")
    parser.add_argument("--retrain-stages", default=",".join(RETRAIN_STAGES),
                        help="the stages on-new-data runs (comma-separated)")
    args = parser.parse_args(argv)
    serve(*deployments(args.cron, args.repo, [s for s in args.retrain_stages.split(",") if s]))


if __name__ == "__main__":
    main()
