"""A real SLURM cluster on 127.0.0.1 for tests: munged, slurmctld and two slurmd.

Everything (keys, sockets, state, spool, logs) lives in one temp dir. The two slurmd run as
simulated nodes ``n1`` and ``n2`` on the same machine; their names do not resolve, which is
exactly what the launcher's MASTER_ADDR fallback has to cope with.

Tests use the session fixture ``slurm_cluster`` defined in tests/conftest.py (one cluster for the
whole session); ``SlurmCluster`` can also be started on its own.

Teardown cancels every job, stops the daemons it started by pid and then kills, by pid, any
process still carrying this cluster's SLURM_CONF in its environment (slurmstepd and job tasks
are re-parented away from slurmd, so they are not our children).
"""
from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel")
NODES = ("n1", "n2")
PARTITION = "debug"
_PR_SET_PDEATHSIG = 1


def slurm_available() -> bool:
    return all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in SLURM_BINARIES)


def _binary(name: str) -> str:
    # Daemons live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class SlurmCluster:
    root: Path
    partition: str = PARTITION
    nodes: tuple[str, ...] = NODES
    cpus_per_node: int = 2
    _procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Environment for SLURM clients (sbatch, squeue, submitit) talking to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    # -- start ---------------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> None:
        for sub in ("etc", "munge", "state", "log", *(f"spool/{n}" for n in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)  # munged refuses key/socket dirs writable by others
        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        socket_path = self.root / "munge" / "munge.socket"
        self._spawn(
            "munged", "--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}",
            f"--pid-file={self.root / 'munge' / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
            f"--seed-file={self.root / 'munge' / 'munged.seed'}",
        )
        _wait_for(socket_path.exists, timeout_s, "munged socket", self.root / "log" / "munged.log")
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        self.conf.write_text(self._slurm_conf(socket_path, ctld_port, node_ports))
        self._spawn("slurmctld", "-D", "-i", "-f", str(self.conf))
        for node in self.nodes:
            self._spawn("slurmd", "-D", "-N", node, "-f", str(self.conf))
        _wait_for(self._all_idle, timeout_s, "idle nodes", self.root / "log" / "slurmctld.log")

    def _slurm_conf(self, munge_socket: Path, ctld_port: int, node_ports: list[int]) -> str:
        r = self.root
        lines = [
            "ClusterName=lsptest",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            # cred_expire=10: a requeued job may restart after ~11 s instead of the default ~120 s.
            f"AuthType=auth/munge\nAuthInfo=socket={munge_socket},cred_expire=10",
            "CredType=cred/munge",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            # A requeued job may start once cred_expire has passed; the main scheduling pass
            # (every 60 s by default) is what notices, so run it often.
            "SchedulerParameters=sched_interval=2",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "KillWait=5",
            "MinJobAge=60",
            "InactiveLimit=0",
            "JobRequeue=1",
            # Tasks derive MASTER_PORT from the job id: random first ids keep clusters of test
            # sessions running side by side on one machine from sharing ports.
            f"FirstJobId={secrets.randbelow(900_000) + 1000}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'state' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'spool'}/%n/slurmd.pid",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log'}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for node, port in zip(self.nodes, node_ports):
            lines.append(
                f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus_per_node} RealMemory=4000 State=UNKNOWN"
            )
        lines.append(f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}-{len(self._procs)}.out", "wb")
        with log:
            self._procs.append(
                subprocess.Popen([_binary(name), *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
            )

    def _all_idle(self) -> bool:
        self._check_alive()
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in self.nodes)

    def _check_alive(self) -> None:
        for p in self._procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode}; logs in {self.root / 'log'}")

    # -- helpers for tests -----------------------------------------------------------------
    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t")
        return dict(line.split() for line in out.stdout.splitlines() if line.strip())

    def job_ids(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i").stdout.split()

    def cancel_all(self, timeout_s: float = 20.0) -> None:
        ids = self.job_ids()
        if ids:
            self.run("scancel", *ids, check=False)
            _wait_for(lambda: not self.job_ids(), timeout_s, "job cancellation", None, raise_on_timeout=False)

    # -- stop ------------------------------------------------------------------------------
    def stop(self) -> None:
        if all(p.poll() is None for p in self._procs) and self._procs:
            try:
                self.cancel_all()
            except (subprocess.SubprocessError, OSError):
                pass  # a dead controller must not prevent the kills below
        for p in reversed(self._procs):  # slurmd before slurmctld before munged
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self._procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for pid in self.stray_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stray_pids(self) -> list[int]:
        """Live processes (slurmstepd, job tasks) whose environment points at this cluster's conf."""
        marker = f"SLURM_CONF={self.conf}".encode()
        me = os.getpid()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                env = (entry / "environ").read_bytes()
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            zombie = stat.rsplit(")", 1)[1].split()[0] == "Z"
            if not zombie and marker in env.split(b"\0"):
                found.append(int(entry.name))
        return found


def _die_with_parent() -> None:
    # If pytest itself is killed, finalizers never run: let the kernel stop the daemons.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _wait_for(pred, timeout_s: float, what: str, log: Path | None, raise_on_timeout: bool = True) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    if raise_on_timeout:
        tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
        raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tail}")
