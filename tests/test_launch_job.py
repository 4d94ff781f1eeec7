"""TrainJob's decision after the trainer returns, without a cluster (scontrol is faked)."""
from __future__ import annotations

import os
import subprocess

import pytest

from lspretrain.launch import job as job_module
from lspretrain.launch.job import NotRequeued, TrainJob


def _trainer(monkeypatch, code: int, preempted: bool) -> None:
    monkeypatch.setattr(job_module, "run_trainer", lambda argv: (code, preempted))


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
    monkeypatch.setattr(job_module.subprocess, "run",
                        lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", ""))
    return calls


def test_finished_run_returns_its_code(slurm_task, monkeypatch):
    monkeypatch.setenv("RANK", "5")  # inherited from a submitter running under torchrun
    seen: list[str | None] = []
    monkeypatch.setattr(job_module, "run_trainer", lambda argv: (seen.append(os.environ.get("RANK")), (0, False))[1])
    assert TrainJob(("r.yaml",), 3)() == 0 and seen == [None]
    _trainer(monkeypatch, 3, False)
    with pytest.raises(RuntimeError, match="trainer exited with code 3"):
        TrainJob(("r.yaml",), 3)()
    assert slurm_task == []


def test_preempted_below_the_limit_requeues_from_rank_0_and_leaves_no_result(slurm_task, monkeypatch):
    _trainer(monkeypatch, 75, True)
    with pytest.raises(SystemExit):
        TrainJob(("r.yaml",), 2)()
    assert slurm_task == [["scontrol", "requeue", "42"]]
    monkeypatch.setenv("SLURM_PROCID", "1")
    with pytest.raises(SystemExit):
        TrainJob(("r.yaml",), 2)()
    assert len(slurm_task) == 1  # only rank 0 asks SLURM


def test_preempted_at_the_limit_raises_on_every_rank(slurm_task, monkeypatch):
    _trainer(monkeypatch, 75, True)
    with pytest.raises(NotRequeued, match=r"after 1 requeue\(s\) \(limit 1\)"):
        TrainJob(("r.yaml",), 1)()
    assert slurm_task == []


def test_checkpoint_resubmits_the_same_job():
    job = TrainJob(("r.yaml", "a=1"), 2)
    delayed = job.checkpoint()
    assert delayed.function == job and delayed.args == () and delayed.kwargs == {}


def test_preempted_outside_slurm_or_when_requeue_fails_is_an_error(slurm_task, monkeypatch):
    _trainer(monkeypatch, 75, True)
    monkeypatch.setattr(job_module.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "Job has already finished"))
    with pytest.raises(NotRequeued, match="scontrol requeue 42 failed: Job has already finished"):
        TrainJob(("r.yaml",), 3)()
    monkeypatch.delenv("SLURM_JOB_ID")
    with pytest.raises(NotRequeued, match="outside SLURM"):
        TrainJob(("r.yaml",), 3)()
