"""What to launch and where: command-line values merged over site defaults, checked before submission.

``LaunchSpec`` is the single resolved description of a launch; ``sbatch_parameters`` turns it into
submitit ``SlurmExecutor`` parameters and ``sbatch_script`` renders the exact script submitit will
hand to ``sbatch``, which is what ``--dry-run`` prints.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ClusterUnreachable", "LaunchError", "LaunchSpec", "SlurmOptions", "check_partition", "check_run_name",
    "sbatch_parameters", "sbatch_script", "submitit_folder",
]

# submitit picks its preemption signal from this variable at import time, in the client and in
# the job; USR1 is the signal the trainer itself turns into "checkpoint at the next step".
PREEMPT_SIGNAL = "USR1"


class LaunchError(ValueError):
    """A launch request that cannot work; raised before anything is submitted."""


class ClusterUnreachable(LaunchError):
    """The SLURM client is installed but no controller answered: nothing can be checked or submitted."""


@dataclass(frozen=True, kw_only=True)
class SlurmOptions:
    """The SLURM settings a site file can default and a launch resolves (one definition for both)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    timeout_min: int = 60
    mem_gb: int = 0
    cpus_per_task: int = 0  # 0: SLURM's default
    max_requeues: int = 3
    signal_lead_s: int = 120


@dataclass(frozen=True, kw_only=True)
class LaunchSpec(SlurmOptions):
    recipe: Path
    run_dir: Path
    name: str
    nodes: int = 1
    gpus_per_node: int = 0
    overrides: tuple[str, ...] = ()
    sbatch_extra: dict[str, Any] = field(default_factory=dict)
    setup: tuple[str, ...] = ()
    local: bool = False

    @property
    def tasks_per_node(self) -> int:
        # One task per GPU; a CPU node runs one task.
        return max(1, self.gpus_per_node)

    def trainer_argv(self) -> list[str]:
        """Arguments of ``lspretrain.train``; the run directory comes last so it wins."""
        return [str(self.recipe), *self.overrides, f"run.dir={self.run_dir}"]

    def trainer_command(self) -> str:
        """The equivalent shell command, for humans (every value quoted)."""
        return shlex.join(["python", "-m", "lspretrain.train", *self.trainer_argv()])

    def validate(self) -> None:
        if any(ord(c) < 32 or ord(c) == 127 for c in self.name):
            # The name goes into a line of the sbatch script: a newline would end that line.
            raise LaunchError(f"--name {self.name!r}: control characters (newline, tab, ...) cannot be in a job name")
        if not self.recipe.is_file():
            raise LaunchError(f"recipe {str(self.recipe)!r} does not exist (or is not a file)")
        for key in ("nodes", "timeout_min"):
            if getattr(self, key) < 1:
                raise LaunchError(f"--{key.replace('_', '-')}={getattr(self, key)}: must be >= 1")
        for key in ("gpus_per_node", "mem_gb", "cpus_per_task", "max_requeues", "signal_lead_s"):
            if getattr(self, key) < 0:
                raise LaunchError(f"--{key.replace('_', '-')}={getattr(self, key)}: must be >= 0")
        if self.local and self.nodes != 1:
            raise LaunchError(f"--local runs on this machine only: --nodes must be 1, not {self.nodes}")
        for item in self.overrides:
            if not re.match(r"^[A-Za-z_][\w.]*=", item):
                raise LaunchError(f"override {item!r} is not of the form key=value")
        if self.signal_lead_s >= self.timeout_min * 60:
            raise LaunchError(
                f"signal lead {self.signal_lead_s} s >= time limit {self.timeout_min} min: the job would be "
                "told to checkpoint as soon as it starts; raise --timeout-min or lower signal_lead_s in the site file"
            )


def check_run_name(name: str) -> str:
    """``name``, refused unless it is one plain file name: the default run directory is
    ``<run_root>/<name>``, and a ``/`` or ``..`` would put it elsewhere."""
    if name in (".", "..") or "/" in name or "\0" in name or len(name.encode()) > 255:
        raise LaunchError(f"--name {name!r}: the run directory would be <run_root>/<name>, so the name must be one "
                          "file name (no '/', not '.' or '..', at most 255 bytes); choose another --name or give "
                          "--run-dir")
    return name


def submitit_folder(spec: LaunchSpec) -> Path:
    """Where submitit keeps the job pickles and the per-task logs (``%j_%t_log.out/err``)."""
    return spec.run_dir / "submitit"


def sbatch_parameters(spec: LaunchSpec) -> dict[str, Any]:
    """``SlurmExecutor.update_parameters`` keywords for ``spec`` (submitit shell-quotes each value)."""
    params: dict[str, Any] = {
        "job_name": spec.name,
        "time": spec.timeout_min,
        "nodes": spec.nodes,
        "ntasks_per_node": spec.tasks_per_node,
        # The job must re-enter the queue after `scontrol requeue`, whatever the site default; the
        # warning signal is the trainer's (submitit's own default would be USR2).
        "additional_parameters": {
            "requeue": True, "signal": f"{PREEMPT_SIGNAL}@{spec.signal_lead_s}", **spec.sbatch_extra,
        },
        "setup": [f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL}", *spec.setup],
    }
    optional = {
        "gpus_per_node": spec.gpus_per_node, "cpus_per_task": spec.cpus_per_task, "partition": spec.partition,
        "account": spec.account, "qos": spec.qos, "constraint": spec.constraint, "exclude": spec.exclude,
    }
    params.update({k: v for k, v in optional.items() if v})
    if spec.mem_gb:
        params["mem"] = f"{spec.mem_gb}GB"
    return params


def sbatch_script(spec: LaunchSpec, python: str = sys.executable) -> str:
    """The sbatch script submitit writes for ``spec`` (no SLURM needed to render it)."""
    from submitit.slurm.slurm import _make_sbatch_string  # the renderer SlurmExecutor itself uses

    folder = submitit_folder(spec)
    command = " ".join([shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **sbatch_parameters(spec))


def _slurm(*cmd: str) -> tuple[int | None, str, str]:
    """(exit code, stdout, stderr) of a SLURM client command; code None when it hangs."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None, "", f"{cmd[0]}: no answer within 60 s"
    return done.returncode, done.stdout, done.stderr


def check_partition(partition: str | None) -> None:
    """Refuse a partition the cluster does not have (only where the SLURM client is installed);
    raise ``ClusterUnreachable`` when no controller answers, which is not the partition's fault."""
    if shutil.which("sinfo") is None or shutil.which("scontrol") is None:
        return
    code, listed, err = _slurm("sinfo", "-h", "-a", "-o", "%R")
    if code != 0:
        lines = [line.strip() for line in err.splitlines() if line.strip()]
        raise ClusterUnreachable(f"no SLURM controller answered ({lines[-1] if lines else f'sinfo exit {code}'})")
    if partition is None:
        return
    code, out, err = _slurm("scontrol", "show", "partition", partition)
    if code == 0:
        return
    known = sorted(set(listed.split()))
    raise LaunchError(
        f"partition {partition!r} does not exist on this cluster"
        + (f" (available: {', '.join(known)})" if known else f": {err.strip() or out.strip()}")
    )
