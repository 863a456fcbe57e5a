"""Prefect flows over the stages. Importing `pipelines` first sets the telemetry opt-outs (pipelines/__init__.py)
before any flow module imports Prefect or MLflow."""

import pipelines  # noqa: F401
