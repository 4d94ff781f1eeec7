"""TrainJob's decision after the trainer returns, without a cluster (scontrol is faked)."""
from __future__ import annotations

import os

import pytest

from lspretrain.launch import job as job_module
from lspretrain.launch.job import RequeueLimitReached, TrainJob


def finished(argv: list[str]) -> tuple[int, bool]:
    return 0, False


def failed(argv: list[str]) -> tuple[int, bool]:
    return 3, False


def preempted(argv: list[str]) -> tuple[int, bool]:
    return 0, True


@pytest.fixture
def slurm_task(monkeypatch):
    """Environment of task 0 of SLURM job 42, restarted once; records scontrol calls."""
    for key in list(os.environ):
        if key.startswith(("SLURM_", "SUBMITIT_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for key, value in {"SLURM_JOB_ID": "42", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
                       "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "0", "SLURM_RESTART_COUNT": "1"}.items():
        monkeypatch.setenv(key, value)
    calls: list[list[str]] = []
    monkeypatch.setattr(job_module.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    return calls


def test_finished_run_returns_its_code(slurm_task):
    assert TrainJob(("r.yaml",), 3, entry="test_launch_job:finished")() == 0
    with pytest.raises(RuntimeError, match="trainer exited with code 3"):
        TrainJob(("r.yaml",), 3, entry="test_launch_job:failed")()
    assert slurm_task == []


def test_preempted_below_the_limit_requeues_from_rank_0_and_leaves_no_result(slurm_task, monkeypatch):
    with pytest.raises(SystemExit):
        TrainJob(("r.yaml",), 2, entry="test_launch_job:preempted")()
    assert slurm_task == [["scontrol", "requeue", "42"]]
    monkeypatch.setenv("SLURM_PROCID", "1")
    with pytest.raises(SystemExit):
        TrainJob(("r.yaml",), 2, entry="test_launch_job:preempted")()
    assert len(slurm_task) == 1  # only rank 0 asks SLURM


def test_preempted_at_the_limit_raises_on_every_rank(slurm_task):
    with pytest.raises(RequeueLimitReached, match=r"after 1 requeue\(s\) \(limit 1\)"):
        TrainJob(("r.yaml",), 1, entry="test_launch_job:preempted")()
    assert slurm_task == []


def test_checkpoint_resubmits_the_same_job():
    job = TrainJob(("r.yaml", "a=1"), 2)
    delayed = job.checkpoint()
    assert delayed.function == job and delayed.args == () and delayed.kwargs == {}
