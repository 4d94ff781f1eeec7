"""submit.py against the real two-node SLURM test cluster (tests/slurm_cluster.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_cluster import _free_ports, slurm_available

pytestmark = pytest.mark.skipif(not slurm_available(), reason="slurm-wlm and munge are not installed")

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "launchers" / "submit.py"
RECIPE = REPO / "recipes" / "tiny" / "classification_single.yaml"


def _submit(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), *args], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env=env)


@pytest.mark.parametrize(
    "args, message",
    [
        (["{recipe}", "--partition", "nosuchpart"], "partition 'nosuchpart' does not exist on this cluster (available: debug)"),
        (["{missing}", "--partition", "debug"], "recipe '{missing}' does not exist"),
    ],
)
def test_bad_partition_or_recipe_fails_before_submission(slurm_cluster, tmp_path, args, message):
    recipe, missing = tmp_path / "r.yaml", tmp_path / "no such recipe.yaml"
    recipe.write_text("run:\n  total_steps: 1\n")
    fill = {"recipe": str(recipe), "missing": str(missing)}
    out = _submit(*[a.format(**fill) for a in args], "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 2
    assert f"error: {message.format(**fill)}" in out.stderr
    assert slurm_cluster.job_ids() == [] and not (tmp_path / "run").exists()


def _no_cluster_env(tmp_path: Path, kind: str) -> dict[str, str]:
    """``unconfigured``: no slurm.conf anywhere (the SLURM client installed, no cluster set up);
    ``dead``: a configuration whose controller port nothing listens on."""
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    if kind == "unconfigured":
        if Path("/etc/slurm/slurm.conf").exists():
            pytest.skip("this machine has a SLURM configuration")
        return env
    conf = tmp_path / "slurm.conf"
    (port,) = _free_ports(1)
    conf.write_text(f"ClusterName=gone\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort={port}\n"
                    "NodeName=n1 NodeAddr=127.0.0.1 CPUs=1 State=UNKNOWN\n"
                    "PartitionName=debug Nodes=n1 Default=YES State=UP\n")
    return {**env, "SLURM_CONF": str(conf)}


@pytest.mark.parametrize("kind", ["unconfigured", "dead"])
def test_dry_run_without_a_reachable_cluster_warns_and_prints_the_script(tmp_path, kind):
    """Told apart from a missing partition: --dry-run warns and prints the script, a real
    submission is refused naming the cause."""
    env = _no_cluster_env(tmp_path, kind)
    args = [str(RECIPE), "--partition", "debug", "--run-dir", str(tmp_path / "run")]
    dry = _submit(*args, "--dry-run", cwd=tmp_path, env=env)
    assert dry.returncode == 0, dry.stderr
    (warning,) = dry.stderr.splitlines()
    assert warning.startswith("warning: no SLURM controller answered (") and "does not exist" not in warning
    assert warning.endswith("): partition 'debug' not checked; the script is printed anyway")
    assert "#SBATCH --partition=debug" in dry.stdout.split("# sbatch script\n")[1]
    if kind == "dead":
        return  # the refusal below is the same code path; a dead controller costs ~9 s per call
    real = _submit(*args, cwd=tmp_path, env=env)
    assert real.returncode == 2 and real.stderr.startswith("error: no SLURM controller answered (")
    assert real.stderr.rstrip().endswith("): nothing submitted (--dry-run prints the script without a cluster)")
    assert not (tmp_path / "run").exists()
