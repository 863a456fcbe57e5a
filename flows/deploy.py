"""Deployments of the pipeline flow: weekly retraining on a schedule, and retraining when new data is published.

    python -m flows.deploy [--cron '0 3 * * 1'] [--timezone Europe/Berlin] [--paused] [--retrain-stages ...]
    clip-pipeline serve [--cron ...] [--timezone ...] [--paused] [--stages ...]   # the same
    prefect deployment run 'clip-pipeline/weekly-retrain'                                  # retrain by hand
    prefect deployment run 'clip-pipeline/weekly-retrain' --param 'overrides=["train.epochs=8"]'   # = retrain --set

Overrides of a deployment run (`overrides`, e.g. from `clip-pipeline retrain --set`) apply to that run only: the
flow puts params.yaml back afterwards (flows/pipeline.py), so later scheduled runs use params.yaml as it is.
`--paused` starts both paused (the deployments paused, the trigger disabled): nothing runs until they are resumed
(the Prefect UI's toggle, or serving again without --paused); `prefect deployment run` still starts a run.

- `weekly-retrain`: the whole flow (flows/pipeline.py) on a cron schedule (`--cron`, Mondays 03:00 by default, in
  `--timezone`, UTC by default).
  DVC decides what actually runs: unchanged stages are skipped.
- `on-new-data`: a deployment trigger on the `clip.data.published` event (pipelines/events.py, emitted by the shard
  stage when it publishes a data version): runs train -> export -> evaluate -> promote; the event's data version
  becomes the flow run's `data_version` parameter (checked against shard.output's latest.json when it starts).
Both are served by this process (`flow.serve` semantics through `prefect.serve`); a Prefect server is needed for
the schedule and the trigger (`prefect server start`, PREFECT_API_URL).

One run at a time, queued, never failed for overlapping (`queueing_options`, `serve_deployments`): every run
trains in the same checkout, so a second run must wait for the first, however long training takes.
- Each deployment has a concurrency limit of 1 with the ENQUEUE strategy: a run of a deployment whose previous run
  is still going is put back by the server as Scheduled, state name `AwaitingConcurrencySlot`, and retried until
  the slot is free (also across several serve processes: the limit lives on the server).
- This serve process runs one flow run at a time for both deployments (the runner's `limit`): a weekly run and an
  on-new-data run never overlap; the one that waits stays Scheduled (`Late` once its start time has passed by
  15 s) and starts when the other finishes.
The flow's checkout lock (flows/pipeline.py) stays as the safety net for runs outside these deployments.
"""

from __future__ import annotations

import argparse
import zoneinfo
from typing import Any

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.schedules import Cron

from flows.pipeline import check_stages, pipeline
from pipelines._common import prepare_process, print_error
from pipelines.events import DATA_PUBLISHED_EVENT

DEFAULT_CRON = "0 3 * * 1"
RETRAIN_STAGES = ["train", "export", "evaluate", "promote"]


RUNS_AT_ONCE = 1  # per deployment (server side) and per serve process (both deployments together)


def queueing_options() -> dict[str, Any]:
    """`to_deployment` options of every deployment here: one run at a time, a second one queued by the server
    (state AwaitingConcurrencySlot) rather than started to block on the checkout lock, or cancelled."""
    return {"concurrency_limit": ConcurrencyLimitConfig(limit=RUNS_AT_ONCE,
                                                        collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)}


def serve_deployments(*served: RunnerDeployment) -> None:
    """Serve `served` from this process, running at most RUNS_AT_ONCE flow run of them at a time."""
    serve(*served, limit=RUNS_AT_ONCE)


def deployments(cron: str = DEFAULT_CRON, repo: str | None = None, retrain_stages: list[str] | None = None,
                timezone: str | None = None, paused: bool = False) -> list[RunnerDeployment]:
    """The two RunnerDeployments (not yet served). `timezone`: the cron schedule's (IANA name; None: UTC).
    `paused`: both start paused (deployments paused, the trigger disabled) until resumed."""
    stages = retrain_stages or RETRAIN_STAGES
    check_stages(stages)
    if timezone is not None and timezone not in zoneinfo.available_timezones():
        raise ValueError(f"unknown time zone {timezone!r} (--timezone): an IANA name such as Europe/Berlin or UTC")
    schedule = {"cron": cron} if timezone is None else {"schedule": Cron(cron, timezone=timezone)}
    on_pause = {"paused": True} if paused else {}  # None (not False) otherwise: Prefect's own default, unpaused
    weekly = pipeline.to_deployment(name="weekly-retrain", parameters={"repo": repo},
                                    description="The whole pipeline, weekly; DVC skips what did not change.",
                                    **schedule, **on_pause, **queueing_options())
    on_new_data = pipeline.to_deployment(
        name="on-new-data",
        parameters={"repo": repo, "stages": stages},
        triggers=[DeploymentEventTrigger(
            expect={DATA_PUBLISHED_EVENT},
            parameters={"repo": repo, "stages": stages,
                        "data_version": "{{ event.resource['clip.data_version'] }}"},
            enabled=not paused,
        )],
        description="Train, export, evaluate and promote when the shard stage publishes a new data version.",
        **on_pause, **queueing_options(),
    )
    return [weekly, on_new_data]


def parse_args(argv: list[str] | None = None) -> list[RunnerDeployment]:
    """The deployments `python -m flows.deploy ARGS` serves; ValueError naming a bad stage, time zone or cron."""
    parser = argparse.ArgumentParser(description="Serve the scheduled and the event-triggered deployments.")
    parser.add_argument("--cron", default=DEFAULT_CRON, help=f"weekly-retrain schedule (default {DEFAULT_CRON!r})")
    parser.add_argument("--timezone", default=None, help="the schedule's time zone (IANA name; default UTC)")
    parser.add_argument("--paused", action="store_true", help="start both deployments paused")
    parser.add_argument("--repo", default=None, help="the checkout the flows run in (default: this one)")
    parser.add_argument("--retrain-stages", default=",".join(RETRAIN_STAGES),
                        help="the stages on-new-data runs (comma-separated)")
    args = parser.parse_args(argv)
    try:
        Cron(args.cron)
    except ValueError as exc:
        raise ValueError(f"--cron {args.cron!r} is not a cron expression: {exc}") from None
    return deployments(args.cron, args.repo, [s for s in args.retrain_stages.split(",") if s], args.timezone,
                       args.paused)


def main(argv: list[str] | None = None) -> None:
    prepare_process()
    try:
        served = parse_args(argv)
    except ValueError as exc:
        print_error(str(exc))
        raise SystemExit(2) from None
    serve_deployments(*served)


if __name__ == "__main__":
    main()
