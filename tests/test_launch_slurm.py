"""submit.py against the real two-node SLURM test cluster (tests/slurm_cluster.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from slurm_cluster import slurm_available, slurm_cluster  # noqa: F401

pytestmark = pytest.mark.skipif(not slurm_available(), reason="slurm-wlm and munge are not installed")

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "launchers" / "submit.py"


def _submit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


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
