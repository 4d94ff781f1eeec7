"""Requeue mechanics on the real SLURM test cluster, with a seconds-fast stand-in trainer.

The stand-in (tests/launch_standin.py) keeps the trainer's contract: stop at a step boundary on
SIGUSR1, save, report "preempted", resume from run.dir. These tests show the launcher's half:
signal -> requeue of the same job id -> resume -> result delivered to the waiting client.
"""
from __future__ import annotations

import functools
import json
import subprocess
import time
from pathlib import Path

import pytest
import submitit

import lspretrain.launch.submit as submit_module
from lspretrain.launch.job import TrainJob
from lspretrain.launch.spec import LaunchSpec
from slurm_cluster import slurm_available, slurm_cluster  # noqa: F401

pytestmark = pytest.mark.skipif(not slurm_available(), reason="slurm-wlm and munge are not installed")
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def standin(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # sbatch hands the environment to the job
    monkeypatch.setattr(submit_module, "TrainJob", functools.partial(TrainJob, entry="launch_standin:run"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    return recipe


def _logs(spec: LaunchSpec, job_id: str) -> str:
    return "".join(p.read_text() for p in sorted((spec.run_dir / "submitit").glob(f"{job_id}_*_log.out")))


def _wait_for(path: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def _expected_loss(steps: int) -> float:
    loss = 0.0
    for step in range(steps):
        loss = loss * 0.9 + 1.0 / (step + 1)
    return loss


def test_preempted_job_checkpoints_requeues_and_finishes(slurm_cluster, standin, tmp_path):
    spec = LaunchSpec(recipe=standin, run_dir=tmp_path / "run", name="preempt", nodes=2, timeout_min=5,
                      overrides=("steps=30", "step_s=0.2"))
    job = submit_module.submit(spec)
    _wait_for(spec.run_dir / "ckpt-rank0.json")  # step 5 saved: mid-run
    subprocess.run(["scancel", "--signal=USR1", job.job_id], check=True)
    assert job.results() == [0, 0]
    logs = _logs(spec, job.job_id)
    assert logs.count("preempted step=") == 2 and f"requeued job {job.job_id} (requeue 1 of 3)" in logs
    starts = sorted(int(line.split("step=")[1].split()[0]) for line in logs.splitlines() if line.startswith("start step="))
    assert len(starts) == 4 and starts[:2] == [0, 0] and min(starts[2:]) >= 5
    for rank in (0, 1):
        final = json.loads((spec.run_dir / f"final-rank{rank}.json").read_text())
        assert final["step"] == 30 and final["loss"] == pytest.approx(_expected_loss(30), rel=1e-12)


def test_time_limit_requeues_then_stops_at_the_requeue_limit(slurm_cluster, standin, tmp_path):
    # 1 min limit, warned 50 s ahead: SLURM signals 10-40 s into each attempt.
    spec = LaunchSpec(recipe=standin, run_dir=tmp_path / "run", name="timeout", nodes=2, timeout_min=1,
                      signal_lead_s=50, max_requeues=1, overrides=("steps=100000", "step_s=0.1"))
    job = submit_module.submit(spec)
    with pytest.raises(submitit.core.utils.FailedJobError, match="RequeueLimitReached"):
        job.results()
    logs = _logs(spec, job.job_id)
    assert f"requeued job {job.job_id} (requeue 1 of 1)" in logs
    starts = [line for line in logs.splitlines() if line.startswith("start step=")]
    assert len(starts) == 4 and sum(s.endswith("restarts=1") and "step=0 " not in s for s in starts) == 2
