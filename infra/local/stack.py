"""The team stack on this machine: real servers from packages, on 127.0.0.1 only, all data under one folder.

    make stack                    # python infra/local/stack.py up: start it, print each UI, its login, the commands
    make stack-down               # python infra/local/stack.py down: stop every process it started; data stays
    python infra/local/stack.py status                     # the state file, and whether each process is alive
    python infra/local/stack.py up --home /srv/clip-stack --repo /path/to/checkout

What runs (names, databases, buckets, work pool: infra/stack.yaml, shared with infra/docker/compose.yaml):
- PostgreSQL (Debian's postgresql package), run as the postgres user when started by root: the backend store
  of MLflow and of Prefect, one database each, password login over 127.0.0.1 only (no socket file).
- The S3 API: moto's server (infra/docker/compose.yaml has MinIO). moto keeps objects in memory and checks no
  keys, so `down` saves every object under <home>/s3/ and `up` puts them back.
- The MLflow tracking server on PostgreSQL, artifacts proxied to s3://<mlflow bucket>/artifacts, with MLflow's
  basic-auth app (admin password and Flask secret from secrets.env) and an allowed-hosts list.
- The Prefect server on PostgreSQL with an API auth string, the process work pool, one worker, and the two
  deployments of infra/local/prefect.yaml (`prefect deploy` run in --repo, so their flow runs run there).
- A Dask scheduler and two workers; the data stages reach it through DASK_SCHEDULER_ADDRESS, the default of
  compute.dask_scheduler.

<home> (default .stack/, git-ignored) holds everything: secrets.env (generated once, mode 0600, the variables of
infra/docker/.env.example), client.env (every variable a pipeline process needs, 0600), state.json (ports, URLs,
pids: what the stack's users and `down` read), logs/, pg/ (PostgreSQL's data), mlflow/, prefect/, s3/. Ports are
chosen free at every start. `up` installs nothing: a missing package is named with the command that installs it.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from string import Template
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = REPO / "infra" / "local"
STACK = yaml.safe_load((REPO / "infra" / "stack.yaml").read_text())
ADMIN = "admin"  # the MLflow admin and the user part of Prefect's auth string
DB_USER = "clip"
REGION = "us-east-1"
PG_ROOT = Path("/usr/lib/postgresql")
INSTALL_STACK = ".venv/bin/pip install -c constraints.txt -e '.[stack]'"
START_TIMEOUT_S = 240.0
# Start order; `down` stops in reverse (the worker and its flow runs first, PostgreSQL last).
ORDER = ["postgres", "s3", "mlflow", "prefect-server", "dask-scheduler",
         *[f"dask-worker-{i + 1}" for i in range(STACK["dask_workers"])], "prefect-worker"]


class StackError(RuntimeError):
    """The stack cannot start or stop; the message is one line (plus a log tail) naming what is wrong."""


# ----------------------------------------------------------------------------------------------------------
# what must be installed


def postgres_bindir(pg_root: Path = PG_ROOT) -> Path | None:
    """The newest PostgreSQL's bin folder of Debian's layout (/usr/lib/postgresql/<major>/bin), or None."""
    found = [p.parent for p in pg_root.glob("*/bin/pg_ctl") if (p.parent / "initdb").exists()]
    return max(found, key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0), default=None)


def missing_packages(pg_root: Path = PG_ROOT, bindir: Path = Path(sys.executable).parent) -> list[str]:
    """One line per missing piece: what is missing and the command that installs it (`up` runs none of them)."""
    problems = []
    if postgres_bindir(pg_root) is None:
        problems.append("postgresql is not installed: apt-get install -y postgresql")
    elif os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            problems.append("the postgres user does not exist (PostgreSQL refuses to run as root): "
                            "apt-get install -y postgresql creates it")
    for program, package in (("mlflow", "mlflow"), ("prefect", "prefect"), ("dask", "dask"),
                             ("moto_server", "moto[server]")):
        if not (bindir / program).exists():
            problems.append(f"{package} is not installed ({bindir / program} is missing): {INSTALL_STACK}")
    for module, package in (("psycopg2", "psycopg2-binary"), ("flask_wtf", "Flask-WTF (mlflow[auth])")):
        if importlib.util.find_spec(module) is None:
            problems.append(f"{package} is not installed in {sys.prefix}: {INSTALL_STACK}")
    return problems


# ----------------------------------------------------------------------------------------------------------
# the stack's folder: secrets, state, client environment


def read_env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def write_private(path: Path, text: str) -> None:
    """Written whole (a reader never sees half a file), readable by this user only."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    os.replace(tmp, path)


def load_secrets(home: Path) -> dict[str, str]:
    """<home>/secrets.env, generated on first use with the variables of infra/docker/.env.example: user names
    keep the example's value, every other value is a fresh random token (URL-safe, so it fits in a URL)."""
    path = home / "secrets.env"
    if not path.exists():
        example = read_env_file(REPO / "infra" / "docker" / ".env.example")
        values = {key: value if key.endswith("_USER") else secrets.token_urlsafe(24) for key, value in example.items()}
        write_private(path, "# The local stack's secrets (infra/local/stack.py generated them; keep this file private)\n"
                      + "".join(f"{key}={value}\n" for key, value in values.items()))
    return read_env_file(path)


def client_env(ports: dict[str, int], secret: dict[str, str]) -> dict[str, str]:
    """What a pipeline process needs to use the stack: infra/stack.yaml's client_env names with loopback
    values, their credentials, and Dask's address (compute.dask_scheduler's default)."""
    host = "127.0.0.1"
    return {
        "MLFLOW_TRACKING_URI": f"http://{host}:{ports['mlflow']}",
        "MLFLOW_TRACKING_USERNAME": ADMIN,
        "MLFLOW_TRACKING_PASSWORD": secret["MLFLOW_ADMIN_PASSWORD"],
        "PREFECT_API_URL": f"http://{host}:{ports['prefect']}/api",
        "PREFECT_API_AUTH_STRING": f"{ADMIN}:{secret['PREFECT_AUTH_PASSWORD']}",
        "AWS_ENDPOINT_URL": f"http://{host}:{ports['s3']}",
        "AWS_ACCESS_KEY_ID": secret["MINIO_ROOT_USER"],
        "AWS_SECRET_ACCESS_KEY": secret["MINIO_ROOT_PASSWORD"],
        "AWS_DEFAULT_REGION": REGION,
        "DASK_SCHEDULER_ADDRESS": f"tcp://{host}:{ports['dask']}",
    }


def read_state(home: Path) -> dict[str, Any] | None:
    path = home / "state.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_state(home: Path, state: dict[str, Any]) -> None:
    tmp = home / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, home / "state.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------------------
# processes: started in their own session, recorded by pid and start time, stopped by pid


def _start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), or None when there is no such live process: with the
    pid it names one process, so a pid reused after a reboot or a crash is never signalled."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def alive(record: dict[str, Any]) -> bool:
    return _start_ticks(record["pid"]) == record["started"]


def spawn(name: str, argv: list[str], env: dict[str, str], home: Path, cwd: Path | None = None
          ) -> tuple[subprocess.Popen, dict[str, Any]]:
    log = home / "logs" / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, {"pid": proc.pid, "started": _start_ticks(proc.pid), "log": str(log), "group": True}


def stop(name: str, record: dict[str, Any], timeout_s: float = 30.0) -> None:
    """SIGTERM to the process group the launcher started (a server's own children go with it; the worker's flow
    runs too), SIGKILL after `timeout_s`. PostgreSQL gets SIGINT, its fast shutdown, at the postmaster's pid."""
    if not alive(record):
        return
    pid = record["pid"]

    def send(sig: int) -> None:
        try:
            os.killpg(pid, sig) if record.get("group") else os.kill(pid, sig)
        except ProcessLookupError:
            pass

    send(signal.SIGINT if name == "postgres" else signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while alive(record) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(record) or record.get("group"):
        send(signal.SIGKILL)  # what is left of the group after its leader exited (a stray child) goes too
    while alive(record):
        time.sleep(0.1)


def log_tail(record: dict[str, Any], lines: int = 25) -> str:
    path = Path(record["log"])
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def wait_for(what: str, ready: Callable[[], bool], started: dict[str, tuple[subprocess.Popen | None, dict]],
             timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll `ready` until true; StackError with the log tail when a started process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        for name, (proc, record) in started.items():
            if (proc is not None and proc.poll() is not None) or not alive(record):
                raise StackError(f"{name} exited while waiting for {what}; the end of {record['log']}:\n"
                                 + log_tail(record))
        try:
            if ready():
                return
        except Exception:  # not up yet: connection refused, 5xx, ...
            pass
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {name}: {record['log']}\n{log_tail(record, 10)}"
                             for name, (_, record) in started.items())
            raise StackError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{logs}")
        time.sleep(0.5)


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# ----------------------------------------------------------------------------------------------------------
# PostgreSQL


def _as_postgres(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its programs as the postgres user."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _run(argv: list[str], what: str, **kwargs: Any) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise StackError(f"{what} failed ({result.returncode}): {(result.stderr or result.stdout).strip()[-2000:]}")
    return result


def start_postgres(home: Path, port: int, password: str) -> dict[str, Any]:
    bindir = postgres_bindir()
    assert bindir is not None  # checked by missing_packages
    folder, data = home / "pg", home / "pg" / "data"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o700)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        if subprocess.run(_as_postgres(["test", "-w", str(folder)])).returncode != 0:
            raise StackError(f"PostgreSQL runs as the postgres user, which cannot reach {folder}: use a --home whose "
                             "parent folders others may traverse (chmod o+x), e.g. under /srv or /tmp")
    if not (data / "PG_VERSION").exists():
        pwfile = folder / "initdb.pw"
        write_private(pwfile, password + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        try:
            _run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", DB_USER, f"--pwfile={pwfile}",
                               "--auth=scram-sha-256", "-E", "UTF8", "--locale=C"]), "initdb")
        finally:
            pwfile.unlink(missing_ok=True)
        with open(data / "postgresql.conf", "a") as conf:
            conf.write("\n" + (HERE / "postgresql.conf").read_text())
    log = folder / "postgres.log"  # in the folder the postgres user owns: pg_ctl opens it as that user
    _run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", f"-p {port}", "-w", "-t", "120",
                       "start"]), f"pg_ctl start (log: {log})")
    pid = int((data / "postmaster.pid").read_text().split()[0])
    return {"pid": pid, "started": _start_ticks(pid), "log": str(log), "group": False}


def create_databases(port: int, password: str) -> None:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=port, user=DB_USER, password=password, dbname="postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for name in STACK["databases"].values():
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


# ----------------------------------------------------------------------------------------------------------
# S3: moto holds objects in memory, so they are saved to <home>/s3/ at `down` and put back at `up`


def _s3(env: dict[str, str]) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=REGION,
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def restore_buckets(home: Path, env: dict[str, str]) -> int:
    s3, saved, count = _s3(env), home / "s3", 0
    for bucket in STACK["buckets"].values():
        s3.create_bucket(Bucket=bucket)
        for path in sorted(p for p in (saved / bucket).rglob("*") if p.is_file()):
            s3.upload_file(str(path), bucket, path.relative_to(saved / bucket).as_posix())
            count += 1
    return count


def save_buckets(home: Path, env: dict[str, str]) -> int:
    """Every object of the stack's buckets into <home>/s3/<bucket>/<key>, replacing the previous copy whole."""
    s3, fresh, count = _s3(env), home / "s3.saving", 0
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(mode=0o700)
    for bucket in STACK["buckets"].values():
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                if item["Key"].endswith("/"):
                    continue  # a folder marker: nothing to keep
                target = fresh / bucket / item["Key"]
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, item["Key"], str(target))
                count += 1
    previous = home / "s3.previous"  # kept until the new copy is in place
    shutil.rmtree(previous, ignore_errors=True)
    if (home / "s3").exists():
        os.replace(home / "s3", previous)
    os.replace(fresh, home / "s3")
    shutil.rmtree(previous, ignore_errors=True)
    return count


# ----------------------------------------------------------------------------------------------------------
# up / down


def _base_env(home: Path) -> dict[str, str]:
    """The servers' environment: this one without another stack's client settings, the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_", "DASK_"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update({"MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_HOME": str(home / "prefect")})
    return env


def server_commands(ports: dict[str, int], secret: dict[str, str], home: Path) -> dict[str, tuple[list[str], dict]]:
    """Each server's argv and its own environment variables (on top of _base_env), by stack.yaml's name."""
    bindir, host = Path(sys.executable).parent, "127.0.0.1"
    pg = f"{DB_USER}:{secret['POSTGRES_PASSWORD']}@{host}:{ports['postgres']}"
    s3_env = {key: value for key, value in client_env(ports, secret).items() if key.startswith("AWS_")}
    mlflow_port, prefect_port = ports["mlflow"], ports["prefect"]
    commands: dict[str, tuple[list[str], dict]] = {
        "s3": ([str(bindir / "moto_server"), "-H", host, "-p", str(ports["s3"])], {}),
        "mlflow": ([str(bindir / "mlflow"), "server", "--host", host, "--port", str(mlflow_port),
                    "--app-name", "basic-auth", "--workers", "1", "--serve-artifacts",
                    "--artifacts-destination", f"s3://{STACK['buckets']['mlflow_artifacts']}/artifacts",
                    "--allowed-hosts", f"{host}:{mlflow_port},localhost:{mlflow_port}"],
                   {"MLFLOW_BACKEND_STORE_URI": f"postgresql://{pg}/{STACK['databases']['mlflow']}",
                    "MLFLOW_AUTH_CONFIG_PATH": str(home / "mlflow" / "basic_auth.ini"),
                    "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
                    "MLFLOW_AUTH_ADMIN_PASSWORD": secret["MLFLOW_ADMIN_PASSWORD"],
                    "MLFLOW_FLASK_SERVER_SECRET_KEY": secret["MLFLOW_FLASK_SECRET_KEY"],
                    "MLFLOW_S3_ENDPOINT_URL": s3_env["AWS_ENDPOINT_URL"], **s3_env,
                    # GenAI scoring / trace archival jobs: this pipeline has none; they cost CPU and a slow stop
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),
        "prefect-server": ([str(bindir / "prefect"), "server", "start", "--host", host, "--port", str(prefect_port)],
                           {"PREFECT_SERVER_DATABASE_CONNECTION_URL":
                            f"postgresql+asyncpg://{pg}/{STACK['databases']['prefect']}",
                            "PREFECT_SERVER_API_AUTH_STRING": f"{ADMIN}:{secret['PREFECT_AUTH_PASSWORD']}",
                            "PREFECT_SERVER_UI_API_URL": f"http://{host}:{prefect_port}/api"}),
        "dask-scheduler": ([str(bindir / "dask"), "scheduler", "--host", host, "--port", str(ports["dask"]),
                            "--dashboard-address", f"{host}:{ports['dask_dashboard']}"], {}),
    }
    for i in range(STACK["dask_workers"]):
        name = f"dask-worker-{i + 1}"
        commands[name] = ([str(bindir / "dask"), "worker", f"tcp://{host}:{ports['dask']}", "--host", host,
                           "--nworkers", "1", "--nthreads", "1", "--no-dashboard", "--name", name,
                           # the worker's own HTTP server (/health, /metrics) binds here, even without a dashboard
                           "--dashboard-address", f"{host}:0"], s3_env)
    return commands


def up(home: Path, repo: Path) -> dict[str, Any]:
    problems = missing_packages()
    if problems:
        raise StackError("cannot start the stack:\n  " + "\n  ".join(problems))
    state = read_state(home)
    if state and state.get("processes"):
        running = [name for name, record in state["processes"].items() if alive(record)]
        if running and len(running) == len(state["processes"]):
            return state  # already up: `make stack` again only prints it
        if running:
            raise StackError(f"part of the stack is still running ({', '.join(running)}): make stack-down first")
    home.chmod(0o711)  # the postgres user passes through to pg/; nobody else lists or reads anything here
    for sub in ("logs", "mlflow", "prefect", "prefect-client", "s3"):
        (home / sub).mkdir(parents=True, exist_ok=True)
        (home / sub).chmod(0o700)
    secret = load_secrets(home)
    ports = {name: free_port() for name in ("postgres", "s3", "mlflow", "prefect", "dask", "dask_dashboard")}
    env = client_env(ports, secret)
    state = {"home": str(home), "repo": str(repo), "ports": ports, "processes": {},
             "urls": {"mlflow": env["MLFLOW_TRACKING_URI"], "prefect": env["PREFECT_API_URL"].removesuffix("/api"),
                      "dask_dashboard": f"http://127.0.0.1:{ports['dask_dashboard']}/status",
                      "s3": env["AWS_ENDPOINT_URL"], "postgres": f"127.0.0.1:{ports['postgres']}",
                      "dask_scheduler": env["DASK_SCHEDULER_ADDRESS"]},
             "client_env_file": str(home / "client.env"), "secrets_file": str(home / "secrets.env")}
    write_private(home / "client.env", "# The local stack's client environment: set -a; . <this file>; set +a\n"
                  + "".join(f"{key}={value}\n" for key, value in env.items()))
    started: dict[str, tuple[subprocess.Popen | None, dict]] = {}

    def record(name: str, proc: subprocess.Popen | None, rec: dict[str, Any]) -> None:
        started[name] = (proc, rec)
        state["processes"][name] = rec
        write_state(home, state)  # at once: a failed start is still stopped by `down`

    try:
        record("postgres", None, start_postgres(home, ports["postgres"], secret["POSTGRES_PASSWORD"]))
        create_databases(ports["postgres"], secret["POSTGRES_PASSWORD"])
        (home / "mlflow" / "basic_auth.ini").write_text(
            Template((HERE / "mlflow-basic-auth.ini").read_text()).substitute(auth_db=home / "mlflow" / "basic_auth.db"))
        base = _base_env(home)
        commands = server_commands(ports, secret, home)
        record("s3", *spawn("s3", commands["s3"][0], base, home))
        wait_for("the S3 API", lambda: _s3(env).list_buckets() is not None, started)
        restored = restore_buckets(home, env)
        for name in ["mlflow", "prefect-server", "dask-scheduler"]:
            argv, own = commands[name]
            record(name, *spawn(name, argv, {**base, **own}, home))
        for name in [n for n in commands if n.startswith("dask-worker-")]:
            argv, own = commands[name]
            # in the checkout, like the flow runs: the data stages hand their tasks paths relative to it
            record(name, *spawn(name, argv, {**base, **own}, home, cwd=repo))
        import httpx

        mlflow_auth = _basic(ADMIN, secret["MLFLOW_ADMIN_PASSWORD"])
        prefect_auth = _basic(*env["PREFECT_API_AUTH_STRING"].split(":", 1))
        wait_for("MLflow", lambda: httpx.get(f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search",
                                             params={"max_results": 1}, headers=mlflow_auth).status_code == 200,
                 started)
        wait_for("Prefect", lambda: httpx.get(f"{env['PREFECT_API_URL']}/health", headers=prefect_auth)
                 .status_code == 200, started)
        wait_for(f"{STACK['dask_workers']} Dask workers", lambda: len(httpx.get(
            f"http://127.0.0.1:{ports['dask_dashboard']}/json/identity.json").json()["workers"])
            == STACK["dask_workers"], started)
        client = {**base, **env, "PREFECT_HOME": str(home / "prefect-client"), "PREFECT_CLI_PROMPT": "false"}
        pool = STACK["prefect"]["work_pool"]
        prefect = str(Path(sys.executable).parent / "prefect")
        _run([prefect, "work-pool", "create", pool, "--type", "process", "--overwrite"], f"creating work pool {pool}",
             env=client)
        prefect_file = repo / "infra" / "local" / "prefect.yaml"
        _run([prefect, "deploy", "--all", "--prefect-file", str(prefect_file)], f"prefect deploy ({prefect_file})",
             env=client, cwd=repo, timeout=300)
        record("prefect-worker", *spawn("prefect-worker", [prefect, "worker", "start", "--pool", pool, "--type",
                                                           "process", "--name", "clip-local-worker"],
                                        {**client, "PREFECT_WORKER_QUERY_SECONDS": "5"}, home, cwd=repo))
        wait_for("the Prefect worker", lambda: any(w["status"] == "ONLINE" for w in httpx.post(
            f"{env['PREFECT_API_URL']}/work_pools/{pool}/workers/filter", headers=prefect_auth, json={}).json()),
            started)
    except BaseException:
        for name in reversed(ORDER):
            if name in state["processes"]:
                stop(name, state["processes"][name])
        state["processes"] = {}
        write_state(home, state)
        raise
    state["restored_objects"] = restored
    write_state(home, state)
    return state


def down(home: Path) -> str:
    state = read_state(home)
    if not state or not state.get("processes"):
        return f"nothing to stop: no running stack recorded in {home / 'state.json'}"
    processes = state["processes"]
    saved = "S3 was not running: nothing saved"
    if "s3" in processes and alive(processes["s3"]):
        try:
            count = save_buckets(home, read_env_file(home / "client.env"))
            saved = f"{count} S3 objects saved to {home / 's3'}"
        except Exception as exc:  # stop everything all the same; the previous copy stays
            saved = f"could not save the S3 objects ({type(exc).__name__}: {exc}); {home / 's3'} is unchanged"
    for name in [n for n in reversed(ORDER) if n in processes] + [n for n in processes if n not in ORDER]:
        stop(name, processes[name])
    state["processes"] = {}
    write_state(home, state)
    return f"stopped {len(processes)} processes ({', '.join(processes)}); {saved}; the data stays in {home}"


def summary(state: dict[str, Any]) -> str:
    home, urls = Path(state["home"]), state["urls"]
    rel = os.path.relpath(home) if home.is_relative_to(Path.cwd()) else str(home)
    secrets_file, client_file = f"{rel}/secrets.env", f"{rel}/client.env"
    return "\n".join([
        f"The team stack is up (state: {rel}/state.json, logs: {rel}/logs/; all on 127.0.0.1):",
        f"  MLflow      {urls['mlflow']}   log in as {ADMIN}, password MLFLOW_ADMIN_PASSWORD in {secrets_file}",
        f"  Prefect     {urls['prefect']}   the UI asks for the auth string {ADMIN}:<PREFECT_AUTH_PASSWORD in "
        f"{secrets_file}>",
        f"  Dask        {urls['dask_dashboard']}   no login (Dask has none): loopback only; "
        f"scheduler {urls['dask_scheduler']}",
        f"  S3 API      {urls['s3']}   moto's server: it checks no keys, loopback only; objects are saved to "
        f"{rel}/s3/ at stack-down",
        f"  PostgreSQL  {urls['postgres']}   user {DB_USER}, password POSTGRES_PASSWORD in {secrets_file}; databases "
        + ", ".join(STACK["databases"].values()),
        f"Deployments weekly-retrain and on-new-data run in {state['repo']} (pool {STACK['prefect']['work_pool']}).",
        "Use it from a shell (the pipeline reads only these variables):",
        f"  set -a; . {client_file}; set +a",
        "  .venv/bin/prefect deployment run clip-pipeline/weekly-retrain",
        "  .venv/bin/clip-pipeline run                  # or the flow here, tracked on the stack",
        "Stop it: make stack-down (every process it started; the data stays).",
    ])


def status(home: Path) -> str:
    state = read_state(home)
    if not state:
        return f"no stack state in {home}"
    lines = [f"{name:16} pid {rec['pid']:>7}  {'running' if alive(rec) else 'STOPPED'}"
             for name, rec in state.get("processes", {}).items()] or ["no processes recorded: the stack is down"]
    return "\n".join([*lines, json.dumps(state["urls"], indent=2)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The team stack on 127.0.0.1 (PostgreSQL, S3, MLflow, Prefect, "
                                                 "Dask): up, down, status.")
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--home", type=Path, default=REPO / ".stack", help="the stack's folder (default .stack/)")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout the deployments run in (default: this)")
    args = parser.parse_args(argv)
    home = args.home.resolve()
    try:
        if args.command == "up":
            home.mkdir(parents=True, exist_ok=True)
            print(summary(up(home, args.repo.resolve())))
        elif args.command == "down":
            print(down(home))
        else:
            print(status(home))
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
