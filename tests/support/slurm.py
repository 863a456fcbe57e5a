"""A one-node SLURM cluster on this machine for the tests (no tests here): munged, slurmctld and slurmd.

    problem = slurm_unavailable()          # None, or why not (naming the Debian package); installs when it can
    with SlurmCluster(tmp_path / "slurm", cpus=2) as cluster:
        job = cluster.sbatch(["--ntasks-per-node=2", "infra/slurm/train.sbatch", ...], env=env, cwd=tmp_path)
        cluster.wait(lambda: cluster.job_state(job) is None, "job finished", 120)

Everything lives in the given folder: slurm.conf, the munge key (generated) and munged's own socket
(`AuthInfo=socket=...`), StateSaveLocation, SlurmdSpoolDir, pid and log files. The daemons and the clients listen
on 127.0.0.1 only (`CommunicationParameters=NoCtldInAddrAny,NoInAddrAny`, NodeAddr 127.0.0.1) on free ports. A
requeued job waits `cred_expire` + 1 s before it starts again (120 s by default: 5 here), and the scheduler looks at
pending jobs every second. Leaving the `with` block cancels every job and stops every process the cluster started,
by pid (the job step daemons too: they carry this cluster's marker in their environment), on failures too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from tests.support.servers import free_port

SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
PACKAGES = {"slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "sbatch": "slurm-wlm", "munged": "munge"}
MARKER_ENV = "CLIP_TEST_SLURM_CLUSTER"  # in every daemon's environment, inherited by slurmstepd and the jobs


def _missing_packages() -> list[str]:
    return sorted({package for program, package in PACKAGES.items() if shutil.which(program, path=SBIN_PATH) is None})


def slurm_unavailable() -> str | None:
    """None when a cluster can start here; else the reason, naming the Debian package. Missing packages are
    installed first when this runs as root with apt-get (as .ci/run does), quietly."""
    missing = _missing_packages()
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "-qq", "update"], ["apt-get", "install", "-y", "-qq", *missing]):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=False)
        missing = _missing_packages()
    if missing:
        return f"needs Debian's {' and '.join(missing)} (apt-get install -y {' '.join(missing)})"
    if os.geteuid() != 0:
        return "slurmd launches jobs as their user and needs root (the slurm-wlm daemons run as root here)"
    return None


def _stop(proc: subprocess.Popen, timeout_s: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class SlurmCluster:
    """munged + slurmctld + slurmd in `folder`: one node (this host's short name) with `cpus` CPUs, one partition."""

    def __init__(self, folder: Path, cpus: int = 2, kill_wait_s: int = 30) -> None:
        self.folder = folder
        self.cpus, self.kill_wait_s = cpus, kill_wait_s
        self.node = socket.gethostname().split(".")[0]
        self.conf = folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "PATH": SBIN_PATH, MARKER_ENV: str(folder)}
        self.procs: list[subprocess.Popen] = []

    def _write_conf(self, socket_path: Path) -> None:
        ctld_port, slurmd_port = free_port(), free_port()
        f = self.folder
        self.conf.write_text("\n".join([
            "ClusterName=cliptest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",  # loopback only
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={socket_path},cred_expire=5",  # a requeued job starts cred_expire + 1 s later
            f"StateSaveLocation={f / 'state'}",
            f"SlurmdSpoolDir={f / 'spool'}",
            f"SlurmctldPidFile={f / 'slurmctld.pid'}",
            f"SlurmdPidFile={f / 'slurmd.pid'}",
            f"SlurmctldLogFile={f / 'slurmctld.log'}",
            f"SlurmdLogFile={f / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=1",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "JobRequeue=1",
            f"KillWait={self.kill_wait_s}",
            "MinJobAge=300",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.out", "wb")  # noqa: SIM115 (the daemon holds it)
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        """The tail of every daemon's log, for assertion messages."""
        parts = []
        for name in ("munged.out", "slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"):
            path = self.folder / name
            if path.exists():
                parts.append(f"--- {name}\n" + path.read_text(errors="replace")[-2000:])
        return "\n".join(parts)

    def wait(self, done: Callable[[], bool], what: str, timeout_s: float) -> None:
        """Poll `done` until true; AssertionError naming `what`, with the daemons' logs, when a daemon died or
        `timeout_s` passed."""
        deadline = time.monotonic() + timeout_s
        while not done():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            assert not dead, f"{dead} exited while waiting for {what}:\n{self.logs()}"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s:\n{self.logs()}"
            time.sleep(0.3)

    def __enter__(self) -> SlurmCluster:
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        key = self.folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        socket_dir = self.folder / "munge"
        socket_dir.mkdir(mode=0o755, exist_ok=True)
        socket_path = socket_dir / "munge.socket"
        self._write_conf(socket_path)
        try:
            # --force: the test's temp folders are not laid out the way munged's security checks expect
            self._start("munged", ["munged", "--foreground", "--force", f"--socket={socket_path}",
                                   f"--key-file={key}", f"--log-file={self.folder / 'munged.log'}",
                                   f"--pid-file={self.folder / 'munged.pid'}",
                                   f"--seed-file={self.folder / 'munged.seed'}"])
            self.wait(socket_path.exists, "munge socket", 30)
            self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._start("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
            self.wait(lambda: self.command(["sinfo", "-h", "-o", "%T"], check=False).strip() == "idle",
                      "idle node", 60)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            jobs = self.command(["squeue", "-h", "-o", "%i"], check=False).split() if self.procs else []
            if jobs:
                self.command(["scancel", *jobs], check=False)
                with contextlib.suppress(AssertionError):
                    self.wait(lambda: not self.command(["squeue", "-h"], check=False).strip(), "empty queue",
                              self.kill_wait_s + 15)
        finally:
            self._kill_job_processes()
            for proc in reversed(self.procs):  # slurmd, slurmctld, then munged
                _stop(proc)
            self.procs.clear()

    def _kill_job_processes(self) -> None:
        """Whatever the jobs left (slurmstepd is re-parented to init, so it is found by the marker in its
        environment, not as a child of slurmd): killed by pid."""
        import psutil

        for proc in psutil.process_iter(["pid"]):
            if proc.pid == os.getpid() or proc.pid in {p.pid for p in self.procs}:
                continue
            with contextlib.suppress(psutil.Error):
                if proc.environ().get(MARKER_ENV) == str(self.folder):
                    os.kill(proc.pid, signal.SIGKILL)

    def command(self, args: list[str], check: bool = True) -> str:
        """A SLURM client command against this cluster; its stdout ('' on failure when not `check`)."""
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60, check=False)
        if check:
            assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}): {done.stderr}"
        return done.stdout if done.returncode == 0 else ""

    def sbatch(self, args: list[str], env: dict[str, str], cwd: Path) -> str:
        """Submit a batch job (`sbatch --parsable ...args`) with `env` (the job's environment, sbatch exports it);
        returns the job id."""
        done = subprocess.run(["sbatch", "--parsable", *args], env={**env, **self.env_for_clients()}, cwd=cwd,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"sbatch failed ({done.returncode}): {done.stderr}\n{self.logs()}"
        return done.stdout.strip().split(";")[0]

    def env_for_clients(self) -> dict[str, str]:
        return {"SLURM_CONF": self.env["SLURM_CONF"], "PATH": self.env["PATH"], MARKER_ENV: self.env[MARKER_ENV]}

    def job_state(self, job: str) -> str | None:
        """RUNNING, PENDING, COMPLETING, ... while the queue holds the job; None once it left it."""
        return self.command(["squeue", "-h", "-j", job, "-o", "%T"], check=False).strip() or None

    def job_field(self, job: str, name: str) -> str:
        """A field of `scontrol show job` (e.g. JobState, Restarts, ExitCode), held MinJobAge s after the end."""
        for token in self.command(["scontrol", "-o", "show", "job", job]).split():
            key, _, value = token.partition("=")
            if key == name:
                return value
        raise AssertionError(f"no {name} in scontrol show job {job}")
