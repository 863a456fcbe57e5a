"""Thin entry points over clip/: one module per stage, the `clip-pipeline` command, and what they share.

Every entry point (`clip-pipeline`, `python -m pipelines.<stage>`, `python -m flows.pipeline`) imports this package
first, before Prefect or MLflow are imported (flows/__init__.py imports it too), so the telemetry opt-outs that the
Makefile exports hold for all of them; setdefault: a value the user set is kept.
"""

import os

TELEMETRY_OPT_OUTS = {"MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1",
                      "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
for _name, _value in TELEMETRY_OPT_OUTS.items():
    os.environ.setdefault(_name, _value)
